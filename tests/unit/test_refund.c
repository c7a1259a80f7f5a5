/*
 * test_refund.c - unit tests of the pure refund policy (refund.c): FNV-1a 128 vectors and the
 * derived refund id, the refund state table and its SQL form, the over-refund admission
 * rule, matching a redelivered job to its row, the payment and order statuses after a refund,
 * and every decision after opening, cancelling and resolving.
 * Thread: main only; no servers, no clock.
 */
#include "settle/error.h"
#include "settle/refund.h"

#include "unit.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static const struct refund_policy policy = {
    .retry_base_ms = 100,
    .retry_cap_ms = 1000,
    .retry_max_attempts = 4,
    .retry_after_max_ms = 60000,
    .retry_deadline_ms = 3600000,
};

static struct job make_job(const char *order, const char *user, const char *key)
{
    struct job j;
    memset(&j, 0, sizeof(j));
    j.kind = JOB_KIND_REFUND;
    snprintf(j.order_id, sizeof(j.order_id), "%s", order);
    snprintf(j.user_id, sizeof(j.user_id), "%s", user);
    snprintf(j.transaction_key, sizeof(j.transaction_key), "%s", key);
    return j;
}

static struct refund_row make_row(enum refund_state state, int64_t amount)
{
    struct refund_row r;
    memset(&r, 0, sizeof(r));
    snprintf(r.id, sizeof(r.id), "rf-1");
    snprintf(r.order_id, sizeof(r.order_id), "o1");
    snprintf(r.user_id, sizeof(r.user_id), "u1");
    snprintf(r.transaction_key, sizeof(r.transaction_key), "TK1");
    r.state = state;
    r.amount_minor = amount;
    return r;
}

static struct gateway_result gw(enum gateway_outcome o, long http, bool sent)
{
    struct gateway_result g;
    memset(&g, 0, sizeof(g));
    g.outcome = o;
    g.http_status = http;
    g.request_sent = sent;
    g.tx.cancelled_minor = -1;
    g.tx.balance_minor = -1;
    snprintf(g.error, sizeof(g.error), "PG answered HTTP %ld", http);
    return g;
}

static struct gateway_result gw_tx(enum gateway_tx_status st, const char *key, int64_t cancelled)
{
    struct gateway_result g = gw(GATEWAY_OK, 200, true);
    g.error[0] = '\0';
    snprintf(g.tx.transaction_key, sizeof(g.tx.transaction_key), "%s", key);
    g.tx.status = st;
    g.tx.amount_minor = 100;
    g.tx.cancelled_minor = cancelled;
    g.tx.balance_minor = 100 - cancelled;
    return g;
}

static void test_fnv_vectors(void)
{
    char hex[33];
    refund_fnv1a128_hex("", 0, hex, sizeof(hex));
    CHECK_STR(hex, "6c62272e07bb014262b821756295c58d");
    refund_fnv1a128_hex("a", 1, hex, sizeof(hex));
    CHECK_STR(hex, "d228cb696f1a8caf78912b704e4a8964");
    refund_fnv1a128_hex("foobar", 6, hex, sizeof(hex));
    CHECK_STR(hex, "343e1662793c64bf6f0d3597ba446f18");
}

static void test_identity(void)
{
    char a[REFUND_ID_MAX + 1], b[REFUND_ID_MAX + 1];
    struct job j = make_job("order-1", "u1", "20250101:TR:abc");

    /* Values computed independently (tests/integration/test_refund.py derives the same). */
    snprintf(j.reason, sizeof(j.reason), "customer_request");
    refund_identity(&j, a, sizeof(a));
    CHECK_STR(a, "rf:bf5c4f591454aab5f1249f6085175618");
    CHECK_EQ_INT(strlen(a), 35);

    struct job k = make_job("order-1", "someone-else", "20250101:TR:abc");
    k.has_amount = true;
    k.amount_minor = 250;
    k.restock = true;
    refund_identity(&k, b, sizeof(b));
    CHECK_STR(b, "rf:396a37942ee07a8febf80f7cad5c5f81");

    /* The same request always gets the same id; the user is not part of it (a forged user
     * is caught by the payment check, not by a new id). */
    refund_identity(&j, b, sizeof(b));
    CHECK_STR(a, b);
    struct job u = j;
    snprintf(u.user_id, sizeof(u.user_id), "u2");
    refund_identity(&u, b, sizeof(b));
    CHECK_STR(a, b);

    /* Every other field changes it. */
    struct job m = j;
    m.has_amount = true;
    m.amount_minor = 1;
    refund_identity(&m, b, sizeof(b));
    CHECK(strcmp(a, b) != 0);
    m = j;
    m.restock = true;
    refund_identity(&m, b, sizeof(b));
    CHECK(strcmp(a, b) != 0);
    m = j;
    m.reason[0] = '\0';
    refund_identity(&m, b, sizeof(b));
    CHECK(strcmp(a, b) != 0);

    /* A separator inside a field cannot make two requests collide. */
    struct job x = make_job("a|b", "u1", "c");
    struct job y = make_job("a", "u1", "b|c");
    refund_identity(&x, a, sizeof(a));
    refund_identity(&y, b, sizeof(b));
    CHECK(strcmp(a, b) != 0);

    /* A producer's id wins, as given. */
    snprintf(j.id, sizeof(j.id), "oos:order-1");
    refund_identity(&j, a, sizeof(a));
    CHECK_STR(a, "oos:order-1");
}

