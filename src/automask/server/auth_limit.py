"""The failed-authentication limit: failed authentications are counted per client address, and past the limit the
address is locked out (429 before the database is read), except for keys known to be good.

Which keys are known is chosen once at start-up (`failed_auth_for`): those this process saw authenticate, or in a
fleet (AUTOMASK_REDIS_URL) those any API node saw (`automask.server.known_keys`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from automask.server.errors import ApiError
from automask.server.known_keys import FleetKnown, Known, fleet_secret
from automask.server.limits import RateLimited, RateLimiter, Receipt, RedisRateLimiter
from automask.server.store import Store

SITE_FACTOR = 16
"""An IPv6 /48 (one site's allocation: 65,536 /64s) is locked out as a whole once its /64s together failed this many
times the per-address limit within the window: a flood of guesses from many /64s of one site gets as far as 16
addresses would, and holds as many counts at most (before: each /64 counted apart, 65,536 times the limit)."""

PENDING = 10.0
"""Seconds a key's count stays pending in a fleet (`RedisRateLimiter.hit`) while the database reads it, at most (a
node that died meanwhile never ends it): a request of its address refused meanwhile, on any node, waits for it at
most this long, then is answered 429. It also bounds the whole wait of a request refused while others of its address
are in flight in this process (their reads may queue for a database thread): then it is answered 429 as well."""
POLL_FIRST, POLL_MAX = 0.01, 0.2
"""Seconds between two looks of a request waiting for counts pending on other nodes: the first pause, doubled up to
the longest."""
MAX_POLLING = 64
"""Requests of one client address that may wait for its pending counts at once, in one process; the others are
answered 429 at once. A flood of guesses from an address whose count is pending (its read slow, its node dead) holds
no more connections, nor Redis looks, than these; a new key's burst from one address is served up to the limit's
worth being read plus these waiting on each node."""


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
    admitted one ends (the first of a new valid key's requests to succeed makes it known), `PENDING` seconds at most
    in all: only failures, or that wait's end, refuse it.
    A limiter's answers may arrive in any order (Redis): a request is in flight from the moment it asks. In a fleet
    (Redis) a count is also pending until its read ends, on whichever node: a request refused while counts of its
    address are pending looks again every few milliseconds (`_Polling`), for `PENDING` seconds at most, unless its
    key is known fleet-wide (`Known.vouched`, asked first)."""

    def __init__(self, limiter: RateLimiter | RedisRateLimiter, limit: int | None, known: Known | None = None) -> None:
        self.limiter = limiter
        self.limit = limit
        self.known = known if known is not None else Known()  # (an empty one is falsy)
        self._in_flight: dict[str, int] = {}
        """Attempts of each address being counted or counted and not yet ended, in this process."""
        self._ended: dict[str, _Wake] = {}
        """The requests of each address waiting for room (`_Wake`)."""
        self._polling: dict[str, int] = {}
        """Requests of each address waiting for its pending counts (`_Polling`), in this process."""

    async def admit(self, address: str, token: str | None) -> Attempt:
        """429 when `address` is locked out and `token` is not a key known to be good; otherwise the `Attempt`, which
        counts as a failure (of `address`, and of its IPv6 site) until `succeeded` gives it back. End it with
        `failed`, `succeeded` or `give_back`. A key this process knows costs no I/O and is not counted; the fleet is
        asked about another only when its address is locked out."""
        waiting = _Polling(time.monotonic() + PENDING, self._polling, address)
        try:
            return await self._admit(address, token, waiting)
        finally:
            waiting.leave()

    async def _admit(self, address: str, token: str | None, waiting: _Polling) -> Attempt:
        while True:
            if self.limit is None or self.known.has(token):
                return Attempt(address)
            attempt = self._begin(address)
            try:
                for counted, limit in _counted_as(address, self.limit):
                    receipt = await self.limiter.hit(counted, limit, "failed authentications", pending=PENDING)
                    if receipt is not None:
                        attempt.taken.append((counted, receipt))
            except ApiError as refused:
                await self.give_back(attempt)  # (the address's count, when its site's refused it)
                if refused.status != 429:
                    raise
                if not self.known.has(token) and await self.known.vouched(token):
                    return Attempt(address)  # known fleet-wide: nothing to wait for
                if self.known.has(token) or await self._room_may_be_free(address, waiting.deadline):
                    continue  # made known, or an admitted one ended here: look again
                if await waiting.may_look(refused):
                    continue  # counts pending on another node: look again
                raise
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
                for counted, receipt in attempt.taken:  # they stay: no longer pending
                    await self.limiter.settle(counted, receipt)
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
            if self.limit is not None:  # known (fleet-wide) before its count ends: those waiting for it find it known
                await self.known.succeeded(token)
            await self._uncount(attempt)
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

    async def _room_may_be_free(self, address: str, deadline: float) -> bool:
        """Wait while attempts of `address` are in flight, until `deadline` (monotonic seconds) at most: True once an
        admitted one ends (look again), False when none is left (at once if none is) or the deadline passed (their
        reads may wait behind others for a database thread: the whole wait is bounded, not each read), without
        looking at the count for every refused one that ends."""
        while self._in_flight.get(address):
            wake = self._ended.setdefault(address, _Wake())
            try:
                await asyncio.wait_for(wake.event.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return False
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


class _Polling:
    """How a request of `address` refused while counts of its address are pending on other nodes
    (`RateLimited.pending`) waits for them: it looks again after a short sleep (doubling from `POLL_FIRST` to
    `POLL_MAX` seconds), until `deadline` (monotonic seconds), if it finds a place among the `MAX_POLLING` of its
    address (`polling`, the process's count of them) that may wait so; `leave` gives the place back."""

    def __init__(self, deadline: float, polling: dict[str, int], address: str) -> None:
        self.deadline = deadline
        self.pause = POLL_FIRST
        self.polling, self.address, self.joined = polling, address, False

    async def may_look(self, refused: ApiError) -> bool:
        """True after a pause when `refused` found counts pending and there is time left; False at once otherwise."""
        if not isinstance(refused, RateLimited) or not refused.pending or time.monotonic() >= self.deadline:
            return False
        if not self.joined:
            if self.polling.get(self.address, 0) >= MAX_POLLING:
                return False
            self.polling[self.address] = self.polling.get(self.address, 0) + 1
            self.joined = True
        await asyncio.sleep(min(self.pause, max(0.0, self.deadline - time.monotonic())))
        self.pause = min(self.pause * 2, POLL_MAX)
        return True

    def leave(self) -> None:
        """No longer waiting: its place is free."""
        if self.joined:
            self.joined = False
            left = self.polling.pop(self.address) - 1
            if left:
                self.polling[self.address] = left


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


def failed_auth_for(limiter: RateLimiter | RedisRateLimiter, store: Store, limit: int | None) -> FailedAuth:
    """The failed-authentication limit of a server whose per-key limiter is `limiter`: a fleet's (Redis) shares the
    counts and the known keys through it; one process keeps both in memory (a limiter of its own: client addresses
    never evict key counts)."""
    if isinstance(limiter, RedisRateLimiter):
        return FailedAuth(limiter, limit, FleetKnown(limiter.client, fleet_secret(store)))
    return FailedAuth(RateLimiter(), limit, Known())


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
