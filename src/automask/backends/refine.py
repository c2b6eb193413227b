"""refine: sharpen a dense backend's score maps (CLIPSeg) with a mask head: SAM, SAM 2 or EdgeTAM
(`Settings.mask_head`).

CLIPSeg's masks come from a 352×352 score map: right place, soft edges. With `refine`, each region of a score
map at the threshold (a connected component) becomes a SAM prompt: its bounding box plus its peak point as a
foreground point. SAM's best mask (by predicted IoU) replaces the region; the union of the regions' masks is
the mask. SAM's image embedding is computed once per image (in `encode`, cached by the pipeline like any
features), so refining costs one SAM image encoding plus a light decoder call per region.

`RefinedBackend` is a composition: it wraps any backend that returns dense maps and a mask head (`sam.MaskHead`:
SAM, SAM 2 or EdgeTAM); it changes neither. Backends that already return instances (grounded-sam, grounded-sam2,
grounded-edgetam, sam3) are returned unchanged by `refined`.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from automask.backends.base import Backend, ScoreParams, Scores, score_with
from automask.errors import require, stop_if_asked
from automask.settings import Settings

if TYPE_CHECKING:  # torch is imported only when a mask head is loaded
    from automask.backends.sam import MaskHead

INSTANCE_BACKENDS = frozenset({"grounded-sam", "grounded-sam2", "grounded-edgetam", "sam3"})
"""Backends whose scores are already one mask per instance: refine leaves them as they are."""

MIN_AREA_FRACTION = 0.0005
"""Regions smaller than this share of the image (0.05%, ~20×20 px of a 1024×768 image) are not refined away
from noise: they are dropped."""
MAX_REGIONS = 16
"""At most this many regions (the largest) per prompt are handed to SAM."""


@dataclass(frozen=True)
class Region:
    """One connected region of a thresholded score map: box XYXY (pixels, exclusive max), the peak (x, y) and
    its score, and the area in pixels."""

    box: tuple[int, int, int, int]
    peak: tuple[int, int]
    score: float
    area: int


def regions(score_map: np.ndarray, threshold: float, min_area: int = 1, limit: int = MAX_REGIONS) -> list[Region]:
    """Connected regions (8-connectivity) of `score_map >= threshold` (H×W float32), largest first.

    Regions under `min_area` pixels are dropped; at most `limit` are returned.
    """
    selected = (score_map >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(selected, connectivity=8)
    order = sorted(range(1, n), key=lambda k: -int(stats[k, cv2.CC_STAT_AREA]))
    out: list[Region] = []
    for k in order:
        area = int(stats[k, cv2.CC_STAT_AREA])
        if area < min_area or len(out) >= limit:
            break
        x, y, w, h = (int(v) for v in stats[k, :4])
        window = np.where(labels[y : y + h, x : x + w] == k, score_map[y : y + h, x : x + w], -np.inf)
        py, px = np.unravel_index(int(np.argmax(window)), window.shape)
        peak = (x + int(px), y + int(py))
        out.append(Region((x, y, x + w, y + h), peak, float(score_map[peak[1], peak[0]]), area))
    return out


@dataclass(frozen=True)
class RefinedFeatures:
    """The wrapped backend's features of one image and the mask head's embedding of it."""

    inner: Any
    sam: Any


class RefinedBackend:
    """A dense backend (e.g. CLIPSeg) whose regions are re-cut by SAM. Thread-safe if the wrapped one is."""

    takes_params = True

    def __init__(self, inner: Backend, segmenter: MaskHead) -> None:
        self.inner = inner
        self.segmenter = segmenter
        self.name = f"{inner.name}+{segmenter.kind}"
        self.model_id = f"{inner.model_id}+{segmenter.model_id}"

    def encode(self, image: np.ndarray) -> RefinedFeatures:
        """The wrapped backend's features and SAM's image embedding for an H×W×3 uint8 RGB image."""
        return RefinedFeatures(self.inner.encode(image), self.segmenter.embed(image))

    def score(
        self,
        features: RefinedFeatures,
        prompts: list[str],
        *,
        min_score: float = 0.0,
        params: ScoreParams | None = None,
    ) -> Scores:
        """Instances: one per region of each prompt's map at `min_score` (the request's threshold).

        maps: N×H×W SAM mask probabilities; scores: each region's peak score (>= `min_score`); labels: its
        prompt; boxes None (the pipeline takes each instance's box from its mask). `params.should_stop` is asked
        before the regions are refined.
        """
        params = params or ScoreParams()
        dense = score_with(self.inner, features.inner, prompts, min_score, params)
        if dense.kind != "dense":
            return dense
        stop_if_asked(params.should_stop)
        h, w = dense.maps.shape[1:]
        min_area = max(1, round(MIN_AREA_FRACTION * h * w))
        found = [
            (label, r)
            for m, label in zip(dense.maps, dense.labels, strict=True)
            for r in regions(m, min_score, min_area)
        ]
        from automask.backends.sam import max_masks

        if len(found) > (limit := max_masks((h, w))):  # bound memory on huge images: keep the largest regions
            found = sorted(found, key=lambda f: -f[1].area)[:limit]
        boxes = np.array([r.box for _, r in found], np.float32).reshape(-1, 4)
        points = np.array([[r.peak] for _, r in found], np.float32).reshape(-1, 1, 2)
        masks = self.segmenter.segment(features.sam, boxes=boxes, points=points)
        return Scores(
            maps=masks.probs,
            labels=[label for label, _ in found],
            kind="instances",
            scores=np.array([r.score for _, r in found], np.float32),
            boxes=None,
            extra={"mask_iou": masks.iou, "regions": [r for _, r in found]},
        )


_REFINED: weakref.WeakValueDictionary[tuple[int, str, str], RefinedBackend] = weakref.WeakValueDictionary()
"""The refined backends, while something (a `MaskGenerator`) holds them: each holds its backend and mask head loaded."""
_LOCK = threading.Lock()


def refined(backend: Backend, settings: Settings) -> Backend:
    """`backend` refined by a mask head (from `find_mask_head_folder`); kept per (backend, folder, device) while
    something holds it.

    A backend that already returns instances (`INSTANCE_BACKENDS`) or is already refined comes back unchanged.
    Raises `ModelNotAvailableError` (saying what to pull) when no mask head is installed.
    """
    if backend.name in INSTANCE_BACKENDS or isinstance(backend, RefinedBackend):
        return backend
    require("torch", "torch")
    require("transformers", "torch")
    from automask.backends.sam import find_mask_head_folder, load_mask_head
    from automask.staging import reading_model

    folder = find_mask_head_folder(settings)
    key = (id(backend), str(folder.resolve()), settings.device)
    with reading_model(folder, settings.models_dir), _LOCK:  # `models rm` waits, or refuses: the lock, then _LOCK
        cached = _REFINED.get(key)
        if cached is None or cached.inner is not backend:
            cached = _REFINED[key] = RefinedBackend(backend, load_mask_head(folder, settings))
        return cached
