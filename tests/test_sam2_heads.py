"""The SAM 2 family as mask heads: SAM 2.1 (tiny random `Sam2Model`, saved as the hub's 'sam2_video' checkpoints
are) and EdgeTAM (tiny random `EdgeTamModel`, automask's RepViT as its backbone), each in Grounded-SAM
(`grounded-sam2`, `grounded-edgetam`) and in refine; the presets of the grounded backends.

The tests shared by both heads are parametrized over `HEADS`. The reference is transformers' own `forward` on the
processor's inputs and `Sam2ImageProcessor.post_process_masks` (its own code, compiled unbound: see
sam_reference.py); RepViT is checked against timm when REFERENCE_LIBS is set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from automask import models
from automask.backends import grounded_sam as gs
from automask.backends.refine import regions
from automask.backends.sam import find_mask_head_folder, head_kind, load_mask_head
from automask.backends.sam2 import DEFAULT_TRANSFORM, Sam2Segmenter, load_segmenter
from automask.errors import ModelNotAvailableError
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
from tiny_models import make_tiny_edgetam, make_tiny_grounding_dino, make_tiny_sam, make_tiny_sam2

BOXES = np.array([[30.0, 40.0, 300.0, 350.0], [250.5, 10.0, 590.0, 200.25], [0.0, 0.0, 600.0, 400.0]], np.float32)
POINTS = np.array([[[100.0, 120.0]], [[400.0, 90.0]], [[300.0, 200.0]]], np.float32)


HEADS = {
    "edgetam": (models.EDGETAM_REPO, make_tiny_edgetam),
    "sam2": (models.SAM2_REPO, lambda folder: make_tiny_sam2(folder, video=True)),
}
"""The SAM 2-family heads: their hub repository and how to build a tiny checkpoint of them."""


@pytest.fixture(scope="module", params=sorted(HEADS))
def head(request: pytest.FixtureRequest) -> str:
    """The kind of mask head under test ('edgetam' or 'sam2'): every test using it runs once per head."""
    return str(request.param)


@pytest.fixture(scope="module")
def head_dir(head: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(HEADS[head][1](tmp_path_factory.mktemp(head)))


@pytest.fixture(scope="module")
def segmenter(head_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Sam2Segmenter:
    return load_segmenter(head_dir, Settings(data_dir=tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def grounded_dir(tmp_path_factory: pytest.TempPathFactory, head: str, head_dir: Path) -> Path:
    """A grounded-<head> folder as `automask models pull grounded-<head>` lays it out (no marker)."""
    folder = tmp_path_factory.mktemp(f"grounded-{head}")
    make_tiny_grounding_dino(folder / "IDEA-Research--grounding-dino-tiny")
    shutil.copytree(head_dir, folder / models.repo_folder(HEADS[head][0]))
    return folder


@pytest.fixture(scope="module")
def edgetam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_edgetam(tmp_path_factory.mktemp("edgetam"))


@pytest.fixture(scope="module")
def ge_dir(tmp_path_factory: pytest.TempPathFactory, edgetam_dir: Path) -> Path:
    """A grounded-edgetam folder (the EdgeTAM-only tests)."""
    folder = tmp_path_factory.mktemp("grounded-edgetam")
    make_tiny_grounding_dino(folder / "IDEA-Research--grounding-dino-tiny")
    shutil.copytree(edgetam_dir, folder / "yonigozlan--EdgeTAM-hf")
    return folder


# -- equality with transformers --------------------------------------------------------------------------------


def test_masks_equal_transformers(segmenter: Sam2Segmenter, head: str, coffee: np.ndarray) -> None:
    """Boxes + points through the cached embedding equal `Sam2Model.forward` / `EdgeTamModel.forward` on the
    processor's inputs, then `post_process_masks` and the best of three by predicted IoU (float32, 1e-5)."""
    assert segmenter.kind == head and type(segmenter.model).__name__ == {"sam2": "Sam2Model"}.get(head, "EdgeTamModel")
    h, w = coffee.shape[:2]
    ours_logits, ours_iou = segmenter.decode(segmenter.embed(coffee), BOXES, POINTS, None)

    t = segmenter.transform
    pixels = reference_pixel_values(coffee, t.size, t.mean, t.std, native_here())
    boxes = torch.tensor(BOXES).reshape(-1, 2, 2)  # processing_sam2.py _normalize_coordinates, target 128 here
    boxes[..., 0] = boxes[..., 0] * (t.size[1] / w)
    boxes[..., 1] = boxes[..., 1] * (t.size[0] / h)
    points = torch.tensor(POINTS)
    points[..., 0] = points[..., 0] * (t.size[1] / w)
    points[..., 1] = points[..., 1] * (t.size[0] / h)
    with torch.inference_mode():
        out = segmenter.model(
            pixel_values=pixels,
            input_boxes=boxes.reshape(1, -1, 4),
            input_points=points[None],
            input_labels=torch.ones(1, 3, 1, dtype=torch.long),
            multimask_output=True,
        )
    post = transformers_functions("models.sam2.image_processing_sam2", ["Sam2ImageProcessor.post_process_masks"])
    masks = post["Sam2ImageProcessor.post_process_masks"](None, [out.pred_masks[0]], [[h, w]], binarize=False)[0]
    best = out.iou_scores[0].argmax(-1)
    rows = torch.arange(3)
    torch.testing.assert_close(ours_iou, out.iou_scores[0][rows, best], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_logits, masks[rows, best], atol=1e-5, rtol=0)
    probs = segmenter.segment(segmenter.embed(coffee), boxes=BOXES, points=POINTS).probs
    np.testing.assert_array_equal(probs, torch.sigmoid(ours_logits).numpy())  # selected iff logit >= 0


