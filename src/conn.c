/* conn.c - connection life: send queues of shared blocks, batched writev, timeouts, orderly close. */
#include "conn.h"

#include "auth.h"
#include "log.h"
#include "route.h"
#include "sendpipe.h"
#include "stats.h"
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define QUEUE_MIN_CAP 8
#define TAIL_BLOCK_SIZE 4096
#define WRITEV_MAX 1024 /* IOV_MAX on Linux */

static struct ev_loop *loop;
static void (*on_read)(struct conn *c);
static void (*on_timeout)(struct conn *c);
static void (*on_detach)(struct conn *c, uint16_t code, const char *reason);
static struct conn_limits limits = {
    .send_queue = 4u << 20,
    .timeout = {[CONN_TO_HTTP] = 15, [CONN_TO_WS] = 30, [CONN_TO_CLOSING] = 5},
};

static struct {
    struct conn *head, *tail;
} to_lists[CONN_TO_COUNT];
static struct conn *flush_list;
static struct conn *dead_list; /* linked through flush_next once dead */
static size_t open_count;
static uint64_t next_id = 1;
static ev_timer sweep_timer;
static uint8_t *read_buffer;

/* Flags kept in struct block's flags by this module. */
#define BLOCK_TAIL 1 /* a connection's private block that small copies are packed into */

static void io_cb(struct ev_loop *l, ev_io *w, int revents);
static void sweep_cb(struct ev_loop *l, ev_timer *w, int revents);
static void conn_write(struct conn *c);
static void flush_pass(void);

uint8_t *conn_read_buffer(void) { return read_buffer; }

void conn_init(struct ev_loop *l, void (*read_cb)(struct conn *c), void (*timeout_cb)(struct conn *c),
               void (*free_cb)(struct conn *c, uint16_t code, const char *reason))
{
    loop = l;
    on_read = read_cb;
    on_timeout = timeout_cb;
    on_detach = free_cb;
    read_buffer = xmalloc(CONN_READ_BUF);
    sendpipe_init();
    ev_timer_init(&sweep_timer, sweep_cb, 1.0, 1.0);
    ev_timer_start(loop, &sweep_timer);
    ev_unref(loop); /* the sweep alone must not keep the loop running */
}

void conn_set_limits(const struct conn_limits *l)
{
    limits = *l;
    /* Sweep often enough that the shortest timeout is kept to within a quarter of itself. */
    double period = 1.0;
    for (int i = 0; i < CONN_TO_COUNT; i++)
        if (limits.timeout[i] / 4 < period)
            period = limits.timeout[i] / 4;
    if (period < 0.025)
        period = 0.025;
    if (loop) {
        sweep_timer.repeat = period;
        ev_timer_again(loop, &sweep_timer);
    }
}
const struct conn_limits *conn_get_limits(void) { return &limits; }
size_t conn_count(void) { return open_count; }

static void to_unlink(struct conn *c)
{
    struct conn **head = &to_lists[c->to_class].head, **tail = &to_lists[c->to_class].tail;
    if (c->to_prev)
        c->to_prev->to_next = c->to_next;
    else if (*head == c)
        *head = c->to_next;
    else
        return; /* not on a list */
    if (c->to_next)
        c->to_next->to_prev = c->to_prev;
    else
        *tail = c->to_prev;
    c->to_prev = c->to_next = NULL;
}

static void to_append(struct conn *c)
{
    struct conn **head = &to_lists[c->to_class].head, **tail = &to_lists[c->to_class].tail;
    c->to_prev = *tail;
    c->to_next = NULL;
    if (*tail)
        (*tail)->to_next = c;
    else
        *head = c;
    *tail = c;
}

void conn_touch(struct conn *c)
{
    c->last_active = ev_now(loop);
    if (to_lists[c->to_class].tail != c) {
        to_unlink(c);
        to_append(c);
    }
}

void conn_set_timeout_class(struct conn *c, enum conn_timeout_class cls)
{
    to_unlink(c);
    c->to_class = (uint8_t)cls;
    c->last_active = ev_now(loop);
    to_append(c);
}

