// herald.js: the connection code every demo page shares.
//
// connect(path): a WebSocket to one route, for pages that send as well as receive (the Lua
// routes: chat, draw, echo, ...):
//
//   import { connect, showStatus } from "./js/herald.js";
//   const conn = connect("/chat?room=lobby");
//   conn.on("open", ({ reconnected }) => { ... });
//   conn.on("message", (msg) => { ... });  // JSON text arrives parsed, anything else as is
//   conn.send({ type: "message", text: "hi" }); // an object is sent as JSON; false when offline
//   showStatus(conn, document.querySelector("#status"));
//
// subscribe(channels, onMessage): the messages of channels, for pages that only receive them.
// Each message is { channel, seq, data }, data being the published JSON value (or a string holding
// a payload that is not JSON), whichever way it came:
//
//   import { subscribe, showStatus } from "./js/herald.js";
//   const feed = subscribe(["news"], ({ channel, seq, data }) => { ... });
//   showStatus(feed, document.querySelector("#status"));  // says "live · WebSocket" or "live · SSE"
//
// A feed speaks the generic route's JSON protocol (/ws) over a WebSocket, or reads the same
// channels as Server-Sent Events (/sse/?channels=a,b) where a WebSocket cannot be had:
// - the browser has no WebSocket, or the page's address says ?transport=sse (for users behind a
//   proxy that breaks WebSockets, and for tests; ?transport=websocket never falls back);
// - or WebSocket handshakes fail twice in a row while no WebSocket of this feed has ever opened
//   (a proxy that strips the Upgrade header, say). The next try is then an event stream, at once.
//   If the stream opens, the feed stays on it for the page's life: whatever broke the handshakes
//   is still there, and failing them again every time would only delay each reconnection; a
//   reload tries WebSocket again. If the stream fails too, the server itself is out of reach, and
//   the tries go on, WebSocket first again. A feed whose WebSocket has opened once treats later
//   failures as the broker being away (a restart), never as a reason to fall back.
// Either way a feed resumes where it was: it keeps the epoch and seq of the last message of each
// channel and, on a reconnection, asks for what it missed (since/epoch on /ws; last_event_id on
// the event stream, one id per channel, so every channel with a history is resumed, not only
// the one whose event came last as with EventSource's own Last-Event-ID). Channels with a
// history rule on the broker get the messages published meanwhile, in order, once each; others
// go on from the live messages. (A feed that has seen nothing of a channel yet over the event
// stream does not know its epoch, so nothing is replayed for that channel.)
//
// Pages driven by a Lua route (chat, draw, log, dashboard, countdown, echo) use connect(): their
// scripts answer what the client sends, or shape each message for the route's own clients in a
// deliver hook that an event stream does not go through, so they need a WebSocket.
//
// Either comes back by itself after a drop: the next try is 0.5 s later, then 1, 2, 4 and at
// most 8 s apart (each with some jitter, so that the pages of a restarted broker do not all knock
// at once), until close() is called. Coming back online or to the tab tries again at once.

