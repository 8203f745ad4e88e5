"""Answers that wait for Redis (mirror mode, channels whose history Redis keeps): a WebSocket
handshake's 101, an event stream's head, a POST /pub's seq, herald.publish's done function. What
the client sends meanwhile is served after the answer, in order; the wait is bounded, and a client
that hangs up is let go."""
import signal
import socket
import ssl
import time

from herald_util import HOST, DEFAULT_ROUTES, OP_PING, OP_PONG, RawHTTP, RawWS, encode_frame, \
    free_port, handshake_request, make_cert, parse_server_frame
from redis_util import mirror_node

HISTORY = [{"prefix": "h:", "length": 100, "age": 600}]
ROUTES = DEFAULT_ROUTES + [{"path": "/sse/", "kind": "sse"}]


def node(herald_factory, redis_server, **limits):
    return mirror_node(herald_factory, redis_server, routes=ROUTES, history=HISTORY, limits=limits)


def read_until(sock, buf, done, timeout=10.0):
    """Read from sock into buf (a bytearray) until done(buf) holds; False at EOF."""
    deadline = time.monotonic() + timeout
    while not done(buf):
        left = deadline - time.monotonic()
        assert left > 0, "nothing more from the server in time; have %r" % bytes(buf[:300])
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            return False
        buf += data
    return True


