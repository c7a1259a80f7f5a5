/*
 * worker.c - the worker process and the job state machine.
 *
 * Thread: everything here runs on the loop thread, except the *_work functions, which run on
 * uv pool threads and touch only their own job's request/result fields (never the loop,
 * hiredis, or the counters).
 *
 * Ownership: struct worker owns the loop's handles, the Redis connections (one for commands,
 * one per queue for the blocking wait), the gateway client, the PostgreSQL pool and every job
 * in flight. A job is freed only when it reaches JOB_DONE, never while pool work or a Redis
 * call still refers to it.
 *
 * A reconcile job's life:
 *   CLAIMED -> LOADING (pool: order from PostgreSQL) -> QUERYING (pool: PG status)
 *           -> STOCK (Redis Lua: commit or release the reservation)
 *           -> [REFUND_ENQUEUE (Redis: out-of-stock refund job)]
 *           -> STORING (pool: one PostgreSQL transaction: order, payment, stock, job_log)
 *           -> FINISHING (Redis Lua: ack, retry or bury, fenced) -> DONE
 * A refund job's life (policy in refund.c):
 *   CLAIMED -> OPENING (pool: one PostgreSQL transaction under the payment's row lock: find
 *              the refund row or insert it REQUESTED within the balance; committed before any
 *              PG call)
 *           -> CANCELLING (pool: PG cancel with the refund id as Idempotency-Key, every try)
 *           -> [RESOLVING (pool: PG status, after a 409)]
 *           -> [MARKING (pool: refund row UNKNOWN before a retry, or FAILED / MANUAL_REVIEW
 *              with the job_log row before the DLQ)]
 *           -> [RESTOCKING (Redis Lua: units back once per order, by refund id)]
 *           -> SETTLING (pool: one PostgreSQL transaction: refund SUCCEEDED, payment and order
 *              amounts and statuses, products.stock, job_log)
 *           -> FINISHING -> DONE
 * Every effect is idempotent (Lua state machines, conditional SQL, ON CONFLICT job_log, the
 * PG's Idempotency-Key), so a job redelivered after a crash at any point converges to the
 * same end state.
 *
 * Scheduled work (tasks.h) shares the process: a timer (every second plus jitter) queues one
 * short pool work that checks which task is due and claims it in PostgreSQL, then, when it
 * claimed one, one pool work that runs it. The scheduler's own state machine:
 *   IDLE -> CHECKING (pool: due check + claim) -> [RUNNING (pool: the task)] -> IDLE
 * so at most one pool thread ever serves tasks (cli.c sizes the pool for it). What the task
 * wants counted (stock mismatches, its PG calls) is added to the metrics here, on the loop,
 * after it returned. Shutdown sets the task's cancel flag: it stops at its next step.
 */
#include "settle/worker.h"

#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <uv.h>

#include "settle/breaker.h"
#include "settle/error.h"
#include "settle/gateway.h"
#include "settle/httploop.h"
#include "settle/job.h"
#include "settle/log.h"
#include "settle/metrics.h"
#include "settle/queue.h"
#include "settle/rconn.h"
#include "settle/reconcile.h"
#include "settle/refund.h"
#include "settle/retry.h"
#include "settle/stock.h"
#include "settle/store.h"
#include "settle/tasks.h"

enum job_state {
    JOB_CLAIMED = 0,
    JOB_LOADING,
    JOB_STATUS_WAIT, /* waiting for one of SETTLE_STATUS_CONCURRENCY status query slots */
    JOB_QUERYING,
    JOB_STOCK,
    JOB_REFUND_ENQUEUE,
    JOB_STORING,
    JOB_OPENING,    /* refund: find or create the refund row */
    JOB_CANCELLING, /* refund: PG cancel */
    JOB_RESOLVING,  /* refund: PG status after a 409 */
    JOB_MARKING,    /* refund: row UNKNOWN / FAILED / MANUAL_REVIEW */
    JOB_RESTOCKING, /* refund: Redis restock */
    JOB_SETTLING,   /* refund: the success transaction */
    JOB_FINISHING,
    JOB_DONE,
    JOB_STATE_COUNT
};

static const char *const job_state_names[JOB_STATE_COUNT] = {
    "claimed",        "loading",    "status_wait", "querying",   "stock",
    "refund_enqueue", "storing",    "opening",     "cancelling", "resolving",
    "marking",        "restocking", "settling",    "finishing",  "done",
};

/* allowed[from][to]: the only transitions job_set_state accepts. Any state may go to DONE,
 * which is how a job handed back at shutdown is dropped once its pending call returns. */
static const bool job_allowed[JOB_STATE_COUNT][JOB_STATE_COUNT] = {
    [JOB_CLAIMED] = {[JOB_LOADING] = 1,
                     [JOB_OPENING] = 1,
                     [JOB_STORING] = 1,
                     [JOB_FINISHING] = 1,
                     [JOB_DONE] = 1},
    [JOB_LOADING] = {[JOB_STATUS_WAIT] = 1,
                     [JOB_QUERYING] = 1,
                     [JOB_STORING] = 1,
                     [JOB_FINISHING] = 1,
                     [JOB_DONE] = 1},
    [JOB_STATUS_WAIT] =
        {[JOB_QUERYING] = 1, [JOB_STORING] = 1, [JOB_FINISHING] = 1, [JOB_DONE] = 1},
    [JOB_QUERYING] = {[JOB_STOCK] = 1, [JOB_STORING] = 1, [JOB_FINISHING] = 1, [JOB_DONE] = 1},
    [JOB_STOCK] =
        {[JOB_REFUND_ENQUEUE] = 1, [JOB_STORING] = 1, [JOB_FINISHING] = 1, [JOB_DONE] = 1},
    [JOB_REFUND_ENQUEUE] = {[JOB_STORING] = 1, [JOB_FINISHING] = 1, [JOB_DONE] = 1},
    [JOB_STORING] = {[JOB_FINISHING] = 1, [JOB_DONE] = 1},
    /* Refunds. STORING is where a refund that never touched its row is dead-lettered (with
     * its job_log row), as for reconcile jobs. */
    [JOB_OPENING] = {[JOB_CANCELLING] = 1,
                     [JOB_RESTOCKING] = 1,
                     [JOB_SETTLING] = 1,
                     [JOB_STORING] = 1,
                     [JOB_FINISHING] = 1,
                     [JOB_DONE] = 1},
    [JOB_CANCELLING] = {[JOB_RESOLVING] = 1,
                        [JOB_MARKING] = 1,
                        [JOB_RESTOCKING] = 1,
                        [JOB_SETTLING] = 1,
                        [JOB_FINISHING] = 1,
                        [JOB_DONE] = 1},
    [JOB_RESOLVING] = {[JOB_MARKING] = 1,
                       [JOB_RESTOCKING] = 1,
                       [JOB_SETTLING] = 1,
                       [JOB_FINISHING] = 1,
                       [JOB_DONE] = 1},
    [JOB_MARKING] = {[JOB_RESTOCKING] = 1,
                     [JOB_SETTLING] = 1,
                     [JOB_STORING] = 1,
                     [JOB_FINISHING] = 1,
                     [JOB_DONE] = 1},
    [JOB_RESTOCKING] = {[JOB_SETTLING] = 1, [JOB_DONE] = 1},
    [JOB_SETTLING] = {[JOB_STORING] = 1, [JOB_FINISHING] = 1, [JOB_DONE] = 1},
    [JOB_FINISHING] = {[JOB_DONE] = 1},
    [JOB_DONE] = {0},
};

/* What FINISHING does in Redis. */
enum finish_op {
    FINISH_ACK = 0,
    FINISH_RETRY,
    FINISH_BURY,
};

enum breaker_class {
    BREAKER_CLASS_STATUS = 0, /* GET payment status */
    BREAKER_CLASS_CANCEL = 1, /* POST cancel (refunds) */
    BREAKER_CLASS_COUNT
};

struct worker;
struct wqueue;

struct wjob {
    struct worker *w;
    struct wqueue *q;
    struct wjob *prev, *next; /* the worker's in-flight list */
    enum job_state state;
    uint64_t state_since_ns; /* uv_hrtime when it entered state */
    bool abandoned;          /* handed back at shutdown: drop when the pending call returns */
    bool handing_back;       /* its hand-back is on its way to Redis (on_handed_back pending) */
    bool call_returned;      /* abandoned, and its pending call returned before the hand-back */
    bool lost;               /* lease lost (heartbeat said so): the finish will be refused */

    struct queue_job qj; /* id, text (owned), counters, fencing token */
    struct job job;
    struct reconcile_progress pr;
    uint64_t started_ms; /* uv_now at claim */

    uv_work_t work;
    int work_status;
    char work_err[STORE_ERR_MAX];
    struct store_order order;
    struct gateway_result gw;
    bool breaker_admitted;

    struct reconcile_decision d;
    enum stock_result stock_res;
    const char *result; /* job_log result, static string */
    bool applied;
    char status_after[STORE_STATUS_MAX];

    /* Refund jobs only. d.detail and d.attempt_failed are kept in step with rd, because
     * finishing (job_finish, job_outcome) reads them for every kind of job. */
    char refund_id[REFUND_ID_MAX + 1];
    struct refund_progress rpr;
    struct refund_decision rd;
    struct store_refund rf;
    struct store_refund_result rres;
    enum refund_state mark_to;
    enum refund_state mark_after;
    char pg_status[32];                     /* the PG's word for the refunds row */
    char conflict_error[GATEWAY_ERROR_MAX]; /* the 409 that led to RESOLVING */
    bool restock_failed;
    int restock_status; /* the failed restock's error */

    /* The one FIFO of the worker the job waits in: a load or store batch, or a status query
     * slot. */
    struct wjob *fifo_next;

    enum finish_op finish;
    uint64_t finish_delay_ms;
    bool finish_consume;
    bool finish_check;
    const char *dead_reason;
    char last_error[GATEWAY_ERROR_MAX];
};

struct wqueue {
    struct worker *w;
    const char *name;
    enum job_kind kind;
    struct rconn *waiter; /* blocking waits only */
    bool claiming;
    bool waiting;
    /* The last claim came back short: the queue is empty for now. It claims again when its
     * waiter sees a job, its wake timer fires (a delayed job falls due) or an error clears
     * it, so an empty queue neither spins nor holds the capacity other queues could use. */
    bool dry;
    unsigned reserved;     /* slots asked for by an outstanding claim */
    uv_timer_t wake_timer; /* claims again when a delayed job falls due or after an error */
};

/* A first-in first-out list of jobs, linked through wjob.fifo_next. */
struct wjob_fifo {
    struct wjob *head, *tail;
    unsigned n;
};

/* Which PostgreSQL step a batch serves. */
enum db_kind {
    DB_LOAD = 0, /* LOADING: read the orders */
    DB_STORE,    /* STORING: write the outcomes */
};

/* One batched PostgreSQL step: up to SETTLE_DB_BATCH jobs, one pool work, one transaction.
 * The loop fills it and reads it back; the pool thread touches only the store_* arrays. */
struct db_batch {
    uv_work_t work;
    struct worker *w;
    bool busy;
    uint64_t queued_ns, started_ns, ended_ns; /* uv_hrtime: handed to the pool, run, done */
    enum db_kind kind;
    unsigned n;
    struct wjob *jobs[STORE_BATCH_MAX];
    struct store_load load[STORE_BATCH_MAX];
    struct store_apply apply[STORE_BATCH_MAX];
    struct store_outcome outcome[STORE_BATCH_MAX];
    char last4[STORE_BATCH_MAX][5];
};

struct worker_counters {
    uint64_t claimed, done, dead, retried, rechecked, waited, lost, handed_back;
};

struct worker;

/* One queue whose depths the gauges report (every known queue, worked here or not). */
#define GAUGE_QUEUES 2
struct gauge_ctx {
    struct worker *w;
    const char *queue;
};

enum sched_state {
    SCHED_IDLE = 0,
    SCHED_CHECKING, /* pool: which task is due, and its claim */
    SCHED_RUNNING,  /* pool: the claimed task */
};

struct worker {
    const struct config *cfg;
    uv_loop_t *loop;
    struct rconn *cmd;
    struct wqueue queues[CONFIG_QUEUES_MAX];
    unsigned n_queues;
    struct gateway *gateway;
    struct httploop *httploop; /* PG status calls on the loop (libcurl multi) */
    struct store *store;
    struct breaker breakers[BREAKER_CLASS_COUNT];
    struct reconcile_policy policy;
    struct refund_policy refund_policy;
    uint64_t rand_state;

