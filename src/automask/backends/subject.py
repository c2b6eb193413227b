"""The embedded offline backend: U²-Net-p salient-object probability with ONNX Runtime on the CPU.

The model (`u2netp.onnx`, installed by `automask models pull subject`) takes 1×3×320×320 float32 and returns
seven 1×1×320×320 maps, each already passed through a sigmoid; the first (d0, the fused side outputs) is the
one rembg and the U²-Net authors use. Preprocessing is rembg's: RGB, Lanczos resize to 320×320, divide by the
image's maximum, then ImageNet mean/std.

Scores are the model's own probability, not rembg's per-image min-max stretch: a stretch would turn the best
guess on an image with no salient object into a "certain" subject, and would make `threshold` mean something
different on every image. The map is resized back to the original size with bilinear interpolation (which
keeps it in [0, 1]).

The backend knows only the routing vocabulary (`automask.routing`): subject and person words score the
probability p, background words 1 - p; like any score, a pixel is selected where it reaches `threshold` (so at
0.5 "background" is the exact complement of "subject"; below 0.5 the two overlap on the subject's soft edge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from automask.backends.base import LazyMaps, Scores
from automask.backends.interrupt import run_session
from automask.backends.onnx_runtime import load_errors
from automask.errors import ModelNotAvailableError, require
from automask.models import name_of
from automask.routing import Target, target_of, unknown_words_message
from automask.settings import Settings

NAME = "subject"
MODEL_FILE = "u2netp.onnx"
SIZE = 320
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def preprocess(image: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 RGB -> 1×3×320×320 float32, as rembg prepares it for U²-Net."""
    small = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    small = small / max(float(small.max()), 1.0)
    x = (small - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def upsample(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """320×320 float32 probability -> H×W float32 in [0, 1] (bilinear)."""
    out = cv2.resize(prob.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


class SharedMaps(LazyMaps):
    """N×H×W float32 maps, each one of the K×H×W maps of `base` (`index`: N ints): the subject map p and 1 - p
    stand for any number of words while held once each."""

    def __init__(self, base: np.ndarray, index: np.ndarray) -> None:
        self.base = base
        self.index = index
        self.shape = (len(index), *base.shape[1:])

    def one(self, i: int) -> np.ndarray:
        return self.base[self.index[i]]

    def subset(self, index: Any) -> SharedMaps:
        return SharedMaps(self.base, self.index[index])

    def whole(self) -> np.ndarray:
        return self.base[self.index]


class SubjectBackend:
    """U²-Net-p in an ONNX Runtime session. `encode` returns the H×W float32 subject probability."""

    name = NAME

    def __init__(self, session: Any, model_id: str) -> None:
        self.session = session
        self.model_id = model_id
        self._input = session.get_inputs()[0].name
        self._d0 = session.get_outputs()[0].name

    def encode(self, image: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 RGB -> H×W float32 probability that a pixel belongs to the main subject."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 image, got {image.shape} {image.dtype}")
        d0 = run_session(self.session, [self._d0], {self._input: preprocess(image)})[0]
        return upsample(d0[0, 0], image.shape[0], image.shape[1])

    def score(self, features: np.ndarray, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        """N×H×W maps: p for subject and person words, 1 - p for background words.

        Raises `ModelNotAvailableError` for a target outside the vocabulary (it needs an open-vocabulary model).
        """
        targets = [target_of(p) for p in prompts]
        unknown = [p for p, t in zip(prompts, targets, strict=True) if t is None]
        if unknown:
            raise ModelNotAvailableError(unknown_words_message(unknown))
        background = [t is Target.BACKGROUND for t in targets]
        p = features.astype(np.float32, copy=False)
        base = np.stack([p, 1.0 - p]) if any(background) else p[None]
        maps = SharedMaps(base, np.array(background, np.int64))
        peaks = base.reshape(len(base), -1).max(1)[maps.index]
        return Scores(maps=maps, labels=list(prompts), kind="dense", scores=peaks)  # type: ignore[arg-type]


def load(path: Path, settings: Settings) -> SubjectBackend:
    """Load `u2netp.onnx` from the model folder `path` into a CPU session using `settings.threads` threads."""
    require("onnxruntime", "onnx")
    import onnxruntime as ort

    model = Path(path) / MODEL_FILE
    if not model.is_file():
        raise ModelNotAvailableError(
            f"'{path}' holds no {MODEL_FILE}. Install the embedded model with: automask models pull subject"
        )
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    if settings.threads:
        opts.intra_op_num_threads = settings.threads
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    except load_errors() as exc:
        raise ModelNotAvailableError(
            f"{model} could not be loaded ({exc}). "
            "Reinstall it with: automask models pull subject (it re-checks the file)"
        ) from None
    return SubjectBackend(session, model_id=name_of(path))
