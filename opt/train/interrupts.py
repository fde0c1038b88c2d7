"""Ctrl-C and SIGTERM stop a training run cleanly: the workers are aborted, the logbook says so, MLflow's run is
marked KILLED, and the command exits 130 (SIGINT) or 143 (SIGTERM) naming the checkpoint the same command resumes.

While the driver trains, both signals raise `Interrupt` in its main thread. Inside Ray Train's `fit()` the trainer
installs its own SIGINT handler (one that aborts the run and exits 0); ours replaces it (`abort_then_raise`): the
first signal aborts the controller, so no worker writes after it, and is raised once `fit()` returns; a second one
raises at once.
Outside the main thread (e.g. a Prefect task's worker thread) no handler can be installed, and nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opt.errors import OptError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt(BaseException):  # noqa: N818 - not an error: like KeyboardInterrupt, it must pass `except Exception`
    """A stop signal reached the training driver."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class TrainingInterrupted(OptError):
    """Training stopped on a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def _raise(signum: int, frame: Any) -> None:
    raise Interrupt(signum)


@contextmanager
def stop_signals_raise() -> Iterator[bool]:
    """SIGINT and SIGTERM raise `Interrupt` inside the block (main thread only); yields whether they do."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise)
    try:
        yield True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_received: list[int] = []  # stop signals seen during fit() (main thread only)


def abort_then_raise(controller: Any) -> None:
    """For the duration of `fit()`: the first stop signal asks Ray Train's controller to abort (which ends `fit()`,
    and no worker writes after it) and is raised by `raise_if_stopped` once `fit()` has returned; a second one
    raises at once. The handler itself does not raise the first time: an exception raised inside Ray's C++ calls
    surfaces as a SystemError instead."""
    _received.clear()

    def handler(signum: int, frame: Any) -> None:
        _received.append(signum)
        if len(_received) > 1:
            raise Interrupt(_received[0])
        log.warning("%s: stopping the workers (send it again to stop at once)", signal.Signals(signum).name)
        with contextlib.suppress(Exception):  # the controller may be gone already
            controller.abort.remote()

    for s in SIGNALS:
        signal.signal(s, handler)


def raise_if_stopped() -> None:
    """Raise `Interrupt` for a stop signal that arrived during `fit()`; put back the raising handler."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not _raise:
        for s in SIGNALS:
            if signal.getsignal(s) not in (signal.SIG_DFL, signal.SIG_IGN, None):
                signal.signal(s, _raise)
    if _received:
        signum = _received[0]
        _received.clear()
        raise Interrupt(signum)
