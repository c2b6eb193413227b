"""The OpenAPI description documents only the error bodies the service sends: `{"error": "..."}` (`ErrorResponse`),
and a FAILED job's status body (`StatusResponse`) for the v2 job endpoints' 422.

Before, `POST /v2/requests/{request_id}/cancel` documented FastAPI's default 422 "Validation Error" with the body
`{"detail": [{"loc", "msg", "type"}]}` (`HTTPValidationError`), which the service never sends (a bad parameter is a
400 `{"error": ...}`), so a client generated from /openapi.json expected a body no answer has.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from automask.pipeline import MaskGenerator
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.settings import Settings
from server_helpers import FakeBackend

JOB_PATHS = ("/v2/requests/{request_id}/status", "/v2/requests/{request_id}", "/v2/requests/{request_id}/output")


@pytest.fixture()
def spec(tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))
    with TestClient(app) as client:
        answer = client.get("/openapi.json")
        assert answer.status_code == 200
        yield answer.json()


def error_schemas(spec: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(path, method, status, the $ref of its JSON schema) of every documented error answer."""
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    ref = answer.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
                    yield path, method, status, ref.rsplit("/", 1)[-1]


def test_every_documented_error_is_a_body_the_service_sends(spec: dict[str, Any]) -> None:
    documented = list(error_schemas(spec))
    assert len(documented) > 20
    odd = [
        (path, method, status, schema)
        for path, method, status, schema in documented
        if schema != "ErrorResponse" and not (status == "422" and path in JOB_PATHS and schema == "StatusResponse")
    ]
    assert odd == []
    assert {"HTTPValidationError", "ValidationError"}.isdisjoint(spec["components"]["schemas"])


def test_cancel_documents_the_errors_it_answers(spec: dict[str, Any]) -> None:
    responses = spec["paths"]["/v2/requests/{request_id}/cancel"]["post"]["responses"]
    assert set(responses) == {"200", "401", "403", "404", "429", "500", "503"}


def test_every_keyed_endpoint_documents_the_503_it_answers(tmp_path: Path) -> None:
    """Before: the v2 job endpoints, cancel, /v1/credits and /v1/models documented no 503, though each asks for the
    caller's key first, which is a 503 when the node no longer serves its database (and when the database or Redis
    does not answer). Each such endpoint is called on a node in that state: it answers 503 and documents it."""
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))
    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
        app.state.automask.guard.refusal = "This server no longer serves requests: its database was switched."
        keyed = [
            (path, method, operation)
            for path, operations in spec["paths"].items()
            for method, operation in operations.items()
            if operation.get("security")
        ]
        assert len(keyed) >= 8
        for path, method, operation in keyed:
            answer = client.request(method, path.replace("{request_id}", "0" * 32), headers={"x-api-key": "am_x_y"})
            assert answer.status_code == 503 and "no longer serves" in answer.json()["error"], (path, answer.text)
            assert "503" in operation["responses"], (path, method)
            assert "Retry-After" in operation["responses"]["503"].get("headers", {}), (path, method)
