"""The fleet's rate-limit counts on Redis Cluster: every key one script or transaction touches shares one hash slot
(a `{...}` hash tag), so none is refused CROSSSLOT. The server is a one-node cluster holding every slot, which checks
slots as any cluster does."""

from __future__ import annotations

import asyncio

import pytest

from automask.server.auth_limit import FailedAuth
from automask.server.errors import ApiError
from automask.server.limits import RateLimited, RedisRateLimiter
from services import redis_server

pytestmark = pytest.mark.services


@pytest.mark.parametrize("key_id", ["key-1", "auth-fail:192.0.2.1", "auth-fail:2001:db8::/64", "}odd{key"])
def test_counts_and_pending_marks_work_on_redis_cluster(key_id: str) -> None:
    """Before: the sliding-window script touched `automask:rate:K` and `automask:rate:K:pending`, which hash to
    different slots: on Redis Cluster every count was refused (CROSSSLOT, a 503), as was taking one back (MULTI)."""

    async def run(url: str) -> None:
        limiter = RedisRateLimiter(url)
        try:
            receipt = await limiter.hit(key_id, 1, pending=30)  # before: CROSSSLOT
            assert receipt is not None
            with pytest.raises(RateLimited) as refused:
                await limiter.hit(key_id, 1, pending=30)
            assert refused.value.pending == 1
            await limiter.settle(key_id, receipt)
            await limiter.uncount(key_id, receipt)  # MULTI over both keys
            assert await limiter.hit(key_id, 1) is not None
            auth = FailedAuth(limiter, 1)  # the failed-authentication limit, as a fleet counts it
            attempt = await auth.admit("2001:db8:1::/64", "am_x_guess")
            await auth.failed(attempt, "am_x_guess")
            with pytest.raises(ApiError) as locked_out:
                await auth.admit("2001:db8:1::/64", "am_x_other")
            assert locked_out.value.status == 429
        finally:
            await limiter.close()

    with redis_server(cluster=True) as rd:
        asyncio.run(run(rd.url))
