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
 * info object) and/or a listener of its join and leave events.
 *
 * History kept elsewhere (Redis, in mirror mode): when the observer numbers messages (its `number`
 * hook is set), a channel that a history rule covers is numbered by it, not here. Publishing such
 * a channel hands the message over and reports its seq later (chan_publish_cb); the message is
 * fanned out when it comes back numbered (chan_publish_numbered), on every node alike. Such a
 * channel delivers its seqs in order with no gap and no duplicate: a seq that skips ahead holds
 * the channel's live messages while the missing ones are fetched (CHAN_FETCH_RANGE). A new
 * subscription joins it at an exact point: the observer fetches where the channel is (and what a
 * resuming client missed) and marks that point in the live stream (CHAN_FETCH_JOIN); the
 * subscription receives no live message until the mark, and the channel holds its live messages
 * should the mark come before the fetch's answer. */
#ifndef HERALD_CHANNEL_H
#define HERALD_CHANNEL_H

#include <ev.h>
#include <stddef.h>
#include <stdint.h>

#define CHAN_NAME_MAX 200

struct conn;
struct route;
struct chan_fetch;

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
    uint8_t numbered;  /* seq (and epoch) were given by the observer: taken as they are */
    const char *epoch; /* the epoch seq belongs to; NULL: this process's (chan_epoch) */
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
 * not NULL) gets the channel's local subscriber count. On a channel numbered by the observer the
 * message is handed over and 0 returned (a failure is counted; m->remote messages, which another
 * node or a backend published without a number, are dropped and counted: numbering them here
 * would publish them once per node). */
uint64_t chan_publish(struct chan_msg *m, size_t *subscribers);

/* The outcome of a publish: seq, the local connections given the message (through the channel or
 * a pattern), or err (static text) saying why it was not published. */
typedef void (*chan_pub_fn)(void *arg, uint64_t seq, size_t subscribers, const char *err);
struct chan_pub;
/* Publish m and report the outcome to done(arg, ...): before returning (returns 1) on a channel
 * numbered here, or when it could not be handed over; later (returns 0) on a channel numbered by
 * the observer. c, when not NULL, is the connection the outcome is for: if it goes first, done is
 * never called. Otherwise *handle (if not NULL) gets a handle for chan_pub_cancel while pending. */
int chan_publish_cb(struct chan_msg *m, struct conn *c, chan_pub_fn done, void *arg,
                    struct chan_pub **handle);
/* done will not be called for this publish (whose owner goes away). */
void chan_pub_cancel(struct chan_pub *p);
/* The pending publish's outcome goes to done(arg, ...) instead (once its answer has a home). */
void chan_pub_rebind(struct chan_pub *p, chan_pub_fn done, void *arg);
/* 1 if the observer numbers the channel's messages. */
int chan_numbered_elsewhere(const char *name, size_t len);

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

/* A channel's or a pattern's batch is handed out to its subscribers before it passes this many
 * bytes within a pass (a frame larger than that goes alone): a pass's messages need not all be
 * held in one ever larger block. */
#define CHAN_BATCH_MAX ((size_t)64 << 20)

/* Hand every batch published since the last call to its subscribers' queues. */
void chan_settle(void);
/* Before a reply is queued to c directly, queue to c what was published to it so far this pass
 * (c's part only: the batches go on for everyone else), so that c sees messages and replies in
 * the order they happened. */
void chan_settle_for(struct conn *c);

/* History: channels whose name starts with a rule's prefix keep their last rule.length messages
 * for rule.age seconds (rules are copied; the first match counts). */
struct config_history;
void chan_set_history(const struct config_history *rules, size_t n);
/* This process's epoch: seqs are only comparable within one. */
const char *chan_epoch(void);
/* The epoch a channel's seqs are counted in: its history's own (made with the history, so that a
 * channel forgotten and made again is told apart), or, for a channel without, this process's. */
const char *chan_epoch_of(const char *name, size_t len);
/* Can a client that saw channel up to seq `since` in epoch ep be given everything after it?
 * Returns 1 (yes), 0 (no: the history does not reach back, or another epoch), or -1 (the channel
 * keeps no history). *last_seq gets the channel's last seq. */
int chan_recover(const char *name, size_t len, uint64_t since, const char *ep, size_t ep_len,
                 uint64_t *last_seq);
/* Queue to c, encoded for its route, every held message of the channel after since. Call right
 * after subscribing c, so that these come before anything published later. */
void chan_replay(struct conn *c, const char *name, size_t len, uint64_t since);

/* Subscribing with an answer: where the channel is, and whether a resume was possible. */
struct chan_join;
struct chan_join_result {
    const char *epoch;  /* NULL: the channel keeps no history */
    uint64_t seq;       /* its last seq */
    int recovered;      /* 1 or 0 as chan_recover; -1: no resume was asked */
    const char *err;    /* the subscription failed (it is gone): why */
};
/* The answer to a subscription of c that had to wait. Unless r->err, the caller sends its reply
 * (if any), then calls chan_join_emit(j) (now or once its earlier replies are out). */
typedef void (*chan_join_fn)(struct conn *c, struct chan_join *j, const struct chan_join_result *r,
                             void *arg);
