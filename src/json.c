/* json.c - strict RFC 8259 JSON scanning for the publish path.
 *
 * This module owns everything herald knows about JSON syntax: deciding whether bytes are one valid
 * JSON document, finding the values of an object's top-level members without building a tree, and
 * converting between JSON string tokens and raw bytes. Values are only ever located, never rebuilt,
 * so a published value goes out with its original digits, spacing and key order.
 *
 * Everything is a single forward pass with no allocation. Nested containers are tracked on a small
 * explicit stack of JSON_MAX_DEPTH bytes instead of by recursion, so a hostile document costs time
 * linear in its length and a fixed amount of stack.
 *
 * Error offsets ("invalid JSON at byte N") name the first byte at which the input stops being the
 * beginning of any valid document; for a document that is merely cut short, N is its length. In a
 * bad UTF-8 sequence that is the first byte that can't continue it (the 0x80 in E0 80, the lead byte
 * itself for C0 or F5), following Unicode Table 3-7.
 *
 * json_string_encode replaces invalid UTF-8 by U+FFFD per "maximal subpart" (Unicode ch. 3, U+FFFD
 * substitution): a truncated or broken sequence that started with a valid lead byte becomes one
 * U+FFFD, and every byte that can't start a sequence becomes one U+FFFD of its own. */
#include "json.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Keys written with escapes are decoded into a buffer of this size before being compared with the
 * requested keys; longer ones can't match. Keys without escapes are compared in place, any length. */
#define JSON_KEY_BUF 128

#define JSON_ONES 0x0101010101010101ULL
#define JSON_HIGHS 0x8080808080808080ULL

/* Scanner state shared by the helpers: where the input ends and, after a failure, where and why. */
struct json_scan {
    const unsigned char *end;
    const unsigned char *bad; /* first byte that can't continue a valid document */
    int too_deep;
};

static const unsigned char *json_fail(struct json_scan *s, const unsigned char *at)
{
    s->bad = at;
    return NULL;
}

static const unsigned char *json_skip_ws(const unsigned char *p, const unsigned char *end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

static int json_is_plain(unsigned c)
{
    return c >= 0x20 && c < 0x80 && c != '"' && c != '\\';
}

/* Nonzero when any of the 8 bytes of w needs a closer look inside a string: a quote, a backslash, a
 * control character or part of a multi-byte UTF-8 sequence. When no byte has its top bit set, each
 * subtraction can only borrow out of a byte that really is below the bound, so the test is exact
 * about whether such a byte exists (though not about which one, which the byte loop finds). */
static uint64_t json_word_special(uint64_t w)
{
    uint64_t q = w ^ (JSON_ONES * '"'), b = w ^ (JSON_ONES * '\\');
    return ((w - JSON_ONES * 0x20) | (q - JSON_ONES) | (b - JSON_ONES) | w) & JSON_HIGHS;
}

/* Skip string bytes that need no attention. Messages are mostly ASCII text, so this runs eight
 * bytes at a time and the caller handles the one byte it stops at. */
static const unsigned char *json_skip_plain(const unsigned char *p, const unsigned char *end)
{
    while (end - p >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        if (json_word_special(w))
            break;
        p += 8;
    }
    while (p < end && json_is_plain(*p))
        p++;
    return p;
}

/* Length of the valid UTF-8 sequence that starts with the non-ASCII byte at p, or 0 with *bad set to
 * the first byte that makes it invalid (end when it is cut short). The ranges of Unicode Table 3-7
 * rule out overlong forms, surrogates and code points above U+10FFFF. */
static size_t json_utf8_seq(const unsigned char *p, const unsigned char *end,
                            const unsigned char **bad)
{
    unsigned c = p[0], lo = 0x80, hi = 0xBF;
    size_t n;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        *bad = p;
        return 0;
    }
    for (size_t i = 1; i < n; i++) {
        if ((size_t)(end - p) <= i) {
            *bad = end;
            return 0;
        }
        if (p[i] < lo || p[i] > hi) {
            *bad = p + i;
            return 0;
        }
        lo = 0x80;
        hi = 0xBF;
    }
    return n;
}

static int json_hex(unsigned c)
{
    if (c >= '0' && c <= '9')
        return (int)(c - '0');
    c |= 0x20;
    if (c >= 'a' && c <= 'f')
        return (int)(c - 'a' + 10);
    return -1;
}

/* The value of the four hex digits at p, or -1 (with *bad at the offending byte when bad is set). */
static long json_hex4(const unsigned char *p, const unsigned char *end, const unsigned char **bad)
{
    long v = 0;
    for (int i = 0; i < 4; i++) {
        if (end - p <= i) {
            if (bad)
                *bad = end;
            return -1;
        }
        int h = json_hex(p[i]);
        if (h < 0) {
            if (bad)
                *bad = p + i;
            return -1;
        }
        v = v << 4 | h;
    }
    return v;
}

