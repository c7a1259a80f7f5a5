/*
 * test_config.c - unit tests of configuration loading (config.c): every default, environment
 * overrides, flags over environment in both --x y and --x=y forms, unknown flags and "--"
 * left in argv in order, validation errors naming their variable, secrets from files,
 * redaction in config_describe() and config_redact_url(), redis URL parsing, help output.
 * Thread: main only. Each test starts from an environment without SETTLE_* variables.
 */
#include "settle/config.h"
#include "settle/error.h"

#include "unit.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

extern char **environ;

static void clear_env(void)
{
    char *names[256];
    size_t n = 0;

    /* Collect first: unsetenv() changes environ under an iterating loop. */
    for (char **e = environ; *e != NULL && n < 256; e++) {
        if (strncmp(*e, "SETTLE_", 7) == 0)
            names[n++] = strndup(*e, strcspn(*e, "="));
    }
    for (size_t i = 0; i < n; i++) {
        unsetenv(names[i]);
        free(names[i]);
    }
}

#define MAX_ARGS 32

/* config_load with argv = {"settle", args..., NULL}; *argv_out (if given) gets the argv after
 * the call. */
static int load_args(struct config *c, char *err, size_t err_len, const char *const *args,
                     int *argc_out, char **argv_out)
{
    char *argv[MAX_ARGS + 2];
    int argc = 0;

    argv[argc++] = (char *)"settle";
    for (size_t i = 0; args != NULL && args[i] != NULL && argc < MAX_ARGS; i++)
        argv[argc++] = (char *)args[i];
    argv[argc] = NULL;
    int rc = config_load(c, &argc, argv, err, err_len);
    if (argc_out != NULL)
        *argc_out = argc;
    if (argv_out != NULL) {
        for (int i = 0; i <= argc; i++)
            argv_out[i] = argv[i];
    }
    return rc;
}

static int load_env_only(struct config *c, char *err, size_t err_len)
{
    return load_args(c, err, err_len, NULL, NULL, NULL);
}

static void check_defaults(const struct config *c)
{
    struct breaker_config bd;
    char host[256];
    char prefix[300];

    CHECK_STR(c->redis_url, "redis://127.0.0.1:6379/0");
    CHECK_STR(c->database_url, "postgresql://127.0.0.1:5432/settle");
    CHECK_STR(c->gateway_url, "http://127.0.0.1:8082");
    CHECK_STR(c->namespace_, "settle");
    CHECK_STR(c->metrics_addr, "127.0.0.1:9464");
    gethostname(host, sizeof(host));
    host[sizeof(host) - 1] = '\0';
    snprintf(prefix, sizeof(prefix), "%s:%ld", host, (long)getpid());
    CHECK_STR(c->worker_id, prefix);
    CHECK_EQ_INT(c->n_queues, 2);
    CHECK_STR(c->queues[0], "reconcile");
    CHECK_STR(c->queues[1], "refund");
    CHECK_EQ_INT(c->concurrency, 32);
    CHECK_EQ_INT(c->status_concurrency, 32); /* auto: as many as jobs */
    CHECK_EQ_INT(c->claim_batch, 64);
    CHECK_EQ_INT(c->db_pool_size, 16); /* auto: min(32, 16) */
    CHECK_EQ_U64(c->job_max_bytes, 65536);
    CHECK_EQ_U64(c->gateway_connect_timeout_ms, 1000);
    CHECK_EQ_U64(c->gateway_timeout_ms, 3000);
    CHECK_EQ_U64(c->gateway_body_max_bytes, 65536);
    CHECK_EQ_U64(c->gateway_slowest_ms, 60000);
    CHECK_EQ_U64(c->retry_base_ms, 1000);
    CHECK_EQ_U64(c->retry_cap_ms, 30000);
    CHECK_EQ_INT(c->retry_max_attempts, 8);
    CHECK_EQ_U64(c->retry_after_max_ms, 300000);
    CHECK_EQ_U64(c->retry_deadline_ms, 3600000);
    CHECK_EQ_U64(c->lease_ms, 15000);
    CHECK_EQ_INT(c->max_deliveries, 5);
    CHECK_EQ_U64(c->reaper_interval_ms, 1000);
    CHECK_EQ_INT(c->reaper_batch, 100);
    CHECK_EQ_U64(c->shutdown_grace_ms, 20000);
    CHECK_EQ_INT(c->check_schedule.n, 2);
    CHECK_EQ_U64(c->check_schedule.delays_ms[0], 60000);
    CHECK_EQ_U64(c->check_schedule.delays_ms[1], 300000);
    CHECK_EQ_U64(c->payment_window_ms, 300000);
    CHECK_EQ_U64(c->pending_max_age_ms, 86400000);
    CHECK_EQ_U64(c->reservation_ttl_ms, 900000);
    breaker_config_default(&bd);
    CHECK_EQ_INT(c->breaker.failure_pct, bd.failure_pct);
    CHECK_EQ_U64(c->breaker.window_ms, bd.window_ms);
    CHECK_EQ_INT(c->breaker.min_calls, bd.min_calls);
    CHECK_EQ_U64(c->breaker.open_ms, bd.open_ms);
    CHECK_EQ_U64(c->breaker.open_max_ms, bd.open_max_ms);
    CHECK_EQ_INT(c->breaker.half_open_probes, bd.half_open_probes);
    CHECK_EQ_U64(c->db_statement_timeout_ms, 5000);
    CHECK(!c->db_prepared); /* safe behind any PgBouncer */
    CHECK_EQ_U64(c->dlq_alert_size, 10000);
    CHECK_EQ_INT(c->log_level, LOG_LEVEL_INFO);
    CHECK_EQ_U64(c->run_seconds, 0);
    /* Scheduled work. */
    CHECK(c->scheduler);
    CHECK_EQ_U64(c->task_stale_ms, 600000);
    CHECK_EQ_U64(c->task_retry_ms, 60000);
    CHECK_EQ_INT(c->task_max_attempts, 5);
    CHECK_EQ_U64(c->sweep_interval_ms, 60000);
    CHECK_EQ_U64(c->sweep_min_age_ms, 600000);
    CHECK_EQ_INT(c->sweep_limit, 1000);
    CHECK_EQ_U64(c->expiry_interval_ms, 600000);
    CHECK_EQ_INT(c->expiry_limit, 100);
    CHECK_EQ_U64(c->orphan_interval_ms, 600000);
    CHECK_EQ_U64(c->orphan_window_ms, 86400000);
    CHECK_EQ_U64(c->orphan_grace_ms, 1800000);
    CHECK_EQ_INT(c->orphan_page_size, 100);
    CHECK_EQ_INT(c->orphan_concurrency, 4);
    CHECK_EQ_INT(c->orphan_lookup_batch, 500);
    CHECK_EQ_INT(c->orphan_refund_cap, 50);
    CHECK_EQ_INT(c->orphan_max_pages, 10000);
    CHECK_EQ_INT(c->stock_sync_at_min, 120);
    CHECK_EQ_INT(c->stock_sync_batch, 1000);
    CHECK_EQ_INT(c->stock_alert_threshold, 10);
    CHECK_EQ_INT(c->daily_stats_at_min, 0);
}

