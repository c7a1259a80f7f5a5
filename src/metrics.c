/*
 * metrics.c - metrics registry, Prometheus rendering and the /metrics, /healthz, /readyz
 * server.
 *
 * Threads: setters run on the loop thread; rendering runs on libmicrohttpd's thread; both
 * hold `mu`. Ownership: struct metrics owns its series table (fixed size, no allocation after
 * creation); struct metrics_server owns the MHD daemon.
 */
#include "settle/metrics.h"

#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "settle/error.h"

#define LABELS_MAX 160
#define BUCKETS_MAX 16

enum family_type {
    FAMILY_COUNTER,
    FAMILY_GAUGE,
    FAMILY_HISTOGRAM,
};

/* The families, in exposition order. Indexes are the F_* values below. */
enum family_id {
    F_QUEUE_READY,
    F_QUEUE_DELAYED,
    F_QUEUE_INFLIGHT,
    F_QUEUE_DEAD,
    F_QUEUE_OLDEST,
    F_JOBS_FINISHED,
    F_JOB_RETRIES,
    F_DEAD_LETTERED,
    F_JOB_DURATION,
    F_GW_REQUESTS,
    F_GW_DURATION,
    F_DB_BATCH,
    F_BREAKER_STATE,
    F_BREAKER_TRANSITIONS,
    F_RESERVATIONS_REAPED,
    F_STOCK_MISMATCHES,
    F_CONCURRENCY,
    F_INFLIGHT,
    F_READY,
    F_REDIS_UP,
    F_POSTGRES_UP,
    F_BUILD_INFO,
    F_SERIES_DROPPED,
    F_COUNT
};

struct family {
    const char *name;
    enum family_type type;
    const char *help;
    const double *buckets; /* histograms only */
    unsigned n_buckets;
};

static const double job_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                     1,     2.5,  5,     10,   30,  60};
static const double batch_buckets[] = {1, 2, 4, 8, 16, 32, 64};
static const double gw_buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                    0.25,  0.5,    1,     2.5,  5,     10};

static const struct family families[F_COUNT] = {
    [F_QUEUE_READY] = {"settle_queue_ready_jobs", FAMILY_GAUGE, "Jobs in the ready list.", 0, 0},
    [F_QUEUE_DELAYED] = {"settle_queue_delayed_jobs", FAMILY_GAUGE,
                         "Jobs in the delayed set (retries, re-checks).", 0, 0},
    [F_QUEUE_INFLIGHT] = {"settle_queue_inflight_jobs", FAMILY_GAUGE,
                          "Jobs leased to workers (all workers).", 0, 0},
    [F_QUEUE_DEAD] = {"settle_queue_dead_jobs", FAMILY_GAUGE, "Dead-letter entries per queue.", 0,
                      0},
    [F_QUEUE_OLDEST] = {"settle_queue_oldest_ready_age_seconds", FAMILY_GAUGE,
                        "Age of the oldest ready job (0 when empty or unknown).", 0, 0},
    [F_JOBS_FINISHED] = {"settle_jobs_finished_total", FAMILY_COUNTER,
                         "Jobs finished by this worker, by outcome and result.", 0, 0},
    [F_JOB_RETRIES] = {"settle_job_retries_total", FAMILY_COUNTER,
                       "Jobs put back to run later, by kind.", 0, 0},
    [F_DEAD_LETTERED] = {"settle_jobs_dead_lettered_total", FAMILY_COUNTER,
                         "Jobs moved to the dead-letter queue, by reason.", 0, 0},
    [F_JOB_DURATION] = {"settle_job_duration_seconds", FAMILY_HISTOGRAM,
                        "Time from claim to finish of one delivery.", job_buckets,
                        sizeof(job_buckets) / sizeof(job_buckets[0])},
    [F_GW_REQUESTS] = {"settle_gateway_requests_total", FAMILY_COUNTER,
                       "Requests to the payment gateway, by endpoint and result class.", 0, 0},
    [F_GW_DURATION] = {"settle_gateway_request_duration_seconds", FAMILY_HISTOGRAM,
                       "Payment gateway request latency.", gw_buckets,
                       sizeof(gw_buckets) / sizeof(gw_buckets[0])},
    [F_DB_BATCH] = {"settle_db_batch_jobs", FAMILY_HISTOGRAM,
                    "Jobs per PostgreSQL batch (one transaction), by step: load or store.",
                    batch_buckets, sizeof(batch_buckets) / sizeof(batch_buckets[0])},
    [F_BREAKER_STATE] = {"settle_breaker_state", FAMILY_GAUGE,
                         "Circuit breaker state: 0 closed, 1 open, 2 half-open.", 0, 0},
    [F_BREAKER_TRANSITIONS] = {"settle_breaker_transitions_total", FAMILY_COUNTER,
                               "Circuit breaker state changes, by new state.", 0, 0},
    [F_RESERVATIONS_REAPED] = {"settle_reservations_reaped_total", FAMILY_COUNTER,
                               "Stock reservations released after their deadline.", 0, 0},
    [F_STOCK_MISMATCHES] = {"settle_stock_sync_mismatches_total", FAMILY_COUNTER,
                            "SKUs whose Redis stock disagreed with PostgreSQL.", 0, 0},
    [F_CONCURRENCY] = {"settle_worker_concurrency", FAMILY_GAUGE,
                       "Configured jobs in flight per process.", 0, 0},
    [F_INFLIGHT] = {"settle_worker_inflight_jobs", FAMILY_GAUGE, "Jobs this process is working on.",
                    0, 0},
    [F_READY] = {"settle_worker_ready", FAMILY_GAUGE,
                 "1 when Redis and PostgreSQL are reachable and the worker is not draining.", 0, 0},
    [F_REDIS_UP] = {"settle_redis_up", FAMILY_GAUGE, "1 when the worker's Redis connection is up.",
                    0, 0},
    [F_POSTGRES_UP] = {"settle_postgres_up", FAMILY_GAUGE,
                       "1 when the last PostgreSQL health check succeeded.", 0, 0},
    [F_BUILD_INFO] = {"settle_build_info", FAMILY_GAUGE, "Build information.", 0, 0},
    [F_SERIES_DROPPED] = {"settle_metrics_series_dropped_total", FAMILY_COUNTER,
                          "Updates dropped because the series table was full.", 0, 0},
};

