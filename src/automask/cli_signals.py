"""Signals that stop a command line run: SIGTERM and SIGHUP, raised as Ctrl-C is, so that the run cleans up."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is (as Ctrl-C raises KeyboardInterrupt), so that it undoes what is
    half-done (a temp file, a `mask`'s outputs) and exits 128 + the signal's number, instead of dying mid-write."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `Interrupted` (only where they would kill the process: a signal that
    is ignored, as under `nohup`, or handled already stays so)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)
