"""`instance_masks` (an automask extension): each detection's own mask in the JSON answer of v1 and v2, equal to the
library's `MaskResult.instance_masks` for the same request; answers without it unchanged; the field validated."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from automask import MaskGenerator, Settings
from automask.result import MaskResult
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from server_helpers import FakeBackend, LiveServer, decode, png_bytes, wait_for

pytest.importorskip("fastapi")
SLUG = "automatic-mask-generator"
H, W = 30, 40
# FakeBackend: "sofa" selects the columns x >= 0.7·39 (28..39), "left" those with 1 - x/39 >= 0.7 (0..11); the
# answer's mask is their union grown by 3 px and inverted, the instances are neither.
OPTIONS = {"prompt": "sofa, left", "threshold": 0.7, "grow_mask": 3, "invert_mask": True}
SOFA, LEFT = list(range(28, 40)), list(range(12))


@pytest.fixture()
def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[Any]:
    settings = Settings(data_dir=tmp_path / "data")
    with LiveServer(create_app(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))) as running:
        running.store = Store.in_data_dir(settings.data_dir)
        key, token = keystore.create_key(running.store, credits=10)
        running.key_id, running.headers = key.id, {"x-api-key": token}
        yield running


def library(image: np.ndarray, tmp_path: Path, **options: Any) -> MaskResult:
    """The library's answer to the same request (its own generator, the same fake model)."""
    gen = MaskGenerator(FakeBackend(), Settings(data_dir=tmp_path / "lib"))
    prompt = options.pop("prompt")
    return gen.generate(image, prompt, **options)


def post(live: Any, version: str = "v1", **kw: Any) -> httpx.Response:
    return httpx.post(f"{live.url}/{version}/{SLUG}", headers=live.headers, timeout=30, **kw)


def columns(mask: np.ndarray) -> list[int]:
    """The columns of a mask made of whole 255 columns (the fake model's)."""
    assert set(np.unique(mask).tolist()) <= {0, 255} and ((mask == 0).all(0) | (mask == 255).all(0)).all()
    return np.flatnonzero((mask == 255).all(0)).tolist()


def check_instances(body: dict[str, Any], want: MaskResult) -> None:
    """`instances` is aligned with `detections` and holds the library's instance masks, pixel for pixel."""
    got = body["instances"]
    assert [{k: v for k, v in inst.items() if k != "mask"} for inst in got] == body["detections"]
    assert body["detections"] == json.loads(json.dumps([d.to_dict() for d in want.detections]))
    assert len(got) == len(want.instance_masks) == 2
    for inst, mask in zip(got, want.instance_masks, strict=True):
        served = decode(base64.b64decode(inst["mask"]))
        assert served.dtype == np.uint8 and served.shape == (H, W)
        assert np.array_equal(served, mask)
    assert [columns(decode(base64.b64decode(i["mask"]))) for i in got] == [SOFA, LEFT]


def test_v1_json_carries_the_instance_masks_of_the_library(live: Any, image: np.ndarray, tmp_path: Path) -> None:
    want = library(image, tmp_path, **OPTIONS)
    b64 = base64.b64encode(png_bytes(image)).decode()
    r = post(live, json={"image": b64, **OPTIONS, "base64": True, "instance_masks": True})
    assert r.status_code == 200, r.text
    body = r.json()
    check_instances(body, want)
    assert base64.b64decode(body["image"]) == want.to_png()  # the answer's own mask: grown and inverted
    assert columns(decode(base64.b64decode(body["image"]))) == list(range(15, 25))
    # multipart: the form's "true" strings are read as booleans
    fields = {k: str(v).lower() for k, v in OPTIONS.items()} | {"base64": "true", "instance_masks": "true"}
    form = post(live, data=fields, files={"image": ("in.png", png_bytes(image), "image/png")})
    assert form.status_code == 200, form.text
    check_instances(form.json(), want)


def test_v2_response_carries_them_with_or_without_base64(live: Any, image: np.ndarray, tmp_path: Path) -> None:
    want = library(image, tmp_path, **OPTIONS)
    b64 = base64.b64encode(png_bytes(image)).decode()
    for as_base64 in (False, True):
        sub = post(live, "v2", json={"image": b64, **OPTIONS, "base64": as_base64, "instance_masks": True}).json()
        wait_for(lambda s=sub: httpx.get(s["status_url"], headers=live.headers).json()["status"] == "COMPLETED", 20)
        body = httpx.get(sub["response_url"], headers=live.headers).json()
        check_instances(body, want)
        if as_base64:
            assert base64.b64decode(body["output"]) == want.to_png()
        else:
            assert httpx.get(body["output"], headers=live.headers).content == want.to_png()
    assert keystore.get_key(live.store, live.key_id).credits == 10 - 2


def test_answers_without_the_field_are_unchanged(live: Any, image: np.ndarray, tmp_path: Path) -> None:
    want = library(image, tmp_path, **OPTIONS)
    b64 = base64.b64encode(png_bytes(image)).decode()
    for extra in ({}, {"instance_masks": False}):
        png = post(live, json={"image": b64, **OPTIONS, **extra})
        assert png.headers["content-type"] == "image/png" and png.content == want.to_png()
        body = post(live, json={"image": b64, **OPTIONS, "base64": True, **extra}).json()
        expected = json.loads(json.dumps(want.metadata()))  # boxes as JSON lists
        assert set(body) == {"image", "inference_time", *expected}  # no "instances"
        for volatile in ("timings", "inference_time"):
            body.pop(volatile), expected.pop(volatile, None)
        assert body == {"image": base64.b64encode(want.to_png()).decode(), **expected}


def test_nothing_found_has_no_instances(live: Any, image: np.ndarray) -> None:
    b64 = base64.b64encode(png_bytes(image)).decode()
    body = post(live, json={"image": b64, "prompt": "nothing", "base64": True, "instance_masks": True}).json()
    assert body["empty"] is True and body["detections"] == [] and body["instances"] == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"instance_masks": "yes", "base64": True}, "instance_masks: "),
        ({"instance_masks": 1, "base64": True}, "instance_masks: "),
        ({"instance_masks": True}, "instance_masks: needs base64: true on v1"),
    ],
)
def test_the_field_is_validated(live: Any, image: np.ndarray, extra: dict[str, Any], message: str) -> None:
    b64 = base64.b64encode(png_bytes(image)).decode()
    r = post(live, json={"image": b64, "prompt": "sofa", **extra})
    assert r.status_code == 400 and r.json()["error"].startswith(message), r.text
    assert keystore.get_key(live.store, live.key_id).credits == 10  # refused before any credit is held
    if "base64" in extra:  # v2 validates the same way (v2 needs no base64: its response is JSON)
        r2 = post(live, "v2", json={"image": b64, "prompt": "sofa", **extra})
        assert r2.status_code == 400 and r2.json()["error"].startswith(message), r2.text


def test_openapi_describes_the_field(live: Any) -> None:
    spec = httpx.get(f"{live.url}/openapi.json").json()
    body = spec["paths"][f"/v1/{SLUG}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    field = body["properties"]["instance_masks"]
    assert field["type"] == "boolean" and field["default"] is False
    assert field["description"].startswith("automask extension") and "base64" in field["description"]
