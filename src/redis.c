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
 * carrying its own id: it fanned those messages out locally when they were published.
 *
 * Pattern subscribers (mirror mode): each herald pattern with local subscribers is PSUBSCRIBEd as
 * the Redis glob with ">" written "*" (pattern_glob); the glob matches more than the pattern ("*"
 * crosses dots), so what comes through it is published locally only when a local subscriber wants
 * the channel. Redis sends one copy of a message per subscription of ours that matches it: the
 * channel's own SUBSCRIBE, each configured pattern, each glob. Exactly one is taken, by rank:
 * the channel subscription, then configured patterns (as above), then the oldest glob; ranks are
 * judged on the subscriptions Redis had confirmed when the copy came, which is the set it sent
 * copies through (confirmations and messages share one ordered stream). So the channels Redis
 * confirmed are kept in a set, and the confirmed globs in a trie matched the way Redis matches.
 *
 * Presence (mirror mode): see the section below. */
#include "source.h"

#include "buf.h"
#include "channel.h"
#include "config.h"
#include "json.h"
#include "log.h"
#include "pattern.h"
#include "stats.h"

#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
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

/* A small hash table of strings (SipHash-keyed: names come from clients and Redis), each with a
 * value of its user's. */
struct sentry {
    struct sentry *next;
    uint64_t hash;
    void *value;
    size_t vlen;
    size_t klen;
    char key[];
};

struct smap {
    struct sentry **b;
    size_t size, count;
};

/* Mirror mode: a glob PSUBSCRIBEd for local patterns, the data of its node in R.globs. */
struct glob {
    struct pattern_node *node;
    struct glob *prev, *next; /* every glob, on R.glob_list */
    uint32_t refs;       /* local patterns with this glob */
    uint8_t confirmed;   /* Redis confirmed the PSUBSCRIBE (and no PUNSUBSCRIBE since) */
    size_t len;
    char text[];
};

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
    /* mirror mode */
    struct smap confirmed;    /* channels Redis confirmed SUBSCRIBE for */
    struct pattern_trie *globs; /* globs of local patterns (data: struct glob) */
    struct glob *glob_list;
    size_t nglobs;
    uint64_t duplicates_dropped, filtered;
    struct smap replicas;     /* channel -> struct replica: other nodes' presence members */
    ev_timer beat;            /* heartbeat and reaping, every presence_ttl / 3 */
    uint64_t presence_events, resyncs, fetches;
} R;

static struct buf scratch;

static void link_connect(struct link *l);
static void sub_ready(void);
static void pub_ready(void);
static void mirror_sub_down(void);
static int is_configured_pattern(const char *p, size_t len);
static void subscribe_events(const char *name, size_t len, void *arg);

/* --- string tables ------------------------------------------------------------------------------ */

static struct sentry *smap_find(const struct smap *m, const char *k, size_t len)
{
    if (!m->count)
        return NULL;
    uint64_t h = buf_hash(k, len);
    for (struct sentry *e = m->b[h & (m->size - 1)]; e; e = e->next)
        if (e->hash == h && e->klen == len && memcmp(e->key, k, len) == 0)
            return e;
    return NULL;
}

/* The entry for k, added (value NULL) if missing. */
static struct sentry *smap_put(struct smap *m, const char *k, size_t len)
{
    struct sentry *e = smap_find(m, k, len);
    if (e)
        return e;
    if (m->count >= m->size) {
        size_t size = m->size ? m->size * 2 : 16;
        struct sentry **b = xcalloc(size, sizeof(*b));
        for (size_t i = 0; i < m->size; i++) {
            while (m->b[i]) {
                struct sentry *x = m->b[i];
                m->b[i] = x->next;
                x->next = b[x->hash & (size - 1)];
                b[x->hash & (size - 1)] = x;
            }
        }
        free(m->b);
        m->b = b;
        m->size = size;
    }
    e = xcalloc(1, sizeof(*e) + len + 1);
    e->hash = buf_hash(k, len);
    e->klen = len;
    memcpy(e->key, k, len);
    e->next = m->b[e->hash & (m->size - 1)];
    m->b[e->hash & (m->size - 1)] = e;
    m->count++;
    return e;
}

/* Remove and free e (not its value). */
static void smap_del(struct smap *m, struct sentry *e)
{
    struct sentry **pp = &m->b[e->hash & (m->size - 1)];
    while (*pp != e)
        pp = &(*pp)->next;
    *pp = e->next;
    m->count--;
    free(e);
}

static void smap_clear(struct smap *m, void (*free_value)(void *))
{
    for (size_t i = 0; i < m->size; i++) {
        while (m->b[i]) {
            struct sentry *e = m->b[i];
            m->b[i] = e->next;
            if (free_value)
                free_value(e->value);
            free(e);
        }
    }
    free(m->b);
    memset(m, 0, sizeof(*m));
}

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
        mirror_sub_down();
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
    else
        pub_ready();
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
    if (c->mirror) {
        chan_foreach_subscribed(subscribe_local, NULL);
        chan_foreach_presence(subscribe_events, NULL); /* each is fetched once confirmed */
    }
    batch_flush("SUBSCRIBE");
    if (c->mirror) {
        for (struct glob *g = R.glob_list; g; g = g->next)
            if (g->refs && !is_configured_pattern(g->text, g->len))
                batch_add("PSUBSCRIBE", g->text, g->len);
        batch_flush("PSUBSCRIBE");
    }
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

