"""The service's database URL (AUTOMASK_DATABASE_URL or the data folder's embedded SQLite file) and that file's
private creation: what `automask.server.store.Store` opens."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from automask.errors import ServiceConfigError

_URL_FORMS = "sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB"


def normalize_url(url: str) -> URL:
    """A database URL as SQLAlchemy takes it: `postgresql://` (and `postgres://`) use psycopg 3. `ServiceConfigError`
    for one that is not a URL, or names another kind of database."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ServiceConfigError(f"AUTOMASK_DATABASE_URL is not a database URL: use {_URL_FORMS}.") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if not (parsed.drivername.startswith("sqlite") or parsed.drivername.startswith("postgresql")):
        raise ServiceConfigError(
            f"AUTOMASK_DATABASE_URL: unsupported database URL scheme {parsed.drivername!r}: use {_URL_FORMS}."
        )
    return parsed


def private_file(path: Path) -> None:
    """Create `path` (and its folder) readable by this user only: 0700 folder, 0600 file, whatever the umask."""
    folder = path.parent
    try:
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as exc:
        raise ServiceConfigError(
            f"Cannot create the database file {path}: {exc.strerror or exc}. Check --data-dir / AUTOMASK_DATA_DIR "
            "(or AUTOMASK_DATABASE_URL)."
        ) from None
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and stat.S_IMODE(file.stat().st_mode) & 0o077:  # e.g. written by release 0.1 (0644)
            os.chmod(file, 0o600)


def embedded_url(data_dir: Path) -> str:
    """The URL of the data folder's embedded SQLite database."""
    return f"sqlite:///{Path(data_dir) / 'automask.db'}"


def database_url(settings: Any) -> str:
    """`settings.database_url` (AUTOMASK_DATABASE_URL), else the data folder's embedded database."""
    return str(settings.database_url or embedded_url(settings.data_dir))
