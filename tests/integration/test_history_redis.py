"""History kept in Redis (mirror mode): channels with a history rule are numbered by Redis, so
every node gives a message the same seq, and a client can resume on any node after any number of
forced disconnects, with no gap and no duplicate."""
import asyncio
import json
import socket

from herald_util import HOST, DEFAULT_ROUTES, EventStream as Stream, RawHTTP, expect_silence, http_async, recv, \
    recv_json, request, run, ws_connect
from redis_util import mirror_node

HISTORY = [{"prefix": "h:", "length": 2000, "age": 600}, {"prefix": "short:", "length": 10, "age": 600}]
ROUTES = DEFAULT_ROUTES + [{"path": "/sse/", "kind": "sse"}]


def node(herald_factory, redis_server, **overrides):
    return mirror_node(herald_factory, redis_server,
                       **dict({"routes": ROUTES, "history": HISTORY}, **overrides))


def history_stats(h):
    return h.stats()["redis"]["mirror"]["history"]


async def subscribe(ws, channel, **extra):
    return await request(ws, dict({"op": "subscribe", "channel": channel}, **extra))


async def publish_ws(ws, channel, values):
    """Publish each value on ws; returns the seqs of the published replies, in order."""
    for v in values:
        await ws.send(json.dumps({"op": "publish", "channel": channel, "data": v}))
    seqs = []
    for _ in values:
        r = await recv_json(ws, 10)
        assert r["op"] == "published", r
        seqs.append(r["seq"])
    return seqs


async def read_messages(ws, n, timeout=10):
    return [await recv_json(ws, timeout) for _ in range(n)]


async def publish_everywhere(a, b, channel, start, n):
    """n messages (data start..start+n-1), in turn by POST /pub on a and b and /ws on a and b.
    Returns the seqs Redis gave them."""
    seqs = {}
    async with ws_connect(a) as wa, ws_connect(b) as wb:
        for i in range(start, start + n):
            way = i % 4
            if way < 2:
                r = await http_async((a, b)[way], "POST", "/pub/" + channel, json.dumps(i).encode())
                assert r.status == 200, r
                seqs[i] = r.json()["seq"]
            else:
                seqs[i] = (await publish_ws((wa, wb)[way - 2], channel, [i]))[0]
    return seqs


