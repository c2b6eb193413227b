"""The official `segmind` SDK, unchanged, against automask serving the tiny CLIPSeg on a loopback port."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from automask import Settings
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from server_helpers import LiveServer, decode, wait_ready

segmind = pytest.importorskip("segmind")
SLUG = "automatic-mask-generator"


@pytest.fixture()
def live(tmp_path: Path, tiny_clipseg_dir: Path) -> Iterator[Any]:
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny_clipseg_dir))
    with LiveServer(create_app(settings, ServerSettings(concurrency=2))) as server:
        wait_ready(server.url)
        server.store = Store.in_data_dir(settings.data_dir)
        yield server


@pytest.fixture()
def photo(chelsea: np.ndarray) -> tuple[str, tuple[int, int]]:
    """skimage's cat as base64 JPEG, and its (height, width)."""
    buf = io.BytesIO()
    Image.fromarray(chelsea).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode(), chelsea.shape[:2]


def client(live: Any, token: str) -> Any:
    return segmind.SegmindClient(api_key=token, base_url=f"{live.url}/v1", timeout=30)


def test_sdk_run_sync_returns_the_mask(live: Any, photo: tuple[str, tuple[int, int]], tiny_clipseg_dir: Path) -> None:
    key, token = keystore.create_key(live.store, credits=10)
    image, size = photo
    r = client(live, token).run_sync(SLUG, image=image, prompt="cat", threshold=0.2, grow_mask=5, seed=468685)
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-remaining-credits"] == "9"  # what the hosted API reports after the charge
    mask = decode(r.content)
    assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
    alpha = decode(client(live, token).run_sync(SLUG, image=image, prompt="cat", return_alpha=True).content)
    assert alpha.shape == (*size, 4)
    answer = client(live, token).run_sync(SLUG, image=image, prompt="cat", base64=True)
    body = answer.json()
    assert decode(base64.b64decode(body["image"])).shape == size
    assert body["model"] == tiny_clipseg_dir.name  # the model's name, never the server's path
    assert body["inference_time"] == pytest.approx(body["timings"]["total"], abs=1e-6)
    assert float(answer.headers["x-inference-time"]) == pytest.approx(body["inference_time"], abs=1e-6)
    assert answer.headers["x-remaining-credits"] == "7"
    assert keystore.get_key(live.store, key.id).credits == 7


def test_sdk_submit_async_wait_and_run(live: Any, photo: tuple[str, tuple[int, int]]) -> None:
    _, token = keystore.create_key(live.store)
    image, size = photo
    sdk = client(live, token)
    job = sdk.submit_async(SLUG, image=image, prompt="cat, sofa", invert_mask=True)
    assert job.status_url.startswith(live.url) and job.response_url.startswith(live.url)
    result = job.wait(timeout=60, interval=0.2)
    assert result["status"] == "COMPLETED" and result["request_id"] == job.request_id
    assert result["metrics"]["inference_time"] > 0
    png = httpx.get(result["output"], headers={"x-api-key": token})
    assert decode(png.content).shape == size
    result = sdk.run(SLUG, image=image, prompt="cat", base64=True)
    assert result["status"] == "COMPLETED"
    assert decode(base64.b64decode(result["output"])).shape == size


def test_sdk_sees_errors(live: Any, photo: tuple[str, tuple[int, int]]) -> None:
    _, token = keystore.create_key(live.store)
    image, _ = photo
    with pytest.raises(segmind.SegmindError) as err:
        client(live, "am_wrong_key").run_sync(SLUG, image=image, prompt="cat")
    assert err.value.status == 401 and "API key" in err.value.detail
    with pytest.raises(segmind.SegmindError) as err:
        client(live, token).run_sync(SLUG, image=image, prompt="cat", threshold=1.5)
    assert err.value.status == 400 and err.value.detail.startswith("threshold: ")
    with pytest.raises(segmind.SegmindError) as err:  # a union-typed field: named as sent, not "image.str"
        client(live, token).run_sync(SLUG, image=12345, prompt="cat")
    assert err.value.status == 400 and err.value.detail.startswith("image: must be a string")
    with pytest.raises(segmind.SegmindError) as err:  # not an image: refused at submit, as v1 refuses it
        client(live, token).submit_async(SLUG, image="bm90IGFuIGltYWdl", prompt="cat")
    assert err.value.status == 400 and "not an image" in err.value.detail
    png = base64.b64decode(image)
    truncated = base64.b64encode(png[: len(png) // 2]).decode()  # a sound header: it fails when the job decodes it
    job = client(live, token).submit_async(SLUG, image=truncated, prompt="cat")
    with pytest.raises(segmind.InferenceFailed) as failed:
        job.wait(timeout=30, interval=0.2)
    assert failed.value.status_body["status"] == "FAILED" and "truncated" in failed.value.detail
