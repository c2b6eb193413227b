"""The service's database: keys, credit holds, v2 jobs (uploads and results), worker nodes, settings.

One code path for SQLite (embedded, the default: `<data_dir>/automask.db`) and PostgreSQL (a fleet of API nodes
and workers), through SQLAlchemy Core. Every write runs in `transaction()`: on SQLite a `BEGIN IMMEDIATE` (the
write lock up front, so the conditional UPDATEs of `keys` and `jobs` hold across threads and processes); on
PostgreSQL a READ COMMITTED transaction in which those single-statement conditional UPDATEs are atomic too, and
a read followed by a write that depends on it (a cap on unfinished jobs) takes an advisory lock first (`lock`).
The schema is versioned by Alembic (`automask.server.migrations`); `automask db migrate` upgrades it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
    true,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from automask.errors import ServiceConfigError
from automask.server.bounded import bounded, connect_bounded, lock_slice
from automask.server.db_url import database_url as database_url
from automask.server.db_url import embedded_url as embedded_url
from automask.server.db_url import normalize_url, private_file
from automask.server.logs import one_line

log = logging.getLogger("automask.server")
metadata = MetaData()

keys_table = Table(
    "keys",
    metadata,
    Column("id", String, primary_key=True),
    Column("name", String, nullable=False, server_default=""),
    Column("secret_hash", String, nullable=False),
    Column("credits", Integer, CheckConstraint("credits IS NULL OR credits >= 0")),  # NULL: unlimited
    Column("rate_limit", Integer, CheckConstraint("rate_limit IS NULL OR rate_limit >= 1")),  # per minute
    Column("created_at", Float, nullable=False),
    Column("disabled_at", Float),
)

holds_table = Table(
    "holds",
    metadata,
    Column("id", String, primary_key=True),  # a v2 hold has its job's id; a v1 hold a request's
    Column("key_id", String, nullable=False),
    Column("created_at", Float, nullable=False),
    # v1 holds: when the sweeper may give the credit back (the request can no longer be running); v2: NULL
    Column("expires_at", Float),
    # False once an admin set the balance outright (`keys update --credits`): a refund must not add to it
    Column("refundable", Boolean, nullable=False, server_default=true()),
)

jobs_table = Table(
    "jobs",
    metadata,
    Column("id", String, primary_key=True),
    Column("key_id", String),
    Column("status", String, nullable=False),  # QUEUED, PROCESSING, COMPLETED, FAILED, CANCELLED
    Column("request", Text),  # the validated request as JSON (image as given); dropped when finished
    Column("upload", LargeBinary),  # an uploaded image file (multipart), else NULL
    Column("base64", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("metadata", Text),  # the served metadata as JSON
    Column("result_path", Text),  # release 0.1 kept results on disk; migrated into `result`
    Column("inference_time", Float),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("result", LargeBinary),  # the result PNG of a COMPLETED job
    Column("model", String),  # the served model's name: which queue runs it
    Column("published_at", Float),  # when it was last handed to the dispatcher
    Column("node", String),  # the node running it (PROCESSING)
    Column("run_deadline", Float),  # PROCESSING: after this (the database's clock) the run can no longer be going
    Column("stored_bytes", Integer),  # the bytes of `request` and `upload` when stored (NULL: finished before 0006)
)
Index("jobs_by_status", jobs_table.c.status, jobs_table.c.created_at)

nodes_table = Table(
    "nodes",
    metadata,
    Column("id", String, primary_key=True),
    Column("kind", String, nullable=False),  # "server" (in-process jobs) or "worker"
    Column("models", Text, nullable=False, server_default="[]"),  # JSON list of the model names it serves
    Column("default_model", String),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("dead_after", Float),  # seconds of silence after which it is dead: its own node_ttl
)

settings_table = Table(
    "settings",
    metadata,
    Column("name", String, primary_key=True),  # e.g. "deployment" (`automask.server.deployment`)
    Column("value", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)


CLOCK_REFRESH = 30.0
"""Seconds between two readings of the database server's clock (`Store.now`)."""
CLOCK_SKEW_WARNING = 1.0
"""Seconds this host's clock may differ from the database server's before a warning is logged."""
NETWORK_DEAD_AFTER = 10
"""Seconds a PostgreSQL connection may go unanswered at the network level (data sent and never acknowledged, or no
reply to keepalive probes: the server's host is gone, a partition, a failover that moved its address) before it is
taken for broken: the call fails (a 503) instead of waiting for the kernel's retransmissions, about 15 minutes. A
slow query is not affected (its packets are acknowledged)."""
_PG_CONNECT_ARGS = {  # each unless AUTOMASK_DATABASE_URL gives its own (`?connect_timeout=30`)
    "connect_timeout": 10,
    "tcp_user_timeout": NETWORK_DEAD_AFTER * 1000,  # ms: sent data unacknowledged this long breaks the connection
    "keepalives": 1,  # an idle connection, or one waiting for a reply, probes its peer
    "keepalives_idle": NETWORK_DEAD_AFTER // 2,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


LOCK_NOT_AVAILABLE = "55P03"
"""PostgreSQL's SQLSTATE of a lock wait past `lock_timeout` (`Store.lock`: a slice of the wait ran out)."""


RECLAIM_PAGES = 2048
"""Free pages of an SQLite file given back to the file system per write transaction (`Store.reclaim_space`): 8 MiB
at the default 4 KiB page, a few milliseconds of the write lock, so requests' writes go on in between."""
WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes an SQLite write-ahead log is cut back to once checkpointed: a burst of writes does not leave it large."""


def advisory_lock_id(name: str) -> int:
    """The PostgreSQL advisory lock key (a signed 64-bit integer) of lock `name`: a stable hash."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def _sentences(text: str) -> str:
    """A driver's message of several lines as one line of sentences, ending with a stop: psycopg's "...Connection
    refused\n\tIs the server running ... connections?" reads "...Connection refused. Is ... connections?"."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    return " ".join(line if line.endswith((".", "?", "!")) else line + "." for line in lines)


class Store:
    """The database at `url`. SQLite files (and their WAL) are created private (0600 in a 0700 folder)."""

    def __init__(self, url: str | URL) -> None:
        self.url = normalize_url(str(url) if isinstance(url, str) else url.render_as_string(hide_password=False))
        self.is_sqlite = self.url.drivername.startswith("sqlite")
        self.path: Path | None = Path(self.url.database) if self.is_sqlite and self.url.database else None
        self.engine = self._engine()
        self.host_clock: Callable[[], float] = time.time  # this host's clock (a seam for tests)
        self._skew = 0.0  # the database server's clock minus this host's, seconds
        self._skew_read_at = -math.inf  # time.monotonic() of the last reading
        self._skew_lock = threading.Lock()

    def now(self) -> float:
        """The fleet's one clock, in seconds since the epoch: the database server's. Every timestamp that is stored
        or compared with a stored one (heartbeats, job and hold times, deadlines handed to workers) is read here, so
        nodes whose own clocks disagree still agree on who is alive and what has expired. This host's clock plus
        its difference to the server's, read again every `CLOCK_REFRESH` seconds in a thread of its own (this never
        waits for the database: safe on the event loop). SQLite: this host's clock."""
        due = time.monotonic() - self._skew_read_at >= CLOCK_REFRESH
        if due and not self.is_sqlite and self._skew_lock.acquire(blocking=False):
            threading.Thread(target=self._read_clock_locked, name="automask-clock", daemon=True).start()
        return self.host_clock() + self._skew

    def read_clock(self) -> None:
        """Read the database server's clock now (waits for it; `now` does this by itself in the background)."""
        if not self.is_sqlite:
            with self._skew_lock:
                self._read_clock()

    def _read_clock_locked(self) -> None:
        try:
            self._read_clock()
        finally:
            self._skew_lock.release()

    def _read_clock(self) -> None:
        try:
            before = self.host_clock()
            with bounded(), self.engine.connect() as conn:
                server = float(conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())
            skew = server - (before + self.host_clock()) / 2
        except SQLAlchemyError:  # unreachable now: keep the last difference, read again in a second
            self._skew_read_at = time.monotonic() - CLOCK_REFRESH + 1.0
            return
        if abs(skew) > CLOCK_SKEW_WARNING and abs(skew - self._skew) > CLOCK_SKEW_WARNING:
            log.warning("this host's clock is %+.1f s off the database server's; the fleet uses the server's", -skew)
        self._skew, self._skew_read_at = skew, time.monotonic()

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> Store:
        """The embedded database of the data folder `data_dir`, given the current schema when it is new."""
        return cls.at_schema(embedded_url(data_dir), create=True)

    @classmethod
    def from_settings(cls, settings: Any, *, create: bool = True) -> Store:
        """The configured database (`database_url(settings)`), at this release's schema."""
        return cls.at_schema(database_url(settings), create=create)

    @classmethod
    def at_schema(cls, url: str, *, create: bool) -> Store:
        """The database at `url`, checked to be at this release's schema. `create`: an empty database is given
        it (one at an older revision is never changed: `automask db migrate` does that); else `ServiceConfigError`."""
        store = cls(url)
        from automask.server.migrations import ensure_schema

        try:
            store.check_connection()
            ensure_schema(store, create=create)
        except BaseException:
            store.close()
            raise
        store.read_clock()  # timestamps are right from the first one
        return store

    def check_connection(self) -> None:
        """Connect once: `ServiceConfigError` naming the database and the fix when it cannot be reached or opened (a
        start-up check: a wrong AUTOMASK_DATABASE_URL, a database server not running, a wrong password)."""
        try:
            with self.engine.connect():
                pass
        except DBAPIError as exc:  # refused, a wrong password, not a database (SQLite), ...
            reason = _sentences(str(exc.orig or exc))
            raise ServiceConfigError(
                f"Cannot connect to the database {self.describe()}: {reason} Check AUTOMASK_DATABASE_URL, and that "
                "the database server is running and lets this user in."
            ) from None

    def describe(self) -> str:
        """The database for messages and logs: the SQLite path, or the server URL without its password (nor one in
        its query: libpq reads `?password=` and `?sslpassword=` too)."""
        if self.path is not None:
            return str(self.path)
        hidden = {name: "***" for name in ("password", "sslpassword") if name in self.url.query}
        shown = self.url.update_query_dict(hidden).render_as_string(hide_password=True)
        return shown.replace("=%2A%2A%2A", "=***")  # (the query's values are percent-encoded)

    def _engine(self) -> Engine:
        if not self.is_sqlite:
            given = {k: v for k, v in _PG_CONNECT_ARGS.items() if k not in self.url.query}  # the URL's own win
            engine = create_engine(self.url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=given)
            event.listen(engine, "do_connect", connect_bounded)
            return engine
        if self.path is not None:
            private_file(self.path)
        engine = create_engine(self.url, connect_args={"timeout": 10.0, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            # a new file gives freed pages back (`reclaim_space`); an older one once `automask db migrate` vacuums it
            cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on error (SQLite: the write lock up front)."""
        with self.engine.connect() as conn:
            conn.execution_options(immediate=True)
            with conn.begin():
                yield conn

    def lock(self, conn: Connection, name: str) -> None:
        """Inside `transaction()`: wait for the lock `name`, held until the transaction ends, so a count followed by
        an insert holds against every other transaction that takes it first. PostgreSQL: a transaction advisory
        lock, waited for in PostgreSQL's own queue (waiters are served in arrival order), in slices of `lock_slice`
        seconds, each within a savepoint and asked again (at the back of the queue) once it runs out, so a request's
        bound on a statement (`bounded`) cuts a frozen server, never a wait for other submits' uploads; SQLite: its
        write transaction runs alone already."""
        if self.is_sqlite:
            return
        ms = {"ms": str(max(1, round(lock_slice() * 1000)))}
        before = conn.execute(text("SELECT current_setting('lock_timeout')")).scalar_one()
        while True:
            try:
                with conn.begin_nested():  # a slice that runs out rolls back to here (its lock_timeout too)
                    conn.execute(text("SELECT set_config('lock_timeout', :ms, true)"), ms)
                    conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": advisory_lock_id(name)})
                    break
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                    raise
        conn.execute(text("SELECT set_config('lock_timeout', :ms, true)"), {"ms": before})  # the rest: as it was

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot (no write lock)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def ping(self) -> bool:
        """Whether the database answers a query now."""
        return self.ping_error() is None

    def ping_error(self) -> str | None:
        """None when the database answers a query now, else why not (the driver's error, on one line)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            return one_line(exc)
        return None

    def reclaim_space(self) -> int:
        """SQLite: give the file's free pages (left by deleted jobs and results) back to the file system,
        `RECLAIM_PAGES` per short write transaction, then checkpoint the WAL without waiting for anyone, which
        shrinks the file; returns how many pages. 0 for a file without incremental auto-vacuum (one written before
        schema revision 0005 that `automask db migrate` has not vacuumed yet), and for PostgreSQL (its autovacuum reuses
        them)."""
        if not self.is_sqlite:
            return 0
        freed = 0
        with self.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            if raw.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
                return 0
            free = int(raw.execute("PRAGMA freelist_count").fetchone()[0])
            for _ in range(math.ceil(free / RECLAIM_PAGES)):
                # a script: Python's execute would step the pragma once, giving back one page
                raw.executescript(f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({RECLAIM_PAGES}); COMMIT;")
            if free:
                freed = free - int(raw.execute("PRAGMA freelist_count").fetchone()[0])
                raw.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return freed

    def vacuum_once(self) -> bool:
        """SQLite: turn incremental auto-vacuum on in a file written without it (`VACUUM`: the file is rewritten
        without its free pages, holding the write lock meanwhile; needs its size again in free disk space); True when
        it did. Nothing for a file that has it, or for PostgreSQL. `automask db migrate` runs it."""
        if not self.is_sqlite:
            return False
        with self.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            if raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
                return False
            raw.execute("PRAGMA auto_vacuum=INCREMENTAL")
            raw.execute("VACUUM")
            raw.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return True

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
