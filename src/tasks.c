/*
 * tasks.c - scheduled work: the due checks and claims that make each periodic task run once
 * per period across all workers (task_runs in PostgreSQL), and the five tasks themselves:
 * stale-order sweep, order expiry, PG orphan sweep, nightly stock sync, daily statistics.
 *
 * Threads: the pure functions (dates, due checks, the orphan rule) run anywhere. Everything
 * else blocks and runs on one uv pool thread of a worker (one task at a time) or on the main
 * thread of `settle run`. A run owns a private synchronous Redis connection, opened at its
 * start and closed at its end (the loop's async hiredis context is never touched here), and
 * borrows connections from the worker's PostgreSQL and libcurl pools one call at a time. The
 * orphan sweep starts up to SETTLE_ORPHAN_CONCURRENCY page-fetching threads and joins them
 * before it goes on; they touch only their own page slots.
 * Owns: per run, the Redis connection, the summary JSON and the buffers of the task.
 *
 * Every task checks, between steps, whether the process is shutting down (env->cancel) and
 * refreshes the run's heartbeat (so a run that stopped beating can be taken over, and a run
 * that was taken over stops). A stopped run is recorded as failed with what it did so far;
 * every step is idempotent, so the next run simply carries on.
 */
#include "settle/tasks.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "settle/error.h"
#include "settle/job.h"
#include "settle/log.h"
#include "settle/queue.h"
#include "settle/rconn.h"
#include "settle/stock.h"

#define MS_PER_DAY INT64_C(86400000)
/* Redis commands of a run (the stock sync's script reads every reservation at once). */
#define TASK_REDIS_TIMEOUT_MS 10000
/* The order expiry stops asking the PG after this many transient failures in a row: the PG
 * is down, and the rest of the batch waits for the next run instead of for timeouts. */
#define EXPIRY_TRANSIENT_STREAK_MAX 5
/* Reservations the stock sync reads per run (the deadline set holds only live ones). */
#define STOCK_RESV_MAX 1000000
#define STOCK_RESV_PAGE 5000
/* A batch whose reservations keep changing under the sync is retried this often, then left
 * for the next run (counted as busy). */
#define STOCK_BATCH_TRIES 3
/* Bounded alert stream: about the last 10000 alerts are kept (XADD MAXLEN ~). */
#define ALERTS_MAXLEN "10000"

static const struct {
    const char *name;
    bool daily;
} task_defs[TASK_COUNT] = {
    [TASK_STALE_SWEEP] = {"stale_sweep", false},   [TASK_ORDER_EXPIRY] = {"order_expiry", false},
    [TASK_ORPHAN_SWEEP] = {"orphan_sweep", false}, [TASK_STOCK_SYNC] = {"stock_sync", true},
    [TASK_DAILY_STATS] = {"daily_stats", true},
};

const char *tasks_name(enum tasks_id id)
{
    return (unsigned)id < TASK_COUNT ? task_defs[id].name : NULL;
}

int tasks_parse(const char *name, enum tasks_id *out)
{
    for (unsigned i = 0; name != NULL && i < TASK_COUNT; i++) {
        if (strcmp(name, task_defs[i].name) == 0) {
            *out = (enum tasks_id)i;
            return 0;
        }
    }
    return SETTLE_EINVAL;
}

bool tasks_is_daily(enum tasks_id id)
{
    return (unsigned)id < TASK_COUNT && task_defs[id].daily;
}

/* ---------------------------------------------------------------------------------------------
 * Dates (proleptic Gregorian, UTC), without the C library's time zone machinery: these run on
 * pool threads and in unit tests, and UTC is all the schedule knows.
 */

/* Days since 1970-01-01 of y-m-d (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, int *m, int *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

static int days_in_month(int64_t y, int m)
{
    static const int days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    return m == 2 && leap ? 29 : days[m - 1];
}

/* "YYYY-MM-DD" -> days since the epoch; -1 when invalid. */
static int64_t date_days(const char *s)
{
    if (s == NULL || strlen(s) != 10 || s[4] != '-' || s[7] != '-')
        return -1;
    for (int i = 0; i < 10; i++) {
        if (i != 4 && i != 7 && (s[i] < '0' || s[i] > '9'))
            return -1;
    }
    int64_t y = (s[0] - '0') * 1000 + (s[1] - '0') * 100 + (s[2] - '0') * 10 + (s[3] - '0');
    int m = (s[5] - '0') * 10 + (s[6] - '0');
    int d = (s[8] - '0') * 10 + (s[9] - '0');
    if (y < 1970 || m < 1 || m > 12 || d < 1 || d > days_in_month(y, m))
        return -1;
    return days_from_civil(y, m, d);
}

static int format_days(int64_t days, char out[TASKS_DATE_LEN])
{
    int64_t y;
    int m, d;
    civil_from_days(days, &y, &m, &d);
    if (y < 1970 || y > 9999)
        return SETTLE_EINVAL;
    snprintf(out, TASKS_DATE_LEN, "%04d-%02d-%02d", (int)y, m, d);
    return 0;
}

int tasks_date_valid(const char *date)
{
    return date_days(date) >= 0;
}

int tasks_date_shift(const char *date, int days, char out[TASKS_DATE_LEN])
{
    int64_t z = date_days(date);
    if (z < 0)
        return SETTLE_EINVAL;
    return format_days(z + days, out);
}

int tasks_daily_period(int64_t now_ms, unsigned at_minutes, char out[TASKS_DATE_LEN])
{
    if (now_ms < 0 || at_minutes >= 24 * 60)
        return SETTLE_EINVAL;
    int64_t day = now_ms / MS_PER_DAY;
    int64_t minute = (now_ms % MS_PER_DAY) / 60000;
    /* Before today's scheduled time, the most recent one was yesterday's. */
    if (minute < (int64_t)at_minutes)
        day--;
    return format_days(day, out);
}

/* ---------------------------------------------------------------------------------------------
 * Due checks (pure).
 */

void tasks_interval_due(const struct tasks_last_run *last, int64_t now_ms, uint64_t interval_ms,
                        uint64_t stale_ms, struct tasks_due *out)
{
    memset(out, 0, sizeof(*out));
    if (!last->found) {
        out->verdict = TASKS_DUE;
        out->next_seq = 1;
        return;
    }
    out->next_seq = last->seq + 1;
    if (last->running) {
        /* Never two runs at once: a running run blocks the next one until it stops beating
         * for stale_ms, which means its worker died (or is cut off and will be refused at
         * its next heartbeat). */
        int64_t quiet = now_ms - last->heartbeat_ms;
        if (quiet >= (int64_t)stale_ms) {
            out->verdict = TASKS_TAKE_OVER;
            return;
        }
        out->verdict = TASKS_NOT_DUE;
        out->due_in_ms = (int64_t)stale_ms - quiet;
        return;
    }
    /* Seed 004: the next run starts max(run time, interval) after the last one started. */
    int64_t due_at = last->started_ms + (int64_t)interval_ms;
    if (now_ms >= due_at) {
        out->verdict = TASKS_DUE;
        return;
    }
    out->verdict = TASKS_NOT_DUE;
    out->due_in_ms = due_at - now_ms;
}

enum tasks_verdict tasks_daily_due(const struct tasks_daily_row *row, int64_t now_ms,
                                   uint64_t retry_ms, uint64_t stale_ms, unsigned max_attempts)
{
    if (!row->found)
        return TASKS_DUE;
    if (row->attempts >= max_attempts)
        return TASKS_NOT_DUE;
    if (row->running)
        return now_ms - row->heartbeat_ms >= (int64_t)stale_ms ? TASKS_TAKE_OVER : TASKS_NOT_DUE;
    if (!row->failed)
        return TASKS_NOT_DUE;
    return now_ms - row->finished_ms >= (int64_t)retry_ms ? TASKS_DUE : TASKS_NOT_DUE;
}

/* ---------------------------------------------------------------------------------------------
 * The orphan rule (pure).
 */

static const char *const orphan_names[] = {
    [ORPHAN_NOT_CAPTURED] = "not_captured",
    [ORPHAN_MATCHED] = "matched",
    [ORPHAN_REFUND] = "refund",
    [ORPHAN_RECONCILE] = "reconcile",
    [ORPHAN_REFUND_IN_PROGRESS] = "refund_in_progress",
    [ORPHAN_NO_ORDER] = "no_order",
    [ORPHAN_AMOUNT_MISMATCH] = "amount_mismatch",
    [ORPHAN_USER_MISMATCH] = "user_mismatch",
    [ORPHAN_DUPLICATE_CHARGE] = "duplicate_charge",
    [ORPHAN_MANUAL_REVIEW] = "manual_review",
    [ORPHAN_REFUND_CONFLICT] = "refund_conflict",
};

const char *tasks_orphan_verdict_name(enum tasks_orphan_verdict v)
{
    return (unsigned)v < sizeof(orphan_names) / sizeof(orphan_names[0]) ? orphan_names[v]
                                                                        : "invalid";
}

static bool is_status(const char *s, const char *want)
{
    return strcmp(s, want) == 0;
}

enum tasks_orphan_verdict tasks_orphan_decide(const struct gateway_payment *p,
                                              const struct store_order_match *order)
{
    /* Only money the PG holds for us can be an orphan: a captured payment, or one partly
     * refunded with a balance left. */
    bool captured = p->status == GATEWAY_TX_SUCCESS ||
                    (p->status == GATEWAY_TX_PARTIALLY_CANCELLED && p->balance_minor > 0);
    if (!captured)
        return ORPHAN_NOT_CAPTURED;
    if (order == NULL)
        return ORPHAN_NO_ORDER;
    /* Anything that does not line up is for a person: an automatic refund on a guess is
     * money moved on a guess. */
    if (p->user_id[0] != '\0' && strcmp(p->user_id, order->user_id) != 0)
        return ORPHAN_USER_MISMATCH;
    if (p->amount_minor != order->amount_minor)
        return ORPHAN_AMOUNT_MISMATCH;
    if (order->payment_key[0] != '\0' && strcmp(order->payment_key, p->transaction_key) != 0)
        return ORPHAN_DUPLICATE_CHARGE;
    if (is_status(order->status, "REFUNDED"))
        /* We recorded a full refund the PG confirmed, yet it reports the money captured. */
        return p->status == GATEWAY_TX_SUCCESS ? ORPHAN_REFUND_CONFLICT : ORPHAN_MATCHED;
    if (is_status(order->status, "COMPLETED") || is_status(order->status, "PARTIALLY_REFUNDED"))
        return ORPHAN_MATCHED;
    if (is_status(order->status, "PENDING"))
        /* The customer paid: the reconcile job completes the order (or, out of stock,
         * refunds it exactly once through its own path). Refunding here would race it. */
        return ORPHAN_RECONCILE;
    if (is_status(order->status, "FAILED") || is_status(order->status, "EXPIRED")) {
        if (order->refund_open)
            return ORPHAN_REFUND_IN_PROGRESS;
        if (is_status(order->payment_status, "REFUNDED") ||
            is_status(order->payment_status, "CANCELLED"))
            return ORPHAN_REFUND_CONFLICT;
        return ORPHAN_REFUND;
    }
    return ORPHAN_MANUAL_REVIEW;
}

