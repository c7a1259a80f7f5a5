/*
 * pgsim.c - the PG simulator (`settle pgsim`): the seed 001 payment gateway API (Loopers PG
 * simulator shapes) served over HTTP with libmicrohttpd, a seed 003 fault profile (a share of
 * answers fail with 500, a share arrive only after a long delay), one-shot injected answers,
 * and loopback admin endpoints that let tests seed payments and read back what they sent.
 *
 * Threads: pgsim_main runs on the calling thread, blocks SIGINT/SIGTERM, starts the daemon and
 * waits in sigwait. libmicrohttpd serves every connection from one internal thread (epoll). An
 * answer the fault profile delays is not slept on: its connection is suspended and the timer
 * thread (struct timers) resumes it when the delay is over, and the answer goes out then. So a
 * thousand slow answers cost a thousand heap entries, not a thousand sleeping threads - the
 * simulator's own CPU stays small beside the worker it is measured against (bench/).
 * All simulator state (struct pgsim) sits behind one mutex, taken for the decision and the
 * effect of a request and released before any network write.
 * Ownership: struct pgsim owns the store, the request log and the injections; a struct
 * request (one HTTP request) is owned by the daemon's thread from the URI callback to the
 * completion callback (the timer thread only touches its connection pointer); a struct
 * answer holds copies only, never pointers into the store.
 */
#include "settle/pgsim.h"

#include "pgsim_int.h"
#include "settle/error.h"
#include "settle/log.h"

#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <microhttpd.h>

#define API_BODY_MAX (64 * 1024)
/* Admin batches seed thousands of payments in one call, so admin bodies get more room. */
#define ADMIN_BODY_MAX (8 * 1024 * 1024)
#define INJECT_MAX 1000
#define INJECT_DELAY_MAX_MS (3600 * 1000)
#define CONN_LIMIT 4096
#define CONN_TIMEOUT_S 120
#define LIST_SIZE_DEFAULT 100
#define LIST_SIZE_MAX 1000
#define LIST_PAGE_MAX 1000000000LL
#define KEY_ATTEMPTS 64
#define DEFAULT_CARD_NO "1234-5678-9012-3456"

struct faults {
    double fail_rate;
    double slow_rate;
    int64_t slow_ms;
    int64_t latency_min_ms;
    int64_t latency_max_ms;
};

struct opts {
    const char *listen;
    const char *port_file;
    struct faults faults;
    int64_t process_min_ms;
    int64_t process_max_ms;
    double success_rate;
    uint64_t seed;
    bool seed_given;
    int64_t max_transactions;
    int64_t max_log;
    int64_t idle_timeout_s;
};

struct injection {
    uint64_t id;
    char *match;
    unsigned status;
    int64_t remaining;
    int64_t delay_ms;
    int64_t retry_after_s; /* -1: no Retry-After header */
    char *body;            /* NULL: the standard FAIL wrapper */
};

enum endpoint {
    EP_CREATE = 0,
    EP_GET = 1,
    EP_LIST_BY_ORDER = 2,
    EP_LIST = 3,
    EP_CANCEL = 4,
    EP_OTHER = 5,
    EP_COUNT = 6,
};

static const char *const endpoint_names[EP_COUNT] = {"create", "get",    "listByOrder",
                                                     "list",   "cancel", "other"};

struct stats {
    uint64_t api[EP_COUNT][PGSIM_FAULT_COUNT];
    uint64_t status_class[6]; /* by status / 100 */
    uint64_t replays;
    uint64_t cancel_effects;
    uint64_t created;
    uint64_t admin;
    uint64_t health;
};

/* A suspended connection and when its held answer is due (CLOCK_MONOTONIC, microseconds). */
struct held {
    int64_t due_us;
    struct MHD_Connection *conn;
};

/* The delayed answers: a min-heap by due time, one entry per suspended connection (so at
 * most CONN_LIMIT), and the thread that resumes them. */
struct timers {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* on CLOCK_MONOTONIC */
    struct held heap[CONN_LIMIT];
    size_t n;
    bool stop;
    bool started;
    pthread_t thread;
};

struct pgsim {
    pthread_mutex_t lock;
    /* Guarded by lock: */
    struct faults faults;
    int64_t process_min_ms;
    int64_t process_max_ms;
    double success_rate;
    uint64_t rng;
    struct pgsim_store store;
    struct pgsim_reqlog log;
    struct injection injections[INJECT_MAX];
    size_t ninjections;
    uint64_t next_injection_id;
    struct stats stats;
    struct timers timers; /* its own lock */
};

/* An answer under construction; it holds copies only, so it outlives the lock. */
struct answer {
    unsigned status;
    json_t *json;
    char *text; /* sent verbatim when set (stored idempotent answers, injected bodies) */
    int64_t retry_after_s;
    int64_t delay_ms;
    enum pgsim_fault faulted;
    bool replayed;
};

/* One HTTP request, from the URI callback to the completion callback. */
struct request {
    char *raw_uri; /* as received: the query is still percent-encoded */
    int64_t arrival_ms;
    char *body;
    size_t len;
    size_t cap;
    size_t limit;
    bool headers_seen;
    bool too_big;
    bool answered;
    bool holding;       /* suspended until the timer thread resumes it to send held */
    struct answer held; /* owned by the request while holding */
};

/* What the handlers see of a request. */
struct call {
    struct MHD_Connection *conn;
    const char *method;
    const char *path;  /* decoded by libmicrohttpd */
    const char *query; /* raw, NULL when absent */
    const char *user_id;
    const char *idem_key;
    json_t *body;  /* parsed POST body, NULL when empty or malformed */
    bool body_bad; /* a non-empty body that is not a JSON object */
    int64_t now_ms;
};

struct route {
    enum endpoint ep;
    unsigned other_status; /* EP_OTHER: 404 or 405 */
    bool key_ok;           /* the path's transaction key fits PGSIM_ID_MAX */
    char key[PGSIM_ID_MAX + 1];
};

/* --- small helpers ---------------------------------------------------------------------------- */

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* --- delayed answers ------------------------------------------------------------------------ */

static void heap_push(struct timers *t, struct held h)
{
    size_t i = t->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (t->heap[parent].due_us <= h.due_us)
            break;
        t->heap[i] = t->heap[parent];
        i = parent;
    }
    t->heap[i] = h;
}

static struct held heap_pop(struct timers *t)
{
    struct held top = t->heap[0];
    struct held last = t->heap[--t->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= t->n)
            break;
        if (c + 1 < t->n && t->heap[c + 1].due_us < t->heap[c].due_us)
            c++;
        if (last.due_us <= t->heap[c].due_us)
            break;
        t->heap[i] = t->heap[c];
        i = c;
    }
    if (t->n > 0)
        t->heap[i] = last;
    return top;
}

/* Resumes each suspended connection when its answer is due; libmicrohttpd then calls
 * on_request again on its own thread, which sends the held answer. */
