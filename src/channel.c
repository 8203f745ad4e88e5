/* channel.c - channel registry (a keyed hash table), subscriptions and batched fan-out. */
#include "channel.h"

#include "buf.h"
#include "config.h"
#include "conn.h"
#include "deflate.h"
#include "route.h"
#include "stats.h"
#include "ws.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct group;

struct sub {
    struct conn *conn;
    struct group *group;
    struct sub *conn_next; /* the connection's next subscription */
    uint32_t idx;          /* position in group->subs */
    uint32_t skip_msgs;    /* messages of the unsettled batch published before it subscribed */
    size_t skip;           /* batch offset where its messages start */
};

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
    size_t settled;           /* batch offset up to which subscribers have their references */
    uint32_t pending_msgs;    /* messages in batch past settled */
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
    struct hist_entry *ring;
    uint32_t cap, head, count; /* head: the oldest entry */
    double age;
};

struct chan {
    struct chan *hnext;
    struct history *hist;               /* NULL unless a history rule covers the name */
    struct chan *idle_prev, *idle_next; /* on the idle list while it has no subscriber */
    struct group *groups;
    uint64_t hash;
    uint64_t seq;
    size_t nsubs;
    ev_tstamp idle_since;
    size_t name_len;
    char name[];
};

static struct chan **table;
static size_t table_size, chan_total;
static uint64_t sub_total;
static struct group *dirty_list;
static struct chan *idle_head, *idle_tail;
static double idle_ttl = 300;
static struct chan_observer observer;

void chan_set_observer(const struct chan_observer *o)
{
    if (o)
        observer = *o;
    else
        memset(&observer, 0, sizeof(observer));
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
static char epoch[17];

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
    if (!epoch[0]) {
        /* A new epoch per process: seqs restart with it, so a resume across a restart is told. */
        uint8_t r[8];
        if (RAND_bytes(r, sizeof(r)) != 1)
            memset(r, 0, sizeof(r));
        for (int i = 0; i < 8; i++)
            snprintf(epoch + 2 * i, 3, "%02x", r[i]);
    }
    return epoch;
}

static struct history *history_for(const char *name, size_t len)
{
    for (size_t i = 0; i < hist_nrules; i++) {
        size_t plen = strlen(hist_rules[i].prefix);
        if (len >= plen && memcmp(name, hist_rules[i].prefix, plen) == 0) {
            struct history *h = xcalloc(1, sizeof(*h));
            h->cap = (uint32_t)hist_rules[i].length;
            h->age = hist_rules[i].age;
            h->ring = xcalloc(h->cap, sizeof(*h->ring));
            return h;
        }
    }
    return NULL;
}

static struct hist_entry *hist_at(struct history *h, uint32_t i) { return &h->ring[(h->head + i) % h->cap]; }

static void hist_drop_oldest(struct history *h)
{
    block_unref(hist_at(h, 0)->data);
    h->head = (h->head + 1) % h->cap;
    h->count--;
}

/* Forget entries older than the history's age. */
static void hist_expire(struct history *h, double now)
{
    while (h->count && h->age > 0 && hist_at(h, 0)->time + h->age < now)
        hist_drop_oldest(h);
}

