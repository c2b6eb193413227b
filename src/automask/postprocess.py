"""Post-processing: pure array functions, in the contract's order
threshold -> negative -> fill_holes -> min_area -> grow -> invert -> feather -> render.

Masks are H×W bool (selection) or H×W uint8 (output, 255 = selected; between 0 and 255 only after `feather`).
Images are H×W×3 uint8 RGB. Connectivity: a region is 8-connected (pixels touching at a corner belong to one
region), so a hole is a 4-connected part of the unselected pixels that does not touch the image border
(scipy.ndimage's `binary_fill_holes` and `label(..., structure=np.ones((3, 3)))` follow the same rules).
"""

from __future__ import annotations

import cv2
import numpy as np

from automask.backends.base import Scores

PREVIEW_TINT = (255, 0, 80)
PREVIEW_OPACITY = 0.5


def select(scores: Scores, threshold: float) -> np.ndarray:
    """Union of the selected pixels of every map: H×W bool. See `Scores.kind` for the rule."""
    _, h, w = scores.maps.shape
    out = np.zeros((h, w), dtype=bool)
    if scores.kind == "dense":
        for m in scores.maps:
            out |= m >= threshold
    else:
        assert scores.scores is not None, "instance scores need confidences"
        for m, s in zip(scores.maps, scores.scores, strict=True):
            if s >= threshold:
                out |= m >= 0.5
    return out


GROW_BAND_PIXELS = 4_000_000
"""`grow` works on bands of about this many pixels (plus `radius` rows above and below): its float32 distances
take ~16 MB per band instead of 4 bytes per pixel of the whole image (145 MB for 36 megapixels)."""


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow an H×W bool mask: a pixel is selected iff its Euclidean distance to a selected pixel <= radius.

    Exact Euclidean distances (cv2's DIST_MASK_PRECISE), computed band by band: a selected pixel within `radius`
    of a band's row lies within `radius` rows of it, so each band, extended by `radius` rows on each side, gives
    the same answer as the whole image."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    if mask.all():
        return mask.copy()
    h, w = mask.shape
    rows = max(1, GROW_BAND_PIXELS // max(w, 1))
    out = np.empty((h, w), dtype=bool)
    for top in range(0, h, rows):
        lo, hi = max(0, top - radius), min(h, top + rows + radius)
        band = mask[lo:hi]
        inv = np.where(band, np.uint8(0), np.uint8(255))  # 0 = selected: distanceTransform measures to the 0s
        dist = cv2.distanceTransform(inv, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        out[top : min(h, top + rows)] = dist[top - lo : top - lo + min(rows, h - top)] <= radius
    return out


def remove(mask: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """The H×W bool `mask` without the pixels of the H×W bool `negative` selection (negative_prompt)."""
    return mask & ~negative


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Select the holes of an H×W bool mask: the 4-connected unselected regions that do not touch the image border."""
    if not mask.any():
        return mask.copy()
    n, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    outside = np.zeros(n, dtype=bool)  # label 0: the selected pixels, which stay selected whatever outside[0] says
    outside[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    return mask | ~outside[labels]


def drop_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """An H×W bool mask without its 8-connected selected regions of fewer than `min_area` pixels."""
    if min_area <= 1 or not mask.any():
        return mask.copy()
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # label 0: the unselected pixels
    return keep[labels]


def invert(mask: np.ndarray) -> np.ndarray:
    """Invert an H×W bool mask."""
    return ~mask


def to_uint8(mask: np.ndarray) -> np.ndarray:
    """H×W bool -> H×W uint8, 255 = selected."""
    return np.where(mask, np.uint8(255), np.uint8(0))


def feather_kernel(radius: int) -> np.ndarray:
    """(2r+1)×(2r+1) float32 weights summing to 1: a Gaussian with sigma = r/2 on the disk x² + y² <= r², 0 outside."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float64)
    sigma = radius / 2.0
    weights = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    weights[x * x + y * y > radius * radius] = 0.0
    return (weights / weights.sum()).astype(np.float32)


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """Soften the edge of an H×W uint8 mask: its convolution with `feather_kernel(radius)`, rounded to uint8.

    The image border is extended by repeating its pixels. A pixel farther than `radius` (Euclidean, between pixel
    centres) from every pixel of the other value keeps its value exactly (255 inside, 0 outside); only pixels
    within `radius` of the edge get values in between. radius 0 returns the mask unchanged.
    """
    if radius <= 0 or mask.min() == mask.max():
        return mask.copy()
    soft = cv2.filter2D(mask.astype(np.float32) / 255.0, -1, feather_kernel(radius), borderType=cv2.BORDER_REPLICATE)
    return np.clip(np.rint(soft * 255.0), 0, 255).astype(np.uint8)


def render_alpha(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGBA cut-out: H×W×4 uint8, the original pixels with alpha = the uint8 mask.

    `image` H×W×3 RGB, or H×W×4 RGBA (straight alpha) whose own transparency is kept: alpha = round(mask · a / 255),
    so a pixel transparent in the image stays transparent and a selected opaque one gets the mask's value.
    """
    if image.shape[2] == 3:
        return np.dstack([image, mask])
    alpha = (mask.astype(np.uint16) * image[..., 3] + 127) // 255
    return np.dstack([image[..., :3], alpha.astype(np.uint8)])


def render_preview(
    image: np.ndarray, mask: np.ndarray, tint: tuple[int, int, int] = PREVIEW_TINT, opacity: float = PREVIEW_OPACITY
) -> np.ndarray:
    """Preview: H×W×3 uint8, the image blended towards `tint` by `opacity` × mask / 255 (a soft mask's edge fades).

    Per pixel and channel, in float32: rint(v · (1 − w) + tint · w) with w = mask / 255 · opacity; it depends only on
    (mask, v), so it is read from a 256×256 table per channel (as fast for a fully selected 17 MP photo as for an
    empty mask; the formula on every pixel took seconds there).
    """
    if not mask.any():
        return image.copy()
    weight = (np.arange(256, dtype=np.float32) / 255.0 * opacity)[:, None]  # row: the mask's value
    value = np.arange(256, dtype=np.float32)[None, :]  # column: the image's value
    index = mask.astype(np.uint16) << 8
    out = np.empty((*image.shape[:2], 3), np.uint8)
    for c in range(3):
        table = np.clip(np.rint(value * (1.0 - weight) + np.float32(tint[c]) * weight), 0, 255).astype(np.uint8)
        np.take(table.ravel(), index | image[..., c], out=out[..., c])
    return out


def render(image: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    """Render the output array for `kind` in {'mask', 'alpha', 'preview'} from an H×W uint8 mask; `image` H×W×3
    RGB (H×W×4 RGBA only for 'alpha', see `render_alpha`). Always a new array, never `mask` itself."""
    if kind == "mask":
        return mask.copy()
    if kind == "alpha":
        return render_alpha(image, mask)
    if kind == "preview":
        return render_preview(image, mask)
    raise ValueError(f"unknown output kind {kind!r}")
