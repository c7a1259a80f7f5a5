/*
 * text.h - small pure helpers for text that crosses a trust boundary (jobs, PG answers,
 * database errors, log lines): UTF-8 validation by the same rules jansson applies, and JSON
 * string escaping.
 * Thread: any; no state.
 */
#ifndef SETTLE_TEXT_H
#define SETTLE_TEXT_H

#include <stddef.h>

/* Length of the valid UTF-8 sequence at s[0..len), or 0 when the bytes there are not valid
 * UTF-8 (overlong forms, surrogates and code points above U+10FFFF are invalid). len > 0. */
size_t text_utf8_seq_len(const unsigned char *s, size_t len);

/* Room text_json_escape may need for one character. */
#define TEXT_JSON_ESC_MAX 6

/*
 * Writes the character at s[0..len) as it goes inside a JSON string to out (at least
 * TEXT_JSON_ESC_MAX bytes, not NUL-terminated) and returns how many bytes it wrote; *in_len
 * says how many input bytes it took. '"' and '\' are escaped, as are control characters and
 * DEL (\n, \r, \t or \u00XX); valid UTF-8 is copied. Returns 0 (with *in_len = 1) for a
 * byte that is not valid UTF-8: the caller writes its own replacement. len > 0.
 */
size_t text_json_escape(const char *s, size_t len, char *out, size_t *in_len);

#endif
