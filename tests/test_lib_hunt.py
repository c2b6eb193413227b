"""Findings of an adversarial pass over the library call (odd prompts, images and options), each a failing-before
test."""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import automask
from automask import models, pipeline
from automask.backends.refine import RefinedBackend
from automask.cli import main
from automask.errors import ImageDecodeError, ImageTooLargeError, InvalidOptionError, StoppedError
from automask.imageio import load_image
from automask.imageio.pixels import composite_on_white
from automask.options import MaskOptions, parse_prompt
from automask.pipeline import MaskGenerator
from automask.settings import Settings
from tiny_models import make_tiny_sam


@pytest.fixture()
def gen(tiny_clipseg_dir: Path) -> MaskGenerator:
    return MaskGenerator(str(tiny_clipseg_dir))


IMAGE = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("text", ["so\ud800fa", "caf\udce9", "\udfff, lamp"])
def test_a_prompt_holding_an_unpaired_surrogate_is_an_invalid_option(gen: MaskGenerator, text: str) -> None:
    """Before: a lone surrogate (JSON's "\\ud800" escape alone; a byte that is not UTF-8 on a command line, read as
    "\\udce9") reached the tokenizer, which raised TypeError: a traceback from the library, 'internal error' exit 70
    from the command line."""
    for field, call in [
        ("prompt", lambda: gen.generate(IMAGE, text)),
        ("prompt", lambda: gen.generate(IMAGE, ["cup", text])),
        ("negative_prompt", lambda: gen.generate(IMAGE, "cup", negative_prompt=text)),
        ("negative_prompt", lambda: MaskOptions(negative_prompt=text)),
        ("prompt", lambda: parse_prompt(text)),
    ]:
        with pytest.raises(InvalidOptionError) as err:
            call()
        assert err.value.field == field
        assert "is not valid text: it holds an unpaired surrogate" in err.value.message


def test_a_prompt_byte_that_is_not_utf8_on_the_command_line_is_a_usage_error(
    tiny_clipseg_dir: Path, tmp_path: Path
) -> None:
    """Before: `automask mask photo.png --prompt $'caf\\xe9'` (a Latin-1 terminal) ended 'internal error: TypeError',
    exit 70."""
    photo = tmp_path / "photo.png"
    Image.fromarray(IMAGE).save(photo)
    for flag in ("--prompt", "--negative-prompt"):
        args = [str(photo), "-o", str(tmp_path / "out.png"), "--model", str(tiny_clipseg_dir)]
        args += ["--prompt", "cup"] if flag == "--negative-prompt" else []
        run = CliRunner().invoke(main, ["mask", *args, flag, "caf\udce9"])
        assert run.exit_code == 2, run.output
        assert f"error: {flag}: is not valid text: it holds an unpaired surrogate" in run.output
        assert not (tmp_path / "out.png").exists()


def feed(fifo: Path, size: int) -> threading.Thread:
    """A thread writing `size` zero bytes into the named pipe `fifo`, then closing it (its reader may stop first)."""

    def write() -> None:
        try:
            with open(fifo, "wb") as out:
                out.write(bytes(size))
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("as_path", [True, False], ids=["Path", "str"])
def test_a_path_to_a_pipe_or_device_reads_no_more_than_the_byte_limit(tmp_path: Path, as_path: bool) -> None:
    """Before: a path's size was checked from stat() and the file then read whole, so a path to a pipe or a device
    (stat() size 0: /dev/zero, /dev/urandom, a named pipe) was read to its end past AUTOMASK_MAX_IMAGE_BYTES:
    `load_image("/dev/zero")` filled the memory (the command line reads such a path bounded, the library did not)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    settings = Settings(max_image_bytes=10_000)
    writer = feed(fifo, 50 * settings.max_image_bytes)
    with pytest.raises(ImageTooLargeError) as err:
        load_image(fifo if as_path else str(fifo), settings)
    assert err.value.message.startswith("The image is over 10,000 bytes; the limit is 10,000 bytes")
    writer.join(10)
    assert not writer.is_alive()


@pytest.mark.parametrize("kind", ["path", "file"])
def test_a_high_byte_limit_costs_a_small_file_no_more_memory_than_its_size(tmp_path: Path, kind: str) -> None:
    """Before: a path (and a file object) was read with read(AUTOMASK_MAX_IMAGE_BYTES + 1), which allocates that many
    bytes up front whatever the file holds: a limit raised to 'no limit' (2**50) made every image a MemoryError, and
    the default 32 MiB was set aside for each small file. Now it is read in bounded pieces, to its end or the limit."""
    path = tmp_path / "a.png"
    Image.fromarray(IMAGE).save(path)
    settings = Settings(max_image_bytes=1 << 50)
    if kind == "path":
        assert np.array_equal(load_image(path, settings), IMAGE)
    else:
        with path.open("rb") as file:
            assert np.array_equal(load_image(file, settings), IMAGE)  # type: ignore[arg-type]


def alive(refs: list[weakref.ref[Any]]) -> list[bool]:
    gc.collect()
    return [ref() is not None for ref in refs]


def own_copy(model_dir: Path, tmp_path: Path) -> str:
    """A copy of `model_dir` for one test: the registry shares a backend by folder, so a test watching one be freed
    loads its own, which nothing else in the session (a one-shot `generate`'s kept generators, another test's
    objects) can hold."""
    return str(shutil.copytree(model_dir, tmp_path / "own-model"))


def test_a_dropped_generators_models_are_freed(tiny_clipseg_dir: Path, tmp_path: Path) -> None:
    """Before: every backend ever loaded stayed in the registry's cache for the life of the process, so deleting a
    MaskGenerator freed none of its models, and the one-shot `generate`, which keeps only its last generators and
    says an older one's models are freed, kept every model it had loaded."""
    settings = Settings(data_dir=tmp_path / "data")
    model = own_copy(tiny_clipseg_dir, tmp_path)
    gen = MaskGenerator(model, settings)
    same = MaskGenerator(model, settings)
    assert same.backend is gen.backend  # loaded once while in use
    refs = [weakref.ref(gen.backend)]
    del gen
    assert alive(refs) == [True]  # `same` still uses it
    del same
    assert alive(refs) == [False]
    again = MaskGenerator(model, settings)
    assert again.generate(IMAGE, "cup", grow_mask=0).mask.shape == IMAGE.shape[:2]  # loaded again when asked for


