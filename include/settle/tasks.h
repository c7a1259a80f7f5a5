/*
 * tasks.h - scheduled work (issue 4): the stale-order sweep, order expiry, the PG orphan
 * sweep, the nightly stock sync and the daily statistics, each run exactly once per period
 * across all workers, and on demand (`settle run <task>`).
 *
 * Once per period: PostgreSQL's task_runs table (ops/sql/003_tasks.sql) is the arbiter. A
 * worker claims a run by inserting its (task, period) row; only the inserter runs it.
 *   interval tasks (stale_sweep, order_expiry, orphan_sweep): period = run number. Run n+1 is
 *     due once run n finished and PostgreSQL's now() >= run n's start + the interval, so runs
 *     start max(run time, interval) apart (seed 004). A running run whose heartbeat stopped
 *     for SETTLE_TASK_STALE_MS is marked failed ("worker died") and the next one starts.
 *   daily tasks (stock_sync, daily_stats): period = the UTC date of the most recent scheduled
 *     time of day that has passed, so a worker started at 09:00 still runs that day's 00:00
 *     statistics once. A failed attempt is retried after SETTLE_TASK_RETRY_MS, at most
 *     SETTLE_TASK_MAX_ATTEMPTS times per date; missed earlier days are not back-filled.
 *   manual runs: period "manual:<UTC time>:<worker>", recorded beside the scheduled ones and
 *     never blocking them.
 * Every task is bounded per run (limits in config.h), idempotent (deterministic job ids with
 * deduplicated enqueue, conditional SQL, ON CONFLICT, atomic Lua), logs one summary line and
 * stores its summary in task_runs.summary.
 *
 * Threads: the pure functions run anywhere. tasks_check_work, tasks_execute_work and
 * tasks_run_manual block: a worker runs them on a uv pool thread (one at a time), `settle run`
 * on its main thread. They use the worker's store and gateway pools and a synchronous Redis
 * connection of their own, opened for the run and closed after it; the orphan sweep starts
 * up to SETTLE_ORPHAN_CONCURRENCY threads of its own to fetch pages and joins them before it
 * returns. Nothing here touches the loop, hiredis' async context or the metrics registry:
 * what the loop should count comes back in struct tasks_outcome.
 */
#ifndef SETTLE_TASKS_H
#define SETTLE_TASKS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "settle/config.h"
#include "settle/gateway.h"
#include "settle/store.h"

enum tasks_id {
    TASK_STALE_SWEEP = 0,
    TASK_ORDER_EXPIRY = 1,
    TASK_ORPHAN_SWEEP = 2,
    TASK_STOCK_SYNC = 3,
    TASK_DAILY_STATS = 4,
    TASK_COUNT
};

/* "stale_sweep", ...; NULL for an out-of-range id. */
const char *tasks_name(enum tasks_id id);
/* 0 and *out, or SETTLE_EINVAL for an unknown name. */
int tasks_parse(const char *name, enum tasks_id *out);
/* True for the tasks scheduled at a time of day (stock_sync, daily_stats). */
bool tasks_is_daily(enum tasks_id id);

/* --- Pure scheduling policy --- */

#define TASKS_DATE_LEN 11 /* "YYYY-MM-DD" + NUL */
/* Most missed days a scheduled daily_stats run writes before its own (the most recent). */
#define TASKS_BACKFILL_DAYS 31

/* The latest interval run of a task, as far as the due check needs it. */
struct tasks_last_run {
    bool found;
    int64_t seq;
    bool running;
    int64_t started_ms;   /* PostgreSQL clock */
    int64_t heartbeat_ms; /* PostgreSQL clock */
};

enum tasks_verdict {
    TASKS_NOT_DUE = 0,
    TASKS_DUE = 1,      /* claim next_seq */
    TASKS_TAKE_OVER = 2 /* mark the last run failed (its worker died), then claim next_seq */
};

struct tasks_due {
    enum tasks_verdict verdict;
    int64_t next_seq;
    int64_t due_in_ms; /* NOT_DUE: how long until it may be due (0 when unknown) */
};

/* Interval task: due when there is no run yet, or the last one is finished and now >= its
 * start + interval_ms; a running one without heartbeat for stale_ms is taken over. */
void tasks_interval_due(const struct tasks_last_run *last, int64_t now_ms, uint64_t interval_ms,
                        uint64_t stale_ms, struct tasks_due *out);

/* A daily task's row for the current period. */
struct tasks_daily_row {
    bool found;
    bool running;
    bool failed; /* status failed (else done when not running) */
    int64_t heartbeat_ms;
    int64_t finished_ms;
    unsigned attempts;
};

/* Daily task: TASKS_DUE when there is no row for the period, or its attempt failed at least
 * retry_ms ago and fewer than max_attempts were made, or it is running without heartbeat for
 * stale_ms (TASKS_TAKE_OVER). */
enum tasks_verdict tasks_daily_due(const struct tasks_daily_row *row, int64_t now_ms,
                                   uint64_t retry_ms, uint64_t stale_ms, unsigned max_attempts);

