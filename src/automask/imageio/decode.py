"""Decode images into H×W×3 uint8 RGB: encoded bytes, PIL images and numpy arrays.

Choices, the same for every source:
- **Alpha is composited onto white** (RGBA, LA, PA, palette or single-colour transparency). Dropping alpha
  would expose whatever colour the encoder left under transparent pixels (often black or noise), which the
  model would then try to segment; white is what a viewer shows on a light page. `keep_alpha=True` returns an
  image with transparency as H×W×4 RGBA instead (straight alpha, the stored colours), for cut-outs that keep it.
- **EXIF orientation is applied** (all 8 values), so rows and columns are those of the image as displayed.
- **16-bit samples are scaled, never clipped**: v -> round(v · 255 / 65535) for grayscale and arrays; 16-bit colour
  PNG/TIFF keep their high byte (v >> 8), as Pillow decodes them: at most one level below the rounded scale.
- **32-bit integer samples** (Pillow's mode "I": int32 TIFFs, uint32 ones, signed 16-bit ones) are scaled by their
  type's range too, once their values leave 0..65535 (`wide_to_uint8`): an image's own min..max would make every
  image full-contrast and a tile decode unlike the whole.
- **Colour profiles**: an image embedding one other than sRGB (Display P3, Adobe RGB, a CMYK press profile) is
  converted to sRGB (`profile.to_srgb`), what models were trained on and what a PNG without a profile shows.
- **Animated images give the first frame shown** (GIF, WebP, multi-page TIFF; an APNG's first animation frame,
  not a fallback default image: `apng`).
- **Limits come first**: the encoded size is checked before opening, the pixel count from the header before any
  pixel is decoded (a TIFF's tile size and a JPEG's scan count too: `bombs`); Pillow's own decompression-bomb
  error and warning become `ImageTooLargeError` too.
- Only the raster formats in `ALLOWED_FORMATS` are opened (no EPS, which would start Ghostscript).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
from PIL import ExifTags, Image

from automask.errors import ImageDecodeError, ImageTooLargeError
from automask.imageio import apng
from automask.imageio.bombs import check_jpeg_scans, check_tiff_tiles, tag_value
from automask.imageio.loading import loading
from automask.imageio.orientation import note
from automask.imageio.pixels import flatten, rgb_array
from automask.imageio.profile import to_srgb
from automask.imageio.samples import scale_16bit, to_uint8, wide_to_uint8
from automask.imageio.unreadable import unidentified_message
from automask.settings import Settings

ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF", "PPM", "TGA", "QOI")

# What Pillow raises on damaged input (UnidentifiedImageError is an OSError; RuntimeError: the AVIF plugin's "Failed
# to decode image"; OverflowError: a TIFF strip offset past 2**63).
PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    RuntimeError,
    OverflowError,
    SyntaxError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    struct.error,
    zlib.error,
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# EXIF orientation -> the transform that turns the stored pixels into the displayed ones (H×W×C arrays).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180°
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed (mirror across the main diagonal)
    6: lambda a: np.rot90(a, -1),  # stored rotated 90° counter-clockwise: turn clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed
    8: lambda a: np.rot90(a, 1),  # stored rotated 90° clockwise: turn counter-clockwise
}


@functools.cache
def readable_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (plugins are registered on first use)."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def check_encoded_size(size: int, settings: Settings, *, read: bool = False) -> None:
    """Raise `ImageTooLargeError` if `size` bytes of encoded image exceed `settings.max_image_bytes`. `read`: `size`
    is what was read of a source read no further than one byte past the limit, so the image is over the limit."""
    if size > settings.max_image_bytes:
        told = f"over {settings.max_image_bytes:,}" if read else f"{size:,}"
        raise ImageTooLargeError(
            f"The image is {told} bytes; the limit is {settings.max_image_bytes:,} bytes "
            "(AUTOMASK_MAX_IMAGE_BYTES). Send a smaller file or raise the limit."
        )


def check_pixels(width: int, height: int, settings: Settings) -> None:
    """Raise `ImageTooLargeError` if a width×height image exceeds `settings.max_image_pixels`."""
    if width * height > settings.max_image_pixels:
        raise ImageTooLargeError(
            f"The image is {width}×{height} = {width * height:,} pixels; the limit is "
            f"{settings.max_image_pixels:,} pixels (AUTOMASK_MAX_IMAGE_PIXELS). Downscale it or raise the limit."
        )


def check_decoded_pixels(img: Image.Image, settings: Settings) -> None:
    """`check_pixels` for an opened image, and for a tiled TIFF its tiles too (`bombs.check_tiff_tiles`)."""
    check_pixels(img.width, img.height, settings)
    check_tiff_tiles(img, settings)


def decode_image(data: bytes, settings: Settings, *, keep_alpha: bool = False) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, WebP, ...) into an H×W×3 uint8 RGB array, EXIF orientation applied
    (H×W×4 RGBA for an image with transparency when `keep_alpha`)."""
    with _open(data, settings) as img:
        try:
            shown = apng.first_shown_frame(img)
        except PIL_ERRORS:
            pass  # that frame cannot be read
        else:
            return pil_to_rgb(shown, settings, keep_alpha=keep_alpha)
    with _open(data, settings) as img:  # an APNG whose animation is damaged: its default image, as a viewer shows
        return pil_to_rgb(img, settings, keep_alpha=keep_alpha)