def test_sam2_video_checkpoint_loads_every_weight(tmp_path: Path) -> None:
    """A 'sam2_video' checkpoint (as the hub's SAM 2.1 ones are) loads into `Sam2Model` with every weight of the
    image path taken from the file (none left at random), and a plain 'sam2' checkpoint loads too."""
    from transformers import Sam2VideoModel

    video = make_tiny_sam2(tmp_path / "video", seed=3, video=True)
    assert models.model_type(video) == "sam2_video" and head_kind(video) == "sam2"
    ours = load_segmenter(video, Settings(data_dir=tmp_path / "d")).model.state_dict()
    saved = Sam2VideoModel.from_pretrained(str(video)).state_dict()
    assert len(ours) > 100 and set(ours) <= set(saved)
    assert all(torch.equal(ours[k], saved[k]) for k in ours)
    image = make_tiny_sam2(tmp_path / "image", seed=3)
    assert models.model_type(image) == "sam2"
    assert load_segmenter(image, Settings(data_dir=tmp_path / "d")).kind == "sam2"


def test_pixel_values_are_bit_exact_on_photos(edgetam_dir: Path, astronaut: np.ndarray, tmp_path: Path) -> None:
    from automask.backends.sam2_processing import pixel_values

    want = reference_pixel_values(astronaut, (1024, 1024), DEFAULT_TRANSFORM.mean, DEFAULT_TRANSFORM.std, native_here())
    assert torch.equal(pixel_values(astronaut, DEFAULT_TRANSFORM), want)
    segmenter = load_segmenter(edgetam_dir, Settings(data_dir=tmp_path))
    assert segmenter.transform.size == (128, 128)  # the checkpoint's preprocessor_config.json


@needs_reference_libs
def test_pixel_values_equal_the_real_processor(astronaut: np.ndarray, tmp_path: Path) -> None:
    from automask.backends.sam2_processing import pixel_values

    np.save(tmp_path / "in.npy", astronaut)
    run_with_reference_libs(
        f"""
        import numpy as np
        from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor
        out = Sam2ImageProcessor()(images=np.load({str(tmp_path / "in.npy")!r}), return_tensors="pt")
        np.save({str(tmp_path / "out.npy")!r}, out["pixel_values"].numpy())
        """,
        tmp_path,
    )
    assert np.array_equal(pixel_values(astronaut, DEFAULT_TRANSFORM).numpy(), np.load(tmp_path / "out.npy"))


