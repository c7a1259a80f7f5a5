/*
 * store.h - PostgreSQL, the durable record: schema migrations, order lookups, the
 * transactional application of job outcomes (orders, payments, products.stock, job_log) and
 * the refunds table (the over-refund guard under the payment's row lock, conditional state
 * moves, the success transaction).
 *
 * Threads: store_create/store_destroy on the loop thread (destroy only after every work
 * function returned). Every other function blocks and runs on a uv pool thread (or in a CLI
 * command, which has no loop). Connections come from a bounded internal pool (one PGconn per
 * thread at a time, opened lazily, dropped and reopened after a connection error).
 * SQL: only PQexecParams with parameters (unnamed statements, so it works behind PgBouncer in
 * transaction pooling), each transaction sets statement_timeout with SET LOCAL, and every
 * write is conditional or ON CONFLICT so a redelivered job never applies an effect twice.
 * Errors: SETTLE_EUNAVAILABLE (connection lost, timeout, serialization failure, deadlock,
 * shutdown: retry later), SETTLE_ENOTFOUND, SETTLE_EREJECTED (constraint violation or other
 * permanent SQL error: err has SQLSTATE and message), SETTLE_EINVAL.
 */
#ifndef SETTLE_STORE_H
#define SETTLE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "settle/job.h"
#include "settle/refund.h"

#define STORE_ITEMS_MAX 64
#define STORE_SKU_MAX 64
#define STORE_STATUS_MAX 24
#define STORE_ERR_MAX 512

struct store_config {
    const char *conninfo;          /* libpq URI or key=value string; copied */
    unsigned pool_size;            /* connections at most */
    uint64_t statement_timeout_ms; /* SET LOCAL statement_timeout in every transaction */
    uint64_t connect_timeout_ms;   /* libpq connect_timeout (rounded up to seconds) */
};

struct store;

int store_create(struct store **out, const struct store_config *cfg);
void store_destroy(struct store *s);

/* Applies the embedded migrations (ops/sql/NNN_*.sql) not yet recorded in
 * schema_migrations, each in its own transaction, under an advisory lock so concurrent
 * workers do not race. Idempotent. *applied = how many ran (may be NULL). */
int store_migrate(struct store *s, unsigned *applied, char *err, size_t err_len);

/* SELECT 1 over a pooled connection (readiness). */
int store_ping_work(struct store *s, char *err, size_t err_len);

struct store_item {
    char sku[STORE_SKU_MAX + 1];
    int32_t qty;
};

struct store_order {
    char id[JOB_ID_MAX + 1];
    char user_id[JOB_ID_MAX + 1];
    char status[STORE_STATUS_MAX]; /* orders.status */
    char failure_reason[JOB_REASON_MAX + 1];
    int64_t amount_minor;
    int64_t refunded_minor;
    uint64_t age_ms; /* now() - created_at, computed by PostgreSQL */
    unsigned check_count;
    char transaction_key[JOB_ID_MAX + 1];  /* payments.transaction_key, "" when none */
    char payment_status[STORE_STATUS_MAX]; /* payments.status, "" when no row */
    unsigned n_items;
    struct store_item items[STORE_ITEMS_MAX]; /* sorted by sku */
};

/* Loads an order with its items and payment. SETTLE_ENOTFOUND when there is no such order;
 * SETTLE_ETOOBIG when it has more than STORE_ITEMS_MAX items. */
int store_load_order_work(struct store *s, const char *order_id, struct store_order *out, char *err,
                          size_t err_len);

enum store_action {
    STORE_ACTION_NONE = 0,          /* only the job_log row */
    STORE_ACTION_COMPLETE = 1,      /* PENDING -> COMPLETED, payment SUCCESS, stock -= items */
    STORE_ACTION_FAIL = 2,          /* PENDING -> FAILED (reason), payment FAILED or kept */
    STORE_ACTION_EXPIRE = 3,        /* PENDING -> EXPIRED */
    STORE_ACTION_MANUAL_REVIEW = 4, /* PENDING -> MANUAL_REVIEW (reason) */
    STORE_ACTION_RESCHEDULE = 5,    /* PENDING stays; next_check_at, check_count += 1 */
};

struct store_outcome {
    enum store_action action;
    const char *order_id; /* required unless action == NONE */
    /* What the PG said (COMPLETE, FAIL); NULL/0 when unknown. */
    const char *transaction_key;
    const char *payment_status; /* "SUCCESS" | "FAILED"; NULL leaves payments.status alone */
    const char *reason;         /* orders.failure_reason / payments.reason */
    const char *card_type;
    const char *card_last4;
    int64_t amount_minor;
    uint64_t next_check_in_ms; /* RESCHEDULE */
    /* The job_log row, written in the same transaction when job_id != NULL. */
    const char *job_id;
    const char *queue;
    const char *producer_id;
    const char *outcome;          /* "done" | "dead" */
    const char *result;           /* e.g. "completed", "failed", "expired", "invalid_job" */
    const char *result_unapplied; /* result when the order was no longer PENDING (NULL: same) */
    const char *last_error;
    const char *worker_id;
    unsigned attempts;
    unsigned deliveries;
    uint64_t enqueued_ms; /* epoch ms */
};

