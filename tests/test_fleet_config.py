"""The fleet's settings at the command line: keys and migrations on the configured database, and clear refusals
when a setting the fleet needs is missing (no server is started for those)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from automask.cli import main
from automask.errors import ServiceConfigError
from automask.server import keys as keystore
from automask.server.store import Store, nodes_table
from service_procs import free_port


def test_keys_and_migrations_act_on_the_configured_postgresql(postgres_db: str, tmp_path: Path) -> None:
    env = {"AUTOMASK_DATABASE_URL": postgres_db, "AUTOMASK_DATA_DIR": str(tmp_path / "data")}
    cli = CliRunner()
    migrated = cli.invoke(main, ["db", "migrate"], env=env)
    assert migrated.exit_code == 0 and "postgresql+psycopg://automask:***@" in migrated.output  # no password shown
    assert "Migrated" in migrated.output and "schema revision 0006" in migrated.output
    created = cli.invoke(main, ["keys", "create", "--credits", "7", "--name", "fleet"], env=env)
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    store = Store(postgres_db)
    key = keystore.authenticate(store, token)
    assert (key.name, key.credits) == ("fleet", 7)
    listed = json.loads(cli.invoke(main, ["keys", "list", "--json"], env=env).stdout)
    assert [k["id"] for k in listed] == [key.id]
    assert not (tmp_path / "data" / "automask.db").exists()  # nothing went to the data folder's SQLite
    status = cli.invoke(main, ["db", "status"], env=env)
    assert status.exit_code == 0 and "schema revision 0006; this release: 0006" in status.output


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"AUTOMASK_BROKER_URL": "amqp://u:p@127.0.0.1:1//"}, ["serve", "--port", "0"], "AUTOMASK_REDIS_URL is not"),
        (
            {"AUTOMASK_BROKER_URL": "amqp://u:p@127.0.0.1:1//", "AUTOMASK_REDIS_URL": "redis://127.0.0.1:1/0"},
            ["serve", "--port", "0"],  # any free port: the test must not need 8000
            "AUTOMASK_DATABASE_URL is not",
        ),
        ({}, ["worker"], "automask worker needs AUTOMASK_BROKER_URL"),
        ({"AUTOMASK_BROKER_URL": "amqp://u:p@127.0.0.1:1//"}, ["worker"], "AUTOMASK_REDIS_URL is not"),
    ],
)
def test_missing_fleet_settings_are_refused_with_the_fix(
    env: dict[str, str], args: list[str], message: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), *args], env=env)
    assert result.exit_code == 9, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_worker_that_cannot_reach_the_database_hands_the_task_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a job stuck PROCESSING: the message goes back to the queue (redelivered, it may take the job over)."""
    from types import SimpleNamespace

    from celery.exceptions import Reject
    from sqlalchemy.exc import OperationalError

    from automask.server import worker
    from automask.server.config import ServerSettings

    def database_down(*args: object, **kwargs: object) -> None:
        raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))

    monkeypatch.setattr(worker, "_WORKER", SimpleNamespace(server=ServerSettings(timeout=1.0)))
    released: list[tuple[str, str]] = []
    pings: list[float] = []
    answers = [False, False, True]  # the database is back at the third try
    store = SimpleNamespace(ping=lambda: pings.append(time.monotonic()) or answers.pop(0))
    jobs = SimpleNamespace(release=lambda job_id, node: released.append((job_id, node)), store=store)
    serving = SimpleNamespace(refusal=None)  # the database still serves the fleet
    monkeypatch.setattr(worker, "_process", lambda: SimpleNamespace(jobs=jobs, runner=None, node="n1", guard=serving))
    monkeypatch.setattr(worker, "execute_job", database_down)
    monkeypatch.setattr(worker, "RETRY_PAUSE", 0.05)
    task = SimpleNamespace(request=SimpleNamespace(delivery_info={"redelivered": False}))
    with pytest.raises(Reject) as rejected:
        worker.v2_task(task, "job-1")
    assert rejected.value.requeue is True
    assert released == [("job-1", "n1")]  # the job, if this process held it, goes back: any process may take it
    assert len(pings) == 3 and not answers  # handed back once the database answered, not at the first error


