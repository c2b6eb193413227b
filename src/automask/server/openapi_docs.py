"""The OpenAPI description of the endpoints' answers: what each error code means, the rate-limit headers, the
request body's schema and example. Documentation only: nothing here decides an answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from automask.server.schemas import ErrorResponse, MaskRequest, StatusResponse

_ERROR_TEXT = {
    400: "Invalid parameters, an undecodable image, or a refused image URL.",
    401: "Missing or unknown API key.",
    403: "The key is revoked; or, on a server without keys (--no-auth), the request is not from this machine.",
    404: "Unknown endpoint, model or request id.",
    406: "Insufficient credits.",
    413: "Request body or image over the limits.",
    422: "stop_on_empty_mask and nothing was found.",
    429: "Rate limited: the key's requests or polls per minute, or too many failed authentications (missing, unknown "
    "or revoked keys) from the client's address, which is then refused for the rest of the minute unless its key "
    "is one the server saw succeed lately.",
    500: "Unexpected server error (the body names the request id the server log has).",
    502: "The image URL's server failed.",
    503: "Try again later, or fix what the message names: the model is not installed or not loaded; the database, "
    "Redis (AUTOMASK_REDIS_URL) or the broker does not answer; the v2 job queue or the memory for request bodies is "
    "full; or this node no longer serves its database. Retry-After, when sent, says how many seconds to wait.",
    504: "The image fetch or the inference ran past its time limit.",
}
_RATE_HEADERS = {
    "Retry-After": {"description": "Seconds to wait.", "required": True, "schema": {"type": "string"}},
    "x-rate-limit-reset-at-utc": {
        "description": "When the next request is allowed (ISO 8601, UTC).",
        "required": True,
        "schema": {"type": "string"},
    },
}
REMAINING_CREDITS = "x-remaining-credits"
"""v1 success header: the key's credits left once the request is charged (absent: unlimited, or no keys)."""
IMAGE_ORIENTATION = "x-image-orientation"
"""v1 success header (automask extension): how the image was turned upright, e.g. '6; format=webp; from=exif'."""


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of the error `codes` an endpoint can answer: each `{"error": "..."}`."""
    out: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse, "description": _ERROR_TEXT[c]} for c in codes}
    if 429 in out:
        out[429]["headers"] = _RATE_HEADERS
    if 503 in out:
        out[503]["headers"] = {"Retry-After": {**_RATE_HEADERS["Retry-After"], "required": False}}
    return out


EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAF0lEQVR42mNkQAInTpyAs5kYcIDBKQEAuwcCaGIR0xsAAAAASUVORK5CYII="
)
"""An 8×8 PNG (left half black, right half grey) as base64: the request example of the API description."""
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": MaskRequest.model_json_schema(),
                "example": {"image": EXAMPLE_IMAGE, "prompt": "sofa, lamp", "threshold": 0.2, "grow_mask": 10},
            },
            "multipart/form-data": {"schema": MaskRequest.model_json_schema()},
        },
    }
}
JOB_ERRORS = {
    **errors(401, 403, 404, 429, 500, 503),
    422: {"model": StatusResponse, "description": "The job FAILED; `error` says why."},
}
"""What the `/v2/requests/{id}...` endpoints answer besides 200."""


_VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"


def without_validation_errors(app: FastAPI) -> None:
    """Make `app.openapi()` leave out the 422 "Validation Error" (`{"detail": [...]}`) FastAPI documents for every
    operation with parameters: this service answers a bad parameter 400 `{"error": ...}`, never that body."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()  # kept as app.openapi_schema: changed in place, once
            for operation in (op for path in spec.get("paths", {}).values() for op in path.values()):
                answer = operation.get("responses", {}).get("422", {})
                if answer.get("content", {}).get("application/json", {}).get("schema") == {"$ref": _VALIDATION_ERROR}:
                    del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]
