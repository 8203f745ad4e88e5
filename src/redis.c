/* redis.c - the Redis source: Redis pub/sub channels and patterns published to herald channels of
 * the same name, and, in mirror mode, this node's own messages published to Redis so that several
 * nodes act as one broker.
 *
 * Two connections (links), both driven by hiredis's asynchronous API on herald's loop:
 *   - the subscriber: SUBSCRIBE/PSUBSCRIBE; every message it brings is published locally with
 *     m->remote set, so it is never sent back;
 *   - the publisher (mirror mode only): a connection in subscribe mode cannot PUBLISH.
 * A link that fails is retried with capped exponential backoff (with jitter, so a thousand nodes
 * do not reconnect in step); each transition is logged once, not each retry.
 *
 * What the subscriber subscribes to: the configured patterns; the configured channels; in mirror
 * mode, every channel with local subscribers (following chan_observer's first/last events). A
 * channel that a configured pattern matches is never subscribed directly: Redis would deliver its
 * messages twice (once as "message", once as "pmessage"). When configured patterns overlap, a
 * message is taken from the first pattern (in configuration order) whose subscription Redis had
 * confirmed when the message arrived: confirmations travel in the same ordered stream as messages,
 * so that is exactly the set of patterns Redis delivered the message through.
 *
 * Mirror envelope: a message this node publishes to Redis is
 *     "\xff" "herald:1:" <node id, 16 hex digits> ":" <'j' JSON value | 'r' raw bytes> ":" <payload>
 * 0xFF never starts UTF-8 text or JSON, and the whole 10-byte magic never starts a real binary
 * payload, so a backend's plain PUBLISH is taken as the raw payload it is. A node drops envelopes
 * carrying its own id: it fanned those messages out locally when they were published. */
#include "source.h"

#include "buf.h"
#include "channel.h"
#include "config.h"
#include "json.h"
#include "log.h"
#include "stats.h"

#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ENVELOPE_MAGIC "\xff" "herald:1:"
#define ENVELOPE_MAGIC_LEN (sizeof(ENVELOPE_MAGIC) - 1)
#define NODE_ID_LEN 16
#define ENVELOPE_HEADER_LEN (ENVELOPE_MAGIC_LEN + NODE_ID_LEN + 3)
/* Channel names per SUBSCRIBE command when subscribing in bulk. */
#define SUBSCRIBE_BATCH 256
/* The publisher's unsent output past which mirrored messages are dropped (and counted) rather
 * than buffered without bound while Redis is slow or unreachable. */
#define PUBLISH_BACKLOG_MIN (16u << 20)
/* A connection that stayed up this long resets the backoff: the next outage retries quickly. */
#define STABLE_AFTER 5.0

/* One connection to Redis. ac is NULL while down; while connecting the timer is the connect
 * timeout, while down it is the backoff delay. */
struct link {
    const char *role;
    redisAsyncContext *ac;
    int ready;            /* handshake (AUTH, SELECT, PING) done */
    int was_ready;        /* has been ready before: the next ready is a reconnect */
    int down_logged;      /* the current outage was logged: retries stay quiet */
    ev_timer timer;
    double backoff;
    ev_tstamp up_since;
    uint64_t reconnects;
    char error[160];
};

static struct {
    struct ev_loop *loop;
    struct config_redis *cfg; /* our own copy: the running configuration may be freed on reload */
    size_t max_message;
    size_t publish_backlog;
    struct link sub, pub;
    char node_id[NODE_ID_LEN + 1];
    uint8_t *pattern_ok;      /* per configured pattern: Redis confirmed the PSUBSCRIBE */
    long long subscriptions;  /* channels + patterns, as Redis last counted them */
    uint64_t received, published, dropped, own_dropped;
    uint64_t mirror_published, mirror_dropped;
    ev_tstamp last_drop_log;
    int registered;
} R;

static struct buf scratch;

static void link_connect(struct link *l);
static void sub_ready(void);

/* --- glob patterns, as Redis matches them (PSUBSCRIBE) ------------------------------------------ */

