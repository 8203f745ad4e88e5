/* stats.c - the counters and their two renderings, kept in step by one table of figures. */
#include "stats.h"

#include "channel.h"
#include "conn.h"

#include <ev.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
/* The heap in use is known from glibc's mallinfo2 (2.33 and later); elsewhere it is left out. */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
#include <malloc.h>
#define HAVE_MALLINFO2 1
#endif

struct stats stats;

static struct stats_section *sections;
static size_t nsections;

void stats_add_section(const struct stats_section *section)
{
    sections = xrealloc(sections, (nsections + 1) * sizeof(*sections));
    sections[nsections++] = *section;
}

void stats_clear_sections(void)
{
    free(sections);
    sections = NULL;
    nsections = 0;
}

/* A figure's value: a whole number as one, anything else as %g gives it. */
static void put_value(struct buf *out, double v)
{
    buf_printf(out, v == floor(v) ? "%.0f" : "%g", v);
}

void stats_figures_json(struct buf *out, const struct stats_figure *f, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        buf_printf(out, "%s\"%s\":", i ? "," : "", f[i].name);
        if (f[i].type == STATS_FLAG)
            buf_append_str(out, f[i].value ? "true" : "false");
        else
            put_value(out, f[i].value);
    }
}

void stats_figures_prom(struct buf *out, const char *prefix, const struct stats_figure *f, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(f[i].name);
        int counter = f[i].type == STATS_COUNTER;
        const char *suffix = counter && !(len >= 6 && strcmp(f[i].name + len - 6, "_total") == 0)
                                 ? "_total" : "";
        buf_printf(out, "# HELP herald_%s%s%s %s\n# TYPE herald_%s%s%s %s\nherald_%s%s%s ", prefix,
                   f[i].name, suffix, f[i].help, prefix, f[i].name, suffix,
                   counter ? "counter" : "gauge", prefix, f[i].name, suffix);
        put_value(out, f[i].value);
        buf_append(out, "\n", 1);
    }
}

#ifdef HAVE_MALLINFO2
/* Bytes the process has from malloc and not freed (the allocator's own view, so a leak shows
 * here even where RSS hides it in pages that were already touched). */
static size_t heap_bytes(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}
#endif

/* Every figure /stats and /metrics show, in one place so the two cannot drift apart. */
static size_t collect(struct stats_figure *f)
{
    size_t n = 0;
#define FIG(nm, ty, hp, val) f[n++] = (struct stats_figure){nm, STATS_##ty, hp, (double)(val)}
    FIG("connections", GAUGE, "Open client connections", conn_count());
    FIG("websockets", GAUGE, "Open WebSocket connections", stats.websockets);
    FIG("sse_streams", GAUGE, "Open Server-Sent Events streams", stats.sse_streams);
    FIG("channels", GAUGE, "Channels known", chan_count());
    FIG("subscriptions", GAUGE, "Subscriptions", chan_subscription_count());
    FIG("connections_total", COUNTER, "Connections accepted", stats.connections_total);
    FIG("connections_refused", COUNTER, "Connections refused over max_connections",
        stats.connections_refused);
    FIG("connections_refused_per_ip", COUNTER, "Connections refused over max_connections_per_ip",
        stats.connections_refused_per_ip);
    FIG("accept_errors", COUNTER, "Connections refused for want of file descriptors",
        stats.accept_errors);
    FIG("http_timeouts", COUNTER, "HTTP connections closed by http_timeout (slow or idle)",
        stats.http_timeouts);
    FIG("ping_timeouts", COUNTER, "WebSockets closed for not answering a ping", stats.ping_timeouts);
    FIG("heads_too_big", COUNTER, "Requests refused over max_head or max_headers", stats.heads_too_big);
    FIG("subscription_limit_hits", COUNTER, "Subscriptions refused over max_subscriptions",
        stats.subscription_limit_hits);
    FIG("auth_refused", COUNTER, "Requests refused by origin, token or grant checks", stats.auth_refused);
    FIG("rate_limited", COUNTER, "WebSockets closed for exceeding message_rate", stats.rate_limited);
    FIG("http_requests", COUNTER, "HTTP requests", stats.http_requests);
    FIG("http_errors", COUNTER, "HTTP requests answered with an error status", stats.http_errors);
    FIG("messages_in", COUNTER, "Messages published", stats.messages_in);
    FIG("messages_out", COUNTER, "Messages delivered to subscribers", stats.messages_out);
    FIG("bytes_in", COUNTER, "Bytes read from clients", stats.bytes_in);
    FIG("bytes_out", COUNTER, "Bytes written to clients", stats.bytes_out);
    FIG("ws_messages_received", COUNTER, "WebSocket messages received", stats.ws_messages_received);
    FIG("slow_consumers_dropped", COUNTER, "Connections closed for a full send queue",
        stats.slow_consumers_dropped);
    FIG("protocol_errors", COUNTER, "WebSockets failed for a protocol error", stats.protocol_errors);
    FIG("messages_too_big", COUNTER, "Messages refused for exceeding max_message",
        stats.messages_too_big);
    FIG("request_errors", COUNTER, "Malformed requests on the pub/sub route", stats.request_errors);
#ifdef HAVE_MALLINFO2
    FIG("heap_bytes", GAUGE, "Bytes allocated with malloc and in use", heap_bytes());
#endif
    FIG("uptime_s", GAUGE, "Seconds since start", floor(ev_time() - stats.started));
#undef FIG
    return n;
}

#define MAX_FIGURES 48

void stats_render_json(struct buf *out)
{
    struct stats_figure f[MAX_FIGURES];
    size_t n = collect(f);
    buf_printf(out, "{\"epoch\":\"%s\",", chan_epoch());
    stats_figures_json(out, f, n);
    for (size_t i = 0; i < nsections; i++) {
        buf_append(out, ",", 1);
        sections[i].json(out, sections[i].arg);
    }
    buf_append(out, "}\n", 2);
}

void stats_render_prometheus(struct buf *out)
{
    struct stats_figure f[MAX_FIGURES];
    size_t n = collect(f);
    stats_figures_prom(out, "", f, n);
    for (size_t i = 0; i < nsections; i++)
        sections[i].prom(out, sections[i].arg);
}
