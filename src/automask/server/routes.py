"""The endpoints: v1 (one blocking call), v2 (submit, status, response, output), the model list, health and
readiness.

Every endpoint is a thin adapter over `MaskGenerator.generate` (run by the `Runner`); none re-implements a
step of the library.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader

from automask.result import MaskResult
from automask.server import keys
from automask.server.config import ServerSettings
from automask.server.errors import ApiError, shown
from automask.server.jobs import COMPLETED, FAILED, Job, JobQueue, Jobs, no_credits
from automask.server.keys import ApiKey
from automask.server.limits import RateLimiter
from automask.server.runner import Runner, inference_time, served_metadata
from automask.server.schemas import (
    ErrorResponse,
    MaskRequest,
    ModelList,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    read_request,
)
from automask.server.store import Store
from automask.settings import Settings

SLUG = "automatic-mask-generator"
router = APIRouter()


@dataclass
class ServerState:
    """Everything the routes share; `app.state.automask`."""

    settings: Settings
    server: ServerSettings
    store: Store
    runner: Runner
    jobs: Jobs
    queue: JobQueue
    limiter: RateLimiter
    body_limit: int


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"error": message}` with `status`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_ERROR_TEXT = {
    400: "Invalid parameters, an undecodable image, or a refused image URL.",
    401: "Missing or unknown API key.",
    403: "The key is revoked.",
    404: "Unknown endpoint, model or request id.",
    406: "Insufficient credits.",
    413: "Request body or image over the limits.",
    422: "stop_on_empty_mask and nothing was found.",
    429: "Rate limited.",
    500: "Unexpected server error (the body names the request id the server log has).",
    502: "The image URL's server failed.",
    503: "The model is not installed or not loaded.",
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


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of the error `codes` an endpoint can answer: each `{"error": "..."}`."""
    out: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse, "description": _ERROR_TEXT[c]} for c in codes}
    if 429 in out:
        out[429]["headers"] = _RATE_HEADERS
    return out


EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAF0lEQVR42mNkQAInTpyAs5kYcIDBKQEAuwcCaGIR0xsAAAAASUVORK5CYII="
)
"""An 8×8 PNG (left half black, right half grey) as base64: the request example of the API description."""
_BODY = {
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
_JOB_ERRORS = {
    **_errors(401, 403, 404, 500),
    422: {"model": StatusResponse, "description": "The job FAILED; `error` says why."},
}
"""What the `/v2/requests/{id}...` endpoints answer besides 200."""


def state_of(request: Request) -> ServerState:
    """The app's shared state."""
    state: ServerState = request.app.state.automask
    return state


API_KEY = APIKeyHeader(
    name="x-api-key", auto_error=False, description="A key made with `automask keys create` (am_<id>_<secret>)."
)
"""The `x-api-key` header, declared as the API's security scheme (checked by `current_key`, not here)."""


async def current_key(request: Request, token: Annotated[str | None, Security(API_KEY)]) -> ApiKey | None:
    """The caller's key from `x-api-key` (401/403 otherwise); None when the server runs without auth."""
    state = state_of(request)
    if not state.server.auth:
        return None
    key = await asyncio.to_thread(keys.authenticate, state.store, token)
    request.state.key_id = key.id
    return key


CallerKey = Annotated["ApiKey | None", Depends(current_key)]


@asynccontextmanager
async def credit_hold(state: ServerState, key: ApiKey | None, hold_id: str) -> AsyncIterator[None]:
    """Hold one credit of `key` for the block (406 when none is left); keep it if the block succeeds."""
    if key is None:
        yield
        return
    if not await asyncio.to_thread(keys.reserve, state.store, key.id, hold_id):
        raise no_credits(key.id)
    charged = False
    try:
        yield
        charged = True
    finally:
        keys.settle(state.store, hold_id, charge=charged)  # one quick local write, also on cancellation


def render(result: MaskResult, as_base64: bool, model: str) -> Response:
    """The v1 answer: the PNG itself, or JSON {"image": base64 PNG, ...metadata}; header `x-inference-time`
    (seconds the library call took)."""
    png = result.to_png()
    headers = {"x-inference-time": f"{inference_time(result):.6f}"}
    if as_base64:
        body = {
            "image": base64.b64encode(png).decode("ascii"),
            **served_metadata(result, model),
            "inference_time": inference_time(result),
        }
        return JSONResponse(body, headers=headers)
    return Response(png, media_type="image/png", headers=headers)


async def accept(request: Request, key: ApiKey | None) -> tuple[ServerState, MaskRequest, str]:
    """What v1 and v2 do before any work: the rate limit (429), the body (400/413), and the model (404/503,
    answered before a credit is held or a job is queued). Returns the state, the request and the model name."""
    state = state_of(request)
    if key is not None:
        state.limiter.check(key.id, key.rate_limit)
    req = await read_request(request, state.body_limit)
    model = await asyncio.to_thread(state.runner.check, req.model)
    return state, req, model


@router.post(
    f"/v1/{SLUG}",
    summary="Mask what the prompt names (one blocking call)",
    openapi_extra=_BODY,
    responses={
        200: {
            "content": {"image/png": {}, "application/json": {}},
            "description": "The result image, or JSON with `base64`.",
            "headers": {
                "x-inference-time": {
                    "description": "Seconds the masking took (automask extension).",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
        },
        **_errors(400, 401, 403, 404, 406, 413, 422, 429, 500, 502, 503, 504),
    },
    tags=["v1"],
)
async def v1_generate(request: Request, key: CallerKey) -> Response:
    state, req, model = await accept(request, key)
    async with credit_hold(state, key, uuid.uuid4().hex):
        result, _ = await state.runner.run(req.image, req.prompt, req.options(), model)
        return await asyncio.to_thread(render, result, req.base64, model)


@router.post(
    f"/v2/{SLUG}",
    summary="Queue a masking job; poll its status_url",
    openapi_extra=_BODY,
    response_model=SubmitResponse,
    responses=_errors(400, 401, 403, 404, 406, 413, 429, 500, 503),
    tags=["v2"],
)
async def v2_submit(request: Request, key: CallerKey) -> SubmitResponse:
    state, req, _ = await accept(request, key)
    job_id = await asyncio.to_thread(state.jobs.submit, key.id if key else None, req, charge=key is not None)
    state.queue.notify()
    base = _base_url(request, state)
    status_url = f"{base}/v2/requests/{job_id}/status"
    return SubmitResponse(
        request_id=job_id, poll_url=status_url, status_url=status_url, response_url=f"{base}/v2/requests/{job_id}"
    )


async def owned_job(request: Request, request_id: str, key: CallerKey) -> Job:
    """Job `request_id` if the caller's key owns it; 404 otherwise (another key's job is not revealed)."""
    job = await asyncio.to_thread(state_of(request).jobs.get, request_id)
    if job is None or (key is not None and job.key_id != key.id):
        raise ApiError(
            404,
            f"No request {shown(request_id)!r} for this key"
            " (it may have expired: results are kept for a limited time).",
        )
    return job


OwnedJob = Annotated[Job, Depends(owned_job)]


def _failed(job: Job) -> JSONResponse:
    return JSONResponse({"request_id": job.id, "status": FAILED, "error": job.error}, status_code=422)


@router.get(
    "/v2/requests/{request_id}/status",
    response_model=StatusResponse,
    responses=_JOB_ERRORS,
    tags=["v2"],
    summary="A job's status: QUEUED, PROCESSING, COMPLETED or FAILED (422)",
)
async def v2_status(job: OwnedJob) -> Response:
    if job.status == FAILED:
        return _failed(job)
    return JSONResponse({"request_id": job.id, "status": job.status})


@router.get(
    "/v2/requests/{request_id}",
    response_model=ResultResponse,
    responses=_JOB_ERRORS,
    tags=["v2"],
    summary="A job's response: output (absolute URL, or base64), metrics and metadata",
)
async def v2_response(request: Request, job: OwnedJob) -> Response:
    if job.status == FAILED:
        return _failed(job)
    body: dict[str, Any] = {"request_id": job.id, "status": job.status, "output": None, "metrics": {}}
    if job.status == COMPLETED and job.result_path is not None:
        if job.base64:
            body["output"] = base64.b64encode(await result_png(job)).decode("ascii")
        else:
            body["output"] = f"{_base_url(request, state_of(request))}/v2/requests/{job.id}/output"
        body["metrics"] = {"inference_time": round(job.inference_time or 0.0, 6)}
        body.update(job.metadata or {})
    return JSONResponse(body)


@router.get(
    "/v2/requests/{request_id}/output",
    response_class=Response,
    tags=["v2"],
    responses={200: {"content": {"image/png": {}}, "description": "The result PNG."}, **_JOB_ERRORS},
    summary="A completed job's result image",
)
async def v2_output(job: OwnedJob) -> Response:
    if job.status == FAILED:
        return _failed(job)
    if job.status != COMPLETED or job.result_path is None:
        raise ApiError(404, f"The result of request {job.id} is not ready yet ({job.status}); poll its status_url.")
    return Response(await result_png(job), media_type="image/png")


async def result_png(job: Job) -> bytes:
    """The PNG of a COMPLETED job; 404 if it has just expired (the sweeper deletes the row, then the file)."""
    assert job.result_path is not None
    try:
        return await asyncio.to_thread(job.result_path.read_bytes)
    except FileNotFoundError:
        raise ApiError(
            404, f"The result of request {job.id} has expired (results are kept for a limited time)."
        ) from None


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=_errors(401, 403, 500),
    tags=["v1"],
    summary="The models this server answers with (automask extension); send one's name as 'model'",
)
async def v1_models(request: Request, key: CallerKey) -> ModelList:
    runner = state_of(request).runner
    return ModelList.of(runner.default, await asyncio.to_thread(runner.models))


@router.get("/healthz", tags=["health"], summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["health"],
    summary="The model is loaded (503 with the reason otherwise)",
    responses={503: {"model": ErrorResponse, "description": "The model is still loading, or failed to load."}},
)
async def readyz(request: Request) -> Response:
    runner = state_of(request).runner
    if runner.ready:
        return JSONResponse({"status": "ready", "model": runner.default})  # its name: no server path
    reason = runner.error.message if runner.error else "The model is still loading."
    return error_response(503, reason)


def _base_url(request: Request, state: ServerState) -> str:
    """Where clients reach the service: `public_url`, else this request's base URL (no trailing slash)."""
    return (state.server.public_url or str(request.base_url)).rstrip("/")
