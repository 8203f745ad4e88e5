/* Unit tests of pattern.c: validation, the matching rules, the trie against the reference matcher
 * (strict, and relaxed against a plain glob matcher), pruning, and the work a match takes with ten
 * or ten thousand patterns in the trie. */
#include "pattern.h"
#include "test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int valid(const char *p)
{
    const char *why = NULL;
    int v = pattern_valid(p, strlen(p), &why);
    if (!v)
        CHECK(why != NULL && why[0]);
    return v;
}

static int match(const char *p, const char *name) { return pattern_match1(p, strlen(p), name, strlen(name), 0); }
static int relaxed(const char *p, const char *name) { return pattern_match1(p, strlen(p), name, strlen(name), 1); }

static void test_valid(void)
{
    static const char *const good[] = {"a", "*", ">", "a.b", "a.*", "a.>", "*.b", "*.*", "*.>",
                                       "sensors.*.temp", "Az09_-:/.x", "a.b.c.d.e.f", "x:y/z.*.>"};
    static const char *const bad[] = {"", ".", "a.", ".a", "a..b", "a*", "*a", "a.b*", ">.a",
                                      "a.>.b", ">>", "**", "a b", "a.*.b c", "caf\xc3\xa9.*", "a?",
                                      "a.[b]", "a\\.b", "a.>.", "*..*"};
    for (size_t i = 0; i < sizeof(good) / sizeof(*good); i++)
        CHECK(valid(good[i]));
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        if (valid(bad[i]))
            fprintf(stderr, "accepted: \"%s\"\n", bad[i]);
        CHECK(!valid(bad[i]));
    }
    char long_p[202];
    memset(long_p, 'a', sizeof(long_p));
    const char *why;
    CHECK(pattern_valid(long_p, 200, &why));
    CHECK(!pattern_valid(long_p, 201, &why));
    CHECK(!pattern_valid("a\0b", 3, &why));
}

static void test_rules(void)
{
    CHECK(match("sensors.*.temp", "sensors.a.temp"));
    CHECK(match("sensors.*.temp", "sensors..temp")); /* "*" takes one segment, even an empty one */
    CHECK(!match("sensors.*.temp", "sensors.a.b.temp"));
    CHECK(!match("sensors.*.temp", "sensors.temp"));
    CHECK(!match("sensors.*.temp", "sensors.a.temp.x"));
    CHECK(match("sensors.>", "sensors.a"));
    CHECK(match("sensors.>", "sensors.a.b.c"));
    CHECK(match("sensors.>", "sensors."));
    CHECK(!match("sensors.>", "sensors"));
    CHECK(!match("sensors.>", "sensorsx.a"));
    CHECK(match(">", "a"));
    CHECK(match(">", "a.b.c"));
    CHECK(match("*", "abc"));
    CHECK(!match("*", "a.b"));
    CHECK(match("*.*", "a.b"));
    CHECK(match("*.>", "a.b.c"));
    CHECK(!match("*.>", "a"));
    CHECK(match("a.b", "a.b"));
    CHECK(!match("a.b", "a.bc"));
    CHECK(!match("a.b", "a.b.c"));
    CHECK(match("a:b/c.*", "a:b/c.x"));
    /* Relaxed: "*" takes one or more segments, as the glob with "*" crossing dots does. */
    CHECK(relaxed("sensors.*.temp", "sensors.a.b.temp"));
    CHECK(relaxed("sensors.*.temp", "sensors.a.temp"));
    CHECK(!relaxed("sensors.*.temp", "sensors.temp"));
    CHECK(relaxed("*.x", "a.b.x"));
    CHECK(!relaxed("*.x", "x"));
    CHECK(relaxed("a.*.*", "a.b.c.d"));
    CHECK(!relaxed("a.*.*", "a.b"));
}

/* A glob matcher where '*' matches any run of bytes (dots too) and nothing else is special: what
 * Redis does with the globs pattern_glob makes. */
static int glob(const char *p, const char *s)
{
    if (!*p)
        return !*s;
    if (*p == '*') {
        for (const char *q = s;; q++) {
            if (glob(p + 1, q))
                return 1;
            if (!*q)
                return 0;
        }
    }
    return *s && *p == *s && glob(p + 1, s + 1);
}

struct collect {
    const char *found[64];
    size_t n;
};

static void collect_cb(struct pattern_node *n, void *arg)
{
    struct collect *c = arg;
    if (c->n < 64)
        c->found[c->n++] = pattern_data(n);
    else
        CHECK(!"too many matches");
}