def test_a_worker_waiting_for_the_database_hands_its_task_back_before_celerys_hard_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hard limit counts from the task's start (timeout + TIME_LIMIT_MARGIN): a task that failed late waits only
    what is left, less HAND_BACK_MARGIN. Before: it waited a whole timeout and Celery killed it mid-wait (the
    message acknowledged, not handed back)."""
    from types import SimpleNamespace

    from celery.exceptions import Reject
    from sqlalchemy.exc import OperationalError

    from automask.server import worker
    from automask.server.config import ServerSettings

    def late_database_error(*args: object, **kwargs: object) -> None:
        time.sleep(1.0)  # the job ran 1 s before the database failed it
        raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))

    monkeypatch.setattr(worker, "_WORKER", SimpleNamespace(server=ServerSettings(timeout=1.0)))
    monkeypatch.setattr(worker, "TIME_LIMIT_MARGIN", 0.5)  # hard limit: 1.5 s from the start
    monkeypatch.setattr(worker, "HAND_BACK_MARGIN", 0.2)  # so 0.3 s are left to wait
    monkeypatch.setattr(worker, "RETRY_PAUSE", 0.05)
    store = SimpleNamespace(ping=lambda: False)  # the database stays down
    jobs = SimpleNamespace(release=lambda job_id, node: None, store=store)
    serving = SimpleNamespace(refusal=None)  # the database still serves the fleet
    monkeypatch.setattr(worker, "_process", lambda: SimpleNamespace(jobs=jobs, runner=None, node="n1", guard=serving))
    monkeypatch.setattr(worker, "execute_job", late_database_error)
    task = SimpleNamespace(request=SimpleNamespace(delivery_info={"redelivered": False}))
    start = time.monotonic()
    with pytest.raises(Reject):
        worker.v2_task(task, "job-1")
    assert 1.25 <= time.monotonic() - start < 1.45  # 1 s of work + 0.3 s of waiting, not + 1 s


def test_a_worker_spends_a_delivery_per_timeout_not_per_retry_while_the_database_is_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: handed back every 2 s; each hand-back counts towards RabbitMQ's delivery limit (20), so an outage of
    about a minute dropped the message and the job waited 15 minutes for the sweeper's resend."""
    from types import SimpleNamespace

    from automask.server import worker

    monkeypatch.setattr(worker, "RETRY_PAUSE", 0.05)
    pings: list[float] = []
    start = time.monotonic()
    worker._wait_for_database(SimpleNamespace(ping=lambda: pings.append(1.0) or False), 0.5)  # type: ignore[arg-type]
    assert 0.5 <= time.monotonic() - start < 0.7 and len(pings) >= 5


