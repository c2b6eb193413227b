"""README.md (and deploy/README.md) checked against the code and the project's scripts."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_torch_install_commands_that_promise_the_cpu_wheel_use_pytorchs_cpu_index() -> None:
    """PyPI's torch for Linux is a CUDA build whatever the version pin: the CPU wheel comes from PyTorch's index."""
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in ln and "torch==" in ln]
    assert ci and all(cpu_index in ln for ln in ci)
    promise = next(p for p in README.split("\n\n") if "install torch's CPU wheel first" in p)
    assert cpu_index in " ".join(promise.split())
    assert "bash .ci/run" in README and "installs torch's CPU wheel" in README
