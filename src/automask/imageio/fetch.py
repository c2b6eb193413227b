"""Fetch an image URL safely: the guard against server-side request forgery. Returns bytes, decodes nothing.

- Only `http` and `https` URLs are fetched.
- The host is resolved once, here (`socket.getaddrinfo`), and EVERY address it resolves to is checked: private,
  loopback, link-local (169.254.169.254 included), multicast, reserved, unspecified, shared (100.64.0.0/10),
  unique-local (fc00::/7) and site-local addresses are refused, and so are IPv6 forms that embed one (IPv4-mapped,
  6to4, NAT64, Teredo). Every range of IANA's IPv4 and IPv6 special-purpose registries that is not globally
  reachable is listed in `SPECIAL_PURPOSE` and refused whatever Python's `ipaddress` version says. Numeric host
  spellings (`2130706433`, `0x7f.1`, `0177.0.0.1`) are resolved to the address they denote and checked like
  any other.
- The connection goes to the checked address: the URL is rewritten to the IP, the original `Host` header is
  sent, and for https the TLS server name (SNI) and certificate check use the original host name
  (httpcore's `sni_hostname` request extension). No second DNS lookup happens.
- Redirects are followed by hand, at most `settings.max_redirects`, each one resolved and checked again.
- The body is streamed and reading stops past `settings.max_image_bytes`, counted after undoing a gzip or
  deflate `Content-Encoding` (`content_coding`, which never inflates more than that); one deadline of
  `settings.fetch_timeout` seconds covers every hop, each host name lookup included (the system resolver's own
  time limits are its own: seconds per try per name server; a lookup past the deadline is left to finish in its
  thread, at most `DNS_LOOKUPS` of them at once, then waited for).
- `settings.allow_private_urls` turns the address check off, for local use, except for `NEVER_FETCHED` (cloud
  metadata services and link-local addresses, refused whatever the settings).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitedTooLong
from typing import Any

import httpx

from automask.errors import (
    FetchError,
    FetchTimeoutError,
    ImageTooLargeError,
    PrivateAddressError,
    URLRefusedError,
)
from automask.imageio.content_coding import CodingError, Inflater
from automask.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[IPAddress]]
AddressCheck = Callable[[IPAddress], bool]

DNS_LOOKUPS = 16
"""Host name lookups that may be left running past their fetch's deadline: each runs in a thread of its own
(`getaddrinfo` cannot be interrupted), so a resolver that never answers holds at most this many threads beyond the
fetches'. Past it, a fetch whose lookup is stuck waits for it (in its own thread, as without a deadline); no fetch
ever waits for another's lookup."""
_LEFT_BEHIND = threading.BoundedSemaphore(DNS_LOOKUPS)
_REDIRECTS = (301, 302, 303, 307, 308)
_HEADERS = {"User-Agent": "automask", "Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}
"""Sent with every fetch. `identity`: no compression wanted; a server that compresses anyway is read through
`content_coding`, which keeps the byte cap on the decoded bytes."""
_METADATA = (
    ipaddress.ip_network("169.254.169.254/32"),  # AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack
    ipaddress.ip_network("169.254.170.2/32"),  # AWS ECS task credentials
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS over IPv6
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
NEVER_FETCHED = (
    *_METADATA,
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)
"""Refused even with `allow_private_urls` (and in every IPv4-mapped or 6to4 spelling): cloud metadata services,
which hand out the machine's credentials, and the link-local ranges they live in; no image is served from there."""
_NAMED_NETWORKS = (
    *((network, "cloud metadata") for network in _METADATA),
    (ipaddress.ip_network("255.255.255.255/32"), "broadcast"),
    (ipaddress.ip_network("100.64.0.0/10"), "shared (carrier-grade NAT)"),
    (ipaddress.ip_network("fc00::/7"), "unique-local"),
    (ipaddress.ip_network("fec0::/10"), "site-local"),
    (ipaddress.ip_network("64:ff9b::/96"), "NAT64"),
    (ipaddress.ip_network("64:ff9b:1::/48"), "NAT64 (local)"),
)
SPECIAL_PURPOSE: tuple[tuple[str, str, str], ...] = (
    # IANA IPv4 Special-Purpose Address Registry: every entry whose "Globally Reachable" is False or N/A.
    ("0.0.0.0/8", "'this network'", "RFC 791"),
    ("10.0.0.0/8", "private-use", "RFC 1918"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)", "RFC 6598"),
    ("127.0.0.0/8", "loopback", "RFC 1122"),
    ("169.254.0.0/16", "link-local", "RFC 3927"),
    ("172.16.0.0/12", "private-use", "RFC 1918"),
    # whole /24, though 192.0.0.9 (PCP) and .10 (TURN) anycast are global: protocol endpoints, not web servers
    ("192.0.0.0/24", "IETF protocol assignment", "RFC 6890, 7335, 7600, 8880"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)", "RFC 5737"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast", "RFC 7526"),
    ("192.168.0.0/16", "private-use", "RFC 1918"),
    ("198.18.0.0/15", "benchmarking", "RFC 2544"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)", "RFC 5737"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)", "RFC 5737"),
    ("224.0.0.0/4", "multicast", "RFC 5771"),
    ("240.0.0.0/4", "reserved", "RFC 1112"),
    ("255.255.255.255/32", "limited broadcast", "RFC 919, 8190"),
    # IANA IPv6 Special-Purpose Address Registry, likewise (plus multicast and the deprecated site-local).
    ("::/128", "unspecified", "RFC 4291"),
    ("::1/128", "loopback", "RFC 4291"),
    ("::/96", "IPv4-compatible (deprecated)", "RFC 4291"),
    ("::ffff:0:0/96", "IPv4-mapped", "RFC 4291"),
    ("64:ff9b::/96", "NAT64", "RFC 6052"),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation", "RFC 8215"),
    ("100::/64", "discard-only", "RFC 6666"),
    ("100:0:0:1::/64", "dummy IPv6 prefix", "RFC 9780"),
    # whole /23, though a few anycast and identifier blocks inside it (2001:1::1-3, 2001:3::/32, 2001:4:112::/48,
    # 2001:20::/28, 2001:30::/28) are global: none of them serves images
    ("2001::/23", "IETF protocol assignment", "RFC 2928"),
    ("2001::/32", "Teredo tunnel", "RFC 4380"),
    ("2001:2::/48", "benchmarking", "RFC 5180"),
    ("2001:10::/28", "deprecated ORCHID", "RFC 4843"),
    ("2001:db8::/32", "documentation", "RFC 3849"),
    ("2002::/16", "6to4", "RFC 3056"),
    ("3fff::/20", "documentation", "RFC 9637"),
    ("5f00::/16", "segment routing (SRv6) SID", "RFC 9602"),
    ("fc00::/7", "unique-local", "RFC 4193"),
    ("fe80::/10", "link-local", "RFC 4291"),
    ("fec0::/10", "site-local (deprecated)", "RFC 3879"),
    ("ff00::/8", "multicast", "RFC 4291"),
)
"""(network, what it is, where it is defined): address ranges that are not globally reachable, checked whatever
Python's `ipaddress` tables say (3.11.7's miss 192.0.0.0/24 outside the /29, 192.88.99.0/24 and 3fff::/20).
IPv4-mapped and 6to4 addresses never reach this table: the IPv4 address they embed is checked instead."""
_SPECIAL = tuple((ipaddress.ip_network(net), f"{name} ({rfc})") for net, name, rfc in SPECIAL_PURPOSE)
_FLAGS = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


