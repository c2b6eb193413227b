"""The throwaway servers of tests/services.py really work, listen on loopback only and leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service_procs import LOOPBACK, Service, ServiceError, pid_alive, port_is_free
from services import PostgresServer, RabbitMQServer, RedisServer, postgres_server, rabbitmq_server, redis_server

pytestmark = pytest.mark.services


def listening_sockets(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds, read from /proc."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    hex_addr, hex_port = fields[1].split(":")
                    raw = bytes.fromhex(hex_addr)
                    # /proc stores the address as native-endian 32-bit words
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    found.add((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


def assert_loopback_only(server: Service) -> None:
    sockets = listening_sockets(server.pids)
    assert (LOOPBACK, server.port) in sockets, sockets
    assert {addr for addr, _ in sockets} <= {LOOPBACK, "::1"}, sockets


# ---- PostgreSQL ------------------------------------------------------------------------------------------------


def test_postgres_answers_queries(postgres_service: PostgresServer, postgres_url: str) -> None:
    import psycopg

    assert postgres_url == f"postgresql://automask:automask@127.0.0.1:{postgres_service.port}/automask"
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT current_user, current_database(), 6 * 7, current_setting('server_version_num')::int")
        user, database, answer, version = row.fetchone() or ()
        assert (user, database, answer) == ("automask", "automask", 42) and version >= 150000
        assert conn.execute("SELECT current_setting('fsync')").fetchone() == ("off",)
    assert_loopback_only(postgres_service)


def test_postgres_checks_the_password(postgres_service: PostgresServer) -> None:
    import psycopg

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_service.url.replace(":automask@", ":wrong@"), connect_timeout=5)


def test_postgres_db_is_fresh_and_dropped(postgres_service: PostgresServer, postgres_db: str) -> None:
    import psycopg

    name = postgres_db.rsplit("/", 1)[1]
    assert name.startswith("t_") and postgres_db == postgres_service.url_for(name)
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        conn.execute("CREATE TABLE jobs (id int PRIMARY KEY)")
        other = postgres_service.create_database()
        with psycopg.connect(postgres_service.url_for(other)) as fresh:  # a second one does not see `jobs`
            assert fresh.execute("SELECT to_regclass('jobs')").fetchone() == (None,)
        postgres_service.drop_database(other)  # dropped although `fresh`'s pool might hold it: WITH (FORCE)
    with postgres_service.connect() as admin:
        names = {row[0] for row in admin.execute("SELECT datname FROM pg_database")}
    assert name in names and other not in names


# ---- Redis -----------------------------------------------------------------------------------------------------

# a sliding-window limiter step: the shape the shared rate limits use
LIMIT_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then return -1 end
return n
"""


def test_redis_set_get_and_lua(redis_service: RedisServer, redis_db: str) -> None:
    import redis

    assert redis_db == f"redis://127.0.0.1:{redis_service.port}/0"
    with redis.Redis.from_url(redis_db) as client:
        assert client.set("handoff:abc", b"\x00\xffpng") and client.get("handoff:abc") == b"\x00\xffpng"
        answers = [client.eval(LIMIT_SCRIPT, 1, "rate:key1", 3, 60_000) for _ in range(5)]
        assert answers == [1, 2, 3, -1, -1]
        assert 0 < client.pttl("rate:key1") <= 60_000
    with redis.Redis.from_url(redis_db.replace("/0", "/5")) as other:
        other.set("left-over", 1)  # the next test must not see this (redis_db flushes every db)
    assert_loopback_only(redis_service)


def test_redis_db_starts_empty(redis_url: str, redis_db: str) -> None:
    import redis

    assert redis_db == redis_url
    with redis.Redis.from_url(redis_url.replace("/0", "/5")) as client:
        assert client.dbsize() == 0
        client.set("left-over", 1)
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


# ---- RabbitMQ --------------------------------------------------------------------------------------------------


def quorum_queue(name: str, delivery_limit: int) -> Any:
    from kombu import Exchange, Queue

    args = {"x-queue-type": "quorum", "x-delivery-limit": delivery_limit}
    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True, queue_arguments=args)


def get_one(conn: Any, queue: Any, timeout: float = 10.0) -> Any:
    """The next message on `queue` (not acked), or AssertionError after `timeout` seconds."""
    messages: list[Any] = []
    with conn.Consumer(queue, callbacks=[lambda body, message: messages.append(message)], prefetch_count=1):
        deadline = time.monotonic() + timeout
        while not messages and time.monotonic() < deadline:
            with contextlib.suppress(socket.timeout, TimeoutError):
                conn.drain_events(timeout=0.5)
    assert messages, f"no message on {queue.name} within {timeout} s"
    return messages[0]


def publish(url: str, queue: Any, body: dict[str, Any]) -> None:
    from kombu import Connection

    with Connection(url) as conn:
        conn.Producer().publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue])


