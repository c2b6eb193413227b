// Where images come from: the file picker, a drop anywhere on the page, a paste (an image or its URL), the URL
// field, and the one-click examples. Nothing that is not an image (or an http(s) URL) is sent to the server.

import { orientationToApply } from "./orientation.js";
import { dataUriBytes, fileProblem, formatBytes, parseImageUrl, pixelProblem, sizeProblem } from "./prefs.js";
import { TooManyPixels, dataUriBlob, imagePixels, uprightPng } from "./render.js";

const $ = (id) => document.getElementById(id);

// An example photo, served beside this script (static/examples/), wherever the page itself is.
function exampleUrl(ex) {
  return new URL(`examples/${encodeURIComponent(ex.file)}`, import.meta.url).href;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`Could not read the file ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

// The file name at the end of an image URL's path, percent-decoded ("My%20photo.jpg": "My photo.jpg").
function urlFileName(url) {
  const last = new URL(url).pathname.split("/").pop();
  try {
    return decodeURIComponent(last) || "image";
  } catch {
    return last || "image"; // not valid percent-encoding: as written
  }
}

// A data: URI's image with an orientation the browser does not apply (orientation.js): a blob URL of it turned
// upright, as the server reads it, to show; null for any other (and for another site's image, whose bytes are
// not readable here).
async function turnedDataUri(url) {
  try {
    const blob = dataUriBlob(url);
    const orientation = blob ? await orientationToApply(blob) : 1;
    return orientation === 1 ? null : URL.createObjectURL(await uprightPng(blob, orientation));
  } catch {
    return null; // not base64, or not an image this browser decodes: shown (or not) as it is; the server will say
  }
}

// The image URL that text pasted, dropped or put in the URL field begins with: a data: URI whole (parseImageUrl
// reads its base64, leaving out what follows); an http(s) URL within the angle brackets, quotes, parentheses or
// square brackets that set it apart in prose, all that is within them (spaces too: %20), a note after them left
// out; else, pasted or dropped, up to the first whitespace (one copied from a browser has none: a space is %20), and
// in the URL field (`whole`) the line whole, as a browser's address bar takes it (a space in it is %20); else the
// first line, as it is (the page says why it is not an image URL). The closing quote is the first one not followed
// by a letter or digit: an apostrophe in a quoted URL's path (it's.png: browsers leave it as it is in a path) does
// not end it; the closing parenthesis or bracket is the one that balances it: a URL's own (Foo_(bar).jpg) do not.
const CLOSING = { "<": ">", '"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "(": ")", "[": "]" };

function closingAt(line, close) {
  if (close === ")" || close === "]") {
    for (let at = 0, depth = 0; at < line.length; at += 1) {
      depth += line[at] === line[0] ? 1 : line[at] === close ? -1 : 0;
      if (depth === 0) return at;
    }
    return -1;
  }
  for (let at = line.indexOf(close, 1); at > 0; at = line.indexOf(close, at + 1)) {
    if (!/^[\p{L}\p{N}]/u.test(line.slice(at + 1))) return at;
  }
  return line.indexOf(close, 1);
}

function urlInText(text, { whole = false } = {}) {
  const value = text.trim();
  if (/^data:/i.test(value)) return value;
  const line = value.split(/\r?\n/)[0].trim();
  const close = CLOSING[line[0]];
  const end = close ? closingAt(line, close) : -1;
  const word = end > 0 ? line.slice(1, end).trim() : whole ? line : line.split(/\s/)[0];
  return /^https?:\/\/\S/i.test(word) ? word : line;
}

function isTextField(el) {
  return Boolean(el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && !["file", "range", "checkbox", "radio", "color"].includes(el.type))));
}

// `app` gives: reading(name), setImage(image, label), showError(text), examples(), examplePrompt(example), usePrompt(text, opts),
// run(), autoRun(), limits() ({maxBytes, maxBody}: prefs.sizeProblem), maxPixels().
export function wireInput(app) {
  let chosen = 0; // the image the user chose last: one still being read when another is chosen is dropped
  let urlChoice = 0; // the choice that named the URL in source.dataset.url

  // A file or URL refused: the user's last act, it still supersedes an image being read, which would otherwise be
  // shown over its error (and clear it) once read, and leaves nothing "being read".
  function refuse(text) {
    chosen += 1;
    app.reading(null);
    app.showError(text);
  }

  async function useFile(file, { auto = true, choice = ++chosen } = {}) {
    const problem = fileProblem(file, app.limits());
    if (problem) {
      refuse(problem);
      return false;
    }
    const limit = app.maxPixels() || Infinity;
    app.reading(file.name || "the pasted image");
    let src, pixels, turned;
    try {
      [src, pixels] = await Promise.all([readDataUrl(file), imagePixels(file, limit).catch((err) => err)]);
      // an orientation the browser does not apply (a WebP's): shown as the page turned it, as the server will
      if (pixels.orientation > 1 && choice === chosen) turned = await uprightPng(file, pixels.orientation);
    } finally {
      if (choice === chosen) app.reading(null);
    }
    if (choice !== chosen) return false;
    if (pixels instanceof TooManyPixels) {
      app.showError(pixelProblem(file.name, pixels, limit));
      return false;
    }
    $("image-url").value = "";
    const name = file.name || "pasted image.png";
    const readable = pixels instanceof Error ? null : pixels; // a browser that cannot decode it: the server may
    const display = turned ? URL.createObjectURL(turned) : null;
    await app.setImage({ kind: "file", name, src, display, pixels: readable }, `${name} — ${formatBytes(file.size)}`);
    if (auto) app.autoRun();
    return true;
  }

  async function useUrl(text, { auto = true, again = false } = {}) {
    if (!text.trim()) return;
    const { url, problem } = parseImageUrl(text);
    if (problem) {
      refuse(problem);
      return;
    }
    const pasted = url.startsWith("data:");
    const name = pasted ? "pasted image" : urlFileName(url);
    // Too large for the server: said now, not after uploading all of it for a 413 (the image shown stays).
    const bytes = pasted ? dataUriBytes(url) : 0;
    const tooLarge = sizeProblem(pasted ? "The pasted image" : "This URL", bytes, url.length, app.limits());
    if (tooLarge) {
      refuse(tooLarge);
      return;
    }
    if (!again && $("source").dataset.url === url) return; // 'change' and Enter both fire for one URL
    const choice = ++chosen;
    $("file").value = "";
    $("source").dataset.url = url;
    urlChoice = choice;
    // A data: URI is read (and maybe turned upright) first: meanwhile, as for a file, nothing is masked.
    if (url.startsWith("data:")) app.reading(name);
    const display = await turnedDataUri(url); // never throws
    if (choice === chosen) app.reading(null);
    if (choice !== chosen) {
      if (display) URL.revokeObjectURL(display);
      // dropped for a refused act, not for another URL: not the image shown, so asking for it again loads it
      if (urlChoice === choice) delete $("source").dataset.url;
      return;
    }
    await app.setImage({ kind: "url", name, src: url, display, pixels: null }, url.startsWith("data:") ? name : url);
    if (auto) app.autoRun();
  }

  function takeFiles(files) {
    const list = [...(files || [])];
    const file = list.find((f) => f.type.startsWith("image/")) || list[0];
    if (!file) return false;
    delete $("source").dataset.url;
    useFile(file).catch((err) => app.showError(err.message));
    return true;
  }

  $("file").addEventListener("change", () => takeFiles($("file").files));
  // What the URL field holds: one URL, spaces and all, as in a browser's address bar (`urlInText`: the URL within
  // the quotes or brackets it was copied with), and shown so in the field.
  function fieldUrl() {
    const field = $("image-url");
    const text = urlInText(field.value, { whole: true });
    if (text !== field.value) field.value = text;
    return text;
  }

  $("image-url").addEventListener("change", () => useUrl(fieldUrl()));
  $("image-url").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault(); // not the form's submit: the URL is the image, not a request yet
      useUrl(fieldUrl(), { again: true }); // Enter on the same URL loads it again, as a browser does
    }
  });

  // Drop anywhere: the whole page is a drop target, so a photo dropped off the box never replaces the page.
  const zone = $("dropzone");
  const carries = (event) => {
    const types = [...(event.dataTransfer ? event.dataTransfer.types : [])];
    if (types.includes("Files")) return true;
    return !isTextField(event.target) && (types.includes("text/uri-list") || types.includes("text/plain"));
  };
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!carries(event)) return;
    event.preventDefault();
    depth += 1;
    zone.hidden = false;
  });
  document.addEventListener("dragover", (event) => {
    if (!carries(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    zone.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) zone.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    depth = 0;
    zone.hidden = true;
    if (!carries(event)) return;
    event.preventDefault();
    const data = event.dataTransfer;
    if (takeFiles(data.files)) return;
    // The first URL of a list (its # lines are comments, RFC 2483), or the URL the text begins with.
    const [list, plain] = [data.getData("text/uri-list"), data.getData("text/plain")];
    const uris = list.split(/\r?\n/).filter((line) => line.trim() && !line.startsWith("#"));
    const text = list ? (uris[0] || "").trim() : urlInText(plain);
    if (text) {
      $("image-url").value = text;
      useUrl(text);
    }
  });

  // Paste: an image anywhere; an image URL when the focus is not in a text field.
  document.addEventListener("paste", (event) => {
    const data = event.clipboardData;
    if (!data) return;
    if (data.files && data.files.length) {
      event.preventDefault();
      takeFiles(data.files);
      return;
    }
    if (isTextField(document.activeElement)) return;
    const text = urlInText(data.getData("text/plain"));
    if (!text) return;
    event.preventDefault();
    $("image-url").value = text;
    useUrl(text);
  });

  // One-click examples: the photo, a prompt the chosen model answers, and the request.
  function fillExamples() {
    const list = $("examples");
    const examples = app.examples();
    list.closest(".examples").hidden = !examples.length;
    list.replaceChildren(
    ...examples.map((ex) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "example";
      button.dataset.example = ex.name;
      const thumb = document.createElement("img");
      thumb.src = exampleUrl(ex);
      thumb.alt = "";
      button.append(thumb, ex.title);
      button.addEventListener("click", () => useExample(ex).catch((err) => app.showError(err.message)));
      return button;
    }),
    );
  }

  async function useExample(ex) {
    const choice = ++chosen;
    app.reading(ex.file);
    let res, blob;
    try {
      res = await fetch(exampleUrl(ex));
      blob = res.ok ? await res.blob() : null;
    } catch (err) {
      const why = `Could not fetch the example ${ex.file} from the server (${err.message}).`;
      throw new Error(`${why} Is automask serve still running?`);
    } finally {
      if (choice === chosen) app.reading(null);
    }
    if (choice !== chosen) return;
    if (!blob) throw new Error(`The example ${ex.file} is missing on this server (${res.status}).`);
    const file = new File([blob], ex.file, { type: blob.type || "image/jpeg" });
    delete $("source").dataset.url;
    app.usePrompt(app.examplePrompt(ex), { runNow: false });
    if (await useFile(file, { auto: false, choice })) app.run();
  }

  // Back to the page after the browser dropped it (no page cache): the browser restores the URL field, not the
  // image; show that image again, not masked (nothing is sent until asked).
  function restoreUrl() {
    const text = fieldUrl();
    if (text && !$("source").getAttribute("src")) useUrl(text, { auto: false });
  }

  return { fillExamples, restoreUrl };
}
