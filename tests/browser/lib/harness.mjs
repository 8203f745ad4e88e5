// What every browser test needs: a herald on the demo routes in a temporary directory, Debian's
// Chromium driven by playwright-core, screenshots kept as artifacts, and bounded waits.
//
// Environment: HERALD_BIN (the binary to test, default build/herald), HERALD_BROWSER_ARTIFACTS
// (where screenshots go, default build/tests/browser-artifacts), CHROMIUM (default
// /usr/bin/chromium).

import { spawn } from "node:child_process";
import { appendFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

let chromium;
try {
  ({ chromium } = await import("playwright-core"));
} catch (err) {
  throw new Error("playwright-core is not installed in tests/browser: run tools/install-deps.sh test (" + err.message + ")");
}

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const HERALD_BIN = path.resolve(process.env.HERALD_BIN || path.join(REPO, "build", "herald"));
export const ARTIFACTS = path.resolve(process.env.HERALD_BROWSER_ARTIFACTS || path.join(REPO, "build", "tests", "browser-artifacts"));
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

const SANITIZER_PATTERNS = ["ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer"];
const LISTENING = /listening on http:\/\/[^/\s]+:(\d+)\//;

export const PHONE = { width: 390, height: 844 };
export const DESKTOP = { width: 1280, height: 800 };

/** A port nobody listens on now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const lua = (s) => JSON.stringify(s); // the paths used here need no escapes beyond JSON's

// The demo configuration's routes (herald.lua), with the scripts of this checkout. deflate: the
// routes that negotiate permessage-deflate there.
const DEMO_ROUTES = [
  { path: "/ws", kind: "pubsub", deflate: true },
  { path: "/sub/", kind: "raw", publish: true },
  { path: "/echo", kind: "echo" },
  { path: "/sse/", kind: "sse" },
  { path: "/echo-lua", script: "echo.lua" },
  { path: "/chat", script: "chat.lua", deflate: true },
  { path: "/draw", script: "draw.lua", deflate: true },
  { path: "/log", script: "logstream.lua", deflate: true },
  { path: "/dashboard", script: "dashboard.lua", deflate: true },
  { path: "/countdown", script: "countdown.lua" },
];

/**
 * One herald process on the demo routes, with its files in a temporary directory. Options:
 * deflate (a list of route paths that negotiate permessage-deflate, instead of the demo's),
 * history (Lua text for the history setting), limits (Lua text of more limits).
 */
export class Herald {
  constructor(name, { deflate, history, limits = "" } = {}) {
    this.dir = mkdtempSync(path.join(os.tmpdir(), `herald-browser-${name}-`));
    this.tailPath = path.join(this.dir, "tail.log");
    writeFileSync(this.tailPath, "");
    const routes = DEMO_ROUTES.map((r) => {
      const fields = [`path = ${lua(r.path)}`];
      if (r.kind) fields.push(`kind = ${lua(r.kind)}`);
      if (r.script) fields.push(`script = ${lua(path.join(REPO, "scripts", r.script))}`);
      if (r.publish) fields.push("publish = true");
      if (deflate ? deflate.includes(r.path) : r.deflate) fields.push("deflate = true");
      return `  { ${fields.join(", ")} },\n`;
    }).join("");
    history ??= `{ { prefix = "chat:", length = 100, age = 3600 }, { prefix = "news", length = 100, age = 3600 } }`;
    this.configPath = path.join(this.dir, "herald.lua");
    writeFileSync(this.configPath, `-- written by tests/browser/lib/harness.mjs
listen = { host = "127.0.0.1", port = 8080 }
web_root = ${lua(path.join(REPO, "web"))}
access_log = "access.log"
tail = { { path = "tail.log", channel = "log:access" } }
limits = { max_message = 1048576, send_queue = 4194304, close_timeout = 2${limits ? ", " + limits : ""} }
routes = {
${routes}}
history = ${history}
`);
    this.proc = null;
    this.port = 0;
    this.stderr = "";
  }

  /** Start on a free port, or on `port` (after a restart it must be the same one). */
  async start(port = 0) {
    for (let attempt = 0; attempt < 5; attempt++) {
      const p = port || (await freePort());
      if (await this.startOnce(p)) return this;
      if (!this.stderr.includes("in use")) break;
      // Taken meanwhile: a free port is another one; the same port may need a moment.
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error("herald did not start:\n" + this.stderr);
  }

  startOnce(port) {
    this.stderr = "";
    this.exit = null;
    this.port = 0;
    const proc = spawn(HERALD_BIN, ["--config", this.configPath, "--port", String(port)], {
      cwd: this.dir,
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.on("exit", (code, signal) => resolve((this.exit = { code, signal }))));
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        proc.kill("SIGKILL");
        resolve(false);
      }, 20000);
      proc.stderr.setEncoding("utf8");
      proc.stderr.on("data", (chunk) => {
        this.stderr += chunk;
        const m = LISTENING.exec(this.stderr);
        if (m && !this.port) {
          clearTimeout(timer);
          this.port = Number(m[1]);
          resolve(true);
        }
      });
      proc.on("exit", () => {
        clearTimeout(timer);
        resolve(false);
      });
    });
  }

  /** SIGTERM, then the exit must be clean: status 0 and no sanitizer report. */
  async stop() {
    if (!this.proc) return;
    const proc = this.proc;
    this.proc = null;
    if (!this.exit) proc.kill("SIGTERM");
    const killer = setTimeout(() => proc.kill("SIGKILL"), 20000);
    const { code, signal } = await this.exited;
    clearTimeout(killer);
    for (const pattern of SANITIZER_PATTERNS) {
      if (this.stderr.includes(pattern)) throw new Error("sanitizer report from herald:\n" + this.stderr);
    }
    if (code !== 0) throw new Error(`herald exited with ${code ?? signal}:\n${this.stderr}`);
  }

  /** Stop and start again on the same port. */
  async restart() {
    const port = this.port;
    await this.stop();
    await this.start(port);
  }

  /** Remove the temporary directory (after stop). */
  cleanup() {
    rmSync(this.dir, { recursive: true, force: true });
  }

  url(p = "/") {
    return `http://127.0.0.1:${this.port}${p}`;
  }

  async publish(channel, body) {
    const r = await fetch(this.url("/pub/" + channel), { method: "POST", body });
    if (r.status !== 200) throw new Error(`POST /pub/${channel}: ${r.status}`);
    return r.json();
  }

  async stats() {
    return (await fetch(this.url("/stats"))).json();
  }

  /** Append lines to the tailed file (the log demo's feed). */
  appendTail(...lines) {
    appendFileSync(this.tailPath, lines.map((l) => l + "\n").join(""));
  }
}

