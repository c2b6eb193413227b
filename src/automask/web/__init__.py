"""The try-it page: static files served by automask itself (no CDN, no build step), mounted on the server's app.

`mount(app, config)` adds these routes to a FastAPI/Starlette app:

- `GET /`                        the page (index.html);
- `GET /static/{file}`           its scripts (ES modules) and style sheet;
- `GET /static/examples/{file}`  the example photos (from scikit-image's data, see examples/LICENSE.md);
- `GET /web/config`              what the page needs to know about this server (`PageConfig`, read on every call).

A server set up for a proxy that strips a path prefix (`--public-url https://host/prefix`) also serves the page's
files when asked for them under the prefix directly (the page opened on the server itself, at `/`, loads them
from there), and answers a browser asking for `/prefix` or `/prefix/` itself with a page naming the public URL.

The page itself only calls the public v1 API (and `GET /v1/credits`), like any other client: one charged
request per mask; the overlay, cut-out and preview are rendered in the browser from that mask and the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache, partial
from html import escape
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from starlette.applications import Starlette

ASSETS = (
    "index.html",
    "app.js",
    "api.js",
    "auto.js",
    "colours.js",
    "controls.js",
    "credits.js",
    "downloads.js",
    "form.js",
    "image.js",
    "input.js",
    "models.js",
    "orientation.js",
    "prefs.js",
    "render.js",
    "results.js",
    "segments.js",
    "status.js",
    "targets.js",
    "viewer.js",
    "style.css",
)
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".jpg": "image/jpeg",
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
EXTENSION_FIELDS = ("negative_prompt", "feather", "fill_holes", "min_area")
"""Optional request fields (automask extensions) the page offers when this server's options have them."""


@dataclass(frozen=True)
class Example:
    """An example photo: `file` under static/examples/, and a prompt that works with each kind of model."""

    name: str
    file: str
    title: str
    open_prompt: str
    """For an open-vocabulary model (clipseg, grounded-sam...)."""
    embedded_prompt: str
    """For the embedded `subject` model alone (a word of `automask.routing.VOCABULARY`)."""


EXAMPLES = (
    Example("astronaut", "astronaut.jpg", "Astronaut", "person", "person"),
    Example("coffee", "coffee.jpg", "Coffee cup", "cup", "subject"),
    Example("cat", "chelsea.jpg", "Cat", "cat", "subject"),
)


@dataclass(frozen=True)
class ModelChoice:
    """A model the page can send as `model`.

    open_vocabulary: answers any words (False: only the embedded vocabulary; None: not known until it loads).
    """

    name: str
    backend: str | None
    open_vocabulary: bool | None
    loaded: bool
    description: str
    default: bool


@dataclass(frozen=True)
class PageConfig:
    """What the page shows and asks for.

    auth:  the v1 API wants an `x-api-key` (False: the page hides its key field).
    model: the name of the server's default model (None: not known yet).
    models: the names of every model the server answers with, the default first; the page offers a choice when
           there are several.
    choices: the same models, described (`ModelChoice`).
    ready: the default model is loaded (False: requests will wait for it or fail with a 503).
    max_image_bytes / max_image_pixels: the server's image limits, shown as a hint and checked before sending.
    max_body_bytes: the largest request body the server reads (a bigger one is a 413), checked before sending.
    vocabulary: the embedded model's words, per target ('subject', 'person', 'background').
    embedded_words: beside an open-vocabulary model, the vocabulary words go to the embedded model.
    options: the extension fields (of `EXTENSION_FIELDS`) this server accepts.
    examples: the example photos.
    """

    auth: bool
    model: str | None = None
    models: tuple[str, ...] = ()
    choices: tuple[ModelChoice, ...] = ()
    ready: bool | None = None
    max_image_bytes: int | None = None
    max_image_pixels: int | None = None
    max_body_bytes: int | None = None
    vocabulary: dict[str, list[str]] = field(default_factory=dict)
    embedded_words: bool = False
    options: tuple[str, ...] = ()
    examples: tuple[Example, ...] = EXAMPLES


def assets_dir() -> Path:
    """The folder holding index.html, the scripts and the style sheet (inside the installed package)."""
    return Path(str(resources.files("automask.web")))


def vocabulary() -> dict[str, list[str]]:
    """`automask.routing.VOCABULARY` grouped by target: {'subject': [...], 'person': [...], 'background': [...]}."""
    from automask.routing import VOCABULARY, Target

    return {t.value: [w for w, target in VOCABULARY.items() if target is t] for t in Target}


def supported_options() -> tuple[str, ...]:
    """The `EXTENSION_FIELDS` the request options of this automask have."""
    from automask.options import MaskOptions

    return tuple(name for name in EXTENSION_FIELDS if name in MaskOptions.model_fields)


