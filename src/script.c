/* script.c - Lua 5.4 routes.
 *
 * Each script route owns one lua_State, created with an allocator that bounds its memory and a
 * count hook that bounds the work of each call. The route's script runs in it and returns a table
 * of hooks; their functions are kept in the registry. A reload runs the script again in the same
 * state and swaps the hooks only when the new version loads cleanly, so client objects (and
 * client.data) live on across reloads.
 *
 * Every entry from C into Lua goes through run(): a protected call of a small C trampoline that
 * pushes the arguments (an allocation can fail there too), calls the hook and reads its results,
 * under a message handler that adds file:line to the error. A script's error, a runaway loop or an
 * allocation over the bound fails that one call: it is logged, counted, and the broker goes on.
 *
 * A client object is a full userdata pointing at its connection; the pointer is cleared when the
 * connection goes, after which its methods do nothing and return nil, "closed". Timers are
 * userdata holding an ev_timer on the loop; an active timer is kept alive by a registry
 * reference. */
#include "script.h"

#include "auth.h"
#include "buf.h"
#include "channel.h"
#include "conn.h"
#include "http.h"
#include "log.h"
#include "json.h"
#include "pattern.h"
#include "route.h"
#include "stats.h"
#include "ws.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int luaopen_cjson(lua_State *L);

/* Limits of every script route's state. */
#define SCRIPT_MEMORY_LIMIT ((size_t)64 << 20)
#define SCRIPT_INSTRUCTION_LIMIT 100000000LL /* per call from the broker, nested calls included */
#define HOOK_EVERY 1000                      /* instructions between two runs of the count hook */
#define JSON_DEPTH 128

#define CLIENT_MT "herald.client"
#define TIMER_MT "herald.timer"

/* What a call into Lua runs: a hook of the script's table, a timer's function, herald.publish's
 * done function told the seq Redis gave, or the script itself (load). */
enum hook {
    HOOK_OPEN, HOOK_MESSAGE, HOOK_DELIVER, HOOK_CLOSE, HOOK_AUTHORIZE, HOOK_TIMER, HOOK_DONE,
    HOOK_LOAD, HOOK_KINDS
};
#define SCRIPT_HOOKS 5 /* open .. authorize: the functions a script's table may hold */
static const char *const hook_names[HOOK_KINDS] = {"open", "message", "deliver", "close", "authorize",
                                                   "timer", "done", "load"};
/* The hooks a built-in route's authorize script may have: the route's kind does the rest. */
#define ACCESS_HOOKS ((1u << HOOK_OPEN) | (1u << HOOK_CLOSE) | (1u << HOOK_AUTHORIZE))

struct ltimer;
struct lpub;

/* A script route's Lua state and its figures. */
struct lstate {
    lua_State *L;
    struct route *route;     /* not a reference: the route frees its state (script_unload) */
    struct lstate *next;     /* all states, for /stats */
    lua_State *running;      /* the thread that called into C code which may call a hook again */
    struct ltimer *timers;   /* active timers */
    struct lpub *pubs;       /* publishes waiting for their seq from Redis */
    int fn[SCRIPT_HOOKS];    /* registry references of the hooks, LUA_NOREF when absent */
    int clients_ref;         /* registry: id -> client object, for the open connections */
    int result_ref;          /* registry slot keeping deliver's last result alive */
    int encode_ref, decode_ref; /* lua-cjson's functions */
    int loaded;              /* a load succeeded: the hooks are in place */
    int loading;             /* the script's main chunk is running */
    int in_deliver;          /* deliver is running: no publishing, no client methods */
    int in_authorize;        /* authorize is running: the same */
    int killed;              /* this call ran out of instructions */
    int mem_failed;          /* this call hit the memory limit in the count hook */
    unsigned depth;          /* nesting of run() */
    uint32_t generation;     /* bumped by each load; timers started at load time carry it */
    long long steps;         /* instructions left for this call */
    size_t mem, mem_peak, mem_limit, mem_soft;
    uint64_t clients, timers_active;
    uint64_t calls[HOOK_KINDS];
    uint64_t errors, runaway, memory_errors, load_errors, reloads, dropped, authorize_refused;
    char last_error[512];
    double log_second;       /* the second the error log lines below were counted in */
    uint32_t logged, unlogged; /* error lines logged in it, and errors not logged since the last */
};

/* Something a script did to a client while open() ran, before the 101 was queued. */
enum pending_op { PENDING_SEND, PENDING_SUBSCRIBE, PENDING_UNSUBSCRIBE, PENDING_CLOSE,
                  PENDING_PSUBSCRIBE, PENDING_PUNSUBSCRIBE };
struct pending {
    struct pending *next;
    uint8_t op;
    uint8_t opcode;
    uint16_t code;
    int8_t member, events; /* a subscription's presence options (-1: not given) */
    size_t len;
    size_t info_len;       /* a subscription's presence info follows data's NUL */
    char data[]; /* NUL-terminated */
};

/* The options table of client:subscribe(channel, opts). */
struct sub_opts {
    int member, events; /* -1: not given */
    const char *info;
    size_t info_len;
};

struct lclient {
    struct conn *c;    /* NULL once the connection is gone (or was refused) */
    uint64_t id;
    int opening;       /* the handshake is not answered yet: actions are kept in pending */
    int builtin;       /* a built-in route's client (its authorize script): no methods */
    struct pending *pending, **pending_tail;
    char addr[48];
};

struct ltimer {
    ev_timer w;
    struct lstate *st;
    struct ltimer *prev, *next; /* on st->timers while active */
    int fn_ref, self_ref;
    uint32_t generation;
    uint8_t repeat, at_load, active;
};

static struct ev_loop *loop;
static struct lstate *states;
static char refuse_reason[256];
static char authorize_reason[256];
static struct buf stats_scratch;

static struct lstate *state_of(lua_State *L) { return *(struct lstate **)lua_getextraspace(L); }
static lua_State *current(struct lstate *st) { return st->running ? st->running : st->L; }

void script_init(struct ev_loop *l) { loop = l; }

/* --- memory, work and errors ------------------------------------------------------------------ */

/* The state's allocator: growth past the limit fails, so Lua raises "not enough memory" in the
 * call that asked (after an emergency collection). Shrinking and freeing always succeed. */
static void *l_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct lstate *st = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        st->mem -= old;
        return NULL;
    }
    if (nsize > old && st->mem - old + nsize > st->mem_limit)
        return NULL;
    void *p = realloc(ptr, nsize);
    if (!p)
        return NULL;
    st->mem = st->mem - old + nsize;
    if (st->mem > st->mem_peak)
        st->mem_peak = st->mem;
    return p;
}

static int raise_at(lua_State *L, lua_Debug *ar, const char *msg)
{
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
        lua_pushfstring(L, "%s:%d: %s", ar->short_src, ar->currentline, msg);
    else
        lua_pushstring(L, msg);
    return lua_error(L);
}

/* Runs every HOOK_EVERY instructions: stops a call that used up its instructions (and, from then
 * on, at every instruction, so a script catching the error cannot go on), and fails a call once
 * the state is near its memory limit even after a full collection. Raising here rather than in
 * the allocator gives the error a file and line. */
static void count_hook(lua_State *L, lua_Debug *ar)
{
    struct lstate *st = state_of(L);
    st->steps -= st->killed ? 1 : HOOK_EVERY;
    if (st->steps < 0 || st->killed) {
        if (!st->killed) {
            st->killed = 1;
            st->runaway++;
            lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
        }
        raise_at(L, ar, "script stopped: more than 100000000 instructions in one call (an endless loop?)");
    }
    if (st->mem > st->mem_soft) {
        lua_gc(L, LUA_GCCOLLECT, 0);
        if (st->mem > st->mem_soft) {
            st->mem_failed = 1;
            raise_at(L, ar, "memory limit reached: the script's state may use 64 MiB");
        }
    }
}

/* Message handler of every protected call: makes the error a string that starts with the file
 * and line of the innermost Lua function, unless it already does. */
static int msgh(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (!msg) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            msg = lua_tostring(L, -1);
        else
            msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    lua_Debug ar;
    for (int level = 1; lua_getstack(L, level, &ar); level++) {
        if (!lua_getinfo(L, "Sl", &ar) || ar.currentline <= 0)
            continue;
        size_t n = strlen(ar.short_src);
        if (strncmp(msg, ar.short_src, n) != 0 || msg[n] != ':')
            msg = lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, msg);
        break;
    }
    lua_pushstring(L, msg);
    return 1;
}

#define SCRIPT_ERROR_LINES 10 /* error lines logged per route per second at most */

