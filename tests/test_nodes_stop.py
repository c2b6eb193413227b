"""A node that stops is not left counted alive by a registration of its own still in progress: its heartbeat thread's
(its first registration, or one after the sweeper removed its row) or a task's, whichever ends last."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select

from automask.server import nodes
from automask.server.store import Store, nodes_table


@pytest.mark.parametrize("registration", ["first", "again"])
def test_a_registration_in_progress_at_stop_leaves_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registration: str
) -> None:
    """Before: `stop` waited 5 s for the beat in progress, then removed the row; a registration that beat was still
    making (a slow database) inserted the row afterwards, with a fresh heartbeat: the stopped node was counted alive
    (its models served, its jobs not taken over) until its TTL. Now a registration and the removal take turns, and a
    registration that ends after the stop removes its own row."""
    store = Store.in_data_dir(tmp_path)
    real = nodes.register
    entered, gate = threading.Event(), threading.Event()
    fail_first = [registration == "first"]

    def slow_in_the_beat(*args: Any) -> None:
        if fail_first and fail_first.pop():
            raise OSError("the database does not answer")  # the start's registration: left to the beat
        if threading.current_thread().name == "automask-heartbeat":
            entered.set()
            gate.wait(10)  # the database is slow to answer this one
        real(*args)

    monkeypatch.setattr(nodes, "register", slow_in_the_beat)
    monkeypatch.setattr(nodes, "STOP_WAIT", 0.2, raising=False)
    monkeypatch.setattr(nodes, "UNREGISTER_TIMEOUT", 0.5)
    beat = nodes.Heartbeat(store, "worker-x", "worker", ["m"], "m", interval=0.05, dead_after=60.0)
    beat.start(retry=True)
    if registration == "again":  # the sweeper took it for dead: its next beat registers it again
        assert beat.registered
        with store.transaction() as conn:
            conn.execute(delete(nodes_table))
    assert entered.wait(10)
    stopping = threading.Thread(target=beat.stop)
    stopping.start()
    stopping.join(15)
    gate.set()
    beat._thread.join(10)
    assert not beat._thread.is_alive()
    with store.read() as conn:
        assert conn.execute(select(nodes_table.c.id)).scalars().all() == []  # before: ["worker-x"], alive
    assert "worker-x" not in [n.id for n in nodes.live(store, 60.0)]
    beat.register()  # a task asking once the node stopped registers nothing
    with store.read() as conn:
        assert conn.execute(select(nodes_table.c.id)).scalars().all() == []
    store.close()
