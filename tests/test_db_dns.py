"""The database host name's lookup is bounded with the connect: a resolver that hangs fails a bounded connect in time
(a 503 for a request), and a name that resolves is connected to at its address, the name kept for TLS's host check."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from automask.server import bounded
from automask.server.store import Store

pytest.importorskip("psycopg")
NAME = "db.automask.test"


@pytest.fixture()
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake resolver for `NAME`: it answers 127.0.0.1 once `answers` is set (at once by default), other names as
    the real one does."""
    real = socket.getaddrinfo
    answers = threading.Event()
    answers.set()
    asked: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        answers.wait(30)  # a resolver that hangs
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return {"answers": answers, "asked": asked}


def test_a_hanging_resolver_fails_a_bounded_connect_within_its_bound(
    postgres_db: str, resolver: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: psycopg looked the host name up in the connecting thread with no bound: a resolver that hung held a
    request (and its database thread) past every bound, as long as the lookup took. Now the lookup shares the
    connect's bound; then the connect fails (the request is answered 503). Once `DNS_LOOKUPS` hang, a connect fails
    at once, starting no other."""
    monkeypatch.setattr(bounded, "_LEFT_BEHIND", threading.BoundedSemaphore(1))
    resolver["answers"].clear()
    store = Store(postgres_db.replace("127.0.0.1", NAME))
    try:
        started = time.monotonic()
        with (
            pytest.raises(OperationalError, match="not looked up within"),
            bounded.bounded(2.0),
            store.engine.connect(),
        ):
            pass
        took = time.monotonic() - started
        assert resolver["asked"] == [NAME] and took < 4, took  # before: 30 s, the resolver's hang
        started = time.monotonic()
        with pytest.raises(OperationalError, match="hang already"), bounded.bounded(2.0), store.engine.connect():
            pass
        assert time.monotonic() - started < 1 and resolver["asked"] == [NAME]
    finally:
        resolver["answers"].set()
        store.close()


def test_a_name_that_resolves_is_connected_to_at_its_address_keeping_the_name(
    postgres_db: str, resolver: dict[str, Any]
) -> None:
    store = Store(postgres_db.replace("127.0.0.1", NAME))
    try:
        with bounded.bounded(5.0), store.engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
            info = conn.connection.dbapi_connection.info  # type: ignore[union-attr]
            assert (info.host, info.hostaddr) == (NAME, "127.0.0.1")  # libpq checks a certificate against `host`
        assert resolver["asked"] == [NAME]
    finally:
        store.close()


def test_a_psycopg_whose_conninfo_attempts_is_a_generator_still_connects_within_a_bound(
    postgres_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg 3.1 (pyproject allows >=3.1) has a `conninfo_attempts` that yields the attempts (a generator, host
    names not looked up), 3.2+ one that answers a list. Before: a bounded connect took its `len()` once an attempt
    failed (a host of several down): a TypeError, never trying the next. Now the attempts are a list."""
    import psycopg.conninfo

    real = psycopg.conninfo.conninfo_attempts

    def yielding(params: Any) -> Any:
        attempts = real(params)
        yield {**attempts[0], "port": "1"}  # a first host that is down
        yield from attempts

    monkeypatch.setattr(psycopg.conninfo, "conninfo_attempts", yielding)
    store = Store(postgres_db)
    try:
        with bounded.bounded(5.0), store.engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        store.close()
