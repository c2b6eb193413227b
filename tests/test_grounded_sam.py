"""The grounded-sam backend (GroundingDINO + SAM) on tiny random checkpoints loaded through the real code.

Random detectors give arbitrary boxes, so tests that need known detections replace the detector's raw
outputs (`fake_detector`); the post-processing, SAM, the cache and the pipeline stay real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from automask import install, models
from automask.backends import grounded_sam as gs
from automask.backends.base import ScoreParams
from automask.backends.grounded_sam import GroundedSamBackend, load
from automask.backends.grounding import nms, postprocess
from automask.backends.sam import choose_dtype, load_segmenter
from automask.errors import (
    EmptyMaskError,
    InvalidOptionError,
    ModelNotAvailableError,
    StoppedError,
    UnknownModelError,
)
from automask.options import MaskOptions
from automask.pipeline import MaskGenerator
from automask.settings import Settings
from fake_hub import stub_hub
from tiny_models import make_tiny_grounded_sam, make_tiny_grounding_dino

H, W = 96, 128


@pytest.fixture(scope="module")
def gs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_grounded_sam(tmp_path_factory.mktemp("grounded-sam"))


@pytest.fixture(scope="module")
def backend(gs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> GroundedSamBackend:
    """float32 throughout, so results compare exactly with transformers' own flow."""
    return load(gs_dir, Settings(data_dir=tmp_path_factory.mktemp("data")), precision="fp32")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    img[20:60, 30:90] = (200, 40, 40)
    return img


def fake_detector(
    monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, logits: np.ndarray, boxes: np.ndarray
) -> list[int]:
    """Make the detector return `logits` (Q×T, T >= the text's tokens) and `boxes` (Q×4 cx, cy, w, h relative);
    returns a list that records the number of text tokens of each call."""
    calls: list[int] = []

    def run(**inputs: Any) -> SimpleNamespace:
        calls.append(int(inputs["input_ids"].shape[1]))
        return SimpleNamespace(logits=torch.tensor(logits[None]), pred_boxes=torch.tensor(boxes[None]))

    monkeypatch.setattr(backend, "detector", run)
    return calls


def rel(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """A pixel box XYXY -> (cx, cy, w, h) relative to the H×W test image."""
    return [(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H]


# "sofa. lamp." tokenizes as [CLS] sofa . lamp . [SEP]: the token positions the fake logits address.
CLS, SOFA, DOT1, LAMP, DOT2, SEP = range(6)


def logits_for(rows: list[dict[int, float]], width: int = 8) -> np.ndarray:
    out = np.full((len(rows), width), -10.0, np.float32)
    for q, row in enumerate(rows):
        for t, v in row.items():
            out[q, t] = v
    return out


def sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-x)))


# -- loading -----------------------------------------------------------------------------------------


def test_local_folder_is_detected_and_loaded(gs_dir: Path, settings: Settings) -> None:
    assert models.detect_backend(gs_dir) == "grounded-sam"
    gen = MaskGenerator(str(gs_dir), settings)
    assert gen.backend.name == "grounded-sam" and isinstance(gen.backend, GroundedSamBackend)


def test_precision_and_detector_size_come_from_the_settings(gs_dir: Path, tmp_path: Path) -> None:
    """AUTOMASK_PRECISION / AUTOMASK_DETECTOR_SIZE reach the loaded model; the cap never enlarges the input."""
    plain = load(gs_dir, Settings(data_dir=tmp_path, precision="fp32", detector_size=32))  # the tiny one says 64
    assert plain.detector_size["shortest_edge"] == 32
    assert plain.segmenter.dtype == torch.float32
    assert gs._detector_size({"shortest_edge": 800, "longest_edge": 1333}, 512) == {
        "shortest_edge": 512,
        "longest_edge": 853,
    }
    assert gs._detector_size({"shortest_edge": 400, "longest_edge": 666}, 512)["shortest_edge"] == 400


