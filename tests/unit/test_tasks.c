/*
 * test_tasks.c - unit tests of the pure parts of scheduled work: task names, UTC dates and the
 * daily period (the time of day has passed or not), the interval and daily due checks
 * (seed 004's max(run time, interval), stale take-over, daily retries), the PG orphan
 * sweep's decision table, and the parser of the PG's paged payment list
 * (gateway_parse_payment_page).
 * Thread: main only; no servers.
 */
#include "settle/error.h"
#include "settle/gateway.h"
#include "settle/tasks.h"

#include "unit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 2025-03-01T00:00:00Z in epoch ms. */
#define MAR1_2025 INT64_C(1740787200000)
#define HOUR INT64_C(3600000)
#define MINUTE INT64_C(60000)

static void test_names(void)
{
    enum tasks_id id;
    const char *names[] = {"stale_sweep", "order_expiry", "orphan_sweep", "stock_sync",
                           "daily_stats"};
    for (int i = 0; i < TASK_COUNT; i++) {
        CHECK_STR(tasks_name((enum tasks_id)i), names[i]);
        CHECK_EQ_INT(tasks_parse(names[i], &id), 0);
        CHECK_EQ_INT(id, i);
    }
    CHECK(tasks_name(TASK_COUNT) == NULL);
    CHECK_EQ_INT(tasks_parse("stale-sweep", &id), SETTLE_EINVAL);
    CHECK_EQ_INT(tasks_parse("", &id), SETTLE_EINVAL);
    CHECK_EQ_INT(tasks_parse(NULL, &id), SETTLE_EINVAL);
    CHECK(!tasks_is_daily(TASK_STALE_SWEEP) && !tasks_is_daily(TASK_ORDER_EXPIRY) &&
          !tasks_is_daily(TASK_ORPHAN_SWEEP));
    CHECK(tasks_is_daily(TASK_STOCK_SYNC) && tasks_is_daily(TASK_DAILY_STATS));
}

static void test_dates(void)
{
    char out[TASKS_DATE_LEN];

    CHECK(tasks_date_valid("2025-03-01"));
    CHECK(tasks_date_valid("2024-02-29"));
    CHECK(tasks_date_valid("2000-02-29"));
    CHECK(!tasks_date_valid("1900-02-29"));
    CHECK(!tasks_date_valid("2025-02-29"));
    CHECK(!tasks_date_valid("2025-13-01"));
    CHECK(!tasks_date_valid("2025-00-10"));
    CHECK(!tasks_date_valid("2025-04-31"));
    CHECK(!tasks_date_valid("2025-4-1"));
    CHECK(!tasks_date_valid("2025/04/01"));
    CHECK(!tasks_date_valid("1969-12-31"));
    CHECK(!tasks_date_valid(""));
    CHECK(!tasks_date_valid(NULL));
    CHECK(!tasks_date_valid("2025-04-01T"));

    CHECK_EQ_INT(tasks_date_shift("2025-03-01", -1, out), 0);
    CHECK_STR(out, "2025-02-28");
    CHECK_EQ_INT(tasks_date_shift("2024-03-01", -1, out), 0);
    CHECK_STR(out, "2024-02-29");
    CHECK_EQ_INT(tasks_date_shift("2025-01-01", -1, out), 0);
    CHECK_STR(out, "2024-12-31");
    CHECK_EQ_INT(tasks_date_shift("2024-12-31", 1, out), 0);
    CHECK_STR(out, "2025-01-01");
    CHECK_EQ_INT(tasks_date_shift("2025-01-31", 29, out), 0);
    CHECK_STR(out, "2025-03-01");
    CHECK_EQ_INT(tasks_date_shift("2025-06-15", 0, out), 0);
    CHECK_STR(out, "2025-06-15");
    CHECK_EQ_INT(tasks_date_shift("1970-01-01", -1, out), SETTLE_EINVAL);
    CHECK_EQ_INT(tasks_date_shift("nope", 1, out), SETTLE_EINVAL);
}

