// The shown result: which view is chosen, the mask as shown (targets left out), what it selects, drawing it over
// the image, and the download buttons. `state` is app.js's (its `result` and `image`); `viewer` a Viewer.

import { fromServer } from "./downloads.js";
import { countSelected, withTargets } from "./render.js";
import { setStale } from "./status.js";

const $ = (id) => document.getElementById(id);

export function currentShow() {
  return document.querySelector("input[name=show]:checked").value;
}

// The shown mask: the server's mask without the pixels of the targets switched off in the list (`owners`: each
// target's own mask, grown as the server grew the selection; loaded when a target is first switched off).
export function shownMask(state) {
  const r = state.result;
  return r.enabled.every(Boolean) ? r.mask : withTargets(r.mask, r.owners, r.enabled);
}

export function selectedText(state) {
  const r = state.result;
  const count = countSelected(shownMask(state));
  const pct = ((100 * count) / (r.width * r.height || 1)).toFixed(1);
  return `${count.toLocaleString()} pixels selected (${pct}%).`;
}

// Whether the image is shown as the server read it, its rows and columns those of the mask. Not so for one the
// browser cannot show, nor for one it shows unturned where the server turns it and did not say so (an older
// server: another site's WebP whose EXIF orientation says to turn it, its bytes unreadable here; image.js).
export function imageFits(state) {
  const img = $("source");
  const r = state.result;
  const size = [img.naturalWidth, img.naturalHeight];
  const [width, height] = state.image.turn >= 5 ? size.reverse() : size; // turned as the server turned it (image.js)
  return state.image.shown && width === r.width && height === r.height;
}

export function drawResult(state, viewer) {
  const r = state.result;
  if (!r) return;
  const fits = imageFits(state);
  if (!fits && (viewer.width !== r.width || viewer.height !== r.height)) viewer.setSize(r.width, r.height);
  const show = fits ? currentShow() : "mask"; // the mask alone, not drawn over an image it does not fit
  $("source").style.visibility = fits ? "" : "hidden"; // nor that image, stretched, beside it (compare slider)
  const look = { tint: $("tint").value, opacity: Number($("opacity").value) / 100, outline: $("outline").checked };
  viewer.drawResult(shownMask(state), show, look);
  viewer.setCompare(Number($("compare").value));
  $("stage").dataset.show = show;
}

export function clearResult(state, viewer) {
  const focused = document.activeElement;
  state.result = null;
  viewer.hideResult();
  $("source").style.visibility = "";
  setOutputsEnabled(state, false);
  $("instances-box").hidden = true;
  $("facts").replaceChildren();
  setStale(null);
  delete $("result").dataset.ready;
  delete $("result").dataset.options;
  delete $("result").dataset.targets;
  // The focus on a control this disables or hides (a download, a target's: Ctrl+V pastes an image anywhere) would
  // fall to the page's top: it goes to the image that replaces the result.
  if (focused.disabled || focused.closest("[hidden]")) $("viewport").focus();
}

// The download buttons: enabled with a result; a cut-out or preview the server must render says it costs a request.
export function setOutputsEnabled(state, on) {
  for (const id of ["dl-mask", "dl-alpha", "dl-preview", "copy-mask"]) $(id).disabled = !on;
  const more = (kind) => (on && fromServer(state, kind) ? " (1 more request)" : "");
  $("dl-alpha").textContent = `Download cut-out${more("alpha")}`;
  $("dl-preview").textContent = `Download preview${more("preview")}`;
}
