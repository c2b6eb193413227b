"""automask.backends.torch_loading: device checks and checkpoint errors shared by the torch backends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from automask import MaskGenerator
from automask.backends import grounded_sam, sam
from automask.backends.torch_loading import check_device, checkpoint_errors
from automask.errors import ModelNotAvailableError
from automask.models import MARKER
from automask.settings import Settings
from tiny_models import make_tiny_sam


def test_check_device() -> None:
    assert check_device("cpu") == "cpu"
    with pytest.raises(ModelNotAvailableError, match="Invalid AUTOMASK_DEVICE 'gpu0'"):
        check_device("gpu0")


@pytest.mark.parametrize("kind", ["mps", "xpu"])
def test_a_device_this_machine_lacks_is_named_with_the_fix(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `--device mps` on a machine without it passed the check, and loading failed with "The CLIPSeg model
    ... could not be loaded (PyTorch is not linked with support for mps devices). Re-download it", which no
    download fixes."""
    monkeypatch.setattr(getattr(torch, kind), "is_available", lambda: False)
    for device in (kind, f"{kind}:0"):
        with pytest.raises(ModelNotAvailableError) as err:
            check_device(device)
        assert err.value.message == (
            f"AUTOMASK_DEVICE is '{device}' but torch sees no {kind} device. Use AUTOMASK_DEVICE=cpu, or install a "
            f"build of torch with {kind} support."
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_every_torch_loader_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    cuda = Settings(data_dir=tmp_path, device="cuda")
    with pytest.raises(ModelNotAvailableError, match="no CUDA GPU"):
        grounded_sam.load(tmp_path, cuda)  # checked before the folder is even read
    folder = make_tiny_sam(tmp_path / "sam")
    with pytest.raises(ModelNotAvailableError, match="no CUDA GPU"):
        sam.load_segmenter(folder, cuda)


def test_checkpoint_errors_name_the_model_the_cause_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError) as err, checkpoint_errors("SAM", tmp_path, pull="sam"):
        raise OSError("model.safetensors is missing\nlong transformers advice")
    assert err.value.message == (
        f"The SAM model in '{tmp_path}' could not be loaded (model.safetensors is missing). It holds no readable "
        "config.json, where a complete SAM checkpoint was expected: save one there with "
        "save_pretrained (weights, tokenizer and processor files), or use the catalogue model instead: automask models "
        "pull sam, then --model sam."
    )
    assert isinstance(err.value.__cause__, OSError)
    with pytest.raises(ModelNotAvailableError, match=r"\(KeyError\)"), checkpoint_errors("SAM", tmp_path, "sam"):
        raise KeyError()
    with pytest.raises(ZeroDivisionError), checkpoint_errors("SAM", tmp_path, "sam"):  # a bug is not hidden
        raise ZeroDivisionError()


def test_sam_for_refine_applies_the_thread_setting(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    folder = make_tiny_sam(tmp_path / "sam")  # a fresh folder: not in the loaded-segmenter cache
    try:
        sam.load_segmenter(folder, Settings(data_dir=tmp_path, threads=wanted))
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_a_folder_whose_config_names_another_architecture_is_a_clear_error(
    tiny_clipseg_dir: Path, tmp_path: Path
) -> None:
    """A CLIPSeg checkpoint whose config.json says another model_type: transformers' constructor raises an
    AttributeError/TypeError on the missing fields, which reached the user as an internal error (exit 70). Then it
    said 'Re-download it with: automask models pull sam3 --force', which rewrites the data folder's copy, not a folder
    of the user's: it now names the folder, what its config.json says it holds and what was expected; a pulled
    folder is still told to re-pull."""
    folder = tmp_path / "mislabelled"
    shutil.copytree(tiny_clipseg_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "sam3"}))
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(ModelNotAvailableError) as err:
        MaskGenerator(str(folder), settings)
    message = err.value.message
    assert f"The SAM 3 model in '{folder}' could not be loaded" in message and "--force" not in message
    assert "model_type 'sam3', architectures ['CLIPSegForImageSegmentation']" in message
    assert "a complete SAM 3 checkpoint was expected" in message
    assert message.endswith("or use the catalogue model instead: automask models pull sam3, then --model sam3.")
    pulled = settings.models_dir / "sam3"
    shutil.copytree(folder, pulled)
    (pulled / MARKER).write_text(json.dumps({"name": "sam3", "backend": "sam3", "repos": ["facebook/sam3"]}))
    with pytest.raises(ModelNotAvailableError) as err:
        MaskGenerator("sam3", settings)
    assert err.value.message.endswith("Re-download it with: automask models pull sam3 --force")


@pytest.mark.parametrize(
    ("flags", "env", "name"),
    [(["--device", "cuda"], {}, "--device"), ([], {"AUTOMASK_DEVICE": "cuda"}, "AUTOMASK_DEVICE")],
)
def test_a_missing_gpu_is_named_as_the_user_asked_for_it(
    tiny_clipseg_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], env: dict, name: str
) -> None:
    """Before: `automask --device cuda ...` without a GPU said "AUTOMASK_DEVICE is 'cuda' ... Use
    AUTOMASK_DEVICE=cpu", a variable the user never set. Now the error names the flag or the variable, as given."""
    from PIL import Image

    from test_cli import invoke

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    args = ["mask", tmp_path / "a.png", "-p", "cat", "--model", tiny_clipseg_dir, "-o", tmp_path / "m.png"]
    result = invoke(*flags, *args, **env)
    assert result.exit_code == 4, result.output
    assert result.stderr == (
        f"error: {name} is 'cuda' but torch sees no CUDA GPU. Use {name}=cpu, or install a CUDA build of torch.\n"
    )


def test_the_cpu_device_takes_an_index_as_torch_does(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    """Before: `--device cpu:0`, which torch takes, exited 2 ('must be cpu, cuda, ...'). Now it is the CPU (read as
    'cpu', so every "on the CPU?" check of the backends holds)."""
    from PIL import Image

    from test_cli import invoke

    assert Settings(device="cpu:0").device == "cpu"
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    args = ["mask", tmp_path / "a.png", "-p", "cat", "--model", tiny_clipseg_dir, "-o", tmp_path / "m.png"]
    result = invoke("--device", "cpu:0", *args)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "m.png").size == (40, 30)
