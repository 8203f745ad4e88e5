/* loadgen.c - herald-bench, the fan-out load generator.
 *
 * Opens N WebSocket subscribers (at a bounded rate), subscribes them to K channels, publishes at a
 * fixed rate or as fast as the server sustains (HTTP POST, a /ws socket or Redis PUBLISH), and
 * measures what the subscribers receive: deliveries, losses, duplicates, reorders, latency from a
 * timestamp embedded in each payload, payload MB/s, and the server's CPU and RSS from /proc.
 *
 * One libev loop per thread (--threads, default 1). Thread 0 also runs the publishers and the
 * controller; subscribers are split evenly among the threads. Frames are parsed in place in one big
 * read buffer per thread with herald's own incremental parser (src/ws.h); nothing is allocated per
 * message. Counters are written by their owning thread only and read by the controller with relaxed
 * atomics. */
#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ws.h"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define RBUF_SIZE (512 * 1024)
#define HEAD_CAP 256          /* bytes of each message kept to parse its header */
#define HS_CAP 2048           /* handshake response */
#define MAX_PUBS 64
#define MAX_PIDS 16
#define MAX_THREADS 16
#define PER_SOURCE_ADDR 25000 /* connections per source address before spreading */

/* Relaxed atomics: each counter has one writer (its thread); the controller reads. */
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define BUMP(x, n) STORE(x, (x) + (n))

/* ------------------------------------------------------------------------------------------ */
/* Options */

enum sub_mode { SUB_RAW, SUB_WS };
enum pub_mode { PUB_HTTP, PUB_WS, PUB_REDIS, PUB_NONE };

static struct {
    const char *host;
    int port;
    uint32_t subscribers;
    uint32_t channels;
    uint32_t per_conn;     /* channels per subscriber connection */
    enum sub_mode sub_mode;
    const char *sub_path;  /* raw subscribers: path prefix, channel appended */
    const char *ws_path;   /* /ws endpoint for SUB_WS and PUB_WS */
    const char *pub_path;  /* HTTP publish prefix */
    enum pub_mode pub_mode;
    double rate;           /* msg/s; 0 = max */
    uint32_t size;
    double duration;
    double warmup;
    double drain;          /* max seconds to wait for in-flight deliveries at the end */
    uint32_t pubs;         /* publisher connections */
    uint32_t pipeline;     /* outstanding publishes per publisher connection */
    uint32_t window;       /* --rate max: messages in flight (not yet delivered to all) */
    double connect_rate;
    uint32_t max_connecting;
    uint32_t sources;      /* source addresses; 0 = auto */
    pid_t pids[MAX_PIDS];
    int npids;
    const char *json;
    const char *label;
    uint32_t threads;
    const char *redis_host;
    int redis_port;
    char prefix[32];
    double connect_timeout;
    int quiet;
    int kernel_ts;         /* latency up to the kernel's receive timestamp */
} O;

