"""The HTTP service under attack: its own OpenAPI schema run through schemathesis, then hostile requests that no
schema describes. Every answer must be a documented status; every error a JSON {"error": "..."} (never a 5xx
or a traceback), and the server must still answer a normal request afterwards.

A real uvicorn server on 127.0.0.1 with a fake, fast backend; bounded (a fixed number of examples per
operation, a fixed seed: every run sends the same requests).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from skimage import data as skimage_data

from automask import MaskGenerator, Settings
from automask.options import parse_prompt
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.schemas import MAX_JSON_VALUES, MAX_PROMPT_CHARS, MAX_PROMPT_TARGETS
from automask.server.store import Store
from server_helpers import FakeBackend, LiveServer, live_server, png_bytes, wait_for

SLUG = "automatic-mask-generator"
MAX_EXAMPLES = 25
SEED = 20240611


class Served:
    """A live server on its data folder, a valid key's headers, and a small valid image as base64."""

    def __init__(self, live: LiveServer, data_dir: Path) -> None:
        _, token = keystore.create_key(Store.in_data_dir(data_dir))
        self.live = live
        self.url = live.url
        self.data_dir = data_dir
        self.headers = {"x-api-key": token}
        self.image_b64 = base64.b64encode(png_bytes(np.full((6, 8, 3), 128, np.uint8))).decode()

    def post(self, version: str = "v1", **kw: Any) -> httpx.Response:
        kw["headers"] = {**self.headers, **kw.get("headers", {})}
        return httpx.post(f"{self.url}/{version}/{SLUG}", timeout=30, **kw)


def serve(data_dir: Path, **server: Any) -> LiveServer:
    """A server (not started) with the fake backend, `ServerSettings(**server)`, data in `data_dir`."""
    return live_server(data_dir, FakeBackend(), **server)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Served]:
    # no failed-authentication limit: schemathesis sends many keyless requests per operation, and 429 after the 60th
    # would depend on how fast this machine runs them (the limit has tests of its own)
    with serve(tmp_path / "data", auth_fail_limit=None) as live:
        yield Served(live, tmp_path / "data")


# -- schemathesis: the server's own OpenAPI description ---------------------------------------------------


CHECKS: dict[str, Any] = {
    # A schema-valid request may still be refused for what no schema can say: its image does not decode (400),
    # it names a model this server lacks (404), its stop_on_empty_mask finds nothing (422).
    "positive_data_acceptance": {"expected-statuses": ["2xx", 400, 404, 422]},
    # Another method on a known path is "an unknown endpoint", a 404: CONTRACT.md's codes have no 405.
    "unsupported_method": {"enabled": False},
}
"""Every other built-in check runs: no 5xx, status codes / content types / headers / bodies as documented,
schema-violating data rejected, requests without a valid `x-api-key` refused (401)."""


def served_spec() -> dict[str, Any]:
    """The OpenAPI description `create_app` serves at /openapi.json (built here so that schemathesis can make
    one test per operation when the module is collected; `test_live_server_serves_this_schema` ties the two)."""
    with tempfile.TemporaryDirectory() as folder:
        s = Settings(data_dir=Path(folder))
        app = create_app(s, ServerSettings(), MaskGenerator(FakeBackend(), s))
        spec = app.openapi()
        app.state.automask.dispatcher.runner.close()
        app.state.automask.store.close()
    return spec


SPEC = served_spec()
schema = schemathesis.openapi.from_dict(
    SPEC,
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "mode": "all", "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "checks": CHECKS,
        }
    ),
)


