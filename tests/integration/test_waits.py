"""Requests whose answer waits for Redis (mirror mode, channels whose history Redis keeps): a
WebSocket handshake's 101, an event stream's head, a POST /pub's seq. What the client sends
meanwhile is served after the answer, in order."""
import socket
import time

import pytest

from herald_util import HOST, DEFAULT_ROUTES, OP_PING, OP_PONG, encode_frame, handshake_request, \
    parse_server_frame
from redis_util import RedisServer, redis_settings

HISTORY = [{"prefix": "h:", "length": 100, "age": 600}]
ROUTES = DEFAULT_ROUTES + [{"path": "/sse/", "kind": "sse"}]


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path / "redis")
    r.start()
    yield r
    r.stop()


def node(herald_factory, redis_server, **limits):
    h = herald_factory(routes=ROUTES, history=HISTORY, limits=limits,
                       redis=redis_settings(redis_server, mirror=True))
    h.wait_stats(lambda s: s["redis"]["connected"], 10)
    return h


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
            s.sendall(handshake_request(h.port, "/sub/h:ping%d" % i) + encode_frame(OP_PING, b"p%d" % i))
            buf = bytearray()
            assert read_until(s, buf, lambda b: b"\r\n\r\n" in b)
            assert buf.startswith(b"HTTP/1.1 101 "), bytes(buf[:200])
            head_end = buf.index(b"\r\n\r\n") + 4
            assert b"X-Herald-Seq: 0\r\n" in buf[:head_end]
            del buf[:head_end]
            assert read_until(s, buf, lambda b: parse_server_frame(b) is not None)
            frame, _ = parse_server_frame(buf)
            assert (frame.opcode, frame.payload) == (OP_PONG, b"p%d" % i)
