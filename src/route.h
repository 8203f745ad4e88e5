/* route.h - routes: a WebSocket path and what its connections mean. The built-in kinds (the generic
 * JSON pub/sub protocol, raw subscribe, echo) live here; script routes hand their events to Lua.
 *
 * A route is reference counted: connections and channel groups hold it, so a configuration reload
 * can replace the route table while old connections finish on what they started with. */
#ifndef HERALD_ROUTE_H
#define HERALD_ROUTE_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

struct conn;
struct chan_msg;
struct http_request;

enum route_kind { ROUTE_PUBSUB, ROUTE_RAW, ROUTE_ECHO, ROUTE_SCRIPT, ROUTE_SSE };

/* permessage-deflate defaults for a route: messages shorter than this many bytes are sent as they
 * are (below it a typical JSON message saves a few dozen bytes, while every receiver still pays for
 * an inflate call), and zlib's own default level. */
#define ROUTE_DEFLATE_MIN_SIZE 256
#define ROUTE_DEFLATE_LEVEL 6

/* route_payload's opcode for bytes that go out as they are, with no WebSocket frame (SSE). */
#define ROUTE_OP_UNFRAMED (-1)

struct route {
    uint32_t refs;
    enum route_kind kind;
    char *path;
    size_t path_len;
    int prefix;          /* path ends in '/': the rest of the request path is a channel */
    int publish;         /* raw routes: client messages are published to the channel */
    int require_token;   /* clients need a signed token granting the channels they use */
    char **origins;      /* allowed Origin values; NULL: any */
    size_t norigins;
    int deflate;         /* WebSocket routes: permessage-deflate may be negotiated */
    size_t deflate_min_size; /* messages shorter than this are sent uncompressed */
    int deflate_level;   /* zlib compression level, 1..9 */
    char *script;        /* script routes: the script's path; built-in routes: their authorize
                            script's, NULL when none */
    void *script_state;  /* the Lua state running script (script.c) */
    uint64_t messages;   /* messages received from clients on this route */
    uint64_t deliver_calls; /* messages encoded for this route's subscribers */
};

struct route *route_new(enum route_kind kind, const char *path);
struct route *route_ref(struct route *r);
void route_unref(struct route *r);
const char *route_kind_name(enum route_kind kind);

/* The route a request path (percent-decoded, without query) belongs to, or NULL. */
struct route *route_match(struct route *const *routes, size_t n, const char *path, size_t len);

/* 1 if a handshake for path on r waits for Redis before its 101: it subscribes to channels whose
 * history Redis keeps (a raw route's channel, /ws?subscribe=), and a subscription starts where
 * Redis says the channel is, which the 101 of a raw route also tells. */
int route_waits(struct route *r, const char *path, size_t path_len, const char *query, size_t query_len);

/* A WebSocket handshake on r was accepted for c: the 101 response is queued. path is the decoded
 * request path; query the raw query string or NULL. When route_waits said so, it is called twice:
 * first with c->awaiting set and the 101 held, to join those channels (server_join), then again
 * once they are joined and the 101 is queued. Returns 0, or -1 with the connection closed with a
 * reason. */
int route_open(struct route *r, struct conn *c, const char *path, size_t path_len, const char *query,
               size_t query_len);

/* Decide on a handshake before the 101 is sent (channel names, a script's open hook): 0 to go on
 * (header lines for the 101 may be appended to headers), or an HTTP status (400, 403) with *why
 * set. */
int route_accept(struct route *r, struct conn *c, const struct http_request *req, const char *path,
                 size_t path_len, struct buf *headers, const char **why);

/* 1 if c may do action (enum auth_action) on channel through route r: on a route with
 * auth = "token" its token must grant it, and the route's authorize hook (a script route's, or a
 * built-in route's authorize script) must allow it. A refusal is counted, and *why set to a reason
 * for the client (static, or kept until the next call), or NULL when none was given. */
int route_allows(struct route *r, struct conn *c, int action, const char *channel, size_t len,
                 const char **why);

/* The action route_allows_pattern hands an authorize script: "subscribe_pattern". */
#define ROUTE_AUTH_PATTERN 2

/* 1 if c may subscribe to pattern p through r: its token (on auth = "token" routes) must grant
 * every channel the pattern can match (its literal beginning, up to the first "*" or ">" segment,
 * must fall under a granted prefix; "sensors.*.temp" needs "sensors.*", "sensors*" or "*"), and
 * the route's authorize hook, if any, is asked with the action "subscribe_pattern". A pattern
 * without wildcards is the one channel it names. A refusal is counted, with *why set. */
int route_allows_pattern(struct route *r, struct conn *c, const char *p, size_t len, const char **why);

/* c is closing: its route's script, if any, runs its close hook (once). */
void route_closed(struct conn *c, uint16_t code, const char *reason);
/* c is closing: replies and requests waiting their turn are dropped. Called before its
 * subscriptions are undone. */
void route_detach(struct conn *c);

/* After a configuration reload: routes in the new table that match an old route by path and kind
 * are replaced by the old route object (updated in place, its script re-run in its own state), so
 * connections keep their Lua state; new script routes are loaded. Load errors are logged and the
 * route keeps its previous script. Returns the number of scripts that failed to load. */
int route_adopt(struct route **routes, size_t n, struct route *const *old, size_t nold);

/* A complete WebSocket message from c on its route. */
void route_message(struct conn *c, const uint8_t *data, size_t len, int binary);

/* The payload r's subscribers get for m: *p and *len (valid until the next call or until m is
 * gone) and the frame's opcode. Called once per message per route with subscribers. Returns 0, or
 * -1 when the route drops the message. */
int route_payload(struct route *r, struct chan_msg *m, const char **p, size_t *len, int *opcode);
/* The payload as a raw route passes it on, into *p and *len (valid while m is): a JSON string
 * published on the generic route is its contents (decoded once per message, kept in m), anything
 * else the bytes as published. With opcode not NULL, *opcode gets the frame type: text when the
 * payload is valid UTF-8, else binary. */
void route_plain_payload(struct chan_msg *m, const char **p, size_t *len, int *opcode);

/* Send a text frame to c, after anything published to it before (see chan_settle_for). */
void route_send_text(struct conn *c, const char *text, size_t len);

/* Answer c's presence request for channel name: {"op":"presence","channel":...,"clients":[...]},
 * with the request's id (its JSON text; NULL: none). */
void route_presence_reply(struct conn *c, const char *name, size_t len, const char *id, size_t id_len);

#endif
