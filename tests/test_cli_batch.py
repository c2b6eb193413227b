"""`automask batch`: which files it takes (the output folder may be the input folder), a source that does not
exist, and a model-level error that stops the run at once."""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes
from test_cli import automask_command, error_lines, invoke


@pytest.fixture()
def folder(chelsea: np.ndarray, tmp_path: Path) -> Path:
    """b/a.jpg and b/b.png: two small photos."""
    path = tmp_path / "b"
    path.mkdir()
    (path / "a.jpg").write_bytes(jpeg_bytes(chelsea[:40, :60]))
    Image.fromarray(chelsea[:30, :50]).save(path / "b.png")
    return path


def test_batch_into_its_own_folder_masks_the_images(tiny_clipseg_dir: Path, folder: Path) -> None:
    result = invoke("batch", folder, "-o", folder, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "a.png", "b-2.png", "b.png"]  # inputs kept
    assert Image.open(folder / "b-2.png").size == (50, 30) and Image.open(folder / "a.png").size == (60, 40)
    assert result.stderr.rstrip().endswith("2 done, 0 failed")


def test_batch_into_a_parent_folder_masks_the_images(tiny_clipseg_dir: Path, folder: Path) -> None:
    result = invoke("batch", folder, "-o", folder.parent, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.parent.iterdir()) == ["a.png", "b", "b.png"]


