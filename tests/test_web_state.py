"""The try-it page's state (part 4): whether the result shown is said to be for the current settings, auto-update
ticked on and off, late answers, and data: URIs dropped or pasted with other text. See test_web.py for how the tests
run."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import test_web_tools
from test_web_tools import DROP_TEXT, PASTE_TEXT
from web_helpers import (
    API_PATH,
    FIRST,
    PHONE,
    Tab,
    data_uri,
    open_tab,
    pick_photo,
    set_first_options,
    set_slider,
    submit_prompt,
    wait_result,
)

pytest.importorskip("fastapi")
pytestmark = pytest.mark.browser
# test_web_tools' fixtures: the server, the photo (and its URL on another origin), the page
live, photo, photo_url, tab = test_web_tools.live, test_web_tools.photo, test_web_tools.photo_url, test_web_tools.tab
# The automatic request's pause (AUTO_DELAY_MS) held until released with RELEASE_PAUSED.
PAUSE_AUTO = """() => { const later = window.setTimeout; window.paused = [];
                        window.setTimeout = (f, ms, ...a) =>
                          ms === 300 ? (window.paused.push(f), 0) : later(f, ms, ...a); }"""
RELEASE_PAUSED = "() => window.paused.splice(0).forEach((f) => f())"
THRESHOLD_055 = """() => { const t = document.getElementById('threshold'); t.value = 0.55;
                           t.dispatchEvent(new Event('change', { bubbles: true })); }"""


def first_result(page: Any, photo: Path, *, auto: bool) -> str:
    """The photo masked with the first options, auto-update on or off; the result's sequence number."""
    page.click("#advanced summary")
    page.set_checked("#auto", auto)
    pick_photo(page, photo)
    set_first_options(page)
    return submit_prompt(page, FIRST["prompt"])


def stale(page: Any) -> bool:
    return bool(page.is_visible("#stale-note"))


def test_ticking_auto_update_on_asks_for_the_current_settings(tab: Tab, photo: Path) -> None:
    """Auto-update off, an option changed: the result says it is for the previous settings. Ticking auto-update on
    asks for the current settings at once, as any change does with it on. With a number field the API refuses, it
    asks nothing, the note stays, and the status line and the field say why; put right, the field's change asks.
    Before, ticking it on did nothing: the note stayed until Make mask was pressed."""
    page = tab.page
    first = first_result(page, photo, auto=False)
    set_slider(page, "#threshold", "ArrowRight", 5)
    assert stale(page)
    page.check("#auto")
    shown = wait_result(page, first, threshold=0.55)
    assert not stale(page) and len(tab.api_bodies) == 2
    page.uncheck("#auto")
    page.fill("#seed", "1.5")
    page.press("#seed", "Tab")
    set_slider(page, "#threshold", "ArrowRight")
    assert stale(page)
    page.check("#auto")
    page.wait_for_timeout(600)
    assert len(tab.api_bodies) == 2, "a seed the API refuses was sent"
    assert stale(page) and page.is_visible("#seed-error")
    said = page.inner_text("#status")
    assert "nothing asked yet" in said and "Seed must be a whole number" in said, said
    page.fill("#seed", "7")
    page.press("#seed", "Tab")
    wait_result(page, shown, threshold=0.56, seed=7)
    assert not stale(page)


