/*
 * test_gateway.c - unit tests of the PG client (src/gateway.c).
 *
 * The pure parts (answer parsing, orderId-list selection, card masking, classification) are
 * tested directly. The *_work functions are tested end to end against a tiny HTTP server
 * started in this process with libmicrohttpd on a loopback port: canned answers per
 * transaction key, with the requests it saw recorded so the test can check what was sent.
 * Thread: the test's main thread plus libmicrohttpd's threads (and a few callers for the
 * handle-pool test). Timeouts are tiny so the whole file runs in a few seconds.
 */
#include "settle/gateway.h"
#include "settle/error.h"
#include "settle/httploop.h"
#include "unit.h"

#include <arpa/inet.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#define KEY "20250816:TR:9577c5"
#define CARD "1234-5678-9814-1451"

/* A well-formed GET /payments/{key} answer with the given data members spliced in. */
#define TX_BODY(status, extra)                                                                     \
    "{\"meta\":{\"result\":\"SUCCESS\",\"errorCode\":null,\"message\":null},"                      \
    "\"data\":{\"transactionKey\":\"" KEY "\",\"orderId\":\"1351039135\",\"cardType\":"            \
    "\"SAMSUNG\",\"cardNo\":\"" CARD "\",\"amount\":5000,\"status\":\"" status "\"" extra "}}"

#define WRAP(data)                                                                                 \
    "{\"meta\":{\"result\":\"SUCCESS\",\"errorCode\":null,\"message\":null},\"data\":" data "}"

static int parse(const char *body, struct gateway_tx *tx, char *why)
{
    return gateway_parse_transaction(body, strlen(body), tx, why, GATEWAY_ERROR_MAX);
}

static int parse_list(const char *body, struct gateway_tx *tx, char *why)
{
    return gateway_parse_order_transactions(body, strlen(body), tx, why, GATEWAY_ERROR_MAX);
}

static bool mem_contains(const void *hay, size_t hay_len, const char *needle)
{
    size_t n = strlen(needle);
    const unsigned char *h = hay;
    for (size_t i = 0; n <= hay_len && i <= hay_len - n; i++) {
        if (memcmp(h + i, needle, n) == 0)
            return true;
    }
    return false;
}

static bool utf8_valid(const char *s)
{
    json_t *j = json_string(s);
    bool ok = j != NULL;
    json_decref(j);
    return ok;
}

/* --- Pure: transaction answers ---------------------------------------------------------------- */

static void test_parse_each_status(void)
{
    static const struct {
        const char *body;
        enum gateway_tx_status status;
    } cases[] = {
        {TX_BODY("PENDING", ",\"reason\":null"), GATEWAY_TX_PENDING},
        {TX_BODY("SUCCESS", ",\"reason\":\"정상 승인되었습니다.\""), GATEWAY_TX_SUCCESS},
        {TX_BODY("FAILED", ",\"reason\":\"한도초과입니다.\""), GATEWAY_TX_FAILED},
        {TX_BODY("CANCELLED", ",\"cancelledAmount\":5000,\"balanceAmount\":0"),
         GATEWAY_TX_CANCELLED},
        {TX_BODY("PARTIALLY_CANCELLED", ",\"cancelledAmount\":1000,\"balanceAmount\":4000"),
         GATEWAY_TX_PARTIALLY_CANCELLED},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct gateway_tx tx;
        char why[GATEWAY_ERROR_MAX];
        CHECK_EQ_INT(parse(cases[i].body, &tx, why), 0);
        CHECK_EQ_INT(tx.status, cases[i].status);
        CHECK_STR(tx.transaction_key, KEY);
        CHECK_STR(tx.order_id, "1351039135");
        CHECK_EQ_INT(tx.amount_minor, 5000);
        CHECK_STR(tx.card_type, "SAMSUNG");
        CHECK_STR(tx.card_no_masked, "****-****-****-1451");
    }

    struct gateway_tx tx;
    char why[GATEWAY_ERROR_MAX];
    CHECK_EQ_INT(parse(cases[1].body, &tx, why), 0);
    CHECK_STR(tx.reason, "정상 승인되었습니다.");
    CHECK_EQ_INT(tx.cancelled_minor, -1);
    CHECK_EQ_INT(tx.balance_minor, -1);
    CHECK_EQ_INT(parse(cases[0].body, &tx, why), 0);
    CHECK_STR(tx.reason, "");
    CHECK_EQ_INT(parse(cases[4].body, &tx, why), 0);
    CHECK_EQ_INT(tx.cancelled_minor, 1000);
    CHECK_EQ_INT(tx.balance_minor, 4000);

    /* Optional members may be missing or null; required ones are enough. */
    CHECK_EQ_INT(parse(WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,"
                            "\"status\":\"SUCCESS\",\"cardType\":null,\"cardNo\":null}"),
                       &tx, why),
                 0);
    CHECK_STR(tx.card_no_masked, "");
    CHECK_STR(tx.card_type, "");
}

static void test_parse_meta_fail(void)
{
    struct gateway_tx tx;
    char why[GATEWAY_ERROR_MAX];
    CHECK_EQ_INT(parse("{\"meta\":{\"result\":\"FAIL\",\"errorCode\":\"Bad Request\","
                       "\"message\":\"카드 한도 초과\"},\"data\":null}",
                       &tx, why),
                 SETTLE_EREJECTED);
    CHECK_STR(why, "카드 한도 초과");
    CHECK_EQ_INT(parse("{\"meta\":{\"result\":\"FAIL\",\"errorCode\":\"Not Found\","
                       "\"message\":null},\"data\":null}",
                       &tx, why),
                 SETTLE_EREJECTED);
    CHECK_STR(why, "Not Found");
    /* A PG that echoes the card number in its message must not get it into our records. */
    CHECK_EQ_INT(parse("{\"meta\":{\"result\":\"FAIL\",\"message\":\"card " CARD
                       " refused\"},\"data\":null}",
                       &tx, why),
                 SETTLE_EREJECTED);
    CHECK_STR(why, "card ****-****-****-1451 refused");
    CHECK_STR(tx.transaction_key, "");
}

