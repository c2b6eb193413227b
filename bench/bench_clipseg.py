"""Speed and memory of CLIPSeg on a CPU: the naive transformers flow against automask's torch, ONNX and int8 paths.

    python bench/bench_clipseg.py [--runs 10] [--warmup 2] [--flows naive,torch,onnx,int8,http-onnx,http-int8]

The model has the full size of CIDAS/clipseg-rd64-refined (ViT-B/16 at 352×352, extract_layers 3/6/9,
reduce_dim 64, the refined decoder) with random weights: timing does not depend on weight values, and nothing
is downloaded. It is built once (with its fp32 and int8 ONNX export) in --model-dir. The input is a 1024×768
JPEG (scikit-image's astronaut, resized); each run gets a slightly different JPEG, so no feature cache helps.

Flows, each in its own process (peak RSS = that process's VmHWM, model load included):
  naive      PIL decode -> CLIPSegProcessor -> CLIPSegForImageSegmentation -> sigmoid -> bilinear resize
             (torch) -> union -> threshold -> PNG (PIL defaults): what a script written from the model card does
  torch      automask MaskGenerator, runtime=torch (defaults: threshold 0.2, grow 10 px), then PNG
  onnx       the same, runtime=onnx (fp32)
  int8       the same, runtime=onnx with int8 graphs
  http-onnx  POST /v1/automatic-mask-generator on loopback (JSON, base64 JPEG) to `automask serve`, fp32
  http-int8  the same server with AUTOMASK_INT8=true
Each flow: 1 prompt and 3 prompts on one image; medians over --runs runs after --warmup runs.
Writes bench/results/clipseg-<host>-<date>.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PROMPTS = {1: ["helmet"], 3: ["helmet", "flag", "rocket"]}
ALL_FLOWS = ("naive", "torch", "onnx", "int8", "http-onnx", "http-int8")
HERE = Path(__file__).resolve().parent


# -- inputs ----------------------------------------------------------------------------------------------------


def build_model(folder: Path) -> Path:
    """Save a full-size CLIPSeg rd64-refined with random weights + a processor (byte-level vocabulary) to `folder`,
    then export its ONNX graphs (fp32 and int8)."""
    if not (folder / "onnx" / "manifest.json").is_file():
        save_random_model(folder)
        from automask.backends.clipseg_export import export

        export(folder, int8=True)
    return folder


SAVED_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json", "config.json")
"""What `save_random_model` writes (transformers 5 keeps the image processor's settings in processor_config.json:
there is no preprocessor_config.json), in the order they are moved into place: config.json last."""


def save_random_model(folder: Path) -> Path:
    """Save a full-size CLIPSeg rd64-refined with random weights (seed 0) + a processor (byte-level vocabulary) to
    `folder`, unless it holds every file of `SAVED_FILES` already.

    Written into a temp folder beside it, then moved in file by file (each `os.replace` is whole), config.json
    last: a run stopped half-way leaves files that are complete but not all of them, and the next run writes
    them again."""
    if all((folder / name).is_file() for name in SAVED_FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        staged = Path(tmp)
        write_random_model(staged)
        missing = [name for name in SAVED_FILES if not (staged / name).is_file()]
        if missing:
            raise RuntimeError(f"save_pretrained wrote no {', '.join(missing)}: update SAVED_FILES")
        for name in sorted(os.listdir(staged), key=lambda name: name == "config.json"):
            os.replace(staged / name, folder / name)
    return folder


def write_random_model(folder: Path) -> None:
    """Write the model of `save_random_model` into `folder` (`save_pretrained` of the model and its processor)."""
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import byte_level_vocab

    config = CLIPSegConfig(  # the non-default fields of CIDAS/clipseg-rd64-refined's config.json
        text_config={"vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config={"patch_size": 16, "image_size": 224},
        extract_layers=[3, 6, 9],
        reduce_dim=64,
        use_complex_transposed_convolution=True,
    )
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(config).eval().save_pretrained(folder)
    size = {"height": 352, "width": 352}
    images = ViTImageProcessor(size=size, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    tokenizer = CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)
    CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def jpegs(count: int, width: int = 1024, height: int = 768) -> list[bytes]:
    """`count` distinct 1024×768 JPEGs (quality 90) of scikit-image's astronaut, differing in one 8×8 block
    (different pixels: no feature cache can answer a run from an earlier one)."""
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.LANCZOS))
    out = []
    for i in range(count):
        img = base.copy()
        img[:8, :8] = (i * 37) % 256
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def image_set(images: list[bytes], prompts: int) -> list[bytes]:
    """The JPEGs used for `prompts` prompts: each prompt count gets its own half, so no image is seen twice."""
    half = len(images) // 2
    return images[:half] if prompts == 1 else images[half:]


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- in-process flows (run in a child process) -----------------------------------------------------------------


def naive_flow(model_dir: Path) -> Callable[[bytes, list[str]], dict[str, float]]:
    """The transformers flow of the model card; returns a function timing one request stage by stage."""
    import torch
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    processor = CLIPSegProcessor.from_pretrained(str(model_dir))
    model = CLIPSegForImageSegmentation.from_pretrained(str(model_dir)).eval()

    def run(jpeg: bytes, prompts: list[str]) -> dict[str, float]:
        t: dict[str, float] = {}
        with stage(t, "decode"):
            image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        with stage(t, "preprocess"):
            inputs = processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
        with stage(t, "model"), torch.no_grad():
            logits = model(**inputs).logits.reshape(len(prompts), 1, 352, 352)
        with stage(t, "postprocess"):
            probs = torch.nn.functional.interpolate(torch.sigmoid(logits), size=image.size[::-1], mode="bilinear")
            mask = ((probs.amax(dim=0)[0] >= 0.2).numpy() * 255).astype(np.uint8)
        with stage(t, "png"):
            buf = io.BytesIO()
            Image.fromarray(mask).save(buf, format="PNG")
        return t

    return run


def automask_flow(model_dir: Path, runtime: str, int8: bool) -> Callable[[bytes, list[str]], dict[str, float]]:
    """automask's library call (feature cache off) + PNG encoding, timed by stage."""
    from automask import MaskGenerator, Settings

    gen = MaskGenerator(str(model_dir), Settings(runtime=runtime, int8=int8), cache_size=0)  # type: ignore[arg-type]
    expected = {"torch": "clipseg", "onnx": "clipseg-onnx-int8" if int8 else "clipseg-onnx"}[runtime]
    assert gen.backend.name == expected, (gen.backend.name, expected)

    def run(jpeg: bytes, prompts: list[str]) -> dict[str, float]:
        result = gen.generate(jpeg, prompts)
        t = {k: result.timings[k] for k in ("decode", "encode", "score")}
        t["postprocess"] = result.timings["postprocess"] + result.timings.get("render", 0.0)
        with stage(t, "png"):
            result.to_png()
        return t

    return run


