"""The service's `redis.asyncio` clients (`async_redis`): a call that finds every connection of its client busy waits
for one to come free, rather than fail.

redis-py's asyncio pool opens 100 connections at most and fails the next call at once (`MaxConnectionsError`, a
`RedisError`, which a request answers 503 "shared state unreachable"), so a node with more than that many requests
using Redis at once (a burst counted by the rate limits, v1 requests waiting for their outcome) failed some of them
with Redis healthy.
"""

from __future__ import annotations

from typing import Any

REDIS_CONNECTIONS = 100
"""Connections one client opens at most, by default (redis-py's default)."""


def async_redis(url: str, timeout: float | None, wait: float, connections: int = REDIS_CONNECTIONS) -> Any:
    """A `redis.asyncio.Redis` of `url`: each call's socket waits `timeout` seconds at most (None: for ever), its
    connect and a call waiting for a free connection among `connections` `wait` seconds at most (then a
    `redis.exceptions.ConnectionError`)."""
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=connections, timeout=wait, socket_timeout=timeout, socket_connect_timeout=wait
    )
    return aioredis.Redis.from_pool(pool)