def test_a_publisher_finds_out_when_rabbitmq_no_longer_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: only RabbitMQ's `connection.unblocked` cleared the flag; if the blocked connection was lost, every
    later send failed at once for good (all v1 calls 503, no v2 job ever handed out) until a restart."""
    from automask.server import fleet

    monkeypatch.setattr(fleet, "PROBE_AFTER", 0.3)
    publisher = fleet.Publisher(threads=1)
    try:
        publisher.on_blocked("low on memory")
        with pytest.raises(fleet.BrokerBlocked):
            publisher.submit(lambda: "sent").result(timeout=5)  # known blocked: at once
        time.sleep(0.35)
        assert publisher.submit(lambda: "sent").result(timeout=5) == "sent"  # the probe went through...
        assert publisher.blocked is None  # ... so RabbitMQ takes messages again
    finally:
        publisher.close()


def test_an_api_node_without_a_broker_refuses_a_fleets_database(postgres_db: str, tmp_path: Path) -> None:
    """Before: `serve` with the fleet's database URL but no broker URL ran jobs in-process: it took every QUEUED job
    and FAILED those of models it did not have ("Unknown model"), and marked others as handed out."""
    from automask.server import nodes
    from automask.server.migrations import ensure_schema

    store = Store(postgres_db)
    ensure_schema(store, create=True)
    nodes.register(store, "worker-x", "worker", ["clipseg"], "clipseg", 10.0)
    env = {"AUTOMASK_DATABASE_URL": postgres_db, "AUTOMASK_DATA_DIR": str(tmp_path / "data")}
    served = CliRunner().invoke(main, ["serve", "--port", "0"], env=env)
    assert served.exit_code == 9, served.output
    assert "used by a fleet of Celery workers" in served.output and "AUTOMASK_BROKER_URL" in served.output
    assert "Traceback" not in served.output
    nodes.unregister(store, "worker-x")
    nodes.register(store, "server-y", "server", ["subject"], "subject", 10.0)
    with pytest.raises(ServiceConfigError, match="runs its models in-process"):  # and workers refuse the reverse
        nodes.refuse_mixed(store, "server")
    with store.transaction() as conn:  # a server killed 30 s ago (its row stays until forgotten): still refused
        conn.execute(update(nodes_table).values(heartbeat_at=store.now() - 30))
    with pytest.raises(ServiceConfigError, match="server-y"):
        nodes.refuse_mixed(store, "server")
    nodes.unregister(store, "server-y")  # a clean stop removes the row: the database is free for a fleet
    nodes.refuse_mixed(store, "server")
    store.close()


def started_worker(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`automask worker` (tests/fleet_worker.py: its model needs no download) run with `env` (the fleet's settings),
    60 s at most (then killed: it never gave up)."""
    tests = Path(__file__).parent
    cmd = [sys.executable, str(tests / "fleet_worker.py")]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMASK_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])
    clean["AUTOMASK_DATA_DIR"] = str(tmp_path / "worker")
    with subprocess.Popen(cmd, env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"automask worker still running after 60 s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def test_a_worker_started_without_redis_or_rabbitmq_exits_9_naming_the_setting(
    postgres_db: str, redis_db: str, rabbitmq_url: str, tmp_path: Path
) -> None:
    """Before: a worker checked the database at start-up, but not Redis (it started, and failed every v1 task), nor
    RabbitMQ: Celery retried the connection 100 times, for the best part of an hour, then ended with a traceback
    (exit 1). Now each refuses the start at once, naming its setting and the fix (exit 9, as for the database)."""
    from automask.server.migrations import migrate

    store = Store(postgres_db)
    migrate(store)
    store.close()
    closed = f"127.0.0.1:{free_port()}"
    env = {"AUTOMASK_DATABASE_URL": postgres_db, "AUTOMASK_REDIS_URL": f"redis://{closed}/0"}
    no_redis = started_worker({**env, "AUTOMASK_BROKER_URL": rabbitmq_url}, tmp_path)
    assert no_redis.returncode == 9 and f"Cannot connect to Redis at redis://{closed}/0" in no_redis.stdout
    env["AUTOMASK_REDIS_URL"] = redis_db
    wrong = rabbitmq_url.replace("guest:guest@", "guest:not-the-password@")
    for url, why in [(f"amqp://u:secret@{closed}/vh", "Connection refused"), (wrong, "ACCESS_REFUSED")]:
        refused = started_worker({**env, "AUTOMASK_BROKER_URL": url}, tmp_path)
        assert refused.returncode == 9, refused.stdout
        assert "Cannot connect to the broker at amqp://" in refused.stdout and why in refused.stdout, refused.stdout
        assert "Check AUTOMASK_BROKER_URL" in refused.stdout and "secret" not in refused.stdout
        assert ".." not in refused.stdout.split("Cannot connect", 1)[1], refused.stdout  # RabbitMQ's '... logfile.'
        assert "not-the-password" not in refused.stdout
    for run in (no_redis, refused):
        assert "Traceback" not in run.stdout, run.stdout


