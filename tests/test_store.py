"""Keys, credits, holds and v2 jobs: the same tests on SQLite (embedded) and on a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from automask.server import keys as keystore
from automask.server import nodes
from automask.server.errors import ApiError
from automask.server.jobs import (
    CANCELLED,
    CANCELLED_QUEUED,
    CANCELLED_RUNNING,
    COMPLETED,
    FAILED,
    PROCESSING,
    QUEUED,
    Jobs,
)
from automask.server.migrations import ensure_schema
from automask.server.schemas import MaskRequest
from automask.server.store import Store, jobs_table, nodes_table


def request_of(**kw: Any) -> MaskRequest:
    return MaskRequest.model_validate({"image": "aGVsbG8=", "prompt": "sofa", **kw})


def credits(store: Store, key_id: str) -> int | None:
    key = keystore.get_key(store, key_id)
    assert key is not None
    return key.credits


def test_keys_hashes_auth_revoke(store: Store) -> None:
    key, token = keystore.create_key(store, name="ci", credits=3, rate_limit=10)
    assert keystore.authenticate(store, token) == key
    assert [k.id for k in keystore.list_keys(store)] == [key.id]
    for bad in (None, "", token + "x", "am_nope_secret", token.replace("am_", "xx_")):
        with pytest.raises(ApiError) as err:
            keystore.authenticate(store, bad)
        assert err.value.status == 401
    assert keystore.revoke_key(store, key.id) and keystore.revoke_key(store, key.id)  # idempotent
    assert not keystore.revoke_key(store, "nope")
    with pytest.raises(ApiError) as err:
        keystore.authenticate(store, token)
    assert err.value.status == 403


def test_credits_never_go_below_zero_under_a_race(store: Store) -> None:
    key, _ = keystore.create_key(store, credits=7)
    results: list[bool] = [False] * 20

    def take(i: int) -> None:
        results[i] = keystore.reserve(store, key.id, f"hold-{i}")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted = [i for i, ok in enumerate(results) if ok]
    assert len(granted) == 7 and credits(store, key.id) == 0
    keystore.settle(store, f"hold-{granted[0]}", charge=False)  # a failure: refunded
    keystore.settle(store, f"hold-{granted[0]}", charge=False)  # settling twice changes nothing
    keystore.settle(store, f"hold-{granted[1]}", charge=True)  # a success: kept
    assert credits(store, key.id) == 1


def test_an_admin_balance_sticks_when_a_held_credit_is_refunded(store: Store) -> None:
    """Before: `keys update --credits 0` while a request held a credit that was then refunded ended at 1."""
    key, _ = keystore.create_key(store, credits=5)
    assert keystore.reserve(store, key.id, "in-flight")
    assert keystore.update_key(store, key.id, credits=0)
    keystore.settle(store, "in-flight", charge=False)
    assert credits(store, key.id) == 0
    assert keystore.reserve(store, key.id, "after") is False
    assert keystore.update_key(store, key.id, credits=2)
    assert keystore.reserve(store, key.id, "new")  # holds taken after the update refund as usual
    keystore.settle(store, "new", charge=False)
    assert credits(store, key.id) == 2


def test_orphan_holds_are_released_only_once_expired(store: Store) -> None:
    key, _ = keystore.create_key(store, credits=5)
    now = time.time()
    assert keystore.reserve(store, key.id, "running", expires_at=now + 60)  # a v1 request still running
    assert keystore.reserve(store, key.id, "crashed", expires_at=now - 1)  # its node died long ago
    assert keystore.release_orphan_holds(store) == 1
    assert credits(store, key.id) == 4
    assert keystore.release_orphan_holds(store, now=now + 61) == 1
    assert credits(store, key.id) == 5


def test_job_lifecycle_charges_once_even_when_run_twice(store: Store) -> None:
    key, _ = keystore.create_key(store, credits=2)
    jobs = Jobs(store)
    job_id = jobs.submit(key.id, request_of(base64=True), charge=True, model="m")
    assert credits(store, key.id) == 1
    job = jobs.get(job_id)
    assert job is not None and (job.status, job.model, job.base64, job.has_result) == (QUEUED, "m", True, False)
    first = jobs.claim(job_id, "node-a")
    assert first is not None and first.attempts == 1 and first.request["prompt"] == "sofa" and first.model == "m"
    assert jobs.claim(job_id, "node-b") is None  # a duplicate message: not taken
    second = jobs.claim(job_id, "node-b", takeover_ttl=10.0)  # a redelivery after node-a's worker died (silent)
    assert second is not None and second.attempts == 2
    assert jobs.complete(job_id, "node-b", b"png-1", {"a": 1}, 0.5) is True
    assert jobs.complete(job_id, "node-b", b"png-2", {"a": 2}, 0.7) is False  # the other run finishing later: ignored
    assert jobs.fail(job_id, "late failure", node="node-b") is False
    job = jobs.get(job_id)
    assert job is not None and job.status == COMPLETED and job.metadata == {"a": 1} and job.has_result
    assert jobs.result(job_id) == b"png-1"
    assert credits(store, key.id) == 1  # charged exactly once
    assert jobs.expire(ttl=3600) == 0 and jobs.expire(ttl=-1) == 1
    assert jobs.get(job_id) is None and jobs.result(job_id) is None


def test_uploads_are_stored_and_dropped_when_finished(store: Store) -> None:
    jobs = Jobs(store)
    image = bytes(range(256)) * 10
    job_id = jobs.submit(None, request_of(image=image), charge=False)
    claimed = jobs.claim(job_id, "n")
    assert claimed is not None and claimed.request["image"] == image
    assert jobs.fail(job_id, "bad image", node="n") is True
    job = jobs.get(job_id)
    assert job is not None and job.status == FAILED and job.error == "bad image"


def test_failed_and_cancelled_jobs_are_free(store: Store) -> None:
    key, _ = keystore.create_key(store, credits=3)
    jobs = Jobs(store)
    failed, cancelled, started = (jobs.submit(key.id, request_of(), charge=True) for _ in range(3))
    assert credits(store, key.id) == 0
    assert jobs.claim(failed, "n") is not None and jobs.fail(failed, "nope", node="n")
    assert jobs.cancel(cancelled) is True
    assert jobs.claim(cancelled, "n") is None  # a cancelled job never runs
    assert jobs.claim(started, "n") is not None
    assert jobs.held(started, "n") and not jobs.held(started, "other")
    assert jobs.cancel(started) is True  # running: cancelled too, its run stops at its next stage boundary
    assert not jobs.held(started, "n")
    assert jobs.complete(started, "n", b"png", {}, 0.1) is False  # a run that finishes anyway: neither stored...
    assert jobs.cancel(started) is False and jobs.cancel(failed) is False  # finished: nothing to cancel
    jobs_seen = [jobs.get(j) for j in (failed, cancelled, started)]
    assert [j.status for j in jobs_seen if j] == [FAILED, CANCELLED, CANCELLED]
    assert [j.error for j in jobs_seen[1:] if j] == [CANCELLED_QUEUED, CANCELLED_RUNNING]
    assert jobs.result(started) is None
    assert credits(store, key.id) == 3  # ... nor charged: every credit is back, each given back once


def test_queue_caps_per_key_and_in_total(store: Store) -> None:
    a, _ = keystore.create_key(store)
    b, _ = keystore.create_key(store)
    jobs = Jobs(store, max_per_key=2, max_total=3)
    ids = [jobs.submit(a.id, request_of(), charge=False) for _ in range(2)]
    with pytest.raises(ApiError) as err:
        jobs.submit(a.id, request_of(), charge=False)
    assert err.value.status == 429 and "2" in err.value.message
    assert err.value.headers["Retry-After"] == "5" and err.value.headers["x-rate-limit-reset-at-utc"].endswith("Z")
    jobs.submit(b.id, request_of(), charge=False)
    with pytest.raises(ApiError) as err:
        jobs.submit(b.id, request_of(), charge=False)
    assert err.value.status == 503 and err.value.headers["Retry-After"]
    assert jobs.claim(ids[0], "n") is not None and jobs.complete(ids[0], "n", b"x", {}, 0.1)  # finished: room again
    jobs.submit(a.id, request_of(), charge=False)


def test_dead_nodes_jobs_and_lost_publishes_are_found(store: Store) -> None:
    jobs = Jobs(store)
    alive, dead, lost = (jobs.submit(None, request_of(), charge=False, model="m") for _ in range(3))
    nodes.register(store, "node-alive", "worker", ["m"], "m", 10.0)
    assert jobs.claim(alive, "node-alive") and jobs.claim(dead, "node-dead")
    assert [n.id for n in nodes.live(store, ttl=10)] == ["node-alive"]
    assert jobs.orphaned(["node-alive"]) == [(dead, "m")]
    job = jobs.get(dead)
    assert job is not None and job.status == QUEUED
    assert job.shown_status == PROCESSING  # its owner never sees it go back to QUEUED
    assert jobs.get(lost).shown_status == QUEUED  # type: ignore[union-attr]  # never started
    assert jobs.unpublished(time.time() - 3600) == []  # all handed out recently
    assert {j for j, _ in jobs.unpublished(time.time() + 1)} == {dead, lost}
    assert jobs.unpublished(time.time() - 1) == []  # their publish time was just renewed
    again = jobs.claim(dead, "node-alive")
    assert again is not None and again.attempts == 2  # the attempt on the dead node counts


def silent_for(store: Store, node_id: str, seconds: float) -> None:
    """Node `node_id`'s last heartbeat, `seconds` ago."""
    with store.transaction() as conn:
        conn.execute(update(nodes_table).where(nodes_table.c.id == node_id).values(heartbeat_at=store.now() - seconds))


