"""Failed authentications are limited per client address: past `auth_fail_limit` a minute the address is answered
429 before the database is read, for the rest of the window; requests with a key known to be good still pass. Each
through a live server on loopback, or the piece that enforces it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from automask.server import keys as keystore
from automask.server.auth_limit import SITE_FACTOR, Attempt, FailedAuth, client_address
from automask.server.errors import ApiError
from automask.server.known_keys import Known
from automask.server.limits import MAX_COUNTED, WINDOW, RateLimiter, RedisRateLimiter
from automask.server.store import Store
from server_helpers import FakeBackend, LiveServer, live_server

MODELS = "/v1/models"


class Clock:
    """A settable clock (UNIX seconds) for the limiter."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limited(live: LiveServer, limit: int, clock: Clock) -> FailedAuth:
    """Give the server a failed-authentication limit on `clock` (before it serves)."""
    failed_auth = FailedAuth(RateLimiter(clock=clock), limit)
    live.app.state.automask.failed_auth = failed_auth
    return failed_auth


def counting_authenticate(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Record each token `keys.authenticate` is asked about (each one a database read)."""
    calls: list[str | None] = []
    real = keystore.authenticate

    def spy(store: Store, token: str | None) -> keystore.ApiKey:
        calls.append(token)
        return real(store, token)

    monkeypatch.setattr(keystore, "authenticate", spy)
    return calls


def get(url: str, token: str | None = None, **headers: str) -> httpx.Response:
    return httpx.get(f"{url}{MODELS}", headers={**({"x-api-key": token} if token else {}), **headers})


def test_bad_keys_past_the_limit_are_429_unread_and_known_keys_still_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every bad key cost a database read and a SHA-256, without end."""
    clock = Clock()
    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        used, good = keystore.create_key(store)
        _, fresh = keystore.create_key(store)
        revoked, gone = keystore.create_key(store)
        keystore.revoke_key(store, revoked.id)
        limited(live, 3, clock)
        assert get(live.url, good).status_code == 200  # a key seen to succeed before the lock-out
        calls = counting_authenticate(monkeypatch)
        codes = [get(live.url, token).status_code for token in (None, f"am_{used.id}_wrong", gone)]
        assert codes == [401, 401, 403] and len(calls) == 3
        for token in (f"am_{used.id}_guess", None, gone, fresh):  # a valid key never seen here waits too
            r = get(live.url, token)
            assert r.status_code == 429, r.text
            assert "Rate limit of 3 failed authentications per minute" in r.json()["error"]
            assert r.headers["retry-after"] == "60" and r.headers["x-rate-limit-reset-at-utc"].endswith("Z")
        assert len(calls) == 3  # refused before the database was read
        assert get(live.url, good).status_code == 200  # the known key: served (read once more, as any request)
        assert calls[-1] == good
        clock.now += WINDOW / 2
        assert get(live.url, "am_x_y").headers["retry-after"] == "30"
        clock.now += WINDOW / 2  # the window has passed: counted afresh
        assert [get(live.url, fresh).status_code, get(live.url, "am_x_y").status_code] == [200, 401]
        store.close()


def test_successful_requests_do_not_count(tmp_path: Path) -> None:
    clock = Clock()
    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        _, good = keystore.create_key(store)
        limited(live, 2, clock)
        assert [get(live.url, good).status_code for _ in range(5)] == [200] * 5
        assert [get(live.url, "am_x_y").status_code for _ in range(3)] == [401, 401, 429]
        store.close()


def test_guesses_sent_at_once_are_read_no_more_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: an address's failures were counted only once the database had refused them, so guesses sent together
    all passed the look at the count first: 150 at once with a limit of 5 had about 50 read (as many as were in flight).
    Now each guess takes its place in the count before the database is read: at most the limit are read, however
    many come at once. A valid key's requests take their place only while the database reads them: none is left."""
    clock = Clock()
    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        _, good = keystore.create_key(store)
        limited(live, 5, clock)
        calls = counting_authenticate(monkeypatch)

        async def flood() -> list[int]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=150)) as client:
                sent = [
                    client.get(f"{live.url}{MODELS}", headers={"x-api-key": f"am_{n:012x}_guess"}) for n in range(150)
                ]
                return [r.status_code for r in await asyncio.gather(*sent)]

        codes = asyncio.run(flood())
        assert codes.count(401) == 5 and codes.count(429) == 145 and len(calls) == 5
        clock.now += WINDOW
        assert [get(live.url, good).status_code for _ in range(7)] == [200] * 7  # none of them counted
        assert [get(live.url, "am_x_y").status_code for _ in range(6)] == [401] * 5 + [429]
        store.close()