struct conn_waits *conn_waits(struct conn *c)
{
    if (!c->waits)
        c->waits = xcalloc(1, sizeof(*c->waits));
    return c->waits;
}

struct conn *conn_new(int fd, const struct sockaddr *addr, socklen_t addr_len)
{
    struct conn *c = xcalloc(1, sizeof(*c));
    c->id = next_id++;
    c->script_ref = -2; /* LUA_NOREF */
    if (addr->sa_family == AF_INET6 && addr_len >= sizeof(struct sockaddr_in6)) {
        c->addr = ((const struct sockaddr_in6 *)addr)->sin6_addr;
    } else if (addr->sa_family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)addr;
        c->addr.s6_addr[10] = 0xff;
        c->addr.s6_addr[11] = 0xff;
        memcpy(&c->addr.s6_addr[12], &in4->sin_addr, 4);
    }
    ev_io_init(&c->io, io_cb, fd, EV_READ);
    c->io.data = c;
    ev_io_start(loop, &c->io);
    c->state = CONN_HTTP;
    c->to_class = CONN_TO_HTTP;
    c->last_active = ev_now(loop);
    to_append(c);
    open_count++;
    stats.connections_total++;
    return c;
}

const char *conn_addr_str(const struct conn *c)
{
    static char text[INET6_ADDRSTRLEN];
    if (IN6_IS_ADDR_V4MAPPED(&c->addr))
        inet_ntop(AF_INET, &c->addr.s6_addr[12], text, sizeof(text));
    else
        inet_ntop(AF_INET6, &c->addr, text, sizeof(text));
    return text;
}

static void schedule_flush(struct conn *c)
{
    if (!c->on_flush_list) {
        c->on_flush_list = 1;
        c->flush_next = flush_list;
        flush_list = c;
    }
}

void conn_schedule_flush(struct conn *c) { schedule_flush(c); }

static void queue_push(struct conn *c, struct block *blk, size_t off, size_t len)
{
    if (c->q_len == c->q_cap) {
        uint32_t cap = c->q_cap ? c->q_cap * 2 : QUEUE_MIN_CAP;
        struct conn_qitem *q = xmalloc(cap * sizeof(*q));
        for (uint32_t i = 0; i < c->q_len; i++)
            q[i] = c->q[(c->q_head + i) & (c->q_cap - 1)];
        free(c->q);
        c->q = q;
        c->q_head = 0;
        c->q_cap = cap;
    }
    struct conn_qitem *it = &c->q[(c->q_head + c->q_len) & (c->q_cap - 1)];
    it->blk = blk;
    it->off = off;
    it->len = len;
    c->q_len++;
    c->q_bytes += len;
    schedule_flush(c);
}

/* Can more be queued to c? Not once it is dead (queueing would put it back on the flush list after
 * it was taken off to be freed) or lingering (its write side is shut down). */
static int queue_open(const struct conn *c)
{
    return c->state != CONN_DEAD && c->state != CONN_LINGER;
}

void conn_queue_block(struct conn *c, struct block *blk, size_t off, size_t len)
{
    if (!queue_open(c) || c->close_sent || !len)
        return;
    queue_push(c, block_ref(blk), off, len);
}

void conn_queue_copy(struct conn *c, const void *p, size_t len)
{
    if (!queue_open(c) || !len)
        return;
    if (c->q_len) {
        struct conn_qitem *last = &c->q[(c->q_head + c->q_len - 1) & (c->q_cap - 1)];
        struct block *b = last->blk;
        /* Pack small writes into the connection's own tail block while it has room: many
         * replies then go out in one iovec. Only the queue references it, so appending is safe. */
        if ((b->flags & BLOCK_TAIL) && b->refs == 1 && b->cap - b->len >= len &&
            last->off + last->len == b->len) {
            memcpy(b->data + b->len, p, len);
            b->len += len;
            last->len += len;
            c->q_bytes += len;
            return;
        }
    }
    struct block *b = block_new(len > TAIL_BLOCK_SIZE ? len : TAIL_BLOCK_SIZE);
    b->flags = BLOCK_TAIL;
    memcpy(b->data, p, len);
    b->len = len;
    queue_push(c, b, 0, len);
}

