"""test_refund.py - refund jobs end to end against real Redis, PostgreSQL and the PG simulator:
exactly one effect at the PG however often a refund is delivered (duplicates, a kill -9
mid-call, a PG that applies the cancel but answers too late), the over-refund guard under
concurrency, partial refunds, restock in both stores exactly once, the out-of-stock
compensation of the reconcile pipeline, and every rejection with its DLQ reason.

Each test asserts on what a user sees: refunds/payments/orders/products/job_log rows, Redis
stock and reservation keys, the simulator's effect counters and request log (with the
Idempotency-Keys it received), and DLQ envelopes."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

Q = "refund"


# --------------------------------------------------------------------------------------------
# Helpers


def fnv1a128_hex(data):
    h = 0x6c62272e07bb014262b821756295c58d
    for b in data:
        h ^= b
        h = (h * ((1 << 88) + 0x13B)) % (1 << 128)
    return "%032x" % h


def derived_id(order_id, tx_key, amount=None, reason="", restock=False):
    """The refund id settle derives when a job has no "id" (src/refund.c)."""
    parts = [order_id, tx_key, "full" if amount is None else str(amount), reason,
             "1" if restock else "0"]
    data = b"".join(f"{len(p.encode())}:".encode() + p.encode() + b"|" for p in parts)
    return "rf:" + fnv1a128_hex(data)


def paid_order(c, order_id, user="u1", amount=100, items=None, stock=10):
    """A COMPLETED order whose payment is SUCCESS both in PostgreSQL and at the simulator
    (the simulator's key is used for the payments row). Returns the transaction key."""
    items = items or {"sku-a": 1}
    for sku in items:
        if c.product_stock(sku) is None:
            c.add_product(sku, stock)
    key = c.tx_key_of(c.admin_create_tx(user_id=user, order_id=order_id, amount=amount,
                                        status="SUCCESS"))
    c.add_order(order_id, user, amount, items, status="COMPLETED", tx_key=key,
                payment_status="SUCCESS")
    return key


def reconciled_order(c, order_id, user="u1", amount=100, items=None, stock=10):
    """An order taken through the real reconcile pipeline: reserved in Redis, paid at the
    simulator, COMPLETED by a worker (units off products.stock, reservation committed).
    Returns the transaction key; the worker is stopped again."""
    items = items or {"sku-a": 2}
    for sku in items:
        if c.product_stock(sku) is None:
            c.add_product(sku, stock)
    c.add_order(order_id, user, amount, items)
    c.stock_load()
    r = c.reserve(order_id, items)
    assert r.returncode == 0, r.stdout + r.stderr
    key = c.tx_key_of(c.admin_create_tx(user_id=user, order_id=order_id, amount=amount,
                                        status="SUCCESS"))
    c.push_job("reconcile", {"order_id": order_id, "user_id": user, "transaction_key": key})
    w = c.start_worker(c.env_for_worker(queues="reconcile"), name="reconcile-worker")
    harness.wait_until(lambda: c.order_status(order_id) == "COMPLETED", 20,
                       what=f"order {order_id} to complete")
    assert w.stop() == 0
    return key


def refund_job(order_id, key, user="u1", **extra):
    job = {"order_id": order_id, "user_id": user, "transaction_key": key}
    job.update(extra)
    return job


def refunds(c, order_id):
    """refunds rows of an order as dicts, oldest first."""
    with c.pg.cursor() as cur:
        cur.execute("SELECT * FROM refunds WHERE order_id = %s ORDER BY created_at, id",
                    (order_id,))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


def refund_state(c, refund_id):
    return c.sql_value("SELECT state FROM refunds WHERE id = %s", (refund_id,))


def payment(c, order_id):
    rows = c.sql("SELECT status, refunded_minor, amount_minor FROM payments WHERE order_id = %s",
                 (order_id,))
    return rows[0] if rows else None


def cancel_requests(c, key):
    return [r for r in c.admin_requests()
            if r.get("method") == "POST" and r.get("path", "").endswith(key + "/cancel")]


def refund_logs(c, order_id):
    return [r for r in c.job_log(order_id) if r["queue"] == Q]


def wait_logs(c, order_id, n, timeout_s=20):
    return harness.wait_until(lambda: len(refund_logs(c, order_id)) >= n and
                              refund_logs(c, order_id), timeout_s,
                              what=f"{n} refund job_log row(s) for {order_id}: "
                                   f"{refund_logs(c, order_id)}")


def wait_state(c, refund_id, state, timeout_s=20):
    harness.wait_until(lambda: refund_state(c, refund_id) == state, timeout_s,
                       what=f"refund {refund_id} to be {state} (now {refund_state(c, refund_id)})")


def wait_idle(c, timeout_s=20, queue=Q):
    harness.wait_until(lambda: sum(v for k, v in c.queue_depths(queue).items()
                                   if k != "dead") == 0,
                       timeout_s, what=f"queue {queue} to drain: {c.queue_depths(queue)}")


def dlq_for(c, queue=Q):
    return [e for e in c.dlq_entries() if e.get("queue") == queue]


# --------------------------------------------------------------------------------------------
# Tests


def test_refund_completes_with_one_effect_and_a_stable_key(c):
    key = paid_order(c, "order-1", amount=100)
    c.push_job(Q, refund_job("order-1", key, reason="customer_request"))
    w = c.start_worker()
    rid = derived_id("order-1", key, reason="customer_request")
    wait_state(c, rid, "SUCCEEDED")
    wait_idle(c)
    eff = c.admin_effects(key)
    assert eff["cancelEffects"] == 1 and eff["cancelledAmount"] == 100, eff
    assert eff["status"] == "CANCELLED" and eff["cancelReason"] == "customer_request", eff
    reqs = cancel_requests(c, key)
    assert [r["idempotencyKey"] for r in reqs] == [rid], reqs
    rows = refunds(c, "order-1")
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["id"], r["state"], r["amount_minor"], r["pg_status"], r["attempts"]) == \
        (rid, "SUCCEEDED", 100, "CANCELLED", 1), r
    assert (r["user_id"], r["transaction_key"], r["restock"]) == ("u1", key, False), r
    assert payment(c, "order-1") == ("REFUNDED", 100, 100)
    o = c.order("order-1")
    assert (o["status"], o["refunded_minor"]) == ("REFUNDED", 100), o
    logs = refund_logs(c, "order-1")
    assert [(x["outcome"], x["result"]) for x in logs] == [("done", "refunded")], logs
    assert dlq_for(c) == []
    assert not w.bad_log_lines(), w.bad_log_lines()[:3]


