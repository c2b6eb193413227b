"""Duration settings past what a thread, timer or socket can wait for (`inf`, 1e12: ~9.2e9 s on Linux) are usage
errors at start naming the setting, and the longest allowed values run.

Before: `--keepalive-timeout inf` and `--shutdown-timeout inf` crashed `serve` with an OverflowError traceback once
the models had loaded; `--shutdown-timeout 1e12` killed the shutdown watchdog's thread; `AUTOMASK_SERVER_NODE_TTL`
of 1e12 (heartbeats every 2e11 s) or `inf` killed the heartbeat thread, so the node was never heard from again;
`AUTOMASK_FETCH_TIMEOUT=inf` made every image URL a 500; `AUTOMASK_SERVER_DEBUG_DELAY=inf` every inference.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from automask.cli import main
from automask.errors import InvalidOptionError
from automask.server.config import ServerSettings
from automask.settings import Settings

LONGEST = {
    "header_timeout": 3600,
    "body_timeout": 3600,
    "keepalive_timeout": 3600,
    "shutdown_timeout": 86400,
    "node_ttl": 3600,
    "sweep_interval": 3600,
    "cleanup_interval": 3600,
    "republish_after": 86400,
    "resend_after": 86400,
    "hold_grace": 86400,
    "debug_delay": 86400,
}
"""Each bounded `ServerSettings` duration and its largest value."""


@pytest.fixture()
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[BaseException]]:
    """The exceptions that end threads while the test runs (threading.excepthook)."""
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    yield errors


@pytest.mark.parametrize("value", ["inf", "1e12"])
@pytest.mark.parametrize("field", sorted(LONGEST))
def test_a_duration_past_its_ceiling_is_refused_naming_it(
    field: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"AUTOMASK_SERVER_{field.upper()}", value)
    with pytest.raises(ValidationError, match=rf"{field}\n  Input should be less than or equal to {LONGEST[field]}"):
        ServerSettings()


@pytest.mark.parametrize("value", ["inf", "1e12"])
def test_heartbeats_and_fetches_that_cannot_be_waited_for_are_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="must be at most a third of the node TTL"):
        ServerSettings(heartbeat_interval=value)  # the node TTL has its ceiling: so has its heartbeat
    with pytest.raises(
        InvalidOptionError,
        match=r"^fetch_timeout \(AUTOMASK_FETCH_TIMEOUT\): Input should be less than or equal to 3600",
    ):
        Settings(fetch_timeout=value)


def test_the_command_line_says_which_setting_and_exits_2(tmp_path: Path) -> None:
    cli, data = CliRunner(), ["--data-dir", str(tmp_path / "data")]
    served = cli.invoke(main, [*data, "serve", "--port", "0", "--keepalive-timeout", "inf"])
    assert served.exit_code == 2, served.output
    assert "keepalive_timeout: Input should be less than or equal to 3600" in served.output
    listed = cli.invoke(main, [*data, "models", "list"], env={"AUTOMASK_FETCH_TIMEOUT": "inf"})
    assert listed.exit_code == 2 and "AUTOMASK_FETCH_TIMEOUT" in listed.output, listed.output


def test_the_longest_durations_run(tmp_path: Path, thread_errors: list[BaseException]) -> None:
    """At their ceilings: uvicorn's config is built, the shutdown watchdog and the heartbeat thread wait, a fetch
    completes."""
    from automask.imageio.fetch import fetch_url
    from automask.server import http, nodes
    from automask.server.store import Store
    from server_helpers import FakeBackend, live_server

    server = ServerSettings(**LONGEST)
    config = http.config_for(object(), server)
    assert (config.timeout_keep_alive, config.timeout_graceful_shutdown) == (3600, 86400)
    watched = http._Server(config, deadline=server.shutdown_timeout + http.SHUTDOWN_GRACE)
    watched.handle_exit(15, None)  # SIGTERM: the watchdog starts waiting for a day and 5 s
    store = Store.in_data_dir(tmp_path / "data")
    beat = nodes.Heartbeat(store, "server-x", "server", ["m"], "m", interval=server.beat, dead_after=server.node_ttl)
    beat.start()
    try:
        time.sleep(0.2)
        assert watched._watchdog is not None and watched._watchdog.is_alive()
        assert beat._thread.is_alive() and [n.id for n in nodes.live(store, 10)] == ["server-x"]
    finally:
        assert watched._watchdog is not None
        watched._watchdog.cancel()
        beat.stop()
        store.close()
    with live_server(tmp_path / "served", FakeBackend()) as live:
        settings = Settings(data_dir=tmp_path / "lib", fetch_timeout=3600, allow_private_urls=True)
        assert fetch_url(f"{live.url}/healthz", settings) == b'{"status":"ok"}'
    assert thread_errors == []
