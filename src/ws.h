/* ws.h - RFC 6455 framing with no I/O: an incremental frame parser, the frame encoder, the
 * handshake's accept key and an incremental UTF-8 validator.
 *
 * The parser owns nothing but its own small state; it unmasks payload in the caller's buffer and
 * hands back pointers into it. It never consumes a partial frame header or a partial control frame,
 * so a caller keeps at most WS_MAX_PENDING unconsumed bytes between reads; data payload is handed
 * out as it arrives, so a UTF-8 error is caught as soon as the offending byte is seen. */
#ifndef HERALD_WS_H
#define HERALD_WS_H

#include <stddef.h>
#include <stdint.h>

#define WS_OP_CONT 0x0
#define WS_OP_TEXT 0x1
#define WS_OP_BINARY 0x2
#define WS_OP_CLOSE 0x8
#define WS_OP_PING 0x9
#define WS_OP_PONG 0xA

#define WS_CLOSE_NORMAL 1000
#define WS_CLOSE_GOING_AWAY 1001
#define WS_CLOSE_PROTOCOL 1002
#define WS_CLOSE_UNSUPPORTED 1003
#define WS_CLOSE_NO_STATUS 1005
#define WS_CLOSE_ABNORMAL 1006
#define WS_CLOSE_INVALID_DATA 1007
#define WS_CLOSE_POLICY 1008
#define WS_CLOSE_TOO_BIG 1009
#define WS_CLOSE_INTERNAL 1011
#define WS_CLOSE_TRY_AGAIN 1013

#define WS_MAX_HEADER 14           /* 2 + 8 (length) + 4 (mask) */
#define WS_MAX_CONTROL_PAYLOAD 125
#define WS_MAX_PENDING (WS_MAX_HEADER + WS_MAX_CONTROL_PAYLOAD)

/* Which side of the connection the parser sits on: a server requires masked frames, a client
 * requires unmasked ones (RFC 6455 5.1). */
enum ws_role { WS_ROLE_SERVER, WS_ROLE_CLIENT };

enum ws_event_type {
    WS_EV_DATA,  /* a chunk of a text or binary message; fin marks its last chunk */
    WS_EV_PING,  /* data/len: the ping's payload (<= 125 bytes) */
    WS_EV_PONG,  /* data/len: the pong's payload */
    WS_EV_CLOSE, /* code: the peer's status (1005 when none); data/len: its UTF-8 reason */
    WS_EV_ERROR, /* code: the close code to send; error: what was wrong. The parser stays failed. */
};

struct ws_event {
    enum ws_event_type type;
    int opcode;          /* WS_EV_DATA: WS_OP_TEXT or WS_OP_BINARY, the message's type */
    int fin;             /* WS_EV_DATA: this chunk completes the message */
    int compressed;      /* WS_EV_DATA: the message is compressed (permessage-deflate); its UTF-8
                          * is not checked here but by whoever inflates it */
    const uint8_t *data; /* points into the buffer given to ws_parse (already unmasked) */
    size_t len;
    uint16_t code;
    const char *error; /* static string */
};

/* Incremental UTF-8 validation (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF).
 * *state starts at WS_UTF8_ACCEPT. ws_utf8_feed returns 0 while the input so far can still be the
 * prefix of valid UTF-8, -1 as soon as it cannot. The text is complete and valid when the state is
 * back at WS_UTF8_ACCEPT. */
#define WS_UTF8_ACCEPT 0
int ws_utf8_feed(uint32_t *state, const uint8_t *p, size_t len);
/* 1 if p[0..len) is complete, valid UTF-8, else 0. */
int ws_utf8_valid(const uint8_t *p, size_t len);

/* Parser state. Embedded in each connection, so it is kept small. */
/* The largest max_message a parser takes (larger values are lowered to it): so that every count
 * of a message's bytes, with a compressed message's allowance, fits in 32 bits. */
#define WS_MAX_MESSAGE_LIMIT (UINT32_C(1) << 30)

struct ws_parser {
    uint32_t frame_left;   /* payload bytes of the current data frame still to come */
    uint32_t message_len;  /* bytes of the current message handed out so far */
    uint32_t max_message;  /* a message longer than this fails with 1009 (a compressed one's
                            * payload may be up to an eighth more: its inflated size is checked
                            * by the inflater) */
    uint32_t utf8_state;
    uint8_t mask[4];
    uint8_t mask_pos;      /* offset into mask for the next payload byte */
    uint8_t role;          /* enum ws_role */
    uint8_t message_op;    /* opcode of the message in progress, 0 when none */
    uint8_t frame_fin;     /* FIN bit of the data frame in progress */
    uint8_t in_frame;      /* a data frame's payload is being streamed */
    uint8_t failed;        /* an error was reported; nothing more is parsed */
    uint8_t deflate;       /* permessage-deflate was negotiated: RSV1 marks a compressed message */
    uint8_t compressed;    /* the message in progress is compressed */
};

/* max_message: at most WS_MAX_MESSAGE_LIMIT (a larger value is lowered to it). */
void ws_parser_init(struct ws_parser *p, enum ws_role role, uint64_t max_message);

/* Parse from buf[0..len). Returns 1 and fills *ev when an event is ready, 0 when more input is
 * needed. *consumed is set to the bytes used either way; bytes not consumed must be offered again
 * (with more appended) on the next call. Masked payload is unmasked in place in buf. After
 * WS_EV_ERROR every call returns the same error and consumes everything. */
int ws_parse(struct ws_parser *p, uint8_t *buf, size_t len, size_t *consumed, struct ws_event *ev);

/* OR'ed into ws_frame_header's opcode: set RSV1, the compressed-message bit of permessage-deflate. */
#define WS_FRAME_RSV1 0x40

/* Write a frame header for a payload of len bytes into out (at least WS_MAX_HEADER bytes).
 * mask is NULL for an unmasked (server) frame, else the 4-byte key, which the caller applies to the
 * payload with ws_mask. Returns the header's length. */
size_t ws_frame_header(uint8_t *out, int opcode, int fin, uint64_t len, const uint8_t *mask);

/* XOR data with mask, starting at mask offset pos (0..3). */
void ws_mask(uint8_t *data, size_t len, const uint8_t mask[4], size_t pos);

/* Write a complete unmasked close frame (header, code, reason cut to fit 123 bytes on a UTF-8
 * boundary) into out, which holds at least WS_MAX_PENDING bytes. code 0 or 1005 gives an empty
 * payload. Returns the frame's length. */
size_t ws_close_frame(uint8_t *out, uint16_t code, const char *reason);

/* 1 if code may be sent on the wire in a close frame (RFC 6455 7.4), else 0. */
int ws_close_code_valid(uint16_t code);

/* The handshake: 1 if key is a valid Sec-WebSocket-Key (base64 of 16 bytes), else 0. */
int ws_key_valid(const char *key, size_t len);
/* Compute Sec-WebSocket-Accept for key into out (28 characters and a NUL). */
void ws_accept_key(const char *key, size_t len, char out[29]);

#endif
