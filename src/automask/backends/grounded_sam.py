"""Grounded-SAM backend (transformers + torch): GroundingDINO finds boxes for the prompts, SAM cuts them out.

The mask head is SAM (`grounded-sam`), SAM 2.1 (`grounded-sam2`, the pair Grounded-SAM-2 runs) or EdgeTAM
(`grounded-edgetam`: the same detector, EdgeTAM's much lighter image encoder): whichever checkpoint the model folder
holds beside GroundingDINO (`find_parts`).

One GroundingDINO pass scores all prompts at once (the text "sofa. lamp."); each box kept becomes a SAM box
prompt, and SAM's best mask of three (by predicted IoU) is the instance's mask. Returns
`Scores(kind="instances")`: per instance a mask probability map, the box score, the box and the prompt it
matches.

What is computed once per image (in `encode`, and kept by the pipeline's `FeatureCache`, so a second request
on the same image skips it):
- SAM's image embedding (the ViT image encoder, most of SAM's cost), reused for every box of every prompt;
- GroundingDINO's image backbone (Swin + position embeddings), replayed into the detector by
  `ReplayableBackbone`. The rest of GroundingDINO (its encoder fuses image and text features from the first
  layer on, then the decoder) depends on the prompt text and runs in `score`.

Settings (`Settings.preset`): by default ('reference') the checkpoints' own: float32 throughout, the detector at its
processor's shortest edge (800), so the published models' numbers hold. `AUTOMASK_PRESET=fast` trades that for
speed: the detector at shortest edge 512 (GroundingDINO was trained at 480-800) and, on CPUs with native bfloat16
(AVX512-BF16, AMX), SAM's and SAM 2's image encoders in bfloat16 (EdgeTAM stays float32) and the detector's encoder
under bfloat16 autocast (as Grounded-SAM-2 runs both models on GPUs). `AUTOMASK_PRECISION` and
`AUTOMASK_DETECTOR_SIZE` override either.

The detector's outputs become boxes in `grounding` (pure numpy: prompt merging, scoring, non-maximum suppression).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automask.backends.base import ScoreParams, Scores, sigmoid
from automask.backends.grounding import MAX_DETECTIONS, KeptBoxes, merge_prompts, postprocess, token_owners
from automask.backends.interrupt import stop_at_layers
from automask.backends.sam import (
    MaskHead,
    Precision,
    choose_dtype,
    is_mask_head_folder,
    load_mask_head,
    max_masks,
    preset_precision,
)
from automask.backends.torch_loading import checkpoint_errors, load_tokenizer, prepare_torch
from automask.errors import InvalidOptionError, ModelNotAvailableError, stop_if_asked
from automask.models import model_type, name_of
from automask.settings import Settings

NAME = "grounded-sam"
EDGETAM_NAME = "grounded-edgetam"
SAM2_NAME = "grounded-sam2"
NAMES = {"sam": NAME, "sam2": SAM2_NAME, "edgetam": EDGETAM_NAME}
"""The backend's name for each kind of mask head (`MaskHead.kind`)."""
DETECTOR_MODEL_TYPES = frozenset({"grounding-dino"})
FAST_DETECTOR_EDGE = 512
"""Shortest image edge the detector sees under the 'fast' preset (the checkpoint's processor says 800); longest edge
scaled alike."""


