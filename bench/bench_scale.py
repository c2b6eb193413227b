"""Scaling out on one machine: what the queue path costs a v1 request, and v2 throughput with 1 and 2 workers.

    python bench/bench_scale.py [--quick] [--requests 60] [--jobs 40] [--burn-ms 200] [--rounds 2]

Every server is real and on loopback (tests/services.py starts throwaway PostgreSQL, RabbitMQ and Redis), every
automask process is its own OS process started through the real CLI (or `run_worker` for the stand-in model).

Latency (v1): one tiny random CLIPSeg (tests/tiny_models.py, AUTOMASK_THREADS=1) served two ways at once:
  single  `automask serve` alone (SQLite in its data folder, the model in-process)
  fleet   `automask serve` (an API node: no model) + 1 `automask worker` on PostgreSQL, RabbitMQ and Redis
--requests sequential v1 requests to each after --warmup, alternating single/fleet (ABBA order) so that load
from other processes on the machine falls on both alike. Reported: p50/p90 of each, the p50 overhead
(fleet p50 - single p50) and the median of the paired differences. Target: p50 overhead <= 15 ms.

Throughput (v2): a CPU-bound stand-in model ("burn": its `score` spins until its process has used --burn-ms of
CPU time, then selects every pixel), served by 1, then 2 `automask worker` processes (concurrency 1 each) behind
one API node. --jobs jobs are submitted at once; the time runs from the first submission to the last job's
`finished_at` in the database. --rounds repeats 1 worker / 2 workers (the second worker stopped and restarted).
A control measures what the CPUs gave at that moment: the same burns in 1 vs 2 plain processes. Target: 2
workers >= 1.7x 1 worker where 2 cores are free. Load averages are recorded before and after each phase, and the
CPU seconds each part of the fleet used during each run. Every process runs in a session of its own, as separate
services would (with autogroup scheduling, the processes of one session share one CPU share).

Writes bench/results/scale-<host>-<date>.{json,md} and prints the markdown.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_clipseg import save_report
from scale_procs import (
    BURN_MODEL,
    CLI,
    TESTS,
    BurnBackend,
    Procs,
    base_env,
    cli,
    cpu_control,
    cpu_seconds,
    load_average,
    machine,
    serve,
    wait_ready,
)

HERE = Path(__file__).resolve().parent
V1 = "/v1/automatic-mask-generator"
V2 = "/v2/automatic-mask-generator"


# -- the stand-in model's worker ---------------------------------------------------------------------------------


def worker_child(burn_ms: float) -> None:
    """`automask worker` for the stand-in model (settings from the AUTOMASK_* environment, as the CLI reads them)."""
    from automask import MaskGenerator, Settings
    from automask.server.config import ServerSettings
    from automask.server.worker import run_worker

    def factory() -> MaskGenerator:
        return MaskGenerator(BurnBackend(burn_ms / 1000))

    run_worker(Settings(), ServerSettings(), model=BURN_MODEL, loglevel="warning", generator_factory=factory)


# -- inputs and statistics ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _photo() -> np.ndarray:
    """scikit-image's astronaut at 128×96, H×W×3 uint8."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((128, 96), Image.Resampling.BILINEAR))


def request_body(seed: int = 0) -> dict[str, Any]:
    """A v1/v2 JSON body: a 128×96 JPEG (scikit-image's astronaut, one corner block varied by `seed`), base64."""
    img = _photo().copy()
    img[:4, :4] = (seed * 37) % 256
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return {"image": base64.b64encode(buf.getvalue()).decode("ascii"), "prompt": "person", "grow_mask": 0}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def stats_ms(values: list[float]) -> dict[str, float]:
    """p50/p90/mean/min/max of durations in seconds, in ms."""
    ms = [v * 1000 for v in values]
    return {
        "p50": round(percentile(ms, 50), 2),
        "p90": round(percentile(ms, 90), 2),
        "mean": round(statistics.fmean(ms), 2),
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
    }


# -- part a: v1 latency ------------------------------------------------------------------------------------------