static void test_defaults(void)
{
    struct config c;
    char err[512];

    clear_env();
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), 0);
    CHECK_STR(err, "");
    check_defaults(&c);
    CHECK(config_has_queue(&c, "reconcile"));
    CHECK(config_has_queue(&c, "refund"));
    CHECK(!config_has_queue(&c, "payments"));
    config_free(&c);
    config_free(&c); /* idempotent */

    CHECK_EQ_INT(config_defaults(&c), 0);
    check_defaults(&c);
    config_free(&c);

    /* An empty argv (argc 0) is left alone. */
    int argc0 = 0;
    char *argv0[] = {NULL};
    CHECK_EQ_INT(config_load(&c, &argc0, argv0, err, sizeof(err)), 0);
    CHECK_EQ_INT(argc0, 0);
    CHECK(argv0[0] == NULL);
    config_free(&c);
}

static void test_env_overrides(void)
{
    struct config c;
    char err[512];

    clear_env();
    setenv("SETTLE_CONCURRENCY", "8", 1);
    setenv("SETTLE_LOG_LEVEL", "DEBUG", 1);
    setenv("SETTLE_QUEUES", "refund", 1);
    setenv("SETTLE_CHECK_SCHEDULE_MS", "1000,2000,3000", 1);
    setenv("SETTLE_BREAKER_FAILURE_PCT", "50", 1);
    setenv("SETTLE_BREAKER_WINDOW_MS", "60000", 1);
    setenv("SETTLE_BREAKER_MIN_CALLS", "10", 1);
    setenv("SETTLE_BREAKER_OPEN_MS", "5000", 1);
    setenv("SETTLE_BREAKER_OPEN_MAX_MS", "120000", 1);
    setenv("SETTLE_BREAKER_HALF_OPEN_PROBES", "3", 1);
    setenv("SETTLE_NAMESPACE", "shop_1.prod-eu", 1);
    setenv("SETTLE_WORKER_ID", "w-7", 1);
    setenv("SETTLE_METRICS_ADDR", "", 1); /* empty disables the metrics server */
    setenv("SETTLE_GATEWAY_URL", "https://pg.example:8443/", 1);
    setenv("SETTLE_RUN_SECONDS", "60", 1);
    setenv("SETTLE_JOB_MAX_BYTES", "1024", 1);
    setenv("SETTLE_DATABASE_URL", "host=db user=app dbname=settle", 1);
    setenv("SETTLE_REDIS_URL", "redis://:pw@10.0.0.5:6380/2", 1);
    int rc = load_env_only(&c, err, sizeof(err));
    CHECK_EQ_INT(rc, 0);
    if (rc != 0)
        printf("    %s\n", err);
    CHECK_EQ_INT(c.concurrency, 8);
    CHECK_EQ_INT(c.db_pool_size, 8); /* auto follows concurrency */
    CHECK_EQ_INT(c.status_concurrency, 8);
    CHECK_EQ_INT(c.log_level, LOG_LEVEL_DEBUG);
    CHECK_EQ_INT(c.n_queues, 1);
    CHECK(config_has_queue(&c, "refund"));
    CHECK(!config_has_queue(&c, "reconcile"));
    CHECK_EQ_INT(c.check_schedule.n, 3);
    CHECK_EQ_U64(c.check_schedule.delays_ms[2], 3000);
    CHECK_EQ_INT(c.breaker.failure_pct, 50);
    CHECK_EQ_U64(c.breaker.window_ms, 60000);
    CHECK_EQ_INT(c.breaker.min_calls, 10);
    CHECK_EQ_U64(c.breaker.open_ms, 5000);
    CHECK_EQ_U64(c.breaker.open_max_ms, 120000);
    CHECK_EQ_INT(c.breaker.half_open_probes, 3);
    CHECK_STR(c.namespace_, "shop_1.prod-eu");
    CHECK_STR(c.worker_id, "w-7");
    CHECK_STR(c.metrics_addr, "");
    CHECK_STR(c.gateway_url, "https://pg.example:8443"); /* one trailing slash stripped */
    CHECK_EQ_U64(c.run_seconds, 60);
    CHECK_EQ_U64(c.job_max_bytes, 1024);
    CHECK_STR(c.database_url, "host=db user=app dbname=settle");
    CHECK_STR(c.redis_url, "redis://:pw@10.0.0.5:6380/2");
    config_free(&c);

    clear_env();
    setenv("SETTLE_DB_POOL_SIZE", "40", 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), 0);
    CHECK_EQ_INT(c.db_pool_size, 40); /* explicit values are kept */
    config_free(&c);
}

