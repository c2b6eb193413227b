// The targets (or instances) the server found, as a list: label, score, area; each can be left out of the shown
// mask and its downloads, and downloaded alone. Their masks are the server's own (`instance_masks`, in the same
// answer as the mask): nothing is sent again.

import { base64Bytes, decodeMask, growMask } from "./render.js";

const $ = (id) => document.getElementById(id);
const grown = new WeakMap(); // result.data -> Map(radius -> Promise<Uint8Array[]>)

// Whether the answer has target i's own mask (an automask that returns `instances`).
function hasMask(result, i) {
  return Boolean(result.data.instances && result.data.instances[i] && result.data.instances[i].mask);
}

// Each target's mask (H×W, 255 = selected; thresholded, before negative_prompt) grown by `radius` pixels as the
// server grows the selection; decoded and grown once per answer and radius.
export function targetMasks(result, radius) {
  const byRadius = grown.get(result.data) || new Map();
  grown.set(result.data, byRadius);
  if (!byRadius.has(radius)) {
    const raw = radius > 0 ? targetMasks(result, 0) : null;
    const masks = raw
      ? raw.then((list) => list.map((m) => growMask(m, result.width, result.height, radius)))
      : Promise.all((result.data.instances || []).map(async (inst) => (await decodeMask(base64Bytes(inst.mask))).mask));
    byRadius.set(radius, masks);
  }
  return byRadius.get(radius);
}

// What a target owns in the shown mask: its mask grown by grow_mask, plus the feather's soft edge around it.
export function ownerRadius(opts) {
  return (opts.grow_mask || 0) + (opts.feather || 0);
}

// result: {data: {detections: [{label, score, box, area}], instances}, enabled: bool[], opts};
// on: {toggle(i, on), download(i)}.
export function showTargets(result, on) {
  const dets = (result && result.data.detections) || [];
  const controls = () => [...$("instances").querySelectorAll("input, button")];
  const focused = controls().indexOf(document.activeElement); // a new result replaces the list under the focus
  $("instances-box").hidden = !dets.length;
  $("instances").replaceChildren(
    ...dets.map((det, i) => {
      const item = document.createElement("li");
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = result.enabled[i];
      box.disabled = !hasMask(result, i) || result.opts.invert_mask; // an inverted mask belongs to no one target
      box.addEventListener("change", () => on.toggle(i, box.checked));
      label.append(box, ` ${det.label}`);
      const facts = document.createElement("span");
      facts.className = "hint";
      facts.textContent = `score ${Number(det.score).toFixed(2)} · ${Number(det.area).toLocaleString()} px`;
      const save = document.createElement("button");
      save.type = "button";
      save.textContent = "Download";
      save.setAttribute("aria-label", `Download the mask of ${det.label} (${i + 1})`);
      save.disabled = !hasMask(result, i);
      save.addEventListener("click", () => on.download(i));
      item.append(label, facts, save);
      return item;
    }),
  );
  // The focus stays on the same row's control, or, with none (fewer targets found), goes to the image.
  const same = controls()[focused];
  if (focused >= 0) (same && !same.disabled && dets.length ? same : $("viewport")).focus();
}
