"""Where the command line writes: `write_atomic` on regular files, symlinks, FIFOs and devices, standard output,
and `--instances` (nothing left behind when a run fails)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from automask.cli_io import NoSpaceError, OutputError, write_atomic
from test_cli import automask_command, invoke
from test_readme import README


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


# -- the mask command's outputs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(chelsea: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    Image.fromarray(chelsea).resize((60, 40)).save(path)
    return path


@pytest.mark.parametrize("how", ["same path", "relative", "symlink", "hard link"])
def test_mask_refuses_to_overwrite_its_input(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, how: str) -> None:
    """Before: `automask mask a.png -o a.png` replaced the photo with its mask."""
    image = tmp_path / "a.png"
    image.write_bytes(photo.read_bytes())
    out = {"same path": str(image), "relative": os.path.relpath(image), "symlink": str(tmp_path / "link.png")}
    out["hard link"] = str(tmp_path / "hard.png")
    (tmp_path / "link.png").symlink_to(image)
    os.link(image, tmp_path / "hard.png")
    result = invoke("mask", image, "-p", "cat", "--model", tiny_clipseg_dir, "-o", out[how])
    assert result.exit_code == 2, result.output
    why = "is the input image: writing the mask there would replace it. Name another file."
    assert result.stderr == f"error: --output: '{out[how]}' {why}\n"
    assert image.read_bytes() == photo.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "hard.png", "link.png"]


@pytest.mark.parametrize("output", ["-", "file"])
def test_a_failed_write_to_stdout_leaves_no_output(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, output: str
) -> None:
    out = tmp_path / "m.png"
    json_flag = [] if output == "-" else ["--json"]
    args = ["mask", photo, "-p", "cat", "--model", tiny_clipseg_dir, "-o", "-" if output == "-" else out, *json_flag]
    with open("/dev/full", "wb") as full:  # every write fails with ENOSPC; nothing is replaced or deleted
        proc = subprocess.run([*automask_command(), *map(str, args)], stdout=full, stderr=subprocess.PIPE, timeout=180)
    stderr = proc.stderr.decode()
    assert proc.returncode == 8, stderr
    assert stderr.splitlines()[-1] == "error: Cannot write to standard output: No space left on device."
    assert "Exception ignored" not in stderr and "Traceback" not in stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert list(tmp_path.iterdir()) == []  # the mask written before the JSON failed is removed


@pytest.mark.parametrize("through", ["file", "symlink"])
def test_a_failed_mask_puts_back_the_file_it_replaced(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, through: str
) -> None:
    """Before: `mask -o m.png --json > /dev/full` replaced an existing m.png with the new mask, then removed that
    when the JSON could not be written: the user's file was gone. Now a mask that fails leaves the file there as it
    was (its inode, so its hard links and mode too), and no copy of it behind."""
    old = tmp_path / "m.png"
    old.write_bytes(b"the user's earlier mask")
    old.chmod(0o640)
    inode = old.stat().st_ino
    out = old if through == "file" else tmp_path / "link.png"
    if through == "symlink":
        out.symlink_to("m.png")
    args = ["mask", photo, "-p", "cat", "--model", tiny_clipseg_dir, "-o", out, "--json"]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*automask_command(), *map(str, args)], stdout=full, stderr=subprocess.PIPE, timeout=180)
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.decode().splitlines()[-1] == "error: Cannot write to standard output: No space left on device."
    assert old.read_bytes() == b"the user's earlier mask"
    assert (old.stat().st_ino, stat.S_IMODE(old.stat().st_mode)) == (inode, 0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"m.png", out.name})


def test_a_mask_that_succeeds_replaces_the_file_and_keeps_no_copy(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path
) -> None:
    old = tmp_path / "m.png"
    old.write_bytes(b"the user's earlier mask")
    result = invoke("mask", photo, "-p", "cat", "--model", tiny_clipseg_dir, "-o", old)
    assert result.exit_code == 0, result.output
    assert Image.open(old).size == Image.open(photo).size
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_an_unusable_instances_folder_fails_before_anything_is_written(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path
) -> None:
    (tmp_path / "file.txt").write_text("a file, not a folder")
    out, folder = tmp_path / "m.png", tmp_path / "file.txt" / "instances"
    result = invoke("mask", photo, "-p", "cat", "--model", tiny_clipseg_dir, "-o", out, "--instances", folder, "--json")
    assert result.exit_code == 8, result.output
    assert result.stderr == f"error: Cannot write into '{folder}': Not a directory.\n"
    record = json.loads(result.stdout)
    assert record == {"input": str(photo), "ok": False, "error": result.stderr[7:-1], "exit_code": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_instances_failing_half_way_remove_every_output(
    monkeypatch: pytest.MonkeyPatch, tiny_clipseg_dir: Path, photo: Path, tmp_path: Path
) -> None:
    def half_way(result: Any, folder: Path, grow_mask: int, write: Any) -> list[Path]:
        write(folder / "00-cat.png", b"first instance")
        raise OutputError(f"Cannot write '{folder / '01-cat.png'}': No space left on device.")

    monkeypatch.setattr("automask.instances.save_instances", half_way)
    out, folder = tmp_path / "m.png", tmp_path / "new" / "instances"
    result = invoke("mask", photo, "-p", "cat", "--model", tiny_clipseg_dir, "-o", out, "--instances", folder, "--json")
    assert result.exit_code == 8, result.output
    assert json.loads(result.stdout)["exit_code"] == 8
    assert list(tmp_path.iterdir()) == []  # neither the mask, nor the first instance, nor the folders made for them


def test_mask_json_reports_a_failure_as_batch_does(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.png"
    args = ["mask", photo, "-p", "cat", "--model", tiny_clipseg_dir, "--threshold", "1", "--stop-on-empty-mask"]
    result = invoke(*args, "-o", out, "--json")
    assert result.exit_code == 5, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: Nothing matching")
    assert json.loads(result.stdout) == {"input": str(photo), "ok": False, "error": line[7:], "exit_code": 5}
    assert list(tmp_path.iterdir()) == []
    done = json.loads(invoke(*args[:-3], "-o", out, "--json").stdout)  # success: the same keys as batch's records
    assert done["ok"] is True and done["input"] == str(photo) and done["output"] == str(out)


def test_a_huge_prompt_is_not_echoed_whole(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path) -> None:
    args = ["mask", photo, "-p", "cat" * 2000, "--model", tiny_clipseg_dir, "--threshold", "1", "-o", tmp_path / "m"]
    for stop in ([], ["--stop-on-empty-mask"]):
        result = invoke(*args, *stop)
        assert result.exit_code == (5 if stop else 0), result.output
        (line,) = [line for line in result.stderr.splitlines() if line.startswith(("error:", "note:"))]
        assert "cat" * 20 in line and "cat" * 40 not in line and "…" in line


SIGNAL_ON_FSYNC = """
import os, signal, sys
from automask.cli import main
calls, fsync = [], os.fsync
def signal_on_fsync(fd):  # the N-th output file is being written (not a lock's record): a signal arrives
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".part"):
        calls.append(fd)
        if len(calls) == int(sys.argv[1]):
            os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    fsync(fd)
