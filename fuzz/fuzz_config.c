/* fuzz_config.c - libFuzzer driver for the configuration loader: each input is a configuration
 * chunk, loaded as `herald --check` loads one (route scripts are not run).
 *
 * The chunk runs sandboxed (config_env.sandbox: no io, no os.execute/remove/rename, no loading of
 * other chunks), so no input can touch the file system beyond stat()ing the paths it names; and
 * with small bounds, so `while true do end` or a runaway allocation ends the input quickly. Checked:
 * the loader never crashes or leaks whatever the chunk does (metatables on its tables included),
 * fails with exactly one line that names the file, and a configuration it accepts holds only
 * values within their documented ranges. */
#include "fuzz.h"
#include "channel.h"
#include "config.h"
#include "route.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static void check_accepted(const struct config *cfg)
{
    const char *why;
    REQUIRE(cfg->host && cfg->port >= 1 && cfg->port <= 65535);
    REQUIRE(cfg->max_message >= 16 && cfg->send_queue >= 1024);
    REQUIRE(cfg->max_connections >= 1 && cfg->max_connections_per_ip >= 1);
    REQUIRE(cfg->max_subscriptions >= 1 && cfg->message_rate >= 1);
    REQUIRE(cfg->max_head >= 1024 && cfg->max_head <= 65536);
    REQUIRE(cfg->max_headers >= 1 && cfg->max_headers <= 64);
    REQUIRE(cfg->ping_interval > 0 && cfg->http_timeout > 0 && cfg->close_timeout > 0);
    REQUIRE(cfg->channel_ttl >= 0);
    REQUIRE(!cfg->jwt_secret || strlen(cfg->jwt_secret) >= 16);
    REQUIRE(!cfg->publish_token || cfg->publish_token[0]);
    for (size_t i = 0; i < cfg->nroutes; i++) {
        const struct route *r = cfg->routes[i];
        REQUIRE(r && r->path && r->path[0] == '/' && r->path_len == strlen(r->path));
        REQUIRE(r->kind >= ROUTE_PUBSUB && r->kind <= ROUTE_SSE);
        REQUIRE(r->prefix == (r->path[r->path_len - 1] == '/'));
        if (r->kind == ROUTE_RAW || r->kind == ROUTE_SSE)
            REQUIRE(r->prefix);
        REQUIRE((r->kind == ROUTE_SCRIPT) <= (r->script != NULL));
        REQUIRE(!(r->kind == ROUTE_ECHO && r->script));
        REQUIRE(!r->require_token || cfg->jwt_secret);
        REQUIRE(!r->script_state); /* loading a configuration runs no route script */
        for (size_t j = 0; j < r->norigins; j++)
            REQUIRE(r->origins[j]);
        for (size_t j = 0; j < i; j++)
            REQUIRE(strcmp(cfg->routes[j]->path, r->path) != 0);
    }
    if (cfg->redis) {
        REQUIRE(cfg->redis->host && cfg->redis->port >= 1 && cfg->redis->port <= 65535);
        for (size_t i = 0; i < cfg->redis->nchannels; i++)
            REQUIRE(chan_name_valid(cfg->redis->channels[i], strlen(cfg->redis->channels[i]), &why));
        REQUIRE(cfg->redis->reconnect_min <= cfg->redis->reconnect_max);
    }
    for (size_t i = 0; i < cfg->ntails; i++) {
        REQUIRE(cfg->tails[i].path && cfg->tails[i].channel);
        REQUIRE(chan_name_valid(cfg->tails[i].channel, strlen(cfg->tails[i].channel), &why));
    }
    if (cfg->tls)
        REQUIRE(cfg->tls->cert && cfg->tls->key && cfg->tls->port >= 1 && cfg->tls->port <= 65535);
    for (size_t i = 0; i < cfg->nhistory; i++)
        REQUIRE(cfg->history[i].prefix && cfg->history[i].length >= 1);
}

/* Every input makes a Lua state of its own, whose allocations come from many places: a small
 * quarantine and short allocation stacks keep AddressSanitizer's memory near 100 MB instead of
 * past a gigabyte. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "quarantine_size_mb=16:malloc_context_size=4"; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const struct config_env env = {.sandbox = 1, .instructions = 50000, .memory = 1 << 20};
    struct config cfg;
    char err[512];
    err[0] = 0;
    int rc = config_load_buffer("fuzz.lua", (const char *)data, size, &env, &cfg, err, sizeof(err));
    if (rc == 0) {
        check_accepted(&cfg);
    } else {
        REQUIRE(rc == -1);
        REQUIRE(strncmp(err, "fuzz.lua", 8) == 0 && strlen(err) > 9);
        for (const char *p = err; *p; p++)
            REQUIRE(*p != '\n' && *p != '\r');
    }
    config_free(&cfg);
    return 0;
}
