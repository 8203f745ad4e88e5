/* route.c - the built-in route kinds: the generic JSON pub/sub protocol, raw subscribe, echo. */
#include "route.h"

#include "channel.h"
#include "conn.h"
#include "http.h"
#include "auth.h"
#include "json.h"
#include "log.h"
#include "pattern.h"
#include "pubsub.h"
#include "script.h"
#include "server.h"
#include "stats.h"
#include "ws.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Scratch space for building frames and replies; the loop is single-threaded. */
static struct buf scratch;

struct route *route_new(enum route_kind kind, const char *path)
{
    struct route *r = xcalloc(1, sizeof(*r));
    r->refs = 1;
    r->kind = kind;
    r->path = xstrdup(path);
    r->path_len = strlen(path);
    r->prefix = r->path_len > 0 && path[r->path_len - 1] == '/';
    r->deflate_min_size = ROUTE_DEFLATE_MIN_SIZE;
    r->deflate_level = ROUTE_DEFLATE_LEVEL;
    return r;
}

struct route *route_ref(struct route *r)
{
    r->refs++;
    return r;
}

void route_unref(struct route *r)
{
    if (!r || --r->refs)
        return;
    if (r->script)
        script_unload(r);
    for (size_t i = 0; i < r->norigins; i++)
        free(r->origins[i]);
    free(r->origins);
    free(r->path);
    free(r->script);
    free(r);
}

const char *route_kind_name(enum route_kind kind)
{
    static const char *const names[] = {"pubsub", "raw", "echo", "script", "sse"};
    return names[kind];
}

struct route *route_match(struct route *const *routes, size_t n, const char *path, size_t len)
{
    for (size_t i = 0; i < n; i++) {
        struct route *r = routes[i];
        if (r->prefix ? (len > r->path_len && memcmp(path, r->path, r->path_len) == 0)
                      : (len == r->path_len && memcmp(path, r->path, len) == 0))
            return r;
    }
    return NULL;
}

void route_send_text(struct conn *c, const char *text, size_t len)
{
    chan_settle_for(c);
    conn_send_frame(c, WS_OP_TEXT, text, len);
}

/* Split a comma-separated channel list and call fn on each name; stops at the first non-zero. */
static int each_channel(const char *list, size_t len, int (*fn)(const char *, size_t, void *), void *arg)
{
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || list[i] == ',') {
            int rc = fn(list + start, i - start, arg);
            if (rc)
                return rc;
            start = i + 1;
        }
    }
    return 0;
}

int route_allows(struct route *r, struct conn *c, int action, const char *channel, size_t len,
                 const char **why)
{
    *why = NULL;
    if (r->require_token && !auth_allows(c->grants, (enum auth_action)action, channel, len)) {
        *why = "the token does not grant this channel";
        stats.auth_refused++;
        return 0;
    }
    if (r->script && !script_authorize(r, c, action, channel, len, why)) {
        stats.auth_refused++;
        return 0;
    }
    return 1;
}

int route_allows_pattern(struct route *r, struct conn *c, const char *p, size_t len, const char **why)
{
    size_t lit = 0;
    while (lit < len && !((p[lit] == '*' || p[lit] == '>') && (lit == 0 || p[lit - 1] == '.')))
        lit++;
    if (lit == len)
        return route_allows(r, c, AUTH_SUBSCRIBE, p, len, why);
    *why = NULL;
    if (r->require_token && !auth_allows_prefix(c->grants, AUTH_SUBSCRIBE, p, lit)) {
        *why = "the token must grant every channel it can match";
        stats.auth_refused++;
        return 0;
    }
    if (r->script && !script_authorize(r, c, ROUTE_AUTH_PATTERN, p, len, why)) {
        stats.auth_refused++;
        return 0;
    }
    return 1;
}

struct check_ctx {
    struct route *r;
    struct conn *c;
    const char **why;
    int status;
};

static int check_name(const char *name, size_t len, void *arg)
{
    struct check_ctx *ctx = arg;
    if (!chan_name_valid(name, len, ctx->why)) {
        ctx->status = 400;
        return 1;
    }
    if (!route_allows(ctx->r, ctx->c, AUTH_SUBSCRIBE, name, len, ctx->why)) {
        if (!*ctx->why)
            *ctx->why = "not allowed to subscribe to this channel";
        ctx->status = 403;
        return 1;
    }
    return 0;
}

static int subscribe_name(const char *name, size_t len, void *arg)
{
    chan_subscribe(arg, name, len);
    return 0;
}