@contextlib.contextmanager
def stage(timings: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t


def child(flow: str, model_dir: Path, images: list[bytes], warmup: int) -> dict[str, Any]:
    """Load `flow`, then time it on every image (the first `warmup` untimed) for 1 and 3 prompts."""
    t = time.perf_counter()
    if flow == "naive":
        run = naive_flow(model_dir)
    else:
        run = automask_flow(model_dir, "torch" if flow == "torch" else "onnx", flow == "int8")
    load = time.perf_counter() - t
    rows = []
    for n, prompts in PROMPTS.items():
        stages: dict[str, list[float]] = {}
        for i, jpeg in enumerate(image_set(images, n)):
            t = time.perf_counter()
            timings = run(jpeg, prompts)
            total = time.perf_counter() - t
            if i >= warmup:
                for k, v in {**timings, "total": total}.items():
                    stages.setdefault(k, []).append(v)
        rows.append(summary(flow, n, stages))
    return {"load_s": round(load, 2), "peak_rss_mb": round(peak_rss_mb(), 1), "rows": rows}


def summary(flow: str, prompts: int, stages: dict[str, list[float]]) -> dict[str, Any]:
    total = stages["total"]
    return {
        "flow": flow,
        "prompts": prompts,
        "runs": len(total),
        "median_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in stages.items()},
        "min_ms": round(min(total) * 1000, 1),
        "max_ms": round(max(total) * 1000, 1),
    }


# -- the HTTP flow ---------------------------------------------------------------------------------------------


def http_flow(flow: str, model_dir: Path, images: list[bytes], warmup: int, data_dir: Path) -> dict[str, Any]:
    """Start `automask serve` (fp32 or int8), time v1 requests from this process, read the server's peak RSS."""
    import httpx

    env = {**os.environ, "AUTOMASK_DATA_DIR": str(data_dir), "AUTOMASK_RUNTIME": "onnx"}
    env["AUTOMASK_INT8"] = "true" if flow == "http-int8" else "false"
    cli = [sys.executable, "-m", "automask.cli"]
    key = subprocess.run([*cli, "keys", "create"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    port = free_port()
    serve = [*cli, "serve", "--port", str(port), "--model", str(model_dir), "--log-level", "warning"]
    server = subprocess.Popen(serve, env=env, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        load = wait_ready(base, server)
        rows = []
        with httpx.Client(base_url=base, headers={"x-api-key": key}, timeout=120) as client:
            for n, prompts in PROMPTS.items():
                totals = []
                for i, jpeg in enumerate(image_set(images, n)):
                    body = {"image": base64.b64encode(jpeg).decode("ascii"), "prompt": ", ".join(prompts)}
                    t = time.perf_counter()
                    response = client.post("/v1/automatic-mask-generator", json=body)
                    elapsed = time.perf_counter() - t
                    assert response.status_code == 200 and response.content[:4] == b"\x89PNG", response.text[:200]
                    if i >= warmup:
                        totals.append(elapsed)
                rows.append(summary(flow, n, {"total": totals}))
        return {"load_s": round(load, 2), "peak_rss_mb": round(peak_rss_mb(server.pid), 1), "rows": rows}
    finally:
        server.terminate()
        server.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, server: subprocess.Popen[bytes], limit: float = 600) -> float:
    """Seconds until /readyz answers 200 (the model loaded and warmed up)."""
    import httpx

    t = time.perf_counter()
    while time.perf_counter() - t < limit:
        if server.poll() is not None:
            raise RuntimeError(f"automask serve exited with code {server.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - t
        time.sleep(0.2)
    raise RuntimeError("automask serve did not become ready")


# -- report ----------------------------------------------------------------------------------------------------


def save_report(out: Path, name: str, report: dict[str, Any], text: str) -> None:
    """Write `report` as `out/NAME-HOST-TIME.json` and its markdown `text` beside it (`.md`); print `text`."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{platform.node() or 'host'}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md", file=sys.stderr)


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }


def targets(rows: list[dict[str, Any]], flows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, checked on this run's numbers."""
    total = {(r["flow"], r["prompts"]): r["median_ms"]["total"] for r in rows}
    lines = []
    naive = total.get(("naive", 1))
    for flow, limit in (("http-onnx", 0.8), ("http-int8", 0.55)):
        if naive and (flow, 1) in total:
            ratio = total[(flow, 1)] / naive
            lines.append(f"{flow}, 1 prompt: {ratio:.2f}× naive (target <= {limit}×): {verdict(ratio <= limit)}")
    for flow in flows:
        if (flow, 1) in total and (flow, 3) in total:
            ratio = total[(flow, 3)] / total[(flow, 1)]
            lines.append(f"{flow}: 3 prompts = {ratio:.2f}× 1 prompt (target <= 1.3×): {verdict(ratio <= 1.3)}")
    for flow in ("http-onnx", "http-int8"):
        if flow in flows:
            rss = flows[flow]["peak_rss_mb"]
            lines.append(f"{flow}: server peak RSS {rss:.0f} MB (target < 1536 MB): {verdict(rss < 1536)}")
    return lines


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
        f"load average at start {m['load_average_at_start']:.2f}. {report['runs']} runs after {report['warmup']} "
        "warm-up, medians in ms; 1024×768 JPEG.",
        "",
        "| flow | prompts | decode | preprocess + encode | text + decoder | post | PNG | end-to-end | vs naive |"
        " peak RSS | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    naive = {r["prompts"]: r["median_ms"]["total"] for r in report["rows"] if r["flow"] == "naive"}
    for r in report["rows"]:
        ms, flow = r["median_ms"], report["flows"][r["flow"]]
        if r["flow"] == "naive":  # the processor, then one forward of the whole model (image and text)
            cells = [ms["decode"], ms["preprocess"], ms["model"], ms["postprocess"], ms["png"]]
        else:
            cells = [ms.get(k, "") for k in ("decode", "encode", "score", "postprocess", "png")]
        ratio = f"{ms['total'] / naive[r['prompts']]:.2f}×" if r["prompts"] in naive else ""
        text = [str(c) if c != "" else "–" for c in cells]
        out.append(
            f"| {r['flow']} | {r['prompts']} | {' | '.join(text)} | **{ms['total']}** | {ratio} |"
            f" {flow['peak_rss_mb']:.0f} MB | {flow['load_s']} s |"
        )
    out += ["", "naive: 'preprocess + encode' is the processor, 'text + decoder' is the whole model forward.", ""]
    out += [f"- {line}" for line in report["targets"]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--flows", default=",".join(ALL_FLOWS))
    default_dir = Path.home() / ".cache" / "automask-bench" / "clipseg-rd64-random"
    parser.add_argument("--model-dir", type=Path, default=default_dir)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one in-process flow, in its own process
        images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))]
        print(json.dumps(child(args.child, args.model_dir, images, args.warmup)))
        return
    flows = [f for f in args.flows.split(",") if f]
    unknown = set(flows) - set(ALL_FLOWS)
    if unknown:
        parser.error(f"unknown flows {sorted(unknown)}; choose from {', '.join(ALL_FLOWS)}")
    report = run_all(args, flows)
    save_report(args.out, "clipseg", report, markdown(report))


def run_all(args: argparse.Namespace, flows: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "warmup": args.warmup, "flows": {}}
    print(f"model: {build_model(args.model_dir)}", file=sys.stderr)
    images = jpegs(2 * (args.runs + args.warmup))
    with tempfile.TemporaryDirectory(prefix="automask-bench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, jpeg in enumerate(images):
            (folder / f"{i:03d}.jpg").write_bytes(jpeg)
        env = {**os.environ, "AUTOMASK_DATA_DIR": str(Path(tmp) / "data"), "HF_HUB_OFFLINE": "1"}
        for flow in flows:
            print(f"running {flow}...", file=sys.stderr)
            if flow.startswith("http"):
                result = http_flow(flow, args.model_dir, images, args.warmup, Path(tmp) / "data")
            else:
                cmd = [sys.executable, __file__, "--child", flow, "--model-dir", str(args.model_dir)]
                cmd += ["--images", str(folder), "--warmup", str(args.warmup)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"{flow} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
            report["flows"][flow] = {k: v for k, v in result.items() if k != "rows"}
            report.setdefault("rows", []).extend(result["rows"])
    report["targets"] = targets(report["rows"], report["flows"])
    return report


if __name__ == "__main__":
    main()
