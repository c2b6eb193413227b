"""Pixels out of a decoded image without full-size temporaries: a PIL image copied a strip of rows at a time
(`rgb_array`), RGBA composited on white a strip at a time (`composite_on_white`)."""

from __future__ import annotations

import numpy as np
from PIL import Image

STRIP_PIXELS = 1 << 20
"""Pixels copied at a time out of a decoded PIL image (about 1 MP: ~4 MB of Pillow's buffer)."""


def rgb_array(img: Image.Image) -> np.ndarray:
    """A loaded RGB PIL image -> H×W×3 uint8, copied a strip of rows at a time.

    `np.array(img)` goes through `img.tobytes()`: a second full-size buffer (W·H·3 bytes) on top of the array
    and Pillow's own (W·H·4 bytes). Strips keep that extra to ~`STRIP_PIXELS`·3 bytes: 36 MP costs ~250 MB
    to decode instead of ~360 MB.
    """
    width, height = img.size
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = np.asarray(img.crop((0, top, width, bottom)))
    return out


def flatten(rgba: np.ndarray, keep_alpha: bool = False) -> np.ndarray:
    """H×W×4 uint8 RGBA -> composited on white (`composite_on_white`), or, if `keep_alpha` and some pixel is not
    opaque, the RGBA pixels themselves (a new contiguous array)."""
    if keep_alpha and rgba[..., 3].min() < 255:
        return np.array(rgba, dtype=np.uint8, order="C", copy=True)
    return composite_on_white(rgba)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """H×W×4 uint8 RGBA (straight alpha) -> H×W×3 uint8 RGB over a white background, rounded:
    round((rgb·a + 255·(255 - a)) / 255), `STRIP_PIXELS` at a time (the uint16 products of a whole 40 MP image took
    ~700 MB more), divided by 255 exactly with shifts (numpy's integer division took ~9 s for 40 MP)."""
    height, width = rgba.shape[:2]
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        strip = rgba[top : top + rows]
        alpha = strip[..., 3:4].astype(np.uint16)
        total = strip[..., :3] * alpha  # with the white below, at most 255·a + 255·(255 - a) = 65025: uint16
        total += (255 - alpha) * 255
        total += 128  # round(x / 255) == (x + 128 + ((x + 128) >> 8)) >> 8 for 0 <= x <= 65535
        total += total >> 8
        out[top : top + rows] = total >> 8
    return out