static void *timers_main(void *arg)
{
    struct timers *t = arg;
    pthread_mutex_lock(&t->mu);
    while (!t->stop) {
        if (t->n == 0) {
            pthread_cond_wait(&t->cv, &t->mu);
            continue;
        }
        int64_t due = t->heap[0].due_us;
        if (due <= mono_us()) {
            struct held h = heap_pop(t);
            pthread_mutex_unlock(&t->mu);
            MHD_resume_connection(h.conn);
            pthread_mutex_lock(&t->mu);
            continue;
        }
        struct timespec ts = {.tv_sec = (time_t)(due / 1000000),
                              .tv_nsec = (long)(due % 1000000) * 1000L};
        pthread_cond_timedwait(&t->cv, &t->mu, &ts);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

static int timers_start(struct timers *t)
{
    pthread_condattr_t attr;
    if (pthread_mutex_init(&t->mu, NULL) != 0)
        return SETTLE_ENOMEM;
    if (pthread_condattr_init(&attr) != 0 ||
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 ||
        pthread_cond_init(&t->cv, &attr) != 0) {
        pthread_mutex_destroy(&t->mu);
        return SETTLE_ENOMEM;
    }
    pthread_condattr_destroy(&attr);
    if (pthread_create(&t->thread, NULL, timers_main, t) != 0) {
        pthread_cond_destroy(&t->cv);
        pthread_mutex_destroy(&t->mu);
        return SETTLE_ENOMEM;
    }
    t->started = true;
    return 0;
}

/* Holds conn (already suspended) for delay_ms. After timers_stop it is resumed at once, so
 * no connection stays suspended past shutdown. */
static void timers_hold(struct timers *t, struct MHD_Connection *conn, int64_t delay_ms)
{
    pthread_mutex_lock(&t->mu);
    if (t->stop || t->n == CONN_LIMIT) {
        /* Stopping (or, impossibly, more suspended connections than the daemon allows). */
        pthread_mutex_unlock(&t->mu);
        MHD_resume_connection(conn);
        return;
    }
    struct held h = {.due_us = mono_us() + delay_ms * 1000, .conn = conn};
    heap_push(t, h);
    bool first = t->heap[0].conn == conn;
    pthread_mutex_unlock(&t->mu);
    if (first)
        pthread_cond_signal(&t->cv);
}

/* Stops the timer thread and resumes every connection still held, so their answers go out
 * now and libmicrohttpd can close them (a daemon must not stop with suspended connections). */
static void timers_stop(struct timers *t)
{
    if (!t->started)
        return;
    pthread_mutex_lock(&t->mu);
    t->stop = true;
    pthread_mutex_unlock(&t->mu);
    pthread_cond_signal(&t->cv);
    pthread_join(t->thread, NULL);
    /* One at a time, never resuming under our lock (libmicrohttpd takes its own). */
    for (;;) {
        pthread_mutex_lock(&t->mu);
        bool any = t->n > 0;
        struct held h = any ? heap_pop(t) : (struct held){0};
        pthread_mutex_unlock(&t->mu);
        if (!any)
            break;
        MHD_resume_connection(h.conn);
    }
}

/* After timers_stop (and the daemon's stop): nothing uses the lock any more. */
static void timers_free(struct timers *t)
{
    if (!t->started)
        return;
    t->started = false;
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
}

/* splitmix64: tiny, seedable and good enough for fault draws; callers hold sim->lock. */
static uint64_t rng_next(struct pgsim *sim)
{
    uint64_t z = (sim->rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static double rng_unit(struct pgsim *sim)
{
    return (double)(rng_next(sim) >> 11) * 0x1.0p-53;
}

/* Uniform in [lo, hi]. */
static int64_t rng_between(struct pgsim *sim, int64_t lo, int64_t hi)
{
    if (hi <= lo)
        return lo;
    uint64_t span = (uint64_t)(hi - lo) + 1;
    return lo + (int64_t)(rng_next(sim) % span);
}

static bool starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static int parse_i64(const char *s, int64_t min, int64_t max, int64_t *out)
{
    if (s == NULL || *s == '\0')
        return SETTLE_EINVAL;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return SETTLE_EINVAL;
    *out = v;
    return 0;
}

static int parse_rate(const char *s, double *out)
{
    if (s == NULL || *s == '\0')
        return SETTLE_EINVAL;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    /* The negated comparison also rejects NaN. */
    if (errno != 0 || *end != '\0' || !(v >= 0.0 && v <= 1.0))
        return SETTLE_EINVAL;
    *out = v;
    return 0;
}

/* "MIN-MAX" or "N" (milliseconds, MIN <= MAX). */
static int parse_ms_range(const char *s, int64_t *lo, int64_t *hi)
{
    char buf[64];
    if (s == NULL || strlen(s) >= sizeof(buf))
        return SETTLE_EINVAL;
    memcpy(buf, s, strlen(s) + 1);
    char *dash = strchr(buf, '-');
    if (dash == NULL) {
        if (parse_i64(buf, 0, INT32_MAX, lo) != 0)
            return SETTLE_EINVAL;
        *hi = *lo;
        return 0;
    }
    *dash = '\0';
    if (parse_i64(buf, 0, INT32_MAX, lo) != 0 || parse_i64(dash + 1, 0, INT32_MAX, hi) != 0 ||
        *lo > *hi)
        return SETTLE_EINVAL;
    return 0;
}

static bool is_card_type(const char *s)
{
    return strcmp(s, "SAMSUNG") == 0 || strcmp(s, "KB") == 0 || strcmp(s, "HYUNDAI") == 0;
}

/* dddd-dddd-dddd-dddd, as the Loopers simulator's validation requires. */
static bool is_card_no(const char *s)
{
    for (int i = 0; i < 19; i++) {
        if (i % 5 == 4) {
            if (s[i] != '-')
                return false;
        } else if (s[i] < '0' || s[i] > '9') {
            return false;
        }
    }
    return s[19] == '\0';
}

/* Header ids (X-USER-ID, Idempotency-Key) are echoed into JSON and logs, so keep them to
 * 1..PGSIM_ID_MAX printable ASCII characters. */
static bool is_header_id(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > PGSIM_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return false;
    }
    return true;
}

static bool is_id(const char *s)
{
    size_t n = strlen(s);
    return n > 0 && n <= PGSIM_ID_MAX;
}

static int parse_status(const char *s, enum pgsim_status *out)
{
    static const enum pgsim_status all[] = {PGSIM_PENDING, PGSIM_SUCCESS, PGSIM_FAILED,
                                            PGSIM_PARTIALLY_CANCELLED, PGSIM_CANCELLED};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        if (strcmp(s, pgsim_status_name(all[i])) == 0) {
            *out = all[i];
            return 0;
        }
    }
    return SETTLE_EINVAL;
}

static char *dup_or_null(const char *s)
{
    return s == NULL ? NULL : strdup(s);
}

/* --- JSON helpers ------------------------------------------------------------------------------
 */

static json_t *jstr(const char *s)
{
    if (s == NULL)
        return json_null();
    json_t *j = json_string(s);
    /* Paths and queries are raw bytes; JSON output must stay valid UTF-8. */
    return j != NULL ? j : json_string("(invalid utf-8)");
}

static json_t *jint(int64_t v)
{
    return json_integer((json_int_t)v);
}

/* obj[name] as a string: 1 when present, 0 when absent or null, -1 on a wrong type. */
static int get_str(const json_t *obj, const char *name, const char **out)
{
    json_t *v = json_object_get(obj, name);
    *out = NULL;
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v))
        return -1; /* embedded NULs would make C strings lie */
    *out = json_string_value(v);
    return 1;
}

/* obj[name] as an integer: 1 when present, 0 when absent or null, -1 on a wrong type. */
static int get_int(const json_t *obj, const char *name, int64_t *out)
{
    json_t *v = json_object_get(obj, name);
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return -1;
    *out = json_integer_value(v);
    return 1;
}

/* errorCode is the status's reason phrase, as Spring (and so the Loopers simulator) writes
 * it; fixed here so it does not drift with libmicrohttpd's naming (e.g. 422). */
static const char *reason_phrase(unsigned status)
{
    switch (status) {
    case 400:
        return "Bad Request";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 422:
        return "Unprocessable Entity";
    case 429:
        return "Too Many Requests";
    case 500:
        return "Internal Server Error";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 507:
        return "Insufficient Storage";
    default:
        return MHD_get_reason_phrase_for(status);
    }
}

/* The Loopers envelope: {"meta":{"result","errorCode","message"},"data":...}. Steals data. */
static json_t *wrap(bool ok, const char *error_code, const char *message, json_t *data)
{
    json_t *meta = json_object();
    json_object_set_new(meta, "result", json_string(ok ? "SUCCESS" : "FAIL"));
    json_object_set_new(meta, "errorCode", jstr(error_code));
    json_object_set_new(meta, "message", jstr(message));
    json_t *root = json_object();
    json_object_set_new(root, "meta", meta);
    json_object_set_new(root, "data", data != NULL ? data : json_null());
    return root;
}

static void answer_reset(struct answer *a)
{
    json_decref(a->json);
    a->json = NULL;
    free(a->text);
    a->text = NULL;
}

static void answer_ok(struct answer *a, json_t *data)
{
    answer_reset(a);
    a->status = MHD_HTTP_OK;
    a->json = wrap(true, NULL, NULL, data);
}

static void answer_fail(struct answer *a, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void answer_fail(struct answer *a, unsigned status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    answer_reset(a);
    a->status = status;
    a->json = wrap(false, reason_phrase(status), msg, NULL);
}

/* --- transaction views --------------------------------------------------------------------- */

static json_t *txn_detail(const struct pgsim_txn *t)
{
    json_t *o = json_object();
    json_object_set_new(o, "transactionKey", jstr(t->key));
    json_object_set_new(o, "orderId", jstr(t->order_id));
    json_object_set_new(o, "cardType", jstr(t->card_type));
    /* A simulator returns the card number as stored; our own logs never print it. */
    json_object_set_new(o, "cardNo", jstr(t->card_no));
    json_object_set_new(o, "amount", jint(t->amount));
    json_object_set_new(o, "status", json_string(pgsim_status_name(t->status)));
    json_object_set_new(o, "reason", jstr(t->reason));
    json_object_set_new(o, "cancelledAmount", jint(t->cancelled_amount));
    json_object_set_new(o, "balanceAmount", jint(pgsim_txn_balance(t)));
    return o;
}

static json_t *txn_list_item(const struct pgsim_txn *t)
{
    json_t *o = json_object();
    json_object_set_new(o, "transactionKey", jstr(t->key));
    json_object_set_new(o, "orderId", jstr(t->order_id));
    json_object_set_new(o, "userId", jstr(t->user_id));
    json_object_set_new(o, "status", json_string(pgsim_status_name(t->status)));
    json_object_set_new(o, "reason", jstr(t->reason));
    json_object_set_new(o, "amount", jint(t->amount));
    json_object_set_new(o, "createdAt", jint(t->created_ms));
    json_object_set_new(o, "cancelledAmount", jint(t->cancelled_amount));
    json_object_set_new(o, "balanceAmount", jint(pgsim_txn_balance(t)));
    return o;
}

static json_t *txn_admin_view(const struct pgsim_txn *t)
{
    json_t *o = txn_detail(t);
    bool will_change = t->status == PGSIM_PENDING && t->final_status != PGSIM_PENDING;
    json_object_set_new(o, "userId", jstr(t->user_id));
    json_object_set_new(o, "createdAt", jint(t->created_ms));
    json_object_set_new(o, "finalStatus",
                        will_change ? json_string(pgsim_status_name(t->final_status))
                                    : json_null());
    json_object_set_new(o, "finalAt", will_change ? jint(t->final_at_ms) : json_null());
    json_object_set_new(o, "callbackUrl", jstr(t->callback_url));
    json_object_set_new(o, "cancelEffects", json_integer(t->cancel_effects));
    return o;
}

/* --- transactions -------------------------------------------------------------------------- */

/* Gives t a fresh "YYYYMMDD:TR:xxxxxx" key (date of createdAt, UTC) unless it has one, then
 * inserts it. 0 or the store's error; on error the caller still owns t. */
static int insert_txn(struct pgsim *sim, struct pgsim_txn *t)
{
    if (t->key == NULL) {
        time_t secs = (time_t)(t->created_ms / 1000);
        struct tm tm;
        if (gmtime_r(&secs, &tm) == NULL)
            return SETTLE_EINVAL;
        char key[64];
        int attempt = 0;
        /* 24 random bits per day: collisions are rare but possible at 100k+, so redraw. */
        do {
            snprintf(key, sizeof(key), "%04d%02d%02d:TR:%06x", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, (unsigned)(rng_next(sim) & 0xffffffU));
        } while (pgsim_store_find(&sim->store, key) != NULL && ++attempt < KEY_ATTEMPTS);
        if (attempt == KEY_ATTEMPTS)
            return SETTLE_EFULL;
        t->key = strdup(key);
        if (t->key == NULL)
            return SETTLE_ENOMEM;
    }
    return pgsim_store_insert(&sim->store, t);
}

static void answer_insert_error(struct pgsim *sim, struct answer *a, int rc)
{
    if (rc == SETTLE_EFULL)
        answer_fail(a, MHD_HTTP_INSUFFICIENT_STORAGE,
                    "transaction limit reached (--max-transactions %zu); POST /admin/reset or "
                    "restart with a larger limit",
                    sim->store.max_count);
    else if (rc == SETTLE_ECONFLICT)
        answer_fail(a, MHD_HTTP_CONFLICT, "transactionKey already exists");
    else
        answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "cannot store the payment: %s",
                    settle_strerror(rc));
}

/* The transaction named in the path, if it exists and belongs to user_id. Another user's
 * payment is reported exactly like a missing one, so its existence never leaks. */
