/*
 * rconn.c - Redis connections.
 *
 * Async connections live on the libuv loop thread (hiredis + its libuv adapter). Each one
 * reconnects by itself with a doubling back-off, authenticates, selects the database, names
 * itself and preloads every embedded Lua script before it reports itself up, so EVALSHA
 * normally never misses. Pending callbacks are failed with SETTLE_EIO when the connection
 * drops; callers decide what a lost answer means (the queue's lease makes it safe).
 *
 * Sync connections (CLI commands) wrap hiredis' blocking API for one thread.
 *
 * Ownership: struct rconn owns its hiredis context and a uv timer; the struct is freed in the
 * timer's close callback, after hiredis has released the context, never from inside a
 * hiredis callback.
 */
#include "settle/rconn.h"

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "settle/embedded.h"
#include "settle/error.h"
#include "settle/log.h"

#define RCONN_BACKOFF_MIN_MS 100
#define RCONN_BACKOFF_MAX_MS 5000
/* How long a connect plus handshake may take: a backstop for a connect that never completes
 * (a black-holed address); refused connects are seen at once through ev_on_poll. */
#define RCONN_CONNECT_TIMEOUT_MS 2000

/* ---------------------------------------------------------------------------------------------
 * Reply view. struct rconn_reply is never defined: a pointer to it is a redisReply in disguise,
 * which keeps hiredis out of every other module.
 */
static const redisReply *as_reply(const struct rconn_reply *r)
{
    return (const redisReply *)(const void *)r;
}

enum rconn_type rconn_reply_type(const struct rconn_reply *r)
{
    if (r == NULL)
        return RCONN_NIL;
    switch (as_reply(r)->type) {
    case REDIS_REPLY_NIL:
        return RCONN_NIL;
    case REDIS_REPLY_INTEGER:
        return RCONN_INTEGER;
    case REDIS_REPLY_STRING:
        return RCONN_STRING;
    case REDIS_REPLY_STATUS:
        return RCONN_STATUS;
    case REDIS_REPLY_ARRAY:
        return RCONN_ARRAY;
    case REDIS_REPLY_ERROR:
        return RCONN_ERROR;
    default:
        return RCONN_OTHER;
    }
}

long long rconn_reply_integer(const struct rconn_reply *r)
{
    return (r != NULL && as_reply(r)->type == REDIS_REPLY_INTEGER) ? as_reply(r)->integer : 0;
}

const char *rconn_reply_str(const struct rconn_reply *r, size_t *len)
{
    const redisReply *x = as_reply(r);
    if (x != NULL && (x->type == REDIS_REPLY_STRING || x->type == REDIS_REPLY_STATUS ||
                      x->type == REDIS_REPLY_ERROR)) {
        if (len != NULL)
            *len = (size_t)x->len;
        return x->str;
    }
    if (len != NULL)
        *len = 0;
    return "";
}

size_t rconn_reply_elements(const struct rconn_reply *r)
{
    return (r != NULL && as_reply(r)->type == REDIS_REPLY_ARRAY) ? as_reply(r)->elements : 0;
}

const struct rconn_reply *rconn_reply_element(const struct rconn_reply *r, size_t i)
{
    if (i >= rconn_reply_elements(r))
        return NULL;
    return (const struct rconn_reply *)(const void *)as_reply(r)->element[i];
}

long long rconn_reply_as_ll(const struct rconn_reply *r, long long dflt)
{
    if (r == NULL)
        return dflt;
    if (as_reply(r)->type == REDIS_REPLY_INTEGER)
        return as_reply(r)->integer;
    if (as_reply(r)->type != REDIS_REPLY_STRING || as_reply(r)->len == 0 || as_reply(r)->len > 20)
        return dflt;
    char buf[24];
    memcpy(buf, as_reply(r)->str, as_reply(r)->len);
    buf[as_reply(r)->len] = '\0';
    char *end = NULL;
    long long v = strtoll(buf, &end, 10);
    return (end != NULL && *end == '\0') ? v : dflt;
}

