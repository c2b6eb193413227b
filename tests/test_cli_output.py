"""Where the command line writes: `write_atomic` on regular files, symlinks, FIFOs and devices, standard output,
and `--instances` (nothing left behind when a run fails)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from automask.cli_io import write_atomic


def test_write_atomic_takes_a_long_file_name(tmp_path: Path) -> None:
    target = tmp_path / ("m" * 240 + ".png")  # 244 characters: valid where names may have 255
    write_atomic(target, b"png")
    assert target.read_bytes() == b"png"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_write_atomic_writes_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "target.png").write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real / "target.png")
    write_atomic(link, b"new")
    assert link.is_symlink() and os.readlink(link) == str(real / "target.png")
    assert (real / "target.png").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "real"]
    assert [p.name for p in real.iterdir()] == ["target.png"]  # the temp file was made beside the target


def test_write_atomic_creates_the_target_of_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "later.png")
    write_atomic(link, b"new")
    assert link.is_symlink() and (tmp_path / "later.png").read_bytes() == b"new"


def test_write_atomic_writes_into_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_atomic(fifo, b"through the pipe")
    reader.join(timeout=10)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO, not replaced by a regular file
    assert [p.name for p in tmp_path.iterdir()] == ["fifo.png"]


def test_write_atomic_writes_into_a_device(tmp_path: Path) -> None:
    """A character device of our own (a copy of /dev/null's numbers, made in tmp_path): written, never replaced."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    node = tmp_path / "null"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("this container may not make device nodes")
    write_atomic(node, b"discarded")
    assert stat.S_ISCHR(os.stat(node).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["null"]