static void test_state_table(void)
{
    enum refund_state s;
    for (int i = 0; i < REFUND_STATE_COUNT; i++) {
        CHECK(refund_state_parse(refund_state_name((enum refund_state)i), &s) == 0);
        CHECK_EQ_INT(s, i);
        CHECK(!refund_transition_ok((enum refund_state)i, (enum refund_state)i));
    }
    CHECK(refund_state_parse("DONE", &s) == SETTLE_EINVAL);
    CHECK(refund_state_name(REFUND_STATE_COUNT) == NULL);

    CHECK(refund_transition_ok(REFUND_REQUESTED, REFUND_SUCCEEDED));
    CHECK(refund_transition_ok(REFUND_REQUESTED, REFUND_FAILED));
    CHECK(refund_transition_ok(REFUND_REQUESTED, REFUND_UNKNOWN));
    CHECK(refund_transition_ok(REFUND_UNKNOWN, REFUND_SUCCEEDED));
    CHECK(refund_transition_ok(REFUND_UNKNOWN, REFUND_FAILED));
    CHECK(refund_transition_ok(REFUND_UNKNOWN, REFUND_MANUAL_REVIEW));
    CHECK(!refund_transition_ok(REFUND_UNKNOWN, REFUND_REQUESTED));
    CHECK(!refund_transition_ok(REFUND_SUCCEEDED, REFUND_FAILED));
    CHECK(!refund_transition_ok(REFUND_SUCCEEDED, REFUND_UNKNOWN));
    CHECK(!refund_transition_ok(REFUND_FAILED, REFUND_SUCCEEDED));
    CHECK(!refund_transition_ok(REFUND_MANUAL_REVIEW, REFUND_UNKNOWN));

    /* The SQL literal of the sources of each state says exactly what the table says. */
    for (int to = 0; to < REFUND_STATE_COUNT; to++) {
        const char *lit = refund_sources_literal((enum refund_state)to);
        CHECK(lit[0] == '{' && lit[strlen(lit) - 1] == '}');
        for (int from = 0; from < REFUND_STATE_COUNT; from++) {
            char needle[40];
            const char *name = refund_state_name((enum refund_state)from);
            int in = 0;
            snprintf(needle, sizeof(needle), "{%s,", name);
            in |= strstr(lit, needle) != NULL;
            snprintf(needle, sizeof(needle), ",%s,", name);
            in |= strstr(lit, needle) != NULL;
            snprintf(needle, sizeof(needle), ",%s}", name);
            in |= strstr(lit, needle) != NULL;
            snprintf(needle, sizeof(needle), "{%s}", name);
            in |= strstr(lit, needle) != NULL;
            CHECK_EQ_INT(in, refund_transition_ok((enum refund_state)from, (enum refund_state)to));
        }
    }
    CHECK(refund_state_is_live(REFUND_REQUESTED) && refund_state_is_live(REFUND_SUCCEEDED) &&
          refund_state_is_live(REFUND_UNKNOWN) && refund_state_is_live(REFUND_MANUAL_REVIEW));
    CHECK(!refund_state_is_live(REFUND_FAILED));
}

static struct refund_payment_view view(const char *status, int64_t amount, int64_t live)
{
    struct refund_payment_view v;
    memset(&v, 0, sizeof(v));
    v.order_found = true;
    v.payment_found = true;
    snprintf(v.order_user_id, sizeof(v.order_user_id), "u1");
    snprintf(v.user_id, sizeof(v.user_id), "u1");
    snprintf(v.transaction_key, sizeof(v.transaction_key), "TK1");
    snprintf(v.status, sizeof(v.status), "%s", status);
    v.amount_minor = amount;
    v.live_others_minor = live;
    return v;
}

