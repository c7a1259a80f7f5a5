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
    bool prepared;                 /* the hot statements as named prepared statements */
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

/* Most connections store_warm_work opens. */
#define STORE_WARM_MAX 8

/* Opens n (at most STORE_WARM_MAX and the pool size) pooled connections at once and runs an
 * empty order load and an empty outcome batch on each, so the first jobs after a start pay
 * neither the connect nor PL/pgSQL's compile and plans (5-10 ms). Nothing is written. */
int store_warm_work(struct store *s, unsigned n, char *err, size_t err_len);

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

/* The most jobs one batched load or outcome write takes (SETTLE_DB_BATCH is capped here). */
#define STORE_BATCH_MAX 64

/* One order of a batched load. */
struct store_load {
    const char *order_id;      /* in */
    struct store_order *order; /* out, filled when status == 0 */
    int status;                /* out: 0, SETTLE_ENOTFOUND (no such order), SETTLE_ETOOBIG
                                * (over STORE_ITEMS_MAX items), or the transaction's error */
    char err[STORE_ERR_MAX];   /* out: the error's text */
};

/*
 * Loads n (1..STORE_BATCH_MAX) orders, each with its items (sorted by sku) and payment, in
 * one read-only REPEATABLE READ transaction: two statements (orders with their payments, then
 * every item) for the whole batch, so every order is read from one snapshot. Every l[i] gets
 * its own status; a failure of the transaction itself is given to every order. Returns 0
 * when the transaction ran (some orders may still be missing), else that failure.
 */
int store_load_orders_work(struct store *s, struct store_load *l, size_t n);

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

/* One job of a batched outcome write. */
struct store_apply {
    const struct store_outcome *o;       /* in */
    int status;                          /* out: 0 or this job's error */
    bool applied;                        /* out: the order transition happened */
    char status_after[STORE_STATUS_MAX]; /* out: the order's status after the transaction */
    char err[STORE_ERR_MAX];             /* out: the error's text */
};

/*
 * Applies n (1..STORE_BATCH_MAX) outcomes in one transaction through settle_apply_outcomes()
 * (ops/sql/004_outcome_batch.sql). An order's transition happens only when the order is still
 * PENDING (a callback handler may have got there first: that is respected, not an error);
 * a[i].applied says whether it did and a[i].status_after is the order's status after the
 * transaction. The job_log insert is ON CONFLICT DO NOTHING, so a redelivered job keeps its
 * first row.
 * (ops/sql/004_outcome_batch.sql): each job runs the same guarded statements as a single one
 * would, in its own savepoint, so a job the database refuses (a constraint: SETTLE_EREJECTED;
 * a deadlock: SETTLE_EUNAVAILABLE) is rolled back alone and reported in its a[i].status while
 * the others commit. A failed or unknown COMMIT is given to every job (nothing of the batch
 * may be acknowledged; retrying it is harmless). Returns 0 when the transaction committed.
 */
int store_apply_outcomes_work(struct store *s, struct store_apply *a, size_t n);

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

/* --- Scheduled work (ops/sql/003_tasks.sql; scheduling policy in tasks.h) ---
 * Times cross this interface as epoch milliseconds of PostgreSQL's clock, the one clock every
 * worker shares. */

#define STORE_PERIOD_MAX 200

/* One task_runs row. */
struct store_task_row {
    bool found;
    char period[STORE_PERIOD_MAX + 1];
    int64_t seq;                   /* interval runs; 0 otherwise */
    char status[STORE_STATUS_MAX]; /* "running" | "done" | "failed" */
    int64_t started_ms;
    int64_t heartbeat_ms;
    int64_t finished_ms; /* -1 while running */
    unsigned attempts;
    char worker[JOB_ID_MAX + 1];
};

/* Fills period (STORE_PERIOD_MAX + 1 bytes) of task i for PostgreSQL's now: "" asks for the
 * task's latest interval run. Returns 0, or an error that ends the read. */
typedef int (*store_period_fn)(void *arg, int64_t now_ms, size_t i, char *period);

/*
 * The scheduler's due check in one short read-only transaction: reads PostgreSQL's now()
 * into *now_ms, asks period_of for each of the n tasks, then reads in two statements each
 * task's row: its latest interval run (highest seq) for "", else the row of that period.
 * rows[i].found is false when there is none. n is 1..16.
 */
int store_task_states_work(struct store *s, size_t n, const char *const *tasks,
                           store_period_fn period_of, void *arg, struct store_task_row *rows,
                           int64_t *now_ms, char *err, size_t err_len);

