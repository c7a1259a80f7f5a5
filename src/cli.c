/*
 * cli.c - the `settle` command line.
 *
 * `work` and `pgsim` run long; every other command connects, does one bounded thing, prints
 * it (text for people, --json for scripts) and exits (`run` executes one scheduled task,
 * bounded like the task itself). Configuration comes from the same
 * environment variables and flags as the worker (config.h).
 * Thread: the main thread only. Owns the connections it opens for the length of a command.
 */
#include "settle/cli.h"

#include <errno.h>
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

#include "settle/config.h"
#include "settle/error.h"
#include "settle/gateway.h"
#include "settle/job.h"
#include "settle/log.h"
#include "settle/pgsim.h"
#include "settle/queue.h"
#include "settle/rconn.h"
#include "settle/stock.h"
#include "settle/store.h"
#include "settle/tasks.h"
#include "settle/worker.h"

#define EXIT_USAGE 2
#define CLI_REDIS_TIMEOUT_MS 5000
#define CLI_ERR_MAX 512

static const char *const all_queues[] = {"reconcile", "refund"};

static void usage(FILE *out)
{
    fputs("usage: settle <command> [options]\n"
          "\n"
          "workers:\n"
          "  work                              run a worker until SIGTERM/SIGINT\n"
          "  migrate                           create or upgrade the PostgreSQL schema\n"
          "producers:\n"
          "  enqueue <queue> [JSON|-|@FILE] [--id ID]\n"
          "                                    push one job (reconcile|refund); --id dedups\n"
          "  stock reserve <order> <sku>:<qty>... [--ttl-ms N]\n"
          "  stock release <order>\n"
          "operators:\n"
          "  stats [--json] [--watch] [--interval-ms N]\n"
          "  dlq list [--json] [--limit N] [--offset N]\n"
          "  dlq retry <id>|--all [--reason R]   put dead jobs back on their queue\n"
          "  dlq purge <id>|--all [--reason R]   delete dead jobs for good\n"
          "  stock load                        set Redis stock from PostgreSQL minus reservations\n"
          "  stock show [sku] [--json]\n"
          "  run <task> [--dry-run] [--force] [--date YYYY-MM-DD]\n"
          "                                    run a scheduled task now: stale_sweep,\n"
          "                                    order_expiry, orphan_sweep, stock_sync,\n"
          "                                    daily_stats (--force, --date: daily_stats)\n"
          "  config                            print the effective configuration (redacted)\n"
          "tools:\n"
          "  pgsim [options]                   run the PG simulator (settle pgsim --help)\n"
          "  version | help [config]\n"
          "\n"
          "Every SETTLE_* variable is also a flag: SETTLE_REDIS_URL -> --redis-url.\n"
          "`settle help config` lists them all.\n",
          out);
}

/* Removes argv[i] (a command option) from the argument list. */
static void drop_arg(int *argc, char **argv, int i)
{
    for (int k = i; k < *argc - 1; k++)
        argv[k] = argv[k + 1];
    (*argc)--;
}

/* Finds and removes a boolean option. */
static bool take_flag(int *argc, char **argv, const char *name)
{
    for (int i = 1; i < *argc; i++) {
        if (strcmp(argv[i], name) == 0) {
            drop_arg(argc, argv, i);
            return true;
        }
    }
    return false;
}

/* Finds and removes "--name VALUE" or "--name=VALUE"; returns the value or NULL. *bad is set
 * when the option is present without a value. */
static const char *take_opt(int *argc, char **argv, const char *name, bool *bad)
{
    size_t n = strlen(name);
    for (int i = 1; i < *argc; i++) {
        if (strncmp(argv[i], name, n) != 0)
            continue;
        if (argv[i][n] == '=') {
            const char *v = argv[i] + n + 1;
            drop_arg(argc, argv, i);
            return v;
        }
        if (argv[i][n] == '\0') {
            if (i + 1 >= *argc) {
                *bad = true;
                return NULL;
            }
            const char *v = argv[i + 1];
            drop_arg(argc, argv, i);
            drop_arg(argc, argv, i);
            return v;
        }
    }
    return NULL;
}

static int parse_u64(const char *s, uint64_t *out)
{
    if (s == NULL || *s == '\0' || *s == '-')
        return SETTLE_EINVAL;
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == NULL || *end != '\0')
        return SETTLE_EINVAL;
    *out = v;
    return 0;
}