def test_same_refund_delivered_three_times_is_one_effect(c):
    key = paid_order(c, "order-3x", amount=100)
    job = refund_job("order-3x", key, amount=40, reason="damaged")
    for _ in range(3):
        c.push_job(Q, job)
    c.start_worker(c.env_for_worker(concurrency=4))
    logs = wait_logs(c, "order-3x", 3)
    wait_idle(c)
    assert sorted(x["result"] for x in logs) == ["already_refunded", "already_refunded",
                                                 "refunded"], logs
    rows = refunds(c, "order-3x")
    rid = derived_id("order-3x", key, 40, "damaged")
    assert [(r["id"], r["state"], r["amount_minor"]) for r in rows] == \
        [(rid, "SUCCEEDED", 40)], rows
    eff = c.admin_effects(key)
    assert eff["cancelEffects"] == 1 and eff["cancelledAmount"] == 40, eff
    reqs = cancel_requests(c, key)
    assert reqs and {r["idempotencyKey"] for r in reqs} == {rid}, reqs
    assert payment(c, "order-3x") == ("PARTIALLY_REFUNDED", 40, 100)
    assert c.order("order-3x")["status"] == "PARTIALLY_REFUNDED"
    # Once more, long after: still the same refund.
    c.push_job(Q, job)
    wait_logs(c, "order-3x", 4)
    assert c.admin_effects(key)["cancelEffects"] == 1
    assert len(refunds(c, "order-3x")) == 1
    assert payment(c, "order-3x") == ("PARTIALLY_REFUNDED", 40, 100)


