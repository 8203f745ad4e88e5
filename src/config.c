/* config.c - loading and checking the Lua configuration file. */
#include "config.h"

#include "buf.h"
#include "channel.h"
#include "route.h"
#include "script.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The loading state: errors unwind to config_load with longjmp, so each check is one line. */
struct loader {
    lua_State *L;
    const struct config_env *env;
    const char *file;
    char *err;
    size_t errlen;
    jmp_buf fail;
    int line;            /* line of the global being read, 0 when unknown */
    char where[128];     /* dotted name of the value being read, e.g. "listen.port" */
};

/* Registry key (its address) of the table of lines each global was assigned on. */
static const char LINES_KEY[] = "herald.config.lines";

/* The chunk's bounds: what its Lua state holds, and the instructions it has left. Reached from
 * the allocator and the count hook through the state's allocator data. */
struct vm {
    size_t mem, limit;
    size_t bound;        /* the limit while the chunk's own code may run */
    long long steps;
    long long budget;
    int killed;
};

#define HOOK_EVERY 1000

const struct config_env config_env_default = {
    .sandbox = 0, .instructions = 100000000LL, .memory = (size_t)64 << 20};

static void *vm_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct vm *vm = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        vm->mem -= old;
        return NULL;
    }
    if (nsize > old && vm->mem - old + nsize > vm->limit)
        return NULL;
    void *p = realloc(ptr, nsize);
    if (p)
        vm->mem = vm->mem - old + nsize;
    return p;
}

/* Stops a chunk that runs too long; once it has, every instruction fails, so a chunk catching the
 * error with pcall cannot go on. */
static void vm_hook(lua_State *L, lua_Debug *ar)
{
    void *ud;
    lua_getallocf(L, &ud);
    struct vm *vm = ud;
    vm->steps -= vm->killed ? 1 : HOOK_EVERY;
    if (vm->steps >= 0 && !vm->killed)
        return;
    if (!vm->killed) {
        vm->killed = 1;
        lua_sethook(L, vm_hook, LUA_MASKCOUNT, 1);
    }
    const char *msg = "the configuration ran more than %I Lua instructions (an endless loop?)";
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0) {
        lua_pushfstring(L, "%s:%d: ", ar->short_src, ar->currentline);
        lua_pushfstring(L, msg, (lua_Integer)vm->budget);
        lua_concat(L, 2);
    } else {
        lua_pushfstring(L, msg, (lua_Integer)vm->budget);
    }
    lua_error(L);
}

/* Push t[key] for the table at idx without metamethods: the chunk's tables may carry any
 * metatable, and the loader reads them outside a protected call. Returns the value's type. */
static int rawfield(lua_State *L, int idx, const char *key)
{
    idx = lua_absindex(L, idx);
    lua_pushstring(L, key);
    return lua_rawget(L, idx);
}

static void fail(struct loader *ld, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void fail(struct loader *ld, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (ld->line)
        snprintf(ld->err, ld->errlen, "%s:%d: %s: %s", ld->file, ld->line, ld->where, msg);
    else
        snprintf(ld->err, ld->errlen, "%s: %s: %s", ld->file, ld->where, msg);
    longjmp(ld->fail, 1);
}

/* __newindex on the chunk's globals: remember the line each global was assigned on, so a bad
 * value can be reported where it was written. */
static int record_line(lua_State *L)
{
    lua_Debug ar;
    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "l", &ar) && ar.currentline > 0) {
        lua_rawgetp(L, LUA_REGISTRYINDEX, LINES_KEY);
        lua_pushvalue(L, 2);
        lua_pushinteger(L, ar.currentline);
        lua_rawset(L, -3);
        lua_pop(L, 1);
    }
    lua_rawset(L, 1);
    return 0;
}

static const char *type_of(lua_State *L, int idx) { return luaL_typename(L, idx); }

/* Push global name; set ld->where and ld->line for messages. Returns its Lua type. */
static int get_global(struct loader *ld, const char *name)
{
    lua_State *L = ld->L;
    snprintf(ld->where, sizeof(ld->where), "%s", name);
    lua_rawgetp(L, LUA_REGISTRYINDEX, LINES_KEY);
    rawfield(L, -1, name);
    ld->line = (int)lua_tointeger(L, -1);
    lua_pop(L, 2);
    lua_pushglobaltable(L);
    int t = rawfield(L, -1, name);
    lua_remove(L, -2);
    return t;
}

/* Push field key of the table at the top; ld->where becomes parent.key. */
static int get_field(struct loader *ld, const char *parent, const char *key)
{
    snprintf(ld->where, sizeof(ld->where), "%s.%s", parent, key);
    return rawfield(ld->L, -1, key);
}

