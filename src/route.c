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

/* The ?subscribe= list of a /ws handshake, decoded into scratch; -1 if absent, -2 if malformed. */
static ssize_t query_channels(const char *query, size_t query_len)
{
    if (!query)
        return -1;
    scratch.len = 0;
    buf_reserve(&scratch, query_len + 1);
    return http_query_get(query, query_len, "subscribe", scratch.data, scratch.cap);
}

/* A raw subscriber's resume request (?since=N&epoch=E): the recovery verdict as chan_recover
 * gives it, or -2 when the query asks for none (or is malformed: *bad set). */
static int raw_resume(const char *query, size_t query_len, const char *name, size_t len, uint64_t *since,
                      uint64_t *last, int *bad)
{
    char text[32], ep[64];
    *bad = 0;
    ssize_t n = query ? http_query_get(query, query_len, "since", text, sizeof(text) - 1) : -1;
    if (n < 0) {
        *bad = n == -2;
        return -2;
    }
    text[n] = 0;
    char *end;
    unsigned long long v = strtoull(text, &end, 10);
    if (!n || *end || text[0] == '-') {
        *bad = 1;
        return -2;
    }
    *since = v;
    ssize_t elen = http_query_get(query, query_len, "epoch", ep, sizeof(ep));
    return chan_recover(name, len, v, elen < 0 ? NULL : ep, elen < 0 ? 0 : (size_t)elen, last);
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
        if (recovered != -1 && (recovered != -2 || chan_recover(name, len, 0, NULL, 0, &last) >= 0)) {
            buf_printf(headers, "X-Herald-Epoch: %s\r\nX-Herald-Seq: %llu\r\n", chan_epoch(),
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

/* --- the generic protocol ------------------------------------------------------------------ */

/* Start a reply {"op":"<op>" in scratch. */
static void reply_begin(const char *op)
{
    scratch.len = 0;
    buf_printf(&scratch, "{\"op\":\"%s\"", op);
}

/* Finish the reply with the request's id, if it had one, and send it. */
static void reply_end(struct conn *c, const struct json_span *id)
{
    if (id && id->type != JSON_NONE) {
        buf_append_str(&scratch, ",\"id\":");
        buf_append(&scratch, id->p, id->len);
    }
    buf_append(&scratch, "}", 1);
    route_send_text(c, scratch.data, scratch.len);
}

static void reply_error(struct conn *c, const char *error, const struct json_span *id)
{
    stats.request_errors++;
    scratch.len = 0;
    pubsub_error_reply(&scratch, error, id);
    route_send_text(c, scratch.data, scratch.len);
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

static void pubsub_message(struct conn *c, const uint8_t *data, size_t len, int binary)
{
    struct pubsub_request q;
    const char *error;
    char error_buf[64];
    if (pubsub_parse((const char *)data, len, binary, &q, &error, error_buf) < 0) {
        reply_error(c, error, &q.id);
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
    switch (q.op) {
    case PUBSUB_PRESENCE: {
        const char *id_text = id->type != JSON_NONE ? id->p : NULL;
        if (chan_presence_request(c, channel, clen, id_text, id->len))
            route_presence_reply(c, channel, clen, id_text, id->len);
        break;
    }
    case PUBSUB_SUBSCRIBE: {
        if (chan_subscribe(c, channel, clen) < 0) {
            reply_error(c, "subscription limit reached for this connection", id);
            return;
        }
        uint64_t last;
        int recovered = chan_recover(channel, clen, q.since < 0 ? 0 : (uint64_t)q.since,
                                     q.epoch_len < 0 ? NULL : q.epoch,
                                     q.epoch_len < 0 ? 0 : (size_t)q.epoch_len, &last);
        reply_begin("subscribed");
        buf_printf(&scratch, ",\"channel\":\"%s\"", channel);
        if (recovered >= 0) {
            buf_printf(&scratch, ",\"epoch\":\"%s\",\"seq\":%llu", chan_epoch(), (unsigned long long)last);
            if (q.since >= 0)
                buf_printf(&scratch, ",\"recovered\":%s", recovered ? "true" : "false");
        }
        reply_end(c, id);
        if (recovered == 1 && q.since >= 0)
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
        uint64_t seq = chan_publish(&m, NULL);
        reply_begin("published");
        buf_printf(&scratch, ",\"channel\":\"%s\",\"seq\":%llu", channel, (unsigned long long)seq);
        reply_end(c, id);
        break;
    }
    }
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
                chan_publish(&m, NULL);
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
    buf_printf(&scratch, "id: %s:%.*s:%llu\ndata: ", chan_epoch(), (int)m->channel_len, m->channel,
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
    /* Raw routes get the bytes as published; a JSON string published on the generic route arrives
     * as the string's contents. */
    if (m->is_json && m->len && m->data[0] == '"') {
        if (!m->decoded) {
            m->decoded = xmalloc(m->len);
            ssize_t n = json_string_decode(m->data, m->len, m->decoded);
            m->decoded_len = n < 0 ? 0 : (size_t)n;
        }
        *p = m->decoded;
        *len = m->decoded_len;
        *opcode = ws_utf8_valid((const uint8_t *)m->decoded, m->decoded_len) ? WS_OP_TEXT : WS_OP_BINARY;
        return 0;
    }
    *p = m->data;
    *len = m->len;
    *opcode = msg_utf8(m) ? WS_OP_TEXT : WS_OP_BINARY;
    return 0;
}
