"""Why Pillow could not identify an input: what it starts like, and for a sound TIFF the sample layout Pillow has no
mode for (64-bit samples, 32-bit colour), so that the message says what to change rather than "corrupt"."""

from __future__ import annotations

import io
import re
import warnings

from automask.imageio.bombs import tag_value

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

_SAMPLE_KINDS = {1: "unsigned integers", 2: "signed integers", 3: "floats"}
"""TIFF SampleFormat -> what its samples are."""


def known_format(data: bytes | bytearray) -> str | None:
    """The image format whose signature `data` starts with ('PNG', 'JPEG', 'GIF', 'BMP', 'TIFF', 'WebP'), or None."""
    known = next((name for sig, name in _SIGNATURES if data.startswith(sig)), None)
    if known is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        known = "WebP"
    return known


def unidentified_message(data: bytes, formats: tuple[str, ...]) -> str:
    """The error for `data` that Pillow could not identify as an image of `formats` (the ones it may open)."""
    known = known_format(data)
    if known == "TIFF" and (layout := _unreadable_tiff_layout(data)):
        return (
            f"The TIFF image has {layout}, which automask cannot read: save it with 8- or 16-bit samples (or one "
            "32-bit sample per pixel)."
        )
    if known:
        return f"The input starts like a {known} file but could not be read: it is corrupt or truncated."
    if other := other_format(data):
        return f"The input is {other}, which automask cannot read: convert it to PNG or JPEG and send that."
    head = data[:512]
    if text_kind := _text_source(head):
        return f"The input is {text_kind}, not an image's own bytes: {_AS_TEXT[text_kind]}."
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    kind = "looks like text (HTML, JSON or similar)" if printable >= 0.95 * len(head) else "is not in a known format"
    return f"The input {kind}, not an image automask can read. Supported formats: {', '.join(formats)}."


_BASE64_HEAD = re.compile(rb"\s*(?:data:[^,]{0,200},)?[A-Za-z0-9+/_-]{16}[A-Za-z0-9+/_=\s-]*", re.IGNORECASE)


_TEXT_PLACES = "a Python str; over HTTP, the 'image' field as text, not a file"
_AS_TEXT = {
    "a URL": f"pass the URL itself as text ({_TEXT_PLACES}; on the command line, IMAGE)",
    "base64 text (or a data: URI)": f"decode it first, or pass it as text ({_TEXT_PLACES})",
}
"""What to do with an image source given as bytes (`_text_source`), in words for the library, HTTP and CLI alike."""


def _text_source(head: bytes) -> str | None:
    """What the first bytes of an undecodable input say it is when it is an image source `load_image` reads from a
    string (base64 text, a data: URI or a URL), given as bytes (`base64.b64encode` returns bytes); else None."""
    if re.match(rb"\s*https?://", head, re.IGNORECASE):
        return "a URL"
    return "base64 text (or a data: URI)" if _BASE64_HEAD.fullmatch(head) else None


_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
"""ISO base media `ftyp` brands of HEIF files (an AVIF names `avif` too: it is not one)."""


def other_format(data: bytes) -> str | None:
    """What `data` is when it is a common file a user mistakes for an image automask reads: an iPhone's HEIC photo,
    an SVG drawing, a PDF; else None."""
    if data[4:8] == b"ftyp":
        end = min(int.from_bytes(data[:4], "big"), len(data), 256)
        brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
        if brands & _HEIF_BRANDS and not brands & {b"avif", b"avis"}:
            return "a HEIC/HEIF image (an iPhone's photo)"
    if data.startswith(b"%PDF-"):
        return "a PDF document"
    head = data[:1024].lower()
    if b"<svg" in head and b"<html" not in head and b"<!doctype html" not in head:  # a page showing an icon: text
        return "an SVG (vector) image"
    return None


def _unreadable_tiff_layout(data: bytes) -> str | None:
    """'3 samples per pixel of 32-bit signed integers' when the TIFF `data`'s first directory reads and names a
    sample layout Pillow has no mode for (more than 32 bits a sample, or 32 bits and more than one sample); else
    None (a damaged file, or a layout Pillow reads)."""
    from PIL import TiffImagePlugin

    try:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        fp = io.BytesIO(data)
        fp.seek(ifd.next)
        with warnings.catch_warnings():  # "Corrupt EXIF data" for a damaged directory: told below
            warnings.simplefilter("ignore")
            ifd.load(fp)
        bits, samples, fmt = (int(tag_value(ifd, tag, 1)) for tag in (258, 277, 339))
    except (OSError, ValueError, TypeError, SyntaxError, KeyError, EOFError, OverflowError):
        return None
    if bits < 32 or (bits == 32 and samples == 1):
        return None
    kind = _SAMPLE_KINDS.get(fmt, f"sample format {fmt}")
    return f"{samples} sample{'s' if samples != 1 else ''} per pixel of {bits}-bit {kind}"
