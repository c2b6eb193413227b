"""Which EXIF orientation decoding applied, and where it was read: for a client that shows the image itself and
must know how the server turned it (the web page, showing another site's image it cannot read).

`decode.pil_to_rgb` notes each orientation it applies (`note`); `noting()` collects the notes of the decodes run
in its block on this thread (a `ContextVar`: concurrent requests on other threads keep theirs apart). Nothing is
noted outside such a block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from PIL import ExifTags, Image


@dataclass(frozen=True)
class Orientation:
    """An orientation applied to an image: `value` 1–8 (EXIF's numbering; 1: none), `tag` where it was read ('exif',
    or 'xmp': tiff:Orientation, which Pillow reads when the EXIF block has none), and `format` the image's format
    as Pillow names it ('JPEG', 'WEBP'...; '' for a PIL image or array given as such)."""

    value: int = 1
    tag: str = "exif"
    format: str = ""


_NOTES: ContextVar[list[Orientation] | None] = ContextVar("automask_orientation_notes", default=None)


@contextmanager
def noting() -> Iterator[list[Orientation]]:
    """A list that gets the `Orientation` of each image decoded in this block (on this thread), in order."""
    notes: list[Orientation] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def note(img: Image.Image, value: int) -> None:
    """Note that `img` was turned by `value` (when some `noting()` block is collecting)."""
    notes = _NOTES.get()
    if notes is not None:
        notes.append(Orientation(value, _tag(img) if value != 1 else "exif", img.format or ""))


def _tag(img: Image.Image) -> str:
    """'exif' when `img`'s EXIF block holds its orientation, else 'xmp' (Pillow's fallback, `Image.getexif`)."""
    raw = img.info.get("exif")
    if raw is None:
        return "exif" if img.format == "TIFF" or "Raw profile type exif" in img.info else "xmp"
    exif = Image.Exif()
    try:
        exif.load(raw)
    except (OSError, ValueError, SyntaxError):
        return "xmp"  # a damaged EXIF block: Pillow read the orientation from XMP
    return "exif" if ExifTags.Base.Orientation in exif else "xmp"
