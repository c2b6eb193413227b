"""The service on the internet: memory a request holds, who may use a server without keys, ambiguous credentials,
polling limits. Each finding through a live server on loopback, or the piece that enforces it."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from automask.backends.base import Scores
from automask.errors import InvalidOptionError
from automask.imageio.load import inline_size
from automask.server import keys as keystore
from automask.server import routes
from automask.server.bodies import BodyBudget
from automask.server.errors import ApiError
from automask.server.limits import RedisRateLimiter
from automask.server.schemas import validate_request
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
    assert decoded >= len(base64.b64decode(image)) > 60_000
    assert inline_size(base64.b64decode(image)) == inline_size(" https://example.com/a.png") == 0  # nothing decoded
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


def test_validating_a_request_copies_no_image_text() -> None:
    """Before: the check for unpaired surrogates encoded every string field, the image's base64 (tens of MB) too: a
    full copy of it per request. Now an ASCII string (all base64) needs no look at all, and others are searched."""
    image = noise_b64(600)
    tracemalloc.start()
    try:
        req = validate_request({"image": image, "prompt": "x"}, strict=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert req.image is image and peak < len(image) // 20, peak / len(image)
    for strict in (True, False):  # and a string that is not text is still refused
        with pytest.raises(InvalidOptionError, match="prompt"):
            validate_request({"image": image, "prompt": "caf\u00e9 \ud800"}, strict=strict)


class MemoryProbe(FakeBackend):
    """FakeBackend noting the memory traced (`tracemalloc`) when it is asked to score: what the request holds."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[int] = []

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        self.held.append(tracemalloc.get_traced_memory()[0])
        return super().score(features, prompts, min_score=min_score)


@pytest.mark.parametrize("form", [False, True], ids=["json", "multipart"])
def test_a_v1_request_holds_its_body_once_while_it_runs(form: bool, tmp_path: Path) -> None:
    """The budget counts a body once. Before: the route read it with `request.body()`, which keeps the bytes for as
    long as the request runs, next to the parsed text or the uploaded file's bytes: a v1 request held its body twice
    during inference."""
    pixels = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    png = png_bytes(pixels)
    if form:
        request = httpx.Request("POST", "http://x", data={"prompt": "x"}, files={"image": ("a.png", png)})
    else:
        request = httpx.Request("POST", "http://x", json={"image": base64.b64encode(png).decode(), "prompt": "x"})
    body, headers = request.read(), {"content-type": request.headers["content-type"]}
    del png, request
    probe = MemoryProbe()
    with live_server(tmp_path / "data", probe, auth=False) as live:
        assert httpx.post(f"{live.url}{V1}", content=body, headers=headers, timeout=60).status_code == 200
        tracemalloc.start()
        try:
            r = httpx.post(f"{live.url}{V1}", content=body, headers=headers, timeout=60)
        finally:
            tracemalloc.stop()
    assert r.status_code == 200, r.text
    held = probe.held[-1]  # the parsed body (the base64 text or the file, once) and the pixels, with some slack
    assert held <= len(body) + pixels.nbytes + len(body) // 4, held / len(body)


# --- a server without keys serves this machine only --------------------------------------------------------