def test_a_node_that_stops_beating_is_dead(store: Store) -> None:
    nodes.register(store, "n1", "worker", ["a", "b"], None, 10.0)
    (node,) = nodes.live(store, ttl=10)
    assert (node.models, node.default_model) == (["a", "b"], None)
    assert nodes.heartbeat(store, "n1") and not nodes.heartbeat(store, "n2")
    silent_for(store, "n1", 11)
    assert nodes.live(store, ttl=10) == []
    assert nodes.forget_dead(store, ttl=60) == 0  # dead, but kept for ten times its TTL (for status pages, logs)
    silent_for(store, "n1", 101)
    assert nodes.forget_dead(store, ttl=60) == 1


def test_every_node_is_judged_by_its_own_ttl_not_the_readers(store: Store) -> None:
    """A worker beating every 5 s with a 15 s TTL, seen by an API node whose own TTL is 4 s: alive for 15 s of
    silence, dead after. Before: judged by the reader's 4 s, so a live worker flickered dead between beats (503s,
    its jobs taken from it and run twice)."""
    nodes.register(store, "slow-beat", "worker", ["m"], "m", 15.0)
    silent_for(store, "slow-beat", 6)
    assert [n.id for n in nodes.live(store, ttl=4)] == ["slow-beat"]
    jobs = Jobs(store)
    job = jobs.submit(None, request_of(), charge=False, model="m")
    assert jobs.claim(job, "slow-beat") is not None
    assert jobs.claim(job, "other", takeover_ttl=4) is None  # a redelivery does not take it from a live node
    assert jobs.orphaned([n.id for n in nodes.live(store, ttl=4)]) == []
    silent_for(store, "slow-beat", 16)
    assert nodes.live(store, ttl=4) == []
    assert jobs.claim(job, "other", takeover_ttl=4) is not None  # now it is dead: taken over


