/*
 * retry.h - pure retry policy: exponential backoff with full jitter, and the schedule of
 * "check again later" delays for payments the PG still reports as PENDING.
 * Thread: any; no state, no I/O, no clock (callers pass randomness and time in).
 */
#ifndef SETTLE_RETRY_H
#define SETTLE_RETRY_H

#include <stdint.h>

#define RETRY_SCHEDULE_MAX 16

/* min(cap_ms, base_ms * 2^(attempt-1)) without overflow; attempt 0 is treated as 1. */
uint64_t retry_ceiling_ms(unsigned attempt, uint64_t base_ms, uint64_t cap_ms);

/*
 * The delay before retry number `attempt` (1 = first retry): full jitter, uniform in
 * [0, retry_ceiling_ms(...)] drawn from rand64, then raised to retry_after_ms when the peer
 * asked for more (Retry-After), and finally capped at retry_after_max_ms.
 */
uint64_t retry_delay_ms(unsigned attempt, uint64_t base_ms, uint64_t cap_ms,
                        uint64_t retry_after_ms, uint64_t retry_after_max_ms, uint64_t rand64);

/* A list of delays such as "60000,300000": check i waits delays_ms[min(i, n-1)]. */
struct retry_schedule {
    uint64_t delays_ms[RETRY_SCHEDULE_MAX];
    unsigned n;
};

/* Parses a comma-separated list of 1..RETRY_SCHEDULE_MAX positive integers (milliseconds).
 * 0 or SETTLE_EINVAL (out untouched). */
int retry_schedule_parse(const char *s, struct retry_schedule *out);

/* The delay before check number check_index (0-based); the last entry repeats. */
uint64_t retry_schedule_delay_ms(const struct retry_schedule *s, unsigned check_index);

/* A fast, seedable PRNG (splitmix64) for jitter; state is the caller's. */
uint64_t retry_rand_next(uint64_t *state);

#endif
