"""The Redis source against a real redis-server: channels and patterns reach WebSocket subscribers
in order; the connection survives Redis going away (reconnect with backoff, resubscribe, state in
/stats, one log line per transition); password, database and Unix socket; reloads."""
import asyncio
import json
import re
import time

from herald_util import expect_silence, recv, recv_json, request, run, ws_connect
from redis_util import RedisServer, SteadyPublisher, redis_settings


def wait_ready(h, subscriptions, timeout=10.0):
    """Wait until herald's Redis source is connected with that many confirmed subscriptions."""
    s = h.wait_stats(lambda s: s["redis"]["connected"] and
                     s["redis"]["subscriptions"] == subscriptions, timeout)
    assert s["redis"]["connected"] and s["redis"]["subscriptions"] == subscriptions, s["redis"]
    return s["redis"]


def test_channels_and_patterns_reach_subscribers_in_order(herald_factory, redis_server):
    h = herald_factory(redis=redis_settings(redis_server, channels=["news", "alerts"],
                                            patterns=["metrics.*"]))
    h.wait_log("redis: connected")
    wait_ready(h, 3)
    assert redis_server.channels() == ["alerts", "news"]
    channels = ["news", "metrics.cpu", "metrics.mem"]

    async def main():
        async with ws_connect(h) as ws, ws_connect(h, "/sub/metrics.cpu") as raw:
            for ch in channels:
                assert (await request(ws, {"op": "subscribe", "channel": ch}))["op"] == "subscribed"
            sent, cmds = [], []
            for i in range(300):
                ch = channels[i % 3]
                payload = json.dumps({"i": i, "ch": ch}) if i % 2 else "plain text %d" % i
                sent.append((ch, payload))
                cmds.append(("PUBLISH", ch, payload))
            cmds.append(("PUBLISH", "alerts", "configured, but nobody here listens"))
            cmds.append(("PUBLISH", "elsewhere", "not configured"))
            with redis_server.client() as c:
                replies = await asyncio.to_thread(c.pipeline, cmds)
            assert replies == [1] * 301 + [0]
            # Order is per channel (messages of different channels published in one loop pass
            # may interleave differently).
            got = {ch: [] for ch in channels}
            for _ in sent:
                m = await recv_json(ws)
                assert m["op"] == "message", m
                got[m["channel"]].append(m)
            for ch in channels:
                want = [p for c, p in sent if c == ch]
                assert [m["seq"] for m in got[ch]] == list(range(1, len(want) + 1))
                assert [m["data"] for m in got[ch]] == \
                    [json.loads(p) if p.startswith("{") else p for p in want]
            for ch, payload in sent:
                if ch == "metrics.cpu":
                    assert await recv(raw) == payload
            await expect_silence(ws, 0.2)
            await expect_silence(raw, 0.05)

    run(main())
    s = h.stats()["redis"]
    assert s["messages_received"] == 301 and s["messages_published"] == 301
    assert s["messages_dropped"] == 0 and s["reconnects"] == 0 and s["state"] == "connected"
    assert s["mirror"]["enabled"] is False
    metrics = h.metrics()
    assert re.search(r"^herald_redis_connected 1$", metrics, re.M)
    assert re.search(r"^herald_redis_messages_received_total 301$", metrics, re.M)
    assert re.search(r"^herald_redis_reconnects_total 0$", metrics, re.M)


def test_overlapping_patterns_and_channels_deliver_once(herald_factory, redis_server):
    # news.* covers the configured news.top; a.* and *.b overlap on a.b: each message once.
    h = herald_factory(redis=redis_settings(redis_server, channels=["news.top", "plain"],
                                            patterns=["news.*", "a.*", "*.b"]))
    wait_ready(h, 4)  # three patterns and "plain": news.top comes through its pattern
    assert redis_server.channels() == ["plain"]

    async def main():
        async with ws_connect(h, "/ws?subscribe=news.top,a.b,a.c,x.b,plain") as ws:
            with redis_server.client() as c:
                for i in range(20):
                    for ch in ("news.top", "a.b", "a.c", "x.b", "plain"):
                        c.command("PUBLISH", ch, "%s %d" % (ch, i))
            got = {}
            for _ in range(100):
                m = await recv_json(ws)
                got.setdefault(m["channel"], []).append(m["data"])
            for ch in ("news.top", "a.b", "a.c", "x.b", "plain"):
                assert got[ch] == ["%s %d" % (ch, i) for i in range(20)]
            await expect_silence(ws, 0.3)

    run(main())


