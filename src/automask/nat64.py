"""NAT64 prefixes (RFC 6052): where an IPv4-embedded IPv6 address carries its IPv4 address, and the network-specific
prefixes an operator names in `Settings.nat64_prefixes` (a DNS64 network of its own), read and checked at start-up.
Pure `ipaddress` code: the URL guard (`automask.imageio.addresses`) judges the IPv4 address such a prefix carries."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

RFC6052_LENGTHS = (32, 40, 48, 56, 64, 96)
"""The prefix lengths RFC 6052 section 2.2 allows a NAT64 prefix."""
WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
"""RFC 6052's well-known prefix, a /96 only (section 2.1); the URL guard reads it whatever the settings."""
_NOT_NAT64 = tuple(
    (ipaddress.IPv6Network(net), name)
    for net, name in (
        ("::/96", "IPv4-compatible, loopback and unspecified"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::ffff:0:0:0/96", "IPv4-translated"),
        ("2001::/32", "Teredo"),
        ("2002::/16", "6to4"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
"""Ranges no NAT64 prefix may overlap: their addresses embed an IPv4 address of their own (which the guard reads
already), or must be refused whatever IPv4 address they seem to carry (an address of a named prefix is judged by the
IPv4 address it carries alone)."""


def rfc6052_ipv4(ip: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address that IPv4-embedded IPv6 address `ip` carries behind a prefix of `prefix_length` bits (one
    of 32, 40, 48, 56, 64, 96): the 32 bits after the prefix, bits 64-71 (the "u" octet) skipped (RFC 6052 2.2)."""
    value = int(ip)

    def bits(first: int, end: int) -> int:  # bits first..end-1, counted from the most significant
        return (value >> (128 - end)) & ((1 << (end - first)) - 1)

    if prefix_length == 96:
        return ipaddress.IPv4Address(bits(96, 128))
    head = 64 - prefix_length  # the bits before the u octet
    return ipaddress.IPv4Address((bits(prefix_length, 64) << (32 - head)) | bits(72, 104 - head))


def carried_ipv4(ip: ipaddress.IPv6Address, prefixes: Iterable[ipaddress.IPv6Network]) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses `ip` carries, one for each of `prefixes` that holds it (read at that prefix's length), the
    longest prefix's first; [] when none does. Every one, not the first named: of two nested prefixes (a /32 and a
    /48 of it, two gateways) the longer is the one routed to."""
    holding = sorted((prefix for prefix in prefixes if ip in prefix), key=lambda prefix: -prefix.prefixlen)
    return [rfc6052_ipv4(ip, prefix.prefixlen) for prefix in holding]


def parse_prefixes(value: object) -> tuple[ipaddress.IPv6Network, ...]:
    """NAT64 prefixes from `value`: text of prefixes separated by commas or white space ('' for none), or a list of
    them (text or `IPv6Network`); each one checked (`parse_prefix`), duplicates dropped. ValueError naming a bad
    one."""
    if isinstance(value, str):
        items: Iterable[object] = (part for part in re.split(r"[\s,]+", value) if part)
    elif isinstance(value, Iterable):
        items = value
    else:
        raise ValueError(f"must be IPv6 prefixes such as 2001:db8:64::/96, not {value!r}")
    return tuple(dict.fromkeys(parse_prefix(item) for item in items))


def parse_prefix(item: object) -> ipaddress.IPv6Network:
    """One NAT64 prefix: an IPv6 network of a length RFC 6052 allows, with no bits set past it, overlapping no range
    of `_NOT_NAT64` nor holding the well-known prefix (which is a /96 only). ValueError saying what is wrong."""
    text = str(item).strip()
    try:
        prefix = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            loose = None
        if isinstance(loose, ipaddress.IPv6Network):
            raise ValueError(f"{text!r} has bits set past its /{loose.prefixlen} (did you mean {loose}?)") from None
        raise ValueError(f"{text!r} is not an IPv6 prefix such as 2001:db8:64::/96") from None
    if not isinstance(prefix, ipaddress.IPv6Network):
        raise ValueError(f"{text!r} is not an IPv6 prefix such as 2001:db8:64::/96")
    if prefix.prefixlen not in RFC6052_LENGTHS:
        raise ValueError(
            f"{text!r} is a /{prefix.prefixlen}: a NAT64 prefix is a /32, /40, /48, /56, /64 or /96 (RFC 6052)"
        )
    for network, name in _NOT_NAT64:
        if prefix.overlaps(network):
            where = "is within" if prefix.subnet_of(network) else "holds"
            raise ValueError(f"{text!r} {where} {network} ({name}), where no NAT64 prefix is")
    if prefix != WELL_KNOWN and prefix.overlaps(WELL_KNOWN):
        raise ValueError(f"{text!r} holds {WELL_KNOWN}, RFC 6052's well-known prefix, which is a /96 only")
    return prefix
