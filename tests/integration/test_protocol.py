"""RFC 6455 conformance against the echo route, in the manner of the Autobahn test suite.

Every failure case checks that a Close frame with the right code arrives before the server closes
the TCP connection, and that the server does close it afterwards.
"""
import os
import struct
import time

import pytest

from herald_util import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWS,
                         encode_frame)

MAX = 1048576
# A send queue well above the largest message, so echoing it is never taken for a slow consumer.
HERALD_CONFIG = {"limits": {"max_message": MAX, "send_queue": 4 * MAX}}


@pytest.fixture
def ws(herald_module):
    with RawWS(herald_module.port, "/echo", timeout=10) as w:
        yield w


def text_of(n):
    base = b"herald-0123456789-abcdefghijklmnopqrstuvwxyz-"
    return (base * (n // len(base) + 1))[:n]


# --- echo ---------------------------------------------------------------------------------------

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, MAX]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
def test_echo_sizes(ws, opcode, size):
    payload = text_of(size) if opcode == OP_TEXT else os.urandom(size)
    ws.send_frame(opcode, payload)
    op, data, controls = ws.recv_message()
    assert op == opcode
    assert len(data) == size
    assert data == payload
    assert not controls


def test_echo_utf8_text(ws):
    payload = "héllo wörld ✓ 𝄞 κόσμε".encode()
    assert ws.echo(OP_TEXT, payload) == (OP_TEXT, payload)


def test_many_messages_in_one_write(ws):
    msgs = [b"msg %d" % i for i in range(1000)]
    ws.send_raw(b"".join(encode_frame(OP_TEXT, m) for m in msgs))
    for m in msgs:
        assert ws.recv_message()[:2] == (OP_TEXT, m)


def test_frame_sent_byte_by_byte(ws):
    frame = encode_frame(OP_TEXT, b"slowly, one byte at a time") + encode_frame(OP_PING, b"pp")
    for i in range(len(frame)):
        ws.send_raw(frame[i:i + 1])
        time.sleep(0.001)
    op, data, controls = ws.recv_message()
    assert (op, data) == (OP_TEXT, b"slowly, one byte at a time")
    f = ws.recv_frame()
    assert (f.opcode, f.payload) == (OP_PONG, b"pp")


@pytest.mark.parametrize("size", [MAX + 1, MAX + 100000])
def test_message_over_limit_1009(ws, size):
    try:
        ws.send_frame(OP_BINARY, os.urandom(size))
    except (BrokenPipeError, ConnectionResetError):
        pass
    ws.expect_close(1009)


def test_fragmented_message_over_limit_1009(ws):
    half = MAX // 2 + 1
    try:
        ws.send_frame(OP_TEXT, text_of(half), fin=False)
        ws.send_frame(OP_CONT, text_of(half), fin=True)
    except (BrokenPipeError, ConnectionResetError):
        pass
    ws.expect_close(1009)


def test_message_exactly_at_limit_in_fragments(ws):
    payload = os.urandom(MAX)
    step = MAX // 64
    for i in range(0, MAX, step):
        ws.send_frame(OP_BINARY if i == 0 else OP_CONT, payload[i:i + step], fin=i + step >= MAX)
    op, data, _ = ws.recv_message()
    assert op == OP_BINARY and data == payload


# --- fragmentation and control frames -----------------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
def test_fragmented_with_pings_between(ws, opcode):
    parts = [b"Hel", b"lo, ", b"", b"wor", b"ld"]
    pings = [b"ping-1", b"", b"ping-3 " + b"x" * 100, b"4"]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        ws.send_frame(opcode if i == 0 else OP_CONT, part, fin=last)
        if not last:
            ws.send_frame(OP_PING, pings[i])
    op, data, controls = ws.recv_message()
    assert op == opcode
    assert data == b"Hello, world"
    assert [(c.opcode, c.payload) for c in controls] == [(OP_PONG, p) for p in pings]


def test_fragments_of_one_byte(ws):
    payload = "ab€𝄞cd".encode()
    for i in range(len(payload)):
        ws.send_frame(OP_TEXT if i == 0 else OP_CONT, payload[i:i + 1], fin=i == len(payload) - 1)
    assert ws.recv_message()[:2] == (OP_TEXT, payload)


def test_empty_fragments(ws):
    ws.send_frame(OP_TEXT, b"", fin=False)
    ws.send_frame(OP_CONT, b"", fin=False)
    ws.send_frame(OP_CONT, b"", fin=True)
    assert ws.recv_message()[:2] == (OP_TEXT, b"")


@pytest.mark.parametrize("size", [0, 1, 125])
def test_ping_pong(ws, size):
    payload = os.urandom(size)
    ws.send_frame(OP_PING, payload)
    f = ws.recv_frame()
    assert (f.opcode, f.fin, f.payload) == (OP_PONG, True, payload)


def test_unsolicited_pong_is_ignored(ws):
    ws.send_frame(OP_PONG, b"unsolicited")
    ws.send_frame(OP_PONG, b"")
    assert ws.echo(OP_TEXT, b"still here") == (OP_TEXT, b"still here")


def test_ping_with_binary_payload_in_fragmented_text(ws):
    ws.send_frame(OP_TEXT, "κό".encode(), fin=False)
    ws.send_frame(OP_PING, b"\xff\xfe\x00")  # control payloads need not be UTF-8
    ws.send_frame(OP_CONT, "σμε".encode())
    op, data, controls = ws.recv_message()
    assert data == "κόσμε".encode()
    assert [(c.opcode, c.payload) for c in controls] == [(OP_PONG, b"\xff\xfe\x00")]


# --- closing ------------------------------------------------------------------------------------

VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", VALID_CODES)
def test_close_code_echoed(ws, code):
    ws.send_close(code, b"bye")
    ws.expect_close(code)


def test_close_without_payload(ws):
    ws.send_close()
    ws.expect_close((None, 1000))


def test_close_with_long_valid_reason(ws):
    ws.send_close(1000, ("é" * 61).encode())  # 2 + 122 bytes
    ws.expect_close(1000)


@pytest.mark.parametrize("code", INVALID_CODES)
def test_close_invalid_code_1002(ws, code):
    ws.send_close(code, b"")
    ws.expect_close(1002)


def test_close_one_byte_payload_1002(ws):
    ws.send_frame(OP_CLOSE, b"\x03")
    ws.expect_close(1002)


def test_close_reason_invalid_utf8_1007(ws):
    ws.send_frame(OP_CLOSE, struct.pack("!H", 1000) + b"ok\xff\xfe")
    ws.expect_close(1007)


def test_close_after_partial_message(ws):
    ws.send_frame(OP_TEXT, b"never finished", fin=False)
    ws.send_close(1000)
    ws.expect_close(1000)


def test_clean_close_then_server_closes_tcp(ws):
    assert ws.echo(OP_TEXT, b"hi") == (OP_TEXT, b"hi")
    ws.send_close(1000, b"done")
    f = ws.expect_close(1000, then_eof=False)
    assert f.close_code == 1000
    t0 = time.monotonic()
    assert ws.wait_eof(3.0), "no TCP close after the close handshake"
    assert time.monotonic() - t0 < 3.0


def test_nothing_after_close(ws):
    """Data sent after our close frame is not echoed."""
    ws.send_raw(encode_frame(OP_CLOSE, struct.pack("!H", 1000)) + encode_frame(OP_TEXT, b"late"))
    ws.expect_close(1000)


# --- protocol errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_reserved_bits_1002(ws, rsv):
    ws.send_frame(OP_TEXT, b"rsv", rsv=rsv)
    ws.expect_close(1002)


def test_reserved_bits_on_ping_1002(ws):
    ws.send_frame(OP_PING, b"rsv", rsv=4)
    ws.expect_close(1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcode_1002(ws, opcode):
    ws.send_frame(opcode, b"x")
    ws.expect_close(1002)


def test_reserved_opcode_inside_fragmented_message_1002(ws):
    ws.send_frame(OP_TEXT, b"a", fin=False)
    ws.send_frame(0xB, b"")
    ws.expect_close(1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_too_long_1002(ws, opcode):
    payload = struct.pack("!H", 1000) + b"x" * 124 if opcode == OP_CLOSE else b"x" * 126
    ws.send_frame(opcode, payload)
    ws.expect_close(1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame_1002(ws, opcode):
    payload = struct.pack("!H", 1000) if opcode == OP_CLOSE else b"frag"
    ws.send_frame(opcode, payload, fin=False)
    ws.expect_close(1002)


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_without_start_1002(ws, fin):
    ws.send_frame(OP_CONT, b"orphan", fin=fin)
    ws.expect_close(1002)


def test_continuation_after_complete_message_1002(ws):
    assert ws.echo(OP_TEXT, b"whole") == (OP_TEXT, b"whole")
    ws.send_frame(OP_CONT, b"orphan")
    ws.expect_close(1002)


@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
def test_new_message_inside_fragmented_1002(ws, second):
    ws.send_frame(OP_TEXT, b"first", fin=False)
    ws.send_frame(second, b"second")
    ws.expect_close(1002)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_PING, OP_CLOSE])
def test_unmasked_frame_1002(ws, opcode):
    payload = struct.pack("!H", 1000) if opcode == OP_CLOSE else b"naked"
    ws.send_frame(opcode, payload, mask=False)
    ws.expect_close(1002)


def test_unmasked_after_good_frames_1002(ws):
    assert ws.echo(OP_BINARY, b"\x00\x01") == (OP_BINARY, b"\x00\x01")
    ws.send_frame(OP_BINARY, b"naked", mask=False)
    ws.expect_close(1002)


INVALID_UTF8 = {
    "ff": b"\xff",
    "lone_continuation": b"ab\x80cd",
    "overlong_slash": b"\xc0\xaf",
    "overlong_3": b"\xe0\x80\xaf",
    "surrogate": b"\xed\xa0\x80",
    "above_max": b"\xf4\x90\x80\x80",
    "truncated_at_end": b"hello \xe2\x82",
    "f5": b"\xf5\x80\x80\x80",
    "bad_continuation": b"\xe2\x28\xa1",
}


@pytest.mark.parametrize("name", list(INVALID_UTF8))
def test_invalid_utf8_text_1007(ws, name):
    ws.send_frame(OP_TEXT, b"valid prefix " + INVALID_UTF8[name])
    ws.expect_close(1007)


def test_invalid_utf8_across_fragments_1007(ws):
    ws.send_frame(OP_TEXT, "κόσμε".encode() + b"\xe2\x82", fin=False)
    ws.send_frame(OP_CONT, b"\x28 more", fin=True)
    ws.expect_close(1007)


def test_incomplete_utf8_at_message_end_1007(ws):
    ws.send_frame(OP_TEXT, b"abc\xf0\x9d", fin=False)
    ws.send_frame(OP_CONT, b"\x84", fin=True)  # U+1D11E needs one more byte
    ws.expect_close(1007)


def test_invalid_utf8_in_later_fragment_1007(ws):
    ws.send_frame(OP_TEXT, b"fine ", fin=False)
    ws.send_frame(OP_CONT, b"still fine ", fin=False)
    ws.send_frame(OP_CONT, b"\xed\xbf\xbf", fin=True)
    ws.expect_close(1007)


def test_binary_is_not_utf8_checked(ws):
    assert ws.echo(OP_BINARY, b"\xff\xfe\xed\xa0\x80") == (OP_BINARY, b"\xff\xfe\xed\xa0\x80")


def test_fail_fast_on_invalid_utf8(ws):
    """A frame announcing 100 bytes whose first 20 hold an invalid sequence: the server fails the
    connection at once, without waiting for the other 80 bytes."""
    payload = b"0123456789\xf4\x90\x80\x80abcdef"
    assert len(payload) == 20
    ws.send_raw(encode_frame(OP_TEXT, payload + b"x" * 80)[:2 + 4 + 20])  # header, mask, 20 bytes
    t0 = time.monotonic()
    ws.expect_close(1007, timeout=2.0)
    assert time.monotonic() - t0 < 2.0


def test_fail_fast_on_invalid_utf8_in_continuation(ws):
    ws.send_frame(OP_TEXT, b"start ", fin=False)
    ws.send_raw(encode_frame(OP_CONT, b"ok \xc0\xaf" + b"y" * 200)[:2 + 2 + 4 + 10])
    ws.expect_close(1007, timeout=2.0)


def test_valid_utf8_split_at_every_offset(ws):
    text = "aé€𝄞κόσμε\u07ff\uffff\U0010ffffz".encode()
    for i in range(1, len(text)):
        ws.send_frame(OP_TEXT, text[:i], fin=False)
        ws.send_frame(OP_CONT, text[i:], fin=True)
        op, data, _ = ws.recv_message()
        assert (op, data) == (OP_TEXT, text), "split at %d" % i


def test_valid_utf8_split_in_three_at_every_offset(ws):
    text = "€𝄞é".encode()
    for i in range(1, len(text) - 1):
        for j in range(i + 1, len(text)):
            ws.send_frame(OP_TEXT, text[:i], fin=False)
            ws.send_frame(OP_CONT, text[i:j], fin=False)
            ws.send_frame(OP_CONT, text[j:], fin=True)
            assert ws.recv_message()[:2] == (OP_TEXT, text), (i, j)


def test_protocol_error_after_pipelined_messages(ws):
    """Messages before a protocol error are still answered, then the close follows."""
    ws.send_raw(encode_frame(OP_TEXT, b"one") + encode_frame(OP_TEXT, b"two") +
                encode_frame(OP_TEXT, b"bad", rsv=2))
    assert ws.recv_message()[:2] == (OP_TEXT, b"one")
    assert ws.recv_message()[:2] == (OP_TEXT, b"two")
    ws.expect_close(1002)
