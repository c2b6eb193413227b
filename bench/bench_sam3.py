"""Speed of the text-prompted instance backends on a CPU: SAM 3, Grounded-SAM (SAM ViT-B), Grounded-SAM-2 (SAM 2.1
Hiera-L) and Grounded-EdgeTAM, at the reference settings and under the `fast` preset.

    python bench/bench_sam3.py [--runs 2] [--warmup 1] [--boxes 3] [--skip-sam3] | --heads 5

Models, built from configs in code with random weights (timing does not depend on weight values; nothing is
downloaded): SAM 3 at full size (`Sam3Config()`: the 32-layer ViT at 1008×1008, the 24-layer CLIP text encoder,
DETR encoder/decoder with 200 queries, 848 M parameters), GroundingDINO-T and SAM ViT-B as in
bench_grounded_sam.py, EdgeTAM at full size (RepViT-M1 backbone via automask's RepViT, SAM 2 decoder at 1024×1024),
SAM 2.1 Hiera-L and Hiera-B+ at full size (the hub configs' numbers, from transformers' convert_sam2_to_hf.py).
Input: a 1024×768 RGB array (scikit-image's astronaut, resized), a new one per run (no cache answers a run).
Random weights give arbitrary detections, so every flow keeps the same number of instances, the best scoring
(--boxes; threshold and text threshold 0).

Flows, each `MaskGenerator(backend).generate(image, "helmet")` on a new image, then "flag" on the same image
(image features from the cache); the flows take turns on each image (round-robin), so that load from other jobs on a
shared machine falls on all of them alike:
  sam3                  SAM 3, float32 (the reference on a CPU).
  sam3, fast            SAM 3 under bfloat16 autocast (AUTOMASK_PRESET=fast, on CPUs with native bf16 only).
  grounded-sam          GroundingDINO-T at shortest edge 800 + SAM ViT-B, float32 (the reference).
  grounded-sam2         GroundingDINO-T at 800 + SAM 2.1 Hiera-L, float32 (the reference).
  grounded-edgetam      GroundingDINO-T at 800 + EdgeTAM, float32 (the reference).
  ... fast              the same under AUTOMASK_PRESET=fast: detector at 512, bf16 on CPUs with native bf16.
--heads N instead times only the mask heads' image encoders (SAM ViT-B, SAM 2.1 Hiera-L and Hiera-B+, EdgeTAM;
float32 and bf16),
interleaved N times so that load from other jobs hits both alike; writes mask-heads-<host>-<date>.*.
Writes bench/results/sam3-<host>-<date>.{json,md}. The machine and its load average are recorded: compare the rows
of one run with each other (ratios), not with other machines.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_grounded_sam import PROMPT, SECOND_PROMPT, build_models, images, machine  # noqa: E402

Stages = dict[str, float]


def build_sam3() -> Any:
    """Full-size SAM 3 (random weights) as automask's backend, float32 on the CPU."""
    import torch
    from transformers import CLIPTokenizer, Sam3Config, Sam3Model

    from automask.backends.sam3 import DEFAULT_TRANSFORM, Sam3Backend
    from tiny_models import byte_level_vocab

    torch.manual_seed(0)
    model = Sam3Model(Sam3Config()).eval()
    tokenizer = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=32)
    return Sam3Backend(model, tokenizer, DEFAULT_TRANSFORM, "sam3 (random)", "cpu", autocast=False)


def build_edgetam() -> Any:
    """Full-size EdgeTAM (RepViT-M1, random weights), as transformers' EdgeTamModel builds it."""
    import torch
    from transformers import EdgeTamConfig, EdgeTamModel, TimmWrapperConfig

    from automask.backends.repvit import repvit_backbones

    backbone = TimmWrapperConfig(
        architecture="repvit_m1.dist_in1k",
        model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]},
    )
    config = EdgeTamConfig(vision_config={"model_type": "edgetam_vision_model", "backbone_config": backbone})
    torch.manual_seed(0)
    with repvit_backbones():
        return EdgeTamModel(config).eval()


