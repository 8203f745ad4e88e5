/* Unit tests of channel.c and conn.c: name validation, and fan-out driven over socket pairs with
 * the peer side parsed by the client-role frame parser. */
#include "channel.h"
#include "config.h"
#include "conn.h"
#include "deflate.h"
#include "route.h"
#include "stats.h"
#include "test.h"
#include "ws.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct ev_loop *loop;

static void no_read(struct conn *c) { (void)c; }
static void no_timeout(struct conn *c) { conn_touch(c); }
static void detach(struct conn *c, uint16_t code, const char *reason) { chan_unsubscribe_all(c); }

struct peer {
    struct conn *conn;
    int fd; /* our end, reading what the broker wrote */
    struct ws_parser wp;
    uint8_t pending[1 << 16];
    size_t pending_len;
};

static void peer_open(struct peer *p, struct route *r)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    fcntl(sv[0], F_SETFL, O_NONBLOCK);
    fcntl(sv[1], F_SETFL, O_NONBLOCK);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    p->conn = conn_new(sv[0], (struct sockaddr *)&addr, sizeof(addr));
    p->conn->state = CONN_WS;
    p->conn->route = route_ref(r);
    p->fd = sv[1];
    ws_parser_init(&p->wp, WS_ROLE_CLIENT, 1 << 24);
    p->pending_len = 0;
}

/* Read everything available and collect whole messages ("text" payloads joined by '|'); the close
 * code, if a close frame came, goes to *close_code. Returns the number of messages. */
static int peer_read(struct peer *p, char *out, size_t cap, uint16_t *close_code)
{
    int messages = 0;
    size_t out_len = 0;
    out[0] = 0;
    for (;;) {
        ssize_t n = read(p->fd, p->pending + p->pending_len, sizeof(p->pending) - p->pending_len);
        if (n <= 0)
            break;
        p->pending_len += (size_t)n;
        size_t off = 0;
        for (;;) {
            struct ws_event ev;
            size_t used;
            int got = ws_parse(&p->wp, p->pending + off, p->pending_len - off, &used, &ev);
            off += used;
            if (!got)
                break;
            if (ev.type == WS_EV_DATA) {
                if (out_len + ev.len + 2 < cap) {
                    memcpy(out + out_len, ev.data, ev.len);
                    out_len += ev.len;
                    if (ev.fin)
                        out[out_len++] = '|';
                    out[out_len] = 0;
                }
                messages += ev.fin;
            } else if (ev.type == WS_EV_CLOSE && close_code) {
                *close_code = ev.code;
            } else if (ev.type == WS_EV_ERROR) {
                CHECK(!"peer saw a malformed stream");
                return -1;
            }
        }
        memmove(p->pending, p->pending + off, p->pending_len - off);
        p->pending_len -= off;
    }
    return messages;
}

static void publish(const char *channel, const char *text)
{
    struct chan_msg m = {.channel = channel, .channel_len = strlen(channel), .data = text,
                         .len = strlen(text), .utf8 = -1, .json = -1};
    chan_publish(&m, NULL);
}

static void pass(void)
{
    chan_settle();
    conn_flush_all();
}

static void test_names(void)
{
    const char *why;
    char long_name[202];
    memset(long_name, 'a', sizeof(long_name));
    CHECK(chan_name_valid("a", 1, &why));
    CHECK(chan_name_valid("Az09_-.:/", 9, &why));
    CHECK(chan_name_valid(long_name, 200, &why));
    CHECK(!chan_name_valid(long_name, 201, &why));
    CHECK(!chan_name_valid("", 0, &why));
    CHECK(!chan_name_valid("a b", 3, &why));
    CHECK(!chan_name_valid("a\0b", 3, &why));
    CHECK(!chan_name_valid("caf\xc3\xa9", 5, &why));
    CHECK(!chan_name_valid("a?b", 3, &why));
    CHECK(!chan_name_valid("a*", 2, &why));
}

static void test_fanout(struct route *raw)
{
    struct peer a, b, c;
    char got[4096];
    peer_open(&a, raw);
    peer_open(&b, raw);
    peer_open(&c, raw);
    CHECK_EQ(chan_subscribe(a.conn, "news", 4), 1);
    CHECK_EQ(chan_subscribe(a.conn, "news", 4), 0);
    chan_subscribe(b.conn, "news", 4);
    chan_subscribe(c.conn, "other", 5);
    uint64_t out_before = stats.messages_out;

    publish("news", "one");
    publish("news", "two");
    publish("news", "three");
    chan_settle();
    /* Both subscribers hold a reference to the same block: one encoding, shared. */
    CHECK_EQ(a.conn->q_len, 1);
    CHECK_EQ(b.conn->q_len, 1);
    CHECK(a.conn->q[a.conn->q_head].blk == b.conn->q[b.conn->q_head].blk);
    CHECK_EQ(c.conn->q_len, 0);
    conn_flush_all();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 3);
    CHECK(strcmp(got, "one|two|three|") == 0);
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 3);
    CHECK_EQ(peer_read(&c, got, sizeof(got), NULL), 0);
    CHECK_EQ(stats.messages_out - out_before, 6);

    /* Joining in the middle of a pass: only what is published after it. */
    publish("news", "four");
    chan_subscribe(c.conn, "news", 4);
    publish("news", "five");
    /* Leaving in the middle: what was published while subscribed still arrives. */
    chan_unsubscribe(a.conn, "news", 4);
    publish("news", "six");
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 2);
    CHECK(strcmp(got, "four|five|") == 0);
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 3);
    CHECK(strcmp(got, "four|five|six|") == 0);
    CHECK_EQ(peer_read(&c, got, sizeof(got), NULL), 2);
    CHECK(strcmp(got, "five|six|") == 0);

    size_t subs;
    uint64_t seq;
    chan_info("news", 4, &subs, &seq);
    CHECK_EQ(subs, 2);
    CHECK_EQ(seq, 6);

    conn_close_now(a.conn);
    conn_close_now(b.conn);
    conn_close_now(c.conn);
    pass();
    CHECK_EQ(chan_subscription_count(), 0);
    close(a.fd);
    close(b.fd);
    close(c.fd);
}

/* A reply to one connection queues that connection's part of the pass before it, and nothing of
 * anyone else's: x's subscriber still gets the pass's three messages as one region of one block. */