@dataclass(frozen=True)
class Detections:
    """Detector output for one image, best first.

    boxes: N×4 float32 XYXY in original pixels, clipped to the image; scores: N float32 box scores in [0, 1];
    labels: the prompt each box matches best; phrases: GroundingDINO's own phrase per box (the words whose
    score is above the text threshold, as transformers' `post_process_grounded_object_detection` decodes them).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    phrases: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GroundedFeatures:
    """One encoded image. detector_inputs: GroundingDINO pixel_values 1×3×h×w and pixel_mask 1×h×w;
    backbone: the detector backbone's output for them; sam: the mask head's embedding; image_size: (H, W)."""

    image_size: tuple[int, int]
    detector_inputs: dict[str, torch.Tensor]
    backbone: tuple[list[Any], list[torch.Tensor]]
    sam: Any


class ReplayableBackbone(nn.Module):
    """GroundingDINO's image backbone that can replay features computed earlier instead of recomputing them.

    Installed in place of `GroundingDinoModel.backbone`; inside `replaying(saved)` (per thread) its forward
    returns `saved`, otherwise it runs the wrapped backbone.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.position_embedding = inner.position_embedding  # the model calls it for its extra feature levels
        self._local = threading.local()

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[list[Any], list[torch.Tensor]]:
        saved = getattr(self._local, "saved", None)
        if saved is None:
            return self.inner(pixel_values, pixel_mask)
        features, positions = saved
        return list(features), list(positions)  # copies: the model appends to the position list

    @contextlib.contextmanager
    def replaying(self, saved: tuple[list[Any], list[torch.Tensor]]) -> Iterator[None]:
        self._local.saved = saved
        try:
            yield
        finally:
            self._local.saved = None


