"""Model management: pull (with a fake hub, never the network), resolve, list, the Hugging Face cache fallback."""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub
import huggingface_hub.constants
import pytest
from click.testing import CliRunner
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from automask import install, models
from automask.errors import ModelNotAvailableError, UnknownModelError
from automask.pipeline import MaskGenerator
from automask.settings import Settings

REPO = "CIDAS/clipseg-rd64-refined"


_REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


def _no_network(*args: Any, **kwargs: Any) -> Any:
    """snapshot_download that allows only cache look-ups (local_files_only=True), never a download."""
    if kwargs.get("local_files_only"):
        return _REAL_SNAPSHOT_DOWNLOAD(*args, **kwargs)
    raise AssertionError("the hub must not be contacted")


@pytest.fixture()
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift the offline switches; every test using it replaces snapshot_download, so nothing can leave (the
    resumable weights download before it, which lists the repository, is tested against tests/fake_hub.py)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    monkeypatch.setattr(install, "fetch_weights", lambda *args: None)
    monkeypatch.setattr(install, "plan_weights", lambda *args: [])


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: copies the files of `source` matching allow_patterns."""

    def __init__(self, source: Path, fail_after: int | None = None, error: BaseException | None = None) -> None:
        self.source, self.fail_after, self.error = source, fail_after, error
        self.calls: list[dict[str, Any]] = []

    def __call__(self, repo_id: str, *, allow_patterns: list[str], local_dir: Path | None = None, **kw: Any) -> str:
        if local_dir is None:  # a look in the (empty) Hugging Face cache
            return str(_no_network(repo_id, allow_patterns=allow_patterns, **kw))
        self.calls.append({"repo_id": repo_id, "local_dir": Path(local_dir), "allow_patterns": allow_patterns, **kw})
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # the hub's bookkeeping
        for i, f in enumerate(sorted(self.source.iterdir())):
            if self.fail_after is not None and i >= self.fail_after:
                raise self.error or httpx.ConnectError("connection reset")
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy2(f, Path(local_dir) / f.name)
        return str(local_dir)


def test_pull_offline_fails_fast_without_touching_the_hub(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    t = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        models.pull("clipseg", settings)
    assert time.perf_counter() - t < 2.0
    msg = err.value.message
    assert "HF_HUB_OFFLINE" in msg and "automask models pull clipseg" in msg and "AUTOMASK_MODEL" in msg
    assert not settings.models_dir.exists() or not any(settings.models_dir.iterdir())


@pytest.mark.parametrize(
    "error",
    [
        LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder; check your connection"),
        OfflineModeIsEnabled("offline"),
        httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
        TimeoutError("timed out"),
    ],
    ids=["local-entry-not-found", "offline-mode", "connect-error", "timeout"],
)
def test_pull_with_the_hub_unreachable(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, online: None, tiny_clipseg_dir: Path, error: BaseException
) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_clipseg_dir, fail_after=0, error=error))
    with pytest.raises(ModelNotAvailableError) as err:
        models.pull("clipseg", settings, progress=False)
    assert "automask models pull clipseg" in err.value.message and type(error).__name__ in err.value.message
    assert "HF_HUB_OFFLINE" not in err.value.message  # not set: before, the message said to unset it
    assert list(settings.models_dir.iterdir()) == []


def test_pull_downloads_atomically_and_writes_the_marker(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, online: None, tiny_clipseg_dir: Path
) -> None:
    target = settings.models_dir / "clipseg"
    seen: list[bool] = []

    class Watching(FakeHub):
        def __call__(self, repo_id: str, **kw: Any) -> str:
            if not kw.get("local_files_only"):
                seen.append(target.exists())  # the final folder must not exist while the download runs
            return super().__call__(repo_id, **kw)

    hub = Watching(tiny_clipseg_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    assert models.pull("clipseg", settings, progress=False) == target
    assert seen == [False]
    [call] = hub.calls
    assert call["repo_id"] == REPO
    assert call["local_dir"] == settings.models_dir / ".clipseg.partial"  # the same at every try: it resumes
    assert "*.safetensors" in call["allow_patterns"] and not any(p.endswith(".bin") for p in call["allow_patterns"])
    marker = json.loads((target / models.MARKER).read_text())
    assert marker == {"name": "clipseg", "backend": "clipseg", "repos": [REPO]}
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    assert not (target / ".cache").exists()
    assert sorted(p.name for p in settings.models_dir.iterdir()) == ["clipseg"]  # no temp folder left
    found = models.resolve("clipseg", settings)
    assert (found.name, found.backend, found.path) == ("clipseg", "clipseg", target)
    backend = MaskGenerator("clipseg", settings).backend
    assert (backend.name, backend.model_id) == ("clipseg", "clipseg")  # results name it, not the folder
    # installed: a second pull is a no-op that does not reach the hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    assert models.pull("clipseg", settings) == target


def test_pull_falls_back_to_bin_weights(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, online: None, tiny_clipseg_dir: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_clipseg_dir, repo)
    (repo / "model.safetensors").rename(repo / "pytorch_model.bin")
    (repo / "training_args.bin").write_bytes(b"not needed")
    hub = FakeHub(repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    target = models.pull("clipseg", settings, progress=False)
    assert [c["allow_patterns"] for c in hub.calls][1] == list(install.FALLBACK_WEIGHTS)
    assert (target / "pytorch_model.bin").is_file() and not (target / "training_args.bin").exists()


def test_pull_of_a_repo_without_weights_leaves_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, online: None, tiny_clipseg_dir: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_clipseg_dir, repo)
    (repo / "model.safetensors").unlink()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(repo))
    with pytest.raises(ModelNotAvailableError, match="no model weights"):
        models.pull("clipseg", settings, progress=False)
    assert list(settings.models_dir.iterdir()) == []


def test_a_failure_midway_leaves_nothing_and_keeps_an_old_install(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, online: None, tiny_clipseg_dir: Path
) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_clipseg_dir, fail_after=2))
    with pytest.raises(ModelNotAvailableError, match="ConnectError") as err:
        models.pull("clipseg", settings, progress=False)
    partial = settings.models_dir / ".clipseg.partial"
    assert f"kept in '{partial}': automask models pull clipseg resumes" in err.value.message
    assert [p.name for p in settings.models_dir.iterdir()] == [partial.name]  # hidden: nothing loads it
    assert not models.is_installed("clipseg", settings) and not (settings.models_dir / "clipseg").exists()
    # a complete install survives a failed forced re-pull untouched
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_clipseg_dir))
    target = models.pull("clipseg", settings, progress=False)
    before = sorted(p.name for p in target.iterdir())
    assert [p.name for p in settings.models_dir.iterdir()] == ["clipseg"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_clipseg_dir, fail_after=1))
    with pytest.raises(ModelNotAvailableError):
        models.pull("clipseg", settings, progress=False, force=True)
    assert sorted(p.name for p in target.iterdir()) == before
    assert sorted(p.name for p in settings.models_dir.iterdir()) == [partial.name, "clipseg"]
    # and a forced re-pull that succeeds replaces it
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_clipseg_dir))
    assert models.pull("clipseg", settings, progress=False, force=True) == target
    assert models.is_installed("clipseg", settings)
    assert [p.name for p in settings.models_dir.iterdir()] == ["clipseg"]


def test_pull_into_an_unwritable_data_dir(tmp_path: Path, online: None) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelNotAvailableError, match="AUTOMASK_DATA_DIR"):
        models.pull("clipseg", Settings(data_dir=blocker), progress=False)


def test_pull_of_an_unknown_name_lists_the_valid_ones(settings: Settings) -> None:
    with pytest.raises(UnknownModelError, match="clipseg"):
        models.pull("sam-9000", settings)


def test_resolve_a_local_folder(tiny_clipseg_dir: Path, settings: Settings) -> None:
    found = models.resolve(str(tiny_clipseg_dir), settings)
    assert (found.backend, found.path, found.name) == ("clipseg", tiny_clipseg_dir, str(tiny_clipseg_dir))


def test_resolve_an_unknown_name_lists_the_valid_ones(settings: Settings) -> None:
    with pytest.raises(UnknownModelError) as err:
        models.resolve("no-such-model", settings)
    assert "'no-such-model'" in err.value.message and "clipseg" in err.value.message


def test_resolve_a_missing_folder_says_so(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="No model folder at"):
        models.resolve(str(tmp_path / "nowhere"), settings)


def test_resolve_an_uninstalled_model_names_the_pull_command(settings: Settings) -> None:
    with pytest.raises(ModelNotAvailableError, match="automask models pull clipseg"):
        models.resolve("clipseg", settings)


def test_resolve_a_folder_of_an_unsupported_model(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelNotAvailableError, match="model_type 'bert'"):
        models.resolve(str(tmp_path), settings)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"backend": "clipseg"', "not a JSON object"),
        (b'["clipseg"]', "not a JSON object"),
        (b'{"name": "clipseg"}', 'names no "backend"'),
        (b'{"backend": ""}', 'names no "backend"'),
        (b"\xff\xfe{}", "cannot be read"),
    ],
)
def test_a_damaged_marker_says_to_re_pull(settings: Settings, content: bytes, problem: str) -> None:
    folder = models.model_dir("clipseg", settings)
    folder.mkdir(parents=True)
    (folder / models.MARKER).write_bytes(content)
    with pytest.raises(ModelNotAvailableError) as info:
        models.resolve(str(folder), settings)
    assert problem in info.value.message
    assert str(folder / models.MARKER) in info.value.message and "automask models pull clipseg" in info.value.message


def test_automask_model_env_points_at_a_folder(tiny_clipseg_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOMASK_MODEL", str(tiny_clipseg_dir))
    settings = Settings()
    assert settings.model == str(tiny_clipseg_dir)
    assert models.resolve(None, settings).path == tiny_clipseg_dir
    gen = MaskGenerator(settings=settings)
    assert gen.backend.name == "clipseg" and gen.backend.model_id == str(tiny_clipseg_dir)


def _fake_hf_cache(tiny: Path) -> Path:
    """Lay `tiny` out as the Hugging Face cache holds a downloaded CIDAS/clipseg-rd64-refined."""
    root = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--CIDAS--clipseg-rd64-refined"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    shutil.copytree(tiny, snapshot)
    return snapshot


def test_resolve_falls_back_to_the_hf_cache(
    tiny_clipseg_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = _fake_hf_cache(tiny_clipseg_dir)
    found = models.resolve("clipseg", settings)
    assert (found.name, found.backend, found.path) == ("clipseg", "clipseg", snapshot)
    info = _info(settings, "clipseg")
    assert info.installed and info.source == "hf-cache" and info.path == snapshot
    assert MaskGenerator("clipseg", settings).backend.model_id == "clipseg"  # its name, not the cache path


def test_an_hf_cache_snapshot_without_weights_is_not_used(tiny_clipseg_dir: Path, settings: Settings) -> None:
    snapshot = _fake_hf_cache(tiny_clipseg_dir)
    (snapshot / "model.safetensors").unlink()
    assert models.hf_cached("clipseg") is None
    with pytest.raises(ModelNotAvailableError, match="automask models pull clipseg"):
        models.resolve("clipseg", settings)


def test_an_hf_cache_snapshot_missing_unneeded_files_is_used(
    tiny_clipseg_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub calls a snapshot incomplete when files of the repo listing are missing (e.g. a snapshot made by
    from_pretrained, without merges.txt); with config and weights present it still loads."""
    from huggingface_hub.errors import IncompleteSnapshotError

    snapshot = _fake_hf_cache(tiny_clipseg_dir)

    def incomplete(*args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("local_files_only")
        raise IncompleteSnapshotError("1 file(s) are missing (merges.txt)", snapshot_path=str(snapshot))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    assert models.resolve("clipseg", settings).path == snapshot
    (snapshot / "model.safetensors").unlink()
    assert models.hf_cached("clipseg") is None


def _info(settings: Settings, name: str) -> models.ModelInfo:
    infos = models.list_models(settings)
    assert [i.name for i in infos] == list(models.CATALOGUE)
    return next(i for i in infos if i.name == name)


def test_list_models(settings: Settings, monkeypatch: pytest.MonkeyPatch, online: None, tiny_clipseg_dir: Path) -> None:
    info = _info(settings, "clipseg")
    assert (info.name, info.backend, info.installed, info.source) == ("clipseg", "clipseg", False, "")
    assert info.path == settings.models_dir / "clipseg" and "CLIPSeg" in info.description
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_clipseg_dir))
    models.pull("clipseg", settings, progress=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    info = _info(settings, "clipseg")
    assert info.installed and info.source == "data-dir" and info.path == settings.models_dir / "clipseg"


def test_results_name_a_model_by_its_catalogue_name_or_hub_repository(settings: Settings, tmp_path: Path) -> None:
    pulled = settings.models_dir / "grounded-sam"
    part = pulled / "facebook--sam-vit-base"
    part.mkdir(parents=True)
    (pulled / models.MARKER).write_text("{}")
    assert models.name_of(pulled) == "grounded-sam"
    assert models.name_of(part) == "facebook/sam-vit-base"  # the mask head of a pulled grounded model
    cache = tmp_path / "hub"
    assert models.name_of(cache / "models--facebook--sam-vit-base" / "snapshots" / "0abc") == "sam"
    assert models.name_of(cache / "models--someone--my-clipseg" / "snapshots" / "0abc") == "someone/my-clipseg"
    assert models.name_of(tmp_path / "clipseg") == str(tmp_path / "clipseg")  # a folder of the user's: its path


def test_repo_folder() -> None:
    assert models.repo_folder("IDEA-Research/grounding-dino-tiny") == "IDEA-Research--grounding-dino-tiny"


@pytest.mark.parametrize("config", ["{", "[1, 2]", '{"architectures": ["CLIPSegForImageSegmentation"]}'])
def test_a_folder_whose_config_json_names_no_model_type_says_so(tmp_path: Path, config: str) -> None:
    """Before: a damaged config.json (cut short, not an object, or without model_type) was reported as "has model_type
    'None', which automask cannot run", blaming an architecture instead of the file."""
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelNotAvailableError) as err:
        models.detect_backend(tmp_path)
    assert err.value.message == (
        f"'{tmp_path / 'config.json'}' is damaged: it is not a JSON object naming a model_type. Save the model "
        "again with save_pretrained, or pull one: automask models pull clipseg"
    )