def test_folder_without_sam_says_what_is_missing(tmp_path: Path, settings: Settings) -> None:
    make_tiny_grounding_dino(tmp_path / "dino")
    with pytest.raises(ModelNotAvailableError, match=r"no SAM, SAM 2 or EdgeTAM checkpoint.*pull grounded-sam"):
        load(tmp_path, settings)


def test_options_defaults_and_validation() -> None:
    opts = MaskOptions()
    assert opts.text_threshold == 0.25 and opts.refine is False
    assert MaskOptions.parse({"text_threshold": 0.4, "refine": True}).text_threshold == 0.4
    with pytest.raises(InvalidOptionError, match="text_threshold"):
        MaskOptions.parse({"text_threshold": 1.5})
    with pytest.raises(InvalidOptionError, match="text_threshold"):
        MaskOptions.parse({"text_threshold": True})


# -- equality with transformers' own flow -------------------------------------------------------------


def test_prompt_spans_follow_lower_casing() -> None:
    """Each prompt's span covers its lower-cased text, also when lower() changes the length ('İ' -> 'i̇')."""
    text, spans = gs.merge_prompts(["İstanbul Sign", "cat"])
    assert [text[a:b] for a, b in spans] == ["i̇stanbul sign", "cat"] and text.endswith("cat.")


def test_detection_postprocess_equals_transformers(backend: GroundedSamBackend, image: np.ndarray) -> None:
    """Our box post-processing (NMS off) keeps the boxes, scores and phrases transformers' keeps."""
    prompts = ["sofa", "lamp"]
    size = backend.detector_size
    inputs = backend.processor(images=image, text="sofa. lamp.", size=size, return_tensors="pt")
    with torch.inference_mode():
        out = backend.detector(**inputs)
    ref = backend.processor.post_process_grounded_object_detection(
        out, threshold=0.3, text_threshold=0.25, target_sizes=[(H, W)]
    )[0]
    ids = inputs["input_ids"][0].tolist()
    enc = backend.processor.tokenizer("sofa. lamp.", return_offsets_mapping=True)
    owners = gs.token_owners(enc["offset_mapping"], ids, gs.merge_prompts(prompts)[1], backend.special_tokens)
    logits = out.logits[0, :, : len(ids)].numpy()
    kept = postprocess(logits, out.pred_boxes[0].numpy(), owners, prompts, (H, W), 0.3, 0.0, nms_iou=1.0)
    order = np.argsort(kept.index)
    assert len(kept.index) == len(ref["scores"]) > 3
    np.testing.assert_allclose(kept.scores[order], ref["scores"].numpy(), rtol=1e-6)
    ref_boxes = np.clip(ref["boxes"].numpy(), 0, [W, H, W, H])
    np.testing.assert_allclose(kept.boxes[order], ref_boxes, atol=1e-4)
    phrases = backend.phrases(logits, ids, kept, 0.25)
    assert [phrases[i] for i in order] == ref["text_labels"]


def test_replayed_backbone_gives_the_full_forward(backend: GroundedSamBackend, image: np.ndarray) -> None:
    """`detect` (backbone replayed from `encode`) equals a plain detector forward on the processor's inputs."""
    features = backend.encode(image)
    dets = backend.detect(features, ["sofa", "lamp"], 0.3, 0.25)
    inputs = backend.processor(images=image, text="sofa. lamp.", size=backend.detector_size, return_tensors="pt")
    with torch.inference_mode():
        out = backend.detector(**inputs)
    ids = inputs["input_ids"][0].tolist()
    enc = backend.processor.tokenizer("sofa. lamp.", return_offsets_mapping=True)
    owners = gs.token_owners(enc["offset_mapping"], ids, [(0, 4), (6, 10)], backend.special_tokens)
    logits = out.logits[0, :, : len(ids)].numpy()
    ref = postprocess(logits, out.pred_boxes[0].numpy(), owners, ["sofa", "lamp"], (H, W), 0.3, 0.25)
    assert len(dets.scores) > 0
    np.testing.assert_allclose(dets.scores, ref.scores, rtol=1e-5)
    np.testing.assert_allclose(dets.boxes, ref.boxes, atol=1e-3)
    assert dets.labels == ref.labels


