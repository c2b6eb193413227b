"""SAM 3 backend (transformers `Sam3Model`): one model finds and segments every instance of a noun phrase.

Per image, `encode` runs SAM 3's vision encoder (a ViT with its FPN neck, nearly all of the cost) once; the
pipeline's `FeatureCache` keeps the result, so every further prompt on the same image runs only the text encoder,
the DETR-style encoder/decoder and the mask decoder (`Sam3Model.forward(vision_embeds=...)`).

Per prompt (several prompts: one pass each, the instances unioned), exactly as transformers'
`Sam3Processor.post_process_instance_segmentation` (image_processing_sam3.py):
- the instance score is sigmoid(pred_logits) × sigmoid(presence_logits): the query's match to the phrase times the
  image-level "is the concept present" probability. `threshold` applies to this score (instance kept iff
  score >= threshold);
- its mask is sigmoid(pred_masks) (288×288 for the released model) resized bilinearly to the image; a pixel is
  selected iff its probability is >= 0.5;
- its box is pred_boxes (x1, y1, x2, y2 relative to the image) times (W, H, W, H), clipped to the image.

Pre-processing (`sam2_processing.pixel_values`): stretched to 1008×1008, (x/255 - 0.5) / 0.5; text: the CLIP
tokenizer padded to 32 tokens with its attention mask (processing_sam3.py `padding="max_length", max_length=32`).

Precision: float32 on CPUs (the reference numbers); on CUDA, precision 'auto' runs the model under bfloat16 autocast
as SAM 3's own inference code does (precision 'fp32' turns it off, 'bf16' asks for it on a CPU too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automask.backends.base import ScoreParams, Scores
from automask.backends.grounding import MAX_DETECTIONS
from automask.backends.interrupt import stop_at_layers
from automask.backends.sam import cpu_has_bf16, max_masks
from automask.backends.sam2_processing import IMAGENET_STANDARD, ImageTransform, pixel_values, upscale
from automask.backends.torch_loading import checkpoint_errors, load_tokenizer, prepare_torch
from automask.errors import InvalidOptionError, ModelNotAvailableError, stop_if_asked
from automask.models import model_type, name_of
from automask.settings import Settings

NAME = "sam3"
MODEL_TYPES = frozenset({"sam3", "sam3_video"})
"""config.json `model_type`s `Sam3Model.from_pretrained` loads (the hub's facebook/sam3 is a 'sam3_video' config
holding the image model under `detector_config`)."""
TEXT_LENGTH = 32
"""Tokens the text encoder reads (processing_sam3.py pads every prompt to 32)."""
DEFAULT_TRANSFORM = ImageTransform((1008, 1008), IMAGENET_STANDARD, IMAGENET_STANDARD)
"""`Sam3ImageProcessor`'s defaults, used when the checkpoint ships no processor config."""


@dataclass(frozen=True)
class Sam3Features:
    """One encoded image: `vision` is `Sam3Model.get_vision_features`' output (FPN levels 1×256×h×w, on the model's
    device); image_size: (H, W) of the original image."""

    vision: Any
    image_size: tuple[int, int]


