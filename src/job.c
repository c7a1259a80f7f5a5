/*
 * job.c - decoding and validation of the jobs producers push, and the dead-letter envelope.
 *
 * A job is untrusted input: its size is checked before jansson sees a byte, duplicate keys
 * are refused (two parsers could otherwise disagree about which order_id a job names), and
 * every rejection is explained in one sentence that ends up in the DLQ entry.
 * Thread: any; pure (no I/O, no global state; jansson allocates only inside a call).
 * Owns: nothing beyond a call; job_dead_envelope() hands its malloc'd text to the caller.
 */
#include "settle/job.h"
#include "settle/error.h"
#include "settle/log.h"
#include "settle/text.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JOB_DEAD_ERROR_MAX 1024

#include <jansson.h>

/* 10^15 minor units is ten trillion in a two-decimal currency: no real refund is larger, and
 * the bound keeps every sum of amounts far from int64 overflow. */
#define JOB_AMOUNT_MAX INT64_C(1000000000000000)

enum field_type {
    FIELD_ID,     /* string of 1..JOB_ID_MAX bytes */
    FIELD_REASON, /* string of 0..JOB_REASON_MAX bytes */
    FIELD_AMOUNT, /* integer in 1..JOB_AMOUNT_MAX */
    FIELD_BOOL,
};

struct field_spec {
    const char *name;
    enum field_type type;
    bool required;
    size_t offset; /* of the char[] / int64_t / bool in struct job */
};

#define JOB_OFF(f) offsetof(struct job, f)

/* Listed in the order their problems are reported. */
static const struct field_spec reconcile_fields[] = {
    {"order_id", FIELD_ID, true, JOB_OFF(order_id)},
    {"user_id", FIELD_ID, true, JOB_OFF(user_id)},
    {"transaction_key", FIELD_ID, false, JOB_OFF(transaction_key)},
    {"id", FIELD_ID, false, JOB_OFF(id)},
};

static const struct field_spec refund_fields[] = {
    {"order_id", FIELD_ID, true, JOB_OFF(order_id)},
    {"user_id", FIELD_ID, true, JOB_OFF(user_id)},
    {"transaction_key", FIELD_ID, true, JOB_OFF(transaction_key)},
    {"id", FIELD_ID, false, JOB_OFF(id)},
    {"amount", FIELD_AMOUNT, false, JOB_OFF(amount_minor)},
    {"reason", FIELD_REASON, false, JOB_OFF(reason)},
    {"restock", FIELD_BOOL, false, JOB_OFF(restock)},
};

#define N_FIELDS(a) (sizeof(a) / sizeof((a)[0]))

const char *job_kind_name(enum job_kind kind)
{
    switch (kind) {
    case JOB_KIND_RECONCILE:
        return "reconcile";
    case JOB_KIND_REFUND:
        return "refund";
    }
    return NULL;
}

int job_kind_parse(const char *name, enum job_kind *out)
{
    if (name == NULL)
        return SETTLE_EINVAL;
    if (strcmp(name, "reconcile") == 0) {
        *out = JOB_KIND_RECONCILE;
        return 0;
    }
    if (strcmp(name, "refund") == 0) {
        *out = JOB_KIND_REFUND;
        return 0;
    }
    return SETTLE_EINVAL;
}

static int explain(char *why, size_t why_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int explain(char *why, size_t why_len, const char *fmt, ...)
{
    va_list ap;

    if (why != NULL && why_len > 0) {
        va_start(ap, fmt);
        vsnprintf(why, why_len, fmt, ap);
        va_end(ap);
    }
    return SETTLE_EINVAL;
}

static const char *type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "boolean";
    case JSON_NULL:
        return "null";
    }
    return "unknown";
}

/* Pass 1: presence and types. A null optional field counts as absent, since many producers
 * serialise a missing value as null; a null required field is a type error. */
static int check_types(const json_t *root, const struct field_spec *fields, size_t n, char *why,
                       size_t why_len)
{
    for (size_t i = 0; i < n; i++) {
        const struct field_spec *f = &fields[i];
        const json_t *v = json_object_get(root, f->name);

        if (v == NULL || (json_is_null(v) && !f->required)) {
            if (f->required)
                return explain(why, why_len, "missing required field \"%s\"", f->name);
            continue;
        }
        switch (f->type) {
        case FIELD_ID:
        case FIELD_REASON:
            if (!json_is_string(v))
                return explain(why, why_len, "field \"%s\" must be a string, got %s", f->name,
                               type_name(v));
            break;
        case FIELD_AMOUNT:
            /* Money is counted in integer minor units; 12.5 or 100.0 means the producer
             * confused units, and guessing would refund the wrong amount. */
            if (json_is_real(v))
                return explain(why, why_len,
                               "field \"%s\" must be an integer number of minor units, got a "
                               "real number",
                               f->name);
            if (!json_is_integer(v))
                return explain(why, why_len, "field \"%s\" must be an integer, got %s", f->name,
                               type_name(v));
            break;
        case FIELD_BOOL:
            if (!json_is_boolean(v))
                return explain(why, why_len, "field \"%s\" must be a boolean, got %s", f->name,
                               type_name(v));
            break;
        default:
            abort();
        }
    }
    return 0;
}

