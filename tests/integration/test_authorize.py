"""The authorize hook: a built-in route's authorize script (/ws ops and its ?subscribe= list, /sub/
handshakes and raw publishing, event streams), a script route's hook on client:subscribe, errors,
refusal figures, configuration errors and reloads (docs/lua.md, "authorize")."""
import asyncio
import json
import re
import subprocess

import pytest

from herald_util import (REPO, OP_TEXT, RawHTTP, RawWS, config_text, handshake_status, herald_bin,
                         line_of, make_config, recv, recv_json, request, run, script_stats,
                         ws_connect)

SCRIPTS = REPO / "tests" / "scripts"
AUTHZ = str(SCRIPTS / "authz.lua")
AUTHZ_ROUTE = str(SCRIPTS / "authz_route.lua")

ROUTES = [
    {"path": "/ws", "kind": "pubsub", "authorize": AUTHZ},
    {"path": "/sub/", "kind": "raw", "publish": True, "authorize": AUTHZ},
    {"path": "/sse/", "kind": "sse", "authorize": AUTHZ},
    {"path": "/open", "kind": "pubsub"},
    {"path": "/lua", "script": AUTHZ_ROUTE},
]

HERALD_CONFIG = {"routes": ROUTES}


# --- the generic route ---------------------------------------------------------------------------

def test_ws_operations_are_authorized(herald_module):
    h = herald_module
    before = h.stats()["auth_refused"]
    stats0 = script_stats(h, "/ws")

    async def main():
        async with ws_connect(h, "/ws?user=ann") as ws:
            ok = await request(ws, {"op": "subscribe", "channel": "public:news", "id": 1})
            assert ok == {"op": "subscribed", "channel": "public:news", "id": 1}
            assert (await request(ws, {"op": "subscribe", "channel": "user:ann"}))["op"] == "subscribed"
            r = await request(ws, {"op": "subscribe", "channel": "user:bob", "id": "x"})
            assert r == {"op": "error", "id": "x", "error": "not allowed to subscribe to this channel: "
                         "user channels are for their user"}
            r = await request(ws, {"op": "subscribe", "channel": "secret"})
            assert r == {"op": "error", "error": "not allowed to subscribe to this channel"}
            r = await request(ws, {"op": "publish", "channel": "ro:prices", "data": 1})
            assert r == {"op": "error", "error": "not allowed to publish to this channel: read-only channel"}
            assert (await request(ws, {"op": "subscribe", "channel": "ro:prices"}))["op"] == "subscribed"
            # unsubscribing is never refused, nor asked about
            assert (await request(ws, {"op": "unsubscribe", "channel": "secret"}))["op"] == "unsubscribed"
            await ws.send(json.dumps({"op": "publish", "channel": "user:ann", "data": {"n": 1}}))
            replies = [await recv_json(ws) for _ in range(2)]
            assert sorted(r["op"] for r in replies) == ["message", "published"]
    run(main())
    s = script_stats(h, "/ws")
    assert s["calls"]["authorize"] - stats0["calls"]["authorize"] == 7
    assert s["authorize_refused"] - stats0["authorize_refused"] == 3
    assert h.stats()["auth_refused"] - before == 3
    assert "herald_script_authorize_refused_total{path=\"/ws\"}" in h.metrics()


def test_pattern_subscriptions_are_authorized(herald_module):
    h = herald_module
    before = h.stats()["auth_refused"]

    async def main():
        async with ws_connect(h, "/ws") as ws:
            r = await request(ws, {"op": "subscribe", "pattern": "pat:feed.*", "id": 1})
            assert r == {"op": "subscribed", "pattern": "pat:feed.*", "id": 1}
            r = await request(ws, {"op": "subscribe", "channel": "pat:feed.a"})
            assert r == {"op": "error", "error": "not allowed to subscribe to this channel: "
                         "only as a pattern"}
            # a pattern is asked about as a pattern: ">" would otherwise reach every channel
            r = await request(ws, {"op": "subscribe", "pattern": ">"})
            assert r == {"op": "error", "error": "not allowed to subscribe to this pattern: refused"}
            r = await request(ws, {"op": "subscribe", "pattern": "secret.*"})
            assert r["op"] == "error"
            await h_publish(h, "pat:feed.a", "hello")
            m = await recv_json(ws)
            assert m["op"] == "message" and m["channel"] == "pat:feed.a" and m["data"] == "hello"
    run(main())
    assert h.stats()["auth_refused"] - before == 3


