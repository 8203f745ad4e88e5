/* channel.c - channel registry (a keyed hash table), subscriptions to channels and patterns,
 * batched fan-out, history and presence. */
#include "channel.h"

#include "buf.h"
#include "config.h"
#include "conn.h"
#include "deflate.h"
#include "pattern.h"
#include "route.h"
#include "stats.h"
#include "ws.h"

#include <assert.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct group;
struct member;

#define NOT_LISTENING UINT32_MAX

/* What few subscriptions need: kept apart, so that the many plain ones stay small (every idle
 * subscriber holds one struct sub). */
struct sub_ext {
    struct sub *dual_prev, *dual_next; /* on the channel's dual list (its connection has patterns) */
    struct member *member; /* its presence membership; NULL when not a member */
    uint32_t listener;     /* position in the presence's listeners, or NOT_LISTENING */
    uint8_t dual;
    struct chan_join *join; /* while joining */
};

struct sub {
    struct conn *conn;
    struct group *group;
    struct sub *conn_next; /* the connection's next subscription */
    struct sub_ext *ext;   /* NULL unless dual, a presence member, a listener or joining */
    uint32_t idx;          /* position in group->subs */
    uint32_t skip_msgs;    /* messages of its group's batch it is not owed (see skip) */
    size_t skip;           /* batch offset where what it is owed starts: bytes before were
                              published before it subscribed, or have been queued to it */
    uint8_t joining;       /* waiting for its join point: given no live message */
};

static struct sub_ext *sub_ext(struct sub *s)
{
    if (!s->ext) {
        s->ext = xcalloc(1, sizeof(*s->ext));
        s->ext->listener = NOT_LISTENING;
    }
    return s->ext;
}

/* Free s's extension once it holds nothing. */
static void sub_ext_trim(struct sub *s)
{
    struct sub_ext *x = s->ext;
    if (x && !x->dual && !x->member && x->listener == NOT_LISTENING && !x->join) {
        free(x);
        s->ext = NULL;
    }
}

static struct member *sub_member(const struct sub *s) { return s->ext ? s->ext->member : NULL; }
static int sub_listening(const struct sub *s) { return s->ext && s->ext->listener != NOT_LISTENING; }

/* The subscribers of one channel on one route: they all receive the same frames. Subscribers that
 * negotiated permessage-deflate are grouped apart, by the window size they negotiated: their
 * frames carry the message compressed, made once per message for the whole group. A group per
 * window size in use, rather than compressing once with the smallest window among them, keeps one
 * client that asks for a small window from making every other subscriber's messages larger; in
 * practice nearly every client takes the default, so a route has at most one compressed group. */
struct group {
    struct chan *chan;
    struct route *route;
    uint8_t pmd_bits;         /* the permessage-deflate window of its subscribers; 0: plain */
    struct group *next;       /* the channel's next group */
    struct group *dirty_next; /* on the dirty list while it has unsettled messages */
    struct sub **subs;
    uint32_t nsubs, cap;
    struct block *batch;      /* frames published this pass; NULL when none */
    uint32_t pending_msgs;    /* messages in batch */
    uint8_t dirty;
};

/* The last messages of a channel, for clients that come back and say where they were. */
struct hist_entry {
    uint64_t seq;
    double time;
    struct block *data; /* the payload as published */
    uint8_t is_json;
};

struct history {
    struct hist_entry *ring;   /* NULL while it holds nothing */
    uint32_t cap, head, count; /* head: the oldest entry */
    uint32_t length;           /* the rule's: what cap grows up to */
    double age;
    char epoch[CHAN_EPOCH_MAX + 1]; /* what its seqs are counted in, see hist_new */
};

#define HIST_MIN_CAP 8

/* A live message (or a join's mark) that waits while its channel holds. */
struct held {
    struct held *next;
    struct chan_fetch *mark; /* a join's mark, or NULL: a message */
    uint64_t seq;
    uint8_t is_json;
    char epoch[CHAN_EPOCH_MAX + 1];
    size_t len;
    char data[];
};

/* A channel numbered by the observer (Redis): its history is kept there. seq is the last message
 * delivered here; while known, every message of epoch up to seq was, so a seq that skips ahead is
 * a gap to fill. */
struct rstate {
    size_t length;          /* its history rule */
    double age;
    char epoch[CHAN_EPOCH_MAX + 1];
    uint8_t known;
    uint8_t filling;        /* a RANGE fetch is filling a gap */
    uint64_t tried;         /* gaps up to this seq were fetched already: not again */
    uint32_t holds;         /* reasons to hold live messages: a fill, marks come before answers */
    uint32_t refs;          /* fetches and joins under way: the channel stays */
    uint32_t draining;      /* rs_drain is running (maybe nested): the mode stays */
    struct held *head, *tail;
    size_t nheld;
};

/* A subscription waiting for its answer and its join point. */
struct replay_entry {
    struct replay_entry *next;
    uint64_t seq;
    uint8_t is_json;
    size_t len;
    char data[];
};

struct chan_join {
    struct sub *sub;
    struct chan_fetch *f;    /* the fetch under way, or NULL */
    chan_join_fn done;       /* NULL: nobody waits for an answer */
    void *arg;
    int64_t since;
    char epoch[CHAN_EPOCH_MAX + 1]; /* asked; then the channel's as answered */
    uint64_t last;           /* the answer's seq */
    uint8_t wait;            /* wait for the observer rather than fail */
    uint8_t answered;        /* the answer came (and was handed to done) */
    uint8_t emitted;         /* chan_join_emit was called: replay as answers come */
    uint8_t marked;          /* its mark was reached in the live stream */
    uint8_t holding;         /* the channel holds for it (the mark came first) */
    struct replay_entry *replay, **replay_tail;
    /* The last message of the channel its connection was given since the join began, through its
     * patterns (which serve it until its mark) or the replay: what it has, or what would now come
     * out of order, is not given again. given_epoch "": none yet. */
    uint64_t given;
    char given_epoch[CHAN_EPOCH_MAX + 1];
};

/* The patterns a channel matched when the trie was last changed (generation gen), in the order
 * they were created, so a connection with several of them is served through the same one while
 * the set stays the same. */
struct pmatch {
    uint64_t gen;
    uint32_t n, cap;
    uint32_t reached; /* connections its last message reached through them (and not the channel) */
    struct ppat *p[];
};

struct chan {
    struct chan *hnext;
    struct history *hist;               /* NULL unless a history rule covers the name (kept here) */
    struct rstate *rs;                  /* a history rule covers it, kept by the observer */
    struct chan *idle_prev, *idle_next; /* on the idle list while it has no subscriber */
    struct group *groups;
    struct sub *dual;                   /* subscribers whose connections also have patterns */
    struct pmatch *pm;                  /* NULL until published to while patterns exist */
    struct presence *pres;              /* NULL until a subscriber is a member or a listener */
    uint64_t hash;
    uint64_t seq;
    size_t nsubs;
    ev_tstamp idle_since;
    size_t name_len;
    char name[];
};

/* --- patterns --- */

struct pgroup;

/* A pattern with local subscribers (or groups still settling): the data of its trie node. */
struct ppat {
    struct pattern_node *node;
    struct ppat *list_prev, *list_next; /* every pattern, for chan_foreach_pattern */
    struct pgroup *groups;
    uint32_t nsubs;
    uint32_t len;
    char text[];
};

/* The subscribers of one pattern on one route. The frames of the messages its subscribers are
 * given this pass are appended to batch; each subscriber is owed a region of it. */
struct pgroup {
    struct ppat *pat;
    struct route *route;
    uint8_t pmd_bits;          /* its subscribers' permessage-deflate window, as for groups */
    struct pgroup *next;       /* the pattern's next group */
    struct pgroup *dirty_next; /* on the pattern dirty list while it has frames this pass */
    struct psub **subs;
    uint32_t nsubs, cap;
    struct block *batch;
    uint64_t frame_stamp;      /* the message whose frame was last appended (or dropped) */
    size_t frame_off, frame_len; /* where it is in batch; frame_len 0: the route dropped it */
    uint8_t dirty;
};

/* A connection's subscription to a pattern. */
struct psub {
    struct conn *conn;
    struct pgroup *group;
    struct psub *conn_next;    /* the connection's next pattern subscription */
    uint32_t idx;              /* position in group->subs */
    uint32_t msgs;             /* messages in the region it is owed */
    size_t start, end;         /* the region of group->batch it is owed, not queued yet */
};

/* --- presence --- */

struct member {
    struct member *prev, *next; /* the channel's members, in the order they joined */
    struct sub *sub;
    uint32_t info_len;
    char info[];                /* a JSON object's text, or nothing */
};

struct presence {
    struct member *head, *tail;
    uint32_t nmembers;
    struct sub **listeners;
    uint32_t nlisteners, cap;
};

/* A presence request waiting for the observer to fetch other nodes' members. */
struct preq {
    struct preq *next;
    struct conn *conn;
    size_t name_len, id_len; /* id_len 0: the request had no id */
    char data[];             /* the channel name, then the id's JSON text */
};

#define PREQ_MAX 10000 /* requests kept waiting at once; more are answered with what is known */

static struct chan **table;
static size_t table_size, chan_total;
static uint64_t sub_total;
static struct group *dirty_list;
static struct chan *idle_head, *idle_tail;
static double idle_ttl = 300;
static struct chan_observer observer;

static struct pattern_trie *trie;   /* NULL until the first pattern subscription */
static uint64_t pattern_gen = 1;    /* bumped when a pattern comes or goes: match caches are stale */
static uint64_t psub_total;         /* pattern subscriptions; 0: publishing skips the trie */
static uint64_t deliver_stamp;      /* one per message matched against patterns */
static struct pgroup *pdirty_list;
static struct {
    uint64_t walks, nodes_visited, cache_hits, deliveries;
} pstats;
static struct {
    uint64_t members, listeners, channels, events, joins, leaves;
} prstats;
static struct preq *preqs;
static size_t npreqs;
static char node_id[17];
static struct chan_rstats rstats;

static void rs_settle_mode(struct chan *ch);

void chan_set_observer(const struct chan_observer *o)
{
    if (o)
        observer = *o;
    else
        memset(&observer, 0, sizeof(observer));
    for (size_t i = 0; i < table_size; i++)
        for (struct chan *ch = table[i]; ch; ch = ch->hnext)
            rs_settle_mode(ch);
}

void chan_foreach_subscribed(void (*fn)(const char *name, size_t len, void *arg), void *arg)
{
    for (size_t i = 0; i < table_size; i++)
        for (struct chan *ch = table[i]; ch; ch = ch->hnext)
            if (ch->nsubs)
                fn(ch->name, ch->name_len, arg);
}

static size_t max_subs_per_conn = 1000;
static struct config_history *hist_rules;
static size_t hist_nrules;
static char proc_epoch[17];

void chan_set_history(const struct config_history *rules, size_t n)
{
    for (size_t i = 0; i < hist_nrules; i++)
        free(hist_rules[i].prefix);
    free(hist_rules);
    hist_rules = xcalloc(n + 1, sizeof(*hist_rules));
    for (size_t i = 0; i < n; i++) {
        hist_rules[i] = rules[i];
        hist_rules[i].prefix = xstrdup(rules[i].prefix);
    }
    hist_nrules = n;
}

const char *chan_epoch(void)
{
    if (!proc_epoch[0]) {
        /* A new epoch per process: seqs restart with it, so a resume across a restart is told. */
        uint8_t r[8];
        if (RAND_bytes(r, sizeof(r)) != 1)
            memset(r, 0, sizeof(r));
        for (int i = 0; i < 8; i++)
            snprintf(proc_epoch + 2 * i, 3, "%02x", r[i]);
    }
    return proc_epoch;
}

