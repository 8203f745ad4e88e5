/* server.c - accepting connections, serving HTTP requests, upgrading to WebSocket, reading frames. */
#include "server.h"

#include "auth.h"
#include "buf.h"
#include "channel.h"
#include "config.h"
#include "conn.h"
#include "deflate.h"
#include "http.h"
#include "json.h"
#include "log.h"
#include "pubsub.h"
#include "route.h"
#include "script.h"
#include "source.h"
#include "static.h"
#include "tls.h"
#include "stats.h"
#include "ws.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A request whose body is still arriving: what is needed to answer it once it is complete. */
struct http_req_state {
    struct buf body;
    struct http_chunked chunked;
    int is_chunked;
    uint64_t body_left;      /* Content-Length bytes still to come */
    int keep_alive;
    int minor_version;
    size_t channel_len;
    char channel[CHAN_NAME_MAX + 1];
    char *log_target, *log_referer, *log_agent; /* copies for the access log */
};

/* A request answered once Redis has answered (c->waits->waiting): a POST /pub to a channel whose
 * history Redis keeps (the reply carries the seq), or a WebSocket handshake or an event stream
 * that subscribes to such channels (a subscription starts where Redis says the channel is: the
 * response goes once Redis has said so for each). The connection reads nothing meanwhile, so
 * pipelined requests keep their order; but a peer that hangs up is noticed (hangup), and the wait
 * lasts http_timeout at most (see wait_expired). */
enum wait_kind { WAIT_PUBLISH, WAIT_HANDSHAKE, WAIT_STREAM };
struct waiting {
    enum wait_kind kind;
    struct conn *conn;
    struct http_req_state *rs;  /* what the response and the access log need of the request */
    struct chan_pub *pub;       /* PUBLISH: the publish Redis is to number */
    ev_io hangup;               /* the socket, watched for the peer's EOF while reading is off */
    struct buf head;            /* HANDSHAKE: the 101 up to its final blank line; STREAM: all */
    struct buf extra;           /* header lines the answers add (a raw route's X-Herald-*) */
    uint32_t joins;             /* answers still to come */
    uint8_t started;            /* every join was asked: the response goes when joins is 0 */
    struct chan_join **ready;   /* answered: replayed once the response is out */
    size_t nready, cap;
    struct buf path, query;     /* HANDSHAKE: for route_open's second call */
    uint8_t has_query;
    struct buf list;            /* STREAM: its channels (list_len bytes), then the Last-Event-IDs
                                   (ids_len bytes) */
    size_t list_len, ids_len;
};

static struct ev_loop *loop;
static struct config *cfg;
static ev_io listen_io;
static ev_io tls_listen_io; /* fd -1 when there is no TLS listener */
static ev_prepare flush_prepare;
static ev_timer housekeeping;
static ev_timer shutdown_timer;
static int spare_fd = -1;
static int shutting_down;
static void (*shutdown_done)(void);
static struct buf out; /* response scratch */

static void on_readable(struct conn *c);
static void on_detach(struct conn *c, uint16_t code, const char *reason);
static void ip_release(struct conn *c);
static void wait_finish(struct conn *c);

/* --- responses --------------------------------------------------------------------------------- */

static const char *status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 301: return "Moved Permanently";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 426: return "Upgrade Required";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

/* What a response needs to know of its request; a NULL request (unparseable) closes. */
struct reply_ctx {
    const struct http_request *req;
    int keep_alive;
    int head_only;
};

static void access_log(struct conn *c, const struct http_request *req, int status, long long bytes)
{
    size_t rlen = 0, alen = 0;
    const char *ref = req ? http_header_get(req, "referer", &rlen) : NULL;
    const char *agent = req ? http_header_get(req, "user-agent", &alen) : NULL;
    log_access(conn_addr_str(c), req ? req->method : NULL, req ? req->method_len : 0,
               req ? req->target : NULL, req ? req->target_len : 0, req ? req->minor_version : 1,
               status, bytes, ref, rlen, agent, alen);
}

/* Queue a response head. extra holds whole header lines ("Name: value\r\n") or is NULL. Returns
 * whether the connection stays open after this response. */
static int respond_head(struct conn *c, const struct reply_ctx *rc, int status, const char *type,
                        size_t len, const char *extra)
{
    int keep = rc->req && rc->keep_alive && !shutting_down;
    if (status >= 400)
        stats.http_errors++;
    out.len = 0;
    buf_printf(&out, "HTTP/1.1 %d %s\r\nServer: herald\r\nContent-Length: %zu\r\n", status,
               status_text(status), len);
    if (type)
        buf_printf(&out, "Content-Type: %s\r\n", type);
    if (extra)
        buf_append_str(&out, extra);
    buf_append_str(&out, keep ? "\r\n" : "Connection: close\r\n\r\n");
    conn_queue_copy(c, out.data, out.len);
    return keep;
}

/* Log the response and, unless the connection is kept, close it once everything is written. */
static void respond_end(struct conn *c, const struct reply_ctx *rc, int status, size_t len, int keep)
{
    access_log(c, rc->req, status, rc->head_only ? 0 : (long long)len);
    if (!keep)
        conn_close_after_write(c);
}

static void respond(struct conn *c, const struct reply_ctx *rc, int status, const char *type,
                    const void *body, size_t len, const char *extra)
{
    int keep = respond_head(c, rc, status, type, len, extra);
    if (!rc->head_only)
        conn_queue_copy(c, body, len);
    respond_end(c, rc, status, len, keep);
}

static void respond_text(struct conn *c, const struct reply_ctx *rc, int status, const char *text,
                         const char *extra)
{
    char body[512];
    int n = snprintf(body, sizeof(body), "%d %s: %s\n", status, status_text(status), text);
    respond(c, rc, status, "text/plain; charset=utf-8", body, (size_t)n, extra);
}

static void respond_json_error(struct conn *c, const struct reply_ctx *rc, int status, const char *error)
{
    char quoted[JSON_STRING_ENCODED_MAX(256)];
    size_t n = strlen(error);
    if (n > 256)
        n = 256;
    size_t qlen = json_string_encode(error, n, quoted);
    char body[sizeof(quoted) + 32];
    int blen = snprintf(body, sizeof(body), "{\"error\":%.*s}\n", (int)qlen, quoted);
    respond(c, rc, status, "application/json", body, (size_t)blen, NULL);
}

/* --- endpoints ---------------------------------------------------------------------------------- */

static void serve_stats(struct conn *c, const struct reply_ctx *rc, int prometheus)
{
    struct buf body = {0};
    if (prometheus)
        stats_render_prometheus(&body);
    else
        stats_render_json(&body);
    respond(c, rc, 200, prometheus ? "text/plain; version=0.0.4; charset=utf-8" : "application/json",
            body.data, body.len, "Cache-Control: no-store\r\n");
    buf_free(&body);
}

