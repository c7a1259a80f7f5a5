/*
 * test_job.c - unit tests of job decoding and the DLQ envelope (job.c): accepted jobs of
 * both kinds, every rejection path with its message, the size bound checked before parsing,
 * deep nesting, invalid UTF-8, NUL bytes, duplicate keys, and the envelope's fields.
 * Thread: main only.
 */
#include "settle/error.h"
#include "settle/job.h"

#include "unit.h"

#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#define MAX 65536

static int decode(enum job_kind kind, const char *text, struct job *job, char *why)
{
    return job_decode(kind, text, strlen(text), MAX, job, why, JOB_WHY_MAX);
}

static void test_kinds(void)
{
    enum job_kind k = JOB_KIND_REFUND;

    CHECK_STR(job_kind_name(JOB_KIND_RECONCILE), "reconcile");
    CHECK_STR(job_kind_name(JOB_KIND_REFUND), "refund");
    CHECK(job_kind_name((enum job_kind)7) == NULL);
    CHECK_EQ_INT(job_kind_parse("reconcile", &k), 0);
    CHECK_EQ_INT(k, JOB_KIND_RECONCILE);
    CHECK_EQ_INT(job_kind_parse("refund", &k), 0);
    CHECK_EQ_INT(k, JOB_KIND_REFUND);
    CHECK_EQ_INT(job_kind_parse("Refund", &k), SETTLE_EINVAL);
    CHECK_EQ_INT(job_kind_parse("", &k), SETTLE_EINVAL);
    CHECK_EQ_INT(job_kind_parse(NULL, &k), SETTLE_EINVAL);
}

static void test_accepts(void)
{
    struct job job;
    char why[JOB_WHY_MAX];

    CHECK_EQ_INT(decode(JOB_KIND_RECONCILE, "{\"order_id\":\"o1\",\"user_id\":\"u1\"}", &job, why),
                 0);
    CHECK_EQ_INT(job.kind, JOB_KIND_RECONCILE);
    CHECK_STR(job.order_id, "o1");
    CHECK_STR(job.user_id, "u1");
    CHECK_STR(job.transaction_key, "");
    CHECK_STR(job.id, "");
    CHECK(!job.has_amount);

    /* Optional fields, unknown fields (kept in the stored text, ignored here), nulls for
     * optional fields, whitespace. */
    int rc = decode(JOB_KIND_RECONCILE,
                    " {\"order_id\":\"o-2\", \"user_id\":\"u-2\", \"transaction_key\":\"tk_1\","
                    " \"id\":\"j-9\", \"extra\":{\"x\":[1,2,{\"y\":null}]}, \"amount\":\"n/a\"}\n",
                    &job, why);
    CHECK_EQ_INT(rc, 0);
    CHECK_STR(job.transaction_key, "tk_1");
    CHECK_STR(job.id, "j-9");
    CHECK(!job.has_amount); /* "amount" is not a reconcile field */

    CHECK_EQ_INT(decode(JOB_KIND_RECONCILE,
                        "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":null}", &job,
                        why),
                 0);
    CHECK_STR(job.transaction_key, "");

    rc = decode(JOB_KIND_REFUND,
                "{\"order_id\":\"o3\",\"user_id\":\"u3\",\"transaction_key\":\"tk3\","
                "\"amount\":1500,\"reason\":\"damaged \xec\xa3\xbc\xeb\xac\xb8\","
                "\"restock\":true,\"id\":\"r-1\"}",
                &job, why);
    CHECK_EQ_INT(rc, 0);
    CHECK_EQ_INT(job.kind, JOB_KIND_REFUND);
    CHECK(job.has_amount);
    CHECK_EQ_INT(job.amount_minor, 1500);
    CHECK_STR(job.reason, "damaged \xec\xa3\xbc\xeb\xac\xb8");
    CHECK(job.restock);
    CHECK_STR(job.id, "r-1");

    rc = decode(JOB_KIND_REFUND,
                "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"reason\":\"\","
                "\"restock\":false}",
                &job, why);
    CHECK_EQ_INT(rc, 0);
    CHECK(!job.has_amount);
    CHECK(!job.restock);
    CHECK_STR(job.reason, "");

    /* Edges: 128-byte ids, 256-byte reason, amount 10^15. */
    char text[2048];
    char id[JOB_ID_MAX + 1];
    char reason[JOB_REASON_MAX + 1];
    memset(id, 'i', JOB_ID_MAX);
    id[JOB_ID_MAX] = '\0';
    memset(reason, 'r', JOB_REASON_MAX);
    reason[JOB_REASON_MAX] = '\0';
    snprintf(text, sizeof(text),
             "{\"order_id\":\"%s\",\"user_id\":\"%s\",\"transaction_key\":\"%s\",\"id\":\"%s\","
             "\"reason\":\"%s\",\"amount\":1000000000000000}",
             id, id, id, id, reason);
    CHECK_EQ_INT(decode(JOB_KIND_REFUND, text, &job, why), 0);
    CHECK_EQ_INT(strlen(job.order_id), JOB_ID_MAX);
    CHECK_EQ_INT(strlen(job.reason), JOB_REASON_MAX);
    CHECK_EQ_INT(job.amount_minor, 1000000000000000LL);

    /* Escaped characters decode to their bytes. */
    CHECK_EQ_INT(decode(JOB_KIND_RECONCILE,
                        "{\"order_id\":\"a\\u00e9\\\"b\",\"user_id\":\"\\ud83d\\ude00\"}", &job,
                        why),
                 0);
    CHECK_STR(job.order_id, "a\xc3\xa9\"b");
    CHECK_STR(job.user_id, "\xf0\x9f\x98\x80");
}

