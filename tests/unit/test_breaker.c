/*
 * test_breaker.c - unit tests of the circuit breaker (breaker.c): config checks, the trip
 * threshold and min_calls, ignored results, half-open probes, the sliding window, the
 * doubling open period and its reset, and a two-hour simulation against a PG failing 66 % of
 * calls showing that anti-flapping settles into long open periods.
 * Thread: main only; time is simulated (now_ms passed in).
 */
#include "settle/breaker.h"
#include "settle/error.h"

#include "unit.h"

#include <stdint.h>

static struct breaker_config defaults(void)
{
    struct breaker_config cfg;
    breaker_config_default(&cfg);
    return cfg;
}

/* n calls at time t, each admitted and recorded with r; returns how many were admitted. */
static int feed(struct breaker *b, uint64_t t, int n, enum breaker_result r)
{
    int admitted = 0;
    for (int i = 0; i < n; i++) {
        if (breaker_allow(b, t)) {
            breaker_record(b, t, r);
            admitted++;
        }
    }
    return admitted;
}

static void test_config(void)
{
    struct breaker_config cfg = defaults();

    CHECK_EQ_INT(cfg.failure_pct, 60);
    CHECK_EQ_U64(cfg.window_ms, 30000);
    CHECK_EQ_INT(cfg.min_calls, 20);
    CHECK_EQ_U64(cfg.open_ms, 10000);
    CHECK_EQ_U64(cfg.open_max_ms, 60000);
    CHECK_EQ_INT(cfg.half_open_probes, 5);
    CHECK_EQ_INT(breaker_config_check(&cfg), 0);
    CHECK_EQ_INT(breaker_config_check(NULL), SETTLE_EINVAL);

    struct breaker_config c;
    c = cfg, c.failure_pct = 0;
    CHECK_EQ_INT(breaker_config_check(&c), SETTLE_EINVAL);
    c = cfg, c.failure_pct = 101;
    CHECK_EQ_INT(breaker_config_check(&c), SETTLE_EINVAL);
    c = cfg, c.failure_pct = 100;
    CHECK_EQ_INT(breaker_config_check(&c), 0);
    c = cfg, c.window_ms = 999;
    CHECK_EQ_INT(breaker_config_check(&c), SETTLE_EINVAL);
    c = cfg, c.window_ms = BREAKER_BUCKETS * 1000 + 1;
    CHECK_EQ_INT(breaker_config_check(&c), SETTLE_EINVAL);
    c = cfg, c.window_ms = BREAKER_BUCKETS * 1000;
    CHECK_EQ_INT(breaker_config_check(&c), 0);
    c = cfg, c.min_calls = 0;
    CHECK_EQ_INT(breaker_config_check(&c), SETTLE_EINVAL);
    c = cfg, c.open_ms = 0;
    CHECK_EQ_INT(breaker_config_check(&c), SETTLE_EINVAL);
    c = cfg, c.open_max_ms = cfg.open_ms - 1;
    CHECK_EQ_INT(breaker_config_check(&c), SETTLE_EINVAL);
    c = cfg, c.half_open_probes = 0;
    CHECK_EQ_INT(breaker_config_check(&c), SETTLE_EINVAL);

    CHECK_STR(breaker_state_name(BREAKER_CLOSED), "closed");
    CHECK_STR(breaker_state_name(BREAKER_OPEN), "open");
    CHECK_STR(breaker_state_name(BREAKER_HALF_OPEN), "half_open");
}

