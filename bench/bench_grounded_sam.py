"""Speed of Grounded-SAM on a CPU: automask's grounded-sam backend against the naive transformers flow.

    python bench/bench_grounded_sam.py [--runs 5] [--warmup 1] [--boxes 3] [--variants]

Models: full-size GroundingDINO-T (Swin-T backbone, BERT-base text encoder, 6 encoder + 6 decoder layers,
900 queries, d_model 256) and SAM ViT-B (12 layers, 1024×1024 input), built from configs in code with random
weights: timing does not depend on weight values, and nothing is downloaded. One process, models built once
(float32 for the naive flow; automask's flows get their own copies, converted as they run).
Input: a 1024×768 RGB array (scikit-image's astronaut, resized); each run changes one 8×8 block, so no cache
answers a run from an earlier one. Random weights give arbitrary boxes, so every flow segments the same number
of boxes, the best scoring (--boxes, default 3; threshold and text threshold 0).

Flows (medians over --runs after --warmup):
  naive        GroundingDinoProcessor (shortest edge 800, as the checkpoint's processor) -> the detector ->
               post_process_grounded_object_detection -> best boxes -> SamProcessor -> SamModel (image encoder
               and mask decoder, float32) -> post_process_masks -> best of 3 by IoU -> union: a script written
               from the model cards.
  automask     MaskGenerator(grounded-sam).generate(image, prompt) on a new image (empty cache), default
               options (grow 10) under the `fast` preset (the default when the README's numbers were taken;
               the default is now the reference settings): detector at shortest edge 512, its backbone features
               kept; on CPUs with native bf16, SAM's image encoder in bfloat16 and the detector's encoder under
               bf16 autocast (else float32); mask decoder float32; union, grow.
  2nd prompt   the same generator and image, another prompt: both image encoders skipped (feature cache).
  --variants adds automask at detector 800 in float32 (the caching alone), and each speed-up alone.
Writes bench/results/grounded-sam-<host>-<date>.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
PROMPT, SECOND_PROMPT = "helmet", "flag"
Stages = dict[str, float]


# -- models and inputs -----------------------------------------------------------------------------------------


def bert_vocab(size: int = 30522) -> dict[str, int]:
    """A WordPiece vocabulary of bert-base-uncased's size, with the ids GroundingDINO hard-codes
    ([CLS]=101, [SEP]=102, '.'=1012, '?'=1029) and the benchmark's words."""
    fixed = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
    words = iter(["helmet", "flag", "rocket", "astronaut", *(chr(c) for c in range(97, 123))])
    vocab = {tok: i for i, tok in fixed.items()}
    for i in range(size):
        if i not in fixed:
            vocab[next(words, f"[unused{i}]")] = i
    return vocab


def build_models() -> dict[str, Any]:
    """GroundingDINO-T and SAM ViT-B with random weights, and their processors (transformers' defaults)."""
    import torch
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamConfig,
        SamModel,
        SamProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(0)
    swin = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
    swin.out_indices = [2, 3, 4]  # with out_features: stages 2-4, as GroundingDinoConfig's default backbone
    bert = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12}
    dino_config = GroundingDinoConfig(
        backbone_config=swin, text_config=bert, d_model=256, encoder_layers=6, decoder_layers=6,
        num_queries=900, num_feature_levels=4, max_text_len=256,
    )  # fmt: skip
    detector = GroundingDinoForObjectDetection(dino_config).eval()
    tokenizer = BertTokenizer(vocab=bert_vocab(), do_lower_case=True)
    dino_processor = GroundingDinoProcessor(GroundingDinoImageProcessorPil(), tokenizer)
    sam_config = SamConfig(vision_config={"initializer_range": 0.02})  # ViT-B; tiny init would underflow
    sam = SamModel(sam_config).eval()
    sam_processor = SamProcessor(SamImageProcessorPil())
    return {"detector": detector, "dino_processor": dino_processor, "sam": sam, "sam_processor": sam_processor}


def images(count: int, width: int = 1024, height: int = 768) -> list[np.ndarray]:
    """`count` distinct H×W×3 uint8 images of scikit-image's astronaut, differing in one 8×8 block."""
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.LANCZOS))
    out = []
    for i in range(count):
        img = base.copy()
        img[:8, :8] = (i * 37) % 256
        out.append(img)
    return out


# -- flows ------------------------------------------------------------------------------------------------------


