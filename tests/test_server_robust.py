"""Issue 11's database, credit, model and privacy fixes, each through a live server on loopback."""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.jobs import Jobs
from automask.server.schemas import MaskRequest
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import FakeBackend, LiveServer, live_server, png_bytes, wait_for

SLUG = "automatic-mask-generator"


@pytest.fixture()
def image_b64() -> str:
    rng = np.random.default_rng(1)
    return base64.b64encode(png_bytes(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))).decode()


def holds(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "automask.db") as conn:
        return [r[0] for r in conn.execute("SELECT id FROM holds")]


@pytest.mark.slow
def test_a_locked_database_never_stalls_the_loop_fails_a_mask_or_leaves_a_hold(tmp_path: Path, image_b64: str) -> None:
    """Before: the v1 settle ran on the event loop: /healthz stalled behind another process's write lock, and after
    10 s a finished mask answered 500 with its credit still held."""
    data = tmp_path / "data"
    with live_server(data, FakeBackend(delay=1.0)) as live:
        store = Store.in_data_dir(data)
        key, token = keystore.create_key(store, credits=5)
        answer: dict[str, Any] = {}

        def call() -> None:
            r = httpx.post(f"{live.url}/v1/{SLUG}", json={"image": image_b64, "prompt": "sofa"},
                           headers={"x-api-key": token}, timeout=60)  # fmt: skip
            answer.update(status=r.status_code, type=r.headers["content-type"], at=time.monotonic())

        thread = threading.Thread(target=call)
        thread.start()
        wait_for(lambda: holds(data), 10)  # the credit is held, the mask is being computed
        locker = sqlite3.connect(data / "automask.db", isolation_level=None, timeout=1)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock for 12 s (> SQLite's 10 s wait)
        locked_at = time.monotonic()
        try:
            seconds = []
            while time.monotonic() - locked_at < 12:
                t = time.perf_counter()
                assert httpx.get(f"{live.url}/healthz", timeout=5).status_code == 200
                seconds.append(time.perf_counter() - t)
                time.sleep(0.2)
            thread.join(timeout=1)
            assert answer["status"] == 200 and answer["type"] == "image/png"  # the finished mask is delivered
            assert answer["at"] - locked_at < 5  # within ~1 s of inference + 2 s of waiting for the settle
            # before: every request stalled for the 10 s SQLite waits (the CPU here is shared: a median, and a bound;
            # CI once measured a median of 0.103 s with other test processes on its 2 cores)
            assert float(np.median(seconds)) < 0.5 and max(seconds) < 1.0, seconds
            assert holds(data)  # not settled yet: the database is still locked
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        wait_for(lambda: not holds(data), 15)  # the retried settle went through
        assert keystore.get_key(store, key.id).credits == 4  # type: ignore[union-attr]  # charged once


def test_restart_with_a_missing_model_keeps_jobs_queued_and_names_no_path(
    tmp_path: Path, tiny_clipseg_dir: Path, image_b64: str
) -> None:
    """Before: a restart with a missing model folder turned every queued job FAILED, and /readyz showed the path."""
    data, folder = tmp_path / "data", tmp_path / "secret-place" / "my-model"
    store = Store.in_data_dir(data)
    jobs = Jobs(store)
    request = MaskRequest.model_validate({"image": image_b64, "prompt": "cat", "grow_mask": 0})
    ids = [jobs.submit(None, request, charge=False, model="my-model") for _ in range(2)]
    with live_server(data, model=str(folder), auth=False) as live:
        r = httpx.get(f"{live.url}/readyz")
        assert r.status_code == 503 and "'my-model'" in r.json()["error"]
        assert "secret-place" not in r.text and str(tmp_path) not in r.text
        v1 = httpx.post(f"{live.url}/v1/{SLUG}", json={"image": image_b64, "prompt": "cat"})
        assert v1.status_code == 503 and "secret-place" not in v1.text
        time.sleep(6)
        assert [jobs.get(i).status for i in ids] == ["QUEUED", "QUEUED"]  # type: ignore[union-attr]
        shutil.copytree(tiny_clipseg_dir, folder)  # the operator fixes the folder
        for job_id in ids:
            wait_for(lambda j=job_id: jobs.get(j).status == "COMPLETED", 40, interval=0.2)  # type: ignore[union-attr]
        assert httpx.get(f"{live.url}/readyz").status_code == 200


def test_model_loading_does_not_count_against_the_timeout(
    tmp_path: Path, tiny_clipseg_dir: Path, image_b64: str
) -> None:
    """Before: the first jobs after a start failed with "Masking took longer than the server's limit" because
    loading the model (importing torch and transformers) counted against a short --timeout. 2 s: loading takes ~5 s
    here, one inference of the tiny model well under a second even on a busy machine (0.5 s was too tight there)."""
    with live_server(tmp_path / "data", model=str(tiny_clipseg_dir), auth=False, timeout=2.0) as live:
        body = {"image": image_b64, "prompt": "cat"}
        sub = httpx.post(f"{live.url}/v2/{SLUG}", json=body).json()  # sent while the model is still loading
        v1 = httpx.post(f"{live.url}/v1/{SLUG}", json=body, timeout=60)
        assert v1.status_code == 200, v1.text
        status = wait_for(lambda: httpx.get(sub["status_url"]).json(), 60)
        wait_for(lambda: httpx.get(sub["status_url"]).json()["status"] == "COMPLETED", 60, interval=0.2)
        assert status["request_id"] == sub["request_id"]


def test_v2_refuses_an_oversized_image_at_once_and_caps_the_queue(tmp_path: Path, image_b64: str) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, max_image_bytes=2000)
    server = ServerSettings(max_queued_per_key=2, max_queued=3, job_workers=1)
    with LiveServer(create_app(settings, server, MaskGenerator(FakeBackend(delay=2.0), settings))) as live:
        store = Store.in_data_dir(data)
        a, token_a = keystore.create_key(store, credits=10)
        _, token_b = keystore.create_key(store)
        big = base64.b64encode(os.urandom(3000)).decode()
        for headers, kwargs in (
            ({"x-api-key": token_a}, {"json": {"image": big, "prompt": "sofa"}}),
            ({"x-api-key": token_a}, {"json": {"image": f"data:image/png;base64,{big}", "prompt": "sofa"}}),
            ({"x-api-key": token_a}, {"data": {"prompt": "sofa"}, "files": {"image": ("a.png", os.urandom(3000))}}),
        ):
            r = httpx.post(f"{live.url}/v2/{SLUG}", headers=headers, **kwargs)
            assert r.status_code == 413 and "limit is 2,000 bytes" in r.json()["error"], r.text
        v1 = httpx.post(f"{live.url}/v1/{SLUG}", headers={"x-api-key": token_a}, json={"image": big, "prompt": "s"})
        assert v1.status_code == 413 and v1.json()["error"] == r.json()["error"]  # the same answer as v1's
        assert Jobs(store).queued() == [] and keystore.get_key(store, a.id).credits == 10  # type: ignore[union-attr]

        ok = {"image": base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode(), "prompt": "sofa"}
        answers = [httpx.post(f"{live.url}/v2/{SLUG}", headers={"x-api-key": token_a}, json=ok) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert answers[2].headers["retry-after"] == "5"  # like every 429, it says when to come back (CONTRACT.md)
        reset_at = datetime.strptime(answers[2].headers["x-rate-limit-reset-at-utc"], "%Y-%m-%dT%H:%M:%SZ")
        assert abs(reset_at.replace(tzinfo=timezone.utc).timestamp() - (time.time() + 5)) < 3
        full = httpx.post(f"{live.url}/v2/{SLUG}", headers={"x-api-key": token_b}, json=ok)
        assert full.status_code == 200
        full = httpx.post(f"{live.url}/v2/{SLUG}", headers={"x-api-key": token_b}, json=ok)
        assert full.status_code == 503 and "queue is full" in full.json()["error"] and full.headers["retry-after"]
        assert keystore.get_key(store, a.id).credits == 8  # type: ignore[union-attr]  # refused submits are free


def test_v2_caps_the_bytes_queued_jobs_store_in_the_database(tmp_path: Path) -> None:
    """Before, 100 queued jobs of a largest upload each, per key, went into the database: the body budget bounds
    memory, not storage. Past a key's bytes: 429 with Retry-After, in the contract's shape, nothing stored or held."""
    data = tmp_path / "data"
    settings = Settings(data_dir=data)
    server = ServerSettings(max_queued_bytes_per_key=50_000, max_queued_bytes=10**9, job_workers=1)
    with LiveServer(create_app(settings, server, MaskGenerator(FakeBackend(delay=5.0), settings))) as live:
        store = Store.in_data_dir(data)
        key, token = keystore.create_key(store, credits=10)
        upload = {"data": {"prompt": "sofa"}, "files": {"image": ("a.png", png_bytes(np.zeros((8, 8, 3), np.uint8)))}}
        pixels = np.random.default_rng(2).integers(0, 256, (100, 80, 3), dtype=np.uint8)
        big = {"data": {"prompt": "sofa"}, "files": {"image": ("b.png", png_bytes(pixels))}}  # ~24 kB each
        answers = [httpx.post(f"{live.url}/v2/{SLUG}", headers={"x-api-key": token}, **big) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429], answers[-1].text
        assert answers[2].headers["retry-after"] == "5" and answers[2].headers["x-rate-limit-reset-at-utc"]
        assert list(answers[2].json()) == ["error"] and "MAX_QUEUED_BYTES_PER_KEY" in answers[2].json()["error"]
        with sqlite3.connect(data / "automask.db") as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2  # nothing stored for the third
        assert keystore.get_key(store, key.id).credits == 8  # type: ignore[union-attr]  # the refused one is free
        small = httpx.post(f"{live.url}/v2/{SLUG}", headers={"x-api-key": token}, **upload)
        assert small.status_code == 200  # a small one still fits


def test_data_folder_and_database_are_private_whatever_the_umask(tmp_path: Path, image_b64: str) -> None:
    old = os.umask(0o022)
    try:
        data = tmp_path / "fresh" / "data"
        with live_server(data, FakeBackend(), auth=False) as live:
            sub = httpx.post(f"{live.url}/v2/{SLUG}", json={"image": image_b64, "prompt": "sofa"}).json()
            wait_for(lambda: httpx.get(sub["status_url"]).json()["status"] == "COMPLETED", 10)
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir()}
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert {name: mode for name, mode in modes.items() if name.startswith("automask.db")} == {
            "automask.db": 0o600, "automask.db-wal": 0o600, "automask.db-shm": 0o600,
        } or modes == {"automask.db": 0o600}  # fmt: skip
        assert all(mode & 0o077 == 0 for mode in modes.values()), modes
        assert not (data / "results").exists()  # uploads and results live in the (private) database
    finally:
        os.umask(old)


