/*
 * error.c - descriptions of the project's error codes, and the lookup of embedded scripts.
 * Thread: any; no state.
 */
#include "settle/error.h"
#include "settle/embedded.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *settle_strerror(int err)
{
    switch (err) {
    case SETTLE_OK:
        return "ok";
    case SETTLE_ENOMEM:
        return "out of memory";
    case SETTLE_EINVAL:
        return "invalid input";
    case SETTLE_ETOOBIG:
        return "input too big";
    case SETTLE_EPARSE:
        return "malformed data";
    case SETTLE_EIO:
        return "connection or transport failure";
    case SETTLE_ETIMEDOUT:
        return "timed out";
    case SETTLE_ENOTFOUND:
        return "not found";
    case SETTLE_ECONFLICT:
        return "state conflict";
    case SETTLE_ESTALE:
        return "lease lost to a newer delivery";
    case SETTLE_EREJECTED:
        return "rejected by peer";
    case SETTLE_EUNAVAILABLE:
        return "dependency unavailable";
    case SETTLE_ESHUTDOWN:
        return "shutting down";
    case SETTLE_EFULL:
        return "bounded buffer full";
    case SETTLE_EINTERNAL:
        return "internal error";
    default:
        return "unknown error";
    }
}

const struct embedded_file *embedded_lua_get(const char *name)
{
    for (const struct embedded_file *f = embedded_lua; f->name != NULL; f++) {
        if (strcmp(f->name, name) == 0)
            return f;
    }
    fprintf(stderr, "%s:%d: no embedded Lua script named '%s'\n", __FILE__, __LINE__, name);
    abort();
}
