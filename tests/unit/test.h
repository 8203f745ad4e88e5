/* test.h - the unit tests' whole framework: check conditions, count failures, exit non-zero. */
#ifndef HERALD_TEST_H
#define HERALD_TEST_H

#include <stdio.h>

static int test_failures, test_checks;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        test_checks++;                                                                 \
        if (!(cond)) {                                                                 \
            test_failures++;                                                           \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
        }                                                                              \
    } while (0)

#define CHECK_EQ(a, b)                                                                 \
    do {                                                                               \
        long long check_a_ = (long long)(a), check_b_ = (long long)(b);                \
        test_checks++;                                                                 \
        if (check_a_ != check_b_) {                                                    \
            test_failures++;                                                           \
            fprintf(stderr, "%s:%d: check failed: %s == %s (%lld != %lld)\n", __FILE__,  \
                    __LINE__, #a, #b, check_a_, check_b_);                             \
        }                                                                              \
    } while (0)

#define TEST_REPORT()                                                                  \
    (printf("%d checks, %d failed\n", test_checks, test_failures), test_failures ? 1 : 0)

#endif
