"""The service's text log lines stay one line whatever a client puts in them (automask.server.logs)."""

from __future__ import annotations

import logging
import subprocess
import sys

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
