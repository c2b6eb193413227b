"""API keys, credits and rate limits below HTTP, and the `automask keys` / `serve` commands."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from automask.cli import main
from automask.server import keys as keystore
from automask.server.config import ServerSettings
from automask.server.errors import ApiError
from automask.server.limits import RateLimiter
from automask.server.store import Store


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store.in_data_dir(tmp_path / "data")


def test_keys_are_stored_as_hashes_and_checked(store: Store) -> None:
    key, token = keystore.create_key(store, name="ci", credits=3, rate_limit=10)
    prefix, key_id, secret = token.split("_", 2)
    assert (prefix, key_id) == ("am", key.id) and len(secret) >= 40
    assert secret.encode() not in store.path.read_bytes()
    assert keystore.authenticate(store, token) == key
    for bad in (None, "", token[:-1] + ("A" if token[-1] != "A" else "B"), f"am_{key.id}_", "am_unknown_x", "xyz"):
        with pytest.raises(ApiError) as err:
            keystore.authenticate(store, bad)
        assert err.value.status == 401
    assert keystore.revoke_key(store, key.id) and not keystore.revoke_key(store, "nope")
    with pytest.raises(ApiError) as err:
        keystore.authenticate(store, token)
    assert err.value.status == 403


def test_credits_never_go_below_zero_under_a_race(store: Store) -> None:
    key, _ = keystore.create_key(store, credits=7)
    results: dict[int, bool] = {}
    lefts: list[int | None] = []
    barrier = threading.Barrier(20)

    def take(i: int) -> None:
        barrier.wait(timeout=10)
        reserved = keystore.reserve_left(store, key.id, f"hold-{i}")  # each thread has its own connection
        results[i] = reserved is not None
        if reserved is not None:
            lefts.append(reserved.left)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert list(results.values()).count(True) == 7 and len(results) == 20
    assert sorted(lefts) == list(range(7))  # each charge read its own balance, in the transaction that took it
    assert keystore.get_key(store, key.id).credits == 0
    granted = [i for i, ok in results.items() if ok]
    keystore.settle(store, f"hold-{granted[0]}", charge=False)  # a failure: refunded
    keystore.settle(store, f"hold-{granted[0]}", charge=False)  # settling twice changes nothing
    keystore.settle(store, f"hold-{granted[1]}", charge=True)  # a success: kept
    assert keystore.get_key(store, key.id).credits == 1
    assert keystore.release_orphan_holds(store) == 5  # v1 holds a crash left behind are given back
    assert keystore.get_key(store, key.id).credits == 6


def test_unlimited_credits(store: Store) -> None:
    key, _ = keystore.create_key(store)
    assert all(keystore.reserve(store, key.id, f"h{i}") for i in range(5))
    assert keystore.reserve_left(store, key.id, "h5") == keystore.Reserved(left=None)
    assert keystore.get_key(store, key.id).credits is None


def test_rate_limiter_sliding_window() -> None:
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    for _ in range(3):
        limiter.check("k", 3)
        now[0] += 10
    with pytest.raises(ApiError) as err:
        limiter.check("k", 3)  # t=1030; the first request (t=1000) leaves the window at t=1060
    assert err.value.status == 429
    assert err.value.headers["Retry-After"] == "30"
    assert err.value.headers["x-rate-limit-reset-at-utc"] == "1970-01-01T00:17:40Z"  # 1060 s
    limiter.check("other", 3)  # per key
    limiter.check("k", None)  # no limit
    now[0] = 1060.5
    limiter.check("k", 3)


def test_keys_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "d")]
    created = runner.invoke(main, [*data, "keys", "create", "--credits", "5", "--rate-limit", "10", "--name", "ci"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith("am_") and "\n" not in token
    key_id = token.split("_")[1]
    listed = json.loads(runner.invoke(main, [*data, "keys", "list", "--json"]).stdout)
    assert [(k["id"], k["name"], k["credits"], k["rate_limit"]) for k in listed] == [(key_id, "ci", 5, 10)]
    table = runner.invoke(main, [*data, "keys", "list"]).stdout
    assert key_id in table and token.split("_", 2)[2] not in table
    assert runner.invoke(main, [*data, "keys", "update", key_id, "--credits", "9"]).exit_code == 0
    assert runner.invoke(main, [*data, "keys", "revoke", token]).exit_code == 0  # a whole key works too
    listed = json.loads(runner.invoke(main, [*data, "keys", "list", "--json"]).stdout)
    assert listed[0]["credits"] == 9 and listed[0]["disabled_at"] is not None
    missing = runner.invoke(main, [*data, "keys", "revoke", "nope"])
    assert missing.exit_code == 2 and "no key 'nope'" in missing.output


def test_keys_commands_refuse_counts_the_database_cannot_hold(tmp_path: Path, postgres_db: str) -> None:
    """Credits and rate limits are INTEGER columns (32 bits on PostgreSQL): a larger value is a usage error naming
    the largest, not an "internal error" from the database (on SQLite past 2**63, on PostgreSQL past 2**31 - 1)."""
    runner = CliRunner()
    largest = str(2**31 - 1)
    for env in ({"AUTOMASK_DATABASE_URL": postgres_db}, {}):
        data = ["--data-dir", str(tmp_path / "d")]
        for flag in ("--credits", "--rate-limit"):
            for too_big in (str(2**31), str(2**64)):
                refused = runner.invoke(main, [*data, "keys", "create", flag, too_big], env=env)
                assert refused.exit_code == 2, refused.output
                assert largest in refused.output and "internal error" not in refused.output
        created = runner.invoke(main, [*data, "keys", "create", "--credits", largest, "--rate-limit", largest], env=env)
        assert created.exit_code == 0, created.output
        key_id = created.stdout.strip().split("_")[1]
        listed = json.loads(runner.invoke(main, [*data, "keys", "list", "--json"], env=env).stdout)
        assert [(k["credits"], k["rate_limit"]) for k in listed if k["id"] == key_id] == [(2**31 - 1, 2**31 - 1)]
        refused = runner.invoke(main, [*data, "keys", "update", key_id, "--credits", str(2**31)], env=env)
        assert refused.exit_code == 2 and largest in refused.output
    with pytest.raises(ValueError, match=largest):
        keystore.create_key(Store.in_data_dir(tmp_path / "lib"), credits=2**31)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_keys_update_sets_credits_and_rate_limit_back_to_unlimited(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    """Before, a key given credits or a rate limit could never be made unlimited again (`--credits` took only N)."""
    runner = CliRunner()
    env = {"AUTOMASK_DATABASE_URL": request.getfixturevalue("postgres_db")} if database == "postgresql" else {}
    data = ["--data-dir", str(tmp_path / "d")]

    def keys(*args: str) -> str:
        result = runner.invoke(main, [*data, "keys", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.stdout

    def listed(key_id: str) -> tuple[int | None, int | None]:
        return next((k["credits"], k["rate_limit"]) for k in json.loads(keys("list", "--json")) if k["id"] == key_id)

    key_id = keys("create", "--credits", "5", "--rate-limit", "10").strip().split("_")[1]
    keys("update", key_id, "--credits", "none")
    assert listed(key_id) == (None, 10)
    keys("update", key_id, "--rate-limit", "None")
    assert listed(key_id) == (None, None)
    assert "unlimited  unlimited" in keys("list")
    keys("update", key_id, "--credits", "0", "--rate-limit", "1")
    assert listed(key_id) == (0, 1)
    keys("update", key_id, "--credits", "unlimited", "--rate-limit", "unlimited")  # as `keys list` shows it
    assert listed(key_id) == (None, None)
    other = keys("create", "--credits", "none", "--rate-limit", "none").strip().split("_")[1]
    assert listed(other) == (None, None)
    for flag, value in (("--credits", "-1"), ("--credits", "lots"), ("--rate-limit", "0"), ("--credits", "2.5")):
        refused = runner.invoke(main, [*data, "keys", "update", key_id, flag, value], env=env)
        assert refused.exit_code == 2 and "or 'none' for no limit" in refused.output, refused.output
    assert listed(key_id) == (None, None)


def test_serve_refuses_no_auth_off_loopback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "serve", "--no-auth", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "loopback" in result.output


def test_serve_refuses_heartbeats_that_would_make_a_live_node_look_dead(tmp_path: Path) -> None:
    env = {"AUTOMASK_SERVER_HEARTBEAT_INTERVAL": "5", "AUTOMASK_SERVER_NODE_TTL": "10"}
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "serve"], env=env)
    assert result.exit_code == 2 and "at most a third of the node TTL (10 s)" in result.output, result.output
    assert ServerSettings(heartbeat_interval=2, node_ttl=6).beat == 2  # a 2 s beat fits a 6 s TTL
    assert ServerSettings(node_ttl=5).beat == 1 and ServerSettings().beat == 2  # unset: a fifth of the TTL
    pytest.importorskip("celery")
    worker = CliRunner().invoke(
        main, ["--data-dir", str(tmp_path), "worker"], env={**env, "AUTOMASK_BROKER_URL": "amqp://u:p@127.0.0.1:1/"}
    )
    assert worker.exit_code == 2 and "at most a third" in worker.output, worker.output  # a usage error, no traceback


def test_serve_refuses_to_keep_v2_results_for_less_than_an_hour(tmp_path: Path) -> None:
    """CONTRACT.md: results are kept at least one hour."""
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "serve"], env={"AUTOMASK_SERVER_RESULT_TTL": "600"})
    assert result.exit_code == 2 and "result_ttl: Input should be greater than or equal to 3600" in result.output
    assert ServerSettings(result_ttl=3600).result_ttl == ServerSettings().result_ttl == 3600


@pytest.mark.parametrize("value", ["inf", "1e12", "31536001"])
def test_v2_results_are_kept_a_year_at_most(value: str) -> None:
    """Before: `inf` (or any number) was taken: finished results were never deleted and filled the database's disk."""
    with pytest.raises(ValidationError, match=r"result_ttl\n  Input should be less than or equal to 31536000"):
        ServerSettings(result_ttl=value)
    assert ServerSettings(result_ttl=31536000).result_ttl == 365 * 86400  # a year is the longest


