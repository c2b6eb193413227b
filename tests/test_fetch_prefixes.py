"""The URL guard's address wording and the operator's own NAT64 prefixes (`Settings.nat64_prefixes`), through
`fetch_url` / `check_url` with a fake resolver: no test connects anywhere."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from automask.cli import main
from automask.errors import InvalidOptionError, PrivateAddressError, URLRefusedError
from automask.imageio.fetch import blocked_reason, check_url, fetch_url, never_fetched
from automask.settings import Settings
from test_fetch import fake_resolver, rfc6052


@pytest.mark.parametrize(
    ("host", "allow_private", "phrase"),
    [
        ("[::ffff:169.254.169.254]", True, ", an IPv4-mapped cloud metadata address"),
        ("[::ffff:10.0.0.1]", False, ", an IPv4-mapped private address"),
        ("[::]", False, "is an unspecified address"),
        ("0.0.0.0", False, "is an unspecified address"),
        ("[64:ff9b::]", False, "is a NAT64 form of an unspecified address"),
        ("[2002:c000:c8::1]", False, "is a 6to4 tunnel to an IETF protocol assignment"),
        ("[64:ff9b::c000:c8]", False, "is a NAT64 form of an IETF protocol assignment"),
        ("[fd12:3456::1]", False, "is a unique-local address"),
    ],
)
def test_a_refusal_reads_with_the_right_article(host: str, allow_private: bool, phrase: str) -> None:
    """Before: "::ffff:169.254.169.254 is a IPv4-mapped cloud metadata address", "a unspecified", "to a IETF"."""
    with pytest.raises(URLRefusedError) as caught:
        check_url(f"http://{host}/a.png", Settings(allow_private_urls=allow_private))
    assert phrase in caught.value.message, caught.value.message
    assert not re.search(r"\ba (?!uni)[aeiouAEIOU]", caught.value.message), caught.value.message


# --- the operator's own NAT64 prefixes ----------------------------------------------------------------------

# Network-specific prefixes of every length RFC 6052 allows: global-looking ones (a provider's own space, which the
# guard takes for public), a unique-local one and one of the local-use 64:ff9b:1::/48.
GLOBAL_PREFIXES = ["2a00:1::/32", "2a00:1:100::/40", "2a00:1:64::/48", "2a00:1:64:300::/56", "2a00:1:64:344::/64"]
PREFIXES = [*GLOBAL_PREFIXES, "2a00:1:64:344::/96", "fd00:64::/96", "64:ff9b:1:abcd::/64"]


def _fetch_via(prefix: str, ipv4: str, settings: Settings) -> None:
    """Fetch http://images.test/a.png, whose DNS64 answer is `ipv4` embedded in `prefix` (fails if not refused)."""
    resolve = fake_resolver({"images.test": [str(rfc6052(prefix, ipv4))]})
    fetch_url("http://images.test/a.png", settings, resolve=resolve)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("ipv4", ["169.254.169.254", "100.100.100.200", "169.254.1.1"])
def test_metadata_through_a_named_nat64_prefix_is_never_fetched(prefix: str, ipv4: str) -> None:
    """Before: a network with a NAT64 prefix of its own (not 64:ff9b::/96) mapped 169.254.169.254 to an address
    such as 2a00:1:64:344:a9:fea9:fe00:0, which was fetched with private URLs allowed (and without, for a
    global-looking prefix). Now the prefixes named in `nat64_prefixes` are read at their RFC 6052 position."""
    settings = Settings(allow_private_urls=True, nat64_prefixes=prefix, fetch_timeout=1.0)
    with pytest.raises(URLRefusedError, match=r"a NAT64 form of a cloud metadata|NAT64 form of a link-local"):
        _fetch_via(prefix, ipv4, settings)
    address = rfc6052(prefix, ipv4)
    assert never_fetched(address, settings.nat64_prefixes)
    assert prefix.startswith("64:ff9b:1:") or not never_fetched(address)  # (the local-use /48 was read already)
    with pytest.raises(URLRefusedError, match="never fetches from cloud metadata"):
        check_url(f"http://[{address}]/a.png", settings)  # at submit time (a v2 job) too