/* A ?subscribe= channel whose history Redis keeps: joined before the 101 goes. */
static int join_name(const char *name, size_t len, void *arg)
{
    if (chan_numbered_elsewhere(name, len))
        server_join(arg, name, len, -1, NULL, 0, 0);
    return 0;
}

static int numbered_name(const char *name, size_t len, void *arg)
{
    return chan_numbered_elsewhere(name, len);
}

/* The ?subscribe= list of a /ws handshake, decoded into scratch; -1 if absent, -2 if malformed. */
static ssize_t query_channels(const char *query, size_t query_len)
{
    if (!query)
        return -1;
    scratch.len = 0;
    buf_reserve(&scratch, query_len + 1);
    return http_query_get(query, query_len, "subscribe", scratch.data, scratch.cap);
}

/* A raw subscriber's resume request, ?since=N&epoch=E. */
struct raw_resume {
    int64_t since;   /* -1: none asked */
    char epoch[64];
    ssize_t epoch_len; /* -1: none given */
};

/* Parse it: 0, or -1 when malformed. */
static int raw_resume_parse(const char *query, size_t query_len, struct raw_resume *rr)
{
    char text[32];
    rr->since = -1;
    rr->epoch_len = -1;
    ssize_t n = query ? http_query_get(query, query_len, "since", text, sizeof(text)) : -1;
    if (n < 0)
        return n == -2 ? -1 : 0;
    if ((rr->since = pubsub_seq_parse(text, (size_t)n)) < 0)
        return -1;
    rr->epoch_len = http_query_get(query, query_len, "epoch", rr->epoch, sizeof(rr->epoch));
    return 0;
}

/* A raw subscriber's resume request (?since=N&epoch=E): the recovery verdict as chan_recover
 * gives it, or -2 when the query asks for none (or is malformed: *bad set). */
static int raw_resume(const char *query, size_t query_len, const char *name, size_t len, uint64_t *since,
                      uint64_t *last, int *bad)
{
    struct raw_resume rr;
    *bad = raw_resume_parse(query, query_len, &rr) < 0;
    if (*bad || rr.since < 0)
        return -2;
    *since = (uint64_t)rr.since;
    return chan_recover(name, len, *since, rr.epoch_len < 0 ? NULL : rr.epoch,
                        rr.epoch_len < 0 ? 0 : (size_t)rr.epoch_len, last);
}

int route_waits(struct route *r, const char *path, size_t path_len, const char *query, size_t query_len)
{
    if (r->kind == ROUTE_RAW)
        return path_len > r->path_len &&
               chan_numbered_elsewhere(path + r->path_len, path_len - r->path_len);
    if (r->kind != ROUTE_PUBSUB)
        return 0;
    ssize_t n = query_channels(query, query_len);
    return n > 0 && each_channel(scratch.data, (size_t)n, numbered_name, NULL);
}

/* The checks of a built-in route's handshake: channel names, grants, a resume request. */
static int builtin_accept(struct route *r, struct conn *c, const struct http_request *req,
                          const char *path, size_t path_len, struct buf *headers, const char **why)
{
    const char *query = req->query;
    size_t query_len = req->query_len;
    if (r->kind == ROUTE_RAW) {
        const char *name = path + r->path_len;
        size_t len = path_len - r->path_len;
        if (!chan_name_valid(name, len, why))
            return 400;
        if (!route_allows(r, c, AUTH_SUBSCRIBE, name, len, why)) {
            if (!*why)
                *why = "not allowed to subscribe to this channel";
            return 403;
        }
        uint64_t since, last;
        int bad, recovered = raw_resume(query, query_len, name, len, &since, &last, &bad);
        if (bad) {
            *why = "since must be a seq (a whole number >= 0)";
            return 400;
        }
        if (chan_numbered_elsewhere(name, len))
            return 0; /* answered in the 101 once Redis has said where the channel is */
        if (recovered != -1 && (recovered != -2 || chan_recover(name, len, 0, NULL, 0, &last) >= 0)) {
            buf_printf(headers, "X-Herald-Epoch: %s\r\nX-Herald-Seq: %llu\r\n", chan_epoch_of(name, len),
                       (unsigned long long)last);
            if (recovered >= 0)
                buf_printf(headers, "X-Herald-Recovered: %s\r\n", recovered ? "true" : "false");
        }
        return 0;
    }
    if (r->kind == ROUTE_PUBSUB) {
        ssize_t n = query_channels(query, query_len);
        if (n == -2) {
            *why = "malformed subscribe parameter";
            return 400;
        }
        struct check_ctx ctx = {r, c, why, 0};
        if (n >= 0 && each_channel(scratch.data, (size_t)n, check_name, &ctx))
            return ctx.status;
    }
    return 0;
}

