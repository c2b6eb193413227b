// The request options the form gives, and the checks of its number fields before anything is sent.

import { numberProblem } from "./prefs.js";

const $ = (id) => document.getElementById(id);
// Number fields checked before anything is sent (their min and max are the API's), with their labels.
export const NUMBER_FIELDS = { min_area: "Smallest region kept", seed: "Seed" };

// The v1 options of the form (`model`: the chosen model's name, or null to send none). The automask extensions
// (`config.options`: those the server has) are sent only when set.
export function formOptions(config, model) {
  const opts = {
    prompt: $("prompt").value.trim(),
    threshold: Number($("threshold").value),
    grow_mask: Math.round(Number($("grow_mask").value)),
    invert_mask: $("invert_mask").checked,
    stop_on_empty_mask: $("stop_on_empty_mask").checked,
  };
  const seed = $("seed").value === "" ? -1 : Number($("seed").value);
  if (seed !== -1) opts.seed = seed;
  if (model) opts.model = model;
  const ext = config.options || [];
  const negative = $("negative_prompt").value.trim();
  if (ext.includes("negative_prompt") && negative) opts.negative_prompt = negative;
  if (ext.includes("feather") && Number($("feather").value) > 0) opts.feather = Number($("feather").value);
  if (ext.includes("fill_holes") && $("fill_holes").checked) opts.fill_holes = true;
  if (ext.includes("min_area") && Number($("min_area").value) > 0) opts.min_area = Math.round(Number($("min_area").value));
  return opts;
}

// Says beside each number field what is wrong with it (nothing when it is right); returns the first problem as
// [sentence, field], or null. A field the server does not offer (hidden) is not checked.
export function numberFieldsProblem() {
  let first = null;
  for (const [id, label] of Object.entries(NUMBER_FIELDS)) {
    const input = $(id);
    const problem = input.closest("[hidden]") ? null : numberProblem(input, label);
    $(`${id}-error`).textContent = problem || "";
    $(`${id}-error`).hidden = !problem;
    if (problem) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
    if (problem && !first) first = [problem, input];
  }
  return first;
}