/* The history rule covering a channel name (the first that matches), or NULL. */
static const struct config_history *rule_for(const char *name, size_t len)
{
    for (size_t i = 0; i < hist_nrules; i++) {
        size_t plen = strlen(hist_rules[i].prefix);
        if (len >= plen && memcmp(name, hist_rules[i].prefix, plen) == 0)
            return &hist_rules[i];
    }
    return NULL;
}

/* A history of at most length messages. Its ring grows as they come rather than being made whole
 * now: a rule may keep a million messages, and every channel it covers is made at its first
 * publish or subscription. */
static struct history *hist_new(size_t length, double age)
{
    /* Each history has an epoch of its own, this process's and a number: a channel forgotten and
     * made again counts from 1 again, and a client resuming from before must be told so, not be
     * given the new channel's messages as if they followed. */
    static uint32_t made;
    struct history *h = xcalloc(1, sizeof(*h));
    h->length = (uint32_t)length;
    h->age = age;
    snprintf(h->epoch, sizeof(h->epoch), "%s%08x", chan_epoch(), ++made);
    return h;
}

static struct rstate *rs_new(size_t length, double age)
{
    struct rstate *rs = xcalloc(1, sizeof(*rs));
    rs->length = length;
    rs->age = age;
    rstats.channels++;
    return rs;
}

/* Is the observer numbering channels with history? */
static int numbering(void) { return observer.number != NULL; }

static struct hist_entry *hist_at(struct history *h, uint32_t i) { return &h->ring[(h->head + i) % h->cap]; }

static void hist_drop_oldest(struct history *h)
{
    block_unref(hist_at(h, 0)->data);
    h->head = (h->head + 1) % h->cap;
    h->count--;
}

/* Forget entries older than the history's age, and the ring once it holds none. */
static void hist_expire(struct history *h, double now)
{
    while (h->count && h->age > 0 && hist_at(h, 0)->time + h->age < now)
        hist_drop_oldest(h);
    if (!h->count && h->ring) {
        free(h->ring);
        h->ring = NULL;
        h->cap = h->head = 0;
    }
}

/* Double the ring (up to the history's length), its entries moved to the front in order. */
static void hist_grow(struct history *h)
{
    uint32_t cap = h->cap ? h->cap * 2 : HIST_MIN_CAP;
    if (cap > h->length)
        cap = h->length;
    struct hist_entry *ring = xmalloc(cap * sizeof(*ring));
    for (uint32_t i = 0; i < h->count; i++)
        ring[i] = *hist_at(h, i);
    free(h->ring);
    h->ring = ring;
    h->cap = cap;
    h->head = 0;
}

static void hist_append(struct history *h, const struct chan_msg *m, double now)
{
    if (h->count == h->cap && h->cap < h->length)
        hist_grow(h);
    else if (h->count == h->cap)
        hist_drop_oldest(h);
    struct hist_entry *e = hist_at(h, h->count++);
    e->seq = m->seq;
    e->time = now;
    e->data = block_new(m->len);
    memcpy(e->data->data, m->data, m->len);
    e->data->len = m->len;
    e->is_json = m->is_json;
}

static void hist_free(struct history *h)
{
    if (!h)
        return;
    while (h->count)
        hist_drop_oldest(h);
    free(h->ring);
    free(h);
}

static void stats_json(struct buf *b, void *arg);
static void stats_prom(struct buf *b, void *arg);

static void rs_free(struct rstate *rs)
{
    if (!rs)
        return;
    while (rs->head) {
        struct held *h = rs->head;
        rs->head = h->next;
        free(h);
    }
    rstats.held -= rs->nheld;
    rstats.channels--;
    free(rs);
}

void chan_init(double ttl, size_t max_subscriptions)
{
    idle_ttl = ttl;
    max_subs_per_conn = max_subscriptions;
    if (!table) {
        table_size = 1024;
        table = xcalloc(table_size, sizeof(*table));
        static const struct stats_section section = {stats_json, stats_prom, NULL};
        stats_add_section(&section);
    }
}

int chan_name_valid(const char *name, size_t len, const char **why)
{
    if (len == 0) {
        *why = "channel name is empty";
        return 0;
    }
    if (len > CHAN_NAME_MAX) {
        *why = "channel name is longer than 200 bytes";
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '-' || ch == '.' || ch == ':' || ch == '/')) {
            *why = "channel name may only hold A-Z a-z 0-9 _ - . : /";
            return 0;
        }
    }
    return 1;
}

static void idle_unlink(struct chan *ch)
{
    if (ch->idle_prev)
        ch->idle_prev->idle_next = ch->idle_next;
    else if (idle_head == ch)
        idle_head = ch->idle_next;
    else
        return;
    if (ch->idle_next)
        ch->idle_next->idle_prev = ch->idle_prev;
    else
        idle_tail = ch->idle_prev;
    ch->idle_prev = ch->idle_next = NULL;
}

static void idle_append(struct chan *ch, ev_tstamp now)
{
    ch->idle_since = now;
    ch->idle_prev = idle_tail;
    ch->idle_next = NULL;
    if (idle_tail)
        idle_tail->idle_next = ch;
    else
        idle_head = ch;
    idle_tail = ch;
}

static void table_grow(void)
{
    size_t size = table_size * 2;
    struct chan **t = xcalloc(size, sizeof(*t));
    for (size_t i = 0; i < table_size; i++) {
        struct chan *ch = table[i];
        while (ch) {
            struct chan *next = ch->hnext;
            size_t b = ch->hash & (size - 1);
            ch->hnext = t[b];
            t[b] = ch;
            ch = next;
        }
    }
    free(table);
    table = t;
    table_size = size;
}

static struct chan *chan_lookup(const char *name, size_t len, int create)
{
    uint64_t h = buf_hash(name, len);
    for (struct chan *ch = table[h & (table_size - 1)]; ch; ch = ch->hnext)
        if (ch->hash == h && ch->name_len == len && memcmp(ch->name, name, len) == 0)
            return ch;
    if (!create)
        return NULL;
    if (chan_total >= table_size)
        table_grow();
    struct chan *ch = xcalloc(1, sizeof(*ch) + len + 1);
    memcpy(ch->name, name, len);
    ch->name_len = len;
    ch->hash = h;
    size_t b = h & (table_size - 1);
    ch->hnext = table[b];
    table[b] = ch;
    chan_total++;
    const struct config_history *rule = rule_for(name, len);
    if (rule && numbering())
        ch->rs = rs_new(rule->length, rule->age);
    else if (rule)
        ch->hist = hist_new(rule->length, rule->age);
    idle_append(ch, ev_time());
    return ch;
}

static const char *epoch_of(const struct chan *ch)
{
    return ch && ch->hist ? ch->hist->epoch : chan_epoch();
}

const char *chan_epoch_of(const char *name, size_t len)
{
    return epoch_of(chan_lookup(name, len, 0));
}

static void chan_free(struct chan *ch)
{
    struct chan **pp = &table[ch->hash & (table_size - 1)];
    while (*pp != ch)
        pp = &(*pp)->hnext;
    *pp = ch->hnext;
    idle_unlink(ch);
    chan_total--;
    hist_free(ch->hist);
    rs_free(ch->rs);
    free(ch->pm);
    free(ch);
}

/* Unlink and free a group with no subscribers; a dirty one waits for chan_settle. */
static void group_release(struct group *g)
{
    if (g->nsubs || g->dirty)
        return;
    struct group **pp = &g->chan->groups;
    while (*pp != g)
        pp = &(*pp)->next;
    *pp = g->next;
    block_unref(g->batch);
    route_unref(g->route);
    free(g->subs);
    free(g);
}

static void group_settle(struct group *g);

/* Must batch b be handed out before a frame of need bytes is appended to it? A batch only its
 * group holds may grow (and move); a shared one never moves, so it must when it is full. So must
 * one that would pass CHAN_BATCH_MAX: a pass of large messages is not gathered in one ever larger
 * block. */
static int batch_full(const struct block *b, size_t need)
{
    return b && ((b->refs > 1 && b->cap - b->len < need) ||
                 (b->len && b->len + need > CHAN_BATCH_MAX));
}

/* Make sure g has a batch that a frame of about need bytes can be appended to: what a full one
 * holds goes to g's subscribers first (the other groups batch on), and a new one is started. */
static void group_make_room(struct group *g, size_t need)
{
    if (batch_full(g->batch, need))
        group_settle(g);
    if (!g->batch)
        g->batch = block_new(need > 4096 ? need : 4096);
}

/* The payload for g's subscribers, who negotiated permessage-deflate: the message compressed once
 * for all of them, in place of *p and *len with RSV1 added to *opcode, unless it is shorter than
 * the route's min_size or does not shrink (then it goes as it is). */
static void group_deflate(struct group *g, const char **p, size_t *len, int *opcode)
{
    static struct buf z; /* reused for every message: compressing allocates nothing per delivery */
    if (pmd_compress(g->pmd_bits, g->route->deflate_level, g->route->deflate_min_size, *p, *len, &z)) {
        *p = z.data;
        *len = z.len;
        *opcode |= WS_FRAME_RSV1;
    }
}

static struct pmatch *chan_patterns(struct chan *ch);
static int patterns_want(const struct pmatch *pm, const struct route *r, int bits);
struct rframe;
static struct rframe *frame_keep(struct route *r, const char *payload, size_t len, int opcode);
static struct rframe *frame_set(struct route *r, uint8_t bits, const char *payload, size_t len,
                                int opcode);
static size_t pattern_deliver(struct chan *ch, struct chan_msg *m, struct pmatch *pm);

static int hand_over(struct chan *ch, struct chan_msg *m, struct conn *c, chan_pub_fn done, void *arg,
                     struct chan_pub **handle);

/* Publish m: number it (unless m->numbered: its seq was given) and fan it out to the channel's
 * subscribers, those of patterns matching it, and the observer. On a channel the observer numbers,
 * an unnumbered message is handed over instead (0 returned). This is the hot path: the paths of
 * numbered messages come through here too (fanout), so its body exists once. */
