"""Image input: every source kind and the decoding edge cases real files bring (no network here)."""

from __future__ import annotations

import base64
import io
import re
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import ExifTags, Image, ImageOps, features
from skimage import data as skimage_data

from automask.errors import AutomaskError, ImageDecodeError, ImageTooLargeError, URLRefusedError
from automask.imageio import ImageSource, load_image
from automask.imageio.bombs import MAX_JPEG_SCANS
from automask.imageio.decode import to_uint8
from automask.imageio.load import BASE64_CHUNK, check_image, decode_base64, decode_data_uri
from automask.imageio.pixels import composite_on_white
from automask.settings import Settings

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def raw_png(width: int, height: int, depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG written by hand: IHDR as given (any size), `idat` as the compressed data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_of(array: np.ndarray) -> bytes:
    return encode(Image.fromarray(array), "PNG")


def close(actual: np.ndarray, expected: tuple[int, ...], tol: int) -> bool:
    return bool(np.all(np.abs(actual.astype(int) - np.array(expected)) <= tol))


@pytest.fixture()
def small_rgb() -> np.ndarray:
    """A 6×5×3 uint8 image with distinct values in every channel."""
    return np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3) * 2


# --- EXIF orientation --------------------------------------------------------------------------------------

# Where the stored top-left (red) and top-right (green) corners appear once displayed, per the EXIF spec.
ORIENTATIONS = {
    1: ("TL", "TR"),
    2: ("TR", "TL"),
    3: ("BR", "BL"),
    4: ("BL", "BR"),
    5: ("TL", "BL"),
    6: ("TR", "BR"),
    7: ("BR", "TR"),
    8: ("BL", "TL"),
}


def corner(a: np.ndarray, name: str, size: int = 6) -> np.ndarray:
    """The mean colour of a size×size patch inset by 2 px at the named corner."""
    h, w = a.shape[:2]
    rows = slice(2, 2 + size) if name[0] == "T" else slice(h - 2 - size, h - 2)
    cols = slice(2, 2 + size) if name[1] == "L" else slice(w - 2 - size, w - 2)
    return a[rows, cols].reshape(-1, 3).mean(axis=0)


def marked_jpeg(orientation: int | None, exif_bytes: bytes | None = None) -> bytes:
    """A 40×64 (H×W) white JPEG, red block at the stored top-left, green at the stored top-right."""
    stored = np.full((40, 64, 3), 255, np.uint8)
    stored[:12, :12] = RED
    stored[:12, -12:] = GREEN
    img = Image.fromarray(stored)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        exif_bytes = exif.tobytes()
    return encode(img, "JPEG", quality=95, **({"exif": exif_bytes} if exif_bytes else {}))


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_moves_pixels(orientation: int, settings: Settings) -> None:
    out = load_image(marked_jpeg(orientation), settings)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert out.shape == ((40, 64, 3) if orientation <= 4 else (64, 40, 3))
    red_at, green_at = ORIENTATIONS[orientation]
    assert close(corner(out, red_at), RED, 40), (orientation, corner(out, red_at))
    assert close(corner(out, green_at), GREEN, 40), (orientation, corner(out, green_at))
    others = {"TL", "TR", "BL", "BR"} - {red_at, green_at}
    for name in others:
        assert close(corner(out, name), WHITE, 20)


def test_exif_orientation_applies_to_pil_input(settings: Settings) -> None:
    opened = Image.open(io.BytesIO(marked_jpeg(6)))
    out = load_image(opened, settings)
    assert out.shape == (64, 40, 3)
    assert close(corner(out, "TR"), RED, 40)


def test_a_pil_images_exif_orientation_is_applied_as_pillow_keeps_it(settings: Settings) -> None:
    """The documented rule for PIL images: Pillow keeps the source's EXIF Orientation through `convert`, `crop`,
    `rotate` and `transpose` alike (it cannot tell an edit that keeps the stored orientation from one that turns the
    image), and automask applies the tag it finds, as it does for a file; `ImageOps.exif_transpose` removes it. So
    an image turned upright by hand is turned again, unless its tag is deleted, as the README says to."""
    opened = Image.open(io.BytesIO(marked_jpeg(6)))
    upright = load_image(opened, settings)
    assert np.array_equal(load_image(opened.convert("RGB"), settings), upright)
    assert np.array_equal(load_image(ImageOps.exif_transpose(opened), settings), upright)
    by_hand = opened.rotate(-90, expand=True)  # what orientation 6 asks for, done by hand
    assert by_hand.size == (40, 64) and by_hand.getexif()[ExifTags.Base.Orientation] == 6  # Pillow kept the tag
    assert load_image(by_hand, settings).shape == (40, 64, 3)  # so it is turned again: the stored orientation
    del by_hand.getexif()[ExifTags.Base.Orientation]
    assert np.array_equal(load_image(by_hand, settings), upright)


def test_damaged_exif_is_ignored_not_fatal(settings: Settings) -> None:
    out = load_image(marked_jpeg(None, exif_bytes=b"Exif\x00\x00MM\x00*garbage-garbage"), settings)
    assert out.shape == (40, 64, 3)
    assert close(corner(out, "TL"), RED, 40)


# --- colour modes ------------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(settings: Settings) -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    out = load_image(encode(cmyk, "JPEG", quality=95), settings)
    assert out.shape == (8, 16, 3)
    assert close(out[4, 8], RED, 12)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_composites_on_white(fmt: str, settings: Settings) -> None:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.putpixel((3, 1), 1)
    img.info["transparency"] = 1
    out = load_image(encode(img, fmt, transparency=1), settings)
    assert out.shape == (2, 4, 3)
    assert tuple(out[0, 0]) == RED
    assert tuple(out[1, 3]) == WHITE  # the transparent (blue) pixel


def test_palette_without_transparency(settings: Settings) -> None:
    img = Image.new("P", (3, 3), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    assert tuple(load_image(encode(img, "PNG"), settings)[1, 1]) == BLUE


def test_la_alpha_composites_on_white(settings: Settings) -> None:
    la = np.zeros((1, 3, 2), np.uint8)
    la[0, 0] = (0, 255)  # opaque black
    la[0, 1] = (0, 0)  # transparent black
    la[0, 2] = (0, 128)  # half-transparent black
    out = load_image(encode(Image.fromarray(la, "LA"), "PNG"), settings)
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[0, 1]) == WHITE
    assert tuple(out[0, 2]) == (127, 127, 127)


def test_rgba_composites_on_white(settings: Settings) -> None:
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)
    out = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), settings)
    assert [tuple(p) for p in out[0]] == [RED, WHITE, (127, 127, 255)]


def test_grayscale_l_and_bilevel(settings: Settings) -> None:
    gray = np.array([[0, 100, 255]], np.uint8)
    out = load_image(encode(Image.fromarray(gray), "PNG"), settings)
    assert out.shape == (1, 3, 3) and np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert [tuple(p) for p in load_image(encode(bilevel, "PNG"), settings)[0]] == [WHITE, (0, 0, 0)]


