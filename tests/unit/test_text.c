/*
 * test_text.c - unit tests of the shared text helpers (text.c): UTF-8 sequence lengths and
 * the JSON string escaping that log lines and the outcome batch's jsonb both use.
 * Thread: main only; no servers.
 */
#include "settle/text.h"

#include "unit.h"

#include <string.h>

/* Escapes the whole of s the way a caller does, replacing invalid bytes with '?'. */
static void escape_all(const char *s, size_t len, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t in_len = 0;
        size_t n = text_json_escape(s + i, len - i, out + o, &in_len);
        if (n == 0) {
            out[o] = '?';
            n = 1;
        }
        CHECK(n <= TEXT_JSON_ESC_MAX);
        CHECK(in_len >= 1);
        o += n;
        i += in_len;
    }
    out[o] = '\0';
}

static void test_json_escape(void)
{
    char out[256];
    escape_all("plain", 5, out);
    CHECK_STR(out, "plain");
    escape_all("q\"b\\", 4, out);
    CHECK_STR(out, "q\\\"b\\\\");
    escape_all("a\nb\rc\td", 7, out);
    CHECK_STR(out, "a\\nb\\rc\\td");
    escape_all("\x01\x1f\x7f", 3, out);
    CHECK_STR(out, "\\u0001\\u001f\\u007f");
    /* Valid multi-byte UTF-8 is copied; é (2 bytes) and 😀 (4 bytes). */
    escape_all("\xc3\xa9\xf0\x9f\x98\x80", 6, out);
    CHECK_STR(out, "\xc3\xa9\xf0\x9f\x98\x80");
    /* Invalid bytes: a lone continuation, an overlong form, a truncated sequence. */
    escape_all("a\x80"
               "b\xc0\xaf"
               "c\xe2\x82",
               8, out);
    CHECK_STR(out, "a?b??c??");
}

static void test_json_escape_reports_input_length(void)
{
    char out[TEXT_JSON_ESC_MAX];
    size_t in_len = 0;
    CHECK_EQ_U64(text_json_escape("\xf0\x9f\x98\x80!", 5, out, &in_len), 4);
    CHECK_EQ_U64(in_len, 4);
    CHECK_EQ_U64(text_json_escape("\xff", 1, out, &in_len), 0);
    CHECK_EQ_U64(in_len, 1);
    CHECK_EQ_U64(text_json_escape("\x1b", 1, out, &in_len), 6);
    CHECK_EQ_U64(in_len, 1);
    CHECK(memcmp(out, "\\u001b", 6) == 0);
}

static void test_utf8_seq_len(void)
{
    CHECK_EQ_U64(text_utf8_seq_len((const unsigned char *)"a", 1), 1);
    CHECK_EQ_U64(text_utf8_seq_len((const unsigned char *)"\xc3\xa9", 2), 2);
    CHECK_EQ_U64(text_utf8_seq_len((const unsigned char *)"\xed\xa0\x80", 3), 0); /* surrogate */
    CHECK_EQ_U64(text_utf8_seq_len((const unsigned char *)"\xf4\x90\x80\x80", 4), 0);
    CHECK_EQ_U64(text_utf8_seq_len((const unsigned char *)"\xc3", 1), 0);
}

int main(void)
{
    RUN(test_json_escape);
    RUN(test_json_escape_reports_input_length);
    RUN(test_utf8_seq_len);
    return unit_finish();
}
