/*
 * error.h - the project's error codes.
 *
 * Every fallible function in settle returns an int: 0 on success or one of these negative
 * codes. Each module maps its dependency's errors (CURLcode + HTTP status, SQLSTATE, hiredis
 * errors) to these codes at its boundary, so no dependency type leaks through a header.
 * Thread: any (pure).
 */
#ifndef SETTLE_ERROR_H
#define SETTLE_ERROR_H

enum settle_err {
    SETTLE_OK = 0,
    SETTLE_ENOMEM = -1,        /* allocation failed */
    SETTLE_EINVAL = -2,        /* invalid argument, input or configuration */
    SETTLE_ETOOBIG = -3,       /* input over a configured bound */
    SETTLE_EPARSE = -4,        /* malformed data from a peer */
    SETTLE_EIO = -5,           /* connection or transport failure (transient) */
    SETTLE_ETIMEDOUT = -6,     /* a deadline passed (transient) */
    SETTLE_ENOTFOUND = -7,     /* the thing asked for does not exist */
    SETTLE_ECONFLICT = -8,     /* a state check refused the change */
    SETTLE_ESTALE = -9,        /* lease lost: a newer delivery owns the job (fencing) */
    SETTLE_EREJECTED = -10,    /* a peer refused the request for good */
    SETTLE_EUNAVAILABLE = -11, /* a dependency is unreachable or overloaded (transient) */
    SETTLE_ESHUTDOWN = -12,    /* the process is shutting down */
    SETTLE_EFULL = -13,        /* a bounded buffer or queue is full */
    SETTLE_EINTERNAL = -14,    /* a bug or an impossible state */
};

/* A static, human-readable description of an error code; never NULL. */
const char *settle_strerror(int err);

#endif