def test_16bit_grayscale_png_is_scaled_not_clipped(settings: Settings) -> None:
    values = np.array([[0, 257 * 100, 65535, 32768]], np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # the case under test
    out = load_image(data, settings)
    assert out[0, :, 0].tolist() == [0, 100, 255, 128]


def test_16bit_grayscale_png_with_a_transparent_level(settings: Settings) -> None:
    """Before: the tRNS branch converted I;16 to RGBA first, clipping every value over 255 to white."""
    values = np.full((2, 3), 30000, np.uint16)
    values[0, 0] = 5  # the transparent level
    out = load_image(encode(Image.fromarray(values), "PNG", transparency=5), settings)
    assert out[1, 1].tolist() == [117] * 3 and out[0, 0].tolist() == [255] * 3  # 30000·255/65535; over white


def test_16bit_pgm_is_scaled_whatever_its_values(settings: Settings) -> None:
    """Pillow opens a 16-bit PGM as mode "I" on the 0..65535 scale: never guessed from the image's own range."""
    dark = b"P5\n2 1\n65535\n" + np.array([200, 200], ">u2").tobytes()
    mixed = b"P5\n2 1\n65535\n" + np.array([200, 300], ">u2").tobytes()
    assert load_image(dark, settings)[0, :, 0].tolist() == [1, 1]
    assert load_image(mixed, settings)[0, :, 0].tolist() == [1, 1]


def test_16bit_arrays_of_either_byte_order(settings: Settings) -> None:
    values = np.array([[200, 255]], np.uint16)  # a dark 16-bit image: never mistaken for 8-bit values
    assert load_image(values.astype(">u2"), settings)[0, :, 0].tolist() == [1, 1]
    assert load_image(values.astype("<u2"), settings)[0, :, 0].tolist() == [1, 1]


def test_16bit_rgb_png(settings: Settings) -> None:
    pixels = np.array([[[65535, 0, 32896], [257 * 7, 65280, 0]]], dtype=">u2")
    out = load_image(raw_png(2, 1, 16, 2, zlib.compress(b"\x00" + pixels.tobytes())), settings)
    assert out.tolist() == (pixels >> 8).tolist()  # Pillow keeps the high byte of 16-bit colour (README says so)
    assert np.abs(out.astype(float) - np.rint(pixels.astype(float) / 257)).max() <= 1


def test_32bit_int_and_float_tiff(settings: Settings) -> None:
    ints = np.array([[0, 255 * 257, 65535]], np.int32)
    assert load_image(encode(Image.fromarray(ints), "TIFF"), settings)[0, :, 1].tolist() == [0, 255, 255]
    floats = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert load_image(encode(Image.fromarray(floats), "TIFF"), settings)[0, :, 0].tolist() == [0, 128, 255]


def test_a_float_tiff_out_of_range_is_told_about_its_samples_not_about_arrays(settings: Settings) -> None:
    for values, words in [([0.0, 400.0], "Float images must hold samples in 0–1 or 0–255, got 0 to 400"),
                          ([-3.0, 1.0], "Float images must hold samples in 0–1 or 0–255, got -3 to 1"),
                          ([np.nan, 1.0], "NaN or infinite")]:  # fmt: skip
        with pytest.raises(ImageDecodeError, match=re.escape(words)) as caught:
            load_image(encode(Image.fromarray(np.array([values], np.float32)), "TIFF"), settings)
        assert "array" not in str(caught.value)  # the user sent a file


def tiff_of(array: np.ndarray) -> bytes:
    """`array` as a TIFF that keeps its sample type (tifffile: int32, uint32, int16, big-endian uint16...)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


CAMERA = skimage_data.camera()[::4, ::3]  # 128×171 uint8: a real photo, not square (rows and columns kept apart)


@pytest.mark.parametrize(
    ("samples", "mode"),
    [
        ((CAMERA.astype(np.int64) * (2**31 - 1) // 255).astype(np.int32), "I"),  # int32, its whole range
        ((CAMERA.astype(np.int64) * (2**32 - 1) // 255).astype(np.uint32), "I"),  # uint32: Pillow wraps past 2**31
        ((CAMERA.astype(np.int64) * 257).astype(">u2"), "I;16B"),  # big-endian 16-bit
        ((CAMERA.astype(np.int64) * 257 - 32768).astype(np.int16), "I"),  # signed 16-bit, its whole range
    ],
    ids=["int32", "uint32", "uint16-big-endian", "int16"],
)
def test_32bit_and_signed_tiff_are_scaled_by_their_type(samples: np.ndarray, mode: str, settings: Settings) -> None:
    """Before: "corrupt or truncated" (values past 65535, or negative). Now: the type's range onto 0..255."""
    data = tiff_of(samples)
    assert Image.open(io.BytesIO(data)).mode == mode
    out = load_image(data, settings)
    assert out.shape == (*CAMERA.shape, 3) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 1].astype(int) - CAMERA).max() <= 1, np.abs(out[..., 1].astype(int) - CAMERA).max()


def test_32bit_tiff_keeps_its_darkness_and_signed_zero_is_mid_gray(settings: Settings) -> None:
    dim = (CAMERA.astype(np.int64) * 2**22).astype(np.int32)  # up to 2**30: half the int32 range
    assert np.abs(load_image(tiff_of(dim), settings)[..., 0].astype(int) - CAMERA / 2).max() <= 1
    signed = np.array([[-(2**31), -(2**26), 0, 2**31 - 1]], np.int32)
    assert load_image(tiff_of(signed), settings)[0, :, 0].tolist() == [0, 124, 128, 255]


def test_32bit_int_tiff_masks_at_the_image_size(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    from automask import MaskGenerator

    path = tmp_path / "camera.tif"
    path.write_bytes(tiff_of((CAMERA.astype(np.int64) * 2**23).astype(np.int32)))
    result = MaskGenerator(str(tiny_clipseg_dir)).generate(path, "person", threshold=0.0)
    assert result.mask.shape == CAMERA.shape and (result.width, result.height) == (171, 128)


def test_a_32bit_tiff_just_over_65535_is_scaled_by_its_type_as_documented(settings: Settings) -> None:
    """README: a 32-bit TIFF's values all in 0–65535 are read as 16-bit; one value above, and the type's maximum
    scales them all (int32: 2**31 - 1; uint32: 2**32 - 1), so 65536 is black: no guess from the image's own range."""
    assert load_image(tiff_of(np.array([[0, 32768, 65535]], np.int32)), settings)[0, :, 0].tolist() == [0, 128, 255]
    for dtype in (np.int32, np.uint32):
        just_over = np.array([[0, 32768, 65535, 65536, 2**24]], dtype)
        assert load_image(tiff_of(just_over), settings)[0, :, 0].tolist() == [0, 0, 0, 0, 2 if dtype == np.int32 else 1]


@pytest.mark.parametrize(
    ("samples", "told"),
    [
        (np.zeros((4, 5), np.int64), "1 sample per pixel of 64-bit signed integers"),
        (np.zeros((4, 5), np.float64), "1 sample per pixel of 64-bit floats"),
        (np.zeros((4, 5, 3), np.int32), "3 samples per pixel of 32-bit signed integers"),
        (np.zeros((4, 5, 3), np.uint32), "3 samples per pixel of 32-bit unsigned integers"),
    ],
)
def test_a_tiff_of_samples_pillow_cannot_read_is_not_called_corrupt(
    samples: np.ndarray, told: str, settings: Settings
) -> None:
    """Before: "starts like a TIFF file but could not be read: it is corrupt or truncated" for a sound TIFF of a
    sample layout Pillow has no mode for (64-bit, or 32-bit colour: a 32-bit TIFF of 65536 in RGB, say)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, samples, photometric="rgb" if samples.ndim == 3 else "minisblack")
    with pytest.raises(ImageDecodeError) as caught:
        load_image(buf.getvalue(), settings)
    assert str(caught.value) == (
        f"The TIFF image has {told}, which automask cannot read: save it with 8- or 16-bit samples (or one 32-bit "
        "sample per pixel)."
    )
    damaged = bytearray(buf.getvalue())
    damaged[4:8] = struct.pack("<I", len(damaged) + 100)  # its first directory past the end: damaged
    with warnings.catch_warnings(), pytest.raises(ImageDecodeError, match="starts like a TIFF file but could not"):
        warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data"
        load_image(bytes(damaged), settings)


def test_float_tiff_out_of_range_is_not_called_corrupt(settings: Settings) -> None:
    with pytest.raises(ImageDecodeError, match="0–1 or 0–255") as err:
        load_image(tiff_of(CAMERA.astype(np.float32) * 1000), settings)
    assert "corrupt" not in str(err.value)


def frames(fmt: str) -> bytes:
    first = Image.new("RGB", (8, 6), RED)
    second = Image.new("RGB", (8, 6), BLUE)
    data = encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)
    check = Image.open(io.BytesIO(data))
    assert getattr(check, "n_frames", 1) == 2
    check.seek(1)
    assert close(np.asarray(check.convert("RGB"))[3, 4], BLUE, 8)  # the second frame really differs
    return data


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_gives_first_frame(fmt: str, settings: Settings) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    out = load_image(frames(fmt), settings)
    assert out.shape == (6, 8, 3)
    assert close(out[3, 4], RED, 8)


GRAY16 = {RED: 20_000, GREEN: 60_000, BLUE: 40_000}
"""The 16-bit gray level `apng_with_a_fallback` writes for each colour (colour type 0)."""


def apng_with_a_fallback(blend: int, colour_type: int = 6, key: tuple[int, int, int] | None = None) -> bytes:
    """An 8×6 APNG written by hand whose default image (IDAT: opaque red, what a viewer without APNG shows) is not
    part of the animation: its one frame is a 4×3 green rectangle at (2, 1) (`blend`: 0 source, 1 over); the rest
    of the canvas is transparent, as every animation starts (APNG spec). `colour_type` 6 is RGBA, 2 RGB (no alpha
    channel), 3 palette and 0 16-bit gray (`GRAY16` gives each colour's level); with `key`, a tRNS chunk makes that
    RGB colour transparent, and the frame's first column is that colour."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    palette = [RED, GREEN, *([key] if key else [])]

    def pixel(rgb: tuple[int, ...]) -> bytes:
        if colour_type == 0:
            return struct.pack(">H", GRAY16[rgb])
        return {6: bytes((*rgb, 255)), 2: bytes(rgb), 3: bytes([palette.index(rgb)])}[colour_type]

    def rows(width: int, height: int, rgb: tuple[int, ...], first: tuple[int, ...] | None = None) -> bytes:
        return zlib.compress((b"\x00" + pixel(first or rgb) + pixel(rgb) * (width - 1)) * height)

    ihdr = struct.pack(">IIBBBBB", 8, 6, 16 if colour_type == 0 else 8, colour_type, 0, 0, 0)
    fctl = struct.pack(">IIIIIHHBB", 0, 4, 3, 2, 1, 1, 10, 0, blend)
    trns = b""
    if key and colour_type == 0:
        trns = chunk(b"tRNS", struct.pack(">H", GRAY16[key]))
    elif key and colour_type == 2:
        trns = chunk(b"tRNS", struct.pack(">HHH", *key))
    elif key:
        trns = chunk(b"tRNS", bytes([255] * (len(palette) - 1) + [0]))
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", ihdr),
            chunk(b"PLTE", b"".join(bytes(c) for c in palette)) if colour_type == 3 else b"",
            trns,
            chunk(b"acTL", struct.pack(">II", 1, 0)),
            chunk(b"IDAT", rows(8, 6, RED)),
            chunk(b"fcTL", fctl),
            chunk(b"fdAT", struct.pack(">I", 1) + rows(4, 3, GREEN, key)),
            chunk(b"IEND", b""),
        ]
    )