def test_a_new_keys_first_requests_sent_at_once_are_all_served(tmp_path: Path) -> None:
    """A valid key's requests take their place in the count of failures only while the database reads them; the
    ones that find no room wait for those in flight (the first to succeed makes the key known to be good), rather than
    being refused 429 for failures that never happened. Guesses among them still find no room."""
    clock = Clock()
    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        _, fresh = keystore.create_key(store)
        failed_auth = limited(live, 3, clock)

        async def burst(tokens: list[str]) -> list[int]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=len(tokens))) as client:
                sent = [client.get(f"{live.url}{MODELS}", headers={"x-api-key": token}) for token in tokens]
                return [r.status_code for r in await asyncio.gather(*sent)]

        assert asyncio.run(burst([fresh] * 40)) == [200] * 40
        assert failed_auth.known.has(fresh) and len(failed_auth.limiter) == 0  # nothing left counted
        codes = asyncio.run(burst(["am_x_guess"] * 20))
        assert codes.count(401) == 3 and codes.count(429) == 17
        store.close()


class Answered(RateLimiter):
    """An in-memory limiter whose answers reach their requests when the test lets them (`gates`, one per `hit`, in
    the order asked), as Redis's do: in any order, after other requests have moved on. Each counts when asked."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.gates: list[asyncio.Event] = []

    async def hit(self, key_id: str, limit: int | None, what: str = "requests", count: bool = True, **_: Any) -> Any:
        gate = asyncio.Event()
        self.gates.append(gate)
        try:
            return self.check(key_id, limit, what, count)
        finally:
            await gate.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("first_answered", ["refusal", "count"])
def test_a_new_keys_request_refused_by_a_limiter_answering_late_still_passes(first_answered: str) -> None:
    """Before: with Redis, a request of a new valid key refused for want of room was answered 429 when the limiter's
    answer reached it after the request holding that room (a) had been counted but not yet told so (answers arrive
    in any order: it was not yet seen in flight), or (b) had already made the key known: 35 of 40 requests sent at
    once, in one run out of ten. Now a request being counted is in flight from the moment it asks, and a refused one
    that finds its key known passes."""
    token = "am_new_key"

    async def run() -> None:
        limiter = Answered(Clock())
        auth = FailedAuth(limiter, 1)
        first = asyncio.create_task(auth.admit("192.0.2.1", token))
        second = asyncio.create_task(auth.admit("192.0.2.1", token))
        await settle()  # both asked: the first counted, the second refused
        if first_answered == "refusal":
            limiter.gates[1].set()
            await settle()
            limiter.gates[0].set()
            attempt = await first
            await settle()
            assert not second.done()  # waits for the first
            await auth.succeeded(attempt, token)
        else:
            limiter.gates[0].set()
            await auth.succeeded(await first, token)
            limiter.gates[1].set()
        again = await second
        assert not again.taken and len(limiter) == 0  # passed as a known key: nothing counted
        limiter.gates.clear()
        third = asyncio.create_task(auth.admit("192.0.2.1", "am_x_guess"))  # a guess still counts
        await settle()
        limiter.gates[0].set()
        await auth.failed(await third, "am_x_guess")
        assert len(limiter) == 1

    asyncio.run(run())


def test_a_new_keys_first_requests_sent_at_once_are_all_served_with_redis(tmp_path: Path, redis_db: str) -> None:
    """As `test_a_new_keys_first_requests_sent_at_once_are_all_served`, counted in Redis (whose answers arrive in any
    order). Before: in one burst of 40 out of ten, most were answered 429."""
    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        for burst in range(5):
            _, fresh = keystore.create_key(store)
            live.app.state.automask.failed_auth = FailedAuth(RedisRateLimiter(redis_db, prefix=f"b{burst}:"), 3)

            async def send(token: str) -> list[int]:
                async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as client:
                    sent = [client.get(f"{live.url}{MODELS}", headers={"x-api-key": token}) for _ in range(40)]
                    return [r.status_code for r in await asyncio.gather(*sent)]

            assert asyncio.run(send(fresh)) == [200] * 40
        store.close()


def test_a_guess_refused_while_others_are_counted_waits_only_while_they_are_in_flight() -> None:
    """A guess refused while another of its address is being counted waits for it; once nothing of its address is in
    flight, it is answered 429, without asking the limiter again for each other refusal."""

    async def run() -> None:
        limiter = Answered(Clock())
        auth = FailedAuth(limiter, 1)
        tasks = [asyncio.create_task(auth.admit("192.0.2.1", f"am_x_guess{n}")) for n in range(3)]
        await settle()
        for gate in limiter.gates[1:]:
            gate.set()
        await settle()
        assert not any(task.done() for task in tasks) and len(limiter.gates) == 3  # waiting, not asking again
        limiter.gates[0].set()
        await auth.failed(await tasks[0], "am_x_guess0")
        for gate in limiter.gates[3:]:
            gate.set()
        await settle()
        for gate in limiter.gates[3:]:
            gate.set()
        for task in tasks[1:]:
            with pytest.raises(ApiError) as refused:
                await task
            assert refused.value.status == 429
        assert len(limiter) == 1 and not auth._in_flight and not auth._ended

    asyncio.run(run())


def test_a_guess_refused_while_another_read_is_stuck_waits_pending_seconds_at_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: a request refused while another of its address was in flight waited for it with no bound of its own:
    each database read is bounded, but a read queued behind others for a database thread is not, so the refused one
    hung as long. Now the whole wait ends `PENDING` seconds after the request came (as the fleet's wait for pending
    counts does), and it is answered 429; the request in flight is left as it was."""
    from automask.server import auth_limit

    monkeypatch.setattr(auth_limit, "PENDING", 0.3)

    async def run() -> None:
        auth = FailedAuth(RateLimiter(clock=Clock()), 1)
        held = await auth.admit("192.0.2.1", "am_x_guess0")  # admitted, its read never ends
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ApiError) as refused:
            await asyncio.wait_for(auth.admit("192.0.2.1", "am_x_guess1"), 5)  # before: waited until cut here
        assert refused.value.status == 429 and "Retry-After" in refused.value.headers
        assert 0.25 < loop.time() - started < 2
        assert auth._in_flight == {"192.0.2.1": 1}
        await auth.failed(held, "am_x_guess0")
        assert not auth._in_flight and not auth._ended

    asyncio.run(run())