@pytest.mark.parametrize("prefix", GLOBAL_PREFIXES)
@pytest.mark.parametrize("ipv4", ["10.0.0.1", "127.0.0.1", "192.168.1.1", "100.64.0.1"])
def test_a_private_address_through_a_named_global_nat64_prefix_is_refused(prefix: str, ipv4: str) -> None:
    """The prefix looks global, so its addresses passed the check whatever IPv4 address they carried."""
    address = rfc6052(prefix, ipv4)
    assert blocked_reason(address) is None  # what the guard saw before: a public address
    settings = Settings(nat64_prefixes=[prefix], fetch_timeout=1.0)
    with pytest.raises(PrivateAddressError, match=r"is a NAT64 form of a (private|loopback|shared)"):
        check_url(f"http://[{address}]/a.png", settings)
    with pytest.raises(PrivateAddressError, match="NAT64 form of a"):
        _fetch_via(prefix, ipv4, settings)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_public_address_through_a_named_nat64_prefix_is_fetched(prefix: str) -> None:
    """As for 64:ff9b::/96: the IPv4 address carried is judged, not the prefix (so a unique-local or local-use
    NAT64 prefix, once named, reaches public IPv4-only hosts; unnamed, it stays refused)."""
    address = rfc6052(prefix, "8.8.8.8")
    settings = Settings(nat64_prefixes=prefix)
    assert blocked_reason(address, settings.nat64_prefixes) is None
    check_url(f"http://[{address}]/a.png", settings)
    if not prefix.startswith("2a00"):
        assert blocked_reason(address) is not None


def test_an_address_outside_the_named_prefixes_is_judged_as_before() -> None:
    settings = Settings(nat64_prefixes="2a00:1:64::/96")
    assert blocked_reason(ipaddress.ip_address("2a00:1:65::a00:1"), settings.nat64_prefixes) is None
    assert blocked_reason(ipaddress.ip_address("fd00::808:808"), settings.nat64_prefixes) == "unique-local"


def test_nat64_prefixes_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOMASK_NAT64_PREFIXES", " 2a00:1:64::/96,fd00:64::/96  64:ff9b:1:abcd::/64, ")
    expected = ("2a00:1:64::/96", "fd00:64::/96", "64:ff9b:1:abcd::/64")
    assert Settings().nat64_prefixes == tuple(ipaddress.IPv6Network(p) for p in expected)
    monkeypatch.setenv("AUTOMASK_NAT64_PREFIXES", "")
    assert Settings().nat64_prefixes == ()


BAD_PREFIXES = [
    ("2a00:1:64::/97", r"'2a00:1:64::/97' is a /97: a NAT64 prefix is a /32, /40, /48, /56, /64 or /96"),
    ("2a00:1:64::", r"'2a00:1:64::' is a /128"),
    ("10.0.0.0/8", r"'10.0.0.0/8' is not an IPv6 prefix"),
    ("nat64", r"'nat64' is not an IPv6 prefix"),
    ("2a00:1:64::1/96", r"'2a00:1:64::1/96' has bits set past its /96 \(did you mean 2a00:1:64::/96\?\)"),
    ("fe80::/64", r"'fe80::/64' is within fe80::/10 \(link-local\)"),
    ("2002::/32", r"'2002::/32' is within 2002::/16 \(6to4\)"),
    ("::ffff:0:0/96", r"'::ffff:0:0/96' is within ::ffff:0:0/96 \(IPv4-mapped\)"),
    ("ff0e::/32", r"'ff0e::/32' is within ff00::/8 \(multicast\)"),
    ("64:ff9b::/64", r"'64:ff9b::/64' holds 64:ff9b::/96"),
]


@pytest.mark.parametrize(("value", "words"), BAD_PREFIXES)
def test_a_bad_nat64_prefix_is_a_clear_error(value: str, words: str) -> None:
    with pytest.raises(InvalidOptionError, match=r"^nat64_prefixes \(AUTOMASK_NAT64_PREFIXES\): " + words):
        Settings(nat64_prefixes=f"2a00:2::/96, {value}")


def test_the_well_known_prefix_may_be_named_too() -> None:
    assert Settings(nat64_prefixes="64:ff9b::/96").nat64_prefixes == (ipaddress.IPv6Network("64:ff9b::/96"),)


def test_the_command_line_takes_nat64_prefixes_and_refuses_bad_ones(tmp_path: Path, tiny_clipseg_dir: Path) -> None:
    address = rfc6052("2a00:1:64::/96", "169.254.169.254")
    url = f"http://[{address}]/a.png"
    args = ["mask", url, "-p", "cat", "--model", str(tiny_clipseg_dir), "-o", str(tmp_path / "m.png")]
    cli = CliRunner()
    flags = ["--data-dir", str(tmp_path), "--allow-private-urls", "--nat64-prefix", "2a00:2::/96"]
    refused = cli.invoke(main, [*flags, "--nat64-prefix", "2a00:1:64::/96", *args])
    assert refused.exit_code == 3, refused.output
    assert "a NAT64 form of a cloud metadata address" in refused.stderr
    from_env = cli.invoke(main, ["--data-dir", str(tmp_path), *args], env={"AUTOMASK_NAT64_PREFIXES": "2a00:1:64::/96"})
    assert from_env.exit_code == 3 and "a NAT64 form of a cloud metadata address" in from_env.stderr
    bad_flag = cli.invoke(main, ["--nat64-prefix", "2a00:1:64::/97", "models", "list"])
    assert bad_flag.exit_code == 2, bad_flag.output
    assert "Invalid value for '--nat64-prefix': '2a00:1:64::/97' is a /97" in bad_flag.stderr
    bad_env = cli.invoke(main, ["serve", "--port", "0"], env={"AUTOMASK_NAT64_PREFIXES": "fe80::/64"})
    assert bad_env.exit_code == 2, bad_env.output  # at start-up, before anything listens
    assert "error: nat64_prefixes (AUTOMASK_NAT64_PREFIXES): 'fe80::/64' is within fe80::/10" in bad_env.stderr
    assert not (tmp_path / "automask.db").exists()