@pytest.mark.parametrize("marked", [True, False], ids=["pulled", "save_pretrained"])
def test_a_mask_head_folder_given_as_the_model_says_it_reads_no_prompt(tmp_path: Path, marked: bool) -> None:
    """Before: `--model` at a SAM folder said "Unknown backend 'sam'. Valid backends: ..." (a pulled one) or "has
    model_type 'sam', which automask cannot run" (a save_pretrained one), where `--model sam` says what SAM is for."""
    folder = tmp_path / "sam"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "sam"}))
    if marked:
        (folder / models.MARKER).write_text(json.dumps({"name": "sam", "backend": "sam", "repos": []}))
    with pytest.raises(UnknownModelError) as err:
        models.resolve(str(folder), Settings(data_dir=tmp_path / "data"))
    assert err.value.message == (
        f"'{folder}' reads no text prompt: it sharpens CLIPSeg masks with refine=true (--refine). "
        "Use --model clipseg with refine, or --model grounded-sam."
    )


def test_pull_onto_a_full_disk_says_to_free_space_not_to_check_the_network(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, online: None, tiny_clipseg_dir: Path
) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_clipseg_dir, fail_after=1, error=full))
    with pytest.raises(ModelNotAvailableError) as err:
        models.pull("clipseg", settings, progress=False)
    msg = err.value.message
    assert "is full" in msg and "AUTOMASK_DATA_DIR" in msg and str(settings.models_dir) in msg
    assert "Check the network" not in msg
    partial = settings.models_dir / ".clipseg.partial"  # kept, to resume once there is room; the message says so
    assert f"kept in '{partial}'" in msg and "delete that folder to free the space" in msg
    assert [p.name for p in settings.models_dir.iterdir()] == [partial.name]


