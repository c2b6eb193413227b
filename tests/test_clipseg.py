"""The CLIPSeg backend against transformers' own CLIPSegForImageSegmentation + CLIPSegProcessor (same tiny weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from automask.backends import registry
from automask.backends.base import Backend, ScoreParams, sigmoid
from automask.backends.clipseg import (
    PROMPTS_PER_PASS,
    ClipSegBackend,
    load,
    preprocess,
    read_preprocessing,
    tokenize,
)
from automask.errors import MissingDependencyError, ModelNotAvailableError, StoppedError
from automask.pipeline import MaskGenerator
from automask.settings import Settings
from tiny_models import make_tiny_clipseg

PROMPTS_3 = ["a cup of coffee", "spoon", "the wooden table"]


@pytest.fixture(scope="module")
def deep_clipseg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPSeg whose vision encoder has a layer (the 4th) the decoder never reads."""
    return make_tiny_clipseg(tmp_path_factory.mktemp("deep-clipseg"), seed=1, vision_layers=4)


@pytest.fixture(scope="module", params=["tiny", "deep"])
def model_dir(request: pytest.FixtureRequest, tiny_clipseg_dir: Path, deep_clipseg_dir: Path) -> Path:
    return tiny_clipseg_dir if request.param == "tiny" else deep_clipseg_dir


def _reference(folder: Path, image: np.ndarray, prompts: list[str], dtype: torch.dtype) -> np.ndarray:
    """transformers' full forward: N×S×S logits for N prompts against N copies of the image."""
    model = CLIPSegForImageSegmentation.from_pretrained(str(folder)).eval().to(dtype)
    inputs = CLIPSegProcessor.from_pretrained(str(folder))(
        text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt"
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        logits = model(**inputs).logits
    return logits.reshape(len(prompts), *logits.shape[-2:]).numpy()


def _ours(folder: Path, image: np.ndarray, prompts: list[str], dtype: torch.dtype) -> np.ndarray:
    backend = load(folder, Settings())
    backend.model.to(dtype)
    return backend.logits(backend.encode(image), prompts)


def test_preprocess_equals_the_processor_bit_for_bit(tiny_clipseg_dir: Path, coffee: np.ndarray) -> None:
    ours = preprocess(coffee, read_preprocessing(tiny_clipseg_dir))
    theirs = CLIPSegProcessor.from_pretrained(str(tiny_clipseg_dir))(images=[coffee], return_tensors="np")
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(ours, theirs["pixel_values"])


def test_tokenize_equals_the_processor(tiny_clipseg_dir: Path) -> None:
    backend = load(tiny_clipseg_dir, Settings())
    ids, mask = tokenize(backend.tokenizer, PROMPTS_3)
    theirs = CLIPSegProcessor.from_pretrained(str(tiny_clipseg_dir))(text=PROMPTS_3, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ids, theirs["input_ids"])
    np.testing.assert_array_equal(mask, theirs["attention_mask"])
    assert ids.dtype == np.int64 and ids.shape[0] == 3


def test_read_preprocessing_of_the_hub_layout(tmp_path: Path) -> None:
    """CIDAS/clipseg-rd64-refined ships a flat preprocessor_config.json with an integer size."""
    cfg = {"do_normalize": True, "do_resize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.6, 0.7]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**cfg, "resample": 2, "size": 352}))
    prep = read_preprocessing(tmp_path)
    assert prep.size == (352, 352) and prep.mean == (0.1, 0.2, 0.3) and prep.std == (0.5, 0.6, 0.7)
    assert prep.rescale_factor == pytest.approx(1 / 255) and prep.do_rescale
    x = preprocess(np.full((10, 20, 3), 255, np.uint8), prep)
    assert x.shape == (1, 3, 352, 352)
    np.testing.assert_allclose(x[0, :, 0, 0], [(1 - 0.1) / 0.5, (1 - 0.2) / 0.6, (1 - 0.3) / 0.7], rtol=1e-6)


def test_preprocess_defaults_and_non_square_size_match_the_vit_processor(tmp_path: Path, chelsea: np.ndarray) -> None:
    """Keys missing from the config take ViTImageProcessor's defaults; size is (height, width)."""
    from transformers import ViTImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 48}}))
    ours = preprocess(chelsea, read_preprocessing(tmp_path))
    theirs = ViTImageProcessor(size={"height": 32, "width": 48})(images=[chelsea], return_tensors="np")
    assert ours.shape == (1, 3, 32, 48)
    np.testing.assert_array_equal(ours, theirs["pixel_values"])


