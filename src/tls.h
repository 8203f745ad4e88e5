/* tls.h - TLS for client connections (OpenSSL): the server contexts (a default certificate plus
 * more chosen by SNI, rebuilt on reload) and the non-blocking read and write that a connection on
 * the TLS port uses instead of read and writev. TLS 1.2 at least; renegotiation refused. */
#ifndef HERALD_TLS_H
#define HERALD_TLS_H

#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

struct config_tls;
struct ssl_st;

/* Build the contexts from cfg. On success they replace the previous ones (connections keep the
 * context they started with); on failure the previous ones stay and err has one line naming the
 * file and the problem (missing file, key not matching its certificate, ...). Returns 0 or -1. */
int tls_configure(const struct config_tls *cfg, char *err, size_t errlen);
/* 1 once tls_configure has succeeded. */
int tls_enabled(void);

/* A server-side TLS session on an accepted socket, or NULL. */
struct ssl_st *tls_new(int fd);
void tls_free(struct ssl_st *ssl);

/* Results of tls_read and tls_write besides a byte count. */
#define TLS_WANT_READ (-2)  /* wait until the socket is readable */
#define TLS_WANT_WRITE (-3) /* wait until the socket is writable */
#define TLS_ERROR (-1)      /* the session failed; close the connection */

/* Read decrypted bytes (driving the handshake first). Returns > 0, 0 at the peer's close_notify or
 * EOF, or one of the codes above. */
ssize_t tls_read(struct ssl_st *ssl, void *buf, size_t len);
/* 1 if decrypted bytes are buffered inside the session (the socket may not signal them). */
int tls_pending(struct ssl_st *ssl);
/* For a connection that reads nothing for now but must notice a peer that goes: takes in the
 * records that have come (kept for tls_read) and returns 1 if the peer closed the session
 * (close_notify, EOF, a failure), 0 if not (data is waiting, or no whole record came yet). */
int tls_peer_closed(struct ssl_st *ssl);
/* Write up to iovcnt buffers, gathered so that records are as full as possible; *asked is set to
 * how many bytes were offered (a short write is one below that). Returns bytes written (> 0) or
 * one of the codes above. After a WANT, call again with the same leading data. */
ssize_t tls_writev(struct ssl_st *ssl, const struct iovec *iov, int iovcnt, size_t *asked);
/* Send close_notify, without waiting for the peer's. */
void tls_shutdown(struct ssl_st *ssl);

#endif
