"""HTTP: static files, keep-alive and pipelining, escapes from the web root, malformed requests,
and POST /pub/<channel>."""
import json
import re
import time

import pytest

from herald_util import OP_BINARY, OP_TEXT, SECRET, WEB_FILES, RawHTTP, RawWS

# --- static files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, (_, t) in WEB_FILES.items() if t])
def test_static_file_and_type(herald_module, name):
    data, ctype = WEB_FILES[name]
    r = herald_module.request("GET", "/" + name)
    assert r.status == 200, r
    assert r.body == data
    assert r.header("content-type", "").startswith(ctype), r
    assert int(r.header("content-length")) == len(data)


def test_large_file(herald_module):
    r = herald_module.request("GET", "/big.bin")
    assert r.status == 200
    assert r.body == WEB_FILES["big.bin"][0]


def test_root_serves_index(herald_module):
    r = herald_module.request("GET", "/")
    assert r.status == 200
    assert r.body == WEB_FILES["index.html"][0]
    assert r.header("content-type").startswith("text/html")


def test_directory_with_slash_serves_its_index(herald_module):
    r = herald_module.request("GET", "/dir/")
    assert r.status == 200
    assert r.body == WEB_FILES["dir/index.html"][0]


def test_directory_without_slash_redirects(herald_module):
    r = herald_module.request("GET", "/dir")
    assert r.status == 301, r
    assert r.header("location", "").endswith("/dir/"), r


def test_symlink_inside_root_is_served(herald_module):
    r = herald_module.request("GET", "/link_in.txt")
    assert r.status == 200, r
    assert r.body == WEB_FILES["notes.txt"][0]


def test_query_string_is_ignored_for_files(herald_module):
    r = herald_module.request("GET", "/notes.txt?v=3")
    assert r.status == 200
    assert r.body == WEB_FILES["notes.txt"][0]


def test_percent_encoded_path(herald_module):
    r = herald_module.request("GET", "/%6Eotes.txt")
    assert r.status == 200
    assert r.body == WEB_FILES["notes.txt"][0]


def test_not_found(herald_module):
    for path in ("/nope.html", "/dir/nope.txt", "/nope/", "/index.html/x"):
        r = herald_module.request("GET", path)
        assert r.status == 404, (path, r)


def test_head(herald_module):
    data = WEB_FILES["pic.png"][0]
    with RawHTTP(herald_module.port) as h:
        # HEAD then GET on one connection: if HEAD sent a body, the second response would be garbage.
        h.send(h.build("HEAD", "/pic.png") + h.build("GET", "/notes.txt"))
        r1 = h.read_response(head=True)
        r2 = h.read_response()
        assert r1.status == 200, r1
        assert int(r1.header("content-length")) == len(data)
        assert r1.header("content-type").startswith("image/png")
        assert r2.status == 200, r2
        assert r2.body == WEB_FILES["notes.txt"][0]
        r3 = h.request("HEAD", "/nope.txt")
        assert r3.status == 404
        r4 = h.request("GET", "/style.css")
        assert r4.body == WEB_FILES["style.css"][0]


def test_keep_alive(herald_module):
    with RawHTTP(herald_module.port) as h:
        for name in ("index.html", "style.css", "data.json"):
            r = h.request("GET", "/" + name)
            assert r.status == 200
            assert r.body == WEB_FILES[name][0]
            assert r.header("connection", "").lower() != "close"
        r = h.request("GET", "/nope")
        assert r.status == 404
        r = h.request("GET", "/notes.txt")  # a 404 does not end the connection
        assert r.body == WEB_FILES["notes.txt"][0]


def test_connection_close_is_honoured(herald_module):
    with RawHTTP(herald_module.port) as h:
        r = h.request("GET", "/notes.txt", headers={"Connection": "close"})
        assert r.status == 200
        assert h.at_eof(), "the connection stayed open after Connection: close"


def test_http10_closes_by_default(herald_module):
    with RawHTTP(herald_module.port) as h:
        h.send(b"GET /notes.txt HTTP/1.0\r\n\r\n")
        r = h.read_response()
        assert r.status == 200
        assert r.body == WEB_FILES["notes.txt"][0]
        assert h.at_eof()


