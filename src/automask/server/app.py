"""The ASGI app: `create_app(settings, server, generator)` wires the store, runner, job queue and routes.

Run it with `automask serve`, or `uvicorn --factory automask.server.app:app_from_env`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute

from automask import __version__, web
from automask.errors import AutomaskError
from automask.pipeline import MaskGenerator
from automask.server import metrics
from automask.server.auth_limit import failed_auth_for
from automask.server.bodies import ASGIApp, BodyBudget, BodyLimitMiddleware, Message, Receive, Scope, Send
from automask.server.bounded import request_bound
from automask.server.broker_check import check_broker
from automask.server.config import ServerSettings
from automask.server.deployment import Guard
from automask.server.dispatch import make_dispatcher
from automask.server.errors import ApiError, shown, status_of
from automask.server.headers import DocsMiddleware, EdgeMiddleware
from automask.server.jobs import Jobs
from automask.server.limits import RateLimiter, RedisRateLimiter, check_redis
from automask.server.openapi_docs import without_validation_errors
from automask.server.routes import error_response, router
from automask.server.state import ServerState
from automask.server.store import Store
from automask.server.sweeper import Sweeper
from automask.settings import Settings

log = logging.getLogger("automask.server")
access_log = logging.getLogger("automask.server.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CLIENT_CLOSED = 499
"""The access log's status for a request whose client went away before it was answered (nginx's code)."""

DESCRIPTION = """Self-hosted, drop-in replacement for the hosted "automatic-mask-generator" API.

Send the key in the `x-api-key` header. v1 answers with the image (or JSON with `base64`); v2 queues a job
and answers with absolute `status_url` / `response_url`. Every error is `{"error": "..."}`.

A successful v1 answer carries `x-remaining-credits`: the key's credits left once it is charged (absent for a key
with unlimited credits). A failed request is not charged.

