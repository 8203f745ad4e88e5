/* Unit tests of json.c: validation rule by rule, object member spans and scan errors, string
 * decoding and encoding. Inputs are copied into exact-size heap buffers so that AddressSanitizer
 * catches any read past the given length. */
#include "json.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

/* A heap copy of s[0..len) with nothing after it. */
static char *exact(const char *s, size_t len)
{
    char *p = malloc(len ? len : 1);
    memcpy(p, s, len);
    return p;
}

static int valid_n(const char *s, size_t len)
{
    char *p = exact(s, len);
    int v = json_valid(p, len);
    free(p);
    return v;
}

static int valid(const char *s)
{
    return valid_n(s, strlen(s));
}

/* Documents that must be accepted (RFC 8259 and JSONTestSuite y_ cases). */
static const char *const valid_docs[] = {
    /* scalars at the top level */
    "0", "-0", "1", "-1", "123", "1.5", "-1.5", "0.0", "1e5", "1E5", "1e+5", "1e-5", "1.5e10",
    "-0.0e-0", "0e0", "1E+0", "123456789012345678901234567890", "18446744073709551616",
    "-99999999999999999999999999999999.999999999999999999e-99999999999999999999",
    "true", "false", "null", "\"\"", "\"a\"",
    /* whitespace: only SP, HT, LF, CR, anywhere between tokens */
    " 1", "1 ", " \t\r\n1\n\r\t ", "[ 1 , 2 ]", "{ \"a\" : 1 , \"b\" : [ ] }", "\n[\n]\n",
    /* containers */
    "[]", "{}", "[[]]", "[{}]", "{\"a\":{}}", "[1,2,3]", "[1,\"a\",true,false,null,{},[]]",
    "{\"a\":1,\"b\":2}", "{\"a\":1,\"a\":2}", "{\"\":0}", "[\"\\u0000\"]", "[-0]", "[0e1]",
    /* strings: every escape, hex in either case, UTF-8 of every length */
    "\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t\"", "\"\\u0041\\u00e9\\u00E9\\uFFFF\\uffff\"",
    "\"\\ud83d\\ude00\"", "\"\\uD83D\\uDE00\"", "\"/\"", "\"\x7f\"", "\"caf\xc3\xa9\"",
    "\"\xe2\x82\xac\"", "\"\xf0\x9f\x98\x80\"", "\"\xc2\x80\"", "\"\xdf\xbf\"", "\"\xe0\xa0\x80\"",
    "\"\xed\x9f\xbf\"", "\"\xee\x80\x80\"", "\"\xef\xbf\xbf\"", "\"\xf0\x90\x80\x80\"",
    "\"\xf4\x8f\xbf\xbf\"", "\"\xf3\xbf\xbf\xbf\"",
    /* lone surrogate escapes are syntactically allowed (RFC 8259 section 8.2) */
    "\"\\ud800\"", "\"\\udc00\"", "\"\\udc00\\ud800\"", "\"\\ud800x\"",
    /* a long string to exercise the word-at-a-time path on both sides of special bytes */
    "\"The quick brown fox jumps over the lazy dog, \\\"twice\\\" and then some more.\"",
};