static void serve_static(struct conn *c, const struct reply_ctx *rc, const char *path, size_t len)
{
    struct static_file f;
    int rcode = static_open(path, len, &f);
    if (rcode == 301) {
        struct buf loc = {0};
        buf_printf(&loc, "Location: %.*s/\r\n", (int)len, path);
        respond_text(c, rc, 301, "see the directory's index", loc.data);
        buf_free(&loc);
        return;
    }
    if (rcode) {
        respond_text(c, rc, rcode, rcode == 404 ? "no such file" : "not readable", NULL);
        return;
    }
    char date[64], extra[160];
    struct tm tm;
    gmtime_r(&f.mtime, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
    size_t ims_len;
    const char *ims = http_header_get(rc->req, "if-modified-since", &ims_len);
    if (ims && ims_len == strlen(date) && memcmp(ims, date, ims_len) == 0) {
        close(f.fd);
        snprintf(extra, sizeof(extra), "Last-Modified: %s\r\n", date);
        int keep = respond_head(c, rc, 304, NULL, 0, extra);
        respond_end(c, rc, 304, 0, keep);
        return;
    }
    size_t size = (size_t)f.size;
    struct block *b = NULL;
    if (!rc->head_only) {
        b = block_new(size);
        while (b->len < size) {
            ssize_t n = read(f.fd, b->data + b->len, size - b->len);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            b->len += (size_t)n;
        }
    }
    close(f.fd);
    if (b && b->len != size) {
        block_unref(b);
        respond_text(c, rc, 500, "the file could not be read", NULL);
        return;
    }
    snprintf(extra, sizeof(extra), "Last-Modified: %s\r\nCache-Control: no-cache\r\n", date);
    int keep = respond_head(c, rc, 200, f.content_type, size, extra);
    if (b) {
        conn_queue_block(c, b, 0, size);
        block_unref(b);
    }
    respond_end(c, rc, 200, size, keep);
}

/* What the access log needs of a request, copied to outlive it. */
static struct http_req_state *rs_for_log(const struct http_request *req)
{
    struct http_req_state *rs = xcalloc(1, sizeof(*rs));
    rs->minor_version = req->minor_version;
    rs->log_target = xstrndup(req->target, req->target_len);
    size_t n;
    const char *h = http_header_get(req, "referer", &n);
    rs->log_referer = h ? xstrndup(h, n) : NULL;
    h = http_header_get(req, "user-agent", &n);
    rs->log_agent = h ? xstrndup(h, n) : NULL;
    return rs;
}

static void rs_free(struct http_req_state *rs)
{
    if (!rs)
        return;
    buf_free(&rs->body);
    free(rs->log_target);
    free(rs->log_referer);
    free(rs->log_agent);
    free(rs);
}

static void req_state_free(struct conn *c)
{
    rs_free(c->req);
    c->req = NULL;
}

/* The request rs stands for, for a response and the access log (valid while rs is). */
static void rs_request(const struct http_req_state *rs, const char *method, struct http_request *req)
{
    memset(req, 0, sizeof(*req));
    req->method = method;
    req->method_len = strlen(method);
    req->target = rs->log_target;
    req->target_len = strlen(rs->log_target);
    req->minor_version = rs->minor_version;
    if (rs->log_referer)
        req->headers[req->num_headers++] = (struct http_header){"referer", 7, rs->log_referer,
                                                                strlen(rs->log_referer)};
    if (rs->log_agent)
        req->headers[req->num_headers++] = (struct http_header){"user-agent", 10, rs->log_agent,
                                                                strlen(rs->log_agent)};
}

/* The answer to a publish: 200 with its seq, or 503 when it could not be published. */
static void publish_respond(struct conn *c, const struct reply_ctx *rc, const char *channel,
                            size_t channel_len, uint64_t seq, size_t subscribers, const char *err)
{
    if (err) {
        char msg[300];
        snprintf(msg, sizeof(msg), "cannot publish to this channel now: %s", err);
        respond_json_error(c, rc, 503, msg);
        return;
    }
    char reply[CHAN_NAME_MAX + 96];
    int n = snprintf(reply, sizeof(reply), "{\"channel\":\"%.*s\",\"seq\":%llu,\"subscribers\":%zu}\n",
                     (int)channel_len, channel, (unsigned long long)seq, subscribers);
    respond(c, rc, 200, "application/json", reply, (size_t)n, NULL);
}

struct publish_now {
    struct conn *conn;
    const struct reply_ctx *rc;
    const char *channel;
    size_t channel_len;
    struct waiting *w; /* set by the callback's caller once the answer waits for Redis */
};

static void waiting_free(struct waiting *w)
{
    ev_io_stop(loop, &w->hangup);
    rs_free(w->rs);
    buf_free(&w->head);
    buf_free(&w->extra);
    buf_free(&w->path);
    buf_free(&w->query);
    buf_free(&w->list);
    free(w->ready);
    free(w);
}

/* The socket of a connection whose answer waits is readable: at EOF or on an error the peer is
 * gone, and the connection is closed now (which cancels what it waited for and frees w: libev lets
 * a stopped watcher go in its own callback). Input is left where it is, for after the answer, and
 * no longer watched: the wait is bounded anyway. */
static void on_wait_readable(struct ev_loop *l, ev_io *io, int revents)
{
    struct waiting *w = io->data;
    if (w->conn->tls) {
        /* Bytes on a TLS socket may be the close_notify: look at the records they make. */
        if (tls_peer_closed(w->conn->tls))
            conn_close_now(w->conn);
        else if (tls_pending(w->conn->tls))
            ev_io_stop(l, io); /* data, taken into the session: conn_set_awaiting wakes it */
        return;
    }
    char byte;
    ssize_t n = recv(io->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n > 0) {
        ev_io_stop(l, io);
        return;
    }
    conn_close_now(w->conn);
}

/* c's answer waits for Redis (w, which c's waits now own): c reads nothing until it is out, is
 * closed if the peer hangs up meanwhile, and is given up after http_timeout (on_timeout). */
static void wait_begin(struct conn *c, struct waiting *w)
{
    w->conn = c;
    conn_waits(c)->waiting = w;
    conn_set_awaiting(c, 1);
    conn_set_timeout_class(c, CONN_TO_HTTP);
    ev_io_init(&w->hangup, on_wait_readable, c->io.fd, EV_READ);
    w->hangup.data = w;
    ev_io_start(loop, &w->hangup);
}

/* A publish's outcome, at once (arg: struct publish_now) or from Redis (arg: struct waiting). */
static void published_now(void *arg, uint64_t seq, size_t subscribers, const char *err)
{
    struct publish_now *p = arg;
    publish_respond(p->conn, p->rc, p->channel, p->channel_len, seq, subscribers, err);
}

static void published_later(void *arg, uint64_t seq, size_t subscribers, const char *err)
{
    struct waiting *w = arg;
    struct conn *c = w->conn;
    struct http_request req;
    rs_request(w->rs, "POST", &req);
    struct reply_ctx rc = {.req = &req, .keep_alive = w->rs->keep_alive};
    if (c->waits)
        c->waits->waiting = NULL;
    publish_respond(c, &rc, w->rs->channel, w->rs->channel_len, seq, subscribers, err);
    waiting_free(w);
    conn_set_awaiting(c, 0); /* pipelined requests go on */
}

/* Publish a complete POST /pub body and answer (now, or once Redis has numbered it: then rs, the
 * request's state, is kept for the answer and *kept set). */
static void finish_publish(struct conn *c, const struct reply_ctx *rc, struct http_req_state *rs,
                           int *kept)
{
    struct chan_msg m = {.channel = rs->channel, .channel_len = rs->channel_len,
                         .data = rs->body.data ? rs->body.data : "", .len = rs->body.len, .utf8 = -1,
                         .json = -1};
    struct publish_now now = {c, rc, rs->channel, rs->channel_len, NULL};
    struct chan_pub *pending = NULL;
    *kept = 0;
    if (chan_publish_cb(&m, c, published_now, &now, &pending) == 0) {
        struct waiting *w = xcalloc(1, sizeof(*w));
        w->kind = WAIT_PUBLISH;
        w->rs = rs;
        w->pub = pending;
        buf_free(&rs->body); /* Redis has it */
        chan_pub_rebind(pending, published_later, w);
        *kept = 1;
        wait_begin(c, w);
    }
}

/* The body of the request in c->req is complete: publish it. The access log gets the copies made
 * when the head was parsed. */
static void body_complete(struct conn *c)
{
    struct http_req_state *rs = c->req;
    struct http_request req;
    rs_request(rs, "POST", &req);
    struct reply_ctx rc = {.req = &req, .keep_alive = rs->keep_alive};
    c->req = NULL; /* responding may close; the state is freed here either way (or kept waiting) */
    int kept;
    finish_publish(c, &rc, rs, &kept);
    if (!kept)
        rs_free(rs);
    conn_set_timeout_class(c, CONN_TO_HTTP);
}

/* Feed body bytes of the request in progress. Returns the bytes used from data, or -1 when the
 * connection was answered with an error and is closing. */
static ssize_t feed_body(struct conn *c, char *data, size_t len)
{
    struct http_req_state *rs = c->req;
    conn_touch(c); /* a body in progress is activity; the whole body is bounded by max_message */
    if (!rs->is_chunked) {
        size_t take = len < rs->body_left ? len : (size_t)rs->body_left;
        buf_append(&rs->body, data, take);
        rs->body_left -= take;
        if (!rs->body_left)
            body_complete(c);
        return (ssize_t)take;
    }
    size_t dlen = len, rest = 0;
    int rcode = http_chunked_decode(&rs->chunked, data, &dlen, &rest);
    struct reply_ctx rc = {.req = NULL};
    if (rcode < 0) {
        req_state_free(c);
        respond_json_error(c, &rc, 400, "malformed chunked body");
        return -1;
    }
    if (rs->body.len + dlen > cfg->max_message) {
        req_state_free(c);
        stats.messages_too_big++;
        respond_json_error(c, &rc, 413, "message is larger than max_message");
        return -1;
    }
    buf_append(&rs->body, data, dlen);
    if (rcode == 1) {
        body_complete(c);
        /* The decoder left the bytes after the body right after the decoded data; parsing goes
         * on from len - rest, so they are moved there. */
        memmove(data + len - rest, data + dlen, rest);
        return (ssize_t)(len - rest);
    }
    return (ssize_t)len;
}

/* The token a request carries: "Authorization: Bearer <token>", else ?token= (decoded into buf,
 * which has room for cap bytes). NULL when none. */
static const char *request_token(const struct http_request *req, char *buf, size_t cap, size_t *len)
{
    const char *auth = http_header_get(req, "authorization", len);
    if (auth && *len > 7 && strncasecmp(auth, "Bearer ", 7) == 0) {
        *len -= 7;
        return auth + 7;
    }
    ssize_t n = req->query ? http_query_get(req->query, req->query_len, "token", buf, cap) : -1;
    if (n < 0)
        return NULL;
    *len = (size_t)n;
    return buf;
}

/* May this request publish to channel? With a publish token configured, the request must carry
 * it, or a signed token granting the channel. */
static int publish_allowed(const struct http_request *req, const char *channel, size_t channel_len)
{
    if (!cfg->publish_token)
        return 1;
    char buf[1024];
    size_t len;
    const char *token = request_token(req, buf, sizeof(buf), &len);
    size_t tlen = strlen(cfg->publish_token);
    if (token && len == tlen && CRYPTO_memcmp(token, cfg->publish_token, tlen) == 0)
        return 1;
    if (token && cfg->jwt_secret) {
        const char *why;
        struct auth_grants *g = auth_verify(token, len, cfg->jwt_secret, ev_now(loop), &why);
        int ok = auth_allows(g, AUTH_PUBLISH, channel, channel_len);
        auth_free(g);
        if (ok)
            return 1;
    }
    stats.auth_refused++;
    return 0;
}

/* May this request open route r (a WebSocket handshake, an event stream)? Its Origin must be one
 * of the route's, when the route lists some; a signed token it carries must be valid (its grants
 * are kept in c->grants), and one is needed where the route requires it. Returns 0, or the status
 * to refuse it with and *why. */
static int open_refused(struct conn *c, const struct http_request *req, const struct route *r,
                        const char **why)
{
    size_t len;
    const char *origin = http_header_get(req, "origin", &len);
    if (origin && r->norigins) {
        size_t i = 0;
        while (i < r->norigins && !(strlen(r->origins[i]) == len &&
                                    strncasecmp(r->origins[i], origin, len) == 0))
            i++;
        if (i == r->norigins) {
            stats.auth_refused++;
            *why = "this origin may not open this route";
            return 403;
        }
    }
    char buf[1024];
    const char *token = cfg->jwt_secret ? request_token(req, buf, sizeof(buf), &len) : NULL;
    if (token) {
        auth_free(c->grants); /* from an earlier request on this connection that was refused */
        c->grants = auth_verify(token, len, cfg->jwt_secret, ev_now(loop), why);
        if (!c->grants) {
            stats.auth_refused++;
            return 401;
        }
    } else if (r->require_token) {
        stats.auth_refused++;
        *why = "a signed token is required (?token= or Authorization: Bearer)";
        return 401;
    }
    return 0;
}

static void handle_publish(struct conn *c, const struct reply_ctx *rc, const struct http_request *req,
                           const char *channel, size_t channel_len)
{
    const char *why;
    if (req->method_len != 4 || memcmp(req->method, "POST", 4) != 0) {
        respond_text(c, rc, 405, "publish with POST", "Allow: POST\r\n");
        return;
    }
    if (!chan_name_valid(channel, channel_len, &why)) {
        respond_json_error(c, rc, 400, why);
        return;
    }
    if (!publish_allowed(req, channel, channel_len)) {
        respond_json_error(c, rc, 401, "a valid \"Authorization: Bearer <token>\" header is required");
        return;
    }
    if (!req->chunked && req->content_length < 0) {
        respond_json_error(c, rc, 411, "a Content-Length or chunked body is required");
        return;
    }
    if (req->content_length > (int64_t)cfg->max_message) {
        stats.messages_too_big++;
        struct reply_ctx closing = *rc;
        closing.keep_alive = 0; /* the body will not be read */
        respond_json_error(c, &closing, 413, "message is larger than max_message");
        return;
    }
    size_t expect_len;
    const char *expect = http_header_get(req, "expect", &expect_len);
    if (expect && expect_len == 12 && strncasecmp(expect, "100-continue", 12) == 0)
        conn_queue_copy(c, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    struct http_req_state *rs = rs_for_log(req);
    rs->is_chunked = req->chunked;
    rs->body_left = req->chunked ? 0 : (uint64_t)req->content_length;
    rs->keep_alive = rc->keep_alive;
    memcpy(rs->channel, channel, channel_len);
    rs->channel_len = channel_len;
    if (!req->chunked)
        buf_reserve(&rs->body, rs->body_left ? (size_t)rs->body_left : 1);
    else
        http_chunked_init(&rs->chunked);
    c->req = rs;
    if (!req->chunked && !rs->body_left)
        body_complete(c);
}

/* --- the WebSocket handshake -------------------------------------------------------------------- */

static void handshake(struct conn *c, const struct reply_ctx *rc, const struct http_request *req,
                      struct route *r, const char *path, size_t path_len)
{
    size_t len;
    const char *v;
    if (req->method_len != 3 || memcmp(req->method, "GET", 3) != 0) {
        respond_text(c, rc, 400, "a WebSocket handshake must be a GET", NULL);
        return;
    }
    if (req->minor_version < 1) {
        respond_text(c, rc, 400, "a WebSocket handshake needs HTTP/1.1", NULL);
        return;
    }
    if (!http_header_get(req, "host", &len)) {
        respond_text(c, rc, 400, "missing Host header", NULL);
        return;
    }
    v = http_header_get(req, "connection", &len);
    if (!v || !http_has_token(v, len, "upgrade")) {
        respond_text(c, rc, 400, "Connection header must include Upgrade", NULL);
        return;
    }
    v = http_header_get(req, "sec-websocket-version", &len);
    if (!v || len != 2 || memcmp(v, "13", 2) != 0) {
        respond_text(c, rc, 426, "only WebSocket version 13 is supported",
                     "Sec-WebSocket-Version: 13\r\n");
        return;
    }
    size_t key_len;
    const char *key = http_header_get(req, "sec-websocket-key", &key_len);
    if (!key || !ws_key_valid(key, key_len)) {
        respond_text(c, rc, 400, "missing or invalid Sec-WebSocket-Key", NULL);
        return;
    }
    if (req->content_length > 0 || req->chunked) {
        respond_text(c, rc, 400, "a WebSocket handshake has no body", NULL);
        return;
    }
    const char *why = NULL;
    int status = open_refused(c, req, r, &why);
    if (status) {
        respond_text(c, rc, status, why, NULL);
        return;
    }
    struct buf headers = {0};
    status = route_accept(r, c, req, path, path_len, &headers, &why);
    if (status) {
        buf_free(&headers);
        respond_text(c, rc, status, why ? why : "refused", NULL);
        return;
    }
    /* permessage-deflate, where the route allows it: the first acceptable offer, whichever of the
     * request's Sec-WebSocket-Extensions headers it is in. */
    struct pmd_params pmd = {0};
    for (size_t i = 0; r->deflate && !pmd.server_bits && i < req->num_headers; i++) {
        const struct http_header *h = &req->headers[i];
        char ext[PMD_RESPONSE_MAX];
        if (h->name_len == 24 && strncasecmp(h->name, "sec-websocket-extensions", 24) == 0 &&
            pmd_negotiate(h->value, h->value_len, &pmd, ext, sizeof(ext)))
            buf_printf(&headers, "Sec-WebSocket-Extensions: %s\r\n", ext);
    }
    char accept[29];
    ws_accept_key(key, key_len, accept);
    out.len = 0;
    buf_printf(&out,
               "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Accept: %s\r\n%.*s\r\n",
               accept, (int)headers.len, headers.data ? headers.data : "");
    buf_free(&headers);
    struct waiting *w = NULL;
    if (route_waits(r, path, path_len, req->query, req->query_len)) {
        /* The 101 waits for Redis to say where the channels are; the connection reads nothing
         * meanwhile. route_open joins them now, and subscribes the rest once the 101 is out. */
        w = xcalloc(1, sizeof(*w));
        w->kind = WAIT_HANDSHAKE;
        w->rs = rs_for_log(req);
        buf_append(&w->head, out.data, out.len - 2);
        buf_append(&w->path, path, path_len);
        if (req->query) {
            w->has_query = 1;
            buf_append(&w->query, req->query, req->query_len);
        }
        wait_begin(c, w);
    } else {
        conn_queue_copy(c, out.data, out.len);
        access_log(c, req, 101, 0);
    }
    c->state = CONN_WS;
    c->route = route_ref(r);
    ws_parser_init(&c->wp, WS_ROLE_SERVER, cfg->max_message);
    if (pmd.server_bits) {
        c->pmd = pmd;
        c->wp.deflate = 1;
        pmd_stats.websockets++;
    }
    if (!w)
        conn_set_timeout_class(c, CONN_TO_WS); /* else once the 101 is out */
    stats.websockets++;
    c->is_ws = 1;
    route_open(r, c, path, path_len, req->query, req->query_len);
    if (w && CONN_WAIT(c, waiting) == w) {
        w->started = 1;
        wait_finish(c);
    }
}

/* --- responses that wait for Redis ----------------------------------------------------------- */

static void sse_subscribe_all(struct conn *c, struct route *r, const char *list, size_t list_len,
                              const char *ids, size_t ids_len);

/* Every join of c's waiting response is answered: send it, then what the joins replay, then
 * subscribe the channels numbered here. */
static void wait_finish(struct conn *c)
{
    struct waiting *w = CONN_WAIT(c, waiting);
    if (!w || !w->started || w->joins)
        return;
    c->waits->waiting = NULL;
    struct http_request req;
    if (w->kind == WAIT_HANDSHAKE) {
        buf_append(&w->head, w->extra.data, w->extra.len);
        buf_append(&w->head, "\r\n", 2);
        rs_request(w->rs, "GET", &req);
        conn_queue_copy(c, w->head.data, w->head.len);
        access_log(c, &req, 101, 0);
    } else {
        rs_request(w->rs, "GET", &req);
        conn_queue_copy(c, w->head.data, w->head.len);
        access_log(c, &req, 200, 0);
    }
    conn_set_awaiting(c, 0);
    conn_set_timeout_class(c, CONN_TO_WS);
    for (size_t i = 0; i < w->nready; i++)
        chan_join_emit(w->ready[i]);
    if (w->kind == WAIT_HANDSHAKE)
        route_open(c->route, c, w->path.data, w->path.len, w->has_query ? w->query.data : NULL,
                   w->query.len);
    else
        sse_subscribe_all(c, c->route, w->list.data, w->list_len, w->list.data + w->list_len,
                          w->ids_len);
    waiting_free(w);
}

static void wait_joined(struct conn *c, struct chan_join *j, const struct chan_join_result *r, void *arg)
{
    struct waiting *w = CONN_WAIT(c, waiting);
    if (!w)
        return; /* cannot be: the subscription goes with the connection */
    if (arg && !r->err) {
        buf_printf(&w->extra, "X-Herald-Epoch: %s\r\nX-Herald-Seq: %llu\r\n", r->epoch ? r->epoch : "",
                   (unsigned long long)r->seq);
        if (r->recovered >= 0)
            buf_printf(&w->extra, "X-Herald-Recovered: %s\r\n", r->recovered ? "true" : "false");
    }
    if (j) {
        if (w->nready == w->cap) {
            w->cap = w->cap ? 2 * w->cap : 4;
            w->ready = xrealloc(w->ready, w->cap * sizeof(*w->ready));
        }
        w->ready[w->nready++] = j;
    }
    w->joins--;
    wait_finish(c);
}

/* Redis has not answered c's waiting request in http_timeout: a publish is answered as failed
 * (it may have been published), and a handshake or an event stream is refused with 503 (its
 * subscriptions go, and the connection closes once the answer is out). */
static void wait_expired(struct conn *c)
{
    struct waiting *w = c->waits->waiting;
    c->waits->waiting = NULL;
    struct http_request req;
    rs_request(w->rs, w->kind == WAIT_PUBLISH ? "POST" : "GET", &req);
    if (w->kind == WAIT_PUBLISH) {
        struct reply_ctx rc = {.req = &req, .keep_alive = w->rs->keep_alive};
        chan_pub_cancel(w->pub);
        publish_respond(c, &rc, w->rs->channel, w->rs->channel_len, 0, 0,
                        "Redis did not answer in time (the message may have been published)");
        conn_touch(c); /* a kept connection is idle from now */
    } else {
        struct reply_ctx rc = {.req = &req};
        respond_text(c, &rc, 503, "Redis, which keeps the history of these channels, did not answer "
                     "in time", "Retry-After: 5\r\n");
        on_detach(c, WS_CLOSE_ABNORMAL, "");
    }
    waiting_free(w);
    conn_set_awaiting(c, 0); /* requests pipelined after a publish go on */
}

void server_join(struct conn *c, const char *name, size_t len, int64_t since, const char *ep,
                 size_t ep_len, int raw_headers)
{
    struct waiting *w = CONN_WAIT(c, waiting);
    struct chan_join_result now;
    int rc = chan_subscribe_from(c, name, len, since, ep, ep_len, 1, wait_joined,
                                 raw_headers ? (void *)1 : NULL, &now);
    if (rc == CHAN_JOINING)
        w->joins++;
    else if (rc >= 0 && raw_headers && now.epoch) { /* numbered here after all */
        w->joins++;
        wait_joined(c, NULL, &now, (void *)1);
    }
}

/* --- Server-Sent Events ------------------------------------------------------------------------- */

struct sse_ctx {
    struct route *r;
    struct conn *c;
    const char *why;
    int status;
    int subscribe; /* second pass: subscribe rather than check */
    const char *ids;  /* Last-Event-IDs, comma-separated epoch:channel:seq; NULL when none */
    size_t ids_len;
    int waiting; /* the head waits: join the channels Redis numbers, only */
};

/* Find, among ids (comma-separated Last-Event-IDs, epoch:channel:seq), the one of channel name:
 * 1 with its seq and epoch, or 0 when there is none (or it is malformed: the stream then goes on
 * live for that channel). */
static int sse_find_id(const char *ids, size_t ids_len, const char *name, size_t len, int64_t *since,
                       const char **ep, size_t *ep_len)
{
    size_t start = 0;
    for (size_t i = 0; i <= ids_len; i++) {
        if (i < ids_len && ids[i] != ',')
            continue;
        const char *id = ids + start;
        size_t idlen = i - start;
        start = i + 1;
        const char *c1 = memchr(id, ':', idlen), *c2 = NULL;
        for (const char *p = id + idlen; c1 && p-- > c1;)
            if (*p == ':') {
                c2 = p;
                break;
            }
        if (!c1 || !c2 || c2 == c1 || (size_t)(c2 - c1 - 1) != len || memcmp(c1 + 1, name, len) != 0)
            continue;
        int64_t v = pubsub_seq_parse(c2 + 1, (size_t)(id + idlen - c2 - 1));
        if (v < 0)
            return 0;
        *since = v;
        *ep = id;
        *ep_len = (size_t)(c1 - id);
        return 1;
    }
    return 0;
}

static int sse_numbered(const char *name, size_t len, void *arg)
{
    return len && chan_numbered_elsewhere(name, len);
}

static int sse_channel(const char *name, size_t len, void *arg)
{
    struct sse_ctx *x = arg;
    if (!len)
        return 0; /* /sse/?channels=... has an empty path part */
    if (x->subscribe) {
        /* A channel a Last-Event-ID names replays what came after it (from Redis, when it keeps
         * the channel's history: first, before the head goes). */
        int64_t since = -1;
        const char *ep = NULL;
        size_t ep_len = 0;
        int resume = x->ids && sse_find_id(x->ids, x->ids_len, name, len, &since, &ep, &ep_len);
        if (x->waiting) {
            if (chan_numbered_elsewhere(name, len))
                server_join(x->c, name, len, since, ep, ep_len, 0);
            return 0;
        }
        struct chan_join_result now;
        int rc = chan_subscribe_from(x->c, name, len, since, ep, ep_len, 1, NULL, NULL, &now);
        if (resume && rc == CHAN_JOINED && now.recovered == 1)
            chan_replay(x->c, name, len, (uint64_t)since);
        return 0;
    }
    if (!chan_name_valid(name, len, &x->why)) {
        x->status = 400;
        return 1;
    }
    if (!route_allows(x->r, x->c, AUTH_SUBSCRIBE, name, len, &x->why)) {
        if (!x->why)
            x->why = "not allowed to subscribe to this channel";
        x->status = 403;
        return 1;
    }
    return 0;
}

static int each_name(const char *list, size_t len, int (*fn)(const char *, size_t, void *), void *arg)
{
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || list[i] == ',') {
            if (fn(list + start, i - start, arg))
                return 1;
            start = i + 1;
        }
    }
    return 0;
}

