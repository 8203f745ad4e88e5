"""TLS, origin allowlists, signed tokens and the per-client limits."""
import json
import ssl
import subprocess
import time

import pytest
import websockets

from herald_util import (HOST, JWT_SECRET, jwt_token, RawWS, free_port, herald_bin, Herald, OP_TEXT,
                         make_cert, run)


async def open_status(url, **kw):
    """'open', or the HTTP status the handshake was refused with."""
    try:
        async with websockets.connect(url, open_timeout=5, **kw):
            return "open"
    except websockets.exceptions.InvalidStatusCode as e:
        return e.status_code


# --- TLS -------------------------------------------------------------------------------------------

@pytest.fixture
def tls_herald(tmp_path, herald_factory):
    cert, key = make_cert(tmp_path, "a", "localhost")
    cert2, key2 = make_cert(tmp_path, "b", "other.test")
    port = free_port()
    h = herald_factory(limits={"max_message": 1048576}, tls={"port": port, "cert": cert, "key": key,
                            "sni": [{"cert": cert2, "key": key2}]})
    h.tls_port = port
    h.certs = (cert, cert2)
    return h


def client_context(cafile=None):
    ctx = ssl.create_default_context(cafile=cafile)
    if not cafile:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_tls_https_and_wss(tls_herald):
    h = tls_herald
    ctx = client_context(h.certs[0])
    with ctx.wrap_socket(__import__("socket").create_connection((HOST, h.tls_port)),
                         server_hostname="localhost") as s:
        s.sendall(b"GET /notes.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"plain text notes\n")

    async def echo():
        async with websockets.connect("wss://localhost:%d/echo" % h.tls_port, ssl=ctx,
                                      max_size=None) as ws:
            for n in (0, 125, 126, 70000, 65536 * 8):
                msg = "x" * n
                await ws.send(msg)
                assert await ws.recv() == msg
            await ws.send(b"\x00\xff" * 1000)
            assert await ws.recv() == b"\x00\xff" * 1000
    run(echo())


def test_tls_versions_and_sni(tls_herald):
    h = tls_herald
    import socket
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        old.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        with old.wrap_socket(socket.create_connection((HOST, h.tls_port)), server_hostname="localhost"):
            pass
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_context()
        ctx.minimum_version = ctx.maximum_version = version
        with ctx.wrap_socket(socket.create_connection((HOST, h.tls_port)), server_hostname="localhost") as s:
            assert s.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    # SNI picks the certificate whose name matches; a verifying client accepts each.
    for name, cafile in (("localhost", h.certs[0]), ("other.test", h.certs[1])):
        ctx = client_context(cafile)
        with ctx.wrap_socket(socket.create_connection((HOST, h.tls_port)), server_hostname=name) as s:
            assert s.getpeercert()["subject"][0][0][1] == name


def test_tls_plain_port_still_serves(tls_herald):
    assert tls_herald.request("GET", "/notes.txt").status == 200


@pytest.mark.parametrize("problem", ["missing_cert", "mismatched_key"])
def test_tls_bad_certificate_is_a_startup_error(tmp_path, problem):
    cert, key = make_cert(tmp_path, "a", "localhost")
    _, other_key = make_cert(tmp_path, "b", "localhost")
    tls = {"port": free_port(), "cert": cert, "key": key}
    if problem == "missing_cert":
        tls["cert"] = str(tmp_path / "nope.pem")
    else:
        tls["key"] = other_key
    h = Herald(tmp_path / "srv", {"tls": tls})
    proc = subprocess.run([herald_bin(), "--config", str(h.config_path), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode != 0
    err = [l for l in proc.stderr.splitlines() if "herald:" in l]
    assert len(err) == 1, proc.stderr
    assert ("nope.pem" in err[0]) if problem == "missing_cert" else ("does not match" in err[0])


# --- origins and tokens --------------------------------------------------------------------------

ROUTES = [
    {"path": "/ws", "kind": "pubsub", "auth": "token"},
    {"path": "/open", "kind": "pubsub", "origins": ["http://good.example"]},
    {"path": "/sub/", "kind": "raw", "auth": "token"},
]


@pytest.mark.herald(routes=ROUTES, jwt_secret=JWT_SECRET, publish_token="pub-secret")
def test_origin_allowlist(herald):
    url = herald.ws_url("/open")
    assert run(open_status(url, origin="http://good.example")) == "open"
    assert run(open_status(url, origin="http://evil.example")) == 403
    assert run(open_status(url)) == "open"  # no Origin: not a browser


@pytest.mark.herald(routes=ROUTES, jwt_secret=JWT_SECRET, publish_token="pub-secret")
def test_token_refusals(herald):
    base = herald.ws_url("/sub/news")
    good = {"exp": time.time() + 60, "subscribe": ["news"]}
    assert run(open_status(base)) == 401
    assert run(open_status(base + "?token=" + jwt_token(dict(good, exp=time.time() - 5)))) == 401
    assert run(open_status(base + "?token=" + jwt_token(good, secret="another-secret-entirely"))) == 401
    assert run(open_status(base + "?token=" + jwt_token(good, alg="none"))) == 401
    assert run(open_status(base + "?token=garbage")) == 401
    assert run(open_status(herald.ws_url("/sub/other") + "?token=" + jwt_token(good))) == 403
    assert run(open_status(base + "?token=" + jwt_token(good))) == "open"
    assert run(open_status(base, extra_headers={"Authorization": "Bearer " + jwt_token(good)})) == "open"
    assert herald.stats()["auth_refused"] >= 6


@pytest.mark.herald(routes=ROUTES, jwt_secret=JWT_SECRET, publish_token="pub-secret")
def test_token_grants_on_generic_route(herald):
    t = jwt_token({"exp": time.time() + 60, "subscribe": ["chat:*"], "publish": ["chat:room1"]})

    async def go():
        async with websockets.connect(herald.ws_url("/ws") + "?token=" + t) as ws:
            async def ask(req):
                await ws.send(json.dumps(req))
                return json.loads(await ws.recv())
            assert (await ask({"op": "subscribe", "channel": "news", "id": 1}))["op"] == "error"
            assert (await ask({"op": "subscribe", "channel": "chat:room1", "id": 2}))["op"] == "subscribed"
            assert (await ask({"op": "publish", "channel": "chat:room2", "data": 1}))["op"] == "error"
            await ws.send(json.dumps({"op": "publish", "channel": "chat:room1", "data": 7}))
            replies = [json.loads(await ws.recv()) for _ in range(2)]
            assert sorted(r["op"] for r in replies) == ["message", "published"]
    run(go())


@pytest.mark.herald(routes=ROUTES, jwt_secret=JWT_SECRET, publish_token="pub-secret")
def test_publish_with_token(herald):
    assert herald.publish("chat:room1", b"x").status == 401
    assert herald.publish("chat:room1", b"x", {"Authorization": "Bearer pub-secret"}).status == 200
    granted = jwt_token({"exp": time.time() + 60, "publish": ["chat:*"]})
    assert herald.publish("chat:room1", b"x", {"Authorization": "Bearer " + granted}).status == 200
    assert herald.publish("news", b"x", {"Authorization": "Bearer " + granted}).status == 401


# --- limits ----------------------------------------------------------------------------------------

@pytest.mark.herald(limits={"max_connections_per_ip": 3})
def test_connections_per_address(herald):
    conns = [RawWS(herald.port, "/echo") for _ in range(3)]
    try:
        import socket
        s = socket.create_connection((HOST, herald.port), timeout=5)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 429 ")
        s.close()
        # The others are unaffected.
        conns[0].send_text("still here")
        assert conns[0].recv_message()[1] == b"still here"
    finally:
        # A close handshake, so the server has let go of each connection before /stats is
        # asked for (it comes from the same address, and would otherwise be refused too).
        for c in conns:
            c.send_close(1000)
            c.expect_close(1000)
            c.close()
    herald.wait_stats(lambda s: s["connections_refused_per_ip"] == 1 and s["websockets"] == 0)
    with RawWS(herald.port, "/echo") as again:  # slots are given back
        again.send_text("ok")


@pytest.mark.herald(limits={"max_subscriptions": 2})
def test_subscriptions_per_connection(herald):
    async def go():
        async with websockets.connect(herald.ws_url("/ws")) as ws:
            for i, expect in ((1, "subscribed"), (2, "subscribed"), (3, "error"), (1, "subscribed")):
                await ws.send(json.dumps({"op": "subscribe", "channel": "c%d" % i}))
                assert json.loads(await ws.recv())["op"] == expect
    run(go())
    assert herald.stats()["subscription_limit_hits"] == 1


@pytest.mark.herald(limits={"message_rate": 50})
def test_message_rate(herald):
    with RawWS(herald.port, "/echo") as flood, RawWS(herald.port, "/echo") as calm:
        for _ in range(200):
            flood.send_frame(OP_TEXT, b"x")
        flood.expect_close(1008, allow_data=True)
        calm.send_text("fine")
        assert calm.recv_message()[1] == b"fine"
    assert herald.stats()["rate_limited"] == 1