/* A call failed: count it, keep the message, and log it (load errors are reported by the caller). */
static void call_failed(struct lstate *st, enum hook h, int rc, const char *msg)
{
    char text[1024];
    if (rc == LUA_ERRMEM || st->mem_failed) {
        st->memory_errors++;
        if (rc == LUA_ERRMEM)
            msg = "not enough memory (the script's state may use 64 MiB)";
    }
    if (!msg)
        msg = "(no error message)";
    size_t slen = strlen(st->route->script);
    if (strncmp(msg, st->route->script, slen) == 0 || strstr(msg, ".lua:"))
        snprintf(text, sizeof(text), "%s", msg);
    else
        snprintf(text, sizeof(text), "%s: %s", st->route->script, msg);
    size_t n = strlen(text) < sizeof(st->last_error) - 1 ? strlen(text) : sizeof(st->last_error) - 1;
    memcpy(st->last_error, text, n);
    st->last_error[n] = 0;
    if (h == HOOK_LOAD) {
        st->load_errors++;
        return;
    }
    st->errors++;
    /* A script that fails on every message must not drown the log: a few lines a second per
     * route, and a count of the rest (every error is counted in /stats, the last one kept). */
    double now = floor(loop ? ev_now(loop) : ev_time());
    if (now != st->log_second) {
        st->log_second = now;
        st->logged = 0;
    }
    if (st->logged >= SCRIPT_ERROR_LINES) {
        st->unlogged++;
        return;
    }
    st->logged++;
    if (st->unlogged)
        log_warn("script error on route %s: %u more errors were not logged", st->route->path,
                 st->unlogged);
    st->unlogged = 0;
    log_warn("script error on route %s, in %s: %s", st->route->path, hook_names[h], text);
}

/* Call fn(arg, ...) protected, with the nargs values on top of L as its further arguments (they
 * are consumed). fn pushes a hook's arguments, calls it and reads its results into arg. The first
 * call at depth 0 gets a fresh instruction budget that nested calls share. Returns 0, or -1 when
 * the call failed (already counted and logged). */
static int run(struct lstate *st, lua_State *L, enum hook h, lua_CFunction fn, void *arg, int nargs)
{
    int base = lua_gettop(L) - nargs + 1;
    if (!lua_checkstack(L, 3 + LUA_MINSTACK)) {
        lua_settop(L, base - 1);
        call_failed(st, h, LUA_ERRRUN, "C stack overflow (hooks nested too deeply)");
        return -1;
    }
    lua_pushcfunction(L, msgh);
    lua_pushcfunction(L, fn);
    lua_pushlightuserdata(L, arg);
    lua_rotate(L, base, 3);
    if (st->depth++ == 0) {
        st->steps = SCRIPT_INSTRUCTION_LIMIT;
        st->killed = 0;
        st->mem_failed = 0;
    }
    int rc = lua_pcall(L, 1 + nargs, 0, base);
    st->depth--;
    if (rc != LUA_OK)
        call_failed(st, h, rc, lua_tostring(L, -1));
    lua_settop(L, base - 1);
    if (st->depth == 0) {
        if (st->killed)
            lua_sethook(st->L, count_hook, LUA_MASKCOUNT, HOOK_EVERY);
        if (rc != LUA_OK && st->mem > st->mem_soft)
            lua_gc(st->L, LUA_GCCOLLECT, 0);
    }
    return rc == LUA_OK ? 0 : -1;
}

/* Make room for n values on L's stack for bookkeeping that must not fail (a client's connection
 * going): past the memory limit if need be, the few bytes a stack slot takes. */
static void reserve_stack(struct lstate *st, lua_State *L, int n)
{
    if (lua_checkstack(L, n))
        return;
    size_t limit = st->mem_limit;
    st->mem_limit = (size_t)-1;
    int ok = lua_checkstack(L, n);
    st->mem_limit = limit;
    if (!ok) {
        log_error("script %s: the Lua stack cannot grow", st->route->path);
        abort();
    }
}

/* --- JSON --------------------------------------------------------------------------------------- */

/* lua-cjson decodes every number as a float; make the integral ones integers, as a script
 * expects of {"n": 3}. */
static void integers(lua_State *L, int idx, int depth)
{
    if (depth > JSON_DEPTH + 1 || !lua_checkstack(L, 4))
        return;
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int t = lua_type(L, -1);
        if (t == LUA_TNUMBER && !lua_isinteger(L, -1)) {
            lua_Number v = lua_tonumber(L, -1);
            if (v == floor(v) && fabs(v) <= 9007199254740992.0) {
                lua_pushvalue(L, -2);
                lua_pushinteger(L, (lua_Integer)v);
                lua_rawset(L, idx); /* assigning an existing field is allowed during traversal */
            }
        } else if (t == LUA_TTABLE) {
            integers(L, -1, depth + 1);
        }
        lua_pop(L, 1);
    }
}

/* Decode the string at the top of the stack in place. Returns 0, or -1 with the error message in
 * its place (a memory error is raised). */
static int decode_top(lua_State *L)
{
    struct lstate *st = state_of(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->decode_ref);
    lua_insert(L, -2);
    int rc = lua_pcall(L, 1, 1, 0);
    if (rc == LUA_ERRMEM)
        lua_error(L);
    if (rc != LUA_OK)
        return -1;
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1)) {
        lua_Number v = lua_tonumber(L, -1);
        if (v == floor(v) && fabs(v) <= 9007199254740992.0) {
            lua_pop(L, 1);
            lua_pushinteger(L, (lua_Integer)v);
        }
    }
    integers(L, -1, 0);
    return 0;
}

/* herald.json.decode(text) -> value, or nil and a message when text is not JSON. */
static int l_json_decode(lua_State *L)
{
    luaL_checkstring(L, 1);
    lua_settop(L, 1);
    if (decode_top(L) < 0) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    return 1;
}

/* Replace the table at idx's copy on top of the stack with its JSON text (raises on a value JSON
 * cannot hold). Returns the text. */
static const char *encode(lua_State *L, int idx, size_t *len)
{
    struct lstate *st = state_of(L);
    idx = lua_absindex(L, idx);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->encode_ref);
    lua_pushvalue(L, idx);
    lua_call(L, 1, 1);
    return lua_tolstring(L, -1, len);
}

/* --- helpers ------------------------------------------------------------------------------------ */

static void check_channel(lua_State *L, const char *fn, const char *name, size_t len)
{
    const char *why;
    if (!chan_name_valid(name, len, &why)) {
        char shown[64];
        size_t n = len < 40 ? len : 40;
        memcpy(shown, name, n);
        shown[n] = 0;
        luaL_error(L, "%s: invalid channel name \"%s%s\": %s", fn, shown, len > n ? "..." : "", why);
    }
}

/* The data argument at idx of send/publish/deliver: a string as is, a table as JSON text.
 * *opcode gets the frame type: is_binary true -> binary, false -> text (which must then be valid
 * UTF-8), nil -> text when valid UTF-8, else binary. */
static const char *payload_arg(lua_State *L, int idx, int bin_idx, const char *fn, size_t *len,
                               int *opcode)
{
    /* Read is_binary first: encoding pushes the text, which may land at bin_idx. */
    int bin = bin_idx ? lua_type(L, bin_idx) : LUA_TNONE;
    int want_binary = bin > LUA_TNIL ? lua_toboolean(L, bin_idx) : -1; /* -1: not given */
    const char *p;
    int t = lua_type(L, idx);
    if (t == LUA_TSTRING)
        p = lua_tolstring(L, idx, len);
    else if (t == LUA_TTABLE)
        p = encode(L, idx, len);
    else {
        luaL_error(L, "%s: expected a string or a table, got %s", fn, luaL_typename(L, idx));
        return NULL;
    }
    if (want_binary == 1) {
        *opcode = WS_OP_BINARY;
        return p;
    }
    int valid = ws_utf8_valid((const uint8_t *)p, *len);
    if (!valid && want_binary == 0)
        luaL_error(L, "%s: a text message must be valid UTF-8 (pass true to send binary)", fn);
    if (!valid && t == LUA_TTABLE)
        luaL_error(L, "%s: the table holds a string that is not valid UTF-8", fn);
    *opcode = valid ? WS_OP_TEXT : WS_OP_BINARY;
    return p;
}

static void no_deliver(lua_State *L, const char *what)
{
    struct lstate *st = state_of(L);
    if (st->in_deliver || st->in_authorize)
        luaL_error(L, "%s cannot be used in %s (start a herald.timer(0, fn) to do it after)", what,
                   st->in_authorize ? "authorize" : "deliver");
}

/* --- the herald module -------------------------------------------------------------------------- */

/* A herald.publish whose seq comes from Redis, and the function to tell (fn_ref). */
struct lpub {
    struct lpub *prev, *next; /* on st->pubs */
    struct lstate *st;
    struct chan_pub *pub;
    int fn_ref;
};

/* A publish's outcome known at once. */
struct lpub_now {
    uint64_t seq;
    size_t subscribers;
    const char *err;
};

static void published_now(void *arg, uint64_t seq, size_t subscribers, const char *err)
{
    struct lpub_now *n = arg;
    n->seq = seq;
    n->subscribers = subscribers;
    n->err = err;
}

/* Push a publish's outcome, as herald.publish returns it and its done function gets it: seq and
 * subscribers, or nil and why it was not published. */
static void push_outcome(lua_State *L, uint64_t seq, size_t subscribers, const char *err)
{
    if (err) {
        lua_pushnil(L);
        lua_pushstring(L, err);
    } else {
        lua_pushinteger(L, (lua_Integer)seq);
        lua_pushinteger(L, (lua_Integer)subscribers);
    }
}

