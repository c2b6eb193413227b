"""The lock files that keep a model's installers and removers apart (`automask.staging`): `.NAME.partial.lock`
beside a model folder, held by a pull, a removal or a tidying, which writes what it is in it for one that waits to
say; `.NAME-xxxxxxxx.partial.lock` beside a staging folder. An exclusive `flock`, released by the system when its
holder dies; where there is none (Windows) nothing is locked."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

PULL, REMOVAL, TIDYING = "pull", "removal", "tidying"
"""What holds a model's lock (`resumable_staging`, `remove`, `tidy` / `recover`), written in its lock file for one
that waits for it to say (`holder`)."""


def hold(path: Path, waiting: Callable[[str], None] | None, what: str) -> int | None:
    """`lock(path)` for `what`, waiting for it when another process holds it (calling `waiting` first, with what
    holds it: `holder`)."""
    fd = lock(path, wait=False, by=what)
    if fd is None:
        if waiting is not None:
            waiting(holder(path))
        fd = lock(path, wait=True, by=what)
    return fd


def holder(path: Path) -> str:
    """What holds lock file `path`, as its holder wrote it (`PULL`, `REMOVAL`, `TIDYING`); "" when it does not say
    (an older automask's, or read before its holder wrote it) or cannot be read."""
    try:
        with open(path, "rb") as file:
            said = file.read(16).decode("ascii", "replace")
    except OSError:
        return ""
    return said if said in (PULL, REMOVAL, TIDYING) else ""


def lock_file(tmp: Path) -> Path:
    return tmp.with_name(f"{tmp.name}.lock")


def lock(path: Path, *, wait: bool, create: bool = True, by: str = "") -> int | None:
    """An open descriptor of `path` (created if need be, if `create`: else FileNotFoundError) holding its exclusive
    lock, `by` written in it (what holds it, read by `holder`) when given and it can be (`_say`); None when another
    process holds it (and not `wait`). Where there is no `fcntl` (Windows) nothing is locked: -1.

    Again until the locked file is still the one at `path`: a holder deletes it as it lets go (`unlock`), and a
    lock taken meanwhile on that deleted file would hold nothing (another process locks the new file there)."""
    try:
        import fcntl
    except ImportError:
        return -1
    while True:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                if by:
                    _say(fd, by)
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _say(fd: int, by: str) -> None:
    """Write `by` in the locked file `fd`, for `holder`: a courtesy, not the lock, so one that cannot be written
    (a full disk or quota: what `models rm` and tidying run to free) leaves it saying nothing ("")."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, by.encode("ascii"), 0)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # not a part of it, nor what an earlier holder wrote


def unlock(path: Path, fd: int | None) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    if fd is not None and fd >= 0:
        os.close(fd)


def lock_soon(path: Path, what: str, patience: float = 2.0) -> int | None:
    """`lock(path)` for `what`, waiting up to `patience` seconds for a brief holder (`models list` tidying,
    `recover`) to let go; None when it is still held then (a pull, which holds it for minutes)."""
    deadline = time.monotonic() + patience
    while (fd := lock(path, wait=False, by=what)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return fd


def held(path: Path) -> bool:
    """True when a live process holds the lock of lock file `path`; False where locks cannot tell (Windows)."""
    try:
        fd = lock(path, wait=False, create=False)
    except FileNotFoundError:  # its holder deleted it as it let go (not created again: a stray file nobody tidies)
        return False
    except OSError as exc:  # not to be opened for writing: another user's folder, a read-only file system
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return _held_read_only(path)
    if fd is not None and fd >= 0:
        os.close(fd)
    return fd is None


def _held_read_only(path: Path) -> bool:
    """`held` for a lock file that cannot be opened for writing: a shared lock, which a read-only descriptor may
    take, is refused while another process holds the exclusive one."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
