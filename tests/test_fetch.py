"""The URL guard and fetcher, against real sockets on loopback only (no test leaves this machine)."""

from __future__ import annotations

import io
import ipaddress
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from automask.errors import FetchError, FetchTimeoutError, ImageDecodeError, ImageTooLargeError, URLRefusedError
from automask.imageio import fetch, load_image
from automask.imageio.content_coding import Inflater
from automask.imageio.fetch import IPAddress, blocked_reason, check_url, fetch_url, never_fetched, resolve_host
from automask.settings import Settings

LOOPBACK = ipaddress.ip_address("127.0.0.1")
PIXELS = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3)


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(PIXELS).save(buf, format="PNG")
    return buf.getvalue()


def loopback_is_public(ip: IPAddress) -> bool:
    """An address policy for tests: 127.0.0.1 plays a public address; everything else is judged as usual."""
    return ip == LOOPBACK or blocked_reason(ip) is None


def fake_resolver(table: dict[str, list[str]]) -> Callable[[str, int], Sequence[IPAddress]]:
    """Names in `table` resolve to its addresses; anything else through the real (numeric-only here) resolver."""

    def resolve(host: str, port: int) -> list[IPAddress]:
        if host in table:
            return [ipaddress.ip_address(a) for a in table[host]]
        return resolve_host(host, port)

    return resolve


# --- a listener that must never be reached -----------------------------------------------------------------


class Listener:
    """A TCP socket listening on loopback that never answers; `connections()` counts who got through.

    A connection is complete once the kernel has accepted the handshake, so after a fetch attempt returns,
    every connection it made is waiting in the backlog: draining it without blocking counts them all.
    """

    def __init__(self, family: socket.AddressFamily, host: str, port: int = 0) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0

    def connections(self) -> int:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return self.accepted
            conn.close()
            self.accepted += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def listeners() -> Iterator[tuple[Listener, Listener | None]]:
    """One listener on 127.0.0.1 and, where the machine has IPv6, one on [::1] with the same port."""
    v4 = Listener(socket.AF_INET, "127.0.0.1")
    try:
        v6: Listener | None = Listener(socket.AF_INET6, "::1", v4.port)
    except OSError:
        v6 = None
    yield v4, v6
    v4.close()
    if v6:
        v6.close()


REFUSED_URLS = [
    "http://127.0.0.1:{port}/x.png",
    "http://localhost:{port}/",
    "http://2130706433:{port}/",  # decimal
    "http://0x7f000001:{port}/",  # hex
    "http://0x7f.1:{port}/",  # hex, short form
    "http://0177.0.0.1:{port}/",  # octal
    "http://017700000001:{port}/",  # octal, one number
    "http://127.1:{port}/",  # short form
    "http://0.0.0.0:{port}/",  # unspecified: Linux connects it to this machine
    "http://[::1]:{port}/",
    "http://[::]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped
    "http://[::ffff:7f00:1]:{port}/",  # IPv4-mapped, hex
    "https://127.0.0.1:{port}/x.png",
    "http://user:pw@127.0.0.1:{port}/",
]


@pytest.mark.parametrize("template", REFUSED_URLS)
def test_internal_urls_are_refused_before_connecting(
    template: str, listeners: tuple[Listener, Listener | None]
) -> None:
    v4, v6 = listeners
    url = template.format(port=v4.port)
    with pytest.raises(URLRefusedError, match="Refused the image URL"):
        load_image(url, Settings(fetch_timeout=2.0))
    assert v4.connections() == 0
    assert v6 is None or v6.connections() == 0


def test_the_listener_does_count_connections(listeners: tuple[Listener, Listener | None]) -> None:
    """Control for the test above: with private URLs allowed, the same fetch reaches the listener."""
    v4, _ = listeners
    with pytest.raises(FetchTimeoutError):
        fetch_url(f"http://127.0.0.1:{v4.port}/x.png", Settings(fetch_timeout=0.3, allow_private_urls=True))
    assert v4.connections() == 1


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("file:///etc/passwd", "only http:// and https://"),
        ("ftp://example.com/a.png", "only http:// and https://"),
        ("gopher://127.0.0.1:70/_x", "only http:// and https://"),
        ("//example.com/a.png", "only http:// and https://"),
        ("http:///a.png", "no host"),
        ("http://999.1.1.1/", "not a valid URL"),
        # before: httpx takes any port; the resolver kept its low 16 bits (99999 -> 34463) and port 0 became 80
        ("http://127.0.0.1:99999/a.png", r"port 99999 is not a TCP port \(1–65535\)"),
        ("http://127.0.0.1:0/a.png", r"port 0 is not a TCP port"),
    ],
)
def test_bad_urls_are_refused(url: str, phrase: str) -> None:
    with pytest.raises(URLRefusedError, match=phrase):
        fetch_url(url, Settings(allow_private_urls=True))


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "cloud metadata"),
        ("169.254.170.2", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"),
        ("2002:a9fe:a9fe::1", "6to4 tunnel to a cloud metadata"),
        ("64:ff9b::a9fe:a9fe", "NAT64"),  # 169.254.169.254 through a NAT64 gateway
        # these were reachable with private URLs allowed: only the forms above were unwrapped
        ("::169.254.169.254", "reserved"),  # IPv4-compatible
        ("::a9fe:1", "reserved"),  # IPv4-compatible link-local
        ("::ffff:0:a9fe:a9fe", "reserved"),  # IPv4-translated (SIIT)
        ("64:ff9b:1::a9fe:a9fe", "NAT64 (local)"),
        ("64:ff9b:1::100.100.100.200", "NAT64 (local)"),
        ("2001:0:a9fe:a9fe::1", "Teredo"),  # Teredo server
        ("2001:0:4136:e378:8000:63bf:5601:5601", "Teredo"),  # Teredo client (obfuscated)
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
    ],
)
def test_metadata_and_link_local_are_refused_even_with_private_urls_allowed(address: str, reason: str) -> None:
    """`allow_private_urls` is for loopback and the LAN; it never opens the machine's credentials to a client."""
    resolve = fake_resolver({"images.test": [address]})
    with pytest.raises(URLRefusedError, match=rf"\ban? {re.escape(reason)}.* never fetches from cloud metadata"):
        fetch_url("http://images.test/a.png", Settings(allow_private_urls=True), resolve=resolve)
    assert never_fetched(ipaddress.ip_address(address))


