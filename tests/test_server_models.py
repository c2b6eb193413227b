"""Model choice on the HTTP service (the `model` extension field and GET /v1/models): two tiny random CLIPSegs,
the default given as a folder (--model PATH) and another installed as the catalogue model 'clipseg'."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from automask import MaskGenerator, Settings
from automask.server import keys as keystore
from automask.server import runner as runner_module
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.store import Store
from server_helpers import LiveServer, decode, install_as_catalogue, png_bytes, wait_for, wait_ready

pytest.importorskip("fastapi")

SLUG = "automatic-mask-generator"
OPTIONS = {"prompt": "person", "threshold": 0.5, "grow_mask": 0}


class CountingGenerator(MaskGenerator):
    """MaskGenerator that counts how many the server tries to build for each model spec."""

    built: ClassVar[dict[Any, int]] = {}

    def __init__(self, model: Any = None, settings: Settings | None = None, cache_size: int = 4) -> None:
        CountingGenerator.built[model] = CountingGenerator.built.get(model, 0) + 1
        super().__init__(model, settings, cache_size)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with a second tiny CLIPSeg (another seed) installed as the catalogue model 'clipseg'."""
    folder = tmp_path_factory.mktemp("models-data")
    install_as_catalogue(folder, "clipseg", seed=1)
    return folder


@pytest.fixture(scope="module")
def live(tiny_clipseg_dir: Path, data_dir: Path) -> Iterator[Any]:
    """A server whose default is the tiny CLIPSeg folder; 'clipseg' is also installed. `.token`: a key."""
    patch = pytest.MonkeyPatch()
    patch.setattr(runner_module, "MaskGenerator", CountingGenerator)
    CountingGenerator.built.clear()
    settings = Settings(data_dir=data_dir, model=str(tiny_clipseg_dir))
    try:
        with LiveServer(create_app(settings, ServerSettings(host="127.0.0.1"))) as server:
            wait_ready(server.url, 30)
            server.store = Store.in_data_dir(data_dir)
            server.token = keystore.create_key(server.store, name="models")[1]
            yield server
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def photo(astronaut: np.ndarray) -> str:
    """The astronaut as a bare base64 PNG."""
    return base64.b64encode(png_bytes(astronaut)).decode()


def post(live: Any, version: str = "v1", token: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"x-api-key": token or live.token}
    return httpx.post(f"{live.url}/{version}/{SLUG}", headers=headers, timeout=60, **kw)


def expected_mask(folder: Path, astronaut: np.ndarray) -> np.ndarray:
    """The library's own answer with the model in `folder` (loaded apart from the server)."""
    return MaskGenerator(str(folder), Settings(data_dir=folder.parent)).generate(astronaut, **OPTIONS).mask


def test_models_endpoint_lists_the_installed_models(live: Any, tiny_clipseg_dir: Path, data_dir: Path) -> None:
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    r = httpx.get(f"{live.url}/v1/models", headers={"x-api-key": live.token})
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == tiny_clipseg_dir.name
    assert [(m["name"], m["backend"], m["default"]) for m in body["models"]] == [
        (tiny_clipseg_dir.name, "clipseg", True),
        ("clipseg", "clipseg", False),
    ]
    assert body["models"][0]["loaded"] is True
    assert str(tiny_clipseg_dir.parent) not in r.text and str(data_dir) not in r.text  # names only, no paths
    config = httpx.get(f"{live.url}/web/config").json()
    assert config["model"] == tiny_clipseg_dir.name
    assert config["models"] == [tiny_clipseg_dir.name, "clipseg"]


def test_model_field_picks_the_model_loaded_once(
    live: Any, photo: str, astronaut: np.ndarray, data_dir: Path, tiny_clipseg_dir: Path
) -> None:
    default = decode(post(live, json={"image": photo, **OPTIONS}).content)
    named_default = decode(post(live, json={"image": photo, **OPTIONS, "model": live_default(live)}).content)
    r = post(live, json={"image": photo, **OPTIONS, "model": "clipseg"})
    assert r.status_code == 200, r.text
    other = decode(r.content)
    assert np.array_equal(default, named_default)
    assert np.count_nonzero(default != other) > 1000, "the two models gave the same mask"
    assert np.array_equal(other, expected_mask(data_dir / "models" / "clipseg", astronaut))
    form = post(
        live,
        data={"prompt": "person", "threshold": "0.5", "grow_mask": "0", "model": "clipseg"},
        files={"image": ("a.png", base64.b64decode(photo), "image/png")},
    )
    assert np.array_equal(decode(form.content), other)
    body = post(live, json={"image": photo, **OPTIONS, "model": "clipseg", "base64": True}).json()
    assert body["model"] == "clipseg"
    assert np.array_equal(decode(base64.b64decode(body["image"])), other)
    listed = httpx.get(f"{live.url}/v1/models", headers={"x-api-key": live.token}).json()["models"]
    assert [m["loaded"] for m in listed] == [True, True]
    assert CountingGenerator.built == {str(tiny_clipseg_dir): 1, "clipseg": 1}, "a model was loaded twice"


