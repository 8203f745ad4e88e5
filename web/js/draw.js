// Draw: a shared canvas on the /draw route (scripts/draw.lua).
//
// The picture lives in a fixed world of WORLD_W x WORLD_H units, fitted into the window, so every
// browser shows the same picture whatever its size. A stroke is sent in pieces: the points
// gathered in the last SEND_MS milliseconds, each piece starting at the last point of the one
// before, so a fast hand sends about 30 messages a second, not one per pixel.

import { connect, showStatus, toast } from "./herald.js";
import { cssVar } from "./ui.js";

const WORLD_W = 1600;
const WORLD_H = 1000;
const SEND_MS = 30;
const MAX_POINTS = 1000; // per message (the script's limit)
const COLORS = ["#1f2937", "#e4572e", "#f59e0b", "#22c55e", "#0ea5e9", "#6d5efc", "#ec4899", "#ffffff"];

const room = new URLSearchParams(location.search).get("room") || "default";
const canvas = document.querySelector("#board");
const ctx = canvas.getContext("2d");
const info = document.querySelector("#info");

// --- the pen ------------------------------------------------------------------------------------

const pen = { color: COLORS[1], width: 5 };
const swatches = document.querySelector("#swatches");
const custom = document.querySelector("#custom");
const widthInput = document.querySelector("#width");
const widthDot = document.querySelector("#width-dot");

function choose(color) {
  pen.color = color;
  for (const b of swatches.children) b.setAttribute("aria-pressed", String(b.dataset.color === color));
  widthDot.style.background = color;
}
for (const color of COLORS) {
  const b = document.createElement("button");
  b.className = "swatch";
  b.dataset.color = color;
  b.style.setProperty("--c", color);
  b.title = b.ariaLabel = "colour " + color;
  b.addEventListener("click", () => choose(color));
  swatches.append(b);
}
custom.addEventListener("input", () => choose(custom.value));
function setWidth() {
  pen.width = Number(widthInput.value);
  const px = Math.max(6, Math.min(26, pen.width * view.scale * 1.5));
  widthDot.style.width = widthDot.style.height = px + "px";
}
widthInput.addEventListener("input", setWidth);

// --- the picture -----------------------------------------------------------------------------------

let strokes = []; // every piece drawn, oldest first: { points: [[x, y], ...], color, width }
const view = { scale: 1, x: 0, y: 0, dpr: 1 }; // world -> CSS pixels: x * scale + view.x

function layout() {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const toolbar = document.querySelector(".toolbar").offsetHeight + 28;
  const margin = w < 600 ? 8 : 24;
  const scale = Math.min((w - 2 * margin) / WORLD_W, (h - margin - toolbar) / WORLD_H);
  Object.assign(view, {
    dpr,
    scale: Math.max(scale, 0.05),
    x: (w - WORLD_W * scale) / 2,
    y: Math.max(margin, (h - toolbar - WORLD_H * scale) / 2),
  });
  setWidth();
  redraw();
}

/** Draw one piece: a curve through the midpoints of its points, smooth however fast the hand. */
function drawPiece({ points, color, width }) {
  ctx.strokeStyle = ctx.fillStyle = color;
  ctx.lineWidth = width;
  ctx.lineCap = ctx.lineJoin = "round";
  const [x0, y0] = points[0];
  if (points.length === 1) {
    ctx.beginPath();
    ctx.arc(x0, y0, width / 2, 0, Math.PI * 2);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(x0, y0);
  for (let i = 1; i < points.length - 1; i++) {
    const [x, y] = points[i];
    const [nx, ny] = points[i + 1];
    ctx.quadraticCurveTo(x, y, (x + nx) / 2, (y + ny) / 2);
  }
  const [lx, ly] = points[points.length - 1];
  ctx.lineTo(lx, ly);
  ctx.stroke();
}

/** Set the context to draw in world units, clipped to the paper. */
function worldTransform() {
  const { dpr, scale, x, y } = view;
  ctx.setTransform(dpr * scale, 0, 0, dpr * scale, dpr * x, dpr * y);
}

function redraw() {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = cssVar("--bg");
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  worldTransform();
  ctx.save();
  ctx.shadowColor = "rgba(0, 0, 0, 0.18)";
  ctx.shadowBlur = 18 / view.scale;
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, WORLD_W, WORLD_H);
  ctx.restore();
  ctx.save();
  ctx.beginPath();
  ctx.rect(0, 0, WORLD_W, WORLD_H);
  ctx.clip();
  for (const piece of strokes) drawPiece(piece);
  if (live) drawPiece(live);
  ctx.restore();
  showInfo();
}

/** Draw a piece on top of what is there (clipped to the paper). */
function paint(piece) {
  worldTransform();
  ctx.save();
  ctx.beginPath();
  ctx.rect(0, 0, WORLD_W, WORLD_H);
  ctx.clip();
  drawPiece(piece);
  ctx.restore();
}

