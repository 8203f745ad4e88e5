/* pubsub.h - the requests of the generic JSON pub/sub protocol (the "pubsub" route kind, /ws in the
 * demo): a client's message parsed and checked into a request, and the error reply to a bad one.
 * No I/O and no broker state, so the protocol handler's input side is unit tested and fuzzed; what
 * a request does (subscribe, publish, the replies) is route.c's. */
#ifndef HERALD_PUBSUB_H
#define HERALD_PUBSUB_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "channel.h"
#include "json.h"
#include "pattern.h"

enum pubsub_op { PUBSUB_SUBSCRIBE, PUBSUB_UNSUBSCRIBE, PUBSUB_PUBLISH, PUBSUB_PRESENCE };

/* Longest epoch a subscribe may carry (the broker's epochs are far shorter). */
#define PUBSUB_EPOCH_MAX 63

struct pubsub_request {
    enum pubsub_op op;
    int is_pattern;                  /* subscribe/unsubscribe: "pattern" was given, not "channel" */
    char channel[CHAN_NAME_MAX + 1]; /* decoded, NUL-terminated, a valid channel name, or with
                                      * is_pattern a valid pattern */
    size_t channel_len;
    struct json_span id;             /* the request's "id" (any JSON value); JSON_NONE if absent */
    struct json_span data;           /* publish: the value to publish, as sent */
    int64_t since;                   /* subscribe: resume after this seq; -1 if absent */
    char epoch[PUBSUB_EPOCH_MAX + 1]; /* subscribe: the epoch "since" belongs to */
    int epoch_len;                   /* -1 if absent */
    int presence, events;            /* subscribe: 1 true, 0 false, -1 absent */
    struct json_span info;           /* subscribe with "presence":true: a JSON object of at most
                                      * CHAN_INFO_MAX bytes; JSON_NONE if absent */
};

/* Parse and check one message from a client: data[0..len), binary if it came in a binary frame.
 * Returns 0 with *req filled (its spans point into data), or -1 with *error set to what is wrong
 * (static text or error_buf). Either way req->id is the request's id when the message was a JSON
 * object that had one, so that the error reply can carry it. */
int pubsub_parse(const char *data, size_t len, int binary, struct pubsub_request *req,
                 const char **error, char error_buf[64]);

/* A seq (a message's number in its channel) as text: p[0..len) is 1 to 19 decimal digits, of a
 * value up to INT64_MAX. Returns it, or -1 if the text is anything else. The one reading of a seq,
 * wherever one comes from: a subscribe's "since", a raw route's ?since=, an event stream's
 * Last-Event-ID, Redis's answers. */
int64_t pubsub_seq_parse(const char *p, size_t len);

/* Append the reply to a bad request, {"op":"error","error":"...","id":...}, to out: valid JSON
 * and valid UTF-8 whatever error holds. id may be NULL. */
void pubsub_error_reply(struct buf *out, const char *error, const struct json_span *id);

#endif
