/*
 * metrics.h - the worker's metrics registry, its Prometheus text rendering, and the small
 * HTTP server (libmicrohttpd) that serves GET /metrics, /healthz and /readyz.
 *
 * The metric names are the contract with ops/ (dashboards, alert rules, KEDA); the list is
 * ops/metrics.txt and a test checks the binary exports exactly those.
 *
 * Threads: the registry is written by the loop thread and read by the HTTP server's own
 * thread; every access takes the registry's mutex (short, uncontended critical sections).
 * Series are bounded (METRICS_SERIES_MAX); label values come from fixed sets (queue names,
 * DLQ reasons, result codes), and a series that does not fit is counted in
 * settle_metrics_series_dropped_total instead of growing memory.
 */
#ifndef SETTLE_METRICS_H
#define SETTLE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define METRICS_SERIES_MAX 1024

struct metrics;

/* Loop thread. version goes into settle_build_info. 0 or SETTLE_ENOMEM. */
int metrics_create(struct metrics **out, const char *version, unsigned concurrency);
/* After the server is stopped. NULL is a no-op. */
void metrics_destroy(struct metrics *m);

/* A job finished: outcome "done" | "dead"; result as in job_log. */
void metrics_job_finished(struct metrics *m, const char *queue, const char *outcome,
                          const char *result, double seconds);
/* kind: "retry" | "recheck" | "breaker_wait". */
void metrics_job_retry(struct metrics *m, const char *queue, const char *kind);
void metrics_dead_lettered(struct metrics *m, const char *queue, const char *reason);
/* endpoint: "status" | "cancel" | "list"; class: "2xx" | "404" | "4xx" | "429" | "5xx" |
 * "timeout" | "transport" | "bad_response". */
void metrics_gateway_request(struct metrics *m, const char *endpoint, const char *cls,
                             double seconds);
/* state: 0 closed, 1 open, 2 half-open; to (may be NULL) counts a transition. */
/* One PostgreSQL batch of `jobs` jobs went out; step is "load" or "store". */
void metrics_db_batch(struct metrics *m, const char *step, unsigned jobs);
void metrics_breaker(struct metrics *m, const char *endpoint, int state, const char *to);
void metrics_reservations_reaped(struct metrics *m, unsigned n);
void metrics_stock_mismatches(struct metrics *m, unsigned n);
void metrics_set_inflight(struct metrics *m, unsigned n);
void metrics_set_queue(struct metrics *m, const char *queue, long long ready, long long delayed,
                       long long inflight, long long dead, double oldest_ready_age_s);
/* Readiness inputs: ready = redis_up && postgres_up && !draining. */
void metrics_set_health(struct metrics *m, int redis_up, int postgres_up, int draining);
int metrics_ready(struct metrics *m);

/* The loop thread says it is alive (monotonic ms). /healthz answers 503 when the last beat is
 * older than METRICS_LOOP_STALE_MS: the HTTP thread would otherwise vouch for a wedged loop. */
#define METRICS_LOOP_STALE_MS 30000
void metrics_loop_beat(struct metrics *m, uint64_t now_ms);
/* Replaces METRICS_LOOP_STALE_MS (ms >= 1), e.g. so a test need not wait 30 s. */
void metrics_set_loop_stale_ms(struct metrics *m, uint64_t ms);

/* Renders the Prometheus text exposition (format 0.0.4) into a malloc'd buffer. 0 or
 * SETTLE_ENOMEM. Any thread. */
int metrics_render(struct metrics *m, char **out, size_t *len);

struct metrics_server;

/* Starts serving on addr ("host:port"; port 0 picks a free one, see metrics_server_port).
 * Its own thread; reads m under the mutex. err gets a sentence on failure. */
int metrics_server_start(struct metrics_server **out, const char *addr, struct metrics *m,
                         char *err, size_t err_len);
int metrics_server_port(const struct metrics_server *s);
void metrics_server_stop(struct metrics_server *s);

#endif
