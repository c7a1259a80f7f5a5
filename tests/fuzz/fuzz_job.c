/*
 * fuzz_job.c - libFuzzer target for the job decoder and the dead-letter envelope
 * (src/job.c): the input bytes are a job exactly as a producer could LPUSH it.
 *
 * For both job kinds it checks, besides the sanitizers' memory and UB checks:
 *   - a decoded job has its required fields non-empty, every string NUL-terminated inside its
 *     array and free of control characters (NUL included), and a refund amount in 1..10^15;
 *   - a rejection always carries a one-sentence explanation, and a job over the size bound is
 *     rejected before parsing with the "bytes, over the" sentence;
 *   - job_dead_envelope() on the same bytes yields one valid JSON object whose "job" is the
 *     input as JSON when the input is JSON (else null) and whose "job_bytes" is the input's
 *     length, even when the error text and ids hold arbitrary (invalid UTF-8) bytes.
 * Thread: libFuzzer's; no global state.
 */
#include "settle/job.h"
#include "settle/error.h"

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_job: invariant violated at %s:%d: %s\n", __FILE__, __LINE__,     \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* A string field of struct job: NUL inside the array, no control bytes, length in range. */
static void check_str(const char *s, size_t cap, size_t min_len)
{
    size_t n = strnlen(s, cap);
    CHECK(n < cap);
    CHECK(n >= min_len);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        CHECK(c >= 0x20 && c != 0x7f);
    }
}

static void check_decoded(enum job_kind kind, const struct job *job)
{
    CHECK(job->kind == kind);
    check_str(job->order_id, sizeof job->order_id, 1);
    check_str(job->user_id, sizeof job->user_id, 1);
    check_str(job->transaction_key, sizeof job->transaction_key, kind == JOB_KIND_REFUND ? 1 : 0);
    check_str(job->id, sizeof job->id, 0);
    check_str(job->reason, sizeof job->reason, 0);
    if (kind == JOB_KIND_RECONCILE) {
        CHECK(!job->has_amount);
        CHECK(job->reason[0] == '\0');
        CHECK(!job->restock);
    }
    if (job->has_amount)
        CHECK(job->amount_minor > 0 && job->amount_minor <= INT64_C(1000000000000000));
}

static void check_why(const char *why, size_t cap)
{
    size_t n = strnlen(why, cap);
    CHECK(n < cap);
    CHECK(n > 0);
}

static void decode_one(enum job_kind kind, const char *buf, size_t len)
{
    struct job job;
    char why[JOB_WHY_MAX];

    memset(&job, 0xA5, sizeof job); /* garbage: a decoder must not rely on a clean struct */
    int rc = job_decode(kind, buf, len, 65536, &job, why, sizeof why);
    if (rc == 0) {
        check_decoded(kind, &job);
        /* JSON has no place for a raw NUL byte (not even inside a string), so a job that
         * decoded cannot have held one. */
        CHECK(memchr(buf, '\0', len) == NULL);
    } else {
        CHECK(rc == SETTLE_EINVAL);
        check_why(why, sizeof why);
    }

    /* The size bound comes before any parsing. */
    if (len > 0) {
        rc = job_decode(kind, buf, len, len - 1, &job, why, sizeof why);
        CHECK(rc == SETTLE_EINVAL);
        CHECK(strstr(why, "bytes, over the") != NULL);
    }
    /* A tiny explanation buffer truncates, never overflows. */
    char small[8];
    rc = job_decode(kind, buf, len, 65536, &job, small, sizeof small);
    if (rc != 0)
        CHECK(strnlen(small, sizeof small) < sizeof small);
}

static void envelope_one(const char *buf, size_t len, const char *why)
{
    /* Arbitrary bytes (up to the first NUL) as the error text and worker id exercise the lossy
     * UTF-8 path; the envelope must still be valid JSON. */
    char *text = malloc(len + 1);
    CHECK(text != NULL);
    memcpy(text, buf, len);
    text[len] = '\0';

    struct job_dead_info info = {
        .job_id = "1795229509.271-1",
        .queue = "reconcile",
        .reason = "invalid_job",
        .error = why[0] != '\0' ? why : text,
        .attempts = 1,
        .deliveries = 1,
        .enqueued_ms = UINT64_C(1795229509271),
        .dead_ms = UINT64_MAX, /* clamped, not wrapped */
        .worker_id = text,
    };
    char *env = NULL;
    int rc = job_dead_envelope(&info, buf, len, &env);
    CHECK(rc == 0 && env != NULL);

    json_error_t err;
    json_t *root = json_loads(env, 0, &err);
    if (root == NULL)
        fprintf(stderr, "fuzz_job: envelope is not JSON: %s\n%s\n", err.text, env);
    CHECK(root != NULL);
    CHECK(json_is_object(root));
    CHECK(json_is_string(json_object_get(root, "reason")));
    CHECK(json_is_string(json_object_get(root, "error")));
    CHECK(json_is_string(json_object_get(root, "worker")));
    CHECK(json_integer_value(json_object_get(root, "job_bytes")) == (json_int_t)len);
    CHECK(json_integer_value(json_object_get(root, "dead_at_ms")) == INT64_MAX);

    json_t *expect = json_loadb(buf, len, JSON_DECODE_ANY, NULL);
    json_t *got = json_object_get(root, "job");
    CHECK(got != NULL);
    if (expect != NULL)
        CHECK(json_equal(expect, got));
    else
        CHECK(json_is_null(got));
    json_decref(expect);
    json_decref(root);
    free(env);

    /* NULL optional texts and NULL raw bytes are allowed. */
    struct job_dead_info bare = {.reason = "invalid_job"};
    rc = job_dead_envelope(&bare, NULL, 0, &env);
    CHECK(rc == 0 && env != NULL);
    free(env);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    char why[JOB_WHY_MAX];
    struct job job;

    decode_one(JOB_KIND_RECONCILE, buf, size);
    decode_one(JOB_KIND_REFUND, buf, size);

    int rc = job_decode(JOB_KIND_REFUND, buf, size, 65536, &job, why, sizeof why);
    if (rc == 0)
        why[0] = '\0';
    envelope_one(buf, size, why);
    return 0;
}
