"""Mirror mode: several herald nodes and one Redis act as one broker. Every message reaches every
subscriber on every node exactly once, in order per publisher; a node subscribes in Redis only to
the channels it has local subscribers on; Redis restarting midway is survived."""
import asyncio
import json
import time

from herald_util import expect_silence, http_async, recv, recv_json, request, run, ws_connect
from redis_util import SteadyPublisher, mirror_node


def test_two_nodes_deliver_every_message_once_in_order(herald_factory, redis_server):
    a = mirror_node(herald_factory, redis_server)
    b = mirror_node(herald_factory, redis_server)
    assert a.stats()["redis"]["mirror"]["node_id"] != b.stats()["redis"]["mirror"]["node_id"]
    n = 1000

    async def main():
        async with ws_connect(a) as pub_a, ws_connect(b) as pub_b, \
                ws_connect(a, "/ws?subscribe=room") as ws_a, \
                ws_connect(b, "/ws?subscribe=room") as ws_b, \
                ws_connect(a, "/sub/room") as raw_a, ws_connect(b, "/sub/room") as raw_b:
            await asyncio.to_thread(redis_server.wait_numsub, "room", 2)
            for i in range(n):  # alternately on each node
                pub = pub_a if i % 2 == 0 else pub_b
                await pub.send(json.dumps({"op": "publish", "channel": "room",
                                           "data": {"node": "ab"[i % 2], "i": i}}))
            for pub in (pub_a, pub_b):
                for _ in range(n // 2):
                    assert (await recv_json(pub))["op"] == "published"
            # A last message from each node: anything delivered twice would come before it.
            for pub, node in ((pub_a, "a"), (pub_b, "b")):
                await pub.send(json.dumps({"op": "publish", "channel": "room",
                                           "data": {"node": node, "i": "end"}}))
            for ws in (ws_a, ws_b):
                got = []
                while sum(1 for m in got if m["data"]["i"] == "end") < 2:
                    got.append(await recv_json(ws, 10))
                assert [m["seq"] for m in got] == list(range(1, n + 3))  # once each, no gaps
                for node in "ab":
                    mine = [m["data"]["i"] for m in got if m["data"]["node"] == node]
                    assert mine == [i for i in range(n) if "ab"[i % 2] == node] + ["end"]
                await expect_silence(ws, 0.2)
            for raw in (raw_a, raw_b):
                got = []
                while sum(1 for d in got if d["i"] == "end") < 2:
                    got.append(json.loads(await recv(raw, 10)))
                assert len(got) == n + 2
                for node in "ab":
                    assert [d["i"] for d in got if d["node"] == node] == \
                        [i for i in range(n) if "ab"[i % 2] == node] + ["end"]
                await expect_silence(raw, 0.1)

    run(main(), timeout=60)
    for h in (a, b):
        s = h.stats()["redis"]
        assert s["mirror"]["published"] == n // 2 + 1 and s["mirror"]["dropped"] == 0, s
        assert s["own_messages_dropped"] == n // 2 + 1, s  # its own, back from Redis, not re-sent
        assert s["messages_published"] == n // 2 + 1, s    # the other node's, fanned out here


def test_http_tail_and_backend_messages_cross_nodes(herald_factory, redis_server, tmp_path):
    log = tmp_path / "a.log"
    log.write_text("")
    a = mirror_node(herald_factory, redis_server, redis={"channels": ["backend"]},
                    tail=[{"path": str(log), "channel": "lines"}])
    b = mirror_node(herald_factory, redis_server, redis={"channels": ["backend"]})

    async def main():
        async with ws_connect(b, "/ws?subscribe=http,lines,backend") as ws_b, \
                ws_connect(b, "/sub/http") as raw_b, ws_connect(a, "/sub/backend") as raw_a:
            await asyncio.to_thread(redis_server.wait_numsub, "http", 1)
            await asyncio.to_thread(redis_server.wait_numsub, "lines", 1)
            # POST /pub on node a: a raw payload (not JSON), and bytes that are not UTF-8.
            r = await http_async(a, "POST", "/pub/http", b"plain words")
            assert r.status == 200
            r = await http_async(a, "POST", "/pub/http", b"\x00\xffbinary")
            assert r.status == 200
            m = await recv_json(ws_b)
            assert (m["channel"], m["data"]) == ("http", "plain words")
            m = await recv_json(ws_b)
            assert (m["channel"], m["data"]) == ("http", "\x00\ufffdbinary")
            assert await recv(raw_b) == "plain words"
            assert await recv(raw_b) == b"\x00\xffbinary"  # the bytes as published, binary
            # A line appended to the file node a tails.
            with open(log, "a") as f:
                f.write('{"from": "tail"}\n')
            m = await recv_json(ws_b)
            assert (m["channel"], m["data"]) == ("lines", {"from": "tail"})
            # A backend's plain PUBLISH reaches both nodes once, and no node sends it back.
            with redis_server.client() as c:
                assert c.command("PUBLISH", "backend", "from the backend") == 2
            m = await recv_json(ws_b)
            assert (m["channel"], m["data"]) == ("backend", "from the backend")
            assert await recv(raw_a) == "from the backend"
            await expect_silence(ws_b, 0.3)

    run(main())
    for h in (a, b):
        assert h.stats()["redis"]["messages_received"] >= 1
    # Node b published nothing: the backend's message was not mirrored back.
    assert b.stats()["redis"]["mirror"]["published"] == 0


def test_redis_subscriptions_follow_local_subscribers(herald_factory, redis_server):
    a = mirror_node(herald_factory, redis_server,
                    redis={"channels": ["cfg"], "patterns": ["pat.*"]})
    a.wait_stats(lambda s: s["redis"]["subscriptions"] == 2)
    assert redis_server.channels() == ["cfg"]

    async def main():
        async with ws_connect(a) as c1, ws_connect(a) as c2:
            assert (await request(c1, {"op": "subscribe", "channel": "x1"}))["op"] == "subscribed"
            await asyncio.to_thread(redis_server.wait_numsub, "x1", 1)
            assert (await request(c2, {"op": "subscribe", "channel": "x1"}))["op"] == "subscribed"
            assert (await request(c1, {"op": "unsubscribe", "channel": "x1"}))["op"] == \
                "unsubscribed"
            # c2 still listens: the Redis subscription must still be there.
            with redis_server.client() as r:
                assert r.command("PUBLISH", "x1", "still subscribed") == 1
            assert (await recv_json(c2))["data"] == "still subscribed"
            # A configured channel stays subscribed when its last local subscriber leaves.
            await request(c1, {"op": "subscribe", "channel": "cfg"})
            await request(c1, {"op": "unsubscribe", "channel": "cfg"})
            # A channel a configured pattern covers is not subscribed on its own: no duplicates.
            await request(c1, {"op": "subscribe", "channel": "pat.one"})
            with redis_server.client() as r:
                assert r.command("PUBLISH", "pat.one", "via the pattern") == 1
            assert (await recv_json(c1))["data"] == "via the pattern"
            await expect_silence(c1, 0.2)
            # The last local subscriber of x1 goes: so does the Redis subscription.
            await c2.close()
            await asyncio.to_thread(redis_server.wait_numsub, "x1", 0)
            assert redis_server.channels() == ["cfg"]
            for i in range(50):  # churn ends where it started
                await request(c1, {"op": "subscribe", "channel": "churn"})
                await request(c1, {"op": "unsubscribe", "channel": "churn"})
            await request(c1, {"op": "subscribe", "channel": "churn"})
            await asyncio.to_thread(redis_server.wait_numsub, "churn", 1)
            await request(c1, {"op": "unsubscribe", "channel": "churn"})
            await asyncio.to_thread(redis_server.wait_numsub, "churn", 0)

    run(main())
    s = a.wait_stats(lambda s: s["redis"]["subscriptions"] == 2)
    assert s["redis"]["subscriptions"] == 2  # cfg and pat.*


def test_two_nodes_survive_redis_restart(herald_factory, redis_server):
    a = mirror_node(herald_factory, redis_server, redis={"channels": ["news"]})
    b = mirror_node(herald_factory, redis_server, redis={"channels": ["news"]})

    async def main():
        async with ws_connect(a, "/sub/news") as sa, ws_connect(b, "/sub/news") as sb, \
                ws_connect(a, "/ws?subscribe=live") as la, \
                ws_connect(b, "/ws?subscribe=live") as lb, \
                ws_connect(a) as pa:
            await asyncio.to_thread(redis_server.wait_numsub, "live", 2)
            got = {sa: [], sb: []}

            async def receive_until(ws, pred):
                while not pred():
                    got[ws].append(int((await recv(ws, 10))[1:]))

            with SteadyPublisher(redis_server, "news", "n") as backend:
                for ws in (sa, sb):
                    await receive_until(ws, lambda: len(got[ws]) >= 50)
                redis_server.kill()
                await asyncio.sleep(0.5)  # the outage
                await asyncio.to_thread(redis_server.start)
                for h in (a, b):
                    s = await asyncio.to_thread(
                        h.wait_stats, lambda s: s["redis"]["connected"] and
                        s["redis"]["reconnects"] == 1 and
                        s["redis"]["mirror"]["reconnects"] == 1, 10)
                    assert s["redis"]["connected"], s["redis"]
                # Both nodes subscribed again to the channel their clients listen on.
                await asyncio.to_thread(redis_server.wait_numsub, "live", 2)
                await asyncio.to_thread(redis_server.wait_numsub, "news", 2)
                mark = await asyncio.to_thread(backend.wait_more, 200)
            published = backend.published
            assert all(n == 2 for _, n in published[mark:])
            after = [i for i, _ in published[mark:]]
            for ws in (sa, sb):
                await receive_until(ws, lambda: got[ws][-1] == after[-1])
                assert got[ws] == sorted(set(got[ws])), "out of order or twice"
                assert set(after) <= set(got[ws])
            # And a client's message on node a reaches node b's subscriber, once.
            await pa.send(json.dumps({"op": "publish", "channel": "live", "data": "after"}))
            for ws in (la, lb):
                m = await recv_json(ws)
                assert m["data"] == "after"
                await expect_silence(ws, 0.2)

    run(main(), timeout=60)


def test_pattern_coverage_agrees_with_redis(herald_factory, redis_server):
    # herald decides itself which channels its patterns cover (it must not also SUBSCRIBE to
    # those): its glob matching has to agree with Redis's, quirks included. PUBLISH's reply counts
    # deliveries to herald's connection: 1 means neither lost nor doubled.
    patterns = ["q[a-c]?", "r\\*x", "s[^x]y", "t*", "u?v*w", "[z-x]y", "v[a\\]]", "w[b-"]
    a = mirror_node(herald_factory, redis_server, redis={"patterns": patterns})
    a.wait_stats(lambda s: s["redis"]["subscriptions"] == len(patterns))
    # Some are matched by a pattern, some not (and so subscribed on their own).
    channels = ["qa1", "qd1", "qc", "rax", "r/x", "s1y", "sxy", "t", "tfoo", "u1v2w", "uvw", "u1vw",
                "xy", "zy", "ay", "va", "vb", "wb", "wa", "w-"]

    def publish_all(c):
        """Publish once to each channel, retrying (bounded) while nobody receives it: herald's
        own SUBSCRIBE for a channel may not have been confirmed yet. Returns the replies."""
        replies = []
        for ch in channels:
            deadline = time.monotonic() + 5
            n = c.command("PUBLISH", ch, "to " + ch)
            while n == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
                n = c.command("PUBLISH", ch, "to " + ch)
            replies.append(n)
        return replies

    async def main():
        async with ws_connect(a, "/ws?subscribe=" + ",".join(channels)) as ws:
            with redis_server.client() as c:
                first = await asyncio.to_thread(publish_all, c)
                second = await asyncio.to_thread(publish_all, c)  # all subscriptions in place
            assert first == [1] * len(channels), dict(zip(channels, first))
            assert second == [1] * len(channels), dict(zip(channels, second))
            got = sorted([(await recv_json(ws))["data"] for _ in range(2 * len(channels))])
            assert got == sorted(2 * ["to " + ch for ch in channels])
            await expect_silence(ws, 0.2)

    run(main())


def test_envelope_on_the_wire(herald_factory, redis_server):
    # The format docs/scaling.md promises to other Redis consumers.
    a = mirror_node(herald_factory, redis_server)
    node = a.stats()["redis"]["mirror"]["node_id"]
    assert len(node) == 16 and int(node, 16) >= 0
    with redis_server.client() as c:
        assert c.command("SUBSCRIBE", "wire")[0] == b"subscribe"
        assert a.publish("wire", b"raw \x00 bytes").status == 200

        async def main():
            async with ws_connect(a) as ws:
                await request(ws, {"op": "publish", "channel": "wire", "data": {"k": "v"}})

        run(main())
        head = b"\xffherald:1:" + node.encode()
        assert c.read() == [b"message", b"wire", head + b":r:raw \x00 bytes"]
        assert c.read() == [b"message", b"wire", head + b':j:{"k": "v"}']  # the value's own text
