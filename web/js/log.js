// Live log: the access log as herald tails it, parsed into columns by the /log route
// (scripts/logstream.lua). Newest first, at most MAX_ROWS rows kept.

import { connect, showStatus } from "./herald.js";
import { sparkline } from "./chart.js";
import { bytes, compact, el } from "./ui.js";

const MAX_ROWS = 500;
const SPARK_SECONDS = 60;

const $ = (sel) => document.querySelector(sel);
const tbody = $("#rows");
const filterInput = $("#filter");
const pauseButton = $("#pause");

const WAITING = $("#empty").textContent;
const rows = [];          // { tr, text, cls }, newest first
let held = [];            // lines that came while paused, oldest first
let paused = false;
let total = 0;
let errors = 0;
const classes = new Set(["1", "2", "3", "4", "5"]); // status classes shown
const perSecond = new Array(SPARK_SECONDS).fill(0); // lines that arrived in each of the last seconds

// --- one row per line ---------------------------------------------------------------------------

function timeOf(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleTimeString([], { hour12: false });
}

function makeRow(line) {
  if (line.raw !== undefined) {
    const tr = el("tr", { class: "raw" }, el("td", { colspan: 7, class: "path" }, line.raw));
    return { tr, text: line.raw.toLowerCase(), cls: "" };
  }
  const cls = String(line.status)[0];
  const tr = el("tr", { class: "s" + cls },
    el("td", { title: line.time }, timeOf(line.time)),
    el("td", { class: "client" }, line.client),
    el("td", {}, el("span", { class: "method" }, line.method)),
    el("td", { class: "path", title: line.path }, line.path),
    el("td", {}, el("span", { class: "code" }, String(line.status))),
    el("td", { class: "num" }, bytes(line.bytes)),
    el("td", { class: "agent", title: line.agent }, line.agent));
  const text = [line.time, line.client, line.user, line.method, line.path, line.protocol, line.status,
    line.referrer, line.agent].join(" ").toLowerCase();
  return { tr, text, cls };
}

function visible(row) {
  const words = filterInput.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  return (row.cls === "" || classes.has(row.cls)) && words.every((w) => row.text.includes(w));
}

function add(line, fresh) {
  const row = makeRow(line);
  row.tr.hidden = !visible(row);
  if (fresh) row.tr.classList.add("fresh");
  tbody.prepend(row.tr);
  rows.unshift(row);
  while (rows.length > MAX_ROWS) rows.pop().tr.remove();
}

function refilter() {
  for (const row of rows) row.tr.hidden = !visible(row);
  showCounts();
}

function showCounts() {
  const shown = rows.filter((r) => !r.tr.hidden).length;
  $("#empty").hidden = shown > 0;
  $("#empty").textContent = rows.length ? "No row matches the filter." : WAITING;
  $("#shown").textContent = rows.length
    ? `${shown} of ${rows.length} rows shown (the newest ${MAX_ROWS} are kept)` +
      (paused ? ` · paused, ${held.length} new waiting` : "")
    : "";
  $("#total").textContent = compact(total);
  $("#errors").textContent = compact(errors);
}

// --- the feed ---------------------------------------------------------------------------------------

// A WebSocket only, no Server-Sent Events fallback: the rows are parsed by the script's deliver
// hook for this route's clients, and an event stream gets the channel's raw lines instead.
const conn = connect("/log");
showStatus(conn, $("#status"));
conn.on("message", (line) => {
  if (typeof line !== "object" || line === null) return;
  total++;
  perSecond[perSecond.length - 1]++;
  if (line.status >= 400) errors++;
  if (paused) {
    held.push(line);
    if (held.length > MAX_ROWS) held.shift();
    pauseButton.textContent = `Resume (${held.length} new)`;
  } else {
    add(line, true);
  }
  showCounts();
});

// The sparkline moves on once a second; the figure is the last whole second.
setInterval(() => {
  $("#rps").textContent = compact(perSecond[perSecond.length - 1]);
  perSecond.shift();
  perSecond.push(0);
  sparkline($("#spark"), perSecond.slice(0, -1));
}, 1000);
sparkline($("#spark"), perSecond.slice(0, -1));

// --- tools --------------------------------------------------------------------------------------------

filterInput.addEventListener("input", refilter);

for (const button of document.querySelectorAll(".chip-toggle")) {
  button.addEventListener("click", () => {
    const on = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(on));
    if (on) classes.add(button.dataset.class);
    else classes.delete(button.dataset.class);
    refilter();
  });
}

pauseButton.addEventListener("click", () => {
  paused = !paused;
  pauseButton.setAttribute("aria-pressed", String(paused));
  if (!paused) {
    for (const line of held) add(line, true);
    held = [];
  }
  pauseButton.textContent = paused ? "Resume (0 new)" : "Pause";
  showCounts();
});

// A few requests of different kinds to this server: each becomes a line of its access log.
$("#traffic").addEventListener("click", async () => {
  const requests = [
    ["GET", "/"], ["GET", "/stats"], ["GET", "/metrics"], ["GET", "/css/herald.css"],
    ["GET", "/no-such-page"], ["POST", "/pub/demo"], ["GET", "/pub/demo"], ["GET", "/css"],
    ["GET", "/stats"], ["HEAD", "/"],
  ];
  await Promise.all(requests.map(([method, path]) =>
    fetch(path, { method, cache: "no-store", body: method === "POST" ? "hello from the log page" : undefined })
      .catch(() => {})));
});

showCounts();
