/*
 * retry.c - pure retry policy: exponential backoff with full jitter, the schedule of "check
 * again later" delays, and the splitmix64 generator that feeds the jitter.
 *
 * Thread: any. No state, no I/O, no clock: callers pass time and randomness in, which is what
 * lets the tests check the bounds over millions of draws in milliseconds.
 * Owns: nothing.
 */
#include "settle/retry.h"
#include "settle/error.h"

#include <stddef.h>

uint64_t retry_ceiling_ms(unsigned attempt, uint64_t base_ms, uint64_t cap_ms)
{
    unsigned shift = attempt == 0 ? 0 : attempt - 1;

    if (base_ms == 0)
        return 0;
    /* base * 2^shift is compared against the cap before it is computed: shifting by 64 or
     * more is undefined, and a shift that drops high bits would wrap to a small delay and turn
     * the 64th retry into a retry storm. */
    if (shift >= 64 || base_ms > (UINT64_MAX >> shift))
        return cap_ms;
    uint64_t v = base_ms << shift;
    return v < cap_ms ? v : cap_ms;
}

uint64_t retry_delay_ms(unsigned attempt, uint64_t base_ms, uint64_t cap_ms,
                        uint64_t retry_after_ms, uint64_t retry_after_max_ms, uint64_t rand64)
{
    uint64_t ceiling = retry_ceiling_ms(attempt, base_ms, cap_ms);
    uint64_t d;

    /* Full jitter (uniform over [0, ceiling]) spreads the retries of many jobs that failed
     * together, so a recovering PG is not hit by all of them at once. The modulo bias is at
     * most ceiling / 2^64, far below anything measurable. */
    if (ceiling == UINT64_MAX)
        d = rand64;
    else
        d = rand64 % (ceiling + 1);
    if (retry_after_ms > d)
        d = retry_after_ms;
    /* A peer must not be able to park our jobs for a day with one header. */
    if (d > retry_after_max_ms)
        d = retry_after_max_ms;
    return d;
}

int retry_schedule_parse(const char *s, struct retry_schedule *out)
{
    struct retry_schedule tmp;
    const char *p = s;

    if (s == NULL || *s == '\0')
        return SETTLE_EINVAL;
    tmp.n = 0;
    for (;;) {
        uint64_t v = 0;
        const char *start = p;
        /* Digits only: strtoull would accept leading spaces, a sign and wrap "-1" around to
         * a huge delay. */
        while (*p >= '0' && *p <= '9') {
            unsigned digit = (unsigned)(*p - '0');
            if (v > (UINT64_MAX - digit) / 10)
                return SETTLE_EINVAL;
            v = v * 10 + digit;
            p++;
        }
        if (p == start || v == 0)
            return SETTLE_EINVAL;
        if (tmp.n == RETRY_SCHEDULE_MAX)
            return SETTLE_EINVAL;
        tmp.delays_ms[tmp.n++] = v;
        if (*p == '\0')
            break;
        if (*p != ',')
            return SETTLE_EINVAL;
        p++;
    }
    *out = tmp;
    return 0;
}

uint64_t retry_schedule_delay_ms(const struct retry_schedule *s, unsigned check_index)
{
    if (s->n == 0)
        return 0;
    return s->delays_ms[check_index < s->n ? check_index : s->n - 1];
}

uint64_t retry_rand_next(uint64_t *state)
{
    /* splitmix64 (Steele, Lea, Flood 2014): every seed, zero included, gives a full-period
     * sequence with good statistical quality, which is all jitter needs. */
    uint64_t z = (*state += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}
