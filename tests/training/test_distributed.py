"""The multi-process path: torchrun with 2 CPU processes (gloo), as users run it on many GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_OVERRIDES

# torchrun starts two training processes
pytestmark = pytest.mark.integration


def test_two_process_gloo_training_keeps_ranks_identical(tiny_demo_dir: Path, tiny_backbone_dir: Path, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hierloc",
           "-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
           f"model.backbone={tiny_backbone_dir}", "train.max_steps=3", *TINY_OVERRIDES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3
    # every parameter identical on both ranks after the steps (all-reduced max - min)
    assert summary["rank_param_divergence"] == 0.0
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow   # two trainings, one of them under torchrun (~1.5 min)
def test_two_process_frozen_validation_and_calibration_equal_one_process(tiny_demo_dir: Path,
                                                                         tiny_backbone_dir: Path, tmp_path):
    """A frozen run with --val-csv on 2 gloo processes: each rank extracts its share of the validation features,
    validates and calibrates its share of the rows, and the metrics and temperatures are those of one process.
    The learning rates are so small that the weights do not depend on the world size (the batches differ), so
    both runs validate and calibrate the same model."""
    from hierloc.cli import main
    from hierloc.training.features import FeatureCache

    args = ["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--val-csv", str(tiny_demo_dir / "val.csv"),
            "--no-progress", f"model.backbone={tiny_backbone_dir}", *TINY_OVERRIDES, "model.pretrained=false",
            "model.freeze_backbone=true", "train.max_steps=2", "train.lr=1e-12", "train.entity_lr=1e-12",
            "train.prototype_levels=none"]
    one = tmp_path / "one"
    assert main([*args, "--out", str(one)]) == 0
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hierloc",
           *args, "--out", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val_cache = FeatureCache.open(two / "feature_cache" / "val")
    assert val_cache.manifest["world_size"] == 2 and len(val_cache) == 20
    expected, got = (json.loads((run / "train_summary.json").read_text()) for run in (one, two))
    assert got["rank_param_divergence"] == 0.0
    assert expected["validation"]["n"] == got["validation"]["n"] == 20
    assert list(got["validation"]) == list(expected["validation"])
    for key, value in expected["validation"].items():
        assert got["validation"][key] == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), key
    assert got["calibration"]["n"] == expected["calibration"]["n"] == 20
    for key in ("temperatures", "flat_temperatures", "ece_before", "ece_after"):
        # (rel 1e-3: other batches change the float32 points' last bits, which the flat NLL of 20 rows lets the
        # fitted temperatures follow; tests/inference/test_sharded.py)
        assert got["calibration"][key] == pytest.approx(expected["calibration"][key], rel=1e-3), key
    assert got["calibration"]["temperatures"] != [1.0] * 4
    assert json.loads((two / "calibration.json").read_text())["temperatures"] == got["calibration"]["temperatures"]
