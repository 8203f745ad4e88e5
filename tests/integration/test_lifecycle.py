"""Keepalive pings, idle timeouts and shutdown."""
import asyncio
import signal
import time

import pytest
import websockets

from herald_util import (OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawHTTP, RawWS, recv, recv_json,
                         request, run, ws_connect)

INTERVAL = 0.5


class CountingProtocol(websockets.WebSocketClientProtocol):
    """Counts the pings the server sends (the library answers each with a pong)."""
    pings_answered = 0

    async def pong(self, data=b""):
        self.pings_answered += 1
        await super().pong(data)


@pytest.mark.herald(limits={"ping_interval": INTERVAL})
def test_answering_client_is_pinged_and_stays_open(herald):
    async def main():
        async with ws_connect(herald, "/echo", create_protocol=CountingProtocol) as ws:
            await asyncio.sleep(INTERVAL * 4)
            assert ws.open, "closed with %r %r" % (ws.close_code, ws.close_reason)
            assert ws.pings_answered >= 1, "the server sent no ping in %.1f s" % (INTERVAL * 4)
            await ws.send("still there")
            assert await recv(ws) == "still there"
        assert ws.close_code == 1000
    run(main())


@pytest.mark.herald(limits={"ping_interval": INTERVAL})
def test_pubsub_client_is_pinged_and_keeps_subscriptions(herald):
    async def main():
        async with ws_connect(herald, "/ws?subscribe=ka", create_protocol=CountingProtocol) as ws:
            await asyncio.sleep(INTERVAL * 4)
            assert ws.open and ws.pings_answered >= 1
            r = await asyncio.get_running_loop().run_in_executor(
                None, lambda: herald.publish("ka", b"after pings"))
            assert r.status == 200
            assert await recv_json(ws) == {"op": "message", "channel": "ka", "seq": 1,
                                           "data": "after pings"}
            assert await request(ws, {"op": "subscribe", "channel": "ka2"}) == \
                {"op": "subscribed", "channel": "ka2"}
    run(main())


@pytest.mark.herald(limits={"ping_interval": INTERVAL, "close_timeout": 0.5})
@pytest.mark.parametrize("path", ["/echo", "/sub/ka", "/ws"])
def test_silent_clients_are_closed(herald, path):
    """Two clients that never answer pings (two, so that this does not depend on how a lone
    connection is swept: see test_answering_client_is_pinged_and_stays_open)."""
    with RawWS(herald.port, path, timeout=10) as ws, RawWS(herald.port, "/echo", timeout=10) as ws2:
        t0 = time.monotonic()
        for w in (ws, ws2):
            f = w.recv_frame(timeout=INTERVAL * 3 + 1)
            assert f is not None and f.opcode == OP_PING, f
        t_ping = time.monotonic()
        # never answer: a close frame 1001 (then TCP close once close_timeout has passed without
        # the client's close frame), or just TCP close
        got_close = []
        for w in (ws, ws2):
            f = w.recv_frame(timeout=INTERVAL * 3 + 1)
            t_close = time.monotonic()
            if f is not None:
                assert f.opcode == OP_CLOSE, f
                assert f.close_code == 1001, (f.close_code, f.close_reason)
                got_close.append(w)
            assert t_close - t_ping <= INTERVAL * 3 + 0.5, \
                "closed %.2f s after the ping (interval %.1f)" % (t_close - t_ping, INTERVAL)
            assert t_close - t0 <= INTERVAL * 6 + 1
        for w in got_close:
            assert w.wait_eof(herald.cfg["limits"]["close_timeout"] + 2), \
                "no TCP close after the 1001 close frame"


@pytest.mark.herald(limits={"ping_interval": INTERVAL})
def test_pongs_keep_raw_clients_open(herald):
    """Two raw clients that answer every ping stay open (two: see the lone-client tests above)."""
    with RawWS(herald.port, "/echo", timeout=10) as a, RawWS(herald.port, "/sub/kr", timeout=10) as b:
        pings = {id(a): 0, id(b): 0}
        end = time.monotonic() + INTERVAL * 8
        while time.monotonic() < end:
            for w in (a, b):
                try:
                    f = w.recv_frame(timeout=0.05)
                except TimeoutError:
                    continue
                assert f is not None and f.opcode == OP_PING, f
                pings[id(w)] += 1
                w.send_frame(OP_PONG, f.payload)
        assert min(pings.values()) >= 2, pings
        assert a.echo(OP_TEXT, b"alive") == (OP_TEXT, b"alive")
        assert herald.publish("kr", b"alive too").status == 200
        assert b.recv_message()[:2] == (OP_TEXT, b"alive too")


@pytest.mark.herald(limits={"http_timeout": 0.5})
def test_idle_http_connection_closed(herald):
    with RawHTTP(herald.port) as h:
        r = h.request("GET", "/notes.txt")
        assert r.status == 200
        assert h.at_eof(timeout=4), "idle keep-alive connection was not closed"


def test_shutdown_closes_websockets_with_1001(herald):
    async def main():
        async with ws_connect(herald, "/echo") as a, ws_connect(herald, "/ws?subscribe=sd") as b:
            raw = RawWS(herald.port, "/sub/sd")
            try:
                await a.send("hi")
                assert await recv(a) == "hi"
                herald.terminate(signal.SIGTERM)
                await asyncio.wait_for(a.wait_closed(), 10)
                await asyncio.wait_for(b.wait_closed(), 10)
                assert a.close_code == 1001, (a.close_code, a.close_reason)
                assert b.close_code == 1001, (b.close_code, b.close_reason)
                f = raw.recv_frame(timeout=5)
                assert f is not None and f.opcode == OP_CLOSE and f.close_code == 1001, f
                raw.send_close(1001)
                assert raw.wait_eof(5)
            finally:
                raw.close()
        rc = await asyncio.get_running_loop().run_in_executor(None, herald.wait_exit, 20)
        assert rc == 0, herald.stderr_text()
    run(main())


def test_sigint_exits_zero(herald):
    with RawWS(herald.port, "/echo") as ws:
        herald.terminate(signal.SIGINT)
        ws.expect_close(1001, then_eof=False)
        ws.send_close(1001)
        assert ws.wait_eof(5)
    assert herald.wait_exit(20) == 0


def test_shutdown_with_unresponsive_client_is_bounded(herald):
    """A client that never answers the close does not keep the server from exiting."""
    with RawWS(herald.port, "/echo") as ws:
        t0 = time.monotonic()
        herald.terminate()
        rc = herald.wait_exit(herald.cfg["limits"]["close_timeout"] + 10)
        assert rc == 0
        assert time.monotonic() - t0 < herald.cfg["limits"]["close_timeout"] + 5
        f = ws.recv_frame(timeout=2)
        assert f is not None and f.opcode == OP_CLOSE and f.close_code == 1001, f
