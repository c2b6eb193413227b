"""/readyz's look at the database: whether it answers now, asked once however many probes arrive at once."""

from __future__ import annotations

import asyncio
import logging

from automask.server.bounded import bounded
from automask.server.logs import Outage, one_line
from automask.server.store import Store

log = logging.getLogger("automask.server")

DB_PING_TIMEOUT = 2.0
"""Seconds the database has to answer a /readyz probe's `SELECT 1` before the node counts as not ready."""

DB_DOWN = (
    "The database (AUTOMASK_DATABASE_URL) does not answer: requests are refused (503) until it answers again; the "
    "server log has the details."
)
"""The /readyz reason while the database does not answer (public: no address)."""


class DatabaseProbe:
    """Whether `store` answers a query now, for /readyz: never a cached answer (a load balancer must stop sending
    at once when the database dies), but one query at a time: the probes that arrive while one is on its way share
    its answer, so frequent or concurrent polling costs one `SELECT 1` at a time and one thread at most, also while
    a frozen database leaves that query hanging. The log has one line when the database stops answering (with why)
    and one when it answers again, not one per probe."""

    def __init__(self, store: Store, timeout: float = DB_PING_TIMEOUT) -> None:
        self.store, self.timeout = store, timeout
        self._asking: asyncio.Future[str | None] | None = None
        self._outage = Outage(log, f"the database {store.describe()}")

    async def unreachable(self) -> str | None:
        """None when the database answers within `timeout` seconds, else why not (`DB_DOWN`)."""
        asking = self._asking
        if asking is None or asking.done() or asking.get_loop() is not asyncio.get_running_loop():
            asking = self._asking = asyncio.ensure_future(asyncio.to_thread(self._ping))
        try:
            error = await asyncio.wait_for(asyncio.shield(asking), self.timeout)
        except asyncio.TimeoutError:  # 3.10: not the built-in TimeoutError (one class from 3.11)
            error = f"no answer within {self.timeout:g} s"
        if error is None:
            self._outage.answered()
            return None
        self._outage.failed(error)
        return DB_DOWN

    def _ping(self) -> str | None:
        """`store.ping_error()`; the exception's text when it raises (a driver's own error, not SQLAlchemy's): never
        an exception for the probes sharing it."""
        try:
            with bounded():  # a frozen database: the thread comes back (the probes answered 503 long before)
                return self.store.ping_error()
        except Exception as exc:  # noqa: BLE001 (its text is the reason logged)
            return one_line(exc)
