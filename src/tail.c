/* tail.c - tailed files: each configured file is followed like `tail -F`, one published message
 * per line.
 *
 * A tailer holds the open file (its descriptor, device and inode) and the offset read up to. It is
 * woken by an ev_stat on the path (inotify where libev can use it, polling otherwise) and by a
 * periodic timer, the fallback for everything inotify does not report (growth of a file that was
 * renamed away, file systems without inotify). Each wake-up reads what is new, in bounded passes:
 * past PASS_BUDGET bytes the rest waits for the next loop iteration, so a burst of lines does not
 * stall the clients.
 *
 * At the end of the open file the path is checked:
 *   - the same file: caught up;
 *   - truncated (size below the offset, copytruncate): read again from 0;
 *   - another file (rename-and-recreate rotation, or delete and re-create): the old file was read
 *     to its end, so switch to the new one from offset 0. While the new file is still empty and
 *     the old one still has a name, keep following the old one: a writer that has not reopened
 *     its log yet is still appending there;
 *   - no file: if the old file was deleted, close it and wait for the path to reappear; if it was
 *     renamed away, keep following it until a new file appears.
 * A file that is there at start is followed from its end (from its last complete line), unless
 * from_start is set; a file that appears later is read from its beginning.
 *
 * Lines: the newline is not published, nor a \r before it; a last line without its newline waits
 * for it (and is published as it is when the file is left behind by a rotation or truncation); a
 * line longer than max_message is published in max_message pieces cut at UTF-8 character
 * boundaries, and counted. */
#include "source.h"

#include "buf.h"
#include "channel.h"
#include "config.h"
#include "json.h"
#include "log.h"
#include "stats.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define READ_CHUNK 65536
/* Bytes read per file per loop iteration before yielding to the loop. */
#define PASS_BUDGET (4 * READ_CHUNK)
/* The check interval while an old, renamed file is still followed: inotify watches the path's
 * new file then, so the old one's last lines are only found by looking. */
#define ROTATED_POLL 0.1

struct tailer {
    struct tailer *next;
    char *path;
    char *channel;
    size_t channel_len;
    double poll;
    int fd;               /* -1 while the file is missing (or unreadable) */
    dev_t dev;
    ino_t ino;
    off_t offset;         /* read up to here in fd */
    int rotated;          /* the path names another file, or none: fd is the old file */
    int in_long_line;     /* pieces of the current over-long line were published */
    int missing_logged;   /* "waiting for it" was said: quiet until the file appears */
    int error_logged;     /* a read or open error was said */
    struct buf partial;   /* the last line read, still without its newline */
    ev_stat stat;
    ev_timer timer;
    uint64_t lines, messages, split, rotations, truncations, bytes;
};

static struct ev_loop *loop;
static struct tailer *tailers;
static size_t max_message = 1048576;
static char readbuf[READ_CHUNK];
static int registered;

/* --- lines -------------------------------------------------------------------------------------- */

static void publish(struct tailer *t, const char *data, size_t len)
{
    struct chan_msg m = {.channel = t->channel, .channel_len = t->channel_len, .data = data,
                         .len = len, .utf8 = -1, .json = -1};
    chan_publish(&m, NULL);
    t->messages++;
}

/* Where to cut data (longer than max) so the first piece holds at most max bytes and does not end
 * inside a UTF-8 sequence (text that is not UTF-8 is cut at max). */
static size_t cut_at(const char *data, size_t max)
{
    size_t cut = max;
    for (int back = 0; back < 3 && cut > 1 && ((unsigned char)data[cut] & 0xc0) == 0x80; back++)
        cut--;
    return ((unsigned char)data[cut] & 0xc0) == 0x80 ? max : cut;
}

/* Publish the pieces of an over-long line, leaving at most max bytes. */
static size_t publish_pieces(struct tailer *t, const char *data, size_t len)
{
    size_t done = 0;
    while (len - done > max_message) {
        size_t cut = cut_at(data + done, max_message);
        publish(t, data + done, cut);
        done += cut;
        if (!t->in_long_line) {
            t->in_long_line = 1;
            t->split++;
        }
    }
    return done;
}

/* A complete line (without its newline). */
static void emit_line(struct tailer *t, const char *data, size_t len)
{
    if (len && data[len - 1] == '\r')
        len--;
    size_t done = publish_pieces(t, data, len);
    if (len > done || !t->in_long_line)
        publish(t, data + done, len - done);
    t->in_long_line = 0;
    t->lines++;
}

