"""Operational limits, each counted in /stats when hit: connections in all, handshake and idle
timeouts (slowloris), oversized heads and messages, running out of file descriptors; and a peer
that resets while the broker writes to it (SIGPIPE). Per-address connections, subscriptions per
connection and the message rate are in test_access.py, the send queue in test_fanout.py."""
import json
import os
import resource
import select
import socket
import struct
import time

import pytest

from herald_util import HOST, OP_BINARY, OP_TEXT, REPO, RawWS, Herald, wait_for


def stats_once_served(h, timeout=10.0):
    """/stats, asked again (bounded) while the broker refuses the connection it comes on (a 503,
    or a reset for the unread request). Returns the stats and how many times it was refused."""
    deadline = time.monotonic() + timeout
    refused = 0
    while True:
        try:
            r = h.request("GET", "/stats")
            if r.status == 200:
                return r.json(), refused
            assert r.status == 503, r
        except (EOFError, ConnectionResetError):
            pass
        refused += 1
        assert time.monotonic() < deadline, "/stats refused for %.0f s" % timeout
        time.sleep(0.02)


def read_all(sock, timeout=5.0):
    """Everything the server sends until it closes (bounded)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except (socket.timeout, ConnectionResetError):
        return data


# --- connections -----------------------------------------------------------------------------------

@pytest.mark.herald(limits={"max_connections": 3})
def test_max_connections_is_counted(herald):
    # The broker takes connections in order: the three held ones first, then the extra.
    held = [socket.create_connection((HOST, herald.port)) for _ in range(3)]
    try:
        with socket.create_connection((HOST, herald.port)) as extra:
            assert read_all(extra).startswith(b"HTTP/1.1 503 ")
    finally:
        for s in held:
            s.close()
    # /stats is one more connection: refused until the server has seen the others go.
    s, refused = stats_once_served(herald)
    assert s["connections_refused"] == 1 + refused and s["accept_errors"] == 0, (s, refused)


NOFILE = 64


@pytest.fixture
def low_fd_herald(tmp_path):
    h = Herald(tmp_path / "srv", {"limits": {"http_timeout": 60}})
    h.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    h.start()
    yield h
    h.check_clean_exit()


def test_out_of_file_descriptors(low_fd_herald):
    """Past its descriptor limit the broker refuses new connections with 503 (the spare descriptor
    makes room to answer them), logs it once, counts it, keeps serving the connections it has, and
    takes new ones again once some close."""
    h = low_fd_herald
    assert "file descriptor limit: %d" % NOFILE in h.stderr_text()
    echo = RawWS(h.port, "/echo")
    held, refused = [], 0
    try:
        # More connections than descriptors: the first ones are taken, the rest refused.
        socks = [socket.create_connection((HOST, h.port)) for _ in range(NOFILE + 16)]
        # The broker takes them in order: once the last has its 503, every one before it has
        # been taken (and is silent) or refused (and has its 503 too).
        r, _, _ = select.select([socks[-1]], [], [], 10)
        assert r, "no answer to the last connection"
        for s in socks:
            r, _, _ = select.select([s], [], [], 0)
            if r and read_all(s, 2).startswith(b"HTTP/1.1 503 "):
                refused += 1
                s.close()
            else:
                held.append(s)
        assert refused >= 16 and len(held) > NOFILE // 2, (refused, len(held))
        # At the limit, a connection it has is still served.
        assert echo.echo(OP_TEXT, b"still here") == (OP_TEXT, b"still here")
        # Twenty more are refused, and the refusals do not spin: accept_errors grows by about one
        # or two per refusal (asked for below, once a descriptor is free; the tries of /stats
        # refused meanwhile are refusals too).
        for _ in range(20):
            with socket.create_connection((HOST, h.port)) as s:
                assert read_all(s).startswith(b"HTTP/1.1 503 ")
        refused += 20
        for s in held[:4]:
            s.close()
        del held[:4]
        stats, stats_refused = stats_once_served(h)
        refused += stats_refused
        assert refused <= stats["accept_errors"] <= 2 * refused + 4, (refused, stats["accept_errors"])
        assert stats["connections_refused"] == 0  # not mistaken for max_connections
        time.sleep(0.5)
        assert h.stats()["accept_errors"] == stats["accept_errors"]
        assert h.stderr_text().count("out of file descriptors") == 1, h.stderr_text()
    finally:
        for s in held:
            s.close()
    # Recovered: new connections are served again.
    assert wait_for(lambda: h.request("GET", "/notes.txt").status == 200)
    assert echo.echo(OP_BINARY, b"\x00after") == (OP_BINARY, b"\x00after")
    echo.send_close(1000)
    echo.expect_close(1000)
    echo.close()


# --- timeouts ---------------------------------------------------------------------------------------

@pytest.mark.herald(limits={"http_timeout": 0.5})
def test_slow_and_silent_clients_are_cut_off_and_counted(herald):
    """Slowloris: a head trickled a byte at a time never completes a request, so it is closed
    after http_timeout like a client that sends nothing at all."""
    silent = socket.create_connection((HOST, herald.port))
    slow = socket.create_connection((HOST, herald.port))
    head = b"GET /notes.txt HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    t0 = time.monotonic()
    closed_after = None
    try:
        for i in range(len(head)):
            try:
                slow.sendall(head[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - t0
                break
            r, _, _ = select.select([slow], [], [], 0.05)
            if r and slow.recv(4096) == b"":
                closed_after = time.monotonic() - t0
                break
        assert closed_after is not None and closed_after < 3, closed_after
        assert read_all(silent, 3) == b""
    finally:
        silent.close()
        slow.close()
    s = herald.wait_stats(lambda s: s["http_timeouts"] >= 2)
    assert s["http_timeouts"] == 2, s


@pytest.mark.herald(limits={"ping_interval": 0.3, "close_timeout": 0.3})
def test_unanswered_pings_are_counted(herald):
    with RawWS(herald.port, "/echo", timeout=5) as a, RawWS(herald.port, "/ws", timeout=5) as b:
        for w in (a, b):
            w.expect_close(1001, timeout=5, then_eof=False)
    s = herald.wait_stats(lambda s: s["ping_timeouts"] >= 2 and s["websockets"] == 0)
    assert s["ping_timeouts"] == 2, s


# --- sizes ------------------------------------------------------------------------------------------

def test_oversized_heads_are_counted(herald):
    requests = [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(100)) + b"\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for data in requests:
        with socket.create_connection((HOST, herald.port)) as s:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = read_all(s)
            assert reply.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 414 ")), reply[:100]
    assert herald.stats()["heads_too_big"] == 3


@pytest.mark.herald(limits={"max_message": 1024})
def test_oversized_messages_are_counted(herald):
    with RawWS(herald.port, "/echo") as ws:
        ws.send_frame(OP_BINARY, b"x" * 1025)
        ws.expect_close(1009)
    r = herald.publish("big", b"y" * 1025)
    assert r.status == 413
    assert herald.stats()["messages_too_big"] == 2


# --- a peer that resets while being written to ---------------------------------------------------

@pytest.mark.herald(limits={"max_message": 1048576, "send_queue": 8388608})
def test_reset_while_writing_does_not_stop_the_broker(herald):
    """Writing to a connection the peer reset raises SIGPIPE unless it is ignored: it is, and
    peers that reset with megabytes queued for them cost nothing but their connection."""
    with open("/proc/%d/status" % herald.pid) as f:
        ignored = int([l for l in f if l.startswith("SigIgn:")][0].split()[1], 16)
    assert ignored & (1 << (13 - 1)), "SIGPIPE is not ignored"
    for _ in range(3):
        ws = RawWS(herald.port, "/sub/pipe")
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(4):
            assert herald.publish("pipe", os.urandom(1000000)).status == 200
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.sock.close()  # RST, with megabytes still to send
        for _ in range(2):
            herald.publish("pipe", os.urandom(1000000))
    assert herald.proc.poll() is None
    assert herald.wait_stats(lambda s: s["connections"] == 1)["websockets"] == 0


# --- subscriptions on a script route -----------------------------------------------------------------

@pytest.mark.herald(limits={"max_subscriptions": 2},
                    routes=[{"path": "/lua", "script": str(REPO / "tests" / "scripts" / "authz_route.lua")}])
def test_subscription_limit_on_a_script_route(herald):
    """client:subscribe past max_subscriptions returns nil and the reason (authz_route.lua sends
    back what each subscribe returned)."""
    with RawWS(herald.port, "/lua") as ws:
        assert json.loads(ws.recv_message()[1]) == {"hook": "open", "results": {}}
        for name, expect in (("public:1", {"ok": True}), ("public:2", {"ok": True}),
                             ("public:3", {"err": "subscription limit reached for this connection"}),
                             ("public:1", {"ok": False})):
            ws.send_text(name)
            reply = json.loads(ws.recv_message()[1])
            assert reply == dict(expect, hook="message", channel=name), reply
    assert herald.stats()["subscription_limit_hits"] == 1
