"""Lua routes: the hooks and their arguments, the herald module, the client object, timers, error
and runaway containment, the memory bound, and reloading (docs/lua.md).

Most tests run tests/scripts/probe.lua, which reports what its hooks receive and misbehaves on
request (see the comment at its top)."""
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time

import pytest
import websockets

from herald_util import (REPO, RawWS, expect_silence, handshake_status, herald_bin, line_of, recv,
                         recv_json, run, script_stats, ws_connect)

SCRIPTS = REPO / "tests" / "scripts"
PROBE = SCRIPTS / "probe.lua"


def routes(*extra):
    return [
        {"path": "/ws", "kind": "pubsub"},
        {"path": "/sub/", "kind": "raw", "publish": True},
        {"path": "/echo", "kind": "echo"},
        {"path": "/probe", "script": str(PROBE)},
    ] + list(extra)


PROBE_CONFIG = dict(routes=routes())


def route_stats(h, path):
    for r in h.stats()["routes"]:
        if r["path"] == path:
            return r
    raise AssertionError("no route stats for %s" % path)


async def open_probe(h, query="", **kw):
    """Connect to /probe: (ws, the open hook's report); the caller closes ws."""
    ws = await ws_connect(h, "/probe" + query, **kw)
    return ws, await recv_json(ws)


@contextlib.asynccontextmanager
async def probe(h, query="", **kw):
    """Connect to /probe: (ws, the open hook's report), closed on leaving."""
    async with ws_connect(h, "/probe" + query, **kw) as ws:
        yield ws, await recv_json(ws)


async def still_serving(h):
    """The broker and its other routes are up: /echo echoes, /stats answers."""
    async with ws_connect(h, "/echo") as ws:
        await ws.send("still there?")
        assert await recv(ws) == "still there?"
    assert h.stats()["connections"] >= 1


# --- hooks and their arguments -----------------------------------------------------------------

@pytest.mark.herald(**PROBE_CONFIG)
def test_open_gets_client_and_request(herald):
    async def main():
        async with probe(herald, "?name=ann&x=a%20b+c&empty=&flag&pct=%E2%82%AC",
                         extra_headers={"X-Test": "Yes", "X-Multi": "one"}) as (ws, o):
            assert o["hook"] == "open"
            assert isinstance(o["id"], int) and o["id"] > 0
            assert o["addr"] == "127.0.0.1"
            assert o["path"] == "/probe"
            assert o["route"] == "/probe"
            assert o["connected"] is True
            assert o["query"] == {"name": "ann", "x": "a b c", "empty": "", "flag": "", "pct": "€"}
            hdrs = o["headers"]
            assert hdrs["x-test"] == "Yes"
            assert hdrs["host"] == "127.0.0.1:%d" % herald.port
            assert hdrs["upgrade"] == "websocket"
            assert all(k == k.lower() for k in hdrs)
            # client.data and the id are the same object later on
            await ws.send("!data")
            d = await recv_json(ws)
            assert d["id"] == o["id"] and d["data"]["name"] == "ann"
        async with probe(herald) as (ws2, o2):
            assert o2["id"] != o["id"]
            assert o2["query"] == {}
    run(main())
    s = script_stats(herald, "/probe")
    assert s["calls"]["open"] == 2 and s["errors"] == 0


@pytest.mark.herald(**PROBE_CONFIG)
def test_message_gets_data_and_type(herald):
    async def main():
        async with probe(herald) as (ws, _):
            await ws.send("hello")
            assert await recv_json(ws) == {"hook": "message", "data": "hello", "is_binary": False}
            await ws.send("héllo ✓")
            assert (await recv_json(ws))["data"] == "héllo ✓"
            await ws.send("")
            assert (await recv_json(ws))["data"] == ""
            blob = bytes([0, 255, 1, 254]) * 1000
            await ws.send(blob)
            assert await recv_json(ws) == {"hook": "message", "length": len(blob), "is_binary": True}
            assert await recv(ws) == blob
    run(main())
    s = script_stats(herald, "/probe")
    assert s["calls"]["message"] == 4
    assert route_stats(herald, "/probe")["messages"] == 4