/* --- mirror mode: pattern subscribers ---------------------------------------------------------- */

static struct glob *glob_find(const char *text, size_t len)
{
    const char *why;
    if (!R.globs || !pattern_valid(text, len, &why))
        return NULL;
    struct pattern_node *n = pattern_find(R.globs, text, len);
    return n ? pattern_data(n) : NULL;
}

static int is_configured_pattern(const char *p, size_t len) { return pattern_index(p, len) >= 0; }

static void glob_free(struct glob *g)
{
    if (g->prev)
        g->prev->next = g->next;
    else
        R.glob_list = g->next;
    if (g->next)
        g->next->prev = g->prev;
    pattern_remove(R.globs, g->node);
    R.nglobs--;
    free(g);
}

/* A local pattern's first subscriber: PSUBSCRIBE its glob, unless another pattern with the same
 * glob, or a configured pattern equal to it, already brings its messages. */
static void on_first_pattern(const char *pattern, size_t len, void *arg)
{
    char text[PATTERN_MAX + 1];
    size_t n = pattern_glob(pattern, len, text);
    if (!R.globs)
        R.globs = pattern_trie_new();
    struct glob *g = glob_find(text, n);
    if (!g) {
        g = xcalloc(1, sizeof(*g) + n + 1);
        memcpy(g->text, text, n);
        g->len = n;
        g->node = pattern_add(R.globs, text, n);
        pattern_set_data(g->node, g);
        g->next = R.glob_list;
        if (R.glob_list)
            R.glob_list->prev = g;
        R.glob_list = g;
        R.nglobs++;
    }
    if (g->refs++ == 0 && !is_configured_pattern(text, n))
        sub_command("PSUBSCRIBE", text, n);
}

static void on_last_pattern(const char *pattern, size_t len, void *arg)
{
    char text[PATTERN_MAX + 1];
    size_t n = pattern_glob(pattern, len, text);
    struct glob *g = glob_find(text, n);
    if (!g || --g->refs)
        return;
    if (!is_configured_pattern(text, n))
        sub_command("PUNSUBSCRIBE", text, n);
    if (!g->confirmed)
        glob_free(g); /* else when Redis confirms the PUNSUBSCRIBE */
}

static void globs_clear(void)
{
    while (R.glob_list)
        glob_free(R.glob_list);
    pattern_trie_free(R.globs);
    R.globs = NULL;
}

static void min_confirmed(struct pattern_node *n, void *arg)
{
    struct glob *g = pattern_data(n);
    uint64_t *min = arg;
    if (g && g->confirmed && pattern_serial(n) < *min)
        *min = pattern_serial(n);
}

/* A copy of a message on channel, through glob (not a configured pattern). */
static void glob_message(const char *glob, size_t glob_len, const char *channel, size_t channel_len,
                         const char *data, size_t len)
{
    const char *why;
    struct glob *g = glob_find(glob, glob_len);
    if (!g || !g->confirmed || !chan_name_valid(channel, channel_len, &why))
        return; /* not one of ours any more, or a channel no herald client can want */
    /* Taken through a higher rank: the channel's own subscription, a configured pattern, an older
     * glob. */
    if (smap_find(&R.confirmed, channel, channel_len)) {
        R.duplicates_dropped++;
        return;
    }
    for (size_t j = 0; j < R.cfg->npatterns; j++)
        if (R.pattern_ok[j] && glob_match(R.cfg->patterns[j], strlen(R.cfg->patterns[j]), channel,
                                          channel_len)) {
            R.duplicates_dropped++;
            return;
        }
    uint64_t min = UINT64_MAX;
    pattern_match(R.globs, channel, channel_len, 1, min_confirmed, &min);
    if (pattern_serial(g->node) != min) {
        R.duplicates_dropped++;
        return;
    }
    /* The glob matches more than the patterns it stands for: take only what someone here wants. */
    if (!chan_pattern_wanted(channel, channel_len) && !local_subscribers(channel, channel_len)) {
        R.filtered++;
        return;
    }
    deliver(channel, channel_len, data, len);
}

/* --- mirror mode: presence ------------------------------------------------------------------------
 *
 * Redis holds, per channel, a hash "herald:presence:<channel>" of every node's members: field
 * "<node id>:<connection id>", value the member's info (JSON object text, or empty). Joins and
 * leaves are announced on the Redis channel "herald#presence:<channel>" ('#' is not allowed in a
 * herald channel name, so no herald channel can collide with it) as "j <id> <info>" / "l <id>
 * <info>". Every change is a Lua script run atomically in Redis that announces only what it really
 * changed, so two nodes doing the same cleanup announce it once.
 *
 * Each node keeps "herald:node:<id>" alive (PX presence_ttl, renewed every ttl/3), lists itself in
 * "herald:nodes" and the channels where it has members in "herald:node:<id>:channels". Every ttl/3
 * each node also runs the reaper: a node whose key expired has its members removed, each with a
 * leave announced. A node that finds its own key gone (Redis restarted, or it was silent too long
 * and reaped) writes its members again (resync), announcing the joins that are new; it does so
 * too each time its publisher connects.
 *
 * A node follows a channel (subscribes to its announcements and keeps a copy of the other nodes'
 * members, the replica) while it has local members or listeners there: the copy is fetched once
 * the subscription is confirmed, and announcements that arrive while the fetch is under way are
 * applied after it, so none is missed. A presence request for a channel it does not follow is
 * answered from a fetch of its own. Members of nodes whose key is gone are left out of fetches. */