/* GET /sse/<channel>[?channels=a,b]: an event stream of the channels' messages. A Last-Event-ID
 * (header, or ?last_event_id= for a first connection) of the form epoch:channel:seq resumes that
 * channel from its history; several ids, comma-separated, resume several channels. */
static void serve_sse(struct conn *c, const struct reply_ctx *rc, const struct http_request *req,
                      struct route *r, const char *path, size_t path_len)
{
    if (req->method_len != 3 || memcmp(req->method, "GET", 3) != 0) {
        respond_text(c, rc, 405, "event streams are read with GET", "Allow: GET\r\n");
        return;
    }
    const char *why = NULL;
    int status = open_refused(c, req, r, &why);
    if (status) {
        respond_text(c, rc, status, why, NULL);
        return;
    }
    struct buf list = {0};
    if (path_len > r->path_len)
        buf_append(&list, path + r->path_len, path_len - r->path_len);
    if (req->query) {
        char *more = xmalloc(req->query_len + 1);
        ssize_t n = http_query_get(req->query, req->query_len, "channels", more, req->query_len + 1);
        if (n > 0) {
            buf_append(&list, ",", 1);
            buf_append(&list, more, (size_t)n);
        }
        free(more);
    }
    struct sse_ctx x = {.r = r, .c = c};
    if (list.len == 0 || (list.len == 1 && list.data[0] == ','))
        x.status = 400, x.why = "name a channel: /sse/<channel> or ?channels=a,b";
    else
        each_name(list.data, list.len, sse_channel, &x);
    if (x.status) {
        buf_free(&list);
        script_refused(c, r);
        respond_text(c, rc, x.status, x.why, NULL);
        return;
    }
    out.len = 0;
    buf_append_str(&out, "HTTP/1.1 200 OK\r\nServer: herald\r\nContent-Type: text/event-stream\r\n"
                         "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
    size_t olen;
    const char *origin = http_header_get(req, "origin", &olen);
    if (origin && r->norigins)
        buf_printf(&out, "Access-Control-Allow-Origin: %.*s\r\nVary: Origin\r\n", (int)olen, origin);
    else if (!r->norigins)
        buf_append_str(&out, "Access-Control-Allow-Origin: *\r\n");
    buf_printf(&out, "\r\nretry: 2000\n: herald epoch %s\n\n", chan_epoch());
    /* Resume: epoch:channel:seq, or a comma-separated list of such ids, one per channel (an
     * EventSource's own Last-Event-ID names only the channel whose event came last). */
    size_t idlen = 0;
    const char *id = http_header_get(req, "last-event-id", &idlen);
    char *ids = NULL;
    if (!id && req->query) {
        ids = xmalloc(req->query_len + 1);
        ssize_t n = http_query_get(req->query, req->query_len, "last_event_id", ids, req->query_len + 1);
        id = ids;
        idlen = n > 0 ? (size_t)n : 0;
    }
    x.ids = id && idlen ? id : NULL;
    x.ids_len = idlen;
    c->state = CONN_SSE;
    c->route = route_ref(r);
    conn_set_timeout_class(c, CONN_TO_WS);
    stats.sse_streams++;
    c->is_ws = 2; /* counted in sse_streams */
    if (each_name(list.data, list.len, sse_numbered, NULL)) {
        /* Channels whose history Redis keeps: the stream starts once Redis has said where each
         * is, so that nothing published after the head is missed. */
        struct waiting *w = xcalloc(1, sizeof(*w));
        w->kind = WAIT_STREAM;
        w->rs = rs_for_log(req);
        buf_append(&w->head, out.data, out.len);
        buf_append(&w->list, list.data, list.len);
        w->list_len = list.len;
        if (x.ids) {
            buf_append(&w->list, x.ids, x.ids_len);
            w->ids_len = x.ids_len;
        }
        wait_begin(c, w);
        x.waiting = 1;
        x.subscribe = 1;
        each_name(list.data, list.len, sse_channel, &x);
        free(ids);
        buf_free(&list);
        if (CONN_WAIT(c, waiting) == w) {
            w->started = 1;
            wait_finish(c);
        }
        return;
    }
    conn_queue_copy(c, out.data, out.len);
    access_log(c, req, 200, 0);
    sse_subscribe_all(c, r, list.data, list.len, x.ids, x.ids_len);
    free(ids);
    buf_free(&list);
}

static void sse_subscribe_all(struct conn *c, struct route *r, const char *list, size_t list_len,
                              const char *ids, size_t ids_len)
{
    struct sse_ctx x = {.r = r, .c = c, .subscribe = 1, .ids = ids_len ? ids : NULL, .ids_len = ids_len};
    each_name(list, list_len, sse_channel, &x);
}

/* --- HTTP requests ------------------------------------------------------------------------------ */

static void handle_request(struct conn *c, const struct http_request *req)
{
    struct reply_ctx rc = {.req = req, .keep_alive = req->keep_alive};
    stats.http_requests++;
    size_t hosts = 0;
    for (size_t i = 0; i < req->num_headers; i++)
        hosts += req->headers[i].name_len == 4 && strncasecmp(req->headers[i].name, "host", 4) == 0;
    if (req->minor_version >= 1 ? hosts != 1 : hosts > 1) {
        /* RFC 9112 3.2: exactly one Host in HTTP/1.1. */
        respond_text(c, &rc, 400, "an HTTP/1.1 request needs exactly one Host header", NULL);
        return;
    }
    rc.head_only = req->method_len == 4 && memcmp(req->method, "HEAD", 4) == 0;
    char *path = xmalloc(req->path_len + 1);
    ssize_t plen = http_path_decode(req->path, req->path_len, path);
    if (plen < 0) {
        respond_text(c, &rc, 400, "malformed path", NULL);
        goto done;
    }
    path[plen] = 0;
    size_t len;
    const char *upgrade = http_header_get(req, "upgrade", &len);
    int wants_ws = upgrade && http_has_token(upgrade, len, "websocket");
    struct route *r = route_match(cfg->routes, cfg->nroutes, path, (size_t)plen);
    for (size_t i = 0; !r && i < cfg->nroutes; i++) {
        /* An event stream route also answers at its bare path, /sse/ or /sse, for ?channels= */
        struct route *s = cfg->routes[i];
        if (s->kind == ROUTE_SSE && (size_t)plen + 1 >= s->path_len && (size_t)plen <= s->path_len &&
            memcmp(path, s->path, (size_t)plen) == 0)
            r = s;
    }
    if (r && r->kind == ROUTE_SSE) {
        if (wants_ws)
            respond_text(c, &rc, 400, "this is an event stream: GET it without upgrading", NULL);
        else
            serve_sse(c, &rc, req, r, path, (size_t)plen);
        goto done;
    }
    if (r) {
        if (wants_ws)
            handshake(c, &rc, req, r, path, (size_t)plen);
        else
            respond_text(c, &rc, 426, "this is a WebSocket endpoint",
                         "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n");
        goto done;
    }
    if (wants_ws) {
        respond_text(c, &rc, 404, "no WebSocket route at this path", NULL);
        goto done;
    }
    if (req->content_length > 0 || req->chunked) {
        if (plen >= 5 && memcmp(path, "/pub/", 5) == 0) {
            handle_publish(c, &rc, req, path + 5, (size_t)plen - 5);
            goto done;
        }
        rc.keep_alive = 0; /* the body is not read */
    }
    if (plen >= 5 && memcmp(path, "/pub/", 5) == 0) {
        handle_publish(c, &rc, req, path + 5, (size_t)plen - 5);
        goto done;
    }
    int is_get = (req->method_len == 3 && memcmp(req->method, "GET", 3) == 0) || rc.head_only;
    if (!is_get) {
        respond_text(c, &rc, 405, "only GET and HEAD are served here", "Allow: GET, HEAD\r\n");
        goto done;
    }
    if (strcmp(path, "/stats") == 0)
        serve_stats(c, &rc, 0);
    else if (strcmp(path, "/metrics") == 0)
        serve_stats(c, &rc, 1);
    else if (strcmp(path, "/pub") == 0 || strcmp(path, "/pub/") == 0)
        respond_json_error(c, &rc, 400, "publish to /pub/<channel>");
    else
        serve_static(c, &rc, path, (size_t)plen);
done:
    free(path);
}

/* Parse and serve requests from data; returns the bytes used. Stops early when the connection
 * becomes a WebSocket or starts closing. */
static size_t process_http(struct conn *c, char *data, size_t len)
{
    size_t off = 0;
    while (off < len && c->state == CONN_HTTP && !c->awaiting) {
        if (!c->req && c->q_bytes > conn_get_limits()->send_queue) {
            /* Pipelining faster than it reads the answers: serve the rest once they are out. */
            conn_pause_reading(c);
            break;
        }
        if (c->req) {
            ssize_t used = feed_body(c, data + off, len - off);
            if (used < 0)
                return len;
            off += (size_t)used;
            continue;
        }
        struct http_request req;
        struct http_limits lim = {.max_head = cfg->max_head, .max_headers = cfg->max_headers};
        int rcode = http_parse_request(data + off, len - off, &lim, &req);
        if (rcode == 0)
            break;
        if (rcode < 0) {
            struct reply_ctx rc = {.req = NULL};
            if (rcode == -414 || rcode == -431)
                stats.heads_too_big++;
            respond_text(c, &rc, -rcode, "malformed or oversized request", NULL);
            return len;
        }
        off += (size_t)rcode;
        /* Only a whole request renews the idle timer, so a client trickling a header byte by
         * byte (slowloris) is cut off after http_timeout. */
        conn_touch(c);
        handle_request(c, &req);
    }
    return off;
}

/* --- WebSocket frames --------------------------------------------------------------------------- */

/* Inflate a piece of a compressed message into c->message, which holds it whole once inflated.
 * The inflater is made at the connection's first compressed message, so connections that never
 * send one hold no zlib state. Returns 0, or -1 when the connection was failed (invalid data,
 * invalid UTF-8, or more than max_message once inflated, which is caught before it is all out). */
static int ws_inflate_chunk(struct conn *c, const struct ws_event *ev)
{
    if (!c->inflater)
        c->inflater = pmd_inflater_new(c->pmd.client_no_context_takeover);
    const char *why;
    int code = pmd_inflate(c->inflater, ev->data, ev->len, ev->fin, ev->opcode == WS_OP_TEXT, c->message,
                           cfg->max_message, &why);
    if (!code)
        return 0;
    buf_free(c->message);
    free(c->message);
    c->message = NULL;
    stats.protocol_errors++;
    if (code == WS_CLOSE_TOO_BIG)
        stats.messages_too_big++;
    log_debug("conn %llu: %s (closing with %d)", (unsigned long long)c->id, why, code);
    /* Failed, as a parser error fails it: the rest of the input is not read, and the connection
     * ends once the close frame is out rather than waiting for the client's. */
    c->read_shut = 1;
    conn_ws_close(c, (uint16_t)code, why);
    return -1;
}

static void ws_message_chunk(struct conn *c, const struct ws_event *ev)
{
    if (c->close_sent)
        return; /* closing: data is no longer read, only the peer's close frame */
    if (ev->fin && !c->message && !ev->compressed) {
        route_message(c, ev->data, ev->len, ev->opcode == WS_OP_BINARY);
        return;
    }
    if (!c->message)
        c->message = xcalloc(1, sizeof(*c->message));
    if (!ev->compressed)
        buf_append(c->message, ev->data, ev->len);
    else if (ws_inflate_chunk(c, ev) < 0)
        return;
    if (ev->fin) {
        struct buf *m = c->message;
        c->message = NULL;
        route_message(c, (const uint8_t *)(m->data ? m->data : ""), m->len, ev->opcode == WS_OP_BINARY);
        buf_free(m);
        free(m);
    }
}

static size_t process_ws(struct conn *c, uint8_t *data, size_t len)
{
    size_t off = 0;
    while (off < len && (c->state == CONN_WS || c->state == CONN_CLOSING) && !c->close_received) {
        struct ws_event ev;
        size_t used;
        int got = ws_parse(&c->wp, data + off, len - off, &used, &ev);
        off += used;
        if (!got)
            break;
        c->awaiting_pong = 0;
        if ((ev.type == WS_EV_DATA && ev.fin) || ev.type == WS_EV_PING) {
            /* Messages and pings per second, counted in whole-second windows. */
            uint32_t now = (uint32_t)ev_now(loop);
            if (c->rate_window != now) {
                c->rate_window = now;
                c->rate_count = 0;
            }
            if (++c->rate_count > cfg->message_rate && !c->close_sent) {
                stats.rate_limited++;
                conn_ws_close(c, WS_CLOSE_POLICY, "message rate limit exceeded");
                return len;
            }
        }
        switch (ev.type) {
        case WS_EV_DATA:
            ws_message_chunk(c, &ev);
            break;
        case WS_EV_PING:
            chan_settle_for(c);
            conn_send_frame(c, WS_OP_PONG, ev.data, ev.len);
            break;
        case WS_EV_PONG:
            break;
        case WS_EV_CLOSE:
            c->close_received = 1;
            if (c->close_sent) {
                conn_close_after_write(c);
            } else {
                /* Echo the peer's code and reason, as RFC 6455 5.5.1 suggests; none if it sent none. */
                char reason[WS_MAX_CONTROL_PAYLOAD];
                memcpy(reason, ev.data, ev.len);
                reason[ev.len] = 0;
                c->close_code = ev.code;
                conn_ws_close(c, ev.code == WS_CLOSE_NO_STATUS ? 0 : ev.code, reason);
            }
            return len;
        case WS_EV_ERROR:
            stats.protocol_errors++;
            if (ev.code == WS_CLOSE_TOO_BIG)
                stats.messages_too_big++;
            log_debug("conn %llu: %s (closing with %u)", (unsigned long long)c->id, ev.error, ev.code);
            conn_ws_close(c, ev.code, ev.error);
            return len;
        }
    }
    return off;
}

/* --- reading ------------------------------------------------------------------------------------ */

static void keep_pending(struct conn *c, const uint8_t *p, size_t n)
{
    if (!n)
        return;
    c->pending = xcalloc(1, sizeof(*c->pending));
    buf_append(c->pending, p, n);
}

/* Read what the socket (or TLS session) has into the shared buffer, after the bytes carried over
 * from the last read, and serve it. Returns the new byte count, 0 when there is nothing new (the
 * connection may have been woken to serve what was pending), or -1 when it was closed. */
static ssize_t read_some(struct conn *c, uint8_t *buf, size_t room)
{
    ssize_t n;
    if (c->tls) {
        n = tls_read(c->tls, buf, room);
        if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
            if (n == TLS_WANT_WRITE)
                conn_wait_writable(c);
            if (c->q_len) /* a write may have been waiting for this read */
                conn_schedule_flush(c);
            return 0;
        }
        if (n == TLS_ERROR)
            n = -1;
        /* Records already decrypted inside the session do not make the socket readable. */
        else if (n > 0 && tls_pending(c->tls))
            ev_feed_event(loop, &c->io, EV_READ);
    } else {
        n = read(c->io.fd, buf, room);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return 0;
    }
    if (n <= 0) {
        /* The peer is gone (or done, after a close handshake or a lingering close). */
        if (c->state == CONN_WS && !c->close_code)
            c->close_code = WS_CLOSE_ABNORMAL;
        conn_close_now(c);
        return -1;
    }
    stats.bytes_in += (uint64_t)n;
    return n;
}

