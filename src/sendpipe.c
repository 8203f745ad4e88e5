/* sendpipe.c - sends of large shared blocks by page reference: a pipe image per block, one scratch
 * pipe for every send. See sendpipe.h. */
#include "sendpipe.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

/* Holders a block must have before an image pays for itself: making one costs a copy and a few
 * system calls, each send through it two system calls instead of one. */
#define SENDPIPE_MIN_REFS 4
#define SENDPIPE_MAX_IMAGES 128
#define SENDPIPE_MAX_BYTES (32u << 20)

/* Every send tees an image into scratch and splices it out; scratch is empty between sends. */
static int scratch[2] = {-1, -1};
static int devnull = -1;
static size_t max_image; /* scratch's capacity: the largest image tee can copy whole */
static size_t images, image_bytes;
static size_t max_images; /* SENDPIPE_MAX_IMAGES, or fewer where descriptors are few */

/* Images hold descriptors that connections need more: a sixteenth of them at most. */
static size_t images_allowed(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur / 16 < SENDPIPE_MAX_IMAGES)
        return (size_t)(rl.rlim_cur / 16);
    return SENDPIPE_MAX_IMAGES;
}

void sendpipe_init(void)
{
    if (scratch[0] >= 0)
        return;
    if (pipe2(scratch, O_NONBLOCK | O_CLOEXEC) < 0) {
        scratch[0] = scratch[1] = -1;
        return;
    }
    devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    /* 1 MiB is the largest size an unprivileged process may give a pipe by default. */
    (void)fcntl(scratch[1], F_SETPIPE_SZ, 1 << 20);
    int cap = fcntl(scratch[1], F_GETPIPE_SZ);
    if (devnull < 0 || cap < (int)SENDPIPE_MIN) {
        sendpipe_shutdown();
        return;
    }
    max_image = (size_t)cap;
    max_images = 0; /* looked up at the first image: the limit may be raised after start-up */
    block_set_image_release(sendpipe_drop);
}

void sendpipe_shutdown(void)
{
    for (int i = 0; i < 2; i++)
        if (scratch[i] >= 0)
            close(scratch[i]);
    if (devnull >= 0)
        close(devnull);
    scratch[0] = scratch[1] = devnull = -1;
}

int sendpipe_wants(const struct block *b, size_t off, size_t len)
{
    if (scratch[0] < 0 || len < SENDPIPE_MIN)
        return 0;
    if (b->image >= 0)
        return off + len <= b->image_len;
    return b->image == BLOCK_NO_IMAGE && b->refs >= SENDPIPE_MIN_REFS && b->len <= max_image;
}

/* Put b's bytes into a pipe of their own. */
static int image_make(struct block *b)
{
    if (!max_images)
        max_images = images_allowed();
    if (images >= max_images || image_bytes + b->len > SENDPIPE_MAX_BYTES)
        return 0; /* not now; maybe for a later send, once others are gone */
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
        b->image = BLOCK_IMAGE_REFUSED; /* out of descriptors: not again for each holder */
        return 0;
    }
    ssize_t w = -1;
    if (fcntl(p[1], F_SETPIPE_SZ, (int)b->len) >= 0)
        w = write(p[1], b->data, b->len);
    close(p[1]);
    if (w < 0 || (size_t)w != b->len) {
        close(p[0]);
        b->image = BLOCK_IMAGE_REFUSED;
        return 0;
    }
    b->image = p[0];
    b->image_len = b->len;
    images++;
    image_bytes += b->len;
    return 1;
}

/* Take n bytes out of scratch without looking at them. */
static int discard(size_t n)
{
    while (n) {
        ssize_t d = splice(scratch[0], NULL, devnull, NULL, n, SPLICE_F_NONBLOCK);
        if (d <= 0)
            return -1;
        n -= (size_t)d;
    }
    return 0;
}

/* Errors that say the socket cannot be written now or any more, as writev would give them. */
static int peer_error(int err)
{
    switch (err) {
    case EAGAIN:
    case EINTR:
    case EPIPE:
    case ECONNRESET:
    case ECONNABORTED:
    case ENOTCONN:
    case ETIMEDOUT:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENETDOWN:
    case EIO:
        return 1;
    default:
        return 0;
    }
}

ssize_t sendpipe_send(struct block *b, size_t off, size_t len, int fd)
{
    if (!sendpipe_wants(b, off, len) || (b->image < 0 && !image_make(b)))
        return SENDPIPE_DECLINED;
    /* tee copies from the start of the image: take what precedes off too and throw it away. */
    size_t reach = off + len;
    ssize_t t = tee(b->image, scratch[1], reach, SPLICE_F_NONBLOCK);
    if (t < 0 || (size_t)t != reach) {
        /* Never so with an empty scratch as large as any image: whatever stops it now would
         * stop it again. */
        if (t > 0)
            (void)discard((size_t)t);
        sendpipe_shutdown();
        return SENDPIPE_DECLINED;
    }
    if (off && discard(off) < 0) {
        sendpipe_shutdown(); /* scratch holds what it should not: nothing may go through it */
        return SENDPIPE_DECLINED;
    }
    ssize_t w = splice(scratch[0], NULL, fd, NULL, len, SPLICE_F_NONBLOCK);
    int err = errno;
    if (discard(len - (w > 0 ? (size_t)w : 0)) < 0) {
        sendpipe_shutdown();
        if (w <= 0)
            return SENDPIPE_DECLINED;
    }
    if (w == 0 || (w < 0 && !peer_error(err))) {
        /* Refused for what it is, not for where it goes (a kind of socket that takes no pages,
         * a sandbox that forbids splice): writev from now on. */
        sendpipe_shutdown();
        return SENDPIPE_DECLINED;
    }
    errno = err;
    return w;
}

void sendpipe_drop(struct block *b)
{
    if (b->image >= 0) {
        close(b->image);
        images--;
        image_bytes -= b->image_len;
    }
    b->image = BLOCK_NO_IMAGE;
    b->image_len = 0;
}