def test_frames_behind_a_waiting_handshake_wait_for_its_101(herald_factory, redis_server):
    # The raw route's 101 waits for Redis to say where h:ping is; a ping sent in the same packet
    # as the handshake is answered after the 101, never before it.
    h = node(herald_factory, redis_server)
    for i in range(5):
        with socket.create_connection((HOST, h.port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ping = encode_frame(OP_PING, b"p%d" % i)
            s.sendall(handshake_request(h.port, "/sub/h:ping%d" % i) + ping)
            buf = bytearray()
            assert read_until(s, buf, lambda b: b"\r\n\r\n" in b)
            assert buf.startswith(b"HTTP/1.1 101 "), bytes(buf[:200])
            head_end = buf.index(b"\r\n\r\n") + 4
            assert b"X-Herald-Seq: 0\r\n" in buf[:head_end]
            del buf[:head_end]
            assert read_until(s, buf, lambda b: parse_server_frame(b) is not None)
            frame, _ = parse_server_frame(buf)
            assert (frame.opcode, frame.payload) == (OP_PONG, b"p%d" % i)


def handshake_response(port, target, timeout=10.0):
    """Send a WebSocket handshake for target; returns (seconds until the response head, the
    head)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        t0 = time.monotonic()
        s.sendall(handshake_request(port, target))
        buf = bytearray()
        read_until(s, buf, lambda b: b"\r\n\r\n" in b, timeout)
        return time.monotonic() - t0, bytes(buf).decode("latin-1")


def test_a_waiting_handshake_or_stream_is_refused_after_http_timeout(herald_factory, redis_server):
    # Redis is gone: a handshake or an event stream on a channel whose history it keeps waits for
    # it, but not for ever: after http_timeout it is refused with 503 and closed.
    h = node(herald_factory, redis_server, http_timeout=1)
    redis_server.kill()
    h.wait_stats(lambda s: not s["redis"]["connected"], 10)
    for target in ("/sub/h:raw", "/ws?subscribe=plain,h:ws"):
        took, head = handshake_response(h.port, target)
        assert head.startswith("HTTP/1.1 503 "), head
        assert "Connection: close\r\n" in head and 0.9 < took < 5, (took, head)
    with RawHTTP(h.port) as c:
        t0 = time.monotonic()
        r = c.request("GET", "/sse/h:sse?channels=plain")
        assert r.status == 503 and b"did not answer in time" in r.body, r
        assert 0.9 < time.monotonic() - t0 < 5
        assert c.at_eof()
    s = h.wait_stats(lambda s: s["connections"] == 1 and s["websockets"] == 0 and
                     s["sse_streams"] == 0 and s["subscriptions"] == 0)
    assert (s["connections"], s["websockets"], s["sse_streams"], s["subscriptions"]) == \
        (1, 0, 0, 0), s
    # Redis back: the same requests are answered at once.
    redis_server.start()
    h.wait_stats(lambda s: s["redis"]["connected"], 10)
    took, head = handshake_response(h.port, "/sub/h:raw")
    assert head.startswith("HTTP/1.1 101 ") and took < 1, (took, head)


def test_a_waiting_publish_is_answered_after_http_timeout(herald_factory, redis_server):
    # Redis takes the publish's script and does not answer (it is stopped): after http_timeout
    # the publish is answered as failed, and the requests pipelined after it are served.
    h = node(herald_factory, redis_server, http_timeout=1)
    with RawHTTP(h.port) as c:
        assert c.request("POST", "/pub/h:p", b"first").json()["seq"] == 1
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            c.send(c.build("POST", "/pub/h:p", b"second") + c.build("GET", "/stats"))
            r = c.read_response()
            assert r.status == 503 and "did not answer in time" in r.json()["error"], r
            assert 0.9 < time.monotonic() - t0 < 5
            assert c.read_response().status == 200
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        # It may have been published after all: Redis ran the script once it could.
        r = c.request("POST", "/pub/h:p", b"third")
        assert r.status == 200 and r.json()["seq"] == 3, r


def test_a_client_that_hangs_up_while_it_waits_is_let_go(herald_factory, redis_server):
    # A client that closes its connection while its answer waits for Redis is noticed at once,
    # not when Redis comes back or http_timeout ends.
    h = node(herald_factory, redis_server)
    redis_server.kill()
    h.wait_stats(lambda s: not s["redis"]["connected"], 10)
    for target in ("/sub/h:gone", "/sse/h:gone?channels=plain"):
        s = socket.create_connection((HOST, h.port), timeout=5)
        if target.startswith("/sub/"):
            s.sendall(handshake_request(h.port, target))
        else:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode())
        st = h.wait_stats(lambda st: st["websockets"] + st["sse_streams"] == 1)
        assert st["connections"] == 2 and st["websockets"] + st["sse_streams"] == 1, st
        s.close()
        t0 = time.monotonic()
        st = h.wait_stats(lambda st: st["connections"] == 1 and st["websockets"] == 0 and
                          st["sse_streams"] == 0 and st["subscriptions"] == 0)
        assert (st["connections"], st["websockets"], st["sse_streams"], st["subscriptions"]) == \
            (1, 0, 0, 0), st
        assert time.monotonic() - t0 < 2
    # A publish Redis does not answer, likewise.
    redis_server.start()
    h.wait_stats(lambda s: s["redis"]["connected"], 10)
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        with RawHTTP(h.port) as c:
            c.send(c.build("POST", "/pub/h:gone", b"x"))
            st = h.wait_stats(lambda st: st["redis"]["mirror"]["history"]["in_flight"] == 1)
            assert st["connections"] == 2 and st["redis"]["mirror"]["history"]["in_flight"] == 1, st
        st = h.wait_stats(lambda st: st["connections"] == 1)
        assert st["connections"] == 1, st
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def test_a_tls_client_that_ends_its_session_while_it_waits_is_let_go(herald_factory, redis_server,
                                                                     tmp_path):
    # Over TLS a hang-up may be a close_notify record, the TCP connection left open: that is
    # noticed at once too, not at http_timeout.
    cert, key = make_cert(tmp_path, "a", "localhost")
    port = free_port()
    h = mirror_node(herald_factory, redis_server, routes=ROUTES, history=HISTORY,
                    limits={"http_timeout": 30}, tls={"port": port, "cert": cert, "key": key})
    redis_server.kill()
    h.wait_stats(lambda s: not s["redis"]["connected"], 10)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((HOST, port), timeout=5)
    try:
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(handshake_request(port, "/sub/h:tls"))
        st = h.wait_stats(lambda st: st["websockets"] == 1)
        assert st["connections"] == 2 and st["websockets"] == 1, st
        t0 = time.monotonic()
        s.settimeout(3)
        try:
            s.unwrap()  # close_notify, then wait for the server's (it closes instead)
        except (ssl.SSLError, OSError):
            pass
        st = h.wait_stats(lambda st: st["connections"] == 1 and st["websockets"] == 0)
        assert (st["connections"], st["websockets"], st["subscriptions"]) == (1, 0, 0), st
        assert time.monotonic() - t0 < 3
    finally:
        raw.close()
    # A record of data that comes while the 101 waits is taken into the session to be looked at:
    # it is served once the 101 is out, though the socket has nothing more to say.
    redis_server.start()
    h.wait_stats(lambda s: s["redis"]["connected"], 10)
    redis_server.proc.send_signal(signal.SIGSTOP)
    raw = socket.create_connection((HOST, port), timeout=10)
    try:
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(handshake_request(port, "/sub/h:tls2"))
        st = h.wait_stats(lambda st: st["websockets"] == 1)
        assert st["websockets"] == 1, st
        s.sendall(encode_frame(OP_PING, b"after"))
        redis_server.proc.send_signal(signal.SIGCONT)
        buf = bytearray()
        assert read_until(s, buf, lambda b: b"\r\n\r\n" in b)
        assert buf.startswith(b"HTTP/1.1 101 "), bytes(buf[:200])
        del buf[:buf.index(b"\r\n\r\n") + 4]
        assert read_until(s, buf, lambda b: parse_server_frame(b) is not None)
        frame, _ = parse_server_frame(buf)
        assert (frame.opcode, frame.payload) == (OP_PONG, b"after")
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        raw.close()


def test_clients_giving_up_all_through_an_outage_leave_a_bounded_list(herald_factory, redis_server):
    # Handshakes that wait for Redis and are given up leave their joins waiting for Redis; those
    # are dropped as more come, so a long outage with clients retrying holds a bounded list.
    h = node(herald_factory, redis_server)
    redis_server.kill()
    h.wait_stats(lambda s: not s["redis"]["connected"], 10)
    for _ in range(10):
        socks = []
        for i in range(20):
            s = socket.create_connection((HOST, h.port), timeout=5)
            s.sendall(handshake_request(h.port, "/sub/h:retry%d" % (i % 3)))
            socks.append(s)
        st = h.wait_stats(lambda st: st["websockets"] == 20)
        assert st["websockets"] == 20, st
        for s in socks:
            s.close()
        st = h.wait_stats(lambda st: st["connections"] == 1 and st["subscriptions"] == 0)
        assert st["connections"] == 1 and st["subscriptions"] == 0, st
    waiting = st["redis"]["mirror"]["history"]["joins_waiting"]
    assert waiting <= 64 + 20, "200 joins given up, %d still kept" % waiting
    redis_server.start()
    h.wait_stats(lambda s: s["redis"]["connected"], 10)
    took, head = handshake_response(h.port, "/sub/h:retry0")
    assert head.startswith("HTTP/1.1 101 "), head
    st = h.wait_stats(lambda st: st["redis"]["mirror"]["history"]["joins_waiting"] == 0)
    assert st["redis"]["mirror"]["history"]["joins_waiting"] == 0, st


def test_a_done_function_that_fails_is_counted_as_such(herald_factory, redis_server, tmp_path):
    # herald.publish's done function runs once Redis has numbered the message: its calls and
    # errors are its own, not a timer's.
    script = tmp_path / "done.lua"
    script.write_text("""
return {
  message = function(client, data)
    client:send(tostring(select(2, herald.publish("h:done", data, function(seq)
      error("done got " .. seq)
    end))))
  end,
}
""")
    h = mirror_node(herald_factory, redis_server, history=HISTORY,
                    routes=ROUTES + [{"path": "/lua", "script": str(script)}])
    with RawWS(h.port, "/lua") as ws:
        ws.send_text("x")
        assert ws.recv_message()[1] == b"pending"
        h.wait_log("script error on route /lua, in done: ")
        assert "done got 1" in h.stderr_text()
    s = [x for x in h.stats()["scripts"] if x["path"] == "/lua"][0]
    assert s["calls"]["done"] == 1 and s["calls"]["timer"] == 0 and s["errors"] == 1, s
    assert 'herald_script_calls_total{path="/lua",hook="done"} 1' in h.metrics()
