"""The one library call: image + prompt + options -> `MaskResult`.

input -> backend.encode (cached per image) -> backend.score -> threshold -> negative -> fill_holes -> min_area
-> grow -> invert -> feather -> render. The CLI, the HTTP service and the web page all call `MaskGenerator.generate`.

The targets of `negative_prompt` are scored in the same `score` call as the prompt's (one call per backend), then
split off by label (`automask.combine`): a dense backend scores each target on its own, so its prompt maps are those
of a call without negatives; a detector (grounded-sam) reads all targets in one text, so each region is credited to
whichever target, positive or negative, fits it best.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from automask import embedded, staging
from automask.backends import registry
from automask.backends.base import Backend, ScoreParams, Scores, score_with
from automask.combine import Part, finish
from automask.errors import InvalidOptionError, ModelNotAvailableError, stop_if_asked
from automask.feature_cache import FeatureCache, image_digest
from automask.imageio import ImageSource, load_image
from automask.imageio.orientation import noting
from automask.imageio.pixels import composite_on_white
from automask.models import EMBEDDED, ResolvedModel
from automask.options import MaskOptions, parse_prompt
from automask.result import MaskResult
from automask.routing import ModelPlan, Route, installed_alternatives, plan_models, routed
from automask.settings import Settings
from automask.stopping import stop_inside, stopping


class MaskGenerator:
    """Keeps its models loaded and answers any number of masking calls.

    `model` is a catalogue name ('clipseg', 'subject'), a local model folder (a str or `os.PathLike`), an
    already loaded `Backend` (used alone), or None for the default: AUTOMASK_MODEL, else the installed
    open-vocabulary model, else the embedded 'subject' model. Beside an open-vocabulary model, the embedded model
    (when installed, and `settings.route_embedded`) answers the words of `automask.routing.VOCABULARY`; see
    `automask.routing`.
    When the embedded model is the one to use and is missing, it is installed on first use unless downloads are
    off (`Settings.offline`, HF_HUB_OFFLINE; see `automask.embedded.install_if_needed`).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Backend | None = None,
        settings: Settings | None = None,
        cache_size: int = 4,
    ) -> None:
        self.settings = _settings(settings)
        if isinstance(cache_size, bool) or not isinstance(cache_size, (int, np.integer)) or cache_size < 0:
            raise InvalidOptionError("cache_size", f"must be a whole number of images, 0 or more, not {cache_size!r}")
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        self.open: Backend | None = None
        """The open-vocabulary backend, or None (the embedded model alone)."""
        self.embedded: Backend | None = None
        """The embedded 'subject' backend, or None."""
        if isinstance(model, str) or model is None:
            plan = _plan(model, self.settings)
            self.open = _load(plan.open, self.settings)
            self.embedded = _load(plan.embedded, self.settings)
        elif not isinstance(model, Backend):
            raise InvalidOptionError(
                "model", f"must be a model name, a model folder or a loaded Backend, not {type(model).__name__}"
            )
        elif model.name == EMBEDDED:
            self.embedded = model
        else:
            self.open = model
        primary = self.open or self.embedded
        assert primary is not None
        self.backend: Backend = primary
        """The main backend: the open-vocabulary one when there is one."""
        self.cache = FeatureCache(int(cache_size))  # numpy's integers too
        self._refined: Backend | None = None

    def route(self, targets: list[str]) -> Route:
        """Which of this generator's models scores each target; `ModelNotAvailableError` (naming the installed
        models that could) for a target none of them can serve. Loads and decodes nothing."""
        return routed(
            targets,
            embedded=self.embedded is not None,
            open_vocab=self.open is not None,
            alternatives=lambda: installed_alternatives(self.settings),
        )

    def generate(
        self,
        image: ImageSource,
        prompt: str | list[str],
        options: MaskOptions | Mapping[str, Any] | None = None,
        *,
        allow_paths: bool = True,
        should_stop: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> MaskResult:
        """Mask what `prompt` names in `image`.

        `options` (a `MaskOptions` or a dict of options) and keyword options such as threshold=0.3, grow_mask=5
        (which win) are validated here.
        `allow_paths=False`: `image` is never read as a local file path (see `load_image`; for servers).
        `should_stop` (None: never) is asked at each stage boundary (after decoding, after each encode and score,
        inside the backends that have stages of their own, before rendering) and, at most every
        `automask.stopping.INSIDE_EVERY` seconds, inside a running model stage (at each layer, during each ONNX
        Runtime call): True raises `StoppedError` there, so a run nobody waits for any more ends early (a server's
        client left, or its time limit passed); a stopped encode caches nothing.
        Raises `EmptyMaskError` when `stop_on_empty_mask` is set and nothing is selected, and
        `ModelNotAvailableError` for a target that none of the loaded models can serve.
        """
        opts = mask_options(options, kwargs)
        if should_stop is not None and not callable(should_stop):
            raise InvalidOptionError(
                "should_stop",
                f"must be a function that returns True to stop (e.g. event.is_set), not {type(should_stop).__name__}",
            )
        with stopping(should_stop) as check:
            return self._generate(image, prompt, opts, allow_paths, check)

    def _generate(
        self,
        image: ImageSource,
        prompt: str | list[str],
        opts: MaskOptions,
        allow_paths: bool,
        should_stop: Callable[[], bool] | None,
    ) -> MaskResult:
        """`generate`'s work, `should_stop` (the run's `StopCheck`, or None) asked at each stage boundary."""
        prompts = parse_prompt(prompt)
        plan = self.route(opts.scored_targets(prompts))
        t0 = time.perf_counter()
        keep_alpha = opts.output_kind == "alpha"  # a cut-out keeps the image's own transparency
        with noting() as turned:  # how decoding turned the image (a client showing it itself needs to know)
            decoded = Decoded(load_image(image, self.settings, allow_paths=allow_paths, keep_alpha=keep_alpha))
        timings: dict[str, float] = {"encode": 0.0, "score": 0.0, "decode": time.perf_counter() - t0}
        stop_if_asked(should_stop)
        params = ScoreParams(text_threshold=opts.text_threshold, should_stop=should_stop)
        parts: list[Part] = []
        if plan.open:
            assert self.open is not None
            backend = self._refined_open() if opts.refine else self.open
            parts.append(Part(self._score(backend, decoded, list(plan.open), opts.threshold, timings, params), backend))
        if plan.embedded or plan.background:
            parts += self._embedded_parts(decoded, plan, opts.threshold, timings, params)
        result = finish(
            decoded.rgb, parts, prompts, opts, self.backend, timings, t0, rgba=decoded.rgba, should_stop=should_stop
        )
        return replace(result, orientation=turned[-1]) if turned else result

    def _embedded_parts(
        self, image: Decoded, plan: Route, threshold: float, timings: dict[str, float], params: ScoreParams
    ) -> list[Part]:
        """Subject/person targets scored p (the salient-object probability), background targets 1 - p: each
        selected where its own score reaches the threshold, as every other target."""
        embedded = self.embedded
        assert embedded is not None
        return [
            Part(self._score(embedded, image, list(targets), threshold, timings, params), embedded)
            for targets in (plan.embedded, plan.background)
            if targets
        ]

    def _refined_open(self) -> Backend:
        """The open-vocabulary backend with SAM refinement (`refine` option). SAM is found and loaded on first use,
        then kept; while none is installed, it is looked for again on each call."""
        if self._refined is None:
            from automask.backends.refine import refined

            assert self.open is not None
            self._refined = refined(self.open, self.settings)
        return self._refined

    def _score(
        self,
        backend: Backend,
        image: Decoded,
        prompts: list[str],
        threshold: float,
        timings: dict[str, float],
        params: ScoreParams,
    ) -> Scores:
        """`backend`'s scores of `prompts`, its features of `image` taken from the cache when there (or from another
        thread encoding the same image meanwhile: one encode per image at a time; waiting for it, this run's stop
        check is asked as from inside a running encode, throttled: `stop_inside`);
        `params.should_stop` is asked after the encode and after the score."""
        t = time.perf_counter()
        key = self.cache.key(backend, image.digest)
        features, fresh = self.cache.get_or_compute(key, lambda: backend.encode(image.rgb), stop_inside)
        if fresh:  # encoded here, or by another thread on the same image while this one waited
            timings["encode"] += time.perf_counter() - t
            stop_if_asked(params.should_stop)
        t = time.perf_counter()
        scores = score_with(backend, features, prompts, threshold, params)
        timings["score"] += time.perf_counter() - t
        stop_if_asked(params.should_stop)
        return scores


def mask_options(options: MaskOptions | Mapping[str, Any] | None, overrides: dict[str, Any]) -> MaskOptions:
    """`options` (a `MaskOptions`, a mapping of option names to values, or None) with the keyword `overrides`,
    validated: `InvalidOptionError` naming the first bad field, or saying what `options` must be. A `MaskOptions` is
    validated again: pydantic's `model_copy(update=...)` (how a frozen model is changed) and `model_construct`
    do not validate."""
    if options is not None and not isinstance(options, (MaskOptions, Mapping)):
        raise InvalidOptionError("options", f"must be a MaskOptions or a dict of options, not {type(options).__name__}")
    return MaskOptions.parse(dict(options or {}), **overrides)  # a MaskOptions: its fields as they are


class Decoded:
    """A request's decoded image: `rgb` H×W×3 uint8 (transparency composited onto white, what models see), `rgba`
    H×W×4 uint8 when it was loaded with its transparency kept (else None), and its `image_digest`, hashed on first
    use only (of `rgb`: features cached for one are those of the other)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.rgba = pixels if pixels.shape[2] == 4 else None
        self.rgb = composite_on_white(pixels) if self.rgba is not None else pixels
        self._digest: bytes | None = None

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = image_digest(self.rgb)
        return self._digest


def _plan(spec: str | None, settings: Settings) -> ModelPlan:
    """`plan_models`, after installing the embedded model on first use when `spec` needs it (`embedded`)."""
    offline_note = embedded.install_if_needed(spec, settings)
    try:
        return plan_models(spec, settings)
    except ModelNotAvailableError as exc:
        if offline_note:
            raise ModelNotAvailableError(f"{exc.message.rstrip('. ')}. {offline_note}") from None
        raise


def _settings(settings: Settings | None) -> Settings:
    """`settings`, or `Settings()` (from the environment) for None; `InvalidOptionError` for anything else."""
    if settings is None:
        return Settings()
    if not isinstance(settings, Settings):
        raise InvalidOptionError(
            "settings", f"must be an automask.Settings (e.g. Settings(offline=True)), not {type(settings).__name__}"
        )
    return settings


def _load(found: ResolvedModel | None, settings: Settings) -> Backend | None:
    """The backend of `found`; a model of the data folder is read under its lock (`staging.reading`): `automask
    models rm` waits for the loading, or refuses, instead of deleting the files being read."""
    if found is None:
        return None
    with staging.reading_model(found.path, settings.models_dir):
        return registry.create(found.backend, found.path, settings)


ONE_SHOT_KEPT = 2
"""How many generators `generate` keeps loaded (one per model and settings), the least recently used dropped first."""

_DEFAULT: OrderedDict[tuple[str | None, Settings], MaskGenerator] = OrderedDict()
_DEFAULT_LOCK = threading.Lock()


def generate(
    image: ImageSource,
    prompt: str | list[str],
    options: MaskOptions | Mapping[str, Any] | None = None,
    *,
    model: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
    **kwargs: Any,
) -> MaskResult:
    """One-shot helper: `MaskGenerator(model, settings).generate(image, prompt, options, **kwargs)`, the
    generator kept for later calls with the same model and settings (the last `ONE_SHOT_KEPT` of them: the least
    recently used is dropped, its models freed once no call uses them)."""
    settings = _settings(settings)
    key = (None if model is None else os.fspath(model), settings)
    with _DEFAULT_LOCK:
        gen = _DEFAULT.get(key)
        if gen is None:
            gen = _DEFAULT[key] = MaskGenerator(key[0], settings)
        _DEFAULT.move_to_end(key)
        while len(_DEFAULT) > ONE_SHOT_KEPT:
            _DEFAULT.popitem(last=False)
    return gen.generate(image, prompt, options, **kwargs)
