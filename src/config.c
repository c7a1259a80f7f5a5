/*
 * config.c - the worker's configuration from defaults, environment variables, secret files
 * and command-line flags, validated with one-line messages that name the variable.
 *
 * One static table (vars[] below) describes every variable: its name, type, place in struct
 * config, default, range, whether it is secret, and its help line. Defaults, environment
 * parsing, flag parsing, config_describe() and config_print_help() are all driven by that
 * table, so a variable added there is automatically loadable, settable as a flag, documented
 * and shown.
 * Thread: the loop thread at start-up (it reads the environment and uses strerror); the
 * resulting struct is read-only afterwards.
 * Owns: the strings of struct config (freed by config_free) and, during config_load only,
 * the contents of secret files.
 */
#include "settle/config.h"
#include "settle/error.h"
#include "settle/job.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <jansson.h>

enum var_type {
    VAR_STRING,    /* char * owned by the struct */
    VAR_UINT,      /* unsigned within [min, max] */
    VAR_U64,       /* uint64_t within [min, max]: milliseconds, bytes or counts */
    VAR_PCT,       /* unsigned percentage within [min, max] */
    VAR_QUEUES,    /* comma-separated queue names into queues[] / n_queues */
    VAR_SCHEDULE,  /* struct retry_schedule, parsed by retry_schedule_parse() */
    VAR_LOG_LEVEL, /* enum log_level, parsed by log_level_parse() */
    VAR_BOOL,      /* bool: on|off (also true|false, yes|no, 1|0) */
    VAR_TIME,      /* unsigned minutes after midnight UTC from "HH:MM" */
};

/* The value may also come from <NAME>_FILE (or --<flag>-file) and is never echoed back in an
 * error message. */
#define VAR_SECRET 0x1u
/* The value is a URL or conninfo: config_describe() shows it through config_redact_url(). */
#define VAR_URL 0x2u

struct var {
    const char *name; /* the environment variable; the flag is derived from it */
    enum var_type type;
    size_t offset;   /* of the field in struct config */
    const char *def; /* default as text, parsed like any other value; NULL = computed */
    uint64_t min;
    uint64_t max;
    unsigned flags;
    const char *help;
};

#define OFF(field) offsetof(struct config, field)
#define MS_DAY UINT64_C(86400000)

