"""v2 jobs under concurrency: what READ COMMITTED lets interleave on PostgreSQL (SQLite serialises writers), and
a slow run that lost its job to another node."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, text, update

from automask.server.jobs import PROCESSING, Jobs
from automask.server.migrations import ensure_schema
from automask.server.schemas import MaskRequest
from automask.server.store import Store, jobs_table

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
    """What `Jobs.claim(job_id, node, takeover=True)` writes, left uncommitted in `conn`'s transaction."""
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
