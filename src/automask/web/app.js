// automask's try-it page: a plain client of the public v1 API (no framework, no build step).
//
// One charged request per mask: POST v1/automatic-mask-generator with base64=true and instance_masks=true answers
// the mask, the targets found and each target's own mask; the overlay, cut-out, preview, their downloads and per-target masks are rendered here from
// that mask and the image. A request the user no longer wants (new image, new prompt, new settings, Cancel)
// is aborted, and the server neither runs nor charges it. Results already seen are shown again from memory.

import { ApiError, loadConfig, requestMask } from "./api.js";
import { STALE, autoUpdate } from "./auto.js";
import { bindSlider, cutoutPreset, growHint, keepInView, wireView } from "./controls.js";
import { keyAndCredits } from "./credits.js";
import { downloads } from "./downloads.js";
import { NUMBER_FIELDS, formOptions, numberFieldsProblem } from "./form.js";
import { images } from "./image.js";
import { wireInput } from "./input.js";
import { choosingModel, chosenModel as chosenOf, fillModels, serverInfo, showModel } from "./models.js";
import { applyControls, loadPrefs, readControls, savePrefs, vocabularyProblem } from "./prefs.js";
import { base64Bytes, decodeMask } from "./render.js";
import { currentShow, drawResult, imageFits, selectedText, setOutputsEnabled, shownMask } from "./results.js";
import { actionDone, clearError, formatMs, setBusy, setFacts, setStale, setStatus } from "./status.js";
import { showActionError, showError as sayError } from "./status.js";
import { ownerRadius, showTargets, targetMasks } from "./targets.js";
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const CACHE_SIZE = 16;
const CANCELLED = "The server does not run or charge a request the page cancels.";
const UNTURNED =
  "The server turned this image by its orientation (EXIF), which this browser does not show: the mask is shown alone.";

const state = {
  config: { auth: true, models: [], vocabulary: {}, options: [], examples: [] },
  image: null, // {id, kind: "file"|"url", name, src, display, pixels: {data, width, height, exact, opaque}|null, shown}
  result: null, // {opts, imageId, mask, width, height, blob, data, ms, serverMs, enabled: bool[], owners, fromCache}
  cache: new Map(), // `${imageId}|${options}` -> result: seen masks are shown again without a request
  seq: 0,
  shown: 0,
  inflight: null, // {controller, seq, started, cacheKey, apiKey, loading}
  timer: 0,
  pending: null, // when (performance.now()) the automatic request waiting for its delay was scheduled; null: none
  ticker: 0,
  reading: null, // the name of an image being read (input.js): the one shown is no longer the one to mask
  growAuto: false, // grow_mask / feather were set by the page for a cut-out, not by the user
  said: 0, // errors shown so far: one shown while a request ran (or waited for its delay) is newer than its answer
  pendingSaid: 0, // `said` when the automatic request waiting for its delay was scheduled
  unready: null, // [sentence, field] of the input check whose error Make mask showed (goes once put right)
};
const key = keyAndCredits(state.config);
const auto = autoUpdate({ state, run: () => run({ fromUser: false }), supersede, checkReady, currentOptions });
const viewer = new Viewer(
  {
    viewport: $("viewport"),
    box: $("canvas-box"),
    img: $("source"),
    canvas: $("after"),
    divider: $("divider"),
    placeholder: $("placeholder"),
  },
  (zoom) => {
    $("zoom-value").textContent = `${Math.round(zoom * 100)}%`;
  },
);

// ---- configuration -------------------------------------------------------------------------------------

async function setup() {
  Object.assign(state.config, await loadConfig());
  key.restore();
  fillModels(state.config);
  for (const name of ["negative_prompt", "feather", "fill_holes", "min_area"]) {
    $(`opt-${name}`).hidden = !(state.config.options || []).includes(name);
  }
  applyControls(loadPrefs());
  for (const id of ["threshold", "grow_mask", "feather", "opacity", "compare"]) $(id).dispatchEvent(new Event("input"));
  modelChanged();
  serverInfo(state.config);
  key.refresh();
}

function chosenModel() {
  return chosenOf(state.config);
}

function modelChanged() {
  showModel(state.config, usePrompt);
}

// `request`: a mask request's own error, which the answer of a newer request takes away (not counted in `said`).
function showError(text, { request = false } = {}) {
  if (!request) state.said += 1;
  sayError(text, Boolean(state.result));
}

// ---- the image (from input.js) -------------------------------------------------------------------------

const { reading, setImage, turnAsServer } = images({ state, viewer, supersede });

function usePrompt(text, { runNow = true } = {}) {
  $("prompt").value = text;
  savePrefs(readControls());
  if (runNow && state.image) run();
  else if (runNow) setStatus(`Prompt “${text}”: now choose an image, or try an example.`);
}

// ---- options and running -------------------------------------------------------------------------------

function payload(opts) {
  return { image: state.image.src, ...opts, return_mask: true, return_alpha: false };
}

