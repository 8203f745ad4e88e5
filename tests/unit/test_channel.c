/* Unit tests of channel.c and conn.c: name validation, and fan-out driven over socket pairs with
 * the peer side parsed by the client-role frame parser. */
#include "channel.h"
#include "conn.h"
#include "route.h"
#include "stats.h"
#include "test.h"
#include "ws.h"

#include <arpa/inet.h>
#include <fcntl.h>
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

int main(void)
{
    loop = ev_default_loop(0);
    conn_init(loop, no_read, no_timeout, detach);
    chan_init(300, 1000);
    test_names();
    struct route *raw = route_new(ROUTE_RAW, "/sub/");
    test_fanout(raw);
    test_slow_consumer(raw);
    route_unref(raw);
    return TEST_REPORT();
}