/* SETTLE_STATUS_CONCURRENCY: kept below SETTLE_CONCURRENCY, capped at it, 0 = it. */
static void test_status_concurrency(void)
{
    const char *const cases[][3] = {{"256", "100", "100"}, {"8", "100", "8"}, {"64", "0", "64"}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct config c;
        char err[512];
        clear_env();
        setenv("SETTLE_CONCURRENCY", cases[i][0], 1);
        setenv("SETTLE_STATUS_CONCURRENCY", cases[i][1], 1);
        int rc = load_env_only(&c, err, sizeof(err));
        CHECK_EQ_INT(rc, 0);
        if (rc != 0)
            continue;
        CHECK_EQ_INT(c.status_concurrency, (unsigned)atoi(cases[i][2]));
        config_free(&c);
    }
    clear_env();
}

static void test_flags(void)
{
    struct config c;
    char err[512];
    char *argv[MAX_ARGS + 2];
    int argc = 0;

    clear_env();
    setenv("SETTLE_CONCURRENCY", "8", 1);
    setenv("SETTLE_NAMESPACE", "from-env", 1);
    const char *const args[] = {"run",
                                "--verbose",
                                "--concurrency",
                                "4",
                                "x",
                                "--namespace=from-flag",
                                "--log-level=warn",
                                "--breaker-half-open-probes",
                                "7",
                                "--concurrency-extra",
                                "--",
                                "--claim-batch",
                                "9",
                                NULL};
    int rc = load_args(&c, err, sizeof(err), args, &argc, argv);
    CHECK_EQ_INT(rc, 0);
    CHECK_EQ_INT(c.concurrency, 4);       /* flag over environment */
    CHECK_STR(c.namespace_, "from-flag"); /* --x=y form */
    CHECK_EQ_INT(c.log_level, LOG_LEVEL_WARN);
    CHECK_EQ_INT(c.breaker.half_open_probes, 7);
    CHECK_EQ_INT(c.claim_batch, 64); /* after "--": not ours */
    /* Unknown arguments keep their order; recognised flags and their values are gone. */
    CHECK_EQ_INT(argc, 8);
    if (argc == 8) {
        CHECK_STR(argv[0], "settle");
        CHECK_STR(argv[1], "run");
        CHECK_STR(argv[2], "--verbose");
        CHECK_STR(argv[3], "x");
        CHECK_STR(argv[4], "--concurrency-extra");
        CHECK_STR(argv[5], "--");
        CHECK_STR(argv[6], "--claim-batch");
        CHECK_STR(argv[7], "9");
        CHECK(argv[8] == NULL);
    }
    config_free(&c);

    /* A flag overrides an invalid environment value: the environment value is never used. */
    clear_env();
    setenv("SETTLE_CONCURRENCY", "lots", 1);
    const char *const args2[] = {"--concurrency=12", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args2, &argc, argv), 0);
    CHECK_EQ_INT(c.concurrency, 12);
    CHECK_EQ_INT(argc, 1);
    config_free(&c);

    /* Last flag wins when repeated. */
    clear_env();
    const char *const args3[] = {"--claim-batch", "5", "--claim-batch=6", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args3, NULL, NULL), 0);
    CHECK_EQ_INT(c.claim_batch, 6);
    config_free(&c);

    /* Missing value: the error names the flag and the variable; argv is left as typed. */
    clear_env();
    const char *const args4[] = {"run", "--concurrency", NULL};
    rc = load_args(&c, err, sizeof(err), args4, &argc, argv);
    CHECK_EQ_INT(rc, SETTLE_EINVAL);
    CHECK_CONTAINS(err, "--concurrency");
    CHECK_CONTAINS(err, "SETTLE_CONCURRENCY");
    CHECK_EQ_INT(argc, 3);

    /* A bad flag value names the flag it came from. */
    const char *const args5[] = {"--lease-ms", "soon", "run", NULL};
    rc = load_args(&c, err, sizeof(err), args5, &argc, argv);
    CHECK_EQ_INT(rc, SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_LEASE_MS (flag --lease-ms)");
    CHECK_CONTAINS(err, "\"soon\"");
    CHECK_EQ_INT(argc, 4);
    config_free(&c);
}

