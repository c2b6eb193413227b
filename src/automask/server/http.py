"""The HTTP/1.1 server under `automask serve`: uvicorn, with the connection guard of `automask.server.protocol`
(header, body and keep-alive deadlines, a connection cap, strict HTTP framing).

`listen(server)` binds the address before anything else starts (a busy port: a one-line `ServiceConfigError`);
`run(app, server, sockets=...)` serves an ASGI app on those sockets with these limits; SIGTERM stops accepting,
gives requests in flight `shutdown_timeout` seconds, cancels the rest, and a watchdog ends the process if the app's
own clean-up hangs more than `SHUTDOWN_GRACE` seconds after that.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from automask.errors import ServiceConfigError
from automask.server.config import ServerSettings
from automask.server.errors import cannot_listen
from automask.server.protocol import GuardedH11Protocol, Limits
from automask.server.protocol import connection_cap as connection_cap  # (first defined here: still importable)
from automask.server.protocol import error_bytes as error_bytes

log = logging.getLogger("automask.server.http")

BACKLOG = 2048
"""Connections the system queues before they are accepted (uvicorn's default)."""
SHUTDOWN_GRACE = 5.0
"""Seconds the app's clean-up (job queue, model threads) may take after `shutdown_timeout`."""


class _Server(uvicorn.Server):
    """uvicorn's server, with a watchdog that ends the process if a graceful stop overruns its deadline."""

    def __init__(self, config: uvicorn.Config, deadline: float, on_signal: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.deadline = deadline
        self.on_signal = on_signal
        self._watchdog: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_signal is not None:
            self.on_signal()
        if self._watchdog is None:
            self._watchdog = threading.Timer(self.deadline, _hard_exit, args=(self.deadline,))
            self._watchdog.daemon = True
            self._watchdog.start()
        super().handle_exit(sig, frame)


def _hard_exit(deadline: float) -> None:
    log.error("the server did not stop within %g s of the signal; exiting now", deadline)
    logging.shutdown()
    os._exit(1)


def config_for(app: Any, server: ServerSettings, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration `run` uses (h11 with `GuardedH11Protocol`, the timeouts of `server`)."""
    return uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        http=GuardedH11Protocol.with_limits(Limits.of(server)),
        ws="none",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_keep_alive=max(1, round(server.keepalive_timeout)),
        timeout_graceful_shutdown=max(1, round(server.shutdown_timeout)),
        h11_max_incomplete_event_size=server.max_header_bytes,
        server_header=False,
        backlog=BACKLOG,
        root_path=server.root_path,  # behind a proxy, under --public-url's path: the docs load from under it
    )


def listen(server: ServerSettings) -> list[socket.socket]:
    """Bind and listen on `server.host:server.port` now, before the app starts (port 0: a free port, see
    `address`). Raises `ServiceConfigError` saying what to change when the address cannot be had."""
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
        sock.bind((server.host, server.port))
        sock.listen(BACKLOG)  # the port is ours from here (another bind with SO_REUSEADDR fails too)
    except OSError as exc:
        sock.close()
        raise cannot_listen(server.host, server.port, exc, "--host", "--port") from None
    return [sock]


def address(sockets: list[socket.socket]) -> str:
    """`http://HOST:PORT` of the first listening socket (the port the system chose for port 0)."""
    host, port = sockets[0].getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(
    app: Any,
    server: ServerSettings,
    log_level: str = "info",
    *,
    sockets: list[socket.socket],
    on_signal: Callable[[], None] | None = None,
) -> None:
    """Serve the ASGI `app` on `sockets` (from `listen`) until SIGINT/SIGTERM (see the module docstring; `on_signal`
    is called at each); the sockets are closed on return. The app's start-up failing raises
    `ServiceConfigError` (uvicorn logged why)."""
    config = config_for(app, server, log_level)
    try:
        _Server(config, deadline=server.shutdown_timeout + SHUTDOWN_GRACE, on_signal=on_signal).run(sockets=sockets)
    except SystemExit as exc:
        if exc.code != STARTUP_FAILURE:
            raise
        raise ServiceConfigError("The server could not start: the error above says why.") from None
    finally:
        for sock in sockets:
            sock.close()
