// Every page notices when the broker goes away, says so, comes back by itself when the broker is
// restarted on the same port, says that too, and works again.
import assert from "node:assert/strict";
import test from "node:test";
import { newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";

const PAGES = ["/", "/draw.html", "/chat.html?room=re&nick=ann", "/log.html", "/dashboard.html",
  "/countdown.html", "/echo.html"];

test("reconnect: each page reconnects after a broker restart and says so", { timeout: 90000 }, async () => {
  await withSetup("reconnect", async ({ herald, context }) => {
    const pages = [];
    for (const path of PAGES) {
      const page = await newPage(context);
      await page.goto(herald.url(path));
      pages.push(page);
    }
    for (const page of pages) await waitConnected(page);

    // Down: every page shows it lost the connection.
    const port = herald.port;
    await herald.stop();
    await Promise.all(pages.map(async (page) => {
      await page.locator('#status[data-state="reconnecting"]').waitFor();
      await page.locator(".toast", { hasText: "Connection lost" }).waitFor();
    }));
    await screenshot(pages[2], "reconnect-chat-down");

    // Up again on the same port: every page is back, and says so.
    await herald.start(port);
    await Promise.all(pages.map(async (page) => {
      await page.locator('#status[data-state="open"][data-reconnects="1"]').waitFor({ timeout: 15000 });
      await page.locator(".toast", { hasText: "Reconnected" }).waitFor();
      assert.equal(await page.locator(".toast", { hasText: "Connection lost" }).count(), 0);
    }));
    await screenshot(pages[4], "reconnect-dashboard-back");

    // And they work again. The front page, whose WebSocket had opened before, took the failed
    // tries meanwhile for the broker being away, not for WebSocket being blocked: it is back on
    // WebSocket, not on its Server-Sent Events fallback.
    const [index, , chat, log, , , echo] = pages;
    await index.locator(".figures [data-fig='uptime']").waitFor();
    assert.equal(await index.locator("#status").getAttribute("data-transport"), "websocket");
    await chat.locator(".notice", { hasText: "Reconnected." }).waitFor();
    await chat.locator("#people li", { hasText: "ann" }).waitFor();
    await echo.locator("#text").fill("still here");
    await echo.locator("#text").press("Enter");
    await echo.locator(".line.in .text", { hasText: "still here" }).waitFor();
    herald.appendTail('127.0.0.9 - - [01/Jan/2030:00:00:00 +0000] "GET /after-restart HTTP/1.1" 200 5 "-" "test"');
    await log.locator("td.path", { hasText: "/after-restart" }).waitFor();
    await waitConnected(pages[1]);
  });
});
