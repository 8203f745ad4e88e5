/* fuzz_ws.c - ws_parse fed in pieces the way the connection code feeds it, checked against its own
 * invariants and against the same bytes parsed whole; the UTF-8 validator against a naive one.
 *
 * Input: byte 0 picks the number of piece sizes (low 4 bits, plus one) and max_message (top 3
 * bits); the next bytes are the piece sizes, cycled; the rest is the stream, parsed as a server. */
#include "fuzz.h"
#include "ws.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static uint64_t fnv(uint64_t h, const void *p, size_t len)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < len; i++)
        h = (h ^ b[i]) * UINT64_C(0x100000001b3);
    return h;
}

/* What a caller can observe, independent of how the bytes were split: complete messages, control
 * events and the error. */
struct run {
    uint64_t max;
    uint64_t log;      /* hash of the items so far */
    uint64_t msg_hash; /* hash of the current message's bytes */
    uint64_t msg_len;
    uint32_t msg_utf8;
    int msg_op;
    int items;
    const char *error;
    uint16_t error_code;
};

static void run_item(struct run *r, int type, int op, uint16_t code, uint64_t h, uint64_t len)
{
    uint64_t item[5] = {(uint64_t)type, (uint64_t)op, code, h, len};
    r->log = fnv(r->log, item, sizeof(item));
    r->items++;
}

static void check_event(struct run *r, const struct ws_event *ev, const uint8_t *buf, size_t used)
{
    switch (ev->type) {
    case WS_EV_DATA:
        REQUIRE(ev->opcode == WS_OP_TEXT || ev->opcode == WS_OP_BINARY);
        REQUIRE(!r->msg_op || r->msg_op == ev->opcode);
        REQUIRE(ev->len == 0 || (ev->data >= buf && ev->data + ev->len <= buf + used));
        if (!r->msg_op) {
            r->msg_op = ev->opcode;
            r->msg_hash = UINT64_C(0xcbf29ce484222325);
            r->msg_len = 0;
            r->msg_utf8 = WS_UTF8_ACCEPT;
        }
        r->msg_hash = fnv(r->msg_hash, ev->data, ev->len);
        r->msg_len += ev->len;
        REQUIRE(r->msg_len <= r->max);
        if (ev->opcode == WS_OP_TEXT)
            REQUIRE(ws_utf8_feed(&r->msg_utf8, ev->data, ev->len) == 0);
        if (ev->fin) {
            REQUIRE(r->msg_utf8 == WS_UTF8_ACCEPT);
            run_item(r, WS_EV_DATA, ev->opcode, 0, r->msg_hash, r->msg_len);
            r->msg_op = 0;
        }
        break;
    case WS_EV_PING:
    case WS_EV_PONG:
        REQUIRE(ev->len <= WS_MAX_CONTROL_PAYLOAD);
        REQUIRE(ev->data + ev->len <= buf + used);
        run_item(r, ev->type, 0, 0, fnv(0, ev->data, ev->len), ev->len);
        break;
    case WS_EV_CLOSE:
        REQUIRE(ev->len <= WS_MAX_CONTROL_PAYLOAD - 2);
        REQUIRE(ev->code == WS_CLOSE_NO_STATUS ? ev->len == 0 : ws_close_code_valid(ev->code));
        REQUIRE(ws_utf8_valid(ev->data, ev->len));
        run_item(r, ev->type, 0, ev->code, fnv(0, ev->data, ev->len), ev->len);
        break;
    case WS_EV_ERROR:
        REQUIRE(ev->code == WS_CLOSE_PROTOCOL || ev->code == WS_CLOSE_INVALID_DATA ||
                ev->code == WS_CLOSE_TOO_BIG);
        REQUIRE(ev->error && ev->error[0]);
        r->error = ev->error;
        r->error_code = ev->code;
        break;
    default:
        REQUIRE(0);
    }
}

/* The caller's loop: append each piece to the unconsumed bytes, parse until more is needed. */
static void feed(struct run *r, const uint8_t *stream, size_t len, const size_t *piece, size_t npiece)
{
    struct ws_parser p;
    uint8_t *buf = malloc(len + 1);
    size_t have = 0, pos = 0, k = 0;

    ws_parser_init(&p, WS_ROLE_SERVER, r->max);
    while (pos < len && !r->error) {
        size_t n = piece[k++ % npiece];
        if (n > len - pos)
            n = len - pos;
        memcpy(buf + have, stream + pos, n);
        have += n;
        pos += n;
        for (;;) {
            struct ws_event ev;
            size_t used = (size_t)-1;
            int got = ws_parse(&p, buf, have, &used, &ev);

            REQUIRE(used <= have);
            if (!got) {
                /* the caller's memory bound: only a partial header or control frame waits */
                REQUIRE(have - used <= WS_MAX_PENDING);
                memmove(buf, buf + used, have - used);
                have -= used;
                break;
            }
            REQUIRE(used > 0 || ev.type == WS_EV_ERROR); /* progress */
            check_event(r, &ev, buf, used);
            memmove(buf, buf + used, have - used);
            have -= used;
            if (ev.type == WS_EV_ERROR)
                break;
        }
    }
    if (r->error) {
        /* failed for good: the same error again, everything consumed */
        struct ws_event ev;
        size_t used = 0, n = len - pos < 7 ? len - pos : 7;
        memcpy(buf, stream + pos, n);
        REQUIRE(ws_parse(&p, buf, n, &used, &ev) == 1);
        REQUIRE(ev.type == WS_EV_ERROR && ev.error == r->error && used == n);
    }
    free(buf);
}

