/* Unit tests of buf.c: growth, consumption and shared blocks. */
#include "buf.h"
#include "test.h"

#include <string.h>

int main(void)
{
    struct buf b = {0};
    for (int i = 0; i < 1000; i++)
        buf_printf(&b, "%d,", i);
    CHECK(b.len > 1000);
    CHECK(memcmp(b.data, "0,1,2,", 6) == 0);
    buf_consume(&b, 2);
    CHECK(memcmp(b.data, "1,2,", 4) == 0);
    buf_consume(&b, b.len + 5);
    CHECK_EQ(b.len, 0);
    buf_free(&b);
    CHECK(b.data == NULL);

    struct block *k = block_new(4);
    k = block_append(k, "hello, world", 12);
    CHECK_EQ(k->len, 12);
    CHECK(memcmp(k->data, "hello, world", 12) == 0);
    struct block *k2 = block_ref(k);
    CHECK_EQ(k->refs, 2);
    block_unref(k2);
    CHECK_EQ(k->refs, 1);
    block_unref(k);
    return TEST_REPORT();
}
