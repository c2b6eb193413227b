"""`automask batch`: which files it takes (the output folder may be the input folder), a source that does not
exist,"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes
from test_cli import invoke


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


def test_batch_of_a_missing_source_says_it_does_not_exist(tmp_path: Path) -> None:
    result = invoke("batch", tmp_path / "nonexist", "-p", "subject", "-o", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: DIR_OR_GLOB: no such file or folder: '{tmp_path / 'nonexist'}'.\n"
    glob = invoke("batch", f"{tmp_path}/*.jpg", "-p", "subject", "-o", tmp_path / "x")  # a glob may match nothing
    assert glob.exit_code == 2 and "no images found" in glob.stderr
    assert not (tmp_path / "x").exists()