int rconn_key(char *buf, size_t buf_len, const char *ns, const char *suffix)
{
    int n = snprintf(buf, buf_len, "{%s}:%s", ns, suffix);
    if (n < 0 || (size_t)n >= buf_len)
        return SETTLE_ETOOBIG;
    return n;
}

static int reply_is_noscript(const redisReply *r)
{
    return r != NULL && r->type == REDIS_REPLY_ERROR && r->len >= 8 &&
           strncmp(r->str, "NOSCRIPT", 8) == 0;
}

/* ---------------------------------------------------------------------------------------------
 * Our libuv binding for hiredis' async contexts.
 *
 * hiredis ships an adapter (adapters/libuv.h), but the one in Debian 12's hiredis 0.14
 * returns early when libuv reports a socket error. libuv reports a reset or a refused
 * connect as an error and stops the poll handle, so with that adapter a connection that died
 * with writes in flight was never noticed: no disconnect callback, pending commands waiting
 * forever. This binding uses the same hooks (identical in hiredis 0.14 and 1.x) and, on an
 * error, lets hiredis read the socket, which makes it see the error and disconnect.
 *
 * Writes. hiredis asks for writability after every command it buffers and drops the request
 * once the buffer is written. Polling for it turns each burst of commands into two changes
 * of the poll handle, and libuv makes each change three epoll_ctl calls (measured: about
 * four of the worker's eight epoll_ctl calls per job). A connected socket is nearly always
 * writable, so instead the buffer is written from a prepare handle: once per loop turn, just
 * before the loop polls, so commands issued anywhere in the turn go out together and before
 * the loop can sleep. Only when the socket does not take the whole buffer (or while the
 * connection is being made) is writability polled for, as before.
 */
struct rconn_ev {
    uv_poll_t poll;
    uv_prepare_t flush;    /* writes hiredis' buffer before the loop polls */
    redisAsyncContext *ac; /* NULL once hiredis has cleaned up */
    int want;              /* UV_READABLE | UV_WRITABLE asked for by hiredis */
    int polled;            /* events the poll handle is started with */
    bool poll_writes;      /* writability is polled for, not flushed */
    bool flushing;         /* inside ev_on_flush: a write request now means "not all written" */
    int open_handles;      /* poll + flush not yet closed */
};

static void ev_on_poll(uv_poll_t *h, int status, int events)
{
    struct rconn_ev *e = h->data;
    int ev = status < 0 ? e->polled : events;
    if (e->ac != NULL && (ev & UV_READABLE))
        redisAsyncHandleRead(e->ac);
    if (e->ac != NULL && (ev & UV_WRITABLE))
        redisAsyncHandleWrite(e->ac);
    /* libuv stopped the handle on the error; if hiredis still holds the context (the read
     * found nothing to complain about), nothing would ever wake it again: drop it, which
     * fails its pending commands and runs the disconnect callback. */
    if (status < 0 && e->ac != NULL)
        redisAsyncFree(e->ac);
}

/* Starts, changes or stops the poll handle, only when its events change: each change costs
 * epoll_ctl calls. */
static void ev_update(struct rconn_ev *e)
{
    if (uv_is_closing((uv_handle_t *)&e->poll))
        return;
    int events = (e->want & UV_READABLE) | (e->poll_writes ? (e->want & UV_WRITABLE) : 0);
    if (events == e->polled)
        return;
    e->polled = events;
    if (events != 0)
        uv_poll_start(&e->poll, events, ev_on_poll);
    else
        uv_poll_stop(&e->poll);
}

/* Before the loop polls: hiredis writes what it has buffered. */
static void ev_on_flush(uv_prepare_t *h)
{
    struct rconn_ev *e = h->data;
    uv_prepare_stop(&e->flush);
    if (e->ac == NULL || !(e->want & UV_WRITABLE))
        return;
    e->flushing = true;
    redisAsyncHandleWrite(e->ac); /* may free the context (a write error): e->ac is NULL then */
    e->flushing = false;
}

static void ev_add_read(void *privdata)
{
    struct rconn_ev *e = privdata;
    e->want |= UV_READABLE;
    ev_update(e);
}

