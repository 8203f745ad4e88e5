// A small TCP proxy in front of herald, for what a browser test cannot do to the browser's own
// connections: cut them (every connection through the proxy closed at once, as a network drop
// would), hold new ones back for a while (so that messages are published while a client is
// cut off, deterministically), refuse them for a while (as if the server were away), and break
// WebSocket handshakes the way a proxy that does not know
// WebSocket does, by removing the Upgrade header (herald then answers 426, as to a plain GET)
// while plain HTTP goes through.
//
// The proxy reads the request heads that go through it (kept in `heads`, in order), so the
// clients behind it are expected to send requests without bodies (pages, scripts, event
// streams); after a request with a body, or a WebSocket upgrade it lets through, the rest of that
// connection is passed on as it is.

import net from "node:net";

export class Proxy {
  /** target: herald's port. stripUpgrade: remove Upgrade from every request. */
  constructor(target, { stripUpgrade = false } = {}) {
    this.target = target;
    this.stripUpgrade = stripUpgrade;
    this.heads = [];      // every request head seen, as text
    this.stripped = 0;    // WebSocket handshakes broken
    this.pairs = new Set();
    this.held = null;     // while holding: the connections waiting to be passed on
    this.refusing = false;
    this.refused = 0;     // connections closed at once while refusing
    this.waiters = [];
    this.server = null;
    this.port = 0;
  }

  start() {
    return new Promise((resolve, reject) => {
      this.server = net.createServer((client) => this.accept(client));
      this.server.on("error", reject);
      this.server.listen(0, "127.0.0.1", () => {
        this.port = this.server.address().port;
        resolve(this);
      });
    });
  }

  url(p = "/") {
    return `http://127.0.0.1:${this.port}${p}`;
  }

  accept(client) {
    if (this.refusing) {
      client.destroy();
      this.refused++;
      this.changed();
      return;
    }
    const pair = { client, upstream: null };
    const pending = [];
    this.pairs.add(pair);
    client.on("error", () => {});
    client.on("close", () => {
      this.pairs.delete(pair);
      if (pair.upstream) pair.upstream.destroy();
    });
    const send = (chunk) => (pair.upstream ? pair.upstream.write(chunk) : pending.push(chunk));

    let buf = Buffer.alloc(0);
    let raw = false;
    client.on("data", (chunk) => {
      if (raw) return send(chunk);
      buf = Buffer.concat([buf, chunk]);
      let end;
      while (!raw && (end = buf.indexOf("\r\n\r\n")) >= 0) {
        let head = buf.subarray(0, end + 4).toString("latin1");
        buf = buf.subarray(end + 4);
        this.record(head);
        const upgrade = /^upgrade:\s*websocket/im.test(head);
        if (upgrade && this.stripUpgrade) {
          this.stripped++;
          head = head.replace(/^upgrade:.*\r\n/gim, "").replace(/^connection:.*\r\n/gim, "Connection: keep-alive\r\n");
        }
        send(Buffer.from(head, "latin1"));
        if ((upgrade && !this.stripUpgrade) || /^(content-length:\s*0*[1-9]|transfer-encoding:)/im.test(head)) {
          raw = true;
          if (buf.length) send(buf);
          buf = Buffer.alloc(0);
        }
      }
    });

    const connect = () => {
      if (client.destroyed) return;
      const upstream = net.connect(this.target, "127.0.0.1");
      pair.upstream = upstream;
      upstream.on("error", () => client.destroy());
      upstream.on("close", () => client.destroy());
      upstream.pipe(client);
      for (const chunk of pending.splice(0)) upstream.write(chunk);
    };
    if (this.held) this.held.push(connect);
    else connect();
  }

  record(head) {
    this.heads.push(head);
    this.changed();
  }

  changed() {
    for (const w of [...this.waiters]) w.check();
  }

  /** Wait until test() holds, checked now and whenever a request or a refused connection comes
   *  through; within timeout ms. Resolves to what test() returned. */
  until(test, { timeout = 10000 } = {}) {
    return new Promise((resolve, reject) => {
      const w = {
        check: () => {
          const value = test();
          if (!value) return;
          clearTimeout(timer);
          this.waiters.splice(this.waiters.indexOf(w), 1);
          resolve(value);
        },
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error("the proxy did not see that within " + timeout + " ms: " + test));
      }, timeout);
      this.waiters.push(w);
      w.check();
    });
  }

  /** The first request head test(head) accepts, of those from index `from` of heads on (default:
   *  from now on), within timeout ms. */
  waitHead(test, { from = this.heads.length, timeout = 10000 } = {}) {
    let next = from;
    return this.until(() => {
      while (next < this.heads.length) {
        const head = this.heads[next++];
        if (test(head)) return head;
      }
      return null;
    }, { timeout });
  }

  /** Close new connections at once (as a server that is away would), or let them in again. */
  refuse(on = true) {
    this.refusing = on;
  }

  /** From now on, new connections wait (their requests are read, not passed on). */
  hold() {
    this.held ||= [];
  }

  /** Pass on the connections held, and the new ones again. */
  release() {
    const held = this.held || [];
    this.held = null;
    for (const connect of held) connect();
  }

  /** Close every connection through the proxy now, both ways. */
  cut() {
    for (const { client, upstream } of this.pairs) {
      client.destroy();
      if (upstream) upstream.destroy();
    }
  }

  async close() {
    this.release();
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}
