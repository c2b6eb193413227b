"""Prometheus metrics (`--metrics-port`): a listener of its own, counts that move with what the service did, bounded
labels (no path, prompt or key), and a scrape that survives a database that is down or slow."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from automask.server import keys as keystore
from automask.server import metrics
from automask.server.config import ServerSettings
from automask.server.store import Store
from server_helpers import (
    FakeBackend,
    free_port,
    live_server,
    loopback_socket,
    png_bytes,
    process,
    serve_cmd,
    wait_for,
    wait_ready,
)

SLUG = "automatic-mask-generator"
SERVING = re.compile(r"^automask: serving on (http://127\.0\.0\.1:\d+) ", re.M)
METRICS_AT = re.compile(r"^automask: metrics at (http://127\.0\.0\.1:\d+/metrics)$", re.M)
PROMPT = "zebra-striped-teapot"
"""A prompt no label may ever hold."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of a scrape of `url`: (name, labels) -> value."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@contextlib.contextmanager
def running(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `cmd` (an `automask serve` or `worker` with --metrics-port 0), its output in `log`; yield the metrics URL
    it names once it has named it. SIGTERM (then SIGKILL) at the end."""
    with process(cmd, log, env, graceful=True) as proc:
        found = wait_for(lambda: METRICS_AT.search(log.read_text()) or proc.poll() is not None, 90, 0.1)
        assert isinstance(found, re.Match), log.read_text()[-3000:]
        yield found.group(1)


@contextlib.contextmanager
def serving(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """`running` an `automask serve` (--port 0); yield its API's URL, once ready, and its metrics' URL."""
    with running(cmd, log, env) as scraped:
        found = SERVING.search(log.read_text())  # printed before the metrics' line
        assert found is not None, log.read_text()[-3000:]
        api = found.group(1)
        wait_ready(api, 90)
        yield api, scraped


@pytest.mark.slow
def test_counts_move_with_requests_runs_credits_and_limits(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    data = tmp_path / "data"
    store = Store.in_data_dir(data)
    _, token = keystore.create_key(store, credits=10)
    _, limited = keystore.create_key(store, rate_limit=1)
    store.close()
    image = base64.b64encode(png_bytes(np.full((24, 32, 3), 120, np.uint8))).decode()
    body = {"image": image, "prompt": PROMPT, "base64": True}
    with serving(serve_cmd(data, tiny_clipseg_dir, "--metrics-port", "0"), tmp_path / "serve.log") as (api, scraped):
        before = scrape(scraped)
        model = httpx.get(f"{api}/readyz").json()["model"]
        v1 = f"{api}/v1/{SLUG}"
        assert httpx.post(v1, json=body, headers={"x-api-key": token}, timeout=60).status_code == 200
        assert httpx.post(v1, json={**body, "threshold": 5}, headers={"x-api-key": token}).status_code == 400
        assert httpx.post(v1, json=body, headers={"x-api-key": "am_nope_nope"}).status_code == 401
        assert httpx.post(v1, json=body, headers={"x-api-key": limited}, timeout=60).status_code == 200
        assert httpx.post(v1, json=body, headers={"x-api-key": limited}).status_code == 429
        job = httpx.post(f"{api}/v2/{SLUG}", json=body, headers={"x-api-key": token}).json()["request_id"]
        status = f"{api}/v2/requests/{job}/status"
        wait_for(lambda: httpx.get(status, headers={"x-api-key": token}).json()["status"] == "COMPLETED", 60, 0.2)
        assert httpx.get(f"{api}/metrics").status_code == 404  # never on the API's port
        assert httpx.get(f"{api}/v2/requests/{PROMPT}/status", headers={"x-api-key": token}).status_code == 404
        after = scrape(scraped)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = f"/v1/{SLUG}"
    requests = "automask_http_requests_total"
    assert [moved(requests, route=route, method="POST", code=c) for c in ("200", "400", "401", "429")] == [2, 1, 1, 1]
    assert moved(requests, route=f"/v2/{SLUG}", method="POST", code="200") == 1
    assert moved(requests, route="/v2/requests/{request_id}/status", method="GET", code="404") == 1
    assert moved(requests, route="unmatched", method="GET", code="404") == 1  # GET /metrics on the API's port
    assert moved("automask_http_request_duration_seconds_count", route=route) == 5
    assert value(after, "automask_http_requests_in_flight") == 0
    assert moved("automask_mask_runs_total", model=model, outcome="ok") == 3  # two v1 answers, one v2 job
    assert moved("automask_mask_run_seconds_count", model=model) == 3
    assert moved("automask_mask_runs_total", model=model, outcome="error") == 0  # the 400 was refused before a run
    assert moved("automask_credits_charged_total") == 3
    assert moved("automask_rate_limited_total", limit="requests") == 1
    assert moved("automask_auth_failures_total", code="401") == 1
    assert value(after, "automask_metrics_db_up") == 1
    assert value(after, "automask_v2_jobs", status="COMPLETED") == 1
    assert value(after, "automask_v2_jobs", status="QUEUED") == 0
    assert value(after, "automask_body_memory_bytes") == 0  # every body given back
    assert value(after, "automask_body_memory_limit_bytes") == 1 << 30
    assert value(after, "process_resident_memory_bytes") > 0  # the client's standard process metrics
    assert [labels for name, labels in after if name == "automask_build_info"] != []
    labels = {v for _, pairs in after for _, v in pairs}
    assert not [v for v in labels if PROMPT in v]  # the raw path that held it was counted by its route's template
    assert not [v for v in labels if str(tmp_path) in v or str(tiny_clipseg_dir) in v or "am_" in v]


def test_a_metrics_host_without_a_port_is_a_usage_error(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    """Before: `--metrics-host 0.0.0.0` alone was silently ignored (metrics stayed off)."""
    proc = subprocess.run(
        serve_cmd(tmp_path / "data", tiny_clipseg_dir, "--metrics-host", "0.0.0.0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.returncode == 2
        and "--metrics-host 0.0.0.0 (AUTOMASK_SERVER_METRICS_HOST) needs --metrics-port" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert ServerSettings(metrics_host="0.0.0.0", metrics_port=9100).metrics_port == 9100


def test_a_busy_metrics_port_is_one_line_and_exit_9_before_anything_starts(
    tmp_path: Path, tiny_clipseg_dir: Path
) -> None:
    data = tmp_path / "data"
    with contextlib.closing(loopback_socket()) as taken:
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            serve_cmd(data, tiny_clipseg_dir, "--metrics-port", str(port)), capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 9, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: Cannot listen on 127.0.0.1:{port}: the address is already in use. Choose another --metrics-port "
        "(or stop the server that holds it)."
    ], proc.stderr
    assert not (data / "automask.db").exists()  # the app never started: no database was opened


def test_a_busy_metrics_port_stops_a_worker_before_it_reaches_anything(tmp_path: Path) -> None:
    env = {**os.environ, "AUTOMASK_BROKER_URL": "amqp://u:p@127.0.0.1:1/none", "AUTOMASK_REDIS_URL": "redis://x"}
    with contextlib.closing(loopback_socket()) as taken:
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "automask.cli", "--data-dir", str(tmp_path), "worker", "--metrics-port", str(port)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 9, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: Cannot listen on 127.0.0.1:{port}: the address is already in use. Choose another --metrics-port "
        "(or stop the server that holds it)."
    ], proc.stderr


@pytest.fixture
def listener() -> Iterator[str]:
    """This process's metrics listener on a free loopback port (metrics stay on in this process afterwards)."""
    served = metrics.listen("127.0.0.1", 0)
    yield served.url
    served.close()


class _SlowStore:
    """A database that never answers in time."""

    @contextlib.contextmanager
    def read(self) -> Iterator[Any]:
        time.sleep(3)
        raise RuntimeError("not reached in time")
        yield


@pytest.mark.parametrize("down", ["refused", "slow"])
def test_a_database_that_is_down_or_slow_gives_db_up_0_not_a_failed_scrape(
    listener: str, down: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "DB_TIMEOUT", 0.5)
    with contextlib.closing(loopback_socket()) as closed:
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        store: Any = Store(f"postgresql://u:p@127.0.0.1:{port}/none") if down == "refused" else _SlowStore()
        unwatch = metrics.watch(store)
        try:
            started = time.monotonic()
            samples = scrape(listener)
            assert time.monotonic() - started < 5
        finally:
            unwatch()
    assert value(samples, "automask_metrics_db_up") == 0
    assert not [name for name, _ in samples if name == "automask_v2_jobs"]


def test_runs_are_counted_by_how_they_end(listener: str, tmp_path: Path) -> None:
    """ok; empty (stop_on_empty_mask, nothing found: 422); error (a refused image URL, found inside the run: 400);
    stopped (past the time limit: the 504 is answered, the run stops at its next stage boundary)."""
    image = base64.b64encode(png_bytes(np.full((8, 8, 3), 50, np.uint8))).decode()
    url = "/v1/automatic-mask-generator"
    before = scrape(listener)

    def moved(outcome: str) -> float:
        name = "automask_mask_runs_total"
        return value(scrape(listener), name, model="fake-gradient", outcome=outcome) - value(
            before, name, model="fake-gradient", outcome=outcome
        )

    with live_server(tmp_path / "a", FakeBackend(), auth=False) as live:
        assert httpx.post(live.url + url, json={"image": image, "prompt": "sofa"}).status_code == 200
        empty = {"image": image, "prompt": "nothing", "stop_on_empty_mask": True}
        assert httpx.post(live.url + url, json=empty).status_code == 422
        refused = {"image": "http://127.0.0.1/secret.png", "prompt": PROMPT}
        assert httpx.post(live.url + url, json=refused).status_code == 400
    with live_server(tmp_path / "b", FakeBackend(delay=1.5), auth=False, timeout=0.5) as live:
        assert httpx.post(live.url + url, json={"image": image, "prompt": "sofa"}, timeout=30).status_code == 504
        wait_for(lambda: moved("stopped") == 1, 10)
    assert [moved(outcome) for outcome in metrics.OUTCOMES] == [1, 1, 1, 1]
    labels = {v for _, pairs in scrape(listener) for _, v in pairs}
    assert not [v for v in labels if "secret" in v or PROMPT in v]


def _pool_process(path: str) -> None:
    metrics.forward_to(path)
    with metrics.run("clipseg"):
        pass
    with contextlib.suppress(ValueError), metrics.run("clipseg"):
        raise ValueError("a bug")
    metrics.credit_charged()


def test_a_pool_processs_records_are_served_by_the_main_process(listener: str) -> None:
    """A worker's pool process forwards its runs and charges to the process that serves the metrics."""
    before = scrape(listener)
    inbox = metrics.Inbox()
    try:
        child = multiprocessing.get_context("fork").Process(target=_pool_process, args=(inbox.path,))
        child.start()
        child.join(30)
        assert child.exitcode == 0

        def moved(name: str, **labels: str) -> float:
            return value(scrape(listener), name, **labels) - value(before, name, **labels)

        wait_for(lambda: moved("automask_credits_charged_total") == 1, 10)
        assert moved("automask_mask_runs_total", model="clipseg", outcome="ok") == 1
        assert moved("automask_mask_runs_total", model="clipseg", outcome="error") == 1
        assert moved("automask_mask_run_seconds_count", model="clipseg") == 2
    finally:
        inbox.close()


def fleet_env(database: str, redis: str, broker: str) -> dict[str, str]:
    """This process's environment without its AUTOMASK_* settings, pointed at a fleet's three servers (the database
    migrated); skips without celery."""
    pytest.importorskip("celery")
    from automask.server.migrations import migrate

    store = Store(database)
    migrate(store)
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMASK_")}
    return env | {"AUTOMASK_DATABASE_URL": database, "AUTOMASK_BROKER_URL": broker, "AUTOMASK_REDIS_URL": redis,
                  "HF_HUB_OFFLINE": "1"}  # fmt: skip


@pytest.mark.slow
def test_a_fleet_counts_runs_on_the_worker_and_requests_on_the_api_node(
    tmp_path: Path, tiny_clipseg_dir: Path, postgres_db: str, redis_db: str, rabbitmq_vhost_url: str
) -> None:
    """The real `automask worker` (Celery, a pool process) serves the runs and the v2 charge its pool process made;
    the API node serves the requests and the v1 charge; both report the fleet's v2 jobs from the database."""
    env = fleet_env(postgres_db, redis_db, rabbitmq_vhost_url)
    store = Store(postgres_db)
    _, token = keystore.create_key(store, credits=10)
    store.close()
    cli = [sys.executable, "-m", "automask.cli", "--data-dir"]
    worker = [*cli, str(tmp_path / "w"), "worker", "--model", str(tiny_clipseg_dir), "--metrics-port", "0"]
    api_cmd = [*cli, str(tmp_path / "a"), "serve", "--port", "0", "--metrics-port", "0", "--log-level", "warning"]
    image = base64.b64encode(png_bytes(np.full((24, 32, 3), 120, np.uint8))).decode()
    body = {"image": image, "prompt": PROMPT}
    with (
        running(worker, tmp_path / "worker.log", env) as at_worker,
        serving(api_cmd, tmp_path / "api.log", env) as (api, at_api),
    ):
        model = httpx.get(f"{api}/readyz").json()["model"]
        headers = {"x-api-key": token}
        assert httpx.post(f"{api}/v1/{SLUG}", json=body, headers=headers, timeout=60).status_code == 200
        job = httpx.post(f"{api}/v2/{SLUG}", json=body, headers=headers).json()["request_id"]
        status = f"{api}/v2/requests/{job}/status"
        wait_for(lambda: httpx.get(status, headers=headers).json()["status"] == "COMPLETED", 60, 0.2)
        wait_for(lambda: value(scrape(at_worker), "automask_credits_charged_total") == 1, 10, 0.2)
        on_worker, on_api = scrape(at_worker), scrape(at_api)
    assert value(on_worker, "automask_mask_runs_total", model=model, outcome="ok") == 2  # the v1 call and the job
    assert value(on_worker, "automask_mask_run_seconds_count", model=model) == 2
    assert value(on_api, "automask_mask_runs_total", model=model, outcome="ok") == 0  # an API node runs nothing
    assert value(on_api, "automask_credits_charged_total") == 1  # the v1 call, settled by the API node
    assert value(on_api, "automask_http_requests_total", route=f"/v1/{SLUG}", method="POST", code="200") == 1
    for samples in (on_worker, on_api):
        assert value(samples, "automask_metrics_db_up") == 1
        assert value(samples, "automask_v2_jobs", status="COMPLETED") == 1
    assert not [v for _, pairs in on_worker | on_api for _, v in pairs if PROMPT in v or str(tmp_path) in v]


def test_the_uvicorn_factory_serves_metrics_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from automask.server.app import app_from_env

    monkeypatch.setenv("AUTOMASK_SERVER_METRICS_PORT", "0")
    with caplog.at_level(logging.INFO, logger="automask.server"):
        app = app_from_env()
    found = re.search(r"metrics at (http://127\.0\.0\.1:\d+/metrics)", caplog.text)
    assert found is not None, caplog.text
    assert "automask_http_requests_in_flight" in httpx.get(found.group(1), timeout=10).text
    app.state.automask.store.close()


@pytest.mark.slow
def test_a_worker_counts_its_pool_processes_killed_or_left_hung(
    tmp_path: Path, postgres_db: str, redis_db: str, rabbitmq_vhost_url: str
) -> None:
    """A job that kills its pool process each time it starts (SIGKILL) is counted `killed` each time; a model that
    hangs past the time limit has its process replaced after its answer, counted `hung` (tests/fleet_worker.py)."""
    tests = str(Path(__file__).parent)
    env = fleet_env(postgres_db, redis_db, rabbitmq_vhost_url)
    env |= {"AUTOMASK_SERVER_METRICS_PORT": "0", "AUTOMASK_SERVER_NODE_TTL": "3",
            "AUTOMASK_SERVER_HEARTBEAT_INTERVAL": "0.5", "AUTOMASK_SERVER_SWEEP_INTERVAL": "0.5",
            "AUTOMASK_SERVER_MAX_JOB_ATTEMPTS": "2",
            "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    worker_env = {**env, "AUTOMASK_DATA_DIR": str(tmp_path / "w"), "AUTOMASK_SERVER_TIMEOUT": "2"}
    api_cmd = [sys.executable, "-m", "automask.cli", "--data-dir", str(tmp_path / "a"), "serve", "--port", "0",
               "--no-auth", "--log-level", "warning"]  # fmt: skip
    image = base64.b64encode(png_bytes(np.full((8, 8, 3), 50, np.uint8))).decode()
    with (
        running([sys.executable, f"{tests}/fleet_worker.py"], tmp_path / "worker.log", worker_env) as at_worker,
        serving(api_cmd, tmp_path / "api.log", env) as (api, _),
    ):
        jobs = [
            httpx.post(f"{api}/v2/{SLUG}", json={"image": image, "prompt": prompt}, timeout=30).json()["request_id"]
            for prompt in ("poison", "hang")
        ]
        for job in jobs:
            done = lambda job=job: httpx.get(f"{api}/v2/requests/{job}/status", timeout=30).status_code == 422  # noqa: E731
            wait_for(done, 120, 0.5)  # FAILED: started twice and never finished; past the time limit
        lost = lambda reason: value(scrape(at_worker), "automask_worker_pool_processes_lost_total", reason=reason)  # noqa: E731
        wait_for(lambda: lost("hung") == 1, 30, 0.2)  # its process leaves once the hung run had its grace
        assert lost("killed") == 2, (tmp_path / "worker.log").read_text()[-3000:]


@pytest.mark.slow
def test_a_worker_counts_a_pool_process_celery_killed_at_the_hard_time_limit(
    tmp_path: Path, postgres_db: str, redis_db: str, rabbitmq_vhost_url: str
) -> None:
    """Before: a task that ran past Celery's hard time limit (something outside the run's own limit hung) had its pool
    process killed by Celery, and the worker counted nothing: not `time_limit`, not `killed`."""
    from automask.server.fleet import CeleryDispatcher
    from automask.server.jobs import Jobs
    from automask.server.schemas import MaskRequest
    from automask.settings import Settings

    tests = str(Path(__file__).parent)
    env = fleet_env(postgres_db, redis_db, rabbitmq_vhost_url) | {
        "AUTOMASK_SERVER_METRICS_PORT": "0", "AUTOMASK_DATA_DIR": str(tmp_path / "w"),
        "AUTOMASK_SERVER_TIMEOUT": "5", "FLEET_TIME_LIMIT_MARGIN": "-4",  # killed 1 s in, before its run's limit
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    settings = Settings(database_url=postgres_db, broker_url=rabbitmq_vhost_url, redis_url=redis_db)
    store = Store(postgres_db)
    dispatcher = CeleryDispatcher(settings, ServerSettings(), store)
    image = base64.b64encode(png_bytes(np.full((8, 8, 3), 50, np.uint8))).decode()
    try:
        with running([sys.executable, f"{tests}/fleet_worker.py"], tmp_path / "worker.log", env) as at_worker:
            job = Jobs(store).submit(None, MaskRequest(image=image, prompt="hang"), charge=False)
            dispatcher.publish(job, "fake-gradient").result(timeout=30)
            lost = lambda reason: value(scrape(at_worker), "automask_worker_pool_processes_lost_total", reason=reason)  # noqa: E731
            wait_for(lambda: lost("time_limit") == 1, 60, 0.2)
            assert lost("killed") == 0 and lost("hung") == 0
    finally:
        asyncio.run(dispatcher.stop())
        store.close()


def test_a_request_refused_before_routing_is_counted_by_its_routes_template(listener: str, tmp_path: Path) -> None:
    """A body over the limit by Content-Length is answered 413 before the router runs: still counted under the
    route its path names; an unknown path stays `unmatched`."""
    before = scrape(listener)
    big = json.dumps({"image": "A" * 8000, "prompt": PROMPT}).encode()
    with live_server(tmp_path, FakeBackend(), auth=False, max_body_bytes=4096) as live:
        headers = {"content-type": "application/json"}
        assert httpx.post(f"{live.url}/v1/{SLUG}", content=big, headers=headers).status_code == 413
        assert httpx.post(f"{live.url}/v1/{PROMPT}", content=big, headers=headers).status_code == 413
    after = scrape(listener)

    def moved(route: str) -> float:
        name, labels = "automask_http_requests_total", {"route": route, "method": "POST", "code": "413"}
        return value(after, name, **labels) - value(before, name, **labels)

    assert [moved(f"/v1/{SLUG}"), moved("unmatched")] == [1, 1]


class _DelayedStore:
    """A database that answers, in 0.5 s; counts its reads."""

    def __init__(self, store: Store) -> None:
        self.store, self.reads = store, 0

    @contextlib.contextmanager
    def read(self) -> Iterator[Any]:
        self.reads += 1
        time.sleep(0.5)
        with self.store.read() as conn:
            yield conn


def test_scrapes_at_once_share_one_database_read(listener: str, tmp_path: Path) -> None:
    """Two Prometheus servers scraping at once: the second waits for the read the first started (one read, never
    a pile of them), and both report the database up."""
    store = Store.in_data_dir(tmp_path)
    delayed: Any = _DelayedStore(store)
    unwatch = metrics.watch(delayed)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(scrape, listener)
            time.sleep(0.2)  # the first scrape's read is under way
            second = pool.submit(scrape, listener)
            scraped = [first.result(), second.result()]
    finally:
        unwatch()
        store.close()
    assert [value(s, "automask_metrics_db_up") for s in scraped] == [1, 1]
    assert [value(s, "automask_v2_jobs", status="QUEUED") for s in scraped] == [0, 0]
    assert [n for n, _ in scraped[1] if n == "automask_v2_jobs"] != []
    assert delayed.reads == 1


def test_a_malformed_record_never_stops_the_inbox(listener: str) -> None:
    """Records no pool process sends (nested past Python's recursion limit, a number no float holds, not JSON)
    are dropped, and the inbox goes on serving the next ones."""
    before = scrape(listener)
    inbox = metrics.Inbox()
    try:
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as sock:
            for junk in (b"[" * 60000, b'["run", ["junk", "ok", 1' + b"0" * 400 + b"]]", b"\xff", b'["nope", []]'):
                sock.sendto(junk, inbox.path)
            sock.sendto(json.dumps(["lost", ["killed"]]).encode(), inbox.path)

        def moved() -> float:
            name = "automask_worker_pool_processes_lost_total"
            return value(scrape(listener), name, reason="killed") - value(before, name, reason="killed")

        assert wait_for(lambda: moved() == 1, 10)
    finally:
        inbox.close()


def test_an_inbox_under_a_long_tmpdir_still_binds(
    listener: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a TMPDIR of more than ~75 characters made the worker fail at start (a Unix socket path holds 107)."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    inbox = metrics.Inbox()
    try:
        assert len(inbox.path.encode()) <= 107 and not inbox.path.startswith(str(deep))
        before = scrape(listener)
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as sock:
            sock.sendto(json.dumps(["lost", ["hung"]]).encode(), inbox.path)
        name = "automask_worker_pool_processes_lost_total"
        assert wait_for(
            lambda: value(scrape(listener), name, reason="hung") - value(before, name, reason="hung") == 1, 10
        )
        assert not any(name.endswith("_created") for name, _ in scrape(listener))  # no series per counter made
    finally:
        inbox.close()


def test_the_apis_own_port_as_metrics_port_says_so(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    port = free_port()
    cmd = serve_cmd(tmp_path / "data", tiny_clipseg_dir, "--metrics-port", str(port), port=port)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --metrics-port {port} is the API's port (--port): the metrics need a port of their own. Choose "
        "another --metrics-port."
    ], proc.stderr


def _ports_held(conn: Any) -> None:
    """Send the TCP ports this process's sockets are bound to."""
    ports = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=int(fd))
        except OSError:  # not a socket (any more)
            continue
        with contextlib.suppress(OSError):
            name = sock.getsockname()
            if isinstance(name, tuple):
                ports.append(name[1])
        sock.detach()
    conn.send(ports)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")
def test_a_forked_pool_process_leaves_the_metrics_port_alone(listener: str) -> None:
    """A worker's pool process is forked from the process that serves the metrics: it must not keep the port, or one
    that outlives its worker (killed with SIGKILL mid-task) keeps the restarted worker from serving them."""
    port = int(listener.rsplit(":", 1)[1].removesuffix("/metrics"))
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    with contextlib.closing(loopback_socket()) as other:  # any other socket: inherited, as fork does
        child = ctx.Process(target=_ports_held, args=(there,))
        child.start()
        held = here.recv()
        child.join(30)
        assert other.getsockname()[1] in held
    assert port not in held
