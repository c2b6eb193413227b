"""The endpoints: v1 (one blocking call), v2 (submit, status, response, output), the model list, health and
readiness.

Every endpoint is a thin adapter over `MaskGenerator.generate` (run by the dispatcher: `automask.server.dispatch`);
none re-implements a step of the library.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from automask.errors import InvalidOptionError
from automask.imageio.load import check_image, inline_size
from automask.server import keys
from automask.server.bodies import Hold, declared_size
from automask.server.caller import CallerKey, PollingKey
from automask.server.dispatch import PUBLISH_TIMEOUT
from automask.server.errors import ApiError, shown
from automask.server.execute import Outcome
from automask.server.holds import credit_hold, unless_client_leaves
from automask.server.jobs import CANCELLED, COMPLETED, FAILED, Job, no_credits
from automask.server.keys import ApiKey
from automask.server.openapi_docs import IMAGE_ORIENTATION, JOB_ERRORS, REMAINING_CREDITS, REQUEST_BODY, errors
from automask.server.schemas import (
    CreditsResponse,
    ErrorResponse,
    MaskRequest,
    ModelList,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    read_request,
)
from automask.server.state import ServerState, state_of
from automask.server.this_machine import only_this_machine

log = logging.getLogger("automask.server")
SLUG = "automatic-mask-generator"
router = APIRouter(dependencies=[Depends(only_this_machine)])


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"error": message}` with `status`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def render(outcome: Outcome, as_base64: bool, credits_left: int | None = None) -> Response:
    """The v1 answer: the PNG itself, or JSON {"image": base64 PNG, ...metadata}; headers `x-inference-time`
    (seconds the library call took), `x-image-orientation` when the image was turned (`execute.orientation_header`)
    and, for a key with limited credits, `x-remaining-credits`."""
    headers = {"x-inference-time": f"{outcome.inference_time:.6f}"}
    if outcome.orientation:
        headers[IMAGE_ORIENTATION] = outcome.orientation
    if credits_left is not None:
        headers[REMAINING_CREDITS] = str(credits_left)
    if as_base64:
        body = {
            "image": base64.b64encode(outcome.png).decode("ascii"),
            **outcome.metadata,
            "inference_time": outcome.inference_time,
        }
        return JSONResponse(body, headers=headers)
    return Response(outcome.png, media_type="image/png", headers=headers)


@asynccontextmanager
async def accepted(request: Request, key: ApiKey | None) -> AsyncIterator[tuple[ServerState, MaskRequest, str, Hold]]:
    """What v1 and v2 do before any work: the rate limit (429), a spent key (406), room for the body in memory
    (503; these three before the body is read), the body (400/413), and the model and whether it answers the
    prompt's targets (404/503, answered before a credit is held or a job is queued). Yields the state, the request,
    the model name and the request's `Hold` in `state.bodies`: the body's room, held until the block ends."""
    state = state_of(request)
    if key is not None:
        await state.limiter.hit(key.id, key.rate_limit)
        if key.credits is not None and key.credits < 1:  # as authenticated; the hold re-checks atomically
            raise no_credits(key.id)
    with state.bodies.hold(key.id if key else None, declared_size(request.headers, state.body_limit)) as held:
        req = await read_request(request, state.body_limit)
        model = await asyncio.to_thread(state.dispatcher.check, req.model, req.targets)
        yield state, req, model, held


@router.post(
    f"/v1/{SLUG}",
    summary="Mask what the prompt names (one blocking call)",
    openapi_extra=REQUEST_BODY,
    responses={
        200: {
            "content": {"image/png": {}, "application/json": {}},
            "description": "The result image, or JSON with `base64`.",
            "headers": {
                "x-inference-time": {
                    "description": "Seconds the masking took (automask extension).",
                    "required": True,
                    "schema": {"type": "string"},
                },
                REMAINING_CREDITS: {
                    "description": "The calling key's credits left after this request was charged, as the hosted "
                    "API sends them. Absent for a key with unlimited credits and on a server run with --no-auth.",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                },
                IMAGE_ORIENTATION: {
                    "description": "How the image was turned upright (automask extension): its EXIF orientation "
                    "1-8, its format and where the orientation was read, e.g. `3; format=webp; from=exif`. Absent "
                    "when it was not turned.",
                    "required": False,
                    "schema": {"type": "string"},
                },
            },
        },
        **errors(400, 401, 403, 404, 406, 413, 422, 429, 500, 502, 503, 504),
    },
    tags=["v1"],
)
async def v1_generate(request: Request, key: CallerKey) -> Response:
    async with accepted(request, key) as (state, req, model, _held):
        if req.instance_masks and not req.base64:
            raise InvalidOptionError(
                "instance_masks",
                "needs base64: true on v1 (the instances come in the JSON answer; a PNG body has none)",
            )
        await unless_client_leaves(request, state.dispatcher.prepare(model))  # a first load: before hold and limit
        async with credit_hold(state, key, uuid.uuid4().hex) as credits_left:
            request_id = request.scope.get("state", {}).get("request_id", "")
            outcome = await unless_client_leaves(request, state.dispatcher.run_v1(req, model, request_id))
            if outcome.error is not None:
                raise ApiError(outcome.status, outcome.error)
            return render(outcome, req.base64, credits_left)


@router.post(
    f"/v2/{SLUG}",
    summary="Queue a masking job; poll its status_url",
    openapi_extra=REQUEST_BODY,
    response_model=SubmitResponse,
    responses=errors(400, 401, 403, 404, 406, 413, 429, 500, 503),
    tags=["v2"],
)
async def v2_submit(request: Request, key: CallerKey) -> SubmitResponse:
    async with accepted(request, key) as (state, req, model, held):
        held.grow(inline_size(req.image))  # its decoded bytes, besides the body, until the job is stored (503)
        # what v1 answers before any download or inference (400, 413), now, not when the job runs
        await asyncio.to_thread(check_image, req.image, state.settings)
        job_id = await asyncio.to_thread(
            state.jobs.submit, key.id if key else None, req, charge=key is not None, model=model
        )
    try:  # bounded: RabbitMQ may hold a send up for as long as a memory or disk alarm lasts
        sent_at = state.store.now()
        await asyncio.wait_for(asyncio.wrap_future(state.dispatcher.publish(job_id, model)), PUBLISH_TIMEOUT)
        await asyncio.to_thread(state.jobs.published, [job_id], sent_at)  # confirmed: not sent again
    except Exception:  # stored: the sweeper hands it out again (republish_after)
        log.warning("could not queue v2 job %s now; the sweeper will", job_id, exc_info=True)
    base = _base_url(request, state)
    status_url = f"{base}/v2/requests/{job_id}/status"
    return SubmitResponse(
        request_id=job_id, poll_url=status_url, status_url=status_url, response_url=f"{base}/v2/requests/{job_id}"
    )


async def owned_job(request: Request, request_id: str, key: PollingKey) -> Job:
    """Job `request_id` if the caller's key owns it; 404 otherwise (another key's job is not revealed)."""
    job = await asyncio.to_thread(state_of(request).jobs.get, request_id)
    if job is None or job.key_id != (key.id if key is not None else None):  # --no-auth sees unkeyed jobs only
        raise ApiError(
            404,
            f"No request {shown(request_id)!r} for this key"
            " (it may have expired: results are kept for a limited time).",
        )
    return job


OwnedJob = Annotated[Job, Depends(owned_job)]


def _failed(job: Job) -> JSONResponse:
    return JSONResponse({"request_id": job.id, "status": job.status, "error": job.error}, status_code=422)


@router.head("/v2/requests/{request_id}/status", include_in_schema=False)  # HEAD: as GET, without the body
@router.get(
    "/v2/requests/{request_id}/status",
    response_model=StatusResponse,
    responses=JOB_ERRORS,
    tags=["v2"],
    summary="A job's status: QUEUED, PROCESSING, COMPLETED or FAILED (422)",
)
async def v2_status(job: OwnedJob) -> Response:
    if job.status in (FAILED, CANCELLED):
        return _failed(job)
    return JSONResponse({"request_id": job.id, "status": job.shown_status})


@router.head("/v2/requests/{request_id}", include_in_schema=False)
@router.get(
    "/v2/requests/{request_id}",
    response_model=ResultResponse,
    responses=JOB_ERRORS,
    tags=["v2"],
    summary="A job's response: output (absolute URL, or base64), metrics and metadata",
)
async def v2_response(request: Request, job: OwnedJob) -> Response:
    if job.status in (FAILED, CANCELLED):
        return _failed(job)
    body: dict[str, Any] = {"request_id": job.id, "status": job.shown_status, "output": None, "metrics": {}}
    if job.status == COMPLETED and job.has_result:
        if job.base64:
            body["output"] = base64.b64encode(await result_png(request, job)).decode("ascii")
        else:
            body["output"] = f"{_base_url(request, state_of(request))}/v2/requests/{job.id}/output"
        body["metrics"] = {"inference_time": round(job.inference_time or 0.0, 6)}
        body.update(job.metadata or {})
    return JSONResponse(body)


@router.head("/v2/requests/{request_id}/output", include_in_schema=False)
@router.get(
    "/v2/requests/{request_id}/output",
    response_class=Response,
    tags=["v2"],
    responses={200: {"content": {"image/png": {}}, "description": "The result PNG."}, **JOB_ERRORS},
    summary="A completed job's result image",
)
async def v2_output(request: Request, job: OwnedJob) -> Response:
    if job.status in (FAILED, CANCELLED):
        return _failed(job)
    if job.status != COMPLETED or not job.has_result:
        raise ApiError(
            404, f"The result of request {job.id} is not ready yet ({job.shown_status}); poll its status_url."
        )
    return Response(await result_png(request, job), media_type="image/png")


async def result_png(request: Request, job: Job) -> bytes:
    """The PNG of a COMPLETED job; 404 if it has expired since the job was read."""
    png = await asyncio.to_thread(state_of(request).jobs.result, job.id)
    if png is None:
        raise ApiError(404, f"The result of request {job.id} has expired (results are kept for a limited time).")
    return png


@router.post(
    "/v2/requests/{request_id}/cancel",
    response_model=StatusResponse,
    responses=errors(401, 403, 404, 429, 500, 503),
    tags=["v2"],
    summary="Cancel a queued or running job: it is not charged (automask extension)",
    description=(
        "Cancels a QUEUED or PROCESSING job at once: its status is CANCELLED (polling it answers 422 with "
        "status CANCELLED) and its credit is given back. A queued job never runs; a running one stops at its next "
        "stage boundary or between two layers of its model (within about half a second), wherever it runs, and its "
        "result, should it finish anyway, is neither stored nor charged. A job that finished first (COMPLETED or "
        "FAILED) is answered with its status unchanged: of a cancel and a completion arriving together, exactly one "
        "takes effect."
    ),
)
async def v2_cancel(request: Request, job: OwnedJob) -> Response:
    """The job's run learns of it from the database (`execute.still_held`), whichever node took the cancel."""
    state = state_of(request)
    if await asyncio.to_thread(state.jobs.cancel, job.id):
        return JSONResponse({"request_id": job.id, "status": CANCELLED})
    found = await asyncio.to_thread(state.jobs.get, job.id)
    current = (found or job).shown_status
    return JSONResponse({"request_id": job.id, "status": current})


