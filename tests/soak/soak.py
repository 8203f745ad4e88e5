#!/usr/bin/env python3
"""Soak and fault test: many WebSocket clients with churn, a Redis source restarted underneath.

Runs build/herald (or $HERALD_BIN) against a real redis-server, both started here, and goes through
the same cycle twice: N clients on the generic route (/ws), each subscribed to one of C channels;
most stay, the others churn (connect, subscribe, maybe publish, leave after a while: half with a
close handshake, half by resetting TCP, some before their handshake is even finished); messages are
published over HTTP, over WebSocket and through Redis; at the end of a cycle one more message goes
to each channel and everyone leaves. The second cycle also kills redis-server and starts it again.

Checked:
  * exactness: each subscription's first message is the one after the seq its "subscribed" reply
    gave, and every message after it arrives, once, in order, while the client is connected; every
    client still there at the end got everything up to each channel's last message;
  * the broker survives the Redis restart: it resubscribes, and messages published to Redis after
    the restart reach staying clients;
  * no descriptor leak: /proc/<pid>/fd counts the same after each cycle, once everyone left;
  * no memory leak: RSS and the heap in use (the broker's heap_bytes) after the second cycle are
    within a tolerance of what they were after the first (the first cycle is the warm-up: the
    allocator's pools, the channels and their histories are all grown by then); the heap figure
    catches what RSS hides in pages touched before -- neither is checked on sanitizer builds, whose
    allocator keeps freed memory;
  * the broker exits cleanly (status 0, no sanitizer report).

    tests/soak/soak.py                 # reduced: 1,000 clients, ~20 s (ctest: soak)
    tests/soak/soak.py --full          # 10,000 clients, 30 s warm-up, 5-minute soak
    tests/soak/soak.py -n 3000 -d 60   # anything in between
"""
import argparse
import asyncio
import base64
import json
import os
import random
import resource
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

from herald_util import HOST, Herald  # noqa: E402
from redis_util import RedisServer, redis_settings  # noqa: E402

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 1, 8, 9, 10


class Failure(Exception):
    pass


