"""Inference off the event loop: one `MaskGenerator` per model, a bounded thread pool, a time limit per call.

The server answers with its default model (`--model`, `AUTOMASK_MODEL`, else `automask.models.default_model`)
and, when a request names one (the `model` field, an automask extension), with any other catalogue model
installed in the data folder. A request names a model only by its name, never by a path: the default is known
by its catalogue name, or by its folder's name when it is a local folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automask.errors import AutomaskError, InferenceTimeoutError, ModelNotAvailableError
from automask.imageio import ImageSource
from automask.models import CATALOGUE, REFINERS, list_models
from automask.options import MaskOptions
from automask.pipeline import MaskGenerator
from automask.result import MaskResult
from automask.routing import installed_alternatives, plan_models, routed
from automask.server import metrics
from automask.server.config import ServerSettings
from automask.server.served import ModelEntry, answering, naming_alternatives, unknown_model
from automask.settings import Settings

log = logging.getLogger("automask.server")

RETRY_LOAD_AFTER = 5.0
"""Seconds before a failed model load is tried again (a model pulled while the server runs is picked up)."""
_PATH = re.compile(r"(?<![:/\w.~-])(?:/|~/|[A-Za-z]:\\)[^\s'\"]+")
"""A file system path in a message (not the path part of a URL)."""
DEFAULT_ALIAS = "default"
"""The default model's name when it is a folder whose name is a catalogue name (or has no name)."""


@dataclass
class _Slot:
    """One model: what to load (`spec`: a catalogue name, a folder or None), and its generator once loaded."""

    name: str
    spec: str | None
    generator: MaskGenerator | None = None
    error: AutomaskError | None = None
    failed_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recent_error(self) -> AutomaskError | None:
        """The last load error if it is too recent to try again."""
        if self.error is not None and time.monotonic() - self.failed_at < RETRY_LOAD_AFTER:
            return self.error
        return None


def default_name(settings: Settings, generator: MaskGenerator | None = None) -> str:
    """The name clients use for the server's default model (never a path)."""
    from automask.models import default_model

    spec = settings.model or (generator.backend.model_id if generator is not None else default_model(settings))
    if spec in CATALOGUE:
        return spec
    name = Path(spec).name
    return DEFAULT_ALIAS if not name or name in CATALOGUE else name