def test_resume_through_a_second_node(herald_factory, redis_server):
    a = node(herald_factory, redis_server)
    b = node(herald_factory, redis_server)
    n = 1000

    async def main():
        # A client on node a reads a few messages, then goes away.
        async with ws_connect(a) as ws:
            first = await subscribe(ws, "h:x", id=1)
            assert first["op"] == "subscribed" and first["seq"] == 0 and first["id"] == 1, first
            epoch = first["epoch"]
            assert len(epoch) == 16
            async with ws_connect(b) as pub:
                assert await publish_ws(pub, "h:x", list(range(10))) == list(range(1, 11))
            seen = await read_messages(ws, 10)
            assert [m["seq"] for m in seen] == list(range(1, 11))
        # 1,000 messages while it is away, through both nodes, over HTTP and WebSocket.
        seqs = await publish_everywhere(a, b, "h:x", 10, n)
        assert sorted(seqs.values()) == list(range(11, 11 + n))
        assert all(seqs[i] == i + 1 for i in seqs)  # one publisher at a time: in order
        # It comes back on node b: exactly what it missed, in order, then live messages.
        async with ws_connect(b) as ws:
            reply = await subscribe(ws, "h:x", since=10, epoch=epoch, id="r")
            assert reply == {"op": "subscribed", "channel": "h:x", "epoch": epoch, "seq": 10 + n,
                             "recovered": True, "id": "r"}
            async with ws_connect(a) as pub:
                await publish_ws(pub, "h:x", ["live1", "live2"])
            got = await read_messages(ws, n + 2)
            assert [m["seq"] for m in got] == list(range(11, 13 + n))  # no gap, no duplicate
            assert [m["data"] for m in got] == list(range(10, 10 + n)) + ["live1", "live2"]
            await expect_silence(ws, 0.2)
        # The same through the raw route's query, on either node.
        for h in (a, b):
            async with ws_connect(h, "/sub/h:x?since=%d&epoch=%s" % (n, epoch)) as raw:
                hdrs = raw.response_headers
                assert hdrs["X-Herald-Recovered"] == "true" and hdrs["X-Herald-Epoch"] == epoch
                assert hdrs["X-Herald-Seq"] == str(n + 12)
                got = [await recv(raw) for _ in range(12)]
                assert got == [str(i) for i in range(n, n + 10)] + ["live1", "live2"]
                await expect_silence(raw, 0.1)

    run(main(), timeout=120)
    # And an event stream resumed with Last-Event-ID, on node b, from an id node a gave.
    s = Stream(a.port, "/sse/h:x?last_event_id=%s%%3Ah%%3Ax%%3A%d" % ("x" * 16, n + 12))
    assert a.publish("h:x", b"sse-live").status == 200
    ev = s.next_event()
    epoch = ev["id"].split(":")[0]
    assert ev["id"] == "%s:h:x:%d" % (epoch, n + 13)
    assert json.loads(ev["data"]) == {"channel": "h:x", "seq": n + 13, "data": "sse-live"}
    s.close()
    r = Stream(b.port, "/sse/h:x", {"Last-Event-ID": "%s:h:x:%d" % (epoch, n + 8)})
    events = [r.next_event() for _ in range(5)]
    assert [e["id"] for e in events] == ["%s:h:x:%d" % (epoch, s) for s in range(n + 9, n + 14)]
    assert json.loads(events[-1]["data"])["data"] == "sse-live"
    r.close()
    for h in (a, b):
        st = history_stats(h)
        assert st["channels"] >= 1 and st["joining"] == 0 and st["in_flight"] == 0, st
        assert st["missed"] == 0 and st["publish_errors"] == 0, st


def test_streams_start_where_redis_says(herald_factory, redis_server):
    # A stream opened on a channel Redis numbers is answered once Redis has said where the channel
    # is: a message published once the 101 or the event stream's head is in is never missed.
    a = node(herald_factory, redis_server)
    b = node(herald_factory, redis_server)

    async def main():
        for i in range(10):
            async with ws_connect(a, "/ws?subscribe=h:s%d,plain" % i) as ws, \
                    ws_connect(b, "/sub/h:s%d" % i) as raw:
                assert raw.response_headers["X-Herald-Seq"] == "0"
                assert "X-Herald-Recovered" not in raw.response_headers
                r = await http_async(b, "POST", "/pub/h:s%d" % i, b"first")
                assert r.status == 200 and r.json()["seq"] == 1
                m = await recv_json(ws)
                assert (m["channel"], m["seq"], m["data"]) == ("h:s%d" % i, 1, "first")
                assert await recv(raw) == "first"
            s = Stream(a.port, "/sse/h:s%d?channels=plain" % i)
            assert s.status == 200
            assert a.publish("h:s%d" % i, b"second").status == 200
            assert json.loads(s.next_event()["data"])["data"] == "second"
            s.close()

    run(main(), timeout=60)