@needs_reference_libs
def test_repvit_equals_timm(tmp_path: Path) -> None:
    """automask's RepViT-M1 (full size, random weights) against timm's `repvit_m1` features_only model holding the
    same state dict: same parameter names, same feature maps."""
    from automask.backends.repvit import VARIANTS, RepVitFeatures

    torch.manual_seed(0)
    ours = RepVitFeatures(**VARIANTS["repvit_m1"]).eval()
    for m in ours.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 256, 256)
    torch.save({"state": ours.state_dict(), "x": x}, tmp_path / "in.pt")
    with torch.inference_mode():
        want = ours(x)
    run_with_reference_libs(
        f"""
        import torch, timm
        data = torch.load({str(tmp_path / "in.pt")!r})
        m = timm.create_model("repvit_m1", features_only=True, out_indices=(0, 1, 2, 3)).eval()
        assert sorted(m.state_dict()) == sorted(data["state"]), "parameter names differ"
        m.load_state_dict(data["state"])
        with torch.inference_mode():
            torch.save(m(data["x"]), {str(tmp_path / "out.pt")!r})
        """,
        tmp_path,
    )
    got = torch.load(tmp_path / "out.pt")
    assert [g.shape for g in got] == [o.shape for o in want]
    for g, o in zip(got, want, strict=True):
        torch.testing.assert_close(o, g, atol=1e-5, rtol=1e-5)


# -- grounded-sam2, grounded-edgetam ----------------------------------------------------------------------------


def test_grounded_folder_loads_and_segments_its_boxes(
    grounded_dir: Path, head: str, coffee: np.ndarray, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path)
    name = f"grounded-{head}"
    assert models.detect_backend(grounded_dir) == name
    gen = MaskGenerator(str(grounded_dir), settings)
    backend = gen.backend
    assert isinstance(backend, gs.GroundedSamBackend) and backend.name == name
    assert isinstance(backend.segmenter, Sam2Segmenter) and backend.segmenter.kind == head
    result = gen.generate(coffee, "cup, saucer", threshold=0.3, grow_mask=0)
    boxes = np.array([d.box for d in result.detections], np.float32)
    assert len(boxes) > 0 and result.backend == name
    want = backend.segmenter.segment(backend.segmenter.embed(coffee), boxes=boxes).probs >= 0.5
    for inst, m in zip(result.instance_masks, want, strict=True):
        assert np.array_equal(inst > 0, m)


def test_cli_json_with_instances(grounded_dir: Path, head: str, coffee: np.ndarray, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from automask.cli import main

    src = tmp_path / "coffee.png"
    Image.fromarray(coffee).save(src)
    args = ["mask", str(src), "-p", "cup", "--model", str(grounded_dir), "--threshold", "0.3", "--json"]
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "m.png"), "--instances", str(tmp_path / "inst")])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    assert meta["backend"] == f"grounded-{head}" and len(meta["detections"]) > 0
    assert all(d["label"] == "cup" and len(d["box"]) == 4 for d in meta["detections"])
    assert len(list((tmp_path / "inst").glob("*-cup.png"))) == len(meta["detections"])


def test_http_v1_with_grounded_model(grounded_dir: Path, head: str, coffee: np.ndarray, tmp_path: Path) -> None:
    """A live server on loopback with the grounded-<head> folder as its model: v1 JSON carries the instances, and
    the mask equals the library's."""
    import base64

    import httpx

    from automask.server.app import create_app
    from automask.server.config import ServerSettings
    from server_helpers import LiveServer, decode, png_bytes, wait_ready

    settings = Settings(data_dir=tmp_path / "data", model=str(grounded_dir))
    with LiveServer(create_app(settings, ServerSettings(auth=False))) as live:
        wait_ready(live.url, 120)
        body = {"image": base64.b64encode(png_bytes(coffee)).decode(), "prompt": "cup", "threshold": 0.3,
                "grow_mask": 0, "base64": True}  # fmt: skip
        r = httpx.post(f"{live.url}/v1/automatic-mask-generator", json=body, timeout=120)
    assert r.status_code == 200, r.text
    meta = r.json()
    want = MaskGenerator(str(grounded_dir), Settings(data_dir=tmp_path / "d")).generate(
        coffee, "cup", threshold=0.3, grow_mask=0
    )
    assert meta["backend"] == f"grounded-{head}" and meta["model"] == grounded_dir.name  # a name, never the path
    assert [d["label"] for d in meta["detections"]] == [d.label for d in want.detections] and want.detections
    assert np.array_equal(decode(base64.b64decode(meta["image"])), want.mask)