def test_a_result_auto_update_cannot_replace_says_it_is_stale(tab: Tab, photo: Path) -> None:
    """Auto-update on, and a number field the API refuses: a change cannot ask anew, so the result shown, for the
    settings before, says so. And an answer arriving in the pause before the automatic request for newer settings,
    which then cannot go out (a field put wrong meanwhile), says so too. Before, neither was marked stale."""
    page = tab.page
    first_result(page, photo, auto=True)
    page.fill("#seed", "1.5")
    page.press("#seed", "Tab")
    page.wait_for_timeout(400)
    assert stale(page), "the result for seed -1 is shown as current with seed 1.5"
    assert page.is_visible("#seed-error") and len(tab.api_bodies) == 1
    page.fill("#seed", "")
    page.press("#seed", "Tab")
    page.wait_for_function("() => document.getElementById('stale-note').hidden")  # back to the result's settings
    held: list[Any] = []
    page.route(f"**{API_PATH}", lambda route: held.append(route))
    page.fill("#prompt", "cup")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.getElementById('stage').getAttribute('aria-busy') === 'true'")
    page.evaluate(PAUSE_AUTO)
    page.evaluate(THRESHOLD_055)
    held[0].continue_()
    page.wait_for_function("() => document.getElementById('stage').getAttribute('aria-busy') === 'false'")
    page.fill("#seed", "1.5")  # typed, not yet left: no change event, nothing scheduled
    page.evaluate(RELEASE_PAUSED)
    page.wait_for_timeout(300)
    assert len(tab.api_bodies) == 2 and len(held) == 1
    assert stale(page), "the answer for threshold 0.5 is shown as current with 0.55"


def test_unticking_auto_update_stops_the_update_waiting(tab: Tab, photo: Path) -> None:
    """A slider moved (auto-update on), then auto-update ticked off within the ~300 ms before the automatic request
    goes out: nothing is sent, and the result says it is for the previous settings. Before, the request went out
    (and was charged) after the user had turned automatic requests off."""
    page = tab.page
    first_result(page, photo, auto=True)
    set_slider(page, "#threshold", "ArrowRight")
    page.evaluate("() => document.getElementById('auto').click()")  # at once, the update still waiting
    assert not page.is_checked("#auto")
    page.wait_for_timeout(600)
    assert [b["threshold"] for b in tab.api_bodies] == [0.5], "the update went out with auto-update off"
    assert stale(page)


def test_the_stale_note_goes_when_the_settings_are_those_of_the_result(tab: Tab, photo: Path) -> None:
    """The note says the result is for the previous settings only while it is: a slider moved and moved back (auto-
    update off) takes it away, Esc in the pause before an automatic update for settings moved back adds none, and
    the prompt edited back to the result's takes away the note for a new prompt. Before, each left its note over
    the result for the settings shown."""
    page = tab.page
    first_result(page, photo, auto=False)
    set_slider(page, "#threshold", "ArrowRight")
    assert stale(page)
    set_slider(page, "#threshold", "ArrowLeft")
    assert not stale(page), "the result for threshold 0.5 is said to be stale with 0.5"
    page.check("#auto")
    set_slider(page, "#threshold", "ArrowRight")
    set_slider(page, "#threshold", "ArrowLeft")
    page.keyboard.press("Escape")
    assert page.inner_text("#status") == "Update cancelled: nothing was sent."
    assert not stale(page), "the result for threshold 0.5 is said to be stale with 0.5"
    page.wait_for_timeout(600)
    assert len(tab.api_bodies) == 1
    page.fill("#prompt", "persons")
    assert stale(page) and "new prompt" in page.inner_text("#stale-note")
    page.fill("#prompt", "person ")  # back to the result's prompt (as sent: trimmed)
    assert not stale(page), "the result for “person” is said to be for another prompt"


def wrapped(b64: str, width: int = 76) -> str:
    return "\n".join(b64[i : i + width] for i in range(0, len(b64), width))


def test_a_data_uri_with_a_note_after_it_sends_the_image_alone(tab: Tab, photo: Path, tmp_path: Path) -> None:
    """A data: URI dropped or pasted as text with more after it (a note on the same line, a line of prose, a blank
    line and a paragraph): the image's data alone is sent, its wrapped base64 lines joined (a line break between
    lines of base64 alone, as tools wrap it); the rest is not the image's. Before, all of it was joined into the
    base64 and the server refused it (400)."""
    page = tab.page
    set_first_options(page)
    page.fill("#prompt", FIRST["prompt"])
    b64 = base64.b64encode(photo.read_bytes()).decode()
    page.evaluate(DROP_TEXT, f"data:image/png;base64,{b64} see above")
    shown = wait_result(page, None, prompt=FIRST["prompt"])
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert tab.api_bodies[-1]["image"] == data_uri(photo)
    for grey, text in (
        (150, "data:image/png;base64,\n{}\nsee the attached photo"),
        (170, "data:image/png;base64,{}\n\nThanks,\nAnn"),
        (190, "data:image/png;base64,\r\n{} (from the clipboard)"),
    ):
        small = tmp_path / f"grey{grey}.png"
        Image.fromarray(np.full((64, 64, 3), grey, np.uint8)).save(small)
        small_b64 = base64.b64encode(small.read_bytes()).decode()
        assert grey != 190 or small_b64.endswith("="), "a note on the last line follows its = padding"
        page.evaluate(PASTE_TEXT, text.format(wrapped(small_b64)))
        shown = wait_result(page, shown, prompt=FIRST["prompt"])
        assert page.is_hidden("#error"), page.inner_text("#error")
        assert tab.api_bodies[-1]["image"] == data_uri(small), text
    assert len(tab.api_bodies) == 4


