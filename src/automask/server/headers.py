"""`EdgeMiddleware`: the response headers every answer carries; `DocsMiddleware`: Swagger UI served from this server.

Headers: every answer gets `x-content-type-options: nosniff`; every answer that sets no `cache-control` of its
own gets `cache-control: no-store` (API answers hold results, keys' data and per-key errors: no browser or
shared cache may keep them). The try-it page and its files keep the `no-cache` they set (browsers store them
but revalidate with ETag / Last-Modified, so an upgrade is never served stale), and so do Swagger UI's files.

Docs: FastAPI's `/docs` and `/redoc` pages load Swagger UI and ReDoc from a CDN (and ReDoc Google's fonts). When
the `fastapi-offline` package (MIT; a copy of swagger-ui-dist 5 and of ReDoc) is installed, as the `server` extra
does, `GET /docs` and `GET /redoc` are answered here with pages that load them from `/docs/assets/` instead, so the
docs work on a host with no internet and leak nothing to a CDN (ReDoc's script is served without the address of its
maker's logo, on cdn.redoc.ly). Without that package, FastAPI's own pages (CDN) answer, in no frame either (as
here: `UNFRAMED`). On a server set up for a proxy that strips a prefix (`--public-url` with a path), the docs load
everything from under the prefix; asked for there directly (the docs opened on the server itself), Swagger UI's
files are served too, and the OpenAPI document without the prefix in its `servers`, so "Try it out" calls the API
at this server's root.
"""

from __future__ import annotations

from functools import cache
from hashlib import sha256
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles

from automask.server.bodies import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")
NO_STORE = (b"cache-control", b"no-store")
UNFRAMED = ((b"content-security-policy", b"frame-ancestors 'none'"), (b"x-frame-options", b"DENY"))
"""The docs pages are shown in no other site's frame (where "Try it out" and "Authorize", which takes an API key,
could be clicked through a disguise: clickjacking), as the web page is not."""
DOCS = "/docs"
REDOC = "/redoc"
DOCS_ASSETS = "/docs/assets"
REDOC_JS = "redoc.standalone.js"
REDOC_LOGO = b'"https://cdn.redoc.ly/redoc/logo-mini.svg"'
"""ReDoc's image beside "API docs by Redocly", loaded from its maker's site; without it (an image that fails to
load, here `data:,`), ReDoc leaves the link's text alone."""


@cache
def redoc_script(folder: Path) -> tuple[bytes, str]:
    """ReDoc's script without the address of its maker's logo (`REDOC_LOGO`), and its ETag."""
    body = (folder / REDOC_JS).read_bytes().replace(REDOC_LOGO, b'"data:,"')
    return body, f'"{sha256(body).hexdigest()[:32]}"'


@cache
def swagger_assets() -> Path | None:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css (fastapi-offline's), or None."""
    try:
        folder = Path(str(resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


class EdgeMiddleware:
    """Adds `nosniff` and (unless set) `cache-control: no-store` to every HTTP answer (outermost: the answers of
    every middleware within, the request id's 500 and the docs included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != NOSNIFF[0]]
                headers.append(NOSNIFF)
                if not any(k.lower() == NO_STORE[0] for k, _v in headers):
                    headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class DocsMiddleware:
    """Serves `/docs`, `/redoc`, their files and (asked directly under the prefix) the OpenAPI document locally;
    passes everything else on. Within the request id's middleware, so that these answers carry an `x-request-id`
    and are logged as every other answer is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        folder = swagger_assets()
        self.folder = folder
        self.assets = StaticFiles(directory=folder) if folder else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "")
        local, direct = local_path(scope["path"], root)
        app = scope.get("app")
        if scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
        elif direct and app is not None and local == app.openapi_url:
            # the docs opened on this server itself (no proxy): their "Try it out" calls the API here, at the root
            await JSONResponse(app.openapi())(scope, receive, send)
        elif self.assets is None:  # FastAPI's own pages (CDN), framed nowhere all the same
            await self.app(scope, receive, _adding(send, *UNFRAMED) if local in (DOCS, REDOC) else send)
        elif local == DOCS:
            await _docs_page(scope, root)(scope, receive, send)
        elif local == REDOC:
            await _redoc_page(scope, root)(scope, receive, send)
        elif local == f"{DOCS_ASSETS}/{REDOC_JS}" and self.folder is not None:
            await _redoc_script(scope, self.folder)(scope, receive, send)
        elif local.startswith(DOCS_ASSETS + "/"):
            try:
                files = {**scope, "path": root + local, "root_path": root + DOCS_ASSETS}  # the path under the root
                await self.assets(files, receive, _adding(send, (b"cache-control", b"no-cache")))
            except HTTPException:
                message = f"No file {local.removeprefix(DOCS_ASSETS + '/')[:100]!r} in the API docs' assets."
                await JSONResponse({"error": message}, status_code=404)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def local_path(path: str, root: str) -> tuple[str, bool]:
    """The path `path` names under this server's root (uvicorn's `root_path`, `root`, taken off), and whether the
    client sent the prefix `root` itself: it asked this server directly, not through the proxy that strips it (the
    docs at `/docs` on the server itself load their files and OpenAPI document from under the prefix)."""
    local = path.removeprefix(root) if root and path.startswith(root) else path
    if root and (local == root or local.startswith(root + "/")):
        return local.removeprefix(root), True
    return local, False


def _docs_page(scope: Scope, root: str) -> Any:
    """FastAPI's Swagger UI page, pointed at this server's copy of Swagger UI."""
    app = scope.get("app")
    title = getattr(app, "title", "automask")
    response = get_swagger_ui_html(
        openapi_url=root + (getattr(app, "openapi_url", None) or "/openapi.json"),
        title=f"{title} - Swagger UI",
        swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        oauth2_redirect_url=getattr(app, "swagger_ui_oauth2_redirect_url", None),
        swagger_ui_parameters=getattr(app, "swagger_ui_parameters", None),
    )
    return _unframed(response)


def _unframed(response: Any) -> Any:
    """A docs page revalidated each time, and shown in no other site's frame (`UNFRAMED`)."""
    response.headers["cache-control"] = "no-cache"
    for name, value in UNFRAMED:
        response.headers[name.decode()] = value.decode()
    return response


def _redoc_page(scope: Scope, root: str) -> Any:
    """FastAPI's ReDoc page, pointed at this server's copy of ReDoc, without Google's fonts."""
    app = scope.get("app")
    response = get_redoc_html(
        openapi_url=root + (getattr(app, "openapi_url", None) or "/openapi.json"),
        title=f"{getattr(app, 'title', 'automask')} - ReDoc",
        redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        with_google_fonts=False,
    )
    return _unframed(response)


def _redoc_script(scope: Scope, folder: Path) -> Response:
    """`redoc_script`, revalidated by ETag like the other docs' files (304 when the browser has it). The tags asked
    for compare weakly (RFC 9110 13.1.2): a compressing proxy's `W/"…"` of this ETag matches too."""
    body, etag = redoc_script(folder)
    headers = {"etag": etag, "cache-control": "no-cache"}
    asked = dict(scope["headers"]).get(b"if-none-match", b"").decode("latin-1")
    if etag in (tag.strip().removeprefix("W/") for tag in asked.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(body, headers=headers, media_type="text/javascript")


def _adding(send: Send, *headers: tuple[bytes, bytes]) -> Send:
    """`send`, adding `headers` to the answer: `no-cache` to Swagger UI's files (revalidated by ETag, like the page's
    own files), `UNFRAMED` to FastAPI's own docs pages."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *headers]
        await send(message)

    return wrapped