def v1_latency(args: argparse.Namespace, tmp: Path, procs: Procs, fleet_env: dict[str, str]) -> dict[str, Any]:
    """Time sequential v1 requests to the single process and to the fleet, alternating (ABBA)."""
    import httpx

    sys.path.insert(0, str(TESTS))
    from tiny_models import make_tiny_clipseg

    model = make_tiny_clipseg(tmp / "tiny-clipseg")
    single_env = base_env(tmp / "single")
    single_key = cli(["keys", "create"], single_env).splitlines()[-1]
    fleet_key = cli(["keys", "create"], fleet_env | {"AUTOMASK_DATA_DIR": str(tmp / "api")}).splitlines()[-1]
    procs.start("v1-worker", [*CLI, "worker", "--model", str(model), "--log-level", "warning"], fleet_env)
    single = serve(procs, "single", single_env, str(model))
    fleet = serve(procs, "v1-api", fleet_env | {"AUTOMASK_DATA_DIR": str(tmp / "api")}, str(model))
    ready = {"single": wait_ready(single, procs, "single"), "fleet": wait_ready(fleet, procs, "v1-api")}
    body = request_body()
    times: dict[str, list[float]] = {"single": [], "fleet": []}
    load_before = load_average()
    with (
        httpx.Client(base_url=single, headers={"x-api-key": single_key}, timeout=60) as a,
        httpx.Client(base_url=fleet, headers={"x-api-key": fleet_key}, timeout=60) as b,
    ):
        clients = {"single": a, "fleet": b}
        for i in range(args.warmup + args.requests):
            order = ("single", "fleet") if i % 2 == 0 else ("fleet", "single")
            for name in order:
                t = time.perf_counter()
                response = clients[name].post(V1, json=body)
                elapsed = time.perf_counter() - t
                if response.status_code != 200 or response.content[:4] != b"\x89PNG":
                    raise SystemExit(f"{name}: v1 answered {response.status_code}: {response.text[:300]}")
                if i >= args.warmup:
                    times[name].append(elapsed)
    load_after = load_average()
    for name in ("single", "v1-api", "v1-worker"):
        procs.stop(name)
    paired = [f - s for s, f in zip(times["single"], times["fleet"], strict=True)]
    single_stats, fleet_stats = stats_ms(times["single"]), stats_ms(times["fleet"])
    return {
        "requests": args.requests,
        "warmup": args.warmup,
        "ready_s": {k: round(v, 2) for k, v in ready.items()},
        "single_ms": single_stats,
        "fleet_ms": fleet_stats,
        "p50_overhead_ms": round(fleet_stats["p50"] - single_stats["p50"], 2),
        "paired_median_overhead_ms": round(statistics.median(paired) * 1000, 2),
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


# -- part b: v2 throughput ---------------------------------------------------------------------------------------


def live_workers(store: Any, model: str) -> int:
    """How many worker nodes serving `model` have beaten in the last 5 s (from the nodes table)."""
    from automask.server import nodes

    return sum(1 for n in nodes.live(store, 5.0) if n.kind == "worker" and model in n.models)


def start_worker(procs: Procs, name: str, env: dict[str, str], burn_ms: float) -> None:
    procs.start(name, [sys.executable, str(Path(__file__).resolve()), "--worker-child", "--burn-ms", str(burn_ms)], env)


def wait_workers(store: Any, count: int, procs: Procs, names: list[str], limit: float = 120) -> None:
    t = time.perf_counter()
    while live_workers(store, BURN_MODEL) < count:
        for name in names:
            if procs.running[name].poll() is not None:
                raise SystemExit(f"{name} exited:\n{procs.log_tail(name)}")
        if time.perf_counter() - t > limit:
            raise SystemExit(f"{count} workers not live after {limit:g} s:\n{procs.log_tail(names[-1])}")
        time.sleep(0.2)


def submit_and_wait(client: Any, store: Any, count: int, seed: int, limit: float = 300) -> dict[str, Any]:
    """POST `count` v2 jobs at once; wait until every one has finished; times from the database's timestamps."""
    from sqlalchemy import select

    from automask.server.store import jobs_table as J

    bodies = [request_body(seed + i) for i in range(count)]
    t0 = time.time()
    ids = []
    for body in bodies:
        response = client.post(V2, json=body)
        if response.status_code != 200:
            raise SystemExit(f"v2 answered {response.status_code}: {response.text[:300]}")
        ids.append(response.json()["request_id"])
    submitted = time.time() - t0
    while True:
        with store.read() as conn:
            rows = conn.execute(
                select(J.c.status, J.c.started_at, J.c.finished_at, J.c.attempts).where(J.c.id.in_(ids))
            ).all()
        if len(rows) == count and all(r.status in ("COMPLETED", "FAILED", "CANCELLED") for r in rows):
            break
        if time.time() - t0 > limit:
            raise SystemExit(f"v2 jobs unfinished after {limit:g} s: {[r.status for r in rows]}")
        time.sleep(0.05)
    failed = [r.status for r in rows if r.status != "COMPLETED"]
    if failed:
        raise SystemExit(f"v2 jobs did not complete: {failed}")
    wall = max(r.finished_at for r in rows) - t0
    return {
        "jobs": count,
        "wall_s": round(wall, 3),
        "jobs_per_s": round(count / wall, 3),
        "submit_s": round(submitted, 3),
        "job_run_ms_p50": round(statistics.median(r.finished_at - r.started_at for r in rows) * 1000, 1),
        # jobs PROCESSING at once, averaged over the run: how well the queue keeps every worker busy, whatever
        # CPU the machine gives them (contention lengthens each run, not this ratio)
        "busy_workers": round(sum(r.finished_at - r.started_at for r in rows) / wall, 2),
        "attempts_max": max(r.attempts for r in rows),
    }


def component_pids(procs: Procs, roots: dict[str, int]) -> dict[str, list[int]]:
    """The process ids of each part of the fleet: workers, API node, each server, this script (alone)."""
    sys.path.insert(0, str(TESTS))
    from service_procs import process_tree

    trees = {
        "workers": [p for n, proc in procs.running.items() if n.startswith("burn-") for p in process_tree(proc.pid)]
    }
    trees["api"] = process_tree(procs.running["v2-api"].pid)
    trees |= {name: process_tree(pid) for name, pid in roots.items()}
    trees["bench"] = [os.getpid()]
    return trees


def v2_throughput(
    args: argparse.Namespace, tmp: Path, procs: Procs, fleet_env: dict[str, str], roots: dict[str, int]
) -> dict[str, Any]:
    """v2 jobs/s of the burn model with 1 and 2 workers, `args.rounds` times each, plus the CPU control before and
    after each round. `roots`: the servers' main process ids, for the CPU accounting."""
    import httpx

    from automask.server.store import Store

    store = Store(fleet_env["AUTOMASK_DATABASE_URL"])
    api_env = fleet_env | {"AUTOMASK_DATA_DIR": str(tmp / "api2")}
    key = cli(["keys", "create"], api_env).splitlines()[-1]
    worker_env = [fleet_env | {"AUTOMASK_DATA_DIR": str(tmp / f"w{i}")} for i in (1, 2)]
    start_worker(procs, "burn-w1", worker_env[0], args.burn_ms)
    base = serve(procs, "v2-api", api_env, BURN_MODEL)
    wait_ready(base, procs, "v2-api")
    runs: list[dict[str, Any]] = []
    controls = []
    seed = 1000
    try:
        with httpx.Client(base_url=base, headers={"x-api-key": key}, timeout=60) as client:
            for r in range(args.rounds):
                controls.append(cpu_control(args.burn_ms / 1000, 8))
                for workers in (1, 2):
                    names = ["burn-w1", "burn-w2"][:workers]
                    if workers == 2:
                        start_worker(procs, "burn-w2", worker_env[1], args.burn_ms)
                    wait_workers(store, workers, procs, names)
                    submit_and_wait(client, store, 2 * workers, seed)  # warm-up: every pool process has run
                    seed += 100
                    before, trees = load_average(), component_pids(procs, roots)
                    cpu_before = {name: cpu_seconds(pids) for name, pids in trees.items()}
                    run = submit_and_wait(client, store, args.jobs, seed)
                    cpu = {name: round(cpu_seconds(pids) - cpu_before[name], 2) for name, pids in trees.items()}
                    seed += 100
                    runs.append({"round": r, "workers": workers, **run, "cpu_s": cpu})
                    runs[-1] |= {"load_before": before, "load_after": load_average()}
                    print(f"  {workers} worker(s): {run['jobs_per_s']} jobs/s", file=sys.stderr)
                    if workers == 2:
                        procs.stop("burn-w2")
                        _wait_gone(store, 1)
                controls.append(cpu_control(args.burn_ms / 1000, 8))
    finally:
        store.close()
    procs.stop_all()
    rate = {w: statistics.median(x["jobs_per_s"] for x in runs if x["workers"] == w) for w in (1, 2)}
    return {
        "burn_ms": args.burn_ms,
        "jobs": args.jobs,
        "rounds": args.rounds,
        "runs": runs,
        "jobs_per_s": {str(w): round(v, 3) for w, v in rate.items()},
        "ratio": round(rate[2] / rate[1], 3),
        "busy_workers": {
            str(w): statistics.median(x["busy_workers"] for x in runs if x["workers"] == w) for w in (1, 2)
        },
        "cpu_control": controls,
        "cpu_control_speedup_median": round(statistics.median(c["speedup"] for c in controls), 3),
    }


def _wait_gone(store: Any, count: int, limit: float = 30) -> None:
    """Wait until at most `count` burn workers are live (a stopped worker's last heartbeat ages out)."""
    t = time.perf_counter()
    while live_workers(store, BURN_MODEL) > count and time.perf_counter() - t < limit:
        time.sleep(0.2)


# -- report ------------------------------------------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[str]:
    lat, tput = report["latency"], report["throughput"]
    overhead = lat["p50_overhead_ms"]
    ratio, control = tput["ratio"], tput["cpu_control_speedup_median"]
    scaling = verdict(ratio >= 1.7)
    if control < 1.7:  # the machine had no two free cores: say so next to the verdict
        scaling += f" (two plain processes got only {control:.2f}x the CPU of one in the controls)"
    busy = tput["busy_workers"]
    return [
        f"v1 p50 overhead of the queue path: {overhead:.1f} ms (target <= 15 ms): {verdict(overhead <= 15)}",
        f"v2 throughput, 2 workers / 1 worker: {ratio:.2f}x (target >= 1.7x where 2 cores are free): {scaling}",
        f"jobs running at once (mean over the run): 1 worker {busy['1']}, 2 workers {busy['2']}",
    ]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def row(label: str, ms: dict[str, float]) -> str:
    return f"| {label} | " + " | ".join(str(ms[k]) for k in ("p50", "p90", "mean", "min", "max")) + " |"


def markdown(report: dict[str, Any]) -> str:
    m, lat, tput = report["machine"], report["latency"], report["throughput"]
    s, f = lat["single_ms"], lat["fleet_ms"]
    out = [
        f"CPU: {m['cpu']}, {m['cores']} cores (shared with other work: load averages below); Python {m['python']}; "
        f"PostgreSQL {m['postgresql']}, RabbitMQ {m['rabbitmq']}, Redis {m['redis']}, Celery {m['celery']}; "
        "every server and process on loopback, each in a session of its own (as separate services would be).",
        "",
        f"Command: `{report['command']}` ({report['duration_s']} s in all).",
        "",
        f"**v1 latency**, tiny random CLIPSeg, AUTOMASK_THREADS=1, 128×96 JPEG; {lat['requests']} sequential "
        f"requests each after {lat['warmup']} warm-up, alternating; load average "
        f"{lat['load_average_before'][0]:.2f} → {lat['load_average_after'][0]:.2f}.",
        "",
        "| path | p50 ms | p90 ms | mean ms | min ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        row("single process (`automask serve`, SQLite)", s),
        row("fleet (API node → RabbitMQ → worker; PostgreSQL, Redis)", f),
        "",
        f"p50 overhead: **{lat['p50_overhead_ms']} ms**; median of paired differences: "
        f"{lat['paired_median_overhead_ms']} ms.",
        "",
        f"**v2 throughput**, CPU-bound stand-in model ({tput['burn_ms']:g} ms of CPU per job on one core), "
        f"{tput['jobs']} jobs submitted at once, first submission → last `finished_at`:",
        "",
        "| round | workers | wall s | jobs/s | job run p50 ms | jobs running at once | load avg before → after "
        "| CPU s during the run |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in tput["runs"]:
        cpu = ", ".join(f"{name} {sec:g}" for name, sec in r["cpu_s"].items())
        out.append(
            f"| {r['round']} | {r['workers']} | {r['wall_s']} | {r['jobs_per_s']} | {r['job_run_ms_p50']} "
            f"| {r['busy_workers']} | {r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} | {cpu} |"
        )
    rate = tput["jobs_per_s"]
    controls = ", ".join(f"{c['speedup']:.2f}x" for c in tput["cpu_control"])
    out += [
        "",
        f"Median jobs/s: 1 worker {rate['1']}, 2 workers {rate['2']}: **{tput['ratio']:.2f}x**. "
        f"Control (8 burns, 1 vs 2 plain processes, before and after each round): {controls}.",
        "",
    ]
    out += [f"- {line}" for line in report["targets"]]
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def servers() -> Iterator[dict[str, Any]]:
    """PostgreSQL, Redis and RabbitMQ on loopback for the `with` block (tests/services.py objects, by name)."""
    sys.path.insert(0, str(TESTS))
    from services import postgres_server, rabbitmq_server, redis_server

    with postgres_server() as pg, redis_server() as rd, rabbitmq_server() as mq:
        yield {"postgres": pg, "redis": rd, "rabbitmq": mq}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="automask-bench-scale-"))
    procs = Procs(tmp)
    try:
        with servers() as services:
            urls = {name: service.url for name, service in services.items()}
            print(f"servers up in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            report: dict[str, Any] = {"machine": machine(urls)}
            fleet_env = base_env(tmp / "fleet") | {
                "AUTOMASK_DATABASE_URL": urls["postgres"],
                "AUTOMASK_BROKER_URL": urls["rabbitmq"],
                "AUTOMASK_REDIS_URL": urls["redis"],
            }
            cli(["db", "migrate"], fleet_env)
            print("v1 latency...", file=sys.stderr)
            report["latency"] = v1_latency(args, tmp, procs, fleet_env)
            print("v2 throughput...", file=sys.stderr)
            roots = {name: service._main_pid() for name, service in services.items()}
            report["throughput"] = v2_throughput(args, tmp, procs, fleet_env, roots)
            report["load_average_at_end"] = load_average()
    except BaseException:
        for name in procs.running:
            print(f"--- {name} log ---\n{procs.log_tail(name)}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    report["duration_s"] = round(time.perf_counter() - t, 1)
    report["command"] = " ".join(["python", "bench/bench_scale.py", *sys.argv[1:]])
    report["targets"] = targets(report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 requests, 16 jobs, 1 round (about a minute)")
    parser.add_argument("--requests", type=int, default=60, help="timed v1 requests per path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed v1 requests per path first")
    parser.add_argument("--jobs", type=int, default=40, help="v2 jobs per throughput run")
    parser.add_argument("--burn-ms", type=float, default=200.0, help="CPU ms per job of the stand-in model")
    parser.add_argument("--rounds", type=int, default=2, help="1-worker / 2-worker throughput rounds")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_child:
        worker_child(args.burn_ms)
        return
    if args.quick:
        args.requests, args.warmup, args.jobs, args.rounds = 20, 3, 16, 1
    report = run_all(args)
    save_report(args.out, "scale", report, markdown(report))


if __name__ == "__main__":
    main()
