"""The try-it page, end to end (part 1: serving, results, credits, cancellation, errors, layout): a real server on
a loopback port with a tiny CLIPSeg, and Debian's chromium driven by Playwright. Results are checked in the
pixels of screenshots and downloads, against the v1 API's own answers; credits against GET /v1/credits.

The browser tests skip when /usr/bin/chromium or playwright is missing, except under CI (env CI set), where
they fail instead. Screenshots go to $WEB_SCREENSHOTS, else out/web-screenshots. Part 2: test_web_tools.py.
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from automask.imageio.decode import decode_image
from automask.settings import Settings
from server_helpers import decode
from test_colour_profiles import WIDE_ICC
from web_helpers import (
    API_PATH,
    DESKTOP,
    FIRST,
    PHONE,
    Live,
    check_overlay,
    data_uri,
    download,
    in_viewport,
    keep,
    open_tab,
    pick_photo,
    serve,
    set_first_options,
    set_slider,
    shot,
    submit_prompt,
    try_the_docs,
    wait_result,
)

pytest.importorskip("fastapi")
CREDITS = 1000


@pytest.fixture(scope="module")
def live(tiny_clipseg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The server the page tests use (a key with CREDITS credits); it may fetch image URLs on loopback."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("web-data"), model=str(tiny_clipseg_dir), allow_private_urls=True
    )
    with serve(settings, auth=True, credits=CREDITS) as running:
        yield running


@pytest.fixture(scope="module")
def photo(astronaut: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """skimage's astronaut (512×512 RGB) as a PNG file, as a user would pick it."""
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    return path


@pytest.fixture()
def page(context: Any, live: Live) -> Iterator[Any]:
    """The page at 1366×900 with the test key typed in; no console errors allowed."""
    with open_tab(context, live) as tab:
        yield tab.page
        tab.check_console()


# ---- without a browser ---------------------------------------------------------------------------------


def test_page_and_assets_are_served_locally(live: Live) -> None:
    from automask.web import ASSETS

    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert not [r for r in refs if r.startswith(("http:", "https:", "//"))], "the page loads something remotely"
    assert "static/app.js" in refs and "static/style.css" in refs
    for name in ASSETS[1:]:
        asset = httpx.get(f"{live.url}/static/{name}")
        assert asset.status_code == 200 and len(asset.content) > 1000, name
        remote = re.findall(r"""(?:["'`(]|url\()\s*(?:https?:)?//""", asset.text)
        assert not remote, f"{name} refers to a remote address: {remote}"
        if name.endswith(".js"):
            assert asset.headers["content-type"].startswith("text/javascript")
            imports = re.findall(r'from "([^"]+)"', asset.text)
            assert all(i.startswith("./") and i[2:] in ASSETS for i in imports), imports


def test_static_serves_only_the_page_assets(live: Live) -> None:
    for name in ("__init__.py", "..%2F__init__.py", "nope.js", "examples/LICENSE.md", "examples/..%2Fapp.js"):
        res = httpx.get(f"{live.url}/static/{name}")
        assert res.status_code == 404, name
        assert "error" in res.json()


def test_config_describes_models_vocabulary_and_examples(live: Live, tiny_clipseg_dir: Path) -> None:
    from automask.options import MaskOptions
    from automask.routing import VOCABULARY
    from automask.server.config import ServerSettings

    config = httpx.get(f"{live.url}/web/config").json()
    assert config["auth"] is True
    assert config["model"] == tiny_clipseg_dir.name  # the folder's name, never the server's path
    assert config["models"] == [tiny_clipseg_dir.name]
    [model] = config["choices"]
    assert model["name"] == tiny_clipseg_dir.name and model["backend"] == "clipseg"
    assert model["open_vocabulary"] is True and model["loaded"] is True and model["default"] is True
    assert config["ready"] is True
    assert config["max_image_bytes"] == Settings().max_image_bytes
    assert config["max_body_bytes"] == ServerSettings().body_limit(Settings().max_image_bytes)
    assert sorted(w for words in config["vocabulary"].values() for w in words) == sorted(VOCABULARY)
    assert set(config["vocabulary"]["background"]) == {"background", "backdrop"}
    assert config["options"] == [
        n for n in ("negative_prompt", "feather", "fill_holes", "min_area") if n in MaskOptions.model_fields
    ]
    assert len(config["examples"]) == 3
    for example in config["examples"]:
        res = httpx.get(f"{live.url}/static/examples/{example['file']}")
        assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
        assert max(decode(res.content).shape[:2]) <= 512