def test_seqs_agree_across_nodes(herald_factory, redis_server):
    a = node(herald_factory, redis_server)
    b = node(herald_factory, redis_server)
    n = 400

    async def main():
        async with ws_connect(a) as sa, ws_connect(b) as sb, ws_connect(a) as pa, \
                ws_connect(b) as pb, ws_connect(a, "/sub/h:agree") as raw_a:
            ra = await subscribe(sa, "h:agree")
            rb = await subscribe(sb, "h:agree")
            assert ra["epoch"] == rb["epoch"] and ra["seq"] == rb["seq"] == 0
            # Both nodes publish at once, interleaving as they may.
            values_a = [{"n": "a", "i": i} for i in range(n)]
            values_b = [{"n": "b", "i": i} for i in range(n)]
            seqs_a, seqs_b = await asyncio.gather(publish_ws(pa, "h:agree", values_a),
                                                  publish_ws(pb, "h:agree", values_b))
            assert sorted(seqs_a + seqs_b) == list(range(1, 2 * n + 1))
            assert seqs_a == sorted(seqs_a) and seqs_b == sorted(seqs_b)
            got_a = await read_messages(sa, 2 * n)
            got_b = await read_messages(sb, 2 * n)
            assert [m["seq"] for m in got_a] == list(range(1, 2 * n + 1))
            assert got_a == got_b  # the same seq for each message on both nodes
            by_seq = {m["seq"]: m["data"] for m in got_a}
            assert [by_seq[s] for s in seqs_a] == values_a
            assert [by_seq[s] for s in seqs_b] == values_b
            raw = [json.loads(await recv(raw_a)) for _ in range(2 * n)]
            assert raw == [m["data"] for m in got_a]
            for ws in (sa, sb):
                await expect_silence(ws, 0.1)

    run(main(), timeout=60)
    # POST /pub answers with Redis's seq and this node's subscribers.
    r = a.publish("h:agree", b"counted")
    assert r.status == 200 and r.json() == {"channel": "h:agree", "seq": 2 * n + 1, "subscribers": 0}


def test_past_the_bound_and_a_new_epoch(herald_factory, redis_server):
    a = node(herald_factory, redis_server)
    b = node(herald_factory, redis_server)

    async def main():
        async with ws_connect(a) as ws:
            epoch = (await subscribe(ws, "short:x"))["epoch"]
        for i in range(25):
            assert (a, b)[i % 2].publish("short:x", b"m%d" % i).status == 200
        async with ws_connect(b) as ws:
            reply = await subscribe(ws, "short:x", since=3, epoch=epoch)
            assert reply["recovered"] is False and reply["seq"] == 25 and reply["epoch"] == epoch
            assert a.publish("short:x", b"live").status == 200
            m = await recv_json(ws)  # nothing replayed: the next message is live
            assert (m["seq"], m["data"]) == (26, "live")
        async with ws_connect(a) as ws:  # within the bound it works
            reply = await subscribe(ws, "short:x", since=20, epoch=epoch)
            assert reply["recovered"] is True
            assert [m["seq"] for m in await read_messages(ws, 6)] == [21, 22, 23, 24, 25, 26]
        async with ws_connect(a) as ws:  # another epoch replays nothing
            reply = await subscribe(ws, "short:x", since=20, epoch="0123456789abcdef")
            assert reply["recovered"] is False and reply["epoch"] == epoch

        # Redis restarts without persistence: the history is gone, so is the epoch.
        redis_server.kill()
        await asyncio.to_thread(redis_server.start)
        for h in (a, b):
            await asyncio.to_thread(h.wait_stats, lambda s: s["redis"]["connected"] and
                                    s["redis"]["mirror"]["reconnects"] >= 1, 10)
        async with ws_connect(b) as ws:
            reply = await subscribe(ws, "short:x", since=26, epoch=epoch)
            assert reply["op"] == "subscribed" and reply["recovered"] is False, reply
            assert reply["epoch"] != epoch and reply["seq"] == 0
            r = await http_async(a, "POST", "/pub/short:x", b"again")
            assert r.status == 200 and r.json()["seq"] == 1
            m = await recv_json(ws)
            assert (m["seq"], m["data"]) == (1, "again")

    run(main(), timeout=60)


