"""Fetch an image URL safely: the guard against server-side request forgery. Returns bytes, decodes nothing.

- Only `http` and `https` URLs are fetched, their host written plainly (`urls.parse_url`: no '%', which httpx keeps
  and no resolver reads: a percent-encoded name, an IPv6 zone such as `%25eth0`).
- The host is resolved once, here, and EVERY address it resolves to is checked (`automask.imageio.addresses`:
  private, loopback, link-local, cloud metadata and every other address that is not globally reachable are refused,
  and so are IPv6 forms that embed one, NAT64 through `settings.nat64_prefixes` included).
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
import re
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
    ImageDecodeError,
    ImageTooLargeError,
    PrivateAddressError,
    URLRefusedError,
)
from automask.imageio.addresses import NEVER_FETCHED as NEVER_FETCHED
from automask.imageio.addresses import SPECIAL_PURPOSE as SPECIAL_PURPOSE
from automask.imageio.addresses import (  # the address checks were first defined here: still importable from here
    AddressCheck,
    IPAddress,
    Prefixes,
    blocked_reason,
    default_policy,
    never_fetched,
    resolve_host,
    with_article,
)
from automask.imageio.content_coding import CodingError, Inflater
from automask.imageio.unreadable import other_format
from automask.imageio.urls import parse_url, port_of, redirect_target, show, shown_host
from automask.settings import Settings

Resolver = Callable[[str, int], Sequence[IPAddress]]

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
    check = is_allowed or default_policy(settings)
    deadline = time.monotonic() + settings.fetch_timeout
    current = first = parse_url(url)
    for _hop in range(settings.max_redirects + 1):
        resolving = _by_deadline(resolve, deadline, current, settings)
        addresses = _checked_addresses(current, resolving, check, settings.nat64_prefixes)
        outcome = _get(current, addresses, deadline, settings)
        if isinstance(outcome, bytes):
            return outcome
        current = redirect_target(current, outcome)
    setting = settings.name_of("max_redirects")
    if not settings.max_redirects:
        raise FetchError(f"The image URL {show(first)} redirected, and redirects are not followed ({setting}=0).")
    raise FetchError(f"The image URL {show(first)} redirected more than {settings.max_redirects} times ({setting}).")


def check_url(url: str, settings: Settings) -> None:
    """The checks of `fetch_url` that need no network, for a URL fetched later (a stored v2 job): the scheme and
    host (`parse_url`) and, for a host spelled as an address, that address. Raises URLRefusedError. A host name is
    not looked up here: its addresses are checked when it is fetched."""
    parsed = parse_url(url)
    addresses = resolve_host(parsed.raw_host.decode("ascii"), port_of(parsed), numeric_only=True)
    if addresses:
        _checked_addresses(parsed, lambda _h, _p: addresses, default_policy(settings), settings.nat64_prefixes)


def _checked_addresses(url: httpx.URL, resolve: Resolver, check: AddressCheck, nat64: Prefixes) -> list[IPAddress]:
    """Resolve the URL's host once; refuse it if ANY of its addresses is refused by `check` (the refusal says why,
    reading the NAT64 prefixes `nat64` as `check` does)."""
    host = url.raw_host.decode("ascii")
    addresses = list(resolve(host, port_of(url)))
    if not addresses:
        raise FetchError(f"The image URL's host {host!r} resolves to no address.")
    for ip in addresses:
        if not check(ip):
            where = f"{host} is" if host == str(ip) else f"{host} resolves to {ip},"
            reason = with_article(blocked_reason(ip, nat64) or "refused")
            message = f"Refused the image URL {show(url)}: {where} {reason} address."
            if never_fetched(ip, nat64):  # whatever the settings
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
                    where = shown_host(url)
                    raise FetchError(f"Could not connect to the image URL's server {where} ({exc}).") from None
                continue
            raise FetchError(f"Fetching the image URL {show(url)} failed: {exc}.") from None
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
    hooks = {"response": [_stop_at_redirect]}
    try:
        with (
            watchdog,
            httpx.Client(
                trust_env=False, verify=verify, follow_redirects=False, timeout=timeout, event_hooks=hooks
            ) as c,
            c.stream("GET", pinned, headers=headers, extensions=extensions) as response,
        ):
            if not 200 <= response.status_code < 300:
                raise FetchError(
                    f"The image URL {show(url)} answered HTTP {response.status_code} {response.reason_phrase}."
                )
            body = _read_capped(response, url, deadline, settings)
            _check_not_a_page(response, body, url)
            return body
    except _Redirected as redirect:
        return redirect.location


_PAGE_TYPES = ("text/html", "application/xhtml+xml")
_PAGE_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*<")
"""How a web page's text starts (a UTF-8 byte order mark and white space aside), and no image file automask reads."""


def _check_not_a_page(response: httpx.Response, body: bytes, url: httpx.URL) -> None:
    """Raise `ImageDecodeError` saying so when `url` answered a web page (an HTML media type, and a body that starts
    as markup does: an image mislabelled text/html is still read, an SVG drawing so labelled is named as one by
    `unidentified_message`), as the link of the page that shows an image does."""
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in _PAGE_TYPES and _PAGE_START.match(body) and other_format(body) is None:
        raise ImageDecodeError(
            f"The image URL {show(url)} answered a web page ({media_type}), not an image: open the page in a "
            "browser, right-click the image and copy the image's own address (it often ends in .jpg, .png or "
            ".webp), or send the image's data."
        )


class _Redirected(Exception):
    """Not an error: how `_stop_at_redirect` hands a redirect's Location over to `_get_from`."""

    def __init__(self, location: str) -> None:
        self.location = location


def _stop_at_redirect(response: httpx.Response) -> None:
    """httpx's response hook: a redirect ends the request here, its Location handed over as it was sent (httpx
    would next parse it for a request that is never made, and refuse some with its own generic message: "Invalid
    URL in location header: Invalid IDNA hostname"); `_redirect_target` reads and checks it."""
    if response.status_code in _REDIRECTS and "location" in response.headers:
        raise _Redirected(response.headers["location"])


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
        raise FetchError(f"The image at {show(url)} could not be read: {exc}.") from None
    return bytes(body)


def _remaining(deadline: float, url: httpx.URL, settings: Settings) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(url, settings)
    return left


def _timeout(url: httpx.URL, settings: Settings) -> FetchTimeoutError:
    return FetchTimeoutError(
        f"Fetching the image URL {show(url)} took longer than {settings.fetch_timeout:g} s "
        "(AUTOMASK_FETCH_TIMEOUT). Try again, or send the image data instead."
    )


def _too_large(url: httpx.URL, size: str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"The image at {show(url)} is {size}; the limit is {limit:,} bytes (AUTOMASK_MAX_IMAGE_BYTES)."
    )
