"""Process plumbing for tests/services.py: free loopback ports, /proc process trees, a Service base class.

A `Service` runs from a fresh temporary folder; `start()` waits a bounded time (ServiceError with the log tail
otherwise) and `stop()` ends every process, removes the folder and is idempotent. Servers still running when the
interpreter exits (a fixture finalizer that never ran) are stopped by an atexit hook.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import pytest

APT_INSTALL = "apt-get install -y postgresql redis-server rabbitmq-server"
LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ServiceError(RuntimeError):
    """A test server did not start or stop in time; the message ends with its log tail."""


def unavailable(reason: str) -> NoReturn:
    """Skip the test (fail under CI, where every test must run), like web_helpers.require_browser."""
    if os.environ.get("CI"):
        pytest.fail(f"service tests must run in CI: {reason}")
    pytest.skip(reason)


def require_binary(name: str) -> str:
    """The path of executable `name` (a bare name or an absolute path); skip/fail naming the apt-get fix."""
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} not found: install the servers with `sudo {APT_INSTALL}`")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:`port` and a server could bind it."""
    with socket.socket() as probe:
        probe.settimeout(1)
        if probe.connect_ex((LOOPBACK, port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants (read from /proc), root first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid_alive(pid):
            tree.append(pid)
            todo.extend(children.get(pid, []))
    return tree


def signal_all(pids: list[int], sig: int) -> None:
    """Send `sig` to each of `pids`, skipping one that has ended since it was listed (a backend closing)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def spawn(cmd: list[str], log: Path, user: str | None = None, **popen: Any) -> subprocess.Popen[bytes]:
    """Start a server in its own session, its output appended to `log`, as `user` (root only) when given.

    The kernel SIGTERMs it when the thread that started it ends, so even a killed test run leaves no server
    behind: start servers from the main thread (fixtures do) or a thread that outlives them.
    """
    ids = pwd.getpwnam(user) if user else None
    parent, prctl = os.getpid(), ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        if ids is not None:
            os.setgroups([])
            os.setgid(ids.pw_gid)
            os.setuid(ids.pw_uid)
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # after setuid, which clears it
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=preexec, **popen,
        )  # fmt: skip


def reap(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Wait for `proc` to exit, SIGKILLing its process group when it takes longer than `timeout` seconds."""
    if proc is None:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Service:
    """One throwaway server: `start()` (bounded wait), `url`, `stop()` (idempotent, leaves nothing behind)."""

    name: ClassVar[str] = "service"
    log_name: ClassVar[str] = "server.log"
    _running: ClassVar[set[Service]] = set()  # stopped at interpreter exit if a fixture's finalizer never ran

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.port = 0
        self.workdir: Path | None = None
        self.startup_s = float("nan")  # seconds from start() to ready, temp folder creation included
        self.pids: list[int] = []  # the processes it runs, read once it is ready

    @property
    def log(self) -> Path:
        """The server's log file (its tail ends every ServiceError)."""
        return (self.workdir or Path("/nonexistent")) / self.log_name

    def start(self) -> Service:
        t0 = time.perf_counter()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"automask-{self.name}-"))
        Service._running.add(self)
        try:
            self._start(self.workdir)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        self.pids = process_tree(self._main_pid())
        return self

    def stop(self) -> None:
        if self.workdir is None:
            return
        try:
            self._stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            Service._running.discard(self)

    def _start(self, workdir: Path) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _main_pid(self) -> int:
        raise NotImplementedError

    def _wait(self, ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Poll `ready` until it is true; raise with the log tail on time-out or as soon as `proc` exits."""
        deadline = time.monotonic() + self.timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise ServiceError(f"{self.name}: {what} exited with {proc.returncode}; log:\n{tail(self.log)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name}: {what} not ready after {self.timeout:.0f} s; log:\n{tail(self.log)}")
            time.sleep(0.05)

    def _run(self, cmd: list[str], **kwargs: Any) -> str:
        """Run a control command to completion (bounded); its stdout, or ServiceError with its output + log tail."""
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, **kwargs)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{self.name}: {cmd[0]} ran past {self.timeout:.0f} s; log:\n{tail(self.log)}") from exc
        if done.returncode != 0:
            raise ServiceError(
                f"{self.name}: {' '.join(cmd)} exited with {done.returncode}:\n{done.stdout}{done.stderr}\n"
                f"log:\n{tail(self.log)}"
            )
        return done.stdout


def require_module(module: str, pip_name: str) -> None:
    """Skip (fail under CI) when a client library is missing."""
    try:
        __import__(module)
    except ImportError:
        unavailable(f"the {module} client is missing: pip install '{pip_name}'")


@atexit.register
def _stop_leftovers() -> None:
    for server in list(Service._running):
        server.stop()
