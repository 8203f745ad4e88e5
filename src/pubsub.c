/* pubsub.c - parsing and checking the generic route's requests. */
#include "pubsub.h"

#include <string.h>

enum { KEY_OP, KEY_CHANNEL, KEY_DATA, KEY_ID, KEY_SINCE, KEY_EPOCH, KEY_PATTERN, KEY_PRESENCE,
       KEY_EVENTS, KEY_INFO, KEY_COUNT };
static const char *const request_keys[KEY_COUNT] = {"op", "channel", "data", "id", "since", "epoch",
                                                    "pattern", "presence", "events", "info"};

int64_t pubsub_seq_parse(const char *p, size_t len)
{
    if (!len || len > 19)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(p[i] - '0'); /* 19 digits fit in 64 bits */
    }
    return v <= INT64_MAX ? (int64_t)v : -1;
}

/* A non-negative integer JSON number; -1 if it is anything else. */
static int64_t span_seq(const struct json_span *s)
{
    return s->type == JSON_NUMBER ? pubsub_seq_parse(s->p, s->len) : -1;
}

/* Decode a short JSON string member into out (room for cap bytes, NUL-terminated). -1 if it is
 * not a string or its text is cap bytes or longer. */
static int short_string(const struct json_span *s, char *out, size_t cap)
{
    /* Escapes make a token up to six times longer than its text. */
    char tmp[(CHAN_NAME_MAX + 1) * 6 + 2];
    if (s->type != JSON_STRING || s->len > sizeof(tmp) || cap > CHAN_NAME_MAX + 1)
        return -1;
    ssize_t n = json_string_decode(s->p, s->len, tmp);
    if (n < 0 || (size_t)n >= cap)
        return -1;
    memcpy(out, tmp, (size_t)n);
    out[n] = 0;
    return (int)n;
}

/* A JSON true or false: 1 or 0; -1 when absent, -2 when another value. */
static int span_bool(const struct json_span *s)
{
    if (s->type == JSON_NONE)
        return -1;
    return s->type == JSON_TRUE ? 1 : s->type == JSON_FALSE ? 0 : -2;
}

/* The "pattern" of a subscribe or unsubscribe, which takes no other member but "op" and "id". */
static int parse_pattern(const struct json_span *v, struct pubsub_request *req, const char **error)
{
    if (req->op != PUBSUB_SUBSCRIBE && req->op != PUBSUB_UNSUBSCRIBE) {
        *error = "\"pattern\" goes with subscribe and unsubscribe (publish and presence take a "
                 "\"channel\")";
        return -1;
    }
    if (v[KEY_CHANNEL].type != JSON_NONE) {
        *error = "give \"channel\" or \"pattern\", not both";
        return -1;
    }
    if (v[KEY_SINCE].type != JSON_NONE || v[KEY_EPOCH].type != JSON_NONE ||
        v[KEY_PRESENCE].type != JSON_NONE || v[KEY_EVENTS].type != JSON_NONE ||
        v[KEY_INFO].type != JSON_NONE) {
        *error = "since, epoch, presence, events and info go with a \"channel\", not a \"pattern\"";
        return -1;
    }
    if (v[KEY_PATTERN].type != JSON_STRING) {
        *error = "\"pattern\" must be a string";
        return -1;
    }
    int plen = short_string(&v[KEY_PATTERN], req->channel, sizeof(req->channel));
    if (plen < 0) {
        *error = "pattern is longer than 200 bytes";
        return -1;
    }
    req->is_pattern = 1;
    req->channel_len = (size_t)plen;
    return pattern_valid(req->channel, req->channel_len, error) ? 0 : -1;
}