def test_live_server_serves_this_schema(served: Served) -> None:
    """The fuzzed description is the served one, and it declares the `x-api-key` scheme on every endpoint that
    wants a key (so schemathesis also checks that a request without one is refused)."""
    assert httpx.get(f"{served.url}/openapi.json", timeout=10).json() == SPEC
    (scheme_name, scheme), *others = SPEC["components"]["securitySchemes"].items()
    assert not others and (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "x-api-key")
    keyed = {f"{m.upper()} {p}" for p, ops in SPEC["paths"].items() for m, op in ops.items() if op.get("security")}
    assert keyed == {
        f"POST /v1/{SLUG}",
        f"POST /v2/{SLUG}",
        "GET /v2/requests/{request_id}/status",
        "GET /v2/requests/{request_id}",
        "GET /v2/requests/{request_id}/output",
        "POST /v2/requests/{request_id}/cancel",
        "GET /v1/models",
        "GET /v1/credits",
    }
    assert SPEC["paths"][f"/v1/{SLUG}"]["post"]["security"] == [{scheme_name: []}]


def error_is_json(ctx: Any, response: Any, case: Any) -> None:
    """Every non-2xx answer is JSON {"error": "<a sentence>"}, with no traceback in it."""
    if response.status_code < 300:
        return None
    content_type = response.headers.get("content-type", [""])[0]  # schemathesis: lowercase names, list values
    assert content_type.startswith("application/json"), (response.status_code, content_type)
    body = json.loads(response.content)
    assert isinstance(body.get("error"), str) and body["error"].strip(), body
    assert "Traceback" not in body["error"] and 'File "' not in body["error"], body
    return None


@pytest.fixture()
def fuzzed(served: Served) -> Iterator[Served]:
    """`served`, checked to still answer a normal request once an operation's fuzzing is over."""
    yield served
    assert_still_serves(served)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),  # one server per operation, shared by its examples: on purpose
)
def test_openapi_schema_holds(case: Any, fuzzed: Served) -> None:
    """One test per operation of /openapi.json: its examples, boundary values (schemathesis' coverage phase),
    then MAX_EXAMPLES generated requests, valid and invalid, each sent with a valid key."""
    case.call_and_validate(base_url=fuzzed.url, headers=fuzzed.headers, additional_checks=[error_is_json], timeout=30)


# -- hostile requests no schema describes -----------------------------------------------------------------


def assert_error(r: httpx.Response, status: int, *words: str) -> str:
    """`r` is a JSON {"error": ...} with `status`, whose message holds every one of `words`; returns it."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert isinstance(error, str) and all(w in error for w in words), error
    assert "Traceback" not in error and len(error) < 500, error
    return error


def assert_still_serves(served: Served) -> None:
    """A normal v1 request still gets its mask."""
    r = served.post(json={"image": served.image_b64, "prompt": "sofa", "threshold": 0.5, "grow_mask": 0})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), r.text[:300]


def raw_http(served: Served, method: str, path: str, headers: dict[str, bytes], body: bytes = b"") -> httpx.Response:
    """Send `path` and `headers` exactly as given (httpx would normalize '..' and refuse odd header bytes)."""
    port = int(served.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {**headers, "content-length": str(len(body)).encode()}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return httpx.Response(resp.status, headers=resp.getheaders(), content=resp.read())
    finally:
        conn.close()


def bytes_of(headers: dict[str, str]) -> dict[str, bytes]:
    """`headers` for `raw_http`."""
    return {k: v.encode() for k, v in headers.items()}


def png_file(served: Served) -> bytes:
    """The valid image's PNG bytes (for multipart uploads)."""
    return base64.b64decode(served.image_b64)


JSON = {"content-type": "application/json"}