/* ---------------------------------------------------------------------------------------------
 * A string -> index hash table (open addressing, linear probing): the orphan sweep joins PG
 * payments to orders by id with it, and the stock sync indexes reservations, in O(1) per
 * lookup instead of nested loops. Keys are borrowed and must outlive the table.
 */
struct smap {
    size_t cap; /* a power of two */
    size_t n;
    const char **keys;
    size_t *vals;
};

static uint64_t fnv1a(const char *s)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (; *s != '\0'; s++) {
        h ^= (unsigned char)*s;
        h *= UINT64_C(1099511628211);
    }
    return h;
}

static int smap_init(struct smap *m, size_t expected)
{
    size_t cap = 16;
    while (cap < expected * 2 + 16)
        cap *= 2;
    memset(m, 0, sizeof(*m));
    m->keys = calloc(cap, sizeof(*m->keys));
    m->vals = calloc(cap, sizeof(*m->vals));
    if (m->keys == NULL || m->vals == NULL) {
        free(m->keys);
        free(m->vals);
        m->keys = NULL;
        m->vals = NULL;
        return SETTLE_ENOMEM;
    }
    m->cap = cap;
    return 0;
}

static void smap_free(struct smap *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof(*m));
}

static bool smap_get(const struct smap *m, const char *key, size_t *val)
{
    if (m->cap == 0)
        return false;
    for (size_t i = fnv1a(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == NULL)
            return false;
        if (strcmp(m->keys[i], key) == 0) {
            if (val != NULL)
                *val = m->vals[i];
            return true;
        }
    }
}

/* Inserts key -> val unless key is there (then the first value stays). 1 inserted, 0 present,
 * SETTLE_ENOMEM. The table grows to stay at most half full. */
static int smap_put(struct smap *m, const char *key, size_t val)
{
    if (smap_get(m, key, NULL))
        return 0;
    if ((m->n + 1) * 2 > m->cap) {
        struct smap bigger;
        if (smap_init(&bigger, m->cap) != 0)
            return SETTLE_ENOMEM;
        for (size_t i = 0; i < m->cap; i++) {
            if (m->keys[i] != NULL)
                smap_put(&bigger, m->keys[i], m->vals[i]);
        }
        smap_free(m);
        *m = bigger;
    }
    size_t i = fnv1a(key) & (m->cap - 1);
    while (m->keys[i] != NULL)
        i = (i + 1) & (m->cap - 1);
    m->keys[i] = key;
    m->vals[i] = val;
    m->n++;
    return 1;
}

/* ---------------------------------------------------------------------------------------------
 * One run.
 */
