"""The sweeper: what keeps a fleet correct when processes die or messages are lost. One node at a time sweeps
(a PostgreSQL advisory lock; SQLite has one server per database).

Every `sweep_interval` seconds: PROCESSING jobs of dead nodes go back to the queue and are handed out again;
QUEUED jobs whose hand-off was never confirmed (`republish_after` after they were stored: their publish failed, or
they were put back) are handed out again, once something serves their model (`Dispatcher.serving`: in a fleet, a
live worker); a job whose message RabbitMQ confirmed is never sent twice, however long it waits behind others (a
message lost after that is covered by dead nodes' jobs and the attempts cap); credit holds that no live request owns
are given back;
every `cleanup_interval`, finished jobs older than `result_ttl` are deleted (an SQLite file then gives the space
back, `Store.reclaim_space`).

Before each sweep it reads again which kind of deployment the database serves (`deployment.Guard`): once another
kind has taken it, this node stops sweeping and stops its dispatcher (no job runs here any more); its routes answer
503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Iterator

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from automask.server import keys, nodes
from automask.server.bounded import bounded
from automask.server.config import ServerSettings
from automask.server.deployment import Guard
from automask.server.dispatch import PUBLISH_TIMEOUT, Dispatcher
from automask.server.jobs import LONGEST_RUN_MARGIN, Jobs
from automask.server.logs import Failures
from automask.server.store import Store

log = logging.getLogger("automask.server")
LOCK_ID = 0x6175746F6D62  # the PostgreSQL advisory lock held while one node sweeps


@contextlib.contextmanager
def sweeping_lock(store: Store) -> Iterator[bool]:
    """True when this process may sweep now (it holds the fleet's sweeper lock until the block ends)."""
    if store.is_sqlite:
        yield True
        return
    with store.engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": LOCK_ID}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
                conn.commit()


class Sweeper:
    """Sweeps `store` for `dispatcher` (which hands recovered jobs out again), as long as `guard` holds (None: no
    guard, for a sweeper driven by hand)."""

    def __init__(
        self, store: Store, jobs: Jobs, dispatcher: Dispatcher, server: ServerSettings, *, guard: Guard | None = None
    ) -> None:
        self.store, self.jobs, self.dispatcher, self.server, self.guard = store, jobs, dispatcher, server, guard
        self._last_expiry = 0.0
        self._task: asyncio.Task[None] | None = None
        self._outage = False  # the last sweep failed (the database was unreachable)
        self._failures = Failures(log, "sweep")
        self._trust_after = 0.0  # time.monotonic() from which the nodes' heartbeats are current again
        self._resend_before = -math.inf  # a QUEUED job confirmed before this (the database's clock) goes out again

    def failed(self) -> None:
        """A sweep failed (the database was unreachable). Once it answers again, the nodes' heartbeats are stale for
        the longest TTL any node has (nobody could write them), so no node is taken for dead until then; and RabbitMQ
        may have dropped the messages that workers handed back while it was down, so every QUEUED job goes out once
        more."""
        self._outage = True

    def sweep(self) -> dict[str, int]:
        """One sweep (in a thread); returns what it did, by kind. Does nothing when another node sweeps.

        What to hand out again is gathered under the fleet's sweeper lock, and handed out after it is released:
        RabbitMQ may hold sends up (an alarm), and the lock must not wait for it. The hand-offs together wait
        `PUBLISH_TIMEOUT` seconds at most; those confirmed are recorded (`Jobs.published`), counted in
        "republished"."""
        done = {"requeued": 0, "republished": 0, "holds": 0, "expired": 0}
        with sweeping_lock(self.store) as mine:
            if not mine:
                return done
            recovered, self._outage = self._outage, False
            if recovered:
                self._trust_after = time.monotonic() + nodes.longest_ttl(self.store, self.server.node_ttl)
                # each such job once, when a live worker serves its model (then or later): its re-send is recorded
                # as a newer confirmation
                self._resend_before = self.store.now()
            requeued = []
            if time.monotonic() >= self._trust_after:
                live = [n.id for n in nodes.live(self.store, self.server.node_ttl)]
                if self.dispatcher.node is not None:  # this process is alive, whatever its heartbeat's delay
                    live.append(self.dispatcher.node)
                # a run past its claimer's time limit is lost (Celery kills it before); a run from an older
                # release, which set none, is judged by this node's
                requeued = self.jobs.orphaned(live, longest=self.server.timeout + LONGEST_RUN_MARGIN)
            served = self.dispatcher.serving()  # jobs no live node can run would only pile up in their queue
            back = {job_id for job_id, _ in requeued}
            now = self.store.now()
            resend = max(now - self.server.resend_after, self._resend_before)
            pending = self.jobs.unpublished(now - self.server.republish_after, models=served, confirmed_before=resend)
            due = [job for job in pending if job[0] not in back]
            done["holds"] = keys.release_orphan_holds(self.store)
            cleanup = time.monotonic() - self._last_expiry >= self.server.cleanup_interval
            if cleanup:
                self._last_expiry = time.monotonic()
                done["expired"] = self.jobs.expire(self.server.result_ttl)
                nodes.forget_dead(self.store, max(60.0, 10 * self.server.node_ttl))
        sent_at = self.store.now()
        handed = self.hand_out(requeued + due)
        self.jobs.published(sorted(handed), sent_at)
        done["requeued"] = len(requeued)
        done["republished"] = sum(job_id in handed for job_id, _ in due)
        if any(done.values()):
            log.info("sweep: %s", ", ".join(f"{v} {k}" for k, v in done.items() if v))
        if cleanup:
            self.reclaim()
        return done

    def reclaim(self) -> None:
        """Give the database file's free pages back (`Store.reclaim_space`), after the hand-outs: a failure (the
        file locked for longer than its busy timeout) is logged and left to the next cleanup."""
        try:
            if pages := self.store.reclaim_space():
                log.info("sweep: %d free pages of the database file given back to the file system", pages)
        except (sqlite3.Error, SQLAlchemyError) as exc:
            log.warning("sweep: the database file's free space was not given back (%s); the next cleanup tries", exc)

    def hand_out(self, due: list[tuple[str, str | None]]) -> set[str]:
        """Publish the jobs `due` ((id, model) pairs) and wait `PUBLISH_TIMEOUT` seconds at most for them (the
        sends not started by then are dropped); return the ids whose hand-off was confirmed."""
        if not due:
            return set()
        sent = {self.dispatcher.publish(job_id, model): job_id for job_id, model in due}
        finished, late = concurrent.futures.wait(sent, timeout=PUBLISH_TIMEOUT)
        for future in late:
            future.cancel()
        handed = {sent[f] for f in finished if not f.cancelled() and f.exception() is None}
        if len(handed) < len(due):
            failed = next((f.exception() for f in finished if not f.cancelled() and f.exception()), "timed out")
            log.warning("sweep: %d of %d jobs not handed out (%r); a later sweep tries again",
                        len(due) - len(handed), len(due), failed)  # fmt: skip
        return handed

    async def _loop(self) -> None:
        with bounded():  # a frozen database fails a sweep (tried again), never holds it until it thaws
            await self._sweep_while_guarded()
        log.error("another kind of deployment took the database: this node stops sweeping and running jobs")
        await self.dispatcher.stop()

    async def _sweep_while_guarded(self) -> None:
        while True:
            try:
                if self.guard is not None and not await asyncio.to_thread(self.guard.holds):
                    break
                await asyncio.to_thread(self.sweep)
                self._failures.succeeded()
            except Exception as exc:  # noqa: BLE001 (logged by Failures) e.g. the database is down: the next sweep retries
                self._failures.failed(exc)
                if isinstance(exc, SQLAlchemyError):
                    self.failed()
            await asyncio.sleep(min(self.server.sweep_interval, self.server.cleanup_interval))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
