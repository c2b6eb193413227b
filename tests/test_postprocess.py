"""Post-processing against independent references: select, grow (vs scipy's exact EDT), invert, render."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from automask import postprocess as pp
from automask.backends.base import Scores


def grow_reference(mask: np.ndarray, radius: int) -> np.ndarray:
    """Selected after growing iff the Euclidean distance to the nearest selected pixel is <= radius."""
    if not mask.any():
        return np.zeros_like(mask)
    return distance_transform_edt(~mask) <= radius


# -- select ------------------------------------------------------------------------------------------


def test_select_dense_is_the_union_of_maps_at_or_above_threshold() -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((3, 17, 23), dtype=np.float32)
    maps[1, 4, 5] = 0.5  # exactly at the threshold: selected
    maps[:, 0, 0] = np.nextafter(np.float32(0.5), np.float32(0))  # just below in every map: not selected
    scores = Scores(maps=maps, labels=["a", "b", "c"])
    for threshold in (0.0, 0.2, 0.5, 0.9, 1.0):
        got = pp.select(scores, threshold)
        assert got.shape == (17, 23) and got.dtype == bool
        assert np.array_equal(got, (maps >= threshold).any(axis=0))
    half = pp.select(scores, 0.5)
    assert half[4, 5] and not half[0, 0]
    assert pp.select(scores, 0.0).all()


def test_select_instances_keeps_confident_instances_and_their_half_maps() -> None:
    rng = np.random.default_rng(2)
    maps = rng.random((4, 9, 14), dtype=np.float32)
    maps[2, 3, 3] = 0.5  # at 0.5: part of instance 2
    confidences = np.array([0.1, 0.35, 0.3, 0.9], dtype=np.float32)
    scores = Scores(maps=maps, labels=["w", "x", "y", "z"], kind="instances", scores=confidences)
    for threshold in (0.0, 0.3, 0.35, 0.5, 0.95):
        kept = [i for i in range(4) if confidences[i] >= threshold]
        expected = np.zeros((9, 14), bool)
        for i in kept:
            expected |= maps[i] >= 0.5
        assert np.array_equal(pp.select(scores, threshold), expected), threshold
    assert pp.select(scores, float(confidences[2]))[3, 3]  # a confidence equal to the threshold is kept
    assert not pp.select(scores, 0.95).any()


def test_select_with_no_maps_is_empty() -> None:
    scores = Scores(maps=np.zeros((0, 5, 7), np.float32), labels=[])
    got = pp.select(scores, 0.0)
    assert got.shape == (5, 7) and not got.any()


# -- grow --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_grow_equals_the_exact_euclidean_distance_transform(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 70, size=2))
    density = [0.002, 0.01, 0.05, 0.3, 0.8, 0.02][seed]
    mask = rng.random((h, w)) < density
    mask[rng.integers(h), rng.integers(w)] = True
    before = mask.copy()
    for radius in range(0, 101):
        got = pp.grow(mask, radius)
        assert got.dtype == bool and got.shape == (h, w)
        assert np.array_equal(got, grow_reference(mask, radius)), (h, w, radius)
    assert np.array_equal(mask, before)  # the input is not modified


@pytest.mark.parametrize("where", ["top-left", "top-right", "bottom-left", "bottom-right", "top", "left", "centre"])
def test_grow_from_edge_and_corner_pixels(where: str) -> None:
    h, w = 41, 57
    y, x = {
        "top-left": (0, 0),
        "top-right": (0, w - 1),
        "bottom-left": (h - 1, 0),
        "bottom-right": (h - 1, w - 1),
        "top": (0, 20),
        "left": (30, 0),
        "centre": (20, 28),
    }[where]
    mask = np.zeros((h, w), bool)
    mask[y, x] = True
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(yy - y, xx - x)
    for radius in (0, 1, 2, 5, 13, 40, 71, 100):
        got = pp.grow(mask, radius)
        assert np.array_equal(got, dist <= radius), radius
        assert np.array_equal(got, grow_reference(mask, radius))


def test_grow_radius_is_inclusive_and_euclidean() -> None:
    mask = np.zeros((20, 20), bool)
    mask[10, 10] = True
    grown = pp.grow(mask, 5)
    assert grown[10 + 3, 10 + 4] and grown[10, 15] and grown[5, 10]  # distance exactly 5
    assert not grown[10 + 1, 10 + 5]  # sqrt(26) > 5
    assert not grown[10 + 4, 10 + 4]  # sqrt(32): a square (chessboard) grow would take it
    assert grown.sum() == 81  # lattice points within a circle of radius 5


@pytest.mark.parametrize("radius", [0, 1, 10, 100])
def test_grow_all_empty_and_all_full(radius: int) -> None:
    empty = np.zeros((8, 13), bool)
    full = np.ones((8, 13), bool)
    assert not pp.grow(empty, radius).any()
    assert pp.grow(full, radius).all()
    assert pp.grow(empty, radius) is not empty  # a new array, never the caller's


# -- invert, to_uint8 --------------------------------------------------------------------------------


def test_invert_and_to_uint8() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((6, 11)) < 0.4
    inverted = pp.invert(mask)
    assert np.array_equal(inverted, np.logical_not(mask))
    assert np.array_equal(pp.invert(inverted), mask)
    as_u8 = pp.to_uint8(mask)
    assert as_u8.dtype == np.uint8 and as_u8.shape == (6, 11)
    assert set(np.unique(as_u8)) <= {0, 255}
    assert np.array_equal(as_u8 == 255, mask)
    assert np.array_equal(pp.to_uint8(inverted), 255 - as_u8)


# -- render ------------------------------------------------------------------------------------------


@pytest.fixture()
def image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(9, 16, 3), dtype=np.uint8)
    mask = pp.to_uint8(rng.random((9, 16)) < 0.5)
    return image, mask


def test_render_mask_is_the_mask(image_and_mask: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = image_and_mask
    out = pp.render(image, mask, "mask")
    assert out.dtype == np.uint8 and out.shape == (9, 16)
    assert np.array_equal(out, mask)


def test_render_alpha_is_the_image_with_alpha_equal_to_the_mask(image_and_mask: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = image_and_mask
    out = pp.render(image, mask, "alpha")
    assert out.dtype == np.uint8 and out.shape == (9, 16, 4)
    assert np.array_equal(out[..., :3], image)
    assert np.array_equal(out[..., 3], mask)


def test_render_alpha_keeps_the_images_own_transparency() -> None:
    """An RGBA image's cut-out: its colours, alpha = round(mask · a / 255) — transparent stays transparent."""
    mask = np.array([[255, 255, 255, 0, 128, 128]], np.uint8)
    rgba = np.array([[[9, 8, 7, 255], [9, 8, 7, 0], [9, 8, 7, 51], [9, 8, 7, 255], [9, 8, 7, 255], [9, 8, 7, 51]]])
    out = pp.render(rgba.astype(np.uint8), mask, "alpha")
    assert out.dtype == np.uint8 and out.shape == (1, 6, 4)
    assert (out[..., :3] == [9, 8, 7]).all()  # the stored colours, not the ones composited onto white
    assert out[0, :, 3].tolist() == [255, 0, 51, 0, 128, 26]  # 128·51/255 = 25.6


