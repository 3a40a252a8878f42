"""scripts/gpu_check.py keeps working on a machine without CUDA: it runs what the CPU can and says what it skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.mark.integration   # a subprocess: extraction with the packaged weights, two training rows
def test_gpu_check_on_cpu_prints_its_table_counts_zero_syncs_and_skips_what_needs_cuda(small_gazetteer_dir, tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--gazetteer", str(small_gazetteer_dir), "--batches", "8",
                           "--steps", "1", "--extract-batch", "4", "--extract-images", "8", "--workers", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    by_check = {}
    for row in rows:
        by_check.setdefault(row["check"], []).append(row)
    assert set(by_check) == {"extract: forward", "extract: end to end", "train: frozen step",
                             "nccl: 2-process training"}
    for check in ("extract: forward", "extract: end to end"):
        float32, autocast = by_check[check]
        assert float32["result"].endswith(" images/s") and float(float32["result"].split()[0]) > 0
        assert autocast["result"] == "skipped (needs CUDA)"
    train = by_check["train: frozen step"]
    assert [r["setting"].endswith(f"loss.blocked={b}") for r, b in zip(train, ("false", "true"))] == [True, True]
    for row in train:
        assert row["result"].endswith(" steps/s") and float(row["result"].split()[0]) > 0
        assert row["note"].endswith(", 0 host syncs/step")      # the step reads nothing back from the device
    assert by_check["nccl: 2-process training"][0]["result"] == "skipped (needs 2 GPUs)"
    table = done.stdout.splitlines()
    assert table[-len(rows) - 2].split() == ["check", "setting", "result", "note"]
    assert all(row["setting"] in line for row, line in zip(rows, table[-len(rows):]))
