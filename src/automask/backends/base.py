"""The backend protocol: a backend turns a decoded image and target prompts into scores, nothing more.

Backends know nothing of HTTP, files, base64, thresholds, growing or rendering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np


class LazyMaps:
    """N×H×W float32 maps made one at a time when read (`one`). Reads like the array they stand for: `shape`,
    `ndim`, `len`, iteration, `maps[i]`, `maps[index_array]` (a subset, still lazy: `subset`), `np.asarray(maps)`
    (all at once: `whole`). Anything else (arithmetic, comparisons, `.max()`, `.reshape()`...) works on the whole
    array, made at once: convenient for callers that want the array, at the memory cost the class exists to avoid."""

    dtype = np.dtype(np.float32)
    ndim = 3
    shape: tuple[int, int, int]

    def one(self, i: int) -> np.ndarray:
        """Map `i` (H×W float32)."""
        raise NotImplementedError

    def subset(self, index: Any) -> LazyMaps:
        """The maps `index` (a slice or an index array) selects, still lazy."""
        raise NotImplementedError

    def whole(self) -> np.ndarray:
        """All the maps as one N×H×W array."""
        return np.stack([self.one(i) for i in range(len(self))]) if len(self) else np.zeros(self.shape, np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.one(i) for i in range(len(self)))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            return self.one(int(index))
        return self.subset(index)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.whole()
        return out if dtype is None else out.astype(dtype)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        args = [np.asarray(x) if isinstance(x, LazyMaps) else x for x in inputs]
        return getattr(ufunc, method)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(np.asarray(self), name)

    def __sub__(self, other: Any) -> Any:
        return np.subtract(np.asarray(self), other)

    def __rsub__(self, other: Any) -> Any:
        return np.subtract(other, np.asarray(self))

    def __ge__(self, other: Any) -> Any:
        return np.greater_equal(np.asarray(self), other)

    def __lt__(self, other: Any) -> Any:
        return np.less(np.asarray(self), other)


@dataclass(frozen=True)
class Scores:
    """What a backend returns for one image and N targets (or N detected instances).

    maps:   N×H×W float32 in [0, 1], in original-image pixel coordinates (H, W of the input image): an array, or
            an array-like that makes each map on demand (a `LazyMaps`: read it by iterating or indexing, one map at
            a time, to keep memory to one full-size map).
    labels: N target or instance labels.
    kind:   "dense"     - a pixel of map i is selected iff maps[i] >= threshold (CLIPSeg-like score maps);
            "instances" - instance i is kept iff scores[i] >= threshold, and then its pixels with
                          maps[i] >= 0.5 are selected (detector + segmenter, e.g. Grounded-SAM).
    scores: N float32 confidences (for "dense", the peak of each map).
    boxes:  N×4 float32 boxes XYXY in original pixels, or None when the backend has no boxes.
    """

    maps: np.ndarray
    labels: list[str]
    kind: Literal["dense", "instances"] = "dense"
    scores: np.ndarray | None = None
    boxes: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.maps.ndim != 3 or self.maps.shape[0] != len(self.labels):
            raise ValueError(f"maps must be N×H×W with N={len(self.labels)}, got {self.maps.shape}")


@dataclass(frozen=True)
class ScoreParams:
    """Per-request scoring knobs beyond `min_score`, for backends that declare `takes_params = True`.

    text_threshold: detector backends (grounded-sam): a detection is credited to a prompt only if one of that
                    prompt's words scores above it (GroundingDINO's text threshold).
    should_stop:    asked at the backend's own stage boundaries (between detector and mask head, before each
                    target...): True raises `StoppedError` there (`automask.errors.stop_if_asked`); None: never.
                    Inside a model stage, the run's check is asked by the model's layers (`automask.stopping`).
    """

    text_threshold: float = 0.25
    should_stop: Callable[[], bool] | None = None


@runtime_checkable
class Backend(Protocol):
    """A loaded model. `encode` once per image, then `score` any number of prompt lists against it."""

    name: str
    """Backend id, e.g. 'clipseg'."""

    model_id: str
    """What was loaded: a hub name or a local folder."""

    def encode(self, image: np.ndarray) -> Any:
        """Encode an H×W×3 uint8 RGB image; the result is opaque and passed back to `score`."""
        ...

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        """Score `prompts` against encoded image features.

        `min_score` is a hint: instances scoring below it may be dropped early to save work; the pipeline
        still applies the threshold itself. Maps are at the original image size.
        """
        ...


def score_with(backend: Backend, features: Any, prompts: list[str], min_score: float, params: ScoreParams) -> Scores:
    """`backend.score(...)`, passing `params` to backends whose class sets `takes_params = True` (their `score`
    accepts a keyword `params: ScoreParams`); other backends get `min_score` only."""
    if getattr(backend, "takes_params", False):
        return backend.score(features, prompts, min_score=min_score, params=params)  # type: ignore[call-arg]
    return backend.score(features, prompts, min_score=min_score)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Element-wise logistic function of an array of logits, float32 in [0, 1] (very negative x gives 0: the
    overflow of exp to inf is expected and not warned about)."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)
