"""Model management: the catalogue of named models, where they live, and how to pull them.

A model is either a name from the catalogue (installed under `<data_dir>/models/<name>` by
`automask models pull NAME`) or a local folder holding a checkpoint (`--model PATH`, `AUTOMASK_MODEL`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from automask.errors import ModelNotAvailableError, UnknownModelError
from automask.settings import Settings


@dataclass(frozen=True)
class ModelSpec:
    """A named model: the backend that runs it and the hub repositories its weights come from."""

    name: str
    backend: str
    repos: tuple[str, ...]
    description: str


CATALOGUE: dict[str, ModelSpec] = {
    "clipseg": ModelSpec(
        name="clipseg",
        backend="clipseg",
        repos=("CIDAS/clipseg-rd64-refined",),
        description="CLIPSeg rd64-refined: open-vocabulary masks from any text prompt (~600 MB).",
    ),
}

# config.json `model_type` -> backend, for local folders holding a transformers checkpoint.
_MODEL_TYPES = {"clipseg": "clipseg"}

MARKER = "automask.json"
"""A file written into every pulled model folder: {"name", "backend", "repos"}."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on disk: the backend that runs it and the folder to load it from."""

    name: str
    backend: str
    path: Path


def model_dir(name: str, settings: Settings) -> Path:
    """Folder where the named model is (or would be) installed."""
    return settings.models_dir / name


def is_installed(name: str, settings: Settings) -> bool:
    """True when the named model has been pulled into the data folder."""
    return (model_dir(name, settings) / MARKER).is_file()


def installed_models(settings: Settings) -> list[str]:
    """Names of the catalogue models installed in the data folder."""
    return [n for n in CATALOGUE if is_installed(n, settings)]


def detect_backend(path: Path) -> str:
    """Which backend runs the checkpoint in folder `path` (from automask.json or config.json)."""
    marker = path / MARKER
    if marker.is_file():
        return str(json.loads(marker.read_text())["backend"])
    config = path / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
        raise ModelNotAvailableError(
            f"The model in '{path}' has model_type '{model_type}', which automask cannot run. "
            f"Supported: {', '.join(sorted(_MODEL_TYPES))}."
        )
    raise ModelNotAvailableError(
        f"'{path}' holds no model automask can load (no {MARKER} or config.json). "
        "Point --model at a folder saved with save_pretrained, or pull one: automask models pull clipseg"
    )


def default_model(settings: Settings) -> str:
    """The model used when none is named: AUTOMASK_MODEL, else the first installed catalogue model."""
    if settings.model:
        return settings.model
    installed = installed_models(settings)
    return installed[0] if installed else "clipseg"


def resolve(spec: str | None, settings: Settings) -> ResolvedModel:
    """Find model `spec` (a catalogue name or a local folder; None: the default) on disk.

    Raises `UnknownModelError` for a name that is neither, and `ModelNotAvailableError` (with the command
    that installs it) for a catalogue model that is not pulled yet.
    """
    spec = spec or default_model(settings)
    path = Path(spec).expanduser()
    if spec not in CATALOGUE and path.is_dir():
        return ResolvedModel(name=str(path), backend=detect_backend(path), path=path)
    if spec not in CATALOGUE:
        raise UnknownModelError(
            f"Unknown model '{spec}'. Use one of: {', '.join(CATALOGUE)}, or the path of a local model folder."
        )
    if not is_installed(spec, settings):
        raise ModelNotAvailableError(
            f"The model '{spec}' is not installed. Install it with: automask models pull {spec} "
            f"(or point --model / AUTOMASK_MODEL at a local model folder)."
        )
    return ResolvedModel(name=spec, backend=CATALOGUE[spec].backend, path=model_dir(spec, settings))
