"""The try-it page while the server works (part 3): a slow server (each mask takes SLOW_S), Enter pressed again,
the downloads the server renders, and their Cancel. See test_web.py for how the tests run."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import web_helpers
from automask.settings import Settings
from server_helpers import decode
from test_colour_profiles import WIDE_ICC
from web_helpers import API_PATH, FIRST, Live, Tab, data_uri, download, open_tab, pick_photo, serve, set_slider

pytest.importorskip("fastapi")
pytestmark = pytest.mark.browser
SLOW_S = 1.5
TICKING = (  # the status line while the server renders a cut-out: what, and the seconds it has taken so far
    "() => /^Asking the server for the cut-out.*… \\d+\\.\\d s\\.$/.test(document.getElementById('status').textContent)"
)


@pytest.fixture(scope="module")
def slow(tiny_clipseg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("web-data"), model=str(tiny_clipseg_dir))
    with serve(settings, auth=True, credits=100, debug_delay=SLOW_S) as running:
        yield running


@pytest.fixture()
def tab(context: Any, slow: Live) -> Iterator[Tab]:
    with open_tab(context, slow) as opened:
        yield opened
        opened.check_console()


def aborted_posts(page: Any) -> list[dict[str, Any]]:
    """The bodies of the API requests the page aborts from now on (filled in as it does)."""
    aborted: list[dict[str, Any]] = []
    page.on("requestfailed", lambda req: aborted.append(req.post_data_json) if req.url.endswith(API_PATH) else None)
    return aborted


def first_options(page: Any) -> None:
    set_slider(page, "#threshold", "ArrowRight", 30)  # 0.20 -> 0.50
    set_slider(page, "#grow_mask", "Home")  # 10 -> 0


def ask_first(page: Any, photo: Path) -> None:
    """Choose `photo`, set the first options, and ask for the first prompt's mask (Enter)."""
    pick_photo(page, photo)
    first_options(page)
    page.fill("#prompt", FIRST["prompt"])
    page.press("#prompt", "Enter")


def wide_gamut_result(page: Any, slow: Live, astronaut: np.ndarray, folder: Path) -> int:
    """Mask a wide-gamut photo (its cut-out and preview the server's: one more request each), threshold 0.5;
    return the key's credits then."""
    wide = folder / "wide-gamut.png"
    Image.fromarray(astronaut).save(wide, icc_profile=WIDE_ICC)
    ask_first(page, wide)
    wait_shown(page, 0.5)
    start = slow.settled_credits()
    assert start is not None
    return start


def wait_shown(page: Any, threshold: float) -> None:
    page.wait_for_function(
        """(t) => { const r = document.getElementById('result');
                    return document.getElementById('stage').getAttribute('aria-busy') === 'false' && r.dataset.options
                      && JSON.parse(r.dataset.options).threshold === t; }""",
        arg=threshold,
    )


