/* fuzz_pubsub.c - libFuzzer driver for the generic route's protocol handler on its input side:
 * each input is one WebSocket message from a client, parsed and checked as the /ws route does
 * (pubsub_parse), then answered with the error reply when it is refused.
 *
 * Checked: only a valid JSON object is ever accepted; an accepted request has a known op, a valid
 * channel name (or, for a pattern subscribe or unsubscribe, a valid pattern and nothing else),
 * presence and events that are true, false or absent and only on a channel subscribe, an info
 * that is an object of at most CHAN_INFO_MAX bytes and only with presence, and spans (id, data,
 * info) that lie inside the message and are valid JSON themselves; a refused one has a reason; the error reply is valid JSON and valid UTF-8 (it goes out in a text
 * frame) whatever the message held; and a binary message is always refused. */
#include "fuzz.h"
#include "buf.h"
#include "channel.h"
#include "json.h"
#include "pattern.h"
#include "pubsub.h"
#include "ws.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static int inside(const struct json_span *s, const char *buf, size_t size)
{
    return s->p >= buf && s->len > 0 && s->len <= size && s->p + s->len <= buf + size;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A copy of exactly the message's size, so ASan sees any read past its end. */
    char *msg = malloc(size ? size : 1);
    memcpy(msg, data, size);
    struct pubsub_request q;
    const char *error = NULL, *why;
    char error_buf[64];
    int rc = pubsub_parse(msg, size, 0, &q, &error, error_buf);
    if (rc == 0) {
        REQUIRE(json_valid(msg, size));
        REQUIRE(q.op == PUBSUB_SUBSCRIBE || q.op == PUBSUB_UNSUBSCRIBE || q.op == PUBSUB_PUBLISH ||
                q.op == PUBSUB_PRESENCE);
        REQUIRE(q.channel_len >= 1 && q.channel_len <= CHAN_NAME_MAX && q.channel[q.channel_len] == 0);
        REQUIRE(strlen(q.channel) == q.channel_len);
        if (q.is_pattern) {
            /* A pattern takes no other member but "op" and "id". */
            REQUIRE(q.is_pattern == 1);
            REQUIRE(q.op == PUBSUB_SUBSCRIBE || q.op == PUBSUB_UNSUBSCRIBE);
            REQUIRE(q.channel_len <= PATTERN_MAX && pattern_valid(q.channel, q.channel_len, &why));
        } else {
            REQUIRE(chan_name_valid(q.channel, q.channel_len, &why));
        }
        if (q.op == PUBSUB_PUBLISH) {
            REQUIRE(inside(&q.data, msg, size) && json_valid(q.data.p, q.data.len));
        } else {
            REQUIRE(q.data.type == JSON_NONE);
        }
        if (q.op == PUBSUB_SUBSCRIBE && !q.is_pattern) {
            REQUIRE(q.since >= -1);
            REQUIRE(q.epoch_len >= -1 && q.epoch_len <= PUBSUB_EPOCH_MAX);
            if (q.epoch_len >= 0)
                REQUIRE(q.epoch[q.epoch_len] == 0);
            REQUIRE(q.presence >= -1 && q.presence <= 1 && q.events >= -1 && q.events <= 1);
            if (q.info.type != JSON_NONE) {
                REQUIRE(q.presence == 1 && q.info.type == JSON_OBJECT);
                REQUIRE(q.info.len <= CHAN_INFO_MAX);
                REQUIRE(inside(&q.info, msg, size) && json_valid(q.info.p, q.info.len));
                REQUIRE(q.info.p[0] == '{' && q.info.p[q.info.len - 1] == '}');
            }
        } else {
            REQUIRE(q.since == -1 && q.epoch_len == -1);
            REQUIRE(q.presence == -1 && q.events == -1 && q.info.type == JSON_NONE);
        }
    } else {
        REQUIRE(rc == -1 && error && error[0] && strlen(error) < 128);
    }
    if (q.id.type != JSON_NONE)
        REQUIRE(inside(&q.id, msg, size) && json_valid(q.id.p, q.id.len));

    struct buf reply = {0};
    pubsub_error_reply(&reply, rc ? error : "refused", &q.id);
    REQUIRE(json_valid(reply.data, reply.len));
    REQUIRE(ws_utf8_valid((const uint8_t *)reply.data, reply.len));
    buf_free(&reply);

    REQUIRE(pubsub_parse(msg, size, 1, &q, &error, error_buf) == -1 && q.id.type == JSON_NONE);
    free(msg);
    return 0;
}
