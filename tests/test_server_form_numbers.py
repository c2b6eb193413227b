"""A number means the same in a multipart form as in JSON, for v1 and v2: the same text (`1.0`, `1e3`) is accepted by
both or refused by both, naming the field. An integer option takes a whole number however it is written (`1e3` is
1000, as JSON's number is), never one with a fraction (`1.5`).

Before, an integer option written with an exponent (`seed=1e3`, `grow_mask=2e0`) was a 400 in a form ("unable to
parse string as an integer") while JSON took it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import FakeBackend, png_bytes

PNG = png_bytes(np.zeros((6, 8, 3), np.uint8))
ACCEPTED = [  # (field, the number's text in both encodings, what the v1 answer's metadata says; None: not shown)
    ("seed", "1.0", 1),
    ("seed", "1e3", 1000),
    ("seed", "1E2", 100),
    ("seed", "9.99999999999999e14", 999999999999999),
    ("grow_mask", "2.0", None),
    ("grow_mask", "2e1", None),
    ("feather", "1e0", 1),
    ("min_area", "3.0E0", 3),
    ("threshold", "1", None),
    ("threshold", "5e-1", None),
    ("text_threshold", "0.5", None),
]
REFUSED = [
    ("seed", "1.5"),
    ("seed", "1e15"),
    ("seed", "1e400"),
    ("grow_mask", "2.5"),
    ("grow_mask", "1e3"),
    ("feather", "5e-1"),
    ("min_area", "1e-3"),
    ("threshold", "2"),
]


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))
    store = Store.from_settings(settings, create=True)
    _, token = keystore.create_key(store)
    with TestClient(app) as test_client:
        yield test_client, {"x-api-key": token}
    store.close()


def post(client: tuple[TestClient, dict[str, str]], version: str, form: bool, field: str, text: str) -> Any:
    """POST `field` written as `text` (with an image, a prompt and base64) in a JSON body, or in a multipart form."""
    test_client, headers = client
    url = f"/{version}/automatic-mask-generator"
    if form:
        data = {"prompt": "x", "base64": "true", field: text}
        return test_client.post(url, data=data, files={"image": ("i.png", PNG, "image/png")}, headers=headers)
    image = base64.b64encode(PNG).decode()
    body = f'{{"image": "{image}", "prompt": "x", "base64": true, "{field}": {text}}}'
    return test_client.post(url, content=body, headers={**headers, "content-type": "application/json"})


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(("field", "text", "shown"), ACCEPTED)
def test_a_form_takes_the_numbers_json_takes(
    client: tuple[TestClient, dict[str, str]], version: str, field: str, text: str, shown: int | None
) -> None:
    answers = [post(client, version, form, field, text) for form in (False, True)]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    if version == "v1" and shown is not None:
        assert [a.json()[field] for a in answers] == [shown, shown]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(("field", "text"), REFUSED)
def test_a_form_refuses_the_numbers_json_refuses(
    client: tuple[TestClient, dict[str, str]], version: str, field: str, text: str
) -> None:
    answers = [post(client, version, form, field, text) for form in (False, True)]
    assert [a.status_code for a in answers] == [400, 400], [a.text for a in answers]
    assert all(a.json()["error"].startswith(f"{field}: ") for a in answers)


NOT_JSON_NUMBERS = [("seed", "1_0"), ("grow_mask", "+5"), ("threshold", "+0.5"), ("min_area", "05"), ("feather", "5.")]
NOT_JSON_NUMBERS += [("threshold", ".5"), ("text_threshold", "0x1"), ("seed", "1e1_0"), ("grow_mask", "١")]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(("field", "text"), NOT_JSON_NUMBERS)
def test_a_form_refuses_numbers_json_cannot_write_naming_the_field(
    client: tuple[TestClient, dict[str, str]], version: str, field: str, text: str
) -> None:
    """Before: a form took what Python's int()/float() take (`seed=1_0` was 10, `grow_mask=+5` was 5, `min_area=05`
    was 5), text that is no JSON number: the JSON body refuses it, so one value meant something in one encoding only.
    Now multipart and urlencoded forms refuse it with a 400 naming the field and how to write the number."""
    as_json = post(client, version, False, field, text)
    assert as_json.status_code == 400 and as_json.json()["error"].startswith("body: is not valid JSON"), as_json.text
    test_client, headers = client
    url = f"/{version}/automatic-mask-generator"
    data = {"prompt": "x", "base64": "true", field: text}
    multipart = post(client, version, True, field, text)
    urlencoded = test_client.post(url, data={**data, "image": base64.b64encode(PNG).decode()}, headers=headers)
    for answer in (multipart, urlencoded):
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error.startswith(f"{field}: must be a number written as JSON writes one") and repr(text) in error, error


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(("field", "text"), [("grow_mask", "1_0"), ("seed", "05"), ("threshold", "+0.5")])
def test_a_number_uploaded_as_a_file_part_is_read_as_a_form_field_is(
    client: tuple[TestClient, dict[str, str]], version: str, field: str, text: str
) -> None:
    """Before: a number field sent as a file part (a filename given, as some clients send every part) skipped the
    form's number check: `grow_mask` as a file holding `1_0` was 10, `seed` holding `05` was 5."""
    test_client, headers = client
    files = {"image": ("i.png", PNG, "image/png"), field: ("f.txt", text.encode(), "text/plain")}
    answer = test_client.post(
        f"/{version}/automatic-mask-generator", data={"prompt": "x"}, files=files, headers=headers
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(f"{field}: must be a number written as JSON writes one"), answer.text


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_text_field_uploaded_as_a_file_part_is_that_text(
    client: tuple[TestClient, dict[str, str]], version: str
) -> None:
    test_client, headers = client
    files = {"image": ("i.png", PNG, "image/png"), "grow_mask": ("g.txt", b"2e0", "text/plain")}
    files |= {"prompt": ("p.txt", b"sofa, lamp", "text/plain")}
    url = f"/{version}/automatic-mask-generator"
    answer = test_client.post(url, data={"base64": "true"}, files=files, headers=headers)
    assert answer.status_code == 200, answer.text
    if version == "v1":
        assert answer.json()["prompts"] == ["sofa", "lamp"]
    bad = test_client.post(url, files={**files, "prompt": ("p.txt", b"\xff\xfe", "text/plain")}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"].startswith("prompt: "), bad.text


@pytest.mark.parametrize("body", [b"", b" \r\n"])
def test_an_empty_body_says_it_is_empty(client: tuple[TestClient, dict[str, str]], body: bytes) -> None:
    """Before: "body: is not valid JSON (Expecting value: line 1 column 1 (char 0))"."""
    test_client, headers = client
    for content_type in ("application/json", ""):
        answer = test_client.post(
            "/v1/automatic-mask-generator", content=body, headers={**headers, "content-type": content_type}
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"].startswith("body: is empty; send a JSON object"), answer.text
