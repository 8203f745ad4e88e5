"""The generic pub/sub route (/ws), the raw subscribe route (/sub/<channel>), /stats and /metrics."""
import asyncio
import hashlib
import json
import re

import pytest

from herald_util import (OP_BINARY, OP_TEXT, RawHTTP, RawWS, expect_silence, http_async,
                         json_exact, recv, recv_json, request, run, ws_connect)


def pub(channel, data_text, id_text=None):
    """A publish request with data (and id) given as raw JSON text."""
    extra = "" if id_text is None else ',"id":%s' % id_text
    return '{"op":"publish","channel":"%s","data":%s%s}' % (channel, data_text, extra)


# --- requests and replies -----------------------------------------------------------------------


def test_subscribe_publish_message(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws") as a, ws_connect(herald_module, "/ws") as b:
            assert await request(a, {"op": "subscribe", "channel": "rt"}) == \
                {"op": "subscribed", "channel": "rt"}
            assert await request(b, {"op": "publish", "channel": "rt", "data": {"x": 1}}) == \
                {"op": "published", "channel": "rt", "seq": 1}
            assert await recv_json(a) == {"op": "message", "channel": "rt", "seq": 1, "data": {"x": 1}}
            assert await request(b, {"op": "publish", "channel": "rt", "data": [2]}) == \
                {"op": "published", "channel": "rt", "seq": 2}
            assert await recv_json(a) == {"op": "message", "channel": "rt", "seq": 2, "data": [2]}
            await expect_silence(b, 0.1)  # b is not subscribed
    run(main())


IDS = ["1", "0", "-7", "1.50", "12345678901234567890", '"abc"', '""', '"ünï ✓"', "null", "true",
       "false", '[1,"a",null]', '{"k":[1,{"z":2}]}']


@pytest.mark.parametrize("op", ["subscribe", "unsubscribe", "publish"])
def test_reply_carries_id(herald_module, op):
    async def main():
        async with ws_connect(herald_module, "/ws") as ws:
            for id_text in IDS:
                if op == "publish":
                    req = pub("ids", '"d"', id_text)
                else:
                    req = '{"op":"%s","channel":"ids","id":%s}' % (op, id_text)
                await ws.send(req)
                text = await recv(ws)
                reply = json_exact(text)
                assert reply.get("id", "absent") == json_exact(id_text), (req, text)
                assert reply["op"] == {"subscribe": "subscribed", "unsubscribe": "unsubscribed",
                                       "publish": "published"}[op], text
                assert reply["channel"] == "ids"
            # and without an id there is none in the reply
            req = pub("ids", "1") if op == "publish" else '{"op":"%s","channel":"ids"}' % op
            reply = await request(ws, req)
            assert "id" not in reply, reply
    run(main())


def test_id_first_in_object(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws") as ws:
            reply = await request(ws, '{"id":"first","channel":"idf","op":"subscribe"}')
            assert reply == {"op": "subscribed", "channel": "idf", "id": "first"}
    run(main())


BAD_REQUESTS = {
    "not_json": "hello there",
    "truncated": '{"op":"subscribe","channel":"c"',
    "trailing_garbage": '{"op":"subscribe","channel":"c"} x',
    "empty_text": "",
    "array": '[{"op":"subscribe","channel":"c"}]',
    "string": '"subscribe"',
    "number": "42",
    "null": "null",
    "missing_op": '{"channel":"c"}',
    "unknown_op": '{"op":"dance","channel":"c"}',
    "op_not_string": '{"op":5,"channel":"c"}',
    "missing_channel": '{"op":"subscribe"}',
    "channel_not_string": '{"op":"subscribe","channel":7}',
    "channel_empty": '{"op":"subscribe","channel":""}',
    "channel_space": '{"op":"subscribe","channel":"a b"}',
    "channel_201": '{"op":"subscribe","channel":"%s"}' % ("x" * 201),
    "channel_unicode": '{"op":"subscribe","channel":"caf\u00e9"}',
    "channel_star": '{"op":"publish","channel":"a*b","data":1}',
    "missing_data": '{"op":"publish","channel":"c"}',
    "bad_data": '{"op":"publish","channel":"c","data":nope}',
}

# Objects that can carry an id: the error reply must echo it.
WITH_ID = ["missing_op", "unknown_op", "op_not_string", "missing_channel", "channel_not_string",
           "channel_empty", "channel_space", "channel_201", "channel_unicode", "channel_star",
           "missing_data"]


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_error_keeps_connection_open(herald_module, case):
    async def main():
        async with ws_connect(herald_module, "/ws") as ws:
            reply = await request(ws, BAD_REQUESTS[case])
            assert reply.get("op") == "error", reply
            assert isinstance(reply.get("error"), str) and reply["error"], reply
            assert "id" not in reply
            if case in WITH_ID:
                req = BAD_REQUESTS[case][:-1] + ',"id":{"n":%d}}' % len(case)
                reply = await request(ws, req)
                assert reply.get("op") == "error", reply
                assert reply.get("id") == {"n": len(case)}, reply
            # still open and working
            assert await request(ws, {"op": "subscribe", "channel": "after-error"}) == \
                {"op": "subscribed", "channel": "after-error"}
    run(main())


def test_binary_frame_gets_error(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws") as ws:
            await ws.send(b'{"op":"subscribe","channel":"bin"}')
            reply = await recv_json(ws)
            assert reply.get("op") == "error" and reply.get("error"), reply
            assert await request(ws, {"op": "subscribe", "channel": "bin"}) == \
                {"op": "subscribed", "channel": "bin"}
    run(main())


def test_long_channel_name_ok(herald_module):
    name = ("AZaz09_-.:/" * 20)[:200]
    async def main():
        async with ws_connect(herald_module, "/ws") as ws:
            assert await request(ws, {"op": "subscribe", "channel": name}) == \
                {"op": "subscribed", "channel": name}
    run(main())


# --- published values ---------------------------------------------------------------------------

VALUES = ["12345678901234567890", "1.10", "-0", "1E+2", "0.000001", "-12.5e-3", "true", "false",
          "null", '"plain"', '""', '"unicode \u00e9 \u2713 \U0001d11e"',
          '"escapes \\" \\\\ \\n \\t \\u00e9 \\ud834\\udd1e \\u0000"',
          '{"nested":{"a":[1,2,{"b":null}]},"k":"v","n":1.000}', "[]", "{}", '[1,"two",3.0]',
          ' { "spaced" : [ 1 , 2 ] } ']


def test_published_values_forwarded(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws?subscribe=vals") as sub, \
                ws_connect(herald_module, "/ws") as pubc:
            for i, v in enumerate(VALUES, 1):
                reply = await request(pubc, pub("vals", v))
                assert reply == {"op": "published", "channel": "vals", "seq": i}, (v, reply)
                text = await recv(sub)
                msg = json_exact(text)
                assert msg["op"] == "message" and msg["channel"] == "vals", text
                assert msg["seq"] == ("num", str(i)), text
                assert msg["data"] == json_exact(v), (v, text)
                assert set(msg) == {"op", "channel", "seq", "data"}, text
    run(main())


@pytest.mark.parametrize("body,expected", [
    (b"hello", "hello"),
    (b'{"a":1}', {"a": 1}),
    (b"[1,2]", [1, 2]),
    (b'"quoted"', "quoted"),
    (b"42", 42),
    (b"  ", "  "),
    (b'hello "world"\n\\', 'hello "world"\n\\'),
    (b"{not json", "{not json"),
    ("caf\u00e9 \u2713".encode(), "caf\u00e9 \u2713"),
])
def test_raw_publish_to_ws(herald_module, body, expected):
    channel = "raw" + hashlib.md5(body).hexdigest()[:10]
    async def main():
        async with ws_connect(herald_module, "/ws?subscribe=" + channel) as sub:
            r = await http_async(herald_module, "POST", "/pub/" + channel, body)
            assert r.status == 200, r
            msg = await recv_json(sub)
            assert msg == {"op": "message", "channel": channel, "seq": r.json()["seq"],
                           "data": expected}, msg
    run(main())


def test_raw_publish_number_exact(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws?subscribe=rawnum") as sub:
            r = await http_async(herald_module, "POST", "/pub/rawnum", b"12345678901234567890.10")
            assert r.status == 200
            msg = json_exact(await recv(sub))
            assert msg["data"] == ("num", "12345678901234567890.10")
    run(main())


def test_raw_publish_invalid_utf8_to_ws(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws?subscribe=rawbin") as sub:
            r = await http_async(herald_module, "POST", "/pub/rawbin", b"ab\xff\xfecd")
            assert r.status == 200
            msg = await recv_json(sub)  # still a valid text frame holding valid JSON
            assert isinstance(msg["data"], str) and msg["data"].startswith("ab"), msg
    run(main())


# --- subscriptions ------------------------------------------------------------------------------


def test_query_subscribe(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws?subscribe=qa,qb") as sub:
            for ch, body in (("qa", b"1"), ("qb", b"2"), ("qc", b"3"), ("qa", b"4")):
                r = await http_async(herald_module, "POST", "/pub/" + ch, body)
                assert r.status == 200
            got = []
            for _ in range(3):
                m = await recv_json(sub)
                got.append((m["channel"], m["seq"], m["data"]))
            assert got == [("qa", 1, 1), ("qb", 1, 2), ("qa", 2, 4)]
            await expect_silence(sub, 0.1)
    run(main())


def test_unsubscribe_stops_delivery(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws") as sub, ws_connect(herald_module, "/ws") as p:
            for ch in ("u1", "u2"):
                assert (await request(sub, {"op": "subscribe", "channel": ch}))["op"] == "subscribed"
            await request(p, {"op": "publish", "channel": "u1", "data": "first"})
            assert (await recv_json(sub))["data"] == "first"
            assert await request(sub, {"op": "unsubscribe", "channel": "u1"}) == \
                {"op": "unsubscribed", "channel": "u1"}
            await request(p, {"op": "publish", "channel": "u1", "data": "dropped"})
            await request(p, {"op": "publish", "channel": "u2", "data": "marker"})
            m = await recv_json(sub)
            assert (m["channel"], m["data"]) == ("u2", "marker"), m
            await expect_silence(sub, 0.1)
    run(main())


def test_subscribe_and_unsubscribe_are_idempotent(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws") as sub, ws_connect(herald_module, "/ws") as p:
            for _ in range(2):
                assert await request(sub, {"op": "subscribe", "channel": "idem"}) == \
                    {"op": "subscribed", "channel": "idem"}
            assert await request(sub, {"op": "subscribe", "channel": "idem2"}) == \
                {"op": "subscribed", "channel": "idem2"}
            assert await request(sub, {"op": "unsubscribe", "channel": "never"}) == \
                {"op": "unsubscribed", "channel": "never"}
            await request(p, {"op": "publish", "channel": "idem", "data": 1})
            await request(p, {"op": "publish", "channel": "idem2", "data": 2})
            m1, m2 = await recv_json(sub), await recv_json(sub)
            assert (m1["channel"], m2["channel"]) == ("idem", "idem2"), (m1, m2)
            for _ in range(2):
                assert await request(sub, {"op": "unsubscribe", "channel": "idem"}) == \
                    {"op": "unsubscribed", "channel": "idem"}
    run(main())


def test_publisher_subscribed_to_its_channel(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws") as ws:
            await request(ws, {"op": "subscribe", "channel": "self"})
            await ws.send(json.dumps({"op": "publish", "channel": "self", "data": "me", "id": 9}))
            got = sorted([await recv_json(ws), await recv_json(ws)], key=lambda m: m["op"])
            assert got == [{"op": "message", "channel": "self", "seq": 1, "data": "me"},
                           {"op": "published", "channel": "self", "seq": 1, "id": 9}]
    run(main())


def test_seq_is_per_channel(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws?subscribe=sa,sb") as sub, \
                ws_connect(herald_module, "/ws") as p:
            order = ["sa", "sb", "sa", "sa", "sb"]
            for ch in order:
                await request(p, {"op": "publish", "channel": ch, "data": ch})
            got = [(m["channel"], m["seq"]) for m in [await recv_json(sub) for _ in order]]
            assert got == [("sa", 1), ("sb", 1), ("sa", 2), ("sa", 3), ("sb", 2)]
    run(main())


def test_message_burst_in_order(herald_module):
    async def main():
        async with ws_connect(herald_module, "/ws?subscribe=burst") as sub, \
                ws_connect(herald_module, "/ws") as p:
            n = 500
            for i in range(n):
                await p.send(json.dumps({"op": "publish", "channel": "burst", "data": i}))
            for i in range(n):
                assert (await recv_json(p))["seq"] == i + 1
            for i in range(n):
                m = await recv_json(sub)
                assert (m["seq"], m["data"]) == (i + 1, i)
    run(main())


# --- the raw subscribe route --------------------------------------------------------------------


def test_raw_route_receives_published_bytes(herald_module):
    with RawWS(herald_module.port, "/sub/rawb") as sub:
        for body, op in ((b"hello", OP_TEXT), ("caf\u00e9 \u2713".encode(), OP_TEXT),
                         (b"\xff\x00binary", OP_BINARY), (b'{"not":"wrapped"}', OP_TEXT),
                         (b"", OP_TEXT), (bytes(range(256)), OP_BINARY)):
            assert herald_module.publish("rawb", body).status == 200
            assert sub.recv_message()[:2] == (op, body)


@pytest.mark.parametrize("data_text,expected,op", [
    ('"a JSON string"', b"a JSON string", OP_TEXT),
    ('"esc \\" \\\\ \\n \\u00e9 \\ud834\\udd1e"', 'esc " \\ \n \u00e9 \U0001d11e'.encode(), OP_TEXT),
    ('"nul \\u0000 byte"', b"nul \x00 byte", OP_TEXT),
    ('""', b"", OP_TEXT),
    ('{"a":1,"b":[true,null]}', b'{"a":1,"b":[true,null]}', OP_TEXT),
    ("12345678901234567890", b"12345678901234567890", OP_TEXT),
    ("1.10", b"1.10", OP_TEXT),
    ("null", b"null", OP_TEXT),
    ("[1,2]", b"[1,2]", OP_TEXT),
])
def test_raw_route_receives_ws_publish(herald_module, data_text, expected, op):
    channel = "rj" + hashlib.md5(data_text.encode()).hexdigest()[:10]
    with RawWS(herald_module.port, "/sub/" + channel) as sub, \
            RawWS(herald_module.port, "/ws") as p:
        p.send_text(pub(channel, data_text))
        _, reply, _ = p.recv_message()
        assert json.loads(reply)["op"] == "published", reply
        got_op, got, _ = sub.recv_message()
        if data_text.startswith("{"):
            assert json.loads(got) == json.loads(expected)
        else:
            assert got == expected
        assert got_op == op


def test_raw_route_publishes_client_messages(herald_module):
    with RawWS(herald_module.port, "/sub/rawpub") as a, RawWS(herald_module.port, "/sub/rawpub") as b, \
            RawWS(herald_module.port, "/ws?subscribe=rawpub") as w:
        a.send_text(b"from raw")
        assert b.recv_message()[:2] == (OP_TEXT, b"from raw")
        assert json.loads(w.recv_message()[1]) == \
            {"op": "message", "channel": "rawpub", "seq": 1, "data": "from raw"}
        a.send_frame(OP_BINARY, b"\xff\xfe")
        assert b.recv_message()[:2] == (OP_BINARY, b"\xff\xfe")
        a.send_text(b'{"k":1}')
        assert b.recv_message()[:2] == (OP_TEXT, b'{"k":1}')
        w.recv_message()  # the binary one, as a string
        assert json.loads(w.recv_message()[1])["data"] == {"k": 1}


def test_raw_route_without_publish_closes_1008(herald_module):
    with RawWS(herald_module.port, "/ro/rochan") as ro:
        assert herald_module.publish("rochan", b"to read-only").status == 200
        assert ro.recv_message()[:2] == (OP_TEXT, b"to read-only")
        ro.send_text(b"not allowed")
        ro.expect_close(1008)


# --- /stats and /metrics ------------------------------------------------------------------------

PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?[ \t]+(\S+)([ \t]+-?\d+)?$")


def parse_prometheus(text):
    samples, types = {}, {}
    assert text.endswith("\n")
    for line in text.split("\n")[:-1]:
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                types[parts[2]] = parts[3]
            continue
        m = PROM_LINE.match(line)
        assert m, "not a Prometheus sample line: %r" % line
        float(m.group(3))
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples, types


def test_stats_reflect_clients_and_messages(herald):
    with RawHTTP(herald.port) as h:
        def stats():
            r = h.request("GET", "/stats")
            assert r.status == 200 and r.header("content-type").startswith("application/json"), r
            return r.json()

        s0 = stats()
        for key in ("connections", "websockets", "channels", "subscriptions", "messages_in",
                    "messages_out", "bytes_out", "slow_consumers_dropped", "protocol_errors",
                    "uptime_s", "redis", "tail"):
            assert key in s0, key
        assert isinstance(s0["redis"], dict) and isinstance(s0["tail"], list)
        assert s0["websockets"] == 0 and s0["subscriptions"] == 0
        assert s0["connections"] == 1  # this one

        clients = [RawWS(herald.port, "/sub/st1"), RawWS(herald.port, "/sub/st1"),
                   RawWS(herald.port, "/ws?subscribe=st1,st2"), RawWS(herald.port, "/echo")]
        try:
            s1 = stats()
            assert s1["websockets"] == 4, s1
            assert s1["connections"] == 5, s1
            assert s1["subscriptions"] == 4, s1
            assert s1["channels"] >= 2, s1
            for i in range(3):
                r = h.request("POST", "/pub/st1", b"m%d" % i)
                assert r.status == 200 and r.json()["subscribers"] == 3, r
            for c in clients[:3]:
                for i in range(3):
                    c.recv_message()
            s2 = stats()
            assert s2["messages_in"] - s1["messages_in"] == 3, (s1, s2)
            assert s2["messages_out"] - s1["messages_out"] == 9, (s1, s2)
            assert s2["bytes_out"] > s1["bytes_out"]

            clients[3].send_frame(OP_TEXT, b"x", rsv=2)
            clients[3].expect_close(1002)
            s3 = stats()
            assert s3["protocol_errors"] == s2["protocol_errors"] + 1, (s2, s3)
            assert s3["websockets"] == 3, s3
        finally:
            for c in clients:
                c.close()
        deadline_ok = herald.wait_stats(lambda s: s["websockets"] == 0 and s["subscriptions"] == 0)
        assert deadline_ok["websockets"] == 0 and deadline_ok["subscriptions"] == 0, deadline_ok


def test_stats_after_clean_close(herald):
    async def main():
        async with ws_connect(herald, "/ws?subscribe=cc1") as ws:
            await request(ws, {"op": "subscribe", "channel": "cc2"})
            s = await asyncio.get_running_loop().run_in_executor(None, herald.stats)
            assert s["websockets"] == 1 and s["subscriptions"] == 2, s
        # the close handshake is complete once the context exits
        s = await asyncio.get_running_loop().run_in_executor(None, herald.stats)
        assert s["websockets"] == 0 and s["subscriptions"] == 0, s
    run(main())


def test_metrics_prometheus(herald):
    with RawWS(herald.port, "/sub/pm"):
        assert herald.publish("pm", b"x").status == 200
        r = herald.request("GET", "/metrics")
        assert r.status == 200
        assert r.header("content-type", "").startswith("text/plain"), r
        samples, types = parse_prometheus(r.body.decode())
        stats = herald.stats()
    assert samples, "no samples"
    for name in samples:
        assert name.startswith("herald_"), name
    for name, t in types.items():
        assert name.startswith("herald_"), name
        if t == "counter":
            assert name.endswith("_total"), name
    for name in ("herald_messages_in_total", "herald_messages_out_total", "herald_websockets",
                 "herald_connections", "herald_subscriptions", "herald_channels",
                 "herald_slow_consumers_dropped_total", "herald_bytes_out_total"):
        assert name in samples, name
    assert samples["herald_messages_in_total"] == stats["messages_in"] == 1
    assert samples["herald_websockets"] == 1
    assert samples["herald_subscriptions"] == 1


def test_metrics_head_and_keep_alive(herald):
    with RawHTTP(herald.port) as h:
        r = h.request("HEAD", "/metrics")
        assert r.status == 200 and int(r.header("content-length")) > 0
        r = h.request("GET", "/stats")
        assert r.status == 200 and r.json()["connections"] == 1
