/* Unit tests of pubsub.c: the generic route's requests, accepted and refused, and the error reply. */
#include "pubsub.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

static struct pubsub_request q;
static const char *error;

/* Parse s from an exact-size heap copy (so AddressSanitizer sees any read past it); 0 or -1. The
 * copy is kept until the next call, since the request's spans point into it. */
static int parse(const char *s, int binary)
{
    static char *copy;
    char error_buf[64];
    static char kept[64];
    size_t len = strlen(s);
    free(copy);
    copy = malloc(len ? len : 1);
    memcpy(copy, s, len);
    error = NULL;
    int rc = pubsub_parse(copy, len, binary, &q, &error, error_buf);
    if (error == error_buf) {
        memcpy(kept, error_buf, sizeof(kept));
        error = kept;
    }
    return rc;
}

static int span_is(const struct json_span *s, const char *text)
{
    return s->type != JSON_NONE && s->len == strlen(text) && memcmp(s->p, text, s->len) == 0;
}

static void accepted(void)
{
    CHECK_EQ(parse("{\"op\":\"subscribe\",\"channel\":\"news\",\"id\":1}", 0), 0);
    CHECK_EQ(q.op, PUBSUB_SUBSCRIBE);
    CHECK(strcmp(q.channel, "news") == 0 && q.channel_len == 4);
    CHECK(span_is(&q.id, "1"));
    CHECK_EQ(q.since, -1);
    CHECK_EQ(q.epoch_len, -1);
    CHECK(q.data.type == JSON_NONE);

    CHECK_EQ(parse(" {\"since\":17,\"epoch\":\"e1\",\"channel\":\"c\\u003a1\",\"op\":\"subscribe\"} ", 0), 0);
    CHECK(strcmp(q.channel, "c:1") == 0);
    CHECK_EQ(q.since, 17);
    CHECK(q.epoch_len == 2 && strcmp(q.epoch, "e1") == 0);

    CHECK_EQ(parse("{\"op\":\"unsubscribe\",\"channel\":\"a/b\"}", 0), 0);
    CHECK_EQ(q.op, PUBSUB_UNSUBSCRIBE);
    CHECK(q.id.type == JSON_NONE);

    CHECK_EQ(parse("{\"op\":\"publish\",\"channel\":\"c\",\"data\":{\"n\":1.50},\"id\":[\"x\"]}", 0), 0);
    CHECK_EQ(q.op, PUBSUB_PUBLISH);
    CHECK(span_is(&q.data, "{\"n\":1.50}")); /* as sent: digits kept */
    CHECK(span_is(&q.id, "[\"x\"]"));

    char name[CHAN_NAME_MAX + 40];
    memset(name, 0, sizeof(name));
    strcpy(name, "{\"op\":\"subscribe\",\"channel\":\"");
    memset(name + strlen(name), 'a', CHAN_NAME_MAX);
    strcat(name, "\"}");
    CHECK_EQ(parse(name, 0), 0);
    CHECK_EQ(q.channel_len, CHAN_NAME_MAX);

    CHECK_EQ(parse("{\"op\":\"subscribe\",\"pattern\":\"sensors.*.temp\",\"id\":2}", 0), 0);
    CHECK(q.op == PUBSUB_SUBSCRIBE && q.is_pattern && strcmp(q.channel, "sensors.*.temp") == 0);
    CHECK_EQ(parse("{\"op\":\"unsubscribe\",\"pattern\":\"a.>\"}", 0), 0);
    CHECK(q.op == PUBSUB_UNSUBSCRIBE && q.is_pattern && q.channel_len == 3);
    CHECK_EQ(parse("{\"op\":\"subscribe\",\"channel\":\"room\",\"presence\":true,\"events\":false,"
                   "\"info\":{\"nick\":\"ann\"}}", 0), 0);
    CHECK(!q.is_pattern && q.presence == 1 && q.events == 0 && q.info.type == JSON_OBJECT &&
          span_is(&q.info, "{\"nick\":\"ann\"}"));
    CHECK_EQ(parse("{\"op\":\"presence\",\"channel\":\"room\"}", 0), 0);
    CHECK(q.op == PUBSUB_PRESENCE && q.presence == -1 && q.events == -1);
}

