"""The ONNX Runtime CLIPSeg path against the transformers reference and the torch backend (same tiny weights).

Every export goes into a temporary copy of a tiny random checkpoint; the shared fixtures stay untouched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from automask.backends import clipseg, clipseg_onnx, onnx_runtime, registry
from automask.backends.clipseg_common import choose_runtime, find_artifacts, has_onnx, onnx_dir, read_manifest
from automask.backends.clipseg_export import export
from automask.errors import AutomaskError, ModelNotAvailableError, UnknownModelError
from automask.models_export import export_onnx
from automask.pipeline import MaskGenerator
from automask.settings import Settings
from tiny_models import make_tiny_clipseg

PROMPTS_3 = ["a cup of coffee", "spoon", "the wooden table"]
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_clipseg_dir: Path) -> Path:
    """A copy of the tiny checkpoint with its fp32 and int8 ONNX export."""
    folder = tmp_path_factory.mktemp("onnx") / "clipseg"
    shutil.copytree(tiny_clipseg_dir, folder)
    export(folder, int8=True)
    return folder


@pytest.fixture(scope="module")
def deep_exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose 4th vision layer is never read by the decoder, exported (fp32 only)."""
    folder = make_tiny_clipseg(tmp_path_factory.mktemp("deep-onnx") / "clipseg", seed=1, vision_layers=4)
    export(folder)
    return folder


@pytest.fixture(autouse=True)
def _fresh_registry() -> None:
    registry.clear_cache()