static void test_settle_for(struct route *raw)
{
    struct peer a, p;
    char got[4096];
    peer_open(&a, raw);
    peer_open(&p, raw);
    chan_subscribe(a.conn, "sf.x", 4);
    chan_subscribe(p.conn, "sf.y", 4);
    chan_psubscribe(p.conn, "sf.z.*", 6);
    uint64_t out_before = stats.messages_out;
    publish("sf.x", "1");
    chan_settle_for(p.conn);
    publish("sf.x", "2");
    publish("sf.y", "a");
    publish("sf.z.q", "b");
    chan_settle_for(p.conn);
    conn_send_frame(p.conn, WS_OP_TEXT, "reply", 5);
    publish("sf.x", "3");
    publish("sf.y", "c");
    chan_settle_for(p.conn);
    chan_settle();
    CHECK_EQ(a.conn->q_len, 1);
    CHECK_EQ(stats.messages_out - out_before, 6);
    conn_flush_all();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 3);
    CHECK(strcmp(got, "1|2|3|") == 0);
    CHECK_EQ(peer_read(&p, got, sizeof(got), NULL), 4);
    /* Each channel's messages before the reply (in no set order across channels). */
    CHECK(strcmp(got, "a|b|reply|c|") == 0 || strcmp(got, "b|a|reply|c|") == 0);

    /* A shared batch that fills up is handed out to its own group's subscribers alone. */
    chan_subscribe(p.conn, "sf.x", 4);
    publish("sf.x", "4");
    chan_settle_for(p.conn); /* p now shares sf.x's batch */
    publish("sf.y", "d");
    char payload[301], want[8192] = "4|";
    memset(payload, 'x', 300);
    payload[300] = 0;
    for (int i = 0; i < 20; i++) {
        payload[0] = (char)('a' + i);
        publish("sf.x", payload);
        strcat(want, payload);
        strcat(want, "|");
    }
    conn_flush_all();
    static char big[16384], rest[16384];
    int n = peer_read(&p, big, sizeof(big), NULL);
    CHECK(n > 1 && n < 21 && strncmp(big, want, strlen(big)) == 0); /* sf.y's "d" waits */
    chan_settle();
    conn_flush_all();
    CHECK_EQ(peer_read(&p, rest, sizeof(rest), NULL), 22 - n);
    CHECK(strstr(rest, "d|") != NULL);
    CHECK_EQ(peer_read(&a, big, sizeof(big), NULL), 21);
    CHECK(strcmp(big, want) == 0);
    conn_close_now(a.conn);
    conn_close_now(p.conn);
    pass();
    close(a.fd);
    close(p.fd);
}

/* A subscriber that stops reading is closed with 1013, and the stream it was sent up to then is
 * still well-formed; another subscriber loses nothing. */
static void test_slow_consumer(struct route *raw)
{
    struct conn_limits lim = *conn_get_limits();
    lim.send_queue = 64 * 1024;
    conn_set_limits(&lim);
    struct peer slow, fast;
    peer_open(&slow, raw);
    peer_open(&fast, raw);
    chan_subscribe(slow.conn, "flood", 5);
    chan_subscribe(fast.conn, "flood", 5);
    uint64_t dropped = stats.slow_consumers_dropped;
    char payload[1024];
    memset(payload, 'x', sizeof(payload) - 1);
    payload[sizeof(payload) - 1] = 0;
    static char got[1 << 20];
    int fast_count = 0;
    for (int i = 0; i < 2000 && stats.slow_consumers_dropped == dropped; i++) {
        publish("flood", payload);
        pass();
        int n = peer_read(&fast, got, sizeof(got), NULL);
        CHECK(n >= 0);
        fast_count += n;
    }
    CHECK_EQ(stats.slow_consumers_dropped, dropped + 1);
    uint16_t code = 0;
    for (int i = 0; i < 100 && !code; i++) {
        CHECK(peer_read(&slow, got, sizeof(got), &code) >= 0);
        ev_run(loop, EVRUN_NOWAIT); /* the rest goes out as the socket becomes writable */
        pass();
    }
    CHECK_EQ(code, WS_CLOSE_TRY_AGAIN);
    publish("flood", "after");
    pass();
    fast_count += peer_read(&fast, got, sizeof(got), NULL);
    size_t subs;
    uint64_t seq;
    chan_info("flood", 5, &subs, &seq);
    CHECK_EQ(fast_count, (int)seq);
    CHECK_EQ(subs, 1);
    conn_close_now(fast.conn);
    conn_close_now(slow.conn);
    pass();
    close(slow.fd);
    close(fast.fd);
}

/* Nothing is queued to a connection whose write side is shut down: small frames, nor large ones,
 * whose block is queued without the small-copy path. */
static void test_send_after_shutdown(struct route *raw)
{
    struct peer a;
    static char big[8192];
    memset(big, 'x', sizeof(big));
    peer_open(&a, raw);
    a.conn->state = CONN_LINGER;
    conn_send_frame(a.conn, WS_OP_TEXT, "small", 5);
    conn_send_frame(a.conn, WS_OP_TEXT, big, sizeof(big));
    CHECK_EQ(a.conn->q_len, 0);
    CHECK(!a.conn->on_flush_list);
    conn_close_now(a.conn);
    pass();
    close(a.fd);
}

/* Read every whole message p has been sent into out ("|" after each), inflating compressed ones
 * with f; *compressed counts those. Returns the number of messages, -1 on anything else. */
static int peer_read_deflate(struct peer *p, struct pmd_inflater *f, char *out, size_t cap, int *compressed)
{
    int messages = 0;
    size_t out_len = 0;
    struct buf msg = {0};
    out[0] = 0;
    for (;;) {
        ssize_t n = read(p->fd, p->pending + p->pending_len, sizeof(p->pending) - p->pending_len);
        if (n <= 0)
            break;
        p->pending_len += (size_t)n;
        size_t off = 0;
        for (;;) {
            struct ws_event ev;
            size_t used;
            const char *why;
            int got = ws_parse(&p->wp, p->pending + off, p->pending_len - off, &used, &ev);
            off += used;
            if (!got)
                break;
            if (ev.type != WS_EV_DATA) {
                CHECK(!"peer saw something other than data");
                buf_free(&msg);
                return -1;
            }
            if (ev.compressed)
                CHECK_EQ(pmd_inflate(f, ev.data, ev.len, ev.fin, 1, &msg, 1 << 20, &why), 0);
            else
                buf_append(&msg, ev.data, ev.len);
            if (ev.fin) {
                if (out_len + msg.len + 2 < cap) {
                    memcpy(out + out_len, msg.data, msg.len);
                    out_len += msg.len;
                    out[out_len++] = '|';
                    out[out_len] = 0;
                }
                messages++;
                *compressed += ev.compressed;
                msg.len = 0;
            }
        }
        memmove(p->pending, p->pending + off, p->pending_len - off);
        p->pending_len -= off;
    }
    buf_free(&msg);
    return messages;
}

/* Subscribers that negotiated permessage-deflate get each message compressed once per window size,
 * shared by reference like the plain frame; short messages go uncompressed; plain subscribers of
 * the same channel and route are unaffected. */