static void on_readable(struct conn *c)
{
    if (c->awaiting)
        return; /* an answer waits for Redis: what follows is read after it */
    uint8_t *buf = conn_read_buffer();
    size_t have = 0;
    if (c->pending) {
        have = c->pending->len;
        memcpy(buf, c->pending->data, have);
        buf_free(c->pending);
        free(c->pending);
        c->pending = NULL;
    }
    ssize_t n = read_some(c, buf + have, CONN_READ_BUF - have);
    if (n < 0 || (n == 0 && !have))
        return;
    size_t len = have + (size_t)n, used = 0;
    if (c->state == CONN_LINGER || c->state == CONN_SSE || c->read_shut)
        return; /* discarded: only EOF is awaited */
    if (c->state == CONN_HTTP) {
        used = process_http(c, (char *)buf, len);
        /* Frames that came with the handshake wait for its 101 if that waits for Redis: they
         * are kept (below) and served once it is out. */
        if (c->state == CONN_WS && !c->awaiting)
            used += process_ws(c, buf + used, len - used);
    } else {
        if (c->state == CONN_WS && n) /* while closing, only the close timeout counts */
            conn_touch(c);
        used = process_ws(c, buf, len);
    }
    if (used < len && (c->state == CONN_HTTP || c->state == CONN_WS || c->state == CONN_CLOSING) &&
        !c->close_received)
        keep_pending(c, buf + used, len - used);
}

