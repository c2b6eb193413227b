"""The library's open defects found by earlier hunts: each test failed before its fix."""

from __future__ import annotations

import hashlib
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from automask import MaskGenerator, stopping
from automask.errors import ImageDecodeError, InvalidOptionError, StoppedError
from automask.feature_cache import image_digest
from automask.imageio import load_image
from automask.options import MaskOptions, parse_prompt
from test_mask_controls import MapBackend


def _old_digest(image: np.ndarray) -> bytes:
    """The digest as it was computed before (a full `tobytes()` copy): the cache keys must not change."""
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(repr(image.shape).encode())
    return h.digest()


def test_image_digest_same_for_contiguous_and_strided_views_of_the_same_pixels() -> None:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (90, 140, 3), np.uint8)
    strided = big[::2, 1::3]  # not contiguous
    dense = np.ascontiguousarray(strided)
    assert not strided.flags.c_contiguous
    assert image_digest(strided) == image_digest(dense) == _old_digest(dense)
    flipped = big[::-1]  # negative strides
    assert image_digest(flipped) == _old_digest(np.ascontiguousarray(flipped))
    fortran = np.asfortranarray(big)
    assert image_digest(fortran) == _old_digest(big)
    assert image_digest(big) != image_digest(big[:, :, ::-1])  # other pixels, another key


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros((0, 4, 3), np.uint8),  # empty, C-contiguous
        lambda: np.zeros((5, 0, 3), np.uint8)[::2],  # empty, strided
        lambda: np.zeros((3, 4, 0), np.float32),
        lambda: np.array(7, np.uint16),  # 0-d
        lambda: np.arange(12).astype("datetime64[s]").reshape(3, 4),  # no buffer export
        lambda: np.arange(12).astype("timedelta64[ms]").reshape(4, 3)[::-1],
        lambda: np.zeros(6, [("a", "u1"), ("b", "<f4")])[::2],
        lambda: np.array(list("abcdef"))[::-1],
        lambda: np.arange(20, dtype=">u2").reshape(4, 5)[:, 1:4],
    ],
)
def test_image_digest_equals_the_old_formula_for_any_array(make: Callable[[], np.ndarray]) -> None:
    """Before (since the no-copy digest): an empty C-contiguous array raised TypeError ('cannot cast view with zeros
    in shape'), a datetime or timedelta array ValueError ('cannot include dtype in a buffer'), where the old
    `tobytes()` formula hashed them."""
    array = make()
    assert image_digest(array) == _old_digest(array)
    assert image_digest(array) == image_digest(array.copy())


def test_image_digest_tells_strided_views_of_different_regions_apart() -> None:
    big = np.random.default_rng(4).integers(0, 256, (60, 80, 3), np.uint8)
    views = [big[::2], big[1::2], big[:, ::2][:30], big[30:, 1::2], big[::-2], big[:, :, ::-1][::2]]
    digests = [image_digest(v) for v in views]
    assert len(set(digests)) == len(views)
    assert digests == [_old_digest(np.ascontiguousarray(v)) for v in views]
    assert image_digest(big[::2].copy()) == digests[0]  # equal pixels, equal key


def test_image_digest_hashes_without_a_full_size_copy() -> None:
    image = np.zeros((2000, 3000, 3), np.uint8)  # 18 MB
    image[::7, ::5] = 200
    strided = np.zeros((2000, 6000, 3), np.uint8)[:, ::2]
    for array in (image, strided):
        tracemalloc.start()
        try:
            image_digest(array)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < array.nbytes // 8, (peak, array.nbytes)


@pytest.mark.parametrize(
    ("dtype", "values", "named"),
    [
        ("uint32", [0, 3_000_000_000, 4_000_000_000], "uint32"),
        ("uint32", [0, 70_000, 2**31 - 1], "uint32"),
        ("int64", [0, 70_000, 2**40], "int64"),
        ("uint64", [0, 1, 2**63 + 5], "uint64"),
        ("int8", [-5, 0, 100], "int8"),
        ("int16", [-300, 0, 100], "int16"),
        (">i4", [-1, 0, 100], "int32"),
    ],
)
def test_integer_arrays_out_of_range_are_refused_naming_the_dtype_and_the_ranges(
    dtype: str, values: list[int], named: str
) -> None:
    """No wrap-around (as Pillow's mode "I" does for uint32 above 2**31 - 1, or its int8 read as unsigned): an
    integer array outside 0–65535 is refused, and the message says which dtype and what is accepted."""
    array = np.array([values, values], dtype=dtype)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(array)
    message = str(caught.value)
    assert named in message and "0–255" in message and "0–65535" in message, message