def test_enter_again_while_working_does_not_ask_again(
    tab: Tab, slow: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """Enter pressed twice by habit: the request goes on, one charge. Before, each Enter cancelled the request
    and sent it again ("Working… (Enter: ask again)"), the user waiting (and, for a request the server had
    finished, paying) again. With an option changed since (auto-update off), or the key, Enter asks anew."""
    page = tab.page
    aborted = aborted_posts(page)
    start = slow.settled_credits()
    assert start is not None
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    ask_first(page, photo)
    page.wait_for_selector("#stage[aria-busy=true]")
    assert page.inner_text("#submit") == "Working…"
    for _ in range(2):
        page.wait_for_timeout(300)
        page.press("#prompt", "Enter")
    page.click("#submit")
    wait_shown(page, 0.5)
    assert [b["threshold"] for b in tab.api_bodies] == [0.5] and aborted == []
    assert page.inner_text("#submit") == "Make mask"
    assert slow.settled_credits() == start - 1
    # Auto-update off: an option changed while the request runs, then Enter, asks for the new option.
    page.click("#advanced summary")
    page.uncheck("#auto")
    page.fill("#prompt", "cup")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#stage[aria-busy=true]")
    set_slider(page, "#threshold", "ArrowRight")
    page.press("#prompt", "Enter")
    wait_shown(page, 0.51)
    assert [b["threshold"] for b in tab.api_bodies[1:]] == [0.5, 0.51]
    assert [b["threshold"] for b in aborted] == [0.5]
    assert slow.settled_credits() == start - 2
    # So does another key typed in while it runs.
    set_slider(page, "#threshold", "ArrowRight")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#stage[aria-busy=true]")
    page.fill("#api-key", "not-a-key")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert len(tab.api_bodies) == 5 and len(aborted) == 2 and "key" in page.inner_text("#error").lower()
    page.wait_for_timeout(1000)  # the page looks the key's balance up once the field rests: another 401
    page.fill("#api-key", str(slow.key))  # kept in this browser: the next tab's would start with the wrong one
    page.wait_for_selector("#credits:not([hidden])")
    tab.http_errors.clear()  # the 401s this asked for


def test_a_download_the_server_renders_shows_its_time_and_can_be_cancelled(
    tab: Tab, slow: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """A cut-out the page cannot render (a wide-gamut photo's: the server's, one more request) on a slow server:
    the seconds it takes are shown, and a Cancel beside the downloads (or Esc) aborts it: nothing saved, nothing
    charged, the result still shown and usable; asked again, it comes. Before, the page said only "Asking the
    server for it…", with no time, and nothing could stop it."""
    page = tab.page
    start = wide_gamut_result(page, slow, astronaut, tmp_path)
    saved: list[Any] = []
    page.on("download", lambda d: saved.append(d))
    for stop in ("click", "Escape"):
        page.click("#dl-alpha")
        page.wait_for_selector("#dl-cancel:visible")
        page.wait_for_function(TICKING)
        shown = page.inner_text("#status")
        page.wait_for_timeout(300)
        assert page.inner_text("#status") != shown, "the seconds do not tick"
        if stop == "click":
            page.focus("#dl-cancel")
            page.keyboard.press("Enter")
        else:
            page.keyboard.press("Escape")
        page.wait_for_selector("#dl-cancel", state="hidden")
        assert page.inner_text("#status").startswith("Download cancelled.")
        assert page.is_hidden("#error") and "stale" not in (page.get_attribute("#stage", "class") or "")
        assert not page.is_disabled("#dl-alpha") and page.is_visible("#after")
    assert page.evaluate("document.activeElement.id") == "dl-alpha", "the focus left with the hidden Cancel"
    time.sleep(SLOW_S + 0.5)  # the server finishes (or drops) the aborted work
    assert slow.settled_credits() == start and saved == [], "a cancelled download was charged or saved"
    assert decode(download(page, "#dl-alpha")).shape == (512, 512, 4)
    assert page.inner_text("#status") == "Downloaded." and page.is_hidden("#dl-cancel")
    assert slow.settled_credits() == start - 1
    # Another image chosen while the server renders the preview: the file is still this photo's, and named so
    # (before: named after the image chosen since, "astronaut-preview.png").
    other = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(other)
    with page.expect_download() as info:
        page.click("#dl-preview")
        page.wait_for_selector("#dl-cancel:visible")
        pick_photo(page, other)
    assert info.value.suggested_filename == "wide-gamut-preview.png"
    assert decode(Path(info.value.path()).read_bytes()).shape == (512, 512, 3)


def test_esc_stops_what_began_last(tab: Tab, slow: Live, astronaut: np.ndarray, tmp_path: Path) -> None:
    """A mask request for changed options runs, then the shown result's cut-out is asked of the server: the status
    line shows the download's seconds, and Esc stops the download, the mask request going on (one charge). Before,
    Esc stopped the mask request whenever one ran, the download (which the status line spoke of) going on."""
    page = tab.page
    start = wide_gamut_result(page, slow, astronaut, tmp_path)
    aborted = aborted_posts(page)
    set_slider(page, "#threshold", "ArrowRight")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#stage[aria-busy=true]")
    page.click("#dl-alpha")
    page.wait_for_function(TICKING)
    page.keyboard.press("Escape")
    page.wait_for_selector("#dl-cancel", state="hidden")
    assert page.get_attribute("#stage", "aria-busy") == "true", "Esc stopped the mask request"
    wait_shown(page, 0.51)
    assert [b["return_alpha"] for b in aborted] == [True]
    assert slow.settled_credits() == start - 1


def test_a_turned_webp_pasted_as_a_url_drops_the_request_for_the_image_before(
    tab: Tab, slow: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """A WebP data: URI whose EXIF says turn it is pasted while a mask request for the photo shown runs: the page
    turns it upright before showing it (slowed here), and the request for the photo no longer wanted is dropped at
    once, as for a file, uncharged. Before, it ran on while the page turned the WebP, and was charged if it ended."""
    page = tab.page
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    turned = tmp_path / "turned.webp"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut, 1))).save(turned, lossless=True, exif=exif)
    pick_photo(page, photo)
    first_options(page)
    page.evaluate(  # the page's upright copy takes longer than the server's mask
        """(ms) => { const toBlob = HTMLCanvasElement.prototype.toBlob;
                     HTMLCanvasElement.prototype.toBlob = function (done, ...args) {
                       toBlob.call(this, (blob) => setTimeout(() => done(blob), ms), ...args); }; }""",
        2500 * SLOW_S,
    )
    aborted = aborted_posts(page)
    page.fill("#prompt", FIRST["prompt"])
    page.press("#prompt", "Enter")
    page.wait_for_selector("#stage[aria-busy=true]")
    page.fill("#image-url", data_uri(turned, "image/webp"))
    page.press("#image-url", "Enter")
    page.wait_for_function("() => document.getElementById('image-info').textContent.startsWith('pasted image')")
    assert len(aborted) == 1 and aborted[0]["image"].startswith("data:image/png"), "the photo's request ran on"


