/* fuzz_http.c - libFuzzer driver for http.c: request heads under two sets of limits, prefix
 * consistency, the helpers on what was parsed, and the chunked decoder fed whole and in pieces. */
#include "fuzz.h"
#include "http.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int within(const char *p, size_t n, const char *lo, const char *hi)
{
    return p && p >= lo && p <= hi && n <= (size_t)(hi - p);
}

/* Everything a successful parse returned points into the head, and the head is well formed. */
static void check_request(const char *buf, int r, const struct http_limits *l, const struct http_request *req)
{
    const char *end = buf + r;
    REQUIRE((size_t)r == req->head_len && (size_t)r <= l->max_head);
    REQUIRE(req->num_headers <= l->max_headers && req->num_headers <= HTTP_MAX_HEADERS);
    REQUIRE(within(req->method, req->method_len, buf, end) && req->method_len > 0);
    REQUIRE(within(req->target, req->target_len, buf, end) && req->target[0] == '/');
    REQUIRE(req->path == req->target && req->path_len <= req->target_len);
    if (req->query) {
        REQUIRE(req->query == req->path + req->path_len + 1 && req->query[-1] == '?');
        REQUIRE(req->query + req->query_len == req->target + req->target_len);
        REQUIRE(!memchr(req->path, '?', req->path_len));
    } else {
        REQUIRE(req->path_len == req->target_len && req->query_len == 0);
    }
    REQUIRE(req->minor_version == 0 || req->minor_version == 1);
    REQUIRE(req->keep_alive == 0 || req->keep_alive == 1);
    REQUIRE(req->content_length >= -1 && req->content_length <= ((int64_t)1 << 53));
    REQUIRE(!(req->chunked && req->content_length >= 0));
    for (size_t i = 0; i < req->num_headers; i++) {
        const struct http_header *h = &req->headers[i];
        REQUIRE(within(h->name, h->name_len, buf, end) && h->name_len > 0);
        REQUIRE(within(h->value, h->value_len, buf, end));
        REQUIRE(!memchr(h->value, '\r', h->value_len) && !memchr(h->value, '\n', h->value_len));
        REQUIRE(!memchr(h->value, 0, h->value_len));
        if (h->value_len)
            REQUIRE(h->value[0] != ' ' && h->value[h->value_len - 1] != ' ');
        size_t n;
        char name[256];
        if (h->name_len < sizeof name) {
            memcpy(name, h->name, h->name_len);
            name[h->name_len] = 0;
            const char *v = http_header_get(req, name, &n);
            REQUIRE(v && within(v, n, buf, end));
        }
        (void)http_has_token(h->value, h->value_len, "upgrade");
        (void)http_has_token(h->value, h->value_len, "close");
    }

    /* The decoders never write more than they are given room for. */
    char *out = malloc(req->path_len + 1);
    ssize_t d = http_path_decode(req->path, req->path_len, out);
    REQUIRE(d >= -1 && d <= (ssize_t)req->path_len);
    if (d > 0)
        REQUIRE(!memchr(out, 0, (size_t)d));
    free(out);
    if (req->query) {
        static const char *const keys[] = {"subscribe", "a", "", "x"};
        for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
            for (size_t cap = 0; cap <= 8; cap += 4) {
                char *q = malloc(cap + 1);
                ssize_t v = http_query_get(req->query, req->query_len, keys[k], q, cap);
                REQUIRE(v >= -2 && v <= (ssize_t)cap);
                free(q);
            }
        }
    }
}

/* Parse data[0..len) from a copy of exactly that size, so that ASan sees any read past the end. */
static int parse(const uint8_t *data, size_t len, const struct http_limits *l, struct http_request *req)
{
    char *buf = malloc(len ? len : 1);
    memcpy(buf, data, len);
    int r = http_parse_request(buf, len, l, req);
    REQUIRE(r >= 0 || r == -400 || r == -414 || r == -431 || r == -501 || r == -505);
    if (r > 0) {
        REQUIRE((size_t)r <= len);
        check_request(buf, r, l, req);
    }
    free(buf);
    return r;
}

