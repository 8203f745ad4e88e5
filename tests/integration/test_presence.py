"""Presence: who is subscribed to a channel (clients that ask to be listed, with an info object),
join and leave events for clients that ask for them, the presence op on /ws, herald.presence in
Lua, and the same across two nodes in mirror mode, including a node killed with SIGKILL."""
import asyncio
import json
import re
import signal
import time

import pytest

from herald_util import JWT_SECRET, Herald, jwt_token, expect_silence, recv, recv_json, request, run, ws_connect
from redis_util import mirror_node, redis_settings

ID_RE = re.compile(r"^[0-9a-f]{16}:\d+$")


async def join(ws, channel, presence=None, events=None, info=None, id_=None):
    req = {"op": "subscribe", "channel": channel}
    for k, v in (("presence", presence), ("events", events), ("info", info), ("id", id_)):
        if v is not None:
            req[k] = v
    reply = await request(ws, req)
    assert reply["op"] == "subscribed", reply
    return reply


async def presence(ws, channel, **extra):
    reply = await request(ws, dict({"op": "presence", "channel": channel}, **extra))
    assert reply["op"] == "presence", reply
    return reply


async def event(ws, timeout=5):
    m = await recv_json(ws, timeout)
    assert m["op"] in ("join", "leave"), m
    return m


# --- one node ------------------------------------------------------------------------------------


def test_presence_list_with_info(herald_module):
    async def main():
        async with ws_connect(herald_module) as ann, ws_connect(herald_module) as bob, \
                ws_connect(herald_module) as quiet, ws_connect(herald_module) as outside:
            await join(ann, "room1", presence=True, info={"nick": "ann", "n": 1.50, "tags": ["a"]})
            await join(bob, "room1", presence=True)
            await join(quiet, "room1")  # a subscriber who is not listed
            reply = await presence(outside, "room1", id=[7])  # anyone may ask, subscribed or not
            assert reply["channel"] == "room1" and reply["count"] == 2 and reply["id"] == [7]
            clients = reply["clients"]
            assert [c.get("info") for c in clients] == [{"nick": "ann", "n": 1.5, "tags": ["a"]}, None]
            assert all(ID_RE.match(c["id"]) for c in clients), clients
            assert clients[0]["id"] != clients[1]["id"]
            assert clients[0]["id"].split(":")[0] == clients[1]["id"].split(":")[0]  # one node
            # The info object is kept as it was written.
            await outside.send(json.dumps({"op": "presence", "channel": "room1"}))
            assert '"info":{"nick": "ann", "n": 1.5, "tags": ["a"]}' in await recv(outside)
            assert (await presence(outside, "empty-room")) == \
                {"op": "presence", "channel": "empty-room", "clients": [], "count": 0}
            # Leaving presence but staying subscribed; then unsubscribing.
            await join(ann, "room1", presence=False)
            assert [c.get("info") for c in (await presence(outside, "room1"))["clients"]] == [None]
            await request(bob, {"op": "unsubscribe", "channel": "room1"})
            assert (await presence(outside, "room1"))["count"] == 0
    run(main())


def test_join_and_leave_events(herald_module):
    before = herald_module.stats()["presence"]

    async def main():
        async with ws_connect(herald_module) as watcher, ws_connect(herald_module) as ann, \
                ws_connect(herald_module) as bob, ws_connect(herald_module) as deaf:
            await join(watcher, "room2", events=True)  # told, not listed
            await join(deaf, "room2", presence=True)  # listed, not told
            m = await event(watcher)
            assert m["op"] == "join" and m["channel"] == "room2" and "info" not in m["client"]
            deaf_id = m["client"]["id"]
            # A member that also listens hears its own join, after its subscribed reply.
            await ann.send(json.dumps({"op": "subscribe", "channel": "room2", "presence": True,
                                       "events": True, "info": {"nick": "ann"}}))
            assert (await recv_json(ann))["op"] == "subscribed"
            mine = await event(ann)
            assert mine == {"op": "join", "channel": "room2",
                            "client": {"id": mine["client"]["id"], "info": {"nick": "ann"}}}
            assert await event(watcher) == mine
            await join(bob, "room2", presence=True, info={"nick": "bob"})
            for ws in (watcher, ann):
                m = await event(ws)
                assert m["op"] == "join" and m["client"]["info"] == {"nick": "bob"}
            bob_id = m["client"]["id"]
            # Subscribing again changes nothing: no second join.
            await join(bob, "room2", presence=True, info={"nick": "other"})
            # Messages and events keep their order.
            await request(bob, {"op": "publish", "channel": "room2", "data": "bye"})
            for ws in (watcher, ann, deaf):
                assert (await recv_json(ws))["data"] == "bye"
            await bob.close()
            for ws in (watcher, ann):
                assert await event(ws) == {"op": "leave", "channel": "room2",
                                           "client": {"id": bob_id, "info": {"nick": "bob"}}}
            await request(deaf, {"op": "unsubscribe", "channel": "room2"})
            for ws in (watcher, ann):
                m = await event(ws)
                assert m["op"] == "leave" and m["client"]["id"] == deaf_id
            # Events off; the member unsubscribing does not hear its own leave.
            await join(watcher, "room2", events=False)
            await request(ann, {"op": "unsubscribe", "channel": "room2"})
            for ws in (watcher, ann, deaf):
                await expect_silence(ws, 0.2)
    run(main())
    s = herald_module.stats()["presence"]
    diff = {k: s[k] - before[k] for k in ("joins", "leaves", "events", "members", "listeners")}
    # Joins: deaf, ann, bob (not bob again); leaves: bob, deaf, ann. Events as delivered: five to
    # the watcher, four to ann. Nobody is left listed or listening.
    assert diff == {"joins": 3, "leaves": 3, "events": 9, "members": 0, "listeners": 0}, diff