def test_a_run_lasts_as_long_as_its_claimers_limit_allows(store: Store) -> None:
    """A worker with a 600 s timeout claims a job; a sweeper whose own timeout is 60 s leaves it running at 200 s
    and takes it back only past the claimer's limit. Before: taken back at the sweeper's 60 + 120 s, and run again
    each time until the attempts cap failed it."""
    jobs = Jobs(store)
    job = jobs.submit(None, request_of(), charge=False, model="m")
    nodes.register(store, "w", "worker", ["m"], "m", 10.0)
    assert jobs.claim(job, "w", run_limit=600 + 120) is not None
    with store.transaction() as conn:  # started 200 s ago
        conn.execute(update(jobs_table).values(started_at=store.now() - 200, run_deadline=store.now() + 520))
    assert jobs.orphaned(["w"], longest=60 + 120) == []
    with store.transaction() as conn:  # started 800 s ago: past 600 + 120
        conn.execute(update(jobs_table).values(started_at=store.now() - 800, run_deadline=store.now() - 80))
    assert jobs.orphaned(["w"], longest=60 + 120) == [(job, "m")]


def test_a_run_older_than_any_run_may_last_is_lost_even_on_a_live_node(store: Store) -> None:
    jobs = Jobs(store)
    fresh, stale = (jobs.submit(None, request_of(), charge=False, model="m") for _ in range(2))
    nodes.register(store, "alive", "worker", ["m"], "m", 10.0)
    assert jobs.claim(fresh, "alive") and jobs.claim(stale, "alive")
    with store.transaction() as conn:  # `stale` started an hour ago
        conn.execute(update(jobs_table).where(jobs_table.c.id == stale).values(started_at=time.time() - 3600))
    assert jobs.orphaned(["alive"], longest=600) == [(stale, "m")]
    assert [jobs.get(j).status for j in (fresh, stale)] == [PROCESSING, QUEUED]  # type: ignore[union-attr]


