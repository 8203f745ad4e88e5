"""Helpers for herald's integration tests: starting the broker, raw HTTP and WebSocket clients.

Everything here has a bounded timeout; nothing waits forever. Only 127.0.0.1 is used.
"""
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import websockets

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer")
LISTENING_RE = re.compile(r"listening on http://([^/\s]+):(\d+)/")


def herald_bin():
    return os.path.abspath(os.environ.get("HERALD_BIN") or str(REPO / "build" / "herald"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- configuration ------------------------------------------------------------------------------

class Lua(str):
    """Lua source text written into the configuration as is."""


def lua_value(v):
    if v is None:
        return "nil"
    if isinstance(v, Lua):
        return str(v)
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        out = []
        for ch in v.encode():
            c = chr(ch)
            if c in '"\\':
                out.append("\\" + c)
            elif 32 <= ch < 127:
                out.append(c)
            else:
                out.append("\\%03d" % ch)
        return '"' + "".join(out) + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join("%s = %s" % (k, lua_value(x)) for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "{ " + ", ".join(lua_value(x) for x in v) + " }"
    raise TypeError("cannot write %r as Lua" % (v,))


DEFAULT_LIMITS = {
    "max_message": 65536,
    "send_queue": 262144,
    "max_connections": 100000,
    "ping_interval": 30,
    "http_timeout": 15,
    "close_timeout": 2,
    "max_head": 16384,
    "max_headers": 64,
}

DEFAULT_ROUTES = [
    {"path": "/ws", "kind": "pubsub"},
    {"path": "/sub/", "kind": "raw", "publish": True},
    {"path": "/echo", "kind": "echo"},
    {"path": "/ro/", "kind": "raw"},  # a raw route that does not take messages from clients
]


def make_config(overrides=None):
    """The settings for a test broker: the defaults above with overrides applied ("limits" is
    merged key by key; a value of None leaves the setting out)."""
    overrides = dict(overrides or {})
    limits = dict(DEFAULT_LIMITS)
    limits.update(overrides.pop("limits", {}) or {})
    cfg = {
        "listen": {"host": HOST, "port": 8080},
        "web_root": "web",
        "access_log": "access.log",
        "limits": limits,
        "routes": DEFAULT_ROUTES,
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def config_text(cfg):
    return "".join("%s = %s\n" % (k, lua_value(v)) for k, v in cfg.items())


# Files of the test web root: name -> (bytes, expected Content-Type prefix)
WEB_FILES = {
    "index.html": (b"<!doctype html><title>herald test</title><p>index</p>\n", "text/html"),
    "style.css": (b"body { color: #123456 }\n", "text/css"),
    "app.js": (b"console.log('herald');\n", "text/javascript"),
    "data.json": (b'{"hello": "world"}\n', "application/json"),
    "pic.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "image/png"),
    "notes.txt": (b"plain text notes\n", "text/plain"),
    "image.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>\n', "image/svg+xml"),
    "dir/index.html": (b"<p>dir index</p>\n", "text/html"),
    "dir/inner.txt": (b"inner file\n", "text/plain"),
    "big.bin": (os.urandom(300000), None),
}
SECRET = b"TOP-SECRET-OUTSIDE-THE-WEB-ROOT\n"


def populate(dirpath):
    """Write the web root and, outside it, secret files and symlinks pointing out of the root."""
    d = Path(dirpath)
    web = d / "web"
    for name, (data, _) in WEB_FILES.items():
        p = web / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (d / "secret.txt").write_bytes(SECRET)
    outside = d / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret2.txt").write_bytes(SECRET)
    os.symlink(str(d / "secret.txt"), str(web / "link_out.txt"))
    os.symlink("../secret.txt", str(web / "rel_link_out.txt"))
    os.symlink(str(outside), str(web / "linkdir"))
    os.symlink("notes.txt", str(web / "link_in.txt"))  # a symlink inside the root is fine


# --- the broker process -------------------------------------------------------------------------

class Herald:
    """One broker process on a temporary configuration."""

    def __init__(self, dirpath, overrides=None, name="herald.lua"):
        self.dir = Path(dirpath)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "web").exists():
            populate(self.dir)
        self.cfg = make_config(overrides)
        self.config_path = self.dir / name
        self.config_path.write_text(config_text(self.cfg))
        self.proc = None
        self.preexec = None  # called in the child before exec (resource limits, ...)
        self.port = None
        self.lines = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._eof = threading.Event()
        self.returncode = None

    # lifecycle

    def start(self, timeout=20.0, attempts=5):
        for _ in range(attempts):
            port = free_port()
            if self._start_once(port, timeout):
                return self
            text = self.stderr_text()
            if "in use" not in text:
                break
        raise RuntimeError("herald did not start:\n" + self.stderr_text())

    def _start_once(self, port, timeout):
        self.lines = []
        self._ready.clear()
        self._eof.clear()
        self.port = port
        self.proc = subprocess.Popen(
            [herald_bin(), "--config", str(self.config_path), "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=str(self.dir), preexec_fn=self.preexec)
        t = threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True)
        t.start()
        self._reader = t
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.2):
                return True
            if self._eof.is_set():
                break
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        return False

    def _read_stderr(self, proc):
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            with self._lock:
                self.lines.append(line)
            if LISTENING_RE.search(line):
                self._ready.set()
        self._eof.set()

    def stderr_text(self):
        with self._lock:
            return "".join(self.lines)

    def log_mark(self):
        """A mark in herald's stderr: wait_log(pattern, mark) looks only at what comes after."""
        with self._lock:
            return len(self.lines)

    def log_since(self, start, text):
        """The stderr lines from the mark start on that hold text."""
        with self._lock:
            return [line for line in self.lines[start:] if text in line]

    def wait_log(self, pattern, start=0, timeout=10.0):
        """Wait (bounded) until a stderr line from the mark start on matches the regular
        expression pattern; returns that line."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                lines = self.lines[start:]
            for line in lines:
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError("herald logged no line matching %r; since the mark:\n%s"
                                     % (pattern, "".join(lines)))
            time.sleep(0.02)

    def reload(self, **settings):
        """Change settings (each replaces the one of that name, limits included; None removes
        it), write the configuration, send SIGHUP and wait (bounded) until herald says it
        reloaded. With no settings, the same configuration is read again (scripts included).
        Returns the log mark from before the signal, to wait for what else the reload logs."""
        for k, v in settings.items():
            if v is None:
                self.cfg.pop(k, None)
            else:
                self.cfg[k] = v
        self.config_path.write_text(config_text(self.cfg))
        mark = self.log_mark()
        self.terminate(signal.SIGHUP)
        self.wait_log("configuration reloaded", mark)
        return mark

    @property
    def pid(self):
        return self.proc.pid

    def terminate(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout=20.0):
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self._reader.join(timeout=5)
            raise AssertionError("herald did not exit within %.0f s of SIGTERM\n%s"
                                 % (timeout, self.stderr_text()))
        self._reader.join(timeout=5)
        return self.returncode

    def stop(self, timeout=20.0):
        """SIGTERM and wait; returns the exit status (idempotent)."""
        if self.proc is None:
            return None
        if self.returncode is None:
            self.terminate()
            self.wait_exit(timeout)
        return self.returncode

    def check_clean_exit(self):
        rc = self.stop()
        text = self.stderr_text()
        for pat in SANITIZER_PATTERNS:
            assert pat not in text, "sanitizer report in herald's stderr:\n" + text
        assert rc == 0, "herald exited with %r\n%s" % (rc, text)

    # addresses

    def url(self, path="/"):
        return "http://%s:%d%s" % (HOST, self.port, path)

    def ws_url(self, path="/ws"):
        return "ws://%s:%d%s" % (HOST, self.port, path)

    # HTTP conveniences (each on its own connection)

    def request(self, method, path, body=None, headers=None, timeout=10):
        with RawHTTP(self.port, timeout=timeout) as h:
            return h.request(method, path, body, headers)

    def get_json(self, path):
        r = self.request("GET", path)
        assert r.status == 200, r
        return json.loads(r.body)

    def stats(self):
        return self.get_json("/stats")

    def metrics(self):
        r = self.request("GET", "/metrics")
        assert r.status == 200, r
        return r.body.decode()

    def publish(self, channel, body, headers=None):
        return self.request("POST", "/pub/" + channel, body, headers)

    def wait_stats(self, pred, timeout=5.0):
        """Poll /stats (bounded) until pred(stats) holds; returns the last stats."""
        deadline = time.monotonic() + timeout
        s = self.stats()
        while not pred(s) and time.monotonic() < deadline:
            time.sleep(0.02)
            s = self.stats()
        return s


def script_stats(h, path):
    """The /stats entry of the script route (or authorize script) on path."""
    for s in h.stats()["scripts"]:
        if s["path"] == path:
            return s
    raise AssertionError("no script stats for %s" % path)


def line_of(path, text):
    """The 1-based number of the first line of the file path that holds text."""
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if text in line:
            return i
    raise AssertionError("%r not in %s" % (text, path))


# --- raw HTTP -----------------------------------------------------------------------------------

class Response:
    def __init__(self, version, status, reason, headers, raw_headers, body):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers          # lower-case name -> last value
        self.raw_headers = raw_headers  # [(name, value)]
        self.body = body

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<Response %s %s %r %r>" % (self.status, self.reason, self.raw_headers, self.body[:200])


class RawHTTP:
    """An HTTP/1.1 client on one socket, for keep-alive, pipelining and malformed requests."""

    def __init__(self, port, timeout=10):
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.port = port

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def build(self, method, path, body=None, headers=None, version="HTTP/1.1"):
        if isinstance(body, str):
            body = body.encode()
        hdrs = {"Host": "%s:%d" % (HOST, self.port)}
        if body is not None:
            hdrs["Content-Length"] = str(len(body))
        for k, v in (headers or {}).items():
            if v is None:
                hdrs.pop(k, None)
            else:
                hdrs[k] = v
        head = "%s %s %s\r\n" % (method, path, version)
        head += "".join("%s: %s\r\n" % kv for kv in hdrs.items()) + "\r\n"
        return head.encode() + (body or b"")

    def request(self, method, path, body=None, headers=None):
        self.send(self.build(method, path, body, headers))
        return self.read_response(head=(method == "HEAD"))

    def _recv(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no response in time; have %r" % bytes(self.buf[:300]))
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no response in time; have %r" % bytes(self.buf[:300]))
        except ConnectionResetError:
            data = b""
        return data

    def _read_until(self, marker, deadline):
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[:i + len(marker)])
                del self.buf[:i + len(marker)]
                return out
            data = self._recv(deadline)
            if not data:
                raise EOFError("connection closed; have %r" % bytes(self.buf[:300]))
            self.buf += data

    def _read_exact(self, n, deadline):
        while len(self.buf) < n:
            data = self._recv(deadline)
            if not data:
                raise EOFError("connection closed after %d of %d body bytes" % (len(self.buf), n))
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_response(self, head=False, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        raw = self._read_until(b"\r\n\r\n", deadline)
        lines = raw[:-4].decode("latin-1").split("\r\n")
        m = re.match(r"(HTTP/\d\.\d) (\d{3}) ?(.*)$", lines[0])
        assert m, "bad status line %r" % lines[0]
        headers, raw_headers = {}, []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            raw_headers.append((name, value.strip()))
            headers[name.strip().lower()] = value.strip()
        status = int(m.group(2))
        if head or status < 200 or status in (204, 304):
            body = b""
        elif "content-length" in headers:
            body = self._read_exact(int(headers["content-length"]), deadline)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int(self._read_until(b"\r\n", deadline).split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n", deadline)
                    break
                body += self._read_exact(size, deadline)
                self._read_exact(2, deadline)
        else:
            body = bytes(self.buf)
            self.buf.clear()
            while True:
                data = self._recv(deadline)
                if not data:
                    break
                body += data
        return Response(m.group(1), status, m.group(3), headers, raw_headers, body)

    def at_eof(self, timeout=5.0):
        """True when the server closes the connection (EOF or reset) within timeout with no more
        bytes; raises if bytes arrive."""
        deadline = time.monotonic() + timeout
        if self.buf:
            raise AssertionError("unexpected bytes: %r" % bytes(self.buf[:200]))
        try:
            data = self._recv(deadline)
        except TimeoutError:
            return False
        if data:
            raise AssertionError("unexpected bytes: %r" % data[:200])
        return True


# --- raw WebSocket ------------------------------------------------------------------------------

def accept_key(key):
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def new_key():
    return base64.b64encode(os.urandom(16)).decode()


def handshake_request(port, path, key=None, extra=None, drop=(), method="GET", version="HTTP/1.1"):
    key = key if key is not None else new_key()
    hdrs = {
        "Host": "%s:%d" % (HOST, port),
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
    }
    for d in drop:
        hdrs.pop(d, None)
    hdrs.update(extra or {})
    text = "%s %s %s\r\n" % (method, path, version)
    text += "".join("%s: %s\r\n" % kv for kv in hdrs.items()) + "\r\n"
    return text.encode()


def handshake_status(h, path, extra=None):
    """Send a WebSocket handshake for path (extra: more headers) and return the Response: a
    refusal's status and body, or the head of a 101 (the connection is closed then)."""
    with RawHTTP(h.port) as c:
        c.send(handshake_request(h.port, path, extra=extra))
        return c.read_response()


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class Frame:
    __slots__ = ("fin", "rsv", "opcode", "payload")

    def __init__(self, fin, rsv, opcode, payload):
        self.fin, self.rsv, self.opcode, self.payload = fin, rsv, opcode, payload

    @property
    def close_code(self):
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return struct.unpack("!H", self.payload[:2])[0]

    @property
    def close_reason(self):
        return self.payload[2:]

    def __repr__(self):
        return "<Frame op=%d fin=%d len=%d %r>" % (self.opcode, self.fin, len(self.payload),
                                                   self.payload[:60])


def encode_frame(opcode, payload=b"", fin=True, rsv=0, mask=True, length=None, mask_key=None):
    """A client frame. length overrides the announced payload length (for truncated frames)."""
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = mask_key or os.urandom(4)
    return head + key + xor_mask(payload, key)


def xor_mask(data, key):
    if not data:
        return b""
    n = len(data)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


class ServerFrameError(AssertionError):
    pass


def parse_server_frame(buf, pos=0):
    """Parse one server frame from buf at pos. Returns (Frame, new_pos) or None if incomplete.
    Checks what RFC 6455 requires of a server's frames: unmasked, minimal length encoding."""
    if len(buf) - pos < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    if b1 & 0x80:
        raise ServerFrameError("server frame is masked")
    n = b1 & 0x7F
    p = pos + 2
    if n == 126:
        if len(buf) - p < 2:
            return None
        n = struct.unpack_from("!H", buf, p)[0]
        p += 2
        if n < 126:
            raise ServerFrameError("non-minimal 16-bit length %d" % n)
    elif n == 127:
        if len(buf) - p < 8:
            return None
        n = struct.unpack_from("!Q", buf, p)[0]
        p += 8
        if n < 65536 or n >> 63:
            raise ServerFrameError("non-minimal or invalid 64-bit length %d" % n)
    if len(buf) - p < n:
        return None
    return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, bytes(buf[p:p + n])), p + n


class RawWS:
    """A WebSocket client on a plain socket: sends whatever frames a test builds, and reads the
    server's frames strictly."""

    def __init__(self, port, path="/echo", timeout=5.0, rcvbuf=None, handshake=True, extra=None):
        self.port = port
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False
        self.response_head = None
        if handshake:
            self.handshake(path, extra)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def handshake(self, path, extra=None):
        key = new_key()
        self.sock.sendall(handshake_request(self.port, path, key, extra))
        deadline = time.monotonic() + self.timeout
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                raise AssertionError("connection closed during the handshake: %r" % bytes(self.buf))
        i = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:i]).decode("latin-1")
        del self.buf[:i]
        self.response_head = head
        status = head.split("\r\n")[0]
        assert " 101 " in status + " ", "handshake refused: %r" % head
        hdrs = {}
        for line in head.split("\r\n")[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
        assert hdrs.get("sec-websocket-accept") == accept_key(key), head

    def _fill(self, deadline):
        """Read more bytes into buf; False on EOF (or reset). Raises TimeoutError at the deadline."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("nothing from the server in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            raise TimeoutError("nothing from the server in time")
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    # sending

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, opcode, payload=b"", fin=True, rsv=0, mask=True, length=None):
        self.sock.sendall(encode_frame(opcode, payload, fin, rsv, mask, length))

    def send_text(self, text):
        self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    def send_close(self, code=None, reason=b""):
        payload = b"" if code is None else struct.pack("!H", code) + reason
        self.send_frame(OP_CLOSE, payload)

    # receiving

    def recv_frame(self, timeout=None):
        """The next frame, or None at EOF. Raises TimeoutError."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            r = parse_server_frame(self.buf)
            if r:
                frame, n = r
                del self.buf[:n]
                if frame.rsv:
                    raise ServerFrameError("server frame with RSV bits %d" % frame.rsv)
                return frame
            if not self._fill(deadline):
                if self.buf:
                    raise ServerFrameError("EOF inside a frame: %r" % bytes(self.buf[:100]))
                return None

    def recv_message(self, timeout=None):
        """The next data message, reassembled: (opcode, payload, [control frames seen before it]).
        Raises on EOF or a close frame."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        controls, parts, op = [], [], None
        while True:
            f = self.recv_frame(max(0.001, deadline - time.monotonic()))
            if f is None:
                raise EOFError("connection closed while waiting for a message")
            if f.opcode == OP_CLOSE:
                raise AssertionError("close frame %r while waiting for a message" % (f.close_code,))
            if f.opcode >= 8:
                controls.append(f)
                continue
            if op is None:
                assert f.opcode in (OP_TEXT, OP_BINARY), "unexpected continuation %r" % f
                op = f.opcode
            else:
                assert f.opcode == OP_CONT, "new message inside a fragmented one: %r" % f
            parts.append(f.payload)
            if f.fin:
                return op, b"".join(parts), controls

    def expect_close(self, code, timeout=None, allow_data=False, then_eof=True):
        """Read until a close frame: it must come (before EOF) and carry code (an int, a tuple
        of acceptable ints, or None for an empty payload). Then the server must close TCP."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            try:
                f = self.recv_frame(max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError("no close frame within the timeout (expected %r)" % (code,))
            assert f is not None, "TCP closed without a close frame (expected %r)" % (code,)
            if f.opcode == OP_CLOSE:
                break
            if f.opcode in (OP_PING, OP_PONG):
                continue
            assert allow_data, "data frame %r before the expected close %r" % (f, code)
        codes = code if isinstance(code, tuple) else (code,)
        assert f.close_code in codes, "close code %r (reason %r), expected %r" % (
            f.close_code, f.close_reason, code)
        if f.close_code is not None:
            f.close_reason.decode("utf-8")  # a server's reason must be valid UTF-8
        if then_eof:
            assert self.wait_eof(max(2.0, deadline - time.monotonic())), \
                "the server did not close TCP after its close frame"
        return f

    def wait_eof(self, timeout=3.0):
        """True if the server closes TCP within timeout (remaining bytes must not be a frame
        other than what may legally follow; they are discarded)."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        return True

    def echo(self, opcode, payload, timeout=None):
        self.send_frame(opcode, payload)
        op, data, _ = self.recv_message(timeout)
        return op, data


# --- asyncio / websockets -----------------------------------------------------------------------

def make_cert(directory, name, cn):
    """A self-signed certificate for cn, and its key, in directory: (cert path, key path)."""
    cert, key = directory / (name + ".pem"), directory / (name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=" + cn,
                    "-addext", "subjectAltName=DNS:" + cn],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(cert), str(key)


def wait_for(pred, timeout=5.0, step=0.02):
    """Poll pred until it holds (True) or timeout seconds pass (False): for states the broker
    reaches on a timer, with no event to wait on."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def run(coro, timeout=60):
    """Run a coroutine to completion with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ws_connect(server, path="/ws", **kw):
    kw.setdefault("max_size", None)
    kw.setdefault("ping_interval", None)  # our own pings would count as activity
    kw.setdefault("close_timeout", 3)
    kw.setdefault("open_timeout", 5)
    return websockets.connect(server.ws_url(path), **kw)


async def recv(ws, timeout=5):
    return await asyncio.wait_for(ws.recv(), timeout)


async def recv_json(ws, timeout=5):
    msg = await recv(ws, timeout)
    assert isinstance(msg, str), "expected a text message, got %r" % (msg,)
    return json.loads(msg)


async def request(ws, obj, timeout=5):
    """Send a request (a dict is sent as JSON, str/bytes as is) and return the parsed reply."""
    await ws.send(json.dumps(obj) if isinstance(obj, (dict, list)) else obj)
    return await recv_json(ws, timeout)


async def expect_silence(ws, seconds=0.2):
    try:
        msg = await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return
    raise AssertionError("unexpected message %r" % (msg,))


def json_exact(text):
    """Parse JSON keeping each number's text, so numbers can be compared byte for byte."""
    return json.loads(text, parse_int=lambda s: ("num", s), parse_float=lambda s: ("num", s),
                      parse_constant=lambda s: ("num", s))


async def http_async(server, method, path, body=None, headers=None):
    """An HTTP request from asyncio code without blocking the loop."""
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: server.request(method, path, body, headers))


# --- Server-Sent Events and signed tokens ---------------------------------------------------------

class EventStream:
    """A Server-Sent Events stream read from a raw socket: the response head, then events as dicts
    of their fields (a field given on several lines is joined with newlines). Every read is
    bounded: a stream that sends only keepalive comments still times out."""

    def __init__(self, port, target, headers=None, timeout=10.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        extra = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items())
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (target, extra)).encode())
        self.buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline, "the response head")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.head = head.decode()
        self.status = int(self.head.split()[1])

    def _fill(self, deadline, what):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no %s in time; have %r" % (what, self.buf[:300]))
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no %s in time; have %r" % (what, self.buf[:300]))
        assert chunk, "stream closed while waiting for %s; have %r" % (what, self.buf[:300])
        self.buf += chunk

    def next_block(self, timeout=10.0):
        """The next block (the text up to a blank line): an event, a comment or a retry."""
        deadline = time.monotonic() + timeout
        while b"\n\n" not in self.buf:
            self._fill(deadline, "block")
        block, self.buf = self.buf.split(b"\n\n", 1)
        return block.decode()

    def next_event(self, timeout=10.0):
        """The next block with data (comments and retry skipped): {"id": ..., "data": ...}. One
        deadline for all the blocks read, so comments cannot keep it waiting past timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no event within %.1f s (comments or retry only)" % timeout)
            fields = {}
            for line in self.next_block(left).split("\n"):
                if line.startswith(":"):
                    continue
                k, _, v = line.partition(": ")
                fields[k] = fields[k] + "\n" + v if k in fields else v
            if "data" in fields:
                return fields

    def close(self):
        self.sock.close()


JWT_SECRET = "0123456789abcdef-test-secret"


def jwt_token(claims, secret=JWT_SECRET, alg="HS256"):
    """A signed token (JWT) with these claims, as a backend would make one for a browser."""
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret.encode(), ("%s.%s" % (head, body)).encode(), hashlib.sha256).digest())
    return "%s.%s.%s" % (head, body, sig)
