// Pixels: decoding the server's mask, the overlay / cut-out / preview the page renders from the mask and the
// image, growing a mask and leaving targets out of it, and a PNG encoder (exact pixel values, no canvas
// premultiplication).
//
// Conventions: a mask is a Uint8Array of width*height bytes, row-major, 255 = selected (soft values when
// feathered); an image is RGBA bytes (ImageData.data) of the same size, in the image's upright orientation.

import { mayCarryColours } from "./colours.js";
import { orientationToApply, uprightTransform } from "./orientation.js";

export const PREVIEW_TINT = [255, 0, 80]; // automask.postprocess.PREVIEW_TINT: the server's preview
export const PREVIEW_OPACITY = 0.5; // automask.postprocess.PREVIEW_OPACITY

const DECODE = { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" };

function canvasOf(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

// An image over the server's pixel limit (which refuses it): found before its pixels are read.
export class TooManyPixels extends Error {
  constructor(width, height) {
    super(`${width}×${height} pixels`);
    this.width = width;
    this.height = height;
  }
}

// The image (a blob, or a loaded <img>) drawn upright on a canvas: EXIF orientation applied, as the server does
// (the browser's own, then `orientation`, one it does not apply: see orientation.js); `colours` "none": the stored
// values, "default": converted by the image's colour profile. Throws TooManyPixels past `maxPixels`.
async function uprightCanvas(source, colours, maxPixels, orientation) {
  const bitmap = await createImageBitmap(source, { ...DECODE, colorSpaceConversion: colours });
  const { matrix, width, height } = uprightTransform(orientation, bitmap.width, bitmap.height);
  if (width * height > maxPixels) {
    bitmap.close(); // its size reads 0×0 from now on
    throw new TooManyPixels(width, height);
  }
  const canvas = canvasOf(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = false; // quarter turns and mirrors only: each pixel copied, none blended
  ctx.setTransform(...matrix);
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  return canvas;
}

// RGBA pixels of an image (see `uprightCanvas`): {data, width, height}.
export async function readPixels(source, colours = "none", maxPixels = Infinity, orientation = 1) {
  const canvas = await uprightCanvas(source, colours, maxPixels, orientation);
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  return { data, width: canvas.width, height: canvas.height };
}

// A PNG of the blob's image turned upright by `orientation` (one the browser does not apply), with the colours a
// browser shows: what the page displays of it.
export async function uprightPng(blob, orientation) {
  const canvas = await uprightCanvas(blob, "default", Infinity, orientation);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// The image's pixels ({data, width, height, exact, opaque}) for renderings in the page. exact: they are the server's
// decode (`readPixels`); false when this page cannot reproduce that decode: an embedded colour profile (the
// server converts to sRGB with LittleCMS, a browser with its own engine, levels apart: the pixels are then the
// browser's conversion, as shown) or 16-bit grey samples (the server rounds them to 8 bits, a browser truncates).
// A file that declares no colour information (colours.js) is decoded once: its managed decode is the same.
// A blob, or a loaded <img> (an image URL; its bytes unreadable here). `orientation`: the one applied here, which
// the browser does not (orientation.js; 1: none). Throws when a browser cannot decode it or may not read its
// pixels (an image of another site), and TooManyPixels past `maxPixels`.
export async function imagePixels(source, maxPixels = Infinity) {
  const orientation = source instanceof Blob ? await orientationToApply(source) : 1;
  const stored = { ...(await readPixels(source, "none", maxPixels, orientation)), orientation };
  if (source instanceof Blob && sixteenBitGrey(new Uint8Array(await source.slice(0, 26).arrayBuffer()))) {
    return { ...stored, exact: false };
  }
  if (source instanceof Blob && !(await mayCarryColours(source))) {
    return { ...stored, exact: true, opaque: opaque(stored.data) }; // the managed decode would be the same
  }
  const managed = await readPixels(source, "default", Infinity, orientation);
  const [a, b] = [new Uint32Array(stored.data.buffer), new Uint32Array(managed.data.buffer)];
  for (let i = 0; i < a.length; i += 1) if (a[i] !== b[i]) return { ...stored, ...managed, exact: false };
  return { ...stored, exact: true, opaque: opaque(stored.data) };
}

// Whether every pixel of RGBA bytes is opaque. A canvas stores colours premultiplied by alpha: under a pixel
// that is not, the colour read back is off (all of it at alpha 0, up to half the range at alpha 1).
function opaque(rgba) {
  for (let i = 3; i < rgba.length; i += 4) if (rgba[i] !== 255) return false;
  return true;
}

// Whether PNG bytes (their first 26) describe 16-bit grey samples (IHDR: bit depth 16, colour type 0).
function sixteenBitGrey(head) {
  const png = [137, 80, 78, 71, 13, 10, 26, 10].every((b, i) => head[i] === b);
  return png && head[24] === 16 && head[25] === 0;
}

// The bytes of a base64 data: URI as a blob (null for another kind of URL).
export function dataUriBlob(uri) {
  const found = /^data:([^;,]*)(?:;[^,]*)?;base64,/i.exec(uri);
  return found ? new Blob([base64Bytes(uri.slice(found[0].length))], { type: found[1] }) : null;
}

export function base64Bytes(b64) {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

// The server's mask PNG (grayscale) -> {mask, width, height, blob}.
export async function decodeMask(pngBytes) {
  const blob = new Blob([pngBytes], { type: "image/png" });
  const { data, width, height } = await readPixels(blob);
  const mask = new Uint8Array(width * height);
  for (let i = 0, j = 0; j < mask.length; i += 4, j += 1) mask[j] = data[i];
  return { mask, width, height, blob };
}

export function countSelected(mask) {
  let n = 0;
  for (let i = 0; i < mask.length; i += 1) if (mask[i] >= 128) n += 1;
  return n;
}

// The mask grown by `radius` pixels: a pixel is selected iff its Euclidean distance to a selected pixel (>= 128)
// is <= radius (automask.postprocess.grow, exactly: squared distances are integers). Felzenszwalb & Huttenlocher's
// distance transform, on the selection's box widened by `radius` (no pixel farther out can be selected).
export function growMask(mask, width, height, radius) {
  let [x0, y0, x1, y1] = [width, height, -1, -1];
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) {
      if (mask[y * width + x] < 128) continue;
      if (x < x0) x0 = x;
      if (x > x1) x1 = x;
      if (y < y0) y0 = y;
      y1 = y;
    }
  }
  const out = new Uint8Array(mask.length);
  if (x1 < 0) return out;
  const r = Math.max(0, Math.floor(radius));
  [x0, y0] = [Math.max(0, x0 - r), Math.max(0, y0 - r)];
  [x1, y1] = [Math.min(width, x1 + 1 + r), Math.min(height, y1 + 1 + r)];
  const w = x1 - x0;
  const h = y1 - y0;
  const rowDist = rowDistances(mask, width, x0, y0, w, h); // squared, -1: no selected pixel in the row
  const v = new Int32Array(h); // the envelope's parabolas (their rows) ...
  const z = new Float64Array(h + 1); // ... and where each starts
  const f = (q, x) => rowDist[q * w + x];
  for (let x = 0; x < w; x += 1) {
    let k = -1;
    for (let q = 0; q < h; q += 1) {
      if (f(q, x) < 0) continue;
      let s = -Infinity;
      while (k >= 0) {
        s = (f(q, x) + q * q - (f(v[k], x) + v[k] * v[k])) / (2 * (q - v[k]));
        if (s > z[k]) break;
        k -= 1;
      }
      k += 1;
      v[k] = q;
      z[k] = k === 0 ? -Infinity : s;
      z[k + 1] = Infinity;
    }
    if (k < 0) continue;
    for (let y = 0, j = 0; y < h; y += 1) {
      while (z[j + 1] < y) j += 1;
      const d = (y - v[j]) * (y - v[j]) + f(v[j], x);
      if (d <= r * r) out[(y + y0) * width + x + x0] = 255;
    }
  }
  return out;
}

// Per row of the w×h box at (x0, y0): the squared distance to the nearest selected pixel of the same row, -1 if none.
function rowDistances(mask, width, x0, y0, w, h) {
  const out = new Float64Array(w * h);
  for (let y = 0; y < h; y += 1) {
    const row = (y + y0) * width + x0;
    let last = -Infinity;
    for (let x = 0; x < w; x += 1) {
      if (mask[row + x] >= 128) last = x;
      out[y * w + x] = x - last;
    }
    last = Infinity;
    for (let x = w - 1; x >= 0; x -= 1) {
      if (mask[row + x] >= 128) last = x;
      const d = Math.min(out[y * w + x], last - x);
      out[y * w + x] = Number.isFinite(d) ? d * d : -1;
    }
  }
  return out;
}

// The mask without the targets switched off: a pixel is cleared when a target that is off owns it and no target
// that is on does. `owners`: one mask per target (its instance mask grown as the server grew the selection).
export function withTargets(mask, owners, enabled) {
  if (enabled.every(Boolean)) return mask;
  const kept = new Uint8Array(mask.length);
  owners.forEach((own, i) => {
    if (enabled[i]) for (let j = 0; j < own.length; j += 1) kept[j] |= own[j];
  });
  const out = new Uint8Array(mask);
  owners.forEach((own, i) => {
    if (!enabled[i]) for (let j = 0; j < own.length; j += 1) if (own[j] && !kept[j]) out[j] = 0;
  });
  return out;
}

// The selection's border, `thickness` pixels wide inside the selection (H×W 0/1).
function edges(mask, width, height, thickness) {
  let edge = new Uint8Array(mask.length);
  const on = (x, y) => x >= 0 && y >= 0 && x < width && y < height && mask[y * width + x] >= 128;
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) {
      if (on(x, y) && !(on(x - 1, y) && on(x + 1, y) && on(x, y - 1) && on(x, y + 1))) edge[y * width + x] = 1;
    }
  }
  for (let t = 1; t < thickness; t += 1) {
    const grown = new Uint8Array(edge);
    for (let i = 0; i < edge.length; i += 1) {
      if (edge[i] || mask[i] < 128) continue;
      const x = i % width;
      if ((x > 0 && edge[i - 1]) || (x < width - 1 && edge[i + 1]) || edge[i - width] || edge[i + width]) grown[i] = 1;
    }
    edge = grown;
  }
  return edge;
}

// The overlay's tint layer (drawn over the image): RGB = `rgb`, alpha = mask × opacity, or the outline only.
export function tintLayer(mask, width, height, rgb, opacity, outline) {
  const layer = new ImageData(width, height);
  const d = layer.data;
  const line = outline ? edges(mask, width, height, Math.max(2, Math.round(Math.max(width, height) / 250))) : null;
  for (let i = 0, j = 0; j < mask.length; i += 4, j += 1) {
    d[i] = rgb[0];
    d[i + 1] = rgb[1];
    d[i + 2] = rgb[2];
    d[i + 3] = line ? line[j] * 255 : Math.round(mask[j] * opacity);
  }
  return layer;
}

// The mask as a grey image (for the "Mask" view), or as alpha over black (to cut an image out with a canvas).
export function maskLayer(mask, width, height, asAlpha = false) {
  const layer = new ImageData(width, height);
  const d = layer.data;
  for (let i = 0, j = 0; j < mask.length; i += 4, j += 1) {
    d[i] = d[i + 1] = d[i + 2] = asAlpha ? 0 : mask[j];
    d[i + 3] = asAlpha ? mask[j] : 255;
  }
  return layer;
}

// The cut-out: RGBA, the image's pixels with alpha = round(mask × the image's own alpha / 255), so what is
// transparent in the image stays so (automask.postprocess.render_alpha).
export function cutoutPixels(image, mask) {
  const out = new Uint8Array(mask.length * 4);
  for (let i = 0, j = 0; j < mask.length; i += 4, j += 1) {
    out[i] = image[i];
    out[i + 1] = image[i + 1];
    out[i + 2] = image[i + 2];
    out[i + 3] = Math.floor((mask[j] * image[i + 3] + 127) / 255);
  }
  return out;
}

// One channel of a pixel composited onto white, as the server decodes transparency (imageio.decode).
function onWhite(c, a) {
  return Math.floor((c * a + 255 * (255 - a) + 127) / 255);
}

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
}

