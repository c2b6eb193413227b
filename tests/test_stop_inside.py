"""A run told to stop stops inside a running model stage: tiny random torch models (CLIPSeg, Grounded-SAM, SAM 3,
refine; the SAM, SAM 2 and EdgeTAM mask heads) ask the run's stop check at each repeated layer, throttled, and only
the check of their own run; a stopped encode caches nothing and leaves the model as it was."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import automask.stopping
from automask.backends import clipseg, grounded_sam, sam, sam2, sam3
from automask.backends.base import Backend
from automask.backends.interrupt import repeated_layers
from automask.backends.refine import RefinedBackend
from automask.errors import StoppedError
from automask.feature_cache import image_digest
from automask.pipeline import MaskGenerator
from automask.settings import Settings
from automask.stopping import StopCheck, current, stopping
from tiny_models import (
    make_tiny_clipseg,
    make_tiny_edgetam,
    make_tiny_grounded_sam,
    make_tiny_sam,
    make_tiny_sam2,
    make_tiny_sam3,
)


class Entered:
    """Counts the repeated layers of `models` whose forward began (its pre-hooks ran past the stop check's, which
    was registered first, at load), per thread; `on_enter(layer index, thread name)` runs at each."""

    def __init__(self, models: list[torch.nn.Module], on_enter: Callable[[int, str], None] | None = None) -> None:
        self.layers = [layer for m in models for layer in repeated_layers(m)]
        self.by_thread: dict[str, int] = {}
        self.on_enter = on_enter
        self._handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int) -> Callable[[Any, Any], None]:
        def hook(module: Any, args: Any) -> None:
            name = threading.current_thread().name
            self.by_thread[name] = self.by_thread.get(name, 0) + 1
            if self.on_enter is not None:
                self.on_enter(index, name)

        return hook

    @property
    def count(self) -> int:
        return sum(self.by_thread.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def stop_at_asking(n: int) -> Callable[[], bool]:
    """A `should_stop` that says True from its `n`th asking on."""
    asked = [0]

    def should_stop() -> bool:
        asked[0] += 1
        return asked[0] >= n

    return should_stop


@pytest.fixture()
def every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs ask their check at every layer (no throttle), so that a test knows which asking is which."""
    monkeypatch.setattr(automask.stopping, "INSIDE_EVERY", 0.0)


def _clipseg(folder: Path, settings: Settings) -> tuple[Backend, list[torch.nn.Module]]:
    b = clipseg.load(make_tiny_clipseg(folder / "clipseg"), settings)
    return b, [b.model]


def _grounded(folder: Path, settings: Settings) -> tuple[Backend, list[torch.nn.Module]]:
    b = grounded_sam.load(make_tiny_grounded_sam(folder / "gs"), settings, precision="fp32")
    return b, [b.detector, b.segmenter.model]  # type: ignore[attr-defined]


def _sam3(folder: Path, settings: Settings) -> tuple[Backend, list[torch.nn.Module]]:
    b = sam3.load(make_tiny_sam3(folder / "sam3"), settings)
    return b, [b.model]


def _refine(folder: Path, settings: Settings) -> tuple[Backend, list[torch.nn.Module]]:
    inner, models = _clipseg(folder, settings)
    head = sam.load_segmenter(make_tiny_sam(folder / "sam"), settings, "fp32")
    return RefinedBackend(inner, head), [*models, head.model]


BACKENDS = {"clipseg": _clipseg, "grounded-sam": _grounded, "sam3": _sam3, "refine": _refine}
PROMPTS = {"clipseg": "cup", "grounded-sam": "cat", "sam3": "cat", "refine": "cup"}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Backend, list[torch.nn.Module]]:
    name = str(request.param)
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), precision="fp32")
    return (name, *BACKENDS[name](tmp_path_factory.mktemp(name), settings))


@pytest.fixture()
def entered(loaded: tuple[str, Backend, list[torch.nn.Module]]) -> Iterator[Entered]:
    counter = Entered(loaded[2])
    yield counter
    counter.remove()


@pytest.mark.usefixtures("every_layer")
def test_a_run_told_to_stop_stops_inside_its_encode_and_caches_nothing(
    loaded: tuple[str, Backend, list[torch.nn.Module]], entered: Entered, coffee: np.ndarray
) -> None:
    """Asked after decoding (1st asking: go on), then at each layer: the 3rd asking (the encode's second layer) says
    stop, and no later layer begins. Before: the encode ran all its layers, the stop came at the boundary after it."""
    name, backend, _ = loaded
    reference = MaskGenerator(backend).generate(coffee, PROMPTS[name], threshold=0.3)
    whole = entered.count
    entered.by_thread.clear()
    gen = MaskGenerator(backend)
    with pytest.raises(StoppedError):
        gen.generate(coffee, PROMPTS[name], threshold=0.3, should_stop=stop_at_asking(3))
    assert entered.count == 1 < whole  # one layer of the encode began, of the `whole` of a run
    assert gen.cache.get(gen.cache.key(backend, image_digest(coffee))) is None  # nothing half-encoded kept
    again = gen.generate(coffee, PROMPTS[name], threshold=0.3, should_stop=lambda: False)
    assert np.array_equal(again.mask, reference.mask) and again.detections == reference.detections
    assert current() is None  # no check left installed