static void test_parse_malformed(void)
{
    static const char *const bad[] = {
        "",
        "{",
        "null",
        "[]",
        "\"SUCCESS\"",
        "not json at all",
        "<html><body>502 Bad Gateway</body></html>",
        TX_BODY("SUCCESS", "") " trailing",
        /* envelope */
        "{\"data\":{}}",
        "{\"meta\":\"SUCCESS\",\"data\":{}}",
        "{\"meta\":{},\"data\":{}}",
        "{\"meta\":{\"result\":1},\"data\":{}}",
        "{\"meta\":{\"result\":\"MAYBE\"},\"data\":{}}",
        "{\"meta\":{\"result\":\"SUCCESS\"}}",
        WRAP("null"),
        WRAP("[]"),
        WRAP("\"x\""),
        /* missing required members */
        WRAP("{\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"amount\":1,\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":null,\"amount\":1,\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"\",\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\"}"),
        /* wrong types */
        WRAP("{\"transactionKey\":7,\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":1351039135,\"amount\":1,"
             "\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":\"5000\","
             "\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":5000.0,"
             "\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":true,\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":2}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\","
             "\"reason\":5}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\","
             "\"cardNo\":1234567898141451}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\","
             "\"cardType\":[\"SAMSUNG\"]}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\","
             "\"cancelledAmount\":\"1\"}"),
        /* nested garbage */
        WRAP("{\"transactionKey\":{\"a\":[1,2,{\"b\":null}]},\"orderId\":\"o\",\"amount\":1,"
             "\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":{\"value\":5000},"
             "\"status\":\"SUCCESS\"}"),
        /* numbers out of range */
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":99999999999999999999,"
             "\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":-5000,"
             "\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":0,\"status\":\"SUCCESS\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\","
             "\"cancelledAmount\":-1}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1e3,\"status\":\"SUCCESS\"}"),
        /* unknown status, wrong case */
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"DONE\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"success\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"\"}"),
        /* an answer that names a field twice cannot be trusted */
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"amount\":100000,"
             "\"status\":\"SUCCESS\"}"),
        /* control characters in an id */
        WRAP("{\"transactionKey\":\"k\\r\\nX: y\",\"orderId\":\"o\",\"amount\":1,"
             "\"status\":\"SUCCESS\"}"),
        /* NUL smuggled in a string */
        WRAP("{\"transactionKey\":\"k\\u0000x\",\"orderId\":\"o\",\"amount\":1,"
             "\"status\":\"SUCCESS\"}"),
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct gateway_tx tx;
        char why[GATEWAY_ERROR_MAX] = "";
        int rc = parse(bad[i], &tx, why);
        if (rc != SETTLE_EPARSE)
            printf("case %zu accepted or misjudged: %s\n", i, bad[i]);
        CHECK_EQ_INT(rc, SETTLE_EPARSE);
        CHECK(why[0] != '\0');
        CHECK_STR(tx.transaction_key, "");
    }

    struct gateway_tx tx;
    char why[GATEWAY_ERROR_MAX];
    CHECK_EQ_INT(parse("not json", &tx, why), SETTLE_EPARSE);
    CHECK(strncmp(why, "invalid JSON in PG answer: ", 27) == 0);
    CHECK_EQ_INT(parse(WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,"
                            "\"status\":\"DONE\"}"),
                       &tx, why),
                 SETTLE_EPARSE);
    CHECK_CONTAINS(why, "DONE");

    /* A NUL byte inside the body (len covers it) is not silently cut off. */
    static const char with_nul[] = TX_BODY("SUCCESS", "") "\0{}";
    CHECK_EQ_INT(gateway_parse_transaction(with_nul, sizeof with_nul - 1, &tx, why, sizeof why),
                 SETTLE_EPARSE);
    /* len is honoured: a body cut short is malformed even if the bytes after it are fine. */
    static const char whole[] = TX_BODY("SUCCESS", "");
    CHECK_EQ_INT(gateway_parse_transaction(whole, sizeof whole - 10, &tx, why, sizeof why),
                 SETTLE_EPARSE);
    /* why may be omitted. */
    CHECK_EQ_INT(gateway_parse_transaction("x", 1, &tx, NULL, 0), SETTLE_EPARSE);

    /* Deep nesting is refused by the parser instead of exhausting the stack. */
    size_t depth = 100000;
    char *deep = malloc(2 * depth + 1);
    CHECK(deep != NULL);
    if (deep != NULL) {
        memset(deep, '[', depth);
        memset(deep + depth, ']', depth);
        deep[2 * depth] = '\0';
        CHECK_EQ_INT(gateway_parse_transaction(deep, 2 * depth, &tx, why, sizeof why),
                     SETTLE_EPARSE);
        free(deep);
    }
}

static void test_parse_bounds(void)
{
    struct gateway_tx tx;
    char why[GATEWAY_ERROR_MAX];
    char body[4096];
    char id[JOB_ID_MAX + 2];

    /* The largest amount that fits is accepted as is. */
    CHECK_EQ_INT(parse(WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\","
                            "\"amount\":9223372036854775807,\"status\":\"SUCCESS\"}"),
                       &tx, why),
                 0);
    CHECK(tx.amount_minor == INT64_MAX);

    /* Ids of exactly JOB_ID_MAX bytes fit; one more byte is refused, never truncated. */
    memset(id, 'k', JOB_ID_MAX);
    id[JOB_ID_MAX] = '\0';
    snprintf(body, sizeof body,
             WRAP("{\"transactionKey\":\"%s\",\"orderId\":\"o\",\"amount\":1,\"status\":"
                  "\"SUCCESS\"}"),
             id);
    CHECK_EQ_INT(parse(body, &tx, why), 0);
    CHECK_EQ_INT(strlen(tx.transaction_key), JOB_ID_MAX);
    id[JOB_ID_MAX] = 'k';
    id[JOB_ID_MAX + 1] = '\0';
    snprintf(body, sizeof body,
             WRAP("{\"transactionKey\":\"k\",\"orderId\":\"%s\",\"amount\":1,\"status\":"
                  "\"SUCCESS\"}"),
             id);
    CHECK_EQ_INT(parse(body, &tx, why), SETTLE_EPARSE);

    /* A long multi-byte reason is cut on a character boundary and stays valid UTF-8. */
    char reason[1200];
    for (int i = 0; i < 300; i++)
        memcpy(reason + 3 * i, "가", 3);
    reason[900] = '\0';
    snprintf(body, sizeof body,
             WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":"
                  "\"FAILED\",\"reason\":\"%s\"}"),
             reason);
    CHECK_EQ_INT(parse(body, &tx, why), 0);
    CHECK(strlen(tx.reason) <= JOB_REASON_MAX);
    CHECK(strlen(tx.reason) > JOB_REASON_MAX - 3);
    CHECK_EQ_INT(strlen(tx.reason) % 3, 0);
    CHECK(utf8_valid(tx.reason));

    /* Control characters in free text become spaces (one log line, one DLQ line). */
    CHECK_EQ_INT(parse(WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,"
                            "\"status\":\"FAILED\",\"reason\":\"a\\nb\\tc\\u001bd\"}"),
                       &tx, why),
                 0);
    CHECK_STR(tx.reason, "a b c d");

    /* Short digit runs in a reason are left alone; card-like runs keep the last four. */
    CHECK_EQ_INT(parse(WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,"
                            "\"status\":\"FAILED\",\"reason\":\"limit 5000 for 1234567898141451"
                            " (1234 5678 9814 1451)\"}"),
                       &tx, why),
                 0);
    CHECK_STR(tx.reason, "limit 5000 for ************1451 (**** **** **** 1451)");
}

