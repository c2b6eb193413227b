"""Who calls: the `x-api-key` header checked for every API endpoint (`current_key`), and the poll limit of the
endpoints clients poll (`polling_key`), as FastAPI dependencies (`CallerKey`, `PollingKey`).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from automask.server import keys, metrics
from automask.server.auth_limit import client_address
from automask.server.errors import ApiError
from automask.server.keys import ApiKey
from automask.server.state import state_of

API_KEY = APIKeyHeader(
    name="x-api-key", auto_error=False, description="A key made with `automask keys create` (am_<id>_<secret>)."
)
"""The `x-api-key` header, declared as the API's security scheme (checked by `current_key`, not here)."""


async def current_key(request: Request, token: Annotated[str | None, Security(API_KEY)]) -> ApiKey | None:
    """The caller's key from `x-api-key` (401/403 otherwise; 401 for the header given twice with different keys,
    which one would count is anyone's guess); None when the server runs without auth. Every API endpoint asks for
    it: first, 503 once this node no longer serves its database (`deployment.Guard`); 429 for a client address over
    its failed authentications (`ServerSettings.auth_fail_limit`) unless the key is one known to be good."""
    state = state_of(request)
    if state.guard.refusal is not None:
        raise ApiError(503, state.guard.refusal)
    if not state.server.auth:
        return None
    given = request.headers.getlist("x-api-key")
    if len({value.strip() for value in given}) > 1:
        raise ApiError(
            401, f"The x-api-key header is given {len(given)} times with different keys: send the request's key once."
        )
    address = client_address(request.client.host if request.client else None)
    attempt = await state.failed_auth.admit(address, token)  # a locked-out address: 429 before the database is read
    try:
        key = await asyncio.to_thread(keys.authenticate, state.store, token)
    except ApiError as refused:
        metrics.auth_failed(refused.status)
        await state.failed_auth.failed(attempt, token)
        raise
    except BaseException:  # the database could not tell (503), or the request was cancelled: not a failure
        await state.failed_auth.give_back(attempt)
        raise
    await state.failed_auth.succeeded(attempt, token)
    request.state.key_id = key.id
    return key


CallerKey = Annotated["ApiKey | None", Depends(current_key)]


async def polling_key(request: Request, key: CallerKey) -> ApiKey | None:
    """The caller's key (`current_key`), for an endpoint clients poll: at most `poll_rate_limit` such requests per
    minute per key (429, with the headers of any rate limit), counted apart from the key's submits."""
    if key is not None:
        await state_of(request).limiter.hit(f"{key.id}:poll", state_of(request).server.poll_rate_limit, "polls")
    return key


PollingKey = Annotated["ApiKey | None", Depends(polling_key)]
