"""Stopping inside a model stage on a CPU: what the layer hooks cost a run nobody stops, and how soon a run told to
stop ends.

    python bench/bench_stop.py [--runs 15] [--flips 5]

- Overhead: `MaskGenerator.generate(image, "helmet")` (no feature cache: each run encodes) with the full-size CLIPSeg
  rd64-refined of bench_clipseg.py (random weights, built once in --model-dir), loaded by automask (its repeated
  layers hooked), in three settings that take turns run by run (ABC, then CBA): `no hooks` (the hooks taken off),
  `hooks` (no stop check: each hook reads a context variable), `hooks + check` (a check that never says stop: each hook
  also looks at the throttle's clock). Medians of encode + score and of the whole call, and their ratio to `no hooks`.
- Stop latency: SAM ViT-B's image encoder (`SamConfig()`, random weights, 1024×1024, 12 layers), hooked as automask
  hooks it, in a run whose check turns True at a random point of the encode (a timer thread); the latency is the time
  from the flip to `StoppedError`, with the default throttle (`automask.stopping.INSIDE_EVERY`).
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
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SETTINGS = ("no hooks", "hooks", "hooks + check")


def overhead(model_dir: Path, image: np.ndarray, runs: int) -> dict[str, Any]:
    """Median ms (encode + score, and the whole call) per setting, and each one's ratio to `no hooks`."""
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
    base = medians["no hooks"]
    return {
        "layers_hooked": len(layers),
        "rows": [
            {
                "setting": s,
                "model_ms": round(m[0], 1),
                "total_ms": round(m[1], 1),
                "model_ratio": round(m[0] / base[0], 4),
                "total_ratio": round(m[1] / base[1], 4),
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


def latency(image: np.ndarray, flips: int) -> dict[str, Any]:
    """Seconds from the flip of the check to `StoppedError`, SAM ViT-B's image encoder, `flips` times."""
    import torch
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from automask.backends.interrupt import stop_at_layers
    from automask.backends.sam import SamSegmenter
    from automask.errors import StoppedError
    from automask.stopping import INSIDE_EVERY, stopping

    torch.manual_seed(0)
    sam = stop_at_layers(SamModel(SamConfig(vision_config={"initializer_range": 0.02})).eval())
    head = SamSegmenter(sam, SamProcessor(SamImageProcessorPil()).image_processor, "sam", "cpu", torch.float32)
    t = time.perf_counter()
    head.embed(image)
    whole = time.perf_counter() - t
    rng = random.Random(0)
    seconds = []
    for _ in range(flips):
        told, flipped = threading.Event(), [0.0]

        def flip(told: threading.Event = told, flipped: list[float] = flipped) -> None:
            flipped[0] = time.perf_counter()
            told.set()

        timer = threading.Timer(rng.uniform(0.1, 0.8) * whole, flip)
        timer.start()
        try:
            with stopping(told.is_set):
                head.embed(image)
        except StoppedError:
            seconds.append(time.perf_counter() - flipped[0])
        timer.join()
    return {
        "model": "SAM ViT-B image encoder (random weights, 1024×1024, 12 layers)",
        "encode_s": round(whole, 2),
        "inside_every_s": INSIDE_EVERY,
        "latencies_s": [round(s, 3) for s in seconds],
        "median_s": round(statistics.median(seconds), 3),
        "max_s": round(max(seconds), 3),
    }


def markdown(report: dict[str, Any]) -> str:
    m, over, lat = report["machine"], report["overhead"], report["latency"]
    out = [
        f"CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; load average at start "
        f"{m['load_average_at_start']:.2f}. `bench/bench_stop.py --runs {report['runs']} --flips {report['flips']}`.",
        "",
        f"Hooks on a run nobody stops: CLIPSeg rd64 (random weights, {over['layers_hooked']} hooked layers), "
        f"`generate` on a 1024×768 image, medians of {report['runs']} runs, settings taking turns.",
        "",
        "| setting | encode + score ms | ratio | whole call ms | ratio |",
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
        "",
        f"Stop latency, {lat['model']}: the encode takes {lat['encode_s']} s; the check is asked at most every "
        f"{lat['inside_every_s']} s; from the flip to `StoppedError`: median {lat['median_s']} s, max {lat['max_s']} s "
        f"({', '.join(str(s) for s in lat['latencies_s'])}).",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--flips", type=int, default=5)
    default_dir = Path.home() / ".cache" / "automask-bench" / "clipseg-rd64-random"
    parser.add_argument("--model-dir", type=Path, default=default_dir)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_clipseg import jpegs, machine, save_random_model, save_report

    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "flips": args.flips}
    save_random_model(args.model_dir)
    print("timing the hooks...", file=sys.stderr)
    image = np.asarray(Image.open(io.BytesIO(jpegs(1)[0])).convert("RGB"))  # 1024×768
    report["overhead"] = overhead(args.model_dir, image, args.runs)
    report["hook_ns"] = hook_cost()
    print("timing stops...", file=sys.stderr)
    report["latency"] = latency(image, args.flips)
    save_report(args.out, "stop", report, markdown(report))


if __name__ == "__main__":
    main()
