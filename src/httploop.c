/*
 * httploop.c - libcurl's multi interface on a libuv loop (curl_multi_socket_action).
 *
 * curl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION) and when to wake it up
 * (CURLMOPT_TIMERFUNCTION); we watch them with one uv_poll per socket and one uv_timer, and
 * hand every event back with curl_multi_socket_action. Finished transfers are collected with
 * curl_multi_info_read after each action and their callbacks run from there, on the loop.
 * Each transfer's callback and argument live in a small record reached via CURLOPT_PRIVATE.
 *
 * Sockets outlive transfers. curl stops watching a connection's socket when a transfer ends
 * and watches it again when the next transfer reuses the connection; following that with
 * uv_poll_stop/uv_poll_start (or closing the poll handle) cost three epoll_ctl calls each way
 * per request. Instead a socket curl no longer watches stays "parked": its poll handle keeps
 * watching for input, so reusing the connection changes nothing. An idle connection has no
 * input; if one arrives anyway (the server closed it), the parked handle stops until curl
 * wants the socket again. The handle is closed when curl closes the socket
 * (CURLOPT_CLOSESOCKETFUNCTION), before the descriptor is, so a new socket given the same
 * number never meets a stale handle.
 */
#include "settle/httploop.h"
#include "settle/error.h"

#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

/* Idle connections kept for reuse (one per transfer that may be in flight at once). */
#define HTTPLOOP_CONNECTIONS_MAX 1024
/* Sockets are found by descriptor in an array that grows to the highest one seen. */
#define HTTPLOOP_FD_TABLE_MIN 64

struct httploop {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    unsigned active;
    unsigned open_handles; /* timer + polls not yet closed */
    /* Open sockets by descriptor (those curl did not close are closed at httploop_close). */
    struct hl_socket **by_fd;
    size_t by_fd_len;
    bool closing;
    bool dispatching; /* inside dispatch: transfers' callbacks may be running */
    bool added;       /* a transfer was added while dispatching */
    void (*on_closed)(void *arg);
    void *closed_arg;
};

/* One watched socket. */
struct hl_socket {
    uv_poll_t poll; /* first: the close callback frees the record through it */
    struct httploop *hl;
    curl_socket_t fd;
    int events;   /* the poll handle's events; 0 = stopped */
    bool watched; /* curl watches it (false: parked between transfers) */
};

/* One transfer in progress. */
struct hl_transfer {
    httploop_done_cb cb;
    void *arg;
};

static void handle_closed(uv_handle_t *h)
{
    struct httploop *hl = h->data;
    if (h->type == UV_POLL)
        free(h); /* the struct hl_socket it starts */
    hl->open_handles--;
    if (hl->closing && hl->open_handles == 0) {
        void (*cb)(void *) = hl->on_closed;
        void *arg = hl->closed_arg;
        free(hl->by_fd);
        free(hl);
        if (cb != NULL)
            cb(arg);
    }
}

/* Runs the callbacks of every transfer curl reports finished. */
static void collect(struct httploop *hl)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(hl->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        CURLcode result = msg->data.result;
        struct hl_transfer *t = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&t);
        curl_multi_remove_handle(hl->multi, easy);
        curl_easy_setopt(easy, CURLOPT_PRIVATE, (void *)NULL);
        /* The handle may next run elsewhere (curl_easy_perform on a pool thread); the
         * connections it opens there are not ours. Ours keep the function they were made
         * with. */
        curl_easy_setopt(easy, CURLOPT_CLOSESOCKETFUNCTION, (curl_closesocket_callback)NULL);
        curl_easy_setopt(easy, CURLOPT_CLOSESOCKETDATA, (void *)NULL);
        hl->active--;
        if (t != NULL) {
            httploop_done_cb cb = t->cb;
            void *arg = t->arg;
            free(t);
            cb(arg, easy, result);
        }
    }
}

/* Rounds of "start what the callbacks added" per event; see dispatch. */
#define HTTPLOOP_RESTART_ROUNDS 4