    struct wjob *jobs; /* in-flight list head */
    unsigned in_flight;

    /* PostgreSQL batches (see "PostgreSQL batches" below): jobs waiting to be loaded or
     * stored, in arrival order, and the db_slots preallocated batches, db_busy[kind] of them
     * out (at most db_slots / 2 of a kind, at least 1). */
    struct wjob_fifo load_wait, store_wait;
    /* Reconcile jobs whose PG status query waits for a slot: at most status_slots
     * (SETTLE_STATUS_CONCURRENCY) queries are out at once, status_busy of them now. */
    struct wjob_fifo status_wait;
    unsigned status_slots, status_busy;
    bool status_kicking;
    struct db_batch *db;
    unsigned db_slots;
    unsigned db_busy[2]; /* by enum db_kind */
    struct {
        uint64_t batches, jobs, wait_ns, run_ns, back_ns;
    } db_stats[2]; /* by enum db_kind, for the stop log */
    unsigned state_count[JOB_STATE_COUNT];
    uint64_t state_ns[JOB_STATE_COUNT]; /* time all jobs spent in each state (the stop log) */
    struct worker_counters counters;

    /* Metrics and health (served by the metrics module's own HTTP thread). */
    struct metrics *metrics;
    struct metrics_server *http;
    uv_timer_t gauges; /* refreshes queue depths and readiness */
    struct gauge_ctx gauge_ctx[GAUGE_QUEUES];
    unsigned gauges_busy; /* queue_stats calls out */
    uv_work_t ping;       /* PostgreSQL health check on the pool */
    bool ping_busy;
    bool warmed; /* written by the ping's pool work only: its connections are warm */
    int ping_status;
    bool postgres_up;

    /* Scheduled work (see the top of this file). */
    uv_timer_t sched;
    uv_work_t sched_work;
    enum sched_state sched_state;
    int sched_status;
    struct tasks_env tenv;
    struct tasks_run trun;
    struct tasks_outcome tout;
    atomic_int task_cancel; /* read by the task on its pool thread */

    uv_signal_t sigterm, sigint;
    uv_timer_t heartbeat, reaper, grace, run_limit;
    bool draining;
    bool closing;
    bool extend_busy;
    bool reap_busy;
    bool stock_reap_busy;
    unsigned reaper_ticks;
    int open_handles; /* handles still to close at shutdown */
};

static void maybe_claim(struct worker *w);
static void arm_wake(struct wqueue *q, uint64_t delay_ms);
static void job_finish(struct wjob *j);
static void job_store(struct wjob *j);
static void worker_close(struct worker *w);
static void db_wait(struct wjob *j, enum db_kind kind);

