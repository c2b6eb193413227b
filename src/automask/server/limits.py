"""Rate limits: a per-key sliding-window rate limiter, in memory or shared through Redis (also counting failed
authentications per client address: `automask.server.auth_limit`), its 429s, and the Redis start-up check. The
request-body limits are in `automask.server.bodies`."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone

from automask.errors import ServiceConfigError
from automask.server.errors import ApiError
from automask.server.logs import Outage, one_line

log = logging.getLogger("automask.server")

WINDOW = 60.0
"""Rate limits count requests in the last 60 seconds."""

REDIS_TIMEOUT = 5.0
"""Seconds one call to Redis (and its connect) may take before it fails: a rate-limit count, a v1 hand-off's write
(the request is answered 503), a worker's read. Explicit, as redis-py before 8 waits for ever by default: a frozen
Redis would hold every request."""
PING_TIMEOUT = 3.0
"""Seconds Redis has to answer a PING (at start-up, and on every /readyz) before it counts as unreachable."""

REDIS_DOWN = (
    "Redis (AUTOMASK_REDIS_URL) is unreachable: requests are refused (503) until it answers again; the server log "
    "has the details."
)
"""The /readyz reason while Redis does not answer (public: no address)."""


Receipt = float | str
"""What a limiter's `hit` answers for a request it counted, to take that count back (`uncount`): the time it was
counted at (in memory), or its member of the key's sorted set (Redis)."""

PENDING_SUFFIX = ":pending"
"""A Redis limiter key's counts still pending (`RedisRateLimiter.hit`): a sorted set of their members, each scored
with when it stops being pending (microseconds, Redis's clock) if nothing ended it. A key's counts and its pending
marks are `<prefix>{<key>}` and `<prefix>{<key>}:pending`: one hash tag, one Redis Cluster slot (`_tagged`)."""

MAX_COUNTED = 100_000
"""Keys (or client addresses) the in-process limiter keeps counts for at most; past it the least recently counted
is forgotten, so many addresses cannot grow its memory without bound."""


