"""The mask controls (automask extensions): negative_prompt, fill_holes, min_area and feather.

The pure functions are checked against scipy (`binary_fill_holes`, `label`, `distance_transform_edt`, `convolve`),
the pipeline's order of operations (score -> threshold -> negative -> fill_holes -> min_area -> grow -> invert ->
feather -> render) against a chain of those references, then the options' validation, the CLI flags and the HTTP
fields (test_mask_controls_http.py; test_server_sdk.py for the official SDK, which sends none of them).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage, signal

from automask import MaskGenerator, MaskResult
from automask import postprocess as pp
from automask.backends.base import Scores
from automask.cli import main
from automask.errors import EmptyMaskError, InvalidOptionError
from automask.options import FEATHER_MAX, MIN_AREA_MAX, MaskOptions, parse_prompt

H, W = 48, 64
EIGHT = np.ones((3, 3), dtype=bool)
"""scipy's structuring element for 8-connected regions."""


def blobs(seed: int, shape: tuple[int, int] = (H, W), sigma: float = 2.0, share: float = 0.45) -> np.ndarray:
    """H×W bool: smoothed noise above a quantile: blobs of many sizes, with holes and specks."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return noise > np.quantile(noise, 1.0 - share)


# -- fill_holes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_fill_holes_equals_scipy_binary_fill_holes(seed: int) -> None:
    mask = blobs(seed, share=0.55)
    np.testing.assert_array_equal(pp.fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_fill_holes_hand_cases() -> None:
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False  # a 3×3 hole
    assert pp.fill_holes(ring)[1:8, 1:8].all() and not pp.fill_holes(ring)[0].any()
    bay = ring.copy()
    bay[4, 6:8] = False  # the hole opens to the outside ring of unselected pixels: not a hole
    np.testing.assert_array_equal(pp.fill_holes(bay), bay)
    corner = np.zeros((6, 6), bool)
    corner[0:3, 0:3] = True
    corner[0:2, 0:2] = False  # unselected pixels touching the image border: not a hole
    np.testing.assert_array_equal(pp.fill_holes(corner), corner)
    diagonal = np.zeros((5, 5), bool)  # a diamond: the centre touches the outside only at corners -> a hole
    diagonal[1, 2] = diagonal[2, 1] = diagonal[2, 3] = diagonal[3, 2] = True
    assert pp.fill_holes(diagonal)[2, 2]
    for mask in (ring, bay, corner, diagonal, np.zeros((4, 4), bool), np.ones((4, 4), bool)):
        np.testing.assert_array_equal(pp.fill_holes(mask), ndimage.binary_fill_holes(mask))


# -- min_area ----------------------------------------------------------------------------------------


def drop_small_reference(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The 8-connected regions (scipy.ndimage.label) of at least `min_area` pixels."""
    labels, _ = ndimage.label(mask, structure=EIGHT)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


@pytest.mark.parametrize("min_area", [0, 1, 2, 3, 8, 30, 200, MIN_AREA_MAX])
def test_drop_small_equals_a_scipy_label_reference(min_area: int) -> None:
    for seed in range(6):
        mask = blobs(seed, sigma=1.2, share=0.3)
        got = pp.drop_small(mask, min_area)
        assert got.dtype == bool and got.shape == mask.shape
        np.testing.assert_array_equal(got, drop_small_reference(mask, min_area) if min_area else mask)


def test_drop_small_has_cases_of_every_kind_and_counts_diagonal_neighbours_as_one_region() -> None:
    sizes = [
        np.bincount(ndimage.label(blobs(s, sigma=1.2, share=0.3), structure=EIGHT)[0].ravel())[1:] for s in range(6)
    ]
    all_sizes = np.concatenate(sizes)
    assert (all_sizes < 8).any() and (all_sizes >= 30).any()  # the test above drops some regions and keeps others
    pair = np.zeros((5, 5), bool)
    pair[1, 1] = pair[2, 2] = True  # touching at a corner: one region of 2 pixels
    np.testing.assert_array_equal(pp.drop_small(pair, 2), pair)
    assert not pp.drop_small(pair, 3).any()


# -- feather -----------------------------------------------------------------------------------------


