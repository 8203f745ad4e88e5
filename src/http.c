/* http.c - strict, allocation-free HTTP/1.1 request parsing (RFC 9112): request heads, chunked
 * bodies, percent-decoding and token lists, for bytes that come straight off the internet. */
#include "http.h"

#include <limits.h>
#include <string.h>

/* Larger Content-Length or chunk-size values are refused: no sane body is that big, and the cap
 * keeps every sum and product of them far from overflow (and exact in a double). */
#define HTTP_MAX_LENGTH ((uint64_t)1 << 53)

static int http_is_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* field-vchar, SP and HT (RFC 9110 5.5): obs-text is let through, other controls are not, since
 * a stray CR or NUL in a value is how smuggling and log-injection attacks begin. */
static int http_is_value_char(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

/* Origin-form bytes: visible ASCII only. '#' starts a fragment, which a client must not send. */
static int http_is_target_char(unsigned char c) { return c > 0x20 && c < 0x7f && c != '#'; }

static int http_lower(unsigned char c) { return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c; }

static int http_hex(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = (unsigned char)http_lower(c);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Case-insensitive comparison of s[0..len) with the C string lit. */
static int http_name_is(const char *s, size_t len, const char *lit)
{
    size_t n = strlen(lit);
    if (len != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (http_lower((unsigned char)s[i]) != http_lower((unsigned char)lit[i]))
            return 0;
    return 1;
}

/* Content-Length is 1*DIGIT; lists ("5, 5"), signs and whitespace are refused rather than guessed
 * at, since two parsers disagreeing about a body's length is request smuggling. */
static int64_t http_parse_length(const char *s, size_t len)
{
    uint64_t v = 0;
    if (len == 0)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
        if (v > HTTP_MAX_LENGTH)
            return -1;
    }
    return (int64_t)v;
}

/* Parse the request line and header fields of buf[0..len). Every byte is checked as soon as it is
 * seen, so junk and limit overruns are reported without waiting for the rest of the head.
 *
 * Choices where RFC 9112 leaves room, all on the strict side:
 * - lines must end in CRLF: a bare LF is 400 (RFC 9112 2.2 allows accepting it, but a proxy in
 *   front of us may not split lines the same way);
 * - the request line is exactly "method SP target SP HTTP/d.d CRLF", one space each;
 * - only origin-form targets ("/path?query") are accepted; absolute-form and "*" are 400, as this
 *   is an origin server, not a proxy;
 * - Transfer-Encoding in an HTTP/1.0 request is 400 (RFC 9112 6.1 calls its framing faulty);
 * - the Host header is left to the caller to check. */
int http_parse_request(const char *buf, size_t len, const struct http_limits *limits,
                       struct http_request *req)
{
    const unsigned char *p = (const unsigned char *)buf;
    size_t max_head = limits->max_head < INT_MAX ? limits->max_head : INT_MAX;
    size_t max_headers =
        limits->max_headers < HTTP_MAX_HEADERS ? limits->max_headers : HTTP_MAX_HEADERS;
    size_t end = len < max_head ? len : max_head; /* never look at or past this */
    size_t i = 0, start;
    int more_err; /* what running out of room at max_head means at this point */

    req->method = req->target = req->path = req->query = NULL;
    req->method_len = req->target_len = req->path_len = req->query_len = 0;
    req->minor_version = 0;
    req->head_len = 0;
    req->num_headers = 0;
    req->content_length = -1;
    req->chunked = 0;
    req->keep_alive = 0;

    /* Empty lines before the request line (RFC 9112 2.2): they count against max_head. */
    more_err = -431;
    for (;;) {
        if (i == end)
            goto more;
        if (p[i] != '\r')
            break;
        if (i + 1 == end)
            goto more;
        if (p[i + 1] != '\n')
            return -400;
        i += 2;
    }

    /* method SP */
    more_err = -414;
    start = i;
    while (i < end && http_is_tchar(p[i]))
        i++;
    if (i == end)
        goto more;
    if (i == start || p[i] != ' ')
        return -400;
    req->method = buf + start;
    req->method_len = i - start;
    i++;

    /* request-target SP */
    start = i;
    if (i == end)
        goto more;
    if (p[i] != '/')
        return -400;
    while (i < end && http_is_target_char(p[i])) {
        if (p[i] == '?' && !req->query)
            req->query = buf + i + 1;
        i++;
    }
    if (i == end)
        goto more;
    if (p[i] != ' ')
        return -400;
    req->target = buf + start;
    req->target_len = i - start;
    if (req->query) {
        req->path_len = (size_t)(req->query - 1 - req->target);
        req->query_len = (size_t)(buf + i - req->query);
    } else {
        req->path_len = req->target_len;
    }
    req->path = req->target;
    i++;

    /* HTTP-version CRLF: "HTTP/d.d" is the only shape; a well-formed version other than 1.0 and 1.1
     * is 505, anything else 400. */
    for (size_t k = 0; k < 8; k++, i++) {
        if (i == end)
            goto more;
        if (k < 5 ? p[i] != (unsigned char)"HTTP/"[k]
                  : k == 6 ? p[i] != '.' : (p[i] < '0' || p[i] > '9'))
            return -400;
    }
    if (i == end)
        goto more;
    if (p[i] != '\r')
        return -400;
    if (i + 1 == end)
        goto more;
    if (p[i + 1] != '\n')
        return -400;
    if (p[i - 3] != '1' || (p[i - 1] != '0' && p[i - 1] != '1'))
        return -505;
    req->minor_version = p[i - 1] - '0';
    i += 2;

    /* *(field-name ":" OWS field-value OWS CRLF) CRLF */
    more_err = -431;
    for (;;) {
        size_t name_end, value_start, value_end;

        if (i == end)
            goto more;
        if (p[i] == '\r') {
            if (i + 1 == end)
                goto more;
            if (p[i + 1] != '\n')
                return -400;
            i += 2;
            break;
        }
        /* This also refuses obs-fold (a line starting with SP or HT), bare LF and an empty name. */
        if (!http_is_tchar(p[i]))
            return -400;
        if (req->num_headers == max_headers)
            return -431;
        start = i;
        while (i < end && http_is_tchar(p[i]))
            i++;
        if (i == end)
            goto more;
        if (p[i] != ':') /* whitespace before the colon included (RFC 9112 5.1) */
            return -400;
        name_end = i++;
        while (i < end && (p[i] == ' ' || p[i] == '\t'))
            i++;
        value_start = i;
        while (i < end && http_is_value_char(p[i]))
            i++;
        if (i == end)
            goto more;
        if (p[i] != '\r')
            return -400;
        value_end = i;
        while (value_end > value_start && (p[value_end - 1] == ' ' || p[value_end - 1] == '\t'))
            value_end--;
        if (i + 1 == end)
            goto more;
        if (p[i + 1] != '\n')
            return -400;
        i += 2;

        struct http_header *h = &req->headers[req->num_headers++];
        h->name = buf + start;
        h->name_len = name_end - start;
        h->value = buf + value_start;
        h->value_len = value_end - value_start;
    }
    req->head_len = i;

    /* The headers that decide framing and persistence. */
    int te_seen = 0, te_chunked = 0, te_other = 0, conn_close = 0, conn_keep = 0;
    for (size_t h = 0; h < req->num_headers; h++) {
        const struct http_header *f = &req->headers[h];
        if (http_name_is(f->name, f->name_len, "content-length")) {
            int64_t v = http_parse_length(f->value, f->value_len);
            if (v < 0 || (req->content_length >= 0 && v != req->content_length))
                return -400;
            req->content_length = v;
        } else if (http_name_is(f->name, f->name_len, "transfer-encoding")) {
            /* The codings of every Transfer-Encoding field form one list (RFC 9110 5.3). */
            const char *s = f->value, *e = f->value + f->value_len;
            te_seen = 1;
            while (s < e) {
                const char *comma = memchr(s, ',', (size_t)(e - s));
                const char *el_end = comma ? comma : e;
                while (s < el_end && (*s == ' ' || *s == '\t'))
                    s++;
                const char *t = el_end;
                while (t > s && (t[-1] == ' ' || t[-1] == '\t'))
                    t--;
                if (t > s) {
                    if (http_name_is(s, (size_t)(t - s), "chunked"))
                        te_chunked++;
                    else
                        te_other = 1;
                }
                s = comma ? comma + 1 : e;
            }
        } else if (http_name_is(f->name, f->name_len, "connection")) {
            conn_close |= http_has_token(f->value, f->value_len, "close");
            conn_keep |= http_has_token(f->value, f->value_len, "keep-alive");
        }
    }
    if (te_seen) {
        /* Both framings at once is the classic smuggling vector: refuse it (RFC 9112 6.3). */
        if (req->content_length >= 0 || req->minor_version == 0)
            return -400;
        if (te_other)
            return -501;
        if (te_chunked != 1) /* an empty list, or chunked applied twice */
            return -400;
        req->chunked = 1;
    }
    req->keep_alive = req->minor_version == 1 ? !conn_close : conn_keep && !conn_close;
    return (int)i;

more:
    /* Out of bytes. Below max_head the rest may still come; at max_head the head cannot fit. */
    return len >= max_head ? more_err : 0;
}

const char *http_header_get(const struct http_request *req, const char *name, size_t *len)
{
    for (size_t i = 0; i < req->num_headers; i++) {
        const struct http_header *h = &req->headers[i];
        if (http_name_is(h->name, h->name_len, name)) {
            if (len)
                *len = h->value_len;
            return h->value;
        }
    }
    if (len)
        *len = 0;
    return NULL;
}

int http_has_token(const char *value, size_t len, const char *token)
{
    const char *s = value, *e;
    if (!value)
        return 0;
    e = value + len;
    while (s < e) {
        const char *comma = memchr(s, ',', (size_t)(e - s));
        const char *el_end = comma ? comma : e;
        while (s < el_end && (*s == ' ' || *s == '\t'))
            s++;
        const char *t = el_end;
        while (t > s && (t[-1] == ' ' || t[-1] == '\t'))
            t--;
        if (t > s && http_name_is(s, (size_t)(t - s), token)) /* empty elements are allowed */
            return 1;
        s = comma ? comma + 1 : e;
    }
    return 0;
}

/* Chunked decoder positions: one per place in the RFC 9112 7.1 grammar, so that input split at any
 * byte decodes exactly as input in one piece. */
enum {
    HTTP_CH_SIZE_START,    /* first hex digit of chunk-size */
    HTTP_CH_SIZE,          /* more hex digits, or what follows them */
    HTTP_CH_SIZE_WS,       /* BWS between chunk-size and ';' */
    HTTP_CH_EXT,           /* chunk extensions: skipped to the CR */
    HTTP_CH_SIZE_LF,       /* the LF ending the chunk-size line */
    HTTP_CH_DATA,          /* chunk_left bytes of data */
    HTTP_CH_DATA_CR,       /* CRLF after the data */
    HTTP_CH_DATA_LF,
    HTTP_CH_TRAILER_START, /* start of a trailer field line, or the final CRLF */
    HTTP_CH_TRAILER_NAME,
    HTTP_CH_TRAILER_VALUE,
    HTTP_CH_TRAILER_LF,
    HTTP_CH_END_LF,        /* the LF of the final empty line */
    HTTP_CH_DONE,
    HTTP_CH_ERROR,
};

/* Bytes that carry no body are bounded too: a caller limits the decoded body, and without these a
 * peer could keep a request open forever with endless extensions, trailers or leading zeros
 * (the attack of CVE-2024-22019 on Node.js). Real clients send none of them. */
#define HTTP_CHUNKED_MAX_DIGITS 16   /* hex digits in one chunk-size, leading zeros included */
#define HTTP_CHUNKED_MAX_META 16384  /* bytes of extensions and trailers in the whole body */

/* c->state packs the grammar position (low 4 bits), the current chunk-size's digit count (next 5
 * bits) and the extension and trailer bytes so far (the rest), keeping struct http_chunked as the
 * header declares it. */
#define HTTP_CH_PACK(pos, digits, meta) ((int)((unsigned)(pos) | (digits) << 4 | (meta) << 9))

static int http_ch_is_meta(int pos)
{
    return pos == HTTP_CH_SIZE_WS || pos == HTTP_CH_EXT || pos == HTTP_CH_TRAILER_NAME ||
           pos == HTTP_CH_TRAILER_VALUE || pos == HTTP_CH_TRAILER_LF;
}

void http_chunked_init(struct http_chunked *c)
{
    c->chunk_left = 0;
    c->state = HTTP_CH_PACK(HTTP_CH_SIZE_START, 0u, 0u);
    c->total = 0;
}

int http_chunked_decode(struct http_chunked *c, char *buf, size_t *len, size_t *rest)
{
    size_t in = 0, out = 0, n = *len;
    int pos = c->state & 0xf;
    unsigned digits = ((unsigned)c->state >> 4) & 0x1f, meta = (unsigned)c->state >> 9;
    int r = 0;

    *rest = 0;
    if (pos == HTTP_CH_ERROR) {
        *len = 0;
        return -1;
    }
    if (pos == HTTP_CH_DONE) { /* the body ended in an earlier call: all of this is after it */
        *len = 0;
        *rest = n;
        return 1;
    }
    while (in < n) {
        if (pos == HTTP_CH_DATA) {
            size_t take = n - in;
            if (take > c->chunk_left)
                take = (size_t)c->chunk_left;
            memmove(buf + out, buf + in, take); /* out <= in: the framing only ever shrinks */
            in += take;
            out += take;
            c->chunk_left -= take;
            c->total += take;
            if (c->chunk_left == 0)
                pos = HTTP_CH_DATA_CR;
            continue;
        }

        unsigned char ch = (unsigned char)buf[in++];
        int d, was = pos;
        switch (pos) {
        case HTTP_CH_SIZE_START:
        case HTTP_CH_SIZE:
            if ((d = http_hex(ch)) >= 0) {
                if (++digits > HTTP_CHUNKED_MAX_DIGITS ||
                    c->chunk_left > (HTTP_MAX_LENGTH - (uint64_t)d) / 16)
                    goto bad;
                c->chunk_left = c->chunk_left * 16 + (uint64_t)d;
                pos = HTTP_CH_SIZE;
            } else if (pos == HTTP_CH_SIZE_START) {
                goto bad; /* an empty chunk-size */
            } else if (ch == '\r') {
                pos = HTTP_CH_SIZE_LF;
            } else if (ch == ';') {
                pos = HTTP_CH_EXT;
            } else if (ch == ' ' || ch == '\t') {
                pos = HTTP_CH_SIZE_WS;
            } else {
                goto bad;
            }
            break;
        case HTTP_CH_SIZE_WS: /* whitespace is only allowed ahead of an extension */
            if (ch == ';')
                pos = HTTP_CH_EXT;
            else if (ch != ' ' && ch != '\t')
                goto bad;
            break;
        case HTTP_CH_EXT:
            if (ch == '\r')
                pos = HTTP_CH_SIZE_LF;
            else if (!http_is_value_char(ch))
                goto bad;
            break;
        case HTTP_CH_SIZE_LF:
            if (ch != '\n')
                goto bad;
            digits = 0;
            pos = c->chunk_left ? HTTP_CH_DATA : HTTP_CH_TRAILER_START;
            break;
        case HTTP_CH_DATA_CR:
            if (ch != '\r')
                goto bad;
            pos = HTTP_CH_DATA_LF;
            break;
        case HTTP_CH_DATA_LF:
            if (ch != '\n')
                goto bad;
            pos = HTTP_CH_SIZE_START;
            break;
        case HTTP_CH_TRAILER_START:
            if (ch == '\r') {
                pos = HTTP_CH_END_LF;
            } else if (http_is_tchar(ch)) {
                pos = HTTP_CH_TRAILER_NAME;
            } else {
                goto bad; /* obs-fold, bare LF, junk */
            }
            break;
        case HTTP_CH_TRAILER_NAME:
            if (ch == ':')
                pos = HTTP_CH_TRAILER_VALUE;
            else if (!http_is_tchar(ch))
                goto bad;
            break;
        case HTTP_CH_TRAILER_VALUE:
            if (ch == '\r')
                pos = HTTP_CH_TRAILER_LF;
            else if (!http_is_value_char(ch))
                goto bad;
            break;
        case HTTP_CH_TRAILER_LF:
            if (ch != '\n')
                goto bad;
            pos = HTTP_CH_TRAILER_START;
            break;
        case HTTP_CH_END_LF:
            if (ch != '\n')
                goto bad;
            /* Whatever follows belongs to the next request: keep it, right after the body. */
            pos = HTTP_CH_DONE;
            memmove(buf + out, buf + in, n - in);
            *rest = n - in;
            r = 1;
            goto done;
        default:
            goto bad;
        }
        /* Count every byte of an extension or a trailer line, from its first to its CRLF. */
        if ((http_ch_is_meta(was) || http_ch_is_meta(pos)) && ++meta > HTTP_CHUNKED_MAX_META)
            goto bad;
    }
    goto done;

bad:
    pos = HTTP_CH_ERROR;
    r = -1;
done:
    c->state = HTTP_CH_PACK(pos, digits, meta);
    *len = out;
    return r;
}

/* Decode %XX at s[0..len) (s[0] is the '%'): the byte, or -1 when the escape is cut short or not
 * hex. */
static int http_unescape(const char *s, size_t len)
{
    int hi, lo;
    if (len < 3 || (hi = http_hex((unsigned char)s[1])) < 0 ||
        (lo = http_hex((unsigned char)s[2])) < 0)
        return -1;
    return hi << 4 | lo;
}

ssize_t http_path_decode(const char *src, size_t len, char *out)
{
    size_t i = 0, o = 0;
    while (i < len) {
        int c = (unsigned char)src[i];
        if (c == '%') {
            if ((c = http_unescape(src + i, len - i)) < 0)
                return -1;
            i += 3;
        } else {
            i++;
        }
        /* A NUL would cut the name short wherever it is later used as a C string. */
        if (c == 0)
            return -1;
        out[o++] = (char)c;
    }
    return (ssize_t)o;
}

ssize_t http_query_get(const char *query, size_t len, const char *key, char *out, size_t cap)
{
    size_t klen = strlen(key), i = 0;
    if (!query)
        return -1;
    while (i < len) {
        const char *amp = memchr(query + i, '&', len - i);
        size_t pair_end = amp ? (size_t)(amp - query) : len;
        const char *eq = memchr(query + i, '=', pair_end - i);
        size_t key_end = eq ? (size_t)(eq - query) : pair_end;

        /* Keys are compared as sent: the ones we look up are plain ASCII. */
        if (key_end - i == klen && memcmp(query + i, key, klen) == 0) {
            size_t j = eq ? key_end + 1 : pair_end, o = 0;
            while (j < pair_end) {
                int c = (unsigned char)query[j];
                if (c == '%') {
                    if ((c = http_unescape(query + j, pair_end - j)) < 0)
                        return -2;
                    j += 3;
                } else {
                    if (c == '+')
                        c = ' ';
                    j++;
                }
                if (c == 0 || o == cap)
                    return -2;
                out[o++] = (char)c;
            }
            return (ssize_t)o;
        }
        i = pair_end + 1;
    }
    return -1;
}