static void ev_del_read(void *privdata)
{
    struct rconn_ev *e = privdata;
    e->want &= ~UV_READABLE;
    ev_update(e);
}

static void ev_add_write(void *privdata)
{
    struct rconn_ev *e = privdata;
    e->want |= UV_WRITABLE;
    if (e->ac != NULL && (e->ac->c.flags & REDIS_CONNECTED) && !e->flushing && !e->poll_writes) {
        if (!uv_is_closing((uv_handle_t *)&e->flush))
            uv_prepare_start(&e->flush, ev_on_flush);
        return;
    }
    /* Connecting (writability says the connect finished), or a flush left bytes behind. */
    e->poll_writes = true;
    ev_update(e);
}

static void ev_del_write(void *privdata)
{
    struct rconn_ev *e = privdata;
    e->want &= ~UV_WRITABLE;
    e->poll_writes = false;
    ev_update(e);
}

static void ev_on_close(uv_handle_t *h)
{
    struct rconn_ev *e = h->data;
    if (--e->open_handles == 0)
        free(e);
}

/* hiredis is done with the context: release the handles (e is freed when both have closed). */
static void ev_cleanup(void *privdata)
{
    struct rconn_ev *e = privdata;
    e->ac = NULL;
    uv_close((uv_handle_t *)&e->poll, ev_on_close);
    uv_close((uv_handle_t *)&e->flush, ev_on_close);
}

static int ev_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    if (ac->ev.data != NULL)
        return REDIS_ERR;
    struct rconn_ev *e = calloc(1, sizeof(*e));
    if (e == NULL)
        return REDIS_ERR;
    if (uv_poll_init(loop, &e->poll, ac->c.fd) != 0) {
        free(e);
        return REDIS_ERR;
    }
    /* Cannot fail on a live loop; the poll handle is closed, and e freed, through it. */
    uv_prepare_init(loop, &e->flush);
    e->poll.data = e;
    e->flush.data = e;
    e->open_handles = 2;
    e->ac = ac;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    ac->ev.data = e;
    return REDIS_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Async connection.
 */
struct rconn {
    uv_loop_t *loop;
    redisAsyncContext *ac; /* NULL while disconnected */
    int up;                /* handshake answered: commands may be sent */
    int closing;
    struct config_redis_addr addr;
    char name[64];
    rconn_state_cb on_state;
    void *state_arg;
    uv_timer_t timer; /* reconnect back-off; its close callback frees the struct */
    uint64_t backoff_ms;
    void (*on_closed)(void *arg);
    void *closed_arg;
};

/*
 * One in-flight command. For scripts we keep a copy of the arguments so that a NOSCRIPT
 * answer (a Redis restart without persistence, or a failover to a fresh primary) can be
 * retried once with EVAL and the full source, transparently to the caller.
 */
struct pending {
    struct rconn *rc;
    rconn_cb cb;
    void *arg;
    const struct embedded_file *script; /* NULL for plain commands */
    int retried;
    int argc;    /* arguments after the script name / sha */
    char **argv; /* copies, one allocation each */
    size_t *argv_len;
};

static void schedule_reconnect(struct rconn *rc);
static void start_connect(struct rconn *rc);

static void pending_free(struct pending *p)
{
    if (p->argv != NULL) {
        for (int i = 0; i < p->argc; i++)
            free(p->argv[i]);
        free(p->argv);
        free(p->argv_len);
    }
    free(p);
}

static void set_up(struct rconn *rc, int up)
{
    if (rc->up == up)
        return;
    rc->up = up;
    if (up) {
        rc->backoff_ms = RCONN_BACKOFF_MIN_MS;
        uv_timer_stop(&rc->timer); /* the connect deadline */
    }
    if (rc->on_state != NULL && !rc->closing)
        rc->on_state(rc->state_arg, up);
}

