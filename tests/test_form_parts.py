"""`ImageFieldParser` keeps a plain multipart `image` part's bytes through a hook into starlette's private parser
state (`MultiPartParser._current_part`, the `on_part_end` callback). A starlette that no longer works so must fail
loudly (these tests, an error the server logs), never read such a part as its decoded text (a client's image
refused as 'not valid base64')."""

from __future__ import annotations

import asyncio

import pytest
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from automask.server import form_parts

IMAGE = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xc3\xa9\xff\xfe"  # binary: no UTF-8 text, no ASCII
BODY = (
    b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nsofa\r\n'
    b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + IMAGE + b"\r\n--b--\r\n"
)
HEADERS = Headers({"content-type": "multipart/form-data; boundary=b"})


def parse(body: bytes) -> tuple[object, bytearray | None]:
    return asyncio.run(form_parts.parse_multipart(HEADERS, bytearray(body), max_parts=8, max_part_size=1 << 20))


def test_a_plain_image_part_is_kept_as_its_bytes() -> None:
    form, raw = parse(BODY)
    assert raw == IMAGE
    assert form_parts.field_image(form["image"], raw) == IMAGE  # type: ignore[index]


def test_a_starlette_that_no_longer_calls_the_hook_is_an_error_not_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the part was then read as the text starlette decoded (a 400 blaming the client's image)."""
    monkeypatch.setattr(form_parts.ImageFieldParser, "on_part_end", MultiPartParser.on_part_end)
    with pytest.raises(RuntimeError, match="ImageFieldParser"):
        parse(BODY)


def test_a_form_without_a_plain_image_part_has_no_raw_image() -> None:
    form, raw = parse(BODY.replace(b'name="image"', b'name="image"; filename="i.png"'))
    assert raw is None and form["image"].filename == "i.png"  # type: ignore[index, union-attr]
