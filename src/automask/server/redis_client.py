"""The service's Redis clients: `sync_redis` for one-off calls (start-up checks, `automask keys revoke`), which
refuses a URL redis-py cannot read without quoting it, and `redis.asyncio` ones (`async_redis`): a call that finds
every connection of its client busy waits for one to come free, rather than fail.

redis-py's asyncio pool opens 100 connections at most and fails the next call at once (`MaxConnectionsError`, a
`RedisError`, which a request answers 503 "shared state unreachable"), so a node with more than that many requests
using Redis at once (a burst counted by the rate limits, v1 requests waiting for their outcome) failed some of them
with Redis healthy.
"""

from __future__ import annotations

import re
from typing import Any

from automask.errors import ServiceConfigError

UNREADABLE_REDIS_URL = (
    "AUTOMASK_REDIS_URL is not a Redis URL: write it as redis://[USER:PASS@]HOST:PORT/DB, with any / : @ % in USER or "
    "PASS percent-encoded (/ as %2F)."
)
"""The refusal of a URL redis-py cannot read (a password with an unencoded `/`): its reason would quote a piece."""
REDIS_CONNECTIONS = 100
"""Connections one client opens at most, by default (redis-py's default)."""


def async_redis(url: str, timeout: float | None, wait: float, connections: int = REDIS_CONNECTIONS) -> Any:
    """A `redis.asyncio.Redis` of `url`: each call's socket waits `timeout` seconds at most (None: for ever), its
    connect and a call waiting for a free connection among `connections` `wait` seconds at most (then a
    `redis.exceptions.ConnectionError`). `ServiceConfigError` (`UNREADABLE_REDIS_URL`) for a URL it cannot read."""
    import redis.asyncio as aioredis

    try:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=connections, timeout=wait, socket_timeout=timeout, socket_connect_timeout=wait
        )
    except ValueError:
        raise ServiceConfigError(UNREADABLE_REDIS_URL) from None
    return aioredis.Redis.from_pool(pool)


def redis_shown(url: str) -> str:
    """`url` for messages: its host, port and database (or socket path), never a user and password, however written
    (one with an unencoded `/` or `@` is not where a URL parser looks for it), nor its query (redis-py reads
    `?password=` too). Where an `@` and a `?` or `#` leave it unclear which is the password's (`redis://:p?w@host`,
    `redis://host/0?password=p@w`), no place is shown."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(not a URL)"
    after_user = re.split("[?#]", rest.rpartition("@")[2], maxsplit=1)[0]
    before_query = re.split("[?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    return scheme + sep + (after_user if after_user == before_query else "(its address not shown)")


def sync_redis(url: str, timeout: float) -> Any:
    """A `redis.Redis` of `url`, each call and connect `timeout` seconds at most; `ServiceConfigError`
    (`UNREADABLE_REDIS_URL`) for a URL redis-py cannot read."""
    import redis

    try:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError:
        raise ServiceConfigError(UNREADABLE_REDIS_URL) from None