def test_the_fleet_runs_on_the_database_servers_clock(postgres_db: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two hosts whose clocks are 10 minutes off either way agree on the time (the PostgreSQL server's, here this
    machine's): a node beating from the slow host is alive to the fast one, a job it runs is not taken from it, and
    a dead one is found dead after the TTL, not 10 minutes later. Each host logs how far off it is."""
    slow, fast = Store(postgres_db), Store(postgres_db)
    ensure_schema(slow, create=True)
    slow.host_clock = lambda: time.time() - 600
    fast.host_clock = lambda: time.time() + 600
    with caplog.at_level("WARNING", "automask.server"):
        slow.read_clock()
        fast.read_clock()
    assert abs(slow.now() - time.time()) < 1 and abs(fast.now() - time.time()) < 1
    assert "clock is -600.0 s off" in caplog.text and "clock is +600.0 s off" in caplog.text
    jobs_slow, jobs_fast = Jobs(slow), Jobs(fast)
    job = jobs_fast.submit(None, request_of(), charge=False, model="m")
    nodes.register(slow, "slow-node", "worker", ["m"], "m", 10.0)
    assert jobs_slow.claim(job, "slow-node") is not None
    assert [n.id for n in nodes.live(fast, ttl=10)] == ["slow-node"]
    assert jobs_fast.orphaned(["slow-node"], longest=60) == []  # a fresh run, not a lost one
    with slow.transaction() as conn:  # the slow node's last beat, 11 s ago by the database's clock
        conn.execute(update(nodes_table).values(heartbeat_at=slow.now() - 11))
    assert nodes.live(fast, ttl=10) == [] and nodes.live(slow, ttl=10) == []
    slow.close()
    fast.close()


def test_the_clock_never_waits_for_the_database() -> None:
    """`now` is called on the event loop: a database that accepts connections but never answers must not stall
    it (the reading happens in a thread of its own; until then this host's clock stands in)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never speaks PostgreSQL
        store = Store(f"postgresql://u:p@127.0.0.1:{silent.getsockname()[1]}/db")
        start = time.perf_counter()
        stamps = [store.now() for _ in range(3)]
        assert time.perf_counter() - start < 0.2
        assert all(abs(t - time.time()) < 1 for t in stamps)
    store.close()


PARTITION = """
import sys, threading, subprocess, time
sys.path.insert(0, sys.argv[1])
from services import postgres_server
from sqlalchemy import text
from automask.server.store import Store

with postgres_server() as pg:
    store = Store(pg.url)
    with store.engine.connect() as conn:  # a pooled connection, as a running node has
        conn.execute(text("SELECT 1"))
    subprocess.run(["ip", "link", "set", "lo", "down"], check=True)  # packets go nowhere; nothing answers
    start, failed = time.monotonic(), []
    def ask():
        try:
            with store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            failed.append(type(exc).__name__)
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(60)
    print("failed" if failed else "waiting", failed, round(time.monotonic() - start, 1), flush=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    asking.join(30)
    store.close()
"""


@pytest.mark.slow
def test_a_database_cut_off_by_the_network_fails_a_call_in_seconds(tmp_path: Path) -> None:
    """Before: with the PostgreSQL server's host unreachable (a partition, a failover that moved its address), a call
    on a pooled connection waited for the kernel's TCP retransmissions (about 15 minutes): requests hung instead of
    being answered 503, and /readyz never answered. A private network namespace (root, `unshare -n`) whose loopback
    goes down stands in for the partition."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip (a private network namespace)")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("this machine refuses a private network namespace (a container without CAP_SYS_ADMIN)")
    script = tmp_path / "partition.py"
    script.write_text(PARTITION)
    tests = str(Path(__file__).parent)
    run = subprocess.run(
        ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "{sys.executable}" "{script}" "{tests}"'],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    outcome = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    verdict, _, seconds = outcome.rpartition(" ")
    assert verdict.startswith("failed ['OperationalError']"), outcome
    assert float(seconds) < 30, outcome  # NETWORK_DEAD_AFTER (the ping) + the connect timeout (the new connection)


def test_queue_caps_the_bytes_queued_jobs_store(store: Store) -> None:
    """Before, only the number of jobs was capped: 100 queued jobs of a 32 MB upload each, per key, went into the
    database. A submit past the bytes a key (429) or everyone (503) may store is refused, nothing stored or held."""
    a, _ = keystore.create_key(store, credits=10)
    b, _ = keystore.create_key(store, credits=10)
    jobs = Jobs(store, max_bytes_per_key=25_000, max_bytes_total=35_000)
    upload = request_of(image=os.urandom(10_000))  # a multipart upload: kept as bytes, apart from the JSON
    text = request_of(image="QUJD" * 2_500)  # a base64 string: kept in the JSON
    ids = [jobs.submit(a.id, upload, charge=True), jobs.submit(a.id, text, charge=True)]
    with pytest.raises(ApiError) as err:
        jobs.submit(a.id, upload, charge=True)
    assert err.value.status == 429 and err.value.limit == "queued_jobs"
    assert "AUTOMASK_SERVER_MAX_QUEUED_BYTES_PER_KEY" in err.value.message and err.value.headers["Retry-After"] == "5"
    jobs.submit(a.id, request_of(image="https://example.com/a.png"), charge=True)  # a URL is small: still taken
    jobs.submit(b.id, upload, charge=True)
    with pytest.raises(ApiError) as err:
        jobs.submit(b.id, upload, charge=True)
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "30"
    assert "AUTOMASK_SERVER_MAX_QUEUED_BYTES" in err.value.message
    assert len(jobs.queued()) == 4 and credits(store, a.id) == 7 and credits(store, b.id) == 9  # refused: not held
    assert jobs.claim(ids[0], "n") is not None and jobs.complete(ids[0], "n", b"x", {}, 0.1)  # finished: room again
    jobs.submit(b.id, upload, charge=True)
    alone = Jobs(store, max_bytes_per_key=100, max_bytes_total=100)
    c, _ = keystore.create_key(store)
    with pytest.raises(ApiError):
        alone.submit(c.id, upload, charge=False)  # the queue holds jobs: over the total
    empty = Jobs(store, max_bytes_per_key=100)  # a key with nothing queued may always submit one
    empty.submit(c.id, upload, charge=False)


def test_a_submit_waits_for_the_queue_lock_longer_than_a_request_statement_may(postgres_db: str) -> None:
    """Before: a request's statements are bounded (`REQUEST_QUERY_TIMEOUT`, to answer 503 on a frozen server), and
    the wait for the queue's advisory lock was one such statement: a healthy server with a burst of large submits
    queued behind one another (each holds the lock while its upload is written) answered the ones that waited past
    the bound 503 "database unreachable". The lock is now asked for again and again, each ask bounded: the submit
    waits for it however long other submits hold it."""
    from automask.server.bounded import bounded

    store = Store(postgres_db)
    ensure_schema(store, create=True)
    jobs = Jobs(store, max_total=10)
    with store.engine.connect() as other:
        store.lock(other, "jobs.submit")  # held by another submit's transaction for 1.5 s
        threading.Timer(1.5, other.rollback).start()
        asked = time.monotonic()
        with bounded(0.5):  # each statement of this request answered within 0.5 s
            job_id = jobs.submit(None, request_of(), charge=False)
        assert time.monotonic() - asked > 1.4  # it waited for the lock, then ran
    assert [job for job, _ in jobs.queued()] == [job_id]
    store.close()