static void refused(void)
{
    static const struct {
        const char *msg;
        const char *error;
        const char *id; /* the id the error reply carries, or NULL */
    } cases[] = {
        {"[1]", "not a JSON object", NULL},
        {"{\"op\":", NULL, NULL},
        {"{\"channel\":\"c\",\"id\":7}", "missing \"op\"", "7"},
        {"{\"op\":1,\"channel\":\"c\"}", "\"op\" must be one of subscribe, unsubscribe, publish, presence", NULL},
        {"{\"op\":\"jump\",\"channel\":\"c\",\"id\":\"j\"}",
         "unknown \"op\": expected subscribe, unsubscribe, publish or presence", "\"j\""},
        {"{\"op\":\"subscribe\"}", "missing \"channel\"", NULL},
        {"{\"op\":\"subscribe\",\"channel\":5}", "\"channel\" must be a string", NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"\"}", NULL, NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"a b\"}", NULL, NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"c\",\"since\":-1}",
         "\"since\" must be a seq (a whole number >= 0)", NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"c\",\"since\":1.5}",
         "\"since\" must be a seq (a whole number >= 0)", NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"c\",\"epoch\":3}",
         "\"epoch\" must be the string a subscribed reply gave", NULL},
        {"{\"op\":\"publish\",\"channel\":\"c\",\"id\":null}", "missing \"data\"", "null"},
        {"{\"op\":\"subscribe\",\"op\":\"publish\",\"channel\":\"c\"}", "duplicate key \"op\"", NULL},
        {"{\"op\":\"publish\",\"pattern\":\"a.*\",\"data\":1}",
         "\"pattern\" goes with subscribe and unsubscribe (publish and presence take a \"channel\")", NULL},
        {"{\"op\":\"subscribe\",\"pattern\":\"a.*\",\"channel\":\"a\"}",
         "give \"channel\" or \"pattern\", not both", NULL},
        {"{\"op\":\"subscribe\",\"pattern\":\"a.*\",\"since\":1}",
         "since, epoch, presence, events and info go with a \"channel\", not a \"pattern\"", NULL},
        {"{\"op\":\"subscribe\",\"pattern\":7}", "\"pattern\" must be a string", NULL},
        {"{\"op\":\"subscribe\",\"pattern\":\"a..b\"}", NULL, NULL},
        {"{\"op\":\"subscribe\",\"pattern\":\"a.>.b\"}", NULL, NULL},
        {"{\"op\":\"publish\",\"channel\":\"c\",\"data\":1,\"presence\":true}",
         "presence, events and info go with subscribe", NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"c\",\"presence\":1}", "\"presence\" must be true or false", NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"c\",\"events\":\"yes\"}", "\"events\" must be true or false", NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"c\",\"presence\":true,\"info\":[1]}",
         "\"info\" must be a JSON object", NULL},
        {"{\"op\":\"subscribe\",\"channel\":\"c\",\"info\":{}}", "\"info\" goes with \"presence\":true", NULL},
        {"{\"op\":\"presence\"}", "missing \"channel\"", NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        CHECK_EQ(parse(cases[i].msg, 0), -1);
        CHECK(error && error[0]);
        if (cases[i].error && (!error || strcmp(error, cases[i].error) != 0)) {
            fprintf(stderr, "case %zu: error \"%s\"\n", i, error ? error : "(none)");
            CHECK(0);
        }
        CHECK(cases[i].id ? span_is(&q.id, cases[i].id) : q.id.type == JSON_NONE);
    }
    char name[CHAN_NAME_MAX + 40];
    memset(name, 0, sizeof(name));
    strcpy(name, "{\"op\":\"subscribe\",\"channel\":\"");
    memset(name + strlen(name), 'a', CHAN_NAME_MAX + 1);
    strcat(name, "\"}");
    CHECK_EQ(parse(name, 0), -1);
    CHECK(strcmp(error, "channel name is longer than 200 bytes") == 0);
    /* binary frames are refused before they are looked at, so the reply has no id */
    CHECK_EQ(parse("{\"op\":\"subscribe\",\"channel\":\"c\",\"id\":1}", 1), -1);
    CHECK(q.id.type == JSON_NONE);
}

static void error_reply(void)
{
    struct buf b = {0};
    CHECK_EQ(parse("{\"op\":\"jump\",\"id\":{\"k\":[1]}}", 0), -1);
    pubsub_error_reply(&b, error, &q.id);
    buf_append(&b, "", 1);
    CHECK(strcmp(b.data, "{\"op\":\"error\",\"error\":\"unknown \\\"op\\\": expected subscribe, "
                         "unsubscribe, publish or presence\",\"id\":{\"k\":[1]}}") == 0);
    b.len = 0;
    pubsub_error_reply(&b, "bad \xff\n", NULL);
    CHECK(json_valid(b.data, b.len));
    buf_free(&b);
}

/* A seq as text, wherever it comes from: digits only, up to INT64_MAX. */
static void seqs(void)
{
    CHECK_EQ(pubsub_seq_parse("0", 1), 0);
    CHECK_EQ(pubsub_seq_parse("0042", 4), 42);
    CHECK_EQ(pubsub_seq_parse("9223372036854775807", 19), INT64_MAX);
    CHECK_EQ(pubsub_seq_parse("9223372036854775808", 19), -1);
    CHECK_EQ(pubsub_seq_parse("9999999999999999999", 19), -1);
    CHECK_EQ(pubsub_seq_parse("00000000000000000001", 20), -1); /* more than 19 digits */
    CHECK_EQ(pubsub_seq_parse("12", 1), 1);                     /* only len bytes are read */
    const char *bad[] = {"", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x10", "\xd9\xa1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK_EQ(pubsub_seq_parse(bad[i], strlen(bad[i])), -1);
    CHECK_EQ(parse("{\"op\":\"subscribe\",\"channel\":\"c\",\"since\":9223372036854775807}", 0), 0);
    CHECK_EQ(q.since, INT64_MAX);
    CHECK_EQ(parse("{\"op\":\"subscribe\",\"channel\":\"c\",\"since\":9223372036854775808}", 0), -1);
}

int main(void)
{
    accepted();
    refused();
    error_reply();
    seqs();
    return TEST_REPORT();
}