def test_a_data_dir_given_with_a_tilde_is_under_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AUTOMASK_DATA_DIR=~/automask from an env file, a service unit or `--data-dir=~/automask` (no shell expands
    it): models were pulled into a folder literally named '~' under the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AUTOMASK_DATA_DIR", "~/automask")
    assert Settings().models_dir == tmp_path / "home" / "automask" / "models"
    assert Settings(data_dir=Path("~/other")).data_dir == tmp_path / "home" / "other"


def test_pull_force_repairs_a_damaged_install_the_load_error_points_at(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, online: None, tiny_clipseg_dir: Path
) -> None:
    """A pulled model whose weights were damaged (a disk error, a copy cut short) fails to load with 'Re-download it
    with: automask models pull clipseg'; but that pull saw the marker and did nothing, and the CLI had no --force."""
    from automask import cli_models
    from automask.cli import main

    monkeypatch.setattr(cli_models, "_export_after_pull", lambda *a: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_clipseg_dir))
    target = models.pull("clipseg", settings, progress=False)
    (target / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ModelNotAvailableError) as err:
        MaskGenerator("clipseg", settings)
    fix = err.value.message.split("Re-download it with: ")[1]
    assert fix == "automask models pull clipseg --force"
    result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), *fix.split()[1:]])
    assert result.exit_code == 0, result.output
    assert (target / "model.safetensors").read_bytes() == (tiny_clipseg_dir / "model.safetensors").read_bytes()
    assert MaskGenerator("clipseg", settings).backend.model_id == "clipseg"


