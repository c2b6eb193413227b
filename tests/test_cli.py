"""The `automask` command line through its real entry point (a subprocess running the installed script),
checked against the library call on the same input; CliRunner for the quick error paths."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from automask import errors
from automask.cli import error_record, main
from automask.cli_exits import EXIT_CODES, EXIT_HELP, exit_code
from automask.cli_inputs import plan_outputs
from automask.cli_io import OutputError, output_target, write_atomic
from automask.cli_job import ignored_flags
from automask.imageio import load_image
from automask.options import MaskOptions, parse_prompt
from automask.pipeline import MaskGenerator
from automask.result import MaskResult
from automask.settings import Settings
from conftest import jpeg_bytes

PROMPT = "cat, grass"
PNG_END = b"IEND\xaeB`\x82"


def automask_command() -> list[str]:
    """The installed console script beside this Python, else `python -m automask.cli`."""
    script = Path(sys.executable).with_name("automask")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "automask.cli"]


def run_cli(*args: Any, expect: int, stdin: bytes | None = None, cwd: Path | None = None, **env: str) -> Any:
    """Run `automask ARGS` in a subprocess; check the exit code and that stderr holds no traceback."""
    proc = subprocess.run(
        [*automask_command(), *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        cwd=cwd,
        env={**os.environ, **env},
        timeout=180,
    )
    stderr = proc.stderr.decode()
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == expect, stderr
    return proc


def error_lines(stderr: bytes | str) -> list[str]:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    return [line for line in text.splitlines() if line.startswith(("error:", "internal error:"))]


def read_png(data: bytes | Path) -> Image.Image:
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    assert img.format == "PNG"
    img.load()
    return img


@dataclass
class Library:
    """The library, in this process, on the same tiny model the CLI is given."""

    generator: MaskGenerator
    model: Path
    photo: Path
    threshold: str
    """A threshold that selects part of the photo (as the CLI is given it)."""

    def run(self, source: Any, **options: Any) -> MaskResult:
        return self.generator.generate(source, PROMPT, threshold=float(self.threshold), **options)


@pytest.fixture(scope="module")
def lib(tiny_clipseg_dir: Path, chelsea: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Library]:
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("AUTOMASK_")]:
            mp.delenv(key)
        settings = Settings(data_dir=tmp_path_factory.mktemp("lib-data"))
    generator = MaskGenerator(str(tiny_clipseg_dir), settings)
    photo = tmp_path_factory.mktemp("photos") / "photo.png"
    Image.fromarray(chelsea).resize((150, 100)).save(photo)
    backend = generator.backend
    maps = backend.score(backend.encode(load_image(photo, settings)), parse_prompt(PROMPT)).maps
    assert maps.max() < 1.0, "the tiny model must leave threshold 1 empty for the empty-mask test"
    threshold = f"{np.quantile(maps.max(axis=0), 0.7):.6f}"
    yield Library(generator, tiny_clipseg_dir, photo, threshold)


def test_library_reference_is_a_partial_mask(lib: Library) -> None:
    mask = lib.run(lib.photo, grow_mask=0).mask
    assert 0.1 < np.count_nonzero(mask) / mask.size < 0.5  # the comparisons below are not trivial


# -- mask: subprocess ---------------------------------------------------------------------------------


def test_mask_default_output_beside_the_input_equals_the_library(lib: Library, tmp_path: Path) -> None:
    proc = run_cli(
        "mask", lib.photo, "-p", PROMPT, "--threshold", lib.threshold, "--model", lib.model, expect=0, cwd=tmp_path
    )
    out = lib.photo.with_name("photo.mask.png")
    img = read_png(out)
    expected = lib.run(lib.photo).mask
    assert img.mode == "L" and img.size == (150, 100)
    assert np.array_equal(np.asarray(img), expected)
    assert proc.stdout == b""
    assert "wrote" in proc.stderr.decode() and not error_lines(proc.stderr)
    out.unlink()


@pytest.mark.parametrize(
    ("flags", "options", "mode"),
    [
        (["--return-alpha"], {"return_alpha": True}, "RGBA"),
        (["--preview", "--grow-mask", "0"], {"return_mask": False, "grow_mask": 0}, "RGB"),
        (["--invert-mask", "--grow-mask", "3", "--seed", "7", "--json"], {"invert_mask": True, "grow_mask": 3}, "L"),
    ],
    ids=["alpha", "preview", "invert-grow-seed-json"],
)
def test_mask_flags_equal_the_library(
    lib: Library, tmp_path: Path, flags: list[str], options: dict[str, Any], mode: str
) -> None:
    out = tmp_path / "new" / "out.png"
    args = ["mask", lib.photo, "-p", PROMPT, "--threshold", lib.threshold, "--model", lib.model, "-o", out, *flags]
    proc = run_cli(*args, expect=0)
    img = read_png(out)
    expected = lib.run(lib.photo, **options)
    assert img.mode == mode and img.size == (150, 100)
    assert np.array_equal(np.asarray(img), expected.output)
    if mode == "RGBA":
        assert np.array_equal(np.asarray(img)[..., 3], expected.mask)
        assert np.array_equal(np.asarray(img)[..., :3], load_image(lib.photo))
    if "--json" in flags:
        meta = json.loads(proc.stdout)
        assert meta["output"] == str(out)
        assert meta["seed"] == 7 and meta["kind"] == "mask" and meta["prompts"] == ["cat", "grass"]
        assert (meta["width"], meta["height"]) == (150, 100)
        assert meta["selected_pixels"] == int(np.count_nonzero(expected.mask))
        assert meta["backend"] == "clipseg" and meta["empty"] is False
    else:
        assert proc.stdout == b""
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png"]  # no temp file left beside it


@pytest.mark.parametrize(
    ("name", "flags", "fmt", "exact"),
    [
        ("m.JPG", [], "JPEG", False),
        ("m.jpe", [], "JPEG", False),
        ("m.JFIF", [], "JPEG", False),
        ("m.webp", [], "WEBP", True),
        ("c.webp", ["--return-alpha"], "WEBP", True),
        ("p.tiff", ["--preview"], "TIFF", True),
        ("m.mask", [], "PNG", True),
    ],
)
def test_mask_writes_the_format_its_output_name_asks_for(
    lib: Library, tmp_path: Path, name: str, flags: list[str], fmt: str, exact: bool
) -> None:
    out = tmp_path / name
    args = ["mask", lib.photo, "-p", PROMPT, "--threshold", lib.threshold, "--grow-mask", "0", "--model", lib.model]
    result = invoke(*args, "-o", out, *flags)
    assert result.exit_code == 0, result.output
    kind = {"return_alpha": "--return-alpha" in flags, "return_mask": "--preview" not in flags}
    expected = lib.run(lib.photo, grow_mask=0, **kind).output  # a partial mask: the cut-out's alpha is kept
    assert 0 < np.count_nonzero(lib.run(lib.photo, grow_mask=0).mask) < 150 * 100
    with Image.open(out) as img:
        assert img.format == fmt and img.size == (150, 100)
        got = np.asarray(img.convert({2: "L", 3: "RGBA" if expected.shape[-1] == 4 else "RGB"}[expected.ndim]))
    assert got.shape == expected.shape
    if exact:  # lossless formats keep every value
        assert np.array_equal(got, expected)
    else:  # JPEG: close to the mask, never another picture
        assert np.abs(got.astype(int) - expected).mean() < 3


@pytest.mark.parametrize(
    ("name", "flags", "why"),
    [(f"c.{suffix}", ["--return-alpha"], "no transparency") for suffix in ("jpg", "jpe", "JFIF")]
    + [(f"m.{suffix}", [], "PNG, JPEG") for suffix in ("gif", "tga", "PPM", "qoi", "apng", "ico", "pdf")],
)
def test_mask_refuses_an_output_format_it_cannot_write_before_any_work(
    lib: Library, tmp_path: Path, name: str, flags: list[str], why: str
) -> None:
    """Before: an image suffix outside .jpg .jpeg .png .webp .bmp .gif .tif .tiff (.tga, .ppm, .qoi, .pdf...) was
    written as PNG bytes under that name."""
    result = invoke("mask", lib.photo, "-p", PROMPT, "--model", lib.model, "-o", tmp_path / name, *flags)
    assert result.exit_code == 2 and why in result.stderr and "--output" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_mask_stdin_to_stdout(lib: Library, chelsea: np.ndarray) -> None:
    small = chelsea[::2, ::2]
    data = jpeg_bytes(small)
    args = ["mask", "-", "-o", "-", "-p", PROMPT, "--threshold", lib.threshold, "--model", lib.model, "--return-alpha"]
    proc = run_cli(*args, expect=0, stdin=data)
    assert proc.stdout.startswith(b"\x89PNG\r\n\x1a\n") and proc.stdout.endswith(PNG_END)  # the PNG and nothing else
    img = read_png(proc.stdout)
    expected = lib.run(data, return_alpha=True)
    assert img.mode == "RGBA" and img.size == (small.shape[1], small.shape[0])
    assert np.array_equal(np.asarray(img), expected.output)


def test_mask_reads_a_pipe_given_as_a_path(lib: Library, chelsea: np.ndarray, tmp_path: Path) -> None:
    """`automask mask <(curl -s URL) -p cat`, or `/dev/stdin`: before, "Cannot read '/dev/fd/63': no such file."
    (exit 3). A pipe is read as standard input is (at most AUTOMASK_MAX_IMAGE_BYTES); its default output is
    ./mask.png, not a name beside the pipe."""
    small = chelsea[::4, ::4]
    fifo = tmp_path / "in.jpg"
    os.mkfifo(fifo)

    def feed(data: bytes) -> threading.Thread:
        def write() -> None:
            with contextlib.suppress(OSError):  # the reader stops at the size limit
                fifo.write_bytes(data)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    writer = feed(jpeg_bytes(small))
    run_cli("mask", fifo, "-p", "cat", "--model", lib.model, expect=0, cwd=tmp_path)
    writer.join(timeout=10)
    assert read_png(tmp_path / "mask.png").size == (small.shape[1], small.shape[0])
    writer = feed(jpeg_bytes(small))
    proc = run_cli("mask", fifo, "-p", "cat", "--model", lib.model, expect=3, AUTOMASK_MAX_IMAGE_BYTES="100")
    writer.join(timeout=10)
    assert error_lines(proc.stderr) == [f"error: The image in '{fifo}' is over 100 bytes (AUTOMASK_MAX_IMAGE_BYTES)."]


def test_python_dash_m_automask_runs_the_command_line(lib: Library) -> None:
    """`python -m automask mask ...` (no console script on PATH: a venv not activated, `pip install --user`):
    before, "No module named automask.__main__" (exit 1)."""
    args = ["mask", lib.photo, "-o", "-", "-p", PROMPT, "--threshold", lib.threshold, "--model", lib.model]
    proc = subprocess.run([sys.executable, "-m", "automask", *map(str, args)], capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    assert np.array_equal(np.asarray(read_png(proc.stdout)), lib.run(lib.photo).mask)
    usage = subprocess.run([sys.executable, "-m", "automask", "mask", "--help"], capture_output=True, timeout=60)
    assert usage.returncode == 0 and usage.stdout.decode().startswith("Usage: automask mask ")


def test_mask_without_a_model_names_the_pull_command(lib: Library, tmp_path: Path) -> None:
    empty = tmp_path / "data"
    proc = run_cli("mask", lib.photo, "-p", "cat", "-o", tmp_path / "x.png", expect=4, AUTOMASK_DATA_DIR=str(empty))
    (line,) = error_lines(proc.stderr)
    assert "automask models pull clipseg" in line
    assert not (tmp_path / "x.png").exists()


def test_mask_invalid_option_names_the_flag(lib: Library) -> None:
    proc = run_cli("mask", lib.photo, "-p", "cat", "--grow-mask", "2.5", "--model", lib.model, expect=2)
    (line,) = error_lines(proc.stderr)
    assert line.startswith("error: --grow-mask: ") and "integer" in line


# -- batch: subprocess --------------------------------------------------------------------------------


def test_batch_folder_skips_a_bad_file_and_does_the_rest(lib: Library, tmp_path: Path, chelsea: np.ndarray) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    Image.open(lib.photo).save(src / "a.png")
    (src / "a.jpg").write_bytes(jpeg_bytes(chelsea[:90, :120]))
    good = jpeg_bytes(chelsea[:60, :80])
    (src / "broken.jpg").write_bytes(good[: len(good) // 2])
    (src / "notes.txt").write_text("not an image\n")
    (src / "sub" / "deep.png").write_bytes((src / "a.png").read_bytes())  # not recursive: left alone
    args = ["batch", src, "-o", out, "-p", PROMPT, "--threshold", lib.threshold, "--model", lib.model, "--json"]
    proc = run_cli(*args, expect=1)
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png"]  # a.jpg / a.png kept apart
    for name in ("a.jpg", "a.png"):
        assert np.array_equal(np.asarray(read_png(out / f"{name}.png")), lib.run(src / name).mask)
    stderr = proc.stderr.decode()
    (line,) = error_lines(stderr)
    assert line.startswith(f"error: {src / 'broken.jpg'}: ") and "truncated" in line
    assert "notes.txt" not in stderr and "deep.png" not in stderr
    assert stderr.rstrip().endswith("2 done, 1 failed")
    records = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert [(Path(r["input"]).name, r["ok"]) for r in records] == [
        ("a.jpg", True),
        ("a.png", True),
        ("broken.jpg", False),
    ]
    assert records[2]["exit_code"] == 3 and "truncated" in records[2]["error"]
    assert records[0]["output"] == str(out / "a.jpg.png") and records[0]["width"] == 120


def test_batch_glob_recursive(lib: Library, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    photo = Image.open(lib.photo)
    photo.save(src / "x.png")
    photo.resize((64, 48)).save(src / "sub" / "y.png")
    photo.save(src / "z.jpg")  # not matched by the glob
    args = ["batch", f"{src}/**/*.png", "-r", "-o", out, "-p", PROMPT, "--threshold", lib.threshold]
    proc = run_cli(*args, "--model", lib.model, "--return-alpha", expect=0)
    assert sorted(p.name for p in out.iterdir()) == ["x.png", "y.png"]
    y = read_png(out / "y.png")
    assert y.mode == "RGBA" and y.size == (64, 48)
    assert np.array_equal(np.asarray(y), lib.run(src / "sub" / "y.png", return_alpha=True).output)
    assert proc.stderr.decode().rstrip().endswith("2 done, 0 failed") and not error_lines(proc.stderr)


# -- quick error paths: CliRunner ---------------------------------------------------------------------


def invoke(*args: Any, **env: str) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], env=env or None)


def test_integer_flags_read_number_text_as_the_api_does(lib: Library, tmp_path: Path) -> None:
    """Before: --seed 1e3 exited 2, while the same text in a form field (and 1e3 in JSON) is 1000."""
    out = tmp_path / "m.png"
    args = ["mask", lib.photo, "-p", PROMPT, "--model", lib.model, "-o", out, "--json"]
    result = invoke(*args, "--seed", "1e3", "--grow-mask", "2.0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["seed"] == 1000
    half = invoke(*args, "--grow-mask", "1.5")
    assert half.exit_code == 2 and "--grow-mask" in half.stderr


def test_mask_stop_on_empty_mask_exits_5_and_writes_nothing(lib: Library, tmp_path: Path) -> None:
    out = tmp_path / "empty.png"
    args = ["mask", lib.photo, "-p", PROMPT, "--threshold", "1", "--stop-on-empty-mask", "--model", lib.model]
    result = invoke(*args, "-o", out)  # in process: the model loaded by `lib` is reused
    assert result.exit_code == 5, result.output
    (line,) = error_lines(result.stderr)
    assert "Nothing matching" in line and "threshold" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    kept = invoke(*[a for a in args if a != "--stop-on-empty-mask"], "-o", out)  # an all-black mask, and a note
    assert kept.exit_code == 0 and "nothing matched" in kept.stderr
    assert not np.asarray(read_png(out)).any()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--threshold", "abc"], "--threshold"),
        (["--threshold", "1.5"], "--threshold"),
        (["--seed", "-5"], "--seed"),
        (["--grow-mask", "101"], "--grow-mask"),
        (["-p", " . "], "--prompt"),
        (["-p", "\u200b \ufeff"], "--prompt"),
        (["--text-threshold", "2"], "--text-threshold"),
    ],
)
def test_invalid_options_fail_before_the_model_loads(tmp_path: Path, flags: list[str], named: str) -> None:
    photo = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(photo)
    result = invoke("mask", photo, "-p", "cat", *flags, "--model", tmp_path / "no-such-model")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {named}: ") and result.stderr.count("\n") == 1


def test_usage_errors(tmp_path: Path) -> None:
    missing = invoke("mask", tmp_path / "nope.png", "-p", "cat")
    assert missing.exit_code == 3 and "no such file" in missing.stderr
    folder = invoke("mask", tmp_path, "-p", "cat")
    assert folder.exit_code == 3 and "automask batch" in folder.stderr
    both = invoke("mask", "-", "-o", "-", "--json", "-p", "cat")
    assert both.exit_code == 2 and both.stderr.startswith("error: --json: ")
    nothing = invoke("batch", tmp_path, "-o", tmp_path / "out", "-p", "cat")
    assert nothing.exit_code == 2 and "no images found" in nothing.stderr
    no_prompt = invoke("mask", tmp_path / "nope.png")
    assert no_prompt.exit_code == 2 and "--prompt" in no_prompt.stderr
    bad_env = invoke("models", "list", AUTOMASK_FETCH_TIMEOUT="soon")
    assert bad_env.exit_code == 2 and "AUTOMASK_FETCH_TIMEOUT" in bad_env.stderr


def test_internal_errors_are_one_line_unless_debug(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(*_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("automask.cli.load_generator", boom)
    photo = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(photo)
    plain = invoke("mask", photo, "-p", "cat")
    assert plain.exit_code == 70
    assert plain.stderr == "internal error: RuntimeError: boom\n"
    for result in (
        invoke("--debug", "mask", photo, "-p", "cat"),
        invoke("mask", photo, "-p", "cat", AUTOMASK_DEBUG="1"),
    ):
        assert result.exit_code == 70
        assert "Traceback" in result.stderr and result.stderr.endswith("internal error: RuntimeError: boom\n")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidOptionError("threshold", "bad"), 2),
        (errors.ImageDecodeError("x"), 3),
        (errors.ImageTooLargeError("x"), 3),
        (errors.URLRefusedError("x"), 3),
        (errors.UnknownModelError("x"), 4),
        (errors.ModelNotAvailableError("x"), 4),
        (errors.MissingDependencyError("x"), 4),
        (errors.EmptyMaskError("x"), 5),
        (errors.FetchError("x"), 6),
        (errors.FetchTimeoutError("x"), 6),
        (errors.InferenceTimeoutError("x"), 7),
        (errors.StoppedError("x"), 7),
        (OutputError("x"), 8),
        (errors.ModelBusyError("x"), 10),
        (errors.AutomaskError("x"), 1),
    ],
)
def test_exit_codes(error: errors.AutomaskError, code: int) -> None:
    assert exit_code(error) == code
    assert code in {c for c, _ in EXIT_HELP}


def test_every_exit_code_is_documented() -> None:
    documented = {c for c, _ in EXIT_HELP}
    assert set(EXIT_CODES.values()) <= documented
    help_text = invoke("--help").output
    for code, text in EXIT_HELP:
        assert f"{code:<4} {text}" in help_text


def test_models_list_and_pull_use_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = tmp_path / "flag-data"
    listed = invoke("--data-dir", data, "models", "list", "--json", AUTOMASK_DATA_DIR=str(tmp_path / "env-data"))
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["clipseg"]["backend"] == "clipseg" and rows["clipseg"]["installed"] is False
    assert rows["clipseg"]["path"] == str(data / "models" / "clipseg")  # the flag wins over AUTOMASK_DATA_DIR
    table = invoke("--data-dir", data, "models", "list")
    assert table.exit_code == 0 and "clipseg" in table.stdout and "no" in table.stdout

    calls: list[tuple[str, Settings, bool, bool]] = []

    def fake_pull(name: str, settings: Settings, *, progress: bool = True, force: bool = False) -> Path:
        calls.append((name, settings, progress, force))
        return settings.models_dir / name

    exported: list[tuple[str, Path]] = []
    monkeypatch.setattr("automask.models.pull", fake_pull)
    monkeypatch.setattr("automask.cli_models._export_after_pull", lambda name, path, _: exported.append((name, path)))
    pulled = invoke("--data-dir", data, "models", "pull", "clipseg")
    assert pulled.exit_code == 0, pulled.output
    assert [(n, s.data_dir, p, f) for n, s, p, f in calls] == [("clipseg", data, True, False)]
    assert exported == [("clipseg", data / "models" / "clipseg")]
    assert str(data / "models" / "clipseg") in pulled.stdout
    assert invoke("--data-dir", data, "models", "pull", "subject", "--force").exit_code == 0
    assert calls[-1][0] == "subject" and calls[-1][3] is True


@pytest.mark.parametrize("model", ["nope", "sam"])
def test_models_export_of_a_model_it_cannot_export_errs_before_saying_it_exports(tmp_path: Path, model: str) -> None:
    """`automask models export nope` printed "Exporting the ONNX Runtime graphs (about a minute)..." first."""
    result = invoke("--data-dir", tmp_path, "models", "export", model)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "Exporting" not in result.output and "error:" in result.output, result.output


def fake_onnx_export(model_path: Path, *, int8: bool) -> None:
    """Write the files `has_onnx` looks for (manifest naming this checkpoint, graphs, tokenizer); not runnable."""
    from automask.backends.clipseg_common import FORMAT, MANIFEST, fingerprint, onnx_dir

    folder = onnx_dir(model_path)
    folder.mkdir()
    manifest: dict[str, Any] = {"format": FORMAT, "fingerprint": fingerprint(model_path), "image_size": [8, 8]}
    manifest |= {"extract_layers": [1], "files": {"image": "image.onnx", "prompt": "prompt.onnx"}}
    manifest["tokenizer"] = {"file": "tokenizer.json", "pad_id": 0, "pad_token": "!", "max_length": 8}
    if int8:
        manifest["int8_files"] = {"image": "image.int8.onnx", "prompt": "prompt.int8.onnx"}
    for name in ["tokenizer.json", *manifest["files"].values(), *manifest.get("int8_files", {}).values()]:
        (folder / name).write_bytes(b"x")
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_models_list_shows_the_onnx_exports_of_clipseg(tmp_path: Path) -> None:
    from server_helpers import install_as_catalogue

    folder = install_as_catalogue(tmp_path, "clipseg", seed=0)

    def listed() -> tuple[dict[str, Any], str]:
        as_json = invoke("--data-dir", tmp_path, "models", "list", "--json")
        table = invoke("--data-dir", tmp_path, "models", "list")
        assert as_json.exit_code == 0 and table.exit_code == 0, as_json.output + table.output
        rows = {row["name"]: row for row in json.loads(as_json.stdout)}
        cells = [[c.strip() for c in line.split("│")] for line in table.stdout.splitlines() if "│" in line]
        return rows, next(c[4] for c in cells if c[1] == "clipseg")

    rows, cell = listed()
    assert rows["clipseg"]["onnx"] == [] and cell == "no"
    assert all(r["onnx"] is None for r in rows.values() if r["backend"] != "clipseg")
    fake_onnx_export(folder, int8=False)
    rows, cell = listed()
    assert rows["clipseg"]["onnx"] == ["fp32"] and cell == "fp32"
    shutil.rmtree(folder / "onnx")
    fake_onnx_export(folder, int8=True)
    rows, cell = listed()
    assert rows["clipseg"]["onnx"] == ["fp32", "int8"] and cell == "fp32, int8"
    manifest = folder / "onnx" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["image_size"]
    data["tokenizer"]["max_length"] = "many"
    manifest.write_text(json.dumps(data))  # damaged: counts as no export (re-export fixes it), not a crash
    rows, cell = listed()
    assert rows["clipseg"]["onnx"] == [] and cell == "no"


# -- file helpers -------------------------------------------------------------------------------------


def test_plan_outputs_keeps_names_apart(tmp_path: Path) -> None:
    src = tmp_path / "in"
    files = [src / "a.jpg", src / "a.png", src / "b.PNG", src / "B.jpg", src / "c.webp", src / "sub" / "c.png"]
    plan = dict(plan_outputs(files, tmp_path / "out", src))
    out = tmp_path / "out"
    assert plan[src / "a.jpg"] == out / "a.jpg.png" and plan[src / "a.png"] == out / "a.png.png"
    assert plan[src / "b.PNG"] == out / "b.PNG.png" and plan[src / "B.jpg"] == out / "B.jpg.png"  # case-blind
    assert plan[src / "c.webp"] == out / "c.png" and plan[src / "sub" / "c.png"] == out / "sub" / "c.png"
    flat = dict(plan_outputs([src / "c.webp", src / "sub" / "c.png"], out, None))
    assert sorted(p.name for p in flat.values()) == ["c.png.png", "c.webp.png"]
    in_place = plan_outputs([src / "x.png"], src, None)  # the output folder is the input folder
    assert in_place == [(src / "x.png", src / "x-2.png")]  # the input is never overwritten


def test_plan_outputs_never_names_an_input_through_a_link(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "x.jpg").write_bytes(b"jpeg")
    os.link(src / "x.jpg", out / "x.png")  # out/x.png is the input file under another name
    assert plan_outputs([src / "x.jpg"], out, src) == [(src / "x.jpg", out / "x-2.png")]


def test_plan_outputs_never_names_a_folder(tmp_path: Path) -> None:
    """Before: in/a.jpg -> out/a.png, and in/a.png/x.jpg -> out/a.png/x.png failed: 'Not a directory'."""
    src, out = tmp_path / "in", tmp_path / "out"
    (out / "b.png").mkdir(parents=True)  # a folder already there
    files = [src / "a.jpg", src / "a.png" / "x.jpg", src / "b.jpg"]
    assert plan_outputs(files, out, src) == [
        (src / "a.jpg", out / "a-2.png"),
        (src / "a.png" / "x.jpg", out / "a.png" / "x.png"),
        (src / "b.jpg", out / "b-2.png"),
    ]


def test_output_target_defaults(tmp_path: Path) -> None:
    photo = tmp_path / "p.jpg"
    assert output_target(None, photo, "alpha") == tmp_path / "p.alpha.png"
    assert output_target(None, None, "preview") == Path("preview.png")
    assert output_target("-", photo, "mask") is None
    assert output_target(str(tmp_path), photo, "mask") == tmp_path / "p.mask.png"
    assert output_target(str(tmp_path / "o.png"), None, "mask") == tmp_path / "o.png"
    assert output_target(f"{tmp_path / 'new'}/", photo, "mask") == tmp_path / "new" / "p.mask.png"  # a folder to be


def test_write_atomic_never_leaves_a_partial_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "m.png"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first" and os.stat(target).st_mode & 0o644 == 0o644

    def fail(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match="No space left"):
        write_atomic(target, b"second")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.png"]


def test_a_refused_private_url_names_the_flag(lib: Library, tmp_path: Path) -> None:
    result = invoke("mask", "http://127.0.0.1:9/x.png", "-p", "cat", "--model", lib.model, "-o", tmp_path / "m.png")
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.splitlines()
    assert line.endswith("AUTOMASK_ALLOW_PRIVATE_URLS=true. On the command line: automask --allow-private-urls ...")
    record = errors.PrivateAddressError("Refused the image URL http://10.0.0.1/: a private address.")
    assert error_record("http://10.0.0.1/", record)["error"].endswith("automask --allow-private-urls ...")


def test_flags_the_model_ignores_get_a_note(lib: Library, tmp_path: Path) -> None:
    out = tmp_path / "m.png"
    result = invoke("mask", lib.photo, "-p", PROMPT, "--model", lib.model, "--text-threshold", "0.5", "-o", out)
    assert result.exit_code == 0 and out.is_file(), result.output
    assert "note: --text-threshold is ignored: it applies to grounded-sam models, not 'clipseg'" in result.stderr
    plain = invoke("mask", lib.photo, "-p", PROMPT, "--model", lib.model, "-o", out)
    assert "note: --" not in plain.stderr
    subject = SimpleNamespace(open=None, backend=SimpleNamespace(name="subject"))
    options = MaskOptions.parse({"refine": True, "text_threshold": 0.3})
    assert ignored_flags(subject, options) == [
        "--refine is ignored: it sharpens clipseg's masks, not 'subject''s",
        "--text-threshold is ignored: it applies to grounded-sam models, not 'subject'",
    ]
    grounded = SimpleNamespace(name="grounded-sam", takes_text_threshold=True)
    assert ignored_flags(SimpleNamespace(open=grounded, backend=grounded), options) == [
        "--refine is ignored: it sharpens clipseg's masks, not 'grounded-sam''s"
    ]


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0", ""])
def test_an_invalid_device_is_a_usage_error_naming_what_was_set(tmp_path: Path, device: str) -> None:
    """Before: `--device tpu` said 'device (AUTOMASK_DEVICE): ...', a variable the user never set, while README's
    exit code 2 is a message naming the flag; the variable is named when it is what was set."""
    why = f"must be cpu, cuda, cuda:N (a GPU's index), mps or another torch device type, not {device!r}\n"
    result = invoke("--device", device, "models", "list", AUTOMASK_DEVICE="cpu")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: --device: {why}"
    result = invoke("models", "list", AUTOMASK_DEVICE=device) if device else result
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: device (AUTOMASK_DEVICE): {why}" if device else f"error: --device: {why}")
    valid = ("cpu", "cuda", "cuda:1", "mps", "mps:0", "xpu", "xpu:1")  # every torch device type, with an index
    assert [Settings(device=d).device for d in valid] == list(valid)


def test_mask_of_several_images_points_to_batch(lib: Library, tmp_path: Path) -> None:
    """Before: `automask mask *.jpg -p cat` (the shell gives one name per file) exited 2 with "Got unexpected extra
    argument (...)", listing every name but the first, and no word of `batch`."""
    names = [tmp_path / f"{n}.png" for n in range(5)]
    result = invoke("mask", *names, "-p", "cat", "--model", lib.model, "--json")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: IMAGE: mask takes one image, and was given 5 ('{names[0]}', '{names[1]}', ...); to mask several: "
        f"automask batch IMAGES... -o OUTDIR -p ...\n"
    )
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_mask_of_a_quoted_glob_points_to_batch(lib: Library, tmp_path: Path) -> None:
    """Before: `automask mask 'photos/*.png' -p cat` (a glob the shell left as typed) said "Cannot read
    'photos/*.png': no such file.", exit 3, though it matches files. Now it is a usage error that says how many it
    matches and points to batch, as several images given do; a glob matching nothing, or a file named like one,
    is as before."""
    for n in range(3):
        (tmp_path / f"{n}.png").write_bytes(b"not read")
    pattern = f"{tmp_path}/*.png"
    result = invoke("mask", pattern, "-p", "cat", "--model", lib.model)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: IMAGE: '{pattern}' is a glob matching 3 files, and mask takes one image; to mask them: automask "
        f"batch '{pattern}' -o OUTDIR -p ...\n"
    )
    none = invoke("mask", f"{tmp_path}/*.jpg", "-p", "cat", "--model", lib.model)
    assert (none.exit_code, none.stderr) == (3, f"error: Cannot read '{tmp_path}/*.jpg': no such file.\n")


