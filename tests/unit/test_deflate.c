/* test_deflate.c - permessage-deflate: the offer parser and its answers, compressing for shared
 * fan-out, and the bounded inflater (context takeover, fragments, zip bombs, bad data, UTF-8). */
#define ZLIB_CONST
#include "deflate.h"
#include "ws.h"

#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "test.h"

/* ---- negotiation ------------------------------------------------------------------------------ */

/* Negotiate value; returns 1 when accepted, with the answer in resp. */
static int nego(const char *value, struct pmd_params *p, char *resp)
{
    memset(p, 0xAA, sizeof(*p)); /* untouched on refusal */
    resp[0] = 0;
    return pmd_negotiate(value, strlen(value), p, resp, PMD_RESPONSE_MAX);
}

static void expect_accept(const char *value, int server_bits, int client_bits, int client_nct, const char *answer)
{
    struct pmd_params p;
    char resp[PMD_RESPONSE_MAX];
    int ok = nego(value, &p, resp);
    CHECK_EQ(ok, 1);
    if (!ok) {
        fprintf(stderr, "  offer refused: %s\n", value);
        return;
    }
    CHECK_EQ(p.server_bits, server_bits);
    CHECK_EQ(p.client_bits, client_bits);
    CHECK_EQ(p.client_no_context_takeover, client_nct);
    CHECK(strcmp(resp, answer) == 0);
    if (strcmp(resp, answer) != 0)
        fprintf(stderr, "  offer %s: answered \"%s\", expected \"%s\"\n", value, resp, answer);
}

static void expect_refuse(const char *value)
{
    struct pmd_params p, untouched;
    char resp[PMD_RESPONSE_MAX];
    memset(&untouched, 0xAA, sizeof(untouched));
    int ok = nego(value, &p, resp);
    CHECK_EQ(ok, 0);
    CHECK(memcmp(&p, &untouched, sizeof(p)) == 0);
    if (ok)
        fprintf(stderr, "  offer accepted but should not be: %s -> %s\n", value, resp);
}

#define PLAIN "permessage-deflate; server_no_context_takeover"