def blocked_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be fetched from (e.g. "loopback"), or None for a public, globally routable address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            inner = blocked_reason(ip.ipv4_mapped)
            return f"IPv4-mapped {inner}" if inner else None
        if ip.sixtofour is not None:
            inner = blocked_reason(ip.sixtofour)
            return f"6to4 tunnel to a {inner}" if inner else None
        if ip.teredo is not None:
            return "Teredo tunnel"
    for network, name in _NAMED_NETWORKS:
        if ip.version == network.version and ip in network:
            return name
    for flag, name in _FLAGS:
        if getattr(ip, flag):
            return name
    for network, name in _SPECIAL:
        if ip.version == network.version and ip in network:
            return name
    return None if ip.is_global else "not globally routable"


def resolve_host(host: str, port: int, *, numeric_only: bool = False) -> list[IPAddress]:
    """Every address `host` resolves to for TCP (once, through the system resolver), in resolver order.
    `numeric_only`: only a host spelled as an address ('10.0.0.1', '2130706433', '0x7f.1', '::1') is resolved,
    with no lookup at all; a host name gives []."""
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST if numeric_only else 0
        )
    except (socket.gaierror, UnicodeError) as exc:
        if numeric_only:
            return []
        raise FetchError(f"Could not resolve the image URL's host {host!r}: {exc}.") from None
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def fetch_url(
    url: str,
    settings: Settings,
    *,
    resolve: Resolver = resolve_host,
    is_allowed: AddressCheck | None = None,
) -> bytes:
    """GET `url` through the guard and return the body (at most `settings.max_image_bytes` bytes).

    `resolve` and `is_allowed` are seams for tests and embedders: the resolver called once per hop, and the
    address policy (default: public addresses only, or any with `settings.allow_private_urls`).
    Raises URLRefusedError, FetchError, FetchTimeoutError or ImageTooLargeError.
    """
    check = is_allowed or _default_policy(settings)
    deadline = time.monotonic() + settings.fetch_timeout
    current = first = parse_url(url)
    for _hop in range(settings.max_redirects + 1):
        addresses = _checked_addresses(current, _by_deadline(resolve, deadline, current, settings), check)
        outcome = _get(current, addresses, deadline, settings)
        if isinstance(outcome, bytes):
            return outcome
        current = _redirect_target(current, outcome)
    raise FetchError(f"The image URL {_show(first)} redirected more than {settings.max_redirects} times.")


