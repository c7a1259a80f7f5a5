/*
 * fuzz_config.c - libFuzzer target for the configuration parser (src/config.c): flags,
 * environment variables, secret files, Redis URL parsing and URL redaction.
 *
 * The input is read as lines:
 *   "env NAME=VALUE"   sets SETTLE_* variable NAME (only names settle knows; NAME_FILE
 *                      variables get a path to a private temporary file holding VALUE);
 *   "url VALUE"        one more URL for the parse/redact checks below;
 *   anything else      one argv element of `settle` (a --*-file flag is rewritten to point at
 *                      a private temporary file holding its value, so no input can make the
 *                      target open an arbitrary path such as a FIFO).
 * Every iteration starts and ends with no SETTLE_* variable set (the environment is process
 * global) and frees what config_load allocated.
 *
 * Invariants, besides the sanitizers' checks:
 *   - config_load either fails with a non-empty message or yields a configuration that passes
 *     its own validation (queues, ranges, payment window, a redis URL that parses), whose
 *     argv keeps only unconsumed arguments in order, and whose config_describe() is JSON with
 *     the URLs shown exactly as config_redact_url() shows them;
 *   - config_redact_url never overflows (even with tiny buffers) and never shows a password:
 *     the password as the consumers read it - config_parse_redis_url for Redis, libpq's
 *     PQconninfoParse for PostgreSQL (URI userinfo, ?password= and key=value forms) - occurs
 *     fewer times in the redacted text than in the input;
 *   - config_parse_redis_url returns a NUL-terminated host, a port in 1..65535 and db >= 0.
 * Thread: libFuzzer's (single-threaded: the environment is shared).
 */
#include "settle/config.h"
#include "settle/error.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_config: invariant violated at %s:%d: %s\n", __FILE__, __LINE__,  \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define MAX_LINES 48
#define MAX_FILES 8

/* Every variable settle reads (src/config.c's table), plus the two secret-file names. */
static const char *const known_vars[] = {
    "SETTLE_REDIS_URL",
    "SETTLE_DATABASE_URL",
    "SETTLE_GATEWAY_URL",
    "SETTLE_NAMESPACE",
    "SETTLE_WORKER_ID",
    "SETTLE_METRICS_ADDR",
    "SETTLE_QUEUES",
    "SETTLE_CONCURRENCY",
    "SETTLE_CLAIM_BATCH",
    "SETTLE_DB_POOL_SIZE",
    "SETTLE_JOB_MAX_BYTES",
    "SETTLE_GATEWAY_CONNECT_TIMEOUT_MS",
    "SETTLE_GATEWAY_TIMEOUT_MS",
    "SETTLE_GATEWAY_BODY_MAX_BYTES",
    "SETTLE_GATEWAY_SLOWEST_MS",
    "SETTLE_RETRY_BASE_MS",
    "SETTLE_RETRY_CAP_MS",
    "SETTLE_RETRY_MAX_ATTEMPTS",
    "SETTLE_RETRY_AFTER_MAX_MS",
    "SETTLE_RETRY_DEADLINE_MS",
    "SETTLE_LEASE_MS",
    "SETTLE_MAX_DELIVERIES",
    "SETTLE_REAPER_INTERVAL_MS",
    "SETTLE_REAPER_BATCH",
    "SETTLE_SHUTDOWN_GRACE_MS",
    "SETTLE_CHECK_SCHEDULE_MS",
    "SETTLE_PAYMENT_WINDOW_MS",
    "SETTLE_PENDING_MAX_AGE_MS",
    "SETTLE_RESERVATION_TTL_MS",
    "SETTLE_BREAKER_FAILURE_PCT",
    "SETTLE_BREAKER_WINDOW_MS",
    "SETTLE_BREAKER_MIN_CALLS",
    "SETTLE_BREAKER_OPEN_MS",
    "SETTLE_BREAKER_OPEN_MAX_MS",
    "SETTLE_BREAKER_HALF_OPEN_PROBES",
    "SETTLE_DB_STATEMENT_TIMEOUT_MS",
    "SETTLE_DLQ_ALERT_SIZE",
    "SETTLE_LOG_LEVEL",
    "SETTLE_RUN_SECONDS",
    "SETTLE_REDIS_URL_FILE",
    "SETTLE_DATABASE_URL_FILE",
};
#define N_KNOWN (sizeof known_vars / sizeof known_vars[0])

static char tmp_dir[64];
static unsigned n_files;

static void clear_env(void)
{
    for (size_t i = 0; i < N_KNOWN; i++)
        unsetenv(known_vars[i]);
}

