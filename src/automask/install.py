"""Putting model files on disk: downloads from the Hugging Face hub, and the staging folder and atomic swap that
every installer uses (hub models in `models.pull`, the embedded model in `embedded.install`, ONNX exports), so
that nothing half-written is ever left where a model is looked for.

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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from automask.errors import ModelNotAvailableError

FALLBACK_WEIGHTS = ("pytorch_model*.bin",)
"""Downloaded only when a repository has no safetensors weights."""
HUB_BOOKKEEPING = "huggingface"
"""The subfolder of a download folder's `.cache` where huggingface_hub keeps its locks and metadata."""
RESUME = Path(".cache") / "automask"
"""Where, in a download folder, `fetch_weights` keeps the weight files it is still downloading."""


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A new empty folder beside `folder` (the same file system, so `replace_dir` from it is a rename), removed
    with whatever is left in it after the block. `ModelNotAvailableError` when it cannot be created.

    While the block runs, the folder's `.lock` file beside it is locked; staging folders of `folder` whose lock
    nobody holds (their process was killed: SIGKILL, a power cut) are removed first."""
    tmp = folder.parent / f".{folder.name}-{uuid.uuid4().hex[:8]}.partial"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder)
        held = _lock(_lock_file(tmp), wait=True)
        tmp.mkdir()  # not mkdtemp: its 0700 would stay on the installed folder; this follows the umask
    except OSError as exc:
        raise ModelNotAvailableError(
            f"Cannot write to the models folder '{folder.parent}' ({exc.strerror}). "
            "Point AUTOMASK_DATA_DIR at a writable folder and run again."
        ) from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(_lock_file(tmp), held)


@contextlib.contextmanager
def resumable_staging(folder: Path, waiting: Callable[[], None] | None = None) -> Iterator[Path]:
    """The staging folder of `folder` that a failed or interrupted block keeps: `.NAME.partial` beside it, always
    the same, so the next install of `folder` resumes the files this one had downloaded. Removed when the block
    ends normally (after `replace_dir` moved it into place, or unused), or when it holds no file.
    `ModelNotAvailableError` when it cannot be created.

    For the block, the folder's `.lock` file is locked, after waiting for another installer of `folder` to end
    (`waiting` is called first, when there is one): one download into it at a time; a killed installer's lock is
    released by the system, and its folder reused."""
    tmp = folder.parent / f".{folder.name}.partial"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder)
        held = _hold(_lock_file(tmp), waiting)
        tmp.mkdir(exist_ok=True)
    except OSError as exc:
        raise ModelNotAvailableError(
            f"Cannot write to the models folder '{folder.parent}' ({exc.strerror}). "
            "Point AUTOMASK_DATA_DIR at a writable folder and run again."
        ) from exc
    keep = True
    try:
        yield tmp
        keep = False
    finally:
        if not keep or not _downloaded(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        _unlock(_lock_file(tmp), held)


def partial_note(folder: Path) -> str:
    """A sentence saying what `resumable_staging(folder)` kept after a failure ("" when nothing), and that pulling
    the catalogue model `folder.name` again resumes it."""
    tmp = folder.parent / f".{folder.name}.partial"
    size = _downloaded(tmp)
    if not size:
        return ""
    return (
        f"The {size / 1e6:.1f} MB downloaded so far are kept in '{tmp}': automask models pull {folder.name} resumes "
        "from there (delete that folder to free the space)."
    )


def tidy(folder: Path) -> None:
    """Remove what killed installers of `folder` (SIGKILL, a power cut) left and no pull resumes: their staging
    folders, and `resumable_staging`'s lock file, with its folder when that holds no downloaded byte. Nothing
    while an installer is running, nor when the models folder cannot be written."""
    tmp = folder.parent / f".{folder.name}.partial"
    with contextlib.suppress(OSError):
        _remove_abandoned(folder)
        if not _lock_file(tmp).exists():
            return
        fd = _lock(_lock_file(tmp), wait=False)
        if fd is None or fd < 0:  # a pull is running, or no locks to tell (Windows)
            return
        if not _downloaded(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        _unlock(_lock_file(tmp), fd)


def _downloaded(tmp: Path) -> int:
    """Bytes of model files in staging folder `tmp` (a part of one too), not counting the hub's bookkeeping."""
    files = (p for p in tmp.rglob("*") if p.is_file() and HUB_BOOKKEEPING not in p.relative_to(tmp).parts)
    with contextlib.suppress(OSError):
        return sum(p.stat().st_size for p in files)
    return 0


def _hold(path: Path, waiting: Callable[[], None] | None) -> int | None:
    """`_lock(path)`, waiting for it (calling `waiting` first) when another process holds it; again until the
    locked file is still the one at `path` (the previous holder deletes it as it lets go: a lock on that deleted
    file would hold nothing)."""
    wait = False
    while True:
        fd = _lock(path, wait=wait)
        if fd is None:
            if waiting is not None and not wait:
                waiting()
            wait = True
            continue
        if fd < 0:
            return fd
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_file(tmp: Path) -> Path:
    return tmp.with_name(f"{tmp.name}.lock")


def _lock(path: Path, *, wait: bool) -> int | None:
    """An open descriptor of `path` (created if need be) holding its exclusive lock; None when another process
    holds it (and not `wait`). Where there is no `fcntl` (Windows) nothing is locked: -1."""
    try:
        import fcntl
    except ImportError:
        return -1
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(path: Path, fd: int | None) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    if fd is not None and fd >= 0:
        os.close(fd)


