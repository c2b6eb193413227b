"""ONNX Runtime set-up shared by the ONNX backends: session options for small CPUs and the errors a graph load
raises. onnxruntime is imported inside the functions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from automask.settings import Settings


def physical_cores() -> int:
    """Physical CPU cores this process may run on (SMT siblings counted once); at least 1."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def session_options(settings: Settings) -> Any:
    """ONNX Runtime options for small CPUs: an intra-op pool of `settings.threads` (default: the physical
    cores), no inter-op parallelism, sequential execution, every graph optimisation, and no spinning: idle
    ORT threads sleep instead of busy-waiting, leaving the cores to the HTTP server and the post-processing
    between graph runs (on a busy 2-core machine this halved the end-to-end time)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def load_errors() -> tuple[type[Exception], ...]:
    """What `InferenceSession(path)` raises for a missing or damaged graph: OSError and ONNX Runtime's own
    exception classes (which derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph", "RuntimeException")
    found = tuple(cls for n in names if isinstance(cls := getattr(state, n, None), type) and issubclass(cls, Exception))
    return (OSError, *found)
