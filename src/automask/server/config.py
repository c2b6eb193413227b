"""Server settings: `AUTOMASK_SERVER_*` environment variables, then `automask serve` flags."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


MAX_KEY_COUNT = 2**31 - 1
"""The largest credit balance or rate limit a key may have: what the database's INTEGER columns hold (PostgreSQL's
are 32-bit)."""


def is_base_url(url: str) -> bool:
    """Whether `url` is http(s)://HOST[:PORT][/PATH], with no query or fragment: a base for absolute URLs."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port >= 0  # reading the port raises ValueError for one that is no number
    except ValueError:  # an unclosed [ too
        return False
    scheme_ok = parts.scheme.lower() in ("http", "https")
    return scheme_ok and port_ok and bool(parts.hostname) and not parts.query and not parts.fragment


MAX_TIMEOUT = 86400.0
"""The longest inference time limit, a day: no longer is "no limit" (`inf`), which a thread cannot wait for (and the
fleet's hand-offs and credit holds expire after the limit)."""
MAX_WAIT = 3600.0
"""The longest connection timeout, node TTL and sweep interval, an hour: a value past what a thread, timer or socket
can wait for (`inf`, 1e12: about 9.2e9 s on Linux) crashed the thread that waited, so none may be "no limit"."""
RESULT_TTL_MIN = 3600.0
"""v2 results are kept at least an hour after they finish (the external contract's promise to clients)."""
RESULT_TTL_MAX = 365 * 86400.0
"""...and at most a year: no longer is "keep for ever" (`inf`), which fills the database's disk with results no
client fetches."""


def _seconds(default: float, most: float, description: str, *, zero: bool = False) -> Any:
    """A duration setting's field: more than 0 seconds (or 0 and more, with `zero`), at most `most` (an hour or a
    day), which its description states."""
    ceiling = "an hour" if most == MAX_WAIT else "a day"
    return Field(
        default=default,
        gt=None if zero else 0,
        ge=0 if zero else None,
        le=most,
        description=f"{description} ({ceiling} at most).",
    )