static struct pgsim_txn *find_owned(struct pgsim *sim, const struct route *r, const char *user_id)
{
    if (!r->key_ok)
        return NULL;
    struct pgsim_txn *t = pgsim_store_find(&sim->store, r->key);
    if (t == NULL || strcmp(t->user_id, user_id) != 0)
        return NULL;
    return t;
}

/* --- API endpoints (caller holds sim->lock) ----------------------------------------------- */

static bool require_user(const struct call *c, struct answer *a)
{
    if (c->user_id == NULL) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "X-USER-ID header is required");
        return false;
    }
    if (!is_header_id(c->user_id)) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "X-USER-ID must be 1 to %d printable ASCII characters",
                    PGSIM_ID_MAX);
        return false;
    }
    return true;
}

static void api_create(struct pgsim *sim, const struct call *c, struct answer *a)
{
    const char *order_id;
    const char *card_type;
    const char *card_no;
    const char *callback_url;
    int64_t amount = 0;

    if (!require_user(c, a))
        return;
    if (c->body == NULL) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "request body must be a JSON object");
        return;
    }
    if (get_str(c->body, "orderId", &order_id) != 1 || strlen(order_id) < 6 ||
        strlen(order_id) > PGSIM_ID_MAX) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "orderId must be a string of 6 to %d characters",
                    PGSIM_ID_MAX);
        return;
    }
    if (get_str(c->body, "cardType", &card_type) != 1 || !is_card_type(card_type)) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "cardType must be one of SAMSUNG, KB, HYUNDAI");
        return;
    }
    if (get_str(c->body, "cardNo", &card_no) != 1 || !is_card_no(card_no)) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "cardNo must have the form xxxx-xxxx-xxxx-xxxx");
        return;
    }
    if (get_int(c->body, "amount", &amount) != 1 || amount <= 0) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "amount must be a positive integer");
        return;
    }
    int rc = get_str(c->body, "callbackUrl", &callback_url);
    if (rc < 0 || (rc == 1 && strlen(callback_url) > PGSIM_URL_MAX)) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "callbackUrl must be a string of at most %d bytes",
                    PGSIM_URL_MAX);
        return;
    }
    if (sim->store.count >= sim->store.max_count) {
        answer_insert_error(sim, a, SETTLE_EFULL);
        return;
    }

    struct pgsim_txn *t = pgsim_txn_new();
    if (t == NULL)
        goto nomem;
    t->user_id = strdup(c->user_id);
    t->order_id = strdup(order_id);
    t->card_type = strdup(card_type);
    t->card_no = strdup(card_no);
    /* Stored so GETs can show it, but never called: the worker under test polls instead, and
     * a simulator that calls out would need its own client, timeouts and retries. */
    t->callback_url = dup_or_null(callback_url);
    if (t->user_id == NULL || t->order_id == NULL || t->card_type == NULL || t->card_no == NULL ||
        (callback_url != NULL && t->callback_url == NULL))
        goto nomem;
    t->amount = amount;
    t->created_ms = c->now_ms;
    t->status = PGSIM_PENDING;
    /* The outcome and its time are drawn now and applied when read (pgsim_txn_settle), so the
     * simulator needs no timers and a seed reproduces a whole run. */
    if (rng_unit(sim) < sim->success_rate) {
        t->final_status = PGSIM_SUCCESS;
    } else {
        t->final_status = PGSIM_FAILED;
        t->final_reason = strdup((rng_next(sim) & 1) != 0 ? "LIMIT_EXCEEDED" : "INVALID_CARD");
        if (t->final_reason == NULL)
            goto nomem;
    }
    t->final_at_ms = c->now_ms + rng_between(sim, sim->process_min_ms, sim->process_max_ms);
    rc = insert_txn(sim, t);
    if (rc != 0) {
        pgsim_txn_free(t);
        answer_insert_error(sim, a, rc);
        return;
    }
    sim->stats.created++;
    json_t *data = json_object();
    json_object_set_new(data, "transactionKey", jstr(t->key));
    json_object_set_new(data, "status", json_string("PENDING"));
    json_object_set_new(data, "reason", json_null());
    answer_ok(a, data);
    return;

nomem:
    pgsim_txn_free(t);
    answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
}

static void api_get(struct pgsim *sim, const struct call *c, const struct route *r,
                    struct answer *a)
{
    if (!require_user(c, a))
        return;
    struct pgsim_txn *t = find_owned(sim, r, c->user_id);
    if (t == NULL) {
        answer_fail(a, MHD_HTTP_NOT_FOUND, "payment not found");
        return;
    }
    pgsim_txn_settle(t, c->now_ms);
    answer_ok(a, txn_detail(t));
}

static void api_list_by_order(struct pgsim *sim, const struct call *c, struct answer *a)
{
    if (!require_user(c, a))
        return;
    const char *order_id = MHD_lookup_connection_value(c->conn, MHD_GET_ARGUMENT_KIND, "orderId");
    struct pgsim_txn **v = NULL;
    long n = pgsim_store_by_order(&sim->store, c->user_id, order_id, &v);
    if (n < 0) {
        answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    if (n == 0) {
        answer_fail(a, MHD_HTTP_NOT_FOUND, "no payments for this order");
        return;
    }
    json_t *list = json_array();
    for (long i = 0; i < n; i++) {
        pgsim_txn_settle(v[i], c->now_ms);
        json_array_append_new(list, txn_detail(v[i]));
    }
    free(v);
    json_t *data = json_object();
    json_object_set_new(data, "orderId", jstr(order_id));
    json_object_set_new(data, "transactions", list);
    answer_ok(a, data);
}

/* Reads query argument name as an integer in [min, max]; absent means def. */
static int query_i64(const struct call *c, const char *name, int64_t min, int64_t max, int64_t def,
                     int64_t *out)
{
    const char *s = MHD_lookup_connection_value(c->conn, MHD_GET_ARGUMENT_KIND, name);
    if (s == NULL) {
        *out = def;
        return 0;
    }
    return parse_i64(s, min, max, out);
}

/* The merchant's paged view (seed 004): every payment created in [from, to), oldest first. */
static void api_list(struct pgsim *sim, const struct call *c, struct answer *a)
{
    int64_t from_ms;
    int64_t to_ms;
    int64_t page;
    int64_t size;
    if (c->user_id != NULL && !require_user(c, a))
        return;
    if (query_i64(c, "from", 0, INT64_MAX, 0, &from_ms) != 0 ||
        query_i64(c, "to", 0, INT64_MAX, INT64_MAX, &to_ms) != 0) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "from and to must be epoch milliseconds");
        return;
    }
    if (query_i64(c, "page", 0, LIST_PAGE_MAX, 0, &page) != 0) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "page must be an integer >= 0");
        return;
    }
    if (query_i64(c, "size", 1, LIST_SIZE_MAX, LIST_SIZE_DEFAULT, &size) != 0) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "size must be an integer from 1 to %d", LIST_SIZE_MAX);
        return;
    }
    size_t lo;
    size_t hi;
    pgsim_store_range(&sim->store, from_ms, to_ms, &lo, &hi);
    uint64_t skip = (uint64_t)page * (uint64_t)size;
    uint64_t total = 0;
    json_t *items = json_array();
    if (c->user_id == NULL) {
        /* Unfiltered, the page is a slice of the time index: no scan needed. */
        total = hi - lo;
        for (uint64_t i = lo + skip; i < hi && i < lo + skip + (uint64_t)size; i++) {
            pgsim_txn_settle(sim->store.by_time[i], c->now_ms);
            json_array_append_new(items, txn_list_item(sim->store.by_time[i]));
        }
    } else {
        for (size_t i = lo; i < hi; i++) {
            struct pgsim_txn *t = sim->store.by_time[i];
            if (strcmp(t->user_id, c->user_id) != 0)
                continue;
            if (total >= skip && total < skip + (uint64_t)size) {
                pgsim_txn_settle(t, c->now_ms);
                json_array_append_new(items, txn_list_item(t));
            }
            total++;
        }
    }
    json_t *data = json_object();
    json_object_set_new(data, "page", jint(page));
    json_object_set_new(data, "size", jint(size));
    json_object_set_new(data, "totalPages",
                        jint((int64_t)((total + (uint64_t)size - 1) / (uint64_t)size)));
    json_object_set_new(data, "totalElements", jint((int64_t)total));
    json_object_set_new(data, "payments", items);
    answer_ok(a, data);
}

/*
 * Cancels (refunds) part or all of a captured payment. The first answer for an
 * (owner, transactionKey, Idempotency-Key) is stored and replayed verbatim for that key, so a
 * retried cancel never refunds twice. Everything that can fail is prepared before the balance
 * changes, so a stored answer and its effect are committed together or not at all.
 */
static void api_cancel(struct pgsim *sim, const struct call *c, const struct route *r,
                       struct answer *a)
{
    int64_t req_amount = -1;
    const char *reason = NULL;

