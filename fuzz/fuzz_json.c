/* fuzz_json.c - libFuzzer driver for json.c.
 *
 * Checks json_valid against a small, deliberately naive recursive reference parser written here
 * (different structure, code points computed arithmetically instead of by byte ranges), checks the
 * spans and error messages of json_object_scan against the same reference, and checks that
 * json_string_encode always produces valid JSON that decodes back to its input when that input is
 * valid UTF-8. */
#include "fuzz.h"
#include "json.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- reference parser ------------------------------------------------------------------------ */

struct ref {
    const uint8_t *d;
    size_t n, i;
    int deep;   /* failed because of nesting */
    int fuzzy;  /* failed on a bad UTF-8 sequence: the first bad byte is somewhere in [lo, i] */
    size_t lo;
};

static int ref_ws_byte(uint8_t c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static void ref_ws(struct ref *r)
{
    while (r->i < r->n && ref_ws_byte(r->d[r->i]))
        r->i++;
}

static int ref_at(struct ref *r, uint8_t c)
{
    return r->i < r->n && r->d[r->i] == c;
}

static int ref_digit(struct ref *r)
{
    return r->i < r->n && r->d[r->i] >= '0' && r->d[r->i] <= '9';
}

/* Decode one UTF-8 sequence arithmetically, then check the code point. */
static int ref_utf8(struct ref *r)
{
    const uint8_t *d = r->d;
    size_t start = r->i;
    uint32_t c = d[start], cp, min;
    int len;
    if ((c & 0xE0) == 0xC0) {
        len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
        len = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    for (int k = 1; k < len; k++) {
        r->i = start + (size_t)k;
        if (r->i >= r->n || (d[r->i] & 0xC0) != 0x80)
            break;
        cp = cp << 6 | (d[r->i] & 0x3F);
        if (k == len - 1) {
            if (cp < min || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
                break;
            r->i = start + (size_t)len;
            return 1;
        }
    }
    /* Where exactly a bad sequence is first detectable depends on the method (C0 or F5 is bad as
     * a lead byte, E0 80 at the 80); accept any offset from the lead byte to where this stopped. */
    r->fuzzy = 1;
    r->lo = start;
    return 0;
}

static int ref_string(struct ref *r)
{
    r->i++;
    for (;;) {
        if (r->i >= r->n)
            return 0;
        uint8_t c = r->d[r->i];
        if (c == '"') {
            r->i++;
            return 1;
        }
        if (c < 0x20)
            return 0;
        if (c == '\\') {
            r->i++;
            if (r->i >= r->n)
                return 0;
            c = r->d[r->i];
            if (c == 'u') {
                for (int k = 0; k < 4; k++) {
                    r->i++;
                    if (r->i >= r->n)
                        return 0;
                    c = r->d[r->i];
                    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
                        return 0;
                }
            } else if (!memchr("\"\\/bfnrt", c, 8)) {
                return 0;
            }
            r->i++;
        } else if (c < 0x80) {
            r->i++;
        } else if (!ref_utf8(r)) {
            return 0;
        }
    }
}

static int ref_number(struct ref *r)
{
    if (ref_at(r, '-'))
        r->i++;
    if (ref_at(r, '0')) {
        r->i++;
    } else {
        if (!ref_digit(r))
            return 0;
        while (ref_digit(r))
            r->i++;
    }
    if (ref_at(r, '.')) {
        r->i++;
        if (!ref_digit(r))
            return 0;
        while (ref_digit(r))
            r->i++;
    }
    if (ref_at(r, 'e') || ref_at(r, 'E')) {
        r->i++;
        if (ref_at(r, '+') || ref_at(r, '-'))
            r->i++;
        if (!ref_digit(r))
            return 0;
        while (ref_digit(r))
            r->i++;
    }
    return 1;
}

static int ref_word(struct ref *r, const char *w)
{
    for (; *w; w++, r->i++)
        if (!ref_at(r, (uint8_t)*w))
            return 0;
    return 1;
}

static int ref_value(struct ref *r, int depth)
{
    if (r->i >= r->n)
        return 0;
    uint8_t c = r->d[r->i];
    if (c == '[' || c == '{') {
        if (depth >= JSON_MAX_DEPTH) {
            r->deep = 1;
            return 0;
        }
        uint8_t close = c == '[' ? ']' : '}';
        r->i++;
        ref_ws(r);
        if (ref_at(r, close)) {
            r->i++;
            return 1;
        }
        for (;;) {
            if (close == '}') {
                if (!ref_at(r, '"') || !ref_string(r))
                    return 0;
                ref_ws(r);
                if (!ref_at(r, ':'))
                    return 0;
                r->i++;
                ref_ws(r);
            }
            if (!ref_value(r, depth + 1))
                return 0;
            ref_ws(r);
            if (ref_at(r, close)) {
                r->i++;
                return 1;
            }
            if (!ref_at(r, ','))
                return 0;
            r->i++;
            ref_ws(r);
        }
    }
    if (c == '"')
        return ref_string(r);
    if (c == 't')
        return ref_word(r, "true");
    if (c == 'f')
        return ref_word(r, "false");
    if (c == 'n')
        return ref_word(r, "null");
    return ref_number(r);
}

/* 1 if d[0..n) is one valid document; otherwise r->i is the first bad byte. */
static int ref_valid(struct ref *r, const uint8_t *d, size_t n)
{
    memset(r, 0, sizeof(*r));
    r->d = d;
    r->n = n;
    ref_ws(r);
    if (!ref_value(r, 0))
        return 0;
    ref_ws(r);
    return r->i == n;
}

static int ref_utf8_valid(const uint8_t *d, size_t n)
{
    struct ref r = {.d = d, .n = n};
    while (r.i < n) {
        if (d[r.i] < 0x80)
            r.i++;
        else if (!ref_utf8(&r))
            return 0;
    }
    return 1;
}

/* ---- checks ---------------------------------------------------------------------------------- */


/* The members the /ws handler asks for. */
static const char *const fuzz_keys[] = {"op", "channel", "data", "id", "since", "epoch",
                                         "pattern", "presence", "events", "info"};
#define NKEYS (sizeof(fuzz_keys) / sizeof(*fuzz_keys))

/* The type a value starting with byte c must have. */
static enum json_type type_of(uint8_t c)
{
    switch (c) {
    case '{': return JSON_OBJECT;
    case '[': return JSON_ARRAY;
    case '"': return JSON_STRING;
    case 't': return JSON_TRUE;
    case 'f': return JSON_FALSE;
    case 'n': return JSON_NULL;
    default: return c == '-' || (c >= '0' && c <= '9') ? JSON_NUMBER : JSON_NONE;
    }
}

/* Decode the string token t[0..n): on success the output must be valid UTF-8 and re-encoding it must
 * decode to the same bytes. */
static void check_decode(const char *t, size_t n)
{
    char *out = malloc(n ? n : 1);
    ssize_t m = json_string_decode(t, n, out);
    if (m >= 0) {
        REQUIRE(n >= 2 && (size_t)m <= n - 2);
        struct ref r;
        REQUIRE(ref_valid(&r, (const uint8_t *)t, n) && t[0] == '"');
        REQUIRE(ref_utf8_valid((const uint8_t *)out, (size_t)m));
        char *enc = malloc(JSON_STRING_ENCODED_MAX((size_t)m));
        size_t e = json_string_encode(out, (size_t)m, enc);
        char *back = malloc(e);
        REQUIRE(json_string_decode(enc, e, back) == m && memcmp(back, out, (size_t)m) == 0);
        free(back);
        free(enc);
    }
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
    const char *text = (const char *)d;
    struct ref r;
    int want = ref_valid(&r, d, n);
    int got = json_valid(text, n);
    REQUIRE(got == want);

    /* Object scan. */
    struct json_span v[NKEYS];
    const char *error = NULL;
    char error_buf[64];
    size_t first = 0;
    while (first < n && ref_ws_byte(d[first]))
        first++;
    int is_object = first < n && d[first] == '{';
    if (json_object_scan(text, n, fuzz_keys, v, NKEYS, &error, error_buf) == 0) {
        REQUIRE(want && is_object);
        for (size_t i = 0; i < NKEYS; i++) {
            if (v[i].type == JSON_NONE) {
                REQUIRE(v[i].p == NULL && v[i].len == 0);
                continue;
            }
            REQUIRE(v[i].p >= text && v[i].p + v[i].len <= text + n && v[i].len > 0);
            REQUIRE(json_valid(v[i].p, v[i].len));
            REQUIRE(v[i].type == type_of((uint8_t)v[i].p[0]));
            /* No whitespace is included around the value. */
            REQUIRE(!ref_ws_byte((uint8_t)v[i].p[v[i].len - 1]));
            if (v[i].type == JSON_STRING)
                check_decode(v[i].p, v[i].len);
        }
    } else {
        REQUIRE(error != NULL && strlen(error) < 64);
        for (size_t i = 0; i < NKEYS; i++)
            REQUIRE(v[i].type == JSON_NONE);
        if (strcmp(error, "not a JSON object") == 0) {
            REQUIRE(!is_object);
        } else if (strcmp(error, "nesting too deep") == 0) {
            REQUIRE(is_object && !want && r.deep);
        } else if (strncmp(error, "duplicate key \"", 15) == 0) {
            REQUIRE(is_object);
        } else {
            unsigned long long at;
            REQUIRE(sscanf(error, "invalid JSON at byte %llu", &at) == 1);
            REQUIRE(is_object && !want && !r.deep);
            if (r.fuzzy)
                REQUIRE(at >= r.lo && at <= r.i);
            else
                REQUIRE(at == r.i);
        }
    }
    /* A valid object fails only on a duplicate key. */
    if (want && is_object && error)
        REQUIRE(strncmp(error, "duplicate key \"", 15) == 0);

    /* Encoding anything gives valid JSON, which decodes back to the input if that was UTF-8. */
    char *enc = malloc(JSON_STRING_ENCODED_MAX(n));
    size_t e = json_string_encode(text, n, enc);
    REQUIRE(e >= 2 && e <= JSON_STRING_ENCODED_MAX(n));
    REQUIRE(json_valid(enc, e));
    REQUIRE(ref_valid(&r, (const uint8_t *)enc, e));
    REQUIRE(ref_utf8_valid((const uint8_t *)enc, e));
    char *dec = malloc(e);
    ssize_t m = json_string_decode(enc, e, dec);
    REQUIRE(m >= 0);
    if (ref_utf8_valid(d, n))
        REQUIRE((size_t)m == n && memcmp(dec, d, n) == 0);
    else
        REQUIRE((size_t)m != n || memcmp(dec, d, n) != 0);
    free(dec);
    free(enc);

    /* The input itself as a string token. */
    if (n && d[0] == '"')
        check_decode(text, n);
    return 0;
}