def test_sam_masks_equal_transformers_post_process_masks(gs_dir: Path, image: np.ndarray, settings: Settings) -> None:
    """Our SAM path equals SamProcessor -> SamModel -> post_process_masks, best of three by predicted IoU."""
    from transformers import SamModel, SamProcessor

    sam_dir = gs_dir / "facebook--sam-vit-base"
    seg = load_segmenter(sam_dir, settings, precision="fp32")
    boxes = np.array([[10, 12, 70, 80], [50, 5, 120, 60], [0, 0, W, H]], np.float32)
    ours = seg.segment(seg.embed(image), boxes=boxes)

    processor = SamProcessor.from_pretrained(sam_dir)
    model = SamModel.from_pretrained(sam_dir).eval()
    inputs = processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs)
    logits = processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )[0]
    binary = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    best = out.iou_scores[0].argmax(-1)
    rows = torch.arange(len(boxes))
    np.testing.assert_allclose(ours.probs, torch.sigmoid(logits[rows, best]).numpy(), atol=1e-5)
    decided = np.abs(logits[rows, best].numpy()) > 1e-4  # pixels not on the 0-logit boundary
    assert np.array_equal((ours.probs >= 0.5)[decided], binary[rows, best].numpy()[decided])
    np.testing.assert_allclose(ours.iou, out.iou_scores[0].max(-1).values.numpy(), rtol=1e-5)


def test_bf16_image_encoder_stays_close(gs_dir: Path, image: np.ndarray, settings: Settings) -> None:
    assert choose_dtype("fp32", "cpu") == torch.float32 and choose_dtype("bf16", "cpu") == torch.bfloat16
    assert choose_dtype("auto", "cuda") == torch.float32
    sam_dir = gs_dir / "facebook--sam-vit-base"
    e32 = load_segmenter(sam_dir, settings, precision="fp32").embed(image).embeddings
    e16 = load_segmenter(sam_dir, settings, precision="bf16").embed(image).embeddings
    assert e16.dtype == torch.float32  # cast back for the decoder
    assert float((e16 - e32).norm() / e32.norm()) < 0.05


def test_bf16_detector_encoder_stays_close(gs_dir: Path, image: np.ndarray, settings: Settings) -> None:
    fp32 = load(gs_dir, settings, precision="fp32")
    bf16 = load(gs_dir, settings, precision="bf16")
    assert isinstance(bf16.detector.model.encoder, gs.AutocastEncoder)
    assert not isinstance(fp32.detector.model.encoder, gs.AutocastEncoder)
    d32 = fp32.detect(fp32.encode(image), ["sofa", "lamp"], 0.3, 0.25)
    d16 = bf16.detect(bf16.encode(image), ["sofa", "lamp"], 0.3, 0.25)
    assert len(d32.scores) == len(d16.scores) > 0
    # compared as sets: near-tied scores (the random tiny model scores both prompts alike) may swap places
    o32, o16 = np.lexsort(d32.boxes.T.round()), np.lexsort(d16.boxes.T.round())
    np.testing.assert_allclose(d16.boxes[o16], d32.boxes[o32], atol=1.0)
    np.testing.assert_allclose(np.sort(d16.scores), np.sort(d32.scores), atol=0.02)


# -- detections through the pipeline -----------------------------------------------------------------

BOX_SOFA = (10.0, 20.0, 70.0, 80.0)
BOX_LAMP = (80.0, 10.0, 120.0, 50.0)


def two_objects(monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend) -> list[int]:
    logits = logits_for(
        [
            {SOFA: 4.0, LAMP: -1.0},  # a sofa
            {LAMP: 2.0},  # a lamp
            {DOT1: 3.0},  # only the separator: credited to no prompt, dropped
            {SOFA: -4.0},  # below the threshold
        ]
    )
    boxes = np.array([rel(*BOX_SOFA), rel(*BOX_LAMP), rel(0, 0, 50, 50), rel(5, 5, 60, 60)], np.float32)
    return fake_detector(monkeypatch, backend, logits, boxes)