def feather_reference(mask: np.ndarray, radius: int) -> np.ndarray:
    """The documented definition, built independently: a Gaussian of sigma radius/2 on the disk of `radius`,
    normalised, convolved (FFT) with the mask extended by repeating its border pixels, rounded."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    d2 = x * x + y * y
    kernel = np.where(d2 <= radius * radius, np.exp(-d2 / (2 * (radius / 2) ** 2)), 0.0)
    padded = np.pad(mask / 255.0, radius, mode="edge")
    soft = signal.fftconvolve(padded, kernel / kernel.sum(), mode="valid")
    return np.clip(np.rint(soft * 255), 0, 255).astype(np.uint8)


def feather_case(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(H×W uint8 mask, H×W bool shapes), sized to `radius`: a disk with a far interior and a block on the image
    border (the shapes), a 1-pixel line and a 1-pixel speck."""
    r = radius
    h, w = 6 * r + 24, 8 * r + 24
    y, x = np.mgrid[:h, :w]
    shapes = (y - (3 * r + 12)) ** 2 + (x - (2 * r + 12)) ** 2 <= (2 * r + 4) ** 2
    shapes |= (y < 2 * r + 4) & (x >= w - 2 * r - 4)  # touches the top and right borders
    sel = shapes.copy()
    sel[h - 3, : w // 2] = True
    sel[h // 2, w - r - 6] = True
    return pp.to_uint8(sel), shapes


@pytest.mark.parametrize("radius", [1, 2, 5, 12, FEATHER_MAX])
def test_feather_is_the_truncated_gaussian_and_leaves_far_pixels_hard(radius: int) -> None:
    mask, shapes = feather_case(radius)
    assert (ndimage.distance_transform_edt(mask == 255) > radius).any()  # the disk has pixels that must stay 255
    check_feather(mask, radius, None if radius <= 12 else shapes)
    if radius <= 5:
        check_feather(pp.to_uint8(blobs(radius, sigma=2.0)), radius)


def check_feather(mask: np.ndarray, radius: int, shapes: np.ndarray | None = None) -> None:
    """Equal to the reference; pixels farther than `radius` from the other value exact; the pixels on either side
    of the edge soft (of `shapes` only, when given: at large radii a 1-pixel speck fades to 0, as under any blur)."""
    got = pp.feather(mask, radius)
    assert got.dtype == np.uint8 and got.shape == mask.shape
    assert np.abs(got.astype(int) - feather_reference(mask, radius)).max() <= 1
    inside_far = ndimage.distance_transform_edt(mask == 255) > radius  # distance to the nearest unselected pixel
    outside_far = ndimage.distance_transform_edt(mask == 0) > radius
    assert outside_far.any()
    assert (got[inside_far] == 255).all() and (got[outside_far] == 0).all()
    edge = (mask == 255) != ndimage.binary_erosion(mask == 255, border_value=1)  # selected, beside unselected
    edge |= (mask == 0) != ndimage.binary_erosion(mask == 0, border_value=1)
    if shapes is not None:
        edge &= ndimage.binary_dilation(shapes, EIGHT, iterations=2)
    assert edge.any() and ((got[edge] > 0) & (got[edge] < 255)).all()
    soft = (got > 0) & (got < 255)
    assert not (soft & (inside_far | outside_far)).any()


def test_feather_commutes_with_invert_and_keeps_uniform_masks() -> None:
    mask = pp.to_uint8(blobs(3))
    a, b = pp.feather(255 - mask, 6).astype(int), 255 - pp.feather(mask, 6).astype(int)
    assert np.abs(a - b).max() <= 1
    for value in (0, 255):
        flat = np.full((20, 30), value, np.uint8)
        np.testing.assert_array_equal(pp.feather(flat, 10), flat)
    np.testing.assert_array_equal(pp.feather(mask, 0), mask)


def test_preview_of_a_hard_mask_is_as_before_and_a_soft_mask_blends_in_proportion() -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    hard = pp.to_uint8(blobs(1))
    before = image.astype(np.float32)  # the preview's formula before soft masks existed
    sel = hard > 0
    before[sel] = (
        before[sel] * (1.0 - pp.PREVIEW_OPACITY) + np.asarray(pp.PREVIEW_TINT, np.float32) * pp.PREVIEW_OPACITY
    )
    np.testing.assert_array_equal(pp.render_preview(image, hard), np.rint(before).astype(np.uint8))
    soft = rng.integers(0, 256, (H, W), dtype=np.uint8)
    weight = soft[..., None] / 255.0 * pp.PREVIEW_OPACITY
    expected = image * (1 - weight) + np.asarray(pp.PREVIEW_TINT) * weight
    assert np.abs(pp.render_preview(image, soft).astype(float) - expected).max() <= 0.51


# -- the pipeline, on scripted backends -------------------------------------------------------------


class MapBackend:
    """A dense backend with fixed maps per label (unknown labels: zeros); records each score call's prompts."""

    name = "maps"
    model_id = "fixed-maps"

    def __init__(self, maps: dict[str, np.ndarray]) -> None:
        self.maps = maps
        self.calls: list[list[str]] = []

    def encode(self, image: np.ndarray) -> tuple[int, int]:
        return (int(image.shape[0]), int(image.shape[1]))

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        self.calls.append(list(prompts))
        maps = np.stack([self.maps.get(p, np.zeros(features, np.float32)) for p in prompts]).astype(np.float32)
        return Scores(maps=maps, labels=list(prompts), scores=maps.reshape(len(prompts), -1).max(1))


class InstanceBackend:
    """An instance backend: fixed (label, confidence, H×W bool mask) instances; a call returns those of its prompts."""

    name = "instances"
    model_id = "fixed-instances"

    def __init__(self, instances: list[tuple[str, float, np.ndarray]]) -> None:
        self.instances = instances

    def encode(self, image: np.ndarray) -> None:
        return None

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        found = [i for i in self.instances if i[0] in prompts]
        return Scores(
            maps=np.stack([m.astype(np.float32) for _, _, m in found]) if found else np.zeros((0, H, W), np.float32),
            labels=[label for label, _, _ in found],
            kind="instances",
            scores=np.array([s for _, s, _ in found], np.float32),
        )


BLACK = np.zeros((H, W, 3), np.uint8)


def random_maps(*labels: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(labels))
    return {label: ndimage.gaussian_filter(rng.random((H, W)), 2.5).astype(np.float32) for label in labels}


@pytest.mark.parametrize("grow", [0, 10])
def test_a_negative_equal_to_the_prompt_gives_an_empty_mask(grow: int) -> None:
    gen = MaskGenerator(MapBackend(random_maps("sofa", "lamp")))
    full = gen.generate(BLACK, "sofa, lamp", threshold=0.0, grow_mask=grow)
    assert full.mask.all()
    result = gen.generate(BLACK, "sofa, lamp", threshold=0.0, grow_mask=grow, negative_prompt="lamp . sofa")
    assert not result.mask.any() and result.empty
    assert gen.generate(BLACK, "sofa", negative_prompt="sofa", invert_mask=True).mask.all()
    with pytest.raises(EmptyMaskError, match="negative_prompt 'sofa'"):
        gen.generate(BLACK, "sofa", threshold=0.0, negative_prompt="sofa", stop_on_empty_mask=True)


def test_a_negative_equal_to_the_prompt_gives_an_empty_mask_on_a_real_model(
    tiny_clipseg_dir: Path, coffee: np.ndarray
) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir))
    assert gen.generate(coffee, "cup, saucer", threshold=0.0, grow_mask=0).mask.all()
    assert not gen.generate(coffee, "cup, saucer", threshold=0.0, negative_prompt="saucer, cup").mask.any()


