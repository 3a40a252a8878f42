"""Run the bad-input battery through the CLI and print what the user sees, as a Markdown table.

    .venv/bin/python tests/cli/bad_inputs_table.py [--workdir DIR] [--only KEY,...] [--check]

The cases are the catalogue of tests/cli/test_bad_inputs.py (`CASES`): every odd image, CSV, gazetteer and checkpoint,
through every command that reads it, in this process through `hierloc.cli.main` with stdout, stderr and log
records captured as a terminal shows them. The world they run against is built first in a temporary directory
(or --workdir), like the test fixtures: a tiny Blue Marble demo dataset, a tiny ViT backbone config, a model
trained for 6 steps (~15 s in all) and a small gazetteer of other countries.

Columns: input, command, exit code, message (the `hierloc: error:` or `internal error` line; else the warning
lines and the command's summary line, joined by " / "; any other stderr line, such as a Python warning, is
noted in brackets). Paths are shortened: inputs to their name in the case directory, MODEL for the world's model.
With --check, each row is also checked against the test's contract (tests/cli/test_bad_inputs.py: check_result);
failures are listed at the end, and the exit status is 1 unless every failure is a known gap (an xfail of the
test, with the owner's fix suggested in docs/reliability.md). ~70 s on the 2-core reference machine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_world(root: Path):
    """The tiny world of tests/conftest.py, built with the same library calls and tests/helpers.py's settings."""
    from gazetteer import Gazetteer
    from hierloc.cli import main
    from hierloc.data.demodata import make_demo_dataset
    from hierloc.model.backbones import tiny_vit_config, tiny_vit_preprocessor, write_backbone_config
    from tests.cli.test_bad_inputs import world_from
    from tests.helpers import SMALL_WITHIN, TINY_MODEL_OVERRIDES

    demo = root / "demo"
    if not (demo / "train.csv").is_file():
        make_demo_dataset(demo, n_train=240, n_test=40, n_unseen=40, n_val=0, patch_px=32, seed=1, progress=False)
    config = tiny_vit_config(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
    backbone = root / "backbone"
    if not (backbone / "config.json").is_file():
        write_backbone_config(backbone, config, tiny_vit_preprocessor(32))
    model = root / "model"
    if not (model / "config.json").is_file():
        code = main(["-q", "train", "--csv", str(demo / "train.csv"), "--out", str(model), "--no-progress",
                     "--overwrite", f"model.backbone={backbone}", *TINY_MODEL_OVERRIDES])
        if code != 0:
            raise SystemExit(f"training the tiny model failed (exit {code})")
    other = root / "other-gazetteer"
    if not (other / "metadata.json").is_file():
        Gazetteer.build_global(within=SMALL_WITHIN, progress=False).save(other, overwrite=True)
    return world_from(model, demo, backbone, other)


def shorten(text: str, case_dir: Path, world) -> str:
    """Absolute paths in a message -> short names the table can show."""
    replacements = [(str(case_dir / "inputs") + "/", ""), (str(case_dir / "outputs") + "/", "outputs/"),
                    (str(world.model_dir), "MODEL"), (str(world.model_dir.parent), "WORLD")]
    for old, new in replacements:
        text = text.replace(old, new)
    return text.replace("|", "\\|")


def command_line(result, case_dir: Path, world) -> str:
    """The command as the user would type it (short paths; the training overrides elided)."""
    words = []
    for arg in result.argv:
        arg = str(arg)
        if "=" in arg and not arg.startswith("-") and "." in arg.split("=")[0]:
            continue  # section.key=value overrides of the tiny training runs
        arg = shorten(arg, case_dir, world)
        words.append(f"'{arg}'" if " " in arg else arg)
    return "hierloc " + " ".join(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="keep the world and the cases here (default: a temp dir)")
    parser.add_argument("--only", default=None, help="comma-separated case keys (default: all)")
    parser.add_argument("--check", action="store_true", help="also check each row against the test's contract")
    parser.add_argument("--commands", action="store_true", help="add a column with the full command line")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    # the battery captures log records itself; without a handler here, the CLI's first run would install one
    # on stderr (logging.basicConfig) and every later warning would be printed twice
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger().setLevel(logging.WARNING)

    from tests.cli.test_bad_inputs import CASES, check_result, run_case

    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the training run's summary is not part of the table
            world = build_world(root / "world")
        print(f"world built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        header = "| input | command | exit code | message |"
        if args.commands:
            header = "| input | command | exit code | message | command line |"
        print(header)
        print("|" + "---|" * header.count(" | ") + "---|")
        failures = []
        n = 0
        for case in CASES:
            if only and case.key not in only:
                continue
            for command in case.expect:
                n += 1
                case_dir = root / "cases" / f"{case.key}--{command.replace(' ', '')}"
                if case_dir.exists():
                    shutil.rmtree(case_dir)
                result = run_case(case, command, case_dir, world)
                message = shorten(result.outcome.message(), case_dir, world)
                row = f"| {case.label} | `{command}` | {result.outcome.code} | {message} |"
                if args.commands:
                    row += f" `{command_line(result, case_dir, world)}` |"
                print(row, flush=True)
                if args.check:
                    try:
                        check_result(result)
                    except AssertionError as error:
                        gap = dict(case.gaps).get(command)
                        failures.append(str(error).splitlines()[0] + (f" [known gap: {gap}]" if gap else ""))
        print(f"{n} runs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if failures:
        print("\ncontract failures:\n" + "\n".join(failures), file=sys.stderr)
        return 1 if any("[known gap" not in failure for failure in failures) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
