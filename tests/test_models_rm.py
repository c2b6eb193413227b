"""`automask models rm NAME`: deletes a model from the data folder, atomically, under its installers' lock; never
the Hugging Face cache. Through the real CLI (CliRunner, a subprocess for a kill midway)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from automask import lockfiles, models, staging
from automask.backends.clipseg_common import onnx_dir
from automask.cli import main
from automask.settings import Settings
from test_models import _fake_hf_cache


def _rm(settings: Settings, *args: str) -> Result:
    return CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "rm", *args])


def _installed(settings: Settings) -> dict[str, dict[str, object]]:
    result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list", "--json"])
    assert result.exit_code == 0, result.output
    return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture()
def pulled(settings: Settings, tiny_clipseg_dir: Path) -> Iterator[Path]:
    """clipseg as `models pull` installs it in the data folder, with an ONNX export (its files, not real graphs)."""
    folder = models.model_dir("clipseg", settings)
    shutil.copytree(tiny_clipseg_dir, folder)
    (folder / models.MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    onnx_dir(folder).mkdir()
    (onnx_dir(folder) / "image.onnx").write_bytes(b"graph")
    yield folder


def test_rm_deletes_the_model_its_export_and_what_failed_pulls_left(settings: Settings, pulled: Path) -> None:
    """There was no `models rm`: users deleted folders by hand, and a stale `.clipseg-xxxxxxxx.old` that a killed
    pull had left came back as the installed model at the next look (`staging.recover`)."""
    models_dir = settings.models_dir
    stale = models_dir / ".clipseg-0123abcd.old"
    shutil.copytree(pulled, stale)
    kept = models_dir / ".clipseg.partial"
    kept.mkdir()
    (kept / "model.safetensors").write_bytes(b"\0" * 1000)  # a failed pull's kept download
    assert _installed(settings)["clipseg"]["installed"] is True
    result = _rm(settings, "clipseg")
    assert result.exit_code == 0, result.output
    assert f"removed {pulled}" in result.stdout and f"removed {kept}" in result.stdout
    assert sorted(p.name for p in models_dir.iterdir()) == []
    assert _installed(settings)["clipseg"]["installed"] is False
    again = _rm(settings, "clipseg")
    assert again.exit_code == 4
    assert f"The model 'clipseg' is not installed in '{models_dir}': nothing to remove" in again.stderr


def test_rm_refuses_while_a_pull_or_an_export_of_the_model_runs(settings: Settings, pulled: Path) -> None:
    before = sorted(p.relative_to(pulled) for p in pulled.rglob("*"))
    with staging.resumable_staging(pulled):
        busy = _rm(settings, "clipseg")
    assert busy.exit_code == 10, busy.output
    assert "error: The model 'clipseg' is not removed: a pull of it is running." in busy.stderr
    with staging.staging(onnx_dir(pulled)):
        busy = _rm(settings, "clipseg")
    assert busy.exit_code == 10, busy.output
    assert "an export of it is running" in busy.stderr
    assert sorted(p.relative_to(pulled) for p in pulled.rglob("*")) == before
    assert [p.name for p in settings.models_dir.iterdir() if p.name.startswith(".")] == []


def test_rm_waits_for_a_brief_holder_of_the_lock(settings: Settings, pulled: Path) -> None:
    """`models list` (tidying, putting back) holds the model's lock for a moment: an rm at that moment said a pull was
    running and removed nothing. It waits for such a brief holder."""
    hub = settings.models_dir / ".clipseg.partial.lock"
    fd = lockfiles.lock(hub, wait=False)
    threading.Timer(0.3, lockfiles.unlock, (hub, fd)).start()
    result = _rm(settings, "clipseg")
    assert result.exit_code == 0, result.output
    assert not pulled.exists()


def test_rm_refused_for_a_long_tidying_does_not_say_a_pull_runs(settings: Settings, pulled: Path) -> None:
    """A tidying (`models list`, or putting back what a killed installer moved aside) deleting a killed removal's
    GBs on a slow disk may hold the model's lock past rm's patience. Before: rm then said "a pull of it is running"
    (what an unnamed holder is taken for), though the lock file said "tidying". Now it says what holds it."""
    hub = settings.models_dir / ".clipseg.partial.lock"
    fd = lockfiles.lock(hub, wait=False, by=lockfiles.TIDYING)
    try:
        busy = _rm(settings, "clipseg")
    finally:
        lockfiles.unlock(hub, fd)
    assert busy.exit_code == 10, busy.output
    assert "The model 'clipseg' is not removed: automask's tidying of it is running." in busy.stderr
    assert "pull" not in busy.stderr and pulled.exists()


def test_rm_puts_the_model_back_when_an_export_began_as_it_was_moved_aside(
    settings: Settings, pulled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export that takes its lock between rm's look and its rename: the model is put back, untouched."""
    rename_aside = staging._rename_aside
    exports = []

    def export_begins(paths: list[Path], folder: Path) -> dict[Path, Path]:
        moved = rename_aside(paths, folder)
        exports.append(staging.staging(onnx_dir(moved[folder])))
        exports[-1].__enter__()
        return moved

    monkeypatch.setattr(staging, "_rename_aside", export_begins)
    busy = _rm(settings, "clipseg")
    exports[0].__exit__(None, None, None)
    assert busy.exit_code == 10 and "an export of it is running" in busy.stderr
    assert (onnx_dir(pulled) / "image.onnx").read_bytes() == b"graph"
    assert _installed(settings)["clipseg"]["installed"] is True