@pytest.mark.parametrize("host", ["[::169.254.169.254]", "[::a9fe:a9fe]", "[64:ff9b:1::a9fe:a9fe]"])
def test_literal_ipv6_embedding_metadata_is_refused_with_private_urls_allowed(host: str) -> None:
    """Through the real (numeric) resolver, at submit time too (`check_url`): no connection is tried."""
    for call in (fetch_url, check_url):
        with pytest.raises(URLRefusedError, match="never fetches from cloud metadata"):
            call(f"http://{host}/latest/meta-data/", Settings(allow_private_urls=True, fetch_timeout=1.0))


def rfc6052(prefix: str, ipv4: str) -> ipaddress.IPv6Address:
    """`ipv4` embedded in network-specific prefix `prefix` (/32 /40 /48 /56 /64 /96) as RFC 6052 section 2.2 lays
    it out: its 32 bits after the prefix, skipping bits 64-71 (the "u" octet, zero)."""
    net = ipaddress.ip_network(prefix)
    bits = [int(b) for b in format(int(ipaddress.ip_address(ipv4)), "032b")]
    layout = [int(b) for b in format(int(net.network_address), "0128b")]
    at = net.prefixlen
    for bit in bits:
        at = 72 if at == 64 else at  # bits 64-71: the u octet
        layout[at] = bit
        at += 1
    return ipaddress.IPv6Address(int("".join(map(str, layout)), 2))


def test_rfc6052_layout_matches_the_rfc_examples() -> None:
    """The helper above, checked against RFC 6052's own table (section 2.4) for 192.0.2.33."""
    examples = {
        "2001:db8::/32": "2001:db8:c000:221::",
        "2001:db8:100::/40": "2001:db8:1c0:2:21::",
        "2001:db8:122::/48": "2001:db8:122:c000:2:2100::",
        "2001:db8:122:300::/56": "2001:db8:122:3c0:0:221::",
        "2001:db8:122:344::/64": "2001:db8:122:344:c0:2:2100:0",
        "2001:db8:122:344::/96": "2001:db8:122:344::c000:221",
    }
    for prefix, address in examples.items():
        assert rfc6052(prefix, "192.0.2.33") == ipaddress.ip_address(address), prefix


@pytest.mark.parametrize("prefix", ["64:ff9b:1::/48", "64:ff9b:1:100::/56", "64:ff9b:1:1234::/64"])
@pytest.mark.parametrize("ipv4", ["169.254.169.254", "100.100.100.200", "169.254.1.1"])
def test_nat64_local_prefixes_of_every_rfc6052_length_are_unwrapped(prefix: str, ipv4: str) -> None:
    """Before: 64:ff9b:1::/48 was read by its low 32 bits only (the /96 layout); a local NAT64 gateway with a /48,
    /56 or /64 prefix reached the metadata service through an address like 64:ff9b:1:a9fe:a9:fe00:: with private
    URLs allowed. Now every position RFC 6052 allows is checked against the always-refused list."""
    address = str(rfc6052(prefix, ipv4))
    resolve = fake_resolver({"images.test": [address]})
    with pytest.raises(URLRefusedError, match=r"NAT64 \(local\).* never fetches from cloud metadata"):
        fetch_url("http://images.test/a.png", Settings(allow_private_urls=True), resolve=resolve)
    assert never_fetched(ipaddress.ip_address(address))
    with pytest.raises(URLRefusedError, match="never fetches from cloud metadata"):
        check_url(f"http://[{address}]/", Settings(allow_private_urls=True))


@pytest.mark.parametrize("prefix", ["64:ff9b:1::/48", "64:ff9b:1:100::/56", "64:ff9b:1:1234::/64"])
def test_nat64_local_prefixes_embedding_a_private_address_are_not_never_fetched(prefix: str) -> None:
    """The control: the same layouts around a private address stay reachable with private URLs allowed."""
    assert not never_fetched(rfc6052(prefix, "10.0.0.1"))


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "10.0.0.1", "192.168.1.1", "fd12:3456::1", "::1", "100.64.0.1", "::7f00:1", "::"]
)
def test_private_addresses_are_not_never_fetched(address: str) -> None:
    assert not never_fetched(ipaddress.ip_address(address))  # (the control: allow_private_urls reaches these)


