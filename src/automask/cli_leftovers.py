"""The hidden files the command line writes beside its outputs, and the tidying of those a killed run left (SIGKILL, a
power cut): `.automask-xxxxxxxx.part`, a file being written (`automask.cli_io.write_atomic`), locked by its writer;
`.automask-TTTTTTTT-xxxxxxxx.old`, a file `mask` replaced, kept until it ends (`automask.cli_outputs.Outputs`), under
the lock file `.automask-TTTTTTTT.lock` its run holds in that folder, which records the file each copy was kept for
until the run succeeds: the tidying puts such a copy back over its file (the run was killed before it succeeded, or
while it put its files back), and removes the others. Locks are `flock`s (`automask.lockfiles`), released by the
system when their holder dies; where there are none (Windows) nothing is tidied. An older automask's copies,
`.automask-xxxxxxxx.old`, say neither their run nor their file: removed only when the same data has another name."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import NamedTuple

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
_WROTE = ":wrote"  # a record's key: the copy's name and this, for what its run wrote over its file (`Holds.wrote`)
_UNLOCKED_OLD = re.compile(r"\.automask-[a-z0-9_]{8}\.old")  # an older automask's, which took no lock


class Tidied(NamedTuple):
    """What `tidy` did in a folder: the files it removed, the files it put back from a killed run's copies, the
    older automasks' copies it left, and the files changed since their run was killed, whose copies it left."""

    gone: list[Path]
    restored: list[Path]
    kept_old: list[Path]
    changed: list[Path]


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
    `release`: `tidy` touches an `.old` only when no live process holds the lock of its run. Each lock file records
    the file each of the run's copies there was kept for (`record`), until the run succeeds (`settle`)."""

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
                self.held[folder] = -1  # nothing locked (as where there is no fcntl), the file this run's to delete
        return f"{PREFIX}{self.token}-"

    def record(self, folder: Path, old: str, target: str) -> None:
        """Write down, on disk before the copy `old` is made, that it keeps the file `target` (both names in
        `folder`, whose lock `prefix` took), for `tidy` to put it back should this run be killed before it
        succeeds; OSError when it cannot be written (nothing is replaced then). Nothing where no lock is held."""
        fd = self.held.get(folder)
        if fd is not None and fd >= 0:
            os.write(fd, os.fsencode(old) + b"\0" + os.fsencode(target) + b"\0")
            os.fsync(fd)

    def wrote(self, folder: Path, old: str, st: os.stat_result) -> None:
        """Write down that the file the copy `old` keeps (`record`) is now the one this run wrote, `st`: `tidy` puts
        the copy back only over that file, never over one changed since (by the user, another run). A run killed
        before this record is made (just after its rename) has its copy put back over whatever the file is."""
        fd = self.held.get(folder)
        if fd is not None and fd >= 0:
            os.write(fd, os.fsencode(old + _WROTE) + b"\0" + _identity(st).encode() + b"\0")
            os.fsync(fd)

    def settle(self) -> None:
        """The run succeeded: its records are dropped (before its copies are), so that `tidy` removes the copies
        that a kill leaves from here on instead of putting them back over its outputs."""
        for fd in self.held.values():
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.fsync(fd)

    def release(self) -> None:
        """Let go of (and delete) this run's lock files: for when its `.old` files are gone."""
        for folder, fd in self.held.items():
            lockfiles.unlock(folder / f"{PREFIX}{self.token}.lock", fd)
        self.held = {}


def tidy(folder: Path) -> Tidied:
    """Tidy what killed automask runs left in `folder` (see the module), and say what: an `.old` whose run's lock no
    live process holds is put back over the file its run recorded it for, unless that file is the copy's own data
    (never replaced) or the run succeeded, when it is removed (with the lock file); a `.part` no process holds is
    removed; each unchanged for `PART_AGE_S`. An older automask's `.old` (`_UNLOCKED_OLD`) is removed only when its
    data has another name, else left (`kept_old`). Only regular files of this user, by those exact names; nothing
    where locks cannot tell (Windows), nor what cannot be removed or put back (left as it is, with its record)."""
    tidied = Tidied([], [], [], [])
    try:
        import fcntl  # noqa: F401 - only whether locks tell
    except ImportError:
        return tidied
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.name.startswith(PREFIX)]
    except OSError:
        return tidied
    for path in (folder / name for name in names if _PART.fullmatch(name)):
        if _stale_part(path) and _removed(path):
            tidied.gone.append(path)
    for path in (folder / name for name in names if _UNLOCKED_OLD.fullmatch(name)):
        _tidy_unlocked_old(path, tidied)
    tokens = sorted({m.group(1) for name in names if (m := _OLD.fullmatch(name) or _LOCK.fullmatch(name))})
    while tokens:  # again those whose file changed since their kill, while a put-back may have made it theirs again
        restored, retry = len(tidied.restored), []
        tidied.changed.clear()
        for token in tokens:
            changed = len(tidied.changed)
            _tidy_run(folder, token, [name for name in names if name.startswith(f"{PREFIX}{token}-")], tidied)
            retry += [token] if len(tidied.changed) > changed else []
        tokens = retry if len(tidied.restored) > restored else []
    return tidied