def test_redis_down_refuses_history_channels_only(herald_factory, redis_server):
    a = node(herald_factory, redis_server)

    async def main():
        async with ws_connect(a, "/ws?subscribe=plain") as plain, ws_connect(a) as hs, \
                ws_connect(a) as pub:
            assert (await subscribe(hs, "h:down"))["op"] == "subscribed"
            await publish_ws(pub, "h:down", ["before"])
            assert (await recv_json(hs))["data"] == "before"
            redis_server.kill()
            await asyncio.to_thread(a.wait_stats, lambda s: not s["redis"]["connected"], 10)
            r = await http_async(a, "POST", "/pub/h:down", b"lost?")
            assert r.status == 503, r
            assert "Redis" in r.json()["error"] and "cannot be reached" in r.json()["error"]
            e = await request(pub, {"op": "publish", "channel": "h:down", "data": 1, "id": 7})
            assert e["op"] == "error" and e["id"] == 7 and "Redis" in e["error"], e
            e = await request(pub, {"op": "subscribe", "channel": "h:other", "id": 8})
            assert e["op"] == "error" and e["id"] == 8 and "Redis" in e["error"], e
            # Channels without history work as before on this node.
            r = await http_async(a, "POST", "/pub/plain", b"still here")
            assert r.status == 200 and r.json()["seq"] == 1
            assert (await recv_json(plain))["data"] == "still here"
            st = history_stats(a)
            assert st["publish_errors"] == 2 and st["join_errors"] == 1, st
            await expect_silence(hs, 0.1)
            # A raw subscriber's 101 says where the channel is: this node knows it for h:down (it
            # hears it), not for h:unheard, whose handshake waits for Redis.
            known = await ws_connect(a, "/sub/h:down").__aenter__()
            assert known.response_headers["X-Herald-Seq"] == "1"
            raw = asyncio.ensure_future(ws_connect(a, "/sub/h:unheard", open_timeout=20).__aenter__())
            await asyncio.sleep(0.2)
            assert not raw.done()
            # Redis comes back: everything works again, the old subscriber included.
            await asyncio.to_thread(redis_server.start)
            await asyncio.to_thread(a.wait_stats, lambda s: s["redis"]["connected"], 10)
            await asyncio.to_thread(redis_server.wait_numsub, "h:down", 1)
            seqs = await publish_ws(pub, "h:down", ["after"])
            m = await recv_json(hs)
            assert (m["seq"], m["data"]) == (seqs[0], "after")
            r = await http_async(a, "POST", "/pub/h:down", b"over http")
            assert r.status == 200 and r.json()["seq"] == seqs[0] + 1
            assert (await recv_json(hs))["data"] == "over http"
            assert [await recv(known), await recv(known)] == ["after", "over http"]
            await known.close()
            raw = await raw
            assert raw.response_headers["X-Herald-Seq"] == "0"
            assert a.publish("h:unheard", b"for raw").status == 200
            assert await recv(raw) == "for raw"
            await raw.close()

    run(main(), timeout=60)


def test_replies_keep_their_order(herald_factory, redis_server):
    a = node(herald_factory, redis_server)

    async def main():
        async with ws_connect(a) as ws:
            requests = [
                {"op": "publish", "channel": "h:o", "data": 1, "id": 1},   # waits for Redis
                {"op": "publish", "channel": "p", "data": 2, "id": 2},     # answered at once
                {"op": "subscribe", "channel": "p", "id": 3},              # waits its turn
                {"op": "publish", "channel": "h:o", "data": 4, "id": 4},
                {"op": "subscribe", "channel": "h:o", "id": 5},
                {"op": "publish", "channel": "p", "data": 6, "id": 6},
                {"op": "bogus", "id": 7},
                {"op": "unsubscribe", "channel": "p", "id": 8},
            ]
            for q in requests:
                await ws.send(json.dumps(q))
            replies = []
            while len(replies) < len(requests):
                m = await recv_json(ws)
                if m["op"] != "message":
                    replies.append(m)
            assert [r["id"] for r in replies] == list(range(1, 9)), replies
            assert [r["op"] for r in replies] == ["published", "published", "subscribed", "published",
                                                  "subscribed", "published", "error", "unsubscribed"]
            assert replies[4]["seq"] == 2 and replies[3]["seq"] == 2 and replies[0]["seq"] == 1
        # POST /pub pipelined on one keep-alive connection: the answers in order.
        with RawHTTP(a.port) as h:
            reqs = b"".join(h.build("POST", "/pub/" + ch, b"x") for ch in ("h:o", "p", "h:o", "p"))
            h.send(reqs)
            got = [h.read_response() for _ in range(4)]
        assert [r.status for r in got] == [200] * 4
        assert [(r.json()["channel"], r.json()["seq"]) for r in got] == \
            [("h:o", 3), ("p", 3), ("h:o", 4), ("p", 4)]

    run(main(), timeout=30)