def test_negative_targets_are_scored_in_the_same_call_and_removed_at_the_threshold(
    tiny_clipseg_dir: Path, coffee: np.ndarray
) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir))
    backend = gen.backend
    maps = backend.score(backend.encode(coffee), ["cup", "table"]).maps
    t = float(np.median(maps))
    result = gen.generate(coffee, "cup", negative_prompt="table", threshold=t, grow_mask=0)
    expected = (maps[0] >= t) & ~(maps[1] >= t)
    assert expected.any() and ((maps[0] >= t) & (maps[1] >= t)).any()  # the negative removes some, not all
    np.testing.assert_array_equal(result.mask == 255, expected)
    assert [d.label for d in result.detections] == ["cup"] and result.negative_prompts == ["table"]
    scripted = MapBackend(random_maps("cup", "table"))
    MaskGenerator(scripted).generate(BLACK, "cup", negative_prompt="table, cup, table")
    assert scripted.calls == [["cup", "table"]]  # one call, each target once


def test_negative_instances_remove_the_pixels_of_their_instances_that_pass_the_threshold() -> None:
    def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        m = np.zeros((H, W), bool)
        m[y0:y1, x0:x1] = True
        return m

    person, hat, faint_hat = box(5, 45, 10, 40), box(2, 15, 15, 35), box(30, 40, 20, 30)
    backend = InstanceBackend([("person", 0.9, person), ("hat", 0.8, hat), ("hat", 0.1, faint_hat)])
    result = MaskGenerator(backend).generate(BLACK, "person", negative_prompt="hat", threshold=0.5, grow_mask=0)
    np.testing.assert_array_equal(result.mask == 255, person & ~hat)
    assert [d.label for d in result.detections] == ["person"]
    low = MaskGenerator(backend).generate(BLACK, "person", negative_prompt="hat", threshold=0.05, grow_mask=0)
    np.testing.assert_array_equal(low.mask == 255, person & ~hat & ~faint_hat)


