// countdown.html counts 10 .. 1 and shows BOOM!, and counts again on request; echo.html gets
// back what was typed, on the built-in route and on the Lua one.
import assert from "node:assert/strict";
import test from "node:test";
import { PHONE, newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";

test("countdown: 10 to 1, then BOOM!, then again", { timeout: 60000 }, async () => {
  await withSetup("countdown", async ({ herald, context }) => {
    const page = await newPage(context);
    await page.goto(herald.url("/countdown.html"));
    await waitConnected(page);
    // Ten pauses of at most 0.95 s each.
    await page.locator("#count .boom", { hasText: "BOOM!" }).waitFor({ timeout: 15000 });
    const ticks = (await page.locator("#ticks .chip").allTextContents()).map((t) => t.split(" ")[0]);
    assert.deepEqual(ticks, ["10", "9", "8", "7", "6", "5", "4", "3", "2", "1", "BOOM!"]);
    await screenshot(page, "countdown-desktop-light");

    await page.locator("#again").click();
    await page.locator("#count .tick", { hasText: /^(10|9|8)$/ }).waitFor();
    assert.ok(await page.locator("#again").isDisabled(), "no second count while one runs");
  });
});

test("echo: what is typed comes back, on /echo and /echo-lua", { timeout: 60000 }, async () => {
  await withSetup("echo", async ({ herald, context }) => {
    const page = await newPage(context, { viewport: PHONE, colorScheme: "dark" });
    await page.goto(herald.url("/echo.html"));
    await waitConnected(page);

    const echo = async (text) => {
      await page.locator("#text").fill(text);
      await page.locator("#text").press("Enter");
      await page.locator(".line.in .text", { hasText: text }).waitFor();
      assert.equal(await page.locator(".line.in .text").first().textContent(), text);
      assert.match(await page.locator(".line.in .rtt").first().textContent(), /^\d+(\.\d+)? ms$/);
      assert.equal(await page.locator("#text").inputValue(), "", "the box is emptied");
    };
    await echo("hello, herald ✓ <b>not bold</b>");
    assert.ok(page.sent.includes("hello, herald ✓ <b>not bold</b>"), "sent as typed");

    await page.locator("#route").selectOption("/echo-lua");
    await waitConnected(page);
    await echo("and back from Lua");
    const stats = await herald.stats();
    assert.equal(stats.routes.find((r) => r.path === "/echo-lua").messages, 1);
    assert.equal(stats.routes.find((r) => r.path === "/echo").messages, 1);
    await screenshot(page, "echo-phone-dark");
  });
});
