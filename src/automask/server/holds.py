"""A request's credit while it runs: held when it is admitted, settled off the event loop when it ends, given
back if the client leaves first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect, Request

from automask.server import keys
from automask.server.jobs import no_credits
from automask.server.keys import ApiKey
from automask.server.state import ServerState

log = logging.getLogger("automask.server")
T = TypeVar("T")
SETTLE_WAIT = 2.0
"""Seconds a v1 answer waits for its credit to be settled before it is sent anyway (the settle goes on)."""


@asynccontextmanager
async def credit_hold(state: ServerState, key: ApiKey | None, hold_id: str) -> AsyncIterator[int | None]:
    """Hold one credit of `key` for the block (406 when none is left); keep it if the block succeeds, give it
    back otherwise (an error, a timeout, the client leaving). The hold expires (the sweeper gives it back) if this
    process dies before settling it. Yields the credits the key has left with this one taken (read as it is
    taken), None for no key or unlimited credits."""
    if key is None:
        yield None
        return
    expires_at = state.store.now() + state.server.timeout + state.server.hold_grace
    reserved = await asyncio.to_thread(keys.reserve_left, state.store, key.id, hold_id, expires_at=expires_at)
    if reserved is None:
        raise no_credits(key.id)
    charged = False
    try:
        yield reserved.left
        charged = True
    finally:
        await settle_soon(state, hold_id, charge=charged, expires_at=expires_at)


async def settle_soon(state: ServerState, hold_id: str, *, charge: bool, expires_at: float) -> None:
    """Settle a hold off the event loop, retried until it is written or the hold expires (then the sweeper gives
    the credit back: in doubt, no charge); wait at most `SETTLE_WAIT` seconds for it (a locked database never
    holds up or fails the answer of a finished request)."""
    task = asyncio.create_task(_settle(state, hold_id, charge, expires_at))
    state.background.add(task)
    task.add_done_callback(state.background.discard)
    with suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), SETTLE_WAIT)


async def _settle(state: ServerState, hold_id: str, charge: bool, expires_at: float) -> None:
    delay = 0.2
    while True:
        try:
            await asyncio.to_thread(keys.settle, state.store, hold_id, charge=charge)
            return
        except SQLAlchemyError:
            if state.store.now() + delay > expires_at:  # the sweeper gives the credit back once the hold expires
                log.exception("could not settle credit hold %s; the sweeper will release it", hold_id)
                return
            log.warning("could not settle credit hold %s yet (database busy); retrying", hold_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then `ClientDisconnect`): a request still waiting
    for a thread never runs, one running stops at its next stage boundary or model layer, and its credit is given
    back."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnect()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
