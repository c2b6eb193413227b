"""A fleet's parts stopping under it, with real PostgreSQL and Redis servers: /readyz follows the database at once
(cheaply, however many probes), and a worker's hand-off to a frozen Redis fails in seconds."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from automask.server import nodes
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from automask.settings import Settings
from server_helpers import LiveServer, wait_for
from service_procs import process_tree
from services import postgres_server, redis_server

FLEET_BROKER = "amqp://guest:guest@127.0.0.1:9//"  # /readyz never publishes: no RabbitMQ needed


def test_readyz_is_not_ready_as_soon_as_the_database_stops_answering(tmp_path: Path) -> None:
    """Before: an API node answered "ready" for up to a second after its database died (it read only its cached
    list of workers), so a load balancer kept sending it requests that failed. Now /readyz asks the database each
    time, within `DB_PING_TIMEOUT`, and concurrent probes share one query."""
    with postgres_server() as pg, redis_server() as rd:
        settings = Settings(data_dir=tmp_path / "data", database_url=pg.url, broker_url=FLEET_BROKER, redis_url=rd.url)
        store = Store.from_settings(settings)
        nodes.register(store, "worker-test", "worker", ["clipseg"], "clipseg", dead_after=3600)
        app = create_app(settings, ServerSettings())
        state = app.state.automask
        pings, ping = [], state.store.ping

        def counted() -> bool:
            pings.append(threading.get_ident())
            return ping()

        state.store.ping = counted
        with LiveServer(app) as live:

            def readyz() -> httpx.Response:
                return httpx.get(f"{live.url}/readyz", timeout=30)

            assert wait_for(lambda: readyz().status_code == 200, 30)
            frozen = process_tree(pg._main_pid())  # the postmaster and its backends: connections open, silent
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                started, pings[:] = time.monotonic(), []
                with ThreadPoolExecutor(12) as pool:
                    answers = list(pool.map(lambda _: readyz(), range(12)))
                took = time.monotonic() - started
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            assert {r.status_code for r in answers} == {503}, [r.text for r in answers]
            assert answers[0].json()["error"].startswith("The database (AUTOMASK_DATABASE_URL) does not answer")
            assert "127.0.0.1" not in answers[0].text  # public: no address
            assert took < 8 and len(pings) == 1  # within the probe's timeout; one query for twelve probes
            assert wait_for(lambda: readyz().status_code == 200, 30)  # back once it answers
            pg.stop()  # gone: refused at once
            gone = readyz()
            assert gone.status_code == 503 and "AUTOMASK_DATABASE_URL" in gone.json()["error"], gone.text
        store.close()