static void test_negotiate(void)
{
    /* What browsers and common clients offer. */
    expect_accept("permessage-deflate", 15, 15, 0, PLAIN);
    expect_accept("permessage-deflate; client_max_window_bits", 15, 15, 0, PLAIN); /* Chromium */
    expect_accept("permessage-deflate;client_max_window_bits", 15, 15, 0, PLAIN);
    expect_accept("  permessage-deflate  ;  client_max_window_bits  ", 15, 15, 0, PLAIN);
    expect_accept("PerMessage-Deflate; Client_Max_Window_Bits", 15, 15, 0, PLAIN);
    expect_accept("permessage-deflate; client_max_window_bits=10", 15, 10, 0, PLAIN);
    expect_accept("permessage-deflate; client_max_window_bits=8", 15, 8, 0, PLAIN);
    expect_accept("permessage-deflate; server_no_context_takeover", 15, 15, 0, PLAIN);
    expect_accept("permessage-deflate; client_no_context_takeover", 15, 15, 1,
                  PLAIN "; client_no_context_takeover");
    expect_accept("permessage-deflate; server_max_window_bits=10", 10, 15, 0, PLAIN "; server_max_window_bits=10");
    expect_accept("permessage-deflate; server_max_window_bits=9", 9, 15, 0, PLAIN "; server_max_window_bits=9");
    expect_accept("permessage-deflate; server_max_window_bits=15; client_max_window_bits=15", 15, 15, 0,
                  PLAIN "; server_max_window_bits=15");
    expect_accept("permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
                  "server_max_window_bits=12; client_max_window_bits=11",
                  12, 11, 1, PLAIN "; client_no_context_takeover; server_max_window_bits=12");
    /* Values may be quoted strings, with escapes, and have whitespace around '='. */
    expect_accept("permessage-deflate; server_max_window_bits=\"10\"", 10, 15, 0, PLAIN "; server_max_window_bits=10");
    expect_accept("permessage-deflate; server_max_window_bits=\"1\\1\"", 11, 15, 0, PLAIN "; server_max_window_bits=11");
    expect_accept("permessage-deflate; client_max_window_bits = 12", 15, 12, 0, PLAIN);

    /* Several offers: the first acceptable one wins; others are passed over. */
    expect_accept("x-webkit-deflate-frame, permessage-deflate", 15, 15, 0, PLAIN);
    expect_accept("permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9",
                  9, 15, 0, PLAIN "; server_max_window_bits=9");
    expect_accept("permessage-deflate; server_max_window_bits=10, permessage-deflate", 10, 15, 0,
                  PLAIN "; server_max_window_bits=10");
    expect_accept("permessage-deflate; mux, permessage-deflate; client_no_context_takeover", 15, 15, 1,
                  PLAIN "; client_no_context_takeover");
    expect_accept("foo; bar=\"a, b; c\", permessage-deflate", 15, 15, 0, PLAIN);
    expect_accept("permessage-deflate;; x, permessage-deflate", 15, 15, 0, PLAIN);
    expect_accept("permessage-deflate x, permessage-deflate", 15, 15, 0, PLAIN);
    expect_accept(", ,permessage-deflate,", 15, 15, 0, PLAIN);
    expect_accept("foo; x=\"unterminated, permessage-deflate\", permessage-deflate", 15, 15, 0, PLAIN);

    /* Declined: malformed, unknown, repeated or unsupported parameters, and no offer at all. */
    expect_refuse("");
    expect_refuse(" , ");
    expect_refuse("x-webkit-deflate-frame");
    expect_refuse("permessage-deflat");
    expect_refuse("permessage-deflate-x");
    expect_refuse("permessage-deflate; server_max_window_bits");       /* value required */
    expect_refuse("permessage-deflate; server_max_window_bits=8");     /* zlib cannot */
    expect_refuse("permessage-deflate; server_max_window_bits=7");
    expect_refuse("permessage-deflate; server_max_window_bits=16");
    expect_refuse("permessage-deflate; server_max_window_bits=010");
    expect_refuse("permessage-deflate; server_max_window_bits=+9");
    expect_refuse("permessage-deflate; server_max_window_bits=9.0");
    expect_refuse("permessage-deflate; server_max_window_bits=");
    expect_refuse("permessage-deflate; server_max_window_bits=\"\"");
    expect_refuse("permessage-deflate; server_max_window_bits=\"1 0\"");
    expect_refuse("permessage-deflate; server_max_window_bits=\"10");
    expect_refuse("permessage-deflate; server_max_window_bits=10000000000000000000000009");
    expect_refuse("permessage-deflate; server_max_window_bits=\"10000000000000000000000009\"");
    expect_refuse("permessage-deflate; client_max_window_bits=16");
    expect_refuse("permessage-deflate; client_max_window_bits=7");
    expect_refuse("permessage-deflate; client_max_window_bits=abc");
    expect_refuse("permessage-deflate; server_no_context_takeover=1");
    expect_refuse("permessage-deflate; client_no_context_takeover=\"\"");
    expect_refuse("permessage-deflate; client_no_context_takeover; client_no_context_takeover");
    expect_refuse("permessage-deflate; client_max_window_bits; client_max_window_bits=10");
    expect_refuse("permessage-deflate; server_max_window_bits=10; server_max_window_bits=10");
    expect_refuse("permessage-deflate; foo");
    expect_refuse("permessage-deflate; foo=1");
    expect_refuse("permessage-deflate;");
    expect_refuse("permessage-deflate; =10");
    expect_refuse("permessage-deflate x");
    expect_refuse("permessage-deflate; bad-param, permessage-deflate; x=1");
    expect_refuse("\"permessage-deflate\"");
    expect_refuse("permessage-deflate; client_max_window_bits=10 11");

    /* A value holding a NUL or control character is malformed. */
    struct pmd_params p;
    char resp[PMD_RESPONSE_MAX];
    static const char nul[] = "permessage-deflate; server_max_window_bits=\"1\0\"";
    CHECK_EQ(pmd_negotiate(nul, sizeof(nul) - 1, &p, resp, sizeof(resp)), 0);
    /* Only len bytes are read: a prefix that stops inside a parameter. */
    static const char cut[] = "permessage-deflate; server_max_window_bits=10";
    CHECK_EQ(pmd_negotiate(cut, sizeof(cut) - 3, &p, resp, sizeof(resp)), 0);
    CHECK_EQ(pmd_negotiate(cut, 18, &p, resp, sizeof(resp)), 1);
}

