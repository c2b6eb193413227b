"""A run told to stop ends its running ONNX Runtime call (`RunOptions.terminate`): a slow graph shaped like the
embedded model's, loaded through the embedded backend's own loading code."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import automask.stopping
from automask.backends import subject
from automask.errors import StoppedError
from automask.feature_cache import image_digest
from automask.pipeline import MaskGenerator
from automask.settings import Settings

onnx = pytest.importorskip("onnx")


def slow_graph(nodes: int) -> bytes:
    """An ONNX graph with U²-Net-p's inputs and outputs (x 1×3×320×320 float32 -> d0 1×1×320×320 in [0, 1]) that
    takes long: `nodes` MatMuls by one 320×320 orthogonal matrix, one after the other (ONNX Runtime looks at its
    terminate flag between nodes), then the mean over the channels and a sigmoid."""
    from onnx import TensorProto, helper, numpy_helper

    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(320, 320)))
    consts = [
        numpy_helper.from_array(q.astype(np.float32), "w"),
        numpy_helper.from_array(np.array([960, 320], np.int64), "rows"),
        numpy_helper.from_array(np.array([1, 3, 320, 320], np.int64), "image"),
        numpy_helper.from_array(np.array([1], np.int64), "channels"),
    ]
    graph = [helper.make_node("Reshape", ["x", "rows"], ["h0"])]
    graph += [helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(nodes)]
    graph += [
        helper.make_node("Reshape", [f"h{nodes}", "image"], ["y"]),
        helper.make_node("ReduceMean", ["y", "channels"], ["mean"], keepdims=1),
        helper.make_node("Sigmoid", ["mean"], ["d0"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 320, 320])
    d0 = helper.make_tensor_value_info("d0", TensorProto.FLOAT, [1, 1, 320, 320])
    model = helper.make_model(
        helper.make_graph(graph, "slow", [x], [d0], consts), opset_imports=[helper.make_opsetid("", 18)]
    )
    return bytes(model.SerializeToString())


class Watched:
    """An ONNX Runtime session whose `run` counts the calls running now."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.running = 0

    def run(self, *args: Any) -> Any:
        self.running += 1
        try:
            return self.session.run(*args)
        finally:
            self.running -= 1


def test_an_onnx_call_told_to_stop_from_another_thread_ends_early(
    tmp_path: Path, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop is asked for from another thread a tenth of the way into the encode's one ONNX Runtime call: the
    call ends, the run raises `StoppedError`, nothing is cached, and the session answers
    the next run as before. Before: the call ran to its end; the stop came at the boundary after it."""
    folder = tmp_path / "subject"
    folder.mkdir()
    (folder / subject.MODEL_FILE).write_bytes(slow_graph(800))
    backend = subject.load(folder, Settings(data_dir=tmp_path / "data"))
    backend.session = session = Watched(backend.session)
    t = time.perf_counter()
    reference = MaskGenerator(backend).generate(coffee, "subject")
    whole = time.perf_counter() - t
    monkeypatch.setattr(automask.stopping, "INSIDE_EVERY", 0.0)
    told = threading.Event()
    timer = threading.Timer(whole / 10, told.set)
    gen = MaskGenerator(backend)
    t = time.perf_counter()
    timer.start()
    with pytest.raises(StoppedError):
        gen.generate(coffee, "subject", should_stop=told.is_set)
    stopped_after = time.perf_counter() - t
    assert told.is_set() and stopped_after < whole / 2, (stopped_after, whole)
    assert session.running == 0  # the call ended before the run raised
    assert gen.cache.get(gen.cache.key(backend, image_digest(coffee))) is None
    again = gen.generate(coffee, "subject", should_stop=lambda: False)
    assert np.array_equal(again.mask, reference.mask) and reference.mask.any()
