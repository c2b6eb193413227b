"""What a model's lock file says holds it (`lockfiles.holder`), once that holder is gone: real processes, killed
with SIGKILL (their lock released by the system, their words left in the file)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from automask import lockfiles, models
from automask.cli import main
from automask.settings import Settings

_HOLD = """
import sys, time
from pathlib import Path
from automask import lockfiles
fd = lockfiles.lock(Path(sys.argv[1]), wait=False, by=sys.argv[2])
print("held" if fd is not None else "busy", flush=True)
time.sleep(600)
"""


@pytest.fixture()
def holders() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by `_hold`; any still running at the end are killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _hold(path: Path, what: str, procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A process that takes the lock of `path` for `what` (as a pull, a removal or a tidying does) and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), what], stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc


def _killed(path: Path, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """`_hold`, then SIGKILL: the system lets the lock go, and what the holder wrote stays in the file."""
    proc = _hold(path, what, procs)
    assert lockfiles.holder(path) == what  # alive: it says so
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes().startswith(what.encode())  # its words are still there
    assert not lockfiles.held(path)


@pytest.mark.parametrize("what", [lockfiles.PULL, lockfiles.REMOVAL, lockfiles.TIDYING])
def test_a_killed_holder_is_not_reported_once_the_lock_is_free(
    tmp_path: Path, what: str, holders: list[subprocess.Popen[bytes]]
) -> None:
    """Before: `holder` read the file alone, and named the killed process's work as what held a free lock."""
    path = tmp_path / ".m.partial.lock"
    _killed(path, what, holders)
    assert lockfiles.holder(path) == ""


@pytest.mark.parametrize("what", [lockfiles.REMOVAL, lockfiles.TIDYING])
def test_a_killed_holder_is_not_reported_while_one_that_says_nothing_holds_the_lock(
    tmp_path: Path, what: str, holders: list[subprocess.Popen[bytes]]
) -> None:
    """The lock taken again by one that writes nothing in it (another process asking whether it is held, or an
    older automask's pull): before, the dead process's work was reported as what held it."""
    path = tmp_path / ".m.partial.lock"
    _killed(path, what, holders)
    _hold(path, "", holders)
    assert lockfiles.held(path)
    assert lockfiles.holder(path) == ""


def test_a_live_holder_in_another_process_is_still_reported(
    tmp_path: Path, holders: list[subprocess.Popen[bytes]]
) -> None:
    path = tmp_path / ".m.partial.lock"
    _killed(path, lockfiles.TIDYING, holders)
    _hold(path, lockfiles.REMOVAL, holders)
    assert lockfiles.holder(path) == lockfiles.REMOVAL


def test_a_lock_file_of_an_older_automask_is_still_read(tmp_path: Path) -> None:
    """An older automask wrote what it was alone ("removal"), no process id: taken at its word while held."""
    path = tmp_path / ".m.partial.lock"
    path.write_bytes(b"removal")
    assert lockfiles.holder(path) == ""  # free: nothing holds it
    fd = lockfiles.lock(path, wait=False)
    try:
        assert lockfiles.holder(path) == lockfiles.REMOVAL
    finally:
        lockfiles.unlock(path, fd)


def test_a_pull_waiting_behind_a_lock_does_not_name_a_killed_holder(
    tmp_path: Path, holders: list[subprocess.Popen[bytes]]
) -> None:
    """`hold` (a pull's "waiting for ..." line): the lock held by one that says nothing, the file naming a killed
    removal. Before: "A removal of 'm' (automask models rm) is running"."""
    path = tmp_path / ".m.partial.lock"
    _killed(path, lockfiles.REMOVAL, holders)
    fd = lockfiles.lock(path, wait=False)  # held in this process, as `held` holds it for a moment
    said: list[str] = []
    threading.Timer(0.3, lockfiles.unlock, (path, fd)).start()
    got = lockfiles.hold(path, said.append, lockfiles.PULL)
    lockfiles.unlock(path, got)
    assert said == [""]


def test_models_rm_does_not_name_a_killed_removal_as_what_holds_the_lock(
    settings: Settings, holders: list[subprocess.Popen[bytes]]
) -> None:
    folder = models.model_dir("clipseg", settings)
    folder.parent.mkdir(parents=True)
    hub = folder.parent / ".clipseg.partial.lock"
    _killed(hub, lockfiles.REMOVAL, holders)
    _hold(hub, "", holders)  # an older automask's pull, which says nothing
    busy = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "models", "rm", "clipseg"])
    assert busy.exit_code == 10, busy.output
    assert "The model 'clipseg' is not removed: a pull of it is running." in busy.stderr
    assert "removal" not in busy.stderr


def test_a_live_holder_on_another_machine_of_the_same_host_name_is_still_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holders: list[subprocess.Popen[bytes]]
) -> None:
    """A data folder shared over NFS by two machines of the same host name (cloned VMs, containers run with one
    `--hostname` on several hosts): both in their initial process id namespace, whose id is the same on every
    Linux machine. Before: the other machine's removal (its process id not one of this machine's) was taken for a
    killed one of this machine's, and not reported. Now a holder also writes its machine's boot id."""
    path = tmp_path / ".m.partial.lock"
    _hold(path, "", holders)  # the lock, held (over NFS: by the other machine)
    other_boot = tmp_path / "boot_id"
    other_boot.write_text("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n")
    with monkeypatch.context() as other_machine:
        other_machine.setattr(lockfiles, "_BOOT_ID", str(other_boot), raising=False)
        remote = lockfiles._this_host()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    path.write_text(f"{lockfiles.REMOVAL} {int(dead.stdout)} {remote}")  # a process id no process here has
    assert lockfiles.holder(path) == lockfiles.REMOVAL


def test_a_killed_holder_whose_process_id_was_taken_again_is_not_reported(
    tmp_path: Path, holders: list[subprocess.Popen[bytes]]
) -> None:
    """A removal SIGKILLed, its process id handed to a new process since (here: the one that holds the lock now and
    says nothing, an older automask's pull). Before: that id alive, the dead removal was named. Now a holder also
    writes when its process started, and a process of that id started at another time is not it."""
    path = tmp_path / ".m.partial.lock"
    _killed(path, lockfiles.REMOVAL, holders)
    started_then = path.read_text().split()[3:]  # the killed process's start time (from this version on)
    now = _hold(path, "", holders)
    assert lockfiles.holder(path) == ""
    path.write_text(" ".join([lockfiles.REMOVAL, str(now.pid), lockfiles._this_host(), *started_then]))
    assert lockfiles.holder(path) == ""  # its id, another process
