"""Running requests, wherever they run: the one code path of the in-process pool and of Celery workers.

`execute_job` runs a stored v2 job by id (claim, run, complete or fail); `compute` answers a v1 request as an
`Outcome` (the PNG and metadata, or the error status and message) that can travel from a worker to the API node
that holds the client, which renders it exactly as if it had computed it itself. Both build their answer with
`answer` (the PNG, and the metadata the JSON body carries).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from automask.errors import AutomaskError, ModelNotAvailableError, StoppedError
from automask.result import MaskResult, encode_png
from automask.server.errors import status_of
from automask.server.jobs import FAILED, LONGEST_RUN_MARGIN, QUEUED, Jobs
from automask.server.runner import Runner, RunnerClosed, inference_time, served_metadata
from automask.server.schemas import MaskRequest

log = logging.getLogger("automask.server")
UNANSWERED_PAUSE = 30.0
"""Seconds a v2 run goes on without asking whether its job is still its own after the database failed to answer
that (`still_held`): a cancel made meanwhile is seen at the first check after them (its result is not stored)."""


@dataclass
class Outcome:
    """A v1 answer: `status` 200 with `png`, the served `metadata` and `inference_time` (seconds), or an error
    `status` with its `error` message. `orientation`: how the image was turned (`orientation_header`; '': not)."""

    status: int
    png: bytes = b""
    metadata: dict[str, Any] = field(default_factory=dict)
    inference_time: float = 0.0
    error: str | None = None
    orientation: str = ""

    def dumps(self) -> bytes:
        """One bytes value: a JSON header line, then the PNG."""
        head = {k: v for k, v in asdict(self).items() if k != "png"}
        return json.dumps(head).encode() + b"\n" + self.png

    @classmethod
    def loads(cls, data: bytes) -> Outcome:
        """The `Outcome` `dumps` wrote; fields this release does not know (a newer node's) are ignored, so the nodes
        of a fleet being upgraded one by one still read each other's answers."""
        head, _, png = data.partition(b"\n")
        known = {f.name for f in fields(cls)}
        return cls(png=png, **{k: v for k, v in json.loads(head).items() if k in known})


def answer(result: MaskResult, request: MaskRequest, model: str) -> Outcome:
    """The 200 `Outcome` of `result`, for v1 and v2 alike, wherever it was computed: the rendered PNG, the served
    metadata (plus `instances` when the request asked for `instance_masks`) and the inference time. CPU work
    (PNG encoding): call it off the event loop."""
    metadata = served_metadata(result, model)
    if request.instance_masks:
        metadata["instances"] = instances(result)
    return Outcome(200, result.to_png(), metadata, inference_time(result), orientation=orientation_header(result))


def orientation_header(result: MaskResult) -> str:
    """The `x-image-orientation` header of a v1 answer: how decoding turned the image, e.g. '3; format=webp;
    from=exif' (EXIF orientation 3, read from a WebP's EXIF; `automask.imageio.orientation`); '' when it did not.
    The web page reads it to show another site's image (its bytes unreadable there) the way the mask is."""
    turned = result.orientation
    if turned.value == 1:
        return ""
    return f"{turned.value}; format={turned.format.lower() or 'unknown'}; from={turned.tag}"


def instances(result: MaskResult) -> list[dict[str, Any]]:
    """One `{"label", "score", "box", "area", "mask"}` per detection, in the order of `detections`; `mask` is
    `result.instance_masks[i]` (H×W uint8, 255 = selected, thresholded, before negative_prompt and grow/invert) as
    a base64 PNG."""
    return [
        {**det.to_dict(), "mask": base64.b64encode(encode_png(mask)).decode("ascii")}
        for det, mask in zip(result.detections, result.instance_masks, strict=True)
    ]


def unexpected_error(request_id: str) -> str:
    """The 500 message of an unexpected error: the request id the server log has, no internals."""
    return f"Unexpected server error (request id {request_id}); the server log has the details."


def compute(
    runner: Runner,
    request: MaskRequest,
    model: str,
    request_id: str,
    *,
    timeout: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Outcome | None:
    """Answer a v1 request in this thread within `timeout` seconds (None: the server's): never raises (an
    unexpected error is logged and becomes a 500). None when `should_stop` stopped the run: nobody waits for it."""
    try:
        options = request.options()
        result, _ = runner.run_blocking(
            request.image, request.prompt, options, model, timeout=timeout, should_stop=should_stop
        )
        return answer(result, request, model)
    except StoppedError:
        return None
    except AutomaskError as exc:
        return Outcome(status_of(exc), error=exc.message)
    except Exception:
        log.exception("unexpected error in request %s", request_id)
        return Outcome(500, error=unexpected_error(request_id))


def still_held(jobs: Jobs, job_id: str, node: str) -> Callable[[], bool]:
    """The `should_stop` of a v2 run: True once job `job_id` no longer runs on `node` (its owner cancelled it, or the
    sweeper gave it to another node), read from the database at each stage boundary (and, inside a running model, at
    most every `automask.stopping.INSIDE_EVERY` seconds), wherever the run is (the in-process pool, a Celery worker) and
    whichever node took the cancel. While the database does not answer, the run goes on (its `complete` decides): a
    read that failed (after its bound, `JOB_QUERY_TIMEOUT`, on a frozen server) is not tried again for
    `UNANSWERED_PAUSE` seconds, so a server that does not answer holds the model once, not at every check."""
    quiet_until = -math.inf

    def stop() -> bool:
        nonlocal quiet_until
        if time.monotonic() < quiet_until:
            return False
        try:
            return not jobs.held(job_id, node)
        except SQLAlchemyError:
            log.warning("v2 job %s: could not read whether it was cancelled; the run goes on", job_id, exc_info=True)
            quiet_until = time.monotonic() + UNANSWERED_PAUSE
            return False

    return stop


def execute_job(
    jobs: Jobs,
    runner: Runner,
    job_id: str,
    node: str,
    *,
    max_attempts: int,
    takeover_ttl: float | None = None,
    timeout: float | None = None,
    cut: Callable[[], bool] | None = None,
) -> str | None:
    """Run v2 job `job_id` on `node` to its end, in this thread; returns its new status, or None when it was not
    there to take (finished, cancelled, or running on a live node; `takeover_ttl`: see `Jobs.claim`) or was taken
    over while it ran here (the sweeper declared `node` dead and another node claimed it: that run ends it, never
    this one). `timeout`: this node's limit on a run; past it (plus `LONGEST_RUN_MARGIN`) the run is taken as lost.

    A job started more than `max_attempts` times (each start that never finished: a crash, a killed worker) ends FAILED.
    A job whose model is not available here goes back to QUEUED, its attempt not counted, to run once the model is back.
    A job cancelled while it runs (`Jobs.cancel`, from any node) stops at its next stage boundary or model layer
    (`still_held`); one that finishes first is neither stored nor charged (`Jobs.complete` no longer matches it).
    Once `cut` says True (the server stops and the job's time to finish is up), the run stops at its next stage
    boundary or model layer and the job goes back to QUEUED, its attempt not counted, to run after the restart.

    A database error (`SQLAlchemyError`, from claiming, completing, failing or releasing the job) is raised, never
    turned into a FAILED job: the job stays as the database last had it (PROCESSING on `node` once claimed) for the
    caller's retry path (a worker hands its task back and the redelivery takes the job over; the in-process pool
    leaves it to the sweeper), and a result computed here is computed again rather than refunded."""
    run_limit = None if timeout is None else timeout + LONGEST_RUN_MARGIN
    claimed = jobs.claim(job_id, node, takeover_ttl=takeover_ttl, run_limit=run_limit)
    if claimed is None:
        return None
    if claimed.attempts > max_attempts:
        message = f"The job was started {claimed.attempts - 1} times and never finished (its worker stopped)."
        return FAILED if jobs.fail(job_id, message, node=node) else None
    try:
        req = MaskRequest.model_validate(claimed.request)
        model = claimed.model or runner.name_of(req.model)
        try:
            runner.generator(model)
        except ModelNotAvailableError:
            return QUEUED if jobs.release(job_id, node) else None
        held = still_held(jobs, job_id, node)
        stop = held if cut is None else lambda: cut() or held()
        result, seconds = runner.run_blocking(req.image, req.prompt, req.options(), model, should_stop=stop)
        done = answer(result, req, model)
        if jobs.complete(job_id, node, done.png, done.metadata, seconds):
            return "COMPLETED"
        return None
    except StoppedError:  # cut off: back in the queue; cancelled (or taken over): whoever took it has settled it
        if cut is not None and cut():
            return QUEUED if jobs.release(job_id, node) else None
        log.info("v2 job %s stopped: it was cancelled, or taken over by another node", job_id)
        return None
    except RunnerClosed:  # stopping before it ran: it runs after the restart, or on another node
        return QUEUED if jobs.release(job_id, node) else None
    except SQLAlchemyError:  # the database failed us, not the job: the caller retries it
        raise
    except AutomaskError as exc:
        failed = jobs.fail(job_id, exc.message, node=node)
    except Exception:
        log.exception("v2 job %s failed unexpectedly", job_id)
        error = f"Unexpected server error while running request {job_id}; the server log has the details."
        failed = jobs.fail(job_id, error, node=node)
    return FAILED if failed else None
