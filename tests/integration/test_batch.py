"""test_batch.py - PostgreSQL batching (SETTLE_DB_BATCH) end to end: many reconcile jobs whose
orders are read in shared read transactions and whose outcomes are written in shared
transactions, one savepoint per job. What a user must see is exactly what one job per
transaction gives: every order in its right state, stock taken once, one job_log row per job,
and a job the database refuses (CHECK stock >= 0) dead-lettered alone while the rest of its
batch commits. The settle_db_batch_jobs histogram shows whether batches really formed."""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

Q = "reconcile"
N_OK, N_FAILED, N_DONE = 30, 5, 3
# A producer id that needs JSON escaping on its way into the batch's jsonb, and non-ASCII.
ODD_ID = 'p-"quoted"\\back\u00e9\U0001F600'


def scrape_histogram(w, name, **labels):
    """{le: cumulative count} and the _count of one histogram series, from /metrics."""
    body = harness.http("GET", f"http://{w.metrics_addr}/metrics", timeout=5).body.decode()
    want = {f'{k}="{v}"' for k, v in labels.items()}
    buckets, count = {}, None
    for line in body.splitlines():
        m = re.match(r'^(\w+)\{(.*)\} (\S+)$', line)
        if not m:
            continue
        parts = set(re.findall(r'\w+="[^"]*"', m.group(2)))
        if not want <= parts:
            continue
        if m.group(1) == name + "_bucket":
            le = re.search(r'le="([^"]*)"', m.group(2)).group(1)
            buckets[le] = float(m.group(3))
        elif m.group(1) == name + "_count":
            count = float(m.group(3))
    return buckets, count


def prepare(c):
    """Orders of every kind pushed as jobs before the worker starts, so they are claimed,
    loaded and stored together. Returns {order_id: expected (status, job_log result)}."""
    c.add_product("sku-m", 1000)
    c.add_product("sku-low", 5)
    expect, jobs, reserve = {}, [], {}

    def job(oid, status, **tx):
        key = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id=oid, amount=1000,
                                            status=status, **tx))
        jobs.append({"order_id": oid, "user_id": "u1", "transaction_key": key})

    for i in range(N_OK):
        oid = f"ok-{i:02d}"
        c.add_order(oid, "u1", 1000, {"sku-m": 1})
        job(oid, "SUCCESS")
        expect[oid] = ("COMPLETED", "completed")
        reserve[oid] = {"sku-m": 1}
    for i in range(N_FAILED):
        oid = f"fl-{i:02d}"
        c.add_order(oid, "u1", 1000, {"sku-m": 2})
        job(oid, "FAILED", reason="LIMIT_EXCEEDED")
        expect[oid] = ("FAILED", "failed")
        reserve[oid] = {"sku-m": 2}
    for i in range(N_DONE):
        # A callback handler finished these first: respected, logged as skipped.
        oid = f"done-{i:02d}"
        c.add_order(oid, "u1", 1000, {"sku-m": 1}, status="COMPLETED")
        job(oid, "SUCCESS")
        expect[oid] = ("COMPLETED", "skipped")
    c.add_order("bad-00", "u1", 1000, {"sku-low": 1, "sku-m": 1})
    job("bad-00", "SUCCESS")
    expect["bad-00"] = ("PENDING", "store_rejected")
    reserve["bad-00"] = {"sku-low": 1, "sku-m": 1}
    c.stock_load()
    for oid, items in reserve.items():
        r = c.reserve(oid, items)
        assert r.returncode == 0, r.stdout + r.stderr
    # PostgreSQL now holds fewer sku-low units than Redis promised: completing bad-00 breaks
    # CHECK (stock >= 0), which must refuse that one job and nothing else.
    c.sql("UPDATE products SET stock = 0 WHERE sku = 'sku-low'")
    jobs[0]["id"] = ODD_ID
    for j in jobs:
        c.push_job(Q, j)
    return expect


