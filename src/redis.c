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
 * carrying its own id: it fanned those messages out locally when they were published. Two more
 * kinds belong to history kept in Redis: 'h' (a numbered message, fanned out by every node, its
 * publisher's too) and 's' (a join's mark), described in that section.
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
 * Presence, and history kept in Redis (mirror mode): see their sections below. */
#include "source.h"

#include "buf.h"
#include "channel.h"
#include "config.h"
#include "json.h"
#include "log.h"
#include "pattern.h"
#include "pubsub.h"
#include "stats.h"

#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
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
/* The elements of an array of a command's arguments: their count. */
#define NARGS(argv) ((int)(sizeof(argv) / sizeof((argv)[0])))

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
    struct smap leaving;      /* channels with an UNSUBSCRIBE not confirmed yet (value: count) */
    struct pattern_trie *globs; /* globs of local patterns (data: struct glob) */
    struct glob *glob_list;
    size_t nglobs;
    uint64_t duplicates_dropped, filtered;
    struct smap replicas;     /* channel -> struct replica: other nodes' presence members */
    ev_timer beat;            /* heartbeat and reaping, every presence_ttl / 3 */
    uint64_t presence_events, resyncs, fetches;
    /* history kept in Redis (mirror mode) */
    struct rcmd *cmd_head, *cmd_tail; /* script commands sent or held, in order */
    uint32_t cmds_sent;       /* of those, sent and not answered */
    uint8_t recovering;       /* Redis forgot a script: resend once everything sent is answered */
    struct fwait *fwait_head, **fwait_tail; /* joins waiting for their channel to be heard */
    size_t nfwait, fwait_prune_at;
    struct smap marks;        /* token -> struct mark: joins whose mark has not come */
    uint64_t next_token;
    uint64_t epoch_state;     /* draws candidate epochs */
    uint64_t marks_seen, noscript, script_errors, in_flight_max;
} R;

static struct buf scratch;