def test_models_list_json_is_valid_utf8_json_for_a_data_dir_that_is_not_utf8(tmp_path: Path) -> None:
    """A data folder whose name is not UTF-8 (read as surrogates) came out as lone-surrogate escapes ("\\udcff"),
    which strict JSON parsers reject; other --json outputs write such a byte as the text \\xNN (`json_safe`)."""
    from automask.cli import main

    data = tmp_path / os.fsdecode(b"data\xff")
    result = CliRunner().invoke(main, ["models", "list", "--json"], env={"AUTOMASK_DATA_DIR": str(data)})
    assert result.exit_code == 0, result.output
    assert "\\ud" not in result.stdout
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["clipseg"]["path"] == str(tmp_path / "data\\xff" / "models" / "clipseg")


def test_an_uninstalled_model_in_offline_mode_says_both_facts_and_the_fix(settings: Settings) -> None:
    """The suite runs with HF_HUB_OFFLINE=1: the error said only 'Install it with: automask models pull sam3',
    which then failed naming HF_HUB_OFFLINE; the first message must already say downloads are off and how."""
    with pytest.raises(ModelNotAvailableError) as err:
        models.resolve("sam3", settings)
    message = err.value.message
    assert "'sam3' is not installed" in message and "HF_HUB_OFFLINE" in message
    assert "automask models pull sam3" in message and "--model" in message