os.fsync = signal_on_fsync
main(sys.argv[3:], prog_name="automask")
"""


@pytest.mark.parametrize(("command", "signame", "code"), [("batch", "SIGTERM", 143), ("mask", "SIGHUP", 129)])
def test_a_terminated_run_leaves_no_partial_file(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, command: str, signame: str, code: int
) -> None:
    """Before: SIGTERM (`kill`, a scheduler's stop) or SIGHUP (a closed terminal) killed the process mid-write,
    leaving OUTDIR/.automask-*.part behind, and no line saying why."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a", "b"):
        (src / f"{name}.png").write_bytes(photo.read_bytes())
    where = [src, "-o", out] if command == "batch" else [src / "a.png", "-o", out / "m.png", "--instances", out / "i"]
    args = [command, *where, "-p", "cat", "--model", tiny_clipseg_dir]
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_ON_FSYNC, "2", signame, *map(str, args)], capture_output=True, timeout=180
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == code, stderr
    assert stderr.splitlines()[-1] == f"interrupted ({signame})" and "Traceback" not in stderr
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert left == (["a.png"] if command == "batch" else [])  # a finished file stays; a mask's outputs all go


@pytest.mark.parametrize(("name", "width"), [("m.webp", 16384), ("m.jpg", 65501)])
def test_an_image_too_wide_for_its_format(tiny_clipseg_dir: Path, tmp_path: Path, name: str, width: int) -> None:
    """Before: 'internal error: ValueError: encoding error 5: Image size exceeds WebP limit of 16383 pixels' (exit 70);
    a JPEG: 'OSError: broken data stream'."""
    image = tmp_path / "wide.png"
    Image.fromarray(np.full((2, width), 9, np.uint8)).save(image)
    out = tmp_path / "out" / name
    result = invoke("mask", image, "-p", "cat", "--model", tiny_clipseg_dir, "-o", out)
    assert result.exit_code == 8, result.output
    fmt, most = ("WEBP", 16383) if name.endswith("webp") else ("JPEG", 65500)
    why = f"a {fmt} image holds at most {most} pixels a side, this one is {width}×2; name it m.png or m.tif."
    assert result.stderr == f"error: Cannot write '{out}': {why}\n"
    assert not out.parent.exists()
    assert invoke("mask", image, "-p", "cat", "--model", tiny_clipseg_dir, "-o", out.with_suffix(".tif")).exit_code == 0