# --- the address classifier --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "shared"),
        ("100.127.255.254", "shared"),
        ("fc00::1", "unique-local"),
        ("fd12:3456::1", "unique-local"),
        ("fec0::1", "site-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.1", "private"),  # TEST-NET-1
        ("198.18.0.1", "private"),  # benchmarking
        ("::ffff:10.0.0.1", "IPv4-mapped private"),
        ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"),
        ("2002:7f00:1::1", "6to4 tunnel to a loopback"),
        ("2002:a9fe:a9fe::1", "6to4 tunnel to a cloud metadata"),
        ("2001::1", "Teredo"),
        ("64:ff9b::a00:1", "NAT64"),
        ("::7f00:1", "reserved"),  # IPv4-compatible 127.0.0.1
        ("2001:db8::1", "private"),  # documentation
    ],
)
def test_classifier_refuses_special_ranges(address: str, reason: str) -> None:
    found = blocked_reason(ipaddress.ip_address(address))
    assert found is not None and reason in found, (address, found)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]
)
def test_classifier_lets_public_addresses_through(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("address", "reason"), [("64:ff9b::808:808", None), ("64:ff9b::a00:1", "NAT64 form of a private")]
)
def test_a_dns64_address_of_a_public_ipv4_is_public(address: str, reason: str | None) -> None:
    """64:ff9b::/96, NAT64's well-known prefix, is globally reachable (IANA), and RFC 6052 keeps it for global IPv4
    addresses: an IPv6-only network's DNS64 gives every IPv4-only host such an address (beside its A record).
    Before: all of it was refused ("a NAT64 address"), so on such a network (an IPv6-only cloud subnet) no image URL
    of an IPv4-only host could be fetched, while the README said only NAT64 forms of refused addresses were. Now the
    IPv4 address it carries is checked, as for IPv4-mapped and 6to4 ones."""
    found = blocked_reason(ipaddress.ip_address(address))
    assert found == reason, found
    if reason is None:
        check_url(f"http://[{address}]/a.png", Settings())
    else:
        with pytest.raises(URLRefusedError, match=reason):
            check_url(f"http://[{address}]/a.png", Settings())


# Every range of IANA's IPv4 and IPv6 special-purpose address registries that is not globally reachable, as
# (an address inside it, the RFC): written out here from the registries, independently of fetch.SPECIAL_PURPOSE.
IANA_NOT_GLOBAL = [
    ("0.1.2.3", "RFC 791 this network"),
    ("10.255.0.1", "RFC 1918"),
    ("100.100.0.1", "RFC 6598 shared"),
    ("127.0.0.2", "RFC 1122 loopback"),
    ("169.254.10.10", "RFC 3927 link-local"),
    ("172.31.255.254", "RFC 1918"),
    ("192.0.0.1", "RFC 7335 IPv4 service continuity"),
    ("192.0.0.8", "RFC 7600 dummy"),
    ("192.0.0.170", "RFC 8880 NAT64 discovery"),
    ("192.0.0.200", "RFC 6890 IETF protocol assignments, outside the /29"),
    ("192.0.0.255", "RFC 6890 IETF protocol assignments, last"),
    ("192.0.2.200", "RFC 5737 TEST-NET-1"),
    ("192.88.99.1", "RFC 7526 deprecated 6to4 relay anycast"),
    ("192.168.255.255", "RFC 1918"),
    ("198.19.255.1", "RFC 2544 benchmarking"),
    ("198.51.100.7", "RFC 5737 TEST-NET-2"),
    ("203.0.113.9", "RFC 5737 TEST-NET-3"),
    ("239.1.1.1", "RFC 5771 multicast"),
    ("250.1.2.3", "RFC 1112 reserved"),
    ("255.255.255.255", "RFC 8190 limited broadcast"),
    ("::", "RFC 4291 unspecified"),
    ("::1", "RFC 4291 loopback"),
    ("::ffff:192.0.0.200", "RFC 4291 IPv4-mapped (of a non-global IPv4)"),
    ("64:ff9b:1::a", "RFC 8215 local-use translation"),
    ("100::1", "RFC 6666 discard-only"),
    ("100:0:0:1::1", "RFC 9780 dummy prefix"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "RFC 4380 Teredo"),
    ("2001:2::1", "RFC 5180 benchmarking"),
    ("2001:10::1", "RFC 4843 deprecated ORCHID"),
    ("2001:100::1", "RFC 2928 IETF protocol assignments"),
    ("2001:1ff:ffff::1", "RFC 2928 IETF protocol assignments, last /32"),
    ("2001:db8:1::1", "RFC 3849 documentation"),
    ("2002:c000:2c8::1", "RFC 3056 6to4 (of a non-global IPv4)"),
    ("3fff::1", "RFC 9637 documentation"),
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", "RFC 9637 documentation, last"),
    ("5f00::1", "RFC 9602 SRv6 SIDs"),
    ("fd00::1", "RFC 4193 unique-local"),
    ("febf::1", "RFC 4291 link-local"),
    ("fec0::1", "RFC 3879 site-local"),
    ("ff0e::1", "RFC 4291 multicast"),
]