@pytest.mark.parametrize("dtype", ["uint32", "int8", "int16", "int64", "uint64", ">i4"])
def test_integer_arrays_in_range_are_read_by_value(dtype: str) -> None:
    small = np.array([[0, 100, 127]], dtype=dtype)
    assert load_image(small)[..., 0].tolist() == [[0, 100, 127]]
    if np.iinfo(np.dtype(dtype)).max >= 65535:
        wide = np.array([[0, 1000, 65535]], dtype=dtype)
        assert load_image(wide)[..., 0].tolist() == [[0, 4, 255]]  # scaled as 16-bit


NUMPY_OPTIONS = [  # (field, Python value, its numpy scalar and 0-d array forms)
    ("threshold", 0.5, [np.float64(0.5), np.array(0.5), np.array(0.5, np.float32)]),
    ("text_threshold", 0.25, [np.float32(0.25), np.array(0.25)]),
    ("grow_mask", 5, [np.int64(5), np.array(5), np.array(5, np.uint8), np.array(5.0)]),
    ("seed", 7, [np.array(7, np.int32)]),
    ("min_area", 9, [np.array(9)]),
    ("feather", 3, [np.array(3)]),
    ("invert_mask", True, [np.bool_(True), np.array(True)]),
    ("fill_holes", True, [np.array(True)]),
    ("negative_prompt", "hat", [np.str_("hat"), np.array("hat")]),
]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(("field", "plain", "forms"), NUMPY_OPTIONS)
def test_numpy_scalars_and_0d_arrays_are_read_as_the_python_scalars_they_hold(
    field: str, plain: object, forms: list[object], strict: bool
) -> None:
    expected = getattr(MaskOptions.parse({field: plain}), field)
    for value in forms:
        got = getattr(MaskOptions.parse({field: value}, strict=strict), field)
        assert got == expected and type(got) is type(expected), (value, got)
        assert getattr(MaskOptions(**{field: value}), field) == expected


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", np.bool_(True)),  # a Python True is refused for a number: so are numpy's
        ("threshold", np.array(True)),
        ("text_threshold", np.array(False)),
        ("grow_mask", np.array(True)),
        ("grow_mask", np.array(2.5)),
        ("threshold", np.array([0.5])),  # not a scalar
        ("threshold", np.array(np.nan)),
    ],
)
def test_numpy_values_a_python_scalar_would_be_refused_for_are_refused(field: str, value: object, strict: bool) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        MaskOptions.parse({field: value}, strict=strict)
    assert caught.value.field == field


class SlowCountingBackend(MapBackend):
    """A dense backend whose encode takes `delay` seconds and counts its calls per image size (thread-safe)."""

    def __init__(self, delay: float) -> None:
        super().__init__({})
        self.delay = delay
        self.encodes: list[tuple[int, int]] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def encode(self, image: np.ndarray) -> tuple[int, int]:
        with self._lock:
            self.encodes.append(image.shape[:2])
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.delay)
        with self._lock:
            self.running -= 1
        return super().encode(image)


def _run_together(calls: list[Callable[[], object]]) -> list[object]:
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=30) for f in [pool.submit(run, c) for c in calls]]


def test_threads_on_one_uncached_image_encode_it_once() -> None:
    backend = SlowCountingBackend(0.3)
    gen = MaskGenerator(backend)
    image = np.full((20, 30, 3), 120, np.uint8)
    started = time.monotonic()
    results = _run_together([lambda: gen.generate(image.copy(), "x", threshold=0.5) for _ in range(4)])
    assert backend.encodes == [(20, 30)]  # the others waited for the first's features
    assert all(r.mask.shape == (20, 30) for r in results)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5


