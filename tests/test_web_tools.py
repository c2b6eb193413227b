"""The try-it page, end to end (part 2: getting an image in, prompts that work on the install, models, the viewer,
targets, cut-outs, kept settings, the clipboard, advanced options). See test_web.py for how the tests run."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from automask import postprocess as pp
from automask.imageio.decode import _ORIENT as ORIENT
from automask.settings import Settings
from loopback import serve_http
from server_helpers import decode, install_as_catalogue
from test_web import RDF, TIFF
from web_helpers import (
    API_PATH,
    FIRST,
    HTTP_STATUS_NOISE,
    FakeSubject,
    Live,
    Tab,
    check_overlay,
    data_uri,
    download,
    open_tab,
    paste_file,
    pick_photo,
    serve,
    set_first_options,
    set_slider,
    shot,
    submit_prompt,
    wait_result,
)

pytest.importorskip("fastapi")
EXAMPLES = Path(__file__).resolve().parent.parent / "src" / "automask" / "web" / "examples"
EXTENSIONS = ("negative_prompt", "feather", "fill_holes", "min_area")
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def live(tiny_clipseg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("web-data"), model=str(tiny_clipseg_dir), allow_private_urls=True
    )
    with serve(settings, auth=True) as running:
        yield running


@pytest.fixture(scope="module")
def photo(astronaut: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    return path


@pytest.fixture(scope="module")
def photo_url(photo: Path) -> Iterator[str]:
    """`photo` served over HTTP on a loopback port (another origin than the page's), as a pasted image URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve_http(partial(Quiet, directory=str(photo.parent))) as base:
        yield f"{base}/{photo.name}"


@pytest.fixture()
def tab(context: Any, live: Live) -> Iterator[Tab]:
    with open_tab(context, live) as opened:
        yield opened
        opened.check_console()


def sent_options(tab: Tab) -> dict[str, Any]:
    """The last API request's options, as any client would send them (the image as a binary answer)."""
    return {k: v for k, v in tab.api_bodies[-1].items() if k not in ("base64", "instance_masks")}


# ---- getting an image in -------------------------------------------------------------------------------

DROP = """async ([b64, target]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], 'dropped.png', { type: 'image/png' }));
  const el = document.querySelector(target);
  const over = new DragEvent('dragover', { dataTransfer: data, bubbles: true, cancelable: true });
  const drop = new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true });
  el.dispatchEvent(over);
  el.dispatchEvent(drop);
  return [over.defaultPrevented, drop.defaultPrevented];
}"""


def test_drop_anywhere_and_paste(tab: Tab, live: Live, photo: Path, photo_url: str) -> None:
    page = tab.page
    b64 = base64.b64encode(photo.read_bytes()).decode()
    url = page.url
    for target in ("h1", "#facts", "#prompt"):  # far from the file box: the page takes it, the browser does not
        page.evaluate("() => { const i = document.getElementById('source'); i.removeAttribute('src'); }")
        assert page.evaluate(DROP, [b64, target]) == [True, True], target
        page.wait_for_function(  # the image, then its caption (set once the image is shown)
            "() => document.getElementById('source').naturalWidth === 512"
            " && document.getElementById('image-info').textContent.includes('dropped.png')"
        )
        assert page.url == url
    set_first_options(page)
    submit_prompt(page, FIRST["prompt"])
    assert download(page, "#dl-mask") == live.api(data_uri(photo), **FIRST).content
    # Paste an image file: it replaces the photo.
    page.evaluate(
        """(b64) => {
             const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
             const data = new DataTransfer();
             data.items.add(new File([bytes], 'pasted.png', { type: 'image/png' }));
             document.body.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true }));
           }""",
        b64,
    )
    page.wait_for_function("() => document.getElementById('image-info').textContent.includes('pasted.png')")
    # Paste an image URL (focus outside text fields): the server fetches it; the page shows it.
    page.evaluate(
        """(url) => {
             document.activeElement.blur();
             const data = new DataTransfer();
             data.setData('text/plain', url);
             document.body.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true }));
           }""",
        photo_url,
    )
    page.wait_for_function("(u) => document.getElementById('image-info').textContent.startsWith(u)", arg=photo_url)
    assert page.input_value("#image-url") == photo_url
    shown = wait_result(page, None, prompt=FIRST["prompt"])  # auto-update with the prompt already typed
    assert tab.api_bodies[-1]["image"] == photo_url
    assert download(page, "#dl-mask") == live.api(photo_url, **FIRST).content
    # Enter on the same URL loads it again (the picture there may have changed) and masks it again.
    asked = len(tab.api_bodies)
    page.press("#image-url", "Enter")
    wait_result(page, shown, prompt=FIRST["prompt"])
    assert len(tab.api_bodies) == asked + 1 and tab.api_bodies[-1]["image"] == photo_url
    # Another site's image: the page cannot read its pixels, so a cut-out is the server's (one more request).
    assert page.inner_text("#dl-alpha") == "Download cut-out (1 more request)"
    assert download(page, "#dl-alpha") == live.api(photo_url, **FIRST, return_alpha=True).content


def test_the_image_chosen_last_is_the_one_masked(tab: Tab, live: Live, photo: Path, photo_url: str) -> None:
    """An image URL and an example still loading when a file is chosen: the file stays the image, shown, masked and
    cut out in the page. Before, the URL's aborted load hid the file's image and made its cut-out a paid request,
    and the example, arriving late, replaced the file and its prompt."""
    page = tab.page
    held: list[Any] = []
    page.route("**/held.png", lambda route: held.append(route))
    page.route("**/static/examples/chelsea.jpg", lambda route: held.append(route))
    page.fill("#prompt", FIRST["prompt"])
    with page.expect_request("**/held.png"):
        page.fill("#image-url", photo_url.replace(photo.name, "held.png"))
        page.press("#image-url", "Enter")
    with page.expect_request("**/chelsea.jpg"):
        page.click("button.example[data-example=cat]")
    set_first_options(page)
    pick_photo(page, photo)
    for route in held:  # the URL's image and the example arrive after the file was chosen
        route.fulfill(path=EXAMPLES / "chelsea.jpg", content_type="image/jpeg")
    submit_prompt(page, FIRST["prompt"])
    page.wait_for_timeout(300)  # room for a late example to replace the file (it would mask the cat at once)
    assert page.is_visible("#canvas-box") and page.evaluate("document.getElementById('source').naturalWidth") == 512
    assert page.inner_text("#image-info").startswith(photo.name) and page.input_value("#prompt") == FIRST["prompt"]
    assert [b["image"] for b in tab.api_bodies] == [data_uri(photo)]
    assert page.inner_text("#dl-alpha") == "Download cut-out"
    cutout = decode(download(page, "#dl-alpha"))
    assert np.array_equal(cutout, decode(live.api(data_uri(photo), **FIRST, return_alpha=True).content))
    assert len(tab.api_bodies) == 1


def test_nothing_is_masked_while_the_next_image_loads(tab: Tab, live: Live, photo: Path) -> None:
    """A slider moved while a chosen example still loads: the page waits for the example, then masks it. Before,
    it masked (and charged) the image shown before, which the user had just replaced."""
    page = tab.page
    pick_photo(page, photo)
    set_first_options(page)
    submit_prompt(page, FIRST["prompt"])
    held: list[Any] = []
    page.route("**/static/examples/chelsea.jpg", lambda route: held.append(route))
    with page.expect_request("**/chelsea.jpg"):
        page.click("button.example[data-example=cat]")
    set_slider(page, "#threshold", "ArrowRight")  # the page would mask again by itself...
    page.press("#prompt", "Enter")  # ...and so would Enter
    assert page.inner_text("#status") == "Still reading chelsea.jpg…"
    page.wait_for_timeout(500)  # longer than the page waits before masking by itself
    held[0].fulfill(path=EXAMPLES / "chelsea.jpg", content_type="image/jpeg")
    wait_result(page, None, prompt="cat")
    assert [b["image"] == data_uri(photo) for b in tab.api_bodies] == [True, False]


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_sent(tab: Tab, photo: Path, tmp_path: Path) -> None:
    """The server's pixel limit (web/config, here lowered to 270,000) is checked in the page: nothing is sent, the
    error names both sizes, and the next image works. Before, the page read all the pixels of a huge image (seconds
    and hundreds of MB in the browser), then uploaded it only for the server to refuse it."""
    page = tab.page

    def lower_limit(route: Any) -> None:
        route.fulfill(json={**route.fetch().json(), "max_image_pixels": 270_000})

    page.route("**/web/config", lower_limit)
    page.reload()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    large = tmp_path / "large.png"
    Image.fromarray(np.zeros((600, 500, 3), np.uint8)).save(large)
    page.fill("#prompt", FIRST["prompt"])
    page.set_input_files("#file", str(large))
    page.wait_for_selector("#error:not([hidden])")
    expected = "large.png is 500×600 = 300,000 pixels; this server takes images up to 270,000 pixels."
    assert page.inner_text("#error") == expected
    page.wait_for_timeout(800)  # longer than the page waits before masking a new image by itself
    assert not tab.api_bodies and page.is_hidden("#canvas-box")
    set_first_options(page)
    pick_photo(page, photo)  # 512×512: within the limit
    submit_prompt(page, FIRST["prompt"])
    assert page.is_hidden("#error") and len(tab.api_bodies) == 1


def test_a_pasted_image_over_the_size_limits_is_refused_before_it_is_sent(
    tab: Tab, photo: Path, tmp_path: Path
) -> None:
    """A data: URI pasted (or typed) over the server's image limit, or too long for its request limit (web/config's
    max_image_bytes and max_body_bytes, here lowered), and a file too long to send: nothing is sent, the error names
    both sizes, and an image within the limits works. Before, the page uploaded all of it (60 MB for a 60 MB data:
    URI) for the server to answer 413."""
    page = tab.page
    pasted = data_uri(photo)
    limits: dict[str, int] = {}

    def lower_limits(route: Any) -> None:
        route.fulfill(json={**route.fetch().json(), **limits})

    page.route("**/web/config", lower_limits)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(small)
    for lowered, expected in (
        ({"max_image_bytes": 100_000}, "; this server takes images up to 98 KB."),
        ({"max_body_bytes": len(pasted)}, f"takes {len(pasted) / 1024:.0f} KB to send; this server takes requests"),
    ):
        limits.clear()
        limits.update(lowered)
        page.reload()
        page.wait_for_selector("body[data-loaded=true]", state="attached")
        page.fill("#prompt", FIRST["prompt"])
        page.fill("#image-url", pasted)
        page.press("#image-url", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error").startswith("The pasted image ") and expected in page.inner_text("#error")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("() => document.getElementById('error').textContent.startsWith('astronaut.png ')")
        assert expected.split(";")[1] in page.inner_text("#error")
        page.wait_for_timeout(800)  # longer than the page waits before masking a new image by itself
        assert not tab.api_bodies and page.is_hidden("#canvas-box")
    set_first_options(page)
    pick_photo(page, small)  # within both limits
    submit_prompt(page, FIRST["prompt"])
    assert page.is_hidden("#error") and len(tab.api_bodies) == 1


PASTE_TEXT = """(text) => { document.activeElement.blur(); const data = new DataTransfer();
                            data.setData('text/plain', text);
                            const paste = new ClipboardEvent('paste', { clipboardData: data, bubbles: true });
                            document.body.dispatchEvent(paste); }"""
DROP_TEXT = """(text) => { const data = new DataTransfer(); data.setData('text/plain', text);
                           const h1 = document.querySelector('h1');
                           for (const type of ['dragover', 'drop']) {
                             const init = { dataTransfer: data, bubbles: true, cancelable: true };
                             h1.dispatchEvent(new DragEvent(type, init));
                           } }"""


def test_a_pasted_data_uri_wrapped_in_lines_is_sized_without_them(
    tab: Tab, live: Live, photo: Path, tmp_path: Path
) -> None:
    """A base64 data: URI pasted (or dropped) as many tools write it, in lines of 76 characters: its size is that of
    its image, the line breaks not counted, and it is sent without them. Before, an image just under the server's
    limit was refused ("The pasted image is ...; this server takes images up to ...") for its line breaks."""
    page = tab.page
    image = photo.read_bytes()
    b64 = base64.b64encode(image).decode()
    wrapped = "data:image/png;base64,\r\n" + "\r\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    limit = {"max_image_bytes": len(image)}  # the image just fits; with its line breaks counted, it did not
    page.route("**/web/config", lambda route: route.fulfill(json={**route.fetch().json(), **limit}))
    page.reload()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    set_first_options(page)
    page.fill("#prompt", FIRST["prompt"])
    page.evaluate(PASTE_TEXT, wrapped)
    shown = wait_result(page, None, prompt=FIRST["prompt"])
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert tab.api_bodies[-1]["image"] == data_uri(photo), "sent with its line breaks"
    assert download(page, "#dl-mask") == live.api(data_uri(photo), **FIRST).content
    # Dropped as text, the same: all of it, not its first line alone (before: "data:image/png;base64," was sent).
    small = tmp_path / "small.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(small)
    b64 = base64.b64encode(small.read_bytes()).decode()
    page.evaluate(DROP_TEXT, "data:image/png;base64,\n" + "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)))
    wait_result(page, shown, prompt=FIRST["prompt"])
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert tab.api_bodies[-1]["image"] == data_uri(small)


def ask_held(page: Any) -> list[Any]:
    """Ask for the first prompt's mask, its request held (as on a slow network): the routes held, once it is sent."""
    held: list[Any] = []
    page.route(f"**{API_PATH}", lambda route: held.append(route))
    page.fill("#prompt", FIRST["prompt"])
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.getElementById('stage').getAttribute('aria-busy') === 'true'")
    return held


def test_a_size_error_stays_when_the_request_before_it_answers(tab: Tab, photo: Path, tmp_path: Path) -> None:
    """A mask being made when an image too large for the server is pasted: the page says so at once, and the
    answer of the request for the image shown (which stays) arriving after does not take that message away.
    Before, the answer cleared it: the pasted image seemed taken, and nothing said why it was not shown."""
    page = tab.page
    limit = {"max_image_bytes": 100_000}
    page.route("**/web/config", lambda route: route.fulfill(json={**route.fetch().json(), **limit}))
    page.reload()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    small = tmp_path / "small.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(small)
    set_first_options(page)
    pick_photo(page, small)
    held = ask_held(page)
    page.evaluate(PASTE_TEXT, data_uri(photo))  # 100 KB and more: over the lowered limit
    page.wait_for_selector("#error:not([hidden])")
    said = page.inner_text("#error")
    assert said.startswith("The pasted image ") and "this server takes images up to 98 KB" in said
    assert len(held) == 1
    held[0].continue_()
    wait_result(page, None, prompt=FIRST["prompt"])  # the answer for the small image, shown
    assert page.is_visible("#error") and page.inner_text("#error") == said, "the newer message was cleared"
    assert page.inner_text("#image-info").startswith("small.png")
    # The same when the request is not sent yet, only scheduled (a slider moved: the page masks again after a pause).
    page.unroute(f"**{API_PATH}")
    shown = page.get_attribute("#result", "data-ready")
    page.evaluate(
        """() => { const t = document.getElementById('threshold'); t.value = 0.55;
                   t.dispatchEvent(new Event('change', { bubbles: true })); }"""
    )
    page.evaluate(PASTE_TEXT, data_uri(photo))
    wait_result(page, shown, threshold=0.55)
    assert page.is_visible("#error") and page.inner_text("#error") == said, "cleared by the scheduled request's answer"
    # The same when the scheduled request is answered from the page's memory (the slider back to a setting shown).
    shown = page.get_attribute("#result", "data-ready")
    page.evaluate(
        """() => { const t = document.getElementById('threshold'); t.value = 0.5;
                   t.dispatchEvent(new Event('change', { bubbles: true })); }"""
    )
    page.evaluate(PASTE_TEXT, data_uri(photo))
    wait_result(page, shown, threshold=0.5)
    assert page.inner_text("#status").startswith("Shown again from this page's memory")
    assert page.is_visible("#error") and page.inner_text("#error") == said, "cleared by the answer from memory"


def test_an_earlier_requests_error_goes_when_the_scheduled_one_answers(tab: Tab, photo: Path) -> None:
    """A slider moved while a mask is being made, and that request then refused (429): the error is shown, and the
    request for the new setting, sent after its pause, answering well takes it away, as any newer answer does.
    Before, the error (counted as newer than the scheduled request) stayed up over the good result, not greyed."""
    page = tab.page
    set_first_options(page)
    pick_photo(page, photo)
    held = ask_held(page)
    # The automatic request's pause held until released: the first request answers within it, whatever the load.
    page.evaluate(
        """() => { const later = window.setTimeout; window.paused = [];
                   window.setTimeout = (f, ms, ...a) => ms === 300 ? (window.paused.push(f), 0) : later(f, ms, ...a);
                   const t = document.getElementById('threshold'); t.value = 0.55;
                   t.dispatchEvent(new Event('change', { bubbles: true })); }"""
    )
    held[0].fulfill(status=429, json={"error": "Too many requests: try again in a minute."})
    page.wait_for_selector("#error:not([hidden])")
    page.unroute(f"**{API_PATH}")
    page.evaluate("() => window.paused.splice(0).forEach((f) => f())")
    wait_result(page, None, threshold=0.55)
    assert page.is_hidden("#error"), f"a stale error stayed up: {page.inner_text('#error')}"
    assert tab.http_errors == [f"{HTTP_STATUS_NOISE} 429 (Too Many Requests)"]
    tab.http_errors.clear()


def test_back_to_the_page_shows_the_image_url_again(tab: Tab, photo_url: str) -> None:
    """Away and back (the page reloaded): the browser restores the URL field, and the page shows that image again,
    without a request. Before, the field showed the URL over "No image yet", and Make mask asked for an image."""
    page = tab.page
    page.fill("#image-url", photo_url)
    page.press("#image-url", "Enter")
    page.wait_for_selector("#canvas-box:not([hidden])")
    page.goto("about:blank")
    page.go_back()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    assert page.input_value("#image-url") == photo_url
    page.wait_for_function("(u) => document.getElementById('image-info').textContent.startsWith(u)", arg=photo_url)
    assert page.is_visible("#canvas-box") and not tab.api_bodies


def test_a_turned_webp_by_url_is_shown_as_the_server_reads_it(
    tab: Tab, live: Live, astronaut: np.ndarray, photo: Path, photo_url: str
) -> None:
    """A WebP stored on its side, its EXIF saying turn it (6), given by URL: Chromium shows it as stored, the server
    turns it. Pasted as a data: URI (its bytes in the page), it is shown upright, its overlay drawn over it and its
    cut-out rendered in the page, equal to the API's. On another site (its bytes unreadable here), it is shown turned
    as the server says it turned it (test_another_sites_image_is_shown_turned_as_the_server_turned_it).

    Before, both were shown on their side, and the mask, upright, was drawn over them row by row as if it were not:
    a garbled overlay of the wrong size."""
    page = tab.page
    upright = astronaut[:, 64:448]  # 512×384
    path = photo.parent / "turned.webp"  # served at photo_url's folder
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(path, lossless=True, exif=exif)
    page.fill("#prompt", FIRST["prompt"])
    set_first_options(page)
    previous = None
    pasted = data_uri(path, "image/webp")
    for url in (pasted, photo_url.replace(photo.name, path.name), pasted):
        page.fill("#image-url", url)
        page.press("#image-url", "Enter")
        previous = wait_result(page, previous, prompt=FIRST["prompt"])
        assert page.evaluate("[after.width, after.height]") == [384, 512], "the mask drawn at the stored size"
        assert page.evaluate("getComputedStyle(source).visibility") == "visible"
        if url.startswith("data:"):
            assert page.evaluate("[source.naturalWidth, source.naturalHeight]") == [384, 512]
            assert page.get_attribute("#stage", "data-show") == "overlay"
            assert page.inner_text("#dl-alpha") == "Download cut-out"
            cutout = decode(download(page, "#dl-alpha"))
            assert np.array_equal(cutout, decode(live.api(url, **FIRST, return_alpha=True).content))
        else:
            assert page.get_attribute("#stage", "data-show") == "overlay"
            assert "does not show" not in page.inner_text("#status")
    page.fill("#image-url", "data:image/webp;base64,UklGR!")  # not base64: said, by the browser, then the server
    page.press("#image-url", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "cannot show it" in page.inner_text("#image-info") and "not valid base64" in page.inner_text("#error")
    tab.errors.remove("Failed to load resource: net::ERR_INVALID_URL")  # the browser's, loading it into the <img>
    assert tab.http_errors == [f"{HTTP_STATUS_NOISE} 400 (Bad Request)"]
    tab.http_errors.clear()


def test_another_sites_image_is_shown_turned_as_the_server_turned_it(
    tab: Tab, live: Live, astronaut: np.ndarray, photo: Path, photo_url: str
) -> None:
    """Another site's image (its bytes unreadable by the page) with each of the 8 EXIF orientations: a WebP's, which
    Chromium does not apply; a JPEG's and a PNG's, which it does; a JPEG's in XMP alone, which it does not. The
    server says how it turned the image (the v1 header x-image-orientation; the JSON body is unchanged), and the page
    shows it turned the same way where the browser did not: the image upright, the overlay over what the mask selects.

    Before, a flipped or upside-down WebP (2, 3, 4) was shown as stored under the upright mask, its overlay over the
    wrong pixels; one on its side (5-8) was not shown, the mask alone in its place."""
    page = tab.page
    upright = np.ascontiguousarray(astronaut[:, 64:448])  # 512×384: not square, shown at its own size
    inverse = {6: 8, 8: 6}  # the other turns undo themselves
    set_first_options(page)
    page.fill("#prompt", FIRST["prompt"])
    previous = None
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF}"><rdf:Description xmlns:tiff="{TIFF}"'
    cases = [(o, "WEBP", "exif") for o in range(1, 9)] + [(3, "JPEG", "exif"), (3, "PNG", "exif"), (6, "PNG", "exif")]
    for orientation, fmt, tag in [*cases, (2, "JPEG", "xmp"), (6, "JPEG", "xmp")]:  # XMP: applied by no browser
        name = f"turned-{orientation}-{tag}.{fmt.lower()}"
        exif = Image.Exif()
        exif[0x0112] = orientation
        meta = (
            {"exif": exif}
            if tag == "exif"
            else {"xmp": f'{xmp} tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>'.encode()}
        )
        stored = ORIENT[inverse.get(orientation, orientation)](upright)
        Image.fromarray(np.ascontiguousarray(stored)).save(photo.parent / name, fmt, lossless=True, quality=95, **meta)
        url = photo_url.replace(photo.name, name)
        answer = live.api(url, **FIRST)
        said = answer.headers.get("x-image-orientation")
        assert said == (None if orientation == 1 else f"{orientation}; format={fmt.lower()}; from={tag}"), said
        mask = decode(answer.content)
        assert mask.shape == upright.shape[:2]
        assert "orientation" not in live.api(url, **FIRST, base64=True).json()  # the body the SDK reads: unchanged
        page.fill("#image-url", url)
        page.press("#image-url", "Enter")
        previous = wait_result(page, previous, prompt=FIRST["prompt"])
        assert page.get_attribute("#stage", "data-show") == "overlay", orientation
        set_slider(page, "#compare", "End")  # the image alone
        image = shot(page, "#canvas-box", f"turned-{orientation}-{tag}-{fmt}-image")
        assert image.shape == upright.shape, orientation
        assert np.abs(image.astype(int) - upright).mean() < (4 if fmt == "JPEG" else 1), "not shown upright"
        set_slider(page, "#compare", "Home")  # the overlay over all of it
        check_overlay(image, shot(page, "#canvas-box", f"turned-{orientation}-{tag}-{fmt}-overlay"), mask, opacity=0.6)
        assert "does not show" not in page.inner_text("#status")
        assert page.inner_text("#image-info") == f"{url} — 384×512", "the size as stored, not as shown"


def test_a_model_loaded_by_the_first_request_is_no_longer_said_to_be_loading(tab: Tab, photo: Path) -> None:
    """A page opened while the server loaded its model says so; once a mask came back, it no longer does (before,
    "loading or not installed" stayed until a reload)."""
    page = tab.page

    def loading(route: Any) -> None:
        config = route.fetch().json()
        choices = [{**c, "loaded": False} for c in config["choices"]]
        route.fulfill(json={**config, "ready": False, "choices": choices})

    page.route("**/web/config", loading)
    page.reload()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    assert "(loading or not installed)" in page.inner_text("#server-info")
    pick_photo(page, photo)
    submit_prompt(page, FIRST["prompt"])
    assert "loading" not in page.inner_text("#server-info") and page.inner_text("#server-info").startswith("Model: ")


def test_examples_work_in_one_click(tab: Tab, live: Live) -> None:
    page = tab.page
    page.click("button.example[data-example=coffee]")
    wait_result(page, None, prompt="cup")  # an open-vocabulary model: the example's open prompt
    example = EXAMPLES / "coffee.jpg"
    assert tab.api_bodies[-1]["image"] == data_uri(example, "image/jpeg")
    assert page.evaluate("document.getElementById('source').naturalWidth") == 512
    options = sent_options(tab)
    answer = live.api(**options)
    assert answer.status_code == 200 and download(page, "#dl-mask") == answer.content
    assert decode(answer.content).shape == (341, 512)


def test_chips_and_placeholder_fit_the_install(tab: Tab, live: Live, photo: Path) -> None:
    page = tab.page
    chips = page.eval_on_selector_all("#chips .chip", "cs => cs.map(c => c.textContent)")
    assert "cup" in chips and "person" in chips and "background" in chips
    placeholder = page.get_attribute("#prompt", "placeholder")
    assert placeholder and live.api(data_uri(photo), prompt=placeholder).status_code == 200
    pick_photo(page, photo)
    page.click("#chips .chip:text-is('background')")
    wait_result(page, None, prompt="background")
    assert page.input_value("#prompt") == "background"


def embedded_only(tmp_path: Path, with_clipseg: bool) -> Any:
    """A server whose default model is the embedded `subject` one (a stand-in), optionally with clipseg."""
    from automask.pipeline import MaskGenerator

    data_dir = tmp_path / "data"
    if with_clipseg:
        install_as_catalogue(data_dir, "clipseg", seed=1)
    settings = Settings(data_dir=data_dir)
    return serve(settings, auth=True, generator=MaskGenerator(FakeSubject(), settings))  # type: ignore[arg-type]


def test_embedded_only_install(context: Any, tmp_path: Path, photo: Path) -> None:
    with embedded_only(tmp_path, with_clipseg=False) as server, open_tab(context, server) as tab:
        page = tab.page
        chips = page.eval_on_selector_all("#chips .chip", "cs => cs.map(c => c.textContent)")
        assert chips == ["person", "subject", "background"]
        placeholder = page.get_attribute("#prompt", "placeholder")
        assert placeholder and server.api(data_uri(photo), prompt=placeholder).status_code == 200
        pick_photo(page, photo)
        page.fill("#prompt", "cup")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        error = page.inner_text("#error")
        assert "“subject” can't answer “cup”" in error and "automask models pull clipseg" in error
        assert tab.api_bodies == [], "a prompt the model cannot answer was sent"
        page.click("button.example[data-example=cat]")
        wait_result(page, None, prompt="subject")  # the example's prompt for the embedded model
        assert np.count_nonzero(decode(download(page, "#dl-mask"))) > 1000
        tab.check_console()


def test_model_that_cannot_answer_names_one_that_can(context: Any, tmp_path: Path, photo: Path) -> None:
    with embedded_only(tmp_path, with_clipseg=True) as server, open_tab(context, server) as tab:
        page = tab.page
        assert page.input_value("#model") == "subject"
        pick_photo(page, photo)
        page.fill("#prompt", "cup")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        error = page.inner_text("#error")
        assert "“subject” can't answer “cup”" in error and "Choose “clipseg” in Model" in error
        assert "No open-vocabulary model is installed" not in error and tab.api_bodies == []
        page.select_option("#model", "clipseg")  # the page asks again by itself, with the model that can
        wait_result(page, None, prompt="cup", model="clipseg")
        assert page.is_hidden("#error")
        tab.check_console()


def test_model_choice_changes_the_result(context: Any, tiny_clipseg_dir: Path, tmp_path: Path, photo: Path) -> None:
    """Two models installed: the default (a folder) and a tiny CLIPSeg of another seed as 'clipseg'."""
    data_dir = tmp_path / "data"
    install_as_catalogue(data_dir, "clipseg", seed=1)
    settings = Settings(data_dir=data_dir, model=str(tiny_clipseg_dir))
    with serve(settings, auth=True) as two, open_tab(context, two) as tab:
        page = tab.page
        names = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
        assert names == [tiny_clipseg_dir.name, "clipseg"] and page.input_value("#model") == tiny_clipseg_dir.name
        assert page.inner_text("#model-hint") == f"{tiny_clipseg_dir.name}: answers any words."
        pick_photo(page, photo)
        set_first_options(page)
        first = submit_prompt(page, FIRST["prompt"])
        default_mask = download(page, "#dl-mask")
        page.evaluate(
            """() => { window.statuses = [];
                 new MutationObserver(() => statuses.push(document.getElementById('status').textContent))
                   .observe(document.getElementById('status'), { childList: true, characterData: true, subtree: true });
               }"""
        )
        page.focus("#model")
        page.keyboard.press("ArrowDown")  # a keyboard user picks the other model; the page asks again
        assert (
            page.inner_text("#model-hint") == "clipseg: answers any words; not loaded yet (its first request loads it)."
        )
        wait_result(page, first, model="clipseg")
        statuses = page.evaluate("window.statuses")
        assert any(re.match(r"Working… \d+\.\d s\. Loading the model on the server", t) for t in statuses), statuses
        other_mask = download(page, "#dl-mask")
        image = data_uri(photo)
        assert other_mask == two.api(image, **FIRST, model="clipseg").content
        assert default_mask == two.api(image, **FIRST).content
        assert np.count_nonzero(decode(other_mask) != decode(default_mask)) > 1000
        tab.check_console()


def test_local_server_without_auth_hides_the_key(
    context: Any, tiny_clipseg_dir: Path, tmp_path: Path, photo: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny_clipseg_dir))
    with serve(settings, auth=False) as open_server, open_tab(context, open_server) as tab:
        page = tab.page
        assert httpx.get(f"{open_server.url}/web/config").json()["auth"] is False
        assert not page.is_visible("#api-key") and not page.is_visible("#credits")
        pick_photo(page, photo)
        set_first_options(page)
        submit_prompt(page, FIRST["prompt"])
        assert download(page, "#dl-mask") == open_server.api(data_uri(photo), **FIRST).content
        assert "no API key needed" in page.inner_text("#server-info")
        tab.check_console()


# ---- the viewer ----------------------------------------------------------------------------------------


def test_downloads_are_named_after_the_image(tab: Tab, photo: Path, photo_url: str, tmp_path: Path) -> None:
    """Before, a name in another script lost every letter ("фото кота.png": "--mask.png") and a URL's name kept its
    percent-encoding ("My%20photo.png": "My-20photo-mask.png")."""
    page = tab.page

    def saved_as(button: str) -> str:
        with page.expect_download() as info:
            page.click(button)
        return str(info.value.suggested_filename)

    named = tmp_path / "фото кота.png"
    named.write_bytes(photo.read_bytes())
    pick_photo(page, named)
    shown = submit_prompt(page, FIRST["prompt"])
    assert [saved_as("#dl-mask"), saved_as("#dl-alpha")] == ["фото-кота-mask.png", "фото-кота-cutout.png"]
    (photo.parent / "My photo.png").write_bytes(photo.read_bytes())  # served at photo_url's folder
    url = photo_url.replace(photo.name, "My%20photo.png?size=large")
    page.fill("#image-url", url)
    page.press("#image-url", "Enter")
    wait_result(page, shown)
    assert page.inner_text("#image-info").startswith(url)
    assert saved_as("#dl-mask") == "My-photo-mask.png"


def test_compare_slider_zoom_and_pan(tab: Tab, photo: Path, tmp_path: Path) -> None:
    page = tab.page
    pick_photo(page, photo)
    original = shot(page, "#canvas-box", "desktop-compare-before")
    set_first_options(page)
    submit_prompt(page, FIRST["prompt"])
    result = shot(page, "#canvas-box", "desktop-compare-result")
    set_slider(page, "#compare", "ArrowRight", 50)  # the left half shows the original
    half = shot(page, "#canvas-box", "desktop-compare-half")
    assert np.abs(half[:, :250].astype(int) - original[:, :250]).mean() < 1
    assert np.abs(half[:, 262:].astype(int) - result[:, 262:]).mean() < 1
    assert np.abs(result[:, :250].astype(int) - original[:, :250]).mean() > 10
    # Zoom and pan with the keyboard; Fit shows the whole image again, at its native size (512 px).
    page.focus("#viewport")
    page.keyboard.press("+")
    assert page.inner_text("#zoom-value") == "125%"
    assert page.locator("#canvas-box").evaluate("b => b.getBoundingClientRect().width") == pytest.approx(640)
    moved = page.get_attribute("#canvas-box", "style")
    page.keyboard.press("ArrowDown")  # 640 px high in a 512 px frame: it pans up and down
    assert page.get_attribute("#canvas-box", "style") != moved, "the arrow keys do not pan"
    page.click("#zoom-fit")
    assert page.inner_text("#zoom-value") == "100%"
    # A small image is shown at its native size, not blown up.
    small = tmp_path / "small.png"
    Image.open(photo).crop((200, 100, 264, 164)).save(small)
    pick_photo(page, small)
    box = page.locator("#canvas-box").bounding_box()
    assert box is not None and (box["width"], box["height"]) == (64, 64)


def test_targets_list_toggle_and_download(tab: Tab, live: Live, photo: Path) -> None:
    page = tab.page
    pick_photo(page, photo)
    set_first_options(page)
    first = submit_prompt(page, "person, cup")
    assert tab.api_bodies[-1]["instance_masks"] is True  # each target's own mask comes in the same answer
    answer = live.api(data_uri(photo), **{**FIRST, "prompt": "person, cup"}, base64=True, instance_masks=True).json()
    dets = answer["detections"]
    assert [d["label"] for d in dets] == ["person", "cup"]
    rows = page.eval_on_selector_all("#instances li", "rows => rows.map(r => r.textContent)")
    assert len(rows) == 2
    for row, det in zip(rows, dets, strict=True):
        assert det["label"] in row and f"{det['area']:,} px" in row and f"score {det['score']:.2f}" in row
    assert "approximate" not in page.inner_text("#instances-box") and "box" not in page.inner_text("#instances-hint")
    mask = decode(base64.b64decode(answer["image"]))
    person, cup = (decode(base64.b64decode(inst["mask"])) > 0 for inst in answer["instances"])
    assert (cup & ~person).sum() > 1000 and (cup & person).sum() > 1000, "the test needs overlapping targets"

    with page.expect_download() as info:
        page.click("#instances li:nth-child(1) button")
    assert info.value.suggested_filename == "astronaut-00-person.png"
    assert np.array_equal(decode(Path(info.value.path()).read_bytes()), pp.to_uint8(person))  # the server's own
    page.uncheck("#instances li:nth-child(2) input")  # leave "cup" out: no request, exactly its pixels go
    page.wait_for_selector("#result[data-targets='10']")
    shown = decode(download(page, "#dl-mask"))
    assert np.array_equal(shown, np.where(cup & ~person, 0, mask))
    assert np.array_equal(shown, pp.to_uint8(person))  # the mask of the targets left, exactly
    assert f"{int(np.count_nonzero(shown)):,} pixels selected" in page.inner_text("#status")
    page.check("input[name=show][value=mask]")
    screen = shot(page, "#canvas-box", "desktop-targets-one-off")[..., 0]
    assert screen.shape == mask.shape and np.abs(screen.astype(int) - shown).mean() < 1  # shown at native size
    assert screen[cup & ~person].mean() < 5 and screen[person].mean() > 250  # cup's own pixels went, person's stay
    page.check("#instances li:nth-child(2) input")  # back on: the server's mask again
    page.wait_for_selector("#result[data-targets='11']")
    assert np.array_equal(decode(download(page, "#dl-mask")), mask)
    assert len(tab.api_bodies) == 1

    # grown: each target's mask grows as the server grows the selection (the library's exact Euclidean growth)
    set_slider(page, "#grow_mask", "ArrowRight", 5)
    wait_result(page, first, grow_mask=5)
    assert len(tab.api_bodies) == 2
    grown = {label: pp.to_uint8(pp.grow(m, 5)) for label, m in (("person", person), ("cup", cup))}
    assert np.array_equal(decode(download(page, "#instances li:nth-child(2) button")), grown["cup"])
    page.uncheck("#instances li:nth-child(2) input")
    page.wait_for_selector("#result[data-targets='10']")
    assert np.array_equal(decode(download(page, "#dl-mask")), grown["person"])
    assert len(tab.api_bodies) == 2
    if "feather" not in httpx.get(f"{live.url}/web/config").json()["options"]:
        return
    # feathered (the cut-out's grow 0, feather 2): cup's soft edge goes with it, nothing beyond person's edge stays
    set_slider(page, "#grow_mask", "ArrowRight", 5)  # back to the default growth, which a cut-out replaces
    wait_result(page, None, grow_mask=10)
    page.check("input[name=show][value=cutout]")
    wait_result(page, None, grow_mask=0, feather=2)
    soft = decode(base64.b64decode(live.api(**sent_options(tab), base64=True).json()["image"]))
    page.uncheck("#instances li:nth-child(2) input")
    page.wait_for_selector("#result[data-targets='10']")
    owned = {label: pp.grow(m, 2) for label, m in (("person", person), ("cup", cup))}
    shown = decode(download(page, "#dl-mask"))
    assert np.array_equal(shown, np.where(owned["cup"] & ~owned["person"], 0, soft))
    assert not shown[~owned["person"]].any() and soft[~owned["person"]].any()
    assert len(tab.api_bodies) == 4


GROW = """async ([bytes, width, height, radius]) => {
  const { growMask } = await import('/static/render.js');
  return Array.from(growMask(Uint8Array.from(bytes), width, height, radius));
}"""


def test_the_focus_keeps_its_place_when_the_result_changes(tab: Tab, photo: Path, tmp_path: Path) -> None:
    """A new result replaces the targets list under the focus: it stays on the same row's control. Ctrl+V pastes
    another image while a download button or a target's control has the focus: disabled or hidden with the result,
    they lose it; it goes to the new image. Before, it fell to the page's top each time."""
    page = tab.page
    pick_photo(page, photo)
    set_first_options(page)
    shown = submit_prompt(page, "person, cup")
    page.focus("#instances li:nth-child(2) input")
    # the slider moved (with the mouse, say) while the focus stays in the list
    page.eval_on_selector("#threshold", "(t) => { t.value = 0.51; t.dispatchEvent(new Event('change')); }")
    shown = wait_result(page, shown, threshold=0.51)
    assert page.evaluate("document.activeElement === document.querySelector('#instances li:nth-child(2) input')")
    for i, control in enumerate(("#dl-mask", "#instances li:nth-child(1) button")):
        page.focus(control)
        pasted = tmp_path / f"pasted-{i}.png"
        pasted.write_bytes(photo.read_bytes())
        paste_file(page, pasted)
        assert page.evaluate("document.activeElement.id") == "viewport", f"the focus on {control} fell to the top"
        shown = wait_result(page, shown)  # auto-update: the pasted image is masked


def test_the_page_grows_a_target_as_the_library_does(tab: Tab) -> None:
    """render.js's growMask (a target's mask grown by grow_mask, in the page) equals automask.postprocess.grow."""
    rng = np.random.default_rng(5)
    h, w = 60, 90
    blobs = ndimage.gaussian_filter(rng.random((h, w)), 3) > 0.52  # irregular shapes touching the borders
    dot = np.zeros((h, w), bool)
    dot[7, 80] = True
    for mask in (blobs, dot, np.zeros((h, w), bool)):
        for radius in (0, 1, 2, 5, 13, 37, 100):
            got = tab.page.evaluate(GROW, [pp.to_uint8(mask).ravel().tolist(), w, h, radius])
            want = pp.to_uint8(pp.grow(mask, radius))
            assert np.array_equal(np.array(got, np.uint8).reshape(h, w), want), (int(mask.sum()), radius)
    assert 0.1 < blobs.mean() < 0.9


def test_cutout_has_no_halo_by_default(tab: Tab, live: Live, photo: Path) -> None:
    page = tab.page
    feather = "feather" in httpx.get(f"{live.url}/web/config").json()["options"]
    pick_photo(page, photo)
    set_slider(page, "#threshold", "ArrowRight", 30)
    first = submit_prompt(page, "person")
    assert tab.api_bodies[-1]["grow_mask"] == 10  # a mask for inpainting: the API's default growth
    page.check("input[name=show][value=cutout]")
    wait_result(page, first, grow_mask=0)  # a cut-out: no band of background around the subject
    assert page.input_value("#grow_mask") == "0" and "tight" in page.inner_text("#grow-hint")
    sent = sent_options(tab)
    assert sent.get("feather") == (2 if feather else None)
    cutout = decode(download(page, "#dl-alpha"))
    reference = decode(live.api(**{**sent, "return_alpha": True}).content)
    assert np.array_equal(cutout, reference)
    shot(page, "#canvas-box", "desktop-cutout")
    page.check("input[name=show][value=overlay]")  # back: the growth returns, that mask is shown from memory
    wait_result(page, None, grow_mask=10)
    assert "no request" in page.inner_text("#status") and len(tab.api_bodies) == 2
    page.check("input[name=show][value=cutout]")
    set_slider(page, "#grow_mask", "ArrowRight", 4)
    assert "keeps a 4 px band of background" in page.inner_text("#grow-hint")


# ---- kept settings, clipboard, auto-update, advanced options -------------------------------------------


def test_settings_are_kept_across_a_reload(tab: Tab) -> None:
    page = tab.page
    page.fill("#prompt", "cup, saucer")
    set_slider(page, "#threshold", "ArrowRight", 15)
    page.check("#invert_mask")
    page.check("input[name=show][value=mask]")
    page.fill("#tint", "#00ff00")
    page.click("#advanced summary")
    page.uncheck("#auto")
    page.reload()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    assert page.input_value("#prompt") == "cup, saucer"
    assert page.input_value("#threshold") == "0.35" and page.inner_text("#threshold-value") == "0.35"
    assert page.is_checked("#invert_mask") and page.is_checked("input[name=show][value=mask]")
    assert page.input_value("#tint") == "#00ff00" and not page.is_checked("#auto")


def test_copy_mask_to_the_clipboard(context: Any, tab: Tab, live: Live, photo: Path) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    page = tab.page
    pick_photo(page, photo)
    set_first_options(page)
    submit_prompt(page, FIRST["prompt"])
    page.click("#copy-mask")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('clipboard')")
    b64 = page.evaluate(
        """async () => {
             const [item] = await navigator.clipboard.read();
             const bytes = new Uint8Array(await (await item.getType('image/png')).arrayBuffer());
             return btoa(String.fromCharCode(...bytes));
           }"""
    )
    copied = decode(base64.b64decode(b64))  # the browser's clipboard keeps the pixels, as grey RGB
    mask = decode(live.api(data_uri(photo), **FIRST).content)
    assert copied.shape[:2] == mask.shape and all(np.array_equal(copied[..., c], mask) for c in range(3))


def test_auto_update_off_says_the_result_is_stale(tab: Tab, photo: Path) -> None:
    page = tab.page
    page.click("#advanced summary")
    page.uncheck("#auto")
    pick_photo(page, photo)
    set_first_options(page)
    first = submit_prompt(page, FIRST["prompt"])
    set_slider(page, "#threshold", "ArrowRight", 5)
    page.wait_for_selector("#stale-note:not([hidden])")
    assert "previous settings" in page.inner_text("#stale-note")
    page.wait_for_timeout(600)
    assert len(tab.api_bodies) == 1, "auto-update is off, yet the page asked again"
    page.click("#submit")
    wait_result(page, first, threshold=0.55)
    assert page.is_hidden("#stale-note")


def test_advanced_options_are_sent_only_when_set(tab: Tab, live: Live, photo: Path) -> None:
    page = tab.page
    offered = httpx.get(f"{live.url}/web/config").json()["options"]
    if set(offered) != set(EXTENSIONS):
        pytest.skip(f"this automask's options lack {set(EXTENSIONS) - set(offered)} (issue 13)")
    pick_photo(page, photo)
    set_first_options(page)
    first = submit_prompt(page, FIRST["prompt"])
    assert not set(EXTENSIONS) & set(tab.api_bodies[-1]), "default extension fields were sent"
    page.click("#advanced summary")
    page.fill("#negative_prompt", "face")
    page.check("#fill_holes")
    page.fill("#min_area", "50")
    page.press("#min_area", "Tab")
    set_slider(page, "#feather", "ArrowRight", 3)
    wait_result(page, first, negative_prompt="face", feather=3, fill_holes=True, min_area=50)
    sent = sent_options(tab)
    assert download(page, "#dl-mask") == live.api(**sent).content
    assert len(np.unique(decode(download(page, "#dl-mask")))) > 2, "a feathered mask has soft values"


def test_bad_numbers_are_named_beside_their_field_and_not_sent(tab: Tab, photo: Path) -> None:
    """Before, a negative min_area was quietly sent as 0 (left out) and a seed of 1.5 was sent (the API refused it):
    now each is named beside its field, and nothing is sent until it is put right."""
    page = tab.page
    page.click("#advanced summary")
    page.uncheck("#auto")  # only Make mask sends
    pick_photo(page, photo)
    set_first_options(page)
    first = submit_prompt(page, FIRST["prompt"])
    for field, typed, said, right in (
        ("min_area", "-5", "Smallest region kept must be a whole number from 0 to 1,000,000,000, not -5.", "50"),
        ("seed", "1.5", "Seed must be a whole number from -1 to 999,999,999,999,999, not 1.5.", "7"),
    ):
        page.fill(f"#{field}", typed)
        assert page.inner_text(f"#{field}-error") == said and page.is_visible(f"#{field}-error")
        assert page.get_attribute(f"#{field}", "aria-invalid") == "true"
        page.click("#submit")
        assert page.inner_text("#error") == said
        assert page.evaluate("document.activeElement.id") == field
        page.fill(f"#{field}", right)
        assert page.is_hidden(f"#{field}-error") and page.get_attribute(f"#{field}", "aria-invalid") is None
    assert len(tab.api_bodies) == 1, "a number the API refuses was sent"
    page.click("#submit")
    wait_result(page, first, min_area=50, seed=7)
    assert page.is_hidden("#error")


HOLD_READS = """() => { window.heldReads = [];
                        const read = (window.readAsDataURL = FileReader.prototype.readAsDataURL);
                        FileReader.prototype.readAsDataURL = function (file) {
                          window.heldReads.push(() => read.call(this, file)); }; }"""


def test_a_refused_paste_wins_over_a_file_still_being_read(tab: Tab, photo: Path, tmp_path: Path) -> None:
    """A file still being read (a large one, on a slow disk), then a data: URI too large for the server pasted: the
    paste, the user's last act, wins: its error stays, and the file read after it is not shown (nor masked); the
    next image chosen is read and shown. Before, the file, once read, replaced what the paste showed and cleared
    its error."""
    page = tab.page
    limit = {"max_image_bytes": 100_000}
    page.route("**/web/config", lambda route: route.fulfill(json={**route.fetch().json(), **limit}))
    page.reload()
    page.wait_for_selector("body[data-loaded=true]", state="attached")
    page.evaluate(HOLD_READS)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(small)
    page.set_input_files("#file", str(small))
    page.wait_for_function("() => window.heldReads.length === 1")
    page.evaluate(PASTE_TEXT, data_uri(photo))  # 100 KB and more: over the lowered limit
    page.wait_for_selector("#error:not([hidden])")
    said = page.inner_text("#error")
    assert said.startswith("The pasted image ")
    page.evaluate("() => window.heldReads.forEach((read) => read())")
    page.wait_for_timeout(800)  # longer than the page waits before masking a new image by itself
    assert page.is_visible("#error") and page.inner_text("#error") == said, "the file read replaced the paste"
    assert page.is_hidden("#canvas-box") and not tab.api_bodies
    page.evaluate("() => { FileReader.prototype.readAsDataURL = window.readAsDataURL; }")
    pick_photo(page, small.rename(tmp_path / "next.png"))  # another file: the page is not stuck "reading"
    assert page.is_hidden("#error") and page.inner_text("#image-info").startswith("next.png")


HOLD_BLOB_READS = """() => { window.heldReads = [];
                             const read = (window.blobRead = Blob.prototype.arrayBuffer);
                             Blob.prototype.arrayBuffer = function () {
                               return new Promise((done) => window.heldReads.push(() => done(read.call(this)))); }; }"""


def test_a_pasted_image_dropped_for_a_refused_act_can_be_pasted_again(tab: Tab, photo: Path) -> None:
    """A data: URI pasted and still being read, then text that is not an image URL pasted (refused: it wins, the
    image is dropped), then the same data: URI pasted again: it is read and shown. Before, the page took it for the
    image already shown and did nothing."""
    page = tab.page
    page.evaluate(HOLD_BLOB_READS)
    image = data_uri(photo)
    page.evaluate(PASTE_TEXT, image)
    page.wait_for_function("() => window.heldReads.length > 0")
    page.evaluate(PASTE_TEXT, "not an image")
    page.wait_for_selector("#error:not([hidden])")
    page.evaluate("() => { Blob.prototype.arrayBuffer = window.blobRead; window.heldReads.forEach((read) => read()); }")
    page.wait_for_timeout(300)
    assert page.is_hidden("#canvas-box"), "the image the refused paste superseded was shown"
    page.evaluate(PASTE_TEXT, image)
    page.wait_for_selector("#canvas-box", state="visible", timeout=5000)
    assert page.inner_text("#image-info").startswith("pasted image")