def test_invalid_names_and_oversized_messages_are_dropped_and_counted(herald_factory, redis_server):
    h = herald_factory(limits={"max_message": 1024},
                       redis=redis_settings(redis_server, patterns=["metrics.*"]))
    wait_ready(h, 1)

    async def main():
        async with ws_connect(h, "/sub/metrics.ok") as raw:
            with redis_server.client() as c:
                c.command("PUBLISH", "metrics.bad name", "x")   # a space: not a herald channel
                c.command("PUBLISH", "metrics.ok", "y" * 1025)  # over max_message
                c.command("PUBLISH", "metrics.ok", "y" * 1024)
            assert await recv(raw) == "y" * 1024
            await expect_silence(raw, 0.2)

    run(main())
    s = h.stats()
    assert s["redis"]["messages_received"] == 3 and s["redis"]["messages_dropped"] == 2
    assert s["messages_too_big"] == 1
    assert "redis: dropped a message" in h.stderr_text()


def test_reconnects_and_resubscribes_when_redis_restarts(herald_factory, redis_server):
    h = herald_factory(redis=redis_settings(redis_server, channels=["feed"], patterns=["p.*"]))
    wait_ready(h, 2)

    async def main():
        async with ws_connect(h, "/sub/feed") as sub, ws_connect(h, "/echo") as echo:
            got = []

            async def receive_until(pred):
                while not pred():
                    m = await recv(sub, 10)
                    got.append(int(m[1:]))

            with SteadyPublisher(redis_server, "feed", "m") as backend:
                await receive_until(lambda: len(got) >= 50)
                seen_before_kill = got[-1]
                redis_server.kill()
                s = await asyncio.to_thread(h.wait_stats, lambda s: not s["redis"]["connected"])
                assert s["redis"]["state"] in ("connecting", "disconnected"), s["redis"]
                # Clients are still served while Redis is away.
                await echo.send("still here")
                assert await recv(echo) == "still here"
                await asyncio.sleep(1.0)  # the outage: several reconnection attempts fail
                await asyncio.to_thread(redis_server.start)
                s = await asyncio.to_thread(
                    h.wait_stats, lambda s: s["redis"]["reconnects"] == 1 and
                    s["redis"]["subscriptions"] == 2, 10)
                assert s["redis"]["connected"] and s["redis"]["subscriptions"] == 2, s["redis"]
                # From here on every message must arrive.
                mark = await asyncio.to_thread(backend.wait_more, 200)
            published = backend.published
            assert all(n == 1 for _, n in published[mark:]), \
                "published after the reconnect, but Redis had no subscriber for it"
            delivered = [i for i, n in published if n == 1]
            await receive_until(lambda: got and got[-1] == delivered[-1])
            assert got == sorted(set(got)), "out of order or twice"
            assert set(got) <= set(delivered)
            # Everything Redis delivered arrived, except what the kill itself may have caught in
            # Redis's output buffer (answered to the publisher, not yet written to herald).
            lost = sorted(set(delivered) - set(got))
            first_after = published[mark][0]
            assert len(lost) <= 10 and all(seen_before_kill < i < first_after for i in lost), lost
            # The pattern was subscribed again too.
            with redis_server.client() as c:
                assert c.command("PUBLISH", "p.x", "via pattern") == 1

    run(main(), timeout=60)
    log = h.stderr_text()
    assert len(re.findall(r"connection to \S+ lost \(subscriber\)", log)) == 1, log
    assert "cannot connect" not in log, log      # the retries themselves are quiet
    assert log.count("connected to 127.0.0.1:%d (subscriber), again" % redis_server.port) == 1, log
    assert re.search(r"^herald_redis_reconnects_total 1$", h.metrics(), re.M)


def test_starts_without_redis_and_connects_when_it_appears(herald_factory, tmp_path):
    r = RedisServer(tmp_path / "late")
    h = herald_factory(redis=redis_settings(r, channels=["late"]))
    h.wait_log("redis: cannot connect")
    s = h.stats()["redis"]
    assert s["configured"] and not s["connected"] and s["last_error"], s
    assert h.request("GET", "/stats").status == 200
    r.start()
    try:
        wait_ready(h, 1)

        async def main():
            async with ws_connect(h, "/sub/late") as sub:
                with r.client() as c:
                    c.command("PUBLISH", "late", "finally")
                assert await recv(sub) == "finally"

        run(main())
    finally:
        r.stop()
    assert h.stderr_text().count("redis: cannot connect") == 1
    assert h.stats()["redis"]["reconnects"] == 0  # the first connection is not a reconnection