def test_disconnect_while_the_fetch_is_in_flight(herald_factory, redis_server):
    a = node(herald_factory, redis_server)

    async def main():
        async with ws_connect(a) as keeper:  # the node keeps hearing h:f
            epoch = (await subscribe(keeper, "h:f"))["epoch"]
            for i in range(5):
                assert a.publish("h:f", b"m%d" % i).status == 200
            for _ in range(3):
                # Redis answers nothing for a moment (long enough for the connections below to
                # be made and to go): their joins are in flight (their publishes wait behind).
                with redis_server.client() as c:
                    assert c.command("CLIENT", "PAUSE", "2000", "ALL") == "OK"
                clients = []
                for _ in range(20):
                    ws = await ws_connect(a).__aenter__()
                    await ws.send(json.dumps({"op": "subscribe", "channel": "h:f", "since": 1,
                                              "epoch": epoch}))
                    await ws.send(json.dumps({"op": "publish", "channel": "h:f", "data": "x"}))
                    clients.append(ws)
                raws = [socket.create_connection((HOST, a.port)) for _ in range(5)]
                for s in raws:
                    s.sendall(("GET /sub/h:f?since=2&epoch=%s HTTP/1.1\r\nHost: x\r\n"
                               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                               "Sec-WebSocket-Version: 13\r\n\r\n" % epoch).encode())
                # Every subscription waits for Redis, its fetch in flight, when they go (the
                # pause has well over a second to run).
                st = await asyncio.to_thread(
                    a.wait_stats, lambda s: s["redis"]["mirror"]["history"]["joining"] == 25, 10)
                assert st["redis"]["mirror"]["history"]["joining"] == 25, st["redis"]["mirror"]
                for ws in clients:
                    ws.transport.abort()
                for s in raws:
                    s.close()
                await asyncio.to_thread(a.wait_stats, lambda s: s["connections"] <= 2, 10)
            st = await asyncio.to_thread(
                a.wait_stats, lambda s: s["redis"]["mirror"]["history"]["joining"] == 0 and
                s["redis"]["mirror"]["history"]["in_flight"] == 0, 10)
            assert st["redis"]["mirror"]["history"]["held"] == 0
            # The node is well: a resume now works, and the keeper missed nothing.
            async with ws_connect(a) as ws:
                r = await subscribe(ws, "h:f", since=0, epoch=epoch)
                assert r["recovered"] is True
                got = await read_messages(ws, r["seq"])
                assert [m["seq"] for m in got] == list(range(1, r["seq"] + 1))
            got = await read_messages(keeper, r["seq"])
            assert [m["seq"] for m in got] == list(range(1, r["seq"] + 1))

    run(main(), timeout=60)


