/* test_ws.c - the RFC 6455 module: framing round trips, every protocol error, incremental feeding,
 * UTF-8 validation, close frames and the handshake keys. */
#include "ws.h"

#include <stdlib.h>
#include <string.h>

#include "test.h"

static const uint8_t test_key[4] = {0x37, 0xfa, 0x21, 0x3d};

/* ---- helpers ---------------------------------------------------------------------------------- */

/* Append a frame as the peer would send it: masked when the receiver is a server. */
static size_t put_frame(uint8_t *out, int opcode, int fin, const void *payload, size_t len,
                        enum ws_role receiver)
{
    const uint8_t *mask = receiver == WS_ROLE_SERVER ? test_key : NULL;
    size_t h = ws_frame_header(out, opcode, fin, len, mask);

    if (len)
        memcpy(out + h, payload, len);
    if (mask)
        ws_mask(out + h, len, mask, 0);
    return h + len;
}

/* What a caller sees, normalized so that any feeding pattern must give the same bytes: complete
 * messages, control events and the error, serialized into one buffer. */
struct sink {
    uint8_t *log;
    size_t log_len, log_cap;
    uint8_t *msg;
    size_t msg_len, msg_cap;
    int msg_op;
    int messages, pings, pongs, closes, errors, chunks;
    uint16_t error_code;
    size_t max_pending;
    int bad; /* an invariant broke */
};

static void grow(uint8_t **p, size_t *cap, size_t need)
{
    if (need <= *cap)
        return;
    while (*cap < need)
        *cap = *cap ? *cap * 2 : 256;
    *p = realloc(*p, *cap);
    if (!*p)
        abort();
}

static void log_put(struct sink *s, const void *data, size_t len)
{
    grow(&s->log, &s->log_cap, s->log_len + len);
    if (len)
        memcpy(s->log + s->log_len, data, len);
    s->log_len += len;
}

static void log_item(struct sink *s, int type, int opcode, uint16_t code, const void *data, size_t len)
{
    uint8_t h[4] = {(uint8_t)type, (uint8_t)opcode, (uint8_t)(code >> 8), (uint8_t)code};
    uint64_t l = len;

    log_put(s, h, 4);
    log_put(s, &l, sizeof(l));
    log_put(s, data, len);
}

static void sink_event(struct sink *s, const struct ws_event *ev)
{
    switch (ev->type) {
    case WS_EV_DATA:
        s->chunks++;
        if (s->msg_op && s->msg_op != ev->opcode)
            s->bad = 1;
        if (ev->opcode != WS_OP_TEXT && ev->opcode != WS_OP_BINARY)
            s->bad = 1;
        s->msg_op = ev->opcode;
        grow(&s->msg, &s->msg_cap, s->msg_len + ev->len);
        if (ev->len)
            memcpy(s->msg + s->msg_len, ev->data, ev->len);
        s->msg_len += ev->len;
        if (ev->fin) {
            log_item(s, WS_EV_DATA, ev->opcode, 0, s->msg, s->msg_len);
            s->messages++;
            s->msg_len = 0;
            s->msg_op = 0;
        }
        break;
    case WS_EV_PING:
    case WS_EV_PONG:
        if (ev->len > WS_MAX_CONTROL_PAYLOAD)
            s->bad = 1;
        if (ev->type == WS_EV_PING)
            s->pings++;
        else
            s->pongs++;
        log_item(s, ev->type, 0, 0, ev->data, ev->len);
        break;
    case WS_EV_CLOSE:
        s->closes++;
        log_item(s, ev->type, 0, ev->code, ev->data, ev->len);
        break;
    case WS_EV_ERROR:
        s->errors++;
        s->error_code = ev->code;
        if (!ev->error || !ev->error[0])
            s->bad = 1;
        log_item(s, ev->type, 0, ev->code, ev->error, strlen(ev->error));
        break;
    }
}

static void sink_free(struct sink *s)
{
    free(s->log);
    free(s->msg);
    memset(s, 0, sizeof(*s));
}

/* Feed stream the way the connection code does: append what arrived to the unconsumed bytes, parse
 * until ws_parse wants more, keep the rest. Pieces have sizes piece[0], piece[1], ... cycling;
 * a 0 piece size means "everything at once". Stops at the first error. */
static void feed(struct sink *s, enum ws_role role, uint64_t max, const uint8_t *stream, size_t len,
                 const size_t *piece, size_t npiece)
{
    struct ws_parser p;
    uint8_t *buf = malloc(len + 1);
    size_t have = 0, pos = 0, k = 0;

    memset(s, 0, sizeof(*s));
    ws_parser_init(&p, role, max);
    while (pos < len && !s->errors) {
        size_t n = piece[k++ % npiece];
        if (n == 0 || n > len - pos)
            n = len - pos;
        memcpy(buf + have, stream + pos, n);
        have += n;
        pos += n;
        for (;;) {
            struct ws_event ev;
            size_t used = (size_t)-1;
            int r = ws_parse(&p, buf, have, &used, &ev);
            if (used > have) {
                s->bad = 1;
                break;
            }
            if (r && ev.type == WS_EV_DATA &&
                (ev.data < buf || ev.data + ev.len > buf + used))
                s->bad = 1;
            if (r)
                sink_event(s, &ev); /* before the memmove: ev.data points into buf */
            memmove(buf, buf + used, have - used);
            have -= used;
            if (!r || ev.type == WS_EV_ERROR)
                break;
        }
        if (have > s->max_pending)
            s->max_pending = have;
    }
    free(buf);
}

static void feed_whole(struct sink *s, enum ws_role role, uint64_t max, const uint8_t *stream,
                       size_t len)
{
    size_t whole = 0;
    feed(s, role, max, stream, len, &whole, 1);
}

/* Parse one buffer given whole; return the first event's type (or -1 when none). */
static int parse_one(enum ws_role role, uint64_t max, uint8_t *buf, size_t len, struct ws_event *ev,
                     size_t *used)
{
    struct ws_parser p;
    ws_parser_init(&p, role, max);
    return ws_parse(&p, buf, len, used, ev) ? (int)ev->type : -1;
}

/* Expect buf (fed whole to a fresh parser) to fail with code, and keep failing afterwards. */
static void expect_error(enum ws_role role, uint64_t max, const uint8_t *bytes, size_t len, int code,
                         int line)
{
    struct ws_parser p;
    struct ws_event ev;
    uint8_t buf[256];
    size_t used = 0;
    int r, type;

    memcpy(buf, bytes, len);
    ws_parser_init(&p, role, max);
    /* Skip past the legitimate events preceding the error. */
    for (size_t off = 0;; off += used) {
        r = ws_parse(&p, buf + off, len - off, &used, &ev);
        if (!r || ev.type == WS_EV_ERROR)
            break;
    }
    type = r ? (int)ev.type : -1;
    test_checks++;
    if (type != WS_EV_ERROR || ev.code != code || !ev.error) {
        test_failures++;
        fprintf(stderr, "%s:%d: expected error %d, got type %d code %d\n", __FILE__, line, code,
                type, type >= 0 ? ev.code : 0);
        return;
    }
    /* The parser stays failed and swallows whatever comes next. */
    r = ws_parse(&p, buf, 5, &used, &ev);
    CHECK(r == 1 && ev.type == WS_EV_ERROR && ev.code == code && used == 5);
}

#define EXPECT_ERROR(role, max, code, ...)                                                         \
    do {                                                                                           \
        static const uint8_t b_[] = {__VA_ARGS__};                                                 \
        expect_error(role, max, b_, sizeof(b_), code, __LINE__);                                   \
    } while (0)

/* ---- UTF-8 ------------------------------------------------------------------------------------ */

/* Byte at which feeding one byte at a time fails, or -1; *complete tells whether it ended in the
 * accept state. */
static long utf8_fail_at(const uint8_t *s, size_t n, int *complete)
{
    uint32_t st = WS_UTF8_ACCEPT;
    for (size_t i = 0; i < n; i++)
        if (ws_utf8_feed(&st, s + i, 1) < 0) {
            *complete = 0;
            return (long)i;
        }
    *complete = st == WS_UTF8_ACCEPT;
    return -1;
}

