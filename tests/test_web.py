"""The try-it page, end to end: a real server on a loopback port with a tiny CLIPSeg, and Debian's chromium
driven by Playwright. Results are checked in the pixels of screenshots and in the downloaded files, against
the v1 API's own answers for the same options.

The browser tests skip when /usr/bin/chromium or playwright is missing, except under CI (env CI set), where
they fail instead. Set WEB_SCREENSHOTS=DIR to keep the screenshots they take.
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from automask.settings import Settings

pytest.importorskip("fastapi")

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
TINT = np.array([255, 0, 80], np.float32)  # app.js TINT
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 20_000
# With the tiny random CLIPSeg these thresholds select about 50% and 38% of the astronaut: a real, partial mask.
FIRST = {"prompt": "person", "threshold": 0.5, "grow_mask": 0}


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


# ---- a real server on a loopback port ------------------------------------------------------------------


@dataclass
class Live:
    """A running server: its base URL and the API key the tests use (None: no auth)."""

    url: str
    key: str | None

    def api(self, image: str, **options: Any) -> httpx.Response:
        """POST v1 as any client would (JSON body), with this server's key."""
        headers = {"x-api-key": self.key} if self.key else {}
        body = {"image": image, **options}
        return httpx.post(f"{self.url}/v1/automatic-mask-generator", json=body, headers=headers, timeout=60)


@contextmanager
def serve(settings: Settings, *, auth: bool) -> Iterator[Live]:
    """create_app(...) served by uvicorn in a thread on 127.0.0.1:<free port>; stopped on exit."""
    import uvicorn

    from automask.server import keys
    from automask.server.app import create_app
    from automask.server.config import ServerSettings
    from automask.server.store import Store

    token = keys.create_key(Store.in_data_dir(settings.data_dir), name="web-test")[1] if auth else None
    app = create_app(settings, ServerSettings(host="127.0.0.1", auth=auth))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    live = Live(f"http://127.0.0.1:{port}", token)
    _wait_ready(live.url)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live(tiny_clipseg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("web-data"), model=str(tiny_clipseg_dir))
    with serve(settings, auth=True) as running:
        yield running


# ---- files ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(astronaut: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """skimage's astronaut (512×512 RGB) as a PNG file, as a user would pick it."""
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    return path


def data_uri(path: Path, mime: str = "image/png") -> str:
    """The data URI the page's FileReader makes of `path`."""
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# ---- the browser ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One chromium with a fresh profile for the module (each test opens its own page)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
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


@pytest.fixture()
def page(browser_context: Any, live: Live) -> Iterator[Any]:
    """The page, loaded from the live server, with the test key typed in (as a user would)."""
    tab = browser_context.new_page()
    tab.set_viewport_size(DESKTOP)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    open_page(tab, live)
    yield tab
    tab.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def open_page(tab: Any, live: Live) -> None:
    tab.goto(f"{live.url}/")
    tab.wait_for_selector("body[data-loaded=true]", state="attached")
    if live.key:
        tab.fill("#api-key", live.key)


def pick_photo(tab: Any, path: Path) -> None:
    tab.set_input_files("#file", str(path))
    tab.wait_for_function("() => { const i = document.getElementById('source'); return !i.hidden && i.naturalWidth; }")


def set_slider(tab: Any, selector: str, key: str, times: int = 1) -> None:
    """Move a slider with the keyboard, as a keyboard user would."""
    tab.focus(selector)
    for _ in range(times):
        tab.keyboard.press(key)


def set_first_options(tab: Any) -> None:
    set_slider(tab, "#threshold", "ArrowRight", 30)  # 0.20 -> 0.50
    set_slider(tab, "#grow_mask", "Home")  # 10 -> 0
    assert tab.input_value("#threshold") == "0.5"
    assert tab.input_value("#grow_mask") == "0"


def submit_prompt(tab: Any, prompt: str) -> str:
    """Type the prompt, press Enter, wait for the result; return the result's sequence number."""
    tab.fill("#prompt", prompt)
    tab.press("#prompt", "Enter")
    return wait_result(tab, None)


def wait_result(tab: Any, previous: str | None, **options: Any) -> str:
    """Wait until a result newer than `previous` made with `options` is shown; return its sequence number."""
    tab.wait_for_function(
        """([prev, want]) => {
             const r = document.getElementById('result');
             if (!r.dataset.ready || r.dataset.ready === prev || r.getAttribute('aria-busy') !== 'false') return false;
             const used = JSON.parse(r.dataset.options);
             return Object.entries(want).every(([k, v]) => used[k] === v);
           }""",
        arg=[previous, options],
    )
    ready = tab.get_attribute("#result", "data-ready")
    assert ready is not None
    return str(ready)


def shot(tab: Any, selector: str, name: str) -> np.ndarray:
    """An element's screenshot as an H×W×3 uint8 array (also saved under WEB_SCREENSHOTS)."""
    png = tab.locator(selector).screenshot()
    _keep(png, name)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _keep(png: bytes, name: str) -> None:
    folder = os.environ.get("WEB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.png").write_bytes(png)