def reference_chain(prompt: np.ndarray, negative: np.ndarray, t: float, opts: dict[str, Any]) -> np.ndarray:
    """The documented order, from scipy references: threshold, negative, fill, min_area, grow, invert, feather."""
    sel = (prompt >= t) & ~(negative >= t)
    if opts["fill_holes"]:
        sel = ndimage.binary_fill_holes(sel)
    if opts["min_area"]:
        sel = drop_small_reference(sel, opts["min_area"])
    sel = ndimage.distance_transform_edt(~sel) <= opts["grow_mask"] if sel.any() else sel
    if opts["invert_mask"]:
        sel = ~sel
    mask = np.where(sel, 255, 0).astype(np.uint8)
    return feather_reference(mask, opts["feather"]) if opts["feather"] else mask


def designed_maps() -> tuple[np.ndarray, np.ndarray]:
    """H×W prompt and negative maps (1.0 / 0.9 where they select at threshold 0.5) where every step matters:
    a ring with a hole (fill_holes), a ring whose hole the negative opens to the outside (negative before
    fill_holes), a block the negative cuts into two small pieces (negative before min_area), a speck (min_area)."""
    a = np.zeros((H, W), np.float32)
    b = np.zeros((H, W), np.float32)
    a[2:20, 2:20] = 1.0
    a[8:14, 8:14] = 0.0  # ring 1's hole
    a[2:20, 24:42] = 1.0
    a[8:14, 30:36] = 0.0  # ring 2's hole ...
    b[10:12, 34:42] = 0.9  # ... opened by the negative
    a[26:32, 12:24] = 1.0  # 72 pixels ...
    b[26:32, 17:19] = 0.9  # ... cut into two of 30
    a[30:32, 4:6] = 1.0  # a speck of 4
    a[34:46, 30:60] = 1.0  # a block of 360
    return a, b


@pytest.mark.parametrize(
    "opts",
    [
        {"fill_holes": True, "min_area": 40, "grow_mask": 2, "invert_mask": False, "feather": 3},
        {"fill_holes": True, "min_area": 40, "grow_mask": 0, "invert_mask": True, "feather": 5},
        {"fill_holes": True, "min_area": 10, "grow_mask": 1, "invert_mask": True, "feather": 0},
    ],
)
def test_the_order_of_operations_equals_a_chain_of_references(opts: dict[str, Any]) -> None:
    a, b = designed_maps()
    result = MaskGenerator(MapBackend({"a": a, "b": b})).generate(
        BLACK, "a", negative_prompt="b", threshold=0.5, **opts
    )
    expected = reference_chain(a, b, 0.5, opts)
    assert np.abs(result.mask.astype(int) - expected).max() <= 1
    assert result.fill_holes and result.min_area == opts["min_area"] and result.feather == opts["feather"]
    for changed in ({"fill_holes": False}, {"min_area": 0}):  # each step changes the result
        assert np.abs(result.mask.astype(int) - reference_chain(a, b, 0.5, {**opts, **changed})).max() > 1
    assert np.abs(result.mask.astype(int) - reference_chain(a, 0 * b, 0.5, opts)).max() > 1
    # the negative comes before fill_holes and min_area: removing it last gives another mask
    late = reference_chain(a, 0 * b, 0.5, {**opts, "grow_mask": 0, "invert_mask": False, "feather": 0}) > 0
    late &= ~(b >= 0.5)
    assert (late != reference_chain(a, b, 0.5, {**opts, "grow_mask": 0, "invert_mask": False, "feather": 0})).any()