@pytest.mark.parametrize(("address", "what"), IANA_NOT_GLOBAL)
def test_every_iana_range_that_is_not_globally_reachable_is_refused(address: str, what: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is not None, what


@pytest.mark.parametrize(
    "address",
    [
        "192.0.1.1",  # just past 192.0.0.0/24
        "192.31.196.1",  # AS112-v4 (RFC 7535): globally reachable
        "192.52.193.1",  # AMT (RFC 7450): globally reachable
        "192.88.100.1",  # just past the 6to4 relay anycast /24
        "192.175.48.1",  # AS112 direct delegation (RFC 7534): globally reachable
        "3fff:1000::1",  # just past 3fff::/20
        "2620:4f:8000::1",  # AS112 direct delegation (RFC 7534): globally reachable
        "2001:200::1",  # just past 2001::/23
    ],
)
def test_globally_reachable_neighbours_of_special_ranges_are_allowed(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("host", ["192.0.0.200", "[3fff::1]", "[5f00::1]", "192.88.99.1"])
def test_urls_in_ranges_python_calls_public_are_refused_before_connecting(host: str) -> None:
    with pytest.raises(URLRefusedError, match="automask fetches only public addresses"):
        fetch_url(f"http://{host}/cat.png", Settings())


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "127.1"])
def test_numeric_spellings_resolve_to_what_they_denote(host: str) -> None:
    assert resolve_host(host, 80) == [LOOPBACK]


# --- a real loopback HTTP server ---------------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


class Site:
    """A threaded HTTP server on 127.0.0.1 with a route table and a log of (path, Host header)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.log: list[tuple[str, str | None]] = []
        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                site.log.append((self.path, self.headers.get("Host")))
                route = site.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def image_route(handler: BaseHTTPRequestHandler) -> None:
    send(handler, 200, png_bytes(), Content_Type="image/png")


def redirect_route(location: str, status: int = 302) -> Route:
    return lambda handler: send(handler, status, Location=location)


@pytest.fixture()
def site() -> Iterator[Site]:
    server = Site()
    server.routes["/img.png"] = image_route
    yield server
    server.close()


PRIVATE_OK = Settings(allow_private_urls=True, fetch_timeout=3.0)


def test_allow_private_fetches_and_decodes(site: Site) -> None:
    assert np.array_equal(load_image(site.url("/img.png"), PRIVATE_OK), PIXELS)
    assert site.log == [("/img.png", f"127.0.0.1:{site.port}")]


def test_redirects_are_followed_by_hand(site: Site) -> None:
    site.routes["/a"] = redirect_route("/b", 301)  # relative
    site.routes["/b"] = redirect_route(site.url("/img.png"), 307)  # absolute
    assert fetch_url(site.url("/a"), PRIVATE_OK) == png_bytes()
    assert [path for path, _ in site.log] == ["/a", "/b", "/img.png"]


@pytest.mark.parametrize(
    ("target", "table", "phrase"),
    [
        ("http://internal.test:{port}/secret", {"internal.test": ["127.0.0.1", "10.0.0.5"]}, "10.0.0.5, a private"),
        ("http://metadata.test:{port}/latest", {"metadata.test": ["169.254.169.254"]}, "cloud metadata"),
        ("http://127.0.0.2:{port}/", {}, "127.0.0.2 is a loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/", {}, "IPv4-mapped loopback"),
    ],
)
def test_redirect_to_a_refused_address_is_refused_without_connecting(
    site: Site, listeners: tuple[Listener, Listener | None], target: str, table: dict[str, list[str]], phrase: str
) -> None:
    """127.0.0.1 counts as public for the first hop; the redirect's target is resolved and checked again."""
    v4, _ = listeners
    site.routes["/hop"] = redirect_route(target.format(port=v4.port))
    resolve = fake_resolver(table)
    with pytest.raises(URLRefusedError, match=re.escape(phrase)):
        fetch_url(site.url("/hop"), Settings(), resolve=resolve, is_allowed=loopback_is_public)
    assert site.log == [("/hop", f"127.0.0.1:{site.port}")]  # the first hop was allowed and made
    assert v4.connections() == 0  # the refused target never saw a connection


def test_redirect_to_another_scheme_is_refused(site: Site) -> None:
    site.routes["/hop"] = redirect_route("file:///etc/passwd")
    with pytest.raises(URLRefusedError, match="only http:// and https://"):
        fetch_url(site.url("/hop"), PRIVATE_OK)


@pytest.mark.parametrize(
    "location",
    [
        "http:img.png",
        "https:x/y.png",
        "http:169.254.169.254/",
        # these were URLRefusedError (400, "refused the image URL") while the ones above were 502
        "http://127.0.0.1:99999/a.png",
        "http://127.0.0.1:0/a.png",
        "http://%65xample.com/",
        "http://images..example.com/a.png",  # was "Could not resolve ... (label empty or too long)"
    ],
)
def test_redirect_to_an_invalid_url_is_a_fetch_error(site: Site, location: str) -> None:
    """Was httpx.InvalidURL, raised as httpx built the redirect's next request: the server's 500 "unexpected error",
    with a traceback in its log, for any public page that answers so."""
    site.routes["/hop"] = redirect_route(location)
    with pytest.raises(FetchError, match="redirected to an invalid URL"):
        fetch_url(site.url("/hop"), PRIVATE_OK)
    assert [path for path, _ in site.log] == ["/hop"]