def test_rabbitmq_quorum_queue_round_trip(rabbitmq_service: RabbitMQServer, rabbitmq_vhost_url: str) -> None:
    from kombu import Connection

    vhost = rabbitmq_vhost_url.rsplit("/", 1)[1]
    queue = quorum_queue("masks", delivery_limit=3)
    publish(rabbitmq_vhost_url, queue, {"job": 1})
    with Connection(rabbitmq_vhost_url) as conn:
        message = get_one(conn, queue)
        assert message.payload == {"job": 1} and not message.delivery_info["redelivered"]
        message.ack()
    listed = rabbitmq_service.ctl("list_queues", "-p", vhost, "name", "type", "arguments", "messages")
    assert "masks\tquorum" in listed and "x-delivery-limit" in listed and listed.rstrip().endswith("\t0"), listed
    assert_loopback_only(rabbitmq_service)


def test_rabbitmq_redelivers_when_a_consumer_drops(rabbitmq_vhost_url: str) -> None:
    """A worker that dies holding an unacked job: its socket closes and another worker gets the job."""
    from kombu import Connection

    queue = quorum_queue("work", delivery_limit=5)
    publish(rabbitmq_vhost_url, queue, {"job": 2})
    dying = Connection(rabbitmq_vhost_url)
    first = get_one(dying, queue)
    assert first.payload == {"job": 2}
    with Connection(rabbitmq_vhost_url) as survivor:
        survivor.default_channel.basic_qos(0, 1, False)
        t0 = time.perf_counter()
        dying.connection.sock.shutdown(socket.SHUT_RDWR)  # what the kernel does when a worker is killed
        dying.connection.sock.close()
        second = get_one(survivor, queue)
        redelivery_s = time.perf_counter() - t0
        second.ack()
    dying.release()
    assert second.payload == {"job": 2} and second.delivery_info["redelivered"]
    assert second.headers.get("x-delivery-count") == 1
    print(f"redelivery after a consumer's connection dropped: {redelivery_s * 1000:.0f} ms")


def test_rabbitmq_delivery_limit_drops_a_poison_job(rabbitmq_vhost_url: str) -> None:
    from kombu import Connection

    queue = quorum_queue("poison", delivery_limit=1)
    publish(rabbitmq_vhost_url, queue, {"job": 3})
    with Connection(rabbitmq_vhost_url) as conn:
        get_one(conn, queue).requeue()  # delivery 1 returned: count 1, still under the limit
        again = get_one(conn, queue)
        assert again.headers.get("x-delivery-count") == 1
        again.requeue()  # count 2 > limit 1: dropped (no dead-letter exchange is set)
        simple = conn.SimpleQueue(queue)
        with pytest.raises(simple.Empty):
            simple.get(timeout=1.5)
        simple.close()


def test_rabbitmq_vhosts_are_isolated(rabbitmq_service: RabbitMQServer, rabbitmq_vhost_url: str) -> None:
    from amqp.exceptions import NotFound
    from kombu import Connection

    queue = quorum_queue("only-here", delivery_limit=3)
    publish(rabbitmq_vhost_url, queue, {"job": 4})
    other = rabbitmq_service.add_vhost()
    with Connection(rabbitmq_service.vhost_url(other)) as conn, pytest.raises(NotFound):
        queue(conn.default_channel).queue_declare(passive=True)
    rabbitmq_service.ctl("delete_vhost", other)
    assert other not in rabbitmq_service.ctl("list_vhosts").split()


# ---- missing servers, stop() ---------------------------------------------------------------------------------

STARTERS: dict[str, Callable[[], Any]] = {
    "postgres": postgres_server,
    "redis": redis_server,
    "rabbitmq": rabbitmq_server,
}


@pytest.mark.parametrize("kind", list(STARTERS))
def test_stop_leaves_no_process_port_or_folder(kind: str) -> None:
    with STARTERS[kind]() as server:
        pids, port, workdir = list(server.pids), server.port, server.workdir
        ports = [port, getattr(server, "_epmd_port", port)]
        assert pids and pid_alive(pids[0])  # the server (PostgreSQL's short-lived children may be gone already)
        assert not any(port_is_free(p) for p in ports) and workdir.is_dir()
        print(f"{kind} started in {server.startup_s:.2f} s with {len(pids)} processes")
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert all(port_is_free(p) for p in ports) and not workdir.exists()
    server.stop()  # idempotent


@pytest.mark.parametrize("ci", ["", "1"])
def test_a_missing_binary_skips_with_the_fix_or_fails_under_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    import services

    monkeypatch.setattr(services, "PG_ROOT", Path("/nonexistent"))
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(
        expected, match=r"initdb not found: install the servers with `sudo apt-get install -y postgresql"
    ):
        PostgresServer().start()


def test_a_server_that_cannot_start_fails_fast_with_its_log(monkeypatch: pytest.MonkeyPatch) -> None:
    import services

    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(services, "free_port", lambda: port)
        server = RedisServer(timeout=30)
        t0 = time.perf_counter()
        with pytest.raises(ServiceError, match=r"(?s)redis-server exited with 1; log:.*Address already in use"):
            server.start()
    assert time.perf_counter() - t0 < 10 and server.workdir is None
