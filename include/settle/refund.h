/*
 * refund.h - pure policy of a refund job: its identity (the Idempotency-Key sent to the PG),
 * the refund row's state machine, the over-refund admission rule that store.c applies inside
 * its locked transaction, the statuses a payment and an order move to, and what the worker
 * does after each step. No I/O, no clock, no allocation. Thread: any.
 *
 * Refund states (refunds.state in PostgreSQL, one row per refund id):
 *   REQUESTED      written before the first PG call; no answer yet
 *   SUCCEEDED      the PG cancelled the amount (terminal)
 *   FAILED         the PG refused it with a definite answer (terminal)
 *   UNKNOWN        a call may have reached the PG but no answer came (retried, same key)
 *   MANUAL_REVIEW  retries ran out without an answer: a person must look (the job is in
 *                  the DLQ with reason refund_unknown; re-driving it tries again, same key)
 * Transitions (refund_transition_ok):
 *   REQUESTED     -> SUCCEEDED | FAILED | UNKNOWN | MANUAL_REVIEW
 *   UNKNOWN       -> SUCCEEDED | FAILED | MANUAL_REVIEW
 *   MANUAL_REVIEW -> SUCCEEDED | FAILED   (a re-driven job got an answer)
 * REQUESTED -> MANUAL_REVIEW is allowed because a delivery that crashed mid-call leaves the
 * row REQUESTED although its request may have reached the PG.
 *
 * Rules after the PG answered a cancel:
 *   2xx CANCELLED / PARTIALLY_CANCELLED for this key -> complete (SUCCEEDED)
 *   transport error, timeout, 5xx, 429, bad 2xx body -> retry with the same key; the row
 *                                             becomes UNKNOWN when the request may have been
 *                                             sent; exhausted: MANUAL_REVIEW, DLQ refund_unknown
 *   409 (payment not cancellable)             -> look the payment up: cancelled at least up
 *                                             to this refund -> complete; else FAILED,
 *                                             DLQ gateway_rejected
 *   422 (amount over the PG's balance)        -> FAILED, DLQ exceeds_balance
 *   other 4xx, 404                            -> FAILED, DLQ gateway_rejected
 * PostgreSQL (or, for the restock, Redis) unreachable -> wait without spending attempts until
 * the retry deadline, then DLQ store_unavailable (restock_failed).
 * A refund never becomes FAILED without a definite answer from the PG.
 */
#ifndef SETTLE_REFUND_H
#define SETTLE_REFUND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "settle/gateway.h"
#include "settle/job.h"

/* "rf:" + 32 hex digits + NUL; a producer's id may be up to JOB_ID_MAX bytes. */
#define REFUND_ID_MAX JOB_ID_MAX
#define REFUND_REASON_CODE_MAX 32

enum refund_state {
    REFUND_REQUESTED = 0,
    REFUND_SUCCEEDED = 1,
    REFUND_FAILED = 2,
    REFUND_UNKNOWN = 3,
    REFUND_MANUAL_REVIEW = 4,
    REFUND_STATE_COUNT
};

/* "REQUESTED", ...; NULL for an out-of-range value. */
const char *refund_state_name(enum refund_state s);
/* 0 and *out set, or SETTLE_EINVAL for a name that is not a refund state. */
int refund_state_parse(const char *name, enum refund_state *out);
/* The transition table above; from == to is not a transition (false). */
bool refund_transition_ok(enum refund_state from, enum refund_state to);
/* The PostgreSQL array literal of the states that may move to `to`, e.g.
 * "{REQUESTED,UNKNOWN}" (static; "{}" when none). Used in conditional UPDATEs. */
const char *refund_sources_literal(enum refund_state to);
/* Does a refund in this state count against the payment's balance? Every state but FAILED
 * does: an UNKNOWN or MANUAL_REVIEW refund may have moved money. */
bool refund_state_is_live(enum refund_state s);

