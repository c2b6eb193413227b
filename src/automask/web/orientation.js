// Orientation that the server applies and a browser may not. The server turns every image upright
// (automask.imageio.decode: the EXIF Orientation, else XMP's tiff:Orientation, as Pillow reads them); Chromium
// applies a JPEG's or PNG's EXIF orientation when it decodes it, but neither a WebP's nor any XMP one. The page
// turns such an image itself, so that what it shows and renders has the server's rows and columns.

import { HEAD_BYTES, ascii, jpegSegments, webpChunks } from "./segments.js";

// 2×1 images whose orientation is 6 (a lossless WebP's EXIF; a lossless WebP's XMP alone; a JPEG's XMP alone): a
// browser that applies it decodes them as 1×2. A browser may apply one kind and not another: each has its probe.
const PROBES = {
  webp: "UklGRk4AAABXRUJQVlA4WAoAAAAIAAAAAQAAAAAAVlA4TA4AAAAvAQAAAAcQEf0PRET/A0VYSUYaAAAATU0AKgAAAAgAAQESAAMAAAABAAYAAAAAAAA=",
  webpXmp:
    "UklGRgIBAABXRUJQVlA4WAoAAAAEAAAAAQAAAAAAVlA4TA4AAAAvAQAAAAcQEf0PRET/A1hNUCDNAAAAPHg6eG1wbWV0YSB4bWxuczp4PSJhZG9iZTpuczptZXRhLyI+PHJkZjpSREYgeG1sbnM6cmRmPSJodHRwOi8vd3d3LnczLm9yZy8xOTk5LzAyLzIyLXJkZi1zeW50YXgtbnMjIj48cmRmOkRlc2NyaXB0aW9uIHhtbG5zOnRpZmY9Imh0dHA6Ly9ucy5hZG9iZS5jb20vdGlmZi8xLjAvIiB0aWZmOk9yaWVudGF0aW9uPSI2Ii8+PC9yZGY6UkRGPjwveDp4bXBtZXRhPgA=",
  jpeg:
    "/9j/4AAQSkZJRgABAQAAAQABAAD/4QDsaHR0cDovL25zLmFkb2JlLmNvbS94YXAvMS4wLwA8eDp4bXBtZXRhIHhtbG5zOng9ImFkb2JlOm5zOm1ldGEvIj48cmRmOlJERiB4bWxuczpyZGY9Imh0dHA6Ly93d3cudzMub3JnLzE5OTkvMDIvMjItcmRmLXN5bnRheC1ucyMiPjxyZGY6RGVzY3JpcHRpb24geG1sbnM6dGlmZj0iaHR0cDovL25zLmFkb2JlLmNvbS90aWZmLzEuMC8iIHRpZmY6T3JpZW50YXRpb249IjYiLz48L3JkZjpSREY+PC94OnhtcG1ldGE+/9sAQwD//////////////////////////////////////////////////////////////////////////////////////8AACwgAAQACAQERAP/EABQAAQAAAAAAAAAAAAAAAAAAAAP/xAAUEAEAAAAAAAAAAAAAAAAAAAAA/9oACAEBAAA/ADf/2Q==",
};
const applies = {}; // kind -> Promise<bool>: whether this browser applies that kind of orientation itself

function browserApplies(kind) {
  applies[kind] ??= (async () => {
    try {
      const bytes = Uint8Array.from(atob(PROBES[kind]), (c) => c.charCodeAt(0));
      const type = kind === "jpeg" ? "image/jpeg" : "image/webp";
      const bitmap = await createImageBitmap(new Blob([bytes], { type }));
      bitmap.close();
      return bitmap.width === 1;
    } catch {
      return true; // not decodable here at all: nothing to turn
    }
  })();
  return applies[kind];
}

