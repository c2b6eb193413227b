"""The lock a run holds while it loads a model of the data folder (`staging.reading`), against `models rm` and pulls:
what the second look at branch cliopen2 found. Locks are taken on their own open files, as another process's are
(`flock` locks belong to the open file, so one process stands for two)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from automask import lockfiles, models, staging
from automask.cli import main
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