def test_several_prompts_give_labelled_instances(
    monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray
) -> None:
    calls = two_objects(monkeypatch, backend)
    result = MaskGenerator(backend).generate(image, "sofa, lamp", threshold=0.3, grow_mask=0)
    assert calls == [6]  # one detector pass for both prompts
    assert [d.label for d in result.detections] == ["sofa", "lamp"]
    assert [d.score for d in result.detections] == pytest.approx([sigmoid(4.0), sigmoid(2.0)], rel=1e-5)
    assert result.detections[0].box == pytest.approx(BOX_SOFA, abs=1e-3)
    assert result.detections[1].box == pytest.approx(BOX_LAMP, abs=1e-3)
    seg = backend.segmenter
    expected = seg.segment(seg.embed(image), boxes=np.array([BOX_SOFA, BOX_LAMP], np.float32)).probs >= 0.5
    for det, inst, want in zip(result.detections, result.instance_masks, expected, strict=True):
        assert np.array_equal(inst > 0, want)
        assert det.area == int(want.sum())
    assert np.array_equal(result.mask > 0, expected[0] | expected[1])


def test_a_run_told_to_stop_stops_between_the_detector_and_the_mask_head(
    monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray
) -> None:
    calls = two_objects(monkeypatch, backend)
    segmented: list[int] = []
    segment = backend.segmenter.segment
    monkeypatch.setattr(backend.segmenter, "segment", lambda *a, **kw: segmented.append(1) or segment(*a, **kw))
    features = backend.encode(image)
    stop = ScoreParams(should_stop=lambda: bool(calls))  # once the detector has run
    with pytest.raises(StoppedError):
        backend.score(features, ["sofa", "lamp"], min_score=0.3, params=stop)
    assert calls == [6] and segmented == []
    go_on = ScoreParams(should_stop=lambda: False)
    assert backend.score(features, ["sofa", "lamp"], min_score=0.3, params=go_on).labels == ["sofa", "lamp"]
    assert segmented == [1]


def test_one_prompt(monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray) -> None:
    logits = logits_for([{SOFA: 3.0}, {SOFA: 1.0}])
    boxes = np.array([rel(*BOX_SOFA), rel(*BOX_LAMP)], np.float32)
    calls = fake_detector(monkeypatch, backend, logits, boxes)
    result = MaskGenerator(backend).generate(image, "sofa", threshold=0.5, grow_mask=0)
    assert calls == [4]  # [CLS] sofa . [SEP]
    assert [(d.label, round(d.score, 4)) for d in result.detections] == [
        ("sofa", round(sigmoid(3.0), 4)),
        ("sofa", round(sigmoid(1.0), 4)),
    ]


def test_threshold_drops_weak_boxes(
    monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray
) -> None:
    two_objects(monkeypatch, backend)
    result = MaskGenerator(backend).generate(image, "sofa, lamp", threshold=0.95, grow_mask=0)
    assert [d.label for d in result.detections] == ["sofa"]  # sigmoid(4) = 0.982, sigmoid(2) = 0.881


def test_text_threshold_credits_prompts(
    monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray
) -> None:
    # the box's best token is the separator (0.95); its best prompt word, 'lamp', scores sigmoid(-0.85) = 0.30
    logits = logits_for([{DOT2: 3.0, LAMP: -0.85}])
    fake_detector(monkeypatch, backend, logits, np.array([rel(*BOX_LAMP)], np.float32))
    gen = MaskGenerator(backend)
    kept = gen.generate(image, "sofa, lamp", threshold=0.2, text_threshold=0.25, grow_mask=0)
    assert [(d.label, round(d.score, 3)) for d in kept.detections] == [("lamp", round(sigmoid(3.0), 3))]
    dropped = gen.generate(image, "sofa, lamp", threshold=0.2, text_threshold=0.35, grow_mask=0)
    assert dropped.detections == [] and dropped.empty


