"""API keys and credits, stored in the `Store`.

A key reads `am_<id>_<secret>`; only sha256(secret) is stored, compared in constant time. Credits (None:
unlimited) are taken as a *hold* when a request is admitted (`reserve`, one conditional UPDATE that never lets the
balance go below zero) and either kept or given back when it ends (`settle`), so a failed request is free. A hold
settles once (its row is deleted by whoever settles it first). An admin's `update_key(credits=N)` sets the balance
outright: holds taken before it are no longer refundable, so a refund cannot raise the balance above N;
`update_key(credits=UNLIMITED)` (or `rate_limit=UNLIMITED`) takes the limit away.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, or_, select, update

from automask.server import metrics
from automask.server.config import MAX_KEY_COUNT
from automask.server.errors import ApiError
from automask.server.store import Store, holds_table, jobs_table, keys_table

PREFIX = "am"
_DUMMY_HASH = hashlib.sha256(b"").hexdigest()
K, H, J = keys_table.c, holds_table.c, jobs_table.c


class Unlimited(enum.Enum):
    """`update_key`'s value for no limit (its None means unchanged)."""

    UNLIMITED = "unlimited"


UNLIMITED = Unlimited.UNLIMITED


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


def _row_to_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        credits=row.credits,
        rate_limit=row.rate_limit,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


def create_key(
    store: Store, *, name: str = "", credits: int | None = None, rate_limit: int | None = None
) -> tuple[ApiKey, str]:
    """Create a key; return it and its full token `am_<id>_<secret>` (shown once, never stored)."""
    _check_counts(credits, rate_limit)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    with store.transaction() as conn:
        conn.execute(
            insert(keys_table).values(
                id=key_id,
                name=name,
                secret_hash=_hash(secret),
                credits=credits,
                rate_limit=rate_limit,
                created_at=store.now(),
            )
        )
    key = get_key(store, key_id)
    assert key is not None
    return key, f"{PREFIX}_{key_id}_{secret}"


def _check_counts(credits: int | None, rate_limit: int | None) -> None:
    """Raise `ValueError` for a credit balance or rate limit out of range (the database holds up to MAX_KEY_COUNT)."""
    if credits is not None and not 0 <= credits <= MAX_KEY_COUNT:
        raise ValueError(f"credits must be 0 to {MAX_KEY_COUNT}")
    if rate_limit is not None and not 1 <= rate_limit <= MAX_KEY_COUNT:
        raise ValueError(f"rate_limit must be 1 to {MAX_KEY_COUNT} requests per minute")


def get_key(store: Store, key_id: str) -> ApiKey | None:
    """The key `key_id`, or None."""
    with store.read() as conn:
        row = conn.execute(select(keys_table).where(K.id == key_id)).first()
    return _row_to_key(row) if row else None


def list_keys(store: Store) -> list[ApiKey]:
    """Every key, oldest first."""
    with store.read() as conn:
        rows = conn.execute(select(keys_table).order_by(K.created_at, K.id)).all()
    return [_row_to_key(r) for r in rows]


def revoke_key(store: Store, key_id: str) -> bool:
    """Disable key `key_id` for good; False when there is no such key."""
    with store.transaction() as conn:
        cur = conn.execute(
            update(keys_table).where(K.id == key_id, K.disabled_at.is_(None)).values(disabled_at=store.now())
        )
        found = cur.rowcount == 1 or conn.execute(select(K.id).where(K.id == key_id)).first() is not None
    return found


def update_key(
    store: Store, key_id: str, *, credits: int | Unlimited | None = None, rate_limit: int | Unlimited | None = None
) -> bool:
    """Set the credit balance and/or rate limit of `key_id` (None: unchanged; `UNLIMITED`: no limit); False when no
    such key.

    The balance is set outright: credits held by requests still running are not given back when they fail."""
    changes = {
        name: None if value is UNLIMITED else value
        for name, value in (("credits", credits), ("rate_limit", rate_limit))
        if value is not None
    }
    _check_counts(changes.get("credits"), changes.get("rate_limit"))
    with store.transaction() as conn:
        if conn.execute(select(K.id).where(K.id == key_id)).first() is None:
            return False
        if changes:
            conn.execute(update(keys_table).where(K.id == key_id).values(**changes))
        if "credits" in changes:
            conn.execute(update(holds_table).where(H.key_id == key_id).values(refundable=False))
    return True