def check_url(url: str, settings: Settings) -> None:
    """The checks of `fetch_url` that need no network, for a URL fetched later (a stored v2 job): the scheme and
    host (`parse_url`) and, for a host spelled as an address, that address. Raises URLRefusedError. A host name is
    not looked up here: its addresses are checked when it is fetched."""
    parsed = parse_url(url)
    addresses = resolve_host(parsed.raw_host.decode("ascii"), _port(parsed), numeric_only=True)
    if addresses:
        _checked_addresses(parsed, lambda _host, _port: addresses, _default_policy(settings))


def parse_url(url: str) -> httpx.URL:
    """Parse an http(s) URL with a host; anything else raises URLRefusedError."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError) as exc:
        raise URLRefusedError(f"Refused the image URL {_short(url)}: it is not a valid URL ({exc}).") from None
    if parsed.scheme not in ("http", "https"):
        raise URLRefusedError(
            f"Refused the image URL {_show(parsed)}: only http:// and https:// URLs are fetched "
            f"(got {parsed.scheme + '://' if parsed.scheme else 'no scheme'}). Send the image data instead."
        )
    if not parsed.raw_host:
        raise URLRefusedError(f"Refused the image URL {_show(parsed)}: it has no host.")
    return parsed


def _redirect_target(current: httpx.URL, location: str) -> httpx.URL:
    """The URL a redirect's Location points to (relative to `current`), checked like the first one."""
    try:
        target = current.join(location)
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise FetchError(f"The image URL {_show(current)} redirected to an invalid URL ({exc}).") from None
    return parse_url(str(target))


def never_fetched(ip: IPAddress) -> bool:
    """Whether `ip` (or the IPv4 address an IPv4-mapped, 6to4 or NAT64 address embeds) is in `NEVER_FETCHED`."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return never_fetched(inner)
    return any(ip.version == network.version and ip in network for network in NEVER_FETCHED)


def _default_policy(settings: Settings) -> AddressCheck:
    if settings.allow_private_urls:
        return lambda ip: not never_fetched(ip)
    return lambda ip: blocked_reason(ip) is None


def _checked_addresses(url: httpx.URL, resolve: Resolver, check: AddressCheck) -> list[IPAddress]:
    """Resolve the URL's host once; refuse it if ANY of its addresses is refused by `check`."""
    host = url.raw_host.decode("ascii")
    addresses = list(resolve(host, _port(url)))
    if not addresses:
        raise FetchError(f"The image URL's host {host!r} resolves to no address.")
    for ip in addresses:
        if not check(ip):
            where = f"{host} is" if host == str(ip) else f"{host} resolves to {ip},"
            message = f"Refused the image URL {_show(url)}: {where} a {blocked_reason(ip) or 'refused'} address."
            if never_fetched(ip):  # whatever the settings
                raise URLRefusedError(f"{message} automask never fetches from cloud metadata or link-local addresses.")
            raise PrivateAddressError(
                f"{message} automask fetches only public addresses; for local use set AUTOMASK_ALLOW_PRIVATE_URLS=true."
            )
    return addresses


def _by_deadline(resolve: Resolver, deadline: float, url: httpx.URL, settings: Settings) -> Resolver:
    """`resolve`, given until `deadline` (then `FetchTimeoutError`): it runs in a daemon thread, left to finish on
    its own if the deadline passes first while fewer than `DNS_LOOKUPS` are left so (else waited for)."""

    def within(host: str, port: int) -> Sequence[IPAddress]:
        left = _remaining(deadline, url, settings)
        answer: Future[Sequence[IPAddress]] = Future()

        def lookup() -> None:
            try:
                answer.set_result(resolve(host, port))
            except Exception as exc:  # noqa: BLE001 (raised again by the fetch that waits for it)
                answer.set_exception(exc)

        threading.Thread(target=lookup, name="automask-dns", daemon=True).start()
        try:
            return answer.result(timeout=left)
        except WaitedTooLong:  # (the builtin TimeoutError from Python 3.11 on)
            if _LEFT_BEHIND.acquire(blocking=False):
                answer.add_done_callback(lambda _: _LEFT_BEHIND.release())
            else:  # as many stuck lookups as may be left behind: this fetch's thread waits for its own
                answer.exception()
            raise _timeout(url, settings) from None

    return within


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _get(url: httpx.URL, addresses: list[IPAddress], deadline: float, settings: Settings) -> bytes | str:
    """One GET to the first checked address that accepts a connection: the body, or a redirect's Location."""
    for index, ip in enumerate(addresses):
        try:
            return _get_from(url, ip, deadline, settings)
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.TimeoutException) or time.monotonic() >= deadline:  # (the watchdog's cut)
                raise _timeout(url, settings) from None
            if isinstance(exc, httpx.ConnectError):
                if index == len(addresses) - 1:
                    raise FetchError(f"Could not connect to the image URL's server {url.host} ({exc}).") from None
                continue
            raise FetchError(f"Fetching the image URL {_show(url)} failed: {exc}.") from None
    raise AssertionError("unreachable: addresses is never empty")


