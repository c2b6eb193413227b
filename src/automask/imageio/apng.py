"""The frame of an APNG that a browser shows first (`first_shown_frame`)."""

from __future__ import annotations

import numpy as np
from PIL import Image, PngImagePlugin

from automask.imageio.samples import scale_16bit

_NO_ALPHA = ("1", "L", "P", "RGB", "I;16")
"""The modes Pillow reads a PNG without an alpha channel in: their blank canvas is value 0, not transparent, so the
frame is given as RGBA (RGBA and LA: the canvas is transparent already). 16-bit gray (I;16) is scaled to 8 bits
first, as decoding does anyway: Pillow's conversion to RGBA would clip it."""


def first_shown_frame(img: Image.Image) -> Image.Image:
    """The frame a browser shows first of `img`: for an APNG whose default image is not part of the animation (a
    fallback for viewers without APNG, which browsers never show), the animation's first frame, drawn on a
    transparent black canvas as the APNG spec says (Pillow draws it over the fallback): `img` moved to that frame,
    or for a mode without an alpha channel (RGB, gray, 16-bit gray, palette) a new RGBA image of it, transparent where
    that frame does not cover the canvas (and where a transparent colour key, tRNS, says so). Any other image: `img`.
    Raises Pillow's error when that frame cannot be read (then the default image is what a viewer shows: the caller
    opens the file again)."""
    if not isinstance(img, PngImagePlugin.PngImageFile) or not img.info.get("default_image") or img.n_frames < 2:
        return img
    img.load()
    img.im = img.im.copy()  # a copy keeps a palette image's palette (a new core has none: all black)
    img.im.paste(0, (0, 0, *img.size))  # cleared: transparent black, where the mode has alpha
    img.seek(1)
    img.blend_op = PngImagePlugin.Blend.OP_SOURCE  # over a transparent canvas, "over" is "source": so a frame's
    # colour-keyed (tRNS) pixels stay transparent, which Pillow's "over" of a mode without alpha makes value 0
    img.load()
    if img.mode not in _NO_ALPHA:
        return img
    x0, y0, x1, y1 = (int(v) for v in img.dispose_extent)
    shown = Image.new("RGBA", img.size, (0, 0, 0, 0))
    shown.paste(_rgba(img).crop((x0, y0, x1, y1)), (x0, y0))
    shown.info = {k: v for k, v in img.info.items() if k != "transparency"}  # its colour profile, EXIF...
    return shown


def _rgba(img: Image.Image) -> Image.Image:
    """`img` (a mode of `_NO_ALPHA`) as RGBA, its colour key (tRNS) transparent; 16-bit gray scaled to 8 bits."""
    if img.mode != "I;16":
        return img.convert("RGBA")
    values = np.asarray(img)
    gray, key = scale_16bit(values), img.info.get("transparency")
    alpha = np.full(values.shape, 255, np.uint8) if key is None else np.where(values == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([gray, gray, gray, alpha]), "RGBA")