static const struct var vars[] = {
    {"SETTLE_REDIS_URL", VAR_STRING, OFF(redis_url), "redis://127.0.0.1:6379/0", 0, 0,
     VAR_SECRET | VAR_URL, "Redis URL, redis://[[user]:password@]host[:port][/db]"},
    {"SETTLE_DATABASE_URL", VAR_STRING, OFF(database_url), "postgresql://127.0.0.1:5432/settle", 0,
     0, VAR_SECRET | VAR_URL, "PostgreSQL URI or key=value conninfo"},
    {"SETTLE_GATEWAY_URL", VAR_STRING, OFF(gateway_url), "http://127.0.0.1:8082", 0, 0, VAR_URL,
     "payment gateway base URL, http(s)://host:port"},
    {"SETTLE_NAMESPACE", VAR_STRING, OFF(namespace_), "settle", 0, 0, 0,
     "Redis key prefix, [A-Za-z0-9_.-]{1,64}"},
    {"SETTLE_WORKER_ID", VAR_STRING, OFF(worker_id), NULL, 0, 0, 0,
     "this process's name in leases and the DLQ"},
    {"SETTLE_METRICS_ADDR", VAR_STRING, OFF(metrics_addr), "127.0.0.1:9464", 0, 0, 0,
     "host:port of the metrics HTTP server, empty to disable"},
    {"SETTLE_QUEUES", VAR_QUEUES, OFF(queues), "reconcile,refund", 0, 0, 0,
     "comma-separated queues this process works (reconcile, refund)"},
    {"SETTLE_CONCURRENCY", VAR_UINT, OFF(concurrency), "32", 1, 1024, 0,
     "jobs in flight per process"},
    {"SETTLE_STATUS_CONCURRENCY", VAR_UINT, OFF(status_concurrency), "0", 0, 1024, 0,
     "PG status queries in flight per process; 0 = SETTLE_CONCURRENCY, never more"},
    {"SETTLE_CLAIM_BATCH", VAR_UINT, OFF(claim_batch), "64", 1, 1000, 0, "jobs taken per claim"},
    {"SETTLE_DB_POOL_SIZE", VAR_UINT, OFF(db_pool_size), "0", 0, 256, 0,
     "PostgreSQL connections; 0 = min(concurrency, 16)"},
    {"SETTLE_DB_BATCH", VAR_UINT, OFF(db_batch), "32", 1, 64, 0,
     "most jobs per order load and per outcome transaction; 1 = one job per transaction"},
    {"SETTLE_DB_BATCH_CONCURRENCY", VAR_UINT, OFF(db_batch_concurrency), "2", 1, 256, 0,
     "batched PostgreSQL transactions (loads and writes) in flight"},
    {"SETTLE_DB_PREPARED", VAR_BOOL, OFF(db_prepared), "off", 0, 0, 0,
     "named prepared statements for the batched transactions (not behind PgBouncer < 1.21)"},
    {"SETTLE_JOB_MAX_BYTES", VAR_U64, OFF(job_max_bytes), "65536", 128, 16777216, 0,
     "largest job accepted; larger ones go to the DLQ unparsed"},
    {"SETTLE_GATEWAY_CONNECT_TIMEOUT_MS", VAR_U64, OFF(gateway_connect_timeout_ms), "1000", 1,
     600000, 0, "gateway TCP/TLS connect timeout"},
    {"SETTLE_GATEWAY_TIMEOUT_MS", VAR_U64, OFF(gateway_timeout_ms), "3000", 1, 600000, 0,
     "gateway total time per request"},
    {"SETTLE_GATEWAY_BODY_MAX_BYTES", VAR_U64, OFF(gateway_body_max_bytes), "65536", 1024, 16777216,
     0, "largest gateway response body read"},
    {"SETTLE_GATEWAY_SLOWEST_MS", VAR_U64, OFF(gateway_slowest_ms), "60000", 1, MS_DAY, 0,
     "the slowest the PG may take to settle a payment"},
    {"SETTLE_RETRY_BASE_MS", VAR_U64, OFF(retry_base_ms), "1000", 1, MS_DAY, 0,
     "first retry backoff ceiling"},
    {"SETTLE_RETRY_CAP_MS", VAR_U64, OFF(retry_cap_ms), "30000", 1, MS_DAY, 0,
     "largest retry backoff ceiling"},
    {"SETTLE_RETRY_MAX_ATTEMPTS", VAR_UINT, OFF(retry_max_attempts), "8", 1, 1000, 0,
     "failure attempts before a job goes to the DLQ"},
    {"SETTLE_RETRY_AFTER_MAX_MS", VAR_U64, OFF(retry_after_max_ms), "300000", 1, MS_DAY, 0,
     "the longest Retry-After honoured (and the longest delay)"},
    {"SETTLE_RETRY_DEADLINE_MS", VAR_U64, OFF(retry_deadline_ms), "3600000", 1000, 7 * MS_DAY, 0,
     "a job older than this stops retrying"},
    {"SETTLE_LEASE_MS", VAR_U64, OFF(lease_ms), "15000", 1000, 3600000, 0,
     "how long a claimed job is owned before it may be reclaimed"},
    {"SETTLE_MAX_DELIVERIES", VAR_UINT, OFF(max_deliveries), "5", 1, 1000, 0,
     "lease expiries before a job is buried as crashed_too_often"},
    {"SETTLE_REAPER_INTERVAL_MS", VAR_U64, OFF(reaper_interval_ms), "1000", 10, 3600000, 0,
     "how often expired leases are collected"},
    {"SETTLE_REAPER_BATCH", VAR_UINT, OFF(reaper_batch), "100", 1, 10000, 0,
     "expired leases collected per run"},
    {"SETTLE_SHUTDOWN_GRACE_MS", VAR_U64, OFF(shutdown_grace_ms), "20000", 0, 3600000, 0,
     "time given to jobs in flight at shutdown"},
    {"SETTLE_CHECK_SCHEDULE_MS", VAR_SCHEDULE, OFF(check_schedule), "60000,300000", 0, 0, 0,
     "delays between status checks of a PENDING payment; the last repeats"},
    {"SETTLE_PAYMENT_WINDOW_MS", VAR_U64, OFF(payment_window_ms), "300000", 1, 7 * MS_DAY, 0,
     "an order unpaid for this long is expired"},
    {"SETTLE_PENDING_MAX_AGE_MS", VAR_U64, OFF(pending_max_age_ms), "86400000", 1, 30 * MS_DAY, 0,
     "a payment PENDING for this long goes to a human"},
    {"SETTLE_RESERVATION_TTL_MS", VAR_U64, OFF(reservation_ttl_ms), "900000", 1000, 7 * MS_DAY, 0,
     "lifetime of a stock reservation"},
    {"SETTLE_BREAKER_FAILURE_PCT", VAR_PCT, OFF(breaker.failure_pct), "60", 1, 100, 0,
     "failure share that opens the circuit breaker"},
    {"SETTLE_BREAKER_WINDOW_MS", VAR_U64, OFF(breaker.window_ms), "30000", 1000,
     (uint64_t)BREAKER_BUCKETS * 1000, 0, "sliding window of the circuit breaker"},
    {"SETTLE_BREAKER_MIN_CALLS", VAR_UINT, OFF(breaker.min_calls), "20", 1, 1000000, 0,
     "calls in the window before the breaker may open"},
    {"SETTLE_BREAKER_OPEN_MS", VAR_U64, OFF(breaker.open_ms), "10000", 1, 3600000, 0,
     "first open period; doubles per consecutive trip"},
    {"SETTLE_BREAKER_OPEN_MAX_MS", VAR_U64, OFF(breaker.open_max_ms), "60000", 1, MS_DAY, 0,
     "longest open period"},
    {"SETTLE_BREAKER_HALF_OPEN_PROBES", VAR_UINT, OFF(breaker.half_open_probes), "5", 1, 1000, 0,
     "calls let through to test a half-open breaker"},
    {"SETTLE_DB_STATEMENT_TIMEOUT_MS", VAR_U64, OFF(db_statement_timeout_ms), "5000", 1, 3600000, 0,
     "PostgreSQL statement_timeout"},
    {"SETTLE_SCHEDULER", VAR_BOOL, OFF(scheduler), "on", 0, 0, 0,
     "run the scheduled tasks in this worker (on|off)"},
    {"SETTLE_TASK_STALE_MS", VAR_U64, OFF(task_stale_ms), "600000", 1000, MS_DAY, 0,
     "a running task without a heartbeat for this long is taken over"},
    {"SETTLE_TASK_RETRY_MS", VAR_U64, OFF(task_retry_ms), "60000", 100, MS_DAY, 0,
     "a failed daily task is tried again after this"},
    {"SETTLE_TASK_MAX_ATTEMPTS", VAR_UINT, OFF(task_max_attempts), "5", 1, 100, 0,
     "tries of one daily task period"},
    {"SETTLE_SWEEP_INTERVAL_MS", VAR_U64, OFF(sweep_interval_ms), "60000", 100, 7 * MS_DAY, 0,
     "stale-order sweep: runs start at least this far apart"},
    {"SETTLE_SWEEP_MIN_AGE_MS", VAR_U64, OFF(sweep_min_age_ms), "600000", 0, 30 * MS_DAY, 0,
     "stale-order sweep: PENDING orders older than this get a reconcile job"},
    {"SETTLE_SWEEP_LIMIT", VAR_UINT, OFF(sweep_limit), "1000", 1, 100000, 0,
     "stale-order sweep: orders per run, oldest first"},
    {"SETTLE_EXPIRY_INTERVAL_MS", VAR_U64, OFF(expiry_interval_ms), "600000", 100, 7 * MS_DAY, 0,
     "order expiry: runs start at least this far apart"},
    {"SETTLE_EXPIRY_LIMIT", VAR_UINT, OFF(expiry_limit), "100", 1, 100000, 0,
     "order expiry: orders per run"},
    {"SETTLE_ORPHAN_INTERVAL_MS", VAR_U64, OFF(orphan_interval_ms), "600000", 100, 7 * MS_DAY, 0,
     "PG orphan sweep: runs start at least this far apart"},
    {"SETTLE_ORPHAN_WINDOW_MS", VAR_U64, OFF(orphan_window_ms), "86400000", 1000, 30 * MS_DAY, 0,
     "PG orphan sweep: how far back the PG's payment list is read"},
    {"SETTLE_ORPHAN_GRACE_MS", VAR_U64, OFF(orphan_grace_ms), "1800000", 0, 7 * MS_DAY, 0,
     "PG orphan sweep: payments younger than this are left alone"},
    {"SETTLE_ORPHAN_PAGE_SIZE", VAR_UINT, OFF(orphan_page_size), "100", 1, 1000, 0,
     "PG orphan sweep: payments per page"},
    {"SETTLE_ORPHAN_CONCURRENCY", VAR_UINT, OFF(orphan_concurrency), "4", 1, 64, 0,
     "PG orphan sweep: pages fetched at once"},
    {"SETTLE_ORPHAN_LOOKUP_BATCH", VAR_UINT, OFF(orphan_lookup_batch), "500", 1, 10000, 0,
     "PG orphan sweep: order ids per PostgreSQL lookup"},
    {"SETTLE_ORPHAN_REFUND_CAP", VAR_UINT, OFF(orphan_refund_cap), "50", 0, 100000, 0,
     "PG orphan sweep: refund jobs per run (0 = record only)"},
    {"SETTLE_ORPHAN_MAX_PAGES", VAR_UINT, OFF(orphan_max_pages), "10000", 1, 1000000, 0,
     "PG orphan sweep: pages read per run"},
    {"SETTLE_STOCK_SYNC_AT", VAR_TIME, OFF(stock_sync_at_min), "02:00", 0, 0, 0,
     "stock sync: daily at this UTC time (HH:MM)"},
    {"SETTLE_STOCK_SYNC_BATCH", VAR_UINT, OFF(stock_sync_batch), "1000", 1, 10000, 0,
     "stock sync: SKUs per batch"},
    {"SETTLE_STOCK_ALERT_THRESHOLD", VAR_UINT, OFF(stock_alert_threshold), "10", 0, 1000000, 0,
     "stock sync: more mismatched SKUs than this raise one alert"},
    {"SETTLE_DAILY_STATS_AT", VAR_TIME, OFF(daily_stats_at_min), "00:00", 0, 0, 0,
     "daily statistics: daily at this UTC time (HH:MM), for the day before"},
    {"SETTLE_DLQ_ALERT_SIZE", VAR_U64, OFF(dlq_alert_size), "10000", 1, 1000000000, 0,
     "DLQ length that raises an alert"},
    {"SETTLE_LOG_LEVEL", VAR_LOG_LEVEL, OFF(log_level), "info", 0, 0, 0,
     "debug, info, warn or error"},
    {"SETTLE_RUN_SECONDS", VAR_U64, OFF(run_seconds), "0", 0, 31536000, 0,
     "stop after this many seconds; 0 = run until signalled"},
};