def test_a_worker_checks_a_frozen_broker_once_within_its_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `check_broker` (`ensure_connection(max_retries=1)`) tried twice with Celery's 2 s pause between, so a
    frozen RabbitMQ (its host's kernel accepts the connection, nothing answers: as under SIGSTOP) held a worker's
    start 2 × BROKER_CONNECT_TIMEOUT + 2 s, 12 s, where its docstring and README say once, 5 s. Now one try."""
    import socket

    from automask.server import broker_check

    monkeypatch.setattr(broker_check, "BROKER_CONNECT_TIMEOUT", 1.0)
    with socket.create_server(("127.0.0.1", 0), backlog=8) as frozen:  # never accepted: no AMQP greeting ever
        url = f"amqp://u:secret@127.0.0.1:{frozen.getsockname()[1]}/vh"
        started = time.monotonic()
        with pytest.raises(ServiceConfigError) as refused:
            broker_check.check_broker(url)
        took = time.monotonic() - started
    assert "Cannot connect to the broker at amqp://u:**@127.0.0.1:" in str(refused.value) and "secret" not in str(
        refused.value
    )
    assert 0.9 < took < 2.5, took  # before: 4 s (1 + 2 + 1)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:se/cret@127.0.0.1/vh",  # a / in the password, not percent-encoded: read as port 'se'
        "amqp://u:secret@127.0.0.1:56x2/vh",
        "amqp://u:secret@[::1/vh",
        "amqq://u:secret@127.0.0.1/vh",
    ],
)
def test_a_broker_url_that_cannot_be_read_is_refused_naming_the_setting(url: str) -> None:
    """Before: `check_broker` built kombu's Connection outside its try: a URL kombu cannot read raised ValueError or
    KeyError, which `automask worker` reported as "internal error: ValueError: Port could not be cast to integer
    value as 'se'" (exit 70), quoting a piece of the password. Now a `ServiceConfigError` (exit 9) names
    AUTOMASK_BROKER_URL and its form, quoting nothing of the URL."""
    from automask.server.broker_check import check_broker

    with pytest.raises(ServiceConfigError) as refused:
        check_broker(url)
    message = str(refused.value)
    assert "AUTOMASK_BROKER_URL" in message and "amqp://USER:PASS@HOST:PORT/VHOST" in message, message
    assert not any(part in message for part in ("secret", "cret", "'se'", "56x2")), message


def test_a_worker_given_a_broker_url_it_cannot_read_exits_9(postgres_db: str, redis_db: str, tmp_path: Path) -> None:
    """`automask worker` with AUTOMASK_BROKER_URL unreadable (a / in the password): before, exit 70 "internal error"
    quoting part of the password; now exit 9 naming the setting, as an unreachable broker."""
    from automask.server.migrations import migrate

    store = Store(postgres_db)
    migrate(store)
    store.close()
    env = {"AUTOMASK_DATABASE_URL": postgres_db, "AUTOMASK_REDIS_URL": redis_db}
    run = started_worker({**env, "AUTOMASK_BROKER_URL": "amqp://u:se/cret@127.0.0.1/vh"}, tmp_path)
    assert run.returncode == 9 and "AUTOMASK_BROKER_URL" in run.stdout, run.stdout
    assert "internal error" not in run.stdout and "cret" not in run.stdout and "Traceback" not in run.stdout


def test_an_api_node_given_a_broker_url_it_cannot_read_refuses_to_start(tmp_path: Path) -> None:
    """`automask serve` with AUTOMASK_BROKER_URL unreadable (a / in the password): before, it started and every request
    handed to the workers then failed inside kombu ("Port could not be cast to integer value as 'se'", quoting a piece
    of the password); now it refuses to start, naming the setting and its form (exit 9), as a worker does."""
    from automask.server.app import create_app
    from automask.settings import Settings

    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        broker_url="amqp://u:se/cret@127.0.0.1/vh",
        redis_url="redis://127.0.0.1:1/0",
    )
    with pytest.raises(ServiceConfigError) as refused:
        create_app(settings)
    message = str(refused.value)
    assert "AUTOMASK_BROKER_URL" in message and "amqp://USER:PASS@HOST:PORT/VHOST" in message, message
    assert "cret" not in message and "'se'" not in message, message


def test_an_unreachable_redis_is_refused_in_sentences() -> None:
    """Before: "...Connection refused.. Check AUTOMASK_REDIS_URL" (redis-py's reason ends with a full stop)."""
    from automask.server.limits import check_redis
    from server_helpers import free_port

    with pytest.raises(ServiceConfigError) as refused:
        check_redis(f"redis://127.0.0.1:{free_port()}/0")
    assert "AUTOMASK_REDIS_URL" in str(refused.value) and ".." not in str(refused.value), refused.value


@pytest.mark.parametrize(
    ("password", "secret_parts"),
    [("se/cret", ["cret", "'se'", "se/"]), ("p@ss:w/rd", ["ss:w", "p@ss", "w/rd", "rd@"]), ("pa@ss", ["pa@", "ss@"])],
)
def test_a_redis_url_whose_password_is_not_percent_encoded_is_refused_without_showing_it(
    password: str, secret_parts: list[str]
) -> None:
    """Before: a Redis password with an unencoded / or @ was shown in the start-up refusal, whole ("Cannot connect to
    Redis at redis://:se/cret@...: Port could not be cast to integer value as 'se'") or its end ("redis://ss@..."):
    the password was hidden only when it had neither. Now nothing before the host is shown, and a URL redis-py
    cannot read is said to be so, with the form and the encoding to use, quoting none of it."""
    from automask.server.limits import check_redis

    with pytest.raises(ServiceConfigError) as refused:
        check_redis(f"redis://user:{password}@127.0.0.1:{free_port()}/0")
    message = str(refused.value)
    assert "AUTOMASK_REDIS_URL" in message, message
    assert not [part for part in secret_parts if part in message], message
    if "/" in password:
        assert "percent-encoded (/ as %2F)" in message, message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:{port}/0?password=hun%40ter2", "redis://127.0.0.1:{port}/0"),
        ("redis://127.0.0.1:{port}/0?password=hun@ter2", "redis://(its address not shown)"),
        ("redis://someone:hunter2@127.0.0.1:{port}/0?db=0&password=hunter2", "redis://127.0.0.1:{port}/0"),
        ("unix://{tmp}/redis.sock?db=0&password=hunter2", "unix://{tmp}/redis.sock"),
        ("unix://:hunter2@{tmp}/redis.sock", "unix://{tmp}/redis.sock"),
    ],
)
def test_a_redis_password_in_the_urls_query_is_never_shown(tmp_path: Path, url: str, shown: str) -> None:
    """redis-py reads a password from the URL's query too (`?password=`, the usual form for a unix socket). Before:
    the start-up refusal showed the URL whole but for what came before an @: "Cannot connect to Redis at
    redis://127.0.0.1:P/0?password=hunter2", or "redis://ter2" for one with an @ in it. Now the query (its options,
    the password among them) is never shown: the scheme, host, port and database or socket path (none of them where an
    @ in the query leaves it unclear whether it ends a password)."""
    from automask.server.limits import check_redis

    port = free_port()
    with pytest.raises(ServiceConfigError) as refused:
        check_redis(url.format(port=port, tmp=tmp_path))
    message = str(refused.value)
    assert "hun" not in message and "ter2" not in message, message
    assert f"Cannot connect to Redis at {shown.format(port=port, tmp=tmp_path)}: " in message, message


