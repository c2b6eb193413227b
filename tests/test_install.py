"""automask.staging (and automask.install): the staging folder and atomic folder swap every model installer uses."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from automask import lockfiles
from automask import staging as staging_module
from automask.errors import ModelNotAvailableError
from automask.staging import partial_note, replace_dir, resumable_staging, staging


def _folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights").write_text(content)
    return path


def test_replace_dir_swaps_in_the_new_folder_and_removes_the_old(tmp_path: Path) -> None:
    dest = _folder(tmp_path / "models" / "m", "old")
    replace_dir(_folder(tmp_path / "models" / ".m-new", "new"), dest)
    assert (dest / "weights").read_text() == "new"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]
    replace_dir(_folder(tmp_path / "models" / ".m-fresh", "fresh"), tmp_path / "models" / "n")  # nothing to replace
    assert (tmp_path / "models" / "n" / "weights").read_text() == "fresh"


def test_ctrl_c_between_the_two_renames_never_leaves_the_model_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `models pull --force` interrupted after the old model was moved aside, before the new one was renamed in,
    left no model at all (only a hidden `.m-xxxx.old`). The interrupt now takes effect after both renames."""
    dest = _folder(tmp_path / "models" / "m", "old")
    move_aside = staging_module._move_aside

    def interrupted(path: Path) -> Path | None:
        moved = move_aside(path)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right between the renames
        return moved

    monkeypatch.setattr(staging_module, "_move_aside", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(_folder(tmp_path / "models" / ".m-new", "new"), dest)
    assert (dest / "weights").read_text() == "new"


def test_ctrl_c_received_by_another_thread_still_waits_for_the_two_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel gives a process's SIGINT to any thread not blocking it (a pull has the hub's and tqdm's threads):
    blocking it in the installing thread only did not stop Python running the handler between the renames."""
    dest = _folder(tmp_path / "models" / "m", "old")
    move_aside = staging_module._move_aside

    go, sent = threading.Event(), threading.Event()

    def send() -> None:  # started before replace_dir: a thread starts with its creator's blocked signals
        go.wait()
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        sent.set()

    def interrupted(path: Path) -> Path | None:
        moved = move_aside(path)
        go.set()
        sent.wait()
        return moved

    other = threading.Thread(target=send)
    other.start()

    monkeypatch.setattr(staging_module, "_move_aside", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(_folder(tmp_path / "models" / ".m-new", "new"), dest)
    other.join()
    assert (dest / "weights").read_text() == "new"


def test_replace_dir_over_a_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    shared = _folder(tmp_path / "shared", "shared")
    dest = tmp_path / "models" / "m"
    dest.parent.mkdir()
    dest.symlink_to(shared, target_is_directory=True)
    replace_dir(_folder(tmp_path / "models" / ".m-new", "new"), dest)
    assert not dest.is_symlink() and (dest / "weights").read_text() == "new"
    assert (shared / "weights").read_text() == "shared"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


def test_replace_dir_over_a_file_removes_the_file_moved_aside(tmp_path: Path) -> None:
    """A regular file where the model folder goes was moved aside, then `rmtree` failed on it silently: a hidden
    `.m-xxxx.old` file stayed beside the model for good, and `recover` (which removes such leftovers) kept it too."""
    dest = tmp_path / "models" / "m"
    dest.parent.mkdir()
    dest.write_text("not a model")
    replace_dir(_folder(tmp_path / "models" / ".m-new", "new"), dest)
    assert (dest / "weights").read_text() == "new"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]
    (dest.parent / ".m-0000000a.old").write_text("a file a killed installer moved aside")
    staging_module.recover(dest)
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = _folder(tmp_path / "models" / "m", "old")
    new = _folder(tmp_path / "models" / ".m-new", "new")
    real = os.replace

    def fail_on_new(src: Any, dst: Any) -> None:
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_new)
    with pytest.raises(OSError, match="No space"):
        replace_dir(new, dest)
    assert (dest / "weights").read_text() == "old"
    assert sorted(p.name for p in dest.parent.iterdir()) == [".m-new", "m"]


def test_staging_is_beside_the_target_and_removed_after(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    with staging(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".m-") and not any(tmp.iterdir())
        (tmp / "partial").write_text("x")
    assert not tmp.exists() and list(target.parent.iterdir()) == []
    with pytest.raises(RuntimeError), staging(target) as tmp:
        raise RuntimeError("download failed")
    assert not tmp.exists()


def test_staging_in_an_unwritable_place_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file where the data folder should be")
    with pytest.raises(ModelNotAvailableError, match="AUTOMASK_DATA_DIR"), staging(tmp_path / "data" / "models" / "m"):
        pass


def test_an_installed_folder_follows_the_umask_not_0700(tmp_path: Path) -> None:
    """A model folder is the staging folder renamed: it must be readable as the umask allows (a server running as
    another user reads a shared AUTOMASK_DATA_DIR), not mkdtemp's owner-only 0700."""
    old = os.umask(0o022)
    try:
        with staging(tmp_path / "models" / "m") as tmp:
            mode = stat.S_IMODE(tmp.stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o755


def test_another_installer_finishing_at_the_same_moment_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes installing one model (workers starting together on a shared data folder): the other's folder
    lands at `dest` between the check and the rename; that rename failed with ENOTEMPTY (an internal error)."""
    dest = tmp_path / "models" / "m"
    new = _folder(tmp_path / "models" / ".m-new", "new")
    real = os.replace
    raced: list[bool] = []

    def other_installer_first(src: Any, dst: Any) -> None:
        if Path(src) == new and not raced:
            raced.append(True)
            real(_folder(tmp_path / "models" / ".m-theirs", "theirs"), dest)
        real(src, dst)

    monkeypatch.setattr(os, "replace", other_installer_first)
    replace_dir(new, dest)
    assert raced and (dest / "weights").read_text() == "new"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


def test_a_folder_another_installer_moves_aside_first_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other process sets the old `dest` aside between this one's look and its own move."""
    dest = _folder(tmp_path / "models" / "m", "old")
    new = _folder(tmp_path / "models" / ".m-new", "new")
    real = os.replace

    def other_installer_first(src: Any, dst: Any) -> None:
        if Path(src) == dest and dest.exists():
            shutil.rmtree(dest)
        real(src, dst)

    monkeypatch.setattr(os, "replace", other_installer_first)
    replace_dir(new, dest)
    assert (dest / "weights").read_text() == "new"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


def test_staging_removes_folders_a_killed_install_left_and_keeps_live_ones(tmp_path: Path) -> None:
    """A pull killed outright (SIGKILL, a power cut) leaves its `.NAME-*.partial` folder, GBs for sam3, which no
    later pull removed. The next staging of that model removes it; one another process still fills is kept."""
    target = tmp_path / "models" / "m"
    dead = _folder(tmp_path / "models" / ".m-0dead000.partial", "half")
    other = _folder(tmp_path / "models" / ".mm-0dead000.partial", "another model's")
    with staging(target) as live:
        assert not dead.exists() and other.exists()
        with staging(target) as second:
            assert live.is_dir() and second.is_dir()
    assert sorted(p.name for p in target.parent.iterdir()) == [other.name]


def test_resumable_staging_keeps_what_a_failed_install_downloaded_for_the_next_one(tmp_path: Path) -> None:
    """Every install made a new staging folder and deleted it on failure: a retry started from zero. The
    resumable one is the same folder each time, kept after a failure that downloaded something, removed after
    a success (or a failure that downloaded nothing)."""
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError), resumable_staging(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("the connection dropped")
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.partial"]
    assert "downloaded so far are kept in" in partial_note(target)
    with resumable_staging(target) as again:
        assert again == tmp and (again / "weights").read_text() == "half"
    assert list(target.parent.iterdir()) == [] and partial_note(target) == ""
    with pytest.raises(RuntimeError), resumable_staging(target) as tmp:
        (tmp / ".cache" / "huggingface").mkdir(parents=True)
        (tmp / ".cache" / "huggingface" / "x.lock").write_text("bookkeeping only")
        raise RuntimeError("the hub refused")
    assert list(target.parent.iterdir()) == []


def test_resumable_staging_lets_one_installer_in_at_a_time(tmp_path: Path) -> None:
    """Two pulls of one model share its staging folder: the second waits for the first to end (its lock file,
    deleted as the first lets go, is not a lock the two could hold at once)."""
    target = tmp_path / "models" / "m"
    order: list[str] = []

    def second() -> None:
        with resumable_staging(target, waiting=lambda _holder: order.append("second waits")):
            order.append("second in")

    with resumable_staging(target, waiting=lambda _holder: order.append("first waits")):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        order.append("first out")
    thread.join(10)
    assert order == ["second waits", "first out", "second in"]  # it said why nothing happened
    assert list(target.parent.iterdir()) == []


def test_a_model_left_moved_aside_by_a_killed_replace_dir_is_put_back_at_the_next_look(tmp_path: Path) -> None:
    """SIGKILL (or a power cut) inside `replace_dir`, after the old model was moved aside and before the new one
    was renamed in, left the model hidden as `.m-xxxx.old` and nothing at `m`, for ever. The next look at the
    models folder puts the newest one back; older ones, and all once `m` is there, are removed."""
    models = tmp_path / "models"
    _folder(models / ".m-0000000a.old", "older")
    time.sleep(0.05)
    _folder(models / ".m-0000000b.old", "newest")
    _folder(models / ".m-more-0000000c.old", "another model's")
    staging_module.tidy(models / "m")
    assert (models / "m" / "weights").read_text() == "newest"
    assert sorted(p.name for p in models.iterdir()) == [".m-more-0000000c.old", "m"]
    _folder(models / ".m-0000000d.old", "killed while deleting it")
    staging_module.tidy(models / "m")
    assert (models / "m" / "weights").read_text() == "newest"
    assert sorted(p.name for p in models.iterdir()) == [".m-more-0000000c.old", "m"]


def test_a_model_moved_aside_is_left_alone_while_an_installer_holds_its_lock(tmp_path: Path) -> None:
    """An installer between the two renames of its `replace_dir` holds its lock: what it moved aside stays."""
    models = tmp_path / "models"
    _folder(models / ".m-0000000a.old", "old")
    with resumable_staging(models / "m"):
        staging_module.tidy(models / "m")
        assert not (models / "m").exists()
    with staging(models / "m"):
        staging_module.recover(models / "m")
        assert not (models / "m").exists()
    staging_module.recover(models / "m")
    assert (models / "m" / "weights").read_text() == "old"


def test_the_note_on_a_running_pull_does_not_call_its_download_kept(tmp_path: Path) -> None:
    """`models list` during a pull in another terminal said its bytes were 'kept ... (delete that folder to free the
    space)': the folder a live pull was writing to. It now says a pull is running."""
    target = tmp_path / "models" / "m"
    with resumable_staging(target) as tmp:
        (tmp / "weights").write_bytes(b"\0" * 3_000_000)
        assert partial_note(target) == f"A pull of m is running: 3.0 MB downloaded so far, in '{tmp}'."
    assert list(target.parent.iterdir()) == []


def test_a_lock_let_go_while_another_waits_for_it_has_one_holder_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter blocked on a lock file that its holder then deleted and let go locked that deleted file, while a
    third installer locked a new file at the path: two holders at once (two pulls writing one staging folder, or
    `recover` moving a folder an installer was renaming). The waiter now locks the file at the path."""
    import fcntl

    path = tmp_path / ".m.partial.lock"
    holder = lockfiles.lock(path, wait=True)
    opened = threading.Event()
    real_flock = fcntl.flock

    def flock(fd: int, op: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            opened.set()  # the waiter has opened the holder's file: it is let go only now
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(lockfiles.lock(path, wait=True)))
    waiter.start()
    assert opened.wait(10)
    lockfiles.unlock(path, holder)
    waiter.join(10)
    assert got and got[0] is not None
    try:
        assert lockfiles.lock(path, wait=False) is None  # a third installer waits
        assert os.fstat(got[0]).st_ino == os.stat(path).st_ino
    finally:
        lockfiles.unlock(path, got[0])


def test_installing_is_false_where_locks_cannot_tell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `fcntl` (Windows) no lock tells of an installer: `installing` is False, as it says, not True."""
    models = tmp_path / "models"
    models.mkdir()
    (models / ".m.partial.lock").touch()
    (models / ".m-0000000a.partial.lock").touch()
    monkeypatch.setitem(sys.modules, "fcntl", None)
    assert not staging_module.installing(models / "m")


def test_a_lock_file_that_cannot_be_opened_for_writing_still_tells_whether_it_is_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`held` of a lock file in a read-only folder (`models list` asks it of a killed pull's): it opened the file
    for writing, and the EROFS / EACCES escaped. Now it asks with a shared lock on a read-only descriptor."""
    path = tmp_path / ".m.partial.lock"
    fd = lockfiles.lock(path, wait=False)
    real_open = os.open

    def read_only(file: Any, flags: int, *args: Any) -> int:
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert lockfiles.held(path)
    os.close(fd if fd is not None else -1)  # let go, the file left behind as a killed holder leaves it
    assert path.exists() and not lockfiles.held(path)


def test_asking_whether_a_lock_is_held_leaves_no_lock_file(tmp_path: Path) -> None:
    """`recover` (and `installing`, `models list`) asked of a lock file an export had just deleted as it ended:
    asking created it again, a stray `.m-xxxxxxxx.partial.lock` that nothing removed. Now it only says not held."""
    lock = tmp_path / ".m-0000000a.partial.lock"
    assert not lockfiles.held(lock)
    assert not lock.exists()


def test_staging_a_model_leaves_another_models_kept_download_alone(tmp_path: Path) -> None:
    """Before: staging for model 'm' removed every unlocked `.m-*.partial` beside it, which also matched the kept
    (resumable) download of a model named 'm-more' (`.m-more.partial`): its downloaded bytes were deleted. Only the
    names `staging` gives ('.m-' + 8 hex digits) are its own."""
    models = tmp_path / "models"
    kept = models / ".m-more.partial"
    (kept / "weights").mkdir(parents=True)
    abandoned = models / ".m-0000000a.partial"
    abandoned.mkdir()
    with staging(models / "m"):
        pass
    assert (kept / "weights").is_dir()
    assert not abandoned.exists()


def test_the_room_check_does_not_count_again_the_copies_a_failed_pull_kept(
    tmp_path: Path, tiny_clipseg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository copied from the Hugging Face cache on another disk into a pull's staging folder, kept when the pull
    failed: the retry replaces those copies, so they need no more room. They were counted again: on a disk without
    room for a second copy, the retry failed saying so."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) here")
    from automask import install
    from automask.catalogue import DEFAULT_FILES

    snapshot = Path(tempfile.mkdtemp(dir=shm))
    try:
        shutil.copytree(tiny_clipseg_dir, snapshot, dirs_exist_ok=True)
        usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=1000))
        dest = tmp_path / ".grounded-sam.partial" / "facebook--sam-vit-base"
        with pytest.raises(ModelNotAvailableError, match="it needs"):  # no room for the copy
            install.plan_model(
                "grounded-sam", {"facebook/sam-vit-base": dest}, DEFAULT_FILES, {"facebook/sam-vit-base": snapshot}
            )
        shutil.copytree(snapshot, dest, dirs_exist_ok=True)  # what the failed pull had copied
        assert (
            install.plan_model(
                "grounded-sam", {"facebook/sam-vit-base": dest}, DEFAULT_FILES, {"facebook/sam-vit-base": snapshot}
            )
            == {}
        )
    finally:
        shutil.rmtree(snapshot)


def test_the_room_check_counts_the_copies_of_a_cache_on_the_same_disk_that_refuses_hard_links(
    tmp_path: Path, tiny_clipseg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hugging Face cache and the data folder on one disk but two mounts (Docker volumes of one host disk:
    `link` fails, EXDEV) or on one without hard links (exFAT): the files are copied, yet the room check took them
    for hard links (the same device) and let the pull fill the disk."""
    from automask import install
    from automask.catalogue import DEFAULT_FILES

    snapshot = tmp_path / "hf-cache"
    shutil.copytree(tiny_clipseg_dir, snapshot)

    def no_links(_source: Any, _dest: Any) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=1000))
    dest = tmp_path / ".clipseg.partial"
    repo = "CIDAS/clipseg-rd64-refined"
    with pytest.raises(ModelNotAvailableError, match="it needs"):
        install.plan_model("clipseg", {repo: dest}, DEFAULT_FILES, {repo: snapshot})
    monkeypatch.undo()
    assert install.plan_model("clipseg", {repo: dest}, DEFAULT_FILES, {repo: snapshot}) == {}  # hard links: no room
    assert sorted(p.name for p in dest.iterdir()) == []  # nothing left of the look


@pytest.mark.parametrize("make", [staging, resumable_staging])
def test_a_models_folder_that_is_a_file_is_named_as_one(tmp_path: Path, make: Any) -> None:
    """The models folder (or a folder above it) is a file: a pull said "Cannot write to the models folder '…'
    (File exists)" or "(Not a directory)", which names no file. Now the message says which path is a file."""
    (tmp_path / "data").write_text("not a folder")
    for folder in (tmp_path / "data" / "m", tmp_path / "data" / "models" / "m"):
        with pytest.raises(ModelNotAvailableError) as err, make(folder):
            pass
        assert f"'{tmp_path / 'data'}' is a file, not a folder: move it away" in err.value.message, err.value.message
    assert (tmp_path / "data").read_text() == "not a folder"