def test_an_interrupted_batch_says_what_it_did_and_left(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path) -> None:
    """Before: it ended with 'interrupted' only, not the summary line that tells what a re-run has left to do."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a", "b", "c", "d"):
        (src / f"{name}.png").write_bytes(photo.read_bytes())
    (src / "0-bad.png").write_bytes(b"not a png")
    args = ["batch", src, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir]
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_ON_FSYNC, "3", "SIGTERM", *map(str, args)], capture_output=True, timeout=180
    )
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.decode().splitlines()[-2:] == ["2 done, 1 failed, 2 not done", "interrupted (SIGTERM)"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_write_atomic_says_when_the_disk_is_full() -> None:
    """A full disk (ENOSPC, here /dev/full) is a `NoSpaceError`, which stops a batch (see test_cli_batch)."""
    with pytest.raises(NoSpaceError, match=r"Cannot write '/dev/full': No space left on device\."):
        write_atomic(Path("/dev/full"), b"png")


def on_a_terminal(args: list[Any], cwd: Path) -> tuple[Any, bytes]:
    """Run `automask ARGS` with stdout on a pseudo-terminal: (the process, stderr piped; what the terminal got)."""
    import pty
    import select

    leader, follower = pty.openpty()
    with os.fdopen(leader, "rb", buffering=0) as terminal:
        proc = subprocess.run(
            [*automask_command(), *map(str, args)], stdout=follower, stderr=subprocess.PIPE, cwd=cwd, timeout=180
        )
        os.close(follower)
        try:  # EIO once the terminal's other side is closed and nothing is left to read
            shown = terminal.read(65536) if select.select([terminal], [], [], 0.5)[0] else b""
        except OSError:
            shown = b""
    return proc, shown


def test_mask_refuses_to_write_a_png_to_a_terminal(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path) -> None:
    """Before: `automask mask IMG -p x -o -` typed at a prompt wrote the PNG's bytes into the terminal."""
    args = ["mask", photo, "-p", "cat", "--model", tiny_clipseg_dir, "-o", "-"]
    proc, shown = on_a_terminal(args, tmp_path)
    why = "'-' writes the PNG to standard output, which is a terminal: redirect it (-o - > mask.png, -o - | program)"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode() == f"error: --output: {why} or name a file.\n"
    assert shown == b"" and list(tmp_path.iterdir()) == []
    proc, shown = on_a_terminal([*args[:-1], "/dev/stdout"], tmp_path)  # the user insists
    assert proc.returncode == 0, proc.stderr
    assert shown.startswith(b"\x89PNG") and list(tmp_path.iterdir()) == []