static void link_connect(struct link *l);
static void sub_ready(void);
static void pub_ready(void);
static void mirror_sub_down(void);
static int is_configured_pattern(const char *p, size_t len);
static void subscribe_events(const char *name, size_t len, void *arg);
static void marks_fail(void);
static void fwait_fail(int all);
static void cmds_fail_unsent(void);

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
        marks_fail();
        fwait_fail(0);
    } else {
        cmds_fail_unsent();
        fwait_fail(0);
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
    if (strcmp(cmd, "UNSUBSCRIBE") == 0) {
        /* Until Redis confirms it, a SUBSCRIBE sent after it is not in force yet either. */
        struct sentry *e = smap_put(&R.leaving, name, len);
        e->vlen++;
    }
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

/* --- mirror mode: history kept in Redis ---------------------------------------------------------
 *
 * A channel that a history rule covers is numbered by Redis, so that every node gives a message
 * the same seq and any node can resume any client. Per channel, with the channel name as a hash
 * tag so that a Redis Cluster keeps a channel's keys on one node:
 *     herald:{<channel>}:seq      hash: e = the epoch, s = the last seq
 *     herald:{<channel>}:history  stream: one entry per message, id "<seq>-0", fields k (j or r),
 *                                 t (Redis's time, ms), d (the payload); trimmed to the rule's
 *                                 length; both keys expire after the rule's age with no publish
 * A publish is one script (EVALSHA): the next seq, the entry, and a PUBLISH of the message in an
 * envelope of kind 'h' carrying the epoch and the seq. Every node, the publishing one too, fans
 * the message out when it comes back from Redis; the script's answer gives the publisher its seq.
 * The epoch is drawn by the node that creates the seq hash: a channel whose keys vanish (Redis lost
 * its data, or nothing was published for `age` seconds) starts a new epoch, and resumes from the
 * old one are refused rather than answered with the new numbering.
 *
 * A subscription joins at an exact point (see channel.h): once the node hears the channel (Redis
 * confirmed the SUBSCRIBE, or a configured pattern covers it), a script answers where the channel
 * is and what came after `since`, and PUBLISHes a mark (an envelope of kind 's' with a token) into
 * the channel's live stream, which reaches this node in order with the messages. A gap in a
 * channel's live seqs (Redis pub/sub is at-most-once: a lost connection) is filled from the
 * stream with a third script.
 *
 * Scripts are loaded (SCRIPT LOAD) when the publisher connects and called by their SHA1. Redis may
 * forget them (SCRIPT FLUSH, a failover): a command answered NOSCRIPT is sent again with EVAL, in
 * order with the commands after it, which are held until everything sent before is answered. */

/* KEYS: seq hash, stream. ARGV: channel, kind, payload, length, age (ms, 0: none), a new epoch
 * (used if the channel has none), node id. Returns {seq, epoch}. */
static const char LUA_HPUBLISH[] =
    "local ep = redis.call('HGET', KEYS[1], 'e')\n"
    "if not ep then\n"
    "  ep = ARGV[6]\n"
    "  redis.call('DEL', KEYS[2])\n"
    "  redis.call('HSET', KEYS[1], 'e', ep, 's', 0)\n"
    "end\n"
    "redis.call('HINCRBY', KEYS[1], 's', 1)\n"
    "local seq = redis.call('HGET', KEYS[1], 's')\n"
    "local t = redis.call('TIME')\n"
    "local ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))\n"
    "redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], seq .. '-0', 'k', ARGV[2], 't', ms, 'd', ARGV[3])\n"
    "if ARGV[5] ~= '0' then\n"
    "  redis.call('PEXPIRE', KEYS[1], ARGV[5])\n"
    "  redis.call('PEXPIRE', KEYS[2], ARGV[5])\n"
    "end\n"
    "redis.call('PUBLISH', ARGV[1], '\\255herald:1:' .. ARGV[7] .. ':h:' .. ARGV[2] .. ':' .. ep .. ':' ..\n"
    "  seq .. ':' .. ARGV[3])\n"
    "return {seq, ep}\n";

/* KEYS: seq hash, stream. ARGV: channel, since (-1: no resume), its epoch, length, age (ms), a
 * new epoch, node id, token, since + 1. Returns {epoch, last seq, recovered (1, 0, -1), then seq,
 * kind, payload of each message after since when recovered}, and marks the live stream. */
static const char LUA_HJOIN[] =
    "local ep = redis.call('HGET', KEYS[1], 'e')\n"
    "if not ep then\n"
    "  ep = ARGV[6]\n"
    "  redis.call('DEL', KEYS[2])\n"
    "  redis.call('HSET', KEYS[1], 'e', ep, 's', 0)\n"
    "  if ARGV[5] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end\n"
    "end\n"
    "local last = redis.call('HGET', KEYS[1], 's')\n"
    "local out = {ep, last, -1}\n"
    "local since, n = tonumber(ARGV[2]), tonumber(last)\n"
    "if since >= 0 then\n"
    "  out[3] = 0\n"
    "  if ARGV[3] == ep and since <= n and n - since <= tonumber(ARGV[4]) then\n"
    "    if since == n then\n"
    "      out[3] = 1\n"
    "    else\n"
    "      local e = redis.call('XRANGE', KEYS[2], ARGV[9] .. '-0', '+')\n"
    "      local ok = #e == n - since and e[1][1] == ARGV[9] .. '-0'\n"
    "      local rows = {}\n"
    "      for i = 1, #e do\n"
    "        local f = {}\n"
    "        for k = 1, #e[i][2], 2 do f[e[i][2][k]] = e[i][2][k + 1] end\n"
    "        if i == 1 and ARGV[5] ~= '0' then\n"
    "          local t = redis.call('TIME')\n"
    "          local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "          if tonumber(f.t or '0') + tonumber(ARGV[5]) < now then ok = false end\n"
    "        end\n"
    "        rows[#rows + 1] = string.match(e[i][1], '^(%d+)')\n"
    "        rows[#rows + 1] = f.k or 'r'\n"
    "        rows[#rows + 1] = f.d or ''\n"
    "      end\n"
    "      if ok then\n"
    "        out[3] = 1\n"
    "        for i = 1, #rows do out[#out + 1] = rows[i] end\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "redis.call('PUBLISH', ARGV[1], '\\255herald:1:' .. ARGV[7] .. ':s:' .. ARGV[8] .. ':' .. ep .. ':' ..\n"
    "  last)\n"
    "return out\n";

/* KEYS: seq hash, stream. ARGV: first seq, last seq. Returns {epoch, '', -1, then seq, kind,
 * payload of each message held in that range}. */
static const char LUA_HRANGE[] =
    "local ep = redis.call('HGET', KEYS[1], 'e') or ''\n"
    "local out = {ep, '', -1}\n"
    "for _, x in ipairs(redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', ARGV[2] .. '-0')) do\n"
    "  local f = {}\n"
    "  for k = 1, #x[2], 2 do f[x[2][k]] = x[2][k + 1] end\n"
    "  out[#out + 1] = string.match(x[1], '^(%d+)')\n"
    "  out[#out + 1] = f.k or 'r'\n"
    "  out[#out + 1] = f.d or ''\n"
    "end\n"
    "return out\n";

enum { SCRIPT_PUBLISH, SCRIPT_JOIN, SCRIPT_RANGE, SCRIPT_COUNT };
static const char *const script_text[SCRIPT_COUNT] = {LUA_HPUBLISH, LUA_HJOIN, LUA_HRANGE};
static char script_sha[SCRIPT_COUNT][41];

enum cmd_state {
    CMD_SENT,  /* sent, not answered */
    CMD_RETRY, /* answered NOSCRIPT: to send again with EVAL */
    CMD_HELD,  /* not sent: a command before it waits to be sent again */
};

/* A script command to the publisher, with a copy of its arguments (from numkeys on) after the
 * two that cmd_send sets (EVALSHA and the SHA1, or EVAL and the script), so that it can be sent
 * again. */
struct rcmd {
    struct rcmd *next;
    uint8_t script;
    uint8_t state;
    struct chan_pub *pub;     /* SCRIPT_PUBLISH */
    struct chan_fetch *fetch; /* SCRIPT_JOIN, SCRIPT_RANGE; NULL once failed from elsewhere */
    struct mark *mark;        /* SCRIPT_JOIN: its mark, while that has not come */
    int argc;                 /* the whole command's */
    size_t *lens;
    const char **argv;
};

/* A join waiting for its mark in the live stream. */
struct mark {
    struct chan_fetch *f;
    struct rcmd *cmd;         /* its command, while not answered */
    struct sentry *entry;     /* in R.marks */
};

/* A join waiting for the node to hear its channel (or for Redis). */
struct fwait {
    struct fwait *next;
    struct chan_fetch *f;
};

static void hist_init_scripts(void)
{
    for (int i = 0; i < SCRIPT_COUNT; i++) {
        unsigned char md[SHA_DIGEST_LENGTH];
        SHA1((const unsigned char *)script_text[i], strlen(script_text[i]), md);
        for (int k = 0; k < SHA_DIGEST_LENGTH; k++)
            snprintf(script_sha[i] + 2 * k, 3, "%02x", md[k]);
    }
    uint8_t seed[8];
    if (RAND_bytes(seed, sizeof(seed)) != 1)
        memcpy(seed, R.node_id, sizeof(seed));
    memcpy(&R.epoch_state, seed, sizeof(seed));
}

/* A new epoch, for a channel that has none yet: 16 hex digits (splitmix64 of a seeded counter). */
static void new_epoch(char out[17])
{
    uint64_t z = (R.epoch_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    snprintf(out, 17, "%016llx", (unsigned long long)z);
}

/* An epoch as Redis holds it: 1 to 32 hex digits (anything else was not written by herald). */
static int epoch_valid(const char *p, size_t len)
{
    if (!len || len > CHAN_EPOCH_MAX)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
            return 0;
    return 1;
}

/* The seq in p[0..len): 0, or -1 if it is not one. */
static int parse_seq(const char *p, size_t len, uint64_t *out)
{
    int64_t v = pubsub_seq_parse(p, len);
    if (v < 0)
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static int reply_seq(const redisReply *r, uint64_t *out)
{
    if (r->type == REDIS_REPLY_INTEGER && r->integer >= 0) {
        *out = (uint64_t)r->integer;
        return 0;
    }
    return r->type == REDIS_REPLY_STRING ? parse_seq(r->str, r->len, out) : -1;
}

/* The publisher can take a command now (not down, not being torn down). */
static int pub_usable(void)
{
    return R.cfg && R.pub.ready && R.pub.ac &&
           !(R.pub.ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING));
}

/* 1 if one of the first n configured patterns, its PSUBSCRIBE confirmed by Redis, matches the
 * channel: Redis sends the channel's messages through it. */
static int confirmed_pattern_matches(size_t n, const char *name, size_t len)
{
    for (size_t j = 0; j < n; j++)
        if (R.pattern_ok[j] && glob_match(R.cfg->patterns[j], strlen(R.cfg->patterns[j]), name, len))
            return 1;
    return 0;
}

/* Does this node hear the channel now: Redis confirmed its SUBSCRIBE, or a configured pattern's? */
static int heard(const char *name, size_t len)
{
    if (!R.sub.ready)
        return 0;
    if (smap_find(&R.confirmed, name, len) && !smap_find(&R.leaving, name, len))
        return 1;
    return confirmed_pattern_matches(R.cfg->npatterns, name, len);
}

static size_t key_name(char *out, size_t cap, const char *name, size_t len, const char *what)
{
    return (size_t)snprintf(out, cap, "herald:{%.*s}:%s", (int)len, name, what);
}

/* A command calling script with argv[0..argc) (numkeys, the keys, the arguments), copied. */
static struct rcmd *cmd_new(int script, int argc, const char **argv, const size_t *lens)
{
    size_t total = 0;
    for (int i = 0; i < argc; i++)
        total += lens[i];
    struct rcmd *c = xcalloc(1, sizeof(*c));
    c->script = (uint8_t)script;
    c->argc = 2 + argc;
    c->lens = xmalloc(c->argc * sizeof(*c->lens));
    c->argv = xmalloc(c->argc * sizeof(*c->argv) + total);
    char *p = (char *)(c->argv + c->argc);
    for (int i = 0; i < argc; i++) {
        c->argv[2 + i] = p;
        c->lens[2 + i] = lens[i];
        memcpy(p, argv[i], lens[i]);
        p += lens[i];
    }
    return c;
}

static void cmd_free(struct rcmd *c)
{
    free(c->lens);
    free(c->argv);
    free(c);
}

static void on_cmd_reply(redisAsyncContext *ac, void *r, void *priv);

/* Send c (EVALSHA, or EVAL when Redis forgot the script). Returns 0, or -1 if the publisher would
 * not take it. */
static int cmd_send(struct rcmd *c, int eval)
{
    if (!pub_usable())
        return -1;
    c->argv[0] = eval ? "EVAL" : "EVALSHA";
    c->lens[0] = strlen(c->argv[0]);
    c->argv[1] = eval ? script_text[c->script] : script_sha[c->script];
    c->lens[1] = strlen(c->argv[1]);
    if (redisAsyncCommandArgv(R.pub.ac, on_cmd_reply, c, c->argc, c->argv, c->lens) != REDIS_OK)
        return -1;
    c->state = CMD_SENT;
    R.cmds_sent++;
    if (R.cmds_sent > R.in_flight_max)
        R.in_flight_max = R.cmds_sent;
    return 0;
}

static void cmd_append(struct rcmd *c)
{
    c->next = NULL;
    if (R.cmd_tail)
        R.cmd_tail->next = c;
    else
        R.cmd_head = c;
    R.cmd_tail = c;
}

static void cmd_unlink(struct rcmd *c)
{
    struct rcmd *prev = NULL;
    for (struct rcmd *x = R.cmd_head; x; prev = x, x = x->next)
        if (x == c) {
            if (prev)
                prev->next = c->next;
            else
                R.cmd_head = c->next;
            if (R.cmd_tail == c)
                R.cmd_tail = prev;
            return;
        }
}

/* Queue c behind the commands before it: sent now, or held while some wait to be sent again.
 * Returns -1 (c not queued) if the publisher would not take it. */
static int cmd_submit(struct rcmd *c)
{
    if (R.recovering) {
        if (!pub_usable())
            return -1;
        c->state = CMD_HELD;
        cmd_append(c);
        return 0;
    }
    if (cmd_send(c, 0) < 0)
        return -1;
    cmd_append(c);
    return 0;
}

static void fetch_send_failed(struct chan_fetch *f, const char *err);

/* c failed (err says why): tell whoever waits for it, and free it. */
static void cmd_fail(struct rcmd *c, const char *err)
{
    if (c->script == SCRIPT_PUBLISH) {
        chan_pub_numbered(c->pub, 0, NULL, err);
    } else if (c->fetch) {
        if (c->mark) { /* its mark will not matter now */
            struct mark *m = c->mark;
            smap_del(&R.marks, m->entry);
            free(m);
        }
        chan_fetch_failed(c->fetch, err);
    }
    cmd_free(c);
}

/* The answer to a join or range fetch: {epoch, last, recovered, seq, kind, payload, ...}. */
static void fetch_answer(struct rcmd *c, const redisReply *r)
{
    struct chan_fetch *f = c->fetch;
    uint64_t last = 0;
    long long rec = -1;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 || (r->elements - 3) % 3 ||
        r->element[0]->type != REDIS_REPLY_STRING ||
        (r->element[0]->len && !epoch_valid(r->element[0]->str, r->element[0]->len)) ||
        (f->kind == CHAN_FETCH_JOIN && (reply_seq(r->element[1], &last) < 0 ||
                                        r->element[2]->type != REDIS_REPLY_INTEGER))) {
        R.script_errors++;
        cmd_fail(c, "Redis answered something unexpected");
        return;
    }
    if (f->kind == CHAN_FETCH_JOIN)
        rec = r->element[2]->integer;
    size_t n = (r->elements - 3) / 3;
    struct chan_fetch_entry *e = xcalloc(n + 1, sizeof(*e));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const redisReply *s = r->element[3 + 3 * i], *kind = r->element[4 + 3 * i],
                         *d = r->element[5 + 3 * i];
        if (reply_seq(s, &e[k].seq) < 0 || kind->type != REDIS_REPLY_STRING ||
            d->type != REDIS_REPLY_STRING || d->len > R.max_message)
            continue;
        e[k].data = d->str;
        e[k].len = d->len;
        /* A "JSON value" that is not one is passed on as raw bytes, as in deliver(). */
        e[k].is_json = kind->len == 1 && kind->str[0] == 'j' && json_valid(d->str, d->len);
        k++;
    }
    /* A replay with a hole is no replay: the client is told it was not recovered. (What a range
     * lacks is counted as missed, like what the history no longer holds.) */
    if (k < n && rec == 1)
        rec = 0;
    char epoch[CHAN_EPOCH_MAX + 1];
    snprintf(epoch, sizeof(epoch), "%.*s", (int)r->element[0]->len, r->element[0]->str);
    struct chan_fetch_result res = {.epoch = epoch, .last = last, .recovered = (int)rec, .n = k,
                                    .entries = e};
    if (c->mark)
        c->mark->cmd = NULL; /* the mark is still to come: f stays until then */
    chan_fetch_reply(f, &res);
    free(e);
    cmd_free(c);
}

static void cmd_complete(struct rcmd *c, const redisReply *r)
{
    if (r->type == REDIS_REPLY_ERROR) {
        char err[200];
        snprintf(err, sizeof(err), "Redis refused: %.*s", (int)(r->len > 150 ? 150 : r->len), r->str);
        R.script_errors++;
        log_warn("redis: history script failed: %.*s", (int)(r->len > 150 ? 150 : r->len), r->str);
        cmd_fail(c, err);
        return;
    }
    if (c->script != SCRIPT_PUBLISH) {
        if (!c->fetch)
            cmd_free(c);
        else
            fetch_answer(c, r);
        return;
    }
    uint64_t seq;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || reply_seq(r->element[0], &seq) < 0 ||
        r->element[1]->type != REDIS_REPLY_STRING ||
        !epoch_valid(r->element[1]->str, r->element[1]->len)) {
        R.script_errors++;
        cmd_fail(c, "Redis answered something unexpected");
        return;
    }
    char epoch[CHAN_EPOCH_MAX + 1];
    snprintf(epoch, sizeof(epoch), "%.*s", (int)r->element[1]->len, r->element[1]->str);
    chan_pub_numbered(c->pub, seq, epoch, NULL);
    cmd_free(c);
}

