"""A run nobody waits for stops: through a live server on loopback (in-process models), a run whose client left or
whose time limit passed stops at its next stage boundary (or inside a running model stage), and is never charged."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from automask.backends import clipseg
from automask.errors import InferenceTimeoutError
from automask.options import MaskOptions
from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server.config import ServerSettings
from automask.server.runner import Runner, inference_timeout
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import LiveServer, StagedBackend, live_server, png_bytes, wait_for

SLUG = "automatic-mask-generator"


@pytest.fixture()
def body() -> dict[str, Any]:
    image = base64.b64encode(png_bytes(np.zeros((12, 16, 3), np.uint8))).decode()
    return {"image": image, "prompt": "sofa"}


def runner_of(live: LiveServer) -> Runner:
    runner: Runner = live.app.state.automask.dispatcher.runner
    return runner


def send_and_leave_open(url: str, token: str, body: dict[str, Any]) -> socket.socket:
    """POST a v1 request on a raw connection and return it unread (the test closes it: the client leaves)."""
    parts = urlsplit(url)
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/{SLUG} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"x-api-key: {token}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(head.encode() + data)
    return sock


def credits(store: Store, key_id: str) -> int | None:
    key = keystore.get_key(store, key_id)
    assert key is not None
    return key.credits


def test_a_run_whose_client_left_stops_at_the_next_stage_and_is_not_charged(
    tmp_path: Path, body: dict[str, Any]
) -> None:
    """Before: the client leaving cancelled only a call still waiting for a thread; one running went through every
    stage to the end (holding the inference thread) and its result was dropped."""
    data = tmp_path / "data"
    backend = StagedBackend()
    with live_server(data, backend) as live:
        store = Store.in_data_dir(data)
        key, token = keystore.create_key(store, credits=3)
        client = send_and_leave_open(live.url, token, body)
        assert backend.entered["encode"].wait(10)
        assert credits(store, key.id) == 2  # held while it runs
        client.close()  # the client leaves mid-encode
        wait_for(lambda: credits(store, key.id) == 3, 10)  # the server saw it go: the credit is back
        backend.release()
        wait_for(lambda: runner_of(live).overdue == 0, 10)  # the thread is free again...
        assert backend.seen == ["encode"] and not backend.entered["score"].is_set()  # ... and it never scored
        answered = httpx.post(f"{live.url}/v1/{SLUG}", json=body, headers={"x-api-key": token}, timeout=30)
        assert answered.status_code == 200, answered.text
        assert backend.seen == ["encode", "score"]  # the next request scores (the features were cached)
        assert credits(store, key.id) == 2  # only the answered request is charged
        store.close()


def test_a_run_past_its_time_limit_is_answered_504_and_its_thread_stops(tmp_path: Path, body: dict[str, Any]) -> None:
    """Before: the request was answered 504 but its thread ran on to the end, holding the server's only inference
    thread for as long as the model took."""
    data = tmp_path / "data"
    backend = StagedBackend()
    with live_server(data, backend, timeout=1.0) as live:
        store = Store.in_data_dir(data)
        key, token = keystore.create_key(store, credits=3)
        r = httpx.post(f"{live.url}/v1/{SLUG}", json=body, headers={"x-api-key": token}, timeout=30)
        assert r.status_code == 504 and r.json() == {"error": inference_timeout(1.0).message}
        assert backend.entered["encode"].is_set() and runner_of(live).overdue == 1  # still in its encode
        backend.release()
        wait_for(lambda: runner_of(live).overdue == 0, 10)
        assert backend.seen == ["encode"] and not backend.entered["score"].is_set()
        assert credits(store, key.id) == 3  # a request answered 504 is never charged
        store.close()


def test_a_run_past_its_time_limit_stops_inside_its_encode(
    tmp_path: Path, body: dict[str, Any], tiny_clipseg_dir: Path
) -> None:
    """A real model whose encode takes 4.5 s (three vision layers of 1.5 s), a limit of 0.5 s: answered 504, the thread
    is free again once the layer running at the limit ends (the next one asks: it is more than
    `automask.stopping.INSIDE_EVERY` since the last asking). Before: it ran the encode's three layers to the end."""
    backend = clipseg.load(tiny_clipseg_dir, Settings())
    entered: list[int] = []
    slow = [
        layer.register_forward_pre_hook(lambda *_: entered.append(1) or time.sleep(1.5))
        for layer in backend.model.clip.vision_model.encoder.layers
    ]
    data = tmp_path / "data"
    with live_server(data, backend, timeout=0.5) as live:
        store = Store.in_data_dir(data)
        key, token = keystore.create_key(store, credits=3)
        r = httpx.post(f"{live.url}/v1/{SLUG}", json=body, headers={"x-api-key": token}, timeout=30)
        assert r.status_code == 504 and runner_of(live).overdue == 1
        wait_for(lambda: runner_of(live).overdue == 0, 10)
        assert 1 <= len(entered) < 3  # stopped between two of its layers
        assert credits(store, key.id) == 3
        store.close()
    for handle in slow:
        handle.remove()