/** The ws:// (or wss://) URL of a path on the server that served the page. */
export function wsURL(path) {
  const url = new URL(path, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/** " · permessage-deflate" (say) when a WebSocket negotiated an extension. */
const extensionsOf = (ws) => (ws && ws.extensions ? " · " + ws.extensions.split(";")[0] : "");

/** What a connection and a feed share: a state, events, and tries again with backoff. */
class Retrying {
  constructor({ minDelay = 500, maxDelay = 8000 } = {}) {
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    // "connecting" until the first open, "open", "reconnecting" after a drop, "closed" by close()
    this.state = "connecting";
    this.attempt = 0;       // failed tries since the last open
    this.reconnects = 0;    // times the connection came back after a drop
    this.retryAt = 0;       // when the next try is due (ms since the epoch), 0 while trying
    this.timer = 0;
    this.handlers = {};
    this.everOpened = false;
    this.retryNow = this.retryNow.bind(this);
    this.onVisible = () => {
      if (document.visibilityState === "visible") this.retryNow();
    };
    addEventListener("online", this.retryNow);
    document.addEventListener("visibilitychange", this.onVisible);
  }

  /** Call fn for an event: "open" ({reconnected}), "message", "close" ({code, reason}),
   *  "state" (the connection itself, whenever state, attempt, retryAt or transport change). */
  on(event, fn) {
    (this.handlers[event] ||= []).push(fn);
    return this;
  }

  emit(event, arg) {
    for (const fn of this.handlers[event] || []) fn(arg);
  }

  setState(state) {
    this.state = state;
    this.emit("state", this);
  }

  /** A try begins now. */
  begin() {
    clearTimeout(this.timer);
    this.retryAt = 0;
  }

  /** The try succeeded. */
  opened() {
    const reconnected = this.everOpened;
    if (reconnected) this.reconnects++;
    this.everOpened = true;
    this.attempt = 0;
    this.setState("open");
    this.emit("open", { reconnected });
  }

  /** The connection went away, or the try failed: say so if it was open, and try again later. */
  dropped(code, reason) {
    if (this.state === "closed") return;
    if (this.state === "open") this.emit("close", { code, reason });
    this.schedule();
  }

  schedule() {
    const delay = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt) * (0.8 + Math.random() * 0.4);
    this.attempt++;
    this.retryAt = Date.now() + delay;
    this.timer = setTimeout(() => this.open(), delay);
    this.setState(this.everOpened ? "reconnecting" : "connecting");
  }

  /** Try at once if a try is waiting. */
  retryNow() {
    if (this.retryAt && this.state !== "closed") this.open();
  }

  /** Close for good. */
  close() {
    clearTimeout(this.timer);
    this.retryAt = 0;
    this.setState("closed");
    removeEventListener("online", this.retryNow);
    document.removeEventListener("visibilitychange", this.onVisible);
    this.shut();
  }
}

export class Connection extends Retrying {
  /**
   * path: the route, e.g. "/chat?room=lobby". Options: json (parse text messages as JSON when
   * they are, default true), minDelay and maxDelay of the retries in ms.
   */
  constructor(path, { json = true, ...retries } = {}) {
    super(retries);
    this.path = path;
    this.json = json;
    this.transport = "websocket";
    this.ws = null;
    this.open();
  }

  /** What the connection is, for a tooltip (with the extension negotiated, if any). */
  get description() {
    return `WebSocket ${this.path}${extensionsOf(this.ws)}`;
  }

  open() {
    this.begin();
    const ws = new WebSocket(wsURL(this.path));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.emit("state", this);
    ws.onopen = () => this.opened();
    ws.onmessage = (event) => {
      let data = event.data;
      if (this.json && typeof data === "string") {
        try {
          data = JSON.parse(data);
        } catch {
          // not JSON: pass the text on as it is
        }
      }
      this.emit("message", data);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return; // an old socket, replaced by retarget() or closed by close()
      this.ws = null;
      this.dropped(event.code, event.reason);
    };
  }

  /** Send a string, an ArrayBuffer or a typed array, or an object as JSON. False if not open. */
  send(data) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    if (typeof data === "object" && !(data instanceof ArrayBuffer) && !ArrayBuffer.isView(data) && !(data instanceof Blob)) {
      data = JSON.stringify(data);
    }
    this.ws.send(data);
    return true;
  }

  /** Bytes queued in the browser, not yet sent. */
  get buffered() {
    return this.ws ? this.ws.bufferedAmount : 0;
  }

  /** Go to another path (a chat room, say) at once, as a fresh start. */
  retarget(path) {
    this.path = path;
    const old = this.ws;
    this.ws = null;
    if (old) old.close(1000, "moving");
    this.everOpened = false;
    this.attempt = 0;
    this.state = "connecting";
    this.open();
  }

  shut() {
    if (this.ws) this.ws.close(1000, "bye");
    this.ws = null;
  }
}

/** A connection to a route that reconnects by itself (see Connection). */
export function connect(path, options) {
  return new Connection(path, options);
}

/** The transport the page's address asks for: ?transport=sse or ?transport=websocket, else "auto". */
export function pageTransport() {
  const asked = new URLSearchParams(location.search).get("transport");
  if (asked === "sse") return "sse";
  if (asked === "websocket" || asked === "ws") return "websocket";
  return "auto";
}