def test_pipelined_requests(herald_module):
    names = ["notes.txt", "style.css", "app.js", "data.json", "pic.png", "nope", "dir/inner.txt"]
    with RawHTTP(herald_module.port) as h:
        h.send(b"".join(h.build("GET", "/" + n) for n in names))
        for n in names:
            r = h.read_response()
            if n == "nope":
                assert r.status == 404
            else:
                assert r.status == 200, (n, r)
                assert r.body == WEB_FILES[n][0], n


def test_pipelined_large_responses(herald_module):
    """Answers too large to be written at once pause the reading of the requests behind them;
    each resumes once the one before is written, none is left waiting."""
    with RawHTTP(herald_module.port) as h:
        h.send(b"".join(h.build("GET", "/big.bin") for _ in range(3)) + h.build("GET", "/notes.txt"))
        for _ in range(3):
            r = h.read_response(timeout=10)
            assert r.status == 200 and r.body == WEB_FILES["big.bin"][0]
        assert h.read_response(timeout=10).body == WEB_FILES["notes.txt"][0]


def test_pipelined_requests_split_at_every_byte(herald_module):
    """Requests arriving byte by byte are parsed the same."""
    with RawHTTP(herald_module.port) as h:
        data = h.build("GET", "/notes.txt") + h.build("GET", "/style.css")
        for i in range(len(data)):
            h.send(data[i:i + 1])
            if i % 16 == 0:
                time.sleep(0.001)
        assert h.read_response().body == WEB_FILES["notes.txt"][0]
        assert h.read_response().body == WEB_FILES["style.css"][0]


ESCAPES = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/.%2e/secret.txt",
    "/%2e./secret.txt",
    "/dir/../../secret.txt",
    "/dir/%2e%2e/%2e%2e/secret.txt",
    "/dir/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/%2f../secret.txt",
    "/%2f%2e%2e%2fsecret.txt",
    "/..%2fsecret.txt",
    "/dir/..%2f..%2fsecret.txt",
    "//../secret.txt",
    "/./../secret.txt",
    "/dir/./../../secret.txt",
    "/..\\secret.txt",
    "/..%5csecret.txt",
    "/%252e%252e/secret.txt",
    "/link_out.txt",
    "/rel_link_out.txt",
    "/linkdir/secret2.txt",
    "/linkdir/../secret.txt",
    "/notes.txt%00",
    "/notes.txt%00.html",
    "/%00/../secret.txt",
    "/dir/inner.txt%00.png",
]


@pytest.mark.parametrize("target", ESCAPES)
def test_no_escape_from_web_root(herald_module, target):
    with RawHTTP(herald_module.port) as h:
        h.send(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target).encode())
        r = h.read_response()
    assert r.status in (400, 404), (target, r)
    assert SECRET.strip() not in r.body


def test_no_escape_with_absolute_path(herald_module):
    target = "/" + str(herald_module.dir / "secret.txt")
    r = herald_module.request("GET", target)
    assert r.status in (400, 404), r
    assert SECRET.strip() not in r.body


# --- malformed requests -------------------------------------------------------------------------


def expect_error(port, data, statuses):
    with RawHTTP(port) as h:
        h.send(data)
        r = h.read_response()
        assert r.status in statuses, r
        assert h.at_eof(), "the connection stayed open after a malformed request"
    return r


def test_garbage_request_line(herald_module):
    expect_error(herald_module.port, b"GARBAGE\r\n\r\n", (400,))