function checkReady() {
  const numbers = numberFieldsProblem();
  if (numbers) {
    $("advanced").open = true; // the field in error is in view, and can take the focus
    return numbers;
  }
  if (!state.image) return ["Choose an image, drop or paste one, or try an example first.", $("file")];
  if (!$("prompt").value.trim()) return ["Type a prompt: what to select, e.g. “person”.", $("prompt")];
  if (state.config.auth && !key.apiKey()) {
    return ["Type your API key first (the server's admin makes one with: automask keys create).", $("api-key")];
  }
  return null;
}

// Abort the request in flight and any pending automatic one: their results are no longer wanted.
function supersede() {
  auto.stopPending();
  state.seq += 1;
  if (state.inflight) {
    state.inflight.controller.abort();
    state.inflight = null;
    setBusy(null);
  }
}

// Cancel (or Esc): stop the mask request in flight, and the automatic one waiting for its delay (nothing sent yet).
function cancel() {
  if (!state.inflight && state.pending === null) return;
  const sent = Boolean(state.inflight);
  supersede();
  auto.markStale(); // the result shown stays: is it for the current settings?
  if (!sent) return setStatus("Update cancelled: nothing was sent.");
  setStatus(`Cancelled. ${CANCELLED}`);
  key.refresh();
}

async function run({ fromUser = true } = {}) {
  auto.stopPending();
  if (state.reading) {
    if (fromUser) setStatus(`Still reading ${state.reading}…`);
    return;
  }
  const problem = checkReady();
  if (problem) {
    auto.markStale();
    if (fromUser) {
      showError(problem[0]);
      problem[1].focus();
      state.unready = problem;
    }
    return;
  }
  const opts = currentOptions();
  const unanswerable = vocabularyProblem(opts.prompt, chosenModel(), state.config);
  if (unanswerable) {
    auto.markStale();
    showError(unanswerable);
    if (fromUser) (choosingModel() ? $("model") : $("prompt")).focus();
    return;
  }
  const cacheKey = `${state.image.id}|${JSON.stringify(opts)}`;
  // The same request is running (Enter pressed again by habit): it goes on, not cancelled and sent (and charged)
  // again. A changed option (or key) asks anew; Cancel (or Esc) stops it.
  const same = state.inflight && state.inflight.cacheKey === cacheKey && state.inflight.apiKey === key.apiKey();
  if (same) return;
  supersede();
  const said = fromUser ? state.said : state.pendingSaid; // errors shown before this request was asked for
  if (state.cache.has(cacheKey)) {
    const seen = state.cache.get(cacheKey);
    state.cache.delete(cacheKey);
    state.cache.set(cacheKey, seen);
    await showResult({ ...seen, fromCache: true }, state.said !== said);
    return;
  }
  const model = chosenModel();
  const job = { controller: new AbortController(), seq: state.seq, started: performance.now(), cacheKey, said };
  job.apiKey = key.apiKey();
  job.loading = Boolean(model && model.loaded === false);
  state.inflight = job;
  setBusy(job);
  try {
    const answer = await requestMask(payload(opts), { key: job.apiKey, signal: job.controller.signal });
    const decoded = await decodeMask(base64Bytes(answer.data.image));
    if (job.seq === state.seq) await turnAsServer(answer.orientation);
    if (job.seq !== state.seq) return;
    const result = { opts, imageId: state.image.id, ...decoded, ...answer };
    state.cache.set(cacheKey, result);
    if (state.cache.size > CACHE_SIZE) state.cache.delete(state.cache.keys().next().value);
    if (model && model.loaded === false) modelLoaded(model);
    await showResult(result, state.said !== job.said);
  } catch (err) {
    if (err.name === "AbortError" || job.seq !== state.seq) return;
    const text = err instanceof ApiError ? err.message : `Something went wrong in the page: ${err.message}`;
    showError(text, { request: true });
    if (err.status === 401 || err.status === 403) $("api-key").focus();
  } finally {
    if (state.inflight === job) {
      state.inflight = null;
      setBusy(null);
    }
    if (job.seq === state.seq) key.refresh();
  }
}

// The model answered: it is loaded now; what the page says about it ("not loaded yet", "loading") no longer holds.
function modelLoaded(model) {
  model.loaded = true;
  if (model.name === state.config.model) state.config.ready = true;
  modelChanged();
  serverInfo(state.config);
}

// An input check's error, shown when Make mask was pressed, goes once its field is put right (and greys no more).
function inputPutRight() {
  const shown = state.unready;
  if (!shown || $("error").hidden || $("error").textContent !== shown[0]) return;
  const problem = checkReady();
  if (problem && problem[1] === shown[1]) return;
  state.unready = null;
  clearError();
  setStatus(problem ? "" : "Ready: press Make mask (or Enter).");
}

// ---- results -------------------------------------------------------------------------------------------

function currentOptions() {
  return formOptions(state.config, choosingModel() ? $("model").value : null);
}