def test_defaults_and_no_op_values_change_nothing() -> None:
    gen = MaskGenerator(MapBackend(random_maps("a", "b")))
    base = gen.generate(BLACK, "a", threshold=0.5)
    assert gen.generate(BLACK, "a", threshold=0.5, min_area=1).to_png() == base.to_png()
    for extra in ({"negative_prompt": None}, {"negative_prompt": " , . "}, {"min_area": 0}, {"feather": 0}):
        same = gen.generate(BLACK, "a", threshold=0.5, fill_holes=False, **extra)
        assert same.to_png() == base.to_png()
        meta = {k: v for k, v in same.metadata().items() if k != "timings"}
        assert meta == {k: v for k, v in base.metadata().items() if k != "timings"}
    assert not {"negative_prompts", "fill_holes", "min_area", "feather"} & set(base.metadata())
    used = gen.generate(BLACK, "a", negative_prompt="b", fill_holes=True, min_area=5, feather=2).metadata()
    assert (used["negative_prompts"], used["fill_holes"], used["min_area"], used["feather"]) == (["b"], True, 5, 2)


def test_feathered_mask_cut_out_and_preview() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gen = MaskGenerator(MapBackend({"a": blobs(5).astype(np.float32)}))
    opts: dict[str, Any] = {"threshold": 0.5, "grow_mask": 1, "feather": 4}
    mask = gen.generate(image, "a", **opts).mask
    hard = gen.generate(image, "a", threshold=0.5, grow_mask=1).mask
    np.testing.assert_array_equal(mask, pp.feather(hard, 4))
    assert ((mask > 0) & (mask < 255)).any()
    png = Image.open(io.BytesIO(gen.generate(image, "a", **opts).to_png()))
    assert png.mode == "L" and np.array_equal(np.asarray(png), mask)
    alpha = gen.generate(image, "a", return_alpha=True, **opts).output
    np.testing.assert_array_equal(alpha[..., 3], mask)
    np.testing.assert_array_equal(alpha[..., :3], image)
    preview = gen.generate(image, "a", return_mask=False, **opts).output
    np.testing.assert_array_equal(preview, pp.render_preview(image, mask))
    np.testing.assert_array_equal(preview[mask == 0], image[mask == 0])


# -- options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [
        ("feather", [0, 1, 50, FEATHER_MAX, 3.0], [-1, FEATHER_MAX + 1, 2.5, True, "3", None]),
        ("min_area", [0, 1, 12345, MIN_AREA_MAX], [-1, MIN_AREA_MAX + 1, 1.5, False, "9", 10**30]),
        ("fill_holes", [True, False], ["yes", 1, None]),
        ("negative_prompt", [None, "", "hat", "hat, bag"], [5, True, ["hat"], {"a": 1}]),
    ],
)
def test_new_options_are_validated_and_bad_values_named(field: str, ok: list[Any], bad: list[Any]) -> None:
    for value in ok:
        assert getattr(MaskOptions.parse({field: value}), field) == value
    for value in bad:
        with pytest.raises(InvalidOptionError) as err:
            MaskOptions.parse({field: value})
        assert err.value.field == field and str(err.value).startswith(f"{field}: "), value


def test_form_strings_are_accepted_and_negative_targets_split_like_the_prompt() -> None:
    lax = MaskOptions.parse(
        {"feather": "3", "min_area": "20", "fill_holes": "true", "negative_prompt": "x"}, strict=False
    )
    assert (lax.feather, lax.min_area, lax.fill_holes, lax.negative_prompt) == (3, 20, True, "x")
    text = "hat, Mr. Smith's bag . hat ."
    assert MaskOptions(negative_prompt=text).negative_targets == parse_prompt(text) == ["hat", "Mr. Smith's bag"]
    for blank in (None, "", "  ", " , . ,", "\u200b", "\ufeff , \u2060 \u00a0"):
        assert MaskOptions(negative_prompt=blank).negative_targets == []


# -- command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory, coffee: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("photos") / "coffee.png"
    Image.fromarray(coffee).resize((120, 80)).save(path)
    return path


