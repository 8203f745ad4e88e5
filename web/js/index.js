// The front page: the broker's figures and each demo's, live from the /dashboard route, and the
// messages of channel "news" as they are published.

import { connect, showStatus, wsURL } from "./herald.js";
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

const dashboard = connect("/dashboard");
showStatus(dashboard, document.querySelector("#status"));
dashboard.on("open", () => (previous = null));
dashboard.on("message", (stats) => {
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
});

// The shell command, with this server's address, and the channel it publishes to.
for (const code of document.querySelectorAll("#curl, #js")) {
  code.textContent = code.textContent.replace("http://127.0.0.1:8080", location.origin)
    .replace("ws://127.0.0.1:8080", wsURL("/").slice(0, -1));
}

const list = document.querySelector("#news");
const news = connect("/sub/news", { json: false });
news.on("message", (data) => {
  if (list.querySelector(".muted")) list.replaceChildren();
  const text = typeof data === "string" ? data : `(${data.byteLength} bytes of binary)`;
  list.prepend(el("li", { class: "line in" },
    el("span", { class: "dir" }, "←"),
    el("span", { class: "text" }, text),
    el("span", { class: "rtt" }, new Date().toLocaleTimeString())));
  while (list.children.length > 5) list.lastElementChild.remove();
});
