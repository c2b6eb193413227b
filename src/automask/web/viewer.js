// The result viewer: the image with the rendered result over it, a before/after compare slider, zoom and pan.
//
// Layout: #viewport (overflow hidden, its height fitted to the image) holds #canvas-box, moved and sized in CSS
// pixels (translate + width/height = image size × zoom). In the box, #source (the image) lies under #after
// (the canvas the page renders); #after is clipped from the left by the compare share, #divider marks the edge.
// "Fit" shows the whole image, never larger than its native size.

import { uprightTransform } from "./orientation.js";
import { maskLayer, tintLayer } from "./render.js";

const MAX_ZOOM = 16;
const CHECKER = ["#ffffff", "#d6d9de"];

export class Viewer {
  constructor(els, onChange = () => {}) {
    this.els = els; // {viewport, box, img, canvas, divider, placeholder}
    this.onChange = onChange;
    this.width = 0;
    this.height = 0;
    this.turn = 1; // the orientation (1–8) #source is shown turned by (orientation.js), its size then upright
    this.zoom = 1;
    this.tx = 0;
    this.ty = 0;
    this.fitted = true;
    this.wire();
  }

  // ---- geometry ------------------------------------------------------------------------------------------

  // The image's size as shown: `turn` (orientation.js) turns #source (stored the other way up) to it.
  setSize(width, height, turn = 1) {
    this.width = width;
    this.height = height;
    this.turn = turn;
    this.els.box.hidden = false;
    this.els.placeholder.hidden = true;
    this.fit();
  }

  clear() {
    this.width = 0;
    this.els.box.hidden = true;
    this.els.placeholder.hidden = false;
    this.els.viewport.style.height = "";
  }

  maxHeight() {
    const value = Number.parseFloat(getComputedStyle(this.els.viewport).maxHeight);
    return Number.isFinite(value) ? value : 600;
  }

  // The viewport's borders, top and bottom (its height and max-height count them: box-sizing is border-box).
  frame() {
    const vp = this.els.viewport;
    return vp.offsetHeight - vp.clientHeight;
  }

  fitZoom() {
    const vw = this.els.viewport.clientWidth || 1;
    return Math.min(1, vw / this.width, (this.maxHeight() - this.frame()) / this.height);
  }

  fit() {
    this.fitted = true;
    this.layout();
  }

  zoomTo(zoom, cx = null, cy = null) {
    if (!this.width) return;
    const vp = this.els.viewport;
    const x = cx ?? vp.clientWidth / 2;
    const y = cy ?? vp.clientHeight / 2;
    const next = Math.min(MAX_ZOOM, Math.max(this.fitZoom(), zoom));
    // keep the image point under (x, y) where it is
    this.tx = x - ((x - this.tx) * next) / this.zoom;
    this.ty = y - ((y - this.ty) * next) / this.zoom;
    this.zoom = next;
    this.fitted = next <= this.fitZoom() + 1e-9;
    this.layout();
  }

  panBy(dx, dy) {
    this.tx += dx;
    this.ty += dy;
    this.layout();
  }

  layout() {
    if (!this.width) return;
    const vp = this.els.viewport;
    const fit = this.fitZoom();
    vp.style.height = `${Math.ceil(this.height * fit) + this.frame()}px`; // all of the image inside its borders
    if (this.fitted) this.zoom = fit;
    const vw = vp.clientWidth;
    const vh = vp.clientHeight;
    const bw = this.width * this.zoom;
    const bh = this.height * this.zoom;
    this.tx = bw <= vw ? (vw - bw) / 2 : Math.min(0, Math.max(vw - bw, this.tx));
    this.ty = bh <= vh ? (vh - bh) / 2 : Math.min(0, Math.max(vh - bh, this.ty));
    const box = this.els.box;
    box.style.width = `${bw}px`;
    box.style.height = `${bh}px`;
    // whole pixels on the screen: the image is never resampled by a fractional offset
    const r = vp.getBoundingClientRect();
    const x = Math.round(r.left + vp.clientLeft + this.tx) - (r.left + vp.clientLeft);
    const y = Math.round(r.top + vp.clientTop + this.ty) - (r.top + vp.clientTop);
    box.style.transform = `translate(${x}px, ${y}px)`;
    this.placeImage(bw, bh);
    vp.classList.toggle("zoomed", !this.fitted);
    this.onChange(this.zoom);
  }

  // #source, as stored (its box turned the other way for a quarter turn), turned upright over the bw×bh box.
  placeImage(bw, bh) {
    const { style } = this.els.img;
    if (this.turn === 1) {
      style.width = style.height = style.transform = style.transformOrigin = "";
      return;
    }
    const [w, h] = this.turn >= 5 ? [bh, bw] : [bw, bh];
    [style.width, style.height, style.transformOrigin] = [`${w}px`, `${h}px`, "0 0"];
    style.transform = `matrix(${uprightTransform(this.turn, w, h).matrix.join(", ")})`;
  }