static int do_published(lua_State *L)
{
    state_of(L)->calls[HOOK_DONE]++;
    lua_call(L, 2, 0); /* fn(seq, subscribers) or fn(nil, err), pushed by published_later */
    return 0;
}

static void lpub_unlink(struct lpub *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else
        p->st->pubs = p->next;
    if (p->next)
        p->next->prev = p->prev;
}

static void published_later(void *arg, uint64_t seq, size_t subscribers, const char *err)
{
    struct lpub *p = arg;
    struct lstate *st = p->st;
    lua_State *L = st->L;
    lpub_unlink(p);
    reserve_stack(st, L, 3);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->fn_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, p->fn_ref);
    free(p);
    push_outcome(L, seq, subscribers, err);
    run(st, L, HOOK_DONE, do_published, NULL, 3);
}

/* herald.publish(channel, data [, done]) -> seq, subscribers; or nil, "pending" when Redis numbers
 * the channel (done(seq, subscribers) is called once it has); or nil, why when it cannot be
 * published (done(nil, why) too). */
static int l_publish(lua_State *L)
{
    struct lstate *st = state_of(L);
    no_deliver(L, "herald.publish");
    if (st->loading)
        return luaL_error(L, "herald.publish cannot be used while the script loads (use it in a hook "
                             "or a timer)");
    size_t clen, len;
    int opcode;
    const char *channel = luaL_checklstring(L, 1, &clen);
    check_channel(L, "herald.publish", channel, clen);
    int has_fn = !lua_isnoneornil(L, 3);
    if (has_fn)
        luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_settop(L, 3); /* payload_arg may push what it encodes: the function stays at 3 */
    int is_table = lua_type(L, 2) == LUA_TTABLE;
    const char *data = payload_arg(L, 2, 0, "herald.publish", &len, &opcode);
    struct chan_msg m = {.channel = channel, .channel_len = clen, .data = data, .len = len,
                         .is_json = (uint8_t)is_table, .utf8 = is_table ? 1 : -1,
                         .json = is_table ? 1 : -1};
    lua_State *prev = st->running;
    st->running = L; /* our deliver may run, nested, on this thread */
    struct lpub_now now = {0};
    struct chan_pub *pending = NULL;
    int done = chan_publish_cb(&m, NULL, published_now, &now, &pending);
    st->running = prev;
    if (!done) {
        if (!has_fn) {
            chan_pub_cancel(pending); /* nobody to tell */
        } else {
            struct lpub *p = xcalloc(1, sizeof(*p));
            p->st = st;
            p->pub = pending;
            lua_pushvalue(L, 3);
            p->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
            p->next = st->pubs;
            if (st->pubs)
                st->pubs->prev = p;
            st->pubs = p;
            chan_pub_rebind(pending, published_later, p);
        }
        lua_pushnil(L);
        lua_pushliteral(L, "pending");
        return 2;
    }
    if (has_fn) {
        lua_pushvalue(L, 3);
        push_outcome(L, now.seq, now.subscribers, now.err);
        lua_call(L, 2, 0);
    }
    push_outcome(L, now.seq, now.subscribers, now.err);
    return 2;
}

/* herald.channel(name) -> { subscribers = n, seq = last } */
static int l_channel(lua_State *L)
{
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    check_channel(L, "herald.channel", name, len);
    if (state_of(L)->loading)
        return luaL_error(L, "herald.channel cannot be used while the script loads (use it in a hook "
                             "or a timer)");
    size_t subscribers;
    uint64_t seq;
    chan_info(name, len, &subscribers, &seq);
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, (lua_Integer)subscribers);
    lua_setfield(L, -2, "subscribers");
    lua_pushinteger(L, (lua_Integer)seq);
    lua_setfield(L, -2, "seq");
    return 1;
}

struct presence_ctx {
    lua_State *L;
    struct lstate *st;
    lua_Integer n;
};

/* One member as a table { id = ..., info = {...}, client = <this route's client, when local> }
 * appended to the array below the top of the stack. */
static void push_member(const char *id, size_t id_len, const char *info, size_t info_len,
                        struct conn *local, void *arg)
{
    struct presence_ctx *x = arg;
    lua_State *L = x->L;
    luaL_checkstack(L, 4, "herald.presence");
    lua_createtable(L, 0, 3);
    lua_pushlstring(L, id, id_len);
    lua_setfield(L, -2, "id");
    if (info_len) {
        lua_pushlstring(L, info, info_len);
        if (decode_top(L) == 0)
            lua_setfield(L, -2, "info");
        else
            lua_pop(L, 1);
    }
    if (local && local->route == x->st->route && local->script_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, local->script_ref);
        lua_setfield(L, -2, "client");
    }
    lua_rawseti(L, -2, ++x->n);
}

/* herald.presence(channel) -> an array of { id = ..., info = ..., client = ... } */
static int l_presence(lua_State *L)
{
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    check_channel(L, "herald.presence", name, len);
    if (state_of(L)->loading)
        return luaL_error(L, "herald.presence cannot be used while the script loads (use it in a hook "
                             "or a timer)");
    lua_newtable(L);
    struct presence_ctx x = {L, state_of(L), 0};
    chan_presence_foreach(name, len, push_member, &x);
    return 1;
}

static void log_values(lua_State *L, int first, enum log_level level)
{
    int n = lua_gettop(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = first; i <= n; i++) {
        if (i > first)
            luaL_addchar(&b, ' ');
        luaL_tolstring(L, i, NULL);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    log_msg(level, "script %s: %s", state_of(L)->route->path, lua_tostring(L, -1));
}

/* herald.log(level, ...) */
static int l_log(lua_State *L)
{
    int level = log_level_parse(luaL_checkstring(L, 1));
    if (level < 0)
        return luaL_argerror(L, 1, "expected \"debug\", \"info\", \"warn\" or \"error\"");
    log_values(L, 2, (enum log_level)level);
    return 0;
}

/* print(...), as herald.log("info", ...) */
static int l_print(lua_State *L)
{
    log_values(L, 1, LOG_LEVEL_INFO);
    return 0;
}

static int l_now(lua_State *L)
{
    lua_pushnumber(L, loop ? ev_now(loop) : ev_time());
    return 1;
}

/* herald.stats() -> the broker's /stats figures as a table */
static int l_stats(lua_State *L)
{
    stats_scratch.len = 0;
    stats_render_json(&stats_scratch);
    lua_pushlstring(L, stats_scratch.data, stats_scratch.len);
    if (decode_top(L) < 0)
        return lua_error(L);
    return 1;
}

/* herald.clients() -> an array of the route's open clients */
static int l_clients(lua_State *L)
{
    struct lstate *st = state_of(L);
    lua_createtable(L, (int)st->clients, 0);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->clients_ref);
    lua_Integer i = 0;
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        lua_rawseti(L, -4, ++i);
    }
    lua_pop(L, 1);
    return 1;
}

/* herald.client(id) -> the open client with that id, or nil */
static int l_client(lua_State *L)
{
    struct lstate *st = state_of(L);
    lua_Integer id = luaL_checkinteger(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->clients_ref);
    lua_rawgeti(L, -1, id);
    return 1;
}

static int l_os_exit(lua_State *L)
{
    return luaL_error(L, "os.exit is not available to herald scripts");
}

static int l_no_sethook(lua_State *L)
{
    return luaL_error(L, "debug.sethook is not available to herald scripts");
}

/* setmetatable, refusing a metatable with a __gc field (upvalues: the real one, and where
 * finalizers are not available, for the message). */
static int l_setmetatable(lua_State *L)
{
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, 2) != LUA_TNIL)
            return luaL_error(L, "__gc metamethods are not available %s",
                              lua_tostring(L, lua_upvalueindex(2)));
        lua_pop(L, 1);
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

void script_guard_setmetatable(lua_State *L, const char *where)
{
    lua_getglobal(L, "setmetatable");
    lua_pushstring(L, where);
    lua_pushcclosure(L, l_setmetatable, 2);
    lua_setglobal(L, "setmetatable");
}

static int l_no_debug_setmetatable(lua_State *L)
{
    return luaL_error(L, "debug.setmetatable is not available to herald scripts");
}

/* --- timers ------------------------------------------------------------------------------------- */

static void timer_cb(struct ev_loop *l, ev_timer *w, int revents);

static void timer_unlink(struct lstate *st, struct ltimer *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        st->timers = t->next;
    if (t->next)
        t->next->prev = t->prev;
    t->prev = t->next = NULL;
}

/* Stop t and let it be collected. Returns whether it was active. */
static int timer_finish(lua_State *L, struct ltimer *t)
{
    if (!t->active)
        return 0;
    struct lstate *st = t->st;
    ev_timer_stop(loop, &t->w);
    t->active = 0;
    timer_unlink(st, t);
    st->timers_active--;
    luaL_unref(L, LUA_REGISTRYINDEX, t->fn_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->self_ref);
    t->fn_ref = t->self_ref = LUA_NOREF;
    return 1;
}