struct trun {
    const struct tasks_env *env;
    const struct config *cfg;
    const struct tasks_run *run;
    struct tasks_outcome *out;
    json_t *sum;              /* the summary being built */
    struct rconn_sync *redis; /* this run's own connection */
    uint64_t last_beat_ms;    /* monotonic */
    bool stopped;
    char why[STORE_ERR_MAX]; /* the failure, for task_runs.error */
    size_t gw_cap;
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void trun_fail(struct trun *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void trun_fail(struct trun *t, const char *fmt, ...)
{
    if (t->why[0] != '\0')
        return; /* the first cause is the one worth keeping */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->why, sizeof(t->why), fmt, ap);
    va_end(ap);
}

/* One line per decision for `settle run` (stdout), which is how --dry-run shows them. */
static void trun_say(struct trun *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void trun_say(struct trun *t, const char *fmt, ...)
{
    if (t->env->decisions == NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(t->env->decisions, fmt, ap);
    va_end(ap);
    fputc('\n', t->env->decisions);
}

static void sum_int(struct trun *t, const char *key, long long v)
{
    json_object_set_new(t->sum, key, json_integer((json_int_t)v));
}

/*
 * Between steps: false when the run must stop, because the process is shutting down or the
 * run is no longer ours (another worker took it over after our heartbeat went quiet). Also
 * refreshes the heartbeat every quarter of SETTLE_TASK_STALE_MS.
 */
static bool trun_continue(struct trun *t)
{
    if (t->stopped)
        return false;
    if (t->env->cancel != NULL && atomic_load(t->env->cancel) != 0) {
        t->stopped = true;
        trun_fail(t, "interrupted: the process is shutting down (the next run carries on)");
        return false;
    }
    uint64_t now = mono_ms();
    if (now - t->last_beat_ms < t->cfg->task_stale_ms / 4)
        return true;
    t->last_beat_ms = now;
    bool ours = true;
    char err[STORE_ERR_MAX];
    int rc = store_task_heartbeat_work(t->env->store, tasks_name(t->run->task), t->run->period,
                                       t->env->worker_id, &ours, err, sizeof(err));
    if (rc != 0) {
        /* Carry on: if PostgreSQL stays away the run is taken over later, and its end is
         * then refused, which costs a repeat of idempotent work, nothing more. */
        log_write(LOG_LEVEL_WARN, NULL, err[0] != '\0' ? err : settle_strerror(rc),
                  "task %s: could not refresh the run's heartbeat", tasks_name(t->run->task));
        return true;
    }
    if (!ours) {
        t->stopped = true;
        trun_fail(t, "taken over by another worker (no heartbeat for SETTLE_TASK_STALE_MS)");
        return false;
    }
    return true;
}

/* Remembers one PG call for the loop's metrics. */
static void trun_observe(struct trun *t, const char *endpoint, const struct gateway_result *r)
{
    struct tasks_outcome *o = t->out;
    if (o->n_gw >= TASKS_GW_OBS_MAX)
        return;
    if (o->n_gw == t->gw_cap) {
        size_t cap = t->gw_cap > 0 ? t->gw_cap * 2 : 64;
        struct tasks_gw_obs *p = realloc(o->gw, cap * sizeof(*p));
        if (p == NULL)
            return; /* a missed sample, not a reason to stop the run */
        o->gw = p;
        t->gw_cap = cap;
    }
    o->gw[o->n_gw++] =
        (struct tasks_gw_obs){endpoint, gateway_result_class(r), (double)r->latency_us / 1e6};
}

/* A deterministic producer id "<prefix><value>" that always fits JOB_ID_MAX: a value too long
 * keeps its start and gets a hash of the whole, so the same value always yields the same id
 * (which is what deduplicates the enqueue). */
static void derive_id(char out[JOB_ID_MAX + 1], const char *prefix, const char *value)
{
    size_t pl = strlen(prefix), vl = strlen(value);
    if (pl + vl <= JOB_ID_MAX) {
        memcpy(out, prefix, pl);
        memcpy(out + pl, value, vl + 1);
        return;
    }
    snprintf(out, JOB_ID_MAX + 1, "%s%.*s~%016" PRIx64, prefix, (int)(JOB_ID_MAX - pl - 17), value,
             fnv1a(value));
}

/*
 * Pushes a job onto queue with producer id `id` (deduplicated: while a job with that id is
 * queued, delayed or in flight, nothing is pushed). The job is checked with job_decode first,
 * so the sweep never feeds the worker a job it would bury as invalid_job. Returns 1 pushed,
 * 0 duplicate, SETTLE_EINVAL (the job would be invalid: skipped) or a Redis error.
 */
static int trun_enqueue(struct trun *t, const char *queue, json_t *job, const char *id)
{
    enum job_kind kind;
    struct job decoded;
    char why[JOB_WHY_MAX];
    int rc;

    json_object_set_new(job, "id", json_string(id));
    json_object_set_new(job, "enqueued_at_ms", json_integer((json_int_t)wall_ms()));
    char *text = json_dumps(job, JSON_COMPACT);
    if (text == NULL)
        return SETTLE_ENOMEM;
    if (job_kind_parse(queue, &kind) != 0 ||
        job_decode(kind, text, strlen(text), t->cfg->job_max_bytes, &decoded, why, sizeof(why)) !=
            0) {
        log_write(LOG_LEVEL_WARN, NULL, why, "task %s: not enqueueing an invalid %s job %s",
                  tasks_name(t->run->task), queue, id);
        free(text);
        return SETTLE_EINVAL;
    }
    /* EVALSHA queue_enqueue: queue list + dedup key; pushes unless the id is live. */
    rc = queue_sync_enqueue(t->redis, t->cfg->namespace_, queue, text, strlen(text), id);
    free(text);
    return rc;
}

/* A reconcile job {order_id, user_id, transaction_key (when known), id}. */
static int enqueue_reconcile(struct trun *t, const char *order_id, const char *user_id,
                             const char *transaction_key, const char *id)
{
    json_t *job = json_pack("{s:s, s:s}", "order_id", order_id, "user_id", user_id);
    if (job == NULL)
        return SETTLE_ENOMEM;
    if (transaction_key != NULL && transaction_key[0] != '\0')
        json_object_set_new(job, "transaction_key", json_string(transaction_key));
    int rc = trun_enqueue(t, "reconcile", job, id);
    json_decref(job);
    return rc;
}

/* A Redis error ends the run: everything after it would fail the same way. */
static bool redis_broken(struct trun *t, int rc, const char *what)
{
    if (rc >= 0 || rc == SETTLE_EINVAL)
        return false;
    t->stopped = true;
    trun_fail(t, "Redis failed during %s: %s", what, settle_strerror(rc));
    return true;
}

/* ---------------------------------------------------------------------------------------------
 * Stale-order sweep (seed 000): PENDING orders older than SETTLE_SWEEP_MIN_AGE_MS that nobody
 * is re-checking get a reconcile job "sweep:<order>", oldest first, at most SETTLE_SWEEP_LIMIT.
 * "Nobody is re-checking" = next_check_at is NULL or more than a lease in the past: a job that
 * re-checks an order moves next_check_at ahead, and one claimed just now has not yet had a
 * lease's time to do so. The dedup id means a sweep never doubles a sweep job that is still
 * queued, delayed or in flight.
 */
static int task_stale_sweep(struct trun *t)
{
    const struct config *cfg = t->cfg;
    struct store_pending_order *list = NULL;
    size_t n = 0;
    long long enqueued = 0, queued = 0, invalid = 0;
    char err[STORE_ERR_MAX];
    struct store_pending_query q = {.min_age_ms = cfg->sweep_min_age_ms,
                                    .key = STORE_KEY_ANY,
                                    .unwatched_only = true,
                                    .recheck_grace_ms = cfg->lease_ms,
                                    .limit = cfg->sweep_limit};
    /* The stale PENDING orders, oldest first. */
    int rc = store_pending_orders_work(t->env->store, &q, &list, &n, err, sizeof(err));
    if (rc != 0) {
        trun_fail(t, "reading stale orders: %s", err[0] != '\0' ? err : settle_strerror(rc));
        return rc;
    }
    for (size_t i = 0; i < n && trun_continue(t); i++) {
        char id[JOB_ID_MAX + 1];
        derive_id(id, "sweep:", list[i].id);
        if (t->run->dry_run) {
            trun_say(t, "stale_sweep order=%s age_ms=%" PRIu64 " -> would enqueue reconcile %s",
                     list[i].id, list[i].age_ms, id);
            enqueued++;
            continue;
        }
        rc = enqueue_reconcile(t, list[i].id, list[i].user_id, list[i].transaction_key, id);
        if (redis_broken(t, rc, "the stale-order sweep"))
            break;
        if (rc == 1)
            enqueued++;
        else if (rc == 0)
            queued++;
        else
            invalid++;
        trun_say(t, "stale_sweep order=%s age_ms=%" PRIu64 " -> %s %s", list[i].id, list[i].age_ms,
                 rc == 1   ? "enqueued"
                 : rc == 0 ? "already_queued"
                           : "invalid",
                 id);
    }
    sum_int(t, "found", (long long)n);
    sum_int(t, "enqueued", enqueued);
    sum_int(t, "already_queued", queued);
    sum_int(t, "invalid", invalid);
    free(list);
    return t->why[0] != '\0' ? SETTLE_EUNAVAILABLE : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Order expiry (seed 002): orders PENDING for longer than SETTLE_PAYMENT_WINDOW_MS, at most
 * SETTLE_EXPIRY_LIMIT of each kind per run.
 *   No transaction key recorded: ask the PG by order id first, never expire blindly.
 *     404 (the PG has no payment for it): release the Redis reservation (idempotent; a
 *       reservation committed meanwhile is not released and the order is reconciled
 *       instead), then PENDING -> EXPIRED in PostgreSQL, conditional on still PENDING
 *       without a key.
 *     the PG knows a transaction: reconcile job "expiry:<order>" with that key.
 *     transport error, 5xx, 429: left for the next run (after a few in a row the PG is taken
 *       to be down and the rest of the batch waits too).
 *   A transaction key recorded and nobody re-checking the order: reconcile job
 *   "expiry:<order>" (the reconcile pipeline decides, with the PG's answer).
 */
static int task_order_expiry(struct trun *t)
{
    const struct config *cfg = t->cfg;
    struct store_pending_order *list = NULL;
    size_t n = 0;
    long long expired = 0, released = 0, reconcile = 0, queued = 0, moved = 0, pg_down = 0,
              pg_errors = 0, skipped = 0, examined = 0;
    unsigned streak = 0;
    char err[STORE_ERR_MAX];
    int rc;

    struct store_pending_query q = {.min_age_ms = cfg->payment_window_ms,
                                    .key = STORE_KEY_WITHOUT,
                                    .unwatched_only = false,
                                    .limit = cfg->expiry_limit};
    /* Unpaid orders past the payment window without a transaction key, oldest first. */
    rc = store_pending_orders_work(t->env->store, &q, &list, &n, err, sizeof(err));
    if (rc != 0) {
        trun_fail(t, "reading unpaid orders: %s", err[0] != '\0' ? err : settle_strerror(rc));
        return rc;
    }
    for (size_t i = 0; i < n && trun_continue(t); i++) {
        const struct store_pending_order *o = &list[i];
        char id[JOB_ID_MAX + 1];
        struct gateway_result gw;
        if (streak >= EXPIRY_TRANSIENT_STREAK_MAX) {
            pg_down++;
            continue;
        }
        examined++;
        gateway_query_status_work(t->env->gateway, o->user_id, "", o->id, &gw);
        trun_observe(t, "status", &gw);
        derive_id(id, "expiry:", o->id);
        if (gw.outcome == GATEWAY_TRANSIENT) {
            streak++;
            pg_down++;
            trun_say(t, "order_expiry order=%s -> left for the next run (%s)", o->id, gw.error);
            continue;
        }
        streak = 0;
        if (gw.outcome == GATEWAY_OK) {
            /* The PG has a transaction for the order: reconcile it, never expire it. */
            if (t->run->dry_run) {
                trun_say(t, "order_expiry order=%s pg=%s -> would enqueue reconcile %s", o->id,
                         gateway_tx_status_name(gw.tx.status), id);
                reconcile++;
                continue;
            }
            rc = enqueue_reconcile(t, o->id, o->user_id, gw.tx.transaction_key, id);
            if (redis_broken(t, rc, "the order expiry"))
                break;
            reconcile += rc == 1;
            queued += rc == 0;
            trun_say(t, "order_expiry order=%s pg=%s -> %s %s", o->id,
                     gateway_tx_status_name(gw.tx.status),
                     rc == 1 ? "reconcile_enqueued" : "already_queued", id);
            continue;
        }
        if (gw.outcome != GATEWAY_NOT_FOUND) {
            /* A 4xx or an answer we cannot read: a person should look at the PG link; the
             * order stays PENDING rather than be expired on an answer we do not understand. */
            pg_errors++;
            log_write(LOG_LEVEL_WARN, &(struct log_ctx){.order_id = o->id, .attempt = -1}, gw.error,
                      "order expiry: the PG's answer does not allow expiring the order");
            continue;
        }
        if (t->run->dry_run) {
            trun_say(t, "order_expiry order=%s age_ms=%" PRIu64 " pg=404 -> would expire", o->id,
                     o->age_ms);
            expired++;
            continue;
        }
        enum stock_result res = STOCK_MISSING;
        /* EVALSHA stock_release: gives the reservation's units back (idempotent). */
        rc = stock_sync_release(t->redis, t->cfg->namespace_, o->id, &res, err, sizeof(err));
        if (rc == SETTLE_EIO) {
            redis_broken(t, rc, "the order expiry");
            break;
        }
        if (rc != 0) {
            skipped++;
            log_write(LOG_LEVEL_WARN, &(struct log_ctx){.order_id = o->id, .attempt = -1}, err,
                      "order expiry: could not release the reservation; order left PENDING");
            continue;
        }
        if (res == STOCK_NOT_RESERVED) {
            /* Committed: a payment did land (or a callback handler saw one). Reconcile. */
            rc = enqueue_reconcile(t, o->id, o->user_id, "", id);
            if (redis_broken(t, rc, "the order expiry"))
                break;
            reconcile += rc == 1;
            queued += rc == 0;
            trun_say(t, "order_expiry order=%s -> reservation committed; reconcile %s", o->id, id);
            continue;
        }
        released += res == STOCK_RELEASED;
        bool done = false;
        char status[STORE_STATUS_MAX] = "";
        rc = store_expire_order_work(t->env->store, o->id, "payment_window_passed", &done, status,
                                     err, sizeof(err));
        if (rc != 0) {
            /* The reservation is released already; the next run (or the reconcile job)
             * expires the order: both steps are idempotent. */
            trun_fail(t, "expiring order %s: %s", o->id,
                      err[0] != '\0' ? err : settle_strerror(rc));
            break;
        }
        expired += done;
        moved += !done;
        trun_say(t, "order_expiry order=%s age_ms=%" PRIu64 " pg=404 -> %s (reservation %s)", o->id,
                 o->age_ms, done ? "expired" : status, stock_result_name(res));
    }
    free(list);
    list = NULL;
    n = 0;

    if (t->why[0] == '\0' && trun_continue(t)) {
        q.key = STORE_KEY_WITH;
        q.unwatched_only = true;
        q.recheck_grace_ms = cfg->lease_ms;
        /* Orders past the window with a transaction key that nobody re-checks. */
        rc = store_pending_orders_work(t->env->store, &q, &list, &n, err, sizeof(err));
        if (rc != 0)
            trun_fail(t, "reading orders with a payment: %s",
                      err[0] != '\0' ? err : settle_strerror(rc));
        for (size_t i = 0; rc == 0 && i < n && trun_continue(t); i++) {
            char id[JOB_ID_MAX + 1];
            derive_id(id, "expiry:", list[i].id);
            if (t->run->dry_run) {
                trun_say(t, "order_expiry order=%s key=%s -> would enqueue reconcile %s",
                         list[i].id, list[i].transaction_key, id);
                reconcile++;
                continue;
            }
            int erc =
                enqueue_reconcile(t, list[i].id, list[i].user_id, list[i].transaction_key, id);
            if (redis_broken(t, erc, "the order expiry"))
                break;
            reconcile += erc == 1;
            queued += erc == 0;
            trun_say(t, "order_expiry order=%s key=%s -> %s %s", list[i].id,
                     list[i].transaction_key, erc == 1 ? "reconcile_enqueued" : "already_queued",
                     id);
        }
    }
    free(list);
    sum_int(t, "examined", examined);
    sum_int(t, "expired", expired);
    sum_int(t, "released", released);
    sum_int(t, "reconcile_enqueued", reconcile);
    sum_int(t, "already_queued", queued);
    sum_int(t, "already_moved", moved);
    sum_int(t, "pg_unavailable", pg_down);
    sum_int(t, "pg_errors", pg_errors);
    sum_int(t, "skipped", skipped);
    return t->why[0] != '\0' ? SETTLE_EUNAVAILABLE : 0;
}

/* ---------------------------------------------------------------------------------------------
 * PG orphan sweep (seed 004). Lists the PG's payments created in
 * [now - SETTLE_ORPHAN_WINDOW_MS, now - SETTLE_ORPHAN_GRACE_MS): page 0 first (it tells the
 * page count), then the other pages in waves fetched by up to SETTLE_ORPHAN_CONCURRENCY
 * threads at once. Each wave's captured payments are joined to their orders (looked up in
 * batches of at most SETTLE_ORPHAN_LOOKUP_BATCH ids, one `WHERE id = ANY($1)` each) through a
 * hash table, decided by tasks_orphan_decide, acted on, and recorded in orphan_decisions.
 * Memory stays bounded by a wave, whatever the window holds.
 */

/* One page to fetch; written only by the thread that took it. */
struct page_slot {
    int64_t page;
    struct gateway_page pg;
    struct gateway_result res;
    bool fetched;
};

struct fetcher {
    struct trun *t;
    int64_t from_ms, to_ms;
    unsigned size;
    struct page_slot *slots;
    size_t n;
    size_t next; /* under mu */
    pthread_mutex_t mu;
};

static void *fetch_main(void *arg)
{
    struct fetcher *f = arg;
    for (;;) {
        pthread_mutex_lock(&f->mu);
        size_t i = f->next++;
        pthread_mutex_unlock(&f->mu);
        if (i >= f->n)
            break;
        /* A shutdown skips the pages not started yet; they are left for the next run. */
        if (f->t->env->cancel != NULL && atomic_load(f->t->env->cancel) != 0)
            continue;
        struct page_slot *s = &f->slots[i];
        gateway_list_payments_work(f->t->env->gateway, f->from_ms, f->to_ms, s->page, f->size,
                                   &s->pg, &s->res);
        s->fetched = true;
    }
    return NULL;
}

/* Fetches every slot with up to `threads` threads (at least the calling thread). */
static void fetch_pages(struct fetcher *f, unsigned threads)
{
    pthread_t tid[64];
    unsigned started = 0;
    if (threads > f->n)
        threads = (unsigned)f->n;
    if (threads > 64)
        threads = 64;
    f->next = 0;
    /* The calling thread fetches too, so a failed pthread_create only costs parallelism. */
    for (unsigned i = 1; i < threads; i++) {
        if (pthread_create(&tid[started], NULL, fetch_main, f) != 0)
            break;
        started++;
    }
    fetch_main(f);
    for (unsigned i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
}

struct orphan_run {
    struct trun *t;
    long long pages, pages_failed, payments, not_captured, matched, refund_enqueued, already_queued,
        capped, reconcile_enqueued, refund_in_progress, manual, not_refundable, failed;
    long long by_verdict[ORPHAN_REFUND_CONFLICT + 1];
    bool truncated;
};

/* The decision for one payment as recorded (NULL decision: nothing to record). */
struct orphan_act {
    const char *decision;
    char detail[200];
};

/* Carries out a REFUND verdict: within the cap, make sure the order's payment row says
 * SUCCESS for this key (the refund pipeline refunds only that, under its row lock), then
 * enqueue the refund job "orphan:<key>" (whole remaining balance, no restock: the order never
 * took stock). */
static void orphan_refund(struct orphan_run *r, const struct gateway_payment *p,
                          const struct store_order_match *o, struct orphan_act *a)
{
    struct trun *t = r->t;
    char id[JOB_ID_MAX + 1];
    char err[STORE_ERR_MAX];
    derive_id(id, "orphan:", p->transaction_key);
    if (r->refund_enqueued >= (long long)t->cfg->orphan_refund_cap) {
        /* A bad day (a broken order table, a PG bug) must not refund everything at once. */
        r->capped++;
        a->decision = "capped";
        snprintf(a->detail, sizeof(a->detail), "over SETTLE_ORPHAN_REFUND_CAP (%u) this run",
                 t->cfg->orphan_refund_cap);
        return;
    }
    if (t->run->dry_run) {
        r->refund_enqueued++;
        a->decision = "refund_enqueued";
        snprintf(a->detail, sizeof(a->detail), "dry run: would enqueue refund %s", id);
        return;
    }
    if (strcmp(o->payment_status, "SUCCESS") != 0 &&
        strcmp(o->payment_status, "PARTIALLY_REFUNDED") != 0) {
        bool ready = false;
        char why[160];
        /* Records the captured payment on the FAILED/EXPIRED order. */
        int rc =
            store_orphan_payment_work(t->env->store, o->id, p->transaction_key, p->amount_minor,
                                      &ready, why, sizeof(why), err, sizeof(err));
        if (rc != 0 || !ready) {
            r->not_refundable++;
            a->decision = "not_refundable";
            snprintf(a->detail, sizeof(a->detail), "%.190s",
                     rc != 0 ? (err[0] != '\0' ? err : settle_strerror(rc)) : why);
            return;
        }
    }
    json_t *job = json_pack("{s:s, s:s, s:s, s:s}", "order_id", o->id, "user_id", o->user_id,
                            "transaction_key", p->transaction_key, "reason", "orphan_payment");
    int rc = job != NULL ? trun_enqueue(t, "refund", job, id) : SETTLE_ENOMEM;
    json_decref(job);
    if (redis_broken(t, rc, "the orphan sweep") || rc < 0) {
        r->failed++;
        a->decision = "failed";
        snprintf(a->detail, sizeof(a->detail), "enqueue refund %s: %s", id, settle_strerror(rc));
        return;
    }
    if (rc == 1) {
        r->refund_enqueued++;
        a->decision = "refund_enqueued";
    } else {
        r->already_queued++;
        a->decision = "already_queued";
    }
    snprintf(a->detail, sizeof(a->detail), "refund job %s", id);
}

/* Decides and acts on one captured payment. */
static void orphan_one(struct orphan_run *r, const struct gateway_payment *p,
                       const struct store_order_match *o, struct orphan_act *a)
{
    struct trun *t = r->t;
    enum tasks_orphan_verdict v = tasks_orphan_decide(p, o);
    a->decision = NULL;
    a->detail[0] = '\0';
    r->by_verdict[v]++;
    switch (v) {
    case ORPHAN_NOT_CAPTURED:
        r->not_captured++;
        return;
    case ORPHAN_MATCHED:
        r->matched++;
        return;
    case ORPHAN_REFUND:
        orphan_refund(r, p, o, a);
        return;
    case ORPHAN_RECONCILE: {
        char id[JOB_ID_MAX + 1];
        derive_id(id, "orphan:", p->transaction_key);
        if (t->run->dry_run) {
            r->reconcile_enqueued++;
            a->decision = "reconcile_enqueued";
            snprintf(a->detail, sizeof(a->detail), "dry run: would enqueue reconcile %s", id);
            return;
        }
        int rc = enqueue_reconcile(t, o->id, o->user_id, p->transaction_key, id);
        if (redis_broken(t, rc, "the orphan sweep") || rc < 0) {
            r->failed++;
            a->decision = "failed";
            snprintf(a->detail, sizeof(a->detail), "enqueue reconcile %s: %s", id,
                     settle_strerror(rc));
            return;
        }
        r->reconcile_enqueued += rc == 1;
        r->already_queued += rc == 0;
        a->decision = rc == 1 ? "reconcile_enqueued" : "already_queued";
        snprintf(a->detail, sizeof(a->detail), "order PENDING: reconcile job %s", id);
        return;
    }
    case ORPHAN_REFUND_IN_PROGRESS:
        r->refund_in_progress++;
        a->decision = "refund_in_progress";
        snprintf(a->detail, sizeof(a->detail), "the order has a refund that is not FAILED");
        return;
    case ORPHAN_NO_ORDER:
        r->manual++;
        a->decision = "no_order";
        snprintf(a->detail, sizeof(a->detail),
                 "no order %.100s: refund it at the PG by hand (nothing to refund against here)",
                 p->order_id);
        return;
    case ORPHAN_AMOUNT_MISMATCH:
        r->manual++;
        a->decision = "amount_mismatch";
        snprintf(a->detail, sizeof(a->detail), "PG amount %" PRId64 ", order amount %" PRId64,
                 p->amount_minor, o->amount_minor);
        return;
    case ORPHAN_USER_MISMATCH:
        r->manual++;
        a->decision = "user_mismatch";
        snprintf(a->detail, sizeof(a->detail), "PG user %.60s, order user %.60s", p->user_id,
                 o->user_id);
        return;
    case ORPHAN_DUPLICATE_CHARGE:
        r->manual++;
        a->decision = "duplicate_charge";
        snprintf(a->detail, sizeof(a->detail),
                 "the order is paid by transaction %.100s: refund this one by hand",
                 o->payment_key);
        return;
    case ORPHAN_MANUAL_REVIEW:
        r->manual++;
        a->decision = "manual_review";
        snprintf(a->detail, sizeof(a->detail), "order is %s", o->status);
        return;
    case ORPHAN_REFUND_CONFLICT:
        r->manual++;
        a->decision = "refund_conflict";
        snprintf(a->detail, sizeof(a->detail), "order %s, payment %s here; PG says %s", o->status,
                 o->payment_status[0] != '\0' ? o->payment_status : "none",
                 gateway_tx_status_name(p->status));
        return;
    default:
        abort();
    }
}

/* Processes the payments of n fetched pages. */
static int orphan_wave(struct orphan_run *r, struct page_slot *slots, size_t n_slots)
{
    struct trun *t = r->t;
    const struct gateway_payment **cand = NULL;
    const char **ids = NULL;
    struct store_order_match *orders = NULL;
    struct store_orphan_decision *rec = NULL;
    struct orphan_act *acts = NULL;
    struct smap by_id = {0}, id_seen = {0};
    size_t n_cand = 0, n_ids = 0, n_orders = 0, n_rec = 0, total = 0;
    char err[STORE_ERR_MAX];
    int rc = 0;

    for (size_t s = 0; s < n_slots; s++)
        total += slots[s].pg.n;
    r->payments += (long long)total;
    if (total == 0)
        return 0;
    cand = calloc(total, sizeof(*cand));
    ids = calloc(total, sizeof(*ids));
    orders = calloc(total, sizeof(*orders));
    acts = calloc(total, sizeof(*acts));
    rec = calloc(total, sizeof(*rec));
    if (cand == NULL || ids == NULL || orders == NULL || acts == NULL || rec == NULL ||
        smap_init(&id_seen, total) != 0 || smap_init(&by_id, total) != 0) {
        rc = SETTLE_ENOMEM;
        trun_fail(t, "out of memory for a wave of %zu payments", total);
        goto out;
    }
    /* Captured payments only need an order; the unique order ids go to the lookup. */
    for (size_t s = 0; s < n_slots; s++) {
        for (size_t i = 0; i < slots[s].pg.n; i++) {
            const struct gateway_payment *p = &slots[s].pg.items[i];
            if (tasks_orphan_decide(p, NULL) == ORPHAN_NOT_CAPTURED) {
                r->not_captured++;
                r->by_verdict[ORPHAN_NOT_CAPTURED]++;
                trun_say(t, "orphan_sweep key=%s order=%s amount=%" PRId64 " pg=%s -> not_captured",
                         p->transaction_key, p->order_id, p->amount_minor,
                         gateway_tx_status_name(p->status));
                continue;
            }
            cand[n_cand++] = p;
            if (smap_put(&id_seen, p->order_id, n_ids) == 1)
                ids[n_ids++] = p->order_id;
        }
    }
    /* Orders by id, at most SETTLE_ORPHAN_LOOKUP_BATCH ids per statement. */
    for (size_t off = 0; off < n_ids && trun_continue(t); off += t->cfg->orphan_lookup_batch) {
        size_t k = n_ids - off;
        if (k > t->cfg->orphan_lookup_batch)
            k = t->cfg->orphan_lookup_batch;
        size_t found = 0;
        rc = store_orders_lookup_work(t->env->store, ids + off, k, orders + n_orders, &found, err,
                                      sizeof(err));
        if (rc != 0) {
            trun_fail(t, "looking orders up: %s", err[0] != '\0' ? err : settle_strerror(rc));
            goto out;
        }
        n_orders += found;
    }
    if (t->stopped) {
        rc = SETTLE_ESHUTDOWN;
        goto out;
    }
    /* The join: order id -> order, O(1) per payment. */
    for (size_t i = 0; i < n_orders; i++) {
        if (smap_put(&by_id, orders[i].id, i) < 0) {
            rc = SETTLE_ENOMEM;
            trun_fail(t, "out of memory joining orders");
            goto out;
        }
    }
    for (size_t i = 0; i < n_cand; i++) {
        const struct gateway_payment *p = cand[i];
        size_t at;
        const struct store_order_match *o = smap_get(&by_id, p->order_id, &at) ? &orders[at] : NULL;
        if (t->stopped)
            break;
        orphan_one(r, p, o, &acts[i]);
        const char *shown = acts[i].decision != NULL
                                ? acts[i].decision
                                : tasks_orphan_verdict_name(tasks_orphan_decide(p, o));
        trun_say(t,
                 "orphan_sweep key=%s order=%s amount=%" PRId64 " pg=%s order_status=%s -> %s%s%s",
                 p->transaction_key, p->order_id, p->amount_minor,
                 gateway_tx_status_name(p->status), o != NULL ? o->status : "none", shown,
                 acts[i].detail[0] != '\0' ? ": " : "", acts[i].detail);
        if (acts[i].decision == NULL)
            continue;
        rec[n_rec++] = (struct store_orphan_decision){
            .transaction_key = p->transaction_key,
            .order_id = p->order_id,
            .user_id = p->user_id[0] != '\0' ? p->user_id : NULL,
            .amount_minor = p->amount_minor,
            .pg_status = gateway_tx_status_name(p->status),
            .pg_created_ms = p->created_ms,
            .order_status = o != NULL ? o->status : NULL,
            .decision = acts[i].decision,
            .detail = acts[i].detail[0] != '\0' ? acts[i].detail : NULL,
        };
    }
    /* A dry run changes nothing, decisions included. */
    if (!t->run->dry_run && n_rec > 0) {
        rc = store_orphan_decisions_work(t->env->store, t->run->period, rec, n_rec, err,
                                         sizeof(err));
        if (rc != 0)
            trun_fail(t, "recording decisions: %s", err[0] != '\0' ? err : settle_strerror(rc));
    }
out:
    smap_free(&by_id);
    smap_free(&id_seen);
    free(cand);
    free(ids);
    free(orders);
    free(acts);
    free(rec);
    return rc;
}

static int task_orphan_sweep(struct trun *t)
{
    const struct config *cfg = t->cfg;
    struct orphan_run r = {.t = t};
    struct fetcher f = {.t = t, .size = cfg->orphan_page_size};
    struct page_slot *slots = NULL;
    int rc = 0;

    int64_t now = wall_ms();
    f.from_ms = now - (int64_t)cfg->orphan_window_ms;
    f.to_ms = now - (int64_t)cfg->orphan_grace_ms;
    if (f.from_ms < 0)
        f.from_ms = 0;
    pthread_mutex_init(&f.mu, NULL);
    /* A wave is enough pages to fill one order lookup, and at least one page per thread. */
    size_t wave = cfg->orphan_lookup_batch / cfg->orphan_page_size;
    if (wave < cfg->orphan_concurrency)
        wave = cfg->orphan_concurrency;
    if (wave < 1)
        wave = 1;
    slots = calloc(wave, sizeof(*slots));
    if (slots == NULL) {
        trun_fail(t, "out of memory");
        rc = SETTLE_ENOMEM;
        goto out;
    }

    /* Page 0 alone: its totalPages says how many more there are. */
    slots[0].page = 0;
    f.slots = slots;
    f.n = 1;
    fetch_pages(&f, 1);
    trun_observe(t, "list", &slots[0].res);
    r.pages = 1;
    if (slots[0].res.outcome != GATEWAY_OK) {
        trun_fail(t, "listing PG payments: %s", slots[0].res.error);
        rc = SETTLE_EUNAVAILABLE;
        goto out;
    }
    int64_t total_pages = slots[0].pg.total_pages;
    if (total_pages > (int64_t)cfg->orphan_max_pages) {
        /* Oldest first: the newest pages wait for a later run (the window slides, so they
         * are looked at then); the bound protects a run from a PG gone wild. */
        r.truncated = true;
        log_write(LOG_LEVEL_WARN, NULL, NULL,
                  "orphan sweep: the PG lists %" PRId64 " pages; reading the first %u "
                  "(SETTLE_ORPHAN_MAX_PAGES)",
                  total_pages, cfg->orphan_max_pages);
        total_pages = cfg->orphan_max_pages;
    }
    rc = orphan_wave(&r, slots, 1);
    gateway_page_free(&slots[0].pg);
    for (int64_t next = 1; rc == 0 && next < total_pages && trun_continue(t);) {
        size_t n = 0;
        for (; n < wave && next < total_pages; n++, next++) {
            memset(&slots[n], 0, sizeof(slots[n]));
            slots[n].page = next;
        }
        f.n = n;
        fetch_pages(&f, cfg->orphan_concurrency);
        size_t ok = 0;
        for (size_t i = 0; i < n; i++) {
            if (!slots[i].fetched)
                continue;
            r.pages++;
            trun_observe(t, "list", &slots[i].res);
            if (slots[i].res.outcome != GATEWAY_OK) {
                /* Its payments are looked at by the next runs (the window covers each
                 * payment many times over); this run goes on with the others. */
                r.pages_failed++;
                log_write(LOG_LEVEL_WARN, NULL, slots[i].res.error,
                          "orphan sweep: page %" PRId64 " could not be read", slots[i].page);
                continue;
            }
            if (ok != i) {
                /* Move the page down; the old slot must not keep the items it no longer
                 * owns. */
                slots[ok] = slots[i];
                memset(&slots[i].pg, 0, sizeof(slots[i].pg));
            }
            ok++;
        }
        rc = orphan_wave(&r, slots, ok);
        for (size_t i = 0; i < ok; i++)
            gateway_page_free(&slots[i].pg);
    }
out:
    if (r.manual > 0)
        log_write(LOG_LEVEL_WARN, NULL, NULL,
                  "orphan sweep: %lld captured PG payment(s) need a person (see orphan_decisions, "
                  "period %s)",
                  r.manual, t->run->period);
    json_t *window =
        json_pack("{s:I, s:I}", "from_ms", (json_int_t)f.from_ms, "to_ms", (json_int_t)f.to_ms);
    json_object_set_new(t->sum, "window", window);
    sum_int(t, "pages", r.pages);
    sum_int(t, "pages_failed", r.pages_failed);
    json_object_set_new(t->sum, "truncated", json_boolean(r.truncated));
    sum_int(t, "payments", r.payments);
    sum_int(t, "not_captured", r.not_captured);
    sum_int(t, "matched", r.matched);
    sum_int(t, "refund_enqueued", r.refund_enqueued);
    sum_int(t, "already_queued", r.already_queued);
    sum_int(t, "capped", r.capped);
    sum_int(t, "reconcile_enqueued", r.reconcile_enqueued);
    sum_int(t, "refund_in_progress", r.refund_in_progress);
    sum_int(t, "not_refundable", r.not_refundable);
    sum_int(t, "needs_person", r.manual);
    sum_int(t, "failed", r.failed);
    json_t *by = json_object();
    for (int v = 0; v <= ORPHAN_REFUND_CONFLICT; v++) {
        if (r.by_verdict[v] > 0)
            json_object_set_new(by, tasks_orphan_verdict_name((enum tasks_orphan_verdict)v),
                                json_integer((json_int_t)r.by_verdict[v]));
    }
    json_object_set_new(t->sum, "verdicts", by);
    if (slots != NULL) {
        for (size_t i = 0; i < wave; i++)
            gateway_page_free(&slots[i].pg);
    }
    free(slots);
    pthread_mutex_destroy(&f.mu);
    if (rc == 0 && t->why[0] != '\0')
        rc = SETTLE_EUNAVAILABLE;
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Nightly stock sync (seed 002). For every SKU, in batches of SETTLE_STOCK_SYNC_BATCH: Redis
 * available must equal PostgreSQL on hand - units of reservations in state reserved - units of
 * sales committed in Redis that PostgreSQL has not applied yet. The comparison and the repair
 * of a batch happen inside one Lua call (lua/stock_sync.lua), given on hand from one
 * PostgreSQL snapshot: the script reads the reservations itself and refuses to act if the
 * deadline set holds a reservation we did not read (one made meanwhile), so a reservation
 * landing between our reads can never be counted wrong; we read again and retry. Each
 * mismatch is recorded in stock_mismatches; more than SETTLE_STOCK_ALERT_THRESHOLD raise one
 * alert (an error log line, an entry on the bounded stream {ns}:alerts, and
 * settle_stock_sync_mismatches_total, which the loop adds after the run).
 * A restock in flight (Redis first, PostgreSQL a moment later) can make the sync set a SKU a
 * few units low until the next sync: it errs towards under-selling, never overselling.
 */

/* A reservation of the deadline set and the SKUs it holds (a reservation's SKUs never
 * change after it is made). */
struct resv {
    char *id;
    char **skus;
    unsigned n_skus;
    unsigned gen; /* the read that last saw it in the deadline set */
};

struct resv_set {
    struct resv *v;
    size_t n, cap;
    struct smap idx; /* id -> index in v */
    size_t *members; /* indexes in v of the current deadline set */
    size_t n_members, members_cap;
    unsigned gen;
};

static void resv_set_free(struct resv_set *rs)
{
    for (size_t i = 0; i < rs->n; i++) {
        for (unsigned k = 0; k < rs->v[i].n_skus; k++)
            free(rs->v[i].skus[k]);
        free(rs->v[i].skus);
        free(rs->v[i].id);
    }
    free(rs->v);
    free(rs->members);
    smap_free(&rs->idx);
    memset(rs, 0, sizeof(*rs));
}

/* "{ns}:<suffix><value>" into a fresh buffer; NULL when out of memory or too long. */
static char *make_key(const char *ns, const char *suffix, const char *value, size_t *len)
{
    size_t n = strlen(ns) + strlen(suffix) + strlen(value) + 8;
    char *tail = malloc(n);
    char *key = malloc(n);
    int klen = -1;
    if (tail != NULL && key != NULL) {
        snprintf(tail, n, "%s%s", suffix, value);
        klen = rconn_key(key, n, ns, tail);
    }
    free(tail);
    if (klen < 0) {
        free(key);
        return NULL;
    }
    if (len != NULL)
        *len = (size_t)klen;
    return key;
}

/* Reads one reservation's SKUs (HGETALL) into a new entry of rs. */
static int resv_load(struct trun *t, struct resv_set *rs, const char *id, size_t id_len, size_t *at)
{
    struct resv r = {0};
    struct rconn_reply *reply = NULL;
    int rc = 0;

    r.id = malloc(id_len + 1);
    if (r.id == NULL)
        return SETTLE_ENOMEM;
    memcpy(r.id, id, id_len);
    r.id[id_len] = '\0';
    size_t klen;
    char *key = make_key(t->cfg->namespace_, "resv:", r.id, &klen);
    if (key == NULL) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    const char *argv[2] = {"HGETALL", key};
    size_t lens[2] = {7, klen};
    /* HGETALL {ns}:resv:<order>: its sku:<sku> fields. */
    rc = rconn_sync_command(t->redis, &reply, 2, argv, lens);
    free(key);
    if (rc != 0)
        goto out;
    if (rconn_reply_type(reply) != RCONN_ARRAY) {
        rc = SETTLE_EPARSE;
        goto out;
    }
    size_t n = rconn_reply_elements(reply);
    r.skus = calloc(n / 2 + 1, sizeof(*r.skus));
    if (r.skus == NULL) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i + 1 < n; i += 2) {
        size_t fl;
        const char *f = rconn_reply_str(rconn_reply_element(reply, i), &fl);
        if (fl <= 4 || memcmp(f, "sku:", 4) != 0)
            continue;
        char *sku = malloc(fl - 3);
        if (sku == NULL) {
            rc = SETTLE_ENOMEM;
            goto out;
        }
        memcpy(sku, f + 4, fl - 4);
        sku[fl - 4] = '\0';
        r.skus[r.n_skus++] = sku;
    }
    if (rs->n == rs->cap) {
        size_t cap = rs->cap > 0 ? rs->cap * 2 : 256;
        struct resv *v = realloc(rs->v, cap * sizeof(*v));
        if (v == NULL) {
            rc = SETTLE_ENOMEM;
            goto out;
        }
        rs->v = v;
        rs->cap = cap;
    }
    rs->v[rs->n] = r;
    if (smap_put(&rs->idx, rs->v[rs->n].id, rs->n) < 0) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    memset(&r, 0, sizeof(r));
    *at = rs->n++;
out:
    rconn_sync_free(reply);
    for (unsigned k = 0; k < r.n_skus; k++)
        free(r.skus[k]);
    free(r.skus);
    free(r.id);
    return rc;
}

/* (Re)reads the deadline set: every live reservation, loading the SKUs of new ones. */
static int resv_read(struct trun *t, struct resv_set *rs)
{
    char *key = make_key(t->cfg->namespace_, "resv:", "deadlines", NULL);
    struct rconn_reply *reply = NULL;
    int rc = 0;

    if (key == NULL)
        return SETTLE_ENOMEM;
    if (rs->idx.cap == 0 && smap_init(&rs->idx, 1024) != 0) {
        free(key);
        return SETTLE_ENOMEM;
    }
    rs->gen++;
    rs->n_members = 0;
    for (long long start = 0; start < STOCK_RESV_MAX; start += STOCK_RESV_PAGE) {
        char a_start[24], a_stop[24];
        snprintf(a_start, sizeof(a_start), "%lld", start);
        snprintf(a_stop, sizeof(a_stop), "%lld", start + STOCK_RESV_PAGE - 1);
        const char *argv[4] = {"ZRANGE", key, a_start, a_stop};
        /* ZRANGE {ns}:resv:deadlines start stop: one page of live reservations. */
        rc = rconn_sync_command(t->redis, &reply, 4, argv, NULL);
        if (rc != 0)
            break;
        if (rconn_reply_type(reply) != RCONN_ARRAY) {
            rc = SETTLE_EPARSE;
            break;
        }
        size_t n = rconn_reply_elements(reply);
        for (size_t i = 0; i < n && rc == 0; i++) {
            size_t len, at;
            const char *id = rconn_reply_str(rconn_reply_element(reply, i), &len);
            char buf[1024];
            /* Every member must be passed to the script, or it reports the set changed on
             * every try; only an absurd id (no producer makes one) is left out. */
            if (len == 0 || len >= sizeof(buf))
                continue;
            memcpy(buf, id, len);
            buf[len] = '\0';
            if (!smap_get(&rs->idx, buf, &at))
                rc = resv_load(t, rs, buf, len, &at);
            if (rc != 0 || rs->v[at].gen == rs->gen)
                continue; /* the set moved between pages: listed twice */
            rs->v[at].gen = rs->gen;
            if (rs->n_members == rs->members_cap) {
                size_t cap = rs->members_cap > 0 ? rs->members_cap * 2 : 256;
                size_t *m = realloc(rs->members, cap * sizeof(*m));
                if (m == NULL) {
                    rc = SETTLE_ENOMEM;
                    break;
                }
                rs->members = m;
                rs->members_cap = cap;
            }
            rs->members[rs->n_members++] = at;
        }
        rconn_sync_free(reply);
        reply = NULL;
        if (rc != 0 || n < STOCK_RESV_PAGE)
            break;
    }
    rconn_sync_free(reply);
    free(key);
    return rc;
}

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

struct stock_run {
    struct trun *t;
    struct resv_set rs;
    long long skus, batches, mismatches, repaired, clamped, busy;
};

/* Builds and runs the script for one batch. 1 done, 0 the reservations changed (read again),
 * or an error. Mismatches are appended to mm (room for n). */
static int stock_batch_eval(struct stock_run *sr, const struct store_product *rows, size_t n,
                            const struct store_unapplied_item *items, size_t n_items,
                            struct store_stock_mismatch *mm, size_t *n_mm)
{
    struct trun *t = sr->t;
    const char *ns = t->cfg->namespace_;
    const char **sorted = NULL, **argv = NULL;
    size_t *lens = NULL;
    char **owned = NULL; /* keys this call allocated */
    char(*on_hand)[24] = NULL;
    const char **orders = NULL;
    bool *pending = NULL;
    struct smap in_keys = {0};
    struct rconn_reply *reply = NULL;
    size_t m = 0, n_owned = 0;
    int rc = 0;

    size_t max_m = n_items + sr->rs.n_members;
    sorted = calloc(n + 1, sizeof(*sorted));
    orders = calloc(max_m + 1, sizeof(*orders));
    pending = calloc(max_m + 1, sizeof(*pending));
    on_hand = calloc(n + 1, sizeof(*on_hand));
    if (sorted == NULL || orders == NULL || pending == NULL || on_hand == NULL ||
        smap_init(&in_keys, max_m) != 0) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        sorted[i] = rows[i].sku;
    qsort(sorted, n, sizeof(*sorted), cmp_str_ptr);
    /* Orders PostgreSQL has not applied hold units a committed reservation took. */
    for (size_t i = 0; i < n_items; i++) {
        if (smap_put(&in_keys, items[i].order_id, m) == 1) {
            orders[m] = items[i].order_id;
            pending[m++] = true;
        }
    }
    /* Live reservations that hold one of these SKUs. */
    for (size_t k = 0; k < sr->rs.n_members; k++) {
        const struct resv *r = &sr->rs.v[sr->rs.members[k]];
        bool hit = false;
        for (unsigned s = 0; s < r->n_skus && !hit; s++)
            hit = bsearch(&r->skus[s], sorted, n, sizeof(*sorted), cmp_str_ptr) != NULL;
        if (hit && smap_put(&in_keys, r->id, m) == 1) {
            orders[m] = r->id;
            pending[m++] = false;
        }
    }
    size_t others = 0;
    for (size_t k = 0; k < sr->rs.n_members; k++)
        others += !smap_get(&in_keys, sr->rs.v[sr->rs.members[k]].id, NULL);

    size_t nkeys = 1 + n + m;
    size_t argc = nkeys + 3 + 2 * n + 2 * m + others;
    argv = calloc(argc, sizeof(*argv));
    lens = calloc(argc, sizeof(*lens));
    owned = calloc(nkeys, sizeof(*owned));
    if (argv == NULL || lens == NULL || owned == NULL) {
        rc = SETTLE_ENOMEM;
        goto out;
    }
    size_t a = 0;
#define PUSH_KEY(suffix, value)                                                                    \
    do {                                                                                           \
        owned[n_owned] = make_key(ns, (suffix), (value), &lens[a]);                                \
        if (owned[n_owned] == NULL) {                                                              \
            rc = SETTLE_ENOMEM;                                                                    \
            goto out;                                                                              \
        }                                                                                          \
        argv[a++] = owned[n_owned++];                                                              \
    } while (0)
#define PUSH_ARG(s)                                                                                \
    do {                                                                                           \
        argv[a] = (s);                                                                             \
        lens[a] = strlen(argv[a]);                                                                 \
        a++;                                                                                       \
    } while (0)
    PUSH_KEY("resv:", "deadlines");
    for (size_t i = 0; i < n; i++)
        PUSH_KEY("stock:", rows[i].sku);
    for (size_t j = 0; j < m; j++)
        PUSH_KEY("resv:", orders[j]);
    char a_n[24], a_m[24];
    snprintf(a_n, sizeof(a_n), "%zu", n);
    snprintf(a_m, sizeof(a_m), "%zu", m);
    PUSH_ARG(a_n);
    PUSH_ARG(a_m);
    PUSH_ARG(t->run->dry_run ? "1" : "0");
    for (size_t i = 0; i < n; i++)
        PUSH_ARG(rows[i].sku);
    for (size_t i = 0; i < n; i++) {
        snprintf(on_hand[i], sizeof(on_hand[i]), "%" PRId64,
                 rows[i].on_hand < 0 ? 0 : rows[i].on_hand);
        PUSH_ARG(on_hand[i]);
    }
    for (size_t j = 0; j < m; j++)
        PUSH_ARG(orders[j]);
    for (size_t j = 0; j < m; j++)
        PUSH_ARG(pending[j] ? "1" : "0");
    for (size_t k = 0; k < sr->rs.n_members; k++) {
        const char *id = sr->rs.v[sr->rs.members[k]].id;
        if (!smap_get(&in_keys, id, NULL))
            PUSH_ARG(id);
    }
#undef PUSH_KEY
#undef PUSH_ARG
    /* EVALSHA stock_sync: compare and (unless dry) repair the batch in one atomic step. */
    rc = rconn_sync_eval(t->redis, &reply, "stock_sync", (int)nkeys, (int)a, argv, lens);
    if (rc != 0)
        goto out;
    if (rconn_reply_type(reply) == RCONN_ERROR) {
        size_t el;
        const char *e = rconn_reply_str(reply, &el);
        trun_fail(t, "stock_sync script refused the batch: %.*s", (int)(el > 200 ? 200 : el), e);
        rc = SETTLE_EREJECTED;
        goto out;
    }
    size_t ne = rconn_reply_elements(reply);
    size_t l0;
    const char *head = ne > 0 ? rconn_reply_str(rconn_reply_element(reply, 0), &l0) : "";
    if (rconn_reply_type(reply) == RCONN_ARRAY && ne == 2 && strcmp(head, "changed") == 0) {
        rc = 0; /* a reservation appeared since we read the set */
        goto out;
    }
    if (rconn_reply_type(reply) != RCONN_ARRAY || strcmp(head, "ok") != 0 || ne != 1 + 7 * n) {
        trun_fail(t, "stock_sync script answered something unexpected");
        rc = SETTLE_EPARSE;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        size_t bl;
        const char *before = rconn_reply_str(rconn_reply_element(reply, 1 + 7 * i + 1), &bl);
        long long reserved = rconn_reply_as_ll(rconn_reply_element(reply, 1 + 7 * i + 2), 0);
        long long unapplied = rconn_reply_as_ll(rconn_reply_element(reply, 1 + 7 * i + 3), 0);
        long long target = rconn_reply_as_ll(rconn_reply_element(reply, 1 + 7 * i + 4), 0);
        long long changed = rconn_reply_as_ll(rconn_reply_element(reply, 1 + 7 * i + 5), 0);
        long long clamped = rconn_reply_as_ll(rconn_reply_element(reply, 1 + 7 * i + 6), 0);
        long long before_v =
            bl > 0 ? rconn_reply_as_ll(rconn_reply_element(reply, 1 + 7 * i + 1), -1) : -1;
        sr->clamped += clamped;
        if (!changed)
            continue;
        sr->mismatches++;
        sr->repaired += !t->run->dry_run;
        mm[*n_mm] = (struct store_stock_mismatch){.sku = rows[i].sku,
                                                  .pg_on_hand = rows[i].on_hand,
                                                  .reserved = reserved,
                                                  .unapplied = unapplied,
                                                  .redis_before = before_v,
                                                  .redis_after = target,
                                                  .repaired = !t->run->dry_run};
        (*n_mm)++;
        trun_say(t,
                 "stock_sync sku=%s on_hand=%" PRId64 " reserved=%lld unapplied=%lld redis=%.*s "
                 "-> %lld%s%s",
                 rows[i].sku, rows[i].on_hand, reserved, unapplied, bl > 0 ? (int)bl : 7,
                 bl > 0 ? before : "missing", target,
                 t->run->dry_run ? " (would repair)" : " (repaired)",
                 clamped ? " (clamped: more reserved than on hand)" : "");
    }
    rc = 1;
out:
    rconn_sync_free(reply);
    for (size_t i = 0; i < n_owned; i++)
        free(owned[i]);
    free(owned);
    free(argv);
    free(lens);
    free(sorted);
    free(orders);
    free(pending);
    free(on_hand);
    smap_free(&in_keys);
    return rc;
}

/* XADD {ns}:alerts MAXLEN ~ 10000 * type stock_sync_mismatch ...: one entry per run. */
static int stock_alert(struct trun *t, long long mismatches)
{
    char count[24], threshold[24];
    struct rconn_reply *reply = NULL;
    char *key = make_key(t->cfg->namespace_, "alerts", "", NULL);
    if (key == NULL)
        return SETTLE_ENOMEM;
    snprintf(count, sizeof(count), "%lld", mismatches);
    snprintf(threshold, sizeof(threshold), "%u", t->cfg->stock_alert_threshold);
    const char *argv[] = {"XADD",        key,
                          "MAXLEN",      "~",
                          ALERTS_MAXLEN, "*",
                          "type",        "stock_sync_mismatch",
                          "count",       count,
                          "threshold",   threshold,
                          "period",      t->run->period,
                          "worker",      t->env->worker_id};
    /* XADD to the bounded alerts stream (MAXLEN ~: trimmed in whole nodes, about 10000
     * entries kept; alerts are for people and dashboards, not a durable record). */
    int rc =
        rconn_sync_command(t->redis, &reply, (int)(sizeof(argv) / sizeof(argv[0])), argv, NULL);
    if (rc == 0 && rconn_reply_type(reply) != RCONN_STRING)
        rc = SETTLE_EREJECTED;
    rconn_sync_free(reply);
    free(key);
    return rc;
}

static int task_stock_sync(struct trun *t)
{
    const struct config *cfg = t->cfg;
    struct stock_run sr = {.t = t};
    struct store_product *rows = calloc(cfg->stock_sync_batch, sizeof(*rows));
    struct store_stock_mismatch *mm = calloc(cfg->stock_sync_batch, sizeof(*mm));
    char after[STORE_SKU_MAX + 1] = "";
    char err[STORE_ERR_MAX];
    int rc = 0;

    if (rows == NULL || mm == NULL) {
        trun_fail(t, "out of memory");
        rc = SETTLE_ENOMEM;
        goto out;
    }
    rc = resv_read(t, &sr.rs);
    if (rc != 0) {
        trun_fail(t, "reading reservations from Redis: %s", settle_strerror(rc));
        goto out;
    }
    /* Bounded: each batch moves `after` forward through a finite, ordered key space. */
    while (trun_continue(t)) {
        struct store_unapplied_item *items = NULL;
        size_t nr = 0, ni = 0, n_mm = 0;
        /* One snapshot: the next batch of SKUs with on hand, and unapplied sales. */
        rc = store_stock_batch_work(t->env->store, after, cfg->stock_sync_batch, rows, &nr, &items,
                                    &ni, err, sizeof(err));
        if (rc != 0) {
            trun_fail(t, "reading products: %s", err[0] != '\0' ? err : settle_strerror(rc));
            break;
        }
        if (nr == 0) {
            free(items);
            break;
        }
        sr.batches++;
        sr.skus += (long long)nr;
        int done = 0;
        for (int tries = 0; tries < STOCK_BATCH_TRIES && done == 0; tries++) {
            if (tries > 0 && (rc = resv_read(t, &sr.rs)) != 0)
                break;
            n_mm = 0;
            done = stock_batch_eval(&sr, rows, nr, items, ni, mm, &n_mm);
            if (done < 0)
                rc = done;
            if (done < 0)
                break;
        }
        free(items);
        if (rc != 0) {
            trun_fail(t, "stock sync batch after \"%s\": %s", after, settle_strerror(rc));
            break;
        }
        if (done == 0) {
            /* Reservations kept changing under us: leave this batch for the next run rather
             * than write a number that might already be wrong. */
            sr.busy++;
            log_write(LOG_LEVEL_WARN, NULL, NULL,
                      "stock sync: reservations kept changing; %zu SKU(s) after \"%s\" left for "
                      "the next run",
                      nr, after);
        }
        if (n_mm > 0 && !t->run->dry_run) {
            rc = store_stock_mismatches_work(t->env->store, t->run->period, mm, n_mm, err,
                                             sizeof(err));
            if (rc != 0) {
                trun_fail(t, "recording mismatches: %s",
                          err[0] != '\0' ? err : settle_strerror(rc));
                break;
            }
        }
        snprintf(after, sizeof(after), "%s", rows[nr - 1].sku);
        if (nr < cfg->stock_sync_batch)
            break;
    }
out:;
    bool alert = sr.mismatches > (long long)cfg->stock_alert_threshold;
    if (alert && t->run->dry_run) {
        trun_say(t, "stock_sync -> would raise one alert: %lld SKUs disagree (threshold %u)",
                 sr.mismatches, cfg->stock_alert_threshold);
    } else if (alert) {
        log_write(LOG_LEVEL_ERROR, NULL, NULL,
                  "stock sync alert: %lld SKU(s) disagreed between Redis and PostgreSQL "
                  "(threshold %u, period %s); Redis was repaired from PostgreSQL, see "
                  "stock_mismatches",
                  sr.mismatches, cfg->stock_alert_threshold, t->run->period);
        int arc = stock_alert(t, sr.mismatches);
        if (arc != 0)
            log_write(LOG_LEVEL_WARN, NULL, settle_strerror(arc),
                      "stock sync: could not add the alert to the alerts stream");
    }
    if (!t->run->dry_run)
        t->out->stock_mismatches = (unsigned)(sr.mismatches > 0 ? sr.mismatches : 0);
    sum_int(t, "skus", sr.skus);
    sum_int(t, "batches", sr.batches);
    sum_int(t, "reservations", (long long)sr.rs.n_members);
    sum_int(t, "mismatches", sr.mismatches);
    sum_int(t, "repaired", sr.repaired);
    sum_int(t, "clamped", sr.clamped);
    sum_int(t, "busy_batches", sr.busy);
    json_object_set_new(t->sum, "alert", json_boolean(alert));
    resv_set_free(&sr.rs);
    free(rows);
    free(mm);
    if (rc == 0 && t->why[0] != '\0')
        rc = SETTLE_EUNAVAILABLE;
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Daily statistics (seed 002): the day before the run's period (UTC), or --date. Written once
 * per date (ON CONFLICT DO NOTHING), so a second run for the same date changes nothing;
 * --force recomputes it.
 */

/*
 * A scheduled run first writes the days no run covered (every worker down across a
 * SETTLE_DAILY_STATS_AT): those after the latest day with a row and before `date`, at most
 * TASKS_BACKFILL_DAYS of them (the most recent). With no row at all there is nothing to catch
 * up on: a new installation starts with yesterday. Each day is written like the day itself,
 * once, so a back-fill that races another or is repeated changes nothing.
 */
static int daily_stats_backfill(struct trun *t, const char *date)
{
    char last[TASKS_DATE_LEN], day[TASKS_DATE_LEN], first[TASKS_DATE_LEN];
    char err[STORE_ERR_MAX];
    bool found = false;
    json_t *filled = json_array();
    int rc;

    if (filled == NULL)
        return SETTLE_ENOMEM;
    json_object_set_new(t->sum, "backfilled", filled);
    rc = store_daily_stats_last_work(t->env->store, date, last, &found, err, sizeof(err));
    if (rc != 0) {
        trun_fail(t, "daily statistics before %s: %s", date,
                  err[0] != '\0' ? err : settle_strerror(rc));
        return rc;
    }
    if (!found)
        return 0;
    rc = tasks_date_shift(last, 1, day);
    if (rc == 0)
        rc = tasks_date_shift(date, -TASKS_BACKFILL_DAYS, first);
    if (rc != 0) {
        trun_fail(t, "no day after %s", last);
        return rc;
    }
    if (strcmp(day, first) < 0)
        memcpy(day, first, sizeof(day));
    /* ISO dates order as text; bounded by TASKS_BACKFILL_DAYS days either way. */
    for (int i = 0; i < TASKS_BACKFILL_DAYS && strcmp(day, date) < 0 && trun_continue(t); i++) {
        struct store_daily_stats st;
        bool written = false;
        rc = store_daily_stats_work(t->env->store, day, false, t->run->dry_run, t->run->period, &st,
                                    &written, err, sizeof(err));
        if (rc != 0) {
            trun_fail(t, "daily statistics of %s (back-fill): %s", day,
                      err[0] != '\0' ? err : settle_strerror(rc));
            return rc;
        }
        if (written) {
            json_array_append_new(filled, json_string(day));
            trun_say(t,
                     "daily_stats back-fill date=%s created=%" PRId64 " completed=%" PRId64
                     " revenue=%" PRId64 " -> %s",
                     day, st.orders_created, st.orders_completed, st.revenue_minor,
                     t->run->dry_run ? "would write" : "written");
        }
        rc = tasks_date_shift(day, 1, day);
        if (rc != 0)
            return rc;
    }
    /* Stopped between days: the run is recorded failed and the next one carries on. */
    return t->why[0] != '\0' ? SETTLE_EUNAVAILABLE : 0;
}

static int task_daily_stats(struct trun *t)
{
    char date[TASKS_DATE_LEN];
    struct store_daily_stats st;
    bool written = false;
    char err[STORE_ERR_MAX];
    int rc;

    if (t->run->date[0] != '\0') {
        snprintf(date, sizeof(date), "%s", t->run->date);
    } else if (!t->run->manual && tasks_date_valid(t->run->period)) {
        rc = tasks_date_shift(t->run->period, -1, date);
        if (rc != 0) {
            trun_fail(t, "no day before period %s", t->run->period);
            return rc;
        }
        rc = daily_stats_backfill(t, date);
        if (rc != 0)
            return rc;
    } else {
        char today[TASKS_DATE_LEN];
        rc = tasks_daily_period(wall_ms(), 0, today);
        if (rc == 0)
            rc = tasks_date_shift(today, -1, date);
        if (rc != 0) {
            trun_fail(t, "the clock is out of range");
            return rc;
        }
    }
    /* Computes the day and writes its row once (or recomputes it with --force). */
    rc = store_daily_stats_work(t->env->store, date, t->run->force, t->run->dry_run, t->run->period,
                                &st, &written, err, sizeof(err));
    if (rc != 0) {
        trun_fail(t, "daily statistics of %s: %s", date,
                  err[0] != '\0' ? err : settle_strerror(rc));
        return rc;
    }
    json_object_set_new(t->sum, "date", json_string(st.date));
    json_object_set_new(t->sum, "written", json_boolean(written));
    json_object_set_new(t->sum, "already_recorded", json_boolean(!written));
    sum_int(t, "orders_created", st.orders_created);
    sum_int(t, "orders_completed", st.orders_completed);
    sum_int(t, "revenue_minor", st.revenue_minor);
    sum_int(t, "avg_order_minor", st.avg_order_minor);
    sum_int(t, "orders_cancelled", st.orders_cancelled);
    sum_int(t, "orders_expired", st.orders_expired);
    sum_int(t, "orders_failed", st.orders_failed);
    sum_int(t, "refunds_count", st.refunds_count);
    sum_int(t, "refunded_minor", st.refunded_minor);
    json_object_set_new(t->sum, "computed_by", json_string(st.computed_by));
    trun_say(t,
             "daily_stats date=%s created=%" PRId64 " completed=%" PRId64 " revenue=%" PRId64
             " avg=%" PRId64 " cancelled=%" PRId64 " expired=%" PRId64 " failed=%" PRId64
             " refunded=%" PRId64 " -> %s",
             st.date, st.orders_created, st.orders_completed, st.revenue_minor, st.avg_order_minor,
             st.orders_cancelled, st.orders_expired, st.orders_failed, st.refunded_minor,
             written ? (t->run->dry_run ? "would write" : "written")
                     : "already recorded (--force recomputes)");
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Claims and execution.
 */

void tasks_outcome_free(struct tasks_outcome *o)
{
    if (o == NULL)
        return;
    free(o->summary);
    free(o->gw);
    memset(o, 0, sizeof(*o));
}

static uint64_t interval_of(const struct config *cfg, enum tasks_id id)
{
    switch (id) {
    case TASK_STALE_SWEEP:
        return cfg->sweep_interval_ms;
    case TASK_ORDER_EXPIRY:
        return cfg->expiry_interval_ms;
    case TASK_ORPHAN_SWEEP:
        return cfg->orphan_interval_ms;
    case TASK_STOCK_SYNC:
    case TASK_DAILY_STATS:
    case TASK_COUNT:
    default:
        abort();
    }
}

static void run_init(struct tasks_run *run, enum tasks_id id, const char *period)
{
    memset(run, 0, sizeof(*run));
    run->task = id;
    snprintf(run->period, sizeof(run->period), "%s", period);
}

/* The period each task's due check reads: "" (its latest run) for interval tasks, the date
 * of the most recent scheduled time of day for daily ones. */
static int check_period(void *arg, int64_t now_ms, size_t i, char *period)
{
    const struct config *cfg = arg;
    enum tasks_id id = (enum tasks_id)i;
    if (!tasks_is_daily(id)) {
        period[0] = '\0';
        return 0;
    }
    unsigned at = id == TASK_STOCK_SYNC ? cfg->stock_sync_at_min : cfg->daily_stats_at_min;
    return tasks_daily_period(now_ms, at, period);
}

int tasks_check_work(const struct tasks_env *env, struct tasks_run *run)
{
    const struct config *cfg = env->cfg;
    const char *names[TASK_COUNT];
    struct store_task_row rows[TASK_COUNT];
    char err[STORE_ERR_MAX] = "";
    int64_t now = 0;
    int rc;

    for (unsigned i = 0; i < TASK_COUNT; i++)
        names[i] = tasks_name((enum tasks_id)i);
    /* One short read: PostgreSQL's now() and every task's latest / current-period run. */
    rc = store_task_states_work(env->store, TASK_COUNT, names, check_period, (void *)cfg, rows,
                                &now, err, sizeof(err));
    if (rc != 0)
        goto fail;
    for (unsigned i = 0; i < TASK_COUNT; i++) {
        enum tasks_id id = (enum tasks_id)i;
        const struct store_task_row *row = &rows[i];
        struct store_task_claim c = {.task = names[i],
                                     .worker = env->worker_id,
                                     .stale_ms = cfg->task_stale_ms,
                                     .retry_ms = cfg->task_retry_ms,
                                     .max_attempts = cfg->task_max_attempts};
        bool claimed = false, took_over = false;
        char period[STORE_PERIOD_MAX + 1];
        enum tasks_verdict verdict;

        if (!tasks_is_daily(id)) {
            struct tasks_last_run last = {.found = row->found,
                                          .seq = row->seq,
                                          .running = strcmp(row->status, "running") == 0,
                                          .started_ms = row->started_ms,
                                          .heartbeat_ms = row->heartbeat_ms};
            struct tasks_due due;
            tasks_interval_due(&last, now, interval_of(cfg, id), cfg->task_stale_ms, &due);
            verdict = due.verdict;
            if (verdict == TASKS_NOT_DUE)
                continue;
            snprintf(period, sizeof(period), "%" PRId64, due.next_seq);
            c.kind = STORE_CLAIM_INTERVAL;
            c.seq = due.next_seq;
            c.stale_period = verdict == TASKS_TAKE_OVER ? row->period : NULL;
        } else {
            rc = check_period((void *)cfg, now, i, period);
            if (rc != 0)
                goto fail;
            struct tasks_daily_row d = {.found = row->found,
                                        .running = strcmp(row->status, "running") == 0,
                                        .failed = strcmp(row->status, "failed") == 0,
                                        .heartbeat_ms = row->heartbeat_ms,
                                        .finished_ms = row->finished_ms,
                                        .attempts = row->attempts};
            verdict = tasks_daily_due(&d, now, cfg->task_retry_ms, cfg->task_stale_ms,
                                      cfg->task_max_attempts);
            if (verdict == TASKS_NOT_DUE)
                continue;
            c.kind = STORE_CLAIM_DAILY;
        }
        c.period = period;
        /* The claim: only one worker's insert of (task, period) wins. */
        rc = store_task_claim_work(env->store, &c, &claimed, &took_over, err, sizeof(err));
        if (rc != 0)
            goto fail;
        if (!claimed)
            continue;
        run_init(run, id, period);
        run->took_over = took_over;
        if (took_over)
            log_write(LOG_LEVEL_WARN, NULL, NULL,
                      "task %s: took over from a run whose worker stopped beating for %" PRIu64
                      " ms (it is marked failed); running period %s",
                      names[i], cfg->task_stale_ms, period);
        return 0;
    }
    return SETTLE_ENOTFOUND;
fail:
    log_write(LOG_LEVEL_WARN, NULL, err[0] != '\0' ? err : settle_strerror(rc),
              "scheduler: could not check the due tasks");
    return rc;
}

void tasks_execute_work(const struct tasks_env *env, const struct tasks_run *run,
                        struct tasks_outcome *out)
{
    struct trun t = {.env = env, .cfg = env->cfg, .run = run, .out = out};
    const char *name = tasks_name(run->task);
    char err[STORE_ERR_MAX] = "";
    uint64_t t0 = mono_ms();
    int rc = 0;

    memset(out, 0, sizeof(*out));
    t.last_beat_ms = t0;
    t.sum = json_object();
    if (t.sum == NULL || name == NULL) {
        snprintf(out->error, sizeof(out->error), "out of memory");
        goto record;
    }
    json_object_set_new(t.sum, "task", json_string(name));
    json_object_set_new(t.sum, "period", json_string(run->period));
    json_object_set_new(t.sum, "worker", json_string(env->worker_id));
    json_object_set_new(t.sum, "dry_run", json_boolean(run->dry_run));
    if (run->task != TASK_DAILY_STATS) {
        rc = rconn_sync_open(&t.redis, &env->redis, TASK_REDIS_TIMEOUT_MS, err, sizeof(err));
        if (rc != 0) {
            trun_fail(&t, "%s", err);
            goto done;
        }
    }
    switch (run->task) {
    case TASK_STALE_SWEEP:
        rc = task_stale_sweep(&t);
        break;
    case TASK_ORDER_EXPIRY:
        rc = task_order_expiry(&t);
        break;
    case TASK_ORPHAN_SWEEP:
        rc = task_orphan_sweep(&t);
        break;
    case TASK_STOCK_SYNC:
        rc = task_stock_sync(&t);
        break;
    case TASK_DAILY_STATS:
        rc = task_daily_stats(&t);
        break;
    case TASK_COUNT:
    default:
        abort();
    }
done:
    if (rc != 0 && t.why[0] == '\0')
        trun_fail(&t, "%s", settle_strerror(rc));
    out->ok = t.why[0] == '\0';
    snprintf(out->error, sizeof(out->error), "%s", t.why);
    json_object_set_new(t.sum, "duration_ms", json_integer((json_int_t)(mono_ms() - t0)));
    out->summary = json_dumps(t.sum, JSON_COMPACT | JSON_PRESERVE_ORDER);
record:
    rconn_sync_close(t.redis);
    json_decref(t.sum);
    /* The one summary line of the run. */
    log_write(out->ok ? LOG_LEVEL_INFO : LOG_LEVEL_WARN, NULL, out->ok ? NULL : out->error,
              "task %s period %s %s: %s", name != NULL ? name : "?", run->period,
              out->ok ? "done" : "failed", out->summary != NULL ? out->summary : "{}");
    /* Records the end (only while the run is still ours). */
    rc = store_task_finish_work(env->store, name != NULL ? name : "?", run->period, env->worker_id,
                                out->ok ? "done" : "failed", out->summary,
                                out->ok ? NULL : out->error, &out->recorded, err, sizeof(err));
    if (rc != 0)
        log_write(LOG_LEVEL_WARN, NULL, err[0] != '\0' ? err : settle_strerror(rc),
                  "task %s period %s: could not record the end of the run; it is marked failed "
                  "once its heartbeat is stale",
                  name != NULL ? name : "?", run->period);
    else if (!out->recorded)
        log_write(LOG_LEVEL_WARN, NULL, NULL,
                  "task %s period %s: the run was taken over meanwhile; its end is not recorded",
                  name != NULL ? name : "?", run->period);
}

int tasks_run_manual(const struct tasks_env *env, struct tasks_run *run, struct tasks_outcome *out)
{
    char when[32], err[STORE_ERR_MAX];
    struct timespec ts;
    struct tm tm;
    bool claimed = false;

    memset(out, 0, sizeof(*out));
    clock_gettime(CLOCK_REALTIME, &ts);
    if (gmtime_r(&ts.tv_sec, &tm) == NULL ||
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm) == 0) {
        snprintf(out->error, sizeof(out->error), "the clock is out of range");
        return SETTLE_EINVAL;
    }
    /* Unique per process and millisecond, and never a scheduled period, so a manual run
     * neither blocks nor replaces one. */
    snprintf(run->period, sizeof(run->period), "manual:%s.%03ldZ:%.140s", when,
             ts.tv_nsec / 1000000, env->worker_id);
    run->manual = true;
    struct store_task_claim c = {.kind = STORE_CLAIM_MANUAL,
                                 .task = tasks_name(run->task),
                                 .period = run->period,
                                 .worker = env->worker_id,
                                 .dry_run = run->dry_run};
    /* Records the manual run. */
    int rc = store_task_claim_work(env->store, &c, &claimed, NULL, err, sizeof(err));
    if (rc != 0 || !claimed) {
        snprintf(out->error, sizeof(out->error), "could not record the run: %.400s",
                 rc != 0 ? (err[0] != '\0' ? err : settle_strerror(rc)) : "period already used");
        return rc != 0 ? rc : SETTLE_ECONFLICT;
    }
    tasks_execute_work(env, run, out);
    return 0;
}
