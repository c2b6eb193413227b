"""GroundingDINO's outputs -> boxes: pure numpy helpers of the grounded-sam backend (no torch, no model).

Prompts are merged into one detector text ("sofa. lamp."); each text token is owned by the prompt whose span holds
it; a box is credited to the prompt whose words score best on it, kept by score, text threshold and per-prompt
non-maximum suppression. Boxes: the detector's (cx, cy, w, h) relative to the image in, XYXY pixels out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from automask.backends.base import sigmoid

MAX_DETECTIONS = 100
"""At most this many instances (the best scoring) per request; fewer on very large images (`sam.max_masks`)."""
NMS_IOU = 0.8
"""Boxes of the same prompt overlapping more than this (IoU) with a better one are dropped."""


def merge_prompts(prompts: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO's text for `prompts` and each prompt's character span in it.

    ["Sofa", "lamp"] -> ("sofa. lamp.", [(0, 4), (6, 10)]): lower case, ". " between, "." at the end, as
    transformers' GroundingDinoProcessor merges a list of labels.
    """
    text, spans = "", []
    for i, p in enumerate(prompts):
        if i:
            text += ". "
        lowered = p.strip().lower()  # lower() may change the length ('İ' -> 'i̇'): the span is the lowered text's
        spans.append((len(text), len(text) + len(lowered)))
        text += lowered
    return text + ".", spans


def token_owners(
    offsets: list[tuple[int, int]], ids: list[int], spans: list[tuple[int, int]], special: set[int]
) -> np.ndarray:
    """T int64: for each token, the index of the prompt whose span holds it, or -1 (special tokens, '.')."""
    owners = np.full(len(ids), -1, np.int64)
    for t, ((start, end), tok) in enumerate(zip(offsets, ids, strict=True)):
        if end <= start or tok in special:
            continue
        for i, (s, e) in enumerate(spans):
            if s <= start and end <= e:
                owners[t] = i
                break
    return owners


@dataclass(frozen=True)
class KeptBoxes:
    """N boxes kept by `postprocess`, best first. index: N int64 indices into the detector's queries;
    boxes: N×4 float32 XYXY in original pixels; scores: N float32; labels: the prompt of each."""

    index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]


def postprocess(
    logits: np.ndarray,
    pred_boxes: np.ndarray,
    owners: np.ndarray,
    prompts: list[str],
    image_size: tuple[int, int],
    min_score: float,
    text_threshold: float,
    *,
    nms_iou: float = NMS_IOU,
    max_detections: int = MAX_DETECTIONS,
) -> KeptBoxes:
    """Detector outputs -> kept boxes, best first.

    logits: Q×T token logits; pred_boxes: Q×4 (cx, cy, w, h) relative to the image; owners: T prompt index per
    token (-1: none); `prompts` non-empty. A box's score is its best token probability (as in transformers'
    `post_process_grounded_object_detection`); it is kept if the score is >= `min_score`, its best prompt's
    best word scores above `text_threshold`, and no better box of the same prompt overlaps it by more than
    `nms_iou`; then the `max_detections` best. Boxes become XYXY original pixels,
    clipped to the image.
    """
    h, w = image_size
    probs = sigmoid(logits)
    scores = probs.max(axis=1, initial=0.0)
    per_prompt = np.zeros((len(probs), len(prompts)), np.float32)
    for i in range(len(prompts)):
        per_prompt[:, i] = probs[:, owners == i].max(axis=1, initial=0.0)
    best = per_prompt.argmax(axis=1)
    credited = per_prompt.max(axis=1) > text_threshold
    boxes = corners(pred_boxes) * np.array([w, h, w, h], np.float32)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    keep = np.flatnonzero((scores >= min_score) & credited)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    keep = keep[nms(boxes[keep], best[keep], nms_iou)][:max_detections]
    return KeptBoxes(keep, boxes[keep], scores[keep].astype(np.float32), [prompts[i] for i in best[keep]])


def corners(cxcywh: np.ndarray) -> np.ndarray:
    """N×4 (cx, cy, w, h) -> N×4 (x0, y0, x1, y1), the same units."""
    cx, cy, bw, bh = cxcywh.T
    return np.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], axis=1).astype(np.float32)


def nms(boxes: np.ndarray, groups: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression within each group, for N×4 XYXY `boxes` sorted best first.

    Returns the indices kept, in their original (best first) order.
    """
    keep: list[int] = []
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    for i in range(len(boxes)):
        kept = np.array([k for k in keep if groups[k] == groups[i]], np.int64)
        if kept.size:
            x0 = np.maximum(boxes[kept, 0], boxes[i, 0])
            y0 = np.maximum(boxes[kept, 1], boxes[i, 1])
            x1 = np.minimum(boxes[kept, 2], boxes[i, 2])
            y1 = np.minimum(boxes[kept, 3], boxes[i, 3])
            inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
            union = area[kept] + area[i] - inter
            if (inter > iou * np.maximum(union, 1e-9)).any():
                continue
        keep.append(i)
    return np.array(keep, np.int64)
