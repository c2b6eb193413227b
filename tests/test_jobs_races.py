"""v2 jobs under concurrency: what READ COMMITTED lets interleave on PostgreSQL (SQLite serialises writers), and
a slow run that lost its job to another node."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Connection, event, text, update
from sqlalchemy.exc import OperationalError

from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server import nodes
from automask.server.config import ServerSettings
from automask.server.errors import ApiError
from automask.server.execute import execute_job
from automask.server.jobs import CANCELLED, COMPLETED, FAILED, PROCESSING, QUEUED, Jobs
from automask.server.migrations import ensure_schema
from automask.server.runner import Runner
from automask.server.schemas import MaskRequest
from automask.server.store import Store, jobs_table, nodes_table
from automask.settings import Settings
from server_helpers import FakeBackend, png_bytes

J = jobs_table.c


@pytest.fixture()
def pg_store(postgres_db: str) -> Iterator[Store]:
    """A fresh PostgreSQL database at the current schema (for races SQLite's write lock rules out)."""
    s = Store(postgres_db)
    ensure_schema(s, create=True)
    yield s
    s.close()


def request_of(**kw: Any) -> MaskRequest:
    return MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "sofa", **kw})


def wait_for_lock_waiters(store: Store, count: int, timeout: float = 10.0) -> None:
    """Wait until `count` backends of this database are blocked on a lock (a row lock, an advisory lock)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.read() as conn:
            if conn.execute(query).scalar_one() >= count:
                return
        time.sleep(0.02)
    raise AssertionError(f"{count} transaction(s) never waited on a lock")


def claim_uncommitted(conn: Connection, job_id: str, node: str) -> None:
    """What `Jobs.claim(job_id, node, takeover_ttl=...)` writes, left uncommitted in `conn`'s transaction."""
    conn.execute(
        update(jobs_table)
        .where(J.id == job_id)
        .values(status=PROCESSING, node=node, started_at=time.time(), attempts=J.attempts + 1)
    )


def test_the_sweeper_leaves_a_job_that_a_live_node_reclaims_while_it_sweeps(pg_store: Store) -> None:
    """Before: `orphaned` picked the job (its node dead), a live node took it over (a redelivered message), and the
    sweeper's UPDATE, checking only `status == PROCESSING`, put the running job back to QUEUED: a second run."""
    jobs = Jobs(pg_store)
    job_id = jobs.submit(None, request_of(), charge=False, model="m")
    assert jobs.claim(job_id, "node-dead") is not None
    found: list[list[tuple[str, str | None]]] = []
    with pg_store.engine.connect() as live, live.begin():
        claim_uncommitted(live, job_id, "node-live")  # the takeover holds the row until it commits
        sweep = threading.Thread(target=lambda: found.append(jobs.orphaned(["node-live"])))
        sweep.start()
        wait_for_lock_waiters(pg_store, 1)  # the sweeper saw node-dead's job and waits for the row
    sweep.join(timeout=10)
    assert found == [[]]
    job = jobs.get(job_id)
    assert job is not None and job.status == PROCESSING
    with pg_store.read() as conn:
        assert conn.execute(jobs_table.select().where(J.id == job_id)).one().node == "node-live"
    assert jobs.orphaned(["node-other"]) == [(job_id, "m")]  # once node-live dies, it is recovered


