"""`automask worker`: a Celery worker that loads one model and takes that model's queues.

Each pool process loads the model once when it starts, then announces itself in the shared database as a node of
its own (its model, a heartbeat from a thread of that process): a pool process that dies stops beating on its own,
and the node guard on a job (complete, fail, release) tells two runs in one worker apart. A v2 task runs
`execute_job` by id (a redelivered message may take over a job whose pool process died); a v1 task reads its request
from Redis, computes the `Outcome` and pushes it back for the API node.

The worker claims its database for a fleet at start-up (`deployment.Guard`), and each pool process reads the claim
again at every heartbeat: once the database serves a single server (`automask db deployment single --force`), the
process logs why, hands back any task it is given (unrun, to the queue) and asks the worker for a warm shutdown
(running tasks finish, prefetched messages go back to RabbitMQ); the worker then exits with the reason
(`ServiceConfigError`: `automask worker` exits 9), and a restart is refused until the database serves a fleet again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from sqlalchemy.exc import SQLAlchemyError

from automask.errors import ServiceConfigError
from automask.pipeline import MaskGenerator
from automask.routing import plan_models
from automask.server import bounded as bounds
from automask.server import deployment, fleet, metrics, nodes
from automask.server.bounded import bounded, job_bound
from automask.server.broker_check import check_broker
from automask.server.config import ServerSettings
from automask.server.deployment import FLEET, Guard
from automask.server.execute import execute_job
from automask.server.fleet import (
    TIME_LIMIT_MARGIN,
    queue,
)
from automask.server.jobs import Jobs
from automask.server.limits import check_redis
from automask.server.runner import Runner, default_name
from automask.server.store import Store
from automask.server.worker_v1 import answer_v1
from automask.settings import Settings

log = logging.getLogger("automask.worker")
RETRY_PAUSE = 2.0
"""Seconds between a worker's tries to reach the database again after a task failed on it."""
HAND_BACK_MARGIN = 10.0
"""Seconds before Celery's hard time limit by which a task waiting for the database hands itself back."""
RETIRING = 75
"""The exit code of a pool process that leaves after its answer because its model hung (`_leave_if_hung`)."""
UNREGISTERED = " (its node not registered yet: the database does not answer; its next heartbeat registers it)"
STOP_GRACE = 5.0
"""Seconds a pool process waits for a call it gave up on (past its time limit) to stop at its next stage boundary
or model layer before it takes the model for hung and replaces itself."""


@dataclass
class _Process:
    """What one pool process holds: its node id and heartbeat, its own database engine, Redis client and loaded
    model."""

    node: str
    heartbeat: nodes.Heartbeat
    jobs: Jobs
    runner: Runner
    redis: Any
    guard: Guard


@dataclass
class _Worker:
    """What the worker's main process decided before forking its pool (inherited by every pool process)."""

    settings: Settings
    server: ServerSettings
    model: str
    default: str | None
    generator_factory: Callable[[], MaskGenerator] | None
    process: _Process | None = None
    metrics_inbox: str | None = None
    """Where pool processes send their metrics (`metrics.Inbox`), when the worker serves them (--metrics-port)."""


_WORKER: _Worker | None = None


def _process(*, registered: bool = True) -> _Process:
    """This pool process's state, created (and the model loaded) on first use (when the process starts). With
    `registered`, its node is registered in the database too, as a v2 run needs (else the sweeper takes its jobs for
    orphans): a node whose registration failed when the process started (the database did not answer) is registered
    now, within `job_bound` (and the task's deadline: `bounds.until`), raising the database's errors."""
    assert _WORKER is not None, "not inside automask worker"
    if _WORKER.process is None:
        _WORKER.process = _new_process(_WORKER)
    proc = _WORKER.process
    if registered and not proc.heartbeat.registered:
        with job_bound():
            proc.heartbeat.register()
    return proc


