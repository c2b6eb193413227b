"""Stopping inside a model stage on a CPU: what the layer hooks cost a run nobody stops, and how soon a run told to
stop ends.

    python bench/bench_stop.py [--runs 15] [--flips 5] [--encoders sam,sam3] [--subject-dir DIR]

- Overhead: `MaskGenerator.generate(image, "helmet")` (no feature cache: each run encodes) with the full-size CLIPSeg
  rd64-refined of bench_clipseg.py (random weights, built once in --model-dir), loaded by automask (its repeated
  layers hooked), in three settings that take turns run by run (ABC, then CBA): `no hooks` (the hooks taken off),
  `hooks` (no stop check: each hook reads a context variable), `hooks + check` (a check that never says stop: each hook
  also looks at the throttle's clock). Medians of encode + score and of the whole call, and their ratio to `no hooks`.
- Stop latency (--encoders): SAM ViT-B's image encoder (`SamConfig()`, 1024×1024, 12 layers) and SAM 3's vision
  encoder (`Sam3Config()`, 1008×1008, 32 layers; about 4 GB), random weights, hooked as automask hooks them, in a run
  whose check turns True at a random point of the encode (a timer thread); the latency is the time from the flip to
  `StoppedError`, with the default throttle (`automask.stopping.INSIDE_EVERY`).
- With --subject-dir (the embedded model's folder): its encode as a plain ONNX Runtime call and as a watched one.
Writes bench/results/stop-<host>-<date>.{json,md} and prints the markdown.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
SETTINGS = ("no hooks", "hooks", "hooks + check")


def overhead(model_dir: Path, image: np.ndarray, runs: int) -> dict[str, Any]:
    """Median ms (encode + score, and the whole call) per setting, and the median of its ratios to `no hooks` in the
    same round."""
    from automask import MaskGenerator, Settings
    from automask.backends.interrupt import repeated_layers

    gen = MaskGenerator(str(model_dir), Settings(runtime="torch"), cache_size=0)
    layers = repeated_layers(gen.backend.model)  # type: ignore[attr-defined]
    hooks = [dict(layer._forward_pre_hooks) for layer in layers]
    assert all(hooks), "automask's load hooks every repeated layer"
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in SETTINGS}
    for run in range(runs + 1):  # the first round warms up
        for setting in SETTINGS if run % 2 == 0 else SETTINGS[::-1]:
            for layer, own in zip(layers, hooks, strict=True):
                layer._forward_pre_hooks.clear()
                if setting != "no hooks":
                    layer._forward_pre_hooks.update(own)
            should_stop = (lambda: False) if setting == "hooks + check" else None
            t = time.perf_counter()
            result = gen.generate(image, "helmet", should_stop=should_stop)
            if run:
                times[setting].append((result.timings["encode"] + result.timings["score"], time.perf_counter() - t))
    medians = {s: [1000 * statistics.median(t[i] for t in v) for i in (0, 1)] for s, v in times.items()}
    base = times["no hooks"]
    return {
        "layers_hooked": len(layers),
        "rows": [
            {
                "setting": s,
                "model_ms": round(m[0], 1),
                "total_ms": round(m[1], 1),
                # the median of each round's ratio to its own `no hooks` run: load that drifts falls on both
                "model_ratio": round(statistics.median(a[0] / b[0] for a, b in zip(times[s], base, strict=True)), 4),
                "total_ratio": round(statistics.median(a[1] / b[1] for a, b in zip(times[s], base, strict=True)), 4),
                "runs_ms": [round(1000 * t[1], 1) for t in times[s]],
            }
            for s, m in medians.items()
        ],
    }


def hook_cost(calls: int = 200_000) -> dict[str, float]:
    """Nanoseconds of one call of automask's pre-hook outside a run and in a run whose check never says stop."""
    from automask.backends.interrupt import _ask
    from automask.stopping import stopping

    def per_call() -> float:
        t = time.perf_counter()
        for _ in range(calls):
            _ask(None, ())
        return (time.perf_counter() - t) / calls * 1e9

    outside = min(per_call() for _ in range(3))
    with stopping(lambda: False):
        inside = min(per_call() for _ in range(3))
    return {"no check": round(outside, 1), "check": round(inside, 1)}


def sam_vit_b() -> tuple[str, Callable[[np.ndarray], Any]]:
    """SAM ViT-B's image encoder (random weights), hooked as automask hooks it: its name and its encode."""
    import torch
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from automask.backends.interrupt import stop_at_layers
    from automask.backends.sam import SamSegmenter

    torch.manual_seed(0)
    sam = stop_at_layers(SamModel(SamConfig(vision_config={"initializer_range": 0.02})).eval())
    head = SamSegmenter(sam, SamProcessor(SamImageProcessorPil()).image_processor, "sam", "cpu", torch.float32)
    return "SAM ViT-B image encoder (1024×1024, 12 layers)", head.embed


def sam3() -> tuple[str, Callable[[np.ndarray], Any]]:
    """SAM 3's vision encoder (random weights, float32), hooked as automask hooks it: its name and its encode."""
    from bench_sam3 import build_sam3

    from automask.backends.interrupt import stop_at_layers

    backend = build_sam3()
    stop_at_layers(backend.model)
    return "SAM 3 vision encoder (1008×1008, 32 layers)", backend.encode


ENCODERS = {"sam": sam_vit_b, "sam3": sam3}


