"""Helpers shared by the scripts under scripts/ (a module, not a script): timers, /proc readers, peak memory of a
fresh process, the tiny demo world and model the benchmarks train when given none, and the demo's path metrics.

A script imports it as ``from _common import ...``: ``python scripts/<name>.py`` puts scripts/ first on sys.path.

Imports: the standard library and numpy at the top, nothing else. Each helper that needs the library, PIL or torch
imports it when called, because several scripts measure peak memory: their own (bench_gazetteer's child) or a
child's, whose ru_maxrss starts at the parent's peak (exec after vfork keeps the parent's high-water mark:
bench_csv_memory's "RSS before reading"). `hierloc.inference.metrics` alone adds ~7 MB to a process that has only
numpy; PIL and the demo-data writer add ~2.5 MB.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np


# ------------------------------------------------------------------------------------------------------ timers
class Stopwatch:
    """``with Stopwatch() as watch: ...`` -> ``watch.seconds``, what the block took on ``clock`` (default: wall
    time, `time.perf_counter`; `time.thread_time` or `time.process_time` for CPU time)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = self.seconds = float("nan")

    def __enter__(self) -> "Stopwatch":
        self.start = self.clock()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = self.clock() - self.start


def time_runs(fn: Callable[[], object], repeats: int, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()``, after ``warmup`` calls that are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Stopwatch(clock) as watch:
            fn()
        times.append(watch.seconds)
    return times


def best_and_median(times: list[float]) -> tuple[float, float]:
    """(min, median) of timings: on a shared machine the minimum is the uncontended estimate, the median shows the
    noise."""
    return min(times), float(np.median(times))


# ------------------------------------------------------------------------------------------------------ memory
def proc_kb(field: str, pid: int | str = "self", file: str = "status", default: int | None = None) -> int:
    """The kB value of a ``Field:`` line of /proc/<pid>/<file> (VmRSS, VmHWM of ``status``; Pss of
    ``smaps_rollup``). Raises OSError / LookupError when it cannot be read, unless a ``default`` is given (e.g. 0
    for a process that may have exited)."""
    try:
        with open(f"/proc/{pid}/{file}", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise LookupError(f"{field} not in /proc/{pid}/{file}")
    except (OSError, LookupError, ValueError):
        if default is None:
            raise
        return default


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process now (VmRSS), MiB."""
    return proc_kb("VmRSS", pid) / 1024


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS (/proc/self/clear_refs, value 5); False where
    the kernel does not allow it (then VmHWM and ru_maxrss keep the peak of the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run_json_child(argv: list[str], env: dict[str, str] | None = None) -> object:
    """Run ``python *argv`` in a fresh process (so that its peak memory is its own) and return the JSON value of the
    last line it prints. Raises subprocess.CalledProcessError if it fails."""
    done = subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ tiny world and model
def hierloc_command(*args: str) -> list[str]:
    """The command line of ``hierloc ARGS`` run by this interpreter (``python -m hierloc``)."""
    return [sys.executable, "-m", "hierloc", *args]


def make_demo_world(directory: Path, n_train: int, patch_px: int, overwrite: bool = False) -> Path:
    """A small demo dataset (`hierloc.data.demodata`: Blue Marble patches of ``patch_px`` px, seed 1): ``n_train``
    training images, 10 per test split, no validation split. -> the directory (train.csv, test_*.csv, images/)."""
    from hierloc.data.demodata import make_demo_dataset  # (see the module docstring: imports)

    make_demo_dataset(directory, n_train=n_train, n_test=10, n_unseen=10, n_val=0, patch_px=patch_px, seed=1,
                      progress=False, overwrite=overwrite)
    return directory


def write_tiny_vit_backbone(directory: Path, image_size: int, **sizes: int) -> Path:
    """A local ViT backbone without weights (config + preprocessor, trained from scratch) at ``image_size`` px;
    ``sizes``: `hierloc.model.backbones.tiny_vit_config`'s patch_size, hidden_size, num_layers, num_heads, mlp_dim.
    -> the directory, for ``model.backbone=DIR``."""
    from hierloc.model.backbones import tiny_vit_config, tiny_vit_preprocessor, write_backbone_config  # torch

    config = tiny_vit_config(image_size=image_size, **sizes)
    return write_backbone_config(directory, config, tiny_vit_preprocessor(image_size))


def train_demo_model(work: Path, steps: int, backbone: str = "tiny-vit", image_size: int | None = 64,
                     batch_size: int = 16, patch_px: int = 64) -> Path:
    """A model to benchmark with when none is given: `make_demo_world` (240 training patches of ``patch_px`` px) in
    work/demo-data, then ``hierloc -q train`` for ``steps`` steps (one epoch at most, no DataLoader workers) in a
    subprocess, stdout discarded. ``backbone``: a packaged name or a local directory (`write_tiny_vit_backbone`);
    ``image_size``: model.image_size (None: the backbone's). -> work/model."""
    data, out = make_demo_world(work / "demo-data", n_train=240, patch_px=patch_px), work / "model"
    overrides = [f"model.backbone={backbone}", *([f"model.image_size={image_size}"] if image_size else []),
                 f"train.batch_size={batch_size}", "train.epochs=1", f"train.max_steps={steps}", "train.num_workers=0"]
    command = hierloc_command("-q", "train", "--csv", str(data / "train.csv"), "--out", str(out), "--no-progress",
                              *overrides)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def write_jpegs(root: Path, n: int, px: int, seed: int = 0) -> float:
    """n seeded JPEGs of px x px (smooth colour fields + noise, a few KB each) as root/<k>/<i>.jpg, 1,000 per
    sub-directory; -> seconds taken."""
    from PIL import Image  # (see the module docstring: imports)

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px
    with Stopwatch() as watch:
        for i in range(n):
            folder = root / f"{i // 1000:03d}"
            if i % 1000 == 0:
                folder.mkdir(parents=True, exist_ok=True)
            a, b, c = rng.uniform(0, 1, (3, 3, 1, 1)).astype(np.float32)
            field = a * 255 * (0.5 + 0.5 * np.sin(6.28 * (b * xx + c * yy)))
            pixels = np.clip(field.transpose(1, 2, 0) + rng.normal(0, 12, (px, px, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=85)
    return watch.seconds


# ------------------------------------------------------------------------------------------------------ metrics
def entity_keys(paths: np.ndarray) -> tuple[np.ndarray, ...]:
    """Paths (N, 4) of global entity ids -> per level (N,) keys for `hierloc.inference.metrics`' level accuracy:
    the id as text, `metrics.MISSING_KEY` where the id is -1 (no entity: not a truth, never a hit)."""
    from hierloc.inference import metrics  # (see the module docstring: imports)

    paths = np.asarray(paths)
    return tuple(np.where(paths[:, level] >= 0, paths[:, level].astype(str), metrics.MISSING_KEY).astype(object)
                 for level in range(paths.shape[1]))


def path_metrics(pred_paths: np.ndarray, truth: np.ndarray, pred_lat, pred_lon, true_lat, true_lon) -> dict:
    """The demo's metrics of N predictions: OSV5M's distance metrics (`metrics.distance_metrics`: n, mean_km,
    median_km, geoscore, acc_1km ... acc_2500km) and acc_<level>, the share of rows whose predicted entity is the
    true point's (`Gazetteer.locate`), over the rows whose true point resolves at that level (NaN if none)."""
    from gazetteer.schema import LEVELS  # (see the module docstring: imports)
    from hierloc.inference import metrics

    out = metrics.distance_metrics(pred_lat, pred_lon, true_lat, true_lon)
    accuracy = metrics.osv5m_level_accuracy(entity_keys(pred_paths), entity_keys(truth), missing="skip")
    out.update({f"acc_{level}": accuracy[f"acc_{level}"] for level in LEVELS})
    return out
