/* Unit tests of sendpipe.c over loopback TCP: what arrives is the block's bytes, from any offset,
 * through short sends; images follow the block's life; limits and refusals fall back cleanly. */
#include "buf.h"
#include "sendpipe.h"
#include "test.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct pair {
    int tx, rx;
};

static struct pair pair_open(int sndbuf)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    bind(l, (struct sockaddr *)&a, sizeof(a));
    listen(l, 1);
    getsockname(l, (struct sockaddr *)&a, &alen);
    struct pair p = {.tx = socket(AF_INET, SOCK_STREAM, 0)};
    if (sndbuf)
        setsockopt(p.tx, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    CHECK(connect(p.tx, (struct sockaddr *)&a, sizeof(a)) == 0);
    p.rx = accept(l, NULL, NULL);
    close(l);
    fcntl(p.tx, F_SETFL, O_NONBLOCK);
    return p;
}

static void pair_close(struct pair *p)
{
    close(p->tx);
    if (p->rx >= 0)
        close(p->rx);
}

static struct block *block_of(size_t len, unsigned seed)
{
    struct block *b = block_new(len);
    for (size_t i = 0; i < len; i++)
        b->data[i] = (char)((i * 7 + seed) % 251);
    b->len = len;
    return b;
}

/* Send b[off, off+len) through sendpipe alone, reading the far end whenever the socket is full.
 * Returns 1 when exactly those bytes arrived; *short_sends counts the sends that took less. */
static int send_all(struct block *b, size_t off, size_t len, int *short_sends)
{
    struct pair p = pair_open(32 << 10);
    char *got = malloc(len);
    size_t sent = 0, have = 0;
    int ok = 1, rounds = 0;
    while ((sent < len || have < len) && ok && rounds++ < 100000) {
        if (sent < len) {
            ssize_t w = sendpipe_send(b, off + sent, len - sent, p.tx);
            if (w > 0) {
                if ((size_t)w < len - sent && short_sends)
                    (*short_sends)++;
                sent += (size_t)w;
            } else if (!(w == -1 && errno == EAGAIN)) {
                ok = 0;
                break;
            }
        }
        struct pollfd pf = {.fd = p.rx, .events = POLLIN};
        if (poll(&pf, 1, sent < len ? 0 : 1000) > 0) {
            ssize_t r = read(p.rx, got + have, len - have);
            if (r <= 0)
                ok = 0;
            else
                have += (size_t)r;
        } else if (sent == len) {
            ok = 0; /* all sent, nothing more arrives */
        }
    }
    ok = ok && have == len && memcmp(got, b->data + off, len) == 0;
    free(got);
    pair_close(&p);
    return ok;
}

static int open_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as the broker does: a gone peer is an error, not a signal */
    sendpipe_init();
    int fds_before = open_fds();

    /* Large, shared: sent by reference, whole or from an offset, through short sends. */
    struct block *b = block_of(200000, 3);
    b->refs = 4;
    CHECK(sendpipe_wants(b, 0, b->len));
    CHECK(!sendpipe_wants(b, 0, SENDPIPE_MIN - 1));
    int shorts = 0;
    CHECK(send_all(b, 0, b->len, &shorts));
    CHECK(shorts > 0); /* a 32 KiB send buffer takes 200 kB in pieces */
    CHECK(b->image >= 0);
    CHECK_EQ(b->image_len, 200000);
    CHECK(send_all(b, 12345, b->len - 12345, NULL));
    CHECK(send_all(b, 4096, 70000, NULL));

    /* Emptied for reuse: the image goes, and the new bytes are what is sent. */
    b->refs = 1;
    block_reset(b);
    CHECK_EQ(b->image, BLOCK_NO_IMAGE);
    struct block *fresh = block_of(100000, 99);
    b = block_append(b, fresh->data, fresh->len);
    block_unref(fresh);
    b->refs = 4;
    CHECK(send_all(b, 0, b->len, NULL));
    CHECK_EQ(b->image_len, 100000);

    /* Bytes appended after the image was made are not in it: those ranges go another way. */
    b->refs = 1;
    b = block_append(b, "tail", 4);
    b->refs = 4;
    CHECK(!sendpipe_wants(b, 0, b->len));
    CHECK(sendpipe_wants(b, 0, 100000));
    b->refs = 1;
    block_unref(b);

    /* Not worth it, or not possible: declined, and nothing is left behind. */
    struct block *lone = block_of(100000, 1);
    CHECK(!sendpipe_wants(lone, 0, lone->len)); /* one holder */
    struct pair p = pair_open(0);
    CHECK_EQ(sendpipe_send(lone, 0, lone->len, p.tx), SENDPIPE_DECLINED);
    CHECK_EQ(lone->image, BLOCK_NO_IMAGE);
    block_unref(lone);
    struct block *huge = block_of(4 << 20, 1);
    huge->refs = 4;
    CHECK(!sendpipe_wants(huge, 0, huge->len)); /* larger than a pipe may be */
    huge->refs = 1;
    block_unref(huge);

    /* A bounded number of images: past it, declined until some go. */
    struct block *many[200];
    int imaged = 0;
    for (int i = 0; i < 200; i++) {
        many[i] = block_of(SENDPIPE_MIN, (unsigned)i);
        many[i]->refs = 4;
        ssize_t w = sendpipe_send(many[i], 0, SENDPIPE_MIN, p.tx);
        imaged += many[i]->image >= 0;
        CHECK(w == SENDPIPE_DECLINED || w > 0 || (w == -1 && errno == EAGAIN));
        char sink[65536];
        while (recv(p.rx, sink, sizeof(sink), MSG_DONTWAIT) > 0)
            ;
    }
    CHECK(imaged > 0 && imaged < 200);
    for (int i = 0; i < 200; i++) {
        many[i]->refs = 1;
        block_unref(many[i]);
    }
    pair_close(&p);

    /* A peer that went: an error for that socket, and the next send is whole and right. */
    struct block *c = block_of(300000, 5);
    c->refs = 4;
    p = pair_open(0);
    close(p.rx);
    p.rx = -1;
    ssize_t w = 0;
    for (int i = 0; i < 100 && w >= 0; i++)
        w = sendpipe_send(c, 0, c->len, p.tx);
    CHECK(w == -1 && (errno == EPIPE || errno == ECONNRESET));
    pair_close(&p);
    CHECK(send_all(c, 1, c->len - 1, NULL));
    c->refs = 1;
    block_unref(c);

    /* Refused for what the descriptor is, not for a gone peer: declined, and from then on
     * everything is left to writev, until set up again. */
    struct block *d = block_of(100000, 7);
    d->refs = 4;
    int ro = open("/dev/null", O_RDONLY);
    CHECK_EQ(sendpipe_send(d, 0, d->len, ro), SENDPIPE_DECLINED);
    CHECK(!sendpipe_wants(d, 0, d->len));
    close(ro);
    sendpipe_init();
    CHECK(sendpipe_wants(d, 0, d->len));
    CHECK(send_all(d, 0, d->len, NULL));
    d->refs = 1;
    block_unref(d);

    CHECK_EQ(open_fds(), fds_before); /* every image's pipe closed with its block */
    return TEST_REPORT();
}
