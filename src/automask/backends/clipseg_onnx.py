"""CLIPSeg on ONNX Runtime: the fast CPU path, with no torch or transformers at run time.

Runs the graphs written by `automask models export` (see `clipseg_common` for the layout). Same semantics as
the torch backend (`clipseg.ClipSegBackend`): the same preprocessing, tokenisation, sigmoid and bilinear
upsampling; `encode` runs the vision encoder once per image (only up to the deepest layer the decoder reads),
`score` runs the text encoder and the decoder once for all prompts together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automask.backends.clipseg import ClipSegScoring, Preprocessing, preprocess, read_preprocessing, tokenize
from automask.backends.clipseg_common import OnnxArtifacts, export_hint, find_artifacts
from automask.backends.interrupt import run_session
from automask.backends.onnx_runtime import load_errors, session_options
from automask.errors import ModelNotAvailableError, require
from automask.models import name_of
from automask.settings import Settings

NAME = "clipseg-onnx"


class PromptTokenizer:
    """The checkpoint's tokenizer run by the `tokenizers` library, called like a transformers tokenizer:
    pad to the longest prompt with the checkpoint's pad token, truncate to its maximum length."""

    def __init__(self, artifacts: OnnxArtifacts) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(artifacts.tokenizer))
        self._tok.enable_padding(pad_id=artifacts.pad_id, pad_token=artifacts.pad_token)
        self._tok.enable_truncation(max_length=artifacts.max_length)

    def __call__(self, prompts: list[str], **_: Any) -> dict[str, np.ndarray]:
        """{'input_ids', 'attention_mask'}: N×L int64 arrays (the transformers keyword options are implied)."""
        encodings = self._tok.encode_batch(prompts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }


@dataclass(frozen=True)
class OnnxFeatures:
    """One encoded image: hidden_states K×1×T×D float32 (vision layers `extract_layers`, in that order) and
    the original image size (H, W)."""

    hidden_states: np.ndarray
    image_size: tuple[int, int]


class ClipSegOnnxBackend(ClipSegScoring):
    """A CLIPSeg export loaded in ONNX Runtime. Thread-safe (sessions are); holds no per-request state."""

    def __init__(
        self, image: Any, prompt: Any, tokenizer: PromptTokenizer, prep: Preprocessing, model_id: str, int8: bool
    ) -> None:
        """`image` and `prompt`: ONNX Runtime sessions of image.onnx and prompt.onnx (or their int8 copies)."""
        self.image_session = image
        self.prompt_session = prompt
        self.tokenizer = tokenizer
        self.prep = prep
        self.model_id = model_id
        self.int8 = int8
        self.name = NAME + ("-int8" if int8 else "")

    def encode(self, image: np.ndarray) -> OnnxFeatures:
        """Run the vision graph once on an H×W×3 uint8 RGB image."""
        (hidden,) = run_session(self.image_session, None, {"pixel_values": preprocess(image, self.prep)})
        return OnnxFeatures(hidden_states=hidden, image_size=(int(image.shape[0]), int(image.shape[1])))

    def logits(self, features: OnnxFeatures, prompts: list[str]) -> np.ndarray:
        """Decoder logits for N prompts at the model resolution: N×S×S float32 (before the sigmoid)."""
        ids, mask = tokenize(self.tokenizer, prompts)
        feeds = {"hidden_states": features.hidden_states, "input_ids": ids, "attention_mask": mask}
        (logits,) = run_session(self.prompt_session, None, feeds)
        return np.asarray(logits, np.float32).reshape(len(prompts), *logits.shape[-2:])

    def warm_up(self) -> None:
        """One run of each graph, so that the first request does not pay for ONNX Runtime's lazy set-up."""
        h, w = self.prep.size
        features = self.encode(np.zeros((h, w, 3), np.uint8))
        self.logits(features, ["a photo"])


def load(path: Path, settings: Settings, warm_up: bool = True) -> ClipSegOnnxBackend:
    """Load the ONNX export of the CLIPSeg checkpoint in `path` (the int8 one when `settings.int8`)."""
    require("onnxruntime", "onnx")
    require("tokenizers", "onnx")
    import onnxruntime as ort

    artifacts = find_artifacts(path, settings.int8)
    if artifacts is None:
        raise ModelNotAvailableError(
            f"'{path}' has no usable{' int8' if settings.int8 else ''} ONNX export. "
            f"Create it with: {export_hint(path, settings.int8)}"
        )
    prep = read_preprocessing(path)
    if tuple(prep.size) != artifacts.image_size:
        raise ModelNotAvailableError(
            f"The ONNX export in '{artifacts.folder}' expects {artifacts.image_size} images but the checkpoint's "
            f"processor resizes to {prep.size}. Re-export it with: {export_hint(path, settings.int8)}"
        )
    options = session_options(settings)
    try:
        image, prompt = (
            ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for p in (artifacts.image, artifacts.prompt)
        )
    except load_errors() as exc:
        raise ModelNotAvailableError(
            f"The ONNX export in '{artifacts.folder}' could not be loaded ({exc}). "
            f"Re-export it with: {export_hint(path, settings.int8)}"
        ) from exc
    backend = ClipSegOnnxBackend(image, prompt, PromptTokenizer(artifacts), prep, name_of(path), artifacts.int8)
    if warm_up:
        backend.warm_up()
    return backend