def _tidy_unlocked_old(path: Path, tidied: Tidied) -> None:
    """An older automask's copy `path`: removed when its data has another name as well (a hard link to a file that
    was never replaced), else left and listed in `tidied.kept_old`, for it may be the only copy of a user's file."""
    try:
        st = path.lstat()
    except OSError:
        return
    if not _ours(path, st) or _recent(path, st):
        return
    if st.st_nlink > 1 and _removed(path):
        tidied.gone.append(path)
    else:
        tidied.kept_old.append(path)


def _tidy_run(folder: Path, token: str, names: list[str], tidied: Tidied) -> None:
    """Put back or remove the `.old` files of run `token` in `folder` (of `names`), and remove its lock file, when no
    live process holds that lock (the lock file deleted as its holder would, unless a copy is left); nothing when
    one does. What it did goes into `tidied`."""
    olds = [folder / name for name in names if _OLD.fullmatch(name) and _ours(folder / name)]
    lock = folder / f"{PREFIX}{token}.lock"
    if any(_recent(path) for path in (*olds, lock)):  # perhaps a live run's whose lock is not seen (`PART_AGE_S`)
        return
    try:
        fd = lockfiles.lock(lock, wait=False, create=False) if _ours(lock) or not os.path.lexists(lock) else None
    except FileNotFoundError:  # its run ended (or was killed before it locked): no record of any copy
        tidied.gone.extend(old for old in olds if _removed(old))
        return
    except OSError:
        return
    if fd is None:  # a live run holds it (or the lock file is another user's)
        return
    kept_for = _records(fd)  # while the lock is held: no run of this token can be writing
    left = [
        old for old in olds if not _settle_old(old, kept_for.get(old.name), kept_for.get(old.name + _WROTE), tidied)
    ]
    if left:  # their records stay for a later tidying
        os.close(fd)
        return
    lockfiles.unlock(lock, fd)
    tidied.gone.append(lock)


def _records(fd: int) -> dict[str, str]:
    """The records of the lock file open as `fd` (`Holds.record`): copy's name -> the name of the file it keeps; an
    unfinished last record (a run killed while writing it: its copy was not made yet) is left out."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := os.pread(fd, 65536, len(data)):
            data += chunk
    fields = [os.fsdecode(field) for field in data.split(b"\0")[:-1]]
    return {old: target for old, target in zip(fields[0::2], fields[1::2], strict=False) if "/" not in target + old}


def _settle_old(old: Path, target: str | None, wrote: str | None, tidied: Tidied) -> bool:
    """Put the copy `old` back over the file `target` beside it (its record), or remove it when there is no record
    (its run succeeded) or `target` still is its data (never replaced); whether it is gone. A `target` that is no
    regular file now (a folder, a link), or a failure, leaves it; so does one that is no longer what the run wrote
    there (`wrote`, `Holds.wrote`: changed since the kill), named in `tidied.changed`."""
    path = old.parent / target if target not in (None, "", ".", "..") else None
    try:
        st = path.lstat() if path is not None else None
    except FileNotFoundError:  # gone: it is put back
        st = None
    except OSError:
        return False
    try:
        never_replaced = st is not None and os.path.samestat(st, old.lstat())
    except OSError:
        return False
    if path is None or never_replaced:
        if not _removed(old):
            return False
        tidied.gone.append(old)
        return True
    if st is not None and not stat.S_ISREG(st.st_mode):
        return False
    if st is not None and wrote is not None and _identity(st) != wrote:
        tidied.changed.append(path)
        return False
    try:
        os.replace(old, path)
    except OSError:
        return False
    tidied.restored.append(path)
    return True


def _identity(st: os.stat_result) -> str:
    """What tells a file from one written over it or in its place since: its inode, size and time of change."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


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
