"""Image pre- and post-processing of transformers' SAM 2-family image processors, in torch without torchvision.

transformers' `Sam2ImageProcessor` (EdgeTAM) and `Sam3ImageProcessor` (SAM 3) run on its torchvision backend, and the
torchvision wheels on PyPI do not load beside the CPU torch wheel. These functions repeat their steps exactly (the
tests compare them bit for bit on real photos, against the formulas and, where torchvision's Python code can be
loaded, against the processors themselves):

- `pixel_values`: transformers 5.24 `image_processing_backends.TorchvisionBackend.process_image` (HWC uint8 ->
  contiguous CHW uint8), `.resize` -> torchvision 0.29 `transforms/v2/functional/_geometry.py::resize_image`
  (bilinear, antialias, align_corners=False; uint8 resized natively on AVX2/AVX512/ARM CPUs, else in float32 then
  rounded), `.rescale_and_normalize` with `_fuse_mean_std_and_rescale_factor` (mean and std multiplied by
  1/rescale_factor in float32) -> `transforms/v2/functional/_misc.py::normalize_image` (x.sub_(mean).div_(std)).
  The image is stretched to the model's square size, no padding (`Sam2ImageProcessor.size` 1024×1024,
  `Sam3ImageProcessor.size` 1008×1008).
- `upscale`: `Sam2ImageProcessor.post_process_masks` / `Sam3ImageProcessor.post_process_instance_segmentation`:
  one bilinear resize (align_corners=False) of the low-resolution maps to the original (H, W).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_STANDARD = (0.5, 0.5, 0.5)
"""transformers' IMAGENET_STANDARD_MEAN and _STD (SAM 3)."""
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
"""transformers' IMAGENET_DEFAULT_MEAN / _STD (SAM 2, EdgeTAM)."""


@dataclass(frozen=True)
class ImageTransform:
    """What the image processor does to an image: stretch to `size` (height, width), then (x·rescale − mean) / std
    per channel."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    source: str = field(default="defaults", compare=False)
    """Where the numbers came from: a config file of the checkpoint, or 'defaults'."""

    @classmethod
    def from_folder(cls, folder: Path, default: ImageTransform) -> ImageTransform:
        """The checkpoint's own numbers (`preprocessor_config.json`, or the `image_processor` entry of
        `processor_config.json`), each missing one taken from `default`."""
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            try:
                data: Any = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                continue
            if key is not None:
                data = data.get(key) if isinstance(data, dict) else None
            if isinstance(data, dict):
                return cls._from_dict(data, default, name)
        return default

    @classmethod
    def _from_dict(cls, data: dict[str, Any], default: ImageTransform, source: str) -> ImageTransform:
        size = data.get("size") or {}
        h = int(size.get("height", default.size[0])) if isinstance(size, dict) else default.size[0]
        w = int(size.get("width", default.size[1])) if isinstance(size, dict) else default.size[1]
        mean = tuple(float(v) for v in data.get("image_mean") or default.mean)
        std = tuple(float(v) for v in data.get("image_std") or default.std)
        rescale = float(data.get("rescale_factor") or default.rescale_factor)
        return cls((h, w), mean, std, rescale, source=source)


def native_uint8_resize() -> bool:
    """torchvision's `_do_native_uint8_resize_on_cpu` for bilinear: torch resizes uint8 directly on AVX2/AVX512 and
    ARM CPUs; elsewhere the image is resized in float32 and rounded back to uint8."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_uint8(chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A C×H×W (or N×C×H×W) uint8 CPU tensor resized to `size` (height, width) as torchvision's `resize_image`
    does with bilinear interpolation and antialias=True: the same uint8 values."""
    if tuple(chw.shape[-2:]) == tuple(size):
        return chw
    shape = chw.shape
    x = chw.reshape(-1, *shape[-3:])
    native = native_uint8_resize()
    y = F.interpolate(x if native else x.float(), size=list(size), mode="bilinear", align_corners=False, antialias=True)
    if not native:
        y = y.round_().to(torch.uint8)
    return y.reshape(*shape[:-2], *size)


def pixel_values(image: np.ndarray, transform: ImageTransform) -> torch.Tensor:
    """The processor's `pixel_values` for an H×W×3 uint8 RGB image: 1×3×h×w float32 on the CPU, (h, w) =
    `transform.size`."""
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    resized = resize_uint8(chw[None], transform.size)
    mean = torch.tensor(transform.mean) * (1.0 / transform.rescale_factor)
    std = torch.tensor(transform.std) * (1.0 / transform.rescale_factor)
    return resized.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def upscale(low_res: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """N×h×w maps (logits or probabilities) -> N×H×W at the original image size: bilinear, align_corners=False."""
    if low_res.shape[0] == 0:
        return low_res.new_zeros((0, *image_size))
    return F.interpolate(low_res[None], size=image_size, mode="bilinear", align_corners=False)[0]