@pytest.mark.herald(**PROBE_CONFIG)
def test_close_gets_code_and_reason_once(herald):
    async def main():
        async with probe(herald, "?watch=1") as (watch, _):
            # the client closes with a code and reason
            ws, o = await open_probe(herald, "?name=bob")
            await ws.close(4001, "bye now")
            ev = await recv_json(watch)
            assert ev == {"hook": "close", "id": o["id"], "code": 4001, "reason": "bye now",
                          "connected": False, "name": "bob"}
            # a close frame without a status code
            with RawWS(herald.port, "/probe") as raw:
                o = json.loads(raw.recv_message()[1])
                raw.send_close()
                raw.expect_close(None)
            ev = await recv_json(watch)
            assert ev["id"] == o["id"] and ev["code"] == 1005 and ev["reason"] == ""
            # the TCP connection just goes
            ws, o = await open_probe(herald)
            ws.transport.abort()
            ev = await recv_json(watch)
            assert ev["id"] == o["id"] and ev["code"] == 1006
            # the script closes the client: the client gets the code and reason, the hook runs once
            ws, o = await open_probe(herald)
            await ws.send("!close 4002 done")
            ev = await recv_json(watch)
            assert ev["id"] == o["id"] and ev["code"] == 4002 and ev["reason"] == "done"
            with pytest.raises(websockets.ConnectionClosed):
                await recv(ws)  # no "after close": send on a closed client does nothing
            assert ws.close_code == 4002 and ws.close_reason == "done"
            await expect_silence(watch, 0.3)
    run(main())
    s = script_stats(herald, "/probe")
    assert s["calls"]["close"] == 5  # four clients and the watcher, each once
    assert s["clients"] == 0 and s["errors"] == 0


@pytest.mark.herald(**PROBE_CONFIG)
def test_open_can_refuse(herald):
    before = script_stats(herald, "/probe")
    r = handshake_status(herald, "/probe?refuse=not%20welcome%20here")
    assert r.status == 403
    assert b"not welcome here" in r.body
    after = script_stats(herald, "/probe")
    assert after["calls"]["open"] == before["calls"]["open"] + 1
    assert after["calls"]["close"] == before["calls"]["close"]  # never opened, never closed
    assert after["clients"] == 0 and after["errors"] == 0
    assert herald.stats()["websockets"] == 0
    run(still_serving(herald))


@pytest.mark.herald(**PROBE_CONFIG)
def test_sends_and_subscriptions_from_open_follow_the_handshake(herald):
    async def main():
        async with probe(herald, "?sub=plain") as (ws, o):
            assert o["hook"] == "open"
            r = herald.publish("plain", "first")
            assert r.json()["subscribers"] == 1
            assert await recv(ws) == "first"
    run(main())


# --- deliver -------------------------------------------------------------------------------------

@pytest.mark.herald(**PROBE_CONFIG)
def test_deliver_transforms_and_drops(herald):
    async def main():
        async with probe(herald) as (ws, _):
            for ch in ("upper", "drop", "json", "bin", "text", "plain", "other"):
                await ws.send("!sub " + ch)
                assert await recv_json(ws) == {"result": True}
            await ws.send("!sub plain")
            assert await recv_json(ws) == {"result": False}  # already subscribed
            herald.publish("upper", "shout")
            assert await recv(ws) == "SHOUT"
            herald.publish("drop", "never seen")
            herald.publish("plain", "after the dropped one")
            assert await recv(ws) == "after the dropped one"
            seq = herald.publish("json", "payload").json()["seq"]
            m = await recv(ws)
            assert isinstance(m, str)
            assert json.loads(m) == {"channel": "json", "data": "payload", "seq": seq}
            herald.publish("bin", "x")
            assert await recv(ws) == b"\x00\x01\x02\xff"
            herald.publish("text", "as text")
            assert await recv(ws) == "as text"
            herald.publish("other", "data")
            assert await recv(ws) == "[other] data"
            # a JSON string published on the generic route arrives as its contents
            async with ws_connect(herald, "/ws") as pub:
                await pub.send(json.dumps({"op": "publish", "channel": "plain", "data": "hi"}))
                assert (await recv_json(pub))["op"] == "published"
                assert await recv(ws) == "hi"
                await pub.send(json.dumps({"op": "publish", "channel": "plain", "data": {"k": [1]}}))
                await recv_json(pub)
                assert json.loads(await recv(ws)) == {"k": [1]}
            await ws.send("!unsub other")
            assert await recv_json(ws) == {"result": True}
            await ws.send("!unsub other")
            assert await recv_json(ws) == {"result": False}
            herald.publish("other", "gone")
            herald.publish("plain", "last")
            assert await recv(ws) == "last"
    run(main())
    s = script_stats(herald, "/probe")
    assert s["deliver_dropped"] == 1
    assert s["errors"] == 0