def unpadded_png(tmp_path: Path, start: int) -> Path:
    """A small PNG whose base64 has no = padding (its size a multiple of 3 bytes), of a grey from `start` up."""
    for grey in range(start, 250):
        path = tmp_path / f"unpadded{grey}.png"
        Image.fromarray(np.full((40, 56, 3), grey, np.uint8)).save(path)
        if path.stat().st_size % 3 == 0:
            return path
    raise AssertionError("no grey gave a PNG of a multiple of 3 bytes")


def test_wrapped_base64_keeps_its_last_line_and_padding(tab: Tab, photo: Path, tmp_path: Path) -> None:
    """A wrapped data: URI's last line is the image's too when it has no = padding and a note follows it after a
    space (a third of the images base64 tools wrap), and when it is the padding alone (the URI wrapped whole, its
    header on the first line). Before, that last line was left out: the image was sent cut short."""
    page = tab.page
    set_first_options(page)
    page.fill("#prompt", FIRST["prompt"])
    shown = None
    unpadded = unpadded_png(tmp_path, 100)
    other = unpadded_png(tmp_path, int(np.asarray(Image.open(unpadded))[0, 0, 0]) + 1)
    b64, b64_other = (base64.b64encode(p.read_bytes()).decode() for p in (unpadded, other))
    assert len(b64) % 76 and len(b64_other) % 64, "the last lines are shorter than the others, without padding"
    padded = tmp_path / "padded.png"
    Image.fromarray(np.full((48, 48, 3), 77, np.uint8)).save(padded)
    uri = data_uri(padded)
    cut = next(w for w in range(60, 200) if len(uri) % w == uri.count("=") and uri.endswith("="))
    for path, text in (
        (unpadded, f"data:image/png;base64,{wrapped(b64)} see above"),
        (other, "data:image/png;base64,\r\n" + wrapped(b64_other, 64).replace("\n", "\r\n") + "\tthe photo"),
        (padded, wrapped(uri, cut)),  # its last line: "=" or "=="
    ):
        page.evaluate(PASTE_TEXT, text)
        shown = wait_result(page, shown, prompt=FIRST["prompt"])
        assert page.is_hidden("#error"), page.inner_text("#error")
        assert tab.api_bodies[-1]["image"] == data_uri(path), text[-40:]


DROP_URI_LIST = DROP_TEXT.replace("'text/plain'", "'text/uri-list'")  # a list of URIs dropped


def url_loaded(page: Any, way: str, text: str, url: str, shown: str | None = None) -> None:
    """`text` pasted, dropped or typed in the URL field (`way`) loads the image at `url` (512×512), with no error;
    the URL field then shows `shown` (default `url`)."""
    page.evaluate("() => { const i = document.getElementById('source'); delete i.dataset.url; }")
    page.evaluate("() => { document.getElementById('image-info').textContent = ''; }")
    page.evaluate(way, text)
    page.wait_for_function("() => document.getElementById('image-info').textContent", timeout=5000)
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.inner_text("#image-info").startswith(f"{url} — 512×512"), text
    assert page.input_value("#image-url") == (url if shown is None else shown)