static void test_fanout_deflate(void)
{
    struct route *r = route_new(ROUTE_RAW, "/z/");
    r->deflate = 1;
    r->deflate_min_size = 20;
    struct peer z1, z2, z10, plain;
    struct peer *all[] = {&z1, &z2, &z10, &plain};
    static const uint8_t bits[] = {15, 15, 10, 0};
    struct pmd_inflater *inflaters[4];
    for (int i = 0; i < 4; i++) {
        peer_open(all[i], r);
        all[i]->conn->pmd.server_bits = bits[i]; /* as the handshake sets it */
        all[i]->wp.deflate = bits[i] != 0;        /* the plain peer fails on any RSV1 */
        inflaters[i] = pmd_inflater_new(1);
        CHECK_EQ(chan_subscribe(all[i]->conn, "zipped", 6), 1);
    }
    const char *a = "a message long enough to be compressed: compressed, compressed, compressed";
    const char *b = "and another one, long enough to be compressed too: too, too, too, too";
    uint64_t before = pmd_stats.compressed, plain_before = pmd_stats.not_compressed;
    publish("zipped", a);
    publish("zipped", "short");
    publish("zipped", b);
    chan_settle();
    /* Two messages, two window sizes: four compressions, whatever the number of subscribers. */
    CHECK_EQ(pmd_stats.compressed - before, 4);
    CHECK_EQ(pmd_stats.not_compressed - plain_before, 2);
    for (int i = 0; i < 4; i++)
        CHECK_EQ(all[i]->conn->q_len, 1);
    struct block *blk[4];
    for (int i = 0; i < 4; i++)
        blk[i] = all[i]->conn->q[all[i]->conn->q_head].blk;
    CHECK(blk[0] == blk[1]);
    CHECK(blk[0] != blk[2] && blk[0] != blk[3] && blk[2] != blk[3]);
    conn_flush_all();
    char expect[512], got[4096];
    snprintf(expect, sizeof(expect), "%s|short|%s|", a, b);
    for (int i = 0; i < 4; i++) {
        int compressed = 0;
        CHECK_EQ(peer_read_deflate(all[i], inflaters[i], got, sizeof(got), &compressed), 3);
        CHECK(strcmp(got, expect) == 0);
        CHECK_EQ(compressed, bits[i] ? 2 : 0);
    }
    /* A subscriber that joins later with a window already in use joins that group. */
    struct peer late;
    peer_open(&late, r);
    late.conn->pmd.server_bits = 10;
    late.wp.deflate = 1;
    chan_subscribe(late.conn, "zipped", 6);
    publish("zipped", a);
    chan_settle();
    CHECK(late.conn->q[late.conn->q_head].blk == z10.conn->q[z10.conn->q_head].blk);
    conn_flush_all();
    struct pmd_inflater *lf = pmd_inflater_new(1);
    int compressed = 0;
    CHECK_EQ(peer_read_deflate(&late, lf, got, sizeof(got), &compressed), 1);
    CHECK_EQ(compressed, 1);
    pmd_inflater_free(lf);
    conn_close_now(late.conn);
    close(late.fd);
    for (int i = 0; i < 4; i++) {
        conn_close_now(all[i]->conn);
        close(all[i]->fd);
        pmd_inflater_free(inflaters[i]);
    }
    pass();
    CHECK_EQ(chan_subscription_count(), 0);
    route_unref(r);
}

/* Pattern subscribers with permessage-deflate: the message compressed once per window, shared
 * with the channel's own compressed subscribers' window, plain for plain ones. */
static void test_pattern_deflate(void)
{
    struct route *r = route_new(ROUTE_RAW, "/z/");
    r->deflate = 1;
    r->deflate_min_size = 20;
    struct peer exact, p15a, p15b, p10, plain;
    struct peer *all[] = {&exact, &p15a, &p15b, &p10, &plain};
    static const uint8_t bits[] = {15, 15, 15, 10, 0};
    struct pmd_inflater *inflaters[5];
    for (int i = 0; i < 5; i++) {
        peer_open(all[i], r);
        all[i]->conn->pmd.server_bits = bits[i];
        all[i]->wp.deflate = bits[i] != 0;
        inflaters[i] = pmd_inflater_new(1);
        if (i == 0)
            CHECK_EQ(chan_subscribe(all[i]->conn, "zp.a", 4), 1);
        else
            CHECK_EQ(chan_psubscribe(all[i]->conn, "zp.*", 4), 1);
    }
    const char *a = "a message long enough to be compressed: compressed, compressed, compressed";
    uint64_t before = pmd_stats.compressed;
    publish("zp.a", a);
    publish("zp.b", a); /* nobody subscribes to the channel itself */
    chan_settle();
    /* zp.a: window 15 for the channel group, reused by the pattern's; window 10. zp.b: 15, 10. */
    CHECK_EQ(pmd_stats.compressed - before, 4);
    CHECK(p15a.conn->q[p15a.conn->q_head].blk == p15b.conn->q[p15b.conn->q_head].blk);
    CHECK(p15a.conn->q[p15a.conn->q_head].blk != p10.conn->q[p10.conn->q_head].blk);
    conn_flush_all();
    char expect[512], got[4096];
    for (int i = 0; i < 5; i++) {
        int compressed = 0;
        int n = i ? 2 : 1;
        snprintf(expect, sizeof(expect), i ? "%s|%s|" : "%s|", a, a);
        CHECK_EQ(peer_read_deflate(all[i], inflaters[i], got, sizeof(got), &compressed), n);
        CHECK(strcmp(got, expect) == 0);
        CHECK_EQ(compressed, bits[i] ? n : 0);
    }
    for (int i = 0; i < 5; i++) {
        conn_close_now(all[i]->conn);
        close(all[i]->fd);
        pmd_inflater_free(inflaters[i]);
    }
    pass();
    route_unref(r);
}

/* A figure from the "patterns" or "presence" object of /stats. */
static unsigned long long figure(const char *section, const char *name)
{
    struct buf b = {0};
    stats_render_json(&b);
    buf_append(&b, "", 1);
    char key[64];
    snprintf(key, sizeof(key), "\"%s\":{", section);
    const char *p = strstr(b.data, key);
    p = p ? p + strlen(key) : NULL;
    snprintf(key, sizeof(key), "\"%s\":", name);
    p = p ? strstr(p, key) : NULL;
    unsigned long long v = p ? strtoull(p + strlen(key), NULL, 10) : ~0ull;
    buf_free(&b);
    return v;
}

/* Pattern subscribers: matching channels only; one shared block per pattern group per pass; each
 * message once per connection however many of its subscriptions match; order kept per channel
 * when subscriptions change in the middle of a pass. */
