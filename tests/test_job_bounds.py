"""A v2 job's run on a frozen PostgreSQL (SIGSTOP: its host's kernel still acknowledges every packet, so no network
timeout fires): each statement of the run (its claim, its checks, its completion) gives up within its bound
(`JOB_QUERY_TIMEOUT`, longer by the upload or result it carries), and the job is then retried by the machinery that
handles any database error: nothing lost, nothing charged twice, nothing refunded for a result that was computed."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from automask.pipeline import MaskGenerator
from automask.server import bounded, keys
from automask.server.config import ServerSettings
from automask.server.execute import execute_job, still_held
from automask.server.jobs import COMPLETED, FAILED, LONGEST_RUN_MARGIN, PROCESSING, QUEUED, Jobs
from automask.server.runner import Runner
from automask.server.schemas import MaskRequest
from automask.server.store import Store, holds_table
from automask.settings import Settings
from server_helpers import FakeBackend, png_bytes, wait_for
from service_procs import process_tree, signal_all
from services import postgres_server

MODEL = "fake-gradient"
IMAGE = png_bytes(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8))


@pytest.fixture()
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Store, Jobs, Runner]]:
    """A throwaway PostgreSQL server (frozen by the test), its store and jobs, and a runner with a fake model; each
    statement of a job's run bounded by 1 s."""
    monkeypatch.setattr(bounded, "JOB_QUERY_TIMEOUT", 1.0, raising=False)
    settings = Settings(data_dir=tmp_path / "models")
    runner = Runner(settings, ServerSettings(timeout=20.0), MaskGenerator(FakeBackend(), settings))
    with postgres_server() as pg:
        store = Store.at_schema(pg.url, create=True)
        try:
            yield pg, store, Jobs(store), runner
        finally:
            runner.close()
            store.close()