#define EVENTS_PREFIX "herald#presence:"
#define EVENTS_PREFIX_LEN (sizeof(EVENTS_PREFIX) - 1)

/* Drop a node's members (announcing each leave) and its bookkeeping. */
#define LUA_DROP_NODE                                                                              \
    "local function drop(node)\n"                                                                  \
    "  local chkey = 'herald:node:' .. node .. ':channels'\n"                                      \
    "  local prefix = node .. ':'\n"                                                               \
    "  for _, ch in ipairs(redis.call('SMEMBERS', chkey)) do\n"                                    \
    "    local h = 'herald:presence:' .. ch\n"                                                     \
    "    local f = redis.call('HGETALL', h)\n"                                                     \
    "    for i = 1, #f, 2 do\n"                                                                    \
    "      if string.sub(f[i], 1, #prefix) == prefix then\n"                                       \
    "        redis.call('HDEL', h, f[i])\n"                                                        \
    "        redis.call('PUBLISH', '" EVENTS_PREFIX "' .. ch, 'l ' .. f[i] .. ' ' .. f[i + 1])\n"  \
    "      end\n"                                                                                  \
    "    end\n"                                                                                    \
    "  end\n"                                                                                      \
    "  redis.call('DEL', chkey)\n"                                                                 \
    "  redis.call('SREM', 'herald:nodes', node)\n"                                                 \
    "end\n"

/* ARGV: node, channel, member id, info. */
static const char LUA_JOIN[] =
    "redis.call('SADD', 'herald:node:' .. ARGV[1] .. ':channels', ARGV[2])\n"
    "if redis.call('HSET', 'herald:presence:' .. ARGV[2], ARGV[3], ARGV[4]) == 1 then\n"
    "  redis.call('PUBLISH', '" EVENTS_PREFIX "' .. ARGV[2], 'j ' .. ARGV[3] .. ' ' .. ARGV[4])\n"
    "end\n"
    "return 0\n";

/* ARGV: node, channel, member id. */
static const char LUA_LEAVE[] =
    "local h = 'herald:presence:' .. ARGV[2]\n"
    "local info = redis.call('HGET', h, ARGV[3])\n"
    "if info then\n"
    "  redis.call('HDEL', h, ARGV[3])\n"
    "  redis.call('PUBLISH', '" EVENTS_PREFIX "' .. ARGV[2], 'l ' .. ARGV[3] .. ' ' .. info)\n"
    "end\n"
    "return 0\n";

/* ARGV: channel. The members of live nodes, as field, info pairs. */
static const char LUA_FETCH[] =
    "local f = redis.call('HGETALL', 'herald:presence:' .. ARGV[1])\n"
    "local out, alive = {}, {}\n"
    "for i = 1, #f, 2 do\n"
    "  local node = string.match(f[i], '^(%x+):')\n"
    "  if node then\n"
    "    if alive[node] == nil then\n"
    "      alive[node] = redis.call('EXISTS', 'herald:node:' .. node) == 1\n"
    "    end\n"
    "    if alive[node] then\n"
    "      out[#out + 1] = f[i]\n"
    "      out[#out + 1] = f[i + 1]\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return out\n";

/* ARGV: node, ttl in ms. 1 if the node's key was still there. */
static const char LUA_BEAT[] =
    "local k = 'herald:node:' .. ARGV[1]\n"
    "local existed = redis.call('EXISTS', k)\n"
    "redis.call('SET', k, '1', 'PX', ARGV[2])\n"
    "redis.call('SADD', 'herald:nodes', ARGV[1])\n"
    "return existed\n";

/* Drop every node whose key expired. */
static const char LUA_REAP[] = LUA_DROP_NODE
    "local n = 0\n"
    "for _, node in ipairs(redis.call('SMEMBERS', 'herald:nodes')) do\n"
    "  if redis.call('EXISTS', 'herald:node:' .. node) == 0 then\n"
    "    drop(node)\n"
    "    n = n + 1\n"
    "  end\n"
    "end\n"
    "return n\n";

/* ARGV: node. This node is stopping. */
static const char LUA_GONE[] = LUA_DROP_NODE
    "drop(ARGV[1])\n"
    "redis.call('DEL', 'herald:node:' .. ARGV[1])\n"
    "return 0\n";

/* ARGV: node, ttl in ms, then channel, member id, info for each of the node's members. Makes
 * Redis hold exactly these for the node, announcing what changes, and renews its key. */