static void consume(struct tailer *t, const char *data, size_t n)
{
    while (n) {
        const char *nl = memchr(data, '\n', n);
        if (!nl) {
            buf_append(&t->partial, data, n);
            /* Strictly over max: the piece published never holds the line's last byte, so a \r
             * before a newline still to come is never published. */
            size_t done = publish_pieces(t, t->partial.data, t->partial.len);
            buf_consume(&t->partial, done);
            return;
        }
        size_t len = (size_t)(nl - data);
        if (t->partial.len) {
            buf_append(&t->partial, data, len);
            emit_line(t, t->partial.data, t->partial.len);
            t->partial.len = 0;
        } else {
            emit_line(t, data, len);
        }
        data = nl + 1;
        n -= len + 1;
    }
}

/* The file is being left (rotation, truncation, deletion): its unfinished last line will get no
 * newline, so it is published as it is. */
static void finish_partial(struct tailer *t)
{
    if (t->partial.len)
        emit_line(t, t->partial.data, t->partial.len);
    t->partial.len = 0;
    t->in_long_line = 0;
}

/* --- files -------------------------------------------------------------------------------------- */

/* Watch what the path names now. libev's inotify watch follows the inode it was put on: after a
 * rename it would keep reporting the old file and nothing of the new one. */
static void rewatch(struct tailer *t)
{
    ev_stat_stop(loop, &t->stat);
    ev_stat_start(loop, &t->stat);
}

static void set_poll(struct tailer *t, double interval)
{
    if (t->timer.repeat == interval)
        return;
    ev_timer_stop(loop, &t->timer);
    ev_timer_set(&t->timer, interval, interval);
    ev_timer_start(loop, &t->timer);
}

/* Enter or leave the state where the path names another file (or none) while the old one is
 * still followed. */
static void set_rotated(struct tailer *t, int rotated)
{
    if (t->rotated == rotated)
        return;
    t->rotated = rotated;
    set_poll(t, rotated && t->poll > ROTATED_POLL ? ROTATED_POLL : t->poll);
    if (rotated)
        rewatch(t);
}

/* The offset to follow an existing file from when starting at its end: just after its last
 * newline, so a line being written now is published whole. */
static off_t start_of_last_line(int fd, off_t size)
{
    size_t window = size < (off_t)max_message ? (size_t)size : max_message;
    if (!window)
        return size;
    char *tail = xmalloc(window);
    ssize_t n = pread(fd, tail, window, size - (off_t)window);
    off_t at = size;
    if (n == (ssize_t)window) {
        size_t i = window;
        while (i > 0 && tail[i - 1] != '\n')
            i--;
        if (i > 0)
            at = size - (off_t)window + (off_t)i;
        else if ((off_t)window == size)
            at = 0; /* one unfinished line: it is the line being written */
    }
    free(tail);
    return at;
}

/* Open the path. at_end: follow from the end (the file was there at start). Returns 0, or -1 when
 * it cannot be opened now (missing: waited for). */
static int open_file(struct tailer *t, int at_end)
{
    int fd = open(t->path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        int err = fd < 0 ? errno : 0;
        if (fd >= 0)
            close(fd);
        if (err == ENOENT) {
            if (!t->missing_logged)
                log_info("tail: %s does not exist yet; waiting for it", t->path);
            t->missing_logged = 1;
        } else if (!t->error_logged) {
            log_warn("tail: %s: %s; retrying", t->path, err ? strerror(err) : "not a regular file");
            t->error_logged = 1;
        }
        return -1;
    }
    t->fd = fd;
    t->dev = st.st_dev;
    t->ino = st.st_ino;
    t->offset = at_end ? start_of_last_line(fd, st.st_size) : 0;
    set_rotated(t, 0);
    rewatch(t);
    t->error_logged = 0;
    log_info("tail: following %s into channel %s from byte %lld", t->path, t->channel,
             (long long)t->offset);
    t->missing_logged = 0;
    return 0;
}

static void close_file(struct tailer *t)
{
    finish_partial(t);
    if (t->fd >= 0)
        close(t->fd);
    t->fd = -1;
    set_rotated(t, 0);
    rewatch(t);
}

/* At the end of the open file (described by fst): if the path now names another file, or none,
 * act on it. Returns 1 when there is a new file to read on, 0 when there is nothing more now. */
