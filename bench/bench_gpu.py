"""The text-prompted instance backends on a CUDA GPU: SAM 3 (float32 and its default bfloat16 autocast),
Grounded-SAM (SAM ViT-B), Grounded-SAM-2 (SAM 2.1 Hiera-L) and Grounded-EdgeTAM at the reference settings and
under the `fast` preset (on CUDA: the detector at 512).

    python bench/bench_gpu.py [--runs 5] [--warmup 2] [--boxes 3] [--out DIR] [--device cuda]

Run by `bench/gpu_check.sh` on a lent GPU machine. The models are bench_sam3.py's, full size with random weights
(timing does not depend on weight values; nothing is downloaded), moved to `cuda`; every flow is
`MaskGenerator(backend).generate(image, "helmet")` on a new 1024×768 image, then "flag" on the same image (features
from the cache), the flows taking turns on each image. Every backend returns CPU arrays, so a request's wall time
includes the GPU's work. Also records each flow's peak GPU memory. Writes gpu-<host>-<date>.{json,md} to --out.
`--device cpu --runs 1 --warmup 0` only checks the script itself (slow, and not a GPU number).
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_grounded_sam import build_models, images, machine  # noqa: E402
from bench_sam3 import Stages, build_edgetam, build_sam2, build_sam3, flow, flow_table, measure  # noqa: E402


def grounded_on_gpu(m: dict[str, Any], head: str, device: str, fast: bool = False) -> Any:
    """automask's grounded backend in float32 (what precision 'auto' picks on CUDA: `sam.choose_dtype`); `fast`: the
    `fast` preset, which on CUDA only moves the detector's shortest edge from 800 to 512 (bf16 is for CPUs)."""
    import torch

    from automask.backends.grounded_sam import FAST_DETECTOR_EDGE, GroundedSamBackend
    from automask.backends.sam import SamSegmenter
    from automask.backends.sam2 import DEFAULT_TRANSFORM, Sam2Segmenter

    dtype = torch.float32
    if head == "sam":
        sam = copy.deepcopy(m["sam"]).to(device)
        segmenter: Any = SamSegmenter(sam, m["sam_processor"].image_processor, "sam-vit-b (random)", device, dtype)
    else:  # 'sam2' or 'edgetam'
        segmenter = Sam2Segmenter(m[head].to(device), head, DEFAULT_TRANSFORM, f"{head} (random)", device, dtype)
    detector, processor = copy.deepcopy(m["detector"]).to(device), copy.copy(m["dino_processor"])
    edge = FAST_DETECTOR_EDGE if fast else None
    return GroundedSamBackend(detector, processor, segmenter, "grounding-dino-t (random)", device, dtype, edge)


def sam3_on_gpu(autocast: bool, device: str) -> Any:
    """Full-size SAM 3 on the GPU; `autocast`: bfloat16 autocast, what precision 'auto' picks on CUDA."""
    backend = build_sam3()
    backend.model.to(device)
    backend.device, backend.autocast = device, autocast
    return backend


def main() -> None:
    import torch

    from automask.backends import grounded_sam, sam3

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=3, help="instances kept per request (the best scoring)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu to check the script")
    args = parser.parse_args()
    device = args.device
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    grounded_sam.MAX_DETECTIONS = sam3.MAX_DETECTIONS = args.boxes
    gpu_name = torch.cuda.get_device_name(0) if gpu else "none (--device cpu: a check of the script, no GPU number)"
    report: dict[str, Any] = {"machine": machine(), "gpu": gpu_name, "runs": args.runs}
    report.update(warmup=args.warmup, boxes=args.boxes, torch_cuda=torch.version.cuda)
    print("building the models (random weights)...", file=sys.stderr)
    m = build_models()
    m["edgetam"], m["sam2"] = build_edgetam(), build_sam2()
    backends = {
        "grounded-sam (fp32)": grounded_on_gpu(m, "sam", device),
        "grounded-sam2 (fp32)": grounded_on_gpu(m, "sam2", device),
        "grounded-edgetam (fp32)": grounded_on_gpu(m, "edgetam", device),
        "grounded-sam, fast (fp32, detector 512)": grounded_on_gpu(m, "sam", device, fast=True),
        "grounded-sam2, fast (fp32, detector 512)": grounded_on_gpu(m, "sam2", device, fast=True),
        "grounded-edgetam, fast (fp32, detector 512)": grounded_on_gpu(m, "edgetam", device, fast=True),
        "sam3 (bf16 autocast: the CUDA default)": sam3_on_gpu(True, device),
        "sam3 (fp32: AUTOMASK_PRECISION=fp32)": sam3_on_gpu(False, device),
    }
    peak: dict[str, float] = {}

    def run(name: str, backend: Any, image: Any) -> Stages:
        """One flow, recording its peak GPU memory."""
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        stages = flow(backend, image)
        peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0)
        return stages

    report["rows"] = measure(backends, images(args.warmup + args.runs), args.warmup, run)
    report["peak_gpu_mib"] = {k: round(v) for k, v in peak.items()}
    text = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


def markdown(report: dict[str, Any]) -> str:
    m, rows = report["machine"], report["rows"]
    base = rows["grounded-sam (fp32)"]["total"]
    out = [
        f"GPU: {report['gpu']} (CUDA {report['torch_cuda']}, torch {m['torch']}), host CPU {m['cpu']}. 1024×768 "
        f"image, {report['boxes']} instances per request, random weights; medians of {report['runs']} runs after "
        f"{report['warmup']} warm-up, the flows taking turns on each image, ms.",
        "",
        *flow_table(rows, base, ("peak GPU MiB", report["peak_gpu_mib"])),
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