int route_accept(struct route *r, struct conn *c, const struct http_request *req, const char *path,
                 size_t path_len, struct buf *headers, const char **why)
{
    if (r->kind == ROUTE_SCRIPT)
        return script_accept(r, c, req, path, path_len, why);
    int status = r->script ? script_accept(r, c, req, path, path_len, why) : 0;
    if (!status)
        status = builtin_accept(r, c, req, path, path_len, headers, why);
    if (status && r->script)
        script_refused(c, r);
    return status;
}

int route_open(struct route *r, struct conn *c, const char *path, size_t path_len, const char *query,
               size_t query_len)
{
    if (c->awaiting) { /* see route_waits: the channels Redis numbers first */
        if (r->kind == ROUTE_RAW) {
            struct raw_resume rr;
            raw_resume_parse(query, query_len, &rr);
            server_join(c, path + r->path_len, path_len - r->path_len, rr.since,
                        rr.epoch_len < 0 ? NULL : rr.epoch, rr.epoch_len < 0 ? 0 : (size_t)rr.epoch_len, 1);
        } else if (r->kind == ROUTE_PUBSUB) {
            ssize_t n = query_channels(query, query_len);
            if (n >= 0)
                each_channel(scratch.data, (size_t)n, join_name, c);
        }
        return 0;
    }
    if (r->kind == ROUTE_RAW) {
        const char *name = path + r->path_len;
        size_t len = path_len - r->path_len;
        chan_subscribe(c, name, len);
        uint64_t since, last;
        int bad;
        if (raw_resume(query, query_len, name, len, &since, &last, &bad) == 1)
            chan_replay(c, name, len, since);
    } else if (r->kind == ROUTE_PUBSUB) {
        ssize_t n = query_channels(query, query_len);
        if (n >= 0)
            each_channel(scratch.data, (size_t)n, subscribe_name, c);
    }
    if (r->script)
        script_opened(c);
    return 0;
}

void route_closed(struct conn *c, uint16_t code, const char *reason)
{
    if (c->route)
        script_closed(c, code, reason); /* a script route's, or a built-in route's authorize script */
}

/* c's client object belonged to a script state that is gone. */
static void forget_client_object(struct conn *c, void *arg)
{
    if (c->route == arg)
        c->script_ref = -2; /* LUA_NOREF */
}

int route_adopt(struct route **routes, size_t n, struct route *const *old, size_t nold)
{
    int failures = 0;
    char err[512];
    for (size_t i = 0; i < n; i++) {
        struct route *r = routes[i];
        for (size_t j = 0; j < nold; j++) {
            struct route *o = old[j];
            if (o->kind != r->kind || strcmp(o->path, r->path) != 0)
                continue;
            o->publish = r->publish;
            o->require_token = r->require_token;
            o->deflate = r->deflate;
            o->deflate_min_size = r->deflate_min_size;
            o->deflate_level = r->deflate_level;
            for (size_t k = 0; k < o->norigins; k++)
                free(o->origins[k]);
            free(o->origins);
            o->origins = r->origins;
            o->norigins = r->norigins;
            r->origins = NULL;
            r->norigins = 0;
            if (r->script) {
                free(o->script);
                o->script = xstrdup(r->script);
            } else if (o->script) {
                /* A built-in route's authorize script was taken out of the configuration. */
                conn_foreach(forget_client_object, o);
                script_unload(o);
                free(o->script);
                o->script = NULL;
            }
            routes[i] = route_ref(o);
            route_unref(r);
            r = o;
            break;
        }
        if (r->script && script_load(r, err, sizeof(err)) < 0) {
            log_error("%s", err);
            failures++;
        }
    }
    return failures;
}

/* --- the generic protocol ------------------------------------------------------------------ *
 *
 * Replies go out in the order of the requests. A reply that waits for Redis (a publish to, or a
 * subscription of, a channel whose history Redis keeps) holds back those after it: they wait in
 * the connection's outbox. A request after a waiting subscription, or any request other than a
 * publish after a waiting publish, waits there too, unexecuted, and runs in its turn: so a
 * subscription's reply, its replay and its presence come before what the requests after it do,
 * while publishes to Redis-kept channels go out back to back (Redis answers them in order). */

enum obx_kind { OBX_TEXT, OBX_PUB, OBX_JOIN };