struct series {
    enum family_id family;
    char labels[LABELS_MAX]; /* rendered label set without braces, "" for none */
    double value;            /* counter/gauge value, or histogram sum */
    uint64_t count;          /* histogram count */
    uint64_t buckets[BUCKETS_MAX];
};

struct metrics {
    pthread_mutex_t mu;
    struct series series[METRICS_SERIES_MAX];
    unsigned n;
    uint64_t dropped;
    int redis_up, postgres_up, draining;
    uint64_t loop_beat_ms;  /* CLOCK_MONOTONIC ms of the loop's last beat; 0 = never */
    uint64_t loop_stale_ms; /* /healthz fails past this much silence */
};

/* Label values come from our own fixed vocabularies, but escape them anyway so a surprise can
 * never break the exposition format. */
static void append_label(char *buf, size_t size, const char *name, const char *value)
{
    size_t used = strlen(buf);
    if (used + 1 >= size)
        return;
    int n = snprintf(buf + used, size - used, "%s%s=\"", used > 0 ? "," : "", name);
    if (n < 0 || (size_t)n >= size - used)
        return;
    used += (size_t)n;
    for (const char *p = value != NULL ? value : ""; *p != '\0' && used + 3 < size; p++) {
        if (*p == '"' || *p == '\\') {
            buf[used++] = '\\';
            buf[used++] = *p;
        } else if (*p == '\n') {
            buf[used++] = '\\';
            buf[used++] = 'n';
        } else {
            buf[used++] = *p;
        }
    }
    if (used + 1 < size)
        buf[used++] = '"';
    buf[used] = '\0';
}

/* Finds or creates a series; NULL (and a dropped count) when the table is full. mu held. */
static struct series *get_series(struct metrics *m, enum family_id f, const char *labels)
{
    for (unsigned i = 0; i < m->n; i++) {
        if (m->series[i].family == f && strcmp(m->series[i].labels, labels) == 0)
            return &m->series[i];
    }
    if (m->n >= METRICS_SERIES_MAX) {
        m->dropped++;
        return NULL;
    }
    struct series *s = &m->series[m->n++];
    memset(s, 0, sizeof(*s));
    s->family = f;
    snprintf(s->labels, sizeof(s->labels), "%s", labels);
    return s;
}

static void add(struct metrics *m, enum family_id f, const char *labels, double v)
{
    pthread_mutex_lock(&m->mu);
    struct series *s = get_series(m, f, labels);
    if (s != NULL)
        s->value += v;
    pthread_mutex_unlock(&m->mu);
}

static void set(struct metrics *m, enum family_id f, const char *labels, double v)
{
    pthread_mutex_lock(&m->mu);
    struct series *s = get_series(m, f, labels);
    if (s != NULL)
        s->value = v;
    pthread_mutex_unlock(&m->mu);
}