def test_instances_of_an_earlier_run_are_removed(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path) -> None:
    """Before: a run finding fewer instances left the earlier run's extra masks in DIR, read as this run's."""
    folder = tmp_path / "inst"
    args = ["mask", photo, "--model", tiny_clipseg_dir, "--threshold", "0", "-o", tmp_path / "m.png", "--json"]
    first = json.loads(invoke(*args, "-p", "cat, grass", "--instances", folder).stdout)["instances"]
    assert [Path(p).name for p in first] == ["00-cat.png", "01-grass.png"]
    (folder / "notes.txt").write_text("the user's")
    (folder / "07.png").write_bytes(b"the user's, not named like an instance")
    shutil.copy(photo, folder / "05-beach.png")  # named like one, but a photo: kept
    result = invoke(*args, "-p", "dog", "--instances", folder)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["instances"] == [str(folder / "00-dog.png")]
    assert sorted(p.name for p in folder.iterdir()) == ["00-dog.png", "05-beach.png", "07.png", "notes.txt"]
    assert f"removed 2 instance masks of an earlier run from '{folder}'" in result.stderr.splitlines()


@pytest.mark.parametrize("which", ["output", "input"])
def test_an_instance_never_replaces_the_mask_or_the_input(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, which: str
) -> None:
    """Before: `-o DIR/00-cat.png --instances DIR` wrote the first instance over the mask (an input there too)."""
    folder = tmp_path / "inst"
    folder.mkdir()
    named = folder / "00-cat.png"
    image, out = (photo, named) if which == "output" else (named, tmp_path / "m.png")
    if which == "input":
        named.write_bytes(photo.read_bytes())
    args = ["mask", image, "-p", "cat", "--model", tiny_clipseg_dir, "--threshold", "0", "-o", out]
    result = invoke(*args, "--instances", folder)
    assert result.exit_code == 2, result.output
    flag = "--output" if which == "output" else "IMAGE"
    why = f"is where --instances '{folder}' could write an instance mask (00-cat.png), which would replace it"
    assert result.stderr == f"error: {flag}: '{named}' {why}: name it otherwise, or give --instances another folder.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inst"]
    assert [p.name for p in folder.iterdir()] == ([] if which == "output" else ["00-cat.png"])
    assert which == "output" or named.read_bytes() == photo.read_bytes()


def test_files_in_the_instances_folder_named_like_instances_are_decided_by_the_tag(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path
) -> None:
    """Before: any input or -o in DIR named like an instance ('01-beach.png', a photo) was refused by its name,
    although no instance of the run would take it; and a tagged instance mask given as the input was then removed
    as stale."""
    folder = tmp_path / "inst"
    folder.mkdir()
    beach = folder / "01-beach.png"
    shutil.copy(photo, beach)
    args = ["--model", tiny_clipseg_dir, "--threshold", "0", "--instances", folder, "--json"]
    result = invoke("mask", beach, "-p", "cat", "-o", folder / "05-mask.png", *args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["instances"] == [str(folder / "00-cat.png")]
    assert sorted(p.name for p in folder.iterdir()) == ["00-cat.png", "01-beach.png", "05-mask.png"]
    assert beach.read_bytes() == photo.read_bytes()
    again = invoke("mask", folder / "00-cat.png", "-p", "dog", "-o", tmp_path / "m.png", *args)  # an instance mask
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in folder.iterdir()) == ["00-cat.png", "00-dog.png", "01-beach.png", "05-mask.png"]


