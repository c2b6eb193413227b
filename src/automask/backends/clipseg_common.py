"""What the two CLIPSeg runtimes share, with no heavy import: the ONNX artifact layout and runtime choice.

A CLIPSeg model folder (save_pretrained layout) may hold an `onnx/` sub-folder written by
`automask models export` (see `clipseg_export`):

    onnx/manifest.json          what follows, plus the shapes and the tokenizer's padding
    onnx/image.onnx             pixel_values 1×3×S×S float32 -> hidden_states K×1×T×D float32
                                (the vision layers the decoder reads, in `extract_layers` order)
    onnx/prompt.onnx            hidden_states, input_ids N×L int64, attention_mask N×L int64 -> logits N×S×S
    onnx/tokenizer.json         the checkpoint's tokenizer, for the `tokenizers` library
    onnx/*.int8.onnx            optional dynamically quantized copies (`--int8`)

`load` picks the runtime: `runtime=auto` uses ONNX Runtime when these artifacts are present (and the device is
the CPU), the torch/transformers backend otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from automask import staging
from automask.backends.base import Backend
from automask.errors import ModelNotAvailableError
from automask.settings import Settings

ONNX_DIR = "onnx"
MANIFEST = "manifest.json"
FORMAT = 1
"""Version of the artifact layout; bumped when an older export can no longer be read."""

GRAPHS = ("image", "prompt")


@dataclass(frozen=True)
class OnnxArtifacts:
    """The exported graphs of one checkpoint, as described by its `onnx/manifest.json`.

    image_size: (height, width) of the model input; extract_layers: the vision layers `image.onnx` returns.
    pad_id / max_length: how prompts are padded (to the longest, with `pad_id`) and truncated.
    """

    folder: Path
    image: Path
    prompt: Path
    tokenizer: Path
    int8: bool
    image_size: tuple[int, int]
    extract_layers: tuple[int, ...]
    pad_id: int
    pad_token: str
    max_length: int
    fingerprint: str


def onnx_dir(model_path: Path) -> Path:
    """Where the ONNX artifacts of the checkpoint in `model_path` live."""
    return Path(model_path) / ONNX_DIR


UNLOCKED_EXPORT_AGE_S = 3600.0
"""How long after its last write a `.onnx-tmp-xxxxxxxx` folder is taken for a killed export's leftover: an export by
an older automask staged there without a lock (so none tells it is running), and writes into it every minute or so."""


def tidy_exports(model_path: Path) -> None:
    """Remove what killed `automask models export`s (SIGKILL, a power cut) left in `model_path`: their staging
    folders and the export one moved aside (`staging.tidy`), and the `.onnx-tmp-xxxxxxxx` staging folders of
    exports made before these were locked, while no export of `model_path` holds its lock, once nothing was written
    in them for `UNLOCKED_EXPORT_AGE_S` (an older automask sharing the data folder may be exporting into one)."""
    folder = onnx_dir(model_path)
    staging.tidy(folder)
    stale = unlocked_exports(model_path, live=False)
    if stale and not staging.installing(folder):
        for tmp in stale:
            shutil.rmtree(tmp, ignore_errors=True)


def unlocked_exports(model_path: Path, *, live: bool) -> list[Path]:
    """The `.onnx-tmp-xxxxxxxx` staging folders in `model_path` of exports made before these were locked: when
    `live`, those written in the last `UNLOCKED_EXPORT_AGE_S` (an older automask may be exporting into one); else
    the others (a killed export's)."""
    found = Path(model_path).glob(f".{ONNX_DIR}-tmp-{'[0-9a-f]' * 8}")
    return [tmp for tmp in found if (time.time() - _last_write(tmp) <= UNLOCKED_EXPORT_AGE_S) == live]


def _last_write(folder: Path) -> float:
    """The newest modification time (seconds since the epoch) of `folder` and what it holds; now when unreadable."""
    try:
        return max(p.lstat().st_mtime for p in [folder, *folder.rglob("*")])
    except OSError:
        return time.time()


def fingerprint(model_path: Path) -> str:
    """A cheap identity of a checkpoint: its config.json and the names, sizes and modification times (ns) of its
    weight files (weights retrained in place keep their size and config).

    Stored in the manifest so that artifacts exported from other weights are not used by mistake; a copy that does
    not keep modification times (`cp -r` without `-p`) needs a new export.
    """
    h = hashlib.sha256()
    config = Path(model_path) / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    for f in sorted(Path(model_path).glob("*.safetensors")) + sorted(Path(model_path).glob("*.bin")):
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def read_manifest(model_path: Path) -> dict[str, Any] | None:
    """The parsed `onnx/manifest.json` of `model_path`, or None when there is none (or it is unreadable)."""
    path = onnx_dir(model_path) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def find_artifacts(model_path: Path, int8: bool = False) -> OnnxArtifacts | None:
    """The usable ONNX artifacts of the checkpoint in `model_path` (the int8 set when `int8`), else None.

    None when there is no export, when a file is missing, when the manifest is damaged (missing or malformed
    keys), or when the export was made from other weights: `automask models export` writes a fresh one. An export
    left moved aside by a killed `automask models export` is put back first (`staging.recover`).
    """
    folder = onnx_dir(model_path)
    if not os.path.lexists(folder):
        staging.recover(folder)  # an export killed inside its swap (SIGKILL) left it moved aside
    data = read_manifest(model_path)
    if data is None or data.get("fingerprint") != fingerprint(model_path):
        return None
    files = data.get("int8_files" if int8 else "files") or {}
    paths = {g: folder / str(files.get(g, "")) for g in GRAPHS}
    tok = data.get("tokenizer", {})
    tokenizer = folder / str(tok.get("file", ""))
    if not all(p.is_file() for p in [*paths.values(), tokenizer]):
        return None
    try:
        return _artifacts(data, folder, paths, tokenizer, int8)
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _artifacts(
    data: dict[str, Any], folder: Path, paths: dict[str, Path], tokenizer: Path, int8: bool
) -> OnnxArtifacts:
    """`OnnxArtifacts` from a manifest's fields; raises KeyError/TypeError/ValueError when they are malformed."""
    tok = data["tokenizer"]
    return OnnxArtifacts(
        folder=folder,
        image=paths["image"],
        prompt=paths["prompt"],
        tokenizer=tokenizer,
        int8=int8,
        image_size=(int(data["image_size"][0]), int(data["image_size"][1])),
        extract_layers=tuple(int(i) for i in data["extract_layers"]),
        pad_id=int(tok["pad_id"]),
        pad_token=str(tok["pad_token"]),
        max_length=int(tok["max_length"]),
        fingerprint=str(data["fingerprint"]),
    )


def has_onnx(model_path: Path, int8: bool = False) -> bool:
    """True when `model_path` holds usable ONNX artifacts (the int8 set when `int8`)."""
    return find_artifacts(model_path, int8) is not None


def export_hint(model_path: Path, int8: bool) -> str:
    """The command that writes the missing artifacts."""
    return f"automask models export {model_path}" + (" --int8" if int8 else "")


def choose_runtime(model_path: Path, settings: Settings) -> Literal["onnx", "torch"]:
    """Which CLIPSeg runtime serves `model_path` under `settings.runtime` (auto | onnx | torch).

    auto: ONNX Runtime when the device is the CPU, the artifacts are present and onnxruntime is installed;
    torch otherwise (GPUs always). onnx: ONNX Runtime. On the CPU, a missing export that `runtime=onnx` or
    `int8` asks for is a `ModelNotAvailableError` naming the export command.
    """
    if settings.runtime == "torch" or (settings.runtime == "auto" and settings.device != "cpu"):
        return "torch"
    found = has_onnx(model_path, settings.int8)
    if not found and (settings.runtime == "onnx" or settings.int8):
        setting = "AUTOMASK_RUNTIME is 'onnx'" if settings.runtime == "onnx" else "AUTOMASK_INT8 is set"
        raise ModelNotAvailableError(
            f"{setting} but '{model_path}' has no usable{' int8' if settings.int8 else ''} ONNX export. "
            f"Create it with: {export_hint(model_path, settings.int8)} "
            '(needs the export extra: pip install "automask[export]"), or use AUTOMASK_RUNTIME=torch.'
        )
    if settings.runtime == "onnx":
        return "onnx"
    return "onnx" if found and importlib.util.find_spec("onnxruntime") is not None else "torch"


def load(path: Path, settings: Settings) -> Backend:
    """Load the CLIPSeg checkpoint in `path` with the runtime `choose_runtime` picks."""
    if choose_runtime(path, settings) == "onnx":
        from automask.backends import clipseg_onnx

        return clipseg_onnx.load(path, settings)
    from automask.backends import clipseg

    return clipseg.load(path, settings)
