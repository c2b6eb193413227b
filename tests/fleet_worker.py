"""`automask worker` with a scripted backend, for tests/test_fleet.py: `python tests/fleet_worker.py`.

The real worker (`automask.server.worker.run_worker`, settings from the environment, `FLEET_CONCURRENCY` pool
processes) with `FakeBackend` scores, plus prompts that exercise failures: "slow" takes `FLEET_SLOW_SECONDS` (a
worker can be killed mid-run), "hang" never returns (a hung model), and "poison" kills the pool process running it
(SIGKILL), every time; a prompt "staged-NAME" creates the file `NAME.scoring` in the folder `FLEET_STAGES` as its
score starts, then waits (30 s at most) for the test to create `NAME.go` there. `FLEET_TIME_LIMIT_MARGIN` (seconds,
may be negative) replaces `fleet.TIME_LIMIT_MARGIN`, so that Celery's hard time limit can come before the run's own.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from automask.backends.base import Scores
from automask.errors import ServiceConfigError
from automask.pipeline import MaskGenerator
from automask.server import fleet, metrics
from automask.server.config import ServerSettings
from automask.server.worker import run_worker
from automask.settings import Settings
from server_helpers import FakeBackend


class FleetBackend(FakeBackend):
    """`FakeBackend`, with "slow", "slower", "hang", "poison" and "staged-NAME" prompts."""

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        for prompt in prompts:
            if prompt.startswith("staged-"):
                staged(Path(os.environ["FLEET_STAGES"]), prompt.removeprefix("staged-"))
        if "poison" in prompts:
            os.kill(os.getpid(), signal.SIGKILL)
        if "hang" in prompts:
            threading.Event().wait()
        if "slow" in prompts:
            time.sleep(float(os.environ.get("FLEET_SLOW_SECONDS", "2")))
        if "slower" in prompts:  # four times "slow"
            time.sleep(4 * float(os.environ.get("FLEET_SLOW_SECONDS", "2")))
        return super().score(features, prompts, min_score=min_score)


def staged(folder: Path, name: str) -> None:
    """Say that the score of `name` started, and wait for the test to let it go on."""
    (folder / f"{name}.scoring").touch()
    deadline = time.monotonic() + 30
    while not (folder / f"{name}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    settings, server = Settings(), ServerSettings()
    if "FLEET_TIME_LIMIT_MARGIN" in os.environ:  # Celery's hard limit is the timeout plus this
        fleet.TIME_LIMIT_MARGIN = float(os.environ["FLEET_TIME_LIMIT_MARGIN"])
    if server.metrics_port is not None:  # as `automask worker --metrics-port` does
        url = metrics.listen(server.metrics_host, server.metrics_port).url
        print(f"automask: metrics at {url}", file=sys.stderr, flush=True)
    try:
        run_worker(
            settings,
            server,
            concurrency=int(os.environ.get("FLEET_CONCURRENCY", "1")),
            loglevel="info",
            generator_factory=lambda: MaskGenerator(FleetBackend(), settings),
        )
    except ServiceConfigError as exc:  # as `automask worker` exits
        print(f"Error: {exc.message}", file=sys.stderr)
        raise SystemExit(9) from None


if __name__ == "__main__":
    main()