@pytest.mark.parametrize("host", ["xn--ls8h.la", "xn--a.com"])
def test_a_redirect_to_a_punycode_host_idna_does_not_decode_is_followed_as_a_first_url_is(
    site: Site, host: str
) -> None:
    """An emoji domain (💩.la, registered under IDNA 2003) is fetched as written when it is the first URL. Before: a
    redirect to it was "an invalid URL" (502), because httpx decoded the name as it built the next request, and
    then because the fetcher decoded it to keep that refusal. Now a redirect is followed to any host a first URL may
    name (its address checked as ever)."""
    site.routes["/hop"] = redirect_route(site.url("/img.png", host=host))
    looked_up: list[str] = []

    def resolve(name: str, port: int) -> list[IPAddress]:
        looked_up.append(name)
        return [LOOPBACK]

    assert fetch_url(site.url("/hop"), PRIVATE_OK, resolve=resolve) == png_bytes()
    assert looked_up == ["127.0.0.1", host]
    assert site.log == [("/hop", f"127.0.0.1:{site.port}"), ("/img.png", f"{host}:{site.port}")]


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("http://exa mple.com/x.png", "its host holds a space"),
        ("http://a<b>.com/x.png", "its host holds '<', '>'"),
        ("http://ex%61mple.com/x.png", "its host holds '%'"),  # a '%' it does hold: that message stays
    ],
)
def test_a_redirect_to_a_host_with_a_space_says_so(site: Site, location: str, words: str) -> None:
    """Before: httpx percent-encodes a space in the Location's host (%20), and the 502 said the host held a '%' (a
    percent-encoded name, or an IPv6 zone), which the server never wrote. Now it names the character itself."""
    site.routes["/hop"] = redirect_route(location)
    with pytest.raises(FetchError, match="redirected to an invalid URL") as caught:
        fetch_url(site.url("/hop"), PRIVATE_OK)
    assert words in str(caught.value), caught.value
    assert ("'%'" in str(caught.value)) == ("%" in location), caught.value
    assert [path for path, _ in site.log] == ["/hop"]


ODD_HOSTS = [
    ('http://a"b.com/x.png', "its host holds '\"'"),
    ("http://a{b}.com/x.png", "its host holds '{', '}'"),
    ("http://a|b.com/x.png", "its host holds '|'"),
    ("http://a`b.com/x.png", "its host holds '`'"),
    ("http://a\\b.com/x.png", "its host holds '\\\\'"),
    ("http://a*b;c.com/x.png", "its host holds '*', ';'"),
    ("http://a%22b.com/x.png", "its host holds '\"'"),  # percent-encoded: the character it stands for is named
    # a non-ASCII (IDNA) host: httpx's own error was "Invalid IDNA hostname", which did not say what was wrong
    ('http://bücher"x.de/x.png', "its host holds '\"'"),
    ("http://bücher x.de/x.png", "its host holds a space"),
    ("http://bücher<x>.de/x.png", "its host holds '<', '>'"),
]


@pytest.mark.parametrize(("url", "words"), ODD_HOSTS)
def test_a_host_with_a_character_no_host_name_has_is_refused_naming_it(url: str, words: str) -> None:
    """Before: `"`, `{`, `|` (kept by httpx as written) went to the resolver, and the 502 said the host could not be
    resolved (after a DNS query that could never succeed); in a non-ASCII host, any of them gave httpx's generic
    "Invalid IDNA hostname". Now the URL is refused (400) naming the character, as for a space; nothing is looked up."""
    looked_up: list[str] = []

    def resolve(host: str, port: int) -> list[IPAddress]:
        looked_up.append(host)
        return [LOOPBACK]

    for call in (lambda: fetch_url(url, PRIVATE_OK, resolve=resolve), lambda: check_url(url, PRIVATE_OK)):
        with pytest.raises(URLRefusedError, match="Refused the image URL") as caught:
            call()
        assert f"{words}, which no host name or address has" in str(caught.value), caught.value
    assert looked_up == []


@pytest.mark.parametrize(("url", "words"), ODD_HOSTS)
def test_a_redirect_to_a_host_with_an_odd_character_names_it(site: Site, url: str, words: str) -> None:
    site.routes["/hop"] = redirect_route(url)
    with pytest.raises(FetchError, match="redirected to an invalid URL") as caught:
        fetch_url(site.url("/hop"), PRIVATE_OK)
    assert words in str(caught.value), caught.value
    assert [path for path, _ in site.log] == ["/hop"]


@pytest.mark.parametrize(
    "host", ["images_1.example.com", "xn--bcher-kva.de", "bücher.de", "a-b.c0m", "images.example.com.", "xn--ls8h.la"]
)
def test_hosts_with_ordinary_characters_are_looked_up(host: str) -> None:
    """The control: letters, digits, '-', '.', '_' and IDNA names go on to the resolver."""
    resolve = fake_resolver({host.encode("idna").decode(): ["10.0.0.1"]})
    with pytest.raises(URLRefusedError, match=r"10\.0\.0\.1, a private"):
        fetch_url(f"http://{host}/x.png", Settings(), resolve=resolve)


