/*
 * reconcile.c - pure policy of a reconcile job (see reconcile.h for the rules).
 * Thread: any; no state.
 */
#include "settle/reconcile.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "settle/error.h"

const char *reconcile_verdict_name(enum reconcile_verdict v)
{
    switch (v) {
    case RECONCILE_QUERY:
        return "query";
    case RECONCILE_SKIP:
        return "skip";
    case RECONCILE_COMPLETE:
        return "complete";
    case RECONCILE_FAIL:
        return "fail";
    case RECONCILE_EXPIRE:
        return "expire";
    case RECONCILE_MANUAL_REVIEW:
        return "manual_review";
    case RECONCILE_RECHECK:
        return "recheck";
    case RECONCILE_RETRY:
        return "retry";
    case RECONCILE_WAIT:
        return "wait";
    case RECONCILE_DEAD:
        return "dead";
    default:
        abort();
    }
}

static void decide(struct reconcile_decision *d, enum reconcile_verdict v, const char *reason,
                   uint64_t delay_ms)
{
    d->attempt_failed = false;
    d->verdict = v;
    d->reason = reason;
    d->delay_ms = delay_ms;
}

static void dead(struct reconcile_decision *d, const char *reason)
{
    decide(d, RECONCILE_DEAD, reason, 0);
}

static int past_deadline(const struct reconcile_policy *p, const struct reconcile_progress *pr)
{
    return p->retry_deadline_ms > 0 && pr->age_ms >= p->retry_deadline_ms;
}

void reconcile_transient(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                         const char *reason, uint64_t retry_after_ms, const char *detail,
                         struct reconcile_decision *d)
{
    /* attempts counts the tries already failed before this one; this one failed too. */
    unsigned failed = pr->attempts + 1;
    snprintf(d->detail, sizeof(d->detail), "%s", detail != NULL ? detail : "");
    if (failed >= p->retry_max_attempts) {
        dead(d, reason);
        d->attempt_failed = true;
        size_t used = strlen(d->detail);
        snprintf(d->detail + used, sizeof(d->detail) - used, "%s(gave up after %u attempts)",
                 used > 0 ? " " : "", failed);
        return;
    }
    if (past_deadline(p, pr)) {
        dead(d, reason);
        d->attempt_failed = true;
        size_t used = strlen(d->detail);
        snprintf(d->detail + used, sizeof(d->detail) - used,
                 "%s(gave up: job older than the retry deadline of %llu ms)", used > 0 ? " " : "",
                 (unsigned long long)p->retry_deadline_ms);
        return;
    }
    decide(d, RECONCILE_RETRY, reason,
           retry_delay_ms(failed, p->retry_base_ms, p->retry_cap_ms, retry_after_ms,
                          p->retry_after_max_ms, pr->rand64));
    d->attempt_failed = true;
}

void reconcile_outage(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                      const char *reason, const char *detail, struct reconcile_decision *d)
{
    if (past_deadline(p, pr)) {
        dead(d, reason);
        snprintf(d->detail, sizeof(d->detail), "%s (gave up: job older than the retry deadline)",
                 detail != NULL ? detail : reason);
        return;
    }
    /* Full jitter over the cap: a dependency outage is not this job's fault, so it costs no
     * attempt, and the jobs that wait for it spread out instead of returning together. */
    decide(d, RECONCILE_WAIT, reason,
           retry_delay_ms(p->retry_max_attempts, p->retry_base_ms, p->retry_cap_ms, 0,
                          p->retry_after_max_ms, pr->rand64));
    snprintf(d->detail, sizeof(d->detail), "%s", detail != NULL ? detail : reason);
}

void reconcile_breaker_open(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                            uint64_t retry_in_ms, struct reconcile_decision *d)
{
    if (past_deadline(p, pr)) {
        dead(d, "gateway_unavailable");
        snprintf(d->detail, sizeof(d->detail),
                 "circuit breaker open and job older than the retry deadline of %llu ms",
                 (unsigned long long)p->retry_deadline_ms);
        return;
    }
    /* Spread the waiting jobs over a tenth of the open period so they do not all arrive at
     * the half-open breaker in the same millisecond. */
    uint64_t spread = retry_in_ms / 10 + 1;
    decide(d, RECONCILE_WAIT, "breaker_open", retry_in_ms + pr->rand64 % spread);
    snprintf(d->detail, sizeof(d->detail), "circuit breaker open; next try in %llu ms",
             (unsigned long long)d->delay_ms);
}

