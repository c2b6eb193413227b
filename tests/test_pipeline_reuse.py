"""Work the pipeline does once, not per backend or per request: hashing the image, finding SAM for refine."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from automask import pipeline
from automask.backends import refine
from automask.backends.base import Backend, Scores
from automask.errors import ModelNotAvailableError
from automask.pipeline import MaskGenerator


class FakeSubject:
    """Stands in for the embedded model: the subject probability is the image's red channel / 255."""

    name = "subject"
    model_id = "fake-subject"

    def encode(self, image: np.ndarray) -> np.ndarray:
        return image[..., 0].astype(np.float32) / 255

    def score(self, features: np.ndarray, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        maps = np.stack([1 - features if p == "background" else features for p in prompts])  # as SubjectBackend
        return Scores(maps=maps, labels=list(prompts), scores=maps.reshape(len(prompts), -1).max(1))


def test_the_image_is_hashed_once_per_request_for_every_backend(
    tiny_clipseg_dir: Path, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir))
    gen.embedded = FakeSubject()
    digests: list[bytes] = []
    real = pipeline.image_digest
    monkeypatch.setattr(pipeline, "image_digest", lambda image: digests.append(real(image)) or digests[-1])
    result = gen.generate(coffee, "cup, subject, background", threshold=0.5, grow_mask=0)
    assert len(digests) == 1  # three scoring calls (cup; subject; background), one hash
    assert result.backend == "clipseg+subject"
    red = coffee[..., 0] / 255 >= 0.5
    masks = {d.label: m for d, m in zip(result.detections, result.instance_masks, strict=True)}
    np.testing.assert_array_equal(masks["subject"] == 255, red)
    np.testing.assert_array_equal(masks["background"] == 255, ~red)
    gen.generate(coffee.copy(), "subject", threshold=0.5)
    assert len(digests) == 2 and digests[0] == digests[1]  # the same pixels give the same key


def test_refine_finds_and_wraps_sam_once_per_generator(
    tiny_clipseg_dir: Path, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir))
    calls: list[Backend] = []

    def no_sam(backend: Backend, settings: Any) -> Backend:
        calls.append(backend)
        raise ModelNotAvailableError("refine needs SAM weights: automask models pull sam")

    monkeypatch.setattr(refine, "refined", no_sam)
    for _ in range(2):  # not installed: looked for again on every request
        with pytest.raises(ModelNotAvailableError, match="pull sam"):
            gen.generate(coffee, "cup", refine=True)
    assert len(calls) == 2

    def found(backend: Backend, settings: Any) -> Backend:
        calls.append(backend)
        return backend

    monkeypatch.setattr(refine, "refined", found)
    for _ in range(3):
        gen.generate(coffee, "cup", refine=True)
    assert calls[2:] == [gen.open]  # found once, then kept


def test_the_feature_cache_keeps_a_byte_budget() -> None:
    """A few 36-megapixel feature maps (145 MB each) must not pile up: the cache drops the oldest past its budget
    and never keeps an entry larger than the whole budget."""
    from automask.feature_cache import FeatureCache, nbytes

    cache = FeatureCache(max_items=4, max_bytes=1000)
    arrays = {name: np.zeros(n, np.uint8) for name, n in (("a", 400), ("b", 400), ("c", 400), ("huge", 1001))}
    for name in ("a", "b"):
        cache.put((name, b""), arrays[name])
    assert cache.get(("a", b"")) is arrays["a"]  # a is now the most recently used
    cache.put(("c", b""), arrays["c"])  # 1200 bytes: b, the least recently used, goes
    assert cache.get(("b", b"")) is None and cache.get(("a", b"")) is arrays["a"] and cache.get(("c", b"")) is not None
    cache.put(("huge", b""), arrays["huge"])
    assert cache.get(("huge", b"")) is None and cache.get(("a", b"")) is not None
    nested = SimpleNamespace(activations=(np.zeros(10, np.float32), np.zeros(5, np.float32)), image_size=(2, 3))
    assert nbytes(nested) == 60 and nbytes(np.zeros((2, 2), np.float64)) == 32
