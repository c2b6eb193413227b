"""The metrics listener's HTTP server: prometheus_client's WSGI app, served one thread per connection as its own
`start_http_server` does, but bounded — at most `MAX_CONNECTIONS` open at once (more are closed at once), each
closed after `IDLE_TIMEOUT` seconds without a byte and, whatever it sends, `REQUEST_DEADLINE` seconds after it was
accepted — so clients that connect and stay silent, or trickle a byte at a time, cannot pile up threads or hold the
slots in the API node or worker that serves them. The cost is to scrapes only, never to the API's own port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

MAX_CONNECTIONS = 16
"""Connections served at once; Prometheus needs one per scrape, a few leave room for people and redundant scrapers."""
IDLE_TIMEOUT = 10.0
"""Seconds a connection may send or read nothing before it is closed (a scrape takes milliseconds)."""
REQUEST_DEADLINE = 15.0
"""Seconds a connection is served at most, all reads and writes together: one that sends a byte every few seconds
(never idle for `IDLE_TIMEOUT`) is cut then. Prometheus's own scrape timeout is 10 s by default."""


class _Handler(WSGIRequestHandler):
    """One request per connection (HTTP/1.0, as wsgiref), silent, and dropped when idle past `IDLE_TIMEOUT` or
    still open at `REQUEST_DEADLINE`."""

    def setup(self) -> None:
        self.request.settimeout(IDLE_TIMEOUT)
        self._lock = threading.Lock()
        self._done = False
        self._cutoff = threading.Timer(REQUEST_DEADLINE, self._cut)
        self._cutoff.daemon = True
        self._cutoff.start()
        super().setup()

    def _cut(self) -> None:
        """At `REQUEST_DEADLINE`: shut the socket down, which ends the read or write in progress with an error."""
        with self._lock, contextlib.suppress(OSError):
            if not self._done:
                self.request.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._lock:
            self._done = True  # (before the server closes the socket: never a shutdown of a reused descriptor)
            self._cutoff.cancel()
        with contextlib.suppress(OSError):  # the socket cut at the deadline: nothing left to flush
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: a scrape every few seconds is not news."""


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `MAX_CONNECTIONS` of them; a connection past that is closed unanswered."""

    daemon_threads = True

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went silent (the idle timeout), left or was cut is no error: nothing printed (socketserver
        printed a traceback on stderr for each); anything else is printed as before."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class Listener:
    """A metrics listener serving from its daemon thread: its `url`, and `close` to stop it and free its port."""

    def __init__(self, server: WSGIServer) -> None:
        self.server = server
        host, port = server.socket.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        self._closed = threading.Event()
        self._pid = os.getpid()

    def close(self) -> None:
        """Stop serving and close the listening socket (idempotent): the port is free once this returns. Nothing in a
        forked child (a worker's pool process), which serves nothing and closed its copy of the socket at the fork:
        waiting there for a serving thread it does not have would never end."""
        if os.getpid() == self._pid and not self._closed.is_set():
            self._closed.set()
            self.server.shutdown()
            self.server.server_close()


def serve(registry: Any, host: str, port: int) -> WSGIServer:
    """Serve `registry` at `http://HOST:PORT/metrics` (any path, as prometheus_client) from a daemon thread; `OSError`
    when the address cannot be had. IPv6 hosts (`::`, `::1`) are served as IPv6."""
    from prometheus_client import make_wsgi_app

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("_MetricsServer", (_Server,), {"address_family": family})
    httpd: WSGIServer = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_Handler)
    threading.Thread(target=httpd.serve_forever, name="automask-metrics", daemon=True).start()
    return httpd