def test_presets(ge_dir: Path, tmp_path: Path) -> None:
    """reference (default): float32, the detector at its processor's size; fast: 512 cap and bf16 where native."""
    from automask.backends.sam import choose_dtype

    ref = gs.load(ge_dir, Settings(data_dir=tmp_path))
    assert ref.detector_size == {"shortest_edge": 64, "longest_edge": 96}  # the tiny processor's own
    assert ref.segmenter.dtype == torch.float32 and not isinstance(ref.detector.model.encoder, gs.AutocastEncoder)
    assert Settings(data_dir=tmp_path).detector_size is None and Settings(data_dir=tmp_path).preset == "reference"
    fast = gs.load(ge_dir, Settings(data_dir=tmp_path, preset="fast"))
    assert fast.segmenter.dtype == torch.float32  # EdgeTAM stays float32: bf16 gained nothing
    assert isinstance(fast.detector.model.encoder, gs.AutocastEncoder) == (choose_dtype("auto", "cpu") != torch.float32)
    assert fast.detector_size == ref.detector_size  # the tiny processor's 64 is under the 512 cap
    bf16 = gs.load(ge_dir, Settings(data_dir=tmp_path, precision="bf16"))
    assert bf16.segmenter.dtype == torch.bfloat16
    checkpoint = {"shortest_edge": 800, "longest_edge": 1333}
    assert gs._detector_size(checkpoint, gs.FAST_DETECTOR_EDGE) == {"shortest_edge": 512, "longest_edge": 853}
    assert gs._detector_size(checkpoint, None) == checkpoint


def test_sam2_precision_follows_sam(tmp_path: Path, coffee: np.ndarray) -> None:
    """SAM 2 runs as SAM does: float32 by default, its encoder under bf16 autocast with the fast preset on a CPU
    with native bf16 (3× faster on Hiera-L) or when asked; the bf16 masks stay close to float32's."""
    from automask.backends.sam import choose_dtype

    folder = make_tiny_sam2(tmp_path / "sam2", video=True)
    ref = load_segmenter(folder, Settings(data_dir=tmp_path))
    assert ref.dtype == torch.float32
    assert load_segmenter(folder, Settings(data_dir=tmp_path, preset="fast")).dtype == choose_dtype("auto", "cpu")
    bf16 = load_segmenter(folder, Settings(data_dir=tmp_path, precision="bf16"))
    assert bf16.dtype == torch.bfloat16 and bf16.model is not ref.model
    want, got = (s.segment(s.embed(coffee), boxes=BOXES) for s in (ref, bf16))
    assert np.abs(got.iou - want.iou).max() < 0.05
    assert ((got.probs >= 0.5) == (want.probs >= 0.5)).mean() > 0.98


def test_catalogue_entries() -> None:
    spec = models.CATALOGUE["grounded-edgetam"]
    assert spec.repos == ("IDEA-Research/grounding-dino-tiny", "yonigozlan/EdgeTAM-hf")
    assert models.CATALOGUE["edgetam"].repos == ("yonigozlan/EdgeTAM-hf",) and "edgetam" in models.REFINERS
    spec = models.CATALOGUE["grounded-sam2"]
    assert spec.repos == ("IDEA-Research/grounding-dino-tiny", "facebook/sam2.1-hiera-large")
    assert spec.backend == "grounded-sam2" and not spec.gated
    assert models.CATALOGUE["sam2"].repos == ("facebook/sam2.1-hiera-large",) and "sam2" in models.REFINERS


