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
