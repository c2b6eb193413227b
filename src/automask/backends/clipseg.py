"""CLIPSeg backend (transformers + torch): open-vocabulary score maps from text prompts.

Architecture of `CIDAS/clipseg-rd64-refined`. `encode` runs the CLIP vision encoder once per image and keeps the
hidden states of `config.extract_layers`; `score` runs the text encoder for all prompts in one batch and the
light decoder for all prompts in one batch, re-using the model's own submodules, so the logits equal those of
`CLIPSegForImageSegmentation(**CLIPSegProcessor(...)(text=prompts, images=[image] * N))`.

The pure helpers (`read_preprocessing`, `preprocess`, `tokenize`, `upsample`) and `ClipSegScoring` hold no torch and
are shared by the ONNX Runtime backend of the same checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from automask.backends.base import LazyMaps, ScoreParams, Scores, sigmoid
from automask.backends.interrupt import stop_at_layers
from automask.backends.torch_loading import checkpoint_errors, load_tokenizer, prepare_torch
from automask.errors import ModelNotAvailableError, require, stop_if_asked
from automask.models import name_of
from automask.settings import Settings

NAME = "clipseg"


@dataclass(frozen=True)
class Preprocessing:
    """How the checkpoint's image processor prepares an image (read from its saved config).

    size: (height, width) the image is resized to; mean/std: per RGB channel, applied after rescaling.
    resample: a PIL resampling filter id (2 = bilinear).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = 2
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True


def read_preprocessing(path: Path) -> Preprocessing:
    """Read the image processor settings of the checkpoint in folder `path`.

    Accepts `preprocessor_config.json` (flat, as on the hub) or `processor_config.json` (nested under
    "image_processor", as newer transformers save it).
    """
    flat, nested = path / "preprocessor_config.json", path / "processor_config.json"
    if flat.is_file():
        cfg = json.loads(flat.read_text())
    elif nested.is_file():
        cfg = json.loads(nested.read_text()).get("image_processor", {})
    else:
        raise ModelNotAvailableError(
            f"'{path}' has no preprocessor_config.json: it is not a complete CLIPSeg checkpoint. "
            "Save it with CLIPSegProcessor.save_pretrained, or pull one: automask models pull clipseg"
        )
    # defaults: those of transformers' ViTImageProcessor, which CLIPSeg checkpoints use
    return Preprocessing(
        size=_size(cfg.get("size", 224), path),
        mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
        resample=int(cfg.get("resample", 2)),
        do_resize=bool(cfg.get("do_resize", True)),
        do_rescale=bool(cfg.get("do_rescale", True)),
        do_normalize=bool(cfg.get("do_normalize", True)),
    )


def _size(size: Any, path: Path) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict) and "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"]))
    raise ModelNotAvailableError(f"Unsupported image size {size!r} in the preprocessor config of '{path}'.")


