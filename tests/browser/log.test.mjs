// log.html: lines appended to the tailed file show up as table rows, coloured by status class;
// the filter and the status toggles hide rows; pause holds new lines back; the sparkline counts
// requests; the table keeps a bounded number of rows.
import assert from "node:assert/strict";
import test from "node:test";
import { PHONE, newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";

let n = 0;
function line(path, status, { method = "GET", size = 1234, agent = "browser-test/1.0", client } = {}) {
  const t = new Date();
  const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const p2 = (v) => String(v).padStart(2, "0");
  const when = `${p2(t.getUTCDate())}/${months[t.getUTCMonth()]}/${t.getUTCFullYear()}:` +
    `${p2(t.getUTCHours())}:${p2(t.getUTCMinutes())}:${p2(t.getUTCSeconds())} +0000`;
  n++;
  return `${client || "10.1.2." + (n % 250)} - - [${when}] "${method} ${path} HTTP/1.1" ${status} ${size} "-" "${agent}"`;
}

const row = (page, path) => page.locator("#rows tr", { has: page.locator(`td.path[title="${path}"]`) });
const visibleRows = (page) => page.locator("#rows tr:visible").count();

test("log: live rows, colours, filter, pause, sparkline, bounded table", { timeout: 90000 }, async () => {
  await withSetup("log", async ({ herald, context }) => {
    const page = await newPage(context);
    await page.goto(herald.url("/log.html"));
    await waitConnected(page);

    // Appended lines appear, parsed into columns.
    herald.appendTail(line("/t/alpha", 200), line("/t/beta", 404, { method: "POST", client: "10.9.8.7" }), line("/t/gamma", 503, { size: 0 }),
      line("/t/upgrade", 101, { size: 0 }));
    await row(page, "/t/gamma").waitFor({ timeout: 5000 });
    await row(page, "/t/alpha").waitFor({ timeout: 5000 });
    await row(page, "/t/upgrade").waitFor({ timeout: 5000 }); // a WebSocket handshake is shown too
    const cells = await row(page, "/t/beta").locator("td").allTextContents();
    assert.equal(cells[1], "10.9.8.7");
    assert.equal(cells[2], "POST");
    assert.equal(cells[4], "404");
    assert.equal(cells[5], "1.2 KB");
    assert.equal(cells[6], "browser-test/1.0");

    // Coloured by status class.
    assert.equal(await row(page, "/t/alpha").getAttribute("class").then((c) => c.includes("s2")), true);
    assert.equal(await row(page, "/t/beta").getAttribute("class").then((c) => c.includes("s4")), true);
    const colour = (path) => row(page, path).locator(".code").evaluate((e) => getComputedStyle(e).color);
    const colours = new Set([await colour("/t/alpha"), await colour("/t/beta"), await colour("/t/gamma")]);
    assert.equal(colours.size, 3, "2xx, 4xx and 5xx look different");

    // The filter hides rows that do not match.
    await page.locator("#filter").fill("/t/beta");
    await row(page, "/t/alpha").waitFor({ state: "hidden" });
    assert.equal(await visibleRows(page), 1);
    assert.ok(await row(page, "/t/beta").isVisible());
    herald.appendTail(line("/t/delta", 200), line("/t/beta/again", 200));
    await row(page, "/t/beta/again").waitFor();
    assert.ok(await row(page, "/t/delta").isHidden(), "a new row that does not match is hidden too");
    await page.locator("#filter").fill("");
    await row(page, "/t/alpha").waitFor();

    // Status toggles: without 5xx, gamma goes.
    await page.locator('.chip-toggle[data-class="5"]').click();
    await row(page, "/t/gamma").waitFor({ state: "hidden" });
    await page.locator('.chip-toggle[data-class="5"]').click();
    await row(page, "/t/gamma").waitFor();

    // The sparkline counts the requests of the last seconds: a burst of ten spans two seconds at
    // most, so one of them counts five or more.
    herald.appendTail(...Array.from({ length: 10 }, (_, i) => line(`/t/burst/${i}`, 200)));
    await row(page, "/t/burst/9").waitFor();
    await page.waitForFunction(() => Number(document.querySelector("#spark").dataset.peak) >= 5);
    await screenshot(page, "log-desktop-light");

    // Pause holds new lines back until resumed.
    await page.locator("#pause").click();
    herald.appendTail(line("/t/held", 302));
    await page.locator("#pause", { hasText: "Resume (1 new)" }).waitFor();
    assert.equal(await row(page, "/t/held").count(), 0);
    await page.locator("#pause").click();
    await row(page, "/t/held").waitFor();

    // At most 500 rows are kept.
    herald.appendTail(...Array.from({ length: 600 }, (_, i) => line(`/t/many/${i}`, 200)));
    await row(page, "/t/many/599").waitFor();
    assert.equal(await page.locator("#rows tr").count(), 500);
    assert.equal(await row(page, "/t/alpha").count(), 0, "the oldest rows went");

    await page.setViewportSize(PHONE);
    await page.emulateMedia({ colorScheme: "dark" });
    await page.locator("#filter").fill("many/59");
    await screenshot(page, "log-phone-dark");
  });
});
