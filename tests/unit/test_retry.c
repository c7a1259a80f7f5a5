/*
 * test_retry.c - unit tests of the pure retry policy (retry.c): backoff ceilings and their
 * overflow safety, full-jitter bounds over many draws, Retry-After handling, the check
 * schedule parser and the splitmix64 generator.
 * Thread: main only; no servers, no clock.
 */
#include "settle/error.h"
#include "settle/retry.h"

#include "unit.h"

#include <stdint.h>

static void test_ceiling(void)
{
    CHECK_EQ_U64(retry_ceiling_ms(0, 1000, 30000), 1000);
    CHECK_EQ_U64(retry_ceiling_ms(1, 1000, 30000), 1000);
    CHECK_EQ_U64(retry_ceiling_ms(2, 1000, 30000), 2000);
    CHECK_EQ_U64(retry_ceiling_ms(3, 1000, 30000), 4000);
    CHECK_EQ_U64(retry_ceiling_ms(5, 1000, 30000), 16000);
    CHECK_EQ_U64(retry_ceiling_ms(6, 1000, 30000), 30000);
    CHECK_EQ_U64(retry_ceiling_ms(7, 1000, 30000), 30000);
    CHECK_EQ_U64(retry_ceiling_ms(1, 0, 30000), 0);
    /* Shifts of 63, 64 and beyond must neither be undefined nor wrap to a small value. */
    CHECK_EQ_U64(retry_ceiling_ms(64, 1000, 30000), 30000);
    CHECK_EQ_U64(retry_ceiling_ms(65, 1000, 30000), 30000);
    CHECK_EQ_U64(retry_ceiling_ms(100, 1000, 30000), 30000);
    CHECK_EQ_U64(retry_ceiling_ms(4000000000u, 1000, 30000), 30000);
    CHECK_EQ_U64(retry_ceiling_ms(64, 1, UINT64_MAX), UINT64_C(1) << 63);
    CHECK_EQ_U64(retry_ceiling_ms(65, 1, UINT64_MAX), UINT64_MAX);
    CHECK_EQ_U64(retry_ceiling_ms(65, 1, UINT64_MAX - 1), UINT64_MAX - 1);
    CHECK_EQ_U64(retry_ceiling_ms(64, 2, UINT64_MAX), UINT64_MAX);
    CHECK_EQ_U64(retry_ceiling_ms(63, 1, UINT64_MAX), UINT64_C(1) << 62);
    CHECK_EQ_U64(retry_ceiling_ms(3, UINT64_MAX / 2, UINT64_MAX), UINT64_MAX);
    CHECK_EQ_U64(retry_ceiling_ms(2, UINT64_MAX / 2, UINT64_MAX), (UINT64_MAX / 2) * 2);
    /* The ceiling never decreases with the attempt number. */
    uint64_t prev = 0;
    int monotonic = 1;
    for (unsigned a = 0; a < 200; a++) {
        uint64_t c = retry_ceiling_ms(a, 1000, 30000);
        if (c < prev || c > 30000)
            monotonic = 0;
        prev = c;
    }
    CHECK(monotonic);
}

static void test_jitter_bounds(void)
{
    uint64_t state = 42;

    for (unsigned attempt = 1; attempt <= 70; attempt++) {
        uint64_t ceiling = retry_ceiling_ms(attempt, 1000, 30000);
        uint64_t lo = UINT64_MAX;
        uint64_t hi = 0;
        double sum = 0;
        int above = 0;
        const int draws = 20000;
        for (int i = 0; i < draws; i++) {
            uint64_t d = retry_delay_ms(attempt, 1000, 30000, 0, 300000, retry_rand_next(&state));
            if (d > ceiling)
                above++;
            if (d < lo)
                lo = d;
            if (d > hi)
                hi = d;
            sum += (double)d;
        }
        CHECK_EQ_INT(above, 0);
        /* Full jitter: the draws cover the whole range, not just its top. */
        CHECK(hi >= ceiling - ceiling / 50);
        CHECK(lo <= ceiling / 50);
        double mean = sum / draws;
        CHECK(mean > ceiling * 0.45 && mean < ceiling * 0.55);
    }
    /* Overflow safety with a ceiling of 2^64-1: the draw is used as is. */
    CHECK_EQ_U64(retry_delay_ms(200, 1, UINT64_MAX, 0, UINT64_MAX, UINT64_MAX), UINT64_MAX);
    CHECK_EQ_U64(retry_delay_ms(200, 1, UINT64_MAX, 0, UINT64_MAX, 12345), 12345);
    CHECK(retry_delay_ms(64, 1000, 30000, 0, 300000, UINT64_MAX) <= 30000);
    CHECK(retry_delay_ms(65, 1000, 30000, 0, 300000, UINT64_MAX - 7) <= 30000);
    /* Extreme draws land on the edges of [0, ceiling]. */
    CHECK_EQ_U64(retry_delay_ms(1, 1000, 30000, 0, 300000, 0), 0);
    CHECK_EQ_U64(retry_delay_ms(1, 1000, 30000, 0, 300000, 1000), 1000);
    CHECK_EQ_U64(retry_delay_ms(1, 1000, 30000, 0, 300000, 1001), 0);
}