def test_a_revoked_key_is_no_longer_known_to_be_good(tmp_path: Path) -> None:
    clock = Clock()
    with live_server(tmp_path / "data", FakeBackend()) as live:
        store = Store.in_data_dir(tmp_path / "data")
        key, token = keystore.create_key(store)
        failed_auth = limited(live, 1, clock)
        assert get(live.url, token).status_code == 200 and failed_auth.known.has(token)
        keystore.revoke_key(store, key.id)
        assert get(live.url, token).status_code == 403 and not failed_auth.known.has(token)
        assert get(live.url, token).status_code == 429
        store.close()


class ConfiguredServer(LiveServer):
    """A `LiveServer` run with the uvicorn configuration `automask serve` uses (`http.config_for`)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from automask.server.config import ServerSettings
        from automask.server.http import config_for

        super().__init__(app)
        self.server = uvicorn.Server(config_for(app, ServerSettings()))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)


@pytest.mark.parametrize("trusted", [None, "192.0.2.1"])
def test_a_forwarded_address_counts_only_from_a_trusted_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trusted: str | None
) -> None:
    """The client is who a trusted proxy says (uvicorn's FORWARDED_ALLOW_IPS, by default loopback: the reverse proxy
    the README shows), each forwarded client counted apart; from any other peer X-Forwarded-For is ignored, so a
    client cannot pick a fresh address for each guess."""
    if trusted is None:
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    else:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", trusted)  # the test's peer (127.0.0.1) is not trusted
    unused = live_server(tmp_path / "data", FakeBackend())  # for its app
    unused.sock.close()
    with ConfiguredServer(unused.app) as live:
        limited(live, 2, Clock())
        codes = [get(live.url, "am_x_y", **{"x-forwarded-for": f"203.0.113.{n}"}).status_code for n in range(4)]
        assert codes == ([401] * 4 if trusted is None else [401, 401, 429, 429])
        if trusted is None:
            same = [get(live.url, "am_x_y", **{"x-forwarded-for": "198.51.100.7"}).status_code for _ in range(3)]
            assert same == [401, 401, 429]


def test_the_in_process_limiter_keeps_at_most_max_keys() -> None:
    """Before: one entry per key ever counted, kept for good; many client addresses would grow it without end."""
    clock = Clock()
    limiter = RateLimiter(clock=clock, max_keys=100)
    for n in range(10_000):
        limiter.check(f"auth-fail:10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 5)
    assert len(limiter) == 100
    for _ in range(5):
        limiter.check("recent", 5)
    with pytest.raises(ApiError):  # the most recently counted keys are the ones kept
        limiter.check("recent", 5)
    clock.now += WINDOW
    limiter.check("later", 5)
    assert len(limiter) == 1  # keys whose requests all left the window are dropped
    limiter.check("peek", 5, count=False)
    assert len(limiter) == 1  # looking counts nothing and keeps nothing


def test_a_flood_of_failing_ipv6_networks_costs_the_limiter_tens_of_megabytes_not_a_hundred() -> None:
    """Before: each client address counted held a deque (~760 bytes even for one failure): a flood of failed
    authentications from 100,000 IPv6 /64s (`MAX_COUNTED`) held ~95 MB. Now each holds its times as 8-byte doubles:
    under 40 MB, the counts and the lock-out unchanged."""
    import ipaddress
    import tracemalloc

    limiter = RateLimiter(clock=Clock())
    networks = [client_address(str(ipaddress.IPv6Address((0x20010DB8 << 96) | (n << 64) | 1))) for n in range(100_000)]
    tracemalloc.start()
    try:
        for network in networks:
            limiter.check(f"auth-fail:{network}", 60, "failed authentications")
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(limiter) == MAX_COUNTED and held < 40_000_000, held  # before: ~95 MB
    for _ in range(59):
        limiter.check(f"auth-fail:{networks[0]}", 60, "failed authentications")
    with pytest.raises(ApiError) as refused:
        limiter.check(f"auth-fail:{networks[0]}", 60, "failed authentications")
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "60"


def test_a_flood_from_many_ipv6_64s_of_one_site_is_locked_out_as_the_site() -> None:
    """Before: each /64 was counted apart, so one site (a /48: 65,536 /64s) got 65,536 times the limit of guesses a
    minute, each a database read, and as many entries in the limiter. Now its /64s together get `SITE_FACTOR` times
    the limit; another site, an IPv4 client and a key known to be good are not affected."""
    limiter = RateLimiter(clock=Clock())
    auth = FailedAuth(limiter, 3)
    site = [client_address(f"2001:db8:1:{n:x}::1") for n in range(100)]

    async def guesses(addresses: list[str], token: str) -> int:
        """How many of 3 guesses from each address got to the database (each failing)."""
        read = 0
        for address in addresses:
            for _ in range(3):
                try:
                    attempt = await auth.admit(address, token)
                except ApiError as refused:
                    assert refused.status == 429
                    continue
                read += 1
                await auth.failed(attempt, token)
        return read

    assert asyncio.run(guesses(site, "am_x_guess")) == 3 * SITE_FACTOR  # before: 300
    assert len(limiter) == SITE_FACTOR + 1  # the /64s that guessed, and their /48
    assert asyncio.run(guesses([client_address("2001:db8:2::1"), "192.0.2.1"], "am_x_guess")) == 6
    asyncio.run(auth.succeeded(Attempt("192.0.2.9"), "am_good_key"))
    asyncio.run(auth.admit(site[-1], "am_good_key"))  # passes the site's lock-out


def test_known_keys_are_digests_and_bounded() -> None:
    known = Known(capacity=3)
    for n in range(10):
        known.add(f"am_k_{n}")
    assert len(known) == 3 and known.has("am_k_9") and not known.has("am_k_0") and not known.has(None)
    assert all(isinstance(d, bytes) and len(d) == 32 for d in known._digests)
    known.forget("am_k_9")
    assert not known.has("am_k_9")


def test_the_client_address() -> None:
    assert client_address("192.0.2.1") == "192.0.2.1"
    assert client_address("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_address("2001:db8:1:2:3:4:5:6") == client_address("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert client_address(None) == "unknown"


def test_a_port_forwarded_with_the_address_is_not_part_of_it() -> None:
    """Before: a trusted proxy that forwards "ip:port" in X-Forwarded-For (some load balancers do) had each of a
    guesser's connections counted apart, so the lock-out never came."""
    assert client_address("192.0.2.1:5678") == client_address("192.0.2.1:40000") == "192.0.2.1"
    assert client_address("[2001:db8:1:2::9]:443") == client_address("[2001:db8:1:2::7]") == "2001:db8:1:2::/64"
    assert client_address("[::ffff:192.0.2.1]:80") == "192.0.2.1"
    assert client_address("not-an-ip") == "not-an-ip"


