"""Inference off the event loop: one `MaskGenerator`, a bounded thread pool, and a time limit per call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from automask.errors import AutomaskError, InferenceTimeoutError, ModelNotAvailableError
from automask.imageio import ImageSource
from automask.options import MaskOptions
from automask.pipeline import MaskGenerator
from automask.result import MaskResult
from automask.server.config import ServerSettings
from automask.settings import Settings

log = logging.getLogger("automask.server")

RETRY_LOAD_AFTER = 5.0
"""Seconds before a failed model load is tried again (a model pulled while the server runs is picked up)."""


class Runner:
    """Runs `MaskGenerator.generate` in at most `concurrency` threads, each call within `timeout` seconds.

    The model loads in the background at start-up (`start_loading`); until it has, calls wait for it. A load
    that failed (model not installed...) makes calls raise `ModelNotAvailableError` (503) and is retried.
    """

    def __init__(self, settings: Settings, server: ServerSettings, generator: MaskGenerator | None = None) -> None:
        self.settings = settings
        self.server = server
        self._generator = generator
        self._error: AutomaskError | None = None
        self._failed_at = 0.0
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=server.concurrency, thread_name_prefix="automask-infer")

    @property
    def ready(self) -> bool:
        """True once the model is loaded."""
        return self._generator is not None

    @property
    def model_id(self) -> str | None:
        """What the loaded model is (a hub name or a folder), or None before it has loaded."""
        return self._generator.backend.model_id if self._generator is not None else None

    @property
    def error(self) -> AutomaskError | None:
        """Why the model is not loaded (None while loading, or once loaded)."""
        return None if self._generator is not None else self._error

    def start_loading(self) -> None:
        """Load the model in a pool thread now, so the first request does not pay for it."""
        self.pool.submit(self._load_quietly)

    def _load_quietly(self) -> None:
        with contextlib.suppress(AutomaskError):  # kept in self._error: answered 503, shown by /readyz
            self.generator()

    def generator(self) -> MaskGenerator:
        """The loaded generator; loads it (once, thread-safe) if needed. Raises `ModelNotAvailableError`."""
        with self._lock:
            if self._generator is not None:
                return self._generator
            if self._error is not None and time.monotonic() - self._failed_at < RETRY_LOAD_AFTER:
                raise self._error
            try:
                self._generator = MaskGenerator(self.settings.model, self.settings)
                log.info("model loaded: %s", self._generator.backend.model_id)
            except AutomaskError as exc:
                self._error = ModelNotAvailableError(f"The server's model is not available. {exc.message}")
                self._failed_at = time.monotonic()
                log.error("model not loaded: %s", exc.message)
                raise self._error from None
            return self._generator

    def _generate(self, image: ImageSource, prompt: str, options: MaskOptions) -> tuple[MaskResult, float]:
        generator = self.generator()
        t0 = time.perf_counter()
        if self.server.debug_delay:
            time.sleep(self.server.debug_delay)
        result = generator.generate(image, prompt, options)
        return result, time.perf_counter() - t0

    async def run(self, image: ImageSource, prompt: str, options: MaskOptions) -> tuple[MaskResult, float]:
        """`generate` in a pool thread; returns the result and the seconds it took.

        Raises the library's `AutomaskError`s, and `InferenceTimeoutError` after `timeout` seconds (queueing
        included); a call already running then finishes in its thread and its result is dropped.
        """
        future = self.pool.submit(self._generate, image, prompt, options)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.server.timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise InferenceTimeoutError(
                f"Masking took longer than the server's limit of {self.server.timeout:g} s. "
                "Try a smaller image, or raise the limit with `automask serve --timeout`."
            ) from None

    def close(self) -> None:
        """Stop taking work; calls already running finish in their threads."""
        self.pool.shutdown(wait=False, cancel_futures=True)
