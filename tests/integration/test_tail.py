"""Tailed files, followed like tail -F: every complete line published exactly once, in order,
through bursts, byte-by-byte writes, rotation by rename, truncation, deletion and re-creation, a
file that appears late, and lines over the message limit; and herald's own access log as a
source."""
import asyncio
import os
import re
import signal
import time

from herald_util import expect_silence, http_async, recv, run, ws_connect


def tail_node(herald_factory, path, channel="log:t", limits=None, **extra):
    entry = {"path": str(path), "channel": channel}
    entry.update(extra)
    lim = {"send_queue": 64 << 20}
    lim.update(limits or {})
    return herald_factory(tail=[entry], limits=lim)


def tail_stats(h, i=0):
    return h.stats()["tail"][i]


def wait_tail(h, pred, timeout=10.0, i=0):
    s = h.wait_stats(lambda s: pred(s["tail"][i]), timeout)["tail"][i]
    assert pred(s), s
    return s


async def receive(ws, n, timeout=30):
    """n messages, as text."""
    async def all_of_them():
        return [await ws.recv() for _ in range(n)]
    return await asyncio.wait_for(all_of_them(), timeout)


def test_burst_of_100000_lines(herald_factory, tmp_path):
    path = tmp_path / "burst.log"
    path.write_text("old line, before herald started\n" * 1000)
    h = tail_node(herald_factory, path)
    s = wait_tail(h, lambda t: t["state"] == "following")
    assert s["offset"] == path.stat().st_size and s["lines"] == 0  # starts at the end
    lines = ["line %06d %s" % (i, "x" * (i % 50)) for i in range(100000)]

    async def main():
        async with ws_connect(h, "/sub/log:t") as sub:
            with open(path, "a") as f:
                f.write("\n".join(lines[:50000]) + "\n")  # one big append...
                f.flush()
                for i in range(50000, 100000, 1000):  # ... then a thousand lines at a time
                    f.write("\n".join(lines[i:i + 1000]) + "\n")
                    f.flush()
            got = await receive(sub, len(lines), 60)
            assert got == lines
            await expect_silence(sub, 0.2)

    run(main(), timeout=90)
    s = tail_stats(h)
    assert s["lines"] == 100000 and s["messages"] == 100000 and s["offset"] == path.stat().st_size


def test_lines_written_a_byte_at_a_time(herald_factory, tmp_path):
    path = tmp_path / "bytes.log"
    path.write_bytes(b"")
    h = tail_node(herald_factory, path)
    wait_tail(h, lambda t: t["state"] == "following")
    lines = ["first line", "ünïcödé — ✓", "", "windows line\r", "last"]

    async def main():
        async with ws_connect(h, "/sub/log:t") as sub:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                # Half a line, read by herald: nothing is published until its newline.
                os.write(fd, b"partial ")
                await asyncio.to_thread(wait_tail, h, lambda t: t["offset"] == 8 and
                                        t["pending"] == 8)
                await expect_silence(sub, 0.1)
                os.write(fd, b"line\n")
                assert await recv(sub) == "partial line"
                for line in lines:
                    for byte in (line + "\n").encode():
                        os.write(fd, bytes([byte]))
            finally:
                os.close(fd)
            got = await receive(sub, len(lines))
            assert got == [line.rstrip("\r") for line in lines]
            await expect_silence(sub, 0.2)

    run(main())


def test_rotation_by_rename_under_load(herald_factory, tmp_path):
    path = tmp_path / "app.log"
    path.write_text("")
    h = tail_node(herald_factory, path)
    wait_tail(h, lambda t: t["state"] == "following")
    rotations = 4
    expected = []

    def writer():
        """A logging application writing without pause. Now and then the file is rotated: renamed
        (and, every other time, created again empty as logrotate's "create" does); the application
        writes a few more lines to the renamed file before it reopens its log. Rotations are far
        apart compared to herald's reaction, as in life: the next one waits until herald has
        followed the last (the writing does not wait). Should herald never report a rotation,
        the writer gives up after a bound rather than filling the disk until ctest's timeout."""
        f = open(path, "a")
        n = done = since = 0
        deadline = None  # by when herald must have followed the last rotation
        while done < rotations or since < 2000:
            if deadline is not None and time.monotonic() > deadline:
                f.close()
                raise AssertionError("herald did not report rotation %d within 15 s (%d lines "
                                     "written): %r" % (done, n, tail_stats(h)))
            batch = ["line %d" % (n + k) for k in range(100)]
            n += 100
            since += 100
            f.write("\n".join(batch) + "\n")
            f.flush()
            expected.extend(batch)
            if done < rotations and since >= 2000 and deadline is None:
                deadline = time.monotonic() + 15.0
            if done < rotations and since >= 2000 and tail_stats(h)["rotations"] == done:
                os.rename(path, "%s.%d" % (path, done))
                if done % 2:
                    open(path, "a").close()
                late = ["late line %d.%d (to the renamed file)" % (done, k) for k in range(50)]
                f.write("\n".join(late) + "\n")
                f.flush()
                expected.extend(late)
                f.close()
                f = open(path, "a")
                done += 1
                since = 0
                deadline = None
        f.close()

    async def main():
        async with ws_connect(h, "/sub/log:t") as sub:
            got = []

            async def reader():
                while True:
                    got.append(await sub.recv())

            task = asyncio.ensure_future(reader())
            try:
                await asyncio.to_thread(writer)
                async def all_in():
                    while len(got) < len(expected):
                        await asyncio.sleep(0.01)
                await asyncio.wait_for(all_in(), 30)
                await asyncio.sleep(0.2)  # anything published twice would show up by now
            finally:
                task.cancel()
            assert got == expected

    run(main(), timeout=90)
    assert tail_stats(h)["rotations"] == rotations