/* ---- compressing ------------------------------------------------------------------------------ */

/* Text that compresses like real messages do: words from a small vocabulary. */
static void make_text(uint8_t *out, size_t len, unsigned seed)
{
    static const char *const words[] = {"channel", "message", "seq", "data", "price", "user", "room",
                                        "hello", "42", "{\"op\":", "\"x\"", ", "};
    size_t i = 0;
    while (i < len) {
        seed = seed * 1103515245u + 12345u;
        const char *w = words[(seed >> 16) % (sizeof(words) / sizeof(words[0]))];
        for (size_t k = 0; w[k] && i < len; k++)
            out[i++] = (uint8_t)w[k];
    }
}

static void make_random(uint8_t *out, size_t len, unsigned seed)
{
    for (size_t i = 0; i < len; i++) {
        seed = seed * 1103515245u + 12345u;
        out[i] = (uint8_t)(seed >> 16);
    }
}

/* Inflate data + tail with plain zlib and a window of exactly bits: what a strict client does. */
static size_t zlib_inflate(int bits, const uint8_t *data, size_t len, uint8_t *out, size_t cap, int *ok)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    CHECK(inflateInit2(&z, -bits) == Z_OK);
    uint8_t *in = malloc(len + 4);
    memcpy(in, data, len);
    memcpy(in + len, "\x00\x00\xff\xff", 4);
    z.next_in = in;
    z.avail_in = (uInt)(len + 4);
    z.next_out = out;
    z.avail_out = (uInt)cap;
    int rc = inflate(&z, Z_SYNC_FLUSH);
    *ok = (rc == Z_OK || rc == Z_BUF_ERROR) && z.avail_in == 0;
    size_t n = cap - z.avail_out;
    inflateEnd(&z);
    free(in);
    return n;
}

static void test_compress(void)
{
    struct buf out = {0};
    size_t sizes[] = {1, 100, 255, 256, 1000, 4096, 70000, 300000};
    uint8_t *msg = malloc(300000), *back = malloc(300001);

    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
        size_t len = sizes[s];
        make_text(msg, len, (unsigned)len);
        for (int bits = 9; bits <= 15; bits++) {
            for (int level = 1; level <= 9; level += 4) {
                int r = pmd_compress(bits, level, 0, msg, len, &out);
                if (len < 20) {
                    CHECK_EQ(r, 0); /* too short to shrink */
                    continue;
                }
                CHECK_EQ(r, 1);
                CHECK(out.len < len);
                /* The tail is taken off. */
                CHECK(out.len < 4 || memcmp(out.data + out.len - 4, "\x00\x00\xff\xff", 4) != 0);
                int ok;
                size_t n = zlib_inflate(bits, (const uint8_t *)out.data, out.len, back, 300001, &ok);
                CHECK(ok);
                CHECK_EQ(n, len);
                CHECK(memcmp(back, msg, len) == 0);
            }
        }
    }
    /* Each message stands alone: compressing the same message twice gives the same bytes. */
    make_text(msg, 5000, 7);
    CHECK_EQ(pmd_compress(15, 6, 0, msg, 5000, &out), 1);
    struct buf again = {0};
    CHECK_EQ(pmd_compress(15, 6, 0, msg, 5000, &again), 1);
    CHECK(out.len == again.len && memcmp(out.data, again.data, out.len) == 0);

    /* Short of min_size, or incompressible: sent as is. */
    uint64_t before = pmd_stats.not_compressed;
    CHECK_EQ(pmd_compress(15, 6, 256, msg, 255, &out), 0);
    CHECK_EQ(out.len, 0);
    CHECK_EQ(pmd_compress(15, 6, 256, msg, 256, &out), 1);
    CHECK_EQ(pmd_compress(15, 6, 0, msg, 0, &out), 0);
    make_random(msg, 4096, 3);
    CHECK_EQ(pmd_compress(15, 6, 0, msg, 4096, &out), 0);
    CHECK_EQ(pmd_stats.not_compressed, before + 3);

    buf_free(&out);
    buf_free(&again);
    free(msg);
    free(back);
}

