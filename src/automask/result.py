"""The typed result of one masking call."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from automask.errors import InvalidOptionError
from automask.imageio.orientation import Orientation

FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "JPG": "JPEG", "WEBP": "WEBP", "TIFF": "TIFF", "TIF": "TIFF"}
"""The formats `MaskResult.encode` writes, by the names it takes (upper-cased)."""

MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}
"""The longest side, in pixels, that a JPEG (libjpeg) and a WebP can hold."""


@dataclass(frozen=True)
class Detection:
    """One scored target or instance. `box` is XYXY in original pixels, or None; `area` in pixels."""

    label: str
    score: float
    box: tuple[float, float, float, float] | None
    area: int

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 6), "box": self.box, "area": self.area}


@dataclass(frozen=True)
class MaskResult:
    """mask:   H×W uint8, 255 = selected, in original (EXIF-upright) image coordinates, after grow/invert/feather
            (0/255 only, unless `feather` softened its edge).
    output: the rendered output: H×W uint8 (mask), H×W×4 uint8 RGBA (alpha) or H×W×3 uint8 RGB (preview).
    kind:   'mask', 'alpha' or 'preview'.
    instance_masks: one H×W uint8 mask per detection (thresholded, before negative_prompt and grow/invert).
    timings: seconds per stage ('decode', 'encode', 'score', 'postprocess', 'render', 'total').
    The arrays are the caller's to change: `mask` and `output` are separate arrays (also for kind 'mask'), so
    changing one leaves the other, and what `image`, `to_png` and `encode` give, as it was.
    """

    mask: np.ndarray
    output: np.ndarray
    kind: str
    prompts: list[str]
    backend: str
    model: str
    detections: list[Detection]
    instance_masks: list[np.ndarray] = field(repr=False)
    timings: dict[str, float]
    empty: bool
    """True when nothing was selected (after negative_prompt and min_area, before grow and invert)."""
    seed: int = -1
    negative_prompts: list[str] = field(default_factory=list)
    """The targets of negative_prompt (automask extension), [] when none."""
    fill_holes: bool = False
    min_area: int = 0
    feather: int = 0
    orientation: Orientation = field(default_factory=Orientation)
    """The EXIF orientation decoding applied to the image (not in `metadata()`: the v1/v2 bodies stay as they are)."""

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def height(self) -> int:
        return int(self.mask.shape[0])

    @property
    def image(self) -> Image.Image:
        """The rendered output as a PIL image (mode 'L', 'RGBA' or 'RGB')."""
        return Image.fromarray(self.output)

    def to_png(self) -> bytes:
        """The rendered output encoded as PNG bytes."""
        return encode_png(self.output)

    def encode(self, fmt: str = "PNG") -> bytes:
        """The rendered output in format `fmt` (any case; JPG and TIF too): PNG (fast compression), JPEG (quality
        95; not for an RGBA cut-out), WEBP (lossless and exact: every value kept, colour under transparency too) or
        TIFF (deflate). `InvalidOptionError` for another format, a JPEG cut-out, or a side the format cannot hold."""
        name = FORMATS.get(fmt.strip().upper()) if isinstance(fmt, str) else None
        if name is None:
            raise InvalidOptionError("format", f"must be PNG, JPEG, WEBP or TIFF, not {fmt!r}")
        if name == "PNG":
            return self.to_png()
        if name == "JPEG" and self.output.ndim == 3 and self.output.shape[2] == 4:
            raise InvalidOptionError("format", "JPEG holds no transparency: encode a cut-out as PNG, WEBP or TIFF")
        most = MAX_SIDE.get(name)
        if most is not None and max(self.width, self.height) > most:
            raise InvalidOptionError(
                "format",
                f"a {name} image holds at most {most} pixels a side, this one is {self.width}×{self.height}: "
                "encode it as PNG or TIFF",
            )
        params: dict[str, dict[str, Any]] = {
            "JPEG": {"quality": 95},
            "WEBP": {"lossless": True, "exact": True},
            "TIFF": {"compression": "tiff_adobe_deflate"},
        }
        buf = io.BytesIO()
        self.image.save(buf, format=name, **params[name])
        return buf.getvalue()

    def metadata(self) -> dict[str, Any]:
        """JSON-ready facts about the result (no image data). The automask extensions `negative_prompts`,
        `fill_holes`, `min_area` and `feather` are reported only when used (so default calls answer as before).
        `selected_pixels` counts the mask's non-zero pixels."""
        meta = {
            "width": self.width,
            "height": self.height,
            "kind": self.kind,
            "prompts": self.prompts,
            "backend": self.backend,
            "model": self.model,
            "seed": self.seed,
            "empty": self.empty,
            "selected_pixels": int(np.count_nonzero(self.mask)),
            "detections": [d.to_dict() for d in self.detections],
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }
        extensions = {
            "negative_prompts": self.negative_prompts,
            "fill_holes": self.fill_holes,
            "min_area": self.min_area,
            "feather": self.feather,
        }
        meta.update({k: v for k, v in extensions.items() if v})
        return meta


def encode_png(array: np.ndarray, compress_level: int = 1, text: dict[str, str] | None = None) -> bytes:
    """Encode an H×W, H×W×3 or H×W×4 uint8 array as PNG bytes (fast compression by default), with the PNG text
    chunks `text` (keyword -> value) if given."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for keyword, value in (text or {}).items():
        info.add_text(keyword, value)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level, pnginfo=info if text else None)
    return buf.getvalue()