def test_without_keys_only_this_machine_is_served(tmp_path: Path) -> None:
    """Before: with `--no-auth`, a web page open in the user's browser could use the service: another site posting
    to 127.0.0.1 (CSRF), or a name of the attacker's resolved to 127.0.0.1 (DNS rebinding: Host is that name)."""
    image = noise_b64(8)
    with live_server(tmp_path / "data", FakeBackend(), auth=False) as live:
        port = int(live.url.rsplit(":", 1)[1])
        served = [
            {},
            {"host": f"localhost:{port}"},
            {"host": "LOCALHOST"},
            {"host": "[::1]:1"},
            {"origin": live.url},
            {"host": f"localhost:{port}", "origin": f"http://localhost:{port}"},
        ]
        refused = [
            {"host": "evil.example"},
            {"host": f"evil.example:{port}"},  # DNS rebinding: evil.example resolves to 127.0.0.1
            {"host": "127.0.0.1.evil.example"},
            {"host": "localhost@evil.example"},
            {"origin": "https://evil.example"},  # CSRF: another site's page
            {"origin": f"http://localhost:{port}"},  # not the Host's own origin
            {"origin": f"https://127.0.0.1:{port}"},
            {"origin": "null"},  # a sandboxed frame or a file: page
            {"origin": "http://[::1"},
        ]
        for headers in served:
            r = httpx.get(f"{live.url}/v1/models", headers=headers)
            assert r.status_code == 200, (headers, r.text)
        for headers in refused:
            for method, path in (("GET", "/v1/models"), ("POST", V1), ("GET", "/healthz")):
                r = httpx.request(method, f"{live.url}{path}", headers=headers, json={"image": image, "prompt": "x"})
                assert r.status_code == 403, (headers, method, path, r.text)
                assert "without API keys (--no-auth)" in r.json()["error"], r.text
        r = httpx.post(f"{live.url}{V1}", headers={"host": "evil.example"}, json={"image": image, "prompt": "x"})
        assert f"Use http://127.0.0.1:{port}" in r.json()["error"] and "'evil.example'" in r.json()["error"]
        r = httpx.post(f"{live.url}{V1}", headers={"origin": live.url}, json={"image": image, "prompt": "x"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"  # the page's own requests


def test_without_keys_every_loopback_spelling_of_this_machine_is_served(tmp_path: Path) -> None:
    """Before: `--no-auth` is allowed on any loopback host (127.0.0.0/8, ::1), but a server bound to 127.0.0.2
    refused every request addressed to it (Host 127.0.0.2: 403), and so did `localhost.` (the fully qualified
    spelling browsers accept). A loopback address literal cannot be a rebound DNS name: it is this machine."""
    with live_server(tmp_path / "data", FakeBackend(), auth=False) as live:
        port = int(live.url.rsplit(":", 1)[1])
        for host in (f"127.0.0.2:{port}", "127.1.2.3", f"localhost.:{port}", "LocalHost.", "[0:0:0:0:0:0:0:1]:1"):
            headers = {"host": host, "origin": f"http://{host}"}
            r = httpx.get(f"{live.url}/v1/models", headers=headers)
            assert r.status_code == 200, (host, r.text)
        for host in ("localhost..", "localhost.evil.example", "128.0.0.1", "[::2]", "[::1].", "."):
            assert httpx.get(f"{live.url}/v1/models", headers={"host": host}).status_code == 403, host


def test_without_keys_the_public_urls_host_is_served_too(tmp_path: Path) -> None:
    """Behind a proxy on this machine that keeps the client's Host (`--public-url`)."""
    with live_server(tmp_path / "data", FakeBackend(), auth=False, public_url="https://Masks.example.com/api/") as live:
        ok = {"host": "masks.example.com", "origin": "https://masks.example.com"}
        assert httpx.get(f"{live.url}/v1/models", headers=ok).status_code == 200
        proxied = {"origin": "https://masks.example.com"}  # a proxy that sends its own Host
        assert httpx.get(f"{live.url}/v1/models", headers=proxied).status_code == 200
        for bad in ({"host": "other.example.com"}, {"origin": "http://masks.example.com"}):
            assert httpx.get(f"{live.url}/v1/models", headers=bad).status_code == 403, bad
        # the fully qualified spelling (a trailing dot) names the same host: before, it was 403
        fqdn = {"host": "masks.example.com.:443", "origin": "https://masks.example.com."}
        assert httpx.get(f"{live.url}/v1/models", headers=fqdn).status_code == 200


def test_with_keys_the_key_decides_whatever_the_host(tmp_path: Path) -> None:
    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        _, token = keystore.create_key(store)
        forged = {"host": "evil.example", "origin": "https://evil.example"}
        assert httpx.get(f"{live.url}/v1/models", headers=forged).status_code == 401
        assert httpx.get(f"{live.url}/v1/models", headers={**forged, "x-api-key": token}).status_code == 200
        store.close()


# --- ambiguous credentials ----------------------------------------------------------------------------------


def test_the_key_header_given_twice_with_different_keys_is_401(tmp_path: Path) -> None:
    """Before: the first x-api-key counted and the second was ignored; a proxy or client that adds its own key
    header to a request that had one would charge whichever came first."""
    image = noise_b64(8)
    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        (first, one), (second, two) = (keystore.create_key(store, credits=5) for _ in range(2))
        for path, kw in (("/v1/credits", {}), (V1, {"json": {"image": image, "prompt": "x"}})):
            method = "POST" if kw else "GET"
            r = httpx.request(method, f"{live.url}{path}", headers=[("x-api-key", one), ("x-api-key", two)], **kw)
            assert r.status_code == 401 and "given 2 times with different keys" in r.json()["error"], r.text
        assert [keystore.balance(store, k.id) for k in (first, second)] == [5, 5]
        same = httpx.get(f"{live.url}/v1/credits", headers=[("x-api-key", one), ("x-api-key", one)])
        assert same.status_code == 200 and same.json() == {"key_id": first.id, "credits": 5}, same.text
        store.close()


# --- polling has a limit too --------------------------------------------------------------------------------


def test_polling_is_rate_limited_per_key_apart_from_submits(tmp_path: Path) -> None:
    """Before: only submits counted; one key could poll status, results, credits and models without end."""
    image = noise_b64(8)
    with live_server(tmp_path / "data", FakeBackend(), poll_rate_limit=4) as live:
        store = Store.in_data_dir(tmp_path / "data")
        _, token = keystore.create_key(store, rate_limit=2)
        _, other = keystore.create_key(store)
        job = httpx.post(f"{live.url}{V2}", json={"image": image, "prompt": "x"}, headers={"x-api-key": token})
        assert job.status_code == 200, job.text
        polls = [f"/v2/requests/{job.json()['request_id']}/status", f"/v2/requests/{job.json()['request_id']}"]
        polls += ["/v1/credits", "/v1/models"]
        for path in polls:  # 4 polls: the limit
            assert httpx.get(f"{live.url}{path}", headers={"x-api-key": token}).status_code == 200, path
        for path in polls:
            r = httpx.get(f"{live.url}{path}", headers={"x-api-key": token})
            assert r.status_code == 429 and "Rate limit of 4 polls per minute" in r.json()["error"], r.text
            assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-rate-limit-reset-at-utc"].endswith("Z")
        assert httpx.get(f"{live.url}/v1/credits", headers={"x-api-key": other}).status_code == 200  # per key
        again = httpx.post(f"{live.url}{V1}", json={"image": image, "prompt": "x"}, headers={"x-api-key": token})
        assert again.status_code == 200, again.text  # the polls took none of the key's 2 submits a minute
        store.close()


@pytest.mark.services
def test_polls_and_submits_are_counted_apart_across_the_fleet(redis_db: str) -> None:
    """The fleet's limiter (Redis) keeps the two counts apart too, and names the polling limit in its 429."""
    limiter = RedisRateLimiter(redis_db)

    async def run() -> None:
        try:
            await limiter.hit("k", 1)
            for _ in range(2):
                await limiter.hit("k:poll", 2, "polls")
            with pytest.raises(ApiError, match="Rate limit of 2 polls per minute") as polls:
                await limiter.hit("k:poll", 2, "polls")
            assert polls.value.status == 429 and "Retry-After" in polls.value.headers
            with pytest.raises(ApiError, match="Rate limit of 1 requests per minute"):
                await limiter.hit("k", 1)
        finally:
            await limiter.close()

    asyncio.run(run())