static void test_retry_after(void)
{
    uint64_t state = 7;
    int below = 0;
    int not_exact = 0;
    int over_max = 0;

    for (int i = 0; i < 10000; i++) {
        uint64_t r = retry_rand_next(&state);
        /* A Retry-After above the jittered delay wins... */
        if (retry_delay_ms(1, 1000, 30000, 45000, 300000, r) != 45000)
            not_exact++;
        /* ...a smaller one is a floor, never a reason to wait less... */
        if (retry_delay_ms(5, 1000, 30000, 5000, 300000, r) < 5000)
            below++;
        /* ...and a huge one is capped at retry_after_max_ms. */
        if (retry_delay_ms(1, 1000, 30000, 86400000, 300000, r) != 300000)
            over_max++;
    }
    CHECK_EQ_INT(not_exact, 0);
    CHECK_EQ_INT(below, 0);
    CHECK_EQ_INT(over_max, 0);
    CHECK_EQ_U64(retry_delay_ms(1, 1000, 30000, UINT64_MAX, 300000, 5), 300000);
    /* The final cap applies to the jittered delay too (header contract). */
    CHECK(retry_delay_ms(10, 1000, 30000, 0, 2000, UINT64_MAX - 3) <= 2000);
}

static void test_schedule_parse(void)
{
    struct retry_schedule s;

    CHECK_EQ_INT(retry_schedule_parse("60000,300000", &s), 0);
    CHECK_EQ_INT(s.n, 2);
    CHECK_EQ_U64(s.delays_ms[0], 60000);
    CHECK_EQ_U64(s.delays_ms[1], 300000);
    CHECK_EQ_U64(retry_schedule_delay_ms(&s, 0), 60000);
    CHECK_EQ_U64(retry_schedule_delay_ms(&s, 1), 300000);
    CHECK_EQ_U64(retry_schedule_delay_ms(&s, 2), 300000);
    CHECK_EQ_U64(retry_schedule_delay_ms(&s, 1000000), 300000);

    CHECK_EQ_INT(retry_schedule_parse("5", &s), 0);
    CHECK_EQ_INT(s.n, 1);
    CHECK_EQ_U64(retry_schedule_delay_ms(&s, 9), 5);

    CHECK_EQ_INT(retry_schedule_parse("1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16", &s), 0);
    CHECK_EQ_INT(s.n, 16);
    CHECK_EQ_U64(retry_schedule_delay_ms(&s, 15), 16);
    CHECK_EQ_U64(retry_schedule_delay_ms(&s, 16), 16);
    CHECK_EQ_INT(retry_schedule_parse("18446744073709551615", &s), 0);
    CHECK_EQ_U64(s.delays_ms[0], UINT64_MAX);

    static const char *const bad[] = {
        "",
        ",",
        "1,",
        ",1",
        "1,,2",
        "0",
        "1,0",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1, 2",
        "abc",
        "1.5",
        "1e3",
        "0x10",
        "18446744073709551616",
        "99999999999999999999999",
        "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct retry_schedule t;
        memset(&t, 0xab, sizeof(t));
        int rc = retry_schedule_parse(bad[i], &t);
        if (rc != SETTLE_EINVAL)
            printf("    accepted bad schedule \"%s\"\n", bad[i]);
        CHECK_EQ_INT(rc, SETTLE_EINVAL);
        /* out untouched on error */
        CHECK_EQ_U64(t.delays_ms[0], UINT64_C(0xabababababababab));
    }
    CHECK_EQ_INT(retry_schedule_parse(NULL, &s), SETTLE_EINVAL);
}

static void test_splitmix(void)
{
    /* Reference values of splitmix64 seeded with 0 (Vigna's reference implementation). */
    uint64_t state = 0;
    CHECK_EQ_U64(retry_rand_next(&state), UINT64_C(0xe220a8397b1dcdaf));
    CHECK_EQ_U64(retry_rand_next(&state), UINT64_C(0x6e789e6aa1b965f4));
    CHECK_EQ_U64(retry_rand_next(&state), UINT64_C(0x06c45d188009454f));

    uint64_t a = 12345;
    uint64_t b = 12345;
    int same = 1;
    for (int i = 0; i < 1000; i++) {
        if (retry_rand_next(&a) != retry_rand_next(&b))
            same = 0;
    }
    CHECK(same);
    /* Rough uniformity: each of 16 top-nibble buckets gets 1/16 of 160000 draws, +-10 %. */
    unsigned counts[16] = {0};
    uint64_t st = 99;
    for (int i = 0; i < 160000; i++)
        counts[retry_rand_next(&st) >> 60]++;
    int even = 1;
    for (int i = 0; i < 16; i++) {
        if (counts[i] < 9000 || counts[i] > 11000)
            even = 0;
    }
    CHECK(even);
}

int main(void)
{
    RUN(test_ceiling);
    RUN(test_jitter_bounds);
    RUN(test_retry_after);
    RUN(test_schedule_parse);
    RUN(test_splitmix);
    return unit_finish();
}
