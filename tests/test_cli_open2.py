"""The command line's open defects found by earlier hunts: what it echoes of an input, and `models` on a data folder
that is not one."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from automask.cli import main
from loopback import QuietHandler, serve_http

SECRET = "s3cret-pw"


def invoke(*args: Any, **env: str) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], env=env or None)


class _Photo(QuietHandler):
    png = b""

    def do_GET(self) -> None:
        found = self.path == "/photo.png"
        body = self.png if found else b"no"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "image/png" if found else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def site(chelsea: np.ndarray) -> Iterator[str]:
    buf = io.BytesIO()
    Image.fromarray(chelsea).resize((60, 40)).save(buf, "PNG")
    handler: type[BaseHTTPRequestHandler] = type("Photo", (_Photo,), {"png": buf.getvalue()})
    with serve_http(handler) as url:
        yield url


def test_mask_json_hides_the_password_of_an_image_url(site: str, tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    """Before: `"input"` was the URL as typed, user name and password in it (a log of --json lines kept them)."""
    url = site.replace("http://", f"http://alice:{SECRET}@") + "/photo.png"
    args = ["--allow-private-urls", "mask", url, "-p", "cat", "--model", tiny_clipseg_dir, "--json"]
    done = invoke(*args, "-o", tmp_path / "m.png")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["input"] == f"{site}/photo.png"
    failed = invoke(*[a if a != url else url.replace("photo", "gone") for a in args], "-o", tmp_path / "n.png")
    assert failed.exit_code == 6, failed.output
    assert json.loads(failed.stdout)["input"] == f"{site}/gone.png"
    two = invoke("mask", url, url, "-p", "cat")
    assert two.exit_code == 2 and "alice" not in two.output
    for result in (done, failed, two):
        assert SECRET not in result.output and SECRET not in result.stderr


def test_models_list_says_the_models_folder_is_a_file(tmp_path: Path) -> None:
    """Before: every model listed "no" (not installed), exit 0, as if the folder were empty."""
    (tmp_path / "models").write_text("not a folder")
    for flags in ([], ["--json"]):
        result = invoke("--data-dir", tmp_path, "models", "list", *flags)
        assert result.exit_code == 4, result.output
        assert result.stdout == ""
        assert f"'{tmp_path / 'models'}' is a file, not a folder" in result.stderr
