"""The sweeper in a fleet: what it hands out again, against the nodes table (no broker: publishes are recorded)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import update

from automask.server import fleet, nodes
from automask.server.config import ServerSettings
from automask.server.fleet import CeleryDispatcher
from automask.server.jobs import Jobs
from automask.server.migrations import ensure_schema
from automask.server.schemas import MaskRequest
from automask.server.store import Store, jobs_table
from automask.server.sweeper import Sweeper
from automask.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh database of each kind, at the current schema."""
    if request.param == "sqlite":
        s = Store.in_data_dir(tmp_path / "data")
    else:
        s = Store(request.getfixturevalue("postgres_db"))
        ensure_schema(s, create=True)
    yield s
    s.close()


def age_publishes(store: Store, seconds: float) -> None:
    """Pretend every job was last handed out `seconds` ago."""
    with store.transaction() as conn:
        conn.execute(update(jobs_table).values(published_at=time.time() - seconds))


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
    nodes.register(store, "worker-a", "worker", ["a"], "a")
    job_a = jobs.submit(None, MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"}), charge=False, model="a")
    job_b = jobs.submit(None, MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "x"}), charge=False, model="b")
    try:
        age_publishes(store, 600)
        assert sweeper.sweep()["republished"] == 1 and published == [(job_a, "a")]
        for _ in range(3):  # b's publish stays old, and b's queue gets nothing while no worker serves b
            age_publishes(store, 600)
            sweeper.sweep()
        assert (job_b, "b") not in published and published.count((job_a, "a")) == 4
        published.clear()
        nodes.register(store, "worker-b", "worker", ["b"], "b")  # a worker for b comes up
        assert sweeper.sweep()["republished"] == 1 and published == [(job_b, "b")]  # a's publish was just renewed
        assert sweeper.sweep()["republished"] == 0  # b's too
    finally:
        dispatcher.app.close()
