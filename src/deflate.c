/* deflate.c - permessage-deflate on bytes alone: offers and answers, shared compressors, bounded
 * inflaters. Sockets, frames and who gets what belong to the connection and channel code. */
#define ZLIB_CONST
#include "deflate.h"

#include "ws.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <zlib.h>

struct pmd_stats pmd_stats;

/* The empty stored block a sync flush ends with: taken off what we send, put back on what we
 * inflate (RFC 7692 7.2.1, 7.2.2). */
static const uint8_t pmd_tail[4] = {0x00, 0x00, 0xff, 0xff};

/* zlib failing to set up a stream means memory ran out, which herald treats as fatal everywhere
 * (see buf.h). */
static void zlib_fatal(const char *what, int rc)
{
    fprintf(stderr, "herald: %s failed (zlib error %d)\n", what, rc);
    abort();
}

/* --- negotiation ------------------------------------------------------------------------------- */

static int is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static const char *skip_ows(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    return p;
}

static const char *skip_token(const char *p, const char *end)
{
    while (p < end && is_tchar((unsigned char)*p))
        p++;
    return p;
}

/* The rest of a malformed list element: up to the next comma that is not inside a quoted string
 * (or the end, if a quote is never closed). */
static const char *skip_element(const char *p, const char *end)
{
    int quoted = 0;
    for (; p < end; p++) {
        if (quoted && *p == '\\' && p + 1 < end)
            p++;
        else if (*p == '"')
            quoted = !quoted;
        else if (!quoted && *p == ',')
            break;
    }
    return p;
}

/* A quoted-string at p (p[0] is the opening quote), unescaped into val (room for cap bytes, NUL
 * added). Returns the position after the closing quote, or NULL if it is malformed. *vlen is the
 * unescaped length, or cap when that did not fit (no valid value is that long). */
static const char *quoted_string(const char *p, const char *end, char *val, size_t cap, size_t *vlen)
{
    size_t n = 0;
    for (p++; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            val[n < cap ? n : cap - 1] = 0;
            *vlen = n < cap ? n : cap;
            return p + 1;
        }
        if (c == '\\') {
            if (++p == end)
                return NULL;
            c = (unsigned char)*p;
        }
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return NULL;
        if (n + 1 < cap)
            val[n] = (char)c;
        n++;
    }
    return NULL;
}

/* A window size value: decimal 8 to 15 with no leading zero (RFC 7692 7.1.2). -1 if invalid. */
static int window_bits(const char *v, size_t len)
{
    if (len == 1 && (v[0] == '8' || v[0] == '9'))
        return v[0] - '0';
    if (len == 2 && v[0] == '1' && v[1] >= '0' && v[1] <= '5')
        return 10 + v[1] - '0';
    return -1;
}

enum { P_SERVER_NCT = 1, P_CLIENT_NCT = 2, P_SERVER_BITS = 4, P_CLIENT_BITS = 8 };

/* One permessage-deflate parameter of an offer; 0 if herald accepts it, -1 if the offer must be
 * declined for it (RFC 7692 5: unknown, repeated, or with an invalid value). */
static int offer_param(const char *name, size_t nlen, const char *val, size_t vlen, int has_value,
                       unsigned *seen, struct pmd_params *pp)
{
    static const struct {
        const char *name;
        unsigned bit;
    } known[] = {{"server_no_context_takeover", P_SERVER_NCT},
                 {"client_no_context_takeover", P_CLIENT_NCT},
                 {"server_max_window_bits", P_SERVER_BITS},
                 {"client_max_window_bits", P_CLIENT_BITS}};
    unsigned bit = 0;
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
        if (strlen(known[i].name) == nlen && strncasecmp(known[i].name, name, nlen) == 0)
            bit = known[i].bit;
    if (!bit || (*seen & bit))
        return -1;
    *seen |= bit;
    int bits;
    switch (bit) {
    case P_SERVER_NCT:
        return has_value ? -1 : 0; /* we reset our context per message anyway */
    case P_CLIENT_NCT:
        if (has_value)
            return -1;
        pp->client_no_context_takeover = 1;
        return 0;
    case P_SERVER_BITS:
        /* A value is required; 8 cannot be honoured with zlib's raw deflate. */
        if (!has_value || (bits = window_bits(val, vlen)) < PMD_MIN_SERVER_BITS)
            return -1;
        pp->server_bits = (uint8_t)bits;
        return 0;
    default: /* P_CLIENT_BITS: the value is optional, a bare parameter says "I can be told" */
        if (has_value && (bits = window_bits(val, vlen)) < 0)
            return -1;
        if (has_value)
            pp->client_bits = (uint8_t)bits;
        return 0;
    }
}

