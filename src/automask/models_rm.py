"""`automask models rm`: delete a catalogue model from the data folder (never from the Hugging Face cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from automask import staging
from automask.catalogue import ModelSpec, catalogue_spec
from automask.errors import ModelBusyError, ModelNotAvailableError
from automask.models import hf_cached, model_dir
from automask.settings import Settings


@dataclass(frozen=True)
class Removed:
    """What `remove` deleted of a catalogue model (the paths they had), the Hugging Face cache folder that still
    holds it complete (`models list` shows it installed from there) or None, and, when the model folder it deleted
    was a symbolic link, the folder that link pointed to (kept: not automask's to delete) or None."""

    name: str
    paths: list[Path]
    cached: Path | None
    kept: Path | None = None


def remove(name: str, settings: Settings) -> Removed:
    """Delete catalogue model `name` from the data folder: its folder (with its ONNX export), and what failed or
    killed pulls of it left (see `staging.remove`). Never the Hugging Face cache, which other programs share.
    `UnknownModelError` for a name not in the catalogue; `ModelBusyError` while a pull or export of it runs;
    `ModelNotAvailableError` when the data folder holds nothing of it (saying so when the Hugging Face cache does)."""
    from automask.backends.clipseg_common import onnx_dir

    spec = catalogue_spec(name)
    folder = model_dir(name, settings)
    _refuse_under_an_unlocked_export(name, folder)
    link = folder.resolve() if folder.is_symlink() and folder.exists() else None  # not a dangling one's
    paths = staging.remove(folder, inner=(onnx_dir(folder),))
    cached = hf_cached(name)
    if paths:
        return Removed(name, paths, cached, link if folder in paths else None)
    if cached is not None:
        raise ModelNotAvailableError(
            f"The model '{name}' is not in the data folder ('{settings.models_dir}'): it is read from the Hugging Face "
            f"cache, '{cached}', which other programs share; automask does not delete it. To delete it there: "
            f"{hf_cache_rm(spec)}"
        )
    raise ModelNotAvailableError(
        f"The model '{name}' is not installed in '{settings.models_dir}': nothing to remove (automask models list "
        "shows what is installed)."
    )


def _refuse_under_an_unlocked_export(name: str, folder: Path) -> None:
    """`ModelBusyError` when an export by an older automask, which takes no lock, may be writing into `folder`: one
    of its staging folders was written in the last hour (`unlocked_exports`, the rule `models list` tidies by).
    Looked at before `staging.remove` takes the lock: such an export would not wait for it anyway."""
    from automask.backends.clipseg_common import UNLOCKED_EXPORT_AGE_S, unlocked_exports

    live = unlocked_exports(folder, live=True)
    if live:
        raise ModelBusyError(
            f"The model '{name}' is not removed: an export of it by an older automask may be running ('{live[0]}' "
            f"was written in the last {UNLOCKED_EXPORT_AGE_S / 60:.0f} minutes; such an export takes no lock). Run "
            "this again once it has ended; if none is running, delete that folder first."
        )


def hf_cache_rm(spec: ModelSpec) -> str:
    """The command that deletes single-repository catalogue model `spec` from the Hugging Face cache."""
    return f"hf cache rm model/{spec.repos[0]} (older huggingface_hub releases: huggingface-cli delete-cache)"