static int listed(const struct collect *c, const char *p)
{
    int k = 0;
    for (size_t i = 0; i < c->n; i++)
        k += strcmp(c->found[i], p) == 0;
    return k;
}

static const char *const alphabet_pats[] = {
    "a", "b", "*", ">", "a.b", "a.*", "*.b", "*.*", "a.>", "*.>", "a.b.c", "a.*.c", "*.*.c", "a.b.>",
    "*.b.*", "b.>", "*.*.*", "a.*.>", "c.*", "a.c", "*.a.*", "b.*.a", "a.a.a", "*.*.*.*", "a.>"};

/* Every channel of up to four segments over {a, b, c, ""}: the trie finds exactly the patterns the
 * reference matcher says match, each once, strict and relaxed; and relaxed agrees with the glob. */
static void test_trie_against_reference(void)
{
    struct pattern_trie *t = pattern_trie_new();
    size_t np = sizeof(alphabet_pats) / sizeof(*alphabet_pats);
    for (size_t i = 0; i < np; i++) {
        struct pattern_node *n = pattern_add(t, alphabet_pats[i], strlen(alphabet_pats[i]));
        pattern_set_data(n, (void *)alphabet_pats[i]);
    }
    CHECK_EQ(pattern_trie_patterns(t), np - 1); /* "a.>" is listed twice */
    static const char *const segs[] = {"a", "b", "c", ""};
    char name[64];
    size_t checked = 0;
    for (int depth = 1; depth <= 4; depth++) {
        int total = 1;
        for (int d = 0; d < depth; d++)
            total *= 4;
        for (int code = 0; code < total; code++) {
            size_t len = 0;
            int x = code;
            for (int d = 0; d < depth; d++) {
                if (d)
                    name[len++] = '.';
                const char *s = segs[x % 4];
                x /= 4;
                memcpy(name + len, s, strlen(s));
                len += strlen(s);
            }
            name[len] = 0;
            if (!len)
                continue; /* not a channel name */
            for (int mode = 0; mode < 2; mode++) {
                struct collect c = {.n = 0};
                pattern_match(t, name, len, mode, collect_cb, &c);
                for (size_t i = 0; i < np; i++) {
                    const char *p = alphabet_pats[i];
                    int want = pattern_match1(p, strlen(p), name, len, mode);
                    if (listed(&c, p) != want) {
                        fprintf(stderr, "%s: %s %s: trie %d, reference %d\n", mode ? "relaxed" : "strict",
                                p, name, listed(&c, p), want);
                        CHECK(0);
                    }
                    if (mode) {
                        char g[PATTERN_MAX + 1];
                        pattern_glob(p, strlen(p), g);
                        CHECK_EQ(glob(g, name), want);
                    }
                }
                checked++;
            }
        }
    }
    CHECK(checked > 300);
    pattern_trie_free(t);
}

static void count_cb(struct pattern_node *n, void *arg) { ++*(size_t *)arg; }

/* Nodes come and go with their references; emptied branches are pruned. */
static void test_add_remove(void)
{
    struct pattern_trie *t = pattern_trie_new();
    struct pattern_node *a = pattern_add(t, "x.y.*", 5);
    struct pattern_node *b = pattern_add(t, "x.y.*", 5);
    CHECK(a == b);
    struct pattern_node *c = pattern_add(t, "x.>", 3);
    CHECK_EQ(pattern_trie_nodes(t), 4); /* x, y, *, > */
    CHECK_EQ(pattern_trie_patterns(t), 2);
    CHECK(pattern_find(t, "x.y.*", 5) == a);
    CHECK(pattern_find(t, "x.y", 3) == NULL); /* a path, not a pattern */
    CHECK(pattern_serial(c) > pattern_serial(a));
    pattern_remove(t, a);
    CHECK(pattern_find(t, "x.y.*", 5) == a);
    pattern_remove(t, b);
    CHECK(pattern_find(t, "x.y.*", 5) == NULL);
    CHECK_EQ(pattern_trie_nodes(t), 2); /* x and > */
    size_t n = 0;
    pattern_match(t, "x.y.z", 5, 0, count_cb, &n);
    CHECK_EQ(n, 1);
    pattern_remove(t, c);
    CHECK_EQ(pattern_trie_nodes(t), 0);
    CHECK_EQ(pattern_trie_patterns(t), 0);
    n = 0;
    CHECK(pattern_match(t, "x.y.z", 5, 0, count_cb, &n) <= 1);
    CHECK_EQ(n, 0);
    /* Many literal children: the table grows and every one is still found. */
    char p[32];
    struct pattern_node *nodes[2000];
    for (int i = 0; i < 2000; i++) {
        int len = snprintf(p, sizeof(p), "k.%d.*", i);
        nodes[i] = pattern_add(t, p, (size_t)len);
    }
    for (int i = 0; i < 2000; i += 7) {
        int len = snprintf(p, sizeof(p), "k.%d.v", i);
        n = 0;
        pattern_match(t, p, (size_t)len, 0, count_cb, &n);
        CHECK_EQ(n, 1);
    }
    for (int i = 0; i < 2000; i++)
        pattern_remove(t, nodes[i]);
    CHECK_EQ(pattern_trie_nodes(t), 0);
    pattern_trie_free(t);
}

