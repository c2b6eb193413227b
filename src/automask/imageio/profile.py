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

_CONVERTED = {"RGB": "RGB", "RGBA": "RGBA", "CMYK": "RGB", "L": "RGB"}
"""Image modes converted, and the mode each becomes (alpha is carried through unchanged). A palette image ("P") is
first made the RGB(A) image it stands for, a gray one with alpha ("LA") is converted without its alpha band and
given it back (LittleCMS through Pillow takes no gray with alpha)."""

_PREPARED = {"P", "LA"}
"""Modes made convertible before the transform (`_prepared`)."""


def to_srgb(img: Image.Image) -> Image.Image:
    """`img` in sRGB: a new image of mode RGB (RGBA for RGBA, LA, a palette with transparency, and RGB or L with a
    transparent colour key) when it embeds another colour profile, else `img` itself (also for modes not converted:
    16-bit, 32-bit, float)."""
    icc = img.info.get("icc_profile")
    if not icc or (img.mode not in _CONVERTED and img.mode not in _PREPARED):
        return img
    from PIL import ImageCms  # LittleCMS: loaded by the first image with a profile, not at import

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _is_srgb(source):
            return img
        colour, alpha = _prepared(img)
        converted = ImageCms.profileToProfile(
            colour,
            source,
            _srgb(),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode=_CONVERTED[colour.mode],
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return img  # damaged, or not for this image's colour space: the stored values, as a browser shows them
    if converted is None:
        return img
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def _prepared(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """`img` in a mode LittleCMS converts (RGB, RGBA, CMYK, L), and an alpha band to put back afterwards (LA's)."""
    if img.mode == "P":  # the palette's colours, transparency (tRNS or an RGBA palette) as alpha
        transparent = "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")
        return img.convert("RGBA" if transparent else "RGB"), None
    if img.mode == "L" and "transparency" in img.info:  # a gray colour key, as for RGB below
        img = img.convert("LA")
    if img.mode == "LA":
        return img.getchannel("L"), img.getchannel("A")
    if img.mode == "RGB" and "transparency" in img.info:  # a colour key, which converted colours would miss
        return img.convert("RGBA"), None
    return img, None


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
