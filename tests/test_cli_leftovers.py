"""What a killed `automask mask` / `batch` leaves beside its outputs (`.automask-*.part`, `.automask-*.old` and the
lock of the run that keeps them), and the tidying of it by a later run: only what no live automask holds."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from automask import cli_io, cli_leftovers, cli_outputs, lockfiles
from test_cli import invoke
from test_cli_output import SIGNAL_ON_FSYNC


@pytest.fixture()
def photo(chelsea: np.ndarray, tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(chelsea).resize((60, 40)).save(path)
    return path


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".automask-"))


def killed_at_fsync(n: int, *args: object) -> None:
    """Run `automask ARGS`, SIGKILLed while it writes its N-th output file (after the data, before the rename)."""
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_ON_FSYNC, str(n), "SIGKILL", *map(str, args)], capture_output=True, timeout=180
    )
    assert proc.returncode == -9, proc.stderr.decode()


def test_a_later_run_tidies_what_a_killed_mask_left(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a mask SIGKILLed while writing its instance masks, after it had replaced -o's file, left that file's
    hidden copy (`.automask-*.old`, a hard link) beside it and the instance being written (`.automask-*.part`) in the
    instances folder, for good: no run removed them. Now the next run writing there puts m.png back from its copy (the
    killed run did not succeed) and removes the `.part` and the lock of the killed run, a minute after their last
    change, and says so; unless m.png changed since the kill (here a second run wrote it while the killed run's lock
    was not a minute old): its copy is then left, and named, never put back over the later run's mask."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.png").write_bytes(b"the user's earlier mask")
    args = ["mask", photo, "-o", out / "m.png", "--instances", out / "i", "-p", "cat", "--model", tiny_clipseg_dir]
    killed_at_fsync(2, *args)  # the first instance mask, after m.png
    old, part = hidden(out), hidden(out / "i")
    assert [name.rsplit(".", 1)[-1] for name in old] == ["old", "lock"] and len(part) == 1, (old, part)
    assert (out / old[0]).read_bytes() == b"the user's earlier mask"

    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert hidden(out) == old and hidden(out / "i") == part  # written a moment ago: they may be a live run's
    assert "note:" not in again.stderr
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)  # a minute later
    third = invoke(*args)
    assert third.exit_code == 0, third.output
    assert hidden(out) == old and hidden(out / "i") == []  # m.png is the second run's mask: its copy is left
    assert (out / old[0]).read_bytes() == b"the user's earlier mask"
    assert third.stderr.splitlines()[0].startswith(
        f"note: left the copies a killed automask run kept of 1 file in '{out}', changed since: 'm.png' ("
    )
    (out / "m.png").unlink()  # gone: the copy is put back
    fourth = invoke(*args)
    assert fourth.exit_code == 0, fourth.output
    assert hidden(out) == []
    assert fourth.stderr.splitlines()[:2] == [  # m.png put back (the killed run failed), then masked again
        f"note: put back 1 file that a killed automask run had replaced in '{out}': 'm.png'",
        f"note: removed 1 file that killed automask runs left in '{out}': '{old[1]}'",
    ]
    assert f"note: removed 1 file that killed automask runs left in '{out / 'i'}': '{part[0]}'" in third.stderr


def test_a_killed_batch_leaves_a_part_the_next_batch_removes(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch killed mid-write left `OUTDIR/.automask-*.part` for good; a later batch into OUTDIR removes it."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(photo.read_bytes())
    args = ["batch", src, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir]
    killed_at_fsync(1, *args)
    assert len(hidden(out)) == 1 and hidden(out)[0].endswith(".part")
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


def test_what_a_live_run_holds_is_left_alone(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy a running mask keeps (its run's lock held) and a `.part` being written (locked) stay; so do a file
    that is not one of automask's names, and a `.part` changed within the last minute; a link is never followed."""
    out = tmp_path / "out"
    out.mkdir()
    held_lock = out / ".automask-0123abcd.lock"
    fd = lockfiles.lock(held_lock, wait=True)
    kept = [held_lock.name, ".automask-0123abcd-k2j4_x9a.old", ".automask-notmine.old", ".automask-live_one.part"]
    for name in kept[1:]:
        (out / name).write_bytes(b"x")
    part = os.open(out / ".automask-live_one.part", os.O_RDWR)
    fcntl.flock(part, fcntl.LOCK_EX)
    (out / ".automask-sym_link.part").symlink_to(photo)
    (out / ".automask-deadbeef-abcd_123.old").write_bytes(b"a killed run's, whose lock is gone")
    (out / ".automask-dead_one.part").write_bytes(b"a killed writer's")
    args = ["mask", photo, "-o", out / "m.png", "-p", "cat", "--model", tiny_clipseg_dir]
    try:
        fresh = invoke(*args)
        assert fresh.exit_code == 0, fresh.output
        assert ".automask-dead_one.part" in hidden(out)  # changed a moment ago
        monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)
        later = invoke(*args)
        assert later.exit_code == 0, later.output
        assert hidden(out) == sorted([*kept, ".automask-sym_link.part"])
        assert photo.exists()
    finally:
        os.close(part)
        lockfiles.unlock(held_lock, fd)


