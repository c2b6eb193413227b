"""What the routes share: `ServerState`, built once by `create_app` and kept as `app.state.automask`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from starlette.requests import Request

from automask.server.auth_limit import FailedAuth
from automask.server.bodies import BodyBudget
from automask.server.config import ServerSettings
from automask.server.deployment import Guard
from automask.server.dispatch import Dispatcher
from automask.server.jobs import Jobs
from automask.server.limits import RateLimiter, RedisRateLimiter
from automask.server.readiness import DatabaseProbe
from automask.server.store import Store
from automask.settings import Settings


@dataclass
class ServerState:
    """Everything the routes share; `app.state.automask`. `dispatcher`: where requests run (chosen once); `guard`:
    whether this node still serves its database (`automask.server.deployment`); `failed_auth`: the lock-out of
    client addresses that send bad keys; `database`: whether the database answers (/readyz)."""

    settings: Settings
    server: ServerSettings
    store: Store
    jobs: Jobs
    dispatcher: Dispatcher
    guard: Guard
    limiter: RateLimiter | RedisRateLimiter
    body_limit: int
    bodies: BodyBudget
    failed_auth: FailedAuth
    background: set[asyncio.Task[None]] = field(default_factory=set)
    database: DatabaseProbe = field(init=False)
    stop_asked: float | None = None
    """When the server was told to stop (`time.monotonic()`; SIGTERM or SIGINT): the jobs running here get
    `server.shutdown_timeout` from then to finish."""

    def __post_init__(self) -> None:
        self.database = DatabaseProbe(self.store)

    def ask_stop(self) -> None:
        """A stop signal came (`http.run`'s `on_signal`): note the first one's time, and no v2 job starts here any
        more; at another, the v2 jobs running here are cut off now (put back in the queue), as uvicorn stops waiting
        for the requests in flight at a second SIGINT (not at a second SIGTERM: v1 requests then keep their time)."""
        if self.stop_asked is None:
            self.stop_asked = time.monotonic()
            self.dispatcher.drain()
        else:
            self.dispatcher.cut()


def state_of(request: Request) -> ServerState:
    """The app's shared state."""
    state: ServerState = request.app.state.automask
    return state