def test_rm_refuses_while_an_older_automask_may_be_exporting_without_a_lock(settings: Settings, pulled: Path) -> None:
    """An export by an older automask stages in `.onnx-tmp-xxxxxxxx` and takes no lock: rm deleted the model folder
    under it (the export failed, its minutes lost). Now rm refuses while such a folder was written in the last hour
    (the rule `models list` keeps it by), and says which one; an older one is a killed export's, removed with the
    model."""
    unlocked = pulled / ".onnx-tmp-0123abcd"
    unlocked.mkdir()
    (unlocked / "image.onnx").write_bytes(b"half a graph")
    busy = _rm(settings, "clipseg")
    assert busy.exit_code == 10, busy.output
    assert "The model 'clipseg' is not removed: an export of it by an older automask may be running" in busy.stderr
    assert f"'{unlocked}' was written" in busy.stderr
    assert (unlocked / "image.onnx").read_bytes() == b"half a graph" and models.is_installed("clipseg", settings)
    two_hours_ago = time.time() - 7200
    for path in (unlocked / "image.onnx", unlocked):
        os.utime(path, (two_hours_ago, two_hours_ago))
    result = _rm(settings, "clipseg")
    assert result.exit_code == 0, result.output
    assert not pulled.exists()


def test_rm_killed_midway_leaves_no_half_model_that_list_shows(settings: Settings, pulled: Path) -> None:
    """Killed (SIGKILL) while deleting: `models list` shows the model not installed (not a half folder, nor the
    stale `.old` put back), and removes what the removal had moved aside."""
    shutil.copytree(pulled, settings.models_dir / ".clipseg-0123abcd.old")
    kill = textwrap.dedent(
        """
        import os, signal, sys
        from automask import staging
        from automask.cli import main
        staging._discard = lambda old: os.kill(os.getpid(), signal.SIGKILL)
        main(["--data-dir", sys.argv[1], "models", "rm", "clipseg"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", kill, str(settings.data_dir)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    left = sorted(p.name for p in settings.models_dir.iterdir())
    assert [n for n in left if n.endswith(staging.REMOVING)] == left[:2] and left[2:] == [".clipseg.partial.lock"]
    assert _installed(settings)["clipseg"]["installed"] is False
    listing = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list"])
    assert listing.exit_code == 0, listing.output
    assert list(settings.models_dir.iterdir()) == []


def test_rm_of_a_model_read_from_the_hf_cache_deletes_nothing_there(
    settings: Settings, tiny_clipseg_dir: Path, pulled: Path
) -> None:
    """The Hugging Face cache is shared with other programs: rm says where the model is and how to delete it there;
    the data folder's copy is deleted, with a note that the cache still holds it."""
    snapshot = _fake_hf_cache(tiny_clipseg_dir)
    result = _rm(settings, "clipseg")
    assert result.exit_code == 0, result.output
    assert f"note: clipseg is still installed from the Hugging Face cache, '{snapshot}'" in result.stderr
    refused = _rm(settings, "clipseg")
    assert refused.exit_code == 4, refused.output
    assert f"it is read from the Hugging Face cache, '{snapshot}'" in refused.stderr
    assert "automask does not delete it. To delete it there: hf cache rm model/CIDAS/clipseg-rd64-refined" in (
        refused.stderr
    )
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_clipseg_dir / "model.safetensors").read_bytes()
    assert _installed(settings)["clipseg"]["source"] == "hf-cache"


