"""The HTTP/1.1 protocol under `automask serve`: uvicorn's h11 protocol with the edges a public service needs.

uvicorn alone has a keep-alive timeout and a graceful-shutdown timeout, but no deadline for a request's headers
or body and no cap on open connections, so a client that connects and trickles (or sends nothing) holds a
socket and a file descriptor for ever. `GuardedH11Protocol` gives every connection a deadline at all times
except while the app works on its request:

- headers: `header_timeout` seconds from connecting (or from the first byte of a keep-alive request) until
  the request's headers are complete -> 408 JSON (nothing sent yet: closed silently);
- body: the client may pause at most `body_timeout` seconds between pieces of the body, and the whole body
  must arrive within `body_timeout` seconds plus one second per `body_min_rate` bytes received (a client
  trickling a byte now and then is cut off, as Apache's mod_reqtimeout MinRate does) -> 408 JSON; time the
  app spends not reading does not count; and at most `body_deadline` seconds in all, however steadily it
  trickles (its room in the body memory budget is held no longer) -> 408 JSON. The same pause bound on a client
  that stops reading its answer;
- an answer sent before the body is all in (a 413, a 408) says `Connection: close`; the server's side then ends
  (FIN) and the rest of the body is read and thrown away for `LINGER_TIME` seconds at most, less once nothing
  arrives for `LINGER_PAUSE`, before the connection is closed (nginx's lingering close): closing at once with
  the body still arriving makes the kernel answer with a reset, which over a real network can destroy the answer
  before the client reads it, while reading on for long lets a client push gigabytes through one connection;
- keep-alive: `keepalive_timeout` seconds idle between requests -> closed;
- at most `max_connections` open (kept below the process's open-file limit): a connection past it is
  answered 503 JSON and closed at once, so it never pins a descriptor;
- a request with both Content-Length and Transfer-Encoding (request smuggling) -> 400; malformed HTTP ->
  400 (431 for headers over `max_header_bytes`, 501 for an unknown transfer coding), all `{"error": ...}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from automask.server.config import ServerSettings

log = logging.getLogger("automask.server.http")  # the name these warnings had before this module was split out

RESERVED_FDS = 64
"""File descriptors kept free of client connections: the database, models, logs, threads' pipes."""
LINGER_TIME = 2.0
"""After an answer sent before its request's body is all in, the longest the rest is read and thrown away (seconds):
long enough for the client to see its answer, short enough that a huge upload cannot hold the connection."""
LINGER_PAUSE = 0.5
"""... and that reading ends sooner once nothing arrives for this long (seconds): the client has stopped sending."""
_ERROR_HEADERS = (
    "content-type: application/json",
    "connection: close",
    "x-content-type-options: nosniff",
    "cache-control: no-store",
)


@dataclass(frozen=True)
class Limits:
    """The per-connection deadlines (seconds) and caps `GuardedH11Protocol` enforces."""

    header_timeout: float
    body_timeout: float
    body_min_rate: float
    body_deadline: float
    keepalive_timeout: float
    max_connections: int

    @classmethod
    def of(cls, server: ServerSettings) -> Limits:
        return cls(
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            body_min_rate=server.body_min_rate,
            body_deadline=server.body_deadline,
            keepalive_timeout=server.keepalive_timeout,
            max_connections=connection_cap(server.max_connections),
        )