def test_password_database_and_unix_socket(herald_factory, tmp_path):
    with RedisServer(tmp_path / "secure", password="s3cret pass", unix=True) as r:
        h = herald_factory(redis={"socket": r.unix, "password": "s3cret pass", "db": 3,
                                  "channels": ["sock"], "reconnect_min": 0.05,
                                  "reconnect_max": 0.2})
        wait_ready(h, 1)
        assert h.stats()["redis"]["address"] == "unix:" + r.unix
        with r.client() as c:
            clients = c.command("CLIENT", "LIST").decode().splitlines()
        subscriber = [line for line in clients if " sub=1 " in line]
        assert len(subscriber) == 1 and " db=3 " in subscriber[0], clients

        async def main():
            async with ws_connect(h, "/sub/sock") as sub:
                with r.client() as c:
                    c.command("PUBLISH", "sock", "over a unix socket")
                assert await recv(sub) == "over a unix socket"

        run(main())

        bad = herald_factory(redis={"host": "127.0.0.1", "port": r.port, "password": "wrong",
                                    "channels": ["sock"], "reconnect_min": 0.05,
                                    "reconnect_max": 0.1})
        bad.wait_log("AUTH failed")
        with r.client() as c:
            before = int(re.search(rb"total_connections_received:(\d+)",
                                   c.command("INFO", "stats")).group(1))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # wait for a few more attempts
                now = int(re.search(rb"total_connections_received:(\d+)",
                                    c.command("INFO", "stats")).group(1))
                if now >= before + 3:
                    break
                time.sleep(0.05)
            assert now >= before + 3
        s = bad.stats()["redis"]
        assert not s["connected"] and "AUTH failed" in s["last_error"], s
        assert bad.stderr_text().count("redis: cannot connect") == 1  # once, not per retry


def test_reload_changes_channels_without_reconnecting(herald_factory, redis_server):
    h = herald_factory(redis=redis_settings(redis_server, channels=["one"]))
    wait_ready(h, 1)
    h.reload(redis=redis_settings(redis_server, channels=["two", "three"]))
    wait_ready(h, 2)
    assert redis_server.channels() == ["three", "two"]
    assert h.stats()["redis"]["reconnects"] == 0
    assert "redis: connected" in h.stderr_text() and h.stderr_text().count("redis: connected") == 1

    # Removing the source closes the connection; /stats still reports it, as off.
    h.reload(redis=None)
    s = h.stats()["redis"]
    assert s == dict(s, configured=False, connected=False, state="off")
    redis_server.wait_numsub("two", 0)


def test_stats_report_redis_even_when_not_configured(herald):
    s = herald.stats()
    assert s["redis"]["configured"] is False and s["redis"]["connected"] is False
    assert s["tail"] == []
    assert re.search(r"^herald_redis_connected 0$", herald.metrics(), re.M)


def test_mirror_envelopes_are_unwrapped_and_checked(herald_factory, redis_server):
    # What another node would publish, and a forgery: a "JSON" envelope that is not JSON is taken
    # as raw bytes, so /ws subscribers still get valid JSON (and valid UTF-8 in text frames).
    h = herald_factory(redis=redis_settings(redis_server, channels=["env"]))
    wait_ready(h, 1)
    magic = b"\xffherald:1:0123456789abcdef:"

    async def main():
        async with ws_connect(h, "/ws?subscribe=env") as ws, ws_connect(h, "/sub/env") as raw:
            with redis_server.client() as c:
                c.command("PUBLISH", "env", magic + b'j:{"a": [1, 2]}')
                c.command("PUBLISH", "env", magic + b"r:raw bytes")
                c.command("PUBLISH", "env", magic + b'j:{"broken\xff')
                c.command("PUBLISH", "env", b"\xffherald:2:not an envelope we know")
            assert [(await recv_json(ws))["data"] for _ in range(4)] == [
                {"a": [1, 2]}, "raw bytes", '{"broken\ufffd',
                "\ufffdherald:2:not an envelope we know"]
            assert [await recv(raw) for _ in range(4)] == [
                '{"a": [1, 2]}', "raw bytes", b'{"broken\xff',
                b"\xffherald:2:not an envelope we know"]

    run(main())
