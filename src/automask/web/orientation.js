// EXIF orientation that the server applies and a browser may not: a WebP's. Chromium turns a JPEG or PNG upright
// when it decodes it, but not a WebP (neither for <img> nor for createImageBitmap), while the server turns every
// image upright (automask.imageio.decode): the page turns such a WebP itself, so that what it shows and renders
// has the server's rows and columns.

// A 2×1 lossless WebP whose EXIF orientation is 6: a browser that applies WebP orientation decodes it as 1×2.
const PROBE = "UklGRk4AAABXRUJQVlA4WAoAAAAIAAAAAQAAAAAAVlA4TA4AAAAvAQAAAAcQEf0PRET/A0VYSUYaAAAATU0AKgAAAAgAAQESAAMAAAABAAYAAAAAAAA=";
let browserTurnsWebp = null;

async function turnsWebp() {
  browserTurnsWebp ??= (async () => {
    try {
      const bytes = Uint8Array.from(atob(PROBE), (c) => c.charCodeAt(0));
      const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/webp" }));
      bitmap.close();
      return bitmap.width === 1;
    } catch {
      return true; // no WebP here at all: nothing to turn
    }
  })();
  return browserTurnsWebp;
}

const ascii = (bytes, at, n) => String.fromCharCode(...bytes.subarray(at, at + n));

// The orientation (1–8) a blob's image has and this browser does not apply: a WebP's EXIF Orientation, else its
// XMP tiff:Orientation (as Pillow reads it); 1 for anything else, or when unreadable.
export async function orientationToApply(blob) {
  const head = new Uint8Array(await blob.slice(0, 12).arrayBuffer());
  if (head.length < 12 || ascii(head, 0, 4) !== "RIFF" || ascii(head, 8, 4) !== "WEBP") return 1;
  const chunks = await webpChunks(blob, ["EXIF", "XMP "]);
  let value = chunks.EXIF ? exifOrientation(chunks.EXIF) : null;
  if (value === null && chunks["XMP "]) {
    const found = /tiff:Orientation(="|>)([0-9])/.exec(new TextDecoder("latin1").decode(chunks["XMP "]));
    value = found ? Number(found[2]) : null;
  }
  if (!(value >= 2 && value <= 8) || (await turnsWebp())) return 1;
  return value;
}

// The data of a WebP's chunks named in `wanted` (RIFF: a fourcc, a little-endian size, the data, padded to even).
async function webpChunks(blob, wanted) {
  const found = {};
  for (let at = 12; at + 8 <= blob.size; ) {
    const head = new Uint8Array(await blob.slice(at, at + 8).arrayBuffer());
    const name = ascii(head, 0, 4);
    const size = new DataView(head.buffer).getUint32(4, true);
    if (wanted.includes(name)) found[name] = new Uint8Array(await blob.slice(at + 8, at + 8 + size).arrayBuffer());
    at += 8 + size + (size % 2);
  }
  return found;
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
