/* ws.c - RFC 6455 on bytes alone: frame parsing and encoding, close frames, the handshake's keys
 * and UTF-8 validation. Sockets, buffers and what a message means belong to the connection code. */
#include "ws.h"

#include <string.h>

#include <openssl/evp.h>
#include <openssl/sha.h>

/* UTF-8: bytes fall into 12 classes, and the state says which bytes may follow. Each multi-byte
 * lead with a narrowed second-byte range (E0, ED, F0, F4) gets its own state, which is what makes
 * overlongs, surrogates and code points above U+10FFFF fail on the very byte that rules them out.
 *
 * The 9 states are kept as bit offsets (state * 6) into one 64-bit row per class, the row holding
 * every state's successor: a step is then a shift and a mask, and the table loads, which depend only
 * on the input byte, stay off the chain of dependent instructions from one byte to the next. */
#define WS_UTF8_REJECT (8 * 6)

static const uint8_t ws_utf8_class[256] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 00..0F */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 10..1F */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 20..2F */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 30..3F */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 40..4F */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 50..5F */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 60..6F */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 70..7F */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 80..8F */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 90..9F */
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, /* A0..AF */
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, /* B0..BF */
    4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, /* C0..CF: C0, C1 only start overlongs */
    5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, /* D0..DF */
    6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 7, /* E0..EF */
    9, 10, 10, 10, 11, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, /* F0..FF: F5 and up exceed U+10FFFF */
};

/* States: 0 accept; 1, 2, 3 continuation bytes left; 4 after E0 (80..9F would be overlong);
 * 5 after ED (A0..BF are surrogates); 6 after F0 (80..8F would be overlong); 7 after F4 (90..BF
 * pass U+10FFFF); 8 reject. Each row lists the successor of states 0..8 for one class. */
#define S(state, next) ((uint64_t)(next) * 6 << (state) * 6)
#define ROW(n0, n1, n2, n3, n4, n5, n6, n7)                                                        \
    (S(0, n0) | S(1, n1) | S(2, n2) | S(3, n3) | S(4, n4) | S(5, n5) | S(6, n6) | S(7, n7) | S(8, 8))
#define X 8
static const uint64_t ws_utf8_row[12] = {
    ROW(0, X, X, X, X, X, X, X), /* 00..7F */
    ROW(X, 0, 1, 2, X, 1, X, 2), /* 80..8F */
    ROW(X, 0, 1, 2, X, 1, 2, X), /* 90..9F */
    ROW(X, 0, 1, 2, 1, X, 2, X), /* A0..BF */
    ROW(X, X, X, X, X, X, X, X), /* C0, C1, F5..FF */
    ROW(1, X, X, X, X, X, X, X), /* C2..DF */
    ROW(4, X, X, X, X, X, X, X), /* E0 */
    ROW(2, X, X, X, X, X, X, X), /* E1..EC, EE, EF */
    ROW(5, X, X, X, X, X, X, X), /* ED */
    ROW(6, X, X, X, X, X, X, X), /* F0 */
    ROW(3, X, X, X, X, X, X, X), /* F1..F3 */
    ROW(7, X, X, X, X, X, X, X), /* F4 */
};
#undef X
#undef ROW
#undef S

static inline uint32_t ws_utf8_step(uint32_t state, uint8_t byte)
{
    return (uint32_t)(ws_utf8_row[ws_utf8_class[byte]] >> state) & 63;
}

int ws_utf8_feed(uint32_t *state, const uint8_t *p, size_t len)
{
    const uint8_t *end;
    uint32_t s = *state;

    if (s == WS_UTF8_REJECT)
        return -1;
    if (len == 0)
        return 0;
    end = p + len;
    while (p < end) {
        if (s == WS_UTF8_ACCEPT) {
            /* Mostly-ASCII text is the common case: skip it 32 bytes, then a word, at a time. */
            while (end - p >= 32) {
                uint64_t w[4];
                memcpy(w, p, sizeof(w));
                if ((w[0] | w[1] | w[2] | w[3]) & UINT64_C(0x8080808080808080))
                    break;
                p += 32;
            }
            while (end - p >= 8) {
                uint64_t w;
                memcpy(&w, p, 8);
                if (w & UINT64_C(0x8080808080808080))
                    break;
                p += 8;
            }
            while (p < end && *p < 0x80)
                p++;
            if (p == end)
                break;
        }
        s = ws_utf8_step(s, *p++);
        if (s == WS_UTF8_REJECT) {
            *state = s;
            return -1;
        }
    }
    *state = s;
    return 0;
}