@harness.timeout(90)
def test_kill9_mid_cancel_then_another_worker_gives_one_effect(c):
    key = paid_order(c, "order-k9", amount=100)
    # Every PG answer is slow: the cancel is applied at once, its answer comes 20 s later.
    c.admin_faults(slow_rate=1.0, slow_ms=20000)
    c.push_job(Q, refund_job("order-k9", key, id="refund-k9"))
    first = c.start_worker(c.env_for_worker(gateway_timeout_ms=30000, lease_ms=2000),
                           name="first")
    harness.wait_until(lambda: cancel_requests(c, key), 15, what="the first cancel request")
    assert c.admin_effects(key)["cancelEffects"] == 1
    assert refund_state(c, "refund-k9") == "REQUESTED"  # committed before the PG call
    first.kill9()
    c.admin_faults(slow_rate=0.0, fail_rate=0.0)
    c.start_worker(name="second")
    wait_state(c, "refund-k9", "SUCCEEDED", timeout_s=30)
    wait_idle(c)
    eff = c.admin_effects(key)
    assert eff["cancelEffects"] == 1 and eff["cancelledAmount"] == 100, eff
    reqs = cancel_requests(c, key)
    assert len(reqs) == 2 and {r["idempotencyKey"] for r in reqs} == {"refund-k9"}, reqs
    assert reqs[1]["replayed"] is True, reqs
    assert len(refunds(c, "order-k9")) == 1
    assert payment(c, "order-k9") == ("REFUNDED", 100, 100)
    logs = refund_logs(c, "order-k9")
    assert [x["result"] for x in logs] == ["refunded"], logs


@harness.timeout(90)
def test_kill9_during_a_slow_unapplied_answer_then_another_worker(c):
    key = paid_order(c, "order-k9b", amount=100)
    # An injected slow 503: the PG has not acted when the worker dies.
    c.admin_inject(key + "/cancel", 503, count=1, delay_ms=20000)
    c.push_job(Q, refund_job("order-k9b", key, amount=25))
    first = c.start_worker(c.env_for_worker(gateway_timeout_ms=30000), name="first")
    harness.wait_until(lambda: cancel_requests(c, key), 15, what="the first cancel request")
    first.kill9()
    assert c.admin_effects(key)["cancelEffects"] == 0
    c.start_worker(name="second")
    rid = derived_id("order-k9b", key, 25)
    wait_state(c, rid, "SUCCEEDED", timeout_s=30)
    eff = c.admin_effects(key)
    assert eff["cancelEffects"] == 1 and eff["cancelledAmount"] == 25, eff
    assert {r["idempotencyKey"] for r in cancel_requests(c, key)} == {rid}
    assert payment(c, "order-k9b") == ("PARTIALLY_REFUNDED", 25, 100)