/* Documents that must be rejected (RFC 8259 and JSONTestSuite n_ cases). */
static const char *const invalid_docs[] = {
    /* empty and whitespace only */
    "", " ", "\n\t",
    /* structure */
    "[", "]", "{", "}", "[1,]", "[,1]", "[1,,2]", "[1 2]", "{\"a\":1,}", "{,}", "{\"a\"}",
    "{\"a\":}", "{\"a\" 1}", "{\"a\"::1}", "{1:1}", "{a:1}", "{'a':1}", "{\"a\":1\"b\":2}",
    "[1]]", "[[1]", "{\"a\":1}}", "{\"a\":1}x", "[1]x", "1 2", "\"a\"\"b\"", "[]{}", "[\"a\":1]",
    "{\"a\":1]", "[1}", "{[]}", ",", ":", "[:]", "{:1}",
    /* literals */
    "tru", "truee", "True", "TRUE", "nul", "Null", "nulll", "fals", "falsE", "t", "[true false]",
    "NaN", "-NaN", "Infinity", "-Infinity", "undefined", "'a'",
    /* numbers */
    "01", "00", "-01", "+1", "-", "--1", "1.", "-1.", ".1", "-.1", "1.e5", "1e", "1e+", "1E-",
    "1e5.5", "0x10", "1.5.5", "0.e1", "[1.]", "[-]", "[.5]", "1e+-5", "- 1", "1 .5", "\xef\xbc\x91",
    "[012]", "2.", "1ee5", "1f",
    /* whitespace other than SP, HT, LF, CR */
    "\f1", "1\f", "\v1", "[\v]", "\xc2\xa0" "1", "\xef\xbb\xbf" "1", "\x00",
    /* strings: escapes */
    "\"\\x\"", "\"\\a\"", "\"\\0\"", "\"\\'\"", "\"\\U0041\"", "\"\\u\"", "\"\\u1\"", "\"\\u12\"",
    "\"\\u123\"", "\"\\u123g\"", "\"\\uGGGG\"", "\"\\", "\"\\\"", "\"\\u12", "\"\\ \"",
    /* strings: raw control characters and unterminated */
    "\"\t\"", "\"\n\"", "\"\r\"", "\"\x01\"", "\"\x1f\"", "\"a", "\"", "[\"a]", "'a'",
    /* strings: invalid UTF-8 */
    "\"\x80\"", "\"\xbf\"", "\"\xc0\x80\"", "\"\xc1\xbf\"", "\"\xc2\"", "\"\xc2\x41\"",
    "\"\xe0\x80\x80\"", "\"\xe0\x9f\xbf\"", "\"\xed\xa0\x80\"", "\"\xed\xbf\xbf\"", "\"\xe2\x82\"",
    "\"\xf0\x80\x80\x80\"", "\"\xf0\x8f\xbf\xbf\"", "\"\xf4\x90\x80\x80\"", "\"\xf5\x80\x80\x80\"",
    "\"\xf8\x88\x80\x80\x80\"", "\"\xfe\"", "\"\xff\"", "\"\xf0\x9f\x98\"", "\"\xe2\x82\xac",
    "\"abcdefgh\xff" "abcdefgh\"",
    /* invalid UTF-8 outside strings */
    "\xff", "[\xc3\xa9]",
};

static void test_valid_table(void)
{
    for (size_t i = 0; i < sizeof(valid_docs) / sizeof(valid_docs[0]); i++) {
        if (!valid(valid_docs[i]))
            fprintf(stderr, "should be valid: %s\n", valid_docs[i]);
        CHECK(valid(valid_docs[i]));
    }
    for (size_t i = 0; i < sizeof(invalid_docs) / sizeof(invalid_docs[0]); i++) {
        if (valid(invalid_docs[i]))
            fprintf(stderr, "should be invalid: %s\n", invalid_docs[i]);
        CHECK(!valid(invalid_docs[i]));
    }
    /* NUL bytes are control characters inside strings and not whitespace outside them. */
    CHECK(!valid_n("\"a\0b\"", 5));
    CHECK(!valid_n("1\0", 2));
    CHECK(!valid_n("\0", 1));
    CHECK(valid_n("[1]", 3));
    CHECK(!valid_n("[1]", 2));
    CHECK(json_valid(NULL, 0) == 0);
}

/* A run of n '[' followed by n ']'. */
static char *nested(size_t n, char open, char close)
{
    char *p = malloc(2 * n + 1);
    memset(p, open, n);
    memset(p + n, close, n);
    p[2 * n] = 0;
    return p;
}

