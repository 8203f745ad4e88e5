/* tls.c - OpenSSL server contexts with SNI, and non-blocking TLS reads and writes. */
#include "tls.h"

#include "buf.h"
#include "config.h"
#include "log.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <string.h>

/* The contexts in use: the default one and the extra certificates picked by SNI. */
static SSL_CTX *default_ctx;
static SSL_CTX **sni_ctx;
static size_t sni_count;

/* Gathered bytes for one SSL_write: as large as a few full records, so small messages share them. */
#define TLS_GATHER 65536
static unsigned char gather[TLS_GATHER];

static const char *ssl_error_string(void)
{
    static char text[256];
    unsigned long e = ERR_get_error();
    if (!e)
        return "unknown TLS error";
    ERR_error_string_n(e, text, sizeof(text));
    ERR_clear_error();
    return text;
}

/* Pick the certificate whose names match the client's server_name; the default otherwise. */
static int on_servername(SSL *ssl, int *alert, void *arg)
{
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (!name)
        return SSL_TLSEXT_ERR_OK;
    for (size_t i = 0; i < sni_count; i++) {
        X509 *cert = SSL_CTX_get0_certificate(sni_ctx[i]);
        if (cert && X509_check_host(cert, name, 0, 0, NULL) == 1) {
            SSL_set_SSL_CTX(ssl, sni_ctx[i]);
            break;
        }
    }
    return SSL_TLSEXT_ERR_OK;
}

static SSL_CTX *make_ctx(const char *cert, const char *key, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        snprintf(err, errlen, "tls: %s", ssl_error_string());
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* TLS 1.2: forward-secret AEAD suites only; TLS 1.3 suites are OpenSSL's defaults. */
    SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS");
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_tlsext_servername_callback(ctx, on_servername);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        snprintf(err, errlen, "tls: certificate %s: %s", cert, ssl_error_string());
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH) {
            ERR_clear_error();
            snprintf(err, errlen, "tls: key %s does not match certificate %s", key, cert);
        } else {
            snprintf(err, errlen, "tls: key %s: %s", key, ssl_error_string());
        }
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        ERR_clear_error();
        snprintf(err, errlen, "tls: key %s does not match certificate %s", key, cert);
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

int tls_configure(const struct config_tls *cfg, char *err, size_t errlen)
{
    if (!cfg)
        return 0;
    SSL_CTX *ctx = make_ctx(cfg->cert, cfg->key, err, errlen);
    if (!ctx)
        return -1;
    SSL_CTX **extra = xcalloc(cfg->nsni + 1, sizeof(*extra));
    for (size_t i = 0; i < cfg->nsni; i++) {
        extra[i] = make_ctx(cfg->sni[i].cert, cfg->sni[i].key, err, errlen);
        if (!extra[i]) {
            while (i--)
                SSL_CTX_free(extra[i]);
            free(extra);
            SSL_CTX_free(ctx);
            return -1;
        }
    }
    /* Sessions in progress hold their own references to the contexts they use. */
    SSL_CTX_free(default_ctx);
    for (size_t i = 0; i < sni_count; i++)
        SSL_CTX_free(sni_ctx[i]);
    free(sni_ctx);
    default_ctx = ctx;
    sni_ctx = extra;
    sni_count = cfg->nsni;
    return 0;
}

int tls_enabled(void) { return default_ctx != NULL; }

SSL *tls_new(int fd)
{
    SSL *ssl = SSL_new(default_ctx);
    if (!ssl)
        return NULL;
    if (SSL_set_fd(ssl, fd) != 1) {
        SSL_free(ssl);
        return NULL;
    }
    SSL_set_accept_state(ssl);
    return ssl;
}

void tls_free(SSL *ssl) { SSL_free(ssl); }

/* Map an SSL_* failure to our codes; log real errors at debug level (they are the peer's). */
static ssize_t failure(SSL *ssl, int rc)
{
    int e = SSL_get_error(ssl, rc);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        return TLS_WANT_READ;
    case SSL_ERROR_WANT_WRITE:
        return TLS_WANT_WRITE;
    case SSL_ERROR_ZERO_RETURN:
        return 0;
    case SSL_ERROR_SYSCALL:
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return TLS_WANT_READ;
        ERR_clear_error();
        return rc == 0 ? 0 : TLS_ERROR;
    default:
        log_debug("tls: %s", ssl_error_string());
        ERR_clear_error();
        return TLS_ERROR;
    }
}

ssize_t tls_read(SSL *ssl, void *buf, size_t len)
{
    size_t got = 0;
    /* One SSL_read returns at most one record: keep going while the buffer has room. */
    while (got < len) {
        size_t n;
        int rc = SSL_read_ex(ssl, (char *)buf + got, len - got, &n);
        if (rc != 1) {
            ssize_t f = failure(ssl, rc);
            if (got)
                return (ssize_t)got;
            return f;
        }
        got += n;
    }
    return (ssize_t)got;
}

int tls_pending(SSL *ssl) { return SSL_pending(ssl) > 0; }

int tls_peer_closed(SSL *ssl)
{
    char byte;
    ERR_clear_error();
    int n = SSL_peek(ssl, &byte, 1);
    if (n > 0)
        return 0;
    int e = SSL_get_error(ssl, n);
    return e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE;
}

ssize_t tls_writev(SSL *ssl, const struct iovec *iov, int iovcnt, size_t *asked)
{
    const void *p;
    size_t len;
    if (iovcnt == 1 || iov[0].iov_len >= TLS_GATHER) {
        p = iov[0].iov_base;
        len = iov[0].iov_len;
    } else {
        len = 0;
        for (int i = 0; i < iovcnt && len < TLS_GATHER; i++) {
            size_t take = iov[i].iov_len < TLS_GATHER - len ? iov[i].iov_len : TLS_GATHER - len;
            memcpy(gather + len, iov[i].iov_base, take);
            len += take;
        }
        p = gather;
    }
    size_t written;
    *asked = len;
    int rc = SSL_write_ex(ssl, p, len, &written);
    if (rc == 1)
        return (ssize_t)written;
    ssize_t f = failure(ssl, rc);
    return f == 0 ? TLS_ERROR : f;
}

void tls_shutdown(SSL *ssl)
{
    if (SSL_is_init_finished(ssl))
        SSL_shutdown(ssl);
    ERR_clear_error();
}
