"""A server stopping with v2 jobs running (in-process models): a job running when the stop begins (SIGTERM) gets
`shutdown_timeout` to finish; one still running then is cut off at its next stage boundary and put back in the
queue, its attempt not counted, and the next start runs it."""

from __future__ import annotations

import base64
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from automask.server import keys as keystore
from automask.server.store import Store, holds_table, jobs_table
from server_helpers import (
    LiveServer,
    StagedBackend,
    free_port,
    live_server,
    png_bytes,
    server_process,
    wait_for,
    wait_ready,
)

SLUG = "automatic-mask-generator"


def submit(live: LiveServer, token: str, body: dict[str, Any]) -> str:
    r = httpx.post(f"{live.url}/v2/{SLUG}", json=body, headers={"x-api-key": token}, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def stop_while(live: LiveServer, backend: StagedBackend, seconds: float, *stages: str) -> bool:
    """Begin the server's stop, wait up to `seconds` for it to end, then let the backend through `stages`; whether
    the stop was still waiting by then. The server is stopped on return."""
    live.server.should_exit = True
    live.thread.join(timeout=seconds)
    waited = live.thread.is_alive()
    backend.release(*stages)
    live.__exit__(None, None, None)
    return waited


def started(
    data: Path, body: dict[str, Any], shutdown_timeout: float
) -> tuple[LiveServer, StagedBackend, Store, tuple[Any, str]]:
    """A started server on `data` (one job worker, the stages driven by the test) and (key, token) of a new key."""
    backend = StagedBackend()
    live = live_server(data, backend, job_workers=1, shutdown_timeout=shutdown_timeout).__enter__()
    store = Store.in_data_dir(data)
    return live, backend, store, keystore.create_key(store, credits=3)


def job_row(store: Store, job_id: str) -> tuple[str, int]:
    with store.read() as conn:
        row = conn.execute(select(jobs_table.c.status, jobs_table.c.attempts).where(jobs_table.c.id == job_id)).one()
    return str(row.status), int(row.attempts)


@contextmanager
def serving_a_job(tmp_path: Path, model: Path, delay: float) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`automask serve` (every inference sleeps `delay` s: a test-only hook) running a v2 job of a key with 3
    credits, in `tmp_path / "data"`; yields the process and the job's id once the job is PROCESSING."""
    store = Store.in_data_dir(tmp_path / "data")
    _, token = keystore.create_key(store, credits=3)
    body = {"image": base64.b64encode(png_bytes(np.zeros((12, 16, 3), np.uint8))).decode(), "prompt": "cat"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slow = {"AUTOMASK_SERVER_DEBUG_DELAY": str(delay)}
    try:
        with server_process(tmp_path / "data", model, port, slow, tmp_path / "server.log") as proc:
            wait_ready(url, 60, proc)
            r = httpx.post(f"{url}/v2/{SLUG}", json=body, headers={"x-api-key": token}, timeout=30)
            job = r.json()["request_id"]
            wait_for(lambda: job_row(store, job)[0] == "PROCESSING", 20)
            yield proc, job
    finally:
        store.close()


def job_and_credits(tmp_path: Path, job: str) -> tuple[tuple[str, int], int | None, bool]:
    """The job's (status, attempts), its key's credits, and whether a credit of that key is held for it."""
    store = Store.in_data_dir(tmp_path / "data")
    try:
        with store.read() as conn:
            held = conn.execute(select(holds_table.c.key_id).where(holds_table.c.id == job)).scalar()
            key = conn.execute(select(jobs_table.c.key_id).where(jobs_table.c.id == job)).scalar_one()
        return job_row(store, job), keystore.get_key(store, key).credits, held == key  # type: ignore[union-attr]
    finally:
        store.close()


def test_sigterm_lets_a_running_v2_job_finish_and_charges_it(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    """`automask serve` sent SIGTERM while a v2 job runs (an inference of 2 s). Before: it died 0.2 s later, of its
    own re-raised SIGTERM, mid-run: the job was left PROCESSING with its attempt counted (run again after the
    restart; after `max_job_attempts` restarts in a row, the job, always the oldest in the queue, ended FAILED for
    nothing it did), though README promises requests in flight `--shutdown-timeout` (10 s) to finish."""
    with serving_a_job(tmp_path, tiny_clipseg_dir, 2) as (proc, job):
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log = (tmp_path / "server.log").read_text()[-2000:]
    assert job_and_credits(tmp_path, job) == (("COMPLETED", 1), 2, False), log  # charged once


def test_a_v2_job_still_running_at_the_shutdown_timeout_goes_back_to_the_queue_uncounted(
    tmp_path: Path, body: dict[str, Any]
) -> None:
    """Cut off at its next stage boundary: QUEUED again, attempt not counted, never scored; the next start runs it
    and charges it once. Before: left PROCESSING with its attempt counted."""
    data = tmp_path / "data"
    live, backend, store, (key, token) = started(data, body, 0.5)
    job = submit(live, token, body)
    assert backend.entered["encode"].wait(10)
    stop_while(live, backend, 1.5, "encode")  # past the timeout: it may leave its encode, not go on to score
    assert job_row(store, job) == ("QUEUED", 0)
    assert backend.seen == ["encode"]
    again = StagedBackend()
    again.release()
    with live_server(data, again, job_workers=1):
        wait_for(lambda: job_row(store, job)[0] == "COMPLETED", 20)
    assert job_row(store, job) == ("COMPLETED", 1)
    assert keystore.get_key(store, key.id).credits == 2  # type: ignore[union-attr]
    store.close()


def test_a_second_stop_signal_cuts_the_running_v2_jobs_off_at_once(tmp_path: Path, body: dict[str, Any]) -> None:
    """As uvicorn stops waiting for the requests in flight at a second SIGINT/SIGTERM (Ctrl-C twice), the running
    jobs go back to the queue at their next stage boundary instead of being waited for."""
    live, backend, store, (_, token) = started(tmp_path / "data", body, 20)
    job = submit(live, token, body)
    assert backend.entered["encode"].wait(10)
    state = live.app.state.automask
    state.ask_stop()  # the first signal
    live.server.should_exit = True
    state.ask_stop()  # the second
    backend.release("encode")
    live.thread.join(timeout=5)
    stopped = not live.thread.is_alive()
    backend.release()
    live.__exit__(None, None, None)
    assert stopped and job_row(store, job) == ("QUEUED", 0)
    assert backend.seen == ["encode"]
    store.close()


@pytest.mark.parametrize("signals", [1, 2])
def test_no_v2_job_starts_once_a_stop_signal_came(
    tmp_path: Path, body: dict[str, Any], signals: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job queued here, behind a running one, while uvicorn still waits for the requests in flight after SIGTERM:
    it is not started (it stays QUEUED, attempt not counted, for another node or the restart). Before: it was claimed
    and run after the signal (cut off later, its work lost; after a second signal, claimed and cut over and over)."""
    live, backend, store, (_, token) = started(tmp_path / "data", body, 20)
    first = submit(live, token, body)
    assert backend.entered["encode"].wait(10)
    state = live.app.state.automask
    jobs = state.dispatcher.jobs
    claims: list[str] = []
    claim = jobs.claim
    monkeypatch.setattr(jobs, "claim", lambda job_id, *a, **kw: claims.append(job_id) or claim(job_id, *a, **kw))
    second = submit(live, token, body)
    for _ in range(signals):
        state.ask_stop()  # uvicorn is still waiting for the connections in flight: the app is not stopped yet
    backend.release()
    wait_for(lambda: job_row(store, first)[0] != "PROCESSING", 10)
    time.sleep(0.5)  # time for the job worker to take the next job, if it would
    try:
        assert second not in claims and job_row(store, second) == ("QUEUED", 0)
        assert backend.seen.count("encode") == 1
    finally:
        live.__exit__(None, None, None)
    assert job_row(store, second) == ("QUEUED", 0)
    store.close()


@pytest.fixture()
def body() -> dict[str, Any]:
    image = base64.b64encode(png_bytes(np.zeros((12, 16, 3), np.uint8))).decode()
    return {"image": image, "prompt": "sofa"}


def test_ctrl_c_twice_on_serve_puts_the_running_v2_job_back_uncounted(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    """Ctrl-C twice on `automask serve` while a v2 job runs (an inference of 3 s): uvicorn exits at the second SIGINT
    without the app's shutdown step (no `Dispatcher.stop`). The job still goes back to the queue, its attempt not
    counted, its credit held (not charged): the signal handler cut it off (`ServerState.ask_stop`) and the process's
    exit waits for its thread, which puts it back at its next stage boundary. Exit 130, as a Ctrl-C."""
    with serving_a_job(tmp_path, tiny_clipseg_dir, 3) as (proc, job):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    log = (tmp_path / "server.log").read_text()[-2000:]
    assert job_and_credits(tmp_path, job) == (("QUEUED", 0), 2, True), log  # held for the restart, not charged
