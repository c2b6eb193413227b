"""HTTP status codes of errors: the one table that maps automask's errors to the codes of CONTRACT.md."""

from __future__ import annotations

import errno

from automask.errors import (
    AutomaskError,
    EmptyMaskError,
    FetchError,
    FetchTimeoutError,
    ImageDecodeError,
    ImageTooLargeError,
    InferenceTimeoutError,
    InvalidOptionError,
    MissingDependencyError,
    ModelNotAvailableError,
    ServiceConfigError,
    StoppedError,
    UnknownModelError,
    URLRefusedError,
)
from automask.errors import shown as shown  # (first defined here: still importable)

STATUS: dict[type[AutomaskError], int] = {
    InvalidOptionError: 400,
    ImageDecodeError: 400,
    URLRefusedError: 400,
    ImageTooLargeError: 413,
    EmptyMaskError: 422,
    UnknownModelError: 404,
    FetchError: 502,
    ModelNotAvailableError: 503,
    MissingDependencyError: 503,
    FetchTimeoutError: 504,
    InferenceTimeoutError: 504,
    StoppedError: 504,
}
"""automask error class -> HTTP status. A subclass takes its nearest listed base's code; unlisted: 400."""


class ApiError(Exception):
    """An error of the HTTP layer itself (keys, credits, limits, unknown ids): a status and a message."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, *, limit: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.limit = limit
        """For a 429: the limit that refused the request (requests, polls, failed_auth, queued_jobs)."""


def status_of(exc: AutomaskError) -> int:
    """The HTTP status for `exc`, from `STATUS` (the nearest listed class in its MRO)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


_LISTEN_HINTS = {
    errno.EADDRINUSE: "the address is already in use. Choose another {port} (or stop the server that holds it).",
    errno.EACCES: "permission denied. Ports below 1024 need privileges: choose another {port}.",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address. Check {host}.",
}


def cannot_listen(host: str, port: int, exc: OSError, host_flag: str, port_flag: str) -> ServiceConfigError:
    """The one-line error of an address that cannot be had (`exc` from binding `host:port`), naming the flags
    (`host_flag`, `port_flag`) that change it."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    hint = _LISTEN_HINTS.get(exc.errno or 0) or f"{exc.strerror or exc}. Check {{host}} and {{port}}."
    reason = hint.replace("{host}", host_flag).replace("{port}", port_flag)  # (strerror may hold braces)
    return ServiceConfigError(f"Cannot listen on {where}: {reason}")
