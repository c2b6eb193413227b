"""The HTTP service on a real loopback server, with a predictable fake backend: parameters, v1, v2, errors."""

from __future__ import annotations

import base64
import contextlib
import gzip
import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from automask import MaskGenerator, Settings
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.schemas import MaskRequest
from automask.server.store import Store
from loopback import serve_http
from server_helpers import FakeBackend, LiveServer, decode, loopback_socket, png_bytes, wait_for

SLUG = "automatic-mask-generator"
H, W = 30, 40


@pytest.fixture()
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture()
def image_b64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode()


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """serve(backend, no_model=, settings={...}, **server_settings) -> a running LiveServer with `.store`.

    The backend defaults to `FakeBackend()`; `no_model=True` starts with no generator and no model installed.
    """
    counter = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(backend: Any = None, no_model: bool = False, settings: dict[str, Any] | None = None, **kw: Any):
            data_dir = tmp_path / f"data{next(counter)}"
            s = Settings(data_dir=data_dir, **(settings or {}))
            gen = None if no_model else MaskGenerator(backend or FakeBackend(), s)
            live = stack.enter_context(LiveServer(create_app(s, ServerSettings(**kw), gen)))
            live.store = Store.in_data_dir(data_dir)
            live.data_dir = data_dir
            return live

        yield start


def new_key(live: Any, **kw: Any) -> tuple[str, dict[str, str]]:
    key, token = keystore.create_key(live.store, **kw)
    return key.id, {"x-api-key": token}


def post(live: Any, headers: dict[str, str], version: str = "v1", **kw: Any) -> httpx.Response:
    return httpx.post(f"{live.url}/{version}/{SLUG}", headers=headers, timeout=30, **kw)


# -- every parameter, JSON and multipart --------------------------------------------------------------


def selected_columns(mask: np.ndarray) -> list[int]:
    """Columns where every row is selected (the fake backend's masks are whole columns)."""
    assert mask.ndim == 2
    full = (mask == 255).all(axis=0)
    assert ((mask == 0).all(axis=0) | full).all(), "mask is not made of whole columns"
    return [int(x) for x in np.nonzero(full)[0]]


@pytest.mark.parametrize(
    ("options", "columns"),
    [
        ({"threshold": 0.5, "grow_mask": 0}, list(range(20, 40))),  # x/39 >= 0.5 <=> x >= 20
        ({"threshold": 0.5, "grow_mask": 3}, list(range(17, 40))),
        ({"threshold": 0.5, "grow_mask": 3, "invert_mask": True}, list(range(17))),
        ({"threshold": 0.9, "grow_mask": 0}, list(range(36, 40))),  # x >= 35.1
        ({"threshold": 0.5}, list(range(10, 40))),  # grow_mask defaults to 10
    ],
)
@pytest.mark.parametrize("form", [False, True])
def test_v1_mask_options_json_and_multipart(
    serve: Any, image: np.ndarray, image_b64: str, options: dict[str, Any], columns: list[int], form: bool
) -> None:
    live = serve()
    _, headers = new_key(live)
    if form:
        fields = {
            k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in {"prompt": "sofa", **options}.items()
        }
        r = post(live, headers, data=fields, files={"image": ("in.png", png_bytes(image), "image/png")})
    else:
        r = post(live, headers, json={"image": image_b64, "prompt": "sofa", **options})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    mask = decode(r.content)
    assert mask.shape == (H, W)
    assert selected_columns(mask) == columns