/* Parse the list element at p (after any whitespace). Returns the position where it ends (a comma
 * or the end). *accepted is set when it is a well-formed permessage-deflate offer herald accepts,
 * with its parameters in *pp and *seen. */
static const char *offer(const char *p, const char *end, struct pmd_params *pp, unsigned *seen,
                         int *accepted)
{
    static const char pmd_name[] = "permessage-deflate";
    const char *name = p;
    *accepted = 0;
    *seen = 0;
    memset(pp, 0, sizeof(*pp));
    pp->server_bits = 15;
    pp->client_bits = 15;
    p = skip_token(p, end);
    if (p == name)
        return skip_element(p, end);
    int is_pmd = (size_t)(p - name) == sizeof(pmd_name) - 1 &&
                 strncasecmp(name, pmd_name, sizeof(pmd_name) - 1) == 0;
    int ok = 1;
    for (;;) {
        p = skip_ows(p, end);
        if (p == end || *p == ',')
            break;
        if (*p != ';')
            return skip_element(p, end);
        p = skip_ows(p + 1, end);
        const char *pname = p;
        p = skip_token(p, end);
        size_t nlen = (size_t)(p - pname);
        if (!nlen)
            return skip_element(p, end);
        p = skip_ows(p, end);
        char val[16];
        size_t vlen = 0;
        int has_value = 0;
        if (p < end && *p == '=') {
            has_value = 1;
            p = skip_ows(p + 1, end);
            if (p < end && *p == '"') {
                const char *q = quoted_string(p, end, val, sizeof(val), &vlen);
                if (!q)
                    return skip_element(p, end);
                p = q;
                /* Unquoted, the value must still be a token (RFC 6455 9.1). */
                if (vlen == 0 || vlen >= sizeof(val) || skip_token(val, val + vlen) != val + vlen)
                    ok = 0;
            } else {
                const char *v = p;
                p = skip_token(p, end);
                vlen = (size_t)(p - v);
                if (!vlen)
                    return skip_element(p, end);
                if (vlen < sizeof(val)) {
                    memcpy(val, v, vlen);
                    val[vlen] = 0;
                } else {
                    vlen = sizeof(val); /* too long to be a valid value */
                }
            }
        }
        if (is_pmd && ok && offer_param(pname, nlen, val, vlen, has_value, seen, pp) < 0)
            ok = 0;
    }
    *accepted = is_pmd && ok;
    return p;
}

int pmd_negotiate(const char *value, size_t len, struct pmd_params *params, char *response, size_t cap)
{
    const char *p = value, *end = value + len;
    while (p < end) {
        p = skip_ows(p, end);
        if (p < end && *p == ',') { /* empty list elements are allowed (RFC 9110 5.6.1) */
            p++;
            continue;
        }
        if (p == end)
            break;
        struct pmd_params pp;
        unsigned seen;
        int accepted;
        p = offer(p, end, &pp, &seen, &accepted);
        if (!accepted)
            continue;
        /* Always server_no_context_takeover (RFC 7692 7.1.1.1 lets a server add it unasked): every
         * message is compressed on its own so that one compressed form serves many subscribers.
         * server_max_window_bits is echoed only when offered, since some clients refuse it
         * otherwise; client_max_window_bits is never sent: a client that offered a value keeps to
         * it anyway, and inflating with its window is what the value is for.
         * client_no_context_takeover is echoed when the client offered it. */
        int n = snprintf(response, cap, "permessage-deflate; server_no_context_takeover%s",
                         pp.client_no_context_takeover ? "; client_no_context_takeover" : "");
        if (n > 0 && (seen & P_SERVER_BITS) && (size_t)n < cap)
            snprintf(response + n, cap - (size_t)n, "; server_max_window_bits=%d", pp.server_bits);
        *params = pp;
        return 1;
    }
    return 0;
}

