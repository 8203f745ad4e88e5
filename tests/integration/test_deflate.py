"""permessage-deflate (RFC 7692): negotiation, compressed echo, shared compression in fan-out,
bounded inflating (zip bombs), invalid data and RSV1 misuse.

Raw clients here compress and inflate with Python's zlib themselves, and inflate every server
message with a fresh decompressor: the server promises server_no_context_takeover, so a message
that needed an earlier one's context would fail to inflate.
"""
import asyncio
import json
import os
import socket
import subprocess
import time
import zlib

import pytest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from herald_util import (HOST, OP_BINARY, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWS, config_text,
                         herald_bin, make_config, new_key, parse_server_frame, populate,
                         recv, run, ws_connect)

MAX = 65536
MIN_SIZE = 256  # the default min_size
TAIL = b"\x00\x00\xff\xff"
RSV1 = 4  # the rsv argument of encode_frame, and Frame.rsv, count RSV1 as 4

HERALD_CONFIG = {
    "limits": {"max_message": MAX, "send_queue": 8 * MAX},
    "routes": [
        {"path": "/echo", "kind": "echo", "deflate": True},
        {"path": "/echo0", "kind": "echo", "deflate": {"min_size": 0, "level": 1}},
        {"path": "/plain", "kind": "echo"},
        {"path": "/ws", "kind": "pubsub", "deflate": True},
        {"path": "/sub/", "kind": "raw", "publish": True, "deflate": True},
        {"path": "/nodeflate/", "kind": "raw"},
    ],
}

PLAIN = "permessage-deflate; server_no_context_takeover"
CHROMIUM_OFFER = "permessage-deflate; client_max_window_bits"


def compress(data, wbits=15, level=6):
    c = zlib.compressobj(level, zlib.DEFLATED, -wbits)
    z = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert z.endswith(TAIL)
    return z[:-4]


def inflate(payload, wbits=15):
    """Inflate a message with a fresh decompressor, 64 bytes of output at a time: zlib then holds
    only wbits of window between steps, so a distance further back than the window fails."""
    d = zlib.decompressobj(-wbits)
    data, out = payload + TAIL, []
    while True:
        chunk = d.decompress(data, 64)
        out.append(chunk)
        data = d.unconsumed_tail
        if not data and not chunk:
            return b"".join(out)