def test_an_image_url_with_a_note_after_it_is_loaded(tab: Tab, photo_url: str) -> None:
    """An image URL pasted or dropped as text with a note after it ("… see above"): the URL alone is loaded (a URL
    copied from a browser has no spaces: they are %20); a URI list dropped with a comment line first (RFC 2483: lines
    starting with #) loads its first URL. Before, the note was percent-encoded into the URL's path (the server could
    not fetch it), and the comment was refused as "not an image URL"."""
    page = tab.page
    for way, text in (
        (PASTE_TEXT, f"{photo_url} see above"),
        (DROP_TEXT, f"{photo_url}\tthe astronaut\nmore notes"),
        (DROP_URI_LIST, f"# the astronaut\r\n{photo_url}\r\n"),
    ):
        url_loaded(page, way, text, photo_url)


def test_an_image_url_in_angle_brackets_or_quotes_is_loaded(tab: Tab, photo_url: str) -> None:
    """An image URL pasted or dropped as text in the angle brackets or quotes that set a URL apart in prose (RFC 3986,
    appendix C), a note after them, or with a query: the URL alone is loaded. Before, "<https://…>" and the quoted
    URL were refused as "not an image URL"."""
    set_apart_urls_loaded(
        tab.page,
        (PASTE_TEXT, f"<{photo_url}>"),
        (DROP_TEXT, f'"{photo_url}" (the astronaut)'),
        (PASTE_TEXT, f"“{photo_url}”"),
        (PASTE_TEXT, f"'{photo_url}?size=512&v=2'"),
    )


def set_apart_urls_loaded(page: Any, *cases: tuple[str, str]) -> None:
    """Each (way, text) of `cases` loads the URL that `text` begins with, within the brackets or quotes around it."""
    for way, text in cases:
        url_loaded(page, way, text, text.split()[0].strip("<>\"“”'"))


def test_an_input_error_goes_once_put_right(tab: Tab, photo: Path) -> None:
    """Make mask pressed with an input the page cannot send (a seed the API refuses, no prompt): the error says why,
    the result greyed; once the input is put right, the error goes, the result is no longer greyed, and the status
    line no longer says "Failed". Before, the error stayed (beside a field that no longer showed one) until the next
    request answered."""
    page = tab.page
    first_result(page, photo, auto=False)
    for field, wrong, right, said in (
        ("#seed", "1.5", "7", "Seed must be a whole number"),
        ("#prompt", "", "person", "Type a prompt"),
    ):
        page.fill(field, wrong)
        page.click("#submit")
        assert page.inner_text("#error").startswith(said) and "stale" in page.get_attribute("#stage", "class")
        page.fill(field, right)
        assert page.is_hidden("#error"), f"the error stayed: {page.inner_text('#error')}"
        assert not page.inner_text("#status").startswith("Failed"), page.inner_text("#status")
        page.fill("#seed", "")  # the result's settings again: not greyed
        page.press("#seed", "Tab")
        assert "stale" not in page.get_attribute("#stage", "class")
    assert len(tab.api_bodies) == 1


def test_a_cancelled_update_leaves_the_result_marked_stale(tab: Tab, photo: Path) -> None:
    """Auto-update on, a slider moved, and its request, sent, cancelled (Cancel or Esc): the result shown, for the
    settings before, says so. Before, it was shown as current (only an update not yet sent, stopped, said so)."""
    page = tab.page
    first_result(page, photo, auto=True)
    held: list[Any] = []
    page.route(f"**{API_PATH}", lambda route: held.append(route))
    set_slider(page, "#threshold", "ArrowRight")
    page.wait_for_selector("#stage[aria-busy=true]")
    page.click("#cancel")
    assert page.inner_text("#status").startswith("Cancelled.") and len(held) == 1
    assert stale(page), "the result for threshold 0.5 is shown as current with 0.51"


TYPE_IN_FIELD = """(text) => { const field = document.getElementById('image-url'); field.focus(); field.value = text;
                               field.dispatchEvent(new Event('change', { bubbles: true })); }"""