static void test_daily_period(void)
{
    char out[TASKS_DATE_LEN];

    /* Stock sync at 02:00: before it the period is still yesterday's. */
    CHECK_EQ_INT(tasks_daily_period(MAR1_2025 + 2 * HOUR - 1, 120, out), 0);
    CHECK_STR(out, "2025-02-28");
    CHECK_EQ_INT(tasks_daily_period(MAR1_2025 + 2 * HOUR, 120, out), 0);
    CHECK_STR(out, "2025-03-01");
    /* A worker started at 09:00 still has today's 00:00 statistics to run. */
    CHECK_EQ_INT(tasks_daily_period(MAR1_2025 + 9 * HOUR, 0, out), 0);
    CHECK_STR(out, "2025-03-01");
    CHECK_EQ_INT(tasks_daily_period(MAR1_2025, 0, out), 0);
    CHECK_STR(out, "2025-03-01");
    CHECK_EQ_INT(tasks_daily_period(MAR1_2025 - 1, 0, out), 0);
    CHECK_STR(out, "2025-02-28");
    /* 23:59 schedules. */
    CHECK_EQ_INT(tasks_daily_period(MAR1_2025 + 23 * HOUR + 58 * MINUTE, 23 * 60 + 59, out), 0);
    CHECK_STR(out, "2025-02-28");
    CHECK_EQ_INT(tasks_daily_period(MAR1_2025 + 23 * HOUR + 59 * MINUTE, 23 * 60 + 59, out), 0);
    CHECK_STR(out, "2025-03-01");
    CHECK_EQ_INT(tasks_daily_period(0, 0, out), 0);
    CHECK_STR(out, "1970-01-01");
    CHECK_EQ_INT(tasks_daily_period(MAR1_2025, 24 * 60, out), SETTLE_EINVAL);
    CHECK_EQ_INT(tasks_daily_period(-1, 0, out), SETTLE_EINVAL);
}

static void test_interval_due(void)
{
    struct tasks_last_run last = {0};
    struct tasks_due d;
    const uint64_t interval = 60000, stale = 600000;
    const int64_t t0 = MAR1_2025;

    /* No run yet: run 1 at once. */
    tasks_interval_due(&last, t0, interval, stale, &d);
    CHECK_EQ_INT(d.verdict, TASKS_DUE);
    CHECK_EQ_INT(d.next_seq, 1);

    /* Run 5 started at t0 and took 10 s: run 6 is due at t0 + interval, not before. */
    last = (struct tasks_last_run){.found = true, .seq = 5, .started_ms = t0, .heartbeat_ms = t0};
    tasks_interval_due(&last, t0 + 10000, interval, stale, &d);
    CHECK_EQ_INT(d.verdict, TASKS_NOT_DUE);
    CHECK_EQ_INT(d.due_in_ms, 50000);
    tasks_interval_due(&last, t0 + 59999, interval, stale, &d);
    CHECK_EQ_INT(d.verdict, TASKS_NOT_DUE);
    tasks_interval_due(&last, t0 + 60000, interval, stale, &d);
    CHECK_EQ_INT(d.verdict, TASKS_DUE);
    CHECK_EQ_INT(d.next_seq, 6);

    /* A run longer than the interval: the next one waits for it to finish (seed 004: max(run
     * time, interval) after the last start), then starts at once. */
    last.running = true;
    last.heartbeat_ms = t0 + 170000;
    tasks_interval_due(&last, t0 + 180000, interval, stale, &d);
    CHECK_EQ_INT(d.verdict, TASKS_NOT_DUE);
    last.running = false;
    tasks_interval_due(&last, t0 + 180000, interval, stale, &d);
    CHECK_EQ_INT(d.verdict, TASKS_DUE);
    CHECK_EQ_INT(d.next_seq, 6);

    /* A running run that stopped beating for the stale time: its worker died. */
    last.running = true;
    last.heartbeat_ms = t0;
    tasks_interval_due(&last, t0 + (int64_t)stale - 1, interval, stale, &d);
    CHECK_EQ_INT(d.verdict, TASKS_NOT_DUE);
    CHECK_EQ_INT(d.due_in_ms, 1);
    tasks_interval_due(&last, t0 + (int64_t)stale, interval, stale, &d);
    CHECK_EQ_INT(d.verdict, TASKS_TAKE_OVER);
    CHECK_EQ_INT(d.next_seq, 6);
}