// The server's preview: RGB, pixels (on white) blended towards PREVIEW_TINT by PREVIEW_OPACITY × mask / 255
// (automask.postprocess.render_preview: its float32 arithmetic and numpy's round-half-to-even included).
export function previewPixels(image, mask) {
  const f = Math.fround;
  const out = new Uint8Array(mask.length * 3);
  for (let i = 0, j = 0, k = 0; j < mask.length; i += 4, j += 1, k += 3) {
    const w = f(f(mask[j] / 255) * PREVIEW_OPACITY);
    for (let c = 0; c < 3; c += 1) {
      const v = onWhite(image[i + c], image[i + 3]);
      out[k + c] = mask[j] > 0 ? roundHalfEven(f(f(v * f(1 - w)) + f(PREVIEW_TINT[c] * w))) : v;
    }
  }
  return out;
}

// ---- PNG encoding ----------------------------------------------------------------------------------------

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n += 1) {
    let c = n;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i += 1) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i += 1) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

// A PNG of `pixels` (width*height*channels bytes; channels 1 = grey, 3 = RGB, 4 = RGBA), 8 bits per sample.
export async function encodePng(pixels, width, height, channels) {
  const colorType = { 1: 0, 3: 2, 4: 6 }[channels];
  const stride = width * channels;
  const raw = new Uint8Array((stride + 1) * height); // filter byte 0 (none) before each row
  for (let y = 0; y < height; y += 1) raw.set(pixels.subarray(y * stride, (y + 1) * stride), y * (stride + 1) + 1);
  const stream = new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate"));
  const idat = new Uint8Array(await new Response(stream).arrayBuffer());
  const header = new Uint8Array(13);
  const view = new DataView(header.buffer);
  view.setUint32(0, width);
  view.setUint32(4, height);
  header.set([8, colorType, 0, 0, 0], 8);
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  const parts = [signature, chunk("IHDR", header), chunk("IDAT", idat), chunk("IEND", new Uint8Array(0))];
  return new Blob(parts, { type: "image/png" });
}