enum store_claim_kind {
    STORE_CLAIM_INTERVAL = 0, /* insert run seq (period = its decimal text) */
    STORE_CLAIM_DAILY = 1,    /* insert the date, or retry a failed / dead attempt of it */
    STORE_CLAIM_MANUAL = 2,   /* insert a `settle run` period */
};

struct store_task_claim {
    enum store_claim_kind kind;
    const char *task;
    const char *period;
    int64_t seq;              /* INTERVAL: > 0 */
    const char *stale_period; /* INTERVAL: a dead running run to mark failed first, or NULL */
    uint64_t stale_ms;        /* INTERVAL, DAILY: a running row without heartbeat this long */
    uint64_t retry_ms;        /* DAILY: a failed attempt is retried this long after it ended */
    unsigned max_attempts;    /* DAILY */
    const char *worker;
    bool dry_run;
};

/*
 * Claims one run. Exactly one caller ever gets *claimed for a (task, period): the insert is
 * ON CONFLICT DO NOTHING (DAILY: DO UPDATE only while the existing attempt failed at least
 * retry_ms ago or stopped beating stale_ms ago, and fewer than max_attempts were made).
 * INTERVAL with stale_period first marks that run failed ("worker died"), conditional on it
 * still running without heartbeat; when that condition no longer holds nothing is claimed.
 * *took_over (may be NULL) says a dead run was replaced.
 */
int store_task_claim_work(struct store *s, const struct store_task_claim *c, bool *claimed,
                          bool *took_over, char *err, size_t err_len);

/* Refreshes a running run's heartbeat_at. *ours is false when the row is no longer this
 * worker's running run (another worker took it over): the caller must stop. */
int store_task_heartbeat_work(struct store *s, const char *task, const char *period,
                              const char *worker, bool *ours, char *err, size_t err_len);

/* Ends this worker's running run: status "done" or "failed", summary (JSON text or NULL)
 * and error (NULL when done). *recorded is false when the row was no longer ours. */
int store_task_finish_work(struct store *s, const char *task, const char *period,
                           const char *worker, const char *status, const char *summary_json,
                           const char *error, bool *recorded, char *err, size_t err_len);

/* A PENDING order as the sweeps see it. */
struct store_pending_order {
    char id[JOB_ID_MAX + 1];
    char user_id[JOB_ID_MAX + 1];
    char transaction_key[JOB_ID_MAX + 1]; /* payments.transaction_key, "" when unknown */
    uint64_t age_ms;
};

enum store_key_filter {
    STORE_KEY_ANY = 0,
    STORE_KEY_WITH = 1,    /* a payments row with a transaction key */
    STORE_KEY_WITHOUT = 2, /* no payments row, or one without a key */
};

struct store_pending_query {
    uint64_t min_age_ms; /* created more than this long ago */
    enum store_key_filter key;
    /* Only orders nobody is re-checking: next_check_at NULL or further in the past than
     * recheck_grace_ms (a job that re-checks an order moves its next_check_at ahead). */
    bool unwatched_only;
    uint64_t recheck_grace_ms;
    unsigned limit; /* oldest first */
};

/* PENDING orders matching q into a malloc'd array (*out, caller frees; *n entries). */
int store_pending_orders_work(struct store *s, const struct store_pending_query *q,
                              struct store_pending_order **out, size_t *n, char *err,
                              size_t err_len);

/* PENDING -> EXPIRED (failure_reason reason) when the order is still PENDING and no
 * transaction key is recorded for it. *expired says whether it happened; status_after
 * (STORE_STATUS_MAX bytes) gets the order's status after the transaction. */
int store_expire_order_work(struct store *s, const char *order_id, const char *reason,
                            bool *expired, char *status_after, char *err, size_t err_len);

/* An order the PG orphan sweep found, with its payment and refund state. */
struct store_order_match {
    char id[JOB_ID_MAX + 1];
    char user_id[JOB_ID_MAX + 1];
    char status[STORE_STATUS_MAX];
    int64_t amount_minor;
    char payment_key[JOB_ID_MAX + 1];      /* payments.transaction_key, "" when none */
    char payment_status[STORE_STATUS_MAX]; /* "" when no payments row */
    bool refund_open;                      /* a refunds row of the order that is not FAILED */
};

/* Looks up n (1..10000) order ids with one `WHERE id = ANY($1)`; writes the orders found
 * into out (room for n) and their count into *found, in no particular order. */