#define N_VARS (sizeof(vars) / sizeof(vars[0]))

/* A secret file is a URL; anything this large is the wrong file. */
#define SECRET_FILE_MAX 65536
/* Longest flag name derived from a variable name. */
#define FLAG_MAX 64
#define WORKER_ID_MAX 128

enum src {
    SRC_DEFAULT,
    SRC_ENV,
    SRC_ENV_FILE,
    SRC_FLAG,
    SRC_FLAG_FILE,
};

/* Where a variable's effective text comes from, before it is parsed. */
struct raw {
    enum src src;
    const char *text; /* the value, or the file path for SRC_*_FILE */
};

static void fail(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail(char *err, size_t err_len, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || err_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

static void *field_ptr(struct config *c, const struct var *v)
{
    return (char *)c + v->offset;
}

static const void *field_cptr(const struct config *c, const struct var *v)
{
    return (const char *)c + v->offset;
}

/* SETTLE_BREAKER_OPEN_MS -> breaker-open-ms */
static void flag_name(const struct var *v, char *out, size_t len)
{
    const char *s = v->name + strlen("SETTLE_");
    size_t i = 0;

    for (; s[i] != '\0' && i + 1 < len; i++) {
        char ch = s[i];
        if (ch == '_')
            ch = '-';
        else if (ch >= 'A' && ch <= 'Z')
            ch = (char)(ch - 'A' + 'a');
        out[i] = ch;
    }
    out[i] = '\0';
}

/* "SETTLE_X", "SETTLE_X (flag --x)" ...: who set the value, for error messages. */
static void origin_text(const struct var *v, enum src src, char *out, size_t len)
{
    char flag[FLAG_MAX];

    flag_name(v, flag, sizeof(flag));
    switch (src) {
    case SRC_DEFAULT:
        snprintf(out, len, "%s (default)", v->name);
        break;
    case SRC_ENV:
        snprintf(out, len, "%s", v->name);
        break;
    case SRC_ENV_FILE:
        snprintf(out, len, "%s (read from %s_FILE)", v->name, v->name);
        break;
    case SRC_FLAG:
        snprintf(out, len, "%s (flag --%s)", v->name, flag);
        break;
    case SRC_FLAG_FILE:
        snprintf(out, len, "%s (flag --%s-file)", v->name, flag);
        break;
    default:
        abort();
    }
}

/* Strict unsigned decimal: digits only (strtoull alone would accept spaces, a sign, and wrap
 * "-1" to 2^64-1), the whole string, no overflow. */
static int parse_u64(const char *s, uint64_t *out)
{
    char *end;

    if (s[0] < '0' || s[0] > '9')
        return SETTLE_EINVAL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno == ERANGE || *end != '\0')
        return SETTLE_EINVAL;
    *out = (uint64_t)v;
    return 0;
}

static int parse_queues(struct config *c, const char *text, char *why, size_t why_len)
{
    const char *p = text;

    for (;;) {
        const char *comma = strchr(p, ',');
        size_t n = comma != NULL ? (size_t)(comma - p) : strlen(p);
        char name[32];
        enum job_kind kind;

        if (n == 0 || n >= sizeof(name)) {
            fail(why, why_len,
                 "expected a comma-separated list of reconcile, refund; got \"%.64s\"", text);
            return SETTLE_EINVAL;
        }
        memcpy(name, p, n);
        name[n] = '\0';
        if (job_kind_parse(name, &kind) != 0) {
            fail(why, why_len, "unknown queue \"%s\" (known: reconcile, refund)", name);
            return SETTLE_EINVAL;
        }
        if (config_has_queue(c, name)) {
            fail(why, why_len, "queue \"%s\" listed twice", name);
            return SETTLE_EINVAL;
        }
        if (c->n_queues == CONFIG_QUEUES_MAX) {
            fail(why, why_len, "more than %d queues", CONFIG_QUEUES_MAX);
            return SETTLE_EINVAL;
        }
        c->queues[c->n_queues] = strdup(name);
        if (c->queues[c->n_queues] == NULL) {
            fail(why, why_len, "out of memory");
            return SETTLE_ENOMEM;
        }
        c->n_queues++;
        if (comma == NULL)
            return 0;
        p = comma + 1;
    }
}

static void free_queues(struct config *c)
{
    for (unsigned i = 0; i < c->n_queues; i++) {
        free(c->queues[i]);
        c->queues[i] = NULL;
    }
    c->n_queues = 0;
}

/* Parses text into the field of v. why gets the problem without the variable's name (the
 * caller adds where the value came from); secret values are never quoted in it. */
static int apply_value(struct config *c, const struct var *v, const char *text, char *why,
                       size_t why_len)
{
    uint64_t n;

    switch (v->type) {
    case VAR_STRING: {
        char **slot = field_ptr(c, v);
        char *copy = strdup(text);
        if (copy == NULL) {
            fail(why, why_len, "out of memory");
            return SETTLE_ENOMEM;
        }
        free(*slot);
        *slot = copy;
        return 0;
    }
    case VAR_UINT:
    case VAR_PCT:
    case VAR_U64:
        if (parse_u64(text, &n) != 0) {
            fail(why, why_len, "\"%.64s\" is not an unsigned decimal integer", text);
            return SETTLE_EINVAL;
        }
        if (n < v->min || n > v->max) {
            fail(why, why_len, "%llu is out of range %llu..%llu", (unsigned long long)n,
                 (unsigned long long)v->min, (unsigned long long)v->max);
            return SETTLE_EINVAL;
        }
        if (v->type == VAR_U64)
            *(uint64_t *)field_ptr(c, v) = n;
        else
            *(unsigned *)field_ptr(c, v) = (unsigned)n;
        return 0;
    case VAR_QUEUES:
        free_queues(c);
        return parse_queues(c, text, why, why_len);
    case VAR_SCHEDULE:
        if (retry_schedule_parse(text, field_ptr(c, v)) != 0) {
            fail(why, why_len,
                 "\"%.64s\" is not a list of 1 to %d comma-separated positive millisecond values",
                 text, RETRY_SCHEDULE_MAX);
            return SETTLE_EINVAL;
        }
        return 0;
    case VAR_LOG_LEVEL:
        if (log_level_parse(text, field_ptr(c, v)) != 0) {
            fail(why, why_len, "\"%.32s\" is not one of debug, info, warn, error", text);
            return SETTLE_EINVAL;
        }
        return 0;
    case VAR_BOOL:
        if (strcasecmp(text, "on") == 0 || strcasecmp(text, "true") == 0 ||
            strcasecmp(text, "yes") == 0 || strcmp(text, "1") == 0) {
            *(bool *)field_ptr(c, v) = true;
        } else if (strcasecmp(text, "off") == 0 || strcasecmp(text, "false") == 0 ||
                   strcasecmp(text, "no") == 0 || strcmp(text, "0") == 0) {
            *(bool *)field_ptr(c, v) = false;
        } else {
            fail(why, why_len, "\"%.32s\" is not on or off", text);
            return SETTLE_EINVAL;
        }
        return 0;
    case VAR_TIME:
        if (config_parse_time_of_day(text, field_ptr(c, v)) != 0) {
            fail(why, why_len, "\"%.32s\" is not a UTC time of day HH:MM (00:00..23:59)", text);
            return SETTLE_EINVAL;
        }
        return 0;
    default:
        abort();
    }
}

int config_parse_time_of_day(const char *s, unsigned *minutes)
{
    /* Exactly "HH:MM": a schedule is money-adjacent, so "2:0" or "24:00" is a typo to
     * report, not something to guess at. */
    if (s == NULL || strlen(s) != 5 || s[2] != ':')
        return SETTLE_EINVAL;
    for (int i = 0; i < 5; i++) {
        if (i != 2 && (s[i] < '0' || s[i] > '9'))
            return SETTLE_EINVAL;
    }
    unsigned h = (unsigned)(s[0] - '0') * 10 + (unsigned)(s[1] - '0');
    unsigned m = (unsigned)(s[3] - '0') * 10 + (unsigned)(s[4] - '0');
    if (h > 23 || m > 59)
        return SETTLE_EINVAL;
    if (minutes != NULL)
        *minutes = h * 60 + m;
    return 0;
}

static int default_worker_id(struct config *c)
{
    char host[256];
    char id[WORKER_ID_MAX + 1];

    if (gethostname(host, sizeof(host)) != 0 || host[0] == '\0')
        snprintf(host, sizeof(host), "unknown");
    host[sizeof(host) - 1] = '\0';
    /* Keep room for ":<pid>" so that two processes on one host never share an id. */
    snprintf(id, sizeof(id), "%.100s:%ld", host, (long)getpid());
    free(c->worker_id);
    c->worker_id = strdup(id);
    return c->worker_id != NULL ? 0 : SETTLE_ENOMEM;
}

static void resolve_auto(struct config *c)
{
    /* More connections than jobs in flight would sit idle; beyond 16 a shared PostgreSQL
     * (or PgBouncer) suffers more than one worker gains. */
    if (c->db_pool_size == 0)
        c->db_pool_size = c->concurrency < 16 ? c->concurrency : 16;
    /* A worker never has more status queries out than jobs. */
    if (c->status_concurrency == 0 || c->status_concurrency > c->concurrency)
        c->status_concurrency = c->concurrency;
}

int config_defaults(struct config *c)
{
    char why[256];

    memset(c, 0, sizeof(*c));
    for (size_t i = 0; i < N_VARS; i++) {
        if (vars[i].def == NULL)
            continue;
        int rc = apply_value(c, &vars[i], vars[i].def, why, sizeof(why));
        if (rc != 0) {
            config_free(c);
            /* A default that does not parse is a bug in the table above, except for ENOMEM. */
            if (rc != SETTLE_ENOMEM)
                abort();
            return rc;
        }
    }
    if (default_worker_id(c) != 0) {
        config_free(c);
        return SETTLE_ENOMEM;
    }
    resolve_auto(c);
    return 0;
}

void config_free(struct config *c)
{
    for (size_t i = 0; i < N_VARS; i++) {
        if (vars[i].type == VAR_STRING) {
            char **slot = field_ptr(c, &vars[i]);
            free(*slot);
            *slot = NULL;
        }
    }
    free_queues(c);
    memset(c, 0, sizeof(*c));
}

static int read_secret_file(const char *path, char **out, char *why, size_t why_len)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t n;
    int rc = SETTLE_EINVAL;

    if (f == NULL) {
        fail(why, why_len, "cannot open %s: %s", path, strerror(errno));
        return SETTLE_EINVAL;
    }
    buf = malloc(SECRET_FILE_MAX + 1);
    if (buf == NULL) {
        fail(why, why_len, "out of memory");
        rc = SETTLE_ENOMEM;
        goto out;
    }
    n = fread(buf, 1, SECRET_FILE_MAX + 1, f);
    if (ferror(f)) {
        fail(why, why_len, "cannot read %s: %s", path, strerror(errno));
        goto out;
    }
    if (n > SECRET_FILE_MAX) {
        fail(why, why_len, "%s is larger than %d bytes", path, SECRET_FILE_MAX);
        goto out;
    }
    if (memchr(buf, '\0', n) != NULL) {
        fail(why, why_len, "%s contains a NUL byte", path);
        goto out;
    }
    /* Editors and `echo` add a newline (CRLF on some systems); it is not part of a secret. */
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    if (n == 0) {
        fail(why, why_len, "%s is empty", path);
        goto out;
    }
    buf[n] = '\0';
    *out = buf;
    buf = NULL;
    rc = 0;
out:
    free(buf);
    fclose(f);
    return rc;
}