def test_the_one_shot_function_frees_the_models_of_the_generators_it_drops(
    tiny_clipseg_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "_DEFAULT", OrderedDict())
    settings = Settings(data_dir=tmp_path / "data")
    refs = []
    for i in range(pipeline.ONE_SHOT_KEPT + 1):
        folder = shutil.copytree(tiny_clipseg_dir, tmp_path / f"model-{i}")
        automask.generate(IMAGE, "cup", model=folder, settings=settings, grow_mask=0)
        refs.append(weakref.ref(pipeline._DEFAULT[(str(folder), settings)].backend))
    assert alive(refs) == [False] + [True] * pipeline.ONE_SHOT_KEPT


@pytest.fixture()
def sam_settings(tmp_path: Path) -> Settings:
    """Settings whose data folder has a tiny SAM installed as the 'sam' model (refine's mask head)."""
    settings = Settings(data_dir=tmp_path / "data")
    target = models.model_dir("sam", settings)
    make_tiny_sam(target)
    (target / models.MARKER).write_text(json.dumps({"name": "sam", "backend": "sam", "repos": []}))
    return settings


def test_a_dropped_generators_refine_mask_head_is_freed(
    tiny_clipseg_dir: Path, sam_settings: Settings, tmp_path: Path
) -> None:
    """Before: `refined` kept every refined backend, and with it the CLIPSeg it wraps and its SAM, for ever."""
    gen = MaskGenerator(own_copy(tiny_clipseg_dir, tmp_path), sam_settings)
    gen.generate(IMAGE, "cup", refine=True, threshold=0.0)
    refined = gen._refined
    assert isinstance(refined, RefinedBackend)
    refs = [weakref.ref(refined), weakref.ref(refined.segmenter), weakref.ref(refined.inner)]
    del gen, refined
    assert alive(refs) == [False, False, False]


@pytest.mark.parametrize("make", ["quantize", "convert", "putpalette"])
def test_a_pil_palette_image_whose_palette_holds_alpha_keeps_its_transparency(make: str) -> None:
    """Before: a PIL palette image whose palette is RGBA (what `quantize()` or `convert("P")` of an RGBA image and
    `putpalette(..., "RGBA")` make in memory; a PNG file of it is read with its transparency as `info`) was read
    without its alpha: models saw the colours stored under transparent pixels instead of white, and a cut-out lost
    the image's transparency. The same image saved as PNG was read right."""
    rgba = np.random.default_rng(1).integers(0, 256, (16, 20, 4), dtype=np.uint8)
    rgba[:8, :, 3] = 0
    rgba[8:, :10, 3] = 255
    if make == "putpalette":
        img = Image.fromarray(np.arange(16 * 20, dtype=np.uint8).reshape(16, 20) % 6, mode="L").convert("P")
        img.putpalette([0, 0, 0, 0, 255, 0, 0, 255, 0, 255, 0, 128] + [10, 20, 30, 255] * 3, "RGBA")
    else:
        img = Image.fromarray(rgba).quantize() if make == "quantize" else Image.fromarray(rgba).convert("P")
    assert img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA" and not img.info
    png = io.BytesIO()
    img.save(png, format="PNG")
    stored = np.asarray(img.convert("RGBA"))
    assert stored[..., 3].min() == 0  # transparent pixels, whatever colour lies under them
    for keep_alpha in (False, True):
        got = load_image(img, Settings(), keep_alpha=keep_alpha)
        assert np.array_equal(got, load_image(png.getvalue(), Settings(), keep_alpha=keep_alpha))
        assert np.array_equal(got, stored if keep_alpha else composite_on_white(stored))


