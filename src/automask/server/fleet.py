"""The fleet dispatcher: API nodes queue every request on RabbitMQ (Celery) to `automask worker` processes.

Messages carry ids, never image bytes: a v2 job is stored in the database first, then its id is published to
`automask.v2.<model>`; a v1 request is put in Redis (request and image, with a TTL), its id published to
`automask.v1.<model>`, and the API node awaits the worker's `Outcome` on a Redis list (`BLPOP`, on the event loop
through `redis.asyncio`). Queues are RabbitMQ quorum queues with a delivery limit; workers ack late and reject a
task whose worker died, so RabbitMQ hands it to another worker at once. Which models are served, and by whom,
comes from the workers' heartbeats in the database.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue as threadqueue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from automask.errors import ModelNotAvailableError, ServiceConfigError, UnknownModelError
from automask.models import CATALOGUE, EMBEDDED
from automask.routing import open_vocabulary, routed
from automask.server import nodes
from automask.server.bounded import bounded_unless_request
from automask.server.config import ServerSettings
from automask.server.deployment import FLEET
from automask.server.errors import ApiError
from automask.server.execute import Outcome
from automask.server.limits import REDIS_TIMEOUT
from automask.server.runner import default_name, inference_timeout
from automask.server.schemas import MaskRequest
from automask.server.served import ModelEntry, answering, naming_alternatives, unknown_model
from automask.server.store import Store
from automask.settings import Settings

log = logging.getLogger("automask.server")

TIME_LIMIT_MARGIN = 30.0
"""Seconds a task may run past the request timeout before Celery kills it (a hung model, a poison input)."""
V1_TTL_MARGIN = 60.0
"""Seconds the v1 hand-off keys outlive the request timeout in Redis."""
NODES_CACHE_SECONDS = 1.0
DELIVERY_LIMIT = 20
"""Deliveries of one message before RabbitMQ drops it (`x-delivery-limit`, RabbitMQ 4's default): a safety net
for when the database cannot count starts. `max_job_attempts` ends a poison job first (counted in the database
across messages); set above `DELIVERY_LIMIT - 2`, a message dropped at the limit leaves its job PROCESSING on a dead
worker, which the sweeper hands out again in a new message. A constant, not derived from `max_job_attempts`: a queue
keeps the arguments it was created with, whatever a later node declares, so a setting there would hold only for the
node that happened to declare the queue first."""
BROKER_DOWN = "The server's request queue is unreachable right now; try again in a few seconds."
PROBE_AFTER = 5.0
"""While RabbitMQ is known to block publishers, one send every this many seconds goes through to find out whether it
still does (its `connection.unblocked` notice never comes if the blocked connection was lost meanwhile)."""
PUBLISH_THREADS = 4
"""Threads an API node sends messages to RabbitMQ from (each send the broker holds up holds one)."""
T = TypeVar("T")


class BrokerBlocked(Exception):
    """RabbitMQ blocks this node's publishes (a memory or disk alarm): a send now would wait until it clears."""


class Publisher:
    """`threads` daemon threads that run sends to RabbitMQ, so that a send the broker holds up (while a memory or
    disk alarm lasts, RabbitMQ stops reading from publishing connections, and closing one waits too) holds one of
    them: never a thread of asyncio's default executor (the node's database calls), never the process's exit.

    `blocked` is RabbitMQ's reason while it blocks this node's connections (its `connection.blocked` notice, read
    by whichever send is waiting on the connection), else None: sends fail at once with `BrokerBlocked` meanwhile,
    but for one every `PROBE_AFTER` seconds, which finds out; any send that succeeds clears it."""

    def __init__(self, threads: int = PUBLISH_THREADS) -> None:
        self.blocked: str | None = None
        self._probed_at = 0.0
        self._lock = threading.Lock()
        self._work: threadqueue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = threadqueue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"automask-publish-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, send: Callable[[], T]) -> Future[T]:
        """Run `send` in a publish thread; its future can be cancelled until a thread takes it. While RabbitMQ
        blocks publishers it fails with `BrokerBlocked` without running."""
        future: Future[T] = Future()
        self._work.put((future, send))
        return future

    def on_blocked(self, reason: str) -> None:
        with self._lock:
            self.blocked, self._probed_at = reason or "blocked", time.monotonic()
        log.warning("RabbitMQ blocks publishing (%s): queueing requests fails until it clears", reason)

    def on_unblocked(self) -> None:
        if self.blocked is not None:
            log.warning("RabbitMQ takes messages again")
        self.blocked = None

    def close(self) -> None:
        """Let the threads end once they are free (a send still held up stays so: its thread is a daemon)."""
        for _ in self._threads:
            self._work.put(None)

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, send = item
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before a thread was free
            try:
                if (reason := self._refusal()) is not None:
                    raise BrokerBlocked(reason)
                result = send()
            except BaseException as exc:  # noqa: BLE001 - the caller gets it through the future
                future.set_exception(exc)
            else:
                self.on_unblocked()  # a send went through: whatever blocked us is over
                future.set_result(result)

    def _refusal(self) -> str | None:
        """Why a send must fail at once (RabbitMQ blocks publishers), or None to send: also when blocked, once
        every `PROBE_AFTER` seconds."""
        with self._lock:
            if self.blocked is None:
                return None
            if time.monotonic() - self._probed_at < PROBE_AFTER:
                return self.blocked
            self._probed_at = time.monotonic()
            return None


def queue_name(kind: str, model: str) -> str:
    """The queue of `kind` ("v1" or "v2") requests for `model`."""
    return f"automask.{kind}.{model}"


def v1_keys(request_id: str, tagged: bool = True) -> dict[str, str]:
    """The Redis keys of one v1 hand-off: the request, its image, the outcome list, the cancel flag, and how many
    times a worker started it: `automask:v1:{<id>}:<part>`, one hash tag, so that each transaction over them touches
    one Redis Cluster slot. Not `tagged`: the names of releases before (`automask:v1:<id>:<part>`, refused CROSSSLOT
    on a cluster), whose API nodes may still hand requests off during a rolling upgrade (`worker_v1.answer_v1`)."""
    base = f"automask:v1:{{{request_id}}}:" if tagged else f"automask:v1:{request_id}:"
    return {name: base + name for name in ("request", "image", "outcome", "cancel", "starts")}


def make_celery(broker_url: str, server: ServerSettings) -> Any:
    """The Celery app that API nodes publish with and workers consume with (same settings on both sides)."""
    from celery import Celery

    app = Celery("automask", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=server.timeout + TIME_LIMIT_MARGIN,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_detect_quorum_queues=True,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # a model's progress bars are not warnings
        # A lost connection to RabbitMQ leaves running tasks running (Celery's default would terminate their pool
        # processes: every worker gone from the nodes table, 503s until it reconnects, each running job re-run with
        # an attempt burnt). Their messages come back once it is up again; the copies are dropped (a v2 job is
        # claimed only from a dead node, a v1 request is gone once answered), so nothing runs twice.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def queue(kind: str, model: str) -> Any:
    """The quorum queue of `kind` requests for `model`, declared identically by every publisher and worker: its
    arguments depend on no setting, since RabbitMQ keeps those a queue was created with and ignores another
    node's (see `DELIVERY_LIMIT`)."""
    from kombu import Exchange, Queue

    name = queue_name(kind, model)
    args = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
    # a topic exchange (routing keys are exact queue names): Celery's native delayed delivery accepts it
    return Queue(name, Exchange("automask", type="topic"), routing_key=name, queue_arguments=args, durable=True)


def require_fleet_settings(settings: Settings) -> None:
    """A broker needs Redis (the v1 hand-off) and a shared database (workers have data folders of their own)."""
    if not settings.redis_url:
        raise ServiceConfigError(
            "AUTOMASK_BROKER_URL is set but AUTOMASK_REDIS_URL is not: API nodes and workers hand v1 requests "
            "over through Redis. Set AUTOMASK_REDIS_URL=redis://HOST:PORT/0."
        )
    if not settings.database_url:
        raise ServiceConfigError(
            "AUTOMASK_BROKER_URL is set but AUTOMASK_DATABASE_URL is not: API nodes and workers must share one "
            "database. Set AUTOMASK_DATABASE_URL=postgresql://USER:PASS@HOST:PORT/DB."
        )


class CeleryDispatcher:
    """Queues every request to workers; loads no model."""

    deployment = FLEET

    def __init__(self, settings: Settings, server: ServerSettings, store: Store) -> None:
        require_fleet_settings(settings)
        from automask.server.redis_client import async_redis

        self.settings, self.server, self.store = settings, server, store
        url = str(settings.redis_url)  # its clients first: a URL redis-py cannot read is refused, starting no thread
        # the hand-off's writes: a Redis that stopped answering is a 503 within seconds, not at the request's timeout
        self.redis = async_redis(url, REDIS_TIMEOUT, REDIS_TIMEOUT)
        # BLPOP waits up to `timeout` for the outcome: its socket must wait longer; one per connection at most
        self._waiting = async_redis(url, server.timeout + 10, REDIS_TIMEOUT, server.max_connections)
        self.app = make_celery(str(settings.broker_url), server)
        self.publisher = Publisher()
        # py-amqp calls these on RabbitMQ's connection.blocked / connection.unblocked notices
        self.app.conf.broker_transport_options = {
            **self.app.conf.broker_transport_options,
            "on_blocked": self.publisher.on_blocked,
            "on_unblocked": self.publisher.on_unblocked,
        }
        self._configured_default = default_name(settings) if settings.model else None
        self._nodes: list[nodes.Node] = []
        self._nodes_at = 0.0

    async def start(self) -> None:
        await asyncio.to_thread(self._live_workers)

    async def stop(self, deadline: float | None = None) -> None:
        """Close the connections (an API node runs no jobs: nothing to wait for)."""
        await self.redis.aclose()
        await self._waiting.aclose()
        self.publisher.close()
        if self.publisher.blocked is None:
            self.app.close()  # closing a blocked connection would wait for RabbitMQ, as its sends do

    def drain(self) -> None:
        """Nothing: an API node runs no jobs."""

    def cut(self) -> None:
        """Nothing: an API node runs no jobs."""

    @property
    def node(self) -> str | None:
        return None  # an API node runs no jobs

    # -- which models the fleet serves ------------------------------------------------------------------

    def _live_workers(self) -> list[nodes.Node]:
        if time.monotonic() - self._nodes_at > NODES_CACHE_SECONDS:
            with bounded_unless_request():  # a frozen database: a 503 in seconds, not a thread held until it thaws
                self._nodes = [n for n in nodes.live(self.store, self.server.node_ttl) if n.kind == "worker"]
            self._nodes_at = time.monotonic()
        return self._nodes

    def _served(self) -> list[str]:
        seen: dict[str, None] = {}
        for node in self._live_workers():
            seen.update(dict.fromkeys(node.models))
        return list(seen)

    @property
    def default(self) -> str:
        """AUTOMASK_MODEL's name when set, else the default most live workers announce, else any served model."""
        if self._configured_default:
            return self._configured_default
        announced = collections.Counter(n.default_model for n in self._live_workers() if n.default_model)
        if announced:
            return announced.most_common(1)[0][0]
        served = self._served()
        return served[0] if served else EMBEDDED

    def check(self, model: str | None, targets: Sequence[str] = ()) -> str:
        default = self.default
        name = model or default
        served = self._served()
        if name in served:
            if name == EMBEDDED:  # its workers answer its vocabulary only (any other model answers any word)
                routed(list(targets), embedded=True, open_vocab=False, alternatives=lambda: open_vocabulary(served))
            return name
        if name != default and name not in CATALOGUE:
            raise unknown_model(name, self.models())
        if not served and model is None and not self._configured_default:  # no worker to say which model is default
            raise ModelNotAvailableError(
                "No worker is running right now; start one with: automask worker --model NAME (its model becomes "
                "the default; AUTOMASK_MODEL on the API nodes names it)"
            )
        missing = ModelNotAvailableError(
            f"No worker serves the model {name!r} right now; start one with: automask worker --model {name}"
        )
        raise naming_alternatives(missing, answering(self.models(), name, targets))

    def readiness(self) -> str | None:
        try:
            self.check(None)
        except (ModelNotAvailableError, UnknownModelError) as exc:
            return exc.message
        return None

    def models(self) -> list[ModelEntry]:
        default = self.default
        names = self._served()
        ordered = [default] + [n for n in names if n != default] if default in names else names
        entries = []
        for name in ordered:
            spec = CATALOGUE.get(name)
            entries.append(
                ModelEntry(
                    name=name,
                    backend=spec.backend if spec else None,
                    description=spec.description if spec else "A worker's model (a local folder).",
                    default=name == default,
                    loaded=True,
                )
            )
        return entries

    # -- running -----------------------------------------------------------------------------------------

    def serving(self) -> list[str]:
        return self._served()  # a job of another model would wait in its queue, copies piling up at each sweep

    def publish(self, job_id: str, model: str | None) -> Future[None]:
        """Send job `job_id` to its model's v2 queue from a publish thread; the future is done once RabbitMQ
        confirmed the message (or failed: the broker is down or blocks publishers)."""
        return self.publisher.submit(lambda: self._send_v2(job_id, model))

    def _send_v2(self, job_id: str, model: str | None) -> None:
        name = model or self.default
        self.app.send_task("automask.v2", args=[job_id], queue=queue("v2", name))

    async def prepare(self, model: str) -> None:
        """Nothing: workers load their models before they take requests (`check` finds a live one)."""

    async def run_v1(self, request: MaskRequest, model: str, request_id: str) -> Outcome:
        rid = uuid.uuid4().hex
        keys = v1_keys(rid)
        ttl = int(self.server.timeout + V1_TTL_MARGIN)
        deadline = self.store.now() + self.server.timeout  # the fleet's clock: the worker compares it with its own
        local_deadline = time.monotonic() + self.server.timeout
        body, upload = request.stored()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys["request"], body, ex=ttl)
            if upload is not None:
                pipe.set(keys["image"], upload, ex=ttl)
            await pipe.execute()
        send = lambda: self.app.send_task(  # noqa: E731
            "automask.v1",
            args=[rid, model, deadline, request_id],
            queue=queue("v1", model),
            expiration=self.server.timeout,  # seconds: RabbitMQ drops it after (no clock of ours compared)
        )
        try:
            try:  # within the request's time: RabbitMQ may hold a send up for as long as an alarm lasts
                sent = asyncio.wrap_future(self.publisher.submit(send))
                await asyncio.wait_for(sent, max(0.01, local_deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - kombu's connection/channel errors, blocked, or too slow
                log.error("could not queue v1 request %s: %s", request_id, repr(exc))
                await self._cancel(keys, ttl)
                raise ApiError(503, BROKER_DOWN, {"Retry-After": "5"}) from None
            got = await self._wait_outcome(keys["outcome"], max(0.01, local_deadline - time.monotonic()))
        except asyncio.CancelledError:  # the client left: a worker skips it, or stops it at its next stage boundary
            await asyncio.shield(self._cancel(keys, ttl))
            raise
        if got is None:
            await self._cancel(keys, ttl)
            raise inference_timeout(self.server.timeout)
        data = got[1]
        return Outcome.loads(data if isinstance(data, bytes) else data.encode())

    async def _wait_outcome(self, key: str, left: float) -> Any:
        """BLPOP `key` for `left` seconds (None: no outcome by then). A Redis that froze meanwhile does not answer:
        raise `redis.exceptions.TimeoutError` (503) `REDIS_TIMEOUT` seconds past `left`, not at the socket's own
        timeout (the request timeout + 10 s, which a BLPOP needs)."""
        from redis.exceptions import TimeoutError as RedisTimeout

        try:
            return await asyncio.wait_for(self._waiting.blpop([key], timeout=left), left + REDIS_TIMEOUT)
        except asyncio.TimeoutError:
            raise RedisTimeout(f"no answer to BLPOP within {left + REDIS_TIMEOUT:.0f} s") from None

    async def _cancel(self, keys: dict[str, str], ttl: int) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(keys["cancel"], b"1", ex=ttl)
                pipe.delete(keys["request"], keys["image"], keys["starts"])
                await pipe.execute()
        except Exception:  # Redis is down: the hand-off keys expire on their own
            log.warning("could not cancel a v1 hand-off", exc_info=True)