@pytest.mark.parametrize("blend", [0, 1])
def test_an_apng_whose_default_image_is_a_fallback_gives_its_first_frame(blend: int, settings: Settings) -> None:
    """Before: the default image (a fallback for viewers without APNG, which browsers never show) was masked. Now
    the animation's first frame, as browsers show it: on a transparent canvas, not over the fallback."""
    data = apng_with_a_fallback(blend)
    assert Image.open(io.BytesIO(data)).info.get("default_image") is True
    shown = np.full((6, 8, 3), 255, np.uint8)  # transparent: on white
    shown[1:4, 2:6] = GREEN
    assert load_image(data, settings).tolist() == shown.tolist()
    cutout = load_image(data, settings, keep_alpha=True)
    assert cutout.shape == (6, 8, 4) and cutout[..., 3].sum() == 255 * 12 and cutout[2, 3].tolist() == [*GREEN, 255]
    frame = data.index(b"fdAT") - 4
    for damaged in (data[:frame] + data[-12:], data[: frame + 20]):  # no frame, a truncated one: the default image
        assert load_image(damaged, settings)[0, 0].tolist() == list(RED)
    red, green, blue = (Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE))  # as Pillow writes them
    assert load_image(encode(red, "PNG", save_all=True, append_images=[green, blue], default_image=True), settings)[
        3, 4
    ].tolist() == list(GREEN)


@pytest.mark.parametrize("blend", [0, 1])
@pytest.mark.parametrize(("colour_type", "key"), [(2, None), (3, None), (2, BLUE), (3, BLUE)])
def test_an_apng_without_alpha_shows_the_canvas_its_first_frame_leaves_transparent(
    blend: int, colour_type: int, key: tuple[int, int, int] | None, settings: Settings
) -> None:
    """Before: an RGB or palette APNG (no alpha channel) whose fallback default image is followed by a first frame
    smaller than the canvas gave black (value 0, or palette colour 0: here red) around that frame, where browsers
    show the page through (the APNG canvas starts transparent); and a colour-keyed (tRNS) pixel of a frame blended
    "over" came out black. Now both are transparent: white for the models, alpha 0 in a cut-out."""
    data = apng_with_a_fallback(blend, colour_type, key)
    assert Image.open(io.BytesIO(data)).mode == {2: "RGB", 3: "P"}[colour_type]
    shown = np.full((6, 8, 3), 255, np.uint8)  # transparent: on white
    shown[1:4, 2 if key is None else 3 : 6] = GREEN
    assert load_image(data, settings).tolist() == shown.tolist()
    cutout = load_image(data, settings, keep_alpha=True)
    alpha = np.zeros((6, 8), np.uint8)
    alpha[1:4, 2 if key is None else 3 : 6] = 255
    assert cutout.shape == (6, 8, 4) and cutout[..., 3].tolist() == alpha.tolist()


@pytest.mark.parametrize("blend", [0, 1])
@pytest.mark.parametrize("key", [None, BLUE])
def test_a_16_bit_gray_apng_shows_the_canvas_its_first_frame_leaves_transparent(
    blend: int, key: tuple[int, int, int] | None, settings: Settings
) -> None:
    """Before: a 16-bit gray APNG (mode I;16) whose fallback default image is followed by a first frame smaller than
    the canvas gave black around that frame, opaque in a cut-out, where browsers show the page through, as they do
    for 8-bit gray, RGB and palette APNGs, which automask shows transparent (white for the models, alpha 0)."""
    data = apng_with_a_fallback(blend, 0, key)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    left = 2 if key is None else 3  # a colour-keyed first column is transparent too
    shown = np.full((6, 8), 255, np.uint8)  # transparent: on white
    shown[1:4, left:6] = round(GRAY16[GREEN] * 255 / 65535)
    assert load_image(data, settings)[..., 0].tolist() == shown.tolist()
    cutout = load_image(data, settings, keep_alpha=True)
    alpha = np.zeros((6, 8), np.uint8)
    alpha[1:4, left:6] = 255
    assert cutout.shape == (6, 8, 4) and cutout[..., 3].tolist() == alpha.tolist()
    assert cutout[2, 4].tolist() == [233, 233, 233, 255]


def test_a_palette_apng_whose_default_image_is_a_fallback_keeps_its_colours(settings: Settings) -> None:
    """Before: a palette APNG (as GIF converters and optimisers write them) whose default image is a fallback gave
    its first frame black: the blank canvas it is drawn on had no palette, so every index read as black."""
    red, green = (Image.new("RGB", (8, 6), colour).convert("P") for colour in (RED, GREEN))
    data = encode(red, "PNG", save_all=True, append_images=[green], default_image=True)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert np.unique(load_image(data, settings).reshape(-1, 3), axis=0).tolist() == [list(GREEN)]


# --- bad input ---------------------------------------------------------------------------------------------


def test_corrupt_inputs_give_clear_errors(settings: Settings, small_rgb: np.ndarray) -> None:
    jpeg = encode(Image.fromarray(np.tile(small_rgb, (20, 20, 1))), "JPEG")
    png = bytearray(png_of(small_rgb))
    png[45] ^= 0xFF  # inside IDAT's data: its CRC no longer matches
    bad_chunk = bytearray(png_of(small_rgb))
    bad_chunk[12] ^= 0xFF  # IHDR's chunk type
    cases = {
        b"": "empty",
        bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)): "not in a known format",
        b"<!doctype html><html><body>Not found</body></html>": "looks like text",
        jpeg[: len(jpeg) // 2]: "corrupt or truncated",
        bytes(png): "corrupt or truncated",
        bytes(bad_chunk): "starts like a PNG file",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n": "looks like text",  # EPS is never opened
    }
    for data, phrase in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            load_image(data, settings)
        assert phrase in str(info.value), (data[:20], str(info.value))


