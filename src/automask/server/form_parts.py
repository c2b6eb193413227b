"""How the request body's kind and a form's plain `image` field are read, beyond what starlette's parsers do: a JSON
object sent as a urlencoded form (`is_json_object`), an image file's bytes sent as a multipart field without a
filename (`field_image`)."""

from __future__ import annotations

import codecs
import re

from python_multipart.multipart import parse_options_header

MAX_FORM_PARTS = 32
"""Most files, and most other fields, a form may hold: each is then named when it is unknown or given twice (the
body's size is bounded apart)."""
_JSON_OBJECT = re.compile(rb"[ \t\r\n]*\{")
_BINARY = re.compile("[\x00-\x08\x0e-\x1f\x7f]")
"""A control character that is no whitespace: in no URL, data URI or base64 text, in nearly every image file."""
_BINARY_HEAD = 1 << 16
"""Characters of a plain `image` form field searched for `_BINARY`: an image file's header holds one (a length or
size field's zero byte), and text that holds one further on is no image string either way."""
_TEXT_SOURCE = re.compile(r"\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)", re.IGNORECASE)
"""How a URL or a data URI starts, and no image file: such a part is text, its control characters a flaw to name."""


def is_json_object(body: bytes | bytearray) -> bool:
    """Whether `body` starts as a JSON object does. An application/x-www-form-urlencoded body that does is read as
    JSON: `curl -d '{...}'` without a Content-Type labels JSON so, and no form of this API's fields starts with '{'."""
    return _JSON_OBJECT.match(body) is not None


def part_charset(content_type: str) -> str:
    """The codec starlette's multipart parser decodes a part without a filename with: the body's `charset`
    parameter, else UTF-8; latin-1 for a charset Python does not know."""
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset", b"utf-8")
    try:
        return codecs.lookup(charset.decode("latin-1")).name
    except LookupError:
        return "latin-1"


def field_image(text: str, charset: str) -> str | bytes:
    """A multipart `image` part without a filename (`curl -F 'image=<photo.png'`), which the parser decoded to `text`:
    the part's bytes when its head holds binary (`_BINARY`) and it does not start as a URL or data URI does, else the
    text. The bytes are the text's latin-1 encoding where that is not valid in `charset` (the parser fell back to
    latin-1, as it does for nearly every image file), else its encoding in `charset`."""
    if not _BINARY.search(text, 0, _BINARY_HEAD) or _TEXT_SOURCE.match(text):  # on the event loop: the head alone
        return text
    try:
        raw = text.encode("latin-1")
        raw.decode(charset)
    except UnicodeEncodeError:  # a character past U+00FF: decoded with `charset`
        return text.encode(charset)
    except UnicodeDecodeError:  # the parser fell back to latin-1: these are the part's bytes
        return raw
    return text.encode(charset)