@pytest.mark.services
def test_failed_authentications_are_counted_across_the_fleet(redis_db: str) -> None:
    """The fleet's limiter (Redis) keeps the counts: the same lock-out on every node, each count expiring with its
    window."""
    import redis

    limiter = RedisRateLimiter(redis_db)
    failed_auth = FailedAuth(limiter, 2)

    async def run() -> None:
        try:
            for _ in range(2):
                await failed_auth.failed(await failed_auth.admit("192.0.2.1", "am_x_y"), "am_x_y")
            with pytest.raises(ApiError, match="Rate limit of 2 failed authentications per minute") as refused:
                await failed_auth.admit("192.0.2.1", "am_x_y")
            assert refused.value.status == 429 and 1 <= int(refused.value.headers["Retry-After"]) <= 60
            good = await failed_auth.admit("192.0.2.2", "am_good")  # per address
            await failed_auth.succeeded(good, "am_good")  # its count given back
            await failed_auth.admit("192.0.2.1", "am_good")  # a known key passes
            await failed_auth.failed(Attempt("192.0.2.1"), "am_good")  # revoked in flight: limit reached, no error
        finally:
            await limiter.close()

    asyncio.run(run())
    client = redis.Redis.from_url(redis_db)
    assert client.zcard("automask:rate:{auth-fail:192.0.2.1}") == 2
    assert 0 < client.pttl("automask:rate:{auth-fail:192.0.2.1}") <= WINDOW * 1000
    assert not client.exists("automask:rate:{auth-fail:192.0.2.2}")  # a key that authenticated counts nothing
    client.close()