/*
 * Hands one event to curl and runs the callbacks of the transfers it finished. A callback
 * often adds the next transfer (a worker hands a freed PG query slot to a waiting job); that
 * transfer is started here, before returning to the loop, instead of on the 0 ms timer curl
 * arms, which fires only after everything else this loop turn has to do. The answer's time at
 * the PG counts from the sending, so that wait was part of every query slot's time. Bounded,
 * so that transfers failing at once cannot keep the loop here; what is left starts on the
 * timer as before. Callbacks still never run inside httploop_add.
 */
static void dispatch(struct httploop *hl, curl_socket_t fd, int flags)
{
    int running = 0;
    hl->dispatching = true;
    hl->added = false;
    curl_multi_socket_action(hl->multi, fd, flags, &running);
    collect(hl);
    for (int round = 0; round < HTTPLOOP_RESTART_ROUNDS && hl->added && !hl->closing; round++) {
        hl->added = false;
        curl_multi_socket_action(hl->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        collect(hl);
    }
    hl->dispatching = false;
}

static void on_poll(uv_poll_t *p, int status, int events);

/* Starts, changes or stops s's poll handle, only when its events change. */
static int socket_poll(struct hl_socket *s, int events)
{
    if (events == s->events)
        return 0;
    int rc = events != 0 ? uv_poll_start(&s->poll, events, on_poll) : uv_poll_stop(&s->poll);
    s->events = rc == 0 ? events : 0;
    return rc;
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    struct hl_socket *s = (struct hl_socket *)p;
    struct httploop *hl = s->hl;
    if (!s->watched) {
        /* Parked and yet readable: the server closed the idle connection (or sent what it
         * should not). curl finds out when it next checks the connection; until then stop
         * watching it, or the loop would spin on it. */
        socket_poll(s, 0);
        return;
    }
    int flags = 0;
    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    dispatch(hl, s->fd, flags);
}

static void on_timer(uv_timer_t *t)
{
    dispatch(t->data, CURL_SOCKET_TIMEOUT, 0);
}

/* CURLMOPT_TIMERFUNCTION: -1 stops the timer; 0 means "as soon as possible", which must not
 * be a call from inside curl, so it becomes a timer firing on the next loop turn. */
static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    struct httploop *hl = userp;
    (void)multi;
    if (timeout_ms < 0)
        uv_timer_stop(&hl->timer);
    else
        uv_timer_start(&hl->timer, on_timer, (uint64_t)timeout_ms, 0);
    return 0;
}

/* Stops watching s and closes its poll handle (freed in handle_closed). */
static void socket_close(struct httploop *hl, struct hl_socket *s)
{
    hl->by_fd[s->fd] = NULL;
    uv_poll_stop(&s->poll);
    uv_close((uv_handle_t *)&s->poll, handle_closed);
}

/* The open socket with descriptor fd, or NULL. */
static struct hl_socket *socket_find(const struct httploop *hl, curl_socket_t fd)
{
    return fd >= 0 && (size_t)fd < hl->by_fd_len ? hl->by_fd[fd] : NULL;
}

/* A record and poll handle for a socket curl wants watched for the first time. */
static struct hl_socket *socket_open(struct httploop *hl, curl_socket_t fd)
{
    if (fd < 0)
        return NULL;
    if ((size_t)fd >= hl->by_fd_len) {
        size_t len = hl->by_fd_len > 0 ? hl->by_fd_len : HTTPLOOP_FD_TABLE_MIN;
        while (len <= (size_t)fd)
            len *= 2;
        struct hl_socket **t = realloc(hl->by_fd, len * sizeof(*t));
        if (t == NULL)
            return NULL;
        for (size_t i = hl->by_fd_len; i < len; i++)
            t[i] = NULL;
        hl->by_fd = t;
        hl->by_fd_len = len;
    }
    struct hl_socket *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->hl = hl;
    s->fd = fd;
    if (uv_poll_init_socket(hl->loop, &s->poll, fd) != 0) {
        free(s);
        return NULL;
    }
    s->poll.data = hl;
    hl->open_handles++;
    hl->by_fd[fd] = s;
    return s;
}

