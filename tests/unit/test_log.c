/*
 * test_log.c - unit tests of the JSON-lines logger (log.c): level parsing and filtering,
 * card masking rules, lines that parse back as JSON with the documented fields, escaping of
 * hostile text, visible truncation, no card number in any field, no interleaving between
 * threads, errno preserved.
 * Thread: main, plus four writer threads in test_threads. Output goes to tmpfile()s.
 */
#include "settle/error.h"
#include "settle/log.h"

#include "unit.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

static FILE *out;

static void begin(enum log_level level)
{
    if (out != NULL)
        fclose(out);
    out = tmpfile();
    if (out == NULL) {
        perror("tmpfile");
        exit(2);
    }
    log_init(level, out);
}

/* Everything written since begin(), NUL-terminated; the caller frees. */
static char *contents(void)
{
    fflush(out);
    fseek(out, 0, SEEK_END);
    long n = ftell(out);
    rewind(out);
    char *buf = malloc((size_t)n + 1);
    size_t got = fread(buf, 1, (size_t)n, out);
    buf[got] = '\0';
    return buf;
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s != '\0'; s++)
        n += *s == '\n';
    return n;
}

/* The single line written since begin(), parsed; NULL (and a failed check) otherwise. */
static json_t *only_line(char **raw_out)
{
    char *raw = contents();
    json_error_t e;
    json_t *j = NULL;

    CHECK_EQ_INT(count_lines(raw), 1);
    size_t len = strlen(raw);
    CHECK(len > 0 && raw[len - 1] == '\n');
    CHECK(len <= LOG_LINE_MAX);
    j = json_loads(raw, 0, &e);
    if (j == NULL)
        printf("    not JSON (%s): %.300s\n", e.text, raw);
    CHECK(j != NULL);
    if (raw_out != NULL)
        *raw_out = raw;
    else
        free(raw);
    return j;
}

static const char *get_str(const json_t *j, const char *key)
{
    return json_string_value(json_object_get(j, key));
}

static void test_levels(void)
{
    enum log_level l = LOG_LEVEL_ERROR;

    CHECK_EQ_INT(log_level_parse("debug", &l), 0);
    CHECK_EQ_INT(l, LOG_LEVEL_DEBUG);
    CHECK_EQ_INT(log_level_parse("INFO", &l), 0);
    CHECK_EQ_INT(l, LOG_LEVEL_INFO);
    CHECK_EQ_INT(log_level_parse("Warn", &l), 0);
    CHECK_EQ_INT(l, LOG_LEVEL_WARN);
    CHECK_EQ_INT(log_level_parse("error", &l), 0);
    CHECK_EQ_INT(l, LOG_LEVEL_ERROR);
    CHECK_EQ_INT(log_level_parse("verbose", &l), SETTLE_EINVAL);
    CHECK_EQ_INT(log_level_parse("", &l), SETTLE_EINVAL);
    CHECK_EQ_INT(log_level_parse("warning", &l), SETTLE_EINVAL);
    CHECK_EQ_INT(log_level_parse(NULL, &l), SETTLE_EINVAL);
    CHECK_EQ_INT(l, LOG_LEVEL_ERROR);
    CHECK_STR(log_level_name(LOG_LEVEL_DEBUG), "debug");
    CHECK_STR(log_level_name(LOG_LEVEL_WARN), "warn");

    begin(LOG_LEVEL_WARN);
    CHECK(!log_enabled(LOG_LEVEL_DEBUG));
    CHECK(!log_enabled(LOG_LEVEL_INFO));
    CHECK(log_enabled(LOG_LEVEL_WARN));
    CHECK(log_enabled(LOG_LEVEL_ERROR));
    log_debug("hidden %d", 1);
    log_info("hidden %d", 2);
    log_warn("shown %d", 3);
    log_error("shown %d", 4);
    char *raw = contents();
    CHECK_EQ_INT(count_lines(raw), 2);
    CHECK_NOT_CONTAINS(raw, "hidden");
    CHECK_CONTAINS(raw, "\"level\":\"warn\",\"msg\":\"shown 3\"");
    CHECK_CONTAINS(raw, "\"level\":\"error\",\"msg\":\"shown 4\"");
    free(raw);
}