def test_gap_in_the_live_stream_is_filled(herald_factory, redis_server):
    # Node a comes back about a second after its subscriber connection is cut (0.8 to 1.2 s with
    # the jitter): long after the five messages it must miss, so that it has a gap to fill.
    a = node(herald_factory, redis_server, redis={"reconnect_min": 1.0, "reconnect_max": 1.0})
    b = node(herald_factory, redis_server)

    async def main():
        async with ws_connect(a) as ws:
            await subscribe(ws, "h:gap")
            await asyncio.to_thread(redis_server.wait_numsub, "h:gap", 1)
            for i in range(3):
                assert b.publish("h:gap", b"%d" % i).status == 200
            assert [m["seq"] for m in await read_messages(ws, 3)] == [1, 2, 3]
            # Node a's subscriber connection is cut: what is published meanwhile it does not hear.
            with redis_server.client() as c:
                c.command("CLIENT", "KILL", "TYPE", "pubsub")
            for i in range(3, 8):
                assert b.publish("h:gap", b"%d" % i).status == 200
            await asyncio.to_thread(a.wait_stats, lambda s: s["redis"]["connected"] and
                                    s["redis"]["reconnects"] >= 1, 10)
            await asyncio.to_thread(redis_server.wait_numsub, "h:gap", 1)
            assert b.publish("h:gap", b"8").status == 200
            got = await read_messages(ws, 6)
            assert [m["seq"] for m in got] == [4, 5, 6, 7, 8, 9]
            assert [m["data"] for m in got] == [3, 4, 5, 6, 7, 8]
            await expect_silence(ws, 0.1)
        st = history_stats(a)
        assert st["gaps_filled"] == 1 and st["missed"] == 0, st

    run(main(), timeout=60)


def test_envelopes_on_the_wire(herald_factory, redis_server):
    a = node(herald_factory, redis_server)
    nid = a.stats()["redis"]["mirror"]["node_id"]

    async def main():
        async with ws_connect(a) as ws:
            r = await subscribe(ws, "h:w")
            epoch = r["epoch"]
            with redis_server.client() as c:
                assert c.command("SUBSCRIBE", "h:w")[0] == b"subscribe"
                assert a.publish("h:w", b"raw \x00 bytes").status == 200
                head = b"\xffherald:1:" + nid.encode()
                assert c.read() == [b"message", b"h:w",
                                    head + b":h:r:" + epoch.encode() + b":1:raw \x00 bytes"]
            m = await recv_json(ws)
            assert (m["seq"], m["data"]) == (1, "raw \x00 bytes")
            # Published to Redis without a number (a backend, a node without the rule): dropped.
            with redis_server.client() as c:
                c.command("PUBLISH", "h:w", "plain")
                c.command("PUBLISH", "h:w", b"\xffherald:1:0123456789abcdef:j:{\"old\":1}")
            await expect_silence(ws, 0.2)
            assert history_stats(a)["unnumbered_dropped"] == 2
            # The keys Redis holds for the channel.
            with redis_server.client() as c:
                assert c.command("HGET", "herald:{h:w}:seq", "e") == epoch.encode()
                assert c.command("HGET", "herald:{h:w}:seq", "s") == b"1"
                entry = c.command("XRANGE", "herald:{h:w}:history", "-", "+")
                assert entry[0][0] == b"1-0"
                fields = dict(zip(entry[0][1][::2], entry[0][1][1::2]))
                assert fields[b"k"] == b"r" and fields[b"d"] == b"raw \x00 bytes"
                assert 0 < c.command("PTTL", "herald:{h:w}:history") <= 600000

    run(main(), timeout=30)


def test_lua_publish_learns_the_seq_later(herald_factory, redis_server, tmp_path):
    script = tmp_path / "pub.lua"
    script.write_text("""
return {
  message = function(client, data)
    local seq, why = herald.publish("h:lua", data, function(s, n)
      client:send(herald.json.encode({ seq = s, subscribers = n }))
    end)
    client:send(herald.json.encode({ now = seq or why }))
  end,
}
""")
    a = node(herald_factory, redis_server,
             routes=ROUTES + [{"path": "/lua", "script": str(script)}])

    async def main():
        async with ws_connect(a, "/lua") as ws, ws_connect(a, "/ws?subscribe=h:lua") as sub:
            await asyncio.to_thread(redis_server.wait_numsub, "h:lua", 1)
            await ws.send("hello")
            assert await recv_json(ws) == {"now": "pending"}
            assert await recv_json(ws) == {"seq": 1, "subscribers": 1}
            m = await recv_json(sub)
            assert (m["seq"], m["data"]) == (1, "hello")

    run(main(), timeout=30)


