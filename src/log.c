/*
 * log.c - structured logging: one JSON object per line, with card numbers masked.
 *
 * Thread: any. Each line is built in bounded buffers on the caller's stack (nothing is
 * allocated, so logging works when memory is short) and written with one write(2) under a
 * mutex, so lines from the loop thread and the pool threads never interleave.
 * Owns: the minimum level, the output mutex and a borrowed pointer to the output stream (the
 * caller keeps ownership of the stream and closes it, if ever).
 */
#include "settle/log.h"
#include "settle/error.h"
#include "settle/text.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* Set by log_init() before threads start and only read afterwards, as log.h documents. */
static enum log_level log_min_level = LOG_LEVEL_INFO;
static FILE *log_out; /* NULL means stdout, which is not a constant expression */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

/* Room kept for "...[truncated 18446744073709551615 bytes]" when a value has to be cut. */
#define LOG_MARKER_RESERVE 48
/* Bounds of the context values: ids are at most 128 bytes (job.h), so 256 is generous; an
 * error text can be a peer's message and gets more room, but the whole line stays bounded. */
#define LOG_ID_MAX 256
#define LOG_ERR_MAX 2048
/* The context fields and the error together never take more than half a line, so the
 * message always keeps room to be read. */
#define LOG_TAIL_MAX (LOG_LINE_MAX / 2)

struct log_line {
    char buf[LOG_LINE_MAX];
    size_t len;
};

void log_init(enum log_level min_level, FILE *out)
{
    log_min_level = min_level;
    log_out = out;
}

int log_level_parse(const char *s, enum log_level *out)
{
    static const struct {
        const char *name;
        enum log_level level;
    } names[] = {
        {"debug", LOG_LEVEL_DEBUG},
        {"info", LOG_LEVEL_INFO},
        {"warn", LOG_LEVEL_WARN},
        {"error", LOG_LEVEL_ERROR},
    };

    if (s == NULL)
        return SETTLE_EINVAL;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].level;
            return 0;
        }
    }
    return SETTLE_EINVAL;
}

const char *log_level_name(enum log_level level)
{
    switch (level) {
    case LOG_LEVEL_DEBUG:
        return "debug";
    case LOG_LEVEL_INFO:
        return "info";
    case LOG_LEVEL_WARN:
        return "warn";
    case LOG_LEVEL_ERROR:
        return "error";
    }
    return "unknown";
}