/* A private file holding text; returns its path (static storage, one per slot). */
static const char *secret_file(const char *text, size_t len)
{
    static char paths[MAX_FILES][96];
    if (tmp_dir[0] == '\0') {
        const char *base = getenv("TMPDIR");
        snprintf(tmp_dir, sizeof tmp_dir, "%s/fuzz_config.XXXXXX",
                 base != NULL && strlen(base) < 32 ? base : "/tmp");
        CHECK(mkdtemp(tmp_dir) != NULL);
    }
    unsigned slot = n_files++ % MAX_FILES;
    snprintf(paths[slot], sizeof paths[slot], "%s/secret%u", tmp_dir, slot);
    FILE *f = fopen(paths[slot], "wb");
    CHECK(f != NULL);
    if (len > 0)
        CHECK(fwrite(text, 1, len, f) == len);
    CHECK(fclose(f) == 0);
    return paths[slot];
}

static size_t count(const char *hay, const char *needle)
{
    size_t n = 0, len = strlen(needle);
    if (len == 0)
        return 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
        n++;
    return n;
}

/* The password must occur fewer times in the redacted text than in the original: at least
 * the occurrence that is the password itself must be gone. A password holding '*' could be
 * formed by the "***" placeholder itself, so it is not checked. */
static void check_hidden(const char *url, const char *redacted, const char *pw, const char *who)
{
    if (pw == NULL || pw[0] == '\0' || strchr(pw, '*') != NULL)
        return;
    size_t in = count(url, pw);
    if (in == 0)
        return; /* encoded in the input; its encoded form is checked separately */
    if (count(redacted, pw) >= in) {
        fprintf(stderr,
                "fuzz_config: %s password \"%s\" survives redaction:\n  in:  %s\n  out: %s\n", who,
                pw, url, redacted);
        abort();
    }
}

static void check_url(const char *url)
{
    size_t len = strlen(url);
    size_t cap = len * 2 + 64;
    char *out = malloc(cap);
    CHECK(out != NULL);

    memset(out, 'X', cap);
    config_redact_url(url, out, cap);
    CHECK(strnlen(out, cap) < cap);

    /* Redis: the password as settle's own parser reads it (percent-decoded), and its raw
     * text in the URL (everything between the first ':' of the credentials and the last '@'). */
    struct config_redis_addr a;
    memset(&a, 0x5A, sizeof a);
    if (config_parse_redis_url(url, &a) == 0) {
        CHECK(strnlen(a.host, sizeof a.host) < sizeof a.host && a.host[0] != '\0');
        CHECK(strnlen(a.password, sizeof a.password) < sizeof a.password);
        CHECK(strnlen(a.username, sizeof a.username) < sizeof a.username);
        CHECK(a.port >= 1 && a.port <= 65535);
        CHECK(a.db >= 0);
        check_hidden(url, out, a.password, "redis");
        const char *at = strrchr(url + 8, '@');
        if (at != NULL) {
            const char *colon = memchr(url + 8, ':', (size_t)(at - (url + 8)));
            CHECK(colon != NULL);
            char *raw = strndup(colon + 1, (size_t)(at - colon - 1));
            CHECK(raw != NULL);
            check_hidden(url, out, raw, "redis (raw)");
            free(raw);
        }
    }

    /* PostgreSQL: whatever libpq would send as the password. */
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &perr);
    if (opts != NULL) {
        for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
            if (o->val != NULL &&
                (strcmp(o->keyword, "password") == 0 || strcmp(o->keyword, "sslpassword") == 0))
                check_hidden(url, out, o->val, o->keyword);
        }
        PQconninfoFree(opts);
    }
    PQfreemem(perr);

    /* Tiny buffers: truncated, NUL-terminated, never written past. */
    for (size_t small = 0; small < 6; small++) {
        char buf[6];
        memset(buf, 'X', sizeof buf);
        config_redact_url(url, buf, small);
        if (small > 0)
            CHECK(strnlen(buf, small) < small);
        for (size_t i = small; i < sizeof buf; i++)
            CHECK(buf[i] == 'X');
    }
    free(out);
}

static bool json_ok(const char *s)
{
    json_t *j = json_string(s);
    bool ok = j != NULL;
    json_decref(j);
    return ok;
}

