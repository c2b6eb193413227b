"""Speed of the embedded offline model (U²-Net-p, ONNX Runtime, CPU) on a 1024×768 photo.

    python bench/bench_subject.py [--runs 10] [--threads N] [--json]

Each run is a full `MaskGenerator.generate(photo, "subject")` with the feature cache off, so every run encodes
the image: preprocessing, the model, upsampling, threshold, grow (10 px) and render. Reported: the median and
the spread over the runs after one warm-up run, per stage. The photo is scikit-image's astronaut resized to
1024×768. The model is installed with `automask models pull subject` when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
from PIL import Image


def photo(width: int = 1024, height: int = 768) -> np.ndarray:
    """scikit-image's astronaut (512×512) resized to width×height: H×W×3 uint8 RGB."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.LANCZOS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    from automask import MaskGenerator, Settings
    from automask.models import is_installed, pull

    settings = Settings(threads=args.threads) if args.threads else Settings()
    if not is_installed("subject", settings):
        pull("subject", settings)
    gen = MaskGenerator("subject", settings, cache_size=0)
    image = photo()
    gen.generate(image, "subject")  # warm-up
    runs: dict[str, list[float]] = {}
    for _ in range(args.runs):
        t = time.perf_counter()
        result = gen.generate(image, "subject")
        runs.setdefault("wall", []).append(time.perf_counter() - t)
        for stage in ("encode", "score", "postprocess", "render"):
            runs.setdefault(stage, []).append(result.timings[stage])
    report = {
        "bench": "subject",
        "image": "1024x768",
        "runs": args.runs,
        "threads": args.threads or os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "median_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in runs.items()},
        "min_ms": {k: round(min(v) * 1000, 1) for k, v in runs.items()},
        "max_ms": {k: round(max(v) * 1000, 1) for k, v in runs.items()},
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"subject (U²-Net-p, onnxruntime CPU, {report['threads']} threads), 1024×768, {args.runs} runs after warm-up")
    print("| stage | median ms | min ms | max ms |\n| --- | --- | --- | --- |")
    for stage in runs:
        print(f"| {stage} | {report['median_ms'][stage]} | {report['min_ms'][stage]} | {report['max_ms'][stage]} |")


if __name__ == "__main__":
    main()