/* Pass 2: string lengths and contents. Control characters are refused because these values
 * go into Redis keys, SQL rows, HTTP headers and log lines, where a newline or an escape
 * sequence could split or forge something. */
static int check_strings(const json_t *root, const struct field_spec *fields, size_t n, char *why,
                         size_t why_len)
{
    for (size_t i = 0; i < n; i++) {
        const struct field_spec *f = &fields[i];
        const json_t *v = json_object_get(root, f->name);

        if (v == NULL || !json_is_string(v))
            continue;
        const char *s = json_string_value(v);
        size_t len = json_string_length(v);
        size_t min = f->type == FIELD_ID ? 1 : 0;
        size_t max = f->type == FIELD_ID ? JOB_ID_MAX : JOB_REASON_MAX;
        if (len < min)
            return explain(why, why_len, "field \"%s\" is empty", f->name);
        if (len > max)
            return explain(why, why_len, "field \"%s\" is %zu bytes, over the %zu-byte limit",
                           f->name, len, max);
        for (size_t k = 0; k < len; k++) {
            unsigned char ch = (unsigned char)s[k];
            if (ch < 0x20 || ch == 0x7f)
                return explain(why, why_len,
                               "field \"%s\" contains control character 0x%02x at byte %zu",
                               f->name, ch, k);
        }
    }
    return 0;
}

/* Pass 3: numbers. */
static int check_numbers(const json_t *root, const struct field_spec *fields, size_t n, char *why,
                         size_t why_len)
{
    for (size_t i = 0; i < n; i++) {
        const struct field_spec *f = &fields[i];
        const json_t *v = json_object_get(root, f->name);

        if (f->type != FIELD_AMOUNT || v == NULL || !json_is_integer(v))
            continue;
        json_int_t amount = json_integer_value(v);
        if (amount <= 0)
            return explain(why, why_len, "field \"%s\" must be positive, got %lld", f->name,
                           (long long)amount);
        if (amount > JOB_AMOUNT_MAX)
            return explain(why, why_len,
                           "amount too large: field \"%s\" is %lld minor units, over the limit "
                           "of %lld",
                           f->name, (long long)amount, (long long)JOB_AMOUNT_MAX);
    }
    return 0;
}

static void fill(struct job *job, const json_t *root, const struct field_spec *fields, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const struct field_spec *f = &fields[i];
        const json_t *v = json_object_get(root, f->name);
        char *base = (char *)job + f->offset;

        if (v == NULL || json_is_null(v))
            continue;
        switch (f->type) {
        case FIELD_ID:
        case FIELD_REASON: {
            /* Lengths were checked against the array sizes in check_strings(). */
            size_t len = json_string_length(v);
            memcpy(base, json_string_value(v), len);
            base[len] = '\0';
            break;
        }
        case FIELD_AMOUNT:
            job->has_amount = true;
            job->amount_minor = (int64_t)json_integer_value(v);
            break;
        case FIELD_BOOL:
            *(bool *)base = json_is_true(v);
            break;
        default:
            abort();
        }
    }
}

int job_decode(enum job_kind kind, const char *buf, size_t len, size_t max_bytes, struct job *out,
               char *why, size_t why_len)
{
    const struct field_spec *fields;
    size_t n_fields;
    json_error_t error;
    json_t *root = NULL;
    struct job job;
    int rc;

    if (why != NULL && why_len > 0)
        why[0] = '\0';
    switch (kind) {
    case JOB_KIND_RECONCILE:
        fields = reconcile_fields;
        n_fields = N_FIELDS(reconcile_fields);
        break;
    case JOB_KIND_REFUND:
        fields = refund_fields;
        n_fields = N_FIELDS(refund_fields);
        break;
    default:
        return explain(why, why_len, "unknown job kind %d", (int)kind);
    }
    /* The bound comes first so that an oversized job costs a length comparison, not a parse. */
    if (len > max_bytes)
        return explain(why, why_len,
                       "job is %zu bytes, over the %zu-byte limit (SETTLE_JOB_MAX_BYTES)", len,
                       max_bytes);
    /* A raw NUL byte is never valid JSON text, but jansson 2.14 skips one that follows a
     * literal or a number, so refuse it before parsing. */
    const char *nul = buf != NULL ? memchr(buf, '\0', len) : NULL;
    if (nul != NULL)
        return explain(why, why_len, "not JSON: a NUL byte at offset %zu", (size_t)(nul - buf));
    /* JSON_DECODE_ANY lets us name the top-level type we got instead of jansson's generic
     * complaint; \u0000 stays refused because JSON_ALLOW_NUL is not given. */
    root =
        json_loadb(buf != NULL ? buf : "", len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &error);
    if (root == NULL) {
        /* jansson quotes the offending token ("near '4556...'"), which can be a card number:
         * the DLQ keeps the job itself, so the sentence names only the position. */
        char *near = strstr(error.text, " near '");
        if (near != NULL)
            *near = '\0';
        return explain(why, why_len, "not JSON: %s (line %d, column %d)", error.text, error.line,
                       error.column);
    }
    if (!json_is_object(root)) {
        rc = explain(why, why_len, "expected a JSON object, got %s", type_name(root));
        goto out;
    }
    rc = check_types(root, fields, n_fields, why, why_len);
    if (rc != 0)
        goto out;
    rc = check_strings(root, fields, n_fields, why, why_len);
    if (rc != 0)
        goto out;
    rc = check_numbers(root, fields, n_fields, why, why_len);
    if (rc != 0)
        goto out;
    memset(&job, 0, sizeof(job));
    job.kind = kind;
    fill(&job, root, fields, n_fields);
    *out = job;
out:
    json_decref(root);
    return rc;
}