def test_batch_into_a_subfolder_skips_the_subfolder(tiny_clipseg_dir: Path, folder: Path) -> None:
    out = folder / "masks"
    out.mkdir()
    (out / "old.png").write_bytes((folder / "b.png").read_bytes())  # an output of an earlier run: not an input
    result = invoke("batch", folder, "-r", "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "old.png"]


def test_batch_to_stdout_is_a_usage_error(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `-o -` made a folder named '-' and wrote the masks into it."""
    monkeypatch.chdir(tmp_path)
    result = invoke("batch", folder, "-o", "-", "-p", "cat", "--model", tmp_path / "no-such-model")
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: --output: '-' is standard output, but batch writes one file per image into a folder")
    assert "automask mask IMAGE -o -" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_batch_of_a_missing_source_says_it_does_not_exist(tmp_path: Path) -> None:
    result = invoke("batch", tmp_path / "nonexist", "-p", "subject", "-o", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: DIR_OR_GLOB: no such file or folder: '{tmp_path / 'nonexist'}'.\n"
    glob = invoke("batch", f"{tmp_path}/*.jpg", "-p", "subject", "-o", tmp_path / "x")  # a glob may match nothing
    assert glob.exit_code == 2 and "no images found" in glob.stderr
    assert not (tmp_path / "x").exists()


def test_batch_stops_at_a_model_level_error(tiny_clipseg_dir: Path, folder: Path, tmp_path: Path) -> None:
    """--refine with no SAM installed: every file would fail the same way. A bad file before it is still skipped."""
    (folder / "0-broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    result = invoke("batch", folder, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--refine", "--json")
    assert result.exit_code == 4, result.output
    broken, model = error_lines(result.stderr)
    assert broken.startswith(f"error: {folder / '0-broken.jpg'}: ")
    assert model.startswith("error: ") and "automask models pull" in model and "a.jpg" not in model
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(r["input"]).name, r["exit_code"]) for r in records] == [("0-broken.jpg", 3), ("a.jpg", 4)]
    assert records[1]["error"] == model.removeprefix("error: ")
    assert not out.exists() or list(out.iterdir()) == []  # b.png was not tried


def test_batch_into_a_folder_it_cannot_write_stops_before_masking(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path
) -> None:
    """Before: every file was masked, then failed to be written, one error line each, exit 1."""
    (tmp_path / "file.txt").write_text("a file, not a folder")
    out = tmp_path / "file.txt" / "masks"
    result = invoke("batch", folder, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json")
    assert result.exit_code == 8, result.output
    assert result.stderr == f"error: Cannot write into '{out}': Not a directory.\n"
    assert result.stdout == ""


def test_batch_leaves_no_empty_folder_when_nothing_is_written(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "masks"
    result = invoke("batch", folder, "-o", out, "-p", "cat", "--model", tmp_path / "no-such-model")
    assert result.exit_code == 4, result.output
    assert not (tmp_path / "new").exists()


def test_batch_takes_a_file_named_like_a_glob(tiny_clipseg_dir: Path, folder: Path, tmp_path: Path) -> None:
    """Before: 'photo[1].jpg' was read as a glob (matching 'photo1.jpg'): 'no images found', exit 2."""
    photo = folder / "photo[1].jpg"
    (folder / "a.jpg").rename(photo)
    result = invoke("batch", photo, "-o", tmp_path / "out", "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["photo[1].png"]


def as_a_user(command: list[str]) -> list[str]:
    """`command`, run so that file permissions apply to it: as root, without the capabilities that override them."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("as root, file permissions apply only without CAP_DAC_OVERRIDE (setpriv drops it)")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]


@pytest.mark.parametrize(("source", "flags"), [("locked", []), ("locked/*.jpg", []), ("locked", ["-r"])])
def test_batch_of_a_folder_it_cannot_read_says_so(tmp_path: Path, source: str, flags: list[str]) -> None:
    """Before: 'internal error: PermissionError: [Errno 13] Permission denied: ...', exit 70 (with -r: 'no images
    found')."""
    locked = tmp_path / "locked"
    locked.mkdir()
    out, model = tmp_path / "out", tmp_path / "no-such-model"
    args = ["batch", tmp_path / source, *flags, "-o", out, "-p", "cat", "--model", model]
    locked.chmod(0)
    try:
        proc = subprocess.run(as_a_user([*automask_command(), *map(str, args)]), capture_output=True, timeout=120)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.decode() == f"error: Cannot read '{tmp_path / source}': Permission denied.\n"


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (["mask", "locked/c.jpg", "-o", "m.png"], 3, "Cannot read 'locked/c.jpg': Permission denied."),
        (["mask", "a.jpg", "-o", "locked/m.png"], 8, "Cannot write into 'locked': Permission denied."),
        (["batch", "locked/c.jpg", "a.jpg", "-o", "out"], 3, "Cannot read 'locked/c.jpg': Permission denied."),
        (["batch", "a.jpg", "-o", "locked/out"], 8, "Cannot write into 'locked/out': Permission denied."),
        (["batch", "a.jpg", "-o", "loop"], 8, "Cannot write into 'loop': Too many levels of symbolic links."),
    ],
)
def test_a_path_through_a_folder_it_cannot_search_says_so(
    tmp_path: Path, args: list[str], code: int, error: str
) -> None:
    """Before: an IMAGE or `-o` inside a folder without search permission (mode 0), where `Path.exists` and
    `Path.is_dir` raise instead of answering, was 'internal error: PermissionError: [Errno 13] Permission denied:
    ...', exit 70; so was such a file among several given to batch, and a batch OUTDIR there (or a link loop:
    RuntimeError). Now: the image cannot be read (exit 3), the output cannot be written (exit 8), before the
    model loads (none is installed)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "a.jpg").write_bytes(b"not read: the run stops before")
    (locked / "c.jpg").write_bytes(b"not read either")
    (tmp_path / "loop").symlink_to("loop")
    command = [*automask_command(), *args, "-p", "cat", "--model", str(tmp_path / "no-such-model")]
    locked.chmod(0)
    try:
        proc = subprocess.run(as_a_user(command), capture_output=True, timeout=120, cwd=tmp_path)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.decode() == f"error: {error.format(tmp=tmp_path)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "locked", "loop"]


@pytest.mark.parametrize("command", ["mask", "batch"])
@pytest.mark.parametrize(
    ("name", "why"), [("loop.jpg", "Too many levels of symbolic links"), ("a" * 300, "File name too long")]
)
def test_an_image_path_the_system_cannot_look_up_says_why(tmp_path: Path, command: str, name: str, why: str) -> None:
    """Before: an IMAGE that is a symbolic link loop was 'no such file' (though `ls` lists it); one whose name is too
    long for the file system, also among several files given to batch, was 'internal error: OSError: [Errno 36] File
    name too long', exit 70. Now both are an image that cannot be read, exit 3, with the system's reason (and the
    links of a loop). A loop among several files given to batch is noted and skipped instead, as a glob's is (see
    `test_batch_of_several_files_notes_a_link_among_them_that_leads_to_no_file`)."""
    (tmp_path / "loop.jpg").symlink_to("loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to("loop.jpg")
    (tmp_path / "a.jpg").write_bytes(b"not read: the run stops before")
    image = tmp_path / name
    given = [image] if command == "mask" else [image, tmp_path / "a.jpg", "-o", tmp_path / "out"]
    result = invoke(command, *given, "-p", "cat", "--model", tmp_path / "no-such-model")
    if command == "batch" and name == "loop.jpg":
        assert result.exit_code == 4, result.output  # the model, after the inputs were found
        noted = f"note: 1 link skipped: it leads to no file (dangling, or a link loop): '{image}'."
        assert result.stderr.startswith(noted)
        return
    assert result.exit_code == 3, result.output
    loop = f" (a link loop: '{image}' -> 'loop2.jpg' -> 'loop.jpg')" if name == "loop.jpg" else ""
    assert result.stderr == f"error: Cannot read '{image}': {why}{loop}.\n"


@pytest.mark.parametrize(
    ("source", "error"),
    [("a.jpg/x.jpg", "no such file: '{source}'."), ("a.jpg/*.jpg", "no images found in '{source}'.")],
)
def test_a_path_below_a_file_among_several_is_a_usage_error(tmp_path: Path, source: str, error: str) -> None:
    """Before (since batch said why it could not look a path up): a file, or a quoted glob, below a file (`a.jpg/x.jpg`:
    'Not a directory', which is a path that does not exist) among several was 'Cannot read ...: Not a directory.',
    exit 3. Now it is what a path that does not exist is, a usage error (exit 2), as it was and as alone."""
    (tmp_path / "a.jpg").write_bytes(b"not read: the run stops before")
    given = str(tmp_path / source)
    result = invoke("batch", given, tmp_path / "a.jpg", "-o", tmp_path / "out", "-p", "cat", "--model", tmp_path / "m")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: DIR_OR_GLOB: {error.format(source=given)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


def test_an_outdir_below_a_file_is_checked_after_the_inputs(tmp_path: Path) -> None:
    """Before (since batch checked first that OUTDIR could be looked up): an OUTDIR below a file (`a.jpg/out`, 'Not
    a directory': one that does not exist yet, which `-o` creates) was refused before the inputs were looked for, so
    a source that does not exist, a usage error (exit 2), became exit 8. Now the inputs come first, as they did; the
    OUTDIR is then refused as before any work."""
    (tmp_path / "a.jpg").write_bytes(b"not read: the run stops before")
    out = tmp_path / "a.jpg" / "out"
    args = ["-o", out, "-p", "cat", "--model", tmp_path / "m"]
    missing = invoke("batch", tmp_path / "missing.jpg", *args)
    assert missing.exit_code == 2, missing.output
    assert missing.stderr == f"error: DIR_OR_GLOB: no such file or folder: '{tmp_path / 'missing.jpg'}'.\n"
    found = invoke("batch", tmp_path / "a.jpg", *args)
    assert found.exit_code == 8, found.output
    assert found.stderr == f"error: Cannot write into '{out}': Not a directory.\n"


def test_batch_recursive_reports_a_subfolder_it_cannot_read(tiny_clipseg_dir: Path, folder: Path) -> None:
    """Before: the images of an unreadable subfolder were skipped silently, and the run said '2 done, 0 failed'."""
    locked = folder / "locked"
    locked.mkdir()
    (locked / "c.jpg").write_bytes((folder / "a.jpg").read_bytes())
    out = folder.parent / "out"
    args = ["batch", folder, "-r", "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json"]
    locked.chmod(0)
    try:
        proc = subprocess.run(as_a_user([*automask_command(), *map(str, args)]), capture_output=True, timeout=120)
    finally:
        locked.chmod(0o755)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    why = f"Cannot read the folder '{locked}': Permission denied; its images were not masked."
    assert error_lines(stderr) == [f"error: {locked}: {why}"]
    assert stderr.splitlines()[-1] == "2 done, 1 failed"
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records[0] == {"input": str(locked), "ok": False, "error": why, "exit_code": 3}
    assert [r["ok"] for r in records[1:]] == [True, True]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_batch_reports_a_file_with_a_line_break_in_its_name_on_one_line(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path
) -> None:
    """Before: 'error: .../bad' and 'name.jpg: <reason>' were two lines, breaking 'one line per failed file'."""
    (folder / "bad\nname.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = invoke("batch", folder, "-o", tmp_path / "out", "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 5 and lines[-1] == "2 done, 1 failed"
    (error,) = error_lines(result.stderr)
    assert error.startswith(f"error: {folder}/bad name.jpg: ") and lines[3] == f"[3/3] {folder}/bad name.jpg failed"


def test_a_glob_rerun_into_a_subfolder_skips_the_earlier_outputs(tiny_clipseg_dir: Path, folder: Path) -> None:
    """Before: a second `batch 'b/**/*.png' -r -o b/masks` masked the first run's masks too, as b.png.png and
    b.png-2.png (a folder source skipped them already)."""
    Image.open(folder / "a.jpg").save(folder / "a.png")
    out = folder / "masks"
    args = ["batch", f"{folder}/**/*.png", "-r", "-o", out, "-p", "cat", "--model", tiny_clipseg_dir]
    for _ in range(2):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert result.stderr.rstrip().endswith("2 done, 0 failed")
        assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_a_recursive_glob_does_not_follow_a_symlink_loop(tiny_clipseg_dir: Path, folder: Path, tmp_path: Path) -> None:
    """Before: glob's '**' followed b/sub/up -> b about 40 times (until ELOOP), masking a.jpg and b.png 41 times each
    (a.jpg.png, a.jpg-2.png, ...); with two such links the search never ended."""
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")
    out = tmp_path / "out"
    result = invoke("batch", f"{folder}/**/*.*", "-r", "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert result.stderr.rstrip().endswith("2 done, 0 failed")


@pytest.mark.parametrize("source", ["folder", "glob"])
def test_batch_follows_symlinked_folders_once_each(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path, source: str
) -> None:
    """Before: `-r` entered no symlinked folder, neither from a folder nor with a glob's '**' (which followed them
    before the link-loop fix): photos kept on another disk and linked in were skipped without a word. Now both
    follow them, each real folder once (two links to one folder, a link back into the tree or above it)."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    Image.open(folder / "b.png").save(elsewhere / "c.png")
    Image.open(folder / "b.png").save(elsewhere / "deep" / "d.png")
    (folder / "again").symlink_to(elsewhere)
    (folder / "more").symlink_to(elsewhere)  # the same folder by another link: not read twice
    (elsewhere / "back").symlink_to(folder)  # into the tree again: a loop
    (elsewhere / "deep" / "top").symlink_to(tmp_path)  # above the tree: a loop
    args = [folder] if source == "folder" else [f"{folder}/**/*.*"]
    result = invoke("batch", *args, "-r", "-o", tmp_path / "out", "-p", "cat", "--model", tiny_clipseg_dir, "--json")
    assert result.exit_code == 0, result.output
    inputs = sorted(json.loads(line)["input"] for line in result.stdout.splitlines())
    assert inputs == [str(folder / name) for name in ("a.jpg", "again/c.png", "again/deep/d.png", "b.png")]
    assert result.stderr.rstrip().endswith("4 done, 0 failed")


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (mounting one needs root) with room left for two small files only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", disk], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        (disk / "room").write_bytes(b"x" * 8192)  # two pages, freed below for the first two masks
        with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as filler:
            while True:
                filler.write(b"x" * 1024)
        (disk / "room").unlink()
        yield disk
    finally:
        subprocess.run(["umount", disk], check=True)


