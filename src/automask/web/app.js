// automask's try-it page: a plain client of the public v1 API (no framework, no build step).
//
// Every result comes from POST v1/automatic-mask-generator. The overlay is drawn from the mask the server
// returned; the mask, cut-out and preview downloads are the server's own PNG bytes for the shown options.

const API = "v1/automatic-mask-generator";
const CONFIG = "web/config";
const KEY_STORAGE = "automask.apiKey";
const TINT = [255, 0, 80];
const OUTPUT_NAMES = { mask: "mask", alpha: "cut-out", preview: "preview" };

const $ = (id) => document.getElementById(id);

const state = {
  config: { auth: true, model: null, models: [], ready: null, max_image_bytes: null },
  image: null, // {kind: "file", name, dataUrl} | {kind: "url", name, url}
  shown: null, // {opts, results: Map(kind -> {blob, url, ms, serverMs})}: what the result area shows
  seq: 0,
  controller: null,
  timer: 0,
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---- configuration -------------------------------------------------------------------------------------

async function loadConfig() {
  try {
    const res = await fetch(CONFIG, { headers: { accept: "application/json" } });
    if (res.ok) Object.assign(state.config, await res.json());
  } catch {
    // A server without the page's config: ask for a key.
  }
  const { auth, model, ready, max_image_bytes: maxBytes } = state.config;
  $("key-row").hidden = !auth;
  $("api-key").value = auth ? localStorage.getItem(KEY_STORAGE) || "" : "";
  fillModels();
  const parts = [];
  if (model && !choosingModel()) parts.push(`Model: ${model}${ready === false ? " (loading or not installed)" : ""}`);
  if (maxBytes) parts.push(`images up to ${formatBytes(maxBytes)}`);
  if (!auth) parts.push("no API key needed on this local server");
  $("server-info").textContent = parts.join(" · ");
}

// The model selector: shown only when the server offers several models; the default is chosen first.
function fillModels() {
  const { model, models } = state.config;
  const names = Array.isArray(models) ? models.filter((name) => typeof name === "string") : [];
  const select = $("model");
  select.replaceChildren(
    ...names.map((name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name === model ? `${name} (default)` : name;
      return option;
    }),
  );
  if (names.includes(model)) select.value = model;
  $("model-row").hidden = names.length < 2;
}

function choosingModel() {
  return !$("model-row").hidden && $("model").value !== "";
}

// ---- the image -----------------------------------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`Could not read the file ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

async function useFile(file) {
  if (!file) return;
  $("image-url").value = "";
  const dataUrl = await readFile(file);
  state.image = { kind: "file", name: file.name, dataUrl };
  showSource(dataUrl, `${file.name} — ${formatBytes(file.size)}`);
}

function useUrl() {
  const url = $("image-url").value.trim();
  if (!url) return;
  $("file").value = "";
  const name = url.split(/[?#]/)[0].split("/").pop() || "image";
  state.image = { kind: "url", name, url };
  showSource(url, url);
}

function showSource(src, label) {
  clearResult();
  clearError();
  const img = $("source");
  img.onload = () => {
    $("image-info").textContent = `${label} — ${img.naturalWidth}×${img.naturalHeight}`;
    $("placeholder").hidden = true;
    img.hidden = false;
  };
  img.onerror = () => {
    img.hidden = true;
    $("placeholder").hidden = false;
    $("image-info").textContent = `${label} — this browser cannot show it; the server will say if it can read it.`;
  };
  img.src = src;
  setStatus("Image ready. Type a prompt and press Enter.");
  scheduleAuto(0);
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function baseName() {
  const name = state.image ? state.image.name : "image";
  return name.replace(/\.[A-Za-z0-9]+$/, "") || "image";
}

// ---- options and requests ------------------------------------------------------------------------------

function formOptions() {
  const opts = {
    prompt: $("prompt").value,
    threshold: Number($("threshold").value),
    grow_mask: Math.round(Number($("grow_mask").value)),
    invert_mask: $("invert_mask").checked,
    stop_on_empty_mask: $("stop_on_empty_mask").checked,
    seed: $("seed").value === "" ? -1 : Number($("seed").value),
  };
  if (choosingModel()) opts.model = $("model").value;
  return opts;
}

function outputKind() {
  return document.querySelector("input[name=output]:checked").value;
}

function payload(opts, kind) {
  const image = state.image.kind === "file" ? state.image.dataUrl : state.image.url;
  return { image, ...opts, return_mask: kind !== "preview", return_alpha: kind === "alpha", base64: false };
}

async function callApi(body, signal) {
  const headers = { "content-type": "application/json", accept: "image/png, application/json" };
  const key = $("api-key").value.trim();
  if (state.config.auth && key) headers["x-api-key"] = key;
  const t0 = performance.now();
  let res;
  try {
    res = await fetch(API, { method: "POST", headers, body: JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `Could not reach the server (${err.message}). Is automask serve still running?`);
  }
  if (!res.ok) throw new ApiError(res.status, await errorSentence(res));
  const blob = await res.blob();
  const ms = performance.now() - t0;
  return { blob, url: URL.createObjectURL(blob), ms, serverMs: serverTime(res.headers) };
}

async function errorSentence(res) {
  const text = await res.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // Not JSON: a proxy's page or a plain-text error; show its start below.
  }
  const snippet = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 200);
  return `The server answered ${res.status} ${res.statusText}${snippet ? `: ${snippet}` : "."}`;
}

function serverTime(headers) {
  for (const name of ["x-inference-time", "x-process-time"]) {
    const value = Number.parseFloat(headers.get(name) || "");
    if (Number.isFinite(value)) return value * 1000;
  }
  return null;
}

// ---- running -------------------------------------------------------------------------------------------

function checkReady() {
  if (!state.image) return ["Choose an image file or type an image URL first.", $("file")];
  if (!$("prompt").value.trim()) return ["Type a prompt: what to select, e.g. “person”.", $("prompt")];
  return null; // a missing key is the server's to explain (401)
}

async function run({ fromUser = true } = {}) {
  clearTimeout(state.timer);
  const problem = checkReady();
  if (problem) {
    if (fromUser) {
      showError(problem[0]);
      problem[1].focus();
    }
    return;
  }
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const seq = ++state.seq;
  const opts = formOptions();
  const kind = outputKind();
  setBusy(true);
  clearError();
  setStatus("Working…");
  try {
    const results = new Map([["mask", await callApi(payload(opts, "mask"), controller.signal)]]);
    if (kind !== "mask") results.set(kind, await callApi(payload(opts, kind), controller.signal));
    if (seq !== state.seq) return;
    await showResult(opts, results, kind);
    if (fromUser) revealResult();
  } catch (err) {
    if (err.name === "AbortError" || seq !== state.seq) return;
    clearResult();
    showError(err instanceof ApiError ? err.message : `Something went wrong in the page: ${err.message}`);
    if (err.status === 401 || err.status === 403) $("api-key").focus();
  } finally {
    if (seq === state.seq) setBusy(false);
  }
}

function scheduleAuto(delay = 250) {
  if (!$("auto").checked || checkReady() || (state.config.auth && !$("api-key").value.trim())) return;
  clearTimeout(state.timer);
  state.timer = setTimeout(() => run({ fromUser: false }), delay);
}

// ---- showing results -----------------------------------------------------------------------------------

async function showResult(opts, results, kind) {
  clearResult();
  state.shown = { opts, results };
  const mask = results.get("mask");
  const selected = await drawOverlay(mask.blob);
  const out = results.get(kind);
  const output = $("output");
  output.src = out.url;
  output.hidden = false;
  output.alt = `The ${OUTPUT_NAMES[kind]} returned by the server`;
  $("output-caption").textContent = `Output: ${OUTPUT_NAMES[kind]}`;
  for (const k of Object.keys(OUTPUT_NAMES)) $(`dl-${k}`).disabled = false;
  const total = [...results.values()].reduce((sum, r) => sum + r.ms, 0);
  const server = mask.serverMs === null ? "" : `, server ${formatMs(mask.serverMs)}`;
  setStatus(`Done in ${formatMs(total)} (mask request ${formatMs(mask.ms)}${server}). ${selected.text}`);
  setFacts([
    ["Size", `${selected.width}×${selected.height}`],
    ["Selected", selected.text],
    ["Mask request", formatMs(mask.ms) + server],
    ...(kind === "mask" ? [] : [[`${OUTPUT_NAMES[kind]} request`, formatMs(out.ms)]]),
    ["Options", describe(opts)],
  ]);
  $("result").dataset.options = JSON.stringify(opts);
  $("result").dataset.ready = String(state.seq);
}

function revealResult() {
  // On a phone the result is below the form: bring it into view (a no-op when it is already visible).
  const box = $("result").getBoundingClientRect();
  if (box.top > window.innerHeight * 0.6) $("result").scrollIntoView({ block: "start" });
}

async function drawOverlay(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = $("overlay");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const pixels = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
  const d = pixels.data;
  let count = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i];
    if (v >= 128) count += 1;
    d[i] = TINT[0];
    d[i + 1] = TINT[1];
    d[i + 2] = TINT[2];
    d[i + 3] = v;
  }
  ctx.putImageData(pixels, 0, 0);
  canvas.hidden = false;
  const total = bitmap.width * bitmap.height;
  const pct = total ? ((100 * count) / total).toFixed(1) : "0";
  return { width: bitmap.width, height: bitmap.height, text: `${count.toLocaleString()} pixels selected (${pct}%).` };
}

function clearResult() {
  if (state.shown) for (const r of state.shown.results.values()) URL.revokeObjectURL(r.url);
  state.shown = null;
  $("overlay").hidden = true;
  const output = $("output");
  output.hidden = true;
  output.removeAttribute("src");
  for (const k of Object.keys(OUTPUT_NAMES)) $(`dl-${k}`).disabled = true;
  $("facts").replaceChildren();
  delete $("result").dataset.ready;
  delete $("result").dataset.options;
}

function setFacts(rows) {
  $("facts").replaceChildren(
    ...rows.flatMap(([term, value]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = term;
      dd.textContent = value;
      return [dt, dd];
    }),
  );
}

function describe(opts) {
  return Object.entries(opts)
    .filter(([name]) => name !== "prompt")
    .map(([name, value]) => `${name}=${value}`)
    .join(", ");
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// ---- downloads -----------------------------------------------------------------------------------------

async function download(kind) {
  if (!state.shown) return;
  const { opts, results } = state.shown;
  const button = $(`dl-${kind}`);
  try {
    if (!results.has(kind)) {
      button.disabled = true;
      setStatus(`Fetching the ${OUTPUT_NAMES[kind]}…`);
      results.set(kind, await callApi(payload(opts, kind)));
      setStatus(`The ${OUTPUT_NAMES[kind]} is ready (${formatMs(results.get(kind).ms)}).`);
    }
    const a = document.createElement("a");
    a.href = results.get(kind).url;
    a.download = `${baseName()}-${kind === "alpha" ? "cutout" : kind}.png`;
    document.body.append(a);
    a.click();
    a.remove();
  } catch (err) {
    showError(err instanceof ApiError ? err.message : `The download failed: ${err.message}`);
  } finally {
    if (state.shown) button.disabled = false;
  }
}

// ---- status, errors, busy ------------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
  setStatus("Failed: see the message below.");
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  box.textContent = "";
}

function setBusy(busy) {
  $("result").setAttribute("aria-busy", String(busy));
  $("submit").textContent = busy ? "Working…" : "Make mask";
}

// ---- wiring --------------------------------------------------------------------------------------------

function bindSlider(id, format) {
  const input = $(id);
  const out = $(`${id}-value`);
  const update = () => {
    out.textContent = format(Number(input.value));
  };
  input.addEventListener("input", update);
  update();
  return input;
}

function wire() {
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("file").addEventListener("change", () => useFile($("file").files[0]).catch((e) => showError(e.message)));
  $("image-url").addEventListener("change", useUrl);
  $("image-url").addEventListener("keydown", (event) => {
    if (event.key === "Enter") useUrl();
  });
  wireDrop();
  bindSlider("threshold", (v) => v.toFixed(2));
  bindSlider("grow_mask", (v) => String(v));
  const opacity = bindSlider("opacity", (v) => `${v}%`);
  const applyOpacity = () => {
    $("overlay").style.opacity = String(Number(opacity.value) / 100);
  };
  opacity.addEventListener("input", applyOpacity);
  applyOpacity();
  for (const id of ["threshold", "grow_mask", "invert_mask", "stop_on_empty_mask", "model"]) {
    $(id).addEventListener("change", () => state.shown && scheduleAuto());
  }
  for (const radio of document.querySelectorAll("input[name=output]")) {
    radio.addEventListener("change", () => state.shown && scheduleAuto(0));
  }
  for (const radio of document.querySelectorAll("input[name=view]")) {
    radio.addEventListener("change", () => {
      $("stage").dataset.view = radio.value;
      opacity.closest(".slider").hidden = radio.value !== "overlay";
    });
  }
  $("api-key").addEventListener("input", () => localStorage.setItem(KEY_STORAGE, $("api-key").value.trim()));
  for (const kind of Object.keys(OUTPUT_NAMES)) $(`dl-${kind}`).addEventListener("click", () => download(kind));
}

function wireDrop() {
  const zone = $("drop");
  const take = (files) => {
    const file = [...(files || [])].find((f) => f.type.startsWith("image/")) || (files || [])[0];
    if (file) useFile(file).catch((e) => showError(e.message));
  };
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    take(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? event.clipboardData.files : null;
    if (files && files.length) take(files);
  });
}

wire();
loadConfig().then(() => document.body.setAttribute("data-loaded", "true"));