/** The messages of some channels over a WebSocket or Server-Sent Events (see the top). */
export class Feed extends Retrying {
  /**
   * channels: a name or a list of names. Options: transport ("auto", "websocket" or "sse";
   * default: what the page's address asks for, see pageTransport), wsPath (the generic route,
   * "/ws"), ssePath (the event stream route, "/sse/"), fallbackAfter (WebSocket failures before an
   * event stream is tried, 2), minDelay and maxDelay of the retries in ms.
   */
  constructor(channels, { transport = pageTransport(), wsPath = "/ws", ssePath = "/sse/", fallbackAfter = 2, ...retries } = {}) {
    super(retries);
    this.channels = [...new Set(typeof channels === "string" ? [channels] : channels)];
    this.mode = transport;
    this.wsPath = wsPath;
    this.ssePath = ssePath;
    this.fallbackAfter = fallbackAfter;
    this.positions = new Map(); // channel -> { epoch, seq }: where it was last seen
    this.wsOpened = false;      // a WebSocket of this feed has opened
    this.wsFailures = 0;        // WebSocket tries in a row that never opened
    this.stayOnSSE = false;     // an event stream opened after WebSocket failures: keep to it
    this.ws = null;
    this.es = null;
    this.waiting = null;        // ids of subscribe requests not answered yet
    this.transport = this.pick();
    this.open();
  }

  /** "websocket" or "sse": what the next try uses. */
  pick() {
    if (this.mode === "sse" || typeof WebSocket === "undefined") return "sse";
    if (this.mode === "websocket") return "websocket";
    if (this.stayOnSSE || (!this.wsOpened && this.wsFailures >= this.fallbackAfter)) return "sse";
    return "websocket";
  }

  /** What the feed is, for a tooltip. */
  get description() {
    const list = this.channels.join(", ");
    return this.transport === "sse" ? `Server-Sent Events ${this.sseURL(false).pathname}: ${list}`
      : `WebSocket ${this.wsPath}${extensionsOf(this.ws)}: ${list}`;
  }

  open() {
    this.begin();
    this.transport = this.pick();
    if (this.transport === "sse") this.openEventSource();
    else this.openWebSocket();
    this.emit("state", this);
  }

  /** A try failed (up: its transport had opened): fall back at once, or try again later. */
  failed(up, code, reason) {
    if (this.state === "closed") return;
    if (this.transport === "websocket") {
      if (!up) this.wsFailures++;
      if (this.pick() === "sse") {
        this.open(); // fall back, at once (never after an open: see pick)
        return;
      }
    } else if (!up && !this.stayOnSSE) {
      this.wsFailures = 0; // the server is away, not only WebSocket: WebSocket first again
    }
    this.dropped(code, reason);
  }

  /** Keep where a channel is, and pass its message on. */
  deliver(channel, seq, data, epoch) {
    this.positions.set(channel, { epoch, seq });
    this.emit("message", { channel, seq, data });
  }