/* --- compressing ------------------------------------------------------------------------------- */

/* One compressor per window size and level, made when first needed: a deflate stream costs a few
 * hundred KiB, which is paid once for the process rather than once per connection. */
static z_stream *compressors[16 - PMD_MIN_SERVER_BITS][9];

static z_stream *compressor(int bits, int level)
{
    if (bits < PMD_MIN_SERVER_BITS)
        bits = PMD_MIN_SERVER_BITS;
    if (bits > 15)
        bits = 15;
    if (level < 1)
        level = 1;
    if (level > 9)
        level = 9;
    z_stream **slot = &compressors[bits - PMD_MIN_SERVER_BITS][level - 1];
    if (!*slot) {
        z_stream *z = xcalloc(1, sizeof(*z));
        int rc = deflateInit2(z, level, Z_DEFLATED, -bits, 8, Z_DEFAULT_STRATEGY);
        if (rc != Z_OK)
            zlib_fatal("deflateInit2", rc);
        *slot = z;
    } else {
        deflateReset(*slot); /* no context takeover: each message from an empty window */
    }
    return *slot;
}

int pmd_compress(int window_bits, int level, size_t min_size, const void *msg, size_t len, struct buf *out)
{
    out->len = 0;
    if (len == 0 || len < min_size || len > UINT_MAX - 4) {
        pmd_stats.not_compressed++;
        return 0;
    }
    z_stream *z = compressor(window_bits, level);
    /* Output room for the message's own size plus the tail: anything that does not fit would not
     * be smaller than the message, so deflate is stopped there rather than run to the end. */
    size_t room = len + sizeof(pmd_tail);
    uint8_t *o = (uint8_t *)buf_reserve(out, room);
    z->next_in = msg;
    z->avail_in = (uInt)len;
    z->next_out = o;
    z->avail_out = (uInt)room;
    int rc = deflate(z, Z_SYNC_FLUSH);
    size_t n = room - z->avail_out;
    if (rc != Z_OK || z->avail_in || !z->avail_out || n < sizeof(pmd_tail) ||
        memcmp(o + n - sizeof(pmd_tail), pmd_tail, sizeof(pmd_tail)) != 0 || n - sizeof(pmd_tail) >= len) {
        pmd_stats.not_compressed++;
        return 0;
    }
    out->len = n - sizeof(pmd_tail);
    pmd_stats.compressed++;
    pmd_stats.compress_bytes_in += len;
    pmd_stats.compress_bytes_out += out->len;
    return 1;
}

/* --- inflating --------------------------------------------------------------------------------- */

struct pmd_inflater {
    z_stream z;
    uint32_t utf8;        /* UTF-8 state of the text message being inflated */
    uint8_t no_context_takeover;
    uint8_t in_message;   /* a message has been started and not finished */
    uint8_t ended;        /* its deflate data ended with a final block (BFINAL) */
};

struct pmd_inflater *pmd_inflater_new(int no_context_takeover)
{
    struct pmd_inflater *f = xcalloc(1, sizeof(*f));
    /* Always the largest window, whatever the client promised: a larger window never hurts
     * inflating, and with a smaller one zlib's verdict on a distance past the window would depend
     * on how the output happened to be cut (it may copy from the output buffer it was given), so
     * the same bytes could pass whole and fail in pieces. zlib allocates the window lazily. */
    int rc = inflateInit2(&f->z, -15);
    if (rc != Z_OK)
        zlib_fatal("inflateInit2", rc);
    f->no_context_takeover = (uint8_t)!!no_context_takeover;
    pmd_stats.inflaters++;
    return f;
}

