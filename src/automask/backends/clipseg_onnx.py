"""CLIPSeg on ONNX Runtime: the fast CPU path, with no torch or transformers at run time.

Runs the graphs written by `automask models export` (see `clipseg_common` for the layout). Same semantics as
the torch backend (`clipseg.ClipSegBackend`): the same preprocessing, tokenisation, sigmoid and bilinear
upsampling; `encode` runs the vision encoder once per image (only up to the deepest layer the decoder reads),
`score` runs the text encoder and the decoder once for all prompts together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automask.backends.base import Scores
from automask.backends.clipseg import Preprocessing, preprocess, read_preprocessing, sigmoid, tokenize, upsample
from automask.backends.clipseg_common import OnnxArtifacts, export_hint, find_artifacts
from automask.errors import ModelNotAvailableError, require
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


class ClipSegOnnxBackend:
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
        (hidden,) = self.image_session.run(None, {"pixel_values": preprocess(image, self.prep)})
        return OnnxFeatures(hidden_states=hidden, image_size=(int(image.shape[0]), int(image.shape[1])))

    def logits(self, features: OnnxFeatures, prompts: list[str]) -> np.ndarray:
        """Decoder logits for N prompts at the model resolution: N×S×S float32 (before the sigmoid)."""
        ids, mask = tokenize(self.tokenizer, prompts)
        feeds = {"hidden_states": features.hidden_states, "input_ids": ids, "attention_mask": mask}
        (logits,) = self.prompt_session.run(None, feeds)
        return np.asarray(logits, np.float32).reshape(len(prompts), *logits.shape[-2:])

    def score(self, features: OnnxFeatures, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        """Sigmoid score maps N×H×W float32 in [0, 1] at the original image size, one per prompt.

        `min_score` is unused: every pixel of a dense map is thresholded by the pipeline.
        """
        h, w = features.image_size
        if not prompts:
            return Scores(maps=np.zeros((0, h, w), np.float32), labels=[], kind="dense", scores=np.zeros(0, np.float32))
        maps = upsample(sigmoid(self.logits(features, prompts)), (h, w))
        peaks = maps.reshape(len(prompts), -1).max(axis=1).astype(np.float32)
        return Scores(maps=maps, labels=list(prompts), kind="dense", scores=peaks)

    def warm_up(self) -> None:
        """One run of each graph, so that the first request does not pay for ONNX Runtime's lazy set-up."""
        h, w = self.prep.size
        features = self.encode(np.zeros((h, w, 3), np.uint8))
        self.logits(features, ["a photo"])


def physical_cores() -> int:
    """Physical CPU cores this process may run on (SMT siblings counted once); at least 1."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def session_options(settings: Settings) -> Any:
    """ONNX Runtime options for small CPUs: an intra-op pool of `settings.threads` (default: the physical
    cores), no inter-op parallelism, sequential execution, every graph optimisation, and no spinning: idle
    ORT threads sleep instead of busy-waiting, leaving the cores to the HTTP server and the post-processing
    between graph runs (on a busy 2-core machine this halved the end-to-end time)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


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
    errors: tuple[type[BaseException], ...] = (OSError, *_ort_errors())
    try:
        image, prompt = (
            ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for p in (artifacts.image, artifacts.prompt)
        )
    except errors as exc:
        raise ModelNotAvailableError(
            f"The ONNX export in '{artifacts.folder}' could not be loaded ({exc}). "
            f"Re-export it with: {export_hint(path, settings.int8)}"
        ) from exc
    backend = ClipSegOnnxBackend(image, prompt, PromptTokenizer(artifacts), prep, str(path), artifacts.int8)
    if warm_up:
        backend.warm_up()
    return backend


def _ort_errors() -> tuple[type[Exception], ...]:
    """The exception classes ONNX Runtime raises when it cannot load a graph (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph", "RuntimeException")
    return tuple(cls for n in names if isinstance(cls := getattr(state, n, None), type) and issubclass(cls, Exception))
