// Checks the page makes before it sends anything (image type, image URL, prompt words a model cannot answer),
// and the settings it keeps in this browser across a reload.

const PREFS_KEY = "automask.settings";
export const KEY_STORAGE = "automask.apiKey";

// Form fields kept across a reload (the image is not kept).
export const KEPT = [
  "prompt", "threshold", "grow_mask", "invert_mask", "stop_on_empty_mask", "model", "negative_prompt", "feather",
  "fill_holes", "min_area", "seed", "auto", "tint", "outline", "opacity",
];

const IMAGE_NAME = /\.(png|jpe?g|webp|gif|bmp|tiff?|avif|heic|heif)$/i;

const ROOM_FOR_FIELDS = 64 * 1024; // a request's other fields (prompt, options), beside its image

// null when `file` looks like an image within the server's `limits` (`sizeProblem`), else the sentence to show.
export function fileProblem(file, limits) {
  const typed = file.type ? file.type.startsWith("image/") : IMAGE_NAME.test(file.name);
  if (!typed) {
    const kind = file.type ? ` (${file.type})` : "";
    return `${file.name} is not an image${kind}. Choose a photo: PNG, JPEG, WebP, GIF, BMP or TIFF.`;
  }
  return sizeProblem(file.name, file.size, Math.ceil(file.size / 3) * 4 + 64, limits); // sent as a data: URI
}

// null when an image of `bytes` bytes, sent as `sent` bytes of text (its data: URI or URL), is within the server's
// limits ({maxBytes, maxBody}: web/config's max_image_bytes and max_body_bytes; unset: not known), else the sentence
// to show: the server would refuse it (413) once the whole of it was uploaded.
export function sizeProblem(name, bytes, sent, { maxBytes, maxBody }) {
  if (maxBytes && bytes > maxBytes) {
    return `${name} is ${formatBytes(bytes)}; this server takes images up to ${formatBytes(maxBytes)}.`;
  }
  if (maxBody && sent + ROOM_FOR_FIELDS > maxBody) {
    const room = formatBytes(Math.max(0, maxBody - ROOM_FOR_FIELDS));
    return `${name} takes ${formatBytes(sent)} to send; this server takes requests up to ${room} for the image.`;
  }
  return null;
}

// The size in bytes of a data: URI's image: its base64 decoded (or its text, for another encoding).
export function dataUriBytes(uri) {
  const comma = uri.indexOf(",");
  const length = uri.length - comma - 1;
  if (!/;base64$/i.test(uri.slice(0, comma))) return length;
  const padding = uri.endsWith("==") ? 2 : uri.endsWith("=") ? 1 : 0;
  return Math.max(0, Math.floor((length * 3) / 4) - padding);
}

// The sentence for an image of `size` ({width, height}) over the server's pixel limit.
export function pixelProblem(name, { width, height }, maxPixels) {
  const count = (width * height).toLocaleString();
  return `${name} is ${width}×${height} = ${count} pixels; this server takes images up to ${maxPixels.toLocaleString()} pixels.`;
}

// null when a number field (`input`, with its min and max) is empty or holds a whole number in range, else the
// sentence to show beside it: the API refuses the rest, and the page neither sends nor quietly changes them.
export function numberProblem(input, label) {
  const min = Number(input.min);
  const max = Number(input.max);
  const want = `${label} must be a whole number from ${min.toLocaleString()} to ${max.toLocaleString()}`;
  if (input.validity.badInput) return `${want}; what is typed is not a number.`;
  if (input.value === "") return null;
  const n = Number(input.value);
  return Number.isInteger(n) && n >= min && n <= max ? null : `${want}, not ${input.value}.`;
}

// {url} for an http(s) URL (or a data:image URI: a base64 one as `base64Data` reads it, without the line breaks it
// may be pasted with, which neither its size nor the request counts), else {problem: sentence}.
export function parseImageUrl(text) {
  const value = text.trim();
  if (/^data:image\//i.test(value)) {
    const comma = value.indexOf(",");
    const base64 = comma > 0 && /;base64$/i.test(value.slice(0, comma).trim());
    return { url: base64 ? value.slice(0, comma).trim() + "," + base64Data(value.slice(comma + 1)) : value };
  }
  let url = null;
  try {
    url = new URL(value);
  } catch {
    // not a URL at all
  }
  if (!url || !["http:", "https:"].includes(url.protocol) || !url.hostname) {
    const shown = value.length > 60 ? `${value.slice(0, 59)}…` : value;
    return {
      problem: `“${shown}” is not an image URL. Paste a link that starts with https:// (or http://), or choose a file.`,
    };
  }
  return { url: url.href };
}

const BASE64_WORD = /^(?:[A-Za-z0-9+/_-]+=*|={1,2})$/; // a line of base64, or its padding alone (a wrap put there)
const WRAP_MAX = 1000; // no tool wraps base64 in longer lines: a first line longer is the data whole, on one line