def test_presence_request_errors(herald_module):
    bad = [
        ({"op": "subscribe", "channel": "e", "presence": "yes"}, "\"presence\" must be true or false"),
        ({"op": "subscribe", "channel": "e", "events": 1}, "\"events\" must be true or false"),
        ({"op": "subscribe", "channel": "e", "presence": True, "info": [1]}, "must be a JSON object"),
        ({"op": "subscribe", "channel": "e", "presence": True, "info": "ann"}, "must be a JSON object"),
        ({"op": "subscribe", "channel": "e", "info": {"a": 1}}, "goes with \"presence\":true"),
        ({"op": "subscribe", "channel": "e", "presence": True, "info": {"a": "x" * 1100}},
         "longer than 1024"),
        ({"op": "publish", "channel": "e", "data": 1, "presence": True}, "go with subscribe"),
        ({"op": "unsubscribe", "channel": "e", "events": True}, "go with subscribe"),
        ({"op": "presence"}, "missing \"channel\""),
        ({"op": "presence", "channel": "a b"}, "may only hold"),
        ({"op": "presence", "channel": "e", "info": {}}, "go with subscribe"),
    ]

    async def main():
        async with ws_connect(herald_module) as ws:
            for req, why in bad:
                reply = await request(ws, dict(req, id="x"))
                assert reply["op"] == "error" and why in reply["error"] and reply["id"] == "x", \
                    (req, reply)
            assert (await presence(ws, "e"))["count"] == 0  # nothing half done
    run(main())




@pytest.mark.herald(routes=[{"path": "/ws", "kind": "pubsub", "auth": "token"}], jwt_secret=JWT_SECRET)
def test_presence_needs_the_subscribe_grant(herald):
    t = jwt_token({"exp": time.time() + 60, "subscribe": ["room:*"]})

    async def main():
        async with ws_connect(herald, "/ws?token=" + t) as ws:
            await join(ws, "room:1", presence=True)
            assert (await presence(ws, "room:1"))["count"] == 1
            reply = await request(ws, {"op": "presence", "channel": "secret"})
            assert reply == {"op": "error", "error": "not allowed to see the presence of this channel: "
                                                        "the token does not grant this channel"}
    run(main())
    assert herald.stats()["auth_refused"] == 1


LUA_PRESENCE = """
return {
  open = function(client, request)
    local q = request.query
    if q.room then
      client:subscribe(q.room, { presence = q.member == "1", events = q.events == "1",
                                 info = q.nick and { nick = q.nick } or nil })
    end
  end,
  message = function(client, data)
    local cmd, arg = data:match("^(%S+) ?(.*)$")
    local ok, res = pcall(function()
      if cmd == "who" then
        local out = {}
        for i, m in ipairs(herald.presence(arg)) do
          out[i] = { id = m.id, nick = m.info and m.info.nick or false, here = m.client ~= nil,
                     me = m.client == client }
        end
        return out
      end
      if cmd == "badopt" then return client:subscribe("x", { presense = true }) end
      if cmd == "badinfo" then return client:subscribe("x", { presence = true, info = { 1, 2 } }) end
      if cmd == "infoalone" then return client:subscribe("x", { info = { a = 1 } }) end
      if cmd == "badflag" then return client:subscribe("x", { events = "yes" }) end
      if cmd == "quit" then return client:subscribe(arg, { presence = false }) end
      error("unknown command " .. cmd)
    end)
    client:send({ reply = cmd, ok = ok, result = res })
  end,
}
"""