def _remove_abandoned(folder: Path) -> None:
    """Remove the staging folders of `folder` that no live process holds (see `staging`)."""
    for old in folder.parent.glob(f".{glob.escape(folder.name)}-*.partial"):
        fd = _lock(_lock_file(old), wait=False)
        if fd is None or fd < 0:  # alive, or no locks to tell (Windows): keep it
            continue
        shutil.rmtree(old, ignore_errors=True)
        _unlock(_lock_file(old), fd)


def replace_dir(new: Path, dest: Path) -> None:
    """Rename the complete folder `new` to `dest` (the same file system). Whatever `dest` held (a folder or a
    symlink) is moved aside first and deleted only once `new` is in place; if that rename fails it is put back.
    Another process installing to `dest` at the same moment is no error: the last rename wins."""
    for _ in range(_RACE_RETRIES):
        old = _move_aside(dest)
        try:
            os.replace(new, dest)
        except OSError as exc:
            if old is not None:
                os.replace(old, dest)
            elif exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                continue  # another installer's folder landed at `dest` since it was moved aside: again
            raise
        break
    else:
        raise OSError(errno.EEXIST, f"'{dest}' kept being replaced by another installer")
    if old is None:
        return
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


_RACE_RETRIES = 10


def _move_aside(dest: Path) -> Path | None:
    """Rename `dest` to a unique hidden name beside it and return that; None when there is no `dest` (any more)."""
    old = dest.with_name(f".{dest.name}-{uuid.uuid4().hex[:8]}.old")
    try:
        os.replace(dest, old)
    except FileNotFoundError:
        return None
    return old


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
    files where the file system allows (no second copy on disk), else copies. `ModelNotAvailableError` on failure."""
    from huggingface_hub.utils import filter_repo_objects

    names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    wanted = list(filter_repo_objects(names, allow_patterns=list(files)))
    if not any(n.endswith(".safetensors") for n in wanted):
        wanted += filter_repo_objects(names, allow_patterns=list(FALLBACK_WEIGHTS))
    sources = {file: (snapshot / file).resolve() for file in wanted}
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if any(p.stat().st_dev != dest.stat().st_dev for p in sources.values()):  # copies, not hard links
            check_room(dest, sum(p.stat().st_size for p in sources.values()))
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


def download_repo(name: str, repo: str, dest: Path, files: tuple[str, ...], progress: bool) -> None:
    """Download the `files` of hub repository `repo` into folder `dest` (safetensors, else .bin weights), for
    catalogue model `name`. `ModelNotAvailableError` when the hub fails or the repository has no weights."""
    from huggingface_hub import snapshot_download

    errors: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError, *hub_errors())
    try:
        with progress_bars(progress):
            fetch_weights(repo, dest, files)
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


def fetch_weights(repo: str, dest: Path, files: tuple[str, ...]) -> None:
    """Download the weight files (safetensors, .bin) of hub repository `repo` among `files` (patterns) into folder
    `dest`, each resuming what an earlier, interrupted download left in `dest / RESUME` (huggingface_hub's
    `http_get` asks for the rest with an HTTP Range header). `snapshot_download`, run next, checks each against the
    hub's sha256 and fetches the other files: recent huggingface_hub releases delete a file cut off midway, so a
    retry of a 3.4 GB download would start again from zero. Files already in `dest`, and files the hub gives no
    sha256 for (not LFS: small), are left to `snapshot_download`."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers, filter_repo_objects

    weights = [p for p in files if p.endswith((".safetensors", ".bin"))]
    todo = []
    for filename in filter_repo_objects(HfApi().list_repo_files(repo), allow_patterns=weights) if weights else ():
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
    if todo:
        needed = sum(max((m.size or 0) - (p.stat().st_size if p.is_file() else 0), 0) for _, m, p in todo)
        check_room(todo[0][2].parent, needed)
    for filename, meta, partial in todo:
        with partial.open("ab") as f:
            if meta.size is None or f.tell() < meta.size:  # all there: no request (a Range at its end is refused)
                http_get(
                    meta.location,
                    f,
                    resume_size=f.tell(),
                    headers=build_hf_headers(),
                    expected_size=meta.size,
                    displayed_filename=filename,
                )
        final = dest / filename
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)


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
            f"'{dest.parent}' (mounted at '{_mount(exc.folder)}'), which has {_size(exc.free)} free. Free some "
            f"space, or point AUTOMASK_DATA_DIR at a disk with room, then run again: automask models pull {name}."
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"Cannot download the model '{name}': {what}. The disk holding '{dest.parent}' is full: free some "
            f"space, or point AUTOMASK_DATA_DIR at a disk with room, then run again: automask models pull {name}."
        )
    return offline_message(name, what)


def offline() -> bool:
    """True when Hugging Face offline mode is on (environment, or as the hub library read it at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    hub = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(hub, "HF_HUB_OFFLINE", False))


def offline_message(name: str, why: str) -> str:
    """The error for catalogue model `name` that cannot be downloaded, saying `why` and what to do instead."""
    return (
        f"Cannot download the model '{name}': {why}. Check the network connection (and unset HF_HUB_OFFLINE) "
        f"and run again: automask models pull {name}. Or copy a model folder saved with save_pretrained to this "
        "machine and point --model / AUTOMASK_MODEL at it."
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
