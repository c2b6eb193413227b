"""Images small in bytes and in pixels whose decoding still costs memory or time without bound: checked from the
header, before any pixel is decoded.

- **TIFF tiles**: libtiff decodes a tile whole, into a buffer of the tile's size whatever the image's: a 16×16
  image in one 65536×65536 tile of deflated zeros is 12 MB that take 12 GB. A tile may have at most
  `settings.max_image_pixels` pixels, as an image.
- **JPEG scans**: a progressive JPEG is decoded one scan at a time, each a pass over every block of the image, and a
  scan may be a dozen bytes: 1000 empty scans of a 40-megapixel image (220 KB) take a minute of CPU, and no thread
  can be stopped inside libjpeg. Encoders write about 10 scans (libjpeg's default script; mozjpeg's rarely 20):
  more than `MAX_JPEG_SCANS` is refused.
"""

from __future__ import annotations

import re
from typing import Any

from PIL import Image

from automask.errors import ImageDecodeError, ImageTooLargeError
from automask.settings import Settings

MAX_JPEG_SCANS = 100
"""Most scans a JPEG's (first) image may have."""
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
"""A JPEG marker as libjpeg finds the next one: 0xFF, fill bytes, then a code that is not a stuffed zero (entropy
data) or a restart marker (RSTn: no segment). Anything in between is skipped, as libjpeg skips it."""
_SOS, _EOI, _NO_LENGTH = 0xDA, 0xD9, (0x01, 0xD8)


def tag_value(tags: Any, tag: int, default: Any) -> Any:
    """A TIFF tag's value (the first, if it has several) from Pillow's `tag_v2`; `default` when absent."""
    value = tags.get(tag, default)
    return value[0] if isinstance(value, tuple) and value else value


def check_tiff_tiles(img: Image.Image, settings: Settings) -> None:
    """Raise `ImageTooLargeError` for a tiled TIFF whose tiles have more than `settings.max_image_pixels` pixels
    (`ImageDecodeError` if their size cannot be read); nothing for any other image."""
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None:
        return
    from PIL.TiffImagePlugin import TILELENGTH, TILEWIDTH  # (loaded already: the image was opened by it)

    try:  # whatever integer type the file gives them (libtiff reads any)
        width, length = (abs(int(tag_value(tags, tag, 0))) for tag in (TILEWIDTH, TILELENGTH))
    except (ValueError, TypeError, OverflowError, KeyError, OSError, SyntaxError) as exc:
        raise ImageDecodeError(f"The image could not be read: it is corrupt or truncated ({exc}).") from None
    if width * length > settings.max_image_pixels:
        raise ImageTooLargeError(
            f"The TIFF image is stored in tiles of {width}×{length} = {width * length:,} pixels, each decoded whole; "
            f"the limit is {settings.max_image_pixels:,} pixels (AUTOMASK_MAX_IMAGE_PIXELS). Save it with smaller "
            "tiles (or none)."
        )


def check_jpeg_scans(data: bytes) -> None:
    """Raise `ImageDecodeError` when the JPEG `data` (its first image: an MPO's first frame) has more than
    `MAX_JPEG_SCANS` scans. Reads the markers only (segments are skipped by their length, entropy data by search)."""
    scans = jpeg_scans(data, stop=MAX_JPEG_SCANS + 1)
    if scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(
            f"The JPEG has more than {MAX_JPEG_SCANS} scans (an encoder writes about 10), each a pass over the whole "
            "image: it is refused. Save it again as a baseline or ordinary progressive JPEG."
        )


def jpeg_scans(data: bytes, stop: int) -> int:
    """The start-of-scan markers of the first image of the JPEG `data` (up to its end-of-image marker), counted up
    to `stop`."""
    pos, scans = 2, 0  # after SOI
    while scans < stop and (found := _MARKER.search(data, pos)) is not None:
        code, pos = data[found.end() - 1], found.end()
        if code == _EOI:
            break
        if code not in _NO_LENGTH:
            pos += int.from_bytes(data[pos : pos + 2], "big")  # a segment: skipped whole (an EXIF thumbnail too)
            scans += code == _SOS
    return scans