void pmd_inflater_free(struct pmd_inflater *f)
{
    if (!f)
        return;
    inflateEnd(&f->z);
    free(f);
    pmd_stats.inflaters--;
}

int pmd_inflater_idle(const struct pmd_inflater *f) { return !f->in_message; }

/* Fail the message: the inflater is made ready for a new one (the connection is closing anyway). */
static int inflate_fail(struct pmd_inflater *f, int code, const char *text, const char **why)
{
    inflateReset(&f->z);
    f->in_message = 0;
    f->ended = 0;
    *why = text;
    return code;
}

/* Run in[0..len) through the inflater, appending to out without letting it pass max bytes. */
static int pour(struct pmd_inflater *f, const uint8_t *in, size_t len, int text, struct buf *out, size_t max,
                const char **why)
{
    z_stream *z = &f->z;
    if (f->ended) {
        /* Only our own tail may follow a final block; the client's data may not. */
        return len ? inflate_fail(f, WS_CLOSE_INVALID_DATA, "data after the final deflate block", why) : 0;
    }
    if (out->len > max)
        return inflate_fail(f, WS_CLOSE_TOO_BIG, "message too big", why);
    z->next_in = in;
    z->avail_in = 0;
    for (;;) {
        if (!z->avail_in && len) {
            /* avail_in is 32 bits wide: feed larger inputs in slices. */
            uInt take = len > (1u << 30) ? (1u << 30) : (uInt)len;
            z->avail_in = take;
            len -= take;
        }
        uint8_t probe, *o;
        size_t room = max - out->len;
        if (room) {
            o = (uint8_t *)buf_reserve(out, room < 16384 ? room : 16384);
            if (room > out->cap - out->len)
                room = out->cap - out->len;
            if (room > (1u << 30))
                room = 1u << 30;
        } else {
            /* At the limit: one more byte of output, and the message is too big. */
            o = &probe;
            room = 1;
        }
        z->next_out = o;
        z->avail_out = (uInt)room;
        int rc = inflate(z, Z_SYNC_FLUSH);
        size_t n = room - z->avail_out;
        if (n && o == &probe)
            return inflate_fail(f, WS_CLOSE_TOO_BIG, "message too big", why);
        if (text && n && ws_utf8_feed(&f->utf8, o, n) < 0)
            return inflate_fail(f, WS_CLOSE_INVALID_DATA, "invalid UTF-8 in text message", why);
        out->len += n;
        pmd_stats.inflate_bytes_out += n;
        if (rc == Z_STREAM_END) {
            f->ended = 1;
            if (z->avail_in || len)
                return inflate_fail(f, WS_CLOSE_INVALID_DATA, "data after the final deflate block", why);
            return 0;
        }
        if (rc == Z_MEM_ERROR)
            zlib_fatal("inflate", rc);
        if (rc != Z_OK && rc != Z_BUF_ERROR) /* Z_DATA_ERROR; Z_NEED_DICT cannot be met in raw mode */
            return inflate_fail(f, WS_CLOSE_INVALID_DATA, z->msg ? z->msg : "invalid compressed data", why);
        /* Done once all input is taken and the output was not filled (nothing is left inside). */
        if (!z->avail_in && !len && z->avail_out)
            return 0;
        if (rc == Z_BUF_ERROR && z->avail_out && z->avail_in)
            return inflate_fail(f, WS_CLOSE_INVALID_DATA, "invalid compressed data", why); /* no progress */
    }
}

/* A final block ended the stream, but the client keeps its context: go on with a new stream that
 * still sees the window of everything inflated so far. */
