/* Unit tests of auth.c: token verification (signature, algorithm, expiry) and channel grants. */
#include "auth.h"
#include "test.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <string.h>

static const char *secret = "0123456789abcdef0123";

static void b64url(const unsigned char *in, size_t n, char *out)
{
    static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = al[(v >> 18) & 63];
        out[o++] = al[(v >> 12) & 63];
        if (i + 1 < n)
            out[o++] = al[(v >> 6) & 63];
        if (i + 2 < n)
            out[o++] = al[v & 63];
    }
    out[o] = 0;
}

/* Sign header and claims (JSON texts) with key into out. */
static void make_token(const char *header, const char *claims, const char *key, char *out)
{
    char h[512], p[1024];
    b64url((const unsigned char *)header, strlen(header), h);
    b64url((const unsigned char *)claims, strlen(claims), p);
    int n = sprintf(out, "%s.%s", h, p);
    unsigned char mac[32];
    unsigned int mac_len;
    HMAC(EVP_sha256(), key, (int)strlen(key), (unsigned char *)out, (size_t)n, mac, &mac_len);
    out[n++] = '.';
    b64url(mac, mac_len, out + n);
}

static struct auth_grants *verify(const char *token, const char **why)
{
    return auth_verify(token, strlen(token), secret, 1000, why);
}

int main(void)
{
    const char *hs = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    char tok[4096];
    const char *why = NULL;

    make_token(hs, "{\"exp\":2000,\"sub\":\"ann\",\"subscribe\":[\"news\",\"chat:*\"],\"publish\":[\"chat:room1\"]}",
               secret, tok);
    struct auth_grants *g = verify(tok, &why);
    CHECK(g != NULL);
    CHECK(auth_allows(g, AUTH_SUBSCRIBE, "news", 4));
    CHECK(!auth_allows(g, AUTH_SUBSCRIBE, "newsx", 5));
    CHECK(auth_allows(g, AUTH_SUBSCRIBE, "chat:anything", 13));
    CHECK(auth_allows(g, AUTH_SUBSCRIBE, "chat:", 5));
    CHECK(!auth_allows(g, AUTH_SUBSCRIBE, "chat", 4));
    CHECK(auth_allows(g, AUTH_PUBLISH, "chat:room1", 10));
    CHECK(!auth_allows(g, AUTH_PUBLISH, "chat:room2", 10));
    CHECK(!auth_allows(g, AUTH_PUBLISH, "news", 4));
    /* Every channel starting with a prefix: only a prefix grant covers them all. */
    CHECK(auth_allows_prefix(g, AUTH_SUBSCRIBE, "chat:", 5));
    CHECK(auth_allows_prefix(g, AUTH_SUBSCRIBE, "chat:room.", 10));
    CHECK(!auth_allows_prefix(g, AUTH_SUBSCRIBE, "chat", 4));
    CHECK(!auth_allows_prefix(g, AUTH_SUBSCRIBE, "news", 4)); /* "news" alone, not "news..." */
    CHECK(!auth_allows_prefix(g, AUTH_SUBSCRIBE, "", 0));
    CHECK(!auth_allows_prefix(g, AUTH_PUBLISH, "chat:room1", 10));
    CHECK(strcmp(auth_subject(g), "ann") == 0);
    auth_free(g);

    make_token(hs, "{\"exp\":2000,\"subscribe\":[\"*\"]}", secret, tok);
    g = verify(tok, &why);
    CHECK(g && auth_allows(g, AUTH_SUBSCRIBE, "x", 1) && !auth_allows(g, AUTH_PUBLISH, "x", 1));
    CHECK(g && auth_allows_prefix(g, AUTH_SUBSCRIBE, "", 0));
    auth_free(g);
    CHECK(!auth_allows(NULL, AUTH_SUBSCRIBE, "x", 1));
    CHECK(!auth_allows_prefix(NULL, AUTH_SUBSCRIBE, "x", 1));

    /* Refusals. */
    make_token(hs, "{\"exp\":999}", secret, tok);
    CHECK(verify(tok, &why) == NULL && strcmp(why, "token expired") == 0);
    make_token(hs, "{\"subscribe\":[\"a\"]}", secret, tok);
    CHECK(verify(tok, &why) == NULL && strstr(why, "exp"));
    make_token(hs, "{\"exp\":2000,\"nbf\":1500}", secret, tok);
    CHECK(verify(tok, &why) == NULL && strstr(why, "not valid yet"));
    make_token(hs, "{\"exp\":2000}", "another secret entirely", tok);
    CHECK(verify(tok, &why) == NULL && strstr(why, "signature"));
    make_token("{\"alg\":\"none\"}", "{\"exp\":2000}", secret, tok);
    CHECK(verify(tok, &why) == NULL && strstr(why, "HS256"));
    make_token(hs, "{\"exp\":2000,\"subscribe\":\"news\"}", secret, tok);
    CHECK(verify(tok, &why) == NULL && strstr(why, "arrays"));
    make_token(hs, "{\"exp\":2000,\"subscribe\":[\"a\",1]}", secret, tok);
    CHECK(verify(tok, &why) == NULL);
    make_token(hs, "not json", secret, tok);
    CHECK(verify(tok, &why) == NULL);
    CHECK(verify("", &why) == NULL);
    CHECK(verify("a.b", &why) == NULL);
    CHECK(verify("a.b.c", &why) == NULL);
    CHECK(verify("..", &why) == NULL);
    /* A valid token with one byte of its signature changed. */
    make_token(hs, "{\"exp\":2000}", secret, tok);
    tok[strlen(tok) - 2] ^= 1;
    CHECK(verify(tok, &why) == NULL);
    return TEST_REPORT();
}
