"""Dispatch an image source to the right reader: every accepted source -> H×W×3 uint8 RGB.

A string is, in this order: a URL (http(s) is fetched through the guard in `fetch`; any other `scheme://` is
refused there), a `data:` URI, an existing file, or bare base64 image data. Anything else is an error that
names the kinds accepted ("No such file: ..." when it could be a path; why it cannot be read when it is a path
here the system cannot look up: a link loop, a folder it may not search). With `allow_paths=False` (a server
reading a client's string) no string is ever read as a file path, and `Path` sources (any `os.PathLike`) are
refused.
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import functools
import os
import re
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from automask.errors import ImageDecodeError, shown
from automask.imageio.decode import array_to_rgb, check_encoded_size, check_header, decode_image, pil_to_rgb
from automask.settings import Settings

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray | BinaryIO

_SCHEME = re.compile(r"\s*[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_START = re.compile(r"\s*data:", re.IGNORECASE)
_DATA_URI = re.compile(r"\s*data:([^,;]*)((?:;[^,;]*)*?),", re.IGNORECASE)
_ASCII_SPACE = " \t\n\r\f\v"
_PADDED_BASE64 = re.compile(r"[A-Za-z0-9+/ \t\n\r\f\v]*(?:=[ \t\n\r\f\v]*){0,2}")
"""Standard base64, ASCII whitespace anywhere, padding at the end only: what `binascii.a2b_base64` reads as is."""
_SPACE_INSIDE = re.compile(r"[A-Za-z0-9/] +[A-Za-z0-9/=]")
_PLUS_AS_SPACE = (
    "The image string looks like base64 whose '+' characters became spaces (URL form encoding, as in a "
    "form-urlencoded body or a query string): send it as JSON or multipart, or URL-encode it ('+' as %2B)."
)
_BASE64_PIECE = re.compile(r"[A-Za-z0-9+/]*(=*)")
_URLSAFE = str.maketrans("-_", "+/")
BASE64_CHUNK = 1 << 18
"""Characters of base64 text decoded at a time when it cannot be decoded in one call (a data: URI, URL-safe or
unpadded base64)."""
_TEXT_STREAM = "The image stream must be opened in binary mode ('rb'): it is a text stream."
_MAX_PATH_CHARS = 1024
_PATH_SHOWN = 120
"""Characters of a path (or of text read as one) echoed in an error (`shown`)."""
_KINDS = "An image string must be an existing file, an http(s) URL, a data:image/...;base64, URI or base64 image data."
_KINDS_NO_PATHS = "An image string must be an http(s) URL, a data:image/...;base64, URI or base64 image data."


def load_image(
    source: ImageSource, settings: Settings | None = None, *, allow_paths: bool = True, keep_alpha: bool = False
) -> np.ndarray:
    """Read `source` into an H×W×3 uint8 RGB array (rows top to bottom as displayed: EXIF orientation applied).

    `source`: a path (str, Path or another `os.PathLike`), encoded bytes (bytes, bytearray, memoryview), a binary
    file object (e.g. `sys.stdin.buffer` or an upload's file), a PIL image (its current frame), a numpy array
    (H×W, H×W×1, H×W×3 RGB or H×W×4 RGBA), a bare base64 string, a `data:image/...;base64,` URI, or an http(s) URL.
    `allow_paths=False`: a string is only a URL, a data URI or base64, never a file path, and a `Path` (any
    `os.PathLike`) is refused (for strings that come from an untrusted client). Transparency is composited onto
    white, unless `keep_alpha`: then an image with transparency gives H×W×4 RGBA (straight alpha).
    Raises ImageDecodeError, ImageTooLargeError, URLRefusedError, FetchError or FetchTimeoutError.
    """
    settings = settings or Settings()
    if isinstance(source, os.PathLike) and not allow_paths:
        raise ImageDecodeError(f"Image files on this machine cannot be read here. {_KINDS_NO_PATHS}")
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, settings, keep_alpha=keep_alpha)
    if isinstance(source, Image.Image):
        return pil_to_rgb(source, settings, keep_alpha=keep_alpha, shared=True)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), settings, keep_alpha=keep_alpha)
    if isinstance(source, os.PathLike):
        return decode_image(read_file(Path(os.fsdecode(source)), settings), settings, keep_alpha=keep_alpha)
    if isinstance(source, str):
        return _from_string(source, settings, allow_paths=allow_paths, keep_alpha=keep_alpha)
    if hasattr(source, "read"):
        return decode_image(read_stream(source, settings), settings, keep_alpha=keep_alpha)
    raise ImageDecodeError(
        f"Unsupported image source of type {type(source).__name__}: pass a path, URL, bytes, base64 string, "
        "PIL image or numpy array."
    )


def read_stream(stream: BinaryIO, settings: Settings) -> bytes:
    """Read a binary stream to its end, at most `settings.max_image_bytes` bytes (one more to detect overflow).
    An unbuffered stream (a pipe or socket opened with buffering=0) answers each `read` with what has arrived so
    far, so it is read until it ends."""
    if getattr(stream, "closed", False) is True:
        raise ImageDecodeError(
            "The image file was closed before automask read it: pass it while open, or pass the file's path."
        )
    limit = settings.max_image_bytes + 1
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        try:
            data = stream.read(min(limit - size, READ_PIECE))
        except UnicodeDecodeError:  # a text stream decoding the image's bytes
            raise ImageDecodeError(_TEXT_STREAM) from None
        except (OSError, ValueError) as exc:  # write-only (io.UnsupportedOperation), a failing device...
            raise ImageDecodeError(f"The image stream cannot be read: {exc}.") from None
        if isinstance(data, str):
            raise ImageDecodeError(_TEXT_STREAM)
        if not data:  # the end (None: a non-blocking stream with nothing more to give)
            break
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageDecodeError(f"The image stream's read() returned {type(data).__name__}, not bytes.")
        chunks.append(bytes(data))
        size += len(data)
    check_encoded_size(size, settings, read=True)
    if not size and (end := _position(stream)):
        raise ImageDecodeError(
            f"The image stream is at its end (byte {end:,}), so nothing is left to read: rewind it with seek(0) "
            "before passing it (e.g. after saving an image into a BytesIO)."
        )
    return b"".join(chunks)


READ_PIECE = 1 << 20
"""Most bytes asked of one `read`: a buffered file's read(n) sets n bytes aside before it reads, so asking for the
whole limit (AUTOMASK_MAX_IMAGE_BYTES + 1) at once cost that much memory for any file, and a raised limit (2**50)
was a MemoryError for every image."""


def read_at_most(file: BinaryIO, limit: int, stated: int) -> bytes:
    """Up to `limit` bytes of the binary `file`: first as many as its `stated` size (+1) in one read (one buffer for
    a regular file), then any more (a pipe or device states 0) in pieces of at most `READ_PIECE`."""
    chunks: list[bytes] = []
    size = 0
    want = min(limit, max(stated, 1))
    while size < limit and (data := file.read(want)):
        chunks.append(data)
        size += len(data)
        want = min(limit - size, READ_PIECE)
    return b"".join(chunks)


def _position(stream: BinaryIO) -> int:
    """Where a seekable `stream` stands (bytes from its start); 0 when it cannot say."""
    try:
        return int(stream.tell()) if stream.seekable() else 0
    except (AttributeError, OSError, ValueError, TypeError):
        return 0


def read_file(path: Path, settings: Settings) -> bytes:
    """The bytes of the image file at `path` (size checked before reading, and no more read than one byte past the
    limit: a pipe or a device, /dev/zero, has no size); clear errors for missing files (one that exists without the
    whitespace around its name says so, as for a string)."""
    given, path = path, path.expanduser()
    try:
        stated = path.stat().st_size
        check_encoded_size(stated, settings)
        with path.open("rb") as file:
            data = read_at_most(file, settings.max_image_bytes + 1, stated + 1)
        check_encoded_size(len(data), settings, read=True)
        return data
    except FileNotFoundError:
        raise _padded_path_error(str(given)) or ImageDecodeError(
            f"No such file: {shown(str(path), _PATH_SHOWN)}"
        ) from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{shown(str(path), _PATH_SHOWN)} is a folder, not an image file.") from None
    except PermissionError:
        raise ImageDecodeError(f"Cannot read {shown(str(path), _PATH_SHOWN)}: permission denied.") from None
    except OSError as exc:
        raise ImageDecodeError(f"Cannot read {shown(str(path), _PATH_SHOWN)}: {exc.strerror or exc}.") from None


def _from_string(text: str, settings: Settings, *, allow_paths: bool, keep_alpha: bool) -> np.ndarray:
    decode = functools.partial(decode_image, settings=settings, keep_alpha=keep_alpha)
    kinds = _KINDS if allow_paths else _KINDS_NO_PATHS
    if _SCHEME.match(text):  # any scheme://: the fetcher refuses all but http(s)
        from automask.imageio.fetch import fetch_url  # httpx is imported only when a URL is given

        return decode(fetch_url(text.strip(), settings))
    inline = not text or text.isspace() or _DATA_START.match(text) is not None
    if allow_paths and not inline and _is_existing_path(text):
        return decode(read_file(Path(text), settings))
    if allow_paths and not inline and (hint := _padded_path_error(text)):
        raise hint
    data = _inline_bytes(text, settings, allow_paths=allow_paths)
    try:
        return decode(data)
    except ImageDecodeError as exc:
        if allow_paths and not inline and _unreachable_path(text):
            return decode(read_file(Path(text), settings))  # says why it cannot be read
        if allow_paths and not inline and _may_be_path(text) and len(text) < 64:  # too short for base64: a path
            raise ImageDecodeError(f"No such file: {shown(text, _PATH_SHOWN)}. {kinds}") from None
        raise _plus_hint(exc, text) from None


def _inline_bytes(text: str, settings: Settings, *, allow_paths: bool) -> bytes:
    """The encoded image a `data:` URI or a bare base64 string holds; `ImageDecodeError` naming the kinds of image
    string accepted when `text` is neither (with `allow_paths`, "No such file" when it could be a path). The text
    is never copied whole (it may be tens of MB)."""
    kinds = _KINDS if allow_paths else _KINDS_NO_PATHS
    if not text or text.isspace():
        raise ImageDecodeError(f"The image string is empty. {kinds}")
    if _DATA_START.match(text):
        try:
            return decode_data_uri(text, settings)
        except ImageDecodeError as exc:
            raise _plus_hint(exc, text) from None
    data = decode_base64(text, settings)
    if data is None:
        if allow_paths and _unreachable_path(text):
            return read_file(Path(text), settings)  # says why it cannot be read
        if allow_paths and _may_be_path(text):
            raise ImageDecodeError(f"No such file: {shown(text, _PATH_SHOWN)}. {kinds}")
        raise _plus_hint(ImageDecodeError(f"The image string is not valid base64. {kinds}"), text)
    return data


def _plus_hint(exc: ImageDecodeError, text: str) -> ImageDecodeError:
    """`exc`, or one saying what went wrong when the undecodable `text` (base64 or a data: URI) looks like base64
    whose '+' became spaces: base64 letters and spaces only, a space between two letters, and no '+'. Searched,
    never copied (the text may be tens of MB)."""
    start = match.end() if (match := _DATA_URI.match(text)) else 0
    if text.find("+", start) >= 0 or not _SPACE_INSIDE.search(text, start):
        return exc
    return ImageDecodeError(_PLUS_AS_SPACE) if _PADDED_BASE64.fullmatch(text, start) else exc


def check_image(image: str | bytes, settings: Settings) -> None:
    """Raise now what `load_image(image, allow_paths=False)` would raise before any download or pixel decoding,
    for a server that stores a client's image to load it later (v2 jobs): a URL refused by its scheme or by a host
    spelled as an address (`fetch.check_url`: no DNS lookup; a host name is checked when fetched); data that is not
    base64; over the byte limit; and from the image's header, not an image or over the pixel limit
    (`ImageDecodeError`, `ImageTooLargeError`, `URLRefusedError`)."""
    if isinstance(image, str) and _SCHEME.match(image):
        from automask.imageio.fetch import check_url

        check_url(image.strip(), settings)
        return
    if isinstance(image, bytes):
        check_header(image, settings)
        return
    try:
        check_header(_inline_bytes(image, settings, allow_paths=False), settings)
    except ImageDecodeError as exc:
        raise _plus_hint(exc, image) from None


def decode_data_uri(uri: str, settings: Settings) -> bytes:
    """The bytes of a `data:[<media type>][;params];base64,<data>` URI (only base64 data URIs hold images)."""
    match = _DATA_URI.match(uri)
    if match is None:
        raise ImageDecodeError("The data: URI is malformed; expected data:image/png;base64,<data>.")
    media_type = match.group(1).strip().lower()
    params = [p.strip().lower() for p in match.group(2).split(";") if p.strip()]
    if "base64" not in params:
        raise ImageDecodeError("The data: URI must be base64-encoded (data:image/png;base64,<data>).")
    if media_type and not media_type.startswith("image/") and media_type != "application/octet-stream":
        raise ImageDecodeError(f"The data: URI holds {shown(media_type)!r}, not an image.")
    data = decode_base64(uri, settings, start=match.end())
    if data is None:
        raise ImageDecodeError("The data: URI's payload is not valid base64.")
    return data


def inline_size(image: str | bytes) -> int:
    """Bytes that decoding a request's `image` adds to what the request holds, at most (nothing is decoded here):
    about three quarters of base64 text or a data: URI; 0 for an uploaded file (bytes already) and for a URL (fetched
    later, under its own limits)."""
    if isinstance(image, bytes) or _SCHEME.match(image):
        return 0
    return len(image) * 3 // 4


def decode_base64(text: str, settings: Settings, *, start: int = 0) -> bytes | None:
    """Decode the standard or URL-safe base64 in `text[start:]` (whitespace and missing padding tolerated); None if
    it is not base64.

    The text (tens of MB for a large image) is not copied: standard padded base64 is decoded in one call straight
    from the string's own buffer, the rest `BASE64_CHUNK` characters at a time. Extra memory at the peak: the
    decoded bytes (twice them for a data: URI, URL-safe or unpadded base64)."""
    if sys.version_info >= (3, 11) and start == 0 and text and len(text) % 4 == 0:
        if len(text) * 3 // 4 <= settings.max_image_bytes:  # (whitespace would not count: looked at below)
            with contextlib.suppress(binascii.Error, ValueError):  # whitespace, URL-safe...: below
                return binascii.a2b_base64(text, strict_mode=True)  # checks as it decodes, in the str's buffer
    spaces = sum(text.count(c, start) for c in _ASCII_SPACE)
    chars = len(text) - start - spaces
    check_encoded_size(chars * 3 // 4, settings)
    if chars == 0:
        return None
    try:
        if start == 0 and chars % 4 == 0 and _PADDED_BASE64.fullmatch(text):
            return binascii.a2b_base64(text)  # skips the whitespace; reads a str's ASCII buffer in place
        return _decode_base64_chunks(text, start, settings)
    except (binascii.Error, ValueError):
        return None


def _decode_base64_chunks(text: str, start: int, settings: Settings) -> bytes | None:
    """`decode_base64` a chunk at a time: whitespace dropped, URL-safe letters made standard, padding checked at
    the end (after a partial group, at most two '=' counting those a missing padding needs; after whole groups,
    any number, as Python's own `b64decode` takes them)."""
    urlsafe = text.find("-", start) >= 0 or text.find("_", start) >= 0
    out: list[bytes] = []
    carry, chars, pads = "", 0, 0
    for pos in range(start, len(text), BASE64_CHUNK):
        piece = "".join(text[pos : pos + BASE64_CHUNK].split())
        if urlsafe:
            piece = piece.translate(_URLSAFE)
        match = _BASE64_PIECE.fullmatch(piece)
        if match is None or (pads and len(piece) > len(match.group(1))):  # a letter after padding
            return None
        pads += len(match.group(1))
        data = carry + piece[: len(piece) - len(match.group(1))]
        chars += len(data) - len(carry)
        whole = len(data) - len(data) % 4
        out.append(binascii.a2b_base64(data[:whole]))
        carry = data[whole:]
    if chars == 0 or len(carry) == 1 or (carry and pads + -(chars + pads) % 4 > 2):
        return None
    if carry:
        out.append(binascii.a2b_base64(carry + "=" * (-len(carry) % 4)))
    return b"".join(out)


def _may_be_path(text: str) -> bool:
    """Whether `text` could name a file (short, one line); base64 and data URIs are long."""
    return 0 < len(text) <= _MAX_PATH_CHARS and "\n" not in text and "\x00" not in text


def _padded_path_error(text: str) -> ImageDecodeError | None:
    """The "No such file" error for the path `text` when it is an existing path once the whitespace around it is
    stripped (`_padded_path`), saying so; None otherwise."""
    stripped = _padded_path(text)
    if stripped is None:
        return None
    return ImageDecodeError(
        f"No such file: {shown(text, _PATH_SHOWN)!r}, but {shown(stripped, _PATH_SHOWN)!r} exists: "
        "strip the whitespace around the path."
    )


def _padded_path(text: str) -> str | None:
    """`text` without the whitespace around it (a line read from a file keeps its newline) when that is an existing
    path and `text` is not; None otherwise. Long text (base64) is never copied."""
    if len(text) > 2 * _MAX_PATH_CHARS:
        return None
    stripped = text.strip(_ASCII_SPACE)
    return stripped if stripped != text and _is_existing_path(stripped) else None


def _is_existing_path(text: str) -> bool:
    return _lookup(text) == 0


def _unreachable_path(text: str) -> bool:
    """Whether `text`, neither a file nor base64 of an image, names a path here that the system cannot look up (a
    link loop, a folder on its path that may not be searched), for `read_file` to say why. Base64 is read first:
    in a current folder that may not be searched, base64 text holding a '/' is such a path to the system."""
    return _lookup(text) in (errno.ELOOP, errno.EACCES)


def _lookup(text: str) -> int | None:
    """0 when `text` names an existing path, the errno when looking it up fails, None when it cannot be a path."""
    if not _may_be_path(text):
        return None
    try:
        os.stat(Path(text).expanduser())
    except OSError as exc:
        return exc.errno
    except ValueError:
        return None
    return 0
