/*
 * queue.c - the Redis job queue (see queue.h for the key layout and contracts).
 *
 * Each operation builds its KEYS and ARGV on the stack and runs one Lua script through
 * rconn, so every state change of a job in Redis is atomic. Async functions run on the loop
 * thread; the small heap context of each call is freed in its reply callback.
 */
#include "settle/queue.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "settle/error.h"

#define KEY_MAX 512

/* Builds "{ns}:<fmt...>" keys; a key that does not fit is a caller bug or hostile input
 * (queue names and producer ids are bounded), reported as SETTLE_ETOOBIG. */
static int key2(char *buf, const char *ns, const char *a, const char *b)
{
    char suffix[KEY_MAX];
    int n = snprintf(suffix, sizeof(suffix), "%s%s", a, b);
    if (n < 0 || (size_t)n >= sizeof(suffix))
        return SETTLE_ETOOBIG;
    return rconn_key(buf, KEY_MAX, ns, suffix);
}

int queue_dedup_key(char *buf, size_t len, const char *ns, const char *queue, const char *id)
{
    int n = snprintf(buf, len, "{%s}:dedup:%s:%s", ns, queue, id);
    if (n < 0 || (size_t)n >= len)
        return SETTLE_ETOOBIG;
    return n;
}

/* --------------------------------------------------------------------------------------------
 * Integer-answer scripts.
 */
struct int_ctx {
    queue_cb cb;
    void *arg;
};

static void on_int_reply(void *arg, int status, const struct rconn_reply *r)
{
    struct int_ctx *c = arg;
    long long v = 0;
    if (status == 0) {
        if (rconn_reply_type(r) == RCONN_INTEGER)
            v = rconn_reply_integer(r);
        else
            status = rconn_reply_type(r) == RCONN_ERROR ? SETTLE_EREJECTED : SETTLE_EINTERNAL;
    }
    c->cb(c->arg, status, v);
    free(c);
}

static int eval_int(struct rconn *rc, const char *script, int nkeys, int argc, const char **argv,
                    const size_t *lens, queue_cb cb, void *arg)
{
    struct int_ctx *c = malloc(sizeof(*c));
    if (c == NULL)
        return SETTLE_ENOMEM;
    c->cb = cb;
    c->arg = arg;
    int ret = rconn_eval(rc, script, nkeys, argc, argv, lens, on_int_reply, c);
    if (ret != 0)
        free(c);
    return ret;
}

/* --------------------------------------------------------------------------------------------
 * Claim.
 */
struct claim_ctx {
    queue_claim_cb cb;
    void *arg;
};

static unsigned reply_uint(const struct rconn_reply *r)
{
    long long v = rconn_reply_as_ll(r, 0);
    return v < 0 ? 0 : (unsigned)v;
}

static void on_claim_reply(void *arg, int status, const struct rconn_reply *r)
{
    struct claim_ctx *c = arg;
    struct queue_claim_result res = {0};
    res.next_due_in_ms = -1;

    if (status == 0 && rconn_reply_type(r) != RCONN_ARRAY)
        status = rconn_reply_type(r) == RCONN_ERROR ? SETTLE_EREJECTED : SETTLE_EINTERNAL;
    if (status == 0 && (rconn_reply_elements(r) < 2 || (rconn_reply_elements(r) - 2) % 8 != 0))
        status = SETTLE_EINTERNAL;
    if (status == 0) {
        res.now_ms = (uint64_t)rconn_reply_as_ll(rconn_reply_element(r, 0), 0);
        res.next_due_in_ms = rconn_reply_as_ll(rconn_reply_element(r, 1), -1);
        res.n = (rconn_reply_elements(r) - 2) / 8;
        if (res.n > 0) {
            res.jobs = calloc(res.n, sizeof(*res.jobs));
            if (res.jobs == NULL) {
                /* The jobs are safe in Redis under their lease; the reaper gives them back. */
                status = SETTLE_ENOMEM;
                res.n = 0;
            }
        }
        for (size_t i = 0; i < res.n; i++) {
            size_t base = 2 + i * 8;
            struct queue_job *j = &res.jobs[i];
            size_t len = 0;
            const char *id = rconn_reply_str(rconn_reply_element(r, base), &len);
            if (len >= sizeof(j->id))
                len = sizeof(j->id) - 1;
            memcpy(j->id, id, len);
            j->id[len] = '\0';
            const char *text = rconn_reply_str(rconn_reply_element(r, base + 1), &len);
            j->text = malloc(len + 1);
            if (j->text != NULL) {
                memcpy(j->text, text, len);
                j->text[len] = '\0';
                j->text_len = len;
            }
            j->text_bytes = (size_t)rconn_reply_as_ll(rconn_reply_element(r, base + 2), 0);
            j->attempts = reply_uint(rconn_reply_element(r, base + 3));
            j->deliveries = reply_uint(rconn_reply_element(r, base + 4));
            j->crashes = reply_uint(rconn_reply_element(r, base + 5));
            j->checks = reply_uint(rconn_reply_element(r, base + 6));
            j->enqueued_ms = (uint64_t)rconn_reply_as_ll(rconn_reply_element(r, base + 7), 0);
        }
    }
    c->cb(c->arg, status, &res);
    for (size_t i = 0; i < res.n; i++)
        free(res.jobs[i].text);
    free(res.jobs);
    free(c);
}