static void test_patterns(struct route *raw)
{
    struct peer a, b, c;
    char got[4096];
    peer_open(&a, raw);
    peer_open(&b, raw);
    peer_open(&c, raw);
    unsigned long long walks = figure("patterns", "walks");
    publish("s.x.temp", "before"); /* nobody has a pattern: the trie is not looked at */
    CHECK_EQ(figure("patterns", "walks"), walks);
    CHECK_EQ(chan_psubscribe(a.conn, "s.*.temp", 8), 1);
    CHECK_EQ(chan_psubscribe(a.conn, "s.*.temp", 8), 0);
    CHECK_EQ(chan_psubscribe(b.conn, "s.*.temp", 8), 1);
    CHECK_EQ(figure("patterns", "subscriptions"), 2);
    CHECK_EQ(figure("patterns", "patterns"), 1);
    publish("s.x.temp", "1");
    publish("s.y.temp", "2");
    publish("s.y.hum", "no");
    publish("s.x.y.temp", "no");
    publish("s.z.temp", "3");
    chan_settle();
    /* Adjacent frames: one queue entry each, the same block for both. */
    CHECK_EQ(a.conn->q_len, 1);
    CHECK_EQ(b.conn->q_len, 1);
    CHECK(a.conn->q[a.conn->q_head].blk == b.conn->q[b.conn->q_head].blk);
    conn_flush_all();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 3);
    CHECK(strcmp(got, "1|2|3|") == 0);
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 3);
    CHECK(strcmp(got, "1|2|3|") == 0);

    /* Overlap: c subscribes to the channel, to two patterns matching it and to one that does not. */
    chan_subscribe(c.conn, "s.x.temp", 8);
    chan_psubscribe(c.conn, "s.>", 3);
    chan_psubscribe(c.conn, "*.x.*", 5);
    chan_psubscribe(c.conn, "q.*", 3);
    CHECK_EQ(c.conn->npsubs, 3);
    publish("s.x.temp", "4");  /* the channel subscription: once */
    publish("s.y.temp", "5");  /* s.> only (for c) */
    publish("t.x.u", "6");     /* *.x.* only */
    publish("s.x.u", "7");     /* s.> and *.x.*: once */
    pass();
    CHECK_EQ(peer_read(&c, got, sizeof(got), NULL), 4);
    /* Each once; the order is kept per channel, not across channels. */
    CHECK(strlen(got) == 8 && strstr(got, "4|") && strstr(got, "5|") && strstr(got, "6|") &&
          strstr(got, "7|"));
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 2);
    CHECK(strcmp(got, "4|5|") == 0);
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 2);

    /* Mid-pass changes keep each channel's order: the channel subscription goes, comes, goes. */
    chan_unsubscribe(c.conn, "s.x.temp", 8);
    publish("s.x.temp", "8");    /* through a pattern now */
    chan_subscribe(c.conn, "s.x.temp", 8);
    publish("s.x.temp", "9");    /* through the channel */
    chan_unsubscribe(c.conn, "s.x.temp", 8);
    publish("s.x.temp", "10");   /* a pattern again */
    chan_punsubscribe(c.conn, "s.>", 3);
    publish("s.x.temp", "11");   /* still *.x.* */
    chan_punsubscribe(c.conn, "*.x.*", 5);
    publish("s.x.temp", "12");   /* nothing for c */
    pass();
    CHECK_EQ(peer_read(&c, got, sizeof(got), NULL), 4);
    CHECK(strcmp(got, "8|9|10|11|") == 0);
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 5);
    CHECK(strcmp(got, "8|9|10|11|12|") == 0);
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 5);

    /* The subscription limit counts patterns too. */
    chan_init(300, 2);
    CHECK_EQ(c.conn->nsubs + c.conn->npsubs, 1);
    CHECK_EQ(chan_subscribe(c.conn, "one", 3), 1);
    CHECK_EQ(chan_psubscribe(c.conn, "two.*", 5), -1);
    CHECK_EQ(chan_subscribe(c.conn, "three", 5), -1);
    chan_init(300, 1000);

    /* Closing drops every subscription, and the trie empties. */
    conn_close_now(a.conn);
    conn_close_now(b.conn);
    conn_close_now(c.conn);
    pass();
    CHECK_EQ(figure("patterns", "subscriptions"), 0);
    CHECK_EQ(figure("patterns", "trie_nodes"), 0);
    CHECK_EQ(chan_subscription_count(), 0);
    walks = figure("patterns", "walks");
    publish("s.x.temp", "after");
    CHECK_EQ(figure("patterns", "walks"), walks);
    close(a.fd);
    close(b.fd);
    close(c.fd);
}

/* Channel and pattern subscribers on different routes each get the message as their route makes
 * it, whichever of them made it first. */
static void test_pattern_routes(struct route *raw)
{
    struct route *ps = route_new(ROUTE_PUBSUB, "/ws");
    struct peer a, b, c;
    char got[4096];
    peer_open(&a, raw);
    peer_open(&b, ps);
    peer_open(&c, raw);
    chan_subscribe(a.conn, "pr.x", 4);
    chan_psubscribe(b.conn, "pr.*", 4);
    chan_psubscribe(c.conn, "pr.*", 4);
    publish("pr.x", "hi");
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 1);
    CHECK(strcmp(got, "hi|") == 0);
    CHECK_EQ(peer_read(&c, got, sizeof(got), NULL), 1);
    CHECK(strcmp(got, "hi|") == 0);
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 1);
    CHECK(strcmp(got, "{\"op\":\"message\",\"channel\":\"pr.x\",\"seq\":1,\"data\":\"hi\"}|") == 0);
    conn_close_now(a.conn);
    conn_close_now(b.conn);
    conn_close_now(c.conn);
    pass();
    close(a.fd);
    close(b.fd);
    close(c.fd);
    route_unref(ps);
}

/* Whether a pattern with subscribers matches a channel: from a known channel's cached matches,
 * else through the trie. */
static void test_pattern_wanted(struct route *raw)
{
    struct peer a;
    peer_open(&a, raw);
    CHECK_EQ(chan_pattern_wanted("w.a", 3), 0);
    chan_psubscribe(a.conn, "w.*", 3);
    publish("w.a", "1"); /* known, its matches cached */
    unsigned long long walks = figure("patterns", "walks");
    CHECK_EQ(chan_pattern_wanted("w.a", 3), 1);
    CHECK_EQ(figure("patterns", "walks"), walks);
    CHECK_EQ(chan_pattern_wanted("w.b", 3), 1);
    CHECK_EQ(chan_pattern_wanted("x.a", 3), 0);
    CHECK_EQ(figure("patterns", "walks"), walks + 2);
    chan_psubscribe(a.conn, "q.*", 3);
    chan_punsubscribe(a.conn, "w.*", 3); /* the cache is stale now */
    pass();
    CHECK_EQ(chan_pattern_wanted("w.a", 3), 0);
    conn_close_now(a.conn);
    pass();
    close(a.fd);
}

/* A pattern group's batch fills up while others hold it: it is handed out and a new one started,
 * and every subscriber still gets every message once, from blocks they share. */
static void test_pattern_batch_full(struct route *raw)
{
    struct peer a, b;
    static char got[1 << 16];
    peer_open(&a, raw);
    peer_open(&b, raw);
    chan_psubscribe(a.conn, "f.*", 3);
    chan_subscribe(a.conn, "f.x", 3); /* a's f.x comes through the channel: its f.* regions break */
    chan_psubscribe(b.conn, "f.*", 3);
    char payload[301];
    char want_a_x[1 << 15] = "", want_a_y[1 << 15] = "", want_b[1 << 16] = "";
    for (int i = 0; i < 40; i++) {
        memset(payload, 'a' + i % 26, 300);
        payload[300] = 0;
        snprintf(payload, sizeof(payload), "%02d", i);
        payload[2] = '-';
        const char *ch = i % 2 ? "f.y" : "f.x";
        publish(ch, payload);
        strcat(i % 2 ? want_a_y : want_a_x, payload);
        strcat(i % 2 ? want_a_y : want_a_x, "|");
        strcat(want_b, payload);
        strcat(want_b, "|");
    }
    chan_settle();
    /* b's frames are in a few blocks; a's f.y frames are the very bytes b is given (one frame
     * per message in the pattern's batch, not one per subscriber). */
    CHECK(b.conn->q_len <= 4);
    int shared = 0;
    for (uint32_t k = 0; k < a.conn->q_len; k++) {
        struct conn_qitem *x = &a.conn->q[(a.conn->q_head + k) & (a.conn->q_cap - 1)];
        int same_block = 0, covered = 0;
        for (uint32_t i = 0; i < b.conn->q_len; i++) {
            struct conn_qitem *y = &b.conn->q[(b.conn->q_head + i) & (b.conn->q_cap - 1)];
            same_block |= x->blk == y->blk;
            covered |= x->blk == y->blk && y->off <= x->off && x->off + x->len <= y->off + y->len;
        }
        CHECK(covered == same_block);
        shared += same_block;
    }
    CHECK(shared >= 10);
    conn_flush_all();
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 40);
    CHECK(strcmp(got, want_b) == 0);
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 40);
    /* Per channel, in order. */
    char x[1 << 15] = "", y[1 << 15] = "";
    for (char *tok = strtok(got, "|"); tok; tok = strtok(NULL, "|")) {
        int i = atoi(tok);
        strcat(i % 2 ? y : x, tok);
        strcat(i % 2 ? y : x, "|");
    }
    CHECK(strcmp(x, want_a_x) == 0);
    CHECK(strcmp(y, want_a_y) == 0);
    conn_close_now(a.conn);
    conn_close_now(b.conn);
    pass();
    close(a.fd);
    close(b.fd);
}

