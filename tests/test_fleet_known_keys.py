"""Keys known to be good pass a failed-authentication lock-out on every API node of a fleet (AUTOMASK_REDIS_URL), not
only on the nodes where they already succeeded; a revoked key stops counting on all of them; Redis failing refuses,
never admits. Two API nodes (two apps on one database) share one real Redis server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from automask.cli import main
from automask.server import keys as keystore
from automask.server.auth_limit import Attempt, FailedAuth
from automask.server.errors import ApiError
from automask.server.known_keys import KNOWN_PREFIX, KNOWN_TTL, REFRESH, TIMEOUT, FleetKnown, fleet_secret
from automask.server.limits import RedisRateLimiter
from automask.server.store import Store
from server_helpers import FakeBackend, LiveServer, free_port, loopback_socket, process, wait_ready
from services import redis_server

MODELS = "/v1/models"


def get(url: str, token: str) -> int:
    """The status of `GET /v1/models` with `token`."""
    return httpx.get(f"{url}{MODELS}", headers={"x-api-key": token}, timeout=30).status_code


def node(data_dir: Path, redis_url: str, limit: int) -> LiveServer:
    """An API node (not started) on the database in `data_dir`, its limits in Redis at `redis_url`."""
    from automask.pipeline import MaskGenerator
    from automask.server.app import create_app
    from automask.server.config import ServerSettings
    from automask.settings import Settings

    settings = Settings(data_dir=data_dir, redis_url=redis_url)
    generator = MaskGenerator(FakeBackend(), settings)
    return LiveServer(create_app(settings, ServerSettings(auth_fail_limit=limit), generator))


@contextmanager
def two_nodes(data_dir: Path, redis_url: str, limit: int = 2) -> Iterator[tuple[str, str, Store]]:
    """Two running API nodes sharing a database and Redis: their URLs, and the database."""
    store = Store.in_data_dir(data_dir)
    with node(data_dir, redis_url, limit) as a, node(data_dir, redis_url, limit) as b:
        yield a.url, b.url, store
    store.close()


def lock_out(url: str, limit: int = 2) -> None:
    """Fail `limit` authentications from this address (127.0.0.1) at `url`: it is locked out on every node."""
    assert [get(url, "am_x_y") for _ in range(limit + 1)] == [401] * limit + [429]


def test_a_key_good_on_one_node_passes_a_lock_out_on_the_others(tmp_path: Path, redis_db: str) -> None:
    """Before: node B answered 429 to a key that had just succeeded on node A (B had not seen it succeed)."""
    import redis

    with two_nodes(tmp_path / "data", redis_db) as (a, b, store):
        key, good = keystore.create_key(store)
        _, fresh = keystore.create_key(store)
        assert get(a, good) == 200
        lock_out(b)
        assert get(b, fresh) == 429  # a valid key that never succeeded anywhere waits out the window, unread
        assert get(b, f"am_{key.id}_guess") == 429  # the known key's id with another secret: refused unread
        assert [get(b, good), get(a, good), get(b, good)] == [200, 200, 200]
        assert get(a, fresh) == 429
    client = redis.Redis.from_url(redis_db)
    assert client.keys(KNOWN_PREFIX + "*") == [f"{KNOWN_PREFIX}{key.id}".encode()]  # one entry per key id
    stored = client.get(f"{KNOWN_PREFIX}{key.id}")
    assert isinstance(stored, bytes) and len(stored) == 32  # an HMAC, not the key nor its plain SHA-256
    assert stored != hashlib.sha256(good.encode()).digest() and good.split("_")[2].encode() not in stored
    assert KNOWN_TTL - 60 < client.ttl(f"{KNOWN_PREFIX}{key.id}") <= KNOWN_TTL
    client.close()


def test_a_revoked_key_is_known_on_no_node(tmp_path: Path, redis_db: str) -> None:
    """Revoked with `automask keys revoke` (which clears Redis), a key is refused unread on a node that knew it only
    through Redis; a node that saw it succeed reads it once (403), then forgets it, in Redis too."""
    import redis

    with two_nodes(tmp_path / "data", redis_db) as (a, b, store):
        (first, one), (second, two) = keystore.create_key(store), keystore.create_key(store)
        assert [get(a, one), get(a, two)] == [200, 200]
        lock_out(a)
        assert get(b, one) == 200  # through Redis; B now knows it itself too
        env = {"AUTOMASK_REDIS_URL": redis_db}
        revoked = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "keys", "revoke", second.id], env=env)
        assert revoked.exit_code == 0, revoked.output
        assert get(b, two) == 429  # B never saw it succeed, and the fleet no longer vouches for it
        assert [get(a, two), get(a, two)] == [403, 429]  # A saw it succeed: one database read, refused, forgotten
        keystore.revoke_key(store, first.id)  # the store call alone: Redis is not told
        assert [get(a, one), get(a, one)] == [403, 429]
        assert [get(b, one), get(b, one)] == [403, 429]
    client = redis.Redis.from_url(redis_db)
    assert client.keys(KNOWN_PREFIX + "*") == []  # the 403s cleared the entries the store call left
    client.close()


@pytest.mark.services
def test_redis_down_refuses_and_never_admits(tmp_path: Path) -> None:
    """With Redis stopped, a node cannot read the lock-out: a key it has not seen succeed is refused 503 (the fleet's
    answer for its shared state gone), at once; never a 500, never served."""
    with redis_server() as rd, two_nodes(tmp_path / "data", rd.url) as (a, b, store):
        _, good = keystore.create_key(store)
        assert get(a, good) == 200
        lock_out(a)
        rd.stop()
        start = time.monotonic()
        r = httpx.get(f"{b}{MODELS}", headers={"x-api-key": good}, timeout=30)
        assert r.status_code == 503 and "shared state is unreachable" in r.json()["error"], r.text
        assert [get(b, "am_x_y"), get(a, "am_x_y")] == [503, 503]
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("redis_fails", ["stopped", "silent"])
def test_the_known_lookup_failing_keeps_the_lock_out(redis_db: str, redis_fails: str) -> None:
    """Redis answers the lock-out count but not the known-key lookup (refused, or never answering: bounded by
    `TIMEOUT`): the key counts as unknown, so the 429 stands."""
    import redis.asyncio as aioredis

    listener = loopback_socket()
    port = listener.getsockname()[1]
    if redis_fails == "silent":
        listener.listen()  # connections are taken, and never answered
    else:
        listener.close()  # nothing listens there
    broken = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    limiter = RedisRateLimiter(redis_db)
    failed_auth = FailedAuth(limiter, 1, FleetKnown(broken, b"s" * 32))

    async def run() -> float:
        try:
            await failed_auth.failed(Attempt("192.0.2.1"), "am_x_y")
            start = time.monotonic()
            with pytest.raises(ApiError) as refused:
                await failed_auth.admit("192.0.2.1", "am_abc_secret")
            assert refused.value.status == 429
            return time.monotonic() - start
        finally:
            await limiter.close()
            await broken.aclose()
            listener.close()

    assert asyncio.run(run()) < TIMEOUT + 1


def test_known_keys_are_recorded_once_and_refreshed(redis_db: str) -> None:
    """A node writes a key to Redis when it first sees it succeed and then only every `REFRESH` seconds (not on every
    request), with a `KNOWN_TTL` expiry; only the key's own failure clears it (not a forged one with its id)."""
    import redis.asyncio as aioredis

    now = [0.0]
    client = aioredis.Redis.from_url(redis_db)
    known = FleetKnown(client, b"k" * 32, clock=lambda: now[0])
    other = FleetKnown(client, b"z" * 32)  # another fleet's secret: the same entry vouches for nothing there
    token, name = "am_abc_secret", f"{KNOWN_PREFIX}abc"

    async def run() -> None:
        try:
            await known.succeeded(token)
            assert 0 < await client.ttl(name) <= KNOWN_TTL and known.has(token)
            assert await known.vouched(token) and not await other.vouched(token)
            await client.delete(name)
            now[0] += REFRESH - 1
            await known.succeeded(token)
            assert not await client.exists(name)  # known here, recorded lately: no write
            now[0] += 1
            await known.succeeded(token)
            assert await client.exists(name)  # refreshed
            await known.failed("am_abc_forged")
            assert await client.exists(name) and known.has(token)
            await known.failed(token)
            assert not await client.exists(name) and not known.has(token)
        finally:
            await client.aclose()

    asyncio.run(run())


