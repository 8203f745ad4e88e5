/* main.c - command line, configuration, signals, and the event loop. */
#include "buf.h"
#include "config.h"
#include "log.h"
#include "route.h"
#include "script.h"
#include "server.h"

#include <errno.h>
#include <ev.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static struct ev_loop *loop;
static struct config cfg;
static const char *config_file = "herald.lua";
static int port_override;

static void usage(FILE *to)
{
    fprintf(to, "usage: herald [--config FILE] [--port N] [--check] [--version]\n"
                "  --config FILE  configuration file (default herald.lua)\n"
                "  --port N       listen on port N instead of the configured one\n"
                "  --check        check the configuration and exit\n"
                "  --version      print the version and exit\n");
}

/* Descriptors the broker needs besides its connections: listeners, the spare one, the event loop,
 * logs, Redis, tailed files, scripts being read. */
#define FD_RESERVE 64

/* Ask for as many descriptors as the hard limit allows (each connection is one), and say what the
 * limit is: past it, new connections are refused with 503 and counted in accept_errors. */
static void raise_fd_limit(size_t max_connections)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0) {
        log_warn("file descriptor limit unknown: %s", strerror(errno));
        return;
    }
    rlim_t was = rl.rlim_cur;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            log_warn("cannot raise the file descriptor limit to %llu: %s",
                     (unsigned long long)rl.rlim_max, strerror(errno));
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur != was)
        log_info("file descriptor limit: %llu (raised from %llu)", (unsigned long long)rl.rlim_cur,
                 (unsigned long long)was);
    else
        log_info("file descriptor limit: %llu", (unsigned long long)rl.rlim_cur);
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < max_connections + FD_RESERVE)
        log_warn("the file descriptor limit allows about %llu connections, fewer than "
                 "limits.max_connections (%zu); raise the hard limit (ulimit -Hn, LimitNOFILE=) to "
                 "reach it", rl.rlim_cur > FD_RESERVE ? (unsigned long long)(rl.rlim_cur - FD_RESERVE) : 0ULL,
                 max_connections);
}

static void stopped(void) { ev_break(loop, EVBREAK_ALL); }

static void on_stop_signal(struct ev_loop *l, ev_signal *w, int revents)
{
    log_info("%s: shutting down", strsignal(w->signum));
    server_shutdown(stopped);
}

/* Configurations loaded by reloads. The server keeps a pointer to the one it runs and adopts the
 * new routes against it, so the new configuration gets storage of its own; the one before is
 * kept until the next reload, since requests in flight may still point into it. */
static struct config *running = &cfg, *previous;

static void on_reload_signal(struct ev_loop *l, ev_signal *w, int revents)
{
    struct config *next = xcalloc(1, sizeof(*next));
    char err[1024];
    if (config_load(config_file, next, err, sizeof(err)) < 0) {
        log_error("reload failed, keeping the running configuration: %s", err);
        config_free(next);
        free(next);
        return;
    }
    if (port_override)
        next->port = port_override;
    if (next->port != running->port || strcmp(next->host, running->host) != 0)
        log_warn("reload: listen address changes take effect on restart");
    server_reload(next);
    if (previous) {
        config_free(previous);
        if (previous != &cfg)
            free(previous);
    }
    previous = running;
    running = next;
    log_info("configuration reloaded from %s", config_file);
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'}, {"port", required_argument, NULL, 'p'},
        {"check", no_argument, NULL, 'k'},       {"version", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0}};
    int check_only = 0, opt;
    while ((opt = getopt_long(argc, argv, "c:p:kvh", options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_file = optarg;
            break;
        case 'p': {
            char *end;
            long p = strtol(optarg, &end, 10);
            if (*end || p < 1 || p > 65535) {
                fprintf(stderr, "herald: --port %s: expected a port number from 1 to 65535\n", optarg);
                return 2;
            }
            port_override = (int)p;
            break;
        }
        case 'k':
            check_only = 1;
            break;
        case 'v':
            printf("herald %s\n", HERALD_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "herald: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    char err[1024];
    if (config_load(config_file, &cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "herald: %s\n", err);
        config_free(&cfg);
        return 1;
    }
    if (port_override)
        cfg.port = port_override;
    loop = ev_default_loop(EVFLAG_AUTO);
    script_init(loop);
    for (size_t i = 0; i < cfg.nroutes; i++) {
        if (cfg.routes[i]->script && script_load(cfg.routes[i], err, sizeof(err)) < 0) {
            fprintf(stderr, "herald: %s\n", err);
            config_free(&cfg);
            return 1;
        }
    }
    if (check_only) {
        printf("%s: configuration OK\n", config_file);
        config_free(&cfg);
        return 0;
    }
    if (cfg.log_level)
        log_set_level((enum log_level)log_level_parse(cfg.log_level));
    signal(SIGPIPE, SIG_IGN);
    if (server_start(loop, &cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "herald: %s\n", err);
        config_free(&cfg);
        return 1;
    }
    /* Once listening (so that a start-up error stays the only line), before the first accept. */
    raise_fd_limit(cfg.max_connections);
    ev_signal sigint, sigterm, sighup;
    ev_signal_init(&sigint, on_stop_signal, SIGINT);
    ev_signal_init(&sigterm, on_stop_signal, SIGTERM);
    ev_signal_init(&sighup, on_reload_signal, SIGHUP);
    ev_signal_start(loop, &sigint);
    ev_signal_start(loop, &sigterm);
    ev_signal_start(loop, &sighup);
    log_info("herald %s listening on http://%s:%d/", HERALD_VERSION, cfg.host, cfg.port);
    if (cfg.tls)
        log_info("TLS on https://%s:%d/", cfg.host, cfg.tls->port);
    ev_run(loop, 0);
    log_access_flush();
    log_info("stopped");
    return 0;
}