def test_a_file_system_without_locks_still_takes_outputs(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where `flock` fails (ENOLCK: some network file systems), a mask replacing a file and instance masks are still
    written, as before the locks, and leave nothing hidden; what no lock can tell about is never tidied."""

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    out = tmp_path / "out"
    out.mkdir()
    (out / "m.png").write_bytes(b"the user's earlier mask")
    (out / ".automask-dead_one.part").write_bytes(b"a killed writer's, or a live one's: no lock tells")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)
    result = invoke("mask", photo, "-o", out / "m.png", "--instances", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "m.png").size == (60, 40)
    assert hidden(out) == [".automask-dead_one.part"]


def test_a_part_is_held_until_it_is_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `.part` stays locked until its rename, so a tidying run that takes it for a killed writer's by its age (the
    writer stopped, Ctrl-Z, for over a minute, or a network file system's clock behind this one) leaves it. Before:
    its lock went with its closing, before its chmod and rename; a tidying then removed it, and the write failed,
    'Cannot write ...: No such file or directory', exit 8."""
    rename = os.replace
    tidied: list[cli_leftovers.Tidied] = []

    def tidy_then_rename(src: str, dst: str) -> None:
        tidied.append(cli_leftovers.tidy(tmp_path))
        rename(src, dst)

    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", -1.0)  # every .part old enough
    monkeypatch.setattr(os, "replace", tidy_then_rename)
    cli_io.write_atomic(tmp_path / "m.png", b"the mask")
    assert tidied == [cli_leftovers.Tidied([], [], [], [])] and (tmp_path / "m.png").read_bytes() == b"the mask"
    assert hidden(tmp_path) == []


def test_a_run_whose_lock_is_not_seen_is_left_for_a_minute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy and lock of a run changed within the last minute stay even when no lock is seen held: a run on another
    host, on a network file system whose locks are not shared (NFS mounted nolock or local_lock), is alive though its
    lock looks free here. Before: a run there removed them at once, and that live run, failing, could not put back
    the file it replaced."""
    names = [".automask-0123abcd.lock", ".automask-0123abcd-k2j4_x9a.old", ".automask-4567cdef-k2j4_x9a.old"]
    for name in names:  # the second run's lock file not seen yet (or gone): its copy is as fresh
        (tmp_path / name).write_bytes(b"x")
    assert cli_leftovers.tidy(tmp_path).gone == [] and hidden(tmp_path) == sorted(names)
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)  # a minute later: a killed run's
    assert sorted(p.name for p in cli_leftovers.tidy(tmp_path).gone) == sorted(names)
    assert hidden(tmp_path) == []


def killed(outputs: cli_outputs.Outputs) -> None:
    """What SIGKILL leaves of `outputs`' run: its copies and lock files as they are, the locks let go."""
    for fd in outputs.holds.held.values():
        if fd is not None:
            os.close(fd)
    outputs.holds.held = {}


def test_a_file_a_killed_run_had_replaced_is_put_back_never_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a mask killed after it had replaced the user's files (or while it put them back after a failure) left
    their only copies, `.automask-*.old`, and the next run into that folder deleted them: the user's files were gone,
    the killed run's outputs in their place. Now each copy's run records in its lock file which file it was kept
    for, and the tidying puts it back over that file (a file never replaced, its copy a second link to it, keeps
    its place); nothing of the user's is lost, and a note says what was put back."""
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)  # a minute later
    names = ["m.png", "00-cat.png", "odd\nname \xe9.png"]
    for name in names:
        (tmp_path / name).write_bytes(f"the user's {name}".encode())
    run = cli_outputs.Outputs()
    for name in names[:2]:
        run.write(tmp_path / name, b"the killed run's output")
    cli_outputs._kept(tmp_path / names[2], run.holds)  # killed before it replaced the third file
    run.files[0], kept = (run.files[0][0], None), run.files[0][1]
    assert kept is not None
    os.replace(kept, tmp_path / names[0])  # the first put back (`discard`), then killed
    killed(run)
    assert len(hidden(tmp_path)) == 3  # a copy of the second and the third file, and the run's lock
    tidied = cli_leftovers.tidy(tmp_path)
    assert [p.name for p in tidied.restored] == [names[1]]
    assert hidden(tmp_path) == []
    for name in names:
        assert (tmp_path / name).read_bytes() == f"the user's {name}".encode()