uint64_t chan_publish(struct chan_msg *m, size_t *subscribers)
{
    struct chan *ch = chan_lookup(m->channel, m->channel_len, 1);
    if (!m->numbered) {
        if (ch->rs && numbering()) { /* fanned out when it comes back numbered */
            hand_over(ch, m, NULL, NULL, NULL, NULL);
            if (subscribers)
                *subscribers = 0;
            return 0;
        }
        m->seq = ++ch->seq;
        if (ch->hist)
            m->epoch = ch->hist->epoch;
    }
    stats.messages_in++;
    if (ch->hist && !m->numbered)
        hist_append(ch->hist, m, ev_time());
    if (!ch->nsubs) { /* a publish renews an idle channel */
        idle_unlink(ch);
        idle_append(ch, ev_time());
    }
    /* Patterns matter only while someone subscribes to one: otherwise the trie is not looked at.
     * Nothing below lets a pattern go, so pm stays valid until they are delivered to. */
    struct pmatch *pm = psub_total ? chan_patterns(ch) : NULL;
    int patterns = pm && pm->n;
    if (patterns)
        deliver_stamp++;
    /* A route's groups sit next to each other (see chan_subscribe), so its payload is made once
     * and serves its plain and its compressed subscribers alike. */
    struct route *made_for = NULL;
    int made = -1;
    const char *route_data = NULL;
    size_t route_len = 0;
    int route_opcode = 0;
    for (struct group *g = ch->groups; g; g = g->next) {
        if (!g->nsubs)
            continue;
        if (g->route != made_for) {
            made_for = g->route;
            made = route_payload(g->route, m, &route_data, &route_len, &route_opcode);
            /* Kept for the route's pattern subscribers, if a matching pattern has some. */
            if (patterns && patterns_want(pm, g->route, -1))
                frame_keep(g->route, made < 0 ? NULL : route_data, route_len, route_opcode);
        }
        if (made < 0)
            continue;
        const char *payload = route_data;
        size_t len = route_len;
        int opcode = route_opcode;
        if (g->pmd_bits && opcode != ROUTE_OP_UNFRAMED) {
            group_deflate(g, &payload, &len, &opcode);
            if (patterns && patterns_want(pm, g->route, g->pmd_bits)) /* and with this window */
                frame_set(g->route, g->pmd_bits, payload, len, opcode);
        }
        group_make_room(g, len + WS_MAX_HEADER);
        if (opcode != ROUTE_OP_UNFRAMED) {
            uint8_t hdr[WS_MAX_HEADER];
            size_t hlen = ws_frame_header(hdr, opcode, 1, len, NULL);
            g->batch = block_append(g->batch, hdr, hlen);
        }
        g->batch = block_append(g->batch, payload, len);
        g->pending_msgs++;
        if (!g->dirty) {
            g->dirty = 1;
            g->dirty_next = dirty_list;
            dirty_list = g;
        }
    }
    size_t by_pattern = 0;
    if (patterns)
        by_pattern = pattern_deliver(ch, m, pm);
    if (pm)
        pm->reached = (uint32_t)by_pattern;
    free(m->decoded);
    m->decoded = NULL;
    if (!m->remote && !m->numbered && observer.published)
        observer.published(m, observer.arg);
    if (subscribers)
        *subscribers = ch->nsubs + by_pattern;
    return m->seq;
}

/* Fan out m, numbered by the observer (m->seq and m->epoch set). */
static void fanout(struct chan_msg *m)
{
    m->numbered = 1;
    chan_publish(m, NULL);
}

int chan_publish_cb(struct chan_msg *m, struct conn *c, chan_pub_fn done, void *arg,
                    struct chan_pub **handle)
{
    if (numbering() && !m->numbered) {
        struct chan *ch = chan_lookup(m->channel, m->channel_len, 0);
        if (!ch && rule_for(m->channel, m->channel_len))
            ch = chan_lookup(m->channel, m->channel_len, 1);
        if (ch && ch->rs)
            return hand_over(ch, m, c, done, arg, handle);
    }
    size_t n;
    uint64_t seq = chan_publish(m, &n);
    done(arg, seq, n, NULL);
    return 1;
}

/* Queue to s's connection what it is owed of its group's batch (nothing while it is joining: it
 * is given no live message before its join point), and note that it has it. */
static void sub_give(struct sub *s)
{
    struct group *g = s->group;
    if (!g->batch || s->joining)
        return;
    size_t end = g->batch->len;
    if (s->skip < end) {
        conn_queue_block(s->conn, g->batch, s->skip, end - s->skip);
        stats.messages_out += g->pending_msgs - s->skip_msgs;
    }
    s->skip = end;
    s->skip_msgs = g->pending_msgs;
}

/* b, a batch whose frames have all been handed out: kept, emptied, for the next pass while it has
 * room and nobody else holds it, else dropped, so an idle channel or pattern holds no buffer.
 * Returns what the group keeps (NULL: nothing). */
static struct block *batch_recycle(struct block *b)
{
    if (!b)
        return NULL;
    if (b->refs > 1 || b->cap - b->len < 1024) {
        block_unref(b);
        return NULL;
    }
    block_reset(b);
    return b;
}

/* Give each subscriber of g its reference to the batch published since the last settle. */
static void group_settle(struct group *g)
{
    for (uint32_t i = 0; i < g->nsubs; i++) {
        struct sub *s = g->subs[i];
        sub_give(s);
        s->skip = 0; /* the batch starts again */
        s->skip_msgs = 0;
    }
    g->pending_msgs = 0;
    g->batch = batch_recycle(g->batch);
}

static void pgroup_flush(struct pgroup *g);
static void pgroup_release(struct pgroup *g);
static void conn_flush_patterns(struct conn *c);

void chan_settle(void)
{
    while (pdirty_list) {
        struct pgroup *g = pdirty_list;
        pdirty_list = g->dirty_next;
        g->dirty = 0;
        pgroup_flush(g);
        pgroup_release(g);
    }
    while (dirty_list) {
        struct group *g = dirty_list;
        dirty_list = g->dirty_next;
        g->dirty = 0;
        if (g->batch)
            group_settle(g);
        group_release(g);
    }
}

void chan_settle_for(struct conn *c)
{
    if (!dirty_list && !pdirty_list)
        return;
    /* c's part alone: settling every channel for one reply would cut every batch of the pass
     * short, and drop the blocks its subscribers share. */
    conn_flush_patterns(c);
    for (struct sub *s = c->subs; s; s = s->conn_next)
        if (s->group->dirty)
            sub_give(s);
}

static struct sub *find_sub(struct conn *c, struct chan *ch)
{
    for (struct sub *s = c->subs; s; s = s->conn_next)
        if (s->group->chan == ch)
            return s;
    return NULL;
}

static void dual_link(struct sub *s);
static void dual_unlink(struct sub *s);
static void pres_drop(struct chan *ch, struct sub *s);

/* Add c's subscription to ch. Returns it, or NULL with *rc 0 (it was subscribed) or -1 (at
 * max_subscriptions); *rc is 1 when added. */
static struct sub *sub_add(struct conn *c, struct chan *ch, int *rc)
{
    *rc = 0;
    if (find_sub(c, ch))
        return NULL;
    *rc = -1;
    if (c->nsubs + c->npsubs >= max_subs_per_conn) {
        stats.subscription_limit_hits++;
        return NULL;
    }
    *rc = 1;
    /* What its patterns owe it of this channel goes before what the subscription brings. */
    conn_flush_patterns(c);
    struct group *g = ch->groups;
    while (g && (g->route != c->route || g->pmd_bits != c->pmd.server_bits))
        g = g->next;
    if (!g) {
        g = xcalloc(1, sizeof(*g));
        g->chan = ch;
        g->route = route_ref(c->route);
        g->pmd_bits = c->pmd.server_bits;
        /* Next to the route's other groups, so that chan_publish makes the route's payload once. */
        struct group **at = &ch->groups;
        for (struct group *h = ch->groups; h; h = h->next)
            if (h->route == c->route) {
                at = &h->next;
                break;
            }
        g->next = *at;
        *at = g;
    }
    if (g->nsubs == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 4;
        g->subs = xrealloc(g->subs, g->cap * sizeof(*g->subs));
    }
    struct sub *s = xcalloc(1, sizeof(*s));
    s->conn = c;
    s->group = g;
    s->idx = g->nsubs;
    /* Messages already batched this pass were published before this subscription. */
    s->skip = g->dirty && g->batch ? g->batch->len : 0;
    s->skip_msgs = g->dirty ? g->pending_msgs : 0;
    g->subs[g->nsubs++] = s;
    s->conn_next = c->subs;
    c->subs = s;
    c->nsubs++;
    if (c->psubs)
        dual_link(s);
    if (ch->nsubs++ == 0) {
        idle_unlink(ch);
        if (observer.first_subscriber)
            observer.first_subscriber(ch->name, ch->name_len, observer.arg);
    }
    sub_total++;
    return s;
}

static int join_start(struct chan *ch, struct sub *s, int64_t since, const char *ep, size_t ep_len,
                      chan_join_fn done, void *arg, int wait);
static void sub_drop(struct sub *s);

int chan_subscribe(struct conn *c, const char *name, size_t len)
{
    struct chan *ch = chan_lookup(name, len, 1);
    int rc;
    struct sub *s = sub_add(c, ch, &rc);
    if (s && ch->rs && observer.fetch && !ch->rs->known)
        join_start(ch, s, -1, NULL, 0, NULL, NULL, 1); /* waits for the observer: cannot fail */
    return rc;
}

int chan_subscribe_from(struct conn *c, const char *name, size_t len, int64_t since, const char *ep,
                        size_t ep_len, int wait, chan_join_fn done, void *arg,
                        struct chan_join_result *now)
{
    struct chan *ch = chan_lookup(name, len, 1);
    memset(now, 0, sizeof(*now));
    now->recovered = -1;
    int rc;
    struct sub *s = sub_add(c, ch, &rc);
    if (ch->rs && observer.fetch) {
        if (!s) { /* already subscribed (or at the limit): what is known here */
            now->epoch = ch->rs->epoch[0] ? ch->rs->epoch : NULL;
            now->seq = ch->seq;
            now->recovered = since >= 0 && now->epoch ? 0 : -1;
            return rc;
        }
        struct rstate *rs = ch->rs;
        if (rs->known && (since < 0 || ((uint64_t)since == ch->seq && ep && ep_len == strlen(rs->epoch) &&
                                        memcmp(ep, rs->epoch, ep_len) == 0))) {
            /* The node hears the channel and knows where it is: the subscription starts here,
             * with no question to the observer (a gap behind it is filled for everyone). */
            now->epoch = rs->epoch;
            now->seq = ch->seq;
            now->recovered = since >= 0 ? 1 : -1;
            return CHAN_JOINED;
        }
        if (join_start(ch, s, since, ep, ep_len, done, arg, wait || !done) < 0) {
            sub_drop(s);
            now->err = "its history is kept in Redis, which cannot be reached now";
            return CHAN_UNAVAILABLE;
        }
        return CHAN_JOINING;
    }
    if (rc < 0)
        return rc;
    now->seq = ch->seq;
    if (ch->hist || ch->rs) {
        uint64_t last;
        now->epoch = epoch_of(ch);
        if (since >= 0)
            now->recovered = ch->hist ? chan_recover(name, len, (uint64_t)since, ep, ep_len, &last) : 0;
    }
    return rc ? CHAN_JOINED : CHAN_ALREADY;
}

static void join_cancel(struct chan_join *j);
static void rs_drain(struct chan *ch);

static void sub_remove(struct sub *s)
{
    struct group *g = s->group;
    struct chan *ch = g->chan;
    if (sub_member(s) || sub_listening(s))
        pres_drop(ch, s);
    dual_unlink(s);
    int joining = s->joining;
    if (s->ext && s->ext->join)
        join_cancel(s->ext->join);
    free(s->ext); /* nothing is left in it, but be sure */
    /* It was subscribed when these were published: it still gets them, before whatever is queued
     * to it next. */
    if (g->dirty && !joining)
        sub_give(s);
    g->subs[s->idx] = g->subs[--g->nsubs];
    g->subs[s->idx]->idx = s->idx;
    s->conn->nsubs--;
    sub_total--;
    if (--ch->nsubs == 0) {
        idle_append(ch, ev_time());
        if (ch->rs)
            ch->rs->known = 0; /* no longer heard for sure: the next join sets where it is */
        if (observer.last_unsubscribed)
            observer.last_unsubscribed(ch->name, ch->name_len, observer.arg);
    }
    group_release(g);
    free(s);
    if (ch->rs && !ch->rs->holds && ch->rs->head)
        rs_drain(ch); /* it held for this subscription */
}