ENTER_IN_FIELD = """(text) => { const field = document.getElementById('image-url'); field.focus(); field.value = text;
                                const init = { key: 'Enter', bubbles: true, cancelable: true };
                                field.dispatchEvent(new KeyboardEvent('keydown', init)); }"""


def test_an_image_url_typed_or_pasted_into_the_field_in_quotes_or_brackets_is_loaded(tab: Tab, photo_url: str) -> None:
    """The image URL field takes a URL in the angle brackets or quotes that set it apart in prose, with spaces around
    it, as a paste or a drop on the page does: the URL alone is loaded and the field then shows it. Before, the field
    refused `"https://…"`, `<https://…>` and `'https://…'` as "not an image URL" (a paste into the field is the
    browser's, which keeps them)."""
    set_apart_urls_loaded(
        tab.page,
        (TYPE_IN_FIELD, f'"{photo_url}"'),
        (ENTER_IN_FIELD, f"<{photo_url}>"),
        (TYPE_IN_FIELD, f"'{photo_url}?size=512'"),
        (ENTER_IN_FIELD, f"  “{photo_url}”  "),
        (TYPE_IN_FIELD, f'"{photo_url}" the astronaut'),
    )


def test_an_image_url_typed_in_the_field_with_spaces_loads_as_the_address_bar_would(
    tab: Tab, photo: Path, photo_url: str
) -> None:
    """The image URL field holds one URL: a space typed in it is part of it, sent as %20, as a browser's address bar
    does (`https://…/my photo.png` loads `my%20photo.png`), the spaces around it, its quotes or brackets left out.
    Before, the field read its text as a paste does and loaded the URL up to the first space (`https://…/my`)."""
    shutil.copy(photo, photo.parent / "my photo.png")
    spaced = photo_url.rsplit("/", 1)[0] + "/my photo.png"
    url = spaced.replace(" ", "%20")
    for way, text in ((TYPE_IN_FIELD, spaced), (ENTER_IN_FIELD, f"  {spaced} "), (TYPE_IN_FIELD, f"<{spaced}>")):
        url_loaded(tab.page, way, text, url, spaced)  # the field shows it as typed, less what is around it
    url_loaded(tab.page, PASTE_TEXT, f'"{spaced}" (the astronaut)', url, spaced)  # within quotes pasted: the same


def test_an_image_url_in_parentheses_or_square_brackets_is_loaded(tab: Tab, photo: Path, photo_url: str) -> None:
    """`(https://…)` and `[https://…]` (as prose and Markdown set a URL apart) pasted, dropped or typed in the field:
    the URL within them is loaded; a URL whose path has parentheses (`…/Foo_(bar).png`, as Wikipedia's files are
    named) is kept whole, bare or within them. Before, the brackets were taken into the URL (`(https:` is not one:
    refused) and a closing parenthesis of the path ended a wrapped URL."""
    shutil.copy(photo, photo.parent / "Foo_(bar).png")
    paren = photo_url.rsplit("/", 1)[0] + "/Foo_(bar).png"
    for way, text, url in (
        (PASTE_TEXT, f"({photo_url})", photo_url),
        (DROP_TEXT, f"[{photo_url}] the astronaut", photo_url),
        (TYPE_IN_FIELD, f" ({photo_url}) ", photo_url),
        (ENTER_IN_FIELD, f"[{photo_url}]", photo_url),
        (PASTE_TEXT, paren, paren),
        (TYPE_IN_FIELD, paren, paren),
        (DROP_TEXT, f"({paren}), see", paren),
        (ENTER_IN_FIELD, f"({paren})", paren),
    ):
        url_loaded(tab.page, way, text, url)


# The API's answer cut off after its headers (the server stopped, a proxy timed out): the body's stream fails, as a
# browser's does when the connection drops midway (a real cut cannot be made here: the page's CSP lets it reach its
# own server only, and a route hands the page whole answers).
CUT_ANSWERS = """() => { const real = window.fetch; window.fetch = async (url, init) => {
  if (!String(url).endsWith('/v1/automatic-mask-generator')) return real(url, init);
  const body = new ReadableStream({ start(c) { c.enqueue(new TextEncoder().encode('{"image": "iVBOR'));
                                             c.error(new TypeError('network error')); } });
  return new Response(body, { status: 200, headers: { 'content-type': 'application/json' } }); }; }"""