/* Large messages in one pass: a channel's batch and a pattern's are handed out before they pass
 * CHAN_BATCH_MAX (a queue entry counts bytes in 32 bits); the regions queued hold every frame. */
static void test_batch_cap(struct route *raw)
{
    struct peer a, b;
    peer_open(&a, raw);
    peer_open(&b, raw);
    chan_subscribe(a.conn, "cap.x", 5);
    chan_psubscribe(b.conn, "cap.*", 5);
    size_t len = CHAN_BATCH_MAX / 4;
    char *payload = malloc(len);
    memset(payload, 'x', len);
    for (int i = 0; i < 5; i++) {
        payload[0] = (char)('0' + i);
        struct chan_msg m = {.channel = "cap.x", .channel_len = 5, .data = payload, .len = len,
                             .utf8 = 1, .json = 0};
        chan_publish(&m, NULL);
    }
    chan_settle();
    /* Three frames and their headers fit; a fourth would pass the cap. */
    struct peer *all[] = {&a, &b};
    for (int k = 0; k < 2; k++) {
        struct conn *c = all[k]->conn;
        CHECK_EQ(c->q_len, 2);
        size_t total = 0;
        for (uint32_t i = 0; i < c->q_len; i++) {
            struct conn_qitem *it = &c->q[(c->q_head + i) & (c->q_cap - 1)];
            CHECK(it->len <= CHAN_BATCH_MAX);
            total += it->len;
        }
        CHECK_EQ(total, 5 * (len + 10)); /* a 10-byte header each */
    }
    free(payload);
    conn_close_now(a.conn);
    conn_close_now(b.conn);
    pass();
    close(a.fd);
    close(b.fd);
}

static void member_cb(const char *id, size_t id_len, const char *info, size_t info_len,
                      struct conn *local, void *arg)
{
    struct buf *b = arg;
    buf_printf(b, "%.*s=%.*s;", (int)id_len, id, (int)info_len, info);
}

/* Presence: members with their info in the order they joined, join and leave events to listeners
 * only, a leave when the connection goes. */
static void test_presence(struct route *raw)
{
    struct peer a, b;
    char got[4096];
    peer_open(&a, raw);
    peer_open(&b, raw);
    CHECK_EQ(chan_presence_set(a.conn, "room", 4, 1, 1, NULL, 0), -1); /* not subscribed */
    chan_subscribe(a.conn, "room", 4);
    chan_subscribe(b.conn, "room", 4);
    CHECK_EQ(chan_presence_set(a.conn, "room", 4, -1, 1, NULL, 0), 0);
    CHECK_EQ(chan_presence_set(b.conn, "room", 4, 1, -1, "{\"n\":\"bob\"}", 11), 0);
    CHECK_EQ(chan_presence_set(a.conn, "room", 4, 1, -1, "{}", 2), 0);
    struct buf list = {0};
    chan_presence_foreach("room", 4, member_cb, &list);
    buf_append(&list, "", 1);
    char want[256];
    snprintf(want, sizeof(want), "%s:%llu={\"n\":\"bob\"};%s:%llu={};", chan_node_id(),
             (unsigned long long)b.conn->id, chan_node_id(), (unsigned long long)a.conn->id);
    CHECK(strcmp(list.data, want) == 0);
    buf_free(&list);
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 2); /* both joins, its own too */
    CHECK(strstr(got, "\"op\":\"join\",\"channel\":\"room\"") && strstr(got, "\"info\":{\"n\":\"bob\"}"));
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 0); /* not a listener */
    CHECK_EQ(figure("presence", "members"), 2);
    CHECK_EQ(figure("presence", "listeners"), 1);
    conn_close_now(b.conn);
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 1);
    CHECK(strstr(got, "\"op\":\"leave\"") != NULL);
    CHECK_EQ(figure("presence", "members"), 1);
    chan_unsubscribe(a.conn, "room", 4);
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 0); /* not told of its own leave */
    CHECK_EQ(figure("presence", "members"), 0);
    CHECK_EQ(figure("presence", "channels"), 0);
    conn_close_now(a.conn);
    pass();
    close(a.fd);
    close(b.fd);
}

/* A join reaches a listener after what was published to it before in the same pass and before
 * what follows, while another channel's batch of the pass goes on gathering. */
static void test_presence_order(struct route *raw)
{
    struct peer l, m, o;
    char got[4096];
    peer_open(&l, raw);
    peer_open(&m, raw);
    peer_open(&o, raw);
    chan_subscribe(l.conn, "lobby", 5);
    chan_presence_set(l.conn, "lobby", 5, -1, 1, NULL, 0);
    chan_subscribe(o.conn, "other", 5);
    pass();
    publish("lobby", "before");
    publish("other", "o1");
    chan_subscribe(m.conn, "lobby", 5);
    chan_presence_set(m.conn, "lobby", 5, 1, -1, NULL, 0);
    publish("lobby", "after");
    publish("other", "o2");
    CHECK_EQ(o.conn->q_len, 0); /* not given its part yet: the join did not cut its batch */
    pass();
    CHECK_EQ(peer_read(&l, got, sizeof(got), NULL), 3);
    CHECK(strncmp(got, "before|{\"op\":\"join\"", 19) == 0);
    size_t n = strlen(got);
    CHECK(n > 8 && strcmp(got + n - 8, "}|after|") == 0);
    CHECK_EQ(peer_read(&o, got, sizeof(got), NULL), 2);
    CHECK(strcmp(got, "o1|o2|") == 0);
    conn_close_now(l.conn);
    conn_close_now(m.conn);
    conn_close_now(o.conn);
    pass();
    close(l.fd);
    close(m.fd);
    close(o.fd);
}

/* A member dropped as a slow consumer while the queues are being written: its leave reaches the
 * listeners in that same flush, not whenever the loop next wakes up. */
static void test_presence_slow_member(struct route *raw)
{
    struct conn_limits lim = *conn_get_limits();
    struct conn_limits saved = lim;
    lim.send_queue = 64 * 1024;
    conn_set_limits(&lim);
    struct peer member, listener;
    static char got[1 << 16];
    peer_open(&member, raw);
    peer_open(&listener, raw);
    chan_subscribe(listener.conn, "hall", 4);
    chan_presence_set(listener.conn, "hall", 4, -1, 1, NULL, 0);
    chan_subscribe(member.conn, "hall", 4);
    chan_presence_set(member.conn, "hall", 4, 1, -1, NULL, 0);
    chan_subscribe(member.conn, "firehose", 8);
    pass();
    CHECK_EQ(peer_read(&listener, got, sizeof(got), NULL), 1); /* the join */
    uint64_t dropped = stats.slow_consumers_dropped;
    char payload[1024];
    memset(payload, 'x', sizeof(payload) - 1);
    payload[sizeof(payload) - 1] = 0;
    for (int i = 0; i < 2000 && stats.slow_consumers_dropped == dropped; i++) {
        publish("firehose", payload);
        pass();
    }
    CHECK_EQ(stats.slow_consumers_dropped, dropped + 1);
    CHECK_EQ(peer_read(&listener, got, sizeof(got), NULL), 1);
    CHECK(strstr(got, "\"op\":\"leave\"") != NULL);
    conn_close_now(member.conn);
    conn_close_now(listener.conn);
    pass();
    close(member.fd);
    close(listener.fd);
    conn_set_limits(&saved);
}

