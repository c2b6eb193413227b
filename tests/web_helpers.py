"""Helpers of tests/test_web.py: the browser, the page's controls, and pixel checks of its screenshots."""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

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


def data_uri(path: Path, mime: str = "image/png") -> str:
    """The data URI the page's FileReader makes of `path`."""
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


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
    keep(png, name)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def keep(png: bytes, name: str) -> None:
    """Save a screenshot as NAME.png under $WEB_SCREENSHOTS, when set."""
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
