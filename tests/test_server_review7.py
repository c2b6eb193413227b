"""Review 7: what a client hits at the edges of the v1 and v2 endpoints, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from automask.pipeline import MaskGenerator
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import FakeBackend


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
