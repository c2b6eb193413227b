// Small behaviours of the controls: slider read-outs, the cut-out's edge defaults and their hint, the controls of
// the view alone (no request), and keeping focused controls visible under the phone layout's sticky image.

const $ = (id) => document.getElementById(id);
const DEFAULT_GROW = 10; // the API's grow_mask default: right for inpainting masks
const CUTOUT_FEATHER = 2;

export function bindSlider(id, format) {
  const input = $(id);
  const out = $(`${id}-value`);
  input.addEventListener("input", () => {
    out.textContent = format(Number(input.value));
  });
}

// The controls that change only how the result is shown, never a request: the overlay's look (`redraw`, then
// `save` the settings), the before/after compare slider, and zoom (`viewer`: a Viewer).
export function wireView(viewer, redraw, save) {
  bindSlider("opacity", (v) => `${v}%`);
  bindSlider("compare", (v) => `${v}%`);
  for (const id of ["opacity", "tint", "outline"]) {
    $(id).addEventListener("input", () => {
      requestAnimationFrame(redraw);
      save();
    });
  }
  $("compare").addEventListener("input", () => viewer.setCompare(Number($("compare").value)));
  $("zoom-in").addEventListener("click", () => viewer.zoomTo(viewer.zoom * 1.25));
  $("zoom-out").addEventListener("click", () => viewer.zoomTo(viewer.zoom * 0.8));
  $("zoom-fit").addEventListener("click", () => viewer.fit());
  $("zoom-native").addEventListener("click", () => viewer.zoomTo(1));
}

function setRange(id, value) {
  $(id).value = String(value);
  $(id).dispatchEvent(new Event("input"));
}

// A cut-out shows the background that grow_mask adds as a halo: for one, grow 0 (and feather 2 when offered)
// unless the user chose a growth; leaving the cut-out puts back what the page changed. Returns whether the
// request options changed. state.growAuto: the page set them (a user's change clears it).
export function cutoutPreset(show, state, featherOffered) {
  const cutout = show === "cutout";
  if (cutout && Number($("grow_mask").value) === DEFAULT_GROW) {
    setRange("grow_mask", 0);
    if (featherOffered && Number($("feather").value) === 0) setRange("feather", CUTOUT_FEATHER);
    state.growAuto = true;
    return true;
  }
  if (!cutout && state.growAuto) {
    setRange("grow_mask", DEFAULT_GROW);
    if (featherOffered && Number($("feather").value) === CUTOUT_FEATHER) setRange("feather", 0);
    state.growAuto = false;
    return true;
  }
  return false;
}

// What grow_mask does, for the view shown: on a cut-out it keeps a band of background around the subject.
export function growHint(show, offered) {
  const grow = Number($("grow_mask").value);
  const soften = offered.includes("feather") ? " Feather (Advanced) softens the edge." : "";
  $("grow-hint").textContent =
    show !== "cutout"
      ? "Widens the mask so inpainting covers the edges."
      : grow > 0
        ? `On a cut-out, grow keeps a ${grow} px band of background around the subject (a halo); 0 keeps it tight.`
        : `0 keeps the cut-out's edge tight (grow would add a band of background).${soften}`;
}

// Phone: the result sticks to the top; a focused control must not hide under it.
export function keepInView() {
  const phone = window.matchMedia("(max-width: 760px)");
  const update = () => {
    const top = phone.matches ? $("result").getBoundingClientRect().height + 8 : 0;
    document.documentElement.style.scrollPaddingTop = `${top}px`;
  };
  new ResizeObserver(update).observe($("result"));
  phone.addEventListener("change", update);
}
