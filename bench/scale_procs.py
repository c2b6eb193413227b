"""Process plumbing for bench/bench_scale.py: automask processes in sessions of their own, the CPU-bound stand-in
model, CPU accounting from /proc, and the machine's facts.

    python bench/scale_procs.py START BURN_S COUNT    (a control child: burn COUNT × BURN_S of CPU from START)
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
CLI = [sys.executable, "-m", "automask.cli"]
BURN_MODEL = "burn"


class BurnBackend:
    """A model that costs `burn_s` seconds of CPU per call on one core: `score` spins until this process has used
    that much CPU time (so a busy machine shows as longer wall time), then scores every pixel 1.0."""

    name = "burn"
    model_id = BURN_MODEL

    def __init__(self, burn_s: float) -> None:
        self.burn_s = burn_s

    def encode(self, image: np.ndarray) -> np.ndarray:
        return image

    def score(self, features: np.ndarray, prompts: list[str], *, min_score: float = 0.0) -> Any:
        from automask.backends.base import Scores

        burn(self.burn_s)
        h, w = features.shape[:2]
        return Scores(maps=np.ones((len(prompts), h, w), np.float32), labels=list(prompts))


def burn(seconds: float) -> None:
    """Spin on this core until the process has used `seconds` more CPU time."""
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        for i in range(2000):
            x ^= i


class Procs:
    """The automask processes this run started, each with its log file; `stop` ends them (SIGTERM, then KILL).

    Each runs in a session of its own, as separate services would: with the kernel's autogroup scheduling on, all
    processes of one session share one CPU share, so two workers started from one shell get no more CPU than one
    on a busy machine (tests/services.py starts the servers the same way)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.running[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.running.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def log_tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def base_env(data_dir: Path) -> dict[str, str]:
    """The environment without anyone's AUTOMASK_* settings; one data folder; offline; one inference thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMASK_")}
    env |= {"AUTOMASK_DATA_DIR": str(data_dir), "AUTOMASK_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env |= {"AUTOMASK_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return env


def cli(args: list[str], env: dict[str, str]) -> str:
    """Run `automask ARGS`; its stdout (stripped). Fails loudly with stderr."""
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"automask {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def wait_ready(base: str, procs: Procs, name: str, limit: float = 180) -> float:
    """Seconds until GET /readyz answers 200 (single: the model loaded; API node: a worker serves its model)."""
    import httpx

    t = time.perf_counter()
    while time.perf_counter() - t < limit:
        if procs.running[name].poll() is not None:
            raise SystemExit(f"{name} exited with code {procs.running[name].returncode}:\n{procs.log_tail(name)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - t
        time.sleep(0.1)
    raise SystemExit(f"{name} was not ready in {limit:g} s:\n{procs.log_tail(name)}")


def serve(procs: Procs, name: str, env: dict[str, str], model: str) -> str:
    """Start `automask serve` on a free loopback port; its base URL once ready."""
    sys.path.insert(0, str(TESTS))
    from service_procs import free_port

    port = free_port()
    procs.start(name, [*CLI, "serve", "--port", str(port), "--model", model, "--log-level", "warning"], env)
    return f"http://127.0.0.1:{port}"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the live processes `pids` (from /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_control(burn_s: float, count: int) -> dict[str, float]:
    """Wall seconds for `count` burns of `burn_s` in 1 process, then split over 2 processes (each in a session of
    its own, like the workers): the speed-up the machine's CPUs allowed right now, without automask."""
    out = {}
    for procs in (1, 2):
        start = time.time() + 0.5  # every child starts burning then: interpreter start-up is not timed
        cmd = [sys.executable, str(Path(__file__).resolve()), str(start), str(burn_s)]
        children = [
            subprocess.Popen([*cmd, str(count // procs)], stdout=subprocess.PIPE, text=True, start_new_session=True)
            for _ in range(procs)
        ]
        ends = [float(child.communicate(timeout=300)[0]) for child in children]
        out[f"{procs}_process_s"] = round(max(ends) - start, 3)
    out["speedup"] = round(out["1_process_s"] / out["2_process_s"], 3)
    return out


def burn_child(start: float, burn_s: float, count: int) -> None:
    """Wait until `start` (a time.time()), burn `count` × `burn_s` of CPU, print the time it finished."""
    time.sleep(max(0.0, start - time.time()))
    for _ in range(count):
        burn(burn_s)
    print(time.time())


def machine(urls: dict[str, str]) -> dict[str, Any]:
    """CPU, cores, load, and the versions of Python, the servers and the client libraries."""
    import celery
    import kombu
    import psycopg
    import redis

    cpu = platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    with psycopg.connect(urls["postgres"]) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        pg_version = str(row[0]) if row else "?"
    with redis.Redis.from_url(urls["redis"]) as client:
        redis_version = str(client.info("server")["redis_version"])
    with kombu.Connection(urls["rabbitmq"]) as conn:
        conn.connect()
        rabbit_version = conn.connection.server_properties.get("version", "?")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "rabbitmq": str(rabbit_version),
        "redis": redis_version,
        "celery": celery.__version__,
        "psycopg": psycopg.__version__,
        "load_average_at_start": load_average(),
    }


if __name__ == "__main__":
    burn_child(float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
