/* server.h - the listening socket and what arrives on client connections: HTTP requests (static
 * files, POST /pub, /stats, /metrics), the WebSocket handshake, and WebSocket frames handed to
 * each connection's route. */
#ifndef HERALD_SERVER_H
#define HERALD_SERVER_H

#include <ev.h>
#include <stddef.h>
#include <stdint.h>

struct config;
struct conn;

/* Listen and serve with cfg (which must outlive the server or be replaced by server_reload).
 * Returns 0, or -1 with a one-line message in err (e.g. the port is in use). */
int server_start(struct ev_loop *loop, struct config *cfg, char *err, size_t errlen);

/* Use a newly loaded configuration for new requests and connections. */
void server_reload(struct config *cfg);

/* c's response (a 101 or an event stream's head) waits for Redis: subscribe it to channel name,
 * whose history Redis keeps, resuming after since of epoch ep (since -1: no resume). The response
 * goes once every such subscription is answered (with the X-Herald-Epoch, -Seq and -Recovered
 * headers of this one when raw_headers), followed by what each replays. */
void server_join(struct conn *c, const char *name, size_t len, int64_t since, const char *ep,
                 size_t ep_len, int raw_headers);

/* Stop accepting, close every WebSocket with 1001 and every idle HTTP connection, and call done
 * once all are gone or after a grace period. */
void server_shutdown(void (*done)(void));

#endif