SAM2_BACKBONES: dict[str, dict[str, Any]] = {
    "Hiera-L": {
        "hidden_size": 144,
        "embed_dim_per_stage": [144, 288, 576, 1152],
        "num_attention_heads_per_stage": [2, 4, 8, 16],
        "blocks_per_stage": [2, 6, 36, 4],
        "global_attention_blocks": [23, 33, 43],
        "window_positional_embedding_background_size": [7, 7],
        "window_size_per_stage": [8, 4, 16, 8],
    },
    "Hiera-B+": {
        "hidden_size": 112,
        "embed_dim_per_stage": [112, 224, 448, 896],
        "num_attention_heads_per_stage": [2, 4, 8, 16],
        "blocks_per_stage": [2, 3, 16, 3],
        "global_attention_blocks": [12, 16, 20],
        "window_positional_embedding_background_size": [14, 14],
    },
}
"""SAM 2.1's Hiera image encoders as transformers' convert_sam2_to_hf.py `get_config` builds facebook/sam2.1-hiera-large
and -base-plus (the rest: `Sam2HieraDetConfig`'s defaults; FPN channels the stage widths reversed)."""


def build_sam2(variant: str = "Hiera-L") -> Any:
    """Full-size SAM 2.1 (`variant` a key of `SAM2_BACKBONES`, random weights) as transformers' Sam2Model."""
    import torch
    from transformers import Sam2Config, Sam2Model

    backbone = {"model_type": "sam2_hiera_det_model", **SAM2_BACKBONES[variant]}
    channels = backbone["embed_dim_per_stage"][::-1]
    vision = {"model_type": "sam2_vision_model", "backbone_config": backbone, "backbone_channel_list": channels}
    torch.manual_seed(0)
    return Sam2Model(Sam2Config(vision_config=vision)).eval()


def sam2_head(model: Any, kind: str, dtype: Any) -> Any:
    """automask's SAM 2-family mask head on `model` (kind 'sam2' or 'edgetam'), its encoder autocast to `dtype`."""
    from automask.backends.sam2 import DEFAULT_TRANSFORM, Sam2Segmenter

    return Sam2Segmenter(model, kind, DEFAULT_TRANSFORM, f"{kind} (random)", "cpu", dtype)


def grounded(m: dict[str, Any], head: str, fast: bool) -> Any:
    """automask's grounded backend on copies of the models: mask head 'sam', 'sam2' or 'edgetam'; reference or
    fast (the dtypes `sam._load` and `sam2._dtype` pick)."""
    from automask.backends.grounded_sam import FAST_DETECTOR_EDGE, GroundedSamBackend
    from automask.backends.sam import SamSegmenter, choose_dtype
    from automask.backends.sam2 import _dtype

    dtype = choose_dtype("auto" if fast else "fp32", "cpu")
    if head == "sam":
        sam = copy.deepcopy(m["sam"])
        sam.vision_encoder.to(dtype)
        segmenter: Any = SamSegmenter(sam, m["sam_processor"].image_processor, "sam-vit-b (random)", "cpu", dtype)
    else:
        segmenter = sam2_head(m[head], head, _dtype(head, "auto" if fast else "fp32", "cpu"))
    detector, processor = copy.deepcopy(m["detector"]), copy.copy(m["dino_processor"])
    edge = FAST_DETECTOR_EDGE if fast else None
    return GroundedSamBackend(detector, processor, segmenter, "grounding-dino-t (random)", "cpu", dtype, edge)


def flow(backend: Any, image: np.ndarray) -> Stages:
    """One request on a new image, then a second prompt on it: seconds per stage (from the result's timings)."""
    from automask.options import MaskOptions
    from automask.pipeline import MaskGenerator

    gen = MaskGenerator(backend)
    opts = MaskOptions(threshold=0.0, text_threshold=0.0)
    first = gen.generate(image, PROMPT, opts)
    second = gen.generate(image, SECOND_PROMPT, opts)
    t1, t2 = first.timings, second.timings
    return {"encode": t1["encode"], "score": t1["score"], "total": t1["total"], "2nd prompt": t2["total"]}


