// Whether an image file may carry colour information a browser would convert by (an ICC profile, PNG's sRGB, gAMA,
// cHRM or cICP chunks): only then can its colour-managed decode differ from its stored values, and only then does
// render.imagePixels decode it a second time to compare. Read from the file's first bytes; any format or
// structure not known here may carry some.

import { HEAD_BYTES, ascii, jpegSegments } from "./segments.js";

// PNG chunks that say nothing of colour (their presence before IDAT leaves the decode unmanaged).
const PNG_PLAIN = new Set(["IHDR", "PLTE", "tRNS", "pHYs", "tEXt", "zTXt", "iTXt", "tIME", "bKGD", "sBIT", "eXIf"]);

export async function mayCarryColours(blob) {
  const head = new Uint8Array(await blob.slice(0, HEAD_BYTES).arrayBuffer());
  if (head[0] === 0xff && head[1] === 0xd8) return jpegColours(head);
  if (ascii(head, 1, 3) === "PNG") return pngColours(head);
  if (ascii(head, 0, 4) === "RIFF" && ascii(head, 8, 4) === "WEBP") return webpColours(head);
  return true;
}

// A JPEG's segments up to its scan (where a decoder stops reading them): an APP2 ICC_PROFILE segment, a frame of
// other than 1 or 3 components (CMYK, converted by each decoder its own way), or segments not read to their end.
function jpegColours(head) {
  for (const { marker, at } of jpegSegments(head)) {
    if (marker === null) return true;
    if (marker === 0xda) return false;
    const frame = marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker);
    if (frame && head[at + 9] !== 1 && head[at + 9] !== 3) return true;
    if (marker === 0xe2 && ascii(head, at + 4, 12) === "ICC_PROFILE\0") return true;
  }
  return true;
}

// A PNG's chunks before its pixels: any not known to say nothing of colour.
function pngColours(head) {
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  for (let at = 8; at + 8 <= head.length; ) {
    const name = ascii(head, at + 4, 4);
    if (name === "IDAT") return false;
    if (!PNG_PLAIN.has(name)) return true;
    at += 12 + view.getUint32(at);
  }
  return true;
}

// A WebP: the extended format's ICC flag, or an ICCP chunk after its VP8X header; the simple formats have none.
function webpColours(head) {
  const first = ascii(head, 12, 4);
  if (first === "VP8 " || first === "VP8L") return false;
  return first !== "VP8X" || (head[20] & 0x20) !== 0 || ascii(head, 30, 4) === "ICCP";
}
