"""Crash-safe training: SIGKILL/SIGINT/SIGTERM and disk errors, then --resume ends bitwise where an
uninterrupted run of the same seed ends (tiny ViT, 32 px demo patches, 30 steps, a checkpoint every 4).

Every run here uses one torch thread (in this process and in the subprocesses), so that the interrupted and the
reference runs do the same floating-point work in the same order.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hierloc.model import modeldir
from hierloc.training import checkpoint as ckpt
from hierloc.cli import main
from hierloc.training.interrupt import GracefulStop, exit_code_for
from tests.helpers import TINY_OVERRIDES

TOTAL_STEPS = 30        # 240 images / batch 16 = 15 steps per epoch, 2 epochs
CHECKPOINT_EVERY = 4


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train_args(tiny_demo_dir: Path, tiny_backbone_dir: Path, tiny_model_dir: Path) -> list[str]:
    """`hierloc train` arguments without --out (the gazetteer is given, so no run rebuilds it)."""
    return ["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--gazetteer",
            str(tiny_model_dir / "gazetteer"), "--no-progress", f"model.backbone={tiny_backbone_dir}",
            *TINY_OVERRIDES, "train.epochs=2", f"train.checkpoint_every={CHECKPOINT_EVERY}"]


@pytest.fixture(scope="module")
def reference(train_args, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final parameters of the uninterrupted run."""
    from safetensors.torch import load_file

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference") / "run"
        assert main(train_args + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return load_file(str(out / ckpt.WEIGHTS_NAME))


def assert_bitwise_equal(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    final = load_file(str(run_dir / ckpt.WEIGHTS_NAME))
    assert final.keys() == reference.keys()
    different = {k: float((final[k].double() - reference[k].double()).abs().max())
                 for k in final if not torch.equal(final[k], reference[k])}
    assert not different, f"max |difference| per tensor: {different}"


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / ckpt.CHECKPOINTS_DIR / ckpt.LATEST_NAME
    return int(pointer.read_text().strip().split("-")[1]) if pointer.is_file() else -1


def start_training(train_args: list[str], out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "hierloc", *train_args, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while latest_step(out) < 0:
        if proc.poll() is not None:
            pytest.fail(f"training ended (status {proc.returncode}) before its first checkpoint: "
                        f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.01)
    return latest_step(out)


def assert_complete_checkpoint(out: Path, step: int) -> None:
    path = ckpt.latest_checkpoint(out)
    assert path is not None and path.name == f"step-{step:09d}"
    model_state, optimizers, trainer_state = ckpt.load_training_checkpoint(path)
    assert trainer_state["step"] == step and model_state and set(optimizers) == {"euclidean", "riemannian"}
    assert not [p.name for p in (out / ckpt.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_mid_interval_then_resume_ends_bitwise_equal(train_args, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_training(train_args, out)
    first = wait_for_checkpoint(proc, out)
    time.sleep(0.05)                      # into the next checkpoint interval
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed_from = latest_step(out)
    assert first <= resumed_from < TOTAL_STEPS
    assert not (out / ckpt.WEIGHTS_NAME).exists()         # killed before the end
    assert main(train_args + ["--out", str(out), "--resume"]) == 0
    assert_bitwise_equal(out, reference)


# ----------------------------------------------------------------------------------------- SIGINT / SIGTERM
@pytest.mark.slow     # ~20 s each on a loaded 2-core machine (a subprocess imports torch + transformers)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_checkpoints_and_exits_with_a_resume_hint(signum, train_args, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_training(train_args, out)
    wait_for_checkpoint(proc, out)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == exit_code_for(signum) == 128 + signum
    last = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert f"training stopped by {name} after step" in last and "--resume" in last, stderr
    step = int(last.split("after step ")[1].split()[0])
    assert CHECKPOINT_EVERY <= step < TOTAL_STEPS
    assert "hierloc -q train " in last and last.rstrip().endswith("--resume")     # the exact command to run
    assert_complete_checkpoint(out, step)
    assert not (out / ckpt.WEIGHTS_NAME).exists()
    assert main(train_args + ["--out", str(out), "--resume"]) == 0
    assert_bitwise_equal(out, reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_in_process_stops_after_the_current_step(signum, train_args, reference, tmp_path, monkeypatch,
                                                        caplog, capsys):
    """The fast variant (no subprocess): the signal arrives inside step 6 (the next checkpoint is due at 8). The
    CLI prints the resume notice once, as `hierloc: <message>` (not also as a log warning)."""
    import hierloc.training.train as train_mod

    original = train_mod._log_scalars
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def log_and_interrupt(writer, step, *args):
        original(writer, step, *args)
        if step == 6:
            signal.raise_signal(signum)

    monkeypatch.setattr(train_mod, "_log_scalars", log_and_interrupt)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        code = main(train_args + ["--out", str(out)])
    assert code == 128 + signum
    name = signal.Signals(signum).name
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"hierloc: training stopped by {name} after step 6 of 30; ") and "--resume" in last
    assert "training stopped" not in caplog.text          # printed once, not also logged as a warning
    assert {s: signal.getsignal(s) for s in handlers} == handlers      # handlers restored
    assert_complete_checkpoint(out, 6)
    monkeypatch.setattr(train_mod, "_log_scalars", original)
    assert main(train_args + ["--out", str(out), "--resume"]) == 0
    assert_bitwise_equal(out, reference)


# ------------------------------------------------------------------------------------ disk full / no permission
def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied")])
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(code, words, train_args, reference,
                                                                                tmp_path, monkeypatch, capsys):
    """The second checkpoint (step 8) fails half-way through its first file; step 4 and `latest` stay intact."""
    from gazetteer.atomic import atomic_open

    real_write = modeldir.atomic_write_bytes
    seen: dict = {}

    def failing_write(path, data):
        if "step-000000008" in str(path):
            seen["before"] = _digest(Path(path).parents[1] / "step-000000004")
            with atomic_open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
                raise OSError(code, os.strerror(code))
        real_write(path, data)

    monkeypatch.setattr(modeldir, "atomic_write_bytes", failing_write)
    out = tmp_path / "run"
    assert main(train_args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hierloc: error: cannot write checkpoint "), err
    assert str(out / "checkpoints" / "step-000000008") in err and words in err
    assert "still names the previous complete checkpoint step-000000004" in err
    assert latest_step(out) == 4
    assert _digest(out / "checkpoints" / "step-000000004") == seen["before"]
    assert not (out / "checkpoints" / "step-000000008").exists()
    assert_complete_checkpoint(out, 4)
    monkeypatch.setattr(modeldir, "atomic_write_bytes", real_write)     # space freed: resume finishes the run
    assert main(train_args + ["--out", str(out), "--resume"]) == 0
    assert_bitwise_equal(out, reference)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="running as root: directory permissions do not bind")
def test_read_only_checkpoint_directory_is_a_clear_error(train_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args + ["--out", str(out), "train.max_steps=4"]) == 0
    checkpoints = out / "checkpoints"
    before = _digest(checkpoints / "step-000000004")
    checkpoints.chmod(0o555)
    try:
        assert main(train_args + ["--out", str(out), "train.max_steps=8", "--resume"]) == 2
    finally:
        checkpoints.chmod(0o755)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "permission denied" in err.lower() and str(checkpoints) in err
    assert latest_step(out) == 4 and _digest(checkpoints / "step-000000004") == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="running as root: directory permissions do not bind")
def test_unwritable_output_parent_is_a_clear_error(train_args, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(train_args + ["--out", str(parent / "run")]) == 2
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "permission denied" in err.lower() and str(parent / "run") in err


def test_output_directory_that_cannot_be_created_is_a_one_line_error(train_args, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    assert main(train_args + ["--out", str(tmp_path / "a_file" / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"hierloc: error: cannot write output directory {tmp_path / 'a_file' / 'run'}: Not a directory\n"
    assert (tmp_path / "a_file").read_text() == "not a directory"


# ------------------------------------------------------------------------------------------ hierloc.training.interrupt
def test_graceful_stop_records_the_first_signal_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM" and stop.exit_code == 143
        signal.raise_signal(signal.SIGTERM)          # a repeat within the window (torchrun's double delivery)
    assert signal.getsignal(signal.SIGTERM) == previous


def test_second_ctrl_c_aborts_at_once():
    with GracefulStop(repeat_after_s=0.0) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_graceful_stop_outside_the_main_thread_leaves_signals_alone():
    result = {}

    def run():
        with GracefulStop() as stop:
            result["handler"] = signal.getsignal(signal.SIGINT)
            result["requested"] = stop.requested

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert result == {"handler": signal.default_int_handler, "requested": False}


def test_resume_command_repeats_the_command_line_with_resume():
    from hierloc.training.interrupt import resume_command

    assert resume_command(["/x/bin/hierloc", "train", "--csv", "a b.csv", "--out", "r"]) == \
        "hierloc train --csv 'a b.csv' --out r --resume"
    assert resume_command(["/x/hierloc/__main__.py", "train", "--resume"]) == \
        shlex.join([sys.executable, "-m", "hierloc", "train", "--resume"])
    assert resume_command(["pytest", "tests"]) is None
