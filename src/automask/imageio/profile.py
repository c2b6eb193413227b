"""Colour profiles: an image that embeds an ICC profile other than sRGB (Display P3 from phones, Adobe RGB from
cameras, a press profile in a CMYK JPEG) is converted to sRGB when decoded.

Models were trained on sRGB photos, and a PNG without a profile is shown as sRGB: without the conversion, a P3
photo's cut-out and preview would look washed out beside the original (the colours stored, read in the wrong
space). Relative colorimetric intent, as browsers use for such profiles; a colour outside sRGB is clipped. An sRGB
profile changes nothing (no transform, the stored values kept bit for bit); a damaged profile, or one that does not
match the image's mode, is ignored as browsers ignore it.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from PIL import ImageCms

_CONVERTED = {"RGB": "RGB", "RGBA": "RGBA", "CMYK": "RGB"}
"""Image modes converted, and the mode each becomes (alpha is carried through unchanged)."""


def to_srgb(img: Image.Image) -> Image.Image:
    """`img` in sRGB: a new image of mode RGB (RGBA for RGBA, and for RGB with a transparent colour key) when it
    embeds another colour profile, else `img` itself (also for modes not in `_CONVERTED`: gray, palette, 16-bit)."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in _CONVERTED:
        return img
    from PIL import ImageCms  # LittleCMS: loaded by the first image with a profile, not at import

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _is_srgb(source):
            return img
        if img.mode == "RGB" and "transparency" in img.info:  # a colour key, which converted colours would miss
            img = img.convert("RGBA")
        converted = ImageCms.profileToProfile(
            img,
            source,
            _srgb(),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode=_CONVERTED[img.mode],
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return img  # damaged, or not for this image's colour space: the stored values, as a browser shows them
    return converted if converted is not None else img


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    """True for an sRGB profile (its description says so: 'sRGB IEC61966-2.1', 'sRGB built-in', ...)."""
    from PIL import ImageCms

    try:
        return "srgb" in ImageCms.getProfileDescription(profile).lower()
    except ImageCms.PyCMSError:
        return False


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    """The sRGB profile images are converted to (LittleCMS's built-in)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