void reconcile_after_load(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                          const struct job *job, int load_status, const char *load_err,
                          const struct store_order *order, struct reconcile_decision *d)
{
    d->detail[0] = '\0';
    switch (load_status) {
    case 0:
        break;
    case SETTLE_ENOTFOUND:
        dead(d, "order_not_found");
        snprintf(d->detail, sizeof(d->detail), "no order with this id in PostgreSQL");
        return;
    case SETTLE_EUNAVAILABLE:
    case SETTLE_EIO:
    case SETTLE_ETIMEDOUT:
        reconcile_outage(p, pr, "store_unavailable", load_err, d);
        return;
    default:
        dead(d, "store_rejected");
        snprintf(d->detail, sizeof(d->detail), "loading the order failed: %s",
                 load_err != NULL && load_err[0] != '\0' ? load_err : settle_strerror(load_status));
        return;
    }
    if (strcmp(order->user_id, job->user_id) != 0) {
        dead(d, "order_mismatch");
        snprintf(d->detail, sizeof(d->detail), "job user_id does not own this order");
        return;
    }
    if (job->transaction_key[0] != '\0' && order->transaction_key[0] != '\0' &&
        strcmp(job->transaction_key, order->transaction_key) != 0) {
        dead(d, "order_mismatch");
        snprintf(d->detail, sizeof(d->detail),
                 "job transaction_key differs from the order's payment");
        return;
    }
    if (strcmp(order->status, "PENDING") != 0) {
        decide(d, RECONCILE_SKIP, NULL, 0);
        snprintf(d->detail, sizeof(d->detail), "order is already %s", order->status);
        return;
    }
    decide(d, RECONCILE_QUERY, NULL, 0);
}

static void recheck(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                    struct reconcile_decision *d, const char *why)
{
    decide(d, RECONCILE_RECHECK, NULL, retry_schedule_delay_ms(&p->check_schedule, pr->checks));
    snprintf(d->detail, sizeof(d->detail), "%s; check %u again in %llu ms", why, pr->checks + 1,
             (unsigned long long)d->delay_ms);
}

void reconcile_after_query(const struct reconcile_policy *p, const struct reconcile_progress *pr,
                           const struct job *job, const struct store_order *order,
                           const struct gateway_result *g, struct reconcile_decision *d)
{
    d->detail[0] = '\0';
    switch (g->outcome) {
    case GATEWAY_OK:
        break;
    case GATEWAY_NOT_FOUND:
        if (order->age_ms >= p->payment_window_ms) {
            decide(d, RECONCILE_EXPIRE, "payment_window_passed", 0);
            snprintf(d->detail, sizeof(d->detail),
                     "PG has no payment %llu ms after the order (window %llu ms)",
                     (unsigned long long)order->age_ms, (unsigned long long)p->payment_window_ms);
            return;
        }
        recheck(p, pr, d, "PG has no payment yet");
        return;
    case GATEWAY_TRANSIENT:
        reconcile_transient(p, pr, "gateway_unavailable", g->retry_after_ms, g->error, d);
        return;
    case GATEWAY_BAD_RESPONSE:
        reconcile_transient(p, pr, "gateway_bad_response", 0, g->error, d);
        return;
    case GATEWAY_REJECTED:
        dead(d, "gateway_rejected");
        snprintf(d->detail, sizeof(d->detail), "PG rejected the query (HTTP %ld): %.180s",
                 g->http_status, g->error);
        return;
    default:
        abort();
    }

    /* A well-formed answer: it must be about this order and this amount, or it could be a
     * forged or misrouted answer, and money must not move on it. */
    if (strcmp(g->tx.order_id, order->id) != 0) {
        dead(d, "gateway_mismatch");
        snprintf(d->detail, sizeof(d->detail), "PG answer names another order (%.64s)",
                 g->tx.order_id);
        return;
    }
    if (g->tx.amount_minor != order->amount_minor) {
        dead(d, "gateway_mismatch");
        snprintf(d->detail, sizeof(d->detail), "PG amount %lld differs from the order's %lld",
                 (long long)g->tx.amount_minor, (long long)order->amount_minor);
        return;
    }
    if (job->transaction_key[0] != '\0' &&
        strcmp(g->tx.transaction_key, job->transaction_key) != 0) {
        dead(d, "gateway_mismatch");
        snprintf(d->detail, sizeof(d->detail), "PG answer names another transaction");
        return;
    }

    switch (g->tx.status) {
    case GATEWAY_TX_SUCCESS:
        decide(d, RECONCILE_COMPLETE, NULL, 0);
        snprintf(d->detail, sizeof(d->detail), "PG reports SUCCESS");
        return;
    case GATEWAY_TX_FAILED:
        decide(d, RECONCILE_FAIL, "payment_failed", 0);
        snprintf(d->detail, sizeof(d->detail), "PG reports FAILED: %.200s",
                 g->tx.reason[0] != '\0' ? g->tx.reason : "no reason given");
        return;
    case GATEWAY_TX_PENDING:
        if (order->age_ms >= p->pending_max_age_ms) {
            decide(d, RECONCILE_MANUAL_REVIEW, "pending_too_long", 0);
            snprintf(d->detail, sizeof(d->detail),
                     "PG still reports PENDING %llu ms after the order",
                     (unsigned long long)order->age_ms);
            return;
        }
        recheck(p, pr, d, "PG reports PENDING");
        return;
    case GATEWAY_TX_CANCELLED:
    case GATEWAY_TX_PARTIALLY_CANCELLED:
        decide(d, RECONCILE_MANUAL_REVIEW, "payment_cancelled_at_pg", 0);
        snprintf(d->detail, sizeof(d->detail),
                 "PG reports the payment cancelled while the order is still PENDING");
        return;
    case GATEWAY_TX_UNKNOWN:
        reconcile_transient(p, pr, "gateway_bad_response", 0, "PG status unknown", d);
        return;
    default:
        abort();
    }
}