static void on_handshake(redisAsyncContext *ac, void *r, void *privdata)
{
    struct rconn *rc = privdata;
    redisReply *reply = r;
    if (reply == NULL || rc->closing)
        return; /* the disconnect callback handles it */
    if (reply->type == REDIS_REPLY_ERROR) {
        log_write(LOG_LEVEL_ERROR, NULL, reply->str, "redis handshake failed (%s:%d)",
                  rc->addr.host, rc->addr.port);
        redisAsyncDisconnect(ac);
        return;
    }
    set_up(rc, 1);
}

static void on_handshake_step(redisAsyncContext *ac, void *r, void *privdata)
{
    struct rconn *rc = privdata;
    redisReply *reply = r;
    if (reply == NULL || rc->closing)
        return;
    if (reply->type == REDIS_REPLY_ERROR) {
        log_write(LOG_LEVEL_ERROR, NULL, reply->str, "redis handshake failed (%s:%d)",
                  rc->addr.host, rc->addr.port);
        redisAsyncDisconnect(ac);
    }
}

static void on_connect(const redisAsyncContext *cac, int status)
{
    struct rconn *rc = cac->data;
    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback returns. */
        if (rc->ac != cac)
            return; /* already given up on by the connect deadline */
        log_write(LOG_LEVEL_WARN, NULL, cac->errstr, "redis connect to %s:%d failed", rc->addr.host,
                  rc->addr.port);
        rc->ac = NULL;
        if (!rc->closing)
            schedule_reconnect(rc);
        return;
    }
    log_write(LOG_LEVEL_INFO, NULL, NULL, "redis connected to %s:%d (%s)", rc->addr.host,
              rc->addr.port, rc->name);
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
    struct rconn *rc = cac->data;
    if (rc->ac != cac)
        return; /* a context the connect deadline already gave up on is being freed */
    rc->ac = NULL;
    set_up(rc, 0);
    if (rc->closing)
        return; /* rconn_close owns the rest of the teardown */
    log_write(LOG_LEVEL_WARN, NULL, status == REDIS_OK ? NULL : cac->errstr,
              "redis connection to %s:%d lost; reconnecting", rc->addr.host, rc->addr.port);
    schedule_reconnect(rc);
}

static void on_timer_closed(uv_handle_t *h)
{
    struct rconn *rc = h->data;
    void (*cb)(void *) = rc->on_closed;
    void *arg = rc->closed_arg;
    free(rc);
    if (cb != NULL)
        cb(arg);
}

static void on_reconnect_timer(uv_timer_t *t)
{
    start_connect(t->data);
}

/* The connect or handshake did not finish in time: drop the context and try again. */
static void on_connect_timeout(uv_timer_t *t)
{
    struct rconn *rc = t->data;
    if (rc->ac == NULL || rc->up || rc->closing)
        return;
    log_write(LOG_LEVEL_WARN, NULL, NULL, "redis connect to %s:%d timed out after %d ms",
              rc->addr.host, rc->addr.port, RCONN_CONNECT_TIMEOUT_MS);
    redisAsyncContext *ac = rc->ac;
    rc->ac = NULL;
    /* Fails the handshake callbacks; the disconnect callback runs only if the socket had
     * connected, and it finds rc->ac already cleared. */
    redisAsyncFree(ac);
    schedule_reconnect(rc);
}

static void schedule_reconnect(struct rconn *rc)
{
    uint64_t delay = rc->backoff_ms;
    rc->backoff_ms =
        rc->backoff_ms * 2 > RCONN_BACKOFF_MAX_MS ? RCONN_BACKOFF_MAX_MS : rc->backoff_ms * 2;
    uv_timer_start(&rc->timer, on_reconnect_timer, delay, 0);
}

/* Sends the handshake. Commands queue up in hiredis until the socket connects, and Redis
 * answers them in order, so the connection is "up" once the last one is answered. */
