/* json.h - strict RFC 8259 JSON scanning with no allocation: validation, the spans of an object's
 * top-level members, and string escaping and unescaping.
 *
 * Values are never rebuilt: a published value is passed on byte for byte, so numbers keep their
 * digits and objects their key order (DOM libraries round numbers through double). */
#ifndef HERALD_JSON_H
#define HERALD_JSON_H

#include <stddef.h>
#include <sys/types.h>

#define JSON_MAX_DEPTH 64

enum json_type { JSON_NONE, JSON_OBJECT, JSON_ARRAY, JSON_STRING, JSON_NUMBER, JSON_TRUE, JSON_FALSE,
                 JSON_NULL };

struct json_span {
    enum json_type type; /* JSON_NONE: the member is absent */
    const char *p;       /* the value's text, quotes included for a string */
    size_t len;
};

/* 1 if p[0..len) is exactly one JSON value with optional whitespace around it (nesting at most
 * JSON_MAX_DEPTH, strings valid UTF-8), else 0. */
int json_valid(const char *p, size_t len);

/* Scan p[0..len), which must be one JSON object, and fill spans[i] with the value of the member
 * named keys[i] (JSON_NONE when absent) for i < nkeys. Returns 0, or -1 with *error set to a static
 * description ("not a JSON object", "invalid JSON at byte 17", "duplicate key \"op\"", ...).
 * *error_buf (64 bytes) is used for messages with numbers in them. */
int json_object_scan(const char *p, size_t len, const char *const *keys, struct json_span *spans,
                     size_t nkeys, const char **error, char error_buf[64]);

/* Decode a JSON string token (quotes included, as in a span) into out, which has room for len
 * bytes. Returns the decoded length, or -1 for a malformed token or an unpaired surrogate escape. */
ssize_t json_string_decode(const char *p, size_t len, char *out);

/* Bytes needed to encode len bytes of text with json_string_encode (worst case). */
#define JSON_STRING_ENCODED_MAX(len) ((len) * 6 + 2)

/* Write p[0..len) as a quoted JSON string into out (room for JSON_STRING_ENCODED_MAX(len)). Quotes,
 * backslashes and control characters are escaped; bytes that are not valid UTF-8 become U+FFFD.
 * Returns the encoded length. */
size_t json_string_encode(const char *p, size_t len, char *out);

#endif
