/* script.h - Lua 5.4 routes: each script route has its own Lua state running its script, whose
 * hooks (open, message, deliver, close) shape what the route's clients send and receive, with the
 * `herald` module (publish, timers, JSON, log, channel info) and `client` objects.
 *
 * A script's errors, runaway loops and memory are contained to the call that caused them: the
 * broker and every other route go on. */
#ifndef HERALD_SCRIPT_H
#define HERALD_SCRIPT_H

#include <ev.h>
#include <stddef.h>
#include <stdint.h>

struct route;
struct conn;
struct chan_msg;
struct http_request;
struct buf;
struct lua_State;

/* Set up scripting on loop. Called once before any route is loaded. */
void script_init(struct ev_loop *loop);

/* Load (or, on reload, re-run) r->script in r's Lua state. On failure the route keeps the hooks
 * it had (none for a first load) and -1 is returned with a one-line "file:line: problem" in err. */
int script_load(struct route *r, char *err, size_t errlen);

/* Release r's Lua state (the route is being freed). */
void script_unload(struct route *r);

/* A WebSocket handshake on script route r, before the 101 is sent: create c's client object and
 * run open(client, request). Returns 0 to accept, or 403 with *why (static or kept until the next
 * call) when the hook refused. Sends made during open are queued after the 101. On a built-in
 * route with an authorize script, the same when that script has an open hook (else nothing). */
int script_accept(struct route *r, struct conn *c, const struct http_request *req, const char *path,
                  size_t path_len, const char **why);

/* The 101 has been queued: deliver anything open() sent. */
void script_opened(struct conn *c);

/* A complete message from c: message(client, data, is_binary). */
void script_message(struct conn *c, const uint8_t *data, size_t len, int binary);

/* deliver(channel, data) for a message published to a channel r's clients subscribe to: once per
 * message per route, never per subscriber. Sets *p, *len (valid until the next call) and *opcode.
 * Returns 0, or -1 to drop the message for this route. Without a deliver hook the payload is
 * passed on unchanged. */
int script_deliver(struct route *r, struct chan_msg *m, const char **p, size_t *len, int *opcode);

/* c is closing (code and reason as sent or received; 1006 when the TCP connection just went):
 * run close(client, code, reason) and drop the client object. Called once. */
void script_closed(struct conn *c, uint16_t code, const char *reason);

/* May c do action (enum auth_action) on channel[0..len)? Asks r's authorize hook, if its script has
 * one (a script route's, or a built-in route's authorize script): 1 to allow; 0 to refuse, with
 * *why the hook's reason (kept until the next call) or NULL when it gave none. A hook that fails
 * refuses (the error is logged and counted), and so does a script that never loaded. A built-in
 * route's client gets its client object here the first time. */
int script_authorize(struct route *r, struct conn *c, int action, const char *channel, size_t len,
                     const char **why);

/* A handshake (or event stream) on r was refused after c got a client object: drop the object
 * without a close hook. Does nothing when c has none. */
void script_refused(struct conn *c, struct route *r);

/* Replace the global setmetatable of L (a script's state, or the configuration's) with one that
 * refuses a metatable with a __gc field: Lua runs finalizers with hooks off, where the instruction
 * bound cannot stop one that loops. Its error says they "are not available <where>". */
void script_guard_setmetatable(struct lua_State *L, const char *where);

/* Script figures for /stats: hook calls, errors, runaway scripts, refusals, memory per route. */
void script_stats_json(struct buf *out);
void script_stats_prom(struct buf *out);

#endif
