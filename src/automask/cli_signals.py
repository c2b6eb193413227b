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


HELD_FOR_S = 5.0
"""How long `lines_held` holds back a signal, at most: a write to a pipe nobody reads, or to a terminal paused with
Ctrl-S, waits for ever."""
_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def lines_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while the lines that report a file are written, so that they come all or
    none: one that came meanwhile acts as the block ends. A second one acts at once, and so does the first once it
    has waited `HELD_FOR_S` (`staging.signals_held` would block them for as long as a stuck write waits). Off the main
    thread, where handlers cannot be swapped: `staging.signals_held`."""
    if threading.current_thread() is not threading.main_thread():
        from automask.staging import signals_held

        with signals_held():
            yield
        return
    came: list[int] = []
    timers: list[threading.Timer] = []

    def note(signum: int, _frame: object) -> None:
        if came:  # a second signal, or the first sent again by its timer: acted on now, by the handler before
            came.clear()
            restore()
            signal.raise_signal(signum)
            return
        came.append(signum)
        again = threading.Timer(HELD_FOR_S, signal.pthread_kill, (threading.main_thread().ident, signum))
        again.daemon = True
        timers.append(again)
        again.start()

    before = {s: signal.signal(s, note) for s in _HELD}

    def restore() -> None:
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    try:
        yield
    finally:
        for timer in timers:
            timer.cancel()
        restore()
        for signum in came:
            signal.raise_signal(signum)