function showInfo() {
  info.textContent = `room ${room} · ${strokes.length} piece${strokes.length === 1 ? "" : "s"}`;
}

// --- drawing with a pointer -----------------------------------------------------------------------

let live = null;     // the stroke being drawn here: all its points, for drawing it smoothly
let sent = 0;        // how many of live.points have been sent (or queued)
let pointerId = null;
let sendTimer = 0;
let outbox = [];     // pieces drawn while the connection was down, sent when it is back

function toWorld(e) {
  const r = canvas.getBoundingClientRect();
  const x = (e.clientX - r.left - view.x) / view.scale;
  const y = (e.clientY - r.top - view.y) / view.scale;
  return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

canvas.addEventListener("pointerdown", (e) => {
  if (pointerId !== null || (e.pointerType === "mouse" && e.button !== 0)) return;
  pointerId = e.pointerId;
  canvas.setPointerCapture(e.pointerId);
  live = { points: [toWorld(e)], color: pen.color, width: pen.width };
  sent = 0;
  paint({ ...live });
  sendTimer = setInterval(sendPending, SEND_MS);
  e.preventDefault();
});

canvas.addEventListener("pointermove", (e) => {
  if (e.pointerId !== pointerId || !live) return;
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
  for (const ev of events.length ? events : [e]) {
    const p = toWorld(ev);
    const pts = live.points;
    const [lx, ly] = pts[pts.length - 1];
    if (Math.hypot(p[0] - lx, p[1] - ly) < 1) continue; // under a world unit: not worth a point
    pts.push(p);
    // Draw just the new part: from the last midpoint, around the last point, to the new midpoint.
    const n = pts.length;
    const a = n > 2 ? mid(pts[n - 3], pts[n - 2]) : pts[n - 2];
    const b = mid(pts[n - 2], pts[n - 1]);
    worldTransform();
    ctx.save();
    ctx.beginPath();
    ctx.rect(0, 0, WORLD_W, WORLD_H);
    ctx.clip();
    ctx.strokeStyle = live.color;
    ctx.lineWidth = live.width;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a[0], a[1]);
    ctx.quadraticCurveTo(pts[n - 2][0], pts[n - 2][1], b[0], b[1]);
    ctx.stroke();
    ctx.restore();
  }
});

function mid(p, q) {
  return [(p[0] + q[0]) / 2, (p[1] + q[1]) / 2];
}

function endStroke(e) {
  if (e.pointerId !== pointerId) return;
  pointerId = null;
  clearInterval(sendTimer);
  sendPending();
  live = null;
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

/** Send the points gathered since the last piece, as a piece that starts where that one ended. */
function sendPending() {
  if (!live) return;
  const pts = live.points;
  const first = sent === 0 ? 0 : sent - 1;
  if (sent === pts.length || (sent > 0 && pts.length - first < 2)) return;
  for (let start = first; start < pts.length - 1 || start === first; start += MAX_POINTS - 1) {
    const piece = { points: pts.slice(start, start + MAX_POINTS), color: live.color, width: live.width };
    strokes.push(piece);
    if (!conn.send({ type: "stroke", ...piece })) outbox.push(piece);
    if (start + MAX_POINTS >= pts.length) break;
  }
  sent = pts.length;
  showInfo();
}

// --- the connection ----------------------------------------------------------------------------------

// A WebSocket only, no Server-Sent Events fallback: the page sends strokes, and the script
// answers each joiner with the room's picture.
const conn = connect("/draw?room=" + encodeURIComponent(room));
showStatus(conn, document.querySelector("#status"));
let myId = null;
let replaying = 0; // strokes of the history still to come after a welcome

conn.on("message", (msg) => {
  switch (msg.type) {
    case "welcome":
      // The server's picture is the truth: start again from it.
      myId = msg.id;
      strokes = [];
      replaying = msg.strokes;
      redraw();
      if (!replaying) resend();
      break;
    case "stroke":
      if (replaying > 0) {
        strokes.push(msg);
        paint(msg);
        if (--replaying === 0) resend();
      } else if (msg.id !== myId) {
        strokes.push(msg);
        paint(msg);
      }
      showInfo();
      break;
    case "clear":
      if (msg.id !== myId) {
        strokes = [];
        redraw();
        toast("Someone cleared the canvas");
      }
      break;
    case "error":
      toast("The server said: " + msg.error, { kind: "bad" });
      break;
  }
});

/** After the history: draw and send what was drawn while offline. */
function resend() {
  const pieces = outbox;
  outbox = [];
  for (const piece of pieces) {
    strokes.push(piece);
    paint(piece);
    if (!conn.send({ type: "stroke", ...piece })) outbox.push(piece);
  }
  showInfo();
}

document.querySelector("#clear").addEventListener("click", () => {
  strokes = [];
  outbox = [];
  redraw();
  if (!conn.send({ type: "clear" })) toast("Offline: cleared here only", { kind: "bad" });
});

new ResizeObserver(layout).observe(canvas);
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", redraw);
choose(pen.color);
layout();