def test_a_stream_already_read_to_its_end_says_to_rewind_it(tmp_path: Path) -> None:
    """Before: an image written into a BytesIO and passed without seek(0) (or a file whose bytes were read already)
    was 'The image is empty (0 bytes)', which it is not."""
    buf = io.BytesIO()
    Image.fromarray(IMAGE).save(buf, format="PNG")
    path = tmp_path / "a.png"
    path.write_bytes(buf.getvalue())
    with path.open("rb") as file:
        file.read()
        for stream in (buf, file):
            with pytest.raises(ImageDecodeError) as err:
                load_image(stream, Settings())  # type: ignore[arg-type]
            assert err.value.message == (
                f"The image stream is at its end (byte {path.stat().st_size:,}), so nothing is left to read: rewind "
                "it with seek(0) before passing it (e.g. after saving an image into a BytesIO)."
            )
    buf.seek(0)
    assert np.array_equal(load_image(buf, Settings()), IMAGE)
    with pytest.raises(ImageDecodeError, match=r"^The image is empty \(0 bytes\)"):
        load_image(io.BytesIO(), Settings())  # an empty stream is still empty


def test_the_feature_cache_never_answers_for_another_image(gen: MaskGenerator, tiny_clipseg_dir: Path) -> None:
    """Guard (right before this pass): features are cached by the image's content, not by the array object, so an
    array changed in place, or a new array of the same shape that takes a freed one's id(), gets its own features."""
    fresh = MaskGenerator(str(tiny_clipseg_dir), cache_size=0)
    threshold = float(np.median(gen.backend.score(gen.backend.encode(IMAGE), ["cup"]).maps[0]))

    def check(image: np.ndarray) -> None:
        want = fresh.generate(image.copy(), "cup", threshold=threshold, grow_mask=0).mask
        assert np.array_equal(gen.generate(image, "cup", threshold=threshold, grow_mask=0).mask, want)

    image = IMAGE.copy()
    check(image)
    image[:] = 255 - image  # changed in place: same object, same id
    check(image)
    for seed in range(4):  # freed and made again: ids are reused
        other = np.random.default_rng(seed).integers(0, 256, IMAGE.shape, dtype=np.uint8)
        check(other)
        del other
    assert len(gen.cache._items) == gen.cache.max_items


def test_threads_calling_one_generator_at_once_get_the_answers_of_calls_one_at_a_time(tiny_clipseg_dir: Path) -> None:
    """Guard (right before this pass): one generator answering calls from many threads at once (the feature cache
    evicting meanwhile, a call told to stop among them) answers each as a call alone does."""
    shared = MaskGenerator(str(tiny_clipseg_dir), cache_size=2)
    alone = MaskGenerator(str(tiny_clipseg_dir), cache_size=0)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (20 + 3 * i, 30 + 2 * i, 3), dtype=np.uint8) for i in range(5)]
    calls = [
        (i % 5, ["cup", "dog, car", "tree . sky"][i % 3], {"threshold": 0.3 + 0.1 * (i % 3), "feather": i % 2})
        for i in range(30)
    ]
    want = [alone.generate(images[n], p, **opts).mask for n, p, opts in calls]

    def run(i: int) -> np.ndarray | None:
        n, prompt, opts = calls[i]
        try:
            return shared.generate(images[n], prompt, should_stop=lambda: i % 7 == 0, **opts).mask
        except StoppedError:
            return None

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, range(len(calls))))
    assert [g is None for g in got] == [i % 7 == 0 for i in range(len(calls))]
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True) if g is not None)


def test_batch_given_an_image_url_names_it_without_its_password(tmp_path: Path) -> None:
    """Before: `automask batch http://alice:s3cr3t@host/x.png` answered "no such file or folder:
    'http://alice:s3cr3t@host/x.png'", the password shown (an error naming an image URL never shows it: README)."""
    run = CliRunner().invoke(
        main, ["batch", "http://alice:s3cr3t@example.com/x.png", "-p", "subject", "-o", str(tmp_path / "out")]
    )
    assert run.exit_code == 2, run.output
    assert "s3cr3t" not in run.output and "alice" not in run.output
    assert "http://…@example.com/x.png" in run.output
    assert "mask IMAGE" in run.output