@pytest.mark.herald(routes=routes({"path": "/fan", "script": str(SCRIPTS / "fan.lua")}),
                    limits={"max_connections_per_ip": 5000})
def test_deliver_runs_once_per_message_with_1000_subscribers(herald):
    n_clients, n_messages = 1000, 5

    async def main():
        clients = []
        for start in range(0, n_clients, 100):
            batch = await asyncio.gather(*(ws_connect(herald, "/fan") for _ in range(100)))
            clients.extend(batch)
        assert herald.stats()["websockets"] == n_clients
        before_route = route_stats(herald, "/fan")["deliver_calls"]
        before_script = script_stats(herald, "/fan")["calls"]["deliver"]
        for i in range(n_messages):
            herald.publish("fan", "m%d" % i)

        async def receive_all(ws):
            return [await recv(ws, 20) for _ in range(n_messages)]

        got = await asyncio.gather(*(receive_all(ws) for ws in clients))
        expected = ["m%d (delivery %d)" % (i, i + 1) for i in range(n_messages)]
        assert all(g == expected for g in got)
        assert route_stats(herald, "/fan")["deliver_calls"] - before_route == n_messages
        assert script_stats(herald, "/fan")["calls"]["deliver"] - before_script == n_messages
        await asyncio.gather(*(ws.close() for ws in clients))
    run(main(), timeout=120)


# --- timers --------------------------------------------------------------------------------------

@pytest.mark.herald(**PROBE_CONFIG)
def test_timers_fire_repeat_and_cancel(herald):
    async def main():
        async with probe(herald) as (ws, _):
            t0 = time.monotonic()
            await ws.send("!timer 0.1")
            m = await recv_json(ws)
            assert m["timer"] == "fired" and m["handle"].startswith("timer")
            assert time.monotonic() - t0 >= 0.09
            await ws.send("!every 0.02 3")
            assert [await recv_json(ws) for _ in range(3)] == [{"every": 1}, {"every": 2}, {"every": 3}]
            assert await recv_json(ws) == {"every": "done", "cancelled": True, "again": False}
            await ws.send("!cancel")
            # the cancelled timer (0.05 s) never fires; the one after it (0.2 s) does
            assert await recv_json(ws) == {"timer": "after", "first": True, "second": False}
            await expect_silence(ws, 0.2)
            await ws.send("!badtimer")
            m = await recv_json(ws)
            assert m["ok"] is False and "at least 0.001" in m["err"]
            # an every timer goes on after an error in its callback
            await ws.send("!everyerror")
            assert await recv_json(ws) == {"every_error_runs": 3}
    run(main())
    s = script_stats(herald, "/probe")
    assert s["timers"] == 0
    assert s["calls"]["timer"] == 8
    assert s["errors"] == 3


# --- errors, runaway scripts, memory -------------------------------------------------------------