/* Reject keys of the table at the top that are not in allowed (NULL-terminated). */
static void check_keys(struct loader *ld, const char *name, const char *const *allowed)
{
    lua_State *L = ld->L;
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        lua_pop(L, 1);
        snprintf(ld->where, sizeof(ld->where), "%s", name);
        if (lua_type(L, -1) != LUA_TSTRING) {
            if (lua_type(L, -1) == LUA_TNUMBER && !allowed)
                continue;
            fail(ld, "unexpected %s key", type_of(L, -1));
        }
        const char *key = lua_tostring(L, -1);
        int ok = 0;
        for (const char *const *a = allowed; a && *a; a++)
            ok |= strcmp(*a, key) == 0;
        if (!ok)
            fail(ld, "unknown key \"%s\"", key);
    }
}

/* The string at the top of the stack, popped. It stays valid while its table is on the stack,
 * so nothing is allocated until a value is stored, and a failure leaks nothing. */
static const char *pop_string(struct loader *ld, int required)
{
    lua_State *L = ld->L;
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        if (required)
            fail(ld, "missing (a string is required)");
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING)
        fail(ld, "expected a string, got %s", type_of(L, -1));
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    if (strlen(s) != len)
        fail(ld, "must not contain NUL bytes");
    lua_pop(L, 1);
    return s;
}

static char *dup_or_null(const char *s) { return s ? xstrdup(s) : NULL; }

static double pop_number(struct loader *ld, double dflt, double min, double max, int integer)
{
    lua_State *L = ld->L;
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return dflt;
    }
    if (lua_type(L, -1) != LUA_TNUMBER)
        fail(ld, "expected a number, got %s", type_of(L, -1));
    double v = lua_tonumber(L, -1);
    if (integer && (!lua_isinteger(L, -1) && v != floor(v)))
        fail(ld, "expected a whole number, got %g", v);
    if (!(v >= min && v <= max))
        fail(ld, "%g is out of range (%g to %g)", v, min, max);
    lua_pop(L, 1);
    return v;
}

static int pop_bool(struct loader *ld, int dflt)
{
    lua_State *L = ld->L;
    int t = lua_type(L, -1);
    int v = dflt;
    if (t == LUA_TBOOLEAN)
        v = lua_toboolean(L, -1);
    else if (t != LUA_TNIL)
        fail(ld, "expected true or false, got %s", type_of(L, -1));
    lua_pop(L, 1);
    return v;
}

/* A path from the file made relative to the file's directory, in new memory (NULL for NULL). */
static char *resolve(const struct config *cfg, const char *p)
{
    if (!p || p[0] == '/' || !cfg->dir[0])
        return dup_or_null(p);
    size_t n = strlen(cfg->dir) + strlen(p) + 2;
    char *out = xmalloc(n);
    snprintf(out, n, "%s/%s", cfg->dir, p);
    return out;
}

static void need_table(struct loader *ld)
{
    if (lua_type(ld->L, -1) != LUA_TTABLE)
        fail(ld, "expected a table, got %s", type_of(ld->L, -1));
}

/* Read the array of strings at the top of the stack (popped) into *list and *n. */
static void pop_string_list(struct loader *ld, char ***list, size_t *n, int channel_names)
{
    lua_State *L = ld->L;
    *n = 0;
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    need_table(ld);
    char where[96];
    snprintf(where, sizeof(where), "%.95s", ld->where);
    size_t count = lua_rawlen(L, -1);
    *list = xcalloc(count + 1, sizeof(**list));
    for (size_t i = 0; i < count; i++) {
        lua_rawgeti(L, -1, (lua_Integer)i + 1);
        snprintf(ld->where, sizeof(ld->where), "%s[%zu]", where, i + 1);
        const char *item = pop_string(ld, 1);
        const char *why;
        if (channel_names && !chan_name_valid(item, strlen(item), &why))
            fail(ld, "\"%s\": %s", item, why);
        (*list)[(*n)++] = xstrdup(item);
    }
    lua_pop(L, 1);
}

static void load_listen(struct loader *ld, struct config *cfg)
{
    static const char *const keys[] = {"host", "port", NULL};
    if (get_global(ld, "listen") == LUA_TNIL) {
        lua_pop(ld->L, 1);
        return;
    }
    need_table(ld);
    check_keys(ld, "listen", keys);
    get_field(ld, "listen", "host");
    const char *host = pop_string(ld, 0);
    if (host) {
        free(cfg->host);
        cfg->host = xstrdup(host);
    }
    get_field(ld, "listen", "port");
    cfg->port = (int)pop_number(ld, cfg->port, 1, 65535, 1);
    lua_pop(ld->L, 1);
}

