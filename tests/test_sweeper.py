"""The sweeper in a fleet: what it hands out again, against the nodes table (no broker: publishes are recorded)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import insert, text, update

from automask.server import fleet, nodes
from automask.server.config import ServerSettings
from automask.server.fleet import CeleryDispatcher
from automask.server.jobs import Jobs
from automask.server.migrations import ensure_schema
from automask.server.schemas import MaskRequest
from automask.server.store import Store, jobs_table, nodes_table
from automask.server.sweeper import LOCK_ID, Sweeper
from automask.settings import Settings


def age_jobs(store: Store, seconds: float) -> None:
    """Pretend every job was stored `seconds` ago."""
    with store.transaction() as conn:
        conn.execute(update(jobs_table).values(created_at=time.time() - seconds))


def handed(published: list[tuple[str, str | None]], job: tuple[str, str | None]) -> Future[None]:
    """Record a publish, confirmed at once."""
    published.append(job)
    done: Future[None] = Future()
    done.set_result(None)
    return done


def test_a_job_no_live_worker_serves_is_handed_out_again_only_once_one_does(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every sweep past `republish_after` sent another message for a job of a model no worker serves, and
    they piled up in its queue."""
    monkeypatch.setattr(fleet, "NODES_CACHE_SECONDS", 0.0)  # the dispatcher sees node changes at once
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=store.url.render_as_string(hide_password=False),
        broker_url="amqp://guest:guest@127.0.0.1:9//",  # never connected: publishes are recorded below
        redis_url="redis://127.0.0.1:9/0",
    )
    server = ServerSettings(republish_after=60.0)
    dispatcher = CeleryDispatcher(settings, server, store)
    published: list[tuple[str, str | None]] = []
    monkeypatch.setattr(dispatcher, "publish", lambda job_id, model: handed(published, (job_id, model)))
    jobs = Jobs(store)
    sweeper = Sweeper(store, jobs, dispatcher, server)
    nodes.register(store, "worker-a", "worker", ["a"], "a", 10.0)
    job_a = jobs.submit(None, MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"}), charge=False, model="a")
    job_b = jobs.submit(None, MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"}), charge=False, model="b")
    try:
        age_jobs(store, 600)  # neither publish was confirmed (RabbitMQ was down when they were submitted)
        assert sweeper.sweep()["republished"] == 1 and published == [(job_a, "a")]
        for _ in range(3):  # b's queue gets nothing while no worker serves b; a's hand-off was confirmed
            age_jobs(store, 600)
            sweeper.sweep()
        assert published == [(job_a, "a")]
        published.clear()
        nodes.register(store, "worker-b", "worker", ["b"], "b", 10.0)  # a worker for b comes up
        assert sweeper.sweep()["republished"] == 1 and published == [(job_b, "b")]
        assert sweeper.sweep()["republished"] == 0 and published == [(job_b, "b")]  # confirmed: never sent again
    finally:
        dispatcher.app.close()


class Recording:
    """A dispatcher that records publishes, serves every model and confirms a publish unless `failing`; `check`
    runs in each publish (in the sweeping thread)."""

    node = None

    def __init__(self, check: Callable[[], None] = lambda: None) -> None:
        self.published: list[str] = []
        self.failing = False
        self.check = check

    served: list[str] | None = None  # None: every model

    def serving(self) -> list[str] | None:
        return self.served

    def publish(self, job_id: str, model: str | None) -> Future[None]:
        self.check()
        done: Future[None] = Future()
        if self.failing:
            done.set_exception(ConnectionRefusedError("RabbitMQ is down"))
        else:
            self.published.append(job_id)
            done.set_result(None)
        return done


def test_a_job_waiting_behind_others_is_never_sent_twice(store: Store) -> None:
    """Before: every sweep re-sent each QUEUED job whose last publish was `republish_after` old, though RabbitMQ
    held its message: a job waiting behind a backlog got one duplicate per `republish_after` it waited."""
    jobs = Jobs(store)
    dispatcher = Recording()
    sweeper = Sweeper(store, jobs, dispatcher, ServerSettings(republish_after=60.0))  # type: ignore[arg-type]
    request = MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"})
    waiting = jobs.submit(None, request, charge=False, model="m")
    jobs.published([waiting], time.time())  # v2_submit's publish was confirmed
    lost = jobs.submit(None, request, charge=False, model="m")  # its publish failed: never confirmed
    fresh = jobs.submit(None, request, charge=False, model="m")
    age_jobs(store, 600)
    with store.transaction() as conn:  # stored just now: v2_submit is still publishing it
        conn.execute(update(jobs_table).where(jobs_table.c.id == fresh).values(created_at=time.time()))
    dispatcher.failing = True  # RabbitMQ is down at the first sweep: nothing counts as handed out
    assert sweeper.sweep()["republished"] == 0 and jobs.unpublished(time.time() - 60.0) == [(lost, "m")]
    dispatcher.failing = False
    for _ in range(3):
        sweeper.sweep()
    assert dispatcher.published == [lost]  # once, confirmed; `waiting` never, however long it waits
    assert jobs.unpublished(time.time()) == [(fresh, "m")]
    assert jobs.claim(waiting, "node-a") is not None and jobs.release(waiting, "node-a")  # put back: sent again
    assert sweeper.sweep()["republished"] == 1 and dispatcher.published == [lost, waiting]
    assert jobs.claim(lost, "node-a") is not None  # node-a dies while running it
    assert sweeper.sweep()["requeued"] == 1 and dispatcher.published == [lost, waiting, lost]
    sweeper.sweep()
    assert dispatcher.published == [lost, waiting, lost]


def test_a_job_confirmed_long_ago_and_still_queued_is_sent_once_more(store: Store) -> None:
    """A confirmed message can still be lost (RabbitMQ drops it at its delivery limit when a worker put it back
    after database errors 20 times): a job QUEUED `resend_after` past its confirmation goes out once more, then
    waits another `resend_after`."""
    jobs = Jobs(store)
    dispatcher = Recording()
    settings = ServerSettings(republish_after=60.0, resend_after=900.0)
    sweeper = Sweeper(store, jobs, dispatcher, settings)  # type: ignore[arg-type]
    request = MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"})
    job = jobs.submit(None, request, charge=False, model="m")
    jobs.published([job], time.time())
    age_jobs(store, 3600)
    sweeper.sweep()
    assert dispatcher.published == []  # confirmed just now: it waits behind others
    with store.transaction() as conn:
        conn.execute(update(jobs_table).values(published_at=time.time() - 901))
    assert sweeper.sweep()["republished"] == 1 and dispatcher.published == [job]
    for _ in range(2):
        sweeper.sweep()
    assert dispatcher.published == [job]  # its confirmation is fresh again


def test_a_late_confirmation_never_hides_a_job_put_back_meanwhile(store: Store) -> None:
    """Before: `published` marked the job whatever happened since the send: a job claimed (its message consumed)
    and put back (`release`) before the confirmation was recorded waited `resend_after` with no message anywhere."""
    jobs = Jobs(store)
    request = MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"})
    job = jobs.submit(None, request, charge=False, model="m")
    sent_at = time.time()
    time.sleep(0.01)
    assert jobs.claim(job, "node-a") is not None and jobs.release(job, "node-a")  # consumed, then put back
    jobs.published([job], sent_at)  # the confirmation of that send, recorded late
    assert jobs.unpublished(time.time() + 1) == [(job, "m")]  # still to be handed out
    other = jobs.submit(None, request, charge=False, model="m")
    jobs.published([other], time.time())
    assert jobs.unpublished(time.time() + 1) == [(job, "m")]  # a plain confirmation still counts


def test_the_sweeper_publishes_after_releasing_its_lock(postgres_db: str) -> None:
    """Before: it published while holding the fleet's sweeper lock, so a publish RabbitMQ held up held the lock."""
    store = Store(postgres_db)
    ensure_schema(store, create=True)
    free: list[bool] = []

    def lock_is_free() -> None:
        with store.engine.connect() as conn:  # another session, as another node's sweeper
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": LOCK_ID}).scalar())
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
            conn.commit()
        free.append(got)

    jobs = Jobs(store)
    sweeper = Sweeper(store, jobs, Recording(lock_is_free), ServerSettings(republish_after=1.0))  # type: ignore[arg-type]
    job_id = jobs.submit(None, MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"}), charge=False)
    age_jobs(store, 600)
    try:
        assert sweeper.sweep()["republished"] == 1 and free == [True]
        assert jobs.unpublished(time.time()) == [] and jobs.get(job_id).status == "QUEUED"  # type: ignore[union-attr]
    finally:
        store.close()


def test_after_a_database_outage_no_node_is_taken_for_dead_and_every_queued_job_goes_out_again(
    store: Store,
) -> None:
    """While the database was down nobody could beat, and workers handed messages back until RabbitMQ may have
    dropped them (its delivery limit). Before: the first sweep after it took every running job from its live node
    (run twice, an attempt burnt each), and a job whose message was dropped waited `resend_after` (15 min)."""
    jobs = Jobs(store)
    dispatcher = Recording()
    settings = ServerSettings(node_ttl=0.6, heartbeat_interval=0.2, resend_after=900.0)
    sweeper = Sweeper(store, jobs, dispatcher, settings)  # type: ignore[arg-type]
    request = MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"})
    running, waiting = (jobs.submit(None, request, charge=False, model="m") for _ in range(2))
    nodes.register(store, "w", "worker", ["m"], "m", 0.6)
    assert jobs.claim(running, "w") is not None
    jobs.published([waiting], store.now())  # confirmed: its message was in the queue...
    time.sleep(0.7)  # ... and the database went away for longer than the node TTL
    sweeper.failed()
    done = sweeper.sweep()
    assert done["requeued"] == 0 and jobs.get(running).status == "PROCESSING"  # type: ignore[union-attr]
    assert done["republished"] == 1 and dispatcher.published == [waiting]  # sent again, once
    assert sweeper.sweep() == {"requeued": 0, "republished": 0, "holds": 0, "expired": 0}
    nodes.heartbeat(store, "w")  # the worker beats again: it keeps its job
    time.sleep(0.65)
    assert sweeper.sweep()["requeued"] == 1  # a node silent for a TTL past the outage is dead, as usual


def test_after_an_outage_the_grace_is_the_longest_ttl_of_any_node(store: Store) -> None:
    """The sweeping node's TTL is 0.6 s; a worker's is 2 s. Before: the grace after an outage was the sweeper's own
    0.6 s, so the worker's running job was taken from it before it could beat again."""
    jobs = Jobs(store)
    settings = ServerSettings(node_ttl=0.6, heartbeat_interval=0.2)
    sweeper = Sweeper(store, jobs, Recording(), settings)  # type: ignore[arg-type]
    job = jobs.submit(None, MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"}), charge=False)
    nodes.register(store, "w", "worker", ["m"], "m", 2.0)
    assert jobs.claim(job, "w") is not None
    with store.transaction() as conn:  # its last beat before the outage: 5 s ago
        conn.execute(update(nodes_table).values(heartbeat_at=store.now() - 5))
    sweeper.failed()
    assert sweeper.sweep()["requeued"] == 0
    time.sleep(1.0)  # past the sweeper's own TTL, within the worker's
    assert sweeper.sweep()["requeued"] == 0 and jobs.get(job).status == "PROCESSING"  # type: ignore[union-attr]


def test_after_an_outage_a_job_goes_out_again_once_a_worker_serves_its_model(store: Store) -> None:
    """Workers come back after the database: the first sweeps see no live worker for the job's model. Before: the
    post-outage re-send happened at the first sweep only, found nothing to send, and the job (its message dropped
    during the outage) waited `resend_after` (15 min)."""
    jobs = Jobs(store)
    dispatcher = Recording()
    dispatcher.served = []  # no live worker yet
    sweeper = Sweeper(store, jobs, dispatcher, ServerSettings(resend_after=900.0))  # type: ignore[arg-type]
    job = jobs.submit(None, MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"}), charge=False, model="m")
    jobs.published([job], store.now())
    sweeper.failed()
    assert sweeper.sweep()["republished"] == 0 and sweeper.sweep()["republished"] == 0
    dispatcher.served = ["m"]  # a worker for m beats again
    assert sweeper.sweep()["republished"] == 1 and dispatcher.published == [job]
    assert sweeper.sweep()["republished"] == 0  # once


def finished_results(store: Store, prefix: str, count: int, age: float) -> None:
    """`count` COMPLETED jobs `prefix-N` with a random 64 KiB result each, finished `age` seconds ago."""
    done_at = time.time() - age
    rows = [
        {"id": f"{prefix}-{i}", "status": "COMPLETED", "created_at": done_at, "finished_at": done_at}
        | {"result": os.urandom(64 * 1024)}
        for i in range(count)
    ]
    with store.transaction() as conn:
        conn.execute(insert(jobs_table), rows)


def test_an_sqlite_file_shrinks_once_its_results_expire(tmp_path: Path) -> None:
    """Before: deleting expired results freed pages inside the file for reuse, but the file kept the size of the
    largest burst for good. Now a new file has incremental auto-vacuum, and the sweep that expires results gives
    their pages back (in short transactions) and checkpoints: the file shrinks."""
    store = Store.in_data_dir(tmp_path)
    jobs = Jobs(store)
    sweeper = Sweeper(store, jobs, Recording(), ServerSettings(result_ttl=3600.0))  # type: ignore[arg-type]
    try:
        finished_results(store, "old", 400, age=7200.0)  # ~26 MB of results, expired an hour ago
        finished_results(store, "new", 2, age=60.0)
        store.engine.dispose()  # (the last connection checkpoints: the file holds the results)
        assert store.path is not None and store.path.stat().st_size > 26_000_000
        assert sweeper.sweep()["expired"] == 400
        assert store.path.stat().st_size < 1_000_000  # before: unchanged
        assert jobs.get("new-0") is not None and jobs.get("new-1") is not None and jobs.get("old-0") is None
    finally:
        store.close()