/* ------------------------------------------------------------------------------------------ */
/* Utilities */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("herald-bench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("herald-bench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static uint64_t g_rt_offset; /* CLOCK_REALTIME - CLOCK_MONOTONIC, ns */

static void update_rt_offset(void)
{
    struct timespec a, m, b;
    clock_gettime(CLOCK_REALTIME, &a);
    clock_gettime(CLOCK_MONOTONIC, &m);
    clock_gettime(CLOCK_REALTIME, &b);
    uint64_t rt = ((uint64_t)a.tv_sec * 1000000000ull + (uint64_t)a.tv_nsec +
                   (uint64_t)b.tv_sec * 1000000000ull + (uint64_t)b.tv_nsec) / 2;
    uint64_t mono = (uint64_t)m.tv_sec * 1000000000ull + (uint64_t)m.tv_nsec;
    STORE(g_rt_offset, rt - mono);
}

static void *zalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void base64(const uint8_t *in, size_t n, char *out)
{
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = t[v >> 18];
        out[o++] = t[(v >> 12) & 63];
        out[o++] = t[(v >> 6) & 63];
        out[o++] = t[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = t[v >> 18];
        out[o++] = t[(v >> 12) & 63];
        out[o++] = i + 1 < n ? t[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = 0;
}

/* Length of the unsigned decimal at p (stops at a non-digit); 0 if none. */
static size_t parse_u64(const uint8_t *p, const uint8_t *end, uint64_t *v)
{
    const uint8_t *s = p;
    uint64_t x = 0;
    while (p < end && *p >= '0' && *p <= '9' && p - s < 20)
        x = x * 10 + (uint64_t)(*p++ - '0');
    *v = x;
    return (size_t)(p - s);
}

static const uint8_t *find(const uint8_t *hay, size_t n, const char *needle)
{
    return memmem(hay, n, needle, strlen(needle));
}

/* A growable byte buffer for pending output and replies (not per message). */
struct obuf {
    uint8_t *p;
    size_t len, cap, off; /* valid bytes are p[off..len) */
};

static uint8_t *ob_reserve(struct obuf *b, size_t n)
{
    if (b->off && b->off == b->len)
        b->off = b->len = 0;
    if (b->cap - b->len < n) {
        if (b->off) {
            memmove(b->p, b->p + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->cap - b->len < n) {
            size_t cap = b->cap ? b->cap : 4096;
            while (cap - b->len < n)
                cap *= 2;
            uint8_t *q = realloc(b->p, cap);
            if (!q)
                die("out of memory");
            b->p = q;
            b->cap = cap;
        }
    }
    return b->p + b->len;
}

static void ob_append(struct obuf *b, const void *p, size_t n)
{
    memcpy(ob_reserve(b, n), p, n);
    b->len += n;
}

static void ob_free(struct obuf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ------------------------------------------------------------------------------------------ */
/* Histogram: HDR-style log buckets, 64 linear sub-buckets per power of two (error < 1.6%). */

#define HIST_N 3776

struct hist {
    uint64_t count, sum, min, max;
    uint64_t b[HIST_N];
};

static inline unsigned hist_idx(uint64_t v)
{
    if (v < 128)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    unsigned sh = e - 6;
    return sh * 64 + (unsigned)(v >> sh);
}

static uint64_t hist_upper(unsigned idx)
{
    if (idx < 128)
        return idx;
    unsigned sh = idx / 64 - 1, m = idx % 64 + 64;
    return (((uint64_t)m + 1) << sh) - 1;
}

static inline void hist_add(struct hist *h, uint64_t v)
{
    BUMP(h->b[hist_idx(v)], 1);
    BUMP(h->count, 1);
    BUMP(h->sum, v);
    if (v > h->max)
        STORE(h->max, v);
    if (v < h->min || h->count == 1)
        STORE(h->min, v);
}

static void hist_merge(struct hist *dst, struct hist *src)
{
    uint64_t n = LOAD(src->count);
    if (!n)
        return;
    for (unsigned i = 0; i < HIST_N; i++)
        dst->b[i] += LOAD(src->b[i]);
    if (!dst->count || LOAD(src->min) < dst->min)
        dst->min = LOAD(src->min);
    if (LOAD(src->max) > dst->max)
        dst->max = LOAD(src->max);
    dst->count += n;
    dst->sum += LOAD(src->sum);
}

static uint64_t hist_pct(const struct hist *h, double q)
{
    if (!h->count)
        return 0;
    uint64_t want = (uint64_t)ceil(q * (double)h->count), acc = 0;
    if (want < 1)
        want = 1;
    for (unsigned i = 0; i < HIST_N; i++) {
        acc += h->b[i];
        if (acc >= want) {
            uint64_t v = hist_upper(i);
            return v > h->max ? h->max : v;
        }
    }
    return h->max;
}

/* ------------------------------------------------------------------------------------------ */
/* State */

enum sub_state { S_IDLE, S_CONNECTING, S_HANDSHAKE, S_OPEN, S_READY, S_CLOSED, S_FAILED };

struct sub {
    ev_io io;
    struct worker *w;
    uint32_t idx;
    uint8_t state;
    uint8_t tries;
    uint16_t pend_len;       /* unconsumed frame bytes kept between reads */
    uint16_t head_len;       /* bytes of the current message's start kept in head */
    uint16_t subscribed;     /* /ws: subscribe replies seen */
    uint32_t msg_len;        /* bytes of the current message so far */
    struct ws_parser parser;
    char accept[29];
    uint8_t *hs;             /* handshake response (only while in S_HANDSHAKE) */
    size_t hs_len;
    struct obuf out;         /* output that did not fit the socket (rare) */
    uint8_t pend[WS_MAX_PENDING];
    uint8_t head[HEAD_CAP];
};

/* Sequence tracking of one subscription (subscriber x channel) for one publisher. */
struct track {
    uint32_t next;   /* next expected seq */
    uint32_t pad;
    uint64_t seen;   /* bit i: seq next-1-i arrived */
};

struct counters {
    uint64_t connecting, ready, failed, closed, proto_errors, conn_errors;
    uint64_t deliveries, deliveries_win, bytes_win, wire_bytes, duplicates, reorders, gaps;
    uint64_t stray, unparsed, sub_errors;
};

struct worker {
    int id;
    struct ev_loop *loop;
    pthread_t thread;
    uint8_t *rbuf;
    uint32_t first, count;     /* subscribers [first, first+count) */
    uint32_t next_connect;
    uint64_t connect_start;    /* ns */
    uint64_t rng;
    ev_timer tick;
    struct counters c;
    struct hist lat;           /* latency of messages sent in the measurement window */
    struct hist lat_iv;        /* same, reset each progress interval (by the owner) */
    int reset_iv;              /* controller asks the owner to reset lat_iv */
    char first_error[160];
};

enum pub_state { P_IDLE, P_CONNECTING, P_HANDSHAKE, P_READY, P_DEAD };

struct pub {
    ev_io io;
    uint32_t id;
    uint8_t state;
    int fd;
    struct obuf out, in;
    struct ws_parser parser;
    uint32_t msg_len;
    uint16_t head_len;
    uint8_t head[HEAD_CAP];
    char accept[29];
    uint32_t outstanding;
    uint32_t *ring;            /* channel of each outstanding publish, oldest at ring_head */
    uint32_t ring_head;
    uint32_t cursor;           /* next channel */
    int chunked;               /* HTTP reply parsing */
    int64_t body_left;         /* -1: reading the head */
    int status;
};

enum phase { PH_CONNECT, PH_PUBCONNECT, PH_WARMUP, PH_MEASURE, PH_DRAIN, PH_DONE };

static struct worker *W;
static struct sub *SUBS;
static struct track *TRACK;
static uint32_t *SEQ;          /* [pub * K + channel]: next seq to publish */
static uint32_t *CHAN_SUBS;    /* ready subscriptions per channel */
static struct pub PUBS[MAX_PUBS];
static struct sockaddr_in TARGET, REDIS_ADDR;
static uint32_t NSRC = 1;
static int g_stop;
static int g_phase = PH_CONNECT;
static uint64_t g_t_start, g_t_end; /* measurement window, ns; 0 = not yet */
static uint8_t PAD[1 << 20];

/* Controller state (thread 0 only). */
static struct {
    uint64_t t0, phase_at, pub_start;
    uint64_t sent, acked, pub_errors, sent_win, acked_win;
    uint64_t expected;         /* deliveries owed for every message sent */
    uint64_t expected_window_adjust; /* deliveries written off by the stall guard */
    uint64_t last_deliv, last_deliv_at;
    uint64_t fanout_total;     /* ready subscriptions */
    uint64_t rss_before, rss_subscribed, rss_end, rss_peak;
    uint64_t cpu_start, cpu_end, cpu_start_at, cpu_end_at;
    double self_cpu_start, self_cpu_end;
    uint64_t prog_last_at, prog_last_deliv, prog_last_sent, prog_last_cpu;
    uint64_t ready_subs;
    int interrupted;
    char pub_error[320];
    ev_prepare pump;
    ev_timer pump_timer, ctl_timer, prog_timer;
    ev_signal sigint, sigterm;
} C;

/* ------------------------------------------------------------------------------------------ */
/* /proc sampling of the server */

static int proc_cpu_ticks(pid_t pid, uint64_t *ticks)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    p++;
    unsigned long long ut = 0, st = 0;
    /* fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
     * cmajflt utime stime */
    if (sscanf(p, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    *ticks = ut + st;
    return 0;
}

static int proc_rss_kb(pid_t pid, uint64_t *kb)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int ok = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long long v;
        if (sscanf(line, "VmRSS: %llu kB", &v) == 1) {
            *kb = v;
            ok = 0;
            break;
        }
    }
    fclose(f);
    return ok;
}

/* Sum over the server's processes; 0 when none given. CPU in ns. */
static uint64_t server_cpu_ns(void)
{
    uint64_t sum = 0, t;
    long hz = sysconf(_SC_CLK_TCK);
    for (int i = 0; i < O.npids; i++)
        if (proc_cpu_ticks(O.pids[i], &t) == 0)
            sum += t;
    return sum * (1000000000ull / (uint64_t)(hz > 0 ? hz : 100));
}

static uint64_t server_rss_kb(void)
{
    uint64_t sum = 0, kb;
    for (int i = 0; i < O.npids; i++)
        if (proc_rss_kb(O.pids[i], &kb) == 0)
            sum += kb;
    return sum;
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------------------------------------------ */
/* Payload: "h<pub>:<channel>:<seq>:<send ns>|" padded with 'x' to the size. */

static size_t channel_name(uint32_t c, char *out)
{
    return (size_t)sprintf(out, "%s%" PRIu32, O.prefix, c);
}

static size_t payload_header(char *out, uint32_t pub, uint32_t chan, uint32_t seq, uint64_t ts)
{
    return (size_t)sprintf(out, "h%" PRIu32 ":%" PRIu32 ":%" PRIu32 ":%" PRIu64 "|", pub, chan, seq,
                           ts);
}

/* Parse a payload header; returns 0 or -1. */
static int payload_parse(const uint8_t *p, size_t len, uint64_t *pub, uint64_t *chan, uint64_t *seq,
                         uint64_t *ts)
{
    const uint8_t *e = p + len;
    size_t n;
    if (len < 9 || *p++ != 'h')
        return -1;
    if (!(n = parse_u64(p, e, pub)) || (p += n) >= e || *p++ != ':')
        return -1;
    if (!(n = parse_u64(p, e, chan)) || (p += n) >= e || *p++ != ':')
        return -1;
    if (!(n = parse_u64(p, e, seq)) || (p += n) >= e || *p++ != ':')
        return -1;
    if (!(n = parse_u64(p, e, ts)) || (p += n) >= e || *p != '|')
        return -1;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Subscribers */

static void sub_cb(struct ev_loop *loop, ev_io *io, int revents);

static void sub_fail(struct worker *w, struct sub *s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void sub_fail(struct worker *w, struct sub *s, const char *fmt, ...)
{
    if (!w->first_error[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->first_error, sizeof w->first_error, fmt, ap);
        va_end(ap);
    }
    if (s->io.fd >= 0) {
        ev_io_stop(w->loop, &s->io);
        close(s->io.fd);
        s->io.fd = -1;
    }
    free(s->hs);
    s->hs = NULL;
    ob_free(&s->out);
    int st = s->state;
    if (st == S_CONNECTING || st == S_HANDSHAKE) {
        BUMP(w->c.connecting, (uint64_t)-1);
        STORE(s->state, S_FAILED);
        BUMP(w->c.failed, 1);
    } else if (st == S_OPEN || st == S_READY) {
        if (st == S_READY)
            BUMP(w->c.ready, (uint64_t)-1);
        STORE(s->state, S_CLOSED);
        BUMP(w->c.closed, 1);
    }
}

static void sub_want_write(struct worker *w, struct sub *s, int on)
{
    int ev = EV_READ | (on ? EV_WRITE : 0);
    if ((s->io.events & (EV_READ | EV_WRITE)) == ev)
        return;
    ev_io_stop(w->loop, &s->io);
    ev_io_set(&s->io, s->io.fd, ev);
    ev_io_start(w->loop, &s->io);
}

static int sub_send(struct worker *w, struct sub *s, const void *data, size_t len)
{
    const uint8_t *p = data;
    if (s->out.len == s->out.off) {
        ssize_t n = write(s->io.fd, p, len);
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            sub_fail(w, s, "write: %s", strerror(errno));
            return -1;
        }
        if (n < 0)
            n = 0;
        p += n;
        len -= (size_t)n;
        if (!len)
            return 0;
    }
    ob_append(&s->out, p, len);
    sub_want_write(w, s, 1);
    return 0;
}

/* A masked client frame (payload <= 64 KiB) sent to s. */
static int sub_send_frame(struct worker *w, struct sub *s, int op, const void *data, size_t len)
{
    uint8_t frame[WS_MAX_HEADER + 512];
    uint8_t mask[4];
    uint64_t r = xorshift(&w->rng);
    memcpy(mask, &r, 4);
    if (len > sizeof frame - WS_MAX_HEADER)
        return -1;
    size_t h = ws_frame_header(frame, op, 1, len, mask);
    memcpy(frame + h, data, len);
    ws_mask(frame + h, len, mask, 0);
    return sub_send(w, s, frame, h + len);
}

static uint32_t sub_channel(uint32_t idx, uint32_t slot)
{
    return (uint32_t)(((uint64_t)idx * O.per_conn + slot) % O.channels);
}

static void sub_start_connect(struct worker *w, struct sub *s)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        s->state = S_CONNECTING;
        BUMP(w->c.connecting, 1);
        s->io.fd = -1;
        sub_fail(w, s, "socket: %s%s", strerror(errno),
                 errno == EMFILE ? " (raise the open files limit: ulimit -n)" : "");
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (O.kernel_ts)
        setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    if (NSRC > 1) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000002u + s->idx % NSRC);
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0)
            note("bind to 127.0.0.%u: %s", 2 + s->idx % NSRC, strerror(errno));
    }
    s->w = w;
    ev_io_init(&s->io, sub_cb, fd, EV_READ | EV_WRITE);
    STORE(s->state, S_CONNECTING);
    BUMP(w->c.connecting, 1);
    if (connect(fd, (struct sockaddr *)&TARGET, sizeof TARGET) < 0 && errno != EINPROGRESS) {
        s->io.fd = fd;
        sub_fail(w, s, "connect: %s", strerror(errno));
        return;
    }
    ev_io_start(w->loop, &s->io);
}

static void sub_send_handshake(struct worker *w, struct sub *s)
{
    uint8_t rnd[16];
    char key[32], req[4096], path[2048];
    for (int i = 0; i < 16; i += 8) {
        uint64_t r = xorshift(&w->rng);
        memcpy(rnd + i, &r, 8);
    }
    base64(rnd, 16, key);
    ws_accept_key(key, strlen(key), s->accept);
    size_t pl;
    if (O.sub_mode == SUB_WS) {
        pl = (size_t)snprintf(path, sizeof path, "%s", O.ws_path);
    } else {
        pl = (size_t)snprintf(path, sizeof path, "%s", O.sub_path);
        for (uint32_t k = 0; k < O.per_conn && pl < sizeof path - 40; k++) {
            if (k)
                path[pl++] = ',';
            pl += channel_name(sub_channel(s->idx, k), path + pl);
        }
    }
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     path, O.host, O.port, key);
    STORE(s->state, S_HANDSHAKE);
    s->hs = malloc(HS_CAP);
    if (!s->hs)
        die("out of memory");
    s->hs_len = 0;
    sub_send(w, s, req, (size_t)n);
}

static void sub_became_ready(struct worker *w, struct sub *s)
{
    STORE(s->state, S_READY);
    BUMP(w->c.ready, 1);
}

/* A complete message's start (up to HEAD_CAP bytes) and its full length. */
static void sub_message(struct worker *w, struct sub *s, const uint8_t *p, size_t hl, size_t full,
                        uint64_t now, uint64_t t_start, uint64_t t_end)
{
    size_t paylen = full;
    if (O.sub_mode == SUB_WS) {
        /* {"op":"message","channel":"c","seq":n,"data":"h..."} */
        const uint8_t *op = find(p, hl, "\"op\":");
        if (!op) {
            BUMP(w->c.unparsed, 1);
            return;
        }
        op += 5;
        while (op < p + hl && *op == ' ')
            op++;
        size_t left = (size_t)(p + hl - op);
        if (left >= 9 && !memcmp(op, "\"message\"", 9)) {
            const uint8_t *d = find(p, hl, "\"data\":");
            if (!d) {
                BUMP(w->c.unparsed, 1);
                return;
            }
            d += 7;
            while (d < p + hl && *d == ' ')
                d++;
            if (d >= p + hl || *d != '"') {
                BUMP(w->c.unparsed, 1);
                return;
            }
            d++;
            hl -= (size_t)(d - p);
            p = d;
            paylen = O.size;
        } else if (left >= 12 && !memcmp(op, "\"subscribed\"", 12)) {
            if (s->state == S_OPEN && ++s->subscribed >= O.per_conn)
                sub_became_ready(w, s);
            return;
        } else {
            BUMP(w->c.sub_errors, 1);
            if (!w->first_error[0])
                snprintf(w->first_error, sizeof w->first_error, "unexpected reply: %.*s",
                         (int)(hl > 120 ? 120 : hl), (const char *)p);
            return;
        }
    }
    uint64_t pub, chan, seq, ts;
    if (payload_parse(p, hl, &pub, &chan, &seq, &ts) < 0) {
        BUMP(w->c.unparsed, 1);
        return;
    }
    BUMP(w->c.deliveries, 1);
    if (now >= t_start && t_start && (!t_end || now < t_end)) {
        BUMP(w->c.deliveries_win, 1);
        BUMP(w->c.bytes_win, paylen);
    }
    if (t_start && ts >= t_start) {
        uint64_t lat = now > ts ? now - ts : 0;
        hist_add(&w->lat, lat);
        hist_add(&w->lat_iv, lat);
    }
    if (pub >= O.pubs || chan >= O.channels) {
        BUMP(w->c.stray, 1);
        return;
    }
    uint32_t base = (uint32_t)(((uint64_t)s->idx * O.per_conn) % O.channels);
    uint32_t slot = (uint32_t)((chan + O.channels - base) % O.channels);
    if (slot >= O.per_conn) {
        BUMP(w->c.stray, 1);
        return;
    }
    struct track *t = &TRACK[((uint64_t)s->idx * O.per_conn + slot) * O.pubs + pub];
    uint32_t sq = (uint32_t)seq;
    if (sq >= t->next) {
        uint32_t shift = sq - t->next + 1;
        if (sq > t->next)
            BUMP(w->c.gaps, sq - t->next);
        t->seen = shift >= 64 ? 1 : (t->seen << shift) | 1;
        t->next = sq + 1;
    } else {
        uint32_t d = t->next - 1 - sq;
        if (d < 64 && (t->seen >> d) & 1) {
            BUMP(w->c.duplicates, 1);
        } else {
            if (d < 64)
                t->seen |= 1ull << d;
            BUMP(w->c.reorders, 1);
            BUMP(w->c.gaps, (uint64_t)-1);
        }
    }
}

static void sub_handshake_read(struct worker *w, struct sub *s, uint64_t *rest_len)
{
    *rest_len = 0;
    ssize_t n = read(s->io.fd, s->hs + s->hs_len, HS_CAP - 1 - s->hs_len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        sub_fail(w, s, "handshake: %s", n ? strerror(errno) : "connection closed by the server");
        return;
    }
    s->hs_len += (size_t)n;
    s->hs[s->hs_len] = 0;
    const uint8_t *end = find(s->hs, s->hs_len, "\r\n\r\n");
    if (!end) {
        if (s->hs_len >= HS_CAP - 1)
            sub_fail(w, s, "handshake: response head too long");
        return;
    }
    size_t head = (size_t)(end - s->hs) + 4;
    if (s->hs_len < 12 || memcmp(s->hs, "HTTP/1.1 101", 12) != 0) {
        char *nl = strchr((char *)s->hs, '\r');
        if (nl)
            *nl = 0;
        sub_fail(w, s, "handshake: expected 101, got \"%.80s\"", (char *)s->hs);
        return;
    }
    int ok = 0;
    for (char *line = strstr((char *)s->hs, "\r\n"); line && line < (char *)s->hs + head;
         line = strstr(line + 2, "\r\n")) {
        if (!strncasecmp(line + 2, "Sec-WebSocket-Accept:", 21)) {
            char *v = line + 23;
            while (*v == ' ' || *v == '\t')
                v++;
            ok = !strncmp(v, s->accept, 28);
            break;
        }
    }
    if (!ok) {
        sub_fail(w, s, "handshake: missing or wrong Sec-WebSocket-Accept");
        return;
    }
    /* Upgraded. Keep any frame bytes that came with the head. */
    size_t rest = s->hs_len - head;
    memcpy(w->rbuf, s->hs + head, rest);
    free(s->hs);
    s->hs = NULL;
    BUMP(w->c.connecting, (uint64_t)-1);
    ws_parser_init(&s->parser, WS_ROLE_CLIENT, 1u << 30);
    STORE(s->state, S_OPEN);
    if (O.sub_mode == SUB_WS) {
        char msg[400], name[64];
        for (uint32_t k = 0; k < O.per_conn; k++) {
            channel_name(sub_channel(s->idx, k), name);
            int m = snprintf(msg, sizeof msg, "{\"op\":\"subscribe\",\"channel\":\"%s\"}", name);
            if (sub_send_frame(w, s, WS_OP_TEXT, msg, (size_t)m) < 0)
                return;
        }
    } else {
        sub_became_ready(w, s);
    }
    *rest_len = rest;
}

/* Parse buf[0..len) (the pending bytes first); keeps what is not consumed. */
static void sub_parse(struct worker *w, struct sub *s, uint8_t *buf, size_t len, uint64_t now)
{
    uint64_t t_start = LOAD(g_t_start), t_end = LOAD(g_t_end);
    size_t off = 0;
    while (off < len) {
        size_t used = 0;
        struct ws_event ev;
        int r = ws_parse(&s->parser, buf + off, len - off, &used, &ev);
        off += used;
        if (!r)
            break;
        switch (ev.type) {
        case WS_EV_DATA:
            if (s->msg_len == 0 && ev.fin) {
                sub_message(w, s, ev.data, ev.len > HEAD_CAP ? HEAD_CAP : ev.len, ev.len, now,
                            t_start, t_end);
                break;
            }
            if (s->head_len < HEAD_CAP) {
                size_t take = HEAD_CAP - s->head_len;
                if (take > ev.len)
                    take = ev.len;
                memcpy(s->head + s->head_len, ev.data, take);
                s->head_len = (uint16_t)(s->head_len + take);
            }
            s->msg_len += (uint32_t)ev.len;
            if (ev.fin) {
                sub_message(w, s, s->head, s->head_len, s->msg_len, now, t_start, t_end);
                s->msg_len = 0;
                s->head_len = 0;
            }
            break;
        case WS_EV_PING:
            if (sub_send_frame(w, s, WS_OP_PONG, ev.data, ev.len) < 0)
                return;
            break;
        case WS_EV_PONG:
            break;
        case WS_EV_CLOSE: {
            uint8_t code[2] = {(uint8_t)(ev.code >> 8), (uint8_t)ev.code};
            sub_send_frame(w, s, WS_OP_CLOSE, code, ev.code == WS_CLOSE_NO_STATUS ? 0 : 2);
            sub_fail(w, s, "server closed a subscriber: %u %.*s", ev.code, (int)ev.len,
                     (const char *)ev.data);
            return;
        }
        case WS_EV_ERROR:
            BUMP(w->c.proto_errors, 1);
            sub_fail(w, s, "protocol error from the server: %s", ev.error);
            return;
        }
        if (s->io.fd < 0)
            return;
    }
    size_t left = len - off;
    if (left > sizeof s->pend) {
        BUMP(w->c.proto_errors, 1);
        sub_fail(w, s, "parser left %zu unconsumed bytes", left);
        return;
    }
    memcpy(s->pend, buf + off, left);
    s->pend_len = (uint16_t)left;
}

static void sub_cb(struct ev_loop *loop, ev_io *io, int revents)
{
    struct sub *s = (struct sub *)io;
    struct worker *w = s->w;
    if (revents & EV_WRITE) {
        if (s->state == S_CONNECTING) {
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(io->fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (err) {
                sub_fail(w, s, "connect: %s", strerror(err));
                return;
            }
            sub_want_write(w, s, 0);
            sub_send_handshake(w, s);
            return;
        }
        while (s->out.off < s->out.len) {
            ssize_t n = write(io->fd, s->out.p + s->out.off, s->out.len - s->out.off);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                sub_fail(w, s, "write: %s", strerror(errno));
                return;
            }
            s->out.off += (size_t)n;
        }
        if (s->out.off == s->out.len) {
            s->out.off = s->out.len = 0;
            sub_want_write(w, s, 0);
        }
    }
    if (!(revents & EV_READ) || io->fd < 0)
        return;
    if (s->state == S_CONNECTING)
        return;
    if (s->state == S_HANDSHAKE) {
        uint64_t rest;
        sub_handshake_read(w, s, &rest);
        if (io->fd >= 0 && rest && s->state != S_HANDSHAKE) {
            BUMP(w->c.wire_bytes, rest);
            sub_parse(w, s, w->rbuf, rest, now_ns());
        }
        return;
    }
    memcpy(w->rbuf, s->pend, s->pend_len);
    struct iovec iov = {w->rbuf + s->pend_len, RBUF_SIZE - s->pend_len};
    union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } cm;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (O.kernel_ts) {
        mh.msg_control = cm.buf;
        mh.msg_controllen = sizeof cm.buf;
    }
    ssize_t n = recvmsg(io->fd, &mh, 0);
    uint64_t now = now_ns();
    if (n > 0 && O.kernel_ts) {
        /* When the data reached the socket, not when this loop got round to reading it: with
         * thousands of subscribers, reading them all one by one takes the load generator a while. */
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                struct timespec ts;
                memcpy(&ts, CMSG_DATA(c), sizeof ts);
                uint64_t rt = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
                uint64_t mono = rt - LOAD(g_rt_offset);
                if (mono < now)
                    now = mono;
            }
        }
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        sub_fail(w, s, "read: %s", strerror(errno));
        return;
    }
    if (n == 0) {
        sub_fail(w, s, "a subscriber's connection was closed by the server");
        return;
    }
    BUMP(w->c.wire_bytes, (uint64_t)n);
    sub_parse(w, s, w->rbuf, s->pend_len + (size_t)n, now);
    (void)loop;
}