@pytest.mark.parametrize(("host", "address"), [("[::1]", "::1"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1")])
def test_an_ipv6_literal_in_brackets_reaches_the_address_check(host: str, address: str) -> None:
    """The control for odd characters: an IPv6 literal's brackets and colons are no character a host cannot have."""
    for call in (
        lambda: fetch_url(f"http://{host}:8080/x.png", Settings()),
        lambda: check_url(f"http://{host}/", Settings()),
    ):
        with pytest.raises(URLRefusedError, match=f"{re.escape(address)}.* loopback address"):
            call()


def test_at_most_three_redirects(site: Site) -> None:
    for i in range(4):
        site.routes[f"/r{i}"] = redirect_route(f"/r{i + 1}")
    site.routes["/r4"] = redirect_route("/img.png")
    assert fetch_url(site.url("/r2"), PRIVATE_OK) == png_bytes()  # three redirects: fine
    site.log.clear()
    with pytest.raises(FetchError, match=r"redirected more than 3 times \(AUTOMASK_MAX_REDIRECTS\)\.$"):
        fetch_url(site.url("/r0"), PRIVATE_OK)
    assert [path for path, _ in site.log] == ["/r0", "/r1", "/r2", "/r3"]


def test_with_redirects_off_a_redirect_says_so_and_names_the_setting(site: Site) -> None:
    """Before: "The image URL ... redirected more than 0 times.", naming no setting (as the time and size limits
    do), so the one who could raise it was not told how."""
    site.routes["/r0"] = redirect_route("/img.png")
    with pytest.raises(FetchError, match=r"redirected, and redirects are not followed \(AUTOMASK_MAX_REDIRECTS=0\)"):
        fetch_url(site.url("/r0"), Settings(allow_private_urls=True, max_redirects=0))


def test_declared_body_over_the_cap(site: Site) -> None:
    site.routes["/big"] = lambda h: send(h, 200, b"\0" * 50_000)
    with pytest.raises(ImageTooLargeError, match="50,000 bytes"):
        fetch_url(site.url("/big"), Settings(allow_private_urls=True, max_image_bytes=10_000))


def test_streamed_body_over_the_cap_stops_reading(site: Site) -> None:
    total, sent, done = 64 * 1024 * 1024, [0], threading.Event()

    def endless(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")  # no Content-Length: the body ends when the socket closes
        handler.end_headers()
        try:
            while sent[0] < total:
                handler.wfile.write(b"\0" * 65536)
                sent[0] += 65536
        except OSError:
            pass
        finally:
            done.set()

    site.routes["/endless"] = endless
    with pytest.raises(ImageTooLargeError, match="more than 10,000 bytes"):
        fetch_url(site.url("/endless"), Settings(allow_private_urls=True, max_image_bytes=10_000))
    assert done.wait(5)
    assert sent[0] < total  # the client hung up long before the end


def gzip_bytes(data: bytes, wbits: int = 31) -> bytes:
    """`data` compressed as gzip (wbits 31), zlib (15) or raw deflate (-15)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


def test_a_compression_bomb_is_capped_while_it_inflates(site: Site) -> None:
    """A server that compresses though asked not to: 64 MB of zeros in ~64 KB of gzip. The cap holds on the
    decoded bytes, and no more than it is ever inflated (httpx alone inflates each 64 KB read whole: 64 MB)."""
    bomb = gzip_bytes(bytes(64 << 20))
    site.routes["/bomb"] = lambda h: send(h, 200, bomb, Content_Type="image/png", Content_Encoding="gzip")
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="more than 1,000,000 bytes"):
            fetch_url(site.url("/bomb"), Settings(allow_private_urls=True, max_image_bytes=1_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize(("coding", "wbits"), [("gzip", 31), ("x-gzip", 31), ("deflate", 15), ("deflate", -15)])
def test_a_compressed_image_is_decoded(site: Site, coding: str, wbits: int) -> None:
    """S3 serves an object stored gzipped with Content-Encoding: gzip whatever the client asks; deflate comes with
    a zlib header or (some servers) without."""
    packed = gzip_bytes(png_bytes(), wbits)
    site.routes["/img.gz"] = lambda h: send(h, 200, packed, Content_Type="image/png", Content_Encoding=coding)
    assert np.array_equal(load_image(site.url("/img.gz"), PRIVATE_OK), PIXELS)


@pytest.mark.parametrize(("coding", "wbits"), [("gzip", 31), ("deflate", 15), ("deflate", -15)])
def test_a_compressed_body_read_a_byte_at_a_time_is_decoded(coding: str, wbits: int) -> None:
    """Network reads split a body anywhere, even inside deflate's two-byte zlib header."""
    packed = gzip_bytes(png_bytes(), wbits)
    inflater = Inflater(coding)
    assert b"".join(inflater.decode(packed[i : i + 1], 1 << 20) for i in range(len(packed))) == png_bytes()


@pytest.mark.parametrize(
    ("coding", "body", "phrase"),
    [
        ("br", b"x", "Content-Encoding 'br'; automask reads only gzip or deflate"),
        ("gzip, gzip", gzip_bytes(gzip_bytes(b"x")), "Content-Encoding 'gzip, gzip'"),
        ("gzip", b"not gzip at all", "does not decompress as gzip"),
    ],
    ids=["brotli", "gzip-twice", "broken-gzip"],
)
def test_other_or_broken_codings_are_fetch_errors(site: Site, coding: str, body: bytes, phrase: str) -> None:
    site.routes["/odd"] = lambda h: send(h, 200, body, Content_Encoding=coding)
    with pytest.raises(FetchError, match=re.escape(phrase)):
        fetch_url(site.url("/odd"), PRIVATE_OK)


def test_slow_server_times_out(site: Site) -> None:
    def slow(handler: BaseHTTPRequestHandler) -> None:
        site.stop.wait(10)
        send(handler, 200, png_bytes())

    site.routes["/slow"] = slow
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError, match=r"longer than 0\.5 s"):
        fetch_url(site.url("/slow"), Settings(allow_private_urls=True, fetch_timeout=0.5))
    assert time.monotonic() - start < 2.5


def test_trickling_server_hits_the_overall_deadline(site: Site) -> None:
    """A byte every 0.1 s never trips a per-read timeout; the one deadline for the whole fetch does."""

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        drip(site, handler, b"\0")

    site.routes["/trickle"] = trickle
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError):
        fetch_url(site.url("/trickle"), Settings(allow_private_urls=True, fetch_timeout=0.6))
    assert time.monotonic() - start < 2.5


def test_the_host_name_lookup_is_under_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the lookup came before the deadline was checked: a name server that never answers held the fetch
    (and a server thread) for as long as the system resolver's own limits, tens of seconds. Now the lookup is given
    what is left of `fetch_timeout`; a stuck one is left to finish in its thread, at most `DNS_LOOKUPS` of them."""
    monkeypatch.setattr(fetch, "_LEFT_BEHIND", threading.BoundedSemaphore(1), raising=False)
    release = threading.Event()

    def stuck(host: str, port: int) -> list[IPAddress]:
        release.wait(10)
        return [ipaddress.ip_address("10.0.0.1")]

    quick = fake_resolver({"images.test": ["10.0.0.1"]})
    settings = Settings(fetch_timeout=0.5)
    late: list[float] = []

    def stuck_again() -> None:  # the one lookup left behind is taken: this fetch waits for its own lookup
        start = time.monotonic()
        with pytest.raises(FetchTimeoutError, match=r"longer than 0\.5 s"):
            fetch_url("http://slow.test/a.png", settings, resolve=stuck)
        late.append(time.monotonic() - start)

    try:
        start = time.monotonic()
        with pytest.raises(FetchTimeoutError, match=r"longer than 0\.5 s"):
            fetch_url("http://slow.test/a.png", settings, resolve=stuck)
        assert time.monotonic() - start < 1.5
        waiting = threading.Thread(target=stuck_again)
        waiting.start()
        time.sleep(0.8)
        assert waiting.is_alive() and not late  # its thread, not another one, waits for its stuck lookup
        # Before: every other fetch waited for a free lookup slot behind the stuck ones (a 504 for all, whatever
        # their host) until the system resolver gave up on them: any client could deny URL fetches to all others.
        with pytest.raises(URLRefusedError, match=r"10\.0\.0\.1"):
            fetch_url("http://images.test/a.png", settings, resolve=quick)
    finally:
        release.set()
    waiting.join(5)
    assert late and late[0] >= 0.8


def drip(site: Site, handler: BaseHTTPRequestHandler, byte: bytes) -> None:
    """Send `byte` every 0.1 s, a thousand times, until the site stops or the client goes away."""
    for _ in range(1000):
        if site.stop.wait(0.1):
            return
        try:
            handler.wfile.write(byte)
            handler.wfile.flush()
        except OSError:
            return


def trickled_headers(site: Site) -> Route:
    """A route that sends its status line, then a header byte every 0.1 s (h11 takes ~100 kB of headers)."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        drip(site, handler, b"a")

    return route


def test_trickled_headers_hit_the_overall_deadline(site: Site) -> None:
    """Before: the deadline was checked between body chunks only, so a server trickling its headers held the
    fetch (and a server thread) for as long as it liked."""
    site.routes["/headers"] = trickled_headers(site)
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError):
        fetch_url(site.url("/headers"), Settings(allow_private_urls=True, fetch_timeout=0.6))
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize(("status", "phrase"), [(404, "HTTP 404"), (500, "HTTP 500"), (302, "HTTP 302")])
def test_error_answers_are_fetch_errors(site: Site, status: int, phrase: str) -> None:
    site.routes["/err"] = lambda h: send(h, status, b"nope")  # a 302 without Location is an error too
    with pytest.raises(FetchError, match=phrase):
        fetch_url(site.url("/err"), PRIVATE_OK)


def test_connection_refused_is_a_fetch_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the fetch: nothing listens there
    with pytest.raises(FetchError, match="Could not connect"):
        fetch_url(f"http://127.0.0.1:{port}/", PRIVATE_OK)


@pytest.mark.parametrize(
    ("host", "shown"), [("xn--ls8h.la", "xn--ls8h.la"), ("xn--a.com", "xn--a.com"), ("bücher.de", "bücher.de")]
)
def test_connection_refused_names_a_host_idna_cannot_decode(host: str, shown: str) -> None:
    """A punycode name that IDNA 2008 does not decode (an emoji domain, registered under IDNA 2003: 💩.la; a broken
    one) is looked up and fetched as written. Before: when its server refused the connection, the message decoded the
    name (httpx's `URL.host`), and idna's UnicodeError escaped: the server's 500, the CLI's internal error (exit 70).
    Now the message names the host as written (a name IDNA decodes, as a person wrote it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the fetch: nothing listens there
    resolve = fake_resolver({host.encode("idna").decode() if not host.isascii() else host: ["127.0.0.1"]})
    with pytest.raises(FetchError, match=f"Could not connect to the image URL's server {re.escape(shown)} "):
        fetch_url(f"http://{host}:{port}/x.png", PRIVATE_OK, resolve=resolve)


def test_connection_goes_to_the_checked_address(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A made-up name resolved once; the request reaches that IP and still says `Host: images.test`."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple[Any, ...]]:
        lookups.append(host)
        if host == "images.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    data = fetch_url(site.url("/img.png", host="images.test"), Settings(), is_allowed=loopback_is_public)
    assert data == png_bytes()
    assert lookups.count("images.test") == 1
    assert site.log == [("/img.png", f"images.test:{site.port}")]


def test_every_resolved_address_is_checked(listeners: tuple[Listener, Listener | None]) -> None:
    v4, _ = listeners
    resolve = fake_resolver({"mixed.test": ["127.0.0.1", "192.168.0.7"]})
    with pytest.raises(URLRefusedError, match=r"192\.168\.0\.7, a private"):
        fetch_url(f"http://mixed.test:{v4.port}/", Settings(), resolve=resolve, is_allowed=loopback_is_public)
    assert v4.connections() == 0


# --- https: the TLS name is the URL's host, the connection goes to the checked IP --------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for DNS:images.test only (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    (d / "leaf.ext").write_text(
        "subjectAltName=DNS:images.test\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.test", cwd=d)
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext", cwd=d)  # fmt: skip
    return d


@pytest.fixture()
def tls_site(certificates: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "leaf.pem", certificates / "leaf.key")
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates / "ca.pem"))  # the fetcher trusts the test CA
    server = Site(tls=context)
    server.routes["/img.png"] = image_route
    yield server
    server.close()


def test_https_verifies_the_original_name_while_connecting_to_the_ip(tls_site: Site) -> None:
    resolve = fake_resolver({"images.test": ["127.0.0.1"]})
    url = tls_site.url("/img.png", host="images.test", scheme="https")
    assert fetch_url(url, Settings(), resolve=resolve, is_allowed=loopback_is_public) == png_bytes()
    assert tls_site.log == [("/img.png", f"images.test:{tls_site.port}")]


@pytest.mark.parametrize("host", ["127.0.0.1", "other.test"])
def test_https_certificate_for_another_name_fails(tls_site: Site, host: str) -> None:
    resolve = fake_resolver({"other.test": ["127.0.0.1"]})
    url = tls_site.url("/img.png", host=host, scheme="https")
    with pytest.raises(FetchError, match="Could not connect"):
        fetch_url(url, Settings(fetch_timeout=3.0), resolve=resolve, is_allowed=loopback_is_public)
    assert tls_site.log == []


def test_https_trickled_headers_hit_the_overall_deadline(tls_site: Site) -> None:
    """The deadline also cuts a TLS connection (the watchdog follows the socket through the handshake)."""
    tls_site.routes["/headers"] = trickled_headers(tls_site)
    resolve = fake_resolver({"images.test": ["127.0.0.1"]})
    url = tls_site.url("/headers", host="images.test", scheme="https")
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError):
        fetch_url(url, Settings(fetch_timeout=0.8), resolve=resolve, is_allowed=loopback_is_public)
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("media_type", ["text/html; charset=utf-8", "application/xhtml+xml", "TEXT/HTML"])
def test_a_url_that_answers_a_web_page_says_so(site: Site, media_type: str) -> None:
    """Before: "The input looks like text (HTML, JSON or similar), not an image automask can read", which does not
    say that the URL is a page's, not its image's, as when a user pastes the link of the page that shows the image."""
    page = b"\xef\xbb\xbf\n <!doctype html><html><body><img src='/img.png'></body></html>"
    site.routes["/photo"] = lambda handler: send(handler, 200, page, Content_Type=media_type)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(site.url("/photo"), PRIVATE_OK)
    message = str(caught.value)
    shown = media_type.split(";")[0].lower()
    assert f"{site.url('/photo')} answered a web page ({shown}), not an image" in message, message
    assert "copy the image's own address" in message, message


def test_an_image_labelled_text_html_is_still_read(site: Site) -> None:
    site.routes["/mislabelled"] = lambda handler: send(handler, 200, png_bytes(), Content_Type="text/html")
    assert np.array_equal(load_image(site.url("/mislabelled"), PRIVATE_OK), PIXELS)


@pytest.mark.parametrize(
    "location",
    [
        "http://alice:s3cret@127.0.0.1:99999/a.png",
        "http://alice:s3cret@images..example.com/a.png",
        "http://alice:s3/cret@127.0.0.1/a.png",
        "//alice:s3cret@127.0.0.1:0/a.png",
        "http:\\\\alice:s3cret@127.0.0.1/a.png",  # a browser reads these three as http://alice:s3cret@127.0.0.1
        "http:/alice:s3cret@127.0.0.1/a.png",
        "http:alice:s3cret@127.0.0.1/a.png",
    ],
)
def test_an_invalid_redirect_location_is_shown_without_its_credentials(site: Site, location: str) -> None:
    """Before: the Location was quoted as the remote wrote it, its user name and password with it (a first URL's are
    left out: `urls.show`)."""
    site.routes["/hop"] = redirect_route(location)
    with pytest.raises(FetchError, match="redirected to an invalid URL") as caught:
        fetch_url(site.url("/hop"), PRIVATE_OK)
    message = str(caught.value)
    assert "s3" not in message and "cret" not in message and "alice" not in message, message
    assert "…@" in message, message


def test_an_svg_labelled_text_html_is_named_an_svg_not_a_web_page(site: Site) -> None:
    """Before: an SVG drawing its server labels text/html (a body that starts with '<' too) was 'answered a web page
    ... copy the image's own address', though the URL is the drawing's own; it is named an SVG as when labelled
    image/svg+xml."""
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>'
    for path, label in (("/drawing.svg", "text/html; charset=utf-8"), ("/labelled.svg", "image/svg+xml")):
        site.routes[path] = lambda handler, label=label: send(handler, 200, svg, Content_Type=label)
    messages = []
    for path in ("/drawing.svg", "/labelled.svg"):
        with pytest.raises(ImageDecodeError) as caught:
            load_image(site.url(path), PRIVATE_OK)
        messages.append(str(caught.value))
    assert all("an SVG (vector) image" in m and "web page" not in m for m in messages), messages
