/*
 * config.h - the worker's configuration: environment variables (12-factor), each also a
 * command-line flag, validated at start-up with a message naming the variable.
 *
 * Precedence: built-in default < environment variable < command-line flag. The flag for
 * SETTLE_FOO_BAR is --foo-bar VALUE or --foo-bar=VALUE. Secret variables (the Redis and
 * database URLs) may instead be read from a file named by SETTLE_<NAME>_FILE (trailing
 * newline removed), which is how Docker and Kubernetes secrets are usually mounted.
 * Thread: loop thread at start-up; the struct is read-only afterwards and may then be read
 * from any thread.
 */
#ifndef SETTLE_CONFIG_H
#define SETTLE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "settle/breaker.h"
#include "settle/log.h"
#include "settle/retry.h"

#define CONFIG_QUEUES_MAX 4

struct config {
    /* Connections. Strings are owned by the struct (config_free). */
    char *redis_url;    /* SETTLE_REDIS_URL, redis://[:password@]host:port/db */
    char *database_url; /* SETTLE_DATABASE_URL, libpq URI or key=value conninfo */
    char *gateway_url;  /* SETTLE_GATEWAY_URL, http(s)://host:port, no trailing slash */
    char *namespace_;   /* SETTLE_NAMESPACE, [A-Za-z0-9_.-]{1,64}; keys are "{ns}:..." */
    char *worker_id;    /* SETTLE_WORKER_ID, default "<hostname>:<pid>" */
    char *metrics_addr; /* SETTLE_METRICS_ADDR, "host:port", "" disables the HTTP server */

    /* Which queues this process works, e.g. {"reconcile", "refund"}. SETTLE_QUEUES. */
    char *queues[CONFIG_QUEUES_MAX];
    unsigned n_queues;

    /* Capacity. */
    unsigned concurrency;          /* SETTLE_CONCURRENCY, jobs in flight per process, 1..1024 */
    unsigned status_concurrency;   /* SETTLE_STATUS_CONCURRENCY, PG status queries in flight,
                                    * 1..concurrency (0 in the environment = concurrency) */
    unsigned claim_batch;          /* SETTLE_CLAIM_BATCH, jobs taken per claim, 1..1000 */
    unsigned db_pool_size;         /* SETTLE_DB_POOL_SIZE, PostgreSQL connections, 1..256 */
    unsigned db_batch;             /* SETTLE_DB_BATCH, jobs per load / outcome transaction, 1..64 */
    unsigned db_batch_concurrency; /* SETTLE_DB_BATCH_CONCURRENCY, batches in flight */
    bool db_prepared;              /* SETTLE_DB_PREPARED on|off, default off */
    uint64_t job_max_bytes;        /* SETTLE_JOB_MAX_BYTES, default 65536 */

    /* Gateway (seed 001). */
    uint64_t gateway_connect_timeout_ms; /* default 1000 */
    uint64_t gateway_timeout_ms;         /* default 3000 (total per request) */
    uint64_t gateway_body_max_bytes;     /* default 65536 */
    uint64_t gateway_slowest_ms; /* default 60000: the slowest the PG may answer (seed 003) */

    /* Retries. */
    uint64_t retry_base_ms;      /* default 1000 */
    uint64_t retry_cap_ms;       /* default 30000 */
    unsigned retry_max_attempts; /* default 8 */
    uint64_t retry_after_max_ms; /* default 300000: the most Retry-After is honoured */
    uint64_t retry_deadline_ms;  /* default 3600000: a job older than this stops waiting */

    /* Leases and delivery. */
    uint64_t lease_ms;           /* default 15000 */
    unsigned max_deliveries;     /* default 5: lease expiries before crashed_too_often */
    uint64_t reaper_interval_ms; /* default 1000 */
    unsigned reaper_batch;       /* default 100 */
    uint64_t shutdown_grace_ms;  /* default 20000 */

    /* Reconcile policy. */
    struct retry_schedule check_schedule; /* SETTLE_CHECK_SCHEDULE_MS, default "60000,300000" */
    uint64_t payment_window_ms;           /* default 300000 */
    uint64_t pending_max_age_ms;          /* default 86400000 */
    uint64_t reservation_ttl_ms;          /* default 900000 */