def cli(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_flags_give_the_library_result(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir))
    image = np.asarray(Image.open(photo).convert("RGB"))
    t = float(np.median(gen.backend.score(gen.backend.encode(image), ["cup"]).maps))
    opts: dict[str, Any] = {"negative_prompt": "table", "fill_holes": True, "min_area": 5, "feather": 2, "grow_mask": 1}
    expected = gen.generate(photo, "cup", threshold=t, **opts)
    assert ((expected.mask > 0) & (expected.mask < 255)).any() and (expected.mask == 255).any()
    assert (expected.mask != gen.generate(photo, "cup", threshold=t, feather=2, grow_mask=1).mask).any()
    flags = ["--negative-prompt", "table", "--fill-holes", "--min-area", 5, "--feather", 2, "--grow-mask", 1]
    common = ["-p", "cup", "--threshold", repr(t), "--model", tiny_clipseg_dir, *flags]
    out = tmp_path / "out.png"
    run = cli("mask", photo, "-o", out, "--json", *common)
    assert run.exit_code == 0, run.output
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected.mask)
    meta = json.loads(next(line for line in run.output.splitlines() if line.startswith("{")))
    assert (meta["negative_prompts"], meta["fill_holes"], meta["min_area"], meta["feather"]) == (["table"], True, 5, 2)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(photo.read_bytes())
    run = cli("batch", folder, "-o", tmp_path / "outdir", *common)
    assert run.exit_code == 0, run.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "outdir" / "a.png")), expected.mask)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--feather", "101"], "--feather"),
        (["--feather", "2.5"], "--feather"),
        (["--min-area", "-3"], "--min-area"),
        (["--min-area", "many"], "--min-area"),
    ],
)
def test_cli_bad_values_are_named(photo: Path, tmp_path: Path, flags: list[str], named: str) -> None:
    for command in (["mask", photo, "-o", tmp_path / "x.png"], ["batch", photo.parent, "-o", tmp_path / "o"]):
        run = cli(*command, "-p", "cup", *flags)
        assert run.exit_code == 2 and f"error: {named}: " in run.output, run.output


def test_a_result_encodes_lossless_formats_exactly_and_refuses_a_jpeg_cut_out() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gen = MaskGenerator(MapBackend({"a": blobs(5).astype(np.float32)}))
    cut = gen.generate(image, "a", threshold=0.5, grow_mask=1, feather=3, return_alpha=True)
    for fmt in ("PNG", "WEBP", "TIFF"):
        with Image.open(io.BytesIO(cut.encode(fmt))) as img:
            assert img.format == fmt and np.array_equal(np.asarray(img.convert("RGBA")), cut.output)
    with pytest.raises(ValueError, match="no transparency"):
        cut.encode("JPEG")
    mask = gen.generate(image, "a", threshold=0.5)
    with Image.open(io.BytesIO(mask.encode("JPEG"))) as img:
        assert img.format == "JPEG" and np.abs(np.asarray(img).astype(int) - mask.mask).mean() < 3


def result_of(output: np.ndarray) -> MaskResult:
    """A `MaskResult` whose rendered output is `output` (its mask: the alpha of a cut-out, else all zeros)."""
    mask = output[..., 3].copy() if output.ndim == 3 and output.shape[2] == 4 else np.zeros(output.shape[:2], np.uint8)
    kind = "mask" if output.ndim == 2 else ("alpha" if output.shape[2] == 4 else "preview")
    return MaskResult(mask, output, kind, ["a"], "test", "test", [], [], {}, empty=False)


def test_a_result_encodes_by_any_spelling_of_its_format_and_refuses_others_clearly() -> None:
    """Before: `encode` compared the name as given, so `encode("webp")` wrote a lossy WebP (the lossless settings
    are keyed "WEBP"), `encode("jpeg")` of a cut-out raised Pillow's OSError past the "no transparency" check,
    `encode("jpg")` and `encode("tif")` a KeyError, and a WebP too wide for the format Pillow's "encoding error"."""
    rng = np.random.default_rng(5)
    cut = result_of(rng.integers(0, 256, (H, W, 4), dtype=np.uint8))
    for name, fmt in [("webp", "WEBP"), ("Webp", "WEBP"), ("png", "PNG"), ("tif", "TIFF"), ("tiff", "TIFF")]:
        with Image.open(io.BytesIO(cut.encode(name))) as img:
            assert img.format == fmt and np.array_equal(np.asarray(img.convert("RGBA")), cut.output), name
    assert cut.encode("webp") == cut.encode("WEBP") and cut.encode("png") == cut.encode("PNG")
    for name in ("jpeg", "jpg", "JPG"):
        with pytest.raises(InvalidOptionError, match="JPEG holds no transparency"):
            cut.encode(name)
    mask = result_of(blobs(6))
    assert mask.encode("jpg") == mask.encode("jpeg") == mask.encode("JPEG")
    for name in ("GIF", "xyz", ""):
        with pytest.raises(InvalidOptionError, match=r"^format: must be PNG, JPEG, WEBP or TIFF"):
            mask.encode(name)
    wide = result_of(np.zeros((1, 16384), np.uint8))
    with pytest.raises(InvalidOptionError, match=r"at most 16383 pixels a side.*as PNG or TIFF"):
        wide.encode("webp")
