"""Image input: every accepted source -> H×W×3 uint8 RGB, EXIF orientation applied.

Sources: a path, raw bytes (or a binary file object), a PIL image, a numpy array, a bare base64 string, a
`data:image/...;base64,` URI, or an http(s) URL (fetched through the guard in `automask.imageio.fetch`, which
is imported only when a URL is given).
"""

from automask.imageio.decode import decode_image
from automask.imageio.load import ImageSource, load_image

__all__ = ["ImageSource", "decode_image", "load_image"]