static void test_admit(void)
{
    char why[256];
    int64_t amount = 0;
    struct job j = make_job("o1", "u1", "TK1");
    struct refund_payment_view v = view("SUCCESS", 100, 0);

    /* No amount: the whole remaining balance. */
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_OK);
    CHECK_EQ_INT(amount, 100);
    v = view("PARTIALLY_REFUNDED", 100, 30);
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_OK);
    CHECK_EQ_INT(amount, 70);

    /* Two refunds of 60 on 100: the second sees the first as live. */
    j.has_amount = true;
    j.amount_minor = 60;
    v = view("SUCCESS", 100, 0);
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_OK);
    CHECK_EQ_INT(amount, 60);
    v = view("SUCCESS", 100, 60);
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_EXCEEDS);
    CHECK_CONTAINS(why, "exceeds the balance");
    j.amount_minor = 40;
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_OK);
    j.amount_minor = 41;
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_EXCEEDS);
    /* Nothing left and no amount: not a refund of zero. */
    j.has_amount = false;
    v = view("PARTIALLY_REFUNDED", 100, 100);
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_EXCEEDS);

    v = view("FAILED", 100, 0);
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_NOT_REFUNDABLE);
    v = view("REFUNDED", 100, 100);
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_NOT_REFUNDABLE);
    v = view("CANCELLED", 100, 0);
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_NOT_REFUNDABLE);
    v = view("PENDING", 100, 0);
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_NOT_SETTLED);
    v.payment_found = false;
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_NOT_SETTLED);
    v.order_found = false;
    CHECK_EQ_INT(refund_admit(&j, &v, &amount, why, sizeof(why)), REFUND_ADMIT_ORDER_NOT_FOUND);

    /* Forged: another user, or another transaction key. */
    v = view("SUCCESS", 100, 0);
    struct job f = make_job("o1", "intruder", "TK1");
    CHECK_EQ_INT(refund_admit(&f, &v, &amount, why, sizeof(why)), REFUND_ADMIT_MISMATCH);
    f = make_job("o1", "u1", "TK-other");
    CHECK_EQ_INT(refund_admit(&f, &v, &amount, why, sizeof(why)), REFUND_ADMIT_MISMATCH);
    /* The order's owner is checked even before a payment exists. */
    v.payment_found = false;
    f = make_job("o1", "intruder", "TK1");
    CHECK_EQ_INT(refund_admit(&f, &v, &amount, why, sizeof(why)), REFUND_ADMIT_MISMATCH);

    CHECK_STR(refund_admission_name(REFUND_ADMIT_EXCEEDS), "exceeds_balance");
    CHECK_STR(refund_admission_name(REFUND_ADMIT_NOT_REFUNDABLE), "payment_not_refundable");
    CHECK_STR(refund_admission_name(REFUND_ADMIT_MISMATCH), "order_mismatch");
}

static void test_match_existing(void)
{
    char why[256];
    struct refund_row r = make_row(REFUND_SUCCEEDED, 60);
    struct job j = make_job("o1", "u1", "TK1");
    CHECK_EQ_INT(refund_match_existing(&j, &r, why, sizeof(why)), REFUND_ADMIT_OK);
    j.has_amount = true;
    j.amount_minor = 60;
    CHECK_EQ_INT(refund_match_existing(&j, &r, why, sizeof(why)), REFUND_ADMIT_OK);
    j.amount_minor = 61;
    CHECK_EQ_INT(refund_match_existing(&j, &r, why, sizeof(why)), REFUND_ADMIT_ID_REUSED);
    j.amount_minor = 60;
    j.restock = true;
    CHECK_EQ_INT(refund_match_existing(&j, &r, why, sizeof(why)), REFUND_ADMIT_ID_REUSED);
    struct job o = make_job("o2", "u1", "TK1");
    CHECK_EQ_INT(refund_match_existing(&o, &r, why, sizeof(why)), REFUND_ADMIT_ID_REUSED);
    struct job u = make_job("o1", "u9", "TK1");
    CHECK_EQ_INT(refund_match_existing(&u, &r, why, sizeof(why)), REFUND_ADMIT_MISMATCH);
}

static void test_statuses(void)
{
    CHECK_STR(refund_payment_status(100, 100), "REFUNDED");
    CHECK_STR(refund_payment_status(100, 99), "PARTIALLY_REFUNDED");
    CHECK_STR(refund_order_status("COMPLETED", 100, 30), "PARTIALLY_REFUNDED");
    CHECK_STR(refund_order_status("COMPLETED", 100, 100), "REFUNDED");
    CHECK_STR(refund_order_status("PARTIALLY_REFUNDED", 100, 100), "REFUNDED");
    /* Out of stock after the charge: the order stays FAILED, only the amount moves. */
    CHECK_STR(refund_order_status("FAILED", 100, 100), "FAILED");
    CHECK_STR(refund_order_status("MANUAL_REVIEW", 100, 50), "MANUAL_REVIEW");
}