def test_a_running_v2_job_cancelled_stops_at_the_next_stage_and_is_not_charged(
    tmp_path: Path, body: dict[str, Any]
) -> None:
    """Before: cancel answered a running job with its status unchanged; it ran to the end and was charged."""
    data = tmp_path / "data"
    backend = StagedBackend()
    with live_server(data, backend, job_workers=1) as live:
        store = Store.in_data_dir(data)
        key, token = keystore.create_key(store, credits=3)
        headers = {"x-api-key": token}
        job = httpx.post(f"{live.url}/v2/{SLUG}", json=body, headers=headers, timeout=30).json()
        assert backend.entered["encode"].wait(10)
        assert httpx.get(job["status_url"], headers=headers).json()["status"] == "PROCESSING"
        assert credits(store, key.id) == 2  # held while it runs
        r = httpx.post(f"{live.url}/v2/requests/{job['request_id']}/cancel", headers=headers)
        assert r.status_code == 200 and r.json() == {"request_id": job["request_id"], "status": "CANCELLED"}
        assert credits(store, key.id) == 3  # given back at once
        backend.release()
        # the next job runs once the cancelled one left the only job worker; its features are cached
        nxt = httpx.post(f"{live.url}/v2/{SLUG}", json=body, headers=headers, timeout=30).json()
        wait_for(lambda: httpx.get(nxt["status_url"], headers=headers).json()["status"] == "COMPLETED", 20)
        assert backend.seen == ["encode", "score"]  # the cancelled run never scored; the next one did
        status = httpx.get(job["status_url"], headers=headers)
        assert status.status_code == 422 and status.json()["status"] == "CANCELLED"
        assert httpx.get(f"{live.url}/v2/requests/{job['request_id']}/output", headers=headers).status_code == 422
        again = httpx.post(f"{live.url}/v2/requests/{job['request_id']}/cancel", headers=headers)
        assert again.json()["status"] == "CANCELLED" and credits(store, key.id) == 2  # refunded once; one charged
        store.close()


def test_a_call_given_what_is_left_of_the_limit_names_the_servers_limit(tmp_path: Path, body: dict[str, Any]) -> None:
    """A fleet worker runs a v1 request within what is left of its deadline (`run_blocking(timeout=...)`). Before:
    its 504 named that remainder ("the server's limit of 0.5 s", 57.2839 s after a wait in the queue), where the
    single process (and the API node itself) says "the server's limit of 60 s": the fleet's answer differed."""
    settings = Settings(data_dir=tmp_path / "models")
    backend = StagedBackend()
    runner = Runner(settings, ServerSettings(timeout=60.0), MaskGenerator(backend, settings))
    try:
        with pytest.raises(InferenceTimeoutError) as timed_out:
            runner.run_blocking(body["image"], "sofa", MaskOptions(), timeout=0.5)
        assert timed_out.value.message == inference_timeout(60.0).message
    finally:
        backend.release()
        runner.close()