/* Masks a copy of in and compares with want; checks the count of masked digits. */
static void mask_case(const char *in, const char *want, size_t want_masked, int line)
{
    char buf[256];
    size_t n = strlen(in);

    memcpy(buf, in, n + 1);
    size_t masked = log_mask_cards(buf, n);
    int ok = strcmp(buf, want) == 0 && masked == want_masked;
    unit_record(ok, __FILE__, line, "log_mask_cards case");
    if (!ok)
        printf("    in:   \"%s\"\n    got:  \"%s\" (%zu)\n    want: \"%s\" (%zu)\n", in, buf,
               masked, want, want_masked);
}

#define MASK(in, want, n) mask_case(in, want, n, __LINE__)

static void test_mask(void)
{
    MASK("card 4111111111111111 end", "card ************1111 end", 12);
    MASK("4111111111111111", "************1111", 12);
    MASK("4111-1111-1111-1111", "****-****-****-1111", 12);
    MASK("4111 1111 1111 1111", "**** **** **** 1111", 12);
    MASK("4111-1111 1111-1111", "****-**** ****-1111", 12); /* mixed separators */
    MASK("3782 822463 10005", "**** ****** *0005", 11);     /* Amex grouping, 15 digits */
    MASK("4222222222222", "*********2222", 9);              /* 13 digits: shortest PAN */
    MASK("6011000990139424123", "***************4123", 15); /* 19 digits: longest PAN */
    MASK("x4111111111111111y", "x************1111y", 12);   /* glued to letters */
    MASK("4111111111111111-", "************1111-", 12);     /* trailing separator kept */
    MASK("a 4111111111111111 b 5500000000000004 c", "a ************1111 b ************0004 c", 24);
    /* Not cards: fewer than 13 digits, or a single separator-free run of 20+ digits (an id or
     * a hash: no card number is that long). */
    MASK("123456789012", "123456789012", 0);
    MASK("1234-5678-9012", "1234-5678-9012", 0);
    MASK("12345678901234567890", "12345678901234567890", 0);
    MASK("id 123456789012345678901234567890", "id 123456789012345678901234567890", 0);
    MASK("2024-01-15 10:30:00", "2024-01-15 10:30:00", 0);
    MASK("550e8400-e29b-41d4-a716-44665544abcd", "550e8400-e29b-41d4-a716-44665544abcd", 0);
    /* Runs inside other tokens are not exempt (log.h: "every run"): a UUID whose last group
     * happens to be all digits is partly masked. That over-masking is the accepted price of
     * never printing a card glued to other text. */
    MASK("550e8400-e29b-41d4-a716-446655440000", "550e8400-e29b-41d4-a***-********0000", 11);
    MASK("amount 1500.25", "amount 1500.25", 0);
    /* A grouped run over 19 digits may be a card next to another number: the whole run but
     * its last four digits is masked rather than risk showing the card. */
    MASK("4111 1111 1111 1111 2024", "**** **** **** **** 2024", 16);
    MASK("4111111111111111 2024", "**************** 2024", 16);
    MASK("2024 4111111111111111", "**** ************1111", 16);
    /* Only s[0..len) is touched. */
    char buf[] = "4111111111111111";
    CHECK_EQ_INT(log_mask_cards(buf, 10), 0);
    CHECK_STR(buf, "4111111111111111");
    CHECK_EQ_INT(log_mask_cards(buf, 0), 0);
}

static void test_line_fields(void)
{
    struct log_ctx ctx = {"job-1", "reconcile", "order-7", 3};
    char *raw = NULL;

    begin(LOG_LEVEL_DEBUG);
    log_write(LOG_LEVEL_INFO, &ctx, "gateway 503", "checked %d payments", 5);
    json_t *j = only_line(&raw);
    if (j != NULL) {
        const char *ts = get_str(j, "ts");
        CHECK(ts != NULL && strlen(ts) == 24);
        if (ts != NULL && strlen(ts) == 24) {
            /* 2024-05-01T12:34:56.789Z */
            CHECK(ts[4] == '-' && ts[7] == '-' && ts[10] == 'T' && ts[13] == ':' && ts[16] == ':' &&
                  ts[19] == '.' && ts[23] == 'Z');
        }
        CHECK_STR(get_str(j, "level"), "info");
        CHECK_STR(get_str(j, "msg"), "checked 5 payments");
        CHECK_STR(get_str(j, "job_id"), "job-1");
        CHECK_STR(get_str(j, "queue"), "reconcile");
        CHECK_STR(get_str(j, "order_id"), "order-7");
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "attempt")), 3);
        CHECK_STR(get_str(j, "error"), "gateway 503");
        CHECK_EQ_INT(json_object_size(j), 8);
    }
    json_decref(j);
    free(raw);

    /* Absent context: attempt < 0 and NULL pointers leave their keys out. */
    struct log_ctx partial = {NULL, "refund", NULL, -1};
    begin(LOG_LEVEL_DEBUG);
    log_write(LOG_LEVEL_WARN, &partial, NULL, "x");
    j = only_line(NULL);
    if (j != NULL) {
        CHECK_EQ_INT(json_object_size(j), 4);
        CHECK_STR(get_str(j, "queue"), "refund");
        CHECK(json_object_get(j, "attempt") == NULL);
        CHECK(json_object_get(j, "job_id") == NULL);
    }
    json_decref(j);

    begin(LOG_LEVEL_DEBUG);
    log_write(LOG_LEVEL_ERROR, NULL, NULL, "plain");
    j = only_line(NULL);
    if (j != NULL) {
        CHECK_EQ_INT(json_object_size(j), 3);
        CHECK_STR(get_str(j, "level"), "error");
    }
    json_decref(j);
}