static void test_after_open(void)
{
    struct refund_progress pr = {.attempts = 0, .age_ms = 10, .rand64 = 7};
    struct refund_decision d;
    struct refund_row r = make_row(REFUND_REQUESTED, 60);

    r.created = true;
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_OK, "", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_CANCEL);
    r.state = REFUND_UNKNOWN;
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_OK, "", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_CANCEL);
    r.state = REFUND_MANUAL_REVIEW; /* re-driven from the DLQ */
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_OK, "", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_CANCEL);
    r.state = REFUND_SUCCEEDED;
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_OK, "", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_COMPLETE);
    r.state = REFUND_FAILED;
    snprintf(r.failure_reason, sizeof(r.failure_reason), "exceeds_balance");
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_OK, "", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_DEAD);
    CHECK_STR(d.reason, "exceeds_balance");
    snprintf(r.failure_reason, sizeof(r.failure_reason), "gateway_rejected");
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_OK, "", &r, &d);
    CHECK_STR(d.reason, "gateway_rejected");

    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_EXCEEDS, "too much", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_DEAD);
    CHECK_STR(d.reason, "exceeds_balance");
    CHECK_STR(d.detail, "too much");
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_MISMATCH, "", &r, &d);
    CHECK_STR(d.reason, "order_mismatch");
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_NOT_REFUNDABLE, "", &r, &d);
    CHECK_STR(d.reason, "payment_not_refundable");
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_ORDER_NOT_FOUND, "", &r, &d);
    CHECK_STR(d.reason, "order_not_found");

    /* A PENDING payment may settle in a moment: retried, then dead. */
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_NOT_SETTLED, "pending", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_RETRY);
    CHECK(d.attempt_failed && !d.mark_unknown);
    pr.attempts = policy.retry_max_attempts - 1;
    refund_after_open(&policy, &pr, 0, "", REFUND_ADMIT_NOT_SETTLED, "pending", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_DEAD);
    CHECK_STR(d.reason, "payment_not_refundable");
    CHECK_CONTAINS(d.detail, "gave up after 4 attempts");

    /* PostgreSQL down: wait without spending attempts, until the retry deadline. */
    pr.attempts = policy.retry_max_attempts - 1;
    refund_after_open(&policy, &pr, SETTLE_EUNAVAILABLE, "down", REFUND_ADMIT_OK, "", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_WAIT);
    CHECK(!d.attempt_failed && d.delay_ms <= policy.retry_cap_ms);
    CHECK_STR(d.detail, "down");
    pr.age_ms = policy.retry_deadline_ms;
    refund_after_open(&policy, &pr, SETTLE_EUNAVAILABLE, "down", REFUND_ADMIT_OK, "", &r, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_DEAD);
    CHECK_STR(d.reason, "store_unavailable");
    pr.age_ms = 10;
    pr.attempts = 0;
    refund_after_open(&policy, &pr, SETTLE_EREJECTED, "SQLSTATE 23514", REFUND_ADMIT_OK, "", &r,
                      &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_DEAD);
    CHECK_STR(d.reason, "store_rejected");
}