/* A subscribe's presence members: "presence", "events" and "info". */
static int parse_presence(const struct json_span *v, struct pubsub_request *req, const char **error)
{
    req->presence = span_bool(&v[KEY_PRESENCE]);
    req->events = span_bool(&v[KEY_EVENTS]);
    if (req->op != PUBSUB_SUBSCRIBE &&
        (req->presence != -1 || req->events != -1 || v[KEY_INFO].type != JSON_NONE)) {
        *error = "presence, events and info go with subscribe";
        return -1;
    }
    if (req->presence == -2 || req->events == -2) {
        *error = req->presence == -2 ? "\"presence\" must be true or false"
                                     : "\"events\" must be true or false";
        return -1;
    }
    if (v[KEY_INFO].type != JSON_NONE) {
        if (v[KEY_INFO].type != JSON_OBJECT) {
            *error = "\"info\" must be a JSON object";
            return -1;
        }
        if (v[KEY_INFO].len > CHAN_INFO_MAX) {
            *error = "\"info\" is longer than 1024 bytes";
            return -1;
        }
        if (req->presence != 1) {
            *error = "\"info\" goes with \"presence\":true";
            return -1;
        }
        req->info = v[KEY_INFO];
    }
    return 0;
}

int pubsub_parse(const char *data, size_t len, int binary, struct pubsub_request *req,
                 const char **error, char error_buf[64])
{
    struct json_span v[KEY_COUNT];
    memset(req, 0, sizeof(*req));
    req->since = -1;
    req->epoch_len = -1;
    req->presence = req->events = -1;
    if (binary) {
        *error = "binary messages are not accepted here: send JSON text";
        return -1;
    }
    if (json_object_scan(data, len, request_keys, v, KEY_COUNT, error, error_buf) < 0)
        return -1;
    req->id = v[KEY_ID];
    char op[32];
    if (v[KEY_OP].type == JSON_NONE) {
        *error = "missing \"op\"";
        return -1;
    }
    if (short_string(&v[KEY_OP], op, sizeof(op)) < 0) {
        *error = "\"op\" must be one of subscribe, unsubscribe, publish, presence";
        return -1;
    }
    if (strcmp(op, "subscribe") == 0)
        req->op = PUBSUB_SUBSCRIBE;
    else if (strcmp(op, "unsubscribe") == 0)
        req->op = PUBSUB_UNSUBSCRIBE;
    else if (strcmp(op, "publish") == 0)
        req->op = PUBSUB_PUBLISH;
    else if (strcmp(op, "presence") == 0)
        req->op = PUBSUB_PRESENCE;
    else {
        *error = "unknown \"op\": expected subscribe, unsubscribe, publish or presence";
        return -1;
    }
    if (v[KEY_PATTERN].type != JSON_NONE)
        return parse_pattern(v, req, error);
    if (parse_presence(v, req, error) < 0)
        return -1;
    if (v[KEY_CHANNEL].type == JSON_NONE) {
        *error = "missing \"channel\"";
        return -1;
    }
    if (v[KEY_CHANNEL].type != JSON_STRING) {
        *error = "\"channel\" must be a string";
        return -1;
    }
    int clen = short_string(&v[KEY_CHANNEL], req->channel, sizeof(req->channel));
    if (clen < 0) {
        *error = "channel name is longer than 200 bytes";
        return -1;
    }
    req->channel_len = (size_t)clen;
    if (!chan_name_valid(req->channel, req->channel_len, error))
        return -1;
    if (req->op == PUBSUB_SUBSCRIBE) {
        if (v[KEY_SINCE].type != JSON_NONE && (req->since = span_seq(&v[KEY_SINCE])) < 0) {
            *error = "\"since\" must be a seq (a whole number >= 0)";
            return -1;
        }
        if (v[KEY_EPOCH].type != JSON_NONE &&
            (req->epoch_len = short_string(&v[KEY_EPOCH], req->epoch, sizeof(req->epoch))) < 0) {
            *error = "\"epoch\" must be the string a subscribed reply gave";
            return -1;
        }
    } else if (req->op == PUBSUB_PUBLISH) {
        if (v[KEY_DATA].type == JSON_NONE) {
            *error = "missing \"data\"";
            return -1;
        }
        req->data = v[KEY_DATA];
    }
    return 0;
}

void pubsub_error_reply(struct buf *out, const char *error, const struct json_span *id)
{
    size_t n = strlen(error);
    buf_append_str(out, "{\"op\":\"error\",\"error\":");
    char *quoted = buf_reserve(out, JSON_STRING_ENCODED_MAX(n));
    out->len += json_string_encode(error, n, quoted);
    if (id && id->type != JSON_NONE) {
        buf_append_str(out, ",\"id\":");
        buf_append(out, id->p, id->len);
    }
    buf_append(out, "}", 1);
}