def test_threads_on_different_images_encode_at_once() -> None:
    backend = SlowCountingBackend(0.5)
    gen = MaskGenerator(backend)
    images = [np.full((20 + i, 30, 3), 120, np.uint8) for i in range(3)]
    _run_together([lambda im=im: gen.generate(im, "x") for im in images])
    assert sorted(backend.encodes) == [(20, 30), (21, 30), (22, 30)]
    assert backend.most_at_once == 3  # not serialised


def test_a_waiting_thread_encodes_itself_when_the_first_encode_fails() -> None:
    class FailsOnce(SlowCountingBackend):
        def encode(self, image: np.ndarray) -> tuple[int, int]:
            first = not self.encodes
            got = super().encode(image)
            if first:
                raise RuntimeError("first encode fails")
            return got

    backend = FailsOnce(0.3)
    gen = MaskGenerator(backend)
    image = np.full((20, 30, 3), 120, np.uint8)
    outcomes = []
    for outcome in _run_together_outcomes([lambda: gen.generate(image, "x") for _ in range(2)]):
        outcomes.append(type(outcome).__name__)
    assert sorted(outcomes) == ["MaskResult", "RuntimeError"] and len(backend.encodes) == 2


def _run_together_outcomes(calls: list[Callable[[], object]]) -> list[object]:
    def caught(call: Callable[[], object]) -> object:
        try:
            return call()
        except RuntimeError as exc:
            return exc

    return _run_together([lambda c=c: caught(c) for c in calls])


def test_a_thread_waiting_for_anothers_encode_stops_when_asked() -> None:
    backend = SlowCountingBackend(2.0)
    gen = MaskGenerator(backend)
    image = np.full((20, 30, 3), 120, np.uint8)
    stop = threading.Event()

    def waiter() -> object:
        time.sleep(0.3)  # the first thread is encoding by now
        threading.Timer(0.2, stop.set).start()
        started = time.monotonic()
        try:
            gen.generate(image, "x", should_stop=stop.is_set)
        except StoppedError:
            return time.monotonic() - started
        return None

    _, waited = _run_together([lambda: gen.generate(image, "x"), waiter])
    assert isinstance(waited, float) and waited < 1.5, waited
    assert len(backend.encodes) == 1


@pytest.mark.parametrize("prompt", [("cup", "hat"), b"cup", np.array(["cup"]), ["cup", 5], 5])
def test_a_prompt_of_another_type_is_refused_saying_what_is_accepted(prompt: object) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        parse_prompt(prompt)  # type: ignore[arg-type]
    message = str(caught.value)
    assert caught.value.field == "prompt" and "a string or a list of strings" in message, message
    assert type(prompt).__name__ in message or "item" in message, message


def test_a_thread_waiting_for_anothers_encode_asks_its_stop_check_as_a_running_encode_does() -> None:
    """Before: a waiting thread asked its `should_stop` every `WAIT_STEP` (0.05 s), ten times as often as a running
    model stage may (`INSIDE_EVERY`, 0.5 s: a check may cost a database read, a v2 job's); now it asks as the encode
    it waits for would, throttled the same, and still stops within that bound."""
    backend = SlowCountingBackend(1.5)
    gen = MaskGenerator(backend)
    image = np.full((20, 30, 3), 120, np.uint8)
    asked = []

    def waiter() -> object:
        time.sleep(0.2)  # the first thread is encoding by now

        def should_stop() -> bool:
            asked.append(time.monotonic())
            return False

        return gen.generate(image, "x", should_stop=should_stop)

    _run_together([lambda: gen.generate(image, "x"), waiter])
    boundaries = len(asked)
    asked.clear()
    gen.generate(image, "x", should_stop=lambda: bool(asked.append(time.monotonic())))  # cached: no wait
    assert len(backend.encodes) == 1
    waiting_asks = boundaries - len(asked) - 1  # less the after-encode boundary, which a cached run has not
    assert waiting_asks <= 1.3 / stopping.INSIDE_EVERY + 1, (boundaries, len(asked))  # ~1.3 s waited
