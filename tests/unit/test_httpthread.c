/*
 * test_httpthread.c - unit tests of the HTTP thread (httpthread.c): at most `slots` calls run
 * at once and they start in submission order, a call that ends at once frees its slot, calls
 * not yet started can be cancelled and come back UV_ECANCELED without ever starting, and
 * closing stops the thread. No servers: each call is a real libcurl transfer to a loopback
 * socket that listens but never answers, so it stays in flight until its 150 ms timeout.
 * Thread: the test's main thread runs the main loop; the call starts run on the HTTP thread
 * (shared counters are atomics).
 */
#include "settle/httploop.h"
#include "settle/httpthread.h"

#include "unit.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define CALLS_MAX 8
#define CALL_TIMEOUT_MS 150
#define TEST_DEADLINE_MS 10000

/* The silent listener's URL, set by main. */
static char url[64];

struct fixture {
    char url[64];
    atomic_int running;
    atomic_int running_max;
    atomic_int started;
    int done;
    int expected;
    int closed;
    bool timed_out;
    uv_timer_t deadline;
};

struct tcall {
    struct httpthread_call c;
    struct fixture *f;
    bool fail_at_once;
    atomic_int start_rank; /* 1-based order of its start; 0 = never started */
    int done_status;
    int done_count;
    CURL *easy;
};

/* A loopback socket that accepts connections (the kernel's backlog) and never answers. */
static int silent_listener(char *out, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    snprintf(out, cap, "http://127.0.0.1:%u/", (unsigned)ntohs(a.sin_port));
    return fd;
}

/* HTTP thread: the transfer timed out (no answer ever comes). */
static void on_transfer_done(void *arg, CURL *easy, CURLcode result)
{
    struct tcall *t = arg;
    (void)result;
    curl_easy_cleanup(easy);
    t->easy = NULL;
    atomic_fetch_sub(&t->f->running, 1);
    httpthread_call_ended(&t->c);
}

static int call_start(struct httpthread_call *c, struct httploop *hl)
{
    struct tcall *t = c->arg;
    struct fixture *f = t->f;
    atomic_store(&t->start_rank, atomic_fetch_add(&f->started, 1) + 1);
    if (t->fail_at_once)
        return 1;
    int now = atomic_fetch_add(&f->running, 1) + 1;
    int max = atomic_load(&f->running_max);
    while (now > max && !atomic_compare_exchange_weak(&f->running_max, &max, now)) {
    }
    t->easy = curl_easy_init();
    curl_easy_setopt(t->easy, CURLOPT_URL, f->url);
    curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, (long)CALL_TIMEOUT_MS);
    curl_easy_setopt(t->easy, CURLOPT_NOSIGNAL, 1L);
    if (httploop_add(hl, t->easy, on_transfer_done, t) != 0) {
        curl_easy_cleanup(t->easy);
        atomic_fetch_sub(&f->running, 1);
        return 1;
    }
    return 0;
}

static void on_done(struct httpthread_call *c, int status)
{
    struct tcall *t = c->arg;
    t->done_status = status;
    t->done_count++;
    t->f->done++;
}

static void on_closed(void *arg)
{
    struct fixture *f = arg;
    f->closed++;
    uv_close((uv_handle_t *)&f->deadline, NULL);
}

static void on_deadline(uv_timer_t *h)
{
    struct fixture *f = h->data;
    f->timed_out = true;
    uv_stop(h->loop);
}

/* Runs the main loop until every call is done (or the deadline). */
static void run_until_done(uv_loop_t *loop, struct fixture *f)
{
    while (f->done < f->expected && !f->timed_out)
        uv_run(loop, UV_RUN_ONCE);
}

static void fixture_init(struct fixture *f, uv_loop_t *loop, int expected)
{
    memset(f, 0, sizeof *f);
    snprintf(f->url, sizeof f->url, "%s", url);
    f->expected = expected;
    uv_timer_init(loop, &f->deadline);
    f->deadline.data = f;
    uv_timer_start(&f->deadline, on_deadline, TEST_DEADLINE_MS, 0);
}

static void tcall_init(struct tcall *t, struct fixture *f)
{
    memset(t, 0, sizeof *t);
    t->f = f;
    t->c.start = call_start;
    t->c.done = on_done;
    t->c.arg = t;
}

