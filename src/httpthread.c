/*
 * httpthread.c - an httploop on a thread of its own, fed from the main loop.
 *
 * Two lists cross between the threads under one mutex: calls waiting to start (the main loop
 * appends, the thread takes them while it has a free slot) and calls finished (the thread, or
 * a cancellation, appends; the main loop takes them all at once). Each side is woken by a
 * uv_async handle on its own loop; libuv coalesces wake-ups, so a burst of calls costs one
 * wake-up, not one per call. The lock is held only to link or unlink list nodes.
 */
#include "settle/httpthread.h"
#include "settle/error.h"
#include "settle/httploop.h"

#include <stdbool.h>
#include <stdlib.h>

struct call_list {
    struct httpthread_call *head, *tail;
};

struct httpthread {
    /* Main loop side. */
    uv_async_t to_main; /* calls finished, or the thread has ended */
    unsigned pending;   /* submitted and whose done has not run */
    bool closing_main;
    bool joined;
    void (*on_closed)(void *arg);
    void *closed_arg;

    /* HTTP thread side. */
    uv_thread_t thread;
    uv_loop_t loop;
    uv_async_t to_thread; /* calls waiting, or closing */
    struct httploop *hl;
    unsigned slots;
    unsigned running;
    bool pumping;
    bool stopping;

    /* Shared, under mu. */
    uv_mutex_t mu;
    struct call_list waiting;
    struct call_list finished;
    bool closing; /* the main loop asked the thread to end */
    bool exited;  /* the thread's loop has ended */
};

static void list_push(struct call_list *l, struct httpthread_call *c)
{
    c->next = NULL;
    if (l->tail != NULL)
        l->tail->next = c;
    else
        l->head = c;
    l->tail = c;
}

static struct httpthread_call *list_pop(struct call_list *l)
{
    struct httpthread_call *c = l->head;
    if (c != NULL) {
        l->head = c->next;
        if (l->head == NULL)
            l->tail = NULL;
        c->next = NULL;
    }
    return c;
}

/* Moves all of from to the end of to, in order. */
static void list_append(struct call_list *to, struct call_list *from)
{
    if (from->head == NULL)
        return;
    if (to->tail != NULL)
        to->tail->next = from->head;
    else
        to->head = from->head;
    to->tail = from->tail;
    from->head = from->tail = NULL;
}

/* ---------------------------------------------------------------------------------------------
 * The HTTP thread.
 */

/* Once closing was asked for and nothing runs or waits: close the thread's handles, which
 * ends its loop. */
static void thread_maybe_stop(struct httpthread *ht)
{
    if (ht->stopping || ht->running > 0)
        return;
    uv_mutex_lock(&ht->mu);
    bool stop = ht->closing && ht->waiting.head == NULL;
    uv_mutex_unlock(&ht->mu);
    if (!stop)
        return;
    ht->stopping = true;
    httploop_close(ht->hl, NULL, NULL);
    ht->hl = NULL;
    uv_close((uv_handle_t *)&ht->to_thread, NULL);
}

/* Starts waiting calls while a slot is free. Not re-entered: a call that ends at once, or
 * whose transfer callback runs while this starts others, frees its slot and this loop takes
 * the next call. */
static void thread_pump(struct httpthread *ht)
{
    if (ht->pumping)
        return;
    ht->pumping = true;
    while (ht->running < ht->slots && !ht->stopping) {
        uv_mutex_lock(&ht->mu);
        struct httpthread_call *c = list_pop(&ht->waiting);
        uv_mutex_unlock(&ht->mu);
        if (c == NULL)
            break;
        ht->running++;
        if (c->start(c, ht->hl) != 0)
            httpthread_call_ended(c);
    }
    ht->pumping = false;
    thread_maybe_stop(ht);
}

void httpthread_call_ended(struct httpthread_call *c)
{
    struct httpthread *ht = c->ht;
    ht->running--;
    c->status = 0;
    uv_mutex_lock(&ht->mu);
    list_push(&ht->finished, c);
    uv_mutex_unlock(&ht->mu);
    uv_async_send(&ht->to_main);
    /* The freed slot goes to the next waiting call now, not after the main loop has looked
     * at this one: that is the point of the thread. */
    thread_pump(ht);
}

static void on_to_thread(uv_async_t *a)
{
    thread_pump(a->data);
}

static void thread_main(void *arg)
{
    struct httpthread *ht = arg;
    uv_run(&ht->loop, UV_RUN_DEFAULT);
    uv_loop_close(&ht->loop);
    uv_mutex_lock(&ht->mu);
    ht->exited = true;
    uv_mutex_unlock(&ht->mu);
    /* The main loop joins the thread before it closes to_main, so this send is safe. */
    uv_async_send(&ht->to_main);
}