const XMP_ORIENTATION = /tiff:Orientation(="|>)([0-9])/; // Pillow's
const XMP_APP1 = "http:\/\/ns.adobe.com/xap/1.0/\0"; // XMP's namespace (a name, not an address to load)

function xmpOrientation(bytes) {
  const found = XMP_ORIENTATION.exec(new TextDecoder("latin1").decode(bytes));
  return found ? Number(found[2]) : null;
}

// The orientation (1–8) a blob's image has and this browser does not apply: a WebP's EXIF Orientation, else its
// XMP tiff:Orientation; a JPEG's XMP one when it has no EXIF one; 1 for anything else, or when unreadable.
export async function orientationToApply(blob) {
  const head = new Uint8Array(await blob.slice(0, HEAD_BYTES).arrayBuffer());
  let value = null;
  let kind = null;
  if (head.length >= 12 && ascii(head, 0, 4) === "RIFF" && ascii(head, 8, 4) === "WEBP") {
    const chunks = await webpChunks(blob, ["EXIF", "XMP "]);
    value = chunks.EXIF ? exifOrientation(chunks.EXIF) : null;
    kind = "webp";
    if (value === null && chunks["XMP "]) [value, kind] = [xmpOrientation(chunks["XMP "]), "webpXmp"];
  } else if (head[0] === 0xff && head[1] === 0xd8) {
    [value, kind] = [jpegXmpOrientation(head), "jpeg"];
  }
  if (!(value >= 2 && value <= 8) || (await browserApplies(kind))) return 1;
  return value;
}

// The orientation (1–8) to apply to an image this browser shows as it decodes it (one of another site, whose bytes
// are unreadable here), from how the server turned it (api.js: "3; format=webp; from=exif"; null: not turned):
// 1 when the browser applies that orientation itself (a JPEG's or PNG's EXIF one).
export async function orientationFromServer(header) {
  const found = /^([1-8]);\s*format=([a-z0-9]+);\s*from=(exif|xmp)$/i.exec((header || "").trim());
  if (!found) return 1;
  const [value, format, from] = [Number(found[1]), found[2].toLowerCase(), found[3].toLowerCase()];
  const webp = format === "webp" ? (from === "xmp" ? "webpXmp" : "webp") : null;
  const kind = webp || (format === "jpeg" && from === "xmp" ? "jpeg" : null);
  if (kind) return (await browserApplies(kind)) ? 1 : value;
  return from === "xmp" ? value : 1; // no browser applies an XMP orientation; the EXIF one of other formats, yes
}

// A JPEG's XMP orientation, when its EXIF (which browsers apply) has none; null otherwise.
function jpegXmpOrientation(head) {
  let xmp = null;
  for (const { marker, at, size } of jpegSegments(head)) {
    if (marker !== 0xe1) continue;
    const body = head.subarray(at + 4, at + 2 + size);
    if (ascii(body, 0, 6) === "Exif\0\0" && exifOrientation(body) !== null) return null;
    if (xmp === null && ascii(body, 0, XMP_APP1.length) === XMP_APP1) xmp = xmpOrientation(body);
  }
  return xmp;
}

// Tag 0x0112 of a TIFF-structured EXIF block's first directory (with or without the "Exif\0\0" of JPEG's APP1);
// null when absent or unreadable.
function exifOrientation(data) {
  const tiff = ascii(data, 0, 6) === "Exif\0\0" ? data.subarray(6) : data;
  if (tiff.length < 8) return null;
  const view = new DataView(tiff.buffer, tiff.byteOffset, tiff.byteLength);
  const order = ascii(tiff, 0, 2);
  if (order !== "II" && order !== "MM") return null;
  const little = order === "II";
  try {
    const dir = view.getUint32(4, little);
    const count = view.getUint16(dir, little);
    for (let i = 0; i < count; i += 1) {
      const entry = dir + 2 + 12 * i;
      if (view.getUint16(entry, little) === 0x0112) return view.getUint16(entry + 8, little);
    }
  } catch {
    // a directory past the block's end: unreadable, as for the server
  }
  return null;
}

// The canvas transform (a, b, c, d, e, f) that draws a w×h image stored with `orientation` upright, and the
// upright size (automask.imageio.decode._ORIENT: the same turns and mirrors).
export function uprightTransform(orientation, w, h) {
  const matrix = {
    1: [1, 0, 0, 1, 0, 0],
    2: [-1, 0, 0, 1, w, 0],
    3: [-1, 0, 0, -1, w, h],
    4: [1, 0, 0, -1, 0, h],
    5: [0, 1, 1, 0, 0, 0],
    6: [0, 1, -1, 0, h, 0],
    7: [0, -1, -1, 0, h, w],
    8: [0, -1, 1, 0, 0, w],
  }[orientation];
  const [width, height] = orientation >= 5 ? [h, w] : [w, h];
  return { matrix, width, height };
}