  openWebSocket() {
    const ws = new WebSocket(wsURL(this.wsPath));
    this.ws = ws;
    let up = false;
    ws.onopen = () => {
      up = true;
      this.wsOpened = true;
      this.wsFailures = 0;
      this.waiting = new Map();
      this.channels.forEach((channel, i) => {
        const request = { op: "subscribe", channel, id: i + 1 };
        const at = this.positions.get(channel);
        if (at && at.epoch) Object.assign(request, { since: at.seq, epoch: at.epoch });
        this.waiting.set(request.id, channel);
        ws.send(JSON.stringify(request));
      });
    };
    ws.onmessage = (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return;
      }
      if (msg.op === "message") {
        this.deliver(msg.channel, msg.seq, msg.data, this.positions.get(msg.channel)?.epoch);
      } else if (msg.op === "subscribed" || msg.op === "error") {
        if (msg.op === "error") console.warn(`herald: ${this.waiting?.get(msg.id) ?? ""}: ${msg.error}`);
        // Without a history, or when it no longer reaches back (another epoch: the broker has
        // restarted), the channel goes on from here; with "recovered": true what was missed
        // follows this reply, and moves the position on itself.
        if (msg.op === "subscribed" && msg.recovered !== true) {
          this.positions.set(msg.channel, { epoch: msg.epoch, seq: msg.seq ?? 0 });
        }
        if (this.waiting?.delete(msg.id) && this.waiting.size === 0) this.opened();
      }
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return; // closed by close()
      this.ws = null;
      this.failed(up, event.code, event.reason);
    };
  }

  /** The event stream's URL: the channels, and with resume, the last id seen of each. */
  sseURL(resume = true) {
    const url = new URL(this.ssePath, location.href);
    url.searchParams.set("channels", this.channels.join(","));
    const ids = [];
    for (const [channel, at] of this.positions) {
      if (at.epoch && this.channels.includes(channel)) ids.push(`${at.epoch}:${channel}:${at.seq}`);
    }
    if (resume && ids.length) url.searchParams.set("last_event_id", ids.join(","));
    return url;
  }

  openEventSource() {
    const es = new EventSource(this.sseURL());
    this.es = es;
    let up = false;
    es.onopen = () => {
      up = true;
      if (this.mode === "auto") this.stayOnSSE = true;
      this.opened();
    };
    es.onmessage = (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return;
      }
      // The id is <epoch>:<channel>:<seq>; channel names may hold ':', epochs do not.
      const id = event.lastEventId;
      this.deliver(msg.channel, msg.seq, msg.data, id.slice(0, id.indexOf(":")) || undefined);
    };
    // EventSource would reconnect by itself, but with one Last-Event-ID (of whichever channel's
    // event came last) and at the server's fixed interval: the feed reconnects itself instead.
    es.onerror = () => {
      if (es !== this.es) return;
      es.close();
      this.es = null;
      this.failed(up);
    };
  }

  shut() {
    const { ws, es } = this;
    this.ws = this.es = null;
    if (ws) ws.close(1000, "bye");
    if (es) es.close();
  }
}

/** The messages of channels, over the generic route or Server-Sent Events (see the top). */
export function subscribe(channels, onMessage, options) {
  const feed = new Feed(channels, options);
  if (onMessage) feed.on("message", onMessage);
  return feed;
}

/**
 * Show a connection's or a feed's state in el (a pill: data-state is "connecting", "open",
 * "reconnecting" or "closed"; data-reconnects counts comebacks; data-transport is "websocket" or
 * "sse"), with a notice while it is down and one when it is back. Clicking the pill while it
 * waits tries again at once.
 */
export function showStatus(conn, el) {
  let lost = null;   // the notice shown while the connection is down
  let ticker = 0;

  const render = () => {
    const state = conn.state;
    el.dataset.state = state;
    el.dataset.reconnects = String(conn.reconnects);
    el.dataset.transport = conn.transport;
    let text;
    if (state === "open") {
      // A feed can use either transport, so it says which; a connection is always a WebSocket.
      text = conn instanceof Feed ? `live · ${conn.transport === "sse" ? "SSE" : "WebSocket"}` : "live";
    } else if (state === "closed") {
      text = "offline";
    } else {
      const word = state === "reconnecting" ? "reconnecting" : "connecting";
      const wait = Math.ceil((conn.retryAt - Date.now()) / 1000);
      text = conn.retryAt && wait > 0 ? `${word} in ${wait} s` : `${word}…`;
    }
    el.textContent = text;
    el.title = state === "reconnecting" ? "connection lost: click to try now" : conn.description;
    clearInterval(ticker);
    if (conn.retryAt) ticker = setInterval(render, 500);
  };

  conn.on("state", render);
  conn.on("close", () => {
    lost ||= toast("Connection lost. Reconnecting…", { kind: "bad", sticky: true });
  });
  conn.on("open", ({ reconnected }) => {
    if (lost) {
      lost.remove();
      lost = null;
    }
    if (reconnected) toast("Reconnected", { kind: "ok" });
  });
  el.addEventListener("click", conn.retryNow);
  render();
}

/** A short notice under the top bar; returns its element. */
export function toast(text, { kind = "", ms = 3000, sticky = false } = {}) {
  let box = document.querySelector(".toasts");
  if (!box) {
    box = document.createElement("div");
    box.className = "toasts";
    box.setAttribute("role", "status");
    box.setAttribute("aria-live", "polite");
    document.body.append(box);
  }
  const item = document.createElement("div");
  item.className = "toast " + kind;
  item.textContent = text;
  box.append(item);
  if (!sticky) setTimeout(() => item.remove(), ms);
  return item;
}
