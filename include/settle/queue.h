/*
 * queue.h - the Redis job queue: atomic batched claims under leases, fenced acks, durable
 * retries through a delayed set, a reaper that gives crashed workers' jobs back, and the
 * dead-letter queue. Every operation is one of the shipped Lua scripts (lua/queue_*.lua,
 * lua/dlq_redrive.lua), so each is atomic.
 *
 * Redis keys (all in the "{ns}" hash slot):
 *   {ns}:queue:<q>          LIST   ready jobs, raw producer JSON; LPUSH in, taken from the right
 *   {ns}:delayed:<q>        ZSET   job id -> due ms (retries, re-checks, redeliveries)
 *   {ns}:inflight:<q>       ZSET   job id -> lease expiry ms
 *   {ns}:jobs               HASH   job id -> "attempts deliveries crashes checks enqueued_ms"
 *   {ns}:payloads           HASH   job id -> job text
 *   {ns}:seq                STRING job id sequence
 *   {ns}:dedup:<q>:<id>     STRING producer id marker while that job is live
 *   {ns}:dead               LIST   DLQ envelopes (JSON), newest first
 *   {ns}:dead:jobs          HASH   job id -> job text of dead jobs, byte for byte
 *   {ns}:dead:count         HASH   queue -> DLQ entries
 *   {ns}:workers            ZSET   worker id -> last heartbeat ms
 *
 * Threads: the async functions run on the loop thread and follow rconn's callback contract
 * (0 returned: the callback runs exactly once; an error returned: never). The queue_sync_*
 * functions are for CLI commands.
 */
#ifndef SETTLE_QUEUE_H
#define SETTLE_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "settle/rconn.h"

#define QUEUE_ID_MAX 48
#define QUEUE_DEDUP_TTL_MS (7ULL * 24 * 3600 * 1000)

struct queue_job {
    char id[QUEUE_ID_MAX];
    char *text;          /* malloc'd, NUL-terminated; may be cut (see text_bytes) */
    size_t text_len;     /* bytes in text */
    size_t text_bytes;   /* the job's real size in Redis */
    unsigned attempts;   /* failure attempts consumed */
    unsigned deliveries; /* claims so far, this one included; also the fencing token */
    unsigned crashes;    /* leases that expired without an answer */
    unsigned checks;     /* scheduled re-checks so far */
    uint64_t enqueued_ms;
};

struct queue_claim_result {
    uint64_t now_ms;        /* Redis time of the claim */
    int64_t next_due_in_ms; /* earliest delayed job, -1 when none */
    size_t n;
    struct queue_job *jobs; /* the callee may take jobs[i].text (set it to NULL) */
};

typedef void (*queue_claim_cb)(void *arg, int status, struct queue_claim_result *res);
/* result: the script's integer answer (1 done / 0 lease lost; DLQ length for bury; count
 * for reap; 1 pushed / 0 duplicate for enqueue). */
typedef void (*queue_cb)(void *arg, int status, long long result);
typedef void (*queue_extend_cb)(void *arg, int status, size_t n_lost, char **lost_ids);

/* Builds the producer-id dedup key "{ns}:dedup:<q>:<id>". SETTLE_ETOOBIG if it does not fit. */
int queue_dedup_key(char *buf, size_t len, const char *ns, const char *queue, const char *id);

int queue_claim(struct rconn *rc, const char *ns, const char *queue, unsigned max,
                uint64_t lease_ms, uint64_t max_bytes, queue_claim_cb cb, void *arg);
/* producer_id may be NULL or "" (no dedup marker to clear). */
int queue_ack(struct rconn *rc, const char *ns, const char *queue, const char *id, unsigned fence,
              const char *producer_id, queue_cb cb, void *arg);
int queue_retry(struct rconn *rc, const char *ns, const char *queue, const char *id, unsigned fence,
                uint64_t delay_ms, bool consume_attempt, bool is_check, queue_cb cb, void *arg);
int queue_bury(struct rconn *rc, const char *ns, const char *queue, const char *id, unsigned fence,
               const char *envelope, const char *producer_id, queue_cb cb, void *arg);
int queue_extend(struct rconn *rc, const char *ns, const char *queue, const char *worker_id,
                 uint64_t lease_ms, size_t n, const char *const *ids, const unsigned *fences,
                 queue_extend_cb cb, void *arg);
int queue_reap(struct rconn *rc, const char *ns, const char *queue, unsigned limit, queue_cb cb,
               void *arg);
/* Pushes a job (deduplicated by producer_id when non-empty). */
int queue_enqueue(struct rconn *rc, const char *ns, const char *queue, const char *text, size_t len,
                  const char *producer_id, queue_cb cb, void *arg);

/*
 * Waits on `waiter` (a connection used for nothing else: a blocking command holds it) until
 * the ready list is non-empty or timeout_ms passes, without taking anything: BLMOVE from the
 * list's right end back to its right end, which leaves the list as it was. cb gets result 1
 * when the list had a job, 0 on timeout.
 */
int queue_wait(struct rconn *waiter, const char *ns, const char *queue, uint64_t timeout_ms,
               queue_cb cb, void *arg);

struct queue_stats {
    long long ready, delayed, due, inflight, dead;
    long long oldest_ready_age_ms; /* -1 when empty or unknown */
};
typedef void (*queue_stats_cb)(void *arg, int status, const struct queue_stats *st);

/* One queue's depths (lua/queue_stats.lua), for the metrics gauges. */
int queue_stats(struct rconn *rc, const char *ns, const char *queue, queue_stats_cb cb, void *arg);

/* --- Synchronous (CLI) --- */
/* 1 pushed, 0 duplicate, or an error. */
int queue_sync_enqueue(struct rconn_sync *s, const char *ns, const char *queue, const char *text,
                       size_t len, const char *producer_id);

int queue_sync_stats(struct rconn_sync *s, const char *ns, const char *queue,
                     struct queue_stats *out);
long long queue_sync_dead_total(struct rconn_sync *s, const char *ns);
long long queue_sync_workers(struct rconn_sync *s, const char *ns, uint64_t live_within_ms);

/* Reads up to `limit` DLQ envelopes starting at `offset` (0 = newest). Calls fn for each
 * with the exact stored text; stops early when fn returns non-zero. Returns how many it
 * visited, or an error. */
int queue_sync_dead_scan(struct rconn_sync *s, const char *ns, long long offset, long long limit,
                         int (*fn)(void *arg, const char *envelope, size_t len), void *arg);

/* Re-drives (retry=true) or purges one DLQ entry given its exact envelope text. 1 done,
 * 0 already gone, or an error. */
int queue_sync_dead_redrive(struct rconn_sync *s, const char *ns, const char *envelope, size_t len,
                            const char *id, const char *queue, bool retry);

#endif