/* Unlink s from its connection's list and remove it. */
static void sub_drop(struct sub *s)
{
    struct sub **pp = &s->conn->subs;
    while (*pp != s)
        pp = &(*pp)->conn_next;
    *pp = s->conn_next;
    sub_remove(s);
}

int chan_unsubscribe(struct conn *c, const char *name, size_t len)
{
    struct chan *ch = chan_lookup(name, len, 0);
    if (!ch)
        return 0;
    struct sub **pp = &c->subs;
    while (*pp && (*pp)->group->chan != ch)
        pp = &(*pp)->conn_next;
    if (!*pp)
        return 0;
    conn_flush_patterns(c);
    struct sub *s = *pp;
    *pp = s->conn_next;
    sub_remove(s);
    return 1;
}

static void psub_remove(struct psub *ps);
static void preq_cancel(struct conn *c);

void chan_unsubscribe_all(struct conn *c)
{
    while (c->psubs) {
        struct psub *ps = c->psubs;
        c->psubs = ps->conn_next;
        if (c->state == CONN_DEAD) /* nothing can be queued to it any more */
            ps->start = ps->end = 0;
        psub_remove(ps);
    }
    if (npreqs)
        preq_cancel(c);
    while (CONN_WAIT(c, pubs))
        chan_pub_cancel(c->waits->pubs);
    while (c->subs) {
        struct sub *s = c->subs;
        c->subs = s->conn_next;
        if (c->state == CONN_DEAD) /* nothing can be queued to it any more */
            s->skip = SIZE_MAX;
        sub_remove(s);
    }
}

void chan_sweep(ev_tstamp now)
{
    /* Bounded: with a channel_ttl of 0 a channel put back at the tail would be looked at again. */
    for (size_t budget = chan_total; budget && idle_head && idle_head->idle_since + idle_ttl <= now &&
                                     !idle_head->groups;
         budget--) {
        struct chan *ch = idle_head;
        if (ch->rs && (ch->rs->refs || ch->rs->holds || ch->rs->head)) {
            /* Fetches or held messages still name it: look again later. */
            idle_unlink(ch);
            idle_append(ch, now);
            continue;
        }
        if (ch->hist) {
            hist_expire(ch->hist, now);
            if (ch->hist->count && ch->hist->age > 0) {
                /* Still holds messages a client may come back for, until they are age old: look
                 * again later. With no age limit they go with the channel, or every name ever
                 * published to under the rule would be kept. */
                idle_unlink(ch);
                idle_append(ch, now);
                continue;
            }
        }
        chan_free(ch);
    }
}

int chan_recover(const char *name, size_t len, uint64_t since, const char *ep, size_t ep_len,
                 uint64_t *last_seq)
{
    struct chan *ch = chan_lookup(name, len, 0);
    *last_seq = ch ? ch->seq : 0;
    if (!ch || !ch->hist)
        return -1;
    hist_expire(ch->hist, ev_time());
    const char *mine = ch->hist->epoch;
    if (!ep || ep_len != strlen(mine) || memcmp(ep, mine, ep_len) != 0 || since > ch->seq)
        return 0;
    if (since == ch->seq)
        return 1;
    /* Everything after since must still be held. */
    struct history *h = ch->hist;
    return h->count && hist_at(h, 0)->seq <= since + 1;
}

/* Send c one message from a channel's past (a replay), encoded for c's route alone: it goes to
 * this one connection, so it is not batched with the channel's live messages. */
static void send_past(struct conn *c, struct chan_msg *m)
{
    const char *payload;
    size_t plen;
    int opcode;
    if (route_payload(c->route, m, &payload, &plen, &opcode) == 0) {
        if (opcode == ROUTE_OP_UNFRAMED)
            conn_queue_copy(c, payload, plen);
        else
            conn_send_frame(c, opcode, payload, plen);
        stats.messages_out++;
    }
    free(m->decoded);
}


void chan_replay(struct conn *c, const char *name, size_t len, uint64_t since)
{
    struct chan *ch = chan_lookup(name, len, 0);
    if (!ch || !ch->hist)
        return;
    struct history *h = ch->hist;
    for (uint32_t i = 0; i < h->count; i++) {
        struct hist_entry *e = hist_at(h, i);
        if (e->seq <= since)
            continue;
        struct chan_msg m = {.channel = ch->name, .channel_len = ch->name_len, .data = e->data->data,
                             .len = e->data->len, .is_json = e->is_json, .utf8 = -1, .json = -1,
                             .seq = e->seq, .epoch = h->epoch};
        send_past(c, &m);
    }
}

/* --- history numbered by the observer ---------------------------------------------------------- */

struct chan_pub {
    struct chan_pub *prev, *next; /* on its connection's list */
    struct conn *conn;
    chan_pub_fn done;             /* NULL once cancelled */
    void *arg;
    size_t name_len;
    char name[];
};

void chan_rstats_get(struct chan_rstats *out) { *out = rstats; }

int chan_numbered_elsewhere(const char *name, size_t len)
{
    if (!numbering())
        return 0;
    struct chan *ch = chan_lookup(name, len, 0);
    return ch ? ch->rs != NULL : rule_for(name, len) != NULL;
}

void chan_pub_rebind(struct chan_pub *p, chan_pub_fn done, void *arg)
{
    p->done = done;
    p->arg = arg;
}

/* Give m to the observer to number. Returns as chan_publish_cb. */
static int hand_over(struct chan *ch, struct chan_msg *m, struct conn *c, chan_pub_fn done, void *arg,
                     struct chan_pub **handle)
{
    const char *err = NULL;
    if (m->remote) {
        /* Published to Redis without a number (a backend's plain PUBLISH, a node without this
         * history rule): every node hears it, so numbering it here would publish it once per
         * node. */
        rstats.unnumbered_dropped++;
        if (done)
            done(arg, 0, 0, "published without a number on a channel whose history Redis keeps");
        return 1;
    }
    struct chan_pub *p = xcalloc(1, sizeof(*p) + m->channel_len + 1);
    p->done = done;
    p->arg = arg;
    p->name_len = m->channel_len;
    memcpy(p->name, m->channel, m->channel_len);
    if (observer.number(p, m, ch->rs->length, ch->rs->age, &err, observer.arg) < 0) {
        free(p);
        rstats.publish_errors++;
        if (done)
            done(arg, 0, 0, err ? err : "it cannot be numbered now");
        return 1;
    }
    rstats.publishes++;
    if (c) {
        p->conn = c;
        struct conn_waits *cw = conn_waits(c);
        p->next = cw->pubs;
        if (cw->pubs)
            cw->pubs->prev = p;
        cw->pubs = p;
    }
    if (handle)
        *handle = p;
    return 0;
}

static void pub_unlink(struct chan_pub *p)
{
    if (!p->conn)
        return;
    if (p->prev)
        p->prev->next = p->next;
    else
        p->conn->waits->pubs = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->prev = p->next = NULL;
    p->conn = NULL;
}

void chan_pub_cancel(struct chan_pub *p)
{
    pub_unlink(p);
    p->done = NULL;
}

void chan_pub_numbered(struct chan_pub *p, uint64_t seq, const char *epoch, const char *err)
{
    pub_unlink(p);
    size_t subscribers = 0;
    struct chan *ch = chan_lookup(p->name, p->name_len, 0);
    if (err) {
        rstats.publish_errors++;
    } else if (ch) {
        /* Where nothing here hears it for sure, the channel's last seq is the last one known. */
        if (ch->rs && !ch->rs->known && epoch && strlen(epoch) <= CHAN_EPOCH_MAX &&
            (strcmp(ch->rs->epoch, epoch) != 0 || seq > ch->seq)) {
            snprintf(ch->rs->epoch, sizeof(ch->rs->epoch), "%s", epoch);
            ch->seq = seq;
        }
        /* The message is fanned out when it comes back from the observer, maybe after this:
         * what the channel's last message reached stands for it, rather than walking every
         * pattern subscriber again to count them. */
        subscribers = ch->nsubs + (psub_total && ch->pm ? ch->pm->reached : 0);
    }
    if (p->done)
        p->done(p->arg, seq, subscribers, err);
    free(p);
}

/* The channel converts between being numbered here and by the observer once nothing of it is
 * pending. */
static void rs_settle_mode(struct chan *ch)
{
    if (numbering() && ch->hist) {
        size_t length = ch->hist->length;
        double age = ch->hist->age;
        hist_free(ch->hist);
        ch->hist = NULL;
        ch->rs = rs_new(length, age);
    } else if (!numbering() && ch->rs && !ch->rs->refs && !ch->rs->holds && !ch->rs->head &&
               !ch->rs->draining) {
        size_t length = ch->rs->length;
        double age = ch->rs->age;
        rs_free(ch->rs);
        ch->rs = NULL;
        ch->hist = hist_new(length, age);
    }
}

static struct chan_fetch *fetch_new(struct chan *ch, enum chan_fetch_kind kind, int64_t since,
                                    const char *epoch, int wait)
{
    struct chan_fetch *f = xcalloc(1, sizeof(*f));
    f->kind = kind;
    f->since = since;
    snprintf(f->epoch, sizeof(f->epoch), "%s", epoch ? epoch : "");
    f->length = ch->rs->length;
    f->age = ch->rs->age;
    f->wait = (uint8_t)wait;
    f->name_len = ch->name_len;
    memcpy(f->name, ch->name, ch->name_len);
    ch->rs->refs++;
    return f;
}

/* f is done with: the channel may go, or change mode. */
static void fetch_free(struct chan_fetch *f)
{
    struct chan *ch = chan_lookup(f->name, f->name_len, 0);
    if (f->join)
        f->join->f = NULL;
    free(f);
    if (ch && ch->rs) {
        ch->rs->refs--;
        rs_settle_mode(ch);
    }
}

static void hold(struct rstate *rs, struct chan_fetch *mark, const char *epoch, uint64_t seq,
                 const char *data, size_t len, int is_json)
{
    struct held *h = xmalloc(sizeof(*h) + len);
    h->next = NULL;
    h->mark = mark;
    h->seq = seq;
    h->is_json = (uint8_t)is_json;
    snprintf(h->epoch, sizeof(h->epoch), "%s", epoch ? epoch : "");
    h->len = len;
    if (len)
        memcpy(h->data, data, len);
    if (rs->tail)
        rs->tail->next = h;
    else
        rs->head = h;
    rs->tail = h;
    rs->nheld++;
    rstats.held++;
}

static void rs_set_epoch(struct chan *ch, const char *epoch)
{
    struct rstate *rs = ch->rs;
    if (strcmp(rs->epoch, epoch) == 0)
        return;
    if (rs->known && rs->epoch[0])
        rstats.epoch_changes++;
    snprintf(rs->epoch, sizeof(rs->epoch), "%s", epoch);
    ch->seq = 0;
    rs->tried = 0;
}

/* Ask for the messages after ch->seq up to until, holding the channel meanwhile. Returns 1 if it
 * is under way, 0 if not (the gap stays). */
static int gap_fill(struct chan *ch, uint64_t until)
{
    struct rstate *rs = ch->rs;
    if (rs->filling)
        return 1;
    if (!observer.fetch || until <= rs->tried)
        return 0;
    rs->tried = until;
    uint64_t since = ch->seq;
    if (until - since > rs->length) /* the history holds no more than that */
        since = until - rs->length;
    struct chan_fetch *f = fetch_new(ch, CHAN_FETCH_RANGE, (int64_t)since, rs->epoch, 0);
    f->until = until;
    if (observer.fetch(f, observer.arg) < 0) {
        fetch_free(f);
        return 0;
    }
    rstats.fetches++;
    rs->filling = 1;
    rs->holds++;
    return 1;
}