/* ---------------------------------------------------------------------------------------------
 * The main loop side.
 */
static void on_main_closed(uv_handle_t *h)
{
    struct httpthread *ht = h->data;
    void (*cb)(void *) = ht->on_closed;
    void *arg = ht->closed_arg;
    uv_mutex_destroy(&ht->mu);
    free(ht);
    if (cb != NULL)
        cb(arg);
}

static void on_to_main(uv_async_t *a)
{
    struct httpthread *ht = a->data;
    struct call_list done;
    uv_mutex_lock(&ht->mu);
    done = ht->finished;
    ht->finished.head = ht->finished.tail = NULL;
    bool exited = ht->exited;
    uv_mutex_unlock(&ht->mu);
    struct httpthread_call *c;
    while ((c = list_pop(&done)) != NULL) {
        ht->pending--;
        c->done(c, c->status);
    }
    if (exited && ht->closing_main && !ht->joined) {
        ht->joined = true;
        uv_thread_join(&ht->thread);
        uv_close((uv_handle_t *)&ht->to_main, on_main_closed);
    }
}

void httpthread_submit(struct httpthread *ht, struct httpthread_call *c)
{
    c->ht = ht;
    c->status = 0;
    ht->pending++;
    uv_mutex_lock(&ht->mu);
    list_push(&ht->waiting, c);
    uv_mutex_unlock(&ht->mu);
    uv_async_send(&ht->to_thread);
}

void httpthread_cancel_waiting(struct httpthread *ht)
{
    uv_mutex_lock(&ht->mu);
    for (struct httpthread_call *c = ht->waiting.head; c != NULL; c = c->next)
        c->status = UV_ECANCELED;
    list_append(&ht->finished, &ht->waiting);
    uv_mutex_unlock(&ht->mu);
    /* Their done functions run on a later loop turn, never inside this call. */
    uv_async_send(&ht->to_main);
}

unsigned httpthread_pending(const struct httpthread *ht)
{
    return ht->pending;
}

void httpthread_close(struct httpthread *ht, void (*on_closed)(void *arg), void *arg)
{
    ht->on_closed = on_closed;
    ht->closed_arg = arg;
    ht->closing_main = true;
    httpthread_cancel_waiting(ht);
    uv_mutex_lock(&ht->mu);
    ht->closing = true;
    uv_mutex_unlock(&ht->mu);
    uv_async_send(&ht->to_thread);
}

/* Undoes the thread side's set-up when the thread never started: closes what was opened
 * and runs the private loop until the close callbacks have run. */
static void unwind_thread_side(struct httpthread *ht, bool async_open)
{
    if (ht->hl != NULL)
        httploop_close(ht->hl, NULL, NULL);
    if (async_open)
        uv_close((uv_handle_t *)&ht->to_thread, NULL);
    uv_run(&ht->loop, UV_RUN_DEFAULT);
    uv_loop_close(&ht->loop);
}

int httpthread_create(struct httpthread **out, uv_loop_t *main_loop, unsigned slots)
{
    *out = NULL;
    struct httpthread *ht = calloc(1, sizeof(*ht));
    if (ht == NULL)
        return SETTLE_ENOMEM;
    ht->slots = slots > 0 ? slots : 1;
    if (uv_mutex_init(&ht->mu) != 0) {
        free(ht);
        return SETTLE_EINTERNAL;
    }
    if (uv_loop_init(&ht->loop) != 0) {
        uv_mutex_destroy(&ht->mu);
        free(ht);
        return SETTLE_EINTERNAL;
    }
    int rc = SETTLE_EINTERNAL;
    bool async_open = uv_async_init(&ht->loop, &ht->to_thread, on_to_thread) == 0;
    if (async_open) {
        ht->to_thread.data = ht;
        rc = httploop_create(&ht->hl, &ht->loop);
    }
    if (rc == 0 && uv_async_init(main_loop, &ht->to_main, on_to_main) != 0)
        rc = SETTLE_EINTERNAL;
    if (rc != 0) {
        unwind_thread_side(ht, async_open);
        uv_mutex_destroy(&ht->mu);
        free(ht);
        return rc;
    }
    ht->to_main.data = ht;
    /* Everything above happens before the thread starts, so it sees it set up. */
    if (uv_thread_create(&ht->thread, thread_main, ht) != 0) {
        unwind_thread_side(ht, true);
        /* to_main belongs to the main loop: it is freed by its close callback. */
        ht->joined = true;
        uv_close((uv_handle_t *)&ht->to_main, on_main_closed);
        return SETTLE_EINTERNAL;
    }
    *out = ht;
    return 0;
}