@pytest.mark.parametrize("prompts", [["a cup of coffee"], PROMPTS_3], ids=["1-prompt", "3-prompts"])
def test_logits_equal_transformers_float64(model_dir: Path, coffee: np.ndarray, prompts: list[str]) -> None:
    """In float64 rounding is negligible: any difference would be a difference in how the model is composed."""
    ours = _ours(model_dir, coffee, prompts, torch.float64)
    theirs = _reference(model_dir, coffee, prompts, torch.float64)
    assert ours.shape == theirs.shape == (len(prompts), 64, 64)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_logits_equal_transformers_float32_one_prompt(model_dir: Path, coffee: np.ndarray) -> None:
    ours = _ours(model_dir, coffee, ["a cup of coffee"], torch.float32)
    theirs = _reference(model_dir, coffee, ["a cup of coffee"], torch.float32)
    assert ours.shape == theirs.shape == (1, 64, 64)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_logits_equal_transformers_float32_three_prompts(model_dir: Path, coffee: np.ndarray) -> None:
    """transformers encodes 3 copies of the image in one batch, we encode it once: float32 batched matmuls round
    differently (transformers' own batch-of-3 and batch-of-1 logits differ by ~1.5e-5 on these random weights,
    whose logits reach ~15), so the float32 tolerance is 1e-4; float64 above pins the composition to 1e-5."""
    ours = _ours(model_dir, coffee, PROMPTS_3, torch.float32)
    theirs = _reference(model_dir, coffee, PROMPTS_3, torch.float32)
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_vision_layers_the_decoder_never_reads_are_dropped(deep_clipseg_dir: Path) -> None:
    backend = load(deep_clipseg_dir, Settings())
    assert backend.model.config.vision_config.num_hidden_layers == 4
    assert len(backend.model.clip.vision_model.encoder.layers) == max(backend.extract_layers) + 1 == 3


def test_maps_are_the_sigmoid_upsampled_to_the_original_size(tiny_clipseg_dir: Path, coffee: np.ndarray) -> None:
    backend = load(tiny_clipseg_dir, Settings())
    features = backend.encode(coffee)
    scores = backend.score(features, PROMPTS_3)
    logits = torch.from_numpy(backend.logits(features, PROMPTS_3))
    expected = torch.nn.functional.interpolate(
        torch.sigmoid(logits)[:, None], size=coffee.shape[:2], mode="bilinear", align_corners=False
    )[:, 0].numpy()
    assert scores.kind == "dense" and scores.labels == PROMPTS_3
    assert scores.maps.shape == (3, 400, 600) and scores.maps.dtype == np.float32
    maps = np.asarray(scores.maps)
    assert np.abs(maps - expected).max() <= 1e-5
    assert scores.scores is not None
    np.testing.assert_allclose(scores.scores, maps.reshape(3, -1).max(axis=1))
    # the maps exist at full size one at a time (memory): each read equals the whole array's map
    assert len(scores.maps) == 3 and all(np.array_equal(m, maps[i]) for i, m in enumerate(scores.maps))
    assert np.array_equal(scores.maps[1], maps[1]) and np.array_equal(np.asarray(scores.maps[[2, 0]]), maps[[2, 0]])


def test_several_prompts_score_as_each_alone(tiny_clipseg_dir: Path, chelsea: np.ndarray) -> None:
    backend = load(tiny_clipseg_dir, Settings())
    features = backend.encode(chelsea)
    together = backend.score(features, ["cat", "grass"]).maps
    for i, prompt in enumerate(["cat", "grass"]):
        alone = backend.score(features, [prompt]).maps
        assert alone.shape == (1, 300, 451)
        assert np.abs(together[i] - alone[0]).max() <= 1e-5
    assert np.abs(together[0] - together[1]).max() > 1e-3  # different prompts, different maps


MANY = [f"thing {i}" for i in range(2 * PROMPTS_PER_PASS + 3)]
"""Prompts for three passes of the decoder."""


class CountedPasses:
    """Wraps `backend.logits` to record the prompts of each decoder pass."""

    def __init__(self, backend: ClipSegBackend) -> None:
        self.passes: list[list[str]] = []
        self.logits = backend.logits

    def __call__(self, features: object, prompts: list[str]) -> np.ndarray:
        self.passes.append(list(prompts))
        return self.logits(features, prompts)