static int follow_path(struct tailer *t, const struct stat *fst)
{
    struct stat pst;
    if (stat(t->path, &pst) == 0) {
        if (pst.st_dev == t->dev && pst.st_ino == t->ino) {
            set_rotated(t, 0);
            return 0; /* caught up */
        }
        if (fst->st_nlink > 0 && pst.st_size == 0) {
            set_rotated(t, 1); /* the writer may still be finishing the old file */
            return 0;
        }
        log_info("tail: %s was replaced (rotated); reading the new file", t->path);
        t->rotations++;
        close_file(t);
        return open_file(t, 0) == 0;
    }
    if (errno != ENOENT)
        return 0;
    if (fst->st_nlink > 0) {
        set_rotated(t, 1); /* renamed away and no new file yet: keep following the old one */
        return 0;
    }
    log_info("tail: %s was deleted; waiting for it to be created again", t->path);
    t->rotations++;
    close_file(t);
    t->missing_logged = 1;
    return 0;
}

/* Come back on the next loop iteration: there is more to read than one pass takes. */
static void more_later(struct tailer *t)
{
    ev_timer_stop(loop, &t->timer);
    ev_timer_set(&t->timer, 0., t->timer.repeat);
    ev_timer_start(loop, &t->timer);
}

/* Read and publish what is new, up to PASS_BUDGET bytes. */
static void pump(struct tailer *t)
{
    size_t budget = PASS_BUDGET;
    for (;;) {
        if (t->fd < 0 && open_file(t, 0) < 0)
            return;
        struct stat st;
        if (fstat(t->fd, &st) < 0) {
            log_warn("tail: %s: %s", t->path, strerror(errno));
            close_file(t);
            return;
        }
        if (st.st_size < t->offset) {
            log_info("tail: %s was truncated; reading it from the start", t->path);
            t->truncations++;
            finish_partial(t);
            t->offset = 0;
        }
        if (!budget) {
            more_later(t);
            return;
        }
        ssize_t n = pread(t->fd, readbuf, budget < READ_CHUNK ? budget : READ_CHUNK, t->offset);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            log_warn("tail: %s: read: %s", t->path, strerror(errno));
            close_file(t);
            return;
        }
        if (n > 0) {
            t->offset += n;
            t->bytes += (uint64_t)n;
            budget -= (size_t)n;
            consume(t, readbuf, (size_t)n);
            continue;
        }
        if (!follow_path(t, &st))
            return;
    }
}

static void on_stat(struct ev_loop *l, ev_stat *w, int revents) { pump(w->data); }
static void on_timer(struct ev_loop *l, ev_timer *w, int revents) { pump(w->data); }

static struct tailer *tailer_new(const struct config_tail *c)
{
    struct tailer *t = xcalloc(1, sizeof(*t));
    t->path = xstrdup(c->path);
    t->channel = xstrdup(c->channel);
    t->channel_len = strlen(c->channel);
    t->poll = c->poll > 0 ? c->poll : 1.0;
    t->fd = -1;
    ev_stat_init(&t->stat, on_stat, t->path, t->poll);
    t->stat.data = t;
    ev_stat_start(loop, &t->stat);
    ev_timer_init(&t->timer, on_timer, t->poll, t->poll);
    t->timer.data = t;
    ev_timer_start(loop, &t->timer);
    if (open_file(t, !c->from_start) == 0)
        pump(t);
    return t;
}

static void tailer_free(struct tailer *t)
{
    ev_stat_stop(loop, &t->stat);
    ev_timer_stop(loop, &t->timer);
    if (t->fd >= 0)
        close(t->fd);
    buf_free(&t->partial);
    free(t->path);
    free(t->channel);
    free(t);
}

/* --- /stats and /metrics ------------------------------------------------------------------------ */

static const char *state_name(const struct tailer *t)
{
    if (t->fd < 0)
        return "waiting";
    return t->rotated ? "rotated" : "following";
}

static void json_str(struct buf *b, const char *s)
{
    size_t n = strlen(s);
    char *out = buf_reserve(b, JSON_STRING_ENCODED_MAX(n));
    b->len += json_string_encode(s, n, out);
}