def test_pg_applies_cancel_but_answers_too_late(c):
    key = paid_order(c, "order-late", amount=100)
    # The simulator applies a slow answer's effect before it sleeps; the worker gives up
    # after 500 ms (SETTLE_GATEWAY_TIMEOUT_MS in the test env).
    c.admin_faults(slow_rate=1.0, slow_ms=1500)
    c.push_job(Q, refund_job("order-late", key, id="refund-late"))
    c.start_worker(c.env_for_worker(retry_max_attempts=30))
    wait_state(c, "refund-late", "UNKNOWN", timeout_s=15)
    assert c.admin_effects(key)["cancelEffects"] == 1
    assert payment(c, "order-late")[0] == "SUCCESS"  # not refunded in our books yet
    c.admin_faults(slow_rate=0.0)
    wait_state(c, "refund-late", "SUCCEEDED", timeout_s=20)
    eff = c.admin_effects(key)
    assert eff["cancelEffects"] == 1 and eff["cancelledAmount"] == 100, eff
    reqs = cancel_requests(c, key)
    assert len(reqs) >= 2 and {r["idempotencyKey"] for r in reqs} == {"refund-late"}, reqs
    assert all(r["replayed"] for r in reqs[1:]), reqs
    r = refunds(c, "order-late")[0]
    assert r["attempts"] >= 2 and r["pg_status"] == "CANCELLED", r
    assert payment(c, "order-late") == ("REFUNDED", 100, 100)
    log = refund_logs(c, "order-late")
    assert len(log) == 1 and log[0]["result"] == "refunded" and log[0]["attempts"] >= 1, log


def test_unknown_outcome_exhausted_goes_to_manual_review_then_redrive(c):
    key = paid_order(c, "order-mr", amount=100)
    c.admin_faults(slow_rate=1.0, slow_ms=1500)
    c.push_job(Q, refund_job("order-mr", key, id="refund-mr"))
    c.start_worker(c.env_for_worker(retry_max_attempts=2))
    harness.wait_until(lambda: len(dlq_for(c)) == 1, 20, what="DLQ entry")
    e = dlq_for(c)[0]
    assert e["reason"] == "refund_unknown" and e["attempts"] == 2, e
    r = refunds(c, "order-mr")[0]
    assert r["state"] == "MANUAL_REVIEW" and r["failure_reason"] == "refund_unknown", r
    assert payment(c, "order-mr")[0] == "SUCCESS"  # never failed, never guessed
    assert [x["result"] for x in refund_logs(c, "order-mr")] == ["refund_unknown"]
    # The PG recovers; an operator re-drives the job: same key, the PG's first answer.
    c.admin_faults(slow_rate=0.0)
    c.check_settle(["dlq", "retry", e["id"]])
    wait_state(c, "refund-mr", "SUCCEEDED")
    assert c.admin_effects(key)["cancelEffects"] == 1
    assert payment(c, "order-mr") == ("REFUNDED", 100, 100)


def test_two_concurrent_refunds_of_60_on_100(c):
    key = paid_order(c, "order-cc", amount=100)
    c.push_job(Q, refund_job("order-cc", key, id="refund-a", amount=60))
    c.push_job(Q, refund_job("order-cc", key, id="refund-b", amount=60))
    c.start_worker(c.env_for_worker(concurrency=4))
    wait_logs(c, "order-cc", 2)
    wait_idle(c)
    rows = refunds(c, "order-cc")
    assert len(rows) == 1 and rows[0]["state"] == "SUCCEEDED", rows
    winner = rows[0]["id"]
    loser = ({"refund-a", "refund-b"} - {winner}).pop()
    dead = dlq_for(c)
    assert len(dead) == 1 and dead[0]["reason"] == "exceeds_balance", dead
    assert dead[0]["job"]["id"] == loser, dead
    eff = c.admin_effects(key)
    assert eff["cancelEffects"] == 1 and eff["cancelledAmount"] == 60, eff
    reqs = cancel_requests(c, key)
    assert [r["idempotencyKey"] for r in reqs] == [winner], reqs  # the PG saw 60, not 120
    assert payment(c, "order-cc") == ("PARTIALLY_REFUNDED", 60, 100)
    results = sorted(x["result"] for x in refund_logs(c, "order-cc"))
    assert results == ["exceeds_balance", "refunded"], results


