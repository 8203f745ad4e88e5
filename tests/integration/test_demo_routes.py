"""The demo Lua routes in scripts/, each held to what its header promises: echo, chat (rooms,
nicknames, who is here), draw (a late joiner gets the picture, clear, bounded history), logstream
(parsed access-log fields, parsed once per line), countdown (10 .. 1 then BOOM!), dashboard (the
broker's figures every second)."""
import asyncio
import json
import subprocess
import time

import pytest

from herald_util import (REPO, expect_silence, handshake_status, herald_bin, recv, recv_json, run,
                         script_stats, ws_connect)

DEMO = REPO / "scripts"


def demo_routes():
    """As in herald.lua, permessage-deflate included (python3-websockets offers it, so these tests
    talk to the JSON routes compressed, as browsers do)."""
    return [
        {"path": "/ws", "kind": "pubsub", "deflate": True},
        {"path": "/sub/", "kind": "raw", "publish": True},
        {"path": "/echo-lua", "script": str(DEMO / "echo.lua")},
        {"path": "/chat", "script": str(DEMO / "chat.lua"), "deflate": True},
        {"path": "/draw", "script": str(DEMO / "draw.lua"), "deflate": True},
        {"path": "/log", "script": str(DEMO / "logstream.lua"), "deflate": True},
        {"path": "/dashboard", "script": str(DEMO / "dashboard.lua"), "deflate": True},
        {"path": "/countdown", "script": str(DEMO / "countdown.lua")},
    ]


DEMO_CONFIG = dict(routes=demo_routes())