static uint64_t now_ms(const struct worker *w)
{
    return uv_now(w->loop);
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Copies a message into a fixed buffer, cutting it when it does not fit (messages are
 * for people; the full detail of a database error is in the worker's log line). */
static void copy_text(char *dst, size_t size, const char *src)
{
    size_t n = strlen(src);
    if (n >= size)
        n = size - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static struct log_ctx job_ctx(const struct wjob *j)
{
    struct log_ctx c = {.job_id = j->qj.id,
                        .queue = j->q->name,
                        .order_id = j->job.order_id[0] != '\0' ? j->job.order_id : NULL,
                        .attempt = (int)j->qj.attempts + 1};
    return c;
}

/* The one transition function of the job state machine. */
static void job_set_state(struct wjob *j, enum job_state to)
{
    enum job_state from = j->state;
    if (from >= JOB_STATE_COUNT || to >= JOB_STATE_COUNT || !job_allowed[from][to]) {
        fprintf(stderr, "%s:%d: illegal job transition %d -> %d\n", __FILE__, __LINE__, from, to);
        abort();
    }
    uint64_t now = uv_hrtime();
    j->w->state_count[from]--;
    j->w->state_count[to]++;
    j->w->state_ns[from] += now - j->state_since_ns;
    j->state_since_ns = now;
    j->state = to;
    if (log_enabled(LOG_LEVEL_DEBUG)) {
        struct log_ctx c = job_ctx(j);
        log_write(LOG_LEVEL_DEBUG, &c, NULL, "job %s -> %s", job_state_names[from],
                  job_state_names[to]);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Job lifetime.
 */
static struct wjob *job_new(struct wqueue *q, struct queue_job *qj)
{
    struct worker *w = q->w;
    struct wjob *j = calloc(1, sizeof(*j));
    if (j == NULL)
        return NULL;
    j->w = w;
    j->q = q;
    j->qj = *qj;
    qj->text = NULL; /* the job owns the text now */
    j->state = JOB_CLAIMED;
    j->state_since_ns = uv_hrtime();
    j->started_ms = now_ms(w);
    j->work.data = j;
    w->state_count[JOB_CLAIMED]++;
    j->next = w->jobs;
    if (w->jobs != NULL)
        w->jobs->prev = j;
    w->jobs = j;
    w->in_flight++;
    metrics_set_inflight(w->metrics, w->in_flight);
    return j;
}

static void job_free(struct wjob *j)
{
    struct worker *w = j->w;
    if (j->prev != NULL)
        j->prev->next = j->next;
    else
        w->jobs = j->next;
    if (j->next != NULL)
        j->next->prev = j->prev;
    w->state_count[j->state]--;
    w->in_flight--;
    metrics_set_inflight(w->metrics, w->in_flight);
    free(j->qj.text);
    free(j);
}

/* Called when a job reaches DONE: frees it and lets the worker claim again (or finish its
 * shutdown). Never called from inside the job's own pool callback chain without returning
 * straight after, so nothing touches the job afterwards. */
static void job_done(struct wjob *j)
{
    struct worker *w = j->w;
    job_set_state(j, JOB_DONE);
    job_free(j);
    if (w->draining) {
        if (w->in_flight == 0)
            worker_close(w);
    } else {
        maybe_claim(w);
    }
}

/* A pending call of a handed-back job returned: drop the job, or, while the hand-back itself
 * is still on its way to Redis, leave it for on_handed_back to drop (its callback holds the
 * job). Returns true when the job is out of the caller's hands. */
static bool job_drop_if_abandoned(struct wjob *j)
{
    if (!j->abandoned)
        return false;
    if (j->handing_back) {
        j->call_returned = true;
        return true;
    }
    job_done(j);
    return true;
}

/* ---------------------------------------------------------------------------------------------
 * Finishing in Redis.
 */
static void on_finished(void *arg, int status, long long result)
{
    struct wjob *j = arg;
    struct worker *w = j->w;
    struct log_ctx c = job_ctx(j);
    if (status != 0) {
        /* The job is still in Redis under its lease: the reaper will give it back and the
         * next delivery will converge on the same outcome (every effect is idempotent). */
        log_write(LOG_LEVEL_WARN, &c, settle_strerror(status),
                  "could not record the job's end in Redis; it will be redelivered after its "
                  "lease");
    } else if (result == 0) {
        w->counters.lost++;
        log_write(LOG_LEVEL_WARN, &c, NULL,
                  "lease lost: a newer delivery owns this job, so this one's end is ignored");
    } else {
        double seconds = (double)(now_ms(w) - j->started_ms) / 1000.0;
        switch (j->finish) {
        case FINISH_ACK:
            w->counters.done++;
            metrics_job_finished(w->metrics, j->q->name, "done",
                                 j->result != NULL ? j->result : "unknown", seconds);
            break;
        case FINISH_RETRY:
            arm_wake(j->q, j->finish_delay_ms);
            if (j->finish_check) {
                w->counters.rechecked++;
                metrics_job_retry(w->metrics, j->q->name, "recheck");
            } else if (j->finish_consume) {
                w->counters.retried++;
                metrics_job_retry(w->metrics, j->q->name, "retry");
            } else {
                w->counters.waited++;
                metrics_job_retry(w->metrics, j->q->name, "breaker_wait");
            }
            break;
        case FINISH_BURY:
            w->counters.dead++;
            metrics_job_finished(w->metrics, j->q->name, "dead", j->dead_reason, seconds);
            metrics_dead_lettered(w->metrics, j->q->name, j->dead_reason);
            if ((unsigned long long)result > w->cfg->dlq_alert_size)
                log_write(LOG_LEVEL_ERROR, &c, NULL,
                          "dead-letter queue holds %lld entries, over SETTLE_DLQ_ALERT_SIZE "
                          "(%" PRIu64 "); nothing is trimmed, inspect it with `settle dlq list`",
                          result, w->cfg->dlq_alert_size);
            break;
        default:
            abort();
        }
    }
    job_done(j);
}

static void job_finish(struct wjob *j)
{
    struct worker *w = j->w;
    const struct config *cfg = w->cfg;
    struct log_ctx c = job_ctx(j);
    int rc = 0;
    job_set_state(j, JOB_FINISHING);
    switch (j->finish) {
    case FINISH_ACK:
        log_write(LOG_LEVEL_INFO, &c, NULL, "job done: %s (%s)", j->result,
                  j->d.detail[0] != '\0' ? j->d.detail : "ok");
        rc = queue_ack(w->cmd, cfg->namespace_, j->q->name, j->qj.id, j->qj.deliveries, j->job.id,
                       on_finished, j);
        break;
    case FINISH_RETRY:
        log_write(j->finish_consume ? LOG_LEVEL_WARN : LOG_LEVEL_INFO, &c,
                  j->finish_consume && j->last_error[0] != '\0' ? j->last_error : NULL,
                  "job %s in %" PRIu64 " ms: %s",
                  j->finish_check ? "re-checks" : (j->finish_consume ? "retries" : "waits"),
                  j->finish_delay_ms, j->d.detail);
        rc = queue_retry(w->cmd, cfg->namespace_, j->q->name, j->qj.id, j->qj.deliveries,
                         j->finish_delay_ms, j->finish_consume, j->finish_check, on_finished, j);
        break;
    case FINISH_BURY: {
        char *env = NULL;
        bool fits = j->qj.text_bytes <= cfg->job_max_bytes && j->qj.text != NULL &&
                    j->qj.text_len == j->qj.text_bytes;
        struct job_dead_info info = {
            .job_id = j->qj.id,
            .queue = j->q->name,
            .reason = j->dead_reason,
            .error = j->last_error,
            .attempts = j->qj.attempts + (j->d.attempt_failed ? 1 : 0),
            .deliveries = j->qj.deliveries,
            .enqueued_ms = j->qj.enqueued_ms,
            .dead_ms = wall_ms(),
            .worker_id = cfg->worker_id,
        };
        log_write(LOG_LEVEL_ERROR, &c, j->last_error, "job dead-lettered: %s", j->dead_reason);
        rc = job_dead_envelope(&info, fits ? j->qj.text : NULL, j->qj.text_bytes, &env);
        if (rc == 0)
            rc = queue_bury(w->cmd, cfg->namespace_, j->q->name, j->qj.id, j->qj.deliveries, env,
                            j->job.id, on_finished, j);
        free(env);
        break;
    }
    default:
        abort();
    }
    if (rc != 0)
        on_finished(j, rc, 0);
}

/* Sets up the FINISHING step from a decision that does not go through PostgreSQL. */
static void finish_with_retry(struct wjob *j, uint64_t delay_ms, bool consume, bool check)
{
    j->finish = FINISH_RETRY;
    j->finish_delay_ms = delay_ms;
    j->finish_consume = consume;
    j->finish_check = check;
    job_finish(j);
}

/* ---------------------------------------------------------------------------------------------
 * STORING: the order change and the job_log row, in one PostgreSQL transaction (shared with
 * the other jobs of its batch, each in its own savepoint).
 */

/* The outcome to write for job j. Its strings point into j (and last4, 5 bytes), which
 * outlive the batch. */
static void job_outcome(const struct wjob *j, struct store_outcome *o, char *last4)
{
    const struct config *cfg = j->w->cfg;
    size_t n = strlen(j->gw.tx.card_no_masked);
    memset(o, 0, sizeof(*o));
    last4[0] = '\0';
    if (n >= 4)
        memcpy(last4, j->gw.tx.card_no_masked + n - 4, 5);

    o->order_id = j->job.order_id[0] != '\0' ? j->job.order_id : NULL;
    o->job_id = j->qj.id;
    o->queue = j->q->name;
    o->producer_id = j->job.id[0] != '\0' ? j->job.id : NULL;
    o->worker_id = cfg->worker_id;
    o->attempts = j->qj.attempts + (j->d.attempt_failed ? 1 : 0);
    o->deliveries = j->qj.deliveries;
    o->enqueued_ms = j->qj.enqueued_ms;
    o->last_error = j->last_error[0] != '\0' ? j->last_error : NULL;
    o->outcome = "done";
    o->result = j->result;
    o->result_unapplied = "skipped";

    switch (j->d.verdict) {
    case RECONCILE_COMPLETE:
        if (j->stock_res == STOCK_OUT_OF_STOCK) {
            /* Charged but no stock: fail the order; the payment did succeed and is refunded
             * by the refund job enqueued just before. */
            o->action = STORE_ACTION_FAIL;
            o->reason = "out_of_stock";
            o->payment_status = "SUCCESS";
        } else {
            o->action = STORE_ACTION_COMPLETE;
            o->payment_status = "SUCCESS";
        }
        break;
    case RECONCILE_FAIL:
        o->action = STORE_ACTION_FAIL;
        o->payment_status = "FAILED";
        o->reason = j->gw.tx.reason[0] != '\0' ? j->gw.tx.reason : "payment_failed";
        break;
    case RECONCILE_EXPIRE:
        o->action = STORE_ACTION_EXPIRE;
        o->reason = j->d.reason;
        break;
    case RECONCILE_MANUAL_REVIEW:
        o->action = STORE_ACTION_MANUAL_REVIEW;
        o->reason = j->d.reason;
        break;
    case RECONCILE_RECHECK:
        o->action = STORE_ACTION_RESCHEDULE;
        o->next_check_in_ms = j->d.delay_ms;
        o->job_id = NULL; /* not finished: no job_log row yet */
        break;
    case RECONCILE_SKIP:
        o->action = STORE_ACTION_NONE;
        break;
    case RECONCILE_DEAD:
        o->action = STORE_ACTION_NONE;
        o->outcome = "dead";
        break;
    default:
        abort();
    }
    if (o->action == STORE_ACTION_COMPLETE || o->action == STORE_ACTION_FAIL) {
        o->transaction_key = j->gw.tx.transaction_key[0] != '\0' ? j->gw.tx.transaction_key : NULL;
        o->card_type = j->gw.tx.card_type[0] != '\0' ? j->gw.tx.card_type : NULL;
        o->card_last4 = last4[0] != '\0' ? last4 : NULL;
        o->amount_minor = j->gw.tx.amount_minor;
    }
}

/* The job's outcome transaction returned (work_status, applied, status_after are set). */
static void store_done(struct wjob *j, int status)
{
    if (job_drop_if_abandoned(j))
        return;
    if (status == UV_ECANCELED)
        j->work_status = SETTLE_ESHUTDOWN;
    if (j->work_status != 0) {
        copy_text(j->last_error, sizeof(j->last_error),
                  j->work_err[0] != '\0' ? j->work_err : settle_strerror(j->work_status));
        if (j->d.verdict == RECONCILE_DEAD || j->work_status == SETTLE_EUNAVAILABLE ||
            j->work_status == SETTLE_ESHUTDOWN) {
            /* PostgreSQL is unreachable: come back later without spending an attempt, so a
             * database outage never turns good jobs into dead ones (and a dead job's log row
             * is written before it is buried). */
            uint64_t delay = retry_delay_ms(
                j->qj.attempts + 1, j->w->cfg->retry_base_ms, j->w->cfg->retry_cap_ms, 0,
                j->w->cfg->retry_after_max_ms, retry_rand_next(&j->w->rand_state));
            snprintf(j->d.detail, sizeof(j->d.detail), "PostgreSQL unavailable");
            finish_with_retry(j, delay, false, false);
            return;
        }
        /* A permanent SQL error (a constraint such as stock going negative): a human must
         * look, the job goes to the DLQ with the database's words. */
        j->d.verdict = RECONCILE_DEAD;
        j->dead_reason = "store_rejected";
        j->result = "store_rejected";
        j->finish = FINISH_BURY;
        /* Write the dead job's log row (no order change) before burying it; the job is in
         * STORING already, so this is another run of the same step, not a transition. */
        db_wait(j, DB_STORE);
        return;
    }
    if (j->d.verdict == RECONCILE_RECHECK) {
        finish_with_retry(j, j->d.delay_ms, false, true);
        return;
    }
    if (!j->applied && j->d.verdict != RECONCILE_DEAD && j->d.verdict != RECONCILE_SKIP &&
        j->stock_res == STOCK_RETAKEN) {
        /* We took stock again for an order that another path finished meanwhile. Redis now
         * holds too few units; the nightly stock sync repairs it from PostgreSQL. */
        struct log_ctx c = job_ctx(j);
        log_write(LOG_LEVEL_ERROR, &c, NULL,
                  "stock was retaken for an order that became %s concurrently; Redis stock is "
                  "low until the next stock sync",
                  j->status_after);
    }
    if (!j->applied && j->d.verdict != RECONCILE_DEAD && j->d.verdict != RECONCILE_SKIP) {
        snprintf(j->d.detail, sizeof(j->d.detail), "order was already %s; left as it is",
                 j->status_after);
    }
    job_finish(j);
}

static void job_store(struct wjob *j)
{
    job_set_state(j, JOB_STORING);
    db_wait(j, DB_STORE);
}

/* A job's end that needs a job_log row: DEAD (bury after logging) or a finished outcome. */
static void job_dead(struct wjob *j, const char *reason, const char *detail)
{
    j->d.verdict = RECONCILE_DEAD;
    j->dead_reason = reason;
    j->result = reason;
    j->finish = FINISH_BURY;
    if (detail != NULL && detail != j->last_error)
        copy_text(j->last_error, sizeof(j->last_error), detail);
    job_store(j);
}

/* ---------------------------------------------------------------------------------------------
 * Carrying out a decision.
 */
static void on_stock(void *arg, int status, enum stock_result res);
static void on_refund_enqueued(void *arg, int status, long long result);

static struct stock_items job_items(const struct wjob *j)
{
    struct stock_items it = {0};
    it.n = j->order.n_items;
    for (unsigned i = 0; i < it.n && i < STOCK_ITEMS_MAX; i++) {
        it.sku[i] = j->order.items[i].sku;
        it.qty[i] = j->order.items[i].qty;
    }
    return it;
}

static void act(struct wjob *j)
{
    struct worker *w = j->w;
    const struct config *cfg = w->cfg;
    struct stock_items items;
    int rc = 0;
    copy_text(j->last_error, sizeof(j->last_error), j->d.detail);
    switch (j->d.verdict) {
    case RECONCILE_SKIP:
        j->result = "skipped";
        j->finish = FINISH_ACK;
        job_store(j);
        return;
    case RECONCILE_COMPLETE:
        items = job_items(j);
        job_set_state(j, JOB_STOCK);
        rc = stock_commit(w->cmd, cfg->namespace_, j->order.id, &items, on_stock, j);
        break;
    case RECONCILE_FAIL:
    case RECONCILE_EXPIRE:
        items = job_items(j);
        job_set_state(j, JOB_STOCK);
        rc = stock_release(w->cmd, cfg->namespace_, j->order.id, &items, on_stock, j);
        break;
    case RECONCILE_MANUAL_REVIEW:
        j->result = "manual_review";
        j->finish = FINISH_ACK;
        job_store(j);
        return;
    case RECONCILE_RECHECK:
        j->result = "rechecked";
        job_store(j);
        return;
    case RECONCILE_RETRY:
        finish_with_retry(j, j->d.delay_ms, true, false);
        return;
    case RECONCILE_WAIT:
        finish_with_retry(j, j->d.delay_ms, false, false);
        return;
    case RECONCILE_DEAD:
        job_dead(j, j->d.reason, j->d.detail);
        return;
    case RECONCILE_QUERY:
    default:
        abort();
    }
    if (rc != 0)
        on_stock(j, rc, STOCK_MISSING);
}

static void redis_transient(struct wjob *j, int status, const char *what)
{
    struct reconcile_decision d;
    char detail[GATEWAY_ERROR_MAX];
    snprintf(detail, sizeof(detail), "%s: %s", what, settle_strerror(status));
    j->pr.rand64 = retry_rand_next(&j->w->rand_state);
    reconcile_transient(&j->w->policy, &j->pr, "redis_unavailable", 0, detail, &d);
    j->d = d;
    act(j);
}

static void on_stock(void *arg, int status, enum stock_result res)
{
    struct wjob *j = arg;
    if (job_drop_if_abandoned(j))
        return;
    if (status != 0) {
        redis_transient(j, status, "stock script failed");
        return;
    }
    j->stock_res = res;
    switch (j->d.verdict) {
    case RECONCILE_COMPLETE:
        switch (res) {
        case STOCK_COMMITTED:
        case STOCK_ALREADY_COMMITTED:
        case STOCK_RETAKEN:
            j->result = "completed";
            j->finish = FINISH_ACK;
            job_store(j);
            return;
        case STOCK_OUT_OF_STOCK: {
            /* The customer paid but the units are gone: refund them. The refund job's id is
             * derived from the order so a redelivered reconcile job never asks twice. */
            struct worker *w = j->w;
            char producer[JOB_ID_MAX + 8];
            snprintf(producer, sizeof(producer), "oos:%s", j->order.id);
            json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:b, s:I}", "id", producer, "order_id",
                                  j->order.id, "user_id", j->order.user_id, "transaction_key",
                                  j->gw.tx.transaction_key, "reason", "out_of_stock", "restock", 0,
                                  "enqueued_at_ms", (json_int_t)wall_ms());
            char *text = o != NULL ? json_dumps(o, JSON_COMPACT) : NULL;
            json_decref(o);
            j->result = "out_of_stock";
            j->finish = FINISH_ACK;
            job_set_state(j, JOB_REFUND_ENQUEUE);
            int rc = text != NULL ? queue_enqueue(w->cmd, w->cfg->namespace_, "refund", text,
                                                  strlen(text), producer, on_refund_enqueued, j)
                                  : SETTLE_ENOMEM;
            free(text);
            if (rc != 0)
                on_refund_enqueued(j, rc, 0);
            return;
        }
        default:
            break;
        }
        break;
    case RECONCILE_FAIL:
    case RECONCILE_EXPIRE:
        switch (res) {
        case STOCK_RELEASED:
        case STOCK_ALREADY_RELEASED:
        case STOCK_MISSING:
            j->result = j->d.verdict == RECONCILE_FAIL ? "failed" : "expired";
            j->finish = FINISH_ACK;
            job_store(j);
            return;
        case STOCK_NOT_RESERVED:
            /* The reservation was committed by someone else (a callback handler that saw
             * SUCCESS?) while the PG now says otherwise: never guess with money. */
            j->d.verdict = RECONCILE_MANUAL_REVIEW;
            j->d.reason = "stock_committed_elsewhere";
            snprintf(j->d.detail, sizeof(j->d.detail),
                     "reservation already committed but PG says the payment did not succeed");
            j->result = "manual_review";
            j->finish = FINISH_ACK;
            job_store(j);
            return;
        default:
            break;
        }
        break;
    default:
        break;
    }
    redis_transient(j, SETTLE_EINTERNAL, "unexpected stock script answer");
}

static void on_refund_enqueued(void *arg, int status, long long result)
{
    struct wjob *j = arg;
    if (job_drop_if_abandoned(j))
        return;
    if (status != 0) {
        /* Without the refund job the order must stay PENDING; the sticky out_of_stock
         * reservation gives the next delivery the same answer, and it tries again. */
        redis_transient(j, status, "could not enqueue the out-of-stock refund");
        return;
    }
    snprintf(j->d.detail, sizeof(j->d.detail), "paid but out of stock; refund job %s",
             result == 1 ? "enqueued" : "already queued");
    job_store(j);
}

/* ---------------------------------------------------------------------------------------------
 * Waiting lists. A job waits in at most one: for a load or store batch (db_kick) or for a
 * status query slot (status_kick).
 */
static void fifo_push(struct wjob_fifo *f, struct wjob *j)
{
    j->fifo_next = NULL;
    if (f->tail != NULL)
        f->tail->fifo_next = j;
    else
        f->head = j;
    f->tail = j;
    f->n++;
}

static struct wjob *fifo_pop(struct wjob_fifo *f)
{
    struct wjob *j = f->head;
    if (j == NULL)
        return NULL;
    f->head = j->fifo_next;
    if (f->head == NULL)
        f->tail = NULL;
    j->fifo_next = NULL;
    f->n--;
    return j;
}

static void status_query(struct wjob *j);

/*
 * Sends waiting jobs' status queries while fewer than SETTLE_STATUS_CONCURRENCY are out. That
 * limit is the PG's load; a job before or after its call (its order read, stock, outcome
 * write, acknowledgement) holds no slot, so a worker whose SETTLE_CONCURRENCY is above it keeps
 * that many queries going while other jobs wait for PostgreSQL or Redis. Not re-entered: a
 * query that ends at once calls on_queried, which kicks again.
 */
static void status_kick(struct worker *w)
{
    if (w->status_kicking)
        return;
    w->status_kicking = true;
    while (w->status_wait.n > 0 && w->status_busy < w->status_slots) {
        struct wjob *j = fifo_pop(&w->status_wait);
        if (job_drop_if_abandoned(j))
            continue;
        status_query(j);
    }
    w->status_kicking = false;
}

/* ---------------------------------------------------------------------------------------------
 * QUERYING: ask the PG, on the loop.
 */
static const char *const breaker_class_names[BREAKER_CLASS_COUNT] = {"status", "cancel"};

/* Logs a breaker's state change (operators watch for "breaker ... open"). */
static void breaker_note(struct worker *w, enum breaker_class cls, enum breaker_state before)
{
    enum breaker_state after = w->breakers[cls].state;
    if (after == before)
        return;
    metrics_breaker(w->metrics, breaker_class_names[cls], (int)after, breaker_state_name(after));
    log_write(after == BREAKER_OPEN ? LOG_LEVEL_WARN : LOG_LEVEL_INFO, NULL, NULL,
              "circuit breaker %s: %s -> %s (consecutive trips %u)", breaker_class_names[cls],
              breaker_state_name(before), breaker_state_name(after),
              w->breakers[cls].consecutive_trips);
}

/* Counts one PG call by its result class, for the dashboards. */
static void gateway_observe(struct worker *w, const char *endpoint, const struct gateway_result *g)
{
    metrics_gateway_request(w->metrics, endpoint, gateway_result_class(g),
                            (double)g->latency_us / 1e6);
}

/* Records the breaker outcome of job j's PG call, admitted under class cls (status: the call's
 * completion status; UV_ECANCELED = it never ran), and counts the call for the dashboards. */
static void job_breaker_record(struct wjob *j, enum breaker_class cls, int status)
{
    struct worker *w = j->w;
    if (!j->breaker_admitted)
        return;
    enum breaker_result br = BREAKER_SUCCESS;
    if (status == UV_ECANCELED)
        br = BREAKER_IGNORED;
    else if (j->gw.breaker_failure)
        br = BREAKER_FAILURE;
    else if (j->gw.outcome == GATEWAY_TRANSIENT || j->gw.outcome == GATEWAY_REJECTED)
        br = BREAKER_IGNORED;
    enum breaker_state before = w->breakers[cls].state;
    breaker_record(&w->breakers[cls], now_ms(w), br);
    breaker_note(w, cls, before);
    j->breaker_admitted = false;
    if (status != UV_ECANCELED)
        gateway_observe(w, breaker_class_names[cls], &j->gw);
}

/* May a PG call of class cls start now? When not, *retry_in_ms says when to try again. */
static bool breaker_admits(struct worker *w, enum breaker_class cls, uint64_t *retry_in_ms)
{
    struct breaker *b = &w->breakers[cls];
    enum breaker_state before = b->state;
    int allowed = breaker_allow(b, now_ms(w));
    breaker_note(w, cls, before);
    if (!allowed)
        *retry_in_ms = breaker_retry_in_ms(b, now_ms(w));
    return allowed != 0;
}

/* The PG answered (or the query ended without an answer; j->gw says which). */
static void on_queried(void *arg)
{
    struct wjob *j = arg;
    struct worker *w = j->w;
    w->status_busy--;
    job_breaker_record(j, BREAKER_CLASS_STATUS, 0);
    if (!job_drop_if_abandoned(j)) {
        j->pr.rand64 = retry_rand_next(&w->rand_state);
        reconcile_after_query(&w->policy, &j->pr, &j->job, &j->order, &j->gw, &j->d);
        act(j);
    }
    /* Its slot is free: the next waiting job's query goes out. */
    status_kick(w);
}

/* Sends job j's PG status query (its slot is taken), unless the breaker says no. */
static void status_query(struct wjob *j)
{
    struct worker *w = j->w;
    uint64_t retry_in_ms = 0;
    if (!breaker_admits(w, BREAKER_CLASS_STATUS, &retry_in_ms)) {
        reconcile_breaker_open(&w->policy, &j->pr, retry_in_ms, &j->d);
        act(j);
        return;
    }
    j->breaker_admitted = true;
    job_set_state(j, JOB_QUERYING);
    w->status_busy++;
    /* On the loop (libcurl multi): no thread per PG call. The key the job carries wins over
     * the one on record; reconcile_after_load has checked that they agree. */
    const char *key =
        j->job.transaction_key[0] != '\0' ? j->job.transaction_key : j->order.transaction_key;
    if (gateway_query_status_start(w->gateway, w->httploop, j->job.user_id, key, j->order.id,
                                   &j->gw, on_queried, j) != 0)
        on_queried(j); /* ended at once: j->gw says why */
}

/* ---------------------------------------------------------------------------------------------
 * LOADING: read the order (in a batch with other jobs' orders).
 */

/* The job's order read returned (work_status and order are set). */
static void load_done(struct wjob *j, int status)
{
    struct worker *w = j->w;
    if (job_drop_if_abandoned(j))
        return;
    if (status == UV_ECANCELED) {
        finish_with_retry(j, 0, false, false);
        return;
    }
    j->pr.rand64 = retry_rand_next(&w->rand_state);
    reconcile_after_load(&w->policy, &j->pr, &j->job, j->work_status, j->work_err, &j->order,
                         &j->d);
    if (j->d.verdict != RECONCILE_QUERY) {
        act(j);
        return;
    }
    job_set_state(j, JOB_STATUS_WAIT);
    fifo_push(&w->status_wait, j);
    status_kick(w);
}

/* ---------------------------------------------------------------------------------------------
 * PostgreSQL batches.
 *
 * A job that needs its order read (LOADING) or its outcome written (STORING) waits in a FIFO.
 * Whenever a batch slot of its kind is free, db_kick hands the waiting jobs, up to
 * SETTLE_DB_BATCH at a time, to one pool work: one
 * read-only transaction for the loads, one transaction for the writes. No timer holds a job
 * back: at light load a batch holds one job, and under load jobs gather while the out batches
 * run (group commit), which is where the round trips, plans and COMMITs are saved.
 *
 * Why it is safe: a load is a read from one snapshot, as before. A write applies, for each
 * job, the same guarded changes as before (one set-based statement for the batch, or job by
 * job with a savepoint each when that statement fails), so effects and idempotency are
 * unchanged and a job the database refuses fails alone; a job's result is acted on (and
 * acknowledged in Redis) only after the COMMIT that holds it returned, so PostgreSQL still
 * records an outcome before Redis forgets the job. A failed or unknown COMMIT fails every job
 * of the batch the way a single job's failed transaction did (retried without spending an
 * attempt; a redelivery converges).
 */
static void db_batch_work(uv_work_t *req)
{
    struct db_batch *b = req->data;
    b->started_ns = uv_hrtime();
    if (b->kind == DB_LOAD)
        store_load_orders_work(b->w->store, b->load, b->n);
    else
        store_apply_outcomes_work(b->w->store, b->apply, b->n);
    b->ended_ns = uv_hrtime();
}

static void db_kick(struct worker *w);

static void after_db_batch(uv_work_t *req, int status)
{
    struct db_batch *b = req->data;
    struct worker *w = b->w;
    struct wjob *jobs[STORE_BATCH_MAX];
    enum db_kind kind = b->kind;
    unsigned n = b->n;

    uint64_t now = uv_hrtime();
    w->db_stats[kind].batches++;
    w->db_stats[kind].jobs += n;
    w->db_stats[kind].wait_ns += b->started_ns - b->queued_ns;
    w->db_stats[kind].run_ns += b->ended_ns - b->started_ns;
    w->db_stats[kind].back_ns += now - b->ended_ns;
    /* Copy the answers into the jobs and free the batch before any job moves on: a job's
     * next step may queue it (or another job) for the next batch. */
    for (unsigned i = 0; i < n; i++) {
        struct wjob *j = b->jobs[i];
        jobs[i] = j;
        if (kind == DB_LOAD) {
            j->work_status = b->load[i].status;
            copy_text(j->work_err, sizeof(j->work_err), b->load[i].err);
        } else {
            j->work_status = b->apply[i].status;
            copy_text(j->work_err, sizeof(j->work_err), b->apply[i].err);
            j->applied = b->apply[i].applied;
            copy_text(j->status_after, sizeof(j->status_after), b->apply[i].status_after);
        }
    }
    b->busy = false;
    b->n = 0;
    w->db_busy[kind]--;
    for (unsigned i = 0; i < n; i++) {
        if (kind == DB_LOAD)
            load_done(jobs[i], status);
        else
            store_done(jobs[i], status);
    }
    db_kick(w);
}

/* Sends the waiting jobs out in batches while batch slots are free. Half of the slots serve
 * loads and half writes (at least one each), so a load never waits behind writes nor a write
 * behind loads. Measured (bench/, R0 and R20, 3 runs each): one shared pair of slots with
 * writes first gave 3 335 and 2 257 jobs/s, one slot per kind 3 965 and 2 555; two slots per
 * kind (4 transactions at once) 3 541 and 2 299: smaller batches, more PostgreSQL CPU. */
static void db_kick(struct worker *w)
{
    unsigned per_kind = w->db_slots > 1 ? w->db_slots / 2 : 1;
    for (;;) {
        bool store = w->store_wait.n > 0 && w->db_busy[DB_STORE] < per_kind;
        bool load = w->load_wait.n > 0 && w->db_busy[DB_LOAD] < per_kind;
        if (w->db_busy[DB_LOAD] + w->db_busy[DB_STORE] >= w->db_slots || (!store && !load))
            break;
        struct db_batch *b = NULL;
        for (unsigned i = 0; i < w->db_slots && b == NULL; i++)
            if (!w->db[i].busy)
                b = &w->db[i];
        if (b == NULL)
            abort(); /* db_busy counts the busy batches, under db_slots: one is free */
        b->kind = store ? DB_STORE : DB_LOAD;
        struct wjob_fifo *f = b->kind == DB_STORE ? &w->store_wait : &w->load_wait;
        unsigned max = w->cfg->db_batch < STORE_BATCH_MAX ? w->cfg->db_batch : STORE_BATCH_MAX;
        b->n = 0;
        while (b->n < max && f->n > 0) {
            struct wjob *j = fifo_pop(f);
            unsigned i = b->n++;
            b->jobs[i] = j;
            if (b->kind == DB_LOAD) {
                memset(&j->order, 0, sizeof(j->order));
                b->load[i] = (struct store_load){.order_id = j->job.order_id, .order = &j->order};
            } else {
                job_outcome(j, &b->outcome[i], b->last4[i]);
                b->apply[i] = (struct store_apply){.o = &b->outcome[i]};
            }
        }
        b->busy = true;
        b->queued_ns = uv_hrtime();
        w->db_busy[b->kind]++;
        metrics_db_batch(w->metrics, b->kind == DB_LOAD ? "load" : "store", b->n);
        uv_queue_work(w->loop, &b->work, db_batch_work, after_db_batch);
    }
}

/* Queues job j for the next batch of its kind. */
static void db_wait(struct wjob *j, enum db_kind kind)
{
    struct worker *w = j->w;
    fifo_push(kind == DB_LOAD ? &w->load_wait : &w->store_wait, j);
    db_kick(w);
}

/* ---------------------------------------------------------------------------------------------
 * Refunds (see the life of a refund job at the top of this file, and refund.h for the rules).
 */
static void refund_act(struct wjob *j);
static void refund_settle(struct wjob *j);

/* Finishing reads d.detail and d.attempt_failed for every kind of job. */
static void refund_sync_finish(struct wjob *j)
{
    copy_text(j->d.detail, sizeof(j->d.detail), j->rd.detail);
    j->d.attempt_failed = j->rd.attempt_failed;
}

/* The job_log fields of a store outcome, for the refund store functions. */
static void refund_log_fill(const struct wjob *j, struct store_outcome *o, const char *outcome,
                            const char *result, const char *result_unapplied)
{
    memset(o, 0, sizeof(*o));
    o->action = STORE_ACTION_NONE;
    o->order_id = j->job.order_id;
    o->job_id = j->qj.id;
    o->queue = j->q->name;
    o->producer_id = j->job.id[0] != '\0' ? j->job.id : NULL;
    o->worker_id = j->w->cfg->worker_id;
    o->attempts = j->qj.attempts + (j->rd.attempt_failed ? 1 : 0);
    o->deliveries = j->qj.deliveries;
    o->enqueued_ms = j->qj.enqueued_ms;
    o->last_error = j->last_error[0] != '\0' ? j->last_error : NULL;
    o->outcome = outcome;
    o->result = result;
    o->result_unapplied = result_unapplied;
}

/* What the refunds row records as the PG's last word about this refund. */
static void refund_note_pg(struct wjob *j)
{
    if (j->gw.outcome == GATEWAY_OK)
        snprintf(j->pg_status, sizeof(j->pg_status), "%s", gateway_tx_status_name(j->gw.tx.status));
    else if (j->gw.http_status > 0)
        snprintf(j->pg_status, sizeof(j->pg_status), "HTTP %ld", j->gw.http_status);
    else
        snprintf(j->pg_status, sizeof(j->pg_status), "no answer");
}

/* PostgreSQL could not be reached for a refund step: come back later without spending an
 * attempt (a database outage must not turn refunds dead), until the retry deadline; every
 * step is idempotent and the PG answers a repeated key with its first answer. Past the
 * deadline the job is dead-lettered "store_unavailable" (its refund row keeps its state; a
 * re-driven job finishes it). */
static void refund_store_unavailable(struct wjob *j)
{
    char detail[GATEWAY_ERROR_MAX];
    snprintf(detail, sizeof(detail), "PostgreSQL unavailable: %.200s",
             j->work_err[0] != '\0' ? j->work_err : settle_strerror(j->work_status));
    j->rpr.rand64 = retry_rand_next(&j->w->rand_state);
    refund_outage(&j->w->refund_policy, &j->rpr, "store_unavailable", detail, &j->rd);
    refund_act(j);
}

/* --- OPENING ---------------------------------------------------------------------------------- */

static void open_work(uv_work_t *req)
{
    struct wjob *j = req->data;
    j->work_err[0] = '\0';
    j->work_status = store_refund_open_work(j->w->store, &j->job, j->refund_id, &j->rf, j->work_err,
                                            sizeof(j->work_err));
}

static void after_open(uv_work_t *req, int status)
{
    struct wjob *j = req->data;
    struct worker *w = j->w;
    if (job_drop_if_abandoned(j))
        return;
    if (status == UV_ECANCELED) {
        finish_with_retry(j, 0, false, false);
        return;
    }
    j->rpr.rand64 = retry_rand_next(&w->rand_state);
    refund_after_open(&w->refund_policy, &j->rpr, j->work_status, j->work_err, j->rf.admission,
                      j->rf.why, &j->rf.row, &j->rd);
    if (j->work_status == 0 && j->rf.admission == REFUND_ADMIT_OK) {
        struct log_ctx c = job_ctx(j);
        log_write(LOG_LEVEL_INFO, &c, NULL, "refund %s of %" PRId64 " is %s%s", j->rf.row.id,
                  j->rf.row.amount_minor, refund_state_name(j->rf.row.state),
                  j->rf.row.created ? " (new)" : "");
    }
    refund_act(j);
}

static void refund_start(struct wjob *j)
{
    refund_identity(&j->job, j->refund_id, sizeof(j->refund_id));
    j->rpr.attempts = j->qj.attempts;
    j->rpr.age_ms = j->pr.age_ms;
    job_set_state(j, JOB_OPENING);
    uv_queue_work(j->w->loop, &j->work, open_work, after_open);
}

/* --- CANCELLING and RESOLVING ----------------------------------------------------------------- */

static void cancel_work(uv_work_t *req)
{
    struct wjob *j = req->data;
    const struct refund_row *r = &j->rf.row;
    /* The amount was resolved when the row was created, so the PG is always told exactly
     * how much, never "the whole balance" (which could be more than we recorded). */
    gateway_cancel_work(j->w->gateway, r->user_id, r->transaction_key, r->id, r->amount_minor,
                        j->job.reason, &j->gw);
}

static void after_cancel(uv_work_t *req, int status)
{
    struct wjob *j = req->data;
    struct worker *w = j->w;
    job_breaker_record(j, BREAKER_CLASS_CANCEL, status);
    if (job_drop_if_abandoned(j))
        return;
    if (status == UV_ECANCELED) {
        finish_with_retry(j, 0, false, false);
        return;
    }
    refund_note_pg(j);
    j->rpr.rand64 = retry_rand_next(&w->rand_state);
    refund_after_cancel(&w->refund_policy, &j->rpr, &j->rf.row, &j->gw, &j->rd);
    if (j->rd.verdict == REFUND_DO_RESOLVE)
        copy_text(j->conflict_error, sizeof(j->conflict_error), j->gw.error);
    refund_act(j);
}

static void resolve_work(uv_work_t *req)
{
    struct wjob *j = req->data;
    const struct refund_row *r = &j->rf.row;
    gateway_query_status_work(j->w->gateway, r->user_id, r->transaction_key, r->order_id, &j->gw);
}

static void after_resolve(uv_work_t *req, int status)
{
    struct wjob *j = req->data;
    struct worker *w = j->w;
    job_breaker_record(j, BREAKER_CLASS_STATUS, status);
    if (job_drop_if_abandoned(j))
        return;
    if (status == UV_ECANCELED) {
        finish_with_retry(j, 0, false, false);
        return;
    }
    j->rpr.rand64 = retry_rand_next(&w->rand_state);
    refund_after_resolve(&w->refund_policy, &j->rpr, &j->rf.row, j->conflict_error, &j->gw, &j->rd);
    if (j->rd.verdict == REFUND_DO_COMPLETE)
        refund_note_pg(j); /* the PG's view of the payment, e.g. CANCELLED */
    refund_act(j);
}

/* Starts a PG call under breaker class cls, or decides what to do when it refuses. */
static void refund_call(struct wjob *j, enum breaker_class cls, enum job_state state,
                        uv_work_cb work, uv_after_work_cb after)
{
    struct worker *w = j->w;
    uint64_t retry_in_ms = 0;
    if (!breaker_admits(w, cls, &retry_in_ms)) {
        j->rpr.rand64 = retry_rand_next(&w->rand_state);
        refund_breaker_open(&w->refund_policy, &j->rpr, retry_in_ms, &j->rd);
        refund_act(j);
        return;
    }
    j->breaker_admitted = true;
    job_set_state(j, state);
    uv_queue_work(w->loop, &j->work, work, after);
}

/* --- MARKING ---------------------------------------------------------------------------------- */

static void mark_work(uv_work_t *req)
{
    struct wjob *j = req->data;
    struct store_outcome log;
    bool terminal = j->mark_to == REFUND_FAILED || j->mark_to == REFUND_MANUAL_REVIEW;
    if (terminal)
        refund_log_fill(j, &log, "dead", j->rd.reason, NULL);
    j->work_err[0] = '\0';
    j->work_status = store_refund_mark_work(
        j->w->store, j->refund_id, j->mark_to, j->pg_status[0] != '\0' ? j->pg_status : NULL,
        terminal ? j->rd.reason : NULL, j->last_error[0] != '\0' ? j->last_error : NULL,
        terminal ? &log : NULL, &j->mark_after, j->work_err, sizeof(j->work_err));
}

static void after_mark(uv_work_t *req, int status)
{
    struct wjob *j = req->data;
    struct log_ctx c = job_ctx(j);
    if (job_drop_if_abandoned(j))
        return;
    if (status == UV_ECANCELED) {
        finish_with_retry(j, 0, false, false);
        return;
    }
    if (j->work_status != 0) {
        log_write(LOG_LEVEL_WARN, &c, j->work_err, "could not record refund %s as %s", j->refund_id,
                  refund_state_name(j->mark_to));
        if (j->mark_to == REFUND_UNKNOWN && j->work_status != SETTLE_ESHUTDOWN) {
            /* The retry with the same key is what matters; UNKNOWN is for people. */
            refund_sync_finish(j);
            finish_with_retry(j, j->rd.delay_ms, true, false);
            return;
        }
        if (j->work_status == SETTLE_EUNAVAILABLE || j->work_status == SETTLE_ESHUTDOWN) {
            refund_store_unavailable(j);
            return;
        }
        job_dead(j, "store_rejected", j->work_err[0] != '\0' ? j->work_err : "refund mark failed");
        return;
    }
    if (j->mark_after == REFUND_SUCCEEDED) {
        /* Another delivery got the PG's confirmation first: finish its remaining steps
         * (they are idempotent) instead of contradicting it. */
        snprintf(j->rd.detail, sizeof(j->rd.detail), "refund %s succeeded in another delivery",
                 j->refund_id);
        j->rd.verdict = REFUND_DO_COMPLETE;
        j->rd.attempt_failed = false;
        refund_act(j);
        return;
    }
    if (j->mark_after == REFUND_FAILED && j->mark_to != REFUND_FAILED) {
        job_dead(j, "gateway_rejected", "another delivery recorded the refund as FAILED");
        return;
    }
    refund_sync_finish(j);
    if (j->mark_to == REFUND_UNKNOWN) {
        finish_with_retry(j, j->rd.delay_ms, true, false);
        return;
    }
    /* FAILED or MANUAL_REVIEW, with the job_log row written in the same transaction. */
    j->dead_reason = j->rd.reason;
    j->result = j->rd.reason;
    j->finish = FINISH_BURY;
    job_finish(j);
}

static void refund_mark(struct wjob *j, enum refund_state to)
{
    j->mark_to = to;
    job_set_state(j, JOB_MARKING);
    uv_queue_work(j->w->loop, &j->work, mark_work, after_mark);
}

/* --- RESTOCKING and SETTLING ------------------------------------------------------------------ */

static void on_restocked(void *arg, int status, enum stock_result res)
{
    struct wjob *j = arg;
    struct log_ctx c = job_ctx(j);
    if (job_drop_if_abandoned(j))
        return;
    if (status != 0) {
        /* The money went back at the PG: record that first, and come back for the units
         * (the next delivery finds the row SUCCEEDED and restocks, idempotent by refund
         * id). */
        j->restock_failed = true;
        j->restock_status = status;
        snprintf(j->last_error, sizeof(j->last_error), "Redis restock failed: %s",
                 settle_strerror(status));
        log_write(LOG_LEVEL_WARN, &c, settle_strerror(status),
                  "Redis restock of refund %s failed; recording the refund and retrying",
                  j->refund_id);
    } else {
        j->stock_res = res;
        log_write(LOG_LEVEL_INFO, &c, NULL, "Redis restock of refund %s: %s", j->refund_id,
                  stock_result_name(res));
    }
    refund_settle(j);
}

static void refund_restock(struct wjob *j)
{
    struct worker *w = j->w;
    struct stock_items items = {0};
    items.n = j->rf.n_items;
    for (unsigned i = 0; i < items.n && i < STOCK_ITEMS_MAX; i++) {
        items.sku[i] = j->rf.items[i].sku;
        items.qty[i] = j->rf.items[i].qty;
    }
    if (items.n == 0) {
        refund_settle(j);
        return;
    }
    job_set_state(j, JOB_RESTOCKING);
    int rc = stock_restock(w->cmd, w->cfg->namespace_, j->rf.row.order_id, j->refund_id, &items,
                           on_restocked, j);
    if (rc != 0)
        on_restocked(j, rc, STOCK_MISSING);
}

static void settle_work(uv_work_t *req)
{
    struct wjob *j = req->data;
    struct store_outcome log;
    /* A failed Redis restock leaves the job unfinished (it comes back for the units), so it
     * gets its job_log row only on the delivery that ends it. */
    refund_log_fill(j, &log, "done", "refunded", "already_refunded");
    struct store_refund_success in = {
        .refund_id = j->refund_id,
        .order_id = j->rf.row.order_id,
        .pg_status = j->pg_status[0] != '\0' ? j->pg_status : NULL,
        .restock = j->rf.row.restock,
        .log = j->restock_failed ? NULL : &log,
    };
    j->work_err[0] = '\0';
    j->work_status =
        store_refund_succeed_work(j->w->store, &in, &j->rres, j->work_err, sizeof(j->work_err));
}

static void after_settle(uv_work_t *req, int status)
{
    struct wjob *j = req->data;
    struct worker *w = j->w;
    struct log_ctx c = job_ctx(j);
    if (job_drop_if_abandoned(j))
        return;
    if (status == UV_ECANCELED) {
        finish_with_retry(j, 0, false, false);
        return;
    }
    if (j->work_status == SETTLE_EUNAVAILABLE || j->work_status == SETTLE_ESHUTDOWN) {
        refund_store_unavailable(j);
        return;
    }
    if (j->work_status != 0) {
        /* The PG refunded but PostgreSQL refuses to record it: a person must look. The row
         * keeps its state, so a re-driven job asks the PG again (same key, no second
         * refund) and records it. */
        log_write(LOG_LEVEL_ERROR, &c, j->work_err,
                  "refund %s was made at the PG but could not be recorded", j->refund_id);
        job_dead(j, "store_rejected",
                 j->work_err[0] != '\0' ? j->work_err : settle_strerror(j->work_status));
        return;
    }
    if (j->rres.state_after != REFUND_SUCCEEDED) {
        /* The PG confirmed a refund another delivery recorded as FAILED: never guess. */
        log_write(LOG_LEVEL_ERROR, &c, NULL,
                  "PG confirmed refund %s but its row is %s; leaving it for review", j->refund_id,
                  refund_state_name(j->rres.state_after));
        job_dead(j, "refund_conflict", "PG confirmed a refund recorded as FAILED");
        return;
    }
    if (j->restock_failed) {
        /* The refund is recorded; only Redis' units are missing. Redis unreachable: wait
         * without spending attempts (until the retry deadline); any other failure spends
         * one. Given up, `settle stock load` repairs Redis from PostgreSQL. */
        unsigned failed = j->qj.attempts + 1;
        j->rpr.rand64 = retry_rand_next(&w->rand_state);
        if (j->restock_status == SETTLE_EIO) {
            refund_outage(&w->refund_policy, &j->rpr, "restock_failed", j->last_error, &j->rd);
        } else if (failed >= w->cfg->retry_max_attempts) {
            j->rd.verdict = REFUND_DO_DEAD;
            j->rd.reason = "restock_failed";
            j->rd.attempt_failed = true;
        } else {
            j->rd.verdict = REFUND_DO_RETRY;
            j->rd.attempt_failed = true;
            j->rd.delay_ms = retry_delay_ms(failed, w->cfg->retry_base_ms, w->cfg->retry_cap_ms, 0,
                                            w->cfg->retry_after_max_ms, j->rpr.rand64);
        }
        if (j->rd.verdict == REFUND_DO_DEAD) {
            refund_sync_finish(j);
            job_dead(j, "restock_failed", j->last_error);
            return;
        }
        snprintf(j->rd.detail, sizeof(j->rd.detail), "refund recorded; Redis restock retries");
        refund_sync_finish(j);
        finish_with_retry(j, j->rd.delay_ms, j->rd.verdict == REFUND_DO_RETRY, false);
        return;
    }
    j->result = j->rres.changed ? "refunded" : "already_refunded";
    snprintf(j->rd.detail, sizeof(j->rd.detail),
             "refund %.64s of %" PRId64 " %s; order %s, payment %s%s", j->refund_id,
             j->rf.row.amount_minor, j->rres.changed ? "recorded" : "was recorded already",
             j->rres.order_status, j->rres.payment_status,
             j->rres.restocked ? "; products restocked" : "");
    refund_sync_finish(j);
    j->finish = FINISH_ACK;
    job_finish(j);
}

static void refund_settle(struct wjob *j)
{
    job_set_state(j, JOB_SETTLING);
    uv_queue_work(j->w->loop, &j->work, settle_work, after_settle);
}

/* --- Carrying out a refund decision ----------------------------------------------------------- */

static void refund_act(struct wjob *j)
{
    copy_text(j->last_error, sizeof(j->last_error), j->rd.detail);
    switch (j->rd.verdict) {
    case REFUND_DO_CANCEL:
        refund_call(j, BREAKER_CLASS_CANCEL, JOB_CANCELLING, cancel_work, after_cancel);
        return;
    case REFUND_DO_RESOLVE:
        refund_call(j, BREAKER_CLASS_STATUS, JOB_RESOLVING, resolve_work, after_resolve);
        return;
    case REFUND_DO_COMPLETE:
        if (j->rf.row.restock) {
            refund_restock(j);
            return;
        }
        refund_settle(j);
        return;
    case REFUND_DO_RETRY:
        if (j->rd.mark_unknown) {
            refund_mark(j, REFUND_UNKNOWN);
            return;
        }
        refund_sync_finish(j);
        finish_with_retry(j, j->rd.delay_ms, true, false);
        return;
    case REFUND_DO_WAIT:
        refund_sync_finish(j);
        finish_with_retry(j, j->rd.delay_ms, false, false);
        return;
    case REFUND_DO_FAIL:
        refund_mark(j, REFUND_FAILED);
        return;
    case REFUND_DO_MANUAL_REVIEW:
        refund_mark(j, REFUND_MANUAL_REVIEW);
        return;
    case REFUND_DO_DEAD:
        refund_sync_finish(j);
        job_dead(j, j->rd.reason, j->rd.detail);
        return;
    default:
        abort();
    }
}

/* ---------------------------------------------------------------------------------------------
 * CLAIMED: validate and start.
 */
static void job_start(struct wjob *j)
{
    struct worker *w = j->w;
    const struct config *cfg = w->cfg;
    char why[JOB_WHY_MAX];

    j->pr.attempts = j->qj.attempts;
    j->pr.checks = j->qj.checks;

    if (j->qj.text_bytes > cfg->job_max_bytes || j->qj.text == NULL) {
        snprintf(why, sizeof(why),
                 "job is %zu bytes, over the %" PRIu64 "-byte limit (SETTLE_JOB_MAX_BYTES)",
                 j->qj.text_bytes, cfg->job_max_bytes);
        job_dead(j, "invalid_job", why);
        return;
    }
    if (job_decode(j->q->kind, j->qj.text, j->qj.text_len, cfg->job_max_bytes, &j->job, why,
                   sizeof(why)) != 0) {
        memset(&j->job, 0, sizeof(j->job));
        job_dead(j, "invalid_job", why);
        return;
    }
    if (j->qj.crashes >= cfg->max_deliveries) {
        snprintf(why, sizeof(why),
                 "lease expired %u times without an answer (SETTLE_MAX_DELIVERIES=%u)",
                 j->qj.crashes, cfg->max_deliveries);
        job_dead(j, "crashed_too_often", why);
        return;
    }
    if (j->q->kind == JOB_KIND_REFUND) {
        refund_start(j);
        return;
    }
    job_set_state(j, JOB_LOADING);
    db_wait(j, DB_LOAD);
}

/* ---------------------------------------------------------------------------------------------
 * Claiming.
 */
static void on_wait(void *arg, int status, long long result);

static void on_wake_timer(uv_timer_t *t)
{
    struct wqueue *q = t->data;
    q->dry = false;
    maybe_claim(q->w);
}

/* Makes the queue claim again within delay_ms: a retry falls due, a claim failed, or a
 * blocking wait is still out. The earliest request wins. */
static void arm_wake(struct wqueue *q, uint64_t delay_ms)
{
    if (q->w->draining)
        return;
    if (uv_is_active((uv_handle_t *)&q->wake_timer) &&
        uv_timer_get_due_in(&q->wake_timer) <= delay_ms)
        return;
    uv_timer_start(&q->wake_timer, on_wake_timer, delay_ms, 0);
}

static void on_claimed(void *arg, int status, struct queue_claim_result *res)
{
    struct wqueue *q = arg;
    struct worker *w = q->w;
    unsigned asked = q->reserved;
    q->claiming = false;
    q->reserved = 0;
    if (status != 0) {
        log_write(LOG_LEVEL_WARN, NULL, settle_strerror(status), "claim on queue %s failed",
                  q->name);
        arm_wake(q, 500);
        return;
    }
    q->dry = res->n < asked;
    for (size_t i = 0; i < res->n; i++) {
        struct wjob *j = job_new(q, &res->jobs[i]);
        if (j == NULL) {
            /* Out of memory: the job stays leased in Redis and comes back after the lease. */
            log_error("out of memory for a claimed job; it returns after its lease");
            continue;
        }
        w->counters.claimed++;
        j->pr.age_ms = res->now_ms > j->qj.enqueued_ms ? res->now_ms - j->qj.enqueued_ms : 0;
        job_start(j);
    }
    if (w->draining)
        return;
    if (res->n >= asked) {
        maybe_claim(w); /* the queue may hold more */
        return;
    }
    /* The list ran dry: block on the waiter connection until it has work (at most a
     * second, so a lost wake-up costs little), and claim again when the next delayed job
     * falls due; the command connection can claim while the waiter blocks. */
    if (res->next_due_in_ms >= 0)
        arm_wake(q, (uint64_t)res->next_due_in_ms);
    /* The slots this claim did not fill are free again: let the other queues have them. */
    maybe_claim(w);
    if (q->waiting)
        return;
    q->waiting = true;
    if (queue_wait(q->waiter, w->cfg->namespace_, q->name, 1000, on_wait, q) != 0) {
        q->waiting = false;
        arm_wake(q, 1000);
    }
}

static void on_wait(void *arg, int status, long long result)
{
    struct wqueue *q = arg;
    q->waiting = false;
    q->dry = false;
    if (q->w->closing)
        return;
    if (status != 0) {
        arm_wake(q, 500);
        return;
    }
    maybe_claim(q->w);
}

static void maybe_claim(struct worker *w)
{
    if (w->draining || !rconn_is_up(w->cmd))
        return;
    for (unsigned i = 0; i < w->n_queues; i++) {
        struct wqueue *q = &w->queues[i];
        if (q->claiming || q->dry)
            continue;
        unsigned reserved = 0;
        for (unsigned k = 0; k < w->n_queues; k++)
            reserved += w->queues[k].reserved;
        unsigned busy = w->in_flight + reserved;
        if (busy >= w->cfg->concurrency)
            return;
        unsigned n = w->cfg->concurrency - busy;
        if (n > w->cfg->claim_batch)
            n = w->cfg->claim_batch;
        q->claiming = true;
        q->reserved = n;
        if (queue_claim(w->cmd, w->cfg->namespace_, q->name, n, w->cfg->lease_ms,
                        w->cfg->job_max_bytes, on_claimed, q) != 0) {
            q->claiming = false;
            q->reserved = 0;
            arm_wake(q, 500);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Timers: lease heartbeat, reapers.
 */
static void on_extended(void *arg, int status, size_t n_lost, char **lost_ids)
{
    struct worker *w = arg;
    w->extend_busy = false;
    if (status != 0) {
        log_write(LOG_LEVEL_WARN, NULL, settle_strerror(status), "lease heartbeat failed");
        return;
    }
    for (size_t i = 0; i < n_lost; i++) {
        for (struct wjob *j = w->jobs; j != NULL; j = j->next) {
            if (lost_ids[i] != NULL && strcmp(j->qj.id, lost_ids[i]) == 0 && !j->lost) {
                struct log_ctx c = job_ctx(j);
                j->lost = true;
                log_write(LOG_LEVEL_WARN, &c, NULL,
                          "lease lost while working (another delivery may run it too; effects "
                          "are idempotent)");
            }
        }
    }
}

static void on_heartbeat(uv_timer_t *t)
{
    struct worker *w = t->data;
    if (w->extend_busy || !rconn_is_up(w->cmd))
        return;
    /* One call per queue; a worker has at most `concurrency` jobs, so the call is bounded. */
    for (unsigned i = 0; i < w->n_queues; i++) {
        struct wqueue *q = &w->queues[i];
        size_t n = 0;
        const char **ids = calloc(w->in_flight + 1, sizeof(*ids));
        unsigned *fences = calloc(w->in_flight + 1, sizeof(*fences));
        if (ids == NULL || fences == NULL) {
            free(ids);
            free(fences);
            return;
        }
        for (struct wjob *j = w->jobs; j != NULL; j = j->next) {
            if (j->q == q && j->state != JOB_FINISHING && !j->abandoned) {
                ids[n] = j->qj.id;
                fences[n] = j->qj.deliveries;
                n++;
            }
        }
        if (queue_extend(w->cmd, w->cfg->namespace_, q->name, w->cfg->worker_id, w->cfg->lease_ms,
                         n, ids, fences, on_extended, w) == 0)
            w->extend_busy = true;
        free(ids);
        free(fences);
    }
}

static void on_reaped(void *arg, int status, long long result)
{
    struct worker *w = arg;
    w->reap_busy = false;
    if (status != 0)
        log_write(LOG_LEVEL_WARN, NULL, settle_strerror(status), "lease reaper failed");
    if (status == 0 && result > 0) {
        log_write(LOG_LEVEL_WARN, NULL, NULL,
                  "gave back %lld job(s) whose lease expired (a worker died or stalled)", result);
        /* They are due now in the delayed set, which no waiter watches. */
        for (unsigned i = 0; i < w->n_queues; i++)
            w->queues[i].dry = false;
        maybe_claim(w);
    }
}

static void on_stock_reaped(void *arg, int status, unsigned released)
{
    struct worker *w = arg;
    w->stock_reap_busy = false;
    if (released > 0)
        metrics_reservations_reaped(w->metrics, released);
    if (status == 0 && released > 0)
        log_write(LOG_LEVEL_INFO, NULL, NULL,
                  "released %u stock reservation(s) past their deadline", released);
}

static void on_reaper(uv_timer_t *t)
{
    struct worker *w = t->data;
    if (!rconn_is_up(w->cmd))
        return;
    if (!w->reap_busy) {
        for (unsigned i = 0; i < w->n_queues; i++) {
            if (queue_reap(w->cmd, w->cfg->namespace_, w->queues[i].name, w->cfg->reaper_batch,
                           on_reaped, w) == 0)
                w->reap_busy = true;
        }
    }
    if (!w->stock_reap_busy &&
        stock_reap(w->cmd, w->cfg->namespace_, w->cfg->reaper_batch, on_stock_reaped, w) == 0)
        w->stock_reap_busy = true;
    if (++w->reaper_ticks % 60 == 0)
        log_write(LOG_LEVEL_INFO, NULL, NULL,
                  "in flight %u; claimed %" PRIu64 ", done %" PRIu64 ", dead %" PRIu64
                  ", retried %" PRIu64 ", re-checked %" PRIu64 ", waited %" PRIu64
                  "; breakers status %s, cancel %s",
                  w->in_flight, w->counters.claimed, w->counters.done, w->counters.dead,
                  w->counters.retried, w->counters.rechecked, w->counters.waited,
                  breaker_state_name(w->breakers[BREAKER_CLASS_STATUS].state),
                  breaker_state_name(w->breakers[BREAKER_CLASS_CANCEL].state));
}

/* ---------------------------------------------------------------------------------------------
 * Scheduled work: the scheduler's IDLE -> CHECKING -> RUNNING -> IDLE cycle.
 */
static void on_sched(uv_timer_t *t);

static const char *const sched_state_names[] = {"idle", "checking", "running"};

/* The one transition function of the scheduler: IDLE -> CHECKING -> (RUNNING | IDLE),
 * RUNNING -> IDLE. Anything else is a bug. */
static void sched_set_state(struct worker *w, enum sched_state to)
{
    static const bool allowed[3][3] = {
        [SCHED_IDLE] = {[SCHED_CHECKING] = 1},
        [SCHED_CHECKING] = {[SCHED_IDLE] = 1, [SCHED_RUNNING] = 1},
        [SCHED_RUNNING] = {[SCHED_IDLE] = 1},
    };
    enum sched_state from = w->sched_state;
    if ((unsigned)from > SCHED_RUNNING || (unsigned)to > SCHED_RUNNING || !allowed[from][to]) {
        fprintf(stderr, "%s:%d: illegal scheduler transition %d -> %d\n", __FILE__, __LINE__,
                (int)from, (int)to);
        abort();
    }
    w->sched_state = to;
    log_write(LOG_LEVEL_DEBUG, NULL, NULL, "scheduler %s -> %s", sched_state_names[from],
              sched_state_names[to]);
}

/* Looks again in a second, plus jitter so that workers started together do not all query
 * PostgreSQL in the same millisecond (the claim is safe either way; this only spreads load). */
static void sched_arm(struct worker *w)
{
    if (!w->cfg->scheduler || w->draining || w->closing)
        return;
    uint64_t jitter = retry_rand_next(&w->rand_state) % 250;
    uv_timer_start(&w->sched, on_sched, 1000 + jitter, 0);
}

static void sched_run_work(uv_work_t *req)
{
    struct worker *w = req->data;
    tasks_execute_work(&w->tenv, &w->trun, &w->tout);
}

static void after_sched_run(uv_work_t *req, int status)
{
    struct worker *w = req->data;
    sched_set_state(w, SCHED_IDLE);
    if (status == 0) {
        /* The registry takes its mutex; counting here, after the task returned, keeps the
         * pool thread away from everything the loop owns. */
        if (w->tout.stock_mismatches > 0)
            metrics_stock_mismatches(w->metrics, w->tout.stock_mismatches);
        for (size_t i = 0; i < w->tout.n_gw; i++)
            metrics_gateway_request(w->metrics, w->tout.gw[i].endpoint, w->tout.gw[i].cls,
                                    w->tout.gw[i].seconds);
    }
    tasks_outcome_free(&w->tout);
    sched_arm(w);
}

static void sched_check_work(uv_work_t *req)
{
    struct worker *w = req->data;
    w->sched_status = tasks_check_work(&w->tenv, &w->trun);
}

static void after_sched_check(uv_work_t *req, int status)
{
    struct worker *w = req->data;
    if (status == 0 && w->sched_status == 0) {
        /* Claimed: run it even while draining. The cancel flag makes it stop at once and
         * record the run as interrupted, instead of leaving a "running" row to go stale. */
        sched_set_state(w, SCHED_RUNNING);
        w->sched_work.data = w;
        if (uv_queue_work(w->loop, &w->sched_work, sched_run_work, after_sched_run) == 0)
            return;
    }
    sched_set_state(w, SCHED_IDLE);
    sched_arm(w);
}

static void on_sched(uv_timer_t *t)
{
    struct worker *w = t->data;
    if (w->sched_state != SCHED_IDLE || w->draining || w->closing)
        return;
    if (!w->postgres_up) {
        /* The arbiter is PostgreSQL: without it there is nothing to check. */
        sched_arm(w);
        return;
    }
    sched_set_state(w, SCHED_CHECKING);
    w->sched_work.data = w;
    if (uv_queue_work(w->loop, &w->sched_work, sched_check_work, after_sched_check) != 0) {
        sched_set_state(w, SCHED_IDLE);
        sched_arm(w);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Gauges and health: queue depths from Redis, PostgreSQL reachability, readiness.
 */
static void publish_health(struct worker *w)
{
    metrics_set_health(w->metrics, w->cmd != NULL && rconn_is_up(w->cmd), w->postgres_up,
                       w->draining);
}

/* The first health check that finds PostgreSQL also opens and warms the connections the
 * batches use (and one more, for whatever else holds a connection at the time), so the first
 * jobs pay neither the connect nor the outcome function's compile. */
static void ping_work(uv_work_t *req)
{
    struct worker *w = req->data;
    char err[STORE_ERR_MAX];
    if (w->warmed) {
        w->ping_status = store_ping_work(w->store, err, sizeof(err));
        return;
    }
    w->ping_status = store_warm_work(w->store, w->db_slots + 1, err, sizeof(err));
    if (w->ping_status == 0)
        w->warmed = true;
}

static void after_ping(uv_work_t *req, int status)
{
    struct worker *w = req->data;
    w->ping_busy = false;
    bool up = status == 0 && w->ping_status == 0;
    if (up != w->postgres_up)
        log_write(up ? LOG_LEVEL_INFO : LOG_LEVEL_WARN, NULL,
                  up ? NULL : settle_strerror(w->ping_status), "PostgreSQL is %s",
                  up ? "reachable" : "unreachable");
    w->postgres_up = up;
    publish_health(w);
}

/* Queue depths are facts about Redis, not about this process: every worker reports every
 * queue (dashboards take the max across workers), so a queue nobody works still shows. */
static void on_queue_stats(void *arg, int status, const struct queue_stats *st)
{
    struct gauge_ctx *g = arg;
    struct worker *w = g->w;
    w->gauges_busy--;
    if (status == 0)
        metrics_set_queue(w->metrics, g->queue, st->ready, st->delayed, st->inflight, st->dead,
                          st->oldest_ready_age_ms > 0 ? (double)st->oldest_ready_age_ms / 1000.0
                                                      : 0.0);
}

static void on_gauges(uv_timer_t *t)
{
    struct worker *w = t->data;
    metrics_loop_beat(w->metrics, now_ms(w));
    publish_health(w);
    if (!w->ping_busy && !w->closing) {
        w->ping.data = w;
        if (uv_queue_work(w->loop, &w->ping, ping_work, after_ping) == 0)
            w->ping_busy = true;
    }
    if (w->gauges_busy > 0 || !rconn_is_up(w->cmd))
        return;
    for (unsigned i = 0; i < GAUGE_QUEUES; i++) {
        if (queue_stats(w->cmd, w->cfg->namespace_, w->gauge_ctx[i].queue, on_queue_stats,
                        &w->gauge_ctx[i]) == 0)
            w->gauges_busy++;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Redis connection state.
 */
static void on_cmd_state(void *arg, int up)
{
    struct worker *w = arg;
    publish_health(w);
    if (!up)
        return;
    /* Anything may have happened while the connection was down. */
    for (unsigned i = 0; i < w->n_queues; i++)
        w->queues[i].dry = false;
    maybe_claim(w);
}

static void on_waiter_state(void *arg, int up)
{
    struct wqueue *q = arg;
    if (up)
        maybe_claim(q->w);
}

/* ---------------------------------------------------------------------------------------------
 * Shutdown.
 */
static void on_handle_closed(uv_handle_t *h)
{
    struct worker *w = h->data;
    w->open_handles--;
}

static void on_async_closed(void *arg)
{
    struct worker *w = arg;
    w->open_handles--;
}

static void close_handle(struct worker *w, uv_handle_t *h)
{
    if (!uv_is_closing(h)) {
        /* Some handles carry another owner in data (a queue's timer): the close callback
         * only needs the worker. */
        h->data = w;
        w->open_handles++;
        uv_close(h, on_handle_closed);
    }
}

/* Everything in flight is finished or handed back: close every handle so uv_run returns. */
static void worker_close(struct worker *w)
{
    if (w->closing)
        return;
    w->closing = true;
    log_write(LOG_LEVEL_INFO, NULL, NULL,
              "worker stopped: claimed %" PRIu64 ", done %" PRIu64 ", dead %" PRIu64
              ", retried %" PRIu64 ", handed back %" PRIu64,
              w->counters.claimed, w->counters.done, w->counters.dead, w->counters.retried,
              w->counters.handed_back);
    if (w->counters.claimed > 0) {
        /* Where a job's time in flight went, on average: what to look at when throughput is
         * below concurrency / gateway latency. */
        char line[512];
        size_t off = 0;
        for (int i = 0; i < JOB_STATE_COUNT && off < sizeof(line); i++) {
            if (w->state_ns[i] == 0)
                continue;
            int k = snprintf(line + off, sizeof(line) - off, "%s%s %.2f", off > 0 ? ", " : "",
                             job_state_names[i],
                             (double)w->state_ns[i] / 1e6 / (double)w->counters.claimed);
            if (k < 0)
                break;
            off += (size_t)k;
        }
        log_write(LOG_LEVEL_INFO, NULL, NULL, "mean ms per claimed job by state: %s", line);
    }
    for (int k = DB_LOAD; k <= DB_STORE; k++) {
        uint64_t nb = w->db_stats[k].batches;
        if (nb == 0)
            continue;
        /* A batch's life: waiting for a pool thread, running (PostgreSQL), waiting for the
         * loop to take the answers back. */
        log_write(LOG_LEVEL_INFO, NULL, NULL,
                  "PostgreSQL %s batches: %" PRIu64 ", mean %.1f jobs; mean ms queued %.2f, "
                  "running %.2f, back to the loop %.2f",
                  k == DB_LOAD ? "load" : "store", nb, (double)w->db_stats[k].jobs / (double)nb,
                  (double)w->db_stats[k].wait_ns / 1e6 / (double)nb,
                  (double)w->db_stats[k].run_ns / 1e6 / (double)nb,
                  (double)w->db_stats[k].back_ns / 1e6 / (double)nb);
    }
    uv_timer_stop(&w->heartbeat);
    close_handle(w, (uv_handle_t *)&w->heartbeat);
    close_handle(w, (uv_handle_t *)&w->sched);
    close_handle(w, (uv_handle_t *)&w->gauges);
    close_handle(w, (uv_handle_t *)&w->reaper);
    close_handle(w, (uv_handle_t *)&w->grace);
    close_handle(w, (uv_handle_t *)&w->run_limit);
    close_handle(w, (uv_handle_t *)&w->sigterm);
    close_handle(w, (uv_handle_t *)&w->sigint);
    for (unsigned i = 0; i < w->n_queues; i++) {
        close_handle(w, (uv_handle_t *)&w->queues[i].wake_timer);
        if (w->queues[i].waiter != NULL) {
            w->open_handles++;
            rconn_close(w->queues[i].waiter, on_async_closed, w);
            w->queues[i].waiter = NULL;
        }
    }
    if (w->cmd != NULL) {
        w->open_handles++;
        rconn_close(w->cmd, on_async_closed, w);
        w->cmd = NULL;
    }
    if (w->httploop != NULL) {
        /* No job is in flight any more, so no transfer is. */
        w->open_handles++;
        httploop_close(w->httploop, on_async_closed, w);
        w->httploop = NULL;
    }
}

static void on_handed_back(void *arg, int status, long long result)
{
    struct wjob *j = arg;
    struct worker *w = j->w;
    if (status == 0 && result == 1)
        w->counters.handed_back++;
    /* The job may still have pool work running; it is dropped when that returns. If its
     * pending call already returned while we waited for Redis, drop it now. */
    j->abandoned = true;
    j->handing_back = false;
    if (j->state == JOB_FINISHING || j->call_returned)
        job_done(j);
}

/* The grace period is over: give every unfinished job back to the queue (due now, no attempt
 * spent) so another worker picks it up at once instead of waiting for the lease. */
static void on_grace_over(uv_timer_t *t)
{
    struct worker *w = t->data;
    unsigned n = 0;
    for (struct wjob *j = w->jobs; j != NULL; j = j->next) {
        if (j->state == JOB_FINISHING || j->abandoned)
            continue;
        n++;
        j->abandoned = true;
        /* Without the hand-back (Redis down) the lease brings the job back instead. */
        j->handing_back = rconn_is_up(w->cmd) &&
                          queue_retry(w->cmd, w->cfg->namespace_, j->q->name, j->qj.id,
                                      j->qj.deliveries, 0, false, false, on_handed_back, j) == 0;
    }
    log_write(LOG_LEVEL_WARN, NULL, NULL,
              "shutdown grace of %" PRIu64 " ms over: handed %u unfinished job(s) back",
              w->cfg->shutdown_grace_ms, n);
    if (w->in_flight == 0)
        worker_close(w);
}

static void worker_drain(struct worker *w, const char *why)
{
    if (w->draining)
        return;
    w->draining = true;
    publish_health(w);
    log_write(LOG_LEVEL_INFO, NULL, NULL, "%s: draining %u job(s) in flight (grace %" PRIu64 " ms)",
              why, w->in_flight, w->cfg->shutdown_grace_ms);
    /* A task in progress stops at its next step and records what it did. */
    atomic_store(&w->task_cancel, 1);
    uv_timer_stop(&w->sched);
    for (unsigned i = 0; i < w->n_queues; i++)
        uv_timer_stop(&w->queues[i].wake_timer);
    uv_timer_stop(&w->run_limit);
    if (w->in_flight == 0) {
        worker_close(w);
        return;
    }
    uv_timer_start(&w->grace, on_grace_over, w->cfg->shutdown_grace_ms, 0);
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct worker *w = h->data;
    if (w->draining) {
        /* A second signal: the operator wants out now. Leases bring the jobs back. */
        log_write(LOG_LEVEL_WARN, NULL, NULL,
                  "second signal: exiting now; %u unfinished job(s) return after their lease",
                  w->in_flight);
        fflush(stdout);
        _exit(128 + signum);
    }
    worker_drain(w, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

static void on_run_limit(uv_timer_t *t)
{
    worker_drain(t->data, "SETTLE_RUN_SECONDS reached");
}

/* ---------------------------------------------------------------------------------------------
 * Start-up.
 */
static void policy_from_config(struct reconcile_policy *p, const struct config *c)
{
    p->retry_base_ms = c->retry_base_ms;
    p->retry_cap_ms = c->retry_cap_ms;
    p->retry_max_attempts = c->retry_max_attempts;
    p->retry_after_max_ms = c->retry_after_max_ms;
    p->retry_deadline_ms = c->retry_deadline_ms;
    p->check_schedule = c->check_schedule;
    p->payment_window_ms = c->payment_window_ms;
    p->pending_max_age_ms = c->pending_max_age_ms;
}

/* Refunds retry on the same schedule as reconcile jobs. */
static void refund_policy_from_config(struct refund_policy *p, const struct config *c)
{
    p->retry_base_ms = c->retry_base_ms;
    p->retry_cap_ms = c->retry_cap_ms;
    p->retry_max_attempts = c->retry_max_attempts;
    p->retry_after_max_ms = c->retry_after_max_ms;
    p->retry_deadline_ms = c->retry_deadline_ms;
}

int worker_run(const struct config *cfg)
{
    struct worker *w = calloc(1, sizeof(*w));
    int ret = 1;
    if (w == NULL)
        return 1;
    w->cfg = cfg;
    w->rand_state = wall_ms() ^ ((uint64_t)getpid() << 32);
    policy_from_config(&w->policy, cfg);
    refund_policy_from_config(&w->refund_policy, cfg);
    for (int i = 0; i < BREAKER_CLASS_COUNT; i++)
        breaker_init(&w->breakers[i], &cfg->breaker, 0);

    char desc[8192];
    if (config_describe(cfg, desc, sizeof(desc)) > 0)
        log_write(LOG_LEVEL_INFO, NULL, NULL, "effective configuration: %s", desc);

    struct config_redis_addr addr;
    if (config_parse_redis_url(cfg->redis_url, &addr) != 0) {
        log_error("SETTLE_REDIS_URL does not parse");
        goto out_free;
    }
    struct gateway_config gcfg = {
        .base_url = cfg->gateway_url,
        .connect_timeout_ms = cfg->gateway_connect_timeout_ms,
        .timeout_ms = cfg->gateway_timeout_ms,
        .body_max_bytes = cfg->gateway_body_max_bytes,
        /* The orphan sweep's page fetchers and the task thread
         * borrow handles too; they must not take the jobs'. */
        .max_handles = cfg->concurrency + (cfg->scheduler ? cfg->orphan_concurrency + 1 : 0)};
    if (gateway_create(&w->gateway, &gcfg) != 0) {
        log_error("could not create the PG client");
        goto out_free;
    }
    struct store_config scfg = {.conninfo = cfg->database_url,
                                .pool_size = cfg->db_pool_size,
                                .statement_timeout_ms = cfg->db_statement_timeout_ms,
                                .connect_timeout_ms = 5000,
                                .prepared = cfg->db_prepared};
    if (store_create(&w->store, &scfg) != 0) {
        log_error("could not create the PostgreSQL pool");
        goto out_free;
    }
    /* Few batches in flight: while they run the next jobs gather (group commit), which is
     * what saves PostgreSQL work; more batches at once make each one smaller and only add
     * contention. Connections beyond them serve refunds' own transactions, the scheduler and
     * the health check; with a pool too small for that, batches wait for a connection. */
    w->db_slots = cfg->db_batch_concurrency; /* config: 1..256 */
    /* config: 1..concurrency once resolved; a hand-built config may leave it 0. */
    w->status_slots = cfg->status_concurrency != 0 && cfg->status_concurrency < cfg->concurrency
                          ? cfg->status_concurrency
                          : cfg->concurrency;
    w->db = calloc(w->db_slots, sizeof(*w->db));
    if (w->db == NULL)
        goto out_free;
    for (unsigned i = 0; i < w->db_slots; i++) {
        w->db[i].w = w;
        w->db[i].work.data = &w->db[i];
    }

    if (metrics_create(&w->metrics, SETTLE_VERSION, cfg->concurrency) != 0)
        goto out_free;
    /* Every endpoint's breaker starts closed and visible, so alerts see a series at once. */
    for (int i = 0; i < BREAKER_CLASS_COUNT; i++)
        metrics_breaker(w->metrics, breaker_class_names[i], BREAKER_CLOSED, NULL);
    if (cfg->metrics_addr[0] != '\0') {
        char err[256];
        if (metrics_server_start(&w->http, cfg->metrics_addr, w->metrics, err, sizeof(err)) != 0) {
            log_write(LOG_LEVEL_ERROR, NULL, err, "cannot serve metrics and health checks");
            goto out_free;
        }
        log_write(LOG_LEVEL_INFO, NULL, NULL, "serving /metrics, /healthz, /readyz on %s",
                  cfg->metrics_addr);
    }

    w->loop = malloc(sizeof(*w->loop));
    if (w->loop == NULL || uv_loop_init(w->loop) != 0) {
        free(w->loop);
        w->loop = NULL;
        goto out_free;
    }

    if (httploop_create(&w->httploop, w->loop) != 0) {
        log_error("could not set up the PG client on the loop");
        goto out_loop;
    }
    char name[160];
    snprintf(name, sizeof(name), "settle:%s", cfg->worker_id);
    if (rconn_create(&w->cmd, w->loop, &addr, name, on_cmd_state, w) != 0)
        goto out_loop;
    for (unsigned i = 0; i < cfg->n_queues; i++) {
        struct wqueue *q = &w->queues[w->n_queues];
        enum job_kind kind;
        if (job_kind_parse(cfg->queues[i], &kind) != 0)
            continue;
        q->w = w;
        q->name = cfg->queues[i];
        q->kind = kind;
        uv_timer_init(w->loop, &q->wake_timer);
        q->wake_timer.data = q;
        char wname[200];
        snprintf(wname, sizeof(wname), "settle:%s:wait:%s", cfg->worker_id, q->name);
        if (rconn_create(&q->waiter, w->loop, &addr, wname, on_waiter_state, q) != 0)
            goto out_loop;
        w->n_queues++;
    }

    uv_timer_init(w->loop, &w->heartbeat);
    uv_timer_init(w->loop, &w->gauges);
    w->gauges.data = w;
    w->gauge_ctx[0] = (struct gauge_ctx){w, job_kind_name(JOB_KIND_RECONCILE)};
    w->gauge_ctx[1] = (struct gauge_ctx){w, job_kind_name(JOB_KIND_REFUND)};
    uv_timer_start(&w->gauges, on_gauges, 0, 2000);
    uv_timer_init(w->loop, &w->reaper);
    uv_timer_init(w->loop, &w->sched);
    w->sched.data = w;
    atomic_init(&w->task_cancel, 0);
    w->tenv = (struct tasks_env){.cfg = cfg,
                                 .store = w->store,
                                 .gateway = w->gateway,
                                 .redis = addr,
                                 .worker_id = cfg->worker_id,
                                 .cancel = &w->task_cancel,
                                 .decisions = NULL};
    uv_timer_init(w->loop, &w->grace);
    uv_timer_init(w->loop, &w->run_limit);
    uv_signal_init(w->loop, &w->sigterm);
    uv_signal_init(w->loop, &w->sigint);
    w->heartbeat.data = w->reaper.data = w->grace.data = w->run_limit.data = w;
    w->sigterm.data = w->sigint.data = w;
    uint64_t beat = cfg->lease_ms / 3 > 0 ? cfg->lease_ms / 3 : 1;
    uv_timer_start(&w->heartbeat, on_heartbeat, beat, beat);
    uv_timer_start(&w->reaper, on_reaper, cfg->reaper_interval_ms, cfg->reaper_interval_ms);
    if (cfg->run_seconds > 0)
        uv_timer_start(&w->run_limit, on_run_limit, cfg->run_seconds * 1000, 0);
    sched_arm(w);
    uv_signal_start(&w->sigterm, on_signal, SIGTERM);
    uv_signal_start(&w->sigint, on_signal, SIGINT);

    log_write(LOG_LEVEL_INFO, NULL, NULL,
              "worker %s started: %u queue(s), concurrency %u (status queries %u), lease %" PRIu64
              " ms, scheduled tasks %s",
              cfg->worker_id, w->n_queues, cfg->concurrency, w->status_slots, cfg->lease_ms,
              cfg->scheduler ? "on" : "off");
    uv_run(w->loop, UV_RUN_DEFAULT);
    ret = 0;

out_loop:
    if (ret != 0) {
        /* Start-up failed half way: close what was opened so the loop can be closed. */
        w->draining = true;
        worker_close(w);
        uv_run(w->loop, UV_RUN_DEFAULT);
    }
    if (uv_loop_close(w->loop) != 0) {
        log_error("loop closed with handles still open");
        ret = ret != 0 ? ret : 1;
    }
    free(w->loop);
out_free:
    /* The HTTP thread reads the registry: stop it before freeing anything it reads. */
    metrics_server_stop(w->http);
    metrics_destroy(w->metrics);
    gateway_destroy(w->gateway);
    store_destroy(w->store);
    free(w->db);
    free(w);
    return ret;
}