def test_batch_stops_at_a_full_disk(tiny_clipseg_dir: Path, chelsea: np.ndarray, small_disk: Path) -> None:
    """Before: every remaining image was masked, then failed to write ('2 done, 3 failed', exit 1)."""
    src, out = small_disk.parent / "in", small_disk / "out"
    src.mkdir()
    for name in "abcde":
        Image.fromarray(chelsea[:40, :60]).save(src / f"{name}.png")
    result = invoke("batch", src, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json")
    assert result.exit_code == 8, result.output
    full = f"Cannot write '{out / 'c.png'}': No space left on device."
    why = f"error: {full} Stopped: free some space, then run it again."
    assert result.stderr.splitlines()[-2:] == ["2 done, 0 failed, 3 not done", why]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["input"], r["ok"]) for r in records] == [(str(src / f"{n}.png"), n != "c") for n in "abc"]
    assert records[-1]["exit_code"] == 8
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # no partial file


def test_json_names_a_file_whose_name_is_not_utf8(tiny_clipseg_dir: Path, folder: Path, tmp_path: Path) -> None:
    """Before: the records held lone surrogates ("caf\\udce9.png"), which strict JSON parsers reject."""
    name = os.fsdecode(b"caf\xe9.png")
    shutil.copy(folder / "b.png", folder / name)
    (folder / "a.jpg").unlink()
    (folder / "b.png").write_bytes(b"not a png")
    out = tmp_path / os.fsdecode(b"out\xff")
    result = invoke("batch", folder, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json")
    assert result.exit_code == 1, result.output
    lines = result.stdout_bytes.splitlines()
    for line in lines:
        line.decode("utf-8")  # strict: a lone surrogate, even escaped as \\udce9, is not UTF-8 text
        assert b"\\ud" not in line.lower()
    bad, done = (json.loads(line) for line in lines)
    assert bad["input"] == str(folder / "b.png") and "input_base64" not in bad
    assert done["input"] == str(folder / "caf\\xe9.png") and done["output"] == str(
        tmp_path / "out\\xff" / "caf\\xe9.png"
    )
    assert os.fsdecode(base64.b64decode(done["input_base64"])) == str(folder / name)
    assert os.fsdecode(base64.b64decode(done["output_base64"])) == str(out / name)
    assert (out / name).is_file()


def test_error_lines_name_a_file_that_is_not_utf8_as_json_does(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path
) -> None:
    """Before: stderr showed 'caf\\udce9.png' (Python's escape of a surrogate), the JSON 'caf\\xe9.png'."""
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(b"not a png")
    args = [*automask_command(), "batch", str(folder / "caf*.png"), "-o", str(tmp_path / "out"), "-p", "cat"]
    proc = subprocess.run([*args, "--model", str(tiny_clipseg_dir)], capture_output=True, timeout=180)
    shown = str(folder / "caf\\xe9.png")
    assert f"[1/1] {shown} failed" in proc.stderr.decode(), proc.stderr
    assert any(line.startswith(f"error: {shown}: ") for line in error_lines(proc.stderr)), proc.stderr


def test_batch_json_to_a_full_disk_says_what_it_did(tiny_clipseg_dir: Path, folder: Path, tmp_path: Path) -> None:
    """Before: `batch --json > full-disk/log` ended with the error line alone, not the summary of what was done."""
    args = ["batch", folder, "-o", tmp_path / "out", "-p", "cat", "--model", tiny_clipseg_dir, "--json"]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*automask_command(), *map(str, args)], stdout=full, stderr=subprocess.PIPE, timeout=180)
    assert proc.returncode == 8, proc.stderr
    why = "error: Cannot write to standard output: No space left on device. Stopped: free some space, then run it"
    assert proc.stderr.decode().splitlines()[-2:] == ["1 done, 0 failed, 1 not done", f"{why} again."]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