int store_orders_lookup_work(struct store *s, const char *const *ids, size_t n,
                             struct store_order_match *out, size_t *found, char *err,
                             size_t err_len);

/*
 * For an order that ended FAILED or EXPIRED although the PG captured transaction_key for the
 * order's full amount: records that payment as SUCCESS (inserts the payments row, or moves a
 * PENDING/FAILED row of the same or no key), so the refund pipeline, which refunds only a
 * SUCCESS payment under its row lock, can refund it. *ready is true when the order's
 * payments row is now this key in SUCCESS or PARTIALLY_REFUNDED; otherwise detail says why
 * (e.g. the order has another payment). Idempotent.
 */
int store_orphan_payment_work(struct store *s, const char *order_id, const char *transaction_key,
                              int64_t amount_minor, bool *ready, char *detail, size_t detail_len,
                              char *err, size_t err_len);

/* One orphan sweep decision (see orphan_decisions in 003_tasks.sql). */
struct store_orphan_decision {
    const char *transaction_key;
    const char *order_id;
    const char *user_id; /* NULL allowed */
    int64_t amount_minor;
    const char *pg_status;
    int64_t pg_created_ms;    /* -1 when unknown */
    const char *order_status; /* NULL: no such order */
    const char *decision;
    const char *detail; /* NULL allowed */
};

/* Inserts n decisions of run `period` in one statement (ON CONFLICT DO NOTHING). */
int store_orphan_decisions_work(struct store *s, const char *period,
                                const struct store_orphan_decision *d, size_t n, char *err,
                                size_t err_len);

/* An item of an order whose sale may be committed in Redis but not yet applied to
 * products.stock (the order is PENDING or MANUAL_REVIEW in PostgreSQL). */
struct store_unapplied_item {
    char order_id[JOB_ID_MAX + 1];
    char sku[STORE_SKU_MAX + 1];
    int32_t qty;
};

#define STORE_UNAPPLIED_MAX 100000

/*
 * One batch of the stock sync, from one snapshot (REPEATABLE READ): up to limit products
 * with sku > after_sku (after_sku "" = from the start), in sku order, into rows (room for
 * limit), and the items of PENDING / MANUAL_REVIEW orders that hold those SKUs into a
 * malloc'd array (*items, caller frees). SETTLE_ETOOBIG when there are more than
 * STORE_UNAPPLIED_MAX such items.
 */
int store_stock_batch_work(struct store *s, const char *after_sku, unsigned limit,
                           struct store_product *rows, size_t *n_rows,
                           struct store_unapplied_item **items, size_t *n_items, char *err,
                           size_t err_len);

/* One stock sync finding (see stock_mismatches in 003_tasks.sql). */
struct store_stock_mismatch {
    const char *sku;
    int64_t pg_on_hand;
    int64_t reserved;
    int64_t unapplied;
    int64_t redis_before; /* -1: the key was missing */
    int64_t redis_after;
    bool repaired;
};

/* Inserts n findings of run `period` in one statement (ON CONFLICT DO NOTHING). */
int store_stock_mismatches_work(struct store *s, const char *period,
                                const struct store_stock_mismatch *m, size_t n, char *err,
                                size_t err_len);

/* A daily_stats row. */
struct store_daily_stats {
    char date[11]; /* YYYY-MM-DD */
    int64_t orders_created;
    int64_t orders_completed;
    int64_t revenue_minor;
    int64_t avg_order_minor;
    int64_t orders_cancelled;
    int64_t orders_expired;
    int64_t orders_failed;
    int64_t refunds_count;
    int64_t refunded_minor;
    char computed_by[STORE_PERIOD_MAX + 1];
};

/*
 * Computes the statistics of UTC day `date` (YYYY-MM-DD, before today by PostgreSQL's clock,
 * else SETTLE_EINVAL) and writes them once: INSERT ... ON CONFLICT (date) DO NOTHING, or
 * with force DO UPDATE. *written says whether this call wrote the row; *out is the row as
 * stored afterwards. computed_by names the run. With dry_run the transaction is rolled back:
 * *written and *out say what would have been stored.
 */
int store_daily_stats_work(struct store *s, const char *date, bool force, bool dry_run,
                           const char *computed_by, struct store_daily_stats *out, bool *written,
                           char *err, size_t err_len);

/* The latest date before `before` (YYYY-MM-DD) that has a daily_stats row: *found false when
 * there is none, else out holds it. */
int store_daily_stats_last_work(struct store *s, const char *before, char out[11], bool *found,
                                char *err, size_t err_len);

#endif