static void on_cmd_reply(redisAsyncContext *ac, void *r, void *priv)
{
    redisReply *reply = r;
    struct rcmd *c = priv;
    R.cmds_sent--;
    if (!reply) { /* the connection is going: the link's end fails what is held */
        cmd_unlink(c);
        cmd_fail(c, "the connection to Redis was lost before it answered (the message may have been "
                    "published)");
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR && reply->len >= 8 && memcmp(reply->str, "NOSCRIPT", 8) == 0) {
        R.noscript++;
        c->state = CMD_RETRY;
        R.recovering = 1;
    } else {
        /* Those before it that wait to be sent again would now come after it: they fail. */
        while (R.cmd_head != c && R.cmd_head && R.cmd_head->state == CMD_RETRY) {
            struct rcmd *x = R.cmd_head;
            cmd_unlink(x);
            cmd_fail(x, "Redis lost its scripts; publish again");
        }
        cmd_unlink(c);
        cmd_complete(c, reply);
    }
    if (R.recovering && R.cmds_sent == 0 && pub_usable()) {
        /* Everything sent is answered: send again, in order, what Redis did not run (EVAL loads
         * the script again), then what was held behind it. */
        R.recovering = 0;
        struct rcmd *list = R.cmd_head;
        R.cmd_head = R.cmd_tail = NULL;
        while (list) {
            struct rcmd *x = list;
            list = x->next;
            if (cmd_send(x, x->state == CMD_RETRY) < 0)
                cmd_fail(x, "Redis cannot be reached");
            else
                cmd_append(x);
        }
    }
}