@pytest.mark.parametrize("source", ["folder", "glob"])
def test_batch_masks_a_file_reached_by_several_links_once(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path, source: str
) -> None:
    """Before: every symlink to a file was masked as a file of its own: a.jpg and its link cover.jpg gave a.png and
    cover.png (the same mask twice), and two links to one photo kept elsewhere two masks of it. Now a file is masked
    once, as folder links are read once: by its own name when the search finds it so, else by its first link."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.open(folder / "b.png").save(elsewhere / "c.png")
    (folder / "cover.jpg").symlink_to("a.jpg")  # a link and the file itself
    (folder / "x.png").symlink_to(elsewhere / "c.png")  # two links to one file outside the tree
    (folder / "y.png").symlink_to(elsewhere / "c.png")
    out = tmp_path / "out"
    args = [folder] if source == "folder" else [f"{folder}/*.*"]
    result = invoke("batch", *args, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json")
    assert result.exit_code == 0, result.output
    inputs = [json.loads(line)["input"] for line in result.stdout.splitlines()]
    assert inputs == [str(folder / name) for name in ("a.jpg", "b.png", "x.png")]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "x.png"]
    assert result.stderr.rstrip().endswith("3 done, 0 failed")
    assert (
        f"note: 2 links to an image found by another path skipped (each file is masked once): "
        f"'{folder / 'cover.jpg'}' (is '{folder / 'a.jpg'}'), '{folder / 'y.png'}' (is '{folder / 'x.png'}')"
    ) in result.stderr.splitlines()


def test_batch_names_a_path_spelled_twice_apart_from_a_link(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `batch b/../b/a.jpg b/a.jpg` noted "1 link to an image found by another path skipped: 'b/a.jpg'
    (is 'b/../b/a.jpg')", though neither is a link: the same path spelled two ways. Now the note says so, and a
    real link in the same run is still called one."""
    monkeypatch.chdir(tmp_path)
    (folder / "cover.jpg").symlink_to("a.jpg")
    out = tmp_path / "out"
    names = ["b/../b/a.jpg", "b/a.jpg", "b/cover.jpg", str(folder / "b.png"), "b/b.png"]
    result = invoke("batch", *names, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert (
        "note: 1 link to an image found by another path and 2 paths naming an image again, spelled another way "
        f"skipped (each file is masked once): 'b/a.jpg' (the same path as 'b/../b/a.jpg'), "
        f"'b/b.png' (the same path as '{folder / 'b.png'}'), 'b/cover.jpg' (is 'b/../b/a.jpg')"
    ) in result.stderr.splitlines(), result.stderr


def test_batch_takes_the_files_of_a_glob_the_shell_expanded(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path
) -> None:
    """Before: `automask batch photos/*.jpg -o out` (unquoted: the shell gives one name per file) exited 2 with
    "Got unexpected extra arguments (...)" listing every name (90 KB for 5000 files). Now several files are masked
    as the quoted glob masks them; a folder or a missing path among them is a usage error that says why."""
    out = tmp_path / "out"
    (folder / "cover.jpg").symlink_to("a.jpg")
    names = [folder / "b.png", folder / "a.jpg", folder / "cover.jpg", folder / "b.png"]
    result = invoke("batch", *names, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [
        str(folder / n) for n in ("a.jpg", "b.png")
    ]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    again = invoke("batch", *names, out, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)  # `b/* -o b/out` rerun
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    (folder / "sub").mkdir()
    for extra, why in [
        (folder / "sub", f"'{folder / 'sub'}' is a folder: give batch one folder, or files"),
        (folder / "gone.png", f"no such file: '{folder / 'gone.png'}'"),
    ]:
        refused = invoke("batch", *names, extra, "-o", tmp_path / "none", "-p", "cat", "--model", tiny_clipseg_dir)
        assert refused.exit_code == 2, refused.output
        assert refused.stderr.startswith(f"error: DIR_OR_GLOB: {why}")
        assert not (tmp_path / "none").exists()


def test_a_shell_expanded_glob_rerun_into_a_subfolder_skips_the_earlier_outputs(
    tiny_clipseg_dir: Path, folder: Path
) -> None:
    """Before: `batch b/**/*.png -o b/masks` run again (zsh, or bash's globstar, expands the glob: b/masks/a.png is
    one of its names) masked the first run's masks too, as a-2.png and b-2.png, where the quoted glob skips them."""
    Image.open(folder / "a.jpg").save(folder / "a.png")
    out = folder / "masks"
    for _ in range(2):
        expanded = sorted(glob.glob(f"{folder}/**/*.png", recursive=True))  # what the shell gives batch
        result = invoke("batch", *expanded, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
        assert result.exit_code == 0, result.output
        assert result.stderr.rstrip().endswith("2 done, 0 failed")
        assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    inputs = [folder / "a.jpg", folder / "b.png"]  # `batch b/*.* -o b`: OUTDIR holds the inputs, which are masked
    result = invoke("batch", *inputs, "-o", folder, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert result.stderr.rstrip().endswith("2 done, 0 failed")


def test_batch_takes_several_quoted_globs(tiny_clipseg_dir: Path, folder: Path, tmp_path: Path) -> None:
    """Before: `batch 'b/*.jpg' 'b/*.png' -o out` exited 2 with "no such file: 'b/*.jpg'" (one quoted glob is taken,
    and several paths are each taken as a glob). A glob that matches nothing (as bash passes an unmatched one) is
    named as such."""
    out = tmp_path / "out"
    result = invoke("batch", f"{folder}/*.jpg", f"{folder}/*.png", "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert result.stderr.rstrip().endswith("2 done, 0 failed")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    refused = invoke("batch", f"{folder}/*.png", f"{folder}/*.gif", "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith(f"error: DIR_OR_GLOB: no images found in '{folder}/*.gif'.")


def test_batch_of_a_folder_says_how_many_images_it_cannot_read(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path, chelsea: np.ndarray
) -> None:
    """Before: iPhone photos (.heic), drawings (.svg), PDFs and raw photos in the folder were skipped without a word:
    the run said '2 done, 0 failed'. One note now counts them and says what to do; other files (.txt, .json,
    .DS_Store) are not named. An AVIF, which this Pillow reads, is masked (it was skipped too)."""
    from automask.imageio.decode import readable_formats

    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "logo.svg", "scan.pdf", "DSC_0003.NEF", "notes.txt", "a.json"):
        (folder / name).write_bytes(b"\0" * 64)
    (folder / ".DS_Store").write_bytes(b"\0" * 64)
    avif = ["c.avif"] if "AVIF" in readable_formats() else []  # masked where Pillow reads it
    for name in avif:
        Image.fromarray(chelsea[:20, :30]).save(folder / name)
    out = tmp_path / "out"
    result = invoke("batch", folder, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.png", "b.png", *[Path(n).stem + ".png" for n in avif]])
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 5 files skipped: images automask cannot read (.heic 2, .nef 1, .pdf 1, .svg 1); convert them to PNG "
        "or JPEG to mask them."
    ], result.stderr
    assert result.stderr.rstrip().endswith(f"{2 + len(avif)} done, 0 failed")


def test_batch_of_a_folder_takes_every_suffix_of_a_format_automask_reads(
    tiny_clipseg_dir: Path, tmp_path: Path, chelsea: np.ndarray
) -> None:
    """Before: a folder's .ppm/.pgm/.pbm/.pnm, .tga, .qoi, .jfif, .jpe and .apng images were skipped without a word,
    though automask reads them (a quoted glob took them)."""
    folder = tmp_path / "formats"
    folder.mkdir()
    photo = Image.fromarray(chelsea[:20, :30])
    saves = {"a.ppm": ("PPM", photo), "b.pgm": ("PPM", photo.convert("L")), "c.pbm": ("PPM", photo.convert("1"))}
    saves |= {"d.PNM": ("PPM", photo), "e.tga": ("TGA", photo), "f.qoi": ("QOI", photo), "g.jfif": ("JPEG", photo)}
    saves |= {"h.jpe": ("JPEG", photo), "i.apng": ("PNG", photo)}
    for name, (fmt, img) in saves.items():
        img.save(folder / name, format=fmt)
    out = tmp_path / "out"
    result = invoke("batch", folder, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(n).stem + ".png" for n in saves)
    assert "note:" not in result.stderr and result.stderr.rstrip().endswith(f"{len(saves)} done, 0 failed")


def test_batch_of_a_folder_of_images_it_cannot_read_says_what_they_are(tmp_path: Path) -> None:
    """Before: 'no images found in ... (files ending .bmp, ...)' for a folder of iPhone photos, with no word on them."""
    folder = tmp_path / "phone"
    folder.mkdir()
    (folder / "IMG_0001.HEIC").write_bytes(b"\0" * 64)
    result = invoke("batch", folder, "-o", tmp_path / "out", "-p", "cat")
    assert result.exit_code == 2, result.output
    assert "1 file skipped: images automask cannot read (.heic 1); convert them to PNG or JPEG" in result.stderr


def test_batch_into_an_outdir_it_may_not_open_exits_8(folder: Path, tmp_path: Path) -> None:
    """Before: an OUTDIR that exists with mode 0 was refused by click's path check ("Directory ... is not
    readable"), a usage error, exit 2. Now it is an output that cannot be written: exit 8 with the system's reason,
    before the model loads (none is installed)."""
    out = tmp_path / "out"
    out.mkdir()
    command = [*automask_command(), "batch", str(folder), "-o", str(out), "-p", "cat"]
    out.chmod(0)
    try:
        proc = subprocess.run(
            as_a_user([*command, "--model", str(tmp_path / "no-such-model")]), capture_output=True, timeout=120
        )
    finally:
        out.chmod(0o755)
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.decode() == f"error: Cannot write into '{out}': Permission denied.\n"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("pattern", "flags"), [("", []), ("", ["-r"]), ("/*.*g", []), ("/**/*.*g", ["-r"])])
def test_batch_of_a_folder_notes_the_links_that_lead_to_no_file(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path, pattern: str, flags: list[str]
) -> None:
    """Before: a link with an image's name that leads nowhere (dangling, or a link loop) was skipped without a word;
    and a glob skipped those it matched so, after folder sources noted them. Now one note counts and names them, as
    batch notes the images it cannot read; the other files are masked."""
    (folder / "gone.jpg").symlink_to("no-such-photo.jpg")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "notes.txt").symlink_to("no-such-file.txt")  # no image's name (nor matched): not an input either way
    out = tmp_path / "out"
    result = invoke("batch", f"{folder}{pattern}", *flags, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: 2 links skipped: they lead to no file (dangling, or a link loop): '{folder / 'gone.jpg'}', "
        f"'{folder / 'loop.png'}'."
    ]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_batch_of_a_folder_of_broken_links_only_says_why_nothing_was_found(folder: Path, tmp_path: Path) -> None:
    for photo in folder.iterdir():
        photo.unlink()
    (folder / "gone.jpg").symlink_to("no-such-photo.jpg")
    result = invoke("batch", folder, "-o", tmp_path / "out", "-p", "cat", "--model", tmp_path / "no-such-model")
    assert result.exit_code == 2, result.output
    assert result.stderr.rstrip().endswith(
        f"1 link skipped: it leads to no file (dangling, or a link loop): '{folder / 'gone.jpg'}'."
    )


def test_batch_of_a_glob_of_broken_links_only_says_why_nothing_was_found(folder: Path, tmp_path: Path) -> None:
    """A glob among several files notes its broken links too; a glob that matched only broken links says so."""
    (folder / "gone.jpg").symlink_to("no-such-photo.jpg")
    model = tmp_path / "no-such-model"
    alone = invoke("batch", f"{folder}/g*.jpg", "-o", tmp_path / "out", "-p", "cat", "--model", model)
    assert alone.exit_code == 2, alone.output
    assert alone.stderr == (
        f"error: DIR_OR_GLOB: no images found in '{folder}/g*.jpg'. 1 link skipped: it leads to no file (dangling, "
        f"or a link loop): '{folder / 'gone.jpg'}'.\n"
    )
    several = invoke(
        "batch", f"{folder}/*.jpg", folder / "b.png", "-o", tmp_path / "out", "-p", "cat", "--model", model
    )
    assert several.exit_code == 4, several.output  # the model, after the inputs were found
    assert several.stderr.startswith(
        f"note: 1 link skipped: it leads to no file (dangling, or a link loop): '{folder / 'gone.jpg'}'.\n"
    )


@pytest.mark.parametrize("command", ["mask", "batch"])
def test_a_lone_image_that_is_a_link_loop_names_the_loop(tmp_path: Path, command: str) -> None:
    """Before: `batch loop.jpg` (a link loop) said "no images found in 'loop.jpg'", exit 2, and `mask` only the
    system's "Too many levels of symbolic links". Now both say it cannot be read, exit 3, and name the links of the
    loop; a loop in a folder of the path is named so too."""
    (tmp_path / "loop.jpg").symlink_to("loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to("loop.jpg")
    (tmp_path / "self").symlink_to("self")
    out = ["-o", tmp_path / "out"] if command == "batch" else []
    for image, loop in (
        (tmp_path / "loop.jpg", f"'{tmp_path / 'loop.jpg'}' -> 'loop2.jpg' -> 'loop.jpg'"),
        (tmp_path / "self" / "a.jpg", f"'{tmp_path / 'self'}' -> 'self'"),
    ):
        result = invoke(command, image, *out, "-p", "cat", "--model", tmp_path / "no-such-model")
        assert result.exit_code == 3, result.output
        assert (
            result.stderr == f"error: Cannot read '{image}': Too many levels of symbolic links (a link loop: {loop}).\n"
        )


def test_a_lone_batch_source_that_is_a_dangling_link_says_where_it_leads(tmp_path: Path) -> None:
    """Before: `batch gone.jpg`, a link to a file that is not there, said "no images found in 'gone.jpg'". Now it is
    a source that does not exist, as a missing one is, and says where the link leads."""
    (tmp_path / "gone.jpg").symlink_to("no-such-photo.jpg")
    result = invoke("batch", tmp_path / "gone.jpg", "-o", tmp_path / "out", "-p", "cat", "--model", tmp_path / "m")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: DIR_OR_GLOB: no such file or folder: '{tmp_path / 'gone.jpg'}' (a link to 'no-such-photo.jpg', "
        "which leads to no file).\n"
    )


def test_batch_of_standard_input_points_to_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `cat a.jpg | automask batch - -o out`, '-' read as the CLI's standard input elsewhere, said "no such
    file or folder: '-'". Now it says batch reads files, and how to mask an image piped in; a file named '-' is
    still taken, as ./- too."""
    monkeypatch.chdir(tmp_path)
    result = invoke("batch", "-", "-o", "out", "-p", "cat", "--model", tmp_path / "no-such-model")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: DIR_OR_GLOB: '-' is standard input, but batch reads files: name a folder, a quoted glob or files "
        "(./- for a file called '-'). To mask an image piped in: automask mask - -o OUT -p ...\n"
    )
    (tmp_path / "-").write_bytes(b"not an image")
    taken = invoke("batch", "-", "-o", "out", "-p", "cat", "--model", tmp_path / "no-such-model")
    assert taken.exit_code == 4, taken.output  # the model: the file was taken


def test_batch_of_several_files_notes_a_link_among_them_that_leads_to_no_file(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path
) -> None:
    """Before: `automask batch b/*` (unquoted: the shell names each file) stopped with exit 2, "no such file", at a
    dangling link among the files, and exit 3 at a link loop, while the quoted glob `'b/*'` and the folder `b` noted
    such links and masked the others. Now several files note them the same way (one note, exit 0) and mask the others;
    several files that are all such links are a usage error that says why, as such a glob is."""
    (folder / "gone.jpg").symlink_to("no-such-photo.jpg")
    (folder / "loop.png").symlink_to("loop.png")
    out = tmp_path / "out"
    names = sorted(folder.iterdir())  # what the shell makes of b/*
    result = invoke("batch", *names, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: 2 links skipped: they lead to no file (dangling, or a link loop): '{folder / 'gone.jpg'}', "
        f"'{folder / 'loop.png'}'."
    ]
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [
        str(folder / n) for n in ("a.jpg", "b.png")
    ]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    only = invoke("batch", folder / "gone.jpg", folder / "loop.png", "-o", tmp_path / "none", "-p", "cat")
    assert only.exit_code == 2, only.output
    assert only.stderr == (
        "error: DIR_OR_GLOB: no images given. 2 links skipped: they lead to no file (dangling, or a link loop): "
        f"'{folder / 'gone.jpg'}', '{folder / 'loop.png'}'.\n"
    )
    assert not (tmp_path / "none").exists()


def test_batch_json_to_a_reader_that_went_away_says_what_it_did(
    tiny_clipseg_dir: Path, folder: Path, tmp_path: Path
) -> None:
    """Before: `automask batch b -o out --json | head -1` stopped at the first JSON line the closed pipe refused, with
    no summary nor a word of why (exit 1): the user saw '[1/2] ...' and nothing more. Now it stops the same way (the
    next files are not masked only for their records to be lost), with the summary and a line saying why."""
    out = tmp_path / "out"
    args = ["batch", folder, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json"]
    reader, writer = os.pipe()
    os.close(reader)  # the reader went away
    try:
        proc = subprocess.run(
            [*automask_command(), *map(str, args)],
            stdout=writer,
            stderr=subprocess.PIPE,
            timeout=180,
        )
    finally:
        os.close(writer)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    assert stderr.splitlines()[-2:] == [
        "1 done, 0 failed, 1 not done",
        "stopped: standard output's reader went away (--json): the next files were not masked.",
    ], stderr
    assert [p.name for p in out.iterdir()] == ["a.png"]


def test_batch_names_a_pipe_given_as_a_source_for_what_it_is(folder: Path, tmp_path: Path) -> None:
    """Before: a named pipe given to batch (alone, or among files: `batch b/*` of a folder holding one) said "no images
    found in 'b/in.png'" or "no such file: 'b/in.png'", of a path that is there. Now it says it is no regular file and
    that mask reads a pipe; still a usage error (exit 2), before the model loads."""
    fifo = folder / "in.png"
    os.mkfifo(fifo)
    why = (
        f"error: DIR_OR_GLOB: '{fifo}' is no regular file (a named pipe, a socket or a device): batch reads image "
        f"files; to mask what a pipe gives: automask mask '{fifo}' -o OUT -p ...\n"
    )
    for sources in ([fifo], [folder / "a.jpg", fifo]):
        result = invoke("batch", *sources, "-o", tmp_path / "out", "-p", "cat", "--model", tmp_path / "no-such-model")
        assert result.exit_code == 2, result.output
        assert result.stderr == why
