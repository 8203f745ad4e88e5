/* channel.h - the channel registry, per-channel sequence numbers, subscriptions (to channels and
 * to patterns), presence, and fan-out.
 *
 * Fan-out is per message, not per subscriber: a channel's subscribers are grouped by route (and by
 * the permessage-deflate window they negotiated, if any), and a published message is encoded (and
 * compressed, for such a group) once per group, appended to that group's batch block for the current
 * loop pass. Before the loop sleeps (chan_settle) each subscriber gets one reference to the part of
 * the batch published since it subscribed, so a burst of messages reaches each subscriber as one
 * shared region written with one writev.
 *
 * Pattern subscribers are grouped the same way, per pattern, route and deflate window. A published
 * message is matched against the pattern trie (skipped while nobody has a pattern), and each
 * matching pattern group gets the route's frame (encoded once per route, compressed once per
 * window) appended to its own batch; each of its
 * subscribers is owed the region of that batch it has not been given yet, extended while the
 * frames it gets are adjacent. A connection gets a message once however many of its subscriptions
 * match: a per-message stamp on the connection, set first on the channel's own subscribers that
 * also have patterns, then on each pattern subscriber as it is served.
 *
 * Presence: a subscription may make its connection a member of the channel's presence (with an
 * info object) and/or a listener of its join and leave events. */
#ifndef HERALD_CHANNEL_H
#define HERALD_CHANNEL_H

#include <ev.h>
#include <stddef.h>
#include <stdint.h>

#define CHAN_NAME_MAX 200

struct conn;
struct route;

/* A message being published. Only valid during chan_publish; lazily computed facts about the
 * payload are cached in it so each is worked out once per message, whatever the number of routes. */
struct chan_msg {
    const char *channel;
    size_t channel_len;
    const char *data;
    size_t len;
    uint8_t is_json;   /* data is a JSON value (published on the generic route) */
    int8_t utf8;       /* data is valid UTF-8: -1 not yet known */
    int8_t json;       /* data is one valid JSON value: -1 not yet known */
    uint8_t remote;    /* came from another node (through Redis): not mirrored back */
    uint64_t seq;      /* set by chan_publish */
    char *decoded;     /* a JSON string value's contents, made at most once; freed by chan_publish */
    size_t decoded_len;
};

/* 1 if name[0..len) is a valid channel name (1..200 bytes of A-Z a-z 0-9 _ - . : /), else 0 with
 * *why saying what is wrong. */
int chan_name_valid(const char *name, size_t len, const char **why);

/* idle_ttl: seconds an unsubscribed channel is remembered; max_subscriptions: per connection. */
void chan_init(double idle_ttl, size_t max_subscriptions);

/* Publish m to its channel (the name must be valid). Returns the message's seq; *subscribers (if
 * not NULL) gets the channel's local subscriber count. */
uint64_t chan_publish(struct chan_msg *m, size_t *subscribers);

/* Subscribe c, on its route, to channel name (valid). Returns 1, 0 if it already was, or -1 when c
 * has max_subscriptions already (channels and patterns together; counted in stats). */
int chan_subscribe(struct conn *c, const char *name, size_t len);
/* Returns 1, or 0 if c was not subscribed. Messages published before the call are still delivered. */
int chan_unsubscribe(struct conn *c, const char *name, size_t len);
/* Undo all of c's subscriptions, to channels and patterns, and forget its waiting presence
 * requests. */
void chan_unsubscribe_all(struct conn *c);

/* Subscribe c to the valid pattern (see pattern.h): it gets every message of every channel the
 * pattern matches, as a subscriber of that channel would (once, even when it also subscribes to the
 * channel or to other patterns that match). Returns 1, 0 if it already was, or -1 at
 * max_subscriptions. */
int chan_psubscribe(struct conn *c, const char *pattern, size_t len);
/* Returns 1, or 0 if c was not subscribed to the pattern. */
int chan_punsubscribe(struct conn *c, const char *pattern, size_t len);
/* 1 if a pattern with local subscribers matches the channel name. */
int chan_pattern_wanted(const char *name, size_t len);

/* Hand every batch published since the last call to its subscribers' queues. */
void chan_settle(void);
/* Before a reply is queued to c directly, settle if c could have batched messages waiting, so
 * that c sees messages and replies in the order they happened. */
void chan_settle_for(struct conn *c);

/* History: channels whose name starts with a rule's prefix keep their last rule.length messages
 * for rule.age seconds (rules are copied; the first match counts). */
struct config_history;
void chan_set_history(const struct config_history *rules, size_t n);
/* This process's epoch: seqs are only comparable within one. */
const char *chan_epoch(void);
/* Can a client that saw channel up to seq `since` in epoch ep be given everything after it?
 * Returns 1 (yes), 0 (no: the history does not reach back, or another epoch), or -1 (the channel
 * keeps no history). *last_seq gets the channel's last seq. */
int chan_recover(const char *name, size_t len, uint64_t since, const char *ep, size_t ep_len,
                 uint64_t *last_seq);