/* The publisher went: fail what was held or waits to be sent again (what was sent fails in its
 * own callback). */
static void cmds_fail_unsent(void)
{
    R.recovering = 0;
    struct rcmd *list = R.cmd_head;
    R.cmd_head = R.cmd_tail = NULL;
    while (list) {
        struct rcmd *x = list;
        list = x->next;
        if (x->state == CMD_SENT)
            cmd_append(x); /* its callback comes */
        else
            cmd_fail(x, "Redis cannot be reached");
    }
}

/* Mirror mode, a channel with a history rule: m goes to Redis to be numbered. */
static int on_number(struct chan_pub *p, const struct chan_msg *m, size_t length, double age,
                     const char **err, void *arg)
{
    if (!pub_usable()) {
        *err = "its history is kept in Redis, which cannot be reached now";
        return -1;
    }
    if (sdslen(R.pub.ac->c.obuf) > R.publish_backlog) {
        *err = "its history is kept in Redis, which is not keeping up";
        return -1;
    }
    char k1[CHAN_NAME_MAX + 32], k2[CHAN_NAME_MAX + 32], len_s[24], age_s[32], ep[17];
    size_t k1n = key_name(k1, sizeof(k1), m->channel, m->channel_len, "seq");
    size_t k2n = key_name(k2, sizeof(k2), m->channel, m->channel_len, "history");
    snprintf(len_s, sizeof(len_s), "%zu", length);
    snprintf(age_s, sizeof(age_s), "%.0f", age > 0 ? age * 1000 + 0.999 : 0);
    new_epoch(ep);
    const char *argv[] = {"2", k1, k2, m->channel, m->is_json ? "j" : "r", m->data, len_s, age_s, ep,
                          R.node_id};
    size_t lens[] = {1, k1n, k2n, m->channel_len, 1, m->len, strlen(len_s), strlen(age_s), 16,
                     NODE_ID_LEN};
    struct rcmd *c = cmd_new(SCRIPT_PUBLISH, NARGS(argv), argv, lens);
    c->pub = p;
    if (cmd_submit(c) < 0) {
        cmd_free(c);
        *err = "its history is kept in Redis, which cannot be reached now";
        return -1;
    }
    return 0;
}

/* Send a fetch now. Returns 0, or -1 if the publisher would not take it. */
static int fetch_send(struct chan_fetch *f)
{
    char k1[CHAN_NAME_MAX + 32], k2[CHAN_NAME_MAX + 32], a[24], b[24], len_s[24], age_s[32], ep[17],
        token[24];
    size_t k1n = key_name(k1, sizeof(k1), f->name, f->name_len, "seq");
    size_t k2n = key_name(k2, sizeof(k2), f->name, f->name_len, "history");
    struct rcmd *c;
    if (f->kind == CHAN_FETCH_RANGE) {
        snprintf(a, sizeof(a), "%llu", (unsigned long long)f->since + 1);
        snprintf(b, sizeof(b), "%llu", (unsigned long long)f->until);
        const char *argv[] = {"2", k1, k2, a, b};
        size_t lens[] = {1, k1n, k2n, strlen(a), strlen(b)};
        c = cmd_new(SCRIPT_RANGE, NARGS(argv), argv, lens);
    } else {
        snprintf(a, sizeof(a), "%lld", (long long)f->since);
        snprintf(b, sizeof(b), "%lld", (long long)f->since + 1);
        snprintf(len_s, sizeof(len_s), "%zu", f->length);
        snprintf(age_s, sizeof(age_s), "%.0f", f->age > 0 ? f->age * 1000 + 0.999 : 0);
        snprintf(token, sizeof(token), "%llu", (unsigned long long)++R.next_token);
        new_epoch(ep);
        const char *argv[] = {"2", k1, k2, f->name, a, f->epoch, len_s, age_s, ep, R.node_id, token, b};
        size_t lens[] = {1, k1n, k2n, f->name_len, strlen(a), strlen(f->epoch), strlen(len_s),
                         strlen(age_s), 16, NODE_ID_LEN, strlen(token), strlen(b)};
        c = cmd_new(SCRIPT_JOIN, NARGS(argv), argv, lens);
    }
    c->fetch = f;
    if (cmd_submit(c) < 0) {
        cmd_free(c);
        return -1;
    }
    R.fetches++;
    if (f->kind == CHAN_FETCH_JOIN) {
        struct mark *m = xcalloc(1, sizeof(*m));
        m->f = f;
        m->cmd = c;
        m->entry = smap_put(&R.marks, token, strlen(token));
        m->entry->value = m;
        c->mark = m;
    }
    return 0;
}