struct reject_case {
    enum job_kind kind;
    const char *text;
    const char *why; /* the message must contain this */
};

static void test_rejects(void)
{
    static const struct reject_case cases[] = {
        /* Not JSON. */
        {JOB_KIND_RECONCILE, "", "not JSON: "},
        {JOB_KIND_RECONCILE, "{", "(line 1, column 1)"},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\",\"user_id\":\"u\"} trailing", "not JSON: "},
        {JOB_KIND_RECONCILE, "{'order_id':'o'}", "not JSON: "},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\",\"order_id\":\"p\",\"user_id\":\"u\"}",
         "duplicate"},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\\u0000x\",\"user_id\":\"u\"}", "not JSON: "},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\",\"user_id\":\"u\",\"n\":1e999}", "not JSON: "},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\","
         "\"amount\":99999999999999999999}",
         "not JSON: "},
        /* Not an object. */
        {JOB_KIND_RECONCILE, "[{\"order_id\":\"o\",\"user_id\":\"u\"}]",
         "expected a JSON object, got array"},
        {JOB_KIND_RECONCILE, "\"o\"", "expected a JSON object, got string"},
        {JOB_KIND_RECONCILE, "42", "expected a JSON object, got number"},
        {JOB_KIND_RECONCILE, "4.5", "expected a JSON object, got number"},
        {JOB_KIND_RECONCILE, "true", "expected a JSON object, got boolean"},
        {JOB_KIND_RECONCILE, "null", "expected a JSON object, got null"},
        /* Missing fields. */
        {JOB_KIND_RECONCILE, "{}", "missing required field \"order_id\""},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\"}", "missing required field \"user_id\""},
        {JOB_KIND_REFUND, "{\"order_id\":\"o\",\"user_id\":\"u\"}",
         "missing required field \"transaction_key\""},
        /* Types come before contents: the missing user_id is reported, not the empty
         * order_id. */
        {JOB_KIND_RECONCILE, "{\"order_id\":\"\"}", "missing required field \"user_id\""},
        /* Wrong types. */
        {JOB_KIND_RECONCILE, "{\"order_id\":42,\"user_id\":\"u\"}",
         "field \"order_id\" must be a string, got number"},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\",\"user_id\":true}",
         "field \"user_id\" must be a string, got boolean"},
        {JOB_KIND_RECONCILE, "{\"order_id\":null,\"user_id\":\"u\"}",
         "field \"order_id\" must be a string, got null"},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\",\"user_id\":\"u\",\"id\":{}}",
         "field \"id\" must be a string, got object"},
        {JOB_KIND_REFUND, "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":[]}",
         "field \"transaction_key\" must be a string, got array"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"restock\":\"yes\"}",
         "field \"restock\" must be a boolean, got string"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"restock\":1}",
         "field \"restock\" must be a boolean, got number"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"reason\":5}",
         "field \"reason\" must be a string, got number"},
        /* Amounts. */
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"amount\":\"100\"}",
         "field \"amount\" must be an integer, got string"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"amount\":10.5}",
         "field \"amount\" must be an integer number of minor units, got a real number"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"amount\":100.0}",
         "got a real number"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"amount\":1e3}",
         "got a real number"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"amount\":0}",
         "field \"amount\" must be positive, got 0"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"amount\":-5}",
         "field \"amount\" must be positive, got -5"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\","
         "\"amount\":1000000000000001}",
         "amount too large"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\","
         "\"amount\":9223372036854775807}",
         "amount too large"},
        /* String contents. */
        {JOB_KIND_RECONCILE, "{\"order_id\":\"\",\"user_id\":\"u\"}",
         "field \"order_id\" is empty"},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\",\"user_id\":\"u\",\"id\":\"\"}",
         "field \"id\" is empty"},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"a\\nb\",\"user_id\":\"u\"}",
         "field \"order_id\" contains control character 0x0a at byte 1"},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\",\"user_id\":\"\\u007f\"}",
         "field \"user_id\" contains control character 0x7f at byte 0"},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"o\",\"user_id\":\"u\\t\"}",
         "field \"user_id\" contains control character 0x09"},
        {JOB_KIND_REFUND,
         "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"reason\":"
         "\"a\\u001bb\"}",
         "field \"reason\" contains control character 0x1b"},
        /* Invalid UTF-8 and raw control bytes inside strings never reach the checks. */
        {JOB_KIND_RECONCILE, "{\"order_id\":\"\xff\",\"user_id\":\"u\"}", "not JSON: "},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"\xc0\xaf\",\"user_id\":\"u\"}", "not JSON: "},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"\xed\xa0\x80\",\"user_id\":\"u\"}", "not JSON: "},
        {JOB_KIND_RECONCILE, "{\"order_id\":\"a\nb\",\"user_id\":\"u\"}", "not JSON: "},
    };
    char why[JOB_WHY_MAX];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct job job;
        memset(&job, 0xab, sizeof(job));
        int rc = decode(cases[i].kind, cases[i].text, &job, why);
        if (rc != SETTLE_EINVAL || strstr(why, cases[i].why) == NULL)
            printf("    case %zu: %s\n", i, cases[i].text);
        CHECK_EQ_INT(rc, SETTLE_EINVAL);
        CHECK_CONTAINS(why, cases[i].why);
        /* out is untouched on error */
        CHECK_EQ_INT((unsigned char)job.order_id[0], 0xab);
    }
}

