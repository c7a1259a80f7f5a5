/*
 * stock.c - stock reservations in Redis (see stock.h for the key layout and contracts).
 *
 * Each operation validates its input, builds KEYS and ARGV for one of the lua/stock_*.lua
 * scripts (every key a script touches is passed in KEYS, all under the "{ns}" hash tag) and
 * runs it through rconn; the script's answer word is mapped to enum stock_result. A refund's
 * restock (stock_restock) runs lua/stock_restock.lua the same way. The reaper
 * (stock_reap) chains stock_due -> HGETALL of each due reservation (to learn its SKUs) ->
 * stock_release. The synchronous functions serve the CLI.
 *
 * Thread: stock_commit, stock_release, stock_restock, stock_reap and all their callbacks run on
 * the loop
 * thread; stock_sync_* run on the calling thread with that thread's struct rconn_sync.
 * Ownership: every async call owns one small heap context (struct op, struct reap) from the
 * call until its last callback, which frees it; replies are never kept past their callback
 * (whatever is needed later is copied). No global state.
 */
#include "settle/stock.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "settle/error.h"
#include "settle/job.h"
#include "settle/log.h"

#define STOCK_ASSERT(cond)                                                                         \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define SKU_MAX 64                /* bytes of a SKU (the scripts check the same bound) */
#define QTY_MAX 1000000           /* units of one item (the scripts check the same bound) */
#define KEY_MAX 256               /* "{ns}:resv:<order_id>" with ns <= 64 and order_id <= 128 */
#define MS_MAX 9007199254740991LL /* 2^53 - 1: the largest integer Lua 5.1 holds exactly */
#define REAP_LIMIT_MAX 10000      /* stock_due.lua refuses more */
#define SCAN_COUNT "1000"         /* SCAN COUNT hint of stock_sync_show */
#define SCAN_ROUNDS_MAX 100000    /* SCAN calls per stock_sync_show: ~1e8 keys at COUNT 1000 */
#define SHOW_SKUS_MAX 1000000     /* SKUs stock_sync_show collects */
#define LOAD_PAGE 1000            /* deadline-set members read per ZRANGE in stock_sync_load */
#define LOAD_PAGES_MAX 10000      /* ZRANGE pages per stock_sync_load: 1e7 reservations */
#define LOAD_SKUS_MAX 100000      /* SKUs per stock_sync_load */

/* ---------------------------------------------------------------------------------------------
 * Small helpers.
 */

