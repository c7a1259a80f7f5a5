/*
 * gateway.h - the payment gateway (PG) client: libcurl calls and outcome classification.
 *
 * The PG API is the one of seed 001 (the Loopers PG simulator):
 *   GET  /api/v1/payments/{transactionKey}            header X-USER-ID
 *   GET  /api/v1/payments?orderId=...                 header X-USER-ID
 *   POST /api/v1/payments/{transactionKey}/cancel      headers X-USER-ID, Idempotency-Key
 *   GET  /api/v1/payments?from=&to=&page=&size=        the merchant's paged list (seed 004)
 * Answers are wrapped: {"meta":{"result":"SUCCESS"|"FAIL","errorCode":..,"message":..},
 * "data":{...}}. We branch on the HTTP status and meta.result, never on errorCode text.
 *
 * Threads: gateway_create/gateway_destroy on the loop thread (destroy only after every work
 * function and loop call has ended). gateway_query_status_start runs on the loop thread and
 * never blocks (see httploop.h). The *_work functions block and run only on uv pool threads; each
 * borrows one CURL easy handle from a bounded internal pool (one handle per thread at a
 * time, CURLOPT_NOSIGNAL, connect and total timeouts, body capped at body_max_bytes) and
 * touches nothing but its arguments. gateway_parse_* and gateway_classify are pure.
 */
#ifndef SETTLE_GATEWAY_H
#define SETTLE_GATEWAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "settle/job.h"

#define GATEWAY_ERROR_MAX 256

/* How one call ended, from the caller's point of view. */
enum gateway_outcome {
    GATEWAY_OK = 0,           /* 2xx with meta.result SUCCESS and a well-formed body */
    GATEWAY_NOT_FOUND = 1,    /* 404: no such transaction (or none for that order) */
    GATEWAY_TRANSIENT = 2,    /* transport error, timeout, 5xx, 429: retry with backoff */
    GATEWAY_REJECTED = 3,     /* any other 4xx, or 2xx with meta.result FAIL: do not retry */
    GATEWAY_BAD_RESPONSE = 4, /* 2xx whose body is not the documented shape */
};

enum gateway_tx_status {
    GATEWAY_TX_UNKNOWN = 0,
    GATEWAY_TX_PENDING = 1,
    GATEWAY_TX_SUCCESS = 2,
    GATEWAY_TX_FAILED = 3,
    GATEWAY_TX_CANCELLED = 4,           /* fully cancelled/refunded */
    GATEWAY_TX_PARTIALLY_CANCELLED = 5, /* some amount refunded, balance left */
};

struct gateway_tx {
    char transaction_key[JOB_ID_MAX + 1];
    char order_id[JOB_ID_MAX + 1];
    int64_t amount_minor;
    enum gateway_tx_status status;
    char reason[JOB_REASON_MAX + 1];
    char card_type[32];
    char card_no_masked[32]; /* only the last 4 digits survive parsing */
    /* Cancel answers (and GET of a cancelled payment) only; -1 when absent. */
    int64_t cancelled_minor;
    int64_t balance_minor;
};

struct gateway_result {
    enum gateway_outcome outcome;
    long http_status;        /* 0 when no HTTP answer arrived */
    bool breaker_failure;    /* true for transport errors, timeouts and 5xx */
    bool request_sent;       /* false when the failure happened before sending (connect) */
    uint64_t retry_after_ms; /* from a Retry-After header (seconds form), else 0 */
    uint64_t latency_us;
    struct gateway_tx tx;          /* valid when outcome == GATEWAY_OK */
    char error[GATEWAY_ERROR_MAX]; /* one sentence when outcome != GATEWAY_OK */
};

struct gateway_config {
    const char *base_url; /* copied */
    uint64_t connect_timeout_ms;
    uint64_t timeout_ms;
    uint64_t body_max_bytes;
    unsigned max_handles; /* size of the easy-handle pool (= concurrency) */
};

struct gateway;

/* Loop thread. Calls curl_global_init once per process. 0, SETTLE_ENOMEM, SETTLE_EINVAL. */
int gateway_create(struct gateway **out, const struct gateway_config *cfg);
/* Loop thread, after all work has finished. NULL is a no-op. */
void gateway_destroy(struct gateway *g);

/*
 * Pool thread. Looks a payment up by transaction key when transaction_key is non-empty,
 * else by order id (the orderId list: if any transaction is SUCCESS that one is reported,
 * else any PENDING one, else the newest). Always fills *out.
 */
void gateway_query_status_work(struct gateway *g, const char *user_id, const char *transaction_key,
                               const char *order_id, struct gateway_result *out);

struct httploop;

/* The loop version's completion: *out (given to the start call) is final. */
typedef void (*gateway_call_cb)(void *arg);