def _new_process(w: _Worker) -> _Process:
    """Load the model, connect, register the node and start its heartbeat. Its database calls wait
    `JOB_QUERY_TIMEOUT` seconds in all: a database that does not answer (down, frozen) leaves the node unregistered,
    to its next beat (or its first v2 task), rather than holding the process until it answers."""
    import redis

    if w.metrics_inbox:
        metrics.forward_to(w.metrics_inbox)  # its runs and charges are served by the main process
    generator = w.generator_factory() if w.generator_factory else None
    runner = Runner(w.settings, w.server, generator)
    runner.generator(w.model)  # load once, before the first task
    store = Store(str(w.settings.database_url))
    node = nodes.new_node_id("worker")  # this process's pid: its jobs are its own
    beat, ttl = w.server.beat, w.server.node_ttl
    guard = Guard(store, FLEET, worker=True)
    watch = functools.partial(_watch, guard, os.getppid())
    heartbeat = nodes.Heartbeat(store, node, "worker", [w.model], w.default, interval=beat, dead_after=ttl, watch=watch)
    with bounds.until(time.monotonic() + bounds.JOB_QUERY_TIMEOUT), job_bound():
        store.read_clock()  # its first beat and claim are on the fleet's clock
        heartbeat.start(retry=True)  # registers the node: API nodes count the model as served
    # bounded as the API nodes' hand-off is: a frozen Redis fails a v1 task in seconds, not at Celery's hard limit
    timeout = fleet.REDIS_TIMEOUT
    client = redis.Redis.from_url(str(w.settings.redis_url), socket_timeout=timeout, socket_connect_timeout=timeout)
    log.info("pool process %s ready with model %s%s", node, w.model, "" if heartbeat.registered else UNREGISTERED)
    return _Process(node, heartbeat, Jobs(store), runner, client, guard)


def _watch(guard: Guard, main_pid: int) -> None:
    """At each heartbeat of a pool process: once the database no longer serves a fleet (`Guard.holds` logs why),
    ask the worker's main process (`main_pid`, this process's parent when it started) for a warm shutdown
    (SIGTERM), once; never another process that adopted this one after the main process died."""
    if guard.refusal is None and not guard.holds():
        log.error("pool process %d: %s; shutting the worker down", os.getpid(), guard.refusal)
        if os.getppid() == main_pid:
            os.kill(main_pid, signal.SIGTERM)


def _refuse_if_switched(proc: _Process) -> None:
    """Hand a task back, unrun, once this worker's database serves a single server (the worker is stopping)."""
    if proc.guard.refusal is not None:
        from celery.exceptions import Reject

        raise Reject(proc.guard.refusal, requeue=True)


def _process_exits() -> None:
    """A pool process stops (recycled, or the worker stops): its node goes at once, not `node_ttl` later."""
    if _WORKER is not None and _WORKER.process is not None:
        _WORKER.process.heartbeat.stop()


def v2_task(task: Any, job_id: str) -> str | None:
    """Run v2 job `job_id`. A redelivered message may take the job over from PROCESSING, only from a dead node.

    A redelivered message whose job still runs on a live node is acknowledged and dropped: a duplicate, or the
    message of a process killed so recently that its heartbeat has not expired yet; the sweeper puts such a job
    back in the queue once its node is dead (`Jobs.orphaned`)."""
    assert _WORKER is not None
    server = _WORKER.server
    # Celery's hard time limit (timeout + TIME_LIMIT_MARGIN from the task's start) kills this process, and the message
    # is acknowledged, not handed back: every statement of the run (a large result's completion too) ends
    # HAND_BACK_MARGIN before it, leaving time to put the job back and hand the message back
    hand_back_at = time.monotonic() + server.timeout + TIME_LIMIT_MARGIN - HAND_BACK_MARGIN
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    proc: _Process | None = None
    try:
        with bounds.until(hand_back_at):
            proc = _process()  # registers its node if the process start could not (the database did not answer)
            _refuse_if_switched(proc)
            status = execute_job(
                proc.jobs, proc.runner, job_id, proc.node, max_attempts=server.max_job_attempts,
                takeover_ttl=server.node_ttl if redelivered else None, timeout=server.timeout,
            )  # fmt: skip
    except SQLAlchemyError as exc:  # the database is unreachable: hand the message back, after a pause
        _hand_back(proc or _WORKER.process, job_id, exc, hand_back_at)
    if status is None and redelivered:
        log.info("v2 job %s: redelivered, left to the node running it (or finished)", job_id)
    _leave_if_hung(proc)
    return status


