"""AUTOMASK_REDIS_URL unreachable: `serve` refuses to start (exit 9, naming the setting); Redis going away while it
runs makes /readyz say so (503) and requests answer 503 without being charged, until Redis is back.

Before, `serve` started with an unreachable Redis and /readyz said ready, yet every request was answered 503.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from automask.cli import main
from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import FakeBackend, LiveServer, free_port, png_bytes, wait_for
from services import redis_server

FLEET = {"AUTOMASK_BROKER_URL": "amqp://guest:guest@127.0.0.1:9//"}  # never connected before Redis is checked


@pytest.mark.parametrize("kind", ["single", "fleet"])
def test_serve_refuses_to_start_when_redis_is_unreachable(tmp_path: Path, kind: str) -> None:
    env = {"AUTOMASK_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}  # nothing listens there
    if kind == "fleet":  # an API node of a fleet: the same start-up
        env |= {**FLEET, "AUTOMASK_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}"}
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "serve", "--port", "0"], env=env)
    assert result.exit_code == 9, result.output
    assert "Cannot connect to Redis at redis://127.0.0.1:" in result.output
    assert "Check AUTOMASK_REDIS_URL" in result.output
    assert "hunter2" not in result.output and "Traceback" not in result.output


@pytest.mark.services
def test_readyz_follows_redis_and_requests_are_refused_uncharged_while_it_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Also: the log says once that Redis stopped answering, and once that it answers again (before: a warning per
    /readyz probe for the whole outage)."""
    import services

    settings_dir = tmp_path / "data"
    with redis_server() as rd:
        settings = Settings(data_dir=settings_dir, redis_url=rd.url)
        app = create_app(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))
        store = Store.in_data_dir(settings_dir)
        key, token = keystore.create_key(store, rate_limit=5, credits=2)
        image = base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode()
        with LiveServer(app) as live:

            def ask(path: str = "/readyz") -> httpx.Response:
                if path == "/readyz":
                    return httpx.get(live.url + path, timeout=30)
                body = {"image": image, "prompt": "s"}
                return httpx.post(live.url + path, json=body, headers={"x-api-key": token}, timeout=30)

            assert wait_for(lambda: ask().status_code == 200, 30)
            port = rd.port
            rd.stop()
            ready = ask()
            assert ready.status_code == 503 and "AUTOMASK_REDIS_URL" in ready.json()["error"], ready.text
            assert "127.0.0.1" not in ready.text  # public: no address
            assert [ask().status_code for _ in range(3)] == [503] * 3
            refused = ask("/v1/automatic-mask-generator")
            assert refused.status_code == 503 and "shared state is unreachable" in refused.json()["error"]
            assert keystore.get_key(store, key.id).credits == 2  # type: ignore[union-attr]
            monkeypatch.setattr(services, "free_port", lambda: port)  # Redis back, where it was
            rd.start()
            assert wait_for(lambda: ask().status_code == 200, 30)
            assert ask("/v1/automatic-mask-generator").status_code == 200
            assert keystore.get_key(store, key.id).credits == 1  # type: ignore[union-attr]
        store.close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Redis (AUTOMASK_REDIS_URL) ")]
    assert len(said) == 2 and "does not answer (" in said[0], said
    assert said[1] == "Redis (AUTOMASK_REDIS_URL) answers again: ready"


def _hand_off_parts(tmp_path: Path, store: Store, redis_url: str, timeout: float) -> tuple[Any, Any]:
    """An API node's `CeleryDispatcher` on `store` and the Redis at `redis_url` (RabbitMQ never reached), with a
    request timeout of `timeout` seconds, and a v1 request to hand off."""
    from automask.server import fleet
    from automask.server.schemas import MaskRequest

    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=store.url.render_as_string(hide_password=False),
        broker_url=FLEET["AUTOMASK_BROKER_URL"],
        redis_url=redis_url,
    )
    dispatcher = fleet.CeleryDispatcher(settings, ServerSettings(timeout=timeout), store)
    request = MaskRequest(image=base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode(), prompt="cup")
    return dispatcher, request


async def _failing_hand_off(dispatcher: Any, request: Any, redis_pid: int) -> float:
    """Seconds `dispatcher.run_v1(request)` took to raise a `RedisError`; then Redis (`redis_pid`) goes on (SIGCONT)
    and the dispatcher stops."""
    import asyncio
    import os
    import signal
    import time

    from redis.exceptions import RedisError

    started = time.monotonic()
    try:
        with pytest.raises(RedisError):
            await asyncio.wait_for(dispatcher.run_v1(request, "clipseg", "r-1"), 30)
        return time.monotonic() - started
    finally:
        os.kill(redis_pid, signal.SIGCONT)
        await dispatcher.stop()


def test_a_v1_hand_off_to_a_frozen_redis_fails_in_seconds_not_at_the_request_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stopped answering (SIGSTOP: a hung server, or a network that drops its packets): a fleet's v1 request
    fails with a RedisError (the app answers 503) within `REDIS_TIMEOUT`, not after the request timeout + 10 s that
    the outcome's BLPOP waits (70 s by default, 130 s here)."""
    import asyncio
    import os
    import signal

    from automask.server import fleet

    monkeypatch.setattr(fleet, "REDIS_TIMEOUT", 1.0)
    store = Store.in_data_dir(tmp_path / "data")
    with redis_server() as redis:
        dispatcher, request = _hand_off_parts(tmp_path, store, redis.url, timeout=120)

        async def hand_off() -> float:
            await dispatcher.redis.ping()  # connected while Redis answered
            os.kill(redis._main_pid(), signal.SIGSTOP)
            return await _failing_hand_off(dispatcher, request, redis._main_pid())

        assert asyncio.run(hand_off()) < 10
    store.close()


def test_a_v1_hand_off_whose_redis_freezes_while_it_waits_for_the_outcome_fails_at_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis froze after the hand-off was queued, while the API node waits for its outcome (BLPOP, whose socket
    waits the request timeout + 10 s). Before: the request failed only that socket timeout later (10 s past its own
    limit; 70 s by default). Now it fails (503) within `REDIS_TIMEOUT` of its limit."""
    import asyncio
    import os
    import signal
    from concurrent.futures import Future

    from automask.server import fleet

    monkeypatch.setattr(fleet, "REDIS_TIMEOUT", 1.0)
    store = Store.in_data_dir(tmp_path / "data")
    with redis_server() as redis:
        dispatcher, request = _hand_off_parts(tmp_path, store, redis.url, timeout=3)

        def queued(send: object) -> Future[None]:  # RabbitMQ took the task; then Redis froze
            os.kill(redis._main_pid(), signal.SIGSTOP)
            done: Future[None] = Future()
            done.set_result(None)
            return done

        monkeypatch.setattr(dispatcher.publisher, "submit", queued)

        took = asyncio.run(_failing_hand_off(dispatcher, request, redis._main_pid()))
        assert took < 6  # its 3 s limit and a second; before: 13 s
    store.close()