@pytest.mark.parametrize(
    ("data", "told"),
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "a HEIC/HEIF image (an iPhone's photo)"),
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heicmiaf" + bytes(64), "a HEIC/HEIF image (an iPhone's photo)"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4"/>', "an SVG (vector) image"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "a PDF document"),
    ],
)
def test_a_common_format_automask_cannot_read_is_named(data: bytes, told: str, settings: Settings) -> None:
    """Before: an iPhone's HEIC photo was "not in a known format", an SVG "looks like text (HTML, JSON or similar)":
    the user was not told what they sent. Now it is named, with what to do."""
    with pytest.raises(ImageDecodeError) as caught:
        load_image(data, settings)
    assert str(caught.value).startswith(f"The input is {told}, which automask cannot read: convert it to PNG or JPEG")


def test_a_web_page_with_an_inline_svg_is_not_called_an_svg(settings: Settings) -> None:
    """Before: a web page (a page's URL given for its image's, a login or error page) showing an inline icon near its
    top was "an SVG (vector) image ... convert it to PNG": the user was told to convert a page. It is text again."""
    page = b'<!DOCTYPE html>\n<html lang="en"><head><title>Sign in</title></head><body><svg viewBox="0 0 8 8"></svg>'
    with pytest.raises(ImageDecodeError) as caught:
        load_image(page + b"</body></html>", settings)
    assert str(caught.value).startswith("The input looks like text (HTML, JSON or similar), not an image")


def test_base64_text_or_a_url_given_as_bytes_says_so(settings: Settings, small_rgb: np.ndarray) -> None:
    """Before: `base64.b64encode(data)` (which returns bytes, not str) and a URL as bytes were "text (HTML, JSON or
    similar), not an image": nothing said that the same text given as a string is read."""
    encoded = base64.b64encode(png_of(small_rgb))
    for data in (encoded, encoded + b"\n", b"data:image/png;base64," + encoded):
        with pytest.raises(
            ImageDecodeError, match=r"^The input is base64 text .*decode it first, or pass it as text .*a Python str"
        ):
            load_image(data, settings)
        assert np.array_equal(load_image(data.decode(), settings), small_rgb)
    with pytest.raises(ImageDecodeError, match=r"^The input is a URL, .*pass the URL itself as text .*a Python str"):
        load_image(b"https://example.com/photo.jpg", settings)


def test_damaged_files_never_escape_as_tracebacks(small_rgb: np.ndarray) -> None:
    """Truncations and byte flips of every format: an RGB array or an AutomaskError, nothing else."""
    settings = Settings(max_image_pixels=1_000_000)
    img = Image.fromarray(np.tile(small_rgb, (6, 6, 1)))
    rng = np.random.default_rng(1)
    for fmt in ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]:
        data = encode(img, fmt)
        variants = [data[:cut] for cut in np.linspace(1, len(data) - 1, 12).astype(int)]
        for _ in range(12):
            flipped = bytearray(data)
            for pos in rng.integers(0, len(data), 3):
                flipped[pos] = int(rng.integers(0, 256))
            variants.append(bytes(flipped))
        for variant in variants:
            try:
                out = load_image(variant, settings)
            except AutomaskError:
                continue
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


TIFF_FIELDS = ((256, 3, 4), (257, 3, 4), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 16, 0), (278, 3, 4), (279, 4, 16))
"""A 4×4 8-bit grey uncompressed TIFF's fields: (tag, type, value); StripOffsets (273) is a LONG8 (type 16)."""
TIFF_STRIP = 8 + 2 + 12 * len(TIFF_FIELDS) + 4 + 8
"""Where the pixels of `tiff_with_strip_offset` are: after the header, the IFD and the LONG8 value."""


def tiff_with_strip_offset(offset: int) -> bytes:
    """A 4×4 black TIFF (`TIFF_FIELDS`) whose one strip is said to start at `offset` (up to 2**64 - 1)."""
    out = b"II*\x00" + struct.pack("<IH", 8, len(TIFF_FIELDS))
    for tag, kind, value in TIFF_FIELDS:
        out += struct.pack("<HHII", tag, kind, 1, TIFF_STRIP - 8 if tag == 273 else value)
    return out + struct.pack("<IQ", 0, offset) + bytes(16)


def avif_damaged(small_rgb: np.ndarray, box: bytes) -> bytes:
    """An AVIF of `small_rgb` with box `box` renamed (its image item lost), or with b"mdat": its coded pixels zeroed."""
    data = bytearray(encode(Image.fromarray(small_rgb), "AVIF"))
    at = data.index(box)
    if box == b"mdat":
        data[at + 4 :] = bytes(len(data) - at - 4)
    else:
        data[at : at + 4] = b"xxxx"
    return bytes(data)


def test_damaged_avif_and_tiff_are_decode_errors(settings: Settings, small_rgb: np.ndarray) -> None:
    """Pillow's AVIF plugin raises RuntimeError on damaged files, and a TIFF strip past 2**63 bytes an OverflowError:
    before, these escaped the decoder, and the server answered 500 instead of 400."""
    assert np.array_equal(load_image(tiff_with_strip_offset(TIFF_STRIP), settings), np.zeros((4, 4, 3)))
    damaged = [tiff_with_strip_offset(2**64 - 1)]
    if "AVIF" in Image.SAVE:
        damaged += [avif_damaged(small_rgb, b"iloc"), avif_damaged(small_rgb, b"mdat")]
    for data in damaged:
        with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
            load_image(data, settings)


# --- size limits -------------------------------------------------------------------------------------------


def test_pixel_limit_checked_from_header_before_decoding(settings: Settings) -> None:
    # The IDAT holds no pixels: decoding would fail with a "truncated" error, so ImageTooLargeError shows that
    # the limit was checked from the header first.
    small_limit = Settings(max_image_pixels=10_000)
    with pytest.raises(ImageTooLargeError, match="AUTOMASK_MAX_IMAGE_PIXELS"):
        load_image(raw_png(300, 300, 8, 2, zlib.compress(b"")), small_limit)
    with pytest.raises(ImageDecodeError):
        load_image(raw_png(30, 30, 8, 2, zlib.compress(b"")), small_limit)


