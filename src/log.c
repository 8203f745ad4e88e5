/* log.c - diagnostics to stderr and the buffered access log. */
#include "log.h"

#include "buf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static enum log_level min_level = LOG_LEVEL_INFO;
static int access_fd = -1;
static struct buf access_buf;

/* Above this much buffered, the access log is written at once rather than at the end of the pass,
 * so a burst of requests cannot grow the buffer without bound. */
#define ACCESS_FLUSH_AT 65536

void log_set_level(enum log_level level) { min_level = level; }

int log_level_parse(const char *name)
{
    static const char *const names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    static const char *const tags[] = {"debug", "info", "warn", "error"};
    if (level < min_level)
        return;
    char line[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    int n = (int)strftime(line, sizeof(line), "%Y-%m-%d %H:%M:%S", &tm);
    n += snprintf(line + n, sizeof(line) - (size_t)n, ".%03ld %s: ", ts.tv_nsec / 1000000, tags[level]);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    n += m;
    if (n > (int)sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    /* One write per line so lines from a crash handler or a child cannot interleave mid-line. */
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}

int log_access_open(const char *path)
{
    log_access_flush();
    if (access_fd >= 0)
        close(access_fd);
    access_fd = -1;
    if (!path)
        return 0;
    access_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    return access_fd < 0 ? -1 : 0;
}

/* Append s[0..len) with quotes and backslashes escaped, as Apache does, so a field cannot break
 * the line's format. */
static void append_escaped(struct buf *b, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\')
            buf_printf(b, "\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f)
            buf_printf(b, "\\x%02x", ch);
        else
            buf_append(b, &s[i], 1);
    }
}

void log_access(const char *client, const char *method, size_t method_len, const char *target,
                size_t target_len, int minor_version, int status, long long bytes,
                const char *referer, size_t referer_len, const char *agent, size_t agent_len)
{
    if (access_fd < 0)
        return;
    static time_t cached_sec;
    static char cached_time[40];
    time_t now = time(NULL);
    if (now != cached_sec) {
        struct tm tm;
        localtime_r(&now, &tm);
        strftime(cached_time, sizeof(cached_time), "%d/%b/%Y:%H:%M:%S %z", &tm);
        cached_sec = now;
    }
    struct buf *b = &access_buf;
    buf_printf(b, "%s - - [%s] \"", client ? client : "-", cached_time);
    if (method) {
        append_escaped(b, method, method_len);
        buf_append(b, " ", 1);
        append_escaped(b, target, target_len);
        buf_printf(b, " HTTP/1.%d", minor_version);
    } else {
        buf_append(b, "-", 1);
    }
    buf_printf(b, "\" %d ", status);
    if (bytes < 0)
        buf_append(b, "-", 1);
    else
        buf_printf(b, "%lld", bytes);
    buf_append(b, " \"", 2);
    if (referer)
        append_escaped(b, referer, referer_len);
    else
        buf_append(b, "-", 1);
    buf_append(b, "\" \"", 3);
    if (agent)
        append_escaped(b, agent, agent_len);
    else
        buf_append(b, "-", 1);
    buf_append(b, "\"\n", 2);
    if (b->len >= ACCESS_FLUSH_AT)
        log_access_flush();
}

void log_access_flush(void)
{
    size_t off = 0;
    while (access_fd >= 0 && off < access_buf.len) {
        ssize_t n = write(access_fd, access_buf.data + off, access_buf.len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            log_error("access log: write failed: %s; dropping %zu bytes", strerror(errno),
                      access_buf.len - off);
            break;
        }
        off += (size_t)n;
    }
    access_buf.len = 0;
}