def test_pull_offline_fails_at_once(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:

    stub_hub(monkeypatch, lambda *a, **k: pytest.fail("no download offline"))
    for name in ("grounded-edgetam", "edgetam", "grounded-sam2", "sam2"):
        with pytest.raises(ModelNotAvailableError, match=f"offline.*automask models pull {name}"):
            models.pull(name, settings, progress=False)


def test_models_list_and_a_standalone_head_answers_no_prompt(settings: Settings) -> None:
    from click.testing import CliRunner

    from automask.cli import main
    from automask.errors import UnknownModelError

    res = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list"])
    assert res.exit_code == 0, res.output
    for name in ("grounded-sam2", "sam2", "grounded-edgetam", "edgetam"):
        assert name in res.output
    assert "SAM 2.1 Hiera-L" in res.output
    with pytest.raises(UnknownModelError, match="--model grounded-sam2"):
        models.resolve("sam2", settings)


# -- refine -----------------------------------------------------------------------------------------------------------


def install(settings: Settings, name: str, source: Path) -> Path:
    target = models.model_dir(name, settings)
    shutil.copytree(source, target)
    (target / models.MARKER).write_text(json.dumps({"name": name, "backend": name, "repos": []}))
    return target


def test_refine_with_each_head(
    tiny_clipseg_dir: Path, head: str, head_dir: Path, tmp_path: Path, coffee: np.ndarray
) -> None:
    """refine with AUTOMASK_MASK_HEAD=<head>: SAM is installed too, and the setting picks the SAM 2-family head."""
    settings = Settings(data_dir=tmp_path / "data", mask_head=head)
    install(settings, head, head_dir)
    install(settings, "sam", make_tiny_sam(tmp_path / "sam-src"))
    gen = MaskGenerator(str(tiny_clipseg_dir), settings)
    assert gen.open is not None
    score_map = gen.open.score(gen.open.encode(coffee), ["cup"]).maps[0]
    t = float(np.quantile(score_map, 0.8))
    result = gen.generate(coffee, "cup", threshold=t, refine=True, grow_mask=0)
    assert result.backend == f"clipseg+{head}"
    found = regions(score_map, t, max(1, round(0.0005 * score_map.size)))
    seg = load_mask_head(find_mask_head_folder(settings), settings)
    assert isinstance(seg, Sam2Segmenter) and seg.kind == head
    boxes = np.array([r.box for r in found], np.float32)
    points = np.array([[r.peak] for r in found], np.float32)
    want = seg.segment(seg.embed(coffee), boxes=boxes, points=points).probs >= 0.5
    assert len(result.instance_masks) == len(found) > 0
    for inst, m in zip(result.instance_masks, want, strict=True):
        assert np.array_equal(inst > 0, m)


def test_mask_head_setting_picks_the_head(edgetam_dir: Path, tmp_path: Path) -> None:
    """auto: SAM, else SAM 2, else EdgeTAM; a head inside a grounded model counts; AUTOMASK_MASK_HEAD names one."""
    settings = Settings(data_dir=tmp_path)
    install(settings, "edgetam", edgetam_dir)
    assert find_mask_head_folder(settings).name == "edgetam"
    source = make_tiny_sam2(tmp_path / "gs2-src" / models.repo_folder(models.SAM2_REPO), video=True).parent
    grounded = install(settings, "grounded-sam2", source)
    assert find_mask_head_folder(settings) == grounded / "facebook--sam2.1-hiera-large"  # auto: SAM 2 before EdgeTAM
    sam = install(settings, "sam", make_tiny_sam(tmp_path / "sam-src"))
    assert find_mask_head_folder(settings) == sam  # auto: SAM first
    assert find_mask_head_folder(Settings(data_dir=tmp_path, mask_head="edgetam")).name == "edgetam"
    assert head_kind(find_mask_head_folder(Settings(data_dir=tmp_path, mask_head="sam2"))) == "sam2"
    for kind in ("edgetam", "sam2"):
        with pytest.raises(ModelNotAvailableError, match=f"automask models pull {kind}"):
            find_mask_head_folder(Settings(data_dir=tmp_path / "empty", mask_head=kind))
