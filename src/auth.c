/* auth.c - JWT (HS256) verification and channel grants. */
#include "auth.h"

#include "buf.h"
#include "json.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>
#include <string.h>

#define AUTH_MAX_TOKEN 8192

struct auth_grants {
    char *subject;
    char **patterns[2]; /* per action: NULL-terminated */
};

/* Decode base64url without padding into out (room for len bytes). Returns the length or -1. */
static ssize_t b64url_decode(const char *in, size_t len, unsigned char *out)
{
    size_t n = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        char ch = in[i];
        int v;
        if (ch >= 'A' && ch <= 'Z')
            v = ch - 'A';
        else if (ch >= 'a' && ch <= 'z')
            v = ch - 'a' + 26;
        else if (ch >= '0' && ch <= '9')
            v = ch - '0' + 52;
        else if (ch == '-')
            v = 62;
        else if (ch == '_')
            v = 63;
        else
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (unsigned char)(acc >> bits);
        }
    }
    /* Leftover bits must be zero padding of the last byte: 2 or 4 bits, never 6. */
    if (bits >= 6 || (acc & ((1u << bits) - 1)))
        return -1;
    return (ssize_t)n;
}

/* Read a JSON number span as a double; -1 when it is not a number. */
static double span_number(const struct json_span *s)
{
    if (s->type != JSON_NUMBER || s->len > 40)
        return -1;
    char tmp[48];
    memcpy(tmp, s->p, s->len);
    tmp[s->len] = 0;
    return strtod(tmp, NULL);
}

/* Parse an array of strings (a valid JSON span) into a NULL-terminated list; NULL on error. */
static char **string_array(const struct json_span *s)
{
    if (s->type != JSON_ARRAY)
        return NULL;
    size_t cap = 4, n = 0;
    char **list = xcalloc(cap + 1, sizeof(*list));
    const char *p = s->p + 1, *end = s->p + s->len - 1; /* inside the brackets */
    for (;;) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ','))
            p++;
        if (p >= end)
            return list;
        if (*p != '"')
            break;
        const char *q = p + 1;
        while (q < end && *q != '"')
            q += *q == '\\' ? 2 : 1;
        if (q >= end)
            break;
        size_t tlen = (size_t)(q + 1 - p);
        char *item = xmalloc(tlen + 1);
        ssize_t dlen = json_string_decode(p, tlen, item);
        if (dlen < 0 || memchr(item, 0, (size_t)dlen)) {
            free(item);
            break;
        }
        item[dlen] = 0;
        if (n == cap) {
            cap *= 2;
            list = xrealloc(list, (cap + 1) * sizeof(*list));
        }
        list[n++] = item;
        list[n] = NULL;
        p = q + 1;
    }
    for (size_t i = 0; i < n; i++)
        free(list[i]);
    free(list);
    return NULL;
}

static void free_list(char **list)
{
    for (size_t i = 0; list && list[i]; i++)
        free(list[i]);
    free(list);
}

void auth_free(struct auth_grants *g)
{
    if (!g)
        return;
    free(g->subject);
    free_list(g->patterns[0]);
    free_list(g->patterns[1]);
    free(g);
}

struct auth_grants *auth_verify(const char *token, size_t len, const char *secret, double now,
                                const char **why)
{
    const char *dot1 = memchr(token, '.', len);
    const char *dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token)) : NULL;
    if (len > AUTH_MAX_TOKEN || !dot1 || !dot2) {
        *why = "malformed token";
        return NULL;
    }
    const char *sig = dot2 + 1;
    size_t sig_len = len - (size_t)(sig - token);
    unsigned char *buf = xmalloc(len + 1);
    struct auth_grants *g = NULL;
    /* The signature first: nothing of an unsigned token is looked at. */
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)token,
         (size_t)(dot2 - token), mac, &mac_len);
    ssize_t n = b64url_decode(sig, sig_len, buf);
    if (n != (ssize_t)mac_len || CRYPTO_memcmp(buf, mac, mac_len) != 0) {
        *why = "bad token signature";
        goto out;
    }
    n = b64url_decode(token, (size_t)(dot1 - token), buf);
    static const char *const header_keys[] = {"alg"};
    struct json_span alg;
    const char *err;
    char err_buf[64];
    if (n < 0 || json_object_scan((char *)buf, (size_t)n, header_keys, &alg, 1, &err, err_buf) < 0 ||
        alg.len != 7 || memcmp(alg.p, "\"HS256\"", 7) != 0) {
        *why = "token header must be a JSON object with \"alg\":\"HS256\"";
        goto out;
    }
    n = b64url_decode(dot1 + 1, (size_t)(dot2 - dot1 - 1), buf);
    enum { EXP, NBF, SUB, SUBSCRIBE, PUBLISH, NCLAIMS };
    static const char *const claim_keys[NCLAIMS] = {"exp", "nbf", "sub", "subscribe", "publish"};
    struct json_span c[NCLAIMS];
    if (n < 0 || json_object_scan((char *)buf, (size_t)n, claim_keys, c, NCLAIMS, &err, err_buf) < 0) {
        *why = "token claims are not a JSON object";
        goto out;
    }
    double exp = span_number(&c[EXP]);
    if (exp < 0) {
        *why = "token has no \"exp\" claim";
        goto out;
    }
    if (exp <= now) {
        *why = "token expired";
        goto out;
    }
    if (c[NBF].type != JSON_NONE && span_number(&c[NBF]) > now) {
        *why = "token not valid yet";
        goto out;
    }
    g = xcalloc(1, sizeof(*g));
    for (int a = 0; a < 2; a++) {
        const struct json_span *s = &c[a == AUTH_SUBSCRIBE ? SUBSCRIBE : PUBLISH];
        if (s->type == JSON_NONE)
            continue;
        if (!(g->patterns[a] = string_array(s))) {
            *why = "\"subscribe\" and \"publish\" claims must be arrays of channel names";
            auth_free(g);
            g = NULL;
            goto out;
        }
    }
    if (c[SUB].type == JSON_STRING) {
        g->subject = xmalloc(c[SUB].len);
        ssize_t slen = json_string_decode(c[SUB].p, c[SUB].len, g->subject);
        g->subject[slen < 0 ? 0 : slen] = 0;
    }
out:
    free(buf);
    return g;
}

/* 1 if one of g's grants for action covers name[0..len): a grant "x*" every name that starts
 * with x, and, when the name is a whole channel name (not a prefix), a grant equal to it. */
static int allows(const struct auth_grants *g, enum auth_action action, const char *name, size_t len,
                  int whole)
{
    for (char **p = g ? g->patterns[action] : NULL; p && *p; p++) {
        size_t plen = strlen(*p);
        int wildcard = plen && (*p)[plen - 1] == '*';
        if (wildcard ? (len >= plen - 1 && memcmp(name, *p, plen - 1) == 0)
                     : (whole && plen == len && memcmp(name, *p, len) == 0))
            return 1;
    }
    return 0;
}

int auth_allows(const struct auth_grants *g, enum auth_action action, const char *channel, size_t len)
{
    return allows(g, action, channel, len, 1);
}

int auth_allows_prefix(const struct auth_grants *g, enum auth_action action, const char *prefix,
                       size_t len)
{
    return allows(g, action, prefix, len, 0);
}

const char *auth_subject(const struct auth_grants *g) { return g ? g->subject : NULL; }
