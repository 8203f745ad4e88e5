/* Unit tests of http.c: request heads (good, incremental, pipelined, limits, junk), chunked bodies,
 * percent-decoding and token lists. */
#include "http.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

static const struct http_limits limits = {8192, 64};

static int parse(const char *s, struct http_request *req)
{
    return http_parse_request(s, strlen(s), &limits, req);
}

static int parse_lim(const char *s, size_t max_head, size_t max_headers)
{
    struct http_limits l = {max_head, max_headers};
    struct http_request req;
    return http_parse_request(s, strlen(s), &l, &req);
}

static int status(const char *s)
{
    struct http_request req;
    return parse(s, &req);
}

static int eq(const char *p, size_t n, const char *s) { return p && n == strlen(s) && memcmp(p, s, n) == 0; }

static int hdr_is(const struct http_request *req, const char *name, const char *want)
{
    size_t n;
    const char *v = http_header_get(req, name, &n);
    return eq(v, n, want);
}

/* Every strict prefix of s needs more bytes; the whole of it is one head of its full length. */
static void check_incremental(const char *s)
{
    struct http_request req;
    size_t n = strlen(s);
    /* A heap copy of exactly each prefix's size, so ASan catches any read past the end. */
    for (size_t i = 0; i < n; i++) {
        char *copy = malloc(i ? i : 1);
        memcpy(copy, s, i);
        int r = http_parse_request(copy, i, &limits, &req);
        free(copy);
        if (r != 0) {
            fprintf(stderr, "prefix %zu of %s: %d\n", i, s, r);
            CHECK_EQ(r, 0);
        }
    }
    char *copy = malloc(n);
    memcpy(copy, s, n);
    CHECK_EQ(http_parse_request(copy, n, &limits, &req), (int)n);
    CHECK_EQ(req.head_len, n);
    free(copy);
}