def test_an_api_node_of_a_fleet_with_an_unreadable_redis_url_is_refused_without_the_password(tmp_path: Path) -> None:
    """Before: the fleet's dispatcher opened its Redis clients first: redis-py's ValueError, "internal error:
    ValueError: Port could not be cast to integer value as 'se'", exit 70. Now the same refusal as the start-up
    check's."""
    result = CliRunner().invoke(
        main,
        ["--data-dir", str(tmp_path / "data"), "serve", "--port", "0"],
        env={
            "AUTOMASK_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}",
            "AUTOMASK_BROKER_URL": f"amqp://u:p@127.0.0.1:{free_port()}/vh",
            "AUTOMASK_REDIS_URL": f"redis://:se/cret@127.0.0.1:{free_port()}/0",
        },
    )
    assert result.exit_code == 9, result.output
    assert "AUTOMASK_REDIS_URL is not a Redis URL" in result.output, result.output
    assert "cret" not in result.output and "'se'" not in result.output, result.output


def test_a_fleet_app_refused_for_an_unreadable_redis_url_leaves_no_thread_behind(tmp_path: Path) -> None:
    """Before: the fleet's dispatcher started its publish threads, then made its Redis clients: a URL redis-py cannot
    read refused the start (exit 9) with those threads left running, idle for ever, in a process that builds the app
    again (tests, an embedding program, `uvicorn --factory` retried). Now the URL is refused before any is started."""
    import threading

    from automask.server.app import create_app
    from automask.settings import Settings

    def publishers() -> int:
        return sum(t.name.startswith("automask-publish-") for t in threading.enumerate())

    before = publishers()
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        broker_url=f"amqp://u:p@127.0.0.1:{free_port()}/vh",
        redis_url=f"redis://:se/cret@127.0.0.1:{free_port()}/0",
    )
    with pytest.raises(ServiceConfigError, match="AUTOMASK_REDIS_URL is not a Redis URL"):
        create_app(settings)
    assert publishers() == before


@pytest.mark.parametrize("scheme", ["amqp", "redis"])
def test_an_api_node_whose_broker_cannot_be_reached_refuses_to_start(
    tmp_path: Path, redis_db: str, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """Before: `automask serve` with AUTOMASK_BROKER_URL checked that the URL could be read, not that the broker
    answered: it started, and every request handed to the workers then failed. Now it connects once at start, as a
    worker does (`check_broker`), and refuses to start (exit 9) naming the setting, without the password."""
    from automask.server import http

    served: list[object] = []
    monkeypatch.setattr(http, "run", lambda app, *args, **kwargs: served.append(app))  # (before: it served)
    closed = f"127.0.0.1:{free_port()}"
    broker = f"amqp://u:hunter2@{closed}/vh" if scheme == "amqp" else f"redis://:hunter2@{closed}/0"
    env = {
        "AUTOMASK_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}",
        "AUTOMASK_REDIS_URL": redis_db,
        "AUTOMASK_BROKER_URL": broker,
    }
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "serve", "--port", "0"], env=env)
    assert result.exit_code == 9 and not served, result.output
    assert f"Cannot connect to the broker at {scheme}://" in result.output, result.output
    assert (
        "Check AUTOMASK_BROKER_URL" in result.output and ("RabbitMQ" if scheme == "amqp" else "Redis") in result.output
    )
    assert "hunter2" not in result.output and "Traceback" not in result.output
