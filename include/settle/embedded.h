/*
 * embedded.h - Lua scripts and SQL migrations compiled into the binary.
 *
 * The build (CMakeLists.txt) turns lua/<name>.lua into embedded_lua[] (with the SHA1 Redis
 * computes for EVALSHA) and ops/sql/<file>.sql into embedded_sql[] (sorted by file name,
 * which starts with the migration version). Both arrays end with an all-zero row.
 * Thread: any (read-only data).
 */
#ifndef SETTLE_EMBEDDED_H
#define SETTLE_EMBEDDED_H

#include <stddef.h>

struct embedded_file {
    const char *name;  /* "claim" for lua/claim.lua; "001_init.sql" for ops/sql/001_init.sql */
    const char *data;  /* NUL-terminated contents */
    size_t size_bytes; /* length without the terminating NUL */
    const char *sha1;  /* 40 lowercase hex digits */
};

extern const struct embedded_file embedded_lua[];
extern const struct embedded_file embedded_sql[];

/* The Lua script called `name`; aborts if there is none (a build error, not an input error). */
const struct embedded_file *embedded_lua_get(const char *name);

#endif
