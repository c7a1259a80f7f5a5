/*
 * stock.h - stock reservations in Redis through the shipped Lua scripts (lua/stock_*.lua).
 *
 * Redis keys (ns = namespace):
 *   {ns}:stock:<sku>          STRING  units available for new reservations
 *   {ns}:resv:<order_id>      HASH    state (reserved|committed|released|out_of_stock),
 *                                     deadline_ms, created_ms, and "sku:<sku>" -> qty per item;
 *                                     after a refund's restock also "restocked:<refund id>"
 *                                     and "restocked_by" (state stays committed)
 *   {ns}:resv:deadlines       ZSET    order_id scored by deadline (ms); only while reserved
 * PostgreSQL products.stock holds units on hand; the invariant is
 *   Redis available = on hand - units of reservations in state "reserved".
 * Every key a script touches is passed in KEYS; the scripts are atomic and idempotent per
 * order, so a retried or redelivered call returns the existing state instead of acting twice.
 *
 * Threads: stock_* async functions on the loop thread (callback contract as in rconn.h: if
 * the call returns 0 the callback runs exactly once, else never); stock_sync_* in CLI
 * commands. SKUs are 1..64 bytes; qty 1..1000000.
 */
#ifndef SETTLE_STOCK_H
#define SETTLE_STOCK_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "settle/rconn.h"

#define STOCK_ITEMS_MAX 64

enum stock_result {
    STOCK_RESERVED = 0,           /* reserve: units taken, reservation created */
    STOCK_EXISTS = 1,             /* reserve: this order already has a reservation */
    STOCK_INSUFFICIENT = 2,       /* reserve: some SKU has too few units; nothing taken */
    STOCK_COMMITTED = 3,          /* commit: reserved -> committed */
    STOCK_ALREADY_COMMITTED = 4,  /* commit: was committed already (idempotent) */
    STOCK_RETAKEN = 5,            /* commit: reservation was gone; units taken again */
    STOCK_OUT_OF_STOCK = 6,       /* commit: gone and too few units; sticky for this order */
    STOCK_RELEASED = 7,           /* release: reserved -> released, units returned */
    STOCK_ALREADY_RELEASED = 8,   /* release: released or out_of_stock already */
    STOCK_NOT_RESERVED = 9,       /* release: refused, the reservation is committed */
    STOCK_MISSING = 10,           /* release, restock: no reservation for this order */
    STOCK_RESTOCKED = 11,         /* restock: committed units put back once */
    STOCK_ALREADY_RESTOCKED = 12, /* restock: this refund (or another of the order) did */
    STOCK_NOT_COMMITTED = 13,     /* restock: reservation not committed; nothing to give back */
};

const char *stock_result_name(enum stock_result r);

struct stock_items {
    unsigned n;
    const char *sku[STOCK_ITEMS_MAX];
    int32_t qty[STOCK_ITEMS_MAX];
};

typedef void (*stock_cb)(void *arg, int status, enum stock_result result);

/* Commits order_id's reservation. items are the order's items (from PostgreSQL); they are
 * used only when the reservation is gone and the units must be taken again. */
int stock_commit(struct rconn *rc, const char *ns, const char *order_id,
                 const struct stock_items *items, stock_cb cb, void *arg);

/* Releases order_id's reservation, returning its units. items must name every SKU of the
 * reservation (the script refuses otherwise, so units are never leaked). */
int stock_release(struct rconn *rc, const char *ns, const char *order_id,
                  const struct stock_items *items, stock_cb cb, void *arg);

/* Puts a refunded order's units back (lua/stock_restock.lua): each item's qty is added to
 * its stock key once per order, only when the reservation is committed (units that never
 * left the shelf are not added again), and marked with refund_id so a redelivered refund
 * answers STOCK_ALREADY_RESTOCKED. items are the order's items (1..STOCK_ITEMS_MAX, from
 * PostgreSQL); refund_id is 1..128 bytes. */
int stock_restock(struct rconn *rc, const char *ns, const char *order_id, const char *refund_id,
                  const struct stock_items *items, stock_cb cb, void *arg);

/* The reservation reaper: releases up to `limit` reservations whose deadline passed (Redis
 * time), reading each one's items from its hash. done gets the number released. */
int stock_reap(struct rconn *rc, const char *ns, unsigned limit,
               void (*done)(void *arg, int status, unsigned released), void *arg);

/* --- Synchronous (CLI) --- */
int stock_sync_reserve(struct rconn_sync *s, const char *ns, const char *order_id,
                       uint64_t deadline_ms, const struct stock_items *items,
                       enum stock_result *result, char *detail, size_t detail_len);
int stock_sync_release(struct rconn_sync *s, const char *ns, const char *order_id,
                       enum stock_result *result, char *err, size_t err_len);
/* Prints available units per SKU (one SKU when sku != NULL), as text or one JSON object. */
int stock_sync_show(struct rconn_sync *s, const char *ns, const char *sku, bool json, FILE *out);
/* Sets each SKU's available units to on_hand minus the units of active ("reserved")
 * reservations, and prints what changed. */
int stock_sync_load(struct rconn_sync *s, const char *ns, unsigned n, const char *const *skus,
                    const int64_t *on_hand, FILE *out, char *err, size_t err_len);

#endif
