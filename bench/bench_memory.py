"""Peak memory (RSS) of masking one 36-megapixel JPEG, each measurement in a fresh subprocess.

    python bench/bench_memory.py [--label after] [--src PATH] [--width 7360 --height 4912] [--json]

The child process imports automask (from `--src` when given: e.g. an older checkout's `src/` to measure
"before"), builds a tiny random CLIPSeg (tests/tiny_models.py: the model itself weighs a few MB, so what grows
is the image's memory), then decodes the JPEG alone (`load_image`), then runs what the v1 endpoint runs:
`generate(jpeg bytes, PROMPT, grow_mask=10)` -> the mask encoded as PNG (PROMPT: `--prompt`, default "cat").
It reports the peak resident set size
(ru_maxrss) after each stage; "image" is the growth above the baseline (imports + model): what the image costs.
The JPEG is random 1/16-size noise upscaled bilinearly (smooth blocks, quality 90), width×height pixels.
Results are appended to bench/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import io, json, resource, sys, tempfile
sys.path[:0] = [p for p in sys.argv[1:3] if p]
width, height, prompt = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

from pathlib import Path
import numpy as np
from PIL import Image
from automask import MaskGenerator, Settings
from automask.imageio import load_image
from tiny_models import make_tiny_clipseg

settings = Settings(data_dir=tempfile.mkdtemp(), max_image_pixels=100_000_000)
gen = MaskGenerator(str(make_tiny_clipseg(Path(tempfile.mkdtemp()))), settings)
rng = np.random.default_rng(0)
small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
buf = io.BytesIO()
Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
jpeg = buf.getvalue()
del small, buf
gen.generate(np.zeros((64, 64, 3), np.uint8), "cat")  # load the model: part of the baseline
stages = {"baseline": peak_mb()}
shape = list(load_image(jpeg, settings, allow_paths=False).shape)  # decoding alone
stages["decode"] = peak_mb()
result = gen.generate(jpeg, prompt, grow_mask=10, allow_paths=False)  # what the v1 endpoint runs
stages["mask"] = peak_mb()
out = io.BytesIO()
Image.fromarray(result.mask).save(out, "PNG")
stages["png"] = peak_mb()
print(json.dumps({"stages_mb": stages, "jpeg_bytes": len(jpeg), "shape": shape}))
"""


def measure(src: str | None, width: int, height: int, prompt: str = "cat") -> dict[str, object]:
    """Run the child once (a fresh process) and return its stage peaks."""
    cmd = [sys.executable, "-c", CHILD, src or "", str(ROOT / "tests"), str(width), str(height), prompt]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "AUTOMASK_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"the measuring process failed:\n{done.stderr[-3000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after", help="what is measured, e.g. before / after")
    parser.add_argument("--src", help="a source tree to import automask from (default: the installed one)")
    parser.add_argument("--width", type=int, default=7360)
    parser.add_argument("--height", type=int, default=4912)
    parser.add_argument("--prompt", default="cat", help="the prompt (several targets: 'cat, dog, sofa')")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    got = measure(args.src, args.width, args.height, args.prompt)
    stages = got["stages_mb"]
    assert isinstance(stages, dict)
    row = {
        "label": args.label,
        "megapixels": round(args.width * args.height / 1e6, 1),
        "prompt": args.prompt,
        **got,
        "peak_mb": round(max(stages.values()), 1),
        "image_mb": round(max(stages.values()) - stages["baseline"], 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", "bench/bench_memory.py", *sys.argv[1:]]),
    }
    out = ROOT / "bench" / "results" / "bench_memory.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*rows, row], indent=1) + "\n")
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.label}: {row['megapixels']} MP, peak RSS {row['peak_mb']} MB, image {row['image_mb']} MB")
        print("  stage peaks (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