def test_the_fleet_secret_is_made_once_and_kept_in_the_database(store: Store) -> None:
    """Nodes starting at once (threads here) all get the one secret the first of them made."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        secrets = list(pool.map(lambda _: fleet_secret(store), range(4)))
    assert len(secrets[0]) == 32 and secrets == [secrets[0]] * 4 == [fleet_secret(store)] * 4


def test_keys_revoke_with_redis_down_revokes_and_warns(tmp_path: Path) -> None:
    store = Store.in_data_dir(tmp_path / "data")
    key, _ = keystore.create_key(store)
    env = {"AUTOMASK_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}  # nothing listens there
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "keys", "revoke", key.id], env=env)
    assert result.exit_code == 0, result.output
    assert "warning: Redis (AUTOMASK_REDIS_URL) did not answer" in result.output and "hunter2" not in result.output
    assert keystore.get_key(store, key.id).disabled  # type: ignore[union-attr]
    store.close()


def test_keys_revoke_with_an_unreadable_redis_url_revokes_and_warns_without_the_password(tmp_path: Path) -> None:
    """Before: a password with an unencoded / made redis-py raise ValueError, which was not caught: "internal error"
    (exit 70) quoting a piece of the password, after the key was revoked. Now the same warning as Redis down."""
    store = Store.in_data_dir(tmp_path / "data")
    key, _ = keystore.create_key(store)
    env = {"AUTOMASK_REDIS_URL": f"redis://:hun/ter2@127.0.0.1:{free_port()}/0"}
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "keys", "revoke", key.id], env=env)
    assert result.exit_code == 0, result.output
    assert "warning: Redis (AUTOMASK_REDIS_URL)" in result.output, result.output
    assert "percent-encoded" in result.output and "hun" not in result.output and "ter2" not in result.output
    assert keystore.get_key(store, key.id).disabled  # type: ignore[union-attr]
    store.close()


@contextmanager
def node_processes(tmp_path: Path, database: str, redis_url: str, limit: int) -> Iterator[list[str]]:
    """Two API node processes (`tests/api_node.py`) on `database` and Redis at `redis_url`: their URLs."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUTOMASK_")},
        "AUTOMASK_DATABASE_URL": database,
        "AUTOMASK_REDIS_URL": redis_url,
        "AUTOMASK_SERVER_AUTH_FAIL_LIMIT": str(limit),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    urls: list[str] = []
    with contextlib.ExitStack() as stack:
        for name in ("a", "b"):
            port, data = free_port(), tmp_path / name
            env_node = {**env, "AUTOMASK_DATA_DIR": str(data)}
            cmd = [sys.executable, str(Path(__file__).parent / "api_node.py"), str(port)]
            proc = stack.enter_context(process(cmd, tmp_path / f"{name}.log", env_node))
            urls.append(f"http://127.0.0.1:{port}")
            wait_ready(urls[-1], 60, proc)
        yield urls