struct bad_case {
    const char *var;
    const char *value;
    const char *also; /* a second substring the message must contain, or NULL */
};

static void test_validation_errors(void)
{
    static const struct bad_case cases[] = {
        {"SETTLE_CONCURRENCY", "0", "1..1024"},
        {"SETTLE_CONCURRENCY", "1025", "1..1024"},
        {"SETTLE_CONCURRENCY", "12abc", NULL},
        {"SETTLE_CONCURRENCY", "-1", NULL},
        {"SETTLE_CONCURRENCY", "+5", NULL},
        {"SETTLE_CONCURRENCY", " 5", NULL},
        {"SETTLE_CONCURRENCY", "5 ", NULL},
        {"SETTLE_CONCURRENCY", "", NULL},
        {"SETTLE_CONCURRENCY", "0x10", NULL},
        {"SETTLE_CONCURRENCY", "99999999999999999999999", NULL},
        {"SETTLE_CLAIM_BATCH", "1001", NULL},
        {"SETTLE_DB_POOL_SIZE", "257", NULL},
        {"SETTLE_LEASE_MS", "abc", NULL},
        {"SETTLE_LEASE_MS", "1.5", NULL},
        {"SETTLE_JOB_MAX_BYTES", "1e6", NULL},
        {"SETTLE_RUN_SECONDS", "-0", NULL},
        {"SETTLE_NAMESPACE", "bad ns", "[A-Za-z0-9_.-]"},
        {"SETTLE_NAMESPACE", "a{b}", NULL},
        {"SETTLE_NAMESPACE", "", NULL},
        {"SETTLE_NAMESPACE", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
         NULL},
        {"SETTLE_REDIS_URL", "http://h:6379", NULL},
        {"SETTLE_REDIS_URL", "rediss://h:6379", "TLS"},
        {"SETTLE_REDIS_URL", "redis://", NULL},
        {"SETTLE_REDIS_URL", "redis://h:99999", "port"},
        {"SETTLE_REDIS_URL", "redis://h/abc", NULL},
        {"SETTLE_REDIS_URL", "redis://h?db=1", NULL},
        {"SETTLE_REDIS_URL", "redis://user@h", NULL},
        {"SETTLE_DATABASE_URL", "", NULL},
        {"SETTLE_DATABASE_URL", "nonsense", NULL},
        {"SETTLE_GATEWAY_URL", "ftp://pg", "http://"},
        {"SETTLE_GATEWAY_URL", "127.0.0.1:8082", NULL},
        {"SETTLE_GATEWAY_URL", "http://", NULL},
        {"SETTLE_GATEWAY_URL", "http://pg//", "trailing slash"},
        {"SETTLE_GATEWAY_URL", "http://pg :80", NULL},
        {"SETTLE_RETRY_CAP_MS", "500", "SETTLE_RETRY_BASE_MS"},
        {"SETTLE_RETRY_AFTER_MAX_MS", "1000", "SETTLE_RETRY_CAP_MS"},
        {"SETTLE_BREAKER_OPEN_MAX_MS", "5000", "SETTLE_BREAKER_OPEN_MS"},
        {"SETTLE_BREAKER_WINDOW_MS", "121000", NULL},
        {"SETTLE_BREAKER_WINDOW_MS", "999", NULL},
        {"SETTLE_BREAKER_FAILURE_PCT", "0", NULL},
        {"SETTLE_BREAKER_FAILURE_PCT", "101", NULL},
        {"SETTLE_BREAKER_MIN_CALLS", "0", NULL},
        {"SETTLE_BREAKER_HALF_OPEN_PROBES", "0", NULL},
        {"SETTLE_PAYMENT_WINDOW_MS", "70000",
         "SETTLE_PAYMENT_WINDOW_MS (70000) must exceed the PG's slowest answer "
         "SETTLE_GATEWAY_SLOWEST_MS (60000) plus the lease SETTLE_LEASE_MS (15000), or a "
         "payment still being processed could be expired"},
        {"SETTLE_GATEWAY_SLOWEST_MS", "290000", "SETTLE_PAYMENT_WINDOW_MS"},
        {"SETTLE_GATEWAY_TIMEOUT_MS", "500", "SETTLE_GATEWAY_CONNECT_TIMEOUT_MS"},
        {"SETTLE_QUEUES", "reconcile,bogus", "bogus"},
        {"SETTLE_QUEUES", "", NULL},
        {"SETTLE_QUEUES", "reconcile,reconcile", "twice"},
        {"SETTLE_QUEUES", "reconcile,", NULL},
        {"SETTLE_QUEUES", "Reconcile", NULL},
        {"SETTLE_CHECK_SCHEDULE_MS", "0", NULL},
        {"SETTLE_CHECK_SCHEDULE_MS", "60000,", NULL},
        {"SETTLE_CHECK_SCHEDULE_MS", "soon", NULL},
        {"SETTLE_LOG_LEVEL", "loud", "debug, info, warn, error"},
        {"SETTLE_METRICS_ADDR", "nohost", NULL},
        {"SETTLE_METRICS_ADDR", "h:0", NULL},
        {"SETTLE_WORKER_ID", "", NULL},
        {"SETTLE_WORKER_ID", "has space", NULL},
    };
    struct config c;
    char err[512];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        clear_env();
        setenv(cases[i].var, cases[i].value, 1);
        int rc = load_env_only(&c, err, sizeof(err));
        if (rc != SETTLE_EINVAL)
            printf("    %s=\"%s\" was accepted\n", cases[i].var, cases[i].value);
        CHECK_EQ_INT(rc, SETTLE_EINVAL);
        CHECK_CONTAINS(err, cases[i].var);
        if (cases[i].also != NULL)
            CHECK_CONTAINS(err, cases[i].also);
        CHECK(strchr(err, '\n') == NULL);
        /* The struct is left zeroed, so config_free() after an error is safe too. */
        CHECK(c.redis_url == NULL && c.n_queues == 0);
        config_free(&c);
    }

    /* Values at the edges of their ranges are accepted. */
    clear_env();
    setenv("SETTLE_CONCURRENCY", "1024", 1);
    setenv("SETTLE_PAYMENT_WINDOW_MS", "75000", 1); /* exactly slowest + lease */
    setenv("SETTLE_GATEWAY_TIMEOUT_MS", "1000", 1); /* equal to the connect timeout */
    setenv("SETTLE_RETRY_CAP_MS", "1000", 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), 0);
    config_free(&c);

    /* A tiny error buffer is still NUL-terminated. */
    clear_env();
    setenv("SETTLE_CONCURRENCY", "0", 1);
    char small[8];
    memset(small, 'x', sizeof(small));
    CHECK_EQ_INT(load_env_only(&c, small, sizeof(small)), SETTLE_EINVAL);
    CHECK(memchr(small, '\0', sizeof(small)) != NULL);
}

