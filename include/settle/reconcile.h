/*
 * reconcile.h - pure policy of a reconcile job: given what PostgreSQL knows about the order
 * and what the PG answered, decide what happens next. No I/O, no clock, no allocation; the
 * worker carries the decision out. Thread: any.
 *
 * Rules (seeds 000, 001, 003 and issue 2):
 *   order not PENDING                 -> skip (a callback handler or another job got there)
 *   job and order disagree            -> dead "order_mismatch" (forged or stale job)
 *   PG SUCCESS, same order and amount -> complete (commit stock, order COMPLETED)
 *   PG FAILED                         -> fail (release stock, order FAILED with PG's reason)
 *   PG answer for another order/amount-> dead "gateway_mismatch" (never completes an order)
 *   PG PENDING                        -> re-check on the schedule; past pending_max_age:
 *                                        manual review
 *   PG 404                            -> re-check; past the payment window: expire
 *   PG CANCELLED for a PENDING order  -> manual review (money moved in a way we did not expect)
 *   PostgreSQL unreachable            -> wait (no attempt spent) until the retry deadline
 *   transport error, timeout, 5xx, 429-> retry with backoff; exhausted: dead
 *                                        "gateway_unavailable"
 *   other 4xx                         -> dead "gateway_rejected"
 *   malformed PG answer               -> retry; exhausted: dead "gateway_bad_response"
 * A job older than retry_deadline_ms stops retrying and waiting (dead), so nothing waits
 * forever behind an open breaker.
 */
#ifndef SETTLE_RECONCILE_H
#define SETTLE_RECONCILE_H

#include <stdbool.h>
#include <stdint.h>

#include "settle/gateway.h"
#include "settle/job.h"
#include "settle/retry.h"
#include "settle/store.h"

enum reconcile_verdict {
    RECONCILE_QUERY = 0,         /* ask the PG (after loading the order) */
    RECONCILE_SKIP = 1,          /* done, nothing to change */
    RECONCILE_COMPLETE = 2,      /* commit stock, order COMPLETED, payment SUCCESS */
    RECONCILE_FAIL = 3,          /* release stock, order FAILED, payment FAILED */
    RECONCILE_EXPIRE = 4,        /* release stock, order EXPIRED */
    RECONCILE_MANUAL_REVIEW = 5, /* order MANUAL_REVIEW, stock untouched */
    RECONCILE_RECHECK = 6,       /* ask again after delay_ms; no attempt consumed */
    RECONCILE_RETRY = 7,         /* transient failure: again after delay_ms, attempt consumed */
    RECONCILE_WAIT = 8,          /* breaker open: again after delay_ms, no attempt consumed */
    RECONCILE_DEAD = 9,          /* dead-letter with reason */
};

struct reconcile_policy {
    uint64_t retry_base_ms;
    uint64_t retry_cap_ms;
    unsigned retry_max_attempts; /* total tries, the first included */
    uint64_t retry_after_max_ms;
    uint64_t retry_deadline_ms;
    struct retry_schedule check_schedule;
    uint64_t payment_window_ms;
    uint64_t pending_max_age_ms;
};

/* Where a job stands in its life, as the queue reports it. */
struct reconcile_progress {
    unsigned attempts; /* failure attempts consumed so far */
    unsigned checks;   /* re-checks so far */
    uint64_t age_ms;   /* since settle first saw the job */
    uint64_t rand64;   /* randomness for jitter */
};

struct reconcile_decision {
    enum reconcile_verdict verdict;
    const char *reason;             /* DLQ reason code, or the order's failure reason; static */
    uint64_t delay_ms;              /* RECHECK, RETRY, WAIT */
    bool attempt_failed;            /* this try failed transiently (it counts as an attempt) */
    char detail[GATEWAY_ERROR_MAX]; /* one sentence for logs, job_log and the DLQ */
};

const char *reconcile_verdict_name(enum reconcile_verdict v);

/* After loading the order: load_status is store_load_order_work's result. */
void reconcile_after_load(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                          const struct job *job, int load_status, const char *load_err,
                          const struct store_order *order, struct reconcile_decision *d);

/* After the PG answered (order is the one loaded, still PENDING then). */
void reconcile_after_query(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                           const struct job *job, const struct store_order *order,
                           const struct gateway_result *g, struct reconcile_decision *d);

/*
 * A transient failure (reason names it for the DLQ if attempts are exhausted): RETRY with
 * full-jitter backoff (honouring retry_after_ms), or DEAD when this was the last attempt or
 * the job is past its retry deadline.
 */
void reconcile_transient(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                         const char *reason, uint64_t retry_after_ms, const char *detail,
                         struct reconcile_decision *d);

/* A dependency of ours (PostgreSQL, Redis) is unreachable: WAIT a jittered backoff without
 * spending an attempt, or DEAD past the retry deadline. */
void reconcile_outage(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                      const char *reason, const char *detail, struct reconcile_decision *d);

/* The breaker refused a call: WAIT retry_in_ms (plus up to 10% jitter), or DEAD past the
 * retry deadline. */
void reconcile_breaker_open(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                            uint64_t retry_in_ms, struct reconcile_decision *d);

#endif
