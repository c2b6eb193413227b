"""Python 3.10 (pyproject allows it): `asyncio.wait_for` raises `asyncio.TimeoutError`, not the built-in
`TimeoutError` (one class only from 3.11). These tests run 3.10's classes on any Python: a wait that times out must
still be a "not ready" answer, never an exception out of /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from automask.server.store import Store


class _AsyncioTimeout310(Exception):
    """Python 3.10's `asyncio.TimeoutError`: an `Exception`, neither `OSError` nor the built-in `TimeoutError`."""


def _as_on_python_310(monkeypatch: pytest.MonkeyPatch) -> None:
    """`asyncio.wait_for` times out at once, raising 3.10's `asyncio.TimeoutError`."""

    async def wait_for(awaitable: Awaitable[Any], timeout: float | None) -> Any:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise _AsyncioTimeout310

    monkeypatch.setattr(asyncio, "TimeoutError", _AsyncioTimeout310)
    monkeypatch.setattr(asyncio, "wait_for", wait_for)


def test_a_database_probe_timing_out_on_python_310_is_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `DatabaseProbe.unreachable` caught only the built-in `TimeoutError`: on 3.10 a database slower than
    the probe's timeout raised out of /readyz (a 500) instead of answering not ready (503)."""
    from automask.server.readiness import DB_DOWN, DatabaseProbe

    store = Store.in_data_dir(tmp_path)
    _as_on_python_310(monkeypatch)
    assert asyncio.run(DatabaseProbe(store, timeout=0.1).unreachable()) == DB_DOWN
    store.close()


def test_a_redis_ping_timing_out_on_python_310_is_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `RedisRateLimiter.unreachable` caught RedisError, OSError and the built-in `TimeoutError`: on 3.10 a
    Redis that did not answer the PING in time raised out of /readyz instead of answering `REDIS_DOWN`."""
    from automask.server.limits import REDIS_DOWN, RedisRateLimiter

    async def probe() -> str | None:
        limiter = RedisRateLimiter("redis://127.0.0.1:1/0")
        try:
            return await limiter.unreachable()
        finally:
            await limiter.close()

    _as_on_python_310(monkeypatch)
    assert asyncio.run(probe()) == REDIS_DOWN
