"""An image URL that cannot be read is refused (400, nothing charged) without quoting the user name or password written
in it, on v1 and v2, on a real server; the shown URL and the reason leave them out, as they do for a URL that parses.

Before, such a URL was echoed whole, and httpx's reason could quote a piece of the password: 'Refused the image URL
http://user:secret/pw@example.com/x: it is not a valid URL (Invalid port: 'secret').'.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from automask.server import keys as keystore
from server_helpers import keyed_server

URLS = [
    "http://user:secret/pw@example.com/x.png",  # a '/' in the password: httpx reads 'secret' as the port
    "http://user:secret#pw@example.com/x.png",
    "http://user:secret@[::1/x.png",
    "http://user\x00:secret@example.com/x.png",
    "https://user:se\tsecret@exa mple.com/x.png",  # a host flaw named, the password not
    " HTTP://user:secret?x@example.com/x.png",
    "http:///user:secret@example.com/x.png",  # no host (a browser reads it as http://user:secret@example.com/x.png)
]


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[Any]:
    with keyed_server(tmp_path / "data", credits=5) as server:
        yield server


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_refused_url_never_quotes_its_password(live: Any, url: str, version: str) -> None:
    answer = httpx.post(
        f"{live.url}/{version}/automatic-mask-generator", json={"image": url, "prompt": "sofa"}, headers=live.headers
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error.startswith("Refused the image URL ") and "secret" not in error, error
    assert keystore.get_key(live.store, live.key.id).credits == 5


def test_a_url_without_credentials_is_still_shown_with_its_reason(live: Any) -> None:
    answer = httpx.post(
        f"{live.url}/v1/automatic-mask-generator",
        json={"image": "http://example.com/a\x00b.png", "prompt": "sofa"},
        headers=live.headers,
    )
    assert answer.status_code == 400
    assert "example.com/a" in answer.json()["error"] and "non-printable" in answer.json()["error"]
    assert keystore.get_key(live.store, live.key.id).credits == 5