def latency(name: str, encode: Callable[[np.ndarray], Any], image: np.ndarray, flips: int) -> dict[str, Any]:
    """Seconds from the flip of the check to `StoppedError` in `encode(image)`, `flips` times, each at a random point
    of the encode."""
    from automask.errors import StoppedError
    from automask.stopping import INSIDE_EVERY, stopping

    t = time.perf_counter()
    encode(image)
    whole = time.perf_counter() - t
    rng = random.Random(0)
    seconds, finished = [], 0
    for _ in range(flips):
        told, flipped = threading.Event(), [0.0]

        def flip(told: threading.Event = told, flipped: list[float] = flipped) -> None:
            flipped[0] = time.perf_counter()
            told.set()

        timer = threading.Timer(rng.uniform(0.1, 0.7) * whole, flip)
        timer.start()
        try:
            with stopping(told.is_set):
                encode(image)
            finished += 1  # before the flip: the first encode, timed above, was slower than this one
        except StoppedError:
            seconds.append(time.perf_counter() - flipped[0])
        timer.join()
    return {
        "model": name + ", random weights",
        "encode_s": round(whole, 2),
        "inside_every_s": INSIDE_EVERY,
        "latencies_s": [round(s, 3) for s in seconds],
        "median_s": round(statistics.median(seconds), 3),
        "max_s": round(max(seconds), 3),
        "finished_before_the_flip": finished,
    }


def onnx_watch(subject_dir: Path, image: np.ndarray, runs: int) -> dict[str, Any]:
    """Median ms of the embedded model's encode (U²-Net-p in ONNX Runtime) as a plain call and as a watched one (in a
    run with a check: on a helper thread), taking turns."""
    from automask.backends.subject import load
    from automask.settings import Settings
    from automask.stopping import stopping

    backend = load(subject_dir, Settings())
    times: dict[str, list[float]] = {"plain": [], "watched": []}
    for run in range(runs + 1):
        for setting in ("plain", "watched") if run % 2 == 0 else ("watched", "plain"):
            with stopping((lambda: False) if setting == "watched" else None):
                t = time.perf_counter()
                backend.encode(image)
                if run:
                    times[setting].append(time.perf_counter() - t)
    medians = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {**{k: round(v, 2) for k, v in medians.items()}, "ratio": round(medians["watched"] / medians["plain"], 4)}


def markdown(report: dict[str, Any]) -> str:
    m, over = report["machine"], report["overhead"]
    out = [
        f"CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; load average at start "
        f"{m['load_average_at_start']:.2f}. `bench/bench_stop.py {report['args']}`.",
        "",
        f"Hooks on a run nobody stops: CLIPSeg rd64 (random weights, {over['layers_hooked']} hooked layers), "
        f"`generate` on a 1024×768 image, medians of {report['runs']} runs, settings taking turns.",
        "",
        "| setting | encode + score ms | ratio (median of rounds) | whole call ms | ratio (median of rounds) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in over["rows"]:
        out.append(
            f"| {r['setting']} | {r['model_ms']} | {r['model_ratio']:.3f} | {r['total_ms']} | {r['total_ratio']:.3f} |"
        )
    ns, calls = report["hook_ns"], over["layers_hooked"]
    model_ms = over["rows"][0]["model_ms"]
    out += [
        "",
        f"One hook call: {ns['no check']} ns outside a run (or in one nobody can stop), {ns['check']} ns in a run "
        f"with a check (throttled: not asked); {calls} calls per run: {calls * ns['check'] / 1e6 / model_ms:.1e} of "
        f"the {model_ms} ms encode + score.",
    ]
    for lat in report["latency"]:  # none with --encoders ""
        out += [
            "",
            f"Stop latency, {lat['model']}: the encode takes {lat['encode_s']} s; the check is asked at most every "
            f"{lat['inside_every_s']} s; from the flip to `StoppedError`: median {lat['median_s']} s, max "
            f"{lat['max_s']} s ({', '.join(str(s) for s in lat['latencies_s'])}; "
            f"{lat['finished_before_the_flip']} encodes ended before their flip).",
        ]
    if "onnx_watch" in report:
        w = report["onnx_watch"]
        out += [
            "",
            f"The embedded model's encode (ONNX Runtime): {w['plain']} ms as a plain call, {w['watched']} ms watched "
            f"(a run with a check): {w['ratio']:.3f}×.",
        ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--flips", type=int, default=5)
    parser.add_argument("--encoders", default="sam", help=f"whose stop latency to measure: of {','.join(ENCODERS)}")
    parser.add_argument("--subject-dir", type=Path, help="the embedded model's folder: time its watched ONNX call")
    default_dir = Path.home() / ".cache" / "automask-bench" / "clipseg-rd64-random"
    parser.add_argument("--model-dir", type=Path, default=default_dir)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from bench_clipseg import jpegs, machine, save_random_model, save_report

    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "args": " ".join(sys.argv[1:])}
    save_random_model(args.model_dir)
    print("timing the hooks...", file=sys.stderr)
    image = np.asarray(Image.open(io.BytesIO(jpegs(1)[0])).convert("RGB"))  # 1024×768
    report["overhead"] = overhead(args.model_dir, image, args.runs)
    report["hook_ns"] = hook_cost()
    if args.subject_dir:
        report["onnx_watch"] = onnx_watch(args.subject_dir, image, args.runs)
    report["latency"] = []
    for encoder in filter(None, args.encoders.split(",")):
        print(f"timing stops: {encoder}...", file=sys.stderr)
        report["latency"].append(latency(*ENCODERS[encoder](), image, args.flips))
    save_report(args.out, "stop", report, markdown(report))


if __name__ == "__main__":
    main()
