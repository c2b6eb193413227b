"""The sam3 backend on a tiny random `Sam3Model` built from a config and loaded through the real code.

The reference is transformers itself: `Sam3Model.forward` on the processor's inputs, and
`Sam3ImageProcessor.post_process_instance_segmentation` (its post-processing needs no torchvision: it is called
unbound). Pre-processing is checked against the processor's formulas (sam_reference.py), and against the processor
itself when REFERENCE_LIBS is set.

The models run on `torch_device` (TEST_TORCH_DEVICE: the CPU in CI; `bash bench/gpu_check.sh` runs this file on
CUDA), in float32 and under the bfloat16 autocast that SAM 3 uses on GPUs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from automask import install, models
from automask.backends import sam2_processing, sam3
from automask.backends.base import ScoreParams
from automask.backends.sam3 import DEFAULT_TRANSFORM, Sam3Backend, load, use_autocast
from automask.errors import InvalidOptionError, ModelNotAvailableError, StoppedError
from automask.pipeline import MaskGenerator
from automask.settings import Settings
from fake_hub import stub_hub
from sam_reference import (
    native_here,
    needs_reference_libs,
    reference_pixel_values,
    run_with_reference_libs,
    transformers_functions,
)
from tiny_models import make_tiny_sam3


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sam3(tmp_path_factory.mktemp("sam3"))


@pytest.fixture(scope="module")
def backend(sam3_dir: Path, torch_device: str, tmp_path_factory: pytest.TempPathFactory) -> Sam3Backend:
    """The tiny model in float32 on the test device."""
    return load(sam3_dir, Settings(data_dir=tmp_path_factory.mktemp("data"), device=torch_device, precision="fp32"))


def forward(backend: Sam3Backend, image: np.ndarray, prompt: str, features: Any = None, bf16: bool = False) -> Any:
    """`Sam3Model.forward` on the processor's inputs (pixel values from the formulas of sam_reference.py, the text
    padded as processing_sam3.py pads it), or on cached `features` (vision_embeds) when given; on the backend's
    device, under bfloat16 autocast when `bf16` (as SAM 3's own inference code runs on GPUs)."""
    text = backend.tokenizer(prompt, return_tensors="pt", padding="max_length", max_length=32).to(backend.device)
    if features is None:
        t = backend.transform
        pixels = reference_pixel_values(image, t.size, t.mean, t.std, native_here())
        image_inputs = {"pixel_values": pixels.to(backend.device)}
    else:
        image_inputs = {"vision_embeds": features.vision}
    device_type = torch.device(backend.device).type
    with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        return backend.model(**image_inputs, input_ids=text["input_ids"], attention_mask=text["attention_mask"])


def post_process(out: Any, threshold: float, size: tuple[int, int], on_cpu: bool = True) -> dict[str, Any]:
    """transformers' `Sam3ImageProcessor.post_process_instance_segmentation` (its own code, see sam_reference), on
    CPU copies of the model outputs (where ours post-processes), or with `on_cpu=False` where the model ran; its
    tensors are returned on the CPU."""
    fn = transformers_functions(
        "models.sam3.image_processing_sam3", ["_scale_boxes", "Sam3ImageProcessor.post_process_instance_segmentation"]
    )["Sam3ImageProcessor.post_process_instance_segmentation"]
    if on_cpu:
        out = type(out)(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()})
    result: dict[str, Any] = fn(None, out, threshold=threshold, mask_threshold=0.5, target_sizes=[size])[0]
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}


# -- equality with transformers --------------------------------------------------------------------------------


def test_cached_path_equals_the_full_forward(backend: Sam3Backend, coffee: np.ndarray) -> None:
    """Logits, scores and boxes from cached vision features equal transformers' full forward on the processor's
    inputs (float32, 1e-5)."""
    h, w = coffee.shape[:2]
    logits, score, boxes = backend.detect(backend.encode(coffee), "cup")
    out = forward(backend, coffee, "cup")
    torch.testing.assert_close(logits, out.pred_masks[0].cpu(), atol=1e-5, rtol=0)
    want_score = torch.sigmoid(out.pred_logits[0]) * torch.sigmoid(out.presence_logits[0])
    torch.testing.assert_close(score, want_score.cpu(), atol=1e-6, rtol=0)
    torch.testing.assert_close(boxes, out.pred_boxes[0].cpu() * torch.tensor([w, h, w, h]), atol=1e-4, rtol=0)