/* History kept here: the ring grows as messages come, up to the rule's length, then the oldest
 * go; a resume gets what is held after since, in order. */
static void test_history(struct route *raw)
{
    struct config_history rule = {.prefix = "k:", .length = 10, .age = 0};
    chan_set_history(&rule, 1);
    struct peer a;
    char got[4096], text[16];
    uint64_t last;
    peer_open(&a, raw);
    publish("k:r", "1");
    const char *ep = chan_epoch_of("k:r", 3);
    CHECK(strncmp(ep, chan_epoch(), strlen(chan_epoch())) == 0 && strcmp(ep, chan_epoch()) != 0);
    for (int i = 2; i <= 25; i++) {
        snprintf(text, sizeof(text), "%d", i);
        publish("k:r", text);
        if (i == 5) /* the ring has not grown to the length yet */
            CHECK_EQ(chan_recover("k:r", 3, 0, ep, strlen(ep), &last), 1);
    }
    CHECK_EQ(chan_recover("k:r", 3, 15, ep, strlen(ep), &last), 1);
    CHECK_EQ(chan_recover("k:r", 3, 14, ep, strlen(ep), &last), 0);
    CHECK_EQ(last, 25);
    chan_subscribe(a.conn, "k:r", 3);
    chan_replay(a.conn, "k:r", 3, 15);
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 10);
    CHECK(strcmp(got, "16|17|18|19|20|21|22|23|24|25|") == 0);
    conn_close_now(a.conn);
    pass();
    close(a.fd);
    chan_set_history(NULL, 0);
}

/* A channel nobody subscribes to is forgotten channel_ttl (300 s here) after it went quiet, once
 * the messages its history holds are age old; with age 0 (no age limit) its history goes with
 * it. */
static void test_sweep_history(void)
{
    struct config_history rules[] = {{.prefix = "ka:", .length = 10, .age = 1000},
                                     {.prefix = "k0:", .length = 10, .age = 0}};
    chan_set_history(rules, 2);
    publish("ka:x", "1");
    publish("k0:x", "1");
    ev_tstamp t = ev_time();
    size_t subs;
    uint64_t seq_a, seq_0;
    chan_sweep(t + 200);
    chan_info("ka:x", 4, &subs, &seq_a);
    chan_info("k0:x", 4, &subs, &seq_0);
    CHECK(seq_a == 1 && seq_0 == 1);
    chan_sweep(t + 301);
    chan_info("ka:x", 4, &subs, &seq_a);
    chan_info("k0:x", 4, &subs, &seq_0);
    CHECK(seq_a == 1 && seq_0 == 0);
    chan_sweep(t + 999); /* looked at again, but its message is not 1000 s old */
    chan_info("ka:x", 4, &subs, &seq_a);
    CHECK_EQ(seq_a, 1);
    chan_sweep(t + 1301);
    chan_info("ka:x", 4, &subs, &seq_a);
    CHECK_EQ(seq_a, 0);
    chan_set_history(NULL, 0);
}

/* --- channels numbered by the observer (Redis, in mirror mode), with a scripted observer --- */

static struct chan_pub *obs_pubs[16];
static int obs_npubs;
static struct chan_fetch *obs_fetches[16];
static int obs_nfetches;
static int obs_down; /* refuse what does not wait */

static int obs_number(struct chan_pub *p, const struct chan_msg *m, size_t length, double age,
                      const char **err, void *arg)
{
    if (obs_down) {
        *err = "down";
        return -1;
    }
    obs_pubs[obs_npubs++] = p;
    return 0;
}

static int obs_fetch(struct chan_fetch *f, void *arg)
{
    if (obs_down && !f->wait)
        return -1;
    obs_fetches[obs_nfetches++] = f;
    return 0;
}

/* Take the oldest fetch the observer was asked. */
static struct chan_fetch *next_fetch(void)
{
    CHECK(obs_nfetches > 0);
    struct chan_fetch *f = obs_fetches[0];
    memmove(obs_fetches, obs_fetches + 1, --obs_nfetches * sizeof(*obs_fetches));
    return f;
}

static void numbered(const char *channel, const char *epoch, uint64_t seq, const char *text)
{
    struct chan_msg m = {.channel = channel, .channel_len = strlen(channel), .data = text,
                         .len = strlen(text), .utf8 = -1, .json = -1, .remote = 1, .seq = seq,
                         .epoch = epoch};
    chan_publish_numbered(&m);
}

static void answer(struct chan_fetch *f, const char *epoch, uint64_t last, int recovered,
                   const char *const *texts, uint64_t first)
{
    struct chan_fetch_entry e[8];
    size_t n = 0;
    for (; texts && texts[n]; n++)
        e[n] = (struct chan_fetch_entry){.seq = first + n, .data = texts[n], .len = strlen(texts[n])};
    struct chan_fetch_result r = {.epoch = epoch, .last = last, .recovered = recovered, .n = n,
                                  .entries = e};
    chan_fetch_reply(f, &r);
}

struct joined {
    int calls;
    struct chan_join *j;
    uint64_t seq;
    int recovered;
    const char *err;
    int emit; /* emit at once */
};

static void on_joined(struct conn *c, struct chan_join *j, const struct chan_join_result *r, void *arg)
{
    struct joined *x = arg;
    x->calls++;
    x->j = j;
    x->seq = r->seq;
    x->recovered = r->recovered;
    x->err = r->err;
    if (j && x->emit)
        chan_join_emit(j);
}

struct pubbed {
    int calls;
    uint64_t seq;
    size_t subscribers;
    const char *err;
};

static void on_pubbed(void *arg, uint64_t seq, size_t subscribers, const char *err)
{
    struct pubbed *p = arg;
    p->calls++;
    p->seq = seq;
    p->subscribers = subscribers;
    p->err = err;
}