def test_an_instance_never_replaces_a_file_without_the_tag(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path) -> None:
    """Instance masks written before the tag existed (or the user's files named so) are the user's: a run whose
    instance would replace one is refused before it writes anything, and one it would not replace is kept."""
    from automask.result import encode_png

    folder = tmp_path / "inst"
    folder.mkdir()
    untagged = encode_png(np.zeros((40, 60), np.uint8))
    for name in ("00-cat.png", "03-dog.png"):
        (folder / name).write_bytes(untagged)
    args = ["mask", photo, "--model", tiny_clipseg_dir, "--threshold", "0", "-o", tmp_path / "m.png"]
    refused = invoke(*args, "-p", "cat", "--instances", folder)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr == (
        f"error: --instances: '{folder / '00-cat.png'}' is not an instance mask automask wrote (it carries no "
        "automask tag), and an instance mask of this prompt could replace it: move it, or give --instances another "
        "folder.\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inst"]
    assert all((folder / name).read_bytes() == untagged for name in ("00-cat.png", "03-dog.png"))
    done = invoke(*args, "-p", "grass", "--instances", folder)
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in folder.iterdir()) == ["00-cat.png", "00-grass.png", "03-dog.png"]


def test_stale_instances_are_only_automask_instance_masks(tmp_path: Path) -> None:
    from automask.instances import INSTANCE_TAG, stale_instances
    from automask.result import encode_png

    mask = np.zeros((4, 5), np.uint8)
    for name in ("00-cat.png", "01-cat.png", "02-a-b.png", "100-cat.png", "1-cat.png", "03-Cat.png"):
        (tmp_path / name).write_bytes(encode_png(mask, text=dict([INSTANCE_TAG])))
    (tmp_path / "04-photo.png").write_bytes(encode_png(mask))  # named so, not tagged: the user's
    (tmp_path / "05-broken.png").write_bytes(b"not a png")
    os.mkfifo(tmp_path / "06-fifo.png")  # never opened (that would wait for a writer)
    (tmp_path / "07-dir.png").mkdir()
    stale = stale_instances(tmp_path, [tmp_path / "00-cat.png"])
    assert [p.name for p in stale] == ["01-cat.png", "02-a-b.png", "100-cat.png"]


