"""The try-it page: static files served by automask itself (no CDN, no build step), mounted on the server's app.

`mount(app, config)` adds three routes to a FastAPI/Starlette app:

- `GET /`              the page (index.html);
- `GET /static/{file}` its script and style sheet;
- `GET /web/config`    what the page needs to know about this server (`PageConfig`, read on every call).

The page itself only calls the public v1 API, like any other client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.applications import Starlette

ASSETS = ("index.html", "app.js", "style.css")
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
NO_CACHE = {"cache-control": "no-cache"}
"""Browsers revalidate (ETag / Last-Modified) so an upgraded automask never runs a stale script."""
PAGE_HEADERS = {
    **NO_CACHE,
    "content-security-policy": "default-src 'self'; img-src * data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
"""Everything the page loads comes from this server; only images (a URL the user types) may come from elsewhere."""


@dataclass(frozen=True)
class PageConfig:
    """What the page shows and asks for.

    auth:  the v1 API wants an `x-api-key` (False: the page hides its key field).
    model: the name of the server's default model (None: not known yet).
    models: the names of every model the server answers with, the default first; the page offers a choice
           (sent as the request's `model`) when there are several.
    ready: the default model is loaded (False: requests will wait for it or fail with a 503).
    max_image_bytes / max_image_pixels: the server's image limits, shown as a hint.
    """

    auth: bool
    model: str | None = None
    models: tuple[str, ...] = ()
    ready: bool | None = None
    max_image_bytes: int | None = None
    max_image_pixels: int | None = None


def assets_dir() -> Path:
    """The folder holding index.html, app.js and style.css (inside the installed package)."""
    return Path(str(resources.files("automask.web")))


def server_config(app: Starlette) -> PageConfig:
    """The `PageConfig` of an app built by `automask.server.app.create_app` (its `app.state.automask`).

    Names models as the API does (a catalogue name, or a folder's name only): the page is public, the server's
    paths are not. Looks at the disk (the installed models): call it off the event loop.
    """
    state = app.state.automask
    runner = state.runner
    return PageConfig(
        auth=state.server.auth,
        model=runner.default,
        models=tuple(entry.name for entry in runner.models()),
        ready=runner.ready,
        max_image_bytes=state.settings.max_image_bytes,
        max_image_pixels=state.settings.max_image_pixels,
    )


def mount(app: Starlette, config: Callable[[], PageConfig] | None = None) -> None:
    """Serve the page at `/`, its assets under `/static/`, and `config()` as JSON at `/web/config`.

    `config` defaults to `server_config(app)`, for apps built by `create_app`.
    """
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    folder = assets_dir()

    async def page(request: Request) -> Response:
        return FileResponse(folder / "index.html", media_type=MEDIA_TYPES[".html"], headers=PAGE_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS or name == "index.html":
            return JSONResponse({"error": f"There is no page asset named {name!r}."}, status_code=404)
        return FileResponse(folder / name, media_type=MEDIA_TYPES[Path(name).suffix], headers=NO_CACHE)

    async def page_config(request: Request) -> Response:
        found = await run_in_threadpool(config or partial(server_config, app))
        return JSONResponse(asdict(found), headers={"cache-control": "no-store"})

    app.router.routes.extend(
        [
            Route("/", page, methods=["GET", "HEAD"], name="web_page"),
            Route("/static/{name}", static, methods=["GET", "HEAD"], name="web_static"),
            Route("/web/config", page_config, methods=["GET"], name="web_config"),
        ]
    )