int ws_utf8_valid(const uint8_t *p, size_t len)
{
    uint32_t s = WS_UTF8_ACCEPT;
    return ws_utf8_feed(&s, p, len) == 0 && s == WS_UTF8_ACCEPT;
}

/* Errors are kept as an index into this table in parser->failed, so a failed parser can repeat
 * its error without a wider struct. Index 0 means "not failed". */
enum {
    WS_ERR_NONE,
    WS_ERR_RSV,
    WS_ERR_OPCODE,
    WS_ERR_CONTROL_FRAGMENTED,
    WS_ERR_CONTROL_TOO_LONG,
    WS_ERR_NO_MESSAGE,
    WS_ERR_IN_MESSAGE,
    WS_ERR_UNMASKED,
    WS_ERR_MASKED,
    WS_ERR_LENGTH_MSB,
    WS_ERR_LENGTH_NOT_MINIMAL,
    WS_ERR_TOO_BIG,
    WS_ERR_UTF8,
    WS_ERR_CLOSE_LENGTH,
    WS_ERR_CLOSE_CODE,
    WS_ERR_CLOSE_UTF8,
};

static const struct {
    uint16_t code;
    const char *text;
} ws_errors[] = {
    [WS_ERR_NONE] = {0, ""},
    [WS_ERR_RSV] = {WS_CLOSE_PROTOCOL, "reserved bits set"},
    [WS_ERR_OPCODE] = {WS_CLOSE_PROTOCOL, "reserved opcode"},
    [WS_ERR_CONTROL_FRAGMENTED] = {WS_CLOSE_PROTOCOL, "fragmented control frame"},
    [WS_ERR_CONTROL_TOO_LONG] = {WS_CLOSE_PROTOCOL, "control frame payload over 125 bytes"},
    [WS_ERR_NO_MESSAGE] = {WS_CLOSE_PROTOCOL, "continuation frame with no message in progress"},
    [WS_ERR_IN_MESSAGE] = {WS_CLOSE_PROTOCOL, "new message inside a fragmented message"},
    [WS_ERR_UNMASKED] = {WS_CLOSE_PROTOCOL, "unmasked frame from client"},
    [WS_ERR_MASKED] = {WS_CLOSE_PROTOCOL, "masked frame from server"},
    [WS_ERR_LENGTH_MSB] = {WS_CLOSE_PROTOCOL, "64-bit payload length with the top bit set"},
    [WS_ERR_LENGTH_NOT_MINIMAL] = {WS_CLOSE_PROTOCOL, "payload length not minimally encoded"},
    [WS_ERR_TOO_BIG] = {WS_CLOSE_TOO_BIG, "message too big"},
    [WS_ERR_UTF8] = {WS_CLOSE_INVALID_DATA, "invalid UTF-8 in text message"},
    [WS_ERR_CLOSE_LENGTH] = {WS_CLOSE_PROTOCOL, "close payload of 1 byte"},
    [WS_ERR_CLOSE_CODE] = {WS_CLOSE_PROTOCOL, "invalid close code"},
    [WS_ERR_CLOSE_UTF8] = {WS_CLOSE_INVALID_DATA, "invalid UTF-8 in close reason"},
};

void ws_parser_init(struct ws_parser *p, enum ws_role role, uint64_t max_message)
{
    memset(p, 0, sizeof(*p));
    p->role = (uint8_t)role;
    p->max_message = (uint32_t)(max_message < WS_MAX_MESSAGE_LIMIT ? max_message : WS_MAX_MESSAGE_LIMIT);
    p->utf8_state = WS_UTF8_ACCEPT;
}

static void ws_event_set(struct ws_event *ev, enum ws_event_type type, int opcode, const uint8_t *data,
                         size_t len)
{
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
    ev->opcode = opcode;
    ev->data = data;
    ev->len = len;
}

