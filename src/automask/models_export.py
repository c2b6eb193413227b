"""`automask models export`: a CLIPSeg model's ONNX Runtime artifacts, written beside it in the data folder (never
into the Hugging Face cache)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from automask import install, models
from automask.embedded import downloads_off
from automask.errors import AutomaskError, ModelNotAvailableError, UnknownModelError, require
from automask.settings import Settings

EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxruntime")
"""The packages `export_onnx` needs (the `export` extra)."""


def can_export() -> bool:
    """True when the packages `export_onnx` needs (torch, transformers, onnx, onnxruntime) are installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in EXPORT_MODULES)


def export_onnx(
    spec: str | None, settings: Settings, *, int8: bool | None = None, starting: Callable[[], None] | None = None
) -> Path:
    """Export CLIPSeg model `spec` (a catalogue name or a local folder) to the ONNX Runtime artifacts in
    `<model folder>/onnx` (the int8 copies too when `int8`, default `settings.int8`); return that folder.
    `starting` is called once the model and the packages are found, before the (long) export begins.

    Needs `pip install "automask[export]"`; the runtime that uses the artifacts needs no torch.
    """
    found = models.resolve(spec, settings)
    if found.backend != "clipseg":
        raise UnknownModelError(
            f"The model '{found.name}' runs on the '{found.backend}' backend, which has no ONNX export. "
            "Only CLIPSeg models are exported (e.g. automask models export clipseg)."
        )
    for module in EXPORT_MODULES:
        require(module, "export")
    path = _export_folder(found, settings)
    if starting is not None:
        starting()
    from automask.backends.clipseg_export import export

    return export(path, int8=settings.int8 if int8 is None else int8)


def _export_folder(found: models.ResolvedModel, settings: Settings) -> Path:
    """Where to export `found`: never into the Hugging Face cache (shared, managed by huggingface_hub); a catalogue
    model read from there is installed in the data folder first, by hard links as `pull` does. Any other snapshot
    (not a catalogue model's, or not the one `pull` takes: another cache or revision) is refused."""
    if models.snapshot_repo(real := found.path.resolve()) is None:  # resolved: a link to a snapshot is one too
        return found.path
    name = models.name_of(real)
    if name not in models.CATALOGUE or (cached := models.hf_cached(name)) is None or cached.resolve() != real:
        raise AutomaskError(f"'{found.path}' is in the Hugging Face cache: copy it out (cp -rL) and export the copy.")
    spec = models.CATALOGUE[name]
    why = downloads_off(settings)
    if why and not models.is_installed(name, settings) and not _complete(spec):  # `pull` would download it
        raise ModelNotAvailableError(
            f"The model '{name}' is read from the Hugging Face cache '{found.path}', which is incomplete (made by "
            f"from_pretrained, most likely), and downloads are off ({why}): nothing was exported. Copy it out "
            f"(cp -rL {found.path} DIR) and export the copy (automask models export DIR), or pull it once online "
            f"(automask models pull {name})."
        )
    return models.pull(name, settings)


def _complete(spec: models.ModelSpec) -> bool:
    """True when the Hugging Face cache holds single-repository model `spec` whole: `pull` copies it, offline."""
    return install.cached_snapshot(spec.repos[0], spec.files, complete=True) is not None
