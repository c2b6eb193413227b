"""Dispatch an image source to the right reader. (Minimal version; see decode.py / fetch.py.)"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from automask.errors import ImageDecodeError
from automask.settings import Settings

ImageSource = Union[str, bytes, Path, Image.Image, np.ndarray]


def load_image(source: ImageSource, settings: Settings | None = None) -> np.ndarray:
    """Read `source` into an H×W×3 uint8 RGB array (EXIF orientation applied)."""
    settings = settings or Settings()
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        return np.asarray(ImageOps.exif_transpose(source).convert("RGB"))
    if isinstance(source, Path):
        return decode_bytes(source.read_bytes())
    if isinstance(source, bytes):
        return decode_bytes(source)
    if isinstance(source, str):
        if source.startswith("data:"):
            return decode_bytes(_b64(source.partition(",")[2]))
        if Path(source).is_file():
            return decode_bytes(Path(source).read_bytes())
        return decode_bytes(_b64(source))
    raise ImageDecodeError(f"Unsupported image source of type {type(source).__name__}.")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("The image is neither a readable file, a URL, nor valid base64.") from None


def _from_array(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ImageDecodeError(f"Array images must be uint8, got {a.dtype}.")
    if a.ndim == 2:
        return np.dstack([a, a, a])
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return np.ascontiguousarray(a[:, :, :3])
    raise ImageDecodeError(f"Array images must be H×W, H×W×3 or H×W×4, got shape {a.shape}.")


def decode_bytes(data: bytes) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - replaced by the full decoder
        raise ImageDecodeError(f"The image could not be decoded: {exc}") from None