/* A deliberately naive reference: where the first byte that cannot continue valid UTF-8 is. */
static long ref_fail_at(const uint8_t *s, size_t n, int *complete)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        int need;
        uint8_t lo = 0x80, hi = 0xBF;
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
        else if (c == 0xF4)
            need = 3, hi = 0x8F;
        else if (c >= 0xF1 && c <= 0xF3)
            need = 3;
        else {
            *complete = 0;
            return (long)i;
        }
        for (int k = 1; k <= need; k++) {
            if (i + (size_t)k >= n) {
                *complete = 0;
                return -1;
            }
            uint8_t b = s[i + (size_t)k];
            if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) {
                *complete = 0;
                return (long)(i + (size_t)k);
            }
        }
        i += (size_t)need + 1;
    }
    *complete = 1;
    return -1;
}

static size_t encode_utf8(uint32_t cp, uint8_t *out)
{
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | cp >> 6);
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | cp >> 12);
        out[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | cp >> 18);
    out[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

struct utf8_case {
    const char *s;
    size_t len;    /* 0: strlen */
    long fail_at;  /* -1: never fails */
    int complete;  /* when it does not fail: ends on a character boundary */
};

static void test_utf8_cases(void)
{
    static const struct utf8_case cases[] = {
        {"", 0, -1, 1},
        {"Hello, world", 0, -1, 1},
        {"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", 0, -1, 1}, /* kosme, Kuhn 1 */
        /* 2.1 first sequence of each length */
        {"\x00", 1, -1, 1},
        {"\xc2\x80", 0, -1, 1},
        {"\xe0\xa0\x80", 0, -1, 1},
        {"\xf0\x90\x80\x80", 0, -1, 1},
        /* 2.2 last sequence of each length that is still valid */
        {"\x7f", 0, -1, 1},
        {"\xdf\xbf", 0, -1, 1},
        {"\xef\xbf\xbf", 0, -1, 1},
        {"\xf4\x8f\xbf\xbf", 0, -1, 1}, /* U+10FFFF */
        /* 2.3 other boundaries */
        {"\xed\x9f\xbf", 0, -1, 1},     /* U+D7FF */
        {"\xee\x80\x80", 0, -1, 1},     /* U+E000 */
        {"\xef\xbf\xbd", 0, -1, 1},     /* U+FFFD */
        {"\xef\xbf\xbe", 0, -1, 1},     /* U+FFFE: a noncharacter, still valid UTF-8 */
        {"\xf0\x9f\x98\x80", 0, -1, 1}, /* U+1F600 */
        /* beyond Unicode and longer-than-4 sequences */
        {"\xf4\x90\x80\x80", 0, 1, 0}, /* U+110000 */
        {"\xf7\xbf\xbf\xbf", 0, 0, 0},
        {"\xf8\x88\x80\x80\x80", 0, 0, 0},
        {"\xfc\x84\x80\x80\x80\x80", 0, 0, 0},
        {"\xf5", 0, 0, 0},
        {"\xfe", 0, 0, 0},
        {"\xff", 0, 0, 0},
        {"\xfe\xfe\xff\xff", 0, 0, 0},
        /* 3.1 unexpected continuation bytes */
        {"\x80", 0, 0, 0},
        {"\xbf", 0, 0, 0},
        {"\x80\xbf", 0, 0, 0},
        {"a\x80", 0, 1, 0},
        {"\xc2\x80\x80", 0, 2, 0},
        /* 3.2 lonely start characters */
        {"\xc0 ", 0, 0, 0},
        {"\xc2 ", 0, 1, 0},
        {"\xdf ", 0, 1, 0},
        {"\xe0 ", 0, 1, 0},
        {"\xef ", 0, 1, 0},
        {"\xf0 ", 0, 1, 0},
        {"\xf4 ", 0, 1, 0},
        /* 3.3 sequences with the last byte missing: a valid prefix, not complete */
        {"\xc2", 0, -1, 0},
        {"\xe0\xa0", 0, -1, 0},
        {"\xf0\x90\x80", 0, -1, 0},
        {"\xf4\x8f\xbf", 0, -1, 0},
        {"\xe1", 0, -1, 0},
        {"\xdf\xef\xbf", 0, 1, 0}, /* 3.4 concatenated incomplete sequences */
        /* 4.1 overlong ASCII */
        {"\xc0\xaf", 0, 0, 0},
        {"\xe0\x80\xaf", 0, 1, 0},
        {"\xf0\x80\x80\xaf", 0, 1, 0},
        /* 4.2 maximum overlongs */
        {"\xc1\xbf", 0, 0, 0},
        {"\xe0\x9f\xbf", 0, 1, 0},
        {"\xf0\x8f\xbf\xbf", 0, 1, 0},
        /* 4.3 overlong NUL */
        {"\xc0\x80", 0, 0, 0},
        {"\xe0\x80\x80", 0, 1, 0},
        /* 5.1 single surrogates */
        {"\xed\xa0\x80", 0, 1, 0},
        {"\xed\xad\xbf", 0, 1, 0},
        {"\xed\xae\x80", 0, 1, 0},
        {"\xed\xaf\xbf", 0, 1, 0},
        {"\xed\xb0\x80", 0, 1, 0},
        {"\xed\xbe\x80", 0, 1, 0},
        {"\xed\xbf\xbf", 0, 1, 0},
        /* 5.2 paired surrogates */
        {"\xed\xa0\x80\xed\xb0\x80", 0, 1, 0},
        {"\xed\xaf\xbf\xed\xbf\xbf", 0, 1, 0},
        /* errors after an ASCII run, inside the word-at-a-time path */
        {"0123456789abcdef\x80", 0, 16, 0},
        {"0123456789abcdefg\xff", 0, 17, 0},
        {"01234567\xc3\xa9" "89abcdefghij\xed\xa0\x80", 0, 23, 0},
        {"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64", 0, 12, 0},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const uint8_t *s = (const uint8_t *)cases[i].s;
        size_t n = cases[i].len ? cases[i].len : strlen(cases[i].s);
        int complete, ref_complete;
        long at = utf8_fail_at(s, n, &complete);
        long ref = ref_fail_at(s, n, &ref_complete);
        uint32_t st = WS_UTF8_ACCEPT;
        int whole = ws_utf8_feed(&st, s, n);

        test_checks++;
        if (at != cases[i].fail_at || (at < 0 && complete != cases[i].complete) || ref != at ||
            ref_complete != complete) {
            test_failures++;
            fprintf(stderr, "utf8 case %zu: fail at %ld (want %ld, ref %ld), complete %d (want %d)\n",
                    i, at, cases[i].fail_at, ref, complete, cases[i].complete);
        }
        CHECK_EQ(whole, at >= 0 ? -1 : 0);
        CHECK_EQ(ws_utf8_valid(s, n), at < 0 && complete);
        if (at >= 0) {
            /* the prefix before the failing byte is still a valid prefix */
            st = WS_UTF8_ACCEPT;
            CHECK_EQ(ws_utf8_feed(&st, s, (size_t)at), 0);
            CHECK_EQ(ws_utf8_feed(&st, s + at, 1), -1);
            /* and the failure sticks */
            CHECK_EQ(ws_utf8_feed(&st, (const uint8_t *)"a", 1), -1);
        }
    }
    CHECK(ws_utf8_valid(NULL, 0));
}

/* Every scalar value encodes to valid UTF-8; every surrogate fails at its second byte. */
static void test_utf8_all_code_points(void)
{
    int bad = 0;
    for (uint32_t cp = 0; cp <= 0x10FFFF; cp++) {
        uint8_t b[4];
        size_t n = encode_utf8(cp, b);
        int complete;
        long at = utf8_fail_at(b, n, &complete);
        int surrogate = cp >= 0xD800 && cp <= 0xDFFF;
        if (surrogate ? at != 1 : (at != -1 || !complete || !ws_utf8_valid(b, n)))
            bad++;
    }
    CHECK_EQ(bad, 0);
    /* 0x110000 and beyond, with the 4-byte pattern */
    for (uint32_t cp = 0x110000; cp < 0x200000; cp += 0x1111) {
        uint8_t b[4];
        int complete;
        encode_utf8(cp, b);
        CHECK_EQ(utf8_fail_at(b, 4, &complete), b[0] == 0xF4 ? 1 : 0);
    }
    /* overlong encodings of every code point that has a shorter form */
    for (uint32_t cp = 0; cp < 0x10000; cp += (cp < 0x800 ? 1 : 0x3F)) {
        uint8_t b[4];
        int complete;
        if (cp < 0x80) { /* as 2 bytes */
            b[0] = (uint8_t)(0xC0 | cp >> 6);
            b[1] = (uint8_t)(0x80 | (cp & 0x3F));
            CHECK_EQ(utf8_fail_at(b, 2, &complete), 0);
        }
        if (cp < 0x800) { /* as 3 bytes */
            b[0] = 0xE0;
            b[1] = (uint8_t)(0x80 | cp >> 6);
            b[2] = (uint8_t)(0x80 | (cp & 0x3F));
            CHECK_EQ(utf8_fail_at(b, 3, &complete), 1);
        }
        /* as 4 bytes */
        b[0] = 0xF0;
        b[1] = (uint8_t)(0x80 | cp >> 12);
        b[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
        b[3] = (uint8_t)(0x80 | (cp & 0x3F));
        CHECK_EQ(utf8_fail_at(b, 4, &complete), 1);
    }
}

/* The DFA against the naive reference: all 1- and 2-byte strings, and 3- and 4-byte strings built
 * from the bytes around every class boundary. */
static void test_utf8_exhaustive(void)
{
    static const uint8_t edges[] = {0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0,
                                    0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0,
                                    0xF1, 0xF3, 0xF4, 0xF5, 0xF8, 0xFF};
    const size_t ne = sizeof(edges);
    int mismatches = 0;

    for (unsigned a = 0; a < 256; a++)
        for (unsigned b = 0; b < 257; b++) {
            uint8_t s[2] = {(uint8_t)a, (uint8_t)b};
            size_t n = b == 256 ? 1 : 2;
            int c1, c2;
            if (utf8_fail_at(s, n, &c1) != ref_fail_at(s, n, &c2) || c1 != c2)
                mismatches++;
        }
    for (unsigned a = 0xC0; a < 256; a++)
        for (size_t i = 0; i < ne; i++)
            for (size_t j = 0; j < ne; j++)
                for (size_t k = 0; k <= ne; k++) {
                    uint8_t s[4] = {(uint8_t)a, edges[i], edges[j], k < ne ? edges[k] : 0};
                    size_t n = k < ne ? 4 : 3;
                    int c1, c2;
                    if (utf8_fail_at(s, n, &c1) != ref_fail_at(s, n, &c2) || c1 != c2)
                        mismatches++;
                    if (ws_utf8_valid(s, n) != (ref_fail_at(s, n, &c2) < 0 && c2))
                        mismatches++;
                }
    CHECK_EQ(mismatches, 0);
}

/* A long text with an error planted at every position of a long ASCII run: the word-at-a-time
 * path must not skip past it. */
static void test_utf8_ascii_runs(void)
{
    uint8_t s[80];
    int misses = 0;
    for (size_t bad = 0; bad < sizeof(s); bad++)
        for (size_t start = 0; start < 9; start++) {
            int complete;
            memset(s, 'x', sizeof(s));
            s[bad] = 0x80;
            if (utf8_fail_at(s + start, sizeof(s) - start, &complete) !=
                (bad >= start ? (long)(bad - start) : -1))
                misses++;
            uint32_t st = WS_UTF8_ACCEPT;
            if (ws_utf8_feed(&st, s + start, sizeof(s) - start) != (bad >= start ? -1 : 0))
                misses++;
        }
    CHECK_EQ(misses, 0);
}

/* Valid multi-byte text split at every offset into two feeds stays valid. */
static void test_utf8_split(void)
{
    static const char text[] = "Hello-\xc2\xb5@\xc3\x9f\xc3\xb6\xc3\xa4\xc3\xbc\xc3\xa0\xc3\xa1-UTF-8!! "
                               "\xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf \xed\x9f\xbf";
    const size_t n = sizeof(text) - 1;
    for (size_t cut = 0; cut <= n; cut++) {
        uint32_t st = WS_UTF8_ACCEPT;
        CHECK_EQ(ws_utf8_feed(&st, (const uint8_t *)text, cut), 0);
        CHECK_EQ(ws_utf8_feed(&st, (const uint8_t *)text + cut, n - cut), 0);
        CHECK_EQ(st, WS_UTF8_ACCEPT);
    }
}

/* ---- framing ---------------------------------------------------------------------------------- */

static void test_mask(void)
{
    uint8_t a[64 + 8], b[64 + 8];
    int bad = 0;
    for (size_t align = 0; align < 8; align++)
        for (size_t len = 0; len <= 40; len++)
            for (size_t pos = 0; pos < 4; pos++) {
                for (size_t i = 0; i < len; i++)
                    a[align + i] = b[align + i] = (uint8_t)(i * 7 + len);
                ws_mask(a + align, len, test_key, pos);
                for (size_t i = 0; i < len; i++)
                    if (a[align + i] != (uint8_t)(b[align + i] ^ test_key[(pos + i) & 3]))
                        bad++;
                ws_mask(a + align, len, test_key, pos);
                if (memcmp(a + align, b + align, len))
                    bad++;
            }
    CHECK_EQ(bad, 0);

    /* masking in two pieces with a running offset equals masking at once */
    for (size_t cut = 0; cut <= 33; cut++) {
        for (size_t i = 0; i < 33; i++)
            a[i] = b[i] = (uint8_t)i;
        ws_mask(a, 33, test_key, 0);
        ws_mask(b, cut, test_key, 0);
        ws_mask(b + cut, 33 - cut, test_key, cut & 3);
        CHECK(memcmp(a, b, 33) == 0);
    }
}

static void test_frame_header(void)
{
    uint8_t h[WS_MAX_HEADER];

    CHECK_EQ(ws_frame_header(h, WS_OP_TEXT, 1, 0, NULL), 2);
    CHECK_EQ(h[0], 0x81);
    CHECK_EQ(h[1], 0x00);
    CHECK_EQ(ws_frame_header(h, WS_OP_BINARY, 0, 125, NULL), 2);
    CHECK_EQ(h[0], 0x02);
    CHECK_EQ(h[1], 125);
    CHECK_EQ(ws_frame_header(h, WS_OP_CONT, 1, 126, NULL), 4);
    CHECK_EQ(h[0], 0x80);
    CHECK_EQ(h[1], 126);
    CHECK_EQ(h[2], 0x00);
    CHECK_EQ(h[3], 126);
    CHECK_EQ(ws_frame_header(h, WS_OP_BINARY, 1, 65535, NULL), 4);
    CHECK_EQ(h[1], 126);
    CHECK_EQ(h[2], 0xFF);
    CHECK_EQ(h[3], 0xFF);
    CHECK_EQ(ws_frame_header(h, WS_OP_BINARY, 1, 65536, NULL), 10);
    CHECK_EQ(h[1], 127);
    CHECK(memcmp(h + 2, "\x00\x00\x00\x00\x00\x01\x00\x00", 8) == 0);
    CHECK_EQ(ws_frame_header(h, WS_OP_BINARY, 1, UINT64_C(0x0102030405060708), NULL), 10);
    CHECK(memcmp(h + 2, "\x01\x02\x03\x04\x05\x06\x07\x08", 8) == 0);

    CHECK_EQ(ws_frame_header(h, WS_OP_PING, 1, 5, test_key), 6);
    CHECK_EQ(h[0], 0x89);
    CHECK_EQ(h[1], 0x85);
    CHECK(memcmp(h + 2, test_key, 4) == 0);
    CHECK_EQ(ws_frame_header(h, WS_OP_TEXT, 1, 300, test_key), 8);
    CHECK_EQ(h[1], 0xFE);
    CHECK(memcmp(h + 4, test_key, 4) == 0);
    CHECK_EQ(ws_frame_header(h, WS_OP_TEXT, 1, 70000, test_key), 14);
    CHECK_EQ(h[1], 0xFF);
    CHECK(memcmp(h + 10, test_key, 4) == 0);
}

/* Every length form, in both roles, for text and binary. */
static void test_round_trip(void)
{
    static const size_t lens[] = {0, 1, 125, 126, 127, 65535, 65536, 70001};
    static const int ops[] = {WS_OP_TEXT, WS_OP_BINARY};
    static const size_t hdr_len[] = {2, 2, 2, 4, 4, 4, 10, 10};
    size_t cap = 70001 + WS_MAX_HEADER;
    uint8_t *frame = malloc(cap), *payload = malloc(cap);

    for (size_t i = 0; i < cap; i++)
        payload[i] = (uint8_t)(' ' + i % 90);
    for (int role = WS_ROLE_SERVER; role <= WS_ROLE_CLIENT; role++)
        for (size_t o = 0; o < 2; o++)
            for (size_t l = 0; l < sizeof(lens) / sizeof(lens[0]); l++) {
                struct ws_event ev;
                size_t used, n = put_frame(frame, ops[o], 1, payload, lens[l], (enum ws_role)role);

                CHECK_EQ(n, hdr_len[l] + (role == WS_ROLE_SERVER ? 4 : 0) + lens[l]);
                CHECK_EQ(parse_one((enum ws_role)role, 1 << 20, frame, n, &ev, &used), WS_EV_DATA);
                CHECK_EQ(used, n);
                CHECK_EQ(ev.opcode, ops[o]);
                CHECK_EQ(ev.fin, 1);
                CHECK_EQ(ev.len, lens[l]);
                CHECK(ev.len == 0 || memcmp(ev.data, payload, ev.len) == 0);
                CHECK(ev.data == frame + n - lens[l]);
            }
    free(frame);
    free(payload);
}

/* The parser never consumes a partial header or a partial control frame; data is streamed. */
static void test_incremental(void)
{
    uint8_t buf[256], payload[100];
    struct ws_parser p;
    struct ws_event ev;
    size_t n, used;

    for (size_t i = 0; i < sizeof(payload); i++)
        payload[i] = (uint8_t)i;

    /* a 64-bit-length masked header: 14 bytes, none consumed until all are here */
    n = ws_frame_header(buf, WS_OP_BINARY, 1, 70000, test_key);
    CHECK_EQ(n, 14);
    ws_parser_init(&p, WS_ROLE_SERVER, 1 << 20);
    for (size_t k = 0; k < n; k++) {
        used = 99;
        CHECK_EQ(ws_parse(&p, buf, k, &used, &ev), 0);
        CHECK_EQ(used, 0);
    }
    used = 99;
    CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 0); /* header complete, no payload yet */
    CHECK_EQ(used, n);
    CHECK_EQ(p.frame_left, 70000);

    /* partial data payload is handed out, with fin=0 until the end */
    ws_parser_init(&p, WS_ROLE_SERVER, 1 << 20);
    n = put_frame(buf, WS_OP_BINARY, 1, payload, 100, WS_ROLE_SERVER);
    CHECK_EQ(ws_parse(&p, buf, 6 + 30, &used, &ev), 1);
    CHECK_EQ(used, 36);
    CHECK(ev.type == WS_EV_DATA && ev.len == 30 && ev.fin == 0 && ev.opcode == WS_OP_BINARY);
    CHECK(memcmp(ev.data, payload, 30) == 0);
    CHECK_EQ(ws_parse(&p, buf + 36, 0, &used, &ev), 0);
    CHECK_EQ(used, 0);
    CHECK_EQ(ws_parse(&p, buf + 36, 33, &used, &ev), 1); /* odd size: the mask offset carries */
    CHECK(ev.type == WS_EV_DATA && ev.len == 33 && ev.fin == 0);
    CHECK(memcmp(ev.data, payload + 30, 33) == 0);
    CHECK_EQ(ws_parse(&p, buf + 69, n - 69, &used, &ev), 1);
    CHECK(ev.type == WS_EV_DATA && ev.len == 37 && ev.fin == 1);
    CHECK(memcmp(ev.data, payload + 63, 37) == 0);
    CHECK_EQ(used, n - 69);

    /* a data frame then a partial ping: the ping waits whole in the buffer */
    ws_parser_init(&p, WS_ROLE_SERVER, 1 << 20);
    n = put_frame(buf, WS_OP_TEXT, 1, "hi", 2, WS_ROLE_SERVER);
    size_t ping_at = n;
    n += put_frame(buf + n, WS_OP_PING, 1, payload, 50, WS_ROLE_SERVER);
    CHECK_EQ(ws_parse(&p, buf, n - 1, &used, &ev), 1);
    CHECK(ev.type == WS_EV_DATA && ev.len == 2 && ev.fin == 1);
    CHECK_EQ(used, ping_at);
    for (size_t k = 0; k < n - ping_at; k++) {
        used = 99;
        CHECK_EQ(ws_parse(&p, buf + ping_at, k, &used, &ev), 0);
        CHECK_EQ(used, 0);
    }
    CHECK_EQ(ws_parse(&p, buf + ping_at, n - ping_at, &used, &ev), 1);
    CHECK(ev.type == WS_EV_PING && ev.len == 50 && memcmp(ev.data, payload, 50) == 0);
    CHECK_EQ(used, n - ping_at);

    /* empty frames: final gives an empty fin chunk, non-final gives nothing */
    ws_parser_init(&p, WS_ROLE_CLIENT, 10);
    n = put_frame(buf, WS_OP_TEXT, 0, NULL, 0, WS_ROLE_CLIENT);
    CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 0);
    CHECK_EQ(used, n);
    CHECK_EQ(p.message_op, WS_OP_TEXT);
    n = put_frame(buf, WS_OP_CONT, 0, NULL, 0, WS_ROLE_CLIENT);
    n += put_frame(buf + n, WS_OP_CONT, 1, NULL, 0, WS_ROLE_CLIENT);
    CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 1);
    CHECK(ev.type == WS_EV_DATA && ev.len == 0 && ev.fin == 1 && ev.opcode == WS_OP_TEXT);
    CHECK_EQ(used, n);
    CHECK_EQ(p.message_op, 0);
}