static int timer_start(lua_State *L, int repeat)
{
    struct lstate *st = state_of(L);
    const char *name = repeat ? "herald.every" : "herald.timer";
    lua_Number s = luaL_checknumber(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!(s >= 0 && s <= 1e9))
        return luaL_error(L, "%s: seconds must be a number from 0 to 1e9", name);
    if (repeat && s < 0.001)
        return luaL_error(L, "%s: the interval must be at least 0.001 seconds", name);
    struct ltimer *t = lua_newuserdatauv(L, sizeof(*t), 0);
    memset(t, 0, sizeof(*t));
    t->fn_ref = t->self_ref = LUA_NOREF;
    luaL_setmetatable(L, TIMER_MT);
    lua_pushvalue(L, 2);
    t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    t->st = st;
    t->repeat = (uint8_t)repeat;
    t->at_load = (uint8_t)st->loading;
    t->generation = st->generation;
    ev_timer_init(&t->w, timer_cb, s, repeat ? s : 0.);
    ev_timer_start(loop, &t->w);
    t->active = 1;
    t->next = st->timers;
    if (st->timers)
        st->timers->prev = t;
    st->timers = t;
    st->timers_active++;
    return 1;
}

static int l_timer(lua_State *L) { return timer_start(L, 0); }
static int l_every(lua_State *L) { return timer_start(L, 1); }

/* handle:cancel() -> true if the timer was still pending */
static int timer_cancel(lua_State *L)
{
    struct ltimer *t = luaL_checkudata(L, 1, TIMER_MT);
    lua_pushboolean(L, timer_finish(L, t));
    return 1;
}

static int timer_tostring(lua_State *L)
{
    struct ltimer *t = luaL_checkudata(L, 1, TIMER_MT);
    lua_pushfstring(L, "timer (%s%s)", t->repeat ? "every " : "", t->active ? "active" : "done");
    return 1;
}

/* Only reached for an active timer when the state is closed: the registry holds active ones. */
static int timer_gc(lua_State *L)
{
    struct ltimer *t = lua_touserdata(L, 1);
    if (t->active) {
        ev_timer_stop(loop, &t->w);
        t->active = 0;
        timer_unlink(t->st, t);
        t->st->timers_active--;
    }
    return 0;
}

static int do_timer(lua_State *L)
{
    struct lstate *st = state_of(L);
    st->calls[HOOK_TIMER]++;
    lua_call(L, 1, 0); /* fn(handle), pushed by timer_cb */
    return 0;
}