/* --- connection events -------------------------------------------------------------------------- */

static void on_timeout(struct conn *c)
{
    if (CONN_WAIT(c, waiting)) { /* Redis has not answered in http_timeout */
        wait_expired(c);
        return;
    }
    switch (c->state) {
    case CONN_HTTP:
        if (c->q_len) { /* still sending a response: not idle */
            conn_touch(c);
            return;
        }
        stats.http_timeouts++; /* a request too slow to arrive (slowloris), or an idle keep-alive */
        conn_close_now(c);
        break;
    case CONN_SSE: /* a comment keeps proxies from timing the stream out, and finds dead peers */
        conn_queue_copy(c, ": keepalive\n\n", 13);
        conn_touch(c);
        break;
    case CONN_WS:
        if (c->awaiting_pong) {
            stats.ping_timeouts++;
            conn_ws_close(c, WS_CLOSE_GOING_AWAY, "ping timeout");
            return;
        }
        /* Idle: an inflater that keeps no context from one message to the next is given back
         * until the client sends compressed data again. */
        if (c->inflater && c->pmd.client_no_context_takeover && pmd_inflater_idle(c->inflater)) {
            pmd_inflater_free(c->inflater);
            c->inflater = NULL;
        }
        c->awaiting_pong = 1;
        conn_send_frame(c, WS_OP_PING, "", 0);
        conn_touch(c);
        break;
    default:
        conn_close_now(c);
        break;
    }
}