def lua_routes(tmp_path):
    script = tmp_path / "presence.lua"
    script.write_text(LUA_PRESENCE)
    return [{"path": "/ws", "kind": "pubsub"}, {"path": "/lua", "script": str(script)}]


async def lua_cmd(ws, text):
    await ws.send(text)
    while True:
        m = json.loads(await recv(ws))
        if "reply" in m:
            return m


def test_lua_presence(herald_factory, tmp_path):
    h = herald_factory(routes=lua_routes(tmp_path))

    async def main():
        async with ws_connect(h, "/lua?room=hall&member=1&events=1&nick=ann") as ann, \
                ws_connect(h, "/lua?room=hall&member=1&nick=bob") as bob, \
                ws_connect(h) as plain:
            await join(plain, "hall", presence=True, info={"nick": "web"})
            # ann listens: her own join, bob's and the /ws client's, as /ws frames.
            joins = [json.loads(await recv(ann)) for _ in range(3)]
            assert [(j["op"], j["client"]["info"]["nick"]) for j in joins] == \
                [("join", "ann"), ("join", "bob"), ("join", "web")]
            r = await lua_cmd(bob, "who hall")
            assert r["ok"] is True
            assert [(m["nick"], m["here"], m["me"]) for m in r["result"]] == \
                [("ann", True, False), ("bob", True, True), ("web", False, False)]
            assert all(ID_RE.match(m["id"]) for m in r["result"])
            assert (await lua_cmd(bob, "who nowhere"))["result"] == {}  # empty (cjson: {})
            for cmd, why in (("badopt", "unknown option presense"), ("badinfo", "JSON object"),
                             ("infoalone", "info goes with presence = true"),
                             ("badflag", "events must be true or false"),
                             ("who a b", "invalid channel name")):
                r = await lua_cmd(bob, cmd)
                assert r["ok"] is False and why in r["result"], (cmd, r)
            assert (await lua_cmd(bob, "quit hall"))["ok"] is True
            m = json.loads(await recv(ann))
            assert (m["op"], m["client"]["info"]["nick"]) == ("leave", "bob")
    run(main())


# --- across nodes ----------------------------------------------------------------------------------


def node_id(h):
    return h.stats()["redis"]["mirror"]["node_id"]


def test_presence_across_nodes(herald_factory, redis_server, tmp_path):
    a = mirror_node(herald_factory, redis_server, redis={"presence_ttl": 15})
    b = mirror_node(herald_factory, redis_server, redis={"presence_ttl": 15},
                    routes=lua_routes(tmp_path))

    async def main():
        async with ws_connect(b) as watcher, ws_connect(a) as ann:
            await join(watcher, "lobby", events=True)
            # Node b follows the channel once Redis confirms; its presence answer waits for that.
            assert (await presence(watcher, "lobby"))["count"] == 0
            await join(ann, "lobby", presence=True, info={"nick": "ann"})
            m = await event(watcher)
            assert m["op"] == "join" and m["client"]["info"] == {"nick": "ann"}
            assert m["client"]["id"].startswith(node_id(a) + ":")
            ann_id = m["client"]["id"]
            async with ws_connect(b) as bob, ws_connect(b, "/lua?room=lobby") as lua:
                await join(bob, "lobby", presence=True, info={"nick": "bob"})
                assert (await event(watcher))["client"]["info"] == {"nick": "bob"}
                for ws, h in ((watcher, b), (ann, a)):  # both nodes see both members
                    r = await presence(ws, "lobby")
                    assert sorted(c["info"]["nick"] for c in r["clients"]) == ["ann", "bob"], r
                r = await lua_cmd(lua, "who lobby")  # herald.presence: the whole cluster too
                assert sorted((m["nick"], m["here"]) for m in r["result"]) == \
                    [("ann", False), ("bob", False)]
                # A node that does not follow the channel asks Redis.
                async with ws_connect(a) as stranger:
                    r = await presence(stranger, "lobby")
                    assert sorted(c["info"]["nick"] for c in r["clients"]) == ["ann", "bob"]
            assert (await event(watcher))["op"] == "leave"  # bob went with his connection
            await request(ann, {"op": "unsubscribe", "channel": "lobby"})
            assert await event(watcher) == {"op": "leave", "channel": "lobby",
                                            "client": {"id": ann_id, "info": {"nick": "ann"}}}
            assert (await presence(watcher, "lobby"))["count"] == 0
            await expect_silence(watcher, 0.2)

    run(main(), timeout=60)
    s = b.stats()["redis"]["mirror"]["presence"]
    assert s["announcements"] >= 2 and s["fetches"] >= 1, s


