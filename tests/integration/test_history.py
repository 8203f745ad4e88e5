"""History and resume: a client that comes back with its last seq gets exactly what it missed."""
import json

import pytest
import websockets

from herald_util import run, wait_for

HISTORY = [{"prefix": "h:", "length": 1500, "age": 600}, {"prefix": "short:", "length": 10, "age": 600}]


async def subscribe(ws, channel, **extra):
    await ws.send(json.dumps(dict({"op": "subscribe", "channel": channel}, **extra)))
    return json.loads(await ws.recv())


async def publish_many(url, channel, n, start=0):
    async with websockets.connect(url) as pub:
        for i in range(n):
            await pub.send(json.dumps({"op": "publish", "channel": channel, "data": start + i}))
        for _ in range(n):
            assert json.loads(await pub.recv())["op"] == "published"


@pytest.mark.herald(history=HISTORY)
def test_resume_gets_missed_then_live(herald):
    url = herald.ws_url("/ws")

    async def go():
        async with websockets.connect(url) as ws:
            first = await subscribe(ws, "h:x")
            assert first["seq"] == 0 and first["epoch"]
            await publish_many(url, "h:x", 10)
            seen = [json.loads(await ws.recv()) for _ in range(10)]
            assert [m["seq"] for m in seen] == list(range(1, 11))
        last = seen[-1]["seq"]
        await publish_many(url, "h:x", 1000, start=10)  # while the client is away
        async with websockets.connect(url) as ws:
            reply = await subscribe(ws, "h:x", since=last, epoch=first["epoch"])
            assert reply["recovered"] is True and reply["seq"] == 1010
            await publish_many(url, "h:x", 5, start=1010)
            got = [json.loads(await ws.recv()) for _ in range(1005)]
            assert [m["seq"] for m in got] == list(range(11, 1016))  # no gap, no duplicate
            assert [m["data"] for m in got] == list(range(10, 1015))
    run(go())


@pytest.mark.herald(history=HISTORY)
def test_resume_past_the_bound_is_not_recovered(herald):
    url = herald.ws_url("/ws")

    async def go():
        async with websockets.connect(url) as ws:
            epoch = (await subscribe(ws, "short:x"))["epoch"]
        await publish_many(url, "short:x", 25)
        async with websockets.connect(url) as ws:
            reply = await subscribe(ws, "short:x", since=3, epoch=epoch)
            assert reply["recovered"] is False and reply["seq"] == 25
            await publish_many(url, "short:x", 1, start=99)
            live = json.loads(await ws.recv())  # nothing replayed: the next message is live
            assert live["seq"] == 26 and live["data"] == 99
        async with websockets.connect(url) as ws:  # within the bound it works
            reply = await subscribe(ws, "short:x", since=20, epoch=epoch)
            assert reply["recovered"] is True
            assert [json.loads(await ws.recv())["seq"] for _ in range(6)] == [21, 22, 23, 24, 25, 26]
    run(go())


def test_resume_after_restart_is_not_recovered(herald_factory):
    h = herald_factory(history=HISTORY)
    url = h.ws_url("/ws")

    async def before():
        async with websockets.connect(url) as ws:
            epoch = (await subscribe(ws, "h:r"))["epoch"]
        await publish_many(url, "h:r", 3)
        return epoch
    epoch = run(before())
    h.stop()
    h2 = herald_factory(history=HISTORY)

    async def after():
        async with websockets.connect(h2.ws_url("/ws")) as ws:
            reply = await subscribe(ws, "h:r", since=3, epoch=epoch)
            assert reply["recovered"] is False and reply["epoch"] != epoch
    run(after())


@pytest.mark.herald(history=[{"prefix": "gone:", "length": 10, "age": 0}], limits={"channel_ttl": 0})
def test_resume_into_a_channel_forgotten_and_made_again_is_not_recovered(herald):
    """A channel nobody holds is forgotten; made again, it counts from 1 again, so a client coming
    back with a seq from before must be told to reload, not be given the new seqs as a sequel."""
    url = herald.ws_url("/ws")

    async def before():
        await publish_many(url, "gone:x", 3)
        async with websockets.connect(url) as ws:
            return (await subscribe(ws, "gone:x"))["epoch"]
    epoch = run(before())
    assert wait_for(lambda: herald.stats()["channels"] == 0, timeout=10)

    async def after():
        await publish_many(url, "gone:x", 2)
        async with websockets.connect(url) as ws:
            reply = await subscribe(ws, "gone:x", since=2, epoch=epoch)
            assert reply["recovered"] is False and reply["seq"] == 2 and reply["epoch"] != epoch
            again = await subscribe(ws, "gone:y", since=0, epoch=reply["epoch"])
            assert again["recovered"] is False  # another channel's epoch is not this one's
    run(after())


@pytest.mark.herald(history=HISTORY)
def test_raw_route_resume(herald):
    for i in range(5):
        assert herald.publish("h:raw", b"m%d" % i).status == 200

    async def go():
        async with websockets.connect(herald.ws_url("/sub/h:raw")) as s:
            epoch = s.response_headers["X-Herald-Epoch"]
            assert s.response_headers["X-Herald-Seq"] == "5"
            assert "X-Herald-Recovered" not in s.response_headers
        # A history counts in an epoch of its own, made from the process's.
        assert epoch.startswith(herald.stats()["epoch"]) and epoch != herald.stats()["epoch"]
        async with websockets.connect(herald.ws_url("/sub/h:raw?since=2&epoch=" + epoch)) as s:
            assert s.response_headers["X-Herald-Recovered"] == "true"
            assert s.response_headers["X-Herald-Seq"] == "5"
            assert [await s.recv() for _ in range(3)] == ["m2", "m3", "m4"]
        async with websockets.connect(herald.ws_url("/sub/h:raw?since=2&epoch=nope")) as s:
            assert s.response_headers["X-Herald-Recovered"] == "false"
            herald.publish("h:raw", b"live")
            assert await s.recv() == "live"
    run(go())


@pytest.mark.herald(history=HISTORY)
def test_bad_resume_requests(herald):
    async def go():
        async with websockets.connect(herald.ws_url("/ws")) as ws:
            for bad in ({"since": -1}, {"since": "3"}, {"since": 1.5}, {"epoch": 5}):
                r = await subscribe(ws, "h:b", **bad)
                assert r["op"] == "error", r
        with pytest.raises(websockets.exceptions.InvalidStatusCode):
            async with websockets.connect(herald.ws_url("/sub/h:b?since=x")):
                pass
        async with websockets.connect(herald.ws_url("/ws")) as ws:  # channels without history
            r = await subscribe(ws, "plain", since=3, epoch="x")
            assert r["op"] == "subscribed" and "recovered" not in r
    run(go())