def slow_counts(store: Store, seconds: float) -> None:
    """Make every COUNT query on `store` take `seconds` longer (widens the window between a count and an insert)."""

    def pause(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT COUNT"):
            time.sleep(seconds)

    event.listen(store.engine, "after_cursor_execute", pause)


@pytest.mark.parametrize(
    ("per_key", "total", "admitted"),
    [(3, None, 3), (None, 4, 4), (2, 5, 5)],
    ids=["per-key", "total", "both"],
)
def test_concurrent_submits_never_pass_the_caps(
    store: Store, per_key: int | None, total: int | None, admitted: int
) -> None:
    """Before: on PostgreSQL every submit counted the unfinished jobs before any had inserted its own, and all of
    them were admitted."""
    key_ids = [keystore.create_key(store)[0].id for _ in range(3)]
    jobs = Jobs(store, max_per_key=per_key, max_total=total)
    slow_counts(store, 0.05)
    callers = [key_ids[i % 3] if total else key_ids[0] for i in range(12)]
    start = threading.Barrier(len(callers))
    outcomes: list[str | int] = [0] * len(callers)

    def submit(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = jobs.submit(callers[i], request_of(), charge=False)
        except ApiError as exc:
            outcomes[i] = exc.status

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(callers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    accepted = [callers[i] for i, o in enumerate(outcomes) if isinstance(o, str)]
    assert len(accepted) == admitted
    assert all(accepted.count(k) <= (per_key or admitted) for k in key_ids)
    refused = {o for o in outcomes if not isinstance(o, str)}
    assert refused == ({429} if total is None else {429, 503} if per_key else {503})
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == admitted


def credits(store: Store, key_id: str) -> int | None:
    key = keystore.get_key(store, key_id)
    assert key is not None
    return key.credits


def test_a_slow_run_whose_job_was_taken_over_cannot_end_it(store: Store) -> None:
    """Before: complete / fail / release guarded on the status only, so node-a (declared dead, its job re-claimed
    by node-b) could fail and refund, put back, or complete the job node-b was running."""
    key, _ = keystore.create_key(store, credits=1)
    jobs = Jobs(store)
    job_id = jobs.submit(key.id, request_of(), charge=True, model="m")
    assert jobs.claim(job_id, "node-a") is not None
    assert jobs.orphaned(["node-b"]) == [(job_id, "m")]  # node-a missed its heartbeats
    taken = jobs.claim(job_id, "node-b")
    assert taken is not None and taken.attempts == 2
    assert jobs.fail(job_id, "node-a timed out", node="node-a") is False
    assert jobs.release(job_id, "node-a") is False
    assert jobs.complete(job_id, "node-a", b"png-a", {"run": "a"}, 1.0) is False
    assert jobs.fail(job_id, "not runnable here") is False  # a caller that never claimed it: QUEUED jobs only
    job = jobs.get(job_id)
    assert job is not None and (job.status, job.has_result) == (PROCESSING, False)
    assert credits(store, key.id) == 0  # still held: no refund
    assert jobs.complete(job_id, "node-b", b"png-b", {"run": "b"}, 1.0) is True
    assert jobs.result(job_id) == b"png-b" and credits(store, key.id) == 0  # charged once
    assert jobs.fail(job_id, "late", node="node-b") is False and credits(store, key.id) == 0


def test_a_failure_is_refunded_once_and_only_by_the_run_holding_the_job(store: Store) -> None:
    key, _ = keystore.create_key(store, credits=1)
    jobs = Jobs(store)
    job_id = jobs.submit(key.id, request_of(), charge=True, model="m")
    assert jobs.claim(job_id, "node-a") is not None and jobs.release(job_id, "node-a") is True
    assert jobs.get(job_id).status == QUEUED  # type: ignore[union-attr]
    assert jobs.claim(job_id, "node-b") is not None
    assert jobs.release(job_id, "node-a") is False and jobs.fail(job_id, "a", node="node-a") is False
    assert jobs.fail(job_id, "b failed", node="node-b") is True
    assert jobs.fail(job_id, "b failed", node="node-b") is False
    job = jobs.get(job_id)
    assert job is not None and (job.status, job.error) == (FAILED, "b failed")
    assert credits(store, key.id) == 1  # refunded exactly once


class TakenOverWhileRunning:
    """A runner whose inference lasts while the sweeper declares this node dead and `other` claims the job."""

    def __init__(self, jobs: Jobs, other: str) -> None:
        self.jobs, self.other = jobs, other

    def name_of(self, model: str | None) -> str:
        return model or "m"

    def generator(self, model: str) -> None:
        return None

    def run_blocking(self, image: Any, prompt: Any, options: Any, model: str, **_: Any) -> Any:
        (job_id, _), *_ = self.jobs.orphaned([self.other])
        assert self.jobs.claim(job_id, self.other) is not None
        raise RuntimeError("the model crashed")


def test_execute_job_leaves_a_job_taken_over_mid_run_to_the_new_run(store: Store) -> None:
    key, _ = keystore.create_key(store, credits=1)
    jobs = Jobs(store)
    job_id = jobs.submit(key.id, request_of(), charge=True, model="m")
    runner: Any = TakenOverWhileRunning(jobs, "node-b")
    assert execute_job(jobs, runner, job_id, "node-a", max_attempts=3) is None  # not FAILED: node-b runs it
    job = jobs.get(job_id)
    assert job is not None and job.status == PROCESSING and credits(store, key.id) == 0
    assert jobs.complete(job_id, "node-b", b"png", {}, 0.1) is True
    job = jobs.get(job_id)
    assert job is not None and job.status == COMPLETED and credits(store, key.id) == 0


class CompleteFailsOnce(Jobs):
    """Jobs whose first `complete` loses its database connection (a dropped connection, a deadlock victim)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.failures = 1

    def complete(self, job_id: str, node: str, png: bytes, metadata: dict[str, Any], seconds: float) -> bool:
        if self.failures:
            self.failures -= 1
            raise OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection unexpectedly"))
        return super().complete(job_id, node, png, metadata, seconds)


def test_a_database_error_while_completing_is_retried_not_failed(store: Store, tmp_path: Path) -> None:
    """Before: `execute_job` caught the OperationalError of `complete` as an unexpected error and marked the job
    FAILED with its credit refunded, though its result was computed; now it reaches the caller's retry path (a
    worker requeues the task, whose redelivery takes the job over) and the job completes, charged once."""
    settings = Settings(data_dir=tmp_path / "models")
    runner = Runner(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))
    key, _ = keystore.create_key(store, credits=2)
    jobs = CompleteFailsOnce(store)
    job_id = jobs.submit(
        key.id,
        request_of(image=base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode()),
        charge=True,
        model="fake-gradient",
    )
    nodes.register(store, "node-a", "worker", ["fake-gradient"], "fake-gradient", 10.0)  # alive all along
    with pytest.raises(OperationalError):
        execute_job(jobs, runner, job_id, "node-a", max_attempts=3)
    job = jobs.get(job_id)
    assert job is not None and (job.status, job.error) == (PROCESSING, None) and credits(store, key.id) == 1
    assert execute_job(jobs, runner, job_id, "node-a", max_attempts=3, takeover_ttl=10.0) == COMPLETED
    job = jobs.get(job_id)
    assert job is not None and job.status == COMPLETED and jobs.result(job_id) is not None
    assert credits(store, key.id) == 1  # charged once, never refunded


class Unused:
    """A runner a run that never starts does not touch."""

    def name_of(self, model: str | None) -> str:
        raise AssertionError("the job ran")


def test_a_redelivered_message_takes_a_job_over_only_from_a_dead_node(store: Store) -> None:
    """Before: any redelivered message took its job over, even from a healthy run on a live node (a duplicate
    message, one handed back after a database error): a second run, an attempt used, the first run's result
    thrown away, and past `max_attempts` a healthy job ended FAILED."""
    key, _ = keystore.create_key(store, credits=1)
    jobs = Jobs(store)
    job_id = jobs.submit(key.id, request_of(), charge=True, model="m")
    nodes.register(store, "node-a", "worker", ["m"], "m", 10.0)
    assert jobs.claim(job_id, "node-a") is not None  # node-a runs it, alive
    runner: Any = Unused()
    assert execute_job(jobs, runner, job_id, "node-d", max_attempts=1, takeover_ttl=10.0) is None
    assert jobs.claim(job_id, "node-d", takeover_ttl=10.0) is None
    with store.transaction() as conn:
        conn.execute(update(nodes_table).where(nodes_table.c.id == "node-a").values(heartbeat_at=time.time() - 11))
    taken = jobs.claim(job_id, "node-b", takeover_ttl=10.0)  # node-a fell silent: dead, its job is taken over
    assert taken is not None and taken.attempts == 2
    assert jobs.complete(job_id, "node-a", b"png-a", {}, 0.1) is False
    nodes.unregister(store, "node-b")  # gone from the table (never registered here): dead too
    assert jobs.claim(job_id, "node-c", takeover_ttl=10.0) is not None
    assert jobs.complete(job_id, "node-c", b"png-c", {}, 0.1) is True
    assert jobs.result(job_id) == b"png-c" and credits(store, key.id) == 0


def test_a_redelivered_message_leaves_a_healthy_run_to_finish(store: Store) -> None:
    """The reviewer's case: attempt 2 of 2 runs on live node-b when a duplicate is redelivered to node-d."""
    key, _ = keystore.create_key(store, credits=1)
    jobs = Jobs(store)
    job_id = jobs.submit(key.id, request_of(), charge=True, model="m")
    assert jobs.claim(job_id, "node-a") is not None  # node-a is SIGKILLed (never in the live set here)
    nodes.register(store, "node-b", "worker", ["m"], "m", 10.0)
    assert jobs.claim(job_id, "node-b", takeover_ttl=10.0) is not None  # its message redelivered to node-b
    runner: Any = Unused()
    assert execute_job(jobs, runner, job_id, "node-d", max_attempts=2, takeover_ttl=10.0) is None
    assert jobs.complete(job_id, "node-b", b"png-b", {}, 0.1) is True
    job = jobs.get(job_id)
    assert job is not None and (job.status, job.error) == (COMPLETED, None) and credits(store, key.id) == 0


def settle_race(jobs: Jobs, job_id: str, node: str) -> tuple[bool, bool]:
    """`complete` (by the run on `node`) and `cancel` of `job_id` at once, from two threads released together;
    return (completed, cancelled)."""
    start = threading.Barrier(2)
    out: dict[str, bool] = {}

    def complete() -> None:
        start.wait()
        out["complete"] = jobs.complete(job_id, node, b"png", {"run": node}, 0.1)

    def cancel() -> None:
        start.wait()
        out["cancel"] = jobs.cancel(job_id)

    threads = [threading.Thread(target=complete), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    return out["complete"], out["cancel"]


def test_a_cancel_racing_a_completion_settles_the_credit_once(store: Store) -> None:
    """A cancel of a running job and its run's completion: one transaction each, exactly one wins (the status,
    the result and the credit agree with it), whichever comes first."""
    rounds = 12
    key, _ = keystore.create_key(store, credits=rounds)
    jobs = Jobs(store)
    wins = {COMPLETED: 0, CANCELLED: 0}
    for _ in range(rounds):
        job_id = jobs.submit(key.id, request_of(), charge=True, model="m")
        assert jobs.claim(job_id, "node-a") is not None
        completed, cancelled = settle_race(jobs, job_id, "node-a")
        assert completed != cancelled  # exactly one won
        job = jobs.get(job_id)
        assert job is not None and job.status == (COMPLETED if completed else CANCELLED)
        assert (jobs.result(job_id) is not None) == completed
        assert jobs.cancel(job_id) is False and jobs.complete(job_id, "node-a", b"late", {}, 0.1) is False
        wins[job.status] += 1
    assert credits(store, key.id) == wins[CANCELLED]  # each completion charged once, each cancel refunded once
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM holds")).scalar_one() == 0


@pytest.mark.parametrize("first", ["complete", "cancel"])
def test_a_cancel_and_a_completion_waiting_on_one_row_leave_one_winner(pg_store: Store, first: str) -> None:
    """PostgreSQL (READ COMMITTED): both UPDATEs wait on the row while another transaction holds it, then each
    re-checks its WHERE on the committed row; the one that takes the lock first wins, the other matches nothing."""
    key, _ = keystore.create_key(pg_store, credits=1)
    jobs = Jobs(pg_store)
    job_id = jobs.submit(key.id, request_of(), charge=True, model="m")
    assert jobs.claim(job_id, "node-a") is not None
    out: dict[str, bool] = {}
    calls = {
        "complete": lambda: out.setdefault("complete", jobs.complete(job_id, "node-a", b"png", {}, 0.1)),
        "cancel": lambda: out.setdefault("cancel", jobs.cancel(job_id)),
    }
    second = "cancel" if first == "complete" else "complete"
    with pg_store.engine.connect() as holder, holder.begin():
        holder.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
        threads = [threading.Thread(target=calls[first])]
        threads[0].start()
        wait_for_lock_waiters(pg_store, 1)
        threads.append(threading.Thread(target=calls[second]))
        threads[1].start()
        wait_for_lock_waiters(pg_store, 2)
    for t in threads:
        t.join(timeout=10)
    assert out == {first: True, second: False}
    job = jobs.get(job_id)
    assert job is not None and job.status == (COMPLETED if first == "complete" else CANCELLED)
    assert credits(pg_store, key.id) == (0 if first == "complete" else 1)


def test_submits_waiting_for_the_queue_lock_are_served_in_arrival_order(pg_store: Store) -> None:
    """Before: `Store.lock` asked for the advisory lock with instant tries, a waiter's pauses between them growing to
    0.1 s, so under a sustained burst (16 clients submitting back to back) the newest submits, still asking every few
    milliseconds, took the lock before the oldest again and again: one submit waited seconds while hundreds of later
    ones went through (measured: p50 13 ms, max 3 s with 8 clients; it grows with the burst's length). Now each
    waits in PostgreSQL's own queue for the lock, in arrival order: a submit is overtaken by a few at most."""
    jobs = Jobs(pg_store, max_total=10**6)  # a total cap: every submit takes the one lock
    request = request_of(image=b"\x89PNG" + b"x" * 20_000)
    spans: list[tuple[float, float]] = []
    stop = time.monotonic() + 4.0
    clients = 16

    def client() -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            jobs.submit(None, request, charge=False)
            spans.append((started, time.monotonic()))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    spans.sort()
    ends = np.array([end for _, end in spans])
    # for each submit: how many submits that started after it had ended before it did
    overtaken = max(int(np.sum(ends[i + 1 :] < end)) for i, (_, end) in enumerate(spans))
    assert len(spans) > 5 * clients and overtaken <= 2 * clients, (len(spans), overtaken)


def test_a_lock_waited_for_in_slices_is_taken_once_free_and_leaves_lock_timeout_as_it_was(
    pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wait for the queue lock longer than one slice (`LOCK_SLICE`: each ask is answered before a request's bound
    could take a healthy server for frozen) asks again and gets the lock once its holder ends; the transaction's
    own `lock_timeout` is then as it was."""
    from automask.server import bounded

    monkeypatch.setattr(bounded, "LOCK_SLICE", 0.2)
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:
        with pg_store.transaction() as conn:
            pg_store.lock(conn, "jobs.submit")
            holding.set()
            done.wait(1.0)

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(10)
    started = time.monotonic()
    with pg_store.transaction() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '7s'"))
        pg_store.lock(conn, "jobs.submit")
        waited = time.monotonic() - started
        after = conn.execute(text("SELECT current_setting('lock_timeout')")).scalar_one()
    thread.join(10)
    assert 0.6 < waited < 5 and after == "7s", (waited, after)
