"""`automask serve`, `worker` and `db ...`: click commands only; fastapi and uvicorn load inside `serve`
(`automask keys ...`: keys_cli.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from automask.cli_io import root_settings
from automask.server.config import MAX_KEY_COUNT, ServerSettings
from automask.server.logs import configure_logging

if TYPE_CHECKING:
    from automask.server.store import Store

_settings = root_settings


def store_of(ctx: click.Context) -> Store:
    """The configured database (AUTOMASK_DATABASE_URL, else the data folder's), at the current schema."""
    from automask.errors import require

    require("sqlalchemy", "server")
    from automask.server.store import Store

    return Store.from_settings(_settings(ctx), create=True)


class NoLimit:
    """`none` given to a limit flag: no limit (None in `ServerSettings` and for a key, where a flag's None means not
    given)."""


NO_LIMIT = NoLimit()


class Limit(click.ParamType):
    """A whole number from `low` to `high` (None: no maximum), or `none` (also `unlimited`, as `keys list` shows it)
    for no limit (`NO_LIMIT`). `what` names the number in the error message."""

    name = "N|none"

    def __init__(self, low: int = 1, high: int | None = None, what: str = "a whole number a minute") -> None:
        self.low, self.high, self.what = low, high, what

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.name  # as typed (click would upper-case it)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | NoLimit:
        if isinstance(value, (int, NoLimit)) and not isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("none", "unlimited"):
            return NO_LIMIT
        try:
            number = int(value)
        except ValueError:
            number = self.low - 1
        if number < self.low or (self.high is not None and number > self.high):
            most = f" and at most {self.high}" if self.high is not None else ""
            self.fail(f"{value!r}: give {self.what}, {self.low} or more{most}, or 'none' for no limit.", param, ctx)
        return number


CREDITS = Limit(0, MAX_KEY_COUNT, "a whole number of credits")
PER_MINUTE = Limit(1, MAX_KEY_COUNT)
"""A key's credits and rate limit: what the database's INTEGER columns hold, or `none` for unlimited."""


_METRICS_PORT = click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Prometheus metrics at /metrics on this port, a listener of its own [off; AUTOMASK_SERVER_METRICS_PORT].",
)
_METRICS_HOST = click.option("--metrics-host", help="Interface of the metrics listener [127.0.0.1].")


_LOG_LEVEL = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe log records written to standard error.",
)