class Runner:
    """Runs `MaskGenerator.generate` in at most `concurrency` threads, each call within `timeout` seconds.

    Models load in a thread of their own, never in the inference pool: the default one in the background at
    start-up (`start_loading`), others on their first request, once, and are kept; a request waits for its
    model's load (`load`, no time limit) before its time limit starts. A load that failed (model not
    installed...) makes calls raise `ModelNotAvailableError` (503) and is retried after `RETRY_LOAD_AFTER`.
    """

    def __init__(self, settings: Settings, server: ServerSettings, generator: MaskGenerator | None = None) -> None:
        self.settings = settings
        self.server = server
        self.default = default_name(settings, generator)
        """The default model's name."""
        self._slots = {self.default: _Slot(self.default, settings.model, generator)}
        self._slots_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=server.concurrency, thread_name_prefix="automask-infer")
        self._overdue: set[Future[Any]] = set()
        self._overdue_changed = threading.Condition()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="automask-load")

    @property
    def _default_slot(self) -> _Slot:
        return self._slots[self.default]

    @property
    def ready(self) -> bool:
        """True once the default model is loaded."""
        return self._default_slot.generator is not None

    @property
    def model_id(self) -> str | None:
        """What the default model is (a hub name or a folder), or None before it has loaded."""
        generator = self._default_slot.generator
        return generator.backend.model_id if generator is not None else None

    @property
    def error(self) -> AutomaskError | None:
        """Why the default model is not loaded (None while loading, or once loaded)."""
        slot = self._default_slot
        return None if slot.generator is not None else slot.error

    def start_loading(self) -> None:
        """Load the default model in the loader thread now, so the first request does not pay for it."""
        self._loader.submit(self._load_quietly)

    async def load(self, model: str | None = None) -> None:
        """Have `model` (None: the default) loaded, in the loader thread; waits without holding a thread, with
        no time limit (a first load may download). Raises `UnknownModelError` (404), `ModelNotAvailableError`
        (503), or `RunnerClosed` once the server is stopping."""
        if self._slot(self.name_of(model)).generator is not None:
            return
        try:
            future = self._loader.submit(self.generator, model)
        except RuntimeError:  # shut down
            raise RunnerClosed() from None
        await asyncio.wrap_future(future)

    def _load_quietly(self) -> None:
        with contextlib.suppress(AutomaskError):  # kept in the slot: answered 503, shown by /readyz
            self.generator()

    def name_of(self, model: str | None) -> str:
        """The name of the model a request asks for (None: the default). `UnknownModelError` (404) for a name
        that is neither the default nor a catalogue model that answers prompts; paths are never accepted."""
        if model is None or model == self.default:
            return self.default
        if model in CATALOGUE and model not in REFINERS:
            return model
        raise unknown_model(model, self.models())

    def _slot(self, name: str) -> _Slot:
        with self._slots_lock:
            if name not in self._slots:  # only catalogue names get here: at most len(CATALOGUE) slots
                self._slots[name] = _Slot(name, name)
            return self._slots[name]

    def check(self, model: str | None, targets: Sequence[str] = ()) -> str:
        """`name_of(model)`, after checking that the model is installed and can answer `targets` (the request's
        scored targets: `MaskRequest.targets`); `ModelNotAvailableError` (503, saying what to install or choose)
        otherwise. Loads nothing: a quick look at the disk."""
        name = self.name_of(model)
        slot = self._slot(name)
        if slot.generator is not None:
            slot.generator.route(list(targets))
            return name
        if (error := slot.recent_error()) is not None:
            raise self._naming_alternatives(error, name, targets)
        try:
            plan = plan_models(slot.spec, self.settings)
        except AutomaskError as exc:
            raise self._naming_alternatives(self._not_available(slot, exc), name, targets) from None
        alternatives = functools.partial(installed_alternatives, self.settings)
        routed(
            list(targets),
            embedded=plan.embedded is not None,
            open_vocab=plan.open is not None,
            alternatives=alternatives,
        )
        return name

    def alternatives(self, name: str, targets: Sequence[str]) -> list[str]:
        """`answering(self.models(), name, targets)`, leaving out any model whose load just failed."""
        return [
            other
            for other in answering(self.models(), name, targets)
            if (found := self._slots.get(other)) is None or found.recent_error() is None
        ]

    def _naming_alternatives(self, error: AutomaskError, name: str, targets: Sequence[str]) -> AutomaskError:
        return naming_alternatives(error, self.alternatives(name, targets))

    def _not_available(self, slot: _Slot, exc: AutomaskError) -> ModelNotAvailableError:
        """The public error for a model that cannot load: it names the model, never a server path (a local
        folder's problem is in the server log only)."""
        if slot.spec is not None and slot.spec not in CATALOGUE:
            log.error("model %s (%s) is not available: %s", slot.name, slot.spec, exc.message)
            return ModelNotAvailableError(
                f"The server's model {slot.name!r} is not available (its folder is missing or cannot be loaded); "
                "the server log says why."
            )
        if _PATH.search(exc.message):  # e.g. a pulled folder with a file missing: the path stays in the log
            log.error("model %s is not available: %s", slot.name, exc.message)
            return ModelNotAvailableError(
                f"The server's model {slot.name!r} is not available: its files are missing or incomplete (the "
                f"server log says which). Install it again with: automask models pull {slot.name} --force"
            )
        if slot.name == self.default:
            return ModelNotAvailableError(f"The server's model is not available. {exc.message}")
        return exc if isinstance(exc, ModelNotAvailableError) else ModelNotAvailableError(exc.message)

    def generator(self, model: str | None = None) -> MaskGenerator:
        """The generator of `model` (None: the default); loads it (once, thread-safe) if needed.

        Raises `UnknownModelError` (404) or `ModelNotAvailableError` (503).
        """
        slot = self._slot(self.name_of(model))
        with slot.lock:
            if slot.generator is not None:
                return slot.generator
            if (error := slot.recent_error()) is not None:
                raise error
            try:
                slot.generator = MaskGenerator(slot.spec, self.settings)
                log.info("model %s loaded: %s", slot.name, slot.generator.backend.model_id)
            except AutomaskError as exc:
                slot.error, slot.failed_at = self._not_available(slot, exc), time.monotonic()
                log.error("model %s not loaded: %s", slot.name, exc.message)
                raise slot.error from None
            return slot.generator

    def models(self) -> list[ModelEntry]:
        """The default model, then every other installed catalogue model that answers prompts."""
        slot = self._default_slot
        default_spec = CATALOGUE.get(self.default)
        backend = slot.generator.backend.name if slot.generator is not None else None
        entries = [
            ModelEntry(
                name=self.default,
                backend=backend or (default_spec.backend if default_spec else None),
                description=default_spec.description if default_spec else "The server's model (a local folder).",
                default=True,
                loaded=slot.generator is not None,
            )
        ]
        for info in list_models(self.settings):
            if info.installed and info.name != self.default and info.name not in REFINERS:
                loaded = (found := self._slots.get(info.name)) is not None and found.generator is not None
                entries.append(ModelEntry(info.name, info.backend, info.description, False, loaded))
        return entries

    def _generate(
        self, image: ImageSource, prompt: str, options: MaskOptions, model: str | None, should_stop: Callable[[], bool]
    ) -> tuple[MaskResult, float]:
        generator = self.generator(model)
        with metrics.run(self.name_of(model)):  # counted where it runs (a worker's pool process forwards it)
            t0 = time.perf_counter()
            if self.server.debug_delay:
                time.sleep(self.server.debug_delay)
            # a client's string: never a path
            result = generator.generate(image, prompt, options, allow_paths=False, should_stop=should_stop)
            return result, time.perf_counter() - t0

    async def run(
        self, image: ImageSource, prompt: str, options: MaskOptions, model: str | None = None
    ) -> tuple[MaskResult, float]:
        """`generate` with model `model` (None: the default) in a pool thread; returns the result and the
        seconds it took. A string `image` is a URL, a data URI or base64, never read as a server-side path.

        Loads the model first (`load`: a first load does not count against the limit), then raises the
        library's `AutomaskError`s, and `InferenceTimeoutError` after `timeout` seconds (waiting for a pool
        thread included). A call given up on (past its limit, or cancelled: the client left) never runs if no
        thread has taken it yet; one already running is told to stop, and stops at its next stage boundary
        or model layer (`MaskGenerator.generate`'s `should_stop`), its result dropped.
        """
        await self.load(model)
        abandoned = threading.Event()
        future = self._submit(image, prompt, options, model, abandoned.is_set)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.server.timeout)
        except asyncio.TimeoutError:
            raise inference_timeout(self.server.timeout) from None
        finally:
            if not future.done():  # past its limit, or the caller was cancelled (the client left)
                abandoned.set()
                self._give_up(future)

    def run_blocking(
        self,
        image: ImageSource,
        prompt: str,
        options: MaskOptions,
        model: str | None = None,
        *,
        timeout: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[MaskResult, float]:
        """`run` for a caller that is a thread (a job runner, a Celery task): the same load, limit and errors.
        `timeout` (None: the server's) is the limit of this call, e.g. what is left of the server's limit to a
        request that waited in a queue (its 504 names the server's limit all the same, as `run` does);
        `should_stop` is asked at each stage boundary and inside the model stages besides the runner's own giving up
        (a call past its limit stops at its next boundary or model layer)."""
        self.generator(model)
        limit = self.server.timeout if timeout is None else timeout
        abandoned = threading.Event()

        def stop() -> bool:
            return abandoned.is_set() or (should_stop is not None and should_stop())

        future = self._submit(image, prompt, options, model, stop)
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            abandoned.set()
            self._give_up(future)
            raise inference_timeout(self.server.timeout) from None
        except FutureCancelled:  # the pool was shut down before a thread took the call
            raise RunnerClosed() from None

    def _give_up(self, future: Future[Any]) -> None:
        """Drop a call past its time limit: it never runs if no thread has taken it yet, else it is `overdue`
        (until it stops at its next stage boundary or model layer, or ends)."""
        if future.cancel():
            return
        with self._overdue_changed:
            self._overdue.add(future)
        future.add_done_callback(self._done_overdue)

    def _done_overdue(self, future: Future[Any]) -> None:
        with self._overdue_changed:
            self._overdue.discard(future)
            self._overdue_changed.notify_all()

    @property
    def overdue(self) -> int:
        """Calls given up on that still hold an inference thread (until their next stage boundary or model layer; a hung
        model keeps it)."""
        with self._overdue_changed:
            return len(self._overdue)

    def wait_overdue(self, seconds: float) -> bool:
        """Wait up to `seconds` for the calls given up on to stop; True when none holds a thread any more."""
        with self._overdue_changed:
            return self._overdue_changed.wait_for(lambda: not self._overdue, timeout=seconds)

    def _submit(
        self, image: ImageSource, prompt: str, options: MaskOptions, model: str | None, should_stop: Callable[[], bool]
    ) -> Future[tuple[MaskResult, float]]:
        try:
            return self.pool.submit(self._generate, image, prompt, options, model, should_stop)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            raise RunnerClosed() from None

    def close(self) -> None:
        """Stop taking work: calls waiting for a thread raise `RunnerClosed`; calls already running finish in
        their threads."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)


class RunnerClosed(Exception):
    """The server is stopping and the call was not run: not the request's fault (a v2 job goes back to the
    queue, its attempt not counted)."""


def inference_timeout(seconds: float) -> InferenceTimeoutError:
    """The 504 of a request that ran past the server's `timeout` (wherever it ran)."""
    return InferenceTimeoutError(
        f"Masking took longer than the server's limit of {seconds:g} s. "
        "Try a smaller image, or raise the limit with `automask serve --timeout`."
    )


def served_metadata(result: MaskResult, model: str) -> dict[str, Any]:
    """`result.metadata()` as a client sees it: `model` is the served model's name, not a server path."""
    return {**result.metadata(), "model": model}


def inference_time(result: MaskResult) -> float:
    """Seconds the library call took, from the result's timings (decode to render)."""
    return round(float(result.timings.get("total", 0.0)), 6)
