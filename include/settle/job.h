/*
 * job.h - decoding and validation of jobs pushed by producers, and the dead-letter envelope.
 *
 * Jobs arrive as JSON text exactly as a producer LPUSHed it. Decoding checks the size bound
 * before parsing, then types and required fields, and explains any rejection in one
 * sentence (it becomes the DLQ entry's error text with reason "invalid_job").
 * Thread: any; pure (no I/O, no global state).
 */
#ifndef SETTLE_JOB_H
#define SETTLE_JOB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JOB_ID_MAX 128     /* bytes of an id, order id, user id or transaction key */
#define JOB_REASON_MAX 256 /* bytes of a refund reason */
#define JOB_WHY_MAX 256    /* bytes of a rejection explanation */

enum job_kind {
    JOB_KIND_RECONCILE = 0,
    JOB_KIND_REFUND = 1,
};

struct job {
    enum job_kind kind;
    char id[JOB_ID_MAX + 1];              /* producer's id, "" when absent */
    char order_id[JOB_ID_MAX + 1];        /* required */
    char user_id[JOB_ID_MAX + 1];         /* required */
    char transaction_key[JOB_ID_MAX + 1]; /* reconcile: optional; refund: required */
    /* Refund only. */
    bool has_amount;
    int64_t amount_minor; /* > 0 when has_amount */
    char reason[JOB_REASON_MAX + 1];
    bool restock;
};

/* "reconcile" / "refund"; NULL for an out-of-range kind. */
const char *job_kind_name(enum job_kind kind);
/* 0 and *out set, or SETTLE_EINVAL for an unknown queue name. */
int job_kind_parse(const char *name, enum job_kind *out);

/*
 * Decodes one job of the given kind from buf[0..len). Order of checks: size (len >
 * max_bytes is rejected before any parsing), valid UTF-8 JSON, top-level object, required
 * fields present with the right types, string lengths (1..JOB_ID_MAX bytes, no control
 * characters), numbers (amount a positive integer that fits in int64). Unknown fields are
 * ignored (they stay in the stored job text). Returns 0 or SETTLE_EINVAL with a sentence
 * in why, e.g. "field \"order_id\" must be a string, got number".
 */
int job_decode(enum job_kind kind, const char *buf, size_t len, size_t max_bytes, struct job *out,
               char *why, size_t why_len);

/* What the DLQ records about a job besides the job text itself. */
struct job_dead_info {
    const char *job_id;    /* settle's internal id */
    const char *queue;     /* "reconcile" */
    const char *reason;    /* reason code, e.g. "invalid_job" */
    const char *error;     /* last error text; may be NULL */
    unsigned attempts;     /* failure attempts consumed */
    unsigned deliveries;   /* times handed to a worker */
    uint64_t enqueued_ms;  /* first seen by settle (Redis time) */
    uint64_t dead_ms;      /* now (Redis or wall time) */
    const char *worker_id; /* who buried it */
};

/*
 * Builds the DLQ envelope JSON (malloc'd, NUL-terminated, caller frees):
 * {"id","queue","reason","error","attempts","deliveries","enqueued_at_ms","dead_at_ms",
 *  "worker","job": <the job as JSON when raw is a valid UTF-8 JSON text, else null>,
 *  "job_bytes": len}. The raw bytes themselves are always kept losslessly next to the
 * envelope (see queue.h), so nothing is trimmed. Returns 0, SETTLE_ENOMEM.
 */
int job_dead_envelope(const struct job_dead_info *info, const char *raw, size_t raw_len,
                      char **out_json);

#endif