/* Does the pattern token at p[*pi] (not '*') match the character ch? Advances *pi past the token.
 * Follows Redis's rules, quirks included: '?' any character; '\\' escapes the next one; '[...]'
 * a class with '^' negation, ranges a-z (either order) and escapes, running to the end of the
 * pattern when unterminated. */
static int glob_token(const char *p, size_t plen, size_t *pi, char ch)
{
    size_t i = *pi;
    if (p[i] == '?') {
        *pi = i + 1;
        return 1;
    }
    if (p[i] == '\\') {
        if (i + 1 < plen)
            i++;
        *pi = i + 1;
        return p[i] == ch;
    }
    if (p[i] != '[') {
        *pi = i + 1;
        return p[i] == ch;
    }
    i++;
    int negate = i < plen && p[i] == '^', match = 0;
    if (negate)
        i++;
    for (;;) {
        if (i >= plen)
            break; /* unterminated: the class is the rest of the pattern */
        if (p[i] == '\\' && plen - i >= 2) {
            match |= p[i + 1] == ch;
            i += 2;
        } else if (p[i] == ']') {
            i++;
            break;
        } else if (plen - i >= 3 && p[i + 1] == '-') {
            int lo = (signed char)p[i], hi = (signed char)p[i + 2], c = (signed char)ch;
            if (lo > hi) {
                int t = lo;
                lo = hi;
                hi = t;
            }
            match |= c >= lo && c <= hi;
            i += 3;
        } else {
            match |= p[i] == ch;
            i++;
        }
    }
    *pi = i;
    return negate ? !match : match;
}

/* 1 if the Redis glob pattern p matches s[0..slen). Iterative, with one backtrack point per '*':
 * every other token matches exactly one character, so the latest '*' is the only one worth
 * retrying, and the match takes O(plen * slen) at worst. */
static int glob_match(const char *p, size_t plen, const char *s, size_t slen)
{
    if (!slen)
        return !plen;
    size_t pi = 0, si = 0, star_p = (size_t)-1, star_s = 0;
    while (si < slen) {
        if (pi < plen && p[pi] == '*') {
            while (pi < plen && p[pi] == '*')
                pi++;
            if (pi == plen)
                return 1;
            star_p = pi;
            star_s = si;
            continue;
        }
        size_t next = pi;
        if (pi < plen && glob_token(p, plen, &next, s[si])) {
            pi = next;
            si++;
            continue;
        }
        if (star_p == (size_t)-1)
            return 0;
        pi = star_p;
        si = ++star_s;
    }
    while (pi < plen && p[pi] == '*')
        pi++;
    return pi == plen;
}

/* --- configuration ------------------------------------------------------------------------------ */

static char **copy_list(char **list, size_t n)
{
    char **out = xcalloc(n + 1, sizeof(*out));
    for (size_t i = 0; i < n; i++)
        out[i] = xstrdup(list[i]);
    return out;
}

static struct config_redis *copy_config(const struct config_redis *c)
{
    struct config_redis *r = xmalloc(sizeof(*r));
    *r = *c;
    r->host = c->host ? xstrdup(c->host) : NULL;
    r->socket = c->socket ? xstrdup(c->socket) : NULL;
    r->password = c->password ? xstrdup(c->password) : NULL;
    r->channels = copy_list(c->channels, c->nchannels);
    r->patterns = copy_list(c->patterns, c->npatterns);
    return r;
}

static void free_config(struct config_redis *r)
{
    if (!r)
        return;
    free(r->host);
    free(r->socket);
    free(r->password);
    for (size_t i = 0; i < r->nchannels; i++)
        free(r->channels[i]);
    free(r->channels);
    for (size_t i = 0; i < r->npatterns; i++)
        free(r->patterns[i]);
    free(r->patterns);
    free(r);
}

static int str_eq(const char *a, const char *b) { return (!a && !b) || (a && b && !strcmp(a, b)); }

static int list_eq(char **a, size_t na, char **b, size_t nb)
{
    if (na != nb)
        return 0;
    for (size_t i = 0; i < na; i++)
        if (strcmp(a[i], b[i]) != 0)
            return 0;
    return 1;
}