class RateLimiter:
    """At most `limit` requests per key in any 60-second window (in memory, per server process), for at most
    `max_keys` keys at once: a key none of whose requests is left in the window is dropped, and past `max_keys` the
    least recently counted key is forgotten (its count starts again)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = MAX_COUNTED) -> None:
        self._clock = clock
        self.max_keys = max_keys
        # each key's request times, oldest first, as 8-byte doubles (a deque of floats took ~800 bytes for one: a
        # flood of client addresses failing authentication grew 100,000 of them to ~95 MB)
        self._seen: OrderedDict[str, array[float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, key_id: str, limit: int | None, what: str = "requests", count: bool = True) -> Receipt | None:
        """Count one request of `key_id` (only look, with `count=False`); raise a 429 `ApiError` (nothing counted,
        the limit named as `limit` `what` per minute) when `limit` are counted already. Returns the count's `Receipt`
        (for `uncount`), None when nothing was counted."""
        if limit is None:
            return None
        now = self._clock()
        with self._lock:
            self._forget_old(now)
            seen = self._seen.get(key_id)
            if seen:
                left = next((i for i, t in enumerate(seen) if t > now - WINDOW), len(seen))
                del seen[:left]
            if seen is None or len(seen) < limit:
                if not count:
                    return None
                self._seen.setdefault(key_id, array("d")).append(now)
                self._seen.move_to_end(key_id)
                self._forget_old(now)
                return now
            reset_at = seen[len(seen) - limit] + WINDOW
        raise rate_limited(limit, now, reset_at, what)

    def _forget_old(self, now: float) -> None:
        """Drop the least recently counted keys while their last request has left the window or there are more than
        `max_keys` (amortised O(1): keys are kept in the order they were last counted)."""
        while self._seen:
            key_id, seen = next(iter(self._seen.items()))
            if seen and seen[-1] > now - WINDOW and len(self._seen) <= self.max_keys:
                return
            del self._seen[key_id]

    def __len__(self) -> int:
        """Keys counted now."""
        return len(self._seen)

    async def hit(
        self, key_id: str, limit: int | None, what: str = "requests", count: bool = True, pending: float = 0.0
    ) -> Receipt | None:
        """`check` for the event loop (in memory: no I/O). `pending` is for a fleet's limiter (`RedisRateLimiter`):
        one process knows its own requests in flight."""
        return self.check(key_id, limit, what, count)

    async def settle(self, key_id: str, receipt: Receipt) -> None:
        """The count `receipt` stays (`RedisRateLimiter.settle`): nothing to do in memory."""

    async def uncount(self, key_id: str, receipt: Receipt) -> None:
        """Take back the count of `key_id` that `hit` answered with `receipt` (gone already: nothing)."""
        with self._lock:
            seen = self._seen.get(key_id)
            if seen is not None and receipt in seen:
                seen.remove(float(receipt))
                if not seen:  # nothing left to count: as if never counted
                    del self._seen[key_id]

    async def unreachable(self) -> str | None:
        """None: in memory, it is always there."""
        return None


_SLIDING_WINDOW = """
local now = redis.call('TIME')
local t = tonumber(now[1]) * 1000000 + tonumber(now[2])
local window, limit, pending = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t - window)
local n = redis.call('ZCARD', KEYS[1])
if n < limit then
  if ARGV[4] == '1' then
    redis.call('ZADD', KEYS[1], t, ARGV[3])
    redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
    if pending > 0 then
      redis.call('ZADD', KEYS[2], t + pending, ARGV[3])
      redis.call('PEXPIRE', KEYS[2], math.ceil(pending / 1000))
    end
  end
  return {1, tostring(t), '0', 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', t)
return {0, tostring(t), oldest[2], redis.call('ZCARD', KEYS[2])}
"""
"""One atomic sliding-window step on the Redis server's clock (microseconds): drop what left the window, then
count the request if there is room (and ARGV[4] is '1'; with ARGV[5] > 0, also as pending in KEYS[2] for that many
microseconds at most), else answer when the oldest counted request leaves it, and how many counts are pending."""


class RedisRateLimiter:
    """The same limit as `RateLimiter`, shared by every API node: one sorted set per key in Redis (`redis_url`),
    updated by an atomic Lua script on the Redis server's clock."""

    def __init__(self, redis_url: str, prefix: str = "automask:rate:") -> None:
        from automask.server.redis_client import async_redis

        self.client = async_redis(redis_url, REDIS_TIMEOUT, REDIS_TIMEOUT)  # a burst waits for a connection
        self.prefix = prefix
        self._script = self.client.register_script(_SLIDING_WINDOW)
        self._outage = Outage(log, "Redis (AUTOMASK_REDIS_URL)")

    async def hit(
        self, key_id: str, limit: int | None, what: str = "requests", count: bool = True, pending: float = 0.0
    ) -> Receipt | None:
        """Count one request of `key_id` (only look, with `count=False`); raise a 429 `RateLimited` (nothing counted)
        when `limit` are counted already. A key expires with its window. Returns the count's `Receipt` (its member
        of the sorted set), None when nothing was counted.

        `pending` > 0: the count is also pending, for that many seconds at most, until `settle` or `uncount` ends
        it (whether it stays is not known yet: a failed authentication being checked, on any node); a 429 says how
        many of the key's counts are pending (`RateLimited.pending`), in the same atomic step."""
        if limit is None:
            return None
        import uuid

        window_us, member = int(WINDOW * 1_000_000), uuid.uuid4().hex
        allowed, now, oldest, held = await self._script(
            keys=self._keys(key_id),
            args=[window_us, limit, member, "1" if count else "0", int(pending * 1_000_000)],
        )
        if int(allowed):
            return member if count else None
        now_s = float(now) / 1e6
        raise rate_limited(limit, now_s, float(oldest) / 1e6 + WINDOW, what, pending=int(held))

    async def settle(self, key_id: str, receipt: Receipt) -> None:
        """The count `receipt` (counted with `pending`) stays: it is no longer pending."""
        await self.client.zrem(self._keys(key_id)[1], str(receipt))

    async def uncount(self, key_id: str, receipt: Receipt) -> None:
        """Take back the count of `key_id` that `hit` answered with `receipt` (gone already: nothing), pending or
        not: both at once (MULTI), so no one sees it pending without its count or counted and no longer pending."""
        async with self.client.pipeline(transaction=True) as pipe:
            for key in self._keys(key_id):
                pipe.zrem(key, str(receipt))
            await pipe.execute()

    def _keys(self, key_id: str) -> list[str]:
        """`key_id`'s counts and pending marks, one hash tag (its own braces escaped: an empty or cut tag would hash
        each whole name to its own slot, refused CROSSSLOT on Redis Cluster, as `<prefix><key>[:pending]` were)."""
        tagged = self.prefix + "{" + key_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") + "}"
        return [tagged, tagged + PENDING_SUFFIX]

    async def unreachable(self) -> str | None:
        """None when Redis answers a PING within `PING_TIMEOUT` seconds, else why not (`REDIS_DOWN`, for /readyz)."""
        from redis.exceptions import RedisError

        try:
            await asyncio.wait_for(self.client.ping(), PING_TIMEOUT)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:  # 3.10: asyncio's, not the built-in one
            self._outage.failed(one_line(exc))
            return REDIS_DOWN
        self._outage.answered()
        return None

    async def close(self) -> None:
        await self.client.aclose()


