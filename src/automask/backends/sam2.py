"""The SAM 2 family as mask heads: SAM 2 / 2.1 (transformers `Sam2Model`, Hiera image encoder) and EdgeTAM
(`EdgeTamModel`: SAM 2's prompt encoder and mask decoder on a small RepViT image encoder).

A drop-in for `sam.SamSegmenter` wherever SAM cuts masks from boxes and points: Grounded-SAM (`grounded-sam2`,
`grounded-edgetam`) and `refine`. Same split: `embed` runs the image encoder once per image (backbone + FPN, then
the decoder's high-resolution projections and, for the lowest level, the "no memory" embedding:
`get_image_embeddings`, identical in modeling_sam2.py and modeling_edgetam.py); `segment` runs the prompt encoder and
mask decoder for any number of prompts on that embedding. Which model a checkpoint holds is read from its
config.json `model_type` (`sam.HEADS`); `Sam2Segmenter.kind` ('sam2' or 'edgetam') names it in results.

Mirrors transformers' `Sam2Processor` / `Sam2ImageProcessor` (the processor of both), which need torchvision:
- image: stretched to 1024×1024, ImageNet mean/std (`sam2_processing.pixel_values`);
- prompts: pixel coordinates scaled by (1024 / W, 1024 / H) in float32 (processing_sam2.py
  `_normalize_coordinates`);
- masks: three candidates per prompt, the best by predicted IoU, its 256×256 logits resized bilinearly to the image
  (`post_process_masks`); probability = sigmoid(logit), selected iff >= 0.5 (logit >= 0).
EdgeTAM's RepViT backbone is automask's own (`repvit`), equal to timm's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automask.backends.interrupt import stop_at_layers
from automask.backends.sam import (
    DECODER_BATCH,
    HEADS,
    Precision,
    SamMasks,
    best_of_three,
    choose_dtype,
    head_kind,
    load_once,
    segment_in_batches,
)
from automask.backends.sam2_processing import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageTransform,
    pixel_values,
    upscale,
)
from automask.backends.torch_loading import checkpoint_errors, prepare_torch
from automask.errors import ModelNotAvailableError
from automask.models import name_of
from automask.settings import Settings

DEFAULT_TRANSFORM = ImageTransform((1024, 1024), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
"""`Sam2ImageProcessor`'s defaults, used when the checkpoint ships no processor config."""
__all__ = ["DECODER_BATCH", "Sam2Embedding", "Sam2Segmenter", "load_segmenter"]


@dataclass(frozen=True)
class Sam2Embedding:
    """One embedded image: `features` the three FPN levels the mask decoder reads (1×C×h×w float32, high to low
    resolution, on the model's device); image_size: (H, W) of the original image."""

    features: list[torch.Tensor]
    image_size: tuple[int, int]