/*
 * The refund's identity and Idempotency-Key: the job's "id" when present, else
 * "rf:" + the first 32 hex digits of FNV-1a 128 over the length-prefixed fields order_id,
 * transaction_key, amount (decimal, or "full" when absent), reason and restock ("1"/"0"),
 * so the same request enqueued again gets the same id (and a field holding the separator
 * cannot make two different requests collide). out needs REFUND_ID_MAX + 1 bytes.
 */
void refund_identity(const struct job *job, char *out, size_t out_len);

/* FNV-1a 128 of buf[0..len) as 32 lowercase hex digits + NUL (out_len >= 33). */
void refund_fnv1a128_hex(const void *buf, size_t len, char *out, size_t out_len);

/* --- Admission: applied by store.c under the payment's row lock. --- */

enum refund_admission {
    REFUND_ADMIT_OK = 0,          /* a new REQUESTED row may be inserted */
    REFUND_ADMIT_ORDER_NOT_FOUND, /* DLQ order_not_found */
    REFUND_ADMIT_NOT_SETTLED,     /* no payment row yet, or PENDING: retry, then DLQ
                                     payment_not_refundable */
    REFUND_ADMIT_NOT_REFUNDABLE,  /* payment FAILED/CANCELLED/REFUNDED: DLQ
                                     payment_not_refundable */
    REFUND_ADMIT_MISMATCH,        /* user or transaction key differ: DLQ order_mismatch */
    REFUND_ADMIT_EXCEEDS,         /* over the remaining balance: DLQ exceeds_balance */
    REFUND_ADMIT_ID_REUSED,       /* the id names a different refund: DLQ refund_id_reused */
};

const char *refund_admission_name(enum refund_admission a);

/* What the locked transaction read. */
struct refund_payment_view {
    bool order_found;
    char order_user_id[JOB_ID_MAX + 1];
    bool payment_found;
    char status[24]; /* payments.status */
    char user_id[JOB_ID_MAX + 1];
    char transaction_key[JOB_ID_MAX + 1];
    int64_t amount_minor;
    int64_t live_others_minor; /* sum of the other live refunds of this order */
};

/* Decides a new refund. On REFUND_ADMIT_OK *amount_minor is the resolved amount (the job's,
 * or the whole remaining balance). why gets one sentence otherwise. */
enum refund_admission refund_admit(const struct job *job, const struct refund_payment_view *p,
                                   int64_t *amount_minor, char *why, size_t why_len);

/* A refund row PostgreSQL holds. */
struct refund_row {
    char id[REFUND_ID_MAX + 1];
    char order_id[JOB_ID_MAX + 1];
    char user_id[JOB_ID_MAX + 1];
    char transaction_key[JOB_ID_MAX + 1];
    enum refund_state state;
    int64_t amount_minor;
    bool restock;
    bool restocked;
    unsigned pg_attempts;                        /* refunds.attempts */
    char failure_reason[REFUND_REASON_CODE_MAX]; /* FAILED: the DLQ reason code */
    char last_error[GATEWAY_ERROR_MAX];          /* for people */
    int64_t others_succeeded_minor;              /* other SUCCEEDED refunds of the order */
    bool created;                                /* inserted by this delivery */
};

/* Does an existing row with this id describe the job's refund? REFUND_ADMIT_OK,
 * REFUND_ADMIT_MISMATCH (another user or key) or REFUND_ADMIT_ID_REUSED (another order,
 * amount or restock flag). */
enum refund_admission refund_match_existing(const struct job *job, const struct refund_row *row,
                                            char *why, size_t why_len);

/* payments.status after refunded_minor of amount_minor were refunded (> 0). */
const char *refund_payment_status(int64_t amount_minor, int64_t refunded_minor);
/* orders.status after a refund: COMPLETED / PARTIALLY_REFUNDED / REFUNDED move to
 * REFUNDED or PARTIALLY_REFUNDED; any other status (FAILED out_of_stock, MANUAL_REVIEW,
 * EXPIRED, PENDING) is kept, only the refunded amount grows. */
const char *refund_order_status(const char *status, int64_t amount_minor, int64_t refunded_minor);

/* --- What the worker does next. --- */

