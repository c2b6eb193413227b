"""`automask serve` starting up: the port is bound before anything else, a busy port is one line and exit 9, and a
normal start says where it listens without the database library's chatter."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from automask.errors import ServiceConfigError
from automask.server import http
from automask.server.config import ServerSettings
from server_helpers import loopback_socket, wait_for

SERVING = re.compile(r"automask: serving on http://127\.0\.0\.1:(\d+) ")


def serve_cmd(data_dir: Path, port: int, tiny_model: Path) -> list[str]:
    cmd = [sys.executable, "-m", "automask.cli", "--data-dir", str(data_dir), "serve", "--no-auth"]
    return [*cmd, "--port", str(port), "--model", str(tiny_model)]


def test_a_busy_port_is_one_line_and_exit_9_before_anything_starts(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    """Before: "serving on", alembic's INFO lines, the app's start-up and shutdown, uvicorn's Errno 98, then exit 3
    (documented as "the image cannot be read")."""
    data = tmp_path / "data"
    with contextlib.closing(loopback_socket()) as taken:
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(serve_cmd(data, port, tiny_clipseg_dir), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: Cannot listen on 127.0.0.1:{port}: the address is already in use. Choose another --port "
        "(or stop the server that holds it)."
    ], proc.stderr
    assert not (data / "automask.db").exists()  # the app never started: no database was opened


@contextlib.contextmanager
def running(cmd: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_serve_on_port_0_names_the_bound_port_and_logs_no_alembic_chatter(
    tmp_path: Path, tiny_clipseg_dir: Path
) -> None:
    with running(serve_cmd(tmp_path / "data", 0, tiny_clipseg_dir)) as proc:
        assert proc.stderr is not None
        first, match = "", None
        for _ in range(10):  # the "created the schema" line may come first
            first += (line := proc.stderr.readline())
            if (match := SERVING.match(line)) is not None:
                break
        assert match is not None and match.group(1) != "0", first
        url = f"http://127.0.0.1:{match.group(1)}"
        wait_for(lambda: _healthy(url), 30)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
    assert proc.returncode in (0, -signal.SIGTERM), rest  # uvicorn re-raises the signal once it has stopped
    assert "alembic" not in first + rest, rest
    assert "metrics" not in first + rest, rest  # off unless --metrics-port is given


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    return False


def test_a_failed_app_start_is_a_service_error_not_uvicorns_exit_3() -> None:
    """Before: the app's start-up failing ended the process with uvicorn's STARTUP_FAILURE (3), which the CLI
    documents as "the image cannot be read"."""

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        assert scope["type"] == "lifespan"
        raise RuntimeError("no broker")

    server = ServerSettings(host="127.0.0.1", port=0)
    sockets = http.listen(server)
    with pytest.raises(ServiceConfigError, match="could not start"):
        http.run(app, server, log_level="critical", sockets=sockets)
    assert all(s.fileno() == -1 for s in sockets)  # closed


def test_listen_names_the_address_and_the_fix() -> None:
    with contextlib.closing(loopback_socket()) as taken:
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServiceConfigError, match=f"127.0.0.1:{port}: the address is already in use"):
            http.listen(ServerSettings(host="127.0.0.1", port=port))


@pytest.mark.parametrize("secret", ["password", "sslpassword"])
def test_a_database_password_given_in_the_urls_query_is_never_shown(tmp_path: Path, secret: str) -> None:
    """libpq reads `?password=` (and the client key's `?sslpassword=`) from the URL's query too. Before: the database
    was described with only the password before the host hidden, so the start-up refusal (and `automask db migrate`,
    `db status`, the logs) printed "postgresql+psycopg://someone@127.0.0.1:P/automask?password=s3cret". Now its
    value is hidden as the other's is."""
    from click.testing import CliRunner

    from automask.cli import main
    from server_helpers import free_port

    port = free_port()
    url = f"postgresql://someone@127.0.0.1:{port}/automask?sslmode=disable&{secret}=s3cret"
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "db", "status"], env={"AUTOMASK_DATABASE_URL": url})
    assert result.exit_code == 9, result.output
    assert "s3cret" not in result.output, result.output
    assert f"postgresql+psycopg://someone@127.0.0.1:{port}/automask?" in result.output, result.output
    assert f"{secret}=***" in result.output and "sslmode=disable" in result.output, result.output


@pytest.mark.parametrize(
    "command", [["keys", "list"], ["keys", "create"], ["db", "migrate"], ["db", "status"], ["serve", "--port", "0"]]
)
def test_a_database_that_cannot_be_reached_or_used_is_exit_9_naming_the_fix(tmp_path: Path, command: list[str]) -> None:
    """Before: "internal error: OperationalError: (psycopg.OperationalError) connection failed: ..." and exit 70,
    documented as a bug to report with --debug, for a wrong AUTOMASK_DATABASE_URL or a database server not running."""
    from click.testing import CliRunner

    from automask.cli import main
    from server_helpers import free_port

    closed = f"postgresql://someone:s3cret@127.0.0.1:{free_port()}/automask"
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database, and not a folder either\n" * 100)
    for url, expected in (
        (closed, "Cannot connect to the database postgresql+psycopg://someone:***@127.0.0.1:"),
        ("mysql://someone:s3cret@127.0.0.1/automask", "AUTOMASK_DATABASE_URL: unsupported database URL scheme 'mysql'"),
        ("not a url", "AUTOMASK_DATABASE_URL is not a database URL"),
        (f"sqlite:///{not_sqlite}", f"Cannot connect to the database {not_sqlite}: file is not a database."),
        (f"sqlite:///{not_sqlite}/x.db", f"Cannot create the database file {not_sqlite}/x.db: "),
    ):
        env = {"AUTOMASK_DATABASE_URL": url}
        result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), *command], env=env)
        assert result.exit_code == 9, result.output
        assert result.output.startswith(f"error: {expected}"), result.output
        assert "AUTOMASK_DATABASE_URL" in result.output and "s3cret" not in result.output
        assert "internal error" not in result.output and len(result.output.strip().splitlines()) == 1
        assert not re.search(r"[?.!]\. ", result.output), result.output  # before: "...TCP/IP connections?. Check"
        assert "refused Is" not in result.output, result.output  # before: the driver's two lines run together