def test_bf16_autocast_equals_transformers_under_autocast(
    sam3_dir: Path, torch_device: str, coffee: np.ndarray, backend: Sam3Backend, tmp_path: Path
) -> None:
    """The autocast path (CUDA's default; precision 'bf16' here, the same code on the CPU): encode, then the cached
    forward, equals transformers' full forward under the same autocast, and stays near the float32 answer."""
    bf16 = load(sam3_dir, Settings(data_dir=tmp_path, device=torch_device, precision="bf16"))
    assert bf16.autocast and not backend.autocast
    features = bf16.encode(coffee)
    assert features.vision.fpn_hidden_states[-1].dtype == torch.bfloat16  # the encoder really ran in bf16
    logits, score, _ = bf16.detect(features, "cup")
    out = forward(bf16, coffee, "cup", bf16=True)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, out.pred_masks[0].float().cpu(), atol=1e-5, rtol=0)
    want = torch.sigmoid(out.pred_logits[0].float()) * torch.sigmoid(out.presence_logits[0].float())
    torch.testing.assert_close(score, want.cpu(), atol=1e-6, rtol=0)
    fp32_logits, fp32_score, _ = backend.detect(backend.encode(coffee), "cup")
    assert not torch.equal(logits, fp32_logits)  # bf16 rounding shows ...
    torch.testing.assert_close(score, fp32_score, atol=0.05, rtol=0)  # ... but moves scores little