class Sam3Backend:
    """A loaded SAM 3 image model. Stateless between calls: thread-safe for concurrent inference."""

    name = NAME
    takes_params = True

    def __init__(
        self, model: Any, tokenizer: Any, transform: ImageTransform, model_id: str, device: str, autocast: bool
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.model_id = model_id
        self.device = device
        self.autocast = autocast
        """True: the model runs under bfloat16 autocast (CUDA by default, or precision 'bf16')."""

    def encode(self, image: np.ndarray) -> Sam3Features:
        """SAM 3's vision features of an H×W×3 uint8 RGB image."""
        pixels = pixel_values(image, self.transform).to(self.device)
        with torch.inference_mode(), self._precision():
            vision = self.model.get_vision_features(pixel_values=pixels)
        return Sam3Features(vision, (int(image.shape[0]), int(image.shape[1])))

    def score(
        self, features: Sam3Features, prompts: list[str], *, min_score: float = 0.0, params: ScoreParams | None = None
    ) -> Scores:
        """Instances of every prompt: N×H×W mask probabilities, N scores (see the module docstring), N×4 XYXY pixel
        boxes, grouped by prompt, best first within each. Instances scoring below `min_score` are dropped; at most
        100 in all (fewer on huge images: `sam.max_masks`), the best. `params.should_stop` is asked before each
        prompt (`text_threshold` does not apply)."""
        h, w = features.image_size
        limit = min(MAX_DETECTIONS, max_masks(features.image_size))
        should_stop = params.should_stop if params is not None else None
        low, scores, boxes, labels = [], [], [], []
        for prompt in prompts:
            stop_if_asked(should_stop)
            logits, score, box = self.detect(features, prompt)
            keep = torch.nonzero(score >= min_score).flatten()
            keep = keep[torch.argsort(score[keep], descending=True, stable=True)][:limit]
            low.append(logits[keep])
            scores.append(score[keep])
            boxes.append(box[keep])
            labels += [prompt] * len(keep)
        if not labels:
            return _scores(np.zeros((0, h, w), np.float32), np.zeros(0), np.zeros((0, 4)), [], (h, w))
        all_scores = torch.cat(scores)
        order = torch.arange(len(labels))
        if len(labels) > limit:  # bound memory across prompts: the best `limit`, kept in prompt order
            order = torch.sort(torch.argsort(all_scores, descending=True, stable=True)[:limit]).values
        probs = upscale(torch.sigmoid(torch.cat(low)[order]), (h, w))  # only the kept masks at full size
        kept_labels = [labels[i] for i in order.tolist()]
        return _scores(probs.numpy(), all_scores[order].numpy(), torch.cat(boxes)[order].numpy(), kept_labels, (h, w))

    def detect(self, features: Sam3Features, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompt's Q queries: low-res mask logits Q×h×w, scores Q, boxes Q×4 XYXY in original pixels (not
        clipped), as float32 CPU tensors."""
        ids, mask = self.tokens(prompt)
        with torch.inference_mode(), self._precision():
            out = self.model(vision_embeds=features.vision, input_ids=ids, attention_mask=mask)
        score = torch.sigmoid(out.pred_logits[0].float())
        if out.presence_logits is not None:
            score = score * torch.sigmoid(out.presence_logits[0].float())
        h, w = features.image_size
        boxes = out.pred_boxes[0].float() * torch.tensor([w, h, w, h], dtype=torch.float32, device=score.device)
        return out.pred_masks[0].float().cpu(), score.cpu(), boxes.cpu()

    def tokens(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask 1×32 for `prompt`, padded as `Sam3Processor` pads them."""
        enc = self.tokenizer(prompt, padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt")
        if enc["input_ids"].shape[1] > TEXT_LENGTH:
            raise InvalidOptionError(
                "prompt", f"'{prompt[:40]}' is too long for {NAME}: at most {TEXT_LENGTH - 2} tokens per target."
            )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if not self.autocast:
            yield
            return
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            yield


def _scores(
    maps: np.ndarray, scores: np.ndarray, boxes: np.ndarray, labels: list[str], image_size: tuple[int, int]
) -> Scores:
    h, w = image_size
    clipped = np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0, [w, h, w, h]).astype(np.float32)
    return Scores(
        maps=maps.astype(np.float32, copy=False),
        labels=labels,
        kind="instances",
        scores=np.asarray(scores, np.float32),
        boxes=clipped,
    )


def use_autocast(settings: Settings, device: str) -> bool:
    """bfloat16 autocast: asked for (precision 'bf16'); or precision 'auto' on CUDA (SAM 3's reference inference
    runs so), or on a CPU with native bf16 under the 'fast' preset. 'fp32': never."""
    if settings.precision != "auto":
        return settings.precision == "bf16"
    if device.startswith("cuda"):
        return True
    return settings.preset == "fast" and cpu_has_bf16()


def load(path: Path, settings: Settings) -> Sam3Backend:
    """Load the SAM 3 checkpoint in folder `path` (a save_pretrained folder: config.json 'sam3' or 'sam3_video',
    safetensors weights, the CLIP tokenizer files) on `settings.device`."""
    from transformers import Sam3Model

    if model_type(path) not in MODEL_TYPES:
        raise ModelNotAvailableError(
            f"'{path}' holds no SAM 3 checkpoint (config.json with model_type 'sam3' or 'sam3_video'). "
            "Install one with: automask models pull sam3"
        )
    device = prepare_torch(settings)
    with checkpoint_errors("SAM 3", path, pull=NAME):
        model = stop_at_layers(Sam3Model.from_pretrained(str(path)).eval().to(device))
        tokenizer = load_tokenizer(path, "SAM 3", pull=NAME)
    transform = ImageTransform.from_folder(path, DEFAULT_TRANSFORM)
    return Sam3Backend(model, tokenizer, transform, name_of(path), device, autocast=use_autocast(settings, device))
