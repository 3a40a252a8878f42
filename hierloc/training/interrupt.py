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
- Handlers are installed only in the main thread (Python allows no other), and only act in the process that
  installed them: forked DataLoader workers inherit them and then ignore the signal, leaving the decision to
  the main process. The previous handlers are restored on exit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

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