/* ---- inflating -------------------------------------------------------------------------------- */

/* A client's compressor: raw deflate, stripped of the tail, with or without context takeover. */
struct client {
    z_stream z;
};

static void client_init(struct client *c, int bits)
{
    memset(c, 0, sizeof(*c));
    CHECK(deflateInit2(&c->z, 6, Z_DEFLATED, -bits, 8, Z_DEFAULT_STRATEGY) == Z_OK);
}

/* Compress msg; flush is Z_SYNC_FLUSH (tail stripped) or Z_FINISH (a final block, nothing
 * stripped). Returns the payload length in out. */
static size_t client_compress(struct client *c, const void *msg, size_t len, uint8_t *out, size_t cap, int flush)
{
    c->z.next_in = msg;
    c->z.avail_in = (uInt)len;
    c->z.next_out = out;
    c->z.avail_out = (uInt)cap;
    CHECK(deflate(&c->z, flush) == (flush == Z_FINISH ? Z_STREAM_END : Z_OK));
    size_t n = cap - c->z.avail_out;
    if (flush == Z_SYNC_FLUSH) {
        CHECK(n >= 4 && memcmp(out + n - 4, "\x00\x00\xff\xff", 4) == 0);
        n -= 4;
    }
    return n;
}

/* Inflate a whole payload in pieces of step bytes; returns the close code (0 for success). */
static int inflate_pieces(struct pmd_inflater *f, const uint8_t *p, size_t len, size_t step, int text,
                          struct buf *out, size_t max)
{
    const char *why = NULL;
    out->len = 0;
    if (len == 0)
        return pmd_inflate(f, p, 0, 1, text, out, max, &why);
    for (size_t off = 0; off < len; off += step) {
        size_t n = len - off < step ? len - off : step;
        int rc = pmd_inflate(f, p + off, n, off + n == len, text, out, max, &why);
        if (rc) {
            CHECK(why && why[0]);
            return rc;
        }
    }
    return 0;
}

