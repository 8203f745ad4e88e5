"""A real redis-server for the source tests, and a minimal RESP client to drive it.

    with RedisServer(tmp_path) as r:
        r.client().command("PUBLISH", "news", "hello")   # -> number of receivers

The server runs on a free port of 127.0.0.1 with no persistence (--save "" --appendonly no); it can
be killed and started again on the same port (and Unix socket) to test reconnection.
"""
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from herald_util import HOST, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisError(Exception):
    pass


class Resp:
    """A blocking RESP2 client on one connection (TCP or Unix socket)."""

    def __init__(self, port=None, unix=None, timeout=5.0):
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(unix))
        else:
            self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.timeout = timeout
        self.buf = bytearray()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def encode(*args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def send(self, *args):
        self.sock.sendall(self.encode(*args))

    def command(self, *args):
        self.send(*args)
        return self.read()

    def pipeline(self, commands):
        """Send many commands in one write; return their replies in order."""
        self.sock.sendall(b"".join(self.encode(*c) for c in commands))
        return [self.read() for _ in commands]

    def _line(self, deadline):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            self._fill(deadline)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply from redis in time")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("redis closed the connection")
        self.buf += data

    def read(self, timeout=None):
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        return self._read(deadline)

    def _read(self, deadline):
        line = self._line(deadline)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill(deadline)
            data = bytes(self.buf[:n])
            del self.buf[:n + 2]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read(deadline) for _ in range(n)]
        raise RedisError("unexpected reply %r" % line)


class RedisServer:
    """redis-server as a child process, stoppable and restartable on the same address."""

    def __init__(self, dirpath, password=None, unix=False):
        if not os.access(REDIS_SERVER, os.X_OK):
            raise RuntimeError("redis-server is not installed "
                               "(tools/install-deps.sh test installs it)")
        self.dir = Path(dirpath)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.unix = str(self.dir / "redis.sock") if unix else None
        self.proc = None
        self.log = self.dir / "redis.log"

    def args(self):
        a = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly",
             "no", "--dir", str(self.dir), "--logfile", str(self.log), "--daemonize", "no"]
        if self.password:
            a += ["--requirepass", self.password]
        if self.unix:
            a += ["--unixsocket", self.unix, "--unixsocketperm", "700"]
        return a

    def start(self, timeout=10.0):
        self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=str(self.dir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited: %s" % self.log.read_text(errors="replace"))
            try:
                with self.client(timeout=1.0) as c:
                    if c.command("PING") == "PONG":
                        return self
            except (OSError, ConnectionError, TimeoutError):
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within %.0f s" % timeout)

    def kill(self):
        """Stop the server at once (SIGKILL), as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.unix and os.path.exists(self.unix):
            os.unlink(self.unix)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def client(self, timeout=5.0):
        c = Resp(self.port, timeout=timeout)
        if self.password:
            c.command("AUTH", self.password)
        return c

    def numsub(self, channel):
        with self.client() as c:
            r = c.command("PUBSUB", "NUMSUB", channel)
        return int(r[1])

    def channels(self):
        with self.client() as c:
            return sorted(x.decode() for x in c.command("PUBSUB", "CHANNELS"))

    def wait_numsub(self, channel, want, timeout=5.0):
        deadline = time.monotonic() + timeout
        n = self.numsub(channel)
        while n != want and time.monotonic() < deadline:
            time.sleep(0.02)
            n = self.numsub(channel)
        assert n == want, "PUBSUB NUMSUB %s is %d, expected %d" % (channel, n, want)

    def numpat(self):
        with self.client() as c:
            return c.command("PUBSUB", "NUMPAT")

    def wait_numpat(self, want, timeout=5.0):
        deadline = time.monotonic() + timeout
        n = self.numpat()
        while n != want and time.monotonic() < deadline:
            time.sleep(0.02)
            n = self.numpat()
        assert n == want, "PUBSUB NUMPAT is %d, expected %d" % (n, want)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class SteadyPublisher:
    """A backend publishing `<prefix><i>` to a Redis channel from a thread, about one message a
    millisecond, through Redis outages (a PUBLISH whose answer was lost is skipped, never counted).
    `published` holds (i, receivers) for every PUBLISH Redis answered.

        with SteadyPublisher(redis_server, "news", "n") as pub:
            ...
            mark = pub.wait_more(200)   # 200 more answered from here on
    """

    def __init__(self, server, channel, prefix):
        self.server, self.channel, self.prefix = server, channel, prefix
        self.published = []
        self.stop_event = threading.Event()
        self.more = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self.stop_event.is_set():
            try:
                with self.server.client(timeout=1.0) as c:
                    while not self.stop_event.is_set():
                        n = c.command("PUBLISH", self.channel, "%s%d" % (self.prefix, i))
                        with self.more:
                            self.published.append((i, n))
                            self.more.notify_all()
                        i += 1
                        time.sleep(0.001)  # pacing: a steady stream, not a flood
            except (OSError, ConnectionError, TimeoutError, RedisError):
                i += 1  # that one may or may not have been published: never counted
                time.sleep(0.01)  # Redis is down: keep trying

    def wait_more(self, n, timeout=10.0):
        """Wait until n more PUBLISHes are answered; returns the index in published where they
        start."""
        with self.more:
            mark = len(self.published)
            if not self.more.wait_for(lambda: len(self.published) >= mark + n, timeout):
                raise AssertionError("the backend could not publish %d more messages" % n)
        return mark

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(10)


def redis_settings(server, **extra):
    """A herald `redis = {...}` table for server (fast reconnection for tests)."""
    cfg = {"host": HOST, "port": server.port, "reconnect_min": 0.05, "reconnect_max": 0.3}
    cfg.update(extra)
    return cfg


def mirror_node(herald_factory, server, redis=None, **overrides):
    """A herald node in mirror mode on server, started by herald_factory and connected to Redis.
    overrides: its configuration (limits are merged into a 16 MiB send queue); redis: more
    settings for its redis table, over redis_settings' (presence_ttl, channels, reconnect_min,
    ...)."""
    limits = {"send_queue": 16 << 20}
    limits.update(overrides.pop("limits", None) or {})
    h = herald_factory(limits=limits, redis=redis_settings(server, mirror=True, **(redis or {})),
                       **overrides)
    s = h.wait_stats(lambda s: s["redis"]["connected"] and
                     s["redis"]["mirror"]["state"] == "connected", 10)["redis"]
    assert s["connected"] and s["mirror"]["enabled"] and s["mirror"]["state"] == "connected", s
    return h
