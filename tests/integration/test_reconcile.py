"""test_reconcile.py - reconcile jobs end to end against real Redis, PostgreSQL and the PG
simulator: every PG outcome, retries and their exhaustion, the dead-letter queue and its
re-drive, deduplication, hostile jobs, the out-of-stock path and the reservation reaper.

Each test prepares orders, reservations and PG transactions, runs a real `settle work`
process, and asserts on what a user sees: orders/payments/products/job_log rows, Redis keys,
the requests the simulator received, and DLQ envelopes."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

Q = "reconcile"


def setup_order(c, order_id, user="u1", amount=5000, items=None, age_s=0, stock=10,
                reserve=True):
    """A product per SKU (if missing), the order, its reservation, and Redis stock."""
    items = items or {"sku-a": 2}
    for sku in items:
        if c.product_stock(sku) is None:
            c.add_product(sku, stock)
    c.add_order(order_id, user, amount, items, age_s=age_s)
    c.stock_load()
    if reserve:
        r = c.reserve(order_id, items)
        assert r.returncode == 0, r.stdout + r.stderr


def pg_tx(c, order_id, user="u1", amount=5000, status="SUCCESS", **extra):
    return c.tx_key_of(c.admin_create_tx(user_id=user, order_id=order_id, amount=amount,
                                         status=status, **extra))


def wait_done(c, order_id, statuses, timeout_s=20):
    harness.wait_until(lambda: c.order_status(order_id) in statuses, timeout_s,
                       what=f"order {order_id} to reach {statuses} "
                            f"(now {c.order_status(order_id)})")


def wait_idle(c, timeout_s=20, queue=Q):
    harness.wait_until(lambda: sum(v for k, v in c.queue_depths(queue).items()
                                   if k != "dead") == 0,
                       timeout_s, what=f"queue {queue} to drain: {c.queue_depths(queue)}")


def requests_for(c, needle):
    return [r for r in c.admin_requests() if needle in (r.get("path", "") + "?" +
                                                        (r.get("query") or ""))]


def test_success_completes_order_and_commits_stock(c):
    setup_order(c, "order-s1", items={"sku-a": 2, "sku-b": 1})
    key = pg_tx(c, "order-s1")
    c.push_job(Q, {"order_id": "order-s1", "user_id": "u1", "transaction_key": key})
    w = c.start_worker()
    wait_done(c, "order-s1", {"COMPLETED"})
    wait_idle(c)
    assert c.product_stock("sku-a") == 8 and c.product_stock("sku-b") == 9
    assert c.resv_state("order-s1") == "committed"
    # Redis available = on hand - active reservations (none left).
    assert c.stock_available("sku-a") == 8 and c.stock_available("sku-b") == 9
    pay = c.sql("SELECT status, transaction_key, amount_minor, card_last4 FROM payments "
                "WHERE order_id = 'order-s1'")
    assert pay == [("SUCCESS", key, 5000, "3456")], pay
    log = c.job_log("order-s1")
    assert [(r["outcome"], r["result"]) for r in log] == [("done", "completed")], log
    assert w.alive()
    assert not w.bad_log_lines(), w.bad_log_lines()[:3]


def test_lookup_by_order_id_when_no_key_is_known(c):
    setup_order(c, "order-s2")
    pg_tx(c, "order-s2")
    c.push_job(Q, {"order_id": "order-s2", "user_id": "u1"})
    c.start_worker()
    wait_done(c, "order-s2", {"COMPLETED"})
    assert requests_for(c, "orderId=order-s2"), c.admin_requests()


def test_failed_payment_releases_stock(c):
    setup_order(c, "order-f1", items={"sku-a": 3})
    assert c.stock_available("sku-a") == 7
    key = pg_tx(c, "order-f1", status="FAILED", reason="LIMIT_EXCEEDED")
    c.push_job(Q, {"order_id": "order-f1", "user_id": "u1", "transaction_key": key})
    c.start_worker()
    wait_done(c, "order-f1", {"FAILED"})
    wait_idle(c)
    o = c.order("order-f1")
    assert o["failure_reason"] == "LIMIT_EXCEEDED", o
    assert c.resv_state("order-f1") == "released"
    assert c.stock_available("sku-a") == 10 and c.product_stock("sku-a") == 10
    assert c.sql_value("SELECT status FROM payments WHERE order_id='order-f1'") == "FAILED"


def test_pending_then_success_is_checked_again(c):
    setup_order(c, "order-p1")
    key = pg_tx(c, "order-p1", status="PENDING", final_status="SUCCESS", final_after_ms=1200)
    c.push_job(Q, {"order_id": "order-p1", "user_id": "u1", "transaction_key": key})
    c.start_worker()
    wait_done(c, "order-p1", {"COMPLETED"})
    o = c.order("order-p1")
    assert o["check_count"] >= 1, o
    log = c.job_log("order-p1")
    assert len(log) == 1 and log[0]["attempts"] == 0, log  # re-checks spend no attempts
    assert len(requests_for(c, key)) >= 2


def test_no_payment_past_window_expires_and_releases(c):
    # The window is 5 s in the test env; the order is 4 s old, so the first look is a 404
    # inside the window (re-check), and a later one is past it.
    setup_order(c, "order-e1", age_s=4, items={"sku-a": 4})
    c.push_job(Q, {"order_id": "order-e1", "user_id": "u1"})
    c.start_worker()
    wait_done(c, "order-e1", {"EXPIRED"})
    wait_idle(c)
    assert c.order("order-e1")["failure_reason"] == "payment_window_passed"
    assert c.resv_state("order-e1") == "released"
    assert c.stock_available("sku-a") == 10
    assert len(requests_for(c, "orderId=order-e1")) >= 2


def test_two_503s_then_200_gives_one_outcome(c):
    setup_order(c, "order-r1")
    key = pg_tx(c, "order-r1")
    c.admin_inject(key, 503, count=2)
    c.push_job(Q, {"order_id": "order-r1", "user_id": "u1", "transaction_key": key})
    c.start_worker()
    wait_done(c, "order-r1", {"COMPLETED"})
    wait_idle(c)
    assert len(requests_for(c, key)) == 3
    assert c.product_stock("sku-a") == 8
    log = c.job_log("order-r1")
    assert len(log) == 1 and log[0]["attempts"] == 2, log


def test_retry_after_is_honoured(c):
    setup_order(c, "order-r2")
    key = pg_tx(c, "order-r2")
    c.admin_inject(key, 429, count=1, retry_after_s=1)
    c.push_job(Q, {"order_id": "order-r2", "user_id": "u1", "transaction_key": key})
    c.start_worker()
    wait_done(c, "order-r2", {"COMPLETED"})
    reqs = requests_for(c, key)
    assert len(reqs) == 2, reqs
    gap = reqs[1]["ts_ms"] - reqs[0]["ts_ms"]
    assert gap >= 950, f"second try {gap} ms after a Retry-After of 1 s"


def test_pg_slower_than_timeout_is_retried(c):
    setup_order(c, "order-t1")
    key = pg_tx(c, "order-t1")
    c.admin_inject(key, 200, count=1, delay_ms=1500, body=json.dumps(
        {"meta": {"result": "SUCCESS"}, "data": {"transactionKey": key, "orderId": "order-t1",
                                                 "amount": 5000, "status": "FAILED"}}))
    c.push_job(Q, {"order_id": "order-t1", "user_id": "u1", "transaction_key": key})
    c.start_worker()  # gateway timeout 500 ms in the test env
    wait_done(c, "order-t1", {"COMPLETED"})
    assert len(requests_for(c, key)) == 2
    assert c.job_log("order-t1")[0]["attempts"] == 1


def test_retries_exhausted_go_to_dlq_with_reason_and_attempts(c):
    setup_order(c, "order-x1")
    key = pg_tx(c, "order-x1")
    c.admin_inject(key, 503, count=100)
    c.push_job(Q, {"order_id": "order-x1", "user_id": "u1", "transaction_key": key})
    w = c.start_worker(c.env_for_worker(retry_max_attempts=3))
    harness.wait_until(lambda: len(c.dlq_entries()) == 1, 20, what="DLQ entry")
    e = c.dlq_entries()[0]
    assert e["reason"] == "gateway_unavailable", e
    assert e["attempts"] == 3 and e["queue"] == Q, e
    assert "503" in e["error"], e
    assert e["job"]["order_id"] == "order-x1", e
    assert c.order_status("order-x1") == "PENDING"  # left for a later sweep
    assert len(requests_for(c, key)) == 3
    log = c.job_log("order-x1")
    assert [(r["outcome"], r["result"]) for r in log] == [("dead", "gateway_unavailable")]
    assert w.alive()


def test_other_4xx_is_dead_at_once(c):
    setup_order(c, "order-x2")
    key = pg_tx(c, "order-x2")
    c.admin_inject(key, 400, count=5)
    c.push_job(Q, {"order_id": "order-x2", "user_id": "u1", "transaction_key": key})
    c.start_worker()
    harness.wait_until(lambda: len(c.dlq_entries()) == 1, 15, what="DLQ entry")
    assert c.dlq_entries()[0]["reason"] == "gateway_rejected"
    assert len(requests_for(c, key)) == 1


def test_pg_answer_for_another_amount_never_completes(c):
    setup_order(c, "order-m1", amount=5000)
    key = pg_tx(c, "order-m1", amount=1)
    c.push_job(Q, {"order_id": "order-m1", "user_id": "u1", "transaction_key": key})
    c.start_worker()
    harness.wait_until(lambda: len(c.dlq_entries()) == 1, 15, what="DLQ entry")
    assert c.dlq_entries()[0]["reason"] == "gateway_mismatch"
    assert c.order_status("order-m1") == "PENDING"
    assert c.product_stock("sku-a") == 10


def test_job_for_someone_elses_order_is_rejected(c):
    setup_order(c, "order-m2", user="owner")
    pg_tx(c, "order-m2", user="owner")
    c.push_job(Q, {"order_id": "order-m2", "user_id": "intruder"})
    c.start_worker()
    harness.wait_until(lambda: len(c.dlq_entries()) == 1, 15, what="DLQ entry")
    assert c.dlq_entries()[0]["reason"] == "order_mismatch"
    assert c.order_status("order-m2") == "PENDING"


def test_bad_jobs_go_to_dlq_and_good_ones_still_run(c):
    setup_order(c, "order-g1")
    pg_tx(c, "order-g1")
    bad = [
        b"not json",
        b'{"order_id": "x"',
        b"[1, 2, 3]",
        b'"a string"',
        b'{"user_id": "u1"}',
        b'{"order_id": 12, "user_id": "u1"}',
        b'{"order_id": "", "user_id": "u1"}',
        b'{"order_id": "\xff\xfe", "user_id": "u1"}',
        b'{"order_id": "a\x00b", "user_id": "u1"}',
        b'{"order_id": "' + b"x" * 3000 + b'", "user_id": "u1"}',
        b"[" * 100000 + b"]" * 100000,
    ]
    for raw in bad[:5]:
        c.push_job(Q, raw)
    c.push_job(Q, {"order_id": "order-g1", "user_id": "u1", "unknown_field": [1, {"x": 2}]})
    for raw in bad[5:]:
        c.push_job(Q, raw)
    w = c.start_worker(c.env_for_worker(job_max_bytes=4096))
    wait_done(c, "order-g1", {"COMPLETED"})
    harness.wait_until(lambda: len(c.dlq_entries()) == len(bad), 15,
                       what=f"{len(bad)} DLQ entries, have {len(c.dlq_entries())}")
    entries = c.dlq_entries()
    assert all(e["reason"] == "invalid_job" for e in entries), entries
    assert all(e["error"] for e in entries), entries
    # The DLQ keeps every job text byte for byte, even the oversized and non-UTF-8 ones.
    kept = set(c.redis.hvals(c.key("dead:jobs")))
    assert kept == set(bad), "dead:jobs does not hold the exact job texts"
    oversized = [e for e in entries if "over the 4096-byte limit" in e["error"]]
    assert len(oversized) == 1 and oversized[0]["job"] is None, oversized
    assert w.alive()
    assert len([r for r in c.job_log() if r["outcome"] == "dead"]) == len(bad)


def test_same_job_twice_decrements_stock_once(c):
    setup_order(c, "order-d1", items={"sku-a": 3})
    key = pg_tx(c, "order-d1")
    job = {"order_id": "order-d1", "user_id": "u1", "transaction_key": key}
    c.push_job(Q, job)
    c.push_job(Q, job)
    c.start_worker()
    wait_done(c, "order-d1", {"COMPLETED"})
    wait_idle(c)
    assert c.product_stock("sku-a") == 7
    results = sorted(r["result"] for r in c.job_log("order-d1"))
    assert results == ["completed", "skipped"], results


def test_enqueue_with_id_is_deduplicated(c):
    setup_order(c, "order-d2")
    first = c.check_settle(["enqueue", "reconcile",
                            '{"order_id":"order-d2","user_id":"u1"}', "--id", "rq-1"])
    second = c.check_settle(["enqueue", "reconcile",
                             '{"order_id":"order-d2","user_id":"u1"}', "--id", "rq-1"])
    assert "enqueued" in first.stdout and "duplicate" in second.stdout
    assert c.queue_depths()["ready"] == 1
    raw = json.loads(c.redis.lindex(c.key("queue:reconcile"), 0))
    assert raw["id"] == "rq-1" and isinstance(raw["enqueued_at_ms"], int)
    # The same operation as a shipped script, as another service would call it (stdin).
    r = c.check_settle(["enqueue", "reconcile", "-"],
                       input='{"order_id":"order-d2","user_id":"u1","id":"rq-1"}')
    assert "duplicate" in r.stdout
    bad = c.run_settle(["enqueue", "reconcile", '{"order_id": 1}'])
    assert bad.returncode == 2 and "order_id" in bad.stderr, bad.stderr


def test_dlq_retry_completes_once_the_cause_is_gone(c):
    c.push_job(Q, {"order_id": "order-late", "user_id": "u1"})
    c.start_worker()
    harness.wait_until(lambda: len(c.dlq_entries()) == 1, 15, what="DLQ entry")
    e = c.dlq_entries()[0]
    assert e["reason"] == "order_not_found", e
    listed = json.loads(c.check_settle(["dlq", "list", "--json"]).stdout)
    assert [x["id"] for x in listed] == [e["id"]]
    text = c.check_settle(["stats", "--json"]).stdout
    assert json.loads(text)["queues"]["reconcile"]["dead"] == 1, text
    # The cause goes away: the order and its payment now exist.
    setup_order(c, "order-late")
    pg_tx(c, "order-late")
    r = c.check_settle(["dlq", "retry", e["id"]])
    assert "re-queued" in r.stdout, r.stdout
    wait_done(c, "order-late", {"COMPLETED"})
    assert c.dlq_entries() == []
    assert json.loads(c.check_settle(["stats", "--json"]).stdout)["queues"]["reconcile"][
        "dead"] == 0
    assert c.run_settle(["dlq", "retry", e["id"]]).returncode == 1  # already gone


def test_dlq_purge_and_retry_all_by_reason(c):
    for i in range(3):
        c.push_job(Q, f"bad-{i}")
    c.push_job(Q, {"order_id": "order-none", "user_id": "u1"})
    c.start_worker()
    harness.wait_until(lambda: len(c.dlq_entries()) == 4, 15, what="4 DLQ entries")
    r = c.check_settle(["dlq", "purge", "--all", "--reason", "invalid_job"])
    assert "purged: 3" in r.stdout, r.stdout
    assert [e["reason"] for e in c.dlq_entries()] == ["order_not_found"]
    setup_order(c, "order-none")
    pg_tx(c, "order-none")
    c.check_settle(["dlq", "retry", "--all"])
    wait_done(c, "order-none", {"COMPLETED"})


def test_out_of_stock_after_charge_fails_order_and_enqueues_refund(c):
    setup_order(c, "order-o1", items={"sku-z": 2}, stock=2)
    # The reservation is released (as the reaper would after its deadline) and someone
    # else takes the units.
    c.check_settle(["stock", "release", "order-o1"])
    c.add_order("order-o2", "u2", 100, {"sku-z": 2})
    assert c.reserve("order-o2", {"sku-z": 2}).returncode == 0
    key = pg_tx(c, "order-o1")
    c.push_job(Q, {"order_id": "order-o1", "user_id": "u1", "transaction_key": key})
    c.start_worker(c.env_for_worker(queues="reconcile"))
    wait_done(c, "order-o1", {"FAILED"})
    assert c.order("order-o1")["failure_reason"] == "out_of_stock"
    assert c.resv_state("order-o1") == "out_of_stock"
    assert c.stock_available("sku-z") == 0 and c.product_stock("sku-z") == 2
    refunds = [json.loads(x) for x in c.redis.lrange(c.key("queue:refund"), 0, -1)]
    assert len(refunds) == 1, refunds
    assert refunds[0]["id"] == "oos:order-o1" and refunds[0]["transaction_key"] == key
    assert c.sql_value("SELECT status FROM payments WHERE order_id='order-o1'") == "SUCCESS"


def test_pending_too_long_goes_to_manual_review(c):
    setup_order(c, "order-mr", age_s=3600)
    key = pg_tx(c, "order-mr", status="PENDING")
    c.push_job(Q, {"order_id": "order-mr", "user_id": "u1", "transaction_key": key})
    c.start_worker(c.env_for_worker(pending_max_age_ms=60000))
    wait_done(c, "order-mr", {"MANUAL_REVIEW"})
    assert c.order("order-mr")["failure_reason"] == "pending_too_long"
    assert c.resv_state("order-mr") == "reserved"  # never guessed


def test_reservation_reaper_releases_expired_reservations(c):
    c.add_product("sku-r", 5)
    c.add_order("order-rr", "u1", 100, {"sku-r": 3})
    c.stock_load()
    assert c.reserve("order-rr", {"sku-r": 3}, ttl_ms=300).returncode == 0
    assert c.stock_available("sku-r") == 2
    c.start_worker()
    harness.wait_until(lambda: c.resv_state("order-rr") == "released", 10,
                       what="the reaper to release the reservation")
    assert c.stock_available("sku-r") == 5


def test_order_already_completed_by_a_callback_is_respected(c):
    setup_order(c, "order-cb")
    key = pg_tx(c, "order-cb")
    c.sql("UPDATE orders SET status='COMPLETED' WHERE id='order-cb'")
    c.push_job(Q, {"order_id": "order-cb", "user_id": "u1", "transaction_key": key})
    c.start_worker()
    harness.wait_until(lambda: len(c.job_log("order-cb")) == 1, 15, what="job_log row")
    assert c.job_log("order-cb")[0]["result"] == "skipped"
    assert requests_for(c, key) == []  # nothing to ask the PG
    assert c.product_stock("sku-a") == 10  # the callback handler owns that change


def status_gets(c):
    """Arrival times (ms) of the status GETs the simulator received, in order."""
    return sorted(r["ts_ms"] for r in c.admin_requests()
                  if r["method"] == "GET" and r["path"].startswith("/api/v1/payments/"))


def test_status_concurrency_bounds_pg_queries_in_flight(c):
    """SETTLE_STATUS_CONCURRENCY=2 with 8 jobs held: every status query takes 300 ms, and a
    third may reach the PG only when one of the two out has ended. All jobs complete."""
    orders = [f"order-sc{i}" for i in range(6)]
    for o in orders:
        setup_order(c, o, items={"sku-a": 1})
        c.push_job(Q, {"order_id": o, "user_id": "u1", "transaction_key": pg_tx(c, o)})
    c.admin_faults(latency_min_ms=300, latency_max_ms=300)
    w = c.start_worker(c.env_for_worker(concurrency=8, status_concurrency=2))
    for o in orders:
        wait_done(c, o, {"COMPLETED"})
    gets = status_gets(c)
    assert len(gets) == len(orders), gets
    for first, third in zip(gets, gets[2:]):
        assert third - first >= 250, f"three status queries within 300 ms: {gets}"
    # The two slots were used at once, not one after the other.
    assert gets[1] - gets[0] < 150, gets
    wait_idle(c)
    assert c.product_stock("sku-a") == 10 - len(orders)
    assert "(status queries 2)" in w.log_text()


def test_jobs_waiting_for_a_status_slot_are_handed_back_at_shutdown(c):
    """Jobs that never got a status query slot before the shutdown grace ran out go back to
    the queue (no attempt spent) and the worker exits; the one whose query was out finishes
    or goes back too, and nothing is lost."""
    orders = [f"order-sw{i}" for i in range(5)]
    for o in orders:
        setup_order(c, o, items={"sku-a": 1})
        c.push_job(Q, {"order_id": o, "user_id": "u1", "transaction_key": pg_tx(c, o)})
    c.admin_faults(latency_min_ms=400, latency_max_ms=400)
    w = c.start_worker(c.env_for_worker(concurrency=5, status_concurrency=1,
                                        shutdown_grace_ms=300))
    harness.wait_until(lambda: len(status_gets(c)) >= 1 and c.queue_depths(Q)["inflight"] == 5,
                       10, what=f"5 jobs held, one query out: {c.queue_depths(Q)}")
    code = w.stop(timeout=10)
    assert code == 0, code
    done = [o for o in orders if c.order_status(o) == "COMPLETED"]
    assert len(done) <= 2, done  # 300 ms grace, 400 ms per query, one at a time
    d = c.queue_depths(Q)
    assert d["inflight"] == 0 and d["dead"] == 0, d
    # Handed back due at once (the delayed set, due now), not left to their lease.
    assert d["ready"] + d["delayed"] + len(done) == len(orders), (d, done)
    # The rest finish on the next worker.
    c.admin_faults(latency_min_ms=0, latency_max_ms=0)
    c.start_worker()
    for o in orders:
        wait_done(c, o, {"COMPLETED"})
    wait_idle(c)
    assert c.product_stock("sku-a") == 10 - len(orders)


if __name__ == "__main__":
    harness.main(globals())
