"""Staging folders and the atomic swap that every installer uses (hub models in `models.pull`, the embedded model in
`embedded.install`, ONNX exports), so that nothing half-written is ever left where a model is looked for; a hub
download's staging folder is kept, locked, for the next pull to resume.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from automask import lockfiles
from automask.errors import ModelBusyError, ModelNotAvailableError
from automask.lockfiles import LOADING, PULL, REMOVAL, TIDYING

HUB_BOOKKEEPING = "huggingface"
"""The subfolder of a download folder's `.cache` where huggingface_hub keeps its locks and metadata."""


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A new empty folder beside `folder` (the same file system, so `replace_dir` from it is a rename), removed
    with whatever is left in it after the block. `ModelNotAvailableError` when it cannot be created.

    While the block runs, the folder's `.lock` file beside it is locked; staging folders of `folder` whose lock
    nobody holds (their process was killed: SIGKILL, a power cut) are removed first."""
    tmp = folder.parent / f".{folder.name}-{uuid.uuid4().hex[:8]}.partial"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder)
        held = lockfiles.lock(lockfiles.lock_file(tmp), wait=True)
        tmp.mkdir()  # not mkdtemp: its 0700 would stay on the installed folder; this follows the umask
    except OSError as exc:
        raise _unwritable(folder.parent, exc) from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lockfiles.unlock(lockfiles.lock_file(tmp), held)


def check_models_folder(models: Path) -> None:
    """`ModelNotAvailableError` when a file stands where models folder `models`, or a folder above it, should be:
    no model could be installed there, nor read from it (a missing folder is fine: it is made on the first pull)."""
    file = _file_in_the_way(models)
    if file is not None:
        raise ModelNotAvailableError(
            f"The models folder '{models}' cannot be read ('{file}' is a file, not a folder: move it away). Point "
            "AUTOMASK_DATA_DIR at another folder and run again."
        )


def _file_in_the_way(models: Path) -> Path | None:
    """The first of `models` and the folders above it that exists and is not a folder, or None."""
    return next((p for p in (models, *models.parents) if p.exists() and not p.is_dir()), None)


def _unwritable(models: Path, exc: OSError) -> ModelNotAvailableError:
    """The error for models folder `models` that cannot be created or written (`exc`), naming the file that stands
    where it, or a folder above it, should be."""
    why = f"({exc.strerror})"
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        file = _file_in_the_way(models)
        why = f"('{file}' is a file, not a folder: move it away)" if file is not None else why
    return ModelNotAvailableError(
        f"Cannot write to the models folder '{models}' {why}. Point AUTOMASK_DATA_DIR at a writable folder and run "
        "again."
    )


@contextlib.contextmanager
def resumable_staging(folder: Path, waiting: Callable[[str], None] | None = None) -> Iterator[Path]:
    """The staging folder of `folder` that a failed or interrupted block keeps: `.NAME.partial` beside it, always
    the same, so the next install of `folder` resumes the files this one had downloaded. Removed when the block
    ends normally (after `replace_dir` moved it into place, or unused), or when it holds no file.
    `ModelNotAvailableError` when it cannot be created.

    For the block, the folder's `.lock` file is locked, after waiting for another installer of `folder` (or a
    removal, or a tidying) to end (`waiting` is called first, when there is one, with what its lock file says holds
    it: `PULL`, `REMOVAL`, `TIDYING`, or "" when it does not say): one download into it at a time; a killed
    installer's lock is released by the system, and its folder reused."""
    tmp = _kept(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder)
        held = lockfiles.hold(lockfiles.lock_file(tmp), waiting, PULL)
        tmp.mkdir(exist_ok=True)
    except OSError as exc:
        raise _unwritable(folder.parent, exc) from exc
    keep = True
    try:
        yield tmp
        keep = False
    finally:
        if not keep or not _downloaded(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        lockfiles.unlock(lockfiles.lock_file(tmp), held)


def partial_note(folder: Path) -> str:
    """A sentence saying what `resumable_staging(folder)` kept after a failure ("" when nothing), and that pulling
    the catalogue model `folder.name` again resumes it; or, while a pull of it runs, that it is downloading there;
    while a removal holds its lock, that it deletes it (what holds the lock: `lockfiles.holder`; a tidying, or runs
    loading the installed model, keep it)."""
    tmp = _kept(folder)
    size = _downloaded(tmp)
    if not size:
        return ""
    hub = lockfiles.lock_file(tmp)
    running = lockfiles.holder(hub) if hub.exists() and lockfiles.held(hub) else None
    if running == REMOVAL:  # `remove`, before it renames the folder aside
        return (
            f"A removal of {folder.name} (automask models rm) is running: it deletes the {size / 1e6:.1f} MB a failed "
            f"pull downloaded, in '{tmp}'."
        )
    if running not in (None, TIDYING, LOADING):  # a pull ("": one that does not say, an older automask's)
        return f"A pull of {folder.name} is running: {size / 1e6:.1f} MB downloaded so far, in '{tmp}'."
    return (
        f"The {size / 1e6:.1f} MB downloaded so far are kept in '{tmp}': automask models pull {folder.name} resumes "
        "from there (delete that folder to free the space)."
    )


def _kept(folder: Path) -> Path:
    """The download folder a pull of `folder` keeps to resume (`resumable_staging`): `.NAME.partial` beside it."""
    return folder.parent / f".{folder.name}.partial"


def tidy(folder: Path) -> None:
    """Remove what killed installers of `folder` (SIGKILL, a power cut) left and no pull resumes: their staging
    folders, and `resumable_staging`'s lock file, with its folder when that holds no downloaded byte; and what a
    killed `remove` of it had moved aside. Nothing while an installer is running, nor when the models folder cannot
    be written."""
    tmp = _kept(folder)
    recover(folder)
    with contextlib.suppress(OSError):
        _remove_abandoned(folder)
        removing = list(folder.parent.glob(_unique(folder, REMOVING)))
        if not lockfiles.lock_file(tmp).exists() and not removing:
            return
        fd = lockfiles.lock(lockfiles.lock_file(tmp), wait=False, by=TIDYING)
        if fd is None or fd < 0:  # a pull (or a removal) is running, or no locks to tell (Windows)
            return
        if not _downloaded(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        for leftover in removing:
            _discard(leftover)
        lockfiles.unlock(lockfiles.lock_file(tmp), fd)


REMOVING = ".removing"
"""The suffix of what `remove` renamed aside to delete: `.NAME-xxxxxxxx.removing`, which nothing takes for a model."""


def remove(folder: Path, inner: tuple[Path, ...] = ()) -> list[Path]:
    """Delete installed model folder `folder`, what killed installers left of it moved aside (`.NAME-xxxxxxxx.old`,
    which `recover` would put back) and a failed pull's kept download (`.NAME.partial`); return those that were
    there. Under the lock of its pulls, all are renamed aside first (`REMOVING`: a kill midway leaves no model half
    deleted where one is looked for, and `tidy` deletes the rest), then deleted. `ModelBusyError` while an installer
    of `folder`, or of a folder of `inner` (inside `folder`: its ONNX export), holds its lock; nothing is removed."""
    if not folder.parent.is_dir():
        return []
    hub = lockfiles.lock_file(_kept(folder))
    try:
        fd = lockfiles.lock_soon(hub, REMOVAL)
    except OSError as exc:
        raise ModelNotAvailableError(
            f"Cannot remove from the models folder '{folder.parent}' ({exc.strerror})."
        ) from exc
    try:
        busy = [f for f in inner if installing(f)]
        if fd is None or _staging_held(folder) or busy:
            raise ModelBusyError(
                _busy_message(folder, (busy or [folder])[0], lockfiles.holder(hub) if fd is None else PULL)
            )
        olds = sorted(folder.parent.glob(_unique(folder, ".old")))  # first: `recover` would put one back
        found = [p for p in (*olds, folder, _kept(folder)) if os.path.lexists(p)]
        moved = _rename_aside(found, folder)
        busy = [f for f in inner if installing(moved.get(folder, folder) / f.relative_to(folder))]
        if busy:  # an export began before the rename
            _put_back(moved)
            raise ModelBusyError(_busy_message(folder, busy[0]))
        for leftover in folder.parent.glob(_unique(folder, REMOVING)):  # and those of a killed removal
            _discard(leftover)
        return found
    finally:
        lockfiles.unlock(hub, fd)


def _rename_aside(paths: list[Path], folder: Path) -> dict[Path, Path]:
    """Rename each of `paths` to a `REMOVING` name beside `folder`; path -> its new name. Signals wait for the
    renames; on a failure, those done are put back and `ModelNotAvailableError` is raised."""
    moved: dict[Path, Path] = {}
    with signals_held():
        try:
            for path in paths:
                moved[path] = folder.with_name(f".{folder.name}-{uuid.uuid4().hex[:8]}{REMOVING}")
                os.rename(path, moved[path])
        except OSError as exc:
            moved.pop(path)
            _put_back(moved)
            raise ModelNotAvailableError(f"Cannot remove '{path}' ({exc.strerror}): nothing was removed.") from exc
    return moved


def _put_back(moved: dict[Path, Path]) -> None:
    """Undo `_rename_aside`."""
    with signals_held():
        for path, aside in reversed(moved.items()):
            with contextlib.suppress(OSError):
                os.rename(aside, path)


def _busy_message(folder: Path, busy: Path, held_by: str = PULL) -> str:
    if held_by == LOADING:
        return (
            f"The model '{folder.name}' is not removed: a run is loading it (automask mask, batch, serve...). Run this "
            "again once it has loaded."
        )
    holders = {REMOVAL: "another removal", TIDYING: "automask's tidying"}
    what = holders.get(held_by, "a pull") if busy == folder else "an export"  # "": an older automask's pull
    return (
        f"The model '{folder.name}' is not removed: {what} of it is running. Run this again once it has ended "
        "(Ctrl-C it to stop it)."
    )


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[None]:
    """For the block, hold installed model `folder` against its removal and replacement: a shared lock on the lock
    file of its pulls, which `remove` (and a pull, a tidying) waits for or refuses under; readers hold it together,
    and wait while one of those holds it. `ModelNotAvailableError` when a removal took `folder` meanwhile. Where the
    lock cannot be taken (a read-only models folder, Windows), nothing is held."""
    hub = lockfiles.lock_file(_kept(folder))
    try:
        fd = lockfiles.lock(hub, wait=True, shared=True)
    except OSError:
        fd = None
    try:
        if not folder.is_dir():
            raise ModelNotAvailableError(
                f"The model '{folder.name}' was removed as it was about to be loaded (automask models rm). Install it "
                f"again with: automask models pull {folder.name}"
            )
        yield
    finally:
        if fd is not None and fd >= 0:
            os.close(fd)
            with contextlib.suppress(OSError):  # the last reader deletes the lock file, as an exclusive holder does
                last = lockfiles.lock(hub, wait=False, create=False)
                if last is not None:
                    lockfiles.unlock(hub, last)


def reading_model(path: Path, models: Path) -> contextlib.AbstractContextManager[None]:
    """`reading` of the model folder of models folder `models` that `path` is or is in (a grounded model's mask
    head); nothing is held for a folder elsewhere (the user's own, the Hugging Face cache)."""
    path, models = path.absolute(), models.absolute()  # (links left as they are: a linked model is the data folder's)
    inner = path.relative_to(models).parts if path.is_relative_to(models) else ()
    return reading(models / inner[0]) if inner else contextlib.nullcontext()


def installing(folder: Path) -> bool:
    """True while an installer of `folder` holds its lock: a pull (`resumable_staging`) or a `staging` block (an
    export). False where locks cannot tell (Windows)."""
    hub = lockfiles.lock_file(_kept(folder))
    return (hub.exists() and lockfiles.held(hub)) or _staging_held(folder)


def _staging_held(folder: Path) -> bool:
    """True while a `staging` block of `folder` holds its lock (an export, the embedded model's install)."""
    return any(lockfiles.held(lock) for lock in folder.parent.glob(_unique(folder, ".partial.lock")))


def recover(folder: Path) -> None:
    """Put back the model that an installer killed inside `replace_dir` (SIGKILL, a power cut) left moved aside:
    the newest `.NAME-xxxx.old` beside `folder` is renamed to `folder` when that is missing, and the others (all,
    when `folder` is there) are removed. Nothing while an installer of `folder` holds its lock (its `replace_dir`
    may be between its renames), nor where locks cannot tell (Windows) or the models folder cannot be written."""
    with contextlib.suppress(OSError):
        olds = sorted(folder.parent.glob(_unique(folder, ".old")), key=lambda p: p.lstat().st_ctime_ns)
        if not olds:
            return
        hub = lockfiles.lock_file(_kept(folder))
        fd = lockfiles.lock(hub, wait=False, by=TIDYING)
        if fd is None or fd < 0:
            return
        try:
            if _staging_held(folder):
                return
            if not os.path.lexists(folder):
                os.rename(olds.pop(), folder)
            for old in olds:
                _discard(old)
        finally:
            lockfiles.unlock(hub, fd)


def _unique(folder: Path, suffix: str) -> str:
    """The glob pattern of the names `_move_aside` and `staging` give beside `folder`: `.NAME-xxxxxxxx` + `suffix`
    (not `.NAME-more-xxxxxxxx`: another model's)."""
    return f".{glob.escape(folder.name)}-{'[0-9a-f]' * 8}{suffix}"


def _downloaded(tmp: Path) -> int:
    """Bytes of model files in staging folder `tmp` (a part of one too), not counting the hub's bookkeeping."""
    files = (p for p in tmp.rglob("*") if p.is_file() and HUB_BOOKKEEPING not in p.relative_to(tmp).parts)
    with contextlib.suppress(OSError):
        return sum(p.stat().st_size for p in files)
    return 0


def _remove_abandoned(folder: Path) -> None:
    """Remove the staging folders of `folder` that no live process holds (see `staging`)."""
    for old in folder.parent.glob(_unique(folder, ".partial")):
        fd = lockfiles.lock(lockfiles.lock_file(old), wait=False)
        if fd is None or fd < 0:  # alive, or no locks to tell (Windows): keep it
            continue
        shutil.rmtree(old, ignore_errors=True)
        lockfiles.unlock(lockfiles.lock_file(old), fd)


def replace_dir(new: Path, dest: Path) -> None:
    """Rename the complete folder `new` to `dest` (the same file system). Whatever `dest` held (a folder, a symlink
    or a file) is moved aside first and deleted only once `new` is in place; if that rename fails it is put back.
    Another process installing to `dest` at the same moment is no error: the last rename wins. Ctrl-C, SIGTERM or
    SIGHUP during the two renames take effect after them (a model is never left moved aside, hidden)."""
    with signals_held():
        for _ in range(_RACE_RETRIES):
            old = _move_aside(dest)
            try:
                os.replace(new, dest)
            except OSError as exc:
                if old is not None:
                    os.replace(old, dest)
                elif exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # another installer's folder landed at `dest` since it was moved aside: again
                raise
            break
        else:
            raise OSError(errno.EEXIST, f"'{dest}' kept being replaced by another installer")
    if old is not None:
        _discard(old)


def _discard(old: Path) -> None:
    """Delete what `_move_aside` moved to `old`: a folder with its files, or a symlink or file (`rmtree` fails on
    those, silently here); an error is ignored (what is left is a hidden leftover that `recover` retries)."""
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            old.unlink()


_RACE_RETRIES = 10
_HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back for the block; one that came meanwhile is delivered (its handler runs:
    KeyboardInterrupt...) as the block ends. In the main thread their Python handlers are swapped for one that only
    notes the signal: the kernel may give it to any other thread (the hub's, tqdm's), and Python then runs the
    handler in the main thread whatever this thread blocks."""
    came: list[int] = []
    before: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        before = {s: signal.signal(s, lambda signum, _frame: came.append(signum)) for s in _HELD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in came:
            signal.raise_signal(signum)


def _move_aside(dest: Path) -> Path | None:
    """Rename `dest` to a unique hidden name beside it and return that; None when there is no `dest` (any more)."""
    old = dest.with_name(f".{dest.name}-{uuid.uuid4().hex[:8]}.old")
    try:
        os.replace(dest, old)
    except FileNotFoundError:
        return None
    return old