    if (c->user_id == NULL || c->idem_key == NULL) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "X-USER-ID and Idempotency-Key headers are required");
        return;
    }
    if (!require_user(c, a))
        return;
    if (!is_header_id(c->idem_key)) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST,
                    "Idempotency-Key must be 1 to %d printable ASCII characters", PGSIM_ID_MAX);
        return;
    }
    if (c->body_bad) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "request body must be a JSON object");
        return;
    }
    if (c->body != NULL) {
        int rc = get_int(c->body, "amount", &req_amount);
        if (rc < 0 || (rc == 1 && req_amount <= 0)) {
            answer_fail(a, MHD_HTTP_BAD_REQUEST, "amount must be a positive integer");
            return;
        }
        if (rc == 0)
            req_amount = -1;
        rc = get_str(c->body, "reason", &reason);
        if (rc < 0 || (rc == 1 && strlen(reason) > PGSIM_REASON_MAX)) {
            answer_fail(a, MHD_HTTP_BAD_REQUEST, "reason must be a string of at most %d bytes",
                        PGSIM_REASON_MAX);
            return;
        }
    }
    struct pgsim_txn *t = find_owned(sim, r, c->user_id);
    if (t == NULL) {
        answer_fail(a, MHD_HTTP_NOT_FOUND, "payment not found");
        return;
    }
    pgsim_txn_settle(t, c->now_ms);

    struct pgsim_idem *prev = pgsim_txn_find_idem(t, c->idem_key);
    if (prev != NULL) {
        if (prev->req_amount != req_amount) {
            answer_fail(a, MHD_HTTP_UNPROCESSABLE_CONTENT,
                        "Idempotency-Key was already used for a different amount");
            return;
        }
        answer_reset(a);
        a->text = strdup(prev->body);
        if (a->text == NULL) {
            answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
            return;
        }
        a->status = prev->http_status;
        a->replayed = true;
        sim->stats.replays++;
        return;
    }
    if (t->idem_count >= PGSIM_IDEM_PER_TXN) {
        answer_fail(a, MHD_HTTP_CONFLICT, "too many Idempotency-Keys for this payment (max %d)",
                    PGSIM_IDEM_PER_TXN);
        return;
    }

    bool apply = false;
    int64_t new_cancelled = t->cancelled_amount;
    enum pgsim_status new_status = t->status;
    if (t->status != PGSIM_SUCCESS && t->status != PGSIM_PARTIALLY_CANCELLED) {
        answer_fail(a, MHD_HTTP_CONFLICT, "payment is not cancellable in status %s",
                    pgsim_status_name(t->status));
    } else {
        int64_t balance = pgsim_txn_balance(t);
        int64_t amount = req_amount < 0 ? balance : req_amount;
        if (amount > balance) {
            answer_fail(a, MHD_HTTP_UNPROCESSABLE_CONTENT, "amount exceeds balance");
        } else {
            apply = true;
            new_cancelled = t->cancelled_amount + amount;
            new_status = new_cancelled == t->amount ? PGSIM_CANCELLED : PGSIM_PARTIALLY_CANCELLED;
            json_t *data = json_object();
            json_object_set_new(data, "transactionKey", jstr(t->key));
            json_object_set_new(data, "status", json_string(pgsim_status_name(new_status)));
            json_object_set_new(data, "cancelledAmount", jint(new_cancelled));
            json_object_set_new(data, "balanceAmount", jint(t->amount - new_cancelled));
            answer_ok(a, data);
        }
    }

    struct pgsim_idem *rec = calloc(1, sizeof(*rec));
    char *reason_copy = apply ? dup_or_null(reason) : NULL;
    char *text = json_dumps(a->json, JSON_COMPACT);
    if (rec != NULL) {
        rec->key = strdup(c->idem_key);
        rec->body = text != NULL ? strdup(text) : NULL;
    }
    if (rec == NULL || rec->key == NULL || rec->body == NULL || text == NULL ||
        (apply && reason != NULL && reason_copy == NULL)) {
        if (rec != NULL) {
            free(rec->key);
            free(rec->body);
        }
        free(rec);
        free(reason_copy);
        free(text);
        answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    /* Commit: effect and stored answer together. */
    if (apply) {
        t->cancelled_amount = new_cancelled;
        t->status = new_status;
        t->cancel_effects++;
        free(t->cancel_reason);
        t->cancel_reason = reason_copy;
        sim->stats.cancel_effects++;
    }
    rec->req_amount = req_amount;
    rec->http_status = a->status;
    rec->next = t->idems;
    t->idems = rec;
    t->idem_count++;
    json_decref(a->json);
    a->json = NULL;
    a->text = text;
}

static void api_route(const char *method, const char *path, struct MHD_Connection *conn,
                      struct route *r)
{
    static const char base[] = "/api/v1/payments";
    bool get = strcmp(method, MHD_HTTP_METHOD_GET) == 0;
    bool post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;

    r->ep = EP_OTHER;
    r->other_status = MHD_HTTP_NOT_FOUND;
    r->key_ok = false;
    r->key[0] = '\0';
    if (strcmp(path, base) == 0) {
        if (post) {
            r->ep = EP_CREATE;
        } else if (get) {
            bool by_order =
                MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "orderId") != NULL;
            r->ep = by_order ? EP_LIST_BY_ORDER : EP_LIST;
        } else {
            r->other_status = MHD_HTTP_METHOD_NOT_ALLOWED;
        }
        return;
    }
    if (!starts_with(path, base) || path[sizeof(base) - 1] != '/')
        return;
    const char *key = path + sizeof(base);
    const char *slash = strchr(key, '/');
    size_t key_len = slash != NULL ? (size_t)(slash - key) : strlen(key);
    if (key_len == 0)
        return;
    if (slash != NULL && strcmp(slash, "/cancel") != 0)
        return;
    if (key_len <= PGSIM_ID_MAX) {
        memcpy(r->key, key, key_len);
        r->key[key_len] = '\0';
        r->key_ok = true;
    }
    if (slash != NULL && post)
        r->ep = EP_CANCEL;
    else if (slash == NULL && get)
        r->ep = EP_GET;
    else
        r->other_status = MHD_HTTP_METHOD_NOT_ALLOWED;
}

/*
 * Decides how an API request is answered, in this order: an injected answer whose match is
 * in target; else one uniform draw split into fail (failRate) / slow (slowRate) / normal, so
 * each share is what the flag says; then the extra latency. A 500 is decided before any
 * effect, so a 500 never has one; a slow answer has its effect applied before the sleep.
 */
static enum pgsim_fault decide_fault(struct pgsim *sim, const char *target, struct answer *a)
{
    enum pgsim_fault f = PGSIM_FAULT_NONE;
    for (size_t i = 0; i < sim->ninjections; i++) {
        struct injection *inj = &sim->injections[i];
        if (strstr(target, inj->match) == NULL)
            continue;
        if (inj->body != NULL) {
            answer_reset(a);
            a->status = inj->status;
            a->text = strdup(inj->body);
            if (a->text == NULL)
                answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        } else {
            answer_fail(a, inj->status, "injected fault");
        }
        a->delay_ms += inj->delay_ms;
        a->retry_after_s = inj->retry_after_s;
        if (--inj->remaining == 0) {
            free(inj->match);
            free(inj->body);
            memmove(inj, inj + 1, (sim->ninjections - i - 1) * sizeof(*inj));
            sim->ninjections--;
        }
        f = PGSIM_FAULT_INJECT;
        break;
    }
    if (f == PGSIM_FAULT_NONE) {
        double u = rng_unit(sim);
        if (u < sim->faults.fail_rate) {
            answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR,
                        "PG temporarily unstable, try again later");
            f = PGSIM_FAULT_FAIL;
        } else if (u < sim->faults.fail_rate + sim->faults.slow_rate) {
            a->delay_ms += sim->faults.slow_ms;
            f = PGSIM_FAULT_SLOW;
        }
    }
    a->delay_ms += rng_between(sim, sim->faults.latency_min_ms, sim->faults.latency_max_ms);
    return f;
}

/* Serves one request under /api (or anything unknown) and records it in the request log. */
static void serve_api(struct pgsim *sim, const struct call *c, const struct request *req,
                      struct answer *a)
{
    struct route r;
    api_route(c->method, c->path, c->conn, &r);

