/* conn.h - a client connection: its socket watcher, its input carried over between reads, its send
 * queue of shared block references, its timeouts, and its orderly close.
 *
 * The send queue holds references to blocks (struct block), never copies: a message fanned out to
 * ten thousand subscribers is one block referenced ten thousand times. Queued data is written with
 * one writev per connection per loop pass (conn_flush_all, called before the loop sleeps), large
 * shared blocks by page reference instead (sendpipe.h).
 * A connection is never freed inside one of its own callbacks: conn_close_now marks it dead and it
 * is freed at the end of the pass. */
#ifndef HERALD_CONN_H
#define HERALD_CONN_H

#include <ev.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "deflate.h"
#include "ws.h"

struct route;
struct sub;
struct psub;
struct chan_pub;
struct http_req_state;
struct ssl_st;
struct auth_grants;

enum conn_state {
    CONN_HTTP,     /* reading HTTP requests */
    CONN_WS,       /* an open WebSocket */
    CONN_SSE,      /* an event stream: only written to; what the client sends is ignored */
    CONN_CLOSING,  /* a close frame was queued; waiting for the peer's or the queue to drain */
    CONN_LINGER,   /* write side shut down; reading until EOF so the peer sees everything sent */
    CONN_DEAD,     /* to be freed at the end of the loop pass */
};

/* Which timeout list a connection is on; each list has one timeout and is kept in order of last
 * activity, so a periodic sweep only looks at the connections that have expired. */
enum conn_timeout_class { CONN_TO_HTTP, CONN_TO_WS, CONN_TO_CLOSING, CONN_TO_COUNT };

struct conn_qitem {
    struct block *blk;
    size_t off; /* next byte to write */
    size_t len; /* bytes still to write from off */
};

/* What a connection waits for from Redis, on channels whose history Redis keeps (mirror mode).
 * Made at its first wait and freed with the connection, so that the many connections that never
 * wait do not carry it. */
struct conn_waits {
    struct chan_pub *pubs; /* channel.c: its publishes waiting for a seq from Redis */
    void *outbox;          /* route.c: replies waiting for earlier ones, requests for their turn */
    void *waiting;         /* server.c: a request answered once Redis has (an HTTP publish, a
                              WebSocket handshake) */
};

struct conn {
    ev_io io;
    struct conn *to_prev, *to_next; /* the timeout list of its class */
    struct conn *flush_next;        /* on the list of connections with queued output */
    ev_tstamp last_active;
    uint64_t id;
    /* Fields are ordered and flags are bits so the struct stays small: every idle connection
     * holds one. */
    uint8_t state;        /* enum conn_state */
    uint8_t to_class;     /* enum conn_timeout_class */
    uint8_t is_ws;        /* counted in stats.websockets (1), or in stats.sse_streams (2) */
    uint8_t on_flush_list : 1;
    uint8_t awaiting_pong : 1;
    uint8_t close_sent : 1;     /* a close frame is queued or written */
    uint8_t close_received : 1;
    uint8_t read_shut : 1;      /* stop reading: slow consumer, shutdown */
    uint8_t ip_counted : 1;     /* holds a slot in the per-address connection count */
    uint8_t read_paused : 1;    /* pipelined requests wait until the answers so far are written */
    uint8_t tls_read_wants_write : 1; /* a TLS read is waiting for the socket to be writable */
    uint8_t awaiting : 1; /* an answer waits for Redis: read nothing, ping nothing meanwhile */
    struct pmd_params pmd; /* permessage-deflate as negotiated in the handshake; zero when off */
    uint16_t close_code;  /* code to log/report when the connection ends */
    int script_ref;       /* the Lua client object, LUA_NOREF when none */
    struct route *route;  /* WebSocket route; holds a reference */
    struct ws_parser wp;
    struct in6_addr addr; /* peer, IPv4 addresses mapped */
    uint32_t npsubs;      /* pattern subscriptions; max_subscriptions counts them with nsubs */
    struct pmd_inflater *inflater; /* owned; made at the client's first compressed message, else NULL */
    struct buf *pending;  /* unconsumed input carried to the next read; NULL when none */
    struct buf *message;  /* a WebSocket message being assembled; NULL when none */
    struct http_req_state *req; /* an HTTP request whose body is being read; NULL when none */
    struct conn_qitem *q; /* send queue: a ring of q_cap entries; NULL while empty */
    uint32_t q_head, q_len, q_cap;
    uint32_t nsubs;
    size_t q_bytes;       /* bytes queued, the figure the send_queue limit applies to */
    struct sub *subs;     /* this connection's subscriptions (linked through the sub) */
    struct psub *psubs;   /* its pattern subscriptions (linked through the psub) */
    struct conn_waits *waits; /* NULL until it first waits for Redis */
    uint64_t pattern_stamp; /* channel.c: the last message it was given through a pattern */
    uint32_t rate_window; /* the second (ev_now) that rate_count counts messages in */
    uint32_t rate_count;
    struct auth_grants *grants; /* from a signed token; NULL when none was given */
    struct ssl_st *tls;   /* the TLS session on the TLS port; NULL for plain connections */
};