static void fwait_prune(void);

/* Send the waiting joins whose channel is heard now; drop those whose subscription went. */
static void fetch_kick(void)
{
    if (!pub_usable())
        return;
    fwait_prune();
    struct fwait **pp = &R.fwait_head;
    while (*pp) {
        struct fwait *w = *pp;
        if (!heard(w->f->name, w->f->name_len)) {
            pp = &w->next;
            continue;
        }
        *pp = w->next;
        if (R.fwait_tail == &w->next)
            R.fwait_tail = pp;
        R.nfwait--;
        struct chan_fetch *f = w->f;
        free(w);
        if (fetch_send(f) < 0) {
            fetch_send_failed(f, "Redis cannot be reached");
            return; /* the rest waits for the publisher */
        }
    }
}

/* Drop the waiting joins whose subscriptions went (clients that gave up while Redis was away). */
static void fwait_prune(void)
{
    struct fwait **pp = &R.fwait_head;
    while (*pp) {
        struct fwait *w = *pp;
        if (!chan_fetch_abandoned(w->f)) {
            pp = &w->next;
            continue;
        }
        *pp = w->next;
        R.nfwait--;
        chan_fetch_failed(w->f, "its subscription went");
        free(w);
    }
    R.fwait_tail = pp;
}

static void fwait_add(struct chan_fetch *f)
{
    /* Pruned whenever the list has doubled since: clients coming and going all through a long
     * outage leave a bounded list behind, at a constant cost per join. */
    if (R.nfwait >= R.fwait_prune_at) {
        fwait_prune();
        R.fwait_prune_at = 2 * R.nfwait + 64;
    }
    struct fwait *w = xcalloc(1, sizeof(*w));
    w->f = f;
    if (!R.fwait_tail)
        R.fwait_tail = &R.fwait_head;
    *R.fwait_tail = w;
    R.fwait_tail = &w->next;
    R.nfwait++;
}

/* A fetch that could not be sent: one that may wait does; the others fail. */
static void fetch_send_failed(struct chan_fetch *f, const char *err)
{
    if (f->wait && f->kind == CHAN_FETCH_JOIN && R.cfg)
        fwait_add(f);
    else
        chan_fetch_failed(f, err);
}

static int on_fetch_request(struct chan_fetch *f, void *arg)
{
    if (f->kind == CHAN_FETCH_RANGE)
        return pub_usable() ? fetch_send(f) : -1;
    int reachable = pub_usable() && R.sub.ready;
    if (reachable && heard(f->name, f->name_len)) {
        if (fetch_send(f) == 0)
            return 0;
        if (!f->wait)
            return -1;
    } else if (!reachable && !f->wait) {
        return -1;
    }
    fwait_add(f); /* sent once the SUBSCRIBE is confirmed */
    return 0;
}

/* Fail the waiting joins that do not wait for Redis (it went), or all of them (stopping). */
static void fwait_fail(int all)
{
    struct fwait *list = R.fwait_head;
    R.fwait_head = NULL;
    R.fwait_tail = &R.fwait_head;
    R.nfwait = 0;
    while (list) {
        struct fwait *w = list;
        list = w->next;
        if (all || !w->f->wait)
            chan_fetch_failed(w->f, "its history is kept in Redis, which cannot be reached now");
        else
            fwait_add(w->f);
        free(w);
    }
}

/* The subscriber went: marks on their way are lost, so their joins fail (and start again). */
static void marks_fail(void)
{
    struct smap old = R.marks;
    memset(&R.marks, 0, sizeof(R.marks));
    for (size_t i = 0; i < old.size; i++)
        for (struct sentry *e = old.b[i]; e; e = e->next) {
            struct mark *m = e->value;
            if (m->cmd) {
                m->cmd->fetch = NULL; /* its answer, when it comes, is dropped */
                m->cmd->mark = NULL;
            }
            chan_fetch_failed(m->f, "the connection to Redis was lost");
            free(m);
        }
    smap_clear(&old, NULL);
}

/* A mark from the live stream: "<token>:<epoch>:<seq>", from this node's join fetch. */
static void mark_arrived(const char *p, size_t len)
{
    const char *c1 = memchr(p, ':', len);
    const char *c2 = c1 ? memchr(c1 + 1, ':', (size_t)(p + len - c1 - 1)) : NULL;
    uint64_t seq;
    if (!c2 || !epoch_valid(c1 + 1, (size_t)(c2 - c1 - 1)) ||
        parse_seq(c2 + 1, (size_t)(p + len - c2 - 1), &seq) < 0)
        return;
    struct sentry *e = smap_find(&R.marks, p, (size_t)(c1 - p));
    if (!e)
        return;
    struct mark *m = e->value;
    smap_del(&R.marks, e);
    if (m->cmd)
        m->cmd->mark = NULL; /* its answer comes later */
    struct chan_fetch *f = m->f;
    free(m);
    R.marks_seen++;
    char epoch[CHAN_EPOCH_MAX + 1];
    snprintf(epoch, sizeof(epoch), "%.*s", (int)(c2 - c1 - 1), c1 + 1);
    chan_fetch_marker(f, epoch, seq);
}

