"""Request bodies: the ASGI types, a request-body size limit (pure ASGI: 413 from Content-Length, or while the
body streams in), and a budget for the request bodies held in memory at once (503 past it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from automask.server.errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(ApiError):
    """The request body is over the server's limit (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"The request body is over the limit of {limit} bytes. Send a smaller image "
            f"(at most AUTOMASK_MAX_IMAGE_BYTES), or an image URL instead of the file.",
        )


class BodyLimitMiddleware:
    """Answer 413 for a body over `limit` bytes: at once from Content-Length, else while it streams in.

    A streamed body over the limit makes `receive` raise `BodyTooLarge`, which the app answers as a 413.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(send, 413, BodyTooLarge(self.limit).message)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counting_receive, send)


async def _send_json(send: Send, status: int, error: str) -> None:
    """Send a complete `{"error": ...}` response from ASGI middleware."""
    import json

    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyBudget:
    """Bytes of request bodies the service holds in memory at once (`capacity`), of which one key may hold at most
    `per_key` (so no one client can take it all). A v1 request holds its body until it is answered, so with many
    large uploads in flight memory would grow without bound; past the budget a request is answered 503 with
    Retry-After before its body is read. A request that comes to hold more (a v2 submit's decoded image) grows its
    `Hold`. Used on the event loop only (no lock)."""

    def __init__(self, capacity: int, per_key: int) -> None:
        self.capacity = capacity
        self.per_key = per_key
        self.used = 0
        self._by_key: dict[str | None, int] = {}

    @contextmanager
    def hold(self, key_id: str | None, size: int) -> Iterator[Hold]:
        """Hold `size` bytes for `key_id` (None: unkeyed) for the block, or raise a 503 `ApiError`; yields the
        `Hold`, which may grow. A request larger than the whole budget is admitted only when it holds all there is."""
        held = Hold(self, key_id)
        held.grow(size)
        try:
            yield held
        finally:
            self._release(key_id, held.size)

    def _take(self, key_id: str | None, size: int, own: int) -> None:
        """Count `size` more bytes for `key_id`, whose request holds `own` already; 503 past the budget or the key's
        share, unless nothing but that request holds any."""
        mine = self._by_key.get(key_id, 0)
        if (self.used > own and self.used + size > self.capacity) or (mine > own and mine + size > self.per_key):
            raise ApiError(
                503,
                "The server is receiving too many large requests at once; try again in a few seconds.",
                {"Retry-After": "5"},
            )
        self.used += size
        self._by_key[key_id] = mine + size

    def _release(self, key_id: str | None, size: int) -> None:
        self.used -= size
        left = self._by_key.get(key_id, 0) - size
        if left:
            self._by_key[key_id] = left
        else:
            self._by_key.pop(key_id, None)


class Hold:
    """One request's bytes in a `BodyBudget` (`size`), given back when its `hold` block ends."""

    def __init__(self, budget: BodyBudget, key_id: str | None) -> None:
        self.budget = budget
        self.key_id = key_id
        self.size = 0

    def grow(self, size: int) -> None:
        """Hold `size` bytes more, or raise the budget's 503 (nothing more held); admitted when this request is alone
        in the budget."""
        if size > 0:
            self.budget._take(self.key_id, size, self.size)
            self.size += size


def declared_size(headers: Any, limit: int) -> int:
    """The body size a request declares (Content-Length), or `limit` when it declares none (chunked)."""
    declared = headers.get("content-length", "")
    return int(declared) if declared.isdigit() and int(declared) <= limit else limit
