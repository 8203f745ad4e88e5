/* fuzz.h - what every libFuzzer driver here shares: the check that turns a broken invariant into a
 * crash libFuzzer reports, with the file, line and condition. */
#ifndef HERALD_FUZZ_H
#define HERALD_FUZZ_H

#include <stdio.h>
#include <stdlib.h>

#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #cond);                             \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