def body_of(served: Served, raw: str, **fields: Any) -> bytes:
    """A JSON object text: a valid image and prompt, `fields`, then `raw` (members written by hand)."""
    members = json.dumps({"image": served.image_b64, "prompt": "sofa", **fields})[1:-1]
    return ("{" + members + (", " + raw if raw else "") + "}").encode()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"image": "x", "prompt": "\xff\xfe sofa"}', ["not valid JSON", "utf-8"]),  # not UTF-8
        (b"[]", ["must be a JSON object"]),
        (b'["image", "prompt"]', ["must be a JSON object"]),
        (b"42", ["must be a JSON object"]),
        (b"null", ["must be a JSON object"]),
        (b'"sofa"', ["must be a JSON object"]),
        (b"", ["is empty", "JSON object"]),
        (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, ["nested too deeply"]),
        (b'{"image": "x", "prompt": "sofa", "seed": ' + b"9" * 5000 + b"}", ["too many digits"]),
    ],
    ids=[
        "not-utf8",
        "array",
        "array-of-names",
        "number",
        "null",
        "string",
        "empty",
        "deep-array",
        "deep-object",
        "5000-digits",
    ],
)
def test_bodies_that_are_not_a_json_object_are_400(served: Served, content: bytes, words: list[str]) -> None:
    assert_error(served.post(content=content, headers=JSON), 400, "body: ", *words)
    assert_still_serves(served)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('"threshold": 1e309', "threshold"),  # inf once parsed
        ('"threshold": NaN', "threshold"),
        ('"threshold": Infinity', "threshold"),
        ('"threshold": -Infinity', "threshold"),
        ('"text_threshold": NaN', "text_threshold"),
        ('"grow_mask": 1000000000000000000000000000000', "grow_mask"),
        ('"grow_mask": 1e30', "grow_mask"),
        ('"grow_mask": NaN', "grow_mask"),
        ('"grow_mask": Infinity', "grow_mask"),
        ('"seed": 1e400', "seed"),
        ('"seed": -Infinity', "seed"),
        ('"seed": 123456789012345678901234567890', "seed"),
    ],
)
def test_huge_and_non_finite_numbers_are_400_naming_the_field(served: Served, raw: str, field: str) -> None:
    for version in ("v1", "v2"):
        assert_error(served.post(version, content=body_of(served, raw), headers=JSON), 400, f"{field}: ")
    assert_still_serves(served)


@pytest.mark.parametrize(
    ("member", "count", "phrase"),
    [
        (b"{}", 2_000_000, f"holds more than {MAX_JSON_VALUES} values"),
        (b"[]", 2_000_000, f"holds more than {MAX_JSON_VALUES} values"),
        (b"0.5", 2_000_000, f"holds more than {MAX_JSON_VALUES} values"),
        (b'""', 2_000_000, f"holds more than {MAX_JSON_VALUES} values"),
        (b'"k%d": 0', 2_000_000, f"holds more than {MAX_JSON_VALUES} values"),
        (b"[" * 900 + b"]" * 900, 10_000, "nested too deeply"),  # few commas: 9 million lists
    ],
    ids=["empty-objects", "empty-arrays", "floats", "empty-strings", "unknown-fields", "deep-arrays"],
)
def test_a_body_of_millions_of_tiny_values_is_refused_before_it_is_parsed(
    served: Served, member: bytes, count: int, phrase: str
) -> None:
    """Each value of `[{},{},...]` costs 3 bytes of body and ~60 of memory once parsed (40 MB in: 2 GB); a million
    unknown fields take pydantic seconds to list. A request is one flat object: refused from its commas and
    brackets (at most `MAX_JSON_VALUES` values), unparsed."""
    fields = b"%d" in member  # one more member of the object each, not of an array
    values = b",".join(member % i if fields else member for i in range(count))
    content = b'{"image": "x", "prompt": "sofa", ' + values + b"}" if fields else b'{"image": [' + values + b"]}"
    tracemalloc.start()
    try:
        response = served.post(content=content, headers=JSON)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_error(response, 400, "body: ", phrase, "one flat JSON object")
    assert peak < 4 * len(content)  # the body in the client and in the server, no objects parsed from it
    assert_still_serves(served)


