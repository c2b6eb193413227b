"""The library call end to end on a tiny random CLIPSeg loaded from a folder: sizes, prompts, every option.

Random weights give maps of no meaning, so thresholds are picked from the maps themselves (e.g. their median)
and every expectation is computed from those maps with an independent reference.
"""

from __future__ import annotations

import gc
import io
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy.ndimage import distance_transform_edt

import automask
import automask.combine
from automask import pipeline
from automask.errors import EmptyMaskError, InvalidOptionError, StoppedError
from automask.feature_cache import FeatureCache
from automask.pipeline import MaskGenerator
from automask.settings import Settings

STAGES = {"decode", "encode", "score", "postprocess", "render", "total"}


@pytest.fixture()
def gen(tiny_clipseg_dir: Path) -> MaskGenerator:
    return MaskGenerator(str(tiny_clipseg_dir))


def maps_of(gen: MaskGenerator, image: np.ndarray, prompts: list[str]) -> np.ndarray:
    """The backend's N×H×W score maps for `image`, straight from the backend (no pipeline)."""
    backend = gen.backend
    return backend.score(backend.encode(image), prompts).maps


def median_threshold(maps: np.ndarray) -> float:
    return float(np.median(maps[0]))


def selected(mask: np.ndarray) -> np.ndarray:
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 255}
    return mask == 255


def test_mask_has_the_input_size_and_is_binary(gen: MaskGenerator, coffee: np.ndarray, tiny_clipseg_dir: Path) -> None:
    t = median_threshold(maps_of(gen, coffee, ["cup"]))
    result = gen.generate(coffee, "cup", threshold=t, grow_mask=0)
    assert result.mask.shape == (400, 600) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask).tolist()) == {0, 255}  # the median threshold selects about half
    assert result.kind == "mask" and np.array_equal(result.output, result.mask)
    assert (result.width, result.height) == (600, 400)
    assert result.backend == "clipseg" and result.model == str(tiny_clipseg_dir)
    assert result.prompts == ["cup"] and not result.empty
    assert [d.label for d in result.detections] == ["cup"]


@pytest.mark.parametrize("kind", [{}, {"return_alpha": True}, {"return_mask": False}])
def test_a_results_mask_and_output_are_separate_arrays(
    gen: MaskGenerator, coffee: np.ndarray, kind: dict[str, bool]
) -> None:
    """Before: for a mask, `result.output` was `result.mask` itself, so a caller who changed the mask (to 0/1, say)
    changed the output, and the PNG `to_png` gave, too; a cut-out's or preview's output never moved with it."""
    result = gen.generate(coffee, "cup", grow_mask=0, **kind)
    output, png = result.output.copy(), result.to_png()
    result.mask[:] = 1
    assert np.array_equal(result.output, output) and result.to_png() == png
    result.output[:] = 7
    assert np.all(result.mask == 1)


def test_the_one_shot_function_equals_the_generator(
    gen: MaskGenerator, coffee: np.ndarray, tiny_clipseg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "_DEFAULT", OrderedDict())  # the generator it keeps goes with this test
    t = median_threshold(maps_of(gen, coffee, ["saucer"]))
    one_shot = automask.generate(coffee, "saucer", model=str(tiny_clipseg_dir), threshold=t, grow_mask=3)
    np.testing.assert_array_equal(one_shot.mask, gen.generate(coffee, "saucer", threshold=t, grow_mask=3).mask)