int queue_claim(struct rconn *rc, const char *ns, const char *queue, unsigned max,
                uint64_t lease_ms, uint64_t max_bytes, queue_claim_cb cb, void *arg)
{
    char k[6][KEY_MAX];
    if (key2(k[0], ns, "queue:", queue) < 0 || key2(k[1], ns, "delayed:", queue) < 0 ||
        key2(k[2], ns, "inflight:", queue) < 0 || key2(k[3], ns, "jobs", "") < 0 ||
        key2(k[4], ns, "payloads", "") < 0 || key2(k[5], ns, "seq", "") < 0)
        return SETTLE_ETOOBIG;
    char a_max[24], a_lease[24], a_bytes[24];
    snprintf(a_max, sizeof(a_max), "%u", max);
    snprintf(a_lease, sizeof(a_lease), "%llu", (unsigned long long)lease_ms);
    snprintf(a_bytes, sizeof(a_bytes), "%llu", (unsigned long long)max_bytes);
    const char *argv[9] = {k[0], k[1], k[2], k[3], k[4], k[5], a_max, a_lease, a_bytes};

    struct claim_ctx *c = malloc(sizeof(*c));
    if (c == NULL)
        return SETTLE_ENOMEM;
    c->cb = cb;
    c->arg = arg;
    int ret = rconn_eval(rc, "queue_claim", 6, 9, argv, NULL, on_claim_reply, c);
    if (ret != 0)
        free(c);
    return ret;
}

/* --------------------------------------------------------------------------------------------
 * Ack, retry, bury, reap, enqueue.
 */
int queue_ack(struct rconn *rc, const char *ns, const char *queue, const char *id, unsigned fence,
              const char *producer_id, queue_cb cb, void *arg)
{
    char k[4][KEY_MAX];
    if (key2(k[0], ns, "inflight:", queue) < 0 || key2(k[1], ns, "jobs", "") < 0 ||
        key2(k[2], ns, "payloads", "") < 0)
        return SETTLE_ETOOBIG;
    int nkeys = 3;
    if (producer_id != NULL && producer_id[0] != '\0') {
        if (queue_dedup_key(k[3], KEY_MAX, ns, queue, producer_id) < 0)
            return SETTLE_ETOOBIG;
        nkeys = 4;
    }
    char a_fence[16];
    snprintf(a_fence, sizeof(a_fence), "%u", fence);
    const char *argv[6];
    int argc = 0;
    for (int i = 0; i < nkeys; i++)
        argv[argc++] = k[i];
    argv[argc++] = id;
    argv[argc++] = a_fence;
    return eval_int(rc, "queue_ack", nkeys, argc, argv, NULL, cb, arg);
}

int queue_retry(struct rconn *rc, const char *ns, const char *queue, const char *id, unsigned fence,
                uint64_t delay_ms, bool consume_attempt, bool is_check, queue_cb cb, void *arg)
{
    char k[3][KEY_MAX];
    if (key2(k[0], ns, "inflight:", queue) < 0 || key2(k[1], ns, "delayed:", queue) < 0 ||
        key2(k[2], ns, "jobs", "") < 0)
        return SETTLE_ETOOBIG;
    char a_fence[16], a_delay[24];
    snprintf(a_fence, sizeof(a_fence), "%u", fence);
    snprintf(a_delay, sizeof(a_delay), "%llu", (unsigned long long)delay_ms);
    const char *argv[8] = {
        k[0], k[1], k[2], id, a_fence, a_delay, consume_attempt ? "1" : "0", is_check ? "1" : "0"};
    return eval_int(rc, "queue_retry", 3, 8, argv, NULL, cb, arg);
}