static void test_escaping(void)
{
    begin(LOG_LEVEL_DEBUG);
    /* Quotes, backslashes, newlines (log injection), control bytes, DEL, valid UTF-8 and an
     * invalid byte. */
    log_info("q\"b\\n\nt\tc\x01\x1f d\x7f \xc3\xa9 bad\xff end \xe2\x82");
    json_t *j = only_line(NULL);
    if (j != NULL)
        CHECK_STR(
            get_str(j, "msg"),
            "q\"b\\n\nt\tc\x01\x1f d\x7f \xc3\xa9 bad\xef\xbf\xbd end \xef\xbf\xbd\xef\xbf\xbd");
    json_decref(j);

    /* A forged second line stays inside the message. */
    begin(LOG_LEVEL_DEBUG);
    log_info("%s", "x\n{\"ts\":\"forged\",\"level\":\"error\",\"msg\":\"pwned\"}");
    char *raw = contents();
    CHECK_EQ_INT(count_lines(raw), 1);
    free(raw);

    /* Context fields are escaped too. */
    struct log_ctx ctx = {"j\"1\n", "q\\", "o\x02", 0};
    begin(LOG_LEVEL_DEBUG);
    log_write(LOG_LEVEL_INFO, &ctx, "e\r\n\xfe", "m");
    j = only_line(NULL);
    if (j != NULL) {
        CHECK_STR(get_str(j, "job_id"), "j\"1\n");
        CHECK_STR(get_str(j, "queue"), "q\\");
        CHECK_STR(get_str(j, "order_id"), "o\x02");
        CHECK_STR(get_str(j, "error"), "e\r\n\xef\xbf\xbd");
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "attempt")), 0);
    }
    json_decref(j);
}

static void test_no_card_numbers(void)
{
    struct log_ctx ctx = {"job 4111111111111111", "reconcile", "5500-0000-0000-0004", 1};
    char *raw = NULL;

    begin(LOG_LEVEL_DEBUG);
    log_write(LOG_LEVEL_ERROR, &ctx, "PG echoed card 4012 8888 8888 1881 back",
              "charging card %s (%s) for order %s", "4111 1111 1111 1111", "378282246310005",
              "o-1");
    json_t *j = only_line(&raw);
    CHECK_NOT_CONTAINS(raw, "4111111111111111");
    CHECK_NOT_CONTAINS(raw, "4111 1111 1111 1111");
    CHECK_NOT_CONTAINS(raw, "411111111111");
    CHECK_NOT_CONTAINS(raw, "5500-0000-0000");
    CHECK_NOT_CONTAINS(raw, "4012 8888 8888");
    CHECK_NOT_CONTAINS(raw, "37828224631");
    if (j != NULL) {
        CHECK_STR(get_str(j, "msg"),
                  "charging card **** **** **** 1111 (***********0005) for order o-1");
        CHECK_STR(get_str(j, "job_id"), "job ************1111");
        CHECK_STR(get_str(j, "order_id"), "****-****-****-0004");
        CHECK_STR(get_str(j, "error"), "PG echoed card **** **** **** 1881 back");
    }
    json_decref(j);
    free(raw);

    /* A context value longer than its bound is cut; a card number cut in half by that bound
     * must not leave its first digits behind unmasked. */
    char order[300];
    memset(order, 'x', 245);
    memcpy(order + 245, "4111111111111111", 17);
    struct log_ctx long_ctx = {NULL, NULL, order, -1};
    char err[2100];
    memset(err, 'e', 2040);
    memcpy(err + 2040, "5500000000000004", 17);
    begin(LOG_LEVEL_DEBUG);
    log_write(LOG_LEVEL_INFO, &long_ctx, err, "m");
    j = only_line(&raw);
    CHECK_NOT_CONTAINS(raw, "41111");
    CHECK_NOT_CONTAINS(raw, "55000");
    if (j != NULL) {
        CHECK_CONTAINS(get_str(j, "order_id"), "...[truncated 16 bytes]");
        CHECK_CONTAINS(get_str(j, "error"), "...[truncated ");
    }
    json_decref(j);
    free(raw);
}