/* Called when a connection starts closing and again when it goes: undo its subscriptions, tell its
 * script. */
static void on_detach(struct conn *c, uint16_t code, const char *reason)
{
    route_detach(c);
    if (CONN_WAIT(c, waiting)) { /* its publish or join is cancelled below */
        waiting_free(c->waits->waiting);
        c->waits->waiting = NULL;
        c->awaiting = 0;
    }
    chan_unsubscribe_all(c);
    route_closed(c, code, reason);
    if (c->state == CONN_DEAD && c->ip_counted)
        ip_release(c);
    if (c->is_ws) {
        if (c->is_ws == 2)
            stats.sse_streams--;
        else
            stats.websockets--;
        c->is_ws = 0;
    }
    req_state_free(c);
}

/* --- accepting ---------------------------------------------------------------------------------- */

/* Open connections per client address (an IPv6 client by its /64, which one host usually has). */
struct ip_count {
    struct ip_count *next;
    uint8_t key[16];
    uint32_t count;
};
#define IP_BUCKETS 65536
static struct ip_count **ip_table;

static void ip_key(const struct conn *c, uint8_t key[16])
{
    memcpy(key, &c->addr, 16);
    if (!IN6_IS_ADDR_V4MAPPED(&c->addr))
        memset(key + 8, 0, 8);
}

