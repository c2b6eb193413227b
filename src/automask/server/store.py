"""The service's embedded database: SQLite (WAL) at `<data_dir>/automask.db`, keys, credit holds and v2 jobs.

One connection per thread; every write runs in `transaction()` (BEGIN IMMEDIATE), so the atomic statements
in `keys` and `jobs` hold across threads and across processes (`automask keys ...` beside a running server).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    secret_hash TEXT NOT NULL,
    credits     INTEGER CHECK (credits IS NULL OR credits >= 0),  -- NULL: unlimited
    rate_limit  INTEGER CHECK (rate_limit IS NULL OR rate_limit >= 1),  -- per minute; NULL: unlimited
    created_at  REAL NOT NULL,
    disabled_at REAL
);
-- One credit taken from a key for a request in flight (v1) or a v2 job not yet finished.
CREATE TABLE IF NOT EXISTS holds (
    id         TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id             TEXT PRIMARY KEY,
    key_id         TEXT,
    status         TEXT NOT NULL,  -- QUEUED, PROCESSING, COMPLETED, FAILED
    request        TEXT,           -- the validated request as JSON (image as given); dropped when finished
    upload         BLOB,           -- an uploaded image file (multipart), else NULL
    base64         INTEGER NOT NULL DEFAULT 0,
    error          TEXT,
    metadata       TEXT,           -- MaskResult.metadata() as JSON
    result_path    TEXT,
    inference_time REAL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    created_at     REAL NOT NULL,
    started_at     REAL,
    finished_at    REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
"""


class Store:
    """The database file `path`, created with its tables on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.connection().executescript(SCHEMA)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> Store:
        """The store of the data folder `data_dir` (what the server and `automask keys` share)."""
        return cls(Path(data_dir) / "automask.db")

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; WAL; waits up to 10 s for another writer)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE): committed on success, rolled back on error."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