/* Closes ht and checks that the thread stops and every handle closes. */
static void close_and_check(uv_loop_t *loop, struct httpthread *ht, struct fixture *f)
{
    httpthread_close(ht, on_closed, f);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK_EQ_INT(f->closed, 1);
    CHECK_EQ_INT(uv_loop_close(loop), 0);
}

static void test_slots_bound_and_order(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct fixture f;
    struct tcall calls[6];
    fixture_init(&f, &loop, 6);
    struct httpthread *ht = NULL;
    CHECK_EQ_INT(httpthread_create(&ht, &loop, 2), 0);
    if (ht == NULL)
        return;
    for (int i = 0; i < 6; i++) {
        tcall_init(&calls[i], &f);
        calls[i].fail_at_once = i == 2; /* ends at once: its slot goes to the next call */
        httpthread_submit(ht, &calls[i].c);
    }
    CHECK_EQ_INT(httpthread_pending(ht), 6);
    run_until_done(&loop, &f);
    CHECK(!f.timed_out);
    CHECK_EQ_INT(httpthread_pending(ht), 0);
    CHECK_EQ_INT(atomic_load(&f.running_max), 2);
    for (int i = 0; i < 6; i++) {
        CHECK_EQ_INT(calls[i].done_count, 1);
        CHECK_EQ_INT(calls[i].done_status, 0);
        CHECK_EQ_INT(atomic_load(&calls[i].start_rank), i + 1);
    }
    close_and_check(&loop, ht, &f);
}

static void test_cancel_waiting(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct fixture f;
    struct tcall calls[4];
    fixture_init(&f, &loop, 4);
    struct httpthread *ht = NULL;
    CHECK_EQ_INT(httpthread_create(&ht, &loop, 1), 0);
    if (ht == NULL)
        return;
    for (int i = 0; i < 4; i++) {
        tcall_init(&calls[i], &f);
        httpthread_submit(ht, &calls[i].c);
    }
    /* One slot and 150 ms per call: at most the first has started by now. */
    httpthread_cancel_waiting(ht);
    run_until_done(&loop, &f);
    CHECK(!f.timed_out);
    int cancelled = 0;
    for (int i = 0; i < 4; i++) {
        CHECK_EQ_INT(calls[i].done_count, 1);
        bool started = atomic_load(&calls[i].start_rank) != 0;
        if (calls[i].done_status == UV_ECANCELED) {
            cancelled++;
            CHECK(!started);
        } else {
            CHECK_EQ_INT(calls[i].done_status, 0);
            CHECK(started);
        }
    }
    CHECK(cancelled >= 3);
    /* The thread still serves calls submitted after a cancellation. */
    struct tcall later;
    tcall_init(&later, &f);
    f.expected++;
    httpthread_submit(ht, &later.c);
    run_until_done(&loop, &f);
    CHECK_EQ_INT(later.done_count, 1);
    CHECK_EQ_INT(later.done_status, 0);
    CHECK(atomic_load(&later.start_rank) != 0);
    close_and_check(&loop, ht, &f);
}

static void test_close_cancels_what_waits(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct fixture f;
    struct tcall calls[3];
    fixture_init(&f, &loop, 3);
    struct httpthread *ht = NULL;
    CHECK_EQ_INT(httpthread_create(&ht, &loop, 1), 0);
    if (ht == NULL)
        return;
    for (int i = 0; i < 3; i++) {
        tcall_init(&calls[i], &f);
        httpthread_submit(ht, &calls[i].c);
    }
    /* Every call still gets its done before the close completes. */
    close_and_check(&loop, ht, &f);
    CHECK(!f.timed_out);
    for (int i = 0; i < 3; i++)
        CHECK_EQ_INT(calls[i].done_count, 1);
    CHECK(calls[2].done_status == UV_ECANCELED);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    int fd = silent_listener(url, sizeof url);
    CHECK(fd >= 0);
    if (fd >= 0) {
        RUN(test_slots_bound_and_order);
        RUN(test_cancel_waiting);
        RUN(test_close_cancels_what_waits);
        close(fd);
    }
    curl_global_cleanup();
    return unit_finish();
}