MASK_HEADS: dict[str, tuple[Callable[[Path], Path], Callable[..., Any]]] = {
    "sam": (make_tiny_sam, sam.load_segmenter),
    "sam2": (make_tiny_sam2, sam2.load_segmenter),
    "edgetam": (make_tiny_edgetam, sam2.load_segmenter),
}


@pytest.mark.parametrize("kind", sorted(MASK_HEADS))
def test_a_mask_head_stops_inside_its_image_encoder(kind: str, tmp_path: Path, coffee: np.ndarray) -> None:
    """The SAM, SAM 2 and EdgeTAM image encoders (ViT, Hiera, RepViT) ask at each block."""
    make, load = MASK_HEADS[kind]
    head = load(make(tmp_path / kind), Settings(data_dir=tmp_path / "data"), "fp32")
    counter = Entered([head.model])
    reference = head.embed(coffee)
    whole = counter.count
    counter.by_thread.clear()
    with stopping(stop_at_asking(2), every=0.0), pytest.raises(StoppedError):
        head.embed(coffee)
    assert counter.count == 1 < whole
    again = head.embed(coffee)  # outside a run: nothing asks, it runs to the end as before
    first, second = (getattr(e, "features", None) or [getattr(e, "embeddings", None)] for e in (reference, again))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    counter.remove()


def test_the_check_is_asked_at_most_every_interval_from_inside() -> None:
    now = [0.0]
    asked: list[float] = []
    check = StopCheck(lambda: asked.append(now[0]) or now[0] >= 2.0, every=0.5, clock=lambda: now[0])
    for step in range(9):  # nine layers, 0.1 s apart: asked once, at 0.5 s
        now[0] = step / 10
        assert check.inside() is False
    assert asked == [0.5]
    now[0] = 0.7
    assert check() is False and asked == [0.5, 0.7]  # a boundary asks every time, and restarts the interval
    now[0] = 1.1
    assert check.inside() is False and asked == [0.5, 0.7]
    now[0] = 2.0
    assert check.inside() is True and asked == [0.5, 0.7, 2.0]
    assert check.inside() is True and check() is True and len(asked) == 3  # once True, True unasked
    assert check.asked == 3


def test_a_run_does_not_ask_its_check_at_each_layer(
    tiny_clipseg_dir: Path, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run quicker than the throttle is asked at its stage boundaries only: a check that costs a database read is
    not read at each of its layers."""
    monkeypatch.setattr(automask.stopping, "INSIDE_EVERY", 30.0)  # however loaded the machine, the run is quicker
    backend = clipseg.load(tiny_clipseg_dir, Settings())
    counter = Entered([backend.model])
    asked: list[int] = []
    MaskGenerator(backend).generate(coffee, "cup", should_stop=lambda: asked.append(counter.count) and False)
    counter.remove()
    assert counter.count >= 7 and len(asked) == 4  # after decoding, encode and score, and before rendering


@pytest.mark.usefixtures("every_layer")
def test_a_stopped_run_does_not_stop_another_running_beside_it(tiny_clipseg_dir: Path, coffee: np.ndarray) -> None:
    """Two runs on one model in two threads, both inside the encode at once: the one told to stop stops; the other,
    asked at each of its layers too, never sees that check and answers what a run alone answers."""
    backend = clipseg.load(tiny_clipseg_dir, Settings())
    reference = MaskGenerator(backend).generate(coffee, "cup")
    both_inside = threading.Barrier(2, timeout=30)
    counter = Entered([backend.model.clip.vision_model], lambda i, _: i == 0 and both_inside.wait())
    asked: dict[str, int] = {}
    outcomes: dict[str, Any] = {}

    def run(name: str, stop: bool) -> None:
        def should_stop() -> bool:
            asked[name] = asked.get(name, 0) + 1
            return stop and counter.by_thread.get(name, 0) > 0

        try:
            outcomes[name] = MaskGenerator(backend).generate(coffee, "cup", should_stop=should_stop)
        except StoppedError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(n, n == "stopped"), name=n) for n in ("stopped", "going")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counter.remove()
    assert isinstance(outcomes["stopped"], StoppedError) and counter.by_thread["stopped"] == 1
    assert np.array_equal(outcomes["going"].mask, reference.mask) and counter.by_thread["going"] > 1
    assert asked["going"] > 4  # asked at its own layers besides its boundaries
    assert current() is None


def test_a_check_is_asked_only_inside_its_own_run(tiny_clipseg_dir: Path, coffee: np.ndarray) -> None:
    """After `generate` returned or raised, the model asks nothing: a direct encode runs to its end."""
    backend = clipseg.load(tiny_clipseg_dir, Settings())
    told: list[int] = []
    with pytest.raises(StoppedError):
        MaskGenerator(backend).generate(coffee, "cup", should_stop=lambda: told.append(1) or len(told) > 1)
    n = len(told)
    features = backend.encode(coffee)
    assert len(told) == n and len(features.activations) == 2
