"""The metrics listener (--metrics-port, AUTOMASK_SERVER_METRICS_PORT) is closed when the start it belongs to fails,
whichever way the service is started (`automask serve`, `automask worker`, `uvicorn --factory ...:app_from_env`), and
when the app it was opened for stops: the port is free again, in this very process, for the next try."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("fastapi")

from automask.errors import ServiceConfigError
from server_helpers import free_port


def refused(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` any more (a connection is refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def closed_database() -> str:
    """A PostgreSQL URL on a loopback port where nothing listens: the start-up's database check fails."""
    return f"postgresql://someone:secret@127.0.0.1:{free_port()}/automask"


def test_the_uvicorn_factory_closes_the_metrics_port_when_its_start_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the database check failed, app_from_env raised, and the listener it had opened kept the port."""
    from automask.server.app import app_from_env

    port = free_port()
    monkeypatch.setenv("AUTOMASK_SERVER_METRICS_PORT", str(port))
    monkeypatch.setenv("AUTOMASK_DATABASE_URL", closed_database())
    with pytest.raises(ServiceConfigError, match="Cannot connect to the database"):
        app_from_env()
    assert refused(port)
    with pytest.raises(ServiceConfigError, match="Cannot connect to the database"):  # the same port, again
        app_from_env()
    assert refused(port)


def test_the_uvicorn_factory_closes_the_metrics_port_when_the_app_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from automask.server.app import app_from_env

    port = free_port()
    monkeypatch.setenv("AUTOMASK_SERVER_METRICS_PORT", str(port))
    monkeypatch.setenv("AUTOMASK_DATA_DIR", str(tmp_path))
    app = app_from_env()
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert "automask_http_requests_total" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert refused(port)


def test_the_uvicorn_factory_closes_the_metrics_port_when_the_app_start_up_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The app's own start-up (its lifespan: the dispatcher, the sweeper) failing, as uvicorn runs it."""
    from fastapi.testclient import TestClient

    from automask.server.app import app_from_env
    from automask.server.sweeper import Sweeper

    def fails(self: Sweeper) -> None:
        raise RuntimeError("the sweeper could not start")

    port = free_port()
    monkeypatch.setenv("AUTOMASK_SERVER_METRICS_PORT", str(port))
    monkeypatch.setenv("AUTOMASK_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(Sweeper, "start", fails)
    app = app_from_env()
    with pytest.raises(RuntimeError, match="could not start"), TestClient(app):
        pass
    assert refused(port)


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["worker"]])
def test_a_failed_start_of_the_cli_closes_the_metrics_port(tmp_path: Path, command: list[str]) -> None:
    """Before: `automask serve` closed its API port but not the metrics one; `automask worker` closed neither (the
    process exits next, but in-process callers, as here, kept the port bound)."""
    from click.testing import CliRunner

    from automask.cli import main

    port = free_port()
    env = {
        "AUTOMASK_DATABASE_URL": closed_database(),
        "AUTOMASK_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "AUTOMASK_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//",
    }
    if command[0] == "serve":
        del env["AUTOMASK_BROKER_URL"], env["AUTOMASK_REDIS_URL"]  # a single server: the database check fails
    args = ["--data-dir", str(tmp_path), *command, "--metrics-port", str(port)]
    for _ in range(2):  # the same port twice: the second start finds it free
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 9, result.output
        assert re.search(r"Cannot connect to the database", result.output), result.output
        assert "already in use" not in result.output
        assert refused(port)


def test_a_closed_listener_frees_its_port_and_closing_twice_is_harmless() -> None:
    from automask.server import metrics

    listener = metrics.listen("127.0.0.1", 0)
    port = int(listener.url.rsplit(":", 1)[1].split("/")[0])
    assert "automask_http_requests_in_flight" in httpx.get(listener.url, timeout=10).text
    listener.close()
    listener.close()
    assert refused(port)
    with contextlib.closing(socket.socket()) as again:  # bindable at once (no listener left in the way)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_closing_the_listener_in_a_forked_child_returns_at_once_and_leaves_the_parents_port() -> None:
    """A worker's pool process is forked from inside the block that closes the listener: were it to unwind there,
    its close must neither wait for a serving thread it does not have (before: for ever) nor touch the parent's."""
    import os

    from automask.server import metrics

    listener = metrics.listen("127.0.0.1", 0)
    try:
        pid = os.fork()
        if pid == 0:  # the child: close, then exit at once either way
            done = threading.Thread(target=listener.close, daemon=True)
            done.start()
            done.join(5)
            os._exit(1 if done.is_alive() else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "automask_http_requests_in_flight" in httpx.get(listener.url, timeout=10).text
    finally:
        listener.close()
