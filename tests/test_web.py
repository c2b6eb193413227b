"""The try-it page, end to end: a real server on a loopback port with a tiny CLIPSeg, and Debian's chromium
driven by Playwright. Results are checked in the pixels of screenshots and in the downloaded files, against
the v1 API's own answers for the same options.

The browser tests skip when /usr/bin/chromium or playwright is missing, except under CI (env CI set), where
they fail instead. Set WEB_SCREENSHOTS=DIR to keep the screenshots they take.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from automask.settings import Settings
from loopback import serve_http
from server_helpers import LiveServer, decode, install_as_catalogue, wait_ready
from web_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DESKTOP,
    FIRST,
    PHONE,
    WAIT_MS,
    Live,
    check_overlay,
    data_uri,
    download,
    keep,
    open_page,
    pick_photo,
    require_browser,
    set_first_options,
    set_slider,
    shot,
    submit_prompt,
    wait_result,
)

pytest.importorskip("fastapi")

# ---- a real server on a loopback port ------------------------------------------------------------------


@contextmanager
def serve(settings: Settings, *, auth: bool) -> Iterator[Live]:
    """create_app(...) served by uvicorn in a thread on 127.0.0.1:<free port>, its model loaded."""
    from automask.server import keys
    from automask.server.app import create_app
    from automask.server.config import ServerSettings
    from automask.server.store import Store

    token = keys.create_key(Store.in_data_dir(settings.data_dir), name="web-test")[1] if auth else None
    with LiveServer(create_app(settings, ServerSettings(host="127.0.0.1", auth=auth))) as server:
        wait_ready(server.url, 30)
        yield Live(server.url, token)


@pytest.fixture(scope="module")
def live(tiny_clipseg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The server the page tests use; it may fetch image URLs on loopback (the tests' photo server)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("web-data"), model=str(tiny_clipseg_dir), allow_private_urls=True
    )
    with serve(settings, auth=True) as running:
        yield running


# ---- files ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(astronaut: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """skimage's astronaut (512×512 RGB) as a PNG file, as a user would pick it."""
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    return path