def test_serve_refuses_to_keep_v2_results_for_ever(tmp_path: Path) -> None:
    env = {"AUTOMASK_SERVER_RESULT_TTL": "inf"}
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "serve", "--port", "0"], env=env)
    assert result.exit_code == 2, result.output
    assert "result_ttl: Input should be less than or equal to 31536000" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "automask.db").exists()


@pytest.mark.parametrize(
    "url", ["masks.example.com", "masks.example.com:8000/api", "ftp://masks.example.com", "https://", "https://x/?a=1"]
)
def test_serve_refuses_a_public_url_the_v2_urls_cannot_be_built_from(tmp_path: Path, url: str) -> None:
    """CONTRACT.md: the v2 URLs are absolute. Before, `--public-url masks.example.com` was taken as it is, and every
    submit answered status_url "masks.example.com/v2/requests/..." that no client can poll."""
    with pytest.raises(ValidationError, match="must be an absolute http"):
        ServerSettings(public_url=url)
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "serve", "--public-url", url])
    assert result.exit_code == 2, result.output
    assert "public_url: must be an absolute http(s) URL such as https://masks.example.com" in result.output
    env = {"AUTOMASK_SERVER_PUBLIC_URL": url}
    assert CliRunner().invoke(main, ["--data-dir", str(tmp_path), "serve"], env=env).exit_code == 2
    for fine in ("https://masks.example.com", "http://10.0.0.5:8000/api/", "HTTPS://Masks.example.com/a/b"):
        assert ServerSettings(public_url=fine).public_url == fine


def test_keys_list_shows_control_characters_of_a_name_escaped(tmp_path: Path) -> None:
    """A key's name may come from elsewhere (a customer's sign-up): before, `keys list` printed it raw, so an escape
    sequence in it ran in the admin's terminal (cursor moves that hide other keys' rows, a new window title...) and a
    newline broke the table. The table shows such characters escaped; --json keeps the name as it is."""
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "d")]
    name = "Café\x1b[2A\x1b[2K\nevil\tcorp\x07\x9b"
    assert runner.invoke(main, [*data, "keys", "create", "--name", name]).exit_code == 0
    table = runner.invoke(main, [*data, "keys", "list"], color=True).stdout  # as on a terminal: nothing stripped
    assert len(table.splitlines()) == 2 and not any(c in table for c in "\x1b\t\x07\x9b")
    assert "Café\\x1b[2A\\x1b[2K\\nevil\\tcorp\\x07\\x9b" in table
    assert json.loads(runner.invoke(main, [*data, "keys", "list", "--json"]).stdout)[0]["name"] == name