  // #source drawn upright over the whole of the canvas `ctx`.
  drawImage(ctx) {
    const [w, h] = this.turn >= 5 ? [this.height, this.width] : [this.width, this.height];
    ctx.save();
    ctx.setTransform(...uprightTransform(this.turn, w, h).matrix);
    ctx.drawImage(this.els.img, 0, 0, w, h);
    ctx.restore();
  }

  setCompare(share) {
    const { canvas, divider } = this.els;
    canvas.style.clipPath = share > 0 ? `inset(0 0 0 ${share}%)` : "";
    divider.hidden = share <= 0 || share >= 100;
    divider.style.left = `${share}%`;
  }

  // ---- drawing -------------------------------------------------------------------------------------------

  // Draw the result over the image: show = "overlay" (tint layer over the image), "cutout" (the image where the
  // mask is, on a checkerboard) or "mask" (the mask in grey). `layers` are ImageData made by render.js.
  draw(show, layers) {
    const { canvas } = this.els;
    canvas.width = this.width;
    canvas.height = this.height;
    const ctx = canvas.getContext("2d");
    if (show === "mask") {
      ctx.putImageData(layers.mask, 0, 0);
    } else if (show === "cutout") {
      ctx.fillStyle = checker(ctx, Math.max(8, Math.round(Math.max(this.width, this.height) / 48)));
      ctx.fillRect(0, 0, this.width, this.height);
      const cut = scratch(this.width, this.height);
      const c = cut.getContext("2d");
      this.drawImage(c);
      c.globalCompositeOperation = "destination-in";
      c.drawImage(fromImageData(layers.alpha), 0, 0);
      ctx.drawImage(cut, 0, 0);
    } else {
      this.drawImage(ctx);
      ctx.drawImage(fromImageData(layers.tint), 0, 0);
    }
    canvas.hidden = false;
  }

  // Draw `mask` (width*height bytes, this image's size) as `show`; look: {tint: "#rrggbb", opacity 0-1, outline}.
  drawResult(mask, show, look) {
    const { width, height } = this;
    const layers = {};
    if (show === "mask") layers.mask = maskLayer(mask, width, height);
    else if (show === "cutout") layers.alpha = maskLayer(mask, width, height, true);
    else layers.tint = tintLayer(mask, width, height, hexToRgb(look.tint), look.opacity, look.outline);
    this.draw(show, layers);
  }

  hideResult() {
    this.els.canvas.hidden = true;
  }

  // ---- input ---------------------------------------------------------------------------------------------

  wire() {
    const vp = this.els.viewport;
    let drag = null;
    vp.addEventListener("pointerdown", (event) => {
      if (this.fitted || event.button !== 0) return;
      drag = { x: event.clientX, y: event.clientY };
      vp.setPointerCapture(event.pointerId);
    });
    vp.addEventListener("pointermove", (event) => {
      if (!drag) return;
      this.panBy(event.clientX - drag.x, event.clientY - drag.y);
      drag = { x: event.clientX, y: event.clientY };
    });
    const stop = () => {
      drag = null;
    };
    vp.addEventListener("pointerup", stop);
    vp.addEventListener("pointercancel", stop);
    vp.addEventListener(
      "wheel",
      (event) => {
        if (!this.width || (!event.ctrlKey && this.fitted)) return; // let the page scroll
        event.preventDefault();
        const r = vp.getBoundingClientRect();
        this.zoomTo(this.zoom * (event.deltaY < 0 ? 1.25 : 0.8), event.clientX - r.left, event.clientY - r.top);
      },
      { passive: false },
    );
    vp.addEventListener("keydown", (event) => this.key(event));
    const observer = new ResizeObserver(() => this.layout());
    observer.observe(vp);
    observer.observe(vp.closest("section") || vp); // an error or a note above the image moves it
  }

  key(event) {
    const step = 48;
    const actions = {
      "+": () => this.zoomTo(this.zoom * 1.25),
      "=": () => this.zoomTo(this.zoom * 1.25),
      "-": () => this.zoomTo(this.zoom * 0.8),
      0: () => this.fit(),
      1: () => this.zoomTo(1),
      ArrowLeft: () => this.panBy(step, 0),
      ArrowRight: () => this.panBy(-step, 0),
      ArrowUp: () => this.panBy(0, step),
      ArrowDown: () => this.panBy(0, -step),
    };
    const action = actions[event.key];
    if (!action || !this.width || (event.key.startsWith("Arrow") && this.fitted)) return;
    event.preventDefault();
    action();
  }
}

function hexToRgb(hex) {
  const n = Number.parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function scratch(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

function fromImageData(data) {
  const canvas = scratch(data.width, data.height);
  canvas.getContext("2d").putImageData(data, 0, 0);
  return canvas;
}

function checker(ctx, size) {
  const tile = scratch(size * 2, size * 2);
  const t = tile.getContext("2d");
  t.fillStyle = CHECKER[0];
  t.fillRect(0, 0, size * 2, size * 2);
  t.fillStyle = CHECKER[1];
  t.fillRect(0, 0, size, size);
  t.fillRect(size, size, size, size);
  return ctx.createPattern(tile, "repeat");
}
