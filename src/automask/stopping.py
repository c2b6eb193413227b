"""A run's stop check, asked at its stage boundaries and, throttled, from inside a running model stage.

`MaskGenerator.generate` installs the run's `StopCheck` for its own duration (`stopping`): a context variable, so
the check of one run (a pool thread) is never seen by another, nor after `generate` returns or raises. The
backends' model code asks it with `stop_inside` (from the forward pre-hooks and ONNX Runtime watch of
`automask.backends.interrupt`), knowing nothing of who asks or why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from automask.errors import stop_if_asked

INSIDE_EVERY = 0.5
"""Seconds between two askings from inside a stage, at least: a check may cost a database read (a v2 job's), and a
model calls `stop_inside` at every layer."""


class StopCheck:
    """A run's `should_stop`, called like it: each call (a stage boundary) asks it; `inside()` asks it at most once
    every `every` seconds since the last asking (a boundary's included). Once it said True it says True, unasked.
    Used by the thread of its run only."""

    def __init__(
        self, should_stop: Callable[[], bool], every: float = INSIDE_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ask = should_stop
        self.every = every
        self._clock = clock
        self._last = clock()
        self.stopped = False
        self.asked = 0
        """How many times `should_stop` was asked (boundaries and insides)."""

    def __call__(self) -> bool:
        if not self.stopped:
            self.asked += 1
            self.stopped = bool(self._ask())
            self._last = self._clock()
        return self.stopped

    def inside(self) -> bool:
        """The answer from inside a stage: asked when `every` seconds passed since the last asking, else the last
        answer."""
        if self.stopped or self._clock() - self._last < self.every:
            return self.stopped
        return self()


_CURRENT: ContextVar[StopCheck | None] = ContextVar("automask_stop_check", default=None)


@contextlib.contextmanager
def stopping(should_stop: Callable[[], bool] | None, every: float | None = None) -> Iterator[StopCheck | None]:
    """The run's `StopCheck` (None when `should_stop` is None: never stops; `every` None: `INSIDE_EVERY`), current
    in this context for the duration of the block (and no longer, however it ends)."""
    check = None if should_stop is None else StopCheck(should_stop, INSIDE_EVERY if every is None else every)
    token = _CURRENT.set(check)
    try:
        yield check
    finally:
        _CURRENT.reset(token)


def current() -> StopCheck | None:
    """The stop check of the run this thread is in, or None (no run, or one nobody can stop)."""
    return _CURRENT.get()


def stop_inside() -> None:
    """A point inside a model stage: raise `StoppedError` when the current run's check (`StopCheck.inside`,
    throttled) says stop; nothing outside a run."""
    check = _CURRENT.get()
    if check is not None:
        stop_if_asked(check.inside)
