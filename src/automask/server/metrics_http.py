"""The metrics listener's HTTP server: prometheus_client's WSGI app, served one thread per connection as its own
`start_http_server` does, but bounded — at most `MAX_CONNECTIONS` open at once (more are closed at once) and each
closed after `IDLE_TIMEOUT` seconds without a byte — so clients that connect and stay silent cannot pile up threads
in the API node or worker that serves them. The cost is to scrapes only, never to the API's own port.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

MAX_CONNECTIONS = 16
"""Connections served at once; Prometheus needs one per scrape, a few leave room for people and redundant scrapers."""
IDLE_TIMEOUT = 10.0
"""Seconds a connection may send or read nothing before it is closed (a scrape takes milliseconds)."""


class _Handler(WSGIRequestHandler):
    """One request per connection (HTTP/1.0, as wsgiref), silent, and dropped when idle past `IDLE_TIMEOUT`."""

    def setup(self) -> None:
        self.request.settimeout(IDLE_TIMEOUT)
        super().setup()

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

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(registry: Any, host: str, port: int) -> WSGIServer:
    """Serve `registry` at `http://HOST:PORT/metrics` (any path, as prometheus_client) from a daemon thread; `OSError`
    when the address cannot be had. IPv6 hosts (`::`, `::1`) are served as IPv6."""
    from prometheus_client import make_wsgi_app

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("_MetricsServer", (_Server,), {"address_family": family})
    httpd: WSGIServer = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_Handler)
    threading.Thread(target=httpd.serve_forever, name="automask-metrics", daemon=True).start()
    return httpd
