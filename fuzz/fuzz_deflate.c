/* fuzz_deflate.c - permessage-deflate: the offer parser against its own answers, the bounded
 * inflater fed in pieces against the same bytes fed whole, and compress-then-inflate round trips.
 *
 * Input: byte 0 picks the piece size (low 3 bits), text (bit 3), no context takeover (bit 4) and
 * max (top 3 bits); byte 1 the window sizes and level, and (bit 7) a round trip; the rest is the
 * data: an offer list, and the payload of two compressed messages in a row. */
#include "fuzz.h"
#include "deflate.h"
#include "ws.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static void check_negotiate(const uint8_t *data, size_t len)
{
    struct pmd_params p, again;
    char resp[PMD_RESPONSE_MAX], resp2[PMD_RESPONSE_MAX];
    if (!pmd_negotiate((const char *)data, len, &p, resp, sizeof(resp)))
        return;
    REQUIRE(p.server_bits >= PMD_MIN_SERVER_BITS && p.server_bits <= 15);
    REQUIRE(p.client_bits >= 8 && p.client_bits <= 15);
    REQUIRE(p.client_no_context_takeover <= 1);
    REQUIRE(strlen(resp) < sizeof(resp));
    REQUIRE(strncmp(resp, "permessage-deflate; server_no_context_takeover", 46) == 0);
    /* Our answer is itself a valid offer, and asks for the same of us. */
    REQUIRE(pmd_negotiate(resp, strlen(resp), &again, resp2, sizeof(resp2)) == 1);
    REQUIRE(again.server_bits == p.server_bits);
    REQUIRE(again.client_no_context_takeover == p.client_no_context_takeover);
    REQUIRE(strcmp(resp, resp2) == 0);
}

/* One message through f in pieces of step bytes; returns the close code, the output in out. */
static int inflate_message(struct pmd_inflater *f, const uint8_t *p, size_t len, size_t step, int text,
                           struct buf *out, size_t max)
{
    const char *why = NULL;
    size_t off = 0;
    out->len = 0;
    do {
        size_t n = len - off < step ? len - off : step;
        int rc = pmd_inflate(f, p + off, n, off + n == len, text, out, max, &why);
        REQUIRE(out->len <= max);
        if (rc) {
            REQUIRE(rc == WS_CLOSE_INVALID_DATA || rc == WS_CLOSE_TOO_BIG);
            REQUIRE(why && why[0]);
            REQUIRE(pmd_inflater_idle(f));
            return rc;
        }
        off += n;
    } while (off < len);
    REQUIRE(pmd_inflater_idle(f));
    if (text)
        REQUIRE(ws_utf8_valid((const uint8_t *)out->data, out->len));
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t steps[8] = {1, 2, 3, 7, 64, 512, 4096, (size_t)-1};
    static const size_t maxes[8] = {0, 1, 16, 255, 256, 1000, 4096, 65536};
    if (size < 2)
        return 0;
    size_t step = steps[data[0] & 7], max = maxes[data[0] >> 5];
    int text = (data[0] >> 3) & 1, nct = (data[0] >> 4) & 1;
    int level = 1 + (data[1] & 15) % 9;
    int server_bits = PMD_MIN_SERVER_BITS + (data[1] >> 3 & 15) % (16 - PMD_MIN_SERVER_BITS);
    const uint8_t *rest = data + 2;
    size_t len = size - 2;

    check_negotiate(rest, len);

    /* The payload as two messages in a row: in pieces and whole, the same verdicts and bytes. */
    struct pmd_inflater *a = pmd_inflater_new(nct), *b = pmd_inflater_new(nct);
    struct buf out_a = {0}, out_b = {0};
    for (int m = 0; m < 2; m++) {
        int ra = inflate_message(a, rest, len, step, text, &out_a, max);
        int rb = inflate_message(b, rest, len, (size_t)-1, text, &out_b, max);
        REQUIRE(ra == rb);
        REQUIRE(ra || (out_a.len == out_b.len && (!out_a.len || memcmp(out_a.data, out_b.data, out_a.len) == 0)));
        if (ra)
            break;
    }
    pmd_inflater_free(a);
    pmd_inflater_free(b);

    /* Round trip: what we send inflates back with the window it was made for. */
    if (data[1] & 0x80) {
        struct pmd_inflater *f = pmd_inflater_new(1);
        if (pmd_compress(server_bits, level, 0, rest, len, &out_a)) {
            REQUIRE(out_a.len < len);
            REQUIRE(inflate_message(f, (const uint8_t *)out_a.data, out_a.len, step, 0, &out_b, len) == 0);
            REQUIRE(out_b.len == len && memcmp(out_b.data, rest, len) == 0);
        }
        pmd_inflater_free(f);
    }
    buf_free(&out_a);
    buf_free(&out_b);
    return 0;
}