static void test_inflate_basic(void)
{
    uint8_t msg[20000], z[30000];
    struct buf out = {0};
    struct client cl;
    size_t steps[] = {1, 3, 100, 100000};

    make_text(msg, sizeof(msg), 11);
    for (size_t s = 0; s < sizeof(steps) / sizeof(steps[0]); s++) {
        /* Context takeover: later messages refer back to earlier ones. */
        struct pmd_inflater *f = pmd_inflater_new(0);
        client_init(&cl, 15);
        for (int i = 0; i < 4; i++) {
            size_t len = 5000 + (size_t)i * 1000;
            size_t n = client_compress(&cl, msg, len, z, sizeof(z), Z_SYNC_FLUSH);
            CHECK(pmd_inflater_idle(f));
            CHECK_EQ(inflate_pieces(f, z, n, steps[s], 1, &out, 1 << 20), 0);
            CHECK_EQ(out.len, len);
            CHECK(memcmp(out.data, msg, len) == 0);
            if (i > 0)
                CHECK(n < 1000); /* it really did refer back: 1000 new bytes, the rest seen before */
        }
        deflateEnd(&cl.z);
        pmd_inflater_free(f);
    }

    /* Without context takeover, a message that refers back to the one before is invalid data. */
    struct pmd_inflater *f = pmd_inflater_new(1);
    client_init(&cl, 15);
    size_t n = client_compress(&cl, msg, 3000, z, sizeof(z), Z_SYNC_FLUSH);
    CHECK_EQ(inflate_pieces(f, z, n, 7, 0, &out, 1 << 20), 0);
    n = client_compress(&cl, msg, 3000, z, sizeof(z), Z_SYNC_FLUSH);
    CHECK_EQ(inflate_pieces(f, z, n, 7, 0, &out, 1 << 20), WS_CLOSE_INVALID_DATA);
    deflateEnd(&cl.z);
    /* ... while a client that resets per message is fine. */
    for (int i = 0; i < 3; i++) {
        client_init(&cl, 15);
        n = client_compress(&cl, msg, 3000, z, sizeof(z), Z_SYNC_FLUSH);
        deflateEnd(&cl.z);
        CHECK_EQ(inflate_pieces(f, z, n, 1000, 0, &out, 1 << 20), 0);
        CHECK_EQ(out.len, 3000);
    }
    pmd_inflater_free(f);

    /* A message of our own compressor inflates back; so does the empty message ("00"). */
    f = pmd_inflater_new(1);
    CHECK_EQ(pmd_compress(15, 6, 0, msg, 10000, &out), 1);
    struct buf back = {0};
    CHECK_EQ(inflate_pieces(f, (uint8_t *)out.data, out.len, 333, 1, &back, 10000), 0);
    CHECK(back.len == 10000 && memcmp(back.data, msg, 10000) == 0);
    CHECK_EQ(inflate_pieces(f, (const uint8_t *)"\x00", 1, 1, 1, &back, 10), 0);
    CHECK_EQ(back.len, 0);
    /* A client with a small window (the inflater always keeps the largest). */
    pmd_inflater_free(f);
    f = pmd_inflater_new(0);
    client_init(&cl, 9);
    n = client_compress(&cl, msg, 8000, z, sizeof(z), Z_SYNC_FLUSH);
    CHECK_EQ(inflate_pieces(f, z, n, 512, 0, &back, 8000), 0);
    CHECK(back.len == 8000 && memcmp(back.data, msg, 8000) == 0);
    deflateEnd(&cl.z);
    pmd_inflater_free(f);
    buf_free(&out);
    buf_free(&back);
}

static void test_inflate_final_block(void)
{
    uint8_t msg[6000], z[8000];
    struct buf out = {0};
    struct client cl;
    make_text(msg, sizeof(msg), 5);

    /* A message ending in a final block (BFINAL), as some clients flush, with context takeover:
     * the next message may still refer to it. */
    struct pmd_inflater *f = pmd_inflater_new(0);
    client_init(&cl, 15);
    size_t n = client_compress(&cl, msg, 3000, z, sizeof(z), Z_FINISH);
    CHECK_EQ(inflate_pieces(f, z, n, 100, 1, &out, 1 << 20), 0);
    CHECK(out.len == 3000 && memcmp(out.data, msg, 3000) == 0);
    deflateEnd(&cl.z);
    client_init(&cl, 15);
    CHECK(deflateSetDictionary(&cl.z, msg, 3000) == Z_OK);
    n = client_compress(&cl, msg, 3000, z, sizeof(z), Z_SYNC_FLUSH);
    CHECK(n < 100);
    CHECK_EQ(inflate_pieces(f, z, n, 100, 1, &out, 1 << 20), 0);
    CHECK(out.len == 3000 && memcmp(out.data, msg, 3000) == 0);
    deflateEnd(&cl.z);

    /* Bytes after the final block are invalid data. */
    client_init(&cl, 15);
    n = client_compress(&cl, msg, 3000, z, sizeof(z), Z_FINISH);
    z[n++] = 0;
    CHECK_EQ(inflate_pieces(f, z, n, 100000, 1, &out, 1 << 20), WS_CLOSE_INVALID_DATA);
    CHECK_EQ(inflate_pieces(f, z, n, 1, 1, &out, 1 << 20), WS_CLOSE_INVALID_DATA);
    deflateEnd(&cl.z);
    CHECK(pmd_inflater_idle(f));
    pmd_inflater_free(f);
    buf_free(&out);
}