def _reference(folder: Path, image: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """transformers' own flow (processor + full model, N copies of the image): N×S×S logits and its inputs."""
    model = CLIPSegForImageSegmentation.from_pretrained(str(folder)).eval()
    inputs = CLIPSegProcessor.from_pretrained(str(folder))(
        text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = model(**inputs).logits
    return logits.reshape(len(prompts), *logits.shape[-2:]).numpy(), {k: v.numpy() for k, v in inputs.items()}


@pytest.mark.parametrize("prompts", [["a cup of coffee"], PROMPTS_3], ids=["1-prompt", "3-prompts"])
@pytest.mark.parametrize("which", ["tiny", "deep"])
def test_onnx_logits_equal_transformers(
    which: str, prompts: list[str], exported: Path, deep_exported: Path, coffee: np.ndarray
) -> None:
    folder = exported if which == "tiny" else deep_exported
    ref, inputs = _reference(folder, coffee, prompts)
    backend = clipseg_onnx.load(folder, Settings())
    ids, mask = clipseg.tokenize(backend.tokenizer, prompts)
    np.testing.assert_array_equal(ids, inputs["input_ids"])
    np.testing.assert_array_equal(mask, inputs["attention_mask"])
    # the same pixel values as the reference: the processor's
    (hidden,) = backend.image_session.run(None, {"pixel_values": inputs["pixel_values"][:1]})
    ours = backend.logits(clipseg_onnx.OnnxFeatures(hidden, coffee.shape[:2]), prompts)
    assert ours.shape == ref.shape == (len(prompts), 64, 64)
    assert np.abs(ref).max() > 1.0  # the logits are not trivially small
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_ATOL)
    # and through our own preprocessing (bit-equal to the processor's)
    np.testing.assert_allclose(backend.logits(backend.encode(coffee), prompts), ref, rtol=0, atol=LOGIT_ATOL)


def test_the_image_graph_stops_at_the_last_layer_the_decoder_reads(deep_exported: Path) -> None:
    import onnx

    names = [n.name for n in onnx.load(str(onnx_dir(deep_exported) / "image.onnx")).graph.node]
    assert any("/layers.2/" in n for n in names)
    assert not any("/layers.3/" in n for n in names)
    manifest = read_manifest(deep_exported)
    assert manifest is not None and manifest["extract_layers"] == [1, 2]


@pytest.mark.parametrize("prompts", [["cup"], PROMPTS_3, ["", "ÉTÉ à Paris 🌞", "x " * 100]])
def test_tokenizer_without_transformers_equals_the_processor(exported: Path, prompts: list[str]) -> None:
    artifacts = find_artifacts(exported)
    assert artifacts is not None
    ids, mask = clipseg.tokenize(clipseg_onnx.PromptTokenizer(artifacts), prompts)
    theirs = CLIPSegProcessor.from_pretrained(str(exported))(text=prompts, padding=True, truncation=True)
    np.testing.assert_array_equal(ids, np.array(theirs["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(theirs["attention_mask"]))
    assert ids.dtype == np.int64 and ids.shape[1] <= 77


def test_masks_equal_the_torch_backend(exported: Path, coffee: np.ndarray) -> None:
    onnx_gen = MaskGenerator(str(exported), Settings(runtime="onnx"))
    torch_gen = MaskGenerator(str(exported), Settings(runtime="torch"))
    assert onnx_gen.backend.name == "clipseg-onnx" and torch_gen.backend.name == "clipseg"
    ours = onnx_gen.backend.score(onnx_gen.backend.encode(coffee), PROMPTS_3)
    ref = torch_gen.backend.score(torch_gen.backend.encode(coffee), PROMPTS_3)
    assert ours.maps.shape == ref.maps.shape == (3, *coffee.shape[:2])
    np.testing.assert_allclose(ours.maps, ref.maps, rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.scores, ref.scores, rtol=0, atol=2e-5)  # type: ignore[arg-type]
    partial = 0
    for options in ({}, {"threshold": 0.5, "grow_mask": 0}, {"threshold": 0.7, "grow_mask": 3, "invert_mask": True}):
        a = onnx_gen.generate(coffee, PROMPTS_3, **options)
        b = torch_gen.generate(coffee, PROMPTS_3, **options)
        thr = options.get("threshold", 0.2)
        borderline = (np.abs(ref.maps - thr) < 1e-4).any(axis=0)
        if not borderline.any():
            np.testing.assert_array_equal(a.mask, b.mask)
        else:  # a score within rounding of the threshold may flip; nowhere else
            selected_a = (ours.maps >= thr).any(axis=0)
            selected_b = (ref.maps >= thr).any(axis=0)
            assert not (selected_a != selected_b)[~borderline].any()
        partial += 0 < np.count_nonzero(b.mask) < b.mask.size
    assert partial >= 2  # masks with something in them, not everything


def test_int8_runs_and_roughly_agrees(exported: Path, coffee: np.ndarray) -> None:
    """Not a validation of int8 on real weights: on tiny random weights, probabilities stay within 0.02 on
    average and at least 98% of the thresholded pixels agree (measured: 0.004 and 99.4%)."""
    fp32 = clipseg_onnx.load(exported, Settings())
    int8 = clipseg_onnx.load(exported, Settings(int8=True))
    assert int8.name == "clipseg-onnx-int8" and int8.int8
    a = fp32.score(fp32.encode(coffee), PROMPTS_3).maps
    b = int8.score(int8.encode(coffee), PROMPTS_3).maps
    assert not np.array_equal(a, b)  # it is a different model
    assert float(np.abs(a - b).mean()) < 0.02
    for thr in (0.2, 0.5):
        assert float(((a >= thr) == (b >= thr)).mean()) > 0.98


def test_auto_runtime_picks_onnx_when_exported_and_torch_otherwise(exported: Path, tiny_clipseg_dir: Path) -> None:
    assert not has_onnx(tiny_clipseg_dir)
    assert registry.create("clipseg", exported, Settings()).name == "clipseg-onnx"
    assert registry.create("clipseg", exported, Settings(int8=True)).name == "clipseg-onnx-int8"
    assert registry.create("clipseg", exported, Settings(runtime="torch")).name == "clipseg"
    assert registry.create("clipseg", tiny_clipseg_dir, Settings()).name == "clipseg"
    assert choose_runtime(exported, Settings(device="cuda")) == "torch"  # GPUs keep the torch path


def test_onnx_runtime_without_an_export_names_the_export_command(tiny_clipseg_dir: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="automask models export"):
        registry.create("clipseg", tiny_clipseg_dir, Settings(runtime="onnx"))
    with pytest.raises(ModelNotAvailableError, match=r"AUTOMASK_INT8 .* automask models export .* --int8"):
        registry.create("clipseg", tiny_clipseg_dir, Settings(int8=True))


def test_cli_export_fp32_only_then_int8_is_missing(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    from automask.cli import main

    folder = tmp_path / "clipseg"
    shutil.copytree(tiny_clipseg_dir, folder)
    result = CliRunner().invoke(main, ["models", "export", str(folder)])
    assert result.exit_code == 0, result.output
    assert str(onnx_dir(folder)) in result.output
    assert has_onnx(folder) and not has_onnx(folder, int8=True)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary left
    with pytest.raises(ModelNotAvailableError, match=r"automask models export .* --int8"):
        choose_runtime(folder, Settings(int8=True))
    with pytest.raises(ModelNotAvailableError, match="--int8"):
        clipseg_onnx.load(folder, Settings(int8=True))


def test_an_export_of_other_weights_is_not_used(exported: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clipseg"
    shutil.copytree(exported, folder)
    assert has_onnx(folder)
    config = json.loads((folder / "config.json").read_text())
    config["reduce_dim"] = 8  # the checkpoint changed after the export
    (folder / "config.json").write_text(json.dumps(config))
    assert not has_onnx(folder)
    assert choose_runtime(folder, Settings()) == "torch"
    with pytest.raises(ModelNotAvailableError, match="automask models export"):
        choose_runtime(folder, Settings(runtime="onnx"))


def test_an_export_of_other_weights_of_the_same_size_is_not_used(exported: Path, tmp_path: Path) -> None:
    """Before: the fingerprint was config.json and the weight files' names and sizes, so weights retrained or
    fine-tuned in place (same architecture, so same size and same config) kept using the old weights' graphs."""
    folder = tmp_path / "clipseg"
    shutil.copytree(exported, folder)
    other = make_tiny_clipseg(tmp_path / "other", seed=7)
    weights = folder / "model.safetensors"
    assert (other / "model.safetensors").stat().st_size == weights.stat().st_size
    assert (other / "model.safetensors").read_bytes() != weights.read_bytes()
    shutil.copyfile(other / "model.safetensors", weights)
    assert not has_onnx(folder)
    assert choose_runtime(folder, Settings()) == "torch"


def test_export_of_a_folder_without_a_checkpoint(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(ModelNotAvailableError):
        export_onnx(str(tmp_path), settings)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clipseg"}))
    with pytest.raises(ModelNotAvailableError):
        export(tmp_path)
    assert not onnx_dir(tmp_path).exists()


def test_export_of_a_folder_without_its_tokenizer_is_refused(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    """Before: the export wrote onnx/tokenizer.json from the vocabulary-less tokenizer transformers builds for a
    folder missing its tokenizer files, and the ONNX runtime then read every prompt as the same tokens."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_clipseg_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelNotAvailableError, match="has no tokenizer"):
        export(folder)
    assert not onnx_dir(folder).exists()


def test_export_of_a_non_clipseg_catalogue_model_is_refused(settings: Settings) -> None:
    with pytest.raises((UnknownModelError, ModelNotAvailableError)):
        export_onnx("subject", settings)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_export_of_a_model_read_from_the_hf_cache_writes_nothing_there(
    tiny_clipseg_dir: Path, settings: Settings
) -> None:
    """`models export clipseg` wrote `onnx/` into the Hugging Face cache's snapshot (shared with other programs,
    managed by huggingface_hub). The model is now installed in the data folder (hard links) and exported there;
    list, the runtime and rm agree on it, and the cache is left as it was."""
    from automask.cli import main
    from automask.models import model_dir
    from test_models import _fake_hf_cache

    snapshot = _fake_hf_cache(tiny_clipseg_dir)
    before = _tree(snapshot.parents[1])

    def cli(*args: str) -> str:
        result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    out = cli("export", "clipseg")
    folder = model_dir("clipseg", settings)
    assert f"ONNX Runtime graphs written to {onnx_dir(folder)}" in out
    assert _tree(snapshot.parents[1]) == before and not onnx_dir(snapshot).exists()
    [row] = [r for r in json.loads(cli("list", "--json")) if r["name"] == "clipseg"]
    assert (row["source"], row["path"], row["onnx"]) == ("data-dir", str(folder), ["fp32"])
    assert MaskGenerator("clipseg", settings).backend.name == "clipseg-onnx"
    assert f"removed {folder}" in cli("rm", "clipseg")
    [row] = [r for r in json.loads(cli("list", "--json")) if r["name"] == "clipseg"]
    assert (row["source"], row["path"], row["onnx"]) == ("hf-cache", str(snapshot), [])
    assert _tree(snapshot.parents[1]) == before


def test_export_of_another_hf_cache_snapshot_path_is_refused(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--someone--clipseg" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_clipseg_dir, snapshot)
    (tmp_path / "link").symlink_to(snapshot)
    for path in (snapshot, tmp_path / "link"):
        with pytest.raises(AutomaskError, match="is in the Hugging Face cache: copy it out"):
            export_onnx(str(path), Settings(data_dir=tmp_path / "data"))
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in tiny_clipseg_dir.iterdir())


def test_export_of_a_catalogue_snapshot_outside_the_hf_cache_is_refused(
    tiny_clipseg_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CIDAS/clipseg-rd64-refined snapshot in another cache (a copied or mounted one, or another revision) was
    taken for `clipseg` and pulled instead: offline, "Cannot download the model 'clipseg'" for a complete folder;
    online, the hub's model downloaded and exported in place of the one named. It is refused as any snapshot."""
    snapshot = tmp_path / "other" / "models--CIDAS--clipseg-rd64-refined" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_clipseg_dir, snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(AutomaskError, match="is in the Hugging Face cache: copy it out") as info:
        export_onnx(str(snapshot), settings)
    assert not isinstance(info.value, ModelNotAvailableError)
    assert not onnx_dir(snapshot).exists() and not (tmp_path / "data" / "models" / "clipseg").exists()


@pytest.mark.parametrize("switch", ["--no-download", "HF_HUB_OFFLINE"])
def test_export_of_an_incomplete_hf_cache_model_downloads_nothing_when_downloads_are_off(
    switch: str, tiny_clipseg_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot made by from_pretrained (no merges.txt) runs from the cache, but the pull that installs it for the
    export wants it complete: `--no-download` was ignored (the whole model downloaded), and offline the error said
    to pull it. Now refused, nothing downloaded, naming the switch and the copy that exports offline."""
    import huggingface_hub
    from huggingface_hub.errors import IncompleteSnapshotError

    import automask.install
    from automask.cli import main
    from test_models import _fake_hf_cache

    snapshot = _fake_hf_cache(tiny_clipseg_dir)

    def incomplete(*args: object, **kwargs: object) -> object:
        assert kwargs.get("local_files_only")
        raise IncompleteSnapshotError("1 file(s) are missing (merges.txt)", snapshot_path=str(snapshot))

    def download(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    monkeypatch.setattr(automask.install, "download_repo", download)
    flags = ["--no-download"] if switch == "--no-download" else []
    if switch == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--data-dir", str(settings.data_dir), *flags, "models", "export", "clipseg"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 4, result.output
    assert "incomplete" in result.stderr and f"cp -rL {snapshot}" in result.stderr, result.stderr
    assert "automask models export" in result.stderr
    assert not onnx_dir(snapshot).exists() and not (settings.data_dir / "models" / "clipseg").exists()


def test_session_settings_for_small_cpus() -> None:
    import onnxruntime as ort

    options = onnx_runtime.session_options(Settings(threads=3))
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert onnx_runtime.session_options(Settings()).intra_op_num_threads == onnx_runtime.physical_cores() >= 1


def test_empty_prompt_list_gives_empty_maps(exported: Path, chelsea: np.ndarray) -> None:
    backend = clipseg_onnx.load(exported, Settings(), warm_up=False)
    scores = backend.score(backend.encode(chelsea), [])
    assert scores.maps.shape == (0, *chelsea.shape[:2]) and scores.labels == []


def test_the_onnx_runtime_needs_no_torch(exported: Path, coffee: np.ndarray, tmp_path: Path) -> None:
    """In a fresh interpreter where importing torch or transformers fails, the ONNX path still masks."""
    np.save(tmp_path / "image.npy", coffee)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        import numpy as np
        from automask import MaskGenerator, Settings
        gen = MaskGenerator({str(exported)!r}, Settings(data_dir={str(tmp_path)!r}))
        result = gen.generate(np.load({str(tmp_path / "image.npy")!r}), {PROMPTS_3!r})
        np.save({str(tmp_path / "mask.npy")!r}, result.mask)
        print(result.backend, sorted(m for m in ("torch", "transformers") if sys.modules.get(m) is not None))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["clipseg-onnx", "[]"]
    expected = MaskGenerator(str(exported), Settings(runtime="onnx")).generate(coffee, PROMPTS_3).mask
    np.testing.assert_array_equal(np.load(tmp_path / "mask.npy"), expected)


@pytest.mark.parametrize("tools", [True, False], ids=["with-torch", "without-export-tools"])
def test_cli_pull_exports_the_onnx_graphs_when_it_can(
    tools: bool, tiny_clipseg_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import automask.models
    import automask.models_export
    from automask.cli import main

    def fake_pull(name: str, settings: Settings, **_: object) -> Path:  # the download itself is test_models' job
        target = automask.models.model_dir(name, settings)
        shutil.copytree(tiny_clipseg_dir, target)
        (target / automask.models.MARKER).write_text(json.dumps({"name": name, "backend": "clipseg", "repos": []}))
        return target

    monkeypatch.setattr(automask.models, "pull", fake_pull)
    monkeypatch.setattr(automask.models_export, "can_export", lambda: tools)
    result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "pull", "clipseg"])
    assert result.exit_code == 0, result.output
    folder = automask.models.model_dir("clipseg", settings)
    assert has_onnx(folder) is tools
    if tools:
        assert MaskGenerator("clipseg", settings).backend.name == "clipseg-onnx"
    else:
        assert "automask models export clipseg" in result.output


def test_an_export_that_disagrees_with_torch_is_not_installed(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from automask.backends import clipseg_export
    from automask.errors import AutomaskError

    folder = tmp_path / "clipseg"
    shutil.copytree(exported, folder)
    before = (onnx_dir(folder) / "manifest.json").read_text()
    monkeypatch.setattr(clipseg_export, "EXPORT_TOLERANCE", -1.0)  # nothing can pass the self-check
    with pytest.raises(AutomaskError, match="disagrees with torch"):
        export(folder)
    assert (onnx_dir(folder) / "manifest.json").read_text() == before  # the old export is untouched
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_a_damaged_graph_is_a_clear_error(exported: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clipseg"
    shutil.copytree(exported, folder)
    (onnx_dir(folder) / "image.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ModelNotAvailableError, match=r"could not be loaded.*automask models export"):
        clipseg_onnx.load(folder, Settings())


def test_an_export_onto_a_full_disk_is_a_clear_error_and_leaves_nothing(
    tiny_clipseg_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing the graphs was 'internal error: OSError' (exit 70), and `models pull clipseg` failed
    that way after installing the model. Now: a clear error from `models export`, a note after a pull (exit 0)."""
    from automask import models
    from automask.backends import clipseg_export
    from automask.cli import main

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = tmp_path / "clipseg"
    shutil.copytree(tiny_clipseg_dir, folder)
    monkeypatch.setattr(clipseg_export, "_export_prompt", disk_full)
    result = CliRunner().invoke(main, ["models", "export", str(folder)])
    assert result.exit_code == 1, result.output
    assert f"Cannot write the ONNX export into '{folder}' (No space left on device). Free some space" in result.output
    assert "internal error" not in result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_clipseg_dir.iterdir())
    monkeypatch.setattr(models, "pull", lambda *a, **kw: folder)
    result = CliRunner().invoke(main, ["models", "pull", "clipseg"])
    assert result.exit_code == 0, result.output
    assert f"clipseg installed in {folder}" in result.output and "note: Cannot write the ONNX export" in result.output


@pytest.mark.parametrize("during", ["_export_prompt", "_check"])
def test_an_export_whose_model_a_pull_replaced_says_so(
    tiny_clipseg_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, during: str
) -> None:
    """`models pull --force clipseg` while `models export clipseg` ran: the pull's swap took the export's staging
    folder away with the old model folder, and the export failed with 'Free some space there' (or an internal
    error, from ONNX Runtime). It now says the model was replaced, and leaves nothing in the new folder."""
    from automask import staging
    from automask.backends import clipseg_export
    from automask.cli import main

    folder = tmp_path / "clipseg"
    shutil.copytree(tiny_clipseg_dir, folder)
    step = getattr(clipseg_export, during)

    def then_pulled(*args: object) -> None:
        step(*args)
        with staging.resumable_staging(folder) as new:  # what `models.pull` does, force or not
            shutil.copytree(tiny_clipseg_dir, new, dirs_exist_ok=True)
            staging.replace_dir(new, folder)

    monkeypatch.setattr(clipseg_export, during, then_pulled)
    result = CliRunner().invoke(main, ["models", "export", str(folder)])
    assert result.exit_code == 1, result.output
    assert f"'{folder}' was replaced while it was being exported" in result.output, result.output
    assert "Free some space" not in result.output and "internal error" not in result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_clipseg_dir.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["clipseg"]


def test_an_export_killed_inside_its_swap_is_put_back_and_its_leftovers_removed(exported: Path, tmp_path: Path) -> None:
    """`models export` killed (SIGKILL, a power cut) between the two renames of its swap left the previous export
    hidden as `<model>/.onnx-xxxx.old`, with no `onnx` folder: the model ran with torch for ever after, and the new
    export's staging folder stayed too. The next look puts the export back; the next export removes the rest."""
    from automask import staging

    folder = tmp_path / "clipseg"
    shutil.copytree(exported, folder)
    before = (onnx_dir(folder) / "manifest.json").read_text()
    kill = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from automask import staging
        from automask.backends.clipseg_export import export
        move_aside = staging._move_aside
        staging._move_aside = lambda dest: (move_aside(dest), os.kill(os.getpid(), signal.SIGKILL))
        export(Path(sys.argv[1]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", kill, str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not onnx_dir(folder).exists() and list(folder.glob(".onnx-*.old")), sorted(folder.iterdir())
    with staging.staging(onnx_dir(folder)):  # an export between its renames: what it moved aside stays
        assert not has_onnx(folder) and not onnx_dir(folder).exists()
    assert has_onnx(folder) and has_onnx(folder, int8=True)
    assert (onnx_dir(folder) / "manifest.json").read_text() == before
    assert [p.name for p in folder.glob(".onnx-*.old")] == []
    export(folder)
    assert has_onnx(folder) and [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_models_list_removes_what_a_killed_export_left(exported: Path, settings: Settings) -> None:
    """A killed export's staging folder (the size of the weights) and an older export it had moved aside and not
    yet deleted stayed in the model folder for good: `models list` (which tidies a killed pull's) removes them."""
    import automask.models
    from automask.cli import main

    folder = automask.models.model_dir("clipseg", settings)
    shutil.copytree(exported, folder)
    (folder / automask.models.MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    shutil.copytree(onnx_dir(folder), folder / ".onnx-0000000a.partial")  # its lock died with it
    shutil.copytree(onnx_dir(folder), folder / ".onnx-0000000b.old")
    result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list", "--json"])
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads(result.stdout) if r["name"] == "clipseg")
    assert row["onnx"] == ["fp32", "int8"]
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_models_list_removes_the_staging_folders_of_exports_killed_before_they_were_locked(
    exported: Path, settings: Settings
) -> None:
    """Exports before the locked staging folders staged in `<model>/.onnx-tmp-xxxxxxxx`; one killed there (SIGKILL,
    a power cut) left that folder, the size of the weights, for good: nothing looked for that name. `models list`
    removes it, only while no export holds its lock."""
    import automask.models
    from automask import staging
    from automask.cli import main

    folder = automask.models.model_dir("clipseg", settings)
    shutil.copytree(exported, folder)
    (folder / automask.models.MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    shutil.copytree(onnx_dir(folder), folder / ".onnx-tmp-0000000a")
    _age(folder / ".onnx-tmp-0000000a", 2 * 3600)  # nothing written in it for two hours: a killed export's
    (folder / ".onnx-tmp-notmine").mkdir()  # not a name an export gave
    listing = ["--data-dir", str(settings.data_dir), "models", "list", "--json"]
    with staging.staging(onnx_dir(folder)):  # while an export runs, export folders are left alone
        assert CliRunner().invoke(main, listing).exit_code == 0
        assert (folder / ".onnx-tmp-0000000a").is_dir()
    result = CliRunner().invoke(main, listing)
    assert result.exit_code == 0, result.output
    assert next(r for r in json.loads(result.stdout) if r["name"] == "clipseg")["onnx"] == ["fp32", "int8"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".onnx-tmp-notmine"]


def test_models_list_leaves_the_unlocked_staging_folder_of_a_running_older_export_alone(
    exported: Path, settings: Settings
) -> None:
    """An export by an older automask sharing the data folder stages in `<model>/.onnx-tmp-xxxxxxxx` without a lock:
    `models list` deleted that folder under the running export (it failed, or wrote nothing). One written into
    within the last hour is kept; only one left untouched longer (its export was killed) is removed."""
    import automask.models
    from automask.cli import main

    folder = automask.models.model_dir("clipseg", settings)
    shutil.copytree(exported, folder)
    (folder / automask.models.MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    running = folder / ".onnx-tmp-0000000c"
    shutil.copytree(onnx_dir(folder), running)
    _age(running, 2 * 3600)
    (running / "prompt.onnx").touch()  # the export is still writing: its newest file is recent
    listing = ["--data-dir", str(settings.data_dir), "models", "list", "--json"]
    assert CliRunner().invoke(main, listing).exit_code == 0
    assert (running / "image.onnx").read_bytes() == (onnx_dir(folder) / "image.onnx").read_bytes()
    _age(running, 2 * 3600)
    assert CliRunner().invoke(main, listing).exit_code == 0
    assert not running.exists()


def _age(folder: Path, seconds: float) -> None:
    """Set the times of `folder` and everything in it `seconds` in the past."""
    then = time.time() - seconds
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (then, then))
