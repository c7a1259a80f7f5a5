/*
 * rconn.h - Redis connections: asynchronous ones on the libuv loop (hiredis + its libuv
 * adapter) with automatic reconnection, synchronous ones for CLI commands, and calls of the
 * embedded Lua scripts by EVALSHA with a fallback to EVAL on NOSCRIPT.
 *
 * Replies are seen through struct rconn_reply, an opaque view of hiredis' reply, so no
 * hiredis type leaks out of this module.
 * Thread: the async API runs on the loop thread only; a sync connection belongs to one thread.
 */
#ifndef SETTLE_RCONN_H
#define SETTLE_RCONN_H

#include <stddef.h>
#include <uv.h>

#include "settle/config.h"

enum rconn_type {
    RCONN_NIL = 0,
    RCONN_INTEGER = 1,
    RCONN_STRING = 2, /* bulk string */
    RCONN_STATUS = 3, /* +OK */
    RCONN_ARRAY = 4,
    RCONN_ERROR = 5,
    RCONN_OTHER = 6, /* RESP3 types we do not use */
};

struct rconn_reply;

enum rconn_type rconn_reply_type(const struct rconn_reply *r);
long long rconn_reply_integer(const struct rconn_reply *r);
/* String, status or error text (not NUL-safe: use len); "" for other types. */
const char *rconn_reply_str(const struct rconn_reply *r, size_t *len);
size_t rconn_reply_elements(const struct rconn_reply *r);
const struct rconn_reply *rconn_reply_element(const struct rconn_reply *r, size_t i);
/* Integer reply, or a string reply holding a decimal integer; else dflt. */
long long rconn_reply_as_ll(const struct rconn_reply *r, long long dflt);

/*
 * Called exactly once per accepted command: status 0 with a reply (which may be an error
 * reply: check rconn_reply_type), or status SETTLE_EIO with reply NULL when the connection
 * dropped or was closed before the answer came. The reply is valid only during the call.
 */
typedef void (*rconn_cb)(void *arg, int status, const struct rconn_reply *reply);

/* Notified on the loop thread whenever the connection comes up (1) or goes down (0). */
typedef void (*rconn_state_cb)(void *arg, int up);

struct rconn;

/* Loop thread. Starts connecting at once and keeps reconnecting (100 ms doubling to 5 s)
 * until rconn_close. name is sent as CLIENT SETNAME (shows in CLIENT LIST). */
int rconn_create(struct rconn **out, uv_loop_t *loop, const struct config_redis_addr *addr,
                 const char *name, rconn_state_cb on_state, void *state_arg);

int rconn_is_up(const struct rconn *rc);

/* Sends a command. 0: cb will be called exactly once. SETTLE_EIO when not connected (cb is
 * never called). */
int rconn_command(struct rconn *rc, rconn_cb cb, void *arg, int argc, const char **argv,
                  const size_t *argv_len);

/* Runs embedded script `script` with nkeys keys followed by the remaining args. Same
 * callback contract as rconn_command. A NOSCRIPT answer is retried once with EVAL. */
int rconn_eval(struct rconn *rc, const char *script, int nkeys, int argc, const char **argv,
               const size_t *argv_len, rconn_cb cb, void *arg);

/* Closes the connection; pending callbacks get SETTLE_EIO; on_closed (may be NULL) runs on a
 * later loop turn, after which the struct is freed. */
void rconn_close(struct rconn *rc, void (*on_closed)(void *arg), void *arg);

/* --- Synchronous connections (CLI commands, tests) --- */
struct rconn_sync;

/* Connects, authenticates and selects the database. err gets a sentence on failure. */
int rconn_sync_open(struct rconn_sync **out, const struct config_redis_addr *addr,
                    uint64_t timeout_ms, char *err, size_t err_len);
void rconn_sync_close(struct rconn_sync *s);
/* Runs a command; *reply must be freed with rconn_sync_free. SETTLE_EIO on transport error. */
int rconn_sync_command(struct rconn_sync *s, struct rconn_reply **reply, int argc,
                       const char **argv, const size_t *argv_len);
int rconn_sync_eval(struct rconn_sync *s, struct rconn_reply **reply, const char *script, int nkeys,
                    int argc, const char **argv, const size_t *argv_len);
void rconn_sync_free(struct rconn_reply *reply);

/* Builds the key "{ns}:suffix" into buf. Returns the length or SETTLE_ETOOBIG. */
int rconn_key(char *buf, size_t buf_len, const char *ns, const char *suffix);

#endif