@pytest.fixture(scope="module")
def photo_url(photo: Path) -> Iterator[str]:
    """`photo` served over HTTP on a loopback port, as an image URL a user would paste."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve_http(partial(Quiet, directory=str(photo.parent))) as base:
        yield f"{base}/{photo.name}"


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
    assert config["models"] == [tiny_clipseg_dir.name]
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
    keep(page.screenshot(full_page=True), "desktop-page")
    answer = live.api(data_uri(photo), **FIRST)
    assert answer.status_code == 200
    mask = decode(answer.content)
    check_overlay(before, after, mask, opacity=0.6)
    status = page.inner_text("#status")
    assert re.search(r"Done in \d+ ms|Done in [\d.]+ s", status), status
    assert re.search(r"server (\d+ ms|[\d.]+ s)\)", status), "the server's x-inference-time is not shown"
    assert not page.is_visible("#model"), "one model installed: nothing to choose"
    selected = int(np.count_nonzero(mask))
    assert f"{selected:,} pixels selected" in status
    # Full opacity: the selected pixels are the tint itself.
    set_slider(page, "#opacity", "End")
    full = shot(page, ".layers", "desktop-overlay-full")
    check_overlay(before, full, mask, opacity=1.0)
    # Side by side: the server's output next to the image, the overlay gone.
    page.check("input[name=view][value=side]")
    assert page.is_visible("#output") and not page.is_visible("#overlay")
    keep(page.screenshot(), "desktop-side-by-side")
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
    a, b = decode(mask_a), decode(mask_b)
    assert a.shape == b.shape == (512, 512)
    assert np.count_nonzero(b) < np.count_nonzero(a), "a higher threshold must select less"
    answer = live.api(data_uri(photo), **{**FIRST, "threshold": 0.6})
    assert np.array_equal(b, decode(answer.content))
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
    mask = decode(download(page, "#dl-mask"))
    assert mask.ndim == 2 and set(np.unique(mask)) == {0, 255}
    assert decode(download(page, "#dl-alpha")).shape == (512, 512, 4)


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
def test_large_photo_fits_and_the_overlay_covers_it(page: Any, live: Live, coffee: np.ndarray, tmp_path: Path) -> None:
    big = tmp_path / "coffee-big.jpg"
    Image.fromarray(coffee).resize((1800, 1200)).save(big, quality=90)
    pick_photo(page, big)
    page.fill("#prompt", "cup")
    page.press("#prompt", "Enter")
    wait_result(page, None)
    for size in (DESKTOP, PHONE):
        page.set_viewport_size(size)
        image = page.locator("#source").bounding_box()
        overlay = page.locator("#overlay").bounding_box()
        frame = page.locator("#source").evaluate("el => el.closest('.frame').getBoundingClientRect().toJSON()")
        assert image is not None and overlay is not None
        for side in ("x", "y", "width", "height"):
            assert abs(image[side] - overlay[side]) < 1, (size, side, image, overlay)
        assert image["width"] <= frame["width"] and image["height"] <= size["height"] * 0.75 + 1
        assert abs(image["width"] / image["height"] - 1.5) < 0.01  # not distorted


@pytest.mark.browser
def test_image_from_a_url(page: Any, live: Live, photo_url: str) -> None:
    page.fill("#image-url", photo_url)
    page.press("#image-url", "Tab")  # 'change': the page shows the image from its URL
    page.wait_for_function("() => document.getElementById('source').naturalWidth === 512")
    set_first_options(page)
    submit_prompt(page, FIRST["prompt"])
    got = download(page, "#dl-mask")
    answer = live.api(photo_url, **FIRST)
    assert answer.status_code == 200 and got == answer.content


@pytest.mark.browser
def test_dropped_file_is_used(page: Any, live: Live, photo: Path) -> None:
    page.evaluate(
        """async (b64) => {
             const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
             const data = new DataTransfer();
             data.items.add(new File([bytes], 'dropped.png', { type: 'image/png' }));
             const zone = document.getElementById('drop');
             zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: data, bubbles: true, cancelable: true }));
             zone.dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
           }""",
        base64.b64encode(photo.read_bytes()).decode(),
    )
    page.wait_for_function("() => document.getElementById('source').naturalWidth === 512")
    assert "dropped.png" in page.inner_text("#image-info")
    set_first_options(page)
    submit_prompt(page, FIRST["prompt"])
    assert download(page, "#dl-mask") == live.api(data_uri(photo), **FIRST).content


@pytest.mark.browser
def test_invalid_image_shows_the_server_message(page: Any, live: Live, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image at all")
    page.set_input_files("#file", str(broken))
    page.wait_for_function("() => document.getElementById('image-info').textContent.includes('cannot show it')")
    page.fill("#prompt", "person")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    answer = live.api(data_uri(broken), prompt="person")
    assert answer.status_code == 400
    message = answer.json()["error"]
    assert message and page.inner_text("#error") == message
    keep(page.screenshot(), "desktop-error")
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
        keep(tab.screenshot(full_page=True), "phone-page")
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


@pytest.mark.browser
def test_model_choice_changes_the_result(
    browser_context: Any, tiny_clipseg_dir: Path, tmp_path: Path, photo: Path
) -> None:
    """Two models installed: the default (a folder) and a tiny CLIPSeg of another seed as 'clipseg'."""
    data_dir = tmp_path / "data"
    install_as_catalogue(data_dir, "clipseg", seed=1)
    settings = Settings(data_dir=data_dir, model=str(tiny_clipseg_dir))
    with serve(settings, auth=True) as two:
        tab = browser_context.new_page()
        try:
            open_page(tab, two)
            assert tab.is_visible("#model")
            assert tab.evaluate("document.getElementById('model').labels[0].textContent") == "Model"
            names = tab.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
            assert names == [tiny_clipseg_dir.name, "clipseg"]
            assert tab.input_value("#model") == tiny_clipseg_dir.name
            pick_photo(tab, photo)
            set_first_options(tab)
            first = submit_prompt(tab, FIRST["prompt"])
            default_mask = download(tab, "#dl-mask")
            tab.focus("#model")
            tab.keyboard.press("ArrowDown")  # a keyboard user picks the other model; the page asks again
            assert tab.input_value("#model") == "clipseg"
            wait_result(tab, first, model="clipseg")
            other_mask = download(tab, "#dl-mask")
            image = data_uri(photo)
            assert other_mask == two.api(image, **FIRST, model="clipseg").content
            assert default_mask == two.api(image, **FIRST).content
            changed = np.count_nonzero(decode(other_mask) != decode(default_mask))
            assert changed > 1000, f"the other model changed only {changed} pixels"
            assert "model=clipseg" in tab.inner_text("#facts")
            keep(tab.screenshot(full_page=True), "desktop-two-models")
        finally:
            tab.close()