/* The work of a match depends on the channel and the nodes that match, not on how many patterns
 * the trie holds. */
static void test_work_does_not_scale(void)
{
    struct pattern_trie *t = pattern_trie_new();
    char p[64];
    for (int i = 0; i < 10; i++) {
        int len = snprintf(p, sizeof(p), "sensors.%d.*", i);
        pattern_add(t, p, (size_t)len);
    }
    pattern_add(t, "sensors.>", 9);
    size_t n = 0;
    size_t small = pattern_match(t, "sensors.5.temp", 14, 0, count_cb, &n);
    CHECK_EQ(n, 2);
    for (int i = 10; i < 10000; i++) {
        int len = snprintf(p, sizeof(p), "sensors.%d.*", i);
        pattern_add(t, p, (size_t)len);
        len = snprintf(p, sizeof(p), "other.%d.>", i);
        pattern_add(t, p, (size_t)len);
    }
    CHECK_EQ(pattern_trie_patterns(t), 10 + 1 + 2 * 9990);
    n = 0;
    size_t large = pattern_match(t, "sensors.5.temp", 14, 0, count_cb, &n);
    CHECK_EQ(n, 2);
    CHECK_EQ(small, large);
    CHECK(large <= 8);
    n = 0;
    CHECK(pattern_match(t, "nothing.here", 12, 0, count_cb, &n) <= 3);
    CHECK_EQ(n, 0);
    pattern_trie_free(t);
}

/* Random patterns and channels over a small alphabet, strict and relaxed, against the reference. */
static void test_random(void)
{
    unsigned seed = 12345;
    struct pattern_trie *t = pattern_trie_new();
    static char pats[300][40];
    size_t np = 0;
    while (np < 300) {
        char *p = pats[np];
        size_t len = 0;
        int segs = 1 + (int)((seed = seed * 1103515245 + 12345) >> 16) % 5;
        for (int s = 0; s < segs; s++) {
            unsigned r = (seed = seed * 1103515245 + 12345) >> 16;
            if (s)
                p[len++] = '.';
            if (r % 4 == 0)
                p[len++] = '*';
            else if (r % 4 == 1 && s == segs - 1)
                p[len++] = '>';
            else
                p[len++] = (char)('a' + r % 3);
        }
        p[len] = 0;
        const char *why;
        CHECK(pattern_valid(p, len, &why));
        pattern_set_data(pattern_add(t, p, len), p);
        np++;
    }
    for (int round = 0; round < 3000; round++) {
        char name[40];
        size_t len = 0;
        int segs = 1 + (int)((seed = seed * 1103515245 + 12345) >> 16) % 6;
        for (int s = 0; s < segs; s++) {
            unsigned r = (seed = seed * 1103515245 + 12345) >> 16;
            if (s)
                name[len++] = '.';
            if (r % 5)
                name[len++] = (char)('a' + r % 3);
        }
        name[len] = 0;
        if (!len)
            continue;
        int mode = round & 1;
        size_t total = 0;
        pattern_match(t, name, len, mode, count_cb, &total);
        size_t want = 0;
        for (size_t i = 0; i < np; i++) {
            int dup = 0;
            for (size_t j = 0; j < i; j++)
                dup |= strcmp(pats[i], pats[j]) == 0;
            if (!dup)
                want += (size_t)pattern_match1(pats[i], strlen(pats[i]), name, len, mode);
        }
        CHECK_EQ(total, want);
    }
    pattern_trie_free(t);
}

int main(void)
{
    test_valid();
    test_rules();
    test_trie_against_reference();
    test_add_remove();
    test_work_does_not_scale();
    test_random();
    return TEST_REPORT();
}
