"""The pipeline's cache of encoded image features: a small thread-safe LRU keyed by (backend, image content),
bounded in entries and in bytes of arrays, so a second prompt on the same image skips the encoders."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from automask.backends.base import Backend


def image_digest(image: np.ndarray) -> bytes:
    """A 16-byte BLAKE2b digest of an image array's pixels (in C order, whatever its strides) and shape: the image
    half of a `FeatureCache` key. Computed once per request (hashing a 12 MP image takes tens of milliseconds).

    A C-contiguous array is hashed in place; another (a crop, a flipped or strided view) a block of rows at a time
    (`DIGEST_BLOCK` bytes), so no full-size copy is made (36 MP: ~106 MB of `tobytes()` before)."""
    h = hashlib.blake2b(digest_size=16)
    if image.dtype.hasobject or image.ndim == 0:  # pointers, or one sample: `tobytes()` as it is
        h.update(image.tobytes())
    elif image.flags.c_contiguous:
        h.update(_raw_bytes(image))
    else:
        rows = max(1, DIGEST_BLOCK // max(image[:1].nbytes, 1))
        for top in range(0, image.shape[0], rows):
            h.update(_raw_bytes(np.ascontiguousarray(image[top : top + rows])))
    h.update(repr(image.shape).encode())
    return h.digest()


def _raw_bytes(array: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes (those of `tobytes()`) through a 1-D uint8 view, no copy: of any dtype without
    objects (datetimes and records too, which export no buffer themselves) and any shape (an empty one too)."""
    return array.reshape(-1).view(np.uint8).data


DIGEST_BLOCK = 1 << 20
"""Bytes of a non-contiguous image copied at a time to hash it (`image_digest`)."""


CACHE_BYTES = 256 * 1024 * 1024
"""Most bytes of array data a `FeatureCache` keeps (the embedded model's features of a 36-megapixel photo are a
145 MB float32 map: a few of those must not pile up in a server)."""


NBYTES_DEPTH = 8
"""How deep `nbytes` looks for arrays: deeper than any backend's features nest them; a bound, not a cycle check."""


def nbytes(value: Any) -> int:
    """Bytes of the arrays (numpy or torch) in `value`, looked for in it, its fields and its tuples/lists/dicts, up to
    `NBYTES_DEPTH` levels deep (SAM 3's FPN maps sit three levels down, GroundingDINO's backbone maps four): what
    caching it costs."""

    def size(v: Any, depth: int) -> int:
        if isinstance(v, np.ndarray):
            return int(v.nbytes)
        if hasattr(v, "element_size") and hasattr(v, "nelement"):  # a torch tensor, without importing torch
            return int(v.element_size() * v.nelement())
        if depth == 0:
            return 0
        if isinstance(v, (tuple, list)):
            return sum(size(x, depth - 1) for x in v)
        if isinstance(v, dict):
            return sum(size(x, depth - 1) for x in v.values())
        fields = getattr(v, "__dict__", None)
        return sum(size(x, depth - 1) for x in fields.values()) if isinstance(fields, dict) else 0

    return size(value, NBYTES_DEPTH)


WAIT_STEP = 0.05
"""Seconds between two looks at a waiting caller's stop check while another thread encodes its image."""


class _Flight:
    """One encode in progress: waiters block on `done`; `value` is set when it succeeded."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.value: Any = None


class FeatureCache:
    """A small LRU of encoded image features keyed by (backend, image content), thread-safe: at most `max_items`
    entries and `max_bytes` of their arrays (an entry larger than that alone is not kept). `get_or_compute` runs
    one encode per key at a time: callers that want the same features meanwhile wait for them."""

    def __init__(self, max_items: int = 4, max_bytes: int = CACHE_BYTES) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, bytes], Any] = OrderedDict()
        self._sizes: dict[tuple[str, bytes], int] = {}
        self._flights: dict[tuple[str, bytes], _Flight] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(backend: Backend, digest: bytes) -> tuple[str, bytes]:
        """The key of `backend`'s features of the image with `image_digest` `digest`."""
        return (f"{backend.name}:{backend.model_id}:{id(backend)}", digest)

    def get_or_compute(
        self, key: tuple[str, bytes], compute: Callable[[], Any], waiting: Callable[[], None] | None = None
    ) -> tuple[Any, bool]:
        """(the features under `key`, whether they were not cached yet): from the cache; else from `compute()`, run
        here and cached, or, while another thread computes them, that thread's result once it has it (single flight:
        other keys are not held up). `waiting` (raising to give up) is called every `WAIT_STEP` seconds meanwhile;
        when the other thread's `compute` raises, this one computes itself. `compute`'s own errors propagate."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key], False
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight()
            if leader:
                return self._compute(key, flight, compute), True
            while not flight.done.wait(WAIT_STEP):
                if waiting is not None:
                    waiting()
            if flight.ok:
                return flight.value, True

    def _compute(self, key: tuple[str, bytes], flight: _Flight, compute: Callable[[], Any]) -> Any:
        """`compute()` for `flight`, cached under `key`; its waiters released whether it succeeds or raises."""
        try:
            flight.value = compute()
            flight.ok = True
            self.put(key, flight.value)
            return flight.value
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def get(self, key: tuple[str, bytes]) -> Any | None:
        """The features cached under `key` (now the most recently used), or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple[str, bytes], value: Any) -> None:
        """Cache `value` under `key`, dropping the least recently used entries past `max_items`."""
        if self.max_items <= 0:
            return
        size = nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = value
            self._sizes[key] = size
            self._items.move_to_end(key)
            while len(self._items) > self.max_items or sum(self._sizes.values()) > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                del self._sizes[old]