def frame(opcode, payload=b""):
    """A masked client frame."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return head + key + masked


class Client(asyncio.Protocol):
    """One WebSocket client of /ws subscribed to one channel, checking the seqs it gets."""

    def __init__(self, soak, channel, stayer):
        self.soak = soak
        self.channel = channel
        self.stayer = stayer
        self.transport = None
        self.buf = bytearray()
        self.open = False
        self.subscribed = asyncio.get_running_loop().create_future()
        self.gone = asyncio.get_running_loop().create_future()
        self.leaving = False
        self.expect = None       # the next seq, once subscribed
        self.received = 0
        self.last = 0

    # connection

    def connection_made(self, transport):
        self.transport = transport
        self.key = base64.b64encode(os.urandom(16)).decode()
        transport.write(("GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                         % (HOST, self.key)).encode())

    def connection_lost(self, exc):
        if not self.leaving:
            self.soak.fail("%s client on %s lost its connection (%r) after %d messages"
                           % ("staying" if self.stayer else "churning", self.channel, exc, self.received))
        for f in (self.subscribed, self.gone):
            if not f.done():
                f.set_result(False)

    def send(self, opcode, payload=b""):
        if self.transport and not self.transport.is_closing():
            self.transport.write(frame(opcode, payload))

    def request(self, obj):
        self.send(OP_TEXT, json.dumps(obj).encode())

    # input

    def data_received(self, data):
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[:end + 4]
            if not head.startswith(b"HTTP/1.1 101 "):
                self.soak.fail("handshake refused: %r" % head[:200])
                self.leave_abruptly()
                return
            self.open = True
            self.request({"op": "subscribe", "channel": self.channel})
        while True:
            buf = self.buf
            if len(buf) < 2:
                return
            op, n, off = buf[0] & 15, buf[1] & 127, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, off = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, off = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < off + n:
                return
            payload = bytes(buf[off:off + n])
            del buf[:off + n]
            self.on_frame(op, payload)

    def on_frame(self, op, payload):
        if op == OP_PING:
            self.send(OP_PONG, payload)
        elif op == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            if not self.leaving:
                self.soak.fail("server closed a client on %s with %r %r" % (self.channel, code, payload[2:]))
            self.leaving = True
            self.transport.close()
        elif op == OP_TEXT:
            self.on_message(json.loads(payload))

    def on_message(self, m):
        kind = m.get("op")
        if kind == "message":
            if m["channel"] != self.channel:
                self.soak.fail("message for %s on a client of %s" % (m["channel"], self.channel))
            elif self.expect is None:
                self.soak.fail("message seq %d on %s before the subscribed reply" % (m["seq"], self.channel))
            elif m["seq"] != self.expect:
                self.soak.fail("%s: expected seq %d, got %d (%s)" % (
                    self.channel, self.expect, m["seq"], "duplicate" if m["seq"] < self.expect else "gap"))
                self.expect = m["seq"] + 1
            else:
                self.expect += 1
            self.received += 1
            self.last = m["seq"]
            data = m.get("data")
            if self.stayer and isinstance(data, dict) and data.get("src") == "redis" and \
                    data.get("after_restart"):
                self.soak.redis_delivered_after_restart += 1
            self.soak.delivered += 1
            self.soak.progress(self.channel)
        elif kind == "subscribed":
            # With history on the channel, the reply tells the seq subscribing happened after.
            self.expect = m["seq"] + 1
            self.last = m["seq"]
            if not self.subscribed.done():
                self.subscribed.set_result(True)
        elif kind == "published":
            self.soak.published_ws += 1
        else:
            self.soak.fail("unexpected reply on %s: %r" % (self.channel, m))

    # leaving

    def leave_abruptly(self):
        """Reset the connection: no close handshake, no FIN."""
        self.leaving = True
        if self.transport:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.transport.abort()

    async def leave_gracefully(self, timeout=10):
        self.leaving = True
        self.send(OP_CLOSE, struct.pack("!H", 1000))
        try:
            await asyncio.wait_for(asyncio.shield(self.gone), timeout)
        except asyncio.TimeoutError:
            self.soak.fail("no close handshake from the server within %d s" % timeout)
            self.transport.abort()


class Soak:
    def __init__(self, args, herald, redis):
        self.args = args
        self.h = herald
        self.redis = redis
        self.channels = ["soak:%d" % i for i in range(args.channels)]
        self.failures = []
        self.delivered = 0
        self.published_http = self.published_ws = self.published_redis = 0
        self.redis_delivered_after_restart = 0  # to staying clients, published after the restart
        self.sources = ["127.0.0.%d" % (2 + i) for i in range(max(1, args.connections // 5000 + 1))]
        self.connects = 0
        self.waiters = {}

    def fail(self, text):
        if len(self.failures) < 50:
            self.failures.append(text)

    def progress(self, channel):
        w = self.waiters.get(channel)
        if w and not w.done():
            w.set_result(None)

    # clients

    async def connect(self, channel, stayer):
        loop = asyncio.get_running_loop()
        src = self.sources[self.connects % len(self.sources)]
        self.connects += 1
        _, client = await loop.create_connection(lambda: Client(self, channel, stayer), HOST, self.h.port,
                                                 local_addr=(src, 0))
        return client

    async def subscribed(self, client, timeout=30):
        try:
            ok = await asyncio.wait_for(asyncio.shield(client.subscribed), timeout)
        except asyncio.TimeoutError:
            ok = False
        if not ok:
            self.fail("a client on %s was not subscribed within %d s" % (client.channel, timeout))
        return ok

    async def churner(self, stop):
        """Connect, subscribe, maybe publish, stay a while, leave one way or another; again."""
        rnd = random.Random()
        while not stop.is_set():
            if rnd.random() < 0.05:
                # leave in the middle of the handshake
                reader, writer = await asyncio.open_connection(
                    HOST, self.h.port, local_addr=(self.sources[0], 0))
                writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
                await asyncio.sleep(rnd.uniform(0, 0.2))
                writer.transport.abort()
                continue
            client = await self.connect(rnd.choice(self.channels), False)
            if not await self.subscribed(client):
                client.leave_abruptly()
                continue
            if rnd.random() < 0.5:
                client.request({"op": "publish", "channel": client.channel, "data": {"src": "ws"}})
            try:
                await asyncio.wait_for(stop.wait(), rnd.uniform(0.2, self.args.churn_stay))
            except asyncio.TimeoutError:
                pass
            if rnd.random() < 0.5:
                client.leave_abruptly()
            else:
                await client.leave_gracefully()

    # publishers

    async def http_publisher(self, stop, rate):
        """POST /pub over one keep-alive connection, at about rate messages a second."""
        reader, writer = await asyncio.open_connection(HOST, self.h.port)
        i, t0 = 0, time.monotonic()
        try:
            while not stop.is_set():
                channel = self.channels[i % len(self.channels)]
                await self.post(reader, writer, channel, json.dumps({"src": "http", "i": i}).encode())
                i += 1
                ahead = t0 + i / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            writer.close()

    async def post(self, reader, writer, channel, body):
        writer.write(b"POST /pub/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (channel.encode(), len(body), body))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if not head.startswith(b"HTTP/1.1 200 "):
            raise Failure("POST /pub/%s: %r" % (channel, head[:100]))
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        reply = json.loads(await asyncio.wait_for(reader.readexactly(length), 30))
        self.published_http += 1
        return reply["seq"]

    async def redis_publisher(self, stop, rate, restarted):
        """PUBLISH through Redis at about rate a second, reconnecting while Redis is down."""
        i, t0, conn = 0, time.monotonic(), None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = await asyncio.open_connection(HOST, self.redis.port)
                reader, writer = conn
                channel = self.channels[i % len(self.channels)]
                payload = json.dumps({"src": "redis", "i": i, "after_restart": restarted.is_set()})
                writer.write(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                             % (len(channel), channel.encode(), len(payload), payload.encode()))
                line = await asyncio.wait_for(reader.readline(), 10)
                if not line.startswith(b":"):
                    raise ConnectionError("redis: %r" % line)
                self.published_redis += 1
            except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                if conn:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.05)
            i += 1
            ahead = t0 + i / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        if conn:
            conn[1].close()

    async def restart_redis(self, at, restarted):
        await asyncio.sleep(at)
        loop = asyncio.get_running_loop()
        log("killing redis-server")
        await loop.run_in_executor(None, self.redis.kill)
        await asyncio.sleep(1.0)
        await loop.run_in_executor(None, self.redis.start)
        restarted.set()
        log("redis-server started again")

    # one cycle

    async def cycle(self, name, duration, restart):
        a = self.args
        n_churn = int(a.connections * a.churn)
        n_stay = a.connections - n_churn
        t0 = time.monotonic()
        log("%s: connecting %d staying clients" % (name, n_stay))
        stayers = []
        for i in range(n_stay):
            stayers.append(await self.connect(self.channels[i % len(self.channels)], True))
            if i % 500 == 499:
                await asyncio.sleep(0)  # let the handshakes go on
        ok = await asyncio.gather(*(self.subscribed(c, 60) for c in stayers))
        if not all(ok):
            raise Failure("staying clients not subscribed")
        log("%s: %d subscribed in %.1f s; %d churning, %d msg/s, %.0f s"
            % (name, n_stay, time.monotonic() - t0, n_churn, a.rate, duration))
        stop, restarted = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.ensure_future(self.churner(stop)) for _ in range(n_churn)]
        tasks.append(asyncio.ensure_future(self.http_publisher(stop, a.rate * 0.6)))
        tasks.append(asyncio.ensure_future(self.redis_publisher(stop, a.rate * 0.4, restarted)))
        if restart:
            tasks.append(asyncio.ensure_future(self.restart_redis(duration * 0.4, restarted)))
        await asyncio.sleep(duration)
        stop.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        for r in results:
            if isinstance(r, BaseException):
                self.fail("%s: a task failed: %r" % (name, r))
        if restart:
            # Redis having a subscriber is not enough: the broker must be it, and deliver.
            log("%s: %d messages published to Redis after its restart delivered to staying clients"
                % (name, self.redis_delivered_after_restart))
            if not self.redis_delivered_after_restart:
                self.fail("no message published to Redis after redis-server was restarted reached "
                          "a staying client")
        # The last message of every channel, then everyone staying must have all up to it.
        reader, writer = await asyncio.open_connection(HOST, self.h.port)
        last = {}
        for ch in self.channels:
            last[ch] = await self.post(reader, writer, ch, b'"end"')
        writer.close()
        deadline = time.monotonic() + 60
        for c in stayers:
            while c.last < last[c.channel] and not c.gone.done() and time.monotonic() < deadline:
                self.waiters[c.channel] = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.wait_for(self.waiters[c.channel], 1)
                except asyncio.TimeoutError:
                    pass
            if c.last != last[c.channel]:
                self.fail("%s: a client of %s ended at seq %d, the channel at %d"
                          % (name, c.channel, c.last, last[c.channel]))
        got = sum(c.received for c in stayers)
        log("%s: %d messages delivered so far (%d to staying clients now), published %d http, %d ws, "
            "%d redis"
            % (name, self.delivered, got, self.published_http, self.published_ws, self.published_redis))
        # Everyone leaves: half with a close handshake, half by reset.
        random.shuffle(stayers)
        half = len(stayers) // 2
        for c in stayers[:half]:
            c.leave_abruptly()
        await asyncio.gather(*(c.leave_gracefully() for c in stayers[half:]))
        log("%s: done in %.1f s" % (name, time.monotonic() - t0))

    def wait_idle(self, timeout=30):
        """Wait until the broker holds no connection but the one asking."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.h.stats()
            if s["connections"] == 1 and s["websockets"] == 0:
                return s
            if time.monotonic() > deadline:
                raise Failure("connections still open after everyone left: %r" % (
                    {k: s[k] for k in ("connections", "websockets")},))
            time.sleep(0.1)

    def measure(self):
        """RSS, heap in use (the broker's heap_bytes, taken while only /stats is connected) and
        descriptors, once everyone left."""
        self.wait_idle()
        time.sleep(0.5)  # let closing descriptors go
        heap = self.wait_idle()["heap_bytes"]
        with open("/proc/%d/status" % self.h.pid) as f:
            rss = int([l for l in f if l.startswith("VmRSS:")][0].split()[1]) * 1024
        # The last /stats connection may not be closed on the broker's side yet: the least over
        # half a second (a leaked descriptor does not go away).
        fds = []
        for _ in range(6):
            fds.append(len(os.listdir("/proc/%d/fd" % self.h.pid)))
            time.sleep(0.1)
        return rss, heap, min(fds)