/* A reply in the outbox. */
struct obx_item {
    struct obx_item *next;
    struct conn *c;
    uint8_t kind;
    uint8_t ready;             /* its text is known */
    uint8_t queued;            /* in the outbox (else a publish answered at once, on the stack) */
    int8_t presence, events;   /* OBX_JOIN: the presence to set once it is out */
    struct chan_join *join;    /* OBX_JOIN: emitted after the reply */
    struct buf text;           /* the reply */
    struct buf info;           /* OBX_JOIN: the presence info */
    const char *id;            /* the request's id (JSON text) or NULL */
    size_t id_len;
    size_t channel_len;
    char channel[CHAN_NAME_MAX + 1];
    char id_copy[];            /* where a queued item keeps its id */
};

/* A request waiting to be executed. */
struct obx_request {
    struct obx_request *next;
    size_t len;
    uint8_t binary;
    char data[];
};

struct outbox {
    struct obx_item *head, *tail;
    struct obx_request *rhead, *rtail;
    size_t request_bytes;
    uint32_t joins;            /* OBX_JOIN items */
    uint8_t running;           /* obx_flush is running */
};

/* Requests waiting their turn on one connection, in bytes, past which it is closed (1013). */
#define OBX_REQUESTS_MAX (1u << 20)

static void pubsub_run(struct conn *c, const uint8_t *data, size_t len, int binary, int queued);

/* Start a reply {"op":"<op>" in scratch. */
static void reply_begin(const char *op)
{
    scratch.len = 0;
    buf_printf(&scratch, "{\"op\":\"%s\"", op);
}

static struct obx_item *obx_add(struct conn *c, enum obx_kind kind, const char *id, size_t id_len)
{
    struct outbox *o = CONN_WAIT(c, outbox);
    if (!o)
        conn_waits(c)->outbox = o = xcalloc(1, sizeof(*o));
    struct obx_item *it = xcalloc(1, sizeof(*it) + (id ? id_len : 0));
    it->c = c;
    it->kind = (uint8_t)kind;
    it->queued = 1;
    if (id) {
        memcpy(it->id_copy, id, id_len);
        it->id = it->id_copy;
        it->id_len = id_len;
    }
    if (o->tail)
        o->tail->next = it;
    else
        o->head = it;
    o->tail = it;
    if (kind == OBX_JOIN)
        o->joins++;
    return it;
}

static void obx_item_free(struct obx_item *it)
{
    buf_free(&it->text);
    buf_free(&it->info);
    free(it);
}

/* Send a reply (text, len) now, or after the replies waiting before it. */
static void reply_send(struct conn *c, const char *text, size_t len)
{
    struct outbox *o = CONN_WAIT(c, outbox);
    if (!o || !o->head) {
        route_send_text(c, text, len);
        return;
    }
    struct obx_item *it = obx_add(c, OBX_TEXT, NULL, 0);
    buf_append(&it->text, text, len);
    it->ready = 1;
}

/* Finish the reply with the request's id, if it had one, and send it. */
static void reply_end(struct conn *c, const struct json_span *id)
{
    if (id && id->type != JSON_NONE) {
        buf_append_str(&scratch, ",\"id\":");
        buf_append(&scratch, id->p, id->len);
    }
    buf_append(&scratch, "}", 1);
    reply_send(c, scratch.data, scratch.len);
}

static void reply_error(struct conn *c, const char *error, const struct json_span *id)
{
    stats.request_errors++;
    scratch.len = 0;
    pubsub_error_reply(&scratch, error, id);
    reply_send(c, scratch.data, scratch.len);
}

/* An error reply into an item's text (its id is its own JSON text). */
static void item_error(struct obx_item *it, const char *what, const char *err)
{
    char msg[400];
    snprintf(msg, sizeof(msg), "%s: %s", what, err);
    struct json_span id = {.type = it->id ? JSON_NUMBER : JSON_NONE, .p = it->id, .len = it->id_len};
    stats.request_errors++;
    it->text.len = 0;
    pubsub_error_reply(&it->text, msg, &id);
}

/* Send what is ready at the head of c's outbox, then run the requests that waited, in order,
 * while nothing waits before them. */
static void obx_flush(struct conn *c)
{
    struct outbox *o = CONN_WAIT(c, outbox);
    if (!o || o->running)
        return;
    o->running = 1;
    while (CONN_WAIT(c, outbox) == o && c->state == CONN_WS) {
        struct obx_item *it = o->head;
        if (it && it->ready) {
            o->head = it->next;
            if (!o->head)
                o->tail = NULL;
            if (it->kind == OBX_JOIN)
                o->joins--;
            route_send_text(c, it->text.data, it->text.len);
            if (it->join) {
                chan_join_emit(it->join);
                if (it->presence != -1 || it->events != -1)
                    chan_presence_set(c, it->channel, it->channel_len, it->presence, it->events,
                                      it->info.data, it->info.len);
            }
            obx_item_free(it);
            continue;
        }
        if (it || !o->rhead)
            break;
        struct obx_request *q = o->rhead;
        o->rhead = q->next;
        if (!o->rhead)
            o->rtail = NULL;
        o->request_bytes -= q->len;
        pubsub_run(c, (const uint8_t *)q->data, q->len, q->binary, 1);
        free(q);
    }
    if (CONN_WAIT(c, outbox) == o) {
        o->running = 0;
        if (!o->head && !o->rhead) {
            free(o);
            c->waits->outbox = NULL;
        }
    }
}