def test_a_new_keys_burst_over_two_node_processes_is_all_served(
    tmp_path: Path, postgres_db: str, redis_db: str
) -> None:
    """Before: a new valid key's requests sent at once to two API processes (one database, one Redis) were in part
    answered 429: a node's request finding no room waited only for the requests in flight on its own node, while the
    room was held by the other node's, still being read. Now the requests being read are known fleet-wide, and a
    refused one waits for them (here: node A's reads held by a lock on the keys table while node B is asked). Guesses
    still find no room past the limit."""
    import psycopg

    from automask.server.migrations import migrate

    store = Store(postgres_db)
    migrate(store)
    with node_processes(tmp_path, postgres_db, redis_db, 3) as (a, b):

        async def burst(token: str) -> list[int]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as client:

                def send(url: str, n: int) -> list[asyncio.Future[httpx.Response]]:
                    headers = {"x-api-key": token}
                    return [asyncio.ensure_future(client.get(f"{url}{MODELS}", headers=headers)) for _ in range(n)]

                with psycopg.connect(postgres_db) as locker:
                    locker.execute("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")  # A's reads wait for it
                    first = send(a, 5)
                    await asyncio.sleep(1.0)  # A's first three counted and reading: no room left
                    then = send(b, 10)
                    await asyncio.sleep(1.0)
                    locker.rollback()
                return [r.status_code for r in await asyncio.gather(*first, *then)]

        _, fresh = keystore.create_key(store)
        assert asyncio.run(burst(fresh)) == [200] * 15
        codes = [get(b, f"am_x_guess{n}") for n in range(5)]
        assert codes == [401] * 3 + [429] * 2, codes
    store.close()


@pytest.mark.services
def test_a_key_known_fleet_wide_does_not_wait_for_pending_counts(redis_db: str) -> None:
    """Before: a request of a locked-out address with a key another node knows to be good (`vouched`) first waited
    for every count of its address pending on any node (up to `PENDING`, 10 s: a guess's slow read, a dead node's
    count), and only then was let through. Now a refused request asks the fleet about its key before it waits."""

    async def run() -> None:
        limiter = RedisRateLimiter(redis_db)
        try:
            secret = b"s" * 32
            other = FailedAuth(limiter, 1, FleetKnown(limiter.client, secret))  # another node
            here = FailedAuth(limiter, 1, FleetKnown(limiter.client, secret))
            good = "am_goodkey_secret"
            await other.known.succeeded(good)  # known fleet-wide, not by this node
            held = await other.admit("192.0.2.12", "am_x_guess")  # a guess being read on the other node
            start = time.monotonic()
            attempt = await asyncio.wait_for(here.admit("192.0.2.12", good), 15)
            assert attempt.taken == [] and time.monotonic() - start < 1.0, time.monotonic() - start  # before: 10 s
            await other.failed(held, "am_x_guess")
        finally:
            await limiter.close()

    asyncio.run(run())
