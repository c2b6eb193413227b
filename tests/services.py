"""Throwaway PostgreSQL, Redis and RabbitMQ servers on loopback, for integration tests and benchmarks.

Every server runs from a fresh temporary folder on free 127.0.0.1 ports, and `stop()` ends every process it
started and removes the folder. Nothing uses a system service or a default port.

Scripts use the context managers::

    with postgres_server() as pg, redis_server() as rd, rabbitmq_server() as mq:
        print(pg.url, rd.url, mq.url)

Tests use the fixtures (tests/conftest.py star-imports `__all__`): session `postgres_url`, `redis_url`,
`rabbitmq_url` (and the server objects `postgres_service`, `redis_service`, `rabbitmq_service`); per test
`postgres_db` (a fresh empty database), `redis_db` (FLUSHALL first) and `rabbitmq_vhost_url` (a fresh vhost).
Tests that use them get the `services` marker automatically (`pytest -m "not services"` skips them) from
`pytest_collection_modifyitems` below: a conftest that defines its own must call this one.
A missing server binary skips the test with the apt-get command that installs it; under CI it fails instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_procs import (
    LOOPBACK,
    Service,
    ServiceError,
    free_port,
    port_is_free,
    process_tree,
    reap,
    require_binary,
    require_module,
    spawn,
    tail,
)

PG_ROOT = Path("/usr/lib/postgresql")  # Debian: <major>/bin/{initdb,postgres}; bookworm's major is 15
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the real scripts: /usr/sbin's wrappers su to the rabbitmq user
ERL_LOOPBACK_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"

__all__ = [
    "postgres_db",
    "postgres_service",
    "postgres_url",
    "pytest_collection_modifyitems",
    "rabbitmq_service",
    "rabbitmq_url",
    "rabbitmq_vhost_url",
    "redis_db",
    "redis_service",
    "redis_url",
]


class PostgresServer(Service):
    """PostgreSQL (Debian's newest; 15 on bookworm): role `user`/`password` (scram on TCP), database `database`."""

    name = "postgres"
    log_name = "postgres.log"

    def __init__(
        self, user: str = "automask", password: str = "automask", database: str = "automask", timeout: float = 60.0
    ) -> None:
        super().__init__(timeout)
        self.user, self.password, self.database = user, password, database

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{database}"

    def _start(self, workdir: Path) -> None:
        majors = sorted((int(p.parent.parent.name) for p in PG_ROOT.glob("[0-9]*/bin/initdb")), reverse=True)
        bindir = PG_ROOT / str(majors[0]) / "bin" if majors else PG_ROOT / "15" / "bin"
        initdb, postgres = require_binary(str(bindir / "initdb")), require_binary(str(bindir / "postgres"))
        require_module("psycopg", "psycopg[binary]")
        owner = "postgres" if os.geteuid() == 0 else None  # initdb and postgres refuse to run as root
        pwfile = workdir / "password"
        pwfile.write_text(self.password)
        if owner:
            for path in (workdir, pwfile):
                shutil.chown(path, owner, owner)
        self.port, data = free_port(), str(workdir / "data")
        init = [initdb, "-D", data, "-U", self.user, "--pwfile", str(pwfile), "--no-sync", "-E", "UTF8", "--no-locale"]
        as_owner = {"user": owner, "group": owner, "extra_groups": []} if owner else {}
        self._run([*init, "--auth-local=trust", "--auth-host=scram-sha-256"], **as_owner)
        options = {"listen_addresses": LOOPBACK, "port": self.port, "unix_socket_directories": workdir, "fsync": "off"}
        options |= {"synchronous_commit": "off", "full_page_writes": "off"}
        cmd = [postgres, "-D", data, *(arg for key, value in options.items() for arg in ("-c", f"{key}={value}"))]
        self._proc = spawn(cmd, self.log, user=owner)  # in the foreground, as our child: never orphaned
        self._wait(self._accepts, "postgres", self._proc)
        with self.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')

    def _accepts(self) -> bool:
        import psycopg

        try:  # this very server answers, not another one on a port taken since free_port() chose it
            with psycopg.connect(self.url_for("postgres"), connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_backend_pid()").fetchone()
                return row is not None and row[0] in process_tree(self._proc.pid)
        except psycopg.OperationalError:  # refused, or "the database system is starting up"
            return False

    def connect(self, database: str | None = None) -> Any:
        """An autocommit psycopg connection to `database` (default: the server's own database)."""
        import psycopg

        url = self.url_for(database or self.database)
        return psycopg.connect(url, autocommit=True, connect_timeout=10)

    def create_database(self) -> str:
        """Create an empty database t_<random>; its name."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop database `name`, closing the connections a test left open."""
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

    def _main_pid(self) -> int:
        return self._proc.pid

    def _stop(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown: a throwaway server needs no checkpoint
        reap(proc, 30)


class RedisServer(Service):
    """redis-server with no persistence, run in the foreground as our child (so it is reaped, not orphaned)."""

    name = "redis"
    log_name = "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    cluster = False
    """Run as a Redis Cluster of this one node, holding every slot: a command or script whose keys are in different
    slots is refused (CROSSSLOT), as on a real cluster."""

    def _start(self, workdir: Path) -> None:
        binary = require_binary("redis-server")
        require_module("redis", "redis")
        self.port = free_port()
        cmd = [binary, "--bind", LOOPBACK, "--port", str(self.port), "--dir", str(workdir), "--save", ""]
        cmd += ["--appendonly", "no", "--daemonize", "no", "--logfile", str(self.log)]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf")]
            cmd += ["--cluster-port", str(free_port())]  # (by default the port + 10000: none above 55535)
        self._proc = spawn(cmd, workdir / "stdout.log")
        self._wait(self._ping, "redis-server", self._proc)
        if self.cluster:
            import redis

            with redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
                self._wait(
                    lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"), "cluster", self._proc
                )

    def _ping(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:  # this very server answers, not another one on a port taken since free_port() chose it
            with redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as client:
                return bool(client.info("server")["process_id"] == self._proc.pid)
        except redis.RedisError:
            return False

    def _main_pid(self) -> int:
        return self._proc.pid

    def _stop(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
        reap(proc, 10)


class RabbitMQServer(Service):
    """A single RabbitMQ node (no plugins) with its own epmd; `guest` works on loopback; quorum queues work."""

    name = "rabbitmq"
    log_name = "log/rabbit.log"

    @property
    def url(self) -> str:
        return self.vhost_url("/")

    def vhost_url(self, vhost: str) -> str:
        path = "/" if vhost == "/" else vhost  # amqp://host:port// is the default vhost "/"
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/{path}"

    def _start(self, workdir: Path) -> None:
        server = require_binary(str(RABBITMQ_BIN / "rabbitmq-server"))
        self._ctl, epmd = require_binary(str(RABBITMQ_BIN / "rabbitmqctl")), require_binary("epmd")
        require_module("kombu", "kombu")
        for sub in ("home", "log", "mnesia"):
            (workdir / sub).mkdir()
        (workdir / "enabled_plugins").write_text("[].\n")
        (workdir / "rabbitmq.conf").write_text("")
        (workdir / "rabbitmq-env.conf").write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf
        self.port, self._epmd_port = free_port(), free_port()
        node = f"t{uuid.uuid4().hex[:10]}@localhost"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(workdir / "home"),  # its .erlang.cookie, shared by the node and rabbitmqctl
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_PORT": str(self._epmd_port),
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_LOGS": str(self.log),
            "RABBITMQ_PID_FILE": str(workdir / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(workdir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_LOOPBACK_ARGS,  # else Erlang listens on every interface
            "RABBITMQ_CTL_ERL_ARGS": ERL_LOOPBACK_ARGS,  # the same for rabbitmqctl's own hidden node
        }
        # our own epmd, in the foreground: the node would otherwise start a daemon that outlives it
        epmd_cmd = [epmd, "-port", str(self._epmd_port), "-address", LOOPBACK]
        self._epmd = spawn(epmd_cmd, workdir / "epmd.log", env=self.env)
        self._wait(lambda: not port_is_free(self._epmd_port), "epmd", self._epmd)
        self._proc = spawn([server], workdir / "stdout.log", env=self.env, cwd=workdir)
        waiter = subprocess.Popen(  # waits for this very node (a port poll could reach another broker)
            [self._ctl, "wait", self.env["RABBITMQ_PID_FILE"], "--timeout", str(int(self.timeout))],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            self._wait(lambda: waiter.poll() is not None, "rabbitmq-server", self._proc)
        finally:
            if waiter.poll() is None:
                waiter.kill()
            waiter.wait()
        if waiter.returncode != 0:
            raise ServiceError(f"rabbitmq: `rabbitmqctl wait` failed ({waiter.returncode}); log:\n{tail(self.log)}")

    def ctl(self, *args: str) -> str:
        """Run `rabbitmqctl -q ARGS` against this node; its stdout."""
        return self._run([self._ctl, "-q", *args], env=self.env)

    def add_vhost(self) -> str:
        """A fresh vhost `t_<random>` where guest may do everything; its name."""
        vhost = f"t_{uuid.uuid4().hex[:12]}"
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return vhost

    def _main_pid(self) -> int:
        return self._proc.pid  # the rabbitmq-server script: beam.smp is its child, stopped on its SIGTERM

    def _stop(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: a clean init:stop() of the node
        reap(proc, 30)
        epmd = getattr(self, "_epmd", None)
        if epmd is not None and epmd.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["epmd", "-kill"], env=self.env, capture_output=True, timeout=10)
            if epmd.poll() is None:
                epmd.terminate()
        reap(epmd, 10)


@contextlib.contextmanager
def _serving(server: Service) -> Iterator[Any]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def postgres_server(**kwargs: Any) -> contextlib.AbstractContextManager[PostgresServer]:
    """A started `PostgresServer` for the `with` block (kwargs: user, password, database, timeout)."""
    return _serving(PostgresServer(**kwargs))


def redis_server(timeout: float = 60.0, cluster: bool = False) -> contextlib.AbstractContextManager[RedisServer]:
    """A started `RedisServer` for the `with` block (`cluster`: a one-node Redis Cluster, `RedisServer.cluster`)."""
    server = RedisServer(timeout)
    server.cluster = cluster
    return _serving(server)


def rabbitmq_server(timeout: float = 90.0) -> contextlib.AbstractContextManager[RabbitMQServer]:
    """A started `RabbitMQServer` for the `with` block (boots in ~5-10 s)."""
    return _serving(RabbitMQServer(timeout))


# ---- pytest fixtures -------------------------------------------------------------------------------------------

SERVICE_FIXTURES = frozenset(name for name in __all__ if not name.startswith("pytest_"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a server fixture `services`."""
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def postgres_service() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_service: PostgresServer) -> str:
    """postgresql://automask:automask@127.0.0.1:PORT/automask (shared by the whole session)."""
    return postgres_service.url


@pytest.fixture()
def postgres_db(postgres_service: PostgresServer) -> Iterator[str]:
    """The URL of a fresh empty database t_<random>, dropped after the test (its connections closed by force)."""
    name = postgres_service.create_database()
    yield postgres_service.url_for(name)
    postgres_service.drop_database(name)


@pytest.fixture(scope="session")
def redis_service() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_service: RedisServer) -> str:
    """redis://127.0.0.1:PORT/0 (shared by the whole session; see redis_db for a clean one)."""
    return redis_service.url


@pytest.fixture()
def redis_db(redis_service: RedisServer) -> str:
    """redis://127.0.0.1:PORT/0 after FLUSHALL: the test starts with every db empty."""
    import redis

    with redis.Redis.from_url(redis_service.url) as client:
        client.flushall()
    return redis_service.url


@pytest.fixture(scope="session")
def rabbitmq_service() -> Iterator[RabbitMQServer]:
    with rabbitmq_server() as server:
        yield server


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_service: RabbitMQServer) -> str:
    """amqp://guest:guest@127.0.0.1:PORT// (the default vhost, shared by the whole session)."""
    return rabbitmq_service.url


@pytest.fixture()
def rabbitmq_vhost_url(rabbitmq_service: RabbitMQServer) -> Iterator[str]:
    """amqp://guest:guest@127.0.0.1:PORT/t_<random>: a vhost of this test's own, deleted after it."""
    vhost = rabbitmq_service.add_vhost()
    yield rabbitmq_service.vhost_url(vhost)
    rabbitmq_service.ctl("delete_vhost", vhost)
