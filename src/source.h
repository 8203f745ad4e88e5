/* source.h - where messages come from besides clients: Redis pub/sub (redis.c) and tailed files
 * (tail.c). Each source publishes into the channel registry and reports its state in /stats. */
#ifndef HERALD_SOURCE_H
#define HERALD_SOURCE_H

#include <ev.h>
#include <stddef.h>

struct config;

/* Start (or, on reload, reconfigure) the Redis source from cfg->redis (NULL: stop it). Connection
 * problems are not errors here: the source keeps retrying and reports its state. */
void redis_src_configure(struct ev_loop *loop, const struct config *cfg);
void redis_src_stop(void);

/* Start (or, on reload, reconfigure) following cfg->tails. */
void tail_configure(struct ev_loop *loop, const struct config *cfg);
void tail_stop(void);

#endif