static int in_list(char **list, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++)
        if (strlen(list[i]) == len && memcmp(list[i], name, len) == 0)
            return 1;
    return 0;
}

/* 1 if a configured pattern matches the channel: its messages come through the pattern. */
static int covered(const char *name, size_t len)
{
    for (size_t i = 0; i < R.cfg->npatterns; i++)
        if (glob_match(R.cfg->patterns[i], strlen(R.cfg->patterns[i]), name, len))
            return 1;
    return 0;
}

static int local_subscribers(const char *name, size_t len)
{
    size_t subs;
    uint64_t seq;
    chan_info(name, len, &subs, &seq);
    return subs > 0;
}

static const char *address(void)
{
    static char addr[300];
    if (R.cfg->socket)
        snprintf(addr, sizeof(addr), "unix:%s", R.cfg->socket);
    else
        snprintf(addr, sizeof(addr), "%s:%d", R.cfg->host, R.cfg->port);
    return addr;
}

/* --- links: connecting, backoff, logging -------------------------------------------------------- */

static void link_schedule_retry(struct link *l)
{
    double jitter = 0.8 + 0.4 * ((double)rand() / RAND_MAX);
    double delay = l->backoff * jitter;
    l->backoff *= 2;
    if (l->backoff > R.cfg->reconnect_max)
        l->backoff = R.cfg->reconnect_max;
    ev_timer_stop(R.loop, &l->timer);
    ev_timer_set(&l->timer, delay, 0.);
    ev_timer_start(R.loop, &l->timer);
}

/* The link is down (its context is gone or going): note why, log the transition once, and retry
 * after the backoff. */
static void link_down(struct link *l, const char *why)
{
    int was_ready = l->ready;
    l->ready = 0;
    l->ac = NULL;
    snprintf(l->error, sizeof(l->error), "%s", why);
    if (l == &R.sub) {
        R.subscriptions = 0;
        if (R.cfg->npatterns)
            memset(R.pattern_ok, 0, R.cfg->npatterns);
    }
    if (was_ready && ev_now(R.loop) - l->up_since >= STABLE_AFTER)
        l->backoff = R.cfg->reconnect_min;
    if (!l->down_logged) {
        l->down_logged = 1;
        if (was_ready)
            log_warn("redis: connection to %s lost (%s): %s; reconnecting", address(), l->role, why);
        else
            log_warn("redis: cannot connect to %s (%s): %s; retrying every %g s at most", address(),
                     l->role, why, R.cfg->reconnect_max);
    } else {
        log_debug("redis: %s: %s", l->role, why);
    }
    link_schedule_retry(l);
}

/* Drop the link's context ourselves (timeout, failed handshake, reconfiguration). Its callbacks,
 * which hiredis runs while freeing it, see no link and do nothing. */
static void link_close(struct link *l)
{
    redisAsyncContext *ac = l->ac;
    l->ac = NULL;
    l->ready = 0;
    if (ac) {
        ac->data = NULL;
        redisAsyncFree(ac); /* deferred by hiredis when called from one of ac's reply callbacks */
    }
}

static void link_stop(struct link *l)
{
    link_close(l);
    ev_timer_stop(R.loop, &l->timer);
    l->down_logged = 0;
    l->was_ready = 0;
    l->error[0] = 0;
}

static struct link *link_of(const redisAsyncContext *ac)
{
    struct link *l = ac->data;
    return l && l->ac == ac ? l : NULL;
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct link *l = w->data;
    if (l->ac) { /* still connecting */
        link_close(l);
        link_down(l, "connection timed out");
        return;
    }
    link_connect(l);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    struct link *l = link_of(ac);
    if (l && status != REDIS_OK)
        link_down(l, ac->errstr[0] ? ac->errstr : "connection failed"); /* hiredis frees ac */
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    struct link *l = link_of(ac);
    if (l)
        link_down(l, ac->err && ac->errstr[0] ? ac->errstr : "connection closed by the server");
}