/* Collects the environment's values (and secret file paths) into raws. */
static int collect_env(struct raw *raws, char *err, size_t err_len)
{
    for (size_t i = 0; i < N_VARS; i++) {
        const struct var *v = &vars[i];
        const char *val = getenv(v->name);
        const char *file = NULL;

        if (v->flags & VAR_SECRET) {
            char file_var[FLAG_MAX + 8];
            snprintf(file_var, sizeof(file_var), "%s_FILE", v->name);
            file = getenv(file_var);
        }
        if (val != NULL && file != NULL) {
            fail(err, err_len, "%s and %s_FILE are both set; set only one", v->name, v->name);
            return SETTLE_EINVAL;
        }
        if (file != NULL) {
            raws[i].src = SRC_ENV_FILE;
            raws[i].text = file;
        } else if (val != NULL) {
            raws[i].src = SRC_ENV;
            raws[i].text = val;
        }
    }
    return 0;
}

/*
 * Collects recognised flags from argv into raws and marks their argv slots in remove[].
 * Scanning stops at "--", which (with everything after it) is left for the caller.
 */
static int collect_flags(struct raw *raws, int argc, char **argv, bool *remove, char *err,
                         size_t err_len)
{
    unsigned char seen[N_VARS]; /* 1: --x given, 2: --x-file given */

    memset(seen, 0, sizeof(seen));
    for (int a = 1; a < argc; a++) {
        const char *arg = argv[a];
        if (strcmp(arg, "--") == 0)
            break;
        if (strncmp(arg, "--", 2) != 0)
            continue;
        for (size_t i = 0; i < N_VARS; i++) {
            const struct var *v = &vars[i];
            char flag[FLAG_MAX + 8];
            size_t flen;
            bool is_file = false;
            const char *value;

            flag_name(v, flag, sizeof(flag));
            flen = strlen(flag);
            if (strncmp(arg + 2, flag, flen) != 0)
                continue;
            const char *rest = arg + 2 + flen;
            if ((v->flags & VAR_SECRET) && strncmp(rest, "-file", 5) == 0 &&
                (rest[5] == '\0' || rest[5] == '=')) {
                is_file = true;
                rest += 5;
            }
            if (*rest != '\0' && *rest != '=')
                continue; /* a longer flag that merely starts like this one */
            remove[a] = true;
            if (*rest == '=') {
                value = rest + 1;
            } else if (a + 1 < argc) {
                value = argv[++a];
                remove[a] = true;
            } else {
                fail(err, err_len, "--%s%s (%s): missing value", flag, is_file ? "-file" : "",
                     v->name);
                return SETTLE_EINVAL;
            }
            seen[i] |= is_file ? 2 : 1;
            if (seen[i] == 3) {
                fail(err, err_len, "--%s and --%s-file (%s) are both given; give only one", flag,
                     flag, v->name);
                return SETTLE_EINVAL;
            }
            raws[i].src = is_file ? SRC_FLAG_FILE : SRC_FLAG;
            raws[i].text = value;
            break;
        }
    }
    return 0;
}