/* Queue to c, encoded for its route, every held message of the channel after since. Call right
 * after subscribing c, so that these come before anything published later. */
void chan_replay(struct conn *c, const char *name, size_t len, uint64_t since);

/* Forget channels that have had no subscriber for idle_ttl seconds. */
void chan_sweep(ev_tstamp now);

/* --- presence ------------------------------------------------------------------------------ */

/* Presence info: the text of a JSON object, at most this long. */
#define CHAN_INFO_MAX 1024

/* A presence member: id is "<node id>:<connection id>", unique among the nodes sharing a Redis;
 * info is a JSON object's text (info_len 0: none); local is the member's connection when it is on
 * this node, else NULL. */
typedef void (*chan_member_fn)(const char *id, size_t id_len, const char *info, size_t info_len,
                               struct conn *local, void *arg);

/* Change c's presence on channel name, which it must be subscribed to: member 1 makes it a member
 * (with info, a JSON object's text, or none; a member's info stays as it joined), 0 takes it out;
 * events 1 makes it a listener of the channel's join and leave events, 0 not; -1 leaves either
 * as it is. Joining and leaving send the event to the listeners (c too, when it listens). Returns
 * 0, or -1 if c is not subscribed to the channel. */
int chan_presence_set(struct conn *c, const char *name, size_t len, int member, int events,
                      const char *info, size_t info_len);
/* Call fn on every member of the channel: this node's, then (in mirror mode) other nodes' as far
 * as the observer knows them. */
void chan_presence_foreach(const char *name, size_t len, chan_member_fn fn, void *arg);
/* c asks for the channel's members. Returns 1 when the view is complete and c can be answered now;
 * 0 when the observer is still fetching it: the request (id: the JSON text of the request's "id",
 * or NULL) is kept and answered with route_presence_reply when the observer calls
 * chan_presence_ready. */
int chan_presence_request(struct conn *c, const char *name, size_t len, const char *id, size_t id_len);
/* The observer's view of the channel is complete (or as complete as it will get): answer the
 * requests waiting for it. */
void chan_presence_ready(const char *name, size_t len);
/* A member joined or left on another node: tell this node's listeners of the channel. */
void chan_presence_event(const char *name, size_t len, int join, const char *id, size_t id_len,
                         const char *info, size_t info_len);
/* This node's identity in presence ids and Redis (16 hex digits, drawn at the first call). */
const char *chan_node_id(void);

/* --- observer --------------------------------------------------------------------------------- */

/* Who wants to hear about the registry's events (the Redis source in mirror mode): a channel
 * gaining its first local subscriber or losing its last, and every message published on this node
 * (m->remote == 0), called after local fan-out; a pattern gaining its first local subscriber or
 * losing its last; presence. Any callback may be NULL. */
struct chan_observer {
    void (*first_subscriber)(const char *name, size_t len, void *arg);
    void (*last_unsubscribed)(const char *name, size_t len, void *arg);
    void (*published)(const struct chan_msg *m, void *arg);
    void *arg;
    void (*first_pattern)(const char *pattern, size_t len, void *arg);
    void (*last_pattern)(const char *pattern, size_t len, void *arg);
    /* The channel gained its first local member or listener (on 1) or lost its last (on 0). */
    void (*presence_interest)(const char *name, size_t len, int on, void *arg);
    /* A local member joined or left. */
    void (*presence_join)(const char *name, size_t len, const char *id, size_t id_len,
                          const char *info, size_t info_len, void *arg);
    void (*presence_leave)(const char *name, size_t len, const char *id, size_t id_len,
                           const char *info, size_t info_len, void *arg);
    /* 1 if the members of other nodes are known now; 0 if they are being fetched (the observer
     * then calls chan_presence_ready). */
    int (*presence_complete)(const char *name, size_t len, void *arg);
    /* Call fn on the channel's members on other nodes. */
    void (*presence_remote)(const char *name, size_t len, chan_member_fn fn, void *fn_arg, void *arg);
};
/* Set (or, with NULL, clear) the observer. */
void chan_set_observer(const struct chan_observer *observer);
/* Call fn on the name of every channel that has local subscribers (to resubscribe after a
 * reconnect). */
void chan_foreach_subscribed(void (*fn)(const char *name, size_t len, void *arg), void *arg);
/* Call fn on every pattern that has local subscribers. */
void chan_foreach_pattern(void (*fn)(const char *pattern, size_t len, void *arg), void *arg);
/* Call fn on every channel with local presence members or listeners. */
void chan_foreach_presence(void (*fn)(const char *name, size_t len, void *arg), void *arg);
/* Call fn on every local member of the channel. */
void chan_foreach_member(const char *name, size_t len, chan_member_fn fn, void *arg);

/* The name of c's most recent subscription (NULL when none); *len gets its length. */
const char *chan_first_name(const struct conn *c, size_t *len);

size_t chan_count(void);
uint64_t chan_subscription_count(void);
/* Local subscribers and last seq of a channel; 0 and 0 when it is unknown. */
void chan_info(const char *name, size_t len, size_t *subscribers, uint64_t *last_seq);

#endif