/* Fragmented messages with control frames in between keep their type, content and UTF-8 state. */
static void test_fragmentation(void)
{
    uint8_t buf[512], copy[512];
    static const uint8_t ping_payload[] = {0x00, 0xFF, 0xFE, 0x80, 'p', 0};
    struct sink s;
    struct ws_parser p;
    struct ws_event ev;
    size_t n = 0, off = 0, used;
    /* "Gr\xc3\xbc\xc3\x9f" split inside the second character, with a ping between the halves */
    n += put_frame(buf + n, WS_OP_TEXT, 0, "Gr\xc3", 3, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_PING, 1, ping_payload, sizeof(ping_payload), WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_CONT, 0, "\xbc\xc3", 2, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_PONG, 1, "", 0, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_CONT, 1, "\x9f", 1, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_BINARY, 0, "\xff", 1, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_PING, 1, "x", 1, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_CONT, 1, "\xfe", 1, WS_ROLE_SERVER);
    memcpy(copy, buf, n);

    ws_parser_init(&p, WS_ROLE_SERVER, 1000);
    static const struct {
        int type, opcode, fin;
        const char *data;
        size_t len;
    } want[] = {
        {WS_EV_DATA, WS_OP_TEXT, 0, "Gr\xc3", 3},
        {WS_EV_PING, WS_OP_PING, 0, (const char *)ping_payload, sizeof(ping_payload)},
        {WS_EV_DATA, WS_OP_TEXT, 0, "\xbc\xc3", 2},
        {WS_EV_PONG, WS_OP_PONG, 0, "", 0},
        {WS_EV_DATA, WS_OP_TEXT, 1, "\x9f", 1},
        {WS_EV_DATA, WS_OP_BINARY, 0, "\xff", 1},
        {WS_EV_PING, WS_OP_PING, 0, "x", 1},
        {WS_EV_DATA, WS_OP_BINARY, 1, "\xfe", 1},
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        CHECK_EQ(ws_parse(&p, buf + off, n - off, &used, &ev), 1);
        off += used;
        CHECK_EQ(ev.type, want[i].type);
        if (ev.type == WS_EV_DATA) {
            CHECK_EQ(ev.opcode, want[i].opcode);
            CHECK_EQ(ev.fin, want[i].fin);
        }
        CHECK_EQ(ev.len, want[i].len);
        CHECK(ev.len == 0 || memcmp(ev.data, want[i].data, ev.len) == 0);
    }
    CHECK_EQ(off, n);
    CHECK_EQ(ws_parse(&p, buf + off, 0, &used, &ev), 0);

    /* ws_parse unmasked buf in place, so the second pass must not mask again */
    for (size_t i = 0; i < n; i++)
        buf[i] = copy[i];
    feed_whole(&s, WS_ROLE_SERVER, 1000, buf, n);
    CHECK_EQ(s.messages, 2);
    CHECK_EQ(s.pings, 2);
    CHECK_EQ(s.pongs, 1);
    CHECK_EQ(s.errors, 0);
    sink_free(&s);
}