static void test_inflate_bounds(void)
{
    size_t big = 10u << 20;
    uint8_t *zeros = calloc(1, big), *z = malloc(big / 100);
    struct buf out = {0};
    struct client cl;

    /* A zip bomb: 10 MiB of zeros in about 10 KiB. Inflating stops at the limit, in one piece or
     * in many, and the output buffer never grows past it. */
    client_init(&cl, 15);
    size_t n = client_compress(&cl, zeros, big, z, big / 100, Z_SYNC_FLUSH);
    deflateEnd(&cl.z);
    CHECK(n < 20000);
    size_t steps[] = {1, 1000, n};
    for (size_t s = 0; s < 3; s++) {
        struct pmd_inflater *f = pmd_inflater_new(0);
        buf_free(&out);
        CHECK_EQ(inflate_pieces(f, z, n, steps[s], 0, &out, 65536), WS_CLOSE_TOO_BIG);
        CHECK(out.len <= 65536);
        CHECK(out.cap <= 65536);
        pmd_inflater_free(f);
    }

    /* Exactly at the limit is fine; one byte over is not, even when the last byte only comes out
     * with the tail. */
    for (size_t len = 1000; len <= 1002; len++) {
        client_init(&cl, 15);
        n = client_compress(&cl, zeros, len, z, 1000, Z_SYNC_FLUSH);
        deflateEnd(&cl.z);
        for (size_t step = 1; step <= n; step += n - 1) {
            struct pmd_inflater *f = pmd_inflater_new(1);
            int rc = inflate_pieces(f, z, n, step, 0, &out, 1001);
            CHECK_EQ(rc, len <= 1001 ? 0 : WS_CLOSE_TOO_BIG);
            if (!rc)
                CHECK_EQ(out.len, len);
            pmd_inflater_free(f);
            if (n == 1)
                break;
        }
    }
    buf_free(&out);
    free(zeros);
    free(z);
}

static void test_inflate_invalid(void)
{
    uint8_t msg[4000], z[5000];
    struct buf out = {0};
    struct client cl;
    make_text(msg, sizeof(msg), 9);

    struct pmd_inflater *f = pmd_inflater_new(0);
    /* Block type 3 is reserved. */
    CHECK_EQ(inflate_pieces(f, (const uint8_t *)"\xff\xff\xff", 3, 1, 0, &out, 1000), WS_CLOSE_INVALID_DATA);
    /* A zero-length payload is not a deflate block: the appended tail alone is half a stored block. */
    CHECK_EQ(inflate_pieces(f, (const uint8_t *)"", 0, 1, 0, &out, 1000), WS_CLOSE_INVALID_DATA);
    /* A stored block whose length does not match its complement. */
    CHECK_EQ(inflate_pieces(f, (const uint8_t *)"\x00\x05\x00\x00\x00hello", 10, 3, 0, &out, 1000),
             WS_CLOSE_INVALID_DATA);
    /* Cut short: the message stops inside a block. */
    client_init(&cl, 15);
    size_t n = client_compress(&cl, msg, sizeof(msg), z, sizeof(z), Z_SYNC_FLUSH);
    deflateEnd(&cl.z);
    CHECK_EQ(inflate_pieces(f, z, n / 2, 50, 0, &out, 1 << 20), WS_CLOSE_INVALID_DATA);
    /* After each failure the inflater takes a new message. */
    CHECK(pmd_inflater_idle(f));
    client_init(&cl, 15);
    n = client_compress(&cl, msg, sizeof(msg), z, sizeof(z), Z_SYNC_FLUSH);
    deflateEnd(&cl.z);
    CHECK_EQ(inflate_pieces(f, z, n, 50, 0, &out, 1 << 20), 0);
    CHECK(out.len == sizeof(msg) && memcmp(out.data, msg, sizeof(msg)) == 0);
    pmd_inflater_free(f);
    buf_free(&out);
}