/* The period of a daily task at now_ms (epoch ms, UTC) scheduled at at_minutes after
 * midnight: the UTC date of the most recent scheduled time <= now. 0 or SETTLE_EINVAL. */
int tasks_daily_period(int64_t now_ms, unsigned at_minutes, char out[TASKS_DATE_LEN]);

/* 1 when date is a valid "YYYY-MM-DD" (Gregorian, years 1970..9999), else 0. */
int tasks_date_valid(const char *date);

/* out = date + days (days may be negative). 0 or SETTLE_EINVAL. */
int tasks_date_shift(const char *date, int days, char out[TASKS_DATE_LEN]);

/* --- The PG orphan sweep's rule (pure; see README "Scheduled work") --- */

enum tasks_orphan_verdict {
    ORPHAN_NOT_CAPTURED = 0,   /* not SUCCESS, nor PARTIALLY_CANCELLED with a balance: skip */
    ORPHAN_MATCHED,            /* a paid order (COMPLETED / [PARTIALLY_]REFUNDED) of this payment */
    ORPHAN_REFUND,             /* FAILED/EXPIRED order charged anyway: refund it */
    ORPHAN_RECONCILE,          /* PENDING order: the reconcile job completes it (never refunded) */
    ORPHAN_REFUND_IN_PROGRESS, /* a refund of the order exists already */
    ORPHAN_NO_ORDER,           /* no such order: needs a manual refund */
    ORPHAN_AMOUNT_MISMATCH,    /* amounts differ: a person decides */
    ORPHAN_USER_MISMATCH,      /* the PG names another user: a person decides */
    ORPHAN_DUPLICATE_CHARGE,   /* the order is paid by another transaction: manual refund */
    ORPHAN_MANUAL_REVIEW,      /* the order waits for a person already */
    ORPHAN_REFUND_CONFLICT,    /* we recorded it refunded, the PG says captured: a person looks */
};

/* Decides one PG payment; order is NULL when no order has its orderId. */
enum tasks_orphan_verdict tasks_orphan_decide(const struct gateway_payment *p,
                                              const struct store_order_match *order);
/* "matched", "refund", ...: the decision's name in orphan_decisions. */
const char *tasks_orphan_verdict_name(enum tasks_orphan_verdict v);

/* --- Running tasks --- */

/* What a task needs; owned by the caller and valid for the whole call. */
struct tasks_env {
    const struct config *cfg;
    struct store *store;
    struct gateway *gateway;
    struct config_redis_addr redis;
    const char *worker_id;
    atomic_int *cancel; /* set non-zero to stop at the next step (shutdown); may be NULL */
    FILE *decisions;    /* one line per decision (`settle run`); NULL in a worker */
};

/* One run to execute. */
struct tasks_run {
    enum tasks_id task;
    char period[STORE_PERIOD_MAX + 1];
    bool manual;
    bool dry_run;              /* compare, decide and print; change nothing */
    bool force;                /* daily_stats: recompute and overwrite the day */
    char date[TASKS_DATE_LEN]; /* daily_stats: the day; "" = the day before the period */
    bool took_over;            /* the claim replaced a dead run */
};

/* One PG call made by a task, for settle_gateway_requests_total (counted by the loop). */
struct tasks_gw_obs {
    const char *endpoint; /* "status" | "list" */
    const char *cls;      /* gateway_result_class */
    double seconds;
};

#define TASKS_GW_OBS_MAX 100000

struct tasks_outcome {
    bool ok;                   /* the run finished ("done"); else "failed" */
    bool recorded;             /* task_runs holds this outcome (false: taken over meanwhile) */
    char *summary;             /* JSON object text, malloc'd (tasks_outcome_free) */
    char error[512];           /* why it failed */
    unsigned stock_mismatches; /* for settle_stock_sync_mismatches_total */
    struct tasks_gw_obs *gw;   /* malloc'd, n_gw entries */
    size_t n_gw;
};

void tasks_outcome_free(struct tasks_outcome *o);

/*
 * Blocking. Checks which task is due (in the order of enum tasks_id) and claims the first
 * one, filling *run. 0 when a run was claimed, SETTLE_ENOTFOUND when nothing is due, or the
 * store's error.
 */
int tasks_check_work(const struct tasks_env *env, struct tasks_run *run);

/*
 * Blocking. Executes a claimed run, logs its one summary line and records its end in
 * task_runs (done with the summary, or failed with the error). Always fills *out.
 */
void tasks_execute_work(const struct tasks_env *env, const struct tasks_run *run,
                        struct tasks_outcome *out);

/*
 * Blocking (`settle run`). Records a manual run (period "manual:<UTC time>:<worker>") and
 * executes it. run->task and its options must be set; run->period is filled in. Returns 0
 * when the run was recorded and executed (out->ok says how it ended), else an error (out is
 * filled with the reason).
 */
int tasks_run_manual(const struct tasks_env *env, struct tasks_run *run, struct tasks_outcome *out);

#endif
