/* fuzz_pattern.c - libFuzzer driver for pattern.c.
 *
 * The input is lines: patterns, then (after an empty line) channel names. Every valid pattern is
 * added to a trie; for every valid channel name the trie's matches, strict and relaxed, must be
 * exactly the patterns the reference matcher accepts, each once; relaxed matching must agree with
 * the pattern's glob; removing the patterns must leave the trie empty. */
#include "fuzz.h"
#include "pattern.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


#define MAX_PATTERNS 32

struct pat {
    const char *p;
    size_t len;
    struct pattern_node *node;
    int seen;
};

static struct pat pats[MAX_PATTERNS];
static size_t npats;

static void seen_cb(struct pattern_node *n, void *arg)
{
    struct pat *p = pattern_data(n);
    REQUIRE(p != NULL);
    p->seen++;
}

/* A channel name as herald accepts it (channel.c's rule, repeated: the fuzzer links no broker). */
static int channel_valid(const char *s, size_t len)
{
    if (!len || len > 200)
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-' || c == '.' || c == ':' || c == '/'))
            return 0;
    }
    return 1;
}

/* '*' matches any run of bytes; nothing else is special (what Redis does with our globs). */
static int glob(const char *p, size_t plen, const char *s, size_t slen)
{
    size_t pi = 0, si = 0, star_p = (size_t)-1, star_s = 0;
    while (si < slen) {
        if (pi < plen && p[pi] == '*') {
            star_p = ++pi;
            star_s = si;
        } else if (pi < plen && p[pi] == s[si]) {
            pi++;
            si++;
        } else if (star_p != (size_t)-1) {
            pi = star_p;
            si = ++star_s;
        } else {
            return 0;
        }
    }
    while (pi < plen && p[pi] == '*')
        pi++;
    return pi == plen;
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
    const char *text = (const char *)d;
    struct pattern_trie *t = pattern_trie_new();
    npats = 0;
    size_t i = 0;
    int channels = 0;
    while (i <= n) {
        const char *line = text + i;
        const char *nl = memchr(line, '\n', n - i);
        size_t len = nl ? (size_t)(nl - line) : n - i;
        i += len + 1;
        if (!channels && len == 0) {
            channels = 1;
            continue;
        }
        const char *why = NULL;
        if (!channels) {
            if (!pattern_valid(line, len, &why)) {
                REQUIRE(why && why[0]);
                continue;
            }
            if (npats == MAX_PATTERNS)
                continue;
            struct pat *p = &pats[npats++];
            p->p = line;
            p->len = len;
            struct pattern_node *found = pattern_find(t, line, len);
            p->node = pattern_add(t, line, len);
            REQUIRE(!found || found == p->node);
            pattern_set_data(p->node, p); /* duplicates: the last one's */
            continue;
        }
        if (!channel_valid(line, len))
            continue;
        for (int relaxed = 0; relaxed < 2; relaxed++) {
            for (size_t k = 0; k < npats; k++)
                pats[k].seen = 0;
            pattern_match(t, line, len, relaxed, seen_cb, NULL);
            for (size_t k = 0; k < npats; k++) {
                struct pat *p = &pats[k];
                if (pattern_data(p->node) != p)
                    continue; /* a duplicate: counted on the one holding the node */
                int want = pattern_match1(p->p, p->len, line, len, relaxed);
                REQUIRE(p->seen == want);
                if (relaxed) {
                    char g[PATTERN_MAX + 1];
                    size_t gl = pattern_glob(p->p, p->len, g);
                    REQUIRE(glob(g, gl, line, len) == want);
                }
            }
        }
    }
    for (size_t k = 0; k < npats; k++)
        pattern_remove(t, pats[k].node);
    REQUIRE(pattern_trie_nodes(t) == 0 && pattern_trie_patterns(t) == 0);
    pattern_trie_free(t);
    return 0;
}
