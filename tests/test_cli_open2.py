"""The command line's open defects found by earlier hunts: what it echoes of an input, `models` on a data folder that
is not one, a signal between the lines that report a file."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from automask.catalogue import MARKER
from automask.cli import main
from automask.cli_source import shown_input
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


@pytest.mark.parametrize(
    ("typed", "shown"),
    [
        ("https://u:pw@example.com/a.png?x=1", "https://example.com/a.png?x=1"),
        ("http://u:p/w@example.com/a.png", "http://…@example.com/a.png"),  # httpx cannot read it: all before '@' hidden
        ("https://example.com/a@b.png", "https://example.com/a@b.png"),
        ("photo:1@2.png", "photo:1@2.png"),  # not a URL: a file's name
    ],
)
def test_an_echoed_input_shows_no_credentials(typed: str, shown: str) -> None:
    assert shown_input(typed) == shown


def test_models_list_says_the_models_folder_is_a_file(tmp_path: Path) -> None:
    """Before: every model listed "no" (not installed), exit 0, as if the folder were empty."""
    (tmp_path / "models").write_text("not a folder")
    for flags in ([], ["--json"]):
        result = invoke("--data-dir", tmp_path, "models", "list", *flags)
        assert result.exit_code == 4, result.output
        assert result.stdout == ""
        assert f"'{tmp_path / 'models'}' is a file, not a folder" in result.stderr
    removed = invoke("--data-dir", tmp_path, "models", "rm", "clipseg")  # before: "not installed ... nothing to remove"
    assert removed.exit_code == 4 and "is a file, not a folder" in removed.stderr, removed.output


_SIGNAL_AFTER_FIRST_LINE = """
import os, signal, sys
from automask import cli_report

done = cli_report.Reporter.done
signum = int(sys.argv.pop(1))


def done_then_signal(self, line):  # the signal lands right after the first file's progress line
    done(self, line)
    if self.count == 1:
        os.kill(os.getpid(), signum)


cli_report.Reporter.done = done_then_signal
from automask.catalogue import MARKER
from automask.cli import main

sys.argv[0] = "automask"
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_a_files_progress_line_still_gives_its_json_line(
    signum: int, chelsea: np.ndarray, tiny_clipseg_dir: Path, tmp_path: Path
) -> None:
    """A real signal, sent by the CLI process to itself just after `[1/3] a.png -> ...`. Before: the run stopped
    there, so the terminal had reported a.png done while --json printed no line for it (a script re-ran it)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(chelsea).resize((40, 30)).save(photos / f"{name}.png")
    args = ["batch", photos, "-o", tmp_path / "out", "-p", "cat", "--model", tiny_clipseg_dir, "--json"]
    command = [sys.executable, "-c", _SIGNAL_AFTER_FIRST_LINE, str(int(signum)), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 128 + signum, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "[1/3] " in proc.stderr and "1 done, 0 failed, 2 not done" in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(r["input"]).name for r in records] == ["a.png"] and records[0]["ok"] is True
    assert (tmp_path / "out" / "a.png").is_file() and not (tmp_path / "out" / "b.png").exists()


_SIGNAL_AFTER_JSON_LINE = """
import os, sys
from automask import cli

echo_json = cli.echo_json
signum = int(sys.argv.pop(1))


def echo_then_signal(record):  # the signal lands right after the JSON line
    echo_json(record)
    os.kill(os.getpid(), signum)


cli.echo_json = echo_then_signal
sys.argv[0] = "automask"
cli.main()
"""


def test_mask_stopped_after_its_json_line_keeps_what_the_line_names(
    chelsea: np.ndarray, tiny_clipseg_dir: Path, tmp_path: Path
) -> None:
    """Before: a Ctrl-C just after mask's `{"ok": true, "output": ...}` line removed that output (the run's files
    are undone when it is interrupted): the line named a file that was not there."""
    photo, out = tmp_path / "a.png", tmp_path / "a.mask.png"
    Image.fromarray(chelsea).resize((40, 30)).save(photo)
    args = ["mask", photo, "-o", out, "-p", "cat", "--model", tiny_clipseg_dir, "--json"]
    command = [sys.executable, "-c", _SIGNAL_AFTER_JSON_LINE, str(int(signal.SIGINT)), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["output"] == str(out) and out.is_file()
    assert f"wrote '{out}'" in proc.stderr


_LOADING_WAITS = """
import os, sys, time
from pathlib import Path
from automask.backends import registry