/* A plain reading of RFC 3629: the index of the first byte that cannot continue valid UTF-8. */
static long ref_utf8(const uint8_t *s, size_t n, int *complete)
{
    size_t i = 0;
    *complete = 0;
    while (i < n) {
        uint8_t c = s[i], lo = 0x80, hi = 0xBF;
        size_t need;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c == 0xE0)
            need = 2, lo = 0xA0;
        else if (c == 0xED)
            need = 2, hi = 0x9F;
        else if (c >= 0xE1 && c <= 0xEF)
            need = 2;
        else if (c == 0xF0)
            need = 3, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3)
            need = 3;
        else if (c == 0xF4)
            need = 3, hi = 0x8F;
        else
            return (long)i;
        for (size_t k = 1; k <= need; k++) {
            if (i + k >= n)
                return -1;
            if (s[i + k] < (k == 1 ? lo : 0x80) || s[i + k] > (k == 1 ? hi : 0xBF))
                return (long)(i + k);
        }
        i += need + 1;
    }
    *complete = 1;
    return -1;
}

static void check_utf8(const uint8_t *s, size_t len, const size_t *piece, size_t npiece)
{
    int complete;
    long bad = ref_utf8(s, len, &complete);
    uint32_t st = WS_UTF8_ACCEPT;
    size_t pos = 0, k = 0;

    REQUIRE(ws_utf8_valid(s, len) == (bad < 0 && complete));
    /* in pieces: no failure before the piece holding the bad byte, failure in it */
    while (pos < len) {
        size_t n = piece[k++ % npiece];
        if (n > len - pos)
            n = len - pos;
        int res = ws_utf8_feed(&st, s + pos, n);
        if (bad >= 0 && (size_t)bad < pos + n) {
            REQUIRE(res == -1);
            break;
        }
        REQUIRE(res == 0);
        pos += n;
    }
    if (bad < 0)
        REQUIRE((st == WS_UTF8_ACCEPT) == complete);
}

/* The encoder's output parses back: the stream as a binary frame, and as a close reason. */
static void check_encoders(const uint8_t *s, size_t len, uint16_t code)
{
    static const uint8_t key[4] = {0xa5, 0x01, 0x7e, 0xff};
    uint8_t *frame = malloc(len + WS_MAX_HEADER), out[WS_MAX_PENDING];
    char reason[WS_MAX_PENDING];
    struct ws_parser p;
    struct ws_event ev;
    size_t used, h = ws_frame_header(frame, WS_OP_BINARY, 1, len, key), n;

    memcpy(frame + h, s, len);
    ws_mask(frame + h, len, key, 0);
    ws_parser_init(&p, WS_ROLE_SERVER, len);
    REQUIRE(ws_parse(&p, frame, h + len, &used, &ev) == 1);
    REQUIRE(ev.type == WS_EV_DATA && ev.fin && ev.len == len && used == h + len);
    REQUIRE(len == 0 || memcmp(ev.data, s, len) == 0);
    free(frame);

    n = len < sizeof(reason) - 1 ? len : sizeof(reason) - 1;
    memcpy(reason, s, n);
    reason[n] = 0;
    n = ws_close_frame(out, code, reason);
    REQUIRE(n <= WS_MAX_PENDING);
    ws_parser_init(&p, WS_ROLE_CLIENT, 0);
    REQUIRE(ws_parse(&p, out, n, &used, &ev) == 1);
    if (code == 0 || code == WS_CLOSE_NO_STATUS) {
        REQUIRE(ev.type == WS_EV_CLOSE && ev.code == WS_CLOSE_NO_STATUS && n == 2);
    } else if (ws_close_code_valid(code)) {
        REQUIRE(ev.type == WS_EV_CLOSE && ev.code == code && used == n);
        REQUIRE(memcmp(ev.data, reason, ev.len) == 0);
    } else {
        REQUIRE(ev.type == WS_EV_ERROR && ev.code == WS_CLOSE_PROTOCOL);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint64_t maxes[8] = {0, 1, 125, 126, 1000, 65536, 1 << 20, UINT64_MAX};
    size_t piece[16], npiece, whole = (size_t)-1;
    struct run a, b;

    if (size < 1)
        return 0;
    npiece = (size_t)(data[0] & 15) + 1;
    if (size < 1 + npiece)
        return 0;
    for (size_t i = 0; i < npiece; i++) {
        uint8_t v = data[1 + i];
        piece[i] = v < 0xF0 ? (size_t)v + 1 : (size_t)(v - 0xEF) * 1000;
    }
    const uint8_t *stream = data + 1 + npiece;
    size_t len = size - 1 - npiece;

    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    a.max = b.max = maxes[data[0] >> 5];
    feed(&a, stream, len, piece, npiece);
    feed(&b, stream, len, &whole, 1);
    REQUIRE(a.items == b.items && a.log == b.log);
    REQUIRE(a.error == b.error && a.error_code == b.error_code);

    check_utf8(stream, len, piece, npiece);
    check_utf8(data, size, &whole, 1);
    check_encoders(stream, len, (uint16_t)(data[0] << 8 | data[1]));
    return 0;
}