static void test_depth(void)
{
    char *at = nested(JSON_MAX_DEPTH, '[', ']'), *past = nested(JSON_MAX_DEPTH + 1, '[', ']');
    CHECK(valid(at));
    CHECK(!valid(past));
    free(at);
    free(past);

    /* Objects count the same as arrays: {"a":{"a":...{}}} */
    char doc[16 * (JSON_MAX_DEPTH + 2)];
    for (int depth = JSON_MAX_DEPTH; depth <= JSON_MAX_DEPTH + 1; depth++) {
        size_t n = 0;
        for (int i = 0; i < depth - 1; i++)
            n += (size_t)sprintf(doc + n, "{\"a\":");
        n += (size_t)sprintf(doc + n, "{}");
        for (int i = 0; i < depth - 1; i++)
            doc[n++] = '}';
        doc[n] = 0;
        CHECK_EQ(valid(doc), depth <= JSON_MAX_DEPTH);
    }

    /* Deep nesting far past the limit is rejected without trouble, even unterminated. */
    char *deep = nested(100000, '[', ']');
    CHECK(!valid(deep));
    deep[100000] = 0;
    CHECK(!valid(deep));
    free(deep);
    /* Many siblings at depth are fine: the limit is on nesting, not on the number of containers. */
    size_t n = 0;
    char *wide = malloc(10 + 4 * 10000);
    wide[n++] = '[';
    for (int i = 0; i < 10000; i++) {
        memcpy(wide + n, i ? ",[]" : "[]", i ? 3 : 2);
        n += i ? 3 : 2;
    }
    wide[n++] = ']';
    CHECK(valid_n(wide, n));
    free(wide);
}

/* Long strings with one special byte at every position, to check the eight-bytes-at-a-time scan
 * never skips past a quote, backslash, control character or non-ASCII byte. */
static void test_string_positions(void)
{
    char doc[64];
    for (size_t len = 0; len < 40; len++) {
        for (size_t at = 0; at < len; at++) {
            doc[0] = '"';
            memset(doc + 1, 'x', len);
            doc[len + 1] = '"';
            size_t n = len + 2;
            CHECK(valid_n(doc, n));
            doc[1 + at] = '\x01';
            CHECK(!valid_n(doc, n));
            doc[1 + at] = '\x1f';
            CHECK(!valid_n(doc, n));
            doc[1 + at] = '"';
            CHECK(!valid_n(doc, n));
            doc[1 + at] = '\\';
            CHECK(!valid_n(doc, n));
            doc[1 + at] = '\x80';
            CHECK(!valid_n(doc, n));
            doc[1 + at] = '\x7f';
            CHECK(valid_n(doc, n));
            doc[1 + at] = ' ';
            CHECK(valid_n(doc, n));
            /* Unterminated at every length. */
            CHECK(!valid_n(doc, n - 1));
        }
    }
}

static const char *const request_keys[] = {"op", "channel", "data", "id"};
enum { OP, CHANNEL, DATA, ID, NKEYS };

struct scan_result {
    int rc;
    struct json_span v[NKEYS];
    size_t offset[NKEYS]; /* each span's position in the input */
    char error[64];
};

/* Scan s with the request keys, from an exact-size copy. */
static struct scan_result scan_n(const char *s, size_t len)
{
    struct scan_result r;
    char error_buf[64];
    const char *error = NULL;
    char *p = exact(s, len);
    r.rc = json_object_scan(p, len, request_keys, r.v, NKEYS, &error, error_buf);
    r.error[0] = 0;
    if (r.rc < 0 && error)
        snprintf(r.error, sizeof(r.error), "%s", error);
    for (int i = 0; i < NKEYS; i++) {
        r.offset[i] = r.v[i].p ? (size_t)(r.v[i].p - p) : (size_t)-1;
        r.v[i].p = r.v[i].p ? s + r.offset[i] : NULL; /* point into the caller's copy */
    }
    free(p);
    return r;
}

static struct scan_result scan(const char *s)
{
    return scan_n(s, strlen(s));
}

static int span_is(const struct json_span *v, enum json_type type, const char *text)
{
    return v->type == type && v->len == strlen(text) && memcmp(v->p, text, v->len) == 0;
}

