"""The try-it page behind a proxy that strips a path prefix without redirecting `/masks` to `/masks/` (Traefik's
StripPrefix, Caddy's handle_path), the server started with `--public-url http://.../masks`.

Before, the page at `/masks` (no trailing slash) loaded its scripts from `/static/...`, outside the prefix (the
browser resolves `static/app.js` against `/masks` as `/static/app.js`): the proxy had nothing there and the page
stayed blank.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from automask.settings import Settings
from loopback import QuietHandler, serve_http
from web_helpers import Live, open_tab, serve, try_the_docs, wait_result

pytest.importorskip("fastapi")
pytestmark = pytest.mark.browser
PREFIX = "/masks"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "accept-encoding"}


class StripProxy(QuietHandler):
    """Forwards `PREFIX/...` to `upstream/...` (the prefix stripped, `PREFIX` alone as `/`, no redirect), keeping
    the browser's Host; answers 404 outside the prefix and notes what was asked there in `outside`."""

    upstream = ""
    outside: ClassVar[list[str]] = []

    def forward(self) -> None:
        if self.path != PREFIX and not self.path.startswith((PREFIX + "/", PREFIX + "?")):
            self.outside.append(self.path)
            self.send_error(404)
            return
        path = self.path.removeprefix(PREFIX)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        url = self.upstream + (path if path.startswith("/") else "/" + path)
        answer = httpx.request(self.command, url, headers=headers, content=body, timeout=60)
        self.send_response(answer.status_code)
        for name, value in answer.headers.multi_items():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("content-length", str(len(answer.content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.content)

    do_GET = do_HEAD = do_POST = forward


@pytest.fixture(scope="module")
def proxied(tiny_clipseg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The server as `automask serve --public-url http://PROXY/masks` runs it, reached through the proxy."""
    StripProxy.outside = []
    with serve_http(StripProxy) as proxy:
        settings = Settings(data_dir=tmp_path_factory.mktemp("web-data"), model=str(tiny_clipseg_dir))
        with serve(settings, auth=True, public_url=proxy + PREFIX) as live:
            StripProxy.upstream = live.url
            yield Live(proxy + PREFIX, live.key)


@pytest.mark.parametrize("path", ["", "/"])
def test_the_page_works_under_the_prefix_with_or_without_its_slash(context: Any, proxied: Live, path: str) -> None:
    StripProxy.outside.clear()
    with open_tab(context, proxied, path=path) as tab:
        page = tab.page
        page.wait_for_function("() => document.querySelector('.example img')?.naturalWidth > 0")
        page.click("[data-example=astronaut]")
        wait_result(page, None, prompt="person")
        assert len(tab.api_bodies) == 1
        tab.check_console()  # a Content-Security-Policy violation is a console error
    assert StripProxy.outside == [], "the page asked for something outside its prefix"


def test_the_server_asked_directly_shows_a_working_page_or_where_to_go(context: Any, proxied: Live) -> None:
    """The operator opens the server itself, no proxy in front: at `/` the page works (its files from under the
    prefix, the API at the server's root); at `/masks/` it says where the page is. Before, both were blank."""
    direct = Live(StripProxy.upstream, proxied.key)
    with open_tab(context, direct) as tab:
        page = tab.page
        page.wait_for_function("() => document.querySelector('.example img')?.naturalWidth > 0")
        page.click("[data-example=astronaut]")
        wait_result(page, None, prompt="person")
        page.wait_for_selector("#credits[data-credits=unlimited]")  # GET v1/credits at the root too
        tab.check_console()
    page = context.new_page()
    try:
        page.goto(f"{direct.url}{PREFIX}/")
        text = page.inner_text("body")
        assert f"Open the page at {proxied.url}/, through the proxy, or at / on this server itself" in text, text
    finally:
        page.close()


def test_the_docs_work_through_the_proxy_and_on_the_server_itself(context: Any, proxied: Live) -> None:
    """Swagger UI renders and its "Try it out" reaches the API, at `/masks/docs` through the proxy and at `/docs`
    (or `/masks/docs`) on the server itself, where the API is at the root. Before, asked directly, the docs loaded
    their files and OpenAPI document from under the prefix, which the server answered with 404s: a blank page."""
    StripProxy.outside.clear()
    direct = StripProxy.upstream
    for docs, api in ((proxied.url, proxied.url), (direct, direct), (direct + PREFIX, direct)):
        try_the_docs(context, docs, api)
    assert StripProxy.outside == [], "the docs asked for something outside the proxy's prefix"