class Clock:
    """Accumulates wall time per stage name."""

    def __init__(self) -> None:
        self.stages: Stages = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self._t
        self._t = now


def naive_flow(m: dict[str, Any], boxes: int) -> Callable[[np.ndarray, str], Stages]:
    import torch

    def run(image: np.ndarray, prompt: str) -> Stages:
        clock = Clock()
        with torch.inference_mode():
            inputs = m["dino_processor"](images=image, text=f"{prompt}.", return_tensors="pt")
            out = m["detector"](**inputs)
            det = m["dino_processor"].post_process_grounded_object_detection(
                out, threshold=0.0, text_threshold=0.0, target_sizes=[image.shape[:2]]
            )[0]
            best = det["boxes"][det["scores"].argsort(descending=True)[:boxes]]
            clock.lap("GroundingDINO")
            sam_inputs = m["sam_processor"](images=image, input_boxes=[best.tolist()], return_tensors="pt")
            sam_out = m["sam"](**sam_inputs)
            clock.lap("SAM encoder + decoder")
            masks = m["sam_processor"].post_process_masks(
                sam_out.pred_masks, sam_inputs["original_sizes"], sam_inputs["reshaped_input_sizes"]
            )[0]
            pick = sam_out.iou_scores[0].argmax(-1)
            union = masks[torch.arange(len(pick)), pick].any(0).numpy()
            clock.lap("mask post-processing")
        clock.stages["total"] = sum(clock.stages.values())
        assert union.shape == image.shape[:2]
        return clock.stages

    return run


def automask_backend(m: dict[str, Any], detector_edge: int | None, precision: str) -> Any:
    """automask's grounded-sam backend on copies of the models (the naive flow keeps the float32 originals)."""
    from automask.backends import grounded_sam
    from automask.backends.grounded_sam import GroundedSamBackend
    from automask.backends.sam import SamSegmenter, choose_dtype

    dtype = choose_dtype(precision, "cpu")  # type: ignore[arg-type]
    sam = copy.deepcopy(m["sam"])
    sam.vision_encoder.to(dtype)
    segmenter = SamSegmenter(sam, m["sam_processor"].image_processor, "sam-vit-b (random)", "cpu", dtype)
    detector, processor = copy.deepcopy(m["detector"]), copy.copy(m["dino_processor"])
    backend = GroundedSamBackend(detector, processor, segmenter, "grounding-dino-t (random)", "cpu", dtype)
    if detector_edge is not None:
        backend.detector_size = {"shortest_edge": detector_edge, "longest_edge": round(detector_edge * 1333 / 800)}
    grounded_sam.MAX_DETECTIONS = m["boxes"]
    return backend


def automask_flow(backend: Any, boxes: int) -> Callable[[np.ndarray, str], Stages]:
    """First request on a new image, then a second prompt on it; per-stage times from the result's timings."""
    from automask.options import MaskOptions
    from automask.pipeline import MaskGenerator

    def run(image: np.ndarray, prompt: str) -> Stages:
        gen = MaskGenerator(backend)
        opts = MaskOptions(threshold=0.0, text_threshold=0.0)  # every box scores: the best `boxes` are kept
        first = gen.generate(image, prompt, opts)
        second = gen.generate(image, SECOND_PROMPT, opts)
        assert len(first.detections) == boxes
        t1, t2 = first.timings, second.timings
        return {
            "encode (detector backbone + SAM image encoder)": t1["encode"],
            "score (detector + SAM decoder)": t1["score"],
            "post-processing + render": t1["postprocess"] + t1["render"],
            "total": t1["total"],
            "2nd prompt: score": t2["score"],
            "2nd prompt: total": t2["total"],
        }

    return run


def stage_split(backend: Any, image: np.ndarray) -> Stages:
    """automask's stages one by one (encode split into its two encoders), for the table's detail row."""
    import torch

    from automask.backends.grounded_sam import GroundedFeatures

    clock = Clock()
    inputs = backend.processor.image_processor(images=image, size=backend.detector_size, return_tensors="pt")
    with torch.inference_mode():
        backbone = backend.backbone.inner(inputs["pixel_values"], inputs["pixel_mask"])
    clock.lap("detector backbone")
    sam = backend.segmenter.embed(image)
    clock.lap("SAM image encoder")
    det_inputs = {k: inputs[k] for k in ("pixel_values", "pixel_mask")}
    features = GroundedFeatures(image.shape[:2], det_inputs, backbone, sam)
    dets = backend.detect(features, [PROMPT], 0.0, 0.0)
    clock.lap("detector (text-dependent part)")
    backend.segmenter.segment(sam, boxes=dets.boxes)
    clock.lap("SAM decoder + upscale")
    return clock.stages


