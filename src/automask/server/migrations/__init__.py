"""Versioned schema migrations (Alembic): `migrate` (what `automask db migrate` runs) and `ensure_schema`
(what `serve`, `worker` and `keys` check at start-up).

Revision 0001 is the schema of release 0.1 (created only where missing, so a database written by that release,
which has no version table, upgrades in place); later revisions alter it. An empty database is given the current
schema directly (`metadata.create_all`, then stamped), which a test proves equal to migrating from 0001.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from automask.errors import ServiceConfigError
from automask.server.logs import one_line
from automask.server.store import Store, metadata

log = logging.getLogger("automask.server")
LOCK_ID = 0x6175746F6D61  # "automa": the PostgreSQL advisory lock that serialises migrations


def config(store: Store | None = None) -> Config:
    """Alembic's configuration for our scripts (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["store"] = store
    return cfg


def head() -> str:
    """This release's schema revision."""
    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev


def _lock(conn: Connection, store: Store) -> None:
    if not store.is_sqlite:  # SQLite: the BEGIN IMMEDIATE of `transaction()` already serialises
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})


def current(conn: Connection) -> str | None:
    """The revision the database is at (None: unversioned, i.e. empty or written by release 0.1)."""
    return MigrationContext.configure(conn).get_current_revision()


def migrate(store: Store, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the database to `revision` in one transaction (idempotent); returns (before, after).
    `ServiceConfigError` when it cannot be reached, or a newer release wrote it."""
    store.check_connection()
    cfg = config(store)
    with store.transaction() as conn:
        _lock(conn, store)
        before = current(conn)
        _refuse_unknown(before, store)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = current(conn) or ""
    for path in cfg.attributes.get("delete_after_commit", []):  # result files now held by the database
        path.unlink(missing_ok=True)
    _vacuum(store)
    return before, after


def _vacuum(store: Store) -> None:
    """SQLite written before revision 0005: rewrite the file once so that it gives freed pages back from now on
    (`Store.reclaim_space`). Outside the migration's transaction (VACUUM cannot run in one); one that fails (the
    disk is full, the file locked by a server writing) leaves the file as it was, to be vacuumed by the next
    `automask db migrate` (the error is sqlite3's own: the VACUUM runs on the raw connection)."""
    try:
        if store.vacuum_once():
            log.info("the database %s now gives the space of expired results back", store.describe())
    except (sqlite3.Error, SQLAlchemyError) as exc:
        log.warning(
            "could not vacuum the database %s (%s): run automask db migrate again", store.describe(), one_line(exc)
        )


def ensure_schema(store: Store, *, create: bool) -> None:
    """Return when the database is at this release's schema. An empty one gets it when `create`; any other is
    left unchanged and `ServiceConfigError` says to run `automask db migrate`."""
    target = head()
    with store.read() as conn:
        if current(conn) == target:
            return
    with store.transaction() as conn:
        _lock(conn, store)
        rev = current(conn)
        if rev == target:
            return
        empty = not inspect(conn).get_table_names()
        if rev is None and empty and create:
            metadata.create_all(conn)
            MigrationContext.configure(conn).stamp(ScriptDirectory.from_config(config()), target)
            log.info("created the schema (revision %s) in the empty database %s", target, store.describe())
            return
    _refuse_unknown(rev, store)
    state = "is empty" if empty else f"is at schema revision {rev or '0.1 (unversioned)'}, older than {target}"
    raise ServiceConfigError(f"The database {store.describe()} {state}. Run: automask db migrate")


def _refuse_unknown(rev: str | None, store: Store) -> None:
    """`ServiceConfigError` when the database is at a revision this release does not know (a newer one wrote it)."""
    if rev is not None and rev not in {s.revision for s in ScriptDirectory.from_config(config()).walk_revisions()}:
        raise ServiceConfigError(
            f"The database {store.describe()} is at schema revision {rev}, which this release of automask does not "
            "know (a newer release wrote it). Upgrade automask."
        )