static void start_connect(struct rconn *rc)
{
    redisAsyncContext *ac = redisAsyncConnect(rc->addr.host, rc->addr.port);
    if (ac == NULL) {
        schedule_reconnect(rc);
        return;
    }
    if (ac->err) {
        log_write(LOG_LEVEL_WARN, NULL, ac->errstr, "redis connect to %s:%d failed", rc->addr.host,
                  rc->addr.port);
        redisAsyncFree(ac);
        schedule_reconnect(rc);
        return;
    }
    ac->data = rc;
    if (ev_attach(ac, rc->loop) != REDIS_OK) {
        redisAsyncFree(ac);
        schedule_reconnect(rc);
        return;
    }
    rc->ac = ac;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);

    if (rc->addr.password[0] != '\0') {
        if (rc->addr.username[0] != '\0')
            redisAsyncCommand(ac, on_handshake_step, rc, "AUTH %s %s", rc->addr.username,
                              rc->addr.password);
        else
            redisAsyncCommand(ac, on_handshake_step, rc, "AUTH %s", rc->addr.password);
    }
    if (rc->addr.db != 0)
        redisAsyncCommand(ac, on_handshake_step, rc, "SELECT %d", rc->addr.db);
    redisAsyncCommand(ac, on_handshake_step, rc, "CLIENT SETNAME %s", rc->name);
    for (const struct embedded_file *f = embedded_lua; f->name != NULL; f++)
        redisAsyncCommand(ac, on_handshake_step, rc, "SCRIPT LOAD %b", f->data, f->size_bytes);
    redisAsyncCommand(ac, on_handshake, rc, "PING");
    uv_timer_start(&rc->timer, on_connect_timeout, RCONN_CONNECT_TIMEOUT_MS, 0);
}

int rconn_create(struct rconn **out, uv_loop_t *loop, const struct config_redis_addr *addr,
                 const char *name, rconn_state_cb on_state, void *state_arg)
{
    struct rconn *rc = calloc(1, sizeof(*rc));
    if (rc == NULL)
        return SETTLE_ENOMEM;
    rc->loop = loop;
    rc->addr = *addr;
    snprintf(rc->name, sizeof(rc->name), "%s", name);
    /* CLIENT SETNAME refuses spaces; keep the name one token. */
    for (char *p = rc->name; *p != '\0'; p++) {
        if (*p == ' ' || *p == '\n' || *p == '\r')
            *p = '_';
    }
    rc->on_state = on_state;
    rc->state_arg = state_arg;
    rc->backoff_ms = RCONN_BACKOFF_MIN_MS;
    uv_timer_init(loop, &rc->timer);
    rc->timer.data = rc;
    *out = rc;
    start_connect(rc);
    return 0;
}

int rconn_is_up(const struct rconn *rc)
{
    return rc->up && !rc->closing;
}

static void on_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    struct pending *p = privdata;
    redisReply *reply = r;

    if (reply_is_noscript(reply) && p->script != NULL && !p->retried && p->rc->ac != NULL &&
        !p->rc->closing) {
        /* The server lost its script cache: send the source once; EVAL also caches it. */
        p->retried = 1;
        int argc = p->argc + 2;
        const char **argv = malloc(sizeof(*argv) * (size_t)argc);
        size_t *lens = malloc(sizeof(*lens) * (size_t)argc);
        if (argv != NULL && lens != NULL) {
            argv[0] = "EVAL";
            lens[0] = 4;
            argv[1] = p->script->data;
            lens[1] = p->script->size_bytes;
            for (int i = 0; i < p->argc; i++) {
                argv[i + 2] = p->argv[i];
                lens[i + 2] = p->argv_len[i];
            }
            int rc = redisAsyncCommandArgv(ac, on_reply, p, argc, argv, lens);
            free(argv);
            free(lens);
            if (rc == REDIS_OK)
                return;
        } else {
            free(argv);
            free(lens);
        }
    }
    if (reply == NULL)
        p->cb(p->arg, SETTLE_EIO, NULL);
    else
        p->cb(p->arg, 0, (const struct rconn_reply *)(const void *)reply);
    pending_free(p);
}

int rconn_command(struct rconn *rc, rconn_cb cb, void *arg, int argc, const char **argv,
                  const size_t *argv_len)
{
    if (!rconn_is_up(rc) || rc->ac == NULL)
        return SETTLE_EIO;
    struct pending *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return SETTLE_ENOMEM;
    p->rc = rc;
    p->cb = cb;
    p->arg = arg;
    if (redisAsyncCommandArgv(rc->ac, on_reply, p, argc, argv, argv_len) != REDIS_OK) {
        free(p);
        return SETTLE_EIO;
    }
    return 0;
}