def test_the_limit_is_60_a_minute_and_none_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from automask.server.config import ServerSettings

    monkeypatch.delenv("AUTOMASK_SERVER_AUTH_FAIL_LIMIT", raising=False)
    assert ServerSettings().auth_fail_limit == 60
    monkeypatch.setenv("AUTOMASK_SERVER_AUTH_FAIL_LIMIT", "none")
    assert ServerSettings().auth_fail_limit is None
    limiter = RateLimiter(clock=Clock())
    failed_auth = FailedAuth(limiter, None)

    async def run() -> None:
        for _ in range(100):
            await failed_auth.failed(Attempt("192.0.2.1"), "am_x_y")
        await failed_auth.admit("192.0.2.1", "am_x_y")

    asyncio.run(run())
    assert len(limiter) == 0  # nothing counted


@pytest.mark.parametrize(
    ("env", "flags", "limits"),
    [
        ({}, [], (6000, 60)),
        ({}, ["--poll-rate-limit", "12", "--auth-fail-limit", "3"], (12, 3)),
        (
            {"AUTOMASK_SERVER_AUTH_FAIL_LIMIT": "9"},
            ["--poll-rate-limit", "none", "--auth-fail-limit", "None"],
            (None, None),
        ),
        (
            {"AUTOMASK_SERVER_POLL_RATE_LIMIT": "none", "AUTOMASK_SERVER_AUTH_FAIL_LIMIT": "none"},
            ["--auth-fail-limit", "5"],
            (None, 5),
        ),
    ],
)
def test_serve_flags_set_the_poll_and_auth_fail_limits(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    env: dict[str, str],
    flags: list[str],
    limits: tuple[int | None, ...],
) -> None:
    """`--poll-rate-limit` and `--auth-fail-limit` (N or none) win over their environment variables, reach the app."""
    from click.testing import CliRunner

    from automask.cli import main
    from automask.server import http
    from server_helpers import loopback_socket

    served: list[Any] = []
    monkeypatch.setattr(http, "listen", lambda server: [loopback_socket()])  # not 127.0.0.1:8000 itself
    monkeypatch.setattr(http, "run", lambda app, server, log_level="info", sockets=(), **_: served.append(app))
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "serve", *flags], env=env)
    assert result.exit_code == 0, result.output
    state = served[0].state.automask
    assert (state.server.poll_rate_limit, state.failed_auth.limit) == limits


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5", ""])
@pytest.mark.parametrize("flag", ["--poll-rate-limit", "--auth-fail-limit"])
def test_bad_limit_flags_are_usage_errors(tmp_path: Path, flag: str, value: str) -> None:
    from click.testing import CliRunner

    from automask.cli import main

    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "serve", flag, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}': '{value}': give a whole number a minute, 1 or more, or 'none'" in result.output


