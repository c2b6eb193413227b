"""refine=true: CLIPSeg regions handed to SAM (tiny random CLIPSeg and SAM, loaded through the real code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from automask import models
from automask.backends.refine import RefinedBackend, refined, regions
from automask.backends.sam import find_sam_folder, load_segmenter
from automask.errors import EmptyMaskError, ModelNotAvailableError, StoppedError
from automask.pipeline import MaskGenerator
from automask.settings import Settings
from tiny_models import make_tiny_sam


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sam(tmp_path_factory.mktemp("sam"))


@pytest.fixture()
def sam_settings(settings: Settings, sam_dir: Path) -> Settings:
    """Settings whose data folder has the tiny SAM installed as the 'sam' model."""
    target = models.model_dir("sam", settings)
    shutil.copytree(sam_dir, target)
    (target / models.MARKER).write_text(json.dumps({"name": "sam", "backend": "sam", "repos": []}))
    return settings


def test_regions_boxes_peaks_and_small_specks() -> None:
    m = np.zeros((50, 60), np.float32)
    m[5:15, 10:30] = 0.6
    m[8, 12] = 0.9
    m[30:45, 40:55] = 0.7
    m[40, 50] = 0.8
    m[2, 55] = 0.95  # a one-pixel speck
    found = regions(m, 0.5, min_area=4)
    assert [(r.box, r.peak, r.area) for r in found] == [
        ((40, 30, 55, 45), (50, 40), 225),
        ((10, 5, 30, 15), (12, 8), 200),
    ]
    assert [r.score for r in found] == pytest.approx([0.8, 0.9])
    assert len(regions(m, 0.5)) == 3 and regions(m, 0.5, limit=1)[0].area == 225
    assert regions(m, 0.99) == []


def clipseg_map(gen: MaskGenerator, image: np.ndarray, prompt: str) -> np.ndarray:
    assert gen.open is not None
    return gen.open.score(gen.open.encode(image), [prompt]).maps[0]


def test_refine_is_the_union_of_sam_masks_of_the_regions(
    tiny_clipseg_dir: Path, sam_settings: Settings, coffee: np.ndarray
) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir), sam_settings)
    score_map = clipseg_map(gen, coffee, "cup")
    t = float(np.quantile(score_map, 0.8))
    result = gen.generate(coffee, "cup", threshold=t, refine=True, grow_mask=0)

    h, w = score_map.shape
    found = regions(score_map, t, max(1, round(0.0005 * h * w)))
    assert found and result.backend == "clipseg+sam"
    seg = load_segmenter(find_sam_folder(sam_settings), sam_settings)
    boxes = np.array([r.box for r in found], np.float32)
    points = np.array([[r.peak] for r in found], np.float32)
    expected = seg.segment(seg.embed(coffee), boxes=boxes, points=points).probs >= 0.5
    assert len(result.detections) == len(found)
    assert all(d.label == "cup" for d in result.detections)
    assert [d.score for d in result.detections] == pytest.approx([r.score for r in found])
    for inst, want in zip(result.instance_masks, expected, strict=True):
        assert np.array_equal(inst > 0, want)
    assert np.array_equal(result.mask > 0, expected.any(axis=0))
    plain = gen.generate(coffee, "cup", threshold=t, grow_mask=0)
    assert plain.backend == "clipseg" and not np.array_equal(plain.mask, result.mask)


def test_refine_second_request_skips_the_encoders(
    monkeypatch: pytest.MonkeyPatch, tiny_clipseg_dir: Path, sam_settings: Settings, coffee: np.ndarray
) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir), sam_settings)
    assert gen.open is not None
    t = float(np.quantile(clipseg_map(gen, coffee, "cup"), 0.8))
    calls: list[str] = []
    seg = load_segmenter(find_sam_folder(sam_settings), sam_settings)
    for name, obj in (("clipseg", gen.open), ("sam", seg)):
        method = "encode" if name == "clipseg" else "embed"
        original = getattr(obj, method)
        monkeypatch.setattr(obj, method, lambda img, _o=original, _n=name: (calls.append(_n), _o(img))[1])
    gen.generate(coffee, "cup", threshold=t, refine=True)
    gen.generate(coffee, "cup, saucer", threshold=t, refine=True)
    assert sorted(calls) == ["clipseg", "sam"]


def test_a_run_told_to_stop_stops_before_refining(
    monkeypatch: pytest.MonkeyPatch, tiny_clipseg_dir: Path, sam_settings: Settings, coffee: np.ndarray
) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir), sam_settings)
    t = float(np.quantile(clipseg_map(gen, coffee, "cup"), 0.8))
    backend = gen._refined_open()
    assert isinstance(backend, RefinedBackend)
    steps: list[str] = []
    score, segment = backend.inner.score, backend.segmenter.segment
    monkeypatch.setattr(backend.inner, "score", lambda *a, **kw: steps.append("score") or score(*a, **kw))
    monkeypatch.setattr(backend.segmenter, "segment", lambda *a, **kw: steps.append("refine") or segment(*a, **kw))
    with pytest.raises(StoppedError):  # asked after the encode, then inside the backend before refining
        gen.generate(coffee, "cup", threshold=t, refine=True, should_stop=lambda: steps == ["score"])
    assert steps == ["score"]
    gen.generate(coffee, "cup", threshold=t, refine=True, should_stop=lambda: False)
    assert steps == ["score", "score", "refine"]


def test_refine_finds_nothing(tiny_clipseg_dir: Path, sam_settings: Settings, coffee: np.ndarray) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir), sam_settings)
    result = gen.generate(coffee, "cup", threshold=1.0, refine=True)
    assert result.empty and result.detections == [] and not result.mask.any()
    with pytest.raises(EmptyMaskError):
        gen.generate(coffee, "cup", threshold=1.0, refine=True, stop_on_empty_mask=True)


def test_refine_without_sam_says_what_to_pull(tiny_clipseg_dir: Path, settings: Settings, coffee: np.ndarray) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir), settings)
    with pytest.raises(ModelNotAvailableError, match="automask models pull sam"):
        gen.generate(coffee, "cup", refine=True)


def test_sam_from_the_grounded_sam_model(settings: Settings, sam_dir: Path) -> None:
    target = models.model_dir("grounded-sam", settings) / "facebook--sam-vit-base"
    shutil.copytree(sam_dir, target)
    assert find_sam_folder(settings) == target


def test_refined_wraps_dense_backends_only(sam_settings: Settings) -> None:
    instances: Any = SimpleNamespace(name="grounded-sam", model_id="x")
    assert refined(instances, sam_settings) is instances
    dense: Any = SimpleNamespace(name="clipseg", model_id="m")
    wrapped = refined(dense, sam_settings)
    assert isinstance(wrapped, RefinedBackend) and wrapped.inner is dense and wrapped.name == "clipseg+sam"
    assert refined(dense, sam_settings) is wrapped and refined(wrapped, sam_settings) is wrapped
