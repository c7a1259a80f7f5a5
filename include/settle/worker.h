/*
 * worker.h - `settle work`: the worker process. It owns the libuv loop and all state, claims
 * jobs from Redis, runs each through its state machine (blocking PG and PostgreSQL calls on
 * the uv thread pool, Redis calls asynchronously on the loop), and writes every outcome to
 * PostgreSQL before acknowledging it in Redis. worker.c is the only module that wires the
 * others together.
 * Thread: the calling thread becomes the loop thread.
 */
#ifndef SETTLE_WORKER_H
#define SETTLE_WORKER_H

#include "settle/config.h"

/*
 * Runs until SIGTERM/SIGINT (or SETTLE_RUN_SECONDS): then stops claiming, lets in-flight jobs
 * finish within the shutdown grace, hands back what did not finish, closes everything and
 * returns 0. A second signal exits the process at once (leases bring its jobs back).
 * Returns non-zero when start-up fails (the reason is logged).
 */
int worker_run(const struct config *cfg);

#endif