def run(c, batch, **env_extra):
    expect = prepare(c)
    env = c.env_for_worker(SETTLE_DB_BATCH=str(batch), SETTLE_DB_POOL_SIZE="2",
                           SETTLE_DB_BATCH_CONCURRENCY="1",
                           SETTLE_CONCURRENCY="64", SETTLE_CLAIM_BATCH="64", **env_extra)
    w = c.start_worker(env)

    def finished():
        d = c.queue_depths(Q)
        return d["ready"] + d["delayed"] + d["inflight"] == 0 and d["dead"] == 1
    harness.wait_until(finished, 30, what=f"all jobs finished, one dead: {c.queue_depths(Q)}")

    statuses = dict(c.sql("SELECT id, status FROM orders"))
    assert [r["producer_id"] for r in c.job_log("ok-00")] == [ODD_ID], c.job_log("ok-00")
    logs = {}
    for r in c.job_log():
        logs.setdefault(r["order_id"], []).append((r["outcome"], r["result"]))
    for oid, (status, result) in expect.items():
        assert statuses[oid] == status, (oid, statuses[oid], status)
        outcome = "dead" if result == "store_rejected" else "done"
        assert logs.get(oid) == [(outcome, result)], (oid, logs.get(oid))
    # Stock taken exactly once per completed order: 30 x 1; the failed ones took none, the
    # refused one rolled back alone, the callback-completed ones were never touched.
    assert c.product_stock("sku-m") == 1000 - N_OK, c.product_stock("sku-m")
    assert c.product_stock("sku-low") == 0
    payments = dict(c.sql("SELECT order_id, status FROM payments"))
    assert all(payments.get(f"ok-{i:02d}") == "SUCCESS" for i in range(N_OK)), payments
    assert all(payments.get(f"fl-{i:02d}") == "FAILED" for i in range(N_FAILED)), payments
    assert "bad-00" not in payments, payments
    dead = c.dlq_entries()
    assert len(dead) == 1 and dead[0]["reason"] == "store_rejected", dead
    assert "23514" in dead[0]["error"], dead[0]
    assert w.alive()
    return w, len(expect)


def test_batches_apply_each_job_as_one_transaction_would(c):
    w, n_jobs = run(c, 32)
    buckets, count = scrape_histogram(w, "settle_db_batch_jobs", step="load")
    # One batch in flight per kind: the first job is read alone, the rest wait for it
    # and go together, at most 32 at a time.
    assert count is not None and count < n_jobs, (buckets, count)
    assert buckets["1"] < count, f"no load batch held more than one job: {buckets}"
    buckets, count = scrape_histogram(w, "settle_db_batch_jobs", step="store")
    assert count is not None and buckets["1"] < count, f"no multi-job store batch: {buckets}"
    assert buckets["64"] == count and buckets["32"] == count, buckets
    assert not w.bad_log_lines(), w.bad_log_lines()[:3]


def test_batch_of_one_is_one_job_per_transaction(c):
    w, n_jobs = run(c, 1)
    buckets, count = scrape_histogram(w, "settle_db_batch_jobs", step="load")
    assert count == n_jobs and buckets["1"] == count, (buckets, count)
    buckets, count = scrape_histogram(w, "settle_db_batch_jobs", step="store")
    # Every job is stored once, the refused one twice (its dead row after the refusal).
    assert count == n_jobs + 1 and buckets["1"] == count, (buckets, count)


# How PostgreSQL logs the order load sent as an unnamed statement.
UNNAMED_LOAD = r"(parse|execute) <unnamed>: SELECT \* FROM settle_load_orders"


def pg_log_since(c, start):
    """PostgreSQL's log past byte start."""
    with open(c.log_path("pg.log"), "rb") as f:
        f.seek(start)
        return f.read().decode("utf-8", "replace")


def pg_log_statements(c, start, kind, name):
    """How many statements named name PostgreSQL logged at step kind (parse, execute) past
    byte start of its log (log_min_duration_statement = 0 logs every step with its name;
    an unnamed statement's name is <unnamed>)."""
    return len(re.findall(rf"duration: [0-9.]+ ms  {kind} {re.escape(name)}:",
                          pg_log_since(c, start)))


