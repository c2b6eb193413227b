"""Images that embed a colour profile are decoded to sRGB (automask.imageio.profile), checked against LittleCMS
through Pillow's ImageCms on a real photo; sRGB-tagged, damaged and mismatched profiles change nothing."""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms

from automask import MaskGenerator
from automask.imageio import load_image
from test_mask_controls import MapBackend

D50 = (0.9642, 1.0, 0.8249)
WIDE = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
"""Display P3's primaries (D50-adapted XYZ, as in Apple's Display P3 profile): a gamut wider than sRGB's."""


def rgb_profile(name: str, primaries: tuple[tuple[float, float, float], ...], gamma: float = 2.2) -> bytes:
    """A minimal ICC v2 matrix/TRC display profile (ICC.1:2001-04: header, tag table, desc, wtpt, r/g/bXYZ,
    r/g/bTRC as one gamma); no profile files ship on this machine."""
    red, green, blue = primaries
    tags = [(b"rXYZ", _xyz(red)), (b"gXYZ", _xyz(green)), (b"bXYZ", _xyz(blue))]
    return icc_profile(b"RGB ", name, tags + [(sig, _curve(gamma)) for sig in (b"rTRC", b"gTRC", b"bTRC")])


def gray_profile(name: str, gamma: float) -> bytes:
    """A minimal ICC v2 monochrome display profile (desc, wtpt, kTRC as one gamma): what a gray PNG or JPEG embeds."""
    return icc_profile(b"GRAY", name, [(b"kTRC", _curve(gamma))])


def icc_profile(space: bytes, name: str, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v2 display profile of colour space `space` (b"RGB ", b"GRAY") with a desc, a D50 wtpt and `tags`."""
    text = name.encode() + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(78)  # no Unicode / ScriptCode names
    tags = [(b"desc", desc), (b"wtpt", _xyz(D50)), *tags]
    start = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, content in tags:
        content += bytes(-len(content) % 4)
        table += sig + struct.pack(">II", start + len(body), len(content))
        body += content
    header = struct.pack(">I4sI", start + len(body), b"", 0x02100000) + b"mntr" + space + b"XYZ " + bytes(12) + b"acsp"
    header += bytes(28) + _s15(D50[0]) + _s15(D50[1]) + _s15(D50[2]) + bytes(48)
    return header + struct.pack(">I", len(tags)) + table + body


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(v: tuple[float, ...]) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15(c) for c in v)


def _curve(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))


WIDE_ICC = rgb_profile("Wide test RGB", WIDE)
GRAY_18_ICC = gray_profile("Gray gamma 1.8", 1.8)
"""A classic Mac gray profile: stored levels are v -> (v / 255) ** 1.8 of white, not sRGB's curve."""
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def reference_srgb(pixels: np.ndarray, icc: bytes) -> np.ndarray:
    """LittleCMS's conversion of `pixels` (H×W×3 or ×4 uint8) from profile `icc` to sRGB, relative colorimetric."""
    mode = "RGBA" if pixels.shape[2] == 4 else "RGB"
    out = ImageCms.profileToProfile(
        Image.fromarray(pixels),
        ImageCms.ImageCmsProfile(io.BytesIO(icc)),
        ImageCms.createProfile("sRGB"),
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        outputMode=mode,
    )
    assert out is not None
    return np.asarray(out)


def encoded(pixels: np.ndarray, fmt: str, icc: bytes | None, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"icc_profile": icc} if icc else {}), **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_an_image_in_a_wide_gamut_profile_is_decoded_to_srgb(coffee: np.ndarray, fmt: str) -> None:
    data = encoded(coffee, fmt, WIDE_ICC, **({"lossless": True} if fmt == "WEBP" else {}))
    got = load_image(data)
    expected = reference_srgb(coffee, WIDE_ICC)
    assert np.array_equal(got, expected)
    assert np.abs(got.astype(int) - coffee).mean() > 2  # the conversion is not a no-op on this photo


def test_a_jpeg_in_a_wide_gamut_profile_is_decoded_to_srgb(coffee: np.ndarray) -> None:
    data = encoded(coffee, "JPEG", WIDE_ICC, quality=95)
    with Image.open(io.BytesIO(data)) as img:
        stored = np.asarray(img.convert("RGB"))
    assert np.array_equal(load_image(data), reference_srgb(stored, WIDE_ICC))


def test_srgb_damaged_and_absent_profiles_keep_the_stored_values(coffee: np.ndarray) -> None:
    for icc in (SRGB_ICC, b"not a profile", None):
        assert np.array_equal(load_image(encoded(coffee, "PNG", icc)), coffee)
    cmyk = Image.fromarray(coffee).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95, icc_profile=WIDE_ICC)  # an RGB profile in a CMYK image: ignored
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert np.array_equal(load_image(buf.getvalue()), np.asarray(img.convert("RGB")))
    gray = coffee[..., 0]
    assert np.array_equal(load_image(encoded(gray, "PNG", WIDE_ICC))[..., 0], gray)  # RGB profile, gray image