def measure(
    backends: dict[str, Any],
    imgs: list[np.ndarray],
    warmup: int,
    run: Callable[[str, Any, np.ndarray], Stages] | None = None,
) -> dict[str, Stages]:
    """Median ms per stage of every flow. Flows take turns on each image (round-robin), so that load from other jobs
    on a shared machine falls on all of them alike; the first `warmup` rounds are not counted. `run(name, backend,
    image)` runs one flow (default: `flow`)."""
    samples: dict[str, list[Stages]] = {name: [] for name in backends}
    for i, img in enumerate(imgs):
        for name, backend in backends.items():
            print(f"round {i + 1}/{len(imgs)}: {name}", file=sys.stderr)
            stages = run(name, backend, img) if run is not None else flow(backend, img)
            if i >= warmup:
                samples[name].append(stages)
    return {
        name: {k: round(1000 * float(np.median([s[k] for s in runs])), 1) for k in runs[0]}
        for name, runs in samples.items()
    }


def heads(n: int, out: Path) -> None:
    """Median ms of the SAM ViT-B, SAM 2.1 Hiera-L / Hiera-B+ and EdgeTAM image encoders (`embed`), interleaved `n`
    times, in float32 and in bfloat16 (SAM: its encoder's weights; the SAM 2 family: autocast)."""
    import torch
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from automask.backends.sam import SamSegmenter, choose_dtype, cpu_has_bf16

    torch.manual_seed(0)
    sam = SamModel(SamConfig(vision_config={"initializer_range": 0.02})).eval()
    sam2 = {variant: build_sam2(variant) for variant in SAM2_BACKBONES}
    edgetam = build_edgetam()
    processor = SamProcessor(SamImageProcessorPil()).image_processor
    fast = choose_dtype("bf16", "cpu")
    sam_fast = copy.deepcopy(sam)
    sam_fast.vision_encoder.to(fast)
    start = machine()
    heads_: dict[str, Any] = {
        "SAM ViT-B, fp32": SamSegmenter(sam, processor, "sam", "cpu", torch.float32),
        **{f"SAM 2.1 {v}, fp32": sam2_head(model, "sam2", torch.float32) for v, model in sam2.items()},
        "EdgeTAM, fp32": sam2_head(edgetam, "edgetam", torch.float32),
        "SAM ViT-B, bf16": SamSegmenter(sam_fast, processor, "sam", "cpu", fast),
        **{f"SAM 2.1 {v}, bf16 autocast": sam2_head(model, "sam2", fast) for v, model in sam2.items()},
        "EdgeTAM, bf16 autocast": sam2_head(edgetam, "edgetam", fast),
    }
    params = {"SAM ViT-B": sam, **{f"SAM 2.1 {v}": m for v, m in sam2.items()}, "EdgeTAM": edgetam}
    encoder_params = {k: sum(p.numel() for p in m.vision_encoder.parameters()) for k, m in params.items()}
    imgs = images(n + 1)
    times: dict[str, list[float]] = {k: [] for k in heads_}
    for i, img in enumerate(imgs):
        for name, head in heads_.items():
            t = time.perf_counter()
            head.embed(img)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    ms = {k: round(1000 * float(np.median(v)), 1) for k, v in times.items()}
    base = ms["SAM ViT-B, fp32"]
    report: dict[str, Any] = {"machine": start, "rounds": n, "native_bf16": cpu_has_bf16(), "ms": ms}
    report["image_encoder_parameters"] = encoder_params
    report["load_average_at_end"] = round(os.getloadavg()[0], 2)
    m = report["machine"]
    lines = [
        f"CPU: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average at start {m['load_average_at_start']}, "
        f"at end {report['load_average_at_end']}. Image encoder (`embed`) of a 1024×768 image, random weights, median "
        f"of {n} interleaved rounds after 1 warm-up, ms. No GPU. Image encoder parameters: "
        + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in encoder_params.items())
        + ".",
        "",
        "| mask head | image encoder | vs SAM ViT-B fp32 |",
        "| --- | ---: | ---: |",
        *(f"| {k} | {v} | {v / base:.2f}× |" for k, v in ms.items()),
    ]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"mask-heads-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