# ---- results -------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_the_docs_work_at_the_root(context: Any, live: Live) -> None:
    """Swagger UI at /docs and ReDoc at /redoc of a server without a prefix: they render, "Try it out" reaches the
    API, and they ask no other host for anything. Before, ReDoc loaded its maker's logo from cdn.redoc.ly."""
    try_the_docs(context, live.url, live.url)


def test_overlay_appears_over_the_photo(page: Any, live: Live, photo: Path) -> None:
    pick_photo(page, photo)
    set_first_options(page)
    before = shot(page, "#canvas-box", "desktop-before")
    submit_prompt(page, FIRST["prompt"])
    after = shot(page, "#canvas-box", "desktop-overlay")
    keep(page.screenshot(), "desktop-1366x900")
    mask = decode(live.api(data_uri(photo), **FIRST).content)
    check_overlay(before, after, mask, opacity=0.6)
    status = page.inner_text("#status")
    assert re.search(r"Done in (\d+ ms|[\d.]+ s) \(server (\d+ ms|[\d.]+ s)\)", status), status
    assert f"{int(np.count_nonzero(mask)):,} pixels selected" in status
    assert not page.is_visible("#model"), "one model installed: nothing to choose"
    set_slider(page, "#opacity", "End")  # full opacity: the selected pixels are the tint itself
    check_overlay(before, shot(page, "#canvas-box", "desktop-overlay-full"), mask, opacity=1.0)
    page.fill("#tint", "#00c040")  # another colour, for red or orange subjects
    check_overlay(before, shot(page, "#canvas-box", "desktop-overlay-green"), mask, 1.0, np.array([0, 192, 64]))
    page.check("#outline")  # outline only: just the border of the selection changes
    line = shot(page, "#canvas-box", "desktop-outline")
    changed = np.abs(line.astype(int) - before.astype(int)).sum(axis=2) > 30
    assert changed.sum() > 500 and (changed & ndimage_edge(mask)).sum() > 0.95 * changed.sum(), "not on the edge"
    assert not changed[ndimage.binary_erosion(mask > 127, iterations=4)].any(), "the inside is tinted too"
    page.check("input[name=show][value=mask]")  # the mask itself, grey
    grey = shot(page, "#canvas-box", "desktop-mask")[..., 0]
    assert np.abs(grey.astype(int) - mask.astype(int)).mean() < 1


def ndimage_edge(mask: np.ndarray, width: int = 5) -> np.ndarray:
    """Pixels within `width` of the boundary of an H×W uint8 mask."""
    sel = mask > 127
    return ndimage.binary_dilation(sel, iterations=width) & ~ndimage.binary_erosion(sel, iterations=width)


@pytest.mark.browser
def test_downloads_equal_the_api_answers(page: Any, live: Live, photo: Path) -> None:
    """Mask: the server's bytes; cut-out and preview: rendered in the page, pixel for pixel the API's."""
    pick_photo(page, photo)
    set_first_options(page)
    page.check("#invert_mask")
    set_slider(page, "#grow_mask", "ArrowRight", 3)
    submit_prompt(page, FIRST["prompt"])
    options = {**FIRST, "grow_mask": 3, "invert_mask": True}
    image = data_uri(photo)
    assert download(page, "#dl-mask") == live.api(image, **options).content
    cutout = decode(download(page, "#dl-alpha"))
    assert cutout.shape == (512, 512, 4)
    assert np.array_equal(cutout, decode(live.api(image, **options, return_alpha=True).content))
    preview = decode(download(page, "#dl-preview"))
    assert np.array_equal(preview, decode(live.api(image, **options, return_mask=False).content))