def test_no_detection_gives_an_empty_mask_or_the_error(
    monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray
) -> None:
    fake_detector(monkeypatch, backend, logits_for([{}, {}]), np.array([rel(*BOX_SOFA)] * 2, np.float32))
    gen = MaskGenerator(backend)
    result = gen.generate(image, "cat", grow_mask=5)
    assert result.empty and not result.mask.any() and result.detections == [] and result.instance_masks == []
    assert result.mask.shape == (H, W)
    with pytest.raises(EmptyMaskError, match="cat"):
        gen.generate(image, "cat", stop_on_empty_mask=True)


def test_many_instances(monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray) -> None:
    grid = [(x, y, x + 14.0, y + 20.0) for y in (0.0, 24.0, 48.0, 72.0) for x in range(0, 112, 16)]  # 28 boxes
    rows = [{SOFA if i % 2 else LAMP: 1.0 + i / 10} for i in range(len(grid))]
    fake_detector(monkeypatch, backend, logits_for(rows), np.array([rel(*b) for b in grid], np.float32))
    gen = MaskGenerator(backend)
    result = gen.generate(image, "sofa, lamp", threshold=0.5, grow_mask=0)
    assert len(result.detections) == len(result.instance_masks) == 28
    assert [d.score for d in result.detections] == sorted((d.score for d in result.detections), reverse=True)
    assert result.detections[0].box == pytest.approx(grid[-1], abs=1e-3) and result.detections[0].label == "sofa"
    union = np.zeros((H, W), bool)
    for m in result.instance_masks:
        union |= m > 0
    assert np.array_equal(union, result.mask > 0)
    monkeypatch.setattr(gs, "MAX_DETECTIONS", 5)
    capped = gen.generate(image, "sofa, lamp", threshold=0.5, grow_mask=0)
    assert [d.score for d in capped.detections] == [d.score for d in result.detections[:5]]
    monkeypatch.setattr(gs, "max_masks", lambda size: 3 if size == (H, W) else 0)  # the memory bound
    bounded = MaskGenerator(backend).generate(image, "sofa, lamp", threshold=0.5, grow_mask=0)
    assert [d.score for d in bounded.detections] == [d.score for d in result.detections[:3]]


def test_decoder_batches_and_mask_budget(gs_dir: Path, image: np.ndarray, settings: Settings) -> None:
    from automask.backends import sam

    assert sam.max_masks((768, 1024)) == 341 and sam.max_masks((3000, 4000)) == 22 and sam.max_masks((1, 10**9)) == 1
    assert sam.decoder_batch((768, 1024)) == 32 and sam.decoder_batch((3000, 4000)) == 5
    seg = load_segmenter(gs_dir / "facebook--sam-vit-base", settings, precision="fp32")
    emb = seg.embed(image)
    boxes = np.array([[i, i, 60 + i, 50 + i] for i in range(0, 35, 5)], np.float32)
    whole = seg.segment(emb, boxes=boxes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sam, "DECODER_BATCH", 2)
        chunked = seg.segment(emb, boxes=boxes)
    np.testing.assert_allclose(chunked.probs, whole.probs, atol=1e-6)
    np.testing.assert_allclose(chunked.iou, whole.iou, atol=1e-6)


def test_instance_output_and_json(
    monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray
) -> None:
    two_objects(monkeypatch, backend)
    result = MaskGenerator(backend).generate(image, "sofa, lamp", threshold=0.3, grow_mask=4)
    meta = json.loads(json.dumps(result.metadata()))
    assert [d["label"] for d in meta["detections"]] == ["sofa", "lamp"]
    assert meta["detections"][0]["box"] == pytest.approx(list(BOX_SOFA), abs=1e-3)
    assert all(m.shape == (H, W) and m.dtype == np.uint8 for m in result.instance_masks)
    # instance masks are before grow: the grown union covers them
    for m in result.instance_masks:
        assert not ((m > 0) & (result.mask == 0)).any()