def test_prepared_statements_are_prepared_once_per_connection(c):
    """SETTLE_DB_PREPARED=on: the same outcomes as the default, every batch statement sent by
    name (parsed once per connection, executed per batch), and a connection PostgreSQL
    dropped is replaced by one that prepares its own, so the next jobs still finish."""
    c.migrate()
    c.sql("ALTER DATABASE settle SET log_min_duration_statement = 0")
    try:
        start = os.path.getsize(c.log_path("pg.log"))
        w, n_jobs = run(c, 32, SETTLE_DB_PREPARED="on")
        names = ("settle_set_timeout", "settle_load_orders", "settle_load_items",
                 "settle_apply_outcomes")
        for name in names:
            parsed = pg_log_statements(c, start, "parse", name)
            executed = pg_log_statements(c, start, "execute", name)
            # At most one parse per pooled connection (2) and fewer than the executions.
            assert 1 <= parsed <= 2 and executed > parsed, (name, parsed, executed)
        # The batch statements were never sent as text (the default sends them unnamed).
        assert not re.search(UNNAMED_LOAD, pg_log_since(c, start))
        assert pg_log_statements(c, start, "execute", "<unnamed>") > 0  # BEGIN, COMMIT

        # Every connection of the worker ends; the next batch must prepare on a new one.
        c.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
              "WHERE application_name = 'settle' AND datname = 'settle'")
        mark = os.path.getsize(c.log_path("pg.log"))
        c.add_order("after-00", "u1", 1000, {"sku-m": 1})
        key = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id="after-00", amount=1000,
                                            status="SUCCESS"))
        assert c.reserve("after-00", {"sku-m": 1}).returncode == 0
        c.push_job(Q, {"order_id": "after-00", "user_id": "u1", "transaction_key": key})
        harness.wait_until(
            lambda: c.sql_value("SELECT status FROM orders WHERE id = 'after-00'") == "COMPLETED",
            20, what="the job after the connections were dropped to complete")
        assert pg_log_statements(c, mark, "parse", "settle_apply_outcomes") >= 1
        assert [r["result"] for r in c.job_log("after-00")] == ["completed"]
        assert w.alive()
        assert "26000" not in w.log_text() and "42P05" not in w.log_text()
    finally:
        c.sql("ALTER DATABASE settle RESET log_min_duration_statement")


def test_outcome_batch_reads_orders_by_key_only(c):
    """settle_apply_outcomes() plans once per connection with the batch counted as 100 rows;
    against a few thousand orders PostgreSQL then preferred a sequential scan of the whole
    orders table for the status it reports (migration 004). Its plans, logged by auto_explain
    for a batch mixing moved and unmoved orders, must reach orders by key only."""
    c.migrate()
    c.add_product("sku-m", 10**6)
    n = 5000
    c.sql("INSERT INTO orders (id, user_id, amount_minor) "
          "SELECT 'pl-' || g, 'u1', 1000 FROM generate_series(1, %s) g", (n,))
    c.sql("INSERT INTO order_items (order_id, sku, qty) "
          "SELECT 'pl-' || g, 'sku-m', 1 FROM generate_series(1, %s) g", (n,))
    c.sql("UPDATE orders SET status = 'COMPLETED' WHERE id = 'pl-2'")
    c.sql("ANALYZE")
    conn = c._connect("settle")
    try:
        cur = conn.cursor()
        for stmt in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                     "SET auto_explain.log_nested_statements = on",
                     "SET auto_explain.log_level = notice", "SET client_min_messages = notice"):
            cur.execute(stmt)
        batch = [{"i": i, "action": "complete", "order_id": f"pl-{i}", "amount_minor": 1000,
                  "transaction_key": f"tx-{i}", "job_id": f"j-{i}", "queue": Q,
                  "outcome": "done", "result": "completed", "result_unapplied": "skipped",
                  "attempts": 0, "deliveries": 1, "worker": "t"} for i in range(1, 5)]
        cur.execute("SELECT o_i, o_changed, o_status FROM settle_apply_outcomes(%s::jsonb) "
                    "ORDER BY o_i", (json.dumps(batch),))
        rows = cur.fetchall()
    finally:
        conn.close()
    # pl-2 was COMPLETED already: not moved, its status reported as read by key.
    assert rows == [(1, True, "COMPLETED"), (2, False, "COMPLETED"), (3, True, "COMPLETED"),
                    (4, True, "COMPLETED")], rows
    plans = "".join(conn.notices)
    assert "Insert on job_log" in plans, "auto_explain logged no plan of the batch statement"
    assert "Seq Scan on orders" not in plans, plans
    assert c.product_stock("sku-m") == 10**6 - 3


# What the worker sent before migration 006, kept here as the reference the functions must
# reproduce row for row.
OLD_LOAD_ORDERS = (
    "SELECT o.id, o.user_id, o.status, coalesce(o.failure_reason, ''), o.amount_minor, "
    "o.refunded_minor, greatest(0, (extract(epoch FROM (now() - o.created_at)) * 1000)::bigint), "
    "o.check_count, coalesce(p.transaction_key, ''), coalesce(p.status, '') "
    "FROM orders o LEFT JOIN payments p ON p.order_id = o.id WHERE o.id = ANY(%s::text[]) "
    "ORDER BY o.id")
OLD_LOAD_ITEMS = (
    "SELECT order_id, sku, qty FROM (SELECT order_id, sku, qty, row_number() "
    "OVER (PARTITION BY order_id ORDER BY sku) AS n FROM order_items "
    "WHERE order_id = ANY(%s::text[])) x WHERE n <= %s::integer ORDER BY order_id, sku")


