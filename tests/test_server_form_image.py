"""A multipart form's `image` sent as a plain field holding the image file's bytes (`curl -F 'image=<photo.png'`,
`requests`/`httpx` with `files={"image": (None, data)}`: a part without a filename) is the image, as an uploaded file
is, on v1 and v2, on a real server on a loopback port.

Before, such a part was read as text and answered 400 "The image string is not valid base64": the form parser
decodes a part without a filename to text, and the service took that text for an image string (URL, data URI or
base64).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from server_helpers import decode, keyed_server, post_body

SLUG = "automatic-mask-generator"
BOUNDARY = "automask-test-boundary"
FIELDS = {"prompt": "sofa", "threshold": "0.5", "grow_mask": "0"}


def encoded(fmt: str) -> bytes:
    """A 30×40 random RGB image in `fmt` (PNG, JPEG, GIF, WEBP, BMP, TIFF)."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def multipart(image: bytes, *, filename: str | None, part_type: str | None, charset: str | None) -> tuple[bytes, str]:
    """A multipart body of FIELDS and an `image` part holding `image` (a file part when `filename` is given, else a
    plain field, as curl's -F 'image=<file' sends it), and its Content-Type (with `charset` when given)."""
    field = '--{}\r\nContent-Disposition: form-data; name="{}"\r\n\r\n{}\r\n'
    parts = [field.format(BOUNDARY, k, v).encode() for k, v in FIELDS.items()]
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"'
    head += f'; filename="{filename}"' if filename is not None else ""
    head += f"\r\nContent-Type: {part_type}" if part_type is not None else ""
    parts.append(head.encode() + b"\r\n\r\n" + image + b"\r\n")
    content_type = f"multipart/form-data; boundary={BOUNDARY}" + (f"; charset={charset}" if charset else "")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), content_type


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[Any]:
    with keyed_server(tmp_path / "data", credits=100) as server:
        yield server


send = post_body


def v2_output(live: Any, submitted: httpx.Response) -> bytes:
    """The result PNG of the v2 job `submitted` started (polled until it ends)."""
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()
    for _ in range(300):
        status = httpx.get(job["status_url"], headers=live.headers, timeout=10)
        if status.json()["status"] in ("COMPLETED", "FAILED"):
            break
        time.sleep(0.05)
    assert status.status_code == 200, status.text
    output = httpx.get(job["response_url"], headers=live.headers, timeout=10).json()["output"]
    return httpx.get(output, headers=live.headers, timeout=10).content


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
@pytest.mark.parametrize(("part_type", "charset"), [(None, None), ("image/png", None), (None, "utf-8")])
def test_an_image_sent_as_a_plain_form_field_is_the_image(
    live: Any, fmt: str, part_type: str | None, charset: str | None
) -> None:
    image = encoded(fmt)
    as_file = send(live, "v1", *multipart(image, filename="photo", part_type=part_type, charset=charset))
    assert as_file.status_code == 200, as_file.text
    expected = decode(as_file.content)
    assert expected.shape == (30, 40) and set(np.unique(expected)) == {0, 255}
    as_field = send(live, "v1", *multipart(image, filename=None, part_type=part_type, charset=charset))
    assert as_field.status_code == 200, as_field.text
    assert np.array_equal(decode(as_field.content), expected)
    assert as_field.headers["x-remaining-credits"] == str(int(as_file.headers["x-remaining-credits"]) - 1)
    submitted = send(live, "v2", *multipart(image, filename=None, part_type=part_type, charset=charset))
    assert np.array_equal(decode(v2_output(live, submitted)), expected)


def test_a_plain_form_field_of_base64_or_a_url_is_still_read_as_text(live: Any) -> None:
    image = encoded("PNG")
    as_text = send(live, "v1", *multipart(base64.b64encode(image), filename=None, part_type=None, charset=None))
    assert as_text.status_code == 200, as_text.text
    not_base64 = send(live, "v1", *multipart(b"not*base64", filename=None, part_type=None, charset=None))
    assert not_base64.status_code == 400 and "not valid base64" in not_base64.json()["error"]
    url = send(live, "v1", *multipart(b"http://127.0.0.1:1/x.png", filename=None, part_type=None, charset=None))
    assert url.status_code == 400 and "loopback" in url.json()["error"]
    flawed = send(live, "v1", *multipart(b"http://example.com/a\x01.png", filename=None, part_type=None, charset=None))
    assert flawed.status_code == 400 and "not a valid URL" in flawed.json()["error"], flawed.text
    data_uri = send(live, "v1", *multipart(b"data:image/png;base64,\x01", filename=None, part_type=None, charset=None))
    assert data_uri.status_code == 400 and "base64" in data_uri.json()["error"], data_uri.text


