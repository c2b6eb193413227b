"""Where requests run: the dispatcher seam, chosen once at start-up (`make_dispatcher`).

- `LocalDispatcher`: the models live in this process; v1 requests and v2 jobs run in its thread pool (the
  single-process default).
- `automask.server.fleet.CeleryDispatcher` (when `AUTOMASK_BROKER_URL` is set): this process loads no model; every
  request is queued on RabbitMQ to `automask worker` processes, v1 answers come back through Redis.

Routes and the sweeper only use the `Dispatcher` protocol; neither knows which one runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from automask.errors import AutomaskError, ModelNotAvailableError
from automask.pipeline import MaskGenerator
from automask.server import nodes
from automask.server.config import ServerSettings
from automask.server.deployment import SINGLE
from automask.server.execute import Outcome, answer, execute_job
from automask.server.jobs import FAILED, Jobs
from automask.server.nodes import Heartbeat, new_node_id
from automask.server.runner import Runner
from automask.server.schemas import MaskRequest
from automask.server.served import ModelEntry
from automask.server.store import Store
from automask.settings import Settings

log = logging.getLogger("automask.server")

RETRY = "RETRY"
"""`LocalDispatcher._run`'s answer when the database failed it: try the job again later."""
MODEL_RETRY_SECONDS = 5.0
"""How long a job whose model is not available waits before it is looked at again."""
CUT_WAIT = 3.0
"""Seconds the v2 jobs cut off at a stop have to reach their next stage boundary and go back to the queue (within
`automask.server.http.SHUTDOWN_GRACE`); one still running then (a hung model) is left PROCESSING, for the sweeper."""
PUBLISH_TIMEOUT = 5.0
"""Seconds a v2 submit, or a sweep, waits for its jobs' hand-offs (`Dispatcher.publish`) before giving up on them
(the job is stored: a later sweep hands it out again)."""


class Dispatcher(Protocol):
    """Runs requests somewhere."""

    deployment: str
    """The kind of deployment this dispatcher makes of its database (`automask.server.deployment`): claimed at
    start-up, re-read at each sweep."""

    @property
    def default(self) -> str:
        """The public name of the model used when a request names none."""

    async def start(self) -> None:
        """Start taking work (load models, connect, start the in-process job workers)."""

    async def stop(self, deadline: float | None = None) -> None:
        """Stop taking work; jobs running here get until `deadline` (`time.monotonic()`; None: no time) to finish;
        jobs not finished stay in the database and run again elsewhere or later."""

    def drain(self) -> None:
        """Start no more v2 jobs here (a stop signal came): those not started stay QUEUED, for another node or the
        restart; those running go on."""

    def cut(self) -> None:
        """Cut the v2 jobs running here off now (a second stop signal): at their next stage boundary or model layer,
        back to the queue, their attempts not counted."""

    def check(self, model: str | None, targets: Sequence[str] = ()) -> str:
        """The name of the model a request asks for, once it is known to be served and to answer `targets` (the
        request's scored targets, `MaskRequest.targets`) (404 unknown, 503 not available or no served model
        answers a target): cheap, may touch the disk or the database, never loads a model. Call it off the loop."""

    async def prepare(self, model: str) -> None:
        """Have `model` ready to answer before a v1 request's credit is held and its time limit starts: load it
        (no time limit) where requests run in this process; a no-op where workers load their models at start."""

    async def run_v1(self, request: MaskRequest, model: str, request_id: str) -> Outcome:
        """Answer a v1 request (cancelling the call cancels the work: before it starts, or at its next stage
        boundary or model layer). Raises the library's `AutomaskError`s or returns an error `Outcome`."""

    def publish(self, job_id: str, model: str | None) -> Future[None]:
        """Hand stored v2 job `job_id` to whatever runs jobs (at least once; a duplicate is harmless). Never blocks,
        callable from any thread or the event loop: the future is done once the hand-off is sure (RabbitMQ
        confirmed the message), or failed; a caller bounds its wait and may cancel it (a send not started yet is
        dropped)."""

    def serving(self) -> list[str] | None:
        """The models whose jobs something can run now, so that handing them out again is worth it (None: any
        model; the dispatcher looks at a job's model itself when it runs it)."""

    @property
    def node(self) -> str | None:
        """This process's node id when it runs jobs itself (its sweeper never takes them over), else None."""

    def readiness(self) -> str | None:
        """None when requests can be answered now, else why not (public: names models, never paths)."""

    def models(self) -> list[ModelEntry]:
        """The models requests may name, the default first."""


