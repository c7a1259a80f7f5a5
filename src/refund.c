/*
 * refund.c - pure policy of a refund job (see refund.h for the states and rules).
 * Thread: any; no state.
 */
#include "settle/refund.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "settle/error.h"
#include "settle/retry.h"

static const char *const state_names[REFUND_STATE_COUNT] = {
    "REQUESTED", "SUCCEEDED", "FAILED", "UNKNOWN", "MANUAL_REVIEW",
};

/* allowed[from][to]: the only moves of a refund row. */
static const bool allowed[REFUND_STATE_COUNT][REFUND_STATE_COUNT] = {
    [REFUND_REQUESTED] = {[REFUND_SUCCEEDED] = 1,
                          [REFUND_FAILED] = 1,
                          [REFUND_UNKNOWN] = 1,
                          [REFUND_MANUAL_REVIEW] = 1},
    [REFUND_UNKNOWN] = {[REFUND_SUCCEEDED] = 1, [REFUND_FAILED] = 1, [REFUND_MANUAL_REVIEW] = 1},
    [REFUND_MANUAL_REVIEW] = {[REFUND_SUCCEEDED] = 1, [REFUND_FAILED] = 1},
    [REFUND_SUCCEEDED] = {0},
    [REFUND_FAILED] = {0},
};

/* The same table as PostgreSQL array literals, by target state. Kept next to the table; the
 * unit tests check that the two agree. */
static const char *const sources_literal[REFUND_STATE_COUNT] = {
    [REFUND_REQUESTED] = "{}",
    [REFUND_SUCCEEDED] = "{REQUESTED,UNKNOWN,MANUAL_REVIEW}",
    [REFUND_FAILED] = "{REQUESTED,UNKNOWN,MANUAL_REVIEW}",
    [REFUND_UNKNOWN] = "{REQUESTED}",
    [REFUND_MANUAL_REVIEW] = "{REQUESTED,UNKNOWN}",
};

const char *refund_state_name(enum refund_state s)
{
    if ((unsigned)s >= REFUND_STATE_COUNT)
        return NULL;
    return state_names[s];
}

int refund_state_parse(const char *name, enum refund_state *out)
{
    if (name == NULL)
        return SETTLE_EINVAL;
    for (int i = 0; i < REFUND_STATE_COUNT; i++) {
        if (strcmp(name, state_names[i]) == 0) {
            *out = (enum refund_state)i;
            return 0;
        }
    }
    return SETTLE_EINVAL;
}

bool refund_transition_ok(enum refund_state from, enum refund_state to)
{
    if ((unsigned)from >= REFUND_STATE_COUNT || (unsigned)to >= REFUND_STATE_COUNT)
        return false;
    return allowed[from][to];
}

const char *refund_sources_literal(enum refund_state to)
{
    if ((unsigned)to >= REFUND_STATE_COUNT)
        return "{}";
    return sources_literal[to];
}

bool refund_state_is_live(enum refund_state s)
{
    return (unsigned)s < REFUND_STATE_COUNT && s != REFUND_FAILED;
}

/* --- Identity ------------------------------------------------------------------------------ */

/* 128-bit FNV-1a as four 32-bit limbs, most significant first, so the arithmetic is plain
 * C11 without a 128-bit integer type. */
struct u128 {
    uint32_t w[4];
};

/* h = h * FNV_prime mod 2^128, where FNV_prime = 2^88 + 0x13B. */
static void fnv_mul(struct u128 *h)
{
    uint32_t r[4] = {0, 0, 0, 0};
    uint64_t carry = 0;
    /* h * 0x13B, limb by limb from the least significant. */
    for (int i = 3; i >= 0; i--) {
        uint64_t v = (uint64_t)h->w[i] * 0x13Bu + carry;
        r[i] = (uint32_t)v;
        carry = v >> 32;
    }
    /* + h << 88: 88 = 2 limbs + 24 bits; only what lands below 2^128 matters. Limb 3 of h
     * (least significant) shifted by 88 bits reaches limbs 1 and 0. */
    uint32_t s[4] = {0, 0, 0, 0};
    s[1] = h->w[3] << 24;
    s[0] = (h->w[3] >> 8) | (h->w[2] << 24);
    carry = 0;
    for (int i = 3; i >= 0; i--) {
        uint64_t v = (uint64_t)r[i] + s[i] + carry;
        h->w[i] = (uint32_t)v;
        carry = v >> 32;
    }
}

