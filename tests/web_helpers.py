"""Helpers of the page's tests (tests/test_web*.py): live servers, the browser, the page's controls, and pixel
checks of screenshots and downloads.

Screenshots go to $WEB_SCREENSHOTS, else to out/web-screenshots (the folder CI keeps).
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from automask.backends.base import Scores
from automask.settings import Settings
from server_helpers import LiveServer, wait_ready

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TINT = np.array([255, 0, 80], np.float32)  # the overlay colour's default (index.html #tint)
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 20_000
API_PATH = "/v1/automatic-mask-generator"
# With the tiny random CLIPSeg these thresholds select about 50% and 38% of the astronaut: a real, partial mask.
FIRST = {"prompt": "person", "threshold": 0.5, "grow_mask": 0}
HTTP_STATUS_NOISE = "Failed to load resource: the server responded with a status of"


def _browser_unavailable() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    return None


def require_browser() -> None:
    """Skip (fail under CI) when the browser or its driver is missing."""
    reason = _browser_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests must run in CI: {reason}")
    pytest.skip(reason)


# ---- live servers --------------------------------------------------------------------------------------


@dataclass
class Live:
    """A running server: its base URL and the API key the tests use (None: no auth)."""

    url: str
    key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key} if self.key else {}

    def api(self, image: str, **options: Any) -> httpx.Response:
        """POST v1 as any client would (JSON body), with this server's key."""
        body = {"image": image, **options}
        return httpx.post(f"{self.url}{API_PATH}", json=body, headers=self.headers, timeout=60)

    def credits(self) -> int | None:
        """The key's balance from GET /v1/credits (None: unlimited)."""
        res = httpx.get(f"{self.url}/v1/credits", headers=self.headers, timeout=10)
        assert res.status_code == 200, res.text
        value = res.json()["credits"]
        return None if value is None else int(value)

    def settled_credits(self, seconds: float = 10.0) -> int | None:
        """The balance once it stops changing for 0.5 s (a cancelled request's hold may still be settling)."""
        deadline = time.monotonic() + seconds
        last = self.credits()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.credits()
            if now == last:
                return now
            last = now
        return last


@contextmanager
def serve(
    settings: Settings, *, auth: bool, credits: int | None = None, generator: Any = None, **server: Any
) -> Iterator[Live]:
    """create_app(...) served by uvicorn in a thread on 127.0.0.1:<free port>, its model loaded; a key with
    `credits` when `auth`. `server`: more ServerSettings fields (e.g. debug_delay)."""
    from automask.server import keys
    from automask.server.app import create_app
    from automask.server.config import ServerSettings
    from automask.server.store import Store

    token = None
    if auth:
        token = keys.create_key(Store.in_data_dir(settings.data_dir), name="web-test", credits=credits)[1]
    config = ServerSettings(host="127.0.0.1", auth=auth, **server)
    app = create_app(settings, config, generator)
    with LiveServer(app, config if config.root_path else None) as running:  # a prefix: uvicorn's root_path
        wait_ready(running.url, 30)
        yield Live(running.url, token)


class FakeSubject:
    """Stands in for the embedded `subject` model (same name, so it answers only its vocabulary): it selects a
    centred disk (score 1 at the centre, falling to 0 at the border)."""

    name = "subject"
    model_id = "subject"

    def encode(self, image: np.ndarray) -> np.ndarray:
        return image

    def score(self, features: Any, prompts: list[str], *, min_score: float = 0.0) -> Scores:
        h, w = features.shape[:2]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))
        disk = np.clip(1.0 - r, 0.0, 1.0)
        return Scores(maps=np.stack([disk] * len(prompts)), labels=list(prompts))


# ---- the browser ---------------------------------------------------------------------------------------