static void test_good(void)
{
    struct http_request req;
    const char *get = "GET /sub/a%20b?x=1&y=2 HTTP/1.1\r\n"
                      "Host: example.com\r\n"
                      "User-Agent:curl/8.0   \r\n"
                      "Accept: \t*/*\t \r\n"
                      "X-Empty:\r\n"
                      "X-Obs: caf\xc3\xa9\r\n"
                      "\r\n";
    CHECK_EQ(parse(get, &req), strlen(get));
    CHECK(eq(req.method, req.method_len, "GET"));
    CHECK(eq(req.target, req.target_len, "/sub/a%20b?x=1&y=2"));
    CHECK(eq(req.path, req.path_len, "/sub/a%20b"));
    CHECK(eq(req.query, req.query_len, "x=1&y=2"));
    CHECK_EQ(req.minor_version, 1);
    CHECK_EQ(req.head_len, strlen(get));
    CHECK_EQ(req.num_headers, 5);
    CHECK(eq(req.headers[0].name, req.headers[0].name_len, "Host"));
    CHECK(hdr_is(&req, "host", "example.com"));
    CHECK(hdr_is(&req, "HOST", "example.com"));
    CHECK(hdr_is(&req, "user-agent", "curl/8.0"));
    CHECK(hdr_is(&req, "Accept", "*/*"));
    CHECK(hdr_is(&req, "x-empty", ""));
    CHECK(hdr_is(&req, "x-obs", "caf\xc3\xa9"));
    size_t n = 99;
    CHECK(http_header_get(&req, "X-Missing", &n) == NULL);
    CHECK(http_header_get(&req, "Hos", &n) == NULL);
    CHECK_EQ(req.content_length, -1);
    CHECK_EQ(req.chunked, 0);
    CHECK_EQ(req.keep_alive, 1);

    /* No query: query is NULL. A '?' with nothing after it: empty, not NULL. */
    CHECK(parse("GET / HTTP/1.1\r\n\r\n", &req) > 0);
    CHECK(eq(req.path, req.path_len, "/"));
    CHECK(req.query == NULL);
    CHECK_EQ(req.query_len, 0);
    CHECK_EQ(req.num_headers, 0);
    CHECK(parse("GET /p? HTTP/1.1\r\n\r\n", &req) > 0);
    CHECK(eq(req.path, req.path_len, "/p"));
    CHECK(req.query != NULL);
    CHECK_EQ(req.query_len, 0);
    /* The split is at the first '?'. */
    CHECK(parse("GET /a?b?c=/d HTTP/1.1\r\n\r\n", &req) > 0);
    CHECK(eq(req.path, req.path_len, "/a"));
    CHECK(eq(req.query, req.query_len, "b?c=/d"));

    /* The WebSocket handshake. */
    const char *ws = "GET /ws?subscribe=news,sport HTTP/1.1\r\n"
                     "Host: server.example.com\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: keep-alive, Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Origin: http://example.com\r\n"
                     "Sec-WebSocket-Version: 13\r\n"
                     "\r\n";
    CHECK_EQ(parse(ws, &req), strlen(ws));
    CHECK_EQ(req.num_headers, 6);
    CHECK(hdr_is(&req, "sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="));
    CHECK(hdr_is(&req, "sec-websocket-version", "13"));
    n = 0;
    const char *v = http_header_get(&req, "connection", &n);
    CHECK(v && http_has_token(v, n, "upgrade"));
    CHECK(v && http_has_token(v, n, "Keep-Alive"));
    v = http_header_get(&req, "upgrade", &n);
    CHECK(v && http_has_token(v, n, "websocket"));
    CHECK_EQ(req.keep_alive, 1);
    char chans[64];
    CHECK_EQ(http_query_get(req.query, req.query_len, "subscribe", chans, sizeof chans), 10);
    CHECK(memcmp(chans, "news,sport", 10) == 0);

    /* A POST with a body: the head ends where the body starts. */
    const char *post = "POST /pub/news HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
    CHECK_EQ(parse(post, &req), strlen(post) - 5);
    CHECK_EQ(req.content_length, 5);
    CHECK(eq(req.method, req.method_len, "POST"));
    CHECK(parse("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", &req) > 0);
    CHECK_EQ(req.content_length, 0);
    CHECK(parse("POST / HTTP/1.1\r\nContent-Length: 007\r\n\r\n", &req) > 0);
    CHECK_EQ(req.content_length, 7);
    CHECK(parse("POST / HTTP/1.1\r\nContent-Length: 9007199254740992\r\n\r\n", &req) > 0);
    CHECK_EQ(req.content_length, 9007199254740992LL);
    /* Repeated, equal values are one length. */
    CHECK(parse("POST / HTTP/1.1\r\nContent-Length: 12\r\ncontent-length: 12\r\n\r\n", &req) > 0);
    CHECK_EQ(req.content_length, 12);

    /* Chunked, in any case, as the only coding, possibly spread over fields and empty elements. */
    CHECK(parse("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", &req) > 0);
    CHECK_EQ(req.chunked, 1);
    CHECK_EQ(req.content_length, -1);
    CHECK(parse("POST / HTTP/1.1\r\nTransfer-Encoding: ChUnKeD\r\n\r\n", &req) > 0);
    CHECK_EQ(req.chunked, 1);
    CHECK(parse("POST / HTTP/1.1\r\nTransfer-Encoding: , chunked ,\r\n\r\n", &req) > 0);
    CHECK_EQ(req.chunked, 1);

    /* Methods are any token, case kept. */
    CHECK(parse("M-SEARCH * HTTP/1.1\r\n\r\n", &req) == -400); /* asterisk-form is refused */
    CHECK(parse("PURGE! /x HTTP/1.1\r\n\r\n", &req) > 0);
    CHECK(eq(req.method, req.method_len, "PURGE!"));
    CHECK(parse("get / HTTP/1.1\r\n\r\n", &req) > 0);
    CHECK(eq(req.method, req.method_len, "get"));

    /* Leading empty lines are skipped but counted. */
    const char *lead = "\r\n\r\nGET / HTTP/1.1\r\n\r\n";
    CHECK_EQ(parse(lead, &req), strlen(lead));
    CHECK(eq(req.method, req.method_len, "GET"));
    CHECK_EQ(req.head_len, strlen(lead));

    /* Every target byte from '!' to '~' except '#' is accepted as is. */
    char target[256] = "GET /", *t = target + 5;
    for (int c = 0x21; c < 0x7f; c++)
        if (c != '#' && c != '?')
            *t++ = (char)c;
    strcpy(t, " HTTP/1.1\r\n\r\n");
    CHECK(parse(target, &req) > 0);
    CHECK_EQ(req.target_len, 1 + 0x7f - 0x21 - 2);
    CHECK(req.query == NULL);
}