static void test_lengths(void)
{
    char text[1024];
    char why[JOB_WHY_MAX];
    struct job job;
    char long_id[JOB_ID_MAX + 2];
    char long_reason[JOB_REASON_MAX + 2];

    memset(long_id, 'x', JOB_ID_MAX + 1);
    long_id[JOB_ID_MAX + 1] = '\0';
    snprintf(text, sizeof(text), "{\"order_id\":\"o\",\"user_id\":\"%s\"}", long_id);
    CHECK_EQ_INT(decode(JOB_KIND_RECONCILE, text, &job, why), SETTLE_EINVAL);
    CHECK_STR(why, "field \"user_id\" is 129 bytes, over the 128-byte limit");

    /* The limit is in bytes, not characters: 43 three-byte characters are 129 bytes. */
    char wide[200];
    for (int i = 0; i < 43; i++)
        memcpy(wide + 3 * i, "\xe4\xb8\xad", 3);
    wide[3 * 43] = '\0';
    snprintf(text, sizeof(text), "{\"order_id\":\"%s\",\"user_id\":\"u\"}", wide);
    CHECK_EQ_INT(decode(JOB_KIND_RECONCILE, text, &job, why), SETTLE_EINVAL);
    CHECK_CONTAINS(why, "is 129 bytes");

    memset(long_reason, 'r', JOB_REASON_MAX + 1);
    long_reason[JOB_REASON_MAX + 1] = '\0';
    snprintf(text, sizeof(text),
             "{\"order_id\":\"o\",\"user_id\":\"u\",\"transaction_key\":\"t\",\"reason\":\"%s\"}",
             long_reason);
    CHECK_EQ_INT(decode(JOB_KIND_REFUND, text, &job, why), SETTLE_EINVAL);
    CHECK_STR(why, "field \"reason\" is 257 bytes, over the 256-byte limit");
}

