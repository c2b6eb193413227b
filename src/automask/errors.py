"""One error hierarchy for automask.

Every error carries a message a user can act on. Front-ends (CLI, HTTP) map the classes to exit codes
and HTTP status codes at the edge; nothing below them knows about either.
"""

from __future__ import annotations

from collections.abc import Callable


class AutomaskError(Exception):
    """Base class of every error automask raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def shown(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters (with '…'), to echo a client's string in an error message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class InvalidOptionError(AutomaskError, ValueError):
    """An option or parameter is missing, of the wrong type, or out of range (names the field: a name a client
    made up, such as an unknown field's, is quoted cut short)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{shown(field)}: {message}" if field else message)
        self.field, self.reason = field, message


class ImageDecodeError(AutomaskError, ValueError):
    """The input could not be read as an image."""


class ImageTooLargeError(AutomaskError):
    """The input exceeds a configured limit (bytes or pixels)."""


class URLRefusedError(AutomaskError):
    """An image URL was refused by the safety guard (scheme, or an internal address)."""


class PrivateAddressError(URLRefusedError):
    """An image URL was refused for its address (private, loopback, ...): the `allow_private_urls` setting lifts it."""


class FetchError(AutomaskError):
    """The image URL's server failed, or answered with an error."""


class FetchTimeoutError(AutomaskError):
    """Fetching the image URL ran past its time limit."""


class InferenceTimeoutError(AutomaskError):
    """Inference ran past its time limit."""


class StoppedError(AutomaskError):
    """The run was told to stop (its `should_stop` said so at a stage boundary, or inside a model stage: see
    `automask.stopping`): nobody waits for its answer any more (the client left, or its time limit passed)."""

    def __init__(self, message: str = "The run was stopped: nobody waits for its answer any more.") -> None:
        super().__init__(message)


class EmptyMaskError(AutomaskError):
    """`stop_on_empty_mask` was set and nothing was selected."""


class UnknownModelError(AutomaskError, LookupError):
    """A model or backend name that automask does not know (the message lists the valid ones)."""


class ModelNotAvailableError(AutomaskError):
    """A known model that is not installed or cannot be loaded (the message says how to install it)."""


class ModelBusyError(AutomaskError):
    """A model cannot be changed (removed) now: a pull, an export or a removal of it is running (the message says
    which)."""


class ServiceConfigError(AutomaskError):
    """The service cannot start as configured: a database at an older schema, an unreachable broker, a missing
    setting (the message names the fix)."""


class MissingDependencyError(AutomaskError, ImportError):
    """An optional dependency is missing (the message names the `pip install` that fixes it)."""


def stop_if_asked(should_stop: Callable[[], bool] | None) -> None:
    """A stage boundary of a run: raise `StoppedError` when `should_stop` (None: never) returns True."""
    if should_stop is not None and should_stop():
        raise StoppedError()


def require(module: str, extra: str) -> None:
    """Raise `MissingDependencyError` naming `pip install "automask[extra]"` if `module` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"This feature needs the Python package '{module}'. Install it with: pip install \"automask[{extra}]\""
        )