/* A valid text split into two fragments at every byte offset passes; the same text with one bad
 * byte fails on the chunk that carries it, before the frame is complete. */
static void test_utf8_fragments(void)
{
    static const char text[] = "Hello-\xc2\xb5@\xc3\x9f\xc3\xb6\xc3\xa4\xc3\xbc\xc3\xa0\xc3\xa1-UTF-8!! "
                               "\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf";
    const size_t tn = sizeof(text) - 1;
    uint8_t buf[256];

    for (size_t cut = 0; cut <= tn; cut++)
        for (int third = 0; third < 2; third++) {
            struct sink s;
            size_t n = 0, cut2 = third ? cut + (tn - cut) / 2 : tn;
            n += put_frame(buf + n, WS_OP_TEXT, 0, text, cut, WS_ROLE_SERVER);
            n += put_frame(buf + n, WS_OP_PING, 1, "p", 1, WS_ROLE_SERVER);
            n += put_frame(buf + n, WS_OP_CONT, !third, text + cut, cut2 - cut, WS_ROLE_SERVER);
            if (third)
                n += put_frame(buf + n, WS_OP_CONT, 1, text + cut2, tn - cut2, WS_ROLE_SERVER);
            for (size_t piece = 0; piece < 4; piece++) {
                feed(&s, WS_ROLE_SERVER, 1000, buf, n, &piece, 1);
                CHECK_EQ(s.errors, 0);
                CHECK_EQ(s.messages, 1);
                CHECK_EQ(s.pings, 1);
                /* the log: the ping (12-byte item header, 1 byte), then the message */
                CHECK(s.log_len == 13 + 12 + tn && memcmp(s.log + 25, text, tn) == 0);
                sink_free(&s);
            }
        }

    /* fail fast inside one frame: valid prefix first, then the chunk with the bad byte */
    {
        static const char bad[] = "abcdef\xc3\xa9gh\xed\xa0\x80ijklmnop";
        const size_t bn = sizeof(bad) - 1;
        struct ws_parser p;
        struct ws_event ev;
        size_t n = put_frame(buf, WS_OP_TEXT, 1, bad, bn, WS_ROLE_SERVER), used;
        ws_parser_init(&p, WS_ROLE_SERVER, 1000);
        CHECK_EQ(ws_parse(&p, buf, 6 + 7, &used, &ev), 1); /* "abcdef\xc3" */
        CHECK(ev.type == WS_EV_DATA && ev.len == 7 && ev.fin == 0);
        CHECK_EQ(ws_parse(&p, buf + 13, 5, &used, &ev), 1); /* "\xa9gh\xed\xa0": bad at the end */
        CHECK(ev.type == WS_EV_ERROR && ev.code == 1007);
        CHECK_EQ(n, 6 + bn); /* the frame was far from complete */
    }

    /* fail fast across fragments: F4 ends a fragment, 90 starts the next */
    {
        struct ws_parser p;
        struct ws_event ev;
        size_t n = 0, used, off = 0;
        n += put_frame(buf + n, WS_OP_TEXT, 0, "ok\xf4", 3, WS_ROLE_SERVER);
        n += put_frame(buf + n, WS_OP_CONT, 1, "\x90\x80\x80 and more", 12, WS_ROLE_SERVER);
        ws_parser_init(&p, WS_ROLE_SERVER, 1000);
        CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 1);
        CHECK(ev.type == WS_EV_DATA && ev.len == 3 && ev.fin == 0);
        off = used;
        CHECK_EQ(ws_parse(&p, buf + off, 6 + 1, &used, &ev), 1); /* header + the 0x90 alone */
        CHECK(ev.type == WS_EV_ERROR && ev.code == 1007);
    }

    /* a message that ends inside a character fails at its end */
    EXPECT_ERROR(WS_ROLE_CLIENT, 100, 1007, 0x01, 0x02, 'a', 0xC3, 0x80, 0x00);
    EXPECT_ERROR(WS_ROLE_CLIENT, 100, 1007, 0x81, 0x02, 'a', 0xC3);
    EXPECT_ERROR(WS_ROLE_CLIENT, 100, 1007, 0x81, 0x03, 'a', 0xed, 0xa0);
    /* binary messages are not validated */
    {
        struct ws_event ev;
        size_t used;
        uint8_t b[] = {0x82, 0x02, 0xC0, 0xFF};
        CHECK_EQ(parse_one(WS_ROLE_CLIENT, 100, b, sizeof(b), &ev, &used), WS_EV_DATA);
    }
}

