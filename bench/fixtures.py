"""fixtures.py - the data a benchmark run works on, prepared in bulk.

For N reconcile jobs: products with ample stock, N PENDING orders with their items and a
PENDING payments row (transaction key known), one reservation per order in Redis (made with
the shipped lua/stock_reserve.lua, so the hash is exactly what settle expects), and the
payment as SUCCESS at the PG simulator (one admin batch call per 5000). For N refund jobs:
COMPLETED orders whose payment is SUCCESS in PostgreSQL and at the simulator.

Everything is set-based (INSERT ... SELECT generate_series, pipelined EVALSHA, batched admin
calls), so 20 000 jobs take a few seconds to prepare. After the data is in, ANALYZE gives the
planner real statistics and CHECKPOINT flushes the preparation's WAL, so neither autovacuum nor
a checkpoint caused by the preparation lands inside the measured window.
"""

import json
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = "settle"
HOLD_KEY = "{settle}:bench:hold"
SKUS_DEFAULT = 1000
STOCK_UNITS = 1_000_000_000
PRICE_MINOR = 100
PGSIM_BATCH = 5000
REDIS_CHUNK = 1000


def key(suffix):
    return f"{{{NS}}}:{suffix}"


def lua_text(name):
    with open(os.path.join(REPO, "lua", name + ".lua"), "rb") as f:
        return f.read()


def _products(c, skus):
    c.sql("INSERT INTO products (sku, name, price_minor, stock) "
          "SELECT 'sku-' || s, 'bench', %s, %s FROM generate_series(0, %s - 1) s "
          "ON CONFLICT (sku) DO NOTHING", (PRICE_MINOR, STOCK_UNITS, skus))
    r = c.redis
    pipe = r.pipeline(transaction=False)
    for s in range(skus):
        pipe.set(key(f"stock:sku-{s}"), STOCK_UNITS)
    pipe.execute()


def _pgsim_success(c, rows):
    """rows: (transaction_key, order_id, user_id, amount). Created SUCCESS at the simulator."""
    for i in range(0, len(rows), PGSIM_BATCH):
        batch = [{"transactionKey": k, "orderId": o, "userId": u, "amount": a,
                  "status": "SUCCESS"} for (k, o, u, a) in rows[i:i + PGSIM_BATCH]]
        c._admin("POST", "/transactions/batch", {"transactions": batch})


def _finish_sql(c):
    c.sql("ANALYZE")
    c.sql("CHECKPOINT")


def ids(tag, n):
    """(order_id, user_id, transaction_key) of job i, the same in SQL and in Python."""
    return [(f"o{tag}-{i:07d}", f"u{i % 997}", f"tx{tag}-{i:07d}") for i in range(1, n + 1)]


