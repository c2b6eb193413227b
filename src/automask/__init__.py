"""automask: image + text prompt -> a precise mask for inpainting.

>>> from automask import MaskGenerator
>>> gen = MaskGenerator("clipseg")
>>> result = gen.generate("photo.jpg", "sofa, lamp", grow_mask=5)
>>> result.mask.shape, result.mask.dtype   # (H, W) uint8, 255 = selected
"""

from automask.errors import AutomaskError
from automask.options import MaskOptions
from automask.pipeline import MaskGenerator, generate
from automask.result import Detection, MaskResult
from automask.settings import Settings

__all__ = ["AutomaskError", "Detection", "MaskGenerator", "MaskOptions", "MaskResult", "Settings", "generate"]
__version__ = "0.1.0"
