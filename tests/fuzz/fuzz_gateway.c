/*
 * fuzz_gateway.c - libFuzzer target for the PG answer parsers (src/gateway.c): the input
 * bytes are a 2xx body as a hostile or broken payment gateway could send it.
 *
 * gateway_parse_transaction (GET /payments/{key}), gateway_parse_order_transactions
 * (GET /payments?orderId=) and gateway_parse_payment_page (the merchant's paged list, used by
 * the orphan sweep) run on every input. Besides the sanitizers' checks it asserts:
 *   - on success: the masked card number holds at most 4 digits; the GET answer's amount is
 *     > 0 and a list item's amount is > 0 or absent (-1); cancelled/balance amounts are >= 0
 *     or absent; the status is a known one; ids are 1..128 bytes without control characters;
 *     every stored text is NUL-terminated inside its array, valid UTF-8, free of control
 *     characters, and shows no run of 12+ card digits (digits, '-' and ' ');
 *   - a parsed page holds at most `size` (<= GATEWAY_PAGE_SIZE_MAX) payments, none past the
 *     last page, each with valid ids, a known status, an amount > 0 and optional numbers >= 0
 *     or absent (-1); items is NULL exactly when the page is empty;
 *   - on failure: the error code is one of those documented, the explanation is non-empty,
 *     NUL-terminated and valid UTF-8 (it ends up in a JSON DLQ entry and a log line), and the
 *     transaction is cleared.
 * Thread: libFuzzer's; no global state.
 */
#include "settle/gateway.h"
#include "settle/error.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_gateway: invariant violated at %s:%d: %s\n", __FILE__, __LINE__, \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static bool utf8_valid(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p != '\0') {
        unsigned char c = *p;
        size_t n;
        uint32_t cp;
        if (c < 0x80) {
            p++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            n = 2;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 3;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        for (size_t i = 1; i < n; i++) {
            if ((p[i] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (p[i] & 0x3f);
        }
        if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        p += n;
    }
    return true;
}

/* The longest run of digits in s where '-' and ' ' may separate them, counted in digits. */
static size_t longest_card_run(const char *s)
{
    size_t best = 0, cur = 0;
    for (; *s != '\0'; s++) {
        if (*s >= '0' && *s <= '9')
            cur++;
        else if (*s != '-' && *s != ' ')
            cur = 0;
        if (cur > best)
            best = cur;
    }
    return best;
}

static size_t count_digits(const char *s)
{
    size_t n = 0;
    for (; *s != '\0'; s++)
        n += *s >= '0' && *s <= '9';
    return n;
}

static void check_text(const char *s, size_t cap, bool card_check)
{
    size_t n = strnlen(s, cap);
    CHECK(n < cap);
    CHECK(utf8_valid(s));
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        CHECK(c >= 0x20 && c != 0x7f);
    }
    if (card_check)
        CHECK(longest_card_run(s) < 12);
}

static void check_id(const char *s, size_t cap, bool required)
{
    size_t n = strnlen(s, cap);
    CHECK(n < cap);
    if (required)
        CHECK(n >= 1);
    check_text(s, cap, false);
}

static void check_tx(const struct gateway_tx *tx, bool list_item)
{
    check_id(tx->transaction_key, sizeof tx->transaction_key, true);
    check_id(tx->order_id, sizeof tx->order_id, true);
    if (list_item)
        CHECK(tx->amount_minor == -1 || tx->amount_minor > 0);
    else
        CHECK(tx->amount_minor > 0);
    CHECK(tx->cancelled_minor >= -1);
    CHECK(tx->balance_minor >= -1);
    CHECK(tx->status >= GATEWAY_TX_PENDING && tx->status <= GATEWAY_TX_PARTIALLY_CANCELLED);
    CHECK(gateway_tx_status_name(tx->status) != NULL);
    check_text(tx->reason, sizeof tx->reason, true);
    check_text(tx->card_type, sizeof tx->card_type, true);
    check_text(tx->card_no_masked, sizeof tx->card_no_masked, true);
    CHECK(count_digits(tx->card_no_masked) <= 4);
}