@contextmanager
def browser(profile: Path) -> Iterator[Any]:
    """One chromium with a fresh profile (each test opens its own tab)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            accept_downloads=True,
            viewport=DESKTOP,
            device_scale_factor=1,
            color_scheme="light",
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()


@dataclass
class Tab:
    """A page in the browser, with what it logged and the API requests it sent (their JSON bodies)."""

    page: Any
    errors: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)
    api_bodies: list[dict[str, Any]] = field(default_factory=list)

    def check_console(self, allow_http_errors: bool = False) -> None:
        """No uncaught error and no console error (answers >= 400 only where the test provoked them)."""
        assert not self.errors, f"errors in the page: {self.errors}"
        if not allow_http_errors:
            assert not self.http_errors, f"failed requests logged: {self.http_errors}"


@contextmanager
def open_tab(context: Any, live: Live, size: dict[str, int] = DESKTOP, path: str = "/") -> Iterator[Tab]:
    """The page loaded from `live` (at `path` under its URL) at `size`, the test key typed in as a user would."""
    page = context.new_page()
    page.set_viewport_size(size)
    tab = Tab(page)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))

    def console(msg: Any) -> None:
        if msg.type == "error":
            (tab.http_errors if msg.text.startswith(HTTP_STATUS_NOISE) else tab.errors).append(msg.text)

    def request(req: Any) -> None:
        if req.method == "POST" and req.url.endswith(API_PATH):
            tab.api_bodies.append(req.post_data_json)

    page.on("console", console)
    page.on("request", request)
    page.goto(f"{live.url}{path}")
    page.evaluate("localStorage.removeItem('automask.settings')")  # each test starts from the defaults
    page.reload()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    if live.key:
        page.fill("#api-key", live.key)
    try:
        yield tab
    finally:
        page.close()


def try_the_docs(context: Any, base: str, api: str) -> None:
    """Open `base`/docs, run "Try it out" on GET /healthz, and check it was asked of `api` and answered; then
    `base`/redoc, and check it shows the API. Neither page asks any other host for anything (each such request is
    refused and noted): the docs work offline and leak nothing."""
    page = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    origin = base.split("/", 3)[:3]

    def handle(route: Any) -> None:
        if route.request.url.split("/", 3)[:3] == origin:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", handle)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{base}/docs")
        page.click("#operations-health-healthz_healthz_get")
        page.click(".try-out__btn")
        with page.expect_response(lambda r: r.url.endswith("/healthz")) as answer:
            page.click(".execute")
        assert answer.value.url == f"{api}/healthz" and answer.value.status == 200, answer.value.url
        assert "automask" in page.inner_text(".info .title")
        page.wait_for_timeout(300)  # anything the page asks for once shown
        assert not errors, f"{base}/docs: {errors}"
        assert elsewhere == [], f"{base}/docs asked another host"
        page.goto(f"{base}/redoc")
        page.wait_for_selector("h1:has-text('automask')")
        page.wait_for_timeout(300)
        assert elsewhere == [], f"{base}/redoc asked another host"
        assert not errors, f"{base}/redoc: {errors}"
    finally:
        page.close()


# ---- the page's controls -------------------------------------------------------------------------------


def data_uri(path: Path, mime: str = "image/png") -> str:
    """The data URI the page's FileReader makes of `path`."""
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def pick_photo(page: Any, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function(
        "() => { const i = document.getElementById('source'); return i.complete && i.naturalWidth; }"
    )
    page.wait_for_selector("#canvas-box:not([hidden])")


def paste_file(page: Any, path: Path) -> None:
    """Ctrl+V with `path` on the clipboard: the paste event goes to the element with the focus."""
    page.evaluate(
        """([b64, name]) => { const data = new DataTransfer();
                              const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                              data.items.add(new File([bytes], name, { type: 'image/png' }));
                              document.activeElement.dispatchEvent(
                                new ClipboardEvent('paste', { clipboardData: data, bubbles: true })); }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name],
    )
    page.wait_for_function("(n) => document.getElementById('image-info').textContent.includes(n)", arg=path.name)


def set_slider(page: Any, selector: str, key: str, times: int = 1) -> None:
    """Move a slider with the keyboard, as a keyboard user would."""
    page.focus(selector)
    for _ in range(times):
        page.keyboard.press(key)


def set_first_options(page: Any) -> None:
    set_slider(page, "#threshold", "ArrowRight", 30)  # 0.20 -> 0.50
    set_slider(page, "#grow_mask", "Home")  # 10 -> 0
    assert page.input_value("#threshold") == "0.5"
    assert page.input_value("#grow_mask") == "0"


def submit_prompt(page: Any, prompt: str, previous: str | None = None) -> str:
    """Type the prompt, press Enter, wait for the result; return the result's sequence number."""
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    return wait_result(page, previous, prompt=prompt)


def wait_result(page: Any, previous: str | None, **options: Any) -> str:
    """Wait until a result newer than `previous` made with `options` is shown; return its sequence number."""
    page.wait_for_function(
        """([prev, want]) => {
             const r = document.getElementById('result');
             const busy = document.getElementById('stage').getAttribute('aria-busy') === 'true';
             if (!r.dataset.ready || r.dataset.ready === prev || busy) return false;
             const used = JSON.parse(r.dataset.options);
             return Object.entries(want).every(([k, v]) => used[k] === v);
           }""",
        arg=[previous, options],
    )
    ready = page.get_attribute("#result", "data-ready")
    assert ready is not None
    return str(ready)


def shot(page: Any, selector: str, name: str) -> np.ndarray:
    """An element's screenshot as an H×W×3 uint8 array (also kept, see `keep`)."""
    png = page.locator(selector).screenshot()
    keep(png, name)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def keep(png: bytes, name: str) -> None:
    """Save a screenshot as NAME.png under $WEB_SCREENSHOTS, else out/web-screenshots."""
    folder = Path(os.environ.get("WEB_SCREENSHOTS") or ROOT / "out" / "web-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.png").write_bytes(png)


def download(page: Any, button: str) -> bytes:
    with page.expect_download() as info:
        page.click(button)
    return Path(info.value.path()).read_bytes()


def in_viewport(page: Any, selector: str) -> bool:
    """The element's box lies entirely inside the window."""
    box = page.locator(selector).bounding_box()
    size = page.viewport_size
    return bool(
        box
        and box["y"] >= -0.5
        and box["x"] >= -0.5
        and box["y"] + box["height"] <= size["height"] + 0.5
        and box["x"] + box["width"] <= size["width"] + 0.5
    )


def check_overlay(
    before: np.ndarray, after: np.ndarray, mask: np.ndarray, opacity: float, tint: np.ndarray = TINT
) -> None:
    """`after` is `before` blended towards `tint` by `opacity` exactly where `mask` (H×W uint8) is 255."""
    assert before.shape == after.shape, "the image moved or resized when the result appeared"
    h, w = before.shape[:2]
    sel = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST)) > 127
    inside = ndimage.binary_erosion(sel, iterations=2)
    outside = ndimage.binary_erosion(~sel, iterations=2)
    assert inside.mean() > 0.1 and outside.mean() > 0.1, "the test needs a partial mask"
    expected = before.astype(np.float32) * (1 - opacity) + tint * opacity
    err_in = np.abs(after[inside].astype(np.float32) - expected[inside]).mean()
    err_out = np.abs(after[outside].astype(np.float32) - before[outside].astype(np.float32)).mean()
    moved_in = np.abs(after[inside].astype(np.float32) - before[inside].astype(np.float32)).mean()
    assert moved_in > 20, f"the selected pixels barely changed ({moved_in:.1f}): no overlay drawn"
    assert err_in < 3, f"selected pixels are not the image tinted at {opacity:.0%} (mean error {err_in:.1f})"
    assert err_out < 1, f"unselected pixels changed (mean {err_out:.1f})"