static const char LUA_RESYNC[] =
    "local node = ARGV[1]\n"
    "local chkey = 'herald:node:' .. node .. ':channels'\n"
    "local want = {}\n"
    "for i = 3, #ARGV, 3 do\n"
    "  want[ARGV[i]] = want[ARGV[i]] or {}\n"
    "  want[ARGV[i]][ARGV[i + 1]] = ARGV[i + 2]\n"
    "end\n"
    "local prefix = node .. ':'\n"
    "for _, ch in ipairs(redis.call('SMEMBERS', chkey)) do\n"
    "  local h = 'herald:presence:' .. ch\n"
    "  local f = redis.call('HGETALL', h)\n"
    "  for i = 1, #f, 2 do\n"
    "    if string.sub(f[i], 1, #prefix) == prefix and not (want[ch] and want[ch][f[i]]) then\n"
    "      redis.call('HDEL', h, f[i])\n"
    "      redis.call('PUBLISH', '" EVENTS_PREFIX "' .. ch, 'l ' .. f[i] .. ' ' .. f[i + 1])\n"
    "    end\n"
    "  end\n"
    "end\n"
    "redis.call('DEL', chkey)\n"
    "for ch, members in pairs(want) do\n"
    "  redis.call('SADD', chkey, ch)\n"
    "  for f, info in pairs(members) do\n"
    "    if redis.call('HSET', 'herald:presence:' .. ch, f, info) == 1 then\n"
    "      redis.call('PUBLISH', '" EVENTS_PREFIX "' .. ch, 'j ' .. f .. ' ' .. info)\n"
    "    end\n"
    "  end\n"
    "end\n"
    "redis.call('SET', 'herald:node:' .. node, '1', 'PX', ARGV[2])\n"
    "redis.call('SADD', 'herald:nodes', node)\n"
    "return 0\n";

enum replica_state {
    REP_WAIT,    /* not complete: the subscription to announcements or the publisher is not there */
    REP_LOADING, /* a fetch is under way */
    REP_READY,   /* fetched, and following the announcements */
};

/* Other nodes' members of one channel, as far as this node knows. */
struct replica {
    struct smap members;   /* id -> info (value: malloc'd text, vlen its length) */
    uint64_t gen;          /* bumped by each fetch: replies to earlier ones are ignored */
    uint8_t interest;      /* local members or listeners: follow the channel */
    uint8_t state;         /* enum replica_state */
    uint8_t loaded;        /* fetched at least once */
    struct buf backlog;    /* announcements received while loading: kind, ' ', id, ' ', info, NUL */
};

/* A fetch in flight: which channel, and which fetch of its replica. */
struct fetch {
    uint64_t gen;
    size_t len;
    char name[];
};

static struct replica *replica_find(const char *name, size_t len)
{
    struct sentry *e = smap_find(&R.replicas, name, len);
    return e ? e->value : NULL;
}

static void replica_free(const char *name, size_t len)
{
    struct sentry *e = smap_find(&R.replicas, name, len);
    if (!e)
        return;
    struct replica *rep = e->value;
    smap_clear(&rep->members, free);
    buf_free(&rep->backlog);
    free(rep);
    smap_del(&R.replicas, e);
}

static void free_replica_value(void *v)
{
    struct replica *rep = v;
    smap_clear(&rep->members, free);
    buf_free(&rep->backlog);
    free(rep);
}

static size_t events_channel(char *out, const char *name, size_t len)
{
    memcpy(out, EVENTS_PREFIX, EVENTS_PREFIX_LEN);
    memcpy(out + EVENTS_PREFIX_LEN, name, len);
    out[EVENTS_PREFIX_LEN + len] = 0;
    return EVENTS_PREFIX_LEN + len;
}

static int events_confirmed(const char *name, size_t len)
{
    char ev[EVENTS_PREFIX_LEN + CHAN_NAME_MAX + 1];
    size_t n = events_channel(ev, name, len);
    return smap_find(&R.confirmed, ev, n) != NULL;
}

/* "<16 hex digits>:<digits>": a member id another node may have written. */
static int member_id_valid(const char *id, size_t len)
{
    if (len < NODE_ID_LEN + 2 || len > NODE_ID_LEN + 21 || id[NODE_ID_LEN] != ':')
        return 0;
    for (size_t i = 0; i < len; i++) {
        char ch = id[i];
        if (i < NODE_ID_LEN ? !((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))
                            : i > NODE_ID_LEN && !(ch >= '0' && ch <= '9'))
            return 0;
    }
    return 1;
}

/* Info as another node wrote it: a JSON object, or nothing (anything else is taken as nothing). */
static size_t info_checked(const char *info, size_t len)
{
    return len && len <= CHAN_INFO_MAX && info[0] == '{' && json_valid(info, len) ? len : 0;
}

/* Apply a join or leave of another node's member to the replica, telling local listeners when it
 * changes something. */
static void replica_apply(struct replica *rep, const char *name, size_t name_len, int join,
                          const char *id, size_t id_len, const char *info, size_t info_len)
{
    struct sentry *e = smap_find(&rep->members, id, id_len);
    if (join) {
        int known = e != NULL;
        if (!e)
            e = smap_put(&rep->members, id, id_len);
        free(e->value);
        e->value = xmalloc(info_len + 1);
        memcpy(e->value, info, info_len);
        ((char *)e->value)[info_len] = 0;
        e->vlen = info_len;
        if (!known)
            chan_presence_event(name, name_len, 1, id, id_len, info, info_len);
    } else if (e) {
        chan_presence_event(name, name_len, 0, id, id_len, e->value, e->vlen);
        free(e->value);
        smap_del(&rep->members, e);
    }
}

