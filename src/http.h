/* http.h - HTTP/1.1 request parsing with no I/O: the request head, chunked bodies, percent-decoding
 * of paths and query strings, and the token-list helpers the WebSocket handshake needs.
 *
 * Parsed fields point into the caller's buffer; nothing is allocated. Every limit is the caller's
 * to choose, and every way a request can be malformed has its own status code. */
#ifndef HERALD_HTTP_H
#define HERALD_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define HTTP_MAX_HEADERS 64 /* hard ceiling on struct http_request's array */

struct http_limits {
    size_t max_head;      /* request line plus headers, in bytes: over it 431 (or 414 for the line) */
    size_t max_headers;   /* header fields, <= HTTP_MAX_HEADERS: over it 431 */
};

struct http_header {
    const char *name; /* as sent; compare case-insensitively */
    size_t name_len;
    const char *value; /* leading and trailing whitespace removed */
    size_t value_len;
};

struct http_request {
    const char *method;
    size_t method_len;
    const char *target; /* the raw request-target, e.g. "/sub/a%20b?x=1" */
    size_t target_len;
    const char *path;   /* target up to '?' (still percent-encoded) */
    size_t path_len;
    const char *query;  /* after '?', NULL when none */
    size_t query_len;
    int minor_version;  /* HTTP/1.<minor>: 0 or 1 */
    size_t head_len;    /* bytes of the head, through the blank line */
    struct http_header headers[HTTP_MAX_HEADERS];
    size_t num_headers;
    int64_t content_length; /* -1 when absent */
    int chunked;            /* Transfer-Encoding: chunked */
    int keep_alive;         /* what the version and Connection header ask for */
};

/* Parse a request head from buf[0..len). Returns the head's length (> 0) when complete, 0 when more
 * bytes are needed (and the limits are not yet passed), or a negative HTTP status on error:
 * -400 malformed (bad request line, bad header syntax, obs-fold, bare LF where CRLF belongs,
 *      conflicting or invalid Content-Length, Content-Length with chunked, control characters),
 * -414 request line longer than max_head, -431 head too large or too many headers,
 * -501 a Transfer-Encoding other than chunked, -505 a version other than HTTP/1.0 or 1.1.
 * Leading empty lines before the request line are tolerated (RFC 9112 2.2). */
int http_parse_request(const char *buf, size_t len, const struct http_limits *limits,
                       struct http_request *req);

/* The value of the first header named name (case-insensitive), or NULL. *len gets its length. */
const char *http_header_get(const struct http_request *req, const char *name, size_t *len);

/* 1 if the comma-separated list value[0..len) holds token (case-insensitive), else 0. */
int http_has_token(const char *value, size_t len, const char *token);

/* Incremental, in-place decoder of a chunked body. A chunk size of more than 16 hex digits, or more
 * than 16 KiB of chunk extensions and trailers over the whole body, is malformed: neither adds to
 * the body, so nothing else would bound them. */
struct http_chunked {
    uint64_t chunk_left; /* bytes of the current chunk's data still to come */
    int state;
    size_t total;        /* decoded body bytes so far */
};
void http_chunked_init(struct http_chunked *c);
/* Decode buf[0..*len) in place: on return buf[0..*len) holds the body bytes decoded by this call.
 * Returns 1 when the body is complete (then *rest is how many bytes at the end of the input were
 * not part of the body: the start of a pipelined request, moved to follow the decoded data), 0 when
 * more is needed, -1 on malformed input. Trailers are skipped. */
int http_chunked_decode(struct http_chunked *c, char *buf, size_t *len, size_t *rest);

/* Percent-decode src[0..len) into out (room for len bytes). Returns the decoded length, or -1 for a
 * bad escape or a decoded NUL. '+' is kept as is (paths); see http_query_decode for forms. */
ssize_t http_path_decode(const char *src, size_t len, char *out);

/* Find key in a query string (a=1&b=2) and percent-decode its value ('+' as space) into out, which
 * has room for cap bytes. Returns the value's length, -1 when absent, -2 on a bad escape or when the
 * value does not fit. A key without '=' has the empty value. */
ssize_t http_query_get(const char *query, size_t len, const char *key, char *out, size_t cap);

#endif
