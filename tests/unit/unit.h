/*
 * unit.h - a tiny header-only test framework for the unit tests.
 *
 * CHECK* macros record a pass or a failure and keep going, so one run shows every broken
 * expectation with its file:line. RUN(fn) runs one test function. unit_finish() prints
 * "N passed, N failed" as the last line and returns the exit status (nonzero on failure).
 * Everything goes to stdout so failures and the summary keep their order in ctest's log.
 * Thread: the test's main thread only (the counters are plain ints).
 * Owns: the pass/fail counters of the test program that includes it (one per program).
 */
#ifndef SETTLE_UNIT_H
#define SETTLE_UNIT_H

#include <stdio.h>
#include <string.h>

static int unit_passed;
static int unit_failed;

static inline void unit_record(int ok, const char *file, int line, const char *what)
{
    if (ok) {
        unit_passed++;
        return;
    }
    unit_failed++;
    printf("%s:%d: FAILED: %s\n", file, line, what);
    fflush(stdout);
}

#define CHECK(cond) unit_record((cond) ? 1 : 0, __FILE__, __LINE__, #cond)

#define CHECK_EQ_INT(a, b)                                                                         \
    do {                                                                                           \
        long long unit_a_ = (long long)(a);                                                        \
        long long unit_b_ = (long long)(b);                                                        \
        unit_record(unit_a_ == unit_b_, __FILE__, __LINE__, #a " == " #b);                         \
        if (unit_a_ != unit_b_)                                                                    \
            printf("    left:  %lld\n    right: %lld\n", unit_a_, unit_b_);                        \
    } while (0)

#define CHECK_EQ_U64(a, b)                                                                         \
    do {                                                                                           \
        unsigned long long unit_a_ = (unsigned long long)(a);                                      \
        unsigned long long unit_b_ = (unsigned long long)(b);                                      \
        unit_record(unit_a_ == unit_b_, __FILE__, __LINE__, #a " == " #b);                         \
        if (unit_a_ != unit_b_)                                                                    \
            printf("    left:  %llu\n    right: %llu\n", unit_a_, unit_b_);                        \
    } while (0)

#define CHECK_STR(a, b)                                                                            \
    do {                                                                                           \
        const char *unit_a_ = (a);                                                                 \
        const char *unit_b_ = (b);                                                                 \
        int unit_ok_ = (unit_a_ == NULL && unit_b_ == NULL) ||                                     \
                       (unit_a_ != NULL && unit_b_ != NULL && strcmp(unit_a_, unit_b_) == 0);      \
        unit_record(unit_ok_, __FILE__, __LINE__, #a " equals " #b);                               \
        if (!unit_ok_)                                                                             \
            printf("    left:  \"%s\"\n    right: \"%s\"\n", unit_a_ ? unit_a_ : "(null)",         \
                   unit_b_ ? unit_b_ : "(null)");                                                  \
    } while (0)

/* haystack contains needle */
#define CHECK_CONTAINS(hay, needle)                                                                \
    do {                                                                                           \
        const char *unit_h_ = (hay);                                                               \
        const char *unit_n_ = (needle);                                                            \
        int unit_ok_ = unit_h_ != NULL && strstr(unit_h_, unit_n_) != NULL;                        \
        unit_record(unit_ok_, __FILE__, __LINE__, #hay " contains " #needle);                      \
        if (!unit_ok_)                                                                             \
            printf("    text:   \"%s\"\n    wanted: \"%s\"\n", unit_h_ ? unit_h_ : "(null)",       \
                   unit_n_);                                                                       \
    } while (0)

/* haystack does not contain needle */
#define CHECK_NOT_CONTAINS(hay, needle)                                                            \
    do {                                                                                           \
        const char *unit_h_ = (hay);                                                               \
        const char *unit_n_ = (needle);                                                            \
        int unit_ok_ = unit_h_ != NULL && strstr(unit_h_, unit_n_) == NULL;                        \
        unit_record(unit_ok_, __FILE__, __LINE__, #hay " lacks " #needle);                         \
        if (!unit_ok_)                                                                             \
            printf("    text:      \"%s\"\n    unwanted: \"%s\"\n", unit_h_ ? unit_h_ : "(null)",  \
                   unit_n_);                                                                       \
    } while (0)

#define RUN(fn)                                                                                    \
    do {                                                                                           \
        int unit_before_ = unit_failed;                                                            \
        fn();                                                                                      \
        printf("%s %s\n", unit_failed == unit_before_ ? "ok  " : "FAIL", #fn);                     \
        fflush(stdout);                                                                            \
    } while (0)

static inline int unit_finish(void)
{
    printf("%d passed, %d failed\n", unit_passed, unit_failed);
    fflush(stdout);
    return unit_failed != 0 ? 1 : 0;
}

#endif