/* Any leftover "--something" is a mistake the user should hear about. */
static int reject_unknown_options(int argc, char **argv, int from)
{
    for (int i = from; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) == 0) {
            fprintf(stderr, "settle: unknown option %s (see `settle help`)\n", argv[i]);
            return EXIT_USAGE;
        }
    }
    return 0;
}

static int open_redis(const struct config *cfg, struct rconn_sync **out)
{
    struct config_redis_addr addr;
    char err[CLI_ERR_MAX];
    if (config_parse_redis_url(cfg->redis_url, &addr) != 0) {
        fprintf(stderr, "settle: SETTLE_REDIS_URL does not parse\n");
        return SETTLE_EINVAL;
    }
    int rc = rconn_sync_open(out, &addr, CLI_REDIS_TIMEOUT_MS, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "settle: %s\n", err);
    return rc;
}

static int open_store(const struct config *cfg, struct store **out)
{
    struct store_config scfg = {.conninfo = cfg->database_url,
                                .pool_size = 1,
                                .statement_timeout_ms = cfg->db_statement_timeout_ms,
                                .connect_timeout_ms = 5000};
    int rc = store_create(out, &scfg);
    if (rc != 0)
        fprintf(stderr, "settle: SETTLE_DATABASE_URL is not a valid connection string\n");
    return rc;
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------------------------------------
 * migrate
 */
static int cmd_migrate(const struct config *cfg)
{
    struct store *s = NULL;
    char err[STORE_ERR_MAX] = "";
    unsigned applied = 0;
    if (open_store(cfg, &s) != 0)
        return 1;
    int rc = store_migrate(s, &applied, err, sizeof(err));
    store_destroy(s);
    if (rc != 0) {
        fprintf(stderr, "settle migrate: %s\n", err[0] != '\0' ? err : settle_strerror(rc));
        return 1;
    }
    printf("migrate: applied %u migration(s); schema is up to date\n", applied);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * enqueue
 */
static char *read_all(FILE *f, size_t max, size_t *len, bool *too_big)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    *too_big = false;
    while (buf != NULL) {
        if (n == cap) {
            if (cap > max + 1) {
                *too_big = true;
                break;
            }
            char *nb = realloc(buf, cap * 2);
            if (nb == NULL)
                break;
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    if (buf == NULL || *too_big || ferror(f)) {
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

static int cmd_enqueue(const struct config *cfg, int argc, char **argv)
{
    bool bad = false;
    const char *id_opt = take_opt(&argc, argv, "--id", &bad);
    if (bad || reject_unknown_options(argc, argv, 1) != 0 || argc < 2 || argc > 3) {
        fprintf(stderr, "usage: settle enqueue <reconcile|refund> [JSON|-|@FILE] [--id ID]\n");
        return EXIT_USAGE;
    }
    enum job_kind kind;
    if (job_kind_parse(argv[1], &kind) != 0) {
        fprintf(stderr, "settle enqueue: unknown queue \"%s\" (reconcile or refund)\n", argv[1]);
        return EXIT_USAGE;
    }
    const char *src = argc == 3 ? argv[2] : "-";
    char *text = NULL;
    size_t len = 0;
    bool too_big = false;
    if (strcmp(src, "-") == 0) {
        text = read_all(stdin, cfg->job_max_bytes, &len, &too_big);
    } else if (src[0] == '@') {
        FILE *f = fopen(src + 1, "rb");
        if (f == NULL) {
            fprintf(stderr, "settle enqueue: cannot open %s: %s\n", src + 1, strerror(errno));
            return 1;
        }
        text = read_all(f, cfg->job_max_bytes, &len, &too_big);
        fclose(f);
    } else {
        len = strlen(src);
        text = malloc(len + 1);
        if (text != NULL)
            memcpy(text, src, len + 1);
    }
    if (text == NULL) {
        fprintf(stderr, "settle enqueue: %s\n",
                too_big ? "job is over SETTLE_JOB_MAX_BYTES" : "could not read the job");
        return 1;
    }

    int ret = 1;
    json_t *j = NULL;
    char *out = NULL;
    struct rconn_sync *r = NULL;
    json_error_t jerr;
    j = json_loadb(text, len, 0, &jerr);
    if (!json_is_object(j)) {
        fprintf(stderr, "settle enqueue: the job must be a JSON object (%s)\n",
                j == NULL ? jerr.text : "got another JSON type");
        ret = EXIT_USAGE;
        goto out;
    }
    if (id_opt != NULL) {
        json_t *have = json_object_get(j, "id");
        if (have != NULL && (!json_is_string(have) || strcmp(json_string_value(have), id_opt))) {
            fprintf(stderr, "settle enqueue: --id %s conflicts with the job's \"id\"\n", id_opt);
            ret = EXIT_USAGE;
            goto out;
        }
        json_object_set_new(j, "id", json_string(id_opt));
    }
    /* Record when the job was queued so `settle stats` can show the oldest job's age. */
    if (json_object_get(j, "enqueued_at_ms") == NULL)
        json_object_set_new(j, "enqueued_at_ms", json_integer((json_int_t)wall_ms()));
    out = json_dumps(j, JSON_COMPACT);
    if (out == NULL)
        goto out;
    struct job decoded;
    char why[JOB_WHY_MAX];
    if (job_decode(kind, out, strlen(out), cfg->job_max_bytes, &decoded, why, sizeof(why)) != 0) {
        fprintf(stderr, "settle enqueue: invalid %s job: %s\n", argv[1], why);
        ret = EXIT_USAGE;
        goto out;
    }
    if (open_redis(cfg, &r) != 0)
        goto out;
    int rc = queue_sync_enqueue(r, cfg->namespace_, argv[1], out, strlen(out), decoded.id);
    if (rc < 0) {
        fprintf(stderr, "settle enqueue: %s\n", settle_strerror(rc));
        goto out;
    }
    if (rc == 1)
        printf("enqueued %s job%s%s\n", argv[1], decoded.id[0] ? " id=" : "", decoded.id);
    else
        printf("duplicate: a %s job with id=%s is still queued or running; nothing pushed\n",
               argv[1], decoded.id);
    ret = 0;
out:
    rconn_sync_close(r);
    free(out);
    json_decref(j);
    free(text);
    return ret;
}

/* ---------------------------------------------------------------------------------------------
 * stats
 */
static volatile sig_atomic_t stop_watch;

static void on_watch_signal(int sig)
{
    (void)sig;
    stop_watch = 1;
}

static int print_stats(const struct config *cfg, struct rconn_sync *r, bool json, bool clear)
{
    json_t *root = json ? json_object() : NULL;
    json_t *queues = json ? json_object() : NULL;
    if (clear)
        fputs("\033[H\033[2J", stdout);
    if (!json)
        printf("%-10s %8s %8s %8s %9s %8s %14s\n", "queue", "ready", "delayed", "due", "inflight",
               "dead", "oldest_ready_s");
    for (size_t i = 0; i < sizeof(all_queues) / sizeof(all_queues[0]); i++) {
        struct queue_stats st;
        if (queue_sync_stats(r, cfg->namespace_, all_queues[i], &st) != 0) {
            fprintf(stderr, "settle stats: Redis did not answer\n");
            json_decref(queues);
            json_decref(root);
            return 1;
        }
        if (json) {
            json_object_set_new(
                queues, all_queues[i],
                json_pack("{s:I, s:I, s:I, s:I, s:I, s:o}", "ready", (json_int_t)st.ready,
                          "delayed", (json_int_t)st.delayed, "due", (json_int_t)st.due, "inflight",
                          (json_int_t)st.inflight, "dead", (json_int_t)st.dead,
                          "oldest_ready_age_s",
                          st.oldest_ready_age_ms < 0
                              ? json_null()
                              : json_real((double)st.oldest_ready_age_ms / 1000.0)));
        } else {
            char age[32] = "-";
            if (st.oldest_ready_age_ms >= 0)
                snprintf(age, sizeof(age), "%.1f", (double)st.oldest_ready_age_ms / 1000.0);
            printf("%-10s %8lld %8lld %8lld %9lld %8lld %14s\n", all_queues[i], st.ready,
                   st.delayed, st.due, st.inflight, st.dead, age);
        }
    }
    long long dead = queue_sync_dead_total(r, cfg->namespace_);
    long long workers = queue_sync_workers(r, cfg->namespace_, 3 * cfg->lease_ms);
    if (json) {
        json_object_set_new(root, "namespace", json_string(cfg->namespace_));
        json_object_set_new(root, "queues", queues);
        json_object_set_new(root, "dead_total", json_integer(dead));
        json_object_set_new(root, "workers_alive", json_integer(workers));
        char *s = json_dumps(root, JSON_COMPACT);
        if (s != NULL)
            puts(s);
        free(s);
        json_decref(root);
    } else {
        printf("dead-letter entries: %lld   live workers: %lld   namespace: %s\n", dead, workers,
               cfg->namespace_);
    }
    fflush(stdout);
    return 0;
}

static int cmd_stats(const struct config *cfg, int argc, char **argv)
{
    bool bad = false;
    bool json = take_flag(&argc, argv, "--json");
    bool watch = take_flag(&argc, argv, "--watch");
    const char *iv = take_opt(&argc, argv, "--interval-ms", &bad);
    uint64_t interval = 1000;
    if (bad || (iv != NULL && (parse_u64(iv, &interval) != 0 || interval < 100)) ||
        reject_unknown_options(argc, argv, 1) != 0 || argc != 1) {
        fprintf(stderr, "usage: settle stats [--json] [--watch] [--interval-ms N>=100]\n");
        return EXIT_USAGE;
    }
    struct rconn_sync *r = NULL;
    if (open_redis(cfg, &r) != 0)
        return 1;
    int ret = print_stats(cfg, r, json, false);
    if (watch && ret == 0) {
        struct sigaction sa = {0};
        sa.sa_handler = on_watch_signal;
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        while (!stop_watch && ret == 0) {
            struct timespec ts = {.tv_sec = (time_t)(interval / 1000),
                                  .tv_nsec = (long)(interval % 1000) * 1000000L};
            nanosleep(&ts, NULL);
            if (!stop_watch)
                ret = print_stats(cfg, r, json, !json);
        }
    }
    rconn_sync_close(r);
    return ret;
}

/* ---------------------------------------------------------------------------------------------
 * dlq
 */
struct dlq_list_ctx {
    bool json;
    json_t *arr;
    unsigned shown;
};

static int dlq_list_one(void *arg, const char *env, size_t len)
{
    struct dlq_list_ctx *c = arg;
    json_error_t jerr;
    json_t *e = json_loadb(env, len, 0, &jerr);
    c->shown++;
    if (c->json) {
        json_array_append_new(c->arr, e != NULL ? e : json_stringn(env, len));
        return 0;
    }
    const char *id = json_string_value(json_object_get(e, "id"));
    const char *q = json_string_value(json_object_get(e, "queue"));
    const char *reason = json_string_value(json_object_get(e, "reason"));
    const char *error = json_string_value(json_object_get(e, "error"));
    json_int_t attempts = json_integer_value(json_object_get(e, "attempts"));
    json_int_t dead_ms = json_integer_value(json_object_get(e, "dead_at_ms"));
    time_t t = (time_t)(dead_ms / 1000);
    struct tm tm;
    char when[32] = "?";
    if (gmtime_r(&t, &tm) != NULL)
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    printf("%-24s %-10s %-22s %3lld  %s  %s\n", id ? id : "?", q ? q : "?", reason ? reason : "?",
           (long long)attempts, when, error ? error : "");
    json_decref(e);
    return 0;
}

static int cmd_dlq_list(const struct config *cfg, struct rconn_sync *r, int argc, char **argv)
{
    bool bad = false;
    bool json = take_flag(&argc, argv, "--json");
    const char *lim = take_opt(&argc, argv, "--limit", &bad);
    const char *off = take_opt(&argc, argv, "--offset", &bad);
    uint64_t limit = 100, offset = 0;
    if (bad || (lim != NULL && parse_u64(lim, &limit) != 0) ||
        (off != NULL && parse_u64(off, &offset) != 0) ||
        reject_unknown_options(argc, argv, 1) != 0 || argc != 2) {
        fprintf(stderr, "usage: settle dlq list [--json] [--limit N] [--offset N]\n");
        return EXIT_USAGE;
    }
    struct dlq_list_ctx c = {.json = json, .arr = json ? json_array() : NULL};
    if (!json)
        printf("%-24s %-10s %-22s %3s  %-20s  %s\n", "id", "queue", "reason", "att", "dead_at",
               "error");
    int rc = queue_sync_dead_scan(r, cfg->namespace_, (long long)offset, (long long)limit,
                                  dlq_list_one, &c);
    if (rc < 0) {
        fprintf(stderr, "settle dlq list: %s\n", settle_strerror(rc));
        json_decref(c.arr);
        return 1;
    }
    if (json) {
        char *s = json_dumps(c.arr, JSON_COMPACT);
        if (s != NULL)
            puts(s);
        free(s);
        json_decref(c.arr);
    } else {
        long long total = queue_sync_dead_total(r, cfg->namespace_);
        printf("(%u shown of %lld)\n", c.shown, total);
    }
    return 0;
}

#define DLQ_PAGE 200

struct dlq_pick_ctx {
    const char *id;     /* one id, or NULL for all */
    const char *reason; /* filter, or NULL */
    char *env[DLQ_PAGE];
    size_t env_len[DLQ_PAGE];
    char *ids[DLQ_PAGE];
    char *queues[DLQ_PAGE];
    unsigned n;
    unsigned skipped;
};

static int dlq_pick_one(void *arg, const char *env, size_t len)
{
    struct dlq_pick_ctx *c = arg;
    json_error_t jerr;
    json_t *e = json_loadb(env, len, 0, &jerr);
    const char *id = json_string_value(json_object_get(e, "id"));
    const char *q = json_string_value(json_object_get(e, "queue"));
    const char *reason = json_string_value(json_object_get(e, "reason"));
    enum job_kind kind;
    bool match = id != NULL && q != NULL && job_kind_parse(q, &kind) == 0 &&
                 (c->id == NULL || strcmp(c->id, id) == 0) &&
                 (c->reason == NULL || (reason != NULL && strcmp(c->reason, reason) == 0));
    if (match && c->n < DLQ_PAGE) {
        c->env[c->n] = malloc(len + 1);
        c->ids[c->n] = strdup(id);
        c->queues[c->n] = strdup(q);
        if (c->env[c->n] != NULL) {
            memcpy(c->env[c->n], env, len);
            c->env[c->n][len] = '\0';
        }
        c->env_len[c->n] = len;
        c->n++;
    } else {
        c->skipped++;
    }
    json_decref(e);
    return c->id != NULL && match; /* one id: stop at the first match */
}

static int cmd_dlq_redrive(const struct config *cfg, struct rconn_sync *r, int argc, char **argv,
                           bool retry)
{
    bool bad = false;
    bool all = take_flag(&argc, argv, "--all");
    const char *reason = take_opt(&argc, argv, "--reason", &bad);
    const char *verb = retry ? "retry" : "purge";
    if (bad || reject_unknown_options(argc, argv, 1) != 0 || (all ? argc != 2 : argc != 3)) {
        fprintf(stderr, "usage: settle dlq %s <id>|--all [--reason R]\n", verb);
        return EXIT_USAGE;
    }
    const char *one = all ? NULL : argv[2];
    long long total = queue_sync_dead_total(r, cfg->namespace_);
    if (total < 0) {
        fprintf(stderr, "settle dlq %s: Redis did not answer\n", verb);
        return 1;
    }
    unsigned done = 0;
    long long offset = 0;
    /* Bounded: each round either removes entries or moves the offset past skipped ones, and
     * the DLQ held `total` entries when we started. */
    for (long long round = 0; round <= total / DLQ_PAGE + 1; round++) {
        struct dlq_pick_ctx c = {.id = one, .reason = reason};
        int rc = queue_sync_dead_scan(r, cfg->namespace_, offset, DLQ_PAGE, dlq_pick_one, &c);
        if (rc < 0) {
            fprintf(stderr, "settle dlq %s: %s\n", verb, settle_strerror(rc));
            return 1;
        }
        for (unsigned i = 0; i < c.n; i++) {
            if (c.env[i] != NULL && c.ids[i] != NULL && c.queues[i] != NULL &&
                queue_sync_dead_redrive(r, cfg->namespace_, c.env[i], c.env_len[i], c.ids[i],
                                        c.queues[i], retry) == 1) {
                done++;
                printf("%s %s (%s)\n", retry ? "re-queued" : "purged", c.ids[i], c.queues[i]);
            }
            free(c.env[i]);
            free(c.ids[i]);
            free(c.queues[i]);
        }
        offset += c.skipped;
        if (rc < DLQ_PAGE || (one != NULL && done > 0))
            break;
    }
    if (one != NULL && done == 0) {
        fprintf(stderr, "settle dlq %s: no dead job with id %s\n", verb, one);
        return 1;
    }
    printf("%s: %u job(s)\n", retry ? "re-queued" : "purged", done);
    return 0;
}

static int cmd_dlq(const struct config *cfg, int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: settle dlq list|retry|purge ...\n");
        return EXIT_USAGE;
    }
    struct rconn_sync *r = NULL;
    int ret;
    if (strcmp(argv[1], "list") != 0 && strcmp(argv[1], "retry") != 0 &&
        strcmp(argv[1], "purge") != 0) {
        fprintf(stderr, "usage: settle dlq list|retry|purge ...\n");
        return EXIT_USAGE;
    }
    if (open_redis(cfg, &r) != 0)
        return 1;
    if (strcmp(argv[1], "list") == 0)
        ret = cmd_dlq_list(cfg, r, argc, argv);
    else
        ret = cmd_dlq_redrive(cfg, r, argc, argv, strcmp(argv[1], "retry") == 0);
    rconn_sync_close(r);
    return ret;
}

/* ---------------------------------------------------------------------------------------------
 * stock
 */
static int cmd_stock_load(const struct config *cfg, struct rconn_sync *r)
{
    struct store *s = NULL;
    struct store_product *p = NULL;
    size_t n = 0;
    char err[STORE_ERR_MAX] = "";
    int ret = 1;
    if (open_store(cfg, &s) != 0)
        return 1;
    int rc = store_list_products(s, &p, &n, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "settle stock load: %s\n", err[0] ? err : settle_strerror(rc));
        goto out;
    }
    const char **skus = calloc(n + 1, sizeof(*skus));
    int64_t *on_hand = calloc(n + 1, sizeof(*on_hand));
    if (skus != NULL && on_hand != NULL) {
        for (size_t i = 0; i < n; i++) {
            skus[i] = p[i].sku;
            on_hand[i] = p[i].on_hand;
        }
        rc = stock_sync_load(r, cfg->namespace_, (unsigned)n, skus, on_hand, stdout, err,
                             sizeof(err));
        if (rc != 0)
            fprintf(stderr, "settle stock load: %s\n", err[0] ? err : settle_strerror(rc));
        else
            ret = 0;
    }
    free(skus);
    free(on_hand);
out:
    free(p);
    store_destroy(s);
    return ret;
}

static int cmd_stock(const struct config *cfg, int argc, char **argv)
{
    bool bad = false;
    bool json = take_flag(&argc, argv, "--json");
    const char *ttl_s = take_opt(&argc, argv, "--ttl-ms", &bad);
    uint64_t ttl = cfg->reservation_ttl_ms;
    if (bad || (ttl_s != NULL && (parse_u64(ttl_s, &ttl) != 0 || ttl == 0)) ||
        reject_unknown_options(argc, argv, 1) != 0 || argc < 2) {
        fprintf(stderr, "usage: settle stock load | reserve <order> <sku>:<qty>... [--ttl-ms N]"
                        " | release <order> | show [sku] [--json]\n");
        return EXIT_USAGE;
    }
    const char *sub = argv[1];
    struct rconn_sync *r = NULL;
    int ret = 1;
    if (strcmp(sub, "load") != 0 && strcmp(sub, "reserve") != 0 && strcmp(sub, "release") != 0 &&
        strcmp(sub, "show") != 0) {
        fprintf(stderr, "settle stock: unknown subcommand %s\n", sub);
        return EXIT_USAGE;
    }
    if (open_redis(cfg, &r) != 0)
        return 1;
    if (strcmp(sub, "load") == 0 && argc == 2) {
        ret = cmd_stock_load(cfg, r);
    } else if (strcmp(sub, "show") == 0 && argc <= 3) {
        int rc = stock_sync_show(r, cfg->namespace_, argc == 3 ? argv[2] : NULL, json, stdout);
        ret = rc == 0 ? 0 : 1;
        if (rc != 0)
            fprintf(stderr, "settle stock show: %s\n", settle_strerror(rc));
    } else if (strcmp(sub, "release") == 0 && argc == 3) {
        enum stock_result res;
        char err[CLI_ERR_MAX] = "";
        int rc = stock_sync_release(r, cfg->namespace_, argv[2], &res, err, sizeof(err));
        if (rc != 0) {
            fprintf(stderr, "settle stock release: %s\n", err[0] ? err : settle_strerror(rc));
        } else {
            printf("%s %s\n", argv[2], stock_result_name(res));
            ret = 0;
        }
    } else if (strcmp(sub, "reserve") == 0 && argc >= 4) {
        struct stock_items items = {0};
        char skus[STOCK_ITEMS_MAX][80];
        ret = EXIT_USAGE;
        for (int i = 3; i < argc; i++) {
            const char *colon = strrchr(argv[i], ':');
            uint64_t qty = 0;
            size_t sl = colon != NULL ? (size_t)(colon - argv[i]) : 0;
            if (items.n >= STOCK_ITEMS_MAX || colon == NULL || sl == 0 || sl >= sizeof(skus[0]) ||
                parse_u64(colon + 1, &qty) != 0 || qty == 0 || qty > 1000000) {
                fprintf(stderr, "settle stock reserve: bad item \"%s\" (want SKU:QTY)\n", argv[i]);
                goto out;
            }
            memcpy(skus[items.n], argv[i], sl);
            skus[items.n][sl] = '\0';
            items.sku[items.n] = skus[items.n];
            items.qty[items.n] = (int32_t)qty;
            items.n++;
        }
        enum stock_result res;
        char detail[CLI_ERR_MAX] = "";
        uint64_t deadline = wall_ms() + ttl;
        int rc = stock_sync_reserve(r, cfg->namespace_, argv[2], deadline, &items, &res, detail,
                                    sizeof(detail));
        if (rc != 0) {
            fprintf(stderr, "settle stock reserve: %s\n", detail[0] ? detail : settle_strerror(rc));
            ret = 1;
        } else {
            printf("%s %s%s%s\n", argv[2], stock_result_name(res), detail[0] ? " " : "", detail);
            ret = res == STOCK_RESERVED || res == STOCK_EXISTS ? 0 : 1;
        }
    } else {
        fprintf(stderr, "usage: settle stock load | reserve <order> <sku>:<qty>... [--ttl-ms N]"
                        " | release <order> | show [sku] [--json]\n");
        ret = EXIT_USAGE;
    }
out:
    rconn_sync_close(r);
    return ret;
}

/* ---------------------------------------------------------------------------------------------
 * run: one scheduled task now, without a loop (the task functions block; that is what this
 * command is for). Decisions go to stdout one per line, then the summary JSON; the log line
 * goes to stderr like every other log line of a CLI command.
 */
static atomic_int run_cancel;

static void on_run_signal(int sig)
{
    (void)sig;
    /* The task stops at its next step and records what it did. */
    atomic_store(&run_cancel, 1);
}

static int cmd_run(const struct config *cfg, int argc, char **argv)
{
    bool bad = false;
    bool dry = take_flag(&argc, argv, "--dry-run");
    bool force = take_flag(&argc, argv, "--force");
    const char *date = take_opt(&argc, argv, "--date", &bad);
    enum tasks_id id;
    if (bad || reject_unknown_options(argc, argv, 1) != 0 || argc != 2 ||
        tasks_parse(argv[1], &id) != 0) {
        fprintf(stderr, "usage: settle run stale_sweep|order_expiry|orphan_sweep|stock_sync|"
                        "daily_stats [--dry-run] [--force] [--date YYYY-MM-DD]\n");
        return EXIT_USAGE;
    }
    if ((force || date != NULL) && id != TASK_DAILY_STATS) {
        fprintf(stderr, "settle run: --force and --date apply to daily_stats only\n");
        return EXIT_USAGE;
    }
    if (date != NULL && !tasks_date_valid(date)) {
        fprintf(stderr, "settle run: --date %s is not a date YYYY-MM-DD\n", date);
        return EXIT_USAGE;
    }
    struct config_redis_addr addr;
    if (config_parse_redis_url(cfg->redis_url, &addr) != 0) {
        fprintf(stderr, "settle: SETTLE_REDIS_URL does not parse\n");
        return EXIT_USAGE;
    }
    struct store *s = NULL;
    struct gateway *g = NULL;
    int ret = 1;
    if (open_store(cfg, &s) != 0)
        return 1;
    /* The orphan sweep fetches pages on its own threads, one easy handle each. */
    struct gateway_config gcfg = {.base_url = cfg->gateway_url,
                                  .connect_timeout_ms = cfg->gateway_connect_timeout_ms,
                                  .timeout_ms = cfg->gateway_timeout_ms,
                                  .body_max_bytes = cfg->gateway_body_max_bytes,
                                  .max_handles = cfg->orphan_concurrency + 1};
    if (gateway_create(&g, &gcfg) != 0) {
        fprintf(stderr, "settle run: could not create the PG client\n");
        goto out;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_run_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    struct tasks_env env = {.cfg = cfg,
                            .store = s,
                            .gateway = g,
                            .redis = addr,
                            .worker_id = cfg->worker_id,
                            .cancel = &run_cancel,
                            .decisions = stdout};
    struct tasks_run run = {.task = id, .dry_run = dry, .force = force};
    if (date != NULL)
        snprintf(run.date, sizeof(run.date), "%s", date);
    struct tasks_outcome out;
    int rc = tasks_run_manual(&env, &run, &out);
    if (out.summary != NULL)
        puts(out.summary);
    fflush(stdout);
    if (rc != 0 || !out.ok)
        fprintf(stderr, "settle run %s: failed: %s\n", argv[1],
                out.error[0] != '\0' ? out.error : settle_strerror(rc));
    else
        ret = 0;
    tasks_outcome_free(&out);
out:
    gateway_destroy(g);
    store_destroy(s);
    return ret;
}

/* ---------------------------------------------------------------------------------------------
 * Dispatch.
 */
int cli_main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "-h") == 0) {
        if (argc >= 3 && strcmp(argv[2], "config") == 0) {
            config_print_help();
            return 0;
        }
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USAGE : 0;
    }
    if (strcmp(argv[1], "version") == 0 || strcmp(argv[1], "--version") == 0) {
        printf("settle %s\n", SETTLE_VERSION);
        return 0;
    }
    if (strcmp(argv[1], "pgsim") == 0)
        return pgsim_main(argc - 1, argv + 1);

    /* Commands see argv without the program name's subcommand shift: argv[0] = command. */
    int cargc = argc - 1;
    char **cargv = argv + 1;
    struct config cfg;
    char err[CLI_ERR_MAX];
    if (config_load(&cfg, &cargc, cargv, err, sizeof(err)) != 0) {
        fprintf(stderr, "settle: %s\n", err);
        config_free(&cfg);
        return EXIT_USAGE;
    }
    log_init(cfg.log_level, strcmp(cargv[0], "work") == 0 ? stdout : stderr);

    int ret;
    const char *cmd = cargv[0];
    if (strcmp(cmd, "work") == 0) {
        ret = reject_unknown_options(cargc, cargv, 1);
        if (ret == 0 && cargc != 1) {
            fprintf(stderr, "settle work: unexpected argument %s\n", cargv[1]);
            ret = EXIT_USAGE;
        }
        if (ret == 0) {
            /* libuv sizes its thread pool once, at the first queued work, from this variable
             * (default 4). A job holds at most one pool thread at a time (a PG or a PostgreSQL
             * call), so SETTLE_CONCURRENCY threads never leave a job waiting for a thread;
             * two more serve the scheduled task (one at a time) and the PostgreSQL health
             * ping, so neither ever waits behind jobs nor makes them wait.
             * An operator's explicit UV_THREADPOOL_SIZE wins. */
            char threads[16];
            snprintf(threads, sizeof(threads), "%u", cfg.concurrency + 2);
            if (getenv("UV_THREADPOOL_SIZE") == NULL)
                setenv("UV_THREADPOOL_SIZE", threads, 1);
            ret = worker_run(&cfg);
        }
    } else if (strcmp(cmd, "migrate") == 0) {
        ret = reject_unknown_options(cargc, cargv, 1);
        if (ret == 0)
            ret = cmd_migrate(&cfg);
    } else if (strcmp(cmd, "enqueue") == 0) {
        ret = cmd_enqueue(&cfg, cargc, cargv);
    } else if (strcmp(cmd, "stats") == 0) {
        ret = cmd_stats(&cfg, cargc, cargv);
    } else if (strcmp(cmd, "dlq") == 0) {
        ret = cmd_dlq(&cfg, cargc, cargv);
    } else if (strcmp(cmd, "stock") == 0) {
        ret = cmd_stock(&cfg, cargc, cargv);
    } else if (strcmp(cmd, "run") == 0) {
        ret = cmd_run(&cfg, cargc, cargv);
    } else if (strcmp(cmd, "config") == 0) {
        char desc[8192];
        ret = config_describe(&cfg, desc, sizeof(desc)) > 0 ? 0 : 1;
        if (ret == 0)
            puts(desc);
    } else {
        fprintf(stderr, "settle: unknown command \"%s\"\n\n", cmd);
        usage(stderr);
        ret = EXIT_USAGE;
    }
    config_free(&cfg);
    return ret;
}
