/* auth.h - signed access tokens (JWT, HS256) and the channel grants they carry. A backend signs a
 * token with the shared secret; a browser presents it (query string ?token= or an
 * "Authorization: Bearer" header) and may then subscribe and publish to the channels it names.
 *
 * Claims read: "exp" (required, seconds since the epoch), "nbf" (optional), "sub" (optional: who),
 * "subscribe" and "publish" (arrays of channel names; a name ending in '*' grants every channel
 * starting with what precedes it, "*" alone grants all). No I/O; the time is the caller's. */
#ifndef HERALD_AUTH_H
#define HERALD_AUTH_H

#include <stddef.h>

enum auth_action { AUTH_SUBSCRIBE, AUTH_PUBLISH };

struct auth_grants;

/* Verify token[0..len) against secret at time now. Returns the grants (the caller frees them with
 * auth_free), or NULL with *why set to a static reason ("token expired", "bad signature", ...). */
struct auth_grants *auth_verify(const char *token, size_t len, const char *secret, double now,
                                const char **why);
void auth_free(struct auth_grants *g);

/* 1 if g allows action on channel[0..len), else 0. */
int auth_allows(const struct auth_grants *g, enum auth_action action, const char *channel, size_t len);
/* 1 if g allows action on every channel that starts with prefix[0..len) (a grant "x*" where x
 * starts the prefix), else 0. */
int auth_allows_prefix(const struct auth_grants *g, enum auth_action action, const char *prefix,
                       size_t len);

/* The token's "sub" claim, or NULL. */
const char *auth_subject(const struct auth_grants *g);

#endif