static void test_truncation(void)
{
    char *big = malloc(20001);
    memset(big, 'a', 20000);
    big[20000] = '\0';

    begin(LOG_LEVEL_DEBUG);
    log_info("%s", big);
    char *raw = NULL;
    json_t *j = only_line(&raw);
    CHECK(strlen(raw) <= LOG_LINE_MAX);
    if (j != NULL) {
        const char *msg = get_str(j, "msg");
        size_t kept = strspn(msg, "a");
        unsigned long cut = 0;
        CHECK(kept > 4000);
        CHECK_EQ_INT(sscanf(msg + kept, "...[truncated %lu bytes]", &cut), 1);
        /* Nothing disappears silently: kept + reported = original length. */
        CHECK_EQ_INT(kept + cut, 20000);
    }
    json_decref(j);
    free(raw);

    /* Escapes expand six-fold; the line still stays bounded and valid. */
    memset(big, '\x01', 20000);
    struct log_ctx ctx = {"j", "q", "o", 1};
    begin(LOG_LEVEL_DEBUG);
    log_write(LOG_LEVEL_INFO, &ctx, big, "%s", big);
    j = only_line(&raw);
    CHECK(strlen(raw) <= LOG_LINE_MAX);
    if (j != NULL) {
        CHECK_CONTAINS(get_str(j, "msg"), "...[truncated ");
        CHECK_CONTAINS(get_str(j, "error"), "...[truncated ");
        CHECK_STR(get_str(j, "job_id"), "j");
    }
    json_decref(j);
    free(raw);

    /* Just under the bound: nothing is cut. */
    memset(big, 'b', 1000);
    big[1000] = '\0';
    begin(LOG_LEVEL_DEBUG);
    log_info("%s", big);
    j = only_line(NULL);
    if (j != NULL)
        CHECK_STR(get_str(j, "msg"), big);
    json_decref(j);
    free(big);
}

static void *writer(void *arg)
{
    int id = (int)(long)arg;
    char pad[3000];

    for (int i = 0; i < 300; i++) {
        size_t n = (size_t)((i * 37 + id * 101) % (int)(sizeof(pad) - 1));
        memset(pad, 'a' + id, n);
        pad[n] = '\0';
        struct log_ctx ctx = {"job", "reconcile", "order", i};
        log_write(LOG_LEVEL_INFO, &ctx, NULL, "thread %d line %d %s", id, i, pad);
    }
    return NULL;
}

static void test_threads(void)
{
    pthread_t t[4];

    begin(LOG_LEVEL_DEBUG);
    for (long i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, writer, (void *)i);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    char *raw = contents();
    CHECK_EQ_INT(count_lines(raw), 1200);
    int bad = 0;
    char *save = NULL;
    for (char *line = strtok_r(raw, "\n", &save); line != NULL;
         line = strtok_r(NULL, "\n", &save)) {
        json_t *j = json_loads(line, 0, NULL);
        if (j == NULL)
            bad++;
        json_decref(j);
    }
    CHECK_EQ_INT(bad, 0);
    free(raw);
}

static void test_errno_preserved(void)
{
    begin(LOG_LEVEL_DEBUG);
    errno = ENOENT;
    log_info("x");
    CHECK_EQ_INT(errno, ENOENT);
}

int main(void)
{
    RUN(test_levels);
    RUN(test_mask);
    RUN(test_line_fields);
    RUN(test_escaping);
    RUN(test_no_card_numbers);
    RUN(test_truncation);
    RUN(test_threads);
    RUN(test_errno_preserved);
    if (out != NULL)
        fclose(out);
    log_init(LOG_LEVEL_INFO, NULL);
    return unit_finish();
}
