"""The lock files that keep a model's installers and removers apart (`automask.staging`): `.NAME.partial.lock`
beside a model folder, held by a pull, a removal or a tidying, which writes what it is in it (with its process id,
start time and host) for one that waits to say; `.NAME-xxxxxxxx.partial.lock` beside a staging folder. An exclusive
`flock`, released by the system when its holder dies (what it wrote stays: `holder` then says nothing); where there is
none (Windows) nothing is locked."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PULL, REMOVAL, TIDYING = "pull", "removal", "tidying"
"""What holds a model's lock (`resumable_staging`, `remove`, `tidy` / `recover`), written in its lock file for one
that waits for it to say (`holder`)."""
LOADING = "loading"
"""What `holder` says of a model's lock held shared: runs loading the model (`staging.reading`), which write nothing."""


def hold(path: Path, waiting: Callable[[str], None] | None, what: str) -> int | None:
    """`lock(path)` for `what`, waiting for it when another process holds it (calling `waiting` first, with what
    holds it: `holder`)."""
    fd = lock(path, wait=False, by=what)
    if fd is None:
        if waiting is not None:
            waiting(holder(path))
        fd = lock(path, wait=True, by=what)
    return fd


@contextlib.contextmanager
def holding(path: Path, what: str) -> Iterator[None]:
    """`hold(path)` for `what` for the block (after waiting for its holders: runs loading the model too), deleted and
    let go of after it; nothing is held where the lock file cannot be made (a read-only folder)."""
    try:
        fd = hold(path, None, what)
    except OSError:
        fd = None
    try:
        yield
    finally:
        unlock(path, fd)


def holder(path: Path) -> str:
    """What holds lock file `path`, as its holder wrote it (`PULL`, `REMOVAL`, `TIDYING`); "" when it does not say
    (an older automask's pull, one that writes nothing, read before its holder wrote it), cannot be read, or says it
    of a holder that is gone: the lock is free, or the process it names, on this host, is dead (killed: SIGKILL, an
    out-of-memory kill, and the lock taken again by one that writes nothing)."""
    try:
        if _shared_only(path):
            return LOADING
        with open(path, "rb") as file:
            said = file.read(512).decode("ascii", "replace").split()
        if not said or said[0] not in (PULL, REMOVAL, TIDYING) or not held(path):
            return ""
    except OSError:
        return ""
    if len(said) in (3, 4) and said[2] == _this_host() and said[1].isdigit() and not _alive(int(said[1]), said[3:]):
        return ""
    return said[0]  # (a live holder's; or an older automask's, which wrote no process id, taken at its word)


_BOOT_ID = "/proc/sys/kernel/random/boot_id"
"""Linux's id of this boot of this machine's kernel, which its containers share."""


def _this_host() -> str:
    """This host, as a holder writes it beside its process id: the host name, the process id namespace (two
    containers sharing a data folder may have the same name, not the same process ids) and the boot id (two machines
    sharing one over NFS may have the same name, and their initial namespace has the same id on every machine)."""
    ids = [socket.gethostname()]
    with contextlib.suppress(OSError):
        ids.append(os.readlink("/proc/self/ns/pid"))
    with contextlib.suppress(OSError), open(_BOOT_ID, "rb") as file:
        ids.append(file.read(64).decode("ascii", "replace"))
    host = "".join("/".join(ids).split())  # one word, in ASCII, as `_say` writes it
    return host.encode("ascii", "replace").decode("ascii")


def _alive(pid: int, started: list[str]) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed and not yet reaped by its parent, holds no lock),
    and, when `started` names when the holder started (`_started`), is the process that started then (a process id
    is handed out again once its process is gone)."""
    if pid <= 0:
        return True  # not a process id a holder writes: not taken for a dead one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    stat = _stat(pid)
    if not stat:  # no /proc (macOS, BSD): taken for alive
        return True
    return stat[0] != "Z" and started[:1] in ([], ["-"], stat[19:20])


def _stat(pid: int) -> list[str] | None:
    """The fields of `/proc/PID/stat` after the command name (`state` first, `starttime` at 19), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rpartition(b")")[2].decode("ascii", "replace").split()
    except OSError:
        return None


def _started(pid: int) -> str:
    """When process `pid` started, as `/proc/PID/stat` says (clock ticks after boot); "-" where it cannot tell."""
    stat = _stat(pid)
    return stat[19] if stat is not None and len(stat) > 19 else "-"


def lock_file(tmp: Path) -> Path:
    return tmp.with_name(f"{tmp.name}.lock")


def lock(path: Path, *, wait: bool, create: bool = True, by: str = "", shared: bool = False) -> int | None:
    """An open descriptor of `path` (created if need be, if `create`: else FileNotFoundError) holding its exclusive
    lock (its shared one if `shared`: readers hold it together, and write nothing), `by` written in it (what holds
    it, read by `holder`) when given and it can be (`_say`); None when another process holds it (and not `wait`).
    Where there is no `fcntl` (Windows) nothing is locked: -1.

    Again until the locked file is still the one at `path`: a holder deletes it as it lets go (`unlock`), and a
    lock taken meanwhile on that deleted file would hold nothing (another process locks the new file there)."""
    try:
        import fcntl
    except ImportError:
        return -1
    while True:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
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
    """Write `by`, this process's id, host and start time in the locked file `fd`, for `holder`: a courtesy, not
    the lock, so one that cannot be written (a full disk or quota: what `models rm` and tidying run to free) leaves
    it saying nothing ("")."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{by} {os.getpid()} {_this_host()} {_started(os.getpid())}".encode("ascii"), 0)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # not a part of it, nor what an earlier holder wrote


def unlock(path: Path, fd: int | None) -> None:
    """Delete lock file `path` and let go of its lock `fd`; nothing when `fd` is None: the lock was not got, and the
    file is its holder's (deleted, that holder would hold a lock on a file no one else opens: a second taker of
    `path` would get a new one, as if the lock were free)."""
    if fd is None:
        return
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


def _shared_only(path: Path) -> bool:
    """True when `path`'s lock is held, by shared holders alone: an exclusive one is refused, a shared one let in."""
    return held(path) and not _held_read_only(path)


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