def test_many_prompts_are_decoded_in_passes_that_score_as_one_batch(
    tiny_clipseg_dir: Path, chelsea: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = load(tiny_clipseg_dir, Settings())
    features = backend.encode(chelsea)
    one_batch = sigmoid(backend.logits(features, MANY))
    counted = CountedPasses(backend)
    monkeypatch.setattr(backend, "logits", counted)
    asked: list[int] = []
    scores = backend.score(features, MANY, params=ScoreParams(should_stop=lambda: asked.append(1) and False))
    assert counted.passes == [MANY[:8], MANY[8:16], MANY[16:]] and len(asked) == 2  # asked before passes 2 and 3
    assert scores.labels == MANY and scores.maps.shape == (len(MANY), 300, 451)
    assert np.abs(scores.maps.low - one_batch).max() <= 1e-5  # type: ignore[attr-defined]


def test_a_many_prompt_call_stops_between_passes(
    tiny_clipseg_dir: Path, chelsea: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: CLIPSeg decoded every prompt in one batch, with no boundary in it: a run told to stop scored all
    of them first (the 32 targets a request may name)."""
    backend = load(tiny_clipseg_dir, Settings())
    counted = CountedPasses(backend)
    monkeypatch.setattr(backend, "logits", counted)
    generator = MaskGenerator(backend, Settings())
    with pytest.raises(StoppedError):  # told to stop once the first pass ran: the others never run
        generator.generate(chelsea, MANY, should_stop=lambda: bool(counted.passes))
    assert counted.passes == [MANY[:8]]
    result = generator.generate(chelsea, MANY, should_stop=lambda: False)
    assert len(counted.passes) == 4 and result.mask.shape == (300, 451)  # the features were cached: three passes


def test_the_registry_loads_it_once(tiny_clipseg_dir: Path) -> None:
    registry.clear_cache()
    settings = Settings()
    first = registry.create("clipseg", tiny_clipseg_dir, settings)
    assert isinstance(first, ClipSegBackend) and isinstance(first, Backend)
    assert first.name == "clipseg" and first.model_id == str(tiny_clipseg_dir)
    assert registry.create("clipseg", tiny_clipseg_dir, settings) is first
    registry.clear_cache()


def test_threads_setting_is_applied(tiny_clipseg_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        load(tiny_clipseg_dir, Settings(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_missing_torch_names_the_extra(tiny_clipseg_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r'pip install "automask\[torch\]"'):
        load(tiny_clipseg_dir, Settings())


def test_incomplete_folder_is_a_clear_error(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    no_processor = tmp_path / "no-processor"
    shutil.copytree(tiny_clipseg_dir, no_processor)
    (no_processor / "processor_config.json").unlink()
    with pytest.raises(ModelNotAvailableError, match=r"preprocessor_config\.json"):
        load(no_processor, Settings())
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_clipseg_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelNotAvailableError, match="automask models pull clipseg"):
        load(no_weights, Settings())


def test_a_folder_without_its_tokenizer_is_a_clear_error(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    """Before: without tokenizer.json and tokenizer_config.json, transformers built a CLIPTokenizer knowing only its
    two special tokens, so every prompt became the same unknown tokens and every prompt got the same mask, silently
    (`automask mask` wrote a mask; `models export` exported that tokenizer)."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_clipseg_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelNotAvailableError) as err:
        load(folder, Settings())
    assert err.value.message.startswith(
        f"The CLIPSeg model in '{folder}' has no tokenizer (tokenizer.json or its vocabulary files are missing): it "
        "would read every prompt as the same unknown words. It holds a config.json naming model_type 'clipseg'"
    )
    assert err.value.message.endswith("automask models pull clipseg, then --model clipseg.")  # not pull --force


def test_a_half_downloaded_weights_file_is_a_clear_error(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    """Before: a truncated model.safetensors (an interrupted copy) raised safetensors' SafetensorError, which the
    CLI reported as "internal error: SafetensorError: Error while deserializing header"."""
    folder = tmp_path / "half"
    shutil.copytree(tiny_clipseg_dir, folder)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelNotAvailableError) as err:
        load(folder, Settings())
    assert err.value.message.startswith(f"The CLIPSeg model in '{folder}' could not be loaded (")
    assert err.value.message.endswith("automask models pull clipseg, then --model clipseg.")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_gpu_is_a_clear_error(tiny_clipseg_dir: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="no CUDA GPU"):
        load(tiny_clipseg_dir, Settings(device="cuda"))
