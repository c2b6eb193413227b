// The image to mask, as input.js hands it over (a file, a URL, a paste, an example): shown in the viewer, its
// pixels read where the page can (see render.imagePixels), the result of the image before cleared.

import { orientationFromServer, uprightTransform } from "./orientation.js";
import { dataUriBlob, imagePixels } from "./render.js";
import { clearResult } from "./results.js";
import { clearError, setStatus } from "./status.js";

const $ = (id) => document.getElementById(id);

// ctx: {state (app.js's: its `image`, `reading`, `result`), viewer (a Viewer), supersede() (app.js: drops the
// request running and any pending one)}. Returns input.js's `reading` and `setImage`, and `turnAsServer`.
export function images({ state, viewer, supersede }) {
  let nextImageId = 0;

  // input.js: an image is being read (name), or no longer (null). Until it is shown, nothing is masked: the request
  // for the image shown before, and any that would start, would mask (and charge) an image no longer wanted.
  function reading(name) {
    state.reading = name;
    if (!name) return;
    supersede();
    setStatus(`Reading ${name}…`);
  }

  async function setImage(image, label) {
    state.reading = null;
    supersede();
    clearResult(state, viewer);
    clearError();
    const current = { id: ++nextImageId, shown: false, label, ...image };
    if (state.image && state.image.display) URL.revokeObjectURL(state.image.display);
    state.image = current;
    const img = $("source");
    img.src = image.display || image.src; // display: the image as the page turned it upright (input.js)
    try {
      await img.decode();
      if (state.image !== current) return; // a newer image replaced this one while it decoded
      current.shown = true;
      viewer.setSize(img.naturalWidth, img.naturalHeight);
      $("viewport").setAttribute("aria-label", `The image ${image.name}`);
      $("image-info").textContent = `${label} — ${img.naturalWidth}×${img.naturalHeight}`;
    } catch {
      if (state.image !== current) return;
      viewer.clear();
      $("image-info").textContent = `${label} — this browser cannot show it; the server will say if it can read it.`;
    }
    if (image.kind === "url" && current.shown) current.pixels = await urlPixels(image.src, img, Boolean(image.display));
    if (state.image !== current) return;
    bringIntoView($("stage"));
    setStatus("Image ready. Type a prompt and press Enter.");
  }

  // A mask's answer said how the server turned the image (api.js: `orientation`): one this browser shows unturned
  // (another site's WebP with an EXIF orientation, an XMP one; its bytes unreadable here) is shown turned the same
  // way, so the overlay lies over what it selects. Pixels the page read of it (as shown) are not the server's.
  async function turnAsServer(header) {
    const image = state.image;
    if (!image || image.kind !== "url" || image.display || !image.shown || image.turn !== undefined) return;
    const turn = await orientationFromServer(header);
    if (state.image !== image || image.turn !== undefined) return;
    image.turn = turn;
    if (turn === 1) return;
    image.pixels = null;
    const img = $("source");
    const { width, height } = uprightTransform(turn, img.naturalWidth, img.naturalHeight);
    viewer.setSize(width, height, turn);
    $("image-info").textContent = `${image.label} — ${width}×${height}`; // its size as shown, as the server reads it
  }

  return { reading, setImage, turnAsServer };
}

// A URL image's pixels (`imagePixels`): null when unreadable here, as those of an image on another site are, or
// when they are not the image as shown (turned upright by the page, which shows it unturned). `turned`: the image
// shown is the page's upright copy (input.js: a data: URI's WebP with an EXIF orientation).
async function urlPixels(url, img, turned) {
  const pixels = await imagePixels(dataUriBlob(url) || img).catch(() => null);
  return pixels && (pixels.orientation === 1 || turned) ? pixels : null;
}

function bringIntoView(el) {
  const box = el.getBoundingClientRect();
  if (box.top < 0 || box.bottom > window.innerHeight) el.scrollIntoView({ block: "nearest" });
}
