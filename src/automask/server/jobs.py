"""v2 jobs in the database: submit, claim by id, complete, fail, cancel, expire, and what the sweeper recovers.

QUEUED -> PROCESSING -> COMPLETED | FAILED (| CANCELLED, an automask extension, from QUEUED or PROCESSING). A job holds
one credit of its key from submission (kept when it completes, given back otherwise). Delivery to the code that runs a
job is at least once, so every step is a conditional UPDATE by id: a job is claimed only while QUEUED (or, by a
redelivered message, PROCESSING on a node that died: never from a live run); it is completed, failed or released only by
the run that holds it (PROCESSING on the node that claimed it last), and completed or failed in the transaction that
settles its hold, so a duplicate run never charges or refunds twice, and a slow run whose job was taken over cannot end
the run that took it. A cancel is one such UPDATE too: of a cancel and a completion racing, exactly one matches the row,
and only its transaction settles the credit. A run asks `held` at each stage boundary (and at most every
`automask.stopping.INSIDE_EVERY` seconds inside a running model) and stops once its job is no longer its own (cancelled,
or taken over). Results (PNG) live in the database until `result_ttl` after they finish, so any node can serve them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import case, delete, func, insert, select, update

from automask.server import keys, metrics, nodes
from automask.server.bounded import job_bound, sized
from automask.server.errors import ApiError
from automask.server.job_view import (
    CANCELLED,
    COMPLETED,
    FAILED,
    FINISHED,
    PROCESSING,
    QUEUED,
    UNFINISHED,
    Claimed,
    Job,
    read_job,
)
from automask.server.limits import retry_headers
from automask.server.schemas import MaskRequest
from automask.server.store import Store, jobs_table, nodes_table

J = jobs_table.c
N = nodes_table.c
CANCELLED_QUEUED = "Cancelled by the client before it ran."
CANCELLED_RUNNING = "Cancelled by the client while it ran."
KEY_CAP_RETRY_SECONDS = 5
"""How long a key at its cap of unfinished jobs is told to wait (429 `Retry-After`)."""
LONGEST_RUN_MARGIN = 120.0
"""Seconds past the request timeout after which a PROCESSING job is taken as lost even though its node is alive
(Celery's hard limit is timeout + 30 s; model loading in-process does not count against the timeout)."""


def _running_on(job_id: str, node: str) -> Any:
    """The WHERE clause of job `job_id` while it is PROCESSING on `node`: held by the run that claimed it there."""
    return (J.id == job_id) & (J.status == PROCESSING) & (J.node == node)


def no_credits(key_id: str) -> ApiError:
    """The 406 for a key whose credits are spent."""
    return ApiError(
        406, f"The API key {key_id} has no credits left. Add some with: automask keys update {key_id} --credits N"
    )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB"


class Jobs:
    """The jobs table. `max_per_key` / `max_total`: how many unfinished jobs one key / everyone may have;
    `max_bytes_per_key` / `max_bytes_total`: how many bytes of stored requests (uploads, base64 images) they may
    hold in the database (one job is always taken when there are none: a cap below one largest request blocks none).
    """

    def __init__(
        self,
        store: Store,
        *,
        max_per_key: int | None = None,
        max_total: int | None = None,
        max_bytes_per_key: int | None = None,
        max_bytes_total: int | None = None,
    ) -> None:
        self.store = store
        self.max_per_key = max_per_key
        self.max_total = max_total
        self.max_bytes_per_key = max_bytes_per_key
        self.max_bytes_total = max_bytes_total

    def submit(self, key_id: str | None, request: MaskRequest, *, charge: bool, model: str | None = None) -> str:
        """Store a new QUEUED job (taking one credit of `key_id` when `charge`), not yet handed out (`published`
        records it once the dispatcher confirmed its hand-off); return its id.

        406: no credits; 429: the key has `max_per_key` unfinished jobs, or this one would take its stored bytes
        past `max_bytes_per_key`; 503: the queue holds `max_total` jobs, or would hold more than `max_bytes_total`
        bytes. Nothing is stored or charged then."""
        job_id = uuid.uuid4().hex
        body, upload = request.stored()
        size = len(body.encode()) + len(upload or b"")
        now = self.store.now()
        with self.store.transaction() as conn:
            self._check_room(conn, key_id, size)
            if charge and key_id is not None and keys.reserve_in(conn, key_id, job_id, now=now) is None:
                raise no_credits(key_id)
            row: dict[str, Any] = {"id": job_id, "key_id": key_id, "status": QUEUED, "request": body, "upload": upload}
            row |= {"base64": int(request.base64), "created_at": now, "model": model, "stored_bytes": size}
            with sized(size):  # a slow link to the database may take a while to carry a large upload
                conn.execute(insert(jobs_table).values(**row))
        return job_id

    def _check_room(self, conn: Any, key_id: str | None, size: int) -> None:
        """Raise the 429 / 503 when the caps are reached (`size`: the new job's stored bytes). The counts hold until
        the job is inserted: concurrent submits take a lock first (one for everyone when there is a total cap, else
        one per key)."""
        if self.max_total is not None or self.max_bytes_total is not None:
            self.store.lock(conn, "jobs.submit")
        elif key_id is not None and (self.max_per_key is not None or self.max_bytes_per_key is not None):
            self.store.lock(conn, f"jobs.submit.{key_id}")
        # the sizes recorded at submit: measuring the requests (length()) would read every queued image
        waiting = select(func.count(), func.coalesce(func.sum(J.stored_bytes), 0)).where(J.status.in_(UNFINISHED))
        if key_id is not None and (self.max_per_key is not None or self.max_bytes_per_key is not None):
            mine, held = conn.execute(waiting.where(J.key_id == key_id)).one()
            if self.max_per_key is not None and mine >= self.max_per_key:
                self._key_full(
                    f"This key has {mine} v2 jobs waiting or running, the most one key may have ({self.max_per_key})"
                )
            if self.max_bytes_per_key is not None and mine and held + size > self.max_bytes_per_key:
                self._key_full(
                    f"This key's v2 jobs waiting or running hold {_mib(held)} of requests, and this one "
                    f"{_mib(size)}: more than one key may store ({_mib(self.max_bytes_per_key)}, "
                    "AUTOMASK_SERVER_MAX_QUEUED_BYTES_PER_KEY)",
                    "send image URLs instead of image data, or ",
                )
        if self.max_total is None and self.max_bytes_total is None:
            return
        count, stored = conn.execute(waiting).one()
        if self.max_total is not None and count >= self.max_total:
            raise ApiError(503, "The server's job queue is full; try again in a minute.", {"Retry-After": "30"})
        if self.max_bytes_total is not None and count and stored + size > self.max_bytes_total:
            raise ApiError(
                503,
                f"The server's job queue is full: its requests take {_mib(stored)} of the "
                f"{_mib(self.max_bytes_total)} it may store (AUTOMASK_SERVER_MAX_QUEUED_BYTES); try again in a minute.",
                {"Retry-After": "30"},
            )

    def _key_full(self, why: str, instead: str = "") -> None:
        """Raise the 429 of a key at one of its caps: `why`, then what to do (`instead`, or wait)."""
        now = self.store.now()
        raise ApiError(
            429,
            f"{why}; {instead}wait for some to finish (poll their status_url), then submit again.",
            retry_headers(now, now + KEY_CAP_RETRY_SECONDS),
            limit="queued_jobs",
        )

    def get(self, job_id: str) -> Job | None:
        """Job `job_id`, or None (unknown or expired): `read_job`."""
        return read_job(self.store, job_id)

    def result(self, job_id: str) -> bytes | None:
        """The result PNG of COMPLETED job `job_id` (None: unknown, not completed or expired)."""
        where = (J.id == job_id, J.status == COMPLETED)
        with self.store.read() as conn:
            size = conn.execute(select(func.length(J.result)).where(*where)).scalar()
            if size is None:
                return None
            with sized(size):  # a slow link to the database may take a while to carry a large result
                row = conn.execute(select(J.result).where(*where)).first()
        return bytes(row.result) if row is not None and row.result is not None else None

    def claim(
        self, job_id: str, node: str, *, takeover_ttl: float | None = None, run_limit: float | None = None
    ) -> Claimed | None:
        """Take job `job_id` (now PROCESSING on `node`, one more attempt), or None when it is not there to take.
        `run_limit`: the seconds after which this run can no longer be going (the claiming node's own timeout plus
        a margin): past them the sweeper takes the job back (`orphaned`).

        A QUEUED job is always taken. A PROCESSING one only with `takeover_ttl` (its message was redelivered) and
        only when the node running it is dead (silent for longer than its own TTL, else `takeover_ttl` seconds, or
        gone from the nodes table) or is `node` itself (a worker process runs one task at a time: its own earlier
        run ended, e.g. on a database error, and handed the task back). A redelivered message whose job runs on
        another live node is a duplicate: the job stays with that run (should that node die, the sweeper puts the
        job back in the queue: `orphaned`)."""
        now = self.store.now()
        takeable = J.status == QUEUED
        if takeover_ttl is not None:
            live = select(N.id).where(nodes.alive(now, takeover_ttl))
            lost = J.node.is_(None) | (J.node == node) | J.node.not_in(live)
            takeable = takeable | ((J.status == PROCESSING) & lost)
        deadline = None if run_limit is None else now + run_limit
        with job_bound(), self.store.transaction() as conn:
            row = conn.execute(
                update(jobs_table)
                .where(J.id == job_id, takeable)
                .values(status=PROCESSING, started_at=now, attempts=J.attempts + 1, node=node, run_deadline=deadline)
                .returning(J.id, J.attempts, J.model, J.stored_bytes)
            ).first()
            if row is None:
                return None
            with sized(row.stored_bytes or 0):  # a slow link to the database may take a while to carry an upload
                stored = conn.execute(select(J.request, J.upload).where(J.id == job_id)).one()
        data = MaskRequest.unstored(stored.request, stored.upload)
        return Claimed(id=row.id, request=data, model=row.model, attempts=row.attempts)

    def release(self, job_id: str, node: str) -> bool:
        """Put a job PROCESSING on `node` back in the queue without counting the attempt (its model is not
        available, or the server stopped before it ran), to be handed out again (its message is gone: it counts as
        never handed out); False when it no longer runs there (taken over, or finished)."""
        with job_bound(), self.store.transaction() as conn:
            cur = conn.execute(
                update(jobs_table)
                .where(_running_on(job_id, node))
                .values(status=QUEUED, node=None, attempts=J.attempts - 1, published_at=None)
            )
        return cur.rowcount == 1

    def complete(self, job_id: str, node: str, png: bytes, metadata: dict[str, Any], seconds: float) -> bool:
        """Store the result and mark the job COMPLETED, keeping its credit, only if still PROCESSING on `node` (False:
        taken over or finished first, nothing changed); its bound grows by the PNG and metadata it stores (`sized`)."""
        stored = json.dumps(metadata)
        with job_bound(), sized(len(png) + len(stored)), self.store.transaction() as conn:
            cur = conn.execute(
                update(jobs_table)
                .where(_running_on(job_id, node))
                .values(
                    status=COMPLETED,
                    result=png,
                    metadata=stored,
                    inference_time=seconds,
                    finished_at=self.store.now(),
                    request=None,
                    upload=None,
                    node=None,
                )
            )
            if cur.rowcount != 1:
                return False
            charged = keys.settle_in(conn, job_id, charge=True)
        if charged:  # a keyed job (an unkeyed one, with --no-auth, holds no credit)
            metrics.credit_charged()
        return True

    def fail(self, job_id: str, error: str, *, node: str | None = None) -> bool:
        """Mark a job FAILED with `error`, giving its credit back: a job PROCESSING on `node` (the run that claimed
        it), or with `node` None a QUEUED one (it never ran). False otherwise, nothing changed."""
        owned = _running_on(job_id, node) if node is not None else (J.id == job_id) & (J.status == QUEUED)
        with job_bound():
            return self._end(owned, FAILED, error, job_id)

    def _end(self, where: Any, status: str, error: Any, job_id: str) -> bool:
        """Finish job `job_id` as `status` with `error` (a value or SQL expression) if its row matches `where`,
        giving its credit back in the same transaction; False (nothing changed) if it does not."""
        with self.store.transaction() as conn:
            cur = conn.execute(
                update(jobs_table)
                .where(where)
                .values(status=status, error=error, finished_at=self.store.now(), request=None, upload=None, node=None)
            )
            if cur.rowcount != 1:
                return False
            keys.settle_in(conn, job_id, charge=False)
        return True

    def cancel(self, job_id: str) -> bool:
        """Cancel an unfinished job (QUEUED, or PROCESSING wherever it runs): CANCELLED at once, its credit given back,
        in one transaction. The run of a PROCESSING job sees it at its next stage boundary or model layer (`held`) and
        stops; should it finish first, its `complete` (or `fail`) no longer matches the row: it neither stores its
        result nor charges. False when the job had finished already (a completion that won the race included)."""
        error = case((J.started_at.is_(None), CANCELLED_QUEUED), else_=CANCELLED_RUNNING)
        return self._end((J.id == job_id) & J.status.in_(UNFINISHED), CANCELLED, error, job_id)

    def held(self, job_id: str, node: str) -> bool:
        """Whether job `job_id` still runs on `node` (PROCESSING there): False once it was cancelled, or taken over by
        another node, so the run there may stop. A read by primary key, asked at each stage boundary (inside a running
        model: at most every `automask.stopping.INSIDE_EVERY` seconds)."""
        with job_bound(), self.store.read() as conn:
            return conn.execute(select(J.id).where(_running_on(job_id, node))).first() is not None

    def expire(self, ttl: float) -> int:
        """Delete jobs finished more than `ttl` seconds ago, with their results; return how many."""
        with self.store.transaction() as conn:
            cur = conn.execute(delete(jobs_table).where(J.status.in_(FINISHED), J.finished_at < self.store.now() - ttl))
        return int(cur.rowcount)

    def queued(self, *, limit: int = 100) -> list[tuple[str, str | None]]:
        """(id, model) of QUEUED jobs, oldest first."""
        query = select(J.id, J.model).where(J.status == QUEUED).order_by(J.created_at).limit(limit)
        with self.store.read() as conn:
            return [(r.id, r.model) for r in conn.execute(query)]

    def unpublished(
        self,
        older_than: float,
        limit: int = 1000,
        *,
        models: list[str] | None = None,
        confirmed_before: float | None = None,
    ) -> list[tuple[str, str | None]]:
        """(id, model) of QUEUED jobs, oldest first, stored before `older_than`, whose hand-off was never confirmed
        (`published`): the publish at submit failed or timed out, or the job was put back in the queue (`release`,
        `orphaned`). A job whose message RabbitMQ confirmed is returned only once that confirmation is older than
        `confirmed_before` (None: never): its message may have been dropped since (RabbitMQ's delivery limit after
        repeated database errors), and one late duplicate is harmless. `models`: only jobs of these models (or of
        none: the default's); the others are returned as soon as their model is among `models`. Changes nothing:
        `published` records the hand-offs that succeed."""
        due = (J.status == QUEUED) & J.published_at.is_(None) & (J.created_at < older_than)
        if confirmed_before is not None:
            due = due | ((J.status == QUEUED) & (J.published_at < confirmed_before))
        if models is not None:
            due = due & (J.model.is_(None) | J.model.in_(models))
        with self.store.read() as conn:
            rows = conn.execute(select(J.id, J.model).where(due).order_by(J.created_at).limit(limit)).all()
        return [(r.id, r.model) for r in rows]

    def published(self, job_ids: list[str], sent_at: float) -> None:
        """Record that the hand-off of each job in `job_ids`, sent at `sent_at`, was confirmed (RabbitMQ
        acknowledged its message; the in-process pool queued it): `unpublished` no longer returns it, until it is
        put back in the queue. A job claimed since `sent_at` is left alone: its message is consumed, and if it was
        put back meanwhile (`release`, `orphaned`) it must be handed out again."""
        if not job_ids:
            return
        fresh = (J.status == QUEUED) & (J.started_at.is_(None) | (J.started_at < sent_at))
        with self.store.transaction() as conn:
            conn.execute(update(jobs_table).where(J.id.in_(job_ids), fresh).values(published_at=self.store.now()))

    def orphaned(self, live_nodes: list[str], longest: float | None = None) -> list[tuple[str, str | None]]:
        """PROCESSING jobs whose node is not among `live_nodes` (it died mid-run), or whose run is past its
        `run_deadline` (set by the claiming node; a run claimed without one: started over `longest` seconds ago), so
        the run was lost (e.g. its worker could not reach the database to finish it): put back to QUEUED (the
        attempt stays counted), as never handed out, and returned, to be handed out again.

        One UPDATE ... RETURNING: a job a live node claims meanwhile (a redelivered message) no longer matches
        `lost` (PostgreSQL re-checks the WHERE on a row another transaction changed), so it is left running."""
        now = self.store.now()
        lost = J.node.is_(None) | J.node.not_in(live_nodes) | (J.run_deadline < now)
        if longest is not None:
            lost = lost | (J.run_deadline.is_(None) & (J.started_at < now - longest))
        with self.store.transaction() as conn:
            rows = conn.execute(
                update(jobs_table)
                .where(J.status == PROCESSING, lost)
                .values(status=QUEUED, node=None, published_at=None)
                .returning(J.id, J.model)
            ).all()
        return [(r.id, r.model) for r in rows]