int queue_bury(struct rconn *rc, const char *ns, const char *queue, const char *id, unsigned fence,
               const char *envelope, const char *producer_id, queue_cb cb, void *arg)
{
    char k[7][KEY_MAX];
    if (key2(k[0], ns, "inflight:", queue) < 0 || key2(k[1], ns, "jobs", "") < 0 ||
        key2(k[2], ns, "payloads", "") < 0 || key2(k[3], ns, "dead", "") < 0 ||
        key2(k[4], ns, "dead:jobs", "") < 0 || key2(k[5], ns, "dead:count", "") < 0)
        return SETTLE_ETOOBIG;
    int nkeys = 6;
    if (producer_id != NULL && producer_id[0] != '\0') {
        if (queue_dedup_key(k[6], KEY_MAX, ns, queue, producer_id) < 0)
            return SETTLE_ETOOBIG;
        nkeys = 7;
    }
    char a_fence[16];
    snprintf(a_fence, sizeof(a_fence), "%u", fence);
    const char *argv[11];
    int argc = 0;
    for (int i = 0; i < nkeys; i++)
        argv[argc++] = k[i];
    argv[argc++] = id;
    argv[argc++] = a_fence;
    argv[argc++] = envelope;
    argv[argc++] = queue;
    return eval_int(rc, "queue_bury", nkeys, argc, argv, NULL, cb, arg);
}

int queue_reap(struct rconn *rc, const char *ns, const char *queue, unsigned limit, queue_cb cb,
               void *arg)
{
    char k[3][KEY_MAX];
    if (key2(k[0], ns, "inflight:", queue) < 0 || key2(k[1], ns, "delayed:", queue) < 0 ||
        key2(k[2], ns, "jobs", "") < 0)
        return SETTLE_ETOOBIG;
    char a_limit[16];
    snprintf(a_limit, sizeof(a_limit), "%u", limit);
    const char *argv[4] = {k[0], k[1], k[2], a_limit};
    return eval_int(rc, "queue_reap", 3, 4, argv, NULL, cb, arg);
}

/* The KEYS and ARGV of queue_enqueue.lua, shared by the async and the sync call. */
struct enqueue_args {
    char keys[2][KEY_MAX];
    char ttl[24];
    const char *argv[4];
    size_t lens[4];
    int nkeys, argc;
};

static int enqueue_args(struct enqueue_args *e, const char *ns, const char *queue, const char *text,
                        size_t len, const char *producer_id)
{
    if (key2(e->keys[0], ns, "queue:", queue) < 0)
        return SETTLE_ETOOBIG;
    e->nkeys = 1;
    if (producer_id != NULL && producer_id[0] != '\0') {
        if (queue_dedup_key(e->keys[1], KEY_MAX, ns, queue, producer_id) < 0)
            return SETTLE_ETOOBIG;
        e->nkeys = 2;
    }
    snprintf(e->ttl, sizeof(e->ttl), "%llu", (unsigned long long)QUEUE_DEDUP_TTL_MS);
    e->argc = 0;
    for (int i = 0; i < e->nkeys; i++) {
        e->argv[e->argc] = e->keys[i];
        e->lens[e->argc++] = strlen(e->keys[i]);
    }
    e->argv[e->argc] = text;
    e->lens[e->argc++] = len;
    e->argv[e->argc] = e->ttl;
    e->lens[e->argc++] = strlen(e->ttl);
    return 0;
}

int queue_enqueue(struct rconn *rc, const char *ns, const char *queue, const char *text, size_t len,
                  const char *producer_id, queue_cb cb, void *arg)
{
    struct enqueue_args e;
    if (enqueue_args(&e, ns, queue, text, len, producer_id) != 0)
        return SETTLE_ETOOBIG;
    return eval_int(rc, "queue_enqueue", e.nkeys, e.argc, e.argv, e.lens, cb, arg);
}