def test_the_one_shot_function_keeps_only_the_last_generators(
    settings: Settings, coffee: np.ndarray, tiny_clipseg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: one loaded generator per distinct (model, settings) was kept for ever: many settings, many models."""
    monkeypatch.setattr(pipeline, "_DEFAULT", OrderedDict())
    kept: dict[float, weakref.ref[MaskGenerator]] = {}

    def one_shot(timeout: float) -> None:
        variant = settings.model_copy(update={"fetch_timeout": timeout})
        automask.generate(coffee, "cup", model=tiny_clipseg_dir, settings=variant, grow_mask=0)
        (gen,) = [g for (_, s), g in pipeline._DEFAULT.items() if s == variant]
        assert kept.setdefault(timeout, weakref.ref(gen))() is gen  # a kept generator is reused, not reloaded

    for timeout in (1.0, 2.0, 1.0, 3.0, 1.0, 4.0, 5.0):
        one_shot(timeout)
        assert len(pipeline._DEFAULT) <= pipeline.ONE_SHOT_KEPT
    gc.collect()
    assert [t for t, ref in kept.items() if ref() is not None] == [4.0, 5.0]  # 1.0, used often, went when unused


def _exif_rotated_jpeg(image: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [6, 8])
def test_an_exif_rotated_jpeg_gets_a_mask_of_the_upright_size(
    gen: MaskGenerator, coffee: np.ndarray, orientation: int
) -> None:
    data = _exif_rotated_jpeg(coffee, orientation)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert upright.shape == (600, 400, 3)
    t = median_threshold(maps_of(gen, upright, ["cup"]))
    result = gen.generate(data, "cup", threshold=t, grow_mask=2)
    assert result.mask.shape == (600, 400)
    np.testing.assert_array_equal(result.mask, gen.generate(upright, "cup", threshold=t, grow_mask=2).mask)


@pytest.mark.parametrize("grow", [0, 10])
@pytest.mark.parametrize("prompt", ["cup, spoon", "cup . spoon", "cup,spoon,cup"])
def test_several_prompts_select_the_union(gen: MaskGenerator, coffee: np.ndarray, prompt: str, grow: int) -> None:
    t = median_threshold(maps_of(gen, coffee, ["cup"]))
    both = gen.generate(coffee, prompt, threshold=t, grow_mask=grow)
    cup = selected(gen.generate(coffee, "cup", threshold=t, grow_mask=grow).mask)
    spoon = selected(gen.generate(coffee, "spoon", threshold=t, grow_mask=grow).mask)
    assert both.prompts == ["cup", "spoon"]
    assert not np.array_equal(cup, spoon)  # so the union is not trivially one of them
    np.testing.assert_array_equal(selected(both.mask), cup | spoon)


def test_the_image_is_encoded_once_for_all_prompts(
    gen: MaskGenerator, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend: Any = gen.backend
    calls: dict[str, list[Any]] = {"encode": [], "score": []}
    encode, score = backend.encode, backend.score

    def counting_encode(image: np.ndarray) -> Any:
        calls["encode"].append(image.shape)
        return encode(image)

    def counting_score(features: Any, prompts: list[str], **kw: Any) -> Any:
        calls["score"].append(list(prompts))
        return score(features, prompts, **kw)

    monkeypatch.setattr(backend, "encode", counting_encode)
    monkeypatch.setattr(backend, "score", counting_score)
    result = gen.generate(coffee, "cup, spoon, table")
    assert calls == {"encode": [(400, 600, 3)], "score": [["cup", "spoon", "table"]]}
    assert result.timings["encode"] > 0
    gen.generate(coffee, "saucer")  # the same image again: its features are reused
    assert len(calls["encode"]) == 1 and calls["score"][-1] == ["saucer"]


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4])
def test_a_run_told_to_stop_raises_at_the_next_stage_boundary(
    gen: MaskGenerator, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch, stop_after: int
) -> None:
    """`should_stop` is asked after decoding, after the encode, after the score and before rendering: the first True
    raises `StoppedError` there, and no later stage runs."""
    backend: Any = gen.backend
    stages: list[str] = []
    encode, score = backend.encode, backend.score
    monkeypatch.setattr(backend, "encode", lambda image: stages.append("encode") or encode(image))
    monkeypatch.setattr(backend, "score", lambda f, p, **kw: stages.append("score") or score(f, p, **kw))
    render = automask.combine.pp.render
    monkeypatch.setattr(automask.combine.pp, "render", lambda *a: stages.append("render") or render(*a))
    asked: list[list[str]] = []

    def should_stop() -> bool:
        asked.append(list(stages))
        return len(asked) >= stop_after

    with pytest.raises(StoppedError):
        gen.generate(coffee, "cup", should_stop=should_stop)
    ran = [[], ["encode"], ["encode", "score"], ["encode", "score"]][stop_after - 1]
    assert asked[-1] == stages == ran  # it stopped at the boundary it was told to: nothing ran after it
    gen.cache = FeatureCache()  # no features kept: the next run encodes again
    never = gen.generate(coffee, "cup", should_stop=lambda: False)
    assert never.mask.shape == (400, 600) and stages[len(ran) :] == ["encode", "score", "render"]


def test_threshold_selects_the_pixels_scoring_at_least_it(gen: MaskGenerator, coffee: np.ndarray) -> None:
    maps = maps_of(gen, coffee, ["cup", "spoon"])
    qs = [0.0, *np.quantile(maps, [0.1, 0.5, 0.9]).tolist(), 1.0]
    counts = []
    for t in qs:
        sel = selected(gen.generate(coffee, "cup, spoon", threshold=t, grow_mask=0).mask)
        np.testing.assert_array_equal(sel, (maps >= t).any(axis=0))
        counts.append(int(sel.sum()))
    assert counts[0] == 400 * 600  # 0 selects everything
    assert counts[-1] <= 0.001 * 400 * 600  # 1 selects (almost) nothing
    assert counts == sorted(counts, reverse=True) and counts[1] > counts[2] > counts[3]


@pytest.mark.parametrize("grow", [1, 5, 23, 100])
def test_grow_mask_is_a_euclidean_radius_in_original_pixels(gen: MaskGenerator, coffee: np.ndarray, grow: int) -> None:
    maps = maps_of(gen, coffee, ["cup"])
    t = float(np.quantile(maps, 0.97))  # a sparse selection, so growing it shows
    base = maps[0] >= t
    expected = distance_transform_edt(~base) <= grow
    got = selected(gen.generate(coffee, "cup", threshold=t, grow_mask=grow).mask)
    assert got.sum() > base.sum()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("grow", [0, 7])
def test_invert_mask_is_the_exact_inverse_after_growing(gen: MaskGenerator, coffee: np.ndarray, grow: int) -> None:
    t = median_threshold(maps_of(gen, coffee, ["cup"]))
    plain = gen.generate(coffee, "cup", threshold=t, grow_mask=grow).mask
    inverted = gen.generate(coffee, "cup", threshold=t, grow_mask=grow, invert_mask=True).mask
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_preview_tints_exactly_the_selected_pixels(gen: MaskGenerator, coffee: np.ndarray) -> None:
    t = median_threshold(maps_of(gen, coffee, ["cup"]))
    result = gen.generate(coffee, "cup", threshold=t, grow_mask=4, return_mask=False)
    assert result.kind == "preview"
    assert result.output.shape == (400, 600, 3) and result.output.dtype == np.uint8
    changed = (result.output != coffee).any(axis=2)
    np.testing.assert_array_equal(changed, selected(result.mask))
    assert result.image.mode == "RGB"


@pytest.mark.parametrize("return_mask", [True, False])
def test_return_alpha_is_a_cut_out(gen: MaskGenerator, coffee: np.ndarray, return_mask: bool) -> None:
    t = median_threshold(maps_of(gen, coffee, ["cup"]))
    result = gen.generate(coffee, "cup", threshold=t, return_alpha=True, return_mask=return_mask)
    assert result.kind == "alpha" and result.output.shape == (400, 600, 4) and result.output.dtype == np.uint8
    np.testing.assert_array_equal(result.output[..., :3], coffee)
    np.testing.assert_array_equal(result.output[..., 3], result.mask)
    assert result.image.mode == "RGBA"


def test_a_cut_out_keeps_the_images_transparency_and_the_models_see_it_on_white(
    gen: MaskGenerator, coffee: np.ndarray
) -> None:
    """A PNG with transparency: the cut-out's alpha is mask · a / 255 over the stored colours; the mask itself is
    that of the image composited onto white (as a viewer shows it, and as every other output kind sees it)."""
    rgba = np.dstack([coffee, np.zeros(coffee.shape[:2], np.uint8)])
    rgba[:, :300, 3] = 255  # left half opaque, right half fully transparent
    rgba[:200, 300:, 3] = 128  # top right half-transparent
    png = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(png, format="PNG")
    flat = automask.imageio.pixels.composite_on_white(rgba)
    t = median_threshold(maps_of(gen, flat, ["cup"]))
    cut = gen.generate(png.getvalue(), "cup", threshold=t, return_alpha=True)
    assert np.array_equal(cut.mask, gen.generate(flat, "cup", threshold=t).mask)
    assert cut.output.shape == (400, 600, 4) and np.array_equal(cut.output[..., :3], coffee)
    expected = (cut.mask.astype(np.uint16) * rgba[..., 3] + 127) // 255
    assert np.array_equal(cut.output[..., 3], expected) and cut.output[:, 300:][200:, :, 3].max() == 0
    assert cut.mask[:, :300].any()  # the opaque half keeps the mask's selection as alpha
    assert gen.generate(png.getvalue(), "cup", threshold=t).output.ndim == 2  # other kinds are unchanged


def test_stop_on_empty_mask(gen: MaskGenerator, coffee: np.ndarray) -> None:
    assert maps_of(gen, coffee, ["cup"]).max() < 1.0  # so threshold 1.0 selects nothing
    with pytest.raises(EmptyMaskError, match="cup"):
        gen.generate(coffee, "cup", threshold=1.0, stop_on_empty_mask=True)
    empty = gen.generate(coffee, "cup", threshold=1.0)  # without the flag: an all-black mask
    assert empty.empty and not empty.mask.any() and empty.detections == []
    inverted = gen.generate(coffee, "cup", threshold=1.0, invert_mask=True)  # empty before invert
    assert inverted.empty and (inverted.mask == 255).all()
    found = gen.generate(coffee, "cup", threshold=0.0, stop_on_empty_mask=True)
    assert not found.empty and found.mask.all()


def test_seed_is_echoed_and_changes_nothing(gen: MaskGenerator, coffee: np.ndarray) -> None:
    a = gen.generate(coffee, "cup", seed=123456789)
    b = gen.generate(coffee, "cup", seed=-1)
    assert a.seed == 123456789 and a.metadata()["seed"] == 123456789 and b.seed == -1
    np.testing.assert_array_equal(a.mask, b.mask)


def test_timings_are_present(gen: MaskGenerator, coffee: np.ndarray) -> None:
    result = gen.generate(coffee, "cup")
    assert set(result.timings) >= STAGES
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= max(v for k, v in result.timings.items() if k != "total")
    assert set(result.metadata()["timings"]) >= STAGES


@pytest.mark.parametrize(
    ("prompt", "options", "field"),
    [
        ("cup", {"threshold": 1.5}, "threshold"),
        ("cup", {"threshold": -0.1}, "threshold"),
        ("cup", {"threshold": "0.5"}, "threshold"),
        ("cup", {"grow_mask": 101}, "grow_mask"),
        ("cup", {"grow_mask": 2.5}, "grow_mask"),
        ("cup", {"seed": -2}, "seed"),
        ("cup", {"invert_mask": "yes"}, "invert_mask"),
        ("cup", {"strength": 1}, "strength"),
        ("  ", {}, "prompt"),
        (" , ", {}, "prompt"),
    ],
)
def test_invalid_options_name_the_field(
    gen: MaskGenerator,
    coffee: np.ndarray,
    prompt: str,
    options: dict[str, Any],
    field: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "_DEFAULT", OrderedDict())  # the generator it keeps goes with this test
    with pytest.raises(InvalidOptionError) as err:
        gen.generate(coffee, prompt, **options)
    assert err.value.field == field and field in str(err.value)
    with pytest.raises(InvalidOptionError):
        automask.generate(coffee, prompt, model=gen.backend.model_id, **options)