struct conn_limits {
    size_t send_queue;      /* bytes queued before a WebSocket is a slow consumer */
    double timeout[CONN_TO_COUNT]; /* seconds: request, WebSocket idle (ping), closing */
};

/* Set up the connection machinery on loop. read_cb is called when a connection is readable. */
/* detach_cb is called when a connection starts closing and again when it goes (it must be
 * idempotent), with the close code and reason (1006 and "" when the socket just went). */
void conn_init(struct ev_loop *loop, void (*read_cb)(struct conn *c),
               void (*timeout_cb)(struct conn *c),
               void (*detach_cb)(struct conn *c, uint16_t code, const char *reason));
void conn_set_limits(const struct conn_limits *limits);
const struct conn_limits *conn_get_limits(void);

/* c's waits, made on first use. */
struct conn_waits *conn_waits(struct conn *c);
/* A field of c's waits, NULL while it has none. */
#define CONN_WAIT(c, field) ((c)->waits ? (c)->waits->field : NULL)

/* Take ownership of an accepted, non-blocking socket. */
struct conn *conn_new(int fd, const struct sockaddr *addr, socklen_t addr_len);

/* The peer's address as text (static storage, valid until the next call). */
const char *conn_addr_str(const struct conn *c);

/* Record activity now (the peer sent something) and move the connection to its class's list. */
void conn_touch(struct conn *c);
void conn_set_timeout_class(struct conn *c, enum conn_timeout_class cls);

/* Queue len bytes of blk starting at off (taking a new reference). */
void conn_queue_block(struct conn *c, struct block *blk, size_t off, size_t len);
/* Queue a copy of p[0..len), packed with other small writes into this connection's own tail block. */
void conn_queue_copy(struct conn *c, const void *p, size_t len);
/* Queue one unmasked WebSocket frame. Data frames are not queued once a close frame was sent. A
 * data frame to a peer that negotiated permessage-deflate is compressed when the route's settings
 * find it worth it. p is copied. */
void conn_send_frame(struct conn *c, int opcode, const void *p, size_t len);
/* Fail or close the WebSocket: queue a close frame with code and reason (once), stop reading data,
 * and end the connection once it is written (and, when we started the close, answered). */
void conn_ws_close(struct conn *c, uint16_t code, const char *reason);
/* Close once everything queued is written (HTTP "Connection: close"). */
void conn_close_after_write(struct conn *c);
/* Drop the connection at once: the socket is closed now, the memory at the end of the pass. */
void conn_close_now(struct conn *c);

/* Make sure c's queue is written this pass, and keep write interest on while data is waiting. */
void conn_schedule_flush(struct conn *c);
/* Stop reading until the send queue is empty (then the read callback is called again). */
void conn_pause_reading(struct conn *c);
/* Stop reading (on) while an answer waits for Redis, or go on (off), serving what is pending. */
void conn_set_awaiting(struct conn *c, int on);
/* A TLS read needs the socket writable before it can go on. */
void conn_wait_writable(struct conn *c);

/* 1 if the send queue is past the slow-consumer limit. */
int conn_over_limit(const struct conn *c);

/* Write out every connection's queued data (one writev each), then free dead connections. Called
 * once per loop pass, before the loop waits for events. */
void conn_flush_all(void);

/* Call fn on every open connection (shutdown, stats). fn may close the connection. */
void conn_foreach(void (*fn)(struct conn *c, void *arg), void *arg);
size_t conn_count(void);

/* The shared read buffer: every connection reads into it, so an idle connection holds no input
 * buffer of its own. Valid until the next read. */
#define CONN_READ_BUF 262144
uint8_t *conn_read_buffer(void);

#endif