/* An announcement ("j <id> <info>" or "l <id> <info>") on channel name's announcement channel. */
static void presence_announcement(const char *name, size_t name_len, const char *data, size_t len)
{
    const char *why;
    if (len < 3 || (data[0] != 'j' && data[0] != 'l') || data[1] != ' ' ||
        !chan_name_valid(name, name_len, &why))
        return;
    const char *id = data + 2, *sp = memchr(id, ' ', len - 2);
    size_t id_len = sp ? (size_t)(sp - id) : len - 2;
    const char *info = sp ? sp + 1 : "";
    size_t info_len = sp ? (size_t)(data + len - info) : 0;
    if (!member_id_valid(id, id_len) || memcmp(id, R.node_id, NODE_ID_LEN) == 0)
        return; /* ours: this node's listeners heard of it when it happened */
    R.presence_events++;
    struct replica *rep = replica_find(name, name_len);
    if (!rep || !rep->interest)
        return;
    info_len = info_checked(info, info_len);
    if (rep->state == REP_LOADING) {
        buf_append(&rep->backlog, data, 2);
        buf_append(&rep->backlog, id, id_len);
        buf_append(&rep->backlog, " ", 1);
        buf_append(&rep->backlog, info, info_len);
        buf_append(&rep->backlog, "", 1);
    } else if (rep->state == REP_READY) {
        replica_apply(rep, name, name_len, data[0] == 'j', id, id_len, info, info_len);
    } /* waiting: the fetch to come will include it */
}

/* A fetch's answer: the members of live nodes, field/info pairs. The first load is taken as is;
 * a later one tells local listeners what changed while this node was not following. Then the
 * announcements that came meanwhile are applied in order. */
static void replica_load(struct replica *rep, const char *name, size_t name_len, const redisReply *r)
{
    struct smap fresh = {0};
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *f = r->element[i], *v = r->element[i + 1];
        if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
            !member_id_valid(f->str, f->len) || memcmp(f->str, R.node_id, NODE_ID_LEN) == 0)
            continue;
        struct sentry *e = smap_put(&fresh, f->str, f->len);
        size_t n = info_checked(v->str, v->len);
        free(e->value);
        e->value = xmalloc(n + 1);
        memcpy(e->value, v->str, n);
        ((char *)e->value)[n] = 0;
        e->vlen = n;
    }
    if (rep->loaded) {
        for (size_t i = 0; i < rep->members.size; i++)
            for (struct sentry *e = rep->members.b[i]; e; e = e->next)
                if (!smap_find(&fresh, e->key, e->klen))
                    chan_presence_event(name, name_len, 0, e->key, e->klen, e->value, e->vlen);
        for (size_t i = 0; i < fresh.size; i++)
            for (struct sentry *e = fresh.b[i]; e; e = e->next)
                if (!smap_find(&rep->members, e->key, e->klen))
                    chan_presence_event(name, name_len, 1, e->key, e->klen, e->value, e->vlen);
    }
    smap_clear(&rep->members, free);
    rep->members = fresh;
    rep->loaded = 1;
    rep->state = REP_READY;
    for (size_t off = 0; off < rep->backlog.len;) {
        const char *d = rep->backlog.data + off;
        size_t n = strlen(d);
        const char *id = d + 2, *sp = memchr(id, ' ', n - 2);
        size_t id_len = (size_t)(sp - id);
        replica_apply(rep, name, name_len, d[0] == 'j', id, id_len, sp + 1, n - 2 - id_len - 1);
        off += n + 1;
    }
    rep->backlog.len = 0;
}

static void on_fetch(redisAsyncContext *ac, void *r, void *priv)
{
    struct fetch *f = priv;
    redisReply *reply = r;
    struct replica *rep = R.cfg ? replica_find(f->name, f->len) : NULL;
    if (rep && rep->gen == f->gen && rep->state == REP_LOADING) {
        if (reply && reply->type == REDIS_REPLY_ARRAY)
            replica_load(rep, f->name, f->len, reply);
        else
            rep->state = REP_WAIT; /* the publisher went, or Redis said no: answer with what is known */
        if (rep->state == REP_READY && rep->interest && !events_confirmed(f->name, f->len))
            rep->state = REP_WAIT; /* not following the announcements (the subscriber went) */
        chan_presence_ready(f->name, f->len);
        if (!rep->interest)
            replica_free(f->name, f->len);
    }
    free(f);
}

static void replica_fetch(struct replica *rep, const char *name, size_t len)
{
    rep->gen++;
    rep->backlog.len = 0;
    if (!R.pub.ready) {
        rep->state = REP_WAIT;
        return;
    }
    struct fetch *f = xmalloc(sizeof(*f) + len);
    f->gen = rep->gen;
    f->len = len;
    memcpy(f->name, name, len);
    const char *argv[4] = {"EVAL", LUA_FETCH, "0", name};
    size_t lens[4] = {4, sizeof(LUA_FETCH) - 1, 1, len};
    rep->state = REP_LOADING;
    R.fetches++;
    redisAsyncCommandArgv(R.pub.ac, on_fetch, f, 4, argv, lens);
}

/* A channel gained its first local member or listener: follow it; or lost its last: stop. */
static void on_presence_interest(const char *name, size_t len, int on, void *arg)
{
    char ev[EVENTS_PREFIX_LEN + CHAN_NAME_MAX + 1];
    size_t n = events_channel(ev, name, len);
    if (on) {
        struct sentry *e = smap_put(&R.replicas, name, len);
        if (!e->value)
            e->value = xcalloc(1, sizeof(struct replica));
        struct replica *rep = e->value;
        rep->interest = 1;
        rep->gen++; /* a fetch under way was not following the announcements: fetch again */
        rep->state = REP_WAIT;
        sub_command("SUBSCRIBE", ev, n);
        return;
    }
    sub_command("UNSUBSCRIBE", ev, n);
    replica_free(name, len);
    chan_presence_ready(name, len); /* what waited for it is answered with what is known */
}