static void link_ready(struct link *l)
{
    l->ready = 1;
    l->up_since = ev_now(R.loop);
    l->down_logged = 0;
    l->error[0] = 0;
    ev_timer_stop(R.loop, &l->timer);
    if (l->was_ready)
        l->reconnects++;
    log_info("redis: connected to %s (%s)%s", address(), l->role, l->was_ready ? ", again" : "");
    l->was_ready = 1;
    if (l == &R.sub)
        sub_ready();
}

/* Replies to the handshake: AUTH and SELECT must succeed; PING's reply (the last) makes the link
 * ready. A failure closes the connection and retries: a wrong password may be fixed on Redis's
 * side without restarting herald. */
static void on_handshake_reply(redisAsyncContext *ac, void *r, void *priv)
{
    redisReply *reply = r;
    struct link *l = link_of(ac);
    if (!l || !reply || l->ready)
        return;
    const char *step = priv;
    if (reply->type == REDIS_REPLY_ERROR) {
        char why[200];
        snprintf(why, sizeof(why), "%s failed: %.*s", step, (int)reply->len, reply->str);
        link_close(l);
        link_down(l, why);
        return;
    }
    if (strcmp(step, "PING") == 0)
        link_ready(l);
}

static void on_sub_reply(redisAsyncContext *ac, void *r, void *priv);

static void link_connect(struct link *l)
{
    struct config_redis *c = R.cfg;
    redisAsyncContext *ac = c->socket ? redisAsyncConnectUnix(c->socket)
                                      : redisAsyncConnect(c->host, c->port);
    if (!ac) {
        link_down(l, "out of memory");
        return;
    }
    if (ac->err) {
        char why[160];
        snprintf(why, sizeof(why), "%s", ac->errstr);
        redisAsyncFree(ac);
        link_down(l, why);
        return;
    }
    /* TCP keepalive (15 s), so a silently dead connection is noticed; best effort: failing to set
     * it is not a reason to fail the connection. */
    if (!c->socket && redisEnableKeepAlive(&ac->c) != REDIS_OK)
        ac->c.err = 0;
    ac->data = l;
    l->ac = ac;
    l->ready = 0;
    redisLibevAttach(R.loop, ac);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    if (c->password)
        redisAsyncCommand(ac, on_handshake_reply, (void *)"AUTH", "AUTH %s", c->password);
    if (c->db)
        redisAsyncCommand(ac, on_handshake_reply, (void *)"SELECT", "SELECT %d", c->db);
    redisAsyncCommand(ac, on_handshake_reply, (void *)"PING", "PING");
    ev_timer_stop(R.loop, &l->timer);
    ev_timer_set(&l->timer, c->connect_timeout, 0.);
    ev_timer_start(R.loop, &l->timer);
}

static void link_init(struct link *l, const char *role)
{
    memset(l, 0, sizeof(*l));
    l->role = role;
    ev_init(&l->timer, on_timer);
    l->timer.data = l;
}

static void link_start(struct link *l)
{
    l->backoff = R.cfg->reconnect_min;
    l->down_logged = 0;
    l->was_ready = 0;
    link_connect(l);
}

/* --- subscribing -------------------------------------------------------------------------------- */

static const char *batch_argv[SUBSCRIBE_BATCH + 1];
static size_t batch_len[SUBSCRIBE_BATCH + 1];
static int batch_n;

static void batch_flush(const char *cmd)
{
    if (!batch_n || !R.sub.ready)
        return;
    batch_argv[0] = cmd;
    batch_len[0] = strlen(cmd);
    redisAsyncCommandArgv(R.sub.ac, on_sub_reply, NULL, batch_n + 1, batch_argv, batch_len);
    batch_n = 0;
}

static void batch_add(const char *cmd, const char *name, size_t len)
{
    batch_argv[batch_n + 1] = name;
    batch_len[batch_n + 1] = len;
    if (++batch_n == SUBSCRIBE_BATCH)
        batch_flush(cmd);
}

static void subscribe_local(const char *name, size_t len, void *arg)
{
    if (!in_list(R.cfg->channels, R.cfg->nchannels, name, len) && !covered(name, len))
        batch_add("SUBSCRIBE", name, len);
}