/* The connection is going away: swallow the rest so a caller looping on *consumed terminates. */
static int ws_fail(struct ws_parser *p, int err, size_t len, size_t *consumed, struct ws_event *ev)
{
    p->failed = (uint8_t)err;
    ws_event_set(ev, WS_EV_ERROR, 0, NULL, 0);
    ev->code = ws_errors[err].code;
    ev->error = ws_errors[err].text;
    *consumed = len;
    return 1;
}

/* A complete control frame, already unmasked; off is the offset just past it. */
static int ws_control(struct ws_parser *p, int opcode, const uint8_t *pl, size_t plen, size_t off,
                      size_t len, size_t *consumed, struct ws_event *ev)
{
    if (opcode == WS_OP_CLOSE) {
        uint16_t code;

        if (plen == 0) {
            ws_event_set(ev, WS_EV_CLOSE, opcode, pl, 0);
            ev->code = WS_CLOSE_NO_STATUS;
            *consumed = off;
            return 1;
        }
        if (plen == 1)
            return ws_fail(p, WS_ERR_CLOSE_LENGTH, len, consumed, ev);
        code = (uint16_t)(pl[0] << 8 | pl[1]);
        if (!ws_close_code_valid(code))
            return ws_fail(p, WS_ERR_CLOSE_CODE, len, consumed, ev);
        if (!ws_utf8_valid(pl + 2, plen - 2))
            return ws_fail(p, WS_ERR_CLOSE_UTF8, len, consumed, ev);
        ws_event_set(ev, WS_EV_CLOSE, opcode, pl + 2, plen - 2);
        ev->code = code;
    } else {
        ws_event_set(ev, opcode == WS_OP_PING ? WS_EV_PING : WS_EV_PONG, opcode, pl, plen);
    }
    *consumed = off;
    return 1;
}

/* Hand out whatever of the current data frame's payload is in buf[off..len). Returns 1 with an
 * event, 0 when nothing is available, -1 when an empty non-final frame ended (no event: nothing
 * to tell, and parsing simply goes on with the next frame). */
static int ws_payload(struct ws_parser *p, uint8_t *buf, size_t len, size_t off, size_t *consumed,
                      struct ws_event *ev)
{
    size_t n = len - off;
    uint8_t *data;
    int fin = 0;

    if ((uint64_t)n > p->frame_left)
        n = (size_t)p->frame_left;
    if (n == 0 && p->frame_left != 0) {
        *consumed = off;
        return 0;
    }
    data = buf + off;
    if (p->role == WS_ROLE_SERVER) {
        ws_mask(data, n, p->mask, p->mask_pos);
        p->mask_pos = (uint8_t)((p->mask_pos + n) & 3);
    }
    if (p->message_op == WS_OP_TEXT && !p->compressed && ws_utf8_feed(&p->utf8_state, data, n) < 0)
        return ws_fail(p, WS_ERR_UTF8, len, consumed, ev);
    p->frame_left -= n;
    p->message_len += n;
    if (p->frame_left == 0) {
        p->in_frame = 0;
        if (p->frame_fin) {
            if (p->message_op == WS_OP_TEXT && p->utf8_state != WS_UTF8_ACCEPT)
                return ws_fail(p, WS_ERR_UTF8, len, consumed, ev);
            fin = 1;
        } else if (n == 0) {
            return -1;
        }
    }
    ws_event_set(ev, WS_EV_DATA, p->message_op, data, n);
    ev->fin = fin;
    ev->compressed = p->compressed;
    if (fin) {
        p->compressed = 0;
        p->message_op = 0;
        p->message_len = 0;
        p->utf8_state = WS_UTF8_ACCEPT;
    }
    *consumed = off + n;
    return 1;
}

/* The most payload bytes a message may take on the wire. A compressed message is limited by its
 * inflated size, which whoever inflates it checks against max_message; its compressed bytes may
 * be a little more than that (deflate expands data it cannot compress by at most an eighth, with
 * fixed codes of up to 9 bits per byte), so a message of max_message bytes always gets through. */
static uint64_t ws_wire_limit(const struct ws_parser *p, int compressed)
{
    /* At most 2^30 + 2^27 + 64: a frame's length within it fits frame_left. */
    if (!compressed)
        return p->max_message;
    return (uint64_t)p->max_message + (p->max_message >> 3) + 64;
}

