"""A server without API keys (`--no-auth`) answers only requests addressed to this machine: `only_this_machine`,
a dependency of every route (`automask.server.routes`)."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from fastapi import Request

from automask.server.errors import ApiError, shown
from automask.server.state import state_of

THIS_MACHINE = ("localhost",)
"""The host names a server without keys answers to (any port), besides loopback addresses and its public URL's."""
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/@\s]+)(?::([0-9]{1,5}))?")
"""A Host header (or an origin's netloc): the host name or bracketed IPv6 address, and the port."""


async def only_this_machine(request: Request) -> None:
    """Without API keys (`--no-auth`) anyone who reaches the port uses the service, and so could a web page open in
    the user's browser: another site posting to 127.0.0.1 (CSRF) or a name of its own resolved to 127.0.0.1 (DNS
    rebinding). So with auth off, answer 403 unless the `Host` is this machine (a loopback address, localhost: any
    port) or the public URL's host, and any `Origin` is the `Host`'s own (or the public URL's): only programs on this
    machine and the page the server serves itself get in. With API keys, the key decides and this checks nothing."""
    state = state_of(request)
    if state.server.auth:
        return
    public = _origin(state.server.public_url or "")
    hosts = request.headers.getlist("host")
    host = _host_and_port(hosts[0]) if len(hosts) == 1 else None
    if host is None or (not _is_this_machine(host[0]) and (public is None or host[0] != public[1])):
        given = repr(shown(hosts[0])) if len(hosts) == 1 else f"{len(hosts)} Host headers"
        port = (request.scope.get("server") or (None, state.server.port))[1]
        raise ApiError(
            403,
            f"This server runs without API keys (--no-auth), so it answers only requests to this machine: Host "
            f"127.0.0.1, [::1] or localhost (or the --public-url host), not {given}. Use http://127.0.0.1:{port}, "
            "or serve with API keys (automask keys create).",
        )
    origin = request.headers.get("origin")
    theirs = _origin(origin) if origin is not None else None
    own = _origin(f"{request.scope.get('scheme', 'http')}://{hosts[0]}")
    if origin is not None and (theirs is None or theirs not in (own, public)):
        raise ApiError(
            403,
            f"This server runs without API keys (--no-auth), so it answers no web page but its own: the request came "
            f"from {shown(origin)!r}. Serve with API keys (automask keys create) to be called from other sites.",
        )


def _is_this_machine(host: str) -> bool:
    """Whether `host` (as `_host_and_port` gives it) names this machine: localhost, or a loopback address (127.0.0.0/8,
    ::1, as `--no-auth` may be bound to any), which no DNS name of another's can pass for."""
    if host in THIS_MACHINE:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_and_port(value: str) -> tuple[str, int | None] | None:
    """(host name lower-cased without the trailing dot of its fully qualified spelling, IPv6 without brackets; port
    or None) of a Host header; None if it is not one."""
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return None
    host = match.group(1).lower()
    if host.startswith("["):
        host = host[1:-1]
    elif len(host) > 1:
        host = host.removesuffix(".")  # "localhost.", "example.com.": the same hosts
    return host, int(match.group(2)) if match.group(2) else None


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host as `_host_and_port` gives it, port) of an http(s) origin or URL; None for anything else (the
    "null" origin of a sandboxed frame or a file: page)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # e.g. an unclosed [
        return None
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    host = _host_and_port(parts.netloc) if default else None
    return None if default is None or host is None else (scheme, host[0], host[1] or default)
