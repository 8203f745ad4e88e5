// dashboard.html: the charts move with the broker's traffic: messages published over HTTP show
// in the messages-in chart, the page's own load button shows in the connections and
// messages-out charts, and the routes table lists the demo routes.
import assert from "node:assert/strict";
import test from "node:test";
import { PHONE, newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";

const figures = (page, id) => page.locator(id).evaluate((c) => ({
  last: JSON.parse(c.dataset.last || "[]"),
  peak: Number(c.dataset.peak || 0),
  pixels: c.toDataURL(),
}));

test("dashboard: the charts follow the traffic", { timeout: 90000 }, async () => {
  await withSetup("dashboard", async ({ herald, context }) => {
    const page = await newPage(context, { colorScheme: "dark" });
    await page.goto(herald.url("/dashboard.html"));
    await waitConnected(page);
    await page.waitForFunction(() => document.querySelector("#chart-messages").dataset.last);
    const before = await figures(page, "#chart-messages");
    assert.ok(before.peak < 50, `a quiet broker: ${before.peak} messages/s`);

    // 300 messages over HTTP, 20 at a time: the messages-in line climbs.
    for (let i = 0; i < 300; i += 20) {
      await Promise.all(Array.from({ length: 20 }, (_, j) => herald.publish("load", `message ${i + j}`)));
    }
    await page.waitForFunction(() => Number(document.querySelector("#chart-messages").dataset.peak) >= 50,
      null, { timeout: 5000 });
    const after = await figures(page, "#chart-messages");
    assert.notEqual(after.pixels, before.pixels, "the chart was redrawn");
    assert.ok(after.peak >= 50);

    // The page's load button: 4 more connections, 3 subscribers getting 200 messages/s each.
    const connectionsBefore = (await figures(page, "#chart-connections")).peak;
    await page.locator("#load").click();
    await page.waitForFunction((base) => Number(document.querySelector("#chart-connections").dataset.peak) >= base + 4,
      connectionsBefore, { timeout: 5000 });
    await page.waitForFunction(() => JSON.parse(document.querySelector("#chart-messages").dataset.last)[1] >= 300,
      null, { timeout: 5000 });
    await page.locator('#routes tr:has(code:text-is("/dashboard")) td:nth-child(3):text-is("1")').waitFor();
    assert.ok(Number(await page.locator('[data-fig="websockets"]').textContent()) >= 5);
    await screenshot(page, "dashboard-desktop-dark");

    await page.setViewportSize(PHONE);
    await page.emulateMedia({ colorScheme: "light" });
    await screenshot(page, "dashboard-phone-light");
    await page.locator("#load:enabled").waitFor({ timeout: 10000 });
  });
});
