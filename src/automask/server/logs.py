"""The service's logging: text lines on stderr, and the access log as one JSON object per line.

A client chooses parts of what the service logs (a request's path, its method): control characters in a text line's
message are escaped, so no client can end a line early and forge another. A traceback still follows its line.
"""

from __future__ import annotations

import logging
import sys

_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


class OneLineFormatter(logging.Formatter):
    """`logging.Formatter` whose message stays on one line: control characters are escaped (`\\n`, `\\x1b`...)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPES)
        return super().formatMessage(record)


def configure_logging(level: str) -> None:
    """Service logs as text on stderr (one line per record, `OneLineFormatter`); the access log as one JSON object
    per line; alembic's start-up INFO lines only at `debug`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    access = logging.getLogger("automask.server.access")
    json_lines = logging.StreamHandler(sys.stderr)
    json_lines.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(json_lines)
    access.propagate = False
    if level != "debug":  # alembic says INFO on every start, a migration or not (`ensure_schema` logs one)
        logging.getLogger("alembic").setLevel(logging.WARNING)


def one_line(exc: BaseException) -> str:
    """`exc`'s text on one line, at most 300 characters, for a log line or a reason (SQLAlchemy's: the driver's own
    error, without the statement); its class's name when it has none."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:300] or type(exc).__name__


class Failures:
    """The log of a loop that retries (a sweep, a heartbeat) while, say, the database is down: the first failure in a
    row with its traceback, each next one as one line (the error, and how many in a row), and the first success after
    them as one line, instead of a traceback of some 40 lines every few seconds for the whole outage."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.log, self.what, self.in_a_row = logger, what, 0

    def failed(self, exc: BaseException) -> None:
        """Log `exc`, the loop's latest failure."""
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.log.warning("%s failed; retrying", self.what, exc_info=exc)
        else:
            error = " ".join(str(exc).split())[:300] or type(exc).__name__
            self.log.warning("%s failed again (%d in a row): %s", self.what, self.in_a_row, error)

    def succeeded(self) -> None:
        """The loop's latest attempt worked: say so once after failures."""
        if self.in_a_row:
            self.log.warning("%s works again after %d failure(s)", self.what, self.in_a_row)
            self.in_a_row = 0


class Outage:
    """The log of a dependency that /readyz probes again and again (the database, Redis): one line when it stops
    answering, with why, and one when it answers again, instead of a line per probe (a load balancer probing every
    second from each node) for the whole outage."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.log, self.what, self.down = logger, what, False

    def failed(self, reason: str) -> None:
        """The latest probe found it not answering, for `reason`."""
        if not self.down:
            self.down = True
            self.log.warning("%s does not answer (%s): not ready", self.what, reason)

    def answered(self) -> None:
        """The latest probe found it answering."""
        if self.down:
            self.down = False
            self.log.warning("%s answers again: ready", self.what)
