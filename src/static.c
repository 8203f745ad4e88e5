/* static.c - safe mapping of request paths to files under the web root. */
#include "static.h"

#include "buf.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

static char *root;     /* realpath of the web root */
static size_t root_len;

int static_set_root(const char *dir)
{
    free(root);
    root = NULL;
    root_len = 0;
    if (!dir)
        return 0;
    root = realpath(dir, NULL);
    if (!root)
        return -1;
    root_len = strlen(root);
    return 0;
}

const char *static_content_type(const char *name)
{
    static const struct {
        const char *ext, *type;
    } types[] = {
        {"html", "text/html; charset=utf-8"}, {"htm", "text/html; charset=utf-8"},
        {"css", "text/css; charset=utf-8"}, {"js", "text/javascript; charset=utf-8"},
        {"mjs", "text/javascript; charset=utf-8"}, {"json", "application/json"},
        {"svg", "image/svg+xml"}, {"png", "image/png"}, {"jpg", "image/jpeg"},
        {"jpeg", "image/jpeg"}, {"gif", "image/gif"}, {"webp", "image/webp"},
        {"ico", "image/x-icon"}, {"txt", "text/plain; charset=utf-8"}, {"md", "text/markdown; charset=utf-8"},
        {"wasm", "application/wasm"}, {"woff", "font/woff"}, {"woff2", "font/woff2"},
        {"map", "application/json"}, {"xml", "application/xml"}, {"pdf", "application/pdf"},
        {"webmanifest", "application/manifest+json"},
    };
    const char *dot = strrchr(name, '.');
    const char *slash = strrchr(name, '/');
    if (dot && (!slash || dot > slash))
        for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
            if (strcasecmp(dot + 1, types[i].ext) == 0)
                return types[i].type;
    return "application/octet-stream";
}

/* 1 if some segment of path is "." or "..". */
static int has_dot_segment(const char *path, size_t len)
{
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || path[i] == '/') {
            size_t n = i - start;
            if ((n == 1 && path[start] == '.') || (n == 2 && path[start] == '.' && path[start + 1] == '.'))
                return 1;
            start = i + 1;
        }
    }
    return 0;
}

int static_open(const char *path, size_t len, struct static_file *f)
{
    if (!root || len == 0 || path[0] != '/' || memchr(path, 0, len) || has_dot_segment(path, len) ||
        len > PATH_MAX - root_len - 16)
        return 404;
    char full[PATH_MAX];
    memcpy(full, root, root_len);
    memcpy(full + root_len, path, len);
    size_t n = root_len + len;
    if (path[len - 1] == '/') {
        memcpy(full + n, "index.html", 10);
        n += 10;
    }
    full[n] = 0;
    char *real = realpath(full, NULL);
    if (!real)
        return errno == EACCES ? 403 : 404;
    /* Whatever symlinks the path went through, the file must still be inside the root. */
    int inside = strncmp(real, root, root_len) == 0 && (real[root_len] == '/' || real[root_len] == 0);
    if (!inside) {
        free(real);
        return 404;
    }
    int fd = open(real, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    free(real);
    if (fd < 0)
        return errno == EACCES ? 403 : 404;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return 404;
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return 301;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return 404;
    }
    f->fd = fd;
    f->size = st.st_size;
    f->mtime = st.st_mtime;
    f->content_type = static_content_type(full);
    return 0;
}