@pytest.mark.parametrize("side", [10_000, 100_000])  # Pillow's warning zone, then its error zone
def test_decompression_bomb_header_is_refused_quickly(side: int, settings: Settings) -> None:
    data = raw_png(side, side, 8, 2, zlib.compress(b"\x00" * 64))  # claims up to 30 GB of RGB
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLargeError):
            load_image(data, settings)
    assert time.perf_counter() - start < 1.0
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_our_pixel_limit_decides_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's own limit (here shrunk to 1,000 pixels: it warns above, refuses above 2,000) neither refuses what
    AUTOMASK_MAX_IMAGE_PIXELS allows nor speaks for it: one clean message quoting our limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    png = encode(Image.new("RGB", (60, 50), (10, 20, 30)), "PNG")  # 3,000 pixels: Pillow's error zone
    assert load_image(png, Settings(max_image_pixels=5_000)).shape == (50, 60, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    warning_zone = encode(Image.new("RGB", (30, 50)), "PNG")  # 1,500 pixels
    with pytest.raises(ImageTooLargeError, match=r"^The image is 30×50 = 1,500 pixels; the limit is 500 pixels"):
        load_image(warning_zone, Settings(max_image_pixels=500))
    with pytest.raises(ImageTooLargeError, match=r"^The image is 3,000 pixels; the limit is 500 pixels"):
        load_image(png, Settings(max_image_pixels=500))
    assert Image.MAX_IMAGE_PIXELS == 1_000  # a lower limit of ours never lowers Pillow's


def test_gif_header_claiming_huge_screen_is_refused(settings: Settings) -> None:
    data = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen: 4.3 gigapixels
    with pytest.raises(ImageTooLargeError):
        load_image(bytes(data), settings)


def tiled_tiff(side: int, tile: int) -> bytes:
    """A black side×side RGB TIFF stored in deflated tile×tile tiles (a tile larger than the image is padded)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((side, side, 3), np.uint8), tile=(tile, tile), compression="zlib")
    return buf.getvalue()


def test_tiff_tiles_over_the_pixel_limit_are_refused_before_decoding() -> None:
    """libtiff decodes a tile whole whatever the image's size: a 16×16 image in one 65536×65536 tile is 12 MB of
    deflate that takes 12 GB to decode. Before: decoded (its 16×16 pixels); now: over the limit, from the header."""
    settings = Settings(max_image_pixels=1_000_000)
    assert load_image(tiled_tiff(16, 512), settings).shape == (16, 16, 3)  # tiles of 262,144 pixels: fine
    big_tile = tiled_tiff(16, 2048)  # 4,194,304 pixels a tile
    for check in (load_image, check_image):
        with pytest.raises(ImageTooLargeError, match="tiles of 2048×2048 = 4,194,304 pixels"):
            check(big_tile, settings)


def progressive_jpeg(extra_scans: int = 0, app1: bytes = b"", garbage: bytes = b"") -> bytes:
    """A 256×256 progressive JPEG (libjpeg's script: 6 scans for gray), its last scan repeated `extra_scans` times
    (each preceded by `garbage`), with an APP1 segment holding `app1` if given."""
    data = encode(Image.new("L", (256, 256), 128), "JPEG", progressive=True)
    last = data[data.rindex(b"\xff\xda") : -2]  # the last scan, up to the end-of-image marker
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 if app1 else b""
    return data[:2] + segment + data[2:-2] + (garbage + last) * extra_scans + data[-2:]


def test_a_jpeg_of_more_scans_than_an_encoder_writes_is_refused_before_decoding(settings: Settings) -> None:
    """Each scan of a progressive JPEG is a pass over the whole image, for a dozen bytes: before, 1000 empty scans
    of 40 megapixels (220 KB) took a minute to decode, uninterruptibly. Scans are counted as libjpeg reads them:
    bytes between markers skipped, segments (an EXIF thumbnail's scans) skipped by their length."""
    assert load_image(progressive_jpeg(), settings).shape == (256, 256, 3)
    allowed = MAX_JPEG_SCANS - 6
    assert load_image(progressive_jpeg(allowed, app1=b"\xff\xda\x00\x02" * 1000), settings).shape == (256, 256, 3)
    for bomb in (progressive_jpeg(allowed + 1), progressive_jpeg(allowed + 1, garbage=b"junk\xff\x00")):
        for check in (load_image, check_image):
            with pytest.raises(ImageDecodeError, match=f"more than {MAX_JPEG_SCANS} scans"):
                check(bomb, settings)


def test_encoded_byte_limit_for_every_source_kind(tmp_path: Path, small_rgb: np.ndarray) -> None:
    data = png_of(np.tile(small_rgb, (10, 10, 1)))
    limit = Settings(max_image_bytes=len(data) - 1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources: list[ImageSource] = [data, path, str(path), io.BytesIO(data), b64, "data:image/png;base64," + b64]
    for source in sources:
        with pytest.raises(ImageTooLargeError, match="AUTOMASK_MAX_IMAGE_BYTES"):
            load_image(source, limit)
    assert load_image(data, Settings(max_image_bytes=len(data))).shape == (60, 50, 3)


# --- numpy and PIL inputs ----------------------------------------------------------------------------------


def test_numpy_rgb_is_copied_unchanged(settings: Settings, small_rgb: np.ndarray) -> None:
    out = load_image(small_rgb, settings)
    assert np.array_equal(out, small_rgb) and out.dtype == np.uint8
    out[0, 0] = 1
    assert small_rgb[0, 0, 0] == 0  # the caller's array is not aliased
    strided = load_image(small_rgb[::2, ::-1], settings)
    assert np.array_equal(strided, small_rgb[::2, ::-1]) and strided.flags.c_contiguous


def test_numpy_gray_and_single_channel(settings: Settings) -> None:
    gray = np.array([[0, 10], [200, 255]], np.uint8)
    for source in (gray, gray[:, :, None]):
        out = load_image(source, settings)
        assert out.shape == (2, 2, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))


def test_numpy_subclasses_are_read_as_plain_arrays(settings: Settings) -> None:
    """Before: an `np.matrix` (an ndarray subclass, always 2-D) escaped as a traceback (ValueError: shape too large
    to be a matrix), and a masked gray array came back as a MaskedArray. Now both are read by their samples, as the
    plain array they hold, into a plain H×W×3 uint8 ndarray."""
    gray = np.array([[0, 10], [200, 255]], np.uint8)
    for source in (np.asmatrix(gray), np.ma.masked_array(gray, mask=[[0, 1], [0, 0]])):
        out = load_image(source, settings)
        assert type(out) is np.ndarray and out.shape == (2, 2, 3)
        assert all(np.array_equal(out[..., c], gray) for c in range(3))
    rgb = np.ma.masked_array(np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    assert type(load_image(rgb, settings)) is np.ndarray


def test_numpy_rgba_composites_like_files(settings: Settings) -> None:
    rgba = np.array([[[255, 0, 0, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], np.uint8)
    from_array = load_image(rgba, settings)
    from_png = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), settings)
    assert np.array_equal(from_array, from_png)
    assert [tuple(p) for p in from_array[0]] == [RED, WHITE, (127, 127, 127)]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[True, False]]), [255, 0]),
        (np.array([[0, 257, 65535]], np.uint16), [0, 1, 255]),
        (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
        (np.array([[0.0, 100.4, 255.0]], np.float64), [0, 100, 255]),
        (np.array([[0, 7, 255]], np.int64), [0, 7, 255]),
        (np.array([[0, 1000, 65535]], np.int32), [0, 4, 255]),
    ],
)
def test_numpy_other_dtypes_by_range(array: np.ndarray, expected: list[int], settings: Settings) -> None:
    out = load_image(array, settings)
    assert out.shape == (*array.shape, 3) and out[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([-0.04, 0.5, 1.06], [0, 128, 255]),  # cubic resampling's over- and undershoot: 0–1, clipped
        ([-0.5, 0.2, 1.5], [0, 51, 255]),  # the edges of the 0–1 range
        ([0.0, 1.0, 1.6], [0, 1, 2]),  # past 1.5: a (very dark) 0–255 image
        ([-0.5, 100.4, 255.5], [0, 100, 255]),  # a 0–255 image's rounding edges
        ([0.0, 0.0, 0.0], [0, 0, 0]),  # all black: the same either way
    ],
)
def test_a_float_image_that_overshoots_1_a_little_is_still_0_to_1(
    values: list[float], expected: list[int], settings: Settings
) -> None:
    """Before: a 0–1 image resized with cubic interpolation (max 1.06) was read as 0–255 and came out black, and one
    that undershot 0 was refused as negative."""
    for dtype in (np.float32, np.float64):
        assert load_image(np.array([values], dtype), settings)[0, :, 0].tolist() == expected
    assert load_image(tiff_of(np.array([values], np.float32)), settings)[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 100.4, 257.3], [0, 100, 255]),  # Lanczos past a white edge: clipped, not refused
        ([-12.7, 128.0, 255.0], [0, 128, 255]),  # and past a black one
        ([-127.5, 1.6, 382.5], [0, 2, 255]),  # the edges of the 0–255 range: the 0–1 range's, ×255
    ],
)
def test_a_float_0_to_255_image_that_overshoots_a_little_is_clipped(
    values: list[float], expected: list[int], settings: Settings
) -> None:
    """Before: a 0–255 float image resampled with Lanczos (max 257.3, or min -12.7) was refused, while a 0–1 image's
    overshoot was clipped; now both are, by the same share of their range."""
    for dtype in (np.float32, np.float64):
        assert load_image(np.array([values], dtype), settings)[0, :, 0].tolist() == expected
    assert load_image(tiff_of(np.array([values], np.float32)), settings)[0, :, 0].tolist() == expected


@pytest.mark.parametrize("values", [[-0.6, 0.5], [-0.6, 1.5], [-127.6, 200.0], [0.0, 382.6], [0.0, 65535.0]])
def test_a_float_image_past_both_ranges_is_refused(values: list[float], settings: Settings) -> None:
    with pytest.raises(ImageDecodeError, match="Float images must hold samples in 0–1 or 0–255"):
        load_image(np.array([values], np.float32), settings)