def _get_from(url: httpx.URL, ip: IPAddress, deadline: float, settings: Settings) -> bytes | str:
    """GET `url` over a connection to `ip` (Host header and TLS server name stay the URL's own host)."""
    pinned = url.copy_with(host=str(ip))
    headers = {**_HEADERS, "Host": url.netloc.decode("ascii")}
    watchdog = _Watchdog(deadline)
    extensions: dict[str, Any] = {"trace": watchdog.trace}
    if url.scheme == "https":
        extensions["sni_hostname"] = url.raw_host.decode("ascii")
    timeout = httpx.Timeout(_remaining(deadline, url, settings))
    # Proxy variables are ignored (a proxy would resolve the name again); SSL_CERT_FILE / SSL_CERT_DIR are
    # honoured. Plain http has no TLS to verify (False skips loading the CA bundle, ~40 ms).
    # A client per hop: no connection (or TLS session) is ever reused for another host name.
    verify = httpx.create_ssl_context(trust_env=True) if url.scheme == "https" else False
    with (
        watchdog,
        httpx.Client(trust_env=False, verify=verify, follow_redirects=False, timeout=timeout) as client,
        client.stream("GET", pinned, headers=headers, extensions=extensions) as response,
    ):
        if response.status_code in _REDIRECTS and "location" in response.headers:
            return response.headers["location"]
        if not 200 <= response.status_code < 300:
            raise FetchError(
                f"The image URL {_show(url)} answered HTTP {response.status_code} {response.reason_phrase}."
            )
        return _read_capped(response, url, deadline, settings)


class _Watchdog:
    """Cuts a fetch's connection at `deadline`. httpx's timeouts are per read, so a server that trickles its
    headers or body a byte at a time would never trip them; this shuts the socket down at the deadline (httpcore's
    `trace` extension hands over the connected socket), which ends any read in progress with an error."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self.sock = sock  # after TLS: the TLS socket, which owns the descriptor now
            if self._timer is None:
                self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._cut)
                self._timer.daemon = True
                self._timer.start()

    def _cut(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self.sock = None


def _read_capped(response: httpx.Response, url: httpx.URL, deadline: float, settings: Settings) -> bytes:
    """Stream the body, undoing a gzip or deflate `Content-Encoding` (`content_coding`: never more than the cap at a
    time); stop past `max_image_bytes` decoded (ImageTooLargeError) or past the deadline."""
    limit = settings.max_image_bytes
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(url, f"{int(declared):,} bytes", limit)
    try:
        inflater = Inflater.for_header(response.headers.get("content-encoding", ""))
        body = bytearray()
        for chunk in response.iter_raw():  # as sent: httpx would inflate each read whole, unbounded
            body += inflater.decode(chunk, limit + 1 - len(body)) if inflater else chunk
            if len(body) > limit:
                raise _too_large(url, f"more than {limit:,} bytes", limit)
            _remaining(deadline, url, settings)
    except CodingError as exc:
        raise FetchError(f"The image at {_show(url)} could not be read: {exc}.") from None
    return bytes(body)


def _remaining(deadline: float, url: httpx.URL, settings: Settings) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(url, settings)
    return left


def _timeout(url: httpx.URL, settings: Settings) -> FetchTimeoutError:
    return FetchTimeoutError(
        f"Fetching the image URL {_show(url)} took longer than {settings.fetch_timeout:g} s "
        "(AUTOMASK_FETCH_TIMEOUT). Try again, or send the image data instead."
    )


def _too_large(url: httpx.URL, size: str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"The image at {_show(url)} is {size}; the limit is {limit:,} bytes (AUTOMASK_MAX_IMAGE_BYTES)."
    )


def _show(url: httpx.URL) -> str:
    """`url` for an error message: credentials left out, shortened."""
    return _short(str(url.copy_with(username=None, password=None)) if url.userinfo else str(url))


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
