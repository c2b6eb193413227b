"""The start-up check of the broker (`check_broker`), a worker's and an API node's: refused at once, naming
AUTOMASK_BROKER_URL and the fix, rather than after Celery's hour of retries ending in a traceback (a worker) or with
every request handed to the workers failing (an API node)."""

from __future__ import annotations

from typing import Any

from automask.errors import ServiceConfigError

BROKER_CONNECT_TIMEOUT = 5.0
"""Seconds a worker or API node starting waits for the broker to accept its connection (`check_broker`)."""
UNREADABLE_BROKER_URL = (
    "AUTOMASK_BROKER_URL is not a broker URL: write it as amqp://USER:PASS@HOST:PORT/VHOST, with any / : @ % in USER "
    "or PASS percent-encoded (/ as %2F)."
)


def broker_connection(url: str) -> Any:
    """kombu's `Connection` to `url`, not yet connected: `ServiceConfigError` naming AUTOMASK_BROKER_URL and its form
    when the broker client cannot read it (checked at every start-up, API node or worker: a request handed over
    would otherwise fail inside kombu, whose reason may quote a misread password's pieces)."""
    from kombu import Connection

    try:
        return Connection(url, connect_timeout=BROKER_CONNECT_TIMEOUT)
    except (ValueError, LookupError):
        raise ServiceConfigError(UNREADABLE_BROKER_URL) from None


def check_broker(url: str) -> None:
    """Connect to the broker (RabbitMQ, or Redis with a redis:// URL) once (`BROKER_CONNECT_TIMEOUT`):
    `ServiceConfigError` naming AUTOMASK_BROKER_URL (without its password) and the fix when it cannot be reached or
    refuses this user or vhost, or when it is no URL the broker client can read (a start-up check: Celery would retry
    for the best part of an hour, then end with a traceback)."""
    from kombu.exceptions import KombuError

    with broker_connection(url) as conn:
        try:
            conn.ensure_connection(max_retries=0)  # one try (1: two, with a 2 s pause between)
        except (OSError, KombuError, *conn.connection_errors, *conn.channel_errors) as exc:
            reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__  # RabbitMQ's end with one
            raise ServiceConfigError(
                f"Cannot connect to the broker at {conn.as_uri()}: {reason}. Check AUTOMASK_BROKER_URL, and that "
                f"{_broker_name(url)} is running and lets this user in."
            ) from None


def _broker_name(url: str) -> str:
    """The broker server `url` names, for messages: Redis for a redis:// (rediss://) URL, else RabbitMQ."""
    return "Redis" if url.lower().startswith(("redis:", "rediss:")) else "RabbitMQ"