int rconn_eval(struct rconn *rc, const char *script, int nkeys, int argc, const char **argv,
               const size_t *argv_len, rconn_cb cb, void *arg)
{
    if (!rconn_is_up(rc) || rc->ac == NULL)
        return SETTLE_EIO;
    const struct embedded_file *f = embedded_lua_get(script);
    char nkeys_buf[16];
    int nkeys_len = snprintf(nkeys_buf, sizeof(nkeys_buf), "%d", nkeys);

    struct pending *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return SETTLE_ENOMEM;
    p->rc = rc;
    p->cb = cb;
    p->arg = arg;
    p->script = f;
    /* Copy numkeys + keys + args for a possible EVAL retry. */
    p->argc = argc + 1;
    p->argv = calloc((size_t)p->argc, sizeof(*p->argv));
    p->argv_len = calloc((size_t)p->argc, sizeof(*p->argv_len));
    const char **send = malloc(sizeof(*send) * (size_t)(argc + 3));
    size_t *send_len = malloc(sizeof(*send_len) * (size_t)(argc + 3));
    int ret = SETTLE_ENOMEM;
    if (p->argv == NULL || p->argv_len == NULL || send == NULL || send_len == NULL)
        goto fail;
    p->argv[0] = malloc((size_t)nkeys_len + 1);
    if (p->argv[0] == NULL)
        goto fail;
    memcpy(p->argv[0], nkeys_buf, (size_t)nkeys_len + 1);
    p->argv_len[0] = (size_t)nkeys_len;
    for (int i = 0; i < argc; i++) {
        size_t len = argv_len != NULL ? argv_len[i] : strlen(argv[i]);
        p->argv[i + 1] = malloc(len + 1);
        if (p->argv[i + 1] == NULL)
            goto fail;
        memcpy(p->argv[i + 1], argv[i], len);
        p->argv[i + 1][len] = '\0';
        p->argv_len[i + 1] = len;
    }
    send[0] = "EVALSHA";
    send_len[0] = 7;
    send[1] = f->sha1;
    send_len[1] = 40;
    for (int i = 0; i < p->argc; i++) {
        send[i + 2] = p->argv[i];
        send_len[i + 2] = p->argv_len[i];
    }
    ret = SETTLE_EIO;
    if (redisAsyncCommandArgv(rc->ac, on_reply, p, p->argc + 2, send, send_len) != REDIS_OK)
        goto fail;
    free(send);
    free(send_len);
    return 0;
fail:
    free(send);
    free(send_len);
    pending_free(p);
    return ret;
}

void rconn_close(struct rconn *rc, void (*on_closed)(void *arg), void *arg)
{
    rc->closing = 1;
    rc->up = 0;
    rc->on_closed = on_closed;
    rc->closed_arg = arg;
    uv_timer_stop(&rc->timer);
    if (rc->ac != NULL) {
        /* redisAsyncFree fails pending callbacks with NULL replies (they see SETTLE_EIO) and
         * runs the disconnect callback; the adapter closes its poll handle by itself. */
        redisAsyncContext *ac = rc->ac;
        rc->ac = NULL;
        redisAsyncFree(ac);
    }
    /* The timer is the last handle we own: the struct is freed in its close callback. */
    uv_close((uv_handle_t *)&rc->timer, on_timer_closed);
}

/* ---------------------------------------------------------------------------------------------
 * Sync connection.
 */
struct rconn_sync {
    redisContext *c;
};

static int sync_simple(redisContext *c, char *err, size_t err_len, const char *what, int argc,
                       const char **argv)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    if (r == NULL) {
        snprintf(err, err_len, "redis %s failed: %s", what, c->errstr);
        return SETTLE_EIO;
    }
    int ret = 0;
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(err, err_len, "redis %s refused: %s", what, r->str);
        ret = SETTLE_EREJECTED;
    }
    freeReplyObject(r);
    return ret;
}