def _hand_back(proc: _Process | None, job_id: str, exc: SQLAlchemyError, hand_back_at: float) -> NoReturn:
    """v2 job `job_id`'s run in `proc` failed on the database: wait for it to answer (until `hand_back_at`, a monotonic
    time before Celery's hard limit), put the job back if `proc` holds it (any process may take it, else it waits for
    `Jobs.orphaned`), and hand the message back to the queue (`Reject`)."""
    from celery.exceptions import Reject

    assert _WORKER is not None and proc is not None  # created: only its registration or a statement failed
    log.warning("v2 job %s: database error (%s); returning it to the queue once it answers", job_id, exc)
    _wait_for_database(proc.jobs.store, min(_WORKER.server.timeout, hand_back_at - time.monotonic()))
    with contextlib.suppress(SQLAlchemyError), bounded(HAND_BACK_MARGIN / 2):
        proc.jobs.release(job_id, proc.node)
    raise Reject(str(exc), requeue=True) from None


def _wait_for_database(store: Store, limit: float) -> None:
    """Wait until the database answers again, `limit` seconds at most (below Celery's hard time limit). Each hand
    back counts towards the queue's delivery limit (RabbitMQ drops the message past it): handing a task back every
    few seconds of an outage would lose it within a minute; this way it lasts `DELIVERY_LIMIT` × `limit`."""
    deadline = time.monotonic() + limit
    while True:
        time.sleep(max(0.0, min(RETRY_PAUSE, deadline - time.monotonic())))
        with bounded(max(0.5, deadline - time.monotonic())):  # a frozen PostgreSQL holds no ping past the deadline
            if time.monotonic() >= deadline or store.ping():
                return


def v1_task(task: Any, rid: str, model: str, deadline: float, request_id: str) -> None:
    """Answer v1 hand-off `rid` unless its client left or its deadline passed.

    The run's time limit is what is left to `deadline` (the fleet's clock, `Store.now`: past it the API node has
    answered 504 already), at most this worker's own `timeout`. It stops at its next stage boundary or model layer once
    the API node cancels the hand-off (the client left, or it answered 504), and then pushes no outcome: nobody waits
    for one (nor for one finished past the deadline). A Redis that does not answer (`fleet.REDIS_TIMEOUT` seconds per
    call) ends the task with one error line: the API node, which gets no outcome, answers and charges nothing; this
    process takes the next task."""
    from redis.exceptions import RedisError

    assert _WORKER is not None
    proc = _process(registered=False)  # answering needs no node: an unregistered one is registered by its beat
    _refuse_if_switched(proc)
    try:
        answer_v1(proc.redis, proc.jobs.store, proc.runner, _WORKER.server, rid, model, deadline, request_id)
    except RedisError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        log.error("v1 request %s: Redis (AUTOMASK_REDIS_URL) does not answer (%s); left unanswered", request_id, reason)
    _leave_if_hung(proc)


def _leave_if_hung(proc: _Process) -> None:
    """After a task's answer is stored: a call given up on (past its time limit) stops at its next stage boundary or
    model layer; wait `STOP_GRACE` seconds for it. One still running after that (a hung model) holds this process's
    inference thread, and every later task here would time out too. Leave: `_Request` acknowledges the message, and
    Celery's pool starts a fresh process in this one's place."""
    if proc.runner.overdue and not proc.runner.wait_overdue(STOP_GRACE):
        log.error("pool process %s: an inference ran past its time limit and still runs; replacing it", proc.node)
        raise SystemExit(RETIRING)


def _request_class() -> type:
    """Celery's request, but a pool process that leaves on purpose (`_leave_if_hung`) after its answer has its
    message acknowledged (not handed back as a worker lost: there is nothing left to run). Either way, when a pool
    process died mid-task, and when Celery killed one at the task's hard time limit, `metrics` counts the process
    lost."""
    from billiard.exceptions import WorkerLostError
    from celery.worker import state
    from celery.worker.request import Request
    from celery.worker.state import task_ready

    class _Request(Request):
        def on_timeout(self, soft: bool, timeout: float) -> None:
            if not soft and not state.should_terminate:  # the pool kills the process running it (not reported lost)
                metrics.pool_process_lost("time_limit")
            super().on_timeout(soft, timeout)

        def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
            exc = getattr(exc_info.exception, "exc", exc_info.exception)
            if isinstance(exc, SystemExit) and exc.code == RETIRING:
                metrics.pool_process_lost("hung")
                task_ready(self)
                self.acknowledge()
                return
            if isinstance(exc, WorkerLostError):  # (in this, the main process: counted even though the pool's died)
                metrics.pool_process_lost("killed")
            super().on_failure(exc_info, send_failed_event, return_ok)

    return _Request


