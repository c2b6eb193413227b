"""One database serves one kind of deployment (a single server, or a fleet), never both: recorded by the first node,
refused to the other kind at start-up, and switched only with `automask db deployment KIND --force`, which a running
server of the old kind sees at its next sweep (it stops serving: 503, /readyz not ready)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from automask.cli import main
from automask.errors import ServiceConfigError
from automask.pipeline import MaskGenerator
from automask.server import deployment, nodes
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.deployment import FLEET, SINGLE, Guard
from automask.server.jobs import Jobs
from automask.server.schemas import MaskRequest
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import FakeBackend, LiveServer, png_bytes, wait_for, wait_ready

SLUG = "automatic-mask-generator"
BROKERS = {"broker_url": "amqp://guest:guest@127.0.0.1:9//", "redis_url": "redis://127.0.0.1:9/0"}
"""A fleet's settings that are never connected to in these tests (nothing listens on port 9)."""


def url_of(store: Store) -> str:
    return store.url.render_as_string(hide_password=False)


def test_the_first_node_records_its_kind_and_the_other_kind_is_refused(store: Store) -> None:
    assert deployment.current(store) is None  # a new database: nothing recorded yet
    Guard(store, SINGLE).claim()
    Guard(store, SINGLE).claim()  # the same kind again: fine
    assert deployment.current(store) == SINGLE
    with pytest.raises(ServiceConfigError, match=r"serves a single server .* automask db deployment fleet --force"):
        Guard(store, FLEET).claim()
    assert deployment.record(store, FLEET) == SINGLE and deployment.current(store) == SINGLE  # not without force
    assert deployment.record(store, FLEET, force=True) == SINGLE and deployment.current(store) == FLEET
    with pytest.raises(ServiceConfigError, match=r"serves a fleet .* automask db deployment single --force"):
        Guard(store, SINGLE).claim()
    guard = Guard(store, FLEET)
    assert guard.holds() and guard.refusal is None
    deployment.record(store, SINGLE, force=True)
    assert not guard.holds() and "switched to a single server" in (guard.refusal or "")
    deployment.record(store, FLEET, force=True)
    assert not guard.holds()  # for good: a node whose database was taken must be restarted


def test_servers_and_workers_refuse_a_database_of_the_other_kind_at_start_up(postgres_db: str, tmp_path: Path) -> None:
    env = {"AUTOMASK_DATABASE_URL": postgres_db, "AUTOMASK_DATA_DIR": str(tmp_path / "data")}
    cli = CliRunner()
    assert cli.invoke(main, ["db", "deployment", "fleet"], env=env).exit_code == 0
    served = cli.invoke(main, ["serve", "--port", "0"], env=env)  # no AUTOMASK_BROKER_URL: a single server
    assert served.exit_code == 9 and "Traceback" not in served.output, served.output
    assert "serves a fleet" in served.output and "AUTOMASK_BROKER_URL" in served.output
    assert "automask db deployment single --force" in served.output
    store = Store(postgres_db)
    try:
        deployment.record(store, SINGLE, force=True)
        settings = Settings(data_dir=tmp_path / "api", database_url=postgres_db, **BROKERS)
        with pytest.raises(ServiceConfigError, match="this node is part of a fleet"):
            create_app(settings, ServerSettings())  # an API node of a fleet
        from automask.server.worker import run_worker

        with pytest.raises(ServiceConfigError, match="automask db deployment fleet --force"):
            run_worker(settings, ServerSettings())
        assert deployment.current(store) == SINGLE
    finally:
        store.close()