def test_mask_names_a_file_that_is_not_utf8_as_json_does(tiny_clipseg_dir: Path, photo: Path, tmp_path: Path) -> None:
    """Before: 'wrote .../caf\\udce9.mask.png' on stderr (Python's escape of a surrogate), 'caf\\xe9' in the JSON."""
    image = tmp_path / os.fsdecode(b"caf\xe9.png")
    shutil.copy(photo, image)
    folder = tmp_path / os.fsdecode(b"inst\xff")
    args = ["mask", image, "-p", "cat", "--model", tiny_clipseg_dir, "--threshold", "0", "--json"]
    args += ["--instances", folder]
    proc = subprocess.run([*automask_command(), *map(str, args)], capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.decode("utf-8"))
    assert record["output"] == str(tmp_path / "caf\\xe9.mask.png")
    assert f"wrote 1 instance masks into '{tmp_path / 'inst'}\\xff'" in proc.stderr.decode().splitlines()
    assert proc.stderr.decode().splitlines()[-1].startswith(f"wrote '{record['output']}': mask 60×40")


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`automask.cli.load_generator` replaced: the list of the models a run loaded (a refusal before inference
    loads none)."""
    loaded: list[str] = []

    def load(job: Any, settings: Any) -> Any:
        loaded.append(job.model)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("automask.cli.load_generator", load)
    return loaded


@pytest.mark.parametrize("which", ["output", "input", "untagged"])
def test_instance_clashes_are_refused_before_the_model_runs(
    no_model: list[str], photo: Path, tmp_path: Path, which: str
) -> None:
    """Before: `-o DIR/02-cat.png --instances DIR -p cat` (the input there, or a file without automask's tag) was
    refused only once the model had run, after the wait, and only when it found that many cats. Now a file an
    instance of the prompt may take (`NN-cat.png`, `NN-grass.png`) is refused before the model loads."""
    folder = tmp_path / "inst"
    folder.mkdir()
    named = folder / "02-grass.png"
    image, out = (photo, named) if which == "output" else (named, tmp_path / "m.png")
    if which != "output":
        shutil.copy(photo, named)
    if which == "untagged":
        image = photo
    shutil.copy(photo, folder / "03-dog.png")  # no instance of this prompt takes it: fine
    result = invoke("mask", image, "-p", "cat, grass", "--model", "clipseg", "-o", out, "--instances", folder)
    assert result.exit_code == 2, result.output
    assert no_model == []
    if which == "untagged":
        assert result.stderr == (
            f"error: --instances: '{named}' is not an instance mask automask wrote (it carries no automask tag), and "
            "an instance mask of this prompt could replace it: move it, or give --instances another folder.\n"
        )
    else:
        flag = "--output" if which == "output" else "IMAGE"
        why = f"is where --instances '{folder}' could write an instance mask (02-grass.png), which would replace it"
        fix = "name it otherwise, or give --instances another folder"
        assert result.stderr == f"error: {flag}: '{named}' {why}: {fix}.\n"
    assert sorted(p.name for p in folder.iterdir()) == ([] if which == "output" else [named.name]) + ["03-dog.png"]


def test_an_output_that_cannot_be_written_is_refused_before_the_model_runs(
    no_model: list[str], photo: Path, tmp_path: Path
) -> None:
    """Before: `mask -o FILE/m.png` (a file on the output's path) loaded the model and masked, then exited 8."""
    (tmp_path / "file.txt").write_text("a file, not a folder")
    out = tmp_path / "file.txt" / "m.png"
    result = invoke("mask", photo, "-p", "cat", "--model", "clipseg", "-o", out)
    assert result.exit_code == 8, result.output
    assert no_model == []
    assert result.stderr == f"error: Cannot write into '{out.parent}': Not a directory.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.parametrize(
    ("closed", "args", "code", "error"),
    [
        (0, ["mask", "-"], 3, "Standard input is closed: pipe an image in, e.g. automask mask - < a.jpg"),
        (1, ["mask", "{photo}", "-o", "-"], 8, "Cannot write to standard output: it is closed."),
        (1, ["mask", "{photo}", "-o", "{tmp}/m.png", "--json"], 8, "Cannot write to standard output: it is closed."),
        (1, ["batch", "{photo}", "-o", "{tmp}/out", "--json"], 8, "Cannot write to standard output: it is closed."),
    ],
)
def test_a_closed_standard_stream_is_an_error_before_the_work(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, closed: int, args: list[str], code: int, error: str
) -> None:
    """Before: `mask - <&-`, `mask -o - >&-` and `--json >&-` (a closed standard input or output, as a service
    manager or a script can leave it) were internal errors (exit 70: "AttributeError: 'NoneType' object has no
    attribute 'buffer'", 'isatty', 'flush'), the last after masking. Now standard input closed is an image that
    cannot be read (exit 3), standard output closed one that cannot be written (exit 8), said before any work:
    nothing is written."""
    filled = [a.format(photo=photo, tmp=tmp_path) for a in args]
    command = [*automask_command(), *filled, "-p", "cat", "--model", str(tiny_clipseg_dir)]
    proc = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=180,
        preexec_fn=lambda: os.close(closed),
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == code, stderr
    assert stderr == f"error: {error}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "why"), [("loop.png", "Too many levels of symbolic links"), ("a" * 300 + ".png", "File name too long")]
)
def test_an_output_name_the_system_refuses_is_refused_before_the_model_runs(
    no_model: list[str], photo: Path, tmp_path: Path, name: str, why: str
) -> None:
    """Before: `-o` naming a symbolic link loop, or a name too long for the file system, loaded the model and
    masked, then exited 8. Now it exits 8 before the model loads."""
    (tmp_path / "loop.png").symlink_to("loop.png")
    out = tmp_path / name
    result = invoke("mask", photo, "-p", "cat", "--model", "clipseg", "-o", out)
    assert result.exit_code == 8, result.output
    assert no_model == []
    assert result.stderr == f"error: Cannot write '{out}': {why}.\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loop.png"]


