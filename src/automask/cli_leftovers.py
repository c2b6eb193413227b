"""The hidden files the command line writes beside its outputs, and the tidying of those a killed run left (SIGKILL, a
power cut): `.automask-xxxxxxxx.part`, a file being written (`automask.cli_io.write_atomic`), locked by its writer;
`.automask-TTTTTTTT-xxxxxxxx.old`, a file `mask` replaced, kept until it ends (`automask.cli_outputs.Outputs`), under
the lock file `.automask-TTTTTTTT.lock` its run holds in that folder. Locks are `flock`s (`automask.lockfiles`),
released by the system when their holder dies; where there are none (Windows) nothing is tidied."""

from __future__ import annotations

import os
import re
import stat
import time
import uuid
from pathlib import Path

from automask import lockfiles

PREFIX = ".automask-"
PART_AGE_S = 60.0
"""How long after its last change a file no process holds is taken for a killed run's: a `.part`'s writer holds no
lock for a moment after creating it (until `hold_part`; it holds it then until the rename), and older automasks did
not lock it (they wrote it in seconds); a run's lock file and `.old` files are left as long after the last change of
any of them, for a run on another host where a network file system's locks are not shared (NFS mounted nolock or
local_lock), alive though its lock looks free here (a `mask` keeps its copies for seconds)."""

_PART = re.compile(r"\.automask-[a-z0-9_]{8}\.part")  # tempfile.mkstemp's names
_OLD = re.compile(r"\.automask-([0-9a-f]{8})-[a-z0-9_]{8}\.old")
_LOCK = re.compile(r"\.automask-([0-9a-f]{8})\.lock")


def hold_part(fd: int) -> int | None:
    """Lock the `.part` file open as `fd`, for `tidy` to leave it alone until it is renamed: returns a duplicate of
    `fd`, which keeps the lock once `fd` is closed, for the writer to close after the rename (its chmod and rename
    come after its closing); None where nothing is locked (Windows, a file system without locks)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return os.dup(fd)
    except OSError:  # a file system without locks (ENOLCK): `tidy` cannot take it either
        return None


class Holds:
    """One run's lock files, `.automask-TTTTTTTT.lock` in each folder it keeps `.old` files in (`prefix`), held until
    `release`: `tidy` removes an `.old` only when no live process holds the lock of its run."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex[:8]
        self.held: dict[Path, int | None] = {}

    def prefix(self, folder: Path) -> str:
        """The name prefix of this run's `.old` files in `folder`, its lock there taken first (OSError when it
        cannot be made)."""
        lock = folder / f"{PREFIX}{self.token}.lock"
        if folder not in self.held:
            try:
                self.held[folder] = lockfiles.lock(lock, wait=True)
            except OSError:  # a file system without locks (ENOLCK): `tidy` cannot take it either, while it is there
                if not os.path.lexists(lock):
                    raise
                self.held[folder] = None
        return f"{PREFIX}{self.token}-"

    def release(self) -> None:
        """Let go of (and delete) this run's lock files: for when its `.old` files are gone."""
        for folder, fd in self.held.items():
            lockfiles.unlock(folder / f"{PREFIX}{self.token}.lock", fd)
        self.held = {}


def tidy(folder: Path) -> list[Path]:
    """Remove the hidden files that killed automask runs left in `folder` (see the module), and return them: an `.old`
    whose run's lock no live process holds (with that lock file), a `.part` no process holds, each unchanged for
    `PART_AGE_S`. Only regular files of this user, by those exact names; nothing where locks cannot tell (Windows),
    nor what cannot be removed (left as it is)."""
    try:
        import fcntl  # noqa: F401 - only whether locks tell
    except ImportError:
        return []
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.name.startswith(PREFIX)]
    except OSError:
        return []
    gone = []
    for path in (folder / name for name in names if _PART.fullmatch(name)):
        if _stale_part(path) and _removed(path):
            gone.append(path)
    for token in sorted({m.group(1) for name in names if (m := _OLD.fullmatch(name) or _LOCK.fullmatch(name))}):
        gone += _tidy_run(folder, token, [name for name in names if name.startswith(f"{PREFIX}{token}-")])
    return gone


def _tidy_run(folder: Path, token: str, names: list[str]) -> list[Path]:
    """Remove the `.old` files of run `token` in `folder` (of `names`) and its lock file when no live process holds
    that lock (the lock file deleted as its holder would), and return them; nothing when one does."""
    olds = [folder / name for name in names if _OLD.fullmatch(name) and _ours(folder / name)]
    lock = folder / f"{PREFIX}{token}.lock"
    if any(_recent(path) for path in (*olds, lock)):  # perhaps a live run's whose lock is not seen (`PART_AGE_S`)
        return []
    try:
        fd = lockfiles.lock(lock, wait=False, create=False) if _ours(lock) or not os.path.lexists(lock) else None
    except FileNotFoundError:  # its run ended (or was killed before it locked)
        return [old for old in olds if _removed(old)]
    except OSError:
        return []
    if fd is None:  # a live run holds it (or the lock file is another user's)
        return []
    gone = [old for old in olds if _removed(old)]  # while the lock is held: no run of this token can be writing
    lockfiles.unlock(lock, fd)
    return [*gone, lock]


def _removed(path: Path) -> bool:
    """Remove the file `path`; whether it was."""
    try:
        path.unlink()
    except OSError:
        return False
    return True


def _stale_part(path: Path) -> bool:
    """Whether the `.part` file `path` is a killed writer's: this user's, unwritten for `PART_AGE_S`, unlocked."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if not _ours(path, st) or _recent(path, st):
        return False
    try:
        return not lockfiles.held(path)
    except OSError:
        return False


def _recent(path: Path, st: os.stat_result | None = None) -> bool:
    """Whether `path` changed within `PART_AGE_S` (its data, or its inode: a `.part`'s chmod, an `.old`'s link)."""
    try:
        st = st or path.lstat()
    except OSError:
        return False
    return time.time() - max(st.st_mtime, st.st_ctime) < PART_AGE_S


def _ours(path: Path, st: os.stat_result | None = None) -> bool:
    """Whether `path` is a regular file (not a link) of this user."""
    try:
        st = st or path.lstat()
    except OSError:
        return False
    uid = getattr(os, "geteuid", None)
    return stat.S_ISREG(st.st_mode) and (uid is None or st.st_uid == uid())
