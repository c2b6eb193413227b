"""Prometheus metrics (`automask serve|worker --metrics-port`): off unless asked for, then served by a listener of
their own (`listen`), never on the API's port.

The recording functions below cost nothing while metrics are off (`enable` was not called). Every label is bounded:
route templates (never a raw path), methods, status codes, model names (never a path), outcomes, limits; never a
key, prompt, client address or file name. A worker's pool process (`forward_to`) sends its records to the worker's
main process (`Inbox`), which serves them: a run is counted where it finishes, in whichever process serves metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from automask.errors import EmptyMaskError, StoppedError

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from automask.server.bodies import BodyBudget
    from automask.server.metrics_http import Listener
    from automask.server.store import Store

log = logging.getLogger("automask.server.metrics")

OUTCOMES = ("ok", "empty", "error", "stopped")
"""How a mask run ended: a result; `stop_on_empty_mask` and nothing found; an error (a bad image, a failed fetch, a
bug); told to stop (its client left, its job was cancelled, or its time limit passed)."""
JOB_STATUSES = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""HTTP methods counted by name; any other is counted as "other" (a client chooses the method)."""
DB_TIMEOUT = 2.0
"""Seconds a scrape waits for the database's job counts; past it (or on an error) `automask_metrics_db_up` is 0."""
UNMATCHED = "unmatched"
"""The route label of a request no route matched (a 404 for an unknown path)."""
_DURATIONS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RUN_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class _Metrics:
    """The metric objects, in a registry of their own (`registry`) with the client's standard process and Python
    collectors, and the scrape-time gauges (`state`)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        from automask import __version__

        self.registry = r = prom.CollectorRegistry()
        prom.ProcessCollector(registry=r)  # process_* (memory, CPU, open file descriptors)
        prom.PlatformCollector(registry=r)  # python_info
        prom.GCCollector(registry=r)  # python_gc_*
        prom.Info("automask_build", "The automask release this process runs.", registry=r).info(
            {"version": __version__}
        )
        self.requests = prom.Counter(
            "automask_http_requests", "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "code"], registry=r,
        )  # fmt: skip
        self.duration = prom.Histogram(
            "automask_http_request_duration_seconds", "Seconds from a request's arrival to its answer, by route.",
            ["route"], buckets=_DURATIONS, registry=r,
        )  # fmt: skip
        self.in_flight = prom.Gauge("automask_http_requests_in_flight", "HTTP requests being answered now.", registry=r)
        self.runs = prom.Counter(
            "automask_mask_runs", "Mask runs finished in this process (or its worker pool), by model and outcome "
            "(ok, empty, error, stopped).", ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.run_seconds = prom.Histogram(
            "automask_mask_run_seconds", "Seconds a mask run took (model loaded), by model.", ["model"],
            buckets=_RUN_SECONDS, registry=r,
        )  # fmt: skip
        self.credits = prom.Counter(
            "automask_credits_charged", "Credits charged (successful keyed requests).", registry=r
        )
        self.rate_limited = prom.Counter(
            "automask_rate_limited", "Requests answered 429, by the limit that refused them (requests, polls, "
            "failed_auth, queued_jobs).", ["limit"], registry=r,
        )  # fmt: skip
        self.auth_failures = prom.Counter(
            "automask_auth_failures", "Failed authentications (missing, unknown or revoked key), by status code.",
            ["code"], registry=r,
        )  # fmt: skip
        self.lost = prom.Counter(
            "automask_worker_pool_processes_lost", "Worker pool processes that died during a task (killed: a signal, "
            "the OOM killer, a crash), were killed by Celery at a task's hard time limit (time_limit), or left after "
            "one because their model hung (hung).", ["reason"], registry=r,
        )  # fmt: skip
        self.state = _StateCollector()
        r.register(self.state)


_live: _Metrics | None = None
_sink: _Sink | None = None


def enable() -> None:
    """Turn recording on in this process (idempotent). Needs the `prometheus_client` package (the server extra)."""
    global _live
    if _live is None:
        from automask.errors import require

        require("prometheus_client", "server")
        import prometheus_client

        prometheus_client.disable_created_metrics()  # no *_created series: one per counter and label set, unused
        _live = _Metrics()


def enabled() -> bool:
    """Whether this process records metrics (`enable`)."""
    return _live is not None


def _apply_request(m: _Metrics, route: str, method: str, code: str, seconds: float) -> None:
    m.requests.labels(route, method, code).inc()
    m.duration.labels(route).observe(seconds)
    m.in_flight.dec()


def _apply_run(m: _Metrics, model: str, outcome: str, seconds: float) -> None:
    m.runs.labels(model, outcome).inc()
    m.run_seconds.labels(model).observe(seconds)


_APPLY: dict[str, Callable[..., None]] = {
    "started": lambda m: m.in_flight.inc(),
    "request": _apply_request,
    "run": _apply_run,
    "credit": lambda m: m.credits.inc(),
    "limited": lambda m, limit: m.rate_limited.labels(limit).inc(),
    "auth": lambda m, code: m.auth_failures.labels(code).inc(),
    "lost": lambda m, reason: m.lost.labels(reason).inc(),
}
"""What each record does; a record forwarded by a pool process (`Inbox`) can do nothing else."""


def _record(name: str, *args: Any) -> None:
    if _sink is not None:
        _sink.send(name, args)
    elif _live is not None:
        _APPLY[name](_live, *args)


def request_started() -> None:
    """A request arrived (the in-flight gauge); `request_done` ends it."""
    _record("started")


def request_done(
    scope: MutableMapping[str, Any], status: int, seconds: float, routes: Iterable[BaseRoute] = ()
) -> None:
    """Count a request answered with `status` after `seconds`: its route's template, its method (`METHODS`, else
    "other") and its status code. The template is that of the route the router matched; for a request answered
    before the router saw it (a 413 by Content-Length), that of the first of `routes` its path matches;
    `UNMATCHED` for none."""
    if _sink is None and _live is None:
        return
    path = getattr(scope.get("route"), "path", None)
    route = path if isinstance(path, str) else _template(scope, routes)
    method = scope.get("method", "")
    _record("request", route, method if method in METHODS else "other", str(status), seconds)


def _template(scope: MutableMapping[str, Any], routes: Iterable[BaseRoute]) -> str:
    """The path template of the first of `routes` that matches `scope` fully, else of the first that matches its
    path but not its method; `UNMATCHED` for none."""
    from starlette.routing import Match

    partial = None
    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return path
        if match is Match.PARTIAL and partial is None:
            partial = path
    return partial or UNMATCHED


@contextlib.contextmanager
def run(model: str) -> Iterator[None]:
    """Count the run inside the block, of model `model` (a public name), by how it ends (`OUTCOMES`), and time it."""
    start, outcome = time.perf_counter(), "error"
    try:
        yield
        outcome = "ok"
    except EmptyMaskError:
        outcome = "empty"
        raise
    except StoppedError:
        outcome = "stopped"
        raise
    finally:
        _record("run", model, outcome, time.perf_counter() - start)


def credit_charged() -> None:
    """One credit was kept: a keyed request succeeded (its hold settled as charged)."""
    _record("credit")


def rate_limited(limit: str) -> None:
    """A request was answered 429 by `limit` (requests, polls, failed_auth, queued_jobs)."""
    _record("limited", limit)


def auth_failed(status: int) -> None:
    """An authentication failed (401: missing or unknown key; 403: revoked)."""
    _record("auth", str(status))


def pool_process_lost(reason: str) -> None:
    """A worker's pool process died during a task (`killed`), was killed at a task's hard time limit (`time_limit`), or
    left after one because its model hung (`hung`)."""
    _record("lost", reason)


def watch(store: Store, bodies: BodyBudget | None = None) -> Callable[[], None]:
    """Report, at each scrape, the v2 jobs in `store` by status (the whole fleet's) and the request bodies `bodies`
    holds; returns what stops it. A no-op while metrics are off. The latest watched pair is the one reported."""
    if _live is None:
        return lambda: None
    state, source = _live.state, (store, bodies)
    state.sources.append(source)
    return lambda: state.sources.remove(source)


def listen(host: str, port: int) -> Listener:
    """Turn recording on and serve it at `http://HOST:PORT/metrics` from a daemon thread (port 0: a free port;
    connections bounded in number and idle time, `metrics_http`); returns the listener (its `url`; `close()` frees the
    port). `ServiceConfigError` saying what to change when the address cannot be had."""
    from automask.server.errors import cannot_listen
    from automask.server.metrics_http import Listener, serve

    enable()
    assert _live is not None
    try:
        httpd = serve(_live.registry, host, port)
    except OSError as exc:
        raise cannot_listen(host, port, exc, "--metrics-host", "--metrics-port") from None
    # a forked child (a worker's pool process) leaves the port alone: one that outlived this process would hold it
    os.register_at_fork(after_in_child=httpd.socket.close)
    return Listener(httpd)


class _StateCollector:
    """The gauges read at scrape time: v2 jobs by status from the database (bounded by `DB_TIMEOUT`, read in a thread
    of its own, one read at a time; `automask_metrics_db_up` 0 instead when it fails or is slow), and the request
    body memory in use."""

    def __init__(self) -> None:
        self.sources: list[tuple[Store, BodyBudget | None]] = []
        self._lock = threading.Lock()  # each scrape runs in a thread of its own (two Prometheus servers: at once)
        self._pending: Future[dict[str, int]] | None = None
        self._started = 0.0

    def describe(self) -> list[Any]:
        return []  # nothing read at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            store, bodies = self.sources[-1]
        except IndexError:  # nothing watched (yet, or any more)
            return
        counts = self._counts(store)
        yield GaugeMetricFamily(
            "automask_metrics_db_up", "1 when this scrape read the job counts from the database, else 0.",
            value=int(counts is not None),
        )  # fmt: skip
        jobs = GaugeMetricFamily(
            "automask_v2_jobs", "v2 jobs in the database (the whole fleet's), by status.", labels=["status"]
        )
        for status in JOB_STATUSES if counts is not None else ():
            jobs.add_metric([status], (counts or {}).get(status, 0))
        yield jobs
        if bodies is not None:
            yield GaugeMetricFamily(
                "automask_body_memory_bytes", "Bytes of request bodies held in memory now (--body-memory).",
                value=bodies.used,
            )  # fmt: skip
            yield GaugeMetricFamily(
                "automask_body_memory_limit_bytes", "The request body memory budget (--body-memory).",
                value=bodies.capacity,
            )  # fmt: skip

    def _counts(self, store: Store) -> dict[str, int] | None:
        with self._lock:
            pending = self._pending
            if pending is None or pending.done():
                self._pending = pending = Future[dict[str, int]]()
                self._started = time.monotonic()
                # a daemon thread: a read stuck on a dead database never holds up the process's exit
                reader = threading.Thread(
                    target=_job_counts, args=(store, pending), name="automask-metrics", daemon=True
                )
                reader.start()
            # else a read is under way (another scrape's): wait for it, never pile up threads behind a dead database
            left = self._started + DB_TIMEOUT - time.monotonic()
        try:
            return pending.result(timeout=max(left, 0.0))
        except FutureTimeout:
            log.warning("metrics: the database did not give the job counts within %g s", DB_TIMEOUT)
            return None
        except Exception as exc:  # noqa: BLE001 - whatever failed the read, the scrape answers (db_up 0)
            log.warning("metrics: could not read the job counts from the database: %s", exc)
            return None


def _job_counts(store: Store, into: Future[dict[str, int]]) -> None:
    """The number of v2 jobs by status in `store`, set as `into`'s result (or its exception)."""
    from sqlalchemy import func, select

    from automask.server.store import jobs_table

    status = jobs_table.c.status
    try:
        with store.read() as conn:
            rows = conn.execute(select(status, func.count()).group_by(status)).all()
    except BaseException as exc:  # noqa: BLE001 - the scrape gets it through the future
        into.set_exception(exc)
    else:
        into.set_result({str(row[0]): int(row[1]) for row in rows})


class _Sink:
    """A pool process's end of the `Inbox`: each record one datagram, never blocking; dropped if it cannot go."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def send(self, name: str, args: tuple[Any, ...]) -> None:
        try:
            self.sock.sendto(json.dumps([name, list(args)]).encode(), self.path)
        except OSError as exc:
            log.debug("metrics: a record was dropped: %s", exc)


def forward_to(path: str) -> None:
    """From now on, send this process's records to the `Inbox` at `path` (a worker's pool process)."""
    global _sink
    _sink = _Sink(path)


_SOCKET_PATH_MAX = 107
"""The longest Unix socket path Linux binds (sun_path is 108 bytes with its terminating NUL)."""


class Inbox:
    """Where a worker's pool processes send their records (`forward_to(inbox.path)`): a Unix datagram socket in a
    private temporary folder, read by a daemon thread that records each as if it happened here. A datagram is
    whole or absent, so a pool process killed mid-send corrupts nothing."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="automask-metrics-")  # 0700: only this user can send
        if len(os.path.join(self._dir, "inbox").encode()) > _SOCKET_PATH_MAX:  # a long TMPDIR: /tmp instead
            os.rmdir(self._dir)
            self._dir = tempfile.mkdtemp(prefix="automask-metrics-", dir="/tmp")
        self.path = os.path.join(self._dir, "inbox")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        threading.Thread(target=self._read, name="automask-metrics-inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:  # closed
                return
            try:
                name, args = json.loads(data)
                if _live is not None:
                    _APPLY[name](_live, *args)
            except Exception as exc:  # noqa: BLE001 - (a RecursionError, an OverflowError...) the thread reads on
                log.warning("metrics: a malformed record from a pool process was ignored: %.200r", exc)

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)