static char *write_temp(const char *contents)
{
    static int seq;
    char path[128];

    snprintf(path, sizeof(path), "/tmp/settle-test-config-%ld-%d", (long)getpid(), seq++);
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return NULL;
    fputs(contents, f);
    fclose(f);
    return strdup(path);
}

static void test_secret_files(void)
{
    struct config c;
    char err[512];
    char *redis = write_temp("redis://:s3cret-pw@r.internal:6380/2\n");
    char *db = write_temp("postgresql://app:pg-pw@db/settle\r\n");
    char *empty = write_temp("\n");

    clear_env();
    setenv("SETTLE_REDIS_URL_FILE", redis, 1);
    setenv("SETTLE_DATABASE_URL_FILE", db, 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), 0);
    CHECK_STR(c.redis_url, "redis://:s3cret-pw@r.internal:6380/2");
    CHECK_STR(c.database_url, "postgresql://app:pg-pw@db/settle");
    config_free(&c);

    /* Both forms at once is ambiguous. */
    setenv("SETTLE_REDIS_URL", "redis://h", 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_REDIS_URL");
    CHECK_CONTAINS(err, "SETTLE_REDIS_URL_FILE");

    /* A flag value beats a file from the environment. */
    const char *const args[] = {"--redis-url", "redis://flag-host", NULL};
    unsetenv("SETTLE_REDIS_URL");
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args, NULL, NULL), 0);
    CHECK_STR(c.redis_url, "redis://flag-host");
    config_free(&c);

    /* --x-file flag; and --x with --x-file together is refused. */
    clear_env();
    char flag_file[300];
    snprintf(flag_file, sizeof(flag_file), "--database-url-file=%s", db);
    const char *const args2[] = {flag_file, NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args2, NULL, NULL), 0);
    CHECK_STR(c.database_url, "postgresql://app:pg-pw@db/settle");
    config_free(&c);
    const char *const args3[] = {flag_file, "--database-url", "host=x", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args3, NULL, NULL), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_DATABASE_URL");

    /* Missing and empty files. */
    clear_env();
    setenv("SETTLE_REDIS_URL_FILE", "/nonexistent/settle-secret", 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_REDIS_URL_FILE");
    CHECK_CONTAINS(err, "/nonexistent/settle-secret");
    setenv("SETTLE_REDIS_URL_FILE", empty, 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "empty");

    /* Errors about a secret value never repeat its password. */
    clear_env();
    setenv("SETTLE_REDIS_URL", "redis://:hunter2@h:99999/0", 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_REDIS_URL");
    CHECK_NOT_CONTAINS(err, "hunter2");

    unlink(redis);
    unlink(db);
    unlink(empty);
    free(redis);
    free(db);
    free(empty);
}

static void test_describe(void)
{
    struct config c;
    char err[512];
    char buf[8192];

    clear_env();
    setenv("SETTLE_REDIS_URL", "redis://admin:hunter2@cache:6379/1", 1);
    setenv("SETTLE_DATABASE_URL", "postgresql://app:pg-secret@db:5432/settle?sslmode=require", 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), 0);
    int n = config_describe(&c, buf, sizeof(buf));
    CHECK(n > 0);
    CHECK_EQ_INT(n, strlen(buf));
    CHECK_NOT_CONTAINS(buf, "hunter2");
    CHECK_NOT_CONTAINS(buf, "pg-secret");
    json_t *j = json_loads(buf, 0, NULL);
    CHECK(j != NULL);
    if (j != NULL) {
        CHECK_STR(json_string_value(json_object_get(j, "SETTLE_REDIS_URL")),
                  "redis://admin:***@cache:6379/1");
        CHECK_STR(json_string_value(json_object_get(j, "SETTLE_DATABASE_URL")),
                  "postgresql://app:***@db:5432/settle?sslmode=require");
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "SETTLE_CONCURRENCY")), 32);
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "SETTLE_DB_POOL_SIZE")), 16);
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "SETTLE_BREAKER_OPEN_MAX_MS")), 60000);
        CHECK_STR(json_string_value(json_object_get(j, "SETTLE_LOG_LEVEL")), "info");
        CHECK_EQ_INT(json_array_size(json_object_get(j, "SETTLE_QUEUES")), 2);
        CHECK_EQ_INT(json_array_size(json_object_get(j, "SETTLE_CHECK_SCHEDULE_MS")), 2);
        CHECK_EQ_INT(
            json_integer_value(json_array_get(json_object_get(j, "SETTLE_CHECK_SCHEDULE_MS"), 1)),
            300000);
        CHECK(json_is_string(json_object_get(j, "SETTLE_WORKER_ID")));
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "SETTLE_DB_BATCH")), 32);
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "SETTLE_DB_BATCH_CONCURRENCY")), 2);
        CHECK_STR(json_string_value(json_object_get(j, "SETTLE_DB_PREPARED")), "off");
        CHECK_EQ_INT(json_object_size(j), 64); /* every variable */
    }
    json_decref(j);
    CHECK_EQ_INT(config_describe(&c, buf, 16), SETTLE_ETOOBIG);
    CHECK_EQ_INT(config_describe(&c, buf, (size_t)n), SETTLE_ETOOBIG); /* no room for NUL */
    CHECK_EQ_INT(config_describe(&c, buf, (size_t)n + 1), n);
    config_free(&c);

    /* key=value conninfo with a quoted password. */
    clear_env();
    setenv("SETTLE_DATABASE_URL", "host=db user=app password='p w\\'x' dbname=settle", 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), 0);
    CHECK(config_describe(&c, buf, sizeof(buf)) > 0);
    CHECK_CONTAINS(buf, "password=***");
    CHECK_NOT_CONTAINS(buf, "p w");
    CHECK_CONTAINS(buf, "dbname=settle");
    config_free(&c);
}