static void test_min_calls(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;

    breaker_init(&b, &cfg, 0);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    CHECK_EQ_INT(breaker_retry_in_ms(&b, 0), 0);
    /* 19 failures out of 19: 100 %, but below min_calls. */
    CHECK_EQ_INT(feed(&b, 1000, 19, BREAKER_FAILURE), 19);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    CHECK_EQ_U64(b.transitions, 0);
    /* The 20th reaches min_calls. */
    feed(&b, 1000, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
    CHECK_EQ_U64(b.transitions, 1);
}

static void test_exact_threshold(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;

    /* 8 successes then 12 failures: the 20th call makes 12/20 = 60 % exactly. */
    breaker_init(&b, &cfg, 0);
    feed(&b, 500, 8, BREAKER_SUCCESS);
    feed(&b, 500, 11, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, 500, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);

    /* 9 successes + 11 failures = 55 %: stays closed, and so do 12/21 and 13/22; 14/23 (60.9 %)
     * trips. */
    breaker_init(&b, &cfg, 0);
    feed(&b, 500, 9, BREAKER_SUCCESS);
    feed(&b, 500, 11, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, 500, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, 500, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, 500, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);

    /* A success can also be the call that reaches min_calls with the share above threshold. */
    breaker_init(&b, &cfg, 0);
    feed(&b, 500, 19, BREAKER_FAILURE);
    feed(&b, 500, 1, BREAKER_SUCCESS);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
}

static void test_ignored(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;

    breaker_init(&b, &cfg, 0);
    feed(&b, 2000, 19, BREAKER_FAILURE);
    /* 4xx/429 answers are neither calls nor failures for the window... */
    CHECK_EQ_INT(feed(&b, 2000, 100, BREAKER_IGNORED), 100);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, 2000, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);

    /* ...and they do not dilute the failure share either: 12 failures + 8 successes + many
     * ignored is still 60 %. */
    breaker_init(&b, &cfg, 0);
    feed(&b, 2000, 8, BREAKER_SUCCESS);
    feed(&b, 2000, 50, BREAKER_IGNORED);
    feed(&b, 2000, 12, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
}

/* Trips a fresh breaker at time t with min_calls failures. */
static void trip(struct breaker *b, uint64_t t)
{
    feed(b, t, (int)b->cfg.min_calls, BREAKER_FAILURE);
}

static void test_open_and_half_open(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;

    breaker_init(&b, &cfg, 0);
    trip(&b, 1000);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
    CHECK_EQ_U64(b.open_until_ms, 11000);
    CHECK_EQ_INT(breaker_allow(&b, 1000), 0);
    CHECK_EQ_U64(breaker_retry_in_ms(&b, 1000), 10000);
    CHECK_EQ_INT(breaker_allow(&b, 10999), 0);
    CHECK_EQ_U64(breaker_retry_in_ms(&b, 10999), 1);
    CHECK_EQ_U64(breaker_retry_in_ms(&b, 11000), 0);

    /* Exactly five probes are admitted. */
    CHECK_EQ_INT(breaker_allow(&b, 11000), 1);
    CHECK_EQ_INT(b.state, BREAKER_HALF_OPEN);
    CHECK_EQ_INT(breaker_allow(&b, 11001), 1);
    CHECK_EQ_INT(breaker_allow(&b, 11002), 1);
    CHECK_EQ_INT(breaker_allow(&b, 11003), 1);
    CHECK_EQ_INT(breaker_retry_in_ms(&b, 11003), 0);
    CHECK_EQ_INT(breaker_allow(&b, 11004), 1);
    CHECK_EQ_INT(breaker_allow(&b, 11005), 0);
    CHECK_EQ_INT(breaker_allow(&b, 11006), 0);
    CHECK(breaker_retry_in_ms(&b, 11006) >= 1);

    /* Four results are not enough to decide. */
    breaker_record(&b, 11100, BREAKER_SUCCESS);
    breaker_record(&b, 11100, BREAKER_SUCCESS);
    breaker_record(&b, 11100, BREAKER_FAILURE);
    breaker_record(&b, 11100, BREAKER_IGNORED); /* a finished probe that is not a failure */
    CHECK_EQ_INT(b.state, BREAKER_HALF_OPEN);
    CHECK_EQ_INT(breaker_allow(&b, 11100), 0);
    /* The fifth: 1 failure of 5 = 20 % < 60 %: closed. */
    breaker_record(&b, 11200, BREAKER_SUCCESS);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    CHECK_EQ_U64(b.transitions, 3);
    CHECK_EQ_INT(breaker_allow(&b, 11200), 1);
    breaker_record(&b, 11200, BREAKER_SUCCESS);
    /* The window was cleared on closing: the 20 failures that tripped it do not count again,
     * so 1 success + 18 failures (19 calls) is still below min_calls. */
    feed(&b, 11300, 18, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, 11300, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
}

static void test_half_open_reopens(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;

    /* 3 of 5 probes failing is 60 %, not below the threshold: open again. */
    breaker_init(&b, &cfg, 0);
    trip(&b, 0);
    for (int i = 0; i < 5; i++)
        CHECK_EQ_INT(breaker_allow(&b, 10000), 1);
    breaker_record(&b, 10010, BREAKER_FAILURE);
    breaker_record(&b, 10010, BREAKER_SUCCESS);
    breaker_record(&b, 10010, BREAKER_FAILURE);
    breaker_record(&b, 10010, BREAKER_SUCCESS);
    breaker_record(&b, 10010, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
    CHECK_EQ_INT(b.consecutive_trips, 2);
    CHECK_EQ_U64(b.open_until_ms, 10010 + 20000);

    /* 2 of 5 = 40 %: closed. */
    breaker_init(&b, &cfg, 0);
    trip(&b, 0);
    for (int i = 0; i < 5; i++)
        CHECK_EQ_INT(breaker_allow(&b, 10000), 1);
    breaker_record(&b, 10010, BREAKER_FAILURE);
    breaker_record(&b, 10010, BREAKER_FAILURE);
    breaker_record(&b, 10010, BREAKER_SUCCESS);
    breaker_record(&b, 10010, BREAKER_SUCCESS);
    breaker_record(&b, 10010, BREAKER_SUCCESS);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
}

static void test_late_results(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;

    /* Calls admitted while closed that finish after the trip must not be taken for probes. */
    breaker_init(&b, &cfg, 0);
    for (int i = 0; i < 10; i++)
        CHECK_EQ_INT(breaker_allow(&b, 0), 1); /* ten calls in flight */
    trip(&b, 0);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
    for (int i = 0; i < 5; i++)
        breaker_record(&b, 100, BREAKER_SUCCESS); /* finish while open: ignored */
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
    CHECK_EQ_INT(breaker_allow(&b, 10000), 1); /* one probe out */
    for (int i = 0; i < 5; i++)
        breaker_record(&b, 10001, BREAKER_SUCCESS); /* one counts as the probe, four ignored */
    CHECK_EQ_INT(b.state, BREAKER_HALF_OPEN);
    CHECK_EQ_INT(b.probes_finished, 1);
}

static void test_window_slides(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;

    /* Failures 29.999 s apart are in the same 30 s window... */
    breaker_init(&b, &cfg, 0);
    feed(&b, 1000, 19, BREAKER_FAILURE);
    feed(&b, 30999, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);

    /* ...30 s later the old bucket has expired. */
    breaker_init(&b, &cfg, 0);
    feed(&b, 1000, 19, BREAKER_FAILURE);
    feed(&b, 31000, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, 31000, 18, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, 45000, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);

    /* A bucket slot reused one lap (BREAKER_BUCKETS seconds) later starts from zero instead
     * of adding to the old second's counts. */
    breaker_init(&b, &cfg, 0);
    feed(&b, 1000, 19, BREAKER_FAILURE);
    feed(&b, 1000 + BREAKER_BUCKETS * 1000, 1, BREAKER_FAILURE);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    CHECK_EQ_INT(b.buckets[1].calls, 1);

    /* Ten minutes (five laps of the ring) of steady 50 % failures, below the threshold: the
     * breaker stays closed; then 30 s of 70 % failures trip it through the live window. */
    breaker_init(&b, &cfg, 0);
    for (uint64_t t = 0; t < 600000; t += 100)
        feed(&b, t, 1, (t / 100) % 2 ? BREAKER_FAILURE : BREAKER_SUCCESS);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    uint64_t t = 600000;
    for (int k = 0; b.state == BREAKER_CLOSED && k < 300; k++, t += 100)
        feed(&b, t, 1, k % 10 < 7 ? BREAKER_FAILURE : BREAKER_SUCCESS);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
    /* It took most of a window of bad calls to outweigh the good ones still in it. */
    CHECK(t > 600000 + 10000);
}

/* Lets the open period pass and fails all probes; returns the new open period. */
static uint64_t fail_probes(struct breaker *b)
{
    uint64_t t = b->open_until_ms;
    for (unsigned i = 0; i < b->cfg.half_open_probes; i++)
        breaker_allow(b, t);
    for (unsigned i = 0; i < b->cfg.half_open_probes; i++)
        breaker_record(b, t, BREAKER_FAILURE);
    return b->open_until_ms - t;
}

/* Lets the open period pass and passes all probes; returns the time it closed. */
static uint64_t pass_probes(struct breaker *b)
{
    uint64_t t = b->open_until_ms;
    for (unsigned i = 0; i < b->cfg.half_open_probes; i++)
        breaker_allow(b, t);
    for (unsigned i = 0; i < b->cfg.half_open_probes; i++)
        breaker_record(b, t, BREAKER_SUCCESS);
    return t;
}

static void test_open_period_doubles(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;

    breaker_init(&b, &cfg, 0);
    trip(&b, 0);
    CHECK_EQ_U64(b.open_until_ms, 10000);
    CHECK_EQ_U64(fail_probes(&b), 20000);
    CHECK_EQ_U64(fail_probes(&b), 40000);
    CHECK_EQ_U64(fail_probes(&b), 60000); /* 80000 capped at open_max */
    CHECK_EQ_U64(fail_probes(&b), 60000);
    CHECK_EQ_U64(fail_probes(&b), 60000);
    CHECK_EQ_INT(b.consecutive_trips, 6);

    /* Closing briefly does not reset the backoff: tripping again within a window of being
     * closed keeps doubling from where it was. */
    uint64_t closed_at = pass_probes(&b);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    trip(&b, closed_at + 5000);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
    CHECK_EQ_U64(b.open_until_ms - (closed_at + 5000), 60000);
    CHECK_EQ_INT(b.consecutive_trips, 7);

    /* A whole window of being closed forgets the trips: the next open period is open_ms. */
    closed_at = pass_probes(&b);
    CHECK_EQ_INT(b.state, BREAKER_CLOSED);
    feed(&b, closed_at + 29999, 1, BREAKER_SUCCESS);
    CHECK_EQ_INT(b.consecutive_trips, 7);
    trip(&b, closed_at + cfg.window_ms);
    CHECK_EQ_INT(b.state, BREAKER_OPEN);
    CHECK_EQ_INT(b.consecutive_trips, 1);
    CHECK_EQ_U64(b.open_until_ms - (closed_at + cfg.window_ms), 10000);

    /* No overflow when the open period is huge. */
    cfg.open_ms = UINT64_C(1) << 40;
    cfg.open_max_ms = UINT64_MAX / 4;
    breaker_init(&b, &cfg, 0);
    trip(&b, 0);
    for (int i = 0; i < 70; i++)
        CHECK(fail_probes(&b) <= cfg.open_max_ms);
    CHECK_EQ_U64(fail_probes(&b), cfg.open_max_ms);
}

struct sim_result {
    uint64_t transitions[2]; /* per simulated hour */
    uint64_t allowed[2];
    uint64_t max_open_ms_hour2;
    uint64_t min_open_ms_hour2;
};

/*
 * Two hours against a PG that fails two calls in three (deterministically: call k fails
 * unless k % 3 == 2), a caller trying every 10 ms and recording each admitted call's result
 * at once.
 */
static struct sim_result simulate(const struct breaker_config *cfg)
{
    struct sim_result r;
    struct breaker b;
    uint64_t calls = 0;

    memset(&r, 0, sizeof(r));
    r.min_open_ms_hour2 = UINT64_MAX;
    breaker_init(&b, cfg, 0);
    for (uint64_t t = 0; t < 2 * 3600000; t += 10) {
        int hour = t < 3600000 ? 0 : 1;
        uint64_t before = b.transitions;
        if (breaker_allow(&b, t)) {
            r.allowed[hour]++;
            breaker_record(&b, t, calls % 3 == 2 ? BREAKER_SUCCESS : BREAKER_FAILURE);
            calls++;
        }
        r.transitions[hour] += b.transitions - before;
        if (hour == 1 && b.transitions != before && b.state == BREAKER_OPEN) {
            uint64_t open = b.open_until_ms - t;
            if (open > r.max_open_ms_hour2)
                r.max_open_ms_hour2 = open;
            if (open < r.min_open_ms_hour2)
                r.min_open_ms_hour2 = open;
        }
    }
    return r;
}

static void test_simulation_anti_flapping(void)
{
    struct breaker_config cfg = defaults();

    struct sim_result damped = simulate(&cfg);
    printf("    anti-flapping: transitions hour1=%llu hour2=%llu, calls hour2=%llu\n",
           (unsigned long long)damped.transitions[0], (unsigned long long)damped.transitions[1],
           (unsigned long long)damped.allowed[1]);
    /* Without damping the breaker would flip open -> half-open -> open every ~10 s: about
     * 720 transitions an hour. With it, each cycle lasts open_max (60 s): ~120 an hour. */
    CHECK(damped.transitions[1] <= 130);
    CHECK(damped.transitions[1] >= 100);
    CHECK(damped.transitions[1] <= damped.transitions[0]);
    CHECK(damped.transitions[1] * 5 < 720);
    /* In hour 2 every open period is open_max. */
    CHECK_EQ_U64(damped.min_open_ms_hour2, cfg.open_max_ms);
    CHECK_EQ_U64(damped.max_open_ms_hour2, cfg.open_max_ms);
    /* Only probe bursts reach the PG: 5 per minute, not 100 per second. */
    CHECK(damped.allowed[1] <= 61 * cfg.half_open_probes);

    /* The same PG against a breaker without the doubling (open_max = open_ms) flaps. */
    struct breaker_config flat = cfg;
    flat.open_max_ms = flat.open_ms;
    struct sim_result flapping = simulate(&flat);
    printf("    fixed 10 s open: transitions hour1=%llu hour2=%llu\n",
           (unsigned long long)flapping.transitions[0],
           (unsigned long long)flapping.transitions[1]);
    CHECK(flapping.transitions[1] >= 700);
    CHECK(damped.transitions[1] * 5 < flapping.transitions[1]);
}

static void test_healthy_pg_stays_closed(void)
{
    struct breaker_config cfg = defaults();
    struct breaker b;
    uint64_t refused = 0;

    /* 10 % failures for an hour never trips a 60 % breaker. */
    breaker_init(&b, &cfg, 0);
    for (uint64_t t = 0, k = 0; t < 3600000; t += 10, k++) {
        if (!breaker_allow(&b, t)) {
            refused++;
            continue;
        }
        breaker_record(&b, t, k % 10 == 0 ? BREAKER_FAILURE : BREAKER_SUCCESS);
    }
    CHECK_EQ_U64(refused, 0);
    CHECK_EQ_U64(b.transitions, 0);
}

int main(void)
{
    RUN(test_config);
    RUN(test_min_calls);
    RUN(test_exact_threshold);
    RUN(test_ignored);
    RUN(test_open_and_half_open);
    RUN(test_half_open_reopens);
    RUN(test_late_results);
    RUN(test_window_slides);
    RUN(test_open_period_doubles);
    RUN(test_simulation_anti_flapping);
    RUN(test_healthy_pg_stays_closed);
    return unit_finish();
}
