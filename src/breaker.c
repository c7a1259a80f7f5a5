/*
 * breaker.c - pure circuit breaker with anti-flapping (see breaker.h for the policy).
 *
 * Thread: the loop thread only; callers pass now_ms, so the breaker never reads a clock.
 * Owns: nothing outside struct breaker; no I/O, no allocation. Because the module is pure it
 * does not log: callers compare breaker.transitions (or the state) before and after a call
 * and log the change themselves.
 *
 * Every state change goes through breaker_set_state(), which checks the transition against
 * a table and performs the entry actions of the new state.
 */
#include "settle/breaker.h"
#include "settle/error.h"
#include "settle/retry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How long a caller refused in HALF_OPEN (all probes out) should wait: the probes finish
 * within one gateway timeout, so a short pause finds the breaker decided. */
#define BREAKER_HALF_OPEN_RETRY_MS 1000

#define BREAKER_ABORT(msg)                                                                         \
    do {                                                                                           \
        fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, (msg));                                 \
        abort();                                                                                   \
    } while (0)

/* transition_ok[from][to]: the only edges of the machine. */
static const unsigned char transition_ok[3][3] = {
    [BREAKER_CLOSED] = {[BREAKER_OPEN] = 1},
    [BREAKER_OPEN] = {[BREAKER_HALF_OPEN] = 1},
    [BREAKER_HALF_OPEN] = {[BREAKER_OPEN] = 1, [BREAKER_CLOSED] = 1},
};

void breaker_config_default(struct breaker_config *cfg)
{
    cfg->failure_pct = 60;
    cfg->window_ms = 30000;
    cfg->min_calls = 20;
    cfg->open_ms = 10000;
    cfg->open_max_ms = 60000;
    cfg->half_open_probes = 5;
}

int breaker_config_check(const struct breaker_config *cfg)
{
    if (cfg == NULL)
        return SETTLE_EINVAL;
    if (cfg->failure_pct < 1 || cfg->failure_pct > 100)
        return SETTLE_EINVAL;
    /* Buckets are one second wide and there are BREAKER_BUCKETS of them. */
    if (cfg->window_ms < 1000 || cfg->window_ms > (uint64_t)BREAKER_BUCKETS * 1000)
        return SETTLE_EINVAL;
    if (cfg->min_calls < 1)
        return SETTLE_EINVAL;
    if (cfg->open_ms < 1 || cfg->open_max_ms < cfg->open_ms)
        return SETTLE_EINVAL;
    if (cfg->half_open_probes < 1)
        return SETTLE_EINVAL;
    return 0;
}

const char *breaker_state_name(enum breaker_state s)
{
    switch (s) {
    case BREAKER_CLOSED:
        return "closed";
    case BREAKER_OPEN:
        return "open";
    case BREAKER_HALF_OPEN:
        return "half_open";
    default:
        BREAKER_ABORT("breaker_state_name: invalid breaker state");
    }
}

static uint64_t window_seconds(const struct breaker *b)
{
    return (b->cfg.window_ms + 999) / 1000;
}

static void clear_window(struct breaker *b)
{
    memset(b->buckets, 0, sizeof(b->buckets));
}

/* The one transition function: checks the edge, runs the entry actions, counts the change. */
static void breaker_set_state(struct breaker *b, enum breaker_state to, uint64_t now_ms)
{
    if ((unsigned)b->state > BREAKER_HALF_OPEN || (unsigned)to > BREAKER_HALF_OPEN ||
        !transition_ok[b->state][to])
        BREAKER_ABORT("breaker_set_state: transition not in the table");

    switch (to) {
    case BREAKER_OPEN:
        /* Each trip that follows another without a full closed window in between doubles
         * the open period, so a PG that stays broken is probed rarely instead of every
         * open_ms (anti-flapping). */
        b->consecutive_trips++;
        b->open_until_ms =
            now_ms + retry_ceiling_ms(b->consecutive_trips, b->cfg.open_ms, b->cfg.open_max_ms);
        break;
    case BREAKER_HALF_OPEN:
        b->probes_started = 0;
        b->probes_finished = 0;
        b->probe_failures = 0;
        break;
    case BREAKER_CLOSED:
        /* The failures that tripped the breaker are history: judging the recovered PG by
         * them would reopen it at once. */
        clear_window(b);
        b->closed_since_ms = now_ms;
        break;
    default:
        BREAKER_ABORT("breaker_set_state: invalid target state");
    }
    b->state = to;
    b->transitions++;
}

void breaker_init(struct breaker *b, const struct breaker_config *cfg, uint64_t now_ms)
{
    /* A bad config here is a programming error: config_load() validates it first. */
    if (breaker_config_check(cfg) != 0)
        BREAKER_ABORT("breaker_init: invalid breaker config");
    memset(b, 0, sizeof(*b));
    b->cfg = *cfg;
    b->state = BREAKER_CLOSED;
    b->closed_since_ms = now_ms;
}

