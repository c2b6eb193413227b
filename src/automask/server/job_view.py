"""A v2 job as its owner and its runner see it (`Job`, `Claimed`, the statuses), and reading one by id for a poll
(`read_job`), its wait for the database bounded and grown by the metadata it carries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from automask.server.bounded import job_bound, sized
from automask.server.store import Store, jobs_table

QUEUED, PROCESSING, COMPLETED, FAILED, CANCELLED = "QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"
UNFINISHED = (QUEUED, PROCESSING)
FINISHED = (COMPLETED, FAILED, CANCELLED)
J = jobs_table.c


@dataclass(frozen=True)
class Job:
    """A job as its owner sees it (never its upload or result bytes). `metadata`: the served metadata once
    COMPLETED."""

    id: str
    key_id: str | None
    status: str
    base64: bool
    error: str | None
    metadata: dict[str, Any] | None
    inference_time: float | None
    model: str | None
    has_result: bool
    started: bool = False
    """Claimed at least once (by a run that may have been lost since: the job is then QUEUED again)."""

    @property
    def shown_status(self) -> str:
        """The status its owner is shown: QUEUED -> PROCESSING -> COMPLETED | FAILED, never back. A job put back in
        the queue after it started (its worker died, its run was lost, its server stopped) stays PROCESSING."""
        return PROCESSING if self.status == QUEUED and self.started else self.status


@dataclass(frozen=True)
class Claimed:
    """A job a worker has just taken: its stored request, its model and how many times it was started."""

    id: str
    request: dict[str, Any]
    model: str | None
    attempts: int


_JOB_COLUMNS = (J.id, J.key_id, J.status, J.base64, J.error, J.inference_time, J.model)


def _to_job(row: Any, metadata: str | None) -> Job:
    """The `Job` of `row` (`_JOB_COLUMNS`, `has_result`, `started`) and its stored `metadata` (JSON text)."""
    return Job(
        id=row.id,
        key_id=row.key_id,
        status=row.status,
        base64=bool(row.base64),
        error=row.error,
        metadata=json.loads(metadata) if metadata else None,
        inference_time=row.inference_time,
        model=row.model,
        has_result=bool(row.has_result),
        started=bool(row.started),
    )


def read_job(store: Store, job_id: str) -> Job | None:
    """Job `job_id`, or None (unknown or expired). An id holding NUL is no job's, and not looked up: PostgreSQL text
    cannot hold it (the query would fail as if the database were down).

    Each statement waits for the database as long as the bound in force (an HTTP request's, else `job_bound`): the
    job without its metadata first, with the metadata's size, then, if it has any, the metadata, its read longer by
    that size (`sized`: an instance mask's can be megabytes, which a slow link to the database takes a while to carry).
    So a frozen server is given up on, a healthy large read is not cut off, and the bound follows the row read: a job
    that completes between the two reads is the job the first found (its metadata, once stored, never changes)."""
    if "\x00" in job_id:
        return None
    size = func.coalesce(func.length(J.metadata), 0).label("size")
    flags = J.result.is_not(None).label("has_result"), J.started_at.is_not(None).label("started")
    with job_bound(), store.read() as conn:
        row = conn.execute(select(*_JOB_COLUMNS, size, *flags).where(J.id == job_id)).first()
        if row is None:
            return None
        metadata = None
        if row.size:
            with sized(row.size):
                found = conn.execute(select(J.metadata).where(J.id == job_id)).first()
            if found is None:
                return None  # expired meanwhile
            metadata = found[0]
    return _to_job(row, metadata)
