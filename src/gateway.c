/*
 * gateway.c - the payment gateway (PG) client: libcurl calls to the Loopers PG API, parsing
 * of its wrapped JSON answers, and classification of every call into a gateway_outcome.
 *
 * Threads: gateway_create/gateway_destroy run on the loop thread. The *_work functions run
 * on uv pool threads; each borrows one CURL easy handle from the bounded pool below for the
 * whole call and touches nothing but its arguments and that handle. They never log (a PG
 * answer can carry card data) and never sleep or retry: they return the outcome and the loop
 * decides. The parsers and gateway_classify are pure.
 *
 * Owns: the copied base URL and the easy-handle pool (handles are created lazily, up to
 * max_handles, and reused so their keep-alive connections survive between calls).
 * Never stores a full card number: cardNo is reduced to its last four digits while parsing,
 * and the raw answer buffer is wiped before it is freed.
 */
#include "settle/gateway.h"
#include "settle/httploop.h"
#include "settle/error.h"

#include <curl/curl.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef SETTLE_VERSION
#define SETTLE_VERSION "dev"
#endif

#define GW_ASSERT(cond)                                                                            \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#if defined(__GNUC__) || defined(__clang__)
#define GW_PRINTF(fmt_idx, arg_idx) __attribute__((format(printf, fmt_idx, arg_idx)))
#else
#define GW_PRINTF(fmt_idx, arg_idx)
#endif

/* A Retry-After further away than a day is not a useful scheduling hint; clamp it. */
#define RETRY_AFTER_MAX_S 86400u
/* Bounds on configuration that would otherwise only fail late and obscurely. */
#define BASE_URL_MAX 1024
#define MAX_HANDLES_LIMIT 65536u
/* A card number in free text: at least this many digits in one run of digits, '-' and ' '. */
#define CARD_RUN_MIN_DIGITS 12

struct gateway {
    char *base_url; /* without a trailing '/' */
    long connect_timeout_ms;
    long timeout_ms;
    size_t body_max_bytes;
    unsigned max_handles;

    /* The easy-handle pool. idle is a stack so the most recently used handle, whose
     * connection is the most likely to still be alive, is handed out first. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    CURL **idle;
    unsigned n_idle;
    unsigned n_created;
};

/* The answer body as it arrives, capped at max_bytes. */
struct body {
    char *data; /* NUL-terminated when non-NULL */
    size_t len;
    size_t cap;
    size_t max_bytes;
    bool over_cap;
    bool no_mem;
};

/* Everything one HTTP exchange produced. */
struct exchange {
    CURLcode code;
    bool local_failure; /* setup failed before curl could try (allocation, options) */
    long http_status;
    bool request_sent;
    uint64_t retry_after_ms;
    uint64_t elapsed_ms;
    uint64_t t0_us; /* when the exchange began */
    struct body body;
    char curl_err[CURL_ERROR_SIZE];
};

/* What kind of transaction object a parse expects; they differ in required fields. */
enum parse_mode {
    PARSE_GET,       /* GET /payments/{key}: transactionKey, orderId, amount, status */
    PARSE_CANCEL,    /* cancel answer: transactionKey, status (CANCELLED or PARTIALLY_) */
    PARSE_LIST_ITEM, /* element of the orderId list: transactionKey, status */
};

/* --- Small helpers ---------------------------------------------------------------------------- */

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Writes zeros the compiler may not drop: used on buffers that may have held card data. */
static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n-- > 0)
        *v++ = 0;
}

/* Drops a multi-byte UTF-8 sequence cut short at the end of s, so truncated text stays valid
 * UTF-8 (jansson refuses to encode anything else, and this text ends up in JSON). */
static void utf8_cut_partial(char *s)
{
    size_t len = strlen(s);
    size_t i = len;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
        i--;
    if (i == 0)
        return;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t want = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (len - (i - 1) < want)
        s[i - 1] = '\0';
}

/*
 * Copies free text from the PG (reason, meta.message, cardType) into dst, truncating on a
 * UTF-8 boundary. Control characters become spaces so the text is safe in one log line, and
 * any run that looks like a card number keeps only its last four digits: a PG that echoes
 * the card in an error message must not put it into our DLQ or database.
 */
static void copy_text(char *dst, size_t dst_len, const char *src, size_t src_len)
{
    size_t o = 0, i = 0;
    if (dst_len == 0)
        return;
    while (i < src_len && o + 1 < dst_len) {
        unsigned char c = (unsigned char)src[i];
        if (is_digit((char)c)) {
            size_t end = i, digits = 0;
            /* Control characters count as separators, as they print as spaces: a card split
             * by tabs must be masked like one split by spaces. */
            while (end < src_len && (is_digit(src[end]) || src[end] == '-' || src[end] == ' ' ||
                                     (unsigned char)src[end] < 0x20 || src[end] == 0x7F)) {
                if (is_digit(src[end]))
                    digits++;
                end++;
            }
            size_t hide = digits >= CARD_RUN_MIN_DIGITS ? digits - 4 : 0;
            size_t seen = 0;
            for (; i < end && o + 1 < dst_len; i++) {
                if (is_digit(src[i]))
                    dst[o++] = seen++ < hide ? '*' : src[i];
                else if ((unsigned char)src[i] < 0x20 || src[i] == 0x7F)
                    dst[o++] = ' ';
                else
                    dst[o++] = src[i];
            }
            continue;
        }
        dst[o++] = (c < 0x20 || c == 0x7F) ? ' ' : (char)c;
        i++;
    }
    dst[o] = '\0';
    if (i < src_len)
        utf8_cut_partial(dst);
}

/* "****-****-****-1451": only the last four digits of cardNo survive. */
static void mask_card(char *dst, size_t dst_len, const char *src, size_t src_len)
{
    char last4[5] = "";
    int n = 0;
    for (size_t i = src_len; i > 0 && n < 4; i--) {
        if (is_digit(src[i - 1]))
            last4[3 - n++] = src[i - 1];
    }
    if (n < 4) {
        /* Too few digits to be a card number; keep nothing rather than guess. */
        snprintf(dst, dst_len, "%s", "****");
        return;
    }
    last4[4] = '\0';
    snprintf(dst, dst_len, "****-****-****-%s", last4);
}

GW_PRINTF(4, 5)
static int fail(char *why, size_t why_len, int err, const char *fmt, ...)
{
    if (why != NULL && why_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(why, why_len, fmt, ap);
        va_end(ap);
        if (n < 0)
            why[0] = '\0';
        else if ((size_t)n >= why_len)
            utf8_cut_partial(why);
    }
    return err;
}

GW_PRINTF(2, 3)
static void set_error(struct gateway_result *out, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out->error, sizeof out->error, fmt, ap);
    va_end(ap);
    if (n < 0)
        out->error[0] = '\0';
    else if ((size_t)n >= sizeof out->error)
        utf8_cut_partial(out->error);
}

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
        return "integer";
    case JSON_REAL:
        return "real";
    case JSON_TRUE:
    case JSON_FALSE:
        return "boolean";
    case JSON_NULL:
        return "null";
    default:
        abort();
    }
}

/* An id we send in a URL or a header, or copy out of an answer: 1..JOB_ID_MAX bytes without
 * control characters (a CR or LF in a header value would let it inject headers). */
static bool id_ok(const char *s, size_t n)
{
    if (n == 0 || n > JOB_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7F)
            return false;
    }
    return true;
}