static void timer_cb(struct ev_loop *l, ev_timer *w, int revents)
{
    struct ltimer *t = (struct ltimer *)w;
    struct lstate *st = t->st;
    lua_State *L = st->L;
    reserve_stack(st, L, 2);
    /* Both stay on the stack through the call, so a one-shot timer can be released first. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->fn_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->self_ref);
    if (!t->repeat)
        timer_finish(L, t);
    run(st, L, HOOK_TIMER, do_timer, NULL, 2);
}

/* Cancel the timers started while a version of the script loaded: those of other generations
 * (keep == 1) after a successful load, or those of this one (keep == 0) after a failed one. */
static void cancel_load_timers(struct lstate *st, int keep_current)
{
    struct ltimer *t = st->timers;
    while (t) {
        struct ltimer *next = t->next;
        if (t->at_load && (t->generation == st->generation) != keep_current)
            timer_finish(st->L, t);
        t = next;
    }
}

/* --- client objects ----------------------------------------------------------------------------- */

static void free_pending(struct lclient *cl)
{
    struct pending *p = cl->pending;
    while (p) {
        struct pending *next = p->next;
        free(p);
        p = next;
    }
    cl->pending = NULL;
    cl->pending_tail = &cl->pending;
}

/* The connection is gone (or never opened): the object stays, inert. */
static void drop_client(struct lclient *cl)
{
    cl->c = NULL;
    cl->opening = 0;
    free_pending(cl);
}

static void add_pending_opts(struct lclient *cl, int op, int opcode, uint16_t code, const char *data,
                             size_t len, const struct sub_opts *o)
{
    size_t info_len = o ? o->info_len : 0;
    struct pending *p = xmalloc(sizeof(*p) + len + 1 + info_len + 1);
    p->next = NULL;
    p->op = (uint8_t)op;
    p->opcode = (uint8_t)opcode;
    p->code = code;
    p->member = (int8_t)(o ? o->member : -1);
    p->events = (int8_t)(o ? o->events : -1);
    p->len = len;
    p->info_len = info_len;
    memcpy(p->data, data, len);
    p->data[len] = 0;
    if (info_len)
        memcpy(p->data + len + 1, o->info, info_len);
    p->data[len + 1 + info_len] = 0;
    *cl->pending_tail = p;
    cl->pending_tail = &p->next;
}

static void add_pending(struct lclient *cl, int op, int opcode, uint16_t code, const char *data,
                        size_t len)
{
    add_pending_opts(cl, op, opcode, code, data, len, NULL);
}

static struct lclient *check_client(lua_State *L, const char *method)
{
    struct lclient *cl = luaL_checkudata(L, 1, CLIENT_MT);
    struct lstate *st = state_of(L);
    if (st->in_deliver || st->in_authorize)
        luaL_error(L, "client:%s cannot be used in %s (start a herald.timer(0, fn) to do it after)",
                   method, st->in_authorize ? "authorize" : "deliver");
    if (cl->builtin)
        luaL_error(L, "client:%s is not available on a %s route (its kind decides what its clients "
                      "get)", method, route_kind_name(st->route->kind));
    return cl;
}

static int closed(lua_State *L)
{
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
}

/* client:send(data [, is_binary]) -> true, or nil, "closed" */
static int client_send(lua_State *L)
{
    struct lclient *cl = check_client(L, "send");
    size_t len;
    int opcode;
    const char *p = payload_arg(L, 2, 3, "client:send", &len, &opcode);
    if (!cl->c)
        return closed(L);
    if (cl->opening) {
        add_pending(cl, PENDING_SEND, opcode, 0, p, len);
    } else {
        chan_settle_for(cl->c); /* after what was published to it before */
        conn_send_frame(cl->c, opcode, p, len);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* Read client:subscribe's options table at idx: { presence = bool, events = bool, info = table }.
 * The info's JSON text is left on the stack. */
static void read_sub_opts(lua_State *L, int idx, struct sub_opts *o)
{
    o->member = o->events = -1;
    o->info = NULL;
    o->info_len = 0;
    if (lua_isnoneornil(L, idx))
        return;
    luaL_checktype(L, idx, LUA_TTABLE);
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        if (!k || (strcmp(k, "presence") != 0 && strcmp(k, "events") != 0 && strcmp(k, "info") != 0))
            luaL_error(L, "client:subscribe: unknown option %s (expected presence, events, info)",
                       k ? k : luaL_typename(L, -2));
        lua_pop(L, 1);
    }
    static const char *const flags[2] = {"presence", "events"};
    for (int i = 0; i < 2; i++) {
        int t = lua_getfield(L, idx, flags[i]);
        if (t != LUA_TNIL && t != LUA_TBOOLEAN)
            luaL_error(L, "client:subscribe: %s must be true or false", flags[i]);
        if (t == LUA_TBOOLEAN)
            *(i ? &o->events : &o->member) = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    if (lua_getfield(L, idx, "info") == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    if (!lua_istable(L, -1))
        luaL_error(L, "client:subscribe: info must be a table");
    if (o->member != 1)
        luaL_error(L, "client:subscribe: info goes with presence = true");
    o->info = encode(L, -1, &o->info_len);
    if (o->info_len > CHAN_INFO_MAX || o->info[0] != '{' ||
        !ws_utf8_valid((const uint8_t *)o->info, o->info_len))
        luaL_error(L, "client:subscribe: info must be a table with string keys (a JSON object) of at "
                      "most 1024 bytes of JSON");
}

/* May cl subscribe to the channel (pattern 0) or pattern (1) name? The route's token grants and
 * authorize hook say, now, even in open (the hook runs nested, on L's thread). Returns 1, or 0
 * with nil and why pushed. */
static int subscribe_allowed(lua_State *L, struct lclient *cl, const char *name, size_t len,
                             int pattern)
{
    struct lstate *st = state_of(L);
    const char *why;
    lua_State *prev = st->running;
    st->running = L;
    int ok = pattern ? route_allows_pattern(st->route, cl->c, name, len, &why)
                     : route_allows(st->route, cl->c, AUTH_SUBSCRIBE, name, len, &why);
    st->running = prev;
    if (!ok) {
        lua_pushnil(L);
        lua_pushstring(L, why       ? why
                          : pattern ? "not allowed to subscribe to this pattern"
                                    : "not allowed to subscribe to this channel");
    }
    return ok;
}

/* The connection has max_subscriptions already (counted in subscription_limit_hits). */
static int limit_reached(lua_State *L)
{
    lua_pushnil(L);
    lua_pushliteral(L, "subscription limit reached for this connection");
    return 2;
}

static int subscription(lua_State *L, int subscribe)
{
    const char *fn = subscribe ? "client:subscribe" : "client:unsubscribe";
    struct lclient *cl = check_client(L, subscribe ? "subscribe" : "unsubscribe");
    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    check_channel(L, fn, name, len);
    struct sub_opts o = {-1, -1, NULL, 0};
    if (subscribe)
        read_sub_opts(L, 3, &o);
    if (!cl->c)
        return closed(L);
    if (subscribe && !subscribe_allowed(L, cl, name, len, 0))
        return 2;
    if (cl->opening) {
        add_pending_opts(cl, subscribe ? PENDING_SUBSCRIBE : PENDING_UNSUBSCRIBE, 0, 0, name, len, &o);
        lua_pushboolean(L, 1);
        return 1;
    }
    int rc = subscribe ? chan_subscribe(cl->c, name, len) : chan_unsubscribe(cl->c, name, len);
    if (rc < 0)
        return limit_reached(L);
    if (o.member >= 0 || o.events >= 0)
        chan_presence_set(cl->c, name, len, o.member, o.events, o.info, o.info_len);
    lua_pushboolean(L, rc);
    return 1;
}

/* client:subscribe(channel [, opts]) -> true, false if it already was, or nil, "closed" */
static int client_subscribe(lua_State *L) { return subscription(L, 1); }
/* client:unsubscribe(channel) -> true, false if it was not, or nil, "closed" */
static int client_unsubscribe(lua_State *L) { return subscription(L, 0); }

static int pattern_subscription(lua_State *L, int subscribe)
{
    const char *fn = subscribe ? "client:subscribe_pattern" : "client:unsubscribe_pattern";
    struct lclient *cl = check_client(L, subscribe ? "subscribe_pattern" : "unsubscribe_pattern");
    size_t len;
    const char *pattern = luaL_checklstring(L, 2, &len);
    const char *why;
    if (!pattern_valid(pattern, len, &why)) {
        char shown[64];
        size_t n = len < 40 ? len : 40;
        memcpy(shown, pattern, n);
        shown[n] = 0;
        return luaL_error(L, "%s: invalid pattern \"%s%s\": %s", fn, shown, len > n ? "..." : "", why);
    }
    if (!cl->c)
        return closed(L);
    if (subscribe && !subscribe_allowed(L, cl, pattern, len, 1))
        return 2;
    if (cl->opening) {
        add_pending(cl, subscribe ? PENDING_PSUBSCRIBE : PENDING_PUNSUBSCRIBE, 0, 0, pattern, len);
        lua_pushboolean(L, 1);
        return 1;
    }
    int rc = subscribe ? chan_psubscribe(cl->c, pattern, len) : chan_punsubscribe(cl->c, pattern, len);
    if (rc < 0)
        return limit_reached(L);
    lua_pushboolean(L, rc);
    return 1;
}

/* client:subscribe_pattern(pattern) -> true, false if it already was, or nil and why (closed,
 * the subscription limit) */
static int client_subscribe_pattern(lua_State *L) { return pattern_subscription(L, 1); }
/* client:unsubscribe_pattern(pattern) -> true, false if it was not, or nil, "closed" */
static int client_unsubscribe_pattern(lua_State *L) { return pattern_subscription(L, 0); }

/* client:close([code [, reason]]) -> true, or nil, "closed" */
static int client_close(lua_State *L)
{
    struct lclient *cl = check_client(L, "close");
    lua_Integer code = luaL_optinteger(L, 2, WS_CLOSE_NORMAL);
    size_t rlen;
    const char *reason = luaL_optlstring(L, 3, "", &rlen);
    if (!((code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) ||
          (code >= 3000 && code <= 4999)))
        return luaL_error(L, "client:close: %d is not a close code a server may send (1000-1003, "
                             "1007-1011, 3000-4999)", (int)code);
    if (rlen > 123 || strlen(reason) != rlen || !ws_utf8_valid((const uint8_t *)reason, rlen))
        return luaL_error(L, "client:close: the reason must be valid UTF-8 of at most 123 bytes");
    if (!cl->c)
        return closed(L);
    if (cl->opening) {
        add_pending(cl, PENDING_CLOSE, 0, (uint16_t)code, reason, rlen);
    } else {
        struct lstate *st = state_of(L);
        lua_State *prev = st->running;
        st->running = L; /* the close hook runs now, on this thread */
        conn_ws_close(cl->c, (uint16_t)code, reason);
        st->running = prev;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static const luaL_Reg client_methods[] = {{"send", client_send},
                                          {"subscribe", client_subscribe},
                                          {"unsubscribe", client_unsubscribe},
                                          {"subscribe_pattern", client_subscribe_pattern},
                                          {"unsubscribe_pattern", client_unsubscribe_pattern},
                                          {"close", client_close},
                                          {NULL, NULL}};

/* client.id, client.addr, client.connected, the methods, then the fields the script set (data). */
static int client_index(lua_State *L)
{
    struct lclient *cl = lua_touserdata(L, 1);
    if (lua_type(L, 2) == LUA_TSTRING) {
        const char *k = lua_tostring(L, 2);
        if (strcmp(k, "id") == 0) {
            lua_pushinteger(L, (lua_Integer)cl->id);
            return 1;
        }
        if (strcmp(k, "addr") == 0) {
            lua_pushstring(L, cl->addr);
            return 1;
        }
        if (strcmp(k, "connected") == 0) {
            lua_pushboolean(L, cl->c != NULL);
            return 1;
        }
        lua_pushvalue(L, 2);
        if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL)
            return 1;
        lua_pop(L, 1);
    }
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

static int client_newindex(lua_State *L)
{
    if (lua_type(L, 2) == LUA_TSTRING) {
        const char *k = lua_tostring(L, 2);
        lua_pushvalue(L, 2);
        if (strcmp(k, "id") == 0 || strcmp(k, "addr") == 0 || strcmp(k, "connected") == 0 ||
            lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL)
            return luaL_error(L, "client.%s is read-only", k);
        lua_pop(L, 1);
    }
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, -3);
    return 0;
}

static int client_tostring(lua_State *L)
{
    struct lclient *cl = luaL_checkudata(L, 1, CLIENT_MT);
    lua_pushfstring(L, "client %I (%s%s)", (lua_Integer)cl->id, cl->addr, cl->c ? "" : ", closed");
    return 1;
}

static int client_gc(lua_State *L)
{
    free_pending(lua_touserdata(L, 1));
    return 0;
}

/* Push a new client object for c (not c's yet). */
static struct lclient *new_client(lua_State *L, struct conn *c)
{
    struct lclient *cl = lua_newuserdatauv(L, sizeof(*cl), 1);
    memset(cl, 0, sizeof(*cl));
    cl->pending_tail = &cl->pending;
    luaL_setmetatable(L, CLIENT_MT);
    lua_createtable(L, 0, 1);
    lua_newtable(L);
    lua_setfield(L, -2, "data");
    lua_setiuservalue(L, -2, 1);
    cl->c = c;
    cl->id = c->id;
    cl->opening = 1;
    snprintf(cl->addr, sizeof(cl->addr), "%s", conn_addr_str(c));
    return cl;
}

/* --- the state ---------------------------------------------------------------------------------- */

/* Call option(value) on the lua-cjson instance at the top of the stack. */
static void cjson_option(lua_State *L, const char *option, int value, int boolean)
{
    lua_getfield(L, -1, option);
    if (boolean)
        lua_pushboolean(L, value);
    else
        lua_pushinteger(L, value);
    lua_call(L, 1, 0);
}

static int ref_value(lua_State *L) { return luaL_ref(L, LUA_REGISTRYINDEX); }

/* Set up a new state (protected): libraries, lua-cjson, the herald module, the metatables. */
static int setup(lua_State *L)
{
    struct lstate *st = lua_touserdata(L, 1);
    luaL_openlibs(L);

    /* A script must not end the broker or take the count hook away. */
    lua_getglobal(L, "os");
    lua_pushcfunction(L, l_os_exit);
    lua_setfield(L, -2, "exit");
    lua_pop(L, 1);
    lua_getglobal(L, "debug");
    lua_pushcfunction(L, l_no_sethook);
    lua_setfield(L, -2, "sethook");
    lua_pushcfunction(L, l_no_debug_setmetatable);
    lua_setfield(L, -2, "setmetatable");
    lua_pop(L, 1);
    /* Lua runs finalizers with hooks off, so the instruction bound could not stop a __gc that
     * loops: setmetatable refuses a metatable with one, and debug.setmetatable is not there. */
    script_guard_setmetatable(L, "to herald scripts");
    lua_pushcfunction(L, l_print);
    lua_setglobal(L, "print");

    /* require() finds modules next to the script. */
    const char *script = st->route->script, *slash = strrchr(script, '/');
    lua_getglobal(L, "package");
    if (slash)
        lua_pushlstring(L, script, (size_t)(slash - script));
    else
        lua_pushliteral(L, ".");
    lua_pushliteral(L, "/?.lua;");
    lua_getfield(L, -3, "path");
    lua_concat(L, 3);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);

    /* A lua-cjson instance of our own, strict about what it takes. */
    luaopen_cjson(L);
    lua_getfield(L, -1, "new");
    lua_call(L, 0, 1);
    cjson_option(L, "encode_invalid_numbers", 0, 1); /* NaN and inf are not JSON */
    cjson_option(L, "decode_invalid_numbers", 0, 1);
    cjson_option(L, "encode_max_depth", JSON_DEPTH, 0);
    cjson_option(L, "decode_max_depth", JSON_DEPTH, 0);
    lua_getfield(L, -1, "encode");
    st->encode_ref = ref_value(L);
    lua_getfield(L, -1, "decode");
    st->decode_ref = ref_value(L);
    lua_getfield(L, -1, "null");
    int null_idx = lua_gettop(L);

    /* The client and timer metatables. */
    luaL_newmetatable(L, CLIENT_MT);
    luaL_newlib(L, client_methods);
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, client_index, 1);
    lua_setfield(L, -3, "__index");
    lua_pushcclosure(L, client_newindex, 1);
    lua_setfield(L, -2, "__newindex");
    lua_pushcfunction(L, client_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, client_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "client");
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
    luaL_newmetatable(L, TIMER_MT);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, timer_cancel);
    lua_setfield(L, -2, "cancel");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, timer_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, timer_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "timer");
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);

    lua_newtable(L);
    st->clients_ref = ref_value(L);
    lua_pushboolean(L, 0);
    st->result_ref = ref_value(L);

    static const luaL_Reg funcs[] = {
        {"publish", l_publish}, {"channel", l_channel}, {"timer", l_timer},   {"every", l_every},
        {"log", l_log},         {"now", l_now},         {"stats", l_stats},   {"clients", l_clients},
        {"client", l_client},   {"presence", l_presence}, {NULL, NULL}};
    luaL_newlib(L, funcs);
    lua_createtable(L, 0, 3);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->encode_ref);
    lua_setfield(L, -2, "encode");
    lua_pushcfunction(L, l_json_decode);
    lua_setfield(L, -2, "decode");
    lua_pushvalue(L, null_idx);
    lua_setfield(L, -2, "null");
    lua_setfield(L, -2, "json");
    lua_newtable(L);
    lua_setfield(L, -2, "state");
    lua_pushstring(L, st->route->path);
    lua_setfield(L, -2, "route");
    lua_pushliteral(L, HERALD_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushvalue(L, -1);
    lua_setglobal(L, "herald");
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "herald");
    return 0;
}