@pytest.mark.herald(**PROBE_CONFIG)
def test_error_in_each_hook_is_contained_logged_and_counted(herald):
    src = str(PROBE)

    def expect_error(hook, text, start):
        line = herald.wait_log(re.escape(text), start)
        assert "warn" in line and "/probe" in line and ("in %s:" % hook) in line, line
        assert "probe.lua:%d: %s" % (line_of(src, text), text) in line, line

    async def main():
        # open: the handshake fails with 500; the connection and the broker go on
        mark = herald.log_mark()
        r = handshake_status(herald, "/probe?fail=open")
        assert r.status == 500
        expect_error("open", "open failed on purpose", mark)
        watch, _ = await open_probe(herald, "?watch=1")
        ws, _ = await open_probe(herald, "?failclose=1")
        # message: the client stays connected
        mark = herald.log_mark()
        await ws.send("!error")
        expect_error("message", "message failed on purpose", mark)
        await ws.send("hi")
        assert (await recv_json(ws))["data"] == "hi"
        # an error that is not a string still has a place
        mark = herald.log_mark()
        await ws.send("!errortable")
        line = herald.wait_log(r"error object is a table value", mark)
        assert "probe.lua:%d:" % line_of(src, "function commands.errortable") in line
        # deliver: the message is dropped for this route only
        for ch in ("fail", "plain"):
            await ws.send("!sub " + ch)
            await recv_json(ws)
        async with ws_connect(herald, "/sub/fail") as raw:
            mark = herald.log_mark()
            herald.publish("fail", "boom")
            assert await recv(raw) == "boom"  # other routes still get it
            expect_error("deliver", "deliver failed on purpose", mark)
            herald.publish("plain", "next")
            assert await recv(ws) == "next"
        # timer
        mark = herald.log_mark()
        await ws.send("!timererror")
        expect_error("timer", "timer failed on purpose", mark)
        assert await recv_json(ws) == {"timer": "still alive"}
        # close
        mark = herald.log_mark()
        await ws.close()
        ev = await recv_json(watch)
        assert ev["hook"] == "close"
        expect_error("close", "close failed on purpose", mark)
        # a script cannot end the broker
        await watch.send("!exit")
        herald.wait_log("os.exit is not available", mark)
        await watch.send("hi")
        assert (await recv_json(watch))["data"] == "hi"
        await still_serving(herald)
        await watch.close()
    run(main())
    s = script_stats(herald, "/probe")
    assert s["errors"] == 7
    assert "os.exit is not available" in s["last_error"]
    assert herald.metrics().count('herald_script_errors_total{path="/probe"} 7') == 1


@pytest.mark.herald(**PROBE_CONFIG)
def test_errors_on_every_message_do_not_drown_the_log(herald):
    """A few error lines a second per route; the rest are counted, and told at the next line."""
    async def main():
        ws, _ = await open_probe(herald)
        mark = herald.log_mark()
        await ws.send("hi")
        await recv_json(ws)
        for _ in range(100):  # one burst: read and failed within a second or two
            await ws.send("!error")
        await ws.send("hi")  # answered after the 100 have failed
        assert (await recv_json(ws))["data"] == "hi"
        assert script_stats(herald, "/probe")["errors"] == 100
        herald.wait_log("message failed on purpose", mark)
        assert 1 <= len(herald.log_since(mark, "message failed on purpose")) <= 20
        # In a later second, the next error's line comes after a count of those not logged.
        deadline = time.monotonic() + 10
        while not herald.log_since(mark, "more errors were not logged") and time.monotonic() < deadline:
            await ws.send("!error")
            await asyncio.sleep(0.25)
        told = herald.log_since(mark, "more errors were not logged")
        assert told, "no count of the errors not logged"
        assert "on route /probe" in told[0] and int(re.search(r": (\d+) more", told[0]).group(1)) >= 80
        await ws.close()
    run(main())


@pytest.mark.herald(**PROBE_CONFIG)
def test_endless_loop_is_stopped_and_counted(herald):
    async def main():
        async with probe(herald) as (ws, _):
            for cmd in ("!loop", "!pcallloop"):
                mark = herald.log_mark()
                t0 = time.monotonic()
                await ws.send(cmd)
                line = herald.wait_log("script stopped", mark, timeout=30)
                assert "probe.lua:" in line and "in message" in line
                assert time.monotonic() - t0 < 20
                await ws.send("still here?")  # the client stays connected and served
                assert (await recv_json(ws, 30))["data"] == "still here?"
            # in deliver: the message is dropped, the next one goes through
            await ws.send("!sub loop")
            await recv_json(ws)
            await ws.send("!sub plain")
            await recv_json(ws)
            mark = herald.log_mark()
            herald.publish("loop", "x")
            herald.wait_log("in deliver: .*script stopped", mark, timeout=30)
            herald.publish("plain", "after the loop")
            assert await recv(ws, 30) == "after the loop"
        # in open: the handshake fails
        r = handshake_status(herald, "/probe?loop=open")
        assert r.status == 500
        await still_serving(herald)
    run(main(), timeout=120)
    s = script_stats(herald, "/probe")
    assert s["runaway"] == 4
    assert s["errors"] == 4