def test_no_auth_never_shows_keyed_jobs(tmp_path: Path, image_b64: str) -> None:
    """Before: `--no-auth` on a data folder with keyed jobs served every key's results to anyone."""
    data = tmp_path / "data"
    with live_server(data, FakeBackend()) as live:
        _, token = keystore.create_key(Store.in_data_dir(data))
        keyed = httpx.post(f"{live.url}/v2/{SLUG}", headers={"x-api-key": token},
                           json={"image": image_b64, "prompt": "sofa"}).json()  # fmt: skip
        done = lambda: httpx.get(keyed["status_url"], headers={"x-api-key": token}).json()["status"] == "COMPLETED"  # noqa: E731
        wait_for(done, 10)
    with live_server(data, FakeBackend(), auth=False) as live:
        for suffix in ("/status", "", "/output"):
            r = httpx.get(f"{live.url}/v2/requests/{keyed['request_id']}{suffix}")
            assert r.status_code == 404, (suffix, r.text)
        mine = httpx.post(f"{live.url}/v2/{SLUG}", json={"image": image_b64, "prompt": "sofa"}).json()
        wait_for(lambda: httpx.get(mine["status_url"]).json()["status"] == "COMPLETED", 10)
        assert httpx.get(f"{live.url}/v2/requests/{mine['request_id']}/output").status_code == 200