@click.command()
@click.option("--host", help="Interface to listen on [default: 127.0.0.1; AUTOMASK_SERVER_HOST].")
@click.option("--port", type=click.IntRange(0, 65535), help="Port [default: 8000; AUTOMASK_SERVER_PORT].")
@click.option("--model", help="Model name or local model folder [AUTOMASK_MODEL].")
@click.option("--concurrency", type=click.IntRange(1, 64), help="Inference threads [default: 1].")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), help="Seconds per inference -> 504 [60].")
@click.option(
    "--no-auth",
    is_flag=True,
    help="No API keys: local use (a loopback host; only requests addressed to this machine: Host, Origin).",
)
@click.option("--public-url", help="Base URL clients use, for the v2 URLs (behind a proxy).")
@click.option("--header-timeout", type=click.FloatRange(0, min_open=True), help="Seconds to send headers [10].")
@click.option("--body-timeout", type=click.FloatRange(0, min_open=True), help="Longest pause in a body, s [30].")
@click.option("--body-min-rate", type=click.FloatRange(0, min_open=True), help="Slowest body, bytes/s [1000].")
@click.option("--body-deadline", type=click.FloatRange(0, min_open=True), help="Longest body in all, s [600].")
@click.option("--body-memory", type=click.IntRange(1), help="Bytes of bodies held at once [1 GiB].")
@click.option("--keepalive-timeout", type=click.FloatRange(0, min_open=True), help="Idle keep-alive, s [5].")
@click.option("--max-connections", type=click.IntRange(1), help="Open connections at most [512].")
@click.option("--shutdown-timeout", type=click.FloatRange(0, min_open=True), help="Seconds to finish on SIGTERM [10].")
@click.option("--poll-rate-limit", type=Limit(), help="Polls a minute per key, or none [6000].")
@click.option("--auth-fail-limit", type=Limit(), help="Failed authentications a minute per address, or none [60].")
@_METRICS_PORT
@_METRICS_HOST
@_LOG_LEVEL
@click.pass_context
def serve(ctx: click.Context, model: str | None, log_level: str, no_auth: bool, **flags: Any) -> None:
    """Run the HTTP service: a drop-in replacement for the hosted automatic-mask-generator API.

    \b
    POST /v1/automatic-mask-generator   one blocking call (JSON or multipart)
    POST /v2/automatic-mask-generator   queue a job; poll its status_url
    GET  /healthz, /readyz, /docs
    Create a key first: automask keys create
    """
    from automask.errors import require

    require("fastapi", "server")
    require("uvicorn", "server")
    from automask.server import http
    from automask.server.app import serving_app

    settings = _settings(ctx)
    if model:
        settings = settings.model_copy(update={"model": model})
    overrides = {k: None if v is NO_LIMIT else v for k, v in flags.items() if v is not None}
    if no_auth:
        overrides["auth"] = False
    server = _server_settings(overrides)
    configure_logging(log_level)
    sockets = http.listen(server)  # first: a busy port is one line, before the database or a model is touched
    try:
        with _serve_metrics(server, api_port=sockets[0].getsockname()[1]) as metrics_url:
            app = serving_app(settings, server)
            auth = "API keys required" if server.auth else "NO AUTH (loopback only)"
            click.echo(f"automask: serving on {http.address(sockets)} ({auth}); docs at /docs", err=True)
            if metrics_url:
                click.echo(f"automask: metrics at {metrics_url}", err=True)
            http.run(app, server, log_level=log_level, sockets=sockets, on_signal=app.state.automask.ask_stop)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise


@contextlib.contextmanager
def _serve_metrics(server: ServerSettings, api_port: int | None = None) -> Iterator[str | None]:
    """The metrics listener while the block runs, if `server.metrics_port` is set: its URL (else None), its port
    freed when the block ends, a failed start included. `ServiceConfigError` for a port that cannot be had, which
    says so when it is the API's own (`api_port`, bound already)."""
    if server.metrics_port is None:
        yield None
        return
    from automask.errors import ServiceConfigError
    from automask.server import metrics

    try:
        listener = metrics.listen(server.metrics_host, server.metrics_port)
    except ServiceConfigError:
        if server.metrics_port != api_port:
            raise
        raise ServiceConfigError(
            f"--metrics-port {api_port} is the API's port (--port): the metrics need a port of their own. "
            "Choose another --metrics-port."
        ) from None
    try:
        yield listener.url
    finally:
        listener.close()


def _server_settings(overrides: dict[str, Any]) -> ServerSettings:
    """`ServerSettings` from the environment and `overrides`; a bad value is a usage error naming it."""
    try:
        return ServerSettings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = f"{'.'.join(str(p) for p in err['loc'])}: " if err["loc"] else ""
        raise click.UsageError(where + str(err["msg"]).removeprefix("Value error, ")) from None


