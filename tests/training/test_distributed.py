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