static void check_loaded(const struct config *c, int argc_before, char **argv_before, int argc,
                         char **argv)
{
    CHECK(c->redis_url != NULL && c->database_url != NULL && c->gateway_url != NULL);
    CHECK(c->namespace_ != NULL && c->worker_id != NULL && c->metrics_addr != NULL);
    CHECK(c->n_queues >= 1 && c->n_queues <= CONFIG_QUEUES_MAX);
    CHECK(c->concurrency >= 1 && c->concurrency <= 1024);
    CHECK(c->db_pool_size >= 1);
    CHECK(c->retry_cap_ms >= c->retry_base_ms);
    CHECK(c->retry_after_max_ms >= c->retry_cap_ms);
    CHECK(c->payment_window_ms >= c->gateway_slowest_ms + c->lease_ms);
    CHECK(c->gateway_timeout_ms >= c->gateway_connect_timeout_ms);
    struct config_redis_addr a;
    CHECK(config_parse_redis_url(c->redis_url, &a) == 0);

    /* argv keeps the unconsumed arguments, in their order. */
    CHECK(argc >= 1 && argc <= argc_before);
    CHECK(argv[0] == argv_before[0]);
    int j = 1;
    for (int i = 1; i < argc; i++) {
        while (j < argc_before && argv_before[j] != argv[i])
            j++;
        CHECK(j < argc_before);
        j++;
    }
    if (argc < argc_before)
        CHECK(argv[argc] == NULL);

    check_url(c->redis_url);
    check_url(c->database_url);
    check_url(c->gateway_url);

    /* The description is JSON with the URLs redacted exactly as config_redact_url does it,
     * unless a value cannot be a JSON string at all (invalid UTF-8). */
    static char desc[1 << 20];
    int n = config_describe(c, desc, sizeof desc);
    bool printable = json_ok(c->redis_url) && json_ok(c->database_url) && json_ok(c->gateway_url) &&
                     json_ok(c->worker_id) && json_ok(c->metrics_addr) && json_ok(c->namespace_);
    if (!printable)
        return;
    CHECK(n > 0);
    json_t *root = json_loads(desc, 0, NULL);
    CHECK(root != NULL);
    const char *urls[][2] = {{"SETTLE_REDIS_URL", c->redis_url},
                             {"SETTLE_DATABASE_URL", c->database_url}};
    for (size_t i = 0; i < 2; i++) {
        size_t cap = strlen(urls[i][1]) * 2 + 64;
        char *red = malloc(cap);
        CHECK(red != NULL);
        config_redact_url(urls[i][1], red, cap);
        const char *shown = json_string_value(json_object_get(root, urls[i][0]));
        CHECK(shown != NULL && strcmp(shown, red) == 0);
        free(red);
    }
    json_decref(root);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    char *lines[MAX_LINES];
    size_t n_lines = 0;
    char *argv_store[MAX_LINES + 2];
    char *argv[MAX_LINES + 2];
    int argc = 0;

    CHECK(text != NULL);
    memcpy(text, data, size);
    text[size] = '\0';

    /* The whole input (to its first NUL) is a URL too: the most direct path for mutations. */
    check_url(text);

    for (char *p = text; p != NULL && *p != '\0' && n_lines < MAX_LINES;) {
        char *nl = strchr(p, '\n');
        if (nl != NULL)
            *nl = '\0';
        lines[n_lines++] = p;
        p = nl != NULL ? nl + 1 : NULL;
    }

    clear_env();
    argv_store[argc++] = strdup("settle");
    for (size_t i = 0; i < n_lines; i++) {
        char *l = lines[i];
        if (strncmp(l, "env ", 4) == 0) {
            char *eq = strchr(l + 4, '=');
            if (eq == NULL)
                continue;
            *eq = '\0';
            const char *name = l + 4, *value = eq + 1;
            for (size_t k = 0; k < N_KNOWN; k++) {
                if (strcmp(name, known_vars[k]) != 0)
                    continue;
                if (strstr(name, "_FILE") != NULL)
                    value = secret_file(value, strlen(value));
                setenv(name, value, 1);
                break;
            }
            *eq = '=';
        } else if (strncmp(l, "url ", 4) == 0) {
            check_url(l + 4);
        } else {
            const char *dash_file = strstr(l, "-file");
            if (strncmp(l, "--", 2) == 0 && dash_file != NULL) {
                const char *eq = strchr(l, '=');
                const char *value = eq != NULL ? eq + 1 : "";
                const char *path = secret_file(value, strlen(value));
                const char *flag =
                    strstr(l, "database") != NULL ? "--database-url-file=" : "--redis-url-file=";
                size_t need = strlen(flag) + strlen(path) + 1;
                char *arg = malloc(need);
                CHECK(arg != NULL);
                snprintf(arg, need, "%s%s", flag, path);
                argv_store[argc++] = arg;
            } else {
                argv_store[argc++] = strdup(l);
            }
        }
    }
    argv_store[argc] = NULL;
    for (int i = 0; i <= argc; i++)
        argv[i] = argv_store[i];

    struct config c;
    char err[512];
    int argc_after = argc;
    memset(err, 'X', sizeof err);
    int rc = config_load(&c, &argc_after, argv, err, sizeof err);
    if (rc == 0) {
        check_loaded(&c, argc, argv_store, argc_after, argv);
        config_free(&c);
    } else {
        CHECK(rc == SETTLE_EINVAL || rc == SETTLE_ENOMEM);
        CHECK(strnlen(err, sizeof err) < sizeof err && err[0] != '\0');
        CHECK(argc_after == argc); /* a failed load consumes nothing */
        config_free(&c);           /* safe on what a failed load left */
    }
    clear_env();

    for (int i = 0; i < argc; i++)
        free(argv_store[i]);
    free(text);
    return 0;
}
