"""Helpers for the HTTP service tests: a predictable fake backend, live servers on loopback ports."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from automask.backends.base import Scores


class FakeBackend:
    """Scores every pixel by its column: map = x / (W - 1), so threshold t selects the columns x >= t·(W-1).

    Prompt "left" scores 1 - x / (W - 1); "nothing" scores 0 everywhere. `delay` sleeps in `score`;
    `fail` raises a RuntimeError there (an unexpected bug, as far as the server knows).
    """

    name = "fake"
    model_id = "fake-gradient"

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay = delay
        self.fail = fail

    def encode(self, image: np.ndarray) -> np.ndarray:
        return image

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("secret internal detail /srv/model.bin")
        h, w = features.shape[:2]
        ramp = np.tile(np.linspace(0.0, 1.0, w, dtype=np.float32), (h, 1))
        maps = {"left": 1.0 - ramp, "nothing": np.zeros_like(ramp)}
        return Scores(maps=np.stack([maps.get(p, ramp) for p in prompts]), labels=list(prompts))


class StagedBackend(FakeBackend):
    """`FakeBackend` whose stages (`encode`, `score`) the test drives: on entering one it records its name in `seen`
    and sets `entered[stage]`, then blocks until the test sets `proceed[stage]` (`release`), 30 s at most. A test
    holds a run inside a stage, makes its client leave or its time limit pass, releases it, and sees whether the run
    went on to the next stage."""

    STAGES = ("encode", "score")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.entered = {stage: threading.Event() for stage in self.STAGES}
        self.proceed = {stage: threading.Event() for stage in self.STAGES}

    def release(self, *stages: str) -> None:
        """Let runs through `stages` (all of them when none is named), now and later."""
        for stage in stages or self.STAGES:
            self.proceed[stage].set()

    def _stage(self, stage: str) -> None:
        self.seen.append(stage)
        self.entered[stage].set()
        if not self.proceed[stage].wait(30):
            raise RuntimeError(f"the test never released stage {stage!r}")

    def encode(self, image: np.ndarray) -> np.ndarray:
        self._stage("encode")
        return super().encode(image)

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        self._stage("score")
        return super().score(features, prompts, min_score=min_score)


def install_as_catalogue(data_dir: Path, name: str, seed: int) -> Path:
    """Install a tiny random CLIPSeg (`seed`) as catalogue model `name` in `data_dir`, the way
    `automask models pull` leaves it (the checkpoint and its automask.json marker); return its folder."""
    from automask.models import CATALOGUE, MARKER
    from automask.settings import Settings
    from tiny_models import make_tiny_clipseg

    spec = CATALOGUE[name]
    folder = make_tiny_clipseg(Settings(data_dir=data_dir).models_dir / name, seed=seed)
    marker = {"name": name, "backend": spec.backend, "repos": list(spec.repos)}
    (folder / MARKER).write_text(json.dumps(marker))
    return folder


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an H×W×3 uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Decode image bytes to an array (mode kept: L -> H×W, RGB -> H×W×3, RGBA -> H×W×4)."""
    return np.asarray(Image.open(io.BytesIO(data)))


def loopback_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with contextlib.closing(loopback_socket()) as sock:
        return int(sock.getsockname()[1])


class LiveServer:
    """Run an ASGI app with uvicorn in a background thread on a free loopback port; configured as `automask serve`
    configures it (`http.config_for`) when `server` settings are given."""

    def __init__(self, app: Any, server: Any = None) -> None:
        import uvicorn

        from automask.server import http

        self.app = app
        self.sock = loopback_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        if server is not None:
            config = http.config_for(app, server, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def live_server(data_dir: Path, backend: Any = None, model: str | None = None, **server: Any) -> LiveServer:
    """The service (not started: use it as a context manager) with data in `data_dir`, answering with `backend`
    (None: it loads `model`, or the default one, itself) and `ServerSettings(**server)`."""
    from automask.pipeline import MaskGenerator
    from automask.server.app import create_app
    from automask.server.config import ServerSettings
    from automask.settings import Settings

    settings = Settings(data_dir=data_dir, model=model)
    generator = MaskGenerator(backend, settings) if backend is not None else None
    return LiveServer(create_app(settings, ServerSettings(**server), generator))


def wait_ready(url: str, seconds: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url`/readyz until 200 (bounded); fail early if `proc` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready after {seconds} s")


def serve_cmd(data_dir: Path, model: Path, *flags: str, port: int = 0) -> list[str]:
    """The command line of `automask serve` on `port` (0: a free one) with `model`, data in `data_dir`, and `flags`."""
    cmd = [sys.executable, "-m", "automask.cli", "--data-dir", str(data_dir), "serve", "--port", str(port)]
    return [*cmd, "--model", str(model), "--log-level", "warning", *flags]


@contextlib.contextmanager
def process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, *, graceful: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """`cmd` as a subprocess, its output in `log`, with environment `env` (None: this process's); yields the Popen.
    On exit, if it still runs: killed, or with `graceful` sent SIGTERM first and killed only after 30 s."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if graceful and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def server_process(
    data_dir: Path, model: Path, port: int, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`automask serve` as a subprocess, `env` added to this process's environment (killed on exit if still
    running); yields the Popen."""
    with process(serve_cmd(data_dir, model, port=port), log, {**os.environ, **env}) as proc:
        yield proc


def wait_for(predicate: Any, seconds: float, interval: float = 0.05) -> Any:
    """Call `predicate` until it returns a truthy value (returned), at most `seconds`; else fail."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {seconds} s")


@contextlib.contextmanager
def keyed_server(data_dir: Path, credits: int | None = None) -> Iterator[LiveServer]:
    """A started `live_server` answering with `FakeBackend`, and a key of `credits` in its database: the server has
    `.headers` (that key's x-api-key), `.key` (its `ApiKey`) and `.store` (its database)."""
    from automask.server import keys
    from automask.server.store import Store
    from automask.settings import Settings

    with live_server(data_dir, FakeBackend()) as server:
        store = Store.from_settings(Settings(data_dir=data_dir))
        try:
            key, token = keys.create_key(store, credits=credits)
            server.headers, server.key, server.store = {"x-api-key": token}, key, store  # type: ignore[attr-defined]
            yield server
        finally:
            store.close()


def post_body(server: Any, version: str, body: bytes, content_type: str) -> httpx.Response:
    """POST `body` as it is, labelled `content_type`, to `server`'s automatic-mask-generator endpoint of `version`
    (v1, v2) with its key (`keyed_server`)."""
    headers = {**server.headers, "content-type": content_type}
    return httpx.post(f"{server.url}/{version}/automatic-mask-generator", content=body, headers=headers, timeout=30)