def test_esc_cancels_the_update_not_yet_sent(tab: Tab, slow: Live, astronaut: np.ndarray, tmp_path: Path) -> None:
    """A slider moved (auto-update), then Esc within the ~300 ms before the request goes out: nothing is sent, the
    page says so and that the result shown is for the previous settings. Before, Esc did nothing then and the
    request went out (and was charged) anyway."""
    page = tab.page
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    ask_first(page, photo)
    wait_shown(page, 0.5)
    set_slider(page, "#threshold", "ArrowRight")
    page.keyboard.press("Escape")
    page.wait_for_timeout(600)
    assert [b["threshold"] for b in tab.api_bodies] == [0.5], "the update went out after Esc"
    assert page.inner_text("#status") == "Update cancelled: nothing was sent."
    assert page.is_visible("#stale-note") and page.get_attribute("#stage", "aria-busy") == "false"


def ticks(page: Any, line: str) -> None:
    """Assert that the status line shows `line` (a regex) with its seconds, that they tick, and that a screen
    reader is read the line without them."""
    seconds = f"{line}… (\\d+\\.\\d) s\\."
    first = re.search(seconds, page.inner_text("#status"))
    assert first, page.inner_text("#status")
    page.wait_for_timeout(300)
    later = re.search(seconds, page.inner_text("#status"))
    assert later and later[1] != first[1], "the seconds do not tick"
    assert not re.search(r"\d\.\d s\.", page.locator("#status").aria_snapshot()), "the seconds are read out"


