/* server.h - the listening socket and what arrives on client connections: HTTP requests (static
 * files, POST /pub, /stats, /metrics), the WebSocket handshake, and WebSocket frames handed to
 * each connection's route. */
#ifndef HERALD_SERVER_H
#define HERALD_SERVER_H

#include <ev.h>
#include <stddef.h>

struct config;

/* Listen and serve with cfg (which must outlive the server or be replaced by server_reload).
 * Returns 0, or -1 with a one-line message in err (e.g. the port is in use). */
int server_start(struct ev_loop *loop, struct config *cfg, char *err, size_t errlen);

/* Use a newly loaded configuration for new requests and connections. */
void server_reload(struct config *cfg);

/* Stop accepting, close every WebSocket with 1001 and every idle HTTP connection, and call done
 * once all are gone or after a grace period. */
void server_shutdown(void (*done)(void));

#endif
