/*
 * breaker.h - pure circuit breaker, one per PG endpoint class.
 *
 * CLOSED: calls flow; outcomes are counted in a sliding window of one-second buckets. When
 * the window holds at least min_calls calls and failures reach failure_pct percent, the
 * breaker trips to OPEN. OPEN: calls are refused until the open period ends, then the breaker
 * is HALF_OPEN and lets exactly half_open_probes calls through. When they have all finished:
 * if their failure share is below failure_pct it closes, otherwise it opens again.
 *
 * Anti-flapping: each consecutive trip doubles the open period (open_ms, 2*open_ms, ...) up
 * to open_max_ms; the count of consecutive trips resets only after the breaker has stayed
 * closed for a whole window. A PG that keeps failing above the threshold therefore settles
 * into long open periods with short probe bursts instead of flipping every open_ms.
 *
 * Thread: the loop thread only (callers pass now_ms). No I/O, no allocation.
 * All state changes go through one transition function inside breaker.c.
 */
#ifndef SETTLE_BREAKER_H
#define SETTLE_BREAKER_H

#include <stdint.h>

#define BREAKER_BUCKETS 120 /* the window may be at most 120 s long */

enum breaker_state {
    BREAKER_CLOSED = 0,
    BREAKER_OPEN = 1,
    BREAKER_HALF_OPEN = 2,
};

enum breaker_result {
    BREAKER_SUCCESS = 0, /* the call went through (2xx, 404, declines) */
    BREAKER_FAILURE = 1, /* transport error, timeout, 5xx */
    BREAKER_IGNORED = 2, /* 4xx and 429: the PG is up; counts as a finished probe */
};

struct breaker_config {
    unsigned failure_pct;      /* default 60 */
    uint64_t window_ms;        /* default 30000; at most BREAKER_BUCKETS seconds */
    unsigned min_calls;        /* default 20 */
    uint64_t open_ms;          /* default 10000 */
    uint64_t open_max_ms;      /* default 60000; >= open_ms */
    unsigned half_open_probes; /* default 5 */
};

struct breaker_bucket {
    uint64_t second; /* now_ms / 1000 of the calls counted here */
    uint32_t calls;
    uint32_t failures;
};

struct breaker {
    struct breaker_config cfg;
    enum breaker_state state;
    struct breaker_bucket buckets[BREAKER_BUCKETS];
    uint64_t open_until_ms;
    uint64_t closed_since_ms;
    unsigned consecutive_trips;
    unsigned probes_started;
    unsigned probes_finished;
    unsigned probe_failures;
    uint64_t transitions; /* total state changes, for metrics and tests */
};

/* Fills *cfg with the seed 001 defaults. */
void breaker_config_default(struct breaker_config *cfg);

/* Validates cfg: 0 or SETTLE_EINVAL. */
int breaker_config_check(const struct breaker_config *cfg);

void breaker_init(struct breaker *b, const struct breaker_config *cfg, uint64_t now_ms);

/*
 * May a call start now? 1: yes, and the caller must later call breaker_record() exactly once
 * for it. 0: refused (OPEN, or HALF_OPEN with all probes out); see breaker_retry_in_ms().
 * May move OPEN -> HALF_OPEN when the open period is over.
 */
int breaker_allow(struct breaker *b, uint64_t now_ms);

/* Records the result of a call that breaker_allow() admitted. */
void breaker_record(struct breaker *b, uint64_t now_ms, enum breaker_result r);

/* Milliseconds until a refused call should be tried again (>= 1 while refusing, else 0). */
uint64_t breaker_retry_in_ms(const struct breaker *b, uint64_t now_ms);

const char *breaker_state_name(enum breaker_state s);

#endif
