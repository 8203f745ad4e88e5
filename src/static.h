/* static.h - files from the web root: mapping a request path to a file that cannot lie outside the
 * root (no "..", no NUL, no symlink leading out), and its Content-Type. */
#ifndef HERALD_STATIC_H
#define HERALD_STATIC_H

#include <stddef.h>
#include <sys/types.h>
#include <time.h>

struct static_file {
    int fd;
    off_t size;
    time_t mtime;
    const char *content_type;
};

/* Set the web root (NULL: none). Returns 0, or -1 if it cannot be resolved. */
int static_set_root(const char *root);

/* Open the file for the decoded request path. Returns 0 with *f filled (the caller closes f->fd),
 * 404 when there is no such file inside the root, 301 when path names a directory without its
 * trailing slash, or 403 when it exists but cannot be read. */
int static_open(const char *path, size_t len, struct static_file *f);

/* The Content-Type for a file name, from its extension. */
const char *static_content_type(const char *name);

#endif
