"""Sending to RabbitMQ while it blocks publishers (a memory alarm on a real broker): every send is bounded in time,
held up in the API node's own publish threads, and the broker is usable again once the alarm clears."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import InternalError, NotFound

from automask.errors import InferenceTimeoutError
from automask.server.config import ServerSettings
from automask.server.errors import ApiError
from automask.server.fleet import BROKER_DOWN, DELIVERY_LIMIT, BrokerBlocked, CeleryDispatcher, make_celery, queue
from automask.server.jobs import Jobs
from automask.server.schemas import MaskRequest
from automask.server.store import Store
from automask.server.sweeper import Sweeper
from automask.settings import Settings
from services import RabbitMQServer

ALARM_LIMIT = 30.0
"""Seconds after which the alarm is cleared whatever happens: a test that hangs on a send fails instead."""


def alarms(mq: RabbitMQServer) -> str:
    return mq.ctl("eval", "rabbit_alarm:get_alarms().")


@contextlib.contextmanager
def memory_alarm(mq: RabbitMQServer) -> Iterator[None]:
    """RabbitMQ's memory alarm for the block (a 1-byte high watermark): it blocks every publishing connection."""
    mq.ctl("set_vm_memory_high_watermark", "absolute", "1")
    safety = threading.Timer(ALARM_LIMIT, mq.ctl, ("set_vm_memory_high_watermark", "0.4"))
    safety.start()
    try:
        deadline = time.monotonic() + 10
        while "memory" not in alarms(mq):
            assert time.monotonic() < deadline, "RabbitMQ raised no memory alarm"
            time.sleep(0.1)
        yield
    finally:
        safety.cancel()
        mq.ctl("set_vm_memory_high_watermark", "0.4")
        deadline = time.monotonic() + 10
        while "memory" in alarms(mq) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture()
def dispatcher(
    rabbitmq_service: RabbitMQServer, rabbitmq_vhost_url: str, redis_db: str, tmp_path: Path
) -> Iterator[CeleryDispatcher]:
    """An API node's dispatcher on this test's vhost (v1 timeout 2 s), its database a SQLite file."""
    store = Store.in_data_dir(tmp_path / "data")
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=store.url.render_as_string(hide_password=False),
        broker_url=rabbitmq_vhost_url,
        redis_url=redis_db,
    )
    node = CeleryDispatcher(settings, ServerSettings(timeout=2.0), store)
    node.publish("warm", "m").result(timeout=20)  # connected, queue declared: the alarm finds a publisher
    yield node
    node.publisher.close()  # (`stop` closes its Redis client on the loop the test ran it on)
    node.app.close()
    store.close()


def request_of() -> MaskRequest:
    return MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "sofa"})


def test_sends_are_bounded_while_rabbitmq_blocks_publishers(
    rabbitmq_service: RabbitMQServer, dispatcher: CeleryDispatcher
) -> None:
    """Before: `send_task` waited for as long as the alarm lasted, in a thread of asyncio's default executor: a v1
    call outlived its timeout (and a stuck call each held a thread the node's database calls need)."""

    async def v1() -> tuple[float, ApiError]:
        started = time.monotonic()
        with pytest.raises(ApiError) as caught:
            await asyncio.wait_for(dispatcher.run_v1(request_of(), "m", "req-1"), ALARM_LIMIT - 10)
        return time.monotonic() - started, caught.value

    with memory_alarm(rabbitmq_service):
        default_threads = {t.name for t in threading.enumerate()}
        waited, error = asyncio.run(v1())
        assert (error.status, error.message) == (503, BROKER_DOWN)
        assert 1.9 <= waited < 3.0  # the request's 2 s, then a 503 (its hold is given back by the route, as before)
        assert dispatcher.publisher.blocked is not None  # RabbitMQ said so while the first send waited
        held_up = [t.name for t in threading.enumerate() if t.name not in default_threads and t.is_alive()]
        assert not [name for name in held_up if not name.startswith("automask-publish")]
        started = time.monotonic()
        with pytest.raises(BrokerBlocked):  # known blocked: a send fails at once, holding no thread
            dispatcher.publish("job-1", "m").result(timeout=5)
        assert time.monotonic() - started < 1.0
    dispatcher.publish("job-2", "m").result(timeout=20)  # once the alarm clears, sends are confirmed again
    assert dispatcher.publisher.blocked is None


