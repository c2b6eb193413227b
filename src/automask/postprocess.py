"""Post-processing: pure array functions, in the contract's order threshold -> grow -> invert -> render.

Masks are H×W bool (selection) or H×W uint8 (output, 255 = selected). Images are H×W×3 uint8 RGB.
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


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow an H×W bool mask: a pixel is selected iff its Euclidean distance to a selected pixel <= radius."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    if mask.all():
        return mask.copy()
    # distance of every unselected pixel to the nearest selected one (exact Euclidean, cv2's DIST_MASK_PRECISE).
    inv = np.where(mask, 0, 255).astype(np.uint8)
    dist = cv2.distanceTransform(inv, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist <= radius


def invert(mask: np.ndarray) -> np.ndarray:
    """Invert an H×W bool mask."""
    return ~mask


def to_uint8(mask: np.ndarray) -> np.ndarray:
    """H×W bool -> H×W uint8, 255 = selected."""
    return np.where(mask, 255, 0).astype(np.uint8)


def render_alpha(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGBA cut-out: H×W×4 uint8, the original pixels with alpha = the uint8 mask."""
    return np.dstack([image, mask])


def render_preview(
    image: np.ndarray, mask: np.ndarray, tint: tuple[int, int, int] = PREVIEW_TINT, opacity: float = PREVIEW_OPACITY
) -> np.ndarray:
    """Preview: H×W×3 uint8, the image with selected pixels blended towards `tint` by `opacity`."""
    out = image.astype(np.float32)
    sel = mask > 0
    out[sel] = out[sel] * (1.0 - opacity) + np.asarray(tint, np.float32) * opacity
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render(image: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    """Render the output array for `kind` in {'mask', 'alpha', 'preview'} from an H×W uint8 mask."""
    if kind == "mask":
        return mask
    if kind == "alpha":
        return render_alpha(image, mask)
    if kind == "preview":
        return render_preview(image, mask)
    raise ValueError(f"unknown output kind {kind!r}")