def test_commas_and_brackets_in_the_text_fields_are_not_held_against_a_request(served: Served) -> None:
    """The prompts may be nothing but commas and brackets: a valid request stays under `MAX_JSON_VALUES`."""
    marks = ",[{" * ((MAX_PROMPT_CHARS - len("sofa")) // 3)
    fields = {"image": served.image_b64, "prompt": marks + "sofa", "negative_prompt": marks + "lamp"}
    assert served.post(json=fields).status_code == 200


def test_a_10_mb_prompt_and_too_many_targets_are_400(served: Served) -> None:
    error = assert_error(served.post(json={"image": served.image_b64, "prompt": "a" * 10_000_000}), 400, "prompt: ")
    assert str(MAX_PROMPT_CHARS) in error
    many = ", ".join(f"thing{i}" for i in range(MAX_PROMPT_TARGETS + 1))
    for version in ("v1", "v2"):
        error = assert_error(served.post(version, json={"image": served.image_b64, "prompt": many}), 400, "prompt: ")
        assert f"names {MAX_PROMPT_TARGETS + 1} targets" in error
    exactly = ", ".join(f"thing{i}" for i in range(MAX_PROMPT_TARGETS))
    assert served.post(json={"image": served.image_b64, "prompt": exactly}).status_code == 200
    assert_still_serves(served)


def test_a_body_over_the_limit_is_413_however_it_is_sent(tmp_path: Path) -> None:
    """A small limit: a 10 MB prompt is 413 by Content-Length, and by a chunked stream with no length."""
    with serve(tmp_path / "data", max_body_bytes=1 << 20) as live:
        served = Served(live, tmp_path / "data")
        big = {"image": served.image_b64, "prompt": "a" * 10_000_000}
        assert_error(served.post(json=big), 413, "over the limit")
        data = json.dumps(big).encode()
        chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))  # no Content-Length: sent chunked
        assert_error(served.post(content=chunks, headers=JSON), 413, "over the limit")
        assert_still_serves(served)


def test_multipart_two_images_or_an_empty_one_is_400(served: Served) -> None:
    png = png_file(served)
    two = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
    assert_error(served.post(data={"prompt": "sofa"}, files=two), 400, "image: ", "more than once")
    file_and_field = {"image": ("a.png", png, "image/png")}
    error = assert_error(served.post(data={"prompt": "sofa", "image": "x"}, files=file_and_field), 400, "image: ")
    assert "more than once" in error
    two_prompts = {"prompt": ["sofa", "lamp"]}
    assert_error(served.post(data=two_prompts, files=file_and_field), 400, "prompt: ", "more than once")
    for version in ("v1", "v2"):
        empty = {"image": ("a.png", b"", "image/png")}
        assert_error(served.post(version, data={"prompt": "sofa"}, files=empty), 400, "image: ", "empty")
    assert_still_serves(served)


def test_a_content_type_lying_about_the_body_is_400(served: Served) -> None:
    as_json = json.dumps({"image": served.image_b64, "prompt": "sofa"}).encode()
    form = b'--zz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nsofa\r\n--zz--\r\n'
    cases = [
        ("multipart/form-data", as_json, ["body: ", "not a valid form"]),  # and no boundary
        ("multipart/form-data; boundary=zz", as_json, ["body: ", "not a valid form"]),
        ("application/json", form, ["body: ", "not valid JSON"]),
        ("application/x-www-form-urlencoded", png_file(served), ["body: ", "image file's own bytes", "JSON object"]),
        ("image/png", png_file(served), ["body: ", "image file's own bytes", "multipart form"]),
        ("text/plain", b"image=x&prompt=sofa", ["body: ", "not valid JSON"]),
    ]
    for content_type, content, words in cases:
        assert_error(served.post(content=content, headers={"content-type": content_type}), 400, *words)
    assert_still_serves(served)