def test_a_sweep_under_a_memory_alarm_ends_within_its_publish_bound(
    rabbitmq_service: RabbitMQServer, dispatcher: CeleryDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the sweeper's publish never returned while the alarm lasted (and held the fleet's sweeper lock)."""
    from automask.server import sweeper as sweeper_module

    monkeypatch.setattr(sweeper_module, "PUBLISH_TIMEOUT", 2.0)
    monkeypatch.setattr(dispatcher, "serving", lambda: None)  # no worker runs here: hand out every model's jobs
    jobs = Jobs(dispatcher.store)
    job_id = jobs.submit(None, request_of(), charge=False, model="m")
    sweeper = Sweeper(dispatcher.store, jobs, dispatcher, ServerSettings(republish_after=0.1))
    time.sleep(0.2)
    with memory_alarm(rabbitmq_service):
        started = time.monotonic()
        first = sweeper.sweep()
        second = sweeper.sweep()  # the alarm is known by now: nothing is sent, nothing waits
        assert time.monotonic() - started < 2.0 + 1.5
        assert first["republished"] == second["republished"] == 0
    time.sleep(0.2)
    assert sweeper.sweep()["republished"] == 1  # the job is handed out once RabbitMQ takes messages again
    assert jobs.get(job_id).status == "QUEUED"  # type: ignore[union-attr]


def test_every_node_declares_the_queue_arguments_rabbitmq_keeps(
    rabbitmq_service: RabbitMQServer, rabbitmq_vhost_url: str
) -> None:
    """Before: the delivery limit was `max_job_attempts` + 2, but RabbitMQ keeps the arguments a queue was created
    with and silently ignores another node's, so a node with another setting had a limit it never got."""
    vhost = rabbitmq_vhost_url.rsplit("/", 1)[1]
    for attempts in (3, 5):  # two nodes, set differently, publishing to one queue
        app = make_celery(rabbitmq_vhost_url, ServerSettings(max_job_attempts=attempts))
        try:
            app.send_task("automask.v2", args=["job"], queue=queue("v2", "m"))
        finally:
            app.close()
        kept = rabbitmq_service.ctl("list_queues", "-p", vhost, "name", "arguments")
        assert '{"x-delivery-limit",20}' in kept.replace(" ", ""), kept
        assert queue("v2", "m").queue_arguments["x-delivery-limit"] == DELIVERY_LIMIT == 20


def test_a_v1_message_carries_a_ttl_for_rabbitmq_and_no_time_of_this_hosts(dispatcher: CeleryDispatcher) -> None:
    """A v1 hand-off expires in RabbitMQ after the request's timeout (a per-message TTL: the broker's clock alone)
    and carries no absolute time by the API node's clock. Before: Celery's `expires`, which also put that absolute
    time in the message for the worker to compare with its own clock: a worker whose clock ran ahead by the
    timeout dropped every v1 request (a 504 for each)."""

    def take() -> Any:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            not_up_yet = contextlib.suppress(NotFound, InternalError)  # the queue is declared by the first send
            with dispatcher.app.connection_for_write() as conn, not_up_yet:
                message = conn.default_channel.basic_get(queue("v1", "m").name, no_ack=True)
                if message is not None:
                    return message
            time.sleep(0.05)
        raise AssertionError("no v1 message was queued")

    async def v1_and_its_message() -> Any:
        call = asyncio.ensure_future(dispatcher.run_v1(request_of(), "m", "req-ttl"))
        message = await asyncio.to_thread(take)
        with pytest.raises(InferenceTimeoutError):  # no worker: the 2 s timeout (a 504)
            await call
        return message

    message = asyncio.run(v1_and_its_message())
    assert message.properties["expiration"] == "2000"  # milliseconds: the request's timeout
    assert message.headers.get("expires") is None
