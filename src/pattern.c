/* pattern.c - channel patterns: validation, a reference matcher, and the segment trie.
 *
 * Each trie node is one segment of one or more patterns' text: a literal segment, "*" or ">".
 * A node's "*" and ">" children hang off the node itself; its literal children are kept in one hash
 * table for the whole trie keyed by (parent, segment), so a node with ten thousand literal children
 * finds the one a channel segment names in one probe.
 *
 * Matching keeps a work list of the nodes that match the channel's segments so far: per segment,
 * each node on it puts at most its literal child for the segment and its "*" child on the next
 * list, and reports its ">" child. In relaxed mode a "*" node also stays on the list for the next
 * segment (it may take more than one); a per-step stamp keeps a node from being listed twice, and
 * a per-walk stamp keeps it from being reported twice. */
#include "pattern.h"

#include "buf.h"

#include <stdlib.h>
#include <string.h>

enum seg_kind { SEG_LITERAL, SEG_STAR, SEG_REST };

struct pattern_node {
    struct pattern_node *parent;
    struct pattern_node *hnext;       /* the next literal node in the same table bucket */
    struct pattern_node *star, *rest; /* the "*" and ">" children */
    void *data;                       /* the owner's */
    uint64_t hash;                    /* literal nodes: the table hash of (parent, segment) */
    uint64_t serial;
    uint32_t refs;                    /* pattern_add references: patterns ending here */
    uint32_t kids;                    /* children of every kind */
    uint64_t step;                    /* the last work-list step it was put on */
    uint64_t walk;                    /* the last walk that reported it */
    uint8_t kind;                     /* enum seg_kind */
    uint8_t seg_len;
    char seg[];
};

struct pattern_trie {
    struct pattern_node *root;
    struct pattern_node **table; /* literal nodes by (parent, segment) */
    size_t table_size, literals;
    size_t nodes, patterns;
    uint64_t serial;
    /* 64-bit, so they never wrap: a wrapped stamp could equal one a node still holds, and the node
     * would be skipped for one walk. */
    uint64_t step, walk;
    struct pattern_node **cur, **next; /* the matcher's work lists */
    size_t cur_cap, next_cap;
};

static int seg_char(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '_' || ch == '-' || ch == ':' || ch == '/';
}

int pattern_valid(const char *p, size_t len, const char **why)
{
    if (len == 0) {
        *why = "pattern is empty";
        return 0;
    }
    if (len > PATTERN_MAX) {
        *why = "pattern is longer than 200 bytes";
        return 0;
    }
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && p[i] != '.')
            continue;
        size_t n = i - start;
        const char *s = p + start;
        if (n == 0) {
            *why = "pattern has an empty segment (two dots in a row, or a dot at an end)";
            return 0;
        }
        if (n == 1 && s[0] == '>') {
            if (i != len) {
                *why = "\">\" may only be the last segment of a pattern";
                return 0;
            }
        } else if (!(n == 1 && s[0] == '*')) {
            for (size_t k = 0; k < n; k++) {
                if (s[k] == '*' || s[k] == '>') {
                    *why = "\"*\" and \">\" must be whole segments (between dots)";
                    return 0;
                }
                if (!seg_char((unsigned char)s[k])) {
                    *why = "pattern may only hold A-Z a-z 0-9 _ - : / in segments, \"*\" or \">\" as "
                           "segments, and dots between them";
                    return 0;
                }
            }
        }
        start = i + 1;
    }
    return 1;
}

static enum seg_kind kind_of(const char *s, size_t n)
{
    if (n == 1 && s[0] == '*')
        return SEG_STAR;
    if (n == 1 && s[0] == '>')
        return SEG_REST;
    return SEG_LITERAL;
}

/* Cut s[0..len) at its dots: offsets and lengths into off/lens (room for cap segments). Returns the
 * count, or 0 if there are more than cap. */
static size_t split(const char *s, size_t len, uint16_t *off, uint16_t *lens, size_t cap)
{
    size_t n = 0, start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && s[i] != '.')
            continue;
        if (n == cap)
            return 0;
        off[n] = (uint16_t)start;
        lens[n] = (uint16_t)(i - start);
        n++;
        start = i + 1;
    }
    return n;
}