/**
 * Debian's Chromium, headless, on a fresh profile in a temporary directory. Returns a
 * Playwright BrowserContext; close() also removes the profile.
 */
export async function launchBrowser() {
  const profile = mkdtempSync(path.join(os.tmpdir(), "herald-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: DESKTOP,
    timeout: 30000,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--no-first-run",
    ],
  });
  context.setDefaultTimeout(10000);
  const close = context.close.bind(context);
  context.close = async () => {
    try {
      await close();
    } finally {
      rmSync(profile, { recursive: true, force: true });
    }
  };
  return context;
}

/** A new page that records uncaught errors in page.errors (tests check it stays empty) and the
 *  WebSocket messages it sends in page.sent (payloads, in order). */
export async function newPage(context, { viewport = DESKTOP, colorScheme = "light" } = {}) {
  const page = await context.newPage();
  await page.setViewportSize(viewport);
  await page.emulateMedia({ colorScheme });
  page.errors = [];
  page.on("pageerror", (err) => page.errors.push(String(err)));
  page.sent = [];
  page.on("websocket", (ws) => ws.on("framesent", ({ payload }) => page.sent.push(String(payload))));
  return page;
}

/** Save a screenshot as build/tests/browser-artifacts/<name>.png (of the whole page with
 *  fullPage, else of the window). */
export async function screenshot(page, name, { fullPage = false } = {}) {
  mkdirSync(ARTIFACTS, { recursive: true });
  await page.bringToFront(); // a page in the background has its animations held back
  await page.screenshot({ path: path.join(ARTIFACTS, name + ".png"), fullPage, animations: "disabled" });
}

/** Wait until the page's connection indicator says it is connected. */
export async function waitConnected(page, timeout = 10000) {
  await page.locator('#status[data-state="open"]').waitFor({ timeout });
}

/**
 * Run fn(context) with a browser and a herald started for it (options: as for Herald), and clean
 * both up. fn receives { herald, context }. Uncaught page errors fail the test.
 */
export async function withSetup(name, fn, options) {
  const herald = await new Herald(name, options).start();
  let context;
  try {
    context = await launchBrowser();
    await fn({ herald, context });
    for (const page of context.pages()) {
      if (page.errors && page.errors.length) throw new Error("errors in the page: " + page.errors.join("\n"));
    }
  } finally {
    if (context) await context.close();
    await herald.stop();
    herald.cleanup();
  }
}
