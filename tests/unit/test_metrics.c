/*
 * test_metrics.c - the metrics registry and its HTTP server without Redis or PostgreSQL:
 * exposition format, histogram buckets, label escaping, the series bound, readiness, and
 * the /metrics, /healthz and /readyz answers over real HTTP (libcurl against 127.0.0.1:0).
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "settle/metrics.h"
#include "unit.h"

static char *render(struct metrics *m)
{
    char *text = NULL;
    size_t len = 0;
    CHECK_EQ_INT(metrics_render(m, &text, &len), 0);
    CHECK(text != NULL && strlen(text) == len);
    return text;
}

static void test_exposition(void)
{
    struct metrics *m = NULL;
    CHECK_EQ_INT(metrics_create(&m, "1.2.3", 32), 0);
    metrics_job_finished(m, "reconcile", "done", "completed", 0.02);
    metrics_job_finished(m, "reconcile", "done", "completed", 3.0);
    metrics_dead_lettered(m, "reconcile", "invalid_job");
    metrics_gateway_request(m, "status", "5xx", 0.004);
    metrics_breaker(m, "status", 1, "open");
    metrics_set_queue(m, "refund", 7, 2, 1, 3, 12.5);
    metrics_job_retry(m, "reconcile", "retry");
    char *t = render(m);
    CHECK_CONTAINS(t, "# TYPE settle_jobs_finished_total counter\n");
    CHECK_CONTAINS(t, "settle_jobs_finished_total{queue=\"reconcile\",outcome=\"done\","
                      "result=\"completed\"} 2\n");
    CHECK_CONTAINS(t, "# TYPE settle_job_duration_seconds histogram\n");
    /* Buckets are cumulative: 0.02 s falls in le=0.025 and above; 3 s only from le=5. */
    CHECK_CONTAINS(t, "settle_job_duration_seconds_bucket{queue=\"reconcile\",le=\"0.01\"} 0\n");
    CHECK_CONTAINS(t, "settle_job_duration_seconds_bucket{queue=\"reconcile\",le=\"0.025\"} 1\n");
    CHECK_CONTAINS(t, "settle_job_duration_seconds_bucket{queue=\"reconcile\",le=\"5\"} 2\n");
    CHECK_CONTAINS(t, "settle_job_duration_seconds_bucket{queue=\"reconcile\",le=\"+Inf\"} 2\n");
    CHECK_CONTAINS(t, "settle_job_duration_seconds_count{queue=\"reconcile\"} 2\n");
    CHECK_CONTAINS(
        t, "settle_jobs_dead_lettered_total{queue=\"reconcile\",reason=\"invalid_job\"} 1\n");
    CHECK_CONTAINS(t, "settle_gateway_requests_total{endpoint=\"status\",class=\"5xx\"} 1\n");
    CHECK_CONTAINS(t, "settle_breaker_state{endpoint=\"status\"} 1\n");
    CHECK_CONTAINS(t, "settle_breaker_transitions_total{endpoint=\"status\",to=\"open\"} 1\n");
    CHECK_CONTAINS(t, "settle_queue_ready_jobs{queue=\"refund\"} 7\n");
    CHECK_CONTAINS(t, "settle_queue_oldest_ready_age_seconds{queue=\"refund\"} 12.5\n");
    CHECK_CONTAINS(t, "settle_build_info{version=\"1.2.3\"} 1\n");
    CHECK_CONTAINS(t, "settle_worker_concurrency 32\n");
    CHECK_CONTAINS(t, "settle_job_retries_total{queue=\"reconcile\",kind=\"retry\"} 1\n");
    /* Each family's HELP and TYPE appear exactly once. */
    const char *p = strstr(t, "# TYPE settle_jobs_finished_total");
    CHECK(p != NULL && strstr(p + 1, "# TYPE settle_jobs_finished_total") == NULL);
    free(t);
    metrics_destroy(m);
}