def test_nms_is_per_prompt() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9.5], [0, 0, 10, 5], [0, 0, 10, 10]], np.float32)
    assert nms(boxes, np.array([0, 0, 0, 1]), 0.8).tolist() == [0, 2, 3]  # IoU 0.95 dropped, 0.5 kept
    assert nms(boxes, np.array([0, 1, 2, 3]), 0.8).tolist() == [0, 1, 2, 3]


def test_prompt_too_long(backend: GroundedSamBackend, image: np.ndarray) -> None:
    features = backend.encode(image)
    with pytest.raises(InvalidOptionError, match="too long"):
        backend.detect(features, [f"cat {i}" for i in range(20)], 0.3, 0.25)


# -- the cache -----------------------------------------------------------------------------------------


def count_calls(module: torch.nn.Module, request: pytest.FixtureRequest) -> list[int]:
    """A list that grows by one at each forward of `module` (until the test ends)."""
    calls: list[int] = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    request.addfinalizer(handle.remove)
    return calls


def test_second_request_on_the_same_image_skips_the_encoders(
    gs_dir: Path, image: np.ndarray, request: pytest.FixtureRequest
) -> None:
    gen = MaskGenerator(load(gs_dir, Settings(data_dir=gs_dir / "unused")))
    backend = gen.backend
    assert isinstance(backend, GroundedSamBackend)
    swin = count_calls(backend.backbone.inner, request)
    vit = count_calls(backend.segmenter.model.vision_encoder, request)
    text = count_calls(backend.detector.model.text_backbone, request)
    first = gen.generate(image, "sofa", threshold=0.5)
    second = gen.generate(image.copy(), "lamp, cat", threshold=0.5)
    assert (len(swin), len(vit), len(text)) == (1, 1, 2)
    assert first.timings["encode"] > 0 and second.timings["encode"] == 0
    gen.generate(image[::-1].copy(), "lamp", threshold=0.5)
    assert (len(swin), len(vit), len(text)) == (2, 2, 3)


# -- the catalogue and pull ---------------------------------------------------------------------------


def test_catalogue_entries() -> None:
    spec = models.CATALOGUE["grounded-sam"]
    assert spec.backend == "grounded-sam"
    assert spec.repos == ("IDEA-Research/grounding-dino-tiny", "facebook/sam-vit-base")
    assert models.CATALOGUE["sam"].repos == ("facebook/sam-vit-base",)


def test_pull_offline_says_how_to_fix(settings: Settings) -> None:
    with pytest.raises(ModelNotAvailableError, match="automask models pull grounded-sam"):
        models.pull("grounded-sam", settings, progress=False)