/* Is the channel's view complete? A channel this node does not follow is fetched now. */
static int on_presence_complete(const char *name, size_t len, void *arg)
{
    if (!R.pub.ready || !R.sub.ready)
        return 1; /* it will not be better soon: answer with what is known */
    struct replica *rep = replica_find(name, len);
    if (rep)
        return rep->state == REP_READY;
    struct sentry *e = smap_put(&R.replicas, name, len);
    e->value = rep = xcalloc(1, sizeof(*rep));
    replica_fetch(rep, name, len);
    return 0;
}

static void on_presence_remote(const char *name, size_t len, chan_member_fn fn, void *fn_arg, void *arg)
{
    struct replica *rep = replica_find(name, len);
    if (!rep || !rep->loaded)
        return;
    for (size_t i = 0; i < rep->members.size; i++)
        for (struct sentry *e = rep->members.b[i]; e; e = e->next)
            fn(e->key, e->klen, e->value, e->vlen, NULL, fn_arg);
}

static void eval(const char *script, size_t script_len, redisCallbackFn *cb, int argc,
                 const char **args, const size_t *lens)
{
    if (!R.pub.ready)
        return;
    const char *argv[8];
    size_t alen[8];
    argv[0] = "EVAL";
    alen[0] = 4;
    argv[1] = script;
    alen[1] = script_len;
    argv[2] = "0";
    alen[2] = 1;
    for (int i = 0; i < argc && i < 5; i++) {
        argv[3 + i] = args[i];
        alen[3 + i] = lens[i];
    }
    redisAsyncCommandArgv(R.pub.ac, cb, NULL, 3 + argc, argv, alen);
}

static void on_presence_join(const char *name, size_t len, const char *id, size_t id_len,
                             const char *info, size_t info_len, void *arg)
{
    const char *args[4] = {R.node_id, name, id, info};
    size_t lens[4] = {NODE_ID_LEN, len, id_len, info_len};
    eval(LUA_JOIN, sizeof(LUA_JOIN) - 1, NULL, 4, args, lens); /* when down: the resync does it */
}

static void on_presence_leave(const char *name, size_t len, const char *id, size_t id_len,
                              const char *info, size_t info_len, void *arg)
{
    const char *args[3] = {R.node_id, name, id};
    size_t lens[3] = {NODE_ID_LEN, len, id_len};
    eval(LUA_LEAVE, sizeof(LUA_LEAVE) - 1, NULL, 3, args, lens);
}

/* The resync's arguments: every local member of every followed channel. Member ids are made in
 * channel.c's scratch space, so they are copied into ids; their arguments point into it once it
 * stops growing. */
struct resync_args {
    const char **argv;
    size_t *lens;
    size_t *id_off;     /* per argument: its offset in ids, or SIZE_MAX */
    size_t n, cap;
    struct buf ids;
    const char *channel;
    size_t channel_len;
};

static void resync_arg(struct resync_args *a, const char *p, size_t len, size_t id_off)
{
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 64;
        a->argv = xrealloc(a->argv, a->cap * sizeof(*a->argv));
        a->lens = xrealloc(a->lens, a->cap * sizeof(*a->lens));
        a->id_off = xrealloc(a->id_off, a->cap * sizeof(*a->id_off));
    }
    a->argv[a->n] = p;
    a->lens[a->n] = len;
    a->id_off[a->n++] = id_off;
}

static void resync_member(const char *id, size_t id_len, const char *info, size_t info_len,
                          struct conn *local, void *arg)
{
    struct resync_args *a = arg;
    resync_arg(a, a->channel, a->channel_len, SIZE_MAX);
    resync_arg(a, NULL, id_len, a->ids.len);
    buf_append(&a->ids, id, id_len);
    resync_arg(a, info, info_len, SIZE_MAX);
}

static void resync_channel(const char *name, size_t len, void *arg)
{
    struct resync_args *a = arg;
    a->channel = name;
    a->channel_len = len;
    chan_foreach_member(name, len, resync_member, a);
}

/* Make Redis hold exactly this node's members (one script, however many). */
static void resync(void)
{
    if (!R.pub.ready)
        return;
    char ttl[32];
    snprintf(ttl, sizeof(ttl), "%.0f", R.cfg->presence_ttl * 1000);
    struct resync_args a = {0};
    resync_arg(&a, "EVAL", 4, SIZE_MAX);
    resync_arg(&a, LUA_RESYNC, sizeof(LUA_RESYNC) - 1, SIZE_MAX);
    resync_arg(&a, "0", 1, SIZE_MAX);
    resync_arg(&a, R.node_id, NODE_ID_LEN, SIZE_MAX);
    resync_arg(&a, ttl, strlen(ttl), SIZE_MAX);
    chan_foreach_presence(resync_channel, &a);
    for (size_t i = 0; i < a.n; i++)
        if (a.id_off[i] != SIZE_MAX)
            a.argv[i] = a.ids.data + a.id_off[i];
    redisAsyncCommandArgv(R.pub.ac, NULL, NULL, (int)a.n, a.argv, a.lens);
    R.resyncs++;
    free(a.argv);
    free(a.lens);
    free(a.id_off);
    buf_free(&a.ids);
}