/* --------------------------------------------------------------------------------------------
 * Extend.
 */
struct extend_ctx {
    queue_extend_cb cb;
    void *arg;
};

static void on_extend_reply(void *arg, int status, const struct rconn_reply *r)
{
    struct extend_ctx *c = arg;
    size_t n = 0;
    char **lost = NULL;
    if (status == 0 && rconn_reply_type(r) != RCONN_ARRAY)
        status = rconn_reply_type(r) == RCONN_ERROR ? SETTLE_EREJECTED : SETTLE_EINTERNAL;
    if (status == 0 && rconn_reply_elements(r) > 0) {
        n = rconn_reply_elements(r);
        lost = calloc(n, sizeof(*lost));
        if (lost == NULL) {
            status = SETTLE_ENOMEM;
            n = 0;
        }
        for (size_t i = 0; i < n; i++) {
            size_t len = 0;
            const char *s = rconn_reply_str(rconn_reply_element(r, i), &len);
            lost[i] = malloc(len + 1);
            if (lost[i] != NULL) {
                memcpy(lost[i], s, len);
                lost[i][len] = '\0';
            }
        }
    }
    c->cb(c->arg, status, n, lost);
    for (size_t i = 0; i < n; i++)
        free(lost[i]);
    free(lost);
    free(c);
}

int queue_extend(struct rconn *rc, const char *ns, const char *queue, const char *worker_id,
                 uint64_t lease_ms, size_t n, const char *const *ids, const unsigned *fences,
                 queue_extend_cb cb, void *arg)
{
    char k[3][KEY_MAX];
    if (key2(k[0], ns, "inflight:", queue) < 0 || key2(k[1], ns, "jobs", "") < 0 ||
        key2(k[2], ns, "workers", "") < 0)
        return SETTLE_ETOOBIG;
    int argc = 5 + (int)(2 * n);
    const char **argv = malloc(sizeof(*argv) * (size_t)argc);
    char *fence_buf = malloc(n * 16 + 1);
    struct extend_ctx *c = malloc(sizeof(*c));
    int ret = SETTLE_ENOMEM;
    if (argv == NULL || fence_buf == NULL || c == NULL)
        goto out;
    char a_lease[24];
    snprintf(a_lease, sizeof(a_lease), "%llu", (unsigned long long)lease_ms);
    argv[0] = k[0];
    argv[1] = k[1];
    argv[2] = k[2];
    argv[3] = a_lease;
    argv[4] = worker_id;
    for (size_t i = 0; i < n; i++) {
        snprintf(fence_buf + i * 16, 16, "%u", fences[i]);
        argv[5 + 2 * i] = ids[i];
        argv[6 + 2 * i] = fence_buf + i * 16;
    }
    c->cb = cb;
    c->arg = arg;
    ret = rconn_eval(rc, "queue_extend", 3, argc, argv, NULL, on_extend_reply, c);
    if (ret == 0)
        c = NULL;
out:
    free(argv);
    free(fence_buf);
    free(c);
    return ret;
}

/* --------------------------------------------------------------------------------------------
 * Wait for work without taking it.
 */
static void on_wait_reply(void *arg, int status, const struct rconn_reply *r)
{
    struct int_ctx *c = arg;
    long long v = 0;
    if (status == 0) {
        /* The moved element when the list had one, nil on timeout. */
        if (rconn_reply_type(r) == RCONN_STRING)
            v = 1;
        else if (rconn_reply_type(r) != RCONN_NIL)
            status = SETTLE_EREJECTED;
    }
    c->cb(c->arg, status, v);
    free(c);
}

int queue_wait(struct rconn *waiter, const char *ns, const char *queue, uint64_t timeout_ms,
               queue_cb cb, void *arg)
{
    char key[KEY_MAX];
    if (key2(key, ns, "queue:", queue) < 0)
        return SETTLE_ETOOBIG;
    /* BLMOVE takes its timeout in (fractional) seconds; 0 would mean "forever", which would
     * hide a dead connection, so always wait a bounded time. */
    if (timeout_ms < 10)
        timeout_ms = 10;
    char timeout[32];
    snprintf(timeout, sizeof(timeout), "%llu.%03llu", (unsigned long long)(timeout_ms / 1000),
             (unsigned long long)(timeout_ms % 1000));
    const char *argv[6] = {"BLMOVE", key, key, "RIGHT", "RIGHT", timeout};
    struct int_ctx *c = malloc(sizeof(*c));
    if (c == NULL)
        return SETTLE_ENOMEM;
    c->cb = cb;
    c->arg = arg;
    int ret = rconn_command(waiter, on_wait_reply, c, 6, argv, NULL);
    if (ret != 0)
        free(c);
    return ret;
}