def live_default(live: Any) -> str:
    return str(httpx.get(f"{live.url}/web/config").json()["model"])


def test_v2_job_keeps_and_uses_its_model(live: Any, photo: str) -> None:
    v1 = decode(post(live, json={"image": photo, **OPTIONS, "model": "clipseg"}).content)
    sub = post(live, "v2", json={"image": photo, **OPTIONS, "model": "clipseg"}).json()
    headers = {"x-api-key": live.token}
    wait_for(lambda: httpx.get(sub["status_url"], headers=headers).json()["status"] == "COMPLETED", 30)
    result = httpx.get(sub["response_url"], headers=headers).json()
    assert result["model"] == "clipseg"
    assert np.array_equal(decode(httpx.get(result["output"], headers=headers).content), v1)


def test_unknown_paths_and_missing_models_are_refused(
    live: Any, photo: str, tiny_clipseg_dir: Path, data_dir: Path
) -> None:
    key, token = keystore.create_key(live.store, credits=5)
    # A client may not name a folder on the server, not even one holding a model.
    for model in ("nope", str(tiny_clipseg_dir), "../clipseg", "sam"):
        for version in ("v1", "v2"):
            r = post(live, version, token, json={"image": photo, **OPTIONS, "model": model})
            assert r.status_code == 404, (model, r.text)
            error = r.json()["error"]
            assert tiny_clipseg_dir.name in error and "clipseg" in error and "/v1/models" in error
    others = f"This server also has '{tiny_clipseg_dir.name}', 'clipseg', which can answer this prompt"
    for version in ("v1", "v2"):  # not installed: how to install it, and what this server can answer with instead
        r = post(live, version, token, json={"image": photo, **OPTIONS, "model": "grounded-sam"})
        assert r.status_code == 503 and "automask models pull grounded-sam" in r.json()["error"]
        assert others in r.json()["error"] and str(data_dir) not in r.json()["error"]
    for bad in ("", 3, "x" * 201):
        r = post(live, "v1", token, json={"image": photo, **OPTIONS, "model": bad})
        assert r.status_code == 400 and r.json()["error"].startswith("model"), r.text
    assert keystore.get_key(live.store, key.id).credits == 5  # refused requests cost nothing
    assert set(CountingGenerator.built) <= {str(tiny_clipseg_dir), "clipseg"}  # nothing else was tried (alone too)


def test_inference_time_header(live: Any, photo: str) -> None:
    start = time.perf_counter()
    r = post(live, json={"image": photo, **OPTIONS})
    elapsed = time.perf_counter() - start
    seconds = float(r.headers["x-inference-time"])
    assert 0 < seconds < elapsed
    assert Image.open(io.BytesIO(r.content)).size == (512, 512)


def test_a_missing_model_names_the_models_that_could_answer_the_prompt(tmp_path: Path) -> None:
    """Only models whose backend reads the prompt's words: any open-vocabulary one; the embedded 'subject' only for
    its own words; never a refiner (it reads no text), the missing model itself, or one whose load just failed."""
    from automask.errors import ModelNotAvailableError
    from automask.models import MARKER
    from automask.server.runner import Runner
    from server_helpers import FakeBackend

    settings = Settings(data_dir=tmp_path)
    install_as_catalogue(tmp_path, "clipseg", seed=2)
    for name in ("subject", "sam"):  # installed as far as the server can tell (a marker); never loaded here
        folder = settings.models_dir / name
        folder.mkdir(parents=True)
        (folder / MARKER).write_text(json.dumps({"name": name, "backend": name, "repos": []}))
    runner = Runner(settings, ServerSettings(), MaskGenerator(FakeBackend(), settings))
    try:
        for targets, named in (
            (["person"], "'fake-gradient', 'clipseg', 'subject'"),
            (["person", "cup"], "'fake-gradient', 'clipseg'"),  # 'subject' cannot mask a cup
        ):
            with pytest.raises(ModelNotAvailableError) as err:
                runner.check("grounded-sam", targets)
            message = err.value.message
            assert message.startswith("The model 'grounded-sam' is not installed")
            assert "automask models pull grounded-sam" in message
            assert message.endswith(
                f"This server also has {named}, which can answer this prompt: send one as the request's 'model' "
                "(GET /v1/models lists them)."
            ), message
        assert runner.alternatives("clipseg", ["cup"]) == ["fake-gradient"]
        runner._slot("clipseg").error = ModelNotAvailableError("broken")  # a load that failed a moment ago
        runner._slot("clipseg").failed_at = time.monotonic()
        assert runner.alternatives("grounded-sam", ["cup"]) == ["fake-gradient"]
    finally:
        runner.close()