def test_an_answer_cut_off_or_not_automasks_says_what_happened(tab: Tab, photo: Path) -> None:
    """The server's answer cut off midway, or a 200 that is not the API's JSON (a proxy's or another site's page at
    the server's address): the error says so, with the start of the page that came. Before, both were called the
    page's own fault ("Something went wrong in the page: network error", "…: Unexpected token '<'…"), the result
    kept, greyed."""
    page = tab.page
    first_result(page, photo, auto=False)
    page.route(f"**{API_PATH}", lambda route: route.fulfill(status=200, content_type="text/html", body=NGINX))
    page.fill("#prompt", "person, background")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    said = page.inner_text("#error")
    assert said.startswith("The server answered 200 OK with something other than automask's answer: Welcome to"), said
    assert stale(page)
    page.unroute(f"**{API_PATH}")
    page.evaluate(CUT_ANSWERS)
    page.fill("#prompt", "background")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('cut off')")
    said = page.inner_text("#error")
    assert re.fullmatch(r"The server's answer was cut off \(.+\)\. Is automask serve still running\?", said), said
    assert stale(page)


NGINX = "<html><head><title>Welcome to nginx!</title></head><body><h1>Welcome to nginx!</h1></body></html>"


def test_an_example_clicked_with_the_server_gone_says_so(tab: Tab) -> None:
    """An example photo clicked once the server has stopped (its photo cannot be fetched): the error says the server
    cannot be reached. Before, it said the browser's bare "Failed to fetch"."""
    page = tab.page
    page.route("**/examples/**", lambda route: route.abort("connectionrefused"))
    page.click("button.example[data-example=coffee]")
    page.wait_for_selector("#error:not([hidden])")
    said = page.inner_text("#error")
    assert said.startswith("Could not fetch the example coffee.jpg from the server ("), said
    assert said.endswith("). Is automask serve still running?"), said
    assert not tab.api_bodies
    tab.errors.remove("Failed to load resource: net::ERR_CONNECTION_REFUSED")  # the fetch refused, as provoked


def test_a_long_image_url_wraps_at_phone_width(context: Any, live: Any, photo: Path, photo_url: str) -> None:
    """A long image URL (a signed link: hundreds of characters, no space) loaded on a phone: the page does not scroll
    sideways and the URL shown under the field wraps within the page. Before, the line of the URL widened the whole
    page (1640 px wide at 320), every panel with it."""
    shutil.copy(photo, photo.parent / ("a" * 150 + ".png"))
    url = photo_url.rsplit("/", 1)[0] + "/" + "a" * 150 + ".png?" + "X-Amz-Signature=0123456789abcdef" * 12
    for size in (PHONE, {"width": 320, "height": 640}):
        with open_tab(context, live, size) as phone:
            page = phone.page
            page.fill("#image-url", url)
            page.press("#image-url", "Enter")
            page.wait_for_function("() => document.getElementById('image-info').textContent.includes('512×512')")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= size["width"], f"the page scrolls sideways at {size['width']} px ({width} px)"
            box = page.locator("#image-info").bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= size["width"]
            phone.check_console()


def test_a_long_file_name_in_the_status_line_wraps_at_phone_width(context: Any, live: Any) -> None:
    """The status line says the name of the file being read ("Reading NAME…", "Still reading NAME…"): a long one (no
    space: 200 characters) at phone width wraps within the page. Before, the line widened the whole page."""
    name = "IMG_" + "0123456789" * 20 + ".jpg"
    for size in (PHONE, {"width": 320, "height": 640}):
        with open_tab(context, live, size) as phone:
            page = phone.page
            page.evaluate("async (n) => (await import('./static/status.js')).setStatus(`Reading ${n}…`)", name)
            assert page.inner_text("#said") == f"Reading {name}…"
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= size["width"], f"the page scrolls sideways at {size['width']} px ({width} px)"
            box = page.locator("#status").bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= size["width"]
            phone.check_console()