static void test_numbered(struct route *raw)
{
    struct config_history rule = {.prefix = "h:", .length = 100, .age = 0};
    chan_set_history(&rule, 1);
    static const struct chan_observer obs = {.number = obs_number, .fetch = obs_fetch};
    chan_set_observer(&obs);
    struct chan_rstats rs;
    char got[4096];
    struct peer a, b;
    peer_open(&a, raw);
    peer_open(&b, raw);

    /* Publishing hands the message over; the seq comes back later. */
    struct pubbed pb = {0};
    struct chan_msg m = {.channel = "h:a", .channel_len = 3, .data = "x", .len = 1, .utf8 = -1, .json = -1};
    CHECK_EQ(chan_publish_cb(&m, NULL, on_pubbed, &pb, NULL), 0);
    CHECK_EQ(pb.calls, 0);
    CHECK_EQ(obs_npubs, 1);
    chan_pub_numbered(obs_pubs[--obs_npubs], 1, "e1", NULL);
    CHECK(pb.calls == 1 && pb.seq == 1 && !pb.err);
    CHECK_EQ(chan_publish(&m, NULL), 0); /* handed over too, with nobody to tell */
    chan_pub_numbered(obs_pubs[--obs_npubs], 2, "e1", NULL);
    obs_down = 1;
    CHECK_EQ(chan_publish_cb(&m, NULL, on_pubbed, &pb, NULL), 1);
    CHECK(pb.calls == 2 && pb.err && strcmp(pb.err, "down") == 0);
    obs_down = 0;
    numbered("h:a", "e1", 1, "x"); /* nobody subscribes yet */
    numbered("h:a", "e1", 2, "x");

    /* A join answered before its mark: the reply, the replay, then live from the mark on. */
    struct joined ja = {.emit = 1};
    struct chan_join_result now;
    CHECK_EQ(chan_subscribe_from(a.conn, "h:a", 3, 1, "e1", 2, 0, on_joined, &ja, &now), CHAN_JOINING);
    struct chan_fetch *f = next_fetch();
    CHECK(f->kind == CHAN_FETCH_JOIN && f->since == 1 && strcmp(f->epoch, "e1") == 0);
    numbered("h:a", "e1", 3, "three"); /* before the fetch ran: in its replay */
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 0);
    static const char *const two_three[] = {"two", "three", NULL};
    answer(f, "e1", 3, 1, two_three, 2);
    CHECK(ja.calls == 1 && ja.seq == 3 && ja.recovered == 1);
    numbered("h:a", "e1", 3, "three"); /* still arriving before the mark: not again */
    chan_fetch_marker(f, "e1", 3);
    numbered("h:a", "e1", 4, "four");
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 3);
    CHECK(strcmp(got, "two|three|four|") == 0);

    /* The channel is heard now: a new subscription starts at once. */
    CHECK_EQ(chan_subscribe_from(b.conn, "h:a", 3, -1, NULL, 0, 0, on_joined, &ja, &now), CHAN_JOINED);
    CHECK(now.seq == 4 && strcmp(now.epoch, "e1") == 0 && now.recovered == -1);
    chan_unsubscribe(b.conn, "h:a", 3);

    /* A mark before its answer holds the channel's live messages until the answer is out. */
    struct joined jb = {0};
    CHECK_EQ(chan_subscribe_from(b.conn, "h:a", 3, 2, "other", 5, 0, on_joined, &jb, &now), CHAN_JOINING);
    f = next_fetch();
    chan_fetch_marker(f, "e1", 4);
    numbered("h:a", "e1", 5, "five");
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 0); /* held */
    chan_rstats_get(&rs);
    CHECK_EQ(rs.held, 1);
    answer(f, "e1", 4, 0, NULL, 0);
    CHECK(jb.calls == 1 && jb.recovered == 0 && jb.seq == 4);
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 0); /* not emitted yet: still held */
    chan_join_emit(jb.j);
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 1);
    CHECK(strcmp(got, "five|") == 0);
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 1);
    CHECK(strcmp(got, "five|") == 0);
    chan_unsubscribe(b.conn, "h:a", 3);

    /* A gap in the live stream holds it while the missing ones are fetched. */
    numbered("h:a", "e1", 8, "eight");
    f = next_fetch();
    CHECK(f->kind == CHAN_FETCH_RANGE && f->since == 5 && f->until == 7);
    numbered("h:a", "e1", 9, "nine");
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 0);
    static const char *const six_seven[] = {"six", "seven", NULL};
    answer(f, "e1", 0, -1, six_seven, 6);
    numbered("h:a", "e1", 7, "seven"); /* late: dropped */
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 4);
    CHECK(strcmp(got, "six|seven|eight|nine|") == 0);
    chan_rstats_get(&rs);
    CHECK(rs.gaps == 1 && rs.duplicates == 1 && rs.missed == 0 && rs.held == 0);
    /* A gap that cannot be filled is skipped, and counted. */
    numbered("h:a", "e1", 12, "twelve");
    chan_fetch_failed(next_fetch(), "gone");
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 1);
    chan_rstats_get(&rs);
    CHECK_EQ(rs.missed, 2);
    /* A new epoch (Redis lost the history): its seqs start again. */
    numbered("h:a", "e2", 1, "anew");
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 1);
    CHECK(strcmp(got, "anew|") == 0);

    /* Joins that fail: one that waits for an answer is an error, and the subscription goes. */
    struct joined jc = {0};
    CHECK_EQ(chan_subscribe_from(b.conn, "h:new", 5, -1, NULL, 0, 0, on_joined, &jc, &now), CHAN_JOINING);
    chan_fetch_failed(next_fetch(), "lost");
    CHECK(jc.calls == 1 && jc.err && !jc.j);
    CHECK_EQ(chan_unsubscribe(b.conn, "h:new", 5), 0);
    obs_down = 1;
    CHECK_EQ(chan_subscribe_from(b.conn, "h:new", 5, -1, NULL, 0, 0, on_joined, &jc, &now),
             CHAN_UNAVAILABLE);
    /* One that does not wait for an answer waits for the observer instead. */
    CHECK_EQ(chan_subscribe(b.conn, "h:new", 5), 1);
    obs_down = 0;
    f = next_fetch();
    chan_fetch_failed(f, "lost");
    f = next_fetch(); /* asked again */
    answer(f, "e3", 0, -1, NULL, 0);
    chan_fetch_marker(f, "e3", 0);
    numbered("h:new", "e3", 1, "one");
    pass();
    CHECK_EQ(peer_read(&b, got, sizeof(got), NULL), 1);

    /* The connection goes while its join and its publish are under way: nothing is told. */
    struct joined jd = {0};
    CHECK_EQ(chan_subscribe_from(b.conn, "h:gone", 6, -1, NULL, 0, 0, on_joined, &jd, &now), CHAN_JOINING);
    struct chan_msg g = {.channel = "h:gone", .channel_len = 6, .data = "y", .len = 1, .utf8 = -1, .json = -1};
    struct pubbed pg = {0};
    CHECK_EQ(chan_publish_cb(&g, b.conn, on_pubbed, &pg, NULL), 0);
    f = next_fetch();
    chan_fetch_marker(f, "e4", 0); /* holds h:gone for it */
    conn_close_now(b.conn);
    pass();
    numbered("h:gone", "e4", 1, "y"); /* not held any more */
    answer(f, "e4", 0, -1, NULL, 0);
    chan_pub_numbered(obs_pubs[--obs_npubs], 1, "e4", NULL);
    CHECK(jd.calls == 0 && pg.calls == 0);
    chan_rstats_get(&rs);
    CHECK(rs.joining == 0 && rs.held == 0);

    /* Without the observer the channels are numbered here again. */
    chan_unsubscribe(a.conn, "h:a", 3);
    chan_set_observer(NULL);
    CHECK_EQ(chan_numbered_elsewhere("h:a", 3), 0);
    chan_subscribe(a.conn, "h:a", 3);
    m.seq = 0;
    CHECK(chan_publish(&m, NULL) > 0);
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 1);
    conn_close_now(a.conn);
    pass();
    close(a.fd);
    close(b.fd);
    chan_set_history(NULL, 0);
}

/* A connection whose pattern matches a channel Redis numbers goes on getting the channel's messages
 * through the pattern while its subscription to the channel waits for its join point; a replay
 * leaves out what the pattern gave meanwhile, and the pattern what the replay gave: each message
 * once, in order. */