static void observe(struct metrics *m, enum family_id f, const char *labels, double v)
{
    const struct family *fam = &families[f];
    pthread_mutex_lock(&m->mu);
    struct series *s = get_series(m, f, labels);
    if (s != NULL) {
        s->value += v;
        s->count++;
        for (unsigned i = 0; i < fam->n_buckets; i++) {
            if (v <= fam->buckets[i])
                s->buckets[i]++;
        }
    }
    pthread_mutex_unlock(&m->mu);
}

int metrics_create(struct metrics **out, const char *version, unsigned concurrency)
{
    struct metrics *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return SETTLE_ENOMEM;
    pthread_mutex_init(&m->mu, NULL);
    m->loop_stale_ms = METRICS_LOOP_STALE_MS;
    char l[LABELS_MAX] = "";
    append_label(l, sizeof(l), "version", version);
    set(m, F_BUILD_INFO, l, 1);
    set(m, F_CONCURRENCY, "", concurrency);
    set(m, F_INFLIGHT, "", 0);
    set(m, F_READY, "", 0);
    set(m, F_REDIS_UP, "", 0);
    set(m, F_POSTGRES_UP, "", 0);
    add(m, F_RESERVATIONS_REAPED, "", 0);
    add(m, F_STOCK_MISMATCHES, "", 0);
    *out = m;
    return 0;
}

