"""The command line's exit codes: which error exits with which code (`EXIT_CODES`, `exit_code`) and the table
`--help` shows (`EPILOG`); README's exit-code table says the same."""

from __future__ import annotations

import signal

from automask import errors
from automask.cli_io import OutputError
from automask.errors import AutomaskError, InvalidOptionError

EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 70, 130
EXIT_CODES: dict[type[AutomaskError], int] = {
    InvalidOptionError: 2,
    errors.ImageDecodeError: 3,
    errors.ImageTooLargeError: 3,
    errors.URLRefusedError: 3,
    errors.UnknownModelError: 4,
    errors.ModelNotAvailableError: 4,
    errors.MissingDependencyError: 4,
    errors.EmptyMaskError: 5,
    errors.FetchError: 6,
    errors.FetchTimeoutError: 6,
    errors.InferenceTimeoutError: 7,
    errors.StoppedError: 7,
    OutputError: 8,
    errors.ServiceConfigError: 9,
    errors.ModelBusyError: 10,
}
"""Error class -> exit code; a subclass gets its nearest listed base's code, any other AutomaskError 1."""

EXIT_HELP = (
    (0, "success"),
    (1, "batch: one or more files failed (any other error: see below)"),
    (2, "usage error or invalid option"),
    (3, "the image cannot be read or decoded, its URL is refused, or it is too large"),
    (4, "the model is unknown, not installed, or needs a package that is missing"),
    (5, "nothing was selected and --stop-on-empty-mask was given"),
    (6, "fetching the image URL failed or timed out"),
    (7, "inference ran past its time limit or was stopped"),
    (8, "the output could not be written (batch: a full disk or quota stops the run)"),
    (
        9,
        "serve/worker/keys/db: the database cannot be reached or needs `automask db migrate`, a service setting is "
        "missing, or serve cannot listen on --host/--port (e.g. the port is in use) or start",
    ),
    (10, "models rm: a pull, an export or another removal of the model is running, or a run is loading it"),
    (EXIT_INTERNAL, "internal error (run with --debug for the traceback)"),
    (128 + signal.SIGHUP, "the terminal hung up (SIGHUP)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (128 + signal.SIGTERM, "terminated (SIGTERM)"),
)
EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_HELP)
EPILOG += "\n\n\bSettings come from AUTOMASK_* environment variables (AUTOMASK_MODEL, AUTOMASK_DATA_DIR...); flags win."


def exit_code(exc: AutomaskError) -> int:
    """The exit code for `exc` (see `EXIT_CODES`)."""
    return next((EXIT_CODES[c] for c in type(exc).__mro__ if c in EXIT_CODES), EXIT_FAILED)