def test_instances_equal_transformers_post_processing(backend: Sam3Backend, coffee: np.ndarray) -> None:
    """Scores, boxes and masks of `score` equal post_process_instance_segmentation on the same model outputs."""
    h, w = coffee.shape[:2]
    features = backend.encode(coffee)
    out = forward(backend, coffee, "cup", features)
    all_scores = np.sort(post_process(out, 0.0, (h, w))["scores"].numpy())
    threshold = float(all_scores[len(all_scores) // 2 - 1] + all_scores[len(all_scores) // 2]) / 2
    post = post_process(out, threshold, (h, w))
    ours = backend.score(features, ["cup"], min_score=threshold)
    order = np.argsort(-post["scores"].numpy(), kind="stable")
    assert 0 < len(ours.labels) == len(order) < len(all_scores)
    assert ours.scores is not None and ours.boxes is not None
    np.testing.assert_allclose(ours.scores, post["scores"].numpy()[order], atol=1e-7)
    np.testing.assert_allclose(ours.boxes, np.clip(post["boxes"].numpy()[order], 0, [w, h, w, h]), atol=1e-4)
    assert ours.maps.shape == (len(order), h, w)
    ref_masks = post["masks"].numpy()[order].astype(bool)  # sigmoid, bilinear to (H, W), > 0.5
    assert np.array_equal(ours.maps > 0.5, ref_masks) and ref_masks.any() and not ref_masks.all()
    assert ours.labels == ["cup"] * len(order)
    if out.pred_masks.is_cuda:  # transformers post-processing on the GPU: its bilinear kernel rounds otherwise, so a
        # pixel may fall on the other side of 0.5 only where it lies within a few float32 steps (6e-8) of it
        on_gpu = post_process(out, threshold, (h, w), on_cpu=False)
        gpu_masks = on_gpu["masks"].numpy()[np.argsort(-on_gpu["scores"].numpy(), kind="stable")].astype(bool)
        differ = gpu_masks != ref_masks
        assert np.abs(ours.maps[differ] - 0.5).max(initial=0) < 1e-6, f"{int(differ.sum())} pixels differ"


def test_pixel_values_are_bit_exact_on_photos(astronaut: np.ndarray, coffee: np.ndarray, chelsea: np.ndarray) -> None:
    for image in (astronaut, coffee, chelsea):
        for native in (True, False):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(sam2_processing, "native_uint8_resize", lambda native=native: native)
                ours = sam2_processing.pixel_values(image, DEFAULT_TRANSFORM)
            want = reference_pixel_values(image, (1008, 1008), (0.5,) * 3, (0.5,) * 3, native)
            assert ours.dtype == torch.float32 and ours.shape == (1, 3, 1008, 1008)
            assert torch.equal(ours, want), f"native={native}: {int((ours != want).sum())} values differ"


@needs_reference_libs
def test_pixel_values_equal_the_real_processor(astronaut: np.ndarray, coffee: np.ndarray, tmp_path: Path) -> None:
    """transformers' Sam3ImageProcessor itself (torchvision's Python code, REFERENCE_LIBS) on real photos."""
    np.savez(tmp_path / "in.npz", astronaut=astronaut, coffee=coffee)
    run_with_reference_libs(
        f"""
        import numpy as np
        from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor
        images = np.load({str(tmp_path / "in.npz")!r})
        p = Sam3ImageProcessor()
        np.savez({str(tmp_path / "out.npz")!r}, **{{k: p(images=images[k], return_tensors="pt")["pixel_values"].numpy()
                                                   for k in images.files}})
        """,
        tmp_path,
    )
    want = np.load(tmp_path / "out.npz")
    for name, image in (("astronaut", astronaut), ("coffee", coffee)):
        assert np.array_equal(sam2_processing.pixel_values(image, DEFAULT_TRANSFORM).numpy(), want[name])


def test_the_checkpoint_processor_config_is_read(sam3_dir: Path, backend: Sam3Backend) -> None:
    assert backend.transform.size == (112, 112) and backend.transform.source == "preprocessor_config.json"
    assert backend.transform.mean == (0.5, 0.5, 0.5)
    assert sam2_processing.ImageTransform.from_folder(sam3_dir / "nothing", DEFAULT_TRANSFORM) == DEFAULT_TRANSFORM


# -- the backend in the pipeline ------------------------------------------------------------------------------


def test_several_prompts_are_unioned_and_the_image_encoded_once(
    sam3_dir: Path, coffee: np.ndarray, settings: Settings, request: pytest.FixtureRequest
) -> None:
    gen = MaskGenerator(str(sam3_dir), settings)
    backend = gen.backend
    assert isinstance(backend, Sam3Backend) and backend.name == "sam3"
    calls: list[int] = []
    handle = backend.model.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    request.addfinalizer(handle.remove)
    threshold = 0.2
    first = gen.generate(coffee, "cup", threshold=threshold, grow_mask=0)
    second = gen.generate(coffee.copy(), "cup, saucer", threshold=threshold, grow_mask=0)
    assert len(calls) == 1 and first.timings["encode"] > 0 and second.timings["encode"] == 0
    features = backend.encode(coffee)
    per_prompt = [backend.score(features, [p], min_score=threshold) for p in ("cup", "saucer")]
    assert [d.label for d in second.detections] == [lab for s in per_prompt for lab in s.labels]
    union = np.zeros(coffee.shape[:2], bool)
    for s in per_prompt:
        union |= (s.maps >= 0.5).any(axis=0)
    assert union.any() and np.array_equal(second.mask > 0, union)
    assert [d.score for d in first.detections] == pytest.approx(np.asarray(per_prompt[0].scores).tolist(), abs=1e-6)


def test_a_run_told_to_stop_stops_before_its_next_prompt(
    backend: Sam3Backend, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    detected: list[str] = []
    detect = backend.detect
    monkeypatch.setattr(backend, "detect", lambda f, prompt: detected.append(prompt) or detect(f, prompt))
    with pytest.raises(StoppedError):  # told to stop once the first prompt is done
        MaskGenerator(backend).generate(coffee, "cup, saucer, spoon", should_stop=lambda: len(detected) == 1)
    assert detected == ["cup"]
    backend.score(backend.encode(coffee), ["saucer", "spoon"], params=ScoreParams(should_stop=lambda: False))
    assert detected == ["cup", "saucer", "spoon"]


def test_threshold_applies_to_the_instance_score(backend: Sam3Backend, coffee: np.ndarray) -> None:
    gen = MaskGenerator(backend)
    scores = np.sort(np.asarray(backend.score(backend.encode(coffee), ["cup"]).scores))[::-1]
    cut = float((scores[2] + scores[3]) / 2)
    result = gen.generate(coffee, "cup", threshold=cut, grow_mask=0)
    assert [d.score for d in result.detections] == pytest.approx(scores[:3].tolist(), abs=1e-6)
    assert gen.generate(coffee, "cup", threshold=1.0).empty


def test_instance_cap_keeps_the_best_across_prompts(
    backend: Sam3Backend, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    features = backend.encode(coffee)
    full = backend.score(features, ["cup", "saucer"])
    assert full.scores is not None and len(full.labels) == 24  # 12 queries per prompt
    monkeypatch.setattr(sam3, "MAX_DETECTIONS", 5)
    capped = backend.score(features, ["cup", "saucer"])
    best = np.sort(np.argsort(-full.scores, kind="stable")[:5])
    assert capped.scores is not None and capped.labels == [full.labels[i] for i in best]
    np.testing.assert_array_equal(capped.scores, full.scores[best])
    np.testing.assert_array_equal(capped.maps, full.maps[best])


def test_prompt_too_long(backend: Sam3Backend) -> None:
    with pytest.raises(InvalidOptionError, match="too long for sam3"):
        backend.tokens("a " * 40)


def test_precision_follows_device_and_preset(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert not use_autocast(s, "cpu") and use_autocast(s, "cuda")
    assert not use_autocast(Settings(data_dir=tmp_path, precision="fp32"), "cuda")
    assert use_autocast(Settings(data_dir=tmp_path, precision="bf16"), "cpu")
    fast = Settings(data_dir=tmp_path, preset="fast")
    assert use_autocast(fast, "cpu") == sam3.cpu_has_bf16()


# -- front-ends ---------------------------------------------------------------------------------------------------


def test_cli_json_lists_the_instances(sam3_dir: Path, coffee: np.ndarray, torch_device: str, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from automask.cli import main

    src = tmp_path / "coffee.png"
    Image.fromarray(coffee).save(src)
    args = ["mask", str(src), "-p", "cup, saucer", "--model", str(sam3_dir), "--threshold", "0.2", "--grow-mask", "0"]
    res = CliRunner().invoke(main, ["--device", torch_device, *args, "-o", str(tmp_path / "m.png"), "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    want = MaskGenerator(str(sam3_dir), Settings(data_dir=tmp_path / "d", device=torch_device)).generate(
        coffee, "cup, saucer", threshold=0.2, grow_mask=0
    )
    assert meta["backend"] == "sam3" and len(meta["detections"]) == len(want.detections) > 0
    assert [d["label"] for d in meta["detections"]] == [d.label for d in want.detections]
    assert [d["score"] for d in meta["detections"]] == pytest.approx([d.score for d in want.detections], abs=1e-5)
    assert meta["detections"][0]["box"] == pytest.approx(list(want.detections[0].box or ()), abs=1e-3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), want.mask)


def test_http_v1_answers_with_the_instances(sam3_dir: Path, coffee: np.ndarray, tmp_path: Path) -> None:
    """`automask serve --model DIR` in its own process; v1 with base64=true returns the metadata."""
    import base64

    import httpx

    from server_helpers import decode, free_port, png_bytes, server_process, wait_ready

    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "automask.cli", "--data-dir", str(data), "keys", "create"]
    token = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    port = free_port()
    with server_process(data, sam3_dir, port, {}, tmp_path / "serve.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120, proc)
        body = {"image": base64.b64encode(png_bytes(coffee)).decode(), "prompt": "cup", "threshold": 0.2,
                "grow_mask": 0, "base64": True}  # fmt: skip
        r = httpx.post(f"{url}/v1/automatic-mask-generator", json=body, headers={"x-api-key": token}, timeout=120)
    assert r.status_code == 200, r.text
    meta = r.json()
    want = MaskGenerator(str(sam3_dir), Settings(data_dir=tmp_path / "d")).generate(
        coffee, "cup", threshold=0.2, grow_mask=0
    )
    assert [d["score"] for d in meta["detections"]] == pytest.approx([d.score for d in want.detections], abs=1e-5)
    assert len(meta["detections"]) > 0
    assert np.array_equal(decode(base64.b64decode(meta["image"])), want.mask)


# -- catalogue and pull ---------------------------------------------------------------------------------------------


def test_local_folders_of_both_layouts_are_detected(sam3_dir: Path, tmp_path: Path) -> None:
    """A plain Sam3Model save and the hub's 'sam3_video' layout (detector_config) are both sam3 folders."""
    assert models.detect_backend(sam3_dir) == "sam3"
    video = tmp_path / "video"
    shutil.copytree(sam3_dir, video)
    config = json.loads((sam3_dir / "config.json").read_text())
    (video / "config.json").write_text(json.dumps({"model_type": "sam3_video", "detector_config": config}))
    assert models.detect_backend(video) == "sam3"


def test_catalogue_and_models_list(settings: Settings) -> None:
    from click.testing import CliRunner

    from automask.cli import main

    spec = models.CATALOGUE["sam3"]
    assert spec.repos == ("facebook/sam3",) and spec.backend == "sam3" and spec.gated
    res = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list"])
    assert res.exit_code == 0, res.output
    for name in ("sam3", "grounded-edgetam", "edgetam"):
        assert name in res.output


def test_pull_offline_fails_at_once_with_the_fix(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:

    stub_hub(monkeypatch, lambda *a, **k: pytest.fail("no download offline"))
    with pytest.raises(ModelNotAvailableError, match=r"offline.*automask models pull sam3"):
        models.pull("sam3", settings, progress=False)


def test_pull_without_a_token_says_how_to_get_access(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(install, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    stub_hub(monkeypatch, lambda *a, **k: pytest.fail("no token: no download"))
    with pytest.raises(ModelNotAvailableError, match=r"gated.*huggingface.co/facebook/sam3.*HF_TOKEN=<token>"):
        models.pull("sam3", settings, progress=False)


def test_pull_with_a_token_without_access(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def refuse(*_: Any, **__: Any) -> str:
        response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/facebook/sam3"))
        raise GatedRepoError("Access to model facebook/sam3 is restricted.", response=response)  # type: ignore[arg-type]

    monkeypatch.setattr(install, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    stub_hub(monkeypatch, refuse)
    with pytest.raises(ModelNotAvailableError, match=r"no access to it yet\. Request access at https://hug"):
        models.pull("sam3", settings, progress=False)
    assert not models.model_dir("sam3", settings).exists()