enum refund_verdict {
    REFUND_DO_CANCEL = 0,        /* ask the PG to cancel (same key on every try) */
    REFUND_DO_COMPLETE = 1,      /* restock (when asked), then record SUCCEEDED and the amounts */
    REFUND_DO_RESOLVE = 2,       /* look the payment up at the PG (after a 409) */
    REFUND_DO_RETRY = 3,         /* transient: again after delay_ms, attempt consumed */
    REFUND_DO_WAIT = 4,          /* breaker open: again after delay_ms, no attempt consumed */
    REFUND_DO_FAIL = 5,          /* row FAILED (reason), DLQ */
    REFUND_DO_MANUAL_REVIEW = 6, /* row MANUAL_REVIEW, DLQ refund_unknown */
    REFUND_DO_DEAD = 7,          /* DLQ (reason) without touching the refund row */
};

const char *refund_verdict_name(enum refund_verdict v);

struct refund_policy {
    uint64_t retry_base_ms;
    uint64_t retry_cap_ms;
    unsigned retry_max_attempts; /* total tries, the first included */
    uint64_t retry_after_max_ms;
    uint64_t retry_deadline_ms;
};

struct refund_progress {
    unsigned attempts; /* failure attempts consumed so far */
    uint64_t age_ms;   /* since settle first saw the job */
    uint64_t rand64;   /* randomness for jitter */
};

struct refund_decision {
    enum refund_verdict verdict;
    const char *reason;             /* DLQ reason code; static */
    uint64_t delay_ms;              /* RETRY, WAIT */
    bool attempt_failed;            /* this try failed transiently (counts as an attempt) */
    bool mark_unknown;              /* RETRY: move the row REQUESTED -> UNKNOWN first */
    char detail[GATEWAY_ERROR_MAX]; /* one sentence for logs, job_log and the DLQ */
};

/* After store_refund_open_work: open_status is its result; admission and row what it
 * found (row valid only for REFUND_ADMIT_OK). */
void refund_after_open(const struct refund_policy *p, const struct refund_progress *pr,
                       int open_status, const char *open_err, enum refund_admission admission,
                       const char *admission_why, const struct refund_row *row,
                       struct refund_decision *d);

/* After the PG answered the cancel of row (sent with row->id as the key). */
void refund_after_cancel(const struct refund_policy *p, const struct refund_progress *pr,
                         const struct refund_row *row, const struct gateway_result *g,
                         struct refund_decision *d);

/* After a 409, the PG's view of the payment: complete when it is cancelled at least up to
 * this refund (other SUCCEEDED refunds + this amount), else FAILED gateway_rejected.
 * conflict_error is the 409's sentence. */
void refund_after_resolve(const struct refund_policy *p, const struct refund_progress *pr,
                          const struct refund_row *row, const char *conflict_error,
                          const struct gateway_result *g, struct refund_decision *d);

/* A transient failure. maybe_sent says whether the request may have reached the PG in this
 * try; the row (state REQUESTED/UNKNOWN/MANUAL_REVIEW) says whether an earlier one may have.
 * RETRY (mark_unknown when it may have been sent and the row is REQUESTED), or when the
 * attempts or the retry deadline are used up MANUAL_REVIEW refund_unknown. */
void refund_transient(const struct refund_policy *p, const struct refund_progress *pr,
                      const struct refund_row *row, bool maybe_sent, uint64_t retry_after_ms,
                      const char *detail, struct refund_decision *d);

/* A dependency of ours (PostgreSQL, Redis) is unreachable: WAIT a jittered backoff without
 * spending an attempt, or DEAD (reason) past the retry deadline. */
void refund_outage(const struct refund_policy *p, const struct refund_progress *pr,
                   const char *reason, const char *detail, struct refund_decision *d);

/* The breaker refused the call: WAIT retry_in_ms (plus up to 10% jitter), or past the retry
 * deadline MANUAL_REVIEW refund_unknown (an earlier try may have reached the PG). */
void refund_breaker_open(const struct refund_policy *p, const struct refund_progress *pr,
                         uint64_t retry_in_ms, struct refund_decision *d);

#endif
