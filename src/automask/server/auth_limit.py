"""The failed-authentication limit: failed authentications are counted per client address, and past the limit the
address is locked out (429 before the database is read), except for keys known to be good.

Which keys are known is chosen once at start-up (`failed_auth_for`). One process: those it saw authenticate
(`Known`). A fleet (AUTOMASK_REDIS_URL): those any API node saw (`FleetKnown`), recorded in Redis under the key's id
as an HMAC of the whole key, keyed by a secret the fleet keeps in its database (`fleet_secret`); never the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import insert, select

from automask.server.errors import ApiError
from automask.server.keys import split_token
from automask.server.limits import RateLimiter, Receipt, RedisRateLimiter
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

SITE_FACTOR = 16
"""An IPv6 /48 (one site's allocation: 65,536 /64s) is locked out as a whole once its /64s together failed this many
times the per-address limit within the window: a flood of guesses from many /64s of one site gets as far as 16
addresses would, and holds as many counts at most (before: each /64 counted apart, 65,536 times the limit)."""

_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Delete a known key's entry only if it is this key's (a forged key with the same id clears nothing)."""


@dataclass
class Attempt:
    """One authentication from `address` (`FailedAuth.admit`): the failure counts it took before the database was
    read, each as the limiter's key and the `Receipt` that gives it back once the key is good; `in_flight` from when
    its count is asked for until `FailedAuth` learns how it ended; `admitted` once counted (its database read may
    free room, or make its key known)."""

    address: str
    taken: list[tuple[str, Receipt]] = field(default_factory=list)
    in_flight: bool = False
    admitted: bool = False


class _Wake:
    """Set when an attempt in flight of an address ends (then replaced): `look` when it was admitted (look at the
    count again), else it was the address's last one in flight."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.look = False


class FailedAuth:
    """Failed authentications per client address (`limit` a minute; None: no limit), counted in the server's rate
    limiter (`RateLimiter` or `RedisRateLimiter`) under `auth-fail:<address>`. Past the limit the address is locked
    out for the rest of the window: its requests are answered 429 before the database is read, except those that
    carry a key known to be good (`known`): brute force gets nowhere (a guess is refused unread), while a client with
    a valid key behind the same address keeps working.

    A key not known to be good is counted as a failure before the database is read (`admit`), and the count is given
    back if it authenticates (`succeeded`): keys sent together cannot all pass the look at the count that none of them
    is in yet, so at most `limit` are read a minute, however many come at once. One that finds no room while keys of
    its address are in flight in this process (being counted, or read) waits for them and looks again each time an
    admitted one ends (the first of a new valid key's requests to succeed makes it known): only failures refuse it.
    A limiter's answers may arrive in any order (Redis): a request is in flight from the moment it asks."""

    def __init__(self, limiter: RateLimiter | RedisRateLimiter, limit: int | None, known: Known | None = None) -> None:
        self.limiter = limiter
        self.limit = limit
        self.known = known if known is not None else Known()  # (an empty one is falsy)
        self._in_flight: dict[str, int] = {}
        """Attempts of each address being counted or counted and not yet ended, in this process."""
        self._ended: dict[str, _Wake] = {}
        """The requests of each address waiting for room (`_Wake`)."""

    async def admit(self, address: str, token: str | None) -> Attempt:
        """429 when `address` is locked out and `token` is not a key known to be good; otherwise the `Attempt`, which
        counts as a failure (of `address`, and of its IPv6 site) until `succeeded` gives it back. End it with
        `failed`, `succeeded` or `give_back`. A key this process knows costs no I/O and is not counted; the fleet is
        asked about another only when its address is locked out."""
        while True:
            if self.limit is None or self.known.has(token):
                return Attempt(address)
            attempt = self._begin(address)
            try:
                for counted, limit in _counted_as(address, self.limit):
                    receipt = await self.limiter.hit(counted, limit, "failed authentications")
                    if receipt is not None:
                        attempt.taken.append((counted, receipt))
            except ApiError as refused:
                await self.give_back(attempt)  # (the address's count, when its site's refused it)
                if refused.status == 429 and (self.known.has(token) or await self._room_may_be_free(address)):
                    continue  # made known, or one in flight ended: look again
                if refused.status != 429 or not await self.known.vouched(token):
                    raise
                return Attempt(address)
            except BaseException:  # (cancelled, or the limiter failed)
                await self.give_back(attempt)
                raise
            attempt.admitted = True
            return attempt

    async def failed(self, attempt: Attempt, token: str | None) -> None:
        """`attempt` failed to authenticate (`token` is no longer known to be good): it stays counted, or, if `admit`
        counted nothing (the key was known to be good), is counted now."""
        try:
            if self.limit is not None:
                await self.known.failed(token)
                if not attempt.taken:
                    for counted, limit in _counted_as(attempt.address, self.limit):
                        with _suppress_429():
                            await self.limiter.hit(counted, limit, "failed authentications")
        finally:
            self._end(attempt)

    async def succeeded(self, attempt: Attempt, token: str | None) -> None:
        """`token` authenticated: `attempt` is not a failure, and from now on the key passes a lock-out of its
        address."""
        try:
            await self._uncount(attempt)
            if self.limit is not None:
                await self.known.succeeded(token)
        finally:
            self._end(attempt)  # the requests waiting for room look again, and find the key known

    async def give_back(self, attempt: Attempt) -> None:
        """End `attempt` without counting it (the database could not tell whether its key is good)."""
        try:
            await self._uncount(attempt)
        finally:
            self._end(attempt)

    async def _uncount(self, attempt: Attempt) -> None:
        while attempt.taken:
            await self.limiter.uncount(*attempt.taken.pop())

    def _begin(self, address: str) -> Attempt:
        """A new attempt of `address`, in flight from now (before its count is asked for)."""
        self._in_flight[address] = self._in_flight.get(address, 0) + 1
        return Attempt(address, in_flight=True)

    async def _room_may_be_free(self, address: str) -> bool:
        """Wait while attempts of `address` are in flight: True once an admitted one ends (look again), False when
        none is left (at once if none is), without looking at the count for every refused one that ends."""
        while self._in_flight.get(address):
            wake = self._ended.setdefault(address, _Wake())
            await wake.event.wait()
            if wake.look:
                return True
        return False

    def _end(self, attempt: Attempt) -> None:
        """`attempt` is no longer in flight: wake the requests of its address waiting for room when it was admitted,
        or was the last."""
        if attempt.in_flight:
            attempt.in_flight = False
            left = self._in_flight.pop(attempt.address) - 1
            if left:
                self._in_flight[attempt.address] = left
            if attempt.admitted or not left:
                wake = self._ended.pop(attempt.address, None)
                if wake is not None:
                    wake.look = attempt.admitted
                    wake.event.set()


def _counted_as(address: str, limit: int) -> list[tuple[str, int]]:
    """The limiter keys a failed authentication from `address` (`client_address`) counts under, with their limits:
    the address's own, and for an IPv6 /64 its /48's, `SITE_FACTOR` times as many."""
    counted = [(f"auth-fail:{address}", limit)]
    if address.endswith("/64"):
        site = ipaddress.IPv6Network(address).supernet(new_prefix=48)
        counted.append((f"auth-fail:{site}", limit * SITE_FACTOR))
    return counted


@contextmanager
def _suppress_429() -> Iterator[None]:
    """Swallow the 429 of a count that found the limit reached already (requests that were in flight together)."""
    try:
        yield
    except ApiError as exc:
        if exc.status != 429:
            raise


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


def failed_auth_for(limiter: RateLimiter | RedisRateLimiter, store: Store, limit: int | None) -> FailedAuth:
    """The failed-authentication limit of a server whose per-key limiter is `limiter`: a fleet's (Redis) shares the
    counts and the known keys through it; one process keeps both in memory (a limiter of its own: client addresses
    never evict key counts)."""
    if isinstance(limiter, RedisRateLimiter):
        return FailedAuth(limiter, limit, FleetKnown(limiter.client, fleet_secret(store)))
    return FailedAuth(RateLimiter(), limit, Known())


def forget_everywhere(redis_url: str, key_id: str) -> None:
    """No API node may take key `key_id` for known from Redis any more (after it was revoked). A node that knows it
    in its own memory still reads the database for it once, is refused 403, and forgets it. Raises `RedisError`."""
    import redis

    with redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5) as client:
        client.delete(KNOWN_PREFIX + key_id)


def client_address(peer: str | None) -> str:
    """The address failed authentications are counted for: the client's IP (the socket peer, or the one a trusted
    proxy forwarded in X-Forwarded-For: uvicorn's proxy headers, trusted from FORWARDED_ALLOW_IPS, by default
    127.0.0.1 and ::1), an IPv6 one as its /64 (what one host is usually given;
    an IPv4-mapped one as the IPv4 address), or "unknown". A port a proxy forwarded with the address ("192.0.2.1:5678",
    "[2001:db8::1]:443") is dropped: counted per port, each new connection of a guesser would count anew."""
    if not peer:
        return "unknown"
    host = peer[1:].partition("]")[0] if peer.startswith("[") else peer
    if host.count(":") == 1:  # IPv4 with a port (an IPv6 address has at least two colons)
        host = host.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)