static struct lstate *state_new(struct route *r, char *err, size_t errlen)
{
    struct lstate *st = xcalloc(1, sizeof(*st));
    st->route = r;
    st->mem_limit = SCRIPT_MEMORY_LIMIT;
    st->mem_soft = SCRIPT_MEMORY_LIMIT - SCRIPT_MEMORY_LIMIT / 16;
    for (int i = 0; i < SCRIPT_HOOKS; i++)
        st->fn[i] = LUA_NOREF;
    st->clients_ref = st->result_ref = st->encode_ref = st->decode_ref = LUA_NOREF;
    st->L = lua_newstate(l_alloc, st);
    if (!st->L) {
        snprintf(err, errlen, "%s: cannot create a Lua state", r->script);
        free(st);
        return NULL;
    }
    *(struct lstate **)lua_getextraspace(st->L) = st;
    lua_pushcfunction(st->L, setup);
    lua_pushlightuserdata(st->L, st);
    if (lua_pcall(st->L, 1, 0, 0) != LUA_OK) {
        snprintf(err, errlen, "%s: cannot set up the Lua state: %s", r->script,
                 lua_tostring(st->L, -1) ? lua_tostring(st->L, -1) : "not enough memory");
        lua_close(st->L);
        free(st);
        return NULL;
    }
    lua_settop(st->L, 0);
    lua_sethook(st->L, count_hook, LUA_MASKCOUNT, HOOK_EVERY);
    st->next = states;
    states = st;
    return st;
}

/* --- loading ------------------------------------------------------------------------------------ */

struct load_ctx {
    struct lstate *st;
    int fn[SCRIPT_HOOKS];
};

static int do_load(lua_State *L)
{
    struct load_ctx *x = lua_touserdata(L, 1);
    struct lstate *st = x->st;
    const char *file = st->route->script;
    lua_getglobal(L, "herald");
    lua_pushstring(L, file);
    lua_setfield(L, -2, "script");
    lua_pop(L, 1);
    if (luaL_loadfilex(L, file, "t") != LUA_OK)
        return lua_error(L);
    st->calls[HOOK_LOAD]++;
    lua_call(L, 0, 1);
    int builtin = st->route->kind != ROUTE_SCRIPT;
    const char *expected = builtin ? "open, authorize, close" : "open, message, deliver, close, authorize";
    if (lua_type(L, -1) != LUA_TTABLE)
        return luaL_error(L, "%s: the script must return a table of hooks (%s), not %s", file, expected,
                          luaL_typename(L, -1));
    int t = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, t)) {
        int known = -1;
        if (lua_type(L, -2) == LUA_TSTRING)
            for (int i = 0; i < SCRIPT_HOOKS; i++)
                if (strcmp(lua_tostring(L, -2), hook_names[i]) == 0 &&
                    (!builtin || (ACCESS_HOOKS & (1u << i))))
                    known = i;
        if (known < 0 && builtin)
            return luaL_error(L, "%s: hook %s in the returned table: a %s route's authorize script "
                                 "has only open, authorize and close", file,
                              luaL_tolstring(L, -2, NULL), route_kind_name(st->route->kind));
        if (known < 0)
            return luaL_error(L, "%s: unknown hook %s in the returned table (expected %s)", file,
                              luaL_tolstring(L, -2, NULL), expected);
        if (lua_type(L, -1) != LUA_TFUNCTION)
            return luaL_error(L, "%s: hook %s must be a function, not %s", file, hook_names[known],
                              luaL_typename(L, -1));
        lua_pop(L, 1);
    }
    for (int i = 0; i < SCRIPT_HOOKS; i++)
        if (lua_getfield(L, t, hook_names[i]) == LUA_TFUNCTION)
            x->fn[i] = ref_value(L);
        else
            lua_pop(L, 1);
    return 0;
}

int script_load(struct route *r, char *err, size_t errlen)
{
    struct lstate *st = r->script_state;
    if (!st) {
        st = state_new(r, err, errlen);
        if (!st)
            return -1;
        r->script_state = st;
    }
    st->route = r;
    lua_State *L = st->L;
    struct load_ctx x = {.st = st};
    for (int i = 0; i < SCRIPT_HOOKS; i++)
        x.fn[i] = LUA_NOREF;
    st->generation++;
    st->loading = 1;
    int rc = run(st, L, HOOK_LOAD, do_load, &x, 0);
    st->loading = 0;
    if (rc < 0) {
        for (int i = 0; i < SCRIPT_HOOKS; i++)
            luaL_unref(L, LUA_REGISTRYINDEX, x.fn[i]);
        cancel_load_timers(st, 0);
        snprintf(err, errlen, "%s", st->last_error);
        if (st->loaded)
            snprintf(err + strlen(err), errlen - strlen(err),
                     " (route %s keeps running the previous version)", r->path);
        return -1;
    }
    for (int i = 0; i < SCRIPT_HOOKS; i++) {
        luaL_unref(L, LUA_REGISTRYINDEX, st->fn[i]);
        st->fn[i] = x.fn[i];
    }
    cancel_load_timers(st, 1);
    if (st->loaded) {
        st->reloads++;
        log_info("script %s reloaded on route %s", r->script, r->path);
    }
    st->loaded = 1;
    return 0;
}

void script_unload(struct route *r)
{
    struct lstate *st = r->script_state;
    if (!st)
        return;
    for (struct lstate **pp = &states; *pp; pp = &(*pp)->next) {
        if (*pp == st) {
            *pp = st->next;
            break;
        }
    }
    while (st->pubs) { /* their outcome has nobody to go to */
        struct lpub *p = st->pubs;
        st->pubs = p->next;
        chan_pub_cancel(p->pub);
        free(p);
    }
    lua_close(st->L); /* finalizers stop the active timers */
    free(st);
    r->script_state = NULL;
}

/* --- connections -------------------------------------------------------------------------------- */

static int hex_value(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    ch |= 32;
    return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

/* Percent-decode s[0..n) into out, '+' as a space; a malformed escape is kept as it is. */
static size_t form_decode(const char *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int hi, lo;
        if (s[i] == '+') {
            out[o++] = ' ';
        } else if (s[i] == '%' && i + 2 < n && (hi = hex_value(s[i + 1])) >= 0 &&
                   (lo = hex_value(s[i + 2])) >= 0) {
            out[o++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            out[o++] = s[i];
        }
    }
    return o;
}

static void push_query(lua_State *L, const char *q, size_t n)
{
    lua_newtable(L);
    if (!q)
        return;
    char *tmp = lua_newuserdatauv(L, n + 1, 0); /* collected with the rest if a push fails */
    size_t i = 0;
    while (i <= n) {
        size_t j = i;
        while (j < n && q[j] != '&')
            j++;
        if (j > i) {
            size_t eq = i;
            while (eq < j && q[eq] != '=')
                eq++;
            lua_pushlstring(L, tmp, form_decode(q + i, eq - i, tmp));
            lua_pushlstring(L, tmp, eq < j ? form_decode(q + eq + 1, j - eq - 1, tmp) : 0);
            lua_rawset(L, -4);
        }
        i = j + 1;
    }
    lua_pop(L, 1);
}

static void push_headers(lua_State *L, const struct http_request *req)
{
    lua_createtable(L, 0, (int)req->num_headers);
    char name[256];
    for (size_t i = 0; i < req->num_headers; i++) {
        const struct http_header *h = &req->headers[i];
        size_t n = h->name_len < sizeof(name) ? h->name_len : sizeof(name);
        for (size_t k = 0; k < n; k++)
            name[k] = (char)(h->name[k] >= 'A' && h->name[k] <= 'Z' ? h->name[k] + 32 : h->name[k]);
        lua_pushlstring(L, name, n);
        lua_pushvalue(L, -1);
        if (lua_rawget(L, -3) == LUA_TSTRING) { /* repeated: joined as one field, as RFC 9110 says */
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, h->value, h->value_len);
            lua_concat(L, 3);
        } else {
            lua_pop(L, 1);
            lua_pushlstring(L, h->value, h->value_len);
        }
        lua_rawset(L, -3);
    }
}

