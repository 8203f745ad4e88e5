/* tail.c - tailed files (not yet implemented). */
#include "source.h"

void tail_configure(struct ev_loop *loop, const struct config *cfg) { (void)loop; (void)cfg; }
void tail_stop(void) {}