def connection_cap(requested: int) -> int:
    """`requested`, lowered to leave `RESERVED_FDS` descriptors free under the soft RLIMIT_NOFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or requested <= soft - RESERVED_FDS:
        return requested
    cap = max(1, soft - RESERVED_FDS)
    log.warning(
        "max_connections %d lowered to %d: the open-file limit is %d (raise it with `ulimit -n`)", requested, cap, soft
    )
    return cap


def error_bytes(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 `{"error": message}` answer that closes the connection."""
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *_ERROR_HEADERS, f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class StrictConnection(h11.Connection):
    """h11, refusing a request that carries both Content-Length and Transfer-Encoding (RFC 9112 §6.1: a
    server MAY reject it; behind a proxy that reads the other header it is request smuggling), and one whose
    request line and headers exceed `max_header_bytes` even when they arrive in one read (h11 checks only
    an incomplete head)."""

    def __init__(self, max_header_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self.max_header_bytes:
                raise h11.RemoteProtocolError(
                    f"request line and headers over {self.max_header_bytes} bytes", error_status_hint=431
                )
            names = {name.lower() for name, _value in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", error_status_hint=400)
        return event

    def send_with_data_passthrough(self, event: h11.Event) -> list[bytes] | None:  # (what `send` calls)
        """An answer begun before the request's body is all in (a 413, a refused key) says `Connection: close`, so
        that the connection ends once it is sent (uvicorn closes it: `GuardedH11Protocol.close_gently`, which reads
        the rest for `LINGER_TIME` at most): the rest of the body is not read for as long as the client sends it."""
        if isinstance(event, h11.Response) and self.their_state is h11.SEND_BODY and not _closing(event.headers):
            headers = [*event.headers, (b"connection", b"close")]
            event = h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
        return super().send_with_data_passthrough(event)


def _closing(headers: Any) -> bool:
    """Whether an answer's `headers` say `Connection: close` already."""
    return any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers)


class _Transport:
    """A connection's transport as uvicorn sees it: all passed through but `close`, which `GuardedH11Protocol` turns
    into a lingering close while the request's body is still arriving, and `is_closing`, true from then on."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self.wire = transport
        self.protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wire, name)

    def close(self) -> None:
        self.protocol.close_gently()

    def is_closing(self) -> bool:
        return self.protocol.lingering or self.wire.is_closing()


class _CapWarning:
    """Logs 'at the connection cap' at most once per `every` seconds, with how many were refused."""

    every = 10.0
    last = 0.0
    refused = 0

    @classmethod
    def note(cls, cap: int) -> None:
        cls.refused += 1
        now = time.monotonic()
        if now - cls.last >= cls.every:
            log.warning("at the connection cap (%d): refused %d connection(s) with 503", cap, cls.refused)
            cls.last, cls.refused = now, 0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header, body and keep-alive deadlines and a connection cap (`Limits`).

    Use `GuardedH11Protocol.with_limits(limits)` as uvicorn's `http` protocol class.
    """

    limits: ClassVar[Limits]
    wire: asyncio.Transport
    """The connection's own transport (`self.transport` is uvicorn's view of it, `_Transport`)."""

    @classmethod
    def with_limits(cls, limits: Limits) -> type[GuardedH11Protocol]:
        return type("GuardedH11Protocol", (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = StrictConnection(self.config.h11_max_incomplete_event_size or 16384)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        self._got_data = False
        self._refused = False
        self._body_deadline: float | None = None
        """When the body being received must be complete (loop time): extended by each piece that arrives."""
        self._body_cap: float | None = None
        """When it must be complete however fast it arrives (loop time): `body_deadline` after it began."""
        self.lingering = False
        """Whether the connection is reading the rest of a body answered early before it closes (`close_gently`)."""
        self._linger_end = self._last_data = 0.0

    # --- connection lifecycle ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.wire = transport
        super().connection_made(cast(asyncio.Transport, _Transport(transport, self)))
        if len(self.connections) > self.limits.max_connections:
            self._refused = True
            _CapWarning.note(self.limits.max_connections)
            message = "The server is at its connection limit; try again in a moment."
            transport.write(error_bytes(503, message))
            transport.close()
            return
        self._arm("headers", self.limits.header_timeout, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.lingering:  # the rest of a body answered early: thrown away
            self._last_data = self.loop.time()
            return
        self._got_data = True
        if self._body_deadline is not None:
            self._body_deadline += len(data) / self.limits.body_min_rate
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._update_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_deadline()

    def pause_writing(self) -> None:
        """The client stopped reading its answer: give it `body_timeout` seconds, then drop it."""
        super().pause_writing()
        if self._phase is None:
            self._arm("write", self.limits.body_timeout, self._on_write_stall)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._phase == "write":
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (called by uvicorn while handling h11's error): a JSON 400, 431 or 501, closed."""
        exc = sys.exc_info()[1]
        status, detail = 400, "it could not be parsed"
        if isinstance(exc, h11.RemoteProtocolError):
            status = exc.error_status_hint if exc.error_status_hint in (400, 431, 501) else 400
            detail = str(exc)[:100]
        self._close_with(status, f"Malformed HTTP request: {detail}. Send a valid HTTP/1.1 request.")

    # --- deadlines ----------------------------------------------------------------------------------------

    def _update_deadline(self) -> None:
        """Re-arm the connection's one timer for the state h11 is in now (see the module docstring)."""
        got_data, self._got_data = self._got_data, False
        if self.lingering:
            return
        if self._refused or self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        theirs, ours = self.conn.their_state, self.conn.our_state
        if theirs is not h11.SEND_BODY:
            self._body_deadline = self._body_cap = None
        if theirs is h11.IDLE:
            if self.conn.trailing_data[0]:  # part of a request's headers is here
                if self._phase != "headers":
                    self._arm("headers", self.limits.header_timeout, self._on_header_timeout)
            elif self._phase not in ("headers", "keepalive"):
                self._disarm()
                if self.timeout_keep_alive_task is None:  # uvicorn's own keep-alive timer is not running
                    self._arm("keepalive", self.limits.keepalive_timeout, self._on_keepalive)
        elif theirs is h11.SEND_BODY:
            if ours in (h11.DONE, h11.MUST_CLOSE):  # answered early (`StrictConnection.send`)
                self._close_silently()  # (a lingering close: `close_gently`)
            elif got_data or self._phase != "body":
                now = self.loop.time()
                if self._body_deadline is None or self._body_cap is None:
                    self._body_deadline = now + self.limits.body_timeout
                    self._body_cap = now + self.limits.body_deadline
                due = min(self._body_deadline, self._body_cap)
                wait = min(self.limits.body_timeout, max(0.0, due - now))
                self._arm("body", wait, self._on_body_timeout)
        elif self._phase != "write":
            self._disarm()  # the request is in: the app's own time limit applies

    # --- closing ------------------------------------------------------------------------------------------

    def close_gently(self) -> None:
        """Close the connection (what `transport.close()` does here): at once, unless the request's body is still
        arriving; then end the server's side (the answer is all sent first), read and throw away what arrives, and
        close `LINGER_TIME` seconds later, or sooner once nothing arrives for `LINGER_PAUSE` (`_on_linger`)."""
        if self.lingering or self.wire.is_closing():
            return
        if self.conn.their_state is not h11.SEND_BODY:
            self._disarm()
            self.wire.close()
            return
        self.lingering = True
        self._linger_end = self._last_data = self.loop.time()
        self._linger_end += LINGER_TIME
        if self.wire.can_write_eof():
            self.wire.write_eof()
        self.wire.resume_reading()  # uvicorn stops reading while the app does not read the body
        self._arm("linger", LINGER_PAUSE, self._on_linger)

    def _on_linger(self) -> None:
        self._timer = None
        now = self.loop.time()
        due = min(self._linger_end, self._last_data + LINGER_PAUSE)
        if now < due:
            self._arm("linger", due - now, self._on_linger)
        elif self.wire.get_write_buffer_size():  # the client has not taken its answer in all that time
            self.wire.abort()
        else:
            self.wire.close()

    def _arm(self, phase: str, seconds: float, callback: Any) -> None:
        self._disarm()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _on_header_timeout(self) -> None:
        self._timer = None
        if not self.conn.trailing_data[0]:
            self._close_silently()
            return
        t = self.limits.header_timeout
        self._close_with(408, f"The request headers took longer than {t:g} s to arrive.")

    def _on_body_timeout(self) -> None:
        self._timer = None
        t = self.limits.body_timeout
        if self.flow.read_paused:  # the app is not reading yet: the client is not the slow one
            if self._body_deadline is not None and self._body_cap is not None:
                self._body_deadline = max(self._body_deadline, self.loop.time()) + t
                self._body_cap = max(self._body_cap, self.loop.time()) + t
            self._arm("body", t, self._on_body_timeout)
            return
        if self._body_cap is not None and self.loop.time() >= self._body_cap - 1e-3:
            d = self.limits.body_deadline
            message = f"The request body took longer than {d:g} s to arrive. Send it faster, or a smaller image."
        elif self._body_deadline is not None and self.loop.time() >= self._body_deadline - 1e-3:
            rate = self.limits.body_min_rate
            message = f"The request body arrived too slowly (under {rate:g} bytes/s). Send it at a steady pace."
        else:
            message = f"The request body stalled: nothing arrived for {t:g} s. Send the body without pauses."
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
        else:
            self._close_with(408, message)

    def _on_keepalive(self) -> None:
        self._timer = None
        self._close_silently()

    def _on_write_stall(self) -> None:
        self._timer = None
        log.info("dropped a client that stopped reading its answer for %g s", self.limits.body_timeout)
        self.transport.abort()  # close() would wait for a buffer the client never drains

    def _close_with(self, status: int, message: str) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, message))
            self.transport.close()

    def _close_silently(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()