def test_garbage_binary(herald_module):
    expect_error(herald_module.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", (400,))


def test_http2_version(herald_module):
    expect_error(herald_module.port, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", (505,))


def test_http_version_garbage(herald_module):
    expect_error(herald_module.port, b"GET / HTTX/1.1\r\nHost: x\r\n\r\n", (400, 505))


def test_huge_header(herald_module):
    data = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    expect_error(herald_module.port, data, (431,))


def test_too_many_headers(herald_module):
    data = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(100)) + b"\r\n"
    expect_error(herald_module.port, data, (431,))


def test_huge_request_line(herald_module):
    data = b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    expect_error(herald_module.port, data, (414, 431))


def test_bad_header_syntax(herald_module):
    expect_error(herald_module.port, b"GET / HTTP/1.1\r\nHost x\r\n\r\n", (400,))


def test_conflicting_content_length(herald_module):
    data = b"POST /pub/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    expect_error(herald_module.port, data, (400,))


# --- POST /pub/<channel> ------------------------------------------------------------------------


def test_publish_reply(herald_module):
    r = herald_module.publish("pubreply", "hello")
    assert r.status == 200, r
    assert r.header("content-type").startswith("application/json")
    assert r.json() == {"channel": "pubreply", "seq": 1, "subscribers": 0}
    r = herald_module.publish("pubreply", "again")
    assert r.json() == {"channel": "pubreply", "seq": 2, "subscribers": 0}


def test_publish_reaches_subscribers(herald_module):
    with RawWS(herald_module.port, "/sub/pubsubs") as a, RawWS(herald_module.port, "/sub/pubsubs") as b:
        r = herald_module.publish("pubsubs", "hello")
        assert r.status == 200
        assert r.json() == {"channel": "pubsubs", "seq": 1, "subscribers": 2}
        for ws in (a, b):
            assert ws.recv_message()[:2] == (OP_TEXT, b"hello")
        r = herald_module.publish("pubsubs", b"\xff\x00\xfe")
        for ws in (a, b):
            assert ws.recv_message()[:2] == (OP_BINARY, b"\xff\x00\xfe")


def test_publish_empty_body(herald_module):
    with RawWS(herald_module.port, "/sub/pubempty") as a:
        r = herald_module.publish("pubempty", b"")
        assert r.status == 200, r
        assert a.recv_message()[:2] == (OP_TEXT, b"")


def test_publish_channel_names(herald_module):
    name = ("AZaz09_-.:/" * 20)[:200]
    r = herald_module.publish(name, "x")
    assert r.status == 200, r
    assert r.json()["channel"] == name
    r = herald_module.publish("a/b", "x")
    assert r.status == 200
    assert r.json()["channel"] == "a/b"


@pytest.mark.parametrize("channel", ["a%20b", "x" * 201, "caf%C3%A9", "a*b", "a%22b", "a,b", ""])
def test_publish_bad_channel(herald_module, channel):
    r = herald_module.publish(channel, "x")
    assert r.status == 400, r


def test_publish_needs_post(herald_module):
    r = herald_module.request("GET", "/pub/x")
    assert r.status == 405, r
    r = herald_module.request("PUT", "/pub/x", b"abc")
    assert r.status == 405, r


def test_publish_needs_length(herald_module):
    with RawHTTP(herald_module.port) as h:
        h.send(b"POST /pub/x HTTP/1.1\r\nHost: x\r\n\r\n")
        r = h.read_response()
        assert r.status == 411, r


def test_publish_over_limit(herald_module):
    limit = herald_module.cfg["limits"]["max_message"]
    r = herald_module.publish("pubbig", b"a" * limit)
    assert r.status == 200, r
    with RawHTTP(herald_module.port) as h:
        h.send(b"POST /pub/pubbig HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (limit + 1))
        r = h.read_response()
        assert r.status == 413, r


def test_publish_chunked_over_limit(herald_module):
    limit = herald_module.cfg["limits"]["max_message"]
    with RawHTTP(herald_module.port) as h:
        h.send(b"POST /pub/pubbig2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 4096
        try:
            for _ in range(limit // 4096 + 2):
                h.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = h.read_response()
        assert r.status == 413, r


def test_publish_chunked(herald_module):
    with RawWS(herald_module.port, "/sub/pubchunked") as sub, RawHTTP(herald_module.port) as h:
        h.send(b"POST /pub/pubchunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"6\r\nhello \r\n5;ext=1\r\nworld\r\n0\r\n\r\n")
        r = h.read_response()
        assert r.status == 200, r
        assert r.json()["seq"] == 1
        assert sub.recv_message()[:2] == (OP_TEXT, b"hello world")
        # the connection is kept and a second chunked request on it works
        h.send(b"POST /pub/pubchunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\nGET /notes.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        r = h.read_response()
        assert r.status == 200 and r.json()["seq"] == 2, r
        r = h.read_response()
        assert r.body == WEB_FILES["notes.txt"][0]
        assert sub.recv_message()[:2] == (OP_TEXT, b"abc")


def test_publish_expect_continue(herald_module):
    with RawWS(herald_module.port, "/sub/pubcont") as sub, RawHTTP(herald_module.port) as h:
        h.send(b"POST /pub/pubcont HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
               b"Expect: 100-continue\r\n\r\n")
        r = h.read_response()
        assert r.status == 100, r
        h.send(b"hello")
        r = h.read_response()
        assert r.status == 200, r
        assert sub.recv_message()[:2] == (OP_TEXT, b"hello")


def test_publish_keep_alive_and_pipelined(herald_module):
    with RawHTTP(herald_module.port) as h:
        for i in range(1, 4):
            r = h.request("POST", "/pub/pubka", b"m%d" % i)
            assert r.status == 200 and r.json()["seq"] == i
        h.send(b"".join(h.build("POST", "/pub/pubka", b"p%d" % i) for i in range(10)))
        seqs = [h.read_response().json()["seq"] for _ in range(10)]
        assert seqs == list(range(4, 14))


def test_pub_without_channel(herald_module):
    r = herald_module.request("GET", "/pub")
    assert r.status in (400, 404, 405), r


@pytest.mark.herald(publish_token="s3cret-token")
def test_publish_token(herald):
    r = herald.publish("tok", "x")
    assert r.status == 401, r
    r = herald.publish("tok", "x", {"Authorization": "Bearer wrong"})
    assert r.status == 401, r
    r = herald.publish("tok", "x", {"Authorization": "Bearer s3cret-token-longer"})
    assert r.status == 401, r
    r = herald.publish("tok", "x", {"Authorization": "Basic s3cret-token"})
    assert r.status == 401, r
    r = herald.publish("tok", "x", {"Authorization": "Bearer s3cret-token"})
    assert r.status == 200, r
    assert json.loads(r.body)["seq"] == 1
    r = herald.publish("tok", "x", {"Authorization": "bearer s3cret-token"})
    assert r.status == 200, r  # the auth scheme is case-insensitive (RFC 9110 11.1)


# --- access log and connection limit ------------------------------------------------------------

COMBINED = re.compile(r'^(\S+) \S+ \S+ \[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] '
                      r'"([^"]*)" (\d{3}) (\d+|-) "([^"]*)" "([^"]*)"$')


def test_access_log_combined_format(herald):
    r = herald.request("GET", "/notes.txt", headers={"Referer": "http://ref.example/page",
                                                     "User-Agent": "herald-test/1.0"})
    assert r.status == 200
    assert herald.request("GET", "/nope.txt").status == 404
    log = herald.dir / herald.cfg["access_log"]
    deadline = time.monotonic() + 5
    lines = []
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= 2:
            break
        time.sleep(0.02)
    assert len(lines) >= 2, lines
    m = COMBINED.match(lines[0])
    assert m, lines[0]
    assert m.group(1) == "127.0.0.1"
    assert m.group(3) == "GET /notes.txt HTTP/1.1"
    assert (m.group(4), m.group(5)) == ("200", str(len(WEB_FILES["notes.txt"][0])))
    assert (m.group(6), m.group(7)) == ("http://ref.example/page", "herald-test/1.0")
    m = COMBINED.match(lines[1])
    assert m and m.group(3) == "GET /nope.txt HTTP/1.1" and m.group(4) == "404", lines[1]


@pytest.mark.herald(limits={"max_connections": 3})
def test_max_connections(herald):
    clients = [RawWS(herald.port, "/echo") for _ in range(3)]
    try:
        with RawHTTP(herald.port) as h:
            # nothing sent: the refusal is written on accept, and unread input could turn the
            # server's close into a reset that destroys it
            r = h.read_response()
            assert r.status == 503, r
            assert h.at_eof()
        assert clients[0].echo(OP_TEXT, b"ok") == (OP_TEXT, b"ok")
        clients[0].send_close(1000)
        clients[0].expect_close(1000)
        clients[0].close()
        deadline = time.monotonic() + 5
        while True:
            r = herald.request("GET", "/notes.txt")
            if r.status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert r.status == 200, r
    finally:
        for c in clients:
            c.close()