static bool arg_id_ok(const char *s)
{
    return s != NULL && id_ok(s, strnlen(s, JOB_ID_MAX + 1));
}

/* --- JSON field access ------------------------------------------------------------------------ */

/* 0 with *s and *n set, 1 when the field is absent or null, SETTLE_EPARSE for another type. */
static int field_string(const json_t *obj, const char *ctx, const char *key, const char **s,
                        size_t *n, char *why, size_t why_len)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL || json_is_null(v))
        return 1;
    if (!json_is_string(v))
        return fail(why, why_len, SETTLE_EPARSE, "%s field \"%s\" must be a string, got %s", ctx,
                    key, json_type_name(v));
    *s = json_string_value(v);
    *n = json_string_length(v);
    return 0;
}

/* 0 with *out set, 1 when absent or null, SETTLE_EPARSE for another type or a value < min. */
static int field_int(const json_t *obj, const char *ctx, const char *key, int64_t min, int64_t *out,
                     char *why, size_t why_len)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL || json_is_null(v))
        return 1;
    if (!json_is_integer(v))
        return fail(why, why_len, SETTLE_EPARSE, "%s field \"%s\" must be an integer, got %s", ctx,
                    key, json_type_name(v));
    json_int_t x = json_integer_value(v);
    if (x < min)
        return fail(why, why_len, SETTLE_EPARSE, "%s field \"%s\" must be at least %lld, got %lld",
                    ctx, key, (long long)min, (long long)x);
    *out = (int64_t)x;
    return 0;
}

/* Copies a required-or-optional id field into dst (JOB_ID_MAX + 1 bytes). Ids are compared
 * by the worker, so one that does not fit is an error rather than something to truncate. */
static int field_id(const json_t *obj, const char *ctx, const char *key, bool required, char *dst,
                    char *why, size_t why_len)
{
    const char *s = NULL;
    size_t n = 0;
    int rc = field_string(obj, ctx, key, &s, &n, why, why_len);
    if (rc < 0)
        return rc;
    if (rc == 1)
        return required ? fail(why, why_len, SETTLE_EPARSE, "%s has no \"%s\"", ctx, key) : 1;
    if (!id_ok(s, n))
        return fail(why, why_len, SETTLE_EPARSE,
                    "%s field \"%s\" must be 1..%d bytes without control characters", ctx, key,
                    JOB_ID_MAX);
    memcpy(dst, s, n);
    dst[n] = '\0';
    return 0;
}

static int status_parse(const char *s, enum gateway_tx_status *out)
{
    static const struct {
        const char *name;
        enum gateway_tx_status status;
    } map[] = {
        {"PENDING", GATEWAY_TX_PENDING},
        {"SUCCESS", GATEWAY_TX_SUCCESS},
        {"FAILED", GATEWAY_TX_FAILED},
        {"CANCELLED", GATEWAY_TX_CANCELLED},
        {"PARTIALLY_CANCELLED", GATEWAY_TX_PARTIALLY_CANCELLED},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        if (strcmp(s, map[i].name) == 0) {
            *out = map[i].status;
            return 0;
        }
    }
    return SETTLE_EPARSE;
}

/* Fills *tx from one transaction object; what is required depends on mode. Absent optional
 * numbers are -1 (amount_minor included, which only a cancel or list answer may omit). */
static int parse_tx_object(const json_t *obj, enum parse_mode mode, const char *ctx,
                           struct gateway_tx *tx, char *why, size_t why_len)
{
    const char *s = NULL;
    size_t n = 0;
    int rc;

    memset(tx, 0, sizeof *tx);
    tx->amount_minor = -1;
    tx->cancelled_minor = -1;
    tx->balance_minor = -1;

    if (!json_is_object(obj))
        return fail(why, why_len, SETTLE_EPARSE, "%s must be an object, got %s", ctx,
                    json_type_name(obj));

    rc = field_id(obj, ctx, "transactionKey", true, tx->transaction_key, why, why_len);
    if (rc < 0)
        return rc;
    rc = field_id(obj, ctx, "orderId", mode == PARSE_GET, tx->order_id, why, why_len);
    if (rc < 0)
        return rc;

    /* A payment of zero or less does not exist; such an answer is forged or broken. */
    rc = field_int(obj, ctx, "amount", 1, &tx->amount_minor, why, why_len);
    if (rc < 0)
        return rc;
    if (rc == 1 && mode == PARSE_GET)
        return fail(why, why_len, SETTLE_EPARSE, "%s has no \"amount\"", ctx);

    rc = field_string(obj, ctx, "status", &s, &n, why, why_len);
    if (rc < 0)
        return rc;
    if (rc == 1)
        return fail(why, why_len, SETTLE_EPARSE, "%s has no \"status\"", ctx);
    if (strlen(s) != n || status_parse(s, &tx->status) != 0) {
        char shown[40];
        copy_text(shown, sizeof shown, s, n);
        return fail(why, why_len, SETTLE_EPARSE, "%s has unknown status \"%s\"", ctx, shown);
    }
    if (mode == PARSE_CANCEL && tx->status != GATEWAY_TX_CANCELLED &&
        tx->status != GATEWAY_TX_PARTIALLY_CANCELLED)
        return fail(why, why_len, SETTLE_EPARSE,
                    "%s to a cancel has status %s, expected CANCELLED or PARTIALLY_CANCELLED", ctx,
                    gateway_tx_status_name(tx->status));

    rc = field_string(obj, ctx, "reason", &s, &n, why, why_len);
    if (rc < 0)
        return rc;
    if (rc == 0)
        copy_text(tx->reason, sizeof tx->reason, s, n);

    rc = field_string(obj, ctx, "cardType", &s, &n, why, why_len);
    if (rc < 0)
        return rc;
    if (rc == 0)
        copy_text(tx->card_type, sizeof tx->card_type, s, n);

    rc = field_string(obj, ctx, "cardNo", &s, &n, why, why_len);
    if (rc < 0)
        return rc;
    if (rc == 0)
        mask_card(tx->card_no_masked, sizeof tx->card_no_masked, s, n);

    rc = field_int(obj, ctx, "cancelledAmount", 0, &tx->cancelled_minor, why, why_len);
    if (rc < 0)
        return rc;
    rc = field_int(obj, ctx, "balanceAmount", 0, &tx->balance_minor, why, why_len);
    if (rc < 0)
        return rc;
    return 0;
}

/*
 * Decodes the {"meta":..,"data":..} wrapper. 0 with *root (caller decrefs) and *data (an
 * object, borrowed from *root); SETTLE_EREJECTED with meta.message in why when meta.result is
 * FAIL; SETTLE_EPARSE otherwise. Duplicate keys are refused: an answer that says two things
 * about one field cannot be trusted with money.
 */
