/* script.c - Lua routes (not yet implemented: script routes accept nothing). */
#include "script.h"

#include "buf.h"
#include "route.h"

#include <stdio.h>

void script_init(struct ev_loop *loop) { (void)loop; }

int script_load(struct route *r, char *err, size_t errlen)
{
    snprintf(err, errlen, "%s: script routes are not implemented yet", r->script);
    return -1;
}

void script_unload(struct route *r) { (void)r; }

int script_accept(struct route *r, struct conn *c, const struct http_request *req, const char *path,
                  size_t path_len, const char **why)
{
    *why = "script routes are not implemented yet";
    return 403;
}

void script_opened(struct conn *c) { (void)c; }
void script_message(struct conn *c, const uint8_t *data, size_t len, int binary) {}
int script_deliver(struct route *r, struct chan_msg *m, const char **p, size_t *len, int *opcode) { return -1; }
void script_closed(struct conn *c, uint16_t code, const char *reason) {}
void script_stats_json(struct buf *out) { buf_append_str(out, "\"scripts\":[]"); }
void script_stats_prom(struct buf *out) { (void)out; }