/* Deliver a numbered message in order, unless it was seen or one before it is missing (then it is
 * held: returns 0, with a fill under way). */
static int rs_take(struct chan *ch, struct chan_msg *m)
{
    struct rstate *rs = ch->rs;
    const char *epoch = m->epoch ? m->epoch : "";
    if (!rs->known) {
        snprintf(rs->epoch, sizeof(rs->epoch), "%s", epoch);
        ch->seq = m->seq;
        fanout(m);
        return 1;
    }
    rs_set_epoch(ch, epoch);
    if (m->seq <= ch->seq) {
        rstats.duplicates++;
        return 1;
    }
    if (m->seq > ch->seq + 1) {
        if (gap_fill(ch, m->seq - 1))
            return 0;
        rstats.missed += m->seq - ch->seq - 1;
    }
    ch->seq = m->seq;
    m->epoch = rs->epoch;
    fanout(m);
    return 1;
}

static void join_marked(struct chan *ch, struct chan_join *j);

/* A join's mark, in stream order: where the channel is as of the join's fetch. Returns 0 when it
 * must wait for a gap before it to be filled. */
static int mark_take(struct chan *ch, struct chan_fetch *f, const char *epoch, uint64_t seq)
{
    struct rstate *rs = ch->rs;
    if (!rs->known) {
        rs->known = 1; /* heard for sure from here on */
        snprintf(rs->epoch, sizeof(rs->epoch), "%s", epoch);
        ch->seq = seq;
        rs->tried = 0;
    } else {
        rs_set_epoch(ch, epoch);
        if (seq > ch->seq) {
            if (gap_fill(ch, seq))
                return 0;
            rstats.missed += seq - ch->seq;
            ch->seq = seq;
        }
    }
    f->marked = 1;
    struct chan_join *j = f->join;
    if (f->replied)
        fetch_free(f);
    if (j)
        join_marked(ch, j);
    return 1;
}

/* Deliver what the channel held, in order, until it holds again. Each item is taken off the
 * queue before it is delivered (and put back if it must wait), so a drain nested in a delivery
 * (a join reaching its mark) goes on from the next one. */
static void rs_drain(struct chan *ch)
{
    struct rstate *rs = ch->rs;
    if (!rs)
        return;
    rs->draining++;
    while (rs->head && !rs->holds) {
        struct held *h = rs->head;
        rs->head = h->next;
        if (!rs->head)
            rs->tail = NULL;
        rs->nheld--;
        rstats.held--;
        int taken;
        if (h->mark) {
            taken = mark_take(ch, h->mark, h->epoch, h->seq);
        } else {
            struct chan_msg m = {.channel = ch->name, .channel_len = ch->name_len, .data = h->data,
                                 .len = h->len, .is_json = h->is_json,
                                 .utf8 = (int8_t)(h->is_json ? 1 : -1),
                                 .json = (int8_t)(h->is_json ? 1 : -1), .remote = 1, .numbered = 1,
                                 .epoch = h->epoch, .seq = h->seq};
            taken = rs_take(ch, &m);
        }
        if (!taken) { /* back in front, to wait for the fill */
            h->next = rs->head;
            rs->head = h;
            if (!rs->tail)
                rs->tail = h;
            rs->nheld++;
            rstats.held++;
            break;
        }
        free(h);
    }
    if (--rs->draining == 0)
        rs_settle_mode(ch);
}

void chan_publish_numbered(struct chan_msg *m)
{
    struct chan *ch = chan_lookup(m->channel, m->channel_len, 1);
    m->numbered = 1;
    struct rstate *rs = ch->rs;
    if (!rs) { /* no history rule here: the number is taken as it comes */
        ch->seq = m->seq;
        fanout(m);
        return;
    }
    if (!rs->holds && !rs->head && rs_take(ch, m))
        return;
    hold(rs, NULL, m->epoch, m->seq, m->data, m->len, m->is_json);
}

/* --- joins: a subscription's answer and its point in the live stream --- */

static int join_fetch(struct chan *ch, struct chan_join *j, int64_t since, int wait);

static void join_free(struct chan *ch, struct chan_join *j)
{
    while (j->replay) {
        struct replay_entry *e = j->replay;
        j->replay = e->next;
        free(e);
    }
    if (j->f)
        j->f->join = NULL;
    if (j->holding) {
        j->holding = 0;
        ch->rs->holds--;
    }
    rstats.joining--;
    ch->rs->refs--;
    free(j);
}

/* 1 if j's connection was given the channel's message (epoch, seq), or one after it, since the
 * join began. */
static int join_given(const struct chan_join *j, const char *epoch, uint64_t seq)
{
    return j->given_epoch[0] && seq <= j->given && strcmp(epoch ? epoch : "", j->given_epoch) == 0;
}

/* j's connection was given the channel's message (epoch, seq). */
static void join_note_given(struct chan_join *j, const char *epoch, uint64_t seq)
{
    if (join_given(j, epoch, seq))
        return;
    j->given = seq;
    snprintf(j->given_epoch, sizeof(j->given_epoch), "%s", epoch ? epoch : "");
}

/* The subscription gets live messages from now on: those batched before were before its mark. */
static void join_activate(struct chan *ch, struct chan_join *j)
{
    struct sub *s = j->sub;
    struct group *g = s->group;
    s->ext->join = NULL;
    s->joining = 0;
    sub_ext_trim(s);
    /* What its patterns gave it until now goes before what the channel gives it from here on. */
    conn_flush_patterns(s->conn);
    s->skip = g->dirty && g->batch ? g->batch->len : 0;
    s->skip_msgs = g->dirty ? g->pending_msgs : 0;
    join_free(ch, j); /* the caller drains what the channel held for it */
}

static int join_start(struct chan *ch, struct sub *s, int64_t since, const char *ep, size_t ep_len,
                      chan_join_fn done, void *arg, int wait)
{
    struct chan_join *j = xcalloc(1, sizeof(*j));
    j->sub = s;
    j->done = done;
    j->arg = arg;
    j->since = since;
    j->wait = (uint8_t)wait;
    if (ep && ep_len <= CHAN_EPOCH_MAX)
        memcpy(j->epoch, ep, ep_len);
    j->replay_tail = &j->replay;
    sub_ext(s)->join = j;
    s->joining = 1;
    ch->rs->refs++;
    rstats.joining++;
    rstats.joins++;
    if (join_fetch(ch, j, since, wait) < 0) {
        s->ext->join = NULL;
        s->joining = 0;
        sub_ext_trim(s);
        join_free(ch, j);
        rstats.join_errors++;
        return -1;
    }
    return 0;
}

/* Answer j as if the channel were numbered here (the observer went). */
static void join_local(struct chan *ch, struct chan_join *j)
{
    snprintf(j->epoch, sizeof(j->epoch), "%s", epoch_of(ch));
    j->last = ch->seq;
    j->marked = 1;
    if (j->answered || !j->done) {
        j->answered = 1;
        chan_join_emit(j);
        return;
    }
    j->answered = 1;
    struct chan_join_result res = {.epoch = j->epoch, .seq = j->last,
                                   .recovered = j->since >= 0 ? 0 : -1};
    j->done(j->sub->conn, j, &res, j->arg);
}

static int join_fetch(struct chan *ch, struct chan_join *j, int64_t since, int wait)
{
    if (!observer.fetch) {
        join_local(ch, j);
        return 0;
    }
    struct chan_fetch *f = fetch_new(ch, CHAN_FETCH_JOIN, since, j->epoch, wait);
    f->join = j;
    j->f = f;
    if (observer.fetch(f, observer.arg) < 0) {
        j->f = NULL;
        f->join = NULL;
        fetch_free(f);
        return -1;
    }
    rstats.fetches++;
    return 0;
}

/* Queue to j's connection the replay it has, encoded for its route. */
static void join_replay(struct chan *ch, struct chan_join *j)
{
    struct conn *c = j->sub->conn;
    if (j->replay) /* what its patterns gave it meanwhile goes first */
        conn_flush_patterns(c);
    while (j->replay) {
        struct replay_entry *e = j->replay;
        j->replay = e->next;
        if (!join_given(j, j->epoch, e->seq)) { /* not given already by a pattern */
            struct chan_msg m = {.channel = ch->name, .channel_len = ch->name_len, .data = e->data,
                                 .len = e->len, .is_json = e->is_json,
                                 .utf8 = (int8_t)(e->is_json ? 1 : -1),
                                 .json = (int8_t)(e->is_json ? 1 : -1), .numbered = 1,
                                 .epoch = j->epoch, .seq = e->seq};
            send_past(c, &m);
            join_note_given(j, j->epoch, e->seq);
        }
        free(e);
    }
    j->replay_tail = &j->replay;
}

void chan_join_emit(struct chan_join *j)
{
    struct chan *ch = j->sub->group->chan;
    j->emitted = 1;
    join_replay(ch, j);
    if (j->marked) {
        join_activate(ch, j);
        rs_drain(ch);
    }
}

static void join_marked(struct chan *ch, struct chan_join *j)
{
    j->marked = 1;
    if (j->emitted) {
        join_activate(ch, j);
    } else if (!j->holding) {
        /* Its answer is not out yet: what comes after the mark waits for it. */
        j->holding = 1;
        ch->rs->holds++;
    }
}

/* The subscription goes while joining: what it waited for is forgotten. */
static void join_cancel(struct chan_join *j)
{
    struct chan *ch = j->sub->group->chan;
    j->sub->ext->join = NULL;
    j->sub->joining = 0;
    sub_ext_trim(j->sub);
    join_free(ch, j); /* the caller drains what the channel held for it */
}

/* Check the resume of j's answer r (to fetch f) and keep its replay. The observer is not taken at
 * its word: a resume is recovered only when one was asked, r says so, in the epoch asked, and the
 * entries hold every seq after since up to r->last; entries out of that range or out of order are
 * dropped. Returns -1 (no resume asked), 0 (not recovered: nothing is replayed) or 1. */
static int join_answer_replay(struct chan_join *j, const struct chan_fetch *f,
                              const struct chan_fetch_result *r)
{
    if (j->since < 0)
        return -1;
    uint64_t since = (uint64_t)j->since;
    if (r->recovered != 1 || !r->epoch || strcmp(r->epoch, f->epoch) != 0 || r->last < since)
        return 0;
    struct replay_entry *replay = NULL, **tail = &replay;
    uint64_t next = since + 1;
    for (size_t i = 0; i < r->n && next <= r->last; i++) {
        const struct chan_fetch_entry *e = &r->entries[i];
        if (e->seq != next)
            continue;
        struct replay_entry *x = xmalloc(sizeof(*x) + e->len);
        x->next = NULL;
        x->seq = e->seq;
        x->is_json = e->is_json;
        x->len = e->len;
        if (e->len)
            memcpy(x->data, e->data, e->len);
        *tail = x;
        tail = &x->next;
        next++;
    }
    if (next <= r->last) { /* some are missing */
        while (replay) {
            struct replay_entry *x = replay;
            replay = x->next;
            free(x);
        }
        return 0;
    }
    if (replay) {
        *j->replay_tail = replay;
        j->replay_tail = tail;
    }
    return 1;
}