async def h_publish(h, channel, body):
    await asyncio.get_running_loop().run_in_executor(None, h.publish, channel, body)


def test_subscribe_list_is_authorized_at_the_handshake(herald_module):
    h = herald_module
    r = handshake_status(h, "/ws?subscribe=public:a,user:bob")
    assert r.status == 403 and "user channels are for their user" in r.body.decode(), r

    async def main():
        async with ws_connect(h, "/ws?user=bob&subscribe=public:a,user:bob"):
            pass
    run(main())


def test_open_hook_of_an_authorize_script_may_refuse(herald_module):
    r = handshake_status(herald_module, "/ws?refuse=go%20away")
    assert r.status == 403 and "go away" in r.body.decode(), r


# --- the raw route and event streams -----------------------------------------------------------------

def test_raw_subscribe_and_publish_are_authorized(herald_module):
    h = herald_module
    r = handshake_status(h, "/sub/secret")
    assert r.status == 403 and "not allowed to subscribe to this channel" in r.body.decode(), r
    r = handshake_status(h, "/sub/user:bob?user=ann")
    assert r.status == 403 and "user channels are for their user" in r.body.decode(), r
    with RawWS(h.port, "/sub/user:ann?user=ann") as mine, RawWS(h.port, "/sub/ro:x") as ro:
        mine.send_text("mine")
        assert mine.recv_message()[:2] == (OP_TEXT, b"mine")
        ro.send_frame(OP_TEXT, b"not allowed")
        f = ro.expect_close(1008)
        assert f.close_reason == b"not allowed to publish to this channel"


def test_event_streams_are_authorized(herald_module):
    h = herald_module
    r = h.request("GET", "/sse/secret")
    assert r.status == 403 and b"not allowed to subscribe" in r.body
    with RawHTTP(h.port) as c:
        c.send(c.build("GET", "/sse/public:feed"))
        c.sock.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.sock.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 "), data


def test_close_hook_runs_once_per_opened_client(herald_module):
    h = herald_module

    def closed():
        """How many clients the script saw close (asking opens one more, counted later)."""
        async def ask():
            async with ws_connect(h, "/ws") as ws:
                r = await request(ws, {"op": "subscribe", "channel": "count:x"})
            return int(r["error"].rsplit("=", 1)[1])
        return run(ask())

    a = closed()
    with RawWS(h.port, "/ws?subscribe=public:a") as x, RawWS(h.port, "/ws") as y:
        for w in (x, y):
            w.send_close(1000)
            w.expect_close(1000)
    assert closed() == a + 3  # the first asker and the two others (each route has its own state)
    # refused handshakes never opened: no close hook for them
    for path in ("/ws?subscribe=secret", "/ws?refuse=no", "/ws?subscribe=public:a,fail:x"):
        assert handshake_status(h, path).status == 403
    # Asked once the broker has let them go (only the /stats connection is left).
    s = h.wait_stats(lambda s: s["connections"] == 1)
    assert s["connections"] == 1, s
    assert closed() == a + 4


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.herald(routes=ROUTES)
@pytest.mark.parametrize("channel, log", [
    ("fail:x", r"authz\.lua:%d: authorize failed on purpose" % line_of(AUTHZ, 'error("authorize failed')),
    ("method:x", r"authz\.lua:%d: client:send cannot be used in authorize"
     % line_of(AUTHZ, 'client:send("hello")')),
    ("loop:x", r"authz\.lua:%d: script stopped: more than 100000000 instructions"
     % line_of(AUTHZ, "while true do end")),
])
def test_a_failing_hook_refuses_and_is_logged(herald, channel, log):
    h = herald
    e0 = script_stats(h, "/ws")
    refused0 = h.stats()["auth_refused"]

    async def main():
        async with ws_connect(h, "/ws") as ws:
            r = await request(ws, {"op": "subscribe", "channel": channel}, timeout=30)
            assert r == {"op": "error", "error": "not allowed to subscribe to this channel: the route's "
                         "authorize hook failed (see the server log)"}, r
            assert (await request(ws, {"op": "subscribe", "channel": "public:after"}))["op"] == "subscribed"
    run(main(), timeout=60)
    s = script_stats(h, "/ws")
    assert s["errors"] - e0["errors"] == 1 and s["authorize_refused"] - e0["authorize_refused"] == 1
    assert h.stats()["auth_refused"] - refused0 == 1
    # The line is written before the refusal; the test reads the log on a thread of its own.
    h.wait_log(r"warn: script error on route /ws, in authorize: \S*" + log)