def test_v2_cancel_and_credits_extensions(tmp_path: Path, image_b64: str) -> None:
    data = tmp_path / "data"
    with live_server(data, FakeBackend(delay=1.5), job_workers=1) as live:
        store = Store.in_data_dir(data)
        key, token = keystore.create_key(store, credits=5)
        _, other = keystore.create_key(store)
        headers = {"x-api-key": token}
        credits = lambda h=headers: httpx.get(f"{live.url}/v1/credits", headers=h).json()  # noqa: E731
        assert credits() == {"key_id": key.id, "credits": 5}
        assert credits({"x-api-key": other})["credits"] is None  # unlimited
        assert httpx.get(f"{live.url}/v1/credits").status_code == 401
        body = {"image": image_b64, "prompt": "sofa"}
        running, queued = (httpx.post(f"{live.url}/v2/{SLUG}", json=body, headers=headers).json() for _ in range(2))
        assert credits()["credits"] == 3  # both held
        cancel = f"{live.url}/v2/requests/{queued['request_id']}/cancel"
        assert httpx.post(cancel, headers={"x-api-key": other}).status_code == 404  # not another key's job
        r = httpx.post(cancel, headers=headers)
        assert r.status_code == 200 and r.json() == {"request_id": queued["request_id"], "status": "CANCELLED"}
        status = httpx.get(queued["status_url"], headers=headers)
        assert status.status_code == 422 and status.json()["status"] == "CANCELLED"
        wait_for(lambda: httpx.get(running["status_url"], headers=headers).json()["status"] == "COMPLETED", 20)
        done = httpx.post(f"{live.url}/v2/requests/{running['request_id']}/cancel", headers=headers)
        assert done.json() == {"request_id": running["request_id"], "status": "COMPLETED"}  # unchanged
        time.sleep(2.0)  # the cancelled job never runs
        assert httpx.get(queued["status_url"], headers=headers).json()["status"] == "CANCELLED"
        assert credits()["credits"] == 4  # one completed job charged; the cancelled one given back
