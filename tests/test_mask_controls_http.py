"""The mask controls over HTTP: the optional fields negative_prompt, fill_holes, min_area and feather give the
library's result (JSON and multipart), bad values are a 400 naming the field, and the OpenAPI description documents
them and the order of operations. The official SDK, which sends none of them, is tested in test_server_sdk.py."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from automask import MaskGenerator, Settings
from automask.errors import InvalidOptionError
from automask.options import FEATHER_MAX
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.schemas import MAX_PROMPT_TARGETS, validate_request
from server_helpers import FakeBackend, LiveServer, decode, png_bytes

# -- HTTP --------------------------------------------------------------------------------------------


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings, ServerSettings(auth=False), MaskGenerator(FakeBackend(), settings))
    with LiveServer(app) as server:
        yield server


IMAGE = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)


def post(live: LiveServer, version: str = "v1", **kw: Any) -> httpx.Response:
    return httpx.post(f"{live.url}/{version}/automatic-mask-generator", timeout=30, **kw)


def test_http_fields_give_the_library_result(live: LiveServer) -> None:
    opts: dict[str, Any] = {
        "negative_prompt": "left",
        "fill_holes": True,
        "min_area": 20,
        "feather": 3,
        "threshold": 0.3,
    }
    expected = MaskGenerator(FakeBackend()).generate(IMAGE, "sofa", grow_mask=2, **opts)
    assert ((expected.mask > 0) & (expected.mask < 255)).any() and (expected.mask == 0).any()
    body = {"image": base64.b64encode(png_bytes(IMAGE)).decode(), "prompt": "sofa", "grow_mask": 2, **opts}
    r = post(live, json=body)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(decode(r.content), expected.mask)
    form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in body.items() if k != "image"}
    r = post(live, data=form, files={"image": ("a.png", png_bytes(IMAGE), "image/png")})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(decode(r.content), expected.mask)
    r = post(live, json={**body, "base64": True})
    meta = r.json()
    np.testing.assert_array_equal(decode(base64.b64decode(meta["image"])), expected.mask)
    assert (meta["negative_prompts"], meta["fill_holes"], meta["min_area"], meta["feather"]) == (["left"], True, 20, 3)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"feather": 101}, "feather"),
        ({"feather": -1}, "feather"),
        ({"feather": "3"}, "feather"),
        ({"min_area": -1}, "min_area"),
        ({"min_area": True}, "min_area"),
        ({"fill_holes": "yes"}, "fill_holes"),
        ({"negative_prompt": 7}, "negative_prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"negative_prompt": ", ".join(f"t{i}" for i in range(MAX_PROMPT_TARGETS))}, "negative_prompt"),
    ],
)
def test_http_bad_values_are_a_400_naming_the_field(live: LiveServer, extra: dict[str, Any], field: str) -> None:
    body = {"image": base64.b64encode(png_bytes(IMAGE)).decode(), "prompt": "sofa", **extra}
    with pytest.raises(InvalidOptionError) as err:
        validate_request(body, strict=True)
    assert err.value.field == field
    r = post(live, json=body)
    assert r.status_code == 400 and r.json()["error"].startswith(f"{field}: "), r.text


def test_the_openapi_description_documents_the_fields_and_the_order(live: LiveServer) -> None:
    spec = httpx.get(f"{live.url}/openapi.json", timeout=10).json()
    body = spec["paths"]["/v1/automatic-mask-generator"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    assert body["multipart/form-data"]["schema"] == schema
    props = schema["properties"]
    assert {"negative_prompt", "fill_holes", "min_area", "feather"} <= set(props)
    assert not {"negative_prompt", "fill_holes", "min_area", "feather"} & set(schema.get("required", []))
    assert (props["feather"]["maximum"], props["min_area"]["minimum"]) == (FEATHER_MAX, 0)
    assert "threshold -> negative_prompt -> fill_holes -> min_area -> grow_mask -> invert_mask -> feather" in " ".join(
        schema["description"].split()
    )


def test_v2_jobs_keep_the_new_fields(live: LiveServer) -> None:
    opts: dict[str, Any] = {"negative_prompt": "left", "min_area": 20, "feather": 3, "threshold": 0.3, "grow_mask": 0}
    expected = MaskGenerator(FakeBackend()).generate(IMAGE, "sofa", **opts).mask
    body = {"image": base64.b64encode(png_bytes(IMAGE)).decode(), "prompt": "sofa", **opts}
    submitted = post(live, "v2", json=body)
    assert submitted.status_code == 200, submitted.text
    deadline = time.monotonic() + 30
    while (status := httpx.get(submitted.json()["status_url"], timeout=10).json()["status"]) not in ("COMPLETED",):
        assert status in ("QUEUED", "PROCESSING") and time.monotonic() < deadline, status
        time.sleep(0.05)
    answer = httpx.get(submitted.json()["response_url"], timeout=10).json()
    assert (answer["negative_prompts"], answer["min_area"], answer["feather"]) == (["left"], 20, 3)
    np.testing.assert_array_equal(decode(httpx.get(answer["output"], timeout=10).content), expected)