void metrics_destroy(struct metrics *m)
{
    if (m == NULL)
        return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void metrics_job_finished(struct metrics *m, const char *queue, const char *outcome,
                          const char *result, double seconds)
{
    char l[LABELS_MAX] = "";
    append_label(l, sizeof(l), "queue", queue);
    append_label(l, sizeof(l), "outcome", outcome);
    append_label(l, sizeof(l), "result", result);
    add(m, F_JOBS_FINISHED, l, 1);
    char q[LABELS_MAX] = "";
    append_label(q, sizeof(q), "queue", queue);
    observe(m, F_JOB_DURATION, q, seconds);
}

void metrics_job_retry(struct metrics *m, const char *queue, const char *kind)
{
    char l[LABELS_MAX] = "";
    append_label(l, sizeof(l), "queue", queue);
    append_label(l, sizeof(l), "kind", kind);
    add(m, F_JOB_RETRIES, l, 1);
}

void metrics_dead_lettered(struct metrics *m, const char *queue, const char *reason)
{
    char l[LABELS_MAX] = "";
    append_label(l, sizeof(l), "queue", queue);
    append_label(l, sizeof(l), "reason", reason);
    add(m, F_DEAD_LETTERED, l, 1);
}

void metrics_gateway_request(struct metrics *m, const char *endpoint, const char *cls,
                             double seconds)
{
    char l[LABELS_MAX] = "";
    append_label(l, sizeof(l), "endpoint", endpoint);
    append_label(l, sizeof(l), "class", cls);
    add(m, F_GW_REQUESTS, l, 1);
    char e[LABELS_MAX] = "";
    append_label(e, sizeof(e), "endpoint", endpoint);
    observe(m, F_GW_DURATION, e, seconds);
}

void metrics_db_batch(struct metrics *m, const char *step, unsigned jobs)
{
    char l[LABELS_MAX] = "";
    append_label(l, sizeof(l), "step", step);
    observe(m, F_DB_BATCH, l, (double)jobs);
}

void metrics_breaker(struct metrics *m, const char *endpoint, int state, const char *to)
{
    char e[LABELS_MAX] = "";
    append_label(e, sizeof(e), "endpoint", endpoint);
    set(m, F_BREAKER_STATE, e, state);
    if (to != NULL) {
        char l[LABELS_MAX] = "";
        append_label(l, sizeof(l), "endpoint", endpoint);
        append_label(l, sizeof(l), "to", to);
        add(m, F_BREAKER_TRANSITIONS, l, 1);
    }
}

void metrics_reservations_reaped(struct metrics *m, unsigned n)
{
    add(m, F_RESERVATIONS_REAPED, "", n);
}

void metrics_stock_mismatches(struct metrics *m, unsigned n)
{
    add(m, F_STOCK_MISMATCHES, "", n);
}

void metrics_set_inflight(struct metrics *m, unsigned n)
{
    set(m, F_INFLIGHT, "", n);
}

void metrics_set_queue(struct metrics *m, const char *queue, long long ready, long long delayed,
                       long long inflight, long long dead, double oldest_ready_age_s)
{
    char l[LABELS_MAX] = "";
    append_label(l, sizeof(l), "queue", queue);
    set(m, F_QUEUE_READY, l, (double)ready);
    set(m, F_QUEUE_DELAYED, l, (double)delayed);
    set(m, F_QUEUE_INFLIGHT, l, (double)inflight);
    set(m, F_QUEUE_DEAD, l, (double)dead);
    set(m, F_QUEUE_OLDEST, l, oldest_ready_age_s);
}

void metrics_set_health(struct metrics *m, int redis_up, int postgres_up, int draining)
{
    pthread_mutex_lock(&m->mu);
    m->redis_up = redis_up;
    m->postgres_up = postgres_up;
    m->draining = draining;
    pthread_mutex_unlock(&m->mu);
    set(m, F_REDIS_UP, "", redis_up ? 1 : 0);
    set(m, F_POSTGRES_UP, "", postgres_up ? 1 : 0);
    set(m, F_READY, "", redis_up && postgres_up && !draining ? 1 : 0);
}

static uint64_t monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void metrics_loop_beat(struct metrics *m, uint64_t now_ms)
{
    (void)now_ms;
    /* The HTTP thread compares against its own clock reading, so use one clock for both. */
    uint64_t now = monotonic_ms();
    pthread_mutex_lock(&m->mu);
    m->loop_beat_ms = now;
    pthread_mutex_unlock(&m->mu);
}

void metrics_set_loop_stale_ms(struct metrics *m, uint64_t ms)
{
    pthread_mutex_lock(&m->mu);
    m->loop_stale_ms = ms >= 1 ? ms : 1;
    pthread_mutex_unlock(&m->mu);
}

int metrics_ready(struct metrics *m)
{
    pthread_mutex_lock(&m->mu);
    int r = m->redis_up && m->postgres_up && !m->draining;
    pthread_mutex_unlock(&m->mu);
    return r;
}

/* A growable text buffer for rendering; `failed` latches an allocation failure. */
struct text {
    char *buf;
    size_t len, cap;
    bool failed;
};

static void textf(struct text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void textf(struct text *t, const char *fmt, ...)
{
    if (t->failed)
        return;
    for (int tries = 0; tries < 2; tries++) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            t->failed = true;
            return;
        }
        if ((size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = (t->cap + (size_t)n + 1) * 2;
        char *nb = realloc(t->buf, cap);
        if (nb == NULL) {
            t->failed = true;
            return;
        }
        t->buf = nb;
        t->cap = cap;
    }
}

static void render_value(struct text *t, double v)
{
    if (v == (double)(long long)v && v < 9e15 && v > -9e15)
        textf(t, "%lld\n", (long long)v);
    else
        textf(t, "%.6g\n", v);
}

int metrics_render(struct metrics *m, char **out, size_t *len)
{
    struct text t = {0};
    t.cap = 16384;
    t.buf = malloc(t.cap);
    if (t.buf == NULL)
        return SETTLE_ENOMEM;
    t.buf[0] = '\0';
    pthread_mutex_lock(&m->mu);
    /* Keep the dropped counter current before rendering it. */
    struct series *d = get_series(m, F_SERIES_DROPPED, "");
    if (d != NULL)
        d->value = (double)m->dropped;
    for (int f = 0; f < F_COUNT; f++) {
        const struct family *fam = &families[f];
        bool header = false;
        for (unsigned i = 0; i < m->n; i++) {
            const struct series *s = &m->series[i];
            if ((int)s->family != f)
                continue;
            if (!header) {
                textf(&t, "# HELP %s %s\n# TYPE %s %s\n", fam->name, fam->help, fam->name,
                      fam->type == FAMILY_COUNTER ? "counter"
                      : fam->type == FAMILY_GAUGE ? "gauge"
                                                  : "histogram");
                header = true;
            }
            if (fam->type != FAMILY_HISTOGRAM) {
                if (s->labels[0] != '\0')
                    textf(&t, "%s{%s} ", fam->name, s->labels);
                else
                    textf(&t, "%s ", fam->name);
                render_value(&t, s->value);
                continue;
            }
            const char *sep = s->labels[0] != '\0' ? "," : "";
            for (unsigned b = 0; b < fam->n_buckets; b++)
                textf(&t, "%s_bucket{%s%sle=\"%g\"} %llu\n", fam->name, s->labels, sep,
                      fam->buckets[b], (unsigned long long)s->buckets[b]);
            textf(&t, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", fam->name, s->labels, sep,
                  (unsigned long long)s->count);
            if (s->labels[0] != '\0') {
                textf(&t, "%s_sum{%s} %.6f\n", fam->name, s->labels, s->value);
                textf(&t, "%s_count{%s} %llu\n", fam->name, s->labels,
                      (unsigned long long)s->count);
            } else {
                textf(&t, "%s_sum %.6f\n", fam->name, s->value);
                textf(&t, "%s_count %llu\n", fam->name, (unsigned long long)s->count);
            }
        }
    }
    pthread_mutex_unlock(&m->mu);
    if (t.failed) {
        free(t.buf);
        return SETTLE_ENOMEM;
    }
    *out = t.buf;
    *len = t.len;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * HTTP server.
 */
struct metrics_server {
    struct MHD_Daemon *daemon;
    struct metrics *m;
    int port;
};

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *type,
                             const char *body, size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)(uintptr_t)body, MHD_RESPMEM_MUST_COPY);
    if (r == NULL)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", type);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    struct metrics_server *s = cls;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        static const char msg[] = "{\"error\":\"method not allowed\"}\n";
        return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "application/json", msg, sizeof(msg) - 1);
    }
    if (strcmp(url, "/healthz") == 0) {
        pthread_mutex_lock(&s->m->mu);
        uint64_t beat = s->m->loop_beat_ms, stale_ms = s->m->loop_stale_ms;
        pthread_mutex_unlock(&s->m->mu);
        /* Before the first beat the process is starting: alive. After it, a loop that has not
         * beaten for loop_stale_ms (METRICS_LOOP_STALE_MS) is wedged, and an orchestrator should
         * restart it (its jobs come back through their leases). */
        if (beat != 0 && monotonic_ms() - beat > stale_ms) {
            static const char stuck[] = "{\"status\":\"loop not responding\"}\n";
            return reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, "application/json", stuck,
                         sizeof(stuck) - 1);
        }
        static const char ok[] = "{\"status\":\"ok\"}\n";
        return reply(c, MHD_HTTP_OK, "application/json", ok, sizeof(ok) - 1);
    }
    if (strcmp(url, "/readyz") == 0) {
        char body[160];
        pthread_mutex_lock(&s->m->mu);
        int redis = s->m->redis_up, pg = s->m->postgres_up, draining = s->m->draining;
        pthread_mutex_unlock(&s->m->mu);
        int ready = redis && pg && !draining;
        int n = snprintf(body, sizeof(body),
                         "{\"ready\":%s,\"redis\":%s,\"postgres\":%s,\"draining\":%s}\n",
                         ready ? "true" : "false", redis ? "true" : "false", pg ? "true" : "false",
                         draining ? "true" : "false");
        return reply(c, ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, "application/json",
                     body, (size_t)n);
    }
    if (strcmp(url, "/metrics") == 0) {
        char *text = NULL;
        size_t len = 0;
        if (metrics_render(s->m, &text, &len) != 0) {
            static const char oom[] = "out of memory\n";
            return reply(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "text/plain", oom, sizeof(oom) - 1);
        }
        enum MHD_Result r =
            reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text, len);
        free(text);
        return r;
    }
    static const char nf[] = "{\"error\":\"not found\"}\n";
    return reply(c, MHD_HTTP_NOT_FOUND, "application/json", nf, sizeof(nf) - 1);
}

