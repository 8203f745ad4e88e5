"""Pattern subscriptions on the generic route (/ws) and in Lua: the matching rules, each message once
per connection however many subscriptions match, unsubscribing, errors, limits, tokens, the work
of a publish with 10 or 10,000 patterns, and patterns across two nodes in mirror mode."""
import asyncio
import json
import time

import pytest

from herald_util import JWT_SECRET, expect_silence, jwt_token, http_async, recv, recv_json, request, run, ws_connect
from redis_util import mirror_node

HERALD_CONFIG = {"limits": {"max_subscriptions": 50}}


async def publish(ws, channel, data):
    reply = await request(ws, {"op": "publish", "channel": channel, "data": data})
    assert reply["op"] == "published", reply
    return reply["seq"]


async def drain(ws, count, timeout=5):
    return [await recv_json(ws, timeout) for _ in range(count)]


# --- matching ------------------------------------------------------------------------------------


def test_subscribe_and_matching_rules(herald_module):
    async def main():
        async with ws_connect(herald_module) as sub, ws_connect(herald_module) as pub:
            assert await request(sub, {"op": "subscribe", "pattern": "sensors.*.temp", "id": 1}) == \
                {"op": "subscribed", "pattern": "sensors.*.temp", "id": 1}
            assert await request(sub, {"op": "subscribe", "pattern": "logs.>"}) == \
                {"op": "subscribed", "pattern": "logs.>"}
            cases = [
                ("sensors.a.temp", True), ("sensors..temp", True), ("sensors.a.b.temp", False),
                ("sensors.temp", False), ("sensors.a.temp.x", False), ("sensorsx.a.temp", False),
                ("logs.web", True), ("logs.web.errors", True), ("logs", False), ("logsx.a", False),
                ("other", False),
            ]
            want = []
            for i, (channel, match) in enumerate(cases):
                seq = await publish(pub, channel, {"i": i})
                if match:
                    want.append({"op": "message", "channel": channel, "seq": seq, "data": {"i": i}})
            # Messages through a pattern look exactly like a channel subscriber's.
            assert await drain(sub, len(want)) == want
            await expect_silence(sub, 0.2)
            # Raw payloads too (a JSON string when they are not JSON).
            r = await http_async(herald_module, "POST", "/pub/logs.http", b"not json")
            assert r.status == 200 and r.json()["subscribers"] == 1
            assert (await recv_json(sub)) == {"op": "message", "channel": "logs.http", "seq": 1,
                                              "data": "not json"}
    run(main())