static bool valid_namespace(const char *s)
{
    size_t n = strlen(s);

    if (n < 1 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return false;
    }
    return true;
}

static bool valid_worker_id(const char *s)
{
    size_t n = strlen(s);

    if (n < 1 || n > WORKER_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        /* It appears in Redis values and log lines; spaces and control bytes would only make
         * those ambiguous. */
        if (ch <= 0x20 || ch == 0x7f)
            return false;
    }
    return true;
}

/* "" or host:port with a port in 1..65535. */
static bool valid_listen_addr(const char *s)
{
    const char *colon = strrchr(s, ':');
    uint64_t port;

    if (s[0] == '\0')
        return true;
    if (colon == NULL || colon == s || parse_u64(colon + 1, &port) != 0)
        return false;
    return port >= 1 && port <= 65535;
}

static int hex_value(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Percent-decodes s[0..n) into out (NUL-terminated); -1 on a bad escape, a decoded NUL or
 * when out is too small. */
static int pct_decode(const char *s, size_t n, char *out, size_t out_len)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (ch == '%') {
            if (i + 2 >= n)
                return -1;
            int hi = hex_value(s[i + 1]);
            int lo = hex_value(s[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return -1;
            ch = (char)(hi * 16 + lo);
            i += 2;
        }
        if (o + 1 >= out_len)
            return -1;
        out[o++] = ch;
    }
    out[o] = '\0';
    return 0;
}

static int parse_redis_url(const char *url, struct config_redis_addr *out, char *why,
                           size_t why_len)
{
    struct config_redis_addr a;
    const char *p;
    const char *at;
    const char *host_end;
    uint64_t n;

    memset(&a, 0, sizeof(a));
    a.port = 6379;
    if (strncasecmp(url, "rediss://", 9) == 0) {
        fail(why, why_len,
             "rediss:// (TLS) is not supported; connect through a TLS proxy with a redis:// URL");
        return SETTLE_EINVAL;
    }
    if (strncasecmp(url, "redis://", 8) != 0) {
        fail(why, why_len, "the scheme must be redis://");
        return SETTLE_EINVAL;
    }
    p = url + 8;
    /* The last '@' ends the credentials, so a password with an unencoded '@' still works. */
    at = strrchr(p, '@');
    if (at != NULL) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon == NULL) {
            fail(why, why_len, "credentials must be written [user]:password@");
            return SETTLE_EINVAL;
        }
        if (colon + 1 == at) {
            fail(why, why_len, "the password after ':' is empty");
            return SETTLE_EINVAL;
        }
        if (pct_decode(p, (size_t)(colon - p), a.username, sizeof(a.username)) != 0 ||
            pct_decode(colon + 1, (size_t)(at - colon - 1), a.password, sizeof(a.password)) != 0) {
            fail(why, why_len, "the user name or password is too long or badly %%-encoded");
            return SETTLE_EINVAL;
        }
        p = at + 1;
    }
    if (strpbrk(p, "?#") != NULL) {
        fail(why, why_len, "query parameters and fragments are not supported");
        return SETTLE_EINVAL;
    }
    if (*p == '[') {
        /* An IPv6 literal: [::1]:6379 */
        const char *close = strchr(p, ']');
        if (close == NULL || close == p + 1) {
            fail(why, why_len, "unterminated or empty [IPv6] host");
            return SETTLE_EINVAL;
        }
        if ((size_t)(close - p - 1) >= sizeof(a.host)) {
            fail(why, why_len, "host is too long");
            return SETTLE_EINVAL;
        }
        memcpy(a.host, p + 1, (size_t)(close - p - 1));
        host_end = close + 1;
        if (*host_end != '\0' && *host_end != ':' && *host_end != '/') {
            fail(why, why_len, "unexpected text after the [IPv6] host");
            return SETTLE_EINVAL;
        }
    } else {
        host_end = p + strcspn(p, ":/");
        if (host_end == p) {
            fail(why, why_len, "the host is empty");
            return SETTLE_EINVAL;
        }
        if ((size_t)(host_end - p) >= sizeof(a.host)) {
            fail(why, why_len, "host is too long");
            return SETTLE_EINVAL;
        }
        memcpy(a.host, p, (size_t)(host_end - p));
    }
    for (const char *h = a.host; *h != '\0'; h++) {
        if ((unsigned char)*h <= 0x20 || *h == 0x7f || *h == '@' || *h == '\\') {
            fail(why, why_len, "the host contains an invalid character");
            return SETTLE_EINVAL;
        }
    }
    p = host_end;
    if (*p == ':') {
        char port[8];
        size_t len = strcspn(p + 1, "/");
        if (len == 0 || len >= sizeof(port)) {
            fail(why, why_len, "the port must be 1..65535");
            return SETTLE_EINVAL;
        }
        memcpy(port, p + 1, len);
        port[len] = '\0';
        if (parse_u64(port, &n) != 0 || n < 1 || n > 65535) {
            fail(why, why_len, "the port must be 1..65535");
            return SETTLE_EINVAL;
        }
        a.port = (int)n;
        p += 1 + len;
    }
    if (*p == '/') {
        p++;
        if (*p != '\0') {
            if (parse_u64(p, &n) != 0 || n > INT_MAX) {
                fail(why, why_len, "the database must be a number after the host");
                return SETTLE_EINVAL;
            }
            a.db = (int)n;
        }
    }
    *out = a;
    return 0;
}

int config_parse_redis_url(const char *url, struct config_redis_addr *out)
{
    if (url == NULL)
        return SETTLE_EINVAL;
    return parse_redis_url(url, out, NULL, 0);
}

/* Bounded writer for config_redact_url: never overflows, always NUL-terminated. */
struct sbuf {
    char *p;
    size_t len;
    size_t cap;
};

