/*
 * httploop.h - libcurl's multi interface driven by a libuv loop: many HTTP transfers on the
 * loop thread, no thread per request.
 *
 * Thread: everything on the loop thread. The module watches curl's sockets with uv_poll
 * handles and its timeouts with one uv_timer, and calls each transfer's callback on the loop
 * when the transfer ends (done, failed or timed out: curl's own CURLOPT_TIMEOUT_MS applies).
 * Owns: the multi handle, the timer and the poll handles; never the easy handles, which the
 * caller sets up before httploop_add and gets back, detached, in its callback.
 */
#ifndef SETTLE_HTTPLOOP_H
#define SETTLE_HTTPLOOP_H

#include <curl/curl.h>
#include <uv.h>

struct httploop;

/* A transfer ended; result is curl's (CURLE_OK: an answer arrived, whatever its status). The
 * easy handle is no longer in the multi handle and may be reused or added again. */
typedef void (*httploop_done_cb)(void *arg, CURL *easy, CURLcode result);

/* 0, SETTLE_ENOMEM or SETTLE_EINTERNAL (curl or libuv refused). */
int httploop_create(struct httploop **out, uv_loop_t *loop);

/* Starts the transfer easy (options set, CURLOPT_PRIVATE unused by the caller); cb runs on a
 * later loop turn, never from inside this call. 0, or SETTLE_EINTERNAL when curl refused it
 * (cb will not run). */
int httploop_add(struct httploop *hl, CURL *easy, httploop_done_cb cb, void *arg);

/* Transfers in progress. */
unsigned httploop_active(const struct httploop *hl);

/* Frees everything once no transfer is in progress; on_closed(arg) runs when the last libuv
 * handle has closed (the loop must keep running until then). */
void httploop_close(struct httploop *hl, void (*on_closed)(void *arg), void *arg);

#endif