static void redact_case(const char *in, const char *want, int line)
{
    char out[256];

    config_redact_url(in, out, sizeof(out));
    int ok = strcmp(out, want) == 0;
    unit_record(ok, __FILE__, line, "config_redact_url case");
    if (!ok)
        printf("    in:   \"%s\"\n    got:  \"%s\"\n    want: \"%s\"\n", in, out, want);
}

#define REDACT(in, want) redact_case(in, want, __LINE__)

static void test_redact(void)
{
    REDACT("redis://:pw@h:6379/0", "redis://:***@h:6379/0");
    REDACT("redis://user:pw@h", "redis://user:***@h");
    REDACT("redis://h:6379", "redis://h:6379");
    REDACT("redis://user@h", "redis://user@h");
    REDACT("redis://:pa/ss@h", "redis://:***@h");    /* unencoded '/' in the password */
    REDACT("redis://:p@ss@h/0", "redis://:***@h/0"); /* unencoded '@' */
    REDACT("postgresql://u:p%40ss@db/x?sslmode=require&password=zz",
           "postgresql://u:***@db/x?sslmode=require&password=***");
    REDACT("postgresql://db/x?password=zz&sslpassword=yy&application_name=settle",
           "postgresql://db/x?password=***&sslpassword=***&application_name=settle");
    /* libpq has no fragment: this password is "zz#frag", all of it hidden. */
    REDACT("postgresql://db/x?password=zz#frag", "postgresql://db/x?password=***");
    REDACT("postgresql://db/x?user=a#b&password=zz", "postgresql://db/x?user=a#b&password=***");
    REDACT("host=db password=secret dbname=x", "host=db password=*** dbname=x");
    REDACT("host=db password = 'a b\\' c' dbname=x", "host=db password = *** dbname=x");
    REDACT("password=secret", "password=***");
    REDACT("host=db PASSWORD=secret", "host=db PASSWORD=***");
    REDACT("garbage secret", "***");
    REDACT("", "");

    /* Small outputs are cut, terminated, and still never show the password. */
    char out[12];
    config_redact_url("redis://:supersecret@h:6379/0", out, sizeof(out));
    CHECK_EQ_INT(strlen(out), sizeof(out) - 1);
    CHECK_NOT_CONTAINS(out, "super");
    char one[1] = {'x'};
    config_redact_url("redis://:pw@h", one, sizeof(one));
    CHECK_EQ_INT(one[0], '\0');
}