static int decode_envelope(const char *body, size_t len, json_t **root_out, json_t **data_out,
                           char *why, size_t why_len)
{
    json_error_t jerr;
    const char *s = NULL;
    size_t n = 0;
    int rc;

    *root_out = NULL;
    *data_out = NULL;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        /* jansson quotes the bytes "near" the error; they may be part of a card number. */
        char *near = strstr(jerr.text, " near ");
        if (near != NULL)
            *near = '\0';
        return fail(why, why_len, SETTLE_EPARSE, "invalid JSON in PG answer: %s (at byte %d)",
                    jerr.text, jerr.position);
    }
    if (!json_is_object(root)) {
        rc = fail(why, why_len, SETTLE_EPARSE, "PG answer must be a JSON object, got %s",
                  json_type_name(root));
        goto out;
    }
    json_t *meta = json_object_get(root, "meta");
    if (!json_is_object(meta)) {
        rc = fail(why, why_len, SETTLE_EPARSE, "PG answer has no \"meta\" object");
        goto out;
    }
    rc = field_string(meta, "PG answer meta", "result", &s, &n, why, why_len);
    if (rc < 0)
        goto out;
    if (rc == 1) {
        rc = fail(why, why_len, SETTLE_EPARSE, "PG answer meta has no \"result\"");
        goto out;
    }
    if (n == 4 && memcmp(s, "FAIL", 4) == 0) {
        /* We branch on meta.result, never on errorCode; the message is for humans. */
        if ((field_string(meta, "PG answer meta", "message", &s, &n, NULL, 0) != 0 || n == 0) &&
            (field_string(meta, "PG answer meta", "errorCode", &s, &n, NULL, 0) != 0 || n == 0)) {
            s = "meta.result FAIL without a message";
            n = strlen(s);
        }
        if (why != NULL && why_len > 0)
            copy_text(why, why_len, s, n);
        rc = SETTLE_EREJECTED;
        goto out;
    }
    if (n != 7 || memcmp(s, "SUCCESS", 7) != 0) {
        char shown[40];
        copy_text(shown, sizeof shown, s, n);
        rc = fail(why, why_len, SETTLE_EPARSE, "PG answer has unknown meta.result \"%s\"", shown);
        goto out;
    }
    json_t *data = json_object_get(root, "data");
    if (!json_is_object(data)) {
        rc = fail(why, why_len, SETTLE_EPARSE, "PG answer data must be an object, got %s",
                  data == NULL ? "nothing" : json_type_name(data));
        goto out;
    }
    *root_out = root;
    *data_out = data;
    return 0;
out:
    json_decref(root);
    return rc;
}

static int parse_transaction(const char *body, size_t len, enum parse_mode mode,
                             struct gateway_tx *tx, char *why, size_t why_len)
{
    json_t *root = NULL, *data = NULL;
    int rc = decode_envelope(body, len, &root, &data, why, why_len);
    if (rc == 0)
        rc = parse_tx_object(data, mode, "PG answer data", tx, why, why_len);
    json_decref(root);
    if (rc != 0)
        memset(tx, 0, sizeof *tx);
    return rc;
}

int gateway_parse_transaction(const char *body, size_t len, struct gateway_tx *tx, char *why,
                              size_t why_len)
{
    if (why != NULL && why_len > 0)
        why[0] = '\0';
    return parse_transaction(body, len, PARSE_GET, tx, why, why_len);
}

/* Higher wins; among equals the first (newest) element wins. */
static int pick_rank(enum gateway_tx_status s)
{
    return s == GATEWAY_TX_SUCCESS ? 2 : s == GATEWAY_TX_PENDING ? 1 : 0;
}

int gateway_parse_order_transactions(const char *body, size_t len, struct gateway_tx *tx, char *why,
                                     size_t why_len)
{
    json_t *root = NULL, *data = NULL;
    char order_id[JOB_ID_MAX + 1];
    struct gateway_tx item;
    int best_rank = -1;
    int rc;

    if (why != NULL && why_len > 0)
        why[0] = '\0';
    memset(tx, 0, sizeof *tx);
    rc = decode_envelope(body, len, &root, &data, why, why_len);
    if (rc != 0)
        goto out;
    rc = field_id(data, "PG answer data", "orderId", true, order_id, why, why_len);
    if (rc < 0)
        goto out;
    json_t *list = json_object_get(data, "transactions");
    if (!json_is_array(list)) {
        rc = fail(why, why_len, SETTLE_EPARSE,
                  "PG answer data field \"transactions\" must be an "
                  "array, got %s",
                  list == NULL ? "nothing" : json_type_name(list));
        goto out;
    }
    if (json_array_size(list) == 0) {
        rc = fail(why, why_len, SETTLE_ENOTFOUND, "PG has no transaction for order %s", order_id);
        goto out;
    }
    /* Every element is validated, not just the chosen one: a malformed element could be the
     * SUCCESS we are looking for, and guessing around it could report the wrong payment. */
    for (size_t i = 0; i < json_array_size(list); i++) {
        char ctx[48];
        snprintf(ctx, sizeof ctx, "PG answer transactions[%zu]", i);
        rc = parse_tx_object(json_array_get(list, i), PARSE_LIST_ITEM, ctx, &item, why, why_len);
        if (rc != 0)
            goto out;
        if (item.order_id[0] == '\0')
            memcpy(item.order_id, order_id, sizeof order_id);
        int rank = pick_rank(item.status);
        if (rank > best_rank) {
            best_rank = rank;
            *tx = item;
        }
    }
    rc = 0;
out:
    json_decref(root);
    wipe(&item, sizeof item);
    if (rc != 0)
        memset(tx, 0, sizeof *tx);
    return rc;
}

/* --- The paged payment list ------------------------------------------------------------------ */

void gateway_page_free(struct gateway_page *p)
{
    if (p == NULL)
        return;
    free(p->items);
    memset(p, 0, sizeof *p);
}

/* One list element into *pay. The list is the merchant's view: it names the user (for the
 * refund's X-USER-ID) and the creation time, but never card data, which is not read. */
static int parse_list_payment(const json_t *obj, const char *ctx, struct gateway_payment *pay,
                              char *why, size_t why_len)
{
    const char *s = NULL;
    size_t n = 0;
    int rc;

    memset(pay, 0, sizeof *pay);
    pay->created_ms = -1;
    pay->cancelled_minor = -1;
    pay->balance_minor = -1;
    if (!json_is_object(obj))
        return fail(why, why_len, SETTLE_EPARSE, "%s must be an object, got %s", ctx,
                    json_type_name(obj));
    rc = field_id(obj, ctx, "transactionKey", true, pay->transaction_key, why, why_len);
    if (rc < 0)
        return rc;
    rc = field_id(obj, ctx, "orderId", true, pay->order_id, why, why_len);
    if (rc < 0)
        return rc;
    rc = field_id(obj, ctx, "userId", false, pay->user_id, why, why_len);
    if (rc < 0)
        return rc;
    rc = field_int(obj, ctx, "amount", 1, &pay->amount_minor, why, why_len);
    if (rc < 0)
        return rc;
    if (rc == 1)
        return fail(why, why_len, SETTLE_EPARSE, "%s has no \"amount\"", ctx);
    rc = field_string(obj, ctx, "status", &s, &n, why, why_len);
    if (rc < 0)
        return rc;
    if (rc == 1)
        return fail(why, why_len, SETTLE_EPARSE, "%s has no \"status\"", ctx);
    if (strlen(s) != n || status_parse(s, &pay->status) != 0) {
        char shown[40];
        copy_text(shown, sizeof shown, s, n);
        return fail(why, why_len, SETTLE_EPARSE, "%s has unknown status \"%s\"", ctx, shown);
    }
    rc = field_int(obj, ctx, "createdAt", 0, &pay->created_ms, why, why_len);
    if (rc < 0)
        return rc;
    rc = field_int(obj, ctx, "cancelledAmount", 0, &pay->cancelled_minor, why, why_len);
    if (rc < 0)
        return rc;
    rc = field_int(obj, ctx, "balanceAmount", 0, &pay->balance_minor, why, why_len);
    if (rc < 0)
        return rc;
    return 0;
}