    /* The target an injection matches: decoded path + '?' + raw query. */
    size_t plen = strlen(c->path);
    size_t qlen = c->query != NULL ? strlen(c->query) : 0;
    char *target = malloc(plen + qlen + 2);
    if (target == NULL) {
        answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    memcpy(target, c->path, plen + 1);
    if (c->query != NULL) {
        target[plen] = '?';
        memcpy(target + plen + 1, c->query, qlen + 1);
    }
    bool faultable = starts_with(c->path, "/api/v1/") || strcmp(c->path, "/api/v1") == 0;

    pthread_mutex_lock(&sim->lock);
    enum pgsim_fault f = PGSIM_FAULT_NONE;
    if (req->too_big) {
        answer_fail(a, MHD_HTTP_CONTENT_TOO_LARGE, "request body over %zu bytes", req->limit);
    } else {
        if (faultable)
            f = decide_fault(sim, target, a);
        if (f == PGSIM_FAULT_NONE || f == PGSIM_FAULT_SLOW) {
            switch (r.ep) {
            case EP_CREATE:
                api_create(sim, c, a);
                break;
            case EP_GET:
                api_get(sim, c, &r, a);
                break;
            case EP_LIST_BY_ORDER:
                api_list_by_order(sim, c, a);
                break;
            case EP_LIST:
                api_list(sim, c, a);
                break;
            case EP_CANCEL:
                api_cancel(sim, c, &r, a);
                break;
            case EP_OTHER:
                if (r.other_status == MHD_HTTP_METHOD_NOT_ALLOWED)
                    answer_fail(a, r.other_status, "method %s not allowed on %s", c->method,
                                c->path);
                else
                    answer_fail(a, r.other_status, "no such endpoint");
                break;
            default:
                abort();
            }
        }
    }
    a->faulted = f;
    sim->stats.api[r.ep][f]++;
    struct pgsim_logent e = {
        .ts_ms = req->arrival_ms,
        .path = (char *)c->path,
        .query = (char *)c->query,
        .user_id = (char *)c->user_id,
        .idempotency_key = (char *)c->idem_key,
        .status = a->status,
        .faulted = f,
        .replayed = a->replayed,
    };
    snprintf(e.method, sizeof(e.method), "%s", c->method);
    pgsim_reqlog_append(&sim->log, &e);
    pthread_mutex_unlock(&sim->lock);
    free(target);
}

/* --- admin endpoints (no faults; caller holds sim->lock) -------------------------------- */

#define REJECT(...)                                                                                \
    do {                                                                                           \
        snprintf(why, why_len, __VA_ARGS__);                                                       \
        goto reject;                                                                               \
    } while (0)

/* Builds (does not insert) a transaction from an admin description. 0 or SETTLE_EINVAL with
 * why filled, or SETTLE_ENOMEM. */
static int admin_parse_txn(const json_t *o, int64_t now_ms, struct pgsim_txn **out, char *why,
                           size_t why_len)
{
    const char *user_id;
    const char *order_id;
    const char *status_s;
    const char *reason;
    const char *card_type;
    const char *card_no;
    const char *key;
    const char *final_s;
    int64_t amount = 0;
    int64_t created_ms = now_ms;
    int64_t final_after_ms = 0;
    enum pgsim_status status = PGSIM_PENDING;
    enum pgsim_status final_status = PGSIM_PENDING;
    int rc;

    *out = NULL;
    if (!json_is_object(o))
        REJECT("must be a JSON object");
    if (get_str(o, "userId", &user_id) != 1 || !is_id(user_id))
        REJECT("userId must be a string of 1 to %d bytes", PGSIM_ID_MAX);
    if (get_str(o, "orderId", &order_id) != 1 || !is_id(order_id))
        REJECT("orderId must be a string of 1 to %d bytes", PGSIM_ID_MAX);
    if (get_int(o, "amount", &amount) != 1 || amount <= 0)
        REJECT("amount must be a positive integer");
    if (get_str(o, "status", &status_s) != 1 || parse_status(status_s, &status) != 0 ||
        (status != PGSIM_PENDING && status != PGSIM_SUCCESS && status != PGSIM_FAILED))
        REJECT("status must be PENDING, SUCCESS or FAILED");
    rc = get_str(o, "reason", &reason);
    if (rc < 0 || (rc == 1 && strlen(reason) > PGSIM_REASON_MAX))
        REJECT("reason must be a string of at most %d bytes", PGSIM_REASON_MAX);
    rc = get_str(o, "cardType", &card_type);
    if (rc < 0 || (rc == 1 && !is_card_type(card_type)))
        REJECT("cardType must be one of SAMSUNG, KB, HYUNDAI");
    if (rc == 0)
        card_type = "SAMSUNG";
    rc = get_str(o, "cardNo", &card_no);
    if (rc < 0 || (rc == 1 && !is_card_no(card_no)))
        REJECT("cardNo must have the form xxxx-xxxx-xxxx-xxxx");
    if (rc == 0)
        card_no = DEFAULT_CARD_NO;
    rc = get_str(o, "transactionKey", &key);
    /* The key travels in a URL path, so it cannot hold a '/'. */
    if (rc < 0 || (rc == 1 && (!is_id(key) || strchr(key, '/') != NULL)))
        REJECT("transactionKey must be a string of 1 to %d bytes without '/'", PGSIM_ID_MAX);
    rc = get_int(o, "createdAt", &created_ms);
    if (rc < 0 || (rc == 1 && created_ms < 0))
        REJECT("createdAt must be epoch milliseconds");
    rc = get_str(o, "finalStatus", &final_s);
    if (rc < 0 || (rc == 1 && (parse_status(final_s, &final_status) != 0 ||
                               (final_status != PGSIM_SUCCESS && final_status != PGSIM_FAILED))))
        REJECT("finalStatus must be SUCCESS or FAILED");
    if (rc == 1 && status != PGSIM_PENDING)
        REJECT("finalStatus needs status PENDING");
    rc = get_int(o, "finalAfterMs", &final_after_ms);
    if (rc < 0 || (rc == 1 && (final_after_ms < 0 || final_after_ms > INT32_MAX)))
        REJECT("finalAfterMs must be an integer >= 0");
    if (rc == 1 && final_s == NULL)
        REJECT("finalAfterMs needs finalStatus");

    struct pgsim_txn *t = pgsim_txn_new();
    if (t == NULL)
        return SETTLE_ENOMEM;
    t->user_id = strdup(user_id);
    t->order_id = strdup(order_id);
    t->card_type = strdup(card_type);
    t->card_no = strdup(card_no);
    t->key = dup_or_null(key);
    t->amount = amount;
    t->created_ms = created_ms;
    t->status = status;
    if (final_s != NULL) {
        t->final_status = final_status;
        t->final_at_ms = now_ms + final_after_ms;
        t->final_reason = final_status == PGSIM_FAILED ? dup_or_null(reason) : NULL;
    } else if (status != PGSIM_PENDING) {
        t->reason = dup_or_null(reason);
    }
    if (t->user_id == NULL || t->order_id == NULL || t->card_type == NULL || t->card_no == NULL ||
        (key != NULL && t->key == NULL) ||
        (reason != NULL && t->reason == NULL && t->final_reason == NULL &&
         (status != PGSIM_PENDING || final_status == PGSIM_FAILED))) {
        pgsim_txn_free(t);
        return SETTLE_ENOMEM;
    }
    *out = t;
    return 0;

reject:
    return SETTLE_EINVAL;
}

#undef REJECT

static void admin_create(struct pgsim *sim, const struct call *c, struct answer *a)
{
    char why[256];
    struct pgsim_txn *t;
    if (c->body == NULL) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "request body must be a JSON object");
        return;
    }
    int rc = admin_parse_txn(c->body, c->now_ms, &t, why, sizeof(why));
    if (rc == SETTLE_EINVAL) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "%s", why);
        return;
    }
    if (rc == 0)
        rc = insert_txn(sim, t);
    if (rc != 0) {
        pgsim_txn_free(t);
        answer_insert_error(sim, a, rc);
        return;
    }
    answer_ok(a, txn_admin_view(t));
}

static int by_key(const void *pa, const void *pb)
{
    const struct pgsim_txn *x = *(struct pgsim_txn *const *)pa;
    const struct pgsim_txn *y = *(struct pgsim_txn *const *)pb;
    return strcmp(x->key, y->key);
}

/* All or nothing: every entry is validated and every explicit key checked before the first
 * insert, so a bad seed file leaves the store as it was. A payment's seq becomes non-zero when
 * the store takes it, which tells the cleanup what it still owns. */
static void admin_batch(struct pgsim *sim, const struct call *c, struct answer *a)
{
    char why[256];
    json_t *arr = c->body != NULL ? json_object_get(c->body, "transactions") : NULL;
    if (!json_is_array(arr)) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "body must be {\"transactions\":[...]}");
        return;
    }
    size_t n = json_array_size(arr);
    if (n > sim->store.max_count - sim->store.count) {
        answer_insert_error(sim, a, SETTLE_EFULL);
        return;
    }
    struct pgsim_txn **v = calloc(n + 1, sizeof(*v));
    struct pgsim_txn **keyed = calloc(n + 1, sizeof(*keyed));
    size_t nkeyed = 0;
    size_t inserted = 0;
    if (v == NULL || keyed == NULL)
        goto nomem;
    for (size_t i = 0; i < n; i++) {
        int rc = admin_parse_txn(json_array_get(arr, i), c->now_ms, &v[i], why, sizeof(why));
        if (rc == SETTLE_ENOMEM)
            goto nomem;
        if (rc != 0) {
            answer_fail(a, MHD_HTTP_BAD_REQUEST, "transactions[%zu]: %s", i, why);
            goto out;
        }
        if (v[i]->key != NULL) {
            if (pgsim_store_find(&sim->store, v[i]->key) != NULL) {
                answer_fail(a, MHD_HTTP_CONFLICT, "transactions[%zu]: transactionKey exists", i);
                goto out;
            }
            keyed[nkeyed++] = v[i];
        }
    }
    qsort(keyed, nkeyed, sizeof(*keyed), by_key);
    for (size_t i = 1; i < nkeyed; i++) {
        if (strcmp(keyed[i - 1]->key, keyed[i]->key) == 0) {
            answer_fail(a, MHD_HTTP_CONFLICT, "transactionKey %s appears twice", keyed[i]->key);
            goto out;
        }
    }
    /* Explicit keys first, so a generated key can never take one that comes later. */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < n; i++) {
            if ((pass == 0) != (v[i]->key != NULL))
                continue;
            int rc = insert_txn(sim, v[i]);
            if (rc != 0) {
                answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR,
                            "stored %zu of %zu payments, then: %s", inserted, n,
                            settle_strerror(rc));
                goto out;
            }
            inserted++;
        }
    }
    json_t *keys = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(keys, jstr(v[i]->key));
    json_t *data = json_object();
    json_object_set_new(data, "created", json_integer((json_int_t)inserted));
    json_object_set_new(data, "transactionKeys", keys);
    answer_ok(a, data);
    goto out;

nomem:
    answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
out:
    if (v != NULL) {
        for (size_t i = 0; i < n; i++) {
            if (v[i] != NULL && v[i]->seq == 0)
                pgsim_txn_free(v[i]);
        }
    }
    free(v);
    free(keyed);
}

static json_t *injection_view(const struct injection *inj)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_integer((json_int_t)inj->id));
    json_object_set_new(o, "match", jstr(inj->match));
    json_object_set_new(o, "status", json_integer(inj->status));
    json_object_set_new(o, "count", jint(inj->remaining));
    json_object_set_new(o, "delayMs", jint(inj->delay_ms));
    json_object_set_new(o, "retryAfterS",
                        inj->retry_after_s < 0 ? json_null() : jint(inj->retry_after_s));
    json_object_set_new(o, "body", jstr(inj->body));
    return o;
}