@pytest.mark.browser
def test_a_photo_without_colour_information_is_decoded_once(
    page: Any, photo: Path, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """The page compares a colour-managed decode with the stored values only for a file that may carry colour
    information: a photo without any is decoded once when picked. Before, every photo was decoded twice (a
    24 MP JPEG took about 0.9-1.3 s to read in the page on a loaded 2-core machine; now 0.39-0.43 s)."""
    page.evaluate(
        """() => { const decode = window.createImageBitmap; window.decodes = 0;
                   window.createImageBitmap = (...args) => { window.decodes += 1; return decode(...args); }; }"""
    )
    pick_photo(page, photo)
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Image ready')")
    assert page.evaluate("window.decodes") == 1
    rgb = Image.fromarray(astronaut[:64, :64])
    files: dict[str, tuple[bool, dict[str, Any]]] = {
        "plain.jpg": (False, {}),
        "icc.jpg": (True, {"icc_profile": WIDE_ICC}),
        "plain.png": (False, {}),
        "icc.png": (True, {"icc_profile": WIDE_ICC}),
        "lossless.webp": (False, {"lossless": True}),
        "icc.webp": (True, {"lossless": True, "icc_profile": WIDE_ICC}),
        "photo.gif": (True, {}),  # a format not read here: compared, as before
    }
    for name, (_, options) in files.items():
        rgb.save(tmp_path / name, **options)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(astronaut[:64, :64, 0]).save(tmp_path / "gamma.png", pnginfo=gamma_chunk())
    files.update({"cmyk.jpg": (True, {}), "gamma.png": (True, {})})
    found = page.evaluate(
        """async (files) => { const { mayCarryColours } = await import('./static/colours.js');
             return Object.fromEntries(await Promise.all(Object.entries(files).map(async ([name, b64]) =>
               [name, await mayCarryColours(new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))]))]))); }""",
        {name: base64.b64encode((tmp_path / name).read_bytes()).decode() for name in files},
    )
    assert found == {name: carries for name, (carries, _) in files.items()}


RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
TIFF = "http://ns.adobe.com/tiff/1.0/"


def gamma_chunk() -> Any:
    """PNG text info with a gAMA chunk (1/2.2) before the pixels, which a browser applies."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", (45455).to_bytes(4, "big"))
    return info


@pytest.mark.browser
def test_downloads_of_an_image_with_transparency_equal_the_api_answers(
    page: Any, live: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """A PNG whose left part is transparent and whose top rows fade in: the cut-out keeps that transparency and the
    preview shows it on white, as the API's do, byte for byte. A canvas stores colours premultiplied by alpha (those
    under alpha 0 are lost, those under alpha 1 may be 127 levels off): the cut-out is the server's (one more
    request); the preview, on white, is exact when rendered in the page. Before, the page rendered the cut-out."""
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:64, :, 3] = np.arange(64, dtype=np.uint8)[:, None] * 4
    rgba[:, :200, 3] = 0
    path = tmp_path / "astronaut-transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pick_photo(page, path)
    set_first_options(page)
    submit_prompt(page, FIRST["prompt"])
    assert page.inner_text("#dl-alpha") == "Download cut-out (1 more request)"
    assert page.inner_text("#dl-preview") == "Download preview"
    image = data_uri(path)
    api = decode(live.api(image, **FIRST, return_alpha=True).content)
    assert not api[:, :200, 3].any() and api[:, 200:, 3].any()
    assert np.array_equal(decode(download(page, "#dl-alpha")), api)
    preview = decode(download(page, "#dl-preview"))
    assert np.array_equal(preview, decode(live.api(image, **FIRST, return_mask=False).content))


@pytest.mark.browser
def test_downloads_of_photos_the_page_cannot_decode_as_the_server_does(
    page: Any, live: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """A wide-gamut photo (the server converts it to sRGB with LittleCMS, a browser with its own engine) and a 16-bit
    grey PNG (the server rounds its samples, a browser truncates them): the page's cut-out and preview come from the
    server, one more request each (the buttons say so), and equal the API's. With a target left out, which only the
    page can do, the page renders them itself (from the colours it shows), without a request.

    Before, the page rendered them from the stored values: up to 31 levels off on the photo, 1 on the grey PNG."""
    wide, grey = tmp_path / "wide-gamut.png", tmp_path / "grey-16-bit.png"
    Image.fromarray(astronaut).save(wide, icc_profile=WIDE_ICC)
    noise = np.random.default_rng(0).integers(0, 257, (200, 300), dtype=np.uint16)
    Image.fromarray(astronaut[:200, :300, 0].astype(np.uint16) * 257 + noise).save(grey)
    set_first_options(page)
    previous = None
    for path in (wide, grey):
        pick_photo(page, path)
        previous = submit_prompt(page, FIRST["prompt"], previous)
        assert page.inner_text("#dl-alpha") == "Download cut-out (1 more request)"
        image = data_uri(path)
        cutout = decode(download(page, "#dl-alpha"))
        assert np.array_equal(cutout, decode(live.api(image, **FIRST, return_alpha=True).content)), path.name
        preview = decode(download(page, "#dl-preview"))
        assert np.array_equal(preview, decode(live.api(image, **FIRST, return_mask=False).content)), path.name
    pick_photo(page, wide)
    submit_prompt(page, "person, cup", previous)
    page.uncheck("#instances li:nth-child(2) input")  # leave "cup" out
    page.wait_for_selector("#result[data-targets='10']")
    assert page.inner_text("#dl-alpha") == "Download cut-out"
    sent: list[str] = []
    page.on("request", lambda req: sent.append(req.url) if req.method == "POST" else None)
    cutout = decode(download(page, "#dl-alpha"))
    assert np.array_equal(cutout[..., 3], decode(download(page, "#dl-mask"))) and not sent


@pytest.mark.browser
def test_clicking_a_server_download_again_while_it_runs_sends_one_request(
    context: Any, live: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """On a slow network, the cut-out of a photo the page cannot render exactly (it comes from the server) is
    clicked again before it arrives: one request, one charge. Before, each click sent (and paid for) its own.

    Its failure (no credits left) is said, the result staying as it is, not greyed (it still holds), and goes once
    the download works. Before, the result was greyed as if stale, and stayed so, with the error, after it worked."""
    wide = tmp_path / "wide-gamut.png"
    Image.fromarray(astronaut).save(wide, icc_profile=WIDE_ICC)
    with open_tab(context, live) as tab:
        page = tab.page
        pick_photo(page, wide)
        set_first_options(page)
        submit_prompt(page, FIRST["prompt"])
        refused = '{"error": "Insufficient credits."}'
        page.route(f"**{API_PATH}", lambda route: route.fulfill(status=406, body=refused))
        page.click("#dl-alpha")
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error") == "Insufficient credits."
        assert "still holds" in page.inner_text("#status")
        assert "stale" not in (page.get_attribute("#stage", "class") or ""), "the result, still good, was greyed"
        page.unroute(f"**{API_PATH}")
        held: list[Any] = []
        page.route(f"**{API_PATH}", lambda route: held.append(route))  # the answers wait, as on a slow network
        page.click("#dl-alpha")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Asking the server')")
        page.click("#dl-alpha")
        page.wait_for_timeout(300)
        assert len(held) == 1, "a second request for the same cut-out"
        with page.expect_download() as saved:
            held[0].continue_()
        assert decode(Path(saved.value.path()).read_bytes()).shape == (512, 512, 4)
        page.unroute(f"**{API_PATH}")
        page.wait_for_selector("#error", state="hidden")
        tab.check_console(allow_http_errors=True)  # the 406


@pytest.mark.browser
def test_an_exif_rotated_webp_is_shown_and_rendered_upright(
    page: Any, live: Live, astronaut: np.ndarray, tmp_path: Path
) -> None:
    """A lossless WebP stored on its side, its EXIF saying turn it (6), and one upside down (3): Chromium does not
    apply a WebP's EXIF orientation, the server does. The page turns it itself: it shows the photo upright, and its
    cut-out and preview, rendered without a request, equal the API's pixel for pixel.

    Before, the page showed the photo as stored under the server's upright mask; the cut-out and preview of the one
    on its side came from the server (one more request), those of the upside-down one were rendered misaligned."""
    small = Image.fromarray(np.ascontiguousarray(astronaut[:48, :80]))
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF}"><rdf:Description xmlns:tiff="{TIFF}"'
    for orientation in range(1, 9):  # each of the 8: the page's pixels are the server's decode
        exif = Image.Exif()
        exif[0x0112] = orientation
        webp, jpeg = io.BytesIO(), io.BytesIO()
        small.save(webp, "WEBP", lossless=True, exif=exif)
        # a JPEG's orientation in XMP alone: Chromium ignores it, the server (Pillow) applies it
        tag = f'tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>'
        small.save(jpeg, "JPEG", quality=95, xmp=f"{xmp} {tag}".encode())
        for encoded in (webp, jpeg):
            found = page.evaluate(
                """async (b64) => { const { imagePixels } = await import('./static/render.js');
                     const px = await imagePixels(new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))]));
                     return [px.height, px.width, Array.from(px.data)]; }""",
                base64.b64encode(encoded.getvalue()).decode(),
            )
            rgba = np.array(found[2], np.uint8).reshape(found[0], found[1], 4)
            assert np.array_equal(rgba[..., :3], decode_image(encoded.getvalue(), Settings())), orientation
    upright = astronaut[:, 64:448]  # 512×384: a quarter turn swaps its sides
    stored = {6: np.rot90(upright, 1), 3: upright[::-1, ::-1]}  # what turning by 6 / 3 makes upright
    set_first_options(page)
    previous, posts = None, list[str]()
    page.on("request", lambda req: posts.append(req.url) if req.method == "POST" else None)
    for orientation, pixels in stored.items():
        path = tmp_path / f"astronaut-{orientation}.webp"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(np.ascontiguousarray(pixels)).save(path, lossless=True, exif=exif)
        pick_photo(page, path)
        assert page.evaluate("[source.naturalWidth, source.naturalHeight]") == [384, 512]
        shown = shot(page, "#canvas-box", f"webp-exif-{orientation}")
        expected = np.asarray(Image.fromarray(upright).resize(shown.shape[1::-1], Image.Resampling.BILINEAR))
        assert np.abs(shown.astype(int) - expected).mean() < 6, "the photo is not shown upright"
        previous = submit_prompt(page, FIRST["prompt"], previous)
        assert page.inner_text("#dl-alpha") == "Download cut-out"
        posts.clear()
        image = data_uri(path, "image/webp")
        cutout = decode(download(page, "#dl-alpha"))
        assert cutout.shape == (512, 384, 4)
        assert np.array_equal(cutout, decode(live.api(image, **FIRST, return_alpha=True).content))
        preview = decode(download(page, "#dl-preview"))
        assert np.array_equal(preview, decode(live.api(image, **FIRST, return_mask=False).content))
        assert not posts, "the page asked the server for a rendering"


@pytest.mark.browser
def test_slider_change_gives_a_new_result(page: Any, live: Live, photo: Path) -> None:
    pick_photo(page, photo)
    set_first_options(page)
    first = submit_prompt(page, FIRST["prompt"])
    mask_a = decode(download(page, "#dl-mask"))
    set_slider(page, "#threshold", "ArrowRight", 10)  # 0.50 -> 0.60: the page asks again by itself
    wait_result(page, first, threshold=0.6)
    mask_b = decode(download(page, "#dl-mask"))
    assert np.count_nonzero(mask_b) < np.count_nonzero(mask_a), "a higher threshold must select less"
    assert np.array_equal(mask_b, decode(live.api(data_uri(photo), **{**FIRST, "threshold": 0.6}).content))


# ---- credits: one charged request per mask -------------------------------------------------------------


def shown_credits(page: Any) -> int:
    page.wait_for_selector("#credits:not([hidden])")
    return int(page.get_attribute("#credits", "data-credits") or "-1")


@pytest.mark.browser
def test_one_charged_request_per_mask(context: Any, live: Live, photo: Path) -> None:
    with open_tab(context, live) as tab:
        page = tab.page
        start = live.settled_credits()
        assert start is not None and shown_credits(page) == start
        assert page.inner_text("#credits") == f"Credits left: {start:,}"
        pick_photo(page, photo)
        set_first_options(page)
        first = submit_prompt(page, FIRST["prompt"])
        assert len(tab.api_bodies) == 1 and tab.api_bodies[0]["base64"] is True
        page.wait_for_function(f"() => document.getElementById('credits').dataset.credits === '{start - 1}'")
        # Everything shown or saved from this mask is rendered in the page: no request, no credit.
        for show in ("cutout", "mask", "overlay"):
            page.check(f"input[name=show][value={show}]")
        set_slider(page, "#opacity", "ArrowLeft", 20)
        set_slider(page, "#compare", "ArrowRight", 30)
        page.click("#zoom-in")
        page.click("#zoom-fit")
        for button in ("#dl-mask", "#dl-alpha", "#dl-preview"):
            download(page, button)
        time.sleep(0.6)  # longer than the page's auto-update delay
        assert len(tab.api_bodies) == 1, tab.api_bodies[1:]
        assert live.settled_credits() == start - 1
        # A burst of slider moves: one request, for where the slider stopped.
        set_slider(page, "#threshold", "ArrowRight", 10)
        second = wait_result(page, first, threshold=0.6)
        assert len(tab.api_bodies) == 2 and tab.api_bodies[1]["threshold"] == 0.6
        assert live.settled_credits() == start - 2
        # Back to a threshold already seen: shown from memory, nothing sent.
        set_slider(page, "#threshold", "ArrowLeft", 10)
        wait_result(page, second, threshold=0.5)
        assert "no request, nothing charged" in page.inner_text("#status")
        assert len(tab.api_bodies) == 2
        assert live.settled_credits() == start - 2 == shown_credits(page)
        tab.check_console()


@pytest.mark.browser
def test_superseded_and_cancelled_requests_are_not_charged(
    context: Any, tiny_clipseg_dir: Path, tmp_path: Path, photo: Path
) -> None:
    """A slow server (1.5 s per mask): a new prompt aborts the request for the old one, Cancel aborts the
    user's own; only the masks shown are charged, and the time shown is that of the request shown."""
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny_clipseg_dir))
    with serve(settings, auth=True, credits=50, debug_delay=1.5) as slow, open_tab(context, slow) as tab:
        page = tab.page
        page.fill("#prompt", "person")
        pick_photo(page, photo)  # the page masks the new photo with the prompt it has...
        page.wait_for_selector("#stage[aria-busy=true]")
        assert page.is_visible("#cancel")
        # Busy is the image and targets being replaced, not the section holding the status and error (whose
        # announcements a screen reader may hold back); Cancel says what it cancels ("Cancel download" is too).
        held = "() => ['status', 'error'].some((id) => document.getElementById(id).closest('[aria-busy=true]'))"
        assert not page.evaluate(held), "the status line is inside a busy region"
        assert page.get_by_role("button", name="Cancel the mask request", exact=True).is_visible()
        page.wait_for_function("() => /Working… \\d+\\.\\d s/.test(document.getElementById('status').textContent)")
        spoken, shown = page.locator("#status").aria_snapshot(), page.inner_text("#status")
        page.wait_for_timeout(300)  # the seconds tick on the screen, not in a screen reader's ear (a live region)
        assert page.locator("#status").aria_snapshot() == spoken == "- status: Working…"
        assert page.inner_text("#status") != shown
        page.fill("#prompt", "cup")  # ...but the user wants another prompt: that request is aborted
        t0 = time.monotonic()
        page.press("#prompt", "Enter")
        wait_result(page, None, prompt="cup")
        wall_ms = (time.monotonic() - t0) * 1000
        assert [b["prompt"] for b in tab.api_bodies] == ["person", "cup"]
        assert slow.settled_credits() == 49, "the aborted request was charged"
        shown = re.search(r"Done in ([\d.]+) (ms|s)", page.inner_text("#status"))
        assert shown is not None
        shown_ms = float(shown[1]) * (1 if shown[2] == "ms" else 1000)
        assert 1400 <= shown_ms <= wall_ms + 50, (shown_ms, wall_ms)
        # Cancel: the request is aborted, the result stays, nothing is charged.
        set_slider(page, "#threshold", "ArrowRight", 5)
        page.wait_for_selector("#stage[aria-busy=true]")
        page.focus("#submit")
        page.keyboard.press("Tab")  # Cancel comes next, with the keyboard as with the mouse
        page.keyboard.press("Enter")
        assert "Cancelled" in page.inner_text("#status")
        assert page.evaluate("document.activeElement.id") == "submit", "the focus left with the hidden Cancel"
        assert page.get_attribute("#stage", "aria-busy") == "false" and not page.is_visible("#cancel")
        assert page.is_visible("#after") and not page.is_disabled("#dl-mask")
        time.sleep(2.0)  # the server finishes (or drops) the aborted work
        assert slow.settled_credits() == 49, "the cancelled request was charged"
        tab.check_console()


