// permessage-deflate with Chromium: its WebSocket negotiates the extension on routes that allow
// it; large compressible text and binary echo back exactly; a large JSON message published over
// HTTP, and another published by a page over /ws (which Chromium sends compressed), reach two
// pages intact; and herald's /stats show that it compressed and inflated.
import assert from "node:assert/strict";
import test from "node:test";
import { newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";

// A JSON document of about 200 KB that compresses well, as dashboards' and logs' do.
function bigDocument(tag) {
  return {
    tag,
    rows: Array.from({ length: 2000 }, (_, i) => ({
      i, name: `row ${i} of ${tag}`, status: i % 7 ? "ok" : "slow", tags: ["a", "b", "ünïcödé"], value: (i * 37) % 1000 / 10,
    })),
  };
}

const deflateFigures = (stats) => Object.fromEntries(Object.entries(stats).filter(([k]) => k.startsWith("deflate_")));
/** How much each figure grew from before to after. */
const difference = (before, after) => Object.fromEntries(Object.keys(after).map((k) => [k, after[k] - before[k]]));

/** In the page: a channel feed from the demo client module on the given channels, its messages
 *  kept in window.feeds[name].got. Resolves when it is live. */
async function openFeed(page, name, channels) {
  await page.evaluate(async ([name, channels]) => {
    const { subscribe } = await import("/js/herald.js");
    window.feeds ||= {};
    const got = [];
    const feed = subscribe(channels, (msg) => got.push(msg), { transport: "websocket" });
    feed.got = got;
    window.feeds[name] = feed;
  }, [name, channels]);
  await page.waitForFunction((name) => window.feeds[name].state === "open", name);
}

test("deflate: Chromium negotiates permessage-deflate; echo, fan-out and publish arrive intact", { timeout: 90000 }, async () => {
  await withSetup("deflate", async ({ herald, context }) => {
    const before = deflateFigures(await herald.stats());
    assert.equal(before.deflate_compressed, 0);

    // Echo, on a raw WebSocket opened by the page: the extension is negotiated, and large text
    // and binary come back byte for byte, as does a short message (sent uncompressed by herald).
    const echo = await newPage(context);
    await echo.goto(herald.url("/echo.html"));
    await waitConnected(echo);
    const result = await echo.evaluate(async () => {
      const within = (ms, what, promise) => Promise.race([promise,
        new Promise((_, reject) => setTimeout(() => reject(new Error(what + ": no answer in " + ms + " ms")), ms))]);
      const ws = new WebSocket(`ws://${location.host}/echo`);
      ws.binaryType = "arraybuffer";
      await within(5000, "open", new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = reject;
      }));
      const text = "the quick brown fox jumps over the lazy dog · ✓ ".repeat(6000); // ~300 KB
      const binary = new Uint8Array(256 * 1024);
      let x = 12345;
      for (let i = 0; i < binary.length; i++) {
        // first half a repeating pattern, second half pseudo-random (not compressible)
        x = (x * 1103515245 + 12345) >>> 0;
        binary[i] = i < binary.length / 2 ? i % 61 : x >>> 24;
      }
      const back = [];
      const all = new Promise((resolve) => {
        ws.onmessage = (event) => {
          back.push(event.data);
          if (back.length === 3) resolve();
        };
      });
      ws.send(text);
      ws.send(binary);
      ws.send("short");
      await within(10000, "echoes", all);
      const same = (a, b) => a.byteLength === b.byteLength && a.every((v, i) => v === b[i]);
      const out = {
        extensions: ws.extensions,
        text: back[0] === text,
        textLength: typeof back[0] === "string" ? back[0].length : -1,
        binary: back[1] instanceof ArrayBuffer && same(new Uint8Array(back[1]), binary),
        short: back[2],
      };
      ws.close();
      return out;
    });
    assert.match(result.extensions, /^permessage-deflate\b/);
    assert.ok(result.text, `the text came back changed (${result.textLength} characters)`);
    assert.ok(result.binary, "the binary message came back changed");
    assert.equal(result.short, "short");

    // The echo page itself, through its UI; its status pill's tooltip names the extension.
    assert.equal(await echo.locator("#status").getAttribute("title"), "WebSocket /echo · permessage-deflate");
    const long = "compressible ".repeat(40).trim();
    await echo.locator("#text").fill(long);
    await echo.locator("#text").press("Enter");
    await echo.locator(".line.in .text", { hasText: long }).waitFor();

    // The echoes: herald inflated what Chromium sent (the text and binary at least) and compressed
    // what it sent back, but the short one.
    const afterEcho = deflateFigures(await herald.stats());
    const echoed = difference(before, afterEcho);
    assert.ok(echoed.deflate_inflated >= 2 && echoed.deflate_compressed >= 1, JSON.stringify(echoed));
    assert.ok(echoed.deflate_not_compressed >= 1, JSON.stringify(echoed)); // "short", under min_size

    // Two pages subscribed to a channel over /ws with the demo client module; both negotiated the
    // extension. The pages are echo pages, whose own connection is quiet: the front page's
    // figures, compressed every second, would blur the counts below.
    const pages = [await newPage(context), await newPage(context)];
    for (const page of pages) {
      await page.goto(herald.url("/echo.html"));
      await waitConnected(page);
      await openFeed(page, "big", ["big"]);
      assert.match(await page.evaluate(() => window.feeds.big.ws.extensions), /^permessage-deflate\b/);
    }

    // A large JSON message published over HTTP arrives intact at both, compressed once for the
    // two of them.
    const beforeHttp = deflateFigures(await herald.stats());
    const first = bigDocument("http");
    const published = await herald.publish("big", JSON.stringify(first));
    assert.equal(published.subscribers, 2);
    for (const page of pages) {
      await page.waitForFunction(() => window.feeds.big.got.length === 1);
      const [msg] = await page.evaluate(() => window.feeds.big.got);
      assert.equal(msg.seq, 1);
      assert.deepEqual(msg.data, first);
    }
    const http = difference(beforeHttp, deflateFigures(await herald.stats()));
    assert.equal(http.deflate_compressed, 1, JSON.stringify(http));
    assert.equal(http.deflate_not_compressed, 0, JSON.stringify(http));
    assert.equal(http.deflate_inflated, 0, JSON.stringify(http));
    assert.ok(http.deflate_compress_bytes_out * 3 < http.deflate_compress_bytes_in, JSON.stringify(http));

    // One published by a page over /ws: Chromium sends it compressed, herald inflates it and
    // sends it on compressed; it arrives intact at both, the sender included.
    const beforePage = deflateFigures(await herald.stats());
    const second = bigDocument("page");
    const reply = await pages[0].evaluate(async (doc) => {
      const ws = new WebSocket(`ws://${location.host}/ws`);
      await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = reject;
      });
      const answer = new Promise((resolve) => (ws.onmessage = (event) => resolve(JSON.parse(event.data))));
      ws.send(JSON.stringify({ op: "publish", channel: "big", data: doc, id: 1 }));
      const got = await answer;
      ws.close();
      return { got, extensions: ws.extensions };
    }, second);
    assert.match(reply.extensions, /^permessage-deflate\b/);
    assert.deepEqual(reply.got, { op: "published", channel: "big", seq: 2, id: 1 });
    for (const page of pages) {
      await page.waitForFunction(() => window.feeds.big.got.length === 2);
      const msg = (await page.evaluate(() => window.feeds.big.got))[1];
      assert.equal(msg.seq, 2);
      assert.deepEqual(msg.data, second);
    }

    // herald inflated the page's publish, the one message it sent, and compressed the big
    // message once for both subscribers; the short "published" reply went uncompressed.
    const fromPage = difference(beforePage, deflateFigures(await herald.stats()));
    assert.equal(fromPage.deflate_inflated, 1, JSON.stringify(fromPage));
    assert.ok(fromPage.deflate_inflate_bytes_out > 2 * fromPage.deflate_inflate_bytes_in, JSON.stringify(fromPage));
    assert.ok(fromPage.deflate_inflate_bytes_out >= JSON.stringify(second).length, JSON.stringify(fromPage));
    assert.equal(fromPage.deflate_compressed, 1, JSON.stringify(fromPage));
    assert.equal(fromPage.deflate_not_compressed, 1, JSON.stringify(fromPage));

    await screenshot(echo, "deflate-echo");
  }, { deflate: ["/ws", "/echo"] });
});