def server_config(app: Starlette) -> PageConfig:
    """The `PageConfig` of an app built by `automask.server.app.create_app` (its `app.state.automask`).

    Names models as the API does (a catalogue name, or a folder's name only): the page is public, the server's
    paths are not. Looks at the disk (the installed models): call it off the event loop.
    """
    from automask.models import EMBEDDED, is_installed

    state = app.state.automask
    dispatcher = state.dispatcher  # where requests run (in-process models or workers): see automask.server.dispatch
    choices = tuple(
        ModelChoice(
            name=e.name,
            backend=e.backend,
            open_vocabulary=None if e.backend is None else e.backend != EMBEDDED,
            loaded=e.loaded,
            description=e.description,
            default=e.default,
        )
        for e in dispatcher.models()
    )
    return PageConfig(
        auth=state.server.auth,
        model=dispatcher.default,
        models=tuple(c.name for c in choices),
        choices=choices,
        ready=dispatcher.readiness() is None,
        max_image_bytes=state.settings.max_image_bytes,
        max_image_pixels=state.settings.max_image_pixels,
        max_body_bytes=state.body_limit,
        vocabulary=vocabulary(),
        embedded_words=bool(state.settings.route_embedded and is_installed(EMBEDDED, state.settings)),
        options=supported_options(),
    )


@cache  # one prefix per server: the file is read once, not at every page request
def page_html(root: str) -> str:
    """index.html with its style sheet and script at `root`/static/ (`root`: the path prefix a proxy strips, as
    `--public-url` gives it), so the page loads them from under the prefix whether it was asked for at `root` or
    `root`/ (a proxy that strips the prefix without redirecting `root` to `root`/, as Traefik's StripPrefix and
    Caddy's handle_path do). The scripts find the API from their own address (api.js)."""
    text = (assets_dir() / "index.html").read_text(encoding="utf-8")
    for attribute in ("href", "src"):
        text = text.replace(f'{attribute}="static/', f'{attribute}="{escape(root)}/static/')
    return text


@cache
def misdirected_html(public_url: str) -> str:
    """The page a browser gets asking a server set up for a stripping proxy (`--public-url` with a path) for that
    path itself: it names the page's public address, and the server's own root, where the page works directly."""
    public, root = escape(public_url.rstrip("/")), escape(urlsplit(public_url).path.rstrip("/"))
    return (
        '<!doctype html>\n<html lang="en">\n<head><meta charset="utf-8"><title>automask: not here</title></head>\n'
        f"<body>\n<h1>automask: the page is not at {root}/ on this server</h1>\n"
        f"<p>This server is set up (<code>--public-url {public}</code>) for a reverse proxy that strips "
        f"<code>{root}</code> from the path before passing a request on, so it has nothing at <code>{root}/</code> "
        "itself (a proxy that passes the prefix on needs to strip it).</p>\n"
        f'<p>Open the page at <a href="{public}/">{public}/</a>, through the proxy, or at <code>/</code> on this '
        "server itself (e.g. <code>http://127.0.0.1:8000/</code> on its machine).</p>\n</body>\n</html>\n"
    )


def mount(app: Starlette, config: Callable[[], PageConfig] | None = None, public_url: str | None = None) -> None:
    """Serve the page at `/`, its assets under `/static/`, and `config()` as JSON at `/web/config`.

    `config` defaults to `server_config(app)`, for apps built by `create_app`. `public_url` (`--public-url`): its
    path is the prefix a proxy strips; the page's assets are served under it too, and a browser asking for the
    prefix itself is told where the page is (`misdirected_html`).
    """
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    folder = assets_dir()
    examples = {e.file for e in EXAMPLES}

    def not_found(name: str) -> Response:
        return JSONResponse({"error": f"There is no page asset named {name!r}."}, status_code=404)

    async def page(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        if not root:
            return FileResponse(folder / "index.html", media_type=MEDIA_TYPES[".html"], headers=PAGE_HEADERS)
        return Response(page_html(root), media_type=MEDIA_TYPES[".html"], headers=PAGE_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS or name == "index.html":
            return not_found(name)
        return FileResponse(folder / name, media_type=MEDIA_TYPES[Path(name).suffix], headers=NO_CACHE)

    async def example(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in examples:
            return not_found(f"examples/{name}")
        return FileResponse(folder / "examples" / name, media_type=MEDIA_TYPES[".jpg"], headers=NO_CACHE)

    async def page_config(request: Request) -> Response:
        found = await run_in_threadpool(config or partial(server_config, app))
        return JSONResponse(asdict(found), headers={"cache-control": "no-store"})

    async def misdirected(request: Request) -> Response:
        if public_url is None or "text/html" not in request.headers.get("accept", ""):
            raise HTTPException(404)  # an API client: the JSON 404 of any unknown path
        return Response(misdirected_html(public_url), 404, media_type=MEDIA_TYPES[".html"], headers=PAGE_HEADERS)

    get = ["GET", "HEAD"]
    routes = [
        Route("/", page, methods=get, name="web_page"),
        Route("/static/examples/{name}", example, methods=get, name="web_example"),
        Route("/static/{name}", static, methods=get, name="web_static"),
        Route("/web/config", page_config, methods=["GET"], name="web_config"),
    ]
    root = urlsplit(public_url).path.rstrip("/") if public_url else ""
    if root:  # asked directly under the prefix (the proxy strips it): the page's files; the prefix itself
        routes += [
            Route(root + "/static/examples/{name}", example, methods=get, name="web_example_under_prefix"),
            Route(root + "/static/{name}", static, methods=get, name="web_static_under_prefix"),
            Route(root, misdirected, methods=get, name="web_prefix"),
            Route(root + "/", misdirected, methods=get, name="web_prefix_slash"),
        ]
    app.router.routes.extend(routes)
