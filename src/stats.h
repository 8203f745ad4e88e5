/* stats.h - the broker's counters, and their rendering as JSON (/stats) and in the Prometheus text
 * format (/metrics). Counters are plain fields bumped where things happen; figures that other
 * modules own (channels, sources) are asked for at render time. */
#ifndef HERALD_STATS_H
#define HERALD_STATS_H

#include <stdint.h>

#include "buf.h"

struct stats {
    uint64_t connections_total;
    uint64_t connections_refused;   /* over max_connections */
    uint64_t connections_refused_per_ip; /* over max_connections_per_ip */
    uint64_t accept_errors;         /* connections refused for want of file descriptors */
    uint64_t http_timeouts;         /* HTTP connections closed by http_timeout: slow or idle */
    uint64_t ping_timeouts;         /* WebSockets closed for not answering a ping */
    uint64_t heads_too_big;         /* requests refused over max_head or max_headers (414, 431) */
    uint64_t subscription_limit_hits;    /* subscribes refused over max_subscriptions */
    uint64_t auth_refused;          /* handshakes, operations and publishes refused for access */
    uint64_t rate_limited;          /* connections closed over message_rate */
    uint64_t websockets;            /* open WebSocket connections now */
    uint64_t sse_streams;           /* open event streams now */
    uint64_t http_requests;
    uint64_t http_errors;           /* requests answered 4xx or 5xx */
    uint64_t messages_in;           /* messages published, from every source */
    uint64_t messages_out;          /* messages delivered, one per subscriber */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t ws_messages_received;  /* WebSocket messages from clients */
    uint64_t slow_consumers_dropped;
    uint64_t protocol_errors;       /* WebSockets failed by a protocol or UTF-8 error */
    uint64_t messages_too_big;      /* messages refused for max_message */
    uint64_t request_errors;        /* malformed /ws requests answered with an error */
    double started;                 /* ev_time() at start */
};

extern struct stats stats;

/* A source of messages (Redis, a tailed file) adds its state to /stats and /metrics by
 * registering a renderer; json writes one or more "name": value members (no trailing comma),
 * prom writes complete metric lines. */
struct stats_section {
    void (*json)(struct buf *out, void *arg);
    void (*prom)(struct buf *out, void *arg);
    void *arg;
};
void stats_add_section(const struct stats_section *section);
void stats_clear_sections(void);

void stats_render_json(struct buf *out);
void stats_render_prometheus(struct buf *out);

/* One figure of /stats and /metrics. A module keeps its figures in one table that both renderings
 * read, so that the two cannot drift apart: in JSON a figure is "name":value, in Prometheus
 * herald_<prefix><name>, a counter's name with _total added unless it ends so already. */
enum stats_type {
    STATS_GAUGE,
    STATS_COUNTER,
    STATS_FLAG, /* true or false in JSON, a gauge of 1 or 0 in Prometheus */
};
struct stats_figure {
    const char *name;
    enum stats_type type;
    const char *help;
    double value;
};
/* Append f[0..n) to out as JSON object members, separated by commas (none before the first or
 * after the last). */
void stats_figures_json(struct buf *out, const struct stats_figure *f, size_t n);
/* Append f[0..n) to out as Prometheus metrics (HELP, TYPE and the sample) named with prefix. */
void stats_figures_prom(struct buf *out, const char *prefix, const struct stats_figure *f, size_t n);

#endif