def test_partial_refunds_add_up_to_the_total(c):
    key = paid_order(c, "order-p", amount=100)
    c.start_worker()
    c.push_job(Q, refund_job("order-p", key, id="part-1", amount=30))
    wait_state(c, "part-1", "SUCCEEDED")
    assert payment(c, "order-p") == ("PARTIALLY_REFUNDED", 30, 100)
    assert c.order("order-p")["status"] == "PARTIALLY_REFUNDED"
    # No amount: the whole remaining balance (70), resolved when the row is created.
    c.push_job(Q, refund_job("order-p", key, id="part-2"))
    wait_state(c, "part-2", "SUCCEEDED")
    assert c.sql_value("SELECT amount_minor FROM refunds WHERE id = 'part-2'") == 70
    assert payment(c, "order-p") == ("REFUNDED", 100, 100)
    o = c.order("order-p")
    assert (o["status"], o["refunded_minor"]) == ("REFUNDED", 100), o
    eff = c.admin_effects(key)
    assert (eff["cancelEffects"], eff["cancelledAmount"], eff["status"]) == \
        (2, 100, "CANCELLED"), eff
    # Nothing is left: another refund never reaches the PG.
    c.push_job(Q, refund_job("order-p", key, id="part-3", amount=1))
    harness.wait_until(lambda: len(dlq_for(c)) == 1, 15, what="DLQ entry")
    assert dlq_for(c)[0]["reason"] == "payment_not_refundable", dlq_for(c)
    assert len(cancel_requests(c, key)) == 2


def test_restock_puts_units_back_once_in_both_stores(c):
    key = reconciled_order(c, "order-rs", amount=100, items={"sku-a": 2, "sku-b": 1})
    assert (c.product_stock("sku-a"), c.product_stock("sku-b")) == (8, 9)
    assert (c.stock_available("sku-a"), c.stock_available("sku-b")) == (8, 9)
    job = refund_job("order-rs", key, amount=40, restock=True, reason="returned")
    c.push_job(Q, job)
    c.push_job(Q, job)
    # A second refund of the same order that also asks for a restock: the order's units go
    # back once, not once per refund.
    c.push_job(Q, refund_job("order-rs", key, id="rs-2", amount=60, restock=True))
    c.start_worker(c.env_for_worker(concurrency=4))
    wait_logs(c, "order-rs", 3)
    wait_idle(c)
    assert (c.product_stock("sku-a"), c.product_stock("sku-b")) == (10, 10)
    assert (c.stock_available("sku-a"), c.stock_available("sku-b")) == (10, 10)
    rows = refunds(c, "order-rs")
    assert sorted((r["amount_minor"], r["state"]) for r in rows) == \
        [(40, "SUCCEEDED"), (60, "SUCCEEDED")], rows
    assert sum(1 for r in rows if r["restocked"]) == 1, rows
    resv = {k.decode(): v.decode() for k, v in
            c.redis.hgetall(c.key("resv:order-rs")).items()}
    assert resv["state"] == "committed" and resv["restocked_by"] in {r["id"] for r in rows}, resv
    assert payment(c, "order-rs") == ("REFUNDED", 100, 100)
    assert c.order("order-rs")["status"] == "REFUNDED"
    assert c.admin_effects(key)["cancelEffects"] == 2
    # Delivered again later: nothing moves.
    c.push_job(Q, job)
    wait_logs(c, "order-rs", 4)
    assert (c.product_stock("sku-a"), c.stock_available("sku-a")) == (10, 10)