@pytest.mark.parametrize(
    ("array", "phrase"),
    [
        (np.zeros((4, 4, 2), np.uint8), "H×W×3"),
        (np.zeros((2, 2, 2, 3), np.uint8), "H×W×3"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.array([[-1, 5]], np.int16), "negative"),
        (np.array([[np.nan, 0.5]]), "NaN"),
        (np.array([[0.5, 400.0]]), "0–255"),
        (np.array([[0, 70000]], np.int64), "0–65535"),
        (np.zeros((2, 2), np.complex64), "complex64"),
        (np.array([["a", "b"]]), "<U1"),
        # before: no hint that a torch-style channels-first array is read as H×W×C
        (np.zeros((3, 40, 60), np.float32), r"channels-first \(C×H×W, as torch.*a\.transpose\(1, 2, 0\)"),
        (np.zeros((1, 3, 40, 60), np.float32), r"a batch of one C×H×W image.*a\[0\]\.transpose\(1, 2, 0\)"),
        (np.zeros((1, 40, 60, 3), np.uint8), r"a batch of one image: pass a\[0\]\.$"),
    ],
)
def test_numpy_bad_arrays_are_refused(array: np.ndarray, phrase: str, settings: Settings) -> None:
    with pytest.raises(ImageDecodeError, match=phrase):
        load_image(array, settings)


def test_numpy_and_pil_pixel_limit() -> None:
    limit = Settings(max_image_pixels=99)
    with pytest.raises(ImageTooLargeError):
        load_image(np.zeros((10, 10, 3), np.uint8), limit)
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (10, 10)), limit)
    assert load_image(np.zeros((9, 11), np.uint8), limit).shape == (9, 11, 3)


def test_pil_inputs(settings: Settings, small_rgb: np.ndarray) -> None:
    assert np.array_equal(load_image(Image.fromarray(small_rgb), settings), small_rgb)
    jpeg = encode(Image.fromarray(np.tile(small_rgb, (40, 40, 1))), "JPEG")
    truncated = jpeg[: len(jpeg) * 2 // 3]
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        load_image(Image.open(io.BytesIO(truncated)), settings)


def test_a_closed_pil_image_is_a_clear_error(tmp_path: Path, settings: Settings, small_rgb: np.ndarray) -> None:
    """Before: an image used after its `with Image.open(path)` block raised a bare AssertionError from Pillow (no
    message, not an AutomaskError), and one loaded before closing was called "corrupt or truncated"."""
    path = tmp_path / "a.png"
    path.write_bytes(png_of(small_rgb))
    with Image.open(path) as lazy:  # its pixels not read yet, and its file closed
        pass
    closed = Image.open(path)
    closed.load()
    closed.close()
    in_memory = Image.fromarray(small_rgb)
    in_memory.close()
    for img in (lazy, closed, in_memory):
        with pytest.raises(ImageDecodeError, match=r"^The PIL image was closed before automask read it"):
            load_image(img, settings)
    with Image.open(path) as img:  # open: read, whether loaded yet or not
        assert np.array_equal(load_image(img, settings), small_rgb)
    with Image.open(path) as loaded:
        loaded.load()
    assert np.array_equal(load_image(loaded, settings), small_rgb)  # its pixels were read before its file closed


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_a_pil_image_without_pixels_is_a_clear_error(size: tuple[int, int], settings: Settings) -> None:
    """Before: a 0-pixel-wide or -high PIL image reached the model and raised OpenCV's resize assertion."""
    with pytest.raises(ImageDecodeError, match=rf"^The image is empty \({size[0]}×{size[1]} pixels\)\.$"):
        load_image(Image.new("RGB", size), settings)


def test_premultiplied_la_is_read_as_la(settings: Settings) -> None:
    """Before: a PIL image in Pillow's premultiplied mode "La" was refused as "corrupt or truncated" (Pillow converts
    it to LA only)."""
    la = Image.fromarray(np.array([[[0, 255], [0, 0], [200, 128], [255, 255]]], np.uint8), "LA")
    expected = load_image(la, settings)
    out = load_image(la.convert("La"), settings)
    assert [tuple(p) for p in expected[0]] == [(0, 0, 0), WHITE, (227, 227, 227), WHITE]
    assert np.abs(out.astype(int) - expected).max() <= 1  # premultiplying rounds the gray of the half-transparent
    rgba = load_image(la.convert("La"), settings, keep_alpha=True)
    assert rgba.shape == (1, 4, 4) and rgba[0, :, 3].tolist() == [255, 0, 128, 255]


# --- strings, paths, streams -------------------------------------------------------------------------------


def test_base64_forms(settings: Settings, small_rgb: np.ndarray) -> None:
    data = png_of(small_rgb)
    plain = base64.b64encode(data).decode()
    forms = [
        plain,
        base64.encodebytes(data).decode(),  # wrapped at 76 characters
        base64.urlsafe_b64encode(data).decode().rstrip("="),  # URL-safe, padding dropped
        f"  {plain}\n",
        "data:image/png;base64," + plain,
        "DATA:IMAGE/PNG;BASE64," + plain,
        "data:;base64," + plain,
        "data:image/png;charset=utf-8;base64," + plain,
    ]
    for form in forms:
        assert np.array_equal(load_image(form, settings), small_rgb), form[:40]


@pytest.mark.parametrize(
    ("form", "copies"),
    [
        (base64.b64encode, 1),
        (base64.encodebytes, 1),  # wrapped at 76 characters
        (lambda data: "data:image/png;base64," + base64.b64encode(data).decode(), 2),
        (lambda data: base64.urlsafe_b64encode(data).decode().rstrip("="), 2),
    ],
    ids=["plain", "wrapped", "data-uri", "url-safe-unpadded"],
)
def test_base64_decoding_makes_no_copies_of_the_text(form: Any, copies: int, settings: Settings) -> None:
    """A base64 image is tens of MB of text. Before: `"".join(text.split())`, the padding's `+=`, the URL-safe
    `replace`s, the data: URI's slice and `b64decode`'s `.encode()` each copied the text (4/3 of the image): the
    peak was 2.3 times the image for plain base64, 3.7 times wrapped or in a data: URI. Now: the decoded bytes
    (twice them where it goes a chunk at a time), plus a few chunks of text."""
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    encoded = form(data)
    text = encoded.decode() if isinstance(encoded, bytes) else encoded
    del encoded
    tracemalloc.start()
    try:
        decoded = decode_data_uri(text, settings) if text.startswith("data:") else decode_base64(text, settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded == data
    assert peak <= copies * len(data) + 4 * BASE64_CHUNK, peak / len(data)


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("data:image/png,rawdata", "base64-encoded"),
        ("data:text/plain;base64,aGVsbG8=", "'text/plain', not an image"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64", "malformed"),
        ("", "empty"),
        ("   ", "empty"),
        ("!" * 5000, "not valid base64"),
        (base64.b64encode(b"just some text, not an image at all " * 3).decode(), "looks like text"),
    ],
)
def test_bad_strings(text: str, phrase: str, settings: Settings) -> None:
    with pytest.raises(ImageDecodeError, match=phrase):
        load_image(text, settings)


def coffee_base64(rows: int) -> str:
    """A PNG of the top `rows` rows of scikit-image's coffee photo (120 px wide), as standard base64."""
    return base64.b64encode(png_of(skimage_data.coffee()[:rows, :120])).decode()


@pytest.mark.parametrize("rows", [100, 103])  # 100: no longer base64; 103: still base64, but not the image
@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
def test_base64_whose_plus_became_spaces_says_so(rows: int, prefix: str, settings: Settings) -> None:
    """A form-urlencoded body or a query string turns '+' into ' '. Before: "not valid base64" or "corrupt or
    truncated", which did not say why."""
    plain = coffee_base64(rows)
    assert "+" in plain and np.array_equal(load_image(prefix + plain, settings), skimage_data.coffee()[:rows, :120])
    spaced = prefix + plain.replace("+", " ")
    for allow_paths in (True, False):
        with pytest.raises(ImageDecodeError, match=r"'\+' characters became spaces \(URL form encoding.*URL-encode"):
            load_image(spaced, settings, allow_paths=allow_paths)
    if rows == 100:  # a v2 job's early check finds it too (the other decodes to bytes with a valid PNG header)
        with pytest.raises(ImageDecodeError, match="became spaces"):
            check_image(spaced, settings)


@pytest.mark.parametrize("text", ["my photo.png", "@@@@ @@@@", "ab+c d" * 50, "!" * 5000])
def test_text_with_spaces_is_not_taken_for_spaced_base64(text: str, settings: Settings) -> None:
    with pytest.raises(ImageDecodeError) as err:
        load_image(text, settings, allow_paths=False)
    assert "became spaces" not in str(err.value)


@pytest.mark.parametrize("spaced", ["{}\n", "{}\r\n", " {}", "{}\t "])
def test_a_path_with_whitespace_around_it_says_to_strip_it(
    spaced: str, tmp_path: Path, settings: Settings, small_rgb: np.ndarray
) -> None:
    """Before: a path read from a list file (`for line in open("list.txt")`) kept its newline and was reported as
    "not valid base64", a space around it as "No such file" with the space unseen; a `pathlib.Path` so made
    (`Path(line)`) still was."""
    path = tmp_path / "img.png"
    path.write_bytes(png_of(small_rgb))
    for source in (spaced.format(path), Path(spaced.format(path))):
        with pytest.raises(ImageDecodeError, match=r"^No such file: '.*img\.png\s*'.*strip the whitespace") as err:
            load_image(source, settings)
        assert repr(str(path)) in err.value.message
    with pytest.raises(ImageDecodeError, match="not valid base64"):  # never a path for a server's client
        load_image(spaced.format(path), settings, allow_paths=False)


@pytest.mark.parametrize("name", ["missing.png", "photos/cat.jpg", "abcd", "C:\\images\\x.jpg"])
def test_missing_path_says_no_such_file(name: str, settings: Settings, tmp_path: Path) -> None:
    target = str(tmp_path / name) if "/" in name else name
    with pytest.raises(ImageDecodeError, match="No such file"):
        load_image(target, settings)
    if "/" in name:
        with pytest.raises(ImageDecodeError, match="No such file"):
            load_image(Path(target), settings)


def test_paths_streams_and_bytes_like(tmp_path: Path, settings: Settings, small_rgb: np.ndarray) -> None:
    data = png_of(small_rgb)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    sources: list[ImageSource] = [path, str(path), io.BytesIO(data), bytearray(data), memoryview(data)]
    for source in sources:
        assert np.array_equal(load_image(source, settings), small_rgb), type(source)


class Trickle(io.RawIOBase):
    """An unbuffered stream, as a pipe or socket opened with buffering=0 is: each read gives at most `chunk` bytes,
    whatever was asked."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.pos = data, chunk, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        piece = self.data[self.pos : self.pos + min(self.chunk, len(buffer))]
        buffer[: len(piece)] = piece
        self.pos += len(piece)
        return len(piece)


def test_an_unbuffered_stream_is_read_to_its_end(settings: Settings) -> None:
    """Before: one `read` was taken for the whole stream, so a pipe opened with buffering=0 gave the bytes arrived
    so far and the image was "corrupt or truncated"."""
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_of(image)
    assert len(data) > 4 * 1000
    assert np.array_equal(load_image(Trickle(data, 1000), settings), image)
    small = Settings(data_dir=settings.data_dir, max_image_bytes=len(data) - 1)
    with pytest.raises(ImageTooLargeError, match=f"^The image is over {len(data) - 1:,} bytes; the limit is"):
        load_image(Trickle(data, 1000), small)  # read one byte past the limit: how far past it, nobody knows
    endless = Trickle(data * 100, 1000)
    with pytest.raises(ImageTooLargeError):
        load_image(endless, small)
    assert endless.pos == len(data)  # it stopped reading one byte past the limit


def test_a_file_opened_in_text_mode_closed_or_write_only_is_a_clear_error(tmp_path: Path, settings: Settings) -> None:
    """Before: a file opened with open(path) instead of open(path, "rb") raised UnicodeDecodeError from inside
    `read`, a closed one ValueError ("read of closed file") and a write-only one io.UnsupportedOperation: raw
    tracebacks, not the documented ImageDecodeError saying what to do."""
    path = tmp_path / "img.png"
    path.write_bytes(png_of(np.zeros((4, 4, 3), np.uint8)))
    with open(path) as text, pytest.raises(ImageDecodeError, match=r"binary mode \('rb'\)"):
        load_image(text, settings)  # type: ignore[arg-type]
    with open(path, "rb") as closed:
        pass
    with pytest.raises(ImageDecodeError, match="closed before automask read it"):
        load_image(closed, settings)
    with open(tmp_path / "out.png", "wb") as write_only, pytest.raises(ImageDecodeError, match="cannot be read"):
        load_image(write_only, settings)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_one_lazily_opened_pil_image_read_by_several_threads_at_once(
    fmt: str, tmp_path: Path, settings: Settings
) -> None:
    """Before: Pillow's `load` of an image opened from a path is not thread-safe, so a PIL image a web app opened
    once and masked from several request threads failed at random: "corrupt or truncated (I/O operation on closed
    file)" or a raw AttributeError from inside Pillow."""
    pixels = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / f"shared.{fmt.lower()}"
    Image.fromarray(pixels).save(path, fmt)
    with Image.open(path) as img:
        expected = load_image(img, settings)
    for _trial in range(10):
        shared = Image.open(path)
        start = threading.Barrier(8)

        def read(shared: Image.Image = shared, start: threading.Barrier = start) -> np.ndarray:
            start.wait()
            return load_image(shared, settings)

        with ThreadPoolExecutor(8) as pool:
            results = [pool.submit(read) for _ in range(8)]
            assert all(np.array_equal(r.result(), expected) for r in results)
        shared.close()