static void sb_put(struct sbuf *b, const char *s, size_t n)
{
    if (b->cap == 0)
        return;
    size_t room = b->cap - 1 - b->len;
    if (n > room)
        n = room;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static bool key_is_secret(const char *key, size_t n)
{
    /* "password" and "sslpassword" are libpq's secret keys. */
    static const char suffix[] = "password";
    size_t sn = sizeof(suffix) - 1;

    return n >= sn && strncasecmp(key + n - sn, suffix, sn) == 0;
}

static bool is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v';
}

/* key = value pairs as libpq reads them: values bare or in single quotes with \ escapes. */
static void redact_conninfo(struct sbuf *b, const char *s)
{
    while (*s != '\0') {
        const char *start = s;
        while (is_space(*s))
            s++;
        const char *key = s;
        while (*s != '\0' && *s != '=' && !is_space(*s))
            s++;
        size_t key_len = (size_t)(s - key);
        while (is_space(*s))
            s++;
        if (key_len == 0 || *s != '=') {
            /* Not something libpq would accept; it could hold a secret in any shape. */
            sb_put(b, start, (size_t)(key - start));
            if (*key != '\0')
                sb_put(b, "***", 3);
            return;
        }
        s++;
        while (is_space(*s))
            s++;
        const char *value = s;
        if (*s == '\'') {
            s++;
            while (*s != '\0' && *s != '\'') {
                if (*s == '\\' && s[1] != '\0')
                    s++;
                s++;
            }
            if (*s == '\'')
                s++;
        } else {
            while (*s != '\0' && !is_space(*s))
                s++;
        }
        if (key_is_secret(key, key_len)) {
            sb_put(b, start, (size_t)(value - start));
            sb_put(b, "***", 3);
        } else {
            sb_put(b, start, (size_t)(s - start));
        }
    }
}

/* Is there a URI scheme ("name://") at the very start? Only then is the string a URI: a
 * key=value conninfo may hold "://" inside a value. */