void conn_send_frame(struct conn *c, int opcode, const void *p, size_t len)
{
    /* Checked here for both ways below: a large frame's block is queued without conn_queue_copy. */
    if (!queue_open(c) || (c->close_sent && opcode != WS_OP_CLOSE))
        return;
    /* Compressed on its own, as server_no_context_takeover promises; the compressed bytes are
     * copied into the queue below, so one scratch buffer serves every frame. */
    static struct buf zbuf;
    if (c->pmd.server_bits && opcode < WS_OP_CLOSE && c->route &&
        pmd_compress(c->pmd.server_bits, c->route->deflate_level, c->route->deflate_min_size, p, len, &zbuf)) {
        opcode |= WS_FRAME_RSV1;
        p = zbuf.data;
        len = zbuf.len;
    }
    uint8_t hdr[WS_MAX_HEADER];
    size_t hlen = ws_frame_header(hdr, opcode, 1, len, NULL);
    if (len > TAIL_BLOCK_SIZE) {
        struct block *b = block_new(hlen + len);
        memcpy(b->data, hdr, hlen);
        memcpy(b->data + hlen, p, len);
        b->len = hlen + len;
        queue_push(c, b, 0, b->len);
        return;
    }
    conn_queue_copy(c, hdr, hlen);
    conn_queue_copy(c, p, len);
}

int conn_over_limit(const struct conn *c) { return c->q_bytes > limits.send_queue; }

/* Drop everything queued that has not started going out; a partly written item is kept so the
 * peer never sees half a frame. */
static void queue_drop_unstarted(struct conn *c, int keep_head)
{
    uint32_t keep = keep_head && c->q_len ? 1 : 0;
    for (uint32_t i = keep; i < c->q_len; i++) {
        struct conn_qitem *it = &c->q[(c->q_head + i) & (c->q_cap - 1)];
        c->q_bytes -= it->len;
        block_unref(it->blk);
    }
    c->q_len = keep;
}

void conn_ws_close(struct conn *c, uint16_t code, const char *reason)
{
    if (c->close_sent || c->state == CONN_DEAD || c->state == CONN_LINGER)
        return;
    if (!c->close_code)
        c->close_code = code;
    /* Detaching first delivers what was published while it was subscribed, before the close. */
    if (on_detach)
        on_detach(c, code ? code : WS_CLOSE_NO_STATUS, reason ? reason : "");
    uint8_t frame[WS_MAX_PENDING];
    size_t n = ws_close_frame(frame, code, reason);
    c->close_sent = 1;
    c->state = CONN_CLOSING;
    conn_set_timeout_class(c, CONN_TO_CLOSING);
    conn_queue_copy(c, frame, n);
}

void conn_close_after_write(struct conn *c)
{
    if (c->state == CONN_DEAD || c->state == CONN_LINGER)
        return;
    c->state = CONN_CLOSING;
    c->close_received = 1; /* nothing to wait for from the peer */
    conn_set_timeout_class(c, CONN_TO_CLOSING);
    schedule_flush(c);
}

void conn_close_now(struct conn *c)
{
    if (c->state == CONN_DEAD)
        return;
    c->state = CONN_DEAD; /* first, so that detaching queues nothing more to it */
    if (on_detach)
        on_detach(c, c->close_code ? c->close_code : WS_CLOSE_ABNORMAL, "");
    ev_io_stop(loop, &c->io);
    close(c->io.fd);
    to_unlink(c);
    open_count--;
    /* Freed at the end of the pass: callers up the stack may still hold the pointer. */
    if (!c->on_flush_list) {
        c->on_flush_list = 1;
        c->flush_next = flush_list;
        flush_list = c;
    }
}

