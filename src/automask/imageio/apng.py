"""The frame of an APNG that a browser shows first (`to_first_shown_frame`)."""

from __future__ import annotations

from PIL import Image


def to_first_shown_frame(img: Image.Image) -> None:
    """Move `img` to the frame a browser shows first: for an APNG whose default image is not part of the animation
    (a fallback for viewers without APNG, which browsers never show), the animation's first frame, drawn on a
    transparent canvas as the APNG spec says (Pillow draws it over the fallback); where a mode has no alpha
    (RGB, palette: its colour 0), value 0 shows where that frame does not cover the canvas. Any other image is left
    as it is. Raises Pillow's error when that frame cannot be read (then the default image is what a viewer shows:
    the caller opens the file again)."""
    if img.format != "PNG" or not img.info.get("default_image") or getattr(img, "n_frames", 1) < 2:
        return
    img.load()
    img.im = img.im.copy()  # a copy keeps a palette image's palette (a new core has none: all black)
    img.im.paste(0, (0, 0, *img.size))  # cleared: transparent black, where the mode has alpha
    img.seek(1)
    img.load()
