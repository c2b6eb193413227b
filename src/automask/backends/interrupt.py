"""Stopping inside a running model stage: the current run's stop check (`automask.stopping`) asked at each
repeated layer of a torch model, and while an ONNX Runtime session runs.

torch and onnxruntime are imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import functools
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from automask.errors import StoppedError
from automask.stopping import current, stop_inside

_HOOKED: weakref.WeakSet[Any] = weakref.WeakSet()
"""The modules that already ask (`stop_at_layers` called again on a model adds no second hook)."""

WATCH_EVERY = 0.05
"""Seconds between two looks at the stop check while an ONNX Runtime call runs (the check itself is throttled:
`automask.stopping.INSIDE_EVERY`)."""
HELPER_THREADS = 32
"""Watched ONNX Runtime calls that run at once, at most (more wait for a thread)."""


def stop_at_layers(model: Any) -> Any:
    """Make `model` (a torch `nn.Module`) ask the current run's stop check before each of its repeated layers, through
    a forward pre-hook registered once: every item that has children of its own in an `nn.ModuleList`, or in an
    `nn.Sequential` of items of one class (a transformer's, an encoder's or a decoder's blocks, a CNN stage's; not a
    `Linear` of a small MLP). Outside a run, or in a run nobody can stop, a hook costs one context variable read.
    Returns `model`."""
    for layer in repeated_layers(model):
        if layer not in _HOOKED:
            layer.register_forward_pre_hook(_ask)
            _HOOKED.add(layer)
    return model


def repeated_layers(model: Any) -> list[Any]:
    """The modules `stop_at_layers` hooks in `model`, in `model.modules()` order."""
    from torch import nn

    found = []
    for module in model.modules():
        one_class = isinstance(module, nn.Sequential) and len({type(m) for m in module}) == 1
        if isinstance(module, nn.ModuleList) or one_class:
            found += [layer for layer in module if next(layer.children(), None) is not None]
    return found


def _ask(module: Any, args: Any) -> None:
    stop_inside()


def run_session(session: Any, outputs: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
    """`session.run(outputs, feeds)` (an ONNX Runtime `InferenceSession`), ended early with `StoppedError` once the
    current run's stop check says so: the call runs in a helper thread while this one asks the check (in the run's
    own thread, as every asking), then sets ONNX Runtime's `RunOptions.terminate`, which ends the call before its
    next node, and waits for it to end. Outside a run, or in one nobody can stop, a plain `session.run`."""
    check = current()
    if check is None:
        return list(session.run(outputs, feeds))
    import onnxruntime as ort

    options = ort.RunOptions()
    future = _helpers().submit(session.run, outputs, feeds, options)
    while True:
        try:
            return list(future.result(timeout=WATCH_EVERY))
        except FutureTimeout:
            if check.inside():
                options.terminate = True
                future.cancel()  # not started yet: never starts
                wait([future])
                raise StoppedError() from None


@functools.cache
def _helpers() -> ThreadPoolExecutor:
    """The threads that run watched ONNX Runtime calls, started on first use and kept (a thread per call would add
    half a millisecond to each)."""
    return ThreadPoolExecutor(HELPER_THREADS, thread_name_prefix="automask-onnx-run")