static void set_write_interest(struct conn *c, int want)
{
    want |= c->tls_read_wants_write;
    int events = (c->read_paused || c->awaiting ? 0 : EV_READ) | (want ? EV_WRITE : 0);
    if (c->read_shut && c->state != CONN_LINGER && c->state != CONN_CLOSING)
        events &= ~EV_READ;
    if (c->io.events == events)
        return;
    /* Stopping a watcher drops an event fed to it (ev_feed_event, to resume pipelined input):
     * keep it across the change. */
    int fed = ev_clear_pending(loop, &c->io);
    ev_io_stop(loop, &c->io);
    ev_io_set(&c->io, c->io.fd, events);
    ev_io_start(loop, &c->io);
    if (fed)
        ev_feed_event(loop, &c->io, fed);
}

void conn_pause_reading(struct conn *c)
{
    c->read_paused = 1;
    set_write_interest(c, 1);
}

void conn_set_awaiting(struct conn *c, int on)
{
    c->awaiting = (uint8_t)(on != 0);
    if (c->state == CONN_DEAD)
        return;
    set_write_interest(c, c->q_len > 0);
    /* Input that arrived with the request, or was taken into the TLS session meanwhile, waits to
     * be served: the socket may not say so. */
    if (!on && (c->pending || (c->tls && tls_pending(c->tls))))
        ev_feed_event(loop, &c->io, EV_READ);
}

void conn_wait_writable(struct conn *c)
{
    c->tls_read_wants_write = 1;
    set_write_interest(c, 1);
}

/* The queue is empty: move a closing connection on towards its end. */
static void drained(struct conn *c)
{
    free(c->q);
    c->q = NULL;
    c->q_cap = c->q_head = 0;
    if (c->read_paused) {
        /* Resume the requests that were waiting; on_read serves what is pending. */
        c->read_paused = 0;
        ev_feed_event(loop, &c->io, EV_READ);
    }
    set_write_interest(c, 0);
    if (c->state == CONN_CLOSING && (c->close_received || c->wp.failed || c->read_shut)) {
        /* Shut our side down and read until the peer's EOF, so that our close frame or error
         * response is not destroyed by a reset from unread input (a lingering close). */
        if (c->tls)
            tls_shutdown(c->tls);
        shutdown(c->io.fd, SHUT_WR);
        c->state = CONN_LINGER;
        conn_touch(c);
    }
}

static void conn_write(struct conn *c)
{
    if (c->state == CONN_DEAD)
        return;
    while (c->q_len) {
        struct iovec iov[WRITEV_MAX];
        int n = 0;
        size_t asked = 0;
        ssize_t w = SENDPIPE_DECLINED;
        if (!c->tls) {
            struct conn_qitem *it = &c->q[c->q_head];
            w = sendpipe_send(it->blk, it->off, it->len, c->io.fd);
            asked = it->len;
        }
        if (w == SENDPIPE_DECLINED) {
            asked = 0;
            for (uint32_t i = 0; i < c->q_len && n < WRITEV_MAX; i++) {
                struct conn_qitem *it = &c->q[(c->q_head + i) & (c->q_cap - 1)];
                if (n && !c->tls && sendpipe_wants(it->blk, it->off, it->len))
                    break; /* sent by reference on the next round */
                iov[n].iov_base = it->blk->data + it->off;
                iov[n].iov_len = it->len;
                asked += it->len;
                n++;
            }
            if (c->tls) {
                w = tls_writev(c->tls, iov, n, &asked);
                if (w == TLS_WANT_WRITE) {
                    set_write_interest(c, 1);
                    return;
                }
                if (w == TLS_WANT_READ)
                    return; /* retried after the next read */
                if (w < 0) {
                    conn_close_now(c);
                    return;
                }
            } else {
                w = writev(c->io.fd, iov, n);
            }
        }
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_write_interest(c, 1);
                return;
            }
            conn_close_now(c); /* EPIPE, ECONNRESET: the peer is gone */
            return;
        }
        stats.bytes_out += (uint64_t)w;
        size_t left = (size_t)w;
        c->q_bytes -= left;
        while (left) {
            struct conn_qitem *it = &c->q[c->q_head];
            if (left < it->len) {
                it->off += left;
                it->len -= left;
                break;
            }
            left -= it->len;
            block_unref(it->blk);
            c->q_head = (c->q_head + 1) & (c->q_cap - 1);
            c->q_len--;
        }
        if (c->q_len && (size_t)w < asked) {
            /* A short write means the socket buffer is full: wait for it to drain. */
            set_write_interest(c, 1);
            return;
        }
    }
    drained(c);
}

