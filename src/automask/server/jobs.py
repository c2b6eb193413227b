"""v2 jobs: stored durably in SQLite, run by worker tasks in the server process, never lost.

QUEUED -> PROCESSING -> COMPLETED | FAILED. A job holds one credit of its key from submission (kept when it
completes, given back when it fails). On start-up, jobs left QUEUED or PROCESSING by a stopped or killed
server are run again; finished jobs are deleted, with their result files, `result_ttl` seconds after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automask.errors import AutomaskError
from automask.server import keys
from automask.server.config import ServerSettings
from automask.server.errors import ApiError
from automask.server.runner import Runner, served_metadata
from automask.server.schemas import MaskRequest
from automask.server.store import Store

log = logging.getLogger("automask.server")

QUEUED, PROCESSING, COMPLETED, FAILED = "QUEUED", "PROCESSING", "COMPLETED", "FAILED"
POLL_SECONDS = 1.0
"""Idle workers look for jobs at least this often (a submit wakes them at once)."""


@dataclass(frozen=True)
class Job:
    """A job as its owner sees it. `metadata` is `runner.served_metadata(...)` once COMPLETED."""

    id: str
    key_id: str | None
    status: str
    base64: bool
    error: str | None
    metadata: dict[str, Any] | None
    result_path: Path | None
    inference_time: float | None


@dataclass(frozen=True)
class Claimed:
    """A job a worker has just taken: its stored request and how many times it was started."""

    id: str
    request: dict[str, Any]
    attempts: int


def _to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        key_id=row["key_id"],
        status=row["status"],
        base64=bool(row["base64"]),
        error=row["error"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        result_path=Path(row["result_path"]) if row["result_path"] else None,
        inference_time=row["inference_time"],
    )


class Jobs:
    """The jobs table and the result files under `results_dir`."""

    def __init__(self, store: Store, results_dir: Path) -> None:
        self.store = store
        self.results_dir = Path(results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)

    def submit(self, key_id: str | None, request: MaskRequest, *, charge: bool) -> str:
        """Store a new QUEUED job (taking one credit of `key_id` when `charge`); return its id. 406: no credits."""
        job_id = uuid.uuid4().hex
        upload = request.image if isinstance(request.image, bytes) else None
        body = request.model_dump_json(exclude={"image"} if upload is not None else None)
        with self.store.transaction() as conn:
            if charge and key_id is not None and not keys.reserve_in(conn, key_id, job_id):
                raise no_credits(key_id)
            conn.execute(
                "INSERT INTO jobs (id, key_id, status, request, upload, base64, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, key_id, QUEUED, body, upload, int(request.base64), time.time()),
            )
        return job_id

    def get(self, job_id: str) -> Job | None:
        """Job `job_id`, or None (unknown or expired)."""
        row = self.store.connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _to_job(row) if row else None

    def claim(self) -> Claimed | None:
        """Take the oldest QUEUED job (now PROCESSING), or None when none is waiting."""
        with self.store.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1 WHERE id ="
                " (SELECT id FROM jobs WHERE status = ? ORDER BY created_at, rowid LIMIT 1)"
                " RETURNING id, request, upload, attempts",
                (PROCESSING, time.time(), QUEUED),
            ).fetchone()
        if row is None:
            return None
        data = json.loads(row["request"])
        if row["upload"] is not None:
            data["image"] = bytes(row["upload"])
        return Claimed(id=row["id"], request=data, attempts=row["attempts"])

    def complete(self, job_id: str, png: bytes, metadata: dict[str, Any], seconds: float) -> None:
        """Save the result PNG and mark the job COMPLETED, keeping its credit."""
        path = self.results_dir / f"{job_id}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        os.replace(tmp, path)
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, result_path = ?, metadata = ?, inference_time = ?, finished_at = ?,"
                " request = NULL, upload = NULL WHERE id = ?",
                (COMPLETED, str(path), json.dumps(metadata), seconds, time.time(), job_id),
            )
            keys.settle_in(conn, job_id, charge=True)

    def fail(self, job_id: str, error: str) -> None:
        """Mark the job FAILED with `error`, giving its credit back."""
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ?, request = NULL, upload = NULL WHERE id = ?",
                (FAILED, error, time.time(), job_id),
            )
            keys.settle_in(conn, job_id, charge=False)

    def requeue_interrupted(self) -> int:
        """Put jobs left PROCESSING (by a server that stopped) back in the queue; return how many."""
        with self.store.transaction() as conn:
            return conn.execute("UPDATE jobs SET status = ? WHERE status = ?", (QUEUED, PROCESSING)).rowcount

    def expire(self, ttl: float) -> int:
        """Delete jobs finished more than `ttl` seconds ago, and their result files; return how many."""
        with self.store.transaction() as conn:
            rows = conn.execute(
                "DELETE FROM jobs WHERE status IN (?, ?) AND finished_at < ? RETURNING result_path",
                (COMPLETED, FAILED, time.time() - ttl),
            ).fetchall()
        for row in rows:
            if row["result_path"]:
                Path(row["result_path"]).unlink(missing_ok=True)
        return len(rows)


def no_credits(key_id: str) -> ApiError:
    """The 406 for a key whose credits are spent."""
    return ApiError(
        406, f"The API key {key_id} has no credits left. Add some with: automask keys update {key_id} --credits N"
    )


class JobQueue:
    """Worker tasks that run queued jobs through the `Runner`, and a task that sweeps expired results."""

    def __init__(self, jobs: Jobs, runner: Runner, server: ServerSettings) -> None:
        self.jobs = jobs
        self.runner = runner
        self.server = server
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Re-queue interrupted jobs, then start the workers and the sweeper."""
        requeued = await asyncio.to_thread(self.jobs.requeue_interrupted)
        if requeued:
            log.info("re-queued %d interrupted v2 jobs", requeued)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.server.workers_for_jobs)]
        self._tasks.append(asyncio.create_task(self._sweep()))
        self.notify()

    def notify(self) -> None:
        """Wake idle workers: a job was queued."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancel the workers; a job they were running stays PROCESSING and runs again at the next start."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _work(self) -> None:
        while True:
            self._wake.clear()
            try:
                claimed = await asyncio.to_thread(self.jobs.claim)
            except sqlite3.Error:
                log.exception("could not read the v2 job queue; retrying")
                claimed = None
            if claimed is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                continue
            self._wake.set()  # more may be waiting: let another idle worker look
            await self._run(claimed)

    async def _run(self, job: Claimed) -> None:
        if job.attempts > self.server.max_job_attempts:
            message = f"The job was started {job.attempts - 1} times and never finished (the server stopped)."
            await asyncio.to_thread(self.jobs.fail, job.id, message)
            return
        try:
            req = MaskRequest.model_validate(job.request)
            model = await asyncio.to_thread(self.runner.name_of, req.model)
            result, seconds = await self.runner.run(req.image, req.prompt, req.options(), model)
            png = await asyncio.to_thread(result.to_png)
            await asyncio.to_thread(self.jobs.complete, job.id, png, served_metadata(result, model), seconds)
        except AutomaskError as exc:
            await asyncio.to_thread(self.jobs.fail, job.id, exc.message)
        except Exception:
            log.exception("v2 job %s failed unexpectedly", job.id)
            message = f"Unexpected server error while running request {job.id}; the server log has the details."
            await asyncio.to_thread(self.jobs.fail, job.id, message)

    async def _sweep(self) -> None:
        while True:
            removed = await asyncio.to_thread(self.jobs.expire, self.server.result_ttl)
            if removed:
                log.info("deleted %d expired v2 results", removed)
            await asyncio.sleep(self.server.cleanup_interval)
