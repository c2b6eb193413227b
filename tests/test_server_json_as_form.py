"""A JSON body sent with `Content-Type: application/x-www-form-urlencoded` (what `curl -d '{...}'` sends when no
`-H 'Content-Type: application/json'` is given) is read as the JSON it is, on v1 and v2, on a real server.

Before, it was parsed as a form, its JSON text split at '&' and '=' into made-up field names, and answered 400
"image: this field is required" although the body names the image.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from server_helpers import decode, keyed_server, png_bytes, post_body

SLUG = "automatic-mask-generator"
FORM = "application/x-www-form-urlencoded"
IMAGE = base64.b64encode(png_bytes(np.full((30, 40, 3), 90, np.uint8))).decode()


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[Any]:
    with keyed_server(tmp_path / "data", credits=10) as server:
        yield server


def send(live: Any, version: str, body: str, content_type: str) -> httpx.Response:
    return post_body(live, version, body.encode(), content_type)


@pytest.mark.parametrize("lead", ["", " \r\n\t"])
def test_a_json_body_sent_as_a_urlencoded_form_is_read_as_json(live: Any, lead: str) -> None:
    body = lead + json.dumps({"prompt": "sofa", "image": IMAGE, "threshold": 0.5, "grow_mask": 0})
    as_json = send(live, "v1", body, "application/json")
    assert as_json.status_code == 200, as_json.text
    as_form = send(live, "v1", body, FORM)
    assert as_form.status_code == 200, as_form.text
    assert np.array_equal(decode(as_form.content), decode(as_json.content))
    assert as_form.headers["x-remaining-credits"] == str(int(as_json.headers["x-remaining-credits"]) - 1)
    submitted = send(live, "v2", body, f"{FORM}; charset=utf-8")
    assert submitted.status_code == 200, submitted.text
    for _ in range(200):
        status = httpx.get(submitted.json()["status_url"], headers=live.headers, timeout=10).json()
        if status["status"] in ("COMPLETED", "FAILED"):
            break
        time.sleep(0.05)
    assert status["status"] == "COMPLETED", status


def test_such_a_body_is_checked_as_json_is(live: Any) -> None:
    for body, field in [
        (json.dumps({"prompt": "sofa", "image": IMAGE, "threshold": "0.5"}), "threshold"),  # JSON's types, strict
        (json.dumps({"prompt": "sofa"}), "image"),
        ('{"prompt": "sofa", "image": "' + IMAGE + '", "prompt": "lamp"}', "prompt"),  # a field given twice
    ]:
        answer = send(live, "v1", body, FORM)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"].startswith(f"{field}: "), answer.text
    broken = send(live, "v1", '{"prompt": "sofa", ', FORM)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]


def test_a_real_urlencoded_form_is_still_a_form(live: Any) -> None:
    form = httpx.post(
        f"{live.url}/v1/{SLUG}", data={"prompt": "sofa", "image": IMAGE, "threshold": "0.5"}, headers=live.headers
    )
    assert form.status_code == 200, form.text  # a form's text numbers, as before