def test_truncation(herald_factory, tmp_path):
    path = tmp_path / "trunc.log"
    path.write_text("")
    h = tail_node(herald_factory, path)
    wait_tail(h, lambda t: t["state"] == "following")

    async def main():
        async with ws_connect(h, "/sub/log:t") as sub:
            with open(path, "a") as f:
                f.write("".join("before %d\n" % i for i in range(100)))
            assert await receive(sub, 100) == ["before %d" % i for i in range(100)]
            # copytruncate: the file is emptied in place and the writer goes on appending.
            with open(path, "r+") as f:
                f.truncate(0)
            with open(path, "a") as f:
                f.write("".join("after %d\n" % i for i in range(10)))
            assert await receive(sub, 10) == ["after %d" % i for i in range(10)]
            await expect_silence(sub, 0.2)

    run(main())
    s = tail_stats(h)
    assert s["truncations"] == 1 and s["offset"] == path.stat().st_size


def test_delete_and_recreate(herald_factory, tmp_path):
    path = tmp_path / "gone.log"
    path.write_text("")
    h = tail_node(herald_factory, path)
    wait_tail(h, lambda t: t["state"] == "following")

    async def main():
        async with ws_connect(h, "/sub/log:t") as sub:
            # Deleted, then (once herald has noticed) created again.
            with open(path, "a") as f:
                f.write("".join("one %d\n" % i for i in range(50)))
            os.unlink(path)
            await asyncio.to_thread(wait_tail, h, lambda t: t["state"] == "waiting")
            with open(path, "a") as f:
                f.write("".join("two %d\n" % i for i in range(50)))
            assert await receive(sub, 100) == ["%s %d" % (w, i) for w in ("one", "two")
                                               for i in range(50)]
            # Deleted and created again at once: the lines still unread in the deleted file
            # come first, then the new file's.
            with open(path, "a") as f:
                f.write("".join("three %d\n" % i for i in range(50)))
            os.unlink(path)
            with open(path, "a") as f:
                f.write("".join("four %d\n" % i for i in range(50)))
            assert await receive(sub, 100) == ["%s %d" % (w, i) for w in ("three", "four")
                                               for i in range(50)]
            await expect_silence(sub, 0.2)

    run(main())
    assert tail_stats(h)["rotations"] == 2


def test_missing_file_appears_later(herald_factory, tmp_path):
    path = tmp_path / "later" / "new.log"
    h = tail_node(herald_factory, path)
    s = tail_stats(h)
    assert s["state"] == "waiting" and s["lines"] == 0
    assert "does not exist yet" in h.stderr_text()

    async def main():
        async with ws_connect(h, "/sub/log:t") as sub:
            path.parent.mkdir()
            with open(path, "w") as f:  # read from its beginning, though herald starts at the end
                f.write("".join("hello %d\n" % i for i in range(20)))
            assert await receive(sub, 20) == ["hello %d" % i for i in range(20)]

    run(main())
    assert tail_stats(h)["state"] == "following"