static void admin_inject(struct pgsim *sim, const struct call *c, struct answer *a)
{
    const char *match;
    const char *body;
    int64_t status = 0;
    int64_t count = 1;
    int64_t delay_ms = 0;
    int64_t retry_after_s = -1;
    int rc;
    const json_t *o = c->body;

    if (o == NULL) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "request body must be a JSON object");
        return;
    }
    if (get_str(o, "match", &match) != 1 || strlen(match) > PGSIM_LOG_FIELD_MAX) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "match must be a string of at most %d bytes",
                    PGSIM_LOG_FIELD_MAX);
        return;
    }
    if (get_int(o, "status", &status) != 1 || status < 200 || status > 599) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "status must be an HTTP status from 200 to 599");
        return;
    }
    rc = get_int(o, "count", &count);
    if (rc < 0 || count < 1 || count > INT32_MAX) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "count must be a positive integer");
        return;
    }
    rc = get_int(o, "delayMs", &delay_ms);
    if (rc < 0 || delay_ms < 0 || delay_ms > INJECT_DELAY_MAX_MS) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "delayMs must be an integer from 0 to %d",
                    INJECT_DELAY_MAX_MS);
        return;
    }
    rc = get_int(o, "retryAfterS", &retry_after_s);
    if (rc < 0 || (rc == 1 && (retry_after_s < 0 || retry_after_s > 86400))) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "retryAfterS must be null or 0 to 86400");
        return;
    }
    if (rc == 0)
        retry_after_s = -1;
    rc = get_str(o, "body", &body);
    if (rc < 0 || (rc == 1 && strlen(body) > API_BODY_MAX)) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "body must be null or a string of at most %d bytes",
                    API_BODY_MAX);
        return;
    }
    /* A success has no standard body to make up, so the test must say what it wants. */
    if (body == NULL && status < 400) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "a status below 400 needs a body");
        return;
    }
    if (sim->ninjections >= INJECT_MAX) {
        answer_fail(a, MHD_HTTP_INSUFFICIENT_STORAGE, "too many active injections (max %d)",
                    INJECT_MAX);
        return;
    }
    struct injection *inj = &sim->injections[sim->ninjections];
    memset(inj, 0, sizeof(*inj));
    inj->match = strdup(match);
    inj->body = dup_or_null(body);
    if (inj->match == NULL || (body != NULL && inj->body == NULL)) {
        free(inj->match);
        free(inj->body);
        answer_fail(a, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    inj->id = ++sim->next_injection_id;
    inj->status = (unsigned)status;
    inj->remaining = count;
    inj->delay_ms = delay_ms;
    inj->retry_after_s = retry_after_s;
    sim->ninjections++;
    answer_ok(a, injection_view(inj));
}

static void admin_inject_list(struct pgsim *sim, const struct call *c, struct answer *a)
{
    (void)c;
    json_t *list = json_array();
    for (size_t i = 0; i < sim->ninjections; i++)
        json_array_append_new(list, injection_view(&sim->injections[i]));
    json_t *data = json_object();
    json_object_set_new(data, "injections", list);
    answer_ok(a, data);
}

static json_t *faults_view(const struct faults *f)
{
    json_t *o = json_object();
    json_object_set_new(o, "failRate", json_real(f->fail_rate));
    json_object_set_new(o, "slowRate", json_real(f->slow_rate));
    json_object_set_new(o, "slowMs", jint(f->slow_ms));
    json_object_set_new(o, "latencyMinMs", jint(f->latency_min_ms));
    json_object_set_new(o, "latencyMaxMs", jint(f->latency_max_ms));
    return o;
}

static void admin_faults_get(struct pgsim *sim, const struct call *c, struct answer *a)
{
    (void)c;
    answer_ok(a, faults_view(&sim->faults));
}

/* A rate field: 1 set, 0 absent, -1 invalid. */
static int get_rate(const json_t *o, const char *name, double *out)
{
    json_t *v = json_object_get(o, name);
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_number(v))
        return -1;
    double d = json_number_value(v);
    if (!(d >= 0.0 && d <= 1.0))
        return -1;
    *out = d;
    return 1;
}

static void admin_faults_set(struct pgsim *sim, const struct call *c, struct answer *a)
{
    struct faults f = sim->faults;
    const json_t *o = c->body;
    int64_t v;
    if (o == NULL) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "request body must be a JSON object");
        return;
    }
    if (get_rate(o, "failRate", &f.fail_rate) < 0 || get_rate(o, "slowRate", &f.slow_rate) < 0) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "failRate and slowRate must be numbers in [0, 1]");
        return;
    }
    static const char *const ms_names[] = {"slowMs", "latencyMinMs", "latencyMaxMs"};
    int64_t *ms_fields[] = {&f.slow_ms, &f.latency_min_ms, &f.latency_max_ms};
    for (size_t i = 0; i < 3; i++) {
        int rc = get_int(o, ms_names[i], &v);
        if (rc < 0 || (rc == 1 && (v < 0 || v > INT32_MAX))) {
            answer_fail(a, MHD_HTTP_BAD_REQUEST, "%s must be an integer >= 0", ms_names[i]);
            return;
        }
        if (rc == 1)
            *ms_fields[i] = v;
    }
    if (f.latency_min_ms > f.latency_max_ms) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "latencyMinMs must not exceed latencyMaxMs");
        return;
    }
    sim->faults = f;
    log_info("pgsim: fault profile now fail=%.3f slow=%.3f slowMs=%" PRId64 " latency=%" PRId64
             "-%" PRId64 "ms",
             f.fail_rate, f.slow_rate, f.slow_ms, f.latency_min_ms, f.latency_max_ms);
    answer_ok(a, faults_view(&sim->faults));
}

static void admin_requests(struct pgsim *sim, const struct call *c, struct answer *a)
{
    int64_t since;
    int64_t limit;
    if (query_i64(c, "since", 0, INT64_MAX, 0, &since) != 0 ||
        query_i64(c, "limit", 1, INT64_MAX, INT64_MAX, &limit) != 0) {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "since must be >= 0 and limit >= 1");
        return;
    }
    const struct pgsim_reqlog *l = &sim->log;
    /* Sequence numbers are consecutive, so the first entry after `since` is found by offset. */
    uint64_t first_seq = l->count > 0 ? pgsim_reqlog_at(l, 0)->seq : l->next_seq + 1;
    size_t start = (uint64_t)since >= first_seq ? (size_t)((uint64_t)since - first_seq + 1) : 0;
    json_t *list = json_array();
    for (size_t i = start; i < l->count && (int64_t)(i - start) < limit; i++) {
        const struct pgsim_logent *e = pgsim_reqlog_at(l, i);
        json_t *o = json_object();
        json_object_set_new(o, "seq", json_integer((json_int_t)e->seq));
        json_object_set_new(o, "method", jstr(e->method));
        json_object_set_new(o, "path", jstr(e->path));
        json_object_set_new(o, "query", jstr(e->query));
        json_object_set_new(o, "userId", jstr(e->user_id));
        json_object_set_new(o, "idempotencyKey", jstr(e->idempotency_key));
        json_object_set_new(o, "status", json_integer(e->status));
        json_object_set_new(o, "faulted", json_string(pgsim_fault_name(e->faulted)));
        json_object_set_new(o, "replayed", json_boolean(e->replayed));
        json_object_set_new(o, "ts_ms", jint(e->ts_ms));
        json_array_append_new(list, o);
    }
    json_t *data = json_object();
    json_object_set_new(data, "requests", list);
    json_object_set_new(data, "dropped", json_integer((json_int_t)l->dropped));
    json_object_set_new(data, "lastSeq", json_integer((json_int_t)l->next_seq));
    answer_ok(a, data);
}

static void admin_effects(struct pgsim *sim, const struct call *c, struct answer *a)
{
    const char *key = MHD_lookup_connection_value(c->conn, MHD_GET_ARGUMENT_KIND, "transactionKey");
    if (key == NULL || *key == '\0') {
        answer_fail(a, MHD_HTTP_BAD_REQUEST, "transactionKey query parameter is required");
        return;
    }
    struct pgsim_txn *t = pgsim_store_find(&sim->store, key);
    if (t == NULL) {
        answer_fail(a, MHD_HTTP_NOT_FOUND, "payment not found");
        return;
    }
    pgsim_txn_settle(t, c->now_ms);
    json_t *data = json_object();
    json_object_set_new(data, "transactionKey", jstr(t->key));
    json_object_set_new(data, "cancelEffects", json_integer(t->cancel_effects));
    json_object_set_new(data, "cancelledAmount", jint(t->cancelled_amount));
    json_object_set_new(data, "balanceAmount", jint(pgsim_txn_balance(t)));
    json_object_set_new(data, "status", json_string(pgsim_status_name(t->status)));
    json_object_set_new(data, "idempotencyKeys", json_integer(t->idem_count));
    json_object_set_new(data, "cancelReason", jstr(t->cancel_reason));
    answer_ok(a, data);
}

static void admin_stats(struct pgsim *sim, const struct call *c, struct answer *a)
{
    (void)c;
    const struct stats *s = &sim->stats;
    uint64_t totals[PGSIM_FAULT_COUNT] = {0};
    json_t *by_ep = json_object();
    for (int ep = 0; ep < EP_COUNT; ep++) {
        json_t *o = json_object();
        uint64_t total = 0;
        for (int f = 0; f < PGSIM_FAULT_COUNT; f++) {
            json_object_set_new(o, pgsim_fault_name((enum pgsim_fault)f),
                                json_integer((json_int_t)s->api[ep][f]));
            total += s->api[ep][f];
            totals[f] += s->api[ep][f];
        }
        json_object_set_new(o, "total", json_integer((json_int_t)total));
        json_object_set_new(by_ep, endpoint_names[ep], o);
    }
    json_t *all = json_object();
    uint64_t total = 0;
    for (int f = 0; f < PGSIM_FAULT_COUNT; f++) {
        json_object_set_new(all, pgsim_fault_name((enum pgsim_fault)f),
                            json_integer((json_int_t)totals[f]));
        total += totals[f];
    }
    json_object_set_new(all, "total", json_integer((json_int_t)total));
    json_t *classes = json_object();
    static const char *const class_names[6] = {"0xx", "1xx", "2xx", "3xx", "4xx", "5xx"};
    for (int i = 1; i < 6; i++)
        json_object_set_new(classes, class_names[i], json_integer((json_int_t)s->status_class[i]));

    json_t *data = json_object();
    json_object_set_new(data, "api", all);
    json_object_set_new(data, "endpoints", by_ep);
    json_object_set_new(data, "statusClasses", classes);
    json_object_set_new(data, "created", json_integer((json_int_t)s->created));
    json_object_set_new(data, "cancelEffects", json_integer((json_int_t)s->cancel_effects));
    json_object_set_new(data, "idempotentReplays", json_integer((json_int_t)s->replays));
    json_object_set_new(data, "transactions", json_integer((json_int_t)sim->store.count));
    json_object_set_new(data, "maxTransactions", json_integer((json_int_t)sim->store.max_count));
    json_object_set_new(data, "logged", json_integer((json_int_t)sim->log.count));
    json_object_set_new(data, "logDropped", json_integer((json_int_t)sim->log.dropped));
    json_object_set_new(data, "activeInjections", json_integer((json_int_t)sim->ninjections));
    json_object_set_new(data, "adminRequests", json_integer((json_int_t)s->admin));
    json_object_set_new(data, "healthRequests", json_integer((json_int_t)s->health));
    answer_ok(a, data);
}

static void clear_injections(struct pgsim *sim)
{
    for (size_t i = 0; i < sim->ninjections; i++) {
        free(sim->injections[i].match);
        free(sim->injections[i].body);
    }
    sim->ninjections = 0;
}

/* Clears payments, the request log, injections and counters; the fault profile stays. */
static void admin_reset(struct pgsim *sim, const struct call *c, struct answer *a)
{
    (void)c;
    pgsim_store_clear(&sim->store);
    pgsim_reqlog_clear(&sim->log);
    clear_injections(sim);
    memset(&sim->stats, 0, sizeof(sim->stats));
    json_t *data = json_object();
    json_object_set_new(data, "reset", json_true());
    answer_ok(a, data);
}