# -- measuring and reporting ----------------------------------------------------------------------------------


def measure(run: Callable[[np.ndarray, str], Stages], imgs: list[np.ndarray], warmup: int) -> dict[str, float]:
    """Median milliseconds per stage over `imgs` (after `warmup` runs on the first image, not counted)."""
    for _ in range(warmup):
        run(imgs[0], PROMPT)
    samples: dict[str, list[float]] = {}
    for img in imgs[1:]:
        for name, seconds in run(img, PROMPT).items():
            samples.setdefault(name, []).append(seconds)
    return {name: round(1000 * statistics.median(v), 1) for name, v in samples.items()}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    names = [ln.split(":", 1)[1].strip() for ln in _cpuinfo().splitlines() if ln.startswith("model name")]
    return {
        "cpu": names[0] if names else cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def markdown(report: dict[str, Any]) -> str:
    m, rows = report["machine"], report["rows"]
    naive = rows["naive"]["total"]
    out = [
        f"CPU: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); load average "
        f"at start {m['load_average_at_start']}. 1024×768 image, {report['boxes']} boxes per request, random "
        f"weights; medians of {report['runs']} runs after {report['warmup']} warm-up, ms.",
        "",
        "| flow | stages | end-to-end | vs naive |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, ms in rows.items():
        stages = "; ".join(f"{k} {v}" for k, v in ms.items() if k != "total" and not k.startswith("2nd"))
        out.append(f"| {name} | {stages} | **{ms['total']}** | {ms['total'] / naive:.2f}× |")
        if "2nd prompt: total" in ms:
            second = ms["2nd prompt: total"]
            out.append(f"| {name}, 2nd prompt, same image | score {ms['2nd prompt: score']} | **{second}** | "
                       f"{second / naive:.2f}× ({second / ms['total']:.2f}× the 1st) |")  # fmt: skip
    out += ["", f"automask stages one by one: {report['split']}", ""]
    out += [f"- {line}" for line in report["targets"]]
    return "\n".join(out) + "\n"


def targets(rows: dict[str, Stages]) -> list[str]:
    ours, naive = rows["automask"], rows["naive"]["total"]
    first = ours["total"] / naive
    second = ours["2nd prompt: total"] / ours["total"]
    return [
        f"automask end-to-end = {first:.2f}× naive (target <= 0.5×): {'met' if first <= 0.5 else 'MISSED'}",
        f"2nd prompt = {second:.2f}× the 1st request (target <= 0.35×): {'met' if second <= 0.35 else 'MISSED'}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--boxes", type=int, default=3, help="boxes segmented per request (the best scoring)")
    parser.add_argument("--variants", action="store_true", help="also time each speed-up alone")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    import torch

    from automask.backends.grounded_sam import FAST_DETECTOR_EDGE

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print("building full-size models with random weights...", file=sys.stderr)
    m = build_models()
    m["boxes"] = args.boxes
    imgs = images(args.runs + 1)
    flows: dict[str, Callable[[np.ndarray, str], Stages]] = {"naive": naive_flow(m, args.boxes)}
    ours = automask_backend(m, FAST_DETECTOR_EDGE, "auto")  # the fast preset (the default when first measured)
    flows["automask"] = automask_flow(ours, args.boxes)
    if args.variants:
        for name, edge, precision in (
            ("automask, detector 800, fp32 (cache only)", 800, "fp32"),
            ("automask, detector 512, fp32", FAST_DETECTOR_EDGE, "fp32"),
            ("automask, detector 800, bf16 auto", 800, "auto"),
        ):
            flows[name] = automask_flow(automask_backend(m, edge, precision), args.boxes)
    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "warmup": args.warmup, "boxes": args.boxes}
    rows = {}
    for name, run in flows.items():
        print(f"timing {name}...", file=sys.stderr)
        rows[name] = measure(run, imgs, args.warmup)
    report["rows"] = rows
    report["split"] = {k: round(1000 * v, 1) for k, v in stage_split(ours, imgs[-1]).items()}
    report["detector_size"] = ours.detector_size
    report["sam_dtype"] = str(ours.segmenter.dtype)
    report["targets"] = targets(rows)
    text = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"grounded-sam-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
