"""The fleet on real servers: two API nodes (`automask serve`) and two workers (`automask worker`) as separate
processes, each with a data folder of its own, on one PostgreSQL database, one RabbitMQ vhost and one Redis; the
official `segmind` SDK as the client. Workers and API nodes are killed (SIGKILL) mid-run: nothing is lost, nothing
is charged twice."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.jobs import Jobs
from automask.server.migrations import migrate
from automask.server.schemas import MaskRequest
from automask.server.store import Store, jobs_table, nodes_table
from automask.settings import Settings
from server_helpers import FakeBackend, LiveServer, decode, free_port, png_bytes, wait_for, wait_ready

segmind = pytest.importorskip("segmind")
pytest.importorskip("celery")
pytestmark = pytest.mark.slow
SLUG = "automatic-mask-generator"
TESTS = Path(__file__).parent
J = jobs_table.c
FAST = {  # quick failure detection for the test: the defaults are 10 s / 2 s / 120 s
    "AUTOMASK_SERVER_NODE_TTL": "3",
    "AUTOMASK_SERVER_HEARTBEAT_INTERVAL": "0.5",
    "AUTOMASK_SERVER_SWEEP_INTERVAL": "0.5",
    "AUTOMASK_SERVER_REPUBLISH_AFTER": "4",
    "AUTOMASK_SERVER_MAX_JOB_ATTEMPTS": "2",
    "AUTOMASK_SERVER_TIMEOUT": "30",
    "FLEET_SLOW_SECONDS": "2",
}


@dataclass
class Fleet:
    """The running fleet: processes by name, API node URLs, the shared database."""

    root: Path
    env: dict[str, str]
    store: Store
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    def start_worker(self, name: str) -> None:
        env = {**self.env, "AUTOMASK_DATA_DIR": str(self.root / name)}
        with (self.root / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(TESTS / "fleet_worker.py")], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def start_api(self, name: str) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "automask.cli", "--data-dir", str(self.root / name), "serve"]
        with (self.root / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [*cmd, "--port", str(port), "--log-level", "warning"], env=self.env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.urls[name] = f"http://127.0.0.1:{port}"
        wait_ready(self.urls[name], 90, self.procs[name])

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def sdk(self, node: str, token: str) -> Any:
        return segmind.SegmindClient(api_key=token, base_url=f"{self.urls[node]}/v1", timeout=60)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, postgres_service: Any, redis_service: Any, rabbitmq_service: Any
) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    database = postgres_service.create_database()
    vhost = rabbitmq_service.add_vhost()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUTOMASK_")},
        **FAST,
        "AUTOMASK_DATABASE_URL": postgres_service.url_for(database),
        "AUTOMASK_BROKER_URL": rabbitmq_service.vhost_url(vhost),
        "AUTOMASK_REDIS_URL": redis_service.url.rsplit("/", 1)[0] + "/3",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "FLEET_STAGES": str(root / "stages"),
    }
    (root / "stages").mkdir()
    store = Store(env["AUTOMASK_DATABASE_URL"])
    migrate(store)
    running = Fleet(root, env, store)
    try:
        for worker in ("worker-1", "worker-2"):
            running.start_worker(worker)
        for api in ("api-a", "api-b"):
            running.start_api(api)
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        for proc in running.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in running.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        store.close()
        postgres_service.drop_database(database)
        rabbitmq_service.ctl("delete_vhost", vhost)


def image_b64(h: int = 30, w: int = 40) -> str:
    rng = np.random.default_rng(7)
    return base64.b64encode(png_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))).decode()


def turned_webp_b64() -> str:
    """A 40×30 lossless WebP whose EXIF orientation (6) says to turn it a quarter (30×40 upright)."""
    rng = np.random.default_rng(8)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(out, "WEBP", lossless=True, exif=exif)
    return base64.b64encode(out.getvalue()).decode()


def processing(store: Store, ids: list[str]) -> list[tuple[str, str]]:
    """(job id, node) of the jobs among `ids` that are PROCESSING now."""
    with store.read() as conn:
        rows = conn.execute(select(J.id, J.node).where(J.id.in_(ids), J.status == "PROCESSING")).all()
    return [(r.id, r.node) for r in rows]


def runs_on(fleet: Fleet, worker: str, node: str) -> bool:
    """Whether `node` is one of `worker`'s pool processes (a node each: `worker-<host>-<pid>-<random>`)."""
    pid = fleet.procs[worker].pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return node.rsplit("-", 2)[1] in children