def test_transparency_is_kept_through_the_conversion(coffee: np.ndarray) -> None:
    rgba = np.dstack([coffee, np.linspace(0, 255, coffee.shape[1], dtype=np.uint8)[None].repeat(len(coffee), 0)])
    got = load_image(encoded(rgba, "PNG", WIDE_ICC), keep_alpha=True)
    assert np.array_equal(got, reference_srgb(rgba, WIDE_ICC)) and np.array_equal(got[..., 3], rgba[..., 3])


def test_a_transparent_colour_key_survives_the_conversion(coffee: np.ndarray) -> None:
    """An RGB PNG whose tRNS chunk makes one colour transparent: converted colours would no longer match the key."""
    rgb = coffee.copy()
    rgb[:50, :50] = (1, 2, 3)
    got = load_image(encoded(rgb, "PNG", WIDE_ICC, transparency=(1, 2, 3)), keep_alpha=True)
    alpha = np.where((rgb == (1, 2, 3)).all(axis=2), 0, 255).astype(np.uint8)
    assert got.shape[2] == 4 and np.array_equal(got[..., 3], alpha)
    assert np.array_equal(got, reference_srgb(np.dstack([rgb, alpha]), WIDE_ICC))


def test_a_users_pil_image_is_read_in_srgb_and_left_as_it_was(coffee: np.ndarray) -> None:
    img = Image.fromarray(coffee)
    img.info["icc_profile"] = WIDE_ICC
    assert np.array_equal(load_image(img), reference_srgb(coffee, WIDE_ICC))
    assert np.array_equal(np.asarray(img), coffee) and img.info["icc_profile"] == WIDE_ICC


def test_a_cut_out_of_a_wide_gamut_photo_shows_its_colours_in_srgb(coffee: np.ndarray) -> None:
    h, w = coffee.shape[:2]
    gen = MaskGenerator(MapBackend({"cup": np.ones((h, w), np.float32)}))
    cut = gen.generate(encoded(coffee, "PNG", WIDE_ICC), "cup", threshold=0.5, return_alpha=True)
    assert np.array_equal(cut.output[..., :3], reference_srgb(coffee, WIDE_ICC))


def srgb_of_gamma(values: np.ndarray, gamma: float) -> np.ndarray:
    """uint8 levels of a pure-gamma gray -> their sRGB-encoded uint8 values (IEC 61966-2-1), without LittleCMS."""
    v = (values / 255.0) ** gamma
    return np.rint(255 * np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)).astype(np.uint8)


@pytest.mark.parametrize("alpha", [False, True])
def test_a_gray_image_with_a_gray_profile_is_decoded_to_srgb(coffee: np.ndarray, alpha: bool) -> None:
    """An L or LA image that embeds a gray profile other than sRGB's tone curve (here gamma 1.8) is converted as
    an RGB one is (before: its stored levels were kept, so its mid-grays came out too dark)."""
    gray = coffee[..., 1]
    pixels = np.dstack([gray, np.linspace(0, 255, gray.shape[1], dtype=np.uint8)[None].repeat(len(gray), 0)])
    got = load_image(encoded(pixels if alpha else gray, "PNG", GRAY_18_ICC), keep_alpha=True)
    assert got.shape[2] == (4 if alpha else 3)
    assert np.abs(got[..., :3].astype(int) - srgb_of_gamma(gray, 1.8)[..., None]).max() <= 1
    assert np.abs(got[..., 0].astype(int) - gray).mean() > 8  # not a no-op
    if alpha:
        assert np.array_equal(got[..., 3], pixels[..., 1])


def test_a_palette_image_with_a_wide_gamut_profile_is_decoded_to_srgb(coffee: np.ndarray) -> None:
    """A P image's palette is RGB in its embedded profile: converted as the RGB image it stands for (before: kept)."""
    palette = Image.fromarray(coffee).quantize(64)
    stored = np.asarray(palette.convert("RGB"))
    buf = io.BytesIO()
    palette.save(buf, format="PNG", icc_profile=WIDE_ICC)
    assert np.array_equal(load_image(buf.getvalue()), reference_srgb(stored, WIDE_ICC))
    palette.info["icc_profile"] = WIDE_ICC  # a user's PIL image, with a transparent palette entry
    palette.info["transparency"] = 0
    got = load_image(palette, keep_alpha=True)
    rgba = np.asarray(palette.convert("RGBA"))
    assert got.shape[2] == 4 and np.array_equal(got[..., 3], rgba[..., 3])
    assert np.array_equal(got, reference_srgb(rgba, WIDE_ICC))


def test_a_gray_colour_key_survives_the_conversion() -> None:
    """A gray PNG whose tRNS makes one level transparent keeps that transparency when its profile is converted."""
    gray = np.full((4, 6), 100, np.uint8)
    gray[0, :2] = 7
    got = load_image(encoded(gray, "PNG", GRAY_18_ICC, transparency=7), keep_alpha=True)
    alpha = np.where(gray == 7, 0, 255).astype(np.uint8)
    assert got.shape == (4, 6, 4) and np.array_equal(got[..., 3], alpha)
    assert abs(int(got[1, 1, 0]) - int(srgb_of_gamma(np.array([100]), 1.8)[0])) <= 1