def _exits_8_with_stdout_closed(tmp_path: Path, command: list[str]) -> None:
    """`automask --data-dir TMP COMMAND` run with its standard output closed: exit 8 with the closed-stdout error."""
    proc = subprocess.run(
        [*automask_command(), "--data-dir", str(tmp_path), *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=120,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.decode() == "error: Cannot write to standard output: it is closed.\n"


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_models_list_with_standard_output_closed_exits_8(tmp_path: Path, flags: list[str]) -> None:
    """Before: `models list >&-` was 'internal error: AttributeError: ... isatty', exit 70 (and `--json >&-`
    printed nothing and exited 0). Now it is an output that cannot be written, exit 8, as for mask and batch."""
    _exits_8_with_stdout_closed(tmp_path, ["models", "list", *flags])


@pytest.mark.parametrize("command", [["keys", "create"], ["keys", "list"], ["keys", "list", "--json"]])
def test_keys_commands_with_standard_output_closed_exit_8_before_the_work(tmp_path: Path, command: list[str]) -> None:
    """Before: `keys create >&-` created the key and lost its token (printed once, to a closed stdout), exit 0;
    `keys list >&-` printed nothing, exit 0. Now: exit 8 before the work, no key created, as for mask and batch."""
    _exits_8_with_stdout_closed(tmp_path, command)
    listed = subprocess.run(
        [*automask_command(), "--data-dir", str(tmp_path), "keys", "list", "--json"], capture_output=True, timeout=120
    )
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr  # no key was created


def test_an_output_folder_that_cannot_be_written_is_named_as_given(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `mask a.jpg -o notes.txt/m.png` (a file on the path) said "Cannot write into '/home/me/.../notes.txt'",
    the absolute path resolved, where batch names OUTDIR as given. Now mask names it as given too (a link as -o is
    still followed: its target's folder is checked)."""
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("a file, not a folder")
    Path("link.png").symlink_to("notes.txt/m.png")
    for out, folder in (("notes.txt/m.png", "notes.txt"), ("link.png", str(tmp_path / "notes.txt"))):
        result = invoke("mask", photo, "-p", "cat", "--model", tiny_clipseg_dir, "-o", out)
        assert result.exit_code == 8, result.output
        assert result.stderr == f"error: Cannot write into '{folder}': Not a directory.\n"


def mask_reading(image: str, stdin: Any, cwd: Path, model: Path, *out: object) -> Any:
    """`automask mask IMAGE -p cat --model MODEL OUT...` run in `cwd` with standard input `stdin`."""
    return subprocess.run(
        [*automask_command(), "mask", image, "-p", "cat", "--model", str(model), *map(str, out)],
        stdin=stdin,
        capture_output=True,
        cwd=cwd,
        timeout=180,
    )


def mask_from_a_file_on_stdin(image: str, photo: Path, cwd: Path, model: Path, *out: object) -> Any:
    """`automask mask IMAGE ... < photo` run in `cwd`."""
    with open(photo, "rb") as stdin:
        return mask_reading(image, stdin, cwd, model, *out)


def test_dev_stdin_redirected_from_a_file_writes_as_standard_input_does(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path
) -> None:
    """Before: `automask mask /dev/stdin -p cat < photo.png` wrote '/dev/stdin.mask.png' (beside the name given: into
    /dev, as root; exit 8 for anyone else). Now /dev/stdin, /dev/fd/N and /proc/self/fd/N are read as standard
    input is, and write ./mask.png by default."""
    stray = Path("/dev/stdin.mask.png")
    try:
        for name in ("/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"):
            proc = mask_from_a_file_on_stdin(name, photo, tmp_path, tiny_clipseg_dir)
            assert proc.returncode == 0, proc.stderr.decode()
            assert proc.stderr.decode().splitlines()[-1].startswith("wrote 'mask.png': mask 60×40")
            assert Image.open(tmp_path / "mask.png").size == (60, 40) and not stray.exists()
            (tmp_path / "mask.png").unlink()
    finally:
        stray.unlink(missing_ok=True)


@pytest.mark.parametrize("image", ["-", "/dev/stdin"])
def test_standard_input_read_from_the_output_file_is_never_replaced(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, image: str
) -> None:
    """Before: `automask mask - -p cat -o photo.png < photo.png` replaced the photo with its mask. Now standard input
    redirected from a file is that input file: an -o naming it is refused, as for a path, before any work."""
    mine = tmp_path / "photo.png"
    mine.write_bytes(photo.read_bytes())
    proc = mask_from_a_file_on_stdin(image, mine, tmp_path, tiny_clipseg_dir, "-o", "photo.png")
    assert proc.returncode == 2, proc.stderr.decode()
    why = "is the input image: writing the mask there would replace it. Name another file."
    assert proc.stderr.decode().splitlines()[-1] == f"error: --output: 'photo.png' {why}"
    assert mine.read_bytes() == photo.read_bytes()


@pytest.mark.parametrize("image", ["-", "/dev/stdin", "/dev/fd/0"])
def test_stdin_on_a_terminal_is_refused_by_any_name(tiny_clipseg_dir: Path, tmp_path: Path, image: str) -> None:
    """`automask mask - ...` with nothing piped in (standard input a terminal) is a usage error, exit 2; so are its
    other names, read as standard input is. Before: `mask /dev/stdin -p cat` waited for an image typed on the
    terminal (until Ctrl-D, then 'cannot identify image file'), where `mask -` said nothing is piped in."""
    import pty

    parent, child = pty.openpty()
    try:
        proc = mask_reading(image, child, tmp_path, tiny_clipseg_dir)
    finally:
        os.close(child)
        os.close(parent)
    assert proc.returncode == 2, proc.stderr.decode()
    assert "nothing is piped in" in proc.stderr.decode().splitlines()[-1], proc.stderr.decode()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("image", ["-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"])
def test_standard_input_that_is_a_socket_is_read_by_any_name(
    tiny_clipseg_dir: Path, photo: Path, tmp_path: Path, image: str
) -> None:
    """Before: `automask mask /dev/stdin` with standard input a socket (a service's inetd/systemd socket, `ssh host
    automask ...` under some set-ups) exited 3, "Cannot read '/dev/stdin': No such device or address" (Linux cannot
    open a socket by its /proc name), where `mask -` read it. Now every name of standard input reads the socket."""
    import socket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(photo.read_bytes())
        ours.shutdown(socket.SHUT_WR)
        proc = mask_reading(image, theirs, tmp_path, tiny_clipseg_dir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert Image.open(tmp_path / "mask.png").size == (60, 40)


@pytest.mark.parametrize("image", ["/dev/stdin", "/dev/fd/0"])
def test_an_empty_stream_by_name_is_refused_as_empty_standard_input_is(tmp_path: Path, image: str) -> None:
    """Before: `automask mask /dev/stdin -p cat < /dev/null` went on to load the model (exit 4 without one, else the
    decoder's 'cannot identify image file'), where `mask - < /dev/null` said standard input was empty, exit 3, before
    any work. Now a stream by any name that gives no byte says so the same way."""
    proc = mask_reading(image, subprocess.DEVNULL, tmp_path, tmp_path / "no-such-model")
    assert proc.returncode == 3, proc.stderr.decode()
    assert proc.stderr.decode() == f"error: '{image}' was empty: pipe an image in, e.g. automask mask - < a.jpg\n"


def test_standard_input_from_a_folder_stops_python_as_readme_says(tmp_path: Path) -> None:
    """`automask mask - < photos` (standard input a folder): CPython refuses it before any of automask runs, so no
    exit code of automask's can answer it; README says what the user sees instead, and this holds it to that."""
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        proc = mask_reading("-", folder, tmp_path, tmp_path / "no-such-model")
    finally:
        os.close(folder)
    said = "Fatal Python error: init_sys_streams: <stdin> is a directory, cannot continue"
    assert proc.returncode == 1 and proc.stderr.decode().startswith(said), proc.stderr.decode()
    assert f"`{said}` and exits 1" in " ".join(README.split())