@pytest.mark.browser
def test_typing_the_key_does_not_lock_the_user_out(
    context: Any, tiny_clipseg_dir: Path, tmp_path: Path, photo: Path
) -> None:
    """A key typed by hand: its balance is looked up once the field rests, not per keystroke. Before, each partial
    key was a failed authentication: past the server's limit (here 10 a minute) the address was locked out, and the
    user's first mask was refused with a 429."""
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny_clipseg_dir))
    with (
        serve(settings, auth=True, credits=5, auth_fail_limit=10) as strict,
        open_tab(context, Live(strict.url, None)) as tab,  # a key the server has not seen yet
    ):
        page = tab.page
        assert strict.key
        lookups: list[int] = []
        page.on("response", lambda res: lookups.append(res.status) if res.url.endswith("/v1/credits") else None)
        page.type("#api-key", strict.key, delay=15)
        page.wait_for_selector("#credits:not([hidden])")
        assert page.get_attribute("#credits", "data-credits") == "5"
        pick_photo(page, photo)
        page.fill("#prompt", FIRST["prompt"])
        page.press("#prompt", "Enter")
        page.wait_for_selector("#result[data-ready], #error:not([hidden])")
        assert page.is_hidden("#error"), page.inner_text("#error")
        assert 401 not in lookups and len(lookups) <= 2, lookups
        tab.check_console()


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_error_keeps_the_last_result_and_live_updates(context: Any, live: Live, photo: Path) -> None:
    with open_tab(context, live) as tab:
        page = tab.page
        pick_photo(page, photo)
        set_first_options(page)
        first = submit_prompt(page, FIRST["prompt"])
        good = shot(page, "#canvas-box", "desktop-good")
        page.fill("#api-key", "am_nothere_wrong")
        set_slider(page, "#threshold", "ArrowRight", 5)  # auto-update with a wrong key: a 401
        page.wait_for_selector("#error:not([hidden])")
        answer = httpx.post(
            f"{live.url}/v1/automatic-mask-generator",
            json={"image": data_uri(photo), "prompt": "person"},
            headers={"x-api-key": "am_nothere_wrong"},
        )
        assert answer.status_code == 401 and page.inner_text("#error") == answer.json()["error"]
        assert page.get_attribute("#result", "data-ready") == first, "the good result was dropped"
        assert page.is_visible("#after") and not page.is_disabled("#dl-mask")
        greyed = shot(page, "#canvas-box", "desktop-error-kept")
        assert greyed.shape == good.shape and greyed.std(axis=2).mean() < 2  # grey...
        assert np.abs(greyed.astype(int) - good.astype(int)).mean() > 10  # ...and faded: marked stale
        assert page.evaluate("document.activeElement.id") == "api-key"
        page.fill("#api-key", live.key or "")
        set_slider(page, "#threshold", "ArrowRight", 5)  # live updates go on after the error
        wait_result(page, first, threshold=0.6)
        assert page.is_hidden("#error")
        tab.check_console(allow_http_errors=True)