def test_overlap_is_delivered_once_in_order(herald_module):
    before = herald_module.stats()["patterns"]

    async def main():
        async with ws_connect(herald_module) as sub, ws_connect(herald_module) as other, \
                ws_connect(herald_module) as pub:
            for req in ({"op": "subscribe", "channel": "ov.a.b"},
                        {"op": "subscribe", "pattern": "ov.>"},
                        {"op": "subscribe", "pattern": "ov.*.b"},
                        {"op": "subscribe", "pattern": "*.a.*"},
                        {"op": "subscribe", "pattern": "zz.*"}):
                assert (await request(sub, req))["op"] == "subscribed"
            assert (await request(other, {"op": "subscribe", "pattern": "ov.*.b"}))["op"] == \
                "subscribed"
            n = 200
            channels = ["ov.a.b", "ov.c.b", "ov.a.c", "xx.a.y", "ov.x"]
            for i in range(n):
                await pub.send(json.dumps({"op": "publish", "channel": channels[i % 5], "data": i}))
            for _ in range(n):
                assert (await recv_json(pub))["op"] == "published"
            got = await drain(sub, n, 10)
            await expect_silence(sub, 0.3)
            for ch in channels:
                mine = [m for m in got if m["channel"] == ch]
                assert [m["seq"] for m in mine] == list(range(1, n // 5 + 1)), ch  # once, in order
                assert [m["data"] for m in mine] == list(range(channels.index(ch), n, 5))
            got = await drain(other, 2 * n // 5, 10)
            assert sorted(m["channel"] for m in got) == ["ov.a.b"] * 40 + ["ov.c.b"] * 40
            await expect_silence(other, 0.2)
            # POST /pub counts each connection once.
            r = await http_async(herald_module, "POST", "/pub/ov.a.b", b"1")
            assert r.json()["subscribers"] == 2
    run(main())
    s = herald_module.stats()["patterns"]
    diff = {k: s[k] - before[k] for k in ("deliveries", "walks", "cache_hits")}
    # Through patterns: other gets ov.a.b and ov.c.b (80), sub the 160 of the channels it does not
    # subscribe to itself; then the POST's one to other. Each of the five channels is matched
    # against the trie once; the other 196 of the 201 publishes take its matches from its cache.
    assert diff == {"deliveries": 241, "walks": 5, "cache_hits": 196}, diff


def test_unsubscribe(herald_module):
    async def main():
        async with ws_connect(herald_module) as sub, ws_connect(herald_module) as pub:
            await request(sub, {"op": "subscribe", "pattern": "un.*"})
            await request(sub, {"op": "subscribe", "pattern": "un.>"})
            await publish(pub, "un.one", 1)
            assert (await recv_json(sub))["data"] == 1
            assert await request(sub, {"op": "unsubscribe", "pattern": "un.*", "id": "u"}) == \
                {"op": "unsubscribed", "pattern": "un.*", "id": "u"}
            await publish(pub, "un.two", 2)  # still un.>
            assert (await recv_json(sub))["data"] == 2
            await request(sub, {"op": "unsubscribe", "pattern": "un.>"})
            await publish(pub, "un.three", 3)
            await expect_silence(sub, 0.2)
            # Unsubscribing what it does not have is not an error.
            assert await request(sub, {"op": "unsubscribe", "pattern": "never.*"}) == \
                {"op": "unsubscribed", "pattern": "never.*"}
            # Subscribing twice: once.
            await request(sub, {"op": "subscribe", "pattern": "twice.*"})
            await request(sub, {"op": "subscribe", "pattern": "twice.*"})
            await publish(pub, "twice.x", 4)
            assert (await recv_json(sub))["data"] == 4
            await expect_silence(sub, 0.2)
    run(main())


BAD_PATTERNS = {
    "empty": ("", "empty"),
    "double_dot": ("a..b", "empty segment"),
    "trailing_dot": ("a.", "empty segment"),
    "leading_dot": (".a", "empty segment"),
    "partial_star": ("a*.b", "whole segments"),
    "partial_gt": ("a.b>", "whole segments"),
    "gt_not_last": ("a.>.b", "last segment"),
    "space": ("a b.*", "may only hold"),
    "unicode": ("caf\u00e9.*", "may only hold"),
    "question": ("a.?", "may only hold"),
    "too_long": ("x" * 199 + ".*", "longer than 200"),
}


@pytest.mark.parametrize("case", list(BAD_PATTERNS))
def test_invalid_patterns(herald_module, case):
    pattern, why = BAD_PATTERNS[case]

    async def main():
        async with ws_connect(herald_module) as ws:
            for op in ("subscribe", "unsubscribe"):
                reply = await request(ws, {"op": op, "pattern": pattern, "id": case})
                assert reply["op"] == "error" and reply["id"] == case, reply
                assert why in reply["error"], reply
            assert (await request(ws, {"op": "subscribe", "pattern": "fine.*"}))["op"] == "subscribed"
    run(main())


def test_pattern_request_errors(herald_module):
    bad = [
        ({"op": "subscribe", "pattern": 5}, "must be a string"),
        ({"op": "subscribe", "pattern": "a.*", "channel": "a"}, "not both"),
        ({"op": "publish", "pattern": "a.*", "data": 1}, "publish and presence take"),
        ({"op": "presence", "pattern": "a.*"}, "publish and presence take"),
        ({"op": "subscribe", "pattern": "a.*", "since": 1}, "not a \"pattern\""),
        ({"op": "subscribe", "pattern": "a.*", "presence": True}, "not a \"pattern\""),
        ({"op": "publish", "channel": "a.*", "data": 1}, "may only hold"),  # channels stay literal
    ]

    async def main():
        async with ws_connect(herald_module) as ws:
            for req, why in bad:
                reply = await request(ws, req)
                assert reply["op"] == "error" and why in reply["error"], (req, reply)
    run(main())


@pytest.mark.herald(limits={"max_subscriptions": 3})
def test_patterns_count_toward_max_subscriptions(herald):
    async def main():
        async with ws_connect(herald) as ws:
            assert (await request(ws, {"op": "subscribe", "channel": "l1"}))["op"] == "subscribed"
            assert (await request(ws, {"op": "subscribe", "pattern": "l.*"}))["op"] == "subscribed"
            assert (await request(ws, {"op": "subscribe", "pattern": "m.>"}))["op"] == "subscribed"
            for req in ({"op": "subscribe", "pattern": "n.*"}, {"op": "subscribe", "channel": "l2"}):
                reply = await request(ws, req)
                assert reply["op"] == "error" and "limit" in reply["error"], reply
            await request(ws, {"op": "unsubscribe", "pattern": "l.*"})
            assert (await request(ws, {"op": "subscribe", "channel": "l2"}))["op"] == "subscribed"
    run(main())
    assert herald.stats()["subscription_limit_hits"] == 2


@pytest.mark.herald(routes=[{"path": "/ws", "kind": "pubsub", "deflate": {"min_size": 32}}])
def test_patterns_with_permessage_deflate(herald):
    long_text = "compressible " * 40

    async def main():
        # websockets offers permessage-deflate; the other client declines it.
        async with ws_connect(herald) as zipped, ws_connect(herald, compression=None) as plain, \
                ws_connect(herald) as pub:
            assert zipped.extensions and not plain.extensions
            for ws in (zipped, plain):
                await request(ws, {"op": "subscribe", "pattern": "z.>"})
            await request(zipped, {"op": "subscribe", "channel": "z.a"})
            for ch in ("z.a", "z.b.c"):
                await publish(pub, ch, long_text)
            for ws in (zipped, plain):
                got = await drain(ws, 2)
                assert sorted((m["channel"], m["data"]) for m in got) == \
                    [("z.a", long_text), ("z.b.c", long_text)]
                await expect_silence(ws, 0.2)
    run(main())
    # z.a for its channel subscriber and z.b.c for its pattern subscriber, once each; the replies
    # are too short to shrink.
    assert herald.stats()["deflate_compressed"] == 2


# --- cost ------------------------------------------------------------------------------------------


def test_trie_skipped_without_patterns(herald):
    async def main():
        async with ws_connect(herald, "/ws?subscribe=plain") as sub, ws_connect(herald) as pub:
            for i in range(20):
                await publish(pub, "plain", i)
            await drain(sub, 20)
    run(main())
    s = herald.stats()["patterns"]
    assert s["walks"] == 0 and s["nodes_visited"] == 0 and s["trie_nodes"] == 0, s


@pytest.mark.herald(limits={"max_subscriptions": 20000, "message_rate": 1000000,
                            "send_queue": 16 << 20})
def test_publish_work_does_not_grow_with_patterns(herald):
    """A publish visits the same number of trie nodes with 10 patterns as with 10,000."""

    def visited():
        return herald.stats()["patterns"]["nodes_visited"]

    async def subscribe_many(ws, patterns):
        for start in range(0, len(patterns), 500):
            chunk = patterns[start:start + 500]
            for p in chunk:
                await ws.send(json.dumps({"op": "subscribe", "pattern": p}))
            for _ in chunk:
                assert (await recv_json(ws, 10))["op"] == "subscribed"

    async def cost(pub, sub, channel):
        before = await asyncio.to_thread(visited)
        await publish(pub, channel, 1)
        assert (await recv_json(sub))["channel"] == channel
        return await asyncio.to_thread(visited) - before

    async def main():
        async with ws_connect(herald) as sub, ws_connect(herald) as pub:
            await subscribe_many(sub, ["dev.%d.*" % i for i in range(10)])
            small = [await cost(pub, sub, "dev.5.t%d" % k) for k in range(3)]  # new channels: walks
            await subscribe_many(sub, ["dev.%d.*" % i for i in range(10, 5000)] +
                                 ["other.%d.>" % i for i in range(5000)])
            s = await asyncio.to_thread(herald.stats)
            assert s["patterns"]["subscriptions"] == 10000 and s["patterns"]["patterns"] == 10000
            large = [await cost(pub, sub, "dev.5.u%d" % k) for k in range(3)]
            assert small == large and 0 < large[0] <= 8, (small, large)
            # Published again, a channel's matches come from its cache: no walk at all.
            hits = s["patterns"]["cache_hits"]
            assert await cost(pub, sub, "dev.5.u0") == 0
            assert (await asyncio.to_thread(herald.stats))["patterns"]["cache_hits"] > hits
    run(main(), timeout=120)


# --- tokens and Lua ----------------------------------------------------------------------------------



@pytest.mark.herald(routes=[{"path": "/ws", "kind": "pubsub", "auth": "token"}], jwt_secret=JWT_SECRET)
def test_token_must_grant_every_channel_a_pattern_matches(herald):
    t = jwt_token({"exp": time.time() + 60, "subscribe": ["sensors.*", "room"]})

    async def main():
        async with ws_connect(herald, "/ws?token=" + t) as ws:
            for pattern, ok in (("sensors.*.temp", True), ("sensors.>", True), ("sensors.x", True),
                                ("*.temp", False), (">", False), ("sensorsx.*", False),
                                ("room", True), ("room.*", False)):
                reply = await request(ws, {"op": "subscribe", "pattern": pattern})
                assert reply["op"] == ("subscribed" if ok else "error"), (pattern, reply)
                if not ok:
                    assert "every channel" in reply["error"]
    run(main())
    assert herald.stats()["auth_refused"] == 4


LUA_PATTERNS = """
return {
  open = function(client, request)
    if request.query.p then client:subscribe_pattern(request.query.p) end
  end,
  message = function(client, data)
    local cmd, arg = data:match("^(%S+) (%S+)$")
    local ok, res, why = pcall(function()
      if cmd == "psub" then return client:subscribe_pattern(arg) end
      if cmd == "punsub" then return client:unsubscribe_pattern(arg) end
      if cmd == "sub" then return client:subscribe(arg) end
      error("unknown command")
    end)
    client:send({ reply = cmd, ok = ok, result = res, why = why })
  end,
  deliver = function(channel, data) return "[" .. channel .. "] " .. data end,
}
"""


def test_lua_subscribe_pattern(herald_factory, tmp_path):
    script = tmp_path / "patterns.lua"
    script.write_text(LUA_PATTERNS)
    h = herald_factory(routes=[{"path": "/ws", "kind": "pubsub"},
                               {"path": "/lua", "script": str(script)}],
                       limits={"max_subscriptions": 3})

    async def main():
        async with ws_connect(h, "/lua?p=a.*") as lua, ws_connect(h) as pub:
            await publish(pub, "a.one", "x")  # open's subscription is in place after the handshake
            assert await recv(lua) == "[a.one] x"  # through the route's deliver hook

            async def cmd(text):
                await lua.send(text)
                return json.loads(await recv(lua))
            assert await cmd("psub b.>") == {"reply": "psub", "ok": True, "result": True}
            assert await cmd("psub b.>") == {"reply": "psub", "ok": True, "result": False}
            assert await cmd("sub b.c") == {"reply": "sub", "ok": True, "result": True}
            await publish(pub, "b.c", 1)  # the channel and b.> both match: once
            assert await recv(lua) == "[b.c] 1"
            await expect_silence(lua, 0.2)
            r = await cmd("psub c.*")  # the limit: 3 subscriptions
            assert r == {"reply": "psub", "ok": True,
                         "why": "subscription limit reached for this connection"}, r
            r = await cmd("psub bad..pattern")
            assert r["ok"] is False and "invalid pattern" in r["result"], r
            assert await cmd("punsub a.*") == {"reply": "punsub", "ok": True, "result": True}
            assert await cmd("punsub a.*") == {"reply": "punsub", "ok": True, "result": False}
            await publish(pub, "a.two", 2)
            await expect_silence(lua, 0.2)
    run(main())


# --- across nodes ----------------------------------------------------------------------------------


def test_patterns_across_nodes(herald_factory, redis_server):
    a = mirror_node(herald_factory, redis_server)
    b = mirror_node(herald_factory, redis_server)

    async def main():
        async with ws_connect(b) as sub, ws_connect(b) as both, ws_connect(a) as pub:
            assert (await request(sub, {"op": "subscribe", "pattern": "sensors.*.temp"}))["op"] == \
                "subscribed"
            await asyncio.to_thread(redis_server.wait_numpat, 1)
            # The glob "sensors.*.temp" also matches "sensors.y.z.temp": node b filters it out.
            await publish(pub, "sensors.y.z.temp", 0)
            await publish(pub, "sensors.a.temp", "first")
            m = await recv_json(sub)
            assert (m["channel"], m["data"]) == ("sensors.a.temp", "first")
            for req in ({"op": "subscribe", "channel": "sensors.x.temp"},
                        {"op": "subscribe", "pattern": "sensors.>"},
                        {"op": "subscribe", "pattern": "sensors.*.temp"}):
                assert (await request(both, req))["op"] == "subscribed"
            # Node b PSUBSCRIBEs each glob once ("sensors.*.temp" and "sensors.*").
            await asyncio.to_thread(redis_server.wait_numpat, 2)
            await asyncio.to_thread(redis_server.wait_numsub, "sensors.x.temp", 1)
            # Published on node a: by a client, by POST /pub; and by a backend straight into Redis.
            await publish(pub, "sensors.x.temp", 1)
            await publish(pub, "sensors.y.temp", 2)
            await publish(pub, "sensors.y.z.temp", 3)  # the glob matches; the pattern does not
            await publish(pub, "other.y.temp", 4)
            r = await http_async(a, "POST", "/pub/sensors.w.temp", b"5")
            assert r.status == 200
            with redis_server.client() as c:
                c.command("PUBLISH", "sensors.v.temp", "6")
            got = await drain(sub, 4)
            assert [(m["channel"], m["data"]) for m in got] == [
                ("sensors.x.temp", 1), ("sensors.y.temp", 2), ("sensors.w.temp", 5),
                ("sensors.v.temp", 6)]
            await expect_silence(sub, 0.3)
            # The channel, and two patterns (through two globs): each message once.
            got = await drain(both, 5)
            assert sorted(m["data"] for m in got) == [1, 2, 3, 5, 6]
            await expect_silence(both, 0.3)
            # The last local subscriber of a pattern goes: so does the glob.
            await request(both, {"op": "unsubscribe", "pattern": "sensors.>"})
            await asyncio.to_thread(redis_server.wait_numpat, 1)
            await request(sub, {"op": "unsubscribe", "pattern": "sensors.*.temp"})
            await request(both, {"op": "unsubscribe", "pattern": "sensors.*.temp"})
            await asyncio.to_thread(redis_server.wait_numpat, 0)
            await publish(pub, "sensors.q.temp", 7)
            await expect_silence(sub, 0.2)

    run(main(), timeout=60)
    s = b.stats()["redis"]["mirror"]
    assert s["duplicates_dropped"] >= 4 and s["filtered"] >= 1 and s["patterns"] == 0, s
    assert a.stats()["redis"]["mirror"]["duplicates_dropped"] == 0


def test_patterns_resubscribed_after_redis_restart(herald_factory, redis_server):
    a = mirror_node(herald_factory, redis_server)
    b = mirror_node(herald_factory, redis_server)

    async def main():
        async with ws_connect(b) as sub, ws_connect(a) as pub:
            await request(sub, {"op": "subscribe", "pattern": "r.>"})
            await asyncio.to_thread(redis_server.wait_numpat, 1)
            redis_server.kill()
            await asyncio.to_thread(redis_server.start)
            for h in (a, b):
                await asyncio.to_thread(h.wait_stats, lambda s: s["redis"]["connected"] and
                                        s["redis"]["reconnects"] == 1, 10)
            await asyncio.to_thread(redis_server.wait_numpat, 1)
            await publish(pub, "r.after", "back")
            m = await recv_json(sub)
            assert (m["channel"], m["data"]) == ("r.after", "back")
            await expect_silence(sub, 0.2)
    run(main(), timeout=60)