/* Count c against its address; 0, or -1 when the address is at its limit. */
static int ip_acquire(struct conn *c)
{
    uint8_t key[16];
    ip_key(c, key);
    if (!ip_table)
        ip_table = xcalloc(IP_BUCKETS, sizeof(*ip_table));
    struct ip_count **bucket = &ip_table[buf_hash(key, 16) & (IP_BUCKETS - 1)], *e = *bucket;
    while (e && memcmp(e->key, key, 16) != 0)
        e = e->next;
    if (!e) {
        e = xcalloc(1, sizeof(*e));
        memcpy(e->key, key, 16);
        e->next = *bucket;
        *bucket = e;
    }
    if (e->count >= cfg->max_connections_per_ip)
        return -1;
    e->count++;
    c->ip_counted = 1;
    return 0;
}

static void ip_release(struct conn *c)
{
    uint8_t key[16];
    ip_key(c, key);
    struct ip_count **pp = &ip_table[buf_hash(key, 16) & (IP_BUCKETS - 1)];
    while (*pp && memcmp((*pp)->key, key, 16) != 0)
        pp = &(*pp)->next;
    if (*pp && --(*pp)->count == 0) {
        struct ip_count *e = *pp;
        *pp = e->next;
        free(e);
    }
    c->ip_counted = 0;
}

/* Answer 503 on a connection not taken on, and close it. */
static void refuse(int fd)
{
    static const char busy[] = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                               "Connection: close\r\nRetry-After: 5\r\n\r\n";
    ssize_t w = write(fd, busy, sizeof(busy) - 1);
    (void)w;
    close(fd);
}

static ev_timer accept_pause;

static void on_accept_resume(struct ev_loop *l, ev_timer *w, int revents)
{
    if (shutting_down)
        return;
    ev_io_start(loop, &listen_io);
    if (tls_listen_io.fd >= 0)
        ev_io_start(loop, &tls_listen_io);
}

/* Out of descriptors and the spare one could not make room: stop accepting for a moment rather
 * than be woken by the listen queue at once, again and again. */
static void pause_accepting(void)
{
    ev_io_stop(loop, &listen_io);
    if (tls_listen_io.fd >= 0)
        ev_io_stop(loop, &tls_listen_io);
    ev_timer_stop(loop, &accept_pause);
    ev_timer_init(&accept_pause, on_accept_resume, 0.1, 0.);
    ev_timer_start(loop, &accept_pause);
}

static void on_accept(struct ev_loop *l, ev_io *w, int revents)
{
    /* A bounded batch per event keeps accepting fair to the connections already open. */
    for (int i = 0; i < 256; i++) {
        struct sockaddr_storage addr;
        socklen_t alen = sizeof(addr);
        int fd = accept4(w->fd, (struct sockaddr *)&addr, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE) {
                /* Out of descriptors: use the spare one to accept and close the connection, so
                 * the listen queue does not wake the loop forever. Logged at most every 10 s. */
                static ev_tstamp last_warning;
                stats.accept_errors++;
                if (!last_warning || ev_now(loop) - last_warning > 10) {
                    log_warn("out of file descriptors (%s): refusing connections (counted in "
                             "accept_errors)", strerror(errno));
                    last_warning = ev_now(loop);
                }
                if (spare_fd >= 0) {
                    close(spare_fd);
                    fd = accept(w->fd, NULL, NULL);
                    int accept_errno = errno;
                    if (fd >= 0)
                        refuse(fd);
                    spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                    if (fd < 0 && spare_fd >= 0 && (accept_errno == EAGAIN || accept_errno == EWOULDBLOCK))
                        return; /* the queue is empty after all */
                }
                if (fd < 0 || spare_fd < 0) {
                    pause_accepting();
                    return;
                }
                continue;
            }
            return; /* EAGAIN */
        }
        if (shutting_down || conn_count() >= cfg->max_connections) {
            refuse(fd);
            stats.connections_refused++;
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct ssl_st *ssl = NULL;
        if (w == &tls_listen_io && !(ssl = tls_new(fd))) {
            close(fd);
            continue;
        }
        struct conn *c = conn_new(fd, (struct sockaddr *)&addr, alen);
        c->tls = ssl;
        if (ip_acquire(c) < 0) {
            static const char busy[] = "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n"
                                       "Connection: close\r\nRetry-After: 5\r\n\r\n";
            stats.connections_refused_per_ip++;
            conn_queue_copy(c, busy, sizeof(busy) - 1);
            conn_close_after_write(c);
        }
    }
}