def test_pull_puts_each_repository_in_its_subfolder(
    monkeypatch: pytest.MonkeyPatch, gs_dir: Path, settings: Settings, image: np.ndarray
) -> None:

    sources = {
        "IDEA-Research/grounding-dino-tiny": gs_dir / "IDEA-Research--grounding-dino-tiny",
        "facebook/sam-vit-base": gs_dir / "facebook--sam-vit-base",
    }

    def fake_download(repo: str, local_dir: Path, **_: Any) -> str:
        shutil.copytree(sources[repo], local_dir, dirs_exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr(install, "offline", lambda: False)
    stub_hub(monkeypatch, fake_download)
    folder = models.pull("grounded-sam", settings, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "IDEA-Research--grounding-dino-tiny",
        "automask.json",
        "facebook--sam-vit-base",
    ]
    assert models.resolve("grounded-sam", settings).backend == "grounded-sam"
    result = MaskGenerator("grounded-sam", settings).generate(image, "sofa", threshold=0.99)
    assert result.backend == "grounded-sam" and result.mask.shape == (H, W)


def test_sam_alone_is_not_a_prompt_model(settings: Settings, gs_dir: Path) -> None:
    target = models.model_dir("sam", settings)
    shutil.copytree(gs_dir / "facebook--sam-vit-base", target)
    (target / models.MARKER).write_text(json.dumps({"name": "sam", "backend": "sam", "repos": []}))
    assert models.is_installed("sam", settings)
    assert models.default_model(settings) == models.EMBEDDED  # never picked as the default
    with pytest.raises(UnknownModelError, match="refine"):
        models.resolve("sam", settings)


# -- one mask per instance: the library API and the CLI -------------------------------------------------------


def test_instance_masks_are_grown_one_by_one(
    monkeypatch: pytest.MonkeyPatch, backend: GroundedSamBackend, image: np.ndarray, tmp_path: Path
) -> None:
    from automask import postprocess as pp
    from automask.instances import instance_filename, instance_masks, save_instances

    two_objects(monkeypatch, backend)
    result = MaskGenerator(backend).generate(image, "sofa, lamp", threshold=0.3, grow_mask=6)
    pairs = instance_masks(result, grow_mask=6)
    assert [d.label for d, _ in pairs] == ["sofa", "lamp"]
    for (_, grown), raw in zip(pairs, result.instance_masks, strict=True):
        assert np.array_equal(grown > 0, pp.grow(raw > 0, 6))
    assert np.array_equal(pairs[0][1] | pairs[1][1], result.mask)  # growing distributes over the union
    paths = save_instances(result, tmp_path / "out", grow_mask=6)
    assert [p.name for p in paths] == ["00-sofa.png", "01-lamp.png"]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(paths[1])), pairs[1][1])
    det = result.detections[0]
    assert instance_filename(12, type(det)("Floor Lamp (left)!", 0.5, None, 3)) == "12-floor-lamp-left.png"


def test_cli_instances_folder(gs_dir: Path, image: np.ndarray, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from automask.cli import main

    src = tmp_path / "room.png"
    Image.fromarray(image).save(src)
    out, folder = tmp_path / "mask.png", tmp_path / "instances"
    args = ["mask", str(src), "-p", "sofa, lamp", "--model", str(gs_dir), "--threshold", "0.9", "--grow-mask", "3"]
    res = CliRunner().invoke(main, [*args, "-o", str(out), "--instances", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    assert len(meta["detections"]) > 3
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(Path(p).name for p in meta["instances"])
    assert [n.split("-", 1)[1] for n in names] == [f"{d['label']}.png" for d in meta["detections"]]
    union = np.zeros(image.shape[:2], bool)
    for p in meta["instances"]:
        union |= np.asarray(Image.open(p)) > 0
    assert np.array_equal(union, np.asarray(Image.open(out)) > 0)


@pytest.mark.parametrize("shape", [(3, 4), (1, 2), (3, 3)])
def test_an_image_one_or_three_pixels_high_is_read_as_rgb_pixels(backend: GroundedSamBackend, shape: tuple) -> None:
    """Before: transformers' image processors guess the channel axis and took an H×W×3 image of height 1 or 3 for
    channels-first: a 3×4 red image became a 4×3 one with wrong colours (1-pixel-high ones raised an error)."""
    h, w = shape
    red = np.zeros((h, w, 3), np.uint8)
    red[..., 0] = 255
    features = backend.encode(red)
    pixels = features.detector_inputs["pixel_values"][0]
    valid = features.detector_inputs["pixel_mask"][0].bool()
    rows, cols = int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())
    assert pixels.shape[0] == 3
    assert (rows < cols) == (h < w) and (rows == cols) == (h == w)
    channel = pixels[:, valid].mean(dim=1)  # normalised: red high, green and blue low
    assert channel[0] > 2 and channel[1] < -1 and channel[2] < -1
    sam_h, sam_w = features.sam.input_size
    assert (sam_h < sam_w) == (h < w) and (sam_h == sam_w) == (h == w)


@pytest.mark.parametrize("shape", [(64, 5000), (5000, 64)])
def test_a_panorama_is_masked(gs_dir: Path, settings: Settings, shape: tuple) -> None:
    """Before: an image more than ~40 times wider than high (or higher than wide) left GroundingDINO's encoder fewer
    positions than its queries (900; the tiny model's 30 at a smaller ratio), and its top-k raised "selected index k
    out of range": an internal error."""
    gen = MaskGenerator(str(gs_dir), settings)
    image = np.random.default_rng(1).integers(0, 255, (*shape, 3), dtype=np.uint8)
    result = gen.generate(image, "cat, dog", threshold=0.0, text_threshold=0.0, grow_mask=0)
    assert result.mask.shape == shape
    assert result.detections
    for det in result.detections:
        assert det.box is not None
        x0, y0, x1, y1 = det.box
        assert 0 <= x0 <= x1 <= shape[1] and 0 <= y0 <= y1 <= shape[0]


@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (2, 3000)])
def test_a_strip_too_thin_to_resize_is_masked(gs_dir: Path, settings: Settings, shape: tuple) -> None:
    """Before: an image whose short edge, scaled to the detector's longest edge, rounds to 0 pixels (over 192:1 for
    the tiny model's 64/96 sizes; 2666:1 for the real 800/1333) made transformers' processor raise "Size must contain
    'height' and 'width' keys": an internal error."""
    gen = MaskGenerator(str(gs_dir), settings)
    image = np.random.default_rng(2).integers(0, 255, (*shape, 3), dtype=np.uint8)
    result = gen.generate(image, "cat", threshold=0.0, text_threshold=0.0, grow_mask=0)
    assert result.mask.shape == shape and result.detections