static void on_beat(redisAsyncContext *ac, void *r, void *priv)
{
    redisReply *reply = r;
    if (reply && reply->type == REDIS_REPLY_INTEGER && reply->integer == 0 && R.cfg && R.cfg->mirror) {
        log_info("redis: this node's presence had expired (Redis restarted, or the node was silent "
                 "for presence_ttl): writing its members again");
        resync();
    }
}

static void on_beat_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    char ttl[32];
    snprintf(ttl, sizeof(ttl), "%.0f", R.cfg->presence_ttl * 1000);
    const char *args[2] = {R.node_id, ttl};
    size_t lens[2] = {NODE_ID_LEN, strlen(ttl)};
    eval(LUA_BEAT, sizeof(LUA_BEAT) - 1, on_beat, 2, args, lens);
    eval(LUA_REAP, sizeof(LUA_REAP) - 1, NULL, 0, NULL, NULL);
}

/* The publisher is (again) ready: write this node's members, fetch what waits for it. */
static void pub_ready(void)
{
    if (!R.cfg->mirror)
        return;
    resync();
    for (size_t i = 0; i < R.replicas.size; i++)
        for (struct sentry *e = R.replicas.b[i]; e; e = e->next) {
            struct replica *rep = e->value;
            if (rep->interest && rep->state == REP_WAIT && events_confirmed(e->key, e->klen))
                replica_fetch(rep, e->key, e->klen);
        }
}

static void subscribe_events(const char *name, size_t len, void *arg)
{
    char ev[EVENTS_PREFIX_LEN + CHAN_NAME_MAX + 1];
    size_t n = events_channel(ev, name, len);
    sub_command("SUBSCRIBE", ev, n); /* now: a batch would keep a pointer to ev */
}

/* The subscriber went: nothing is confirmed any more; followed channels wait for it again, and
 * requests waiting are answered with what is known. */
static void mirror_sub_down(void)
{
    smap_clear(&R.confirmed, NULL);
    for (struct glob *g = R.glob_list, *next; g; g = next) {
        next = g->next;
        g->confirmed = 0;
        if (!g->refs)
            glob_free(g);
    }
    for (size_t i = 0; i < R.replicas.size; i++)
        for (struct sentry *e = R.replicas.b[i]; e; e = e->next) {
            struct replica *rep = e->value;
            if (rep->interest && rep->state != REP_LOADING)
                rep->state = REP_WAIT;
        }
    for (size_t i = 0; i < R.replicas.size; i++)
        for (struct sentry *e = R.replicas.b[i]; e; e = e->next)
            chan_presence_ready(e->key, e->klen);
}

/* --- the subscriber's stream ---------------------------------------------------------------------- */

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
        if (e[1]->len > EVENTS_PREFIX_LEN && memcmp(e[1]->str, EVENTS_PREFIX, EVENTS_PREFIX_LEN) == 0)
            presence_announcement(e[1]->str + EVENTS_PREFIX_LEN, e[1]->len - EVENTS_PREFIX_LEN,
                                  e[2]->str, e[2]->len);
        else
            deliver(e[1]->str, e[1]->len, e[2]->str, e[2]->len);
    } else if (is_kind(kind, "pmessage") && reply->elements >= 4) {
        if (e[2]->len > EVENTS_PREFIX_LEN && memcmp(e[2]->str, EVENTS_PREFIX, EVENTS_PREFIX_LEN) == 0)
            return; /* presence announcements come through their own subscriptions */
        int idx = pattern_index(e[1]->str, e[1]->len);
        if (idx < 0) {
            if (R.cfg->mirror)
                glob_message(e[1]->str, e[1]->len, e[2]->str, e[2]->len, e[3]->str, e[3]->len);
            return; /* else a pattern no longer configured */
        }
        /* Take it from the first confirmed pattern that matches, once. */
        for (int j = 0; j < idx; j++)
            if (R.pattern_ok[j] &&
                glob_match(R.cfg->patterns[j], strlen(R.cfg->patterns[j]), e[2]->str, e[2]->len))
                return;
        deliver(e[2]->str, e[2]->len, e[3]->str, e[3]->len);
    } else if (e[2]->type == REDIS_REPLY_INTEGER && e[1]->type == REDIS_REPLY_STRING) {
        R.subscriptions = e[2]->integer;
        int psub = is_kind(kind, "psubscribe"), punsub = is_kind(kind, "punsubscribe");
        int sub = is_kind(kind, "subscribe"), unsub = is_kind(kind, "unsubscribe");
        if (psub || punsub) {
            int idx = pattern_index(e[1]->str, e[1]->len);
            struct glob *g;
            if (idx >= 0) {
                R.pattern_ok[idx] = (uint8_t)psub;
            } else if ((g = glob_find(e[1]->str, e[1]->len))) {
                g->confirmed = (uint8_t)psub;
                if (!g->refs && !g->confirmed)
                    glob_free(g);
            }
        } else if (sub) {
            smap_put(&R.confirmed, e[1]->str, e[1]->len);
            struct replica *rep;
            if (e[1]->len > EVENTS_PREFIX_LEN &&
                memcmp(e[1]->str, EVENTS_PREFIX, EVENTS_PREFIX_LEN) == 0 &&
                (rep = replica_find(e[1]->str + EVENTS_PREFIX_LEN, e[1]->len - EVENTS_PREFIX_LEN)) &&
                rep->interest) /* following its announcements from now on: fetch the members */
                replica_fetch(rep, e[1]->str + EVENTS_PREFIX_LEN, e[1]->len - EVENTS_PREFIX_LEN);
        } else if (unsub) {
            struct sentry *x = smap_find(&R.confirmed, e[1]->str, e[1]->len);
            if (x)
                smap_del(&R.confirmed, x);
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
                                             .published = on_published,
                                             .first_pattern = on_first_pattern,
                                             .last_pattern = on_last_pattern,
                                             .presence_interest = on_presence_interest,
                                             .presence_join = on_presence_join,
                                             .presence_leave = on_presence_leave,
                                             .presence_complete = on_presence_complete,
                                             .presence_remote = on_presence_remote};
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
    buf_printf(b, ",\"published\":%llu,\"dropped\":%llu", (unsigned long long)R.mirror_published,
               (unsigned long long)R.mirror_dropped);
    size_t remote = 0;
    for (size_t i = 0; i < R.replicas.size; i++)
        for (struct sentry *e = R.replicas.b[i]; e; e = e->next)
            remote += ((struct replica *)e->value)->members.count;
    buf_printf(b, ",\"patterns\":%zu,\"duplicates_dropped\":%llu,\"filtered\":%llu,"
                  "\"presence\":{\"ttl\":%g,\"channels\":%zu,\"remote_members\":%zu,"
                  "\"announcements\":%llu,\"fetches\":%llu,\"resyncs\":%llu}}}",
               R.nglobs, (unsigned long long)R.duplicates_dropped, (unsigned long long)R.filtered,
               mirror ? R.cfg->presence_ttl : 0, R.replicas.count, remote,
               (unsigned long long)R.presence_events, (unsigned long long)R.fetches,
               (unsigned long long)R.resyncs);
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
    prom_line(b, "redis_mirror_patterns", "gauge", "Redis globs subscribed for local pattern subscribers",
              (double)R.nglobs);
    prom_line(b, "redis_mirror_duplicates_dropped_total", "counter",
              "Copies of a message from Redis dropped because another subscription brought it",
              (double)R.duplicates_dropped);
    prom_line(b, "redis_mirror_filtered_total", "counter",
              "Messages through a pattern's glob that no local pattern wanted", (double)R.filtered);
    prom_line(b, "redis_mirror_presence_announcements_total", "counter",
              "Presence joins and leaves heard from other nodes", (double)R.presence_events);
}

