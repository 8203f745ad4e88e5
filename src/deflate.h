/* deflate.h - permessage-deflate (RFC 7692) with no I/O: the handshake's offer parser and answer,
 * compressing a message for peers that negotiated the extension, and bounded inflating of the
 * compressed messages a client sends.
 *
 * herald always answers with server_no_context_takeover, so each message it sends is compressed on
 * its own, from an empty window. That is what lets fan-out compress a published message once and
 * share the result among every subscriber that negotiated the same window size. The compressors
 * are the module's own (one per window size and level in use, made on first use and kept for the
 * life of the process); an inflater belongs to one connection and is made only when that
 * connection sends compressed data. */
#ifndef HERALD_DEFLATE_H
#define HERALD_DEFLATE_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

/* Room for the extension element of the 101 response, NUL included. */
#define PMD_RESPONSE_MAX 128

/* zlib cannot make a raw deflate stream with a 256-byte window (it silently uses 512 bytes), so an
 * offer asking us for server_max_window_bits=8 is declined; 9 is the smallest we compress with. */
#define PMD_MIN_SERVER_BITS 9

/* What a connection negotiated. The zero value means permessage-deflate is off. */
struct pmd_params {
    uint8_t server_bits;   /* LZ77 window of what we send (9..15); 0: not negotiated */
    uint8_t client_bits;   /* the largest window the client may compress with (8..15) */
    uint8_t client_no_context_takeover; /* the client compresses each message on its own */
};

/* Look through one Sec-WebSocket-Extensions value (a comma-separated list of offers; a request
 * with several such headers is the same list split across them, so call this on each in order)
 * for the first permessage-deflate offer herald can accept. An offer with an unknown parameter, a
 * parameter given twice, a malformed or out-of-range value, or server_max_window_bits=8 is
 * declined and the next one tried; other extensions are passed over. Returns 1 with *params set
 * and the extension element to answer with written (NUL-terminated) to response, which has room
 * for cap >= PMD_RESPONSE_MAX bytes; 0 when no offer in value is acceptable. */
int pmd_negotiate(const char *value, size_t len, struct pmd_params *params, char *response, size_t cap);

/* Compress msg[0..len) as one whole message for peers inflating with a window of window_bits
 * (9..15) at zlib level (1..9), with no context kept from earlier messages. Returns 1 with out's
 * contents replaced by the payload to send with RSV1 set (the 00 00 ff ff tail removed), or 0 when
 * the message should go uncompressed: shorter than min_size, or not smaller once compressed.
 * msg may not point into out. */
int pmd_compress(int window_bits, int level, size_t min_size, const void *msg, size_t len, struct buf *out);

/* A client's inflate stream, with the state of the message being inflated. */
struct pmd_inflater;

/* A new inflater for a client (whatever window it negotiated: the inflater always keeps the largest,
 * see deflate.c); with no_context_takeover, each message starts from an empty window. Owned by the
 * caller. */
struct pmd_inflater *pmd_inflater_new(int no_context_takeover);
void pmd_inflater_free(struct pmd_inflater *f);
/* 1 when no message is being inflated, so the inflater holds nothing a later message needs
 * (if it was made with no_context_takeover) and may be freed. */
int pmd_inflater_idle(const struct pmd_inflater *f);

/* Inflate the next piece in[0..len) of a compressed message's payload, appending what comes out to
 * out; fin marks the message's last piece. text: the message is text, so its UTF-8 is checked as it
 * comes out. The inflated message may not exceed max bytes: inflating stops as soon as it would,
 * so out never grows past max. Returns 0, or the close code to fail the connection with and *why:
 * 1007 for invalid compressed data or invalid UTF-8, 1009 when the message would exceed max. After
 * an error the inflater is ready for a new message. */
int pmd_inflate(struct pmd_inflater *f, const uint8_t *in, size_t len, int fin, int text, struct buf *out,
                size_t max, const char **why);

/* Figures for /stats and /metrics. */
struct pmd_stats {
    uint64_t websockets;          /* WebSockets that negotiated permessage-deflate, now */
    uint64_t inflaters;           /* inflate streams allocated, now */
    uint64_t compressed;          /* messages compressed (once per message per sharing group) */
    uint64_t not_compressed;      /* messages sent as is to deflate peers: short or incompressible */
    uint64_t compress_bytes_in;   /* payload bytes before and after compression */
    uint64_t compress_bytes_out;
    uint64_t inflated;            /* compressed client messages inflated */
    uint64_t inflate_bytes_in;
    uint64_t inflate_bytes_out;
};
extern struct pmd_stats pmd_stats;

/* Renderers with the signature of a stats section: "name":value members, and metric lines. */
void pmd_stats_json(struct buf *out, void *arg);
void pmd_stats_prom(struct buf *out, void *arg);

#endif