struct admin_route {
    const char *path;
    const char *method;
    void (*handler)(struct pgsim *sim, const struct call *c, struct answer *a);
};

static const struct admin_route admin_routes[] = {
    {"/admin/transactions", MHD_HTTP_METHOD_POST, admin_create},
    {"/admin/transactions/batch", MHD_HTTP_METHOD_POST, admin_batch},
    {"/admin/inject", MHD_HTTP_METHOD_POST, admin_inject},
    {"/admin/inject", MHD_HTTP_METHOD_GET, admin_inject_list},
    {"/admin/faults", MHD_HTTP_METHOD_GET, admin_faults_get},
    {"/admin/faults", MHD_HTTP_METHOD_POST, admin_faults_set},
    {"/admin/requests", MHD_HTTP_METHOD_GET, admin_requests},
    {"/admin/effects", MHD_HTTP_METHOD_GET, admin_effects},
    {"/admin/stats", MHD_HTTP_METHOD_GET, admin_stats},
    {"/admin/reset", MHD_HTTP_METHOD_POST, admin_reset},
};

static void serve_admin(struct pgsim *sim, const struct call *c, const struct request *req,
                        struct answer *a)
{
    bool path_known = false;
    pthread_mutex_lock(&sim->lock);
    sim->stats.admin++;
    if (req->too_big) {
        answer_fail(a, MHD_HTTP_CONTENT_TOO_LARGE, "request body over %zu bytes", req->limit);
        goto out;
    }
    for (size_t i = 0; i < sizeof(admin_routes) / sizeof(admin_routes[0]); i++) {
        if (strcmp(c->path, admin_routes[i].path) != 0)
            continue;
        path_known = true;
        if (strcmp(c->method, admin_routes[i].method) != 0)
            continue;
        if (c->body_bad)
            answer_fail(a, MHD_HTTP_BAD_REQUEST, "request body must be a JSON object");
        else
            admin_routes[i].handler(sim, c, a);
        goto out;
    }
    if (path_known)
        answer_fail(a, MHD_HTTP_METHOD_NOT_ALLOWED, "method %s not allowed on %s", c->method,
                    c->path);
    else
        answer_fail(a, MHD_HTTP_NOT_FOUND, "no such endpoint");
out:
    pthread_mutex_unlock(&sim->lock);
}

/* --- libmicrohttpd glue --------------------------------------------------------------------- */

/* Called with the raw request target before libmicrohttpd decodes it in place; the returned
 * request becomes *con_cls, and on_completed frees it. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    (void)cls;
    (void)conn;
    struct request *req = calloc(1, sizeof(*req));
    if (req == NULL)
        return NULL;
    req->raw_uri = strdup(uri);
    req->arrival_ms = wall_ms();
    return req;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)conn;
    (void)toe;
    struct request *req = *con_cls;
    if (req == NULL)
        return;
    if (req->holding)
        answer_reset(&req->held);
    free(req->raw_uri);
    free(req->body);
    free(req);
    *con_cls = NULL;
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char buf[512];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    size_t n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        buf[--n] = '\0';
    log_warn("pgsim: libmicrohttpd: %s", buf);
}

static void body_append(struct request *req, const char *data, size_t n)
{
    if (req->too_big)
        return;
    if (n > req->limit - req->len) {
        /* Keep draining the upload (the answer is 413) but stop storing it. */
        req->too_big = true;
        free(req->body);
        req->body = NULL;
        req->len = req->cap = 0;
        return;
    }
    if (req->len + n > req->cap) {
        size_t cap = req->cap == 0 ? 1024 : req->cap;
        while (cap < req->len + n)
            cap *= 2;
        if (cap > req->limit)
            cap = req->limit;
        char *b = realloc(req->body, cap);
        if (b == NULL) {
            /* Treated like an oversized body: the client learns it was not accepted. */
            req->too_big = true;
            return;
        }
        req->body = b;
        req->cap = cap;
    }
    memcpy(req->body + req->len, data, n);
    req->len += n;
}

static enum MHD_Result send_answer(struct MHD_Connection *conn, struct answer *a)
{
    static const char fallback[] = "{\"meta\":{\"result\":\"FAIL\",\"errorCode\":\"Internal "
                                   "Server Error\",\"message\":\"out of memory\"},\"data\":null}";
    unsigned status = a->status;
    char *text = a->text;
    if (text == NULL && a->json != NULL)
        text = json_dumps(a->json, JSON_COMPACT);
    const char *out = text;
    if (out == NULL) {
        out = fallback;
        status = MHD_HTTP_INTERNAL_SERVER_ERROR;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(out), (void *)out, MHD_RESPMEM_MUST_COPY);
    if (text != a->text)
        free(text);
    if (resp == NULL)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    if (a->retry_after_s >= 0) {
        char ra[24];
        snprintf(ra, sizeof(ra), "%" PRId64, a->retry_after_s);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
    enum MHD_Result ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static const char *header(struct MHD_Connection *conn, const char *name)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, name);
    return v != NULL && *v != '\0' ? v : NULL;
}

/* Answers a fully received request: route, decide, record, sleep (lock released), send. */
static enum MHD_Result finish(struct pgsim *sim, struct MHD_Connection *conn, const char *url,
                              const char *method, struct request *req)
{
    struct answer a = {.status = MHD_HTTP_INTERNAL_SERVER_ERROR, .retry_after_s = -1};
    struct call c = {
        .conn = conn,
        .method = method,
        .path = url,
        .user_id = header(conn, "X-USER-ID"),
        .idem_key = header(conn, "Idempotency-Key"),
    };
    const char *q = req->raw_uri != NULL ? strchr(req->raw_uri, '?') : NULL;
    c.query = q != NULL ? q + 1 : NULL;

    if (!req->too_big && req->len > 0) {
        json_error_t jerr;
        c.body = json_loadb(req->body, req->len, JSON_REJECT_DUPLICATES, &jerr);
        if (c.body != NULL && !json_is_object(c.body)) {
            json_decref(c.body);
            c.body = NULL;
        }
        c.body_bad = c.body == NULL;
    }
    c.now_ms = wall_ms();

    bool is_health = strcmp(url, "/healthz") == 0;
    if (is_health) {
        pthread_mutex_lock(&sim->lock);
        sim->stats.health++;
        pthread_mutex_unlock(&sim->lock);
        a.status = MHD_HTTP_OK;
        a.json = json_pack("{s:s}", "status", "ok");
    } else if (starts_with(url, "/admin/")) {
        serve_admin(sim, &c, req, &a);
    } else {
        serve_api(sim, &c, req, &a);
    }
    json_decref(c.body);

    pthread_mutex_lock(&sim->lock);
    sim->stats.status_class[a.status / 100 < 6 ? a.status / 100 : 0]++;
    pthread_mutex_unlock(&sim->lock);

    /* One line per request at debug level, never with a body (card numbers live there). */
    if (log_enabled(LOG_LEVEL_DEBUG))
        log_debug("pgsim %s %s%s%s -> %u faulted=%s delay_ms=%" PRId64 "%s", method, url,
                  c.query != NULL ? "?" : "", c.query != NULL ? c.query : "", a.status,
                  pgsim_fault_name(a.faulted), a.delay_ms, a.replayed ? " replayed" : "");

    if (a.delay_ms > 0) {
        /* The request keeps the answer; on_request sends it when the connection is resumed. */
        req->held = a;
        req->holding = true;
        MHD_suspend_connection(conn);
        timers_hold(&sim->timers, conn, a.delay_ms);
        return MHD_YES;
    }
    enum MHD_Result ret = send_answer(conn, &a);
    answer_reset(&a);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    struct pgsim *sim = cls;
    struct request *req = *con_cls;
    (void)version;

    if (req == NULL) {
        /* on_uri ran out of memory; try once more here. */
        req = on_uri(NULL, url, conn);
        if (req == NULL)
            return MHD_NO;
        *con_cls = req;
    }
    if (!req->headers_seen) {
        req->headers_seen = true;
        req->limit = starts_with(url, "/admin/") ? ADMIN_BODY_MAX : API_BODY_MAX;
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        int64_t declared;
        if (cl != NULL && parse_i64(cl, 0, INT64_MAX, &declared) == 0 &&
            (uint64_t)declared > req->limit) {
            /* Refuse before reading the body; libmicrohttpd then closes the connection. */
            req->too_big = true;
            req->answered = true;
            return finish(sim, conn, url, method, req);
        }
        return MHD_YES;
    }
    if (*upload_data_size != 0) {
        if (!req->answered)
            body_append(req, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (req->holding) {
        /* Resumed by the timer thread: the delay is over. */
        req->holding = false;
        enum MHD_Result ret = send_answer(conn, &req->held);
        answer_reset(&req->held);
        return ret;
    }
    if (req->answered)
        return MHD_YES;
    req->answered = true;
    return finish(sim, conn, url, method, req);
}

/* --- flags ---------------------------------------------------------------------------------- */

static void usage(FILE *out)
{
    fputs("usage: settle pgsim [options]\n"
          "  --listen HOST:PORT      address to serve (default 127.0.0.1:8082; port 0 = any)\n"
          "  --port-file PATH        write the bound port to PATH once listening\n"
          "  --profile seed|clean    seed: the seed 003 faults (the defaults); clean: none\n"
          "  --fail-rate F           share of API requests answered 500 (default 0.33)\n"
          "  --slow-rate F           share answered only after --slow-ms (default 0.33)\n"
          "  --slow-ms N             delay of a slow answer (default 60000)\n"
          "  --latency-ms MIN-MAX    extra latency on every API answer (default 0-0)\n"
          "  --process-ms MIN-MAX    time a payment stays PENDING (default 1000-5000)\n"
          "  --success-rate F        share of payments ending SUCCESS (default 0.7)\n"
          "  --seed N                RNG seed (default: from the clock)\n"
          "  --max-transactions N    payments kept (default 1000000; more answer 507)\n"
          "  --max-log N             request-log entries kept (default 100000)\n"
          "  --idle-timeout-s N      close a connection idle for N s (default 120)\n"
          "  --log-level LEVEL       debug|info|warn|error (debug logs every request)\n",
          out);
}

static void opts_defaults(struct opts *o)
{
    memset(o, 0, sizeof(*o));
    o->listen = "127.0.0.1:8082";
    o->faults.fail_rate = 0.33;
    o->faults.slow_rate = 0.33;
    o->faults.slow_ms = 60000;
    o->process_min_ms = 1000;
    o->process_max_ms = 5000;
    o->success_rate = 0.7;
    o->max_transactions = 1000000;
    o->max_log = 100000;
    o->idle_timeout_s = CONN_TIMEOUT_S;
}

/* 0 to run, 1 when --help was printed, -1 on a usage error (already reported). A --profile
 * is applied first wherever it appears, so explicit flags always refine it. */
static int parse_args(int argc, char **argv, struct opts *o)
{
    opts_defaults(o);
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 1; i < argc; i++) {
            const char *arg = argv[i];
            const char *val = NULL;
            char name[32];
            if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
                if (pass == 0)
                    continue;
                usage(stdout);
                return 1;
            }
            if (!starts_with(arg, "--")) {
                fprintf(stderr, "settle pgsim: unexpected argument '%s'\n", arg);
                usage(stderr);
                return -1;
            }
            const char *eq = strchr(arg, '=');
            size_t nlen = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
            if (nlen >= sizeof(name)) {
                fprintf(stderr, "settle pgsim: unknown option '%s'\n", arg);
                return -1;
            }
            memcpy(name, arg, nlen);
            name[nlen] = '\0';
            if (eq != NULL) {
                val = eq + 1;
            } else if (i + 1 < argc) {
                val = argv[++i];
            } else {
                fprintf(stderr, "settle pgsim: %s needs a value\n", name);
                return -1;
            }
            bool is_profile = strcmp(name, "--profile") == 0;
            if ((pass == 0) != is_profile)
                continue;
            int rc = 0;
            if (is_profile) {
                if (strcmp(val, "seed") == 0) {
                    o->faults.fail_rate = 0.33;
                    o->faults.slow_rate = 0.33;
                    o->faults.slow_ms = 60000;
                } else if (strcmp(val, "clean") == 0) {
                    o->faults.fail_rate = 0.0;
                    o->faults.slow_rate = 0.0;
                } else {
                    rc = SETTLE_EINVAL;
                }
            } else if (strcmp(name, "--listen") == 0) {
                o->listen = val;
            } else if (strcmp(name, "--port-file") == 0) {
                o->port_file = val;
            } else if (strcmp(name, "--fail-rate") == 0) {
                rc = parse_rate(val, &o->faults.fail_rate);
            } else if (strcmp(name, "--slow-rate") == 0) {
                rc = parse_rate(val, &o->faults.slow_rate);
            } else if (strcmp(name, "--slow-ms") == 0) {
                rc = parse_i64(val, 0, INT32_MAX, &o->faults.slow_ms);
            } else if (strcmp(name, "--latency-ms") == 0) {
                rc = parse_ms_range(val, &o->faults.latency_min_ms, &o->faults.latency_max_ms);
            } else if (strcmp(name, "--process-ms") == 0) {
                rc = parse_ms_range(val, &o->process_min_ms, &o->process_max_ms);
            } else if (strcmp(name, "--success-rate") == 0) {
                rc = parse_rate(val, &o->success_rate);
            } else if (strcmp(name, "--seed") == 0) {
                int64_t seed;
                rc = parse_i64(val, 0, INT64_MAX, &seed);
                o->seed = (uint64_t)seed;
                o->seed_given = true;
            } else if (strcmp(name, "--max-transactions") == 0) {
                rc = parse_i64(val, 1, 100000000, &o->max_transactions);
            } else if (strcmp(name, "--max-log") == 0) {
                rc = parse_i64(val, 1, 100000000, &o->max_log);
            } else if (strcmp(name, "--idle-timeout-s") == 0) {
                rc = parse_i64(val, 1, 86400, &o->idle_timeout_s);
            } else if (strcmp(name, "--log-level") == 0) {
                enum log_level level;
                rc = log_level_parse(val, &level);
                if (rc == 0)
                    log_init(level, NULL);
            } else {
                fprintf(stderr, "settle pgsim: unknown option '%s'\n", name);
                usage(stderr);
                return -1;
            }
            if (rc != 0) {
                fprintf(stderr, "settle pgsim: invalid value '%s' for %s\n", val, name);
                return -1;
            }
        }
    }
    return 0;
}