automask extensions: an optional `model` field (one of the names `GET /v1/models` lists; absent: the server's
default) and an `x-inference-time` header (seconds) on v1 answers."""


def create_app(
    settings: Settings | None = None, server: ServerSettings | None = None, generator: MaskGenerator | None = None
) -> FastAPI:
    """Build the service. `generator` (e.g. with a custom `Backend`) replaces loading `settings.model`."""
    settings = settings or Settings()
    server = server or ServerSettings()
    store = Store.from_settings(settings, create=True)  # an older schema: refuse, say `automask db migrate`
    jobs = Jobs(
        store,
        max_per_key=server.max_queued_per_key,
        max_total=server.max_queued,
        max_bytes_per_key=server.max_queued_bytes_per_key,
        max_bytes_total=server.max_queued_bytes,
    )
    try:
        dispatcher = make_dispatcher(settings, server, store, jobs, generator)
        guard = Guard(store, dispatcher.deployment)
        guard.claim()  # a database serving the other kind of deployment: refuse, naming the fix
        if settings.redis_url:
            check_redis(settings.redis_url)  # unreachable: refuse to start, naming the setting (as the database)
        limiter = RedisRateLimiter(settings.redis_url) if settings.redis_url else RateLimiter()
        failed_auth = failed_auth_for(limiter, store, server.auth_fail_limit)  # in-process, or shared through Redis
    except BaseException:
        store.close()
        raise
    body_limit = server.body_limit(settings.max_image_bytes)
    bodies = BodyBudget(server.body_memory, per_key=max(body_limit, server.body_memory // 4))
    state = ServerState(settings, server, store, jobs, dispatcher, guard, limiter, body_limit, bodies, failed_auth)
    sweeper = Sweeper(store, jobs, dispatcher, server, guard=guard)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await dispatcher.start()
        sweeper.start()
        unwatch = metrics.watch(store, bodies)  # with --metrics-port: jobs by status, body memory at each scrape
        yield
        unwatch()
        await sweeper.stop()
        asked = state.stop_asked if state.stop_asked is not None else time.monotonic()
        await dispatcher.stop(deadline=asked + server.shutdown_timeout)
        if state.background:  # credit settles still being retried get a last chance
            await asyncio.wait(state.background, timeout=5)
        if isinstance(limiter, RedisRateLimiter):
            await limiter.close()
        store.close()

    # redirect_slashes=False: a path with a trailing slash is an unknown endpoint (a JSON 404 that says so), not a
    # 307 whose Location is built from the client's Host header
    app = FastAPI(
        title="automask", version=__version__, description=DESCRIPTION, lifespan=lifespan, redirect_slashes=False
    )
    app.state.automask = state
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=state.body_limit)
    app.add_middleware(DocsMiddleware)  # /docs served locally, its answers with a request id like every other
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(EdgeMiddleware)  # outermost: nosniff / no-store on every answer
    app.include_router(router)
    without_validation_errors(app)
    web.mount(app, public_url=server.public_url)  # the try-it page at /, a client of the v1 API like any other
    return app


def serving_app(settings: Settings | None = None, server: ServerSettings | None = None) -> FastAPI:
    """`create_app` for a process about to serve it (`automask serve`, `app_from_env`): an API node of a fleet also
    connects to its broker once, after the database and Redis, as a worker does (`check_broker`): one it cannot reach
    refuses the start (`ServiceConfigError` naming AUTOMASK_BROKER_URL, without its password), rather than failing
    every request handed to the workers."""
    app = create_app(settings, server)
    state: ServerState = app.state.automask
    if state.settings.broker_url:
        try:
            check_broker(str(state.settings.broker_url))
        except BaseException:
            state.store.close()
            raise
    return app


def app_from_env() -> FastAPI:
    """`serving_app()` with settings from the environment (for `uvicorn --factory`); with
    `AUTOMASK_SERVER_METRICS_PORT`, the metrics listener too, closed when the start fails or the app stops."""
    server = ServerSettings()
    if server.metrics_port is None:
        return serving_app(server=server)
    listener = metrics.listen(server.metrics_host, server.metrics_port)
    log.info("metrics at %s", listener.url)
    try:
        app = serving_app(server=server)
    except BaseException:
        listener.close()  # the port is free for the next try, in this process too
        raise
    served = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with served(app):
                yield
        finally:  # a start-up that fails, or the app stopping: the listener goes with the app it was opened for
            listener.close()

    app.router.lifespan_context = lifespan
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status == 429:
            metrics.rate_limited(exc.limit or "other")
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(AutomaskError)
    async def _automask_error(request: Request, exc: AutomaskError) -> JSONResponse:
        return error_response(status_of(exc), exc.message)

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("database error in %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503, "The server's database is busy or unreachable; try again in a few seconds.", {"Retry-After": "5"}
        )

    if importlib.util.find_spec("redis") is not None:  # the fleet's shared state (rate limits, v1 hand-off)
        from redis.exceptions import RedisError

        @app.exception_handler(RedisError)
        async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
            log.error("redis error in %s %s: %s", request.method, request.url.path, exc)
            return error_response(
                503, "The server's shared state is unreachable; try again in a few seconds.", {"Retry-After": "5"}
            )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query", "header")]
        field = loc[0] if loc else "request"  # the parameter the client sent, not a union branch inside it
        return error_response(400, f"{field}: {err.get('msg', 'is invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            root = request.scope.get("root_path", "")
            path, direct = sent_path(request.url.path, root)
            hint = " (without the trailing slash?)" if len(path) > 1 and path.endswith("/") else ""
            if direct:  # asked under the prefix, which the proxy should have stripped
                hint += f" (this server is set up, by --public-url, for a proxy that strips {root})"
            docs = root + "/docs"  # under the proxy's prefix, if any
            return error_response(
                404, f"No endpoint {request.method} {shown(path)}{hint}. The API is described at {docs}."
            )
        return error_response(exc.status_code, str(exc.detail))


def sent_path(path: str, root: str) -> tuple[str, bool]:
    """The path a client asked for, and whether it asked this server directly under the prefix `root`.

    `path` is `root` plus the request line's path (uvicorn's `root_path`): through a proxy that strips the
    prefix, that is what the client asked the proxy for; a client that sent the prefix itself (asking this
    server directly, or through a proxy that does not strip it) asked for the request line's path alone.
    """
    line = path.removeprefix(root)
    if root and (line == root or line.startswith(root + "/")):
        return line, True
    return path, False


class RequestContextMiddleware:
    """Outermost but for the edge headers: gives every request an id (`x-request-id` on every response, the docs'
    too), writes one JSON access-log line (request id, method, path, status, duration, key id) and counts it
    (`metrics`), and turns an unexpected exception into a logged 500 whose body names the request id but no
    internals."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), 500
        started = False
        metrics.request_started()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            with request_bound():  # a frozen PostgreSQL: a 503 in seconds, not a request held until it thaws
                await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # the client left before its body was read: no one to answer, nothing broke
            status = CLIENT_CLOSED
            log.info("client left before sending its body: %s %s %s", request_id, scope["method"], scope["path"])
        except Exception:
            log.exception("unexpected error in request %s %s %s", request_id, scope["method"], scope["path"])
            if not started:
                message = f"Unexpected server error (request id {request_id}); the server log has the details."
                await error_response(500, message)(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            _log_access(scope, request_id, status, seconds)
            metrics.request_done(scope, status, seconds, _routes(scope))


def _routes(scope: Scope) -> Iterator[BaseRoute]:
    """The routes of the app serving `scope`: the API's (`router`, which it includes) and its own (the page's)."""
    yield from router.routes
    yield from getattr(getattr(scope.get("app"), "router", None), "routes", ())


def _log_access(scope: Scope, request_id: str, status: int, seconds: float) -> None:
    state = scope.get("state", {})
    line = {
        "request_id": request_id,
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round(seconds * 1000, 1),
        "key_id": state.get("key_id"),
    }
    access_log.info(json.dumps(line))