def run_worker(
    settings: Settings,
    server: ServerSettings,
    *,
    model: str | None = None,
    concurrency: int = 1,
    loglevel: str = "info",
    generator_factory: Callable[[], MaskGenerator] | None = None,
) -> None:
    """Run a worker until it is stopped (SIGTERM: warm shutdown, running tasks finish), or until its database
    serves a single server (then the same warm shutdown, and `ServiceConfigError` saying why)."""
    global _WORKER
    fleet.require_fleet_settings(settings)
    store = Store.from_settings(settings, create=False)  # an older schema: refuse, say `automask db migrate`
    try:
        nodes.refuse_mixed(store, "server")
        Guard(store, FLEET).claim()  # a database serving a single server: refuse, naming the fix
    finally:
        store.close()
    check_redis(str(settings.redis_url))  # unreachable: refuse to start, naming the setting (as the database)
    check_broker(str(settings.broker_url))
    if model:
        settings = settings.model_copy(update={"model": model})
    if generator_factory is None:
        plan_models(settings.model, settings)  # the model is installed here (else: the command that installs it)
    name = default_name(settings, generator_factory() if generator_factory else None)
    _WORKER = _Worker(settings, server, name, None if model else name, generator_factory)
    with _served_metrics(settings) as inbox:
        _WORKER.metrics_inbox = inbox
        _run_celery(settings, server, name, concurrency, loglevel)


@contextlib.contextmanager
def _served_metrics(settings: Settings) -> Iterator[str | None]:
    """When this process serves metrics (`automask worker --metrics-port`): an `Inbox` for the pool processes' records
    (its path), and the fleet's v2 jobs by status read at each scrape; None otherwise."""
    if not metrics.enabled():
        yield None
        return
    inbox, store = metrics.Inbox(), Store(str(settings.database_url))
    # a pool process forked after a scrape must leave this process's pooled connections alone (SQLAlchemy's advice)
    os.register_at_fork(after_in_child=functools.partial(store.engine.dispose, close=False))
    unwatch = metrics.watch(store)
    try:
        yield inbox.path
    finally:
        unwatch()
        inbox.close()
        store.close()


def _run_celery(settings: Settings, server: ServerSettings, name: str, concurrency: int, loglevel: str) -> None:
    """Run the Celery worker for model `name` until it stops; exit with its code, or `ServiceConfigError` when it
    stopped because its database now serves a single server."""
    app = fleet.make_celery(str(settings.broker_url), server)
    request = _request_class()
    app.task(name="automask.v2", bind=True, Request=request)(v2_task)
    app.task(name="automask.v1", bind=True, Request=request)(v1_task)
    queues = [queue("v1", name), queue("v2", name)]
    app.conf.task_queues = queues
    app.conf.worker_proc_alive_timeout = 600.0  # a pool process loads its model before it reports alive

    from celery.signals import worker_process_init, worker_process_shutdown

    worker_process_init.connect(
        lambda **_: _process(registered=False), weak=False
    )  # (failed: its heartbeat registers it)
    worker_process_shutdown.connect(lambda **_: _process_exits(), weak=False)
    worker = app.Worker(
        queues=[q.name for q in queues],
        concurrency=concurrency,
        pool="prefork",
        loglevel=loglevel.upper(),
        hostname=f"{nodes.new_node_id('worker')}@automask",
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
        optimization="fair",
    )
    worker.start()
    _refuse_if_not_fleet(settings)
    code = getattr(worker, "exitcode", 0)
    if code:
        raise SystemExit(code)


def _refuse_if_not_fleet(settings: Settings) -> None:
    """After the worker stopped: `ServiceConfigError` if it stopped because its database now serves a single
    server (a pool process saw it), so that `automask worker` exits saying why (9), not as if asked to stop."""
    store = Store(str(settings.database_url))
    try:
        found = deployment.current(store)
    except SQLAlchemyError:  # unreachable now: the worker stopped for another reason (a restart says which)
        log.warning("could not read the database's deployment after stopping", exc_info=True)
        return
    finally:
        store.close()
    if found is not None and found != FLEET:
        raise ServiceConfigError(deployment.worker_refusal(found))