def check_redis(url: str) -> None:
    """Connect once and PING: `ServiceConfigError` naming AUTOMASK_REDIS_URL (without its user and password) and the
    fix when the URL cannot be read or Redis cannot be reached (a start-up check, as `Store.check_connection` is for
    the database)."""
    import redis

    from automask.server.redis_client import redis_shown, sync_redis

    try:
        with sync_redis(url, PING_TIMEOUT) as client:  # a URL it cannot read: refused, quoting none of it
            client.ping()
    except redis.RedisError as exc:
        reason = " ".join(str(exc).split()).rstrip(".")  # redis-py's end with one
        raise ServiceConfigError(
            f"Cannot connect to Redis at {redis_shown(url)}: {reason}. Check AUTOMASK_REDIS_URL, and that the Redis "
            "server is running and lets this client in."
        ) from None


def retry_headers(now: float, reset_at: float) -> dict[str, str]:
    """The headers every 429 carries: `Retry-After` (whole seconds from `now`, at least 1) and
    `x-rate-limit-reset-at-utc` (`reset_at`, UNIX seconds, as ISO 8601 UTC: `2025-01-31T12:00:05Z`)."""
    stamp = datetime.fromtimestamp(reset_at, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"Retry-After": str(max(1, math.ceil(reset_at - now))), "x-rate-limit-reset-at-utc": stamp}


LIMIT_LABELS = {"failed authentications": "failed_auth"}
"""The metrics label (`ApiError.limit`) of a rate limit's `what`, where it differs."""


class RateLimited(ApiError):
    """A 429 of a rate limit; `pending`: how many of the key's counts were pending (`RedisRateLimiter.hit`) when it
    was refused: room may come free once they end."""

    def __init__(self, message: str, headers: dict[str, str], limit: str, pending: int = 0) -> None:
        super().__init__(429, message, headers, limit=limit)
        self.pending = pending


def rate_limited(limit: int, now: float, reset_at: float, what: str = "requests", pending: int = 0) -> RateLimited:
    """The 429 for a key over its `limit` of `what` per minute (`retry_headers`)."""
    headers = retry_headers(now, reset_at)
    return RateLimited(
        f"Rate limit of {limit} {what} per minute reached; retry after {headers['Retry-After']} s "
        f"({headers['x-rate-limit-reset-at-utc']}).",
        headers,
        LIMIT_LABELS.get(what, what),
        pending,
    )
