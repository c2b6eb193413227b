"""One `automask worker` (tests/fleet_worker.py) on real PostgreSQL, RabbitMQ and Redis, watched from its pool
processes' side: each is a node of its own, and one whose model hung is replaced by a fresh one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from automask.errors import InferenceTimeoutError
from automask.server import deployment, nodes
from automask.server import keys as keystore
from automask.server.config import ServerSettings
from automask.server.fleet import CeleryDispatcher
from automask.server.jobs import CANCELLED, CANCELLED_RUNNING, COMPLETED, Jobs
from automask.server.migrations import migrate
from automask.server.runner import inference_timeout
from automask.server.schemas import MaskRequest
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import png_bytes, wait_for

pytest.importorskip("celery")
pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
MODEL = "fake-gradient"
FAST = {"AUTOMASK_SERVER_NODE_TTL": "2", "AUTOMASK_SERVER_HEARTBEAT_INTERVAL": "0.3", "AUTOMASK_SERVER_TIMEOUT": "2"}


@dataclass
class Services:
    """The servers a worker needs, as settings (for the test's own dispatcher) and as its environment."""

    settings: Settings
    env: dict[str, str]
    store: Store
    log: Path


@pytest.fixture()
def services(postgres_db: str, redis_db: str, rabbitmq_vhost_url: str, tmp_path: Path) -> Iterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "api", database_url=postgres_db, broker_url=rabbitmq_vhost_url, redis_url=redis_db
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUTOMASK_")},
        **FAST,
        "AUTOMASK_DATA_DIR": str(tmp_path / "worker"),
        "AUTOMASK_DATABASE_URL": postgres_db,
        "AUTOMASK_BROKER_URL": rabbitmq_vhost_url,
        "AUTOMASK_REDIS_URL": redis_db,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    store = Store(postgres_db)
    migrate(store)
    yield Services(settings, env, store, tmp_path / "worker.log")
    store.close()


@contextlib.contextmanager
def worker(services: Services, concurrency: int) -> Iterator[subprocess.Popen[bytes]]:
    """`automask worker` with `concurrency` pool processes, stopped (SIGTERM: warm shutdown) at the end."""
    env = {**services.env, "FLEET_CONCURRENCY": str(concurrency)}
    with services.log.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(TESTS / "fleet_worker.py")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its pool processes in its group: none outlives the test
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a pool process left behind


def live_workers(store: Store) -> dict[str, int]:
    """Live worker nodes by id, with the pid their id names (`worker-<host>-<pid>-<random>`)."""
    found = [n.id for n in nodes.live(store, float(FAST["AUTOMASK_SERVER_NODE_TTL"])) if n.kind == "worker"]
    return {node: int(node.rsplit("-", 2)[1]) for node in found}


def two_live(store: Store, without: str = "") -> dict[str, int] | None:
    """`live_workers` once there are two, `without` among them."""
    found = live_workers(store)
    return found if len(found) == 2 and without not in found else None


def pool_pids(proc: subprocess.Popen[bytes]) -> set[int]:
    """The pids of the worker's pool processes (its children)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return {int(pid) for pid in children}


def test_each_pool_process_is_a_node_of_its_own_that_dies_with_it(services: Services) -> None:
    """Before: the worker's main process beat for one node id that all its pool processes shared, so two runs in
    one worker looked alike to the node guard, and a pool process killed mid-run stayed "alive"."""
    with worker(services, concurrency=2) as proc:
        first = wait_for(lambda: two_live(services.store), 60)
        wait_for(lambda: "@automask ready." in services.log.read_text(), 30)  # consuming: a lost process is replaced
        assert set(first.values()) == pool_pids(proc), services.log.read_text()  # one node per pool process
        killed, pid = next(iter(first.items()))
        os.kill(pid, signal.SIGKILL)
        # its heartbeat stops with it; Celery starts a fresh pool process, a new node
        after = wait_for(lambda: two_live(services.store, without=killed), 30)
        assert len(set(after) - set(first)) == 1 and set(after.values()) == pool_pids(proc)
    with services.store.read() as conn:  # a warm shutdown removes its nodes at once (the killed one's is stale)
        assert [r.id for r in conn.execute(nodes.nodes_table.select())] == [killed], services.log.read_text()


def test_a_pool_process_whose_model_hung_is_replaced_after_its_answer(services: Services) -> None:
    """Before: an inference past `timeout` was answered 504 but its thread ran on in the pool process's one
    inference thread, so every later request to that process waited behind it and was answered 504 too."""
    with worker(services, concurrency=1) as proc:
        wait_for(lambda: "@automask ready." in services.log.read_text(), 60)
        (hung_pid,) = pool_pids(proc)
        asyncio.run(hang_then_ask(services))
        assert hung_pid not in pool_pids(proc)
    log = services.log.read_text()
    assert "WorkerLostError" not in log and log.count("ran past its time limit") == 2, log  # acknowledged, not lost
    with services.store.read() as conn:  # each process that left removed its node
        assert conn.execute(nodes.nodes_table.select()).all() == [], log


async def hang_then_ask(services: Services) -> None:
    """A v1 request that hangs the model, then one that must be answered; the same with v2 jobs."""
    dispatcher = CeleryDispatcher(services.settings, ServerSettings(timeout=20), services.store)
    jobs = Jobs(services.store)
    try:
        hung = await dispatcher.run_v1(request_of("hang"), MODEL, "req-hang")
        assert (hung.status, hung.error) == (504, inference_timeout(2).message)  # answered before its process went
        started = time.monotonic()
        answered = await dispatcher.run_v1(request_of("sofa"), MODEL, "req-sofa")
        assert answered.status == 200 and time.monotonic() - started < 15, services.log.read_text()
        v2_hung = jobs.submit(None, request_of("hang"), charge=False)
        dispatcher.publish(v2_hung, MODEL)
        v2_next = jobs.submit(None, request_of("sofa"), charge=False)
        dispatcher.publish(v2_next, MODEL)
        await asyncio.to_thread(wait_for, lambda: jobs.get(v2_next).status == "COMPLETED", 30)  # type: ignore[union-attr]
        job = jobs.get(v2_hung)
        assert job is not None and (job.status, job.error) == ("FAILED", inference_timeout(2).message)
    finally:
        await dispatcher.stop()


Scenario = Callable[[Services, Path], Coroutine[Any, Any, None]]
"""An async test body given the services and the folder of its staged prompts (`tests/fleet_worker.py`)."""


def run_staged(services: Services, tmp_path: Path, scenario: Scenario) -> str:
    """Run `scenario` (its staged prompts wait in the folder it is given) against a worker with one pool process;
    check that each of its runs stopped at a stage boundary (the process was never replaced); return the log."""
    stages = tmp_path / "stages"
    stages.mkdir()
    services.env["FLEET_STAGES"] = str(stages)
    with worker(services, concurrency=1) as proc:
        wait_for(lambda: "@automask ready." in services.log.read_text(), 60)
        (pid,) = pool_pids(proc)
        asyncio.run(scenario(services, stages))
        assert pool_pids(proc) == {pid}  # each run stopped at its next stage boundary: nothing to replace
    return services.log.read_text()


def test_a_v1_run_nobody_waits_for_stops_in_the_worker_and_pushes_no_outcome(
    services: Services, tmp_path: Path
) -> None:
    """Before: a worker checked the cancel flag only before it started a v1 run: once started, a run whose client
    had left (or whose API node had answered 504) computed to the end and pushed an outcome nobody read; and a run
    past its time limit made the pool process replace itself."""
    log = run_staged(services, tmp_path, leave_mid_run)
    assert log.count("stopped: nobody waits for its answer") == 2 and "ran past its time limit" not in log, log


async def leave_mid_run(services: Services, stages: Path) -> None:
    """A client that leaves while its run is in the backend's score; then a request whose API node gives up
    (its timeout, 1.5 s, shorter than the worker's 2 s: the run's limit is the time left to the request's deadline)."""
    dispatcher = CeleryDispatcher(services.settings, ServerSettings(timeout=20), services.store)
    hasty = CeleryDispatcher(services.settings, ServerSettings(timeout=1.5), services.store)
    log = services.log
    try:
        left = asyncio.create_task(dispatcher.run_v1(request_of("staged-left"), MODEL, "req-left"))
        await asyncio.to_thread(wait_for, (stages / "left.scoring").exists, 30)
        left.cancel()  # the client leaves: the API node cancels the hand-off
        with contextlib.suppress(asyncio.CancelledError):
            await left
        (stages / "left.go").touch()
        await asyncio.to_thread(wait_for, lambda: "stopped: nobody waits" in log.read_text(), 30)
        assert await hand_off_keys(dispatcher) == ["cancel"]  # no outcome pushed; the request is gone

        started = time.monotonic()
        with pytest.raises(InferenceTimeoutError):  # answered 504 by the API node
            await hasty.run_v1(request_of("staged-late"), MODEL, "req-late")
        assert 1.4 < time.monotonic() - started < 5 and (stages / "late.scoring").exists()
        (stages / "late.go").touch()
        await asyncio.to_thread(wait_for, lambda: log.read_text().count("stopped: nobody waits") == 2, 30)
        assert await hand_off_keys(dispatcher) == ["cancel", "cancel"]
    finally:
        await dispatcher.stop()
        await hasty.stop()


async def hand_off_keys(dispatcher: CeleryDispatcher) -> list[str]:
    """The kinds of v1 hand-off keys left in Redis (`automask:v1:<id>:<kind>`), sorted."""
    found = await dispatcher.redis.keys("automask:v1:*")
    return sorted(key.decode().rsplit(":", 1)[1] for key in found)


def request_of(prompt: str) -> MaskRequest:
    image = base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode()
    return MaskRequest.model_validate({"image": image, "prompt": prompt})


def test_a_v2_job_cancelled_while_it_runs_stops_in_the_worker_and_is_not_charged(
    services: Services, tmp_path: Path
) -> None:
    """Before: a cancel left a running job alone; its worker ran it to the end and charged it."""
    log = run_staged(services, tmp_path, cancel_mid_run)
    assert log.count("stopped: it was cancelled") == 1 and "ran past its time limit" not in log, log


async def cancel_mid_run(services: Services, stages: Path) -> None:
    """A v2 job cancelled (as the route does, from another node) while its run is in the backend's score."""
    dispatcher = CeleryDispatcher(services.settings, ServerSettings(timeout=20), services.store)
    jobs = Jobs(services.store)
    key, _ = keystore.create_key(services.store, credits=2)
    try:
        job_id = jobs.submit(key.id, request_of("staged-cancel"), charge=True, model=MODEL)
        dispatcher.publish(job_id, MODEL)
        await asyncio.to_thread(wait_for, (stages / "cancel.scoring").exists, 30)
        assert jobs.cancel(job_id) is True
        (stages / "cancel.go").touch()
        await asyncio.to_thread(wait_for, lambda: "stopped: it was cancelled" in services.log.read_text(), 30)
        job = jobs.get(job_id)
        assert job is not None and (job.status, job.error, job.has_result) == (CANCELLED, CANCELLED_RUNNING, False)
        assert keystore.balance(services.store, key.id) == 2  # given back once, never charged
        after = jobs.submit(key.id, request_of("sofa"), charge=True, model=MODEL)
        dispatcher.publish(after, MODEL)
        await asyncio.to_thread(wait_for, lambda: jobs.get(after).status == COMPLETED, 30)  # type: ignore[union-attr]
        assert keystore.balance(services.store, key.id) == 1
    finally:
        await dispatcher.stop()


def test_a_running_worker_stops_once_its_database_serves_a_single_server(services: Services) -> None:
    """Before: a worker checked the deployment only at start-up; after `automask db deployment single --force` it
    went on taking the queue's tasks for a database that a single server now runs."""
    with worker(services, concurrency=2) as proc:
        wait_for(lambda: len(live_workers(services.store)) == 2, 60)
        wait_for(lambda: "@automask ready." in services.log.read_text(), 30)
        assert deployment.current(services.store) == deployment.FLEET
        deployment.record(services.store, deployment.SINGLE, force=True)
        assert proc.wait(timeout=30) == 9  # a warm shutdown, then the reason, as `automask worker` exits
    log = services.log.read_text()
    assert "shutting the worker down" in log and "This worker stops taking tasks" in log, log
    assert "automask db deployment fleet --force" in log
    with services.store.read() as conn:  # its pool processes left cleanly: their nodes are gone
        assert conn.execute(nodes.nodes_table.select()).all() == [], log


def test_sigterm_during_a_task_lets_it_finish_and_leaves_the_queue_to_the_next_worker(
    services: Services, tmp_path: Path
) -> None:
    """`automask worker` sent SIGTERM while a v2 job runs (a warm shutdown, as its --help and deploy/compose.yaml's
    stop_grace_period say): the running job completes, charged once, its message acknowledged; the worker exits 0
    with its node removed; a job queued meanwhile is not started here, and the next worker runs it."""
    stages = tmp_path / "stages"
    stages.mkdir()
    services.env |= {"FLEET_STAGES": str(stages), "AUTOMASK_SERVER_TIMEOUT": "20"}
    jobs = Jobs(services.store)
    key, _ = keystore.create_key(services.store, credits=5)
    dispatcher = CeleryDispatcher(services.settings, ServerSettings(timeout=20), services.store)
    try:
        with worker(services, concurrency=1) as proc:
            wait_for(lambda: "@automask ready." in services.log.read_text(), 60)
            running = jobs.submit(key.id, request_of("staged-term"), charge=True, model=MODEL)
            dispatcher.publish(running, MODEL).result(timeout=30)
            assert wait_for((stages / "term.scoring").exists, 30), services.log.read_text()
            proc.send_signal(signal.SIGTERM)
            waiting = jobs.submit(key.id, request_of("sofa"), charge=True, model=MODEL)
            dispatcher.publish(waiting, MODEL).result(timeout=30)
            time.sleep(1.0)  # the worker, stopping, takes no new task
            (stages / "term.go").touch()
            assert proc.wait(timeout=30) == 0, services.log.read_text()
        done, queued = jobs.get(running), jobs.get(waiting)
        assert done is not None and (done.status, done.has_result) == (COMPLETED, True), services.log.read_text()
        assert queued is not None and (queued.status, queued.started) == ("QUEUED", False)
        assert keystore.balance(services.store, key.id) == 3  # one charged, one held
        with services.store.read() as conn:
            assert conn.execute(nodes.nodes_table.select()).all() == []  # its node left with it
        with worker(services, concurrency=1):  # the next worker takes the message handed back
            assert wait_for(lambda: jobs.get(waiting).status == COMPLETED, 60), services.log.read_text()  # type: ignore[union-attr]
        assert keystore.balance(services.store, key.id) == 3 and jobs.get(running).status == COMPLETED  # type: ignore[union-attr]
    finally:
        asyncio.run(dispatcher.stop())
