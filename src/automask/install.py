"""Putting model files on disk from the Hugging Face hub: downloads that resume, copies of a complete cached
snapshot, room checked first, and the errors that name the fix. Where they are written, and the atomic swap into
place, is `automask.staging`.

huggingface_hub is imported only inside the functions that talk to it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from automask.errors import ModelNotAvailableError

FALLBACK_WEIGHTS = ("pytorch_model*.bin",)
"""Downloaded only when a repository has no safetensors weights."""
RESUME = Path(".cache") / "automask"
"""Where, in a download folder, `fetch_weights` keeps the weight files it is still downloading."""


def has_weights(folder: Path) -> bool:
    """True when `folder` (or a subfolder) holds safetensors or pytorch_model*.bin weights."""
    return any(folder.rglob("*.safetensors")) or any(folder.rglob("pytorch_model*.bin"))


def cached_snapshot(repo: str, files: tuple[str, ...], *, complete: bool = False) -> Path | None:
    """The Hugging Face cache folder of hub repository `repo` holding its config.json and weights, or None.
    Never uses the network; `files`: the patterns the model needs (others may be missing, unless `complete`: then
    every file of the cached repository listing that matches them must be there)."""
    from huggingface_hub import snapshot_download

    errors: tuple[type[BaseException], ...] = (OSError, ValueError, *hub_errors())
    try:
        folder = Path(snapshot_download(repo, local_files_only=True, allow_patterns=list(files)))
    except errors as exc:
        # a snapshot missing files we do not need (e.g. one fetched by from_pretrained) is still usable
        snapshot = getattr(exc, "snapshot_path", None)
        if snapshot is None or complete:
            return None
        folder = Path(snapshot)
    return folder if (folder / "config.json").is_file() and has_weights(folder) else None


def copy_snapshot(name: str, repo: str, snapshot: Path, dest: Path, files: tuple[str, ...]) -> None:
    """Put the `files` (patterns; its .bin weights when it has no safetensors) of Hugging Face cache folder
    `snapshot` of hub repository `repo` into folder `dest`, for catalogue model `name`: hard links to the cache's
    files where the file system allows (no second copy on disk), else copies (their room checked by `plan_model`).
    `ModelNotAvailableError` on failure."""
    sources = _snapshot_files(snapshot, files)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for file, source in sources.items():
            out = dest / file
            out.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)  # a kept partial download's copy
            try:
                os.link(source, out)
            except OSError:  # another file system, or one without hard links
                shutil.copyfile(source, out)
    except OSError as exc:
        raise ModelNotAvailableError(download_failure(name, repo, dest, exc)) from exc
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # what an earlier, failed download of it had kept


Todo = list[tuple[str, Any, Path]]
"""The weight files `fetch_weights` downloads: name in the repository, the hub's metadata, the partial file."""


def plan_model(
    name: str, parts: dict[str, Path], files: tuple[str, ...], cached: dict[str, Path] | None = None
) -> dict[str, Todo]:
    """The weight files of each hub repository of catalogue model `name` (repository -> its folder in the staging
    folder) still to download (`plan_weights`), once each disk they go to is found to have room for all of them
    together, and for the copies of the repositories taken from their Hugging Face cache folder (`cached`: repository
    -> snapshot; see `copy_snapshot`: not downloaded). `ModelNotAvailableError` when it has not, or the hub fails."""
    errors: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError, *hub_errors())
    cached = cached or {}
    plans: dict[str, Todo] = {}
    room: dict[int, tuple[str, Path, int]] = {}  # disk -> a repository going there, its folder, bytes they all need
    for repo, dest in parts.items():
        try:
            dest.mkdir(parents=True, exist_ok=True)
            if repo in cached:
                needed = _copied(cached[repo], dest, files)
            else:
                plans[repo] = plan_weights(repo, dest, files)
                needed = _needed(plans[repo])
            disk = dest.stat().st_dev
            _, _, before = room.get(disk, (repo, dest, 0))
            room[disk] = (repo, dest, before + needed)
        except errors as exc:
            raise ModelNotAvailableError(download_failure(name, repo, dest, exc)) from exc
    for repo, dest, needed in room.values():
        try:
            check_room(dest, needed)
        except NoRoomError as exc:
            raise ModelNotAvailableError(download_failure(name, repo, dest, exc)) from exc
    return plans


def _snapshot_files(snapshot: Path, files: tuple[str, ...]) -> dict[str, Path]:
    """The files `copy_snapshot` takes from Hugging Face cache folder `snapshot` (name in it -> the blob it links to):
    those matching `files` (patterns), and its .bin weights when they hold no safetensors."""
    from huggingface_hub.utils import filter_repo_objects

    names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    wanted = list(filter_repo_objects(names, allow_patterns=list(files)))
    if not any(n.endswith(".safetensors") for n in wanted):
        wanted += filter_repo_objects(names, allow_patterns=list(FALLBACK_WEIGHTS))
    return {file: (snapshot / file).resolve() for file in wanted}


