// draw.html: a stroke drawn in one browser shows up in another, a late joiner gets the picture,
// strokes are sent in batches rather than a message per pointer move, touch draws too, and
// clear clears everywhere.
import assert from "node:assert/strict";
import test from "node:test";
import { PHONE, newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";

const BLUE = "#0ea5e9";
const GREEN = "#22c55e";

const rgb = (hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));

// How many pixels of the board are (close to) a colour.
function countColor(hex, tolerance = 30) {
  const [r, g, b] = rgb(hex);
  const c = document.querySelector("#board");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - r) <= tolerance && Math.abs(d[i + 1] - g) <= tolerance && Math.abs(d[i + 2] - b) <= tolerance) n++;
  }
  return n;
}
const COUNT = `(${countColor.toString()})`;
const rgbSrc = `const rgb = ${rgb.toString()};`;

async function pixels(page, hex) {
  return page.evaluate(`${rgbSrc} ${COUNT}(${JSON.stringify(hex)})`);
}

/** Wait until the board has from `min` to `max` pixels of colour hex; returns how many. */
async function waitPixels(page, hex, { min = 0, max = Infinity }, timeout = 5000) {
  await page.waitForFunction(
    `(() => { ${rgbSrc} const n = ${COUNT}(${JSON.stringify(hex)}); return n >= ${min} && n <= ${max === Infinity ? "Infinity" : max}; })()`,
    null, { timeout, polling: 50 });
  return pixels(page, hex);
}

async function openBoard(context, herald, options) {
  const page = await newPage(context, options);
  await page.goto(herald.url("/draw.html?room=test"));
  await waitConnected(page);
  return page;
}

test("draw: strokes are shared, batched, replayed to late joiners, and cleared", { timeout: 90000 }, async () => {
  await withSetup("draw", async ({ herald, context }) => {
    const a = await openBoard(context, herald);
    const b = await openBoard(context, herald, { colorScheme: "dark" });
    assert.equal(await pixels(b, BLUE), 0, "the board starts empty");

    await a.locator(`[data-color="${BLUE}"]`).click();
    await a.locator("#width").fill("12");

    // A fast zig-zag with the mouse: 240 moves sent without waiting for each (as a quick hand
    // makes them, several per frame).
    const box = await a.locator("#board").boundingBox();
    const x0 = box.x + box.width * 0.25;
    const y0 = box.y + box.height * 0.3;
    const mouse = await context.newCDPSession(a);
    const event = (type, x, y) => mouse.send("Input.dispatchMouseEvent",
      { type, x, y, button: "left", buttons: type === "mouseReleased" ? 0 : 1, clickCount: 1 });
    const started = Date.now();
    await event("mouseMoved", x0, y0);
    await event("mousePressed", x0, y0);
    const moves = [];
    for (let i = 1; i <= 240; i++) {
      const leg = Math.floor((i - 1) / 60);
      const t = ((i - 1) % 60 + 1) / 60;
      const x = x0 + (leg + t) * box.width * 0.12;
      const y = y0 + (leg % 2 ? 1 - t : t) * box.height * 0.3;
      moves.push(event("mouseMoved", x, y));
    }
    await Promise.all(moves);
    await event("mouseReleased", x0 + 4 * box.width * 0.12, y0);
    const elapsed = Date.now() - started;

    const onB = await waitPixels(b, BLUE, { min: 500 });
    assert.ok(await pixels(a, BLUE) > 500, "the stroke is drawn where it was made");
    // Batched: about one message per 30 ms of drawing, each with many points; not one per move.
    const pieces = a.sent.filter((p) => p.includes('"stroke"')).map((p) => JSON.parse(p));
    const points = pieces.reduce((n, piece) => n + piece.points.length, 0);
    assert.ok(pieces.length >= 1, "stroke messages were sent");
    assert.ok(pieces.every((piece) => piece.color === BLUE && piece.width === 12), "colour and width as chosen");
    assert.ok(pieces.length <= Math.ceil(elapsed / 25) + 2 && pieces.length * 4 <= points,
      `${pieces.length} stroke messages with ${points} points for 240 moves in ${elapsed} ms`);

    // A late joiner (same size as B) sees the same picture.
    const c = await openBoard(context, herald);
    const onC = await waitPixels(c, BLUE, { min: Math.floor(onB * 0.9) });
    assert.ok(Math.abs(onC - onB) <= onB * 0.05, `late joiner: ${onC} pixels, the live page ${onB}`);

    // Touch on a phone-sized page draws too, and shows up on the others.
    const phone = await openBoard(context, herald, { viewport: PHONE, colorScheme: "dark" });
    await phone.locator(`[data-color="${GREEN}"]`).click();
    const pbox = await phone.locator("#board").boundingBox();
    const cdp = await context.newCDPSession(phone);
    await cdp.send("Emulation.setTouchEmulationEnabled", { enabled: true, maxTouchPoints: 1 });
    const tx = pbox.x + pbox.width * 0.2;
    const ty = pbox.y + pbox.height * 0.45;
    await cdp.send("Input.dispatchTouchEvent", { type: "touchStart", touchPoints: [{ x: tx, y: ty }] });
    for (let i = 1; i <= 30; i++) {
      await cdp.send("Input.dispatchTouchEvent", { type: "touchMove", touchPoints: [{ x: tx + i * 8, y: ty + Math.sin(i / 4) * 30 }] });
    }
    await cdp.send("Input.dispatchTouchEvent", { type: "touchEnd", touchPoints: [] });
    await waitPixels(b, GREEN, { min: 100 });
    await waitPixels(phone, BLUE, { min: 50 }); // the phone shows the picture too, smaller
    await screenshot(b, "draw-desktop-dark");
    await screenshot(phone, "draw-phone-dark");
    await screenshot(a, "draw-desktop-light");

    // Clear on C clears A and B, and a page opened afterwards gets an empty board.
    await c.locator("#clear").click();
    await waitPixels(a, BLUE, { max: 0 });
    await waitPixels(b, BLUE, { max: 0 });
    await waitPixels(b, GREEN, { max: 0 });
    const d = await openBoard(context, herald);
    await d.locator('#info:has-text("room test · 0 pieces")').waitFor();
    assert.equal(await pixels(d, BLUE), 0);
  });
});