/*
 * Loop thread. The same query as gateway_query_status_work, driven by hl (libcurl's multi
 * interface on the loop: no thread per request). Returns 0 when the query is in flight (done
 * runs later, on the loop, with *out final), or 1 when it ended at once (input refused, no
 * free handle, out of memory: *out says why, done does not run). Never blocks.
 */
int gateway_query_status_start(struct gateway *g, struct httploop *hl, const char *user_id,
                               const char *transaction_key, const char *order_id,
                               struct gateway_result *out, gateway_call_cb done, void *arg);

/*
 * Pool thread. Asks the PG to cancel (refund) amount_minor of a payment (amount_minor <= 0:
 * the whole balance) under idempotency_key. Always fills *out.
 */
void gateway_cancel_work(struct gateway *g, const char *user_id, const char *transaction_key,
                         const char *idempotency_key, int64_t amount_minor, const char *reason,
                         struct gateway_result *out);

/* --- The merchant's paged payment list (the PG orphan sweep, seed 004) --- */

#define GATEWAY_PAGE_SIZE_MAX 1000

/* One element of the list. */
struct gateway_payment {
    char transaction_key[JOB_ID_MAX + 1];
    char order_id[JOB_ID_MAX + 1];
    char user_id[JOB_ID_MAX + 1]; /* "" when the PG did not say */
    enum gateway_tx_status status;
    int64_t amount_minor;    /* > 0 */
    int64_t created_ms;      /* epoch ms, -1 when absent */
    int64_t cancelled_minor; /* -1 when absent */
    int64_t balance_minor;   /* -1 when absent */
};

/* One page: data {page, size, totalPages, totalElements, payments: [...]}. */
struct gateway_page {
    int64_t page; /* 0-based */
    int64_t size;
    int64_t total_pages;
    int64_t total_elements;
    size_t n;
    struct gateway_payment *items; /* malloc'd, n entries (NULL when n == 0) */
};

/* Frees p->items and zeroes *p. NULL and a zeroed page are fine. */
void gateway_page_free(struct gateway_page *p);

/*
 * Pure: parses a 2xx body of the paged list into *out (items malloc'd: gateway_page_free).
 * Every element is validated (transactionKey, orderId, status, amount required; ids 1..128
 * bytes without control characters; userId, createdAt, cancelledAmount, balanceAmount
 * optional); a page holds at most size <= GATEWAY_PAGE_SIZE_MAX elements. 0, SETTLE_EPARSE
 * (why explains), SETTLE_EREJECTED (meta.result FAIL), SETTLE_ENOMEM. On error *out is
 * zeroed.
 */
int gateway_parse_payment_page(const char *body, size_t len, struct gateway_page *out, char *why,
                               size_t why_len);

/*
 * Pool thread (or any thread but the loop's: it blocks). GET
 * /api/v1/payments?from=from_ms&to=to_ms&page=page&size=size (created in [from, to), oldest
 * first), without X-USER-ID: the merchant's view. Always fills *res; on GATEWAY_OK *out
 * holds the page (caller frees with gateway_page_free), else *out is zeroed. An answer for
 * another page than asked is GATEWAY_BAD_RESPONSE. Safe to call from several threads at once
 * (each borrows its own easy handle).
 */
void gateway_list_payments_work(struct gateway *g, int64_t from_ms, int64_t to_ms, int64_t page,
                                unsigned size, struct gateway_page *out,
                                struct gateway_result *res);

/* Pure: parses a 2xx body of GET /payments/{key} (or a cancel answer) into *tx. 0 or
 * SETTLE_EPARSE (why explains) or SETTLE_EREJECTED (meta.result FAIL; why has the message). */
int gateway_parse_transaction(const char *body, size_t len, struct gateway_tx *tx, char *why,
                              size_t why_len);

/* Pure: parses a 2xx body of GET /payments?orderId= and picks the transaction as described
 * for gateway_query_status_work. 0, SETTLE_EPARSE, SETTLE_EREJECTED, SETTLE_ENOTFOUND (empty). */
int gateway_parse_order_transactions(const char *body, size_t len, struct gateway_tx *tx, char *why,
                                     size_t why_len);

/* Pure: the outcome for a transport result. transport_ok is false for connection errors
 * and timeouts (then http_status is ignored). */
enum gateway_outcome gateway_classify(bool transport_ok, long http_status);

const char *gateway_outcome_name(enum gateway_outcome o);
/* Pure: the metrics class of a finished call: "2xx", "404", "4xx", "429", "5xx", "timeout",
 * "transport" or "bad_response" (settle_gateway_requests_total's class label). */
const char *gateway_result_class(const struct gateway_result *r);
const char *gateway_tx_status_name(enum gateway_tx_status s);

#endif
