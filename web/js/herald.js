// herald.js: the connection code every demo page shares.
//
//   import { connect, showStatus } from "./js/herald.js";
//   const conn = connect("/chat?room=lobby");
//   conn.on("open", ({ reconnected }) => { ... });
//   conn.on("message", (msg) => { ... });  // JSON text arrives parsed, anything else as is
//   conn.send({ type: "message", text: "hi" }); // an object is sent as JSON; false when offline
//   showStatus(conn, document.querySelector("#status"));
//
// A dropped connection comes back by itself: the next try is 0.5 s later, then 1, 2, 4 and at
// most 8 s apart (each with some jitter, so that the pages of a restarted broker do not all knock
// at once), until close() is called. Coming back online or to the tab tries again at once.

/** The ws:// (or wss://) URL of a path on the server that served the page. */
export function wsURL(path) {
  const url = new URL(path, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

export class Connection {
  /**
   * path: the route, e.g. "/chat?room=lobby". Options: json (parse text messages as JSON when
   * they are, default true), minDelay and maxDelay of the retries in ms.
   */
  constructor(path, { json = true, minDelay = 500, maxDelay = 8000 } = {}) {
    this.path = path;
    this.json = json;
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    // "connecting" until the first open, "open", "reconnecting" after a drop, "closed" by close()
    this.state = "connecting";
    this.attempt = 0;       // failed tries since the last open
    this.reconnects = 0;    // times the connection came back after a drop
    this.retryAt = 0;       // when the next try is due (ms since the epoch), 0 while trying
    this.ws = null;
    this.timer = 0;
    this.handlers = {};
    this.everOpened = false;
    this.retryNow = this.retryNow.bind(this);
    addEventListener("online", this.retryNow);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.retryNow();
    });
    this.open();
  }

  /** Call fn for an event: "open" ({reconnected}), "message" (data), "close" ({code, reason}),
   *  "state" (the connection itself, whenever state, attempt or retryAt change). */
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

  open() {
    clearTimeout(this.timer);
    this.retryAt = 0;
    const ws = new WebSocket(wsURL(this.path));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.emit("state", this);
    ws.onopen = () => {
      const reconnected = this.everOpened;
      if (reconnected) this.reconnects++;
      this.everOpened = true;
      this.attempt = 0;
      this.setState("open");
      this.emit("open", { reconnected });
    };
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
      if (ws !== this.ws) return; // an old socket, replaced by retarget()
      this.ws = null;
      const wasOpen = this.state === "open";
      if (this.state === "closed") return;
      if (wasOpen) this.emit("close", { code: event.code, reason: event.reason });
      this.schedule();
    };
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

  /** Close for good. */
  close() {
    clearTimeout(this.timer);
    this.retryAt = 0;
    this.setState("closed");
    removeEventListener("online", this.retryNow);
    if (this.ws) this.ws.close(1000, "bye");
    this.ws = null;
  }
}

/** A connection to a route that reconnects by itself (see Connection). */
export function connect(path, options) {
  return new Connection(path, options);
}

/**
 * Show a connection's state in el (a pill: data-state is "connecting", "open", "reconnecting" or
 * "closed"; data-reconnects counts comebacks), with a notice while it is down and one when it is
 * back. Clicking the pill while it waits tries again at once.
 */
export function showStatus(conn, el) {
  let lost = null;   // the notice shown while the connection is down
  let ticker = 0;

  const render = () => {
    const state = conn.state;
    el.dataset.state = state;
    el.dataset.reconnects = String(conn.reconnects);
    let text;
    if (state === "open") {
      text = "live";
    } else if (state === "closed") {
      text = "offline";
    } else {
      const word = state === "reconnecting" ? "reconnecting" : "connecting";
      const wait = Math.ceil((conn.retryAt - Date.now()) / 1000);
      text = conn.retryAt && wait > 0 ? `${word} in ${wait} s` : `${word}…`;
    }
    el.textContent = text;
    el.title = state === "reconnecting" ? "connection lost: click to try now" : `WebSocket ${conn.path}`;
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