def attempts(store: Store, job_id: str) -> int:
    with store.read() as conn:
        return int(conn.execute(select(J.attempts).where(J.id == job_id)).scalar_one())


def credits(store: Store, key_id: str) -> int | None:
    key = keystore.get_key(store, key_id)
    assert key is not None
    return key.credits


def test_v1_through_both_nodes_answers_as_the_single_process_does(fleet: Fleet, tmp_path: Path) -> None:
    key, token = keystore.create_key(fleet.store, credits=20)
    body = {"image": image_b64(), "prompt": "sofa", "threshold": 0.5, "grow_mask": 0}
    settings = Settings(data_dir=tmp_path / "single")
    single_app = create_app(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))
    with LiveServer(single_app) as single:
        _, single_token = keystore.create_key(Store.in_data_dir(settings.data_dir))
        for node in ("api-a", "api-b"):
            r = fleet.sdk(node, token).run_sync(SLUG, **body)
            one = httpx.post(f"{single.url}/v1/{SLUG}", json=body, headers={"x-api-key": single_token})
            assert r.status_code == 200 and r.content == one.content  # the same PNG, byte for byte
            mask = decode(r.content)
            assert mask.shape == (30, 40) and np.flatnonzero(mask[0]).tolist() == list(range(20, 40))
            assert set(r.headers) >= {"x-inference-time", "x-request-id", "content-type"}
            assert r.headers["x-remaining-credits"] == str(credits(fleet.store, key.id))  # as the single process
            assert "x-remaining-credits" not in one.headers  # its key has unlimited credits
            turned = {**body, "image": turned_webp_b64()}  # how the image was turned: said by a worker as here
            mine = httpx.post(f"{fleet.urls[node]}/v1/{SLUG}", json=turned, headers={"x-api-key": token})
            theirs = httpx.post(f"{single.url}/v1/{SLUG}", json=turned, headers={"x-api-key": single_token})
            said = {mine.headers.get("x-image-orientation"), theirs.headers.get("x-image-orientation")}
            assert said == {"6; format=webp; from=exif"} and mine.content == theirs.content
            as_json = fleet.sdk(node, token).run_sync(SLUG, **body, base64=True).json()
            single_json = httpx.post(f"{single.url}/v1/{SLUG}", json={**body, "base64": True},
                                     headers={"x-api-key": single_token}).json()  # fmt: skip
            for volatile in ("timings", "inference_time"):
                as_json.pop(volatile), single_json.pop(volatile)
            assert as_json == single_json
            instances = {**body, "base64": True, "instance_masks": True}  # automask extension: per-target masks
            mine_json = httpx.post(f"{fleet.urls[node]}/v1/{SLUG}", json=instances, headers={"x-api-key": token})
            single_instances = httpx.post(f"{single.url}/v1/{SLUG}", json=instances,
                                          headers={"x-api-key": single_token}).json()  # fmt: skip
            assert mine_json.status_code == 200, mine_json.text
            assert len(mine_json.json()["instances"]) == 1
            assert mine_json.json()["instances"] == single_instances["instances"]  # the same PNGs, byte for byte
            for bad in ({"threshold": 1.5}, {"model": "nope"}, {"image": "bm90IGFuIGltYWdl"}):
                sent = {**body, **bad}
                mine = httpx.post(f"{fleet.urls[node]}/v1/{SLUG}", json=sent, headers={"x-api-key": token})
                theirs = httpx.post(f"{single.url}/v1/{SLUG}", json=sent, headers={"x-api-key": single_token})
                assert (mine.status_code, mine.content) == (theirs.status_code, theirs.content), bad
        sub = fleet.sdk("api-a", token).submit_async(SLUG, **body, instance_masks=True)  # v2, run by a worker
        sub.wait(timeout=60, interval=0.2)
        v2 = httpx.get(f"{fleet.urls['api-b']}/v2/requests/{sub.request_id}", headers={"x-api-key": token}).json()
        assert v2["instances"] == single_instances["instances"]
    assert credits(fleet.store, key.id) == 20 - 9  # four PNGs, four JSON answers, one v2 job; errors are free


