// Chat: rooms, nicknames and who is here, on the /chat route (scripts/chat.lua).
// Everything a user wrote is put in the page as text (textContent), never as HTML.

import { connect, showStatus, toast } from "./herald.js";
import { colorFor, el } from "./ui.js";

const MAX_MESSAGES = 1000;  // kept on the page; older ones go
const GROUP_MS = 5 * 60e3;  // a message within this of the same person's previous one joins it
const ROOMS = ["lobby", "random", "herald"];
const ROOM_RE = /^[A-Za-z0-9_.:-]{1,64}$/;

const $ = (sel) => document.querySelector(sel);
const messages = $("#messages");
const jump = $("#jump");
const text = $("#text");

const params = new URLSearchParams(location.search);
let nick = params.get("nick") || localStorage.getItem("herald.nick") || "";
let room = params.get("room") || localStorage.getItem("herald.room") || "lobby";
if (!ROOM_RE.test(room)) room = "lobby";
let me = null;         // the nickname the server gave us (it may have added a number)
let conn = null;
let unread = 0;
let marker = null;     // the "new" line above the first unread message
let last = null;       // the last message shown: { nick, time, node } for grouping

// --- joining --------------------------------------------------------------------------------------

function chatPath() {
  return `/chat?room=${encodeURIComponent(room)}&nick=${encodeURIComponent(nick)}`;
}

function showJoin() {
  $("#chat").classList.add("hidden");
  $("#join").classList.remove("hidden");
  $("#join-nick").value = nick;
  $("#join-room").value = room;
  $("#join-nick").focus();
}

$("#join").addEventListener("submit", (e) => {
  e.preventDefault();
  nick = $("#join-nick").value.trim();
  const wanted = $("#join-room").value.trim() || "lobby";
  if (!nick) return;
  localStorage.setItem("herald.nick", nick);
  $("#join").classList.add("hidden");
  start(wanted);
});

function rename() {
  if (conn) conn.close();
  conn = null;
  showJoin();
}
$("#rename").addEventListener("click", rename);
$("#me").addEventListener("click", rename);

function start(wanted) {
  $("#chat").classList.remove("hidden");
  enter(wanted);
  text.focus();
}

/** Go to a room: a new connection there, and a clean page. */
function enter(wanted) {
  room = wanted;
  localStorage.setItem("herald.room", room);
  const url = new URL(location.href);
  url.searchParams.set("room", room);
  url.searchParams.delete("nick");
  history.replaceState(null, "", url);
  messages.replaceChildren();
  last = marker = null;
  unread = 0;
  updateUnread();
  renderRooms();
  if (conn) {
    conn.retarget(chatPath());
  } else {
    // A WebSocket only, no Server-Sent Events fallback: the page sends (joins, messages).
    conn = connect(chatPath());
    showStatus(conn, $("#status"));
    conn.on("message", receive);
    conn.on("open", ({ reconnected }) => {
      if (reconnected) notice("Reconnected.");
    });
    conn.on("close", () => notice("Connection lost: reconnecting…", "bad"));
  }
}

// --- rooms and people ----------------------------------------------------------------------------------

function renderRooms() {
  const known = new Set([...ROOMS, ...(JSON.parse(localStorage.getItem("herald.rooms") || "[]")), room]);
  localStorage.setItem("herald.rooms", JSON.stringify([...known].filter((r) => !ROOMS.includes(r)).slice(-8)));
  $("#rooms").replaceChildren(...[...known].map((r) =>
    el("li", {}, el("button", {
      type: "button",
      "aria-current": r === room ? "true" : "false",
      onclick: () => r !== room && enter(r),
    }, "# " + r))));
}

$("#new-room").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("#room-name").value.trim();
  if (!ROOM_RE.test(name)) {
    toast("Room names are 1 to 64 of A-Z a-z 0-9 _ - . :", { kind: "bad" });
    return;
  }
  $("#room-name").value = "";
  enter(name);
});

