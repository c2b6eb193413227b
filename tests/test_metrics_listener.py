"""The metrics listener is bounded: silent connections are closed after the idle timeout and never more than
`MAX_CONNECTIONS` are served at once, so a client that opens many and sends nothing cannot pile up threads."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, Counter

from automask.server import metrics_http


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    """A listener (2 connections at most, idle 0.5 s) serving one counter, on a free loopback port."""
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(metrics_http, "IDLE_TIMEOUT", 0.5)
    registry = CollectorRegistry()
    Counter("automask_probe", "A counter to find in the scrape.", registry=registry).inc()
    httpd = metrics_http.serve(registry, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def scrape(address: tuple[str, int]) -> str:
    r = httpx.get(f"http://{address[0]}:{address[1]}/metrics", timeout=5)
    assert r.status_code == 200
    return r.text


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server closes `conn` (EOF or reset) within `seconds`."""
    conn.settimeout(seconds)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_scrape_is_served(served: tuple[str, int]) -> None:
    assert "automask_probe_total 1.0" in scrape(served)


def test_a_silent_connection_is_closed_after_the_idle_timeout(
    served: tuple[str, int], capfd: pytest.CaptureFixture[str]
) -> None:
    with socket.create_connection(served) as silent:
        started = time.monotonic()
        assert closed_within(silent, 5)
        assert 0.4 < time.monotonic() - started < 3
    time.sleep(0.2)  # (the server's thread ends after the close)
    assert "Traceback" not in capfd.readouterr().err  # before: socketserver printed one for each on stderr


def test_connections_past_the_cap_are_closed_and_scrapes_resume_when_slots_free(
    served: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_http, "IDLE_TIMEOUT", 30.0)  # the held connections stay held (read at accept)
    threads = threading.active_count()
    held = [socket.create_connection(served) for _ in range(2)]
    try:
        time.sleep(0.1)  # both accepted and each waiting in a thread of its own
        extra = [socket.create_connection(served) for _ in range(20)]
        try:
            assert all(closed_within(conn, 0.3) for conn in extra)  # closed at once, not left to the idle timeout
            assert threading.active_count() <= threads + 4  # each held one's thread and its deadline timer
        finally:
            for conn in extra:
                conn.close()
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 5
    while True:  # the held connections' threads end when the server sees them closed
        try:
            assert "automask_probe_total" in scrape(served)
            break
        except (httpx.HTTPError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_trickling_connection_is_cut_at_the_deadline_and_others_are_served_meanwhile(
    served: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.2 s is never idle for 0.5 s: before, it held its slot (and thread) for as long as it kept on."""
    monkeypatch.setattr(metrics_http, "REQUEST_DEADLINE", 1.0, raising=False)
    with socket.create_connection(served) as trickle:
        started = time.monotonic()
        trickle.sendall(b"GET /metrics HTTP/1.1\r\n")
        cut = False
        while time.monotonic() - started < 4 and not cut:
            assert "automask_probe_total 1.0" in scrape(served)  # the other slot serves scrapes meanwhile
            time.sleep(0.2)
            try:
                trickle.sendall(b"X")
            except OSError:  # reset by the server
                cut = True
            cut = cut or closed_within(trickle, 0.01)
        assert cut, "the trickling connection was still open after 4 s"
        assert 0.8 < time.monotonic() - started < 3
