"""The WebSocket opening handshake (RFC 6455 section 4) on every kind of route."""
import time

import pytest

from herald_util import OP_TEXT, RawHTTP, RawWS, accept_key, encode_frame, handshake_request


def handshake(port, path, **kw):
    with RawHTTP(port) as h:
        h.send(handshake_request(port, path, **kw))
        return h.read_response(head=kw.get("method") == "HEAD")


@pytest.mark.parametrize("path", ["/ws", "/echo", "/sub/chan", "/sub/a/b:c.d-e_f", "/ws?subscribe=a,b"])
def test_101_with_correct_accept(herald_module, path):
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    r = handshake(herald_module.port, path, key=key)
    assert r.status == 101, r
    assert r.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert r.header("upgrade", "").lower() == "websocket"
    assert "upgrade" in r.header("connection", "").lower()
    assert r.header("sec-websocket-extensions") is None  # nothing was offered


def test_header_names_and_tokens_are_case_insensitive(herald_module):
    key = "x3JJHMbDL1EzLkh9GBhXDw=="
    data = ("GET /echo HTTP/1.1\r\nhost: 127.0.0.1\r\nUPGRADE: WebSocket\r\n"
            "connection: keep-alive, UPGRADE\r\nsec-websocket-key: %s\r\n"
            "SEC-WEBSOCKET-VERSION: 13\r\n\r\n" % key).encode()
    with RawHTTP(herald_module.port) as h:
        h.send(data)
        r = h.read_response()
    assert r.status == 101, r
    assert r.header("sec-websocket-accept") == accept_key(key) == "HSmrc0sMlYUkAGmm5OPpG2HaGWk="


def test_frames_right_after_the_handshake(herald_module):
    """A frame sent in the same packet as the handshake is not lost."""
    with RawWS(herald_module.port, handshake=False) as ws:
        ws.send_raw(handshake_request(herald_module.port, "/echo") + encode_frame(OP_TEXT, b"early"))
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in ws.buf:
            assert ws._fill(deadline)
        i = ws.buf.index(b"\r\n\r\n") + 4
        assert ws.buf[:i].startswith(b"HTTP/1.1 101")
        del ws.buf[:i]
        assert ws.recv_message()[:2] == (OP_TEXT, b"early")


BAD_REQUESTS = {
    "missing_key": dict(drop=("Sec-WebSocket-Key",)),
    "key_not_base64": dict(key="not base64 at all!!"),
    "key_short": dict(key="AAAAAAAAAAAAAAAAAAAA"),          # 15 bytes
    "key_long": dict(key="AAAAAAAAAAAAAAAAAAAAAAAA"),       # 18 bytes
    "key_empty": dict(key=""),
    "connection_not_upgrade": dict(extra={"Connection": "keep-alive"}),
    "connection_missing": dict(drop=("Connection",)),
    "method_post": dict(method="POST"),
    "method_head": dict(method="HEAD"),
    "http_1_0": dict(version="HTTP/1.0"),
}


@pytest.mark.parametrize("path", ["/ws", "/echo", "/sub/x"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_handshake_400(herald_module, case, path):
    r = handshake(herald_module.port, path, **BAD_REQUESTS[case])
    assert r.status == 400, r


@pytest.mark.parametrize("version", ["8", "12", "14", "13, 8", "abc", None])
def test_wrong_version_426(herald_module, version):
    kw = dict(drop=("Sec-WebSocket-Version",)) if version is None else \
        dict(extra={"Sec-WebSocket-Version": version})
    r = handshake(herald_module.port, "/echo", **kw)
    assert r.status == 426, r
    assert r.header("sec-websocket-version") == "13", r


@pytest.mark.parametrize("path", ["/nope", "/sub", "/ws/extra", "/echo/", "/wss", "/index.html"])
def test_upgrade_to_unknown_path_404(herald_module, path):
    r = handshake(herald_module.port, path)
    assert r.status == 404, r


@pytest.mark.parametrize("path", ["/ws", "/echo", "/sub/x"])
def test_plain_get_on_route_426(herald_module, path):
    with RawHTTP(herald_module.port) as h:
        r = h.request("GET", path)
        assert r.status == 426, r
        # the connection is still usable
        r = h.request("GET", "/notes.txt")
        assert r.status == 200


@pytest.mark.parametrize("path", ["/sub/a%20b", "/sub/" + "x" * 201, "/sub/caf%C3%A9", "/sub/a*b",
                                  "/sub/a,b", "/ws?subscribe=a%20b", "/ws?subscribe=a,,b",
                                  "/ws?subscribe=" + "x" * 201])
def test_bad_channel_in_handshake_400(herald_module, path):
    r = handshake(herald_module.port, path)
    assert r.status == 400, r


def test_longest_channel_name_in_path(herald_module):
    name = ("AZaz09_-.:/" * 20)[:200]
    r = handshake(herald_module.port, "/sub/" + name)
    assert r.status == 101, r