/* Start connections at the worker's share of --connect-rate, with at most max_connecting in
 * handshake at once. */
static void worker_connect_more(struct worker *w)
{
    if (w->next_connect >= w->count)
        return;
    uint64_t now = now_ns();
    if (!w->connect_start)
        w->connect_start = now;
    double per = O.connect_rate / O.threads;
    uint64_t allowed = (uint64_t)((double)(now - w->connect_start) / 1e9 * per) + 1;
    uint32_t cap = O.max_connecting / O.threads + 1;
    while (w->next_connect < w->count && w->next_connect < allowed && LOAD(w->c.connecting) < cap) {
        struct sub *s = &SUBS[w->first + w->next_connect];
        STORE(w->next_connect, w->next_connect + 1);
        sub_start_connect(w, s);
    }
}

static void worker_tick(struct ev_loop *loop, ev_timer *t, int revents)
{
    struct worker *w = t->data;
    if (LOAD(g_stop)) {
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    if (LOAD(w->reset_iv)) {
        struct hist *h = &w->lat_iv;
        for (unsigned i = 0; i < HIST_N; i++)
            if (h->b[i])
                STORE(h->b[i], 0);
        STORE(h->count, 0);
        STORE(h->sum, 0);
        STORE(h->max, 0);
        STORE(h->min, 0);
        STORE(w->reset_iv, 0);
    }
    worker_connect_more(w);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    ev_run(w->loop, 0);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Publishers */

static void pub_cb(struct ev_loop *loop, ev_io *io, int revents);

static void pub_dead(struct pub *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void pub_dead(struct pub *p, const char *fmt, ...)
{
    va_list ap;
    char msg[200];
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    note("publisher %u: %s", p->id, msg);
    if (!C.pub_error[0])
        snprintf(C.pub_error, sizeof C.pub_error, "publisher %u: %s", p->id, msg);
    if (p->fd >= 0) {
        ev_io_stop(W[0].loop, &p->io);
        close(p->fd);
        p->fd = -1;
    }
    p->state = P_DEAD;
    /* Its outstanding publishes will not be acknowledged: count them as errors, and owe no
     * deliveries for them (the server may or may not have taken them). */
    C.pub_errors += p->outstanding;
    for (uint32_t k = 0; k < p->outstanding; k++)
        C.expected -= CHAN_SUBS[p->ring[(p->ring_head + k) % O.pipeline]];
    p->outstanding = 0;
}

static void pub_want_write(struct pub *p, int on)
{
    int ev = EV_READ | (on ? EV_WRITE : 0);
    if ((p->io.events & (EV_READ | EV_WRITE)) == ev)
        return;
    ev_io_stop(W[0].loop, &p->io);
    ev_io_set(&p->io, p->fd, ev);
    ev_io_start(W[0].loop, &p->io);
}

static void pub_flush(struct pub *p)
{
    while (p->out.off < p->out.len) {
        ssize_t n = write(p->fd, p->out.p + p->out.off, p->out.len - p->out.off);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            pub_dead(p, "write: %s", strerror(errno));
            return;
        }
        p->out.off += (size_t)n;
    }
    if (p->out.off == p->out.len)
        p->out.off = p->out.len = 0;
    pub_want_write(p, p->out.len > p->out.off);
}

static void pub_connect(struct pub *p)
{
    struct sockaddr_in *a = O.pub_mode == PUB_REDIS ? &REDIS_ADDR : &TARGET;
    p->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (p->fd < 0)
        die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(p->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    p->ring = zalloc(sizeof *p->ring * O.pipeline);
    p->body_left = -1;
    p->cursor = (uint32_t)((uint64_t)p->id * O.channels / O.pubs);
    ev_io_init(&p->io, pub_cb, p->fd, EV_READ | EV_WRITE);
    p->state = P_CONNECTING;
    if (connect(p->fd, (struct sockaddr *)a, sizeof *a) < 0 && errno != EINPROGRESS) {
        pub_dead(p, "connect: %s", strerror(errno));
        return;
    }
    ev_io_start(W[0].loop, &p->io);
}

static void pub_connected(struct pub *p)
{
    if (O.pub_mode != PUB_WS) {
        p->state = P_READY;
        pub_want_write(p, 0);
        return;
    }
    uint8_t rnd[16];
    char key[32], req[1024];
    getrandom(rnd, sizeof rnd, 0);
    base64(rnd, 16, key);
    ws_accept_key(key, strlen(key), p->accept);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     O.ws_path, O.host, O.port, key);
    p->state = P_HANDSHAKE;
    ob_append(&p->out, req, (size_t)n);
    pub_flush(p);
}

static void pub_ack(struct pub *p, int ok, const char *what, size_t len)
{
    if (!p->outstanding) {
        if (!C.pub_error[0])
            snprintf(C.pub_error, sizeof C.pub_error, "unexpected reply: %.*s",
                     (int)(len > 100 ? 100 : len), what);
        return;
    }
    p->outstanding--;
    p->ring_head = (p->ring_head + 1) % O.pipeline;
    C.acked++;
    if (LOAD(g_t_start) && !LOAD(g_t_end))
        C.acked_win++;
    if (!ok) {
        C.pub_errors++;
        /* Nobody will deliver it. */
        uint32_t c = p->ring[(p->ring_head + O.pipeline - 1) % O.pipeline];
        C.expected -= CHAN_SUBS[c];
        if (!C.pub_error[0])
            snprintf(C.pub_error, sizeof C.pub_error, "publish failed: %.*s",
                     (int)(len > 160 ? 160 : len), what);
    }
}

/* HTTP responses in p->in. */
static void pub_http_replies(struct pub *p)
{
    struct obuf *b = &p->in;
    for (;;) {
        uint8_t *s = b->p + b->off;
        size_t n = b->len - b->off;
        if (p->body_left < 0) {
            const uint8_t *e = find(s, n, "\r\n\r\n");
            if (!e) {
                if (n > 65536)
                    pub_dead(p, "HTTP reply head too long");
                return;
            }
            size_t head = (size_t)(e - s) + 4;
            if (n < 12 || memcmp(s, "HTTP/1.", 7)) {
                pub_dead(p, "bad HTTP reply: %.40s", (const char *)s);
                return;
            }
            p->status = atoi((const char *)s + 9);
            p->chunked = 0;
            p->body_left = 0;
            for (const uint8_t *l = find(s, head, "\r\n"); l && l < s + head - 2;
                 l = find(l + 2, (size_t)(s + head - l - 2), "\r\n")) {
                const char *h = (const char *)l + 2;
                if (!strncasecmp(h, "Content-Length:", 15))
                    p->body_left = atoll(h + 15);
                else if (!strncasecmp(h, "Transfer-Encoding:", 18)) {
                    const uint8_t *eol = find((const uint8_t *)h, (size_t)(s + head - (const uint8_t *)h), "\r\n");
                    if (eol && find((const uint8_t *)h, (size_t)(eol - (const uint8_t *)h), "chunked"))
                        p->chunked = 1;
                }
            }
            b->off += head;
            if (p->chunked)
                p->body_left = 0;
            continue;
        }
        if (p->chunked) {
            /* Skip chunks: "size\r\n" data "\r\n" ... "0\r\n" [trailers] "\r\n". */
            if (p->body_left > 0) {
                size_t take = n < (size_t)p->body_left ? n : (size_t)p->body_left;
                b->off += take;
                p->body_left -= (int64_t)take;
                if (p->body_left > 0)
                    return;
                continue;
            }
            const uint8_t *e = find(s, n, "\r\n");
            if (!e)
                return;
            if (e == s) { /* the CRLF after a chunk's data */
                b->off += 2;
                continue;
            }
            unsigned long sz = strtoul((const char *)s, NULL, 16);
            if (sz) {
                b->off += (size_t)(e - s) + 2;
                p->body_left = (int64_t)sz;
                continue;
            }
            const uint8_t *end = find(e, (size_t)(s + n - e), "\r\n\r\n");
            if (!end)
                return;
            b->off += (size_t)(end - s) + 4;
            p->body_left = -1;
            pub_ack(p, p->status >= 200 && p->status < 300, "chunked reply", 13);
            continue;
        }
        if (n < (size_t)p->body_left)
            return;
        int ok = p->status >= 200 && p->status < 300;
        char what[200];
        snprintf(what, sizeof what, "HTTP %d %.*s", p->status,
                 (int)(p->body_left > 150 ? 150 : p->body_left), (const char *)s);
        b->off += (size_t)p->body_left;
        p->body_left = -1;
        pub_ack(p, ok, what, strlen(what));
    }
}

static void pub_redis_replies(struct pub *p)
{
    struct obuf *b = &p->in;
    for (;;) {
        uint8_t *s = b->p + b->off;
        size_t n = b->len - b->off;
        const uint8_t *e = find(s, n, "\r\n");
        if (!e)
            return;
        size_t line = (size_t)(e - s);
        b->off += line + 2;
        if (line == 2 && s[0] == ':' && s[1] == '0' && !C.pub_error[0])
            snprintf(C.pub_error, sizeof C.pub_error,
                     "Redis PUBLISH reached no subscriber: is the server subscribed to %s?",
                     O.redis_host);
        pub_ack(p, s[0] == ':', (const char *)s, line);
    }
}

static void pub_ws_message(struct pub *p, const uint8_t *m, size_t len)
{
    if (len >= 18 && find(m, len, "\"published\""))
        pub_ack(p, 1, "", 0);
    else
        pub_ack(p, 0, (const char *)m, len);
}

static void pub_ws_replies(struct pub *p)
{
    struct obuf *b = &p->in;
    if (p->state == P_HANDSHAKE) {
        uint8_t *s = b->p + b->off;
        size_t n = b->len - b->off;
        const uint8_t *e = find(s, n, "\r\n\r\n");
        if (!e)
            return;
        size_t head = (size_t)(e - s) + 4;
        if (n < 12 || memcmp(s, "HTTP/1.1 101", 12) || !find(s, head, p->accept)) {
            pub_dead(p, "WebSocket handshake on %s failed: %.60s", O.ws_path, (const char *)s);
            return;
        }
        b->off += head;
        ws_parser_init(&p->parser, WS_ROLE_CLIENT, 1u << 30);
        p->state = P_READY;
    }
    size_t off = b->off;
    while (off < b->len) {
        size_t used = 0;
        struct ws_event ev;
        int r = ws_parse(&p->parser, b->p + off, b->len - off, &used, &ev);
        off += used;
        if (!r)
            break;
        if (ev.type == WS_EV_DATA) {
            if (p->msg_len == 0 && ev.fin) {
                pub_ws_message(p, ev.data, ev.len);
                continue;
            }
            size_t take = HEAD_CAP - p->head_len;
            if (take > ev.len)
                take = ev.len;
            memcpy(p->head + p->head_len, ev.data, take);
            p->head_len = (uint16_t)(p->head_len + take);
            p->msg_len += (uint32_t)ev.len;
            if (ev.fin) {
                pub_ws_message(p, p->head, p->head_len);
                p->msg_len = p->head_len = 0;
            }
        } else if (ev.type == WS_EV_PING) {
            uint8_t f[WS_MAX_PENDING], mask[4] = {1, 2, 3, 4};
            size_t h = ws_frame_header(f, WS_OP_PONG, 1, ev.len, mask);
            memcpy(f + h, ev.data, ev.len);
            ws_mask(f + h, ev.len, mask, 0);
            ob_append(&p->out, f, h + ev.len);
            pub_flush(p);
        } else if (ev.type == WS_EV_CLOSE || ev.type == WS_EV_ERROR) {
            b->off = off;
            pub_dead(p, "%s on the publishing WebSocket: %u %s",
                     ev.type == WS_EV_CLOSE ? "close" : "protocol error", ev.code,
                     ev.error ? ev.error : "");
            return;
        }
        if (p->state == P_DEAD)
            return;
    }
    b->off = off;
}

static void pub_cb(struct ev_loop *loop, ev_io *io, int revents)
{
    struct pub *p = (struct pub *)io;
    if (revents & EV_WRITE) {
        if (p->state == P_CONNECTING) {
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (err) {
                pub_dead(p, "connect: %s", strerror(err));
                return;
            }
            pub_connected(p);
            return;
        }
        pub_flush(p);
        if (p->state == P_DEAD)
            return;
    }
    if (!(revents & EV_READ) || p->state == P_CONNECTING)
        return;
    uint8_t *dst = ob_reserve(&p->in, 65536);
    ssize_t n = read(p->fd, dst, 65536);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            pub_dead(p, "read: %s", strerror(errno));
        return;
    }
    if (n == 0) {
        pub_dead(p, "connection closed by the server");
        return;
    }
    p->in.len += (size_t)n;
    if (O.pub_mode == PUB_HTTP)
        pub_http_replies(p);
    else if (O.pub_mode == PUB_REDIS)
        pub_redis_replies(p);
    else
        pub_ws_replies(p);
    if (p->in.off == p->in.len)
        p->in.off = p->in.len = 0;
    (void)loop;
}

/* Append one publish to p. */
static void pub_write(struct pub *p, uint32_t c, uint64_t ts)
{
    char name[64], hdr[96];
    size_t nl = channel_name(c, name);
    uint32_t seq = SEQ[(size_t)p->id * O.channels + c]++;
    size_t hl = payload_header(hdr, p->id, c, seq, ts);
    size_t size = O.size > hl ? O.size : hl;
    struct obuf *b = &p->out;
    uint8_t *o;
    if (O.pub_mode == PUB_HTTP) {
        o = ob_reserve(b, 256 + nl + size);
        int n = sprintf((char *)o, "POST %s%s HTTP/1.1\r\nHost: %s:%d\r\nContent-Length: %zu\r\n\r\n",
                        O.pub_path, name, O.host, O.port, size);
        o += n;
        b->len += (size_t)n;
    } else if (O.pub_mode == PUB_REDIS) {
        o = ob_reserve(b, 96 + nl + size);
        int n = sprintf((char *)o, "*3\r\n$7\r\nPUBLISH\r\n$%zu\r\n%s\r\n$%zu\r\n", nl, name, size);
        o += n;
        b->len += (size_t)n;
    } else {
        char pre[128];
        int pn = snprintf(pre, sizeof pre, "{\"op\":\"publish\",\"channel\":\"%s\",\"data\":\"", name);
        size_t len = (size_t)pn + size + 2;
        uint8_t mask[4];
        uint64_t r = xorshift(&W[0].rng);
        memcpy(mask, &r, 4);
        o = ob_reserve(b, WS_MAX_HEADER + len);
        size_t h = ws_frame_header(o, WS_OP_TEXT, 1, len, mask);
        uint8_t *pl = o + h;
        memcpy(pl, pre, (size_t)pn);
        memcpy(pl + pn, hdr, hl);
        memcpy(pl + pn + hl, PAD, size - hl);
        memcpy(pl + pn + size, "\"}", 2);
        ws_mask(pl, len, mask, 0);
        b->len += h + len;
        goto queued;
    }
    memcpy(o, hdr, hl);
    memcpy(o + hl, PAD, size - hl);
    b->len += size;
    if (O.pub_mode == PUB_REDIS) {
        memcpy(b->p + b->len, "\r\n", 2);
        b->len += 2;
    }
queued:
    p->ring[(p->ring_head + p->outstanding) % O.pipeline] = c;
    p->outstanding++;
    C.sent++;
    C.expected += CHAN_SUBS[c];
    if (LOAD(g_t_start) && !LOAD(g_t_end))
        C.sent_win++;
}

static uint64_t total(size_t field_off)
{
    uint64_t sum = 0;
    for (uint32_t i = 0; i < O.threads; i++)
        sum += __atomic_load_n((uint64_t *)((char *)&W[i].c + field_off), __ATOMIC_RELAXED);
    return sum;
}
#define TOTAL(f) total(offsetof(struct counters, f))

static void pump(void)
{
    if (g_phase != PH_WARMUP && g_phase != PH_MEASURE)
        return;
    if (O.pub_mode == PUB_NONE)
        return;
    uint64_t now = now_ns();
    uint64_t budget;
    if (O.rate > 0) {
        double due = (double)(now - C.pub_start) / 1e9 * O.rate + 1;
        budget = due > (double)C.sent ? (uint64_t)due - C.sent : 0;
    } else {
        budget = UINT64_MAX;
    }
    if (!budget)
        return;
    /* --rate max: keep at most window messages' worth of deliveries in flight. */
    uint64_t cap = 0, inflight = 0;
    if (O.rate <= 0) {
        uint64_t deliv = TOTAL(deliveries) - TOTAL(duplicates);
        uint64_t owed = C.expected - C.expected_window_adjust;
        inflight = owed > deliv ? owed - deliv : 0;
        cap = (uint64_t)O.window * (C.fanout_total + O.channels - 1) / O.channels;
        if (cap < 1)
            cap = 1;
    }
    int moved = 1;
    uint32_t first = (uint32_t)(C.sent % O.pubs);
    while (budget && moved) {
        moved = 0;
        for (uint32_t k = 0; k < O.pubs && budget; k++) {
            struct pub *p = &PUBS[(first + k) % O.pubs];
            if (p->state != P_READY || p->outstanding >= O.pipeline)
                continue;
            uint32_t c = p->cursor;
            if (O.rate <= 0 && inflight && inflight + CHAN_SUBS[c] > cap)
                goto done;
            p->cursor = (c + 1) % O.channels;
            pub_write(p, c, now);
            inflight += CHAN_SUBS[c];
            budget--;
            moved = 1;
        }
    }
done:
    for (uint32_t k = 0; k < O.pubs; k++) {
        struct pub *p = &PUBS[k];
        if (p->state != P_DEAD && p->out.len > p->out.off)
            pub_flush(p);
    }
}

static void pump_prepare_cb(struct ev_loop *loop, ev_prepare *w, int revents) { pump(); }
static void pump_timer_cb(struct ev_loop *loop, ev_timer *w, int revents) { pump(); }

/* ------------------------------------------------------------------------------------------ */
/* Controller */

static double secs(uint64_t ns) { return (double)ns / 1e9; }

static void set_phase(int ph)
{
    g_phase = ph;
    C.phase_at = now_ns();
}

static void progress(uint64_t now)
{
    static const char *names[] = {"connect", "pubconn", "warmup", "measure", "drain", "done"};
    double dt = secs(now - C.prog_last_at);
    if (dt <= 0)
        dt = 1;
    uint64_t deliv = TOTAL(deliveries), cpu = server_cpu_ns();
    struct hist iv = {0};
    for (uint32_t i = 0; i < O.threads; i++) {
        hist_merge(&iv, &W[i].lat_iv);
        STORE(W[i].reset_iv, 1);
    }
    char srv[96] = "";
    if (O.npids)
        snprintf(srv, sizeof srv, " | server cpu %3.0f%% rss %.1f MB",
                 (double)(cpu - C.prog_last_cpu) / 1e9 / dt * 100, (double)server_rss_kb() / 1024);
    if (!O.quiet)
        fprintf(stderr,
                "[%5.1fs %-7s] subs %" PRIu64 "/%" PRIu32 " (fail %" PRIu64 ", closed %" PRIu64
                ") | pub %.0f/s | deliv %.0f/s | p50 %.0fus p99 %.0fus | gaps %" PRId64 "%s\n",
                secs(now - C.t0), names[g_phase], TOTAL(ready), O.subscribers, TOTAL(failed),
                TOTAL(closed), (double)(C.sent - C.prog_last_sent) / dt,
                (double)(deliv - C.prog_last_deliv) / dt, (double)hist_pct(&iv, 0.5) / 1e3,
                (double)hist_pct(&iv, 0.99) / 1e3, (int64_t)TOTAL(gaps), srv);
    C.prog_last_at = now;
    C.prog_last_deliv = deliv;
    C.prog_last_sent = C.sent;
    C.prog_last_cpu = cpu;
    uint64_t rss = server_rss_kb();
    if (rss > C.rss_peak)
        C.rss_peak = rss;
}

static void prog_cb(struct ev_loop *loop, ev_timer *t, int revents)
{
    update_rt_offset();
    progress(now_ns());
}

static void finish(void);

static void start_publishing(uint64_t now)
{
    for (uint32_t i = 0; i < O.subscribers; i++) {
        if (LOAD(SUBS[i].state) != S_READY)
            continue;
        for (uint32_t k = 0; k < O.per_conn; k++)
            CHAN_SUBS[sub_channel(i, k)]++;
        C.fanout_total += O.per_conn;
        C.ready_subs++;
    }
    C.pub_start = now;
    C.last_deliv = TOTAL(deliveries);
    C.last_deliv_at = now;
    set_phase(O.warmup > 0 ? PH_WARMUP : PH_MEASURE);
    if (g_phase == PH_MEASURE) {
        STORE(g_t_start, now);
        C.cpu_start = server_cpu_ns();
        C.cpu_start_at = now;
        C.self_cpu_start = self_cpu_s();
    }
    if (O.rate > 0) {
        double iv = 1.0 / O.rate;
        if (iv < 0.001)
            iv = 0.001;
        ev_timer_init(&C.pump_timer, pump_timer_cb, 0, iv);
        ev_timer_start(W[0].loop, &C.pump_timer);
    }
    ev_prepare_start(W[0].loop, &C.pump);
    pump();
}

static void ctl_cb(struct ev_loop *loop, ev_timer *t, int revents)
{
    uint64_t now = now_ns();
    double in_phase = secs(now - C.phase_at);
    switch (g_phase) {
    case PH_CONNECT: {
        uint64_t ready = TOTAL(ready), failed = TOTAL(failed), closed = TOTAL(closed);
        int all_started = 1;
        for (uint32_t i = 0; i < O.threads; i++)
            if (LOAD(W[i].next_connect) < W[i].count || LOAD(W[i].c.connecting))
                all_started = 0;
        /* /ws: opened but not yet subscribed. */
        uint64_t opened_waiting = 0;
        if (all_started && O.sub_mode == SUB_WS)
            for (uint32_t i = 0; i < O.subscribers; i++)
                opened_waiting += LOAD(SUBS[i].state) == S_OPEN;
        int done = all_started && !opened_waiting && ready + failed + closed >= O.subscribers;
        if (!done && in_phase < O.connect_timeout)
            break;
        if (!done)
            note("gave up waiting for subscribers after %.0f s", in_phase);
        if (failed || closed) {
            for (uint32_t i = 0; i < O.threads; i++)
                if (W[i].first_error[0]) {
                    note("%" PRIu64 " subscribers failed; first error: %s", failed + closed,
                         W[i].first_error);
                    break;
                }
        }
        if (!ready) {
            note("no subscriber could connect to %s:%d", O.host, O.port);
            C.interrupted = 1;
            finish();
            return;
        }
        if (!O.quiet)
            note("%" PRIu64 " subscribers ready in %.1f s", ready, in_phase);
        usleep(200000); /* let the server settle before sampling its RSS */
        C.rss_subscribed = server_rss_kb();
        if (O.pub_mode == PUB_NONE) {
            start_publishing(now_ns());
            break;
        }
        for (uint32_t i = 0; i < O.pubs; i++)
            pub_connect(&PUBS[i]);
        set_phase(PH_PUBCONNECT);
        break;
    }
    case PH_PUBCONNECT: {
        uint32_t ready = 0, dead = 0;
        for (uint32_t i = 0; i < O.pubs; i++) {
            ready += PUBS[i].state == P_READY;
            dead += PUBS[i].state == P_DEAD;
        }
        if (dead && !ready) {
            note("no publisher could connect: %s", C.pub_error);
            C.interrupted = 1;
            finish();
            return;
        }
        if (ready + dead == O.pubs || in_phase > 10)
            start_publishing(now);
        break;
    }
    case PH_WARMUP:
        if (in_phase >= O.warmup) {
            set_phase(PH_MEASURE);
            STORE(g_t_start, now);
            C.cpu_start = server_cpu_ns();
            C.cpu_start_at = now;
            C.self_cpu_start = self_cpu_s();
        }
        break;
    case PH_MEASURE:
        if (in_phase >= O.duration) {
            STORE(g_t_end, now);
            C.cpu_end = server_cpu_ns();
            C.cpu_end_at = now;
            C.self_cpu_end = self_cpu_s();
            set_phase(PH_DRAIN);
            C.last_deliv = TOTAL(deliveries);
            C.last_deliv_at = now;
            if (O.rate > 0)
                ev_timer_stop(W[0].loop, &C.pump_timer);
            ev_prepare_stop(W[0].loop, &C.pump);
        }
        break;
    case PH_DRAIN: {
        uint64_t deliv = TOTAL(deliveries);
        uint64_t unique = deliv - TOTAL(duplicates);
        int acked = 1;
        for (uint32_t i = 0; i < O.pubs; i++)
            if (PUBS[i].state == P_READY && PUBS[i].outstanding)
                acked = 0;
        if (deliv != C.last_deliv) {
            C.last_deliv = deliv;
            C.last_deliv_at = now;
        }
        if ((acked && unique >= C.expected) || in_phase >= O.drain ||
            (acked && secs(now - C.last_deliv_at) > 2.0))
            finish();
        break;
    }
    default:
        break;
    }
    if (g_phase == PH_MEASURE || g_phase == PH_WARMUP) {
        /* Stall guard for --rate max: if deliveries stop while the window is full (lost
         * messages never arrive), write the window off so publishing goes on. */
        if (O.rate <= 0) {
            uint64_t deliv = TOTAL(deliveries);
            if (deliv != C.last_deliv) {
                C.last_deliv = deliv;
                C.last_deliv_at = now;
            } else if (secs(now - C.last_deliv_at) > 2.0 && C.sent) {
                uint64_t unique = deliv - TOTAL(duplicates);
                uint64_t owed = C.expected - C.expected_window_adjust;
                if (owed > unique) {
                    note("no deliveries for 2 s with %" PRIu64 " owed; writing them off",
                         owed - unique);
                    C.expected_window_adjust += owed - unique;
                }
                C.last_deliv_at = now;
            }
        }
    }
}

static void sig_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    if (C.interrupted++) {
        note("interrupted again; exiting");
        _exit(130);
    }
    note("interrupted; finishing (Ctrl-C again to quit at once)");
    if (g_phase == PH_MEASURE || g_phase == PH_WARMUP) {
        uint64_t now = now_ns();
        if (!g_t_start)
            STORE(g_t_start, now);
        STORE(g_t_end, now);
        C.cpu_end = server_cpu_ns();
        C.cpu_end_at = now;
        C.self_cpu_end = self_cpu_s();
        if (!C.cpu_start_at) {
            C.cpu_start_at = now;
            C.cpu_start = C.cpu_end;
        }
        ev_prepare_stop(W[0].loop, &C.pump);
        if (O.rate > 0)
            ev_timer_stop(W[0].loop, &C.pump_timer);
        set_phase(PH_DRAIN);
        C.last_deliv = TOTAL(deliveries);
        C.last_deliv_at = now;
        O.drain = 2;
    } else {
        finish();
    }
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            fprintf(f, "\\u%04x", *s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

static void finish(void)
{
    set_phase(PH_DONE);
    STORE(g_stop, 1);
    uint64_t now = now_ns();
    if (!C.cpu_end_at) {
        C.cpu_end_at = now;
        C.cpu_end = server_cpu_ns();
        C.self_cpu_end = self_cpu_s();
        if (!g_t_end)
            STORE(g_t_end, now);
    }
    C.rss_end = server_rss_kb();
    if (C.rss_end > C.rss_peak)
        C.rss_peak = C.rss_end;
    ev_break(W[0].loop, EVBREAK_ALL);
}

static void report(void)
{
    struct hist lat = {0};
    for (uint32_t i = 0; i < O.threads; i++)
        hist_merge(&lat, &W[i].lat);
    uint64_t t_start = g_t_start, t_end = g_t_end;
    double win = t_start && t_end > t_start ? secs(t_end - t_start) : 0;
    uint64_t deliv = TOTAL(deliveries), dups = TOTAL(duplicates), unique = deliv - dups;
    uint64_t losses = C.expected > unique ? C.expected - unique : 0;
    double dps = win > 0 ? (double)TOTAL(deliveries_win) / win : 0;
    double mbps = win > 0 ? (double)TOTAL(bytes_win) / win / 1e6 : 0;
    double pps = win > 0 ? (double)C.acked_win / win : 0;
    double cpu_win = C.cpu_end_at > C.cpu_start_at ? secs(C.cpu_end_at - C.cpu_start_at) : 0;
    double srv_cpu = cpu_win > 0 ? (double)(C.cpu_end - C.cpu_start) / 1e9 / cpu_win * 100 : 0;
    double self_cpu = cpu_win > 0 ? (C.self_cpu_end - C.self_cpu_start) / cpu_win * 100 : 0;
    uint64_t ready = C.ready_subs;
    double rss_per_conn =
        ready && C.rss_subscribed > C.rss_before
            ? (double)(C.rss_subscribed - C.rss_before) * 1024.0 / (double)ready
            : 0;
    const char *pubname[] = {"http", "ws", "redis", "none"};
    char ratebuf[32];
    if (O.rate > 0)
        snprintf(ratebuf, sizeof ratebuf, "%g", O.rate);
    else
        snprintf(ratebuf, sizeof ratebuf, "max");
    char first_error[200] = "";
    for (uint32_t i = 0; i < O.threads; i++)
        if (W[i].first_error[0]) {
            snprintf(first_error, sizeof first_error, "%s", W[i].first_error);
            break;
        }

    printf("== herald-bench %s: %s:%d, %" PRIu64 "/%" PRIu32 " subscribers x %" PRIu32
           " channel(s) each over %" PRIu32 " channel(s), publish %s at %s msg/s, %" PRIu32
           " B, %.1f s measured\n",
           O.label ? O.label : "", O.host, O.port, ready, O.subscribers, O.per_conn, O.channels,
           pubname[O.pub_mode], ratebuf, O.size, win);
    printf("published   %" PRIu64 " (%" PRIu64 " acked, %" PRIu64 " errors), %.0f msg/s in window\n",
           C.sent, C.acked, C.pub_errors, pps);
    printf("deliveries  %" PRIu64 " of %" PRIu64 " owed; %.0f/s, %.2f MB/s payload in window\n", deliv,
           C.expected, dps, mbps);
    printf("losses      %" PRIu64 "  duplicates %" PRIu64 "  reorders %" PRIu64 "  stray %" PRIu64
           "  unparsed %" PRIu64 "\n",
           losses, dups, TOTAL(reorders), TOTAL(stray), TOTAL(unparsed));
    printf("latency     p50 %.1f us  p99 %.1f us  p99.9 %.1f us  max %.1f us  (n=%" PRIu64 ")\n",
           (double)hist_pct(&lat, 0.5) / 1e3, (double)hist_pct(&lat, 0.99) / 1e3,
           (double)hist_pct(&lat, 0.999) / 1e3, (double)lat.max / 1e3, lat.count);
    if (O.npids)
        printf("server      cpu %.1f%% of one core; rss %.1f MB before, %.1f MB subscribed, %.1f MB "
               "end (peak %.1f); %.0f B per connection\n",
               srv_cpu, (double)C.rss_before / 1024, (double)C.rss_subscribed / 1024,
               (double)C.rss_end / 1024, (double)C.rss_peak / 1024, rss_per_conn);
    printf("loadgen     cpu %.1f%% of one core; subscribers failed %" PRIu64 ", closed %" PRIu64
           ", protocol errors %" PRIu64 "\n",
           self_cpu, TOTAL(failed), TOTAL(closed), TOTAL(proto_errors));
    if (first_error[0])
        printf("first error %s\n", first_error);
    if (C.pub_error[0])
        printf("publish     %s\n", C.pub_error);
    fflush(stdout);

    if (!O.json)
        return;
    FILE *f = strcmp(O.json, "-") ? fopen(O.json, "w") : stdout;
    if (!f) {
        note("cannot write %s: %s", O.json, strerror(errno));
        return;
    }
    fprintf(f, "{\n  \"label\": ");
    json_str(f, O.label ? O.label : "");
    fprintf(f, ",\n  \"target\": \"%s:%d\",\n", O.host, O.port);
    fprintf(f,
            "  \"params\": {\"subscribers\": %" PRIu32 ", \"channels\": %" PRIu32
            ", \"channels_per_connection\": %" PRIu32 ", \"sub_mode\": \"%s\", \"publish\": \"%s\", "
            "\"rate\": \"%s\", \"size\": %" PRIu32 ", \"duration\": %g, \"warmup\": %g, "
            "\"publishers\": %" PRIu32 ", \"pipeline\": %" PRIu32 ", \"window\": %" PRIu32
            ", \"threads\": %" PRIu32 "},\n",
            O.subscribers, O.channels, O.per_conn, O.sub_mode == SUB_WS ? "ws" : "raw",
            pubname[O.pub_mode], ratebuf, O.size, O.duration, O.warmup, O.pubs, O.pipeline,
            O.window, O.threads);
    fprintf(f,
            "  \"subscribers_ready\": %" PRIu64 ", \"subscribers_failed\": %" PRIu64
            ", \"subscribers_closed\": %" PRIu64 ", \"protocol_errors\": %" PRIu64 ",\n",
            ready, TOTAL(failed), TOTAL(closed), TOTAL(proto_errors));
    fprintf(f, "  \"window_s\": %.3f, \"interrupted\": %s,\n", win, C.interrupted ? "true" : "false");
    fprintf(f,
            "  \"published\": %" PRIu64 ", \"acked\": %" PRIu64 ", \"publish_errors\": %" PRIu64
            ", \"publish_per_s\": %.1f,\n",
            C.sent, C.acked, C.pub_errors, pps);
    fprintf(f,
            "  \"deliveries\": %" PRIu64 ", \"expected\": %" PRIu64 ", \"deliveries_per_s\": %.1f, "
            "\"mb_per_s\": %.3f,\n",
            deliv, C.expected, dps, mbps);
    fprintf(f,
            "  \"losses\": %" PRIu64 ", \"duplicates\": %" PRIu64 ", \"reorders\": %" PRIu64
            ", \"stray\": %" PRIu64 ", \"unparsed\": %" PRIu64 ",\n",
            losses, dups, TOTAL(reorders), TOTAL(stray), TOTAL(unparsed));
    fprintf(f,
            "  \"latency_us\": {\"count\": %" PRIu64 ", \"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, "
            "\"p999\": %.1f, \"max\": %.1f, \"mean\": %.1f},\n",
            lat.count, (double)hist_pct(&lat, 0.5) / 1e3, (double)hist_pct(&lat, 0.9) / 1e3,
            (double)hist_pct(&lat, 0.99) / 1e3, (double)hist_pct(&lat, 0.999) / 1e3,
            (double)lat.max / 1e3, lat.count ? (double)lat.sum / (double)lat.count / 1e3 : 0);
    if (O.npids)
        fprintf(f,
                "  \"server\": {\"cpu_pct\": %.1f, \"rss_before_kb\": %" PRIu64
                ", \"rss_subscribed_kb\": %" PRIu64 ", \"rss_end_kb\": %" PRIu64
                ", \"rss_peak_kb\": %" PRIu64 ", \"rss_per_connection_bytes\": %.0f},\n",
                srv_cpu, C.rss_before, C.rss_subscribed, C.rss_end, C.rss_peak, rss_per_conn);
    else
        fprintf(f, "  \"server\": null,\n");
    fprintf(f, "  \"loadgen_cpu_pct\": %.1f,\n  \"first_error\": ", self_cpu);
    json_str(f, first_error);
    fprintf(f, ",\n  \"publish_error\": ");
    json_str(f, C.pub_error);
    fprintf(f, "\n}\n");
    if (f != stdout)
        fclose(f);
}

/* ------------------------------------------------------------------------------------------ */
/* Main */

static void usage(FILE *f)
{
    fputs(
        "usage: herald-bench [options]\n"
        "Fan-out load generator: N WebSocket subscribers, one or more publishers, and what arrives.\n"
        "\n"
        "Target\n"
        "  --host H              server address (default 127.0.0.1)\n"
        "  --port P              server port (default 8080)\n"
        "  --sub-path PATH       raw subscriber path prefix, channel appended (default /sub/)\n"
        "  --ws-path PATH        herald's JSON WebSocket endpoint (default /ws)\n"
        "  --pub-path PATH       HTTP publish path prefix (default /pub/)\n"
        "\n"
        "Subscribers\n"
        "  -n, --subscribers N   subscriber connections (default 1000)\n"
        "  -k, --channels K      channels; subscriber i takes channel i mod K (default 1)\n"
        "  --per-conn M          channels per subscriber connection (default 1): connection i\n"
        "                        takes channels i*M .. i*M+M-1 (mod K)\n"
        "  --sub raw|ws          raw: GET <sub-path><channel>, several channels joined with ','\n"
        "                        (nchan's multiplexing); ws: GET <ws-path> and one\n"
        "                        {\"op\":\"subscribe\"} frame per channel, ready on each reply\n"
        "  --connect-rate R[/s]  new connections per second (default 2000)\n"
        "  --max-connecting N    handshakes in progress at once (default 512)\n"
        "  --source-addrs N      spread connections over 127.0.0.2 .. 127.0.0.(N+1) (default:\n"
        "                        1 address up to 25000 connections, then one per 25000)\n"
        "  --connect-timeout S   give up waiting for subscribers after S seconds (default 120)\n"
        "\n"
        "Publishing\n"
        "  --publish http|ws|redis|none  POST <pub-path><channel> (default), {\"op\":\"publish\"} on\n"
        "                        a /ws socket, or PUBLISH to Redis\n"
        "  --redis HOST:PORT     Redis server for --publish redis (default 127.0.0.1:6379)\n"
        "  -r, --rate R|max      messages per second over all channels (default 100); max: as\n"
        "                        fast as deliveries keep up, with --window messages in flight\n"
        "  -s, --size B          payload bytes (default 64; at least the ~40-byte header)\n"
        "  -d, --duration S      measured seconds (default 10)\n"
        "  --warmup S            seconds of publishing before measuring (default 2)\n"
        "  --drain S             at most S seconds to wait for in-flight deliveries (default 10)\n"
        "  --publishers P        publisher connections (default 1)\n"
        "  --pipeline W          outstanding publishes per publisher connection (default 32)\n"
        "  --window M            --rate max: messages published but not yet delivered to every\n"
        "                        subscriber (counted in deliveries, default 64)\n"
        "  --prefix STR          channel name prefix (default: b<random>-)\n"
        "\n"
        "Measuring and output\n"
        "  --server-pid PID[,PID...]  sample CPU (utime+stime) and RSS of these processes\n"
        "  --json FILE           write the results as JSON (- for stdout)\n"
        "  --label NAME          name of the run in the output\n"
        "  --threads N           event loops (default 1; thread 0 also publishes)\n"
        "  --rx-time kernel|read  latency ends at the kernel's receive timestamp of the data\n"
        "                        (SO_TIMESTAMPNS, default) or when herald-bench read it\n"
        "  -q, --quiet           no progress lines\n"
        "  -h, --help            this help\n"
        "\n"
        "Each payload starts with \"h<publisher>:<channel>:<seq>:<CLOCK_MONOTONIC ns>|\" and is\n"
        "padded with 'x'. Subscribers count deliveries, losses (owed minus unique deliveries),\n"
        "duplicates and reorders per channel and publisher, and latency (send to receipt, see\n"
        "--rx-time) of messages sent in the measured window. Progress goes to stderr once a second.\n"
        "Exit status: 0, 1 when no subscriber connected, 3 on losses or duplicates.\n",
        f);
}

static double parse_num(const char *s, const char *opt)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || (*end && strcmp(end, "/s")) || v < 0 || !isfinite(v))
        die("bad value for %s: %s", opt, s);
    return v;
}