def test_different_pil_images_load_at_once(tmp_path: Path, settings: Settings) -> None:
    """Before: one lock for every caller's PIL image, so a web app's request threads, each masking its own lazily
    opened upload, decoded them one at a time: one slow (large) image held up all the others."""
    pixels = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(pixels).save(tmp_path / name)
    slow, other = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    loading, other_done = threading.Event(), threading.Event()
    waited: list[bool] = []
    load = slow.load

    def slow_load() -> Any:
        if not loading.is_set():  # its first load (Pillow calls it again once loaded)
            loading.set()
            waited.append(other_done.wait(5))  # the other image is read meanwhile
        return load()

    slow.load = slow_load  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(load_image, slow, settings)
        assert loading.wait(5)
        assert np.array_equal(load_image(other, settings), pixels)
        other_done.set()
        assert np.array_equal(first.result(), pixels)
    assert waited == [True]
    slow.close()
    other.close()


class PathLike:
    """An `os.PathLike` that is not a `pathlib.Path` (as pytest's `tmpdir` gives)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def test_a_path_string_to_a_link_loop_says_so(tmp_path: Path, settings: Settings) -> None:
    """Before: a path given as a string that is a symbolic link loop was 'No such file' (and read as base64 first),
    though it is there; a Path said why. Now both say why it cannot be read."""
    loop = tmp_path / "loop.jpg"
    loop.symlink_to("loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to("loop.jpg")
    for source in (str(loop), loop):
        with pytest.raises(ImageDecodeError, match=r"^Cannot read .*loop\.jpg: Too many levels of symbolic links\.$"):
            load_image(source, settings)


_BASE64_IN_LOCKED_CWD = """
import base64, io, sys
import numpy as np
from PIL import Image
from automask.errors import ImageDecodeError
from automask.imageio import load_image
png = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(png, "PNG")
text = base64.b64encode(png.getvalue()).decode()
assert "/" in text and len(text) < 1024  # a relative path to the system, in a folder it may not search
print(load_image(text).tolist() == np.asarray(Image.open(png)).tolist())
try:
    load_image("locked/photo")
except ImageDecodeError as exc:
    print(exc)