def test_out_of_stock_after_charge_refunds_the_customer_exactly_once(c):
    c.add_product("sku-z", 2)
    c.add_order("order-o1", "u1", 5000, {"sku-z": 2})
    c.stock_load()
    assert c.reserve("order-o1", {"sku-z": 2}).returncode == 0
    # The reservation lapses and someone else takes the units.
    c.check_settle(["stock", "release", "order-o1"])
    c.add_order("order-o2", "u2", 100, {"sku-z": 2})
    assert c.reserve("order-o2", {"sku-z": 2}).returncode == 0
    key = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id="order-o1", amount=5000,
                                        status="SUCCESS"))
    job = {"order_id": "order-o1", "user_id": "u1", "transaction_key": key}
    c.push_job("reconcile", job)
    c.start_worker(c.env_for_worker(concurrency=4))
    wait_state(c, "oos:order-o1", "SUCCEEDED")
    wait_idle(c)
    wait_idle(c, queue="reconcile")
    o = c.order("order-o1")
    assert (o["status"], o["failure_reason"], o["refunded_minor"]) == \
        ("FAILED", "out_of_stock", 5000), o
    assert payment(c, "order-o1") == ("REFUNDED", 5000, 5000)
    eff = c.admin_effects(key)
    assert eff["cancelEffects"] == 1 and eff["cancelledAmount"] == 5000, eff
    assert eff["cancelReason"] == "out_of_stock", eff
    assert [r["idempotencyKey"] for r in cancel_requests(c, key)] == ["oos:order-o1"]
    # Units never left the shelf for this order: nothing is restocked.
    assert c.product_stock("sku-z") == 2 and c.stock_available("sku-z") == 0
    assert [x["result"] for x in refund_logs(c, "order-o1")] == ["refunded"]
    # The reconcile job and the refund job delivered again: still one refund.
    c.push_job("reconcile", job)
    c.push_job(Q, {"id": "oos:order-o1", "order_id": "order-o1", "user_id": "u1",
                   "transaction_key": key, "reason": "out_of_stock", "restock": False})
    wait_logs(c, "order-o1", 2)
    wait_idle(c)
    wait_idle(c, queue="reconcile")
    assert c.admin_effects(key)["cancelEffects"] == 1
    assert len(refunds(c, "order-o1")) == 1
    assert payment(c, "order-o1") == ("REFUNDED", 5000, 5000)
    assert c.order_status("order-o1") == "FAILED"
    assert dlq_for(c) == [] and dlq_for(c, "reconcile") == []


def test_refund_of_a_payment_that_is_not_success_never_reaches_the_pg(c):
    c.add_product("sku-a", 10)
    key = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id="order-nf", amount=100,
                                        status="FAILED"))
    c.add_order("order-nf", "u1", 100, {"sku-a": 1}, status="FAILED", tx_key=key,
                payment_status="FAILED")
    pkey = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id="order-np", amount=100,
                                         status="PENDING"))
    c.add_order("order-np", "u1", 100, {"sku-a": 1}, tx_key=pkey, payment_status="PENDING")
    c.push_job(Q, refund_job("order-nf", key, amount=10))
    c.push_job(Q, refund_job("order-np", pkey))
    c.start_worker(c.env_for_worker(retry_max_attempts=3))
    harness.wait_until(lambda: len(dlq_for(c)) == 2, 20, what="2 DLQ entries")
    by_order = {e["job"]["order_id"]: e for e in dlq_for(c)}
    assert by_order["order-nf"]["reason"] == "payment_not_refundable", by_order
    assert by_order["order-nf"]["attempts"] == 0, by_order  # FAILED: at once
    # PENDING may still settle (the out-of-stock refund races its reconcile job), so it is
    # retried first, then dead-lettered.
    assert by_order["order-np"]["reason"] == "payment_not_refundable", by_order
    assert by_order["order-np"]["attempts"] == 3, by_order
    assert cancel_requests(c, key) == [] and cancel_requests(c, pkey) == []
    assert c.sql_value("SELECT count(*) FROM refunds") == 0
    assert [x["result"] for x in refund_logs(c, "order-nf")] == ["payment_not_refundable"]


