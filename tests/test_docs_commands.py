"""Every `hierloc ...` command line shown in README.md and docs/*.md parses with the real command-line parser.

Command lines in fenced code blocks (shell lines starting with `hierloc`, backslash continuations joined,
`# comments` dropped) are parsed exactly as `hierloc` would parse them, without running anything. Inline code
spans that start with `hierloc ` are often fragments (`hierloc train --resume`), so for them the command must exist
and every flag they show must be one of its options. Synopses with placeholders (`[--opt X]`, `IMAGES...`) are
left out. `python scripts/X.py` commands must name a script that exists.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from hierloc.cli import build_parser, parse_args
from tests.helpers import REPO as ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(hierloc [^`]+)`")
SCRIPT = re.compile(r"python (scripts/[\w/]+\.py)")


def _strip_comment(line: str) -> str:
    """Drop a shell comment (a '#' outside quotes that starts a word)."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        return " ".join(shlex.quote(token) for token in lexer)
    except ValueError:
        return line


def commands_in(text: str) -> list[str]:
    """The full `hierloc ...` command lines of a markdown text's code blocks (see the module docstring)."""
    found = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if line.startswith("hierloc "):
                found.append(_strip_comment(line))
    return [line for line in found if not _is_synopsis(line)]


def fragments_in(text: str) -> list[str]:
    """The inline `hierloc ...` spans of a markdown text (program output such as `hierloc predict: 3 images` left
    out)."""
    spans = [span for span in INLINE.findall(text) if not span.split()[1].endswith(":")]
    return [span for span in spans if not _is_synopsis(span)]


def _is_synopsis(line: str) -> bool:
    return bool(re.search(r"\[|\.\.\.|<|\||IMAGES?\b", line))


def _collect(extract) -> list[tuple[str, str]]:
    return [(path.relative_to(ROOT).as_posix(), line) for path in DOCS
            for line in extract(path.read_text(encoding="utf-8"))]


COMMANDS = _collect(commands_in)
FRAGMENTS = _collect(fragments_in)


def test_the_readme_shows_commands_and_they_are_collected():
    readme = [line for source, line in COMMANDS if source == "README.md"]
    # the two demo steps, the tour and the config command are all found (a broken extractor would find none)
    assert any(line.startswith("hierloc train ") and "model.backbone=efficientnet-lite0" in line for line in readme)
    assert any(line.startswith("hierloc eval ") for line in readme)
    assert any(line.startswith("hierloc config") for line in readme)
    assert len(readme) >= 8


@pytest.mark.parametrize("source,line", COMMANDS, ids=[f"{s}:{c[:60]}" for s, c in COMMANDS])
def test_documented_command_parses(source, line):
    parser = build_parser()
    argv = shlex.split(line)[1:]
    try:
        args = parse_args(argv, parser)
    except SystemExit as exc:  # argparse's usage error (it printed the reason on stderr); 0: --version / --help
        assert exc.code == 0, f"{source}: `{line}` does not parse (exit {exc.code})"
        return
    assert callable(args.func)


@pytest.mark.parametrize("source,span", FRAGMENTS, ids=[f"{s}:{c[:60]}" for s, c in FRAGMENTS])
def test_documented_fragment_names_real_options(source, span):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    tokens = shlex.split(span)[1:]
    if tokens[0].startswith("-"):  # a global option: `hierloc --version`
        assert tokens[0] in parser._option_string_actions, f"{source}: `{span}`: no option {tokens[0]}"
        return
    assert tokens[0] in commands, f"{source}: `{span}`: no command {tokens[0]!r}"
    options = commands[tokens[0]]._option_string_actions
    for token in tokens[1:]:
        if token == "--":  # the end of options: what follows is positional
            break
        flag = token.split("=", 1)[0]
        if flag.startswith("-") and flag != "-":
            assert flag in options, f"{source}: `{span}`: `hierloc {tokens[0]}` has no option {flag}"


def test_a_wrong_command_is_caught():
    """The check can fail: the command line the README used to show (the CSV given as --csv) is refused."""
    with pytest.raises(SystemExit):
        parse_args(shlex.split("eval --model DIR --csv test.csv"), build_parser())


def test_extractor_joins_continuations_and_drops_comments():
    text = "```bash\nhierloc train --csv a.csv \\\n    --out b   # the run\n$ hierloc predict x.jpg --model m\n" \
           "echo hierloc predict\n```\nand `hierloc eval --predictions p.csv` and `hierloc explain IMAGES...`\n" \
           "printed: `hierloc predict: 3 images`\n"
    assert commands_in(text) == ["hierloc train --csv a.csv --out b", "hierloc predict x.jpg --model m"]
    assert fragments_in(text) == ["hierloc eval --predictions p.csv"]


def test_a_fragment_with_a_wrong_flag_is_caught():
    with pytest.raises(AssertionError, match="has no option --skip-bad"):
        test_documented_fragment_names_real_options("x.md", "hierloc eval --skip-bad")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_documented_scripts_exist(path):
    for script in SCRIPT.findall(path.read_text(encoding="utf-8")):
        assert (ROOT / script).is_file(), f"{path.name} names {script}, which does not exist"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_have_no_machine_paths_or_diary(path):
    """Docs are for users: no path of one machine, no references to notes outside the repository."""
    text = path.read_text(encoding="utf-8")
    for needle in ("/tmp/", "/work/", "this session", "design.md", "papers.md", "../shared"):
        assert needle not in text, f"{path.name} mentions {needle!r}"


def _code_block_after(text: str, heading: str) -> list[str]:
    """The command lines (comments dropped) of the first ```bash block after `heading`."""
    rest = text[text.index(heading):]
    block = rest[rest.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_readmes_two_commands_are_the_ones_ci_runs():
    """README's "two commands" are `make demo` and `make test`; CI (.ci/run) runs `make test`, whose target
    installs first (the install stamp) and then runs the suite: a missing install step fails CI, not a user."""
    assert _code_block_after((ROOT / "README.md").read_text(encoding="utf-8"), "## The two commands") == [
        "make demo", "make test"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.strip().startswith("#")]
    assert ci[-1] == "make test"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile[makefile.index("\ntest: "):].splitlines()
    assert recipe[1].strip() == "test: $(STAMP)" and "-m pytest" in recipe[2]
    assert "pip install --quiet -e" in makefile[makefile.index("$(STAMP):"):makefile.index("\ninstall:")]