/* The subscriber is ready: subscribe to everything wanted. */
static void sub_ready(void)
{
    struct config_redis *c = R.cfg;
    batch_n = 0;
    for (size_t i = 0; i < c->npatterns; i++)
        batch_add("PSUBSCRIBE", c->patterns[i], strlen(c->patterns[i]));
    batch_flush("PSUBSCRIBE");
    for (size_t i = 0; i < c->nchannels; i++)
        if (!covered(c->channels[i], strlen(c->channels[i])))
            batch_add("SUBSCRIBE", c->channels[i], strlen(c->channels[i]));
    if (c->mirror)
        chan_foreach_subscribed(subscribe_local, NULL);
    batch_flush("SUBSCRIBE");
}

static void sub_command(const char *cmd, const char *name, size_t len)
{
    if (!R.sub.ready)
        return; /* done when the subscriber becomes ready */
    const char *argv[2] = {cmd, name};
    size_t lens[2] = {strlen(cmd), len};
    redisAsyncCommandArgv(R.sub.ac, on_sub_reply, NULL, 2, argv, lens);
}

/* Mirror mode: the first local subscriber of a channel: hear about it from other nodes. */
static void on_first_subscriber(const char *name, size_t len, void *arg)
{
    if (!in_list(R.cfg->channels, R.cfg->nchannels, name, len) && !covered(name, len))
        sub_command("SUBSCRIBE", name, len);
}

static void on_last_unsubscribed(const char *name, size_t len, void *arg)
{
    if (!in_list(R.cfg->channels, R.cfg->nchannels, name, len) && !covered(name, len))
        sub_command("UNSUBSCRIBE", name, len);
}

/* --- receiving ---------------------------------------------------------------------------------- */

/* Count a dropped message in *counter and say why, at most once per 10 s (the counter says the
 * rest). */
static void drop_log(uint64_t *counter, const char *what, const char *channel, size_t channel_len)
{
    ++*counter;
    ev_tstamp now = ev_now(R.loop);
    if (now - R.last_drop_log >= 10) {
        R.last_drop_log = now;
        log_warn("redis: dropped a message on \"%.*s\": %s (%llu so far)",
                 (int)(channel_len > 200 ? 200 : channel_len), channel, what,
                 (unsigned long long)*counter);
    }
}

/* A message from Redis on channel: unwrap the envelope, drop our own, publish the rest locally. */
static void deliver(const char *channel, size_t channel_len, const char *data, size_t len)
{
    const char *why;
    R.received++;
    int is_json = 0;
    if (len >= ENVELOPE_HEADER_LEN && memcmp(data, ENVELOPE_MAGIC, ENVELOPE_MAGIC_LEN) == 0 &&
        data[ENVELOPE_MAGIC_LEN + NODE_ID_LEN] == ':' &&
        (data[ENVELOPE_HEADER_LEN - 2] == 'j' || data[ENVELOPE_HEADER_LEN - 2] == 'r') &&
        data[ENVELOPE_HEADER_LEN - 1] == ':') {
        if (memcmp(data + ENVELOPE_MAGIC_LEN, R.node_id, NODE_ID_LEN) == 0) {
            R.own_dropped++; /* ours: fanned out when it was published */
            return;
        }
        is_json = data[ENVELOPE_HEADER_LEN - 2] == 'j';
        data += ENVELOPE_HEADER_LEN;
        len -= ENVELOPE_HEADER_LEN;
    }
    if (!chan_name_valid(channel, channel_len, &why)) {
        drop_log(&R.dropped, why, channel, channel_len);
        return;
    }
    if (len > R.max_message) {
        stats.messages_too_big++;
        drop_log(&R.dropped, "larger than max_message", channel, channel_len);
        return;
    }
    /* Whoever can PUBLISH to Redis can forge an envelope: a "JSON value" that is not one would be
     * passed on as is to /ws subscribers, so it is checked, and taken as raw bytes if it fails. */
    if (is_json && !json_valid(data, len))
        is_json = 0;
    struct chan_msg m = {.channel = channel, .channel_len = channel_len, .data = data, .len = len,
                         .is_json = (uint8_t)is_json, .utf8 = (int8_t)(is_json ? 1 : -1),
                         .json = (int8_t)(is_json ? 1 : -1), .remote = 1};
    chan_publish(&m, NULL);
    R.published++;
}