@pytest.mark.browser
def test_action_and_error_stay_in_view(context: Any, live: Live, photo: Path) -> None:
    """1366×900: with no key typed, the error and the main button are on screen, wherever the page is scrolled."""
    with open_tab(context, live, DESKTOP) as tab:
        page = tab.page
        page.fill("#api-key", "")
        pick_photo(page, photo)
        page.fill("#prompt", "person")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        assert "API key" in page.inner_text("#error")
        assert page.evaluate("document.activeElement.id") == "api-key"
        assert tab.api_bodies == [], "a request without a key was sent"
        for y in (0, 10_000):
            page.evaluate(f"window.scrollTo(0, {y})")
            assert in_viewport(page, "#error") and in_viewport(page, "#submit"), y
        keep(page.screenshot(), "desktop-missing-key")
        tab.check_console()


@pytest.mark.browser
def test_invalid_image_shows_the_server_message(context: Any, live: Live, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image at all")
    with open_tab(context, live) as tab:
        page = tab.page
        page.set_input_files("#file", str(broken))
        page.wait_for_function("() => document.getElementById('image-info').textContent.includes('cannot show it')")
        page.fill("#prompt", "person")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        answer = live.api(data_uri(broken), prompt="person")
        assert answer.status_code == 400 and page.inner_text("#error") == answer.json()["error"]
        assert page.is_disabled("#dl-mask")
        tab.check_console(allow_http_errors=True)


@pytest.mark.browser
def test_non_images_never_reach_the_server(page: Any, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if r.method == "POST" else None)
    page.fill("#prompt", "person")
    page.set_input_files("#file", str(notes))
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("notes.txt is not an image (text/plain).")
    page.fill("#image-url", "hello world")
    page.press("#image-url", "Enter")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('is not an image URL')")
    assert "“hello world” is not an image URL" in page.inner_text("#error")
    page.click("#submit")
    assert "Choose an image" in page.inner_text("#error")
    assert requests == []


# ---- layout --------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_phone_keeps_the_image_in_view(context: Any, live: Live, photo: Path) -> None:
    with open_tab(context, live, PHONE) as tab:
        page = tab.page
        pick_photo(page, photo)
        assert in_viewport(page, "#viewport"), "after choosing a photo on a phone, the photo is not on screen"
        page.fill("#prompt", "person")
        page.press("#prompt", "Enter")
        first = wait_result(page, None)
        keep(page.screenshot(), "phone-390x844")
        for selector, key in (("#threshold", "ArrowRight"), ("#grow_mask", "ArrowLeft")):
            page.focus(selector)
            page.keyboard.press(key)
            first = wait_result(page, first)
            assert in_viewport(page, "#viewport"), f"the image left the screen while {selector} moved"
            box = page.locator(selector).bounding_box()
            assert box is not None
            top = page.evaluate(
                "([x, y]) => document.elementFromPoint(x, y)?.id", [box["x"] + 5, box["y"] + box["height"] / 2]
            )
            assert top == selector[1:], f"{selector} is hidden under {top!r}"
        keep(page.screenshot(full_page=True), "phone-page")
        tab.check_console()


@pytest.mark.browser
def test_phone_width_is_usable_and_labelled(context: Any, live: Live, photo: Path) -> None:
    with open_tab(context, live, PHONE) as tab:
        page = tab.page
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button')]
                 .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                               && !(el.tagName === 'BUTTON' && el.textContent.trim()))
                 .map(el => el.id || el.name)"""
        )
        assert unlabelled == []
        pick_photo(page, photo)
        set_first_options(page)
        submit_prompt(page, FIRST["prompt"])
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page scrolls sideways at phone width ({width}px)"
        box = page.locator("#viewport").bounding_box()
        assert box is not None and 0.8 * PHONE["width"] < box["width"] <= PHONE["width"]
        for control in ("#file", "#prompt", "#threshold", "#grow_mask", "#submit", "#dl-mask"):
            control_box = page.locator(control).bounding_box()
            assert control_box is not None and control_box["x"] >= 0
            assert control_box["x"] + control_box["width"] <= PHONE["width"], control
        page.focus("#threshold")
        page.keyboard.press("Tab")
        assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
        tab.check_console()


@pytest.mark.browser
def test_the_whole_image_is_shown_inside_the_frame(page: Any, tmp_path: Path) -> None:
    """A small image, a very wide one and a very tall one, fitted: each is shown whole inside the viewport's border,
    undistorted. Before, the viewport's height counted its 1 px borders (box-sizing: border-box) but the image's
    did not: its bottom 2 rows were always cut off."""
    inner = """() => { const v = document.getElementById('viewport'); const r = v.getBoundingClientRect();
                       return [r.left + v.clientLeft, r.top + v.clientTop, v.clientWidth, v.clientHeight]; }"""
    for width, height in ((96, 128), (2400, 300), (300, 2400)):
        path = tmp_path / f"{width}x{height}.png"
        ramp = np.linspace(0, 255, width * height).reshape(height, width).astype(np.uint8)
        Image.fromarray(ramp).save(path)
        page.set_input_files("#file", str(path))
        page.wait_for_function(
            "(s) => document.getElementById('image-info').textContent.endsWith(s)", arg=f"{width}×{height}"
        )
        x, y, w, h = page.evaluate(inner)
        box = page.locator("#canvas-box").bounding_box()
        assert box is not None
        assert box["x"] >= x - 0.5 and box["x"] + box["width"] <= x + w + 0.5, (width, height, box, w)
        assert box["y"] >= y - 0.5 and box["y"] + box["height"] <= y + h + 0.5, (width, height, box, h)
        assert abs(box["width"] / box["height"] - width / height) < 0.02 * width / height
        if width < 200:
            assert (box["width"], box["height"]) == (width, height), "a small image not at its own size"


@pytest.mark.browser
def test_large_photo_fits_and_the_overlay_covers_it(page: Any, coffee: np.ndarray, tmp_path: Path) -> None:
    big = tmp_path / "coffee-big.jpg"
    Image.fromarray(coffee).resize((1800, 1200)).save(big, quality=90)
    pick_photo(page, big)
    submit_prompt(page, "cup")
    for size in (DESKTOP, PHONE):
        page.set_viewport_size(size)
        page.wait_for_timeout(100)
        image = page.locator("#source").bounding_box()
        result = page.locator("#after").bounding_box()
        frame = page.locator("#viewport").bounding_box()
        assert image is not None and result is not None and frame is not None
        for side in ("x", "y", "width", "height"):
            assert abs(image[side] - result[side]) < 1, (size, side, image, result)
        assert image["width"] <= frame["width"] + 1 and image["height"] <= frame["height"] + 1
        assert abs(image["width"] / image["height"] - 1.5) < 0.01  # not distorted
        assert page.evaluate("document.documentElement.scrollWidth") <= size["width"]


# A browser that applies a WebP's XMP orientation and not its EXIF one (Chromium applies neither).
XMP_NOT_EXIF = """() => { const decode = window.createImageBitmap;
  window.createImageBitmap = async (blob, ...rest) => {
    const text = new TextDecoder('latin1').decode(new Uint8Array(await blob.arrayBuffer()));
    const xmpAlone = text.startsWith('RIFF') && text.includes('XMP ') && !text.includes('EXIF');
    return xmpAlone ? { width: 1, height: 2, close() {} } : decode(blob, ...rest); }; }"""
ORIENTATIONS = """async ([module, b64]) => {
  const { orientationFromServer, orientationToApply } = await import(`./static/orientation.js?${module}`);
  const blob = new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))]);
  const fromServer = (from) => orientationFromServer(`6; format=webp; from=${from}`);
  return [await fromServer('xmp'), await fromServer('exif'), await orientationToApply(blob)]; }"""


@pytest.mark.browser
def test_a_webp_xmp_orientation_is_probed_with_a_webp_xmp_image(page: Any, live: Live) -> None:
    """Whether the browser applies a WebP's XMP-only orientation is asked of a WebP with that orientation in XMP
    alone (as the server reads it: turned to 1×2), not of one with it in EXIF: a browser that applies one and not
    the other gets each right. Before, the EXIF probe answered for both: such a browser's XMP-turned WebP was
    turned twice by the page."""
    script = (Path(__file__).parents[1] / "src/automask/web/orientation.js").read_text()
    found = re.search(r'webpXmp:\s*"([^"]+)"', script)
    assert found, "no WebP-with-XMP probe"
    probe = base64.b64decode(found[1])
    assert b"XMP " in probe and b"EXIF" not in probe
    assert decode_image(probe, Settings()).shape[:2] == (2, 1)  # the server turns it by its XMP: 6
    assert page.evaluate(ORIENTATIONS, ["chromium", found[1]]) == [6, 6, 6]  # Chromium applies neither
    page.evaluate(XMP_NOT_EXIF)
    assert page.evaluate(ORIENTATIONS, ["xmp-not-exif", found[1]]) == [1, 6, 1]
