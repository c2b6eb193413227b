"""SAM (Segment Anything) through transformers: embed an image once, then turn boxes and points into masks.

Shared by the `grounded-sam` backend (GroundingDINO boxes -> masks) and by `refine` (CLIPSeg boxes and peak
points -> masks). Follows SAM's own `set_image` / `predict` split: `embed` runs the ViT image encoder once
per image (the expensive part, about 90% of SAM's work); `segment` runs only the light prompt encoder and mask
decoder, for any number of boxes, and can be called again and again on the same `SamEmbedding`.

Any checkpoint transformers loads as `SamModel` works (config.json `model_type` "sam"): facebook/sam-vit-base
(the default), -large, -huge, and the pruned SlimSAM checkpoints (e.g. Zigeng/SlimSAM-uniform-77).

Coordinates: boxes XYXY and points XY in original-image pixels; masks H×W at the original image size.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F

from automask import models
from automask.backends.interrupt import stop_at_layers
from automask.backends.torch_loading import checkpoint_errors, prepare_torch
from automask.errors import ModelNotAvailableError
from automask.settings import Settings

SAM_MODEL_TYPES = frozenset({"sam"})
"""config.json `model_type` values this helper loads (through `transformers.SamModel`)."""


@dataclass(frozen=True)
class HeadKind:
    """One kind of mask head: how its checkpoints are recognised and where they are installed."""

    kind: str
    """`MaskHead.kind` and the `AUTOMASK_MASK_HEAD` value: 'sam', 'sam2' or 'edgetam'."""
    label: str
    """Its name in messages."""
    model_types: frozenset[str]
    """config.json `model_type` values of its checkpoints."""
    models: tuple[str, str]
    """The catalogue models holding it: the standalone one (refine), then the grounded one."""


HEADS: dict[str, HeadKind] = {
    h.kind: h
    for h in (
        HeadKind("sam", "SAM", SAM_MODEL_TYPES, ("sam", "grounded-sam")),
        # The hub's SAM 2.1 checkpoints (facebook/sam2.1-hiera-*) are 'sam2_video' configs; transformers loads them
        # as `Sam2Model` (models/auto/modeling_auto.py MODEL_FOR_MASK_GENERATION_MAPPING_NAMES: sam2_video ->
        # Sam2Model), leaving the video memory weights unused.
        HeadKind("sam2", "SAM 2", frozenset({"sam2", "sam2_video"}), ("sam2", "grounded-sam2")),
        HeadKind("edgetam", "EdgeTAM", frozenset({"edgetam"}), ("edgetam", "grounded-edgetam")),
    )
}
"""Every mask head automask loads: SAM (`SamSegmenter`), SAM 2 and EdgeTAM (`sam2.Sam2Segmenter`)."""
AUTO_ORDER = ("sam", "sam2", "edgetam")
"""`AUTOMASK_MASK_HEAD=auto` takes the first installed: SAM first as before SAM 2 was added (an install that refined
with SAM keeps doing so, even with SAM 2.1 in its Hugging Face cache), then SAM 2, then EdgeTAM."""

DECODER_BATCH = 32
"""Prompts decoded per mask-decoder call, at most (fewer for large images: see `decoder_batch`)."""
MASK_BUDGET_PIXELS = 256 * 2**20
"""Masks of one request hold at most this many float32 pixels together (1 GiB): `max_masks`."""


def max_masks(image_size: tuple[int, int]) -> int:
    """How many full-size masks of an image of `image_size` (H, W) fit in `MASK_BUDGET_PIXELS` (at least 1):
    341 for 1024×768 (the detector's cap of 100 comes first), 22 at 12 MP, 6 at 40 MP."""
    return max(1, MASK_BUDGET_PIXELS // max(1, image_size[0] * image_size[1]))


def decoder_batch(image_size: tuple[int, int]) -> int:
    """Prompts per decoder call: `DECODER_BATCH`, fewer when their full-size logits would pass 64 Mi pixels."""
    return max(1, min(DECODER_BATCH, (64 * 2**20) // max(1, image_size[0] * image_size[1])))


Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class SamEmbedding:
    """One embedded image.

    embeddings: 1×C×h×w float32 torch tensor (C=256, h=w=64 for SAM ViT-B/L/H), on the model's device.
    image_size: (H, W) of the original image; input_size: (h', w') of the resized image before padding.
    """

    embeddings: torch.Tensor
    image_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass(frozen=True)
class SamMasks:
    """SAM's masks for N prompts, the best of its three candidates per prompt (by predicted IoU).

    probs: N×H×W float32 in [0, 1], sigmoid of the mask logits at the original image size (a pixel belongs to
           the mask iff its probability is >= 0.5, i.e. its logit >= 0, as in SAM's `post_process_masks`).
    iou:   N float32, SAM's predicted IoU of each chosen mask.
    """

    probs: np.ndarray
    iou: np.ndarray


Decode = Callable[
    [Any, "np.ndarray | None", "np.ndarray | None", "np.ndarray | None"], tuple[torch.Tensor, torch.Tensor]
]
"""A mask head's decoder: (embedding, boxes, points, point labels) of a batch -> best-of-three logits N×H×W at
the original size and their predicted IoU (N,), CPU float32 tensors."""


def segment_in_batches(
    decode: Decode,
    emb: Any,
    image_size: tuple[int, int],
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    point_labels: np.ndarray | None,
) -> SamMasks:
    """`MaskHead.segment` for any head: `decode` the N prompts in batches of `decoder_batch(image_size)` (each
    batch's full-size masks bound the memory) and gather their sigmoid probabilities and IoUs."""
    n = len(boxes) if boxes is not None else len(points) if points is not None else 0
    h, w = image_size
    if n == 0:
        return SamMasks(np.zeros((0, h, w), np.float32), np.zeros(0, np.float32))
    probs, ious = [], []
    step = decoder_batch(image_size)
    for start in range(0, n, step):
        part = slice(start, start + step)
        logits, iou = decode(
            emb,
            None if boxes is None else boxes[part],
            None if points is None else points[part],
            None if point_labels is None else point_labels[part],
        )
        probs.append(torch.sigmoid(logits).numpy())
        ious.append(iou.numpy())
    return SamMasks(np.concatenate(probs).astype(np.float32), np.concatenate(ious).astype(np.float32))


def best_of_three(iou_scores: torch.Tensor, pred_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of highest predicted IoU among each prompt's three candidates (`multimask_output=True`):
    (N×h×w float32 low-resolution logits, N IoUs), from the model's 1×N×3 scores and 1×N×3×h×w masks."""
    iou = iou_scores[0].float()  # N×3
    best = iou.argmax(dim=-1)
    rows = torch.arange(iou.shape[0], device=iou.device)
    return pred_masks[0][rows, best].float(), iou[rows, best]


class MaskHead(Protocol):
    """A promptable mask model: SAM (`SamSegmenter`), SAM 2 or EdgeTAM (`sam2.Sam2Segmenter`). `embed` once per
    image (opaque result), then `segment` any number of box/point prompts against it."""

    kind: str
    """A key of `HEADS`: 'sam', 'sam2' or 'edgetam'."""
    model_id: str
    dtype: torch.dtype
    """The image encoder's compute type (bfloat16 or float32); masks are always float32."""

    def embed(self, image: np.ndarray) -> Any: ...

    def segment(
        self,
        emb: Any,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> SamMasks: ...


class SamSegmenter:
    """A loaded SAM checkpoint. Stateless between calls: thread-safe for concurrent inference."""

    kind = "sam"

    def __init__(self, model: Any, image_processor: Any, model_id: str, device: str, dtype: torch.dtype) -> None:
        self.model = model
        self.image_processor = image_processor
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        """dtype of the image encoder (bfloat16 on CPUs with native bf16); the mask decoder runs in float32."""
        pad = image_processor.pad_size
        self.pad_size = (int(pad["height"]), int(pad["width"]))

    def embed(self, image: np.ndarray) -> SamEmbedding:
        """Run the image encoder once on an H×W×3 uint8 RGB image (resized to the checkpoint's 1024 longest
        edge and padded, exactly as `SamProcessor` does)."""
        inputs = self.image_processor(
            images=thicken(image, self.pad_size), return_tensors="pt", input_data_format="channels_last"
        )
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            emb = self.model.vision_encoder(pixels)[0].float()
        h, w = (int(v) for v in inputs["reshaped_input_sizes"][0])
        return SamEmbedding(emb, image_size=(int(image.shape[0]), int(image.shape[1])), input_size=(h, w))

    def segment(
        self,
        emb: SamEmbedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> SamMasks:
        """Masks for N prompts: `boxes` N×4 XYXY and/or `points` N×P×2 XY (original pixels), `point_labels`
        N×P (1 = foreground, 0 = background; default all 1). Returns `SamMasks` at the original size."""
        return segment_in_batches(self._decode, emb, emb.image_size, boxes, points, point_labels)

    def _decode(
        self, emb: SamEmbedding, boxes: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best-of-three mask logits N×H×W (original size) and their predicted IoU (N,), as CPU float32 tensors."""
        scale = np.array([emb.input_size[1] / emb.image_size[1], emb.input_size[0] / emb.image_size[0]])
        kwargs: dict[str, torch.Tensor] = {}
        if boxes is not None:
            scaled = np.asarray(boxes, np.float64).reshape(-1, 2, 2) * scale
            kwargs["input_boxes"] = self._tensor(scaled.reshape(1, -1, 4))
        if points is not None:
            pts = np.asarray(points, np.float64) * scale
            kwargs["input_points"] = self._tensor(pts[None])
            lab = np.ones(pts.shape[:2], np.int64) if labels is None else np.asarray(labels, np.int64)
            kwargs["input_labels"] = torch.from_numpy(lab[None]).to(self.device)
        with torch.inference_mode():
            out = self.model(image_embeddings=emb.embeddings, multimask_output=True, **kwargs)
            low, iou = best_of_three(out.iou_scores, out.pred_masks)  # N×h×w low-res logits
            logits = upscale_logits(low[:, None], self.pad_size, emb.input_size, emb.image_size)[:, 0]
        return logits.cpu(), iou.cpu()

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(self.device)


def thicken(image: np.ndarray, pad_size: tuple[int, int]) -> np.ndarray:
    """An H×W×3 image as SAM's processor can take it: as is, except a strip so thin that scaling its long edge to
    the model's (`pad_size`) would leave its short edge 0 pixels (over 2048:1 for SAM), whose rows (or columns) are
    repeated until it scales to 1 pixel. Boxes and masks are scaled per axis (`input_size` / `image_size`), so the
    stretch changes nothing else."""
    h, w = image.shape[:2]
    if int(min(h, w) * max(pad_size) / max(h, w) + 0.5) >= 1:  # the processor's own rounding
        return image
    need = -(-max(h, w) // max(pad_size))  # a short edge this long scales to >= 1 pixel
    repeat = -(-need // min(h, w))
    return np.repeat(image, repeat, axis=0 if h < w else 1)


def upscale_logits(
    low_res: torch.Tensor, pad_size: tuple[int, int], input_size: tuple[int, int], image_size: tuple[int, int]
) -> torch.Tensor:
    """N×C×h×w low-res mask logits -> N×C×H×W logits at the original image size.

    The steps of transformers' `SamImageProcessor.post_process_masks` (before its `> 0` binarisation): bilinear
    upscale to the padded input size, crop the padding away, bilinear resize to the original (H, W).
    """
    up = F.interpolate(low_res, pad_size, mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    return F.interpolate(up, image_size, mode="bilinear", align_corners=False)


def preset_precision(settings: Settings) -> Precision:
    """The precision SAM, EdgeTAM and GroundingDINO run at: `settings.precision` when set; for 'auto', the preset's:
    'reference' -> 'fp32' (the checkpoints' own float32), 'fast' -> 'auto' (`choose_dtype`)."""
    if settings.precision != "auto":
        return settings.precision
    return "auto" if settings.preset == "fast" else "fp32"


def choose_dtype(precision: Precision, device: str) -> torch.dtype:
    """bfloat16 for the image encoder when asked, or ('auto') on a CPU with native bf16 matrix units
    (AVX512-BF16 / AMX: about 2× faster there); float32 otherwise."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32" or device != "cpu":
        return torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """True on CPUs with native bfloat16 dot products (AVX512-BF16 or AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flag("avx512_bf16", "amx_bf16")
    except (AttributeError, RuntimeError):
        return False


def _cpu_flag(*flags: str) -> bool:
    """True when /proc/cpuinfo lists one of `flags` (native bf16 dot products, not emulation)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in text for f in flags)


def is_sam_folder(folder: Path) -> bool:
    """True when `folder` holds a SAM checkpoint transformers can load as `SamModel`."""
    return models.model_type(folder) in SAM_MODEL_TYPES


def head_kind(folder: Path) -> str | None:
    """The `HEADS` kind of the checkpoint in `folder` (by its config.json `model_type`), or None."""
    kind = models.model_type(folder)
    return next((h.kind for h in HEADS.values() if kind in h.model_types), None)


def is_mask_head_folder(folder: Path) -> bool:
    """True when `folder` holds a SAM, SAM 2 or EdgeTAM checkpoint."""
    return head_kind(folder) is not None


def find_mask_head_folder(settings: Settings) -> Path:
    """Where `refine` takes its mask head (`settings.mask_head`: 'sam', 'sam2', 'edgetam', or 'auto' = the first
    installed in `AUTO_ORDER`): the standalone model (`automask models pull sam` / `sam2` / `edgetam`), else the
    mask head of the grounded model, in the data folder or (standalone ones) the Hugging Face cache."""
    kinds = AUTO_ORDER if settings.mask_head == "auto" else (settings.mask_head,)
    for kind in kinds:
        candidates: list[Path] = []
        for name in HEADS[kind].models:
            if name in models.CATALOGUE:
                folder = models.model_dir(name, settings)
                candidates += [folder, *sorted(p for p in folder.glob("*") if p.is_dir())]
        if kind in models.CATALOGUE and (cached := models.hf_cached(kind)) is not None:
            candidates.append(cached)
        for folder in candidates:
            if head_kind(folder) == kind:
                return folder
    wanted = " or ".join(HEADS[k].label for k in kinds)
    raise ModelNotAvailableError(
        f"refine needs a mask head ({wanted}), which is not installed. Install one with: automask models pull sam "
        "(SAM ViT-B), automask models pull sam2 (SAM 2.1 Hiera-L, the most accurate) or automask models pull "
        "edgetam (EdgeTAM, the fastest); the grounded-sam, grounded-sam2 and grounded-edgetam models include theirs."
    )


def find_sam_folder(settings: Settings) -> Path:
    """`find_mask_head_folder` (kept under its first name)."""
    return find_mask_head_folder(settings)


def load_mask_head(folder: Path, settings: Settings, precision: Precision | None = None) -> MaskHead:
    """Load the SAM, SAM 2 or EdgeTAM checkpoint in `folder` (by its config.json `model_type`), cached like
    `load_segmenter`."""
    if head_kind(folder) in ("sam2", "edgetam"):
        from automask.backends import sam2

        return sam2.load_segmenter(folder, settings, precision)
    return load_segmenter(folder, settings, precision)


_LOADED: weakref.WeakValueDictionary[tuple[str, str, str], Any] = weakref.WeakValueDictionary()
"""The loaded mask heads, while a backend holds them (see `registry._LOADED`)."""
_LOCK = threading.Lock()
H = TypeVar("H", bound=MaskHead)


def load_once(
    folder: Path, settings: Settings, precision: Precision | None, load: Callable[[Path, Settings, Precision], H]
) -> H:
    """`load(folder, settings, precision)`, once per (folder, device, precision) for every kind of mask head while
    it is in use (freed once nothing holds it); `precision` None: `preset_precision(settings)`."""
    precision = precision or preset_precision(settings)
    key = (str(folder.resolve()), settings.device, precision)
    with _LOCK:
        head = _LOADED.get(key)
        if head is None:
            head = _LOADED[key] = load(folder, settings, precision)
        return cast(H, head)


def load_segmenter(folder: Path, settings: Settings, precision: Precision | None = None) -> SamSegmenter:
    """Load the SAM checkpoint in `folder` (save_pretrained layout) once per (folder, device, precision).

    `precision` None: `preset_precision(settings)`."""
    return load_once(folder, settings, precision, _load)


def _load(folder: Path, settings: Settings, precision: Precision) -> SamSegmenter:
    from transformers import AutoProcessor, SamModel

    if not is_sam_folder(folder):
        raise ModelNotAvailableError(f"'{folder}' holds no SAM checkpoint (config.json with model_type 'sam').")
    device = prepare_torch(settings)
    with checkpoint_errors("SAM", folder, pull="grounded-sam"):
        model = stop_at_layers(SamModel.from_pretrained(str(folder)).eval().to(device))
        processor = AutoProcessor.from_pretrained(str(folder))
    dtype = choose_dtype(precision, device)
    model.vision_encoder.to(dtype)
    image_processor = getattr(processor, "image_processor", processor)
    return SamSegmenter(model, image_processor, model_id=models.name_of(folder), device=device, dtype=dtype)