/* Stopping: everything waiting for Redis fails. */
static void hist_stop(void)
{
    cmds_fail_unsent();
    fwait_fail(1);
    marks_fail();
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

/* The numbered part of an 'h' envelope, "<j|r>:<epoch>:<seq>:": its length, or 0 if malformed. */
static size_t numbered_header(const char *p, size_t len, int *is_json, char epoch[CHAN_EPOCH_MAX + 1],
                              uint64_t *seq)
{
    if (len < 2 || (p[0] != 'j' && p[0] != 'r') || p[1] != ':')
        return 0;
    const char *e = p + 2, *c1 = memchr(e, ':', len - 2);
    const char *c2 = c1 ? memchr(c1 + 1, ':', (size_t)(p + len - c1 - 1)) : NULL;
    if (!c2 || !epoch_valid(e, (size_t)(c1 - e)) || parse_seq(c1 + 1, (size_t)(c2 - c1 - 1), seq) < 0)
        return 0;
    *is_json = p[0] == 'j';
    snprintf(epoch, CHAN_EPOCH_MAX + 1, "%.*s", (int)(c1 - e), e);
    return (size_t)(c2 + 1 - p);
}

/* A message from Redis on channel: unwrap the envelope, drop our own, publish the rest locally.
 * A numbered message (kind 'h') is published on every node, this one too: it is how the messages
 * of a channel whose history Redis keeps are fanned out. A mark (kind 's') is a join's point in
 * the live stream. */
static void deliver(const char *channel, size_t channel_len, const char *data, size_t len)
{
    const char *why;
    int is_json = 0, numbered = 0;
    char epoch[CHAN_EPOCH_MAX + 1];
    uint64_t seq = 0;
    if (len >= ENVELOPE_HEADER_LEN && memcmp(data, ENVELOPE_MAGIC, ENVELOPE_MAGIC_LEN) == 0 &&
        data[ENVELOPE_MAGIC_LEN + NODE_ID_LEN] == ':' && data[ENVELOPE_HEADER_LEN - 1] == ':' &&
        memchr("jrhs", data[ENVELOPE_HEADER_LEN - 2], 4)) {
        char kind = data[ENVELOPE_HEADER_LEN - 2];
        int ours = memcmp(data + ENVELOPE_MAGIC_LEN, R.node_id, NODE_ID_LEN) == 0;
        if (kind == 's') {
            if (ours)
                mark_arrived(data + ENVELOPE_HEADER_LEN, len - ENVELOPE_HEADER_LEN);
            return; /* another node's join: nothing to do here */
        }
        R.received++;
        if (kind == 'h') {
            size_t h = numbered_header(data + ENVELOPE_HEADER_LEN, len - ENVELOPE_HEADER_LEN, &is_json,
                                       epoch, &seq);
            if (!h) {
                drop_log(&R.dropped, "malformed numbered envelope", channel, channel_len);
                return;
            }
            numbered = 1;
            data += ENVELOPE_HEADER_LEN + h;
            len -= ENVELOPE_HEADER_LEN + h;
        } else {
            if (ours) {
                R.own_dropped++; /* ours: fanned out when it was published */
                return;
            }
            is_json = kind == 'j';
            data += ENVELOPE_HEADER_LEN;
            len -= ENVELOPE_HEADER_LEN;
        }
    } else {
        R.received++;
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
    if (numbered) {
        m.seq = seq;
        m.epoch = epoch;
        chan_publish_numbered(&m);
    } else if (chan_numbered_elsewhere(channel, channel_len)) {
        /* Published without a number where Redis numbers the channel: every node hears it, so
         * none may number it. */
        chan_publish(&m, NULL); /* counts it as dropped */
        drop_log(&R.dropped, "published without a number on a channel whose history Redis keeps "
                             "(publish through herald instead)", channel, channel_len);
        return;
    } else {
        chan_publish(&m, NULL);
    }
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
    if (smap_find(&R.confirmed, channel, channel_len) ||
        confirmed_pattern_matches(R.cfg->npatterns, channel, channel_len)) {
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

static void free_replica_value(void *v)
{
    struct replica *rep = v;
    smap_clear(&rep->members, free);
    buf_free(&rep->backlog);
    free(rep);
}

static void replica_free(const char *name, size_t len)
{
    struct sentry *e = smap_find(&R.replicas, name, len);
    if (!e)
        return;
    free_replica_value(e->value);
    smap_del(&R.replicas, e);
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

/* A member's info (e's value) becomes a copy of info[0..len), NUL-terminated. */
static void member_set_info(struct sentry *e, const char *info, size_t len)
{
    free(e->value);
    e->value = xmalloc(len + 1);
    memcpy(e->value, info, len);
    ((char *)e->value)[len] = 0;
    e->vlen = len;
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
        member_set_info(e, info, info_len);
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
        member_set_info(smap_put(&fresh, f->str, f->len), v->str, info_checked(v->str, v->len));
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

/* Fetch the channel's members of other nodes into rep. Returns 0, or -1 when the publisher
 * cannot take the command now (rep then waits for it: REP_WAIT). */
static int replica_fetch(struct replica *rep, const char *name, size_t len)
{
    rep->gen++;
    rep->backlog.len = 0;
    rep->state = REP_WAIT;
    if (!pub_usable())
        return -1;
    struct fetch *f = xmalloc(sizeof(*f) + len);
    f->gen = rep->gen;
    f->len = len;
    memcpy(f->name, name, len);
    const char *argv[4] = {"EVAL", LUA_FETCH, "0", name};
    size_t lens[4] = {4, sizeof(LUA_FETCH) - 1, 1, len};
    if (redisAsyncCommandArgv(R.pub.ac, on_fetch, f, 4, argv, lens) != REDIS_OK) {
        free(f);
        return -1;
    }
    rep->state = REP_LOADING;
    R.fetches++;
    return 0;
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
    if (!pub_usable() || !R.sub.ready)
        return 1; /* it will not be better soon: answer with what is known */
    struct replica *rep = replica_find(name, len);
    if (rep)
        return rep->state == REP_READY;
    struct sentry *e = smap_put(&R.replicas, name, len);
    e->value = rep = xcalloc(1, sizeof(*rep));
    if (replica_fetch(rep, name, len) < 0) {
        replica_free(name, len);
        return 1;
    }
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

/* Run script (it takes no keys) on the publisher, if it can take it now. argv[0..argc) and lens
 * are the whole command: the first three (EVAL, the script, 0) are set here, the rest are the
 * script's arguments. */
static void eval(const char *script, size_t script_len, redisCallbackFn *cb, int argc,
                 const char **argv, size_t *lens)
{
    if (!pub_usable())
        return;
    argv[0] = "EVAL";
    lens[0] = 4;
    argv[1] = script;
    lens[1] = script_len;
    argv[2] = "0";
    lens[2] = 1;
    redisAsyncCommandArgv(R.pub.ac, cb, NULL, argc, argv, lens);
}

static void on_presence_join(const char *name, size_t len, const char *id, size_t id_len,
                             const char *info, size_t info_len, void *arg)
{
    const char *argv[] = {NULL, NULL, NULL, R.node_id, name, id, info};
    size_t lens[] = {0, 0, 0, NODE_ID_LEN, len, id_len, info_len};
    /* When the publisher is down, the resync that follows its return does it. */
    eval(LUA_JOIN, sizeof(LUA_JOIN) - 1, NULL, NARGS(argv), argv, lens);
}

static void on_presence_leave(const char *name, size_t len, const char *id, size_t id_len,
                              const char *info, size_t info_len, void *arg)
{
    const char *argv[] = {NULL, NULL, NULL, R.node_id, name, id};
    size_t lens[] = {0, 0, 0, NODE_ID_LEN, len, id_len};
    eval(LUA_LEAVE, sizeof(LUA_LEAVE) - 1, NULL, NARGS(argv), argv, lens);
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
    if (!pub_usable())
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
    const char *argv[] = {NULL, NULL, NULL, R.node_id, ttl};
    size_t lens[] = {0, 0, 0, NODE_ID_LEN, strlen(ttl)};
    eval(LUA_BEAT, sizeof(LUA_BEAT) - 1, on_beat, NARGS(argv), argv, lens);
    const char *reap[3];
    size_t reap_lens[3];
    eval(LUA_REAP, sizeof(LUA_REAP) - 1, NULL, NARGS(reap), reap, reap_lens);
}

/* The publisher is (again) ready: write this node's members, fetch what waits for it. */
static void pub_ready(void)
{
    if (!R.cfg->mirror)
        return;
    /* The history scripts, before any command that calls them by SHA1 on this connection. */
    for (int i = 0; i < SCRIPT_COUNT; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", script_text[i]};
        size_t lens[3] = {6, 4, strlen(script_text[i])};
        redisAsyncCommandArgv(R.pub.ac, NULL, NULL, 3, argv, lens);
    }
    fetch_kick();
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
    smap_clear(&R.leaving, NULL);
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
        if (!confirmed_pattern_matches((size_t)idx, e[2]->str, e[2]->len))
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
                if (psub && R.nfwait)
                    fetch_kick();
            } else if ((g = glob_find(e[1]->str, e[1]->len))) {
                g->confirmed = (uint8_t)psub;
                if (!g->refs && !g->confirmed)
                    glob_free(g);
            }
        } else if (sub) {
            smap_put(&R.confirmed, e[1]->str, e[1]->len);
            if (R.nfwait)
                fetch_kick(); /* joins waiting to hear the channel */
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
            if ((x = smap_find(&R.leaving, e[1]->str, e[1]->len)) && --x->vlen == 0)
                smap_del(&R.leaving, x);
        }
    }
}

/* --- mirroring ---------------------------------------------------------------------------------- */

/* Mirror mode: a message published on this node goes to Redis, wrapped in the envelope. */
static void on_published(const struct chan_msg *m, void *arg)
{
    struct link *l = &R.pub;
    if (!pub_usable()) {
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
    if (redisAsyncCommandArgv(l->ac, NULL, NULL, 3, argv, lens) != REDIS_OK) {
        R.mirror_dropped++;
        return;
    }
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
                                             .presence_remote = on_presence_remote,
                                             .number = on_number,
                                             .fetch = on_fetch_request};
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

/* The groups of figures: /stats nests them (redis, redis.mirror, redis.mirror.history,
 * redis.mirror.presence); /metrics names them with a prefix. */
enum { FIG_REDIS, FIG_MIRROR, FIG_HISTORY, FIG_PRESENCE, FIG_GROUPS };
static const char *const fig_prefix[FIG_GROUPS] = {"redis_", "redis_mirror_", "redis_history_",
                                                   "redis_mirror_presence_"};
#define FIG_MAX 24

struct figures {
    struct stats_figure f[FIG_GROUPS][FIG_MAX];
    size_t n[FIG_GROUPS];
};

/* Every figure of /stats's "redis" object and of /metrics's herald_redis_*, in one place so that
 * the two cannot drift apart. */
static void collect(struct figures *x)
{
    int on = R.cfg != NULL, mirror = on && R.cfg->mirror;
    struct chan_rstats h;
    chan_rstats_get(&h);
    size_t remote = 0;
    for (size_t i = 0; i < R.replicas.size; i++)
        for (struct sentry *e = R.replicas.b[i]; e; e = e->next)
            remote += ((struct replica *)e->value)->members.count;
    memset(x->n, 0, sizeof(x->n));
#define FIG(g, nm, ty, hp, val)                                                                    \
    x->f[g][x->n[g]++] = (struct stats_figure){nm, STATS_##ty, hp, (double)(val)}
    FIG(FIG_REDIS, "configured", FLAG, "1 when a Redis source is configured", on);
    FIG(FIG_REDIS, "connected", FLAG, "1 when the Redis source is connected", connected());
    FIG(FIG_REDIS, "reconnects", COUNTER, "Reconnections to Redis after a lost connection",
        R.sub.reconnects);
    FIG(FIG_REDIS, "messages_received", COUNTER, "Messages received from Redis", R.received);
    FIG(FIG_REDIS, "messages_published", COUNTER, "Messages from Redis published to local channels",
        R.published);
    FIG(FIG_REDIS, "messages_dropped", COUNTER,
        "Messages from Redis dropped (invalid channel name, over max_message)", R.dropped);
    FIG(FIG_REDIS, "own_messages_dropped", COUNTER,
        "This node's mirrored messages coming back from Redis, dropped", R.own_dropped);
    FIG(FIG_REDIS, "subscriptions", GAUGE, "Redis channels and patterns subscribed", R.subscriptions);
    FIG(FIG_REDIS, "channels", GAUGE, "Redis channels configured", on ? R.cfg->nchannels : 0);
    FIG(FIG_REDIS, "patterns", GAUGE, "Redis patterns configured", on ? R.cfg->npatterns : 0);

    FIG(FIG_MIRROR, "enabled", FLAG, "1 when mirror mode is on", mirror);
    FIG(FIG_MIRROR, "connected", FLAG, "1 when the mirror publisher is connected",
        mirror && R.pub.ready);
    FIG(FIG_MIRROR, "reconnects", COUNTER,
        "Reconnections of the mirror publisher after a lost connection", R.pub.reconnects);
    FIG(FIG_MIRROR, "published", COUNTER, "Messages mirrored to Redis", R.mirror_published);
    FIG(FIG_MIRROR, "dropped", COUNTER, "Messages not mirrored (publisher down or too far behind)",
        R.mirror_dropped);
    FIG(FIG_MIRROR, "patterns", GAUGE, "Redis globs subscribed for local pattern subscribers",
        R.nglobs);
    FIG(FIG_MIRROR, "duplicates_dropped", COUNTER,
        "Copies of a message from Redis dropped because another subscription brought it",
        R.duplicates_dropped);
    FIG(FIG_MIRROR, "filtered", COUNTER, "Messages through a pattern's glob that no local pattern "
        "wanted", R.filtered);

    FIG(FIG_HISTORY, "channels", GAUGE, "Channels whose history Redis keeps", h.channels);
    FIG(FIG_HISTORY, "publishes", COUNTER, "Messages handed to Redis to be numbered and kept",
        h.publishes);
    FIG(FIG_HISTORY, "publish_errors", COUNTER,
        "Publishes refused or failed because Redis could not number them", h.publish_errors);
    FIG(FIG_HISTORY, "in_flight", GAUGE, "History scripts sent to Redis and not answered",
        R.cmds_sent);
    FIG(FIG_HISTORY, "joins", COUNTER,
        "Subscriptions that joined a channel through Redis (with or without a resume)", h.joins);
    FIG(FIG_HISTORY, "join_errors", COUNTER,
        "Subscriptions refused because Redis could not be reached", h.join_errors);
    FIG(FIG_HISTORY, "joining", GAUGE, "Subscriptions waiting for their join point", h.joining);
    FIG(FIG_HISTORY, "joins_waiting", GAUGE,
        "Joins waiting for this node to hear their channel, or for Redis", R.nfwait);
    FIG(FIG_HISTORY, "fetches", COUNTER, "Join and gap fetches sent to Redis", h.fetches);
    FIG(FIG_HISTORY, "marks", COUNTER, "Join marks that came back through the live stream",
        R.marks_seen);
    FIG(FIG_HISTORY, "gaps_filled", COUNTER, "Gaps in a channel's live stream filled from its "
        "history", h.gaps);
    FIG(FIG_HISTORY, "missed", COUNTER, "Seqs that could not be filled (no longer in the history)",
        h.missed);
    FIG(FIG_HISTORY, "duplicates", COUNTER, "Numbered messages seen twice, dropped", h.duplicates);
    FIG(FIG_HISTORY, "held", GAUGE, "Live messages held while a gap is filled or a join is answered",
        h.held);
    FIG(FIG_HISTORY, "epoch_changes", COUNTER,
        "Channels whose history started again under a new epoch", h.epoch_changes);
    FIG(FIG_HISTORY, "unnumbered_dropped", COUNTER,
        "Messages published to Redis without a number on such a channel, dropped",
        h.unnumbered_dropped);
    FIG(FIG_HISTORY, "script_errors", COUNTER,
        "History scripts that failed or were answered with something unexpected", R.script_errors);
    FIG(FIG_HISTORY, "noscript", COUNTER, "History scripts Redis had forgotten (sent again)",
        R.noscript);

    FIG(FIG_PRESENCE, "ttl", GAUGE, "Seconds a node's presence lasts without a heartbeat",
        mirror ? R.cfg->presence_ttl : 0);
    FIG(FIG_PRESENCE, "channels", GAUGE, "Channels whose members of other nodes are followed",
        R.replicas.count);
    FIG(FIG_PRESENCE, "remote_members", GAUGE, "Presence members of other nodes known here",
        remote);
    FIG(FIG_PRESENCE, "announcements", COUNTER, "Presence joins and leaves heard from other nodes",
        R.presence_events);
    FIG(FIG_PRESENCE, "fetches", COUNTER, "Fetches of other nodes' members", R.fetches);
    FIG(FIG_PRESENCE, "resyncs", COUNTER, "Times this node wrote all its members to Redis again",
        R.resyncs);
#undef FIG
}

static void stats_json(struct buf *b, void *arg)
{
    struct figures x;
    collect(&x);
    buf_append_str(b, "\"redis\":{");
    stats_figures_json(b, x.f[FIG_REDIS], x.n[FIG_REDIS]);
    buf_printf(b, ",\"state\":\"%s\"", state_name(&R.sub));
    if (R.cfg) {
        buf_append_str(b, ",\"address\":");
        json_str(b, address());
    }
    buf_append_str(b, ",\"last_error\":");
    if (R.sub.error[0])
        json_str(b, R.sub.error);
    else
        buf_append_str(b, "null");
    buf_append_str(b, ",\"mirror\":{");
    stats_figures_json(b, x.f[FIG_MIRROR], x.n[FIG_MIRROR]);
    if (R.cfg && R.cfg->mirror)
        buf_printf(b, ",\"node_id\":\"%s\",\"state\":\"%s\"", R.node_id, state_name(&R.pub));
    buf_append_str(b, ",\"history\":{");
    stats_figures_json(b, x.f[FIG_HISTORY], x.n[FIG_HISTORY]);
    buf_append_str(b, "},\"presence\":{");
    stats_figures_json(b, x.f[FIG_PRESENCE], x.n[FIG_PRESENCE]);
    buf_append_str(b, "}}}");
}

static void stats_prom(struct buf *b, void *arg)
{
    struct figures x;
    collect(&x);
    for (int g = 0; g < FIG_GROUPS; g++)
        stats_figures_prom(b, fig_prefix[g], x.f[g], x.n[g]);
}

/* --- entry points ------------------------------------------------------------------------------- */

static void stop_all(void)
{
    set_observer(0);
    ev_timer_stop(R.loop, &R.beat);
    link_stop(&R.sub);
    link_stop(&R.pub);
    hist_stop();
    mirror_sub_down(); /* requests waiting for other nodes' members are answered with this node's */
    globs_clear();
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
        hist_init_scripts();
        R.fwait_tail = &R.fwait_head;
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
    if (R.cfg && R.cfg->mirror && pub_usable()) {
        /* Leaving for good: this node's members leave now, announced to the other nodes, rather
         * than when its key expires. The connection closes once Redis has answered. */
        const char *argv[] = {NULL, NULL, NULL, R.node_id};
        size_t lens[] = {0, 0, 0, NODE_ID_LEN};
        eval(LUA_GONE, sizeof(LUA_GONE) - 1, NULL, NARGS(argv), argv, lens);
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
