/* log.h - the broker's diagnostic log (stderr, with levels) and its HTTP access log (combined
 * format, buffered and written at most once per loop pass, never once per request). */
#ifndef HERALD_LOG_H
#define HERALD_LOG_H

#include <stddef.h>

enum log_level { LOG_LEVEL_DEBUG, LOG_LEVEL_INFO, LOG_LEVEL_WARN, LOG_LEVEL_ERROR };

void log_set_level(enum log_level level);
/* Parse "debug", "info", "warn" or "error"; -1 if none. */
int log_level_parse(const char *name);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_LEVEL_ERROR, __VA_ARGS__)

/* Open (or, with NULL, close) the access log. Returns 0, or -1 with errno set. */
int log_access_open(const char *path);
/* One request in the combined format. Strings may be NULL ("-"); bytes < 0 logs "-". */
void log_access(const char *client, const char *method, size_t method_len, const char *target,
                size_t target_len, int minor_version, int status, long long bytes,
                const char *referer, size_t referer_len, const char *agent, size_t agent_len);
/* Write out what is buffered. Called once per loop pass and at exit. */
void log_access_flush(void);

#endif