int pattern_match1(const char *p, size_t plen, const char *name, size_t len, int relaxed)
{
    enum { MAXSEG = PATTERN_MAX + 1 };
    uint16_t po[MAXSEG], pl[MAXSEG], no[MAXSEG], nl[MAXSEG];
    if (len > PATTERN_MAX || plen > PATTERN_MAX)
        return 0;
    size_t np = split(p, plen, po, pl, MAXSEG), nn = split(name, len, no, nl, MAXSEG);
    /* can[k]: pattern segments from pi on match name segments from k on; computed from the last
     * pattern segment back to the first. */
    uint8_t can[MAXSEG + 1], next[MAXSEG + 1];
    for (size_t k = 0; k <= nn; k++)
        next[k] = k == nn;
    for (size_t pi = np; pi-- > 0;) {
        enum seg_kind kind = kind_of(p + po[pi], pl[pi]);
        can[nn] = 0;
        for (size_t k = nn; k-- > 0;) {
            if (kind == SEG_REST)
                can[k] = 1; /* the last segment, and at least one name segment is left */
            else if (kind == SEG_STAR)
                can[k] = next[k + 1] || (relaxed && can[k + 1]);
            else
                can[k] = pl[pi] == nl[k] && memcmp(p + po[pi], name + no[k], nl[k]) == 0 && next[k + 1];
        }
        memcpy(next, can, nn + 1);
    }
    return next[0];
}

size_t pattern_glob(const char *p, size_t len, char *out)
{
    if (len > PATTERN_MAX)
        len = PATTERN_MAX;
    for (size_t i = 0; i < len; i++)
        out[i] = p[i] == '>' ? '*' : p[i];
    out[len] = 0;
    return len;
}

/* --- the trie ------------------------------------------------------------------------------ */

static struct pattern_node *node_new(struct pattern_trie *t, struct pattern_node *parent,
                                     enum seg_kind kind, const char *s, size_t n)
{
    struct pattern_node *node = xcalloc(1, sizeof(*node) + n + 1);
    node->parent = parent;
    node->kind = (uint8_t)kind;
    node->seg_len = (uint8_t)n;
    memcpy(node->seg, s, n);
    node->serial = ++t->serial;
    if (parent) {
        parent->kids++;
        t->nodes++;
    }
    return node;
}

struct pattern_trie *pattern_trie_new(void)
{
    struct pattern_trie *t = xcalloc(1, sizeof(*t));
    t->root = node_new(t, NULL, SEG_LITERAL, "", 0);
    t->table_size = 64;
    t->table = xcalloc(t->table_size, sizeof(*t->table));
    t->cur_cap = t->next_cap = 16;
    t->cur = xmalloc(t->cur_cap * sizeof(*t->cur));
    t->next = xmalloc(t->next_cap * sizeof(*t->next));
    return t;
}

static void free_subtree(struct pattern_trie *t, struct pattern_node *n)
{
    if (!n)
        return;
    free_subtree(t, n->star);
    free_subtree(t, n->rest);
    free(n);
}

void pattern_trie_free(struct pattern_trie *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->table_size; i++) {
        struct pattern_node *n = t->table[i];
        while (n) {
            struct pattern_node *next = n->hnext;
            free_subtree(t, n->star);
            free_subtree(t, n->rest);
            free(n);
            n = next;
        }
    }
    /* "*" and ">" children of the root, and of the "*" and ">" nodes below them, are not in the
     * table; literal nodes under them are, and were freed above. */
    free_subtree(t, t->root->star);
    free_subtree(t, t->root->rest);
    free(t->root);
    free(t->table);
    free(t->cur);
    free(t->next);
    free(t);
}

static uint64_t lit_hash(const struct pattern_node *parent, const char *s, size_t n)
{
    return buf_hash(s, n) ^ ((uint64_t)(uintptr_t)parent * 0x9E3779B97F4A7C15ull);
}

static struct pattern_node *lit_find(const struct pattern_trie *t, const struct pattern_node *parent,
                                     const char *s, size_t n, uint64_t h)
{
    for (struct pattern_node *c = t->table[h & (t->table_size - 1)]; c; c = c->hnext)
        if (c->hash == h && c->parent == parent && c->seg_len == n && memcmp(c->seg, s, n) == 0)
            return c;
    return NULL;
}

static void table_grow(struct pattern_trie *t)
{
    size_t size = t->table_size * 2;
    struct pattern_node **table = xcalloc(size, sizeof(*table));
    for (size_t i = 0; i < t->table_size; i++) {
        struct pattern_node *n = t->table[i];
        while (n) {
            struct pattern_node *next = n->hnext;
            n->hnext = table[n->hash & (size - 1)];
            table[n->hash & (size - 1)] = n;
            n = next;
        }
    }
    free(t->table);
    t->table = table;
    t->table_size = size;
}