def test_forged_refunds_are_rejected_as_order_mismatch(c):
    key = paid_order(c, "order-fg", user="owner", amount=100)
    other = paid_order(c, "order-other", user="owner", amount=100)
    c.push_job(Q, refund_job("order-fg", key, user="intruder", amount=10))
    c.push_job(Q, refund_job("order-fg", other, user="owner", amount=10))
    c.start_worker()
    harness.wait_until(lambda: len(dlq_for(c)) == 2, 15, what="2 DLQ entries")
    assert [e["reason"] for e in dlq_for(c)] == ["order_mismatch", "order_mismatch"]
    assert cancel_requests(c, key) == [] and cancel_requests(c, other) == []
    assert c.sql_value("SELECT count(*) FROM refunds") == 0
    assert payment(c, "order-fg") == ("SUCCESS", 0, 100)


def test_pg_answers_409_422_and_400(c):
    # 409 for a payment someone fully cancelled at the PG directly: the PG's state covers
    # this refund, so it is recorded as done without a second effect.
    k409 = paid_order(c, "order-409", amount=100)
    r = c.api("POST", f"/api/v1/payments/{k409}/cancel", user_id="u1",
              body={"reason": "console"}, headers={"Idempotency-Key": "console-1"})
    assert r.status == 200, r
    # 422: the PG's balance (50) is lower than what our books allow (100).
    k422 = paid_order(c, "order-422", amount=100)
    r = c.api("POST", f"/api/v1/payments/{k422}/cancel", user_id="u1",
              body={"amount": 50, "reason": "console"}, headers={"Idempotency-Key": "console-2"})
    assert r.status == 200, r
    # 400: any other refusal.
    k400 = paid_order(c, "order-400", amount=100)
    c.admin_inject(k400 + "/cancel", 400, count=5)
    c.push_job(Q, refund_job("order-409", k409, id="r-409"))
    c.push_job(Q, refund_job("order-422", k422, id="r-422", amount=60))
    c.push_job(Q, refund_job("order-400", k400, id="r-400", amount=10))
    c.start_worker()
    wait_state(c, "r-409", "SUCCEEDED")
    wait_state(c, "r-422", "FAILED")
    wait_state(c, "r-400", "FAILED")
    harness.wait_until(lambda: len(dlq_for(c)) == 2, 15, what="2 DLQ entries")
    by_order = {e["job"]["order_id"]: e for e in dlq_for(c)}
    assert by_order["order-422"]["reason"] == "exceeds_balance", by_order
    assert "422" in by_order["order-422"]["error"], by_order
    assert by_order["order-400"]["reason"] == "gateway_rejected", by_order
    assert "400" in by_order["order-400"]["error"], by_order
    assert c.admin_effects(k409)["cancelEffects"] == 1
    assert payment(c, "order-409") == ("REFUNDED", 100, 100)
    assert c.sql("SELECT state, failure_reason, pg_status FROM refunds WHERE id = 'r-422'") == \
        [("FAILED", "exceeds_balance", "HTTP 422")]
    assert payment(c, "order-422") == ("SUCCESS", 0, 100)
    assert len(cancel_requests(c, k400)) == 1  # a definite refusal is not retried
    # A FAILED refund delivered again is dead-lettered again with its reason, PG untouched.
    c.push_job(Q, refund_job("order-400", k400, id="r-400", amount=10))
    harness.wait_until(lambda: len(dlq_for(c)) == 3, 15, what="3 DLQ entries")
    assert dlq_for(c)[0]["reason"] == "gateway_rejected"
    assert len(cancel_requests(c, k400)) == 1


def test_enqueue_refund_from_the_cli(c):
    key = paid_order(c, "order-cli", amount=100)
    job = json.dumps(refund_job("order-cli", key, amount=15, reason="goodwill"))
    r = c.check_settle(["enqueue", "refund", job, "--id", "cli-1"])
    assert "enqueued" in r.stdout, r.stdout
    c.start_worker()
    wait_state(c, "cli-1", "SUCCEEDED")
    assert [x["idempotencyKey"] for x in cancel_requests(c, key)] == ["cli-1"]
    assert payment(c, "order-cli") == ("PARTIALLY_REFUNDED", 15, 100)


if __name__ == "__main__":
    harness.main(globals())