static void test_escaping_and_bounds(void)
{
    struct metrics *m = NULL;
    CHECK_EQ_INT(metrics_create(&m, "v", 1), 0);
    metrics_dead_lettered(m, "reconcile", "we\"ird\\reason\n");
    char *t = render(m);
    CHECK_CONTAINS(t, "reason=\"we\\\"ird\\\\reason\\n\"");
    free(t);
    char reason[32];
    for (int i = 0; i < METRICS_SERIES_MAX + 10; i++) {
        snprintf(reason, sizeof(reason), "r%d", i);
        metrics_dead_lettered(m, "reconcile", reason);
    }
    t = render(m);
    CHECK_CONTAINS(t, "# TYPE settle_metrics_series_dropped_total counter\n");
    CHECK_NOT_CONTAINS(t, "settle_metrics_series_dropped_total 0\n");
    free(t);
    metrics_destroy(m);
}

struct body {
    char buf[65536];
    size_t len;
};

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    struct body *b = arg;
    size_t len = size * n;
    if (b->len + len >= sizeof(b->buf))
        return 0;
    memcpy(b->buf + b->len, p, len);
    b->len += len;
    b->buf[b->len] = '\0';
    return len;
}

static long get(int port, const char *path, struct body *b)
{
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", port, path);
    CURL *h = curl_easy_init();
    long status = 0;
    b->len = 0;
    b->buf[0] = '\0';
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 3000L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, b);
    curl_easy_setopt(h, CURLOPT_PROXY, "");
    if (curl_easy_perform(h) == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(h);
    return status;
}

static void test_server(void)
{
    struct metrics *m = NULL;
    struct metrics_server *s = NULL;
    char err[256] = "";
    static struct body b;
    CHECK_EQ_INT(metrics_create(&m, "v", 4), 0);
    CHECK_EQ_INT(metrics_server_start(&s, "127.0.0.1:0", m, err, sizeof(err)), 0);
    if (s == NULL) {
        metrics_destroy(m);
        return;
    }
    int port = metrics_server_port(s);
    CHECK(port > 0);
    CHECK_EQ_INT(get(port, "/healthz", &b), 200);
    metrics_loop_beat(m, 0);
    CHECK_EQ_INT(get(port, "/healthz", &b), 200);
    /* A loop that stops beating is reported wedged once the threshold passes, and alive again
     * at its next beat (the threshold shortened from 30 s so the test need not wait). */
    metrics_set_loop_stale_ms(m, 100);
    metrics_loop_beat(m, 0);
    CHECK_EQ_INT(get(port, "/healthz", &b), 200);
    struct timespec pause = {.tv_sec = 0, .tv_nsec = 300 * 1000 * 1000};
    while (nanosleep(&pause, &pause) != 0) {
    }
    CHECK_EQ_INT(get(port, "/healthz", &b), 503);
    CHECK_CONTAINS(b.buf, "loop not responding");
    metrics_loop_beat(m, 0);
    CHECK_EQ_INT(get(port, "/healthz", &b), 200);
    metrics_set_loop_stale_ms(m, METRICS_LOOP_STALE_MS);
    /* Not ready until both dependencies were seen up, and not while draining. */
    CHECK_EQ_INT(get(port, "/readyz", &b), 503);
    CHECK_CONTAINS(b.buf, "\"redis\":false");
    metrics_set_health(m, 1, 1, 0);
    CHECK_EQ_INT(get(port, "/readyz", &b), 200);
    CHECK(metrics_ready(m));
    metrics_set_health(m, 0, 1, 0);
    CHECK_EQ_INT(get(port, "/readyz", &b), 503);
    metrics_set_health(m, 1, 1, 1);
    CHECK_EQ_INT(get(port, "/readyz", &b), 503);
    CHECK_CONTAINS(b.buf, "\"draining\":true");
    CHECK_EQ_INT(get(port, "/metrics", &b), 200);
    CHECK_CONTAINS(b.buf, "settle_worker_ready 0\n");
    CHECK_CONTAINS(b.buf, "settle_redis_up 1\n");
    CHECK_EQ_INT(get(port, "/nope", &b), 404);
    metrics_server_stop(s);
    metrics_destroy(m);

    /* A bad address is refused with a message naming the variable. */
    CHECK_EQ_INT(metrics_create(&m, "v", 4), 0);
    CHECK(metrics_server_start(&s, "no-port-here", m, err, sizeof(err)) != 0);
    CHECK_CONTAINS(err, "SETTLE_METRICS_ADDR");
    metrics_destroy(m);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    test_exposition();
    test_escaping_and_bounds();
    test_server();
    curl_global_cleanup();
    return unit_finish();
}