/* A required non-negative integer field of the page object. */
static int page_int(const json_t *data, const char *key, int64_t min, int64_t *out, char *why,
                    size_t why_len)
{
    int rc = field_int(data, "PG answer data", key, min, out, why, why_len);
    if (rc == 1)
        return fail(why, why_len, SETTLE_EPARSE, "PG answer data has no \"%s\"", key);
    return rc;
}

int gateway_parse_payment_page(const char *body, size_t len, struct gateway_page *out, char *why,
                               size_t why_len)
{
    json_t *root = NULL, *data = NULL;
    struct gateway_page pg;
    int rc;

    memset(&pg, 0, sizeof pg);
    if (why != NULL && why_len > 0)
        why[0] = '\0';
    memset(out, 0, sizeof *out);
    rc = decode_envelope(body, len, &root, &data, why, why_len);
    if (rc != 0)
        goto out;
    if ((rc = page_int(data, "page", 0, &pg.page, why, why_len)) != 0 ||
        (rc = page_int(data, "size", 1, &pg.size, why, why_len)) != 0 ||
        (rc = page_int(data, "totalPages", 0, &pg.total_pages, why, why_len)) != 0 ||
        (rc = page_int(data, "totalElements", 0, &pg.total_elements, why, why_len)) != 0)
        goto out;
    if (pg.size > GATEWAY_PAGE_SIZE_MAX) {
        rc = fail(why, why_len, SETTLE_EPARSE, "PG answer page size %lld is over %d",
                  (long long)pg.size, GATEWAY_PAGE_SIZE_MAX);
        goto out;
    }
    json_t *list = json_object_get(data, "payments");
    if (!json_is_array(list)) {
        rc = fail(why, why_len, SETTLE_EPARSE,
                  "PG answer data field \"payments\" must be an array, got %s",
                  list == NULL ? "nothing" : json_type_name(list));
        goto out;
    }
    size_t n = json_array_size(list);
    /* A page longer than its size, or with elements past the last page, is not the
     * documented shape; acting on it could skip or double-count payments. */
    if (n > (size_t)pg.size) {
        rc = fail(why, why_len, SETTLE_EPARSE,
                  "PG answer page holds %zu payments, over its size %lld", n, (long long)pg.size);
        goto out;
    }
    if (n > 0 && pg.page >= pg.total_pages) {
        rc = fail(why, why_len, SETTLE_EPARSE,
                  "PG answer page %lld holds payments but totalPages is %lld", (long long)pg.page,
                  (long long)pg.total_pages);
        goto out;
    }
    if (n > 0) {
        pg.items = calloc(n, sizeof *pg.items);
        if (pg.items == NULL) {
            rc = fail(why, why_len, SETTLE_ENOMEM, "out of memory for %zu payments", n);
            goto out;
        }
    }
    for (size_t i = 0; i < n; i++) {
        char ctx[48];
        snprintf(ctx, sizeof ctx, "PG answer payments[%zu]", i);
        rc = parse_list_payment(json_array_get(list, i), ctx, &pg.items[i], why, why_len);
        if (rc != 0)
            goto out;
    }
    pg.n = n;
    *out = pg;
    pg.items = NULL;
    rc = 0;
out:
    free(pg.items);
    json_decref(root);
    return rc;
}

/* --- Classification -----------------------------------------------------------------------------
 */

enum gateway_outcome gateway_classify(bool transport_ok, long http_status)
{
    if (!transport_ok)
        return GATEWAY_TRANSIENT;
    if (http_status >= 200 && http_status <= 299)
        return GATEWAY_OK;
    if (http_status == 404)
        return GATEWAY_NOT_FOUND;
    if (http_status == 429)
        return GATEWAY_TRANSIENT;
    if (http_status >= 400 && http_status <= 499)
        return GATEWAY_REJECTED;
    if (http_status >= 500 && http_status <= 599)
        return GATEWAY_TRANSIENT;
    /* 1xx and 3xx (we follow no redirects) and anything outside HTTP: not the documented API. */
    return GATEWAY_BAD_RESPONSE;
}

const char *gateway_outcome_name(enum gateway_outcome o)
{
    switch (o) {
    case GATEWAY_OK:
        return "ok";
    case GATEWAY_NOT_FOUND:
        return "not_found";
    case GATEWAY_TRANSIENT:
        return "transient";
    case GATEWAY_REJECTED:
        return "rejected";
    case GATEWAY_BAD_RESPONSE:
        return "bad_response";
    default:
        /* A name lookup is used in logs and error paths; a bad value must not crash them. */
        return "invalid";
    }
}

const char *gateway_result_class(const struct gateway_result *r)
{
    switch (r->outcome) {
    case GATEWAY_OK:
        return "2xx";
    case GATEWAY_NOT_FOUND:
        return "404";
    case GATEWAY_REJECTED:
        return "4xx";
    case GATEWAY_BAD_RESPONSE:
        return "bad_response";
    case GATEWAY_TRANSIENT:
        if (r->http_status == 429)
            return "429";
        if (r->http_status >= 500)
            return "5xx";
        if (strncmp(r->error, "timed out", 9) == 0)
            return "timeout";
        return "transport";
    default:
        abort();
    }
}

const char *gateway_tx_status_name(enum gateway_tx_status s)
{
    switch (s) {
    case GATEWAY_TX_UNKNOWN:
        return "UNKNOWN";
    case GATEWAY_TX_PENDING:
        return "PENDING";
    case GATEWAY_TX_SUCCESS:
        return "SUCCESS";
    case GATEWAY_TX_FAILED:
        return "FAILED";
    case GATEWAY_TX_CANCELLED:
        return "CANCELLED";
    case GATEWAY_TX_PARTIALLY_CANCELLED:
        return "PARTIALLY_CANCELLED";
    default:
        return "invalid";
    }
}

/* --- The easy-handle pool -------------------------------------------------------------------- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_FAILED_INIT;

static void curl_init_once(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* With wait, blocks until a handle is idle or one may be created (pool threads); without,
 * returns NULL at once when none is (the loop thread never blocks). NULL also when creation
 * failed. */
static CURL *handle_acquire(struct gateway *g, bool wait)
{
    CURL *h = NULL;
    bool create = false;

    pthread_mutex_lock(&g->mu);
    while (wait && g->n_idle == 0 && g->n_created >= g->max_handles)
        pthread_cond_wait(&g->cv, &g->mu);
    if (g->n_idle == 0 && g->n_created >= g->max_handles) {
        pthread_mutex_unlock(&g->mu);
        return NULL;
    }
    if (g->n_idle > 0) {
        h = g->idle[--g->n_idle];
    } else {
        g->n_created++;
        create = true;
    }
    pthread_mutex_unlock(&g->mu);

    if (create) {
        /* Created outside the lock: curl_easy_init allocates and should not serialize. */
        h = curl_easy_init();
        if (h == NULL) {
            pthread_mutex_lock(&g->mu);
            g->n_created--;
            pthread_cond_signal(&g->cv);
            pthread_mutex_unlock(&g->mu);
        }
    }
    return h;
}