/* Scan the string token whose opening quote is at p; return the byte after its closing quote. Sets
 * *escaped when the token contains a backslash, so a key without one can be compared in place. */
static const unsigned char *json_scan_string(struct json_scan *s, const unsigned char *p,
                                             int *escaped)
{
    const unsigned char *end = s->end, *bad;
    p++;
    for (;;) {
        p = json_skip_plain(p, end);
        if (p == end)
            return json_fail(s, end);
        unsigned c = *p;
        if (c == '"')
            return p + 1;
        if (c == '\\') {
            *escaped = 1;
            if (end - p < 2)
                return json_fail(s, end);
            switch (p[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p += 2;
                break;
            case 'u':
                /* A lone surrogate escape is syntactically fine (RFC 8259 section 8.2); only
                 * json_string_decode, which must produce UTF-8, refuses it. */
                if (json_hex4(p + 2, end, &bad) < 0)
                    return json_fail(s, bad);
                p += 6;
                break;
            default:
                return json_fail(s, p + 1);
            }
        } else if (c < 0x20) {
            return json_fail(s, p);
        } else {
            size_t n = json_utf8_seq(p, end, &bad);
            if (!n)
                return json_fail(s, bad);
            p += n;
        }
    }
}

static int json_is_digit(unsigned c)
{
    return c - '0' < 10;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? with any number of digits: the value is never
 * converted here, so its size doesn't matter. */
static const unsigned char *json_scan_number(struct json_scan *s, const unsigned char *p)
{
    const unsigned char *end = s->end;
    if (*p == '-')
        p++;
    if (p == end)
        return json_fail(s, end);
    if (*p == '0') {
        p++;
    } else if (json_is_digit(*p)) {
        while (++p < end && json_is_digit(*p))
            ;
    } else {
        return json_fail(s, p);
    }
    if (p < end && *p == '.') {
        if (++p == end)
            return json_fail(s, end);
        if (!json_is_digit(*p))
            return json_fail(s, p);
        while (++p < end && json_is_digit(*p))
            ;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        if (++p < end && (*p == '+' || *p == '-'))
            p++;
        if (p == end)
            return json_fail(s, end);
        if (!json_is_digit(*p))
            return json_fail(s, p);
        while (++p < end && json_is_digit(*p))
            ;
    }
    return p;
}

static const unsigned char *json_scan_literal(struct json_scan *s, const unsigned char *p,
                                              const char *word, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if ((size_t)(s->end - p) <= i)
            return json_fail(s, s->end);
        if (p[i] != (unsigned char)word[i])
            return json_fail(s, p + i);
    }
    return p + n;
}

/* Scan `"key" :` at p and return the start of the member's value (whitespace skipped). */
static const unsigned char *json_scan_key(struct json_scan *s, const unsigned char *p)
{
    int escaped = 0;
    if (p == s->end)
        return json_fail(s, p);
    if (*p != '"')
        return json_fail(s, p);
    if (!(p = json_scan_string(s, p, &escaped)))
        return NULL;
    p = json_skip_ws(p, s->end);
    if (p == s->end || *p != ':')
        return json_fail(s, p);
    return json_skip_ws(p + 1, s->end);
}

static enum json_type json_type_of(unsigned c)
{
    switch (c) {
    case '{': return JSON_OBJECT;
    case '[': return JSON_ARRAY;
    case '"': return JSON_STRING;
    case 't': return JSON_TRUE;
    case 'f': return JSON_FALSE;
    case 'n': return JSON_NULL;
    default: return c == '-' || json_is_digit(c) ? JSON_NUMBER : JSON_NONE;
    }
}

/* Scan the one value that starts at p (whitespace already skipped), which sits inside `depth` open
 * containers; return the byte after it. The containers it opens itself are remembered on `open`
 * (their closing brackets), which is what bounds the work per level instead of the C stack. */
static const unsigned char *json_scan_value(struct json_scan *s, const unsigned char *p, int depth,
                                            enum json_type *type)
{
    const unsigned char *end = s->end;
    unsigned char open[JSON_MAX_DEPTH];
    int top = 0, escaped = 0;
    *type = p < end ? json_type_of(*p) : JSON_NONE;
    for (;;) {
        /* p is where a value must start. */
        if (p == end)
            return json_fail(s, end);
        switch (*p) {
        case '{':
        case '[':
            if (depth + top >= JSON_MAX_DEPTH) {
                s->too_deep = 1;
                return json_fail(s, p);
            }
            open[top++] = *p == '{' ? '}' : ']';
            p = json_skip_ws(p + 1, end);
            if (p < end && *p == open[top - 1]) {
                p++;
                top--;
                break; /* an empty container is a complete value */
            }
            if (open[top - 1] == '}' && !(p = json_scan_key(s, p)))
                return NULL;
            continue;
        case '"':
            p = json_scan_string(s, p, &escaped);
            break;
        case 't':
            p = json_scan_literal(s, p, "true", 4);
            break;
        case 'f':
            p = json_scan_literal(s, p, "false", 5);
            break;
        case 'n':
            p = json_scan_literal(s, p, "null", 4);
            break;
        default:
            if (*p != '-' && !json_is_digit(*p))
                return json_fail(s, p);
            p = json_scan_number(s, p);
            break;
        }
        if (!p)
            return NULL;
        /* A value is complete: close the containers it completes, then go on to the next one. */
        for (;;) {
            if (top == 0)
                return p;
            p = json_skip_ws(p, end);
            if (p == end)
                return json_fail(s, end);
            if (*p == open[top - 1]) {
                p++;
                top--;
                continue;
            }
            if (*p != ',')
                return json_fail(s, p);
            p = json_skip_ws(p + 1, end);
            if (open[top - 1] == '}' && !(p = json_scan_key(s, p)))
                return NULL;
            break;
        }
    }
}

int json_valid(const char *text, size_t len)
{
    if (len == 0)
        return 0;
    const unsigned char *p = (const unsigned char *)text, *end = p + len;
    struct json_scan s = {.end = end};
    enum json_type type;
    p = json_skip_ws(p, end);
    if (!(p = json_scan_value(&s, p, 0, &type)))
        return 0;
    return json_skip_ws(p, end) == end;
}

/* Is the decoded key name[0..n) the C string want? name may hold NUL bytes (from \u0000), want
 * can't, and want is never read past its terminator. */
static int json_name_eq(const char *want, const unsigned char *name, size_t n)
{
    size_t i = 0;
    while (i < n && want[i] != '\0' && (unsigned char)want[i] == name[i])
        i++;
    return i == n && want[i] == '\0';
}

static ssize_t json_unescape(const unsigned char *p, const unsigned char *end, char *out,
                             size_t cap);

int json_object_scan(const char *text, size_t len, const char *const *keys, struct json_span *spans,
                     size_t nkeys, const char **error, char error_buf[64])
{
    const unsigned char *start = (const unsigned char *)text, *p, *end;
    struct json_scan s = {0};
    const char *msg;
    for (size_t i = 0; i < nkeys; i++)
        spans[i] = (struct json_span){JSON_NONE, NULL, 0};
    if (len == 0) {
        msg = "not a JSON object";
        goto fail;
    }
    s.end = end = start + len;
    p = json_skip_ws(start, end);
    if (p == end || *p != '{') {
        msg = "not a JSON object";
        goto fail;
    }
    p = json_skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        p++;
    } else {
        for (;;) {
            const unsigned char *key = p, *key_end, *value;
            int escaped = 0;
            enum json_type type;
            if (p == end || *p != '"') {
                s.bad = p;
                goto invalid;
            }
            if (!(key_end = json_scan_string(&s, p, &escaped)))
                goto invalid;
            p = json_skip_ws(key_end, end);
            if (p == end || *p != ':') {
                s.bad = p;
                goto invalid;
            }
            value = p = json_skip_ws(p + 1, end);
            if (!(p = json_scan_value(&s, p, 1, &type)))
                goto invalid;

            const unsigned char *name = key + 1;
            size_t name_len = (size_t)(key_end - key) - 2;
            unsigned char decoded[JSON_KEY_BUF];
            if (escaped && nkeys) {
                ssize_t n = json_unescape(key + 1, key_end, (char *)decoded, sizeof(decoded));
                name = decoded;
                name_len = n < 0 ? SIZE_MAX : (size_t)n; /* too long or a lone surrogate */
            }
            for (size_t i = 0; i < nkeys && name_len != SIZE_MAX; i++) {
                if (!json_name_eq(keys[i], name, name_len))
                    continue;
                if (spans[i].type != JSON_NONE) {
                    if (error_buf) {
                        snprintf(error_buf, 64, "duplicate key \"%.40s\"", keys[i]);
                        msg = error_buf;
                    } else {
                        msg = "duplicate key";
                    }
                    goto fail;
                }
                spans[i] = (struct json_span){type, (const char *)value, (size_t)(p - value)};
            }

            p = json_skip_ws(p, end);
            if (p < end && *p == '}') {
                p++;
                break;
            }
            if (p == end || *p != ',') {
                s.bad = p;
                goto invalid;
            }
            p = json_skip_ws(p + 1, end);
        }
    }
    p = json_skip_ws(p, end);
    if (p == end)
        return 0;
    s.bad = p;
invalid:
    if (s.too_deep) {
        msg = "nesting too deep";
    } else if (error_buf) {
        snprintf(error_buf, 64, "invalid JSON at byte %zu", (size_t)(s.bad - start));
        msg = error_buf;
    } else {
        msg = "invalid JSON";
    }
fail:
    for (size_t i = 0; i < nkeys; i++)
        spans[i] = (struct json_span){JSON_NONE, NULL, 0};
    if (error)
        *error = msg;
    return -1;
}