@pytest.mark.parametrize("name", ["nope", "./clipseg"])
def test_rm_of_an_unknown_name_is_a_usage_error_naming_models_list(settings: Settings, name: str) -> None:
    result = _rm(settings, name)
    assert result.exit_code == 2, result.output
    assert f"no model '{name}': automask models list shows the models." in result.stderr


def test_rm_of_a_model_folder_that_is_a_link_says_the_folder_it_points_to_is_kept(
    settings: Settings, tiny_clipseg_dir: Path, tmp_path: Path
) -> None:
    """A model folder that is a symbolic link (the weights on a bigger disk): rm deletes the link, not the folder it
    points to, yet said only "removed <link>": the user took the space for freed, and the model for deleted."""
    target = tmp_path / "big-disk" / "clipseg"
    shutil.copytree(tiny_clipseg_dir, target)
    (target / models.MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    link = models.model_dir("clipseg", settings)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    result = _rm(settings, "clipseg")
    assert result.exit_code == 0, result.output
    assert f"removed {link}" in result.stdout
    assert f"note: '{link}' was a link: the folder it points to, '{target}', is kept" in result.stderr
    assert (target / "model.safetensors").is_file() and not os.path.lexists(link)
    link.symlink_to(tmp_path / "gone")  # a dangling link: nothing is kept
    dangling = _rm(settings, "clipseg")
    assert dangling.exit_code == 0 and f"removed {link}" in dangling.stdout and "note:" not in dangling.stderr


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of a byte into a file fails as on a full disk (ENOSPC); creating, renaming, deleting still work."""
    import errno

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "write", full)


def test_rm_frees_a_full_disk(settings: Settings, pulled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the lock taken to remove wrote its holder's name ("removal") into the lock file, and on a full disk
    (or a full quota) that write failed: `models rm`, what one runs to free the space, said "Cannot remove from the
    models folder (No space left on device)" and removed nothing. The name is a courtesy to a waiting pull: now a
    lock is taken without it when it cannot be written."""
    _disk_full(monkeypatch)
    result = _rm(settings, "clipseg")
    assert result.exit_code == 0, result.output
    assert f"removed {pulled}" in result.stdout
    assert not pulled.exists()
    assert sorted(p.name for p in settings.models_dir.iterdir()) == []


def test_models_list_tidies_on_a_full_disk(settings: Settings, pulled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Likewise `models list` tidying (its lock says "tidying"): on a full disk it silently left a killed removal's
    `.removing` folder (GBs) in place."""
    leftover = settings.models_dir / ".clipseg-0dead001.removing"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    _disk_full(monkeypatch)
    assert _installed(settings)["clipseg"]["installed"] is True
    assert not leftover.exists()
    assert sorted(p.name for p in settings.models_dir.iterdir()) == ["clipseg"]


@pytest.mark.parametrize(
    ("by", "said"),
    [
        (lockfiles.TIDYING, "clipseg: The 3.0 MB downloaded so far are kept in '{kept}': automask models pull clipseg"),
        (lockfiles.REMOVAL, "clipseg: A removal of clipseg (automask models rm) is running: it deletes the 3.0 MB"),
        (lockfiles.PULL, "clipseg: A pull of clipseg is running: 3.0 MB downloaded so far, in '{kept}'."),
        (lockfiles.LOADING, "clipseg: The 3.0 MB downloaded so far are kept in '{kept}': automask models pull clipseg"),
    ],
)
def test_models_list_says_what_holds_a_kept_download(settings: Settings, by: str, said: str) -> None:
    """A failed pull's kept download while the model's lock is held by a tidying (another `models list` putting back
    or deleting what killed installers left: GBs maybe), a removal (`models rm`, before it renames it aside) or a
    pull. Before: `models list` said "A pull of clipseg is running" whichever held it; the lock file names its
    holder: now the note says what really runs (a tidying keeps the download: the usual note). A run loading the
    installed model (its shared lock) was taken for a pull too; it keeps the download: the usual note."""
    kept = settings.models_dir / ".clipseg.partial"
    kept.mkdir(parents=True)
    (kept / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    hub = lockfiles.lock_file(kept)
    loading = by == lockfiles.LOADING
    fd = lockfiles.lock(hub, wait=False, by="" if loading else by, shared=loading)
    try:
        listing = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "list", "--json"])
    finally:
        lockfiles.unlock(hub, fd)
    assert listing.exit_code == 0, listing.output
    assert said.format(kept=kept) in listing.stderr, listing.stderr
    assert (kept / "model.safetensors").stat().st_size == 3_000_000