# --- a script route's hook ------------------------------------------------------------------------

def test_script_route_subscribe_is_authorized(herald_module):
    h = herald_module
    s0 = script_stats(h, "/lua")

    async def main():
        async with ws_connect(h, "/lua?sub=public:a,secret") as ws:
            msg = await recv_json(ws)
            assert msg == {"hook": "open", "results": [
                {"channel": "public:a", "ok": True},
                {"channel": "secret", "err": "only public: channels here"}]}, msg
            await ws.send("fail")
            r = await recv_json(ws)
            assert r == {"hook": "message", "channel": "fail",
                         "err": "the route's authorize hook failed (see the server log)"}, r
            await ws.send("public:b")
            assert (await recv_json(ws))["ok"] is True
            # what it was refused, it does not get
            loop = asyncio.get_running_loop()
            for ch in ("secret", "public:a"):
                r = await loop.run_in_executor(None, h.publish, ch, b"to " + ch.encode())
                assert r.status == 200
            assert await recv(ws) == "to public:a"
    run(main())
    s = script_stats(h, "/lua")
    assert s["calls"]["authorize"] - s0["calls"]["authorize"] == 4
    assert s["authorize_refused"] - s0["authorize_refused"] == 2
    assert s["errors"] - s0["errors"] == 1


# --- configuration --------------------------------------------------------------------------------

def check(tmp_path, routes, script_text=None):
    cfg = make_config({"routes": routes, "web_root": None, "access_log": None})
    if script_text is not None:
        (tmp_path / "auth.lua").write_text(script_text)
    (tmp_path / "cfg.lua").write_text(config_text(cfg))
    return subprocess.run([herald_bin(), "--check", "--config", str(tmp_path / "cfg.lua")],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("route, script, expected", [
    ({"path": "/echo", "kind": "echo", "authorize": "auth.lua"}, "return {}",
     r"routes\[1\]: an echo route has no channels to authorize"),
    ({"path": "/s", "script": "auth.lua", "authorize": "auth.lua"}, "return {}",
     r"routes\[1\]: a script route's authorize hook is in its script"),
    ({"path": "/ws", "kind": "pubsub", "authorize": "nope.lua"}, None,
     r"routes\[1\]: authorize .*nope\.lua: No such file"),
    ({"path": "/ws", "kind": "pubsub", "authorize": "auth.lua"},
     "return { message = function() end }",
     r"auth\.lua: hook message in the returned table: a pubsub route's authorize script has only "
     r"open, authorize and close"),
    ({"path": "/ws", "kind": "pubsub", "authorize": "auth.lua"}, "return { authorize = 1 }",
     r"auth\.lua: hook authorize must be a function, not number"),
])
def test_configuration_errors(tmp_path, route, script, expected):
    r = check(tmp_path, [route], script)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), r.stderr


def test_a_good_authorize_script_passes_the_check(tmp_path):
    r = check(tmp_path, [{"path": "/ws", "kind": "pubsub", "authorize": "auth.lua"},
                         {"path": "/sub/", "kind": "raw", "authorize": "auth.lua"}],
              "return { authorize = function() return true end }")
    assert r.returncode == 0, r


# --- reloading ------------------------------------------------------------------------------------

def test_reload_adds_and_removes_the_script(herald_factory):
    plain = [{"path": "/ws", "kind": "pubsub"}]
    h = herald_factory(routes=plain)

    async def main():
        async with ws_connect(h, "/ws") as ws:
            assert (await request(ws, {"op": "subscribe", "channel": "secret"}))["op"] == "subscribed"
            await asyncio.to_thread(h.reload, routes=[dict(plain[0], authorize=AUTHZ)])
            # a client from before the reload is policed too
            assert (await request(ws, {"op": "subscribe", "channel": "secret2"}))["op"] == "error"
            assert (await request(ws, {"op": "subscribe", "channel": "public:x"}))["op"] == "subscribed"
            await asyncio.to_thread(h.reload, routes=plain)
            assert (await request(ws, {"op": "subscribe", "channel": "secret2"}))["op"] == "subscribed"
            await asyncio.to_thread(h.reload, routes=[dict(plain[0], authorize=AUTHZ)])
            assert (await request(ws, {"op": "subscribe", "channel": "secret3"}))["op"] == "error"
    run(main())