def test_a_key_limited_to_n_per_minute_gets_n_answers_across_both_nodes(fleet: Fleet) -> None:
    _, token = keystore.create_key(fleet.store, rate_limit=5)
    body = {"image": image_b64(8, 8), "prompt": "sofa"}
    codes = [
        httpx.post(f"{fleet.urls[node]}/v1/{SLUG}", json=body, headers={"x-api-key": token}, timeout=60).status_code
        for node in ["api-a", "api-b"] * 4
    ]
    assert sorted(codes) == [200] * 5 + [429] * 3, codes


def test_a_poison_job_ends_failed_after_the_attempts_cap(fleet: Fleet) -> None:
    key, token = keystore.create_key(fleet.store, credits=3)
    job = fleet.sdk("api-a", token).submit_async(SLUG, image=image_b64(8, 8), prompt="poison")
    with pytest.raises(segmind.InferenceFailed) as failed:
        job.wait(timeout=120, interval=0.5)
    assert "started 2 times and never finished" in failed.value.detail, fleet.logs()
    assert credits(fleet.store, key.id) == 3  # a failed job is free


def test_a_v1_request_that_kills_its_worker_every_time_is_answered_500(fleet: Fleet) -> None:
    key, token = keystore.create_key(fleet.store, credits=3)
    r = httpx.post(f"{fleet.urls['api-b']}/v1/{SLUG}", json={"image": image_b64(8, 8), "prompt": "poison"},
                   headers={"x-api-key": token}, timeout=60)  # fmt: skip
    assert r.status_code == 500, r.text
    assert r.json()["error"] == (
        f"Unexpected server error (request id {r.headers['x-request-id']}); the server log has the details."
    )
    assert credits(fleet.store, key.id) == 3  # a failure is free


def test_a_job_cancelled_on_one_api_node_stops_on_its_worker_and_is_free(fleet: Fleet) -> None:
    """Before: a running job could not be cancelled; its worker ran it to the end and it was charged."""
    key, token = keystore.create_key(fleet.store, credits=2)
    headers = {"x-api-key": token}
    body = {"image": image_b64(8, 8), "prompt": "staged-fleet-cancel"}
    job = httpx.post(f"{fleet.urls['api-a']}/v2/{SLUG}", json=body, headers=headers, timeout=30).json()
    stages = fleet.root / "stages"
    wait_for((stages / "fleet-cancel.scoring").exists, 30)  # a worker runs it, in its score
    r = httpx.post(f"{fleet.urls['api-b']}/v2/requests/{job['request_id']}/cancel", headers=headers, timeout=30)
    assert r.json() == {"request_id": job["request_id"], "status": "CANCELLED"}
    assert credits(fleet.store, key.id) == 2  # given back at once
    (stages / "fleet-cancel.go").touch()
    stopped = lambda: any("stopped: it was cancelled" in p.read_text() for p in fleet.root.glob("worker-*.log"))  # noqa: E731
    wait_for(stopped, 30)  # the worker read the cancel at its next stage boundary
    status = httpx.get(f"{fleet.urls['api-a']}/v2/requests/{job['request_id']}/status", headers=headers, timeout=30)
    assert status.status_code == 422 and status.json()["status"] == "CANCELLED"
    assert Jobs(fleet.store).result(job["request_id"]) is None and credits(fleet.store, key.id) == 2


def test_the_sweeper_republishes_a_job_whose_publish_was_lost(fleet: Fleet) -> None:
    key, token = keystore.create_key(fleet.store, credits=1)
    request = MaskRequest.model_validate({"image": image_b64(8, 8), "prompt": "sofa"})
    job_id = Jobs(fleet.store).submit(key.id, request, charge=True, model="fake-gradient")  # stored, never published
    status = lambda: httpx.get(f"{fleet.urls['api-b']}/v2/requests/{job_id}/status", headers={"x-api-key": token})  # noqa: E731
    assert status().json()["status"] == "QUEUED"
    wait_for(lambda: status().json()["status"] == "COMPLETED", 30, interval=0.2)
    assert credits(fleet.store, key.id) == 0


