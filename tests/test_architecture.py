"""The architecture's rules, checked on the source (ast) rather than by convention.

Layers: gazetteer (torch-free) <- hierloc.geometry <- data <- model <- training / inference <- cli, with config,
errors, device and version as base modules. Checked here:

- no import cycle among the modules of hierloc/ and gazetteer/ (imports inside functions count too);
- gazetteer never imports torch or hierloc;
- hierloc.training never reaches hierloc.inference, and hierloc.inference never reaches hierloc.training (the loss);
- no module imports another module's private (underscore) name; a private module is imported only by the modules
  of its own package;
- the project's own imports are at the top of each file, except in the CLI's command functions, which import the
  torch-heavy library when a command runs (so `hierloc --help` stays fast), and hierloc.__getattr__ (PEP 562);
- no script under scripts/ imports from tests/;
- `import hierloc` and building the CLI's parser import no torch.

Each rule is also run on a few synthetic modules that break it, so that a rule that could never fail is noticed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO as ROOT

PACKAGES = ("hierloc", "gazetteer")


@dataclass(frozen=True)
class Edge:
    """One import: `source` imports module `target` (names: what a `from target import ...` took from it)."""

    source: str
    target: str
    names: tuple[str, ...]
    line: int
    in_function: bool


# ------------------------------------------------------------------------------------------------ the graph
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(root: Path, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _context(node: ast.AST, parents: dict) -> tuple[bool, bool]:
    """(inside a function, inside `if TYPE_CHECKING:`)."""
    in_function = type_checking = False
    while node in parents:
        node = parents[node]
        in_function |= isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        type_checking |= isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    return in_function, type_checking


def imports_of(name: str, path: Path, known: set[str]) -> list[Edge]:
    """Every import of a module (TYPE_CHECKING blocks left out: they never run). `from pkg import sub` of a
    submodule is an edge to pkg.sub; other targets are kept as written (third-party: their top-level name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = _parents(tree)
    is_package = path.name == "__init__.py"
    edges = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        in_function, type_checking = _context(node, parents)
        if type_checking:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name if alias.name in known else alias.name.split(".")[0]
                edges.append(Edge(name, target, (), node.lineno, in_function))
            continue
        base = node.module or ""
        if node.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        submodules = [alias.name for alias in node.names if f"{base}.{alias.name}" in known]
        for sub in submodules:
            edges.append(Edge(name, f"{base}.{sub}", (), node.lineno, in_function))
        rest = tuple(alias.name for alias in node.names if alias.name not in submodules)
        if rest:
            target = base if base in known else base.split(".")[0]
            edges.append(Edge(name, target, rest, node.lineno, in_function))
    return edges


def build_graph(root: Path = ROOT, packages=PACKAGES) -> tuple[dict[str, Path], list[Edge]]:
    modules = modules_of(root, packages)
    known = set(modules)
    return modules, [edge for name, path in modules.items() for edge in imports_of(name, path, known)]


def _adjacency(edges: list[Edge], top_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.source != edge.target and not (top_level_only and edge.in_function):
            graph.setdefault(edge.source, set()).add(edge.target)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in graph.get(stack.pop(), ()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


# --------------------------------------------------------------------------------------------------- rules
def import_cycles(edges: list[Edge], known: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    graph = {source: {t for t in targets if t in known} for source, targets in _adjacency(edges).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def forbidden_reach(edges: list[Edge], sources: str, targets: tuple[str, ...]) -> list[str]:
    """'a -> b' for every module a under `sources` that reaches (directly or not) a module under `targets`."""
    graph = _adjacency(edges)
    found = []
    for source in sorted({edge.source for edge in edges if _under(edge.source, sources)}):
        hits = sorted(target for target in reachable(graph, source) if _under(target, *targets))
        found += [f"{source} -> {hit}" for hit in hits]
    return found


def _under(name: str, *prefixes: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def private_imports(edges: list[Edge], known: set[str]) -> list[str]:
    """Imports of another module's private name, and of a private module from outside its package."""
    found = []
    for edge in edges:
        for name in edge.names:
            if name.startswith("_") and not name.startswith("__"):
                found.append(f"{edge.source}:{edge.line} imports {edge.target}.{name}")
        if edge.target in known:
            parts = edge.target.split(".")
            private = [i for i, part in enumerate(parts) if part.startswith("_") and not part.startswith("__")]
            if private and not _under(edge.source, ".".join(parts[: private[0]])):
                found.append(f"{edge.source}:{edge.line} imports the private module {edge.target}")
    return found


def hidden_imports(edges: list[Edge], known: set[str]) -> list[str]:
    """Project imports inside functions, except hierloc.__getattr__ and the CLI's imports of modules that load torch
    when imported (their top-level imports reach it)."""
    top_level = _adjacency(edges, top_level_only=True)
    found = []
    for edge in edges:
        if not edge.in_function or edge.target.split(".")[0] not in PACKAGES:
            continue
        if edge.source == "hierloc":
            continue
        if _under(edge.source, "hierloc.cli") and "torch" in reachable(top_level, edge.target):
            continue
        found.append(f"{edge.source}:{edge.line} imports {edge.target} inside a function")
    return found


def scripts_importing_tests(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} imports {name}" for name in names if _under(name, "tests")]
    return found


# ------------------------------------------------------------------------------------------ the repository
@pytest.fixture(scope="module")
def graph():
    modules, edges = build_graph()
    return set(modules), edges


def test_no_import_cycles(graph):
    known, edges = graph
    assert import_cycles(edges, known) == []


def test_gazetteer_never_imports_torch_or_hierloc(graph):
    _known, edges = graph
    assert [f"{e.source}:{e.line} imports {e.target}" for e in edges
            if _under(e.source, "gazetteer") and _under(e.target, "torch", "hierloc")] == []


def test_training_does_not_reach_inference(graph):
    _known, edges = graph
    assert forbidden_reach(edges, "hierloc.training", ("hierloc.inference",)) == []


def test_inference_does_not_reach_training(graph):
    _known, edges = graph
    assert forbidden_reach(edges, "hierloc.inference", ("hierloc.training",)) == []


def test_no_module_imports_another_modules_private_name(graph):
    known, edges = graph
    assert private_imports(edges, known) == []


def test_project_imports_are_at_the_top_of_each_file(graph):
    known, edges = graph
    assert hidden_imports(edges, known) == []


def test_no_script_imports_from_tests():
    assert scripts_importing_tests() == []


MAX_MODULE_LINES = 600


def oversized_modules(root: Path = ROOT, limit: int = MAX_MODULE_LINES) -> list[str]:
    """The package modules longer than `limit` lines ("path: N lines")."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > limit:
                found.append(f"{path.relative_to(root)}: {n} lines")
    return found


def test_no_module_is_over_600_lines():
    """A module that grows past 600 lines holds more than one concern: split it along its seams."""
    assert oversized_modules() == []


def test_the_size_rule_reports_a_long_module(tmp_path):
    (tmp_path / "hierloc").mkdir()
    (tmp_path / "hierloc" / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (tmp_path / "hierloc" / "short.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    assert oversized_modules(tmp_path) == [f"hierloc/long.py: {MAX_MODULE_LINES + 1} lines"]


@pytest.mark.parametrize("code", [
    "import hierloc; hierloc.__version__",
    "from hierloc.cli import build_parser; build_parser()",   # every command's parser: `hierloc --help`
])
def test_importing_hierloc_and_its_cli_parser_loads_no_torch(code):
    check = f"import sys\n{code}\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_public_faces_are_the_package_attributes():
    from gazetteer import Gazetteer
    from gazetteer.core import Gazetteer as CoreGazetteer
    from hierloc import HierLoc
    from hierloc.inference.predictor import HierLoc as PredictorHierLoc

    assert HierLoc is PredictorHierLoc and Gazetteer is CoreGazetteer


# ------------------------------------------------------------------------------- the rules catch violations
def _write_tree(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


BROKEN = {
    "hierloc/__init__.py": "",
    "hierloc/a.py": "from hierloc import b\n",
    "hierloc/b.py": "def f():\n    from hierloc.a import thing\n",                   # cycle a <-> b (lazily)
    "hierloc/training/__init__.py": "",
    "hierloc/training/loop.py": "from hierloc.training import helper\n",
    "hierloc/training/helper.py": "from hierloc.inference.search import find\n",       # training -> inference
    "hierloc/inference/__init__.py": "",
    "hierloc/inference/search.py": "import hierloc.training.loop\n",                   # inference -> training
    "hierloc/inference/_kernel.py": "",
    "hierloc/model.py": "from hierloc.inference import _kernel\nfrom hierloc.a import _mlp\n",
    "hierloc/cli/__init__.py": "",
    "hierloc/cli/run.py": "def run():\n    from hierloc.model import thing\n",     # not torch-heavy: hidden
    "gazetteer/__init__.py": "",
    "gazetteer/core.py": "import torch\nfrom hierloc.a import x\n",
    "scripts/tool.py": "from tests.conftest import SMALL\n",
}


def test_each_rule_reports_a_synthetic_violation(tmp_path):
    _write_tree(tmp_path, BROKEN)
    modules, edges = build_graph(tmp_path)
    known = set(modules)
    cycles = import_cycles(edges, known)
    assert ["hierloc.a", "hierloc.b"] in cycles
    assert ["hierloc.inference.search", "hierloc.training.helper", "hierloc.training.loop"] in cycles
    assert {f"{e.source} -> {e.target}" for e in edges if _under(e.source, "gazetteer")} == {
        "gazetteer.core -> torch", "gazetteer.core -> hierloc.a"}
    assert "hierloc.training.loop -> hierloc.inference.search" in forbidden_reach(edges, "hierloc.training",
                                                                                  ("hierloc.inference",))
    assert "hierloc.inference.search -> hierloc.training.helper" in forbidden_reach(edges, "hierloc.inference",
                                                                                    ("hierloc.training",))
    private = private_imports(edges, known)
    assert any("hierloc.a._mlp" in item for item in private)
    assert any("private module hierloc.inference._kernel" in item for item in private)
    hidden = hidden_imports(edges, known)
    assert any(item.startswith("hierloc.b:2 ") for item in hidden)
    assert any(item.startswith("hierloc.cli.run:2 ") for item in hidden)
    assert scripts_importing_tests(tmp_path) == ["tool.py:1 imports tests.conftest"]


def test_allowed_imports_are_not_reported(tmp_path):
    _write_tree(tmp_path, {
        "hierloc/__init__.py": "def __getattr__(name):\n    from hierloc.heavy import Thing\n    return Thing\n",
        "hierloc/heavy.py": "import torch\n",
        "hierloc/geometry/__init__.py": "",
        "hierloc/geometry/kernels.py": "",
        "hierloc/geometry/formulas.py": "from hierloc.geometry.kernels import Pairwise\n",  # its own package
        "hierloc/cli/__init__.py": "",
        "hierloc/cli/run.py": "def run():\n    from hierloc.heavy import Thing\n",            # torch-heavy: ok
        "gazetteer/__init__.py": "",
    })
    modules, edges = build_graph(tmp_path)
    known = set(modules)
    assert import_cycles(edges, known) == []
    assert private_imports(edges, known) == []
    assert hidden_imports(edges, known) == []
