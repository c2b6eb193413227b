"""Library review findings that fit no single backend's test module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from automask.errors import ModelNotAvailableError
from automask.feature_cache import nbytes
from automask.pipeline import MaskGenerator
from automask.settings import Settings
from tiny_models import make_tiny_grounded_sam, make_tiny_sam3


def array_bytes(value: Any) -> int:
    """Bytes of every numpy array and torch tensor in `value`, found at any depth (an independent reference)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, (list, tuple)):
        return sum(array_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(array_bytes(v) for v in value.values())
    return sum(array_bytes(v) for v in vars(value).values()) if hasattr(value, "__dict__") else 0


@pytest.mark.parametrize("make", [make_tiny_sam3, make_tiny_grounded_sam], ids=["sam3", "grounded-sam"])
def test_the_feature_cache_counts_every_array_of_the_features(make: Any, tmp_path: Path) -> None:
    """Before: `nbytes` looked two levels deep, so it missed SAM 3's FPN maps (a tuple inside its vision output: 2%
    of its features were counted) and GroundingDINO's backbone maps (lists of tuples): the feature cache's byte
    budget did not bound them (a real SAM 3 image's features are ~250 MB, on the GPU when it runs there)."""
    gen = MaskGenerator(str(make(tmp_path / "model")), Settings(data_dir=tmp_path / "data"))
    features = gen.backend.encode(np.zeros((96, 128, 3), np.uint8))
    assert nbytes(features) == array_bytes(features) > 0


@pytest.mark.parametrize(
    ("make", "part", "what", "pull"),
    [
        (make_tiny_sam3, "", "SAM 3", "sam3"),
        (make_tiny_grounded_sam, "IDEA-Research--grounding-dino-tiny", "GroundingDINO", "grounded-sam"),
    ],
    ids=["sam3", "grounded-sam"],
)
def test_a_folder_without_its_tokenizer_is_a_clear_error(
    make: Any, part: str, what: str, pull: str, tmp_path: Path
) -> None:
    """Before: without tokenizer.json and tokenizer_config.json, transformers built a tokenizer knowing only its
    special tokens, so every prompt read as the same unknown words and got the same masks, silently."""
    folder = make(tmp_path / "model") / part
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelNotAvailableError) as err:
        MaskGenerator(str(tmp_path / "model"), Settings(data_dir=tmp_path / "data"))
    assert err.value.message.startswith(
        f"The {what} model in '{folder}' has no tokenizer (tokenizer.json or its vocabulary files are missing): it "
        "would read every prompt as the same unknown words. It holds a config.json naming model_type"
    )
    assert err.value.message.endswith(f"automask models pull {pull}, then --model {pull}.")