/*
 * Applies one outcome in one transaction. The order transition happens only when the order
 * is still PENDING (a callback handler may have got there first: that is respected, not an
 * error). *applied says whether it happened; status_after (STORE_STATUS_MAX bytes, may be
 * NULL) receives the order's status after the transaction. The job_log insert is ON
 * CONFLICT DO NOTHING, so a redelivered job keeps its first row.
 */
int store_apply_outcome_work(struct store *s, const struct store_outcome *o, bool *applied,
                             char *status_after, char *err, size_t err_len);

struct store_product {
    char sku[STORE_SKU_MAX + 1];
    int64_t on_hand;
};

/* --- Refunds (ops/sql/002_refunds.sql; policy in refund.h) --- */

/* What store_refund_open_work found or created. */
struct store_refund {
    enum refund_admission admission; /* REFUND_ADMIT_OK: row is valid */
    char why[GATEWAY_ERROR_MAX];     /* the admission's sentence otherwise */
    struct refund_row row;
    unsigned n_items;
    struct store_item items[STORE_ITEMS_MAX]; /* the order's items, sorted by sku */
};

/*
 * Opens refund `refund_id` for job (kind refund) in one transaction: locks the order's
 * payment row (SELECT ... FOR UPDATE), returns the existing refund row when there is one
 * (checked against the job with refund_match_existing), else applies refund_admit (payment
 * status, user and transaction key, live refunds + this one <= the payment's amount; an
 * absent amount resolves to the remaining balance) and inserts the row as REQUESTED
 * (ON CONFLICT (id) DO NOTHING, then read back). The row is committed before this returns,
 * so it exists before the first PG call. A rejection is not an error: 0 with
 * out->admission != REFUND_ADMIT_OK and nothing written. Errors as at the top of this file.
 */
int store_refund_open_work(struct store *s, const struct job *job, const char *refund_id,
                           struct store_refund *out, char *err, size_t err_len);

/*
 * Moves refund `refund_id` to `to` (UNKNOWN, FAILED or MANUAL_REVIEW) when its state allows
 * it (refund_transition_ok) or is `to` already, recording pg_status and failure_reason (NULL
 * keeps the old value), last_error, and one more PG attempt. *state_after is the row's
 * state after the transaction. When log != NULL and the row ends in `to`, its job_log row
 * (the job_id..enqueued_ms fields of log; action must be STORE_ACTION_NONE) is written in the
 * same transaction, ON CONFLICT DO NOTHING. SETTLE_ENOTFOUND when there is no such refund.
 */
int store_refund_mark_work(struct store *s, const char *refund_id, enum refund_state to,
                           const char *pg_status, const char *failure_reason,
                           const char *last_error, const struct store_outcome *log,
                           enum refund_state *state_after, char *err, size_t err_len);

struct store_refund_success {
    const char *refund_id;
    const char *order_id;
    const char *pg_status;           /* e.g. "CANCELLED" */
    bool restock;                    /* put the order's units back in products.stock */
    const struct store_outcome *log; /* job_log row (as for store_refund_mark_work) or NULL;
                                        its result_unapplied (when set) is the result when
                                        this call did not change the refund */
};

struct store_refund_result {
    bool changed;   /* this call moved the refund to SUCCEEDED and added its amount */
    bool restocked; /* this call ran the restock step (units added if the order had taken
                       them: orders.completed_at is set) */
    enum refund_state state_after;
    char order_status[STORE_STATUS_MAX];
    char payment_status[STORE_STATUS_MAX];
};

/*
 * Records a refund the PG confirmed, in one transaction that locks the payment and order
 * rows: refund -> SUCCEEDED (conditional); only when that changed the row,
 * payments.refunded_minor and orders.refunded_minor grow by its amount and their statuses
 * follow refund_payment_status / refund_order_status; with restock, the restock step runs
 * once per order (guarded by refunds.restocked: UPDATE ... WHERE NOT restocked and no other
 * refund of the order restocked) and adds each item's qty to products.stock when the order
 * had completed; then the job_log row. Idempotent: a second call changes nothing but may
 * write a job_log row for another job id.
 */
int store_refund_succeed_work(struct store *s, const struct store_refund_success *in,
                              struct store_refund_result *out, char *err, size_t err_len);

/* Lists every product's on-hand stock, ordered by sku, into a malloc'd array (*out, caller
 * frees; *n entries). Used by `settle stock load`. */
int store_list_products(struct store *s, struct store_product **out, size_t *n, char *err,
                        size_t err_len);

#endif
