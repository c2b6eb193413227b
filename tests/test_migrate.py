"""`automask db migrate`: a database written by release 0.1 upgrades in place; servers refuse an older schema; a
fresh database created directly equals one built by the migrations."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import event, inspect

from automask.cli import main
from automask.errors import ServiceConfigError
from automask.server import keys as keystore
from automask.server.jobs import Jobs
from automask.server.migrations import ensure_schema, head, migrate
from automask.server.store import Store, embedded_url
from automask.settings import Settings

RELEASE_0_1_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    secret_hash TEXT NOT NULL,
    credits     INTEGER CHECK (credits IS NULL OR credits >= 0),
    rate_limit  INTEGER CHECK (rate_limit IS NULL OR rate_limit >= 1),
    created_at  REAL NOT NULL,
    disabled_at REAL
);
CREATE TABLE IF NOT EXISTS holds (
    id         TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id             TEXT PRIMARY KEY,
    key_id         TEXT,
    status         TEXT NOT NULL,
    request        TEXT,
    upload         BLOB,
    base64         INTEGER NOT NULL DEFAULT 0,
    error          TEXT,
    metadata       TEXT,
    result_path    TEXT,
    inference_time REAL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    created_at     REAL NOT NULL,
    started_at     REAL,
    finished_at    REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
"""
"""The schema `automask serve` of release 0.1 created itself (src/automask/server/store.py at 08af33b)."""


def release_0_1_database(data_dir: Path) -> dict[str, Any]:
    """A data folder as release 0.1 left it: a key with credits, a queued upload job holding a credit, a completed
    job whose result is a file, and a v1 hold a crash left behind (files 0644). Returns what the test checks."""
    data_dir.mkdir(parents=True)
    (data_dir / "results").mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"result" * 10
    (data_dir / "results" / "done.png").write_bytes(png)
    secret = "s3cret-of-release-0.1"
    conn = sqlite3.connect(data_dir / "automask.db")
    conn.executescript(RELEASE_0_1_SCHEMA)
    conn.execute("PRAGMA journal_mode=WAL")
    now = time.time()
    conn.execute(
        "INSERT INTO keys (id, name, secret_hash, credits, rate_limit, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        ("abc123", "old", keystore._hash(secret), 4, 30, now - 100),
    )
    request = json.dumps({"prompt": "cat", "threshold": 0.3, "base64": False})
    conn.execute(
        "INSERT INTO jobs (id, key_id, status, request, upload, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        ("queued", "abc123", "QUEUED", request, b"image-bytes", now - 50),
    )
    conn.execute(
        "INSERT INTO jobs (id, key_id, status, metadata, result_path, inference_time, attempts, created_at,"
        " finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("done", "abc123", "COMPLETED", json.dumps({"model": "clipseg"}), str(data_dir / "results" / "done.png"),
         0.25, 1, now - 40, now - 30),
    )  # fmt: skip
    conn.execute("INSERT INTO holds (id, key_id, created_at) VALUES ('queued', 'abc123', ?)", (now - 50,))
    conn.execute("INSERT INTO holds (id, key_id, created_at) VALUES ('v1-crashed', 'abc123', ?)", (now - 20,))
    conn.commit()
    conn.close()
    os.chmod(data_dir / "automask.db", 0o644)
    return {"token": f"am_abc123_{secret}", "png": png}


