"""What the torch/transformers backends (clipseg, grounded-sam, SAM for refine) share when loading a checkpoint:
torch's thread count and device, the tokenizer, and one clear error for a checkpoint transformers cannot read.

torch is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from automask.errors import ModelNotAvailableError
from automask.settings import Settings

LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError)
"""What `from_pretrained` raises for a missing, partial or damaged checkpoint folder, or one whose config.json names
another architecture than its fields describe (AttributeError/TypeError); and, see `load_errors`, safetensors'
`SafetensorError` for a truncated weights file."""


def load_errors() -> tuple[type[Exception], ...]:
    """`LOAD_ERRORS` plus safetensors' `SafetensorError` (a half-written .safetensors file) when it is installed."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return LOAD_ERRORS
    return (*LOAD_ERRORS, SafetensorError)


def prepare_torch(settings: Settings) -> str:
    """Apply `settings.threads` to torch (when set) and return `settings.device`, validated by `check_device`."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    return check_device(settings.device, settings.name_of("device"))


def check_device(device: str, name: str = "AUTOMASK_DEVICE") -> str:
    """Validate a torch device string ('cpu', 'cuda', 'cuda:1') against what this machine has; return it. Errors
    name the setting as `name` (how it was given: `Settings.name_of`)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotAvailableError(
            f"{name} is '{device}' but torch sees no CUDA GPU. Use {name}=cpu, or install a CUDA build of torch."
        )
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ModelNotAvailableError(f"Invalid {name} '{device}': {exc}") from exc
    available = getattr(getattr(torch, kind, None), "is_available", None)  # torch.mps, torch.xpu...
    if kind != "cpu" and callable(available) and not available():
        raise ModelNotAvailableError(
            f"{name} is '{device}' but torch sees no {kind} device. Use {name}=cpu, or install a build of torch "
            f"with {kind} support."
        )
    return device


@contextlib.contextmanager
def checkpoint_errors(what: str, folder: Path, pull: str) -> Iterator[None]:
    """Turn `load_errors()` raised in the block into a `ModelNotAvailableError` naming the `what` model in
    `folder`, the first line of the cause, and `automask models pull <pull>` as the fix."""
    try:
        yield
    except load_errors() as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotAvailableError(
            f"The {what} model in '{folder}' could not be loaded ({why}). {repair(what, folder, pull)}"
        ) from exc


def repair(what: str, folder: Path, pull: str) -> str:
    """How to fix the `what` checkpoint in `folder` that cannot be used: `automask models pull <pull> --force` for
    a pulled or Hugging Face cache folder; for a folder of the user's (which no pull rewrites), what its config.json
    says it holds, against the `what` checkpoint that was expected."""
    from automask.models import name_of

    if name_of(folder) != str(folder):
        return f"Re-download it with: automask models pull {pull} --force"
    try:
        config = json.loads((folder / "config.json").read_text())
        holds = (
            f"a config.json naming model_type {config.get('model_type')!r}, architectures {config.get('architectures')}"
        )
    except (OSError, ValueError, AttributeError):
        holds = "no readable config.json"
    return (
        f"It holds {holds}, where a complete {what} checkpoint was expected: save one there "
        f"with save_pretrained (weights, tokenizer and processor files), or use the catalogue model instead: "
        f"automask models pull {pull}, then --model {pull}."
    )


def load_tokenizer(folder: Path, what: str, pull: str, *, processor: bool = False) -> Any:
    """The tokenizer saved in `folder` (`processor`: the whole `AutoProcessor`, whose tokenizer is checked), loaded
    with transformers' Auto class. `ModelNotAvailableError` naming the `what` model and `automask models pull
    <pull>` when it knows no word, only its special tokens: what transformers builds, without complaint, for a
    checkpoint folder missing its tokenizer files. Load errors are raised as they are (see `checkpoint_errors`)."""
    import transformers  # (lazy: only the Auto class named below is imported)

    auto = transformers.AutoProcessor if processor else transformers.AutoTokenizer
    loaded = auto.from_pretrained(str(folder))
    tokenizer = loaded.tokenizer if processor else loaded
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ModelNotAvailableError(
            f"The {what} model in '{folder}' has no tokenizer (tokenizer.json or its vocabulary files are missing): "
            f"it would read every prompt as the same unknown words. {repair(what, folder, pull)}"
        )
    return loaded