def preprocess(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """H×W×3 uint8 RGB -> 1×3×S×S float32 pixel values, exactly as the checkpoint's (PIL) image processor.

    Resize with PIL (the processor's filter), rescale in float64 then cast to float32, normalise in float32.
    """
    if prep.do_resize:
        h, w = prep.size
        image = np.asarray(Image.fromarray(image).resize((w, h), resample=Image.Resampling(prep.resample)))
    x = image.astype(np.float64) * prep.rescale_factor if prep.do_rescale else image.astype(np.float64)
    x = x.astype(np.float32)
    if prep.do_normalize:
        x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def tokenize(tokenizer: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise N prompts as CLIPSegProcessor does (pad to the longest): input_ids, attention_mask, N×L int64.

    `tokenizer` is the checkpoint's saved tokenizer (a transformers tokenizer or any callable alike).
    """
    enc = tokenizer(prompts, padding=True, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N×s×s float32 maps -> N×H×W float32, bilinear (half-pixel centres, like align_corners=False)."""
    h, w = size
    out = np.empty((maps.shape[0], h, w), np.float32)
    for i, m in enumerate(maps):
        out[i] = upsample_one(m, size)
    return out


def upsample_one(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One s×s map -> H×W float32, bilinear (half-pixel centres, like align_corners=False)."""
    h, w = size
    return cv2.resize(low.astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_LINEAR)


class UpsampledMaps(LazyMaps):
    """The N×s×s low-resolution maps `low`, each upsampled to `size` (`upsample_one`) when it is read: a request naming
    32 targets on a 36-megapixel photo holds one 145 MB map at a time, not 32."""

    def __init__(self, low: np.ndarray, size: tuple[int, int]) -> None:
        self.low = low
        self.size = size
        self.shape = (low.shape[0], *size)

    def one(self, i: int) -> np.ndarray:
        # made anew on each read (0.3 ms at 1 MP, 17 ms at 36 MP): keeping one would hold 145 MB at 36 MP
        return upsample_one(self.low[i], self.size)

    def subset(self, index: Any) -> UpsampledMaps:
        return UpsampledMaps(self.low[index], self.size)

    def whole(self) -> np.ndarray:
        return upsample(self.low, self.size)


@dataclass(frozen=True)
class ClipSegFeatures:
    """One encoded image: the vision hidden states the decoder reads (each 1×T×D torch tensors, on the model's
    device, in `config.extract_layers` order) and the original image size (H, W)."""

    activations: tuple[Any, ...]
    image_size: tuple[int, int]


PROMPTS_PER_PASS = 8
"""Prompts the text encoder and decoder take in one batch: a many-prompt call makes several passes, and asks its
`should_stop` between them (each prompt's logits do not depend on the others in its batch)."""


class ClipSegScoring:
    """`score` for both CLIPSeg runtimes, on top of their own `logits(features, prompts)` (N×S×S float32) and
    features that carry the original `image_size` (H, W)."""

    takes_params = True

    def logits(self, features: Any, prompts: list[str]) -> np.ndarray:
        """Decoder logits for N prompts at the model resolution: N×S×S float32 (before the sigmoid)."""
        raise NotImplementedError

    def score(
        self, features: Any, prompts: list[str], *, min_score: float = 0.0, params: ScoreParams | None = None
    ) -> Scores:
        """Sigmoid score maps N×H×W float32 in [0, 1] at the original image size, one per prompt; scores: the
        N peaks. The prompts are decoded `PROMPTS_PER_PASS` at a time; `params.should_stop` is asked before each
        pass but the first (`text_threshold` does not apply).

        `min_score` is unused: every pixel of a dense map is thresholded by the pipeline.
        """
        h, w = features.image_size
        if not prompts:
            return Scores(maps=np.zeros((0, h, w), np.float32), labels=[], kind="dense", scores=np.zeros(0, np.float32))
        should_stop = params.should_stop if params is not None else None
        low = []
        for start in range(0, len(prompts), PROMPTS_PER_PASS):
            if start:
                stop_if_asked(should_stop)
            low.append(sigmoid(self.logits(features, prompts[start : start + PROMPTS_PER_PASS])))
        maps = UpsampledMaps(np.concatenate(low), (h, w))  # full size one at a time
        peaks = np.array([m.max() for m in maps], np.float32)
        return Scores(maps=maps, labels=list(prompts), kind="dense", scores=peaks)  # type: ignore[arg-type]


class ClipSegBackend(ClipSegScoring):
    """A loaded CLIPSeg checkpoint. Thread-safe for concurrent inference; holds no per-request state."""

    name = NAME

    def __init__(self, model: Any, tokenizer: Any, prep: Preprocessing, model_id: str, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prep = prep
        self.model_id = model_id
        self.device = device
        self.extract_layers: list[int] = list(model.config.extract_layers)

    def encode(self, image: np.ndarray) -> ClipSegFeatures:
        """Run the vision encoder once on an H×W×3 uint8 RGB image; keep the layers the decoder needs."""
        import torch

        pixels = torch.from_numpy(preprocess(image, self.prep)).to(self.device)
        with torch.inference_mode():
            out = self.model.clip.vision_model(
                pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True
            )
        hidden = out.hidden_states  # the embeddings, then one entry per encoder layer
        acts = tuple(hidden[i + 1] for i in self.extract_layers)
        return ClipSegFeatures(activations=acts, image_size=(int(image.shape[0]), int(image.shape[1])))

    def logits(self, features: ClipSegFeatures, prompts: list[str]) -> np.ndarray:
        """Decoder logits for N prompts at the model resolution: N×S×S float32 (before the sigmoid)."""
        import torch

        ids, mask = tokenize(self.tokenizer, prompts)
        n = len(prompts)
        with torch.inference_mode():
            text = self.model.clip.get_text_features(
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
            )
            cond = text if isinstance(text, torch.Tensor) else text.pooler_output
            acts = [a.expand(n, -1, -1) for a in features.activations]
            out = self.model.decoder(acts, cond)
            logits = out.logits if hasattr(out, "logits") else out[0]
        # older transformers squeeze a batch of one to S×S: reshape restores N×S×S
        return logits.reshape(n, *logits.shape[-2:]).float().cpu().numpy()


def load(path: Path, settings: Settings) -> ClipSegBackend:
    """Load the CLIPSeg checkpoint in folder `path` (save_pretrained layout) on `settings.device`."""
    require("torch", "torch")
    require("transformers", "torch")
    from transformers import CLIPSegForImageSegmentation

    device = prepare_torch(settings)
    prep = read_preprocessing(path)
    with checkpoint_errors("CLIPSeg", path, pull="clipseg"):
        model = stop_at_layers(CLIPSegForImageSegmentation.from_pretrained(str(path)).eval().to(device))
        tokenizer = load_tokenizer(path, "CLIPSeg", pull="clipseg")
    _drop_unused_layers(model)
    return ClipSegBackend(model, tokenizer, prep, model_id=name_of(path), device=device)


def _drop_unused_layers(model: Any) -> None:
    """Keep only the vision encoder layers up to the deepest one the decoder reads (the rest only feed the
    pooled output, which segmentation never uses): same logits, less work per image."""
    layers = model.clip.vision_model.encoder.layers
    keep = max(model.config.extract_layers) + 1
    if keep < len(layers):
        model.clip.vision_model.encoder.layers = layers[:keep]