int metrics_server_start(struct metrics_server **out, const char *addr, struct metrics *m,
                         char *err, size_t err_len)
{
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (colon == NULL || (size_t)(colon - addr) >= sizeof(host)) {
        snprintf(err, err_len, "SETTLE_METRICS_ADDR \"%s\" is not host:port", addr);
        return SETTLE_EINVAL;
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gai = getaddrinfo(host[0] != '\0' ? host : NULL, colon + 1, &hints, &res);
    if (gai != 0 || res == NULL) {
        snprintf(err, err_len, "SETTLE_METRICS_ADDR \"%s\": %s", addr, gai_strerror(gai));
        return SETTLE_EINVAL;
    }
    struct metrics_server *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        freeaddrinfo(res);
        return SETTLE_ENOMEM;
    }
    s->m = m;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    if (res->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* A scrape endpoint: a handful of connections, short timeouts, bounded memory. */
    s->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR,
                                 res->ai_addr, MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10, MHD_OPTION_END);
    freeaddrinfo(res);
    if (s->daemon == NULL) {
        snprintf(err, err_len, "cannot listen on SETTLE_METRICS_ADDR \"%s\"", addr);
        free(s);
        return SETTLE_EIO;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    s->port = info != NULL ? (int)info->port : 0;
    *out = s;
    return 0;
}

int metrics_server_port(const struct metrics_server *s)
{
    return s->port;
}

void metrics_server_stop(struct metrics_server *s)
{
    if (s == NULL)
        return;
    MHD_stop_daemon(s->daemon);
    free(s);
}