def test_the_copies_of_a_run_killed_once_it_succeeded_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed while it drops its copies (`keep`: it succeeded) leaves its outputs: the copies left are removed,
    never put back over them."""
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)
    (tmp_path / "m.png").write_bytes(b"the user's earlier mask")
    run = cli_outputs.Outputs()
    run.write(tmp_path / "m.png", b"the new mask")
    run.holds.settle()  # what `keep` does first
    killed(run)
    tidied = cli_leftovers.tidy(tmp_path)
    assert tidied.restored == [] and len(tidied.gone) == 2
    assert hidden(tmp_path) == [] and (tmp_path / "m.png").read_bytes() == b"the new mask"


def test_a_copy_whose_file_cannot_be_put_back_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy whose file is now no regular file (a folder, a link made there since) is neither put back nor removed:
    it stays, with the record of the file it was kept for, for a later tidying or the user."""
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)
    (tmp_path / "m.png").write_bytes(b"the user's earlier mask")
    run = cli_outputs.Outputs()
    run.write(tmp_path / "m.png", b"the new mask")
    killed(run)
    (tmp_path / "m.png").unlink()
    (tmp_path / "m.png").mkdir()
    left = hidden(tmp_path)
    assert cli_leftovers.tidy(tmp_path) == cli_leftovers.Tidied([], [], [], []) and hidden(tmp_path) == left
    (tmp_path / "m.png").rmdir()
    assert [p.name for p in cli_leftovers.tidy(tmp_path).restored] == ["m.png"]
    assert (tmp_path / "m.png").read_bytes() == b"the user's earlier mask" and hidden(tmp_path) == []


def test_a_file_changed_since_the_kill_is_never_put_back_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the tidying put a killed run's copy back over its file whatever that file had become since: a file the
    user wrote there after the kill (by hand, or a later run that succeeded while the killed run's lock was not a
    minute old) was overwritten with the data from before the killed run, lost. Now each run records what it wrote
    over the file (inode, size, mtime), and the copy is put back only over that; else it is left, and named."""
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)
    for name in ("edited.png", "rewritten.png", "same.png"):
        (tmp_path / name).write_bytes(b"the user's earlier mask")
    run = cli_outputs.Outputs()
    for name in ("edited.png", "rewritten.png", "same.png"):
        run.write(tmp_path / name, b"the killed run's mask")
    killed(run)
    with open(tmp_path / "edited.png", "r+b") as f:  # in place: the same inode, the same size
        f.write(b"THE USER'S NEW MASK!!")
    os.utime(tmp_path / "edited.png", ns=(0, 10**9))
    (tmp_path / "new").write_bytes(b"a later run's mask")
    os.replace(tmp_path / "new", tmp_path / "rewritten.png")
    left = hidden(tmp_path)
    tidied = cli_leftovers.tidy(tmp_path)
    assert [p.name for p in tidied.restored] == ["same.png"] and tidied.gone == []
    assert sorted(p.name for p in tidied.changed) == ["edited.png", "rewritten.png"]
    assert (tmp_path / "edited.png").read_bytes() == b"THE USER'S NEW MASK!!"
    assert (tmp_path / "rewritten.png").read_bytes() == b"a later run's mask"
    assert (tmp_path / "same.png").read_bytes() == b"the user's earlier mask"
    assert len(hidden(tmp_path)) == len(left) - 1  # the two copies and the lock stay, for the user
    for copy in hidden(tmp_path)[:-1]:
        assert (tmp_path / copy).read_bytes() == b"the user's earlier mask"


def test_two_runs_killed_over_one_file_put_back_the_first_ones_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs killed after replacing the same file, one after the other: the second's copy holds the first's output,
    the first's the user's file. Whatever order the tidying takes them in, the user's file is put back (before the
    second's put-back, the first's file looks changed since its kill: it is taken again once that is put back)."""
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)
    (tmp_path / "m.png").write_bytes(b"the user's earlier mask")
    for token in ("00000000", "ffffffff"):  # the first run's lock is tidied first
        run = cli_outputs.Outputs()
        run.holds.token = token
        run.write(tmp_path / "m.png", f"run {token}'s mask".encode())
        killed(run)
    tidied = cli_leftovers.tidy(tmp_path)
    assert (tmp_path / "m.png").read_bytes() == b"the user's earlier mask"
    assert hidden(tmp_path) == [] and tidied.changed == [] and len(tidied.restored) == 2


def test_an_older_automasks_copies_are_removed_only_when_their_data_has_another_name(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds before the run locks named a replaced file's copy `.automask-xxxxxxxx.old`, with no lock nor record of
    the file it kept; before, no run ever tidied them. Now, a minute after their last change, such a copy that is a
    second name of a file's data (a hard link to a file that was never replaced) is removed; one that may be the only
    copy of a user's file is left, and a note names it and says what to do; a link is never followed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.png").write_bytes(b"the user's mask, never replaced")
    os.link(out / "m.png", out / ".automask-abcd_123.old")
    (out / ".automask-only_one.old").write_bytes(b"the user's earlier mask, replaced")
    (out / ".automask-sym_link.old").symlink_to(out / "m.png")
    monkeypatch.setattr(cli_leftovers, "PART_AGE_S", 0.0)
    result = invoke("mask", photo, "-o", out / "n.png", "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert hidden(out) == [".automask-only_one.old", ".automask-sym_link.old"]
    assert (out / "m.png").read_bytes() == b"the user's mask, never replaced"
    assert result.stderr.splitlines()[:2] == [
        f"note: removed 1 file that killed automask runs left in '{out}': '.automask-abcd_123.old'",
        f"note: left 1 file in '{out}' that an older automask, killed, kept of files it had replaced, perhaps their "
        "only copies: '.automask-only_one.old' (rename each back over its file, or delete it)",
    ]