// keepError: an error shown since the request was sent (a refused new image) stays; the result is not greyed.
// An option changed while the request ran, and no automatic request for the new settings waits (auto-update off,
// or ticked on since): the result is for the previous settings, and says so.
async function showResult(result, keepError = false) {
  state.result = { ...result, enabled: (result.data.detections || []).map(() => true), owners: null };
  if (!keepError) clearError();
  const changed = JSON.stringify(result.opts) !== JSON.stringify(currentOptions());
  const outdated = changed && state.pending === null;
  setStale(outdated ? STALE : null);
  if (keepError && !outdated) $("stage").classList.remove("stale");
  drawResult(state, viewer);
  renderTargets();
  setOutputsEnabled(state, true);
  const server = result.serverMs === null ? "" : ` (server ${formatMs(result.serverMs)})`;
  const done = result.fromCache
    ? "Shown again from this page's memory: no request, nothing charged."
    : `Done in ${formatMs(result.ms)}${server}.`;
  const unturned = state.image.shown && !imageFits(state) ? ` ${UNTURNED}` : "";
  setStatus(`${done} ${selectedText(state)}${unturned}`);
  setFacts(result, server);
  $("result").dataset.options = JSON.stringify(result.opts);
  $("result").dataset.targets = state.result.enabled.map(Number).join("");
  $("result").dataset.ready = String(++state.shown);
}

function renderTargets() {
  const r = state.result;
  showTargets(r, {
    toggle: (i, on) =>
      guarded(async () => {
        const owners = await targetMasks(r, ownerRadius(r.opts));
        if (state.result !== r) return;
        r.owners = owners;
        r.enabled[i] = on;
        drawResult(state, viewer);
        setOutputsEnabled(state, true); // a target left out may change where the cut-out comes from
        setStatus(selectedText(state));
        $("result").dataset.targets = r.enabled.map(Number).join("");
      })(),
    download: (i) => guarded(() => files.target(i))(),
  });
}

function guarded(action) {
  return () => {
    if (!state.result) return Promise.resolve();
    return action().then(actionDone, (err) => {
      if (err.name === "AbortError") setStatus(`Download cancelled. ${CANCELLED}`);
      else showActionError(err instanceof ApiError ? err.message : `That did not work: ${err.message}`);
    });
  };
}

// ---- wiring --------------------------------------------------------------------------------------------

// The Show choice changed: a cut-out gets no halo by default (grow 0, a little feather); back, the defaults return.
function showChanged() {
  const show = currentShow();
  const offered = state.config.options || [];
  if (cutoutPreset(show, state, offered.includes("feather"))) auto.optionsChanged();
  savePrefs(readControls());
  growHint(show, offered);
  drawResult(state, viewer);
}

const files = downloads({
  state,
  shownMask: () => shownMask(state),
  payload: (opts) => payload(opts),
  apiKey: () => key.apiKey(),
  refreshCredits: () => key.refresh(),
  setStatus,
});

function wire() {
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("cancel").addEventListener("click", cancel);
  // Esc stops what began last: the mask request (or the automatic one waiting for its delay) or the server's download.
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    const download = files.startedLast();
    const mask = state.pending ?? (state.inflight ? state.inflight.started : null);
    if (mask !== null && (download === null || download < mask)) cancel();
    else files.cancel();
  });
  $("dl-cancel").addEventListener("click", () => files.cancel());
  bindSlider("threshold", (v) => v.toFixed(2));
  bindSlider("grow_mask", String);
  bindSlider("feather", String);
  const requestInputs = ["threshold", "grow_mask", "invert_mask", "stop_on_empty_mask", "model", "feather"];
  for (const id of [...requestInputs, "fill_holes", "min_area", "seed", "negative_prompt"]) {
    $(id).addEventListener("change", () => {
      if (id === "grow_mask" || id === "feather") state.growAuto = false;
      if (id === "model") modelChanged();
      if (id === "grow_mask") growHint(currentShow(), state.config.options || []);
      auto.optionsChanged();
    });
  }
  for (const id of Object.keys(NUMBER_FIELDS)) $(id).addEventListener("input", numberFieldsProblem);
  $("prompt").addEventListener("input", auto.promptEdited);
  $("form").addEventListener("input", inputPutRight);
  $("auto").addEventListener("change", auto.toggled);
  wireView(viewer, () => drawResult(state, viewer), () => savePrefs(readControls()));
  for (const radio of document.querySelectorAll("input[name=show]")) radio.addEventListener("change", showChanged);
  $("api-key").addEventListener("input", key.edited);
  $("dl-mask").addEventListener("click", guarded(files.mask));
  $("dl-alpha").addEventListener("click", guarded(files.cutout));
  $("dl-preview").addEventListener("click", guarded(files.preview));
  $("copy-mask").addEventListener("click", guarded(files.copy));
  return wireInput({
    reading,
    setImage,
    showError,
    examples: () => state.config.examples || [],
    examplePrompt: (ex) => (chosenModel()?.open_vocabulary === false ? ex.embedded_prompt : ex.open_prompt),
    usePrompt,
    run: () => run(),
    autoRun: () => auto.schedule(500),
    limits: () => ({ maxBytes: state.config.max_image_bytes, maxBody: state.config.max_body_bytes }),
    maxPixels: () => state.config.max_image_pixels,
  });
}

const input = wire();
keepInView();
setup().then(() => {
  input.fillExamples();
  input.restoreUrl();
  growHint(currentShow(), state.config.options || []);
  document.body.setAttribute("data-loaded", "true");
});