static void test_keep_alive(void)
{
    struct http_request req;
    CHECK(parse("GET / HTTP/1.1\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 1);
    CHECK(parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 0);
    CHECK(parse("GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 0);
    CHECK(parse("GET / HTTP/1.1\r\nConnection: closed\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 1);
    CHECK(parse("GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 0);

    CHECK(parse("GET / HTTP/1.0\r\n\r\n", &req) > 0);
    CHECK_EQ(req.minor_version, 0);
    CHECK_EQ(req.keep_alive, 0);
    CHECK(parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 1);
    CHECK(parse("GET / HTTP/1.0\r\nConnection: foo ,keep-alive\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 1);
    CHECK(parse("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 0);
    CHECK(parse("GET / HTTP/1.0\r\nConnection: keep-alives\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 0);
    CHECK(parse("GET / HTTP/1.0\r\nKeep-Alive: timeout=5\r\n\r\n", &req) > 0);
    CHECK_EQ(req.keep_alive, 0);
}

static void test_incremental(void)
{
    check_incremental("GET / HTTP/1.1\r\n\r\n");
    check_incremental("\r\n\r\nGET /a?b HTTP/1.0\r\nA: b\r\n\r\n");
    check_incremental("GET /ws?subscribe=a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n");
    check_incremental("POST /pub/x HTTP/1.1\r\nContent-Length: 3\r\nX:  \t \r\nY:\r\n\r\n");
    check_incremental("POST /pub/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
}

static void test_pipelined(void)
{
    struct http_request req;
    const char *two = "GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
                      "POST /two?q HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
                      "GET /thr";
    size_t len = strlen(two);
    int r = http_parse_request(two, len, &limits, &req);
    CHECK_EQ(r, strlen("GET /one HTTP/1.1\r\nHost: a\r\n\r\n"));
    CHECK(eq(req.path, req.path_len, "/one"));
    CHECK(hdr_is(&req, "host", "a"));
    CHECK_EQ(req.content_length, -1);

    const char *p = two + r;
    len -= (size_t)r;
    r = http_parse_request(p, len, &limits, &req);
    CHECK_EQ(r, strlen("POST /two?q HTTP/1.1\r\nContent-Length: 2\r\n\r\n"));
    CHECK(eq(req.path, req.path_len, "/two"));
    CHECK(eq(req.query, req.query_len, "q"));
    CHECK_EQ(req.content_length, 2);
    CHECK(http_header_get(&req, "host", NULL) == NULL);

    p += r + 2;
    len -= (size_t)r + 2;
    CHECK_EQ(http_parse_request(p, len, &limits, &req), 0);
}

static void test_limits(void)
{
    const char *req = "GET /abcdef HTTP/1.1\r\nHost: x\r\nA: 1\r\n\r\n"; /* 22 + 9 + 6 + 2 = 39 */
    CHECK_EQ(strlen(req), 39);
    CHECK_EQ(parse_lim(req, 39, 2), 39);
    CHECK_EQ(parse_lim(req, 1000, 2), 39);
    CHECK_EQ(parse_lim(req, 38, 2), -431);
    CHECK_EQ(parse_lim(req, 31, 2), -431);
    CHECK_EQ(parse_lim(req, 22, 2), -431); /* the request line fits, nothing after it does */
    CHECK_EQ(parse_lim(req, 21, 2), -414); /* its LF does not fit */
    CHECK_EQ(parse_lim(req, 5, 2), -414);
    CHECK_EQ(parse_lim(req, 0, 2), -431); /* no room even to tell an empty line from the request line */

    /* Too many fields, noticed as soon as the one too many starts. */
    CHECK_EQ(parse_lim(req, 1000, 1), -431);
    CHECK_EQ(parse_lim(req, 1000, 0), -431);
    CHECK_EQ(parse_lim("GET / HTTP/1.1\r\nA: 1\r\nB", 1000, 1), -431);
    CHECK_EQ(parse_lim("GET / HTTP/1.1\r\nA: 1\r\n", 1000, 1), 0);
    CHECK_EQ(parse_lim("GET / HTTP/1.1\r\nA: 1\r\n\r\n", 1000, 1), 24);
    /* A max_headers beyond the array's size is the array's size. */
    char many[4096] = "GET / HTTP/1.1\r\n";
    for (int i = 0; i < HTTP_MAX_HEADERS; i++)
        strcat(many, "X: y\r\n");
    strcat(many, "\r\n");
    CHECK_EQ(parse_lim(many, 4096, 1000), strlen(many));
    CHECK_EQ(parse_lim(many, 4096, HTTP_MAX_HEADERS - 1), -431);
    many[strlen(many) - 2] = 0;
    strcat(many, "X: y\r\n\r\n");
    CHECK_EQ(parse_lim(many, 4096, 1000), -431);

    /* Limits are reported before the rest arrives, once max_head bytes have come without a head. */
    CHECK_EQ(parse_lim("GET /abcdefghijklmnopqrstuvwxyz", 16, 64), -414);
    CHECK_EQ(parse_lim("GET /abcdefghijk", 16, 64), -414);
    CHECK_EQ(parse_lim("GET /abcdefghij", 16, 64), 0);
    CHECK_EQ(parse_lim("GET / HTTP/1.1\r\nHost: aaaaaaaaaaaaaaaaa", 24, 64), -431);
    CHECK_EQ(parse_lim("GET / HTTP/1.1\r\nHost: a", 24, 64), 0);
    CHECK_EQ(parse_lim("GET / HTTP/1.1\r\nHost: aa", 24, 64), -431);
    /* Empty lines count too. */
    CHECK_EQ(parse_lim("\r\n\r\n\r\n\r\n", 8, 64), -431);
    CHECK_EQ(parse_lim("\r\n\r\n\r\n\r", 8, 64), 0);
    CHECK_EQ(parse_lim("\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n", 24, 64), 24);
    CHECK_EQ(parse_lim("\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n", 23, 64), -431);
    /* Junk is still junk when a limit is also passed: what is seen first wins. */
    CHECK_EQ(parse_lim("GET / HTTP/1.1\r\nBad Name: x\r\n", 20, 64), -400);
    /* A complete head followed by more than max_head bytes of body is fine. */
    char big[300] = "POST / HTTP/1.1\r\nContent-Length: 250\r\n\r\n";
    size_t head = strlen(big);
    memset(big + head, 'x', sizeof big - head - 1);
    CHECK_EQ(parse_lim(big, head, 64), head);
}

static void test_junk(void)
{
    /* Request line. */
    CHECK_EQ(status(" GET / HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET  / HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GE(T / HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GE\"T / HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("G\xc3\x89T / HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET\t/ HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET /\r\n\r\n"), -400);
    CHECK_EQ(status("GET / \r\n\r\n"), -400);
    CHECK_EQ(status("GET /\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1 \r\n\r\n"), -400);
    CHECK_EQ(status("GET /  HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\r\n\r\n"), -400);
    CHECK_EQ(status("GET / http/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.10\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/11\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1,1\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/a.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/2\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/2.0\r\n\r\n"), -505);
    CHECK_EQ(status("GET / HTTP/1.2\r\n\r\n"), -505);
    CHECK_EQ(status("GET / HTTP/0.9\r\n\r\n"), -505);
    CHECK_EQ(status("GET / HTTP/3.1\r\n\r\n"), -505);
    CHECK_EQ(status("\nGET / HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("\r\rGET / HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("\r\n \r\nGET / HTTP/1.1\r\n\r\n"), -400);
    /* Junk is found without waiting for the end of the line. */
    CHECK_EQ(status("GET / HTTX"), -400);
    CHECK_EQ(status("GET / HTTP/1.x"), -400);
    CHECK_EQ(status("GET / HTTP/1.1x"), -400);
    CHECK_EQ(status("GET x"), -400);
    CHECK_EQ(status("GET / HTTP/2.0"), 0); /* a well-formed version is judged once the line ends */

    /* Targets: origin-form, visible ASCII, no fragment. */
    CHECK_EQ(status("GET http://example.com/ HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("OPTIONS * HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("CONNECT example.com:443 HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET /a#frag HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET /a?b#c HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET /a\x01 HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET /a\x7f HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET /a\xc3\xa9 HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET /a\tb HTTP/1.1\r\n\r\n"), -400);
    CHECK_EQ(status("GET /a\rb HTTP/1.1\r\n\r\n"), -400);

    /* Line endings. */
    CHECK_EQ(status("GET / HTTP/1.1\n\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost: x\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost: x\r\n\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost: x\r\n\rX"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n"), -400);

    /* Header fields. */
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost: x\r\n continued\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost: x\r\n\tcontinued\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\n Host: x\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost : x\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost\t: x\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\n: x\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHost\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nHo\"st: x\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nX: a\x01z\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nX: a\x7fz\r\n\r\n"), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nX: a\x1b[31m\r\n\r\n"), -400);
    struct http_request req;
    static const char nul_value[] = "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n";
    CHECK_EQ(http_parse_request(nul_value, sizeof nul_value - 1, &limits, &req), -400);
    static const char nul_name[] = "GET / HTTP/1.1\r\nX\0: ab\r\n\r\n";
    CHECK_EQ(http_parse_request(nul_name, sizeof nul_name - 1, &limits, &req), -400);
    static const char nul_target[] = "GET /\0 HTTP/1.1\r\n\r\n";
    CHECK_EQ(http_parse_request(nul_target, sizeof nul_target - 1, &limits, &req), -400);
    static const char nul_method[] = "G\0T / HTTP/1.1\r\n\r\n";
    CHECK_EQ(http_parse_request(nul_method, sizeof nul_method - 1, &limits, &req), -400);
    CHECK_EQ(status("GET / HTTP/1.1\r\nX: a\tb\r\n\r\n"), 26); /* HT inside a value is fine */

    /* Framing. */
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length:\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: 9007199254740993\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"), -501);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), -501);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"), -501);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"), -501);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunkedx\r\n\r\n"), -501);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n"), -400);
    CHECK_EQ(status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), -400);
}

/* Decode in into a fresh buffer, feeding step bytes per call (0: all at once). Returns the decoder's
 * last result; *out gets the body followed by the rest. */
static int chunked(const char *in, size_t step, char *out, size_t *body_len, size_t *rest_len)
{
    struct http_chunked c;
    size_t n = strlen(in), off = 0, body = 0;
    char buf[1024];
    int r = 0;
    http_chunked_init(&c);
    *rest_len = 0;
    while (off < n) {
        size_t k = step && n - off > step ? step : n - off, rest;
        memcpy(buf, in + off, k);
        size_t len = k;
        r = http_chunked_decode(&c, buf, &len, &rest);
        CHECK(len <= k);
        memcpy(out + body, buf, len);
        body += len;
        off += k;
        if (r != 0) {
            memcpy(out + body, buf + len, rest);
            *rest_len = rest + (n - off); /* what this call had left plus what was never fed */
            memcpy(out + body + rest, in + off, n - off);
            break;
        }
        CHECK_EQ(rest, 0);
    }
    if (r == 1)
        CHECK_EQ(c.total, body);
    *body_len = body;
    return r;
}

static void check_chunked(const char *in, const char *body, const char *rest)
{
    for (size_t step = 0; step <= 3; step++) {
        char out[1024];
        size_t body_len, rest_len;
        CHECK_EQ(chunked(in, step, out, &body_len, &rest_len), 1);
        CHECK(eq(out, body_len, body));
        CHECK(eq(out + body_len, rest_len, rest));
    }
}

static void check_chunked_bad(const char *in)
{
    for (size_t step = 0; step <= 1; step++) {
        char out[1024];
        size_t body_len, rest_len;
        int r = chunked(in, step, out, &body_len, &rest_len);
        if (r != -1)
            fprintf(stderr, "chunked %s step %zu: %d\n", in, step, r);
        CHECK_EQ(r, -1);
    }
}

static void check_chunked_more(const char *in)
{
    for (size_t step = 0; step <= 1; step++) {
        char out[1024];
        size_t body_len, rest_len;
        CHECK_EQ(chunked(in, step, out, &body_len, &rest_len), 0);
    }
}

/* A body of `chunks` one-byte chunks, each with an extension of ext_len bytes, then (when chunks is
 * 0) one trailer with a value of ext_len bytes: decoded whole and a byte at a time, both give r. */
static void check_meta(int chunks, size_t ext_len, int r)
{
    size_t cap = (size_t)(chunks + 1) * (ext_len + 16) + 64, n = 0;
    char *in = malloc(cap), *buf = malloc(cap);
    for (int i = 0; i < chunks; i++) {
        n += (size_t)sprintf(in + n, "1;");
        memset(in + n, 'e', ext_len);
        n += ext_len;
        n += (size_t)sprintf(in + n, "\r\nx\r\n");
    }
    n += (size_t)sprintf(in + n, "0\r\n");
    if (!chunks) {
        n += (size_t)sprintf(in + n, "X:");
        memset(in + n, 't', ext_len);
        n += ext_len;
        n += (size_t)sprintf(in + n, "\r\n");
    }
    n += (size_t)sprintf(in + n, "\r\n");

    struct http_chunked c;
    size_t len = n, rest, body = 0;
    http_chunked_init(&c);
    memcpy(buf, in, n);
    CHECK_EQ(http_chunked_decode(&c, buf, &len, &rest), r);
    if (r == 1)
        CHECK_EQ(len, chunks);
    http_chunked_init(&c);
    int got = 0;
    for (size_t i = 0; i < n && got == 0; i++) {
        buf[0] = in[i];
        len = 1;
        got = http_chunked_decode(&c, buf, &len, &rest);
        body += len;
    }
    CHECK_EQ(got, r);
    if (r == 1)
        CHECK_EQ(body, chunks);
    free(in);
    free(buf);
}

static void test_chunked(void)
{
    check_chunked("0\r\n\r\n", "", "");
    check_chunked("5\r\nhello\r\n0\r\n\r\n", "hello", "");
    check_chunked("5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n", "hello, world", "");
    check_chunked("a\r\n0123456789\r\nA\r\nabcdefghij\r\n000\r\n\r\n", "0123456789abcdefghij", "");
    check_chunked("00000005\r\nhe\r\nl\r\n0\r\n\r\n", "he\r\nl", "");
    check_chunked("5;name=value\r\nhello\r\n0;last\r\n\r\n", "hello", "");
    check_chunked("5 ;a=\"q;\\\"x\"\t; b\r\nhello\r\n0\r\n\r\n", "hello", "");
    check_chunked("5\r\nhello\r\n0\r\nExpires: never\r\nX-Sum:\tabc \r\n\r\n", "hello", "");
    check_chunked("5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n", "hello", "GET / HTTP/1.1\r\n\r\n");
    check_chunked("3\r\nabc\r\n0\r\nT: 1\r\n\r\nX", "abc", "X");

    check_chunked_more("");
    check_chunked_more("5");
    check_chunked_more("5\r\nhel");
    check_chunked_more("5\r\nhello\r\n");
    check_chunked_more("5\r\nhello\r\n0\r\n");
    check_chunked_more("5\r\nhello\r\n0\r\nA: b\r\n");
    check_chunked_more("5\r\nhello\r\n0\r\n\r");
    check_chunked_more("20000000000000\r\nabc");
    check_chunked_more("1fffffffffffff\r\n");

    check_chunked_bad("\r\n");
    check_chunked_bad(";ext\r\n");
    check_chunked_bad("g\r\n");
    check_chunked_bad("-1\r\n");
    check_chunked_bad("+1\r\n");
    check_chunked_bad("0x5\r\nhello\r\n0\r\n\r\n");
    check_chunked_bad("5 \r\nhello\r\n0\r\n\r\n");
    check_chunked_bad(" 5\r\nhello\r\n0\r\n\r\n");
    check_chunked_bad("5\nhello\r\n0\r\n\r\n");
    check_chunked_bad("5\rhello\r\n0\r\n\r\n");
    check_chunked_bad("5\r\nhelloX\r\n0\r\n\r\n");
    check_chunked_bad("5\r\nhello\n0\r\n\r\n");
    check_chunked_bad("5\r\nhello\r0\r\n\r\n");
    check_chunked_bad("5\r\nhello\r\n0\r\n\n");
    check_chunked_bad("5\r\nhello\r\n0\r\n\rX");
    check_chunked_bad("5;a\nb\r\nhello\r\n0\r\n\r\n");
    check_chunked_bad("5;a\x01\r\nhello\r\n0\r\n\r\n");
    check_chunked_bad("20000000000001\r\n");
    check_chunked_bad("100000000000000\r\n");
    check_chunked_bad("ffffffffffffffffffff\r\n");
    check_chunked_bad("0\r\n folded\r\n\r\n");
    check_chunked_bad("0\r\nBad Name: x\r\n\r\n");
    check_chunked_bad("0\r\n: x\r\n\r\n");
    check_chunked_bad("0\r\nA: x\ny\r\n\r\n");
    check_chunked_bad("0\r\nA: x\x7f\r\n\r\n");
    check_chunked_bad("0\r\nA: x\r\r\n");

    /* Size digits, extensions and trailers are bounded, over the whole body for the last two. */
    check_chunked("0000000000000005\r\nhello\r\n0000000000000000\r\n\r\n", "hello", "");
    check_chunked_bad("00000000000000005\r\nhello\r\n0\r\n\r\n");
    check_chunked_bad("00000000000000000\r\n\r\n");
    check_meta(1, 16384 - 2, 1);  /* ';' + extension + CR: exactly the cap */
    check_meta(1, 16384 - 1, -1);
    check_meta(16, 1024 - 2, 1);  /* spread over chunks */
    check_meta(17, 1024 - 2, -1);
    check_meta(0, 16384 - 4, 1);  /* one trailer: "X:" + value + CRLF */
    check_meta(0, 16384 - 3, -1);

    /* After the end, more calls report everything as the rest; after an error, stay failed. */
    struct http_chunked c;
    char buf[64];
    size_t len, rest;
    http_chunked_init(&c);
    strcpy(buf, "1\r\nx\r\n0\r\n\r\n");
    len = strlen(buf);
    CHECK_EQ(http_chunked_decode(&c, buf, &len, &rest), 1);
    CHECK_EQ(len, 1);
    CHECK_EQ(rest, 0);
    strcpy(buf, "GET");
    len = 3;
    CHECK_EQ(http_chunked_decode(&c, buf, &len, &rest), 1);
    CHECK_EQ(len, 0);
    CHECK_EQ(rest, 3);
    http_chunked_init(&c);
    strcpy(buf, "2\r\nabX");
    len = strlen(buf);
    CHECK_EQ(http_chunked_decode(&c, buf, &len, &rest), -1);
    strcpy(buf, "\r\n0\r\n\r\n");
    len = strlen(buf);
    CHECK_EQ(http_chunked_decode(&c, buf, &len, &rest), -1);
    /* An empty call changes nothing. */
    http_chunked_init(&c);
    len = 0;
    CHECK_EQ(http_chunked_decode(&c, buf, &len, &rest), 0);
    CHECK_EQ(len, 0);
    CHECK_EQ(rest, 0);
    /* A huge chunk streams through as it comes. */
    http_chunked_init(&c);
    strcpy(buf, "fffff\r\n0123456789");
    len = strlen(buf);
    CHECK_EQ(http_chunked_decode(&c, buf, &len, &rest), 0);
    CHECK(eq(buf, len, "0123456789"));
    CHECK_EQ(c.total, 10);
    CHECK_EQ(c.chunk_left, 0xfffff - 10);
}

static void test_path_decode(void)
{
    char out[64];
    CHECK_EQ(http_path_decode("/a%20b", 6, out), 4);
    CHECK(memcmp(out, "/a b", 4) == 0);
    CHECK_EQ(http_path_decode("/%2f%2F%7e%7E", 13, out), 5);
    CHECK(memcmp(out, "///~~", 5) == 0);
    CHECK_EQ(http_path_decode("/a+b", 4, out), 4);
    CHECK(memcmp(out, "/a+b", 4) == 0);
    CHECK_EQ(http_path_decode("%C3%A9", 6, out), 2);
    CHECK(memcmp(out, "\xc3\xa9", 2) == 0);
    CHECK_EQ(http_path_decode("%ff", 3, out), 1);
    CHECK_EQ((unsigned char)out[0], 0xff);
    CHECK_EQ(http_path_decode("%25%32%30", 9, out), 3);
    CHECK(memcmp(out, "%20", 3) == 0); /* decoded once only */
    CHECK_EQ(http_path_decode("", 0, out), 0);
    CHECK_EQ(http_path_decode("%", 1, out), -1);
    CHECK_EQ(http_path_decode("/a%", 3, out), -1);
    CHECK_EQ(http_path_decode("%4", 2, out), -1);
    CHECK_EQ(http_path_decode("%41", 2, out), -1); /* the length bounds the escape, not a NUL */
    CHECK_EQ(http_path_decode("%zz", 3, out), -1);
    CHECK_EQ(http_path_decode("%4g", 3, out), -1);
    CHECK_EQ(http_path_decode("%g4", 3, out), -1);
    CHECK_EQ(http_path_decode("% 41", 4, out), -1);
    CHECK_EQ(http_path_decode("/a%00b", 6, out), -1);
    CHECK_EQ(http_path_decode("/a\0b", 4, out), -1);
}

static void test_query_get(void)
{
    char out[16];
    const char *q = "a=1&subscribe=news%2Csport&b=x+y%21&empty=&flag&a=2&c=%41%42;d=4";
    size_t n = strlen(q);
    CHECK_EQ(http_query_get(q, n, "a", out, sizeof out), 1);
    CHECK(out[0] == '1'); /* first occurrence wins */
    CHECK_EQ(http_query_get(q, n, "subscribe", out, sizeof out), 10);
    CHECK(memcmp(out, "news,sport", 10) == 0);
    CHECK_EQ(http_query_get(q, n, "b", out, sizeof out), 4);
    CHECK(memcmp(out, "x y!", 4) == 0);
    CHECK_EQ(http_query_get(q, n, "empty", out, sizeof out), 0);
    CHECK_EQ(http_query_get(q, n, "flag", out, sizeof out), 0);
    CHECK_EQ(http_query_get(q, n, "c", out, sizeof out), 6); /* ';' is not a separator */
    CHECK(memcmp(out, "AB;d=4", 6) == 0);
    CHECK_EQ(http_query_get(q, n, "d", out, sizeof out), -1);
    CHECK_EQ(http_query_get(q, n, "A", out, sizeof out), -1); /* keys are compared exactly */
    CHECK_EQ(http_query_get(q, n, "sub", out, sizeof out), -1);
    CHECK_EQ(http_query_get(q, n, "subscribes", out, sizeof out), -1);
    CHECK_EQ(http_query_get(q, n, "missing", out, sizeof out), -1);
    CHECK_EQ(http_query_get(q, 3, "a", out, sizeof out), 1);
    CHECK_EQ(http_query_get(q, 2, "a", out, sizeof out), 0); /* the length bounds the value */
    CHECK_EQ(http_query_get(q, 0, "a", out, sizeof out), -1);
    CHECK_EQ(http_query_get(NULL, 0, "a", out, sizeof out), -1);
    CHECK_EQ(http_query_get("&&a=1&", 6, "a", out, sizeof out), 1);
    CHECK_EQ(http_query_get("x=1=2", 5, "x", out, sizeof out), 3);
    CHECK(memcmp(out, "1=2", 3) == 0);
    CHECK_EQ(http_query_get("a%3D=1", 6, "a=", out, sizeof out), -1);

    /* Bad escapes, NULs and values that do not fit. */
    CHECK_EQ(http_query_get("a=%", 3, "a", out, sizeof out), -2);
    CHECK_EQ(http_query_get("a=%4", 4, "a", out, sizeof out), -2);
    CHECK_EQ(http_query_get("a=%4&b=1", 8, "a", out, sizeof out), -2);
    CHECK_EQ(http_query_get("a=%zz", 5, "a", out, sizeof out), -2);
    CHECK_EQ(http_query_get("a=x%00", 6, "a", out, sizeof out), -2);
    CHECK_EQ(http_query_get("a=%zz&b=1", 9, "b", out, sizeof out), 1); /* only the wanted value */
    CHECK_EQ(http_query_get("a=%zz&a=1", 9, "a", out, sizeof out), -2);
    CHECK_EQ(http_query_get("a=1234", 6, "a", out, 4), 4);
    CHECK_EQ(http_query_get("a=12345", 7, "a", out, 4), -2);
    CHECK_EQ(http_query_get("a=%41%41%41%41", 14, "a", out, 4), 4);
    CHECK_EQ(http_query_get("a=", 2, "a", out, 0), 0);
}

static void test_tokens(void)
{
    CHECK(http_has_token("keep-alive, Upgrade", 19, "upgrade"));
    CHECK(http_has_token("keep-alive, Upgrade", 19, "KEEP-ALIVE"));
    CHECK(!http_has_token("keep-alive, Upgrades", 20, "upgrade"));
    CHECK(!http_has_token("keep-alive, Upgrade", 19, "upgrades"));
    CHECK(!http_has_token("keep-alive, Upgrade", 18, "upgrade"));
    CHECK(!http_has_token("keep-alive, Upgrade", 19, "keep"));
    CHECK(http_has_token("Upgrade", 7, "upgrade"));
    CHECK(http_has_token(" \tUpgrade\t ", 11, "upgrade"));
    CHECK(http_has_token(",,upgrade,,", 11, "upgrade"));
    CHECK(http_has_token("a ,b, c", 7, "b"));
    CHECK(http_has_token("a ,b, c", 7, "c"));
    CHECK(!http_has_token("a b", 3, "a"));
    CHECK(!http_has_token("", 0, "upgrade"));
    CHECK(!http_has_token(NULL, 0, "upgrade"));
    CHECK(!http_has_token("upgrade", 7, ""));
    CHECK(!http_has_token("xupgrade", 8, "upgrade"));
}

int main(void)
{
    test_good();
    test_keep_alive();
    test_incremental();
    test_pipelined();
    test_limits();
    test_junk();
    test_chunked();
    test_path_decode();
    test_query_get();
    test_tokens();
    return TEST_REPORT();
}