static void free_conn(struct conn *c)
{
    for (uint32_t i = 0; i < c->q_len; i++)
        block_unref(c->q[(c->q_head + i) & (c->q_cap - 1)].blk);
    free(c->q);
    if (c->pending) {
        buf_free(c->pending);
        free(c->pending);
    }
    if (c->message) {
        buf_free(c->message);
        free(c->message);
    }
    free(c->req);
    pmd_inflater_free(c->inflater);
    if (c->pmd.server_bits)
        pmd_stats.websockets--;
    route_unref(c->route);
    auth_free(c->grants);
    if (c->tls)
        tls_free(c->tls);
    free(c->waits);
    free(c);
}

void conn_flush_all(void)
{
    /* Closing a connection here (a slow consumer, a peer gone) may queue data to others (presence
     * leave events): that is written too before the loop sleeps. */
    while (flush_list)
        flush_pass();
    while (dead_list) {
        struct conn *c = dead_list;
        dead_list = c->flush_next;
        free_conn(c);
    }
}

static void flush_pass(void)
{
    struct conn *list = flush_list;
    flush_list = NULL;
    while (list) {
        struct conn *c = list;
        list = c->flush_next;
        c->on_flush_list = 0;
        if (c->state == CONN_DEAD) {
            c->flush_next = dead_list;
            dead_list = c;
            continue;
        }
        conn_write(c);
        if (c->state == CONN_SSE && conn_over_limit(c)) {
            stats.slow_consumers_dropped++; /* an event stream has no close frame */
            conn_close_now(c);
        } else if (c->state == CONN_WS && conn_over_limit(c)) {
            /* Still over the limit after a write: a slow consumer. Keep only what is partly
             * written so the stream stays well-formed, and close with 1013. */
            stats.slow_consumers_dropped++;
            log_debug("conn %llu: slow consumer (%zu bytes queued), closing",
                      (unsigned long long)c->id, c->q_bytes);
            if (on_detach)
                on_detach(c, WS_CLOSE_TRY_AGAIN, "slow consumer");
            queue_drop_unstarted(c, 1);
            c->read_shut = 1;
            conn_ws_close(c, WS_CLOSE_TRY_AGAIN, "slow consumer");
            conn_write(c);
        }
    }
}

void conn_foreach(void (*fn)(struct conn *c, void *arg), void *arg)
{
    for (int cls = 0; cls < CONN_TO_COUNT; cls++) {
        struct conn *c = to_lists[cls].head;
        while (c) {
            struct conn *next = c->to_next;
            fn(c, arg);
            c = next;
        }
    }
}

static void io_cb(struct ev_loop *l, ev_io *w, int revents)
{
    struct conn *c = w->data;
    if (revents & EV_WRITE) {
        conn_write(c);
        if (c->tls_read_wants_write && c->state != CONN_DEAD) {
            c->tls_read_wants_write = 0;
            revents |= EV_READ;
            set_write_interest(c, c->q_len > 0);
        }
    }
    if ((revents & EV_READ) && c->state != CONN_DEAD)
        on_read(c);
}

static void sweep_cb(struct ev_loop *l, ev_timer *w, int revents)
{
    ev_tstamp now = ev_now(loop);
    for (int cls = 0; cls < CONN_TO_COUNT; cls++) {
        struct conn *c;
        while ((c = to_lists[cls].head) && c->last_active + limits.timeout[cls] <= now) {
            on_timeout(c);
            /* The handler renews (touches) or closes; if it did neither, close. */
            if (c->state != CONN_DEAD && to_lists[cls].head == c && c->last_active + limits.timeout[cls] <= now)
                conn_close_now(c);
        }
    }
    conn_flush_all();
}