def test_base64_sent_form_urlencoded_says_plus_became_spaces(served: Served) -> None:
    """A client that puts raw base64 in a form-urlencoded body unencoded sends its '+' as spaces. Before: "not
    valid base64", which did not say why."""
    image = base64.b64encode(png_bytes(skimage_data.coffee()[:100, :120])).decode()
    assert "+" in image
    body = f"image={image}&prompt=cup".encode()  # as `curl -d "image=$B64&prompt=cup"` sends it
    for version in ("v1", "v2"):
        r = served.post(version, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
        assert_error(r, 400, "became spaces (URL form encoding", "URL-encode")
    assert_still_serves(served)


@pytest.mark.parametrize(
    ("prompt", "answered"),
    [
        ("sofa\x00lamp", True),
        ("\x00", False),  # invisible: no target
        ("so\x1b[31mfa\x07", True),
        ("sofa\r\nX-Injected: 1", True),
        ("\u202esofa", True),
        ("ソファ, 🛋️", True),
        ("\u200bsofa\ufeff", True),  # invisible characters around a word: kept, the word is the target
        ("\ufeff\u200b", False),  # not whitespace to Python, but invisible: no target
        ("sofa, \u2060", True),
        (" \t\r\n\x0b\x0c", False),
        (" . , . ", False),
    ],
)
def test_control_characters_nul_and_unicode_in_the_prompt(served: Served, prompt: str, answered: bool) -> None:
    """Odd but valid text is a prompt like any other, in v1 and in a stored v2 job, and comes back intact in the
    metadata; text that names no target is a 400."""
    body = {"image": served.image_b64, "prompt": prompt, "threshold": 0.5, "grow_mask": 0}
    if not answered:
        assert_error(served.post(json=body), 400, "prompt: ", "at least one thing")
        return
    assert served.post(json=body).status_code == 200
    job = served.post("v2", json={**body, "base64": True}).json()
    finished = ("COMPLETED", "FAILED")
    wait_for(lambda: httpx.get(job["status_url"], headers=served.headers).json()["status"] in finished, 20)
    result = httpx.get(job["response_url"], headers=served.headers)
    assert result.status_code == 200 and result.json()["status"] == "COMPLETED", result.text
    assert result.json()["prompts"] == parse_prompt(prompt)  # NUL, escapes, RTL marks: stored and read back intact
    assert_still_serves(served)


@pytest.mark.parametrize("field", ["prompt", "image", "model"])
def test_an_unpaired_surrogate_is_400_not_a_lost_job(served: Served, field: str) -> None:
    """Before: "\\ud800" in a v2 prompt (valid JSON) could not be stored and answered 500."""
    raw = f'"{field}": "so\\ud800fa"'
    fields = {"image": served.image_b64, "prompt": "sofa"}
    members = json.dumps({k: v for k, v in fields.items() if k != field})[1:-1]
    content = ("{" + members + ", " + raw + "}").encode()
    for version in ("v1", "v2"):
        assert_error(served.post(version, content=content, headers=JSON), 400, f"{field}: ")
    assert_still_serves(served)


@pytest.mark.parametrize(
    "key",
    [
        b"am_abc_\x01\x02\x7f",
        "am_\u00e9t\u00e9_cl\u00e9".encode("latin-1"),
        b"\xff\xfe\xfd",
        b"am_" + b"x" * 8000,
        b"am__",
        b"_",
    ],
    ids=["control", "latin-1", "bytes-ff", "8-kB", "empty-parts", "underscore"],
)
def test_odd_api_keys_are_401(served: Served, key: bytes) -> None:
    for path in ("/v1/models", "/v2/requests/abc/status"):
        assert_error(raw_http(served, "GET", path, {"x-api-key": key}), 401, "API key")
    body = body_of(served, "")
    assert_error(raw_http(served, "POST", f"/v1/{SLUG}", {"x-api-key": key, **bytes_of(JSON)}, body), 401, "API key")
    assert_still_serves(served)


def test_what_is_not_http_is_refused_by_the_http_server(served: Served) -> None:
    """A NUL byte in a header, or a 1 MB request line, is not HTTP uvicorn reads: it refuses the request itself
    (a plain-text 400, or it closes the connection) before the app sees it, and serves the next one."""
    token = served.headers["x-api-key"].encode()
    r = raw_http(served, "GET", "/v1/models", {"x-api-key": token[:5] + b"\x00" + token[5:]})
    assert r.status_code == 400 and "Traceback" not in r.text
    try:
        r = raw_http(served, "GET", "/" + "a" * 1_000_000, {})
        assert r.status_code in (400, 404), r.status_code
    except (ConnectionError, http.client.HTTPException):
        pass  # the connection was dropped: refused too
    assert raw_http(served, "GET", "/v1/models", {"x-api-key": token}).status_code == 200
    assert_still_serves(served)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/requests/../../etc/passwd",
        "/v2/requests/../../etc/passwd/status",
        "/v2/requests/..%2F..%2Fetc%2Fpasswd",
        "/v2/requests/%2e%2e/%2e%2e/%2e%2e/etc/passwd/output",
        "/v2/requests/..%5C..%5Cetc%5Cpasswd/output",
        "/static/..%2F..%2F..%2Fpyproject.toml",
        "/static/%2e%2e",
        "/../../../../etc/passwd",
    ],
)
def test_path_traversal_is_404(served: Served, path: str) -> None:
    r = raw_http(served, "GET", path, bytes_of(served.headers))
    assert_error(r, 404)
    assert b"root:" not in r.content and b"[project]" not in r.content
    assert_still_serves(served)


