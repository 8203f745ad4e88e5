/* buf.h - the byte containers herald moves data in: a growable buffer with a single owner, and a
 * reference-counted block that fan-out shares among many connections' send queues.
 *
 * Allocation failure is not recoverable in a broker that must not lose messages silently, so the
 * allocators here abort with a message instead of returning NULL (as Redis's zmalloc does). */
#ifndef HERALD_BUF_H
#define HERALD_BUF_H

#include <stddef.h>
#include <stdint.h>

void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* A growable buffer. The zero value is an empty buffer. */
struct buf {
    char *data;
    size_t len;
    size_t cap;
};

/* Make room for extra more bytes; returns buf->data + buf->len. */
char *buf_reserve(struct buf *b, size_t extra);
void buf_append(struct buf *b, const void *p, size_t n);
void buf_append_str(struct buf *b, const char *s);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drop the first n bytes. */
void buf_consume(struct buf *b, size_t n);
/* Free the storage; the buffer is empty again. */
void buf_free(struct buf *b);

/* SipHash-1-3 of p[0..n) under a key drawn at first use: for hash tables whose keys a client
 * chooses (channel names, addresses), so no one can aim many keys at one bucket. */
uint64_t buf_hash(const void *p, size_t n);

/* A reference-counted block of bytes. Whoever holds a reference may append while it is the only
 * holder; once shared, bytes below len never change, so holders may keep pointers into it. */
struct block {
    uint32_t refs;
    uint32_t flags; /* free for the owner's use */
    size_t len;
    size_t cap;
    int image;          /* a copy of data[0..image_len) kept by the sender (sendpipe.c), or: */
    uint32_t image_len;
    char data[];
};
#define BLOCK_NO_IMAGE (-1)
#define BLOCK_IMAGE_REFUSED (-2) /* one could not be made: do not try again */

/* Who releases a block's image when the block is freed or emptied (once, at start-up). */
void block_set_image_release(void (*release)(struct block *b));

/* A block with room for cap bytes, one reference held by the caller. */
struct block *block_new(size_t cap);
static inline struct block *block_ref(struct block *b) { b->refs++; return b; }
void block_unref(struct block *b);
/* Empty a block the caller holds the only reference to, for reuse. */
void block_reset(struct block *b);
/* Append n bytes to a block the caller holds the only reference to, growing it (and so perhaps
 * moving it) as needed. Returns the block to use from now on. */
struct block *block_append(struct block *b, const void *p, size_t n);

#endif