@pytest.mark.herald(**PROBE_CONFIG)
def test_memory_is_bounded(herald):
    async def main():
        async with probe(herald) as (ws, _):
            for cmd in ("!alloc", "!bigstring"):
                mark = herald.log_mark()
                await ws.send(cmd)
                line = herald.wait_log("memory", mark, timeout=30)
                assert "in message" in line and "probe.lua" in line
                await ws.send("fine again")
                assert (await recv_json(ws, 30))["data"] == "fine again"
    run(main(), timeout=120)
    s = script_stats(herald, "/probe")
    assert s["memory_errors"] == 2 and s["errors"] == 2
    assert s["memory_peak"] <= s["memory_limit"] == 64 << 20
    assert s["memory"] < 8 << 20  # the garbage was collected
    run(still_serving(herald))


# --- the herald module and the client object ----------------------------------------------------

@pytest.mark.herald(**PROBE_CONFIG)
def test_publish_and_channel_info(herald):
    async def main():
        async with probe(herald) as (a, _), probe(herald, "?sub=plain") as (b, _), \
                ws_connect(herald, "/ws?subscribe=tbl") as generic:
            await a.send("!pub plain hello")
            m = await recv_json(a)
            assert m["subscribers"] == 1 and m["seq"] == 1  # a fresh broker: the first
            assert await recv(b) == "hello"
            await a.send("!channel plain")
            assert await recv_json(a) == {"subscribers": 1, "seq": m["seq"]}
            await a.send("!channel nobody")
            assert await recv_json(a) == {"subscribers": 0, "seq": 0}
            await a.send("!pubtable tbl")
            seq = (await recv_json(a))["seq"]
            assert await recv_json(generic) == {"op": "message", "channel": "tbl", "seq": seq,
                                                "data": {"a": 1, "list": ["x", "y"]}}
            await a.send("!badsub")
            m = await recv_json(a)
            assert m["ok"] is False and "invalid channel name" in m["err"] and "bad name!" in m["err"]
    run(main())


@pytest.mark.herald(**PROBE_CONFIG)
def test_module_helpers_and_client_fields(herald):
    async def main():
        async with probe(herald) as (ws, o):
            await ws.send("!json")
            assert await recv_json(ws) == {"n": "integer", "f": 1.5, "deep": "integer", "null": True,
                                           "bad": True, "err": "string"}
            await ws.send("!stats")
            assert await recv_json(ws) == {"connections": 1, "integer": "integer"}
            await ws.send("!clients")
            assert await recv_json(ws) == {"clients": [o["id"]], "me": True, "none": True}
            await ws.send("!readonly")
            m = await recv_json(ws)
            assert m["ok"] is False and "client.id is read-only" in m["err"]
            assert m["nick"] == "custom field"
            await ws.send("!data color blue")
            assert (await recv_json(ws))["data"]["color"] == "blue"
            await ws.send("!data")
            assert (await recv_json(ws))["data"]["color"] == "blue"  # kept between calls
            await ws.send("!sendbinary")
            assert await recv(ws) == b"\x00\x01\x02\xff"
            await ws.send("!sendbadtext")
            m = await recv_json(ws)
            assert m["ok"] is False and "valid UTF-8" in m["err"]
            await ws.send("!badclose")
            m = await recv_json(ws)
            assert m["ok"] is False and "1005" in m["err"]
            mark = herald.log_mark()
            await ws.send("!log warn")
            assert await recv_json(ws) == {"logged": "warn"}
            assert "warn: script /probe: probe says 42 true" in herald.wait_log("probe says", mark)
            await ws.send("!print")
            await recv_json(ws)
            assert "info: script /probe: printed by probe" in herald.wait_log("printed by", mark)
    run(main())


@pytest.mark.herald(**PROBE_CONFIG)
def test_client_object_outlives_its_connection_harmlessly(herald):
    async def main():
        a, _ = await open_probe(herald, "?name=gone")
        await a.send("!zombie")
        assert await recv_json(a) == {"zombie": "kept"}
        await a.close()
        async with probe(herald) as (b, _):
            await b.send("!usezombie")
            assert await recv_json(b) == {"send": [None, "closed"], "subscribe": [None, "closed"],
                                          "close": [None, "closed"], "connected": False,
                                          "data": "gone"}
    run(main())
    assert script_stats(herald, "/probe")["errors"] == 0