int ws_parse(struct ws_parser *p, uint8_t *buf, size_t len, size_t *consumed, struct ws_event *ev)
{
    size_t off = 0;

    if (p->failed)
        return ws_fail(p, p->failed, len, consumed, ev);
    for (;;) {
        const uint8_t *h;
        size_t rest = len - off, hlen = 2;
        uint64_t plen;
        int op, fin, masked;

        if (p->in_frame) {
            int r = ws_payload(p, buf, len, off, consumed, ev);
            if (r >= 0)
                return r;
            continue;
        }

        /* Each check runs as soon as the bytes it needs are here, so a broken peer is refused on
         * the first byte that proves it, not after we have waited for a whole frame. */
        *consumed = off;
        if (rest < 1)
            return 0;
        h = buf + off;
        op = h[0] & 0x0F;
        fin = h[0] >> 7;
        /* RSV1 is permessage-deflate's, allowed only on the first frame of a data message. */
        if ((h[0] & 0x30) || ((h[0] & 0x40) && !(p->deflate && (op == WS_OP_TEXT || op == WS_OP_BINARY))))
            return ws_fail(p, WS_ERR_RSV, len, consumed, ev);
        if (op == WS_OP_CONT) {
            if (!p->message_op)
                return ws_fail(p, WS_ERR_NO_MESSAGE, len, consumed, ev);
        } else if (op == WS_OP_TEXT || op == WS_OP_BINARY) {
            if (p->message_op)
                return ws_fail(p, WS_ERR_IN_MESSAGE, len, consumed, ev);
        } else if (op == WS_OP_CLOSE || op == WS_OP_PING || op == WS_OP_PONG) {
            if (!fin)
                return ws_fail(p, WS_ERR_CONTROL_FRAGMENTED, len, consumed, ev);
        } else {
            return ws_fail(p, WS_ERR_OPCODE, len, consumed, ev);
        }

        if (rest < 2)
            return 0;
        masked = h[1] >> 7;
        plen = h[1] & 0x7F;
        if (masked && p->role == WS_ROLE_CLIENT)
            return ws_fail(p, WS_ERR_MASKED, len, consumed, ev);
        if (!masked && p->role == WS_ROLE_SERVER)
            return ws_fail(p, WS_ERR_UNMASKED, len, consumed, ev);
        if (op >= WS_OP_CLOSE && plen > WS_MAX_CONTROL_PAYLOAD)
            return ws_fail(p, WS_ERR_CONTROL_TOO_LONG, len, consumed, ev);
        if (plen == 126) {
            if (rest < 4)
                return 0;
            plen = (uint64_t)h[2] << 8 | h[3];
            hlen = 4;
            if (plen < 126)
                return ws_fail(p, WS_ERR_LENGTH_NOT_MINIMAL, len, consumed, ev);
        } else if (plen == 127) {
            if (rest >= 3 && (h[2] & 0x80))
                return ws_fail(p, WS_ERR_LENGTH_MSB, len, consumed, ev);
            if (rest < 10)
                return 0;
            plen = 0;
            for (int i = 2; i < 10; i++)
                plen = plen << 8 | h[i];
            hlen = 10;
            if (plen <= 0xFFFF)
                return ws_fail(p, WS_ERR_LENGTH_NOT_MINIMAL, len, consumed, ev);
        }
        /* message_len is 0 for a new message and never exceeds the limit, so no overflow. */
        if (op < WS_OP_CLOSE && plen > ws_wire_limit(p, op == WS_OP_CONT ? p->compressed : (h[0] & 0x40) != 0) -
                                           p->message_len)
            return ws_fail(p, WS_ERR_TOO_BIG, len, consumed, ev);
        if (masked)
            hlen += 4;
        if (rest < hlen)
            return 0;

        if (op >= WS_OP_CLOSE) {
            uint8_t *pl = buf + off + hlen;

            /* Control frames are small and must be seen whole (a close reason is validated as a
             * unit), so they wait in the caller's buffer until complete. */
            if (rest - hlen < plen)
                return 0;
            if (masked)
                ws_mask(pl, (size_t)plen, h + hlen - 4, 0);
            return ws_control(p, op, pl, (size_t)plen, off + hlen + (size_t)plen, len, consumed, ev);
        }

        if (masked)
            memcpy(p->mask, h + hlen - 4, 4);
        p->mask_pos = 0;
        p->frame_left = (uint32_t)plen; /* below ws_wire_limit, so it fits */
        p->frame_fin = (uint8_t)fin;
        p->in_frame = 1;
        if (op != WS_OP_CONT) {
            p->message_op = (uint8_t)op;
            p->message_len = 0;
            p->utf8_state = WS_UTF8_ACCEPT;
            p->compressed = (h[0] & 0x40) != 0;
        }
        off += hlen;
    }
}