/* --- startup and shutdown ------------------------------------------------------------------ */

/* Resolves "HOST:PORT" or "[v6]:PORT" into *out (free with freeaddrinfo). */
static int resolve_listen(const char *listen, struct addrinfo **out)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    if (colon == NULL || colon == listen || (size_t)(colon - listen) >= sizeof(host))
        return SETTLE_EINVAL;
    const char *h = listen;
    size_t hlen = (size_t)(colon - listen);
    if (h[0] == '[' && hlen >= 2 && h[hlen - 1] == ']') {
        h++;
        hlen -= 2;
    }
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    int64_t port;
    if (parse_i64(colon + 1, 0, 65535, &port) != 0)
        return SETTLE_EINVAL;
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    if (getaddrinfo(host, colon + 1, &hints, out) != 0)
        return SETTLE_EINVAL;
    return 0;
}

/* Written to a temporary name and renamed, so a harness polling the file never reads half. */
static int write_port_file(const char *path, unsigned port)
{
    char tmp[4096];
    int n = snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
    if (n < 0 || (size_t)n >= sizeof(tmp))
        return SETTLE_EINVAL;
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return SETTLE_EIO;
    int ok = fprintf(f, "%u\n", port) > 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return SETTLE_EIO;
    }
    return 0;
}

/* Thread-per-connection needs one descriptor per connection: lift the soft limit toward
 * CONN_LIMIT if the hard limit allows. Best effort; MHD refuses connections beyond it. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t want = CONN_LIMIT + 64;
    if (rl.rlim_cur >= want)
        return;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want ? want : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

int pgsim_main(int argc, char **argv)
{
    struct opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc != 0)
        return rc > 0 ? 0 : 2;

    int status = 1;
    struct addrinfo *ai = NULL;
    struct MHD_Daemon *daemon = NULL;
    sigset_t block;
    sigset_t old_mask;
    bool masked = false;
    bool store_ok = false;
    struct pgsim *sim = calloc(1, sizeof(*sim));
    if (sim == NULL) {
        log_error("pgsim: out of memory");
        return 1;
    }
    pthread_mutex_init(&sim->lock, NULL);
    sim->faults = o.faults;
    sim->process_min_ms = o.process_min_ms;
    sim->process_max_ms = o.process_max_ms;
    sim->success_rate = o.success_rate;
    /* A drawn seed is kept below 10^12: the log masks runs of 13+ digits as card numbers, and
     * the seed must stay readable to reproduce a run with --seed. */
    uint64_t seed =
        o.seed_given ? o.seed
                     : ((uint64_t)wall_ms() * 1000003ULL ^ (uint64_t)getpid()) % 1000000000000ULL;
    sim->rng = seed;
    if (pgsim_store_init(&sim->store, (size_t)o.max_transactions) != 0) {
        log_error("pgsim: out of memory");
        goto out;
    }
    store_ok = true;
    pgsim_reqlog_init(&sim->log, (size_t)o.max_log);

    if (resolve_listen(o.listen, &ai) != 0) {
        log_error("pgsim: cannot resolve --listen '%s' (want HOST:PORT)", o.listen);
        goto out;
    }

    /* Blocked before the daemon starts so its threads inherit the mask and the signals are
     * delivered only to sigwait below. SIGPIPE stays blocked: a client hanging up must not
     * kill the process. */
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGPIPE);
    if (pthread_sigmask(SIG_BLOCK, &block, &old_mask) != 0) {
        log_error("pgsim: cannot block signals");
        goto out;
    }
    masked = true;
    raise_fd_limit();

    if (timers_start(&sim->timers) != 0) {
        log_error("pgsim: cannot start the timer thread");
        goto out;
    }
    unsigned flags = (unsigned)(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO |
                                MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG);
    if (ai->ai_family == AF_INET6)
        flags |= (unsigned)MHD_USE_IPv6;
    daemon = MHD_start_daemon(
        /* The logger goes first so libmicrohttpd reports option errors through it too. */
        flags, 0, NULL, NULL, on_request, sim, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, sim,
        MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT, (unsigned int)CONN_LIMIT,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)o.idle_timeout_s, MHD_OPTION_URI_LOG_CALLBACK,
        on_uri, sim, MHD_OPTION_NOTIFY_COMPLETED, on_completed, sim, MHD_OPTION_END);
    if (daemon == NULL) {
        log_error("pgsim: cannot listen on %s", o.listen);
        goto out;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(daemon, MHD_DAEMON_INFO_BIND_PORT);
    unsigned port = info != NULL ? info->port : 0;
    if (o.port_file != NULL && write_port_file(o.port_file, port) != 0) {
        log_error("pgsim: cannot write --port-file %s", o.port_file);
        goto out;
    }
    log_info("pgsim: listening on %s port=%u seed=%" PRIu64 " fail=%.3f slow=%.3f slowMs=%" PRId64
             " latency=%" PRId64 "-%" PRId64 "ms process=%" PRId64 "-%" PRId64
             "ms success=%.3f maxTransactions=%" PRId64 " maxLog=%" PRId64,
             o.listen, port, seed, o.faults.fail_rate, o.faults.slow_rate, o.faults.slow_ms,
             o.faults.latency_min_ms, o.faults.latency_max_ms, o.process_min_ms, o.process_max_ms,
             o.success_rate, o.max_transactions, o.max_log);

    sigset_t wait_set;
    sigemptyset(&wait_set);
    sigaddset(&wait_set, SIGINT);
    sigaddset(&wait_set, SIGTERM);
    int sig = 0;
    while (sigwait(&wait_set, &sig) != 0) {
    }
    log_info("pgsim: %s received, stopping", sig == SIGINT ? "SIGINT" : "SIGTERM");
    status = 0;

out:
    /* Held answers go out now (a 60 s slow answer does not hold up the stop), then the
     * daemon stops with no connection suspended. */
    timers_stop(&sim->timers);
    if (daemon != NULL)
        MHD_stop_daemon(daemon);
    timers_free(&sim->timers);
    if (ai != NULL)
        freeaddrinfo(ai);
    if (masked)
        pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    if (store_ok) {
        clear_injections(sim);
        pgsim_reqlog_clear(&sim->log);
        pgsim_store_free(&sim->store);
    }
    pthread_mutex_destroy(&sim->lock);
    free(sim);
    return status;
}