def log(text):
    print("soak: %s" % text, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="10,000 clients, 5 minutes per soak cycle")
    p.add_argument("-n", "--connections", type=int, default=1000)
    p.add_argument("-d", "--duration", type=float, default=8.0, help="seconds of the soak cycle")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of the first cycle")
    p.add_argument("-c", "--channels", type=int, default=50)
    p.add_argument("-r", "--rate", type=float, default=150.0,
                   help="messages a second over HTTP and Redis (a goal: the log says what was done)")
    p.add_argument("--churn", type=float, default=0.3, help="share of clients that come and go")
    p.add_argument("--churn-stay", type=float, default=2.0, help="longest stay of a churning client")
    p.add_argument("--rss-tolerance", type=float, default=0.05,
                   help="RSS may exceed the warm-up's by this share (plus 1 MiB)")
    p.add_argument("--workdir", help="where the broker and redis-server keep their files")
    args = p.parse_args()
    if args.full:
        # Churning clients stay longer, so the client's own CPU goes to reading messages rather
        # than to thousands of handshakes a second.
        args.connections, args.duration, args.warmup = 10000, 300.0, 30.0
        args.channels, args.rate, args.churn_stay = 500, 500.0, 10.0
    sanitized = os.environ.get("HERALD_SANITIZE", "").upper() in ("1", "ON", "TRUE", "YES")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        sys.exit("soak: %d connections need %d descriptors; the hard limit is %d (ulimit -Hn)"
                 % (args.connections, need, hard))

    work = Path(args.workdir or tempfile.mkdtemp(prefix="herald-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(work / "redis").start()
    herald = None
    failures = []
    try:
        cfg = {
            "limits": {"max_connections": args.connections * 2 + 1000,
                       "max_connections_per_ip": args.connections * 2 + 1000,
                       "send_queue": 4194304, "ping_interval": 30, "http_timeout": 30},
            "redis": redis_settings(redis, channels=["soak:%d" % i for i in range(args.channels)]),
            "history": [{"prefix": "soak:", "length": 8, "age": 3600}],
        }
        herald = Herald(work / "herald", cfg)
        herald.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        herald.start()
        deadline = time.monotonic() + 10
        while not herald.stats().get("redis", {}).get("connected"):
            if time.monotonic() > deadline:
                raise Failure("the broker did not connect to Redis")
            time.sleep(0.05)
        soak = Soak(args, herald, redis)
        rss0, heap0, fds0 = soak.measure()
        log("started: RSS %.1f MiB, heap %.2f MiB, %d descriptors" % (rss0 / 2**20, heap0 / 2**20, fds0))

        asyncio.run(soak.cycle("warm-up", args.warmup, restart=False))
        rss1, heap1, fds1 = soak.measure()
        log("after warm-up: RSS %.1f MiB, heap %.2f MiB, %d descriptors"
            % (rss1 / 2**20, heap1 / 2**20, fds1))
        asyncio.run(soak.cycle("soak", args.duration, restart=True))
        deadline = time.monotonic() + 10
        while not herald.stats().get("redis", {}).get("connected"):
            if time.monotonic() > deadline:
                soak.fail("the broker is not connected to Redis again")
                break
            time.sleep(0.05)
        rss2, heap2, fds2 = soak.measure()
        log("after soak: RSS %.1f MiB, heap %.2f MiB, %d descriptors (%d connections made)"
            % (rss2 / 2**20, heap2 / 2**20, fds2, soak.connects))
        failures = soak.failures
        if fds2 != fds1 or fds1 != fds0:
            failures.append("descriptors: %d at start, %d after warm-up, %d after soak" % (fds0, fds1, fds2))
        limit = rss1 * (1 + args.rss_tolerance) + 2**20
        heap_limit = heap1 * 1.02 + 256 * 1024
        if sanitized:
            log("sanitizer build: memory not compared (its allocator keeps freed memory)")
        else:
            if rss2 > limit:
                failures.append("RSS grew from %.1f MiB after warm-up to %.1f MiB after soak (limit %.1f)"
                                % (rss1 / 2**20, rss2 / 2**20, limit / 2**20))
            if heap2 > heap_limit:
                failures.append("heap in use grew from %d bytes after warm-up to %d after soak (limit %d): "
                                "about %.0f bytes per connection made"
                                % (heap1, heap2, heap_limit, (heap2 - heap1) / max(1, soak.connects)))
        s = herald.stats()
        log("broker: %d connections in all, %d slow consumers dropped, %d protocol errors"
            % (s["connections_total"], s["slow_consumers_dropped"], s["protocol_errors"]))
    except Failure as e:
        failures.append(str(e))
    finally:
        if herald:
            try:
                herald.check_clean_exit()
            except AssertionError as e:
                failures.append(str(e)[:4000])
        redis.stop()
    if failures:
        print("soak: FAILED", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        sys.exit(1)
    log("passed")


if __name__ == "__main__":
    main()
