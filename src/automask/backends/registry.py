"""Backend registry: names -> factories. Factories import their heavy dependencies lazily."""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from automask.backends.base import Backend
from automask.errors import UnknownModelError
from automask.settings import Settings

Factory = Callable[[Path, Settings], Backend]
"""Builds a loaded backend from a local model folder and the settings."""

_FACTORIES: dict[str, Callable[[], Factory]] = {}
_LOADED: weakref.WeakValueDictionary[tuple[str, ...], Backend] = weakref.WeakValueDictionary()
"""The loaded backends, while something (a `MaskGenerator`) holds them: shared, never kept for ever."""
_LOCK = threading.Lock()


def register(name: str, loader: Callable[[], Factory]) -> None:
    """Register backend `name`; `loader()` imports the backend module and returns its factory."""
    _FACTORIES[name] = loader


def backend_names() -> list[str]:
    """Names of every registered backend, sorted."""
    return sorted(_FACTORIES)


def create(name: str, path: Path, settings: Settings) -> Backend:
    """Load backend `name` from `path`, once per (backend, folder, device, runtime, int8, precision, detector size,
    preset, threads) while it is in use: later calls reuse it until nothing holds it any more (its memory is then
    freed, and a later call loads it again)."""
    if name not in _FACTORIES:
        raise UnknownModelError(f"Unknown backend '{name}'. Valid backends: {', '.join(backend_names())}.")
    key = (
        name,
        str(Path(path).resolve()),
        settings.device,
        settings.runtime,
        str(settings.int8),
        settings.precision,
        str(settings.detector_size),
        settings.preset,
        str(settings.threads),  # an ONNX Runtime session's own thread pool
    )
    with _LOCK:
        backend = _LOADED.get(key)
        if backend is None:
            backend = _LOADED[key] = _FACTORIES[name]()(Path(path), settings)
        return backend


def clear_cache() -> None:
    """Forget every loaded backend (tests, or to free memory)."""
    with _LOCK:
        _LOADED.clear()


def _clipseg() -> Factory:
    # Picks ONNX Runtime or torch per `settings.runtime` and the artifacts in the model folder.
    from automask.backends.clipseg_common import load

    return load


register("clipseg", _clipseg)


def _subject() -> Factory:
    from automask.backends.subject import load

    return load


register("subject", _subject)


def _torch_backend(module: str) -> Callable[[], Factory]:
    """The loader of `automask.backends.<module>.load`, a backend that needs torch and transformers."""

    def loader() -> Factory:
        from automask.errors import require

        require("torch", "torch")
        require("transformers", "torch")
        factory: Factory = importlib.import_module(f"automask.backends.{module}").load
        return factory

    return loader


register("grounded-sam", _torch_backend("grounded_sam"))
register("grounded-sam2", _torch_backend("grounded_sam"))  # the same backend: the folder's mask head decides
register("grounded-edgetam", _torch_backend("grounded_sam"))
register("sam3", _torch_backend("sam3"))