@click.command()
@click.option("--model", help="The model this worker serves: a catalogue name or a local folder [AUTOMASK_MODEL].")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Pool processes, each with the model loaded (a GPU node: one worker per GPU).",
)
@click.option("--timeout", type=click.FloatRange(0, min_open=True), help="Seconds per inference [60; as serve].")
@_METRICS_PORT
@_METRICS_HOST
@_LOG_LEVEL
@click.pass_context
def worker(
    ctx: click.Context, model: str | None, concurrency: int, log_level: str, **flags: float | int | str | None
) -> None:
    """Run a worker: load one model, take its v1 and v2 queues from the broker.

    \b
    Needs AUTOMASK_BROKER_URL (RabbitMQ), AUTOMASK_REDIS_URL and AUTOMASK_DATABASE_URL (PostgreSQL), the same
    as the API nodes' (`automask serve`). SIGTERM finishes the running tasks, then stops.
    """
    from automask.errors import ServiceConfigError, require

    require("celery", "scale")
    require("redis", "scale")
    from automask.server.worker import run_worker

    settings = _settings(ctx)
    if not settings.broker_url:
        raise ServiceConfigError("automask worker needs AUTOMASK_BROKER_URL=amqp://USER:PASS@HOST:PORT/VHOST.")
    server = _server_settings({k: v for k, v in flags.items() if v is not None})
    configure_logging(log_level)
    with _serve_metrics(server) as metrics_url:  # before the database or a model is touched, as serve's port
        click.echo(
            f"automask: worker for model {model or settings.model or 'the default'}, {concurrency} process(es)",
            err=True,
        )
        if metrics_url:
            click.echo(f"automask: metrics at {metrics_url}", err=True)
        run_worker(settings, server, model=model, concurrency=concurrency, loglevel=log_level)


@click.group()
def db() -> None:
    """The service's database (AUTOMASK_DATABASE_URL, else <data-dir>/automask.db)."""


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Create or upgrade the database schema to this release's (idempotent; keys and jobs are kept)."""
    from automask.errors import require

    require("alembic", "server")
    from automask.server.migrations import migrate
    from automask.server.store import Store, database_url

    settings = _settings(ctx)
    store = Store(database_url(settings))
    try:
        before, after = migrate(store)
    finally:
        store.close()
    if before == after:
        click.echo(f"The database {store.describe()} is up to date (schema revision {after}).", err=True)
    else:
        was = before or "release 0.1 or empty"
        click.echo(f"Migrated {store.describe()} from {was} to schema revision {after}.", err=True)


@db.command("status")
@click.pass_context
def db_status(ctx: click.Context) -> None:
    """Print the database's schema revision and this release's."""
    from automask.server.migrations import current, head
    from automask.server.store import Store, database_url

    settings = _settings(ctx)
    store = Store(database_url(settings))
    try:
        store.check_connection()
        with store.read() as conn:
            rev = current(conn)
    finally:
        store.close()
    click.echo(f"{store.describe()}: schema revision {rev or 'none'}; this release: {head()}")


@db.command("deployment")
@click.argument("kind", required=False, type=click.Choice(["single", "fleet"]))
@click.option("--force", is_flag=True, help="Switch a database that serves the other kind (stop its nodes first).")
@click.pass_context
def db_deployment(ctx: click.Context, kind: str | None, force: bool) -> None:
    """Print, or set to KIND, the kind of deployment the database serves.

    \b
    single  one `automask serve` running its models in-process (no AUTOMASK_BROKER_URL)
    fleet   API nodes with AUTOMASK_BROKER_URL, and `automask worker` processes
    Servers and workers record their kind when they first start on a database, and refuse one of the other kind.
    A server still running when --force switches its database stops serving (503) at its next sweep.
    """
    from automask.errors import ServiceConfigError
    from automask.server import deployment

    store = store_of(ctx)
    try:
        before = deployment.current(store) if kind is None else deployment.record(store, kind, force=force)
    finally:
        store.close()
    if kind is None:
        click.echo(before or "none")
        if before is None:
            click.echo("No kind recorded yet: the first server or worker to start records its own.", err=True)
    elif before not in (None, kind) and not force:
        raise ServiceConfigError(
            f"The database {store.describe()} serves {deployment.DESCRIPTION[before]}. Stop its nodes, then switch "
            f"it with: automask db deployment {kind} --force"
        )
    elif before == kind:
        click.echo(f"The database {store.describe()} already serves {deployment.DESCRIPTION[kind]}.", err=True)
    else:
        was = f" (was: {before})" if before else ""
        click.echo(f"The database {store.describe()} now serves {deployment.DESCRIPTION[kind]}{was}.", err=True)