/* Keep a request for its turn (at the front: one taken from the queue that must wait again). */
static void obx_defer(struct conn *c, const uint8_t *data, size_t len, int binary, int front)
{
    struct outbox *o = CONN_WAIT(c, outbox);
    if (o->request_bytes + len > OBX_REQUESTS_MAX) {
        stats.slow_consumers_dropped++;
        conn_ws_close(c, WS_CLOSE_TRY_AGAIN, "too many requests waiting for Redis");
        return;
    }
    struct obx_request *q = xmalloc(sizeof(*q) + len);
    q->len = len;
    q->binary = (uint8_t)binary;
    memcpy(q->data, data, len);
    if (front) {
        q->next = o->rhead;
        o->rhead = q;
        if (!o->rtail)
            o->rtail = q;
    } else {
        q->next = NULL;
        if (o->rtail)
            o->rtail->next = q;
        else
            o->rhead = q;
        o->rtail = q;
    }
    o->request_bytes += len;
}

void route_detach(struct conn *c)
{
    struct outbox *o = CONN_WAIT(c, outbox);
    if (!o)
        return;
    c->waits->outbox = NULL; /* what waits in channel.c for it is cancelled next, silently */
    while (o->head) {
        struct obx_item *it = o->head;
        o->head = it->next;
        obx_item_free(it);
    }
    while (o->rhead) {
        struct obx_request *q = o->rhead;
        o->rhead = q->next;
        free(q);
    }
    free(o);
}

/* A publish's outcome: the published reply (or an error), now or in its turn. */
static void ws_published(void *arg, uint64_t seq, size_t subscribers, const char *err)
{
    struct obx_item *it = arg;
    struct buf *b = it->queued ? &it->text : &scratch;
    if (err) {
        item_error(it, "cannot publish to this channel now", err);
        if (!it->queued) {
            reply_send(it->c, it->text.data, it->text.len);
            buf_free(&it->text);
            return;
        }
    } else {
        b->len = 0;
        buf_printf(b, "{\"op\":\"published\",\"channel\":\"%.*s\",\"seq\":%llu",
                   (int)it->channel_len, it->channel, (unsigned long long)seq);
        if (it->id) {
            buf_append_str(b, ",\"id\":");
            buf_append(b, it->id, it->id_len);
        }
        buf_append(b, "}", 1);
        if (!it->queued) {
            reply_send(it->c, b->data, b->len);
            return;
        }
    }
    it->ready = 1;
    obx_flush(it->c);
}

/* A subscription's answer, from Redis: the subscribed reply, then (once it is out) the replay. */
static void ws_joined(struct conn *c, struct chan_join *j, const struct chan_join_result *r, void *arg)
{
    struct outbox *o = CONN_WAIT(c, outbox);
    struct obx_item *it = o ? o->head : NULL;
    while (it && (it->kind != OBX_JOIN || it->ready))
        it = it->next;
    if (!it)
        return; /* cannot be: the connection's outbox holds its join until it is answered */
    if (r->err) {
        item_error(it, "cannot subscribe to this channel now", r->err);
    } else {
        it->join = j;
        it->text.len = 0;
        buf_printf(&it->text, "{\"op\":\"subscribed\",\"channel\":\"%.*s\"", (int)it->channel_len,
                   it->channel);
        if (r->epoch) {
            buf_printf(&it->text, ",\"epoch\":\"%s\",\"seq\":%llu", r->epoch,
                       (unsigned long long)r->seq);
            if (r->recovered >= 0)
                buf_printf(&it->text, ",\"recovered\":%s", r->recovered ? "true" : "false");
        }
        if (it->id) {
            buf_append_str(&it->text, ",\"id\":");
            buf_append(&it->text, it->id, it->id_len);
        }
        buf_append(&it->text, "}", 1);
    }
    it->ready = 1;
    obx_flush(c);
}

/* Most members listed in a presence reply; "count" says how many there are. */
#define PRESENCE_LIST_MAX 1000

