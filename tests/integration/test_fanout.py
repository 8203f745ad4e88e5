"""Fan-out at scale (every subscriber gets every message once, in seq order) and slow consumers."""
import asyncio
import json
import selectors
import socket
import struct
import threading
import time

import pytest

from herald_util import (OP_CLOSE, OP_TEXT, RawHTTP, RawWS, encode_frame, parse_server_frame,
                         recv, recv_json, run, ws_connect)

N_SUBSCRIBERS = 500
N_MESSAGES = 2000  # half through a /ws publisher, half through POST /pub on one keep-alive socket


class FanoutReader(threading.Thread):
    """Reads every subscriber socket with one selector and checks each message as it arrives."""

    def __init__(self, conns, expected_raw, expected_data, channel, deadline):
        super().__init__(daemon=True)
        self.n = len(expected_raw)
        self.conns = conns  # [(RawWS, kind)] kind: "raw" or "ws"
        self.expected_raw = expected_raw
        self.expected_data = expected_data
        self.channel = channel
        self.deadline = deadline
        self.counts = [0] * len(conns)
        self.errors = []
        self.finished = threading.Event()

    def fail(self, i, what):
        if len(self.errors) < 20:
            self.errors.append("subscriber %d (%s): %s" % (i, self.conns[i][1], what))

    def run(self):
        sel = selectors.DefaultSelector()
        bufs = []
        for i, (ws, _) in enumerate(self.conns):
            ws.sock.setblocking(False)
            sel.register(ws.sock, selectors.EVENT_READ, i)
            bufs.append(bytearray(ws.buf))
            ws.buf.clear()
        remaining = len(self.conns)
        for i in range(len(self.conns)):
            remaining -= self._parse(i, bufs[i])
        try:
            while remaining and time.monotonic() < self.deadline and len(self.errors) < 20:
                for key, _ in sel.select(timeout=0.5):
                    i = key.data
                    try:
                        data = key.fileobj.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    if not data:
                        self.fail(i, "connection closed after %d messages" % self.counts[i])
                        sel.unregister(key.fileobj)
                        continue
                    bufs[i] += data
                    remaining -= self._parse(i, bufs[i])
        finally:
            sel.close()
            for ws, _ in self.conns:
                ws.sock.setblocking(True)
            self.leftover = [bytes(b) for b in bufs]
            self.finished.set()

    def _parse(self, i, buf):
        """Consume complete frames of subscriber i; returns 1 when it just got its last message."""
        kind = self.conns[i][1]
        before = self.counts[i]
        pos = 0
        while True:
            try:
                r = parse_server_frame(buf, pos)
            except AssertionError as e:
                self.fail(i, str(e))
                buf.clear()
                return 0
            if r is None:
                break
            frame, pos = r
            k = self.counts[i]
            if frame.opcode != OP_TEXT or not frame.fin:
                self.fail(i, "unexpected frame %r" % frame)
                continue
            if k >= self.n:
                self.fail(i, "extra message %r" % frame.payload[:80])
                continue
            if kind == "raw":
                if frame.payload != self.expected_raw[k]:
                    self.fail(i, "message %d is %r, expected %r" % (k, frame.payload[:80],
                                                                     self.expected_raw[k]))
            else:
                m = json.loads(frame.payload)
                if m != {"op": "message", "channel": self.channel, "seq": k + 1,
                         "data": self.expected_data[k]}:
                    self.fail(i, "message %d is %r" % (k, m))
            self.counts[i] = k + 1
        del buf[:pos]
        return 1 if before < self.n <= self.counts[i] else 0


@pytest.mark.herald(limits={"send_queue": 1 << 20})
def test_fanout_exactly_once_in_order(herald):
    channel = "fan"
    # /ws publishes a JSON string "m<i>"; POST publishes the raw body "p<i>".
    half = N_MESSAGES // 2
    expected_raw = [b"m%d" % i for i in range(half)] + [b"p%d" % i for i in range(half)]
    expected_data = [x.decode() for x in expected_raw]

    subs = []
    try:
        for i in range(N_SUBSCRIBERS):
            if i % 2:
                subs.append((RawWS(herald.port, "/sub/" + channel), "raw"))
            else:
                subs.append((RawWS(herald.port, "/ws?subscribe=" + channel), "ws"))
        s0 = herald.stats()
        assert s0["subscriptions"] == N_SUBSCRIBERS, s0

        reader = FanoutReader(subs, expected_raw, expected_data, channel, time.monotonic() + 90)
        reader.start()

        with RawWS(herald.port, "/ws") as p:
            for start in range(0, half, 100):
                p.send_raw(b"".join(
                    encode_frame(OP_TEXT, json.dumps({"op": "publish", "channel": channel,
                                                      "data": "m%d" % i}).encode())
                    for i in range(start, start + 100)))
                for i in range(start, start + 100):
                    op, data, _ = p.recv_message(timeout=20)
                    reply = json.loads(data)
                    assert reply == {"op": "published", "channel": channel, "seq": i + 1}, reply
        with RawHTTP(herald.port, timeout=20) as h:
            for start in range(0, half, 50):
                h.send(b"".join(h.build("POST", "/pub/" + channel, b"p%d" % i)
                                for i in range(start, start + 50)))
                for i in range(start, start + 50):
                    r = h.read_response()
                    assert r.status == 200, r
                    assert r.json() == {"channel": channel, "seq": half + i + 1,
                                        "subscribers": N_SUBSCRIBERS}, r

        assert reader.finished.wait(100), "the reader did not finish"
        assert not reader.errors, "\n".join(reader.errors)
        short = [(i, c) for i, c in enumerate(reader.counts) if c != N_MESSAGES]
        assert not short, "subscribers missing messages (index, count): %r" % short[:10]
        assert not any(reader.leftover), "partial frames left over"

        # nothing more arrives
        sel = selectors.DefaultSelector()
        for ws, _ in subs:
            ws.sock.setblocking(False)
            sel.register(ws.sock, selectors.EVENT_READ)
        extra = sel.select(timeout=0.2)
        sel.close()
        assert not extra, "extra data after the last message"

        s1 = herald.stats()
        assert s1["messages_in"] - s0["messages_in"] == N_MESSAGES, (s0, s1)
        assert s1["messages_out"] - s0["messages_out"] == N_MESSAGES * N_SUBSCRIBERS, (s0, s1)
        assert s1["slow_consumers_dropped"] == s0["slow_consumers_dropped"]
    finally:
        for ws, _ in subs:
            ws.close()