static void test_daily_due(void)
{
    const int64_t now = MAR1_2025 + 3 * HOUR;
    const uint64_t retry = 60000, stale = 600000;
    struct tasks_daily_row r = {0};

    CHECK_EQ_INT(tasks_daily_due(&r, now, retry, stale, 5), TASKS_DUE);
    r = (struct tasks_daily_row){.found = true, .finished_ms = now - HOUR, .attempts = 1};
    CHECK_EQ_INT(tasks_daily_due(&r, now, retry, stale, 5), TASKS_NOT_DUE); /* done */
    r.failed = true;
    CHECK_EQ_INT(tasks_daily_due(&r, now, retry, stale, 5), TASKS_DUE); /* retry */
    r.finished_ms = now - 30000;
    CHECK_EQ_INT(tasks_daily_due(&r, now, retry, stale, 5), TASKS_NOT_DUE); /* too soon */
    r.finished_ms = now - 60000;
    CHECK_EQ_INT(tasks_daily_due(&r, now, retry, stale, 5), TASKS_DUE);
    r.attempts = 5;
    CHECK_EQ_INT(tasks_daily_due(&r, now, retry, stale, 5), TASKS_NOT_DUE); /* gave up */
    r = (struct tasks_daily_row){
        .found = true, .running = true, .heartbeat_ms = now - 1000, .attempts = 1};
    CHECK_EQ_INT(tasks_daily_due(&r, now, retry, stale, 5), TASKS_NOT_DUE);
    r.heartbeat_ms = now - (int64_t)stale;
    CHECK_EQ_INT(tasks_daily_due(&r, now, retry, stale, 5), TASKS_TAKE_OVER);
}

static struct gateway_payment pay(const char *key, const char *order, const char *user,
                                  enum gateway_tx_status st, int64_t amount, int64_t balance)
{
    struct gateway_payment p;
    memset(&p, 0, sizeof(p));
    snprintf(p.transaction_key, sizeof(p.transaction_key), "%s", key);
    snprintf(p.order_id, sizeof(p.order_id), "%s", order);
    snprintf(p.user_id, sizeof(p.user_id), "%s", user);
    p.status = st;
    p.amount_minor = amount;
    p.created_ms = -1;
    p.cancelled_minor = -1;
    p.balance_minor = balance;
    return p;
}

static struct store_order_match order(const char *id, const char *user, const char *status,
                                      int64_t amount, const char *pkey, const char *pstatus,
                                      bool refund_open)
{
    struct store_order_match o;
    memset(&o, 0, sizeof(o));
    snprintf(o.id, sizeof(o.id), "%s", id);
    snprintf(o.user_id, sizeof(o.user_id), "%s", user);
    snprintf(o.status, sizeof(o.status), "%s", status);
    o.amount_minor = amount;
    snprintf(o.payment_key, sizeof(o.payment_key), "%s", pkey);
    snprintf(o.payment_status, sizeof(o.payment_status), "%s", pstatus);
    o.refund_open = refund_open;
    return o;
}

static void test_orphan_decide(void)
{
    struct gateway_payment ok = pay("k1", "o1", "u1", GATEWAY_TX_SUCCESS, 5000, -1);
    struct store_order_match o;

    /* Nothing captured: never an orphan. */
    struct gateway_payment failed = pay("k1", "o1", "u1", GATEWAY_TX_FAILED, 5000, -1);
    struct gateway_payment pending = pay("k1", "o1", "u1", GATEWAY_TX_PENDING, 5000, -1);
    struct gateway_payment cancelled = pay("k1", "o1", "u1", GATEWAY_TX_CANCELLED, 5000, 0);
    struct gateway_payment part_empty =
        pay("k1", "o1", "u1", GATEWAY_TX_PARTIALLY_CANCELLED, 5000, 0);
    struct gateway_payment part_left =
        pay("k1", "o1", "u1", GATEWAY_TX_PARTIALLY_CANCELLED, 5000, 2000);
    CHECK_EQ_INT(tasks_orphan_decide(&failed, NULL), ORPHAN_NOT_CAPTURED);
    CHECK_EQ_INT(tasks_orphan_decide(&pending, NULL), ORPHAN_NOT_CAPTURED);
    CHECK_EQ_INT(tasks_orphan_decide(&cancelled, NULL), ORPHAN_NOT_CAPTURED);
    CHECK_EQ_INT(tasks_orphan_decide(&part_empty, NULL), ORPHAN_NOT_CAPTURED);
    CHECK_EQ_INT(tasks_orphan_decide(&part_left, NULL), ORPHAN_NO_ORDER);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, NULL), ORPHAN_NO_ORDER);

    /* Matched: a paid order of this payment and amount. */
    o = order("o1", "u1", "COMPLETED", 5000, "k1", "SUCCESS", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_MATCHED);
    o = order("o1", "u1", "PARTIALLY_REFUNDED", 5000, "k1", "PARTIALLY_REFUNDED", false);
    CHECK_EQ_INT(tasks_orphan_decide(&part_left, &o), ORPHAN_MATCHED);
    o = order("o1", "u1", "REFUNDED", 5000, "k1", "REFUNDED", false);
    CHECK_EQ_INT(tasks_orphan_decide(&part_left, &o), ORPHAN_MATCHED);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_REFUND_CONFLICT);

    /* Dead orders charged anyway: refunded. */
    o = order("o1", "u1", "EXPIRED", 5000, "", "", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_REFUND);
    o = order("o1", "u1", "FAILED", 5000, "k1", "FAILED", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_REFUND);
    o = order("o1", "u1", "FAILED", 5000, "k1", "SUCCESS", false); /* out_of_stock path */
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_REFUND);
    o.refund_open = true;
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_REFUND_IN_PROGRESS);
    o = order("o1", "u1", "EXPIRED", 5000, "k1", "REFUNDED", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_REFUND_CONFLICT);

    /* A PENDING order is reconciled, never refunded. */
    o = order("o1", "u1", "PENDING", 5000, "", "", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_RECONCILE);
    o = order("o1", "u1", "MANUAL_REVIEW", 5000, "k1", "PENDING", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_MANUAL_REVIEW);

    /* Anything that does not line up goes to a person. */
    o = order("o1", "u2", "EXPIRED", 5000, "", "", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_USER_MISMATCH);
    struct gateway_payment anon = pay("k1", "o1", "", GATEWAY_TX_SUCCESS, 5000, -1);
    CHECK_EQ_INT(tasks_orphan_decide(&anon, &o), ORPHAN_REFUND); /* no user to compare */
    o = order("o1", "u1", "COMPLETED", 4000, "k1", "SUCCESS", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_AMOUNT_MISMATCH);
    o = order("o1", "u1", "COMPLETED", 5000, "k0", "SUCCESS", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_DUPLICATE_CHARGE);
    o = order("o1", "u1", "EXPIRED", 5000, "k0", "FAILED", false);
    CHECK_EQ_INT(tasks_orphan_decide(&ok, &o), ORPHAN_DUPLICATE_CHARGE);

    CHECK_STR(tasks_orphan_verdict_name(ORPHAN_MATCHED), "matched");
    CHECK_STR(tasks_orphan_verdict_name(ORPHAN_NO_ORDER), "no_order");
    CHECK_STR(tasks_orphan_verdict_name((enum tasks_orphan_verdict)99), "invalid");
}