// The base64 data of a data: URI pasted or dropped as text (what follows its comma): its lines, wrapped as tools
// wrap base64 (each line of base64 alone, as long as the first whole one, the last no longer, padding only at the
// end), joined. It ends at any other whitespace: a note after it ("… see above", on its last line after a space),
// a line that is not base64 alone, a blank line, are not the image's. The last line of wrapped data, with a note
// after it, is the data's when it ends in = padding or leaves whole groups of 4 (as tools write base64).
export function base64Data(text) {
  const [first, ...lines] = text.trimStart().split(/[ \t]*(?:\r\n?|\n)[ \t]*/);
  let data = first.split(/\s/)[0];
  if (data !== first) return data; // more on the line after the data
  let width = 0;
  for (const line of lines) {
    const word = line.split(/\s/)[0];
    const wrapped = width > 0 || first.length <= WRAP_MAX;
    const last = word.endsWith("=") || (wrapped && (data.length + word.length) % 4 === 0); // base64's end
    const whole = word === line || last; // a word with more after it: the data's last line, then a note
    if (!whole || !BASE64_WORD.test(word) || data.endsWith("=") || (width && word.length > width)) break;
    data += word;
    if (word !== line || word.length < (width || first.length)) break; // the last line
    width ||= word.length;
  }
  return data;
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

// ---- prompts ---------------------------------------------------------------------------------------------

// The prompt's targets, split as the server splits them (automask.options.parse_prompt_parts).
export function targetsOf(prompt) {
  return prompt
    .split(",")
    .flatMap((chunk) => chunk.split(/(?<!\S)\.+(?!\S)/))
    .map((p) => p.split(/\s+/).filter(Boolean).join(" ").replace(/\.$/, "").trimEnd())
    .filter(Boolean);
}

// As automask.routing.normalise: lower-case, single spaces, leading articles dropped.
export function normalise(target) {
  let text = target.toLowerCase().split(/\s+/).filter(Boolean).join(" ");
  for (;;) {
    const article = ["the ", "a ", "an ", "all "].find((a) => text.startsWith(a));
    if (!article) return text;
    text = text.slice(article.length);
  }
}

// The sentence to show when `model` (a PageConfig model) cannot answer some targets of `prompt`, else null.
export function vocabularyProblem(prompt, model, config) {
  if (!model || model.open_vocabulary !== false) return null;
  const known = new Set(Object.values(config.vocabulary || {}).flat());
  if (!known.size) return null;
  const unknown = targetsOf(prompt).filter((t) => !known.has(normalise(t)));
  if (!unknown.length) return null;
  const words = unknown.map((w) => `“${w}”`).join(", ");
  const open = (config.choices || []).filter((m) => m.open_vocabulary).map((m) => m.name);
  const fix = open.length
    ? `Choose ${open.map((n) => `“${n}”`).join(" or ")} in Model: it answers any words.`
    : "Install an open-vocabulary model on the server: automask models pull clipseg";
  return (
    `The model “${model.name}” can't answer ${words}: it only knows person words (person, people, man, woman…), ` +
    `subject words (subject, foreground, product…) and background. ${fix}`
  );
}

// The chips under the prompt and the placeholder, for the chosen model.
export function suggestions(model, config) {
  if (model && model.open_vocabulary === false) {
    return { chips: ["person", "subject", "background"], placeholder: "person" };
  }
  const chips = ["person", "cup", "cat", "sky", "background"];
  if (config.embedded_words) chips.splice(1, 0, "subject");
  return { chips, placeholder: "person, cup" };
}

// ---- kept settings -------------------------------------------------------------------------------------

export function loadPrefs() {
  try {
    const saved = JSON.parse(localStorage.getItem(PREFS_KEY) || "{}");
    return saved && typeof saved === "object" ? saved : {};
  } catch {
    return {};
  }
}

export function savePrefs(values) {
  try {
    localStorage.setItem(PREFS_KEY, JSON.stringify(values));
  } catch {
    // storage full or disabled: settings are simply not kept
  }
}

// Read the KEPT controls (and the "show" radio) into a plain object.
export function readControls() {
  const values = {};
  for (const id of KEPT) {
    const el = document.getElementById(id);
    if (el) values[id] = el.type === "checkbox" ? el.checked : el.value;
  }
  values.show = document.querySelector("input[name=show]:checked").value;
  return values;
}

// Put saved values back into the controls; unknown or impossible values are skipped.
export function applyControls(values) {
  for (const id of KEPT) {
    const el = document.getElementById(id);
    if (!el || !(id in values)) continue;
    if (el.type === "checkbox") el.checked = Boolean(values[id]);
    else if (el.tagName === "SELECT") {
      if ([...el.options].some((o) => o.value === values[id])) el.value = values[id];
    } else el.value = String(values[id]);
  }
  const radio = document.querySelector(`input[name=show][value="${values.show}"]`);
  if (radio) radio.checked = true;
}