class AutocastEncoder(nn.Module):
    """GroundingDINO's encoder run under CPU bfloat16 autocast (matrix products in bf16, the rest float32), its
    outputs cast back to float32. The encoder is the detector's text-dependent bulk (about 80% of `score`)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=self.dtype):
            out = self.inner(**kwargs)
        out.last_hidden_state_vision = out.last_hidden_state_vision.float()
        out.last_hidden_state_text = out.last_hidden_state_text.float()
        return out


class GroundedSamBackend:
    """A loaded GroundingDINO + mask head (SAM, SAM 2 or EdgeTAM) pair. Thread-safe for concurrent inference; no
    per-request state.

    detector_dtype: bfloat16 runs the detector's encoder under CPU autocast (`AutocastEncoder`).
    detector_edge: the shortest image edge the detector sees, at most (`_detector_size`); None: the processor's.
    """

    takes_params = True
    takes_text_threshold = True

    def __init__(
        self,
        detector: Any,
        processor: Any,
        segmenter: MaskHead,
        model_id: str,
        device: str,
        detector_dtype: torch.dtype = torch.float32,
        detector_edge: int | None = None,
    ) -> None:
        self.detector = detector
        self.processor = processor
        self.segmenter = segmenter
        self.name = NAMES[segmenter.kind]
        self.model_id = model_id
        self.device = device
        self.backbone = ReplayableBackbone(detector.model.backbone)
        detector.model.backbone = self.backbone
        if detector_dtype != torch.float32 and not isinstance(detector.model.encoder, AutocastEncoder):
            detector.model.encoder = AutocastEncoder(detector.model.encoder, detector_dtype)
        self.max_text_len = int(detector.config.max_text_len)
        self.special_tokens = {int(t) for t in detector.model.special_tokens.tolist()}
        self.detector_size = _detector_size(processor.image_processor.size, detector_edge)

    def encode(self, image: np.ndarray) -> GroundedFeatures:
        """Detector preprocessing and backbone, and SAM's image embedding, for an H×W×3 uint8 RGB image."""
        inputs = self.processor.image_processor(
            images=image,
            size=thin_size(self.detector_size, image.shape[:2]),
            return_tensors="pt",
            input_data_format="channels_last",
        )
        det = pad_narrow({k: inputs[k].to(self.device) for k in ("pixel_values", "pixel_mask")})
        with torch.inference_mode():
            backbone = self.backbone.inner(det["pixel_values"], det["pixel_mask"])
        sam = self.segmenter.embed(image)
        return GroundedFeatures((int(image.shape[0]), int(image.shape[1])), det, backbone, sam)

    def score(
        self,
        features: GroundedFeatures,
        prompts: list[str],
        *,
        min_score: float = 0.0,
        params: ScoreParams | None = None,
    ) -> Scores:
        """Instances for `prompts`: SAM mask probabilities N×H×W float32, box scores, XYXY boxes, prompt labels.

        Boxes scoring below `min_score` are dropped before SAM runs (the pipeline applies the threshold too).
        `params.should_stop` is asked between the detector and the mask head.
        """
        params = params or ScoreParams()
        dets = self.detect(features, prompts, min_score, params.text_threshold)
        stop_if_asked(params.should_stop)
        masks = self.segmenter.segment(features.sam, boxes=dets.boxes)
        return Scores(
            maps=masks.probs,
            labels=dets.labels,
            kind="instances",
            scores=dets.scores,
            boxes=dets.boxes,
            extra={"phrases": dets.phrases, "mask_iou": masks.iou},
        )

    def detect(
        self, features: GroundedFeatures, prompts: list[str], min_score: float, text_threshold: float
    ) -> Detections:
        """Run GroundingDINO (image backbone replayed from `features`) on all prompts in one pass."""
        if not prompts:
            return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], [])
        text, spans = merge_prompts(prompts)
        enc = self.processor.tokenizer(text, return_offsets_mapping=True, return_token_type_ids=True)
        ids = list(enc["input_ids"])
        if len(ids) > self.max_text_len:
            raise InvalidOptionError(
                "prompt", f"too long for {NAME}: {len(ids)} tokens, at most {self.max_text_len}. Use fewer targets."
            )
        owners = token_owners(enc["offset_mapping"], ids, spans, self.special_tokens)
        text_inputs = {k: torch.tensor([enc[k]], device=self.device) for k in ("input_ids", "token_type_ids")}
        text_inputs["attention_mask"] = torch.tensor([enc["attention_mask"]], device=self.device)
        with torch.inference_mode(), self.backbone.replaying(features.backbone):
            out = self.detector(**features.detector_inputs, **text_inputs)
        logits = out.logits[0, :, : len(ids)].float().cpu().numpy()
        boxes = out.pred_boxes[0].float().cpu().numpy()
        limit = min(MAX_DETECTIONS, max_masks(features.image_size))
        dets = postprocess(
            logits, boxes, owners, prompts, features.image_size, min_score, text_threshold, max_detections=limit
        )
        phrases = self.phrases(logits, ids, dets, text_threshold)
        return Detections(dets.boxes, dets.scores, dets.labels, phrases)

    def phrases(self, logits: np.ndarray, ids: list[int], dets: KeptBoxes, text_threshold: float) -> list[str]:
        """GroundingDINO's phrase per kept box: its tokens scoring above `text_threshold`, decoded.

        logits: Q×T float32 token logits of the Q queries; ids: the T token ids of the merged prompt text.
        """
        from transformers.models.grounding_dino.processing_grounding_dino import get_phrases_from_posmap

        if not len(dets.index):
            return []
        probs = torch.from_numpy(sigmoid(logits[dets.index]))
        posmap = torch.zeros((len(dets.index), self.max_text_len), dtype=torch.bool)
        posmap[:, : len(ids)] = probs > text_threshold
        return list(self.processor.batch_decode(get_phrases_from_posmap(posmap, ids)))


MAX_DETECTOR_ASPECT = 4
"""The detector's input is padded (pixel_mask 0, as a batch pads its smaller images) to at most this ratio of long to
short edge: a panorama otherwise leaves its encoder fewer positions than queries (900), whose top-k then fails."""