/* --------------------------------------------------------------------------------------------
 * Synchronous helpers for the CLI.
 */
int queue_sync_enqueue(struct rconn_sync *s, const char *ns, const char *queue, const char *text,
                       size_t len, const char *producer_id)
{
    struct enqueue_args e;
    if (enqueue_args(&e, ns, queue, text, len, producer_id) != 0)
        return SETTLE_ETOOBIG;
    struct rconn_reply *r = NULL;
    int ret = rconn_sync_eval(s, &r, "queue_enqueue", e.nkeys, e.argc, e.argv, e.lens);
    if (ret == 0) {
        if (rconn_reply_type(r) == RCONN_INTEGER)
            ret = (int)rconn_reply_integer(r);
        else
            ret = SETTLE_EREJECTED;
    }
    rconn_sync_free(r);
    return ret;
}

static long long sync_int(struct rconn_sync *s, int argc, const char **argv)
{
    struct rconn_reply *r = NULL;
    long long v = -1;
    if (rconn_sync_command(s, &r, argc, argv, NULL) == 0)
        v = rconn_reply_as_ll(r, -1);
    rconn_sync_free(r);
    return v;
}

/* Builds the four keys of queue_stats.lua. */
static int stats_keys(char k[4][KEY_MAX], const char *ns, const char *queue)
{
    if (key2(k[0], ns, "queue:", queue) < 0 || key2(k[1], ns, "delayed:", queue) < 0 ||
        key2(k[2], ns, "inflight:", queue) < 0 || key2(k[3], ns, "dead:count", "") < 0)
        return SETTLE_ETOOBIG;
    return 0;
}

static int stats_from_reply(const struct rconn_reply *r, struct queue_stats *out)
{
    if (rconn_reply_type(r) != RCONN_ARRAY || rconn_reply_elements(r) != 7)
        return rconn_reply_type(r) == RCONN_ERROR ? SETTLE_EREJECTED : SETTLE_EINTERNAL;
    out->ready = rconn_reply_as_ll(rconn_reply_element(r, 0), 0);
    out->delayed = rconn_reply_as_ll(rconn_reply_element(r, 1), 0);
    out->due = rconn_reply_as_ll(rconn_reply_element(r, 2), 0);
    out->inflight = rconn_reply_as_ll(rconn_reply_element(r, 3), 0);
    out->dead = rconn_reply_as_ll(rconn_reply_element(r, 4), 0);
    out->oldest_ready_age_ms = rconn_reply_as_ll(rconn_reply_element(r, 5), -1);
    return 0;
}

struct stats_ctx {
    queue_stats_cb cb;
    void *arg;
};

static void on_stats_reply(void *arg, int status, const struct rconn_reply *r)
{
    struct stats_ctx *c = arg;
    struct queue_stats st = {0};
    if (status == 0)
        status = stats_from_reply(r, &st);
    c->cb(c->arg, status, &st);
    free(c);
}

int queue_stats(struct rconn *rc, const char *ns, const char *queue, queue_stats_cb cb, void *arg)
{
    char k[4][KEY_MAX];
    if (stats_keys(k, ns, queue) != 0)
        return SETTLE_ETOOBIG;
    const char *argv[5] = {k[0], k[1], k[2], k[3], queue};
    struct stats_ctx *c = malloc(sizeof(*c));
    if (c == NULL)
        return SETTLE_ENOMEM;
    c->cb = cb;
    c->arg = arg;
    int ret = rconn_eval(rc, "queue_stats", 4, 5, argv, NULL, on_stats_reply, c);
    if (ret != 0)
        free(c);
    return ret;
}