static void fnv_feed(struct u128 *h, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    for (size_t i = 0; i < len; i++) {
        h->w[3] ^= p[i];
        fnv_mul(h);
    }
}

static void fnv_init(struct u128 *h)
{
    h->w[0] = 0x6c62272eu;
    h->w[1] = 0x07bb0142u;
    h->w[2] = 0x62b82175u;
    h->w[3] = 0x6295c58du;
}

static void fnv_hex(const struct u128 *h, char *out, size_t out_len)
{
    snprintf(out, out_len, "%08" PRIx32 "%08" PRIx32 "%08" PRIx32 "%08" PRIx32, h->w[0], h->w[1],
             h->w[2], h->w[3]);
}

void refund_fnv1a128_hex(const void *buf, size_t len, char *out, size_t out_len)
{
    struct u128 h;
    fnv_init(&h);
    fnv_feed(&h, buf, len);
    fnv_hex(&h, out, out_len);
}

/* Feeds "<length>:<bytes>|" so that no choice of field contents can make two different field
 * lists produce the same input. */
static void fnv_field(struct u128 *h, const char *s)
{
    char len[24];
    int n = snprintf(len, sizeof(len), "%zu:", strlen(s));
    fnv_feed(h, len, (size_t)n);
    fnv_feed(h, s, strlen(s));
    fnv_feed(h, "|", 1);
}

void refund_identity(const struct job *job, char *out, size_t out_len)
{
    if (job->id[0] != '\0') {
        snprintf(out, out_len, "%s", job->id);
        return;
    }
    char amount[24];
    char hex[33];
    struct u128 h;
    if (job->has_amount)
        snprintf(amount, sizeof(amount), "%" PRId64, job->amount_minor);
    else
        snprintf(amount, sizeof(amount), "full");
    fnv_init(&h);
    fnv_field(&h, job->order_id);
    fnv_field(&h, job->transaction_key);
    fnv_field(&h, amount);
    fnv_field(&h, job->reason);
    fnv_field(&h, job->restock ? "1" : "0");
    fnv_hex(&h, hex, sizeof(hex));
    snprintf(out, out_len, "rf:%s", hex);
}

/* --- Admission ----------------------------------------------------------------------------- */

const char *refund_admission_name(enum refund_admission a)
{
    switch (a) {
    case REFUND_ADMIT_OK:
        return "ok";
    case REFUND_ADMIT_ORDER_NOT_FOUND:
        return "order_not_found";
    case REFUND_ADMIT_NOT_SETTLED:
        return "payment_not_settled";
    case REFUND_ADMIT_NOT_REFUNDABLE:
        return "payment_not_refundable";
    case REFUND_ADMIT_MISMATCH:
        return "order_mismatch";
    case REFUND_ADMIT_EXCEEDS:
        return "exceeds_balance";
    case REFUND_ADMIT_ID_REUSED:
        return "refund_id_reused";
    default:
        return "invalid";
    }
}

static enum refund_admission say(enum refund_admission a, char *why, size_t why_len,
                                 const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static enum refund_admission say(enum refund_admission a, char *why, size_t why_len,
                                 const char *fmt, ...)
{
    if (why != NULL && why_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, why_len, fmt, ap);
        va_end(ap);
    }
    return a;
}

