// chat.html: messages reach the room, stay text whatever they hold, who is here is listed,
// joins and leaves are announced, and messages that arrive out of view are marked unread.
import assert from "node:assert/strict";
import test from "node:test";
import { PHONE, newPage, screenshot, waitConnected, withSetup } from "./lib/harness.mjs";

async function join(context, herald, query, options) {
  const page = await newPage(context, options);
  await page.goto(herald.url("/chat.html" + query));
  await waitConnected(page);
  return page;
}

async function say(page, text) {
  await page.locator("#text").fill(text);
  await page.locator("#text").press("Enter");
}

async function waitPeople(page, names) {
  await page.waitForFunction((want) =>
    JSON.stringify([...document.querySelectorAll("#people li > span:nth-child(2)")].map((n) => n.textContent)) === JSON.stringify(want),
  names);
}

test("chat: messages, safe text, who is here, notices, unread marker", { timeout: 90000 }, async () => {
  await withSetup("chat", async ({ herald, context }) => {
    const ann = await join(context, herald, "?room=test&nick=ann");
    const bob = await join(context, herald, "?room=test&nick=bob", { viewport: PHONE, colorScheme: "dark" });

    // Who is here: both, on both pages; ann is told bob came.
    await waitPeople(ann, ["ann", "bob"]);
    await waitPeople(bob, ["ann", "bob"]);
    await ann.locator(".notice", { hasText: "bob joined." }).waitFor();

    // A message from ann appears for bob.
    await say(ann, "hello bob");
    await bob.locator(".msg .text", { hasText: "hello bob" }).waitFor();
    assert.equal(await bob.locator(".msg .who").last().textContent().then((t) => t.startsWith("ann")), true);

    // Markup in a message stays text: nothing is created, nothing runs.
    const evil = ['<script>window.__xss = 1</script>', '<img src="x" onerror="window.__xss = 2">', '<b>bold</b>'];
    for (const text of evil) await say(ann, text);
    for (const text of evil) await bob.locator(".msg .text", { hasText: text }).waitFor();
    for (const page of [ann, bob]) {
      assert.equal(await page.locator("#messages script, #messages img, #messages b").count(), 0, "no element from a message");
      assert.equal(await page.evaluate(() => window.__xss), undefined, "no script from a message ran");
    }
    await screenshot(bob, "chat-phone-dark");

    // Unread: bob scrolls up, ann writes; bob gets a marker above it and a jump button.
    for (let i = 1; i <= 25; i++) await say(ann, `line ${i} of a long story`);
    await bob.locator(".msg .text", { hasText: "line 25 of" }).waitFor();
    await bob.locator("#messages").evaluate((m) => (m.scrollTop = 0));
    await say(ann, "are you still reading?");
    await bob.locator(".unread-marker").waitFor();
    await bob.locator("#jump", { hasText: "1 new message" }).waitFor();
    assert.match(await bob.title(), /^\(1\) /);
    const afterMarker = await bob.locator(".unread-marker + .msg .text").textContent();
    assert.equal(afterMarker, "are you still reading?");
    await bob.locator("#jump").click();
    await bob.locator("#jump").waitFor({ state: "hidden" });
    assert.doesNotMatch(await bob.title(), /^\(/);

    // A third person joins through the form.
    const cy = await newPage(context);
    await cy.goto(herald.url("/chat.html?room=test"));
    await cy.locator("#join-nick").fill("cy");
    await cy.locator("#join button[type=submit]").click();
    await waitConnected(cy);
    await waitPeople(ann, ["ann", "bob", "cy"]);
    await say(cy, "hi all");
    await ann.locator(".msg .text", { hasText: "hi all" }).waitFor();
    await screenshot(ann, "chat-desktop-light");

    // bob leaves: ann is told, and the list follows.
    await bob.close();
    await ann.locator(".notice", { hasText: "bob left." }).waitFor();
    await waitPeople(ann, ["ann", "cy"]);
    await waitPeople(cy, ["ann", "cy"]);
  });
});