static int pattern_index(const char *p, size_t len)
{
    for (size_t i = 0; i < R.cfg->npatterns; i++)
        if (strlen(R.cfg->patterns[i]) == len && memcmp(R.cfg->patterns[i], p, len) == 0)
            return (int)i;
    return -1;
}

static int is_kind(const redisReply *k, const char *name)
{
    return k->len == strlen(name) && memcmp(k->str, name, k->len) == 0;
}

/* Everything the subscriber receives in subscribe mode: confirmations and messages. */
static void on_sub_reply(redisAsyncContext *ac, void *r, void *priv)
{
    redisReply *reply = r;
    if (!reply || !link_of(ac))
        return;
    if (reply->type == REDIS_REPLY_ERROR) {
        log_warn("redis: subscribe failed: %.*s", (int)reply->len, reply->str);
        return;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
        return;
    redisReply **e = reply->element;
    for (size_t i = 0; i < reply->elements; i++)
        if (e[i]->type != REDIS_REPLY_STRING && e[i]->type != REDIS_REPLY_INTEGER)
            return;
    const redisReply *kind = e[0];
    if (kind->type != REDIS_REPLY_STRING)
        return;
    if (is_kind(kind, "message")) {
        deliver(e[1]->str, e[1]->len, e[2]->str, e[2]->len);
    } else if (is_kind(kind, "pmessage") && reply->elements >= 4) {
        int idx = pattern_index(e[1]->str, e[1]->len);
        if (idx < 0)
            return; /* a pattern no longer configured */
        /* Take it from the first confirmed pattern that matches, once. */
        for (int j = 0; j < idx; j++)
            if (R.pattern_ok[j] &&
                glob_match(R.cfg->patterns[j], strlen(R.cfg->patterns[j]), e[2]->str, e[2]->len))
                return;
        deliver(e[2]->str, e[2]->len, e[3]->str, e[3]->len);
    } else if (e[2]->type == REDIS_REPLY_INTEGER) {
        R.subscriptions = e[2]->integer;
        int psub = is_kind(kind, "psubscribe"), punsub = is_kind(kind, "punsubscribe");
        if (psub || punsub) {
            int idx = pattern_index(e[1]->str, e[1]->len);
            if (idx >= 0)
                R.pattern_ok[idx] = (uint8_t)psub;
        }
    }
}

/* --- mirroring ---------------------------------------------------------------------------------- */

/* Mirror mode: a message published on this node goes to Redis, wrapped in the envelope. */
static void on_published(const struct chan_msg *m, void *arg)
{
    struct link *l = &R.pub;
    if (!l->ready) {
        R.mirror_dropped++;
        return;
    }
    if (sdslen(l->ac->c.obuf) > R.publish_backlog) {
        drop_log(&R.mirror_dropped, "not mirrored: Redis is not keeping up", m->channel,
                 m->channel_len);
        return;
    }
    scratch.len = 0;
    buf_append(&scratch, ENVELOPE_MAGIC, ENVELOPE_MAGIC_LEN);
    buf_append(&scratch, R.node_id, NODE_ID_LEN);
    buf_append_str(&scratch, m->is_json ? ":j:" : ":r:");
    buf_append(&scratch, m->data, m->len);
    const char *argv[3] = {"PUBLISH", m->channel, scratch.data};
    size_t lens[3] = {7, m->channel_len, scratch.len};
    redisAsyncCommandArgv(l->ac, NULL, NULL, 3, argv, lens);
    R.mirror_published++;
}

static void set_observer(int mirror)
{
    static const struct chan_observer obs = {.first_subscriber = on_first_subscriber,
                                             .last_unsubscribed = on_last_unsubscribed,
                                             .published = on_published};
    chan_set_observer(mirror ? &obs : NULL);
}

/* --- /stats and /metrics ------------------------------------------------------------------------ */

static const char *state_name(const struct link *l)
{
    if (!R.cfg)
        return "off";
    if (l->ready)
        return "connected";
    return l->ac ? "connecting" : "disconnected";
}

static int connected(void) { return R.cfg && R.sub.ready && (!R.cfg->mirror || R.pub.ready); }

static void json_str(struct buf *b, const char *s)
{
    size_t n = strlen(s);
    char *out = buf_reserve(b, JSON_STRING_ENCODED_MAX(n));
    b->len += json_string_encode(s, n, out);
}

static void stats_json(struct buf *b, void *arg)
{
    int on = R.cfg != NULL;
    buf_printf(b, "\"redis\":{\"configured\":%s,\"connected\":%s,\"state\":\"%s\"",
               on ? "true" : "false", connected() ? "true" : "false", state_name(&R.sub));
    if (on) {
        buf_append_str(b, ",\"address\":");
        json_str(b, address());
    }
    buf_printf(b, ",\"reconnects\":%llu,\"messages_received\":%llu,\"messages_published\":%llu,"
                  "\"messages_dropped\":%llu,\"own_messages_dropped\":%llu,\"subscriptions\":%lld,"
                  "\"channels\":%zu,\"patterns\":%zu",
               (unsigned long long)R.sub.reconnects, (unsigned long long)R.received,
               (unsigned long long)R.published, (unsigned long long)R.dropped,
               (unsigned long long)R.own_dropped, R.subscriptions, on ? R.cfg->nchannels : 0,
               on ? R.cfg->npatterns : 0);
    buf_append_str(b, ",\"last_error\":");
    if (R.sub.error[0])
        json_str(b, R.sub.error);
    else
        buf_append_str(b, "null");
    int mirror = on && R.cfg->mirror;
    buf_printf(b, ",\"mirror\":{\"enabled\":%s", mirror ? "true" : "false");
    if (mirror)
        buf_printf(b, ",\"node_id\":\"%s\",\"state\":\"%s\",\"reconnects\":%llu", R.node_id,
                   state_name(&R.pub), (unsigned long long)R.pub.reconnects);
    buf_printf(b, ",\"published\":%llu,\"dropped\":%llu}}", (unsigned long long)R.mirror_published,
               (unsigned long long)R.mirror_dropped);
}

static void prom_line(struct buf *b, const char *name, const char *type, const char *help,
                      double value)
{
    buf_printf(b, "# HELP herald_%s %s\n# TYPE herald_%s %s\nherald_%s %.0f\n", name, help, name,
               type, name, value);
}

static void stats_prom(struct buf *b, void *arg)
{
    int on = R.cfg != NULL;
    prom_line(b, "redis_configured", "gauge", "1 when a Redis source is configured", on);
    prom_line(b, "redis_connected", "gauge", "1 when the Redis source is connected", connected());
    prom_line(b, "redis_reconnects_total", "counter", "Reconnections to Redis after a lost connection",
              (double)R.sub.reconnects);
    prom_line(b, "redis_messages_received_total", "counter", "Messages received from Redis",
              (double)R.received);
    prom_line(b, "redis_messages_published_total", "counter",
              "Messages from Redis published to local channels", (double)R.published);
    prom_line(b, "redis_messages_dropped_total", "counter",
              "Messages from Redis dropped (invalid channel name, over max_message)",
              (double)R.dropped);
    prom_line(b, "redis_own_messages_dropped_total", "counter",
              "This node's mirrored messages coming back from Redis, dropped", (double)R.own_dropped);
    prom_line(b, "redis_subscriptions", "gauge", "Redis channels and patterns subscribed",
              (double)R.subscriptions);
    prom_line(b, "redis_mirror_enabled", "gauge", "1 when mirror mode is on", on && R.cfg->mirror);
    prom_line(b, "redis_mirror_connected", "gauge", "1 when the mirror publisher is connected",
              on && R.cfg->mirror && R.pub.ready);
    prom_line(b, "redis_mirror_reconnects_total", "counter",
              "Reconnections of the mirror publisher after a lost connection",
              (double)R.pub.reconnects);
    prom_line(b, "redis_mirror_published_total", "counter", "Messages mirrored to Redis",
              (double)R.mirror_published);
    prom_line(b, "redis_mirror_dropped_total", "counter",
              "Messages not mirrored (publisher down or too far behind)", (double)R.mirror_dropped);
}

/* --- entry points ------------------------------------------------------------------------------- */

static void stop_all(void)
{
    set_observer(0);
    link_stop(&R.sub);
    link_stop(&R.pub);
    free_config(R.cfg);
    R.cfg = NULL;
    free(R.pattern_ok);
    R.pattern_ok = NULL;
    R.subscriptions = 0;
}

static void start_all(const struct config_redis *c)
{
    R.cfg = copy_config(c);
    R.pattern_ok = xcalloc(c->npatterns + 1, 1);
    link_start(&R.sub);
    if (c->mirror)
        link_start(&R.pub);
    set_observer(c->mirror);
}

/* Reload with the same connection settings, patterns and mirror mode: subscribe to the added
 * channels and unsubscribe from the removed ones, keeping the connection. */
static void update_channels(const struct config_redis *c)
{
    struct config_redis *old = R.cfg;
    R.cfg = copy_config(c);
    for (size_t i = 0; i < c->nchannels; i++) {
        const char *n = c->channels[i];
        size_t len = strlen(n);
        if (!in_list(old->channels, old->nchannels, n, len) && !covered(n, len) &&
            !(c->mirror && local_subscribers(n, len)))
            sub_command("SUBSCRIBE", n, len);
    }
    for (size_t i = 0; i < old->nchannels; i++) {
        const char *n = old->channels[i];
        size_t len = strlen(n);
        if (!in_list(c->channels, c->nchannels, n, len) && !covered(n, len) &&
            !(c->mirror && local_subscribers(n, len)))
            sub_command("UNSUBSCRIBE", n, len);
    }
    free_config(old);
}

void redis_src_configure(struct ev_loop *loop, const struct config *cfg)
{
    if (!R.registered) {
        static const struct stats_section section = {stats_json, stats_prom, NULL};
        stats_add_section(&section);
        R.registered = 1;
        link_init(&R.sub, "subscriber");
        link_init(&R.pub, "publisher");
        uint8_t id[NODE_ID_LEN / 2];
        if (RAND_bytes(id, sizeof(id)) != 1) {
            for (size_t i = 0; i < sizeof(id); i++)
                id[i] = (uint8_t)(rand() ^ (int)ev_time());
        }
        for (size_t i = 0; i < sizeof(id); i++)
            snprintf(R.node_id + 2 * i, 3, "%02x", id[i]);
        srand((unsigned)(id[0] | id[1] << 8 | id[2] << 16)); /* backoff jitter differs per node */
    }
    R.loop = loop;
    R.max_message = cfg->max_message;
    R.publish_backlog = cfg->send_queue > PUBLISH_BACKLOG_MIN ? cfg->send_queue : PUBLISH_BACKLOG_MIN;
    const struct config_redis *c = cfg->redis;
    struct config_redis *o = R.cfg;
    if (!c) {
        if (o)
            log_info("redis: source removed");
        stop_all();
        return;
    }
    if (!o) {
        start_all(c);
        return;
    }
    int same_link = str_eq(o->host, c->host) && o->port == c->port && str_eq(o->socket, c->socket) &&
                    str_eq(o->password, c->password) && o->db == c->db;
    int same_subs = list_eq(o->patterns, o->npatterns, c->patterns, c->npatterns) &&
                    o->mirror == c->mirror;
    if (!same_link || !same_subs) {
        /* New server or new subscription rules: start over; in-flight messages may be missed. */
        log_info("redis: settings changed, reconnecting");
        stop_all();
        start_all(c);
        return;
    }
    o->reconnect_min = c->reconnect_min;
    o->reconnect_max = c->reconnect_max;
    o->connect_timeout = c->connect_timeout;
    if (!list_eq(o->channels, o->nchannels, c->channels, c->nchannels))
        update_channels(c);
}

void redis_src_stop(void)
{
    if (R.cfg)
        stop_all();
    buf_free(&scratch);
}