@router.head("/v1/credits", include_in_schema=False)
@router.get(
    "/v1/credits",
    response_model=CreditsResponse,
    responses=errors(401, 403, 429, 500, 503),
    tags=["v1"],
    summary="The calling key's credits left (automask extension); null: unlimited",
)
async def v1_credits(request: Request, key: PollingKey) -> CreditsResponse:
    if key is None:
        return CreditsResponse(key_id=None, credits=None)
    credits = await asyncio.to_thread(keys.balance, state_of(request).store, key.id)
    return CreditsResponse(key_id=key.id, credits=credits)


@router.head("/v1/models", include_in_schema=False)
@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=errors(401, 403, 429, 500, 503),
    tags=["v1"],
    summary="The models this server answers with (automask extension); send one's name as 'model'",
)
async def v1_models(request: Request, key: PollingKey) -> ModelList:
    dispatcher = state_of(request).dispatcher
    default, entries = await asyncio.to_thread(lambda: (dispatcher.default, dispatcher.models()))
    return ModelList.of(default, entries)


@router.head("/healthz", include_in_schema=False)  # load balancers' health checks probe with HEAD or GET
@router.get("/healthz", tags=["health"], summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.head("/readyz", include_in_schema=False)  # as /healthz
@router.get(
    "/readyz",
    tags=["health"],
    summary="The model is loaded (503 with the reason otherwise)",
    responses={
        503: {
            "model": ErrorResponse,
            "description": "The model is still loading or failed to load, the database does not answer or now "
            "serves another kind of deployment, or Redis (AUTOMASK_REDIS_URL) does not answer.",
        }
    },
)
async def readyz(request: Request) -> Response:
    state = state_of(request)
    dispatcher = state.dispatcher
    reason = (
        state.guard.refusal
        or await state.limiter.unreachable()
        or await state.database.unreachable()  # asked each time: the fleet's list of workers is cached for a second
    )
    if reason is None:  # both may read the fleet's list of workers (the database): off the loop
        reason, model = await asyncio.to_thread(lambda: (dispatcher.readiness(), dispatcher.default))
    if reason is None:
        return JSONResponse({"status": "ready", "model": model})  # its name: no server path
    return error_response(503, reason)


def _base_url(request: Request, state: ServerState) -> str:
    """Where clients reach the service (no trailing slash): `public_url`, else the address and port the request's
    connection came in on (never the client's `Host` header, which anyone can set)."""
    if state.server.public_url:
        return state.server.public_url.rstrip("/")
    host, port = request.scope.get("server") or (state.server.host, state.server.port)
    scheme = request.scope.get("scheme", "http")
    host = f"[{host}]" if ":" in str(host) else str(host)
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{netloc}{request.scope.get('root_path', '')}".rstrip("/")