static void handle_release(struct gateway *g, CURL *h)
{
    pthread_mutex_lock(&g->mu);
    GW_ASSERT(g->n_idle < g->n_created);
    g->idle[g->n_idle++] = h;
    pthread_cond_signal(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

int gateway_create(struct gateway **out, const struct gateway_config *cfg)
{
    *out = NULL;
    if (cfg == NULL || cfg->base_url == NULL || cfg->connect_timeout_ms == 0 ||
        cfg->timeout_ms == 0 || cfg->body_max_bytes == 0 || cfg->max_handles == 0 ||
        cfg->max_handles > MAX_HANDLES_LIMIT || cfg->body_max_bytes >= SIZE_MAX / 2)
        return SETTLE_EINVAL;
    size_t url_len = strnlen(cfg->base_url, BASE_URL_MAX + 1);
    if (url_len > BASE_URL_MAX ||
        (strncmp(cfg->base_url, "http://", 7) != 0 && strncmp(cfg->base_url, "https://", 8) != 0))
        return SETTLE_EINVAL;
    for (size_t i = 0; i < url_len; i++) {
        unsigned char c = (unsigned char)cfg->base_url[i];
        if (c <= 0x20 || c >= 0x7F)
            return SETTLE_EINVAL;
    }

    pthread_once(&curl_once, curl_init_once);
    if (curl_init_rc != CURLE_OK)
        return SETTLE_ENOMEM;

    struct gateway *g = calloc(1, sizeof *g);
    if (g == NULL)
        return SETTLE_ENOMEM;
    g->idle = calloc(cfg->max_handles, sizeof *g->idle);
    g->base_url = malloc(url_len + 1);
    if (g->idle == NULL || g->base_url == NULL) {
        free(g->idle);
        free(g->base_url);
        free(g);
        return SETTLE_ENOMEM;
    }
    memcpy(g->base_url, cfg->base_url, url_len + 1);
    while (url_len > 0 && g->base_url[url_len - 1] == '/')
        g->base_url[--url_len] = '\0';
    /* curl takes longs; anything beyond LONG_MAX ms is "forever" in practice. */
    g->connect_timeout_ms =
        cfg->connect_timeout_ms > LONG_MAX ? LONG_MAX : (long)cfg->connect_timeout_ms;
    g->timeout_ms = cfg->timeout_ms > LONG_MAX ? LONG_MAX : (long)cfg->timeout_ms;
    g->body_max_bytes = (size_t)cfg->body_max_bytes;
    g->max_handles = cfg->max_handles;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    *out = g;
    return 0;
}

void gateway_destroy(struct gateway *g)
{
    if (g == NULL)
        return;
    pthread_mutex_lock(&g->mu);
    /* Destroying while a work function holds a handle is a caller bug (header contract). */
    GW_ASSERT(g->n_idle == g->n_created);
    for (unsigned i = 0; i < g->n_idle; i++)
        curl_easy_cleanup(g->idle[i]);
    pthread_mutex_unlock(&g->mu);
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g->idle);
    free(g->base_url);
    free(g);
}

/* --- One HTTP exchange ------------------------------------------------------------------------ */

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct body *b = userdata;
    size_t n = size * nmemb;

    if (n > b->max_bytes - b->len) {
        /* Returning less than n makes curl stop with CURLE_WRITE_ERROR; the flag says why. */
        b->over_cap = true;
        return 0;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap > 0 ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        if (cap > b->max_bytes + 1)
            cap = b->max_bytes + 1;
        char *p = malloc(cap);
        if (p == NULL) {
            b->no_mem = true;
            return 0;
        }
        /* Not realloc: the old block may hold card data and must be wiped, not abandoned. */
        if (b->data != NULL) {
            memcpy(p, b->data, b->len);
            wipe(b->data, b->cap);
            free(b->data);
        }
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

static bool ascii_prefix_ci(const char *s, size_t n, const char *prefix)
{
    size_t i = 0;
    for (; prefix[i] != '\0'; i++) {
        if (i >= n)
            return false;
        char a = s[i], b = prefix[i];
        if (a >= 'A' && a <= 'Z')
            a = (char)(a - 'A' + 'a');
        if (a != b)
            return false;
    }
    return true;
}

/* Reads Retry-After in its delta-seconds form; the HTTP-date form is ignored (the retry
 * policy's own backoff applies then). */
static size_t on_header(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct exchange *ex = userdata;
    size_t n = size * nmemb;
    static const char name[] = "retry-after:";

    if (n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) {
        /* A new status line (after a 1xx): headers of the previous response do not count. */
        ex->retry_after_ms = 0;
        return n;
    }
    if (!ascii_prefix_ci(ptr, n, name))
        return n;
    size_t i = sizeof name - 1;
    while (i < n && (ptr[i] == ' ' || ptr[i] == '\t'))
        i++;
    uint64_t secs = 0;
    size_t digits = 0;
    for (; i < n && is_digit(ptr[i]); i++, digits++) {
        if (secs <= RETRY_AFTER_MAX_S)
            secs = secs * 10 + (uint64_t)(ptr[i] - '0');
    }
    for (; i < n; i++) {
        if (ptr[i] != ' ' && ptr[i] != '\t' && ptr[i] != '\r' && ptr[i] != '\n')
            return n; /* not delta-seconds */
    }
    if (digits > 0)
        ex->retry_after_ms = (secs > RETRY_AFTER_MAX_S ? RETRY_AFTER_MAX_S : secs) * 1000u;
    return n;
}

#define SETOPT(h, opt, val)                                                                        \
    do {                                                                                           \
        if (rc == CURLE_OK)                                                                        \
            rc = curl_easy_setopt((h), (opt), (val));                                              \
    } while (0)

/*
 * Sets every option this module uses, on every use. The handle is not reset between calls
 * (its keep-alive connection is the point of reusing it), so any option one request sets
 * must be set again, to its value or its default, by the next.
 */
static CURLcode exchange_setup(const struct gateway *g, CURL *h, const char *url,
                               struct curl_slist *headers, const char *post, size_t post_len,
                               struct exchange *ex)
{
    CURLcode rc = CURLE_OK;

    SETOPT(h, CURLOPT_URL, url);
    SETOPT(h, CURLOPT_NOSIGNAL, 1L);
    SETOPT(h, CURLOPT_CONNECTTIMEOUT_MS, g->connect_timeout_ms);
    SETOPT(h, CURLOPT_TIMEOUT_MS, g->timeout_ms);
    /* No redirects and no scheme but HTTP(S): a PG answer must come from the PG. TLS peer and
     * host verification stay at curl's secure defaults and are never touched here. */
    SETOPT(h, CURLOPT_FOLLOWLOCATION, 0L);
#if LIBCURL_VERSION_NUM >= 0x075500
    SETOPT(h, CURLOPT_PROTOCOLS_STR, "http,https");
    SETOPT(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
    SETOPT(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
    SETOPT(h, CURLOPT_REDIR_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    /* HTTP/1.1 keeps "was the request sent?" answerable from CURLINFO_REQUEST_SIZE. */
    SETOPT(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    SETOPT(h, CURLOPT_TCP_KEEPALIVE, 1L);
    SETOPT(h, CURLOPT_TCP_KEEPIDLE, 30L);
    SETOPT(h, CURLOPT_TCP_KEEPINTVL, 10L);
    SETOPT(h, CURLOPT_USERAGENT, "settle/" SETTLE_VERSION);
    SETOPT(h, CURLOPT_HTTPHEADER, headers);
    SETOPT(h, CURLOPT_FAILONERROR, 0L);
    SETOPT(h, CURLOPT_NOBODY, 0L);
    SETOPT(h, CURLOPT_CUSTOMREQUEST, (char *)NULL);
    SETOPT(h, CURLOPT_WRITEFUNCTION, on_body);
    SETOPT(h, CURLOPT_WRITEDATA, (void *)&ex->body);
    SETOPT(h, CURLOPT_HEADERFUNCTION, on_header);
    SETOPT(h, CURLOPT_HEADERDATA, (void *)ex);
    SETOPT(h, CURLOPT_ERRORBUFFER, ex->curl_err);
    if (post != NULL) {
        /* Size first: POSTFIELDS alone would leave a previous size in place. */
        SETOPT(h, CURLOPT_POSTFIELDSIZE, (long)post_len);
        SETOPT(h, CURLOPT_POSTFIELDS, post);
    } else {
        SETOPT(h, CURLOPT_POSTFIELDSIZE, -1L);
        SETOPT(h, CURLOPT_POSTFIELDS, (char *)NULL);
        /* Last: HTTPGET turns the method back to GET after POSTFIELDS made it POST. */
        SETOPT(h, CURLOPT_HTTPGET, 1L);
    }
    return rc;
}

/* Prepares one request on h. false when the options could not be set (ex->local_failure;
 * nothing was sent). Either way exchange_end must follow. */
static bool exchange_begin(const struct gateway *g, CURL *h, const char *url,
                           struct curl_slist *headers, const char *post, size_t post_len,
                           struct exchange *ex)
{
    memset(ex, 0, sizeof *ex);
    ex->t0_us = now_us();
    ex->body.max_bytes = g->body_max_bytes;
    ex->code = exchange_setup(g, h, url, headers, post, post_len, ex);
    if (ex->code != CURLE_OK)
        ex->local_failure = true;
    return !ex->local_failure;
}

/* Records how the request on h ended (curl's code; ignored after a local failure) and
 * detaches h from the exchange. The exchange's body must be freed with exchange_free. */
static void exchange_end(CURL *h, struct exchange *ex, CURLcode code)
{
    long request_size = 0;

    if (!ex->local_failure) {
        ex->code = code;
        if (curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &ex->http_status) != CURLE_OK)
            ex->http_status = 0;
        if (curl_easy_getinfo(h, CURLINFO_REQUEST_SIZE, &request_size) != CURLE_OK)
            request_size = 1; /* unknown: assume sent, the safe side for refunds */
        /* Nothing handed to the socket (connect/resolve failures, connect timeouts, TLS
         * handshake failures) means the PG cannot have acted. Any byte out, or any answer,
         * means it might. */
        ex->request_sent = ex->code == CURLE_OK || request_size > 0 || ex->http_status > 0;
    }
    /* The handle outlives this exchange in the pool: leave it no pointers into it. */
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, (char *)NULL);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, (struct curl_slist *)NULL);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, (void *)NULL);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, (void *)NULL);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, (char *)NULL);
    ex->elapsed_ms = (now_us() - ex->t0_us) / 1000u;
}

