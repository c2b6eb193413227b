"""API keys and credits, stored in the `Store`.

A key reads `am_<id>_<secret>`; only sha256(secret) is stored, compared in constant time. Credits (None:
unlimited) are taken as a *hold* when a request is admitted (`reserve`, one atomic UPDATE that never lets the
balance go below zero) and either kept or given back when it ends (`settle`), so a failed request is free.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass

from automask.server.errors import ApiError
from automask.server.store import Store

PREFIX = "am"
_DUMMY_HASH = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A key as listed: never its secret. Times are UNIX seconds."""

    id: str
    name: str
    credits: int | None
    rate_limit: int | None
    created_at: float
    disabled_at: float | None

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _row_to_key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        credits=row["credits"],
        rate_limit=row["rate_limit"],
        created_at=row["created_at"],
        disabled_at=row["disabled_at"],
    )


def create_key(
    store: Store, *, name: str = "", credits: int | None = None, rate_limit: int | None = None
) -> tuple[ApiKey, str]:
    """Create a key; return it and its full token `am_<id>_<secret>` (shown once, never stored)."""
    if credits is not None and credits < 0:
        raise ValueError("credits must be 0 or more")
    if rate_limit is not None and rate_limit < 1:
        raise ValueError("rate_limit must be 1 or more requests per minute")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO keys (id, name, secret_hash, credits, rate_limit, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (key_id, name, _hash(secret), credits, rate_limit, time.time()),
        )
    key = get_key(store, key_id)
    assert key is not None
    return key, f"{PREFIX}_{key_id}_{secret}"


def get_key(store: Store, key_id: str) -> ApiKey | None:
    """The key `key_id`, or None."""
    row = store.connection().execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
    return _row_to_key(row) if row else None


def list_keys(store: Store) -> list[ApiKey]:
    """Every key, oldest first."""
    rows = store.connection().execute("SELECT * FROM keys ORDER BY created_at, id").fetchall()
    return [_row_to_key(r) for r in rows]


def revoke_key(store: Store, key_id: str) -> bool:
    """Disable key `key_id` for good; False when there is no such key."""
    with store.transaction() as conn:
        cur = conn.execute("UPDATE keys SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ?", (time.time(), key_id))
    return cur.rowcount == 1


def update_key(store: Store, key_id: str, *, credits: int | None = None, rate_limit: int | None = None) -> bool:
    """Set the credit balance and/or rate limit of `key_id` (None: unchanged); False when no such key."""
    with store.transaction() as conn:
        if credits is not None:
            conn.execute("UPDATE keys SET credits = ? WHERE id = ?", (credits, key_id))
        if rate_limit is not None:
            conn.execute("UPDATE keys SET rate_limit = ? WHERE id = ?", (rate_limit, key_id))
        found = conn.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone()
    return found is not None


def authenticate(store: Store, token: str | None) -> ApiKey:
    """The key behind `token` (the x-api-key header). 401: missing or unknown; 403: revoked."""
    if not token:
        raise ApiError(401, "Missing API key: send it in the x-api-key header (create one with: automask keys create).")
    prefix, _, rest = token.strip().partition("_")
    key_id, _, secret = rest.partition("_")
    row = None
    if prefix == PREFIX and key_id and secret:
        row = store.connection().execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
    stored = row["secret_hash"] if row else _DUMMY_HASH
    if not hmac.compare_digest(stored, _hash(secret)) or row is None:
        raise ApiError(401, "Invalid API key: check the x-api-key header (list keys with: automask keys list).")
    key = _row_to_key(row)
    if key.disabled:
        raise ApiError(403, f"The API key {key.id} has been revoked. Create a new one with: automask keys create.")
    return key


def reserve(store: Store, key_id: str, hold_id: str) -> bool:
    """Take one credit from `key_id` for request `hold_id`; False (nothing taken) when none is left."""
    with store.transaction() as conn:
        return reserve_in(conn, key_id, hold_id)


def reserve_in(conn: sqlite3.Connection, key_id: str, hold_id: str) -> bool:
    """`reserve` inside the caller's transaction (e.g. together with inserting a v2 job)."""
    cur = conn.execute(
        "UPDATE keys SET credits = credits - 1 WHERE id = ? AND (credits IS NULL OR credits >= 1)", (key_id,)
    )
    if cur.rowcount != 1:
        return False
    conn.execute("INSERT INTO holds (id, key_id, created_at) VALUES (?, ?, ?)", (hold_id, key_id, time.time()))
    return True


def settle(store: Store, hold_id: str, *, charge: bool) -> None:
    """End hold `hold_id`: keep its credit (`charge`, a success) or give it back (a failure)."""
    with store.transaction() as conn:
        settle_in(conn, hold_id, charge=charge)


def settle_in(conn: sqlite3.Connection, hold_id: str, *, charge: bool) -> None:
    """`settle` inside the caller's transaction. A hold settles once; settling it again does nothing."""
    row = conn.execute("DELETE FROM holds WHERE id = ? RETURNING key_id", (hold_id,)).fetchone()
    if row is not None and not charge:
        conn.execute("UPDATE keys SET credits = credits + 1 WHERE id = ? AND credits IS NOT NULL", (row["key_id"],))


def release_orphan_holds(store: Store) -> int:
    """Give back the credits of holds that no unfinished v2 job owns (v1 requests cut off by a crash)."""
    with store.transaction() as conn:
        orphans = conn.execute(
            "SELECT id FROM holds WHERE id NOT IN (SELECT id FROM jobs WHERE status IN ('QUEUED', 'PROCESSING'))"
        ).fetchall()
        for row in orphans:
            settle_in(conn, row["id"], charge=False)
    return len(orphans)
