"""Server-Sent Events: /sse/<channel>, several channels, ids, keepalive, resume by Last-Event-ID."""
import json

import pytest

from herald_util import EventStream as Stream

ROUTES = [{"path": "/ws", "kind": "pubsub"}, {"path": "/sse/", "kind": "sse"}]
HISTORY = [{"prefix": "h:", "length": 100, "age": 600}]


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
    # h:a keeps a history, which counts in an epoch of its own, made from the process's.
    h_epoch = events[0]["id"].split(":")[0]
    assert h_epoch.startswith(epoch) and h_epoch != epoch
    assert [e["id"] for e in events] == ["%s:h:a:1" % h_epoch, "%s:b:1" % epoch, "%s:c:1" % epoch]
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