static void test_object_scan(void)
{
    struct scan_result r;

    r = scan("{\"op\":\"publish\",\"channel\":\"c\",\"data\":{\"x\": [1, 2.50]},\"id\":7}");
    CHECK_EQ(r.rc, 0);
    CHECK(span_is(&r.v[OP], JSON_STRING, "\"publish\""));
    CHECK(span_is(&r.v[CHANNEL], JSON_STRING, "\"c\""));
    CHECK(span_is(&r.v[DATA], JSON_OBJECT, "{\"x\": [1, 2.50]}"));
    CHECK(span_is(&r.v[ID], JSON_NUMBER, "7"));
    CHECK_EQ(r.offset[OP], 6);

    /* Whitespace everywhere; the span excludes the whitespace around the value. */
    r = scan(" \n{ \"data\" :\t[ 1 ,2 ] , \"id\" : \"x\" }\r\n");
    CHECK_EQ(r.rc, 0);
    CHECK(span_is(&r.v[DATA], JSON_ARRAY, "[ 1 ,2 ]"));
    CHECK(span_is(&r.v[ID], JSON_STRING, "\"x\""));
    CHECK_EQ(r.v[OP].type, JSON_NONE);
    CHECK(r.v[OP].p == NULL);
    CHECK_EQ(r.v[OP].len, 0);
    CHECK_EQ(r.v[CHANNEL].type, JSON_NONE);

    /* Every value type, with numbers kept digit for digit. */
    r = scan("{\"op\":true,\"channel\":false,\"data\":null,\"id\":18446744073709551616}");
    CHECK_EQ(r.rc, 0);
    CHECK(span_is(&r.v[OP], JSON_TRUE, "true"));
    CHECK(span_is(&r.v[CHANNEL], JSON_FALSE, "false"));
    CHECK(span_is(&r.v[DATA], JSON_NULL, "null"));
    CHECK(span_is(&r.v[ID], JSON_NUMBER, "18446744073709551616"));
    r = scan("{\"data\":-1.50e+07}");
    CHECK(span_is(&r.v[DATA], JSON_NUMBER, "-1.50e+07"));
    r = scan("{\"data\":\"a\\\"b\\u00e9\"}");
    CHECK(span_is(&r.v[DATA], JSON_STRING, "\"a\\\"b\\u00e9\""));

    /* Only top-level members count: nested keys of the same name are part of values. */
    r = scan("{\"data\":{\"op\":1,\"id\":[{\"id\":2}]},\"x\":{\"channel\":3}}");
    CHECK_EQ(r.rc, 0);
    CHECK(span_is(&r.v[DATA], JSON_OBJECT, "{\"op\":1,\"id\":[{\"id\":2}]}"));
    CHECK_EQ(r.v[OP].type, JSON_NONE);
    CHECK_EQ(r.v[ID].type, JSON_NONE);
    CHECK_EQ(r.v[CHANNEL].type, JSON_NONE);

    /* Keys are compared after unescaping, and must match exactly. */
    r = scan("{\"\\u006fp\":1,\"ch\\u0061nnel\":2,\"d\\u0061t\\u0061\":3,\"\\u0069\\u0064\":4}");
    CHECK_EQ(r.rc, 0);
    CHECK(span_is(&r.v[OP], JSON_NUMBER, "1"));
    CHECK(span_is(&r.v[CHANNEL], JSON_NUMBER, "2"));
    CHECK(span_is(&r.v[DATA], JSON_NUMBER, "3"));
    CHECK(span_is(&r.v[ID], JSON_NUMBER, "4"));
    r = scan("{\"OP\":1,\"op \":2,\" op\":3,\"o\":4,\"opp\":5,\"o\\u0000\":6,\"op\\u0000\":7,\"\":8}");
    CHECK_EQ(r.rc, 0);
    CHECK_EQ(r.v[OP].type, JSON_NONE);
    /* A key with a lone surrogate escape is valid JSON that matches nothing. */
    r = scan("{\"\\ud800\":1,\"op\":2}");
    CHECK_EQ(r.rc, 0);
    CHECK(span_is(&r.v[OP], JSON_NUMBER, "2"));
    /* A long escaped key matches nothing; a long plain one is compared in place. */
    {
        char doc[1200];
        size_t n = (size_t)sprintf(doc, "{\"\\u0061");
        memset(doc + n, 'a', 1000);
        n += 1000;
        n += (size_t)sprintf(doc + n, "\":1,\"op\":2}");
        r = scan_n(doc, n);
        CHECK_EQ(r.rc, 0);
        CHECK(span_is(&r.v[OP], JSON_NUMBER, "2"));
    }

    /* Unrequested keys may repeat; a requested one may not, however it is written. */
    r = scan("{\"x\":1,\"x\":2,\"op\":3}");
    CHECK_EQ(r.rc, 0);
    r = scan("{\"op\":1,\"op\":2}");
    CHECK_EQ(r.rc, -1);
    CHECK(strcmp(r.error, "duplicate key \"op\"") == 0);
    CHECK_EQ(r.v[OP].type, JSON_NONE); /* spans are cleared on failure */
    r = scan("{\"id\":1,\"data\":[],\"\\u0069d\":2}");
    CHECK_EQ(r.rc, -1);
    CHECK(strcmp(r.error, "duplicate key \"id\"") == 0);

    /* Empty object and objects with no requested keys. */
    r = scan("{}");
    CHECK_EQ(r.rc, 0);
    CHECK_EQ(r.v[DATA].type, JSON_NONE);
    r = scan(" { } ");
    CHECK_EQ(r.rc, 0);

    /* Not an object at all. */
    const char *not_objects[] = {"", " ", "[]", "[{\"op\":1}]", "\"{}\"", "1", "null", "x", "}"};
    for (size_t i = 0; i < sizeof(not_objects) / sizeof(not_objects[0]); i++) {
        r = scan(not_objects[i]);
        CHECK_EQ(r.rc, -1);
        CHECK(strcmp(r.error, "not a JSON object") == 0);
    }

    /* Invalid documents: the offset is the first byte that can't continue a valid document. */
    static const struct {
        const char *doc;
        size_t offset;
    } bad[] = {
        {"{", 1},
        {"{\"op\"", 5},
        {"{\"op\":", 6},
        {"{\"op\":1", 7},
        {"{\"op\":1,", 8},
        {"{\"op\":1,}", 8},
        {"{\"op\":1}x", 8},
        {"{\"op\":1} x", 9},
        {"{\"op\":1}{}", 8},
        {"{\"op\" 1}", 6},
        {"{op:1}", 1},
        {"{\"op\":01}", 7},
        {"{\"op\":1.}", 8},
        {"{\"op\":-}", 7},
        {"{\"op\":tru}", 9},
        {"{\"op\":\"\\x\"}", 8},
        {"{\"op\":\"\t\"}", 7},
        {"{\"op\":\"\xc3\x28\"}", 8},
        {"{\"op\":\"\xe0\x80\x80\"}", 8},
        {"{\"op\":\"\xc0\xaf\"}", 7},
        {"{\"op\":\"\xf0\x9f\x98\"}", 10},
        {"{\"data\":[1,2,]}", 13},
        {"{\"data\":{\"a\":[1}}", 15},
        {"{\"data\":[1 2]}", 11},
        {"{\"a\":1,\"a\"}", 10},
        {"{\"op\":\"\\u12x4\"}", 11},
        {"{\"op\":1,\"op\"", 12}, /* invalid before the duplicate is seen */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char want[64];
        snprintf(want, sizeof(want), "invalid JSON at byte %zu", bad[i].offset);
        r = scan(bad[i].doc);
        CHECK_EQ(r.rc, -1);
        if (strcmp(r.error, want) != 0)
            fprintf(stderr, "%s: got \"%s\", want \"%s\"\n", bad[i].doc, r.error, want);
        CHECK(strcmp(r.error, want) == 0);
    }

    /* Nesting: the object itself is one level. */
    {
        char doc[16 + 2 * JSON_MAX_DEPTH];
        size_t n = (size_t)sprintf(doc, "{\"data\":");
        memset(doc + n, '[', JSON_MAX_DEPTH - 1);
        memset(doc + n + JSON_MAX_DEPTH - 1, ']', JSON_MAX_DEPTH - 1);
        n += 2 * (JSON_MAX_DEPTH - 1);
        doc[n++] = '}';
        r = scan_n(doc, n);
        CHECK_EQ(r.rc, 0);
        CHECK_EQ(r.v[DATA].len, 2 * (JSON_MAX_DEPTH - 1));
        CHECK_EQ(valid_n(doc, n), 1);

        n = (size_t)sprintf(doc, "{\"data\":");
        memset(doc + n, '[', JSON_MAX_DEPTH);
        memset(doc + n + JSON_MAX_DEPTH, ']', JSON_MAX_DEPTH);
        n += 2 * JSON_MAX_DEPTH;
        doc[n++] = '}';
        r = scan_n(doc, n);
        CHECK_EQ(r.rc, -1);
        CHECK(strcmp(r.error, "nesting too deep") == 0);
        CHECK_EQ(valid_n(doc, n), 0);
    }

    /* No keys requested: just checks that the text is one valid object. */
    {
        const char *error = NULL;
        char error_buf[64];
        CHECK_EQ(json_object_scan(NULL, 0, NULL, NULL, 0, &error, error_buf), -1);
        CHECK(error && strcmp(error, "not a JSON object") == 0);
        CHECK_EQ(json_object_scan("{\"a\":[1]}", 9, NULL, NULL, 0, &error, error_buf), 0);
        CHECK_EQ(json_object_scan("{\"a\":[1]", 8, NULL, NULL, 0, &error, error_buf), -1);
        CHECK(error && strcmp(error, "invalid JSON at byte 8") == 0);
    }

    /* A requested key listed twice gets the value in both places. */
    {
        const char *keys[] = {"a", "a", "b"};
        struct json_span v[3];
        const char *error = NULL;
        char error_buf[64];
        CHECK_EQ(json_object_scan("{\"a\":1,\"b\":2}", 13, keys, v, 3, &error, error_buf), 0);
        CHECK(span_is(&v[0], JSON_NUMBER, "1"));
        CHECK(span_is(&v[1], JSON_NUMBER, "1"));
        CHECK(span_is(&v[2], JSON_NUMBER, "2"));
    }

    /* A long requested key is cut short in the duplicate message, which still fits. */
    {
        const char *keys[] = {"a_very_long_key_name_that_goes_on_and_on_and_on_forever"};
        const char *doc = "{\"a_very_long_key_name_that_goes_on_and_on_and_on_forever\":1,"
                          "\"a_very_long_key_name_that_goes_on_and_on_and_on_forever\":2}";
        struct json_span v[1];
        const char *error = NULL;
        char error_buf[64];
        CHECK_EQ(json_object_scan(doc, strlen(doc), keys, v, 1, &error, error_buf), -1);
        CHECK(error && strncmp(error, "duplicate key \"a_very_long", 26) == 0);
        CHECK(error && strlen(error) < 64);
    }
}