void chan_fetch_reply(struct chan_fetch *f, const struct chan_fetch_result *r)
{
    struct chan *ch = chan_lookup(f->name, f->name_len, 0);
    f->replied = 1;
    if (f->kind == CHAN_FETCH_RANGE) {
        struct rstate *rs = ch ? ch->rs : NULL;
        if (rs && rs->filling) {
            rs->filling = 0;
            rs->holds--;
            if (r && r->epoch && strcmp(r->epoch, rs->epoch) == 0) {
                int filled = 0;
                for (size_t i = 0; i < r->n; i++) {
                    const struct chan_fetch_entry *e = &r->entries[i];
                    if (e->seq <= ch->seq || e->seq > f->until)
                        continue;
                    if (e->seq > ch->seq + 1)
                        rstats.missed += e->seq - ch->seq - 1;
                    struct chan_msg m = {.channel = ch->name, .channel_len = ch->name_len,
                                         .data = e->data, .len = e->len, .is_json = e->is_json,
                                         .utf8 = (int8_t)(e->is_json ? 1 : -1),
                                         .json = (int8_t)(e->is_json ? 1 : -1), .remote = 1,
                                         .numbered = 1, .epoch = rs->epoch, .seq = e->seq};
                    ch->seq = e->seq;
                    fanout(&m);
                    filled = 1;
                }
                rstats.gaps += filled;
            }
        }
        fetch_free(f);
        if (ch && ch->rs)
            rs_drain(ch);
        return;
    }
    struct chan_join *j = f->join;
    if (!j) {
        if (f->marked)
            fetch_free(f);
        return;
    }
    /* Keep the answer until it is emitted: the channel's epoch, its last seq, and the replay. */
    int recovered = join_answer_replay(j, f, r);
    snprintf(j->epoch, sizeof(j->epoch), "%s", r->epoch ? r->epoch : "");
    j->last = r->last;
    if (recovered != 1 && j->answered && j->since >= 0 && r->last > (uint64_t)j->since)
        rstats.missed += r->last - (uint64_t)j->since; /* a continued join that could not be */
    if (f->marked) {
        fetch_free(f); /* j->f is cleared */
        j->f = NULL;
    }
    if (j->answered) { /* a join continued after a failure: its reply is out already */
        if (j->emitted)
            chan_join_emit(j);
        return;
    }
    j->answered = 1;
    if (!j->done) {
        chan_join_emit(j);
        return;
    }
    struct chan_join_result res = {.epoch = j->epoch[0] ? j->epoch : NULL, .seq = j->last,
                                   .recovered = recovered};
    j->done(j->sub->conn, j, &res, j->arg);
}

void chan_fetch_marker(struct chan_fetch *f, const char *epoch, uint64_t seq)
{
    struct chan *ch = chan_lookup(f->name, f->name_len, 0);
    /* f holds a reference on the channel's rstate (fetch_new) until it is freed: neither the sweep
     * nor a change of mode takes the channel from the observer meanwhile. */
    assert(ch && ch->rs);
    if (ch->rs->holds || ch->rs->head || !mark_take(ch, f, epoch, seq))
        if (!f->marked && !(ch->rs->tail && ch->rs->tail->mark == f))
            hold(ch->rs, f, epoch, seq, NULL, 0, 0);
}

int chan_fetch_abandoned(const struct chan_fetch *f) { return f->kind == CHAN_FETCH_JOIN && !f->join; }

void chan_fetch_failed(struct chan_fetch *f, const char *err)
{
    if (f->kind == CHAN_FETCH_RANGE) {
        chan_fetch_reply(f, NULL);
        return;
    }
    struct chan *ch = chan_lookup(f->name, f->name_len, 0);
    struct chan_join *j = f->join;
    if (j)
        j->f = NULL;
    f->join = NULL;
    /* A mark still held in the channel's queue belongs to f: it goes with it. */
    if (ch && ch->rs) {
        for (struct held **pp = &ch->rs->head, *prev = NULL; *pp; prev = *pp, pp = &(*pp)->next)
            if ((*pp)->mark == f) {
                struct held *h = *pp;
                *pp = h->next;
                if (ch->rs->tail == h)
                    ch->rs->tail = prev;
                ch->rs->nheld--;
                rstats.held--;
                free(h);
                break;
            }
    }
    fetch_free(f);
    if (!j || !ch)
        return;
    if (j->holding) { /* its mark came, its answer will not: the channel goes on without it */
        j->holding = 0;
        ch->rs->holds--;
    }
    j->marked = 0;
    struct sub *s = j->sub;
    if (j->answered) {
        /* Its reply is out: carry on from what it was given, silently. */
        j->since = (int64_t)j->last;
        if (join_fetch(ch, j, j->since, 1) < 0)
            join_activate(ch, j);
    } else if (j->wait) {
        if (join_fetch(ch, j, j->since, 1) < 0)
            join_activate(ch, j);
    } else {
        /* Somebody waits for an answer: it is an error, and the subscription is gone. */
        rstats.join_errors++;
        struct chan_join_result res = {.recovered = -1,
                                       .err = err ? err : "its history is kept in Redis, which cannot be reached now"};
        chan_join_fn done = j->done;
        void *arg = j->arg;
        struct conn *c = s->conn;
        sub_drop(s); /* cancels j */
        done(c, NULL, &res, arg);
        return;
    }
    if (ch->rs)
        rs_drain(ch);
}

size_t chan_count(void) { return chan_total; }
uint64_t chan_subscription_count(void) { return sub_total; }

void chan_info(const char *name, size_t len, size_t *subscribers, uint64_t *last_seq)
{
    struct chan *ch = chan_lookup(name, len, 0);
    *subscribers = ch ? ch->nsubs : 0;
    *last_seq = ch ? ch->seq : 0;
}

const char *chan_first_name(const struct conn *c, size_t *len)
{
    if (!c->subs)
        return NULL;
    *len = c->subs->group->chan->name_len;
    return c->subs->group->chan->name;
}

/* --- pattern subscriptions --------------------------------------------------------------------- */

/* Every pattern with subscribers or settling groups, for chan_foreach_pattern. */
static struct ppat *ppat_list;

/* The payload each route makes of the message being published (deliver_stamp), for its pattern
 * groups: a route encodes a message once, and compresses it once per permessage-deflate window,
 * whoever receives it. */
struct rframe {
    struct route *route;
    uint8_t pmd_bits;   /* the window it is compressed for; 0: as the route made it */
    uint8_t dropped;    /* the route drops the message */
    int opcode;         /* the frame's, RSV1 included; ROUTE_OP_UNFRAMED: no frame */
    uint64_t stamp;
    struct buf payload;
};
static struct rframe *rframes;
static size_t nrframes;

/* The slot for route r's payload for window bits: its own, or one holding an earlier message's. */
static struct rframe *rframe_slot(struct route *r, uint8_t bits)
{
    struct rframe *free_slot = NULL;
    for (size_t i = 0; i < nrframes; i++) {
        if (rframes[i].route == r && rframes[i].pmd_bits == bits)
            return &rframes[i];
        if (!free_slot && rframes[i].stamp != deliver_stamp)
            free_slot = &rframes[i];
    }
    if (!free_slot) {
        rframes = xrealloc(rframes, (nrframes + 1) * sizeof(*rframes));
        free_slot = &rframes[nrframes++];
        memset(free_slot, 0, sizeof(*free_slot));
    }
    free_slot->route = r;
    free_slot->pmd_bits = bits;
    return free_slot;
}

/* Keep payload (NULL: the route drops the message) as the current message's for (r, bits). */
static struct rframe *frame_set(struct route *r, uint8_t bits, const char *payload, size_t len,
                                int opcode)
{
    struct rframe *f = rframe_slot(r, bits);
    f->stamp = deliver_stamp;
    f->dropped = payload == NULL;
    f->opcode = opcode;
    f->payload.len = 0;
    if (payload)
        buf_append(&f->payload, payload, len);
    return f;
}

/* Keep route r's payload of the current message (NULL: r drops it) for its pattern groups. */
static struct rframe *frame_keep(struct route *r, const char *payload, size_t len, int opcode)
{
    return frame_set(r, 0, payload, len, opcode);
}

/* 1 if one of the patterns pm has subscribers on route r with permessage-deflate window bits (any
 * window, bits -1): only then is a payload made for the channel's own subscribers kept for them. */
static int patterns_want(const struct pmatch *pm, const struct route *r, int bits)
{
    for (uint32_t i = 0; i < pm->n; i++)
        for (const struct pgroup *g = pm->p[i]->groups; g; g = g->next)
            if (g->route == r && g->nsubs && (bits < 0 || g->pmd_bits == bits))
                return 1;
    return 0;
}

static struct rframe *frame_find(struct route *r, uint8_t bits)
{
    for (size_t i = 0; i < nrframes; i++)
        if (rframes[i].route == r && rframes[i].pmd_bits == bits && rframes[i].stamp == deliver_stamp)
            return &rframes[i];
    return NULL;
}

/* Route r's payload of the current message for subscribers with permessage-deflate window bits (0:
 * none): made now if no channel subscriber's group made the route's, and compressed now the first
 * time a pattern group with that window asks. */
static const struct rframe *frame_for(struct route *r, uint8_t bits, struct chan_msg *m)
{
    struct rframe *f = frame_find(r, bits);
    if (f)
        return f;
    if (!(f = frame_find(r, 0))) {
        const char *payload;
        size_t len = 0;
        int opcode = 0;
        if (route_payload(r, m, &payload, &len, &opcode) < 0)
            payload = NULL;
        f = frame_keep(r, payload, len, opcode);
    }
    if (!bits || f->dropped || f->opcode == ROUTE_OP_UNFRAMED)
        return f;
    static struct buf z; /* reused: compressing allocates nothing per delivery */
    /* Taking a slot for the compressed form may move the slots (f with them), never f's payload
     * buffer, and never takes f's slot (it is the current message's): the payload is used where
     * it lies. */
    const char *plain = f->payload.data;
    size_t plain_len = f->payload.len;
    int opcode = f->opcode;
    if (pmd_compress(bits, r->deflate_level, r->deflate_min_size, plain, plain_len, &z))
        return frame_set(r, bits, z.data, z.len, opcode | WS_FRAME_RSV1);
    return frame_set(r, bits, plain, plain_len, opcode);
}

static struct ppat **match_buf;
static size_t match_n, match_cap;

static void match_cb(struct pattern_node *n, void *arg)
{
    if (match_n == match_cap) {
        match_cap = match_cap ? match_cap * 2 : 16;
        match_buf = xrealloc(match_buf, match_cap * sizeof(*match_buf));
    }
    match_buf[match_n++] = pattern_data(n);
}

/* The patterns that match ch, from its cache while no pattern came or went since it was made. */
static struct pmatch *chan_patterns(struct chan *ch)
{
    struct pmatch *pm = ch->pm;
    if (pm && pm->gen == pattern_gen) {
        pstats.cache_hits++;
        return pm;
    }
    match_n = 0;
    pstats.walks++;
    pstats.nodes_visited += pattern_match(trie, ch->name, ch->name_len, 0, match_cb, NULL);
    /* Oldest pattern first (a handful at most: insertion sort). */
    for (size_t i = 1; i < match_n; i++) {
        struct ppat *p = match_buf[i];
        size_t k = i;
        for (; k > 0 && pattern_serial(match_buf[k - 1]->node) > pattern_serial(p->node); k--)
            match_buf[k] = match_buf[k - 1];
        match_buf[k] = p;
    }
    if (!pm || pm->cap < match_n) {
        uint32_t cap = match_n > 4 ? (uint32_t)match_n : 4;
        int fresh = !pm;
        pm = xrealloc(pm, sizeof(*pm) + cap * sizeof(pm->p[0]));
        pm->cap = cap;
        if (fresh)
            pm->reached = 0;
        ch->pm = pm;
    }
    pm->n = (uint32_t)match_n;
    if (match_n)
        memcpy(pm->p, match_buf, match_n * sizeof(pm->p[0]));
    pm->gen = pattern_gen;
    return pm;
}