def test_a_server_whose_database_another_kind_took_stops_serving(store: Store, tmp_path: Path) -> None:
    """`automask db deployment fleet --force` while a single server runs: at its next sweep it stops running jobs
    and sweeping, answers 503 saying why, and /readyz is not ready (a load balancer takes it out)."""
    url = url_of(store)
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    server = ServerSettings(auth=False, sweep_interval=0.1, republish_after=0.1)
    image = base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))).decode()
    with LiveServer(create_app(settings, server, MaskGenerator(FakeBackend(), settings))) as live:
        wait_ready(live.url)
        assert deployment.current(store) == SINGLE  # recorded at start-up
        assert httpx.post(f"{live.url}/v1/{SLUG}", json={"image": image, "prompt": "x"}, timeout=30).status_code == 200
        env = {"AUTOMASK_DATABASE_URL": url, "AUTOMASK_DATA_DIR": str(tmp_path / "other")}
        refused = CliRunner().invoke(main, ["db", "deployment", "fleet"], env=env)
        assert refused.exit_code == 9 and "--force" in refused.output  # not while it is recorded as single
        forced = CliRunner().invoke(main, ["db", "deployment", "fleet", "--force"], env=env)
        assert forced.exit_code == 0 and "now serves a fleet" in forced.output, forced.output
        ready = wait_for(lambda: (r := httpx.get(f"{live.url}/readyz", timeout=5)).status_code == 503 and r, 10)
        message = ready.json()["error"]
        assert "switched to a fleet" in message and "Restart it" in message
        r = httpx.post(f"{live.url}/v1/{SLUG}", json={"image": image, "prompt": "x"}, timeout=30)
        assert (r.status_code, r.json()) == (503, {"error": message})
        assert httpx.get(f"{live.url}/v1/models", timeout=5).status_code == 503
        assert httpx.get(f"{live.url}/healthz", timeout=5).status_code == 200  # the process is up
        # it runs no job any more: one stored now (the fleet's) stays QUEUED through many sweep intervals
        job = Jobs(store).submit(None, MaskRequest.model_validate({"image": image, "prompt": "x"}), charge=False)
        wait_for(lambda: not [n for n in nodes.live(store, 10.0) if n.kind == "server"], 10)  # its node is gone
        with pytest.raises(AssertionError):
            wait_for(lambda: Jobs(store).get(job).status != "QUEUED", 1.0)  # type: ignore[union-attr]
    assert deployment.current(store) == FLEET


def test_db_deployment_prints_sets_and_switches_only_with_force(tmp_path: Path) -> None:
    cli = CliRunner()
    data = ["--data-dir", str(tmp_path / "data")]
    shown = cli.invoke(main, [*data, "db", "deployment"])
    assert shown.exit_code == 0 and shown.stdout == "none\n" and "first server or worker" in shown.stderr
    assert cli.invoke(main, [*data, "db", "deployment", "single"]).exit_code == 0
    assert cli.invoke(main, [*data, "db", "deployment"]).stdout == "single\n"
    again = cli.invoke(main, [*data, "db", "deployment", "single"])
    assert again.exit_code == 0 and "already serves a single server" in again.stderr
    refused = cli.invoke(main, [*data, "db", "deployment", "fleet"])
    assert refused.exit_code == 9 and refused.stdout == ""
    assert "error: The database" in refused.stderr and "automask db deployment fleet --force" in refused.stderr
    assert cli.invoke(main, [*data, "db", "deployment"]).stdout == "single\n"
    forced = cli.invoke(main, [*data, "db", "deployment", "fleet", "--force"])
    assert forced.exit_code == 0 and "now serves a fleet" in forced.stderr and "(was: single)" in forced.stderr
    assert cli.invoke(main, [*data, "db", "deployment"]).stdout == "fleet\n"
    wrong = cli.invoke(main, [*data, "db", "deployment", "both"])
    assert wrong.exit_code == 2 and "'both' is not one of 'single', 'fleet'" in wrong.stderr


def test_a_pool_process_asks_only_its_own_main_process_to_stop(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool process that sees the database switched to a single server sends SIGTERM to the worker's main process,
    and to no other process: once the main process died, its parent is whoever adopted it (often pid 1)."""
    import signal

    from automask.server import worker

    Guard(store, FLEET, worker=True).claim()
    deployment.record(store, SINGLE, force=True)
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(worker.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setattr(worker.os, "getppid", lambda: 1)  # the main process is gone: adopted by init
    worker._watch(Guard(store, FLEET, worker=True), main_pid=4242)
    assert kills == []
    monkeypatch.setattr(worker.os, "getppid", lambda: 4242)
    guard = Guard(store, FLEET, worker=True)
    worker._watch(guard, main_pid=4242)
    worker._watch(guard, main_pid=4242)  # once: the guard has said no already
    assert kills == [(4242, signal.SIGTERM)] and guard.refusal is not None
