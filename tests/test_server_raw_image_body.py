"""An image file sent as the request body itself (`curl --data-binary @photo.png -H 'Content-Type: image/png'`) is a 400
that says what the endpoint takes instead, on v1 and v2, and costs nothing.

Before, it was answered "body: is not valid JSON (Expecting value: line 1 column 1 (char 0)); ...", which does not
name the mistake.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from server_helpers import keyed_server, post_body


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with keyed_server(tmp_path_factory.mktemp("raw") / "data", credits=10) as server:
        yield server


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("PNG", "application/octet-stream"),
        ("GIF", "application/json"),
        ("WEBP", ""),
        ("BMP", "image/bmp"),
        ("PNG", "application/x-www-form-urlencoded"),  # curl --data-binary @photo.png, no Content-Type given
        ("JPEG", "multipart/form-data"),  # before: 'body: is not a valid form: Missing boundary in multipart.'
        ("PNG", "multipart/form-data; boundary=x"),  # before: 'body: is not a valid form: Invalid multipart data.'
    ],
)
def test_a_raw_image_body_is_a_400_saying_what_to_send(live: Any, version: str, fmt: str, content_type: str) -> None:
    answer = post_body(live, version, encoded(fmt), content_type)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error.startswith("body: is an image file's own bytes"), error
    assert "JSON object" in error and "base64" in error and "multipart form" in error and "'image' file" in error
    credits = httpx.get(f"{live.url}/v1/credits", headers=live.headers, timeout=10).json()["credits"]
    assert credits == 10


def test_any_image_type_with_a_body_that_is_no_image_is_told_too(live: Any) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="6"/>'
    answer = post_body(live, "v1", svg, "image/svg+xml")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith("body: is an image file's own bytes (sent as image/svg+xml)"), answer.text


def test_a_json_body_labelled_as_an_image_is_still_read(live: Any) -> None:
    body = json.dumps({"image": base64.b64encode(encoded("PNG")).decode(), "prompt": "sofa"}).encode()
    answer = post_body(live, "v1", body, "image/png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text


@pytest.mark.parametrize("content_type", ["image/png", "application/x-www-form-urlencoded"])
def test_a_json_body_that_starts_with_a_byte_order_mark_is_read_whatever_its_label(
    live: Any, content_type: str
) -> None:
    """A JSON file saved with a UTF-8 byte order mark (Windows editors), sent as `curl -d @body.json` (labelled a
    urlencoded form) or mislabelled image/*, is read as the same body labelled application/json is. Before: a 400,
    'body: is an image file's own bytes (sent as image/png)' and 'image: this field is required'."""
    body = json.dumps({"image": base64.b64encode(encoded("PNG")).decode(), "prompt": "sofa"}).encode()
    answers = [post_body(live, "v1", b"\xef\xbb\xbf" + body, label) for label in ("application/json", content_type)]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[1].headers["content-type"] == "image/png"