def test_release_0_1_database_migrates_in_place(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = release_0_1_database(data)
    with pytest.raises(ServiceConfigError, match=rf"older than {head()}\. Run: automask db migrate"):
        Store.from_settings(Settings(data_dir=data))  # serve, worker and keys refuse an older schema
    cli = CliRunner()
    refused = cli.invoke(main, ["--data-dir", str(data), "keys", "list"])
    assert refused.exit_code == 9 and "automask db migrate" in refused.output

    done = cli.invoke(main, ["--data-dir", str(data), "db", "migrate"])
    assert done.exit_code == 0, done.output
    assert "Migrated" in done.output and f"schema revision {head()}" in done.output
    again = cli.invoke(main, ["--data-dir", str(data), "db", "migrate"])
    assert again.exit_code == 0 and "up to date" in again.output

    store = Store.from_settings(Settings(data_dir=data))
    for name in ("automask.db", "automask.db-wal", "automask.db-shm"):  # 0.1 left them 0644 under umask 022
        if (data / name).exists():
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    key = keystore.authenticate(store, old["token"])
    assert (key.id, key.name, key.credits, key.rate_limit) == ("abc123", "old", 4, 30)
    jobs = Jobs(store)
    claimed = jobs.claim("queued", "node")
    assert claimed is not None and claimed.request["prompt"] == "cat" and claimed.request["image"] == b"image-bytes"
    done_job = jobs.get("done")
    assert done_job is not None and done_job.status == "COMPLETED" and done_job.metadata == {"model": "clipseg"}
    assert jobs.result("done") == old["png"]  # the result file moved into the database...
    assert not (data / "results" / "done.png").exists()  # ...and off the disk
    assert keystore.release_orphan_holds(store) == 1  # the crashed v1 hold (no expiry in 0.1); the job's stays
    assert keystore.get_key(store, "abc123").credits == 5  # type: ignore[union-attr]


def test_db_migrate_makes_an_older_sqlite_file_give_space_back(tmp_path: Path) -> None:
    """A file written at revision 0004 had no auto-vacuum: results deleted left their pages in it for good. `automask
    db migrate` to 0005 vacuums it once (outside its transaction): the file shrinks at once, and gives the space of
    results that expire later back (`Store.reclaim_space`, run by the sweeper)."""
    data = tmp_path / "data"
    path = data / "automask.db"
    store = Store(embedded_url(data))
    migrate(store, "0004")
    store.close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.executescript("PRAGMA auto_vacuum=NONE; VACUUM;")  # as a file written before 0005 was
    raw.execute("CREATE TABLE bulk (b BLOB)")
    raw.executemany("INSERT INTO bulk VALUES (?)", [(os.urandom(64 * 1024),) for _ in range(300)])
    raw.executescript("DROP TABLE bulk; PRAGMA wal_checkpoint(TRUNCATE);")  # 20 MB of free pages
    assert raw.execute("PRAGMA auto_vacuum").fetchone() == (0,) and path.stat().st_size > 19_000_000
    raw.close()

    done = CliRunner().invoke(main, ["--data-dir", str(data), "db", "migrate"])
    assert done.exit_code == 0 and "schema revision 0006" in done.output, done.output
    store = Store.from_settings(Settings(data_dir=data))
    try:
        with store.read() as conn:
            assert conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # INCREMENTAL
        store.engine.dispose()
        assert path.stat().st_size < 1_000_000  # before: 20 MB, and never less
    finally:
        store.close()


def test_a_vacuum_that_fails_leaves_db_migrate_a_warning_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VACUUM after the migration runs on the raw sqlite3 connection: its error (the file locked by a server
    that is writing, the disk full) is sqlite3's, not SQLAlchemy's. Before, it escaped `automask db migrate` as a
    traceback (exit 70) although the migration had committed; now a warning says to run it again."""
    data = tmp_path / "data"
    path = data / "automask.db"
    store = Store(embedded_url(data))
    migrate(store)
    store.close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.executescript("PRAGMA auto_vacuum=NONE; VACUUM;")  # as a file migrated while the VACUUM failed
    store = Store(embedded_url(data))
    event.listen(store.engine, "connect", lambda conn, _record: conn.execute("PRAGMA busy_timeout=100"))
    vacuum_once = Store.vacuum_once

    def a_server_writes_meanwhile(self: Store) -> bool:
        raw.execute("BEGIN IMMEDIATE")  # after the migration's transaction, before the VACUUM
        return vacuum_once(self)

    monkeypatch.setattr(Store, "vacuum_once", a_server_writes_meanwhile)
    try:
        assert migrate(store) == (head(), head())
    finally:
        raw.execute("ROLLBACK")
        store.close()
    monkeypatch.undo()
    assert "could not vacuum" in caplog.text and "database is locked" in caplog.text
    assert raw.execute("PRAGMA auto_vacuum").fetchone() == (0,)  # as it was: the next `db migrate` vacuums it
    raw.close()
    store = Store(embedded_url(data))
    try:
        migrate(store)
        with store.read() as conn:
            assert conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2
    finally:
        store.close()


def test_an_empty_database_is_created_but_an_unknown_revision_is_refused(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ServiceConfigError, match=r"is empty\. Run: automask db migrate"):
        ensure_schema(store, create=False)
    ensure_schema(store, create=True)
    ensure_schema(store, create=False)
    with store.transaction() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(ServiceConfigError, match="does not know"):
        ensure_schema(store, create=True)


def test_db_migrate_refuses_a_revision_of_a_newer_release_naming_the_fix(tmp_path: Path) -> None:
    """A rollback of automask (the deploy's `migrate` one-shot runs on every start): before, `automask db migrate`
    said "internal error: CommandError: Can't locate revision identified by '9999'" (exit 70), while serve and keys
    named the fix. The database is left as it was."""
    data = tmp_path / "data"
    Store.in_data_dir(data).close()
    store = Store(f"sqlite:///{data / 'automask.db'}")
    with store.transaction() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    result = CliRunner().invoke(main, ["--data-dir", str(data), "db", "migrate"])
    assert result.exit_code == 9, result.output
    assert "is at schema revision 9999, which this release of automask does not know" in result.output
    assert "Upgrade automask" in result.output and "internal error" not in result.output
    with store.read() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == "9999"
    store.close()


def _schema(store: Store) -> dict[str, Any]:
    with store.read() as conn:
        insp = inspect(conn)
        return {
            table: (
                sorted((c["name"], type(c["type"]).__name__, c["nullable"]) for c in insp.get_columns(table)),
                sorted(i["name"] for i in insp.get_indexes(table)),
                sorted(insp.get_pk_constraint(table)["constrained_columns"]),
            )
            for table in sorted(insp.get_table_names())
        }


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_created_schema_equals_the_migrated_one(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "sqlite":
        created, migrated = Store(f"sqlite:///{tmp_path / 'a.db'}"), Store(f"sqlite:///{tmp_path / 'b.db'}")
    else:
        pg = request.getfixturevalue("postgres_service")
        other = pg.create_database()
        request.addfinalizer(lambda: (migrated.close(), pg.drop_database(other)))
        created, migrated = Store(request.getfixturevalue("postgres_db")), Store(pg.url_for(other))
    ensure_schema(created, create=True)
    assert migrate(migrated) == (None, head())
    assert migrate(migrated) == (head(), head())  # idempotent
    assert _schema(created) == _schema(migrated)
    assert {"keys", "holds", "jobs", "nodes", "alembic_version"} <= set(_schema(created))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_jobs_queued_before_0006_count_against_the_bytes_cap(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Before: revision 0006 left `stored_bytes` NULL in the jobs queued at the upgrade, counted as nothing, so a key
    whose queue was full of uploads then could store as much again past `AUTOMASK_SERVER_MAX_QUEUED_BYTES_PER_KEY`.
    The upgrade measures the unfinished jobs' requests once (bytes: a request's JSON as UTF-8, its upload)."""
    from sqlalchemy import text

    from automask.server.errors import ApiError
    from automask.server.schemas import MaskRequest

    store = Store(f"sqlite:///{tmp_path / 'a.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_db"))
    request.addfinalizer(store.close)
    migrate(store, "0005")
    insert = text(
        "INSERT INTO jobs (id, key_id, status, request, upload, base64, created_at, attempts) "
        "VALUES (:id, 'k', :status, :request, :upload, 0, 1, 0)"
    )
    body = json.dumps({"image": "é" * 1000, "prompt": "sofa"}, ensure_ascii=False)  # 2 bytes a character
    with store.transaction() as conn:
        conn.execute(insert, {"id": "queued", "status": "QUEUED", "request": body, "upload": os.urandom(5000)})
        conn.execute(insert, {"id": "text", "status": "PROCESSING", "request": body, "upload": None})
        conn.execute(insert, {"id": "done", "status": "COMPLETED", "request": None, "upload": None})
    migrate(store)
    with store.read() as conn:
        sizes = dict(conn.execute(text("SELECT id, stored_bytes FROM jobs")).all())
    assert sizes == {"queued": len(body.encode()) + 5000, "text": len(body.encode()), "done": None}
    jobs = Jobs(store, max_bytes_per_key=sizes["queued"] + sizes["text"] + 100)
    with pytest.raises(ApiError) as refused:
        jobs.submit("k", MaskRequest.model_validate({"image": os.urandom(3000), "prompt": "sofa"}), charge=False)
    assert refused.value.status == 429