/* Queue to its connection the region of its group's batch ps is owed. */
static void psub_flush(struct psub *ps)
{
    if (ps->end > ps->start) {
        conn_queue_block(ps->conn, ps->group->batch, ps->start, ps->end - ps->start);
        stats.messages_out += ps->msgs;
    }
    ps->start = ps->end = 0;
    ps->msgs = 0;
}

/* ps is owed batch[off, end) too: one region while its frames are adjacent. */
static void psub_owe(struct psub *ps, size_t off, size_t end)
{
    if (ps->end > ps->start && ps->end == off) {
        ps->end = end;
        ps->msgs++;
        return;
    }
    psub_flush(ps);
    ps->start = off;
    ps->end = end;
    ps->msgs = 1;
}

static void conn_flush_patterns(struct conn *c)
{
    for (struct psub *ps = c->psubs; ps; ps = ps->conn_next)
        psub_flush(ps);
}

/* Give g's subscribers what they are owed, then drop the batch, or keep it for the next pass while
 * it has room and nobody else holds it. */
static void pgroup_flush(struct pgroup *g)
{
    for (uint32_t i = 0; i < g->nsubs; i++)
        psub_flush(g->subs[i]);
    g->frame_stamp = 0;
    g->batch = batch_recycle(g->batch);
}

/* Append the current message's frame for g's route to g's batch (once per message). */
static void pgroup_add_frame(struct pgroup *g, struct chan_msg *m)
{
    const struct rframe *f = frame_for(g->route, g->pmd_bits, m);
    uint8_t hdr[WS_MAX_HEADER];
    size_t hlen = f->dropped || f->opcode == ROUTE_OP_UNFRAMED
                      ? 0
                      : ws_frame_header(hdr, f->opcode, 1, f->payload.len, NULL);
    size_t need = hlen + f->payload.len;
    /* As for channel groups: a full batch is handed out first. */
    if (!f->dropped && batch_full(g->batch, need))
        pgroup_flush(g);
    g->frame_stamp = deliver_stamp;
    g->frame_len = 0;
    if (f->dropped)
        return;
    if (!g->batch)
        g->batch = block_new(need > 4096 ? need : 4096);
    g->frame_off = g->batch->len;
    g->batch = block_append(g->batch, hdr, hlen);
    g->batch = block_append(g->batch, f->payload.data, f->payload.len);
    g->frame_len = need;
    if (!g->dirty) {
        g->dirty = 1;
        g->dirty_next = pdirty_list;
        pdirty_list = g;
    }
}

/* Give m (being published on ch) to the subscribers of the patterns that match ch, each connection
 * once, and none that got it as a subscriber of ch. Returns the number of connections. */
static size_t pattern_deliver(struct chan *ch, struct chan_msg *m, struct pmatch *pm)
{
    uint64_t stamp = deliver_stamp;
    size_t n = 0;
    /* A subscription still joining is given no live message before its mark: until then its
     * connection's patterns serve it, unless it has the message already. */
    int joining = 0;
    for (struct sub *s = ch->dual; s; s = s->ext->dual_next) {
        if (s->joining && !join_given(s->ext->join, m->epoch, m->seq)) {
            joining = 1;
            continue;
        }
        s->conn->pattern_stamp = stamp;
    }
    for (uint32_t i = 0; i < pm->n; i++) {
        for (struct pgroup *g = pm->p[i]->groups; g; g = g->next) {
            for (uint32_t k = 0; k < g->nsubs; k++) {
                struct psub *ps = g->subs[k];
                if (ps->conn->pattern_stamp == stamp)
                    continue;
                ps->conn->pattern_stamp = stamp;
                if (g->frame_stamp != stamp)
                    pgroup_add_frame(g, m);
                if (!g->frame_len)
                    continue; /* the route dropped it (and would through any other pattern) */
                psub_owe(ps, g->frame_off, g->frame_off + g->frame_len);
                n++;
            }
        }
    }
    if (joining) /* its replay leaves out what the patterns gave it */
        for (struct sub *s = ch->dual; s; s = s->ext->dual_next)
            if (s->joining && s->conn->pattern_stamp == stamp)
                join_note_given(s->ext->join, m->epoch, m->seq);
    pstats.deliveries += n;
    return n;
}

static void dual_link(struct sub *s)
{
    struct chan *ch = s->group->chan;
    struct sub_ext *x = sub_ext(s);
    x->dual = 1;
    x->dual_prev = NULL;
    x->dual_next = ch->dual;
    if (ch->dual)
        ch->dual->ext->dual_prev = s;
    ch->dual = s;
}

static void dual_unlink(struct sub *s)
{
    struct sub_ext *x = s->ext;
    if (!x || !x->dual)
        return;
    struct chan *ch = s->group->chan;
    if (x->dual_prev)
        x->dual_prev->ext->dual_next = x->dual_next;
    else
        ch->dual = x->dual_next;
    if (x->dual_next)
        x->dual_next->ext->dual_prev = x->dual_prev;
    x->dual = 0;
    x->dual_prev = x->dual_next = NULL;
    sub_ext_trim(s);
}

static struct psub *find_psub(struct conn *c, const char *text, size_t len, struct psub ***link)
{
    struct psub **pp = &c->psubs;
    for (; *pp; pp = &(*pp)->conn_next) {
        struct ppat *p = (*pp)->group->pat;
        if (p->len == len && memcmp(p->text, text, len) == 0)
            break;
    }
    if (link)
        *link = pp;
    return *pp;
}

int chan_psubscribe(struct conn *c, const char *text, size_t len)
{
    if (find_psub(c, text, len, NULL))
        return 0;
    if (c->nsubs + c->npsubs >= max_subs_per_conn) {
        stats.subscription_limit_hits++;
        return -1;
    }
    if (!trie)
        trie = pattern_trie_new();
    /* A channel may now come to it through this pattern rather than another: what the others owe
     * goes first. */
    conn_flush_patterns(c);
    struct pattern_node *node = pattern_find(trie, text, len);
    struct ppat *pat = node ? pattern_data(node) : NULL;
    if (!pat) {
        pat = xcalloc(1, sizeof(*pat) + len + 1);
        memcpy(pat->text, text, len);
        pat->len = (uint32_t)len;
        pat->node = pattern_add(trie, text, len);
        pattern_set_data(pat->node, pat);
        pat->list_next = ppat_list;
        if (ppat_list)
            ppat_list->list_prev = pat;
        ppat_list = pat;
        pattern_gen++;
    }
    struct pgroup *g = pat->groups;
    while (g && (g->route != c->route || g->pmd_bits != c->pmd.server_bits))
        g = g->next;
    if (!g) {
        g = xcalloc(1, sizeof(*g));
        g->pat = pat;
        g->route = route_ref(c->route);
        g->pmd_bits = c->pmd.server_bits;
        g->next = pat->groups;
        pat->groups = g;
    }
    if (g->nsubs == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 4;
        g->subs = xrealloc(g->subs, g->cap * sizeof(*g->subs));
    }
    struct psub *ps = xcalloc(1, sizeof(*ps));
    ps->conn = c;
    ps->group = g;
    ps->idx = g->nsubs;
    g->subs[g->nsubs++] = ps;
    if (!c->psubs) /* its channel subscriptions now take part in deduplication */
        for (struct sub *s = c->subs; s; s = s->conn_next)
            dual_link(s);
    ps->conn_next = c->psubs;
    c->psubs = ps;
    c->npsubs++;
    psub_total++;
    if (pat->nsubs++ == 0 && observer.first_pattern)
        observer.first_pattern(pat->text, pat->len, observer.arg);
    return 1;
}

/* Free a group with no subscribers once it is settled, and its pattern once it has no group. */
static void pgroup_release(struct pgroup *g)
{
    if (g->nsubs || g->dirty)
        return;
    struct ppat *pat = g->pat;
    struct pgroup **pp = &pat->groups;
    while (*pp != g)
        pp = &(*pp)->next;
    *pp = g->next;
    block_unref(g->batch);
    route_unref(g->route);
    free(g->subs);
    free(g);
    if (pat->groups)
        return;
    if (pat->list_prev)
        pat->list_prev->list_next = pat->list_next;
    else
        ppat_list = pat->list_next;
    if (pat->list_next)
        pat->list_next->list_prev = pat->list_prev;
    pattern_remove(trie, pat->node);
    free(pat);
    pattern_gen++;
}

/* ps is already off its connection's list. */
static void psub_remove(struct psub *ps)
{
    struct pgroup *g = ps->group;
    struct ppat *pat = g->pat;
    struct conn *c = ps->conn;
    psub_flush(ps); /* it was subscribed when these were published */
    g->subs[ps->idx] = g->subs[--g->nsubs];
    g->subs[ps->idx]->idx = ps->idx;
    c->npsubs--;
    psub_total--;
    if (!c->psubs)
        for (struct sub *s = c->subs; s; s = s->conn_next)
            dual_unlink(s);
    if (--pat->nsubs == 0 && observer.last_pattern)
        observer.last_pattern(pat->text, pat->len, observer.arg);
    free(ps);
    pgroup_release(g);
}

int chan_punsubscribe(struct conn *c, const char *text, size_t len)
{
    struct psub **link;
    struct psub *ps = find_psub(c, text, len, &link);
    if (!ps)
        return 0;
    conn_flush_patterns(c);
    *link = ps->conn_next;
    psub_remove(ps);
    return 1;
}

static void wanted_cb(struct pattern_node *n, void *arg)
{
    if (((struct ppat *)pattern_data(n))->nsubs)
        *(int *)arg = 1;
}

int chan_pattern_wanted(const char *name, size_t len)
{
    if (!psub_total)
        return 0;
    struct chan *ch = chan_lookup(name, len, 0);
    if (ch) { /* a known channel's matches are cached until a pattern comes or goes */
        const struct pmatch *pm = chan_patterns(ch);
        for (uint32_t i = 0; i < pm->n; i++)
            if (pm->p[i]->nsubs)
                return 1;
        return 0;
    }
    int wanted = 0;
    pstats.walks++;
    pstats.nodes_visited += pattern_match(trie, name, len, 0, wanted_cb, &wanted);
    return wanted;
}

void chan_foreach_pattern(void (*fn)(const char *pattern, size_t len, void *arg), void *arg)
{
    for (struct ppat *p = ppat_list; p; p = p->list_next)
        if (p->nsubs)
            fn(p->text, p->len, arg);
}

/* --- presence ---------------------------------------------------------------------------------- */

const char *chan_node_id(void)
{
    if (!node_id[0]) {
        uint8_t r[8];
        if (RAND_bytes(r, sizeof(r)) != 1)
            for (size_t i = 0; i < sizeof(r); i++)
                r[i] = (uint8_t)(rand() ^ (int)(ev_time() * 1e6));
        for (int i = 0; i < 8; i++)
            snprintf(node_id + 2 * i, 3, "%02x", r[i]);
    }
    return node_id;
}

#define MEMBER_ID_MAX 40

static size_t member_id(const struct conn *c, char *out)
{
    return (size_t)snprintf(out, MEMBER_ID_MAX, "%s:%llu", chan_node_id(), (unsigned long long)c->id);
}

static uint32_t pres_count(const struct chan *ch)
{
    return ch->pres ? ch->pres->nmembers + ch->pres->nlisteners : 0;
}