struct presence_list {
    struct buf *b;
    size_t count;
};

static void presence_item(const char *mid, size_t mid_len, const char *info, size_t info_len,
                          struct conn *local, void *arg)
{
    struct presence_list *l = arg;
    if (l->count++ >= PRESENCE_LIST_MAX)
        return;
    buf_printf(l->b, "%s{\"id\":\"%.*s\"", l->count > 1 ? "," : "", (int)mid_len, mid);
    if (info_len) {
        buf_append_str(l->b, ",\"info\":");
        buf_append(l->b, info, info_len);
    }
    buf_append(l->b, "}", 1);
}

void route_presence_reply(struct conn *c, const char *name, size_t len, const char *id, size_t id_len)
{
    scratch.len = 0;
    buf_printf(&scratch, "{\"op\":\"presence\",\"channel\":\"%.*s\",\"clients\":[", (int)len, name);
    struct presence_list l = {&scratch, 0};
    chan_presence_foreach(name, len, presence_item, &l);
    buf_printf(&scratch, "],\"count\":%zu", l.count);
    if (l.count > PRESENCE_LIST_MAX)
        buf_append_str(&scratch, ",\"truncated\":true");
    if (id) {
        buf_append_str(&scratch, ",\"id\":");
        buf_append(&scratch, id, id_len);
    }
    buf_append(&scratch, "}", 1);
    route_send_text(c, scratch.data, scratch.len);
}

/* subscribe or unsubscribe with "pattern". */
static void pattern_request(struct conn *c, const struct pubsub_request *q)
{
    const char *why;
    if (q->op == PUBSUB_SUBSCRIBE) {
        if (!route_allows_pattern(c->route, c, q->channel, q->channel_len, &why)) {
            char msg[320];
            snprintf(msg, sizeof(msg), "not allowed to subscribe to this pattern: %s",
                     why ? why : "refused");
            reply_error(c, msg, &q->id);
            return;
        }
        if (chan_psubscribe(c, q->channel, q->channel_len) < 0) {
            reply_error(c, "subscription limit reached for this connection", &q->id);
            return;
        }
        reply_begin("subscribed");
    } else {
        chan_punsubscribe(c, q->channel, q->channel_len);
        reply_begin("unsubscribed");
    }
    buf_printf(&scratch, ",\"pattern\":\"%s\"", q->channel); /* nothing in a pattern needs escaping */
    reply_end(c, &q->id);
}

/* The generic route's request in data: executed now, or kept for its turn (queued: it comes from
 * the outbox, at its front). */
