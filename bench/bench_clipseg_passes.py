"""CLIPSeg's prompt batching on a CPU: decoding PROMPTS_PER_PASS prompts per pass against all of them in one pass.

    python bench/bench_clipseg_passes.py [--runs 7] [--warmup 1] [--prompts 1,8,16,32] [--runtimes torch,onnx]

`ClipSegScoring.score` runs the text encoder and the decoder `PROMPTS_PER_PASS` prompts at a time, so a
many-prompt call can stop between passes. This times `backend.score(features, prompts)` (text encoder + decoder
+ sigmoid + the peaks of the full-size maps) on one encoded 1024×768 image, with the pass size set to each of
--passes (default 8 and "all": every prompt in one pass), in the same process, alternating the settings run by run
so load from elsewhere falls on all alike. The model has the full size of CIDAS/clipseg-rd64-refined with random
weights (built once in --model-dir, as by bench_clipseg.py; the onnx runtime needs its fp32 export, made there once);
nothing is downloaded. Medians in ms, and each setting's ratio to "all".
Writes bench/results/clipseg-passes-<host>-<date>.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
WORDS = [
    "helmet",
    "flag",
    "rocket",
    "glove",
    "boot",
    "visor",
    "person",
    "sky",
    "cloud",
    "ground",
    "tree",
    "car",
    "dog",
    "cat",
    "chair",
    "table",
    "window",
    "door",
    "lamp",
    "road",
    "wall",
    "roof",
    "bottle",
    "cup",
    "plate",
    "bag",
    "hat",
    "shirt",
    "face",
    "hand",
    "wheel",
    "grass",
]


def load(model_dir: Path, runtime: str) -> Any:
    """The backend automask loads for `model_dir` on `runtime` (no feature cache)."""
    from automask import MaskGenerator, Settings

    gen = MaskGenerator(str(model_dir), Settings(runtime=runtime), cache_size=0)  # type: ignore[arg-type]
    expected = {"torch": "clipseg", "onnx": "clipseg-onnx"}[runtime]
    assert gen.backend.name == expected, (gen.backend.name, expected)
    return gen.backend


def image() -> np.ndarray:
    """bench_clipseg's 1024×768 astronaut JPEG, decoded: H×W×3 uint8 RGB."""
    sys.path.insert(0, str(HERE))
    from bench_clipseg import jpegs

    return np.asarray(Image.open(io.BytesIO(jpegs(1)[0])).convert("RGB"))


def time_scores(backend: Any, counts: list[int], passes: list[int | None], runs: int, warmup: int) -> list[dict]:
    """Median ms of `backend.score` for each prompt count and pass size (None: all prompts in one pass)."""
    from automask.backends import clipseg

    features = backend.encode(image())
    rows = []
    for n in counts:
        prompts = WORDS[:n]
        times: dict[int | None, list[float]] = {p: [] for p in passes}
        for run in range(warmup + runs):
            order = passes if run % 2 == 0 else passes[::-1]
            for size in order:
                clipseg.PROMPTS_PER_PASS = size or n
                t = time.perf_counter()
                backend.score(features, prompts)
                if run >= warmup:
                    times[size].append((time.perf_counter() - t) * 1000)
        medians = {p: statistics.median(v) for p, v in times.items()}
        for size in passes:
            ratio = medians[size] / medians[None] if None in medians else float("nan")
            rows.append(
                {
                    "prompts": n,
                    "per_pass": size or "all",
                    "median_ms": round(medians[size], 1),
                    "vs_all": round(ratio, 3),
                    "runs_ms": [round(x, 1) for x in times[size]],
                }
            )
    return rows


def machine() -> dict[str, Any]:
    """`bench_clipseg.machine()` and torch's thread count."""
    import torch
    from bench_clipseg import machine as described

    return {**described(), "host": platform.node(), "torch_threads": torch.get_num_threads()}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"CPU: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}); torch {m['torch']}; load average "
        f"at start {m['load_average_at_start']:.2f}. `score` on one encoded 1024×768 image, medians of "
        f"{report['runs']} runs after {report['warmup']} warm-up, in ms.",
        "",
        "| runtime | prompts | prompts per pass | median ms | vs all in one pass |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for runtime, rows in report["runtimes"].items():
        for r in rows:
            out.append(f"| {runtime} | {r['prompts']} | {r['per_pass']} | {r['median_ms']} | {r['vs_all']:.2f}× |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", default="1,8,16,32")
    parser.add_argument("--passes", default="8,all", help="pass sizes to compare ('all': every prompt in one pass)")
    parser.add_argument("--runtimes", default="torch,onnx")
    default_dir = Path.home() / ".cache" / "automask-bench" / "clipseg-rd64-random"
    parser.add_argument("--model-dir", type=Path, default=default_dir)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    counts = [int(c) for c in args.prompts.split(",")]
    if max(counts) > len(WORDS):
        parser.error(f"at most {len(WORDS)} prompts")
    passes: list[int | None] = [None if p == "all" else int(p) for p in args.passes.split(",")]
    sys.path.insert(0, str(HERE))
    from bench_clipseg import save_random_model, save_report

    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "warmup": args.warmup, "runtimes": {}}
    save_random_model(args.model_dir)
    for runtime in args.runtimes.split(","):
        if runtime == "onnx" and not (args.model_dir / "onnx" / "manifest.json").is_file():
            from automask.backends.clipseg_export import export

            print("exporting the ONNX graphs...", file=sys.stderr)
            export(args.model_dir, int8=True)  # the folder bench_clipseg.py builds (int8 too)
        print(f"timing {runtime}...", file=sys.stderr)
        report["runtimes"][runtime] = time_scores(load(args.model_dir, runtime), counts, passes, args.runs, args.warmup)
    save_report(args.out, "clipseg-passes", report, markdown(report))


if __name__ == "__main__":
    main()