#define CHAN_JOINED 1  /* subscribed; *now holds the answer; replay with chan_replay if recovered */
#define CHAN_JOINING 2 /* subscribed; done is called with the answer later */
#define CHAN_ALREADY 0 /* was subscribed already; *now holds what is known */
#define CHAN_LIMIT (-1) /* max_subscriptions reached */
#define CHAN_UNAVAILABLE (-2) /* not subscribed: the channel's history is unreachable (now->err) */
/* Subscribe c to channel name, resuming after seq since of epoch ep when since >= 0. On a channel
 * numbered by the observer the answer waits for it (CHAN_JOINING): done(c, j, result, arg) is
 * called unless c goes first, never before this returns. If the observer is unreachable, the
 * subscription waits for it (wait 1) or is refused now or later (wait 0: CHAN_UNAVAILABLE, or a
 * result with err). With done NULL nobody waits for the answer: the replay goes by itself. */
int chan_subscribe_from(struct conn *c, const char *name, size_t len, int64_t since, const char *ep,
                        size_t ep_len, int wait, chan_join_fn done, void *arg,
                        struct chan_join_result *now);
/* Send what the subscription replays (the messages after since) and let it join the live stream
 * at its mark. j is not valid afterwards. */
void chan_join_emit(struct chan_join *j);

/* Forget channels that have had no subscriber and no publish for idle_ttl seconds, their seq and
 * their history with them: once no message they hold is younger than their history rule's age
 * (one that still holds some is looked at again idle_ttl later); with age 0 (no age limit), at
 * once. */
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
    /* Number m (its channel has a history rule of length messages, age seconds): hand it over
     * and report with chan_pub_numbered(p, ...) later. Returns 0, or -1 with *err set when it
     * cannot be handed over now. NULL: messages are numbered here. */
    int (*number)(struct chan_pub *p, const struct chan_msg *m, size_t length, double age,
                  const char **err, void *arg);
    /* Run fetch f (below) and report with chan_fetch_reply/marker/failed. Returns 0, or -1 when it
     * cannot now and f->wait is 0 (with f->wait set, it waits for the observer to be reachable). */
    int (*fetch)(struct chan_fetch *f, void *arg);
};

/* A question about a channel numbered by the observer. */
enum chan_fetch_kind {
    CHAN_FETCH_JOIN,  /* where the channel is, what came after since; then mark the live stream */
    CHAN_FETCH_RANGE, /* the messages from since + 1 to until */
};
#define CHAN_EPOCH_MAX 32
struct chan_fetch {
    enum chan_fetch_kind kind;
    int64_t since;    /* JOIN: resume after this seq, -1: no resume; RANGE: start after it */
    uint64_t until;   /* RANGE: the last seq wanted */
    char epoch[CHAN_EPOCH_MAX + 1]; /* the epoch since belongs to ("" when none) */
    size_t length;    /* the channel's history rule */
    double age;
    uint8_t wait;     /* wait for the observer while it is unreachable, rather than fail */
    size_t name_len;
    char name[CHAN_NAME_MAX + 1];
    /* channel.c's own */
    struct chan_join *join;
    uint8_t replied, marked;
};
/* One message of a fetch's answer. */
struct chan_fetch_entry {
    uint64_t seq;
    uint8_t is_json;
    const char *data;
    size_t len;
};
struct chan_fetch_result {
    const char *epoch;  /* the channel's epoch */
    uint64_t last;      /* JOIN: the channel's last seq */
    int recovered;      /* JOIN: 1 if entries hold everything after since, 0 if not, -1 not asked */
    size_t n;
    const struct chan_fetch_entry *entries; /* in seq order; valid during the call */
};
/* The observer's answers: the result (once), for a JOIN its mark in the live stream (once, in
 * stream order with chan_publish_numbered, holding the epoch and the last seq as of the fetch),
 * or a failure instead of what has not come yet. f is not used again once its answer and (JOIN)
 * mark came, or it failed. */
void chan_fetch_reply(struct chan_fetch *f, const struct chan_fetch_result *r);
void chan_fetch_marker(struct chan_fetch *f, const char *epoch, uint64_t seq);
void chan_fetch_failed(struct chan_fetch *f, const char *err);
/* Is f a join whose subscription went? The observer may then drop it unsent (chan_fetch_failed)
 * rather than keep it until it can be sent. */
int chan_fetch_abandoned(const struct chan_fetch *f);
/* The observer numbered a publish (err NULL) or could not (seq 0, epoch NULL, err set). */
void chan_pub_numbered(struct chan_pub *p, uint64_t seq, const char *epoch, const char *err);
/* A message the observer numbered, from its live stream (m->seq and m->epoch set). */
void chan_publish_numbered(struct chan_msg *m);

/* Figures of the channels the observer numbers, for its /stats section. */
struct chan_rstats {
    uint64_t publishes;          /* handed over to be numbered */
    uint64_t publish_errors;     /* refused at once or failed by the observer */
    uint64_t unnumbered_dropped; /* remote messages with no number on such a channel */
    uint64_t joins;              /* subscriptions that waited for their join point */
    uint64_t join_errors;        /* subscriptions refused because the observer was unreachable */
    uint64_t fetches;            /* fetches asked of the observer (joins and gap fills) */
    uint64_t duplicates;         /* messages seen again, dropped */
    uint64_t gaps;               /* gaps in the live stream filled from the history */
    uint64_t missed;             /* seqs that could not be filled (no longer in the history) */
    uint64_t epoch_changes;      /* a channel's history started again (Redis lost it) */
    uint64_t channels;           /* gauges: channels numbered by the observer, */
    uint64_t joining;            /* subscriptions waiting for their join point, */
    uint64_t held;               /* live messages held while a gap is filled or a join answered */
};
void chan_rstats_get(struct chan_rstats *out);

/* Set (or, with NULL, clear) the observer. Channels with a history rule switch to being numbered by
 * it, or back, once nothing of theirs is pending. */
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