static void restart_keeping_window(struct pmd_inflater *f)
{
    uint8_t dict[1 << 15];
    uInt n = sizeof(dict);
    if (inflateGetDictionary(&f->z, dict, &n) != Z_OK)
        n = 0;
    inflateReset(&f->z);
    if (n)
        inflateSetDictionary(&f->z, dict, n);
}

int pmd_inflate(struct pmd_inflater *f, const uint8_t *in, size_t len, int fin, int text, struct buf *out,
                size_t max, const char **why)
{
    if (!f->in_message) {
        f->in_message = 1;
        f->ended = 0;
        f->utf8 = WS_UTF8_ACCEPT;
        pmd_stats.inflated++;
    }
    pmd_stats.inflate_bytes_in += len;
    int rc = pour(f, in, len, text, out, max, why);
    if (rc || !fin)
        return rc;
    if (!f->ended) {
        if ((rc = pour(f, pmd_tail, sizeof(pmd_tail), text, out, max, why)))
            return rc;
        /* After the tail, inflate must be between blocks; anywhere else the client's data stopped
         * in the middle of a block. */
        if (!f->ended && !(f->z.data_type & 128))
            return inflate_fail(f, WS_CLOSE_INVALID_DATA, "compressed message ends inside a deflate block",
                                why);
    }
    if (text && f->utf8 != WS_UTF8_ACCEPT)
        return inflate_fail(f, WS_CLOSE_INVALID_DATA, "invalid UTF-8 in text message", why);
    if (f->no_context_takeover)
        inflateReset(&f->z);
    else if (f->ended)
        restart_keeping_window(f);
    f->in_message = 0;
    f->ended = 0;
    return 0;
}

/* --- figures ----------------------------------------------------------------------------------- */

static const struct {
    const char *name;
    int counter;
    const char *help;
    const uint64_t *value;
} pmd_figures[] = {
    {"deflate_websockets", 0, "WebSockets that negotiated permessage-deflate", &pmd_stats.websockets},
    {"deflate_inflaters", 0, "Inflate streams allocated for clients' compressed messages", &pmd_stats.inflaters},
    {"deflate_compressed", 1, "Messages compressed (once per message per group of subscribers)",
     &pmd_stats.compressed},
    {"deflate_not_compressed", 1, "Messages sent uncompressed to deflate peers: short or incompressible",
     &pmd_stats.not_compressed},
    {"deflate_compress_bytes_in", 1, "Payload bytes of compressed messages before compression",
     &pmd_stats.compress_bytes_in},
    {"deflate_compress_bytes_out", 1, "Payload bytes of compressed messages after compression",
     &pmd_stats.compress_bytes_out},
    {"deflate_inflated", 1, "Compressed client messages inflated", &pmd_stats.inflated},
    {"deflate_inflate_bytes_in", 1, "Compressed bytes received from clients", &pmd_stats.inflate_bytes_in},
    {"deflate_inflate_bytes_out", 1, "Bytes inflated from clients' messages", &pmd_stats.inflate_bytes_out},
};

void pmd_stats_json(struct buf *out, void *arg)
{
    (void)arg;
    for (size_t i = 0; i < sizeof(pmd_figures) / sizeof(pmd_figures[0]); i++)
        buf_printf(out, "%s\"%s\":%llu", i ? "," : "", pmd_figures[i].name,
                   (unsigned long long)*pmd_figures[i].value);
}

void pmd_stats_prom(struct buf *out, void *arg)
{
    (void)arg;
    for (size_t i = 0; i < sizeof(pmd_figures) / sizeof(pmd_figures[0]); i++) {
        const char *suffix = pmd_figures[i].counter ? "_total" : "";
        buf_printf(out, "# HELP herald_%s%s %s\n# TYPE herald_%s%s %s\nherald_%s%s %llu\n", pmd_figures[i].name,
                   suffix, pmd_figures[i].help, pmd_figures[i].name, suffix,
                   pmd_figures[i].counter ? "counter" : "gauge", pmd_figures[i].name, suffix,
                   (unsigned long long)*pmd_figures[i].value);
    }
}
