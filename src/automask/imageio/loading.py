"""A lock per PIL image while it loads (`loading`): Pillow's lazy `load` is not thread-safe."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

_GUARD = threading.Lock()
_LOCKS: dict[int, tuple[threading.Lock, int]] = {}
"""By `id` of an image being loaded: its lock and how many threads hold or wait for it (the entry goes with the
last: the caller holds the image meanwhile, so no other object takes its id)."""


@contextmanager
def loading(img: Image.Image) -> Iterator[None]:
    """Held while `img` loads: threads loading the same image take turns, different images load at once."""
    key = id(img)
    with _GUARD:
        lock, users = _LOCKS.get(key, (threading.Lock(), 0))
        _LOCKS[key] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _GUARD:
            lock, users = _LOCKS.pop(key)
            if users > 1:
                _LOCKS[key] = (lock, users - 1)