/* The trip count only resets once the breaker has stayed closed for a whole window, so a
 * short burst of successes between two outages does not restart the backoff from open_ms. */
static void maybe_forget_trips(struct breaker *b, uint64_t now_ms)
{
    if (b->state == BREAKER_CLOSED && b->consecutive_trips > 0 &&
        now_ms >= b->closed_since_ms + b->cfg.window_ms)
        b->consecutive_trips = 0;
}

int breaker_allow(struct breaker *b, uint64_t now_ms)
{
    maybe_forget_trips(b, now_ms);
    switch (b->state) {
    case BREAKER_CLOSED:
        return 1;
    case BREAKER_OPEN:
        if (now_ms < b->open_until_ms)
            return 0;
        breaker_set_state(b, BREAKER_HALF_OPEN, now_ms);
        /* The first probe may go now. */
        b->probes_started++;
        return 1;
    case BREAKER_HALF_OPEN:
        if (b->probes_started < b->cfg.half_open_probes) {
            b->probes_started++;
            return 1;
        }
        return 0;
    default:
        BREAKER_ABORT("breaker_allow: invalid breaker state");
    }
}

static void count_in_window(struct breaker *b, uint64_t now_ms, enum breaker_result r)
{
    uint64_t second = now_ms / 1000;
    struct breaker_bucket *bucket = &b->buckets[second % BREAKER_BUCKETS];

    if (bucket->second != second) {
        bucket->second = second;
        bucket->calls = 0;
        bucket->failures = 0;
    }
    bucket->calls++;
    if (r == BREAKER_FAILURE)
        bucket->failures++;
}

static void window_totals(const struct breaker *b, uint64_t now_ms, uint64_t *calls,
                          uint64_t *failures)
{
    uint64_t now_s = now_ms / 1000;
    uint64_t span = window_seconds(b);

    *calls = 0;
    *failures = 0;
    for (size_t i = 0; i < BREAKER_BUCKETS; i++) {
        const struct breaker_bucket *bucket = &b->buckets[i];
        /* Buckets from the last `span` seconds (the current one included) count; older ones
         * are stale leftovers of an earlier lap around the ring. */
        if (bucket->calls == 0 || bucket->second > now_s || bucket->second + span <= now_s)
            continue;
        *calls += bucket->calls;
        *failures += bucket->failures;
    }
}

void breaker_record(struct breaker *b, uint64_t now_ms, enum breaker_result r)
{
    uint64_t calls;
    uint64_t failures;

    maybe_forget_trips(b, now_ms);
    switch (b->state) {
    case BREAKER_CLOSED:
        /* 4xx and 429 say the PG is up and answering; they say nothing about its health. */
        if (r == BREAKER_IGNORED)
            return;
        count_in_window(b, now_ms, r);
        window_totals(b, now_ms, &calls, &failures);
        if (calls >= b->cfg.min_calls && failures * 100 >= (uint64_t)b->cfg.failure_pct * calls)
            breaker_set_state(b, BREAKER_OPEN, now_ms);
        return;
    case BREAKER_OPEN:
        /* A call admitted before the trip finished late; the breaker has already decided. */
        return;
    case BREAKER_HALF_OPEN:
        /* More results than probes: the extra ones come from calls admitted before the
         * trip, and must not be mistaken for probe results. */
        if (b->probes_finished >= b->probes_started)
            return;
        b->probes_finished++;
        if (r == BREAKER_FAILURE)
            b->probe_failures++;
        if (b->probes_finished < b->cfg.half_open_probes)
            return;
        if ((uint64_t)b->probe_failures * 100 <
            (uint64_t)b->cfg.failure_pct * b->cfg.half_open_probes)
            breaker_set_state(b, BREAKER_CLOSED, now_ms);
        else
            breaker_set_state(b, BREAKER_OPEN, now_ms);
        return;
    default:
        BREAKER_ABORT("breaker_record: invalid breaker state");
    }
}

uint64_t breaker_retry_in_ms(const struct breaker *b, uint64_t now_ms)
{
    switch (b->state) {
    case BREAKER_CLOSED:
        return 0;
    case BREAKER_OPEN:
        /* Once the open period is over the next breaker_allow() admits a probe. */
        return now_ms < b->open_until_ms ? b->open_until_ms - now_ms : 0;
    case BREAKER_HALF_OPEN:
        if (b->probes_started < b->cfg.half_open_probes)
            return 0;
        return BREAKER_HALF_OPEN_RETRY_MS;
    default:
        BREAKER_ABORT("breaker_retry_in_ms: invalid breaker state");
    }
}
