"""The library's open defects found by earlier hunts: each test failed before its fix."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np

from automask.feature_cache import image_digest


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
