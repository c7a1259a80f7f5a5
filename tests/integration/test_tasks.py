"""test_tasks.py - scheduled work (issue 4) end to end against real Redis, PostgreSQL and the
PG simulator: what each task does (`settle run <task>` and the worker's scheduler), that with
three workers each interval task runs exactly once per period (task_runs in PostgreSQL), the
take-over of a run whose worker died, the PG orphan sweep on a prepared mix of payments (and
that --dry-run changes nothing), the stock sync repairing injected drift with exactly one
alert above the threshold, and the daily statistics of a prepared day (written once;
--force recomputes).

Every wait is bounded (harness.wait_until); intervals are shrunk through the environment.
Run: SETTLE_BIN=build/settle /usr/bin/python3 tests/integration/test_tasks.py [tests]
"""

import datetime
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

TASKS = ("stale_sweep", "order_expiry", "orphan_sweep", "stock_sync", "daily_stats")


def env(c, **overrides):
    """A worker environment with the scheduler off unless asked: most tests drive one task
    with `settle run` and must not race the scheduler."""
    base = {"SETTLE_SCHEDULER": "off"}
    base.update(overrides)
    return c.env_for_worker(**base)


def run_task(c, task, *args, e=None, ok=True, timeout=60):
    """`settle run task args...`; returns (summary dict, decision lines, CompletedProcess)."""
    r = c.run_settle(["run", task, *args], env=e if e is not None else env(c), timeout=timeout)
    if ok and r.returncode != 0:
        raise AssertionError(f"settle run {task} {' '.join(args)} exited {r.returncode}\n"
                             f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    summary = None
    if lines and lines[-1].startswith("{"):
        summary = json.loads(lines[-1])
        lines = lines[:-1]
    return summary, lines, r


def queue_jobs(c, queue):
    """The jobs on a ready list, parsed, oldest first."""
    return [json.loads(raw) for raw in reversed(c.redis.lrange(c.key(f"queue:{queue}"), 0, -1))]


def runs(c, task):
    """task_runs rows of a task (dicts), by start."""
    with c.pg.cursor() as cur:
        cur.execute("SELECT * FROM task_runs WHERE task = %s ORDER BY started_at, period", (task,))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


def ms_ago(seconds):
    return int((time.time() - seconds) * 1000)


def pg_tx(c, order_id, user="u1", amount=5000, status="SUCCESS", age_s=7200, **extra):
    return c.tx_key_of(c.admin_create_tx(user_id=user, order_id=order_id, amount=amount,
                                         status=status, created_at=ms_ago(age_s), **extra))


# --------------------------------------------------------------------------------------------
# Stale-order sweep


def test_stale_sweep_enqueues_each_unwatched_stale_order_once(c):
    c.add_product("sku-a", 100)
    c.add_order("old-1", "u1", 1000, {"sku-a": 1}, age_s=3000)
    c.add_order("old-2", "u2", 1000, {"sku-a": 1}, age_s=2000, tx_key="tk-old-2")
    c.add_order("old-3", "u3", 1000, {"sku-a": 1}, age_s=1000)
    c.add_order("young", "u1", 1000, {"sku-a": 1}, age_s=30)
    c.add_order("done", "u1", 1000, {"sku-a": 1}, age_s=3000, status="COMPLETED")
    c.add_order("watched", "u1", 1000, {"sku-a": 1}, age_s=3000)
    c.add_order("lost", "u1", 1000, {"sku-a": 1}, age_s=3000)
    # A job re-checks "watched" later; "lost" was due an hour ago and nobody came.
    c.sql("UPDATE orders SET next_check_at = now() + interval '5 minutes' WHERE id = 'watched'")
    c.sql("UPDATE orders SET next_check_at = now() - interval '1 hour' WHERE id = 'lost'")
    e = env(c, SETTLE_SWEEP_MIN_AGE_MS=600000, SETTLE_SWEEP_LIMIT=3)

    s, lines, _ = run_task(c, "stale_sweep", "--dry-run", e=e)
    assert s["found"] == 3 and s["enqueued"] == 3 and s["dry_run"] is True, s
    assert len(lines) == 3 and all("would enqueue" in ln for ln in lines), lines
    assert c.redis.llen(c.key("queue:reconcile")) == 0, "a dry run enqueued"

    # The limit takes the oldest first: old-1 and lost (3000 s, old-1 inserted first), old-2.
    s, _, _ = run_task(c, "stale_sweep", e=e)
    assert (s["found"], s["enqueued"], s["already_queued"]) == (3, 3, 0), s
    jobs = queue_jobs(c, "reconcile")
    assert sorted(j["order_id"] for j in jobs) == ["lost", "old-1", "old-2"], jobs
    by_order = {j["order_id"]: j for j in jobs}
    assert by_order["old-2"]["transaction_key"] == "tk-old-2"
    assert "transaction_key" not in by_order["old-1"]
    assert all(j["id"] == "sweep:" + j["order_id"] and j["user_id"] for j in jobs), jobs

    # Again, with a larger limit: the queued three are not doubled, old-3 is added.
    s, _, _ = run_task(c, "stale_sweep", e=dict(e, SETTLE_SWEEP_LIMIT="10"))
    assert (s["found"], s["enqueued"], s["already_queued"]) == (4, 1, 3), s
    assert sorted(j["order_id"] for j in queue_jobs(c, "reconcile")) == \
        ["lost", "old-1", "old-2", "old-3"]
    rows = runs(c, "stale_sweep")
    assert [(r["status"], r["dry_run"]) for r in rows] == \
        [("done", True), ("done", False), ("done", False)], rows
    assert all(r["period"].startswith("manual:") and r["seq"] is None for r in rows), rows
    assert rows[-1]["summary"]["enqueued"] == 1, rows[-1]


# --------------------------------------------------------------------------------------------
# Order expiry


def test_order_expiry_expires_unpaid_orders_and_reconciles_paid_ones(c):
    c.add_product("sku-a", 10)
    c.stock_load()
    c.add_order("x-unpaid", "u1", 1000, {"sku-a": 3}, age_s=60)
    assert c.reserve("x-unpaid", {"sku-a": 3}).returncode == 0
    c.add_order("x-paid", "u2", 2000, {"sku-a": 1}, age_s=60)
    c.add_order("x-keyed", "u3", 3000, {"sku-a": 1}, age_s=60, tx_key="tk-keyed")
    c.add_order("x-young", "u4", 1000, {"sku-a": 1}, age_s=0)
    c.add_order("x-pgdown", "u5", 1000, {"sku-a": 1}, age_s=60)
    paid_key = pg_tx(c, "x-paid", user="u2", amount=2000, age_s=30)
    c.admin_inject("orderId=x-pgdown", 503, count=5)
    assert c.stock_available("sku-a") == 7

    s, lines, _ = run_task(c, "order_expiry", "--dry-run")
    assert s["expired"] == 1 and s["reconcile_enqueued"] == 2, (s, lines)
    assert c.order_status("x-unpaid") == "PENDING" and c.stock_available("sku-a") == 7
    assert c.redis.llen(c.key("queue:reconcile")) == 0

    s, _, _ = run_task(c, "order_expiry")
    assert (s["expired"], s["released"], s["reconcile_enqueued"], s["pg_unavailable"]) == \
        (1, 1, 2, 1), s
    o = c.order("x-unpaid")
    assert (o["status"], o["failure_reason"]) == ("EXPIRED", "payment_window_passed"), o
    assert c.resv_state("x-unpaid") == "released" and c.stock_available("sku-a") == 10
    for oid in ("x-paid", "x-keyed", "x-young", "x-pgdown"):
        assert c.order_status(oid) == "PENDING", oid
    jobs = {j["order_id"]: j for j in queue_jobs(c, "reconcile")}
    assert set(jobs) == {"x-paid", "x-keyed"}, jobs
    # Never expired blindly: the PG's transaction goes to the reconcile pipeline.
    assert jobs["x-paid"]["transaction_key"] == paid_key and jobs["x-paid"]["id"] == "expiry:x-paid"
    assert jobs["x-keyed"]["transaction_key"] == "tk-keyed"

    # A worker reconciles them: x-paid completes with the PG's SUCCESS.
    c.start_worker(env(c))
    harness.wait_until(lambda: c.order_status("x-paid") == "COMPLETED", 20, what="x-paid done")


# --------------------------------------------------------------------------------------------
# PG orphan sweep


def orphan_mix(c):
    """A prepared mix: {name: transaction key}. Only the old captured payments of dead
    orders are orphans to refund."""
    c.add_product("sku-a", 100)
    keys = {}
    # Matched: a completed order and its captured payment.
    c.add_order("m-1", "u1", 5000, {"sku-a": 1}, age_s=7200, status="COMPLETED")
    keys["matched"] = pg_tx(c, "m-1")
    c.sql("INSERT INTO payments (order_id, transaction_key, user_id, amount_minor, status) "
          "VALUES ('m-1', %s, 'u1', 5000, 'SUCCESS')", (keys["matched"],))
    # Unmatched but young (inside the grace window): left alone.
    c.add_order("y-1", "u1", 5000, {"sku-a": 1}, age_s=600, status="EXPIRED")
    keys["young"] = pg_tx(c, "y-1", age_s=600)
    # Unmatched and old: an EXPIRED order without a payment row, and a FAILED one whose
    # payment row we recorded FAILED (the PG changed its mind later).
    c.add_order("o-1", "u1", 5000, {"sku-a": 1}, age_s=7200, status="EXPIRED")
    keys["orphan_expired"] = pg_tx(c, "o-1")
    c.add_order("o-2", "u2", 7000, {"sku-a": 1}, age_s=7200, status="FAILED")
    keys["orphan_failed"] = pg_tx(c, "o-2", user="u2", amount=7000)
    c.sql("INSERT INTO payments (order_id, transaction_key, user_id, amount_minor, status) "
          "VALUES ('o-2', %s, 'u2', 7000, 'FAILED')", (keys["orphan_failed"],))
    # A failed PG payment: nothing was captured.
    c.add_order("f-1", "u1", 5000, {"sku-a": 1}, age_s=7200, status="FAILED")
    keys["pg_failed"] = pg_tx(c, "f-1", status="FAILED", reason="LIMIT_EXCEEDED")
    # Captured for an order we never had: recorded for a person, not refunded here.
    keys["no_order"] = pg_tx(c, "ghost-1")
    # Captured for an order still PENDING: reconciled, never refunded.
    c.add_order("p-1", "u1", 5000, {"sku-a": 1}, age_s=7200)
    keys["pending"] = pg_tx(c, "p-1")
    return keys


ORPHAN_ENV = {"SETTLE_ORPHAN_PAGE_SIZE": 2, "SETTLE_ORPHAN_CONCURRENCY": 3,
              "SETTLE_ORPHAN_LOOKUP_BATCH": 2}


def test_orphan_sweep_refunds_exactly_the_orphans_and_dry_run_changes_nothing(c):
    keys = orphan_mix(c)
    e = env(c, **ORPHAN_ENV)
    before_payments = c.sql("SELECT order_id, transaction_key, status FROM payments "
                            "ORDER BY order_id")

    s, lines, _ = run_task(c, "orphan_sweep", "--dry-run", e=e)
    # Six payments in the window (the young one is outside it), in three pages of two.
    assert s["payments"] == 6 and s["pages"] == 3 and s["pages_failed"] == 0, s
    decided = {}
    for ln in lines:
        for name, k in keys.items():
            if f"key={k} " in ln:
                decided[name] = ln.rsplit("-> ", 1)[1]
    assert decided.keys() == keys.keys() - {"young"}, (decided, lines)
    assert decided["matched"] == "matched"
    assert decided["orphan_expired"].startswith("refund_enqueued")
    assert decided["orphan_failed"].startswith("refund_enqueued")
    assert decided["pg_failed"] == "not_captured"
    assert decided["no_order"].startswith("no_order")
    assert decided["pending"].startswith("reconcile_enqueued")
    # ... and nothing changed.
    assert c.redis.llen(c.key("queue:refund")) == 0 and c.redis.llen(c.key("queue:reconcile")) == 0
    assert c.sql_value("SELECT count(*) FROM orphan_decisions") == 0
    assert c.sql_value("SELECT count(*) FROM refunds") == 0
    assert c.sql("SELECT order_id, transaction_key, status FROM payments ORDER BY order_id") == \
        before_payments
    assert not [r for r in c.admin_requests() if r["path"].endswith("/cancel")]
    assert [r["dry_run"] for r in runs(c, "orphan_sweep")] == [True]

    s, _, _ = run_task(c, "orphan_sweep", e=e)
    assert (s["matched"], s["refund_enqueued"], s["reconcile_enqueued"], s["not_captured"],
            s["needs_person"]) == (1, 2, 1, 1, 1), s
    refunds = {j["transaction_key"]: j for j in queue_jobs(c, "refund")}
    assert set(refunds) == {keys["orphan_expired"], keys["orphan_failed"]}, refunds
    for k, j in refunds.items():
        assert j["id"] == "orphan:" + k and j["reason"] == "orphan_payment", j
    assert refunds[keys["orphan_failed"]]["user_id"] == "u2"
    assert [j["order_id"] for j in queue_jobs(c, "reconcile")] == ["p-1"]
    # The refund pipeline refunds only a SUCCESS payment row: the sweep recorded them.
    assert c.sql("SELECT order_id, status FROM payments WHERE order_id IN ('o-1', 'o-2') "
                 "ORDER BY order_id") == [("o-1", "SUCCESS"), ("o-2", "SUCCESS")]
    dec = dict(c.sql("SELECT transaction_key, decision FROM orphan_decisions"))
    assert dec == {keys["orphan_expired"]: "refund_enqueued",
                   keys["orphan_failed"]: "refund_enqueued",
                   keys["no_order"]: "no_order", keys["pending"]: "reconcile_enqueued"}, dec

    # The refund jobs run: each orphan is refunded once at the PG, with its own key.
    c.start_worker(env(c, SETTLE_QUEUES="refund"))
    harness.wait_until(lambda: c.sql_value("SELECT count(*) FROM refunds WHERE state = "
                                           "'SUCCEEDED'") == 2, 30, what="two refunds")
    cancels = [r for r in c.admin_requests() if r["path"].endswith("/cancel")]
    assert sorted(r["idempotencyKey"] for r in cancels) == \
        sorted("orphan:" + keys[n] for n in ("orphan_expired", "orphan_failed")), cancels
    for n in ("orphan_expired", "orphan_failed"):
        assert c.admin_effects(keys[n])["cancelEffects"] == 1
    for n in ("matched", "young", "pg_failed", "pending"):
        assert c.admin_effects(keys[n])["cancelEffects"] == 0, n
    c.stop_workers()

    # Refunded at the PG, they are no longer captured: the next run refunds nothing.
    s, _, _ = run_task(c, "orphan_sweep", e=e)
    assert s["refund_enqueued"] == 0 and s["not_captured"] == 3, s
    assert c.redis.llen(c.key("queue:refund")) == 0


def test_orphan_refund_cap_records_the_rest_as_capped(c):
    keys = orphan_mix(c)
    s, _, _ = run_task(c, "orphan_sweep", e=env(c, SETTLE_ORPHAN_REFUND_CAP=1, **ORPHAN_ENV))
    assert (s["refund_enqueued"], s["capped"]) == (1, 1), s
    assert c.redis.llen(c.key("queue:refund")) == 1
    dec = sorted(r[0] for r in c.sql(
        "SELECT decision FROM orphan_decisions WHERE transaction_key IN (%s, %s)",
        (keys["orphan_expired"], keys["orphan_failed"])))
    assert dec == ["capped", "refund_enqueued"], dec


def test_orphan_sweep_survives_a_failing_page(c):
    keys = orphan_mix(c)
    # The third page (page=2) answers 500 once: the run goes on without it.
    c.admin_inject("page=2&", 500, count=1)
    s, _, _ = run_task(c, "orphan_sweep", e=env(c, **ORPHAN_ENV))
    assert s["pages_failed"] == 1 and s["payments"] == 4, s
    s, _, _ = run_task(c, "orphan_sweep", e=env(c, **ORPHAN_ENV))
    assert s["pages_failed"] == 0 and s["payments"] == 6, s
    assert len({j["transaction_key"] for j in queue_jobs(c, "refund")}) == 2
    assert keys


# --------------------------------------------------------------------------------------------
# Stock sync


def stock_setup(c, n=15, on_hand=50):
    skus = [f"sku-{i:02d}" for i in range(n)]
    for s in skus:
        c.add_product(s, on_hand)
    c.stock_load()
    return skus


def alerts(c):
    return c.redis.xrange(c.key("alerts"))


def test_stock_sync_repairs_drift_and_alerts_once_above_threshold(c):
    skus = stock_setup(c)
    # A live reservation (3 of sku-00) and a sale committed in Redis that PostgreSQL has not
    # applied yet (2 of sku-01: the order is still PENDING there).
    c.add_order("r-live", "u1", 1000, {"sku-00": 3})
    assert c.reserve("r-live", {"sku-00": 3}).returncode == 0
    c.add_order("r-sold", "u1", 1000, {"sku-01": 2})
    assert c.reserve("r-sold", {"sku-01": 2}).returncode == 0
    c.redis.hset(c.key("resv:r-sold"), "state", "committed")
    c.redis.zrem(c.key("resv:deadlines"), "r-sold")
    expect = {s: 50 for s in skus}
    expect["sku-00"] = 47
    expect["sku-01"] = 48
    assert all(c.stock_available(s) == expect[s] for s in skus)

    # Drift on 12 SKUs (one key lost), above the threshold of 10.
    for i in range(2, 13):
        c.redis.set(c.key(f"stock:{skus[i]}"), 50 + i)
    c.redis.delete(c.key("stock:sku-13"))
    s, lines, _ = run_task(c, "stock_sync", "--dry-run")
    assert s["mismatches"] == 12 and s["alert"] is True and len(lines) == 13, (s, lines)
    assert c.stock_available("sku-02") == 52 and not alerts(c), "a dry run changed Redis"
    assert c.sql_value("SELECT count(*) FROM stock_mismatches") == 0

    s, _, _ = run_task(c, "stock_sync")
    assert (s["mismatches"], s["repaired"], s["alert"]) == (12, 12, True), s
    assert {sk: c.stock_available(sk) for sk in skus} == expect
    rows = c.sql("SELECT sku, pg_on_hand, reserved, unapplied, redis_before, redis_after, "
                 "repaired FROM stock_mismatches ORDER BY sku")
    assert len(rows) == 12 and rows[0] == ("sku-02", 50, 0, 0, 52, 50, True), rows
    assert ("sku-13", 50, 0, 0, None, 50, True) in rows, rows
    a = alerts(c)
    assert len(a) == 1, a
    fields = {k.decode(): v.decode() for k, v in a[0][1].items()}
    assert fields["type"] == "stock_sync_mismatch" and fields["count"] == "12", fields

    # Repaired: a second run finds nothing and raises nothing.
    s, _, _ = run_task(c, "stock_sync")
    assert s["mismatches"] == 0 and s["alert"] is False, s
    assert len(alerts(c)) == 1

    # Below the threshold: repaired, recorded, no alert.
    for i in (3, 4, 5):
        c.redis.decr(c.key(f"stock:{skus[i]}"), 7)
    s, _, _ = run_task(c, "stock_sync")
    assert (s["mismatches"], s["alert"]) == (3, False), s
    assert c.stock_available("sku-03") == 50 and len(alerts(c)) == 1


def test_scheduled_stock_sync_counts_mismatches_in_metrics(c):
    skus = stock_setup(c, n=3)
    c.redis.set(c.key(f"stock:{skus[0]}"), 7)
    c.redis.set(c.key(f"stock:{skus[1]}"), 9)
    # The sync's time of day has passed today, so a worker runs today's sync once at start.
    w = c.start_worker(env(c, SETTLE_SCHEDULER="on", SETTLE_STOCK_SYNC_AT="00:00"))
    harness.wait_until(lambda: [r["status"] for r in runs(c, "stock_sync")] == ["done"], 20,
                       what="the scheduled stock sync")
    assert c.stock_available(skus[0]) == 50 and c.stock_available(skus[1]) == 50
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    assert runs(c, "stock_sync")[0]["period"] == today

    def counter():
        with urllib.request.urlopen(f"http://{w.metrics_addr}/metrics", timeout=5) as r:
            for ln in r.read().decode().splitlines():
                if ln.startswith("settle_stock_sync_mismatches_total "):
                    return float(ln.split()[1])
        return None
    harness.wait_until(lambda: counter() == 2.0, 10, what="the mismatch counter")


# --------------------------------------------------------------------------------------------
# Daily statistics


def at(day, hh, mm=0):
    return datetime.datetime.combine(day, datetime.time(hh, mm), tzinfo=datetime.timezone.utc)


def add_stats_order(c, oid, amount, created, status="PENDING", completed=None):
    c.sql("INSERT INTO orders (id, user_id, status, amount_minor, created_at, completed_at) "
          "VALUES (%s, 'u1', %s, %s, %s, %s)", (oid, status, amount, created, completed))


def test_daily_stats_for_a_prepared_day_written_once(c):
    day = datetime.datetime.now(datetime.timezone.utc).date() - datetime.timedelta(days=3)
    prev, nxt = day - datetime.timedelta(days=1), day + datetime.timedelta(days=1)
    add_stats_order(c, "d-1", 1000, at(day, 0, 5), "COMPLETED", at(day, 0, 6))
    add_stats_order(c, "d-2", 3000, at(day, 12), "COMPLETED", at(day, 12, 1))
    add_stats_order(c, "d-3", 2000, at(day, 13), "REFUNDED", at(day, 13, 2))
    add_stats_order(c, "d-4", 4000, at(day, 14), "EXPIRED")
    add_stats_order(c, "d-5", 4000, at(day, 23, 59), "FAILED")
    add_stats_order(c, "d-6", 5000, at(prev, 23, 50), "COMPLETED", at(day, 0, 1))  # done today
    add_stats_order(c, "d-7", 9000, at(nxt, 0, 0), "COMPLETED", at(nxt, 0, 1))  # another day
    add_stats_order(c, "d-8", 9000, at(prev, 10), "EXPIRED")  # another day
    c.sql("INSERT INTO refunds (id, order_id, transaction_key, user_id, amount_minor, state, "
          "updated_at) VALUES ('rf-1', 'd-3', 'tk-d3', 'u1', 2000, 'SUCCEEDED', %s), "
          "('rf-2', 'd-2', 'tk-d2', 'u1', 500, 'FAILED', %s), "
          "('rf-3', 'd-1', 'tk-d1', 'u1', 300, 'SUCCEEDED', %s)",
          (at(day, 15), at(day, 15), at(nxt, 1)))
    d = day.isoformat()
    want = {"date": d, "orders_created": 5, "orders_completed": 4, "revenue_minor": 11000,
            "avg_order_minor": 2750, "orders_cancelled": 1, "orders_expired": 1,
            "orders_failed": 1, "refunds_count": 1, "refunded_minor": 2000}

    s, _, _ = run_task(c, "daily_stats", "--date", d, "--dry-run")
    assert s["written"] is True and c.sql_value("SELECT count(*) FROM daily_stats") == 0, s

    s, _, _ = run_task(c, "daily_stats", "--date", d)
    assert s["written"] is True and {k: s[k] for k in want} == want, s
    row = c.sql("SELECT orders_created, orders_completed, revenue_minor, avg_order_minor, "
                "orders_cancelled, orders_expired, orders_failed, refunds_count, refunded_minor "
                "FROM daily_stats WHERE date = %s", (d,))
    assert row == [(5, 4, 11000, 2750, 1, 1, 1, 1, 2000)], row
    first = c.sql("SELECT computed_at, computed_by FROM daily_stats")

    # Idempotent: a second run for the date changes nothing, even after the data changed...
    add_stats_order(c, "d-9", 1000, at(day, 16), "COMPLETED", at(day, 16, 1))
    s, _, _ = run_task(c, "daily_stats", "--date", d)
    assert s["written"] is False and s["already_recorded"] is True, s
    assert s["orders_completed"] == 4 and c.sql("SELECT computed_at, computed_by "
                                                 "FROM daily_stats") == first
    # ... unless --force recomputes it.
    s, _, _ = run_task(c, "daily_stats", "--date", d, "--force")
    assert (s["written"], s["orders_created"], s["orders_completed"], s["revenue_minor"]) == \
        (True, 6, 5, 12000), s
    assert c.sql_value("SELECT orders_completed FROM daily_stats WHERE date = %s", (d,)) == 5

    # Today is not a finished day; bad dates and --force on another task are usage errors.
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    _, _, r = run_task(c, "daily_stats", "--date", today, ok=False)
    assert r.returncode == 1 and "finished" in r.stderr, r.stderr
    _, _, r = run_task(c, "daily_stats", "--date", "2025-02-30", ok=False)
    assert r.returncode == 2, r.stderr
    _, _, r = run_task(c, "stale_sweep", "--force", ok=False)
    assert r.returncode == 2, r.stderr


def scheduled_daily_stats_once(c):
    """Two workers with the daily statistics due: exactly one run, done. Returns its row."""
    e = env(c, SETTLE_SCHEDULER="on", SETTLE_DAILY_STATS_AT="00:00")
    for i in range(2):
        c.start_worker(e, name=f"w{i}")
    harness.wait_until(lambda: [r["status"] for r in runs(c, "daily_stats")] == ["done"], 20,
                       what="the scheduled daily stats")
    time.sleep(2.5)  # a few more scheduler ticks in both workers
    rows = runs(c, "daily_stats")
    assert len(rows) == 1, rows
    return rows[0]


def test_scheduled_daily_stats_covers_yesterday_once(c):
    yesterday = datetime.datetime.now(datetime.timezone.utc).date() - datetime.timedelta(days=1)
    add_stats_order(c, "y-1", 1500, at(yesterday, 9), "COMPLETED", at(yesterday, 9, 1))
    scheduled_daily_stats_once(c)
    assert c.sql("SELECT date::text, orders_completed, revenue_minor FROM daily_stats") == \
        [(yesterday.isoformat(), 1, 1500)]


def test_scheduled_daily_stats_back_fills_the_days_no_run_covered(c):
    """Every worker was down across three scheduled times: the next scheduled run writes the
    days after the latest recorded one (with their real figures), then yesterday. The recorded
    day and the days before it are left alone, and a second worker adds nothing."""
    today = datetime.datetime.now(datetime.timezone.utc).date()

    def ago(k):
        return today - datetime.timedelta(days=k)
    # The last day a run recorded, with figures no recomputation would give.
    c.sql("INSERT INTO daily_stats (date, orders_created, orders_completed, revenue_minor, "
          "avg_order_minor, orders_cancelled, orders_expired, orders_failed, refunds_count, "
          "refunded_minor, computed_by) VALUES (%s, 7, 7, 7, 1, 0, 0, 0, 0, 0, 'old')", (ago(5),))
    add_stats_order(c, "bf-3", 2500, at(ago(3), 10), "COMPLETED", at(ago(3), 10, 1))
    add_stats_order(c, "bf-9", 900, at(ago(9), 10), "COMPLETED", at(ago(9), 10, 1))
    run = scheduled_daily_stats_once(c)
    got = c.sql("SELECT date, orders_completed, revenue_minor, computed_by FROM daily_stats "
                "ORDER BY date")
    period = run["period"]
    assert got == [(ago(5), 7, 7, "old"), (ago(4), 0, 0, period), (ago(3), 1, 2500, period),
                   (ago(2), 0, 0, period), (ago(1), 0, 0, period)], got
    summary = run["summary"]
    summary = json.loads(summary) if isinstance(summary, str) else summary
    assert summary["backfilled"] == [ago(k).isoformat() for k in (4, 3, 2)], summary


# --------------------------------------------------------------------------------------------
# Once per period across workers


@harness.timeout(90)
def test_three_workers_run_each_interval_task_once_per_period(c):
    intervals = {"stale_sweep": 1500, "order_expiry": 2000, "orphan_sweep": 2500}
    e = env(c, SETTLE_SCHEDULER="on", SETTLE_SWEEP_INTERVAL_MS=intervals["stale_sweep"],
            SETTLE_EXPIRY_INTERVAL_MS=intervals["order_expiry"],
            SETTLE_ORPHAN_INTERVAL_MS=intervals["orphan_sweep"])
    # Reconcile jobs stay queued (these workers take refunds only), to count them.
    e["SETTLE_QUEUES"] = "refund"
    c.add_product("sku-a", 10)
    c.add_order("s-1", "u1", 1000, {"sku-a": 1}, age_s=3000, tx_key="tk-s-1")
    workers = [c.start_worker(e, name=f"w{i}") for i in range(3)]
    harness.wait_until(lambda: all(len(runs(c, t)) >= 4 for t in intervals), 40,
                       interval_s=0.2, what="four periods of every interval task")
    c.stop_workers()
    assert all(w.proc.returncode == 0 for w in workers), [w.proc.returncode for w in workers]
    seen_workers = set()
    for task, interval in intervals.items():
        rows = runs(c, task)
        seqs = [r["seq"] for r in rows]
        # One row per period (the primary key), periods 1..N with no gap and no repeat.
        assert seqs == list(range(1, len(rows) + 1)), (task, seqs)
        assert [r["period"] for r in rows] == [str(s) for s in seqs]
        assert all(r["status"] in ("done", "failed") for r in rows), rows
        assert all(r["status"] == "done" for r in rows[:-1]), (task, rows)
        for a, b in zip(rows, rows[1:]):
            gap_ms = (b["started_at"] - a["started_at"]).total_seconds() * 1000
            assert gap_ms >= interval, (task, a["period"], b["period"], gap_ms)
            assert b["started_at"] >= a["finished_at"], (task, "overlapping runs", a, b)
        seen_workers |= {r["worker"] for r in rows}
    # The daily tasks ran once each (today's or yesterday's period, by the time of day).
    for task in ("stock_sync", "daily_stats"):
        rows = runs(c, task)
        assert len(rows) == 1 and rows[0]["status"] == "done", (task, rows)
    # The sweeps ran every period, but never doubled a queued job: one per producer id.
    ids = [j["id"] for j in queue_jobs(c, "reconcile")]
    assert sorted(ids) == ["expiry:s-1", "sweep:s-1"], ids
    assert len(seen_workers) >= 2, f"runs spread over workers: {seen_workers}"


def test_a_run_whose_worker_died_is_taken_over(c):
    # A run of a worker that died 1 h ago, and one of a live worker (fresh heartbeat).
    c.sql("INSERT INTO task_runs (task, period, seq, started_at, heartbeat_at, worker) "
          "VALUES ('stale_sweep', '7', 7, now() - interval '1 hour', "
          "now() - interval '1 hour', 'ghost:1')")
    c.sql("INSERT INTO task_runs (task, period, seq, worker) VALUES ('order_expiry', '3', 3, "
          "'alive:1')")
    e = env(c, SETTLE_SCHEDULER="on", SETTLE_TASK_STALE_MS=8000,
            SETTLE_DB_STATEMENT_TIMEOUT_MS=1000, SETTLE_SWEEP_INTERVAL_MS=600000,
            SETTLE_EXPIRY_INTERVAL_MS=100)
    c.start_worker(e)
    harness.wait_until(lambda: len(runs(c, "stale_sweep")) == 2, 15, what="the take-over")
    dead, new = runs(c, "stale_sweep")
    assert dead["status"] == "failed" and "ghost:1 died" in dead["error"], dead
    assert (new["period"], new["status"]) in (("8", "running"), ("8", "done")), new
    # The live one blocks its task until its heartbeat is stale (8 s), then it is taken over.
    time.sleep(2)
    assert [r["period"] for r in runs(c, "order_expiry")] == ["3"]
    harness.wait_until(lambda: len(runs(c, "order_expiry")) >= 2, 20, what="stale take-over")
    assert runs(c, "order_expiry")[0]["status"] == "failed"


def test_drain_interrupts_a_long_task_and_records_it(c):
    # Every PG answer takes 1.5 s and the sweep reads one page at a time: it is still running
    # when the worker is told to stop, and stops at its next step.
    orphan_mix(c)
    c.admin_faults(slow_rate=1.0, slow_ms=1500)
    e = env(c, SETTLE_SCHEDULER="on", SETTLE_GATEWAY_TIMEOUT_MS=3000,
            SETTLE_ORPHAN_PAGE_SIZE=1, SETTLE_ORPHAN_CONCURRENCY=1,
            SETTLE_ORPHAN_LOOKUP_BATCH=1)
    w = c.start_worker(e)
    harness.wait_until(lambda: [r["status"] for r in runs(c, "orphan_sweep")] == ["running"],
                       30, what="the orphan sweep to start")
    t0 = time.monotonic()
    assert w.stop() == 0
    assert time.monotonic() - t0 < 8, "the task did not stop at its next step"
    row = runs(c, "orphan_sweep")[0]
    assert row["status"] == "failed" and "shutting down" in row["error"], row
    assert row["summary"]["pages"] < 6, row["summary"]


if __name__ == "__main__":
    harness.main(globals())