def _copied(snapshot: Path, dest: Path, files: tuple[str, ...]) -> int:
    """Bytes more that `copy_snapshot` puts on the disk of folder `dest` (which exists) from `snapshot`: the files it
    cannot hard-link there (`_links`), less what the copies it replaces (a failed pull's) hold."""
    needed = 0
    for file, source in _snapshot_files(snapshot, files).items():
        out = dest / file
        if not _links(source, dest):
            needed += max(source.stat().st_size - (out.stat().st_size if out.is_file() else 0), 0)
    return needed


def _links(source: Path, dest: Path) -> bool:
    """True when `copy_snapshot` can hard-link file `source` into folder `dest`, tried: not across disks, nor across
    two mounts of one disk (Docker volumes: the same device, EXDEV), nor on a file system without hard links."""
    if source.stat().st_dev != dest.stat().st_dev:
        return False
    probe = dest / ".cache" / f"link-{os.getpid()}"  # `.cache`: what `copy_snapshot` deletes, were it left
    try:
        probe.parent.mkdir(exist_ok=True)
        probe.unlink(missing_ok=True)
        os.link(source, probe)
    except OSError:
        return False
    probe.unlink()
    with contextlib.suppress(OSError):
        probe.parent.rmdir()
    return True


def download_repo(
    name: str, repo: str, dest: Path, files: tuple[str, ...], progress: bool, todo: Todo | None = None
) -> None:
    """Download the `files` of hub repository `repo` into folder `dest` (safetensors, else .bin weights), for
    catalogue model `name` (`todo`: its weights, planned by `plan_model`). `ModelNotAvailableError` when the hub
    fails or the repository has no weights."""
    from huggingface_hub import snapshot_download

    errors: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError, *hub_errors())
    try:
        with progress_bars(progress):
            fetch_weights(repo, dest, files, todo)
            snapshot_download(repo, local_dir=dest, allow_patterns=list(files))
            if "*.safetensors" in files and not any(dest.glob("*.safetensors")):
                fetch_weights(repo, dest, FALLBACK_WEIGHTS)
                snapshot_download(repo, local_dir=dest, allow_patterns=list(FALLBACK_WEIGHTS))
    except errors as exc:
        raise ModelNotAvailableError(download_failure(name, repo, dest, exc)) from exc
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # the hub's download bookkeeping
    if not has_weights(dest):
        shutil.rmtree(dest, ignore_errors=True)  # nothing worth resuming
        raise ModelNotAvailableError(f"The hub repository {repo} holds no model weights automask can load.")


def fetch_weights(repo: str, dest: Path, files: tuple[str, ...], todo: Todo | None = None) -> None:
    """Download the weight files (safetensors, .bin) of hub repository `repo` among `files` (patterns) into folder
    `dest`, each resuming what an earlier, interrupted download left in `dest / RESUME` (huggingface_hub's
    `http_get` asks for the rest with an HTTP Range header). `snapshot_download`, run next, checks each against the
    hub's sha256 and fetches the other files: recent huggingface_hub releases delete a file cut off midway, so a
    retry of a 3.4 GB download would start again from zero. Xet-backed files too, though hf_xet is faster: the
    hub's Xet download also deletes a cut-off file, and hf_xet keeps no chunk cache by default. `todo`:
    `plan_weights`'s answer, its room checked (else both are done here)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    if todo is None:
        todo = plan_weights(repo, dest, files)
        if todo:
            check_room(dest, _needed(todo))
    for filename, meta, partial in todo:
        with partial.open("ab") as f:
            if meta.size is None or f.tell() < meta.size:  # all there: no request (a Range at its end is refused)
                http_get(  # the hub's URL, not `meta.location`: the CDN link it redirects to expires
                    hf_hub_url(repo, filename, revision=meta.commit_hash),
                    f,
                    resume_size=f.tell(),
                    headers=build_hf_headers(),
                    expected_size=meta.size,
                    displayed_filename=filename,
                )
        final = dest / filename
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)


def plan_weights(repo: str, dest: Path, files: tuple[str, ...]) -> Todo:
    """The weight files of hub repository `repo` among `files` (its .bin weights when it has no safetensors) that
    `fetch_weights` downloads into `dest`: files already in `dest`, and files the hub gives no sha256 for (not LFS:
    small), are left to `snapshot_download`.
    Kept partials of an older version of a file, or longer than it (damaged), are deleted."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import filter_repo_objects

    weights = [p for p in files if p.endswith((".safetensors", ".bin"))]
    listing = HfApi().list_repo_files(repo) if weights else []
    wanted = list(filter_repo_objects(listing, allow_patterns=weights))
    if "*.safetensors" in files and not any(n.endswith(".safetensors") for n in wanted):
        wanted += filter_repo_objects(listing, allow_patterns=list(FALLBACK_WEIGHTS))  # what `download_repo` takes
    todo = []
    for filename in wanted:
        final = dest / filename
        if final.is_file():
            continue
        meta = get_hf_file_metadata(hf_hub_url(repo, filename))
        if meta.etag is None or not re.fullmatch(r"[0-9a-f]{64}", meta.etag):
            continue
        partial = dest / RESUME / f"{filename}.{meta.etag}.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        for old in partial.parent.glob(f"{glob.escape(Path(filename).name)}.*.incomplete"):
            if old != partial:  # the hub's file has changed since: those bytes are of no use
                old.unlink()
        if meta.size is not None and partial.is_file() and partial.stat().st_size > meta.size:
            partial.unlink()  # longer than the file: damaged (the hub refuses a Range past its end), start again
        todo.append((filename, meta, partial))
    return todo