def download(tab: Any, button: str) -> bytes:
    with tab.expect_download() as info:
        tab.click(button)
    return Path(info.value.path()).read_bytes()


def check_overlay(before: np.ndarray, after: np.ndarray, mask: np.ndarray, opacity: float) -> None:
    """`after` is `before` blended towards TINT by `opacity` exactly where `mask` (H×W uint8) is 255."""
    assert before.shape == after.shape, "the image moved or resized when the result appeared"
    h, w = before.shape[:2]
    sel = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST)) > 127
    inside = ndimage.binary_erosion(sel, iterations=2)
    outside = ndimage.binary_erosion(~sel, iterations=2)
    assert inside.mean() > 0.1 and outside.mean() > 0.1, "the test needs a partial mask"
    expected = before.astype(np.float32) * (1 - opacity) + TINT * opacity
    err_in = np.abs(after[inside].astype(np.float32) - expected[inside]).mean()
    err_out = np.abs(after[outside].astype(np.float32) - before[outside].astype(np.float32)).mean()
    moved_in = np.abs(after[inside].astype(np.float32) - before[inside].astype(np.float32)).mean()
    assert moved_in > 20, f"the selected pixels barely changed ({moved_in:.1f}): no overlay drawn"
    assert err_in < 3, f"selected pixels are not the image tinted at {opacity:.0%} (mean error {err_in:.1f})"
    assert err_out < 1, f"unselected pixels changed (mean {err_out:.1f})"


# ---- tests without a browser ---------------------------------------------------------------------------


def test_page_and_assets_are_served_locally(live: Live) -> None:
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert '<meta name="viewport"' in html
    refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert refs, "the page references no assets"
    assert not [r for r in refs if r.startswith(("http:", "https:", "//"))], "the page loads something remotely"
    for ref in ("static/app.js", "static/style.css"):
        assert ref in refs
        asset = httpx.get(f"{live.url}/{ref}")
        assert asset.status_code == 200 and len(asset.content) > 1000
        assert "http://" not in asset.text and "https://" not in asset.text.replace("https://example.com", "")
    assert httpx.get(f"{live.url}/static/app.js").headers["content-type"].startswith("text/javascript")


def test_static_serves_only_the_page_assets(live: Live) -> None:
    for name in ("__init__.py", "..%2F__init__.py", "nope.js"):
        res = httpx.get(f"{live.url}/static/{name}")
        assert res.status_code == 404
        assert "error" in res.json()


def test_config_says_key_needed_and_names_the_model(live: Live, tiny_clipseg_dir: Path) -> None:
    config = httpx.get(f"{live.url}/web/config").json()
    assert config["auth"] is True
    assert config["model"] == tiny_clipseg_dir.name  # the folder's name, never the server's path
    assert config["ready"] is True
    assert config["max_image_bytes"] == Settings().max_image_bytes


# ---- browser tests -------------------------------------------------------------------------------------


@pytest.mark.browser
def test_overlay_appears_over_the_photo(page: Any, live: Live, photo: Path) -> None:
    pick_photo(page, photo)
    set_first_options(page)
    before = shot(page, ".layers", "desktop-before")
    submit_prompt(page, FIRST["prompt"])
    after = shot(page, ".layers", "desktop-overlay")
    _keep(page.screenshot(full_page=True), "desktop-page")
    answer = live.api(data_uri(photo), **FIRST)
    assert answer.status_code == 200
    mask = png_array(answer.content)
    check_overlay(before, after, mask, opacity=0.6)
    status = page.inner_text("#status")
    assert re.search(r"Done in \d+ ms|Done in [\d.]+ s", status), status
    selected = int(np.count_nonzero(mask))
    assert f"{selected:,} pixels selected" in status
    # Full opacity: the selected pixels are the tint itself.
    set_slider(page, "#opacity", "End")
    full = shot(page, ".layers", "desktop-overlay-full")
    check_overlay(before, full, mask, opacity=1.0)
    # Side by side: the server's output next to the image, the overlay gone.
    page.check("input[name=view][value=side]")
    assert page.is_visible("#output") and not page.is_visible("#overlay")
    assert page.evaluate("document.getElementById('output').naturalWidth") == mask.shape[1]


@pytest.mark.browser
def test_slider_change_gives_a_new_result(page: Any, live: Live, photo: Path) -> None:
    pick_photo(page, photo)
    set_first_options(page)
    first = submit_prompt(page, FIRST["prompt"])
    mask_a = download(page, "#dl-mask")
    set_slider(page, "#threshold", "ArrowRight", 10)  # 0.50 -> 0.60: the page asks again by itself
    second = wait_result(page, first, threshold=0.6)
    assert page.input_value("#threshold") == "0.6"
    mask_b = download(page, "#dl-mask")
    a, b = png_array(mask_a), png_array(mask_b)
    assert a.shape == b.shape == (512, 512)
    assert np.count_nonzero(b) < np.count_nonzero(a), "a higher threshold must select less"
    answer = live.api(data_uri(photo), **{**FIRST, "threshold": 0.6})
    assert np.array_equal(b, png_array(answer.content))
    assert second != first