static void test_inflate_utf8(void)
{
    uint8_t z[1000];
    struct buf out = {0};
    struct client cl;
    struct pmd_inflater *f = pmd_inflater_new(1);
    const char *good = "héllo wörld ✓ 𝄞 κόσμε, héllo wörld ✓ 𝄞 κόσμε";
    const char *bad[] = {"valid start, then \xc0\xaf an overlong", "a surrogate \xed\xa0\x80 here",
                         "ends inside a character \xe2\x9c"};

    for (size_t step = 1; step <= 64; step *= 4) {
        client_init(&cl, 15);
        size_t n = client_compress(&cl, good, strlen(good), z, sizeof(z), Z_SYNC_FLUSH);
        deflateEnd(&cl.z);
        CHECK_EQ(inflate_pieces(f, z, n, step, 1, &out, 1000), 0);
        CHECK(out.len == strlen(good) && memcmp(out.data, good, out.len) == 0);
        for (int i = 0; i < 3; i++) {
            client_init(&cl, 15);
            n = client_compress(&cl, bad[i], strlen(bad[i]), z, sizeof(z), Z_SYNC_FLUSH);
            deflateEnd(&cl.z);
            CHECK_EQ(inflate_pieces(f, z, n, step, 1, &out, 1000), WS_CLOSE_INVALID_DATA);
            /* The same bytes in a binary message are fine. */
            CHECK_EQ(inflate_pieces(f, z, n, step, 0, &out, 1000), 0);
        }
    }
    pmd_inflater_free(f);

    /* Invalid UTF-8 is caught as it comes out, before the message ends: a long text whose first
     * bytes are already invalid fails on its first piece. */
    static uint8_t text[100000], zz[120000];
    memset(text, 'a', sizeof(text));
    text[10] = 0xff;
    client_init(&cl, 15);
    size_t n = client_compress(&cl, text, sizeof(text), zz, sizeof(zz), Z_SYNC_FLUSH);
    deflateEnd(&cl.z);
    f = pmd_inflater_new(0);
    const char *why;
    out.len = 0;
    CHECK_EQ(pmd_inflate(f, zz, n, 0, 1, &out, 1 << 20, &why), WS_CLOSE_INVALID_DATA);
    pmd_inflater_free(f);
    buf_free(&out);
}

static void test_stats_render(void)
{
    struct buf b = {0};
    pmd_stats_json(&b, NULL);
    buf_append(&b, "", 1);
    CHECK(strstr(b.data, "\"deflate_compressed\":") != NULL);
    CHECK(strstr(b.data, "\"deflate_inflaters\":0") != NULL); /* every inflater was freed */
    b.len = 0;
    pmd_stats_prom(&b, NULL);
    buf_append(&b, "", 1);
    CHECK(strstr(b.data, "# TYPE herald_deflate_compressed_total counter\n") != NULL);
    CHECK(strstr(b.data, "herald_deflate_websockets 0\n") != NULL);
    buf_free(&b);
}

int main(void)
{
    test_negotiate();
    test_compress();
    test_inflate_basic();
    test_inflate_final_block();
    test_inflate_bounds();
    test_inflate_invalid();
    test_inflate_utf8();
    test_stats_render();
    return TEST_REPORT();
}
