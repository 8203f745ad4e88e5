/* pattern.h - channel patterns and the trie that matches them.
 *
 * A pattern is a channel name cut into segments at its dots, where a segment "*" matches exactly
 * one segment of the channel (whatever it holds, even nothing) and a last segment ">" matches one
 * or more. "sensors.*.temp" matches "sensors.a.temp"; "sensors.>" matches "sensors.a" and
 * "sensors.a.temp" but not "sensors".
 *
 * The trie holds one node per distinct pattern prefix; literal children are found through one hash
 * table per trie, so matching a channel costs work proportional to its segments and to the nodes
 * that match, whether the trie holds ten patterns or a million. A node carries the owner's data
 * (the subscribers of a pattern); the trie only counts references. No I/O. */
#ifndef HERALD_PATTERN_H
#define HERALD_PATTERN_H

#include <stddef.h>
#include <stdint.h>

#define PATTERN_MAX 200

/* 1 if p[0..len) is a valid pattern: 1 to 200 bytes of segments separated by single dots, each
 * segment "*", ">" (last only) or 1 or more of A-Z a-z 0-9 _ - : /. Else 0 with *why set to a
 * static description of the first problem. */
int pattern_valid(const char *p, size_t len, const char **why);

/* The reference matcher, without a trie: 1 if the valid pattern p matches name[0..len). With
 * relaxed set, "*" matches one or more segments too (what the pattern means as a Redis glob where
 * "*" crosses dots, see pattern_glob). */
int pattern_match1(const char *p, size_t plen, const char *name, size_t len, int relaxed);

/* Write the Redis PSUBSCRIBE glob for the valid pattern p into out (room for PATTERN_MAX + 1 bytes,
 * NUL-terminated): the same text with ">" as "*". Every channel p matches, the glob matches; the
 * glob matches more ("*" crosses dots), exactly the channels p matches relaxed. Returns its length. */
size_t pattern_glob(const char *p, size_t len, char *out);

struct pattern_trie;
struct pattern_node;

struct pattern_trie *pattern_trie_new(void);
/* Free the trie and its nodes (not the data they carry). */
void pattern_trie_free(struct pattern_trie *t);

/* Take a reference on the node of the valid pattern p, creating it (and its path) if needed. */
struct pattern_node *pattern_add(struct pattern_trie *t, const char *p, size_t len);
/* The node of pattern p if some reference holds it, else NULL. */
struct pattern_node *pattern_find(struct pattern_trie *t, const char *p, size_t len);
/* Drop a reference taken by pattern_add. On the last one the node, and the ancestors it leaves
 * empty, are freed: its data must have been dealt with. */
void pattern_remove(struct pattern_trie *t, struct pattern_node *n);

void *pattern_data(const struct pattern_node *n);
void pattern_set_data(struct pattern_node *n, void *data);
/* A number that grows with each node created: a stable order among the patterns a channel
 * matches. */
uint64_t pattern_serial(const struct pattern_node *n);

/* Call fn on the node of every pattern that matches name[0..len) (each once, in no set order).
 * With relaxed set, "*" matches one or more segments. Returns the number of trie nodes visited. No
 * allocation once the trie's work lists have grown to the deepest match. fn must not change the
 * trie. */
size_t pattern_match(struct pattern_trie *t, const char *name, size_t len, int relaxed,
                     void (*fn)(struct pattern_node *n, void *arg), void *arg);

/* Nodes in the trie (the root excluded) and patterns with references. */
size_t pattern_trie_nodes(const struct pattern_trie *t);
size_t pattern_trie_patterns(const struct pattern_trie *t);

#endif
