"""Nodes that run jobs announce themselves in the database: which models they serve, and a heartbeat.

A node silent for longer than its own `node_ttl` (stored with it: `dead_after`) is dead: the sweeper hands its
PROCESSING jobs to others, and API nodes stop counting its models as served. Every node judges every other by the
other's setting, never its own (a row without one, from an older release, is judged by the reader's `ttl`).
Servers running jobs in-process (kind "server") and Celery workers ("worker") both register; a node removes its
row when it stops cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, delete, func, insert, select, update
from sqlalchemy.exc import TimeoutError as SQLTimeoutError

from automask.errors import ServiceConfigError
from automask.server.bounded import DEADLINE_FLOOR, bounded, current_bound
from automask.server.logs import Failures
from automask.server.store import Store, nodes_table

log = logging.getLogger("automask.server")
N = nodes_table.c
UNREGISTER_TIMEOUT = 5.0
"""Seconds a node that stops waits for the database to remove its row (`Heartbeat.stop`), a registration of its own in
progress first: past them it stops all the same, and is taken for dead once its TTL has passed (a registration still
in progress removes the row it makes itself). Before, a frozen database held a stopping worker's pool process (and so
the worker's warm shutdown) until it thawed."""
STOP_WAIT = 5.0
"""Seconds a node that stops waits for its heartbeat thread's beat in progress to end (`Heartbeat.stop`)."""


def new_node_id(kind: str) -> str:
    """A node id that says where it runs: `<kind>-<host>-<pid>-<random>`."""
    return f"{kind}-{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Node:
    """A live node as the database last heard of it."""

    id: str
    kind: str
    models: list[str]
    default_model: str | None
    heartbeat_at: float


def register(
    store: Store, node_id: str, kind: str, models: list[str], default_model: str | None, dead_after: float
) -> None:
    """Announce node `node_id` (or refresh what it serves), dead once silent for `dead_after` seconds."""
    now = store.now()
    with store.transaction() as conn:
        conn.execute(delete(nodes_table).where(N.id == node_id))
        conn.execute(
            insert(nodes_table).values(
                id=node_id,
                kind=kind,
                models=json.dumps(models),
                default_model=default_model,
                started_at=now,
                heartbeat_at=now,
                dead_after=dead_after,
            )
        )


def heartbeat(store: Store, node_id: str) -> bool:
    """Refresh the node's heartbeat; False when its row is gone (the sweeper declared it dead)."""
    with store.transaction() as conn:
        return conn.execute(update(nodes_table).where(N.id == node_id).values(heartbeat_at=store.now())).rowcount == 1


def unregister(store: Store, node_id: str) -> None:
    """Remove the node (a clean stop)."""
    with store.transaction() as conn:
        conn.execute(delete(nodes_table).where(N.id == node_id))


def alive(now: float, ttl: float) -> ColumnElement[bool]:
    """SQL: the node of the row was heard from within its own `dead_after` seconds of `now` (else `ttl`)."""
    return N.heartbeat_at >= now - func.coalesce(N.dead_after, ttl)


def live(store: Store, ttl: float) -> list[Node]:
    """Nodes heard from within their own TTL (`ttl` for a row that has none)."""
    with store.read() as conn:
        rows = conn.execute(select(nodes_table).where(alive(store.now(), ttl))).all()
    return [Node(r.id, r.kind, json.loads(r.models), r.default_model, r.heartbeat_at) for r in rows]


def longest_ttl(store: Store, ttl: float) -> float:
    """The longest TTL of any node in the table (`ttl` when none is longer)."""
    with store.read() as conn:
        longest = conn.execute(select(func.max(N.dead_after))).scalar()
    return max(ttl, float(longest or 0.0))


def forget_dead(store: Store, ttl: float) -> int:
    """Delete nodes silent for more than `ttl` seconds and ten times their own TTL; return how many."""
    now = store.now()
    silent = (N.heartbeat_at < now - ttl) & (N.heartbeat_at < now - 10 * func.coalesce(N.dead_after, 0.0))
    with store.transaction() as conn:
        return int(conn.execute(delete(nodes_table).where(silent)).rowcount)