def test_a_mask_request_and_a_download_each_keep_their_time(
    tab: Tab, slow: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """A mask request and a download the server renders run at once: when one ends or is cancelled, the other's
    ticking seconds stay in the status line beside what ended. Before, "Cancelled." or "Downloaded." replaced the
    other's "Working… 1.2 s." until it ended too. Then Ctrl+V pastes another image while "Cancel download" has the
    focus: when the download ends, the focus goes to the new image, not (its button now disabled) to the page top."""
    page = tab.page
    wide_gamut_result(page, slow, astronaut, tmp_path)
    set_slider(page, "#threshold", "ArrowRight")  # auto-update: a mask request for 0.51
    page.wait_for_selector("#stage[aria-busy=true]")
    page.click("#dl-alpha")
    page.wait_for_function(TICKING)
    page.click("#cancel")
    assert page.inner_text("#status").startswith("Cancelled.")
    ticks(page, "Asking the server for the cut-out.*")
    page.wait_for_selector("#dl-cancel", state="hidden")
    assert page.inner_text("#status") == "Downloaded."
    page.click("#dl-preview")  # the download first, then a mask request: the download ends first
    page.wait_for_selector("#dl-cancel:visible")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#stage[aria-busy=true]")
    page.wait_for_selector("#dl-cancel", state="hidden")
    assert page.inner_text("#status").startswith("Downloaded.")
    ticks(page, "Working")
    wait_shown(page, 0.51)
    assert page.inner_text("#status").startswith("Done in")
    page.click("#dl-alpha")
    page.wait_for_selector("#dl-cancel:visible")
    page.focus("#dl-cancel")
    pasted = tmp_path / "pasted.png"
    Image.fromarray(astronaut).save(pasted)
    web_helpers.paste_file(page, pasted)
    assert page.is_disabled("#dl-alpha")
    page.wait_for_selector("#dl-cancel", state="hidden")
    assert page.evaluate("document.activeElement.id") == "viewport", "the focus fell to the page top"


def change_while_asking(page: Any, astronaut: np.ndarray, folder: Path) -> None:
    """Auto-update off: ask for the first mask (threshold 0.5), and, while it runs, set the threshold to 0.55."""
    photo = folder / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    page.click("#advanced summary")
    page.uncheck("#auto")
    ask_first(page, photo)
    page.wait_for_selector("#stage[aria-busy=true]")
    set_slider(page, "#threshold", "ArrowRight", 5)


def test_a_late_answer_for_the_previous_settings_stays_marked_stale(
    tab: Tab, slow: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """Auto-update off, an option changed while the mask request runs: the page says the result will be for the
    previous settings, and, once it answers, still says so, until a request for the current settings answers.
    Before, the late answer took the note away, showing the old settings' result as if current."""
    page = tab.page
    change_while_asking(page, astronaut, tmp_path)
    page.wait_for_selector("#stale-note:not([hidden])")
    wait_shown(page, 0.5)
    assert page.is_visible("#stale-note"), "the result for the previous settings is shown as current"
    assert "previous settings" in page.inner_text("#stale-note")
    page.click("#submit")
    wait_shown(page, 0.55)
    assert page.is_hidden("#stale-note")


def test_auto_update_ticked_on_while_an_outdated_request_runs_asks_for_the_current_settings(
    tab: Tab, slow: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """Auto-update off, an option changed while the mask request runs, then auto-update ticked on: the request for
    the previous settings, no longer wanted, is aborted (uncharged) and the current settings are asked for at once,
    as any change with auto-update on asks; their result is shown, not stale. Before, ticking it on asked nothing:
    the late answer for the previous settings stayed (marked stale) until Make mask was pressed."""
    page = tab.page
    start = slow.settled_credits()
    assert start is not None
    aborted = aborted_posts(page)
    change_while_asking(page, astronaut, tmp_path)
    page.evaluate("() => document.getElementById('auto').click()")  # ticked on at once, the request still running
    assert page.is_checked("#auto")
    wait_shown(page, 0.55)
    assert page.is_hidden("#stale-note")
    assert [b["threshold"] for b in tab.api_bodies] == [0.5, 0.55] and [b["threshold"] for b in aborted] == [0.5]
    assert slow.settled_credits() == start - 1