    struct breaker_config breaker; /* SETTLE_BREAKER_* */

    /* PostgreSQL. */
    uint64_t db_statement_timeout_ms; /* default 5000 */

    /* Scheduled work (tasks.h). Every bound of a run has a knob. */
    bool scheduler;                 /* SETTLE_SCHEDULER on|off, default on */
    uint64_t task_stale_ms;         /* default 600000: a running run without heartbeat is dead */
    uint64_t task_retry_ms;         /* default 60000: a failed daily run is tried again after */
    unsigned task_max_attempts;     /* default 5: tries of one daily period */
    uint64_t sweep_interval_ms;     /* default 60000 */
    uint64_t sweep_min_age_ms;      /* default 600000: PENDING orders older than this */
    unsigned sweep_limit;           /* default 1000 orders per run */
    uint64_t expiry_interval_ms;    /* default 600000 */
    unsigned expiry_limit;          /* default 100 orders per run (seed 002) */
    uint64_t orphan_interval_ms;    /* default 600000 */
    uint64_t orphan_window_ms;      /* default 86400000: how far back the PG list is read */
    uint64_t orphan_grace_ms;       /* default 1800000: younger payments are left alone */
    unsigned orphan_page_size;      /* default 100 payments per page */
    unsigned orphan_concurrency;    /* default 4 pages fetched at once */
    unsigned orphan_lookup_batch;   /* default 500 order ids per lookup */
    unsigned orphan_refund_cap;     /* default 50 refund jobs per run */
    unsigned orphan_max_pages;      /* default 10000 pages per run */
    unsigned stock_sync_at_min;     /* SETTLE_STOCK_SYNC_AT "HH:MM" UTC, default 02:00 */
    unsigned stock_sync_batch;      /* default 1000 SKUs per batch */
    unsigned stock_alert_threshold; /* default 10: more mismatched SKUs raise one alert */
    unsigned daily_stats_at_min;    /* SETTLE_DAILY_STATS_AT "HH:MM" UTC, default 00:00 */

    /* Operations. */
    uint64_t dlq_alert_size;  /* SETTLE_DLQ_ALERT_SIZE, default 10000 */
    enum log_level log_level; /* SETTLE_LOG_LEVEL, default info */
    uint64_t run_seconds;     /* SETTLE_RUN_SECONDS, 0 = run until signalled */
};

/* Fills *c with the built-in defaults (strings allocated). 0 or SETTLE_ENOMEM. */
int config_defaults(struct config *c);

/*
 * Loads the configuration: defaults, then the environment, then flags from argv. Recognised
 * flags are removed from argv; *argc is updated and the remaining arguments (subcommand
 * arguments and flags this module does not know) keep their order. On error returns
 * SETTLE_EINVAL and writes a one-line message naming the variable or flag into err.
 */
int config_load(struct config *c, int *argc, char **argv, char *err, size_t err_len);

/* Frees the strings of *c (safe on a zeroed or partly loaded struct). */
void config_free(struct config *c);

/*
 * Writes the effective configuration as one JSON object into buf (secrets redacted: URL
 * passwords become "***"). Returns the length, or SETTLE_ETOOBIG when buf is too small.
 */
int config_describe(const struct config *c, char *buf, size_t buf_len);

/* Copies url into out with any password replaced by "***" (redis://:***@h:p/0,
 * postgresql://u:***@h/db, and password=*** in key=value conninfo). Pure. */
void config_redact_url(const char *url, char *out, size_t out_len);

/* Parsed redis URL. Pure. 0 or SETTLE_EINVAL. */
struct config_redis_addr {
    char host[256];
    int port;
    char password[256]; /* "" when none */
    char username[128]; /* "" when none (ACL user) */
    int db;
};
int config_parse_redis_url(const char *url, struct config_redis_addr *out);

/* Parses a UTC time of day "HH:MM" (00:00..23:59, two digits each) into minutes after
 * midnight. Pure. 0 or SETTLE_EINVAL. */
int config_parse_time_of_day(const char *s, unsigned *minutes);

/* Prints the table of variables, flags and defaults (for `settle help config`). */
void config_print_help(void);

/* 1 when the process works queue `name`. */
int config_has_queue(const struct config *c, const char *name);

#endif
