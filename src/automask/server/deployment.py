"""One database serves one kind of deployment, never both: a single server running its models in-process (`single`:
`LocalDispatcher`) or a fleet of API nodes and Celery workers (`fleet`: `CeleryDispatcher`, `automask worker`).
Sharing one, each would take the other's queued jobs and fail those of models it does not have.

The kind is recorded in the database (the `settings` row `deployment`). Every server and worker claims it at
start-up (`Guard.claim`, with the kind its dispatcher makes): it is written if absent, and a database of the other
kind is refused with a `ServiceConfigError` naming the fix. A running server re-reads it at every sweep
(`Guard.holds`): once another kind has taken the database (`automask db deployment KIND --force`), the node stops
sweeping and running jobs, and answers 503 with `Guard.refusal`, /readyz included. A worker's pool processes re-read
it at every heartbeat: once a single server has taken the database, the worker stops taking tasks and shuts down
(`automask.server.worker`).
"""

from __future__ import annotations

import logging

from sqlalchemy import insert, select, update

from automask.errors import ServiceConfigError
from automask.server.store import Store, settings_table

log = logging.getLogger("automask.server")
S = settings_table.c

SINGLE = "single"
"""One server (`automask serve` without AUTOMASK_BROKER_URL) running its models in-process."""
FLEET = "fleet"
"""API nodes with AUTOMASK_BROKER_URL, and `automask worker` processes."""
KINDS = (SINGLE, FLEET)
ROW = "deployment"
"""The `settings` row that holds the kind."""
DESCRIPTION = {
    SINGLE: "a single server that runs its models in-process (no AUTOMASK_BROKER_URL)",
    FLEET: "a fleet (API nodes with AUTOMASK_BROKER_URL, and automask worker processes)",
}


def current(store: Store) -> str | None:
    """The kind of deployment `store` serves, or None while none has been recorded."""
    with store.read() as conn:
        value = conn.execute(select(S.value).where(S.name == ROW)).scalar()
    return None if value is None else str(value)


def record(store: Store, kind: str, *, force: bool = False) -> str | None:
    """Record `kind` as the deployment `store` serves when none is, or when `force`; a different kind already
    recorded is left as it is otherwise. Returns the kind recorded before (None: none)."""
    if kind not in KINDS:
        raise ValueError(f"unknown deployment kind {kind!r}")
    with store.transaction() as conn:
        store.lock(conn, "settings." + ROW)  # two nodes starting at once: one inserts, the other reads it
        value = conn.execute(select(S.value).where(S.name == ROW)).scalar()
        before = None if value is None else str(value)
        if before == kind or (before is not None and not force):
            return before
        row = {"value": kind, "updated_at": store.now()}
        if before is None:
            conn.execute(insert(settings_table).values(name=ROW, **row))
        else:
            conn.execute(update(settings_table).where(S.name == ROW).values(**row))
    return before


class Guard:
    """A node's claim that its database serves `kind` of deployment: `claim` at start-up, `holds` at each sweep (a
    server) or heartbeat (a worker's pool process). `refusal` is None while it holds, then for good the message of
    a node whose database another kind took: a server's 503, or the reason a `worker` stops taking tasks."""

    def __init__(self, store: Store, kind: str, *, worker: bool = False) -> None:
        self.store, self.kind, self.worker = store, kind, worker
        self.refusal: str | None = None

    def claim(self) -> None:
        """Record this node's kind if none is; `ServiceConfigError` (naming the fix) if the other kind is."""
        found = record(self.store, self.kind)
        if found is not None and found != self.kind:
            raise ServiceConfigError(start_refusal(self.store, self.kind, found))

    def holds(self) -> bool:
        """Read the database's kind again; False once it is another (this node must stop serving: `refusal`).
        Raises the database's errors (a sweep that failed)."""
        if self.refusal is None:
            found = current(self.store)
            if found is not None and found != self.kind:
                self.refusal = (worker_refusal if self.worker else server_refusal)(found)
                log.error("the database %s now serves %s: %s", self.store.describe(), DESCRIPTION[found], self.refusal)
        return self.refusal is None


def server_refusal(found: str) -> str:
    """The 503 of a server whose database now serves `found`."""
    return (
        f"This server no longer serves requests: its database was switched to {DESCRIPTION[found]}. "
        f"Restart it configured as one, or point it at another database (AUTOMASK_DATABASE_URL)."
    )


def worker_refusal(found: str) -> str:
    """Why a running worker stops taking tasks once its database serves `found`, and what to do."""
    return (
        f"This worker stops taking tasks: its database was switched to {DESCRIPTION[found]}. Point the fleet at "
        "another database (AUTOMASK_DATABASE_URL); if the switch was a mistake, stop that server, then run: "
        "automask db deployment fleet --force"
    )


def start_refusal(store: Store, kind: str, found: str) -> str:
    """Why a node of `kind` may not start on `store`, which serves `found`, and what to do instead."""
    head = f"Refusing to start: the database {store.describe()} serves {DESCRIPTION[found]}"
    if kind == SINGLE:
        return (
            f"{head}, and this server runs its models in-process. Start it with the fleet's AUTOMASK_BROKER_URL and "
            "AUTOMASK_REDIS_URL, or point it at another database (AUTOMASK_DATABASE_URL); if the fleet is gone for "
            "good, run: automask db deployment single --force"
        )
    return (
        f"{head}, and this node is part of a fleet. Stop that server, then run: automask db deployment fleet "
        "--force; or point the fleet at another database (AUTOMASK_DATABASE_URL)."
    )
