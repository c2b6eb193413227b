"""The service on the internet: memory a request holds, who may use a server without keys, ambiguous credentials,
polling limits. Each finding through a live server on loopback, or the piece that enforces it."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from automask.imageio.load import inline_size
from automask.server import keys as keystore
from automask.server import routes
from automask.server.errors import ApiError
from automask.server.limits import BodyBudget
from automask.server.store import Store
from server_helpers import FakeBackend, live_server, png_bytes, wait_for

V1 = "/v1/automatic-mask-generator"
V2 = "/v2/automatic-mask-generator"


def noise_b64(side: int, seed: int = 0) -> str:
    """A side×side PNG of noise (incompressible: about 3·side² bytes) as base64."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return base64.b64encode(png_bytes(pixels)).decode()


# --- the body budget ------------------------------------------------------------------------------------------


def test_a_hold_grows_within_the_budget_or_is_refused() -> None:
    budget = BodyBudget(100, per_key=60)
    with budget.hold("a", 50) as a:
        a.grow(80)  # alone in the budget: admitted past it, as a first body larger than the budget is
        assert (budget.used, a.size) == (130, 130)
        with pytest.raises(ApiError) as refused, budget.hold("b", 1):
            pass
        assert (refused.value.status, refused.value.headers) == (503, {"Retry-After": "5"})
    assert budget.used == 0
    with budget.hold("a", 40) as a, budget.hold("b", 40) as b:
        with pytest.raises(ApiError):
            a.grow(30)  # 110 of 100
        b.grow(20)
        with pytest.raises(ApiError):
            b.grow(1)  # the budget is full
        assert (budget.used, a.size, b.size) == (100, 40, 60)
    with budget.hold("a", 40) as a, budget.hold("a", 10) as a2:
        with pytest.raises(ApiError):
            a2.grow(11)  # key a's share is 60
        a2.grow(10)
        assert budget.used == 60
    assert budget.used == 0


def test_a_v2_submit_holds_its_decoded_image_in_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a v2 submit held its body's room, but not the image it decodes from base64 to check it (and keeps
    until the job is stored): that much more memory per submit, outside the budget. Now the submit holds the
    decoded size too: a concurrent request that fits beside the body alone is 503 while it is held, admitted after."""
    image = noise_b64(150)
    body = json.dumps({"image": image, "prompt": "x"}).encode()
    decoded = inline_size(image)
    assert decoded > 60_000
    release, checking = threading.Event(), threading.Event()
    check_image = routes.check_image

    def held_check(*args: Any) -> None:
        checking.set()
        release.wait(30)
        check_image(*args)

    monkeypatch.setattr(routes, "check_image", held_check)
    room = 2 * len(body) + decoded // 2  # two bodies fit; two bodies and a decoded image do not
    with live_server(tmp_path / "data", FakeBackend(), max_body_bytes=len(body) + 1000, body_memory=room) as live:
        store = Store.in_data_dir(tmp_path / "data")
        (_, first), (_, second) = (keystore.create_key(store) for _ in range(2))
        bodies = live.app.state.automask.bodies
        headers = {"content-type": "application/json"}
        answers: list[httpx.Response] = []
        submit = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{live.url}{V2}", content=body, headers={**headers, "x-api-key": first}, timeout=30)
            )
        )
        submit.start()
        try:
            assert checking.wait(20)
            assert bodies.used == len(body) + decoded
            other = httpx.post(f"{live.url}{V1}", content=body, headers={**headers, "x-api-key": second}, timeout=30)
            assert other.status_code == 503 and other.headers["retry-after"] == "5", other.text
            assert "too many large requests" in other.json()["error"]
        finally:
            release.set()
            submit.join(30)
        assert answers[0].status_code == 200 and answers[0].json()["status"] == "QUEUED", answers[0].text
        wait_for(lambda: bodies.used == 0, 10)
        other = httpx.post(f"{live.url}{V1}", content=body, headers={**headers, "x-api-key": second}, timeout=30)
        assert other.status_code == 200, other.text
        store.close()
