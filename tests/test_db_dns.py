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
    monkeypatch.setattr(bounded, "_LOOKUPS", bounded._Lookups(1))
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


def burst(store: Store, n: int, bound: float) -> list[tuple[str, float]]:
    """`n` bounded connects to `store` at once, each in a thread of its own: each one's error and seconds taken."""
    failed: list[tuple[str, float]] = []
    go = threading.Barrier(n)

    def connect() -> None:
        go.wait()
        started = time.monotonic()
        try:
            with bounded.bounded(bound), store.engine.connect():
                pass
        except OperationalError as exc:
            failed.append((str(exc.orig), time.monotonic() - started))

    threads = [threading.Thread(target=connect) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    return failed


def lookup_threads() -> int:
    return sum(t.name == "automask-db-dns" for t in threading.enumerate())


def test_a_burst_of_connects_while_the_resolver_hangs_starts_at_most_dns_lookups(resolver: dict[str, Any]) -> None:
    """Before: each connect checked for a free slot, gave it back and then started its lookup: a burst of connects
    at once all passed the check, and each left a thread hanging in the resolver (25 here, as many as the burst: no
    bound). Now a lookup holds its slot until it ends: at most `DNS_LOOKUPS` run at once, a connect past them waits
    for one within its own bound, then fails saying why; once they all hang, a connect fails at once."""
    from server_helpers import free_port

    resolver["answers"].clear()
    store = Store(f"postgresql://someone:secret@{NAME}:{free_port()}/automask")
    try:
        failed = burst(store, 25, 2.0)
        assert len(failed) == 25
        assert len(resolver["asked"]) <= bounded.DNS_LOOKUPS, len(resolver["asked"])  # before: 25
        assert lookup_threads() <= bounded.DNS_LOOKUPS
        assert all("database host name" in why and took < 4 for why, took in failed), failed
        started = time.monotonic()
        with pytest.raises(OperationalError, match="hang already"), bounded.bounded(2.0), store.engine.connect():
            pass
        assert time.monotonic() - started < 1 and len(resolver["asked"]) <= bounded.DNS_LOOKUPS
    finally:
        resolver["answers"].set()
    deadline = time.monotonic() + 10
    while lookup_threads() and time.monotonic() < deadline:  # the resolver answers: the hung lookups end
        time.sleep(0.05)
    try:  # and their slots are free again: the next connect looks its name up (and is refused: nothing listens)
        with pytest.raises(OperationalError, match="refused"), bounded.bounded(2.0), store.engine.connect():
            pass
    finally:
        store.close()


def test_a_burst_of_connects_with_a_slow_resolver_that_answers_is_looked_up_for_each(
    resolver: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More connects at once than `DNS_LOOKUPS`, the resolver answering each in 0.3 s: every one is looked up (some
    waiting for a slot) and reaches the server (refused here), none failed for want of a slot."""
    from server_helpers import free_port

    real = socket.getaddrinfo

    def slow(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == NAME:
            time.sleep(0.3)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    store = Store(f"postgresql://someone:secret@{NAME}:{free_port()}/automask")
    try:
        failed = burst(store, 25, 5.0)
    finally:
        store.close()
    assert len(failed) == 25
    assert all("refused" in why for why, _ in failed), failed


def test_a_forked_process_starts_with_every_lookup_slot_free(
    postgres_db: str, resolver: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's pool process is forked from a parent that may be looking the host name up (a metrics scrape's
    connect). Before: the child's copy of the slots kept those held by lookups whose threads it does not have, for
    ever: forked while `DNS_LOOKUPS` hung, every connect of the child failed at once ("hang already"), long after the
    resolver was back. Now a forked process starts with all of them free."""
    import os

    monkeypatch.setattr(bounded, "_LOOKUPS", bounded._Lookups(1))
    resolver["answers"].clear()
    hanging = Store(postgres_db.replace("127.0.0.1", NAME))
    try:
        with pytest.raises(OperationalError, match="not looked up"), bounded.bounded(2.0), hanging.engine.connect():
            pass
        pid = os.fork()
        if pid == 0:  # the child: a connect to an address (its lookup needs no resolver), then exit at once
            code = 1
            try:
                store = Store(postgres_db)
                with bounded.bounded(5.0), store.engine.connect() as conn:
                    code = 0 if conn.execute(text("SELECT 1")).scalar() == 1 else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # before: 1, "1 lookups of the database host name hang already"
    finally:
        resolver["answers"].set()
        hanging.close()