def test_demo_configuration_is_valid():
    r = subprocess.run([herald_bin(), "--check", "--config", "herald.lua"], cwd=str(REPO),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = (REPO / "herald.lua").read_text()
    for path in ("/echo-lua", "/chat", "/draw", "/log", "/dashboard", "/countdown"):
        assert 'path = "%s"' % path in text


# --- echo ----------------------------------------------------------------------------------------

@pytest.mark.herald(**DEMO_CONFIG)
def test_echo(herald):
    async def main():
        async with ws_connect(herald, "/echo-lua") as ws:
            for msg in ("hello", "", "ünïcödé ✓", b"\x00\xff\x01", "x" * 60000, bytes(range(256))):
                await ws.send(msg)
                assert await recv(ws) == msg
    run(main())


# --- chat ----------------------------------------------------------------------------------------

@pytest.mark.herald(**DEMO_CONFIG)
def test_chat_rooms_nicknames_and_who_is_here(herald):
    async def join(room, nick):
        ws = await ws_connect(herald, "/chat?room=%s&nick=%s" % (room, nick))
        return ws, await recv_json(ws)

    async def main():
        ann, w = await join("lobby", "ann")
        assert w == {"type": "welcome", "room": "lobby", "nick": "ann", "nicks": ["ann"]}
        bob, w = await join("lobby", "bob")
        assert w["nicks"] == ["ann", "bob"] and w["nick"] == "bob"
        j = await recv_json(ann)
        assert j["type"] == "join" and j["nick"] == "bob" and j["nicks"] == ["ann", "bob"]
        assert abs(j["time"] / 1000 - time.time()) < 60
        # the same nickname again gets a number
        ann2, w = await join("lobby", "ann")
        assert w["nick"] == "ann (2)" and w["nicks"] == ["ann", "ann (2)", "bob"]
        for ws in (ann, bob):
            assert (await recv_json(ws))["nick"] == "ann (2)"
        # another room hears nothing of this one
        carol, w = await join("kitchen", "carol")
        assert w["nicks"] == ["carol"]
        # a message reaches everyone in the room, the sender too
        await ann.send(json.dumps({"type": "message", "text": "hello room"}))
        for ws in (ann, bob, ann2):
            m = await recv_json(ws)
            assert m["type"] == "message" and m["nick"] == "ann" and m["text"] == "hello room"
        await bob.send("plain words")  # text that is not JSON is a message too
        for ws in (ann, bob, ann2):
            assert (await recv_json(ws))["text"] == "plain words"
        # who is here: to the asker only
        await bob.send(json.dumps({"type": "who"}))
        assert await recv_json(bob) == {"type": "who", "nicks": ["ann", "ann (2)", "bob"]}
        await ann.send(json.dumps({"type": "dance"}))
        assert (await recv_json(ann))["type"] == "error"
        await expect_silence(carol, 0.2)
        await expect_silence(bob, 0.1)
        # who is here survives a reload of the script
        await asyncio.to_thread(herald.reload)
        await carol.send(json.dumps({"type": "who"}))
        assert await recv_json(carol) == {"type": "who", "nicks": ["carol"]}
        await bob.send(json.dumps({"type": "who"}))
        assert (await recv_json(bob))["nicks"] == ["ann", "ann (2)", "bob"]
        # leaving
        await bob.close()
        for ws in (ann, ann2):
            m = await recv_json(ws)
            assert m["type"] == "leave" and m["nick"] == "bob" and m["nicks"] == ["ann", "ann (2)"]
        for ws in (ann, ann2, carol):
            await ws.close()
    run(main())
    assert script_stats(herald, "/chat")["errors"] == 0


@pytest.mark.herald(**DEMO_CONFIG)
def test_chat_names(herald):
    async def main():
        async with ws_connect(herald, "/chat?nick=Zo%C3%AB") as ws:
            w = await recv_json(ws)
            assert w["room"] == "lobby" and w["nick"] == "Zoë"
        async with ws_connect(herald, "/chat?room=long&nick=" + "n" * 50) as ws:
            assert (await recv_json(ws))["nick"] == "n" * 32
        async with ws_connect(herald, "/chat?room=anon") as ws:
            assert (await recv_json(ws))["nick"].startswith("guest-")
    run(main())
    r = handshake_status(herald, "/chat?room=no%20spaces")
    assert r.status == 403 and b"room names" in r.body


# --- draw ----------------------------------------------------------------------------------------

def stroke(i, color="#1e90ff"):
    return {"type": "stroke", "points": [[i, i + 0.5], [i + 1, i + 2]], "color": color, "width": 3}


@pytest.mark.herald(**DEMO_CONFIG)
def test_draw_late_joiner_gets_the_picture(herald):
    async def main():
        a = await ws_connect(herald, "/draw?room=r1")
        wa = await recv_json(a)
        assert wa["type"] == "welcome" and wa["room"] == "r1" and wa["strokes"] == 0
        drawn = []
        for i in range(3):
            await a.send(json.dumps(stroke(i)))
            s = await recv_json(a)  # everyone gets it, the drawer too
            assert s["type"] == "stroke" and s["id"] == wa["id"]
            assert s["points"] == stroke(i)["points"] and s["color"] == "#1e90ff" and s["width"] == 3
            drawn.append(s)
        b = await ws_connect(herald, "/draw?room=r1")
        wb = await recv_json(b)
        assert wb["strokes"] == 3 and wb["id"] != wa["id"]
        assert [await recv_json(b) for _ in range(3)] == drawn
        await a.send(json.dumps(stroke(7, "rgb(1, 2, 3)")))
        live = await recv_json(b)
        assert live["points"] == stroke(7)["points"] and live["color"] == "rgb(1, 2, 3)"
        assert await recv_json(a) == live
        # another room has its own canvas
        async with ws_connect(herald, "/draw?room=r2") as other:
            assert (await recv_json(other))["strokes"] == 0
        # bad strokes are refused to the sender only
        for bad in ({"type": "stroke", "points": []}, {"type": "stroke", "points": [[1, "x"]]},
                    {"type": "stroke", "points": [[1, 2]], "width": 1000},
                    {"type": "stroke", "points": [[1, 2]], "color": "red; x: url(y)"},
                    {"type": "erase"}, "not json"):
            await a.send(bad if isinstance(bad, str) else json.dumps(bad))
            assert (await recv_json(a))["type"] == "error"
        await expect_silence(b, 0.2)
        # the picture survives a reload
        await asyncio.to_thread(herald.reload)
        async with ws_connect(herald, "/draw?room=r1") as c:
            assert (await recv_json(c))["strokes"] == 4
        # clear: everyone is told, and a new joiner gets an empty canvas
        await b.send(json.dumps({"type": "clear"}))
        for ws in (a, b):
            assert await recv_json(ws) == {"type": "clear", "id": wb["id"]}
        async with ws_connect(herald, "/draw?room=r1") as c:
            assert (await recv_json(c))["strokes"] == 0
            await expect_silence(c, 0.2)
        await a.close()
        await b.close()
    run(main())
    assert script_stats(herald, "/draw")["errors"] == 0


@pytest.mark.herald(routes=demo_routes(), limits={"message_rate": 100000})
def test_draw_history_is_bounded(herald):
    n = 2010  # the script keeps 2000 strokes

    async def main():
        async with ws_connect(herald, "/draw?room=big") as a:
            await recv_json(a)
            for i in range(n):
                await a.send(json.dumps(stroke(i)))
            for i in range(n):
                assert (await recv_json(a))["points"][0][0] == i
            async with ws_connect(herald, "/draw?room=big") as b:
                w = await recv_json(b)
                assert w["strokes"] == 2000
                first = await recv_json(b)
                assert first["points"][0][0] == n - 2000  # the oldest went first
    run(main(), timeout=120)


# --- logstream -----------------------------------------------------------------------------------

LINE = '127.0.0.1 - - [21/Nov/2026:14:36:04 +0000] "GET /stats HTTP/1.1" 200 387 "-" "curl/7.88.1"'


@pytest.mark.herald(**DEMO_CONFIG)
def test_logstream_parses_each_line_once(herald):
    lines = [
        (LINE, {"time": "2026-11-21T14:36:04+00:00", "client": "127.0.0.1", "user": "-",
                "method": "GET", "path": "/stats", "protocol": "HTTP/1.1", "status": 200,
                "bytes": 387, "referrer": "-", "agent": "curl/7.88.1"}),
        ('10.1.2.3 - bob [01/Jan/2026:00:00:09 -0530] "POST /pub/a?q=\\"x\\" HTTP/1.0" 404 - '
         '"http://example.com/\\x41" "Agent \\"Q\\" 1.0"',
         {"time": "2026-01-01T00:00:09-05:30", "client": "10.1.2.3", "user": "bob",
          "method": "POST", "path": '/pub/a?q="x"', "protocol": "HTTP/1.0", "status": 404,
          "bytes": 0, "referrer": "http://example.com/A", "agent": 'Agent "Q" 1.0'}),
        ("not an access log line", {"raw": "not an access log line"}),
    ]

    async def main():
        watchers = [await ws_connect(herald, "/log") for _ in range(3)]
        before = script_stats(herald, "/log")["calls"]["deliver"]
        for line, _ in lines:
            r = herald.publish("log:access", line)
            assert r.json()["subscribers"] == 3
        for ws in watchers:
            for _, expected in lines:
                assert await recv_json(ws) == expected
        assert script_stats(herald, "/log")["calls"]["deliver"] - before == len(lines)
        for ws in watchers:
            await ws.close()
    run(main())
    assert handshake_status(herald, "/log?channel=secrets").status == 403


@pytest.mark.herald(routes=demo_routes(), access_log="access.log",
                    tail=[{"path": "access.log", "channel": "log:access"}])
def test_logstream_shows_the_brokers_own_access_log(herald):
    herald.wait_stats(lambda s: s["tail"][0]["state"] == "following", 10)

    async def main():
        async with ws_connect(herald, "/log") as ws:
            herald.request("GET", "/stats?from=logstream", headers={"User-Agent": "logstream-test/1"})
            deadline = time.monotonic() + 10
            while True:  # our own handshake is in the log too
                m = await recv_json(ws, max(0.1, deadline - time.monotonic()))
                if m.get("agent") == "logstream-test/1":
                    break
            assert m["method"] == "GET" and m["path"] == "/stats?from=logstream"
            assert m["status"] == 200 and m["bytes"] > 0 and m["client"] == "127.0.0.1"
            assert m["protocol"] == "HTTP/1.1" and m["time"][4] == "-" and "T" in m["time"]
    run(main())


# --- countdown -----------------------------------------------------------------------------------

@pytest.mark.herald(**DEMO_CONFIG)
def test_countdown_ends_with_boom(herald):
    async def count(ws):
        got, times = [], []
        while not got or got[-1] != "BOOM!":
            got.append(await recv(ws, 3))
            times.append(time.monotonic())
        gaps = [b - a for a, b in zip(times, times[1:])]
        return got, gaps

    async def main():
        async with ws_connect(herald, "/countdown") as ws:
            got, gaps = await count(ws)
            # Each within recv's 3 s (the pauses are under a second: not timed on this clock).
            assert got == [str(n) for n in range(10, 0, -1)] + ["BOOM!"]
            # Random pauses of 0.05 to 0.95 s, not a fixed beat: ten of them spread wider than
            # 0.2 s but once in about 95,000 counts.
            assert max(gaps) - min(gaps) > 0.2, gaps
            await expect_silence(ws, 0.3)
            await ws.send("again")
            got, _ = await count(ws)
            assert got[0] == "10" and got[-1] == "BOOM!" and len(got) == 11
        # leaving in the middle of a count cancels its timer
        async with ws_connect(herald, "/countdown") as ws:
            assert await recv(ws) == "10"
        s = herald.wait_stats(lambda s: next(x for x in s["scripts"]
                                             if x["path"] == "/countdown")["timers"] == 0)
        assert next(x for x in s["scripts"] if x["path"] == "/countdown")["timers"] == 0
    run(main(), timeout=60)
    assert script_stats(herald, "/countdown")["errors"] == 0


# --- dashboard -----------------------------------------------------------------------------------

@pytest.mark.herald(**DEMO_CONFIG)
def test_dashboard_publishes_figures_every_second(herald):
    async def main():
        async with ws_connect(herald, "/dashboard") as ws, ws_connect(herald, "/sub/dashboard") as raw:
            first = await recv_json(ws, 3)
            assert first["type"] == "stats"
            for key in ("connections", "websockets", "channels", "subscriptions", "messages_in",
                        "messages_out", "bytes_out", "uptime_s", "routes", "scripts"):
                assert key in first, key
            assert first["websockets"] >= 1 and isinstance(first["connections"], int)
            assert set(first["rates"]) >= {"messages_in", "messages_out", "bytes_in", "bytes_out"}
            for i in range(20):
                herald.publish("busy", "m%d" % i)
            deadline = time.monotonic() + 6
            while True:
                m = await recv_json(ws, 3)
                assert m["time"] > first["time"]
                if m["messages_in"] >= first["messages_in"] + 20 and m["rates"]["messages_in"] > 0:
                    break
                assert time.monotonic() < deadline, m
            # other routes can read the same channel
            while json.loads(await recv(raw, 3))["time"] < m["time"]:
                pass
            # About once a second, by the broker's clock (the "time" of each set, in ms).
            times = [m["time"]] + [(await recv_json(ws, 3))["time"] for _ in range(3)]
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert all(500 <= g <= 2000 for g in gaps), gaps
    run(main(), timeout=60)
    assert script_stats(herald, "/dashboard")["errors"] == 0