enum refund_admission refund_admit(const struct job *job, const struct refund_payment_view *p,
                                   int64_t *amount_minor, char *why, size_t why_len)
{
    if (why != NULL && why_len > 0)
        why[0] = '\0';
    if (!p->order_found)
        return say(REFUND_ADMIT_ORDER_NOT_FOUND, why, why_len, "no order with this id");
    if (strcmp(p->order_user_id, job->user_id) != 0)
        return say(REFUND_ADMIT_MISMATCH, why, why_len, "job user_id does not own this order");
    if (!p->payment_found)
        return say(REFUND_ADMIT_NOT_SETTLED, why, why_len, "the order has no payment yet");
    /* A forged or stale job must not move money: it has to name the payment exactly. */
    if (strcmp(p->user_id, job->user_id) != 0 ||
        strcmp(p->transaction_key, job->transaction_key) != 0)
        return say(REFUND_ADMIT_MISMATCH, why, why_len,
                   "job user_id or transaction_key differs from the order's payment");
    if (strcmp(p->status, "PENDING") == 0)
        /* The reconcile job that enqueued an out-of-stock refund records the payment right
         * after enqueueing it; a moment later the payment is SUCCESS. */
        return say(REFUND_ADMIT_NOT_SETTLED, why, why_len, "the payment is still PENDING");
    if (strcmp(p->status, "SUCCESS") != 0 && strcmp(p->status, "PARTIALLY_REFUNDED") != 0)
        return say(REFUND_ADMIT_NOT_REFUNDABLE, why, why_len, "payment is %.24s, not refundable",
                   p->status);
    int64_t left = p->amount_minor - p->live_others_minor;
    int64_t amount = job->has_amount ? job->amount_minor : left;
    if (amount <= 0 || amount > left)
        return say(REFUND_ADMIT_EXCEEDS, why, why_len,
                   "refund of %" PRId64 " exceeds the balance: payment %" PRId64
                   ", other refunds %" PRId64,
                   job->has_amount ? job->amount_minor : left, p->amount_minor,
                   p->live_others_minor);
    *amount_minor = amount;
    return REFUND_ADMIT_OK;
}

enum refund_admission refund_match_existing(const struct job *job, const struct refund_row *row,
                                            char *why, size_t why_len)
{
    if (why != NULL && why_len > 0)
        why[0] = '\0';
    if (strcmp(row->order_id, job->order_id) != 0)
        return say(REFUND_ADMIT_ID_REUSED, why, why_len,
                   "refund id %.64s already names a refund of another order", row->id);
    if (strcmp(row->user_id, job->user_id) != 0 ||
        strcmp(row->transaction_key, job->transaction_key) != 0)
        return say(REFUND_ADMIT_MISMATCH, why, why_len,
                   "job user_id or transaction_key differs from refund %.64s", row->id);
    if ((job->has_amount && row->amount_minor != job->amount_minor) || row->restock != job->restock)
        return say(REFUND_ADMIT_ID_REUSED, why, why_len,
                   "refund id %.64s already names a refund of another amount or restock flag",
                   row->id);
    return REFUND_ADMIT_OK;
}

const char *refund_payment_status(int64_t amount_minor, int64_t refunded_minor)
{
    return refunded_minor >= amount_minor ? "REFUNDED" : "PARTIALLY_REFUNDED";
}

const char *refund_order_status(const char *status, int64_t amount_minor, int64_t refunded_minor)
{
    if (strcmp(status, "COMPLETED") == 0 || strcmp(status, "PARTIALLY_REFUNDED") == 0 ||
        strcmp(status, "REFUNDED") == 0)
        return refunded_minor >= amount_minor ? "REFUNDED" : "PARTIALLY_REFUNDED";
    /* FAILED (out_of_stock after the charge), MANUAL_REVIEW, EXPIRED, PENDING: the order's
     * outcome is not "refunded"; the refunded amount says what went back. */
    return status;
}

/* --- Decisions ----------------------------------------------------------------------------- */