def test_v1_outputs_alpha_preview_prompts_seed_base64(serve: Any, image: np.ndarray, image_b64: str) -> None:
    live = serve()
    _, headers = new_key(live)
    base = {"image": image_b64, "prompt": "sofa", "threshold": 0.5, "grow_mask": 0}
    alpha = decode(post(live, headers, json={**base, "return_alpha": True, "return_mask": False}).content)
    assert alpha.shape == (H, W, 4)
    assert np.array_equal(alpha[..., :3], image)
    assert selected_columns(alpha[..., 3]) == list(range(20, 40))
    preview = decode(post(live, headers, json={**base, "return_mask": False}).content)
    assert preview.shape == (H, W, 3)
    assert np.array_equal(preview[:, :20], image[:, :20])  # untouched where nothing is selected
    assert not np.array_equal(preview[:, 20:], image[:, 20:])  # tinted where selected
    union = decode(post(live, headers, json={**base, "prompt": "left, sofa", "threshold": 0.9}).content)
    assert selected_columns(union) == [*range(4), *range(36, 40)]
    png = post(live, headers, json=base)
    assert float(png.headers["x-inference-time"]) > 0
    r = post(live, headers, json={**base, "base64": True, "seed": 468685})
    body = r.json()
    assert r.headers["content-type"] == "application/json"
    assert float(r.headers["x-inference-time"]) == body["inference_time"] == body["timings"]["total"] > 0
    assert selected_columns(decode(base64.b64decode(body["image"]))) == list(range(20, 40))
    assert (body["width"], body["height"], body["seed"], body["prompts"]) == (W, H, 468685, ["sofa"])
    assert body["selected_pixels"] == 20 * H


def test_v1_image_as_data_uri_and_url_refused_before_any_connection(serve: Any, image_b64: str) -> None:
    live = serve()
    _, headers = new_key(live)
    r = post(live, headers, json={"image": f"data:image/png;base64,{image_b64}", "prompt": "sofa", "grow_mask": 0})
    assert r.status_code == 200
    with contextlib.closing(loopback_socket()) as listener:
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for url in (f"http://127.0.0.1:{port}/cat.png", f"http://localhost:{port}/x.png", "file:///etc/hostname"):
            r = post(live, headers, json={"image": url, "prompt": "sofa"})
            assert r.status_code == 400, r.text
            assert set(r.json()) == {"error"}
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected


def test_v1_never_reads_a_server_side_file(serve: Any, image: np.ndarray, tmp_path: Path) -> None:
    live = serve()
    _, headers = new_key(live)
    path = tmp_path / "secret.png"
    path.write_bytes(png_bytes(image))
    for body in ({"json": {"image": str(path), "prompt": "sofa"}}, {"data": {"image": str(path), "prompt": "sofa"}}):
        r = post(live, headers, **body)
        assert r.status_code == 400
        assert "base64" in r.json()["error"] and "file" not in r.json()["error"]
    v2 = post(live, headers, "v2", json={"image": str(path), "prompt": "sofa"})  # refused at submit, as v1 does
    assert v2.status_code == 400 and v2.json() == r.json()


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"threshold": 2}, "threshold"),
        ({"threshold": "0.3"}, "threshold"),
        ({"grow_mask": 101}, "grow_mask"),
        ({"grow_mask": 2.5}, "grow_mask"),
        ({"seed": -2}, "seed"),
        ({"invert_mask": "yes"}, "invert_mask"),
        ({"base64": 3}, "base64"),
        ({"colour": "red"}, "colour"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"image": ""}, "image"),
        ({"image": 123}, "image"),  # a union field (str | bytes): named as sent, never image.str
        ({"image": None}, "image"),
        ({"image": ["a"]}, "image"),
        ({"negative_prompt": 3}, "negative_prompt"),
        ({"model": False}, "model"),
    ],
)
def test_v1_invalid_fields_are_400_naming_the_field(
    serve: Any, image_b64: str, body: dict[str, Any], field: str
) -> None:
    live = serve()
    _, headers = new_key(live)
    r = post(live, headers, json={"image": image_b64, "prompt": "sofa", **body})
    assert r.status_code == 400
    assert r.json()["error"].startswith(f"{field}: ") and set(r.json()) == {"error"}
    v2 = post(live, headers, "v2", json={"image": image_b64, "prompt": "sofa", **body})
    assert (v2.status_code, v2.json()) == (400, r.json())