def test_binary_that_is_no_image_in_a_plain_form_field_is_a_400_saying_so(live: Any) -> None:
    garbage = bytes(range(256)) * 4
    for version in ("v1", "v2"):
        answer = send(live, version, *multipart(garbage, filename=None, part_type=None, charset=None))
        assert answer.status_code == 400, answer.text
        assert "not in a known format" in answer.json()["error"], answer.text


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_second_file_is_named_as_a_second_field_is(live: Any, version: str) -> None:
    """Before: any second file part was a 400 "body: is not a valid form: Too many files. Maximum number of files is
    1.", naming no field, where a form field given twice or unknown is named (README, CONTRACT)."""
    png = encoded("PNG")
    url = f"{live.url}/{version}/{SLUG}"
    for files, field, why in [
        ([("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))], "image", "more than once"),
        ([("image", ("a.png", png, "image/png")), ("mask", ("m.png", png, "image/png"))], "mask", "unknown field"),
        ([("mask", ("m.png", png, "image/png")), ("image", ("a.png", png, "image/png"))], "mask", "unknown field"),
        ([("image", ("a.png", png, "image/png")), ("prompt", ("p.txt", b"sofa", "text/plain"))], "", ""),
    ]:
        answer = httpx.post(
            url, data={"threshold": "0.5"} | ({} if not field else FIELDS), files=files, headers=live.headers
        )
        if not field:  # a field's value uploaded as a file is that field
            assert answer.status_code == 200, answer.text
            continue
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"].startswith(f"{field}: ") and why in answer.json()["error"], answer.text


def utf8_bmp(width: int = 4, height: int = 4) -> bytes:
    """A 24-bit BMP whose every byte sequence is valid UTF-8 and holds characters U+0080-U+00FF (its pixel bytes are
    ASCII or two-byte sequences C2/C3 80-BF; its header's numbers are small, its zero bytes the control characters an
    image file has): a form parser decodes it as UTF-8 text without a fallback."""
    rng = np.random.default_rng(5)
    pixels = bytearray()
    while len(pixels) < width * height * 3:
        pixels += bytes([rng.integers(0x20, 0x7F)]) if rng.random() < 0.4 else bytes([0xC3, rng.integers(0x80, 0xC0)])
    pixels = pixels[: width * height * 3]
    if pixels[-1] in (0xC2, 0xC3):  # no sequence cut in two
        pixels[-1] = 0x41
    size = 54 + len(pixels)
    header = b"BM" + size.to_bytes(4, "little") + bytes(4) + (54).to_bytes(4, "little")
    dib = (40).to_bytes(4, "little") + width.to_bytes(4, "little") + height.to_bytes(4, "little")
    dib += (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + bytes(4) + len(pixels).to_bytes(4, "little")
    dib += bytes(16)
    return header + dib + bytes(pixels)


@pytest.mark.parametrize("charset", [None, "utf-8"])
def test_an_image_field_whose_bytes_are_valid_utf8_is_read_as_those_bytes(live: Any, charset: str | None) -> None:
    """Before: the parser decoded the part as UTF-8 and the service turned the text back into bytes with latin-1, so
    each two-byte character became one byte: 400 (the image was cut short) where the same bytes as a file were read."""
    image = utf8_bmp()
    text = image.decode("utf-8")
    assert any("\x80" <= c <= "\xff" for c in text) and "\x00" in text
    assert np.asarray(Image.open(io.BytesIO(image))).shape == (4, 4, 3)
    as_file = send(live, "v1", *multipart(image, filename="photo.bmp", part_type=None, charset=charset))
    assert as_file.status_code == 200, as_file.text
    as_field = send(live, "v1", *multipart(image, filename=None, part_type=None, charset=charset))
    assert as_field.status_code == 200, as_field.text
    assert np.array_equal(decode(as_field.content), decode(as_file.content))
    submitted = send(live, "v2", *multipart(image, filename=None, part_type=None, charset=charset))
    assert np.array_equal(decode(v2_output(live, submitted)), decode(as_file.content))