def test_mask_of_a_quoted_glob_counts_the_files_it_matches(lib: Library, tmp_path: Path) -> None:
    """A quoted glob is counted by the files it matches, as batch takes them: not its folders, nor links that lead
    to no file. Before: `mask 'shots/*.png'` matching one photo, a folder and a dangling link said "a glob matching 3
    files", and one matching only dangling links pointed to batch, which then said "no images found"."""
    (tmp_path / "a.png").write_bytes(b"not read")
    (tmp_path / "b.png").mkdir()
    (tmp_path / "c.png").symlink_to("gone.png")
    pattern = f"{tmp_path}/*.png"
    result = invoke("mask", pattern, "-p", "cat", "--model", lib.model)
    assert result.exit_code == 2, result.output
    assert f"'{pattern}' is a glob matching 1 file, and mask takes one image" in result.stderr
    only_links = invoke("mask", f"{tmp_path}/c*", "-p", "cat", "--model", lib.model)
    assert (only_links.exit_code, only_links.stderr) == (3, f"error: Cannot read '{tmp_path}/c*': no such file.\n")


def test_a_file_named_like_a_data_uri_is_read_as_the_file(
    lib: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `automask mask data:x.png` (a file of that name) was taken for a data: URI: "malformed", exit 3."""
    shutil.copy(lib.photo, tmp_path / "data:x.png")
    monkeypatch.chdir(tmp_path)
    result = invoke("mask", "data:x.png", "-p", "cat", "--model", lib.model)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data:x.mask.png").is_file()
    uri = invoke("mask", "data:image/png;base64,AAAA", "-p", "cat", "--model", lib.model)
    assert uri.exit_code == 3 and "not an image automask can read" in uri.stderr, uri.output  # decoded: a data: URI


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["mask", "", "-p", "cat"], "'IMAGE'"),
        (["mask", "{photo}", "-p", "cat", "-o", ""], "'-o' / '--output'"),
        (["mask", "{photo}", "-p", "cat", "--instances", ""], "'--instances'"),
        (["batch", "", "-p", "cat", "-o", "out"], "'DIR_OR_GLOB | FILE...'"),
        (["batch", "{folder}", "-p", "cat", "-o", ""], "'-o' / '--output'"),
    ],
)
def test_an_empty_path_is_a_usage_error(
    lib: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], named: str
) -> None:
    """Before: '' (a script's unset variable: `automask batch "$SRC" -o "$OUT"`) was read as '.': batch masked every
    image of the current folder, or wrote the masks and instance masks into it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(lib.photo, folder / "a.png")
    monkeypatch.chdir(folder)
    given = [a.format(photo=folder / "a.png", folder=folder) for a in args]
    result = invoke(*given, "--model", lib.model)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {named}: the path is empty (an unset variable?): name a file or folder" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]


def test_an_empty_data_dir_variable_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: AUTOMASK_DATA_DIR='' (a unit's or compose file's unset variable: `AUTOMASK_DATA_DIR=${DATA}`) was read
    as '.': models, keys and results went into whatever folder automask ran in, as --data-dir '' did before it was
    refused."""
    monkeypatch.chdir(tmp_path)
    result = invoke("models", "list", "--json", AUTOMASK_DATA_DIR="")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: data_dir (AUTOMASK_DATA_DIR): the path is empty (an unset variable?): name a folder, or leave the "
        "variable out for the default (~/.cache/automask).\n"
    )
    assert list(tmp_path.iterdir()) == []