/* The child of parent for segment s[0..n), created when create is set; NULL when absent. */
static struct pattern_node *child(struct pattern_trie *t, struct pattern_node *parent, const char *s,
                                  size_t n, int create)
{
    enum seg_kind kind = kind_of(s, n);
    if (kind == SEG_STAR) {
        if (!parent->star && create)
            parent->star = node_new(t, parent, SEG_STAR, s, n);
        return parent->star;
    }
    if (kind == SEG_REST) {
        if (!parent->rest && create)
            parent->rest = node_new(t, parent, SEG_REST, s, n);
        return parent->rest;
    }
    uint64_t h = lit_hash(parent, s, n);
    struct pattern_node *c = lit_find(t, parent, s, n, h);
    if (c || !create)
        return c;
    if (t->literals >= t->table_size)
        table_grow(t);
    c = node_new(t, parent, SEG_LITERAL, s, n);
    c->hash = h;
    c->hnext = t->table[h & (t->table_size - 1)];
    t->table[h & (t->table_size - 1)] = c;
    t->literals++;
    return c;
}

/* The node of pattern p: walked (and, with create, built) segment by segment. */
static struct pattern_node *walk_to(struct pattern_trie *t, const char *p, size_t len, int create)
{
    struct pattern_node *n = t->root;
    size_t start = 0;
    for (size_t i = 0; n && i <= len; i++) {
        if (i < len && p[i] != '.')
            continue;
        n = child(t, n, p + start, i - start, create);
        start = i + 1;
    }
    return n;
}

struct pattern_node *pattern_add(struct pattern_trie *t, const char *p, size_t len)
{
    struct pattern_node *n = walk_to(t, p, len, 1);
    if (n->refs++ == 0)
        t->patterns++;
    return n;
}

struct pattern_node *pattern_find(struct pattern_trie *t, const char *p, size_t len)
{
    struct pattern_node *n = walk_to(t, p, len, 0);
    return n && n->refs ? n : NULL;
}

void pattern_remove(struct pattern_trie *t, struct pattern_node *n)
{
    if (--n->refs == 0)
        t->patterns--;
    while (n != t->root && !n->refs && !n->kids) {
        struct pattern_node *parent = n->parent;
        if (n->kind == SEG_STAR) {
            parent->star = NULL;
        } else if (n->kind == SEG_REST) {
            parent->rest = NULL;
        } else {
            struct pattern_node **pp = &t->table[n->hash & (t->table_size - 1)];
            while (*pp != n)
                pp = &(*pp)->hnext;
            *pp = n->hnext;
            t->literals--;
        }
        parent->kids--;
        t->nodes--;
        free(n);
        n = parent;
    }
}

void *pattern_data(const struct pattern_node *n) { return n->data; }
void pattern_set_data(struct pattern_node *n, void *data) { n->data = data; }
uint64_t pattern_serial(const struct pattern_node *n) { return n->serial; }
size_t pattern_trie_nodes(const struct pattern_trie *t) { return t->nodes; }
size_t pattern_trie_patterns(const struct pattern_trie *t) { return t->patterns; }

/* Put n on the next work list (once per step). */
static void push(struct pattern_trie *t, size_t *nn, struct pattern_node *n)
{
    if (!n || n->step == t->step)
        return;
    n->step = t->step;
    if (*nn == t->next_cap) {
        t->next_cap *= 2;
        t->next = xrealloc(t->next, t->next_cap * sizeof(*t->next));
    }
    t->next[(*nn)++] = n;
}

static void report(struct pattern_trie *t, struct pattern_node *n,
                   void (*fn)(struct pattern_node *n, void *arg), void *arg)
{
    if (n && n->refs && n->walk != t->walk) {
        n->walk = t->walk;
        fn(n, arg);
    }
}

size_t pattern_match(struct pattern_trie *t, const char *name, size_t len, int relaxed,
                     void (*fn)(struct pattern_node *n, void *arg), void *arg)
{
    size_t visited = 0, ncur = 1, start = 0;
    t->walk++;
    t->cur[0] = t->root;
    for (size_t i = 0; i <= len && ncur; i++) {
        if (i < len && name[i] != '.')
            continue;
        const char *s = name + start;
        size_t n = i - start;
        start = i + 1;
        size_t nnext = 0;
        t->step++;
        for (size_t k = 0; k < ncur; k++) {
            struct pattern_node *node = t->cur[k];
            visited++;
            if (node->rest) {
                visited++;
                report(t, node->rest, fn, arg); /* ">" takes this segment and the rest */
            }
            if (relaxed && node->kind == SEG_STAR)
                push(t, &nnext, node); /* takes this segment too */
            push(t, &nnext, node->star);
            if (t->literals && n <= 255)
                push(t, &nnext, lit_find(t, node, s, n, lit_hash(node, s, n)));
        }
        struct pattern_node **swap = t->cur;
        size_t cap = t->cur_cap;
        t->cur = t->next;
        t->cur_cap = t->next_cap;
        t->next = swap;
        t->next_cap = cap;
        ncur = nnext;
    }
    for (size_t k = 0; k < ncur; k++) {
        visited++;
        report(t, t->cur[k], fn, arg);
    }
    return visited;
}
