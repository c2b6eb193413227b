"""Numeric samples of any dtype -> uint8, by their range (arrays, and Pillow's 16-bit, 32-bit and float modes).

- 16-bit samples are scaled, never clipped: v -> round(v · 255 / 65535).
- 32-bit integer samples are scaled by their type's range once they leave 0..65535 (`wide_to_uint8`).
- Float samples are a 0–1 image when they lie within `FLOAT_UNIT_RANGE`, else 0–255 within `FLOAT_BYTE_RANGE`
  (resampling's overshoot clipped either way).
"""

from __future__ import annotations

import numpy as np

from automask.errors import ImageDecodeError


def wide_to_uint8(values: np.ndarray) -> np.ndarray:
    """H×W int32 (or uint32) samples, Pillow's mode "I" -> H×W uint8, by the range of their type.

    0..65535: as `to_uint8` reads them (0..255 kept, else scaled as 16-bit). Larger values: v -> round(v · 255 /
    max) with the type's max (2**31 - 1 for int32, 2**32 - 1 for uint32). Negative values (signed samples): the
    signed type's whole range onto 0..255, int16's when every value fits it, int32's otherwise (0 becomes 128).
    """
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi <= 65535:
        return to_uint8(values)
    if lo >= 0:
        return _stretch(values, 0, int(np.iinfo(values.dtype).max))
    short = np.iinfo(np.int16)
    kind = short if short.min <= lo and hi <= short.max else np.iinfo(np.int32)
    return _stretch(values, int(kind.min), int(kind.max))


def _stretch(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Samples in lo..hi -> uint8, v -> round((v - lo) · 255 / (hi - lo)); float32 steps, in place (4 bytes a
    pixel: plenty for 256 levels)."""
    out = values.astype(np.float32)
    out -= lo
    out *= 255 / (hi - lo)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def scale_16bit(values: np.ndarray) -> np.ndarray:
    """Integer samples in 0..65535 -> uint8, v -> round(v · 255 / 65535)."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Samples of any numeric dtype -> uint8, by their range.

    bool: 0/255. uint16: always the 16-bit range (scaled). Other integers (int8 to uint64): 0..255 kept, 0..65535
    scaled as 16-bit, anything else (a negative value too) refused with a message naming the dtype, never wrapped.
    Floats: 0..1 (within `FLOAT_UNIT_RANGE`, clipped) scaled by 255, 0..255 (within `FLOAT_BYTE_RANGE`, clipped)
    rounded, anything else (or NaN/inf) refused.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:  # any byte order
        return scale_16bit(a)
    if a.dtype.kind not in "uif":
        raise ImageDecodeError(f"Array images of dtype {a.dtype} are not supported; pass uint8 RGB.")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageDecodeError("The image's samples contain NaN or infinite values.")
    if a.dtype.kind == "f":
        return _float_to_uint8(a, float(a.min()), float(a.max()))
    lo, hi = int(a.min()), int(a.max())  # exact: a float would round 2**63 + 5
    if lo < 0 or hi > 65535:
        found = f"a negative sample ({lo})" if lo < 0 else f"max {hi}"
        raise ImageDecodeError(
            f"Integer images ({a.dtype.name} here) must hold samples in 0–255 (kept) or 0–65535 (scaled as 16-bit), "
            f"got {found}; rescale them to uint8 or uint16 first."
        )
    return a.astype(np.uint8) if hi <= 255 else scale_16bit(a)


FLOAT_UNIT_RANGE = (-0.5, 1.5)
"""A float image whose samples all lie in this range is a 0–1 image: the over- and undershoot of cubic or Lanczos
resampling (about ±0.1) is clipped, not read as 0–255 (a 0–255 image with no sample above 1.5 is black either way)."""

FLOAT_BYTE_RANGE = (FLOAT_UNIT_RANGE[0] * 255, FLOAT_UNIT_RANGE[1] * 255)
"""A float image with a sample above 1.5 whose samples all lie in this range (-127.5 to 382.5) is a 0–255 image:
resampling's over- and undershoot (about ±25) is clipped, as for a 0–1 image (the same share of the range)."""


def _float_to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Finite float samples (min `lo`, max `hi`) -> uint8: a 0–1 image (`FLOAT_UNIT_RANGE`) clipped to 0..1 and
    ×255, else a 0–255 image (`FLOAT_BYTE_RANGE`, a sample above 1.5) rounded and clipped to 0..255."""
    unit_lo, unit_hi = FLOAT_UNIT_RANGE
    if unit_lo <= lo and hi <= unit_hi:
        return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    byte_lo, byte_hi = FLOAT_BYTE_RANGE
    if hi <= unit_hi or lo < byte_lo or hi > byte_hi:
        raise ImageDecodeError(
            f"Float images must hold samples in 0–1 or 0–255, got {lo:g} to {hi:g}; clip or rescale them first."
        )
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