/* CURLMOPT_SOCKETFUNCTION: start, change or stop watching one socket. */
static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct httploop *hl = userp;
    struct hl_socket *s = socketp != NULL ? socketp : socket_find(hl, fd);
    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        /* Parked: the poll handle stays as it is for the connection's next transfer. */
        if (s != NULL) {
            s->watched = false;
            if (!hl->closing)
                curl_multi_assign(hl->multi, fd, NULL);
        }
        return 0;
    }
    if (s == NULL && (s = socket_open(hl, fd)) == NULL)
        return -1;
    if (!s->watched) {
        s->watched = true;
        curl_multi_assign(hl->multi, fd, s);
    }
    int events = 0;
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
        events |= UV_READABLE;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
        events |= UV_WRITABLE;
    return socket_poll(s, events) == 0 ? 0 : -1;
}

/* CURLOPT_CLOSESOCKETFUNCTION: curl is done with a connection. Its poll handle goes first
 * (libuv takes the descriptor out of epoll), then the descriptor. */
static int on_curl_close_socket(void *clientp, curl_socket_t fd)
{
    struct httploop *hl = clientp;
    struct hl_socket *s = socket_find(hl, fd);
    if (s != NULL)
        socket_close(hl, s);
    return close(fd);
}

int httploop_create(struct httploop **out, uv_loop_t *loop)
{
    struct httploop *hl = calloc(1, sizeof(*hl));
    *out = NULL;
    if (hl == NULL)
        return SETTLE_ENOMEM;
    hl->loop = loop;
    hl->multi = curl_multi_init();
    if (hl->multi == NULL || uv_timer_init(loop, &hl->timer) != 0) {
        if (hl->multi != NULL)
            curl_multi_cleanup(hl->multi);
        free(hl);
        return SETTLE_EINTERNAL;
    }
    hl->timer.data = hl;
    hl->open_handles = 1;
    curl_multi_setopt(hl->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(hl->multi, CURLMOPT_SOCKETDATA, hl);
    curl_multi_setopt(hl->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(hl->multi, CURLMOPT_TIMERDATA, hl);
    /* Idle connections stay cached in the multi handle for the next transfers. curl's own
     * default sizes the cache by the transfers added at the moment, so it shrinks as they
     * finish and closes connections that the next burst must open again. */
    curl_multi_setopt(hl->multi, CURLMOPT_MAXCONNECTS, (long)HTTPLOOP_CONNECTIONS_MAX);
    *out = hl;
    return 0;
}

int httploop_add(struct httploop *hl, CURL *easy, httploop_done_cb cb, void *arg)
{
    struct hl_transfer *t = malloc(sizeof(*t));
    if (t == NULL)
        return SETTLE_ENOMEM;
    t->cb = cb;
    t->arg = arg;
    curl_easy_setopt(easy, CURLOPT_PRIVATE, (void *)t);
    /* Connections this transfer opens are closed through us (see the top of the file). */
    curl_easy_setopt(easy, CURLOPT_CLOSESOCKETFUNCTION, on_curl_close_socket);
    curl_easy_setopt(easy, CURLOPT_CLOSESOCKETDATA, (void *)hl);
    /* curl_multi_add_handle only arms the timer (0 ms); the transfer starts on the next loop
     * turn, so cb can never run inside this call. */
    if (curl_multi_add_handle(hl->multi, easy) != CURLM_OK) {
        curl_easy_setopt(easy, CURLOPT_PRIVATE, (void *)NULL);
        free(t);
        return SETTLE_EINTERNAL;
    }
    hl->active++;
    if (hl->dispatching)
        hl->added = true;
    return 0;
}

unsigned httploop_active(const struct httploop *hl)
{
    return hl->active;
}

void httploop_close(struct httploop *hl, void (*on_closed)(void *arg), void *arg)
{
    hl->closing = true;
    hl->on_closed = on_closed;
    hl->closed_arg = arg;
    /* Closes cached connections; their sockets' polls are closed from on_curl_close_socket,
     * and any socket still open after that here. */
    curl_multi_cleanup(hl->multi);
    hl->multi = NULL;
    for (size_t fd = 0; fd < hl->by_fd_len; fd++) {
        if (hl->by_fd[fd] != NULL)
            socket_close(hl, hl->by_fd[fd]);
    }
    uv_timer_stop(&hl->timer);
    uv_close((uv_handle_t *)&hl->timer, handle_closed);
}