class LocalDispatcher:
    """Models in this process, a bounded thread pool (`Runner`), and `workers_for_jobs` asyncio tasks that run
    v2 jobs by id. This process is a node of kind "server": its heartbeat lets the sweeper of another process
    (sharing a PostgreSQL database) take over its jobs if it dies."""

    deployment = SINGLE

    def __init__(
        self, settings: Settings, server: ServerSettings, store: Store, jobs: Jobs, generator: MaskGenerator | None
    ) -> None:
        self.server = server
        self.store = store
        self.jobs = jobs
        self.runner = Runner(settings, server, generator)
        self.default = self.runner.default
        self.node = new_node_id("server")
        self._queue: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self._held: set[str] = set()
        """Ids of the jobs this process has in hand (queued, running, or parked): a publish of one is a no-op."""
        self._parked: dict[str | None, set[str]] = {}
        """Jobs waiting for their model to become available, by model; one watcher per model looks again."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat: Heartbeat | None = None
        self._threads = ThreadPoolExecutor(server.workers_for_jobs, thread_name_prefix="automask-job")
        self._running: set[Future[str | None]] = set()
        """The job runs in `_threads` (each until it ends: a stop waits for them)."""
        self._draining = False
        """True from a stop signal on: no job starts any more (`drain`)."""
        self._cut = False
        """True once a stop's time is up: the runs still going stop and put their jobs back in the queue. Plain
        flags, not `threading.Event`s: `drain` and `cut` run in a signal handler, which could interrupt an
        `Event.set` on the same thread and then wait for its lock for ever."""

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.runner.start_loading()
        self._heartbeat = Heartbeat(
            self.store,
            self.node,
            "server",
            [self.default],
            self.default,
            interval=self.server.beat,
            dead_after=self.server.node_ttl,
        )
        await asyncio.to_thread(self._heartbeat.start)
        for job_id, model in await asyncio.to_thread(self.jobs.queued, limit=self.server.max_queued):
            self._enqueue(job_id, model)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.server.workers_for_jobs)]

    async def stop(self, deadline: float | None = None) -> None:
        """No job starts any more (one still waiting for an inference thread goes back to the queue); those running
        get until `deadline` to finish, then are cut off (`CUT_WAIT`)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.runner.close()
        await self._finish_runs(deadline)
        if self._heartbeat is not None:
            await asyncio.to_thread(self._heartbeat.stop)
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _finish_runs(self, deadline: float | None) -> None:
        """Wait for the job runs in progress until `deadline`; then cut those left off and wait `CUT_WAIT` for them."""
        running = [asyncio.wrap_future(run) for run in list(self._running)]
        left = 0.0 if deadline is None else deadline - time.monotonic()
        if running and left > 0:
            log.info("stopping: waiting up to %.0f s for %d running v2 job(s) to finish", left, len(running))
            _, late = await asyncio.wait(running, timeout=left)
            running = list(late)
        if running:
            log.warning(
                "stopping: %d v2 job(s) still running are cut off; they run again after the restart", len(running)
            )
            self._cut = True
            await asyncio.wait(running, timeout=CUT_WAIT)

    def drain(self) -> None:
        self._draining = True

    def cut(self) -> None:
        self._cut = True

    def _is_cut(self) -> bool:
        return self._cut

    def check(self, model: str | None, targets: Sequence[str] = ()) -> str:
        return self.runner.check(model, targets)

    async def prepare(self, model: str) -> None:
        await self.runner.load(model)

    async def run_v1(self, request: MaskRequest, model: str, request_id: str) -> Outcome:
        result, _ = await self.runner.run(request.image, request.prompt, request.options(), model)
        return await asyncio.to_thread(answer, result, request, model)

    def publish(self, job_id: str, model: str | None) -> Future[None]:
        """Queue the job in memory: done at once, and confirmed as it is (nothing is lost between the route and
        this queue but by a crash, after which `start` queues every QUEUED job). A job this process has in hand
        is not queued twice."""
        handed: Future[None] = Future()
        try:
            if self._loop is not None:  # else not started: `start` enqueues every QUEUED job
                self._loop.call_soon_threadsafe(self._enqueue, job_id, model)
        except RuntimeError as exc:  # the loop is closed: the server stopped
            handed.set_exception(exc)
        else:
            handed.set_result(None)
        return handed

    def _enqueue(self, job_id: str, model: str | None) -> None:
        """Queue a job unless this process already has it in hand (the sweeper re-publishes QUEUED jobs)."""
        if job_id not in self._held:
            self._held.add(job_id)
            self._queue.put_nowait((job_id, model))

    def serving(self) -> list[str] | None:
        return None  # `_work` checks each job's model and retries it in memory while it is not available

    def readiness(self) -> str | None:
        if self.runner.ready:
            return None
        return self.runner.error.message if self.runner.error else "The model is still loading."

    def models(self) -> list[ModelEntry]:
        return self.runner.models()

    async def _work(self) -> None:
        while True:
            job_id, model = await self._queue.get()
            try:
                status = await self._run(job_id, model)
            except Exception:  # the database failed us: the job stays where it was (PROCESSING: `orphaned` recovers it)
                log.exception("could not run v2 job %s; it will be retried", job_id)
                status = RETRY
            if status == "QUEUED":  # its model is not available (yet): the job waits, QUEUED, for it to be
                self._park(job_id, model)
            elif status == RETRY:  # the database failed us: the job stays in hand and is tried again
                asyncio.get_running_loop().call_later(MODEL_RETRY_SECONDS, self._queue.put_nowait, (job_id, model))
            else:
                self._held.discard(job_id)

    async def _run(self, job_id: str, model: str | None) -> str | None:
        """Run one job; "QUEUED" when its model is not available (the job stays QUEUED). Raises the database's
        errors (claiming, completing, failing it: a statement's bound fired on a frozen server, ...)."""
        try:
            await asyncio.to_thread(self.runner.check, model)
        except ModelNotAvailableError:
            return "QUEUED"
        except AutomaskError as exc:  # e.g. a model this server no longer has
            await asyncio.to_thread(self.jobs.fail, job_id, exc.message)
            return FAILED
        if self._draining or self._cut:  # stopping: the job stays QUEUED, out of this node's hands
            return None
        run = self._threads.submit(
            execute_job,
            self.jobs,
            self.runner,
            job_id,
            self.node,
            max_attempts=self.server.max_job_attempts,
            timeout=self.server.timeout,
            cut=self._is_cut,
        )
        self._running.add(run)
        run.add_done_callback(self._running.discard)
        # a stop cancels the wait, not a run in progress (`_finish_runs` waits for it)
        return await asyncio.wrap_future(run)

    def _park(self, job_id: str, model: str | None) -> None:
        waiting = self._parked.setdefault(model, set())
        if not waiting:
            watcher = asyncio.create_task(self._watch(model))
            self._tasks.append(watcher)
            watcher.add_done_callback(self._tasks.remove)
        waiting.add(job_id)

    async def _watch(self, model: str | None) -> None:
        """Look at `model` every `MODEL_RETRY_SECONDS` until it is available, then queue its parked jobs."""
        while True:
            await asyncio.sleep(MODEL_RETRY_SECONDS)
            try:
                await asyncio.to_thread(self.runner.check, model)
            except ModelNotAvailableError:
                continue
            except AutomaskError:
                pass  # each job fails with this error when it is run
            break
        for job_id in self._parked.pop(model, set()):
            self._queue.put_nowait((job_id, model))


def make_dispatcher(
    settings: Settings, server: ServerSettings, store: Store, jobs: Jobs, generator: MaskGenerator | None
) -> Dispatcher:
    """The in-process pool, or Celery workers when `settings.broker_url` is set: chosen once, here. An in-process
    pool on a database that live Celery workers use is refused (`ServiceConfigError`): it would take their jobs."""
    if settings.broker_url:
        from automask.server.broker_check import broker_connection
        from automask.server.fleet import CeleryDispatcher

        broker_connection(settings.broker_url).release()  # unreadable: refuse to start, naming the setting
        return CeleryDispatcher(settings, server, store)
    nodes.refuse_mixed(store, "worker")
    return LocalDispatcher(settings, server, store, jobs, generator)