@pytest.mark.services
def test_counts_pending_on_other_nodes_are_waited_for_boundedly(redis_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A count taken with `pending` is pending until settled (a failure: it stays) or taken back, atomically with
    the count; a request refused meanwhile is told how many are pending. One refused while another node's count is
    pending waits for it, and is answered 429 once it settles; one pending for ever (its node died) is waited for
    `PENDING` seconds at most."""
    from automask.server import auth_limit
    from automask.server.limits import RateLimited

    async def run() -> None:
        limiter = RedisRateLimiter(redis_db)
        try:
            receipt = await limiter.hit("k", 1, pending=30)
            assert receipt is not None
            with pytest.raises(RateLimited) as refused:
                await limiter.hit("k", 1, pending=30)
            assert refused.value.pending == 1
            await limiter.settle("k", receipt)
            with pytest.raises(RateLimited) as refused:
                await limiter.hit("k", 1, pending=30)
            assert refused.value.pending == 0  # settled: counted, no longer pending
            await limiter.uncount("k", receipt)
            assert await limiter.hit("k", 1) is not None

            other, here = FailedAuth(limiter, 1), FailedAuth(limiter, 1)  # two nodes
            held = await other.admit("192.0.2.9", "am_x_a")  # being read on the other node
            waiting = asyncio.create_task(here.admit("192.0.2.9", "am_x_b"))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # waits for the other node's count
            await other.failed(held, "am_x_a")
            with pytest.raises(ApiError) as refused_429:
                await asyncio.wait_for(waiting, 2)
            assert refused_429.value.status == 429

            monkeypatch.setattr(auth_limit, "PENDING", 0.5)
            await other.admit("192.0.2.10", "am_x_c")  # never ends: its node died
            start = asyncio.get_running_loop().time()
            with pytest.raises(ApiError) as refused_429:
                await here.admit("192.0.2.10", "am_x_d")
            assert refused_429.value.status == 429 and asyncio.get_running_loop().time() - start < 2
        finally:
            await limiter.close()

    asyncio.run(run())


@pytest.mark.services
def test_a_flood_refused_while_a_count_is_pending_waits_only_so_many_at_once(redis_db: str) -> None:
    """Before: every request of a locked-out address refused while one of its counts was pending (on another node:
    its read slow, or its node dead) waited for it, up to `PENDING` seconds, looking at Redis every 10 to 200 ms: a
    flood of guesses held as many connections, each with its Redis looks, as it sent. Now at most `MAX_POLLING` of
    one address wait so at once in a process; the others are answered 429 at once, and the waiting ones once the
    count ends."""
    from automask.server.auth_limit import MAX_POLLING

    async def run() -> None:
        limiter = RedisRateLimiter(redis_db)
        try:
            other, here = FailedAuth(limiter, 1), FailedAuth(limiter, 1)  # two nodes
            held = await other.admit("192.0.2.11", "am_x_a")  # being read on the other node
            flood = [asyncio.create_task(here.admit("192.0.2.11", f"am_x_g{n}")) for n in range(MAX_POLLING + 20)]
            for _ in range(80):  # the 20 past the cap are answered at once; a loaded machine may take a while
                await asyncio.sleep(0.1)  # (8 s at most: below PENDING, before which no waiting one ends)
                if sum(task.done() for task in flood) >= 20:
                    break
            await asyncio.sleep(0.2)
            refused = [task for task in flood if task.done()]
            assert len(refused) == 20, len(refused)  # before: 0, all waiting
            assert all(getattr(task.exception(), "status", None) == 429 for task in refused)
            await other.failed(held, "am_x_a")
            ended = await asyncio.wait_for(asyncio.gather(*flood, return_exceptions=True), 5)
            assert all(isinstance(e, ApiError) and e.status == 429 for e in ended)
            assert here._polling == {} and here._in_flight == {}  # none left counted as waiting
        finally:
            await limiter.close()

    asyncio.run(run())


@pytest.mark.services
def test_more_redis_calls_at_once_than_its_pool_holds_wait_for_a_connection(redis_db: str) -> None:
    """Before: redis-py's asyncio pool opens 100 connections at most and fails the next call at once
    (MaxConnectionsError, a `RedisError`), so a node counting more than 100 requests at once in Redis (a burst of
    them, or requests waiting for pending counts) answered some of them 503 "shared state unreachable" with Redis
    healthy. Now a call waits for a free connection, `REDIS_TIMEOUT` at most."""

    async def run() -> None:
        limiter = RedisRateLimiter(redis_db)
        try:
            got = await asyncio.gather(*(limiter.hit(f"burst-{n % 7}", 10_000) for n in range(400)))
            assert all(isinstance(receipt, str) for receipt in got)
        finally:
            await limiter.close()

    asyncio.run(run())
