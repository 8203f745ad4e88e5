// chart.js: a small line chart and a sparkline on a canvas, with no charting library.

import { compact, cssVar } from "./ui.js";

/** Size a canvas's backing store to its CSS box times the device pixel ratio; returns
 *  { ctx, w, h } in CSS pixels, with the context scaled to match. */
function fit(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

/** A round upper bound for an axis: 1, 2, 5 times a power of ten. */
function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 4, 5, 6, 8, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

/** Colour from a CSS custom property name ("--accent") or a colour. */
function color(c) {
  return c.startsWith("--") ? cssVar(c) : c;
}

/**
 * A line chart of one or more series over the last `points` samples, one sample a second.
 *   const chart = new LineChart(canvas, { series: [{ name: "in", color: "--accent" }] });
 *   chart.push([12]);   // a value per series
 * The canvas carries its figures for tools and tests: data-last (the latest values) and
 * data-peak (the largest value shown); aria-label says the same in words.
 */
export class LineChart {
  constructor(canvas, { series, points = 120, format = compact, label = "" }) {
    this.canvas = canvas;
    this.series = series.map((s) => ({ ...s, values: [] }));
    this.points = points;
    this.format = format;
    this.label = label;
    new ResizeObserver(() => this.draw()).observe(canvas);
    matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => this.draw());
  }

  push(values) {
    this.series.forEach((s, i) => {
      s.values.push(values[i] ?? 0);
      if (s.values.length > this.points) s.values.shift();
    });
    this.draw();
  }

  clear() {
    for (const s of this.series) s.values = [];
    this.draw();
  }

  draw() {
    const { ctx, w, h } = fit(this.canvas);
    if (!w || !h) return;
    const peak = Math.max(0, ...this.series.flatMap((s) => s.values));
    const top = niceMax(peak * 1.1);
    const muted = cssVar("--muted");
    const grid = cssVar("--border");
    ctx.font = "11px " + cssVar("--sans");
    const labels = [0, 1, 2, 3, 4].map((i) => this.format((top * i) / 4));
    const labelWidth = Math.max(...labels.map((l) => ctx.measureText(l).width));
    const pad = { left: Math.ceil(labelWidth) + 12, right: 10, top: 10, bottom: 22 };
    const cw = w - pad.left - pad.right;
    const ch = h - pad.top - pad.bottom;

    // grid and y labels
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const y = pad.top + ch - (ch * i) / 4;
      ctx.strokeStyle = grid;
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(pad.left, Math.round(y) + 0.5);
      ctx.lineTo(w - pad.right, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillStyle = muted;
      ctx.fillText(labels[i], pad.left - 6, y);
    }
    // x labels: seconds ago
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = this.points / 4;
    for (let i = 0; i <= 4; i++) {
      const x = pad.left + (cw * i) / 4;
      const ago = Math.round(this.points - i * step);
      ctx.fillText(ago === 0 ? "now" : `-${ago}s`, Math.min(x, w - pad.right - 12), h - pad.bottom + 6);
    }

    const xOf = (i, n) => pad.left + cw - ((n - 1 - i) * cw) / (this.points - 1);
    const yOf = (v) => pad.top + ch - (v / top) * ch;

    for (const s of this.series) {
      const n = s.values.length;
      if (!n) continue;
      const c = color(s.color);
      // the area under the line, fading down
      const gradient = ctx.createLinearGradient(0, pad.top, 0, pad.top + ch);
      gradient.addColorStop(0, withAlpha(c, 0.22));
      gradient.addColorStop(1, withAlpha(c, 0));
      ctx.beginPath();
      ctx.moveTo(xOf(0, n), yOf(s.values[0]));
      for (let i = 1; i < n; i++) ctx.lineTo(xOf(i, n), yOf(s.values[i]));
      ctx.lineTo(xOf(n - 1, n), pad.top + ch);
      ctx.lineTo(xOf(0, n), pad.top + ch);
      ctx.closePath();
      ctx.fillStyle = gradient;
      ctx.fill();
      // the line
      ctx.beginPath();
      ctx.moveTo(xOf(0, n), yOf(s.values[0]));
      for (let i = 1; i < n; i++) ctx.lineTo(xOf(i, n), yOf(s.values[i]));
      ctx.strokeStyle = c;
      ctx.lineWidth = 2;
      ctx.lineJoin = "round";
      ctx.stroke();
      // the latest point
      ctx.beginPath();
      ctx.arc(xOf(n - 1, n), yOf(s.values[n - 1]), 3.5, 0, Math.PI * 2);
      ctx.fillStyle = c;
      ctx.fill();
    }

    const last = this.series.map((s) => s.values.at(-1) ?? 0);
    this.canvas.dataset.last = JSON.stringify(last);
    this.canvas.dataset.peak = String(peak);
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label",
      `${this.label}: ` + this.series.map((s, i) => `${s.name} ${this.format(last[i])}`).join(", "));
  }
}

/** Draw values as a sparkline filling the canvas, the last value at the right edge. */
export function sparkline(canvas, values, stroke = "--accent") {
  const { ctx, w, h } = fit(canvas);
  if (!w || !h || !values.length) return;
  const top = niceMax(Math.max(1, ...values));
  const c = color(stroke);
  const x = (i) => (i * (w - 4)) / Math.max(1, values.length - 1) + 2;
  const y = (v) => h - 3 - (v / top) * (h - 6);
  ctx.beginPath();
  ctx.moveTo(x(0), y(values[0]));
  values.forEach((v, i) => ctx.lineTo(x(i), y(v)));
  ctx.lineTo(x(values.length - 1), h);
  ctx.lineTo(x(0), h);
  ctx.closePath();
  ctx.fillStyle = withAlpha(c, 0.18);
  ctx.fill();
  ctx.beginPath();
  ctx.moveTo(x(0), y(values[0]));
  values.forEach((v, i) => ctx.lineTo(x(i), y(v)));
  ctx.strokeStyle = c;
  ctx.lineWidth = 1.6;
  ctx.lineJoin = "round";
  ctx.stroke();
  canvas.dataset.last = String(values.at(-1));
  canvas.dataset.peak = String(Math.max(...values));
}

/** A colour with an alpha, for "#rrggbb" and "rgb()" colours (others are returned as they are). */
function withAlpha(c, a) {
  let m = /^#([0-9a-f]{6})$/i.exec(c);
  if (m) {
    const n = parseInt(m[1], 16);
    return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${a})`;
  }
  m = /^rgba?\(([^,]+),([^,]+),([^,)]+)/.exec(c);
  if (m) return `rgba(${m[1]},${m[2]},${m[3]}, ${a})`;
  return c;
}
