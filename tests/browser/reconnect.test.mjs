// Every page notices when the broker goes away, says so, comes back by itself when the broker is
// restarted on the same port, says that too, and works again: what each shows comes from the new
// broker.
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

    // What the pages show from the first broker, to tell it from what the second one sends: the
    // figures' uptime, and the countdown's chips (marked as old; a new connection clears them).
    const [index, draw, chat, log, dashboard, countdown, echo] = pages;
    const indexUptime = ".figures [data-fig='uptime']";
    const uptimeBefore = await index.locator(indexUptime).textContent();
    const dashboardUptimeBefore = await dashboard.locator("#uptime").textContent();
    await countdown.locator("#ticks").evaluate((t) => t.querySelectorAll(".chip").forEach((c) => (c.dataset.old = "1")));

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
    // WebSocket, not on its Server-Sent Events fallback. Its figures, and the dashboard's, come
    // from the new broker (the uptime shown changes).
    const changed = ([sel, before]) => {
      const text = document.querySelector(sel).textContent;
      return text !== before && /^\d/.test(text);
    };
    await index.waitForFunction(changed, [indexUptime, uptimeBefore]);
    assert.equal(await index.locator("#status").getAttribute("data-transport"), "websocket");
    await dashboard.waitForFunction(changed, ["#uptime", dashboardUptimeBefore]);
    // The countdown starts again on the new connection: fresh chips from 10 down, none old.
    await countdown.locator("#ticks .chip:not([data-old])", { hasText: /^9 / }).waitFor();
    assert.equal(await countdown.locator("#ticks .chip[data-old]").count(), 0);
    assert.match(await countdown.locator("#ticks .chip").first().textContent(), /^10$/);
    await chat.locator(".notice", { hasText: "Reconnected." }).waitFor();
    await chat.locator("#people li", { hasText: "ann" }).waitFor();
    await echo.locator("#text").fill("still here");
    await echo.locator("#text").press("Enter");
    await echo.locator(".line.in .text", { hasText: "still here" }).waitFor();
    herald.appendTail('127.0.0.9 - - [01/Jan/2030:00:00:00 +0000] "GET /after-restart HTTP/1.1" 200 5 "-" "test"');
    await log.locator("td.path", { hasText: "/after-restart" }).waitFor();
    // A stroke drawn after the restart reaches the new broker: a page opened afterwards gets it.
    await waitConnected(draw);
    await draw.bringToFront();
    const box = await draw.locator("#board").boundingBox();
    await draw.mouse.move(box.x + box.width * 0.3, box.y + box.height * 0.4);
    await draw.mouse.down();
    for (let i = 1; i <= 10; i++) await draw.mouse.move(box.x + box.width * (0.3 + i * 0.03), box.y + box.height * 0.4);
    await draw.mouse.up();
    const late = await newPage(context);
    await late.goto(herald.url("/draw.html"));
    await late.locator("#info", { hasText: /^room default · [1-9]\d* pieces?$/ }).waitFor();
  });
});
