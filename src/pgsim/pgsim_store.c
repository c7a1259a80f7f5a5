/*
 * pgsim_store.c - the PG simulator's memory: transactions indexed three ways (by key and by
 * order id in chained FNV-1a hash tables, and by creation time in a sorted array for the
 * paged list), and the bounded request log the tests read back.
 *
 * Threads: any connection thread, always under the simulator's state mutex (see
 * pgsim_int.h); nothing here locks or sleeps.
 * Ownership: the store owns inserted transactions and everything hanging off them; the log
 * owns copies of the strings it is given.
 */
#include "pgsim_int.h"

#include "settle/error.h"

#include <stdlib.h>
#include <string.h>

#define STORE_INITIAL_BUCKETS 1024

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 14695981039346656037ULL;
    for (; *s != '\0'; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

const char *pgsim_status_name(enum pgsim_status st)
{
    switch (st) {
    case PGSIM_PENDING:
        return "PENDING";
    case PGSIM_SUCCESS:
        return "SUCCESS";
    case PGSIM_FAILED:
        return "FAILED";
    case PGSIM_PARTIALLY_CANCELLED:
        return "PARTIALLY_CANCELLED";
    case PGSIM_CANCELLED:
        return "CANCELLED";
    default:
        abort();
    }
}

const char *pgsim_fault_name(enum pgsim_fault f)
{
    switch (f) {
    case PGSIM_FAULT_NONE:
        return "none";
    case PGSIM_FAULT_FAIL:
        return "fail";
    case PGSIM_FAULT_SLOW:
        return "slow";
    case PGSIM_FAULT_INJECT:
        return "inject";
    default:
        abort();
    }
}

struct pgsim_txn *pgsim_txn_new(void)
{
    struct pgsim_txn *t = calloc(1, sizeof(*t));
    if (t != NULL)
        t->final_at_ms = INT64_MAX;
    return t;
}

void pgsim_txn_free(struct pgsim_txn *t)
{
    if (t == NULL)
        return;
    struct pgsim_idem *i = t->idems;
    while (i != NULL) {
        struct pgsim_idem *next = i->next;
        free(i->key);
        free(i->body);
        free(i);
        i = next;
    }
    free(t->key);
    free(t->user_id);
    free(t->order_id);
    free(t->card_type);
    free(t->card_no);
    free(t->callback_url);
    free(t->reason);
    free(t->final_reason);
    free(t->cancel_reason);
    free(t);
}

void pgsim_txn_settle(struct pgsim_txn *t, int64_t now_ms)
{
    if (t->status != PGSIM_PENDING || now_ms < t->final_at_ms || t->final_status == PGSIM_PENDING)
        return;
    t->status = t->final_status;
    free(t->reason);
    /* The final reason moves over: it is only ever applied once. */
    t->reason = t->final_reason;
    t->final_reason = NULL;
}

int64_t pgsim_txn_balance(const struct pgsim_txn *t)
{
    switch (t->status) {
    case PGSIM_SUCCESS:
    case PGSIM_PARTIALLY_CANCELLED:
    case PGSIM_CANCELLED:
        return t->amount - t->cancelled_amount;
    case PGSIM_PENDING:
    case PGSIM_FAILED:
        /* Nothing has been captured (yet), so nothing could be refunded. */
        return 0;
    default:
        abort();
    }
}

struct pgsim_idem *pgsim_txn_find_idem(const struct pgsim_txn *t, const char *key)
{
    for (struct pgsim_idem *i = t->idems; i != NULL; i = i->next) {
        if (strcmp(i->key, key) == 0)
            return i;
    }
    return NULL;
}

int pgsim_store_init(struct pgsim_store *s, size_t max_count)
{
    memset(s, 0, sizeof(*s));
    s->max_count = max_count;
    s->nbuckets = STORE_INITIAL_BUCKETS;
    s->by_key = calloc(s->nbuckets, sizeof(*s->by_key));
    s->by_order = calloc(s->nbuckets, sizeof(*s->by_order));
    if (s->by_key == NULL || s->by_order == NULL) {
        free(s->by_key);
        free(s->by_order);
        memset(s, 0, sizeof(*s));
        return SETTLE_ENOMEM;
    }
    return 0;
}

void pgsim_store_clear(struct pgsim_store *s)
{
    for (size_t i = 0; i < s->count; i++)
        pgsim_txn_free(s->by_time[i]);
    s->count = 0;
    memset(s->by_key, 0, s->nbuckets * sizeof(*s->by_key));
    memset(s->by_order, 0, s->nbuckets * sizeof(*s->by_order));
}

void pgsim_store_free(struct pgsim_store *s)
{
    if (s->by_key == NULL)
        return;
    pgsim_store_clear(s);
    free(s->by_key);
    free(s->by_order);
    free(s->by_time);
    memset(s, 0, sizeof(*s));
}

struct pgsim_txn *pgsim_store_find(const struct pgsim_store *s, const char *key)
{
    struct pgsim_txn *t = s->by_key[fnv1a(key) & (s->nbuckets - 1)];
    for (; t != NULL; t = t->next_by_key) {
        if (strcmp(t->key, key) == 0)
            return t;
    }
    return NULL;
}

/* Doubles both hash tables once the load factor reaches 1, so chains stay short at 100k+. */
static int store_grow_buckets(struct pgsim_store *s)
{
    size_t n = s->nbuckets * 2;
    struct pgsim_txn **bk = calloc(n, sizeof(*bk));
    struct pgsim_txn **bo = calloc(n, sizeof(*bo));
    if (bk == NULL || bo == NULL) {
        free(bk);
        free(bo);
        return SETTLE_ENOMEM;
    }
    /* Rebuilding from by_time keeps insertion simple; chain order carries no meaning. */
    for (size_t i = 0; i < s->count; i++) {
        struct pgsim_txn *t = s->by_time[i];
        size_t hk = fnv1a(t->key) & (n - 1);
        size_t ho = fnv1a(t->order_id) & (n - 1);
        t->next_by_key = bk[hk];
        bk[hk] = t;
        t->next_by_order = bo[ho];
        bo[ho] = t;
    }
    free(s->by_key);
    free(s->by_order);
    s->by_key = bk;
    s->by_order = bo;
    s->nbuckets = n;
    return 0;
}

static int time_cmp(const struct pgsim_txn *a, const struct pgsim_txn *b)
{
    if (a->created_ms != b->created_ms)
        return a->created_ms < b->created_ms ? -1 : 1;
    return strcmp(a->key, b->key);
}

int pgsim_store_insert(struct pgsim_store *s, struct pgsim_txn *t)
{
    if (s->count >= s->max_count)
        return SETTLE_EFULL;
    if (pgsim_store_find(s, t->key) != NULL)
        return SETTLE_ECONFLICT;
    if (s->count == s->cap) {
        size_t cap = s->cap == 0 ? 1024 : s->cap * 2;
        if (cap > s->max_count)
            cap = s->max_count;
        struct pgsim_txn **bt = realloc(s->by_time, cap * sizeof(*bt));
        if (bt == NULL)
            return SETTLE_ENOMEM;
        s->by_time = bt;
        s->cap = cap;
    }
    if (s->count >= s->nbuckets && store_grow_buckets(s) != 0)
        return SETTLE_ENOMEM;

    /* Upper bound of (created_ms, key): API-created payments arrive in time order and append
     * in O(1); only admin-seeded ones with an explicit createdAt pay for the memmove. */
    size_t lo = 0;
    size_t hi = s->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (time_cmp(s->by_time[mid], t) <= 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    memmove(&s->by_time[lo + 1], &s->by_time[lo], (s->count - lo) * sizeof(*s->by_time));
    s->by_time[lo] = t;
    s->count++;

    size_t hk = fnv1a(t->key) & (s->nbuckets - 1);
    size_t ho = fnv1a(t->order_id) & (s->nbuckets - 1);
    t->next_by_key = s->by_key[hk];
    s->by_key[hk] = t;
    t->next_by_order = s->by_order[ho];
    s->by_order[ho] = t;
    t->seq = ++s->next_seq;
    return 0;
}

static int newest_first(const void *pa, const void *pb)
{
    const struct pgsim_txn *a = *(struct pgsim_txn *const *)pa;
    const struct pgsim_txn *b = *(struct pgsim_txn *const *)pb;
    if (a->created_ms != b->created_ms)
        return a->created_ms > b->created_ms ? -1 : 1;
    if (a->seq != b->seq)
        return a->seq > b->seq ? -1 : 1;
    return 0;
}

long pgsim_store_by_order(const struct pgsim_store *s, const char *user_id, const char *order_id,
                          struct pgsim_txn ***out)
{
    *out = NULL;
    struct pgsim_txn *head = s->by_order[fnv1a(order_id) & (s->nbuckets - 1)];
    size_t n = 0;
    for (struct pgsim_txn *t = head; t != NULL; t = t->next_by_order) {
        if (strcmp(t->order_id, order_id) == 0 && strcmp(t->user_id, user_id) == 0)
            n++;
    }
    if (n == 0)
        return 0;
    struct pgsim_txn **v = malloc(n * sizeof(*v));
    if (v == NULL)
        return SETTLE_ENOMEM;
    size_t i = 0;
    for (struct pgsim_txn *t = head; t != NULL; t = t->next_by_order) {
        if (strcmp(t->order_id, order_id) == 0 && strcmp(t->user_id, user_id) == 0)
            v[i++] = t;
    }
    qsort(v, n, sizeof(*v), newest_first);
    *out = v;
    return (long)n;
}

/* First index whose created_ms is >= ms. */
static size_t time_lower_bound(const struct pgsim_store *s, int64_t ms)
{
    size_t lo = 0;
    size_t hi = s->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->by_time[mid]->created_ms < ms)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

void pgsim_store_range(const struct pgsim_store *s, int64_t from_ms, int64_t to_ms, size_t *lo,
                       size_t *hi)
{
    *lo = time_lower_bound(s, from_ms);
    *hi = to_ms <= from_ms ? *lo : time_lower_bound(s, to_ms);
}

/* --- request log ---------------------------------------------------------------------------- */

/* A copy of s cut to PGSIM_LOG_FIELD_MAX bytes with a visible "..." when cut, or NULL. */
static char *dup_cut(const char *s)
{
    if (s == NULL)
        return NULL;
    size_t len = strlen(s);
    if (len <= PGSIM_LOG_FIELD_MAX)
        return strdup(s);
    char *d = malloc(PGSIM_LOG_FIELD_MAX + 4);
    if (d == NULL)
        return NULL;
    memcpy(d, s, PGSIM_LOG_FIELD_MAX);
    memcpy(d + PGSIM_LOG_FIELD_MAX, "...", 4);
    return d;
}

static void logent_free(struct pgsim_logent *e)
{
    free(e->path);
    free(e->query);
    free(e->user_id);
    free(e->idempotency_key);
    memset(e, 0, sizeof(*e));
}

void pgsim_reqlog_init(struct pgsim_reqlog *l, size_t max)
{
    memset(l, 0, sizeof(*l));
    l->max = max;
}

void pgsim_reqlog_clear(struct pgsim_reqlog *l)
{
    for (size_t i = 0; i < l->count; i++)
        logent_free(&l->ents[(l->head + i) % l->cap]);
    free(l->ents);
    size_t max = l->max;
    pgsim_reqlog_init(l, max);
}

uint64_t pgsim_reqlog_append(struct pgsim_reqlog *l, const struct pgsim_logent *e)
{
    /* Growth happens only before the ring first wraps (count < max), so head is still 0 and
     * realloc keeps the order. */
    if (l->count == l->cap && l->cap < l->max) {
        size_t cap = l->cap == 0 ? 1024 : l->cap * 2;
        if (cap > l->max)
            cap = l->max;
        struct pgsim_logent *ents = realloc(l->ents, cap * sizeof(*ents));
        if (ents == NULL) {
            l->dropped++;
            return 0;
        }
        l->ents = ents;
        l->cap = cap;
    }
    struct pgsim_logent *slot;
    if (l->count == l->cap) {
        /* Full: the oldest entry goes, and the loss is counted so readers can see it. */
        slot = &l->ents[l->head];
        logent_free(slot);
        l->head = (l->head + 1) % l->cap;
        l->dropped++;
    } else {
        slot = &l->ents[(l->head + l->count) % l->cap];
        l->count++;
    }
    *slot = *e;
    slot->path = dup_cut(e->path);
    slot->query = dup_cut(e->query);
    slot->user_id = dup_cut(e->user_id);
    slot->idempotency_key = dup_cut(e->idempotency_key);
    slot->seq = ++l->next_seq;
    return slot->seq;
}

const struct pgsim_logent *pgsim_reqlog_at(const struct pgsim_reqlog *l, size_t i)
{
    return &l->ents[(l->head + i) % l->cap];
}