def refuse_mixed(store: Store, other: str) -> None:
    """Raise `ServiceConfigError` if nodes of kind `other` share `store`, alive or recently dead (a killed node's row
    stays until `forget_dead`; a stopped one removes it): an API node with models in-process ("server") and Celery
    workers ("worker") would each take the other's queued jobs (and fail those of models they do not have). One
    database serves one kind of deployment."""
    with store.read() as conn:
        found = list(conn.execute(select(N.id).where(N.kind == other).order_by(N.heartbeat_at.desc())).scalars())
    if not found:
        return
    if other == "worker":
        fix = (
            "this database is used by a fleet of Celery workers; start API nodes with the same AUTOMASK_BROKER_URL "
            "and AUTOMASK_REDIS_URL as the others"
        )
    else:
        fix = (
            "this database is used by a server that runs its models in-process (no AUTOMASK_BROKER_URL); stop it, or "
            "give it the fleet's AUTOMASK_BROKER_URL and AUTOMASK_REDIS_URL, before starting workers"
        )
    raise ServiceConfigError(f"Refusing to start: {fix} (nodes: {', '.join(found[:3])}).")


class Heartbeat:
    """A daemon thread that keeps node `node_id` alive every `interval` seconds (re-registering if it was
    declared dead after a long pause), until `stop()`, which removes the node. The node is alive as long as the
    process that started the thread: a killed process stops beating. `watch` (None: nothing) is called after each
    beat, in that thread: a check the node repeats as long as it lives (a worker's deployment guard). A node whose
    first registration failed (`start(retry=True)`) is registered by the next beat that reaches the database, or
    by `register` (`registered` says whether it was).

    A registration (the start's, a beat's, a task's) and the removal at `stop` take turns (`_registering`): none
    registers once the node stops, and one still in progress when `stop` gave up waiting for it removes the row it
    made, so a stopped node is not counted alive until its TTL."""

    def __init__(
        self,
        store: Store,
        node_id: str,
        kind: str,
        models: list[str],
        default: str | None,
        *,
        interval: float,
        dead_after: float,
        watch: Callable[[], None] | None = None,
    ) -> None:
        self.store, self.node_id, self.kind, self.models, self.default = store, node_id, kind, models, default
        self.interval, self.dead_after, self.watch = interval, dead_after, watch
        self.registered = False
        self._stop = threading.Event()
        self._registering = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="automask-heartbeat", daemon=True)
        self._failures = Failures(log, "node heartbeat")

    def start(self, *, retry: bool = False) -> None:
        """Register the node (raising the database's errors), then beat. `retry`: a registration that fails is
        logged instead, and tried again at each beat until one succeeds (or `register` does)."""
        try:
            self.register()
        except Exception as exc:
            if not retry:
                raise
            self._failures.failed(exc)
        self._thread.start()

    def register(self, *, again: bool = False) -> None:
        """Register the node unless it is registered already (`again`: its row is gone, register it anew) or stopped
        (raises the database's errors). A registration the beat has in progress is waited for as long as this
        thread's bound on the database (`bounded`) allows, if any. One that ends after `stop` removes its row."""
        bound = current_bound()
        if not self._registering.acquire(timeout=-1 if bound is None else bound):
            raise SQLTimeoutError(f"node {self.node_id}: its registration in progress did not end within {bound:g} s")
        try:
            if (again or not self.registered) and not self._stop.is_set():
                register(self.store, self.node_id, self.kind, self.models, self.default, self.dead_after)
                self.registered = True
                if self._stop.is_set():  # stopped meanwhile, its removal perhaps done already: undo this one
                    self._unregister()
        finally:
            self._registering.release()

    def _unregister(self) -> None:
        """Remove the node's row (with `_registering` held)."""
        unregister(self.store, self.node_id)
        self.registered = False

    def _run(self) -> None:
        with bounded():  # a frozen database fails a beat (tried again), never holds the thread until it thaws
            self._beat_until_stopped()

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.registered:
                    self.register()
                elif not heartbeat(self.store, self.node_id):
                    self.register(again=True)
                if self.watch is not None:
                    self.watch()
                self._failures.succeeded()
            except Exception as exc:  # noqa: BLE001 (logged by Failures) the database is briefly down: the next beat retries
                self._failures.failed(exc)

    def stop(self) -> None:
        """Stop beating and remove the node, `STOP_WAIT` + `UNREGISTER_TIMEOUT` seconds at most: a registration in
        progress is waited for first (one that takes longer removes its row itself once it ends)."""
        self._stop.set()
        if not self._thread.is_alive():
            return  # never started
        self._thread.join(timeout=STOP_WAIT)
        deadline = time.monotonic() + UNREGISTER_TIMEOUT
        if not self._registering.acquire(timeout=UNREGISTER_TIMEOUT):
            log.warning("node %s: a registration in progress removes the node once it ends", self.node_id)
            return
        try:  # a frozen database holds no stopping process (its node dies by its TTL)
            with bounded(max(DEADLINE_FLOOR, deadline - time.monotonic())):
                self._unregister()
        except Exception:
            log.warning("could not unregister node %s", self.node_id, exc_info=True)
        finally:
            self._registering.release()