def test_scripts_flushed_midway(herald_factory, redis_server):
    # Redis forgets its scripts (SCRIPT FLUSH, a failover) while publishes are under way: those
    # it refused go again, in order, with nothing lost, doubled or renumbered.
    a = node(herald_factory, redis_server)

    async def main():
        async with ws_connect(a) as sub, ws_connect(a) as pub:
            epoch = (await subscribe(sub, "h:flush"))["epoch"]
            for i in range(200):
                await pub.send(json.dumps({"op": "publish", "channel": "h:flush", "data": i}))
                if i == 100:
                    with redis_server.client() as c:
                        assert c.command("SCRIPT", "FLUSH") == "OK"
            replies = [await recv_json(pub, 10) for _ in range(200)]
            assert [r["op"] for r in replies] == ["published"] * 200, replies
            assert [r["seq"] for r in replies] == list(range(1, 201))
            got = await read_messages(sub, 200)
            assert [(m["seq"], m["data"]) for m in got] == [(i + 1, i) for i in range(200)]
            # A join after the flush works too (its script is loaded again).
            async with ws_connect(a) as late:
                with redis_server.client() as c:
                    c.command("SCRIPT", "FLUSH")
                r = await subscribe(late, "h:flush", since=190, epoch=epoch)
                assert r["recovered"] is True
                assert [m["seq"] for m in await read_messages(late, 10)] == list(range(191, 201))
        assert history_stats(a)["noscript"] >= 1

    run(main(), timeout=60)


def test_resuming_client_counts_every_message(herald_factory, redis_server):
    # While messages are published all along through both nodes, a client keeps dropping its
    # connection (reset, no close handshake) and resuming on the other node: in the end it has
    # seen every seq exactly once, in order, with the right data.
    a = node(herald_factory, redis_server)
    b = node(herald_factory, redis_server)
    total = 1500
    subscribed = asyncio.Event()  # the client's first subscription comes before any message

    async def publisher():
        await subscribed.wait()
        async with ws_connect(a) as pa, ws_connect(b) as pb:
            for i in range(0, total, 10):
                ws = (pa, pb)[(i // 10) % 2]
                await publish_ws(ws, "h:count", list(range(i, i + 10)))
                if i % 200 == 0:
                    r = await http_async((a, b)[(i // 200) % 2], "GET", "/stats")
                    assert r.status == 200

    async def client():
        seen = []
        epoch = None
        hop = 0
        while len(seen) < total:
            h = (a, b)[hop % 2]
            ws = await ws_connect(h).__aenter__()
            if epoch is None:
                r = await subscribe(ws, "h:count")
                epoch = r["epoch"]
                assert r["seq"] == 0
                subscribed.set()
            else:
                r = await subscribe(ws, "h:count", since=len(seen), epoch=epoch)
                assert r["op"] == "subscribed" and r["recovered"] is True, r
            for _ in range(min(37 + hop * 13 % 101, total - len(seen))):
                m = await recv_json(ws, 10)
                assert m["seq"] == len(seen) + 1, (m, hop)
                seen.append(m["data"])
            ws.transport.abort()  # gone without a word
            hop += 1
        return seen, hop

    async def main():
        seen, hops = (await asyncio.gather(client(), publisher()))[0]
        assert seen == list(range(total))
        assert hops >= 10

    run(main(), timeout=120)
    s = Stream(b.port, "/sse/h:count")  # an event stream gets the next one, with the same epoch
    assert a.publish("h:count", b"end").status == 200
    assert s.next_event()["id"].endswith(":h:count:%d" % (total + 1))
    s.close()
