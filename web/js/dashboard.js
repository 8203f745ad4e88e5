// Dashboard: the broker's figures from the /dashboard route (scripts/dashboard.lua), once a
// second, as tiles, line charts and a table of routes.

import { connect, showStatus, toast } from "./herald.js";
import { LineChart } from "./chart.js";
import { bytes, compact, duration, el } from "./ui.js";

const $ = (sel) => document.querySelector(sel);
const set = (name, value) => ($(`[data-fig="${name}"]`).textContent = value);
const perSecond = (format) => (v) => format(v) + "/s";

const charts = {
  connections: new LineChart($("#chart-connections"), {
    label: "connections",
    series: [{ name: "all", color: "--accent" }, { name: "websockets", color: "--accent-2" }],
  }),
  messages: new LineChart($("#chart-messages"), {
    label: "messages per second",
    series: [{ name: "in", color: "--accent" }, { name: "out", color: "--accent-2" }],
  }),
  bytes: new LineChart($("#chart-bytes"), {
    label: "bytes per second",
    format: perSecond(bytes),
    series: [{ name: "out", color: "--warn" }, { name: "in", color: "--info" }],
  }),
  http: new LineChart($("#chart-http"), {
    label: "HTTP requests per second",
    series: [{ name: "requests", color: "--ok" }],
  }),
};

function show(stats) {
  const r = stats.rates;
  set("connections", compact(stats.connections));
  set("websockets", compact(stats.websockets));
  set("channels", compact(stats.channels));
  set("subscriptions", compact(stats.subscriptions));
  set("in", compact(r.messages_in));
  set("out", compact(r.messages_out));
  $("#uptime").textContent = duration(stats.uptime_s);
  charts.connections.push([stats.connections, stats.websockets]);
  charts.messages.push([r.messages_in, r.messages_out]);
  charts.bytes.push([r.bytes_out, r.bytes_in]);
  charts.http.push([r.http_requests]);

  const scripts = Object.fromEntries((stats.scripts || []).map((s) => [s.path, s]));
  $("#routes").replaceChildren(...stats.routes.map((route) => {
    const s = scripts[route.path];
    return el("tr", {},
      el("td", {}, el("code", {}, route.path)),
      el("td", {}, s ? el("span", { title: s.script }, "Lua") : route.kind),
      el("td", { class: "num" }, s ? compact(s.clients) : "–"),
      el("td", { class: "num" }, compact(route.messages)),
      el("td", { class: "num" }, compact(route.deliver_calls)),
      el("td", { class: "num" }, s ? compact(s.errors) : "–"),
      el("td", { class: "num" }, s ? bytes(s.memory) : "–"));
  }));
}

// A WebSocket to the Lua route, which sends the latest figures at once on open (the front page
// reads the same channel through subscribe(), with its Server-Sent Events fallback); the load
// button below publishes, which needs a WebSocket anyway.
const conn = connect("/dashboard");
showStatus(conn, $("#status"));
conn.on("message", (msg) => {
  if (msg && msg.type === "stats") show(msg);
});

// Some load to watch: three subscribers of channel "load" on the raw route, and a publisher on
// the generic route sending 200 messages a second for 5 seconds.
$("#load").addEventListener("click", () => {
  const button = $("#load");
  button.disabled = true;
  const subscribers = [1, 2, 3].map(() => connect("/sub/load", { json: false }));
  const publisher = connect("/ws");
  let sent = 0;
  let ticks = 0;
  const timer = setInterval(() => {
    for (let i = 0; i < 20; i++) {
      if (publisher.send({ op: "publish", channel: "load", data: { n: sent, at: Date.now() } })) sent++;
    }
    if (++ticks === 50) {
      clearInterval(timer);
      setTimeout(() => {
        publisher.close();
        subscribers.forEach((s) => s.close());
        button.disabled = false;
        toast(`Published ${sent} messages to 3 subscribers`);
      }, 500);
    }
  }, 100);
});