@pytest.mark.herald(**PROBE_CONFIG)
def test_metrics_show_script_figures(herald):
    async def main():
        ws, _ = await open_probe(herald)
        await ws.close()
    run(main())
    text = herald.metrics()
    assert re.search(r'herald_script_calls_total\{path="/probe",hook="open"\} 1\n', text)
    for name in ("errors_total", "runaway_total", "memory_errors_total", "load_errors_total",
                 "memory_bytes"):
        assert re.search(r'herald_script_%s\{path="/probe"\} \d+\n' % name, text), name


# --- loading -------------------------------------------------------------------------------------

def check_config(tmp_path, script_text, name="bad.lua"):
    (tmp_path / name).write_text(script_text)
    (tmp_path / "cfg.lua").write_text('routes = { { path = "/x", script = "%s" } }\n' % name)
    return subprocess.run([herald_bin(), "--check", "--config", str(tmp_path / "cfg.lua")],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("text, expected", [
    ("return {\n  open = function(client)\n    local x = = 1\n  end,\n}\n",
     r"bad\.lua:3: unexpected symbol near '='"),
    ("local t = nil\nlocal n = t.field\nreturn {}\n", r"bad\.lua:2: attempt to index a nil value"),
    ("error('refusing to load')\n", r"bad\.lua:1: refusing to load"),
    ("while true do end\n", r"bad\.lua:1: script stopped"),
    ("return 42\n", r"bad\.lua: the script must return a table of hooks"),
    ("return { mesage = function() end }\n", r"bad\.lua: unknown hook mesage"),
    ("return { open = 'not a function' }\n", r"bad\.lua: hook open must be a function, not string"),
    ("herald.publish('x', 'y')\nreturn {}\n",
     r"bad\.lua:1: herald\.publish cannot be used while the script loads"),
    ("setmetatable({}, { __gc = function() while true do end end })\nreturn {}\n",
     r"bad\.lua:1: __gc metamethods are not available"),
    ("debug.setmetatable(1, {})\nreturn {}\n", r"bad\.lua:1: debug\.setmetatable is not available"),
])
def test_a_script_that_does_not_load_fails_start_up(tmp_path, text, expected):
    r = check_config(tmp_path, text)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), r.stderr


def test_require_finds_modules_next_to_the_script(herald_factory, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "greeting.lua").write_text(
        "local M = {}\nfunction M.greet(name) return 'hello ' .. name end\nreturn M\n")
    (tmp_path / "lib" / "main.lua").write_text(
        "local greeting = require 'greeting'\nlocal h = require 'herald'\n"
        "return { open = function(client) client:send(greeting.greet(h.route)) end }\n")
    h = herald_factory(routes=routes({"path": "/greet", "script": str(tmp_path / "lib" / "main.lua")}))

    async def main():
        async with ws_connect(h, "/greet") as ws:
            assert await recv(ws) == "hello /greet"
    run(main())


def test_a_good_script_passes_the_check(tmp_path):
    r = check_config(tmp_path, "herald.every(1, function() end)\nreturn { message = function() end }\n",
                     "good.lua")
    assert r.returncode == 0 and "configuration OK" in r.stdout, r


# --- reloading -----------------------------------------------------------------------------------

RELOAD_TEMPLATE = (SCRIPTS / "reload.lua").read_text()


def reload_script(version, broken=False):
    text = RELOAD_TEMPLATE.replace('"v1"', '"%s"' % version)
    if broken:
        text = "local x = = 1\n" + text
    return text


def reload_routes(tmp_path):
    path = tmp_path / "reload.lua"
    path.write_text(reload_script("v1"))
    return path, routes({"path": "/reload", "script": str(path)})


def test_reload_keeps_connections_data_and_state(herald_factory, tmp_path):
    path, rts = reload_routes(tmp_path)
    h = herald_factory(routes=rts)

    async def main():
        async with ws_connect(h, "/reload") as ws, ws_connect(h, "/sub/ticks") as ticks:
            await ws.send("who")
            assert await recv(ws) == "v1 who joined=v1 loads=1"
            assert await recv(ticks) == "v1"
            path.write_text(reload_script("v2"))
            h.wait_log(r"script .*reload\.lua reloaded on route /reload", h.reload())
            await ws.send("who")
            # the new hooks serve the old connection, whose client.data survived, as did herald.state
            assert await recv(ws) == "v2 who joined=v1 loads=2"
            # the timer started at load by v1 was replaced by v2's
            while await recv(ticks) == "v1":
                pass
            for _ in range(5):
                assert await recv(ticks) == "v2"
    run(main())
    s = script_stats(h, "/reload")
    assert s["reloads"] == 1 and s["load_errors"] == 0 and s["timers"] == 1