#define PAGE_HEAD "{\"meta\":{\"result\":\"SUCCESS\"},\"data\":"

static int parse(const char *body, struct gateway_page *pg, char *why)
{
    return gateway_parse_payment_page(body, strlen(body), pg, why, 256);
}

static void test_parse_page(void)
{
    struct gateway_page pg;
    char why[256];

    const char *good =
        PAGE_HEAD "{\"page\":1,\"size\":2,\"totalPages\":3,\"totalElements\":5,\"payments\":["
                  "{\"transactionKey\":\"20250301:TR:a1\",\"orderId\":\"o-1\",\"userId\":\"u1\","
                  "\"status\":\"SUCCESS\",\"amount\":5000,\"createdAt\":1740787200000,"
                  "\"cancelledAmount\":0,\"balanceAmount\":5000,\"reason\":null},"
                  "{\"transactionKey\":\"20250301:TR:a2\",\"orderId\":\"o-2\","
                  "\"status\":\"PARTIALLY_CANCELLED\",\"amount\":7000,"
                  "\"cancelledAmount\":2000,\"balanceAmount\":5000}]}}";
    CHECK_EQ_INT(parse(good, &pg, why), 0);
    CHECK_EQ_INT(pg.page, 1);
    CHECK_EQ_INT(pg.size, 2);
    CHECK_EQ_INT(pg.total_pages, 3);
    CHECK_EQ_INT(pg.total_elements, 5);
    CHECK_EQ_INT(pg.n, 2);
    if (pg.n == 2) {
        CHECK_STR(pg.items[0].transaction_key, "20250301:TR:a1");
        CHECK_STR(pg.items[0].order_id, "o-1");
        CHECK_STR(pg.items[0].user_id, "u1");
        CHECK_EQ_INT(pg.items[0].status, GATEWAY_TX_SUCCESS);
        CHECK_EQ_INT(pg.items[0].amount_minor, 5000);
        CHECK_EQ_INT(pg.items[0].created_ms, 1740787200000LL);
        CHECK_STR(pg.items[1].user_id, ""); /* optional */
        CHECK_EQ_INT(pg.items[1].status, GATEWAY_TX_PARTIALLY_CANCELLED);
        CHECK_EQ_INT(pg.items[1].created_ms, -1);
        CHECK_EQ_INT(pg.items[1].cancelled_minor, 2000);
        CHECK_EQ_INT(pg.items[1].balance_minor, 5000);
    }
    gateway_page_free(&pg);
    CHECK(pg.items == NULL && pg.n == 0);
    gateway_page_free(&pg); /* twice is fine */
    gateway_page_free(NULL);

    /* An empty window: no pages at all. */
    CHECK_EQ_INT(parse(PAGE_HEAD "{\"page\":0,\"size\":100,\"totalPages\":0,\"totalElements\":0,"
                                 "\"payments\":[]}}",
                       &pg, why),
                 0);
    CHECK_EQ_INT(pg.n, 0);
    CHECK(pg.items == NULL);

    /* meta.result FAIL carries the PG's message. */
    CHECK_EQ_INT(parse("{\"meta\":{\"result\":\"FAIL\",\"message\":\"bad window\"},\"data\":null}",
                       &pg, why),
                 SETTLE_EREJECTED);
    CHECK_CONTAINS(why, "bad window");

    struct {
        const char *body;
        const char *why;
    } bad[] = {
        {"not json", "invalid JSON"},
        {PAGE_HEAD "[]}", "data must be an object"},
        {PAGE_HEAD "{\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":[]}}", "page"},
        {PAGE_HEAD "{\"page\":0,\"size\":0,\"totalPages\":0,\"totalElements\":0,\"payments\":[]}}",
         "size"},
        {PAGE_HEAD "{\"page\":-1,\"size\":2,\"totalPages\":0,\"totalElements\":0,\"payments\":[]}}",
         "page"},
        {PAGE_HEAD
         "{\"page\":0,\"size\":5000,\"totalPages\":0,\"totalElements\":0,\"payments\":[]}}",
         "over"},
        {PAGE_HEAD "{\"page\":0,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":{}}}",
         "payments"},
        {PAGE_HEAD
         "{\"page\":0,\"size\":1,\"totalPages\":1,\"totalElements\":2,\"payments\":["
         "{\"transactionKey\":\"k1\",\"orderId\":\"o\",\"status\":\"SUCCESS\",\"amount\":1},"
         "{\"transactionKey\":\"k2\",\"orderId\":\"o\",\"status\":\"SUCCESS\","
         "\"amount\":1}]}}",
         "over its size"},
        {PAGE_HEAD "{\"page\":1,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":["
                   "{\"transactionKey\":\"k1\",\"orderId\":\"o\",\"status\":\"SUCCESS\","
                   "\"amount\":1}]}}",
         "totalPages"},
        {PAGE_HEAD "{\"page\":0,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":["
                   "{\"orderId\":\"o\",\"status\":\"SUCCESS\",\"amount\":1}]}}",
         "transactionKey"},
        {PAGE_HEAD "{\"page\":0,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":["
                   "{\"transactionKey\":\"k1\",\"status\":\"SUCCESS\",\"amount\":1}]}}",
         "orderId"},
        {PAGE_HEAD
         "{\"page\":0,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":["
         "{\"transactionKey\":\"k1\",\"orderId\":\"o\",\"status\":\"DONE\",\"amount\":1}]}}",
         "unknown status"},
        {PAGE_HEAD "{\"page\":0,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":["
                   "{\"transactionKey\":\"k1\",\"orderId\":\"o\",\"status\":\"SUCCESS\","
                   "\"amount\":0}]}}",
         "amount"},
        {PAGE_HEAD "{\"page\":0,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":["
                   "{\"transactionKey\":\"k1\",\"orderId\":\"o\",\"status\":\"SUCCESS\","
                   "\"amount\":\"5\"}]}}",
         "integer"},
        {PAGE_HEAD "{\"page\":0,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":["
                   "{\"transactionKey\":\"k\\u0001\",\"orderId\":\"o\",\"status\":\"SUCCESS\","
                   "\"amount\":5}]}}",
         "control"},
        {PAGE_HEAD "{\"page\":0,\"page\":1,\"size\":2,\"totalPages\":1,\"totalElements\":0,"
                   "\"payments\":[]}}",
         "invalid JSON"},
        {PAGE_HEAD "{\"page\":0,\"size\":2,\"totalPages\":1,\"totalElements\":1,\"payments\":[7]}}",
         "must be an object"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        memset(&pg, 0xAB, sizeof(pg));
        int rc = parse(bad[i].body, &pg, why);
        CHECK_EQ_INT(rc, SETTLE_EPARSE);
        CHECK_CONTAINS(why, bad[i].why);
        CHECK(pg.items == NULL && pg.n == 0); /* zeroed on error */
    }
}

int main(void)
{
    RUN(test_names);
    RUN(test_dates);
    RUN(test_daily_period);
    RUN(test_interval_due);
    RUN(test_daily_due);
    RUN(test_orphan_decide);
    RUN(test_parse_page);
    return unit_finish();
}
