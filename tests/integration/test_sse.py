"""Server-Sent Events: /sse/<channel>, several channels, ids, keepalive, resume by Last-Event-ID."""
import json
import socket
import time

import pytest

from herald_util import HOST

ROUTES = [{"path": "/ws", "kind": "pubsub"}, {"path": "/sse/", "kind": "sse"}]
HISTORY = [{"prefix": "h:", "length": 100, "age": 600}]


class Stream:
    """A raw event-stream reader: the response head, then events as dicts."""

    def __init__(self, port, target, headers=None):
        self.sock = socket.create_connection((HOST, port), timeout=5)
        extra = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items())
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (target, extra)).encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "closed before the head: %r" % self.buf
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.head = head.decode()
        self.status = int(self.head.split()[1])

    def next_block(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while b"\n\n" not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            assert chunk, "stream closed"
            self.buf += chunk
        block, self.buf = self.buf.split(b"\n\n", 1)
        return block.decode()

    def next_event(self, timeout=5.0):
        """The next block with data (comments and retry skipped): {"id": ..., "data": ...}."""
        while True:
            fields = {}
            for line in self.next_block(timeout).split("\n"):
                if line.startswith(":"):
                    continue
                k, _, v = line.partition(": ")
                fields[k] = fields[k] + "\n" + v if k in fields else v
            if "data" in fields:
                return fields

    def close(self):
        self.sock.close()


@pytest.mark.herald(routes=ROUTES, history=HISTORY)
def test_events_from_several_channels(herald):
    s = Stream(herald.port, "/sse/h:a?channels=b,c")
    assert s.status == 200 and "text/event-stream" in s.head
    herald.publish("h:a", b"one")
    herald.publish("b", b'{"x":\n1}')
    herald.publish("zzz", b"not subscribed")
    herald.publish("c", b"three")
    events = [s.next_event() for _ in range(3)]
    epoch = herald.stats()["epoch"]
    assert [e["id"] for e in events] == ["%s:h:a:1" % epoch, "%s:b:1" % epoch, "%s:c:1" % epoch]
    assert events[0]["data"] == '{"channel":"h:a","seq":1,"data":"one"}'
    assert events[1]["data"] == '{"channel":"b","seq":1,"data":{"x":\n1}}'  # split over data lines
    assert herald.stats()["sse_streams"] == 1
    s.close()
    herald.wait_stats(lambda st: st["sse_streams"] == 0)


@pytest.mark.herald(routes=ROUTES, history=HISTORY)
def test_resume_with_last_event_id(herald):
    s = Stream(herald.port, "/sse/h:r")
    for i in range(3):
        herald.publish("h:r", b"m%d" % i)
    last = [s.next_event() for _ in range(3)][0]["id"]  # saw only the first, say
    s.close()
    herald.publish("h:r", b"m3")
    r = Stream(herald.port, "/sse/h:r", {"Last-Event-ID": last})
    assert [r.next_event()["data"] for _ in range(3)] == [
        '{"channel":"h:r","seq":%d,"data":"m%d"}' % (i + 1, i) for i in (1, 2, 3)]
    herald.publish("h:r", b"live")
    assert r.next_event()["id"].endswith(":h:r:5")
    r.close()
    # A first connection can resume too, and another epoch replays nothing.
    q = Stream(herald.port, "/sse/h:r?last_event_id=" + last.replace(":", "%3A"))
    assert q.next_event()["id"].endswith(":h:r:2")
    q.close()
    stale = Stream(herald.port, "/sse/h:r", {"Last-Event-ID": "otherepoch:h:r:1"})
    herald.publish("h:r", b"after")
    assert stale.next_event()["id"].endswith(":h:r:6")
    stale.close()


@pytest.mark.herald(routes=ROUTES, history=HISTORY)
def test_resume_several_channels(herald):
    """?last_event_id= may list one id per channel: each is resumed, not only the last one's."""
    s = Stream(herald.port, "/sse/?channels=h:x,h:y,live")
    herald.publish("h:x", b"x1")
    herald.publish("h:y", b"y1")
    herald.publish("live", b"l1")
    ids = [s.next_event()["id"] for _ in range(3)]
    s.close()
    herald.wait_stats(lambda st: st["sse_streams"] == 0)
    herald.publish("h:x", b"x2")
    herald.publish("h:y", b"y2")
    herald.publish("h:y", b"y3")
    herald.publish("live", b"l2")
    herald.publish("h:other", b"o1")
    epoch = ids[0].split(":")[0]
    listed = ",".join(ids + ["%s:h:other:0" % epoch])  # not a channel of this stream: ignored
    r = Stream(herald.port, "/sse/?channels=live,h:y,h:x&last_event_id=" + listed.replace(":", "%3A").replace(",", "%2C"))
    herald.publish("h:x", b"x3")
    got = [r.next_event()["data"] for _ in range(4)]
    # Each channel in its own order (channels are not ordered among themselves), the missed ones
    # before the live one, nothing of "live" (nothing missed) nor of h:other (not on the stream).
    per_channel = {}
    for d in got:
        per_channel.setdefault(json.loads(d)["channel"], []).append(d)
    assert per_channel == {
        "h:x": ['{"channel":"h:x","seq":2,"data":"x2"}', '{"channel":"h:x","seq":3,"data":"x3"}'],
        "h:y": ['{"channel":"h:y","seq":2,"data":"y2"}', '{"channel":"h:y","seq":3,"data":"y3"}']}
    r.close()


@pytest.mark.herald(routes=ROUTES, limits={"ping_interval": 0.3})
def test_keepalive_comments(herald):
    s = Stream(herald.port, "/sse/k")
    blocks = [s.next_block(3) for _ in range(4)]
    assert any(b.startswith(": keepalive") for b in blocks)
    s.close()


@pytest.mark.herald(routes=ROUTES)
def test_bad_requests(herald):
    for target, status in (("/sse/", 400), ("/sse/bad%20name", 400), ("/sse/a?channels=ok,b%2Fc,x%20y", 400)):
        s = Stream(herald.port, target)
        assert s.status == status, target
        s.close()
    assert herald.request("POST", "/sse/a", body=b"x").status == 405
    ok = Stream(herald.port, "/sse?channels=a,b")
    assert ok.status == 200
    ok.close()