static void hist_append(struct history *h, const struct chan_msg *m, double now)
{
    if (h->count == h->cap)
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

void chan_init(double ttl, size_t max_subscriptions)
{
    idle_ttl = ttl;
    max_subs_per_conn = max_subscriptions;
    if (!table) {
        table_size = 1024;
        table = xcalloc(table_size, sizeof(*table));
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
    ch->hist = history_for(name, len);
    idle_append(ch, ev_time());
    return ch;
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

/* Make sure g has a batch that a frame of about need bytes can be appended to. A batch only this
 * group holds may grow (and move); a shared one never moves, so when it is full what it holds is
 * handed out first and a new one started. */
static void group_make_room(struct group *g, size_t need)
{
    struct block *b = g->batch;
    if (b && (b->refs == 1 || b->cap - b->len >= need))
        return;
    if (b)
        chan_settle(); /* settling drops the shared block */
    block_unref(g->batch);
    g->batch = block_new(need > 4096 ? need : 4096);
    g->settled = 0;
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

uint64_t chan_publish(struct chan_msg *m, size_t *subscribers)
{
    struct chan *ch = chan_lookup(m->channel, m->channel_len, 1);
    m->seq = ++ch->seq;
    stats.messages_in++;
    if (ch->hist)
        hist_append(ch->hist, m, ev_time());
    if (!ch->nsubs) { /* a publish renews an idle channel */
        idle_unlink(ch);
        idle_append(ch, ev_time());
    }
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
        }
        if (made < 0)
            continue;
        const char *payload = route_data;
        size_t len = route_len;
        int opcode = route_opcode;
        if (g->pmd_bits && opcode != ROUTE_OP_UNFRAMED)
            group_deflate(g, &payload, &len, &opcode);
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
    free(m->decoded);
    m->decoded = NULL;
    if (!m->remote && observer.published)
        observer.published(m, observer.arg);
    if (subscribers)
        *subscribers = ch->nsubs;
    return m->seq;
}

/* Give each subscriber of g its reference to the batch published since the last settle. */
static void group_settle(struct group *g)
{
    struct block *b = g->batch;
    size_t end = b->len;
    for (uint32_t i = 0; i < g->nsubs; i++) {
        struct sub *s = g->subs[i];
        size_t start = s->skip > g->settled ? s->skip : g->settled;
        if (start < end) {
            conn_queue_block(s->conn, b, start, end - start);
            stats.messages_out += g->pending_msgs - s->skip_msgs;
        }
        s->skip = 0;
        s->skip_msgs = 0;
    }
    g->settled = end;
    g->pending_msgs = 0;
    /* Keep the block for the next pass only while it has room and nobody else holds it, so an
     * idle channel holds no buffer. */
    if (b->refs > 1 || b->cap - b->len < 1024) {
        block_unref(b);
        g->batch = NULL;
        g->settled = 0;
    } else {
        b->len = 0;
        g->settled = 0;
    }
}

void chan_settle(void)
{
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
    if (c->nsubs && dirty_list)
        chan_settle();
}

static struct sub *find_sub(struct conn *c, struct chan *ch)
{
    for (struct sub *s = c->subs; s; s = s->conn_next)
        if (s->group->chan == ch)
            return s;
    return NULL;
}

int chan_subscribe(struct conn *c, const char *name, size_t len)
{
    struct chan *ch = chan_lookup(name, len, 1);
    if (find_sub(c, ch))
        return 0;
    if (c->nsubs >= max_subs_per_conn) {
        stats.subscription_limit_hits++;
        return -1;
    }
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
    struct sub *s = xmalloc(sizeof(*s));
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
    if (ch->nsubs++ == 0) {
        idle_unlink(ch);
        if (observer.first_subscriber)
            observer.first_subscriber(ch->name, ch->name_len, observer.arg);
    }
    sub_total++;
    return 1;
}

static void sub_remove(struct sub *s)
{
    struct group *g = s->group;
    struct chan *ch = g->chan;
    if (g->dirty && g->batch) {
        /* It was subscribed when these were published: it still gets them, before whatever is
         * queued to it next. */
        size_t start = s->skip > g->settled ? s->skip : g->settled;
        if (start < g->batch->len) {
            conn_queue_block(s->conn, g->batch, start, g->batch->len - start);
            stats.messages_out += g->pending_msgs - s->skip_msgs;
        }
    }
    g->subs[s->idx] = g->subs[--g->nsubs];
    g->subs[s->idx]->idx = s->idx;
    s->conn->nsubs--;
    sub_total--;
    if (--ch->nsubs == 0) {
        idle_append(ch, ev_time());
        if (observer.last_unsubscribed)
            observer.last_unsubscribed(ch->name, ch->name_len, observer.arg);
    }
    group_release(g);
    free(s);
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
    struct sub *s = *pp;
    *pp = s->conn_next;
    sub_remove(s);
    return 1;
}

void chan_unsubscribe_all(struct conn *c)
{
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
    while (idle_head && idle_head->idle_since + idle_ttl <= now && !idle_head->groups) {
        struct chan *ch = idle_head;
        if (ch->hist) {
            hist_expire(ch->hist, now);
            if (ch->hist->count) {
                /* Still holds messages a client may come back for: look again later. */
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
    const char *mine = chan_epoch();
    if (!ep || ep_len != strlen(mine) || memcmp(ep, mine, ep_len) != 0 || since > ch->seq)
        return 0;
    if (since == ch->seq)
        return 1;
    /* Everything after since must still be held. */
    struct history *h = ch->hist;
    return h->count && hist_at(h, 0)->seq <= since + 1;
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
                             .seq = e->seq};
        const char *payload;
        size_t plen;
        int opcode;
        if (route_payload(c->route, &m, &payload, &plen, &opcode) == 0) {
            if (opcode == ROUTE_OP_UNFRAMED)
                conn_queue_copy(c, payload, plen);
            else
                conn_send_frame(c, opcode, payload, plen);
            stats.messages_out++;
        }
        free(m.decoded);
    }
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