static void parse_hostport(const char *s, struct sockaddr_in *a, const char *opt)
{
    char host[256];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host)
        die("%s wants HOST:PORT", opt);
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
        die("%s: not an IPv4 address: %s", opt, host);
}

static void raise_nofile(uint64_t need)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur < need)
        note("open files limit is %llu, below the %llu this run needs: raise the hard limit "
             "(ulimit -Hn, /etc/security/limits.conf or LimitNOFILE=) and run again",
             (unsigned long long)rl.rlim_cur, (unsigned long long)need);
}

int main(int argc, char **argv)
{
    O.host = "127.0.0.1";
    O.port = 8080;
    O.subscribers = 1000;
    O.channels = 1;
    O.per_conn = 1;
    O.sub_path = "/sub/";
    O.ws_path = "/ws";
    O.pub_path = "/pub/";
    O.rate = 100;
    O.size = 64;
    O.duration = 10;
    O.warmup = 2;
    O.drain = 10;
    O.pubs = 1;
    O.pipeline = 32;
    O.window = 64;
    O.connect_rate = 2000;
    O.max_connecting = 512;
    O.threads = 1;
    O.connect_timeout = 120;
    O.kernel_ts = 1;
    const char *redis = "127.0.0.1:6379";

    enum {
        OPT_HOST = 256, OPT_PORT, OPT_SUBPATH, OPT_WSPATH, OPT_PUBPATH, OPT_PERCONN, OPT_SUB,
        OPT_CRATE, OPT_MAXCONN, OPT_SRC, OPT_CTIMEOUT, OPT_PUBLISH, OPT_REDIS, OPT_WARMUP,
        OPT_DRAIN, OPT_PUBS, OPT_PIPE, OPT_WINDOW, OPT_PREFIX, OPT_PID, OPT_JSON, OPT_LABEL,
        OPT_THREADS, OPT_RXTS
    };
    static const struct option lo[] = {
        {"host", 1, 0, OPT_HOST}, {"port", 1, 0, OPT_PORT}, {"sub-path", 1, 0, OPT_SUBPATH},
        {"ws-path", 1, 0, OPT_WSPATH}, {"pub-path", 1, 0, OPT_PUBPATH},
        {"subscribers", 1, 0, 'n'}, {"channels", 1, 0, 'k'}, {"per-conn", 1, 0, OPT_PERCONN},
        {"sub", 1, 0, OPT_SUB}, {"connect-rate", 1, 0, OPT_CRATE},
        {"max-connecting", 1, 0, OPT_MAXCONN}, {"source-addrs", 1, 0, OPT_SRC},
        {"connect-timeout", 1, 0, OPT_CTIMEOUT}, {"publish", 1, 0, OPT_PUBLISH},
        {"redis", 1, 0, OPT_REDIS}, {"rate", 1, 0, 'r'}, {"size", 1, 0, 's'},
        {"duration", 1, 0, 'd'}, {"warmup", 1, 0, OPT_WARMUP}, {"drain", 1, 0, OPT_DRAIN},
        {"publishers", 1, 0, OPT_PUBS}, {"pipeline", 1, 0, OPT_PIPE},
        {"window", 1, 0, OPT_WINDOW}, {"prefix", 1, 0, OPT_PREFIX},
        {"server-pid", 1, 0, OPT_PID}, {"json", 1, 0, OPT_JSON}, {"label", 1, 0, OPT_LABEL},
        {"threads", 1, 0, OPT_THREADS}, {"rx-time", 1, 0, OPT_RXTS}, {"quiet", 0, 0, 'q'}, {"help", 0, 0, 'h'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "n:k:r:s:d:qh", lo, NULL)) != -1) {
        switch (ch) {
        case OPT_HOST: O.host = optarg; break;
        case OPT_PORT: O.port = (int)parse_num(optarg, "--port"); break;
        case OPT_SUBPATH: O.sub_path = optarg; break;
        case OPT_WSPATH: O.ws_path = optarg; break;
        case OPT_PUBPATH: O.pub_path = optarg; break;
        case 'n': O.subscribers = (uint32_t)parse_num(optarg, "--subscribers"); break;
        case 'k': O.channels = (uint32_t)parse_num(optarg, "--channels"); break;
        case OPT_PERCONN: O.per_conn = (uint32_t)parse_num(optarg, "--per-conn"); break;
        case OPT_SUB:
            if (!strcmp(optarg, "raw"))
                O.sub_mode = SUB_RAW;
            else if (!strcmp(optarg, "ws"))
                O.sub_mode = SUB_WS;
            else
                die("--sub wants raw or ws");
            break;
        case OPT_CRATE: O.connect_rate = parse_num(optarg, "--connect-rate"); break;
        case OPT_MAXCONN: O.max_connecting = (uint32_t)parse_num(optarg, "--max-connecting"); break;
        case OPT_SRC: O.sources = (uint32_t)parse_num(optarg, "--source-addrs"); break;
        case OPT_CTIMEOUT: O.connect_timeout = parse_num(optarg, "--connect-timeout"); break;
        case OPT_PUBLISH:
            if (!strcmp(optarg, "http"))
                O.pub_mode = PUB_HTTP;
            else if (!strcmp(optarg, "ws"))
                O.pub_mode = PUB_WS;
            else if (!strcmp(optarg, "redis"))
                O.pub_mode = PUB_REDIS;
            else if (!strcmp(optarg, "none"))
                O.pub_mode = PUB_NONE;
            else
                die("--publish wants http, ws, redis or none");
            break;
        case OPT_REDIS: redis = optarg; break;
        case 'r': O.rate = !strcmp(optarg, "max") ? 0 : parse_num(optarg, "--rate"); break;
        case 's': O.size = (uint32_t)parse_num(optarg, "--size"); break;
        case 'd': O.duration = parse_num(optarg, "--duration"); break;
        case OPT_WARMUP: O.warmup = parse_num(optarg, "--warmup"); break;
        case OPT_DRAIN: O.drain = parse_num(optarg, "--drain"); break;
        case OPT_PUBS: O.pubs = (uint32_t)parse_num(optarg, "--publishers"); break;
        case OPT_PIPE: O.pipeline = (uint32_t)parse_num(optarg, "--pipeline"); break;
        case OPT_WINDOW: O.window = (uint32_t)parse_num(optarg, "--window"); break;
        case OPT_PREFIX: snprintf(O.prefix, sizeof O.prefix, "%s", optarg); break;
        case OPT_PID: {
            char *s = optarg, *end;
            while (*s && O.npids < MAX_PIDS) {
                long v = strtol(s, &end, 10);
                if (end == s || v <= 0)
                    die("--server-pid wants PID[,PID...]");
                O.pids[O.npids++] = (pid_t)v;
                s = *end == ',' ? end + 1 : end;
                if (*end && *end != ',')
                    die("--server-pid wants PID[,PID...]");
            }
            break;
        }
        case OPT_JSON: O.json = optarg; break;
        case OPT_LABEL: O.label = optarg; break;
        case OPT_THREADS: O.threads = (uint32_t)parse_num(optarg, "--threads"); break;
        case OPT_RXTS:
            if (!strcmp(optarg, "kernel"))
                O.kernel_ts = 1;
            else if (!strcmp(optarg, "read"))
                O.kernel_ts = 0;
            else
                die("--rx-time wants kernel or read");
            break;
        case 'q': O.quiet = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc)
        die("unexpected argument %s (see --help)", argv[optind]);
    if (!O.subscribers || !O.channels || !O.per_conn || O.per_conn > O.channels)
        die("need --subscribers >= 1, --channels >= 1 and 1 <= --per-conn <= --channels");
    if (O.sub_mode == SUB_RAW && O.per_conn > 255)
        die("--sub raw multiplexes at most 255 channels per connection");
    if (!O.pubs || O.pubs > MAX_PUBS)
        die("--publishers must be 1..%d", MAX_PUBS);
    if (!O.pipeline || !O.window)
        die("--pipeline and --window must be >= 1");
    if (!O.threads || O.threads > MAX_THREADS)
        die("--threads must be 1..%d", MAX_THREADS);
    if (O.threads > O.subscribers)
        O.threads = O.subscribers;
    if (O.connect_rate <= 0)
        O.connect_rate = 1e9;
    if (O.size > sizeof PAD)
        die("--size is at most %zu", sizeof PAD);
    if (!O.prefix[0]) {
        uint32_t r;
        getrandom(&r, sizeof r, 0);
        snprintf(O.prefix, sizeof O.prefix, "b%04x-", r & 0xffff);
    }
    struct sockaddr_in *ta = &TARGET;
    ta->sin_family = AF_INET;
    ta->sin_port = htons((uint16_t)O.port);
    if (inet_pton(AF_INET, O.host, &ta->sin_addr) != 1)
        die("--host must be an IPv4 address: %s", O.host);
    if (O.pub_mode == PUB_REDIS)
        parse_hostport(redis, &REDIS_ADDR, "--redis");
    O.redis_host = redis;

    uint64_t total_conns = (uint64_t)O.subscribers + O.pubs;
    NSRC = O.sources ? O.sources : (uint32_t)((total_conns + PER_SOURCE_ADDR - 1) / PER_SOURCE_ADDR);
    if (NSRC < 1)
        NSRC = 1;
    if (NSRC > 1 && (ntohl(ta->sin_addr.s_addr) >> 24) != 127)
        die("spreading over source addresses needs a 127.x.x.x target; use --source-addrs 1");
    if (NSRC > 1 && !O.quiet)
        note("spreading %" PRIu64 " connections over source addresses 127.0.0.2..127.0.0.%u", total_conns,
             1 + NSRC);
    raise_nofile(total_conns + 64);
    signal(SIGPIPE, SIG_IGN);
    memset(PAD, 'x', sizeof PAD);

    SUBS = zalloc(sizeof *SUBS * O.subscribers);
    TRACK = zalloc(sizeof *TRACK * (size_t)O.subscribers * O.per_conn * O.pubs);
    SEQ = zalloc(sizeof *SEQ * (size_t)O.pubs * O.channels);
    CHAN_SUBS = zalloc(sizeof *CHAN_SUBS * O.channels);
    W = zalloc(sizeof *W * O.threads);
    uint64_t seed;
    getrandom(&seed, sizeof seed, 0);
    for (uint32_t i = 0; i < O.subscribers; i++) {
        SUBS[i].idx = i;
        SUBS[i].io.fd = -1;
    }
    for (uint32_t t = 0; t < O.threads; t++) {
        struct worker *w = &W[t];
        w->id = (int)t;
        w->loop = t == 0 ? ev_default_loop(EVFLAG_AUTO) : ev_loop_new(EVFLAG_AUTO);
        if (!w->loop)
            die("cannot create an event loop");
        w->rbuf = zalloc(RBUF_SIZE);
        w->first = (uint32_t)((uint64_t)O.subscribers * t / O.threads);
        w->count = (uint32_t)((uint64_t)O.subscribers * (t + 1) / O.threads) - w->first;
        w->rng = seed ^ (0x9e3779b97f4a7c15ull * (t + 1));
        if (!w->rng)
            w->rng = 1;
        ev_timer_init(&w->tick, worker_tick, 0.005, 0.01);
        w->tick.data = w;
        ev_timer_start(w->loop, &w->tick);
    }
    for (uint32_t i = 0; i < O.pubs; i++) {
        PUBS[i].id = i;
        PUBS[i].fd = -1;
    }

    update_rt_offset();
    C.t0 = now_ns();
    C.rss_before = server_rss_kb();
    C.rss_peak = C.rss_before;
    C.prog_last_at = C.t0;
    C.prog_last_cpu = server_cpu_ns();
    set_phase(PH_CONNECT);
    struct ev_loop *l0 = W[0].loop;
    ev_prepare_init(&C.pump, pump_prepare_cb);
    ev_timer_init(&C.ctl_timer, ctl_cb, 0.01, 0.01);
    ev_timer_start(l0, &C.ctl_timer);
    ev_timer_init(&C.prog_timer, prog_cb, 1.0, 1.0);
    ev_timer_start(l0, &C.prog_timer);
    ev_signal_init(&C.sigint, sig_cb, SIGINT);
    ev_signal_start(l0, &C.sigint);
    ev_signal_init(&C.sigterm, sig_cb, SIGTERM);
    ev_signal_start(l0, &C.sigterm);
    if (!O.quiet)
        note("connecting %" PRIu32 " subscribers to %s:%d at %.0f/s", O.subscribers, O.host, O.port,
             O.connect_rate);

    for (uint32_t t = 1; t < O.threads; t++)
        if (pthread_create(&W[t].thread, NULL, worker_main, &W[t]))
            die("pthread_create failed");
    ev_run(l0, 0);
    STORE(g_stop, 1);
    for (uint32_t t = 1; t < O.threads; t++)
        pthread_join(W[t].thread, NULL);
    if (!O.quiet)
        progress(now_ns());
    report();
    uint64_t losses = 0, unique = TOTAL(deliveries) - TOTAL(duplicates);
    if (C.expected > unique)
        losses = C.expected - unique;
    return C.ready_subs == 0 ? 1 : (losses || TOTAL(duplicates) ? 3 : 0);
}