def test_killed_workers_and_api_node_lose_nothing_and_charge_once(fleet: Fleet) -> None:
    key, token = keystore.create_key(fleet.store, credits=100)
    jobs = []
    for i in range(6):
        node = ("api-a", "api-b")[i % 2]
        jobs.append(fleet.sdk(node, token).submit_async(SLUG, image=image_b64(), prompt="slow", grow_mask=i))
    ids = [job.request_id for job in jobs]
    running = wait_for(lambda: [i for i, node in processing(fleet.store, ids) if runs_on(fleet, "worker-1", node)], 30)
    fleet.kill("worker-1")  # mid-run: its job runs on worker-2 once its heartbeat expired
    fleet.kill("api-a")  # the jobs it accepted still finish; api-b answers for them
    fleet.start_worker("worker-1")
    for job in jobs:
        url = f"{fleet.urls['api-b']}/v2/requests/{job.request_id}"
        wait_for(lambda u=url: httpx.get(u + "/status", headers={"x-api-key": token}).json()["status"]
                 in ("COMPLETED", "FAILED"), 90, interval=0.3)  # fmt: skip
        result = httpx.get(url, headers={"x-api-key": token}).json()
        assert result["status"] == "COMPLETED", (result, fleet.logs())
        png = httpx.get(result["output"], headers={"x-api-key": token})
        assert decode(png.content).shape == (30, 40)
    assert credits(fleet.store, key.id) == 100 - 6  # exactly one credit per completed job
    assert attempts(fleet.store, running[0]) == 2  # the killed run, then the one that finished
    fleet.start_api("api-a")  # a new node answers for the old jobs too
    first = jobs[0].request_id
    r = httpx.get(f"{fleet.urls['api-a']}/v2/requests/{first}/output", headers={"x-api-key": token})
    assert r.status_code == 200 and decode(r.content).shape == (30, 40)


def worker_nodes(store: Store) -> set[str]:
    with store.read() as conn:
        return set(conn.execute(select(nodes_table.c.id).where(nodes_table.c.kind == "worker")).scalars())


def test_a_rabbitmq_blip_stops_neither_the_running_jobs_nor_the_fleet(fleet: Fleet, rabbitmq_service: Any) -> None:
    """Before: Celery terminated the pool processes running tasks when the connection to RabbitMQ dropped: every
    worker left the nodes table (v1, v2 submits and /readyz answered 503 until it reconnected, longer than the
    outage) and each running job ran again, an attempt burnt per blip (a long job FAILED after a few)."""
    key, token = keystore.create_key(fleet.store, credits=10)
    jobs = [fleet.sdk("api-b", token).submit_async(SLUG, image=image_b64(), prompt="slower") for _ in range(2)]
    ids = [job.request_id for job in jobs]
    wait_for(lambda: len(processing(fleet.store, ids)) == 2, 30)
    before = worker_nodes(fleet.store)
    rabbitmq_service.ctl("stop_app")
    try:
        time.sleep(2.0)  # RabbitMQ is down; the jobs are still running
        assert worker_nodes(fleet.store) == before, fleet.logs()  # no pool process was terminated
        assert httpx.get(f"{fleet.urls['api-b']}/readyz").status_code == 200
    finally:
        rabbitmq_service.ctl("start_app")
        rabbitmq_service.ctl("await_startup")
    for job_id in ids:
        url = f"{fleet.urls['api-b']}/v2/requests/{job_id}/status"
        wait_for(lambda u=url: httpx.get(u, headers={"x-api-key": token}).json()["status"] == "COMPLETED", 60,
                 interval=0.3)  # fmt: skip
        assert attempts(fleet.store, job_id) == 1  # run once: not killed, and its redelivered copy dropped
    assert credits(fleet.store, key.id) == 10 - 2


def test_a_v1_call_whose_worker_dies_is_answered_by_another(fleet: Fleet) -> None:
    key, token = keystore.create_key(fleet.store, credits=10)
    answers: list[httpx.Response] = []
    body = {"image": image_b64(), "prompt": "slow"}
    started = time.monotonic()
    calls = [
        threading.Thread(target=lambda n=n: answers.append(
            httpx.post(f"{fleet.urls[n]}/v1/{SLUG}", json=body, headers={"x-api-key": token}, timeout=60)))
        for n in ("api-a", "api-b")
    ]  # fmt: skip
    for call in calls:
        call.start()
    time.sleep(1.0)  # both workers are computing
    fleet.kill("worker-2")
    for call in calls:
        call.join(timeout=60)
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert time.monotonic() - started < 30
    assert credits(fleet.store, key.id) == 8
    fleet.start_worker("worker-2")
