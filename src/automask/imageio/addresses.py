"""Which addresses an image URL may be fetched from: the address half of the guard in `automask.imageio.fetch`.

- A host is resolved once (`resolve_host`, `socket.getaddrinfo`); numeric spellings (`2130706433`, `0x7f.1`,
  `0177.0.0.1`) resolve to the address they denote and are checked like any other.
- `blocked_reason` refuses private, loopback, link-local (169.254.169.254 included), multicast, reserved,
  unspecified, shared (100.64.0.0/10), unique-local (fc00::/7) and site-local addresses, and IPv6 forms that embed
  one (IPv4-mapped, IPv4-compatible, 6to4, NAT64, Teredo; NAT64 through the operator's own prefixes too,
  `settings.nat64_prefixes`). Every range of IANA's IPv4 and IPv6 special-purpose
  registries that is not globally reachable is listed in `SPECIAL_PURPOSE` and refused whatever Python's
  `ipaddress` version says.
- `settings.allow_private_urls` turns that check off, for local use, except for `NEVER_FETCHED` (cloud metadata
  services and link-local addresses, refused whatever the settings): `default_policy`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence

from automask.errors import FetchError
from automask.nat64 import RFC6052_LENGTHS, WELL_KNOWN, carried_ipv4, rfc6052_ipv4
from automask.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressCheck = Callable[[IPAddress], bool]
Prefixes = Sequence[ipaddress.IPv6Network]
"""The operator's own NAT64 prefixes (`Settings.nat64_prefixes`): an address in one is judged by the IPv4 address it
carries at that prefix's RFC 6052 position, as one of the well-known 64:ff9b::/96 is."""

_METADATA = (
    ipaddress.ip_network("169.254.169.254/32"),  # AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack
    ipaddress.ip_network("169.254.170.2/32"),  # AWS ECS task credentials
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS over IPv6
)
_CARRY_LOW_32_BITS = tuple(
    ipaddress.ip_network(net)
    for net in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")  # compatible, translated, NAT64
)
_NAT64 = WELL_KNOWN
"""RFC 6052's well-known NAT64 prefix: globally reachable, for global IPv4 addresses only (a DNS64 resolver gives
an IPv4-only host such an address), so the IPv4 address it carries is checked, not the prefix."""
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
"""RFC 8215's local-use NAT64 range: a gateway may take any network-specific prefix of it, of a length RFC 6052
allows, so the IPv4 address may sit at any of `RFC6052_LENGTHS`' positions."""
NEVER_FETCHED = (
    *_METADATA,
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)
"""Refused even with `allow_private_urls` (and in every IPv6 spelling that embeds one, `embedded_ipv4`): cloud
metadata services, which hand out the machine's credentials, and the link-local ranges they live in; no image is
served from there."""
_NAMED_NETWORKS = (
    *((network, "cloud metadata") for network in _METADATA),
    (ipaddress.ip_network("255.255.255.255/32"), "broadcast"),
    (ipaddress.ip_network("100.64.0.0/10"), "shared (carrier-grade NAT)"),
    (ipaddress.ip_network("fc00::/7"), "unique-local"),
    (ipaddress.ip_network("fec0::/10"), "site-local"),
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
IPv4-mapped, 6to4 and NAT64 (64:ff9b::/96) addresses never reach this table: the IPv4 address they embed is checked
instead."""
_SPECIAL = tuple((ipaddress.ip_network(net), f"{name} ({rfc})") for net, name, rfc in SPECIAL_PURPOSE)
_FLAGS = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


def blocked_reason(ip: IPAddress, nat64: Prefixes = ()) -> str | None:
    """Why `ip` must not be fetched from (e.g. "loopback"), or None for a public, globally routable address (an
    address of 64:ff9b::/96 or of a prefix of `nat64`: when the IPv4 address it carries is one)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            inner = blocked_reason(ip.ipv4_mapped)
            return f"IPv4-mapped {inner}" if inner else None
        if ip.sixtofour is not None:
            inner = blocked_reason(ip.sixtofour)
            return f"6to4 tunnel to {with_article(inner)}" if inner else None
        if ip.teredo is not None:
            return "Teredo tunnel"
        if carried := carried_ipv4(ip, (_NAT64, *nat64)):
            inner = next(filter(None, map(blocked_reason, carried)), None)  # refused if any reading is
            return f"NAT64 form of {with_article(inner)}" if inner else None
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


def with_article(phrase: str) -> str:
    """`phrase` after "a" or "an", as it is read aloud: "an IPv4-mapped ...", "an unspecified", "an IETF ...", but
    "a unique-local", "a 6to4 ...", "a NAT64 ...", "a 'this network'"."""
    word = phrase.lstrip("'\"(").lower()
    vowel = word[:1] in ("a", "e", "i", "o") or (word.startswith("u") and not word.startswith("uni"))
    return f"{'an' if vowel else 'a'} {phrase}"


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


def embedded_ipv4(ip: ipaddress.IPv6Address, nat64: Prefixes = ()) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, each of which it may reach: IPv4-mapped (::ffff:a.b.c.d),
    IPv4-compatible (::a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d), NAT64 (64:ff9b::/96; 64:ff9b:1::/48 read at
    every position RFC 6052 allows, `rfc6052_ipv4`; a prefix of `nat64` at its own only), 6to4 (2002::/16) and Teredo
    (2001::/32: its server and its client). [] for any other."""
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if any(ip in network for network in _CARRY_LOW_32_BITS):
        found.append(rfc6052_ipv4(ip, 96))
    if named := carried_ipv4(ip, nat64):  # its position known (each named prefix that holds it)
        found += named
    elif ip in _NAT64_LOCAL:
        found += [rfc6052_ipv4(ip, length) for length in RFC6052_LENGTHS]
    return [inner for inner in found if inner is not None]


def never_fetched(ip: IPAddress, nat64: Prefixes = ()) -> bool:
    """Whether `ip`, or an IPv4 address it embeds (`embedded_ipv4`, `nat64` included), is in `NEVER_FETCHED`."""
    if isinstance(ip, ipaddress.IPv6Address) and any(never_fetched(inner) for inner in embedded_ipv4(ip, nat64)):
        return True
    return any(ip.version == network.version and ip in network for network in NEVER_FETCHED)


def default_policy(settings: Settings) -> AddressCheck:
    """Public addresses only (`blocked_reason`), or with `settings.allow_private_urls` any but `NEVER_FETCHED`;
    `settings.nat64_prefixes` read as NAT64 prefixes."""
    nat64 = settings.nat64_prefixes
    if settings.allow_private_urls:
        return lambda ip: not never_fetched(ip, nat64)
    return lambda ip: blocked_reason(ip, nat64) is None