/* Every error the parser reports, with the close code it asks for. */
static void test_errors(void)
{
    const enum ws_role S = WS_ROLE_SERVER, C = WS_ROLE_CLIENT;

    /* reserved bits (no extension is negotiated) */
    EXPECT_ERROR(C, 100, 1002, 0xC1, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0xA1, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0x91, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0xF9, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0xC1); /* one byte is enough to know */
    /* reserved opcodes */
    for (int op = 3; op <= 0xF; op++) {
        uint8_t b[2] = {(uint8_t)(0x80 | op), 0x00};
        if (op >= WS_OP_CLOSE && op <= WS_OP_PONG)
            continue;
        expect_error(C, 100, b, 2, 1002, __LINE__);
        expect_error(C, 100, b, 1, 1002, __LINE__);
        b[0] = (uint8_t)op;
        expect_error(C, 100, b, 2, 1002, __LINE__);
    }
    /* fragmented control frames */
    EXPECT_ERROR(C, 100, 1002, 0x09, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0x0A, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0x08, 0x02, 0x03, 0xE8);
    /* control frames over 125 bytes */
    EXPECT_ERROR(C, 100, 1002, 0x89, 0x7E, 0x00, 0x7E);
    EXPECT_ERROR(C, 100, 1002, 0x8A, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0);
    EXPECT_ERROR(C, 100, 1002, 0x88, 0x7E);
    /* continuation with nothing to continue, also after a finished message */
    EXPECT_ERROR(C, 100, 1002, 0x80, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0x00, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0x81, 0x01, 'a', 0x80, 0x01, 'b');
    /* a new message while a fragmented one is in progress */
    EXPECT_ERROR(C, 100, 1002, 0x01, 0x01, 'a', 0x81, 0x01, 'b');
    EXPECT_ERROR(C, 100, 1002, 0x02, 0x01, 'a', 0x89, 0x00, 0x02, 0x01, 'b');
    EXPECT_ERROR(C, 100, 1002, 0x01, 0x00, 0x02, 0x00);
    /* masking must match the role */
    EXPECT_ERROR(S, 100, 1002, 0x81, 0x00);
    EXPECT_ERROR(S, 100, 1002, 0x89, 0x00);
    EXPECT_ERROR(C, 100, 1002, 0x81, 0x80, 1, 2, 3, 4);
    EXPECT_ERROR(C, 100, 1002, 0x88, 0x80);
    /* 64-bit length with its top bit set: refused on the first length byte */
    EXPECT_ERROR(C, UINT64_MAX, 1002, 0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0);
    EXPECT_ERROR(S, UINT64_MAX, 1002, 0x82, 0xFF, 0xFF);
    /* non-minimal lengths */
    EXPECT_ERROR(C, 1 << 20, 1002, 0x82, 0x7E, 0x00, 0x00);
    EXPECT_ERROR(C, 1 << 20, 1002, 0x82, 0x7E, 0x00, 0x7D);
    EXPECT_ERROR(C, 1 << 20, 1002, 0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0, 0x7D);
    EXPECT_ERROR(C, 1 << 20, 1002, 0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF);
    EXPECT_ERROR(S, 1 << 20, 1002, 0x82, 0xFE, 0x00, 0x05);
    /* messages over max_message: known from the header, before any payload */
    EXPECT_ERROR(C, 100, 1009, 0x82, 0x65);
    EXPECT_ERROR(S, 100, 1009, 0x81, 0xE5);
    EXPECT_ERROR(C, 100, 1009, 0x82, 0x7E, 0x01, 0x00);
    EXPECT_ERROR(C, 1000, 1009, 0x82, 0x7F, 0, 0, 0, 1, 0, 0, 0, 0);
    EXPECT_ERROR(C, 0, 1009, 0x81, 0x01);
    /* close payloads */
    EXPECT_ERROR(C, 100, 1002, 0x88, 0x01, 0x03);
    EXPECT_ERROR(C, 100, 1007, 0x88, 0x04, 0x03, 0xE8, 0xCE, 0x41);
    EXPECT_ERROR(C, 100, 1007, 0x88, 0x03, 0x03, 0xE8, 0xCE);
    EXPECT_ERROR(C, 100, 1007, 0x88, 0x05, 0x03, 0xE8, 0xED, 0xA0, 0x80);
    EXPECT_ERROR(C, 100, 1007, 0x88, 0x03, 0x03, 0xE8, 0xFF);
    /* invalid UTF-8 in text */
    EXPECT_ERROR(C, 100, 1007, 0x81, 0x02, 0xC0, 0x80);
    EXPECT_ERROR(C, 100, 1007, 0x81, 0x04, 0xF4, 0x90, 0x80, 0x80);

    /* every invalid close code fails with 1002; every valid one is reported */
    int bad = 0;
    for (uint32_t code = 0; code <= 0xFFFF; code++) {
        uint8_t b[6] = {0x88, 0x04, (uint8_t)(code >> 8), (uint8_t)code, 'o', 'k'};
        struct ws_event ev;
        size_t used;
        int t = parse_one(C, 100, b, sizeof(b), &ev, &used);
        if (ws_close_code_valid((uint16_t)code)) {
            if (t != WS_EV_CLOSE || ev.code != code || ev.len != 2 || memcmp(ev.data, "ok", 2))
                bad++;
        } else if (t != WS_EV_ERROR || ev.code != 1002) {
            bad++;
        }
    }
    CHECK_EQ(bad, 0);

    /* errors in the middle of a stream come after the events before them */
    {
        uint8_t b[64];
        struct sink s;
        size_t n = 0;
        n += put_frame(b + n, WS_OP_TEXT, 1, "one", 3, WS_ROLE_SERVER);
        n += put_frame(b + n, WS_OP_PING, 1, "p", 1, WS_ROLE_SERVER);
        b[n++] = 0x83; /* opcode 3 */
        b[n++] = 0x80;
        feed_whole(&s, WS_ROLE_SERVER, 100, b, n);
        CHECK_EQ(s.messages, 1);
        CHECK_EQ(s.pings, 1);
        CHECK_EQ(s.errors, 1);
        CHECK_EQ(s.error_code, 1002);
        sink_free(&s);
    }
}