def test_over_long_lines_are_split_and_counted(herald_factory, tmp_path):
    path = tmp_path / "long.log"
    path.write_text("")
    h = tail_node(herald_factory, path, limits={"max_message": 1024})
    wait_tail(h, lambda t: t["state"] == "following")
    ascii_line = "".join(chr(ord("a") + i % 26) for i in range(2500))
    utf8_line = "é" * 700  # 1400 bytes: not cut inside a character
    exact = "z" * 2048     # two full pieces, no empty third one

    async def main():
        async with ws_connect(h, "/sub/log:t") as sub:
            with open(path, "a") as f:
                f.write(ascii_line + "\n")
                f.flush()
                f.write(utf8_line + "\r\n")
                f.write(exact + "\n")
                f.write("short\n")
            got = await receive(sub, 8)
            assert got[:3] == [ascii_line[:1024], ascii_line[1024:2048], ascii_line[2048:]]
            assert all(isinstance(m, str) for m in got)  # text frames: valid UTF-8 each
            assert got[3:5] == [utf8_line[:512], utf8_line[512:]]
            assert got[5:] == [exact[:1024], exact[1024:], "short"]
            await expect_silence(sub, 0.2)

    run(main())
    s = tail_stats(h)
    assert s["lines"] == 4 and s["messages"] == 8 and s["lines_split"] == 3
    assert re.search(r'^herald_tail_lines_split_total\{path="[^"]*long.log",channel="log:t"\} 3$',
                     h.metrics(), re.M)


def test_start_at_end_by_default_or_from_start(herald_factory, tmp_path):
    a = tmp_path / "a.log"
    b = tmp_path / "b.log"
    a.write_text("one\ntwo\nunfinished")
    b.write_text("one\ntwo\nunfinished")
    h = herald_factory(tail=[{"path": str(a), "channel": "a"},
                             {"path": str(b), "channel": "b", "from_start": True}])
    sa = tail_stats(h, 0)
    # From the end; the line being written is kept whole: read, waiting for its newline.
    assert sa["lines"] == 0 and sa["offset"] == a.stat().st_size and sa["pending"] == 10
    sb = tail_stats(h, 1)
    assert sb["lines"] == 2 and sb["offset"] == b.stat().st_size and sb["pending"] == 10

    async def main():
        async with ws_connect(h, "/sub/a") as sub:
            with open(a, "a") as f:
                f.write(" now\n")
            assert await recv(sub) == "unfinished now"

    run(main())


def test_access_log_is_tailed(herald_factory, tmp_path):
    h = herald_factory(access_log="access.log",
                       tail=[{"path": "access.log", "channel": "log:access"}])
    log = h.dir / "access.log"

    async def find(sub, needle):
        while True:
            line = await recv(sub)
            if needle in line:
                return line

    async def main():
        async with ws_connect(h, "/sub/log:access") as sub:
            r = await http_async(h, "GET", "/stats?probe=1", headers={"User-Agent": "probe/1.0"})
            assert r.status == 200
            line = await find(sub, "probe=1")
            assert re.match(r'^127\.0\.0\.1 - - \[[^\]]+\] "GET /stats\?probe=1 HTTP/1\.1" 200 \d+ '
                            r'"-" "probe/1\.0"$', line), line
            # logrotate: rename, then SIGHUP makes herald reopen its log; the tail follows.
            os.rename(log, str(log) + ".1")
            h.terminate(signal.SIGHUP)
            await asyncio.to_thread(wait_tail, h, lambda t: t["rotations"] == 1)
            r = await http_async(h, "GET", "/stats?probe=2")
            assert r.status == 200
            await find(sub, "probe=2")

    run(main())


def test_reload_keeps_followed_files_and_adds_new_ones(herald_factory, tmp_path):
    a = tmp_path / "a.log"
    b = tmp_path / "b.log"
    a.write_text("")
    b.write_text("already there\n")
    h = herald_factory(tail=[{"path": str(a), "channel": "a"}])
    wait_tail(h, lambda t: t["state"] == "following")
    with open(a, "a") as f:
        f.write("one\n")
    wait_tail(h, lambda t: t["lines"] == 1)
    h.reload(tail=[{"path": str(b), "channel": "b"}, {"path": str(a), "channel": "a"}])
    s = h.wait_stats(lambda s: len(s["tail"]) == 2)["tail"]
    assert [t["channel"] for t in s] == ["b", "a"]
    assert s[1]["lines"] == 1 and s[1]["offset"] == 4    # a: its state kept
    assert s[0]["lines"] == 0 and s[0]["offset"] == 14   # b: new, from its end

    async def main():
        async with ws_connect(h, "/sub/a") as sa, ws_connect(h, "/sub/b") as sb:
            with open(a, "a") as f:
                f.write("two\n")
            with open(b, "a") as f:
                f.write("new in b\n")
            assert await recv(sa) == "two"
            assert await recv(sb) == "new in b"

    run(main())
    h.reload(tail=None)
    assert h.wait_stats(lambda s: s["tail"] == [])["tail"] == []