def test_a_grounded_sam_folder_missing_its_mask_head_says_so(gs_dir: Path, settings: Settings, tmp_path: Path) -> None:
    """Before: `--model` at a grounded-sam folder whose SAM subfolder is missing (a half-copied model) said it
    "holds no model automask can load (no automask.json or config.json)", though its GroundingDINO was there."""
    folder = tmp_path / "half"
    shutil.copytree(gs_dir, folder, ignore=shutil.ignore_patterns(models.MARKER))
    shutil.rmtree(folder / "facebook--sam-vit-base")
    with pytest.raises(ModelNotAvailableError) as err:
        MaskGenerator(str(folder), settings)
    assert err.value.message.startswith(f"'{folder}' has no SAM, SAM 2 or EdgeTAM checkpoint.")
    assert "automask models pull grounded-sam" in err.value.message


def test_a_grounded_sam_folder_with_two_mask_heads_is_refused_naming_them(
    gs_dir: Path, settings: Settings, tmp_path: Path
) -> None:
    """Before: a GroundingDINO beside a SAM and a second head of another kind loaded the first subfolder in name order
    and called the result grounded-sam, whichever head it was."""
    folder = tmp_path / "two-heads"
    shutil.copytree(gs_dir, folder, ignore=shutil.ignore_patterns(models.MARKER))
    other = folder / "zz-other-head"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "edgetam"}')
    with pytest.raises(ModelNotAvailableError) as err:
        MaskGenerator(str(folder), settings)
    assert err.value.message.startswith(f"'{folder}' holds a GroundingDINO and several mask heads (")
    assert "facebook--sam-vit-base" in err.value.message and "zz-other-head" in err.value.message


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (64, 64), (1, 300)])
def test_tiny_and_square_images_are_masked(backend: GroundedSamBackend, shape: tuple[int, int]) -> None:
    """A 1×1 (or any square) image reaches the detector's coarsest level as a 1×1 map: its GroupNorm(32, d_model)
    needs two values a group, which a d_model of 32 (one channel a group) lacked there; the real 256 has eight."""
    gen = MaskGenerator(backend)
    out = gen.generate(np.full((*shape, 3), 128, np.uint8), "sofa", threshold=0.0, grow_mask=0)
    assert out.mask.shape == shape and out.mask.dtype == np.uint8
    assert set(np.unique(out.mask)) <= {0, 255}