static void test_max_message(void)
{
    uint8_t buf[512], pl[200];
    struct sink s;
    size_t n;

    memset(pl, 'a', sizeof(pl));
    /* exactly at the limit is fine, one more is not */
    n = put_frame(buf, WS_OP_TEXT, 1, pl, 100, WS_ROLE_SERVER);
    feed_whole(&s, WS_ROLE_SERVER, 100, buf, n);
    CHECK_EQ(s.messages, 1);
    CHECK_EQ(s.errors, 0);
    sink_free(&s);
    n = put_frame(buf, WS_OP_TEXT, 1, pl, 101, WS_ROLE_SERVER);
    feed_whole(&s, WS_ROLE_SERVER, 100, buf, n);
    CHECK_EQ(s.errors, 1);
    CHECK_EQ(s.error_code, 1009);
    CHECK_EQ(s.chunks, 0);
    sink_free(&s);

    /* across fragments: 60 + 40 is fine, 60 + 41 fails on the second header */
    n = 0;
    n += put_frame(buf + n, WS_OP_BINARY, 0, pl, 60, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_PING, 1, pl, 100, WS_ROLE_SERVER); /* control frames don't count */
    n += put_frame(buf + n, WS_OP_CONT, 1, pl, 40, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_BINARY, 1, pl, 100, WS_ROLE_SERVER); /* the count starts over */
    feed_whole(&s, WS_ROLE_SERVER, 100, buf, n);
    CHECK_EQ(s.messages, 2);
    CHECK_EQ(s.errors, 0);
    sink_free(&s);

    {
        struct ws_parser p;
        struct ws_event ev;
        size_t used, off;
        n = put_frame(buf, WS_OP_BINARY, 0, pl, 60, WS_ROLE_SERVER);
        off = n;
        n += put_frame(buf + n, WS_OP_CONT, 0, pl, 41, WS_ROLE_SERVER);
        ws_parser_init(&p, WS_ROLE_SERVER, 100);
        CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 1);
        CHECK(ev.type == WS_EV_DATA && ev.len == 60 && !ev.fin);
        CHECK_EQ(used, off);
        /* only the continuation's first 2 bytes: the length alone condemns it */
        CHECK_EQ(ws_parse(&p, buf + off, 2, &used, &ev), 1);
        CHECK(ev.type == WS_EV_ERROR && ev.code == 1009);
    }
}

/* permessage-deflate's RSV1: allowed on a data message's first frame once negotiated, nowhere
 * else; a compressed message's bytes are not UTF-8-checked here, and may exceed max_message by
 * deflate's worst-case expansion. */
static void test_rsv1(void)
{
    uint8_t buf[1024], pl[300];
    struct ws_parser p;
    struct ws_event ev;
    size_t used, n;

    memset(pl, 0xff, sizeof(pl)); /* not UTF-8 */
    /* Not negotiated: RSV1 is a protocol error. */
    n = put_frame(buf, WS_OP_TEXT | WS_FRAME_RSV1, 1, "abc", 3, WS_ROLE_SERVER);
    ws_parser_init(&p, WS_ROLE_SERVER, 100);
    CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 1);
    CHECK(ev.type == WS_EV_ERROR && ev.code == 1002);

    /* Negotiated: a fragmented compressed text message, a ping between, then a plain one. */
    ws_parser_init(&p, WS_ROLE_SERVER, 100);
    p.deflate = 1;
    n = put_frame(buf, WS_OP_TEXT | WS_FRAME_RSV1, 0, pl, 10, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_PING, 1, "x", 1, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_CONT, 1, pl, 10, WS_ROLE_SERVER);
    n += put_frame(buf + n, WS_OP_TEXT, 1, "plain", 5, WS_ROLE_SERVER);
    size_t off = 0;
    int data = 0, compressed = 0, plain = 0;
    while (off < n && ws_parse(&p, buf + off, n - off, &used, &ev)) {
        off += used;
        CHECK(ev.type != WS_EV_ERROR);
        if (ev.type == WS_EV_DATA && ev.len) {
            data++;
            compressed += ev.compressed;
            plain += !ev.compressed && ev.len == 5 && memcmp(ev.data, "plain", 5) == 0;
        }
    }
    CHECK_EQ(off, n);
    CHECK_EQ(data, 3);
    CHECK_EQ(compressed, 2);
    CHECK_EQ(plain, 1);

    /* RSV1 on a continuation, on a control frame; RSV2 and RSV3 are never allowed. */
    static const int bad_ops[] = {WS_OP_PING, WS_OP_PONG, WS_OP_CLOSE};
    for (int i = 0; i < 3; i++) {
        ws_parser_init(&p, WS_ROLE_SERVER, 100);
        p.deflate = 1;
        n = put_frame(buf, bad_ops[i] | WS_FRAME_RSV1, 1, "", 0, WS_ROLE_SERVER);
        CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 1);
        CHECK(ev.type == WS_EV_ERROR && ev.code == 1002);
    }
    ws_parser_init(&p, WS_ROLE_SERVER, 100);
    p.deflate = 1;
    n = put_frame(buf, WS_OP_BINARY | WS_FRAME_RSV1, 0, pl, 5, WS_ROLE_SERVER);
    off = n;
    n += put_frame(buf + n, WS_OP_CONT | WS_FRAME_RSV1, 1, pl, 5, WS_ROLE_SERVER);
    CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 1);
    CHECK(ev.type == WS_EV_DATA && ev.compressed);
    CHECK_EQ(ws_parse(&p, buf + off, n - off, &used, &ev), 1);
    CHECK(ev.type == WS_EV_ERROR && ev.code == 1002);
    for (int bit = 0x10; bit <= 0x20; bit <<= 1) {
        ws_parser_init(&p, WS_ROLE_SERVER, 100);
        p.deflate = 1;
        n = put_frame(buf, WS_OP_TEXT, 1, "abc", 3, WS_ROLE_SERVER);
        buf[0] |= (uint8_t)bit;
        CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 1);
        CHECK(ev.type == WS_EV_ERROR && ev.code == 1002);
    }

    /* The wire limit: max_message for a plain message, plus an eighth and 64 for a compressed one
     * (100 + 12 + 64 = 176), across fragments too. */
    for (int sz = 175; sz <= 177; sz++) {
        ws_parser_init(&p, WS_ROLE_SERVER, 100);
        p.deflate = 1;
        n = put_frame(buf, WS_OP_BINARY | WS_FRAME_RSV1, 0, pl, 100, WS_ROLE_SERVER);
        off = n;
        n += put_frame(buf + n, WS_OP_CONT, 1, pl, (size_t)sz - 100, WS_ROLE_SERVER);
        CHECK_EQ(ws_parse(&p, buf, off, &used, &ev), 1);
        CHECK(ev.type == WS_EV_DATA);
        CHECK_EQ(ws_parse(&p, buf + off, n - off, &used, &ev), 1);
        if (sz <= 176)
            CHECK(ev.type == WS_EV_DATA && ev.fin && ev.compressed);
        else
            CHECK(ev.type == WS_EV_ERROR && ev.code == 1009);
    }
    ws_parser_init(&p, WS_ROLE_SERVER, 100);
    p.deflate = 1;
    n = put_frame(buf, WS_OP_BINARY, 1, pl, 101, WS_ROLE_SERVER);
    CHECK_EQ(ws_parse(&p, buf, n, &used, &ev), 1);
    CHECK(ev.type == WS_EV_ERROR && ev.code == 1009);
}

