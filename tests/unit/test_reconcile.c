/*
 * test_reconcile.c - the reconcile policy without servers: every row of the decision table in
 * reconcile.h, retry exhaustion and deadlines, breaker waits and forged answers.
 */
#include <string.h>

#include "settle/error.h"
#include "settle/reconcile.h"
#include "unit.h"

static struct reconcile_policy policy(void)
{
    struct reconcile_policy p = {
        .retry_base_ms = 1000,
        .retry_cap_ms = 30000,
        .retry_max_attempts = 8,
        .retry_after_max_ms = 300000,
        .retry_deadline_ms = 3600000,
        .payment_window_ms = 300000,
        .pending_max_age_ms = 86400000,
    };
    retry_schedule_parse("60000,300000", &p.check_schedule);
    return p;
}

static struct job job_for(const char *order, const char *user, const char *key)
{
    struct job j;
    memset(&j, 0, sizeof(j));
    j.kind = JOB_KIND_RECONCILE;
    strncpy(j.order_id, order, JOB_ID_MAX);
    strncpy(j.user_id, user, JOB_ID_MAX);
    strncpy(j.transaction_key, key, JOB_ID_MAX);
    return j;
}

static struct store_order order_for(const char *id, const char *user, const char *status,
                                    int64_t amount, uint64_t age_ms)
{
    struct store_order o;
    memset(&o, 0, sizeof(o));
    strncpy(o.id, id, JOB_ID_MAX);
    strncpy(o.user_id, user, JOB_ID_MAX);
    strncpy(o.status, status, STORE_STATUS_MAX - 1);
    o.amount_minor = amount;
    o.age_ms = age_ms;
    return o;
}

static struct gateway_result answer(enum gateway_tx_status st, const char *order, int64_t amount,
                                    const char *key)
{
    struct gateway_result g;
    memset(&g, 0, sizeof(g));
    g.outcome = GATEWAY_OK;
    g.http_status = 200;
    g.tx.status = st;
    strncpy(g.tx.order_id, order, JOB_ID_MAX);
    strncpy(g.tx.transaction_key, key, JOB_ID_MAX);
    g.tx.amount_minor = amount;
    return g;
}

static void test_after_load(void)
{
    struct reconcile_policy p = policy();
    struct reconcile_progress pr = {0};
    struct reconcile_decision d;
    struct job j = job_for("o1", "u1", "");
    struct store_order o = order_for("o1", "u1", "PENDING", 5000, 1000);

    reconcile_after_load(&p, &pr, &j, 0, "", &o, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_QUERY);

    reconcile_after_load(&p, &pr, &j, SETTLE_ENOTFOUND, "", &o, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "order_not_found");

    struct store_order done = order_for("o1", "u1", "COMPLETED", 5000, 1000);
    reconcile_after_load(&p, &pr, &j, 0, "", &done, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_SKIP);
    CHECK_CONTAINS(d.detail, "COMPLETED");

    struct job intruder = job_for("o1", "someone-else", "");
    reconcile_after_load(&p, &pr, &intruder, 0, "", &o, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "order_mismatch");

    struct job wrong_key = job_for("o1", "u1", "tk-2");
    struct store_order keyed = o;
    strncpy(keyed.transaction_key, "tk-1", JOB_ID_MAX);
    reconcile_after_load(&p, &pr, &wrong_key, 0, "", &keyed, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "order_mismatch");

    /* A database outage is transient; a constraint violation is not. */
    reconcile_after_load(&p, &pr, &j, SETTLE_EUNAVAILABLE, "connection refused", &o, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_WAIT); /* an outage spends no attempt */
    CHECK(!d.attempt_failed);
    CHECK(d.delay_ms <= 30000);
    CHECK_STR(d.reason, "store_unavailable");
    pr.attempts = 100;
    reconcile_after_load(&p, &pr, &j, SETTLE_EUNAVAILABLE, "connection refused", &o, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_WAIT);
    pr.attempts = 0;
    pr.age_ms = 3600000;
    reconcile_after_load(&p, &pr, &j, SETTLE_EUNAVAILABLE, "connection refused", &o, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "store_unavailable");
    pr.age_ms = 0;
    reconcile_after_load(&p, &pr, &j, SETTLE_EREJECTED, "SQLSTATE 23514", &o, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "store_rejected");
}

static void test_after_query_outcomes(void)
{
    struct reconcile_policy p = policy();
    struct reconcile_progress pr = {0};
    struct reconcile_decision d;
    struct job j = job_for("o1", "u1", "tk-1");
    struct store_order o = order_for("o1", "u1", "PENDING", 5000, 1000);
    struct gateway_result g;

    g = answer(GATEWAY_TX_SUCCESS, "o1", 5000, "tk-1");
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_COMPLETE);

    g = answer(GATEWAY_TX_FAILED, "o1", 5000, "tk-1");
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_FAIL);

    /* PENDING follows the schedule: first 60 s, then 300 s repeated; no attempt spent. */
    g = answer(GATEWAY_TX_PENDING, "o1", 5000, "tk-1");
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_RECHECK);
    CHECK_EQ_U64(d.delay_ms, 60000);
    CHECK(!d.attempt_failed);
    pr.checks = 5;
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_U64(d.delay_ms, 300000);
    pr.checks = 0;

    /* PENDING for too long: a human decides, never a guess. */
    struct store_order old = order_for("o1", "u1", "PENDING", 5000, 86400000);
    reconcile_after_query(&p, &pr, &j, &old, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_MANUAL_REVIEW);
    CHECK_STR(d.reason, "pending_too_long");

    g = answer(GATEWAY_TX_CANCELLED, "o1", 5000, "tk-1");
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_MANUAL_REVIEW);
}

