"""A model that scores NaN or ±inf: the answers of v1 (JSON) and v2 still hold only finite numbers.

Before, a NaN score passed the detection threshold (`NaN < t` is false), the v2 job was stored COMPLETED, and then
`GET /v2/requests/{id}` answered 500 on every poll (JSON has no NaN); v1 `base64: true` answered 500 too.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from automask.backends.base import Scores
from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import png_bytes, wait_for

NAN, INF = float("nan"), float("inf")
H, W = 8, 10


class NonFiniteBackend:
    """Four instances on a 8×10 image, each owning two columns: scores NaN, +inf, 0.9 (its box NaN) and -inf."""

    name = "nonfinite"
    model_id = "nonfinite"

    def encode(self, image: np.ndarray) -> np.ndarray:
        return image

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        maps = np.zeros((4, H, W), np.float32)
        for i in range(4):
            maps[i, :, 2 * i : 2 * i + 2] = 1.0
        boxes = np.array([[2 * i, 0, 2 * i + 2, H] for i in range(4)], np.float32)
        boxes[2] = [NAN, 0, INF, H]
        scores = np.array([NAN, INF, 0.9, -INF], np.float32)
        labels = [prompts[0]] * 4
        return Scores(maps=maps, labels=labels, kind="instances", scores=scores, boxes=boxes)


class NaNMapBackend(NonFiniteBackend):
    """One dense score map: NaN in column 0, +inf in column 1, 0.5 elsewhere."""

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        m = np.full((1, H, W), 0.5, np.float32)
        m[0, :, 0], m[0, :, 1] = NAN, INF
        return Scores(maps=m, labels=[prompts[0]])


@pytest.fixture(params=[NonFiniteBackend, NaNMapBackend])
def served(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[TestClient, dict[str, str], str]]:
    """(a client of the service answering with the backend, its key header, the backend's name)."""
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings, ServerSettings(), MaskGenerator(request.param(), settings))
    store = Store.from_settings(settings, create=True)
    _, token = keystore.create_key(store, credits=5)
    with TestClient(app) as client:
        yield client, {"x-api-key": token}, request.param.__name__
    store.close()


def finite(value: Any) -> bool:
    """True if no float anywhere inside `value` is NaN or infinite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(finite(v) for v in value)
    return True


def check(body: dict[str, Any], backend: str) -> None:
    """Only finite numbers (strict JSON); a NaN or -inf score is not selected, +inf reads as 1, a NaN box is the
    instance's own."""
    assert finite(body) and json.loads(json.dumps(body, allow_nan=False)) == body
    dets = [{k: d[k] for k in ("score", "box", "area")} for d in body["detections"]]
    if backend == "NonFiniteBackend":
        assert dets == [
            {"score": 1.0, "box": [2.0, 0.0, 4.0, float(H)], "area": 2 * H},
            {"score": 0.9, "box": [4.0, 0.0, 6.0, float(H)], "area": 2 * H},
        ]
        assert body["selected_pixels"] == 4 * H  # the columns of instances 1 and 2
    else:
        assert dets == [{"score": 1.0, "box": [1.0, 0.0, float(W), float(H)], "area": (W - 1) * H}]
        assert body["selected_pixels"] == (W - 1) * H  # every column but the NaN one


def test_v1_json_and_v2_response_carry_only_finite_numbers(served: tuple[TestClient, dict[str, str], str]) -> None:
    client, headers, backend = served
    image = base64.b64encode(png_bytes(np.zeros((H, W, 3), np.uint8))).decode()
    body = {"image": image, "prompt": "thing", "threshold": 0.2, "grow_mask": 0, "base64": True}
    v1 = client.post("/v1/automatic-mask-generator", json=body, headers=headers)
    assert v1.status_code == 200, v1.text
    check(v1.json(), backend)
    job = client.post("/v2/automatic-mask-generator", json={**body, "instance_masks": True}, headers=headers)
    response = job.json()["response_url"].removeprefix("http://testserver")

    def done() -> dict[str, Any] | None:
        answer = client.get(response, headers=headers)
        assert answer.status_code in (200, 202), answer.text
        result: dict[str, Any] = answer.json()
        return result if result["status"] == "COMPLETED" else None

    result = wait_for(done, 30)
    check(result, backend)
    assert [{k: v for k, v in i.items() if k != "mask"} for i in result["instances"]] == result["detections"]
