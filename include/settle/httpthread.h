/*
 * httpthread.h - an httploop on a thread of its own, fed from the main loop.
 *
 * Why a thread: a PG status query holds one of SETTLE_STATUS_CONCURRENCY slots from its
 * sending until its answer has been read, and the next waiting query can go out only then.
 * On the main loop that turnaround waited for whatever else the loop was doing when the
 * answer arrived (claims, batch completions, Redis replies): measured at 4 000 jobs/s, about
 * 2.5 ms on top of every 20 ms answer, which is 12 % of the PG's capacity left unused. Here
 * the answer is read and the next call started by a thread that does nothing else; the main
 * loop gets the finished calls back in batches and keeps owning every job.
 *
 * Threads: httpthread_create, httpthread_submit, httpthread_cancel_waiting and
 * httpthread_close on the main loop thread; a call's start function and
 * httpthread_call_ended on the HTTP thread; a call's done function on the main loop thread.
 * Owns: the thread, its uv loop and httploop, two uv_async handles, the waiting and finished
 * lists. Never the calls, which the submitter owns and must keep alive until done has run.
 */
#ifndef SETTLE_HTTPTHREAD_H
#define SETTLE_HTTPTHREAD_H

#include <stdint.h>
#include <uv.h>

struct httploop;
struct httpthread;
struct httpthread_call;

/* HTTP thread: starts the call's transfer on hl. 0 when a transfer is in flight (the call then
 * ends with httpthread_call_ended, from a transfer callback), nonzero when it ended at once
 * (its result is recorded wherever the submitter keeps it). */
typedef int (*httpthread_start_fn)(struct httpthread_call *c, struct httploop *hl);

/* Main loop: the call ended (status 0), or never started (UV_ECANCELED: cancelled by
 * httpthread_cancel_waiting or by httpthread_close). */
typedef void (*httpthread_done_fn)(struct httpthread_call *c, int status);

struct httpthread_call {
    httpthread_start_fn start;
    httpthread_done_fn done;
    void *arg;
    /* Private to the module. */
    struct httpthread *ht;
    struct httpthread_call *next;
    int status;
};

/* Starts the thread; at most slots (>= 1) calls run at once, the rest wait in submission
 * order. 0, SETTLE_ENOMEM or SETTLE_EINTERNAL (libuv or curl refused). */
int httpthread_create(struct httpthread **out, uv_loop_t *main_loop, unsigned slots);

/* Queues c (start and done set) behind the calls already waiting. Never blocks on the
 * thread's work: the queue is handed over under a short lock. */
void httpthread_submit(struct httpthread *ht, struct httpthread_call *c);

/* Every call submitted so far and not yet started comes back UV_ECANCELED (on a later loop
 * turn); calls already running go on. Used when the PG's circuit breaker opens, so that no
 * call admitted before goes out after it, and at the end of the shutdown grace. */
void httpthread_cancel_waiting(struct httpthread *ht);

/* Calls running or waiting (submitted and whose done has not run). */
unsigned httpthread_pending(const struct httpthread *ht);

/* HTTP thread, from a started call's transfer callback: the call is over. */
void httpthread_call_ended(struct httpthread_call *c);

/* Cancels what still waits, lets running calls end, stops and joins the thread and frees
 * everything; on_closed(arg) runs on the main loop once the last handle has closed (the loop
 * must keep running until then). */
void httpthread_close(struct httpthread *ht, void (*on_closed)(void *arg), void *arg);

#endif