static size_t uri_scheme_len(const char *s)
{
    size_t i = 0;
    if (!((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z')))
        return 0;
    while ((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
           (s[i] >= '0' && s[i] <= '9') || s[i] == '+' || s[i] == '-' || s[i] == '.')
        i++;
    return strncmp(s + i, "://", 3) == 0 ? i + 3 : 0;
}

/* A query key as libpq reads it: percent-decoded ("passwor%64" is "password"). */
static bool query_key_is_secret(const char *key, size_t n)
{
    char dec[64];
    size_t d = 0;
    for (size_t i = 0; i < n; i++) {
        if (d + 1 >= sizeof(dec))
            return true; /* a key this long is no key we know: redact its value */
        if (key[i] == '%' && i + 2 < n + 1 && hex_value(key[i + 1]) >= 0 &&
            hex_value(key[i + 2]) >= 0) {
            dec[d++] = (char)(hex_value(key[i + 1]) * 16 + hex_value(key[i + 2]));
            i += 2;
        } else {
            dec[d++] = key[i];
        }
    }
    return key_is_secret(dec, d);
}

#define REDACT_SPANS_MAX 64

struct spans {
    size_t start[REDACT_SPANS_MAX], end[REDACT_SPANS_MAX];
    unsigned n;
    bool overflow;
};

static void span_add(struct spans *sp, size_t start, size_t end)
{
    if (end <= start)
        return;
    if (sp->n == REDACT_SPANS_MAX) {
        sp->overflow = true;
        return;
    }
    sp->start[sp->n] = start;
    sp->end[sp->n] = end;
    sp->n++;
}

/* The password of a userinfo part [from, at): everything after its first ':'. */
static void span_userinfo(struct spans *sp, const char *url, size_t from, const char *at)
{
    const char *colon = memchr(url + from, ':', (size_t)(at - (url + from)));
    if (colon != NULL)
        span_add(sp, (size_t)(colon + 1 - url), (size_t)(at - url));
}

void config_redact_url(const char *url, char *out, size_t out_len)
{
    struct sbuf b = {out, 0, out_len};
    struct spans sp = {{0}, {0}, 0, false};

    if (out_len == 0)
        return;
    out[0] = '\0';
    if (url == NULL)
        return;
    size_t from = uri_scheme_len(url);
    if (from == 0) {
        redact_conninfo(&b, url);
        return;
    }
    /* Credentials, as every consumer might read them, redacted as the union: libpq ends the
     * authority at the first '/', '?' or '#' and takes the last '@' before it; the Redis URL
     * parser takes the last '@' of the whole string (its passwords may hold '/' or '?').
     * Over-redacting an odd URL is better than printing its password. */
    size_t auth_end = from + strcspn(url + from, "/?#");
    const char *at_pg = NULL;
    for (const char *p = url + from; p < url + auth_end; p++) {
        if (*p == '@')
            at_pg = p;
    }
    const char *at_redis = strrchr(url + from, '@');
    if (at_pg != NULL)
        span_userinfo(&sp, url, from, at_pg);
    if (at_redis != NULL && at_redis != at_pg)
        span_userinfo(&sp, url, from, at_redis);
    /* Query parameters whose (percent-decoded) key names a password, in the query libpq
     * sees (from the first '?' after the authority) and after a Redis-style last '@'. libpq
     * has no fragment: a '#' is part of a value, and "?user=a#b&password=x" sends password x.
     * So keys are looked for after '&' and after '#' alike, and a secret value runs to the
     * next '&' whatever it holds. */
    const char *queries[2] = {strchr(url + auth_end, '?'),
                              at_redis != NULL ? strchr(at_redis, '?') : NULL};
    for (int qi = 0; qi < 2; qi++) {
        if (queries[qi] == NULL || (qi == 1 && queries[1] == queries[0]))
            continue;
        const char *q = queries[qi] + 1;
        while (*q != '\0') {
            size_t n = strcspn(q, "&#");
            const char *eq = memchr(q, '=', n);
            if (eq != NULL && query_key_is_secret(q, (size_t)(eq - q)))
                span_add(&sp, (size_t)(eq + 1 - url), (size_t)(q + strcspn(q, "&") - url));
            q += n;
            if (*q != '\0')
                q++;
        }
    }
    if (sp.overflow) {
        sb_put(&b, url, from);
        sb_put(&b, "***", 3);
        return;
    }
    /* Copy, replacing the union of the spans with "***". */
    size_t len = strlen(url), i = 0;
    while (i < len) {
        size_t cut_end = 0;
        for (unsigned k = 0; k < sp.n; k++) {
            if (sp.start[k] <= i && i < sp.end[k] && sp.end[k] > cut_end)
                cut_end = sp.end[k];
        }
        if (cut_end > i) {
            /* Extend through overlapping spans so one "***" covers them. */
            for (bool grew = true; grew;) {
                grew = false;
                for (unsigned k = 0; k < sp.n; k++) {
                    if (sp.start[k] <= cut_end && sp.end[k] > cut_end) {
                        cut_end = sp.end[k];
                        grew = true;
                    }
                }
            }
            sb_put(&b, "***", 3);
            i = cut_end;
        } else {
            sb_put(&b, url + i, 1);
            i++;
        }
    }
}

/* Checks that need more than one variable, or more than a range. */
static int validate(struct config *c, char *err, size_t err_len)
{
    char why[256];
    char redacted[512];

    if (!valid_namespace(c->namespace_)) {
        fail(err, err_len,
             "SETTLE_NAMESPACE: \"%.80s\" must be 1 to 64 characters from [A-Za-z0-9_.-]",
             c->namespace_);
        return SETTLE_EINVAL;
    }
    if (!valid_worker_id(c->worker_id)) {
        fail(err, err_len,
             "SETTLE_WORKER_ID: must be 1 to %d bytes without spaces or control characters",
             WORKER_ID_MAX);
        return SETTLE_EINVAL;
    }
    if (!valid_listen_addr(c->metrics_addr)) {
        fail(err, err_len,
             "SETTLE_METRICS_ADDR: \"%.80s\" must be host:port (port 1..65535), or empty to "
             "disable the metrics server",
             c->metrics_addr);
        return SETTLE_EINVAL;
    }
    {
        struct config_redis_addr addr;
        if (parse_redis_url(c->redis_url, &addr, why, sizeof(why)) != 0) {
            config_redact_url(c->redis_url, redacted, sizeof(redacted));
            fail(err, err_len,
                 "SETTLE_REDIS_URL: %s in \"%.120s\"; expected "
                 "redis://[[user]:password@]host[:port][/db]",
                 why, redacted);
            return SETTLE_EINVAL;
        }
    }
    if (c->database_url[0] == '\0' || (strncmp(c->database_url, "postgresql://", 13) != 0 &&
                                       strncmp(c->database_url, "postgres://", 11) != 0 &&
                                       strchr(c->database_url, '=') == NULL)) {
        fail(err, err_len,
             "SETTLE_DATABASE_URL: expected a postgresql:// URI or a key=value conninfo string");
        return SETTLE_EINVAL;
    }
    {
        char *g = c->gateway_url;
        size_t n = strlen(g);
        size_t scheme = strncmp(g, "http://", 7) == 0 ? 7 : strncmp(g, "https://", 8) == 0 ? 8 : 0;
        /* Paths are built as gateway_url + "/api/v1/...", so one trailing slash is dropped
         * instead of producing "//api". */
        if (scheme != 0 && n > scheme && g[n - 1] == '/')
            g[--n] = '\0';
        config_redact_url(g, redacted, sizeof(redacted));
        if (scheme == 0) {
            fail(err, err_len, "SETTLE_GATEWAY_URL: \"%.120s\" must start with http:// or https://",
                 redacted);
            return SETTLE_EINVAL;
        }
        if (n == scheme || g[scheme] == '/' || g[n - 1] == '/' || strpbrk(g, " \t\r\n") != NULL) {
            fail(err, err_len,
                 "SETTLE_GATEWAY_URL: \"%.120s\" must be http(s)://host[:port] with a host, no "
                 "spaces and no trailing slash",
                 redacted);
            return SETTLE_EINVAL;
        }
    }
    if (c->retry_cap_ms < c->retry_base_ms) {
        fail(err, err_len, "SETTLE_RETRY_CAP_MS (%llu) must be >= SETTLE_RETRY_BASE_MS (%llu)",
             (unsigned long long)c->retry_cap_ms, (unsigned long long)c->retry_base_ms);
        return SETTLE_EINVAL;
    }
    /* retry_delay_ms() caps every delay at retry_after_max_ms, so a smaller value would
     * silently shorten the configured backoff. */
    if (c->retry_after_max_ms < c->retry_cap_ms) {
        fail(err, err_len,
             "SETTLE_RETRY_AFTER_MAX_MS (%llu) must be >= SETTLE_RETRY_CAP_MS (%llu), or it would "
             "cut the backoff short",
             (unsigned long long)c->retry_after_max_ms, (unsigned long long)c->retry_cap_ms);
        return SETTLE_EINVAL;
    }
    if (c->breaker.open_max_ms < c->breaker.open_ms) {
        fail(err, err_len,
             "SETTLE_BREAKER_OPEN_MAX_MS (%llu) must be >= SETTLE_BREAKER_OPEN_MS (%llu)",
             (unsigned long long)c->breaker.open_max_ms, (unsigned long long)c->breaker.open_ms);
        return SETTLE_EINVAL;
    }
    if (breaker_config_check(&c->breaker) != 0) {
        fail(err, err_len, "SETTLE_BREAKER_*: the circuit breaker settings are inconsistent");
        return SETTLE_EINVAL;
    }
    /* Both operands are bounded by the table (a day and an hour), so the sum cannot wrap. */
    if (c->payment_window_ms < c->gateway_slowest_ms + c->lease_ms) {
        fail(err, err_len,
             "SETTLE_PAYMENT_WINDOW_MS (%llu) must exceed the PG's slowest answer "
             "SETTLE_GATEWAY_SLOWEST_MS (%llu) plus the lease SETTLE_LEASE_MS (%llu), or a "
             "payment still being processed could be expired",
             (unsigned long long)c->payment_window_ms, (unsigned long long)c->gateway_slowest_ms,
             (unsigned long long)c->lease_ms);
        return SETTLE_EINVAL;
    }
    if (c->gateway_timeout_ms < c->gateway_connect_timeout_ms) {
        fail(err, err_len,
             "SETTLE_GATEWAY_TIMEOUT_MS (%llu) must be >= SETTLE_GATEWAY_CONNECT_TIMEOUT_MS "
             "(%llu): the total time includes the connect",
             (unsigned long long)c->gateway_timeout_ms,
             (unsigned long long)c->gateway_connect_timeout_ms);
        return SETTLE_EINVAL;
    }
    if (c->orphan_grace_ms >= c->orphan_window_ms) {
        fail(err, err_len,
             "SETTLE_ORPHAN_GRACE_MS (%llu) must be below SETTLE_ORPHAN_WINDOW_MS (%llu), or the "
             "orphan sweep would never look at a payment",
             (unsigned long long)c->orphan_grace_ms, (unsigned long long)c->orphan_window_ms);
        return SETTLE_EINVAL;
    }
    /* A list item is about 350 bytes of JSON; a page that cannot fit the answer cap would
     * fail on every run. */
    if ((uint64_t)c->orphan_page_size * 512 > c->gateway_body_max_bytes) {
        fail(err, err_len,
             "SETTLE_ORPHAN_PAGE_SIZE (%u) pages need about %u bytes, over "
             "SETTLE_GATEWAY_BODY_MAX_BYTES (%llu): lower the page size or raise the cap",
             c->orphan_page_size, c->orphan_page_size * 512,
             (unsigned long long)c->gateway_body_max_bytes);
        return SETTLE_EINVAL;
    }
    /* A task refreshes its heartbeat between steps, and one step may take a whole gateway
     * call or SQL statement; a shorter stale timeout would declare live runs dead. Only
     * scheduled runs are ever taken over, so this binds only with the scheduler on. */
    if (c->scheduler) {
        uint64_t step = c->gateway_timeout_ms > c->db_statement_timeout_ms
                            ? c->gateway_timeout_ms
                            : c->db_statement_timeout_ms;
        if (c->task_stale_ms < 2 * step) {
            fail(err, err_len,
                 "SETTLE_TASK_STALE_MS (%llu) must be at least twice the longest single step "
                 "(SETTLE_GATEWAY_TIMEOUT_MS / SETTLE_DB_STATEMENT_TIMEOUT_MS, %llu), or a live "
                 "task would be taken over",
                 (unsigned long long)c->task_stale_ms, (unsigned long long)step);
            return SETTLE_EINVAL;
        }
    }
    if (c->concurrency < 1 || c->concurrency > 1024) {
        fail(err, err_len, "SETTLE_CONCURRENCY (%u) must be 1..1024", c->concurrency);
        return SETTLE_EINVAL;
    }
    return 0;
}

int config_load(struct config *c, int *argc, char **argv, char *err, size_t err_len)
{
    struct raw raws[N_VARS];
    bool *remove = NULL;
    char why[256];
    char origin[128];
    int rc;

    memset(c, 0, sizeof(*c));
    if (err != NULL && err_len > 0)
        err[0] = '\0';
    for (size_t i = 0; i < N_VARS; i++) {
        raws[i].src = SRC_DEFAULT;
        raws[i].text = vars[i].def;
    }
    remove = calloc((size_t)(*argc > 0 ? *argc : 1), sizeof(*remove));
    if (remove == NULL) {
        fail(err, err_len, "out of memory");
        return SETTLE_ENOMEM;
    }
    rc = collect_env(raws, err, err_len);
    if (rc != 0)
        goto out;
    rc = collect_flags(raws, *argc, argv, remove, err, err_len);
    if (rc != 0)
        goto out;

    for (size_t i = 0; i < N_VARS; i++) {
        const struct var *v = &vars[i];
        char *owned = NULL;
        const char *text = raws[i].text;

        if (text == NULL)
            continue; /* computed below */
        origin_text(v, raws[i].src, origin, sizeof(origin));
        if (raws[i].src == SRC_ENV_FILE || raws[i].src == SRC_FLAG_FILE) {
            rc = read_secret_file(text, &owned, why, sizeof(why));
            if (rc != 0) {
                fail(err, err_len, "%s: %s", origin, why);
                goto out;
            }
            text = owned;
        }
        rc = apply_value(c, v, text, why, sizeof(why));
        free(owned);
        if (rc != 0) {
            fail(err, err_len, "%s: %s", origin, why);
            goto out;
        }
    }
    if (c->worker_id == NULL) {
        rc = default_worker_id(c);
        if (rc != 0) {
            fail(err, err_len, "SETTLE_WORKER_ID: out of memory");
            goto out;
        }
    }
    resolve_auto(c);
    rc = validate(c, err, err_len);
    if (rc != 0)
        goto out;

    /* Only a successful load consumes the flags, so a caller that prints usage after an
     * error still sees the command line as typed. */
    if (*argc > 1) {
        int w = 1;
        for (int a = 1; a < *argc; a++) {
            if (!remove[a])
                argv[w++] = argv[a];
        }
        if (w < *argc)
            argv[w] = NULL;
        *argc = w;
    }
out:
    free(remove);
    if (rc != 0)
        config_free(c);
    return rc;
}

static json_t *describe_value(const struct config *c, const struct var *v)
{
    const void *f = field_cptr(c, v);

    switch (v->type) {
    case VAR_STRING: {
        const char *s = *(char *const *)f;
        if (s == NULL)
            return json_null();
        if (!(v->flags & VAR_URL))
            return json_string(s);
        /* Redaction never grows a value by more than two bytes per secret. */
        size_t len = strlen(s) * 2 + 64;
        char *red = malloc(len);
        if (red == NULL)
            return NULL;
        config_redact_url(s, red, len);
        json_t *j = json_string(red);
        free(red);
        return j;
    }
    case VAR_UINT:
    case VAR_PCT:
        return json_integer((json_int_t) * (const unsigned *)f);
    case VAR_U64:
        /* Every U64 variable is bounded far below 2^63 by the table. */
        return json_integer((json_int_t) * (const uint64_t *)f);
    case VAR_QUEUES: {
        json_t *a = json_array();
        for (unsigned i = 0; a != NULL && i < c->n_queues; i++) {
            if (json_array_append_new(a, json_string(c->queues[i])) != 0) {
                json_decref(a);
                a = NULL;
            }
        }
        return a;
    }
    case VAR_SCHEDULE: {
        const struct retry_schedule *s = f;
        json_t *a = json_array();
        for (unsigned i = 0; a != NULL && i < s->n; i++) {
            if (json_array_append_new(a, json_integer((json_int_t)s->delays_ms[i])) != 0) {
                json_decref(a);
                a = NULL;
            }
        }
        return a;
    }
    case VAR_LOG_LEVEL:
        return json_string(log_level_name(*(const enum log_level *)f));
    case VAR_BOOL:
        return json_string(*(const bool *)f ? "on" : "off");
    case VAR_TIME: {
        /* The same text the variable takes, so `settle config` output can be fed back. */
        unsigned m = *(const unsigned *)f;
        char hhmm[8];
        snprintf(hhmm, sizeof(hhmm), "%02u:%02u", (m / 60) % 24, m % 60);
        return json_string(hhmm);
    }
    default:
        abort();
    }
}

int config_describe(const struct config *c, char *buf, size_t buf_len)
{
    json_t *root = json_object();
    int rc = SETTLE_ENOMEM;

    if (root == NULL)
        return SETTLE_ENOMEM;
    for (size_t i = 0; i < N_VARS; i++) {
        json_t *v = describe_value(c, &vars[i]);
        if (v == NULL || json_object_set_new(root, vars[i].name, v) != 0)
            goto out;
    }
    size_t need = json_dumpb(root, NULL, 0, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (need == 0)
        goto out;
    if (need >= buf_len || need > INT_MAX) {
        rc = SETTLE_ETOOBIG;
        goto out;
    }
    json_dumpb(root, buf, buf_len, JSON_COMPACT | JSON_PRESERVE_ORDER);
    buf[need] = '\0';
    rc = (int)need;
out:
    json_decref(root);
    return rc;
}

void config_print_help(void)
{
    printf("%-34s %-34s %-36s %s\n", "VARIABLE", "FLAG", "DEFAULT", "MEANING");
    for (size_t i = 0; i < N_VARS; i++) {
        const struct var *v = &vars[i];
        char flag[FLAG_MAX + 2];
        char def[64];

        flag_name(v, flag + 2, sizeof(flag) - 2);
        flag[0] = '-';
        flag[1] = '-';
        if (v->def == NULL)
            snprintf(def, sizeof(def), "<hostname>:<pid>");
        else if (v->def[0] == '\0')
            snprintf(def, sizeof(def), "(empty)");
        else
            snprintf(def, sizeof(def), "%s", v->def);
        printf("%-34s %-34s %-36s %s", v->name, flag, def, v->help);
        if (v->type == VAR_UINT || v->type == VAR_U64 || v->type == VAR_PCT)
            printf(" [%llu..%llu]", (unsigned long long)v->min, (unsigned long long)v->max);
        if (v->flags & VAR_SECRET)
            printf(" (secret: or %s_FILE / --%s-file)", v->name, flag + 2);
        printf("\n");
    }
    printf(
        "\nPrecedence: default < environment < flag. Flags take --name VALUE or --name=VALUE.\n");
}

int config_has_queue(const struct config *c, const char *name)
{
    for (unsigned i = 0; i < c->n_queues; i++) {
        if (strcmp(c->queues[i], name) == 0)
            return 1;
    }
    return 0;
}