def check_header(data: bytes, settings: Settings) -> None:
    """Raise now what `decode_image(data)` raises before decoding any pixel: over the byte or pixel limits
    (`ImageTooLargeError`), empty or not an image of an allowed format (`ImageDecodeError`). Reads the header only."""
    _open(data, settings).close()


def _open(data: bytes, settings: Settings) -> Image.Image:
    """Open `data` lazily (header only), after checking its size, and check its pixel count before anything is
    decoded.

    Our limit is the one that counts: Pillow's own (`Image.MAX_IMAGE_PIXELS`, ~89.5 MP, which warns above it and
    refuses above twice it) is raised to `settings.max_image_pixels` when that is higher (never lowered), and its
    warning is left to our check, which follows at once.
    """
    check_encoded_size(len(data), settings)
    if not data:
        raise ImageDecodeError("The image is empty (0 bytes). Send the bytes of a JPEG, PNG or WebP file.")
    _raise_pillow_limit(settings.max_image_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=readable_formats())
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, settings) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(unidentified_message(data, readable_formats())) from None
    except PIL_ERRORS as exc:
        raise ImageDecodeError(f"The image could not be read: it is corrupt or truncated ({exc}).") from None
    try:
        check_decoded_pixels(img, settings)
        if img.format in ("JPEG", "MPO"):
            check_jpeg_scans(data)
    except (ImageTooLargeError, ImageDecodeError):
        img.close()
        raise
    return img


def _bomb_error(exc: Image.DecompressionBombError, settings: Settings) -> ImageTooLargeError:
    """Pillow's refusal `exc` of an image past twice its own limit (which is at least ours: `_raise_pillow_limit`)
    told with our limit and its setting; Pillow's threshold, which no setting of ours names, is left out."""
    size = re.search(r"\((\d+) pixels\)", str(exc))
    told = f"{int(size.group(1)):,} pixels" if size else "more pixels than that"
    return ImageTooLargeError(
        f"The image is {told}; the limit is {settings.max_image_pixels:,} pixels (AUTOMASK_MAX_IMAGE_PIXELS). "
        "Downscale it or raise the limit."
    )


def _raise_pillow_limit(pixels: int) -> None:
    """Let Pillow open images of up to `pixels` pixels (a process-wide setting of Pillow's; only ever raised)."""
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = pixels


def pil_to_rgb(img: Image.Image, settings: Settings, *, keep_alpha: bool = False, shared: bool = False) -> np.ndarray:
    """A PIL image (its current frame) -> H×W×3 uint8 RGB, EXIF orientation applied, pixel limit checked
    (H×W×4 RGBA, straight alpha, for an image with transparency when `keep_alpha`). `shared`: the image is the
    caller's, so other threads may be reading it too (its pixels are then loaded under its lock: `loading`)."""
    check_decoded_pixels(img, settings)
    try:
        with loading(img) if shared else contextlib.nullcontext():
            check_usable(img)
            img.load()
        rgb = _pil_pixels(to_srgb(img), keep_alpha)
    except Image.DecompressionBombError as exc:  # a GIF frame that widens the canvas: Pillow checks it on load
        raise _bomb_error(exc, settings) from None
    except ImageDecodeError:  # ours: it says what is wrong (not corrupt, e.g. float samples out of range)
        raise
    except PIL_ERRORS as exc:
        if str(exc) == _CLOSED:
            raise _closed_error() from None
        raise ImageDecodeError(f"The image could not be decoded: it is corrupt or truncated ({exc}).") from None
    orientation = exif_orientation(img)
    note(img, orientation)
    oriented = _ORIENT[orientation](rgb)
    return np.ascontiguousarray(oriented)


def check_usable(img: Image.Image) -> None:
    """`ImageDecodeError` for a PIL image without pixels to read: one of width or height 0, or closed before its
    pixels were read from its file (as `with Image.open(path) as img:` leaves it; Pillow's `load` would fail an
    assertion). One closed by `img.close()` is found when read (`_CLOSED`)."""
    if img.width == 0 or img.height == 0:
        raise ImageDecodeError(f"The image is empty ({img.width}×{img.height} pixels).")
    if getattr(img, "tile", None) and getattr(img, "fp", True) is None:
        raise _closed_error()


_CLOSED = "Operation on closed image"
"""Pillow's error for any use of an image after its `close()`."""


