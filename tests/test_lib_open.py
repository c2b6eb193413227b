"""The library's open defects found by earlier hunts: each test failed before its fix."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest

from automask.errors import ImageDecodeError, InvalidOptionError
from automask.feature_cache import image_digest
from automask.imageio import load_image
from automask.options import MaskOptions


def _old_digest(image: np.ndarray) -> bytes:
    """The digest as it was computed before (a full `tobytes()` copy): the cache keys must not change."""
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(repr(image.shape).encode())
    return h.digest()


def test_image_digest_same_for_contiguous_and_strided_views_of_the_same_pixels() -> None:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (90, 140, 3), np.uint8)
    strided = big[::2, 1::3]  # not contiguous
    dense = np.ascontiguousarray(strided)
    assert not strided.flags.c_contiguous
    assert image_digest(strided) == image_digest(dense) == _old_digest(dense)
    flipped = big[::-1]  # negative strides
    assert image_digest(flipped) == _old_digest(np.ascontiguousarray(flipped))
    fortran = np.asfortranarray(big)
    assert image_digest(fortran) == _old_digest(big)
    assert image_digest(big) != image_digest(big[:, :, ::-1])  # other pixels, another key


def test_image_digest_hashes_without_a_full_size_copy() -> None:
    image = np.zeros((2000, 3000, 3), np.uint8)  # 18 MB
    image[::7, ::5] = 200
    strided = np.zeros((2000, 6000, 3), np.uint8)[:, ::2]
    for array in (image, strided):
        tracemalloc.start()
        try:
            image_digest(array)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < array.nbytes // 8, (peak, array.nbytes)


@pytest.mark.parametrize(
    ("dtype", "values", "named"),
    [
        ("uint32", [0, 3_000_000_000, 4_000_000_000], "uint32"),
        ("uint32", [0, 70_000, 2**31 - 1], "uint32"),
        ("int64", [0, 70_000, 2**40], "int64"),
        ("uint64", [0, 1, 2**63 + 5], "uint64"),
        ("int8", [-5, 0, 100], "int8"),
        ("int16", [-300, 0, 100], "int16"),
        (">i4", [-1, 0, 100], "int32"),
    ],
)
def test_integer_arrays_out_of_range_are_refused_naming_the_dtype_and_the_ranges(
    dtype: str, values: list[int], named: str
) -> None:
    """No wrap-around (as Pillow's mode "I" does for uint32 above 2**31 - 1, or its int8 read as unsigned): an
    integer array outside 0–65535 is refused, and the message says which dtype and what is accepted."""
    array = np.array([values, values], dtype=dtype)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(array)
    message = str(caught.value)
    assert named in message and "0–255" in message and "0–65535" in message, message


@pytest.mark.parametrize("dtype", ["uint32", "int8", "int16", "int64", "uint64", ">i4"])
def test_integer_arrays_in_range_are_read_by_value(dtype: str) -> None:
    small = np.array([[0, 100, 127]], dtype=dtype)
    assert load_image(small)[..., 0].tolist() == [[0, 100, 127]]
    if np.iinfo(np.dtype(dtype)).max >= 65535:
        wide = np.array([[0, 1000, 65535]], dtype=dtype)
        assert load_image(wide)[..., 0].tolist() == [[0, 4, 255]]  # scaled as 16-bit


NUMPY_OPTIONS = [  # (field, Python value, its numpy scalar and 0-d array forms)
    ("threshold", 0.5, [np.float64(0.5), np.array(0.5), np.array(0.5, np.float32)]),
    ("text_threshold", 0.25, [np.float32(0.25), np.array(0.25)]),
    ("grow_mask", 5, [np.int64(5), np.array(5), np.array(5, np.uint8), np.array(5.0)]),
    ("seed", 7, [np.array(7, np.int32)]),
    ("min_area", 9, [np.array(9)]),
    ("feather", 3, [np.array(3)]),
    ("invert_mask", True, [np.bool_(True), np.array(True)]),
    ("fill_holes", True, [np.array(True)]),
    ("negative_prompt", "hat", [np.str_("hat"), np.array("hat")]),
]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(("field", "plain", "forms"), NUMPY_OPTIONS)
def test_numpy_scalars_and_0d_arrays_are_read_as_the_python_scalars_they_hold(
    field: str, plain: object, forms: list[object], strict: bool
) -> None:
    expected = getattr(MaskOptions.parse({field: plain}), field)
    for value in forms:
        got = getattr(MaskOptions.parse({field: value}, strict=strict), field)
        assert got == expected and type(got) is type(expected), (value, got)
        assert getattr(MaskOptions(**{field: value}), field) == expected


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", np.bool_(True)),  # a Python True is refused for a number: so are numpy's
        ("threshold", np.array(True)),
        ("text_threshold", np.array(False)),
        ("grow_mask", np.array(True)),
        ("grow_mask", np.array(2.5)),
        ("threshold", np.array([0.5])),  # not a scalar
        ("threshold", np.array(np.nan)),
    ],
)
def test_numpy_values_a_python_scalar_would_be_refused_for_are_refused(field: str, value: object, strict: bool) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        MaskOptions.parse({field: value}, strict=strict)
    assert caught.value.field == field
