// Downloads and the clipboard, rendered in the page from the mask and the image: no request, no credit. Only an
// image whose pixels the page cannot reproduce exactly (one from another site, unreadable here; one with a colour
// profile or 16-bit grey samples: see render.imagePixels) needs the server for a cut-out or preview.

import { requestImage } from "./api.js";
import { cutoutPixels, encodePng, previewPixels } from "./render.js";
import { fetchEnded, fetchStarted } from "./status.js";
import { targetMasks } from "./targets.js";

// Whether the shown result's cut-out ("alpha") or preview comes from the server (one more request): the page
// cannot read the image's pixels (another site's), or has not exactly the server's (for a cut-out, the colours
// under transparency too: see render.imagePixels) and every target is on (the server's answer is then exact;
// with a target left out, which only the page can do, it renders from the pixels it has).
export function fromServer(state, kind) {
  const r = state.result;
  const px = state.image && state.image.pixels;
  if (!px || px.width !== r.width || px.height !== r.height) return true;
  const exact = px.exact && (kind !== "alpha" || px.opaque);
  return !exact && r.enabled.every(Boolean);
}

const RENDERED = { alpha: ["cut-out", "dl-alpha"], preview: ["preview", "dl-preview"] }; // kind -> [what, button]

// ctx: {state, shownMask(), payload(opts), apiKey(), refreshCredits(), setStatus(text)}
export function downloads(ctx) {
  const { state } = ctx;
  // {controller, started, kind, what, button}: the renderings asked of the server, not yet answered
  const running = new Set();

  // The image's name without its extension, any script's letters and digits kept ("фото кота.jpg": "фото-кота").
  function baseName() {
    const name = state.image ? state.image.name : "image";
    const safe = name.replace(/\.[A-Za-z0-9]+$/, "").replace(/[^\p{L}\p{N}_.-]+/gu, "-");
    return safe.replace(/^[-.]+|[-.]+$/g, "") || "image";
  }

  // Save `blob` (a Blob, or a promise of one) as `name`, named as asked for: another image chosen while the server
  // renders it does not rename it.
  async function save(blob, name) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await blob);
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
  }

  // The server's PNG when every target is on, else the shown mask encoded here.
  async function maskPng() {
    const r = state.result;
    return r.enabled.every(Boolean) ? r.blob : encodePng(ctx.shownMask(), r.width, r.height, 1);
  }

  async function rendered(kind) {
    const r = state.result;
    const px = state.image.pixels;
    if (!fromServer(state, kind)) {
      const mask = ctx.shownMask();
      return kind === "alpha"
        ? encodePng(cutoutPixels(px.data, mask), r.width, r.height, 4)
        : encodePng(previewPixels(px.data, mask), r.width, r.height, 3);
    }
    // The request itself is kept: a second click while it runs (a slow network) waits for it, not for another
    // charged request. A failed one is forgotten, so the next click asks again.
    r.remote = r.remote || {};
    if (!r.remote[kind]) {
      const asked = ask(r, kind);
      r.remote[kind] = asked;
      asked.catch(() => {
        if (r.remote[kind] === asked) delete r.remote[kind];
      });
    }
    return r.remote[kind];
  }

  // Cancel (`cancel`) aborts the request: the server neither runs nor charges it; the result shown stays.
  async function ask(r, kind) {
    const [what, button] = RENDERED[kind];
    const job = { controller: new AbortController(), started: performance.now(), kind, what, button };
    running.add(job);
    fetchStarted(job);
    const body = { ...ctx.payload(r.opts), return_mask: kind !== "preview", return_alpha: kind === "alpha" };
    try {
      const blob = await requestImage(body, { key: ctx.apiKey(), signal: job.controller.signal });
      ctx.setStatus("Downloaded.");
      return blob;
    } finally {
      running.delete(job);
      fetchEnded(job, running.size > 0);
      ctx.refreshCredits();
    }
  }

  return {
    // Abort the renderings asked of the server; whether there were any.
    cancel() {
      for (const job of running) job.controller.abort();
      return running.size > 0;
    },
    // When the last of the renderings still asked of the server began (performance.now()); null when none runs.
    startedLast() {
      const job = [...running].at(-1);
      return job ? job.started : null;
    },
    mask: () => save(maskPng(), `${baseName()}-mask.png`),
    cutout: () => save(rendered("alpha"), `${baseName()}-cutout.png`),
    preview: () => save(rendered("preview"), `${baseName()}-preview.png`),
    // Target i's own mask from the server, grown by grow_mask (never inverted), as `automask mask --instances`.
    async target(i) {
      const r = state.result;
      const det = r.data.detections[i];
      const slug = String(det.label).toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "") || "target";
      const name = `${baseName()}-${String(i).padStart(2, "0")}-${slug}.png`;
      const mask = (await targetMasks(r, r.opts.grow_mask || 0))[i];
      await save(encodePng(mask, r.width, r.height, 1), name);
    },
    async copy() {
      if (!navigator.clipboard || !window.ClipboardItem) {
        throw new Error("this browser copies images only on a secure page: an https address, or localhost.");
      }
      await navigator.clipboard.write([new ClipboardItem({ "image/png": maskPng() })]);
      ctx.setStatus("The mask is on the clipboard (PNG).");
    },
  };
}