def test_render_preview_tints_selected_pixels_only(image_and_mask: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = image_and_mask
    out = pp.render(image, mask, "preview")
    assert out.dtype == np.uint8 and out.shape == (9, 16, 3)
    sel = mask == 255
    tint = np.array(pp.PREVIEW_TINT, dtype=np.float64)
    expected = np.rint(image[sel] * (1 - pp.PREVIEW_OPACITY) + tint * pp.PREVIEW_OPACITY).astype(np.uint8)
    assert np.array_equal(out[sel], expected)
    assert np.array_equal(out[~sel], image[~sel])
    assert np.array_equal(
        pp.render_preview(image, mask, (10, 20, 30), opacity=1.0)[sel], np.tile([10, 20, 30], (sel.sum(), 1))
    )
    assert np.array_equal(pp.render_preview(image, mask, opacity=0.0), image)


def test_render_preview_equals_the_float32_formula_for_every_mask_and_pixel_value() -> None:
    """The preview's tables give, for all 256 × 256 (mask, value) pairs, exactly the float32 formula on each pixel."""
    mask = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)  # row = mask value
    image = np.stack([mask.T, 255 - mask.T, mask.T // 2 + 40], axis=-1)  # column = pixel value, per channel
    for tint, opacity in [(pp.PREVIEW_TINT, pp.PREVIEW_OPACITY), ((7, 200, 255), 0.83)]:
        w = (mask.astype(np.float32) / 255.0 * opacity)[..., None]
        formula = image.astype(np.float32) * (1.0 - w) + np.asarray(tint, np.float32) * w
        expected = np.clip(np.rint(formula), 0, 255).astype(np.uint8)
        assert np.array_equal(pp.render_preview(image, mask, tint, opacity), expected)
    assert np.array_equal(pp.render_preview(image[:0], mask[:0]), image[:0])  # no pixels: an empty preview


def test_render_unknown_kind(image_and_mask: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = image_and_mask
    with pytest.raises(ValueError, match="unknown output kind"):
        pp.render(image, mask, "jpeg")


@pytest.mark.parametrize("band", [1, 7, 1000, 10**12])
def test_grow_in_bands_equals_the_whole_image_distance(band: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`grow` bounds its memory by working in bands of rows; any band size gives the exact Euclidean answer."""
    rng = np.random.default_rng(3)
    mask = rng.random((120, 90)) < 0.002
    mask[0, 0] = mask[-1, 45] = True  # selected pixels on the first and last rows
    monkeypatch.setattr(pp, "GROW_BAND_PIXELS", band)
    for radius in (1, 5, 33):
        expected = distance_transform_edt(~mask) <= radius
        assert np.array_equal(pp.grow(mask, radius), expected), radius
