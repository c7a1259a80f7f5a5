/*
 * text.h - small pure helpers for text that crosses a trust boundary (jobs, PG answers,
 * database errors, log lines): UTF-8 validation by the same rules jansson applies.
 * Thread: any; no state.
 */
#ifndef SETTLE_TEXT_H
#define SETTLE_TEXT_H

#include <stddef.h>

/* Length of the valid UTF-8 sequence at s[0..len), or 0 when the bytes there are not valid
 * UTF-8 (overlong forms, surrogates and code points above U+10FFFF are invalid). len > 0. */
size_t text_utf8_seq_len(const unsigned char *s, size_t len);

#endif
