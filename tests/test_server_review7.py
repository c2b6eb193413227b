"""Review 7: what a client hits at the edges of the v1 and v2 endpoints, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TestClient, Store, str]]:
    """(a client of the service on each kind of database, its store, a key's token)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_db")
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    app = create_app(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))
    store = Store.from_settings(settings, create=True)
    _, token = keystore.create_key(store, credits=5)
    with TestClient(app) as client:
        yield client, store, token
    store.close()


@pytest.mark.parametrize("path", ["/v2/requests/{id}/status", "/v2/requests/{id}", "/v2/requests/{id}/output"])
def test_a_request_id_holding_a_nul_is_unknown_not_a_database_outage(
    served: tuple[TestClient, Store, str], path: str
) -> None:
    """PostgreSQL text cannot hold NUL: looking such an id up failed in the database, and the client was told 503
    "the database is busy or unreachable" with a Retry-After, to retry for ever. No job has such an id: 404."""
    client, _, token = served
    for request_id in ("%00", "a%00b"):
        answer = client.get(path.format(id=request_id), headers={"x-api-key": token})
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"].startswith("No request 'a\\x00b'" if "a" in request_id else "No request '\\x00'")
    cancel = client.post("/v2/requests/a%00b/cancel", headers={"x-api-key": token})
    assert cancel.status_code == 404, cancel.text


def test_health_checks_answer_head_as_get(tmp_path: Path) -> None:
    """HAProxy (`option httpchk HEAD /healthz`) and many monitors probe with HEAD, which HTTP requires of every GET
    resource; before, both answered 404 "No endpoint HEAD /healthz", and the node was taken for down."""
    import httpx

    from server_helpers import live_server, wait_ready

    with live_server(tmp_path / "data", FakeBackend()) as live:
        wait_ready(live.url)
        for path in ("/healthz", "/readyz"):
            get, head = httpx.get(live.url + path), httpx.head(live.url + path)
            assert head.status_code == get.status_code == 200, head.text
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
            assert head.headers["content-length"] == str(len(get.content))


def test_the_v2_urls_and_the_key_endpoints_answer_head_as_get(tmp_path: Path) -> None:
    """Before: HEAD on a job's status_url, response_url or output URL (a download manager's or `curl -I`'s check that
    the result is there), or on /v1/credits and /v1/models, was 404 "No endpoint HEAD ...", as if the result were
    gone. Now each answers as GET does, without the body; another key's job is 404 as with GET."""
    import httpx

    from server_helpers import live_server, wait_for

    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        headers = {"x-api-key": keystore.create_key(store)[1]}
        image = base64.b64encode(png_bytes(np.full((6, 8, 3), 128, np.uint8))).decode()
        job = httpx.post(
            f"{live.url}/v2/automatic-mask-generator", json={"image": image, "prompt": "x"}, headers=headers
        )
        status_url, response_url = job.json()["status_url"], job.json()["response_url"]
        wait_for(lambda: httpx.get(status_url, headers=headers).json()["status"] == "COMPLETED", 20)
        for url in (
            status_url,
            response_url,
            response_url + "/output",
            live.url + "/v1/credits",
            live.url + "/v1/models",
        ):
            get, head = httpx.get(url, headers=headers), httpx.head(url, headers=headers)
            assert head.status_code == get.status_code == 200, (url, head.status_code)
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
            assert head.headers["content-length"] == str(len(get.content))
        other = {"x-api-key": keystore.create_key(store)[1]}
        assert (
            httpx.head(status_url, headers=other).status_code == httpx.get(status_url, headers=other).status_code == 404
        )
        assert httpx.head(status_url).status_code == 401
        store.close()


def test_the_inference_time_limit_is_at_most_a_day_and_v2_jobs_run_under_the_longest(tmp_path: Path) -> None:
    """Before: `serve --timeout inf` (or 1e10: "no limit") was taken; v1 answered, but every v2 job ended FAILED
    "Unexpected server error" (OverflowError: a thread cannot wait that long), and the fleet's hand-off TTLs overflow
    too. Now a usage error naming the largest; the largest runs v2 jobs."""
    from click.testing import CliRunner
    from pydantic import ValidationError

    from automask.cli import main
    from server_helpers import wait_for

    for too_long in ("inf", "1e10", "86401"):
        with pytest.raises(ValidationError, match="less than or equal to 86400"):
            ServerSettings(timeout=too_long)
        result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "serve", "--timeout", too_long])
        assert result.exit_code == 2 and "timeout: Input should be less than or equal to 86400" in result.output
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings, ServerSettings(timeout=86400), MaskGenerator(FakeBackend(), settings))
    store = Store.from_settings(settings)
    _, token = keystore.create_key(store, credits=1)
    with TestClient(app) as client:
        image = base64.b64encode(png_bytes(np.zeros((4, 6, 3), np.uint8))).decode()
        job = client.post(
            "/v2/automatic-mask-generator", json={"image": image, "prompt": "x"}, headers={"x-api-key": token}
        )
        status = job.json()["status_url"].removeprefix("http://testserver")

        def finished() -> dict[str, str] | None:
            body: dict[str, str] = client.get(status, headers={"x-api-key": token}).json()
            return body if body["status"] in ("COMPLETED", "FAILED") else None

        assert wait_for(finished, 30)["status"] == "COMPLETED"
    store.close()
