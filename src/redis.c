/* redis.c - the Redis source (not yet implemented). */
#include "source.h"

void redis_src_configure(struct ev_loop *loop, const struct config *cfg) { (void)loop; (void)cfg; }
void redis_src_stop(void) {}