def test_reload_with_a_broken_script_keeps_the_old_one(herald_factory, tmp_path):
    path, rts = reload_routes(tmp_path)
    h = herald_factory(routes=rts)

    async def main():
        async with ws_connect(h, "/reload") as ws, ws_connect(h, "/sub/ticks") as ticks:
            for text, problem in ((reload_script("v2", broken=True),
                                   r"reload\.lua:1: unexpected symbol near '='"),
                                  (reload_script("v2").replace("return {", "error('no, not now')\nreturn {"),
                                   r"reload\.lua:\d+: no, not now")):
                path.write_text(text)
                line = h.wait_log(problem, h.reload())
                assert "error" in line and "keeps running the previous version" in line, line
                await ws.send("still")
                assert await recv(ws) == "v1 still joined=v1 loads=1"
                # a new connection gets the old version too
                async with ws_connect(h, "/reload") as fresh:
                    await fresh.send("new")
                    assert (await recv(fresh)).startswith("v1 new joined=v1")
            # only v1's load-time timer runs: the failed version's was cancelled
            for _ in range(5):
                assert await recv(ticks) == "v1"
            s = script_stats(h, "/reload")
            assert s["load_errors"] == 2 and s["reloads"] == 0 and s["timers"] == 1
            assert "no, not now" in s["last_error"]
            path.write_text(reload_script("v3"))
            h.wait_log(r"reloaded on route /reload", h.reload())
            await ws.send("fixed")
            assert await recv(ws) == "v3 fixed joined=v1 loads=3"
    run(main())


def test_reload_under_traffic_with_200_clients(herald_factory, tmp_path):
    path, rts = reload_routes(tmp_path)
    h = herald_factory(routes=rts)
    n_clients, before_reload, after_reload = 200, 150, 100

    async def main():
        clients = []
        for _ in range(n_clients // 50):
            clients += await asyncio.gather(*(ws_connect(h, "/reload") for _ in range(50)))
        received = [[] for _ in clients]

        async def reader(i, ws):
            while True:
                received[i].append(await ws.recv())

        readers = [asyncio.ensure_future(reader(i, ws)) for i, ws in enumerate(clients)]
        async with ws_connect(h, "/ws") as pub:
            async def publish(n):
                await pub.send(json.dumps({"op": "publish", "channel": "traffic", "data": str(n)}))
                assert (await recv_json(pub))["op"] == "published"

            n = 0
            mark = h.log_mark()
            for _ in range(before_reload):
                n += 1
                await publish(n)
                if n == before_reload // 2:
                    path.write_text(reload_script("v2"))
                    os.kill(h.pid, signal.SIGHUP)  # and keep publishing while it reloads
            await asyncio.to_thread(h.wait_log, "reloaded on route /reload", mark)
            for _ in range(after_reload):
                n += 1
                await publish(n)
            total = n

            async def all_in():
                while any(len(r) < total for r in received):
                    await asyncio.sleep(0.02)
            await asyncio.wait_for(all_in(), 30)
        assert all(ws.open for ws in clients)
        for r in received:
            assert len(r) == total
            versions = [m.split(":")[0] for m in r]
            numbers = [int(m.split(":")[1]) for m in r]
            assert numbers == list(range(1, total + 1))  # none lost, none twice, in order
            first_v2 = versions.index("v2")
            assert set(versions[:first_v2]) == {"v1"} and set(versions[first_v2:]) == {"v2"}
            assert before_reload // 2 <= first_v2 <= before_reload
        for t in readers:
            t.cancel()
        # A client from before the reload is served by the new hooks, with its data kept.
        await clients[0].send("check")
        assert await recv(clients[0]) == "v2 check joined=v1 loads=2"
        assert h.stats()["websockets"] == n_clients
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)

    run(main(), timeout=180)
    s = script_stats(h, "/reload")
    assert s["reloads"] == 1 and s["errors"] == 0