def test_very_long_paths_and_request_ids_are_404_with_a_short_message(served: Served) -> None:
    for path in ("/" + "a" * 100_000, "/v2/requests/" + "b" * 12_000 + "/status", "/v2/requests/" + "c" * 12_000):
        r = raw_http(served, "GET", path, bytes_of(served.headers))
        assert_error(r, 404, "…")
    assert_still_serves(served)


def test_a_long_field_name_or_media_type_is_echoed_cut_short(served: Served) -> None:
    """Before: an unknown field's name, a field given twice and a data: URI's media type were echoed whole: a 200 kB
    name made a 200 kB error (40 MB at the body limit). Now each is cut to a short quote, as paths and ids are."""
    name, image = "n" * 200_000, served.image_b64
    fields = {"image": image, "prompt": "sofa"}
    twice = json.dumps(fields)[:-1] + f', "{name}": 1, "{name}": 2}}'
    for version in ("v1", "v2"):
        assert_error(served.post(version, json={**fields, name: 1}), 400, "unknown field", "…")
        assert_error(served.post(version, data={**fields, name: "1"}), 400, "unknown field", "…")
        kind = {"content-type": "application/json"}
        assert_error(served.post(version, content=twice.encode(), headers=kind), 400, "more than once", "…")
        assert_error(served.post(version, data={**fields, name: ["1", "2"]}), 400, "more than once", "…")
        media = {**fields, "image": f"data:text/{name};base64,{image}"}
        assert_error(served.post(version, json=media), 400, "not an image", "…")
    assert_still_serves(served)


def test_an_expired_result_file_is_404_not_500(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the sweeper deleting a result between the row lookup and the read made /output a 500."""
    jobs = served.live.app.state.automask.jobs
    read_row = jobs.get

    def get_then_expire(job_id: str) -> Any:  # the sweeper strikes right after the row was read
        row = read_row(job_id)
        jobs.expire(ttl=-1)
        return row

    for as_base64 in (False, True):
        job = served.post("v2", json={"image": served.image_b64, "prompt": "sofa", "base64": as_base64}).json()
        wait_for(lambda j=job: httpx.get(j["status_url"], headers=served.headers).json()["status"] == "COMPLETED", 20)
        monkeypatch.setattr(jobs, "get", get_then_expire)
        url = job["response_url"] + ("" if as_base64 else "/output")
        assert_error(httpx.get(url, headers=served.headers), 404, "expired", job["request_id"])
        monkeypatch.setattr(jobs, "get", read_row)
    assert_still_serves(served)


def test_a_client_leaving_mid_body_is_not_a_server_error(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the body read's ClientDisconnect was logged as an unexpected error and counted as a 500."""
    caplog.set_level(logging.INFO, logger="automask.server")
    port = int(served.url.rsplit(":", 1)[1])
    head = f"POST /v1/{SLUG} HTTP/1.1\r\nHost: x\r\nx-api-key: {served.headers['x-api-key']}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((head + "content-type: application/json\r\ncontent-length: 1000\r\n\r\n").encode() + b'{"ima')

    def access_line() -> dict[str, Any] | None:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "automask.server.access"]
        return next((line for line in lines if line["method"] == "POST"), None)

    assert wait_for(access_line, 10)["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_still_serves(served)