const char *refund_verdict_name(enum refund_verdict v)
{
    switch (v) {
    case REFUND_DO_CANCEL:
        return "cancel";
    case REFUND_DO_COMPLETE:
        return "complete";
    case REFUND_DO_RESOLVE:
        return "resolve";
    case REFUND_DO_RETRY:
        return "retry";
    case REFUND_DO_WAIT:
        return "wait";
    case REFUND_DO_FAIL:
        return "fail";
    case REFUND_DO_MANUAL_REVIEW:
        return "manual_review";
    case REFUND_DO_DEAD:
        return "dead";
    default:
        abort();
    }
}

static void decide(struct refund_decision *d, enum refund_verdict v, const char *reason,
                   uint64_t delay_ms)
{
    d->verdict = v;
    d->reason = reason;
    d->delay_ms = delay_ms;
    d->attempt_failed = false;
    d->mark_unknown = false;
}

static bool past_deadline(const struct refund_policy *p, const struct refund_progress *pr)
{
    return p->retry_deadline_ms > 0 && pr->age_ms >= p->retry_deadline_ms;
}

/* Appends " " + text to the decision's detail (cut when it does not fit). */
static void append(struct refund_decision *d, const char *text)
{
    size_t used = strlen(d->detail);
    snprintf(d->detail + used, sizeof(d->detail) - used, "%s%s", used > 0 ? " " : "", text);
}

/* A failed try: RETRY, or `exhausted` (with reason) when attempts or time ran out. */
static void transient(const struct refund_policy *p, const struct refund_progress *pr,
                      enum refund_verdict exhausted, const char *reason, uint64_t retry_after_ms,
                      const char *detail, struct refund_decision *d)
{
    unsigned failed = pr->attempts + 1;
    snprintf(d->detail, sizeof(d->detail), "%s", detail != NULL ? detail : "");
    if (failed >= p->retry_max_attempts) {
        char note[64];
        snprintf(note, sizeof(note), "(gave up after %u attempts)", failed);
        decide(d, exhausted, reason, 0);
        append(d, note);
    } else if (past_deadline(p, pr)) {
        char note[96];
        snprintf(note, sizeof(note), "(gave up: job older than the retry deadline of %llu ms)",
                 (unsigned long long)p->retry_deadline_ms);
        decide(d, exhausted, reason, 0);
        append(d, note);
    } else {
        decide(d, REFUND_DO_RETRY, reason,
               retry_delay_ms(failed, p->retry_base_ms, p->retry_cap_ms, retry_after_ms,
                              p->retry_after_max_ms, pr->rand64));
    }
    d->attempt_failed = true;
}

void refund_outage(const struct refund_policy *p, const struct refund_progress *pr,
                   const char *reason, const char *detail, struct refund_decision *d)
{
    const char *text = detail != NULL && detail[0] != '\0' ? detail : reason;
    if (past_deadline(p, pr)) {
        decide(d, REFUND_DO_DEAD, reason, 0);
        snprintf(d->detail, sizeof(d->detail),
                 "%.180s (gave up: job older than the retry deadline)", text);
        return;
    }
    /* Not this job's fault: no attempt spent, and the jobs waiting for the dependency spread
     * out over the whole backoff range instead of returning together. */
    decide(d, REFUND_DO_WAIT, reason,
           retry_delay_ms(p->retry_max_attempts, p->retry_base_ms, p->retry_cap_ms, 0,
                          p->retry_after_max_ms, pr->rand64));
    snprintf(d->detail, sizeof(d->detail), "%s", text);
}

void refund_transient(const struct refund_policy *p, const struct refund_progress *pr,
                      const struct refund_row *row, bool maybe_sent, uint64_t retry_after_ms,
                      const char *detail, struct refund_decision *d)
{
    /* Without a definite answer the refund may have happened: it is never failed, only
     * handed to a person when the retries with the same key run out. */
    transient(p, pr, REFUND_DO_MANUAL_REVIEW, "refund_unknown", retry_after_ms, detail, d);
    if (d->verdict == REFUND_DO_RETRY)
        d->mark_unknown = maybe_sent && row->state == REFUND_REQUESTED;
}