static void load_limits(struct loader *ld, struct config *cfg)
{
    static const char *const keys[] = {"max_message", "send_queue", "max_connections",
                                       "max_connections_per_ip", "max_subscriptions", "message_rate",
                                       "max_head",
                                       "max_headers", "ping_interval", "http_timeout", "close_timeout",
                                       "channel_ttl", NULL};
    if (get_global(ld, "limits") == LUA_TNIL) {
        lua_pop(ld->L, 1);
        return;
    }
    need_table(ld);
    check_keys(ld, "limits", keys);
    get_field(ld, "limits", "max_message");
    cfg->max_message = (size_t)pop_number(ld, (double)cfg->max_message, 16, 1 << 30, 1);
    get_field(ld, "limits", "send_queue");
    cfg->send_queue = (size_t)pop_number(ld, (double)cfg->send_queue, 1024, 1u << 31, 1);
    get_field(ld, "limits", "max_connections");
    cfg->max_connections = (size_t)pop_number(ld, (double)cfg->max_connections, 1, 10000000, 1);
    get_field(ld, "limits", "max_connections_per_ip");
    cfg->max_connections_per_ip = (size_t)pop_number(ld, (double)cfg->max_connections_per_ip, 1, 10000000, 1);
    get_field(ld, "limits", "max_subscriptions");
    cfg->max_subscriptions = (size_t)pop_number(ld, (double)cfg->max_subscriptions, 1, 10000000, 1);
    get_field(ld, "limits", "message_rate");
    cfg->message_rate = (size_t)pop_number(ld, (double)cfg->message_rate, 1, 100000000, 1);
    get_field(ld, "limits", "max_head");
    cfg->max_head = (size_t)pop_number(ld, (double)cfg->max_head, 1024, 65536, 1);
    get_field(ld, "limits", "max_headers");
    cfg->max_headers = (size_t)pop_number(ld, (double)cfg->max_headers, 1, 64, 1);
    get_field(ld, "limits", "ping_interval");
    cfg->ping_interval = pop_number(ld, cfg->ping_interval, 0.1, 86400, 0);
    get_field(ld, "limits", "http_timeout");
    cfg->http_timeout = pop_number(ld, cfg->http_timeout, 0.1, 86400, 0);
    get_field(ld, "limits", "close_timeout");
    cfg->close_timeout = pop_number(ld, cfg->close_timeout, 0.1, 3600, 0);
    get_field(ld, "limits", "channel_ttl");
    cfg->channel_ttl = pop_number(ld, cfg->channel_ttl, 0, 86400 * 365, 0);
    lua_pop(ld->L, 1);
}

/* A route's deflate setting at the top of the stack (popped): true or false, or a table
 * { min_size = ..., level = ... }, which turns permessage-deflate on with those settings. */
static void pop_deflate(struct loader *ld, const char *route, struct route *r)
{
    static const char *const keys[] = {"min_size", "level", NULL};
    lua_State *L = ld->L;
    int t = lua_type(L, -1);
    if (t == LUA_TNIL || t == LUA_TBOOLEAN) {
        r->deflate = lua_toboolean(L, -1);
        lua_pop(L, 1);
        return;
    }
    if (t != LUA_TTABLE)
        fail(ld, "expected true, false or a table { min_size = ..., level = ... }, got %s", type_of(L, -1));
    char where[64];
    snprintf(where, sizeof(where), "%s.deflate", route);
    check_keys(ld, where, keys);
    r->deflate = 1;
    get_field(ld, where, "min_size");
    r->deflate_min_size = (size_t)pop_number(ld, (double)r->deflate_min_size, 0, 1 << 30, 1);
    get_field(ld, where, "level");
    r->deflate_level = (int)pop_number(ld, r->deflate_level, 1, 9, 1);
    lua_pop(L, 1);
}

