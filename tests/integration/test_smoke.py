"""test_smoke.py - the first end-to-end check: the harness starts its servers, `settle
migrate` creates the schema exactly once, and `settle pgsim` serves the seed 001 API
(a transaction is visible to its own user only)."""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def test_servers_answer(c):
    assert c.redis.ping()
    assert c.sql_value("SELECT current_database()") == "settle"
    assert c.redis_url.startswith("redis://127.0.0.1:")
    assert c.database_url == f"postgresql://postgres@127.0.0.1:{c.pg_port}/settle"


def test_migrate_is_idempotent(c):
    c.migrate()
    versions = c.sql("SELECT version FROM schema_migrations ORDER BY version")
    assert versions, "schema_migrations is empty after settle migrate"
    tables = {r[0] for r in c.sql(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    missing = {"products", "orders", "order_items", "payments", "job_log"} - tables
    assert not missing, f"tables missing after migrate: {sorted(missing)}"
    applied_at = c.sql("SELECT version, applied_at FROM schema_migrations ORDER BY version")

    # A second run applies nothing: the same rows, with their first applied_at.
    r = c.migrate()
    assert c.sql("SELECT version, applied_at FROM schema_migrations ORDER BY version") == \
        applied_at, f"second migrate changed schema_migrations; output: {r.stdout}{r.stderr}"


def test_pgsim_health(c):
    r = harness.http("GET", c.gateway_url + harness.PGSIM_HEALTH)
    assert r.status == 200, r


def test_pgsim_transaction_visible_to_its_user_only(c):
    created = c.admin_create_tx(user_id="user-1", order_id="order-000001", amount=5000,
                                status="SUCCESS", card_type="SAMSUNG",
                                card_no="1234-5678-9814-1451")
    key = c.tx_key_of(created)

    r = c.api("GET", f"/api/v1/payments/{key}", user_id="user-1")
    assert r.status == 200, r
    body = r.json
    assert body["meta"]["result"] == "SUCCESS", body
    data = body["data"]
    assert data["transactionKey"] == key, data
    assert data["orderId"] == "order-000001", data
    assert data["amount"] == 5000, data
    assert data["status"] == "SUCCESS", data

    other = c.api("GET", f"/api/v1/payments/{key}", user_id="user-2")
    assert other.status == 404, other

    # The request log saw both lookups, with their users and answers.
    seen = [(e["userId"], e["status"]) for e in c.admin_requests()
            if e["path"] == f"/api/v1/payments/{key}"]
    assert seen == [("user-1", 200), ("user-2", 404)], seen


def test_pgsim_payment_api(c):
    # The public POST creates a PENDING payment that its user can look up by order.
    r = c.pg_pay("user-3", "order-000003", 1200)
    assert r.status == 200, r
    key = c.tx_key_of(r.json)
    listed = c.api("GET", "/api/v1/payments?orderId=order-000003", user_id="user-3")
    assert listed.status == 200, listed
    assert key in listed.body.decode(), listed


def test_pgsim_holds_slow_answers_and_stops_promptly(c):
    """Delayed answers are held by suspending their connections, not by sleeping threads: 50
    status GETs delayed 400 ms all answer after ~400 ms while a health check in between
    answers at once, and a stop with an answer still held (30 s) is prompt."""
    key = c.tx_key_of(c.admin_create_tx(user_id="u-slow", order_id="order-slow", amount=100,
                                        status="SUCCESS"))
    url = f"{c.gateway_url}/api/v1/payments/{key}"
    c.admin_faults(latency_min_ms=400, latency_max_ms=400)
    out = []

    def get(timeout):
        t0 = time.monotonic()
        try:
            r = harness.http("GET", url, headers={"X-USER-ID": "u-slow"}, timeout=timeout)
            out.append((r.status, time.monotonic() - t0))
        except OSError as e:
            out.append((repr(e), time.monotonic() - t0))

    threads = [threading.Thread(target=get, args=(10,)) for _ in range(50)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    assert harness.http("GET", c.gateway_url + harness.PGSIM_HEALTH, timeout=2).status == 200
    assert time.monotonic() - t0 < 0.2, "a health check waited behind the held answers"
    for t in threads:
        t.join(15)
    assert len(out) == 50 and all(s == 200 for s, _ in out), out
    assert all(0.35 <= dt < 2.0 for _, dt in out), sorted(dt for _, dt in out)

    c.admin_faults(latency_min_ms=30000, latency_max_ms=30000)
    out.clear()
    held = threading.Thread(target=get, args=(20,))
    held.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    c.stop_pgsim()
    took = time.monotonic() - t0
    held.join(20)
    assert took < 3, f"pgsim took {took:.1f} s to stop with a 30 s answer held"
    assert out and out[0][1] < 5, out
    c.start_pgsim()


if __name__ == "__main__":
    harness.main(globals(), migrate=False)