static void test_card_masking(void)
{
    static const char *const bodies[] = {
        TX_BODY("SUCCESS", ""),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\","
             "\"cardNo\":\"1234567898141451\",\"reason\":\"paid with " CARD "\"}"),
        WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,\"status\":\"SUCCESS\","
             "\"cardNo\":\"1234 5678 9814 1451\",\"cardType\":\"" CARD "\"}"),
    };
    for (size_t i = 0; i < sizeof bodies / sizeof bodies[0]; i++) {
        struct gateway_tx tx;
        char why[GATEWAY_ERROR_MAX];
        CHECK_EQ_INT(parse(bodies[i], &tx, why), 0);
        CHECK_STR(tx.card_no_masked, "****-****-****-1451");
        /* No part of the number but its last four digits is anywhere in the struct. */
        CHECK(!mem_contains(&tx, sizeof tx, "1234"));
        CHECK(!mem_contains(&tx, sizeof tx, "5678"));
        CHECK(!mem_contains(&tx, sizeof tx, "9814"));
        CHECK(!mem_contains(&tx, sizeof tx, "12345678"));
    }

    struct gateway_tx tx;
    char why[GATEWAY_ERROR_MAX];
    CHECK_EQ_INT(parse(WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,"
                            "\"status\":\"SUCCESS\",\"cardNo\":\"12\"}"),
                       &tx, why),
                 0);
    CHECK_STR(tx.card_no_masked, "****");
    CHECK_EQ_INT(parse(WRAP("{\"transactionKey\":\"k\",\"orderId\":\"o\",\"amount\":1,"
                            "\"status\":\"SUCCESS\",\"cardNo\":\"****-****-****-9999\"}"),
                       &tx, why),
                 0);
    CHECK_STR(tx.card_no_masked, "****-****-****-9999");

    /* An answer cut off inside the card number: the parse error must not quote it. */
    static const char cut[] = TX_BODY("SUCCESS", "");
    const char *at = strstr(cut, "5678-98");
    CHECK(at != NULL);
    if (at != NULL) {
        CHECK_EQ_INT(gateway_parse_transaction(cut, (size_t)(at - cut) + 7, &tx, why, sizeof why),
                     SETTLE_EPARSE);
        CHECK_NOT_CONTAINS(why, "5678");
        CHECK_NOT_CONTAINS(why, "1234");
    }
}

static void test_parse_cancel_answer_strictness(void)
{
    /* The public parser is the GET-by-key one: a cancel answer without orderId/amount is not
     * enough for it. gateway_cancel_work parses cancel answers leniently (tested below). */
    struct gateway_tx tx;
    char why[GATEWAY_ERROR_MAX];
    CHECK_EQ_INT(parse(WRAP("{\"transactionKey\":\"" KEY "\",\"status\":\"CANCELLED\","
                            "\"cancelledAmount\":5000,\"balanceAmount\":0}"),
                       &tx, why),
                 SETTLE_EPARSE);
    CHECK_CONTAINS(why, "orderId");
}

/* --- Pure: orderId list ----------------------------------------------------------------------- */

#define LIST(items) WRAP("{\"orderId\":\"1351039135\",\"transactions\":[" items "]}")
#define ITEM(key, status)                                                                          \
    "{\"transactionKey\":\"" key "\",\"status\":\"" status "\",\"reason\":null}"

static void test_order_list_selection(void)
{
    static const struct {
        const char *body;
        const char *want_key;
        enum gateway_tx_status want_status;
    } cases[] = {
        {LIST(ITEM("k1", "FAILED") "," ITEM("k2", "SUCCESS")), "k2", GATEWAY_TX_SUCCESS},
        {LIST(ITEM("k1", "FAILED") "," ITEM("k2", "PENDING")), "k2", GATEWAY_TX_PENDING},
        {LIST(ITEM("k1", "PENDING") "," ITEM("k2", "SUCCESS")), "k2", GATEWAY_TX_SUCCESS},
        {LIST(ITEM("k1", "FAILED") "," ITEM("k2", "PENDING") "," ITEM("k3", "SUCCESS")), "k3",
         GATEWAY_TX_SUCCESS},
        {LIST(ITEM("k1", "FAILED") "," ITEM("k2", "FAILED")), "k1", GATEWAY_TX_FAILED},
        {LIST(ITEM("k1", "CANCELLED") "," ITEM("k2", "FAILED")), "k1", GATEWAY_TX_CANCELLED},
        {LIST(ITEM("k1", "SUCCESS") "," ITEM("k2", "SUCCESS")), "k1", GATEWAY_TX_SUCCESS},
        {LIST(ITEM("k1", "PENDING") "," ITEM("k2", "PENDING")), "k1", GATEWAY_TX_PENDING},
        {LIST(ITEM("k1", "FAILED")), "k1", GATEWAY_TX_FAILED},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct gateway_tx tx;
        char why[GATEWAY_ERROR_MAX];
        CHECK_EQ_INT(parse_list(cases[i].body, &tx, why), 0);
        CHECK_STR(tx.transaction_key, cases[i].want_key);
        CHECK_EQ_INT(tx.status, cases[i].want_status);
        /* The simulator's list has no per-item orderId or amount. */
        CHECK_STR(tx.order_id, "1351039135");
        CHECK_EQ_INT(tx.amount_minor, -1);
    }

    struct gateway_tx tx;
    char why[GATEWAY_ERROR_MAX];
    /* Items that carry the full transaction keep it (no follow-up needed). */
    CHECK_EQ_INT(parse_list(LIST("{\"transactionKey\":\"k1\",\"orderId\":\"1351039135\","
                                 "\"amount\":5000,\"status\":\"SUCCESS\",\"cardNo\":\"" CARD
                                 "\",\"cardType\":\"KB\",\"reason\":\"ok\"}"),
                            &tx, why),
                 0);
    CHECK_EQ_INT(tx.amount_minor, 5000);
    CHECK_STR(tx.card_no_masked, "****-****-****-1451");
    CHECK_STR(tx.card_type, "KB");
    CHECK_STR(tx.reason, "ok");
    CHECK(!mem_contains(&tx, sizeof tx, "5678"));

    CHECK_EQ_INT(parse_list(LIST(""), &tx, why), SETTLE_ENOTFOUND);
    CHECK_CONTAINS(why, "1351039135");
    CHECK_STR(tx.transaction_key, "");

    static const char *const bad[] = {
        WRAP("{\"transactions\":[" ITEM("k1", "SUCCESS") "]}"),
        WRAP("{\"orderId\":\"o\"}"),
        WRAP("{\"orderId\":\"o\",\"transactions\":{}}"),
        WRAP("{\"orderId\":\"o\",\"transactions\":null}"),
        LIST(ITEM("k1", "FAILED") ",42"),
        LIST(ITEM("k1", "FAILED") "," ITEM("k2", "WON")),
        LIST(ITEM("k1", "FAILED") ",{\"status\":\"SUCCESS\"}"),
        LIST("{\"transactionKey\":\"k1\",\"status\":\"SUCCESS\",\"amount\":-1}"),
        LIST("[" ITEM("k1", "SUCCESS") "]"),
        TX_BODY("SUCCESS", ""),
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        why[0] = '\0';
        int rc = parse_list(bad[i], &tx, why);
        if (rc != SETTLE_EPARSE)
            printf("list case %zu misjudged: %s\n", i, bad[i]);
        CHECK_EQ_INT(rc, SETTLE_EPARSE);
        CHECK(why[0] != '\0');
    }
    CHECK_EQ_INT(
        parse_list("{\"meta\":{\"result\":\"FAIL\",\"message\":\"no\"},\"data\":null}", &tx, why),
        SETTLE_EREJECTED);
    CHECK_STR(why, "no");
}

