"""The references the SAM 3 and EdgeTAM tests compare against.

1. `reference_pixel_values`: the formulas of transformers' SAM 2 / SAM 3 image processors, transcribed from their
   code (transformers 5.24 `image_processing_backends.py` TorchvisionBackend: `process_image` HWC -> CHW
   contiguous, `_preprocess` -> `resize` -> torchvision 0.29 `_geometry.py::resize_image` lines 285-360, then
   `rescale_and_normalize` -> `_fuse_mean_std_and_rescale_factor` -> `_misc.py::normalize_image` lines 37-67).
2. `run_with_reference_libs`: the processors and timm themselves. torchvision's and timm's PyPI wheels cannot be
   installed beside the CPU torch wheel (their import fails on torchvision's compiled operators), but their Python
   code runs when the two modules that register those operators are stubbed. Set REFERENCE_LIBS to a folder
   holding both packages unpacked, e.g.:

       pip download torchvision timm --no-deps -d /tmp/dl && mkdir -p /tmp/reflib && \\
       for w in /tmp/dl/*.whl; do python -m zipfile -e "$w" /tmp/reflib; done
       REFERENCE_LIBS=/tmp/reflib python -m pytest tests/test_sam3.py tests/test_sam2_heads.py

   Each reference runs in its own subprocess, so the stubs never reach the test process. Without REFERENCE_LIBS
   those tests are skipped (the formula tests above still run).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REFERENCE_LIBS = os.environ.get("REFERENCE_LIBS", "")

_HAVE_LIBS = bool(REFERENCE_LIBS) and all((Path(REFERENCE_LIBS) / m).is_dir() for m in ("torchvision", "timm"))
needs_reference_libs = pytest.mark.skipif(
    not _HAVE_LIBS,
    reason="REFERENCE_LIBS (unpacked torchvision and timm wheels) is not set: see tests/sam_reference.py",
)

STUBS = """
import sys, types
for _m in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules[_m] = types.ModuleType(_m)
"""


def reference_pixel_values(
    image: np.ndarray, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...], native: bool
) -> torch.Tensor:
    """The processors' pixel_values (1×3×h×w float32) for an H×W×3 uint8 image, step by step as their code runs.

    native: torchvision's `_do_native_uint8_resize_on_cpu` (True on AVX2/AVX512/ARM CPUs)."""
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()  # process_image
    stacked = torch.stack([chw])  # group_images_by_shape
    # resize_image: 1×C×H×W, contiguous (not channels_last), uint8 kept only for the native path
    need_cast = not native
    x = stacked.to(torch.float32) if need_cast else stacked
    x = F.interpolate(x, size=[size[0], size[1]], mode="bilinear", align_corners=False, antialias=True)
    if need_cast:
        x = x.round_().to(torch.uint8)
    # _fuse_mean_std_and_rescale_factor(rescale_factor=1/255), normalize_image(inplace=True after .to(float32))
    m = torch.tensor(list(mean)) * (1.0 / (1 / 255))
    s = torch.tensor(list(std)) * (1.0 / (1 / 255))
    y = x.to(torch.float32)
    return y.sub_(m.view(-1, 1, 1)).div_(s.view(-1, 1, 1))


def native_here() -> bool:
    """torchvision's choice on this machine (the same test as `_do_native_uint8_resize_on_cpu`)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def run_with_reference_libs(code: str, tmp_path: Path) -> None:
    """Run `code` in a fresh Python with REFERENCE_LIBS first on sys.path and torchvision's operator
    registrations stubbed; fail the test with its output if it fails."""
    script = tmp_path / "reference.py"
    script.write_text(STUBS + textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REFERENCE_LIBS, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def transformers_functions(module: str, names: list[str]) -> dict[str, Any]:
    """Functions (or `Class.method`s) of transformers module `module` (e.g. 'models.sam3.image_processing_sam3'),
    compiled from its installed source unchanged, without importing the module (its torchvision import fails here).
    Each runs in a namespace holding torch, F, np and the other functions asked for; methods take `self` as None."""
    import ast

    import transformers

    path = Path(transformers.__file__).parent.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text())
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = node
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and f"{node.name}.{item.name}" in names:
                    found[f"{node.name}.{item.name}"] = item
    missing = set(names) - set(found)
    assert not missing, f"{missing} not found in {path}"
    namespace: dict[str, Any] = {"torch": torch, "F": F, "np": np}
    out = {}
    for name, node in found.items():
        code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")  # type: ignore[list-item]
        exec(code, namespace)
        out[name] = namespace[node.name]  # type: ignore[attr-defined]
        namespace[node.name] = out[name]  # type: ignore[attr-defined]
    return out
