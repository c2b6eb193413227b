"""From scores to a `MaskResult`: the selections of a request's backends (`Part`) are split into the prompt's and
the negative targets', thresholded and unioned, then post-processed (negative -> fill_holes -> min_area -> grow ->
invert -> feather) and rendered (`finish`). Pure array work on what the backends scored; no model runs here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from automask import postprocess as pp
from automask.backends.base import Backend, Scores
from automask.errors import EmptyMaskError, stop_if_asked
from automask.options import MaskOptions
from automask.result import Detection, MaskResult
from automask.routing import quote_targets


@dataclass(frozen=True)
class Part:
    """The scores of some targets and the backend that made them."""

    scores: Scores
    backend: Backend

    def select(self, threshold: float) -> np.ndarray:
        """H×W bool: the union of this part's selected pixels."""
        return pp.select(self.scores, threshold)

    def only(self, labels: set[str]) -> Part | None:
        """This part restricted to the maps labelled with one of `labels` (`extra` kept whole), or None if none."""
        keep = [i for i, label in enumerate(self.scores.labels) if label in labels]
        if len(keep) == len(self.scores.labels):
            return self
        if not keep:
            return None
        s = self.scores
        index = np.asarray(keep, np.int64)
        scores = replace(
            s,
            maps=s.maps[index],
            labels=[s.labels[i] for i in keep],
            scores=None if s.scores is None else s.scores[index],
            boxes=None if s.boxes is None else s.boxes[index],
        )
        return replace(self, scores=scores)


def split(parts: list[Part], prompts: list[str], negatives: list[str]) -> tuple[list[Part], list[Part]]:
    """The parts of the prompt's targets and those of the negative targets (a target in both is in both)."""
    positive = [p for part in parts if (p := part.only(set(prompts))) is not None]
    negative = [p for part in parts if (p := part.only(set(negatives))) is not None] if negatives else []
    return positive, negative


def finish(
    rgb: np.ndarray,
    parts: list[Part],
    prompts: list[str],
    opts: MaskOptions,
    backend: Backend,
    timings: dict[str, float],
    t0: float,
    rgba: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MaskResult:
    """Threshold, remove the negative targets' pixels, fill holes, drop small regions, grow, invert, feather and
    render the scores of `parts` (the prompt's selections unioned) for image `rgb` (H×W×3 uint8) into a
    `MaskResult`; `backend` names the result when no part does. `rgba` (H×W×4 uint8, the image with its own
    transparency) is what a cut-out is made of, when given. `should_stop` is asked before rendering."""
    t = time.perf_counter()
    negatives = opts.negative_targets
    positive, negative = split(parts, prompts, negatives)
    selected, instance_masks, detections = _union(positive, rgb.shape[:2], opts.threshold)
    if negative:
        selected = pp.remove(selected, _union(negative, rgb.shape[:2], opts.threshold)[0])
    if opts.fill_holes:
        selected = pp.fill_holes(selected)
    if opts.min_area:
        selected = pp.drop_small(selected, opts.min_area)
    empty = not selected.any()
    if empty and opts.stop_on_empty_mask:
        raise EmptyMaskError(_empty_message(prompts, opts))
    selected = pp.grow(selected, opts.grow_mask)
    mask = pp.feather(pp.to_uint8(pp.invert(selected) if opts.invert_mask else selected), opts.feather)
    timings["postprocess"] = time.perf_counter() - t
    stop_if_asked(should_stop)
    t = time.perf_counter()
    output = pp.render(rgb if rgba is None else rgba, mask, opts.output_kind)
    timings["render"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    used = list(dict.fromkeys((p.backend.name, p.backend.model_id) for p in parts))
    used = used or [(backend.name, backend.model_id)]
    return MaskResult(
        mask=mask,
        output=output,
        kind=opts.output_kind,
        prompts=prompts,
        backend="+".join(name for name, _ in used),
        model="+".join(model for _, model in used),
        detections=detections,
        instance_masks=instance_masks,
        timings=timings,
        empty=empty,
        seed=opts.seed,
        negative_prompts=negatives,
        fill_holes=opts.fill_holes,
        min_area=opts.min_area,
        feather=opts.feather,
    )


def _empty_message(prompts: list[str], opts: MaskOptions) -> str:
    """The `EmptyMaskError` message: what was looked for, and which options may have removed it."""
    removed = [f"negative_prompt {quote_targets(opts.negative_targets)}"] if opts.negative_targets else []
    removed += [f"min_area {opts.min_area}"] if opts.min_area > 1 else []
    after = f" (after {' and '.join(removed)} removed what was found)" if removed else ""
    return (
        f"Nothing matching {quote_targets(prompts)} was found at threshold {opts.threshold}{after}. "
        "Try a lower threshold or another prompt."
    )


def _union(
    parts: list[Part], size: tuple[int, ...], threshold: float
) -> tuple[np.ndarray, list[np.ndarray], list[Detection]]:
    """The H×W bool union of the parts' selections at `threshold`, and their instance masks and detections."""
    selected = np.zeros(size, dtype=bool)
    instance_masks: list[np.ndarray] = []
    detections: list[Detection] = []
    for part in parts:
        selected |= part.select(threshold)
        masks, dets = _instances(part.scores, threshold)
        instance_masks += masks
        detections += dets
    return selected, instance_masks, detections


def _instances(scores: Scores, threshold: float) -> tuple[list[np.ndarray], list[Detection]]:
    """Per-instance uint8 masks and detections that pass the threshold (before grow/invert).

    Only finite numbers come out, whatever a model scored: a NaN score (or pixel) passes no threshold, as in
    `pp.select`; a score of +inf reads as 1; a box with a NaN or infinite corner is replaced by the tight
    box of the instance's pixels."""
    masks: list[np.ndarray] = []
    dets: list[Detection] = []
    for i, label in enumerate(scores.labels):
        m = scores.maps[i]
        if scores.kind == "dense":
            sel = m >= threshold
            if not sel.any():
                continue
            score = float(np.nanmax(m))  # not NaN: some pixel passed the threshold
        else:
            assert scores.scores is not None
            score = float(scores.scores[i])
            if not score >= threshold:  # NaN too
                continue
            sel = m >= 0.5
        box = tuple(float(v) for v in scores.boxes[i]) if scores.boxes is not None else None
        if box is None or not all(math.isfinite(v) for v in box):
            box = _box_of(sel)
        score = score if math.isfinite(score) else 1.0
        masks.append(pp.to_uint8(sel))
        dets.append(Detection(label=label, score=score, box=box, area=int(np.count_nonzero(sel))))  # type: ignore[arg-type]
    return masks, dets


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight XYXY box (pixels, exclusive max) of an H×W bool mask, or None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))  # no index array per pixel
    if rows.size == 0:
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