/* --- Pure: classification and names ------------------------------------------------------------
 */

static void test_classify(void)
{
    static const struct {
        long status;
        enum gateway_outcome want;
    } table[] = {
        {200, GATEWAY_OK},           {201, GATEWAY_OK},           {204, GATEWAY_OK},
        {100, GATEWAY_BAD_RESPONSE}, {301, GATEWAY_BAD_RESPONSE}, {302, GATEWAY_BAD_RESPONSE},
        {304, GATEWAY_BAD_RESPONSE}, {400, GATEWAY_REJECTED},     {401, GATEWAY_REJECTED},
        {403, GATEWAY_REJECTED},     {404, GATEWAY_NOT_FOUND},    {409, GATEWAY_REJECTED},
        {422, GATEWAY_REJECTED},     {429, GATEWAY_TRANSIENT},    {500, GATEWAY_TRANSIENT},
        {502, GATEWAY_TRANSIENT},    {503, GATEWAY_TRANSIENT},    {504, GATEWAY_TRANSIENT},
        {0, GATEWAY_BAD_RESPONSE},   {600, GATEWAY_BAD_RESPONSE}, {-1, GATEWAY_BAD_RESPONSE},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (gateway_classify(true, table[i].status) != table[i].want)
            printf("HTTP %ld misclassified\n", table[i].status);
        CHECK_EQ_INT(gateway_classify(true, table[i].status), table[i].want);
        /* Transport failures ignore the status. */
        CHECK_EQ_INT(gateway_classify(false, table[i].status), GATEWAY_TRANSIENT);
    }
}

static void test_names(void)
{
    CHECK_STR(gateway_outcome_name(GATEWAY_OK), "ok");
    CHECK_STR(gateway_outcome_name(GATEWAY_NOT_FOUND), "not_found");
    CHECK_STR(gateway_outcome_name(GATEWAY_TRANSIENT), "transient");
    CHECK_STR(gateway_outcome_name(GATEWAY_REJECTED), "rejected");
    CHECK_STR(gateway_outcome_name(GATEWAY_BAD_RESPONSE), "bad_response");
    CHECK_STR(gateway_outcome_name((enum gateway_outcome)99), "invalid");
    CHECK_STR(gateway_tx_status_name(GATEWAY_TX_UNKNOWN), "UNKNOWN");
    CHECK_STR(gateway_tx_status_name(GATEWAY_TX_PENDING), "PENDING");
    CHECK_STR(gateway_tx_status_name(GATEWAY_TX_SUCCESS), "SUCCESS");
    CHECK_STR(gateway_tx_status_name(GATEWAY_TX_FAILED), "FAILED");
    CHECK_STR(gateway_tx_status_name(GATEWAY_TX_CANCELLED), "CANCELLED");
    CHECK_STR(gateway_tx_status_name(GATEWAY_TX_PARTIALLY_CANCELLED), "PARTIALLY_CANCELLED");
    CHECK_STR(gateway_tx_status_name((enum gateway_tx_status) - 3), "invalid");
}

static void test_create_invalid(void)
{
    struct gateway *g = NULL;
    struct gateway_config ok = {"http://127.0.0.1:1", 100, 300, 4096, 1};
    struct gateway_config c;

    c = ok;
    c.base_url = NULL;
    CHECK_EQ_INT(gateway_create(&g, &c), SETTLE_EINVAL);
    CHECK(g == NULL);
    c = ok;
    c.base_url = "ftp://127.0.0.1/";
    CHECK_EQ_INT(gateway_create(&g, &c), SETTLE_EINVAL);
    c = ok;
    c.base_url = "http://127.0.0.1/\r\nX: y";
    CHECK_EQ_INT(gateway_create(&g, &c), SETTLE_EINVAL);
    c = ok;
    c.timeout_ms = 0;
    CHECK_EQ_INT(gateway_create(&g, &c), SETTLE_EINVAL);
    c = ok;
    c.connect_timeout_ms = 0;
    CHECK_EQ_INT(gateway_create(&g, &c), SETTLE_EINVAL);
    c = ok;
    c.body_max_bytes = 0;
    CHECK_EQ_INT(gateway_create(&g, &c), SETTLE_EINVAL);
    c = ok;
    c.max_handles = 0;
    CHECK_EQ_INT(gateway_create(&g, &c), SETTLE_EINVAL);
    CHECK_EQ_INT(gateway_create(&g, NULL), SETTLE_EINVAL);

    CHECK_EQ_INT(gateway_create(&g, &ok), 0);
    CHECK(g != NULL);
    gateway_destroy(g);
    gateway_destroy(NULL);
}

/* --- The canned PG server --------------------------------------------------------------------- */

/* What the server saw of the last request, and how many it answered. */
static struct {
    pthread_mutex_t mu;
    int requests;
    char method[16];
    char url[256];
    char order_id[256];
    char user_id[256];
    char idem[256];
    char ctype[128];
    char expect[128];
    char body[2048];
    unsigned client_port;
} seen = {.mu = PTHREAD_MUTEX_INITIALIZER};

struct upload {
    char data[2048];
    size_t len;
};

static void copy_value(char *dst, size_t n, const char *v)
{
    snprintf(dst, n, "%s", v != NULL ? v : "(none)");
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static enum MHD_Result respond(struct MHD_Connection *c, unsigned status, const char *body,
                               const char *retry_after, const char *location)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_MUST_COPY);
    if (r == NULL)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "application/json");
    if (retry_after != NULL)
        MHD_add_response_header(r, "Retry-After", retry_after);
    if (location != NULL)
        MHD_add_response_header(r, "Location", location);
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

#define FAIL_BODY(msg)                                                                             \
    "{\"meta\":{\"result\":\"FAIL\",\"errorCode\":\"E\",\"message\":\"" msg "\"},\"data\":null}"
#define P "/api/v1/payments/"

