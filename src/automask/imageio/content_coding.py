"""Undo an image URL's HTTP content coding (`Content-Encoding`) with the output capped as it is produced.

The fetcher asks for none (`Accept-Encoding: identity`), but a server may compress anyway: S3 serves an object
uploaded with `Content-Encoding: gzip` that way whatever the client asks, and a hostile server sends a few KB that
inflate to gigabytes. httpx's own decoders inflate each network read in one piece, with no bound, so the fetcher
reads the raw body and inflates it here, never more than the caller's room at a time.
"""

from __future__ import annotations

import zlib

WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
"""The content codings undone, as zlib window bits: a gzip header (31), a zlib header (15; `deflate` without one,
as some servers send it, is read as raw deflate)."""


class CodingError(ValueError):
    """The body cannot be decoded: an unsupported coding (the message names it), or data that is not in it."""


class Inflater:
    """Decodes one body sent with `Content-Encoding: coding` (`WBITS`), a piece at a time, each piece's output at
    most `room` bytes (then the body is over the caller's limit: it stops)."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._zlib = zlib.decompressobj(WBITS[coding]) if coding != "deflate" else None
        self._head = b""
        """deflate: its first bytes, until there are two to tell a zlib header from raw deflate data."""

    @classmethod
    def for_header(cls, header: str) -> Inflater | None:
        """The decoder for a `Content-Encoding` header's value; None for none (or `identity`). Raises CodingError for
        a coding not in `WBITS`, or for several (each would need its own cap)."""
        codings = [c.strip().lower() for c in header.split(",") if c.strip() and c.strip().lower() != "identity"]
        if not codings:
            return None
        if len(codings) > 1 or codings[0] not in WBITS:
            shown = header.strip()
            raise CodingError(f"it is sent with Content-Encoding {shown!r}; automask reads only gzip or deflate")
        return cls(codings[0])

    def decode(self, data: bytes, room: int) -> bytes:
        """The bytes `data` decodes to, at most `room` (>= 1): past it the rest is dropped, and the caller, having
        received `room` bytes, stops. Data after the end of the compressed stream is ignored. Raises CodingError."""
        if self._zlib is None:  # deflate, not started: a zlib header (RFC 1950) or, as some servers send, none
            self._head += data
            if len(self._head) < 2:
                return b""
            cmf, flg = self._head[0], self._head[1]
            zlib_header = cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0
            self._zlib = zlib.decompressobj(WBITS["deflate"] if zlib_header else -zlib.MAX_WBITS)
            data, self._head = self._head, b""
        if self._zlib.eof:
            return b""
        try:
            return self._zlib.decompress(data, room)
        except zlib.error as exc:
            raise CodingError(f"it does not decompress as {self.coding} ({exc})") from None