static void test_size_limit(void)
{
    char why[JOB_WHY_MAX];
    struct job job;
    char *buf = malloc(70000);

    /* 70000 bytes of garbage: the size message proves nothing was parsed. */
    memset(buf, '{', 70000);
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, buf, 70000, MAX, &job, why, sizeof(why)),
                 SETTLE_EINVAL);
    CHECK_STR(why, "job is 70000 bytes, over the 65536-byte limit (SETTLE_JOB_MAX_BYTES)");
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, buf, MAX + 1, MAX, &job, why, sizeof(why)),
                 SETTLE_EINVAL);
    CHECK_CONTAINS(why, "65537 bytes, over the 65536-byte limit");

    /* A valid job of exactly max_bytes (padded with an unknown field) is accepted. */
    static const char head[] = "{\"order_id\":\"o\",\"user_id\":\"u\",\"pad\":\"";
    size_t len = MAX;
    memcpy(buf, head, sizeof(head) - 1);
    memset(buf + sizeof(head) - 1, 'p', len - (sizeof(head) - 1) - 2);
    memcpy(buf + len - 2, "\"}", 2);
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, buf, len, MAX, &job, why, sizeof(why)), 0);
    CHECK_STR(job.order_id, "o");
    free(buf);

    /* A NULL buffer of length 0 is "not JSON", not a crash. */
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, NULL, 0, MAX, &job, why, sizeof(why)),
                 SETTLE_EINVAL);
    CHECK_CONTAINS(why, "not JSON");
}

static void test_nesting(void)
{
    char why[JOB_WHY_MAX];
    struct job job;
    size_t depth = 100000;
    char *buf = malloc(2 * depth + 64);

    /* 100000 nested arrays inside the size bound: refused by the parser's depth limit, with
     * no stack overflow. */
    memset(buf, '[', depth);
    memset(buf + depth, ']', depth);
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, buf, 2 * depth, 4 * depth, &job, why, sizeof(why)),
                 SETTLE_EINVAL);
    CHECK_CONTAINS(why, "not JSON");

    /* The same inside an unknown field of a valid job. */
    static const char head[] = "{\"order_id\":\"o\",\"user_id\":\"u\",\"deep\":";
    size_t d = 5000;
    size_t n = 0;
    memcpy(buf, head, sizeof(head) - 1);
    n = sizeof(head) - 1;
    memset(buf + n, '[', d);
    n += d;
    memset(buf + n, ']', d);
    n += d;
    buf[n++] = '}';
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, buf, n, MAX, &job, why, sizeof(why)),
                 SETTLE_EINVAL);
    CHECK_CONTAINS(why, "not JSON");

    /* Moderate nesting in an unknown field is fine. */
    d = 100;
    n = sizeof(head) - 1;
    memset(buf + n, '[', d);
    n += d;
    memset(buf + n, ']', d);
    n += d;
    buf[n++] = '}';
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, buf, n, MAX, &job, why, sizeof(why)), 0);
    free(buf);
}

static void test_nul_bytes(void)
{
    char why[JOB_WHY_MAX];
    struct job job;
    /* A raw NUL inside a string, and one after a complete object: both refused, because the
     * length, not the NUL, ends the input. */
    static const char in_string[] = "{\"order_id\":\"o\0x\",\"user_id\":\"u\"}";
    static const char after[] = "{\"order_id\":\"o\",\"user_id\":\"u\"}\0garbage";

    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, in_string, sizeof(in_string) - 1, MAX, &job, why,
                            sizeof(why)),
                 SETTLE_EINVAL);
    CHECK_CONTAINS(why, "not JSON");
    CHECK_EQ_INT(
        job_decode(JOB_KIND_RECONCILE, after, sizeof(after) - 1, MAX, &job, why, sizeof(why)),
        SETTLE_EINVAL);
    CHECK_CONTAINS(why, "not JSON");
    /* The escaped form too (JSON_ALLOW_NUL is not used). */
    CHECK_EQ_INT(
        decode(JOB_KIND_RECONCILE, "{\"order_id\":\"\\u0000\",\"user_id\":\"u\"}", &job, why),
        SETTLE_EINVAL);
    CHECK_CONTAINS(why, "not JSON");
}

static void test_why_buffer(void)
{
    struct job job;
    char small[10];

    memset(small, 'x', sizeof(small));
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, "[]", 2, MAX, &job, small, sizeof(small)),
                 SETTLE_EINVAL);
    CHECK_EQ_INT(strlen(small), sizeof(small) - 1);
    CHECK_EQ_INT(job_decode(JOB_KIND_RECONCILE, "[]", 2, MAX, &job, NULL, 0), SETTLE_EINVAL);
    CHECK_EQ_INT(job_decode((enum job_kind)9, "{}", 2, MAX, &job, small, sizeof(small)),
                 SETTLE_EINVAL);
}