void refund_breaker_open(const struct refund_policy *p, const struct refund_progress *pr,
                         uint64_t retry_in_ms, struct refund_decision *d)
{
    if (past_deadline(p, pr)) {
        decide(d, REFUND_DO_MANUAL_REVIEW, "refund_unknown", 0);
        snprintf(d->detail, sizeof(d->detail),
                 "circuit breaker open and job older than the retry deadline of %llu ms",
                 (unsigned long long)p->retry_deadline_ms);
        return;
    }
    uint64_t spread = retry_in_ms / 10 + 1;
    decide(d, REFUND_DO_WAIT, "breaker_open", retry_in_ms + pr->rand64 % spread);
    snprintf(d->detail, sizeof(d->detail), "circuit breaker open; next try in %llu ms",
             (unsigned long long)d->delay_ms);
}

void refund_after_open(const struct refund_policy *p, const struct refund_progress *pr,
                       int open_status, const char *open_err, enum refund_admission admission,
                       const char *admission_why, const struct refund_row *row,
                       struct refund_decision *d)
{
    const char *why = admission_why != NULL ? admission_why : "";
    d->detail[0] = '\0';
    switch (open_status) {
    case 0:
        break;
    case SETTLE_EUNAVAILABLE:
    case SETTLE_EIO:
    case SETTLE_ETIMEDOUT:
        /* Nothing was sent in this delivery: wait for PostgreSQL without spending attempts,
         * as reconcile jobs do. */
        refund_outage(p, pr, "store_unavailable", open_err, d);
        return;
    default:
        decide(d, REFUND_DO_DEAD, "store_rejected", 0);
        snprintf(d->detail, sizeof(d->detail), "opening the refund failed: %.200s",
                 open_err != NULL && open_err[0] != '\0' ? open_err : settle_strerror(open_status));
        return;
    }
    switch (admission) {
    case REFUND_ADMIT_OK:
        break;
    case REFUND_ADMIT_NOT_SETTLED:
        transient(p, pr, REFUND_DO_DEAD, "payment_not_refundable", 0, why, d);
        return;
    case REFUND_ADMIT_ORDER_NOT_FOUND:
    case REFUND_ADMIT_NOT_REFUNDABLE:
    case REFUND_ADMIT_MISMATCH:
    case REFUND_ADMIT_EXCEEDS:
    case REFUND_ADMIT_ID_REUSED:
        decide(d, REFUND_DO_DEAD, refund_admission_name(admission), 0);
        snprintf(d->detail, sizeof(d->detail), "%s", why);
        return;
    default:
        abort();
    }
    switch (row->state) {
    case REFUND_REQUESTED:
    case REFUND_UNKNOWN:
    case REFUND_MANUAL_REVIEW:
        /* New, or an earlier delivery did not get (or record) an answer: ask again with the
         * same key, which the PG answers with its first answer. */
        decide(d, REFUND_DO_CANCEL, NULL, 0);
        snprintf(d->detail, sizeof(d->detail), "refund %s of %" PRId64 " %s", row->id,
                 row->amount_minor,
                 row->created ? "requested" : "found, asking the PG again with the same key");
        return;
    case REFUND_SUCCEEDED:
        decide(d, REFUND_DO_COMPLETE, NULL, 0);
        snprintf(d->detail, sizeof(d->detail), "refund %s already succeeded", row->id);
        return;
    case REFUND_FAILED:
        /* A definite answer from an earlier delivery: bury this one with the same reason
         * (a static string, as every reason code is). */
        decide(d, REFUND_DO_DEAD,
               strcmp(row->failure_reason, "exceeds_balance") == 0 ? "exceeds_balance"
                                                                   : "gateway_rejected",
               0);
        snprintf(d->detail, sizeof(d->detail), "refund %.64s failed earlier: %.150s", row->id,
                 row->last_error);
        return;
    default:
        abort();
    }
}