struct open_ctx {
    struct lstate *st;
    struct conn *c;
    const struct http_request *req;
    const char *path;
    size_t path_len;
    struct lclient *cl;
    int ref;
    int refused;
};

/* Push a new client object for c and make it c's (c->script_ref). */
static struct lclient *attach_client(lua_State *L, struct conn *c, int builtin)
{
    struct lclient *cl = new_client(L, c);
    cl->builtin = builtin;
    lua_pushvalue(L, -1);
    c->script_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return cl;
}

/* List the client object cl at the top of the stack among st's open clients (herald.clients). */
static void list_client(lua_State *L, struct lstate *st, struct lclient *cl)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->clients_ref);
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, (lua_Integer)cl->id);
    lua_pop(L, 1);
}

static int do_open(lua_State *L)
{
    struct open_ctx *x = lua_touserdata(L, 1);
    struct lstate *st = x->st;
    /* The connection knows its client from now on, so authorize finds it during open. */
    x->cl = attach_client(L, x->c, st->route->kind != ROUTE_SCRIPT);
    x->ref = x->c->script_ref;
    int client = lua_gettop(L);
    if (st->fn[HOOK_OPEN] != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, st->fn[HOOK_OPEN]);
        lua_pushvalue(L, client);
        lua_createtable(L, 0, 3);
        lua_pushlstring(L, x->path, x->path_len);
        lua_setfield(L, -2, "path");
        push_query(L, x->req->query, x->req->query_len);
        lua_setfield(L, -2, "query");
        push_headers(L, x->req);
        lua_setfield(L, -2, "headers");
        st->calls[HOOK_OPEN]++;
        lua_call(L, 2, 2);
        if (lua_type(L, -2) == LUA_TBOOLEAN && !lua_toboolean(L, -2)) {
            const char *why = lua_tostring(L, -1);
            snprintf(refuse_reason, sizeof(refuse_reason), "%s", why ? why : "refused by the route's script");
            x->refused = 1;
            return 0;
        }
        lua_settop(L, client);
    }
    list_client(L, st, x->cl);
    return 0;
}

static void forget_client(struct lstate *st, lua_State *L, uint64_t id, int ref)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->clients_ref);
    lua_pushnil(L);
    lua_rawseti(L, -2, (lua_Integer)id); /* removing a key never allocates */
    lua_pop(L, 1);
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
}

int script_accept(struct route *r, struct conn *c, const struct http_request *req, const char *path,
                  size_t path_len, const char **why)
{
    struct lstate *st = r->script_state;
    if (!st || !st->loaded) {
        *why = "the route's script is not loaded";
        return 503;
    }
    /* A built-in route's clients get their objects when they are first needed. */
    if (r->kind != ROUTE_SCRIPT && st->fn[HOOK_OPEN] == LUA_NOREF)
        return 0;
    /* c has no client object: a refused handshake or event stream drops the one it got. */
    struct open_ctx x = {.st = st, .c = c, .req = req, .path = path, .path_len = path_len,
                         .ref = LUA_NOREF};
    int rc = run(st, st->L, HOOK_OPEN, do_open, &x, 0);
    if (rc < 0 || x.refused) {
        if (x.cl)
            drop_client(x.cl);
        if (x.ref != LUA_NOREF)
            forget_client(st, st->L, c->id, x.ref);
        c->script_ref = LUA_NOREF;
        *why = rc < 0 ? "the route's script failed (see the server log)" : refuse_reason;
        return rc < 0 ? 500 : 403;
    }
    st->clients++;
    return 0;
}

/* Take c's client object (of st) from it, once: the object stays, inert, on the stack of the
 * thread returned. NULL, with nothing pushed, when c has none (or st is gone). */
static lua_State *detach_client(struct lstate *st, struct conn *c)
{
    int ref = c->script_ref;
    c->script_ref = LUA_NOREF;
    if (ref == LUA_NOREF || !st)
        return NULL;
    lua_State *L = current(st);
    reserve_stack(st, L, 4);
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    struct lclient *cl = lua_touserdata(L, -1);
    drop_client(cl);
    forget_client(st, L, cl->id, ref);
    st->clients--;
    return L;
}

void script_refused(struct conn *c, struct route *r)
{
    lua_State *L = detach_client(r->script_state, c);
    if (L)
        lua_pop(L, 1);
}

struct authorize_ctx {
    struct conn *c;
    int action;
    const char *channel;
    size_t len;
    int allowed;
    int has_reason;
};

static int do_authorize(lua_State *L)
{
    struct authorize_ctx *x = lua_touserdata(L, 1);
    struct lstate *st = state_of(L);
    if (x->c->script_ref == LUA_NOREF) { /* a built-in route's client met for the first time */
        struct lclient *cl = attach_client(L, x->c, 1);
        st->clients++; /* counted with its reference: script_closed uncounts it */
        list_client(L, st, cl);
    } else {
        lua_rawgeti(L, LUA_REGISTRYINDEX, x->c->script_ref);
    }
    int client = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->fn[HOOK_AUTHORIZE]);
    lua_pushvalue(L, client);
    lua_pushstring(L, x->action == AUTH_PUBLISH     ? "publish"
                      : x->action == AUTH_SUBSCRIBE ? "subscribe"
                                                    : "subscribe_pattern");
    lua_pushlstring(L, x->channel, x->len);
    st->calls[HOOK_AUTHORIZE]++;
    lua_call(L, 3, 2);
    x->allowed = lua_toboolean(L, -2);
    if (!x->allowed && lua_type(L, -1) == LUA_TSTRING) {
        size_t n;
        const char *why = lua_tolstring(L, -1, &n);
        n = n < 200 ? n : 200;
        memcpy(authorize_reason, why, n);
        authorize_reason[n] = 0;
        x->has_reason = 1;
    }
    return 0;
}

int script_authorize(struct route *r, struct conn *c, int action, const char *channel, size_t len,
                     const char **why)
{
    struct lstate *st = r->script_state;
    *why = NULL;
    if (!st)
        return 1;
    if (!st->loaded) { /* never loaded: nothing is allowed rather than everything */
        *why = "the route's authorize script is not loaded";
        st->authorize_refused++;
        return 0;
    }
    if (st->fn[HOOK_AUTHORIZE] == LUA_NOREF)
        return 1;
    lua_State *L = current(st);
    struct authorize_ctx x = {.c = c, .action = action, .channel = channel, .len = len};
    int prev = st->in_authorize;
    st->in_authorize = 1;
    int rc = run(st, L, HOOK_AUTHORIZE, do_authorize, &x, 0);
    st->in_authorize = prev;
    if (rc == 0 && x.allowed)
        return 1;
    st->authorize_refused++;
    if (rc < 0)
        *why = "the route's authorize hook failed (see the server log)";
    else if (x.has_reason)
        *why = authorize_reason;
    return 0;
}

void script_opened(struct conn *c)
{
    if (c->script_ref == LUA_NOREF || !c->route || !c->route->script_state)
        return; /* (a built-in route's client without an object yet) */
    struct lstate *st = c->route->script_state;
    lua_State *L = st->L;
    reserve_stack(st, L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->script_ref); /* kept on the stack: alive until we are done */
    struct lclient *cl = lua_touserdata(L, -1);
    struct pending *p = cl->pending;
    cl->pending = NULL;
    cl->pending_tail = &cl->pending;
    cl->opening = 0;
    while (p) {
        struct pending *next = p->next;
        if (cl->c) {
            switch (p->op) {
            case PENDING_SEND:
                chan_settle_for(c);
                conn_send_frame(c, p->opcode, p->data, p->len);
                break;
            case PENDING_SUBSCRIBE:
                if (chan_subscribe(c, p->data, p->len) >= 0 && (p->member >= 0 || p->events >= 0))
                    chan_presence_set(c, p->data, p->len, p->member, p->events, p->data + p->len + 1,
                                      p->info_len);
                break;
            case PENDING_UNSUBSCRIBE:
                chan_unsubscribe(c, p->data, p->len);
                break;
            case PENDING_PSUBSCRIBE:
                chan_psubscribe(c, p->data, p->len);
                break;
            case PENDING_PUNSUBSCRIBE:
                chan_punsubscribe(c, p->data, p->len);
                break;
            case PENDING_CLOSE:
                conn_ws_close(c, p->code, p->data);
                break;
            }
        }
        free(p);
        p = next;
    }
    lua_pop(L, 1);
}

