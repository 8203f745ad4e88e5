/* sendpipe.h - sends of large shared blocks without a copy per socket: the block's bytes are put
 * into a pipe once (the block's image), and each socket is then given references to the pipe's
 * pages (tee into a scratch pipe, splice to the socket) where writev would copy the bytes into
 * every socket's buffer again. A batch of 128 KiB fanned out to 100 subscribers is copied into the
 * kernel once instead of 100 times.
 *
 * Only for ranges of at least SENDPIPE_MIN bytes of blocks that several holders share; images are
 * bounded in number and bytes. Whatever it declines, and everything after a failure of the
 * machinery itself, is left to writev: it is a shortcut, never the only way out. */
#ifndef HERALD_SENDPIPE_H
#define HERALD_SENDPIPE_H

#include <stddef.h>
#include <sys/types.h>

#include "buf.h"

#define SENDPIPE_MIN (16u << 10)
#define SENDPIPE_DECLINED (-2)

/* Set up the scratch pipe. Without it (or after sendpipe_shutdown) every send is declined. */
void sendpipe_init(void);
void sendpipe_shutdown(void);

/* Would sendpipe_send take b[off, off+len)? For writev's caller, to stop gathering before it. */
int sendpipe_wants(const struct block *b, size_t off, size_t len);

/* Send b[off, off+len) to the non-blocking socket fd. Returns the bytes sent (> 0); -1 with errno
 * set (EAGAIN: the socket buffer is full; anything else: the connection failed); or
 * SENDPIPE_DECLINED: send it another way. */
ssize_t sendpipe_send(struct block *b, size_t off, size_t len, int fd);

/* Release b's image: b is being freed, or its bytes are about to be rewritten. */
void sendpipe_drop(struct block *b);

#endif