size_t ws_frame_header(uint8_t *out, int opcode, int fin, uint64_t len, const uint8_t *mask)
{
    uint8_t mask_bit = mask ? 0x80 : 0;
    size_t n;

    out[0] = (uint8_t)((fin ? 0x80 : 0) | (opcode & (0x0F | WS_FRAME_RSV1)));
    if (len < 126) {
        out[1] = (uint8_t)(mask_bit | len);
        n = 2;
    } else if (len <= 0xFFFF) {
        out[1] = mask_bit | 126;
        out[2] = (uint8_t)(len >> 8);
        out[3] = (uint8_t)len;
        n = 4;
    } else {
        out[1] = mask_bit | 127;
        for (int i = 0; i < 8; i++)
            out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
        n = 10;
    }
    if (mask) {
        memcpy(out + n, mask, 4);
        n += 4;
    }
    return n;
}

void ws_mask(uint8_t *data, size_t len, const uint8_t mask[4], size_t pos)
{
    uint8_t m8[8];
    uint64_t m;
    size_t i = 0;

    /* 8 is a multiple of 4, so one rotated 8-byte key serves every whole word. */
    for (int k = 0; k < 8; k++)
        m8[k] = mask[(pos + (size_t)k) & 3];
    memcpy(&m, m8, 8);
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, data + i, 8);
        w ^= m;
        memcpy(data + i, &w, 8);
    }
    for (; i < len; i++)
        data[i] ^= m8[i & 7];
}

size_t ws_close_frame(uint8_t *out, uint16_t code, const char *reason)
{
    size_t n = 0;

    if (code == 0 || code == WS_CLOSE_NO_STATUS)
        return ws_frame_header(out, WS_OP_CLOSE, 1, 0, NULL);
    if (reason) {
        /* Keep the longest prefix of at most 123 bytes that ends on a character boundary; an
         * invalid byte ends it too, since a peer must fail a close with a non-UTF-8 reason. */
        uint32_t s = WS_UTF8_ACCEPT;
        for (size_t i = 0; i < WS_MAX_CONTROL_PAYLOAD - 2 && reason[i]; i++) {
            s = ws_utf8_step(s, (uint8_t)reason[i]);
            if (s == WS_UTF8_REJECT)
                break;
            if (s == WS_UTF8_ACCEPT)
                n = i + 1;
        }
    }
    ws_frame_header(out, WS_OP_CLOSE, 1, 2 + n, NULL);
    out[2] = (uint8_t)(code >> 8);
    out[3] = (uint8_t)code;
    if (n)
        memcpy(out + 4, reason, n);
    return 4 + n;
}

int ws_close_code_valid(uint16_t code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
           (code >= 3000 && code <= 4999);
}

static int ws_base64_value(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

int ws_key_valid(const char *key, size_t len)
{
    int v = 0;

    if (len != 24 || key[22] != '=' || key[23] != '=')
        return 0;
    for (size_t i = 0; i < 22; i++)
        if ((v = ws_base64_value(key[i])) < 0)
            return 0;
    /* 22 characters carry 132 bits for 128 of data: the last one's low 4 bits must be 0, or the
     * text is not the canonical encoding of 16 bytes. */
    return (v & 0x0F) == 0;
}

void ws_accept_key(const char *key, size_t len, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    uint8_t in[64 + sizeof(guid) - 1], md[SHA_DIGEST_LENGTH];

    /* Only a 24-byte key passes ws_key_valid; a longer one is cut rather than allocated for. */
    if (len > 64)
        len = 64;
    memcpy(in, key, len);
    memcpy(in + len, guid, sizeof(guid) - 1);
    SHA1(in, len + sizeof(guid) - 1, md);
    EVP_EncodeBlock((unsigned char *)out, md, SHA_DIGEST_LENGTH);
}