@contextmanager
def frozen_at(pg: Any, store: Store, sent: Callable[[str], bool], seconds: float) -> Iterator[None]:
    """Within the block, the first statement for which `sent` is true freezes the server (SIGSTOP of its process
    tree) as it is sent, for `seconds`; thawed at the latest when the block ends."""
    stopped: list[list[int]] = []
    thawed = threading.Event()

    def thaw() -> None:
        if stopped and not thawed.is_set():
            thawed.set()
            signal_all(stopped[0], signal.SIGCONT)

    def freeze(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not stopped and sent(statement):
            stopped.append(process_tree(pg._main_pid()))
            signal_all(stopped[0], signal.SIGSTOP)
            threading.Timer(seconds, thaw).start()

    event.listen(store.engine, "before_cursor_execute", freeze)
    try:
        yield
    finally:
        event.remove(store.engine, "before_cursor_execute", freeze)
        thaw()


def completing(statement: str) -> bool:
    return statement.startswith("UPDATE jobs") and "result=" in statement


def submitted(store: Store, jobs: Jobs, key_id: str | None = None) -> tuple[str, str]:
    """A key (`key_id`, else a new one with 5 credits), and a new job of it with an uploaded image (a credit held)."""
    key_id = key_id or keys.create_key(store, credits=5)[0].id
    request = MaskRequest.model_validate({"image": IMAGE, "prompt": "sofa"})
    return key_id, jobs.submit(key_id, request, charge=True, model=MODEL)


def holding(store: Store, job_id: str) -> bool:
    """Whether job `job_id` holds its key's credit (taken at submit, neither charged nor given back yet)."""
    with store.read() as conn:
        return conn.execute(select(holds_table.c.id).where(holds_table.c.id == job_id)).first() is not None


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """`call()`'s result (or the exception it raised) and the seconds it took."""
    started = time.monotonic()
    try:
        got = call()
    except Exception as exc:  # noqa: BLE001 (returned to the test)
        got = exc
    return got, time.monotonic() - started


def test_a_claim_reading_its_upload_is_given_time_by_its_size_and_gives_up_on_a_frozen_server(
    served: tuple[Any, Store, Jobs, Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a v2 job's claim (which reads its stored upload) had no statement bound: a frozen PostgreSQL held the
    job thread (or the Celery pool process) until it thawed, for ever if it never did. Now it gives up after
    `JOB_QUERY_TIMEOUT` (its read of the upload: longer by the upload's size, for a slow link: `SLOWEST_TRANSFER`); the
    job stays QUEUED, unclaimed (the claim's transaction never committed), and runs once the server answers, charged
    once."""
    pg, store, jobs, runner = served
    key_id, first = submitted(store, jobs)
    with frozen_at(pg, store, lambda s: s.startswith("UPDATE jobs") and "started_at=" in s, 15.0):
        failed, took = timed(lambda: execute_job(jobs, runner, first, "node-a", max_attempts=3))
    assert isinstance(failed, OperationalError) and took < 6, (failed, took)  # before: 15 s, then COMPLETED
    assert wait_for(store.ping, 30)
    job = jobs.get(first)
    assert job is not None and (job.status, job.started) == (QUEUED, False)
    assert execute_job(jobs, runner, first, "node-a", max_attempts=1) == COMPLETED  # its attempt was not used

    _, job_id = submitted(store, jobs, key_id)
    monkeypatch.setattr(bounded, "SLOWEST_TRANSFER", len(IMAGE) / 4.0)  # the upload: +4 s
    with frozen_at(pg, store, lambda s: s.startswith("SELECT jobs.request, jobs.upload"), 2.5):
        status, took = timed(lambda: execute_job(jobs, runner, job_id, "node-a", max_attempts=3))
    assert status == COMPLETED and took >= 2.5, (status, took)  # paused less than its grown bound: a slow link
    assert keys.balance(store, key_id) == 3  # two jobs, each charged once


def test_a_completion_a_frozen_server_never_stores_is_given_up_and_the_sweeper_runs_the_job_again(
    served: tuple[Any, Store, Jobs, Runner],
) -> None:
    """Before: storing a run's result (one UPDATE carrying the PNG, and its charge) on a frozen PostgreSQL held the
    job thread until it thawed. Now it gives up after its bound; the job stays PROCESSING on the node with its
    credit held (neither charged nor refunded), and the in-process pool's machinery recovers it: the run is past its
    deadline, so the sweeper puts it back in the queue (`orphaned`), and it runs again, charged once."""
    pg, store, jobs, runner = served
    key_id, job_id = submitted(store, jobs)
    with frozen_at(pg, store, completing, 15.0):
        failed, took = timed(lambda: execute_job(jobs, runner, job_id, "node-a", max_attempts=3, timeout=20.0))
    assert isinstance(failed, OperationalError) and took < 6, (failed, took)  # before: 15 s, then COMPLETED
    assert wait_for(store.ping, 30)
    job = jobs.get(job_id)
    assert job is not None and (job.status, job.has_result, job.error) == (PROCESSING, False, None)
    assert keys.balance(store, key_id) == 4 and holding(store, job_id)  # held, not settled
    assert jobs.orphaned(["node-a"]) == []  # node-a is alive and its run's deadline not past yet
    store.host_clock = lambda: time.time() + 20.0 + LONGEST_RUN_MARGIN + 1  # later: past the run's deadline
    assert jobs.orphaned(["node-a"]) == [(job_id, MODEL)]
    assert execute_job(jobs, runner, job_id, "node-a", max_attempts=3) == COMPLETED
    assert jobs.result(job_id) is not None
    assert keys.balance(store, key_id) == 4 and not holding(store, job_id)  # charged once


def test_a_worker_whose_completion_a_frozen_server_never_stores_hands_the_task_back(
    served: tuple[Any, Store, Jobs, Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Celery worker's side of the same seam: before, its pool process waited for the frozen server to thaw
    (past Celery's hard limit, which killed it); now the completion gives up, the task waits for the database, puts
    the job back (its attempt not counted) and hands the message back for a redelivery, which completes it."""
    from celery.exceptions import Reject

    from automask.server import worker

    pg, store, jobs, runner = served
    key_id, job_id = submitted(store, jobs)
    monkeypatch.setattr(worker, "_WORKER", SimpleNamespace(server=ServerSettings(timeout=20.0, max_job_attempts=1)))
    proc = SimpleNamespace(jobs=jobs, runner=runner, node="worker-1", guard=SimpleNamespace(refusal=None))
    monkeypatch.setattr(worker, "_process", lambda: proc)
    monkeypatch.setattr(worker, "RETRY_PAUSE", 0.2)
    task = SimpleNamespace(request=SimpleNamespace(delivery_info={"redelivered": False}))
    with frozen_at(pg, store, completing, 6.0):
        handed, _ = timed(lambda: worker.v2_task(task, job_id))
    assert isinstance(handed, Reject) and handed.requeue, handed  # before: COMPLETED once thawed, 6 s later
    job = jobs.get(job_id)
    assert job is not None and job.status == QUEUED and holding(store, job_id)
    assert worker.v2_task(task, job_id) == COMPLETED  # the redelivery: its first attempt was never counted
    assert keys.balance(store, key_id) == 4 and not holding(store, job_id)


def test_a_runs_check_whether_its_job_is_still_its_own_gives_up_on_a_frozen_server_once(
    served: tuple[Any, Store, Jobs, Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the check a run makes at each stage boundary (from the model's own thread: no bound inherited) waited
    for a frozen PostgreSQL until it thawed, holding the model. Now it gives up after its bound and the run goes on
    (its completion decides); the next checks do not ask the server again for `UNANSWERED_PAUSE` (each would hold the
    model for the bound again), and a cancel made once it answers is seen after that."""
    from automask.server import execute

    monkeypatch.setattr(execute, "UNANSWERED_PAUSE", 3.0, raising=False)
    pg, store, jobs, _ = served
    _, job_id = submitted(store, jobs)
    assert jobs.claim(job_id, "node-a") is not None
    stop = still_held(jobs, job_id, "node-a")
    assert stop() is False
    asked: list[tuple[Any, float]] = []
    with frozen_at(pg, store, lambda s: s.startswith("SELECT jobs.id"), 15.0):
        thread = threading.Thread(target=lambda: asked.extend([timed(stop), timed(stop)]))
        thread.start()
        thread.join(10)
    assert [answer for answer, _ in asked] == [False, False], asked  # before: nothing within 10 s
    assert asked[0][1] < 6 and asked[1][1] < 0.2, asked  # the second check did not wait for the server again
    assert wait_for(store.ping, 30) and jobs.cancel(job_id)
    assert wait_for(stop, 10)  # the pause over, the cancel is seen


def test_an_in_process_run_whose_completion_a_frozen_server_never_stores_completes_after_it_thaws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end on a single node (the in-process pool and its sweeper): before, the job thread storing the result
    waited for the frozen PostgreSQL until it thawed; now it gives up within its bound and the thread is free while
    the server is still frozen; once it answers, the sweeper takes the run back (past its deadline) and the job runs
    again to COMPLETED, charged once."""
    import base64

    import httpx

    from automask.server import dispatch, execute
    from automask.server.app import create_app
    from server_helpers import LiveServer

    monkeypatch.setattr(bounded, "JOB_QUERY_TIMEOUT", 1.0, raising=False)
    monkeypatch.setattr(bounded, "BACKGROUND_QUERY_TIMEOUT", 1.0)
    monkeypatch.setattr(execute, "LONGEST_RUN_MARGIN", 0.0)  # a run's deadline: its 2 s timeout
    monkeypatch.setattr(dispatch, "MODEL_RETRY_SECONDS", 0.2)
    with postgres_server() as pg:
        settings = Settings(data_dir=tmp_path / "data", database_url=pg.url)
        server = ServerSettings(timeout=2.0, sweep_interval=0.2, node_ttl=1.0)
        app = create_app(settings, server, MaskGenerator(FakeBackend(), settings))
        state = app.state.automask
        key, token = keys.create_key(state.store, credits=5)
        headers = {"x-api-key": token}
        body = {"image": base64.b64encode(IMAGE).decode(), "prompt": "sofa"}
        with LiveServer(app) as live:
            with frozen_at(pg, state.store, completing, 12.0):
                sub = httpx.post(f"{live.url}/v2/automatic-mask-generator", headers=headers, json=body, timeout=30)
                assert sub.status_code == 200, sub.text
                assert wait_for(lambda: state.dispatcher._running, 10)  # running: its completion freezes the server
                assert wait_for(lambda: not state.dispatcher._running, 8)  # before: the thread held until the thaw
            status_url = sub.json()["status_url"]
            done = wait_for(
                lambda: httpx.get(status_url, headers=headers, timeout=10).json()["status"] == COMPLETED, 40
            )
            assert done and keys.balance(state.store, key.id) == 4  # charged once


def test_an_in_process_job_worker_survives_a_database_error_failing_a_job_it_cannot_run(tmp_path: Path) -> None:
    """Before: the in-process pool failed a job whose model it does not serve outside its guard for database errors:
    one that failed (a bound firing on a frozen server) ended that job worker's task for good, and the job stayed in
    the process's hands, QUEUED, never run nor failed (the sweeper's re-sends of it were taken for duplicates). Now
    it is tried again later, as any job the database failed is, and the worker goes on."""
    import asyncio

    from automask.server import dispatch

    class FailsOnce(Jobs):
        failures = 1

        def fail(self, job_id: str, error: str, *, node: str | None = None) -> bool:
            if self.failures:
                self.failures -= 1
                raise OperationalError("UPDATE jobs", {}, Exception("the database server did not answer within 10 s"))
            return super().fail(job_id, error, node=node)

    store = Store.in_data_dir(tmp_path / "data")
    jobs = FailsOnce(store)
    settings = Settings(data_dir=tmp_path / "models")
    local = dispatch.LocalDispatcher(settings, ServerSettings(), store, jobs, MaskGenerator(FakeBackend(), settings))
    _, job_id = submitted(store, jobs)

    def failed() -> bool:
        job = jobs.get(job_id)
        return job is not None and job.status == FAILED

    async def run() -> tuple[bool, bool]:
        worker = asyncio.create_task(local._work())
        local._enqueue(job_id, "no-such-model")
        ended = await asyncio.to_thread(wait_for, failed, 10)  # before: the task ended, the job QUEUED
        alive = not worker.done()
        worker.cancel()
        return bool(ended), alive

    original = dispatch.MODEL_RETRY_SECONDS
    dispatch.MODEL_RETRY_SECONDS = 0.1
    try:
        ended, alive = asyncio.run(run())
    finally:
        dispatch.MODEL_RETRY_SECONDS = original
        local.runner.close()
        store.close()
    assert ended and alive and jobs.failures == 0
    assert job_id not in local._held  # out of its hands: a re-sent job would be taken again


def test_a_completion_is_given_time_by_the_metadata_it_stores_too(tmp_path: Path) -> None:
    """Before: a completion's bound grew by the result PNG alone, while the same statement also stores the metadata,
    which with `instance_masks` holds a base64 PNG per instance (up to 100: megabytes, often more than the PNG): on
    a slow link to the database a healthy server was taken for frozen and the computed result thrown away. Now its
    bound grows by both."""
    store = Store.in_data_dir(tmp_path / "data")
    jobs = Jobs(store)
    bounds: list[float | None] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if completing(statement):
            bounds.append(bounded._QUERY_BOUND.get())

    try:
        _, job_id = submitted(store, jobs)
        assert jobs.claim(job_id, "node-a") is not None
        metadata = {"instances": [{"label": "sofa", "mask": "A" * 1_000_000} for _ in range(4)]}
        event.listen(store.engine, "before_cursor_execute", seen)
        assert jobs.complete(job_id, "node-a", b"\x89PNG" + b"x" * 1000, metadata, 0.1)
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
        store.close()
    assert len(bounds) == 1 and bounds[0] is not None, bounds
    wanted = bounded.JOB_QUERY_TIMEOUT + 4_000_000 / bounded.SLOWEST_TRANSFER
    assert bounds[0] >= wanted, (bounds, wanted)  # before: 10.001 s, for 4 MB of metadata


def test_a_poll_of_a_job_that_completes_while_it_is_read_is_bounded_by_the_row_it_reads(
    served: tuple[Any, Store, Jobs, Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `read_job` asked the metadata's size, then read the row bounded by it; a job that completed between
    the two (its metadata megabytes now) was read under the bound of none, so over a slow link the poll failed (a
    503). Now the bound of a read follows the row it reads: the job as the first read found it, and its metadata,
    once there, read under a bound grown by its size. The slow link is a server paused while the read is sent."""
    import json
    import re

    from sqlalchemy import update

    from automask.server.job_view import read_job
    from automask.server.store import jobs_table

    pg, store, jobs, _ = served
    _, job_id = submitted(store, jobs)
    stored = json.dumps({"instances": ["x" * 1000] * 2000})  # ~2 MB
    monkeypatch.setattr(bounded, "SLOWEST_TRANSFER", len(stored) / 4.0, raising=False)  # its read: +4 s
    completing_now = [True]

    def completes_after_the_size_read(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if completing_now and "length(jobs.metadata)" in statement:
            completing_now.pop()
            with store.transaction() as conn:  # the job completes on another node, just then
                conn.execute(
                    update(jobs_table).where(jobs_table.c.id == job_id).values(status=COMPLETED, metadata=stored)
                )

    carries_metadata = re.compile(r"jobs\.metadata(?!\))")  # the metadata itself, not its length
    event.listen(store.engine, "after_cursor_execute", completes_after_the_size_read)
    try:
        with frozen_at(pg, store, lambda s: bool(carries_metadata.search(s)), 2.5):
            got, took = timed(lambda: read_job(store, job_id))
        assert not isinstance(got, Exception), (got, took)  # before: OperationalError after 1 s
        assert got is not None and got.status in (QUEUED, COMPLETED)
        assert got.status == QUEUED or got.metadata == json.loads(stored)
        with frozen_at(pg, store, lambda s: bool(carries_metadata.search(s)), 2.5):
            again, took = timed(lambda: read_job(store, job_id))
        assert not isinstance(again, Exception), (again, took)
        assert again is not None and again.status == COMPLETED and again.metadata == json.loads(stored)
    finally:
        event.remove(store.engine, "after_cursor_execute", completes_after_the_size_read)