struct message_ctx {
    const uint8_t *data;
    size_t len;
    int binary;
};

static int do_message(lua_State *L)
{
    struct message_ctx *x = lua_touserdata(L, 1);
    struct lstate *st = state_of(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->fn[HOOK_MESSAGE]);
    lua_insert(L, 2); /* below the client */
    lua_pushlstring(L, (const char *)x->data, x->len);
    lua_pushboolean(L, x->binary);
    st->calls[HOOK_MESSAGE]++;
    lua_call(L, 3, 0);
    return 0;
}

void script_message(struct conn *c, const uint8_t *data, size_t len, int binary)
{
    if (c->script_ref == LUA_NOREF || !c->route->script_state)
        return;
    struct lstate *st = c->route->script_state;
    if (st->fn[HOOK_MESSAGE] == LUA_NOREF)
        return;
    struct message_ctx x = {data, len, binary};
    lua_State *L = st->L;
    reserve_stack(st, L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->script_ref);
    run(st, L, HOOK_MESSAGE, do_message, &x, 1);
}

struct deliver_ctx {
    struct chan_msg *m;
    const char *data;
    size_t len;
    const char *out;
    size_t out_len;
    int opcode;
    int drop;
};

static int do_deliver(lua_State *L)
{
    struct deliver_ctx *x = lua_touserdata(L, 1);
    struct lstate *st = state_of(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->fn[HOOK_DELIVER]);
    lua_pushlstring(L, x->m->channel, x->m->channel_len);
    lua_pushlstring(L, x->data, x->len);
    lua_pushinteger(L, (lua_Integer)x->m->seq);
    st->calls[HOOK_DELIVER]++;
    lua_call(L, 3, 2);
    int t = lua_type(L, -2);
    if (t == LUA_TNIL || (t == LUA_TBOOLEAN && !lua_toboolean(L, -2))) {
        x->drop = 1;
        return 0;
    }
    if (t != LUA_TSTRING && t != LUA_TTABLE)
        return luaL_error(L, "deliver must return a string, a table or nil, not %s",
                          luaL_typename(L, -2));
    int value = lua_gettop(L) - 1;
    x->out = payload_arg(L, value, value + 1, "deliver", &x->out_len, &x->opcode);
    if (t == LUA_TSTRING)
        lua_pushvalue(L, value);
    lua_rawseti(L, LUA_REGISTRYINDEX, st->result_ref); /* kept alive until the next deliver */
    return 0;
}

int script_deliver(struct route *r, struct chan_msg *m, const char **p, size_t *len, int *opcode)
{
    struct lstate *st = r->script_state;
    if (!st || st->fn[HOOK_DELIVER] == LUA_NOREF) { /* passed on as a raw route would */
        route_plain_payload(m, p, len, opcode);
        return 0;
    }
    struct deliver_ctx x = {.m = m};
    route_plain_payload(m, &x.data, &x.len, NULL); /* what deliver is given */
    int prev = st->in_deliver;
    st->in_deliver = 1;
    int rc = run(st, current(st), HOOK_DELIVER, do_deliver, &x, 0);
    st->in_deliver = prev;
    if (rc < 0 || x.drop) {
        st->dropped++;
        return -1;
    }
    *p = x.out;
    *len = x.out_len;
    *opcode = x.opcode;
    return 0;
}

struct close_ctx {
    uint16_t code;
    const char *reason;
};

static int do_close(lua_State *L)
{
    struct close_ctx *x = lua_touserdata(L, 1);
    struct lstate *st = state_of(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->fn[HOOK_CLOSE]);
    lua_insert(L, 2);
    lua_pushinteger(L, x->code);
    lua_pushstring(L, x->reason ? x->reason : "");
    st->calls[HOOK_CLOSE]++;
    lua_call(L, 3, 0);
    return 0;
}

void script_closed(struct conn *c, uint16_t code, const char *reason)
{
    struct lstate *st = c->route ? c->route->script_state : NULL;
    lua_State *L = detach_client(st, c);
    if (!L)
        return;
    if (st->fn[HOOK_CLOSE] == LUA_NOREF) {
        lua_pop(L, 1);
        return;
    }
    struct close_ctx x = {code, reason};
    run(st, L, HOOK_CLOSE, do_close, &x, 1);
}

/* --- figures ------------------------------------------------------------------------------------ */

static void json_str(struct buf *out, const char *s)
{
    size_t n = strlen(s);
    char *p = buf_reserve(out, JSON_STRING_ENCODED_MAX(n));
    out->len += json_string_encode(s, n, p);
}

void script_stats_json(struct buf *out)
{
    buf_append_str(out, "\"scripts\":[");
    int first = 1;
    for (struct lstate *st = states; st; st = st->next) {
        buf_append_str(out, first ? "{\"path\":" : ",{\"path\":");
        first = 0;
        json_str(out, st->route->path);
        buf_append_str(out, ",\"script\":");
        json_str(out, st->route->script);
        buf_printf(out, ",\"loaded\":%s,\"calls\":{", st->loaded ? "true" : "false");
        for (int h = 0; h < HOOK_KINDS; h++)
            buf_printf(out, "%s\"%s\":%llu", h ? "," : "", hook_names[h],
                       (unsigned long long)st->calls[h]);
        buf_printf(out,
                   "},\"errors\":%llu,\"runaway\":%llu,\"memory_errors\":%llu,\"load_errors\":%llu,"
                   "\"reloads\":%llu,\"deliver_dropped\":%llu,\"authorize_refused\":%llu,"
                   "\"clients\":%llu,\"timers\":%llu,"
                   "\"memory\":%zu,\"memory_peak\":%zu,\"memory_limit\":%zu,\"last_error\":",
                   (unsigned long long)st->errors, (unsigned long long)st->runaway,
                   (unsigned long long)st->memory_errors, (unsigned long long)st->load_errors,
                   (unsigned long long)st->reloads, (unsigned long long)st->dropped,
                   (unsigned long long)st->authorize_refused, (unsigned long long)st->clients, (unsigned long long)st->timers_active, st->mem,
                   st->mem_peak, st->mem_limit);
        if (st->last_error[0])
            json_str(out, st->last_error);
        else
            buf_append_str(out, "null");
        buf_append(out, "}", 1);
    }
    buf_append(out, "]", 1);
}

/* A route path as a Prometheus label value. */
static void prom_label(struct buf *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            buf_printf(out, "\\%c", *s);
        else if (*s == '\n')
            buf_append_str(out, "\\n");
        else
            buf_append(out, s, 1);
    }
}

enum figure { FIG_ERRORS, FIG_RUNAWAY, FIG_MEMORY_ERRORS, FIG_LOAD_ERRORS, FIG_MEMORY, FIG_AUTHORIZE_REFUSED };

static unsigned long long figure(const struct lstate *st, enum figure f)
{
    switch (f) {
    case FIG_ERRORS: return st->errors;
    case FIG_RUNAWAY: return st->runaway;
    case FIG_MEMORY_ERRORS: return st->memory_errors;
    case FIG_LOAD_ERRORS: return st->load_errors;
    case FIG_MEMORY: return st->mem;
    case FIG_AUTHORIZE_REFUSED: return st->authorize_refused;
    }
    return 0;
}

static void prom_family(struct buf *out, const char *name, const char *type, const char *help,
                        enum figure f)
{
    buf_printf(out, "# HELP herald_script_%s %s\n# TYPE herald_script_%s %s\n", name, help, name, type);
    for (struct lstate *st = states; st; st = st->next) {
        buf_printf(out, "herald_script_%s{path=\"", name);
        prom_label(out, st->route->path);
        buf_printf(out, "\"} %llu\n", figure(st, f));
    }
}

void script_stats_prom(struct buf *out)
{
    buf_append_str(out, "# HELP herald_script_calls_total Lua hook calls, per route and hook\n"
                        "# TYPE herald_script_calls_total counter\n");
    for (struct lstate *st = states; st; st = st->next) {
        for (int h = 0; h < HOOK_KINDS; h++) {
            buf_append_str(out, "herald_script_calls_total{path=\"");
            prom_label(out, st->route->path);
            buf_printf(out, "\",hook=\"%s\"} %llu\n", hook_names[h], (unsigned long long)st->calls[h]);
        }
    }
    prom_family(out, "errors_total", "counter", "Lua hook calls that failed with an error",
                FIG_ERRORS);
    prom_family(out, "runaway_total", "counter", "Lua calls stopped for running too long",
                FIG_RUNAWAY);
    prom_family(out, "memory_errors_total", "counter", "Lua calls failed at the memory limit",
                FIG_MEMORY_ERRORS);
    prom_family(out, "load_errors_total", "counter", "Script loads (and reloads) that failed",
                FIG_LOAD_ERRORS);
    prom_family(out, "memory_bytes", "gauge", "Memory used by the route's Lua state",
                FIG_MEMORY);
    prom_family(out, "authorize_refused_total", "counter",
                "Subscribes and publishes the authorize hook refused (or failed on)",
                FIG_AUTHORIZE_REFUSED);
}
