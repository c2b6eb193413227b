// Reading an image file's structure without decoding it: JPEG's segments (up to its scan) and WebP's RIFF chunks.

export const ascii = (bytes, at, n) => String.fromCharCode(...bytes.subarray(at, at + n));
export const HEAD_BYTES = 1 << 20; // JPEG's segments before its scan lie well within this

// The segments of a JPEG's first bytes (`head`) before its scan, as {marker, at, size} (`at`: the marker's offset;
// `size`: the segment's length field), and then {marker: 0xda}; a marker out of place or a truncated head ends it
// with {marker: null} (not understood).
export function* jpegSegments(head) {
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  let at = 2;
  while (at + 4 <= head.length) {
    if (head[at] !== 0xff) break;
    const marker = head[at + 1];
    if (marker === 0xff) {
      at += 1; // fill byte
      continue;
    }
    if (marker === 0xda) {
      yield { marker };
      return;
    }
    const size = view.getUint16(at + 2);
    yield { marker, at, size };
    at += 2 + size;
  }
  yield { marker: null };
}

// The data of a WebP's chunks named in `wanted` (RIFF: a fourcc, a little-endian size, the data, padded to even).
export async function webpChunks(blob, wanted) {
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
