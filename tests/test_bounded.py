"""`bounded`'s psycopg connection class: used only where psycopg's `Connection.wait` takes the arguments it passes."""

from __future__ import annotations

import signal
import time
from contextlib import nullcontext
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


def test_a_bounded_statement_needing_a_new_connection_to_a_frozen_postgresql_gives_up_within_its_bound() -> None:
    """Before: `bounded` held each wait for an answer, but not the wait of a new connection, which lasted the store's
    `connect_timeout` (10 s): a worker handing a task back to a frozen PostgreSQL (its connection closed by an earlier
    bound, so the release opens a new one) waited 10 s, its whole `HAND_BACK_MARGIN`, and was killed by Celery's hard
    time limit with the task acknowledged, not handed back."""
    from automask.server.bounded import bounded
    from automask.server.store import Store
    from server_helpers import wait_for
    from service_procs import process_tree, signal_all
    from services import postgres_server

    with postgres_server() as pg:
        store = Store.at_schema(pg.url, create=True)
        store.engine.dispose()  # no pooled connection: the next statement connects
        stopped = process_tree(pg._main_pid())
        signal_all(stopped, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with bounded(1.0):
                answered = store.ping()
            waited = time.monotonic() - started
        finally:
            signal_all(stopped, signal.SIGCONT)
        assert not answered and waited < 5.0, waited  # psycopg waits 2 s at least for a connection
        assert wait_for(store.ping, 30)  # thawed: it answers again
        store.close()


def test_a_connection_tried_at_several_addresses_ends_by_the_deadline_in_force() -> None:
    """Before: a new connection's `connect_timeout` was the bound in force, and psycopg gives it to each address it
    tries in turn (several hosts in AUTOMASK_DATABASE_URL, a name with both an IPv4 and an IPv6 address): a task's
    statement near its deadline (`until`) connecting to a frozen PostgreSQL at two addresses waited twice what was
    left, past Celery's hard time limit. Now the addresses share it: none is tried once it is spent; an address that
    refuses at once still leaves the rest of it to the next (the fleet's failover)."""
    from sqlalchemy.engine import make_url

    from automask.server import bounded
    from automask.server.store import Store
    from server_helpers import wait_for
    from service_procs import free_port, process_tree, signal_all
    from services import postgres_server

    with postgres_server() as pg:
        Store.at_schema(pg.url, create=True).close()
        url = make_url(pg.url)

        def at(*ports: int) -> Store:
            hosts = [f"{url.host}:{port}" for port in ports]
            return Store(url.set(host=None, port=None, query={"host": hosts}).render_as_string(hide_password=False))

        failover = at(free_port(), url.port or 5432)  # the first refuses: the second answers
        with bounded.until(time.monotonic() + 3.0), bounded.bounded(10.0):
            assert failover.ping()
        failover.close()
        twice = at(url.port or 5432, url.port or 5432)  # the same frozen server, twice
        stopped = process_tree(pg._main_pid())
        signal_all(stopped, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with bounded.until(time.monotonic() + 3.0), bounded.bounded(10.0):
                answered = twice.ping()
            waited = time.monotonic() - started
        finally:
            signal_all(stopped, signal.SIGCONT)
        # before: 6 s (3 s at each address); then 3 s at the first; now 2 s at each of two shares of the 3 s, and
        # the second not started with 1 s left (a host that hangs must not take the next one's time)
        assert not answered and 1.5 < waited < 4.5, waited
        assert wait_for(twice.ping, 30)
        twice.close()


@pytest.fixture
def hanging_port() -> Any:
    """A loopback port that accepts TCP connections (the kernel's backlog) and never answers a byte: a database host
    that hangs (a frozen server, a proxy with nothing behind it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def several_hosts(url: str, *ports: int) -> str:
    """`url` with its host tried at each of `ports` in turn (AUTOMASK_DATABASE_URL's host=a:p,b:q form)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    hosts = [f"{parsed.host}:{port}" for port in ports]
    return parsed.set(host=None, port=None, query={"host": hosts}).render_as_string(hide_password=False)


@pytest.mark.parametrize("bound", [4.0, 10.0])
def test_a_host_that_hangs_leaves_the_next_host_time_within_the_bound(
    postgres_db: str, hanging_port: int, bound: float
) -> None:
    """Before: a bounded connect gave its first host the whole bound: one of several hosts that accepts TCP and never
    answers spent it, and the connect failed without trying the healthy host after it (a request's 503, a sweep's
    failure, on every new connection while that host hangs). Now the hosts share the bound: the healthy one is
    reached within it."""
    from sqlalchemy import text

    from automask.server import bounded
    from automask.server.store import Store

    store = Store(several_hosts(postgres_db, hanging_port, int(postgres_db.rsplit(":", 1)[1].split("/")[0])))
    try:
        started = time.monotonic()
        with bounded.bounded(bound), store.engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        took = time.monotonic() - started
        assert 1.5 < took < bound - 1, took  # the hanging host's share, then the healthy host at once
    finally:
        store.close()


def test_several_hosts_that_all_hang_fail_within_the_bound(hanging_port: int) -> None:
    """Shares of the bound, each 2 s at least (psycopg's least connect_timeout): the whole connect still ends within
    it, no host tried once too little is left for it."""
    from sqlalchemy.exc import OperationalError

    from automask.server import bounded
    from automask.server.store import Store

    store = Store(several_hosts("postgresql://u:p@127.0.0.1/db", hanging_port, hanging_port, hanging_port))
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError), bounded.bounded(5.0), store.engine.connect():
            pass
        took = time.monotonic() - started
        assert 3.5 < took < 6.0, took  # two 2 s shares; the third is not started with 1 s left
    finally:
        store.close()


def test_the_database_urls_own_connection_settings_are_kept(hanging_port: int, postgres_db: str) -> None:
    """Before: the store's built-in connection settings (connect_timeout 10, the keepalives, tcp_user_timeout)
    replaced those AUTOMASK_DATABASE_URL gives (`?connect_timeout=2`, as libpq documents them): a start-up check
    against a host that hangs waited 10 s, not the 2 s asked for. Now the URL's own win; the others stay."""
    from automask.errors import ServiceConfigError
    from automask.server.store import Store

    store = Store(f"postgresql://someone:secret@127.0.0.1:{hanging_port}/automask?connect_timeout=2")
    try:
        started = time.monotonic()
        with pytest.raises(ServiceConfigError, match="Cannot connect to the database"):
            store.check_connection()
        assert time.monotonic() - started < 5  # before: 10 s
    finally:
        store.close()
    store = Store(postgres_db + "?keepalives_idle=60")
    try:
        with store.engine.connect() as conn:
            given = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert (given["keepalives_idle"], given["tcp_user_timeout"]) == ("60", "10000"), given
    finally:
        store.close()


@pytest.mark.parametrize("given", ["1", "-1", "0"])
def test_a_url_connect_timeout_read_as_libpq_reads_it_leaves_the_next_host_its_try(
    postgres_db: str, given: str
) -> None:
    """Before: a `connect_timeout` of the URL (now kept) was taken as the whole connect's bound as written: 1 (libpq:
    2), or 0 and less (libpq: no limit; -1 gave a deadline already past), so a first host that refused at once left
    less than a try's 2 s and the healthy host after it was never tried: every new connection failed. Now it is read
    as libpq reads it: 2 s at least, none at 0 or less (the bound in force stays)."""
    from sqlalchemy import text

    from automask.server import bounded
    from automask.server.store import Store
    from server_helpers import free_port

    healthy = int(postgres_db.rsplit(":", 1)[1].split("/")[0])
    url = several_hosts(postgres_db, free_port(), healthy)
    store = Store(f"{url}&connect_timeout={given}")
    try:
        with bounded.bounded(10.0), store.engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        store.close()


@pytest.mark.parametrize("given", ["soon", "nan", "inf", "3&connect_timeout=4"])
def test_a_url_connect_timeout_that_is_no_number_is_a_database_error_not_a_crash(given: str) -> None:
    """Before: a bounded connect read the URL's `connect_timeout` with `float()`: "soon" raised a bare ValueError
    (a request's generic 500, a traceback in a background loop), "nan" one from `math.ceil`, one given twice (a
    tuple) a TypeError, and "inf" was taken (psycopg refuses it). Now each is psycopg's own refusal, as an unbounded
    connect gets it: a database error that names the setting."""
    from sqlalchemy.exc import DBAPIError

    from automask.server import bounded
    from automask.server.store import Store

    for bound in (None, 5.0):
        store = Store(f"postgresql://u:p@127.0.0.1:1/db?connect_timeout={given}")
        try:
            with pytest.raises(DBAPIError, match="connect_timeout"), bounded.bounded(bound) if bound else nullcontext():
                store.engine.connect()
        finally:
            store.close()