class Sam2Segmenter:
    """A loaded SAM 2 or EdgeTAM checkpoint used as a mask head. Stateless between calls: thread-safe.

    kind: 'sam2' (`Sam2Model`) or 'edgetam' (`EdgeTamModel`), as `sam.HEADS` names them."""

    def __init__(
        self, model: Any, kind: str, transform: ImageTransform, model_id: str, device: str, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.kind = kind
        self.transform = transform
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        """bfloat16: the image encoder runs under bfloat16 autocast (the decoder in float32); see `_dtype`."""

    def embed(self, image: np.ndarray) -> Sam2Embedding:
        """Run the image encoder once on an H×W×3 uint8 RGB image."""
        pixels = pixel_values(image, self.transform).to(self.device)
        with torch.inference_mode(), self._autocast():
            feats = self.model.get_image_embeddings(pixels)
        return Sam2Embedding([f.float() for f in feats], (int(image.shape[0]), int(image.shape[1])))

    def segment(
        self,
        emb: Sam2Embedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> SamMasks:
        """Masks for N prompts: `boxes` N×4 XYXY and/or `points` N×P×2 XY (original pixels), `point_labels` N×P
        (1 = foreground, 0 = background; default all 1). Returns `SamMasks` at the original size."""
        return segment_in_batches(self.decode, emb, emb.image_size, boxes, points, point_labels)

    def decode(
        self, emb: Sam2Embedding, boxes: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best-of-three mask logits N×H×W (original size) and their predicted IoU (N,), CPU float32 tensors."""
        kwargs: dict[str, torch.Tensor] = {}
        if boxes is not None:
            kwargs["input_boxes"] = self.scaled(boxes, emb.image_size).reshape(1, -1, 4).to(self.device)
        if points is not None:
            pts = np.asarray(points, np.float32)
            kwargs["input_points"] = self.scaled(pts, emb.image_size)[None].to(self.device)
            lab = np.ones(pts.shape[:2], np.int64) if labels is None else np.asarray(labels, np.int64)
            kwargs["input_labels"] = torch.from_numpy(lab[None]).to(self.device)
        with torch.inference_mode():
            out = self.model(image_embeddings=emb.features, multimask_output=True, **kwargs)
            low, iou = best_of_three(out.iou_scores, out.pred_masks)  # N×256×256 logits
        return upscale(low.cpu(), emb.image_size), iou.cpu()

    def scaled(self, coords: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates (…×2 XY, or N×4 XYXY) in the model's input frame, as `Sam2Processor` scales them:
        float32, x × (target_w / W), y × (target_h / H)."""
        c = torch.tensor(np.asarray(coords, np.float32))
        shape = c.shape
        c = c.reshape(*shape[:-1], -1, 2)
        c[..., 0] = c[..., 0] * (self.transform.size[1] / image_size[1])
        c[..., 1] = c[..., 1] * (self.transform.size[0] / image_size[0])
        return c.reshape(shape)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(torch.device(self.device).type, dtype=self.dtype):
            yield


MODEL_CLASSES = {"sam2": "Sam2Model", "edgetam": "EdgeTamModel"}
"""The transformers class of each kind of checkpoint this module loads."""


def load_segmenter(folder: Path, settings: Settings, precision: Precision | None = None) -> Sam2Segmenter:
    """Load the SAM 2 or EdgeTAM checkpoint in `folder` (save_pretrained layout) once per (folder, device,
    precision); `precision` None: `preset_precision(settings)`."""
    return load_once(folder, settings, precision, _load)


def _load(folder: Path, settings: Settings, precision: Precision) -> Sam2Segmenter:
    import transformers

    from automask.backends.repvit import repvit_backbones

    kind = head_kind(folder)
    if kind not in MODEL_CLASSES:
        raise ModelNotAvailableError(
            f"'{folder}' holds no SAM 2 or EdgeTAM checkpoint (config.json with model_type 'sam2', 'sam2_video' or "
            "'edgetam')."
        )
    device = prepare_torch(settings)
    backbones = repvit_backbones() if kind == "edgetam" else contextlib.nullcontext()
    with checkpoint_errors(HEADS[kind].label, folder, pull=kind), backbones:
        model = getattr(transformers, MODEL_CLASSES[kind]).from_pretrained(str(folder)).eval().to(device)
    stop_at_layers(model)
    transform = ImageTransform.from_folder(folder, DEFAULT_TRANSFORM)
    dtype = _dtype(kind, precision, device)
    return Sam2Segmenter(model, kind, transform, model_id=name_of(folder), device=device, dtype=dtype)


def _dtype(kind: str, precision: Precision, device: str) -> torch.dtype:
    """The image encoder's autocast type. EdgeTAM: bfloat16 only when asked for (its encoder gained nothing from CPU
    bf16 autocast: 432 vs 462 ms), so the fast preset keeps its float32 numbers. SAM 2: as SAM (`choose_dtype`:
    bfloat16 under the fast preset on CPUs with native bf16, where Hiera-L took 2928 ms instead of 8701 ms in float32;
    bench/results/mask-heads-vm-20261202-1232.md)."""
    if kind == "edgetam":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    return choose_dtype(precision, device)
