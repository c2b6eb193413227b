"""The service's text log lines stay one line whatever a client puts in them (automask.server.logs)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automask.server.logs import OneLineFormatter

FORMAT = "%(levelname)s %(name)s: %(message)s"


def test_a_clients_control_characters_cannot_forge_a_line() -> None:
    script = """
import logging
from automask.server.logs import configure_logging
configure_logging("info")
log = logging.getLogger("automask.server.app")
log.error("database error in %s %s: %s", "GET", "/v2/requests/x\\nINFO automask.server.app: forged\\r\\x1b[2J", "down")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("unexpected error in request %s", "id\\n1")
logging.getLogger("automask.server.access").info('{"path": "/a"}')
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = proc.stderr.splitlines()
    (error,) = [ln for ln in lines if "database error" in ln]
    assert error.endswith("/v2/requests/x\\nINFO automask.server.app: forged\\r\\x1b[2J: down")
    assert not any(ln.startswith("INFO automask.server.app: forged") for ln in lines)
    at = next(i for i, ln in enumerate(lines) if "unexpected error in request id\\n1" in ln)
    assert lines[at + 1] == "Traceback (most recent call last):" and lines[-2] == "RuntimeError: boom"  # kept whole
    assert lines[-1] == '{"path": "/a"}'  # the access log: its JSON as it is


def test_the_formatter_escapes_only_the_message() -> None:
    record = logging.LogRecord("automask.server", logging.INFO, __file__, 1, "path %s", ("/a\tb\x7f",), None)
    assert OneLineFormatter(FORMAT).format(record) == "INFO automask.server: path /a\\tb\\x7f"


def test_a_heartbeat_through_an_outage_logs_one_traceback_then_one_line_per_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database down for a while: the first failed beat logs its traceback, the next ones a line each (not some 40
    lines every beat for the whole outage), and the first beat that works again says so once."""
    from sqlalchemy.exc import OperationalError

    from automask.server import nodes
    from automask.server.store import Store

    store = Store.in_data_dir(tmp_path / "data")
    beat_once, calls = nodes.heartbeat, []

    def flaky(store: Store, node_id: str) -> bool:
        if node_id != "server-x":  # another test's node still beating in this process is not this one's outage
            return beat_once(store, node_id)
        calls.append(node_id)
        if 2 <= len(calls) <= 5:  # the outage: four beats in a row fail
            raise OperationalError("UPDATE nodes", {}, Exception("connection refused\n\tis the server running?"))
        return beat_once(store, node_id)

    monkeypatch.setattr(nodes, "heartbeat", flaky)
    beat = nodes.Heartbeat(store, "server-x", "server", ["m"], "m", interval=0.02, dead_after=10)
    with caplog.at_level(logging.WARNING):
        beat.start()
        deadline = time.monotonic() + 10
        while len(calls) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        beat.stop()
    records = [r for r in caplog.records if r.getMessage().startswith("node heartbeat")]
    messages = [r.getMessage() for r in records]
    assert messages[0] == "node heartbeat failed; retrying" and records[0].exc_info is not None
    again = [f"node heartbeat failed again ({n} in a row)" for n in (2, 3, 4)]
    assert [m.split(":")[0] for m in messages[1:4]] == again
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records[1:])
    assert "connection refused is the server running?" in messages[1]
    assert messages[4:] == ["node heartbeat works again after 4 failure(s)"]  # said once, not at every later beat
