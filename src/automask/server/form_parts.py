"""How the request body's kind and a form's plain `image` field are read, beyond what starlette's parsers do: a JSON
object sent as a urlencoded form (`is_json_object`), an image file's bytes sent as a multipart field without a
filename (`ImageFieldParser`, `field_image`)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from typing import Any

from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartParser

from automask.errors import InvalidOptionError, shown
from automask.imageio.unreadable import known_format
from automask.options import MaskOptions

MAX_FORM_PARTS = 32
"""Most files, and most other fields, a form may hold: each is then named when it is unknown or given twice (the
body's size is bounded apart)."""
_JSON_OBJECT = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{")
_BINARY = re.compile("[\x00-\x08\x0e-\x1f\x7f]")
"""A control character that is no whitespace: in no URL, data URI or base64 text, in nearly every image file."""
_BINARY_HEAD = 1 << 16
"""Characters of a plain `image` form field searched for `_BINARY`: an image file's header holds one (a length or
size field's zero byte), and text that holds one further on is no image string either way."""
_TEXT_SOURCE = re.compile(r"\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)", re.IGNORECASE)
"""How a URL or a data URI starts, and no image file: such a part is text, its control characters a flaw to name."""


NUMBER_OPTIONS = frozenset(n for n, f in MaskOptions.model_fields.items() if f.annotation in (int, float))
"""The options that take a number (threshold, text_threshold, grow_mask, seed, min_area, feather)."""
_JSON_NUMBER = re.compile(
    r"[ \t\r\n]*(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|NaN|-?Infinity)[ \t\r\n]*"
)
"""A number as a JSON body may write it (Python's json reads NaN and Infinity too: validation refuses them), and no
other text that int() or float() would read (`1_0`, `+5`, `05`, `.5`, `5.`, other scripts' digits)."""


def form_value(name: str, text: str) -> Any:
    """Form field `name`'s `text` as the same text in a JSON body means: a number option's value parsed as JSON parses
    it (validation then reads it exactly as JSON's), any other field's text as it is. A number option's text that is
    no JSON number raises `InvalidOptionError` naming the field."""
    if name not in NUMBER_OPTIONS:
        return text
    if _JSON_NUMBER.fullmatch(text) is None:
        raise InvalidOptionError(
            name, f"must be a number written as JSON writes one (such as 0.5, 10 or 1e3), not {shown(text, 40)!r}"
        )
    try:
        return json.loads(text)
    except ValueError:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise InvalidOptionError(name, "is a number with too many digits to read") from None


def check_not_an_image(body: bytes | bytearray, content_type: str) -> None:
    """Raise `InvalidOptionError` saying what to send instead when `body`, sent as `content_type` (lower case, no
    parameters), is an image file itself (`curl --data-binary @photo.png`): it starts as an image format does (a
    multipart form starts with its boundary's '--'), or it is labelled image/* and does not start as a JSON object
    does (a JSON body labelled so is read)."""
    known = known_format(body)
    if known is None and not (content_type.startswith("image/") and not is_json_object(body)):
        return
    what = ", ".join(filter(None, [known and f"a {known} file", content_type and f"sent as {shown(content_type, 60)}"]))
    raise InvalidOptionError(
        "body",
        f"is an image file's own bytes ({what}), which this endpoint does not take as the body: send a JSON object "
        '{"image": "<the image as base64, a data: URI or an http(s) URL>", "prompt": "..."}, or a multipart form '
        "with the image as its 'image' file (curl -F image=@photo.png -F prompt=sofa)",
    )


def is_json_object(body: bytes | bytearray) -> bool:
    """Whether `body` starts as a JSON object does (after a UTF-8 byte order mark, which JSON bodies read past). An
    application/x-www-form-urlencoded body that does is read as JSON: `curl -d '{...}'` or `curl -d @body.json`
    without a Content-Type labels JSON so, and no form of this API's fields starts with '{'."""
    return _JSON_OBJECT.match(body) is not None


class ImageFieldParser(MultiPartParser):
    """starlette's multipart parser, which also keeps the bytes of a plain (no filename) `image` part as they came
    (`raw_image`): it decodes such a part to text, with the body's charset or else latin-1, and no encoding gives the
    bytes back in every case (UTF-8 text of characters U+0080-U+00FF re-encoded as latin-1 is other bytes)."""

    raw_image: bytearray | None = None

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None and part.field_name == "image":
            self.raw_image = part.data  # the part's own buffer: no copy
        super().on_part_end()


async def parse_multipart(
    headers: Headers, body: bytearray, *, max_parts: int, max_part_size: int, chunk: int = 1 << 16
) -> tuple[FormData, bytearray | None]:
    """The multipart form `body` (sent with `headers`), parsed as `Request.form` does, and the bytes of its plain
    `image` part (None when it has none). A malformed form raises starlette's `MultiPartException`."""

    async def stream() -> AsyncGenerator[bytes, None]:
        view = memoryview(body)
        for offset in range(0, len(view), chunk):
            yield bytes(view[offset : offset + chunk])

    parser = ImageFieldParser(headers, stream(), max_files=max_parts, max_fields=max_parts, max_part_size=max_part_size)
    form = await parser.parse()
    if parser.raw_image is None and isinstance(form.get("image"), str):  # (a 500, logged; never the decoded text)
        await form.close()
        raise RuntimeError("ImageFieldParser kept no plain 'image' part's bytes: starlette's MultiPartParser changed")
    return form, parser.raw_image


def field_image(text: str, raw: bytes | bytearray) -> str | bytes:
    """A multipart `image` part without a filename (`curl -F 'image=<photo.png'`), which the parser decoded to `text`
    from its bytes `raw`: those bytes when the text's head holds binary (`_BINARY`) and it does not start as a URL or
    data URI does, else the text."""
    if not _BINARY.search(text, 0, _BINARY_HEAD) or _TEXT_SOURCE.match(text):  # on the event loop: the head alone
        return text
    return bytes(raw)
