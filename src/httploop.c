/*
 * httploop.c - libcurl's multi interface on a libuv loop (curl_multi_socket_action).
 *
 * curl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION) and when to wake it up
 * (CURLMOPT_TIMERFUNCTION); we watch them with one uv_poll per socket and one uv_timer, and
 * hand every event back with curl_multi_socket_action. Finished transfers are collected with
 * curl_multi_info_read after each action and their callbacks run from there, on the loop.
 * Each transfer's callback and argument live in a small record reached via CURLOPT_PRIVATE.
 */
#include "settle/httploop.h"
#include "settle/error.h"

#include <stdbool.h>
#include <stdlib.h>

/* Idle connections kept for reuse (one per transfer that may be in flight at once). */
#define HTTPLOOP_CONNECTIONS_MAX 1024

struct httploop {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    unsigned active;
    unsigned open_handles;     /* timer + polls not yet closed */
    struct hl_socket *sockets; /* watched sockets (closed at httploop_close if curl did not) */
    bool closing;
    void (*on_closed)(void *arg);
    void *closed_arg;
};

/* One watched socket. */
struct hl_socket {
    uv_poll_t poll; /* first: the close callback frees the record through it */
    struct httploop *hl;
    struct hl_socket *prev, *next;
    curl_socket_t fd;
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
        hl->active--;
        if (t != NULL) {
            httploop_done_cb cb = t->cb;
            void *arg = t->arg;
            free(t);
            cb(arg, easy, result);
        }
    }
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    struct hl_socket *s = (struct hl_socket *)p;
    struct httploop *hl = s->hl;
    int flags = 0, running = 0;
    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(hl->multi, s->fd, flags, &running);
    collect(hl);
}

static void on_timer(uv_timer_t *t)
{
    struct httploop *hl = t->data;
    int running = 0;
    curl_multi_socket_action(hl->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    collect(hl);
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
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        hl->sockets = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    uv_poll_stop(&s->poll);
    uv_close((uv_handle_t *)&s->poll, handle_closed);
}

/* CURLMOPT_SOCKETFUNCTION: start, change or stop watching one socket. */
static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct httploop *hl = userp;
    struct hl_socket *s = socketp;
    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            if (!hl->closing)
                curl_multi_assign(hl->multi, fd, NULL);
            socket_close(hl, s);
        }
        return 0;
    }
    if (s == NULL) {
        s = calloc(1, sizeof(*s));
        if (s == NULL)
            return -1;
        s->hl = hl;
        s->fd = fd;
        if (uv_poll_init_socket(hl->loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        s->poll.data = hl;
        hl->open_handles++;
        s->next = hl->sockets;
        if (hl->sockets != NULL)
            hl->sockets->prev = s;
        hl->sockets = s;
        curl_multi_assign(hl->multi, fd, s);
    }
    int events = 0;
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
        events |= UV_READABLE;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
        events |= UV_WRITABLE;
    return uv_poll_start(&s->poll, events, on_poll) == 0 ? 0 : -1;
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
    /* curl_multi_add_handle only arms the timer (0 ms); the transfer starts on the next loop
     * turn, so cb can never run inside this call. */
    if (curl_multi_add_handle(hl->multi, easy) != CURLM_OK) {
        curl_easy_setopt(easy, CURLOPT_PRIVATE, (void *)NULL);
        free(t);
        return SETTLE_EINTERNAL;
    }
    hl->active++;
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
    /* Closes cached connections; their sockets' polls are closed from on_curl_socket. */
    curl_multi_cleanup(hl->multi);
    hl->multi = NULL;
    while (hl->sockets != NULL)
        socket_close(hl, hl->sockets);
    uv_timer_stop(&hl->timer);
    uv_close((uv_handle_t *)&hl->timer, handle_closed);
}