def markdown(report: dict[str, Any]) -> str:
    m, rows = report["machine"], report["rows"]
    base = rows["grounded-sam"]["total"]
    out = [
        f"CPU: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); load average at "
        f"start {m['load_average_at_start']}, at end {report['load_average_at_end']} (the machine is shared with "
        f"other jobs: compare rows of this run, as ratios). Native bf16: {report['native_bf16']}. No GPU. "
        f"1024×768 image, {report['boxes']} instances per request, random weights; medians of {report['runs']} "
        f"run(s) after {report['warmup']} warm-up, the flows taking turns on each image, ms.",
        "",
        *flow_table(rows, base),
    ]
    return "\n".join(out) + "\n"


def flow_table(rows: dict[str, Stages], base: float, extra: tuple[str, dict[str, Any]] | None = None) -> list[str]:
    """Markdown table lines of the flows' medians (ms), each first request as a ratio of `base`; `extra`: (a column
    title, its value per flow)."""
    title, values = extra or ("", {})
    head = "| flow | encode | score | 1st request | 2nd prompt, same image | 1st vs grounded-sam |"
    lines = [head + (f" {title} |" if extra else ""), "| --- |" + " ---: |" * (5 + bool(extra))]
    for name, ms in rows.items():
        cell = f" {values[name]} |" if extra else ""
        lines.append(
            f"| {name} | {ms['encode']} | {ms['score']} | **{ms['total']}** | {ms['2nd prompt']} | "
            f"{ms['total'] / base:.2f}× |{cell}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--boxes", type=int, default=3, help="instances kept per request (the best scoring)")
    parser.add_argument("--skip-sam3", action="store_true")
    parser.add_argument("--heads", type=int, default=0, help="only time the mask heads' encoders, N rounds")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    import torch

    from automask.backends import grounded_sam, sam3
    from automask.backends.sam import cpu_has_bf16

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.heads:
        heads(args.heads, args.out)
        return
    grounded_sam.MAX_DETECTIONS = sam3.MAX_DETECTIONS = args.boxes
    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "warmup": args.warmup, "boxes": args.boxes}
    report["native_bf16"] = cpu_has_bf16()
    print("building GroundingDINO-T, SAM ViT-B, SAM 2.1 Hiera-L, EdgeTAM (random weights)...", file=sys.stderr)
    m = build_models()
    m["edgetam"] = build_edgetam()
    m["sam2"] = build_sam2()
    imgs = images(args.warmup + args.runs)
    backends = {
        name: grounded(m, head, fast)
        for name, head, fast in (
            ("grounded-sam", "sam", False),
            ("grounded-sam2", "sam2", False),
            ("grounded-edgetam", "edgetam", False),
            ("grounded-sam, fast", "sam", True),
            ("grounded-sam2, fast", "sam2", True),
            ("grounded-edgetam, fast", "edgetam", True),
        )
    }
    if not args.skip_sam3:
        print("building SAM 3 (848 M parameters, random weights)...", file=sys.stderr)
        backends["sam3"] = build_sam3()
        if cpu_has_bf16():  # the fast preset: bf16 autocast over the same weights (sam3.use_autocast)
            backends["sam3, fast"] = copy.copy(backends["sam3"])
            backends["sam3, fast"].autocast = True
    report["rows"] = measure(backends, imgs, args.warmup)
    report["load_average_at_end"] = round(os.getloadavg()[0], 2)
    text = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sam3-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