def test_killed_node_members_leave_within_ttl(herald_factory, redis_server, tmp_path):
    ttl = 1.0
    b = mirror_node(herald_factory, redis_server, redis={"presence_ttl": ttl})
    # Not one of herald_factory's: it is killed, and does not exit cleanly.
    victim = Herald(tmp_path / "victim",
                    {"redis": redis_settings(redis_server, mirror=True, presence_ttl=ttl)}).start()
    try:
        victim.wait_stats(lambda s: s["redis"]["connected"], 10)

        async def main():
            async with ws_connect(b) as watcher:
                await join(watcher, "ward", events=True)
                await presence(watcher, "ward")  # followed from now on
                members = [await ws_connect(victim) for _ in range(3)]
                for i, ws in enumerate(members):
                    await join(ws, "ward", presence=True, info={"n": i})
                ids = set()
                for _ in members:
                    ids.add((await event(watcher))["client"]["id"])
                assert (await presence(watcher, "ward"))["count"] == 3
                victim.proc.send_signal(signal.SIGKILL)
                # The key expires at most ttl after the last beat; the next reap follows within
                # ttl/3. Allowed: twice the ttl, and 4 s more for slow (sanitizer) builds.
                bound = ttl * 2 + 4.0
                deadline = time.monotonic() + bound
                left = set()
                while left != ids:
                    try:
                        m = await event(watcher, timeout=max(0.01, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        raise AssertionError("%d of the 3 members left within %.1f s of the kill"
                                             % (len(left), bound)) from None
                    assert m["op"] == "leave"
                    left.add(m["client"]["id"])
                assert (await presence(watcher, "ward"))["count"] == 0
                await expect_silence(watcher, 0.3)  # each leave once
                for ws in members:
                    ws.transport.abort()

        run(main(), timeout=60)
    finally:
        victim.proc.kill()
        victim.proc.wait(timeout=10)
    with redis_server.client() as c:
        assert c.command("HLEN", "herald:presence:ward") == 0
        assert c.command("SISMEMBER", "herald:nodes", node_id(b)) == 1
        assert c.command("SCARD", "herald:nodes") == 1


def test_stopped_node_members_leave_at_once(herald_factory, redis_server):
    a = mirror_node(herald_factory, redis_server, redis={"presence_ttl": 60})
    b = mirror_node(herald_factory, redis_server, redis={"presence_ttl": 60})

    async def main():
        async with ws_connect(b) as watcher:
            await join(watcher, "desk", events=True)
            await presence(watcher, "desk")
            ws = await ws_connect(a)
            await join(ws, "desk", presence=True)
            assert (await event(watcher))["op"] == "join"
            await asyncio.to_thread(a.stop)  # SIGTERM: the node says its members leave
            # Within 10 s: long before the 60 s TTL.
            assert (await event(watcher, timeout=10))["op"] == "leave"
            ws.transport.abort()

    run(main(), timeout=60)


def test_presence_survives_redis_restart(herald_factory, redis_server):
    a = mirror_node(herald_factory, redis_server, redis={"presence_ttl": 2})
    b = mirror_node(herald_factory, redis_server, redis={"presence_ttl": 2})

    async def main():
        async with ws_connect(b) as watcher, ws_connect(a) as ann:
            await join(watcher, "hall", events=True)
            await presence(watcher, "hall")
            await join(ann, "hall", presence=True, info={"nick": "ann"})
            assert (await event(watcher))["op"] == "join"
            redis_server.kill()
            await asyncio.to_thread(redis_server.start)  # empty: the hash is gone
            for h in (a, b):
                await asyncio.to_thread(h.wait_stats, lambda s: s["redis"]["connected"] and
                                        s["redis"]["mirror"]["reconnects"] == 1, 10)
            # Node a writes its members again; node b, following again, sees them. (Listeners may
            # see a leave and a join meanwhile: the restarted Redis knew no one at first.)
            deadline = time.monotonic() + 10
            while True:
                await watcher.send(json.dumps({"op": "presence", "channel": "hall"}))
                r = await recv_json(watcher)
                while r["op"] != "presence":
                    assert r["op"] in ("join", "leave"), r
                    r = await recv_json(watcher)
                if r["count"] == 1 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)  # polling the state, bounded
            assert [c["info"] for c in r["clients"]] == [{"nick": "ann"}], r
            with redis_server.client() as c:
                assert c.command("HLEN", "herald:presence:hall") == 1

    run(main(), timeout=60)