static void test_close_parse(void)
{
    uint8_t b[256];
    struct ws_event ev;
    size_t used, n;

    for (int role = WS_ROLE_SERVER; role <= WS_ROLE_CLIENT; role++) {
        n = put_frame(b, WS_OP_CLOSE, 1, "", 0, (enum ws_role)role);
        CHECK_EQ(parse_one((enum ws_role)role, 100, b, n, &ev, &used), WS_EV_CLOSE);
        CHECK_EQ(ev.code, 1005);
        CHECK_EQ(ev.len, 0);
        CHECK_EQ(used, n);

        n = put_frame(b, WS_OP_CLOSE, 1, "\x03\xe8", 2, (enum ws_role)role);
        CHECK_EQ(parse_one((enum ws_role)role, 100, b, n, &ev, &used), WS_EV_CLOSE);
        CHECK_EQ(ev.code, 1000);
        CHECK_EQ(ev.len, 0);

        n = put_frame(b, WS_OP_CLOSE, 1, "\x0f\xa0g\xc3\xbcten Tag", 12, (enum ws_role)role);
        CHECK_EQ(parse_one((enum ws_role)role, 100, b, n, &ev, &used), WS_EV_CLOSE);
        CHECK_EQ(ev.code, 4000);
        CHECK_EQ(ev.len, 10);
        CHECK(memcmp(ev.data, "g\xc3\xbcten Tag", 10) == 0);

        /* the longest close payload */
        uint8_t pl[125];
        memset(pl, 'r', sizeof(pl));
        pl[0] = 0x03;
        pl[1] = 0xE9;
        n = put_frame(b, WS_OP_CLOSE, 1, pl, 125, (enum ws_role)role);
        CHECK_EQ(parse_one((enum ws_role)role, 0, b, n, &ev, &used), WS_EV_CLOSE);
        CHECK_EQ(ev.code, 1001);
        CHECK_EQ(ev.len, 123);

        /* ping and pong of 125 bytes, binary payload */
        for (int i = 0; i < 125; i++)
            pl[i] = (uint8_t)(i * 37);
        n = put_frame(b, WS_OP_PING, 1, pl, 125, (enum ws_role)role);
        CHECK_EQ(parse_one((enum ws_role)role, 0, b, n, &ev, &used), WS_EV_PING);
        CHECK(ev.len == 125 && memcmp(ev.data, pl, 125) == 0);
        n = put_frame(b, WS_OP_PONG, 1, pl, 125, (enum ws_role)role);
        CHECK_EQ(parse_one((enum ws_role)role, 0, b, n, &ev, &used), WS_EV_PONG);
        CHECK(ev.len == 125 && memcmp(ev.data, pl, 125) == 0);
    }
}

static void test_close_frame(void)
{
    uint8_t out[WS_MAX_PENDING];
    char reason[300];
    struct ws_event ev;
    size_t n, used;

    n = ws_close_frame(out, 1000, "bye");
    CHECK_EQ(n, 7);
    CHECK(memcmp(out, "\x88\x05\x03\xe8" "bye", 7) == 0);
    CHECK_EQ(ws_close_frame(out, 0, "ignored"), 2);
    CHECK(memcmp(out, "\x88\x00", 2) == 0);
    CHECK_EQ(ws_close_frame(out, WS_CLOSE_NO_STATUS, NULL), 2);
    CHECK(memcmp(out, "\x88\x00", 2) == 0);
    CHECK_EQ(ws_close_frame(out, 1011, NULL), 4);
    CHECK(memcmp(out, "\x88\x02\x03\xf3", 4) == 0);
    CHECK_EQ(ws_close_frame(out, 1001, ""), 4);

    /* ASCII is cut at 123 bytes */
    memset(reason, 'x', 200);
    reason[200] = 0;
    n = ws_close_frame(out, 1009, reason);
    CHECK_EQ(n, 127);
    CHECK_EQ(out[1], 125);
    /* exactly 123 bytes of 2-, 3-, 4-byte characters fit whole */
    struct {
        const char *unit;
        size_t ulen, lead, want;
    } cuts[] = {
        {"\xc3\xa9", 2, 1, 123},         /* 'a' + 61 * 2 = 123 */
        {"\xc3\xa9", 2, 0, 122},         /* 62 * 2 = 124: the last one goes */
        {"\xe2\x82\xac", 3, 0, 123},     /* 41 * 3 = 123 */
        {"\xe2\x82\xac", 3, 1, 121},     /* 1 + 3k: 124 would split the 41st */
        {"\xe2\x82\xac", 3, 2, 122},
        {"\xf0\x9f\x98\x80", 4, 0, 120}, /* 30 * 4 = 120, the 31st would split */
        {"\xf0\x9f\x98\x80", 4, 3, 123},
        {"\xf0\x9f\x98\x80", 4, 1, 121},
        {"\xf0\x9f\x98\x80", 4, 2, 122},
    };
    for (size_t c = 0; c < sizeof(cuts) / sizeof(cuts[0]); c++) {
        size_t k = 0;
        memset(reason, 'a', cuts[c].lead);
        k = cuts[c].lead;
        while (k + cuts[c].ulen < 250) {
            memcpy(reason + k, cuts[c].unit, cuts[c].ulen);
            k += cuts[c].ulen;
        }
        reason[k] = 0;
        n = ws_close_frame(out, 1000, reason);
        CHECK_EQ(n, 4 + cuts[c].want);
        CHECK(memcmp(out + 4, reason, n - 4) == 0);
        CHECK(ws_utf8_valid(out + 4, n - 4));
        /* the peer accepts what we send */
        CHECK_EQ(parse_one(WS_ROLE_CLIENT, 0, out, n, &ev, &used), WS_EV_CLOSE);
        CHECK_EQ(used, n);
        CHECK_EQ(ev.code, 1000);
        CHECK_EQ(ev.len, cuts[c].want);
    }
    /* a reason that is not UTF-8 is cut before the bad byte rather than sent */
    n = ws_close_frame(out, 1000, "ok\xff" "after");
    CHECK_EQ(n, 6);
    CHECK_EQ(parse_one(WS_ROLE_CLIENT, 0, out, n, &ev, &used), WS_EV_CLOSE);
}

static void test_close_code_valid(void)
{
    int bad = 0;
    for (uint32_t c = 0; c <= 0xFFFF; c++) {
        int want = (c >= 1000 && c <= 1003) || (c >= 1007 && c <= 1014) || (c >= 3000 && c <= 4999);
        if (ws_close_code_valid((uint16_t)c) != want)
            bad++;
    }
    CHECK_EQ(bad, 0);
    CHECK(!ws_close_code_valid(0));
    CHECK(!ws_close_code_valid(999));
    CHECK(ws_close_code_valid(1000));
    CHECK(!ws_close_code_valid(1004));
    CHECK(!ws_close_code_valid(1005));
    CHECK(!ws_close_code_valid(1006));
    CHECK(ws_close_code_valid(1014));
    CHECK(!ws_close_code_valid(1015));
    CHECK(!ws_close_code_valid(2999));
    CHECK(ws_close_code_valid(3000));
    CHECK(ws_close_code_valid(4999));
    CHECK(!ws_close_code_valid(5000));
}