LARGE = 50000
N_LARGE = 120


@pytest.mark.herald(limits={"max_message": 1 << 20, "send_queue": 16 << 20})
def test_large_messages_whole_to_every_subscriber(herald):
    """Large messages to many subscribers are sent by page reference rather than copied for each
    (src/sendpipe.c): every byte arrives, in order, also through the short sends that small
    receive buffers force and while messages queue behind one another."""
    channel = "big"
    letters = b"abcdefghijklmnopqrstuvwxyz" * (LARGE // 26 + 2)
    expected_raw = [b"%06d" % i + letters[i % 26:i % 26 + LARGE - 6] for i in range(N_LARGE)]
    subs = []
    try:
        for i in range(40):
            subs.append((RawWS(herald.port, "/sub/" + channel, rcvbuf=4096 if i % 4 == 0 else None), "raw"))
        assert herald.stats()["subscriptions"] == 40
        reader = FanoutReader(subs, expected_raw, [], channel, time.monotonic() + 60)
        reader.start()
        with RawHTTP(herald.port, timeout=20) as h:
            for start in range(0, N_LARGE, 8):  # pipelined: several messages to a pass
                h.send(b"".join(h.build("POST", "/pub/" + channel, expected_raw[i])
                                for i in range(start, start + 8)))
                for i in range(start, start + 8):
                    r = h.read_response()
                    assert r.status == 200 and r.json()["seq"] == i + 1, r
        assert reader.finished.wait(70), "the reader did not finish"
        assert not reader.errors, "\n".join(reader.errors)
        assert reader.counts == [N_LARGE] * len(subs)
        assert not any(reader.leftover), "partial frames left over"
        s = herald.stats()
        assert s["slow_consumers_dropped"] == 0 and s["messages_out"] == N_LARGE * len(subs), s
    finally:
        for ws, _ in subs:
            ws.close()


# --- slow consumers -----------------------------------------------------------------------------

PAYLOAD = 60000


def payload(i):
    return "%06d" % i + "x" * (PAYLOAD - 6)


@pytest.mark.herald(limits={"send_queue": 262144, "max_message": 65536, "close_timeout": 5})
def test_slow_consumer_dropped(herald):
    base = herald.stats()["slow_consumers_dropped"]
    slow = RawWS(herald.port, "/sub/slowch", rcvbuf=4096)
    sent = []

    async def stats():
        return await asyncio.get_running_loop().run_in_executor(None, herald.stats)

    async def main():
        # Three good subscribers and the slow one share each message's block: it goes out by page
        # reference (src/sendpipe.c) until the slow one is dropped, and by writev after.
        async with ws_connect(herald, "/sub/slowch") as g1, ws_connect(herald, "/sub/slowch") as g2, \
                ws_connect(herald, "/sub/slowch") as g3, ws_connect(herald, "/ws") as p:
            async def one(i):
                data = payload(i)
                await p.send(json.dumps({"op": "publish", "channel": "slowch", "data": data}))
                reply = await recv_json(p, 10)
                assert reply == {"op": "published", "channel": "slowch", "seq": i + 1}, reply
                for good in (g1, g2, g3):
                    got = await recv(good, 10)
                    assert got == data, "a good subscriber got message %r instead of %d" % (got[:6], i)
                sent.append(data)

            dropped_at = None
            for i in range(500):  # at most 30 MB
                await one(i)
                if i % 8 == 7 and (await stats())["slow_consumers_dropped"] > base:
                    dropped_at = i
                    break
            assert dropped_at is not None, "the slow consumer was never dropped"
            for i in range(dropped_at + 1, dropped_at + 11):  # the good one goes on
                await one(i)
            s = await stats()
            assert s["slow_consumers_dropped"] == base + 1, s
            assert s["subscriptions"] == 3, s  # only the good ones are left

    try:
        run(main(), timeout=90)
        # Now read what the slow one was sent: whole messages in order, then close 1013 (or, if the
        # server gave up waiting, the end of the connection).
        got, close = [], None
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        while True:
            try:
                f = slow.recv_frame(timeout=10)
            except AssertionError as e:  # EOF inside a frame: the server closed without finishing
                assert "EOF inside a frame" in str(e), e
                break
            if f is None:
                break
            if f.opcode == OP_CLOSE:
                close = f
                break
            assert f.opcode == OP_TEXT and f.fin, f
            got.append(f.payload.decode())
        assert got == sent[:len(got)], "the slow consumer's messages are not a prefix of those sent"
        assert len(got) < len(sent)
        if close is not None:
            assert close.close_code == 1013, (close.close_code, close.close_reason)
            slow.send_frame(OP_CLOSE, struct.pack("!H", 1013))
            assert slow.wait_eof(5)
        s = herald.stats()
        assert s["slow_consumers_dropped"] == base + 1, s
    finally:
        slow.close()