static void test_parse_redis_url(void)
{
    struct config_redis_addr a;

    CHECK_EQ_INT(config_parse_redis_url("redis://127.0.0.1:6379/0", &a), 0);
    CHECK_STR(a.host, "127.0.0.1");
    CHECK_EQ_INT(a.port, 6379);
    CHECK_EQ_INT(a.db, 0);
    CHECK_STR(a.password, "");
    CHECK_STR(a.username, "");

    CHECK_EQ_INT(config_parse_redis_url("redis://cache", &a), 0);
    CHECK_STR(a.host, "cache");
    CHECK_EQ_INT(a.port, 6379);
    CHECK_EQ_INT(a.db, 0);

    CHECK_EQ_INT(config_parse_redis_url("redis://:pw@h:6380/3", &a), 0);
    CHECK_STR(a.password, "pw");
    CHECK_STR(a.username, "");
    CHECK_EQ_INT(a.port, 6380);
    CHECK_EQ_INT(a.db, 3);

    CHECK_EQ_INT(config_parse_redis_url("redis://alice:pw@h", &a), 0);
    CHECK_STR(a.username, "alice");
    CHECK_STR(a.password, "pw");

    CHECK_EQ_INT(config_parse_redis_url("redis://:p%40ss%2F@h/", &a), 0);
    CHECK_STR(a.password, "p@ss/");
    CHECK_EQ_INT(a.db, 0);

    CHECK_EQ_INT(config_parse_redis_url("REDIS://[::1]:7000/1", &a), 0);
    CHECK_STR(a.host, "::1");
    CHECK_EQ_INT(a.port, 7000);
    CHECK_EQ_INT(a.db, 1);

    static const char *const bad[] = {
        "rediss://h",      "http://h",        "redis://",
        "redis://:@h",     "redis://h:0",     "redis://h:65536",
        "redis://h:abc",   "redis://h:",      "redis://h/x",
        "redis://h/1/2",   "redis://h?db=1",  "redis://h#x",
        "redis://user@h",  "redis://:p%zz@h", "redis://:p%00@h",
        "redis://h:6379x", "redis://[::1",    "redis://[]:1",
        "redis://h/-1",    "redis:/h",        "",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = config_parse_redis_url(bad[i], &a);
        if (rc != SETTLE_EINVAL)
            printf("    accepted \"%s\"\n", bad[i]);
        CHECK_EQ_INT(rc, SETTLE_EINVAL);
    }
    CHECK_EQ_INT(config_parse_redis_url(NULL, &a), SETTLE_EINVAL);
}

static int count_nl(const char *s)
{
    int n = 0;
    for (; *s != '\0'; s++)
        n += *s == '\n';
    return n;
}