def _needed(todo: Todo) -> int:
    """Bytes still to download of `todo` (what its partial files hold is there already)."""
    return sum(max((m.size or 0) - (p.stat().st_size if p.is_file() else 0), 0) for _, m, p in todo)


class NoRoomError(OSError):
    """The disk a download (or a copy) goes to has less free space than it still needs."""

    def __init__(self, folder: Path, needed: int, free: int) -> None:
        super().__init__(errno.ENOSPC, f"{_size(needed)} needed, {_size(free)} free")
        self.folder, self.needed, self.free = folder, needed, free


def check_room(folder: Path, needed: int) -> None:
    """`NoRoomError` when the disk holding `folder` (which exists) has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise NoRoomError(folder, needed, free)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 100_000_000 else f"{n / 1e6:.1f} MB"


def _mount(path: Path) -> Path:
    """The mount point of the file system holding `path` (which exists)."""
    path = path.resolve()
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def download_failure(name: str, repo: str, dest: Path, exc: BaseException) -> str:
    """The error for catalogue model `name` whose repository `repo` could not be downloaded into `dest` (`exc`),
    naming the fix for the cause: a rejected token, a full disk, else the network."""
    what = f"downloading {repo} failed: {_short(exc)}"
    models = next(p for p in dest.parents if not p.name.endswith(".partial"))  # not the staging folder
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401 and not isinstance(exc, hub_error("RepositoryNotFoundError")):  # the hub's answer to a bad token
        return (
            f"Cannot download the model '{name}': {what}. The hub rejected the Hugging Face token (HF_TOKEN, or the "
            "one saved by `hf auth login`): it is invalid or expired. Create a read token at "
            f"https://huggingface.co/settings/tokens, then run: HF_TOKEN=<token> automask models pull {name} "
            "(a public model needs no token: unset HF_TOKEN)."
        )
    if isinstance(exc, NoRoomError):
        return (
            f"Cannot download the model '{name}': it needs {_size(exc.needed)} more on the disk holding "
            f"'{models}' (mounted at '{_mount(exc.folder)}'), which has {_size(exc.free)} free. Free some "
            f"space, or point AUTOMASK_DATA_DIR at a disk with room, then run again: automask models pull {name}."
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"Cannot download the model '{name}': {what}. The disk holding '{models}' is full: free some "
            f"space, or point AUTOMASK_DATA_DIR at a disk with room, then run again: automask models pull {name}."
        )
    return offline_message(name, what)


def offline() -> bool:
    """True when Hugging Face offline mode is on (environment, or as the hub library read it at import)."""
    return bool(_offline_switch())


def _offline_switch() -> str:
    """The environment variable that turns Hugging Face offline mode on (as the hub library read it at import:
    HF_HUB_OFFLINE); "" when it is off."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    hub = sys.modules.get("huggingface_hub.constants")
    return "HF_HUB_OFFLINE" if getattr(hub, "HF_HUB_OFFLINE", False) else ""


MODEL_CHOICE = "--model, AUTOMASK_MODEL or MaskGenerator(model=...)"
"""Where a model folder is named, for messages read on the command line and in the library alike."""


def offline_message(name: str, why: str) -> str:
    """The error for catalogue model `name` that cannot be downloaded, saying `why` and what to do instead (to unset
    the variable that turns offline mode on, only when one does)."""
    switch = _offline_switch()
    check = f"Unset {switch}" if switch else "Check the network connection"
    return (
        f"Cannot download the model '{name}': {why}. {check} and run again: automask models pull "
        f"{name}. Or copy a model folder saved with save_pretrained to this machine and point {MODEL_CHOICE} at it."
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def hub_error(name: str) -> type[BaseException]:
    """huggingface_hub's exception class `name`: in `huggingface_hub.errors` since its 0.25 release, only in
    `huggingface_hub.utils` before (pyproject allows 0.23)."""
    import importlib

    for module in ("huggingface_hub.errors", "huggingface_hub.utils"):
        with contextlib.suppress(ImportError):
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                return cls
    raise ImportError(f"huggingface_hub has no {name}: upgrade it (pip install -U huggingface_hub)")


def hub_errors() -> tuple[type[BaseException], ...]:
    """Exception classes the hub client raises for network and HTTP failures (whichever HTTP library it uses)."""
    errors = [hub_error(n) for n in ("HfHubHTTPError", "LocalEntryNotFoundError", "OfflineModeIsEnabled")]
    for module, attr in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        cls = getattr(sys.modules.get(module), attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show (or hide) the hub's tqdm download bars for the duration of the block."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()