int rconn_sync_open(struct rconn_sync **out, const struct config_redis_addr *addr,
                    uint64_t timeout_ms, char *err, size_t err_len)
{
    struct timeval tv = {.tv_sec = (time_t)(timeout_ms / 1000),
                         .tv_usec = (suseconds_t)((timeout_ms % 1000) * 1000)};
    redisContext *c = redisConnectWithTimeout(addr->host, addr->port, tv);
    if (c == NULL) {
        snprintf(err, err_len, "redis connect to %s:%d failed: out of memory", addr->host,
                 addr->port);
        return SETTLE_ENOMEM;
    }
    if (c->err) {
        snprintf(err, err_len, "redis connect to %s:%d failed: %s", addr->host, addr->port,
                 c->errstr);
        redisFree(c);
        return SETTLE_EIO;
    }
    redisSetTimeout(c, tv);
    int ret = 0;
    if (addr->password[0] != '\0') {
        const char *argv[3] = {"AUTH", addr->username, addr->password};
        if (addr->username[0] != '\0')
            ret = sync_simple(c, err, err_len, "AUTH", 3, argv);
        else {
            argv[1] = addr->password;
            ret = sync_simple(c, err, err_len, "AUTH", 2, argv);
        }
    }
    if (ret == 0 && addr->db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", addr->db);
        const char *argv[2] = {"SELECT", db};
        ret = sync_simple(c, err, err_len, "SELECT", 2, argv);
    }
    if (ret != 0) {
        redisFree(c);
        return ret;
    }
    struct rconn_sync *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        redisFree(c);
        return SETTLE_ENOMEM;
    }
    s->c = c;
    *out = s;
    return 0;
}

void rconn_sync_close(struct rconn_sync *s)
{
    if (s == NULL)
        return;
    redisFree(s->c);
    free(s);
}

int rconn_sync_command(struct rconn_sync *s, struct rconn_reply **reply, int argc,
                       const char **argv, const size_t *argv_len)
{
    redisReply *r = redisCommandArgv(s->c, argc, argv, argv_len);
    if (r == NULL) {
        *reply = NULL;
        return SETTLE_EIO;
    }
    *reply = (struct rconn_reply *)(void *)r;
    return 0;
}

int rconn_sync_eval(struct rconn_sync *s, struct rconn_reply **reply, const char *script, int nkeys,
                    int argc, const char **argv, const size_t *argv_len)
{
    const struct embedded_file *f = embedded_lua_get(script);
    char nkeys_buf[16];
    snprintf(nkeys_buf, sizeof(nkeys_buf), "%d", nkeys);
    const char **send = malloc(sizeof(*send) * (size_t)(argc + 3));
    size_t *send_len = malloc(sizeof(*send_len) * (size_t)(argc + 3));
    int ret = SETTLE_ENOMEM;
    *reply = NULL;
    if (send == NULL || send_len == NULL)
        goto out;
    send[0] = "EVALSHA";
    send_len[0] = 7;
    send[1] = f->sha1;
    send_len[1] = 40;
    send[2] = nkeys_buf;
    send_len[2] = strlen(nkeys_buf);
    for (int i = 0; i < argc; i++) {
        send[i + 3] = argv[i];
        send_len[i + 3] = argv_len != NULL ? argv_len[i] : strlen(argv[i]);
    }
    ret = rconn_sync_command(s, reply, argc + 3, send, send_len);
    if (ret == 0 && reply_is_noscript((redisReply *)(void *)*reply)) {
        rconn_sync_free(*reply);
        send[0] = "EVAL";
        send_len[0] = 4;
        send[1] = f->data;
        send_len[1] = f->size_bytes;
        ret = rconn_sync_command(s, reply, argc + 3, send, send_len);
    }
out:
    free(send);
    free(send_len);
    return ret;
}

void rconn_sync_free(struct rconn_reply *reply)
{
    if (reply != NULL)
        freeReplyObject((redisReply *)(void *)reply);
}