def prep_reconcile(c, n, tag, items=1, skus=SKUS_DEFAULT, pad_bytes=0, reserve=True):
    """N PENDING orders of `items` items each (distinct SKUs out of `skus`), reserved in
    Redis, paid (SUCCESS) at the simulator. Returns the N job texts (reconcile queue);
    pad_bytes adds an unknown field of that many bytes to each job (settle keeps it)."""
    t0 = time.monotonic()
    items = max(1, min(items, 64, skus))
    _products(c, skus)
    amount = PRICE_MINOR * items
    c.sql("INSERT INTO orders (id, user_id, status, amount_minor) "
          "SELECT 'o' || %s || '-' || lpad(i::text, 7, '0'), 'u' || (i %% 997), 'PENDING', %s "
          "FROM generate_series(1, %s) i", (tag, amount, n))
    c.sql("INSERT INTO order_items (order_id, sku, qty) "
          "SELECT 'o' || %s || '-' || lpad(i::text, 7, '0'), "
          "'sku-' || ((i * %s + j) %% %s), 1 "
          "FROM generate_series(1, %s) i, generate_series(0, %s - 1) j",
          (tag, items, skus, n, items))
    c.sql("INSERT INTO payments (order_id, transaction_key, user_id, amount_minor, status) "
          "SELECT 'o' || %s || '-' || lpad(i::text, 7, '0'), "
          "'tx' || %s || '-' || lpad(i::text, 7, '0'), 'u' || (i %% 997), %s, 'PENDING' "
          "FROM generate_series(1, %s) i", (tag, tag, amount, n))
    rows = ids(tag, n)
    _pgsim_success(c, [(k, o, u, amount) for (o, u, k) in rows])
    if reserve:
        r = c.redis
        sha = r.script_load(lua_text("stock_reserve"))
        now_ms = int(time.time() * 1000)
        deadline = now_ms + 3600 * 1000
        for s in range(0, n, REDIS_CHUNK):
            pipe = r.pipeline(transaction=False)
            for i in range(s, min(n, s + REDIS_CHUNK)):
                o = rows[i][0]
                ix = i + 1
                sku_list = [f"sku-{(ix * items + j) % skus}" for j in range(items)]
                keys = [key(f"resv:{o}"), key("resv:deadlines")] + \
                    [key(f"stock:{k}") for k in sku_list]
                argv = [o, deadline, now_ms]
                for k in sku_list:
                    argv += [k, 1]
                pipe.evalsha(sha, len(keys), *keys, *argv)
            for res in pipe.execute():
                if not (isinstance(res, list) and res and res[0] == b"reserved"):
                    raise RuntimeError(f"stock_reserve answered {res!r}")
    _finish_sql(c)
    pad = "x" * pad_bytes if pad_bytes else None
    jobs = []
    for (o, u, k) in rows:
        j = {"order_id": o, "user_id": u, "transaction_key": k}
        if pad:
            j["bench_pad"] = pad
        jobs.append(json.dumps(j, separators=(",", ":")))
    return jobs, time.monotonic() - t0


def prep_refunds(c, n, tag, skus=SKUS_DEFAULT):
    """N COMPLETED orders with a SUCCESS payment (PostgreSQL and simulator). Returns the N
    refund job texts: full refunds, no restock."""
    t0 = time.monotonic()
    _products(c, skus)
    c.sql("INSERT INTO orders (id, user_id, status, amount_minor, completed_at) "
          "SELECT 'o' || %s || '-' || lpad(i::text, 7, '0'), 'u' || (i %% 997), 'COMPLETED', "
          "%s, now() FROM generate_series(1, %s) i", (tag, PRICE_MINOR, n))
    c.sql("INSERT INTO order_items (order_id, sku, qty) "
          "SELECT 'o' || %s || '-' || lpad(i::text, 7, '0'), 'sku-' || (i %% %s), 1 "
          "FROM generate_series(1, %s) i", (tag, skus, n))
    c.sql("INSERT INTO payments (order_id, transaction_key, user_id, amount_minor, status) "
          "SELECT 'o' || %s || '-' || lpad(i::text, 7, '0'), "
          "'tx' || %s || '-' || lpad(i::text, 7, '0'), 'u' || (i %% 997), %s, 'SUCCESS' "
          "FROM generate_series(1, %s) i", (tag, tag, PRICE_MINOR, n))
    rows = ids(tag, n)
    _pgsim_success(c, [(k, o, u, PRICE_MINOR) for (o, u, k) in rows])
    _finish_sql(c)
    jobs = [json.dumps({"order_id": o, "user_id": u, "transaction_key": k, "reason": "bench"},
                       separators=(",", ":")) for (o, u, k) in rows]
    return jobs, time.monotonic() - t0


def push(c, queue, jobs, hold=True):
    """LPUSHes the jobs onto the queue's ready list (jobs[0] is claimed first); with hold the
    list is then renamed away so no worker sees it until release()."""
    r = c.redis
    qkey = key(f"queue:{queue}")
    r.delete(HOLD_KEY)
    for s in range(0, len(jobs), REDIS_CHUNK):
        r.lpush(qkey, *jobs[s:s + REDIS_CHUNK])
    if hold:
        r.rename(qkey, HOLD_KEY)


def release(c, queue):
    """Renames the held list back: a worker blocked on BLMOVE on the queue wakes up."""
    c.redis.rename(HOLD_KEY, key(f"queue:{queue}"))