def pad_narrow(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GroundingDINO `pixel_values` 1×3×h×w and `pixel_mask` 1×h×w, zero-padded at the bottom or right to an aspect
    ratio of at most `MAX_DETECTOR_ASPECT` (unchanged when within it). The boxes the detector predicts are relative
    to the unpadded region (its `valid_ratios`), so nothing else changes."""
    h, w = inputs["pixel_values"].shape[-2:]
    pad_h, pad_w = max(0, -(-w // MAX_DETECTOR_ASPECT) - h), max(0, -(-h // MAX_DETECTOR_ASPECT) - w)
    if not pad_h and not pad_w:
        return inputs
    return {k: nn.functional.pad(v, (0, pad_w, 0, pad_h)) for k, v in inputs.items()}


def thin_size(size: dict[str, int], image_size: tuple[int, ...]) -> dict[str, int]:
    """The detector `size` for an image of `image_size` (H, W): as is, except for a strip so thin that transformers'
    processor would scale its short edge to 0 pixels (over 2666:1 at 800/1333), which gets 1 × the longest edge."""
    h, w = image_size[:2]
    long = size["longest_edge"]
    if round(long * min(h, w) / max(h, w)) >= 1:
        return size
    return {"height": 1, "width": long} if h < w else {"height": long, "width": 1}


def _detector_size(size: Any, cap: int | None = None) -> dict[str, int]:
    """The processor size dict with the shortest edge capped at `cap` (longest edge scaled alike); None: as is."""
    short = int(size.get("shortest_edge") or 800) if isinstance(size, dict) else int(size.shortest_edge or 800)
    long = int(size.get("longest_edge") or 1333) if isinstance(size, dict) else int(size.longest_edge or 1333)
    if cap is None or short <= cap:
        return {"shortest_edge": short, "longest_edge": long}
    return {"shortest_edge": cap, "longest_edge": round(long * cap / short)}


def find_parts(path: Path) -> tuple[Path, Path]:
    """The GroundingDINO and mask head checkpoint folders of a grounded-sam / -sam2 / -edgetam model folder (found
    by the subfolders' config.json `model_type`: one 'grounding-dino', one of a mask head in `sam.HEADS`)."""
    folders = [path, *sorted(p for p in path.iterdir() if p.is_dir())] if path.is_dir() else []
    detector = next((p for p in folders if model_type(p) in DETECTOR_MODEL_TYPES), None)
    head = next((p for p in folders if is_mask_head_folder(p)), None)
    if detector is None or head is None:
        parts = (("GroundingDINO", detector), ("SAM, SAM 2 or EdgeTAM", head))
        missing = " and ".join(n for n, p in parts if p is None)
        raise ModelNotAvailableError(
            f"'{path}' has no {missing} checkpoint. A grounded-sam folder holds one subfolder per model, each "
            "saved with save_pretrained (config.json model_type 'grounding-dino', and 'sam', 'sam2' or 'edgetam'). "
            "Install one with: automask models pull grounded-sam (or grounded-sam2, grounded-edgetam)"
        )
    return detector, head


def load(path: Path, settings: Settings, precision: Precision | None = None) -> GroundedSamBackend:
    """Load the grounded-sam (or grounded-sam2, grounded-edgetam) model in folder `path` on `settings.device`.

    `precision` None: `preset_precision(settings)`; the detector edge: `settings.detector_size`, else the preset's
    (reference: the processor's own, fast: `FAST_DETECTOR_EDGE`)."""
    from transformers import GroundingDinoForObjectDetection

    device = prepare_torch(settings)
    detector_dir, sam_dir = find_parts(path)
    with checkpoint_errors("GroundingDINO", detector_dir, pull="grounded-sam"):
        detector = stop_at_layers(GroundingDinoForObjectDetection.from_pretrained(str(detector_dir)).eval().to(device))
        processor = load_tokenizer(detector_dir, "GroundingDINO", pull="grounded-sam", processor=True)
    precision = precision or preset_precision(settings)
    segmenter = load_mask_head(sam_dir, settings, precision)
    dtype = choose_dtype(precision, device)
    edge = settings.detector_size or (FAST_DETECTOR_EDGE if settings.preset == "fast" else None)
    return GroundedSamBackend(
        detector, processor, segmenter, name_of(path), device, detector_dtype=dtype, detector_edge=edge
    )