function avatar(name) {
  return el("span", { class: "avatar", style: { background: colorFor(name) }, "aria-hidden": "true" },
    [...name][0] || "?");
}

function renderPeople(nicks) {
  $("#count").textContent = `(${nicks.length})`;
  $("#people").replaceChildren(...nicks.map((n) =>
    el("li", {}, avatar(n), el("span", {}, n), n === me ? el("span", { class: "muted" }, "(you)") : null)));
}

// --- messages ------------------------------------------------------------------------------------------

const atBottom = () => messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

/** Add a node at the end, keep the view at the bottom if it was there, and count it as unread if
 *  it is a message nobody is looking at. */
function append(node, isMessage) {
  const stick = atBottom();
  const unseen = isMessage && (!stick || document.hidden);
  if (unseen) {
    if (unread === 0) {
      if (marker) marker.remove();
      marker = el("div", { class: "unread-marker", role: "separator" }, "new");
      messages.append(marker);
    }
    unread++;
  }
  messages.append(node);
  while (messages.childElementCount > MAX_MESSAGES) messages.firstElementChild.remove();
  if (stick) messages.scrollTop = messages.scrollHeight;
  updateUnread();
}

function notice(words, kind = "") {
  last = null;
  append(el("div", { class: "notice " + kind }, words), false);
}

function message({ nick: who, text: words, time }) {
  const mine = who === me;
  const cont = last && last.nick === who && time - last.time < GROUP_MS;
  const node = el("div", { class: `msg${mine ? " mine" : ""}${cont ? " cont" : ""}` },
    avatar(who),
    el("div", { class: "who" }, who, el("time", { datetime: new Date(time).toISOString() }, clock(time))),
    el("div", { class: "text" }, words));
  last = { nick: who, time };
  append(node, !mine);
}

function receive(msg) {
  switch (msg.type) {
    case "welcome":
      me = msg.nick;
      $("#me").textContent = me;
      $("#me").classList.remove("hidden");
      renderPeople(msg.nicks);
      notice(`You joined #${msg.room} as ${me}.`);
      break;
    case "join":
      renderPeople(msg.nicks);
      if (msg.nick !== me) notice(`${msg.nick} joined.`);
      break;
    case "leave":
      renderPeople(msg.nicks);
      notice(`${msg.nick} left.`);
      break;
    case "who":
      renderPeople(msg.nicks);
      break;
    case "message":
      message(msg);
      break;
    case "error":
      notice("The server said: " + msg.error, "bad");
      break;
  }
}

// --- unread -----------------------------------------------------------------------------------------

function updateUnread() {
  if (unread && atBottom() && !document.hidden) unread = 0;
  document.title = (unread ? `(${unread}) ` : "") + "Chat · herald";
  jump.textContent = `${unread} new message${unread === 1 ? "" : "s"} ↓`;
  jump.classList.toggle("hidden", unread === 0 || atBottom());
}

messages.addEventListener("scroll", updateUnread);
document.addEventListener("visibilitychange", updateUnread);
jump.addEventListener("click", () => {
  messages.scrollTop = messages.scrollHeight;
  updateUnread();
});

// --- writing -----------------------------------------------------------------------------------------

function send() {
  const words = text.value;
  if (!words.trim()) return;
  if (new TextEncoder().encode(words).length > 4000) {
    toast("A message is at most 4000 bytes", { kind: "bad" });
    return;
  }
  if (!conn || !conn.send({ type: "message", text: words })) {
    toast("Not connected: your message was not sent", { kind: "bad" });
    return;
  }
  text.value = "";
  grow();
  if (marker) {
    marker.remove();
    marker = null;
  }
  messages.scrollTop = messages.scrollHeight;
}

function grow() {
  text.style.height = "";
  text.style.height = Math.min(text.scrollHeight + 2, 140) + "px";
}

$("#compose").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
text.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
text.addEventListener("input", grow);

if (nick) start(room);
else showJoin();