static void load_routes(struct loader *ld, struct config *cfg)
{
    static const char *const keys[] = {"path", "kind", "script", "publish", "origins", "auth",
                                       "authorize", "deflate", NULL};
    lua_State *L = ld->L;
    if (get_global(ld, "routes") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    need_table(ld);
    check_keys(ld, "routes", NULL);
    size_t n = lua_rawlen(L, -1);
    cfg->routes = xcalloc(n + 1, sizeof(*cfg->routes));
    for (size_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof(name), "routes[%zu]", i + 1);
        lua_rawgeti(L, -1, (lua_Integer)i + 1);
        snprintf(ld->where, sizeof(ld->where), "%s", name);
        need_table(ld);
        check_keys(ld, name, keys);
        get_field(ld, name, "path");
        const char *path = pop_string(ld, 1);
        get_field(ld, name, "kind");
        const char *kind = pop_string(ld, 0);
        get_field(ld, name, "script");
        const char *script = pop_string(ld, 0);
        get_field(ld, name, "publish");
        int publish = pop_bool(ld, 0);
        get_field(ld, name, "authorize");
        const char *authorize = pop_string(ld, 0);
        get_field(ld, name, "auth");
        const char *auth = pop_string(ld, 0);
        if (auth && strcmp(auth, "token") != 0)
            fail(ld, "unknown auth \"%s\" (expected \"token\")", auth);
        snprintf(ld->where, sizeof(ld->where), "%s", name);
        enum route_kind k;
        if (script && kind && strcmp(kind, "script") != 0)
            fail(ld, "give either kind or script, not both");
        if (script)
            k = ROUTE_SCRIPT;
        else if (!kind)
            fail(ld, "needs kind = \"pubsub\", \"raw\" or \"echo\", or script = \"file.lua\"");
        else if (strcmp(kind, "pubsub") == 0)
            k = ROUTE_PUBSUB;
        else if (strcmp(kind, "raw") == 0)
            k = ROUTE_RAW;
        else if (strcmp(kind, "echo") == 0)
            k = ROUTE_ECHO;
        else if (strcmp(kind, "sse") == 0)
            k = ROUTE_SSE;
        else
            fail(ld, "unknown kind \"%s\" (expected pubsub, raw, echo or sse)", kind);
        if (path[0] != '/')
            fail(ld, "path \"%s\" must start with /", path);
        struct route *r = route_new(k, path);
        cfg->routes[cfg->nroutes++] = r;
        r->publish = publish;
        r->require_token = auth != NULL;
        if (auth && !cfg->jwt_secret)
            fail(ld, "auth = \"token\" needs jwt_secret to be set");
        get_field(ld, name, "origins");
        pop_string_list(ld, &r->origins, &r->norigins, 0);
        get_field(ld, name, "deflate");
        pop_deflate(ld, name, r);
        snprintf(ld->where, sizeof(ld->where), "%s", name);
        if (k == ROUTE_SSE && r->deflate)
            fail(ld, "deflate is for WebSocket routes (an event stream is not sent in messages)");
        if (k == ROUTE_SSE && !r->prefix)
            fail(ld, "an sse route's path must end in / (/sse/<channel>, or /sse/?channels=a,b)");
        if (k == ROUTE_RAW && !r->prefix)
            fail(ld, "a raw route's path must end in / (the rest of the path names the channel)");
        if (authorize && k == ROUTE_SCRIPT)
            fail(ld, "a script route's authorize hook is in its script (drop authorize =)");
        if (authorize && k == ROUTE_ECHO)
            fail(ld, "an echo route has no channels to authorize");
        if (k == ROUTE_SCRIPT || authorize) {
            /* A built-in route's authorize script runs like a script route's, in a state of its own. */
            r->script = resolve(cfg, script ? script : authorize);
            struct stat st;
            if (stat(r->script, &st) < 0)
                fail(ld, "%s %s: %s", script ? "script" : "authorize", r->script, strerror(errno));
        }
        for (size_t j = 0; j + 1 < cfg->nroutes; j++)
            if (strcmp(cfg->routes[j]->path, r->path) == 0)
                fail(ld, "path %s is already used by routes[%zu]", r->path, j + 1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static void load_redis(struct loader *ld, struct config *cfg)
{
    static const char *const keys[] = {"host", "port", "socket", "password", "db", "channels",
                                       "patterns", "mirror", "reconnect_min", "reconnect_max",
                                       "connect_timeout", "presence_ttl", NULL};
    if (get_global(ld, "redis") == LUA_TNIL) {
        lua_pop(ld->L, 1);
        return;
    }
    need_table(ld);
    check_keys(ld, "redis", keys);
    struct config_redis *r = cfg->redis = xcalloc(1, sizeof(*r));
    get_field(ld, "redis", "host");
    const char *host = pop_string(ld, 0);
    r->host = xstrdup(host ? host : "127.0.0.1");
    get_field(ld, "redis", "port");
    r->port = (int)pop_number(ld, 6379, 1, 65535, 1);
    get_field(ld, "redis", "socket");
    r->socket = resolve(cfg, pop_string(ld, 0));
    get_field(ld, "redis", "password");
    r->password = dup_or_null(pop_string(ld, 0));
    get_field(ld, "redis", "db");
    r->db = (int)pop_number(ld, 0, 0, 1 << 20, 1);
    get_field(ld, "redis", "channels");
    pop_string_list(ld, &r->channels, &r->nchannels, 1);
    get_field(ld, "redis", "patterns");
    pop_string_list(ld, &r->patterns, &r->npatterns, 0);
    get_field(ld, "redis", "mirror");
    r->mirror = pop_bool(ld, 0);
    get_field(ld, "redis", "reconnect_min");
    r->reconnect_min = pop_number(ld, 0.1, 0.01, 3600, 0);
    get_field(ld, "redis", "reconnect_max");
    r->reconnect_max = pop_number(ld, 2, 0.01, 3600, 0);
    if (r->reconnect_max < r->reconnect_min)
        fail(ld, "must not be less than reconnect_min (%g)", r->reconnect_min);
    get_field(ld, "redis", "connect_timeout");
    r->connect_timeout = pop_number(ld, 5, 0.1, 3600, 0);
    get_field(ld, "redis", "presence_ttl");
    r->presence_ttl = pop_number(ld, 15, 0.3, 3600, 0);
    lua_pop(ld->L, 1);
}

static void load_tail(struct loader *ld, struct config *cfg)
{
    static const char *const keys[] = {"path", "channel", "from_start", "poll", NULL};
    lua_State *L = ld->L;
    if (get_global(ld, "tail") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    need_table(ld);
    check_keys(ld, "tail", NULL);
    size_t n = lua_rawlen(L, -1);
    cfg->tails = xcalloc(n + 1, sizeof(*cfg->tails));
    for (size_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof(name), "tail[%zu]", i + 1);
        lua_rawgeti(L, -1, (lua_Integer)i + 1);
        snprintf(ld->where, sizeof(ld->where), "%s", name);
        need_table(ld);
        check_keys(ld, name, keys);
        struct config_tail *t = &cfg->tails[cfg->ntails++];
        get_field(ld, name, "path");
        t->path = resolve(cfg, pop_string(ld, 1));
        get_field(ld, name, "channel");
        const char *channel = pop_string(ld, 1);
        const char *why;
        if (!chan_name_valid(channel, strlen(channel), &why))
            fail(ld, "\"%s\": %s", channel, why);
        t->channel = xstrdup(channel);
        get_field(ld, name, "from_start");
        t->from_start = pop_bool(ld, 0);
        get_field(ld, name, "poll");
        t->poll = pop_number(ld, 1, 0.05, 3600, 0);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static void load_tls(struct loader *ld, struct config *cfg)
{
    static const char *const keys[] = {"port", "cert", "key", "sni", NULL};
    static const char *const cert_keys[] = {"cert", "key", NULL};
    if (get_global(ld, "tls") == LUA_TNIL) {
        lua_pop(ld->L, 1);
        return;
    }
    need_table(ld);
    check_keys(ld, "tls", keys);
    struct config_tls *t = cfg->tls = xcalloc(1, sizeof(*t));
    get_field(ld, "tls", "port");
    t->port = (int)pop_number(ld, 8443, 1, 65535, 1);
    get_field(ld, "tls", "cert");
    t->cert = resolve(cfg, pop_string(ld, 1));
    get_field(ld, "tls", "key");
    t->key = resolve(cfg, pop_string(ld, 1));
    if (get_field(ld, "tls", "sni") != LUA_TNIL) {
        need_table(ld);
        check_keys(ld, "tls.sni", NULL);
        size_t n = lua_rawlen(ld->L, -1);
        t->sni = xcalloc(n + 1, sizeof(*t->sni));
        for (size_t i = 0; i < n; i++) {
            char name[32];
            snprintf(name, sizeof(name), "tls.sni[%zu]", i + 1);
            lua_rawgeti(ld->L, -1, (lua_Integer)i + 1);
            snprintf(ld->where, sizeof(ld->where), "%s", name);
            need_table(ld);
            check_keys(ld, name, cert_keys);
            struct config_tls_cert *c = &t->sni[t->nsni++];
            get_field(ld, name, "cert");
            c->cert = resolve(cfg, pop_string(ld, 1));
            get_field(ld, name, "key");
            c->key = resolve(cfg, pop_string(ld, 1));
            lua_pop(ld->L, 1);
        }
    }
    lua_pop(ld->L, 1);
    lua_pop(ld->L, 1);
}

static void load_history(struct loader *ld, struct config *cfg)
{
    static const char *const keys[] = {"prefix", "length", "age", NULL};
    lua_State *L = ld->L;
    if (get_global(ld, "history") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    need_table(ld);
    check_keys(ld, "history", NULL);
    size_t n = lua_rawlen(L, -1);
    cfg->history = xcalloc(n + 1, sizeof(*cfg->history));
    for (size_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof(name), "history[%zu]", i + 1);
        lua_rawgeti(L, -1, (lua_Integer)i + 1);
        snprintf(ld->where, sizeof(ld->where), "%s", name);
        need_table(ld);
        check_keys(ld, name, keys);
        struct config_history *h = &cfg->history[cfg->nhistory++];
        get_field(ld, name, "prefix");
        h->prefix = xstrdup(pop_string(ld, 1));
        get_field(ld, name, "length");
        h->length = (size_t)pop_number(ld, 100, 1, 1000000, 1);
        get_field(ld, name, "age");
        h->age = pop_number(ld, 3600, 0, 86400 * 365, 0);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* Globals a configuration may set; anything else is most likely a typo. */
static const char *const known_globals[] = {
    "listen", "web_root", "access_log", "publish_token", "limits", "routes", "redis", "tail", "tls",
    "history", "log_level", "jwt_secret", NULL};

static void check_globals(struct loader *ld)
{
    lua_State *L = ld->L;
    lua_rawgetp(L, LUA_REGISTRYINDEX, LINES_KEY);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            continue;
        const char *name = lua_tostring(L, -1);
        int known = 0;
        for (const char *const *k = known_globals; *k; k++)
            known |= strcmp(*k, name) == 0;
        lua_pushglobaltable(L);
        int is_function = rawfield(L, -1, name) == LUA_TFUNCTION;
        lua_pop(L, 2);
        if (!known && !is_function) { /* helper functions are fine */
            get_global(ld, name);
            fail(ld, "unknown setting (known: listen, web_root, access_log, publish_token, jwt_secret, "
                     "limits, routes, redis, tail, tls, history, log_level)");
        }
    }
    lua_pop(L, 1);
}

static void load_all(struct loader *ld, struct config *cfg)
{
    lua_State *L = ld->L;
    check_globals(ld);
    load_listen(ld, cfg);
    get_global(ld, "web_root");
    cfg->web_root = resolve(cfg, pop_string(ld, 0));
    if (cfg->web_root) {
        struct stat st;
        if (stat(cfg->web_root, &st) < 0 || !S_ISDIR(st.st_mode))
            fail(ld, "%s is not a directory", cfg->web_root);
    }
    get_global(ld, "access_log");
    cfg->access_log = resolve(cfg, pop_string(ld, 0));
    get_global(ld, "publish_token");
    cfg->publish_token = dup_or_null(pop_string(ld, 0));
    get_global(ld, "jwt_secret");
    cfg->jwt_secret = dup_or_null(pop_string(ld, 0));
    if (cfg->jwt_secret && strlen(cfg->jwt_secret) < 16)
        fail(ld, "must be at least 16 bytes long");
    if (cfg->publish_token && !cfg->publish_token[0])
        fail(ld, "must not be empty (use nil for no token)");
    get_global(ld, "log_level");
    cfg->log_level = dup_or_null(pop_string(ld, 0));
    if (cfg->log_level && strcmp(cfg->log_level, "debug") && strcmp(cfg->log_level, "info") &&
        strcmp(cfg->log_level, "warn") && strcmp(cfg->log_level, "error"))
        fail(ld, "expected \"debug\", \"info\", \"warn\" or \"error\"");
    load_limits(ld, cfg);
    load_routes(ld, cfg);
    load_redis(ld, cfg);
    load_tail(ld, cfg);
    load_tls(ld, cfg);
    load_history(ld, cfg);
    (void)L;
}

static void set_defaults(struct config *cfg, const char *file)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->file = xstrdup(file);
    const char *slash = strrchr(file, '/');
    cfg->dir = slash ? xstrndup(file, (size_t)(slash - file) + (slash == file)) : xstrdup("");
    cfg->host = xstrdup("127.0.0.1");
    cfg->port = 8080;
    cfg->max_message = 1048576;
    cfg->send_queue = 4194304;
    cfg->max_connections = 100000;
    cfg->max_connections_per_ip = 1000;
    cfg->max_subscriptions = 1000;
    cfg->message_rate = 1000;
    cfg->max_head = 16384;
    cfg->max_headers = 64;
    cfg->ping_interval = 30;
    cfg->http_timeout = 15;
    cfg->close_timeout = 5;
    cfg->channel_ttl = 300;
}

/* Lua cuts chunk names to 60 characters in its messages, so the file is loaded under a short
 * name that is then replaced with the full path. */
#define CHUNK_NAME "CONFIG"

static void lua_message(const char *file, const char *msg, char *err, size_t errlen)
{
    if (!msg)
        msg = "error";
    if (strncmp(msg, CHUNK_NAME ":", sizeof(CHUNK_NAME)) == 0)
        snprintf(err, errlen, "%s:%s", file, msg + sizeof(CHUNK_NAME));
    else
        snprintf(err, errlen, "%s: %s", file, msg);
}

/* The whole file in new memory (NUL-terminated), or NULL with errno set. */
static char *read_file(const char *file, size_t *len)
{
    FILE *f = fopen(file, "rb");
    if (!f)
        return NULL;
    struct buf b = {0};
    size_t n;
    do {
        char *p = buf_reserve(&b, 65536);
        n = fread(p, 1, 65536, f);
        b.len += n;
    } while (n > 0);
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        buf_free(&b);
        errno = EIO;
        return NULL;
    }
    buf_append(&b, "", 1);
    *len = b.len - 1;
    return b.data;
}

/* The libraries a sandboxed chunk may use. */
static void open_sandboxed(lua_State *L)
{
    static const luaL_Reg libs[] = {{LUA_GNAME, luaopen_base},         {LUA_TABLIBNAME, luaopen_table},
                                    {LUA_STRLIBNAME, luaopen_string},  {LUA_MATHLIBNAME, luaopen_math},
                                    {LUA_UTF8LIBNAME, luaopen_utf8},   {LUA_COLIBNAME, luaopen_coroutine},
                                    {LUA_OSLIBNAME, luaopen_os},       {NULL, NULL}};
    for (const luaL_Reg *lib = libs; lib->name; lib++) {
        luaL_requiref(L, lib->name, lib->func, 1);
        lua_pop(L, 1);
    }
    /* Nothing that reaches files, processes or the locale; no loading of (binary) chunks; and no
     * pattern matching, whose backtracking runs in C where the instruction bound does not see it. */
    static const char *const removed[][2] = {
        {LUA_GNAME, "dofile"},     {LUA_GNAME, "loadfile"},   {LUA_GNAME, "load"},
        {LUA_GNAME, "print"},      {LUA_OSLIBNAME, "execute"}, {LUA_OSLIBNAME, "exit"},
        {LUA_OSLIBNAME, "remove"}, {LUA_OSLIBNAME, "rename"}, {LUA_OSLIBNAME, "tmpname"},
        {LUA_OSLIBNAME, "setlocale"}, {LUA_STRLIBNAME, "find"}, {LUA_STRLIBNAME, "match"},
        {LUA_STRLIBNAME, "gmatch"}, {LUA_STRLIBNAME, "gsub"}};
    for (size_t i = 0; i < sizeof(removed) / sizeof(removed[0]); i++) {
        if (strcmp(removed[i][0], LUA_GNAME) == 0)
            lua_pushglobaltable(L);
        else
            lua_getglobal(L, removed[i][0]);
        lua_pushnil(L);
        lua_setfield(L, -2, removed[i][1]);
        lua_pop(L, 1);
    }
}

/* Open the libraries the chunk may use (called protected: it allocates), with setmetatable
 * refusing finalizers, which would run where the instruction bound does not reach (and all of
 * them when the state is closed). */
static int open_libs(lua_State *L)
{
    const struct config_env *env = lua_touserdata(L, 1);
    if (env->sandbox)
        open_sandboxed(L);
    else
        luaL_openlibs(L);
    script_guard_setmetatable(L, "in the configuration");
    return 0;
}

static int one_line(char *err);

/* Read the chunk's globals into cfg: 0, or -1 with the message in ld->err. */
static int read_values(struct loader *ld, struct config *cfg)
{
    if (setjmp(ld->fail))
        return -1;
    load_all(ld, cfg);
    return 0;
}

/* Close the chunk's state with its memory bound back in place: its finalizers run now. */
static void close_state(lua_State *L, struct vm *vm)
{
    vm->limit = vm->bound;
    lua_close(L);
    free(vm);
}

/* Report the failure of the chunk (or of opening the libraries). */
static void chunk_failed(lua_State *L, int rc, const char *file, const struct config_env *env,
                         char *err, size_t errlen)
{
    if (rc == LUA_ERRMEM)
        snprintf(err, errlen, "%s: the configuration needs more than %zu bytes of memory", file,
                 env->memory);
    else
        lua_message(file, lua_isstring(L, -1) ? lua_tostring(L, -1) : NULL, err, errlen);
}

int config_load_buffer(const char *file, const char *text, size_t len, const struct config_env *env,
                       struct config *cfg, char *err, size_t errlen)
{
    set_defaults(cfg, file);
    /* On the heap: the allocator changes it between setjmp and a failure's longjmp. */
    struct vm *vm = xcalloc(1, sizeof(*vm));
    vm->limit = vm->bound = env->memory;
    vm->steps = vm->budget = env->instructions;
    struct loader ld = {.file = file, .env = env, .err = err, .errlen = errlen};
    lua_State *L = ld.L = lua_newstate(vm_alloc, vm);
    if (!L) {
        free(vm);
        snprintf(err, errlen, "%s: out of memory", file);
        return -1;
    }
    lua_sethook(L, vm_hook, LUA_MASKCOUNT, HOOK_EVERY);
    lua_pushcfunction(L, open_libs);
    lua_pushlightuserdata(L, (void *)env);
    int rc = lua_pcall(L, 1, 0, 0);
    if (rc == LUA_OK) {
        lua_newtable(L);
        lua_rawsetp(L, LUA_REGISTRYINDEX, LINES_KEY);
        rc = luaL_loadbufferx(L, text, len, "=" CHUNK_NAME, "t");
    }
    if (rc == LUA_OK) {
        lua_pushglobaltable(L);
        lua_newtable(L);
        lua_pushcfunction(L, record_line);
        lua_setfield(L, -2, "__newindex");
        lua_setmetatable(L, -2);
        lua_pop(L, 1);
        rc = lua_pcall(L, 0, 0, 0);
    }
    /* From here on the loader reads the chunk's values outside protected calls, where an error
     * would abort: no collection (so no finalizer runs) and no memory bound for the few strings
     * it pushes. The bound is back before the state is closed and finalizers run. */
    lua_gc(L, LUA_GCSTOP);
    vm->limit = (size_t)-1;
    if (rc != LUA_OK) {
        chunk_failed(L, rc, file, env, err, errlen);
        close_state(L, vm);
        return one_line(err);
    }
    lua_pushglobaltable(L);
    lua_pushnil(L);
    lua_setmetatable(L, -2);
    lua_pop(L, 1);
    int failed = read_values(&ld, cfg);
    close_state(L, vm);
    return failed ? one_line(err) : 0;
}

/* Messages are one line whatever the chunk put in its strings. */
static int one_line(char *err)
{
    for (char *p = err; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = ' ';
    return -1;
}

int config_load(const char *file, struct config *cfg, char *err, size_t errlen)
{
    size_t len;
    char *text = read_file(file, &len);
    if (!text) {
        set_defaults(cfg, file);
        snprintf(err, errlen, "cannot read configuration %s: %s", file, strerror(errno));
        return -1;
    }
    int rc = config_load_buffer(file, text, len, &config_env_default, cfg, err, errlen);
    free(text);
    return rc;
}

void config_free(struct config *cfg)
{
    free(cfg->file);
    free(cfg->dir);
    free(cfg->host);
    free(cfg->web_root);
    free(cfg->access_log);
    free(cfg->publish_token);
    free(cfg->jwt_secret);
    free(cfg->log_level);
    for (size_t i = 0; i < cfg->nroutes; i++)
        route_unref(cfg->routes[i]);
    free(cfg->routes);
    if (cfg->redis) {
        struct config_redis *r = cfg->redis;
        free(r->host);
        free(r->socket);
        free(r->password);
        for (size_t i = 0; i < r->nchannels; i++)
            free(r->channels[i]);
        free(r->channels);
        for (size_t i = 0; i < r->npatterns; i++)
            free(r->patterns[i]);
        free(r->patterns);
        free(r);
    }
    for (size_t i = 0; i < cfg->ntails; i++) {
        free(cfg->tails[i].path);
        free(cfg->tails[i].channel);
    }
    free(cfg->tails);
    if (cfg->tls) {
        free(cfg->tls->cert);
        free(cfg->tls->key);
        for (size_t i = 0; i < cfg->tls->nsni; i++) {
            free(cfg->tls->sni[i].cert);
            free(cfg->tls->sni[i].key);
        }
        free(cfg->tls->sni);
        free(cfg->tls);
    }
    for (size_t i = 0; i < cfg->nhistory; i++)
        free(cfg->history[i].prefix);
    free(cfg->history);
    memset(cfg, 0, sizeof(*cfg));
}