/* --- entry points ------------------------------------------------------------------------------- */

static void stop_all(void)
{
    set_observer(0);
    ev_timer_stop(R.loop, &R.beat);
    link_stop(&R.sub);
    link_stop(&R.pub);
    smap_clear(&R.confirmed, NULL);
    globs_clear();
    /* Requests waiting for other nodes' members are answered with this node's. */
    for (size_t i = 0; i < R.replicas.size; i++)
        for (struct sentry *e = R.replicas.b[i]; e; e = e->next)
            chan_presence_ready(e->key, e->klen);
    smap_clear(&R.replicas, free_replica_value);
    free_config(R.cfg);
    R.cfg = NULL;
    free(R.pattern_ok);
    R.pattern_ok = NULL;
    R.subscriptions = 0;
}

static void follow_channel(const char *name, size_t len, void *arg)
{
    on_presence_interest(name, len, 1, arg);
}

static void beat_start(void)
{
    double every = R.cfg->presence_ttl / 3;
    ev_timer_stop(R.loop, &R.beat);
    ev_timer_set(&R.beat, every, every);
    ev_timer_start(R.loop, &R.beat);
}

static void start_all(const struct config_redis *c)
{
    R.cfg = copy_config(c);
    R.pattern_ok = xcalloc(c->npatterns + 1, 1);
    if (c->mirror) {
        /* What local clients already listen to, subscribed once the subscriber is ready. */
        chan_foreach_pattern(on_first_pattern, NULL);
        chan_foreach_presence(follow_channel, NULL);
        beat_start();
    }
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
        ev_init(&R.beat, on_beat_timer);
        /* The node id presence uses too: one identity per process. */
        memcpy(R.node_id, chan_node_id(), NODE_ID_LEN);
        srand((unsigned)strtoul(R.node_id + NODE_ID_LEN - 6, NULL, 16)); /* backoff jitter differs per node */
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
    if (o->presence_ttl != c->presence_ttl) {
        o->presence_ttl = c->presence_ttl;
        if (o->mirror)
            beat_start();
    }
    if (!list_eq(o->channels, o->nchannels, c->channels, c->nchannels))
        update_channels(c);
}

void redis_src_stop(void)
{
    if (R.cfg && R.cfg->mirror && R.pub.ready) {
        /* Leaving for good: this node's members leave now, announced to the other nodes, rather
         * than when its key expires. The connection closes once Redis has answered. */
        const char *args[1] = {R.node_id};
        size_t lens[1] = {NODE_ID_LEN};
        eval(LUA_GONE, sizeof(LUA_GONE) - 1, NULL, 1, args, lens);
        redisAsyncContext *ac = R.pub.ac;
        R.pub.ac = NULL;
        R.pub.ready = 0;
        ac->data = NULL;
        redisAsyncDisconnect(ac);
    }
    if (R.cfg)
        stop_all();
    buf_free(&scratch);
}
