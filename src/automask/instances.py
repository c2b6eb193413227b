"""One mask per detected instance: the library side of `automask mask --instances DIR`.

`MaskResult.detections[i]` and `MaskResult.instance_masks[i]` describe instance i (thresholded, before grow and
invert). `instance_masks` grows each one like the main mask, for inpainting one object at a time;
`save_instances` writes them as PNGs named after their index and label.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from automask import postprocess as pp
from automask.result import Detection, MaskResult, encode_png


def instance_masks(result: MaskResult, grow_mask: int = 0) -> list[tuple[Detection, np.ndarray]]:
    """(detection, H×W uint8 mask, 255 = selected) per instance, best first as the detections are; each mask
    grown by `grow_mask` pixels (0-100, as the option), never inverted."""
    return [
        (det, pp.to_uint8(pp.grow(mask > 0, grow_mask)))
        for det, mask in zip(result.detections, result.instance_masks, strict=True)
    ]


def instance_filename(index: int, detection: Detection) -> str:
    """'00-sofa.png', '01-floor-lamp.png': the index, then the label as lower-case ASCII words."""
    return f"{index:02d}-{instance_slug(detection.label)}.png"


def instance_slug(label: str) -> str:
    """The label part of an instance mask's name: 'floor-lamp' for 'Floor lamp' (at most 60 characters)."""
    return (re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "instance")[:60]


def may_take(name: str, labels: list[str]) -> bool:
    """Whether an instance mask of one of `labels` may be named `name` ('02-cat.png' for 'cat': the third instance,
    if the model finds three), whatever the image."""
    index, _, rest = name.partition("-")
    slugs = {instance_slug(label) for label in labels}
    return is_instance_name(name) and f"{int(index):02d}" == index and rest.removesuffix(".png") in slugs


INSTANCE_NAME = re.compile(r"[0-9]{2,}-[a-z0-9]+(?:-[a-z0-9]+)*\.png")
"""The names `instance_filename` gives (and only names of that shape)."""


def is_instance_name(name: str) -> bool:
    """Whether `name` has the shape of an instance mask's file name ('00-sofa.png')."""
    return INSTANCE_NAME.fullmatch(name) is not None


INSTANCE_TAG = ("automask", "instance mask")
"""The PNG text chunk (keyword, value) that marks a file `save_instances` wrote."""


def stale_instances(folder: Path, keep: list[Path]) -> list[Path]:
    """The instance masks of `folder` that are not in `keep`: those an earlier run wrote there and this one did
    not (it found fewer instances, or others), sorted. Only files named like one ('NN-label.png') and carrying
    `INSTANCE_TAG` count: a photo called '01-beach.png' is never taken for one, nor is a mask written before the
    tag existed."""
    kept = {path.name for path in keep}
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(folder / n for n in names if is_instance_name(n) and n not in kept and is_instance_mask(folder / n))


def is_instance_mask(path: Path) -> bool:
    """Whether `path` is a PNG file that `save_instances` wrote (its `INSTANCE_TAG`; only the header is read)."""
    from PIL import Image

    if not path.is_file():  # a folder, or a FIFO that opening would wait on
        return False
    try:
        with Image.open(path, formats=["PNG"]) as img:  # the chunks before the pixels: nothing is decoded
            return bool(img.info.get(INSTANCE_TAG[0]) == INSTANCE_TAG[1])
    except (OSError, ValueError, Image.DecompressionBombError):  # not a PNG (UnidentifiedImageError), unreadable
        return False


def instance_paths(result: MaskResult, folder: Path) -> list[Path]:
    """The file of each instance in `folder`, in order, as `save_instances` names them."""
    return [folder / instance_filename(i, det) for i, det in enumerate(result.detections)]


def save_instances(
    result: MaskResult,
    folder: Path,
    grow_mask: int = 0,
    write: Callable[[Path, bytes], None] | None = None,
) -> list[Path]:
    """Write one mask PNG per instance into `folder` (created if needed); return the paths, in order.

    `write(path, data)` writes one file (default: `Path.write_bytes`; the CLI passes its atomic writer).
    """
    if write is None:
        folder.mkdir(parents=True, exist_ok=True)
    paths = instance_paths(result, folder)
    for path, (_, mask) in zip(paths, instance_masks(result, grow_mask), strict=True):
        (write or Path.write_bytes)(path, encode_png(mask, text=dict([INSTANCE_TAG])))
    return paths