static void stats_json(struct buf *b, void *arg)
{
    buf_append_str(b, "\"tail\":[");
    for (struct tailer *t = tailers; t; t = t->next) {
        buf_append_str(b, t == tailers ? "{\"path\":" : ",{\"path\":");
        json_str(b, t->path);
        buf_printf(b, ",\"channel\":\"%s\",\"state\":\"%s\",\"offset\":%lld,\"pending\":%zu,"
                      "\"lines\":%llu,\"messages\":%llu,\"lines_split\":%llu,\"rotations\":%llu,"
                      "\"truncations\":%llu,\"bytes\":%llu}",
                   t->channel, state_name(t), (long long)(t->fd >= 0 ? t->offset : 0), t->partial.len,
                   (unsigned long long)t->lines, (unsigned long long)t->messages,
                   (unsigned long long)t->split, (unsigned long long)t->rotations,
                   (unsigned long long)t->truncations, (unsigned long long)t->bytes);
    }
    buf_append_str(b, "]");
}

/* A label value in the exposition format: backslash, quote and newline escaped. */
static void prom_label(struct buf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            buf_printf(b, "\\%c", *s);
        else if (*s == '\n')
            buf_append_str(b, "\\n");
        else
            buf_append(b, s, 1);
    }
}

enum figure { FIG_OPEN, FIG_OFFSET, FIG_LINES, FIG_MESSAGES, FIG_SPLIT, FIG_ROTATIONS,
              FIG_TRUNCATIONS };

static uint64_t figure(const struct tailer *t, enum figure f)
{
    switch (f) {
    case FIG_OPEN: return t->fd >= 0;
    case FIG_OFFSET: return t->fd >= 0 ? (uint64_t)t->offset : 0;
    case FIG_LINES: return t->lines;
    case FIG_MESSAGES: return t->messages;
    case FIG_SPLIT: return t->split;
    case FIG_ROTATIONS: return t->rotations;
    case FIG_TRUNCATIONS: return t->truncations;
    }
    return 0;
}

/* One metric family with a line per tailed file. */
static void prom_family(struct buf *b, const char *name, const char *type, const char *help,
                        enum figure f)
{
    buf_printf(b, "# HELP herald_%s %s\n# TYPE herald_%s %s\n", name, help, name, type);
    for (struct tailer *t = tailers; t; t = t->next) {
        buf_printf(b, "herald_%s{path=\"", name);
        prom_label(b, t->path);
        buf_printf(b, "\",channel=\"%s\"} %llu\n", t->channel, (unsigned long long)figure(t, f));
    }
}

static void stats_prom(struct buf *b, void *arg)
{
    prom_family(b, "tail_file_open", "gauge", "1 when the tailed file is open, 0 while waiting for it",
                FIG_OPEN);
    prom_family(b, "tail_offset_bytes", "gauge", "Offset read up to in the tailed file", FIG_OFFSET);
    prom_family(b, "tail_lines_total", "counter", "Lines read from the tailed file", FIG_LINES);
    prom_family(b, "tail_messages_total", "counter", "Messages published from the tailed file",
                FIG_MESSAGES);
    prom_family(b, "tail_lines_split_total", "counter",
                "Lines longer than max_message, published in pieces", FIG_SPLIT);
    prom_family(b, "tail_rotations_total", "counter",
                "Rotations, deletions and re-creations followed", FIG_ROTATIONS);
    prom_family(b, "tail_truncations_total", "counter", "Truncations followed", FIG_TRUNCATIONS);
}

/* --- entry points ------------------------------------------------------------------------------- */

void tail_configure(struct ev_loop *l, const struct config *cfg)
{
    loop = l;
    max_message = cfg->max_message;
    if (!registered) {
        static const struct stats_section section = {stats_json, stats_prom, NULL};
        stats_add_section(&section);
        registered = 1;
    }
    /* Keep the tailers that are still configured (same path and channel) with their state; start
     * the new ones; stop the rest. */
    struct tailer *list = NULL, **tailp = &list;
    for (size_t i = 0; i < cfg->ntails; i++) {
        const struct config_tail *c = &cfg->tails[i];
        struct tailer **pp = &tailers;
        while (*pp && (strcmp((*pp)->path, c->path) != 0 || strcmp((*pp)->channel, c->channel) != 0))
            pp = &(*pp)->next;
        struct tailer *t = *pp;
        if (t) {
            *pp = t->next;
            if (t->poll != c->poll && c->poll > 0) {
                t->poll = c->poll;
                set_poll(t, t->rotated && t->poll > ROTATED_POLL ? ROTATED_POLL : t->poll);
            }
        } else {
            t = tailer_new(c);
        }
        t->next = NULL;
        *tailp = t;
        tailp = &t->next;
    }
    tail_stop();
    tailers = list;
}

void tail_stop(void)
{
    while (tailers) {
        struct tailer *t = tailers;
        tailers = t->next;
        tailer_free(t);
    }
}