/* Writes a message into an optional caller buffer. */
static void say(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void say(char *buf, size_t len, const char *fmt, ...)
{
    if (buf == NULL || len == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *memdup0(const char *s, size_t len)
{
    char *p = malloc(len + 1);
    if (p != NULL) {
        memcpy(p, s, len);
        p[len] = '\0';
    }
    return p;
}

/* A SKU is 1..64 bytes without '{' or '}' (braces would blur the cluster hash tag). */
static int sku_ok(const char *s, size_t len)
{
    return len >= 1 && len <= SKU_MAX && memchr(s, '\0', len) == NULL &&
           memchr(s, '{', len) == NULL && memchr(s, '}', len) == NULL;
}

static int sku_cstr_ok(const char *s)
{
    return s != NULL && sku_ok(s, strnlen(s, SKU_MAX + 1));
}

/* An order id is 1..JOB_ID_MAX bytes and not "deadlines", whose reservation key would be the
 * deadline set itself. */
static int order_id_ok(const char *s, size_t len)
{
    return len >= 1 && len <= JOB_ID_MAX && memchr(s, '\0', len) == NULL &&
           !(len == 9 && memcmp(s, "deadlines", 9) == 0);
}

static int order_id_cstr_ok(const char *s)
{
    return s != NULL && order_id_ok(s, strnlen(s, JOB_ID_MAX + 1));
}

/* A namespace is 1..64 bytes without braces, so "{ns}" is the keys' cluster hash tag. */
static int ns_ok(const char *ns)
{
    size_t len = ns != NULL ? strnlen(ns, 65) : 0;
    return len >= 1 && len <= 64 && memchr(ns, '{', len) == NULL && memchr(ns, '}', len) == NULL;
}

/* Checks n (min_n..STOCK_ITEMS_MAX), every SKU, distinct SKUs and, when with_qty, every qty. */
static int items_ok(const struct stock_items *items, unsigned min_n, int with_qty, char *err,
                    size_t err_len)
{
    if (items == NULL || items->n < min_n || items->n > STOCK_ITEMS_MAX) {
        say(err, err_len, "between %u and %d items required", min_n, STOCK_ITEMS_MAX);
        return SETTLE_EINVAL;
    }
    for (unsigned i = 0; i < items->n; i++) {
        if (!sku_cstr_ok(items->sku[i])) {
            say(err, err_len, "item %u: a SKU is 1..%d bytes without '{' or '}'", i + 1, SKU_MAX);
            return SETTLE_EINVAL;
        }
        if (with_qty && (items->qty[i] < 1 || items->qty[i] > QTY_MAX)) {
            say(err, err_len, "item %u (%s): qty must be 1..%d", i + 1, items->sku[i], QTY_MAX);
            return SETTLE_EINVAL;
        }
        for (unsigned j = 0; j < i; j++) {
            if (strcmp(items->sku[i], items->sku[j]) == 0) {
                say(err, err_len, "SKU %s is listed twice", items->sku[i]);
                return SETTLE_EINVAL;
            }
        }
    }
    return 0;
}

/* Redis answers that mean "try again later" rather than a bug on our side. */
static int error_status(const char *text, size_t len)
{
    static const char *const transient[] = {"LOADING",    "BUSY",     "READONLY",
                                            "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                                            "NOREPLICAS", "OOM",      "MISCONF"};
    for (size_t i = 0; i < sizeof(transient) / sizeof(transient[0]); i++) {
        size_t n = strlen(transient[i]);
        if (len >= n && memcmp(text, transient[i], n) == 0)
            return SETTLE_EIO;
    }
    return SETTLE_EINTERNAL;
}

/* The status for a reply that should not be an error: 0, or the mapped error with its text
 * in err. */
static int reply_status(const struct rconn_reply *reply, const char *what, char *err,
                        size_t err_len)
{
    if (reply == NULL) {
        say(err, err_len, "redis %s: connection failed", what);
        return SETTLE_EIO;
    }
    if (rconn_reply_type(reply) != RCONN_ERROR)
        return 0;
    size_t len;
    const char *text = rconn_reply_str(reply, &len);
    say(err, err_len, "redis %s failed: %.*s", what, (int)len, text);
    return error_status(text, len);
}

/* ---------------------------------------------------------------------------------------------
 * Script arguments: KEYS first, then ARGV, all in one flat argv for rconn_eval.
 */
#define ARGS_KEYS_MAX (2 + STOCK_ITEMS_MAX)
#define ARGS_NUMS_MAX (2 + STOCK_ITEMS_MAX)
#define ARGS_MAX (ARGS_KEYS_MAX + 3 + 2 * STOCK_ITEMS_MAX)

struct script_args {
    int argc;
    int nkeys;
    unsigned nnums;
    const char *argv[ARGS_MAX];
    size_t len[ARGS_MAX];
    char key[ARGS_KEYS_MAX][KEY_MAX];
    char num[ARGS_NUMS_MAX][24];
};

/* Builds "{ns}:<kind><id>" into buf; its length or SETTLE_ETOOBIG. */
static int build_key(char *buf, size_t buf_len, const char *ns, const char *kind, const char *id,
                     size_t id_len)
{
    char suffix[KEY_MAX];
    int n = snprintf(suffix, sizeof(suffix), "%s%.*s", kind, (int)id_len, id);
    if (n < 0 || (size_t)n >= sizeof(suffix))
        return SETTLE_ETOOBIG;
    return rconn_key(buf, buf_len, ns, suffix);
}

static int args_key(struct script_args *a, const char *ns, const char *kind, const char *id)
{
    STOCK_ASSERT(a->nkeys < ARGS_KEYS_MAX && a->argc == a->nkeys && a->argc < ARGS_MAX);
    int len = build_key(a->key[a->nkeys], KEY_MAX, ns, kind, id, strlen(id));
    if (len < 0)
        return len;
    a->argv[a->argc] = a->key[a->nkeys];
    a->len[a->argc] = (size_t)len;
    a->argc++;
    a->nkeys++;
    return 0;
}

static void args_str(struct script_args *a, const char *s)
{
    STOCK_ASSERT(a->argc < ARGS_MAX);
    a->argv[a->argc] = s;
    a->len[a->argc] = strlen(s);
    a->argc++;
}

static void args_num(struct script_args *a, long long v)
{
    STOCK_ASSERT(a->nnums < ARGS_NUMS_MAX);
    char *buf = a->num[a->nnums++];
    int n = snprintf(buf, sizeof(a->num[0]), "%lld", v);
    STOCK_ASSERT(n > 0 && (size_t)n < sizeof(a->num[0]));
    args_str(a, buf);
}

/* KEYS: the reservation, the deadline set, then the stock key of every item. */
static int args_keys(struct script_args *a, const char *ns, const char *order_id,
                     const struct stock_items *items)
{
    memset(a, 0, offsetof(struct script_args, argv));
    int ret = args_key(a, ns, "resv:", order_id);
    if (ret == 0)
        ret = args_key(a, ns, "resv:", "deadlines");
    for (unsigned i = 0; ret == 0 && i < items->n; i++)
        ret = args_key(a, ns, "stock:", items->sku[i]);
    return ret;
}

/* stock_reserve.lua: ARGV order_id, deadline_ms, created_ms, then sku/qty pairs. */
static int build_reserve(struct script_args *a, const char *ns, const char *order_id,
                         uint64_t deadline_ms, int64_t created_ms, const struct stock_items *items)
{
    int ret = args_keys(a, ns, order_id, items);
    if (ret != 0)
        return ret;
    args_str(a, order_id);
    args_num(a, (long long)deadline_ms);
    args_num(a, (long long)created_ms);
    for (unsigned i = 0; i < items->n; i++) {
        args_str(a, items->sku[i]);
        args_num(a, items->qty[i]);
    }
    return 0;
}

/* stock_commit.lua: ARGV order_id, then sku/qty pairs. */
static int build_commit(struct script_args *a, const char *ns, const char *order_id,
                        const struct stock_items *items)
{
    int ret = args_keys(a, ns, order_id, items);
    if (ret != 0)
        return ret;
    args_str(a, order_id);
    for (unsigned i = 0; i < items->n; i++) {
        args_str(a, items->sku[i]);
        args_num(a, items->qty[i]);
    }
    return 0;
}

/* stock_release.lua: ARGV order_id, then the SKUs (their qty comes from the hash). */
static int build_release(struct script_args *a, const char *ns, const char *order_id,
                         const struct stock_items *items)
{
    int ret = args_keys(a, ns, order_id, items);
    if (ret != 0)
        return ret;
    args_str(a, order_id);
    for (unsigned i = 0; i < items->n; i++)
        args_str(a, items->sku[i]);
    return 0;
}

/* stock_restock.lua: KEYS the reservation and the stock keys (no deadline set); ARGV
 * order_id, refund id, then sku/qty pairs. */
static int build_restock(struct script_args *a, const char *ns, const char *order_id,
                         const char *refund_id, const struct stock_items *items)
{
    memset(a, 0, offsetof(struct script_args, argv));
    int ret = args_key(a, ns, "resv:", order_id);
    for (unsigned i = 0; ret == 0 && i < items->n; i++)
        ret = args_key(a, ns, "stock:", items->sku[i]);
    if (ret != 0)
        return ret;
    args_str(a, order_id);
    args_str(a, refund_id);
    for (unsigned i = 0; i < items->n; i++) {
        args_str(a, items->sku[i]);
        args_num(a, items->qty[i]);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Script answers.
 */
enum stock_op {
    STOCK_OP_RESERVE,
    STOCK_OP_COMMIT,
    STOCK_OP_RELEASE,
    STOCK_OP_RESTOCK,
};

static const struct {
    const char *word;
    enum stock_result result;
    enum stock_op op;
} answers[] = {
    {"reserved", STOCK_RESERVED, STOCK_OP_RESERVE},
    {"exists", STOCK_EXISTS, STOCK_OP_RESERVE},
    {"insufficient", STOCK_INSUFFICIENT, STOCK_OP_RESERVE},
    {"committed", STOCK_COMMITTED, STOCK_OP_COMMIT},
    {"already_committed", STOCK_ALREADY_COMMITTED, STOCK_OP_COMMIT},
    {"retaken", STOCK_RETAKEN, STOCK_OP_COMMIT},
    {"out_of_stock", STOCK_OUT_OF_STOCK, STOCK_OP_COMMIT},
    {"released", STOCK_RELEASED, STOCK_OP_RELEASE},
    {"already_released", STOCK_ALREADY_RELEASED, STOCK_OP_RELEASE},
    {"not_reserved", STOCK_NOT_RESERVED, STOCK_OP_RELEASE},
    {"missing", STOCK_MISSING, STOCK_OP_RELEASE},
    {"restocked", STOCK_RESTOCKED, STOCK_OP_RESTOCK},
    {"already_restocked", STOCK_ALREADY_RESTOCKED, STOCK_OP_RESTOCK},
    {"not_committed", STOCK_NOT_COMMITTED, STOCK_OP_RESTOCK},
    {"missing", STOCK_MISSING, STOCK_OP_RESTOCK},
};

#define ANSWERS_N (sizeof(answers) / sizeof(answers[0]))

const char *stock_result_name(enum stock_result r)
{
    for (size_t i = 0; i < ANSWERS_N; i++) {
        if (answers[i].result == r)
            return answers[i].word;
    }
    return "unknown";
}

static const char *op_script(enum stock_op op)
{
    switch (op) {
    case STOCK_OP_RESERVE:
        return "stock_reserve";
    case STOCK_OP_COMMIT:
        return "stock_commit";
    case STOCK_OP_RELEASE:
        return "stock_release";
    case STOCK_OP_RESTOCK:
        return "stock_restock";
    default:
        STOCK_ASSERT(!"unknown stock op");
        return NULL;
    }
}

/*
 * Maps a script's reply: a word, or an array whose first element is the word (reserve). The
 * word must be one the script of `op` can give. detail gets "state <s>" for exists, "sku <s>:
 * <n> available" for insufficient, or the reason on error. A Redis error reply maps to
 * SETTLE_EIO when transient (LOADING, BUSY, ...), else SETTLE_EINTERNAL (a script refusing
 * its input is a bug of the caller); anything unexpected is SETTLE_EINTERNAL.
 */
static int parse_answer(const struct rconn_reply *reply, enum stock_op op,
                        enum stock_result *result, char *detail, size_t detail_len)
{
    int ret = reply_status(reply, op_script(op), detail, detail_len);
    if (ret != 0)
        return ret;
    const struct rconn_reply *word = reply;
    if (rconn_reply_type(reply) == RCONN_ARRAY)
        word = rconn_reply_element(reply, 0);
    enum rconn_type t = rconn_reply_type(word);
    if (t != RCONN_STRING && t != RCONN_STATUS) {
        say(detail, detail_len, "%s: unexpected answer of type %d", op_script(op), (int)t);
        return SETTLE_EINTERNAL;
    }
    size_t len;
    const char *s = rconn_reply_str(word, &len);
    for (size_t i = 0; i < ANSWERS_N; i++) {
        if (answers[i].op != op || strlen(answers[i].word) != len ||
            memcmp(answers[i].word, s, len) != 0)
            continue;
        *result = answers[i].result;
        if (detail != NULL && detail_len > 0)
            detail[0] = '\0';
        if (*result == STOCK_EXISTS) {
            size_t slen;
            const char *st = rconn_reply_str(rconn_reply_element(reply, 1), &slen);
            say(detail, detail_len, "state %.*s", (int)slen, st);
        } else if (*result == STOCK_INSUFFICIENT) {
            size_t slen;
            const char *sku = rconn_reply_str(rconn_reply_element(reply, 1), &slen);
            long long avail = rconn_reply_as_ll(rconn_reply_element(reply, 2), 0);
            say(detail, detail_len, "sku %.*s: %lld available", (int)slen, sku, avail);
        }
        return 0;
    }
    say(detail, detail_len, "%s: unexpected answer \"%.*s\"", op_script(op), (int)len, s);
    return SETTLE_EINTERNAL;
}

/*
 * The items of a reservation hash (an HGETALL reply), copied so they outlive the reply.
 * state is "" when the hash is missing.
 */
struct hash_items {
    char state[24];
    char sku[STOCK_ITEMS_MAX][SKU_MAX + 1];
    struct stock_items items;
};

static int parse_hash_items(const struct rconn_reply *reply, const char *order_id,
                            struct hash_items *h, char *err, size_t err_len)
{
    memset(h, 0, offsetof(struct hash_items, sku));
    h->items.n = 0;
    int ret = reply_status(reply, "HGETALL", err, err_len);
    if (ret != 0)
        return ret;
    if (rconn_reply_type(reply) != RCONN_ARRAY || rconn_reply_elements(reply) % 2 != 0) {
        say(err, err_len, "reservation of order %s: HGETALL gave no field/value array", order_id);
        return SETTLE_EPARSE;
    }
    for (size_t i = 0; i + 1 < rconn_reply_elements(reply); i += 2) {
        size_t flen, vlen;
        const char *f = rconn_reply_str(rconn_reply_element(reply, i), &flen);
        const char *v = rconn_reply_str(rconn_reply_element(reply, i + 1), &vlen);
        if (flen == 5 && memcmp(f, "state", 5) == 0) {
            if (vlen >= sizeof(h->state)) {
                say(err, err_len, "reservation of order %s: unknown state", order_id);
                return SETTLE_EPARSE;
            }
            memcpy(h->state, v, vlen);
            h->state[vlen] = '\0';
            continue;
        }
        if (flen < 4 || memcmp(f, "sku:", 4) != 0)
            continue;
        if (!sku_ok(f + 4, flen - 4)) {
            say(err, err_len, "reservation of order %s: malformed field %.*s", order_id, (int)flen,
                f);
            return SETTLE_EPARSE;
        }
        if (h->items.n >= STOCK_ITEMS_MAX) {
            say(err, err_len, "reservation of order %s: more than %d items", order_id,
                STOCK_ITEMS_MAX);
            return SETTLE_EPARSE;
        }
        long long qty = rconn_reply_as_ll(rconn_reply_element(reply, i + 1), -1);
        if (qty < 1 || qty > QTY_MAX) {
            say(err, err_len, "reservation of order %s: field %.*s has qty %.*s", order_id,
                (int)flen, f, (int)vlen, v);
            return SETTLE_EPARSE;
        }
        unsigned k = h->items.n++;
        memcpy(h->sku[k], f + 4, flen - 4);
        h->sku[k][flen - 4] = '\0';
        h->items.sku[k] = h->sku[k];
        h->items.qty[k] = (int32_t)qty;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Async commit and release.
 */
struct op {
    enum stock_op kind;
    stock_cb cb;
    void *arg;
    char order_id[JOB_ID_MAX + 1]; /* for the log line of a failed call */
};

static void log_failure(const char *order_id, const char *what, int status, const char *detail)
{
    struct log_ctx ctx = {.order_id = order_id, .attempt = -1};
    log_write(LOG_LEVEL_ERROR, &ctx, detail, "%s failed: %s", what, settle_strerror(status));
}

static void on_op_answer(void *arg, int status, const struct rconn_reply *reply)
{
    struct op *op = arg;
    /* The callback's result is meaningless unless status is 0; callers check status. */
    enum stock_result result = STOCK_RESERVED;
    char detail[256] = "";
    if (status == 0) {
        status = parse_answer(reply, op->kind, &result, detail, sizeof(detail));
        if (status != 0)
            log_failure(op->order_id, op_script(op->kind), status, detail);
    }
    stock_cb cb = op->cb;
    void *cb_arg = op->arg;
    free(op);
    cb(cb_arg, status, result);
}

/* Validates, builds and sends one commit or release; cb as in rconn_eval. */
static int send_op(struct rconn *rc, const char *ns, const char *order_id,
                   const struct stock_items *items, enum stock_op kind, rconn_cb cb, void *arg)
{
    if (rc == NULL || !ns_ok(ns) || !order_id_cstr_ok(order_id))
        return SETTLE_EINVAL;
    /* Commit needs the qty of each item (for a retake); release takes qty from the hash and
     * may name no SKU at all (a missing reservation). */
    int ret =
        kind == STOCK_OP_COMMIT ? items_ok(items, 1, 1, NULL, 0) : items_ok(items, 0, 0, NULL, 0);
    if (ret != 0)
        return ret;
    struct script_args a;
    ret = kind == STOCK_OP_COMMIT ? build_commit(&a, ns, order_id, items)
                                  : build_release(&a, ns, order_id, items);
    if (ret != 0)
        return ret;
    /* EVALSHA stock_commit|stock_release: resv, deadlines, stock keys; order_id, items. */
    return rconn_eval(rc, op_script(kind), a.nkeys, a.argc, a.argv, a.len, cb, arg);
}

static int start_op(struct rconn *rc, const char *ns, const char *order_id,
                    const struct stock_items *items, enum stock_op kind, stock_cb cb, void *arg)
{
    if (cb == NULL || !order_id_cstr_ok(order_id))
        return SETTLE_EINVAL;
    struct op *op = calloc(1, sizeof(*op));
    if (op == NULL)
        return SETTLE_ENOMEM;
    op->kind = kind;
    op->cb = cb;
    op->arg = arg;
    memcpy(op->order_id, order_id, strlen(order_id) + 1);
    int ret = send_op(rc, ns, order_id, items, kind, on_op_answer, op);
    if (ret != 0)
        free(op);
    return ret;
}

int stock_commit(struct rconn *rc, const char *ns, const char *order_id,
                 const struct stock_items *items, stock_cb cb, void *arg)
{
    return start_op(rc, ns, order_id, items, STOCK_OP_COMMIT, cb, arg);
}

int stock_release(struct rconn *rc, const char *ns, const char *order_id,
                  const struct stock_items *items, stock_cb cb, void *arg)
{
    return start_op(rc, ns, order_id, items, STOCK_OP_RELEASE, cb, arg);
}

int stock_restock(struct rconn *rc, const char *ns, const char *order_id, const char *refund_id,
                  const struct stock_items *items, stock_cb cb, void *arg)
{
    size_t id_len = refund_id != NULL ? strnlen(refund_id, JOB_ID_MAX + 1) : 0;
    if (rc == NULL || cb == NULL || !ns_ok(ns) || !order_id_cstr_ok(order_id) || id_len == 0 ||
        id_len > JOB_ID_MAX)
        return SETTLE_EINVAL;
    int ret = items_ok(items, 1, 1, NULL, 0);
    if (ret != 0)
        return ret;
    struct script_args a;
    ret = build_restock(&a, ns, order_id, refund_id, items);
    if (ret != 0)
        return ret;
    struct op *op = calloc(1, sizeof(*op));
    if (op == NULL)
        return SETTLE_ENOMEM;
    op->kind = STOCK_OP_RESTOCK;
    op->cb = cb;
    op->arg = arg;
    memcpy(op->order_id, order_id, strlen(order_id) + 1);
    /* EVALSHA stock_restock: resv, stock keys; order_id, refund id, items. */
    ret = rconn_eval(rc, op_script(STOCK_OP_RESTOCK), a.nkeys, a.argc, a.argv, a.len, on_op_answer,
                     op);
    if (ret != 0)
        free(op);
    return ret;
}

/* ---------------------------------------------------------------------------------------------
 * The reaper. One struct reap per run; `pending` counts the sub-steps in flight (each due
 * order is one step, carried from its HGETALL to its release) plus one guard held while
 * on_due sends, so done runs exactly once, after the last sub-step, and the context is freed
 * right after it. All steps run in rconn callbacks, so done never runs inside stock_reap.
 */
struct reap;

struct reap_order {
    struct reap *reap;
    char id[JOB_ID_MAX + 1];
};

struct reap {
    struct rconn *rc;
    char *ns;
    unsigned limit;
    void (*done)(void *arg, int status, unsigned released);
    void *arg;
    unsigned pending;
    unsigned released;
    int status; /* first failure, reported to done with the count of those released */
    struct reap_order *orders;
};

static void reap_step_done(struct reap *r, int status)
{
    if (status != 0 && r->status == 0)
        r->status = status;
    STOCK_ASSERT(r->pending > 0);
    if (--r->pending > 0)
        return;
    void (*done)(void *, int, unsigned) = r->done;
    void *arg = r->arg;
    int final_status = r->status;
    unsigned released = r->released;
    free(r->orders);
    free(r->ns);
    free(r);
    done(arg, final_status, released);
}

static void on_reap_released(void *arg, int status, const struct rconn_reply *reply)
{
    struct reap_order *o = arg;
    enum stock_result result = STOCK_MISSING;
    char detail[256] = "";
    if (status == 0) {
        status = parse_answer(reply, STOCK_OP_RELEASE, &result, detail, sizeof(detail));
        if (status != 0)
            log_failure(o->id, "stock reaper release", status, detail);
        else if (result == STOCK_RELEASED)
            o->reap->released++;
    }
    reap_step_done(o->reap, status);
}

static void on_reap_hash(void *arg, int status, const struct rconn_reply *reply)
{
    struct reap_order *o = arg;
    struct hash_items h;
    char err[256] = "";
    if (status == 0) {
        status = parse_hash_items(reply, o->id, &h, err, sizeof(err));
        if (status != 0)
            log_failure(o->id, "stock reaper", status, err);
    }
    /* Release even a missing or no longer reserved reservation: the script answers
     * idempotently and removes the order from the deadline set either way. */
    if (status == 0)
        status = send_op(o->reap->rc, o->reap->ns, o->id, &h.items, STOCK_OP_RELEASE,
                         on_reap_released, o);
    if (status != 0)
        reap_step_done(o->reap, status);
}

static void on_reap_due(void *arg, int status, const struct rconn_reply *reply)
{
    struct reap *r = arg;
    char err[256] = "";
    r->pending = 1; /* guard while sending */
    if (status == 0)
        status = reply_status(reply, "stock_due", err, sizeof(err));
    if (status == 0 && rconn_reply_type(reply) != RCONN_ARRAY) {
        say(err, sizeof(err), "stock_due: unexpected answer of type %d",
            (int)rconn_reply_type(reply));
        status = SETTLE_EINTERNAL;
    }
    if (status != 0) {
        if (reply != NULL)
            log_failure(NULL, "stock reaper", status, err);
        reap_step_done(r, status);
        return;
    }
    size_t n = rconn_reply_elements(reply);
    if (n > r->limit)
        n = r->limit;
    if (n > 0) {
        r->orders = calloc(n, sizeof(*r->orders));
        if (r->orders == NULL) {
            reap_step_done(r, SETTLE_ENOMEM);
            return;
        }
    }
    for (size_t i = 0; i < n; i++) {
        struct reap_order *o = &r->orders[i];
        size_t len;
        const char *id = rconn_reply_str(rconn_reply_element(reply, i), &len);
        if (!order_id_ok(id, len)) {
            say(err, sizeof(err), "deadline set holds malformed order id \"%.*s\"",
                (int)(len > 64 ? 64 : len), id);
            log_failure(NULL, "stock reaper", SETTLE_EPARSE, err);
            if (r->status == 0)
                r->status = SETTLE_EPARSE;
            continue;
        }
        o->reap = r;
        memcpy(o->id, id, len);
        o->id[len] = '\0';
        char key[KEY_MAX];
        int klen = build_key(key, sizeof(key), r->ns, "resv:", o->id, len);
        if (klen < 0) {
            if (r->status == 0)
                r->status = klen;
            continue;
        }
        const char *argv[2] = {"HGETALL", key};
        size_t lens[2] = {7, (size_t)klen};
        r->pending++;
        /* HGETALL {ns}:resv:<order>: the SKUs to name in the release. */
        int ret = rconn_command(r->rc, on_reap_hash, o, 2, argv, lens);
        if (ret != 0) {
            r->pending--;
            if (r->status == 0)
                r->status = ret;
        }
    }
    reap_step_done(r, 0);
}

int stock_reap(struct rconn *rc, const char *ns, unsigned limit,
               void (*done)(void *arg, int status, unsigned released), void *arg)
{
    if (rc == NULL || !ns_ok(ns) || done == NULL || limit < 1 || limit > REAP_LIMIT_MAX)
        return SETTLE_EINVAL;
    char key[KEY_MAX];
    int klen = build_key(key, sizeof(key), ns, "resv:", "deadlines", 9);
    if (klen < 0)
        return klen;
    struct reap *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return SETTLE_ENOMEM;
    r->ns = memdup0(ns, strlen(ns));
    if (r->ns == NULL) {
        free(r);
        return SETTLE_ENOMEM;
    }
    r->rc = rc;
    r->limit = limit;
    r->done = done;
    r->arg = arg;
    char limit_buf[16];
    snprintf(limit_buf, sizeof(limit_buf), "%u", limit);
    const char *argv[2] = {key, limit_buf};
    /* EVALSHA stock_due {ns}:resv:deadlines limit: order ids past their deadline. */
    int ret = rconn_eval(rc, "stock_due", 1, 2, argv, NULL, on_reap_due, r);
    if (ret != 0) {
        free(r->ns);
        free(r);
    }
    return ret;
}

/* ---------------------------------------------------------------------------------------------
 * Synchronous (CLI).
 */

/* Runs one script and maps its answer; the reply is freed before returning. */
static int sync_script(struct rconn_sync *s, struct script_args *a, enum stock_op op,
                       enum stock_result *result, char *detail, size_t detail_len)
{
    struct rconn_reply *reply = NULL;
    int ret = rconn_sync_eval(s, &reply, op_script(op), a->nkeys, a->argc, a->argv, a->len);
    if (ret != 0)
        say(detail, detail_len, "redis %s: connection failed", op_script(op));
    else
        ret = parse_answer(reply, op, result, detail, detail_len);
    rconn_sync_free(reply);
    return ret;
}

int stock_sync_reserve(struct rconn_sync *s, const char *ns, const char *order_id,
                       uint64_t deadline_ms, const struct stock_items *items,
                       enum stock_result *result, char *detail, size_t detail_len)
{
    if (s == NULL || !ns_ok(ns) || result == NULL) {
        say(detail, detail_len, "missing argument or bad namespace");
        return SETTLE_EINVAL;
    }
    if (!order_id_cstr_ok(order_id)) {
        say(detail, detail_len, "an order id is 1..%d bytes and not \"deadlines\"", JOB_ID_MAX);
        return SETTLE_EINVAL;
    }
    if (deadline_ms < 1 || deadline_ms > (uint64_t)MS_MAX) {
        say(detail, detail_len, "deadline_ms out of range");
        return SETTLE_EINVAL;
    }
    int ret = items_ok(items, 1, 1, detail, detail_len);
    if (ret != 0)
        return ret;
    struct script_args a;
    ret = build_reserve(&a, ns, order_id, deadline_ms, now_ms(), items);
    if (ret != 0) {
        say(detail, detail_len, "key too long");
        return ret;
    }
    /* EVALSHA stock_reserve: resv, deadlines, stock keys; order, deadline, created, items. */
    return sync_script(s, &a, STOCK_OP_RESERVE, result, detail, detail_len);
}

int stock_sync_release(struct rconn_sync *s, const char *ns, const char *order_id,
                       enum stock_result *result, char *err, size_t err_len)
{
    if (s == NULL || !ns_ok(ns) || result == NULL) {
        say(err, err_len, "missing argument or bad namespace");
        return SETTLE_EINVAL;
    }
    if (!order_id_cstr_ok(order_id)) {
        say(err, err_len, "an order id is 1..%d bytes and not \"deadlines\"", JOB_ID_MAX);
        return SETTLE_EINVAL;
    }
    char key[KEY_MAX];
    int klen = build_key(key, sizeof(key), ns, "resv:", order_id, strlen(order_id));
    if (klen < 0) {
        say(err, err_len, "key too long");
        return klen;
    }
    const char *argv[2] = {"HGETALL", key};
    size_t lens[2] = {7, (size_t)klen};
    struct rconn_reply *reply = NULL;
    struct hash_items h;
    /* HGETALL {ns}:resv:<order>: the SKUs the release must name. */
    int ret = rconn_sync_command(s, &reply, 2, argv, lens);
    if (ret != 0)
        say(err, err_len, "redis HGETALL: connection failed");
    else
        ret = parse_hash_items(reply, order_id, &h, err, err_len);
    rconn_sync_free(reply);
    if (ret != 0)
        return ret;
    struct script_args a;
    ret = build_release(&a, ns, order_id, &h.items);
    if (ret != 0) {
        say(err, err_len, "key too long");
        return ret;
    }
    /* EVALSHA stock_release: resv, deadlines, stock keys; order, SKUs. */
    return sync_script(s, &a, STOCK_OP_RELEASE, result, err, err_len);
}

/* Writes s as a JSON string. */
static void json_string(FILE *out, const char *s)
{
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(out, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(out, "\\u%04x", *p);
        else
            fputc(*p, out);
    }
    fputc('"', out);
}

struct show_entry {
    char *sku;
    char *value; /* as stored */
};

static int show_entry_cmp(const void *a, const void *b)
{
    return strcmp(((const struct show_entry *)a)->sku, ((const struct show_entry *)b)->sku);
}

static void show_print(FILE *out, const struct show_entry *e, size_t n, bool json)
{
    if (json)
        fputc('{', out);
    for (size_t i = 0; i < n; i++) {
        char *end = NULL;
        long long v = strtoll(e[i].value, &end, 10);
        int is_int = e[i].value[0] != '\0' && end != NULL && *end == '\0';
        if (!json) {
            fprintf(out, "%s  %s\n", e[i].sku, e[i].value);
            continue;
        }
        if (i > 0)
            fputs(", ", out);
        json_string(out, e[i].sku);
        /* A value that is not an integer is shown as null rather than breaking the JSON. */
        if (is_int)
            fprintf(out, ": %lld", v);
        else
            fputs(": null", out);
    }
    if (json)
        fputs("}\n", out);
}

/* Appends one SKU with its stored value; SETTLE_ETOOBIG past SHOW_SKUS_MAX. */
static int show_add(struct show_entry **e, size_t *n, size_t *cap, const char *sku, size_t sku_len,
                    const char *value, size_t value_len)
{
    if (*n == *cap) {
        if (*cap >= SHOW_SKUS_MAX)
            return SETTLE_ETOOBIG;
        size_t ncap = *cap == 0 ? 256 : *cap * 2;
        if (ncap > SHOW_SKUS_MAX)
            ncap = SHOW_SKUS_MAX;
        struct show_entry *ne = realloc(*e, ncap * sizeof(*ne));
        if (ne == NULL)
            return SETTLE_ENOMEM;
        *e = ne;
        *cap = ncap;
    }
    char *k = memdup0(sku, sku_len);
    char *v = memdup0(value, value_len);
    if (k == NULL || v == NULL) {
        free(k);
        free(v);
        return SETTLE_ENOMEM;
    }
    (*e)[*n].sku = k;
    (*e)[*n].value = v;
    (*n)++;
    return 0;
}

/* The SCAN MATCH pattern "{ns}:stock:*" with glob characters of ns escaped. */
static int scan_pattern(char *buf, size_t buf_len, const char *ns)
{
    size_t o = 0;
    if (buf_len < 1)
        return SETTLE_ETOOBIG;
    buf[o++] = '{';
    for (const char *p = ns; *p != '\0'; p++) {
        if (o + 2 >= buf_len)
            return SETTLE_ETOOBIG;
        if (strchr("*?[]\\", *p) != NULL)
            buf[o++] = '\\';
        buf[o++] = *p;
    }
    int n = snprintf(buf + o, buf_len - o, "}:stock:*");
    if (n < 0 || (size_t)n >= buf_len - o)
        return SETTLE_ETOOBIG;
    return (int)o + n;
}

/* One SCAN page: MGET of its keys, each SKU added to the entries. */
static int show_page(struct rconn_sync *s, const struct rconn_reply *keys, const char *prefix,
                     size_t prefix_len, struct show_entry **e, size_t *n, size_t *cap)
{
    size_t nk = rconn_reply_elements(keys);
    if (nk == 0)
        return 0;
    const char **argv = calloc(nk + 1, sizeof(*argv));
    size_t *lens = calloc(nk + 1, sizeof(*lens));
    struct rconn_reply *vals = NULL;
    int ret = SETTLE_ENOMEM;
    if (argv == NULL || lens == NULL)
        goto out;
    argv[0] = "MGET";
    lens[0] = 4;
    for (size_t i = 0; i < nk; i++)
        argv[i + 1] = rconn_reply_str(rconn_reply_element(keys, i), &lens[i + 1]);
    /* MGET of this page's stock keys (a key deleted since the SCAN reads as nil). */
    ret = rconn_sync_command(s, &vals, (int)nk + 1, argv, lens);
    if (ret != 0)
        goto out;
    ret = reply_status(vals, "MGET", NULL, 0);
    if (ret != 0)
        goto out;
    if (rconn_reply_elements(vals) != nk) {
        ret = SETTLE_EPARSE;
        goto out;
    }
    for (size_t i = 0; i < nk && ret == 0; i++) {
        const struct rconn_reply *v = rconn_reply_element(vals, i);
        if (rconn_reply_type(v) != RCONN_STRING)
            continue;
        if (lens[i + 1] <= prefix_len || memcmp(argv[i + 1], prefix, prefix_len) != 0)
            continue;
        const char *sku = argv[i + 1] + prefix_len;
        size_t sku_len = lens[i + 1] - prefix_len;
        if (!sku_ok(sku, sku_len))
            continue; /* not a key this module wrote */
        size_t vlen;
        const char *val = rconn_reply_str(v, &vlen);
        ret = show_add(e, n, cap, sku, sku_len, val, vlen);
    }
out:
    rconn_sync_free(vals);
    free(argv);
    free(lens);
    return ret;
}

/* Returns SETTLE_ENOTFOUND (printing nothing) when one SKU is asked for and has no key. */
int stock_sync_show(struct rconn_sync *s, const char *ns, const char *sku, bool json, FILE *out)
{
    if (s == NULL || !ns_ok(ns) || out == NULL || (sku != NULL && !sku_cstr_ok(sku)))
        return SETTLE_EINVAL;
    struct show_entry *e = NULL;
    size_t n = 0, cap = 0;
    struct rconn_reply *reply = NULL;
    char key[KEY_MAX];
    int ret;

    if (sku != NULL) {
        int klen = build_key(key, sizeof(key), ns, "stock:", sku, strlen(sku));
        if (klen < 0)
            return klen;
        const char *argv[2] = {"GET", key};
        size_t lens[2] = {3, (size_t)klen};
        /* GET {ns}:stock:<sku>. */
        ret = rconn_sync_command(s, &reply, 2, argv, lens);
        if (ret == 0)
            ret = reply_status(reply, "GET", NULL, 0);
        if (ret == 0 && rconn_reply_type(reply) == RCONN_NIL)
            ret = SETTLE_ENOTFOUND;
        else if (ret == 0 && rconn_reply_type(reply) != RCONN_STRING)
            ret = SETTLE_EPARSE;
        if (ret == 0) {
            size_t vlen;
            const char *v = rconn_reply_str(reply, &vlen);
            ret = show_add(&e, &n, &cap, sku, strlen(sku), v, vlen);
        }
        rconn_sync_free(reply);
        reply = NULL;
        if (ret == 0)
            show_print(out, e, n, json);
        goto out;
    }

    char pattern[KEY_MAX * 2];
    int plen = scan_pattern(pattern, sizeof(pattern), ns);
    int prefix_len = build_key(key, sizeof(key), ns, "stock:", "", 0);
    if (plen < 0 || prefix_len < 0) {
        ret = SETTLE_ETOOBIG;
        goto out;
    }
    char cursor[32] = "0";
    int finished = 0;
    ret = 0;
    for (unsigned rounds = 0; ret == 0 && !finished && rounds < SCAN_ROUNDS_MAX; rounds++) {
        const char *argv[6] = {"SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT};
        size_t lens[6] = {4, strlen(cursor), 5, (size_t)plen, 5, strlen(SCAN_COUNT)};
        /* SCAN cursor MATCH {ns}:stock:* COUNT 1000: the next page of stock keys. */
        ret = rconn_sync_command(s, &reply, 6, argv, lens);
        if (ret == 0)
            ret = reply_status(reply, "SCAN", NULL, 0);
        if (ret == 0 && (rconn_reply_elements(reply) != 2 ||
                         rconn_reply_type(rconn_reply_element(reply, 1)) != RCONN_ARRAY))
            ret = SETTLE_EPARSE;
        if (ret == 0) {
            size_t clen;
            const char *c = rconn_reply_str(rconn_reply_element(reply, 0), &clen);
            if (clen == 0 || clen >= sizeof(cursor)) {
                ret = SETTLE_EPARSE;
            } else {
                memcpy(cursor, c, clen);
                cursor[clen] = '\0';
                finished = strcmp(cursor, "0") == 0;
                ret = show_page(s, rconn_reply_element(reply, 1), key, (size_t)prefix_len, &e, &n,
                                &cap);
            }
        }
        rconn_sync_free(reply);
        reply = NULL;
    }
    if (ret == 0 && !finished)
        ret = SETTLE_ETOOBIG;
    if (ret != 0)
        goto out;
    qsort(e, n, sizeof(*e), show_entry_cmp);
    /* SCAN may return a key more than once: keep the first of equal neighbours. */
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (m > 0 && strcmp(e[m - 1].sku, e[i].sku) == 0) {
            free(e[i].sku);
            free(e[i].value);
            continue;
        }
        e[m++] = e[i];
    }
    n = m;
    show_print(out, e, n, json);
out:
    for (size_t i = 0; i < n; i++) {
        free(e[i].sku);
        free(e[i].value);
    }
    free(e);
    if (ret == 0 && ferror(out))
        ret = SETTLE_EIO;
    return ret;
}

/* A SKU of stock_sync_load with its position in the caller's arrays. */
struct load_sku {
    const char *sku;
    unsigned i;
};

static int load_sku_cmp(const void *a, const void *b)
{
    return strcmp(((const struct load_sku *)a)->sku, ((const struct load_sku *)b)->sku);
}

/* Adds the units of one reservation (if reserved) to the per-SKU sums. */
static int load_order(struct rconn_sync *s, const char *ns, const char *id, size_t id_len,
                      const struct load_sku *sorted, unsigned n, int64_t *reserved, char *err,
                      size_t err_len)
{
    char order[JOB_ID_MAX + 1];
    if (!order_id_ok(id, id_len)) {
        say(err, err_len, "deadline set holds a malformed order id");
        return SETTLE_EPARSE;
    }
    memcpy(order, id, id_len);
    order[id_len] = '\0';
    char key[KEY_MAX];
    int klen = build_key(key, sizeof(key), ns, "resv:", order, id_len);
    if (klen < 0) {
        say(err, err_len, "key too long");
        return klen;
    }
    const char *argv[2] = {"HGETALL", key};
    size_t lens[2] = {7, (size_t)klen};
    struct rconn_reply *reply = NULL;
    struct hash_items h;
    /* HGETALL {ns}:resv:<order>: its state and items. */
    int ret = rconn_sync_command(s, &reply, 2, argv, lens);
    if (ret != 0)
        say(err, err_len, "redis HGETALL: connection failed");
    else
        ret = parse_hash_items(reply, order, &h, err, err_len);
    rconn_sync_free(reply);
    if (ret != 0 || strcmp(h.state, "reserved") != 0)
        return ret;
    for (unsigned k = 0; k < h.items.n; k++) {
        struct load_sku want = {.sku = h.items.sku[k]};
        const struct load_sku *hit = bsearch(&want, sorted, n, sizeof(*sorted), load_sku_cmp);
        if (hit != NULL)
            reserved[hit->i] += h.items.qty[k];
    }
    return 0;
}

/* Sets one SKU's available units and prints the line. */
static int load_set(struct rconn_sync *s, const char *ns, const char *sku, int64_t on_hand,
                    int64_t reserved, FILE *out, char *err, size_t err_len)
{
    int64_t available = on_hand - reserved;
    if (available < 0) {
        fprintf(out,
                "warning: sku %s: %" PRId64 " units reserved but only %" PRId64
                " on hand; available set to 0\n",
                sku, reserved, on_hand);
        available = 0;
    }
    char key[KEY_MAX];
    int klen = build_key(key, sizeof(key), ns, "stock:", sku, strlen(sku));
    if (klen < 0) {
        say(err, err_len, "key too long");
        return klen;
    }
    char val[24];
    snprintf(val, sizeof(val), "%" PRId64, available);
    const char *argv[4] = {"SET", key, val, "GET"};
    size_t lens[4] = {3, (size_t)klen, strlen(val), 3};
    struct rconn_reply *reply = NULL;
    /* SET {ns}:stock:<sku> available GET: the old value comes back for the report. */
    int ret = rconn_sync_command(s, &reply, 4, argv, lens);
    if (ret != 0)
        say(err, err_len, "redis SET: connection failed");
    else
        ret = reply_status(reply, "SET", err, err_len);
    if (ret == 0) {
        size_t wlen = 4;
        const char *was = "none";
        if (rconn_reply_type(reply) == RCONN_STRING)
            was = rconn_reply_str(reply, &wlen);
        fprintf(out,
                "%s on_hand=%" PRId64 " reserved=%" PRId64 " available=%" PRId64 " (was %.*s)\n",
                sku, on_hand, reserved, available, (int)wlen, was);
    }
    rconn_sync_free(reply);
    return ret;
}

/*
 * Not atomic with concurrent reservations: a reservation made or released between reading
 * the reservations and the SET of a SKU is lost from (or counted twice in) that SKU's
 * figure, and paging the deadline set by index may skip members that move meanwhile. Run it
 * while producers are paused; the nightly stock sync repairs live drift later. Nothing is
 * SET unless every reservation was read.
 */
int stock_sync_load(struct rconn_sync *s, const char *ns, unsigned n, const char *const *skus,
                    const int64_t *on_hand, FILE *out, char *err, size_t err_len)
{
    if (s == NULL || !ns_ok(ns) || skus == NULL || on_hand == NULL || out == NULL) {
        say(err, err_len, "missing argument or bad namespace");
        return SETTLE_EINVAL;
    }
    if (n < 1 || n > LOAD_SKUS_MAX) {
        say(err, err_len, "between 1 and %d SKUs required", LOAD_SKUS_MAX);
        return SETTLE_EINVAL;
    }
    for (unsigned i = 0; i < n; i++) {
        if (!sku_cstr_ok(skus[i])) {
            say(err, err_len, "SKU %u: a SKU is 1..%d bytes without '{' or '}'", i + 1, SKU_MAX);
            return SETTLE_EINVAL;
        }
        if (on_hand[i] < 0 || on_hand[i] > MS_MAX) {
            say(err, err_len, "sku %s: on hand must be 0..%lld", skus[i], MS_MAX);
            return SETTLE_EINVAL;
        }
    }
    struct load_sku *sorted = calloc(n, sizeof(*sorted));
    int64_t *reserved = calloc(n, sizeof(*reserved));
    struct rconn_reply *reply = NULL;
    int ret = SETTLE_ENOMEM;
    if (sorted == NULL || reserved == NULL) {
        say(err, err_len, "out of memory");
        goto out;
    }
    for (unsigned i = 0; i < n; i++) {
        sorted[i].sku = skus[i];
        sorted[i].i = i;
    }
    qsort(sorted, n, sizeof(*sorted), load_sku_cmp);
    for (unsigned i = 1; i < n; i++) {
        if (strcmp(sorted[i - 1].sku, sorted[i].sku) == 0) {
            say(err, err_len, "SKU %s is listed twice", sorted[i].sku);
            ret = SETTLE_EINVAL;
            goto out;
        }
    }

    char dkey[KEY_MAX];
    int dlen = build_key(dkey, sizeof(dkey), ns, "resv:", "deadlines", 9);
    if (dlen < 0) {
        say(err, err_len, "key too long");
        ret = dlen;
        goto out;
    }
    int complete = 0;
    ret = 0;
    for (unsigned page = 0; ret == 0 && !complete && page < LOAD_PAGES_MAX; page++) {
        char start[24], stop[24];
        snprintf(start, sizeof(start), "%u", page * LOAD_PAGE);
        snprintf(stop, sizeof(stop), "%u", page * LOAD_PAGE + LOAD_PAGE - 1);
        const char *argv[4] = {"ZRANGE", dkey, start, stop};
        size_t lens[4] = {6, (size_t)dlen, strlen(start), strlen(stop)};
        /* ZRANGE {ns}:resv:deadlines start stop: the next page of active reservations. */
        ret = rconn_sync_command(s, &reply, 4, argv, lens);
        if (ret != 0)
            say(err, err_len, "redis ZRANGE: connection failed");
        else
            ret = reply_status(reply, "ZRANGE", err, err_len);
        if (ret == 0 && rconn_reply_type(reply) != RCONN_ARRAY) {
            say(err, err_len, "redis ZRANGE: unexpected answer");
            ret = SETTLE_EPARSE;
        }
        size_t m = ret == 0 ? rconn_reply_elements(reply) : 0;
        for (size_t i = 0; ret == 0 && i < m; i++) {
            size_t id_len;
            const char *id = rconn_reply_str(rconn_reply_element(reply, i), &id_len);
            ret = load_order(s, ns, id, id_len, sorted, n, reserved, err, err_len);
        }
        complete = ret == 0 && m < LOAD_PAGE;
        rconn_sync_free(reply);
        reply = NULL;
    }
    if (ret == 0 && !complete) {
        say(err, err_len, "more than %d active reservations; nothing changed",
            LOAD_PAGE * LOAD_PAGES_MAX);
        ret = SETTLE_ETOOBIG;
    }
    for (unsigned k = 0; ret == 0 && k < n; k++) {
        unsigned i = sorted[k].i;
        ret = load_set(s, ns, skus[i], on_hand[i], reserved[i], out, err, err_len);
    }
    if (ret == 0 && ferror(out)) {
        say(err, err_len, "writing the report failed");
        ret = SETTLE_EIO;
    }
out:
    free(sorted);
    free(reserved);
    return ret;
}