def test_pull_offline_takes_a_cached_model_over_a_download_a_failed_pull_kept(
    tiny_clipseg_dir: Path, settings: Settings
) -> None:
    """The Hugging Face cache holds the model complete and a failed pull kept half a download: the pull (offline,
    as the suite runs) takes the cache's files and leaves none of the half download in the installed folder."""
    _fake_hf_cache(tiny_clipseg_dir)
    kept = settings.models_dir / ".clipseg.partial" / ".cache" / "automask"
    kept.mkdir(parents=True)
    (kept / f"model.safetensors.{'0' * 64}.incomplete").write_bytes(b"half")
    target = models.pull("clipseg", settings, progress=False)
    assert (target / "model.safetensors").read_bytes() == (tiny_clipseg_dir / "model.safetensors").read_bytes()
    assert not (target / ".cache").exists() and models.resolve("clipseg", settings).path == target
    assert [p.name for p in settings.models_dir.iterdir()] == ["clipseg"]


def test_models_list_tells_of_a_download_a_failed_pull_kept(settings: Settings) -> None:
    """What a failed pull kept to resume (GBs for sam3) is in a hidden folder: the listing says where."""
    from automask.cli import main

    kept = settings.models_dir / ".sam3.partial"
    kept.mkdir(parents=True)
    (kept / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list"])
    assert result.exit_code == 0, result.output
    assert f"sam3: The 2.0 MB downloaded so far are kept in '{kept}'" in result.stderr


@pytest.mark.parametrize("form", [[], ["--json"]], ids=["table", "json"])
def test_models_list_tidies_what_killed_installers_left_in_either_form(settings: Settings, form: list[str]) -> None:
    """The table form removes what killed pulls and removals left (an abandoned staging folder, an empty kept one
    and its lock, a removal's `.removing` folder: GBs, for good) and says where a failed pull's download waits.
    Before: `--json` (what scripts call) did neither, so those stayed until someone ran
    the table form. Now both forms tidy and tell alike; the JSON on standard output is unchanged."""
    from automask.cli import main

    models_dir = settings.models_dir
    models_dir.mkdir(parents=True)
    for leftover in (".clipseg-0dead000.partial", ".clipseg-0dead001.removing", ".clipseg.partial"):
        (models_dir / leftover).mkdir()
    (models_dir / ".clipseg-0dead001.removing" / "model.safetensors").write_bytes(b"\0" * 1000)
    (models_dir / ".clipseg.partial.lock").touch()
    kept = models_dir / ".sam3.partial"
    kept.mkdir()
    (kept / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list", *form])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in models_dir.iterdir()) == [".sam3.partial"]
    assert f"sam3: The 2.0 MB downloaded so far are kept in '{kept}'" in result.stderr
    if form:
        assert {row["name"] for row in json.loads(result.stdout)} == set(models.CATALOGUE)


@pytest.mark.parametrize("form", [[], ["--json"]], ids=["table", "json"])
def test_models_list_reads_a_models_folder_it_cannot_write(
    settings: Settings, form: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only models folder (a read-only volume, or one another user pulled into) holding a killed pull's kept
    download and its lock file. Before: asking whether a pull held that lock opened the file for writing, and the
    EROFS / EACCES escaped: `models list` (now its `--json` too) was an internal error (exit 70). Now it asks
    through a read-only descriptor, and says the download is kept."""
    from automask.cli import main

    kept = settings.models_dir / ".sam3.partial"
    kept.mkdir(parents=True)
    (kept / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    lock = settings.models_dir / ".sam3.partial.lock"
    lock.touch()
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:  # the file system answers as a read-only one
        if Path(path).parent == settings.models_dir and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list", *form])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"sam3: The 2.0 MB downloaded so far are kept in '{kept}'" in result.stderr
    assert lock.exists() and kept.is_dir()


def test_huggingface_hub_releases_before_0_25_with_their_errors_in_utils(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyproject allows huggingface_hub 0.23, whose HTTP errors are in `huggingface_hub.utils` alone (moved to
    `huggingface_hub.errors` in 0.25): `models list` and `models pull` failed there with an ImportError."""
    import sys
    import types
    from types import SimpleNamespace

    import huggingface_hub.errors as errors

    models.list_models(settings)  # the hub's own modules imported before its errors module is swapped
    names = ("HfHubHTTPError", "LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError")
    utils = types.ModuleType("huggingface_hub.utils")
    for name in (*names, "OfflineModeIsEnabled"):
        setattr(utils, name, getattr(errors, name))
    before_0_25 = types.ModuleType("huggingface_hub.errors")
    before_0_25.OfflineModeIsEnabled = errors.OfflineModeIsEnabled  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub.errors", before_0_25)
    monkeypatch.setitem(sys.modules, "huggingface_hub.utils", utils)
    assert {"HfHubHTTPError", "LocalEntryNotFoundError"} <= {c.__name__ for c in install.hub_errors()}
    assert [m.name for m in models.list_models(settings)] == list(models.CATALOGUE)
    assert not models._is_gated_error(OSError("no"))
    rejected = OSError("401 Client Error")
    rejected.response = SimpleNamespace(status_code=401)  # type: ignore[attr-defined]
    message = install.download_failure("clipseg", "x/y", settings.models_dir, rejected)
    assert "rejected the Hugging Face token" in message


def test_a_pulled_model_left_moved_aside_by_a_killed_pull_resolves_again(settings: Settings) -> None:
    """A `models pull --force` killed (SIGKILL) between the two renames of its swap left the installed model hidden
    as `.NAME-xxxx.old`: resolve and `models list` said it was not installed. The next look puts it back."""
    hidden = settings.models_dir / ".clipseg-0123abcd.old"
    hidden.mkdir(parents=True)
    (hidden / models.MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    assert models.resolve("clipseg", settings).path == settings.models_dir / "clipseg"
    assert _info(settings, "clipseg").installed and not hidden.exists()


def test_a_full_disk_while_downloading_one_part_of_a_model_names_the_models_folder(settings: Settings) -> None:
    """A multi-repository model downloads each part into a subfolder of its staging folder: a full disk named that
    hidden `.grounded-sam.partial` folder instead of the models folder the user can move (AUTOMASK_DATA_DIR)."""
    part = settings.models_dir / ".grounded-sam.partial" / "facebook--sam-vit-base"
    full = OSError(errno.ENOSPC, "No space left on device")
    message = install.download_failure("grounded-sam", "facebook/sam-vit-base", part, full)
    assert f"The disk holding '{settings.models_dir}' is full" in message
