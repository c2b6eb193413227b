"""The fleet's rate-limit counts on Redis Cluster: every key one script or transaction touches shares one hash slot
(a `{...}` hash tag), so none is refused CROSSSLOT. The server is a one-node cluster holding every slot, which checks
slots as any cluster does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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


def _v1_parts(tmp_path: Path, redis_url: str) -> tuple[Any, Any, Any, Any, Any]:
    """An API node's `CeleryDispatcher` whose v1 sends are answered at once by a worker's `answer_v1` (no RabbitMQ),
    through the Redis at `redis_url`; a v1 request; and the worker's Redis client, store, runner and settings."""
    import redis

    from automask.pipeline import MaskGenerator
    from automask.server import fleet
    from automask.server.config import ServerSettings
    from automask.server.runner import Runner
    from automask.server.store import Store
    from automask.server.worker_v1 import answer_v1
    from automask.settings import Settings
    from server_helpers import FakeBackend

    store = Store.in_data_dir(tmp_path / "data")
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=store.url.render_as_string(hide_password=False),
        broker_url="amqp://guest:guest@127.0.0.1:9//",  # never reached: the send below answers
        redis_url=redis_url,
    )
    server = ServerSettings(timeout=30)
    dispatcher = fleet.CeleryDispatcher(settings, server, store)
    runner = Runner(settings, server, MaskGenerator(FakeBackend(), settings))
    worker_redis = redis.Redis.from_url(redis_url, socket_timeout=5)

    def send_task(name: str, args: list[Any], **_: Any) -> None:  # the worker takes it at once
        answer_v1(worker_redis, store, runner, server, args[0], args[1], args[2], args[3])

    dispatcher.app.send_task = send_task
    return dispatcher, store, runner, worker_redis, server


def test_a_v1_hand_off_works_on_redis_cluster(tmp_path: Path) -> None:
    """Before: a v1 hand-off's keys (`automask:v1:<id>:request`, `:image`, `:outcome`, ...) hashed to different slots:
    on Redis Cluster the API node's MULTI that stores the request was refused CROSSSLOT (every v1 request a 503), as
    was the worker's MGET. Now they share one hash tag, `automask:v1:{<id>}:<part>`."""
    import base64

    import numpy as np

    from automask.server.schemas import MaskRequest
    from server_helpers import png_bytes

    image = base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode()
    with redis_server(cluster=True) as rd:
        dispatcher, store, runner, worker_redis, _ = _v1_parts(tmp_path, rd.url)

        async def hand_off() -> Any:
            try:
                return await dispatcher.run_v1(MaskRequest(image=image, prompt="cup"), "fake-gradient", "r-1")
            finally:
                await dispatcher.stop()

        try:
            outcome = asyncio.run(hand_off())  # before: ClusterCrossSlotError
            assert outcome.status == 200 and outcome.png.startswith(b"\x89PNG"), outcome.status
        finally:
            runner.close()
            worker_redis.close()
            store.close()


def test_a_new_worker_answers_a_hand_off_an_older_api_node_wrote(tmp_path: Path, redis_db: str) -> None:
    """A rolling upgrade (workers first): a v1 request an API node of the previous release stored under its untagged
    names (`automask:v1:<id>:<part>`) is answered by an upgraded worker under those same names, where that node
    waits for it."""
    import base64

    import numpy as np

    from automask.server.execute import Outcome
    from automask.server.schemas import MaskRequest
    from automask.server.worker_v1 import answer_v1
    from server_helpers import png_bytes

    image = base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode()
    body, upload = MaskRequest(image=image, prompt="cup").stored()
    dispatcher, store, runner, worker_redis, server = _v1_parts(tmp_path, redis_db)
    try:
        worker_redis.set("automask:v1:old1:request", body, ex=60)  # as the previous release wrote it
        if upload is not None:
            worker_redis.set("automask:v1:old1:image", upload, ex=60)
        answer_v1(worker_redis, store, runner, server, "old1", "fake-gradient", store.now() + 30, "r-2")
        got = worker_redis.blpop(["automask:v1:old1:outcome"], timeout=5)
        assert got is not None and Outcome.loads(got[1]).status == 200
        assert not worker_redis.exists("automask:v1:old1:request")  # answered: the request is gone
    finally:
        asyncio.run(dispatcher.stop())
        runner.close()
        worker_redis.close()
        store.close()
