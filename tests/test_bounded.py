"""`bounded`'s psycopg connection class: used only where psycopg's `Connection.wait` takes the arguments it passes."""

from __future__ import annotations

from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")


def test_the_bounded_connection_is_used_only_with_a_wait_that_takes_interval_and_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: any psycopg with `errors._WaitTimeout` got the subclass, whose `wait` passes `interval=` and `timeout=`;
    a psycopg whose `wait` takes other arguments (older releases differ) would have failed every
    statement with a TypeError. Now such a psycopg gets its own `Connection`: no bound, nothing broken."""
    from automask.server import bounded

    make = bounded._bounded_connection.__wrapped__  # uncached
    assert make() is not psycopg.Connection and issubclass(make(), psycopg.Connection)

    def older_wait(self: Any, gen: Any, timeout: float | None = 0.1) -> Any:
        raise AssertionError("not called")

    monkeypatch.setattr(psycopg.Connection, "wait", older_wait)
    assert make() is psycopg.Connection


def test_a_worker_waiting_for_the_database_bounds_each_ping_by_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a worker whose job failed on the database pinged it with no bound while waiting to hand the task
    back; a frozen PostgreSQL (its kernel still acking) held the ping past Celery's hard time limit, which then killed
    the process mid-wait and the message was acknowledged, not handed back. Now each ping waits until the deadline."""
    from automask.server import bounded, worker

    monkeypatch.setattr(worker, "RETRY_PAUSE", 0.01)
    bounds: list[float | None] = []

    class Down:
        def ping(self) -> bool:
            bounds.append(bounded._QUERY_BOUND.get())
            return len(bounds) == 3

    worker._wait_for_database(Down(), 5.0)  # type: ignore[arg-type]
    assert len(bounds) == 3 and all(b is not None and 0.5 <= b <= 5.0 for b in bounds)