/* Tell the observer when the channel's local members and listeners go from none to some or back,
 * and free the presence when it has neither. */
static void pres_interest(struct chan *ch, int before)
{
    int now = pres_count(ch) > 0;
    if (now != before && observer.presence_interest)
        observer.presence_interest(ch->name, ch->name_len, now, observer.arg);
    if (!now && ch->pres) {
        free(ch->pres->listeners);
        free(ch->pres);
        ch->pres = NULL;
        prstats.channels--;
    }
}

static struct presence *pres_get(struct chan *ch)
{
    if (!ch->pres) {
        ch->pres = xcalloc(1, sizeof(*ch->pres));
        prstats.channels++;
    }
    return ch->pres;
}

/* Send a join or leave event to the channel's listeners: one frame, shared. */
static void pres_emit(struct chan *ch, int join, const char *id, size_t id_len, const char *info,
                      size_t info_len)
{
    struct presence *p = ch->pres;
    if (!p || !p->nlisteners)
        return;
    /* After what was published to the listeners before: their part of this pass's batches is
     * given to them first, and the other subscribers' batches go on gathering. */
    if (dirty_list || pdirty_list)
        for (uint32_t i = 0; i < p->nlisteners; i++)
            chan_settle_for(p->listeners[i]->conn);
    static struct buf text;
    text.len = 0;
    buf_printf(&text, "{\"op\":\"%s\",\"channel\":\"%.*s\",\"client\":{\"id\":\"%.*s\"",
               join ? "join" : "leave", (int)ch->name_len, ch->name, (int)id_len, id);
    if (info_len) {
        buf_append_str(&text, ",\"info\":");
        buf_append(&text, info, info_len);
    }
    buf_append_str(&text, "}}");
    uint8_t hdr[WS_MAX_HEADER];
    size_t hlen = ws_frame_header(hdr, WS_OP_TEXT, 1, text.len, NULL);
    struct block *b = block_new(hlen + text.len);
    b = block_append(b, hdr, hlen);
    b = block_append(b, text.data, text.len);
    for (uint32_t i = 0; i < p->nlisteners; i++)
        conn_queue_block(p->listeners[i]->conn, b, 0, b->len);
    prstats.events += p->nlisteners;
    block_unref(b);
}

static void pres_listen(struct chan *ch, struct sub *s, int on)
{
    int before = pres_count(ch) > 0;
    struct presence *p = pres_get(ch);
    if (on) {
        if (p->nlisteners == p->cap) {
            p->cap = p->cap ? p->cap * 2 : 4;
            p->listeners = xrealloc(p->listeners, p->cap * sizeof(*p->listeners));
        }
        sub_ext(s)->listener = p->nlisteners;
        p->listeners[p->nlisteners++] = s;
        prstats.listeners++;
    } else {
        uint32_t at = s->ext->listener;
        p->listeners[at] = p->listeners[--p->nlisteners];
        p->listeners[at]->ext->listener = at;
        s->ext->listener = NOT_LISTENING;
        sub_ext_trim(s);
        prstats.listeners--;
    }
    pres_interest(ch, before);
}

static void pres_join(struct chan *ch, struct sub *s, const char *info, size_t info_len)
{
    int before = pres_count(ch) > 0;
    struct presence *p = pres_get(ch);
    struct member *mb = xmalloc(sizeof(*mb) + info_len + 1);
    mb->sub = s;
    mb->info_len = (uint32_t)info_len;
    if (info_len)
        memcpy(mb->info, info, info_len);
    mb->info[info_len] = 0;
    mb->next = NULL;
    mb->prev = p->tail;
    if (p->tail)
        p->tail->next = mb;
    else
        p->head = mb;
    p->tail = mb;
    p->nmembers++;
    sub_ext(s)->member = mb;
    prstats.members++;
    prstats.joins++;
    pres_interest(ch, before);
    char id[MEMBER_ID_MAX];
    size_t n = member_id(s->conn, id);
    if (observer.presence_join)
        observer.presence_join(ch->name, ch->name_len, id, n, mb->info, mb->info_len, observer.arg);
    pres_emit(ch, 1, id, n, mb->info, mb->info_len);
}

static void pres_leave(struct chan *ch, struct sub *s)
{
    struct presence *p = ch->pres;
    struct member *mb = s->ext->member;
    if (mb->prev)
        mb->prev->next = mb->next;
    else
        p->head = mb->next;
    if (mb->next)
        mb->next->prev = mb->prev;
    else
        p->tail = mb->prev;
    p->nmembers--;
    s->ext->member = NULL;
    sub_ext_trim(s);
    prstats.members--;
    prstats.leaves++;
    char id[MEMBER_ID_MAX];
    size_t n = member_id(s->conn, id);
    if (observer.presence_leave)
        observer.presence_leave(ch->name, ch->name_len, id, n, mb->info, mb->info_len, observer.arg);
    pres_emit(ch, 0, id, n, mb->info, mb->info_len);
    free(mb);
    pres_interest(ch, 1);
}

/* s is going: it stops listening (so it is not told of its own leave), then leaves. */
static void pres_drop(struct chan *ch, struct sub *s)
{
    if (sub_listening(s))
        pres_listen(ch, s, 0);
    if (sub_member(s))
        pres_leave(ch, s);
}

int chan_presence_set(struct conn *c, const char *name, size_t len, int member, int events,
                      const char *info, size_t info_len)
{
    struct chan *ch = chan_lookup(name, len, 0);
    struct sub *s = ch ? find_sub(c, ch) : NULL;
    if (!s)
        return -1;
    if (events >= 0 && events != sub_listening(s))
        pres_listen(ch, s, events);
    if (member == 1 && !sub_member(s))
        pres_join(ch, s, info, info_len);
    else if (member == 0 && sub_member(s))
        pres_leave(ch, s);
    return 0;
}

void chan_foreach_member(const char *name, size_t len, chan_member_fn fn, void *arg)
{
    struct chan *ch = chan_lookup(name, len, 0);
    if (!ch || !ch->pres)
        return;
    char id[MEMBER_ID_MAX];
    for (struct member *mb = ch->pres->head; mb; mb = mb->next) {
        size_t n = member_id(mb->sub->conn, id);
        fn(id, n, mb->info, mb->info_len, mb->sub->conn, arg);
    }
}

void chan_presence_foreach(const char *name, size_t len, chan_member_fn fn, void *arg)
{
    chan_foreach_member(name, len, fn, arg);
    if (observer.presence_remote)
        observer.presence_remote(name, len, fn, arg, observer.arg);
}

void chan_foreach_presence(void (*fn)(const char *name, size_t len, void *arg), void *arg)
{
    for (size_t i = 0; i < table_size; i++)
        for (struct chan *ch = table[i]; ch; ch = ch->hnext)
            if (ch->pres)
                fn(ch->name, ch->name_len, arg);
}

void chan_presence_event(const char *name, size_t len, int join, const char *id, size_t id_len,
                         const char *info, size_t info_len)
{
    struct chan *ch = chan_lookup(name, len, 0);
    if (ch)
        pres_emit(ch, join, id, id_len, info, info_len);
}

static struct preq **preq_tail = &preqs;

int chan_presence_request(struct conn *c, const char *name, size_t len, const char *id, size_t id_len)
{
    if (!observer.presence_complete || npreqs >= PREQ_MAX ||
        observer.presence_complete(name, len, observer.arg))
        return 1;
    struct preq *q = xmalloc(sizeof(*q) + len + id_len);
    q->next = NULL;
    q->conn = c;
    q->name_len = len;
    q->id_len = id ? id_len : 0;
    memcpy(q->data, name, len);
    if (q->id_len)
        memcpy(q->data + len, id, id_len);
    *preq_tail = q;
    preq_tail = &q->next;
    npreqs++;
    return 0;
}

/* Unlink *pp (a request) and return it. */
static struct preq *preq_take(struct preq **pp)
{
    struct preq *q = *pp;
    *pp = q->next;
    if (!*pp)
        preq_tail = pp;
    npreqs--;
    return q;
}

void chan_presence_ready(const char *name, size_t len)
{
    struct preq **pp = &preqs;
    while (*pp) {
        struct preq *q = *pp;
        if (q->name_len != len || memcmp(q->data, name, len) != 0) {
            pp = &q->next;
            continue;
        }
        preq_take(pp);
        route_presence_reply(q->conn, q->data, len, q->id_len ? q->data + len : NULL, q->id_len);
        free(q);
    }
}

static void preq_cancel(struct conn *c)
{
    struct preq **pp = &preqs;
    while (*pp) {
        if ((*pp)->conn == c)
            free(preq_take(pp));
        else
            pp = &(*pp)->next;
    }
}

/* --- /stats and /metrics ----------------------------------------------------------------------- */

static void stats_json(struct buf *b, void *arg)
{
    buf_printf(b, "\"patterns\":{\"subscriptions\":%llu,\"patterns\":%zu,\"trie_nodes\":%zu,"
                  "\"walks\":%llu,\"nodes_visited\":%llu,\"cache_hits\":%llu,\"deliveries\":%llu},",
               (unsigned long long)psub_total, trie ? pattern_trie_patterns(trie) : 0,
               trie ? pattern_trie_nodes(trie) : 0, (unsigned long long)pstats.walks,
               (unsigned long long)pstats.nodes_visited, (unsigned long long)pstats.cache_hits,
               (unsigned long long)pstats.deliveries);
    buf_printf(b, "\"presence\":{\"channels\":%llu,\"members\":%llu,\"listeners\":%llu,"
                  "\"joins\":%llu,\"leaves\":%llu,\"events\":%llu,\"requests_waiting\":%zu}",
               (unsigned long long)prstats.channels, (unsigned long long)prstats.members,
               (unsigned long long)prstats.listeners, (unsigned long long)prstats.joins,
               (unsigned long long)prstats.leaves, (unsigned long long)prstats.events, npreqs);
}

static void prom(struct buf *b, const char *name, const char *type, const char *help, double v)
{
    buf_printf(b, "# HELP herald_%s %s\n# TYPE herald_%s %s\nherald_%s %.0f\n", name, help, name, type,
               name, v);
}

static void stats_prom(struct buf *b, void *arg)
{
    prom(b, "pattern_subscriptions", "gauge", "Subscriptions to patterns", (double)psub_total);
    prom(b, "patterns", "gauge", "Distinct patterns subscribed to",
         trie ? (double)pattern_trie_patterns(trie) : 0);
    prom(b, "pattern_trie_nodes", "gauge", "Nodes of the pattern trie",
         trie ? (double)pattern_trie_nodes(trie) : 0);
    prom(b, "pattern_walks_total", "counter", "Channels matched against the pattern trie",
         (double)pstats.walks);
    prom(b, "pattern_nodes_visited_total", "counter", "Trie nodes visited matching channels",
         (double)pstats.nodes_visited);
    prom(b, "pattern_cache_hits_total", "counter",
         "Channels matched from their cache, not the trie (publishes, Redis messages checked)",
         (double)pstats.cache_hits);
    prom(b, "pattern_deliveries_total", "counter", "Messages given to connections through patterns",
         (double)pstats.deliveries);
    prom(b, "presence_channels", "gauge", "Channels with local presence members or listeners",
         (double)prstats.channels);
    prom(b, "presence_members", "gauge", "Local presence members", (double)prstats.members);
    prom(b, "presence_listeners", "gauge", "Local listeners of join and leave events",
         (double)prstats.listeners);
    prom(b, "presence_events_total", "counter", "Join and leave events sent to listeners",
         (double)prstats.events);
}
