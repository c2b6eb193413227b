// The targets (or instances) the server found, as a list: label, score, area; each can be left out of the shown
// mask and its downloads (its part is the mask inside its box), and downloaded alone. Nothing is sent again.

import { canToggle } from "./render.js";

const $ = (id) => document.getElementById(id);

// result: {data: {detections: [{label, score, box, area}]}, enabled: bool[], opts}; on: {toggle(i, on), download(i)}.
export function showTargets(result, on) {
  const dets = (result && result.data.detections) || [];
  $("instances-box").hidden = !dets.length;
  $("instances").replaceChildren(
    ...dets.map((det, i) => {
      const item = document.createElement("li");
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = result.enabled[i];
      box.disabled = !canToggle(det) || result.opts.invert_mask; // an inverted mask belongs to no one target
      box.addEventListener("change", () => on.toggle(i, box.checked));
      label.append(box, ` ${det.label}`);
      const facts = document.createElement("span");
      facts.className = "hint";
      facts.textContent = `score ${Number(det.score).toFixed(2)} · ${Number(det.area).toLocaleString()} px`;
      const save = document.createElement("button");
      save.type = "button";
      save.textContent = "Download";
      save.setAttribute("aria-label", `Download the mask of ${det.label} (${i + 1})`);
      save.disabled = !canToggle(det);
      save.addEventListener("click", () => on.download(i));
      item.append(label, facts, save);
      return item;
    }),
  );
}
