"""A job accepted is never lost: `automask serve` killed (SIGKILL) mid-queue, restarted, runs every job."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from automask.server import keys as keystore
from automask.server.store import Store
from server_helpers import decode, free_port, server_process, wait_for, wait_ready

SLUG = "automatic-mask-generator"


def status(url: str, job: str, token: str) -> str:
    return str(httpx.get(f"{url}/v2/requests/{job}/status", headers={"x-api-key": token}).json()["status"])


@pytest.mark.slow
def test_restart_in_the_middle_of_queued_jobs(tmp_path: Path, tiny_clipseg_dir: Path, chelsea: np.ndarray) -> None:
    data = tmp_path / "data"
    key, token = keystore.create_key(Store.in_data_dir(data), credits=10)
    buf = io.BytesIO()
    Image.fromarray(chelsea[:120, :160]).save(buf, format="JPEG")
    body = {"image": base64.b64encode(buf.getvalue()).decode(), "prompt": "cat", "grow_mask": 2}
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{free_port()}"
    slow = {"AUTOMASK_SERVER_DEBUG_DELAY": "3"}  # test-only hook: every inference sleeps 3 s
    with server_process(data, tiny_clipseg_dir, int(url.rsplit(":", 1)[1]), slow, log) as proc:
        wait_ready(url, 60, proc)
        jobs = []
        for threshold in (0.1, 0.2, 0.3, 0.4):
            r = httpx.post(f"{url}/v2/{SLUG}", json={**body, "threshold": threshold}, headers={"x-api-key": token})
            assert r.status_code == 200, r.text
            jobs.append(r.json()["request_id"])
        wait_for(lambda: status(url, jobs[0], token) == "PROCESSING", 20)
        before = [status(url, job, token) for job in jobs]
        proc.kill()
        proc.wait(timeout=10)
    assert before == ["PROCESSING", "QUEUED", "QUEUED", "QUEUED"], log.read_text()[-2000:]

    url = f"http://127.0.0.1:{free_port()}"
    with server_process(data, tiny_clipseg_dir, int(url.rsplit(":", 1)[1]), {}, log) as proc:
        wait_ready(url, 60, proc)
        for job in jobs:
            wait_for(lambda job=job: status(url, job, token) == "COMPLETED", 30, interval=0.2)
            result = httpx.get(f"{url}/v2/requests/{job}", headers={"x-api-key": token}).json()
            assert result["output"] == f"{url}/v2/requests/{job}/output"
            png = httpx.get(result["output"], headers={"x-api-key": token}).content
            assert decode(png).shape == (120, 160)
    assert keystore.get_key(Store.in_data_dir(data), key.id).credits == 6  # each job charged exactly once
