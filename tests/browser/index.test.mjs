// index.html: what herald is, a card per demo with live figures from the broker, and messages
// published to channel "news" shown as they come.
import assert from "node:assert/strict";
import test from "node:test";
import { PHONE, newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";

const fig = (page, scope, name) => page.locator(`${scope} [data-fig="${name}"]`);

test("index: live figures per demo, links, channel news", { timeout: 60000 }, async () => {
  await withSetup("index", async ({ herald, context }) => {
    const page = await newPage(context);
    await page.goto(herald.url("/"));
    await waitConnected(page);
    // Where WebSocket works, the page uses it, and says so.
    assert.equal(await page.locator("#status").getAttribute("data-transport"), "websocket");
    assert.equal(await page.locator("#status").textContent(), "live · WebSocket");
    // As in the demo configuration, /ws lets Chromium compress (permessage-deflate).
    assert.equal(await page.locator("#status").getAttribute("title"), "WebSocket /ws · permessage-deflate: dashboard, news");
    assert.match(await page.locator(".hero p").textContent(), /WebSocket pub\/sub broker/);

    // Every demo has a card linking to a page that exists.
    const links = await page.locator("a.demo").evaluateAll((as) => as.map((a) => a.getAttribute("href")));
    assert.deepEqual(links, ["draw.html", "chat.html", "log.html", "dashboard.html", "countdown.html", "echo.html"]);
    for (const href of links) assert.equal((await fetch(herald.url("/" + href))).status, 200, href);

    // Broker-wide figures fill in.
    await page.waitForFunction(() => /^\d/.test(document.querySelector('[data-fig="connections"]').textContent));

    // A chat page open elsewhere, saying things: the chat card counts it.
    const chat = await newPage(context);
    await chat.goto(herald.url("/chat.html?room=lobby&nick=zed"));
    await waitConnected(chat);
    await fig(page, '[data-demo="chat"]', "clients").filter({ hasText: /^1$/ }).waitFor({ timeout: 5000 });
    const talk = setInterval(() => chat.locator("#text").fill("hi").then(() => chat.locator("#text").press("Enter")).catch(() => {}), 100);
    try {
      await page.waitForFunction(() => Number(document.querySelector('[data-demo="chat"] [data-fig="rate"]').textContent) > 0,
        null, { timeout: 5000 });
    } finally {
      clearInterval(talk);
    }
    // The front page reads the figures from channel "dashboard", not as a client of the
    // /dashboard route: the dashboard card counts the dashboard pages open, none so far.
    await fig(page, '[data-demo="dashboard"]', "clients").filter({ hasText: /^0$/ }).waitFor();
    const dash = await newPage(context);
    await dash.goto(herald.url("/dashboard.html"));
    await fig(page, '[data-demo="dashboard"]', "clients").filter({ hasText: /^1$/ }).waitFor();
    await dash.close();

    // A message published over HTTP shows up in the "news" box.
    await herald.publish("news", "hello from the test <i>as text</i>");
    await page.locator("#news .text", { hasText: "hello from the test <i>as text</i>" }).waitFor();
    assert.equal(await page.locator("#news i").count(), 0);
    assert.match(await page.locator("#curl").textContent(), new RegExp(`127\\.0\\.0\\.1:${herald.port}/pub/news`));

    await screenshot(page, "index-desktop-light");
    await page.emulateMedia({ colorScheme: "dark" });
    await screenshot(page, "index-desktop-dark-full", { fullPage: true });
    await page.setViewportSize(PHONE);
    await screenshot(page, "index-phone-dark");
  });
});