def _closed_error() -> ImageDecodeError:
    return ImageDecodeError(
        "The PIL image was closed before automask read it (e.g. used after its `with Image.open(...)` block): "
        "pass it while open, call its load() before closing it, or pass the file's path."
    )


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1–8) of `img`; 1 when absent or unreadable (a damaged EXIF block is ignored)."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except PIL_ERRORS:
        return 1
    return value if isinstance(value, int) and value in _ORIENT else 1


def _pil_pixels(img: Image.Image, keep_alpha: bool) -> np.ndarray:
    """The pixels of a loaded PIL image as H×W×3 uint8 RGB (H×W×4 RGBA if `keep_alpha` and it has transparency),
    stored orientation."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return rgb_array(img)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and img.format == "PPM"):  # samples on the 0..65535 scale
        # (Pillow reads a 16-bit PGM as mode "I", scaled to 0..65535 whatever its maxval)
        values = np.asarray(img)
        gray = _gray(scale_16bit(values))
        transparent = img.info.get("transparency")
        if isinstance(transparent, int):  # PNG tRNS: one 16-bit gray level is transparent
            alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
            return flatten(np.dstack([gray, alpha]), keep_alpha)
        return gray
    if mode in _ALPHA_MODES or "transparency" in img.info or _palette_alpha(img):
        straight = img.convert("LA") if mode == "La" else img  # Pillow converts premultiplied La to LA only
        return flatten(np.asarray(straight.convert("RGBA")), keep_alpha)
    if mode == "I":
        values = np.asarray(img)
        return _gray(wide_to_uint8(values.view(np.uint32) if _unsigned_32(img) else values))
    if mode == "F":
        return _gray(to_uint8(np.asarray(img)))
    try:
        return np.array(img.convert("RGB"))
    except ValueError:
        raise ImageDecodeError(f"Images in colour mode {mode!r} are not supported; convert it to RGB.") from None


def _palette_alpha(img: Image.Image) -> bool:
    """Whether `img` is a palette image whose palette holds alpha: what `quantize()` or `convert("P")` of an RGBA
    image and `putpalette(..., "RGBA")` make in memory (a PNG file says so in `info["transparency"]`)."""
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _unsigned_32(img: Image.Image) -> bool:
    """Whether the mode "I" image `img` is a TIFF of unsigned 32-bit samples (BitsPerSample 32, SampleFormat 1 or
    absent), which Pillow reads as int32: values past 2**31 - 1 wrapped to negative ones."""
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None:
        return False
    from PIL.TiffImagePlugin import BITSPERSAMPLE, SAMPLEFORMAT  # (loaded already: the image was opened by it)

    return [tag_value(tags, BITSPERSAMPLE, 1), tag_value(tags, SAMPLEFORMAT, 1)] == [32, 1]


def array_to_rgb(a: np.ndarray, settings: Settings, *, keep_alpha: bool = False) -> np.ndarray:
    """An H×W, H×W×1, H×W×3 (RGB) or H×W×4 (RGBA) array -> a new H×W×3 uint8 RGB array (alpha over white; kept,
    H×W×4, when `keep_alpha` and some pixel is not opaque). A subclass (`np.matrix`, a masked array) is read as the
    plain array of its samples."""
    a = np.asarray(a)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageDecodeError(f"Array images must be H×W, H×W×1, H×W×3 or H×W×4; got shape {a.shape}.{_layout(a)}")
    height, width = a.shape[:2]
    if height == 0 or width == 0:
        raise ImageDecodeError(f"The image array is empty (shape {a.shape}).")
    check_pixels(width, height, settings)
    pixels = to_uint8(a)
    if pixels.ndim == 2 or pixels.shape[2] == 1:
        return _gray(pixels.reshape(height, width))
    if pixels.shape[2] == 4:
        return flatten(pixels, keep_alpha)
    return np.array(pixels, dtype=np.uint8, order="C", copy=True)


def _layout(a: np.ndarray) -> str:
    """A hint for an array of another shape that holds one image: channels-first (as torch stores it), or in a
    batch of one; else ''."""
    if a.ndim == 3 and a.shape[0] in (1, 3, 4):
        return " It looks channels-first (C×H×W, as torch stores images): pass a.transpose(1, 2, 0)."
    if a.ndim == 4 and a.shape[0] == 1 and a.shape[1] in (1, 3, 4):
        return " It looks like a batch of one C×H×W image: pass a[0].transpose(1, 2, 0)."
    if a.ndim == 4 and a.shape[0] == 1 and a.shape[3] in (1, 3, 4):
        return " It looks like a batch of one image: pass a[0]."
    return ""


def _gray(values: np.ndarray) -> np.ndarray:
    """H×W uint8 -> H×W×3 uint8 (the same value in R, G and B)."""
    return np.repeat(values[:, :, None], 3, axis=2)