static void fuzz_head(const uint8_t *data, size_t size)
{
    static const struct http_limits small = {64, 4}, normal = {8192, 64};
    static struct http_request req, req2;

    int rs = parse(data, size, &small, &req);
    int rn = parse(data, size, &normal, &req2);
    /* A head that fits the small limits parses the same under the larger ones, and back. */
    if (rs > 0)
        REQUIRE(rn == rs && req.num_headers == req2.num_headers && req.keep_alive == req2.keep_alive &&
               req.content_length == req2.content_length && req.chunked == req2.chunked);
    if (rn > 0 && rn <= 64 && req2.num_headers <= 4)
        REQUIRE(rs == rn);
    if (rn == -400 || rn == -501 || rn == -505)
        REQUIRE(rs < 0); /* the small limits may stop it earlier, never accept it */

    /* Every byte is judged once seen: a prefix's answer is final unless it asked for more. */
    size_t cuts[] = {size / 2, size ? size - 1 : 0, rn > 0 ? (size_t)rn : 0, rn > 0 ? (size_t)rn - 1 : 0};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
        int rp = parse(data, cuts[i], &normal, &req);
        if (rp != 0)
            REQUIRE(rp == rn);
        if (rn == 0)
            REQUIRE(rp == 0);
    }
}

/* Decode data whole and in pieces of step bytes; both must agree on everything. */
struct decoded {
    int r;
    char *body;
    size_t body_len, rest_len, total;
    char *rest;
};

static void decode(const uint8_t *data, size_t size, size_t step, struct decoded *d)
{
    struct http_chunked c;
    size_t off = 0;
    http_chunked_init(&c);
    d->r = 0;
    d->body = malloc(size + 1);
    d->rest = malloc(size + 1);
    d->body_len = d->rest_len = 0;
    while (off < size) {
        size_t k = step && size - off > step ? step : size - off, len = k, rest = 77;
        char *piece = malloc(k);
        memcpy(piece, data + off, k);
        d->r = http_chunked_decode(&c, piece, &len, &rest);
        REQUIRE(d->r >= -1 && d->r <= 1);
        REQUIRE(len <= k);
        if (d->r == 1)
            REQUIRE(rest <= k - len);
        else
            REQUIRE(rest == 0);
        memcpy(d->body + d->body_len, piece, len);
        d->body_len += len;
        off += k;
        if (d->r == 1) {
            memcpy(d->rest, piece + len, rest);
            memcpy(d->rest + rest, data + off, size - off);
            d->rest_len = rest + size - off;
        }
        free(piece);
        if (d->r != 0)
            break;
    }
    d->total = c.total;
    REQUIRE(d->total == d->body_len);
    if (d->r == 1) /* the framing and body were a prefix of the input, the rest its tail */
        REQUIRE(d->rest_len <= size && memcmp(d->rest, data + size - d->rest_len, d->rest_len) == 0);
}

static void fuzz_chunked(const uint8_t *data, size_t size)
{
    struct decoded whole, bytes, sevens;
    decode(data, size, 0, &whole);
    decode(data, size, 1, &bytes);
    decode(data, size, 7, &sevens);
    const struct decoded *other[] = {&bytes, &sevens};
    for (size_t i = 0; i < 2; i++) {
        const struct decoded *o = other[i];
        REQUIRE(o->r == whole.r);
        REQUIRE(o->body_len == whole.body_len && memcmp(o->body, whole.body, whole.body_len) == 0);
        REQUIRE(o->rest_len == whole.rest_len && memcmp(o->rest, whole.rest, whole.rest_len) == 0);
    }
    free(whole.body), free(whole.rest), free(bytes.body), free(bytes.rest);
    free(sevens.body), free(sevens.rest);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_head(data, size);
    fuzz_chunked(data, size);
    /* A chunked body usually follows a head: decode what comes after one too. */
    struct http_request req;
    static const struct http_limits normal = {8192, 64};
    int r = http_parse_request((const char *)data, size, &normal, &req);
    if (r > 0)
        fuzz_chunked(data + r, size - (size_t)r);
    return 0;
}