/* Runs one request on h, blocking. The exchange's body must be freed with exchange_free. */
static void exchange_run(const struct gateway *g, CURL *h, const char *url,
                         struct curl_slist *headers, const char *post, size_t post_len,
                         struct exchange *ex)
{
    CURLcode code = CURLE_OK;
    if (exchange_begin(g, h, url, headers, post, post_len, ex))
        code = curl_easy_perform(h);
    exchange_end(h, ex, code);
}

static void exchange_free(struct exchange *ex)
{
    if (ex->body.data != NULL) {
        wipe(ex->body.data, ex->body.cap);
        free(ex->body.data);
    }
    ex->body.data = NULL;
    ex->body.len = ex->body.cap = 0;
}

/* meta.message of a non-2xx answer (or errorCode), for the error sentence; "" when none. */
static void answer_message(const struct body *b, char *dst, size_t dst_len)
{
    json_t *root = NULL, *data = NULL;
    dst[0] = '\0';
    if (b->data == NULL)
        return;
    if (decode_envelope(b->data, b->len, &root, &data, dst, dst_len) != SETTLE_EREJECTED)
        dst[0] = '\0';
    json_decref(root);
}

/*
 * Fills out from a finished exchange. Returns true when the answer is a complete 2xx the
 * caller must parse; otherwise out is final.
 */
static bool exchange_judge(const struct gateway *g, const struct exchange *ex,
                           struct gateway_result *out)
{
    char msg[160];

    out->http_status = ex->http_status;
    out->request_sent = ex->request_sent;
    out->retry_after_ms = ex->retry_after_ms;
    out->breaker_failure = false;

    if (ex->local_failure || ex->body.no_mem) {
        /* Our own resources ran out; that says nothing about the PG's health. */
        out->outcome = GATEWAY_TRANSIENT;
        if (ex->body.no_mem)
            set_error(out, "out of memory reading the PG answer");
        else
            set_error(out, "could not set up the PG request (curl: %s)",
                      curl_easy_strerror(ex->code));
        return false;
    }
    if (ex->body.over_cap) {
        out->outcome = gateway_classify(true, ex->http_status);
        out->breaker_failure = ex->http_status >= 500 && ex->http_status <= 599;
        if (out->outcome == GATEWAY_OK || out->outcome == GATEWAY_BAD_RESPONSE) {
            out->outcome = GATEWAY_BAD_RESPONSE;
            set_error(out, "PG answer over %zu bytes", g->body_max_bytes);
        } else {
            /* The status alone decides non-2xx answers; their body was only for the text. */
            set_error(out, "PG answered HTTP %ld (answer over %zu bytes)", ex->http_status,
                      g->body_max_bytes);
        }
        return false;
    }
    if (ex->code != CURLE_OK) {
        const char *detail = ex->curl_err[0] != '\0' ? ex->curl_err : curl_easy_strerror(ex->code);
        out->outcome = gateway_classify(false, 0);
        out->breaker_failure = true;
        if (ex->code == CURLE_OPERATION_TIMEDOUT)
            set_error(out, "timed out after %llu ms (curl: %s)", (unsigned long long)ex->elapsed_ms,
                      detail);
        else if (!ex->request_sent)
            set_error(out, "could not reach PG (curl: %s)", detail);
        else
            set_error(out, "PG transport failed after %llu ms (curl: %s)",
                      (unsigned long long)ex->elapsed_ms, detail);
        return false;
    }

    out->outcome = gateway_classify(true, ex->http_status);
    out->breaker_failure = ex->http_status >= 500 && ex->http_status <= 599;
    switch (out->outcome) {
    case GATEWAY_OK:
        return true;
    case GATEWAY_NOT_FOUND:
    case GATEWAY_TRANSIENT:
    case GATEWAY_REJECTED:
        answer_message(&ex->body, msg, sizeof msg);
        if (msg[0] != '\0')
            set_error(out, "PG answered HTTP %ld: %s", ex->http_status, msg);
        else
            set_error(out, "PG answered HTTP %ld", ex->http_status);
        return false;
    case GATEWAY_BAD_RESPONSE:
        set_error(out, "PG answered HTTP %ld, which the API never sends", ex->http_status);
        return false;
    default:
        abort();
    }
}

/* Turns a 2xx parse result into the outcome. */
static void parse_judge(int rc, const char *why, struct gateway_result *out)
{
    switch (rc) {
    case 0:
        out->outcome = GATEWAY_OK;
        out->error[0] = '\0';
        return;
    case SETTLE_EREJECTED:
        out->outcome = GATEWAY_REJECTED;
        set_error(out, "PG answered FAIL: %s", why);
        break;
    case SETTLE_ENOTFOUND:
        out->outcome = GATEWAY_NOT_FOUND;
        set_error(out, "%s", why);
        break;
    case SETTLE_EPARSE:
        out->outcome = GATEWAY_BAD_RESPONSE;
        set_error(out, "%s", why);
        break;
    default:
        abort();
    }
    memset(&out->tx, 0, sizeof out->tx);
}