/*
 * A JSON string for s, or null when s is NULL. The error text of a dead job may quote bytes a
 * peer sent; jansson refuses invalid UTF-8, and losing the whole envelope over one bad byte
 * would be worse than showing U+FFFD in its place.
 */
static json_t *lossy_string(const char *s)
{
    if (s == NULL)
        return json_null();
    json_t *j = json_string(s);
    if (j != NULL)
        return j;
    size_t len = strlen(s);
    char *clean = malloc(len * 3 + 1);
    size_t o = 0;
    if (clean == NULL)
        return NULL;
    for (size_t i = 0; i < len;) {
        size_t n = text_utf8_seq_len((const unsigned char *)s + i, len - i);
        if (n == 0) {
            memcpy(clean + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        } else {
            memcpy(clean + o, s + i, n);
            o += n;
            i += n;
        }
    }
    clean[o] = '\0';
    j = json_string(clean);
    free(clean);
    return j;
}

static json_t *ms_integer(uint64_t v)
{
    return json_integer(v > (uint64_t)INT64_MAX ? INT64_MAX : (json_int_t)v);
}

int job_dead_envelope(const struct job_dead_info *info, const char *raw, size_t raw_len,
                      char **out_json)
{
    json_t *root = json_object();
    json_t *job = NULL;
    char *text = NULL;
    int rc = SETTLE_ENOMEM;

    *out_json = NULL;
    if (root == NULL)
        return SETTLE_ENOMEM;
    /* Any JSON value is kept as structured data for whoever reads the DLQ; anything else
     * (not JSON, invalid UTF-8) is null here and survives byte for byte next to the
     * envelope. */
    if (raw != NULL)
        job = json_loadb(raw, raw_len, JSON_DECODE_ANY, NULL);
    if (job == NULL)
        job = json_null();
    /* The error sentence may quote what a peer sent (a PG message, a parse error); the DLQ is
     * read by people, so card numbers in it are masked like in the logs. The job itself is
     * kept as sent: it is the evidence. */
    char error[JOB_DEAD_ERROR_MAX];
    size_t error_len = 0;
    if (info->error != NULL) {
        error_len = strlen(info->error);
        if (error_len >= sizeof(error))
            error_len = sizeof(error) - 1;
        memcpy(error, info->error, error_len);
        log_mask_cards(error, error_len);
    }
    error[error_len] = '\0';
    if (json_object_set_new(root, "id", lossy_string(info->job_id)) != 0 ||
        json_object_set_new(root, "queue", lossy_string(info->queue)) != 0 ||
        json_object_set_new(root, "reason", lossy_string(info->reason)) != 0 ||
        json_object_set_new(root, "error", lossy_string(info->error != NULL ? error : NULL)) != 0 ||
        json_object_set_new(root, "attempts", json_integer((json_int_t)info->attempts)) != 0 ||
        json_object_set_new(root, "deliveries", json_integer((json_int_t)info->deliveries)) != 0 ||
        json_object_set_new(root, "enqueued_at_ms", ms_integer(info->enqueued_ms)) != 0 ||
        json_object_set_new(root, "dead_at_ms", ms_integer(info->dead_ms)) != 0 ||
        json_object_set_new(root, "worker", lossy_string(info->worker_id)) != 0 ||
        json_object_set(root, "job", job) != 0 ||
        json_object_set_new(root, "job_bytes", ms_integer(raw_len)) != 0)
        goto out;
    /* Measured first and copied into our own malloc'd buffer, so the caller frees with free()
     * whatever allocator jansson was given. */
    size_t need = json_dumpb(root, NULL, 0, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (need == 0)
        goto out;
    text = malloc(need + 1);
    if (text == NULL)
        goto out;
    if (json_dumpb(root, text, need, JSON_COMPACT | JSON_PRESERVE_ORDER) != need)
        goto out;
    text[need] = '\0';
    *out_json = text;
    text = NULL;
    rc = 0;
out:
    free(text);
    /* "job" was added with json_object_set (a new reference), so ours is always dropped
     * here, whether or not the chain above got that far. */
    json_decref(job);
    json_decref(root);
    return rc;
}
