"""Keys known to be good, which pass a failed-authentication lock-out of their address (`auth_limit.FailedAuth`).

One process: those it saw authenticate (`Known`). A fleet (AUTOMASK_REDIS_URL): those any API node saw
(`FleetKnown`), recorded in Redis under the key's id as an HMAC of the whole key, keyed by a secret the fleet keeps in
its database (`fleet_secret`); never the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import insert, select

from automask.server.keys import split_token
from automask.server.store import Store, settings_table

log = logging.getLogger("automask.server")
T = TypeVar("T")

KNOWN_PREFIX = "automask:known:"
"""A known key's Redis key: this prefix and the key's id (one entry per key, so at most as many as there are keys)."""
KNOWN_TTL = 86_400
"""Seconds a key stays known fleet-wide after a node last recorded it: a day. A client that used its key within a
day passes a lock-out of its address on every node; one idle for longer waits out the window once, as a new key
does. It also bounds how long an entry that a revocation could not clear (Redis down) lasts; meanwhile the revoked
key's first request on a node is let through to the database, refused 403, and clears it."""
REFRESH = 3600.0
"""A node records a key it already knows again once this many seconds have passed since it last did: a key stays
known for a day after it last authenticated, to within an hour, at one Redis write per key and node an hour at most
(not one per request)."""
TIMEOUT = 1.0
"""Seconds one known-key read or write in Redis may take; past it, or on any Redis error, the key counts as unknown."""
SECRET_ROW = "known-keys"
"""The database `settings` row that holds the fleet's HMAC secret (hex)."""

_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Delete a known key's entry only if it is this key's (a forged key with the same id clears nothing)."""


class Known:
    """Keys that authenticated lately in this process: SHA-256 digests (never the keys) of the `capacity` most recent,
    each with when the fleet last recorded it (monotonic seconds; -inf: never)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._digests: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def _digest(token: str | None) -> bytes | None:
        return hashlib.sha256(token.strip().encode()).digest() if token else None

    def has(self, token: str | None) -> bool:
        return self.recorded(token) is not None

    def recorded(self, token: str | None) -> float | None:
        """When the fleet last recorded `token` (-inf: never); None when this process does not know it."""
        digest = self._digest(token)
        return None if digest is None else self._digests.get(digest)

    def add(self, token: str | None, recorded: float = -math.inf) -> None:
        digest = self._digest(token)
        if digest is not None:
            self._digests[digest] = recorded
            self._digests.move_to_end(digest)
            while len(self._digests) > self.capacity:
                self._digests.popitem(last=False)

    def forget(self, token: str | None) -> None:
        digest = self._digest(token)
        if digest is not None:
            self._digests.pop(digest, None)

    def __len__(self) -> int:
        return len(self._digests)

    async def vouched(self, token: str | None) -> bool:
        """Whether another node knows `token` to be good (asked only when `has` says no): in one process, none."""
        return False

    async def succeeded(self, token: str | None) -> None:
        """`token` authenticated."""
        self.add(token)

    async def failed(self, token: str | None) -> None:
        """`token` failed to authenticate (e.g. revoked): no longer known to be good."""
        self.forget(token)


class FleetKnown(Known):
    """`Known` shared by the API nodes: a key that authenticated on any node within `ttl` seconds passes a lock-out
    on every node. Redis (`client`, a `redis.asyncio` client) holds `KNOWN_PREFIX<key id>` = HMAC-SHA256(`secret`,
    key), written when a key this node does not know yet authenticates (then at most every `REFRESH` seconds while it
    does), read only for a locked-out address, and cleared when that very key fails (revoked). Redis failing or
    slower than `TIMEOUT`: the key counts as unknown (the lock-out holds) and is not recorded."""

    def __init__(
        self,
        client: Any,
        secret: bytes,
        capacity: int = 10_000,
        ttl: int = KNOWN_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(capacity)
        self.client, self.ttl, self._secret, self._clock = client, ttl, secret, clock
        self._forget = client.register_script(_FORGET)

    def _entry(self, token: str | None) -> tuple[str, bytes] | None:
        """The Redis key and value that record `token`; None for what is not a key's form."""
        parts = split_token(token)
        if parts is None or token is None:
            return None
        return KNOWN_PREFIX + parts[0], hmac.new(self._secret, token.strip().encode(), hashlib.sha256).digest()

    async def vouched(self, token: str | None) -> bool:
        entry = self._entry(token)
        if entry is None:
            return False
        stored = await self._redis(self.client.get(entry[0]), "look up a known key (it counts as unknown)")
        return isinstance(stored, bytes) and hmac.compare_digest(stored, entry[1])

    async def succeeded(self, token: str | None) -> None:
        recorded, now, entry = self.recorded(token), self._clock(), self._entry(token)
        if entry is not None and (recorded is None or now - recorded >= REFRESH):
            written = await self._redis(self.client.set(*entry, ex=self.ttl), "record a known key (tried again)")
            recorded = now if written else recorded
        self.add(token, -math.inf if recorded is None else recorded)

    async def failed(self, token: str | None) -> None:
        self.forget(token)
        entry = self._entry(token)
        if entry is not None:
            await self._redis(self._forget(keys=[entry[0]], args=[entry[1]]), "forget a key (it expires in a day)")

    @staticmethod
    async def _redis(call: Awaitable[T], what: str) -> T | None:
        """`call`'s answer; None (logged) when Redis fails or takes longer than `TIMEOUT`."""
        from redis.exceptions import RedisError

        try:
            return await asyncio.wait_for(call, TIMEOUT)
        except (RedisError, asyncio.TimeoutError) as exc:
            log.warning("Redis did not %s: %s", what, str(exc) or f"no answer in {TIMEOUT:g} s")
            return None


def fleet_secret(store: Store) -> bytes:
    """The fleet's key for `FleetKnown`'s HMACs: random, made by the first node to start and kept in the database
    (`settings` row `known-keys`), which every node shares and Redis does not hold."""
    with store.transaction() as conn:
        store.lock(conn, "settings." + SECRET_ROW)  # nodes starting at once: one makes it, the others read it
        value = conn.execute(select(settings_table.c.value).where(settings_table.c.name == SECRET_ROW)).scalar()
        if value is None:
            value = secrets.token_hex(32)
            conn.execute(insert(settings_table).values(name=SECRET_ROW, value=value, updated_at=store.now()))
    return bytes.fromhex(str(value))


def forget_everywhere(redis_url: str, key_id: str) -> None:
    """No API node may take key `key_id` for known from Redis any more (after it was revoked). A node that knows it
    in its own memory still reads the database for it once, is refused 403, and forgets it. Raises `RedisError`, or
    `ServiceConfigError` for a URL that cannot be read (`sync_redis`)."""
    from automask.server.redis_client import sync_redis

    with sync_redis(redis_url, 5.0) as client:
        client.delete(KNOWN_PREFIX + key_id)