@pytest.mark.browser
def test_downloads_equal_the_api_answers(page: Any, live: Live, photo: Path) -> None:
    pick_photo(page, photo)
    set_first_options(page)
    page.check("#invert_mask")
    set_slider(page, "#grow_mask", "ArrowRight", 3)
    submit_prompt(page, FIRST["prompt"])
    options = {**FIRST, "grow_mask": 3, "invert_mask": True}
    image = data_uri(photo)
    for button, extra in (
        ("#dl-mask", {}),
        ("#dl-alpha", {"return_alpha": True}),
        ("#dl-preview", {"return_mask": False}),
    ):
        got = download(page, button)
        answer = live.api(image, **options, **extra)
        assert answer.status_code == 200
        assert got == answer.content, f"{button} differs from the API's answer for the same options"
    mask = png_array(download(page, "#dl-mask"))
    assert mask.ndim == 2 and set(np.unique(mask)) == {0, 255}
    assert png_array(download(page, "#dl-alpha")).shape == (512, 512, 4)


@pytest.mark.browser
def test_output_choice_shows_the_server_output(page: Any, live: Live, photo: Path) -> None:
    pick_photo(page, photo)
    set_first_options(page)
    page.check("input[name=output][value=alpha]")
    submit_prompt(page, FIRST["prompt"])
    page.check("input[name=view][value=side]")
    assert "cut-out" in page.inner_text("#output-caption")
    got = download(page, "#dl-alpha")
    answer = live.api(data_uri(photo), **FIRST, return_alpha=True)
    assert got == answer.content


@pytest.mark.browser
def test_invalid_image_shows_the_server_message(page: Any, live: Live, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image at all")
    page.set_input_files("#file", str(broken))
    page.wait_for_function("document.getElementById('image-info').textContent.includes('cannot show it')")
    page.fill("#prompt", "person")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    answer = live.api(data_uri(broken), prompt="person")
    assert answer.status_code == 400
    message = answer.json()["error"]
    assert message and page.inner_text("#error") == message
    assert "Failed" in page.inner_text("#status")
    assert page.is_disabled("#dl-mask")


@pytest.mark.browser
def test_wrong_key_shows_the_server_message(page: Any, live: Live, photo: Path) -> None:
    pick_photo(page, photo)
    page.fill("#api-key", "am_nothere_wrong")
    page.fill("#prompt", "person")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    answer = httpx.post(
        f"{live.url}/v1/automatic-mask-generator",
        json={"image": data_uri(photo), "prompt": "person"},
        headers={"x-api-key": "am_nothere_wrong"},
    )
    assert answer.status_code == 401
    assert page.inner_text("#error") == answer.json()["error"]
    assert page.evaluate("document.activeElement.id") == "api-key"


@pytest.mark.browser
def test_key_is_kept_in_the_browser(page: Any, live: Live) -> None:
    assert live.key
    page.reload()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    assert page.input_value("#api-key") == live.key
    assert page.is_visible("#api-key")


@pytest.mark.browser
def test_phone_width_is_usable_and_labelled(browser_context: Any, live: Live, photo: Path) -> None:
    tab = browser_context.new_page()
    try:
        tab.set_viewport_size(PHONE)
        open_page(tab, live)
        unlabelled = tab.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button')]
                 .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                               && !(el.tagName === 'BUTTON' && el.textContent.trim()))
                 .map(el => el.id || el.name)"""
        )
        assert unlabelled == []
        pick_photo(tab, photo)
        set_first_options(tab)
        submit_prompt(tab, FIRST["prompt"])
        width = tab.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page scrolls sideways at phone width ({width}px)"
        box = tab.locator(".layers").bounding_box()
        assert box is not None and box["width"] <= PHONE["width"] and box["width"] > 0.8 * PHONE["width"]
        for control in ("#file", "#prompt", "#threshold", "#grow_mask", "#submit", "#dl-mask"):
            control_box = tab.locator(control).bounding_box()
            assert control_box is not None and control_box["x"] >= 0
            assert control_box["x"] + control_box["width"] <= PHONE["width"], control
        _keep(tab.screenshot(full_page=True), "phone-page")
        # Keyboard focus is visible.
        tab.focus("#threshold")
        tab.keyboard.press("Tab")
        outline = tab.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline != "none"
    finally:
        tab.close()


@pytest.mark.browser
def test_local_server_without_auth_hides_the_key(
    browser_context: Any, tiny_clipseg_dir: Path, tmp_path: Path, photo: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny_clipseg_dir))
    with serve(settings, auth=False) as open_server:
        assert httpx.get(f"{open_server.url}/web/config").json()["auth"] is False
        tab = browser_context.new_page()
        try:
            open_page(tab, open_server)
            assert not tab.is_visible("#api-key")
            pick_photo(tab, photo)
            set_first_options(tab)
            submit_prompt(tab, FIRST["prompt"])
            got = download(tab, "#dl-mask")
            assert got == open_server.api(data_uri(photo), **FIRST).content
            assert "no API key needed" in tab.inner_text("#server-info")
        finally:
            tab.close()
