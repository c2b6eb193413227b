"""Behind a proxy that serves the API under a path prefix (nginx `location /masks/ { proxy_pass http://automask/; }`,
which strips it) with `--public-url https://host/masks`: the docs page, its Swagger UI files, the OpenAPI document
and the v2 URLs all point under the prefix.

Before, `/docs` loaded `/openapi.json` and its Swagger UI files from the host's root, outside the prefix: the page
stayed blank behind such a proxy.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import FakeBackend, LiveServer, png_bytes, wait_for

PUBLIC = "https://masks.example.com/tools/masks"


class Proxied:
    """The service run as `automask serve` runs it, asked as its proxy asks (the prefix stripped), with a key."""

    def __init__(self, live: LiveServer, token: str) -> None:
        self.live, self.headers = live, {"x-api-key": token}

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.live.url + path, headers=self.headers, timeout=30)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.live.url + path, json=body, headers=self.headers, timeout=30)


@pytest.fixture(params=[PUBLIC, PUBLIC + "/"])
def proxied(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Proxied]:
    settings = Settings(data_dir=tmp_path / "data")
    server = ServerSettings(public_url=request.param)
    with LiveServer(create_app(settings, server, MaskGenerator(FakeBackend(), settings)), server) as live:
        store = Store.in_data_dir(tmp_path / "data")
        token = keystore.create_key(store)[1]
        store.close()
        yield Proxied(live, token)


def test_the_docs_load_everything_from_under_the_prefix(proxied: Proxied) -> None:
    page = proxied.get("/docs")
    assert page.status_code == 200, page.text
    assert "url: '/tools/masks/openapi.json'" in page.text, page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f'"/tools/masks/docs/assets/{asset}"' in page.text
        assert proxied.get(f"/docs/assets/{asset}").status_code == 200  # what the proxy asks for, prefix stripped
    schema = proxied.get("/openapi.json").json()
    assert schema["servers"] == [{"url": "/tools/masks"}]  # Swagger UI's "Try it out" goes through the proxy too
    assert "/v1/automatic-mask-generator" in schema["paths"]
    missing = proxied.get("/v3/nothing")
    assert missing.status_code == 404 and "/tools/masks/docs" in missing.json()["error"]


def test_a_404_names_the_path_the_client_sent(proxied: Proxied) -> None:
    """Before, a client asking the server directly under the prefix read "No endpoint GET /tools/masks/tools/masks/x":
    the prefix twice, a path nobody sent."""
    through_the_proxy = proxied.get("/v3/nothing").json()["error"]  # the proxy stripped /tools/masks
    assert through_the_proxy.startswith("No endpoint GET /tools/masks/v3/nothing. "), through_the_proxy
    direct = proxied.get("/tools/masks/x").json()["error"]
    assert direct.startswith(
        "No endpoint GET /tools/masks/x (this server is set up, by --public-url, for a proxy "
        "that strips /tools/masks). "
    ), direct
    assert "/tools/masks/tools/masks" not in direct


def test_asked_directly_the_page_works_or_names_its_public_url(proxied: Proxied) -> None:
    """The operator opening the server itself (no proxy in front): at `/` the page's files, rendered under the
    prefix, are served there too; at the prefix a browser reads where to go, an API client the JSON 404.

    Before, the page at `/` loaded nothing (its files under the prefix were a 404) and the prefix was JSON."""
    assert 'src="/tools/masks/static/app.js"' in proxied.get("/").text
    for asset in ("/tools/masks/static/app.js", "/tools/masks/static/examples/astronaut.jpg"):
        found = proxied.get(asset)
        assert found.status_code == 200 and found.content == proxied.get(asset.removeprefix("/tools/masks")).content
    html = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for path in ("/tools/masks", "/tools/masks/"):
        told = httpx.get(proxied.live.url + path, headers=html, timeout=30)
        assert told.status_code == 404 and told.headers["content-type"].startswith("text/html"), told.text
        assert f'<a href="{PUBLIC}/">{PUBLIC}/</a>' in told.text and "strips <code>/tools/masks</code>" in told.text
        assert "default-src 'self'" in told.headers["content-security-policy"]
        assert "No endpoint GET /tools/masks" in proxied.get(path).json()["error"]  # not a browser: JSON
    assert proxied.get("/tools/masks/static/nope.js").status_code == 404
    # the docs at /docs load these: their files, and the OpenAPI document, whose API is at this server's root
    assert (
        proxied.get("/tools/masks/docs/assets/swagger-ui.css").content
        == proxied.get("/docs/assets/swagger-ui.css").content
    )
    schema = proxied.get("/tools/masks/openapi.json").json()
    assert "servers" not in schema and "/v1/automatic-mask-generator" in schema["paths"]


def test_the_api_and_its_v2_urls_work_under_the_prefix(proxied: Proxied) -> None:
    body = {"image": base64.b64encode(png_bytes(np.zeros((4, 6, 3), np.uint8))).decode(), "prompt": "x"}
    assert proxied.post("/v1/automatic-mask-generator", body).headers["content-type"] == "image/png"
    job = proxied.post("/v2/automatic-mask-generator", body).json()
    assert job["status_url"] == f"{PUBLIC}/v2/requests/{job['request_id']}/status"
    wait_for(lambda: proxied.get(f"/v2/requests/{job['request_id']}/status").json()["status"] == "COMPLETED", 30)
    output = proxied.get(f"/v2/requests/{job['request_id']}").json()["output"]
    assert output == f"{PUBLIC}/v2/requests/{job['request_id']}/output"
    assert proxied.get(output.removeprefix(PUBLIC)).headers["content-type"] == "image/png"
    page = proxied.get("/")  # its files from under the prefix, at /tools/masks as at /tools/masks/
    assert page.status_code == 200 and 'src="/tools/masks/static/app.js"' in page.text, page.text
    assert (
        'href="/tools/masks/static/style.css"' in page.text
        and "base-uri 'none'" in page.headers["content-security-policy"]
    )


def test_without_a_prefix_the_docs_stay_at_the_root(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    server = ServerSettings(public_url="https://masks.example.com")
    with LiveServer(create_app(settings, server, MaskGenerator(FakeBackend(), settings)), server) as live:
        assert "url: '/openapi.json'" in httpx.get(f"{live.url}/docs").text
        assert "servers" not in httpx.get(f"{live.url}/openapi.json").json()


def test_the_docs_answers_carry_a_request_id(proxied: Proxied) -> None:
    """Before: the docs pages, their files and the OpenAPI document asked directly were answered by the edge
    middleware, outside the one that gives every answer an `x-request-id` (and logs it): none carried one. Now every
    answer does, and they keep their edge headers."""
    paths = ["/docs", "/redoc", "/openapi.json", "/tools/masks/openapi.json", "/docs/assets/swagger-ui.css"]
    paths += ["/docs/assets/redoc.standalone.js", "/docs/assets/nothing.js", "/v1/models"]
    for path in paths:
        r = httpx.get(proxied.live.url + path, headers={**proxied.headers, "x-request-id": "docs-1"}, timeout=30)
        assert r.status_code in (200, 404) and r.headers.get("x-request-id") == "docs-1", (path, r.status_code)
        assert r.headers["x-content-type-options"] == "nosniff" and "cache-control" in r.headers, path