static void test_keys(void)
{
    char out[29];
    static const char *valid[] = {
        "dGhlIHNhbXBsZSBub25jZQ==",
        "AAAAAAAAAAAAAAAAAAAAAA==",
        "/////////////////////w==",
        "x3JJHMbDL1EzLkh9GBhXDw==",
        "+++++++++++++++++++++g==",
    };
    static const char *invalid[] = {
        "",
        "dGhlIHNhbXBsZSBub25jZQ=",    /* 23 */
        "dGhlIHNhbXBsZSBub25jZQ===",  /* 25 */
        "dGhlIHNhbXBsZSBub25jZQ",     /* no padding */
        "dGhlIHNhbXBsZSBub25jZR==",   /* R: low bits set, not canonical */
        "dGhlIHNhbXBsZSBub25jZ/==",
        "dGhlIHNhbXBsZSBub25jZQ=A",
        "dGhlIHNhbXBsZSBub25j=Q==",   /* padding inside */
        "dGhlIHNhbXBsZSBub25jZ-==",   /* url-safe alphabet */
        "dGhlIHNhbXBsZSBub2_jZQ==",
        "dGhlIHNhbXBsZSBub25 ZQ==",
        " dGhlIHNhbXBsZSBub25jZQ==",
        "dGhlIHNhbXBsZSBub25jZQ== ",
        "dGhlIHNhbXBsZSBub25jZQo=",   /* 17 bytes of base64 */
        "dGhlIHNhbXBsZSBub25jZQ\n=",
    };
    for (size_t i = 0; i < sizeof(valid) / sizeof(valid[0]); i++)
        CHECK(ws_key_valid(valid[i], strlen(valid[i])));
    for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++)
        CHECK(!ws_key_valid(invalid[i], strlen(invalid[i])));
    CHECK(!ws_key_valid("dGhlIHNhbXBsZSBub\0ljZQ==", 24));
    CHECK(!ws_key_valid("dGhlIHNhbXBsZSBub25jZQ==", 23));

    /* every canonical last character: low 4 bits zero */
    for (int c = 0; c < 256; c++) {
        char k[25] = "AAAAAAAAAAAAAAAAAAAAAA==";
        static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        const char *at = c ? memchr(b64, c, 64) : NULL;
        k[21] = (char)c;
        CHECK_EQ(ws_key_valid(k, 24), at != NULL && ((at - b64) & 0x0F) == 0);
    }

    memset(out, 'z', sizeof(out));
    ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", 24, out);
    CHECK(strcmp(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") == 0);
    ws_accept_key("x3JJHMbDL1EzLkh9GBhXDw==", 24, out);
    CHECK(strcmp(out, "HSmrc0sMlYUkAGmm5OPpG2HaGWk=") == 0);
}

/* ---- whole streams, fed in every way --------------------------------------------------------- */

static size_t build_stream(uint8_t *b, enum ws_role recv)
{
    static uint8_t big[70000];
    size_t n = 0;

    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (uint8_t)(i * 131 + 7);
    n += put_frame(b + n, WS_OP_TEXT, 1, "hello", 5, recv);
    n += put_frame(b + n, WS_OP_TEXT, 0, "frag\xe2", 5, recv);
    n += put_frame(b + n, WS_OP_PING, 1, "\x00\x01\xff", 3, recv);
    n += put_frame(b + n, WS_OP_CONT, 0, "", 0, recv);
    n += put_frame(b + n, WS_OP_CONT, 0, "\x82", 1, recv);
    n += put_frame(b + n, WS_OP_PONG, 1, "", 0, recv);
    n += put_frame(b + n, WS_OP_CONT, 1, "\xac mented", 8, recv);
    n += put_frame(b + n, WS_OP_BINARY, 1, big, 126, recv);
    n += put_frame(b + n, WS_OP_BINARY, 0, big, 65535, recv);
    n += put_frame(b + n, WS_OP_PING, 1, big, 125, recv);
    n += put_frame(b + n, WS_OP_CONT, 1, big, 65536 - 65535 + 3000, recv);
    n += put_frame(b + n, WS_OP_TEXT, 1, "", 0, recv);
    n += put_frame(b + n, WS_OP_BINARY, 1, big, 70000, recv);
    n += put_frame(b + n, WS_OP_TEXT, 0, "", 0, recv);
    n += put_frame(b + n, WS_OP_CONT, 1, "", 0, recv);
    n += put_frame(b + n, WS_OP_CLOSE, 1, "\x03\xe8normal \xf0\x9f\x91\x8b", 13, recv);
    n += put_frame(b + n, WS_OP_CLOSE, 1, "", 0, recv);
    return n;
}

static void test_streams(void)
{
    static const size_t patterns[][5] = {
        {1}, {2}, {3}, {5}, {7}, {13}, {64}, {138}, {139}, {140}, {4096},
        {1, 2, 3, 5, 8}, {100, 1, 1, 1, 1}, {14, 1, 125, 6, 2}, {65536, 1, 7, 3, 9},
    };
    uint8_t *stream = malloc(256 * 1024);

    for (int role = WS_ROLE_SERVER; role <= WS_ROLE_CLIENT; role++) {
        struct sink ref;
        size_t n = build_stream(stream, (enum ws_role)role);
        uint8_t *copy = malloc(n);

        memcpy(copy, stream, n);
        feed_whole(&ref, (enum ws_role)role, 1 << 20, copy, n);
        CHECK_EQ(ref.errors, 0);
        CHECK_EQ(ref.messages, 7);
        CHECK_EQ(ref.pings, 2);
        CHECK_EQ(ref.pongs, 1);
        CHECK_EQ(ref.closes, 2);
        CHECK_EQ(ref.bad, 0);
        for (size_t i = 0; i < sizeof(patterns) / sizeof(patterns[0]); i++) {
            struct sink s;
            size_t np = 0;
            while (np < 5 && patterns[i][np])
                np++;
            memcpy(copy, stream, n);
            feed(&s, (enum ws_role)role, 1 << 20, copy, n, patterns[i], np);
            CHECK_EQ(s.bad, 0);
            CHECK_EQ(s.errors, 0);
            CHECK(s.max_pending <= WS_MAX_PENDING);
            CHECK(s.log_len == ref.log_len && memcmp(s.log, ref.log, s.log_len) == 0);
            sink_free(&s);
        }
        /* pseudo-random piece sizes */
        uint32_t rnd = 12345;
        for (int round = 0; round < 20; round++) {
            struct sink s;
            size_t sizes[64];
            for (size_t i = 0; i < 64; i++) {
                rnd = rnd * 1103515245 + 12345;
                sizes[i] = 1 + (rnd >> 16) % (round < 10 ? 20 : 3000);
            }
            memcpy(copy, stream, n);
            feed(&s, (enum ws_role)role, 1 << 20, copy, n, sizes, 64);
            CHECK(s.log_len == ref.log_len && memcmp(s.log, ref.log, s.log_len) == 0);
            CHECK(s.max_pending <= WS_MAX_PENDING);
            sink_free(&s);
        }
        sink_free(&ref);
        free(copy);
    }

    /* a stream with an error: byte-at-a-time gives the same events and the same error */
    {
        uint8_t b[512];
        size_t n = 0, one = 1, whole = 0;
        struct sink a, c;
        n += put_frame(b + n, WS_OP_TEXT, 0, "ab", 2, WS_ROLE_SERVER);
        n += put_frame(b + n, WS_OP_PING, 1, "p", 1, WS_ROLE_SERVER);
        n += put_frame(b + n, WS_OP_CONT, 1, "c", 1, WS_ROLE_SERVER);
        n += put_frame(b + n, WS_OP_CLOSE, 1, "\x03\xed", 2, WS_ROLE_SERVER); /* 1005 on the wire */
        uint8_t copy[512];
        memcpy(copy, b, n);
        feed(&a, WS_ROLE_SERVER, 100, copy, n, &whole, 1);
        memcpy(copy, b, n);
        feed(&c, WS_ROLE_SERVER, 100, copy, n, &one, 1);
        CHECK_EQ(a.errors, 1);
        CHECK_EQ(a.error_code, 1002);
        CHECK_EQ(a.messages, 1);
        CHECK(a.log_len == c.log_len && memcmp(a.log, c.log, a.log_len) == 0);
        sink_free(&a);
        sink_free(&c);
    }
    free(stream);
}

int main(void)
{
    test_utf8_cases();
    test_utf8_all_code_points();
    test_utf8_exhaustive();
    test_utf8_ascii_runs();
    test_utf8_split();
    test_mask();
    test_frame_header();
    test_round_trip();
    test_incremental();
    test_fragmentation();
    test_utf8_fragments();
    test_errors();
    test_max_message();
    test_rsv1();
    test_close_parse();
    test_close_frame();
    test_close_code_valid();
    test_keys();
    test_streams();
    return TEST_REPORT();
}
