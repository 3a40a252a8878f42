"""The multi-process path: torchrun with 2 CPU processes (gloo), as users run it on many GPUs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hierloc.training.checkpoint import latest_checkpoint as ckpt_latest
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


# ------------------------------------------------------------------------------- a lost rank, elastic restarts
FAULT_STEPS = 28           # 240 images / (batch 16 x 2 ranks) = 7 steps per epoch, 4 epochs
FAULT_ARGS = ["train.epochs=4", "train.checkpoint_every=4"]
LOST_RANK_BOUND_S = 60     # from the SIGKILL of one rank to the end of the job (gloo: the survivor fails at once)


def _torchrun(tiny_demo_dir: Path, tiny_backbone_dir: Path, out: Path, *extra: str, launcher=()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launcher,
            "-m", "hierloc", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
            f"model.backbone={tiny_backbone_dir}", *TINY_OVERRIDES, *FAULT_ARGS, *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _latest_step(out: Path) -> int:
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.is_file() else -1


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of `rank` (its children, found through /proc)."""
    children = []
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


def _kill_rank_after_first_checkpoint(proc: subprocess.Popen, out: Path, rank: int) -> tuple[int, float]:
    deadline = time.monotonic() + 180
    while _latest_step(out) < 0:
        assert proc.poll() is None, f"the job ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.kill(_worker_of_rank(proc.pid, rank), signal.SIGKILL)
    return _latest_step(out), time.monotonic()


@pytest.fixture(scope="module")
def two_rank_run(tiny_demo_dir: Path, tiny_backbone_dir: Path, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run (dropout on: each rank draws its own masks); read-only."""
    out = tmp_path_factory.mktemp("ddp-reference") / "run"
    proc = subprocess.run(_torchrun(tiny_demo_dir, tiny_backbone_dir, out), env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_bitwise(out: Path, reference_run: Path) -> None:
    reference = load_file(str(reference_run / "model.safetensors"))
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_a_killed_rank_ends_the_job_with_one_line_and_resume_ends_bitwise_equal(tiny_demo_dir, tiny_backbone_dir,
                                                                                 two_rank_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(tiny_demo_dir, tiny_backbone_dir, out), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    checkpoint, killed_at = _kill_rank_after_first_checkpoint(proc, out, rank=1)
    _, stderr = proc.communicate(timeout=LOST_RANK_BOUND_S + 30)
    assert time.monotonic() - killed_at < LOST_RANK_BOUND_S          # the survivor did not hang
    assert proc.returncode != 0 and not (out / "model.safetensors").exists()
    [line] = [line for line in stderr.splitlines() if line.startswith("hierloc:")]
    assert line.startswith("hierloc: rank 0 lost contact with rank 1 of the 2 processes after step ")
    assert f"the last complete checkpoint is {out / 'checkpoints'}/step-" in line
    command = line.split("to continue, run: ")[1]
    assert command.startswith("torchrun --standalone --nproc_per_node 2 -m hierloc train ")
    assert command.endswith(" --resume") and f"--out {out}" in command
    assert _latest_step(out) >= checkpoint
    trainer_state = json.loads((ckpt_latest(out) / "trainer_state.json").read_text())
    assert trainer_state["world_size"] == 2 and len(trainer_state["rng_ranks"]) == 2
    assert trainer_state["rng_ranks"][0]["torch"] != trainer_state["rng_ranks"][1]["torch"]   # own streams

    resumed = subprocess.run(_torchrun(tiny_demo_dir, tiny_backbone_dir, out, "--resume"), env=_env(),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == FAULT_STEPS
    _assert_bitwise(out, two_rank_run)


def test_torchrun_max_restarts_resumes_by_itself_and_ends_bitwise_equal(tiny_demo_dir, tiny_backbone_dir,
                                                                        two_rank_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(tiny_demo_dir, tiny_backbone_dir, out, launcher=("--max-restarts", "1")),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_rank_after_first_checkpoint(proc, out, rank=1)
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    assert "torchrun restarted the job (restart 1): resuming from the last checkpoint" in stderr
    _assert_bitwise(out, two_rank_run)


def test_a_checkpoint_resumes_only_with_the_world_size_that_wrote_it_but_loads_anywhere(tiny_demo_dir,
                                                                                      tiny_backbone_dir, two_rank_run,
                                                                                      tmp_path, capsys):
    from hierloc.cli import main
    from hierloc.inference.predictor import HierLoc

    out = tmp_path / "run"
    shutil.copytree(two_rank_run, out)
    (out / "model.safetensors").unlink()               # as if stopped before the end
    before = {p.name: p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()}
    args = ["train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
            f"model.backbone={tiny_backbone_dir}", *TINY_OVERRIDES, *FAULT_ARGS, "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainer_state.json: this checkpoint was written by a job of 2" in err
    assert "this one has 1" in err and "torchrun --nproc_per_node 2" in err
    assert {p.name: p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()} == before
    # the model directory of a 2-process run serves a single process
    model = HierLoc.from_pretrained(two_rank_run, device="cpu")
    [prediction] = model.predict([sorted((tiny_demo_dir / "images" / "test_unseen").glob("*.jpg"))[0]])
    assert prediction.ok and -90 <= prediction.lat_deg <= 90


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