create, marks = registry.create, Path(sys.argv.pop(1))


def create_slowly(name, path, settings):  # the weights are being read: until the test lets it go on (bounded)
    (marks / "loading").write_text(str(path))
    deadline = time.monotonic() + 60
    while not (marks / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return create(name, path, settings)


registry.create = create_slowly
from automask.catalogue import MARKER
from automask.cli import main

sys.argv[0] = "automask"
main()
"""


def test_models_rm_refuses_a_model_a_run_is_loading(
    chelsea: np.ndarray, tiny_clipseg_dir: Path, tmp_path: Path
) -> None:
    """Two real processes: a `mask` run held inside its model's loading, then `models rm` of that model. Before: the
    removal deleted the folder under the loading run (which then failed, or ran on half a model)."""
    data, marks = tmp_path / "data", tmp_path / "marks"
    marks.mkdir()
    folder = data / "models" / "clipseg"
    shutil.copytree(tiny_clipseg_dir, folder)
    (folder / MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    photo = tmp_path / "a.png"
    Image.fromarray(chelsea).resize((40, 30)).save(photo)
    args = ["--data-dir", data, "mask", photo, "-p", "cat", "--model", "clipseg", "-o", tmp_path / "m.png"]
    run = subprocess.Popen(
        [sys.executable, "-c", _LOADING_WAITS, str(marks), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (marks / "loading").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (marks / "loading").read_text() == str(folder)
        rm = subprocess.run(
            [sys.executable, "-m", "automask", "--data-dir", data, "models", "rm", "clipseg"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rm.returncode == 10, rm.stdout + rm.stderr
        assert "a run is loading it" in rm.stderr and (folder / MARKER).is_file()
    finally:
        (marks / "go").touch()
        _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert (tmp_path / "m.png").is_file()
    after = subprocess.run(
        [sys.executable, "-m", "automask", "--data-dir", data, "models", "rm", "clipseg"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert after.returncode == 0, after.stderr
    assert not folder.exists()


def test_batch_progress_bar_keeps_its_count_beside_a_long_file_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bar on an 80-column terminal, the file being masked named with 200 characters. Before: the name took the
    whole line (cut with '…'), and the bar, the count and the time left were not shown at all."""
    from automask.cli_report import Reporter

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: a terminal
    monkeypatch.setenv("COLUMNS", "80")
    with Reporter(3) as report:
        assert report.bar is not None
        report.start(Path("IMG_" + "0123456789" * 20 + ".jpg"))
        report.done("")
        report.bar.refresh()
    shown = [line for line in capsys.readouterr().err.replace("\r", "\n").split("\n") if "IMG_" in line]
    assert shown and all("1/3" in line and "…" in line for line in shown[-1:]), shown


def test_a_file_name_with_a_line_break_or_an_escape_stays_one_plain_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file name may hold any byte but '/' and NUL. Before: the bar split over two lines at a line break in the
    name, and an escape sequence in it (ESC [31m) went to the terminal as is (it turned the terminal's text red);
    so did the plain progress lines. Now they are written \\x1b, as the error lines write what is not UTF-8."""
    from automask.cli_report import Reporter

    name = "a\nb\x1b[31mred.png"
    monkeypatch.setenv("COLUMNS", "80")
    for terminal in ("1", None):
        if terminal:
            monkeypatch.setenv("FORCE_COLOR", terminal)
        else:
            monkeypatch.delenv("FORCE_COLOR", raising=False)
            monkeypatch.setenv("TERM", "dumb")
        with Reporter(1) as report:
            report.start(Path(name))
            report.done(f"{name} -> out.png")
            if report.bar is not None:
                report.bar.refresh()
        err = capsys.readouterr().err
        assert "\x1b[31m" not in err and "b\\x1b[31mred.png" in err, err
        assert not [line for line in err.replace("\r", "\n").split("\n") if line.startswith("b")], err