class ServerSettings(BaseSettings):
    """How the HTTP service runs. The model, data folder and image limits come from `automask.Settings`."""

    model_config = SettingsConfigDict(
        env_prefix="AUTOMASK_SERVER_", extra="ignore", frozen=True, env_parse_none_str="none"
    )

    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    metrics_host: str = Field(default="127.0.0.1", description="Interface the Prometheus metrics listener binds.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Port of a listener of its own serving Prometheus metrics; None: off."
    )
    concurrency: int = Field(
        default=1, ge=1, le=64, description="Inference threads (v1 requests and v2 jobs share them)."
    )
    job_workers: int | None = Field(default=None, ge=1, le=64, description="v2 jobs run at once; None: `concurrency`.")
    timeout: float = _seconds(60.0, MAX_TIMEOUT, "Seconds one inference may take (queueing included) -> 504")
    auth: bool = Field(
        default=True,
        description="Require an API key. False is allowed only on a loopback host, and then serves only requests to "
        "this machine (Host and Origin checked: `this_machine.only_this_machine`).",
    )
    max_body_bytes: int | None = Field(
        default=None, gt=0, description="Largest request body; None: room for a base64 image of `max_image_bytes`."
    )
    body_memory: int = Field(
        default=1 << 30,
        gt=0,
        description="Bytes of request bodies held in memory at once (one key: a quarter of it, at least one "
        "largest body); a request past it is answered 503 before its body is read.",
    )
    poll_rate_limit: int | None = Field(
        default=6000,
        ge=1,
        description="Requests per minute one key may make to the endpoints it polls (v2 status, response, output "
        "and cancel; /v1/credits, /v1/models), counted apart from its submits -> 429. The default leaves room for a "
        "key's most queued jobs (100) each polled every second, as the segmind SDK does; None: no limit.",
    )
    auth_fail_limit: int | None = Field(
        default=60,
        ge=1,
        description="Failed authentications (missing, unknown or revoked x-api-key) per minute from one client "
        "address (an IPv6 one: its /64; the /64s of a /48 together: 16 times as many); past it that address is "
        "answered 429 before any database read for the rest of the minute, except requests with a key known to be "
        "good: one this process saw succeed lately or, with AUTOMASK_REDIS_URL, one any API node saw succeed within "
        "a day. None: no limit.",
    )
    result_ttl: float = Field(
        default=3600.0,
        ge=RESULT_TTL_MIN,
        le=RESULT_TTL_MAX,
        description="Seconds v2 results are kept after they finish: at least an hour, as CONTRACT.md promises clients, "
        "and at most a year (31536000).",
    )
    cleanup_interval: float = _seconds(60.0, MAX_WAIT, "Seconds between sweeps of expired v2 results")
    max_job_attempts: int = Field(
        default=3, ge=1, description="Starts of one v2 job (restarts included) before FAILED."
    )
    max_queued_per_key: int = Field(default=100, ge=1, description="Unfinished v2 jobs one key may have -> 429.")
    max_queued: int = Field(default=10_000, ge=1, description="Unfinished v2 jobs in all -> 503.")
    max_queued_bytes_per_key: int = Field(
        default=256 << 20,
        gt=0,
        description="Bytes of requests (uploaded or base64 images included) one key's unfinished v2 jobs may hold in "
        "the database -> 429; a key with none queued may always submit one.",
    )
    max_queued_bytes: int = Field(
        default=4 << 30,
        gt=0,
        description="Bytes of requests all unfinished v2 jobs together may hold in the database -> 503; an empty "
        "queue always takes one.",
    )
    sweep_interval: float = _seconds(
        2.0, MAX_WAIT, "Seconds between sweeps: dead nodes' jobs, lost publishes, expired credit holds"
    )
    node_ttl: float = _seconds(10.0, MAX_WAIT, "A node silent this many seconds is dead: its jobs run elsewhere")
    heartbeat_interval: float | None = Field(
        default=None,
        gt=0,
        description="Seconds between a node's heartbeats, at most a third of node_ttl; None: node_ttl / 5.",
    )
    republish_after: float = _seconds(
        30.0,
        MAX_TIMEOUT,
        "A v2 job QUEUED this long after it was stored whose hand-off to the queue was never confirmed "
        "(the queue was unreachable) is handed out again; one put back in the queue is at the next sweep",
    )
    resend_after: float = _seconds(
        900.0,
        MAX_TIMEOUT,
        "A v2 job still QUEUED this long after its hand-off was confirmed is handed out once more (its "
        "message may have been dropped, e.g. by RabbitMQ's delivery limit); a duplicate is never run twice",
    )
    hold_grace: float = _seconds(
        30.0, MAX_TIMEOUT, "Seconds past `timeout` after which an unsettled v1 credit hold is given back", zero=True
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL clients reach the service at (set it behind a proxy); None: the address and port "
        "each connection came in on (never the client's Host header).",
    )
    header_timeout: float = _seconds(
        10.0, MAX_WAIT, "Seconds a client may take to send a request's headers (from connecting) -> closed"
    )
    body_timeout: float = _seconds(
        30.0, MAX_WAIT, "Seconds a client may pause while sending a request body -> 408, closed"
    )
    body_min_rate: float = Field(
        default=1000.0,
        gt=0,
        description="Bytes per second a request body must arrive at on average: it gets `body_timeout` seconds, "
        "plus one second per this many bytes received -> 408, closed (a trickling client cannot hold memory).",
    )
    body_deadline: float = _seconds(
        600.0,  # the largest body by default (~46 MB) arrives in it at 0.65 Mbit/s (at 0.6: ~610 s)
        MAX_WAIT,
        "Seconds a request body may take in all -> 408, closed (its room in `body_memory` no longer held)",
    )
    keepalive_timeout: float = _seconds(5.0, MAX_WAIT, "Seconds an idle keep-alive connection stays open")
    max_connections: int = Field(
        default=512, ge=1, description="Open connections at most (also kept below the open-file limit); more get a 503."
    )
    shutdown_timeout: float = _seconds(
        10.0, MAX_TIMEOUT, "Seconds in-flight requests get to finish after SIGTERM before they are cut off"
    )
    max_header_bytes: int = Field(default=16384, ge=1024, description="Largest request line plus headers -> 431.")
    debug_delay: float = _seconds(
        0.0, MAX_TIMEOUT, "TEST ONLY: seconds every inference sleeps, to exercise timeouts and restarts", zero=True
    )

    @field_validator("public_url")
    @classmethod
    def _absolute_public_url(cls, url: str | None) -> str | None:
        """The v2 URLs are built on it and must be absolute (CONTRACT.md)."""
        if url and not is_base_url(url):
            raise ValueError(
                f"must be an absolute http(s) URL such as https://masks.example.com or http://10.0.0.5:8000/api "
                f"(the base of the v2 status_url, response_url and output URLs), not {url!r}"
            )
        return url

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> ServerSettings:
        if not self.auth and not is_loopback(self.host):
            raise ValueError(
                f"--no-auth is allowed only on a loopback host (127.0.0.1, ::1, localhost), not {self.host!r}. "
                "Create a key with `automask keys create` instead."
            )
        return self

    @model_validator(mode="after")
    def _metrics_host_with_a_port(self) -> ServerSettings:
        if self.metrics_port is None and "metrics_host" in self.model_fields_set:
            raise ValueError(
                f"--metrics-host {self.metrics_host} (AUTOMASK_SERVER_METRICS_HOST) needs --metrics-port "
                "(AUTOMASK_SERVER_METRICS_PORT): metrics are off without a port."
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_well_within_the_ttl(self) -> ServerSettings:
        if self.beat * 3 > self.node_ttl * (1 + 1e-9):  # (0.2 s fits 0.6 s, floats aside)
            raise ValueError(
                f"The heartbeat interval ({self.beat:g} s) must be at most a third of the node TTL "
                f"({self.node_ttl:g} s), or a live node would be taken for dead and its jobs run twice: lower "
                "AUTOMASK_SERVER_HEARTBEAT_INTERVAL or raise AUTOMASK_SERVER_NODE_TTL."
            )
        return self

    @property
    def beat(self) -> float:
        """Seconds between this node's heartbeats: `heartbeat_interval`, else a fifth of `node_ttl` (2 s of 10)."""
        return self.heartbeat_interval or self.node_ttl / 5

    @property
    def root_path(self) -> str:
        """The path prefix a proxy serves the API under, stripping it: `public_url`'s path without its trailing
        slash ('/masks' for https://example.com/masks/); '' for none. The docs page and the OpenAPI document's
        `servers` point under it."""
        return urlsplit(self.public_url).path.rstrip("/") if self.public_url else ""

    @property
    def workers_for_jobs(self) -> int:
        """How many v2 jobs run at once."""
        return self.job_workers or self.concurrency

    def body_limit(self, max_image_bytes: int) -> int:
        """Largest accepted request body: base64 of the largest image plus 1 MiB for the other fields."""
        return self.max_body_bytes or (max_image_bytes * 4 // 3 + 4 + (1 << 20))