def test_v1_wrong_image_type_names_image_and_what_it_takes(serve: Any) -> None:
    live = serve()
    _, headers = new_key(live)
    for value, kind in ((123, "a number"), (None, "null"), ({"url": "x"}, "an object"), (True, "a boolean")):
        r = post(live, headers, json={"image": value, "prompt": "sofa"})
        assert r.status_code == 400
        assert r.json() == {
            "error": "image: must be a string (an http(s) URL, base64 data or a data:image/...;base64, URI), "
            f"not {kind}"
        }


def test_v1_bad_bodies_and_images_are_400(serve: Any, image: np.ndarray) -> None:
    live = serve()
    _, headers = new_key(live)
    r = httpx.post(f"{live.url}/v1/{SLUG}", headers=headers, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"].startswith("body: is not valid JSON")
    assert post(live, headers, json=["image"]).status_code == 400
    r = post(live, headers, json={"prompt": "sofa"})
    assert (r.status_code, r.json()["error"]) == (400, "image: this field is required")
    r = post(live, headers, json={"image": base64.b64encode(b"not an image at all").decode(), "prompt": "sofa"})
    assert r.status_code == 400
    r = post(live, headers, data={"prompt": "sofa", "threshold": "abc"}, files={"image": ("a.png", png_bytes(image))})
    assert r.status_code == 400 and r.json()["error"].startswith("threshold: ")
    r = post(live, headers, data={"prompt": "sofa", "extra": "1"}, files={"image": ("a.png", png_bytes(image))})
    assert (r.status_code, r.json()["error"]) == (400, "extra: unknown field")


def test_a_compressed_body_is_a_400_that_says_so_and_costs_nothing(serve: Any, image_b64: str) -> None:
    """A gzip body (clients that compress what they send): before, "body: is not valid JSON ('utf-8' codec can't
    decode byte 0x8b ...)" for a body that was valid JSON, and a form parser's error for a multipart one."""
    live = serve()
    key_id, headers = new_key(live, credits=5)
    body = json.dumps({"image": image_b64, "prompt": "sofa"}).encode()
    expected = {
        "error": "body: is sent with Content-Encoding: gzip, which this API does not decode; send the request "
        "uncompressed"
    }
    for version in ("v1", "v2"):
        r = post(live, {**headers, "content-encoding": "gzip"}, version, content=gzip.compress(body))
        assert (r.status_code, r.json()) == (400, expected)
    r = post(live, {**headers, "content-encoding": "gzip"}, data={"prompt": "sofa"}, files={"image": ("a.png", b"x")})
    assert (r.status_code, r.json()) == (400, expected)
    # before: with the encodings in two headers, identity first, only the first was read ("is not valid JSON")
    twice = [*headers.items(), ("content-encoding", "identity"), ("content-encoding", "gzip")]
    r = httpx.post(f"{live.url}/v1/{SLUG}", headers=twice, content=gzip.compress(body), timeout=30)
    assert (r.status_code, r.json()) == (400, {"error": expected["error"].replace("gzip", "identity, gzip")})
    assert keystore.get_key(live.store, key_id).credits == 5
    r = post(live, {**headers, "content-encoding": "identity"}, content=body)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_a_json_field_given_twice_is_a_400_as_in_a_form(serve: Any, image_b64: str) -> None:
    """Before: json kept the last `prompt` silently (a form field given twice was already a 400)."""
    live = serve()
    key_id, headers = new_key(live, credits=5)
    body = f'{{"image": "{image_b64}", "prompt": "sofa", "prompt": "lamp"}}'.encode()
    for version in ("v1", "v2"):
        r = post(live, {**headers, "content-type": "application/json"}, version, content=body)
        assert (r.status_code, r.json()) == (400, {"error": "prompt: is given more than once"})
    r = post(live, headers, data={"prompt": ["sofa", "lamp"]}, files={"image": ("a.png", base64.b64decode(image_b64))})
    assert (r.status_code, r.json()) == (400, {"error": "prompt: is given more than once"})
    assert keystore.get_key(live.store, key_id).credits == 5


def test_an_uploaded_file_of_base64_text_says_what_to_send(serve: Any, image_b64: str) -> None:
    """Before: "give it as a string (str) to have it read", Python advice an HTTP client cannot follow."""
    live = serve()
    key_id, headers = new_key(live, credits=5)
    for version in ("v1", "v2"):
        r = post(live, headers, version, data={"prompt": "sofa"}, files={"image": ("a.txt", image_b64.encode())})
        assert r.status_code == 400
        assert r.json()["error"].startswith("The input is base64 text (or a data: URI), not an image's own bytes")
        assert "(str)" not in r.json()["error"] and "the 'image' field as text, not a file" in r.json()["error"]
    assert keystore.get_key(live.store, key_id).credits == 5


def test_auth_401_403_and_unknown_endpoint_404(serve: Any, image_b64: str) -> None:
    live = serve()
    key_id, headers = new_key(live)
    body = {"image": image_b64, "prompt": "sofa"}
    assert post(live, {}, json=body).status_code == 401
    assert post(live, {"x-api-key": "am_nope_nope"}, json=body).status_code == 401
    assert post(live, {"x-api-key": headers["x-api-key"][:-2] + "xx"}, json=body).status_code == 401
    assert post(live, headers, json=body).status_code == 200
    assert keystore.revoke_key(live.store, key_id)
    r = post(live, headers, json=body)
    assert r.status_code == 403 and key_id in r.json()["error"]
    for method, path in (("GET", "/v1/nowhere"), ("GET", f"/v1/{SLUG}"), ("DELETE", "/healthz")):
        r = httpx.request(method, live.url + path)
        assert r.status_code == 404 and "No endpoint" in r.json()["error"]
    # a trailing slash: a JSON 404 that says so, never a redirect to wherever the client's Host header points
    for method, path in (("POST", f"/v1/{SLUG}/"), ("GET", "/v2/requests/abc/status/"), ("GET", "/v1/models/")):
        r = httpx.request(method, live.url + path, headers={**headers, "host": "elsewhere.example"}, json=body)
        assert (r.status_code, r.json()) == (
            404,
            {"error": f"No endpoint {method} {path} (without the trailing slash?). The API is described at /docs."},
        )


def test_credits_charged_only_for_successes_406_when_spent(serve: Any, image_b64: str) -> None:
    live = serve()
    key_id, headers = new_key(live, credits=2)
    ok = {"image": image_b64, "prompt": "sofa"}
    assert post(live, headers, json={**ok, "prompt": "nothing", "stop_on_empty_mask": True}).status_code == 422
    assert post(live, headers, json={**ok, "threshold": 7}).status_code == 400
    assert keystore.get_key(live.store, key_id).credits == 2  # failures are free
    assert [post(live, headers, json=ok).status_code for _ in range(3)] == [200, 200, 406]
    assert "no credits" in post(live, headers, json=ok).json()["error"]
    assert keystore.get_key(live.store, key_id).credits == 0


def test_v1_remaining_credits_header_counts_down_only_on_success(serve: Any, image_b64: str) -> None:
    live = serve()
    key_id, headers = new_key(live, credits=3)
    ok = {"image": image_b64, "prompt": "sofa"}
    first = post(live, headers, json=ok)
    assert (first.status_code, first.headers["x-remaining-credits"]) == (200, "2")
    failures = [
        post(live, headers, json={**ok, "prompt": "nothing", "stop_on_empty_mask": True}),  # 422, after the hold
        post(live, headers, json={**ok, "threshold": 7}),  # 400, before it
    ]
    assert [r.status_code for r in failures] == [422, 400]
    assert all("x-remaining-credits" not in r.headers for r in failures)
    assert keystore.get_key(live.store, key_id).credits == 2  # the failures cost nothing
    second = post(live, headers, json={**ok, "base64": True})
    assert (second.status_code, second.headers["x-remaining-credits"]) == (200, "1")
    keystore.update_key(live.store, key_id, credits=10)  # an admin's top-up shows in the next answer
    assert post(live, headers, json=ok).headers["x-remaining-credits"] == "9"
    assert keystore.get_key(live.store, key_id).credits == 9
    _, unlimited = new_key(live)
    r = post(live, unlimited, json=ok)
    assert r.status_code == 200 and "x-remaining-credits" not in r.headers
    _, spent = new_key(live, credits=1)
    assert post(live, spent, json=ok).headers["x-remaining-credits"] == "0"
    r = post(live, spent, json=ok)
    assert r.status_code == 406 and "x-remaining-credits" not in r.headers


def test_v1_remaining_credits_header_absent_without_keys(serve: Any, image_b64: str) -> None:
    live = serve(auth=False)
    r = post(live, {}, json={"image": image_b64, "prompt": "sofa"})
    assert r.status_code == 200 and "x-remaining-credits" not in r.headers
    spec = httpx.get(f"{live.url}/openapi.json").json()
    header = spec["paths"][f"/v1/{SLUG}"]["post"]["responses"]["200"]["headers"]["x-remaining-credits"]
    assert header["schema"] == {"type": "integer", "minimum": 0} and not header["required"]
    assert "unlimited" in header["description"]


def test_credit_race_exactly_m_of_n_succeed(serve: Any, image_b64: str) -> None:
    live = serve(FakeBackend(delay=0.05), concurrency=2)
    key_id, headers = new_key(live, credits=5)
    body = {"image": image_b64, "prompt": "sofa"}
    barrier = threading.Barrier(12)

    def one(_: int) -> tuple[int, str | None]:
        barrier.wait(timeout=10)
        r = post(live, headers, json=body)
        return r.status_code, r.headers.get("x-remaining-credits")

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    assert sorted(code for code, _ in answers) == [200] * 5 + [406] * 7
    assert sorted(left for code, left in answers if code == 200) == ["0", "1", "2", "3", "4"]  # each its own
    assert keystore.get_key(live.store, key_id).credits == 0


def test_rate_limit_429_with_retry_headers(serve: Any, image_b64: str) -> None:
    live = serve()
    _, limited = new_key(live, rate_limit=2)
    _, other = new_key(live)
    body = {"image": image_b64, "prompt": "sofa"}
    assert [post(live, limited, json=body).status_code for _ in range(2)] == [200, 200]
    r = post(live, limited, json=body)
    assert r.status_code == 429 and "2 requests per minute" in r.json()["error"]
    retry_after = int(r.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    reset = datetime.fromisoformat(r.headers["x-rate-limit-reset-at-utc"].replace("Z", "+00:00"))
    assert 0 < (reset - datetime.now(timezone.utc)).total_seconds() <= 61
    assert post(live, other, json=body).status_code == 200  # per key
    assert post(live, limited, version="v2", json=body).status_code == 429  # v2 submissions count too


def test_413_body_over_limit_by_length_and_by_stream(serve: Any) -> None:
    live = serve(max_body_bytes=4096)
    _, headers = new_key(live)
    big = json.dumps({"image": "A" * 8000, "prompt": "sofa"}).encode()
    r = httpx.post(f"{live.url}/v1/{SLUG}", headers={**headers, "content-type": "application/json"}, content=big)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = httpx.post(f"{live.url}/v1/{SLUG}", headers=headers, content=chunks())
    assert r.status_code == 413
    flat = base64.b64encode(png_bytes(np.full((H, W, 3), 128, np.uint8))).decode()  # ~100 bytes
    small = post(live, headers, json={"image": flat, "prompt": "sofa"})
    assert small.status_code == 200  # a body under the limit still passes


def test_413_image_over_pixel_limit(serve: Any, image_b64: str) -> None:
    live = serve(settings={"max_image_pixels": H * W - 1})
    _, headers = new_key(live)
    r = post(live, headers, json={"image": image_b64, "prompt": "sofa"})
    assert r.status_code == 413, r.text


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log's lines captured so far, decoded."""
    return [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "automask.server.access"]


def test_500_hides_internals_and_logs_request_id(serve: Any, image_b64: str, caplog: pytest.LogCaptureFixture) -> None:
    live = serve(FakeBackend(fail=True))
    key_id, headers = new_key(live, credits=3)
    with caplog.at_level(logging.INFO, logger="automask.server"):
        r = post(live, headers, json={"image": image_b64, "prompt": "sofa"})
        request_id = r.headers["x-request-id"]
        # the access line is written once the response is sent: wait for it (bounded) while INFO is captured
        access = wait_for(lambda: [line for line in access_lines(caplog) if line["request_id"] == request_id], 5)
    assert r.status_code == 500
    assert request_id in r.json()["error"] and "secret" not in r.text and "Traceback" not in r.text
    assert any(request_id in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert {"status": 500, "key_id": key_id, "path": f"/v1/{SLUG}"}.items() <= access[-1].items()
    assert keystore.get_key(live.store, key_id).credits == 3


class _Failing(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"upstream broke")

    def log_message(self, *args: Any) -> None:
        pass


def test_502_and_504_from_the_image_url(serve: Any) -> None:
    live = serve(settings={"allow_private_urls": True, "fetch_timeout": 0.5})
    _, headers = new_key(live)
    with serve_http(_Failing) as upstream:
        r = post(live, headers, json={"image": f"{upstream}/a.png", "prompt": "sofa"})
        assert r.status_code == 502, r.text
    with contextlib.closing(loopback_socket()) as silent:  # accepts connections (backlog), never answers
        silent.listen(4)
        r = post(live, headers, json={"image": f"http://127.0.0.1:{silent.getsockname()[1]}/a.png", "prompt": "x"})
        assert r.status_code == 504, r.text


def test_504_inference_timeout_is_not_charged(serve: Any, image_b64: str) -> None:
    live = serve(FakeBackend(delay=1.0), timeout=0.2)
    key_id, headers = new_key(live, credits=1)
    r = post(live, headers, json={"image": image_b64, "prompt": "sofa"})
    assert r.status_code == 504 and "0.2 s" in r.json()["error"]
    assert keystore.get_key(live.store, key_id).credits == 1


def test_503_when_the_model_is_not_installed(serve: Any, image_b64: str) -> None:
    live = serve(no_model=True)  # no model named, none pulled
    _, headers = new_key(live)
    assert httpx.get(f"{live.url}/healthz").json() == {"status": "ok"}
    ready = wait_for(lambda: "still loading" not in (r := httpx.get(f"{live.url}/readyz")).text and r, 10)
    assert ready.status_code == 503 and "automask models pull" in ready.json()["error"]
    for version in ("v1", "v2"):
        r = post(live, headers, version, json={"image": image_b64, "prompt": "sofa"})
        assert r.status_code == 503 and "automask models pull" in r.json()["error"]


def test_request_id_health_and_openapi(serve: Any) -> None:
    live = serve()
    r = httpx.get(f"{live.url}/readyz", headers={"x-request-id": "abc-123"})
    assert r.json() == {"status": "ready", "model": "fake-gradient"}
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(f"{live.url}/healthz", headers={"x-request-id": "bad id!"}).headers["x-request-id"]) == 32
    spec = httpx.get(f"{live.url}/openapi.json").json()
    body = spec["paths"][f"/v1/{SLUG}"]["post"]["requestBody"]["content"]
    assert set(body["application/json"]["schema"]["properties"]) >= {"image", "prompt", "grow_mask", "base64", "seed"}
    assert {"/v2/requests/{request_id}/status", "/v2/requests/{request_id}", "/healthz"} <= set(spec["paths"])
    assert httpx.get(f"{live.url}/docs").status_code == 200


# -- v2 -----------------------------------------------------------------------------------------------


def poll(url: str, headers: dict[str, str], seconds: float = 20) -> httpx.Response:
    """GET a status URL until the job is COMPLETED or FAILED (bounded)."""
    return wait_for(
        lambda: (r := httpx.get(url, headers=headers)).json().get("status") in ("COMPLETED", "FAILED") and r, seconds
    )


def test_v2_submit_poll_response_output(serve: Any, image: np.ndarray, image_b64: str) -> None:
    live = serve()
    key_id, headers = new_key(live, credits=5)
    r = post(live, headers, "v2", json={"image": image_b64, "prompt": "sofa", "threshold": 0.5, "grow_mask": 0})
    assert r.status_code == 200, r.text
    sub = r.json()
    job = sub["request_id"]
    assert sub["status"] == "QUEUED"
    assert sub["status_url"] == sub["poll_url"] == f"{live.url}/v2/requests/{job}/status"
    assert sub["response_url"] == f"{live.url}/v2/requests/{job}"
    assert poll(sub["status_url"], headers).json() == {"request_id": job, "status": "COMPLETED"}
    res = httpx.get(sub["response_url"], headers=headers).json()
    assert res["status"] == "COMPLETED" and res["output"] == f"{live.url}/v2/requests/{job}/output"
    assert res["metrics"]["inference_time"] > 0 and res["width"] == W
    out = httpx.get(res["output"], headers=headers)
    assert out.headers["content-type"] == "image/png"
    assert selected_columns(decode(out.content)) == list(range(20, 40))
    assert keystore.get_key(live.store, key_id).credits == 4
    # multipart, base64 output
    r = post(
        live,
        headers,
        "v2",
        data={"prompt": "sofa", "base64": "true", "grow_mask": "0", "threshold": "0.5"},
        files={"image": ("in.png", png_bytes(image), "image/png")},
    )
    sub = r.json()
    poll(sub["status_url"], headers)
    res = httpx.get(sub["response_url"], headers=headers).json()
    assert selected_columns(decode(base64.b64decode(res["output"]))) == list(range(20, 40))


def test_v2_status_never_goes_back_from_processing_to_queued(serve: Any, image_b64: str) -> None:
    """CONTRACT: QUEUED -> PROCESSING -> COMPLETED | FAILED. A job put back in the queue after it started (here: its
    run handed it back, as when its model went missing or its server stopped) is still shown PROCESSING."""
    live = serve(republish_after=3600)  # a job stored without a hand-off stays put until the test hands it out
    key_id, headers = new_key(live, credits=2)
    state = live.app.state.automask
    request = MaskRequest.model_validate({"image": image_b64, "prompt": "sofa", "grow_mask": 0, "threshold": 0.5})
    job_id = state.jobs.submit(key_id, request, charge=True)
    status_url, response_url = (f"{live.url}/v2/requests/{job_id}{end}" for end in ("/status", ""))
    assert httpx.get(status_url, headers=headers).json() == {"request_id": job_id, "status": "QUEUED"}
    node = state.dispatcher.node
    assert state.jobs.claim(job_id, node) is not None
    assert httpx.get(status_url, headers=headers).json()["status"] == "PROCESSING"
    assert state.jobs.release(job_id, node) and state.jobs.get(job_id).status == "QUEUED"  # back in the queue
    assert httpx.get(status_url, headers=headers).json() == {"request_id": job_id, "status": "PROCESSING"}
    assert httpx.get(response_url, headers=headers).json()["status"] == "PROCESSING"
    out = httpx.get(f"{response_url}/output", headers=headers)
    assert out.status_code == 404 and "not ready yet (PROCESSING)" in out.json()["error"]
    state.dispatcher.publish(job_id, None).result(timeout=10)
    assert poll(status_url, headers).json() == {"request_id": job_id, "status": "COMPLETED"}
    assert selected_columns(decode(httpx.get(f"{response_url}/output", headers=headers).content)) == list(range(20, 40))
    assert keystore.get_key(live.store, key_id).credits == 1  # charged once


def test_v2_failed_job_is_422_and_free_other_keys_get_404(serve: Any, image_b64: str) -> None:
    live = serve()
    key_id, headers = new_key(live, credits=1)
    _, stranger = new_key(live)
    sub = post(live, headers, "v2", json={"image": image_b64, "prompt": "nothing", "stop_on_empty_mask": True}).json()
    r = poll(sub["status_url"], headers)
    assert r.status_code == 422
    assert r.json()["status"] == "FAILED" and "Nothing matching 'nothing'" in r.json()["error"]
    assert httpx.get(sub["response_url"], headers=headers).status_code == 422
    assert keystore.get_key(live.store, key_id).credits == 1  # refunded
    for url in (sub["status_url"], sub["response_url"], sub["response_url"] + "/output"):
        assert httpx.get(url, headers=stranger).status_code == 404
        assert httpx.get(url).status_code == 401
    assert httpx.get(f"{live.url}/v2/requests/unknown/status", headers=headers).status_code == 404
    bad = post(live, headers, "v2", json={"image": image_b64, "prompt": "sofa", "grow_mask": -1})
    assert bad.status_code == 400 and bad.json()["error"].startswith("grow_mask: ")


def test_v2_expired_results_are_cleaned_up(serve: Any, image_b64: str) -> None:
    live = serve()
    _, headers = new_key(live)
    sub = post(live, headers, "v2", json={"image": image_b64, "prompt": "sofa"}).json()
    poll(sub["status_url"], headers)
    jobs = live.app.state.automask.jobs
    png = jobs.result(sub["request_id"])
    assert png is not None and decode(png).shape == (30, 40)  # the result lives in the database
    assert not (live.data_dir / "results").exists()  # nothing on a node's disk
    assert jobs.expire(ttl=3600) == 0  # kept for the hour
    assert jobs.expire(ttl=-1) == 1
    assert jobs.result(sub["request_id"]) is None
    assert httpx.get(sub["status_url"], headers=headers).status_code == 404


def test_the_sweeper_deletes_expired_results_on_its_own(tmp_path: Path, image_b64: str) -> None:
    """The periodic sweep (not a direct `expire` call) removes a finished job after TTL + interval."""
    server = ServerSettings().model_copy(update={"result_ttl": 0.3, "cleanup_interval": 0.2})  # below the floor
    settings = Settings(data_dir=tmp_path)
    with LiveServer(create_app(settings, server, MaskGenerator(FakeBackend(), settings))) as live:
        live.store = Store.in_data_dir(tmp_path)
        _, headers = new_key(live)
        sub = post(live, headers, "v2", json={"image": image_b64, "prompt": "sofa"}).json()
        assert poll(sub["status_url"], headers, seconds=5).json()["status"] == "COMPLETED"
        jobs = live.app.state.automask.jobs
        assert jobs.result(sub["request_id"]) is not None
        wait_for(lambda: jobs.get(sub["request_id"]) is None, 5)
        for url in (sub["status_url"], sub["response_url"], sub["response_url"] + "/output"):
            r = httpx.get(url, headers=headers)
            assert r.status_code == 404 and "expired" in r.json()["error"]


def test_no_auth_mode_needs_loopback(serve: Any, image_b64: str) -> None:
    live = serve(auth=False)
    assert post(live, {}, json={"image": image_b64, "prompt": "sofa"}).status_code == 200
    with pytest.raises(ValueError, match="loopback"):
        ServerSettings(auth=False, host="0.0.0.0")