def text_of(n):
    base = b"herald says hello to every subscriber on channel news, seq 12345; "
    return (base * (n // len(base) + 1))[:n]


def ext_header(head):
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-extensions":
            return value.strip()
    return None


class PmdWS(RawWS):
    """A raw client that offers permessage-deflate itself and reads compressed frames."""

    def __init__(self, port, path="/echo", offer=CHROMIUM_OFFER, wbits=15, **kw):
        extra = {"Sec-WebSocket-Extensions": offer} if offer else None
        super().__init__(port, path, extra=extra, **kw)
        self.extension = ext_header(self.response_head)
        self.wbits = wbits
        self.wire_bytes = 0

    def frame(self, timeout=None):
        """The next frame, RSV bits allowed (recv_frame refuses them); None at EOF."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            r = parse_server_frame(self.buf)
            if r:
                f, n = r
                del self.buf[:n]
                self.wire_bytes += n
                return f
            if not self._fill(deadline):
                return None

    def message(self, timeout=None):
        """The next data message: (opcode, inflated payload, compressed?)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        parts, op, compressed = [], None, False
        while True:
            f = self.frame(max(0.001, deadline - time.monotonic()))
            assert f is not None, "EOF while waiting for a message"
            if f.opcode == OP_PING:
                self.send_frame(OP_PONG, f.payload)
                continue
            if f.opcode >= 8:
                assert f.opcode != 8, "close %r while waiting for a message" % (f.payload,)
                continue
            if op is None:
                assert f.opcode in (OP_TEXT, OP_BINARY), f
                assert f.rsv in (0, RSV1), "RSV bits %d" % f.rsv
                op, compressed = f.opcode, f.rsv == RSV1
                if compressed:
                    assert self.extension, "RSV1 on a connection that did not negotiate deflate"
            else:
                assert f.opcode == OP_CONT and f.rsv == 0, f
            parts.append(f.payload)
            if f.fin:
                data = b"".join(parts)
                return op, (inflate(data, self.wbits) if compressed else data), compressed

    def send_compressed(self, opcode, data, pieces=1, wbits=15):
        z = compress(data, wbits)
        cuts = [len(z) * i // pieces for i in range(pieces + 1)]
        for i in range(pieces):
            self.send_frame(opcode if i == 0 else OP_CONT, z[cuts[i]:cuts[i + 1]],
                            fin=i == pieces - 1, rsv=RSV1 if i == 0 else 0)


@pytest.fixture
def srv(herald_module):
    return herald_module


# --- negotiation ----------------------------------------------------------------------------------

OFFERS = [
    ("permessage-deflate", PLAIN),
    (CHROMIUM_OFFER, PLAIN),
    ("permessage-deflate; client_max_window_bits=10; server_max_window_bits=12",
     PLAIN + "; server_max_window_bits=12"),
    ("permessage-deflate; client_no_context_takeover", PLAIN + "; client_no_context_takeover"),
    ("permessage-deflate; server_no_context_takeover; client_no_context_takeover",
     PLAIN + "; client_no_context_takeover"),
    ('permessage-deflate; server_max_window_bits="10"', PLAIN + "; server_max_window_bits=10"),
    ("permessage-deflate; server_max_window_bits=8", None),
    ("permessage-deflate; server_max_window_bits=8, permessage-deflate", PLAIN),
    ("permessage-deflate; server_max_window_bits=16", None),
    ("permessage-deflate; server_max_window_bits", None),
    ("permessage-deflate; client_max_window_bits=7", None),
    ("permessage-deflate; client_max_window_bits; client_max_window_bits", None),
    ("permessage-deflate; foo", None),
    ("permessage-deflate; foo, permessage-deflate; server_max_window_bits=11",
     PLAIN + "; server_max_window_bits=11"),
    ("permessage-deflate; server_no_context_takeover=yes", None),
    ("x-webkit-deflate-frame", None),
    ("x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover", PLAIN),
    ('foo; a="x, y", permessage-deflate', PLAIN),
    ('permessage-deflate; server_max_window_bits="10', None),
    (";;;,,,", None),
]


@pytest.mark.parametrize("offer,answer", OFFERS, ids=[o for o, _ in OFFERS])
def test_negotiation(srv, offer, answer):
    """A malformed or unsupported offer is declined, never the handshake: always 101."""
    with PmdWS(srv.port, "/echo", offer=offer) as w:
        assert w.extension == answer
        if answer is None:
            # Not negotiated: a compressed frame is a protocol error.
            w.send_compressed(OP_TEXT, text_of(300))
            w.expect_close(1002)
        else:
            w.send_compressed(OP_TEXT, text_of(300))
            op, data, compressed = w.message()
            assert (op, data, compressed) == (OP_TEXT, text_of(300), True)


def test_offers_across_header_lines(srv):
    """Several Sec-WebSocket-Extensions headers are one list: the first acceptable offer wins."""
    key = new_key()
    req = ("GET /echo HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8\r\n"
           "Sec-WebSocket-Extensions: foo, permessage-deflate; server_max_window_bits=9\r\n"
           "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n" % (HOST, srv.port, key))
    with socket.create_connection((HOST, srv.port), timeout=5) as s:
        s.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, head
            head += chunk
    text = head.decode("latin-1")
    assert text.startswith("HTTP/1.1 101 "), text
    assert text.count("Sec-WebSocket-Extensions") == 1, text
    assert ext_header(text) == PLAIN + "; server_max_window_bits=9"


@pytest.mark.parametrize("path", ["/plain", "/nodeflate/x"])
def test_deflate_off_by_default(srv, path):
    with PmdWS(srv.port, path, offer=CHROMIUM_OFFER) as w:
        assert w.extension is None
        w.send_frame(OP_TEXT, b"x" * 10, rsv=RSV1)
        w.expect_close(1002)


def test_websockets_library_negotiates(srv):
    async def go():
        async with ws_connect(srv, "/echo") as ws:  # compression="deflate" by default
            assert ws.response_headers.get("Sec-WebSocket-Extensions") == PLAIN
        async with ws_connect(srv, "/plain") as ws:
            assert ws.response_headers.get("Sec-WebSocket-Extensions") is None
            await ws.send("x" * 1000)
            assert await recv(ws) == "x" * 1000
    run(go())


# --- echo -----------------------------------------------------------------------------------------

SIZES = [0, 1, 100, MIN_SIZE - 1, MIN_SIZE, MIN_SIZE + 1, 1000, 65535, MAX]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
def test_compressed_echo_raw(srv, opcode, size):
    payload = text_of(size)
    with PmdWS(srv.port, "/echo") as w:
        w.send_compressed(opcode, payload)
        op, data, compressed = w.message()
        assert op == opcode and data == payload
        # The reply is compressed once it reaches min_size (and shrinks, which this text does).
        assert compressed == (size >= MIN_SIZE)
        # Uncompressed messages are taken too, on the same connection.
        w.send_frame(opcode, payload)
        assert w.message()[:2] == (opcode, payload)


def test_echo_min_size_zero_and_incompressible(srv):
    with PmdWS(srv.port, "/echo0") as w:
        w.send_compressed(OP_TEXT, b"abcabcabcabcabcabcabcabcabcabc")
        assert w.message() == (OP_TEXT, b"abcabcabcabcabcabcabcabcabcabc", True)
        # One byte does not shrink: it goes as it is.
        w.send_compressed(OP_TEXT, b"a")
        assert w.message() == (OP_TEXT, b"a", False)
        noise = os.urandom(5000)
        w.send_compressed(OP_BINARY, noise)
        assert w.message() == (OP_BINARY, noise, False)


@pytest.mark.parametrize("pieces", [2, 3, 50])
def test_fragmented_compressed_message(srv, pieces):
    payload = text_of(20000)
    with PmdWS(srv.port, "/echo") as w:
        z = compress(payload)
        cuts = [len(z) * i // pieces for i in range(pieces + 1)]
        for i in range(pieces):
            w.send_frame(OP_TEXT if i == 0 else OP_CONT, z[cuts[i]:cuts[i + 1]],
                         fin=i == pieces - 1, rsv=RSV1 if i == 0 else 0)
            if i == 0:
                w.send_frame(OP_PING, b"between fragments")
        f = w.frame()
        assert (f.opcode, f.payload) == (OP_PONG, b"between fragments")
        assert w.message() == (OP_TEXT, payload, True)
        # An empty first fragment, and an empty last one.
        w.send_frame(OP_BINARY, b"", fin=False, rsv=RSV1)
        w.send_frame(OP_CONT, z, fin=False)
        w.send_frame(OP_CONT, b"", fin=True)
        assert w.message() == (OP_BINARY, payload, True)


def test_client_context_takeover(srv):
    """A client keeping its context: later messages refer back to earlier ones."""
    with PmdWS(srv.port, "/echo") as w:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        for i in range(5):
            msg = text_of(3000) + b" #%d" % i
            z = c.compress(msg) + c.flush(zlib.Z_SYNC_FLUSH)
            w.send_frame(OP_TEXT, z[:-4], rsv=RSV1)
            assert w.message()[:2] == (OP_TEXT, msg)
        # A final block (BFINAL) ends a message too, and the context goes on after it.
        d = zlib.compressobj(6, zlib.DEFLATED, -15)
        w.send_frame(OP_TEXT, d.compress(b"final " * 100) + d.flush(zlib.Z_FINISH), rsv=RSV1)
        assert w.message()[:2] == (OP_TEXT, b"final " * 100)


@pytest.mark.parametrize("offer,wbits", [
    ("permessage-deflate; server_max_window_bits=9", 9),
    ("permessage-deflate; server_max_window_bits=12; client_max_window_bits=9; "
     "client_no_context_takeover", 12),
])
def test_small_windows(srv, offer, wbits):
    """What we send must inflate with exactly the window the client asked us to keep to."""
    payload = os.urandom(2000).hex().encode() * 3  # repeats far apart: a large window would use them
    with PmdWS(srv.port, "/echo", offer=offer, wbits=wbits) as w:
        assert "server_max_window_bits=%d" % wbits in w.extension
        for _ in range(3):
            w.send_compressed(OP_TEXT, payload, wbits=9)
            assert w.message()[:2] == (OP_TEXT, payload)


def test_websockets_library_echo(srv):
    factories = [
        None,  # the library's default offer
        [ClientPerMessageDeflateFactory(client_no_context_takeover=True)],
        [ClientPerMessageDeflateFactory(server_max_window_bits=10, client_max_window_bits=10)],
    ]

    async def go():
        for ext in factories:
            kw = {"extensions": ext, "compression": None} if ext else {}
            async with ws_connect(srv, "/echo", **kw) as ws:
                assert ws.response_headers.get("Sec-WebSocket-Extensions", "").startswith(PLAIN)
                for n in (0, 10, MIN_SIZE - 1, MIN_SIZE, 5000, MAX):
                    text = text_of(n - 5).decode() + "é✓" if n >= 5 else "x" * n  # n bytes
                    await ws.send(text)
                    assert await recv(ws) == text
                    data = os.urandom(n)
                    await ws.send(data)
                    assert await recv(ws) == data
    run(go())


# --- fan-out --------------------------------------------------------------------------------------

def test_fanout_compressed_once_per_message(srv):
    """Compressed and plain subscribers of one channel get the same messages; each message is
    compressed once per route and window size, whatever the number of subscribers."""
    channel = "deflate-fan"
    n_msgs = 20

    async def go():
        deflate15 = [ws_connect(srv, "/sub/" + channel) for _ in range(6)]
        deflate10 = [ws_connect(srv, "/sub/" + channel, compression=None,
                                extensions=[ClientPerMessageDeflateFactory(server_max_window_bits=10)])
                     for _ in range(3)]
        plain = [ws_connect(srv, "/sub/" + channel, compression=None) for _ in range(4)]
        pubsub = [ws_connect(srv, "/ws?subscribe=" + channel) for _ in range(3)]
        pubsub_plain = [ws_connect(srv, "/ws?subscribe=" + channel, compression=None) for _ in range(2)]
        conns = [await c.__aenter__() for c in deflate15 + deflate10 + plain + pubsub + pubsub_plain]
        raw_z = PmdWS(srv.port, "/sub/" + channel)
        raw_plain = PmdWS(srv.port, "/sub/" + channel, offer=None)
        try:
            before = srv.stats()
            bodies = [json.dumps({"n": i, "text": text_of(1500).decode()}) for i in range(n_msgs)]
            small = [json.dumps({"n": i}) for i in range(5)]
            for b in bodies + small:
                r = await asyncio.get_running_loop().run_in_executor(
                    None, lambda b=b: srv.publish(channel, b.encode()))
                assert r.status == 200, r
            for ws in conns[:13]:
                got = [await recv(ws) for _ in bodies + small]
                assert got == bodies + small
            for ws in conns[13:]:
                got = [json.loads(await recv(ws))["data"] for _ in bodies + small]
                assert got == [json.loads(b) for b in bodies + small]
            for w, compressed in ((raw_z, True), (raw_plain, False)):
                for b in bodies:
                    assert w.message() == (OP_TEXT, b.encode(), compressed)
                for b in small:
                    assert w.message() == (OP_TEXT, b.encode(), False)  # under min_size
            after = srv.stats()
            # Groups: /sub/ window 15, /sub/ window 10, /ws window 15.
            assert after["deflate_compressed"] - before["deflate_compressed"] == 3 * n_msgs
            assert after["deflate_not_compressed"] - before["deflate_not_compressed"] == 3 * len(small)
            saved_in = after["deflate_compress_bytes_in"] - before["deflate_compress_bytes_in"]
            saved_out = after["deflate_compress_bytes_out"] - before["deflate_compress_bytes_out"]
            assert saved_out < saved_in / 4
            assert raw_z.wire_bytes < raw_plain.wire_bytes / 4
            assert after["deflate_websockets"] >= 13
        finally:
            raw_z.close()
            raw_plain.close()
            for c in deflate15 + deflate10 + plain + pubsub + pubsub_plain:
                await c.__aexit__(None, None, None)

    run(go(), timeout=60)


def test_pubsub_compressed_publish(srv):
    """A compressed client message on /ws is inflated, published and fanned out."""
    async def go():
        async with ws_connect(srv, "/ws?subscribe=deflate-pub") as sub, \
                ws_connect(srv, "/ws") as pub:
            # websockets negotiated the extension, and so compresses what it sends.
            assert pub.response_headers.get("Sec-WebSocket-Extensions") == PLAIN
            before = srv.stats()
            data = {"text": text_of(4000).decode()}
            request = json.dumps({"op": "publish", "channel": "deflate-pub", "data": data, "id": 1})
            await pub.send(request)
            reply = json.loads(await recv(pub))
            assert reply["op"] == "published" and reply["id"] == 1
            msg = json.loads(await recv(sub))
            assert msg["data"] == data
            after = srv.stats()
            # The request came compressed: herald inflated that one message, to its full size.
            assert after["deflate_inflated"] - before["deflate_inflated"] == 1
            inflated = after["deflate_inflate_bytes_out"] - before["deflate_inflate_bytes_out"]
            assert inflated == len(request.encode())
            assert after["deflate_inflate_bytes_in"] - before["deflate_inflate_bytes_in"] < inflated / 4
    run(go())


# --- limits and bad data --------------------------------------------------------------------------

def zip_bomb(size=10 << 20):
    return compress(b"\0" * size)


@pytest.mark.parametrize("pieces", [1, 8])
def test_zip_bomb_1009(srv, pieces):
    """A small frame that inflates past max_message is refused as soon as the limit is passed;
    the broker inflates no more than the limit, and other clients carry on."""
    bomb = zip_bomb()
    assert len(bomb) < 20000
    with PmdWS(srv.port, "/echo") as other:
        before = srv.stats()
        with PmdWS(srv.port, "/echo") as w:
            cuts = [len(bomb) * i // pieces for i in range(pieces + 1)]
            try:
                for i in range(pieces):
                    w.send_frame(OP_BINARY if i == 0 else OP_CONT, bomb[cuts[i]:cuts[i + 1]],
                                 fin=i == pieces - 1, rsv=RSV1 if i == 0 else 0)
            except (BrokenPipeError, ConnectionResetError):
                pass
            w.expect_close(1009)
        after = srv.wait_stats(lambda s: s["deflate_inflaters"] <= before["deflate_inflaters"])
        assert after["messages_too_big"] == before["messages_too_big"] + 1
        assert after["deflate_inflate_bytes_out"] - before["deflate_inflate_bytes_out"] <= MAX
        # Exactly max_message is still fine.
        other.send_compressed(OP_BINARY, b"\0" * MAX)
        assert other.message() == (OP_BINARY, b"\0" * MAX, True)
        other.send_compressed(OP_BINARY, b"\0" * (MAX + 1))
        other.expect_close(1009)


def test_invalid_compressed_data_1007(srv):
    cases = [
        b"\xff\xff\xff",                      # reserved block type
        b"",                                  # not even a block header
        b"\x00\x05\x00\x00\x00hello",         # stored block length and complement disagree
        compress(text_of(5000))[:-20],        # cut short inside a block
        compress(b"x" * 100) + b"\x01\x02",   # garbage after the flush
    ]
    for payload in cases:
        with PmdWS(srv.port, "/echo") as w:
            w.send_frame(OP_BINARY, payload, rsv=RSV1)
            w.expect_close(1007)


def test_final_block_then_data_1007(srv):
    d = zlib.compressobj(6, zlib.DEFLATED, -15)
    payload = d.compress(b"x" * 300) + d.flush(zlib.Z_FINISH) + b"\x00"
    with PmdWS(srv.port, "/echo") as w:
        w.send_frame(OP_BINARY, payload, rsv=RSV1)
        w.expect_close(1007)


@pytest.mark.parametrize("text", [b"caf\xc3", b"abc\xff" + b"x" * 5000, b"\xed\xa0\x80 surrogate"])
def test_invalid_utf8_inside_compressed_text_1007(srv, text):
    with PmdWS(srv.port, "/echo") as w:
        w.send_compressed(OP_BINARY, text)  # as binary it is fine
        assert w.message()[:2] == (OP_BINARY, text)
        w.send_compressed(OP_TEXT, text, pieces=2)
        w.expect_close(1007)


def test_rsv1_on_control_frame_1002(srv):
    with PmdWS(srv.port, "/echo") as w:
        assert w.extension
        w.send_frame(OP_PING, b"x", rsv=RSV1)
        w.expect_close(1002)


def test_rsv1_on_continuation_1002(srv):
    z = compress(text_of(1000))
    with PmdWS(srv.port, "/echo") as w:
        w.send_frame(OP_TEXT, z[:10], fin=False, rsv=RSV1)
        w.send_frame(OP_CONT, z[10:], fin=True, rsv=RSV1)
        w.expect_close(1002)


@pytest.mark.parametrize("rsv", [1, 2, 3, 5, 6, 7])
def test_other_rsv_bits_1002(srv, rsv):
    with PmdWS(srv.port, "/echo") as w:
        w.send_frame(OP_TEXT, b"hello", rsv=rsv)
        w.expect_close(1002)


def test_broker_fine_afterwards(srv):
    """After the failures above, the module's broker still echoes and reports no leftovers."""
    with PmdWS(srv.port, "/echo") as w:
        w.send_compressed(OP_TEXT, text_of(1000))
        assert w.message() == (OP_TEXT, text_of(1000), True)
    s = srv.wait_stats(lambda s: s["deflate_inflaters"] == 0 and s["deflate_websockets"] == 0)
    assert s["deflate_inflaters"] == 0 and s["deflate_websockets"] == 0


# --- idle connections -----------------------------------------------------------------------------

def test_idle_connections_hold_no_inflater(herald_factory):
    h = herald_factory(limits={"ping_interval": 0.5},
                       routes=[{"path": "/echo", "kind": "echo", "deflate": True}])
    quiet = [PmdWS(h.port, "/echo") for _ in range(5)]  # negotiated, never send compressed data
    nct = PmdWS(h.port, "/echo", offer="permessage-deflate; client_no_context_takeover")
    keep = PmdWS(h.port, "/echo")
    try:
        assert h.stats()["deflate_websockets"] == 7
        assert h.stats()["deflate_inflaters"] == 0
        for w in (nct, keep):
            w.send_compressed(OP_TEXT, text_of(500))
            assert w.message()[:2] == (OP_TEXT, text_of(500))
        assert h.stats()["deflate_inflaters"] == 2
        # Idle for a ping interval: the inflater of the client that keeps no context is dropped;
        # the other one holds the client's window and stays.
        for w in (nct, keep):
            f = w.frame(timeout=3)
            assert f.opcode == OP_PING
            w.send_frame(OP_PONG, f.payload)
        assert h.wait_stats(lambda s: s["deflate_inflaters"] == 1)["deflate_inflaters"] == 1
        nct.send_compressed(OP_TEXT, text_of(600))
        assert nct.message()[:2] == (OP_TEXT, text_of(600))
        assert h.stats()["deflate_inflaters"] == 2
    finally:
        for w in quiet + [nct, keep]:
            w.close()
    assert h.wait_stats(lambda s: s["deflate_websockets"] == 0)["deflate_inflaters"] == 0


# --- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize("route,words", [
    ({"path": "/e", "kind": "echo", "deflate": "yes"}, "deflate"),
    ({"path": "/e", "kind": "echo", "deflate": {"level": 0}}, "level"),
    ({"path": "/e", "kind": "echo", "deflate": {"level": 10}}, "level"),
    ({"path": "/e", "kind": "echo", "deflate": {"min_size": -1}}, "min_size"),
    ({"path": "/e", "kind": "echo", "deflate": {"window": 10}}, "window"),
    ({"path": "/s/", "kind": "sse", "deflate": True}, "deflate"),
])
def test_bad_deflate_config(tmp_path, route, words):
    populate(tmp_path)
    path = tmp_path / "herald.lua"
    path.write_text(config_text(make_config({"routes": [route]})))
    r = subprocess.run([herald_bin(), "--check", "--config", str(path)], capture_output=True, timeout=20)
    assert r.returncode != 0
    line = r.stderr.decode().strip()
    assert "\n" not in line and "routes[1]" in line and words in line, line


def test_good_deflate_config(tmp_path):
    populate(tmp_path)
    path = tmp_path / "herald.lua"
    path.write_text(config_text(make_config({"routes": [
        {"path": "/a", "kind": "echo", "deflate": True},
        {"path": "/b", "kind": "echo", "deflate": False},
        {"path": "/c", "kind": "pubsub", "deflate": {"min_size": 0, "level": 9}},
        {"path": "/d", "kind": "pubsub", "deflate": {}},
    ]})))
    r = subprocess.run([herald_bin(), "--check", "--config", str(path)], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