def test_order_load_functions_return_the_old_rows_by_key(c):
    """The batch's order read goes through settle_load_orders/settle_load_items (migration
    006), whose plans PostgreSQL keeps per connection. They return exactly what the two
    statements they replace returned (an order with a payment, one without, one with more
    items than the cap, an unknown id), in one snapshot, and their plans, logged by
    auto_explain against 5 000 orders, reach orders, payments and items by key only."""
    c.migrate()
    c.add_product("sku-l1", 100)
    c.add_product("sku-l2", 100)
    c.add_product("sku-l3", 100)
    n = 5000
    c.sql("INSERT INTO orders (id, user_id, amount_minor) "
          "SELECT 'ld-' || g, 'u1', 1000 + g FROM generate_series(1, %s) g", (n,))
    c.sql("INSERT INTO order_items (order_id, sku, qty) "
          "SELECT 'ld-' || g, 'sku-l1', 1 FROM generate_series(1, %s) g", (n,))
    c.sql("INSERT INTO order_items (order_id, sku, qty) VALUES "
          "('ld-2', 'sku-l3', 3), ('ld-2', 'sku-l2', 2)")
    c.sql("INSERT INTO payments (order_id, transaction_key, user_id, amount_minor, status) "
          "SELECT 'ld-' || g, 'tx-ld-' || g, 'u1', 1000 + g, 'PENDING' "
          "FROM generate_series(1, %s) g WHERE g NOT IN (2, 3)", (n,))
    c.sql("UPDATE orders SET status = 'FAILED', failure_reason = 'declined', check_count = 2 "
          "WHERE id = 'ld-3'")
    c.sql("ANALYZE")
    ids = "{ld-1,ld-2,ld-3,no-such-order}"
    conn = c._connect("settle")
    try:
        cur = conn.cursor()
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur.execute(OLD_LOAD_ORDERS, (ids,))
        old_orders = cur.fetchall()
        cur.execute(OLD_LOAD_ITEMS, (ids, 2))
        old_items = cur.fetchall()
        for stmt in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                     "SET auto_explain.log_nested_statements = on",
                     "SET auto_explain.log_level = notice", "SET client_min_messages = notice"):
            cur.execute(stmt)
        del conn.notices[:]
        cur.execute("SELECT * FROM settle_load_orders(%s::text[]) ORDER BY 1", (ids,))
        new_orders = cur.fetchall()
        cur.execute("SELECT * FROM settle_load_items(%s::text[], %s::integer) ORDER BY 1, 2",
                    (ids, 2))
        new_items = cur.fetchall()
        cur.execute("COMMIT")
    finally:
        conn.close()
    assert len(old_orders) == 3 and old_orders[0][8] == "tx-ld-1", old_orders
    assert new_orders == old_orders, (new_orders, old_orders)
    # ld-2 has three items; the cap of 2 keeps the first two in sku order.
    assert [r for r in old_items if r[0] == "ld-2"] == [("ld-2", "sku-l1", 1),
                                                       ("ld-2", "sku-l2", 2)], old_items
    assert new_items == old_items, (new_items, old_items)
    plans = "".join(conn.notices)
    assert "order_items" in plans and "orders" in plans, \
        f"auto_explain logged no plan of the functions' queries: {plans[:500]}"
    for table in ("orders", "payments", "order_items"):
        assert f"Seq Scan on {table}" not in plans, plans


def test_worker_warms_its_batch_connections_at_start(c):
    """Before any job, a started worker has opened SETTLE_DB_BATCH_CONCURRENCY + 1 PostgreSQL
    connections and run an (empty) order load and outcome batch on each, so its first jobs
    pay neither the connect nor the outcome function's compile; nothing was written."""
    c.migrate()
    # Connections of earlier tests' workers may still be closing: count only this one's.
    t0 = c.sql_value("SELECT clock_timestamp()")
    w = c.start_worker(c.env_for_worker(SETTLE_DB_BATCH_CONCURRENCY="2", SETTLE_DB_POOL_SIZE="8"))

    def settle_conns():
        return c.sql_value("SELECT count(*) FROM pg_stat_activity "
                           "WHERE application_name = 'settle' AND datname = 'settle' "
                           "AND backend_start > %s", (t0,))
    # The connections show in pg_stat_activity as they open; the log line follows once the
    # warm-up returned.
    harness.wait_until(lambda: settle_conns() >= 3 and "PostgreSQL is reachable" in w.log_text(),
                       10, what=f"3 warmed connections (now {settle_conns()})")
    assert c.sql_value("SELECT count(*) FROM job_log") == 0
    assert not w.bad_log_lines(), w.bad_log_lines()[:3]


if __name__ == "__main__":
    harness.main(globals())