static void test_not_found_window(void)
{
    struct reconcile_policy p = policy();
    struct reconcile_progress pr = {0};
    struct reconcile_decision d;
    struct job j = job_for("o1", "u1", "");
    struct gateway_result g;
    memset(&g, 0, sizeof(g));
    g.outcome = GATEWAY_NOT_FOUND;
    g.http_status = 404;

    struct store_order young = order_for("o1", "u1", "PENDING", 5000, 299999);
    reconcile_after_query(&p, &pr, &j, &young, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_RECHECK);

    struct store_order expired = order_for("o1", "u1", "PENDING", 5000, 300000);
    reconcile_after_query(&p, &pr, &j, &expired, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_EXPIRE);
    CHECK_STR(d.reason, "payment_window_passed");
}

static void test_forged_answers_never_complete(void)
{
    struct reconcile_policy p = policy();
    struct reconcile_progress pr = {0};
    struct reconcile_decision d;
    struct job j = job_for("o1", "u1", "tk-1");
    struct store_order o = order_for("o1", "u1", "PENDING", 5000, 1000);
    struct gateway_result g;

    g = answer(GATEWAY_TX_SUCCESS, "o2", 5000, "tk-1");
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "gateway_mismatch");

    g = answer(GATEWAY_TX_SUCCESS, "o1", 4999, "tk-1");
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "gateway_mismatch");

    g = answer(GATEWAY_TX_SUCCESS, "o1", 5000, "tk-other");
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "gateway_mismatch");

    /* Without a key in the job the answer's key is not compared, only order and amount. */
    struct job nokey = job_for("o1", "u1", "");
    g = answer(GATEWAY_TX_SUCCESS, "o1", 5000, "tk-9");
    reconcile_after_query(&p, &pr, &nokey, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_COMPLETE);
}

static void test_transient_and_exhaustion(void)
{
    struct reconcile_policy p = policy();
    struct reconcile_progress pr = {0};
    struct reconcile_decision d;
    struct job j = job_for("o1", "u1", "tk-1");
    struct store_order o = order_for("o1", "u1", "PENDING", 5000, 1000);
    struct gateway_result g;
    memset(&g, 0, sizeof(g));
    g.outcome = GATEWAY_TRANSIENT;
    g.http_status = 503;
    strncpy(g.error, "PG answered HTTP 503", sizeof(g.error) - 1);

    for (unsigned a = 0; a < 7; a++) {
        pr.attempts = a;
        pr.rand64 = 0xffffffffffffffffULL - a;
        reconcile_after_query(&p, &pr, &j, &o, &g, &d);
        CHECK_EQ_INT(d.verdict, RECONCILE_RETRY);
        CHECK(d.attempt_failed);
        CHECK(d.delay_ms <= retry_ceiling_ms(a + 1, 1000, 30000));
    }
    pr.attempts = 7; /* the 8th try fails: out of attempts */
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "gateway_unavailable");
    CHECK_CONTAINS(d.detail, "gave up after 8 attempts");

    /* Retry-After is honoured. */
    pr.attempts = 0;
    pr.rand64 = 0;
    g.retry_after_ms = 7000;
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_RETRY);
    CHECK_EQ_U64(d.delay_ms, 7000);

    /* Past the retry deadline, no more retries. */
    pr.age_ms = 3600000;
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_CONTAINS(d.detail, "retry deadline");

    /* Malformed answers are retried too, under their own reason. */
    pr.age_ms = 0;
    g.outcome = GATEWAY_BAD_RESPONSE;
    pr.attempts = 7;
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_STR(d.reason, "gateway_bad_response");

    g.outcome = GATEWAY_REJECTED;
    g.http_status = 400;
    pr.attempts = 0;
    reconcile_after_query(&p, &pr, &j, &o, &g, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "gateway_rejected");
}

static void test_breaker_wait(void)
{
    struct reconcile_policy p = policy();
    struct reconcile_progress pr = {0};
    struct reconcile_decision d;
    for (uint64_t r = 0; r < 1000; r++) {
        pr.rand64 = r * 7919;
        reconcile_breaker_open(&p, &pr, 10000, &d);
        CHECK_EQ_INT(d.verdict, RECONCILE_WAIT);
        CHECK(!d.attempt_failed);
        CHECK(d.delay_ms >= 10000 && d.delay_ms <= 11001);
    }
    pr.age_ms = 3600000;
    reconcile_breaker_open(&p, &pr, 10000, &d);
    CHECK_EQ_INT(d.verdict, RECONCILE_DEAD);
    CHECK_STR(d.reason, "gateway_unavailable");
}

int main(void)
{
    test_after_load();
    test_after_query_outcomes();
    test_not_found_window();
    test_forged_answers_never_complete();
    test_transient_and_exhaustion();
    test_breaker_wait();
    return unit_finish();
}
