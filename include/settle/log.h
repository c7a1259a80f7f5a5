/*
 * log.h - structured logging: one JSON object per line.
 *
 * Every line has "ts" (RFC 3339 UTC with milliseconds), "level", "msg", and, when given,
 * "job_id", "queue", "order_id", "attempt", "error". Card numbers never reach the output:
 * every string field passes through log_mask_cards() before it is written.
 * Thread: any. A line is formatted into a bounded local buffer (LOG_LINE_MAX bytes; a longer
 * message is cut with a visible "...[truncated N bytes]" marker, never silently) and written
 * with one write under a lock, so lines from the loop and pool threads never interleave.
 */
#ifndef SETTLE_LOG_H
#define SETTLE_LOG_H

#include <stddef.h>
#include <stdio.h>

#define LOG_LINE_MAX 8192

enum log_level {
    LOG_LEVEL_DEBUG = 0,
    LOG_LEVEL_INFO = 1,
    LOG_LEVEL_WARN = 2,
    LOG_LEVEL_ERROR = 3,
};

/* Context fields of a line; any pointer may be NULL and attempt < 0 means "absent". */
struct log_ctx {
    const char *job_id;
    const char *queue;
    const char *order_id;
    int attempt;
};

/* Sets the minimum level and the output stream (stdout when out is NULL). Call before threads
 * start; later calls are allowed but not synchronised with writers. */
void log_init(enum log_level min_level, FILE *out);

/* Parses "debug" | "info" | "warn" | "error" (case-insensitive). 0 or SETTLE_EINVAL. */
int log_level_parse(const char *s, enum log_level *out);
const char *log_level_name(enum log_level level);
int log_enabled(enum log_level level);

/* Writes one line. ctx and err may be NULL. */
void log_write(enum log_level level, const struct log_ctx *ctx, const char *err, const char *fmt,
               ...) __attribute__((format(printf, 4, 5)));

#define log_debug(...) log_write(LOG_LEVEL_DEBUG, NULL, NULL, __VA_ARGS__)
#define log_info(...) log_write(LOG_LEVEL_INFO, NULL, NULL, __VA_ARGS__)
#define log_warn(...) log_write(LOG_LEVEL_WARN, NULL, NULL, __VA_ARGS__)
#define log_error(...) log_write(LOG_LEVEL_ERROR, NULL, NULL, __VA_ARGS__)

/*
 * Masks card numbers in s[0..len) in place: every run of 13 to 19 digits, optionally grouped
 * by single spaces or hyphens (as in "1234-5678-9012-3456"), has all digits but the last four
 * replaced by '*'. Returns the number of digits masked. Pure.
 */
size_t log_mask_cards(char *s, size_t len);

#endif
