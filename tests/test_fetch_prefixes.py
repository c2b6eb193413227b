"""The URL guard's address wording and the operator's own NAT64 prefixes (`Settings.nat64_prefixes`), through
`fetch_url` / `check_url` with a fake resolver: no test connects anywhere."""

from __future__ import annotations

import re

import pytest

from automask.errors import URLRefusedError
from automask.imageio.fetch import check_url
from automask.settings import Settings


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