static json_t *envelope(const struct job_dead_info *info, const char *raw, size_t len)
{
    char *text = NULL;
    int rc = job_dead_envelope(info, raw, len, &text);
    CHECK_EQ_INT(rc, 0);
    if (rc != 0)
        return NULL;
    json_t *j = json_loads(text, 0, NULL);
    CHECK(j != NULL);
    free(text);
    return j;
}

static void test_dead_envelope(void)
{
    struct job_dead_info info = {
        .job_id = "01HXJOB",
        .queue = "reconcile",
        .reason = "invalid_job",
        .error = "missing required field \"user_id\"",
        .attempts = 2,
        .deliveries = 3,
        .enqueued_ms = 1700000000000ULL,
        .dead_ms = 1700000005000ULL,
        .worker_id = "host:42",
    };
    static const char raw[] = "{\"order_id\":\"o1\",\"extra\":[1,2]}";

    json_t *j = envelope(&info, raw, sizeof(raw) - 1);
    if (j != NULL) {
        CHECK_STR(json_string_value(json_object_get(j, "id")), "01HXJOB");
        CHECK_STR(json_string_value(json_object_get(j, "queue")), "reconcile");
        CHECK_STR(json_string_value(json_object_get(j, "reason")), "invalid_job");
        CHECK_STR(json_string_value(json_object_get(j, "error")),
                  "missing required field \"user_id\"");
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "attempts")), 2);
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "deliveries")), 3);
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "enqueued_at_ms")), 1700000000000LL);
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "dead_at_ms")), 1700000005000LL);
        CHECK_STR(json_string_value(json_object_get(j, "worker")), "host:42");
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "job_bytes")), sizeof(raw) - 1);
        json_t *job = json_object_get(j, "job");
        CHECK(json_is_object(job));
        CHECK_STR(json_string_value(json_object_get(job, "order_id")), "o1");
        CHECK_EQ_INT(json_array_size(json_object_get(job, "extra")), 2);
        CHECK_EQ_INT(json_object_size(j), 11);
    }
    json_decref(j);

    /* Not JSON: "job" is null, the length is still reported. */
    j = envelope(&info, "not json {", 10);
    if (j != NULL) {
        CHECK(json_is_null(json_object_get(j, "job")));
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "job_bytes")), 10);
    }
    json_decref(j);

    /* Any JSON value, not only objects. */
    j = envelope(&info, "[1,\"a\"]", 7);
    if (j != NULL)
        CHECK_EQ_INT(json_array_size(json_object_get(j, "job")), 2);
    json_decref(j);
    j = envelope(&info, "42", 2);
    if (j != NULL)
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "job")), 42);
    json_decref(j);

    /* Invalid UTF-8 in the job: null; the NUL-containing job likewise. */
    j = envelope(&info, "\"\xff\"", 3);
    if (j != NULL)
        CHECK(json_is_null(json_object_get(j, "job")));
    json_decref(j);
    j = envelope(&info, "{}\0{}", 5);
    if (j != NULL) {
        CHECK(json_is_null(json_object_get(j, "job")));
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "job_bytes")), 5);
    }
    json_decref(j);

    /* No raw job, no error text; invalid UTF-8 in an error string becomes U+FFFD instead of
     * losing the envelope. */
    info.error = NULL;
    j = envelope(&info, NULL, 0);
    if (j != NULL) {
        CHECK(json_is_null(json_object_get(j, "job")));
        CHECK(json_is_null(json_object_get(j, "error")));
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "job_bytes")), 0);
    }
    json_decref(j);
    info.error = "peer said \xff\xfe ok";
    j = envelope(&info, "{}", 2);
    if (j != NULL)
        CHECK_STR(json_string_value(json_object_get(j, "error")),
                  "peer said \xef\xbf\xbd\xef\xbf\xbd ok");
    json_decref(j);
}

int main(void)
{
    RUN(test_kinds);
    RUN(test_accepts);
    RUN(test_rejects);
    RUN(test_lengths);
    RUN(test_size_limit);
    RUN(test_nesting);
    RUN(test_nul_bytes);
    RUN(test_why_buffer);
    RUN(test_dead_envelope);
    return unit_finish();
}