static void result_init(struct gateway_result *out)
{
    memset(out, 0, sizeof *out);
    out->tx.amount_minor = -1;
    out->tx.cancelled_minor = -1;
    out->tx.balance_minor = -1;
}

/* Input we refuse to send: the request never leaves, and retrying cannot help. */
static void refuse_input(struct gateway_result *out, const char *what)
{
    out->outcome = GATEWAY_REJECTED;
    out->request_sent = false;
    set_error(out, "not sent: %s must be 1..%d bytes without control characters", what, JOB_ID_MAX);
}

static void local_failure(struct gateway_result *out, const char *what)
{
    out->outcome = GATEWAY_TRANSIENT;
    out->request_sent = false;
    set_error(out, "not sent: out of memory %s", what);
}

/* {base}{path}{escaped segment}{suffix}; malloc'd, NULL on allocation failure. */
static char *build_url(const struct gateway *g, CURL *h, const char *path, const char *segment,
                       const char *suffix)
{
    char *esc = curl_easy_escape(h, segment, (int)strlen(segment));
    if (esc == NULL)
        return NULL;
    size_t n = strlen(g->base_url) + strlen(path) + strlen(esc) + strlen(suffix) + 1;
    char *url = malloc(n);
    if (url != NULL)
        snprintf(url, n, "%s%s%s%s", g->base_url, path, esc, suffix);
    curl_free(esc);
    return url;
}

/* Appends "name: value"; false on allocation failure (the list is kept either way). */
static bool add_header(struct curl_slist **list, const char *name, const char *value)
{
    char line[64 + JOB_ID_MAX];
    /* curl sends "Name:" (no value) as "remove this header" and "Name;" as an empty one. */
    if (value[0] == '\0')
        snprintf(line, sizeof line, "%s:", name);
    else
        snprintf(line, sizeof line, "%s: %s", name, value);
    struct curl_slist *l = curl_slist_append(*list, line);
    if (l == NULL)
        return false;
    *list = l;
    return true;
}

/* Judges a GET's exchange and parses its 2xx answer (the orderId list when list) into out. */
static void judge_get(const struct gateway *g, const struct exchange *ex, bool list,
                      struct gateway_result *out)
{
    char why[GATEWAY_ERROR_MAX];

    if (exchange_judge(g, ex, out)) {
        const char *b = ex->body.data != NULL ? ex->body.data : "";
        int rc = list ? gateway_parse_order_transactions(b, ex->body.len, &out->tx, why, sizeof why)
                      : parse_transaction(b, ex->body.len, PARSE_GET, &out->tx, why, sizeof why);
        parse_judge(rc, why, out);
    }
}

/*
 * A payment status query: by transaction key, or by order id; a key the PG does not know is
 * asked again by order id, and a transaction the orderId list gave without its amount is
 * fetched again in full. The same steps serve the blocking (pool) and the loop versions.
 */
struct status_query {
    struct gateway *g;
    CURL *h;
    struct curl_slist *headers;
    char *url;
    bool by_key; /* the current step asks by key (else it reads the orderId list) */
    bool asked_by_order;
    char order_id[JOB_ID_MAX + 1];
    struct gateway_result *out;
    uint64_t t0;
};

/* Validates the input, borrows a handle and prepares the first step. false when the query
 * is over before any request (out says why). */
static bool status_begin(struct status_query *q, struct gateway *g, bool wait, const char *user_id,
                         const char *transaction_key, const char *order_id,
                         struct gateway_result *out)
{
    memset(q, 0, sizeof *q);
    q->g = g;
    q->out = out;
    q->t0 = now_us();
    q->by_key = transaction_key != NULL && transaction_key[0] != '\0';
    result_init(out);
    if (!arg_id_ok(user_id)) {
        refuse_input(out, "the user id");
        return false;
    }
    if (q->by_key ? !arg_id_ok(transaction_key) : !arg_id_ok(order_id)) {
        refuse_input(out, q->by_key ? "the transaction key" : "the order id");
        return false;
    }
    if (arg_id_ok(order_id))
        memcpy(q->order_id, order_id, strlen(order_id) + 1);
    q->h = handle_acquire(g, wait);
    if (q->h == NULL) {
        local_failure(out, "creating a curl handle");
        return false;
    }
    if (!add_header(&q->headers, "X-USER-ID", user_id) ||
        !add_header(&q->headers, "Accept", "application/json")) {
        local_failure(out, "building headers");
        return false;
    }
    q->asked_by_order = !q->by_key;
    q->url = q->by_key ? build_url(g, q->h, "/api/v1/payments/", transaction_key, "")
                       : build_url(g, q->h, "/api/v1/payments?orderId=", order_id, "");
    if (q->url == NULL) {
        local_failure(out, "building the URL");
        return false;
    }
    return true;
}

/* After a step was judged: prepares the next step and returns true, or false when the
 * answer is final. */
static bool status_next(struct status_query *q)
{
    struct gateway_result *out = q->out;
    const char *path = NULL, *segment = NULL;
    char key[JOB_ID_MAX + 1];

    /* A key the PG does not know is no proof that the order is unpaid (a job may carry a
     * stale or foreign key): ask by order id before anyone concludes "no payment", so a 404
     * can never expire an order that was paid under another key. */
    if (q->by_key && !q->asked_by_order && out->outcome == GATEWAY_NOT_FOUND &&
        q->order_id[0] != '\0') {
        path = "/api/v1/payments?orderId=";
        segment = q->order_id;
        q->by_key = false;
        q->asked_by_order = true;
    } else if (!q->by_key && out->outcome == GATEWAY_OK && out->tx.amount_minor < 0) {
        /* The orderId list may omit amounts (the real simulator does); the amount is what
         * lets the worker notice a forged answer, so fetch the chosen transaction in full. */
        memcpy(key, out->tx.transaction_key, sizeof key);
        path = "/api/v1/payments/";
        segment = key;
        q->by_key = true;
    } else {
        return false;
    }
    free(q->url);
    q->url = build_url(q->g, q->h, path, segment, "");
    result_init(out);
    if (q->url == NULL) {
        local_failure(out, "building the URL");
        return false;
    }
    return true;
}

static void status_end(struct status_query *q)
{
    if (q->h != NULL)
        handle_release(q->g, q->h);
    curl_slist_free_all(q->headers);
    free(q->url);
    q->out->latency_us = now_us() - q->t0;
}

void gateway_query_status_work(struct gateway *g, const char *user_id, const char *transaction_key,
                               const char *order_id, struct gateway_result *out)
{
    struct status_query q;
    struct exchange ex;

    if (status_begin(&q, g, true, user_id, transaction_key, order_id, out)) {
        do {
            exchange_run(g, q.h, q.url, q.headers, NULL, 0, &ex);
            judge_get(g, &ex, !q.by_key, out);
            exchange_free(&ex);
        } while (status_next(&q));
    }
    status_end(&q);
}

/* The loop version's state: the query and the exchange in flight. */
struct gateway_call {
    struct status_query q;
    struct exchange ex;
    struct httploop *hl;
    gateway_call_cb done;
    void *arg;
};

static void on_call_step(void *arg, CURL *easy, CURLcode result);