static void test_numbered_pattern(struct route *raw)
{
    struct config_history rule = {.prefix = "h:", .length = 100, .age = 0};
    chan_set_history(&rule, 1);
    static const struct chan_observer obs = {.number = obs_number, .fetch = obs_fetch};
    chan_set_observer(&obs);
    char got[4096];
    struct peer a;
    peer_open(&a, raw);
    CHECK_EQ(chan_psubscribe(a.conn, "h:p.*", 5), 1);
    /* A publish numbered by the observer counts the connections the channel's last message
     * reached: here one, through the pattern. */
    struct pubbed pb = {0};
    struct chan_msg m = {.channel = "h:p.x", .channel_len = 5, .data = "one", .len = 3, .utf8 = -1,
                         .json = -1};
    CHECK_EQ(chan_publish_cb(&m, NULL, on_pubbed, &pb, NULL), 0);
    numbered("h:p.x", "e1", 1, "one");
    chan_pub_numbered(obs_pubs[--obs_npubs], 1, "e1", NULL);
    CHECK(pb.calls == 1 && pb.seq == 1 && pb.subscribers == 1);

    /* No resume: the subscription starts at its mark, the pattern serves until then. */
    struct joined ja = {.emit = 1};
    struct chan_join_result now;
    CHECK_EQ(chan_subscribe_from(a.conn, "h:p.x", 5, -1, NULL, 0, 0, on_joined, &ja, &now),
             CHAN_JOINING);
    struct chan_fetch *f = next_fetch();
    numbered("h:p.x", "e1", 2, "two");
    answer(f, "e1", 2, -1, NULL, 0);
    chan_fetch_marker(f, "e1", 2);
    numbered("h:p.x", "e1", 3, "three"); /* through the channel now */
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 3);
    CHECK(strcmp(got, "one|two|three|") == 0);

    /* A resume. */
    numbered("h:p.y", "e1", 1, "y1");
    numbered("h:p.y", "e1", 2, "y2");
    struct joined jb = {.emit = 1};
    CHECK_EQ(chan_subscribe_from(a.conn, "h:p.y", 5, 1, "e1", 2, 0, on_joined, &jb, &now),
             CHAN_JOINING);
    f = next_fetch();
    numbered("h:p.y", "e1", 3, "y3"); /* through the pattern */
    static const char *const y[] = {"y2", "y3", "y4", NULL};
    answer(f, "e1", 4, 1, y, 2);      /* the pattern gave up to y3: only y4 is replayed */
    CHECK(jb.calls == 1 && jb.recovered == 1);
    numbered("h:p.y", "e1", 4, "y4"); /* replayed already: not through the pattern again */
    chan_fetch_marker(f, "e1", 4);
    numbered("h:p.y", "e1", 5, "y5");
    pass();
    CHECK_EQ(peer_read(&a, got, sizeof(got), NULL), 5);
    CHECK(strcmp(got, "y1|y2|y3|y4|y5|") == 0);

    conn_close_now(a.conn);
    pass();
    close(a.fd);
    chan_set_observer(NULL);
    chan_set_history(NULL, 0);
}

/* Subscribe a to channel resuming after since of epoch "e1" (since -1: no resume), answer the join
 * (epoch, last, recovered, and entries of the n seqs, whose texts are "r<seq>"), mark it at last
 * and collect what a gets. Returns the join's recovered. */
static int join_answered(struct peer *a, const char *channel, int64_t since, const char *epoch,
                         uint64_t last, int recovered, const uint64_t *seqs, size_t n, char *got,
                         size_t cap)
{
    struct joined j = {.emit = 1};
    struct chan_join_result now;
    CHECK_EQ(chan_subscribe_from(a->conn, channel, strlen(channel), since, "e1", 2, 0, on_joined,
                                 &j, &now),
             CHAN_JOINING);
    struct chan_fetch *f = next_fetch();
    char texts[8][24];
    struct chan_fetch_entry e[8];
    for (size_t i = 0; i < n; i++) {
        snprintf(texts[i], sizeof(texts[i]), "r%llu", (unsigned long long)seqs[i]);
        e[i] = (struct chan_fetch_entry){.seq = seqs[i], .data = texts[i], .len = strlen(texts[i])};
    }
    struct chan_fetch_result r = {.epoch = epoch, .last = last, .recovered = recovered, .n = n,
                                  .entries = e};
    chan_fetch_reply(f, &r);
    chan_fetch_marker(f, epoch, last);
    pass();
    peer_read(a, got, cap, NULL);
    CHECK_EQ(j.calls, 1);
    return j.recovered;
}

/* A join's answer is checked, not taken at its word: recovered is 1 only for a resume that was
 * asked, in the epoch asked, whose entries hold every seq after since up to the last; entries out
 * of that range are dropped; anything else replays nothing. */
static void test_numbered_answers(struct route *raw)
{
    struct config_history rule = {.prefix = "h:", .length = 100, .age = 0};
    chan_set_history(&rule, 1);
    static const struct chan_observer obs = {.number = obs_number, .fetch = obs_fetch};
    chan_set_observer(&obs);
    char got[4096];
    struct peer a;
    peer_open(&a, raw);
    static const uint64_t around[] = {1, 2, 3, 9}, two_three[] = {2, 3}, two_four[] = {2, 4},
                          three_two[] = {3, 2};

    /* Complete, with an entry before since and one after the last. */
    CHECK_EQ(join_answered(&a, "h:v1", 1, "e1", 3, 1, around, 4, got, sizeof(got)), 1);
    CHECK(strcmp(got, "r2|r3|") == 0);
    /* A recovered other than 0 or 1. */
    CHECK_EQ(join_answered(&a, "h:v2", 1, "e1", 3, 2, two_three, 2, got, sizeof(got)), 0);
    CHECK(strcmp(got, "") == 0);
    /* One missing. */
    CHECK_EQ(join_answered(&a, "h:v3", 1, "e1", 4, 1, two_four, 2, got, sizeof(got)), 0);
    CHECK(strcmp(got, "") == 0);
    /* Out of order. */
    CHECK_EQ(join_answered(&a, "h:v4", 1, "e1", 3, 1, three_two, 2, got, sizeof(got)), 0);
    CHECK(strcmp(got, "") == 0);
    /* Another epoch than the one asked. */
    CHECK_EQ(join_answered(&a, "h:v5", 1, "e2", 3, 1, two_three, 2, got, sizeof(got)), 0);
    CHECK(strcmp(got, "") == 0);
    /* No resume asked. */
    CHECK_EQ(join_answered(&a, "h:v6", -1, "e1", 3, 1, two_three, 2, got, sizeof(got)), -1);
    CHECK(strcmp(got, "") == 0);

    conn_close_now(a.conn);
    pass();
    close(a.fd);
    chan_set_observer(NULL);
    chan_set_history(NULL, 0);
}

int main(void)
{
    loop = ev_default_loop(0);
    conn_init(loop, no_read, no_timeout, detach);
    chan_init(300, 1000);
    test_names();
    struct route *raw = route_new(ROUTE_RAW, "/sub/");
    test_fanout(raw);
    test_settle_for(raw);
    test_slow_consumer(raw);
    test_send_after_shutdown(raw);
    test_fanout_deflate();
    test_patterns(raw);
    test_pattern_routes(raw);
    test_pattern_wanted(raw);
    test_pattern_batch_full(raw);
    test_batch_cap(raw);
    test_pattern_deflate();
    test_presence(raw);
    test_presence_order(raw);
    test_presence_slow_member(raw);
    test_history(raw);
    test_sweep_history();
    test_numbered(raw);
    test_numbered_pattern(raw);
    test_numbered_answers(raw);
    route_unref(raw);
    return TEST_REPORT();
}