static bool all_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        if (b[i] != 0)
            return false;
    }
    return true;
}

static void check_failure(int rc, const char *why, size_t cap, const struct gateway_tx *tx,
                          bool list)
{
    CHECK(rc == SETTLE_EPARSE || rc == SETTLE_EREJECTED || (list && rc == SETTLE_ENOTFOUND));
    CHECK(strnlen(why, cap) < cap);
    CHECK(why[0] != '\0');
    CHECK(utf8_valid(why));
    CHECK(all_zero(tx, sizeof *tx));
}

static void check_page(const struct gateway_page *pg)
{
    CHECK(pg->page >= 0 && pg->total_pages >= 0 && pg->total_elements >= 0);
    CHECK(pg->size >= 1 && pg->size <= GATEWAY_PAGE_SIZE_MAX);
    CHECK(pg->n <= (size_t)pg->size);
    CHECK((pg->n == 0) == (pg->items == NULL));
    if (pg->n > 0)
        CHECK(pg->page < pg->total_pages);
    for (size_t i = 0; i < pg->n; i++) {
        const struct gateway_payment *p = &pg->items[i];
        check_id(p->transaction_key, sizeof p->transaction_key, true);
        check_id(p->order_id, sizeof p->order_id, true);
        check_id(p->user_id, sizeof p->user_id, false);
        CHECK(p->status >= GATEWAY_TX_PENDING && p->status <= GATEWAY_TX_PARTIALLY_CANCELLED);
        CHECK(p->amount_minor > 0);
        CHECK(p->created_ms >= -1 && p->cancelled_minor >= -1 && p->balance_minor >= -1);
    }
}

static void check_page_failure(int rc, const char *why, size_t cap, const struct gateway_page *pg)
{
    CHECK(rc == SETTLE_EPARSE || rc == SETTLE_EREJECTED || rc == SETTLE_ENOMEM);
    CHECK(strnlen(why, cap) < cap);
    CHECK(why[0] != '\0');
    CHECK(utf8_valid(why));
    CHECK(all_zero(pg, sizeof *pg));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *body = (const char *)data;
    struct gateway_tx tx;
    char why[GATEWAY_ERROR_MAX];
    int rc;

    memset(&tx, 0xA5, sizeof tx);
    rc = gateway_parse_transaction(body, size, &tx, why, sizeof why);
    if (rc == 0)
        check_tx(&tx, false);
    else
        check_failure(rc, why, sizeof why, &tx, false);

    memset(&tx, 0xA5, sizeof tx);
    rc = gateway_parse_order_transactions(body, size, &tx, why, sizeof why);
    if (rc == 0)
        check_tx(&tx, true);
    else
        check_failure(rc, why, sizeof why, &tx, true);

    struct gateway_page page;
    memset(&page, 0xA5, sizeof page);
    rc = gateway_parse_payment_page(body, size, &page, why, sizeof why);
    if (rc == 0)
        check_page(&page);
    else
        check_page_failure(rc, why, sizeof why, &page);
    gateway_page_free(&page);
    CHECK(all_zero(&page, sizeof page));
    gateway_page_free(NULL);

    /* Short explanation buffers truncate on a UTF-8 boundary and never overflow; a NULL one
     * is allowed. */
    char small[7];
    rc = gateway_parse_transaction(body, size, &tx, small, sizeof small);
    CHECK(strnlen(small, sizeof small) < sizeof small);
    CHECK(utf8_valid(small));
    rc = gateway_parse_order_transactions(body, size, &tx, NULL, 0);
    (void)rc;

    /* The classifier is total over statuses a peer could send. */
    long status = 0;
    for (size_t i = 0; i < size && i < 4; i++)
        status = status * 256 + data[i];
    if (size >= 1 && (data[0] & 1))
        status = -status;
    enum gateway_outcome o = gateway_classify(size % 3 != 0, status);
    CHECK(gateway_outcome_name(o) != NULL);
    return 0;
}