/* Before the loop waits: hand out this pass's batches, write every queue, flush the access log. */
static void on_prepare(struct ev_loop *l, ev_prepare *w, int revents)
{
    chan_settle();
    conn_flush_all();
    log_access_flush();
}

static void on_housekeeping(struct ev_loop *l, ev_timer *w, int revents) { chan_sweep(ev_now(loop)); }

static void apply_limits(void)
{
    /* A queue must hold a couple of the largest messages, or a reader keeping up with big
     * messages would count as slow. */
    size_t queue = cfg->send_queue > 2 * cfg->max_message ? cfg->send_queue : 2 * cfg->max_message;
    struct conn_limits lim = {.send_queue = queue};
    lim.timeout[CONN_TO_HTTP] = cfg->http_timeout;
    lim.timeout[CONN_TO_WS] = cfg->ping_interval;
    lim.timeout[CONN_TO_CLOSING] = cfg->close_timeout;
    conn_set_limits(&lim);
}

/* Per-route figures: messages from clients and payloads made for subscribers (for a script route,
 * deliver hook calls: one per message, whatever the number of subscribers). */
static void routes_json(struct buf *b, void *arg)
{
    buf_append_str(b, "\"routes\":[");
    for (size_t i = 0; i < cfg->nroutes; i++) {
        struct route *r = cfg->routes[i];
        buf_printf(b, "%s{\"path\":\"%s\",\"kind\":\"%s\",\"messages\":%llu,\"deliver_calls\":%llu}",
                   i ? "," : "", r->path, route_kind_name(r->kind), (unsigned long long)r->messages,
                   (unsigned long long)r->deliver_calls);
    }
    buf_append_str(b, "],");
    script_stats_json(b);
}

static void routes_prom(struct buf *b, void *arg)
{
    buf_append_str(b, "# HELP herald_route_messages_total Messages received from clients, per route\n"
                      "# TYPE herald_route_messages_total counter\n");
    for (size_t i = 0; i < cfg->nroutes; i++)
        buf_printf(b, "herald_route_messages_total{path=\"%s\"} %llu\n", cfg->routes[i]->path,
                   (unsigned long long)cfg->routes[i]->messages);
    buf_append_str(b, "# HELP herald_route_deliver_calls_total Payloads made for subscribers, per route\n"
                      "# TYPE herald_route_deliver_calls_total counter\n");
    for (size_t i = 0; i < cfg->nroutes; i++)
        buf_printf(b, "herald_route_deliver_calls_total{path=\"%s\"} %llu\n", cfg->routes[i]->path,
                   (unsigned long long)cfg->routes[i]->deliver_calls);
    script_stats_prom(b);
}

static int listen_on(const char *host, int port, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res;
    char portstr[16];
    snprintf(portstr, sizeof(portstr), "%d", port);
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, gai_strerror(rc));
        return -1;
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 4096) < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(res);
        return -1;
    }
    freeaddrinfo(res);
    return fd;
}

int server_start(struct ev_loop *l, struct config *c, char *err, size_t errlen)
{
    loop = l;
    cfg = c;
    int fd = listen_on(cfg->host, cfg->port, err, errlen);
    if (fd < 0)
        return -1;
    if (static_set_root(cfg->web_root) < 0) {
        snprintf(err, errlen, "web_root %s: %s", cfg->web_root, strerror(errno));
        close(fd);
        return -1;
    }
    if (log_access_open(cfg->access_log) < 0) {
        snprintf(err, errlen, "access_log %s: %s", cfg->access_log, strerror(errno));
        close(fd);
        return -1;
    }
    tls_listen_io.fd = -1;
    if (cfg->tls) {
        if (tls_configure(cfg->tls, err, errlen) < 0) {
            close(fd);
            return -1;
        }
        int tfd = listen_on(cfg->host, cfg->tls->port, err, errlen);
        if (tfd < 0) {
            close(fd);
            return -1;
        }
        ev_io_init(&tls_listen_io, on_accept, tfd, EV_READ);
        ev_io_start(loop, &tls_listen_io);
    }
    spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    stats.started = ev_time();
    chan_init(cfg->channel_ttl, cfg->max_subscriptions);
    chan_set_history(cfg->history, cfg->nhistory);
    conn_init(loop, on_readable, on_timeout, on_detach);
    apply_limits();
    static const struct stats_section routes = {routes_json, routes_prom, NULL};
    stats_add_section(&routes);
    static const struct stats_section deflate_figures = {pmd_stats_json, pmd_stats_prom, NULL};
    stats_add_section(&deflate_figures);
    redis_src_configure(loop, cfg);
    tail_configure(loop, cfg);
    ev_io_init(&listen_io, on_accept, fd, EV_READ);
    ev_io_start(loop, &listen_io);
    ev_prepare_init(&flush_prepare, on_prepare);
    ev_prepare_start(loop, &flush_prepare);
    ev_timer_init(&housekeeping, on_housekeeping, 1.0, 1.0);
    ev_timer_start(loop, &housekeeping);
    ev_unref(loop);
    return 0;
}

void server_reload(struct config *c)
{
    route_adopt(c->routes, c->nroutes, cfg->routes, cfg->nroutes);
    cfg = c;
    char err[512];
    if (cfg->tls && tls_configure(cfg->tls, err, sizeof(err)) < 0)
        log_error("reload: %s; keeping the previous certificates", err);
    redis_src_configure(loop, cfg);
    tail_configure(loop, cfg);
    apply_limits();
    chan_init(cfg->channel_ttl, cfg->max_subscriptions);
    chan_set_history(cfg->history, cfg->nhistory);
    if (static_set_root(cfg->web_root) < 0)
        log_error("web_root %s: %s", cfg->web_root, strerror(errno));
    if (log_access_open(cfg->access_log) < 0)
        log_error("access_log %s: %s", cfg->access_log, strerror(errno));
}

static void close_for_shutdown(struct conn *c, void *arg)
{
    if (c->state == CONN_WS && c->awaiting) /* its 101 is not out: nothing to close politely */
        conn_close_now(c);
    else if (c->state == CONN_WS)
        conn_ws_close(c, WS_CLOSE_GOING_AWAY, "server shutting down");
    else if (c->state == CONN_HTTP && !c->q_len && !c->req)
        conn_close_now(c);
}

static void close_now_cb(struct conn *c, void *arg) { conn_close_now(c); }

static void check_shutdown_done(struct ev_loop *l, ev_timer *w, int revents)
{
    /* Called every 50 ms while shutting down; gives up waiting after close_timeout. */
    static double waited;
    waited += 0.05;
    if (conn_count() == 0 || waited >= cfg->close_timeout) {
        ev_timer_stop(loop, &shutdown_timer);
        conn_foreach(close_now_cb, NULL);
        conn_flush_all();
        if (shutdown_done)
            shutdown_done();
    }
}

void server_shutdown(void (*done)(void))
{
    if (shutting_down)
        return;
    shutting_down = 1;
    shutdown_done = done;
    redis_src_stop();
    tail_stop();
    ev_timer_stop(loop, &accept_pause);
    ev_io_stop(loop, &listen_io);
    close(listen_io.fd);
    if (tls_listen_io.fd >= 0) {
        ev_io_stop(loop, &tls_listen_io);
        close(tls_listen_io.fd);
    }
    conn_foreach(close_for_shutdown, NULL);
    ev_timer_init(&shutdown_timer, check_shutdown_done, 0.05, 0.05);
    ev_timer_start(loop, &shutdown_timer);
}