/* Decode the token s; returns the length, the output in out. */
static ssize_t decode_n(const char *s, size_t len, char *out)
{
    char *p = exact(s, len);
    char *o = malloc(len ? len : 1);
    ssize_t n = json_string_decode(p, len, o);
    if (n > 0)
        memcpy(out, o, (size_t)n);
    free(p);
    free(o);
    return n;
}

static int decodes_to(const char *token, const char *want, size_t want_len)
{
    char out[256];
    ssize_t n = decode_n(token, strlen(token), out);
    return n == (ssize_t)want_len && memcmp(out, want, want_len) == 0;
}

static void test_decode(void)
{
    char out[256];
    CHECK(decodes_to("\"\"", "", 0));
    CHECK(decodes_to("\"abc\"", "abc", 3));
    CHECK(decodes_to("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\/\b\f\n\r\t", 8));
    CHECK(decodes_to("\"\\u0041\\u00e9\\u00E9\"", "A\xc3\xa9\xc3\xa9", 5));
    CHECK(decodes_to("\"\\u0000\"", "\0", 1));
    CHECK(decodes_to("\"\\u007f\\u0080\\u07ff\\u0800\\uffff\"",
                     "\x7f\xc2\x80\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf", 11));
    CHECK(decodes_to("\"\\u20AC\"", "\xe2\x82\xac", 3));
    CHECK(decodes_to("\"\\ud83d\\ude00\"", "\xf0\x9f\x98\x80", 4));
    CHECK(decodes_to("\"\\uD800\\uDC00\"", "\xf0\x90\x80\x80", 4));
    CHECK(decodes_to("\"\\uDBFF\\uDFFF\"", "\xf4\x8f\xbf\xbf", 4));
    CHECK(decodes_to("\"caf\xc3\xa9 \xf0\x9f\x98\x80\"", "caf\xc3\xa9 \xf0\x9f\x98\x80", 10));
    CHECK(decodes_to("\"a long string with more than eight bytes \\n in it\"",
                     "a long string with more than eight bytes \n in it", 48));

    /* Unpaired surrogates: -1. */
    static const char *const lone[] = {
        "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800x\"", "\"\\ud800\\u0041\"", "\"\\ud800\\ud800\"",
        "\"\\udc00\\ud800\"", "\"\\ud800\\\"", "\"\\ud800\\n\"", "\"\\udfff\"", "\"\\ud800\\",
    };
    for (size_t i = 0; i < sizeof(lone) / sizeof(lone[0]); i++)
        CHECK_EQ(decode_n(lone[i], strlen(lone[i]), out), -1);

    /* Malformed tokens: -1. */
    static const char *const bad[] = {
        "", "\"", "a", "abc\"", "\"abc", "\"a\"b\"", "\"a\" ", " \"a\"", "\"\\x\"", "\"\\u12\"",
        "\"\\u12g4\"", "\"\t\"", "\"\x01\"", "\"\xff\"", "\"\xc0\xaf\"", "\"\xed\xa0\x80\"",
        "\"\xe2\x82\"", "\"\\\"", "\"\\", "'a'", "\"\xf4\x90\x80\x80\"",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK_EQ(decode_n(bad[i], strlen(bad[i]), out), -1);
    CHECK_EQ(decode_n("\"a\0b\"", 5, out), -1);
    CHECK_EQ(json_string_decode(NULL, 0, out), -1);
}

/* Encode s[0..len) into a heap buffer of exactly the promised size. */
static size_t encode_n(const char *s, size_t len, char *out)
{
    char *p = exact(s, len);
    char *o = malloc(JSON_STRING_ENCODED_MAX(len));
    size_t n = json_string_encode(p, len, o);
    CHECK(n <= JSON_STRING_ENCODED_MAX(len));
    memcpy(out, o, n);
    free(p);
    free(o);
    return n;
}

static int encodes_to(const char *s, size_t len, const char *want)
{
    char out[1024];
    size_t n = encode_n(s, len, out);
    int ok = n == strlen(want) && memcmp(out, want, n) == 0;
    if (!ok)
        fprintf(stderr, "encode: got %.*s, want %s\n", (int)n, out, want);
    /* Whatever comes out is always valid JSON. */
    CHECK(valid_n(out, n));
    return ok;
}

/* Encoding valid UTF-8 and decoding the result gives back the input. */
static int round_trips(const char *s, size_t len)
{
    char enc[1024], dec[1024];
    size_t n = encode_n(s, len, enc);
    if (!valid_n(enc, n))
        return 0;
    ssize_t m = decode_n(enc, n, dec);
    return m == (ssize_t)len && memcmp(dec, s, len) == 0;
}

static void test_encode(void)
{
    CHECK(encodes_to("", 0, "\"\""));
    {
        char out[2];
        CHECK_EQ(json_string_encode(NULL, 0, out), 2);
        CHECK(out[0] == '"' && out[1] == '"');
    }
    CHECK(encodes_to("abc", 3, "\"abc\""));
    CHECK(encodes_to("a\"b\\c/d", 7, "\"a\\\"b\\\\c/d\""));
    CHECK(encodes_to("\n\r\t\b\f", 5, "\"\\n\\r\\t\\b\\f\""));
    CHECK(encodes_to("\x00\x01\x1f\x7f", 4, "\"\\u0000\\u0001\\u001f\x7f\""));
    CHECK(encodes_to("\x0b\x1a", 2, "\"\\u000b\\u001a\""));
    CHECK(encodes_to("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14,
                     "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\""));
    /* U+2028 and U+2029 are left as they are. */
    CHECK(encodes_to("\xe2\x80\xa8\xe2\x80\xa9", 6, "\"\xe2\x80\xa8\xe2\x80\xa9\""));
    CHECK(encodes_to("The quick brown fox jumps over the lazy dog", 43,
                     "\"The quick brown fox jumps over the lazy dog\""));
    CHECK(encodes_to("0123456789abcdef\"0123456789abcdef", 33,
                     "\"0123456789abcdef\\\"0123456789abcdef\""));

    /* Invalid UTF-8: one U+FFFD per maximal subpart. */
#define FFFD "\xef\xbf\xbd"
    CHECK(encodes_to("\xff", 1, "\"" FFFD "\""));
    CHECK(encodes_to("\x80", 1, "\"" FFFD "\""));
    CHECK(encodes_to("a\x80\x80z", 4, "\"a" FFFD FFFD "z\""));
    CHECK(encodes_to("\xc0\xaf", 2, "\"" FFFD FFFD "\""));           /* C0 never leads */
    CHECK(encodes_to("\xe0\x80\xaf", 3, "\"" FFFD FFFD FFFD "\""));  /* overlong */
    CHECK(encodes_to("\xed\xa0\x80", 3, "\"" FFFD FFFD FFFD "\""));  /* surrogate */
    CHECK(encodes_to("\xf4\x90\x80\x80", 4, "\"" FFFD FFFD FFFD FFFD "\"")); /* > U+10FFFF */
    CHECK(encodes_to("\xe2\x82", 2, "\"" FFFD "\""));                /* truncated at the end */
    CHECK(encodes_to("\xe2\x82z", 3, "\"" FFFD "z\""));              /* truncated mid-text */
    CHECK(encodes_to("\xf0\x9f\x98\"", 4, "\"" FFFD "\\\"\""));
    CHECK(encodes_to("\xc3\xc3\xa9", 3, "\"" FFFD "\xc3\xa9\""));
    CHECK(encodes_to("\xf8\x88\x80\x80\x80", 5, "\"" FFFD FFFD FFFD FFFD FFFD "\""));
    CHECK(encodes_to("\x61\xf1\x80\x80\xe1\x80\xc2\x62\x80\x63\x80\xbf\x64", 13,
                     "\"a" FFFD FFFD FFFD "b" FFFD "c" FFFD FFFD "d\""));
#undef FFFD

    /* Round trips of valid UTF-8, including every control character and the ASCII range. */
    CHECK(round_trips("", 0));
    CHECK(round_trips("hello", 5));
    CHECK(round_trips("\"quoted\" \\back\\slash/", 21));
    CHECK(round_trips("\x00\x01\x02", 3));
    CHECK(round_trips("\xc2\x80\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf\xf0\x90\x80\x80\xf4\x8f\xbf\xbf", 18));
    {
        char all[128];
        for (int i = 0; i < 128; i++)
            all[i] = (char)i;
        CHECK(round_trips(all, 128));
        for (int i = 0; i < 128; i++)
            CHECK(round_trips(all + i, 1));
    }
    /* Worst case output size: all control characters. */
    {
        char ctl[100], out[1024];
        memset(ctl, 1, sizeof(ctl));
        CHECK_EQ(encode_n(ctl, sizeof(ctl), out), JSON_STRING_ENCODED_MAX(sizeof(ctl)));
    }
    /* Every single byte and every pair of bytes encode to valid JSON; valid ones round trip. */
    {
        char out[32];
        int fails = 0;
        for (int a = 0; a < 256; a++) {
            for (int b = 0; b < 256; b++) {
                char in[2] = {(char)a, (char)b};
                char *p = exact(in, 2);
                size_t n = json_string_encode(p, 2, out);
                if (!json_valid(out, n))
                    fails++;
                char dec[32];
                ssize_t m = json_string_decode(out, n, dec);
                int utf8 = (a < 0x80 && b < 0x80) || (a >= 0xc2 && a <= 0xdf && b >= 0x80 && b <= 0xbf);
                if (utf8 && (m != 2 || memcmp(dec, in, 2) != 0))
                    fails++;
                if (!utf8 && m == 2 && memcmp(dec, in, 2) == 0)
                    fails++;
                free(p);
            }
        }
        CHECK_EQ(fails, 0);
    }
}

int main(void)
{
    test_valid_table();
    test_depth();
    test_string_positions();
    test_object_scan();
    test_decode();
    test_encode();
    return TEST_REPORT();
}