/* Starts the current step's request; false when it could not start (the step's exchange
 * then holds a local failure, already ended). */
static bool call_launch(struct gateway_call *c)
{
    if (exchange_begin(c->q.g, c->q.h, c->q.url, c->q.headers, NULL, 0, &c->ex) &&
        httploop_add(c->hl, c->q.h, on_call_step, c) == 0)
        return true;
    c->ex.local_failure = true;
    exchange_end(c->q.h, &c->ex, c->ex.code);
    return false;
}

/* The current step's exchange has ended: judges it and launches the next step, if any.
 * true when a request is in flight again, false when the answer is final. */
static bool call_advance(struct gateway_call *c)
{
    for (;;) {
        judge_get(c->q.g, &c->ex, !c->q.by_key, c->q.out);
        exchange_free(&c->ex);
        if (!status_next(&c->q))
            return false;
        if (call_launch(c))
            return true;
    }
}

static void on_call_step(void *arg, CURL *easy, CURLcode result)
{
    struct gateway_call *c = arg;
    exchange_end(easy, &c->ex, result);
    if (call_advance(c))
        return;
    status_end(&c->q);
    gateway_call_cb done = c->done;
    void *done_arg = c->arg;
    free(c);
    done(done_arg);
}

int gateway_query_status_start(struct gateway *g, struct httploop *hl, const char *user_id,
                               const char *transaction_key, const char *order_id,
                               struct gateway_result *out, gateway_call_cb done, void *arg)
{
    struct gateway_call *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        result_init(out);
        local_failure(out, "starting the request");
        return 1;
    }
    c->hl = hl;
    c->done = done;
    c->arg = arg;
    if (status_begin(&c->q, g, false, user_id, transaction_key, order_id, out) &&
        (call_launch(c) || call_advance(c)))
        return 0;
    status_end(&c->q);
    free(c);
    return 1;
}

void gateway_cancel_work(struct gateway *g, const char *user_id, const char *transaction_key,
                         const char *idempotency_key, int64_t amount_minor, const char *reason,
                         struct gateway_result *out)
{
    uint64_t t0 = now_us();
    struct curl_slist *headers = NULL;
    char *url = NULL, *body = NULL;
    json_t *req = NULL;
    CURL *h = NULL;
    struct exchange ex;
    char why[GATEWAY_ERROR_MAX];

    memset(&ex, 0, sizeof ex);
    result_init(out);
    if (!arg_id_ok(user_id)) {
        refuse_input(out, "the user id");
        goto out;
    }
    if (!arg_id_ok(transaction_key)) {
        refuse_input(out, "the transaction key");
        goto out;
    }
    if (!arg_id_ok(idempotency_key)) {
        refuse_input(out, "the idempotency key");
        goto out;
    }
    if (reason == NULL)
        reason = "";

    /* Body: {"amount": N, "reason": "..."}; no amount asks for the whole balance. */
    req = json_object();
    if (req == NULL) {
        local_failure(out, "building the request");
        goto out;
    }
    if (amount_minor > 0 && json_object_set_new(req, "amount", json_integer(amount_minor)) != 0) {
        local_failure(out, "building the request");
        goto out;
    }
    json_t *jreason = json_stringn(reason, strlen(reason));
    if (jreason == NULL) {
        out->outcome = GATEWAY_REJECTED;
        set_error(out, "not sent: the refund reason is not valid UTF-8");
        goto out;
    }
    if (json_object_set_new(req, "reason", jreason) != 0) {
        local_failure(out, "building the request");
        goto out;
    }
    body = json_dumps(req, JSON_COMPACT);
    if (body == NULL) {
        local_failure(out, "building the request");
        goto out;
    }

    h = handle_acquire(g, true);
    if (h == NULL) {
        local_failure(out, "creating a curl handle");
        goto out;
    }
    if (!add_header(&headers, "X-USER-ID", user_id) ||
        !add_header(&headers, "Idempotency-Key", idempotency_key) ||
        !add_header(&headers, "Content-Type", "application/json") ||
        !add_header(&headers, "Accept", "application/json") ||
        /* An empty value removes curl's "Expect: 100-continue" round trip. */
        !add_header(&headers, "Expect", "")) {
        local_failure(out, "building headers");
        goto out;
    }
    url = build_url(g, h, "/api/v1/payments/", transaction_key, "/cancel");
    if (url == NULL) {
        local_failure(out, "building the URL");
        goto out;
    }
    exchange_run(g, h, url, headers, body, strlen(body), &ex);
    if (exchange_judge(g, &ex, out)) {
        const char *b = ex.body.data != NULL ? ex.body.data : "";
        int rc = parse_transaction(b, ex.body.len, PARSE_CANCEL, &out->tx, why, sizeof why);
        parse_judge(rc, why, out);
    }
out:
    if (h != NULL)
        handle_release(g, h);
    exchange_free(&ex);
    curl_slist_free_all(headers);
    free(url);
    free(body);
    json_decref(req);
    out->latency_us = now_us() - t0;
}

void gateway_list_payments_work(struct gateway *g, int64_t from_ms, int64_t to_ms, int64_t page,
                                unsigned size, struct gateway_page *out, struct gateway_result *res)
{
    uint64_t t0 = now_us();
    struct curl_slist *headers = NULL;
    char *url = NULL;
    CURL *h = NULL;
    struct exchange ex;
    char why[GATEWAY_ERROR_MAX];

    memset(&ex, 0, sizeof ex);
    memset(out, 0, sizeof *out);
    result_init(res);
    if (from_ms < 0 || to_ms < from_ms || page < 0 || size < 1 || size > GATEWAY_PAGE_SIZE_MAX) {
        res->outcome = GATEWAY_REJECTED;
        set_error(res, "not sent: bad list arguments (from %lld, to %lld, page %lld, size %u)",
                  (long long)from_ms, (long long)to_ms, (long long)page, size);
        goto out;
    }
    h = handle_acquire(g, true);
    if (h == NULL) {
        local_failure(res, "creating a curl handle");
        goto out;
    }
    /* No X-USER-ID: the merchant's list covers every user's payments. */
    if (!add_header(&headers, "Accept", "application/json")) {
        local_failure(res, "building headers");
        goto out;
    }
    size_t n = strlen(g->base_url) + 160;
    url = malloc(n);
    if (url == NULL) {
        local_failure(res, "building the URL");
        goto out;
    }
    snprintf(url, n, "%s/api/v1/payments?from=%lld&to=%lld&page=%lld&size=%u", g->base_url,
             (long long)from_ms, (long long)to_ms, (long long)page, size);
    exchange_run(g, h, url, headers, NULL, 0, &ex);
    if (exchange_judge(g, &ex, res)) {
        const char *b = ex.body.data != NULL ? ex.body.data : "";
        int rc = gateway_parse_payment_page(b, ex.body.len, out, why, sizeof why);
        if (rc == SETTLE_ENOMEM) {
            local_failure(res, "reading the payment list");
        } else {
            parse_judge(rc, why, res);
            if (rc == 0 && out->page != page) {
                res->outcome = GATEWAY_BAD_RESPONSE;
                set_error(res, "PG answered page %lld when asked for page %lld",
                          (long long)out->page, (long long)page);
            }
        }
        if (res->outcome != GATEWAY_OK)
            gateway_page_free(out);
    }
out:
    if (h != NULL)
        handle_release(g, h);
    exchange_free(&ex);
    curl_slist_free_all(headers);
    free(url);
    res->latency_us = now_us() - t0;
}