"""


def test_base64_text_is_read_as_base64_where_paths_cannot_be_looked_up(tmp_path: Path) -> None:
    """Before (since a path string that cannot be looked up said why): in a current folder that may not be searched
    (`sudo -u svc` from a private home), short base64 text holding a '/' was taken for such a path: 'Cannot read
    iVBOR...: permission denied.'. Now base64 text is read as base64; text that is neither a file nor base64 of an
    image still says why it cannot be read as a path."""
    from test_cli_batch import as_a_user

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        command = as_a_user([sys.executable, "-c", _BASE64_IN_LOCKED_CWD])
        proc = subprocess.run(command, capture_output=True, timeout=120, cwd=locked)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["True", "Cannot read locked/photo: permission denied."]


def test_any_path_like_is_a_path(tmp_path: Path, settings: Settings, small_rgb: np.ndarray) -> None:
    """Before: an `os.PathLike` other than `pathlib.Path` was "Unsupported image source of type ...", though the
    README takes a file path."""
    path = tmp_path / "img.png"
    path.write_bytes(png_of(small_rgb))
    assert np.array_equal(load_image(PathLike(path), settings), small_rgb)
    with pytest.raises(ImageDecodeError, match=r"^No such file: .*nope\.png$"):
        load_image(PathLike(tmp_path / "nope.png"), settings)
    with pytest.raises(ImageDecodeError, match="cannot be read here"):
        load_image(PathLike(path), settings, allow_paths=False)


def test_allow_paths_false_never_reads_a_file(
    tmp_path: Path, settings: Settings, small_rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = png_of(small_rgb)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    (tmp_path / "QUJD").write_bytes(data)  # a file whose name is also valid base64
    monkeypatch.chdir(tmp_path)
    assert np.array_equal(load_image("QUJD", settings), small_rgb)  # the default still reads files
    for source in (str(path), f"  {path}\n", "QUJD", "img.png"):
        with pytest.raises(ImageDecodeError) as info:
            load_image(source, settings, allow_paths=False)
        assert "existing file" not in info.value.message and "No such file" not in info.value.message
    with pytest.raises(ImageDecodeError, match="cannot be read here"):
        load_image(path, settings, allow_paths=False)
    plain = base64.b64encode(data).decode()
    for source in (plain, "data:image/png;base64," + plain, data):
        assert np.array_equal(load_image(source, settings, allow_paths=False), small_rgb)


def test_folder_text_file_and_odd_sources(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(ImageDecodeError, match="is a folder"):
        load_image(tmp_path, settings)
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: eggs, milk\n" * 10)
    with pytest.raises(ImageDecodeError, match="looks like text"):
        load_image(str(notes), settings)
    with pytest.raises(ImageDecodeError, match="binary mode"):
        load_image(io.StringIO("abc"), settings)  # type: ignore[arg-type]
    with pytest.raises(ImageDecodeError, match="Unsupported image source of type int"):
        load_image(42, settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://127.0.0.1:70/_x"])
def test_non_http_schemes_are_refused(url: str, settings: Settings) -> None:
    with pytest.raises(URLRefusedError, match="only http:// and https://"):
        load_image(url, settings)


def test_keep_alpha_returns_the_stored_rgba_of_an_image_with_transparency(settings: Settings) -> None:
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[..., 3] = [[0], [51], [255]]  # rows: transparent, 20 % opaque, opaque
    png = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(png, format="PNG")
    kept = load_image(png.getvalue(), settings, keep_alpha=True)
    assert kept.shape == (3, 4, 4) and kept.flags.c_contiguous and np.array_equal(kept, rgba)
    assert np.array_equal(load_image(png.getvalue(), settings), composite_on_white(rgba))  # the default: flattened
    assert np.array_equal(load_image(rgba, settings, keep_alpha=True), rgba)  # an array source too
    la = Image.fromarray(rgba[..., 3], "L").convert("LA")  # LA: gray with alpha
    la.putalpha(Image.fromarray(rgba[..., 3]))
    assert load_image(la, settings, keep_alpha=True).shape == (3, 4, 4)


@pytest.mark.parametrize("image", ["opaque-rgba", "rgb", "gray"])
def test_keep_alpha_gives_rgb_for_an_image_without_transparency(image: str, settings: Settings) -> None:
    pixels = np.full((2, 2, 4), 255, np.uint8) if image == "opaque-rgba" else None
    src = {"opaque-rgba": pixels, "rgb": np.zeros((2, 2, 3), np.uint8), "gray": np.zeros((2, 2), np.uint8)}[image]
    assert load_image(src, settings, keep_alpha=True).shape == (2, 2, 3)


def test_composite_on_white_rounds_every_sample_and_alpha_exactly() -> None:
    value, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([value, value, 255 - value, alpha], axis=-1).astype(np.uint8)
    flat = composite_on_white(rgba)
    expected = (value * alpha + 255 * (255 - alpha) + 127) // 255  # round(v·a/255 + 255·(1 - a/255))
    assert flat.dtype == np.uint8 and flat.shape == (256, 256, 3)
    assert np.array_equal(flat[..., 0], expected) and np.array_equal(flat[..., 1], expected)
    assert np.array_equal(flat[..., 2], ((255 - value) * alpha + 255 * (255 - alpha) + 127) // 255)


def test_composite_on_white_holds_little_besides_its_answer() -> None:
    """A transparent PNG of 40 MP (150 KB to upload) took ~700 MB of uint16 products on top of its 120 MB answer,
    and ~9 s of numpy's integer division; now a strip at a time, shifts for the division."""
    rgba = np.random.default_rng(0).integers(0, 256, (1500, 4000, 4), dtype=np.uint8)  # 6 MP: an 18 MB answer
    tracemalloc.start()
    try:
        flat = composite_on_white(rgba)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * flat.nbytes, f"{peak / 1e6:.0f} MB at the peak for an answer of {flat.nbytes / 1e6:.0f} MB"


def test_composite_and_to_uint8_helpers() -> None:
    rgba = np.array([[[200, 100, 0, 51]]], np.uint8)  # 20 % opaque
    expected = np.rint(np.array([200, 100, 0]) * 0.2 + 255 * 0.8)
    assert np.abs(composite_on_white(rgba)[0, 0] - expected).max() <= 1
    same = np.zeros((2, 2), np.uint8)
    assert to_uint8(same) is same


def test_the_orientation_applied_is_noted_with_its_format_and_tag() -> None:
    """`orientation.noting()` gets how each image decoded in its block was turned, and where that was read: a WebP's
    EXIF, a JPEG's XMP alone (which Pillow reads when its EXIF has none); none when not turned; nothing outside."""
    from automask.imageio.orientation import Orientation, noting

    small = Image.fromarray(np.zeros((4, 6, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 3
    webp, jpeg, plain = io.BytesIO(), io.BytesIO(), io.BytesIO()
    small.save(webp, "WEBP", lossless=True, exif=exif)
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    small.save(jpeg, "JPEG", xmp=xmp.encode())
    small.save(plain, "PNG")
    with noting() as notes:
        shapes = [load_image(b.getvalue()).shape for b in (webp, jpeg, plain)]
    assert shapes == [(4, 6, 3), (6, 4, 3), (4, 6, 3)]
    assert notes == [Orientation(3, "exif", "WEBP"), Orientation(6, "xmp", "JPEG"), Orientation(1, "exif", "PNG")]
    with noting() as outer:
        load_image(webp.getvalue())
    load_image(webp.getvalue())  # outside any block: noted nowhere
    assert outer == [Orientation(3, "exif", "WEBP")]


def test_a_pillow_bomb_refusal_names_our_limit_not_pillows(settings: Settings) -> None:
    """An image past Pillow's own refusal threshold (twice its MAX_IMAGE_PIXELS) is refused with automask's limit
    and the setting that raises it; Pillow's threshold, which no setting of ours moves, is not quoted."""
    data = raw_png(100_000, 100_000, 8, 2, zlib.compress(b"\x00" * 64))
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(data, settings)
    message = caught.value.message
    assert f"{settings.max_image_pixels:,} pixels" in message and "AUTOMASK_MAX_IMAGE_PIXELS" in message
    assert f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,}" not in message and "10,000,000,000 pixels" in message
