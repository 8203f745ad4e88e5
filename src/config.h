/* config.h - the configuration: a Lua chunk that sets globals, loaded and checked into plain C
 * structures. Every problem is reported as one line naming the file, the line and what is wrong.
 * Relative paths in the file are made relative to the file's own directory. */
#ifndef HERALD_CONFIG_H
#define HERALD_CONFIG_H

#include <stddef.h>

struct route;

struct config_redis {
    char *host;
    int port;
    char *socket;     /* a Unix socket path instead of host and port; NULL when unused */
    char *password;
    int db;
    char **channels;
    size_t nchannels;
    char **patterns;
    size_t npatterns;
    int mirror;
    double reconnect_min;   /* seconds before the first reconnection attempt */
    double reconnect_max;   /* the cap of the exponential backoff */
    double connect_timeout; /* a connection not ready by then is dropped and retried */
    double presence_ttl;    /* mirror mode: a node silent this long is gone, its members leave */
};

struct config_tail {
    char *path;
    char *channel;
    int from_start;
    double poll;      /* seconds between checks of the file besides inotify's events */
};

struct config_tls_cert {
    char *cert;
    char *key;
};

struct config_tls {
    int port;
    char *cert;        /* the default certificate (chain) and key */
    char *key;
    struct config_tls_cert *sni; /* more certificates, chosen by the client's server name */
    size_t nsni;
};

struct config_history {
    char *prefix;
    size_t length;
    double age;
};

struct config {
    char *file;          /* as given */
    char *dir;           /* its directory, for relative paths */
    char *host;
    int port;
    char *web_root;      /* absolute or relative to the working directory; NULL: none */
    char *access_log;
    char *publish_token;
    char *jwt_secret;    /* HS256 secret for signed tokens; NULL: tokens are not accepted */
    char *log_level;
    size_t max_message;
    size_t send_queue;
    size_t max_connections;
    size_t max_connections_per_ip;
    size_t max_subscriptions;   /* per connection */
    size_t message_rate;        /* messages per second a client may send */
    size_t max_head;
    size_t max_headers;
    double ping_interval;
    double http_timeout;
    double close_timeout;
    double channel_ttl;
    struct route **routes;
    size_t nroutes;
    struct config_redis *redis;   /* NULL: no Redis */
    struct config_tail *tails;
    size_t ntails;
    struct config_tls *tls;       /* NULL: no TLS listener */
    struct config_history *history;
    size_t nhistory;
};

/* How a configuration chunk runs. Whatever it does, it is stopped past its bounds: a chunk that
 * loops forever or grows without end is an error, not a hung broker (a reload keeps the running
 * configuration). */
struct config_env {
    int sandbox;            /* only libraries that reach nothing outside the state: no io, no os
                               beyond time/clock/date/getenv, no loading of chunks or modules, no
                               print, no string patterns (their backtracking runs outside the
                               instruction bound) */
    long long instructions; /* Lua instructions the chunk may run */
    size_t memory;          /* bytes its Lua state may hold */
};
/* What config_load runs with: every standard library, 100 million instructions, 64 MiB. */
extern const struct config_env config_env_default;

/* Load file into cfg (which is zeroed first). Returns 0, or -1 with a one-line message in err.
 * Either way cfg is released with config_free. */
int config_load(const char *file, struct config *cfg, char *err, size_t errlen);
/* The same for a chunk in memory (text[0..len)); file names it in messages, and relative paths are
 * taken from its directory. */
int config_load_buffer(const char *file, const char *text, size_t len, const struct config_env *env,
                       struct config *cfg, char *err, size_t errlen);
void config_free(struct config *cfg);

#endif