/* Write code point cp (not a surrogate, at most U+10FFFF) as UTF-8; return its length. */
static size_t json_utf8_put(unsigned long cp, unsigned char *out)
{
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | cp >> 6);
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | cp >> 12);
        out[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | cp >> 18);
    out[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
    out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decode the body of a string token: p is just past its opening quote and its closing quote must be
 * end[-1]. Writes at most cap bytes. Returns the decoded length, or -1 when the token is malformed,
 * holds an unpaired surrogate escape or doesn't fit. The token is checked as strictly as json_valid
 * does (including raw UTF-8), so whatever decodes successfully is valid UTF-8. */
static ssize_t json_unescape(const unsigned char *p, const unsigned char *end, char *out, size_t cap)
{
    size_t n = 0;
    for (;;) {
        const unsigned char *run = p;
        p = json_skip_plain(p, end);
        size_t k = (size_t)(p - run);
        if (k > cap - n)
            return -1;
        memcpy(out + n, run, k);
        n += k;
        if (p == end)
            return -1;
        unsigned c = *p;
        if (c == '"')
            return p + 1 == end ? (ssize_t)n : -1;
        if (c < 0x20)
            return -1;
        unsigned char seq[4];
        const unsigned char *from = seq;
        if (c < 0x80) { /* a backslash */
            if (end - p < 2)
                return -1;
            switch (p[1]) {
            case '"': case '\\': case '/': seq[0] = p[1]; k = 1; break;
            case 'b': seq[0] = '\b'; k = 1; break;
            case 'f': seq[0] = '\f'; k = 1; break;
            case 'n': seq[0] = '\n'; k = 1; break;
            case 'r': seq[0] = '\r'; k = 1; break;
            case 't': seq[0] = '\t'; k = 1; break;
            case 'u': {
                long cp = json_hex4(p + 2, end, NULL);
                if (cp < 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
                    return -1;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    /* Only a high surrogate immediately followed by a low one is a character. */
                    if (end - p < 12 || p[6] != '\\' || p[7] != 'u')
                        return -1;
                    long low = json_hex4(p + 8, end, NULL);
                    if (low < 0xDC00 || low > 0xDFFF)
                        return -1;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    p += 6;
                }
                k = json_utf8_put((unsigned long)cp, seq);
                p += 4;
                break;
            }
            default:
                return -1;
            }
            p += 2;
        } else {
            const unsigned char *bad;
            if (!(k = json_utf8_seq(p, end, &bad)))
                return -1;
            from = p;
            p += k;
        }
        if (k > cap - n)
            return -1;
        memcpy(out + n, from, k);
        n += k;
    }
}

ssize_t json_string_decode(const char *text, size_t len, char *out)
{
    if (len < 2 || text[0] != '"')
        return -1;
    const unsigned char *p = (const unsigned char *)text;
    return json_unescape(p + 1, p + len, out, len);
}

size_t json_string_encode(const char *text, size_t len, char *out)
{
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    *o++ = '"';
    if (len == 0) {
        *o++ = '"';
        return 2;
    }
    const unsigned char *p = (const unsigned char *)text, *end = p + len;
    while (p < end) {
        const unsigned char *run = p;
        p = json_skip_plain(p, end);
        memcpy(o, run, (size_t)(p - run));
        o += p - run;
        if (p == end)
            break;
        unsigned c = *p;
        if (c >= 0x80) {
            const unsigned char *bad;
            size_t n = json_utf8_seq(p, end, &bad);
            if (n) {
                memcpy(o, p, n);
                o += n;
                p += n;
            } else {
                /* One U+FFFD for the maximal subpart: the bytes before the one that broke a
                 * sequence with a valid lead, or the lone byte that can't lead one. */
                memcpy(o, "\xEF\xBF\xBD", 3);
                o += 3;
                p = bad > p ? bad : p + 1;
            }
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            memcpy(o, "u00", 3);
            o[3] = hex[c >> 4];
            o[4] = hex[c & 15];
            o += 5;
            break;
        }
        p++;
    }
    *o++ = '"';
    return (size_t)(o - out);
}