int queue_sync_stats(struct rconn_sync *s, const char *ns, const char *queue,
                     struct queue_stats *out)
{
    char k[4][KEY_MAX];
    if (stats_keys(k, ns, queue) != 0)
        return SETTLE_ETOOBIG;
    const char *argv[5] = {k[0], k[1], k[2], k[3], queue};
    struct rconn_reply *r = NULL;
    int ret = rconn_sync_eval(s, &r, "queue_stats", 4, 5, argv, NULL);
    if (ret == 0)
        ret = stats_from_reply(r, out);
    rconn_sync_free(r);
    return ret;
}

long long queue_sync_dead_total(struct rconn_sync *s, const char *ns)
{
    char k[KEY_MAX];
    if (key2(k, ns, "dead", "") < 0)
        return SETTLE_ETOOBIG;
    const char *argv[2] = {"LLEN", k};
    return sync_int(s, 2, argv);
}

long long queue_sync_workers(struct rconn_sync *s, const char *ns, uint64_t live_within_ms)
{
    char k[KEY_MAX];
    if (key2(k, ns, "workers", "") < 0)
        return SETTLE_ETOOBIG;
    struct rconn_reply *t = NULL;
    const char *targv[1] = {"TIME"};
    long long n = -1;
    if (rconn_sync_command(s, &t, 1, targv, NULL) == 0 && rconn_reply_elements(t) == 2) {
        char since[32];
        snprintf(since, sizeof(since), "%lld",
                 rconn_reply_as_ll(rconn_reply_element(t, 0), 0) * 1000 +
                     rconn_reply_as_ll(rconn_reply_element(t, 1), 0) / 1000 -
                     (long long)live_within_ms);
        const char *zc[4] = {"ZCOUNT", k, since, "+inf"};
        n = sync_int(s, 4, zc);
    }
    rconn_sync_free(t);
    return n;
}

int queue_sync_dead_scan(struct rconn_sync *s, const char *ns, long long offset, long long limit,
                         int (*fn)(void *arg, const char *envelope, size_t len), void *arg)
{
    char k[KEY_MAX];
    if (key2(k, ns, "dead", "") < 0)
        return SETTLE_ETOOBIG;
    int visited = 0;
    /* Page through the list so a large DLQ is never read in one reply. */
    const long long page = 500;
    while (limit > 0) {
        long long n = limit < page ? limit : page;
        char a_start[24], a_stop[24];
        snprintf(a_start, sizeof(a_start), "%lld", offset);
        snprintf(a_stop, sizeof(a_stop), "%lld", offset + n - 1);
        const char *argv[4] = {"LRANGE", k, a_start, a_stop};
        struct rconn_reply *r = NULL;
        if (rconn_sync_command(s, &r, 4, argv, NULL) != 0) {
            rconn_sync_free(r);
            return SETTLE_EIO;
        }
        size_t got = rconn_reply_elements(r);
        int stop = 0;
        for (size_t i = 0; i < got && !stop; i++) {
            size_t len = 0;
            const char *env = rconn_reply_str(rconn_reply_element(r, i), &len);
            visited++;
            stop = fn(arg, env, len);
        }
        rconn_sync_free(r);
        if (stop || (long long)got < n)
            break;
        offset += n;
        limit -= n;
    }
    return visited;
}

int queue_sync_dead_redrive(struct rconn_sync *s, const char *ns, const char *envelope, size_t len,
                            const char *id, const char *queue, bool retry)
{
    char k[4][KEY_MAX];
    if (key2(k[0], ns, "dead", "") < 0 || key2(k[1], ns, "dead:jobs", "") < 0 ||
        key2(k[2], ns, "dead:count", "") < 0 || key2(k[3], ns, "queue:", queue) < 0)
        return SETTLE_ETOOBIG;
    const char *argv[8] = {k[0], k[1], k[2], k[3], envelope, id, retry ? "retry" : "purge", queue};
    size_t lens[8];
    for (int i = 0; i < 8; i++)
        lens[i] = strlen(argv[i]);
    lens[4] = len;
    struct rconn_reply *r = NULL;
    int ret = rconn_sync_eval(s, &r, "dlq_redrive", 4, 8, argv, lens);
    if (ret == 0)
        ret = rconn_reply_type(r) == RCONN_INTEGER ? (int)rconn_reply_integer(r) : SETTLE_EREJECTED;
    rconn_sync_free(r);
    return ret;
}
