// The front page: the broker's figures and each demo's, live from channel "dashboard" (where the
// /dashboard route's script publishes them), and the messages of channel "news" as they are
// published. The page only receives, so it reads both channels through one feed: over the generic
// route /ws, or over Server-Sent Events where a WebSocket cannot get through (see herald.js).

import { showStatus, subscribe, wsURL } from "./herald.js";
import { compact, duration, el } from "./ui.js";

const figure = (scope, name) => scope.querySelector(`[data-fig="${name}"]`);
const set = (scope, name, value) => {
  const node = figure(scope, name);
  if (node) node.textContent = value;
};

let previous = null; // the previous set of figures, for per-route rates

// What each demo card shows: who is connected (the script route's clients) and a rate.
function routeFigures(stats) {
  const routes = Object.fromEntries(stats.routes.map((r) => [r.path, r]));
  const scripts = Object.fromEntries(stats.scripts.map((s) => [s.path, s]));
  const before = previous && Object.fromEntries(previous.routes.map((r) => [r.path, r]));
  const seconds = previous ? (stats.time - previous.time) / 1000 : 0;
  const rate = (path, field) => {
    if (!before || !before[path] || !routes[path] || seconds <= 0) return 0;
    return Math.max(0, (routes[path][field] - before[path][field]) / seconds);
  };
  const clients = (path) => (scripts[path] ? scripts[path].clients : 0);
  return {
    draw: { clients: clients("/draw"), rate: rate("/draw", "messages") },
    chat: { clients: clients("/chat"), rate: rate("/chat", "messages") },
    log: { clients: clients("/log"), rate: rate("/log", "deliver_calls") },
    dashboard: { clients: clients("/dashboard"), rate: stats.rates.messages_out },
    countdown: { clients: clients("/countdown"), timers: scripts["/countdown"]?.timers ?? 0 },
    echo: {
      rate: rate("/echo", "messages") + rate("/echo-lua", "messages"),
      total: (routes["/echo"]?.messages ?? 0) + (routes["/echo-lua"]?.messages ?? 0),
    },
  };
}

function showFigures(stats) {
  if (!stats || stats.type !== "stats") return;
  set(document, "connections", compact(stats.connections));
  set(document, "channels", compact(stats.channels));
  set(document, "in", compact(stats.rates.messages_in));
  set(document, "out", compact(stats.rates.messages_out));
  set(document, "uptime", duration(stats.uptime_s));
  const demos = routeFigures(stats);
  for (const card of document.querySelectorAll("[data-demo]")) {
    for (const [name, value] of Object.entries(demos[card.dataset.demo] || {})) {
      set(card, name, compact(Math.round(value * 10) / 10));
    }
  }
  previous = stats;
}

const list = document.querySelector("#news");

function showNews(data) {
  if (list.querySelector(".muted")) list.replaceChildren();
  const text = typeof data === "string" ? data : JSON.stringify(data);
  list.prepend(el("li", { class: "line in" },
    el("span", { class: "dir" }, "←"),
    el("span", { class: "text" }, text),
    el("span", { class: "rtt" }, new Date().toLocaleTimeString())));
  while (list.children.length > 5) list.lastElementChild.remove();
}

const feed = subscribe(["dashboard", "news"], ({ channel, data }) => {
  if (channel === "dashboard") showFigures(data);
  else showNews(data);
});
showStatus(feed, document.querySelector("#status"));
feed.on("open", () => (previous = null));

// The shell command, with this server's address, and the channel it publishes to.
for (const code of document.querySelectorAll("#curl, #js")) {
  code.textContent = code.textContent.replace("http://127.0.0.1:8080", location.origin)
    .replace("ws://127.0.0.1:8080", wsURL("/").slice(0, -1));
}