int log_enabled(enum log_level level)
{
    return level >= log_min_level;
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Replaces every digit of s[start..end) but the last four with '*'. */
static size_t mask_run(char *s, size_t start, size_t end, size_t digits)
{
    size_t to_mask = digits - 4;
    size_t masked = 0;

    for (size_t i = start; i < end && masked < to_mask; i++) {
        if (is_digit(s[i])) {
            s[i] = '*';
            masked++;
        }
    }
    return masked;
}

/*
 * Card numbers (ISO/IEC 7812 PANs) have 13 to 19 digits. A run here is a maximal sequence of
 * digits in which single spaces or hyphens may join groups ("4111 1111 1111 1111").
 * - 13 to 19 digits: a possible card; all digits but the last four are masked.
 * - more than 19 digits without any separator: left alone. No card number is that long, and
 *   such runs are ids, hashes and amounts-with-timestamps we want to read in the logs.
 * - more than 19 digits joined by separators: this may be a card next to other numbers
 *   ("4111 1111 1111 1111 2024", a card and a year) and we cannot tell where the card starts,
 *   so every digit but the last four of the whole run is masked.
 * The Luhn check is deliberately not applied: masking a number that is not a card costs a
 * little readability, while leaking a mistyped card number costs PCI compliance. The price is
 * that 13-digit numbers such as epoch milliseconds are masked too when they appear in text.
 */
size_t log_mask_cards(char *s, size_t len)
{
    size_t masked = 0;
    size_t i = 0;

    while (i < len) {
        if (!is_digit(s[i])) {
            i++;
            continue;
        }
        size_t start = i;
        size_t j = i;
        size_t digits = 0;
        int grouped = 0;
        for (;;) {
            while (j < len && is_digit(s[j])) {
                j++;
                digits++;
            }
            if (j + 1 < len && (s[j] == ' ' || s[j] == '-') && is_digit(s[j + 1])) {
                j++;
                grouped = 1;
                continue;
            }
            break;
        }
        if ((digits >= 13 && digits <= 19) || (digits > 19 && grouped))
            masked += mask_run(s, start, j, digits);
        i = j;
    }
    return masked;
}

static void line_put(struct log_line *l, const char *s, size_t n)
{
    /* Callers reserve room before they write; this guard only keeps a mistake from
     * overrunning the buffer. */
    if (n > sizeof(l->buf) - l->len)
        n = sizeof(l->buf) - l->len;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static void line_puts(struct log_line *l, const char *s)
{
    line_put(l, s, strlen(s));
}

/*
 * Appends s[0..len) as the inside of a JSON string, never letting l->len pass limit. Stops
 * before a character whose escaped form would not fit, and returns the input bytes consumed.
 * Invalid UTF-8 becomes U+FFFD so that every line stays valid JSON for log shippers.
 */
static size_t escape_into(struct log_line *l, size_t limit, const char *s, size_t len)
{
    size_t i = 0;

    while (i < len) {
        char esc[TEXT_JSON_ESC_MAX];
        size_t in_len;
        size_t esc_len = text_json_escape(s + i, len - i, esc, &in_len);
        if (esc_len == 0) {
            memcpy(esc, "\\ufffd", 6);
            esc_len = 6;
        }
        if (l->len + esc_len > limit)
            break;
        line_put(l, esc, esc_len);
        i += in_len;
    }
    return i;
}

/*
 * Appends "s" as a JSON string value ending at or before limit. s[0..kept) is the already
 * masked text and full_len the length of the original value; when not all of it fits, the
 * value ends with a visible "...[truncated N bytes]" marker.
 */
static void put_json_string(struct log_line *l, size_t limit, const char *s, size_t kept,
                            size_t full_len)
{
    size_t start = l->len;
    size_t consumed;
    char marker[LOG_MARKER_RESERVE];

    line_puts(l, "\"");
    if (kept == full_len) {
        consumed = escape_into(l, limit - 1, s, kept);
        if (consumed == kept) {
            line_puts(l, "\"");
            return;
        }
        l->len = start + 1;
    }
    consumed = escape_into(l, limit - 1 - LOG_MARKER_RESERVE, s, kept);
    int n = snprintf(marker, sizeof(marker), "...[truncated %zu bytes]", full_len - consumed);
    if (n > 0)
        line_put(l, marker, (size_t)n < sizeof(marker) ? (size_t)n : sizeof(marker) - 1);
    line_puts(l, "\"");
}

/*
 * When a value is cut, its last bytes may be the first digits of a card number whose rest was
 * cut off; masking cannot recognise such a stub, so the trailing run of digits and separators
 * is dropped (and counted as truncated) rather than shown.
 */
static size_t drop_partial_number(const char *s, size_t kept)
{
    while (kept > 0 && (is_digit(s[kept - 1]) || s[kept - 1] == ' ' || s[kept - 1] == '-'))
        kept--;
    return kept;
}

/* Copies at most cap bytes of s into buf and masks cards in the copy; returns the bytes kept
 * and sets *full_len to the length of s. */
static size_t prepare_value(const char *s, char *buf, size_t cap, size_t *full_len)
{
    size_t n = strlen(s);
    size_t kept = n < cap ? n : cap;

    memcpy(buf, s, kept);
    if (kept < n)
        kept = drop_partial_number(buf, kept);
    log_mask_cards(buf, kept);
    *full_len = n;
    return kept;
}

static void put_field(struct log_line *l, size_t limit, const char *key, const char *value,
                      size_t cap)
{
    char buf[LOG_ERR_MAX];
    size_t full_len;
    size_t kept;

    if (value == NULL)
        return;
    if (cap > sizeof(buf))
        cap = sizeof(buf);
    /* The key, its quotes, the colon, the value's quotes and the marker must all fit; when
     * they do not, the field is left out rather than written as broken JSON. */
    if (l->len + strlen(key) + 6 + LOG_MARKER_RESERVE > limit)
        return;
    kept = prepare_value(value, buf, cap, &full_len);
    line_puts(l, ",\"");
    line_puts(l, key);
    line_puts(l, "\":");
    put_json_string(l, limit, buf, kept, full_len);
}

static void format_ts(char *out, size_t out_len)
{
    struct timespec ts;
    struct tm tm;
    char date[32];

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    if (strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S", &tm) == 0)
        date[0] = '\0';
    snprintf(out, out_len, "%s.%03ldZ", date, (long)(ts.tv_nsec / 1000000));
}

static void write_line(const char *p, size_t n)
{
    FILE *out = log_out != NULL ? log_out : stdout;

    pthread_mutex_lock(&log_lock);
    int fd = fileno(out);
    if (fd >= 0) {
        /* Anything another part of the process left in the stream's buffer goes first, then
         * the line goes out in one write(2) so that it cannot be split by stdio buffering. */
        fflush(out);
        while (n > 0) {
            ssize_t w = write(fd, p, n);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                break; /* nowhere left to report a failing log stream */
            }
            p += w;
            n -= (size_t)w;
        }
    } else {
        /* Memory streams have no descriptor. */
        fwrite(p, 1, n, out);
        fflush(out);
    }
    pthread_mutex_unlock(&log_lock);
}

void log_write(enum log_level level, const struct log_ctx *ctx, const char *err, const char *fmt,
               ...)
{
    /* Logging must not change errno under a caller that is about to report it. */
    int saved_errno = errno;
    struct log_line line;
    struct log_line tail;
    char msg[LOG_LINE_MAX];
    char ts[48];
    va_list ap;

    if (!log_enabled(level))
        return;

    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    size_t full_len;
    size_t kept;
    if (n < 0) {
        static const char bad[] = "(unformattable log message)";
        memcpy(msg, bad, sizeof(bad));
        full_len = kept = sizeof(bad) - 1;
    } else {
        full_len = (size_t)n;
        kept = full_len < sizeof(msg) ? full_len : sizeof(msg) - 1;
        if (kept < full_len)
            kept = drop_partial_number(msg, kept);
    }
    log_mask_cards(msg, kept);

    /* The context goes into its own bounded buffer first so we know how much room the
     * message may take. */
    tail.len = 0;
    if (ctx != NULL) {
        put_field(&tail, LOG_TAIL_MAX, "job_id", ctx->job_id, LOG_ID_MAX);
        put_field(&tail, LOG_TAIL_MAX, "queue", ctx->queue, LOG_ID_MAX);
        put_field(&tail, LOG_TAIL_MAX, "order_id", ctx->order_id, LOG_ID_MAX);
        if (ctx->attempt >= 0 && tail.len + 32 <= LOG_TAIL_MAX) {
            char num[32];
            int k = snprintf(num, sizeof(num), ",\"attempt\":%d", ctx->attempt);
            if (k > 0 && (size_t)k < sizeof(num))
                line_put(&tail, num, (size_t)k);
        }
    }
    put_field(&tail, LOG_TAIL_MAX, "error", err, LOG_ERR_MAX);

    format_ts(ts, sizeof(ts));
    line.len = 0;
    line_puts(&line, "{\"ts\":\"");
    line_puts(&line, ts);
    line_puts(&line, "\",\"level\":\"");
    line_puts(&line, log_level_name(level));
    line_puts(&line, "\",\"msg\":");
    /* Two bytes for the closing "}\n". */
    put_json_string(&line, sizeof(line.buf) - 2 - tail.len, msg, kept, full_len);
    line_put(&line, tail.buf, tail.len);
    line_puts(&line, "}\n");

    write_line(line.buf, line.len);
    errno = saved_errno;
}