# --- host names no resolver takes ---------------------------------------------------------------------------

LONG_NAME = ".".join(["a" * 63] * 4)  # 255 characters


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("a" * 64 + ".example.com", "its host name has a label of 64 characters; a label is at most 63"),
        ("images..example.com", "its host name has an empty label"),
        (".example.com", "its host name has an empty label"),
        (LONG_NAME, "its host name is 255 characters long; a host name is at most 253"),
    ],
)
def test_a_host_name_no_resolver_takes_is_refused_at_once(host: str, words: str) -> None:
    """Before: accepted at submit time (`check_url`), then a 502 when fetched: "Could not resolve the image URL's
    host ...: encoding with 'idna' codec failed (UnicodeError: label empty or too long)", the server blamed for the
    client's URL. Now a 400 naming what is wrong, before any lookup."""
    called: list[str] = []

    def resolve(name: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        called.append(name)
        return [ipaddress.ip_address("8.8.8.8")]

    for attempt in (lambda: check_url(f"http://{host}/a.png", Settings()), lambda: _fetch(host, resolve)):
        with pytest.raises(URLRefusedError, match=re.escape(words)):
            attempt()
    assert called == []


def _fetch(host: str, resolve: Callable[[str, int], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]) -> None:
    fetch_url(f"http://{host}/a.png", Settings(fetch_timeout=1.0), resolve=resolve)


@pytest.mark.parametrize(
    "host", ["a" * 63 + ".example.com", "example.com.", ".".join(["a" * 63] * 3 + ["a" * 61]), "xn--bcher-kva.example"]
)
def test_host_names_at_the_limits_pass_the_check(host: str) -> None:
    check_url(f"http://{host}/a.png", Settings())


def test_a_named_prefix_of_the_local_use_range_is_read_at_its_own_position_only() -> None:
    """64:ff9b:1::/48 is read at every RFC 6052 position while no prefix is named; a named one says where its IPv4
    address is. Before: 8.8.8.8 through 64:ff9b:1:a9fe:a9fe::/96 (whose /48 reading is 169.254.169.254) was fetched
    by default but refused with private URLs allowed."""
    settings = Settings(nat64_prefixes="64:ff9b:1:a9fe:a9fe::/96", allow_private_urls=True)
    address = rfc6052("64:ff9b:1:a9fe:a9fe::/96", "8.8.8.8")
    assert never_fetched(address)  # unnamed: read at every position
    assert not never_fetched(address, settings.nat64_prefixes)
    check_url(f"http://[{address}]/a.png", settings)
    check_url(f"http://[{address}]/a.png", Settings(nat64_prefixes=settings.nat64_prefixes))


@pytest.mark.parametrize("order", [1, -1])
@pytest.mark.parametrize("allow_private", [False, True])
def test_an_address_in_nested_named_prefixes_is_judged_at_each_of_their_positions(
    order: int, allow_private: bool
) -> None:
    """Two named prefixes, one inside the other (a /32 and a /48 of it: two gateways, the longer one routed to).
    Before: the address was read at the first one named only, so 169.254.169.254 or 10.0.0.1 behind the /48
    (2a00:1:808:a9fe:a9:fe00::, whose /32 reading is 8.8.169.254, a public address) was fetched, private URLs
    allowed or not. Now an address is refused when any of its readings is."""
    prefixes = ["2a00:1::/32", "2a00:1:808::/48"][::order]
    settings = Settings(nat64_prefixes=prefixes, allow_private_urls=allow_private, fetch_timeout=1.0)
    for prefix in prefixes:
        address = rfc6052(prefix, "169.254.169.254")
        assert never_fetched(address, settings.nat64_prefixes), (prefix, address)
        assert "NAT64 form of a cloud metadata" in str(blocked_reason(address, settings.nat64_prefixes)), address
        with pytest.raises(URLRefusedError, match="a NAT64 form of a cloud metadata address"):
            check_url(f"http://[{address}]/a.png", settings)
    private = rfc6052("2a00:1:808::/48", "10.0.0.1")
    assert "NAT64 form of a private" in str(blocked_reason(private, settings.nat64_prefixes)), private
    public = rfc6052("2a00:1:808::/48", "8.8.8.8")  # both readings public: 8.8.8.8, and 8.8.8.8 at the /32
    check_url(f"http://[{public}]/a.png", settings)
