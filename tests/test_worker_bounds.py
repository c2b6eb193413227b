"""A Celery pool process on a frozen PostgreSQL (SIGSTOP: no network timeout fires): registering its node and storing
a large result give up in time for the task to be handed back before Celery's hard time limit kills the process
(which acknowledges the message: the job then waits for the sweeper); the redelivery completes the job, charged once.
A node that stops gives up removing its row within its bound too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from automask.pipeline import MaskGenerator
from automask.server import bounded, keys, nodes
from automask.server.config import ServerSettings
from automask.server.jobs import COMPLETED, PROCESSING, QUEUED, Jobs
from automask.server.runner import Runner
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import FakeBackend, wait_for
from test_job_bounds import completing, frozen_at, holding, served, submitted, timed

pytest.importorskip("celery")
__all__ = ["served"]  # the fixture, shared with tests/test_job_bounds.py
EVERY_ENGINE = SimpleNamespace(engine=Engine)
"""`frozen_at`'s target for statements of any engine: a pool process's own, made inside the worker."""


def task(redelivered: bool) -> Any:
    """A Celery task as `v2_task` reads it (`bind=True`)."""
    return SimpleNamespace(request=SimpleNamespace(delivery_info={"redelivered": redelivered}))


@pytest.fixture()
def hard_limit(monkeypatch: pytest.MonkeyPatch) -> float:
    """Celery's hard time limit on a task (timeout 2 s + 6 s), the worker handing back 3 s before it: seconds."""
    from automask.server import worker

    monkeypatch.setattr(worker, "TIME_LIMIT_MARGIN", 6.0)
    monkeypatch.setattr(worker, "HAND_BACK_MARGIN", 3.0)
    monkeypatch.setattr(worker, "RETRY_PAUSE", 0.2)
    return 2.0 + 6.0


@pytest.fixture()
def pool_process(
    served: tuple[Any, Store, Jobs, Runner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """`automask worker`'s state in this process, as a pool process has it before its first task, on the served
    PostgreSQL; its node unregistered at the end."""
    from automask.server import worker

    pg = served[0]
    settings = Settings(
        data_dir=tmp_path / "worker", database_url=pg.url, broker_url="amqp://u:p@127.0.0.1:1//",
        redis_url="redis://127.0.0.1:1/0",
    )  # fmt: skip

    def generator() -> MaskGenerator:
        return MaskGenerator(FakeBackend(), settings)

    server = ServerSettings(timeout=2.0, max_job_attempts=3, node_ttl=3.0)
    state = worker._Worker(settings, server, "fake-gradient", "fake-gradient", generator)
    monkeypatch.setattr(worker, "_WORKER", state)
    yield worker
    if state.process is not None:
        state.process.heartbeat.stop()
        state.process.runner.close()
        state.process.jobs.store.close()


def test_a_first_task_whose_node_a_frozen_server_never_registers_is_handed_back_in_time(
    served: tuple[Any, Store, Jobs, Runner], pool_process: Any, hard_limit: float
) -> None:
    """Before: a pool process registered its node (when it started, else on its first task) with no bound: on a
    frozen PostgreSQL it waited until the server thawed, past Celery's hard time limit (or, at its start, Celery's
    600 s wait for a pool process). Now the registration gives up within `JOB_QUERY_TIMEOUT`, the task is handed
    back before the hard limit with the job untouched (QUEUED, never started), the node is registered by its
    heartbeat once the server answers, and the redelivery completes the job, charged once."""
    from celery.exceptions import Reject

    pg, store, jobs, _ = served
    key_id, job_id = submitted(store, jobs)
    with frozen_at(pg, EVERY_ENGINE, lambda s: s.startswith("DELETE FROM nodes"), 12.0):
        handed, took = timed(lambda: pool_process.v2_task(task(False), job_id))
    assert isinstance(handed, Reject) and handed.requeue, handed  # before: COMPLETED once thawed, 12 s later
    assert took < hard_limit, took
    job = jobs.get(job_id)
    assert job is not None and (job.status, job.started) == (QUEUED, False) and holding(store, job_id)
    assert wait_for(store.ping, 30)
    node = pool_process._WORKER.process.node
    assert wait_for(lambda: node in [n.id for n in nodes.live(store, 3.0)], 10)  # by its heartbeat
    assert pool_process.v2_task(task(True), job_id) == COMPLETED
    assert keys.balance(store, key_id) == 4 and not holding(store, job_id)  # charged once


def test_a_large_results_completion_on_a_frozen_server_is_handed_back_before_the_hard_limit(
    served: tuple[Any, Store, Jobs, Runner], pool_process: Any, hard_limit: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a completion's bound grows by the bytes it stores (`sized`: about 25 s for 15 MB of instance masks),
    and a task that had used its time gave up on a frozen PostgreSQL past Celery's hard time limit, which killed the
    pool process (the message acknowledged; the job left for the sweeper). Now every statement of the run ends
    `HAND_BACK_MARGIN` before the hard limit (`bounded.until`): the worker hands the task back itself, and the
    redelivery takes its job over (PROCESSING on its own node) and completes it, charged once."""
    from celery.exceptions import Reject

    pg, store, jobs, _ = served
    key_id, job_id = submitted(store, jobs)
    pool_process._process()  # started (node registered) before the server froze
    monkeypatch.setattr(bounded, "SLOWEST_TRANSFER", 10.0)  # the result's bytes: a completion bound of minutes
    with frozen_at(pg, store_of(pool_process), completing, 12.0):
        handed, took = timed(lambda: pool_process.v2_task(task(False), job_id))
    assert isinstance(handed, Reject) and handed.requeue, handed  # before: COMPLETED once thawed, 12 s later
    assert took < hard_limit, took
    assert wait_for(store.ping, 30)
    job = jobs.get(job_id)
    assert job is not None and (job.status, job.has_result) == (PROCESSING, False) and holding(store, job_id)
    monkeypatch.setattr(bounded, "SLOWEST_TRANSFER", 1_000_000.0)
    started = time.monotonic()
    assert pool_process.v2_task(task(True), job_id) == COMPLETED and time.monotonic() - started < hard_limit
    assert keys.balance(store, key_id) == 4 and not holding(store, job_id)  # charged once


def store_of(worker: Any) -> Store:
    """The pool process's own store (its statements are the ones frozen)."""
    return worker._WORKER.process.jobs.store  # type: ignore[no-any-return]


def test_a_node_that_stops_on_a_frozen_server_stops_within_its_bound(
    served: tuple[Any, Store, Jobs, Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a node that stopped (a worker's pool process at a warm shutdown, a server at its stop) removed its row
    with no bound: a frozen PostgreSQL held it, and so the worker's shutdown, until the server thawed. Now it gives
    up after `UNREGISTER_TIMEOUT` with a warning; its row stays, and the node is dead once its TTL has passed."""
    pg, store, _, _ = served
    monkeypatch.setattr(nodes, "UNREGISTER_TIMEOUT", 1.0, raising=False)
    beat = nodes.Heartbeat(store, "worker-x", "worker", ["fake-gradient"], None, interval=0.2, dead_after=1.0)
    beat.start()
    with frozen_at(pg, store, lambda s: s.startswith("DELETE FROM nodes"), 10.0):
        _, took = timed(beat.stop)
    assert took < 7, took  # the beat's join (5 s at most) and the bound; before: 10 s, the thaw
    assert wait_for(store.ping, 30)
    assert wait_for(lambda: "worker-x" not in [n.id for n in nodes.live(store, 1.0)], 5)  # dead by its TTL