static void test_after_cancel(void)
{
    struct refund_progress pr = {.attempts = 0, .age_ms = 10, .rand64 = 12345};
    struct refund_decision d;
    struct refund_row r = make_row(REFUND_REQUESTED, 60);
    struct gateway_result g;

    g = gw_tx(GATEWAY_TX_PARTIALLY_CANCELLED, "TK1", 60);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_COMPLETE);
    g = gw_tx(GATEWAY_TX_CANCELLED, "TK-other", 100);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_RETRY);
    CHECK(d.mark_unknown);

    /* No answer after sending: UNKNOWN and the same key again. */
    g = gw(GATEWAY_TRANSIENT, 0, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_RETRY);
    CHECK(d.mark_unknown && d.attempt_failed);
    CHECK(d.delay_ms <= policy.retry_base_ms);
    /* Never sent (connect failure): still REQUESTED. */
    g = gw(GATEWAY_TRANSIENT, 0, false);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_RETRY);
    CHECK(!d.mark_unknown);
    /* A 5xx is an answer that may hide an effect. */
    g = gw(GATEWAY_TRANSIENT, 503, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK(d.verdict == REFUND_DO_RETRY && d.mark_unknown);
    /* A 2xx we cannot read too. */
    g = gw(GATEWAY_BAD_RESPONSE, 200, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK(d.verdict == REFUND_DO_RETRY && d.mark_unknown);
    /* Already UNKNOWN: no second mark. */
    r.state = REFUND_UNKNOWN;
    g = gw(GATEWAY_TRANSIENT, 0, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK(d.verdict == REFUND_DO_RETRY && !d.mark_unknown);
    /* Retry-After is honoured. */
    g = gw(GATEWAY_TRANSIENT, 429, true);
    g.retry_after_ms = 5000;
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK(d.verdict == REFUND_DO_RETRY && d.delay_ms >= 5000);
    /* Out of attempts without an answer: a person looks; never FAILED. */
    pr.attempts = policy.retry_max_attempts - 1;
    g = gw(GATEWAY_TRANSIENT, 0, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_MANUAL_REVIEW);
    CHECK_STR(d.reason, "refund_unknown");
    /* Past the retry deadline likewise. */
    pr.attempts = 0;
    pr.age_ms = policy.retry_deadline_ms;
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_MANUAL_REVIEW);
    pr.age_ms = 10;

    r.state = REFUND_REQUESTED;
    g = gw(GATEWAY_REJECTED, 409, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_RESOLVE);
    g = gw(GATEWAY_REJECTED, 422, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_FAIL);
    CHECK_STR(d.reason, "exceeds_balance");
    CHECK_CONTAINS(d.detail, "HTTP 422");
    g = gw(GATEWAY_REJECTED, 400, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_FAIL);
    CHECK_STR(d.reason, "gateway_rejected");
    g = gw(GATEWAY_NOT_FOUND, 404, true);
    refund_after_cancel(&policy, &pr, &r, &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_FAIL);
    CHECK_STR(d.reason, "gateway_rejected");
}

static void test_after_resolve(void)
{
    struct refund_progress pr = {.attempts = 0, .age_ms = 10, .rand64 = 3};
    struct refund_decision d;
    struct refund_row r = make_row(REFUND_REQUESTED, 60);
    struct gateway_result g;

    r.others_succeeded_minor = 40;
    g = gw_tx(GATEWAY_TX_CANCELLED, "TK1", 100);
    refund_after_resolve(&policy, &pr, &r, "HTTP 409", &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_COMPLETE);
    g = gw_tx(GATEWAY_TX_PARTIALLY_CANCELLED, "TK1", 99);
    refund_after_resolve(&policy, &pr, &r, "HTTP 409", &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_FAIL);
    CHECK_STR(d.reason, "gateway_rejected");
    CHECK_CONTAINS(d.detail, "HTTP 409");
    g = gw_tx(GATEWAY_TX_SUCCESS, "TK1", 0);
    refund_after_resolve(&policy, &pr, &r, "HTTP 409", &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_FAIL);
    g = gw_tx(GATEWAY_TX_CANCELLED, "TK-other", 100);
    refund_after_resolve(&policy, &pr, &r, "HTTP 409", &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_FAIL);
    g = gw(GATEWAY_TRANSIENT, 503, true);
    refund_after_resolve(&policy, &pr, &r, "HTTP 409", &g, &d);
    CHECK(d.verdict == REFUND_DO_RETRY && !d.mark_unknown);
    pr.attempts = policy.retry_max_attempts - 1;
    refund_after_resolve(&policy, &pr, &r, "HTTP 409", &g, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_FAIL);
}

static void test_breaker_open(void)
{
    struct refund_progress pr = {.attempts = 0, .age_ms = 10, .rand64 = 999};
    struct refund_decision d;
    refund_breaker_open(&policy, &pr, 10000, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_WAIT);
    CHECK(d.delay_ms >= 10000 && d.delay_ms <= 11001);
    CHECK(!d.attempt_failed);
    pr.age_ms = policy.retry_deadline_ms + 1;
    refund_breaker_open(&policy, &pr, 10000, &d);
    CHECK_EQ_INT(d.verdict, REFUND_DO_MANUAL_REVIEW);
    CHECK_STR(d.reason, "refund_unknown");
    CHECK_STR(refund_verdict_name(REFUND_DO_RESOLVE), "resolve");
}

int main(void)
{
    RUN(test_fnv_vectors);
    RUN(test_identity);
    RUN(test_state_table);
    RUN(test_admit);
    RUN(test_match_existing);
    RUN(test_statuses);
    RUN(test_after_open);
    RUN(test_after_cancel);
    RUN(test_after_resolve);
    RUN(test_breaker_open);
    return unit_finish();
}