static void pubsub_run(struct conn *c, const uint8_t *data, size_t len, int binary, int queued)
{
    struct outbox *o = CONN_WAIT(c, outbox);
    if (o && o->rhead && !queued) { /* requests wait before it: so does it */
        obx_defer(c, data, len, binary, 0);
        return;
    }
    struct pubsub_request q;
    const char *error;
    char error_buf[64];
    if (pubsub_parse((const char *)data, len, binary, &q, &error, error_buf) < 0) {
        reply_error(c, error, &q.id);
        return;
    }
    if (o && o->head && (o->joins || q.op != PUBSUB_PUBLISH || q.is_pattern)) {
        obx_defer(c, data, len, binary, queued);
        return;
    }
    if (q.is_pattern) {
        pattern_request(c, &q);
        return;
    }
    const struct json_span *id = &q.id;
    const char *channel = q.channel;
    size_t clen = q.channel_len;
    if (q.op != PUBSUB_UNSUBSCRIBE &&
        !route_allows(c->route, c, q.op == PUBSUB_PUBLISH ? AUTH_PUBLISH : AUTH_SUBSCRIBE, channel,
                      clen, &error)) {
        char msg[320];
        snprintf(msg, sizeof(msg), "not allowed to %s this channel%s%s",
                 q.op == PUBSUB_PUBLISH    ? "publish to"
                 : q.op == PUBSUB_PRESENCE ? "see the presence of"
                                           : "subscribe to",
                 error ? ": " : "", error ? error : "");
        reply_error(c, msg, id);
        return;
    }
    const char *id_text = id->type != JSON_NONE ? id->p : NULL;
    switch (q.op) {
    case PUBSUB_PRESENCE: {
        if (chan_presence_request(c, channel, clen, id_text, id->len))
            route_presence_reply(c, channel, clen, id_text, id->len);
        break;
    }
    case PUBSUB_SUBSCRIBE: {
        struct chan_join_result now;
        int rc = chan_subscribe_from(c, channel, clen, q.since, q.epoch_len < 0 ? NULL : q.epoch,
                                     q.epoch_len < 0 ? 0 : (size_t)q.epoch_len, 0, ws_joined, NULL,
                                     &now);
        if (rc == CHAN_LIMIT) {
            reply_error(c, "subscription limit reached for this connection", id);
            return;
        }
        if (rc == CHAN_UNAVAILABLE) {
            char msg[320];
            snprintf(msg, sizeof(msg), "cannot subscribe to this channel now: %s", now.err);
            reply_error(c, msg, id);
            return;
        }
        if (rc == CHAN_JOINING) { /* answered when Redis has said where the channel is */
            struct obx_item *it = obx_add(c, OBX_JOIN, id_text, id->len);
            memcpy(it->channel, channel, clen);
            it->channel_len = clen;
            it->presence = (int8_t)q.presence;
            it->events = (int8_t)q.events;
            if (q.info.type != JSON_NONE)
                buf_append(&it->info, q.info.p, q.info.len);
            break;
        }
        reply_begin("subscribed");
        buf_printf(&scratch, ",\"channel\":\"%s\"", channel);
        if (now.epoch) {
            buf_printf(&scratch, ",\"epoch\":\"%s\",\"seq\":%llu", now.epoch, (unsigned long long)now.seq);
            if (now.recovered >= 0)
                buf_printf(&scratch, ",\"recovered\":%s", now.recovered ? "true" : "false");
        }
        reply_end(c, id);
        if (now.recovered == 1 && q.since >= 0)
            chan_replay(c, channel, clen, (uint64_t)q.since);
        if (q.presence != -1 || q.events != -1)
            chan_presence_set(c, channel, clen, q.presence, q.events, q.info.p,
                              q.info.type != JSON_NONE ? q.info.len : 0);
        break;
    }
    case PUBSUB_UNSUBSCRIBE:
        chan_unsubscribe(c, channel, clen);
        reply_begin("unsubscribed");
        buf_printf(&scratch, ",\"channel\":\"%s\"", channel);
        reply_end(c, id);
        break;
    case PUBSUB_PUBLISH: {
        struct chan_msg m = {.channel = channel, .channel_len = clen, .data = q.data.p,
                             .len = q.data.len, .is_json = 1, .utf8 = 1, .json = 1};
        /* Answered in the callback: at once, or (a channel Redis numbers) in its turn. */
        struct obx_item now_item = {.c = c, .id = id_text, .id_len = id->len, .channel_len = clen};
        memcpy(now_item.channel, channel, clen);
        struct chan_pub *pending = NULL;
        if (chan_publish_cb(&m, c, ws_published, &now_item, &pending) == 0) {
            struct obx_item *it = obx_add(c, OBX_PUB, id_text, id->len);
            memcpy(it->channel, channel, clen);
            it->channel_len = clen;
            chan_pub_rebind(pending, ws_published, it);
        }
        break;
    }
    }
    if (queued)
        return; /* obx_flush goes on */
    if (CONN_WAIT(c, outbox) && !((struct outbox *)c->waits->outbox)->running)
        obx_flush(c); /* a reply queued behind others may be sendable (or nothing waits: freed) */
}

static void pubsub_message(struct conn *c, const uint8_t *data, size_t len, int binary)
{
    pubsub_run(c, data, len, binary, 0);
}

/* A raw client's publish: nothing to answer, unless it could not be published (a channel whose
 * history Redis keeps, with Redis unreachable): then the client is told by a close. */
static void raw_published(void *arg, uint64_t seq, size_t subscribers, const char *err)
{
    if (err)
        conn_ws_close(arg, WS_CLOSE_TRY_AGAIN, "cannot publish now: Redis cannot be reached");
}

void route_message(struct conn *c, const uint8_t *data, size_t len, int binary)
{
    struct route *r = c->route;
    r->messages++;
    stats.ws_messages_received++;
    switch (r->kind) {
    case ROUTE_ECHO:
        conn_send_frame(c, binary ? WS_OP_BINARY : WS_OP_TEXT, data, len);
        break;
    case ROUTE_PUBSUB:
        pubsub_message(c, data, len, binary);
        break;
    case ROUTE_RAW:
        if (!r->publish) {
            conn_ws_close(c, WS_CLOSE_POLICY, "this route does not accept messages");
            break;
        }
        {
            /* A raw connection's one subscription is the channel its path named. */
            size_t name_len;
            const char *name = chan_first_name(c, &name_len);
            struct chan_msg m = {.channel = name, .channel_len = name_len, .data = (const char *)data,
                                 .len = len, .utf8 = (int8_t)!binary, .json = -1};
            const char *why;
            if (name && !route_allows(r, c, AUTH_PUBLISH, name, name_len, &why)) {
                /* The close reason is fixed: a script's reason might not fit its 123 bytes. */
                conn_ws_close(c, WS_CLOSE_POLICY, "not allowed to publish to this channel");
                break;
            }
            if (name)
                chan_publish_cb(&m, c, raw_published, c, NULL);
        }
        break;
    case ROUTE_SCRIPT:
        script_message(c, data, len, binary);
        break;
    case ROUTE_SSE: /* event streams carry nothing from the client */
        break;
    }
}

