// The demo client module's fallback to Server-Sent Events: behind a proxy that strips the Upgrade
// header (WebSocket handshakes fail, plain HTTP works) the front page tries WebSocket twice, then
// goes live over an event stream and stays there; in a browser without WebSocket it uses the
// stream from the start; ?transport=websocket never falls back.
import assert from "node:assert/strict";
import test from "node:test";
import { newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";
import { Proxy } from "./lib/proxy.mjs";

async function withProxy(herald, fn) {
  const proxy = await new Proxy(herald.port, { stripUpgrade: true }).start();
  try {
    await fn(proxy);
  } finally {
    await proxy.close();
  }
}

/** The page's WebSocket tries, as they end: { url, opened }. */
function watchWebSockets(page) {
  const tries = [];
  page.on("websocket", (ws) => {
    const t = { url: ws.url(), opened: false, closed: false };
    tries.push(t);
    ws.on("framereceived", () => (t.opened = true));
    ws.on("close", () => (t.closed = true));
  });
  return tries;
}

test("fallback: WebSocket blocked by a proxy, the front page goes live over SSE", { timeout: 60000 }, async () => {
  await withSetup("fallback-proxy", async ({ herald, context }) => {
    await withProxy(herald, async (proxy) => {
      const page = await newPage(context);
      const tries = watchWebSockets(page);
      await page.goto(proxy.url("/"));
      await waitConnected(page);
      const status = page.locator("#status");
      assert.equal(await status.getAttribute("data-transport"), "sse");
      assert.equal(await status.textContent(), "live · SSE");
      assert.match(await status.getAttribute("title"), /^Server-Sent Events \/sse\/: dashboard, news$/);

      // Two WebSocket handshakes went through the proxy without their Upgrade and failed (herald
      // answered 426), then one event stream.
      assert.equal(proxy.stripped, 2);
      assert.equal(tries.length, 2);
      assert.ok(tries.every((t) => !t.opened && t.url.endsWith("/ws")));
      assert.ok(proxy.heads.some((h) => h.startsWith("GET /sse/?channels=dashboard%2Cnews ")));
      assert.equal((await herald.stats()).sse_streams, 1);

      // It works: news and figures arrive.
      await herald.publish("news", "over the fallback");
      await page.locator("#news .text", { hasText: "over the fallback" }).waitFor();
      await page.waitForFunction(() => /^\d/.test(document.querySelector(".figures [data-fig='uptime']").textContent));

      // And stays on the stream when it drops, rather than knocking at WebSocket again, even
      // while the server seems away: failed tries of the stream do not send it back to WebSocket.
      proxy.refuse();
      proxy.cut();
      await page.locator('#status[data-state="reconnecting"]').waitFor();
      await proxy.until(() => proxy.refused >= 2, { timeout: 15000 });
      proxy.refuse(false);
      await page.locator('#status[data-state="open"][data-reconnects="1"]').waitFor({ timeout: 15000 });
      assert.equal(await status.getAttribute("data-transport"), "sse");
      assert.equal(tries.length, 2);
      await herald.publish("news", "after the drop");
      await page.locator("#news .text", { hasText: "after the drop" }).waitFor();
      await screenshot(page, "fallback-index-sse", { fullPage: true });
    });
  });
});

test("fallback: a browser without WebSocket uses SSE from the start", { timeout: 60000 }, async () => {
  await withSetup("fallback-nows", async ({ herald, context }) => {
    const page = await newPage(context);
    const tries = watchWebSockets(page);
    await page.addInitScript(() => delete window.WebSocket);
    await page.goto(herald.url("/"));
    await waitConnected(page);
    assert.equal(await page.evaluate(() => typeof WebSocket), "undefined");
    assert.equal(await page.locator("#status").textContent(), "live · SSE");
    await herald.publish("news", "no WebSocket here");
    await page.locator("#news .text", { hasText: "no WebSocket here" }).waitFor();
    assert.equal(tries.length, 0);
  });
});

test("fallback: ?transport=websocket keeps to WebSocket", { timeout: 60000 }, async () => {
  await withSetup("fallback-forced-ws", async ({ herald, context }) => {
    await withProxy(herald, async (proxy) => {
      const page = await newPage(context);
      const tries = watchWebSockets(page);
      await page.goto(proxy.url("/?transport=websocket"));
      // Three failed tries (0.5 and 1 s apart): still WebSocket, still not live, no stream.
      let upgrades = 0;
      await proxy.waitHead((h) => /^upgrade:\s*websocket/im.test(h) && ++upgrades === 3, { from: 0, timeout: 15000 });
      assert.equal(await page.locator("#status").getAttribute("data-transport"), "websocket");
      assert.notEqual(await page.locator("#status").getAttribute("data-state"), "open");
      assert.ok(!proxy.heads.some((h) => h.startsWith("GET /sse/")));
      assert.ok(tries.length >= 2);
    });
  });
});