/* Answers a cancel by echoing the requested amount (none: the whole 5000). */
static enum MHD_Result answer_cancel(struct MHD_Connection *c, const char *key, const char *body)
{
    json_t *req = json_loads(body, 0, NULL);
    json_t *amount = json_object_get(req, "amount");
    long long want = json_is_integer(amount) ? json_integer_value(amount) : 5000;
    char out[512];
    const char *status = want >= 5000 ? "CANCELLED" : "PARTIALLY_CANCELLED";
    if (strcmp(key, "weird") == 0)
        status = "SUCCESS";
    snprintf(out, sizeof out,
             WRAP("{\"transactionKey\":\"%s\",\"status\":\"%s\",\"cancelledAmount\":%lld,"
                  "\"balanceAmount\":%lld}"),
             key, status, want, 5000 - want);
    json_decref(req);
    return respond(c, 200, out, NULL, NULL);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    (void)cls;
    (void)version;
    struct upload *up = *con_cls;
    if (up == NULL) {
        up = calloc(1, sizeof *up);
        if (up == NULL)
            return MHD_NO;
        *con_cls = up;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        if (n > sizeof up->data - 1 - up->len)
            n = sizeof up->data - 1 - up->len;
        memcpy(up->data + up->len, upload_data, n);
        up->len += n;
        *upload_data_size = 0;
        return MHD_YES;
    }

    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    pthread_mutex_lock(&seen.mu);
    seen.requests++;
    copy_value(seen.method, sizeof seen.method, method);
    copy_value(seen.url, sizeof seen.url, url);
    copy_value(seen.order_id, sizeof seen.order_id,
               MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "orderId"));
    copy_value(seen.user_id, sizeof seen.user_id,
               MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-USER-ID"));
    copy_value(seen.idem, sizeof seen.idem,
               MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Idempotency-Key"));
    copy_value(seen.ctype, sizeof seen.ctype,
               MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type"));
    copy_value(seen.expect, sizeof seen.expect,
               MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Expect"));
    snprintf(seen.body, sizeof seen.body, "%.*s", (int)up->len, up->data);
    if (ci != NULL && ci->client_addr != NULL && ci->client_addr->sa_family == AF_INET)
        seen.client_port =
            ntohs(((const struct sockaddr_in *)(const void *)ci->client_addr)->sin_port);
    pthread_mutex_unlock(&seen.mu);

    size_t plen = strlen(P);
    if (strcmp(method, "POST") == 0) {
        size_t n = strlen(url);
        if (strncmp(url, P, plen) == 0 && n > plen + 7 && strcmp(url + n - 7, "/cancel") == 0) {
            char key[256];
            snprintf(key, sizeof key, "%.*s", (int)(n - plen - 7), url + plen);
            if (strcmp(key, "busy") == 0)
                return respond(c, 503, FAIL_BODY("busy"), "3", NULL);
            if (strcmp(key, "bad400") == 0)
                return respond(c, 400, FAIL_BODY("amount exceeds balance"), NULL, NULL);
            if (strcmp(key, "missing") == 0)
                return respond(c, 404, FAIL_BODY("no such payment"), NULL, NULL);
            return answer_cancel(c, key, up->data);
        }
        return respond(c, 405, FAIL_BODY("method"), NULL, NULL);
    }
    if (strcmp(url, "/api/v1/payments") == 0) {
        const char *oid = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "orderId");
        if (oid != NULL && strcmp(oid, "o-1") == 0)
            /* Newest first: a FAILED retry after the SUCCESS; no amounts, like the simulator. */
            return respond(c, 200,
                           WRAP("{\"orderId\":\"o-1\",\"transactions\":["
                                "{\"transactionKey\":\"k-failed\",\"status\":\"FAILED\","
                                "\"reason\":\"limit\"},{\"transactionKey\":\"k-ok\",\"status\":"
                                "\"SUCCESS\",\"reason\":null}]}"),
                           NULL, NULL);
        if (oid != NULL && strcmp(oid, "o-full") == 0)
            return respond(c, 200,
                           WRAP("{\"orderId\":\"o-full\",\"transactions\":[{\"transactionKey\":"
                                "\"k-full\",\"orderId\":\"o-full\",\"amount\":700,\"status\":"
                                "\"PENDING\",\"reason\":null}]}"),
                           NULL, NULL);
        if (oid != NULL && strcmp(oid, "o-gone") == 0)
            return respond(c, 200,
                           WRAP("{\"orderId\":\"o-gone\",\"transactions\":[{\"transactionKey\":"
                                "\"missing\",\"status\":\"SUCCESS\"}]}"),
                           NULL, NULL);
        return respond(c, 404, FAIL_BODY("no transaction for this order"), NULL, NULL);
    }
    if (strncmp(url, P, plen) != 0)
        return respond(c, 404, FAIL_BODY("no route"), NULL, NULL);

    const char *key = url + plen;
    if (strcmp(key, KEY) == 0)
        return respond(c, 200, TX_BODY("SUCCESS", ",\"reason\":\"정상 승인되었습니다.\""), NULL,
                       NULL);
    if (strcmp(key, "k-ok") == 0)
        return respond(c, 200,
                       WRAP("{\"transactionKey\":\"k-ok\",\"orderId\":\"o-1\",\"amount\":5000,"
                            "\"status\":\"SUCCESS\",\"cardNo\":\"" CARD "\"}"),
                       NULL, NULL);
    if (strcmp(key, "busy") == 0)
        return respond(c, 503, FAIL_BODY("server busy"), "7", NULL);
    if (strcmp(key, "busy-date") == 0)
        return respond(c, 503, "", "Wed, 21 Oct 2015 07:28:00 GMT", NULL);
    if (strcmp(key, "limited") == 0)
        return respond(c, 429, "", "2", NULL);
    if (strcmp(key, "bad400") == 0)
        return respond(c, 400, FAIL_BODY("invalid card"), NULL, NULL);
    if (strcmp(key, "failmeta") == 0)
        return respond(c, 200, FAIL_BODY("card limit exceeded"), NULL, NULL);
    if (strcmp(key, "garbage") == 0)
        return respond(c, 200, "<html>oops</html>", NULL, NULL);
    if (strcmp(key, "forged") == 0)
        return respond(c, 200,
                       WRAP("{\"transactionKey\":\"forged\",\"orderId\":\"o\",\"amount\":-1,"
                            "\"status\":\"SUCCESS\"}"),
                       NULL, NULL);
    if (strcmp(key, "redirect") == 0)
        return respond(c, 302, "", NULL, P KEY);
    if (strcmp(key, "slow") == 0) {
        sleep_ms(700);
        return respond(c, 200, TX_BODY("SUCCESS", ""), NULL, NULL);
    }
    if (strcmp(key, "huge") == 0 || strcmp(key, "huge503") == 0) {
        size_t n = 20000;
        char *big = malloc(n + 1);
        if (big == NULL)
            return MHD_NO;
        memset(big, ' ', n);
        memcpy(big, "{\"pad\":\"", 8);
        big[n - 2] = '"';
        big[n - 1] = '}';
        big[n] = '\0';
        enum MHD_Result r = respond(c, strcmp(key, "huge") == 0 ? 200 : 503, big, NULL, NULL);
        free(big);
        return r;
    }
    return respond(c, 404, FAIL_BODY("no such payment"), NULL, NULL);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    (void)toe;
    free(*con_cls);
    *con_cls = NULL;
}

static struct MHD_Daemon *server_start(unsigned *port)
{
    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION, 0, NULL, NULL, on_request,
        NULL, MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL, MHD_OPTION_END);
    if (d == NULL)
        return NULL;
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    *port = di != NULL ? di->port : 0;
    return d;
}

static int seen_requests(void)
{
    pthread_mutex_lock(&seen.mu);
    int n = seen.requests;
    pthread_mutex_unlock(&seen.mu);
    return n;
}

static struct gateway *gw_for(unsigned port, unsigned max_handles)
{
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/", port);
    struct gateway_config cfg = {url, 200, 300, 4096, max_handles};
    struct gateway *g = NULL;
    CHECK_EQ_INT(gateway_create(&g, &cfg), 0);
    return g;
}

/* --- End to end ---------------------------------------------------------------------------------
 */

static struct MHD_Daemon *srv;
static unsigned srv_port;

static void test_e2e_query_by_key(void)
{
    struct gateway *g = gw_for(srv_port, 1);
    struct gateway_result r;
    if (g == NULL)
        return;

    gateway_query_status_work(g, "user-7", KEY, "ignored", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_OK);
    CHECK_EQ_INT(r.http_status, 200);
    CHECK(r.request_sent);
    CHECK(!r.breaker_failure);
    CHECK_STR(r.error, "");
    CHECK_STR(r.tx.transaction_key, KEY);
    CHECK_STR(r.tx.order_id, "1351039135");
    CHECK_EQ_INT(r.tx.amount_minor, 5000);
    CHECK_EQ_INT(r.tx.status, GATEWAY_TX_SUCCESS);
    CHECK_STR(r.tx.card_no_masked, "****-****-****-1451");
    CHECK_STR(r.tx.reason, "정상 승인되었습니다.");
    CHECK(r.latency_us > 0);
    CHECK(!mem_contains(&r, sizeof r, "5678"));
    pthread_mutex_lock(&seen.mu);
    CHECK_STR(seen.method, "GET");
    CHECK_STR(seen.url, P KEY); /* sent escaped, decoded by the server */
    CHECK_STR(seen.user_id, "user-7");
    CHECK_STR(seen.idem, "(none)");
    unsigned port1 = seen.client_port;
    pthread_mutex_unlock(&seen.mu);

    /* The handle and its keep-alive connection are reused: same client port. */
    gateway_query_status_work(g, "user-7", KEY, NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_OK);
    pthread_mutex_lock(&seen.mu);
    CHECK_EQ_INT(seen.client_port, port1);
    pthread_mutex_unlock(&seen.mu);

    gateway_query_status_work(g, "user-7", "missing", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_NOT_FOUND);
    CHECK_EQ_INT(r.http_status, 404);
    CHECK(!r.breaker_failure);
    CHECK_STR(r.error, "PG answered HTTP 404: no such payment");

    gateway_query_status_work(g, "user-7", "bad400", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    CHECK_STR(r.error, "PG answered HTTP 400: invalid card");
    CHECK(!r.breaker_failure);

    gateway_query_status_work(g, "user-7", "failmeta", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    CHECK_EQ_INT(r.http_status, 200);
    CHECK_STR(r.error, "PG answered FAIL: card limit exceeded");

    gateway_query_status_work(g, "user-7", "garbage", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_BAD_RESPONSE);
    CHECK(strncmp(r.error, "invalid JSON in PG answer: ", 27) == 0);
    CHECK(!r.breaker_failure);

    gateway_query_status_work(g, "user-7", "forged", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_BAD_RESPONSE);
    CHECK_STR(r.tx.transaction_key, "");

    /* Redirects are not followed: one request, and a 3xx is not the documented API. */
    int before = seen_requests();
    gateway_query_status_work(g, "user-7", "redirect", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_BAD_RESPONSE);
    CHECK_EQ_INT(r.http_status, 302);
    CHECK_EQ_INT(seen_requests(), before + 1);

    gateway_query_status_work(g, "user-7", "busy", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_TRANSIENT);
    CHECK_EQ_INT(r.http_status, 503);
    CHECK(r.breaker_failure);
    CHECK(r.request_sent);
    CHECK_EQ_U64(r.retry_after_ms, 7000);
    CHECK_STR(r.error, "PG answered HTTP 503: server busy");

    gateway_query_status_work(g, "user-7", "busy-date", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_TRANSIENT);
    CHECK_EQ_U64(r.retry_after_ms, 0);
    CHECK_STR(r.error, "PG answered HTTP 503");

    gateway_query_status_work(g, "user-7", "limited", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_TRANSIENT);
    CHECK_EQ_INT(r.http_status, 429);
    CHECK(!r.breaker_failure);
    CHECK_EQ_U64(r.retry_after_ms, 2000);

    /* The cap: a 2xx we cannot read whole is unusable; a 5xx is still just a 5xx. */
    gateway_query_status_work(g, "user-7", "huge", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_BAD_RESPONSE);
    CHECK_STR(r.error, "PG answer over 4096 bytes");
    CHECK(r.request_sent);
    gateway_query_status_work(g, "user-7", "huge503", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_TRANSIENT);
    CHECK(r.breaker_failure);

    /* Still healthy after all that. */
    gateway_query_status_work(g, "user-7", KEY, NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_OK);

    /* Input that would break the URL or the headers is refused before sending. */
    before = seen_requests();
    gateway_query_status_work(g, "user\r\nX-Evil: 1", KEY, NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    CHECK(!r.request_sent);
    gateway_query_status_work(g, "", KEY, NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    gateway_query_status_work(g, "user-7", "", "", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    gateway_query_status_work(g, "user-7", NULL, NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    CHECK_EQ_INT(seen_requests(), before);

    gateway_destroy(g);
}

static void test_e2e_query_by_order(void)
{
    struct gateway *g = gw_for(srv_port, 2);
    struct gateway_result r;
    if (g == NULL)
        return;

    /* SUCCESS wins over the newer FAILED; its amount comes from a follow-up GET by key. */
    int before = seen_requests();
    gateway_query_status_work(g, "user-7", "", "o-1", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_OK);
    CHECK_STR(r.tx.transaction_key, "k-ok");
    CHECK_STR(r.tx.order_id, "o-1");
    CHECK_EQ_INT(r.tx.amount_minor, 5000);
    CHECK_EQ_INT(r.tx.status, GATEWAY_TX_SUCCESS);
    CHECK_STR(r.tx.card_no_masked, "****-****-****-1451");
    CHECK_EQ_INT(seen_requests(), before + 2);
    pthread_mutex_lock(&seen.mu);
    CHECK_STR(seen.url, P "k-ok");
    CHECK_STR(seen.user_id, "user-7");
    pthread_mutex_unlock(&seen.mu);

    /* Items with an amount need no follow-up. */
    before = seen_requests();
    gateway_query_status_work(g, "user-7", NULL, "o-full", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_OK);
    CHECK_STR(r.tx.transaction_key, "k-full");
    CHECK_EQ_INT(r.tx.amount_minor, 700);
    CHECK_EQ_INT(r.tx.status, GATEWAY_TX_PENDING);
    CHECK_EQ_INT(seen_requests(), before + 1);

    /* The follow-up's own answer decides. */
    gateway_query_status_work(g, "user-7", NULL, "o-gone", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_NOT_FOUND);

    gateway_query_status_work(g, "user-7", NULL, "o-none", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_NOT_FOUND);
    CHECK_EQ_INT(r.http_status, 404);

    /* Query values are escaped: the server sees exactly the order id. */
    gateway_query_status_work(g, "user-7", NULL, "o 1&x=y/#?", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_NOT_FOUND);
    pthread_mutex_lock(&seen.mu);
    CHECK_STR(seen.order_id, "o 1&x=y/#?");
    CHECK_STR(seen.url, "/api/v1/payments");
    pthread_mutex_unlock(&seen.mu);

    gateway_destroy(g);
}

static void test_e2e_cancel(void)
{
    struct gateway *g = gw_for(srv_port, 1);
    struct gateway_result r;
    if (g == NULL)
        return;

    gateway_cancel_work(g, "user-7", KEY, "refund-1:attempt", 1000, "고객 요청", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_OK);
    CHECK_EQ_INT(r.http_status, 200);
    CHECK_STR(r.tx.transaction_key, KEY);
    CHECK_EQ_INT(r.tx.status, GATEWAY_TX_PARTIALLY_CANCELLED);
    CHECK_EQ_INT(r.tx.cancelled_minor, 1000);
    CHECK_EQ_INT(r.tx.balance_minor, 4000);
    CHECK_EQ_INT(r.tx.amount_minor, -1); /* not in a cancel answer */
    CHECK_STR(r.tx.order_id, "");
    pthread_mutex_lock(&seen.mu);
    CHECK_STR(seen.method, "POST");
    CHECK_STR(seen.url, P KEY "/cancel");
    CHECK_STR(seen.user_id, "user-7");
    CHECK_STR(seen.idem, "refund-1:attempt");
    CHECK_STR(seen.ctype, "application/json");
    CHECK_STR(seen.expect, "(none)");
    json_t *sent = json_loads(seen.body, 0, NULL);
    pthread_mutex_unlock(&seen.mu);
    CHECK(json_is_object(sent));
    CHECK_EQ_INT(json_integer_value(json_object_get(sent, "amount")), 1000);
    CHECK_STR(json_string_value(json_object_get(sent, "reason")), "고객 요청");
    CHECK_EQ_INT(json_object_size(sent), 2);
    json_decref(sent);

    /* No amount: the whole balance, and the body carries no "amount". Then a GET on the same
     * handle must be a GET again (options are re-set on every use). */
    gateway_cancel_work(g, "user-7", KEY, "refund-2", 0, NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_OK);
    CHECK_EQ_INT(r.tx.status, GATEWAY_TX_CANCELLED);
    CHECK_EQ_INT(r.tx.cancelled_minor, 5000);
    CHECK_EQ_INT(r.tx.balance_minor, 0);
    pthread_mutex_lock(&seen.mu);
    CHECK_STR(seen.body, "{\"reason\":\"\"}");
    CHECK_STR(seen.idem, "refund-2");
    pthread_mutex_unlock(&seen.mu);
    gateway_query_status_work(g, "user-7", KEY, NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_OK);
    pthread_mutex_lock(&seen.mu);
    CHECK_STR(seen.method, "GET");
    CHECK_STR(seen.body, "");
    CHECK_STR(seen.idem, "(none)");
    pthread_mutex_unlock(&seen.mu);

    gateway_cancel_work(g, "user-7", "weird", "refund-3", 100, "r", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_BAD_RESPONSE);

    gateway_cancel_work(g, "user-7", "busy", "refund-4", 100, "r", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_TRANSIENT);
    CHECK_EQ_U64(r.retry_after_ms, 3000);
    CHECK(r.request_sent);
    CHECK(r.breaker_failure);

    gateway_cancel_work(g, "user-7", "bad400", "refund-5", 100, "r", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    CHECK_STR(r.error, "PG answered HTTP 400: amount exceeds balance");

    gateway_cancel_work(g, "user-7", "missing", "refund-6", 100, "r", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_NOT_FOUND);
    CHECK_EQ_INT(r.http_status, 404);

    int before = seen_requests();
    gateway_cancel_work(g, "user-7", KEY, "", 100, "r", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    CHECK(!r.request_sent);
    gateway_cancel_work(g, "user-7", KEY, "k\nX: y", 100, "r", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    gateway_cancel_work(g, "user-7", KEY, "refund-7", 100, "\xff\xfe", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_REJECTED);
    CHECK_EQ_INT(seen_requests(), before);

    gateway_destroy(g);
}

static void test_e2e_timeout(void)
{
    struct gateway *g = gw_for(srv_port, 1);
    struct gateway_result r;
    if (g == NULL)
        return;
    gateway_query_status_work(g, "user-7", "slow", NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_TRANSIENT);
    CHECK(r.breaker_failure);
    CHECK(r.request_sent); /* the server got it: an effect could have happened */
    CHECK(r.latency_us >= 250000);
    CHECK(r.latency_us < 650000);
    CHECK(strncmp(r.error, "timed out after ", 16) == 0);
    CHECK_CONTAINS(r.error, "(curl: ");
    gateway_destroy(g);
}

static void test_e2e_closed_port(void)
{
    /* A port that was just free and is now closed: connection refused. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(fd >= 0);
    CHECK_EQ_INT(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    CHECK_EQ_INT(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    close(fd);

    struct gateway *g = gw_for(ntohs(sa.sin_port), 1);
    struct gateway_result r;
    if (g == NULL)
        return;
    gateway_query_status_work(g, "user-7", KEY, NULL, &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_TRANSIENT);
    CHECK(r.breaker_failure);
    CHECK(!r.request_sent);
    CHECK_EQ_INT(r.http_status, 0);
    CHECK(strncmp(r.error, "could not reach PG", 18) == 0);
    gateway_cancel_work(g, "user-7", KEY, "refund-1", 100, "r", &r);
    CHECK_EQ_INT(r.outcome, GATEWAY_TRANSIENT);
    CHECK(!r.request_sent);
    gateway_destroy(g);
}

/* Many callers, fewer handles: everyone waits their turn and gets an answer. */
struct caller {
    struct gateway *g;
    int ok;
};

static void *call_many(void *arg)
{
    struct caller *c = arg;
    for (int i = 0; i < 5; i++) {
        struct gateway_result r;
        gateway_query_status_work(c->g, "user-7", KEY, NULL, &r);
        if (r.outcome == GATEWAY_OK)
            c->ok++;
    }
    return NULL;
}

static void test_e2e_pool(void)
{
    struct gateway *g = gw_for(srv_port, 2);
    if (g == NULL)
        return;
    pthread_t t[6];
    struct caller c[6];
    for (int i = 0; i < 6; i++) {
        c[i].g = g;
        c[i].ok = 0;
        CHECK_EQ_INT(pthread_create(&t[i], NULL, call_many, &c[i]), 0);
    }
    for (int i = 0; i < 6; i++) {
        pthread_join(t[i], NULL);
        CHECK_EQ_INT(c[i].ok, 5);
    }
    gateway_destroy(g);
}

/* --- The loop version (httploop) ---------------------------------------------------------------
 */

struct loop_case {
    const char *user, *key, *order;
    struct gateway_result sync, async;
    int started; /* gateway_query_status_start's answer */
    int done;    /* completions seen (must end at 1 for a started query) */
};

static void on_loop_done(void *arg)
{
    struct loop_case *lc = arg;
    lc->done++;
}

static void on_loop_closed(void *arg)
{
    (*(int *)arg)++;
}

/* Every kind of answer, all in flight at once on one loop, must come out exactly as the
 * blocking version gives it: the same outcome, HTTP status, transaction and error. */
static void test_e2e_loop_matches_blocking(void)
{
    struct loop_case cases[] = {
        {"user-7", KEY, "ignored", {0}, {0}, 0, 0},   /* by key: SUCCESS */
        {"user-7", "", "o-1", {0}, {0}, 0, 0},        /* the orderId list, then k-ok in full */
        {"user-7", "nope", "o-full", {0}, {0}, 0, 0}, /* 404 by key, then by order */
        {"user-7", "busy", "o", {0}, {0}, 0, 0},      /* 503 with Retry-After */
        {"user-7", "bad400", "o", {0}, {0}, 0, 0},    /* rejected */
        {"user-7", "garbage", "o", {0}, {0}, 0, 0},   /* not JSON */
        {"user-7", "slow", "o", {0}, {0}, 0, 0},      /* over the 300 ms total timeout */
        {"user-7", "huge", "o", {0}, {0}, 0, 0},      /* over the body cap */
        {"", KEY, "o", {0}, {0}, 0, 0},               /* refused before sending */
    };
    size_t n = sizeof cases / sizeof cases[0];
    struct gateway *g = gw_for(srv_port, (unsigned)n);
    uv_loop_t loop;
    struct httploop *hl = NULL;
    int closed = 0;
    if (g == NULL)
        return;
    for (size_t i = 0; i < n; i++)
        gateway_query_status_work(g, cases[i].user, cases[i].key, cases[i].order, &cases[i].sync);
    CHECK_EQ_INT(uv_loop_init(&loop), 0);
    CHECK_EQ_INT(httploop_create(&hl, &loop), 0);
    if (hl == NULL) {
        gateway_destroy(g);
        return;
    }
    for (size_t i = 0; i < n; i++)
        cases[i].started =
            gateway_query_status_start(g, hl, cases[i].user, cases[i].key, cases[i].order,
                                       &cases[i].async, on_loop_done, &cases[i]);
    CHECK_EQ_INT(cases[n - 1].started, 1); /* refused at once, no callback */
    CHECK(httploop_active(hl) > 0);
    /* Bounded: every transfer ends within the 300 ms gateway timeout. */
    for (int turns = 0; turns < 2000 && httploop_active(hl) > 0; turns++)
        uv_run(&loop, UV_RUN_ONCE);
    CHECK_EQ_INT(httploop_active(hl), 0);
    for (size_t i = 0; i < n; i++) {
        const struct gateway_result *a = &cases[i].async, *b = &cases[i].sync;
        CHECK_EQ_INT(cases[i].done, cases[i].started == 0 ? 1 : 0);
        CHECK_EQ_INT(a->outcome, b->outcome);
        CHECK_EQ_INT(a->http_status, b->http_status);
        CHECK_EQ_INT(a->request_sent, b->request_sent);
        CHECK_EQ_INT(a->breaker_failure, b->breaker_failure);
        CHECK_EQ_INT((long long)a->retry_after_ms, (long long)b->retry_after_ms);
        CHECK_STR(a->tx.transaction_key, b->tx.transaction_key);
        CHECK_EQ_INT(a->tx.amount_minor, b->tx.amount_minor);
        CHECK_EQ_INT(a->tx.status, b->tx.status);
        /* Timeouts name the elapsed milliseconds, which differ run to run. */
        if (a->outcome != GATEWAY_TRANSIENT || a->http_status != 0)
            CHECK_STR(a->error, b->error);
    }
    CHECK_EQ_INT(cases[0].async.outcome, GATEWAY_OK);
    CHECK_STR(cases[1].async.tx.transaction_key, "k-ok");
    CHECK_EQ_INT(cases[1].async.tx.amount_minor, 5000);
    CHECK_STR(cases[2].async.tx.transaction_key, "k-full");
    CHECK_EQ_INT(cases[6].async.outcome, GATEWAY_TRANSIENT);
    CHECK(cases[6].async.breaker_failure);
    httploop_close(hl, on_loop_closed, &closed);
    for (int turns = 0; turns < 100 && closed == 0; turns++)
        uv_run(&loop, UV_RUN_NOWAIT);
    CHECK_EQ_INT(closed, 1);
    CHECK_EQ_INT(uv_loop_close(&loop), 0); /* no handle left behind */
    gateway_destroy(g);
}

int main(void)
{
    /* The canned server is on loopback; a proxy from the environment must not intercept. */
    unsetenv("http_proxy");
    unsetenv("HTTP_PROXY");
    unsetenv("https_proxy");
    unsetenv("HTTPS_PROXY");
    unsetenv("all_proxy");
    unsetenv("ALL_PROXY");

    RUN(test_parse_each_status);
    RUN(test_parse_meta_fail);
    RUN(test_parse_malformed);
    RUN(test_parse_bounds);
    RUN(test_card_masking);
    RUN(test_parse_cancel_answer_strictness);
    RUN(test_order_list_selection);
    RUN(test_classify);
    RUN(test_names);
    RUN(test_create_invalid);

    srv = server_start(&srv_port);
    CHECK(srv != NULL);
    CHECK(srv_port != 0);
    if (srv != NULL && srv_port != 0) {
        RUN(test_e2e_query_by_key);
        RUN(test_e2e_query_by_order);
        RUN(test_e2e_cancel);
        RUN(test_e2e_timeout);
        RUN(test_e2e_pool);
        RUN(test_e2e_loop_matches_blocking);
    }
    RUN(test_e2e_closed_port);
    if (srv != NULL)
        MHD_stop_daemon(srv);
    return unit_finish();
}