/* --- encoding for subscribers --------------------------------------------------------------- */

static int msg_utf8(struct chan_msg *m)
{
    if (m->utf8 < 0)
        m->utf8 = (int8_t)ws_utf8_valid((const uint8_t *)m->data, m->len);
    return m->utf8;
}

static int msg_json(struct chan_msg *m)
{
    if (m->json < 0)
        m->json = (int8_t)json_valid(m->data, m->len);
    return m->json;
}

/* Append an SSE event: the id, then the data split into data: lines (a line break in the payload
 * would otherwise end the field). */
static void sse_event(struct chan_msg *m, const char *data, size_t len)
{
    buf_printf(&scratch, "id: %s:%.*s:%llu\ndata: ", m->epoch ? m->epoch : chan_epoch(),
               (int)m->channel_len, m->channel,
               (unsigned long long)m->seq);
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        if (data[i] == '\n' || data[i] == '\r') {
            buf_append(&scratch, data + start, i - start);
            if (data[i] == '\n')
                buf_append_str(&scratch, "\ndata: ");
            start = i + 1;
        }
    }
    buf_append(&scratch, data + start, len - start);
    buf_append(&scratch, "\n\n", 2);
}

int route_payload(struct route *r, struct chan_msg *m, const char **p, size_t *len, int *opcode)
{
    r->deliver_calls++;
    if (r->kind == ROUTE_SSE) {
        /* The event's data is the JSON of a /ws message, without "op". */
        static struct buf json;
        json.len = 0;
        buf_printf(&json, "{\"channel\":\"%.*s\",\"seq\":%llu,\"data\":", (int)m->channel_len, m->channel,
                   (unsigned long long)m->seq);
        if (m->is_json || msg_json(m)) {
            buf_append(&json, m->data, m->len);
        } else {
            char *o = buf_reserve(&json, JSON_STRING_ENCODED_MAX(m->len) + 1);
            json.len += json_string_encode(m->data, m->len, o);
        }
        buf_append(&json, "}", 1);
        scratch.len = 0;
        sse_event(m, json.data, json.len);
        *p = scratch.data;
        *len = scratch.len;
        *opcode = ROUTE_OP_UNFRAMED;
        return 0;
    }
    if (r->kind == ROUTE_PUBSUB) {
        scratch.len = 0;
        buf_printf(&scratch, "{\"op\":\"message\",\"channel\":\"%.*s\",\"seq\":%llu,\"data\":",
                   (int)m->channel_len, m->channel, (unsigned long long)m->seq);
        if (m->is_json || msg_json(m)) {
            buf_append(&scratch, m->data, m->len);
        } else {
            char *out = buf_reserve(&scratch, JSON_STRING_ENCODED_MAX(m->len) + 1);
            scratch.len += json_string_encode(m->data, m->len, out);
        }
        buf_append(&scratch, "}", 1);
        *p = scratch.data;
        *len = scratch.len;
        *opcode = WS_OP_TEXT;
        return 0;
    }
    if (r->kind == ROUTE_SCRIPT)
        return script_deliver(r, m, p, len, opcode);
    route_plain_payload(m, p, len, opcode);
    return 0;
}

void route_plain_payload(struct chan_msg *m, const char **p, size_t *len, int *opcode)
{
    if (m->is_json && m->len && m->data[0] == '"') {
        if (!m->decoded) {
            m->decoded = xmalloc(m->len);
            ssize_t n = json_string_decode(m->data, m->len, m->decoded);
            m->decoded_len = n < 0 ? 0 : (size_t)n;
        }
        *p = m->decoded;
        *len = m->decoded_len;
        if (opcode) /* decoded text's validity is not kept in m: it is checked for each route */
            *opcode = ws_utf8_valid((const uint8_t *)m->decoded, m->decoded_len) ? WS_OP_TEXT
                                                                                 : WS_OP_BINARY;
        return;
    }
    *p = m->data;
    *len = m->len;
    if (opcode)
        *opcode = msg_utf8(m) ? WS_OP_TEXT : WS_OP_BINARY;
}
