/*
 * pgsim_int.h - module-private pieces of the PG simulator shared by pgsim.c (HTTP, faults,
 * flags) and pgsim_store.c (the transaction store and the request log).
 *
 * Threads: none of these functions lock. Every caller holds the simulator's single state
 * mutex (struct pgsim.lock in pgsim.c) around every call and around every access to the
 * structs below, and never sleeps while holding it.
 * Ownership: the store owns every struct pgsim_txn inserted into it (and the strings and
 * idempotency records hanging off it); the request log owns the strings of its entries.
 */
#ifndef SETTLE_PGSIM_INT_H
#define SETTLE_PGSIM_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Bounds on what a client may store through the API (bytes, without the terminating NUL). */
#define PGSIM_ID_MAX 128         /* user id, order id, transaction key, idempotency key */
#define PGSIM_REASON_MAX 256     /* cancel / failure reason */
#define PGSIM_URL_MAX 2048       /* callbackUrl */
#define PGSIM_IDEM_PER_TXN 256   /* idempotency records kept per transaction */
#define PGSIM_LOG_FIELD_MAX 1024 /* path / query kept per request-log entry */

/* Payment states. PENDING becomes final_status lazily once final_at_ms has passed. */
enum pgsim_status {
    PGSIM_PENDING = 0,
    PGSIM_SUCCESS = 1,
    PGSIM_FAILED = 2,
    PGSIM_PARTIALLY_CANCELLED = 3,
    PGSIM_CANCELLED = 4,
};

/* The first answer given to one Idempotency-Key of a cancel, replayed on every retry. */
struct pgsim_idem {
    struct pgsim_idem *next;
    char *key;
    int64_t req_amount; /* the amount asked for, -1 when omitted (to detect a reused key) */
    unsigned http_status;
    char *body; /* the JSON text sent the first time */
};

struct pgsim_txn {
    struct pgsim_txn *next_by_key;   /* chain in the key index */
    struct pgsim_txn *next_by_order; /* chain in the order index */
    char *key;
    char *user_id;
    char *order_id;
    char *card_type;
    char *card_no;
    char *callback_url;  /* may be NULL; stored only, the simulator never calls it */
    char *reason;        /* current reason, NULL when none */
    char *final_reason;  /* reason applied when a PENDING payment becomes final, may be NULL */
    char *cancel_reason; /* reason given with the last effective cancel, may be NULL */
    enum pgsim_status status;
    enum pgsim_status final_status;
    int64_t amount;
    int64_t cancelled_amount;
    int64_t created_ms;  /* epoch ms */
    int64_t final_at_ms; /* epoch ms; INT64_MAX = stays PENDING */
    uint64_t seq;        /* insertion order, breaks createdAt ties for "newest first" */
    unsigned cancel_effects;
    unsigned idem_count;
    struct pgsim_idem *idems;
};

struct pgsim_store {
    struct pgsim_txn **by_key;   /* nbuckets chains, FNV-1a of the key */
    struct pgsim_txn **by_order; /* nbuckets chains, FNV-1a of the order id */
    size_t nbuckets;             /* power of two */
    struct pgsim_txn **by_time;  /* sorted by (created_ms, key) */
    size_t count;
    size_t cap;
    size_t max_count;
    uint64_t next_seq;
};

/* 0 or SETTLE_ENOMEM. */
int pgsim_store_init(struct pgsim_store *s, size_t max_count);
/* Frees every transaction; the store stays usable. */
void pgsim_store_clear(struct pgsim_store *s);
void pgsim_store_free(struct pgsim_store *s);
struct pgsim_txn *pgsim_store_find(const struct pgsim_store *s, const char *key);
/* Takes ownership of t on success (0). SETTLE_EFULL at max_count, SETTLE_ECONFLICT when the
 * key exists, SETTLE_ENOMEM; on error the caller still owns t. */
int pgsim_store_insert(struct pgsim_store *s, struct pgsim_txn *t);
/* The transactions of (user_id, order_id), newest first (createdAt, then insertion order).
 * *out is malloc'ed (NULL when none). Returns the count, or SETTLE_ENOMEM. */
long pgsim_store_by_order(const struct pgsim_store *s, const char *user_id, const char *order_id,
                          struct pgsim_txn ***out);
/* Index range [*lo, *hi) of by_time holding created_ms in [from_ms, to_ms). */
void pgsim_store_range(const struct pgsim_store *s, int64_t from_ms, int64_t to_ms, size_t *lo,
                       size_t *hi);

/* A zeroed transaction (final_at_ms = INT64_MAX), or NULL. */
struct pgsim_txn *pgsim_txn_new(void);
void pgsim_txn_free(struct pgsim_txn *t);
/* Applies the drawn final status when its time has come (lazy: there are no timers). */
void pgsim_txn_settle(struct pgsim_txn *t, int64_t now_ms);
/* The amount still captured: amount - cancelled for SUCCESS and cancelled states, else 0. */
int64_t pgsim_txn_balance(const struct pgsim_txn *t);
struct pgsim_idem *pgsim_txn_find_idem(const struct pgsim_txn *t, const char *key);
const char *pgsim_status_name(enum pgsim_status st);

/* How an API request was answered. */
enum pgsim_fault {
    PGSIM_FAULT_NONE = 0,
    PGSIM_FAULT_FAIL = 1,
    PGSIM_FAULT_SLOW = 2,
    PGSIM_FAULT_INJECT = 3,
};
#define PGSIM_FAULT_COUNT 4
const char *pgsim_fault_name(enum pgsim_fault f);

struct pgsim_logent {
    uint64_t seq;
    int64_t ts_ms;
    char method[8];
    char *path;
    char *query;           /* NULL when the URI had none */
    char *user_id;         /* NULL when absent */
    char *idempotency_key; /* NULL when absent */
    unsigned status;
    enum pgsim_fault faulted;
    bool replayed; /* a stored idempotent answer was returned */
};

/* A ring of at most max entries, grown on demand; overwritten entries are counted. */
struct pgsim_reqlog {
    struct pgsim_logent *ents;
    size_t cap;
    size_t max;
    size_t count;
    size_t head; /* index of the oldest entry */
    uint64_t next_seq;
    uint64_t dropped;
};

void pgsim_reqlog_init(struct pgsim_reqlog *l, size_t max);
void pgsim_reqlog_clear(struct pgsim_reqlog *l);
/* Copies the strings of e (each cut to PGSIM_LOG_FIELD_MAX) and assigns e->seq. Returns the
 * seq, or 0 when memory ran out (the entry is then counted in dropped). */
uint64_t pgsim_reqlog_append(struct pgsim_reqlog *l, const struct pgsim_logent *e);
/* The i-th entry, oldest first, i < count. */
const struct pgsim_logent *pgsim_reqlog_at(const struct pgsim_reqlog *l, size_t i);

#endif