void refund_after_cancel(const struct refund_policy *p, const struct refund_progress *pr,
                         const struct refund_row *row, const struct gateway_result *g,
                         struct refund_decision *d)
{
    d->detail[0] = '\0';
    switch (g->outcome) {
    case GATEWAY_OK:
        if (strcmp(g->tx.transaction_key, row->transaction_key) != 0) {
            /* A cancel answer about another payment proves nothing about ours. */
            refund_transient(p, pr, row, true, 0, "PG cancel answer names another transaction", d);
            return;
        }
        decide(d, REFUND_DO_COMPLETE, NULL, 0);
        snprintf(d->detail, sizeof(d->detail), "PG reports %s, cancelled %" PRId64 " in total",
                 gateway_tx_status_name(g->tx.status), g->tx.cancelled_minor);
        return;
    case GATEWAY_TRANSIENT:
    case GATEWAY_BAD_RESPONSE:
        /* A 2xx we cannot read may still have refunded: same as no answer. */
        refund_transient(p, pr, row, g->request_sent || g->outcome == GATEWAY_BAD_RESPONSE,
                         g->retry_after_ms, g->error, d);
        return;
    case GATEWAY_NOT_FOUND:
        decide(d, REFUND_DO_FAIL, "gateway_rejected", 0);
        snprintf(d->detail, sizeof(d->detail), "PG has no such payment (HTTP 404): %.180s",
                 g->error);
        return;
    case GATEWAY_REJECTED:
        if (g->http_status == 409) {
            decide(d, REFUND_DO_RESOLVE, "gateway_rejected", 0);
            snprintf(d->detail, sizeof(d->detail), "%s", g->error);
            return;
        }
        decide(d, REFUND_DO_FAIL, g->http_status == 422 ? "exceeds_balance" : "gateway_rejected",
               0);
        snprintf(d->detail, sizeof(d->detail), "PG refused the cancel (HTTP %ld): %.180s",
                 g->http_status, g->error);
        return;
    default:
        abort();
    }
}

void refund_after_resolve(const struct refund_policy *p, const struct refund_progress *pr,
                          const struct refund_row *row, const char *conflict_error,
                          const struct gateway_result *g, struct refund_decision *d)
{
    const char *conflict = conflict_error != NULL ? conflict_error : "HTTP 409";
    d->detail[0] = '\0';
    switch (g->outcome) {
    case GATEWAY_OK:
        break;
    case GATEWAY_TRANSIENT:
    case GATEWAY_BAD_RESPONSE:
        /* The 409 was a definite "not now"; the look-up failing leaves us where we were, and
         * the next try asks the same key again. */
        transient(p, pr, REFUND_DO_FAIL, "gateway_rejected", g->retry_after_ms, g->error, d);
        return;
    case GATEWAY_NOT_FOUND:
    case GATEWAY_REJECTED:
        decide(d, REFUND_DO_FAIL, "gateway_rejected", 0);
        snprintf(d->detail, sizeof(d->detail), "PG refused the cancel (%.120s); look-up: %.100s",
                 conflict, g->error);
        return;
    default:
        abort();
    }
    bool cancelled =
        g->tx.status == GATEWAY_TX_CANCELLED || g->tx.status == GATEWAY_TX_PARTIALLY_CANCELLED;
    int64_t needed = row->others_succeeded_minor + row->amount_minor;
    if (cancelled && strcmp(g->tx.transaction_key, row->transaction_key) == 0 &&
        g->tx.cancelled_minor >= needed) {
        decide(d, REFUND_DO_COMPLETE, NULL, 0);
        snprintf(d->detail, sizeof(d->detail),
                 "PG refused the cancel but reports %s with %" PRId64
                 " cancelled, which covers this refund",
                 gateway_tx_status_name(g->tx.status), g->tx.cancelled_minor);
        return;
    }
    decide(d, REFUND_DO_FAIL, "gateway_rejected", 0);
    snprintf(d->detail, sizeof(d->detail),
             "PG refused the cancel (%.120s); payment is %s with %" PRId64 " cancelled", conflict,
             gateway_tx_status_name(g->tx.status), g->tx.cancelled_minor);
}
