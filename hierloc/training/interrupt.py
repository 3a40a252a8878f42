"""Graceful stop on SIGINT/SIGTERM for long loops (training): stop at the next safe point, not mid-write.

    with GracefulStop() as stop:
        for batch in loader:
            train_step(batch)
            if stop.requested:          # set by the first SIGINT (Ctrl-C) or SIGTERM
                save_checkpoint(); break

- The first SIGINT or SIGTERM only records the signal (`stop.signum`); the loop finishes its current step and
  decides what to do (hierloc.training.train writes a checkpoint and exits with `stop.exit_code` = 128 + signal number:
  130 for SIGINT, 143 for SIGTERM, the shell's convention for "ended by this signal").
- A second signal of the same kind, more than `repeat_after_s` after the first, aborts at once: the previous
  handler is put back and called (SIGINT: KeyboardInterrupt; SIGTERM with the default action: the process ends).
  Repeats closer together are ignored: under torchrun a Ctrl-C reaches every worker twice within milliseconds
  (from the terminal and from the launcher), which must not count as "press again to abort".
- `TrainingInterrupted` is how a stopped run ends (a SystemExit with that status and the resume command,
  `resume_command`); `stop_signal` agrees on the signal across torchrun's ranks.
- Handlers are installed only in the main thread (Python allows no other), and only act in the process that
  installed them: forked DataLoader workers inherit them and then ignore the signal, leaving the decision to
  the main process. The previous handlers are restored on exit.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from hierloc.device import Runtime, launcher_command
from hierloc.training import checkpoint as ckpt

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code_for(signum: int) -> int:
    """128 + signal number (SIGINT -> 130, SIGTERM -> 143): what a shell reports for a job ended by the signal."""
    return 128 + int(signum)


class GracefulStop:
    """Context manager recording the first SIGINT/SIGTERM instead of dying; see the module docstring."""

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS, repeat_after_s: float = 1.0,
                 notice: str = "finishing the current step and writing a checkpoint"):
        self.signals = tuple(signals)
        self.repeat_after_s = float(repeat_after_s)
        self.notice = notice
        self.signum: int | None = None
        self._first_at = 0.0
        self._old: dict[int, object] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------------------------ state
    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum) if self.signum is not None else 0

    # ------------------------------------------------------------------------------------------- handlers
    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: SIGINT/SIGTERM keep their usual behaviour")
            return self
        self._pid = os.getpid()
        for signum in self.signals:
            self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._old = {}

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:      # a forked worker: the main process decides
            return
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {signal.Signals(signum).name} again"
            log.warning("received %s: %s (%s to abort at once)", signal.Signals(signum).name, self.notice, again)
            return
        if signum != self.signum or now - self._first_at < self.repeat_after_s:
            return
        previous = self._old.get(signum, signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)       # SIGINT's default: raises KeyboardInterrupt here
        elif previous != signal.SIG_IGN:
            signal.raise_signal(signum)   # the default action: end the process now


class TrainingInterrupted(SystemExit):
    """Training stopped by SIGINT/SIGTERM after a checkpoint was written. A SystemExit whose code is 128 + the
    signal number (130 SIGINT, 143 SIGTERM), so the process ends with the shell's status for the signal;
    `message` is the one-line notice that says how to resume (`hierloc train` prints it as `hierloc: <message>`
    on stderr; the library only logs it at debug level)."""

    def __init__(self, code: int, message: str, checkpoint: Path | None, step: int):
        super().__init__(code)
        self.message, self.checkpoint, self.step = message, checkpoint, step

    def __str__(self) -> str:
        return self.message


class RankLost(TrainingInterrupted):
    """Another process of a torchrun job is gone (killed, crashed, its machine lost), so this one cannot take
    another step. Exit status 1; `message` names the lost rank where it can be known (a job of two processes: the
    other one; otherwise torchrun's failure report names it), the last complete checkpoint and the command that
    resumes from it. Every surviving rank prints it (rank 0 may be the lost one)."""


def lost_rank(error: BaseException, out: Path, step: int, total_steps: int, runtime: Runtime) -> RankLost:
    """The exception that ends a surviving rank after a collective failed because another rank is gone."""
    who = (f"rank {1 - runtime.rank}" if runtime.world_size == 2 else
           "another rank (torchrun's failure report names it)")
    reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0]).split(". ")[0][:160]
    latest = ckpt.latest_checkpoint(out)
    where = f"the last complete checkpoint is {latest}" if latest is not None else "no checkpoint was written yet"
    command = resume_command(distributed=True)
    how = f"to continue, run: {command}" if command else "to continue, re-run the same command with --resume"
    message = (f"rank {runtime.rank} lost contact with {who} of the {runtime.world_size} processes after step {step} "
               f"of {total_steps} ({reason}); {where}; {how}")
    log.debug("%s", message)
    return RankLost(1, message, latest, step)


def stop_signal(stop: GracefulStop, runtime: Runtime) -> int:
    """The signal number that asked this run to stop (0: none). Under torchrun the largest over all ranks, so
    that every rank stops after the same step even if only one of them received the signal."""
    signum = int(stop.signum or 0)
    if runtime.distributed:
        flag = torch.tensor([signum], dtype=torch.int64, device=runtime.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    return signum


def resume_command(argv: list[str] | None = None, distributed: bool = False) -> str | None:
    """The command line that continues this run: the `hierloc train ...` command that started it with --resume
    added (None when the process was not started as `hierloc train`, e.g. from Python). distributed: a worker of
    torchrun, which sees only its own command: the torchrun command is rebuilt with the job's process counts
    (`launcher_command`; a multi-node job's rendezvous options are not known here)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or "train" not in argv[1:]:
        return None
    program = Path(argv[0]).name
    launcher = launcher_command() if distributed else []
    if program != "hierloc" and not (program == "__main__.py" and Path(argv[0]).parent.name == "hierloc"):
        return None
    if launcher:
        head = launcher + ["-m", "hierloc"]
    else:
        head = ["hierloc"] if program == "hierloc" else [sys.executable, "-m", "hierloc"]
    return shlex.join(head + argv[1:] + ([] if "--resume" in argv else ["--resume"]))


def interrupted(signum: int, out: Path, step: int, total_steps: int, runtime: Runtime) -> TrainingInterrupted:
    """Build the exception that ends the run (exit status 128 + signum), whose message says how to resume (the
    CLI prints it; here it is only logged at debug level, so that it does not appear twice)."""
    latest = ckpt.latest_checkpoint(out) if runtime.is_main else None
    command = resume_command(distributed=runtime.distributed)
    how = f"to continue, run: {command}" if command else "to continue, re-run the same command with --resume"
    message = (f"training stopped by {signal.Signals(signum).name} after step {step} of {total_steps}; "
               f"checkpoint {latest if latest is not None else out / ckpt.CHECKPOINTS_DIR} is complete; {how}")
    if runtime.is_main:
        log.debug("%s", message)
    return TrainingInterrupted(128 + signum, message, latest, step)
