// Server-Sent Events in Chromium's own EventSource: events as they are published, and resume
// after the stream is cut (EventSource's automatic reconnection with Last-Event-ID, and
// ?last_event_id= on a first connection); then the front page forced onto its SSE fallback:
// live, and resumed after a cut with what was published meanwhile, once each.
//
// The stream is cut by a TCP proxy between the browser and herald (lib/proxy.mjs), which also
// holds the reconnection back until the messages to be missed are published, so nothing here
// depends on timing.
import assert from "node:assert/strict";
import test from "node:test";
import { newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";
import { Proxy } from "./lib/proxy.mjs";

const HISTORY = `{ { prefix = "h:", length = 100, age = 3600 }, { prefix = "news", length = 100, age = 3600 } }`;

async function withProxy(herald, fn) {
  const proxy = await new Proxy(herald.port).start();
  try {
    await fn(proxy);
  } finally {
    await proxy.close();
  }
}

/** A page of the proxy's origin with nothing on it but a list, for page-level EventSources. */
async function blankPage(context, proxy) {
  const page = await newPage(context);
  const url = proxy.url("/blank.html");
  await page.route(url, (route) => route.fulfill({
    contentType: "text/html",
    body: `<!doctype html><meta charset="utf-8"><title>EventSource</title>
      <link rel="stylesheet" href="/css/herald.css"><main class="page"><h1>EventSource</h1>
      <ul id="log" class="echo-log"></ul></main>`,
  }));
  await page.goto(url);
  return page;
}

/** Open an EventSource in the page as window.streams[name]; its events go to window.got[name]. */
async function openStream(page, name, url) {
  await page.evaluate(([name, url]) => {
    window.streams ||= {};
    window.got ||= {};
    window.got[name] = [];
    const es = new EventSource(url);
    es.opens = 0;
    es.errors = 0;
    es.onopen = () => es.opens++;
    es.onerror = () => es.errors++;
    es.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      window.got[name].push({ id: event.lastEventId, seq: msg.seq, data: msg.data });
      const li = document.createElement("li");
      li.className = "line in";
      li.textContent = `${name} · ${event.lastEventId} · ${JSON.stringify(msg.data)}`;
      document.querySelector("#log").append(li);
    };
    window.streams[name] = es;
  }, [name, url]);
  await page.waitForFunction((name) => window.streams[name].opens === 1, name);
}

const received = (page, name, n) =>
  page.waitForFunction(([name, n]) => window.got[name].length >= n, [name, n]).then(() => page.evaluate((name) => window.got[name], name));

test("sse: Chromium's EventSource gets events and resumes by Last-Event-ID after a cut", { timeout: 60000 }, async () => {
  await withSetup("sse-eventsource", async ({ herald, context }) => {
    await withProxy(herald, async (proxy) => {
      const page = await blankPage(context, proxy);
      await openStream(page, "a", "/sse/h:resume");
      const stats = await herald.stats();
      for (let i = 1; i <= 3; i++) await herald.publish("h:resume", `m${i}`);
      let got = await received(page, "a", 3);
      // A history channel counts in an epoch of its own, made from the process's.
      const epoch = got[0].id.split(":")[0];
      assert.ok(epoch.startsWith(stats.epoch) && epoch.length > stats.epoch.length, epoch);
      assert.deepEqual(got.map((e) => e.id), [1, 2, 3].map((i) => `${epoch}:h:resume:${i}`));

      // Cut the stream; EventSource reconnects by itself (after the stream's "retry: 2000"), and
      // that request is held until five messages have been published.
      proxy.hold();
      proxy.cut();
      await page.waitForFunction(() => window.streams.a.errors === 1 && window.streams.a.readyState === EventSource.CONNECTING);
      const again = await proxy.waitHead((h) => h.startsWith("GET /sse/h:resume "));
      assert.match(again, new RegExp(`^Last-Event-ID: ${epoch}:h:resume:3\\r$`, "mi"));
      for (let i = 4; i <= 8; i++) await herald.publish("h:resume", `m${i}`);
      proxy.release();
      // Published as herald takes the reconnection or just before: live or replayed, either way
      // once and in order. A duplicate would come before the last of them.
      await herald.publish("h:resume", "m9");
      await herald.publish("h:resume", "m10");
      got = await received(page, "a", 10);
      assert.deepEqual(got.map((e) => e.seq), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      assert.deepEqual(got.map((e) => e.data), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map((i) => `m${i}`));
      assert.equal(await page.evaluate(() => window.streams.a.opens), 2);

      // A first connection asks with ?last_event_id=: what came after seq 5, then live.
      const from = proxy.heads.length;
      await openStream(page, "b", "/sse/h:resume?last_event_id=" + encodeURIComponent(got[4].id));
      const first = await proxy.waitHead((h) => h.startsWith("GET /sse/h:resume?"), { from });
      assert.doesNotMatch(first, /^Last-Event-ID:/im);
      got = await received(page, "b", 5);
      await herald.publish("h:resume", "m11");
      got = await received(page, "b", 6);
      assert.deepEqual(got.map((e) => e.seq), [6, 7, 8, 9, 10, 11]);

      await screenshot(page, "sse-eventsource-resumed");
    });
  }, { history: HISTORY });
});

test("sse: the front page on ?transport=sse is live and resumes its news after a cut", { timeout: 60000 }, async () => {
  await withSetup("sse-index", async ({ herald, context }) => {
    await withProxy(herald, async (proxy) => {
      const page = await newPage(context);
      let websockets = 0;
      page.on("websocket", () => websockets++);
      await page.goto(proxy.url("/?transport=sse"));
      await waitConnected(page);
      const status = page.locator("#status");
      assert.equal(await status.getAttribute("data-transport"), "sse");
      assert.equal(await status.textContent(), "live · SSE");

      const news = page.locator("#news .text");
      await herald.publish("news", "n1");
      await news.filter({ hasText: /^n1$/ }).waitFor();
      // The figures come over the same stream (channel "dashboard").
      const uptime = page.locator(".figures [data-fig='uptime']");
      await page.waitForFunction(() => /^\d/.test(document.querySelector(".figures [data-fig='uptime']").textContent));
      // Wait for a set of figures after n1, so that the stream's last event is not news: a
      // resume by the last event's id alone would then lose what news missed.
      const shown = await uptime.textContent();
      await page.waitForFunction((shown) => document.querySelector(".figures [data-fig='uptime']").textContent !== shown, shown);

      proxy.hold();
      proxy.cut();
      await page.locator('#status[data-state="reconnecting"]').waitFor();
      const again = await proxy.waitHead((h) => h.startsWith("GET /sse/?"));
      const query = new URL(again.split(" ")[1], "http://x").searchParams;
      assert.equal(query.get("channels"), "dashboard,news");
      assert.match(query.get("last_event_id"), /(^|,)[0-9a-f]+:news:1(,|$)/);
      for (const text of ["n2", "n3", "n4"]) await herald.publish("news", text);
      proxy.release();
      await page.locator('#status[data-state="open"][data-reconnects="1"]').waitFor();
      assert.equal(await status.textContent(), "live · SSE");
      await herald.publish("news", "n5");
      await news.filter({ hasText: /^n5$/ }).waitFor();
      // Newest first, each once (the box keeps five; a duplicate would have come before n5).
      assert.deepEqual(await news.allTextContents(), ["n5", "n4", "n3", "n2", "n1"]);
      assert.equal(websockets, 0, "forced onto SSE, the page opens no WebSocket");
      await screenshot(page, "sse-index-resumed", { fullPage: true });
    });
  }, { history: HISTORY });
});