/* SETTLE_SCHEDULER (on/off), the HH:MM times of day, and the scheduled-work checks. */
static void test_scheduled_work(void)
{
    struct config c;
    char err[512];
    unsigned m = 999;

    CHECK_EQ_INT(config_parse_time_of_day("00:00", &m), 0);
    CHECK_EQ_INT(m, 0);
    CHECK_EQ_INT(config_parse_time_of_day("02:00", &m), 0);
    CHECK_EQ_INT(m, 120);
    CHECK_EQ_INT(config_parse_time_of_day("23:59", &m), 0);
    CHECK_EQ_INT(m, 23 * 60 + 59);
    const char *bad[] = {"24:00", "2:00",  "02:0",   "02:60", "0200",  "02-00",
                         "",      " 2:00", "02:00 ", "-1:00", "ab:cd", NULL};
    for (int i = 0; bad[i] != NULL; i++)
        CHECK_EQ_INT(config_parse_time_of_day(bad[i], &m), SETTLE_EINVAL);
    CHECK_EQ_INT(config_parse_time_of_day(NULL, &m), SETTLE_EINVAL);

    clear_env();
    setenv("SETTLE_SCHEDULER", "off", 1);
    setenv("SETTLE_STOCK_SYNC_AT", "03:30", 1);
    setenv("SETTLE_DB_PREPARED", "on", 1);
    CHECK_EQ_INT(load_env_only(&c, err, sizeof(err)), 0);
    CHECK(!c.scheduler);
    CHECK(c.db_prepared);
    CHECK_EQ_INT(c.stock_sync_at_min, 210);
    char desc[8192];
    CHECK(config_describe(&c, desc, sizeof(desc)) > 0);
    CHECK_CONTAINS(desc, "\"SETTLE_SCHEDULER\":\"off\"");
    CHECK_CONTAINS(desc, "\"SETTLE_STOCK_SYNC_AT\":\"03:30\"");
    CHECK_CONTAINS(desc, "\"SETTLE_DAILY_STATS_AT\":\"00:00\"");
    config_free(&c);

    const char *args_on[] = {"--scheduler", "yes", "--daily-stats-at=01:15", NULL};
    clear_env();
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_on, NULL, NULL), 0);
    CHECK(c.scheduler);
    CHECK_EQ_INT(c.daily_stats_at_min, 75);
    config_free(&c);

    const char *args_bad_bool[] = {"--scheduler=maybe", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_bad_bool, NULL, NULL), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_SCHEDULER");
    const char *args_bad_time[] = {"--stock-sync-at", "25:00", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_bad_time, NULL, NULL), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_STOCK_SYNC_AT");
    CHECK_CONTAINS(err, "HH:MM");

    /* The grace must leave something to look at. */
    const char *args_grace[] = {"--orphan-grace-ms=86400000", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_grace, NULL, NULL), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_ORPHAN_GRACE_MS");
    /* A page must fit the answer cap. */
    const char *args_page[] = {"--orphan-page-size=1000", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_page, NULL, NULL), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_ORPHAN_PAGE_SIZE");
    const char *args_page_ok[] = {"--orphan-page-size=1000", "--gateway-body-max-bytes=1048576",
                                  NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_page_ok, NULL, NULL), 0);
    config_free(&c);
    /* A stale timeout shorter than two steps would take live runs over. */
    const char *args_stale[] = {"--task-stale-ms=5000", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_stale, NULL, NULL), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_TASK_STALE_MS");
    const char *args_stale_ok[] = {"--task-stale-ms=5000", "--db-statement-timeout-ms=2000",
                                   "--gateway-timeout-ms=2000", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_stale_ok, NULL, NULL), 0);
    config_free(&c);
    const char *args_stale_off[] = {"--task-stale-ms=5000", "--scheduler=off", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_stale_off, NULL, NULL), 0);
    config_free(&c);
    const char *args_range[] = {"--orphan-concurrency=0", NULL};
    CHECK_EQ_INT(load_args(&c, err, sizeof(err), args_range, NULL, NULL), SETTLE_EINVAL);
    CHECK_CONTAINS(err, "SETTLE_ORPHAN_CONCURRENCY");
    clear_env();
}

static void test_help(void)
{
    char path[] = "/tmp/settle-test-help-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    fflush(stdout);
    int saved = dup(1);
    dup2(fd, 1);
    config_print_help();
    fflush(stdout);
    dup2(saved, 1);
    close(saved);

    char buf[16384];
    lseek(fd, 0, SEEK_SET);
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    unlink(path);
    buf[n > 0 ? n : 0] = '\0';
    CHECK_CONTAINS(buf, "SETTLE_REDIS_URL");
    CHECK_CONTAINS(buf, "--redis-url");
    CHECK_CONTAINS(buf, "SETTLE_REDIS_URL_FILE");
    CHECK_CONTAINS(buf, "SETTLE_BREAKER_HALF_OPEN_PROBES");
    CHECK_CONTAINS(buf, "--breaker-half-open-probes");
    CHECK_CONTAINS(buf, "SETTLE_PAYMENT_WINDOW_MS");
    CHECK_CONTAINS(buf, "reconcile,refund");
    CHECK_CONTAINS(buf, "<hostname>:<pid>");
    CHECK_CONTAINS(buf, "60000,300000");
    CHECK(count_nl(buf) >= 40); /* a header and one row per variable */
}

int main(void)
{
    RUN(test_defaults);
    RUN(test_env_overrides);
    RUN(test_status_concurrency);
    RUN(test_flags);
    RUN(test_validation_errors);
    RUN(test_secret_files);
    RUN(test_describe);
    RUN(test_redact);
    RUN(test_parse_redis_url);
    RUN(test_scheduled_work);
    RUN(test_help);
    clear_env();
    return unit_finish();
}
