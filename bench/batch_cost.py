#!/usr/bin/python3
"""batch_cost.py - what one settle_apply_outcomes() call costs as the batch grows
(docs/PERFORMANCE.md, "Where a job's time goes now").

Starts the test harness's servers (PostgreSQL with fsync off, so this is CPU and round trips,
not disk), migrates, loads 60 000 PENDING orders, and times batches of 1..64 completing
orders from one client, each call in its own transaction: milliseconds per call and
microseconds per job. Bounded: a fixed number of calls per size.

  SETTLE_BIN=build/release/settle /usr/bin/python3 bench/batch_cost.py
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))
import harness  # noqa: E402

ORDERS = 60000
SIZES = (1, 2, 4, 8, 16, 32, 64)


def main():
    c = harness.Cluster()
    c.start()
    try:
        c.migrate()
        c.add_product("sku-a", 10**9)
        c.sql("INSERT INTO orders (id, user_id, amount_minor) "
              "SELECT 'o' || g, 'u1', 1000 FROM generate_series(1, %s) g", (ORDERS,))
        c.sql("INSERT INTO order_items (order_id, sku, qty) "
              "SELECT 'o' || g, 'sku-a', 1 FROM generate_series(1, %s) g", (ORDERS,))
        c.sql("VACUUM ANALYZE")
        next_order = [1]

        def job(i):
            k = next_order[0]
            next_order[0] += 1
            return {"i": i, "action": "complete", "order_id": f"o{k}",
                    "transaction_key": f"tx{k}", "amount_minor": 1000,
                    "payment_status": "SUCCESS", "card_type": "VISA", "card_last4": "1234",
                    "next_check_ms": 0, "job_id": f"j{k}", "queue": "reconcile",
                    "outcome": "done", "result": "completed", "result_unapplied": "skipped",
                    "attempts": 0, "deliveries": 1, "worker": "bench",
                    "enqueued_ms": 1795229421183}

        conn = c._connect("settle")
        conn.autocommit = False
        cur = conn.cursor()

        def call(n):
            cur.execute("SELECT * FROM settle_apply_outcomes(%s::jsonb)",
                        (json.dumps([job(i) for i in range(n)]),))
            cur.fetchall()
            conn.commit()

        for n in SIZES:
            reps = max(20, 640 // n)
            for _ in range(6):  # past the plan cache's first custom plans
                call(n)
            t0 = time.perf_counter()
            for _ in range(reps):
                call(n)
            dt = time.perf_counter() - t0
            print(f"batch={n} ms_per_call={dt * 1000 / reps:.3f} "
                  f"us_per_job={dt * 1e6 / reps / n:.1f}")
        conn.close()
    finally:
        c.stop()


if __name__ == "__main__":
    main()
