// The page's calls to the server: the public v1 API, GET v1/credits (an automask extension) and web/config.
// Paths are relative to where this script was loaded from (SERVER/static/api.js), not to the page's address, so
// the page works behind a proxy under any prefix, at /prefix as well as /prefix/. A page opened on the server
// itself, outside the prefix its --public-url names (at http://127.0.0.1:8000/, not through the proxy), loads its
// scripts from under the prefix too (the server serves them there as well), but the API is at its own root.

const LOADED_FROM = new URL("../", import.meta.url);
const PREFIX = LOADED_FROM.pathname.replace(/\/$/, "");
const THROUGH_PROXY = location.pathname === PREFIX || location.pathname.startsWith(`${PREFIX}/`);
const SERVER = THROUGH_PROXY ? LOADED_FROM : new URL("/", LOADED_FROM);
const API = new URL("v1/automatic-mask-generator", SERVER);
const CREDITS = new URL("v1/credits", SERVER);
const CONFIG = new URL("web/config", SERVER);

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function loadConfig() {
  try {
    const res = await fetch(CONFIG, { headers: { accept: "application/json" } });
    if (res.ok) return await res.json();
  } catch {
    // A server without the page's config: ask for a key and send no model.
  }
  return {};
}

function headersFor(key, accept) {
  const headers = { "content-type": "application/json", accept };
  if (key) headers["x-api-key"] = key;
  return headers;
}

// POST the v1 call with `base64: true` and `instance_masks: true` (an automask extension): the answer is JSON
// {image: base64 PNG, ...metadata, instances: [{label, score, box, area, mask: base64 PNG}]}.
// Returns {data, ms, serverMs, orientation}; `ms` is this request's own round trip, `orientation` how the server
// turned the image (its x-image-orientation header, e.g. "3; format=webp; from=exif"; null: not turned).
export async function requestMask(body, { key, signal }) {
  const t0 = performance.now();
  const res = await post({ ...body, base64: true, instance_masks: true }, key, signal, "application/json");
  const text = await bodyOf(res, (r) => r.text());
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    const what = `The server answered ${res.status} ${res.statusText} with something other than automask's answer`;
    throw new ApiError(res.status, `${what}${snippetOf(text, ":")} Is this the address of automask serve?`);
  }
  const orientation = res.headers.get("x-image-orientation");
  return { data, ms: performance.now() - t0, serverMs: serverTime(res.headers, data), orientation };
}

// POST the v1 call for the image itself (a cut-out or preview of an image the page cannot read).
export async function requestImage(body, { key, signal }) {
  const res = await post({ ...body, base64: false }, key, signal, "image/png, application/json");
  return bodyOf(res, (r) => r.blob());
}

// `read(res)`: the answer's body. A connection cut midway (the server stopped, a proxy gave up) is said as such, not
// as the page's fault; Cancel (an AbortError) stays one.
async function bodyOf(res, read) {
  try {
    return await read(res);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `The server's answer was cut off (${err.message}). Is automask serve still running?`);
  }
}

async function post(body, key, signal, accept) {
  let res;
  try {
    res = await fetch(API, { method: "POST", headers: headersFor(key, accept), body: JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `Could not reach the server (${err.message}). Is automask serve still running?`);
  }
  if (!res.ok) throw new ApiError(res.status, await errorSentence(res));
  return res;
}

// The key's balance: {credits: number|null (null: unlimited)}, or null when the server has no such endpoint
// (an older automask, or another implementation of the API) or the key is refused.
export async function fetchCredits(key) {
  try {
    const res = await fetch(CREDITS, { headers: headersFor(key, "application/json"), cache: "no-store" });
    if (!res.ok) return null;
    const body = await res.json();
    return "credits" in body ? { credits: body.credits } : null;
  } catch {
    return null;
  }
}

export async function errorSentence(res) {
  const text = await res.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // Not JSON: a proxy's page or a plain-text error; show its start below.
  }
  return `The server answered ${res.status} ${res.statusText}${snippetOf(text, ":")}`;
}

// The start of a page that is not the API's JSON (a proxy's error page, plain text), its tags left out: after
// `lead`, ending in a full stop; "." when there is no text.
function snippetOf(text, lead) {
  const snippet = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 200);
  return snippet ? `${lead} ${snippet}${/[.!?]$/.test(snippet) ? "" : "."}` : ".";
}

function serverTime(headers, data) {
  for (const name of ["x-inference-time", "x-process-time"]) {
    const value = Number.parseFloat(headers.get(name) || "");
    if (Number.isFinite(value)) return value * 1000;
  }
  const inBody = data && Number(data.inference_time);
  return Number.isFinite(inBody) ? inBody * 1000 : null;
}