def split_token(token: str | None) -> tuple[str, str] | None:
    """The id and secret of a key written `am_<id>_<secret>` (surrounding whitespace ignored); None otherwise."""
    prefix, _, rest = (token or "").strip().partition("_")
    key_id, _, secret = rest.partition("_")
    return (key_id, secret) if prefix == PREFIX and key_id and secret else None


def authenticate(store: Store, token: str | None) -> ApiKey:
    """The key behind `token` (the x-api-key header). 401: missing or unknown; 403: revoked."""
    if not token:
        raise ApiError(401, "Missing API key: send it in the x-api-key header (create one with: automask keys create).")
    key_id, secret = split_token(token) or ("", "")
    row = None
    if key_id:
        with store.read() as conn:
            row = conn.execute(select(keys_table).where(K.id == key_id)).first()
    stored = row.secret_hash if row else _DUMMY_HASH
    if not hmac.compare_digest(stored, _hash(secret)) or row is None:
        raise ApiError(401, "Invalid API key: check the x-api-key header (list keys with: automask keys list).")
    key = _row_to_key(row)
    if key.disabled:
        raise ApiError(403, f"The API key {key.id} has been revoked. Create a new one with: automask keys create.")
    return key


@dataclass(frozen=True)
class Reserved:
    """A credit taken: `left` is what the key has once it is taken (None: unlimited credits)."""

    left: int | None


def reserve(store: Store, key_id: str, hold_id: str, *, expires_at: float | None = None) -> bool:
    """Take one credit from `key_id` for request `hold_id`; False (nothing taken) when none is left.

    `expires_at`: when the sweeper may give it back if nobody settled it (the request can no longer be running)."""
    return reserve_left(store, key_id, hold_id, expires_at=expires_at) is not None


def reserve_left(store: Store, key_id: str, hold_id: str, *, expires_at: float | None = None) -> Reserved | None:
    """`reserve`, answering with the credits `key_id` has left once this one is taken, read in the transaction
    that takes it (a v1 answer's `x-remaining-credits`); None when none was left (nothing taken)."""
    with store.transaction() as conn:
        return reserve_in(conn, key_id, hold_id, now=store.now(), expires_at=expires_at)


def reserve_in(
    conn: Connection, key_id: str, hold_id: str, *, now: float, expires_at: float | None = None
) -> Reserved | None:
    """`reserve_left` inside the caller's transaction (e.g. together with inserting a v2 job); `now`: `Store.now()`.
    One conditional UPDATE ... RETURNING: the balance never goes below zero, and the one returned is this charge's
    own, whatever other requests race."""
    row = conn.execute(
        update(keys_table)
        .where(K.id == key_id, or_(K.credits.is_(None), K.credits >= 1))
        .values(credits=K.credits - 1)
        .returning(K.credits)
    ).first()
    if row is None:
        return None
    conn.execute(insert(holds_table).values(id=hold_id, key_id=key_id, created_at=now, expires_at=expires_at))
    return Reserved(row.credits)


def settle(store: Store, hold_id: str, *, charge: bool) -> None:
    """End hold `hold_id`: keep its credit (`charge`, a success) or give it back (a failure)."""
    with store.transaction() as conn:
        settled = settle_in(conn, hold_id, charge=charge)
    if settled and charge:
        metrics.credit_charged()


def settle_in(conn: Connection, hold_id: str, *, charge: bool) -> bool:
    """`settle` inside the caller's transaction. A hold settles once; settling it again does nothing (False)."""
    row = conn.execute(delete(holds_table).where(H.id == hold_id).returning(H.key_id, H.refundable)).first()
    if row is None:
        return False
    if not charge and row.refundable:
        conn.execute(update(keys_table).where(K.id == row.key_id, K.credits.is_not(None)).values(credits=K.credits + 1))
    return True


def release_orphan_holds(store: Store, now: float | None = None) -> int:
    """Give back the credits of holds that no unfinished v2 job owns and whose request can no longer be running
    (v1 requests cut off by a crash: past their `expires_at`, or from release 0.1, which set none)."""
    now = store.now() if now is None else now
    unfinished = select(J.id).where(J.status.in_(("QUEUED", "PROCESSING")))
    with store.transaction() as conn:
        orphans = conn.execute(
            select(H.id).where(H.id.not_in(unfinished), or_(H.expires_at.is_(None), H.expires_at < now))
        ).all()
        return sum(settle_in(conn, row.id, charge=False) for row in orphans)


def balance(store: Store, key_id: str) -> int | None:
    """The credits left to `key_id` (None: unlimited)."""
    key = get_key(store, key_id)
    return key.credits if key is not None else None
