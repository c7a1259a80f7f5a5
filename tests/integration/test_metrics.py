"""test_metrics.py - the worker's HTTP endpoints against real servers: /metrics figures agree
with what the worker did, the exposition passes `promtool check metrics`, the binary exports
exactly the metric names in ops/metrics.txt (the contract with dashboards and alert rules),
/healthz and /readyz follow Redis going away and coming back, and the logs are JSON lines
without card numbers."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARD = "4111-1111-1111-1111"


def scrape(w, path="/metrics"):
    return harness.http("GET", f"http://{w.metrics_addr}{path}", timeout=5)


def samples(text):
    """{(name, frozenset(labels)): value} from an exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        assert m, f"unparseable exposition line: {line!r}"
        labels = frozenset(re.findall(r'([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def value(s, name, **labels):
    return s.get((name, frozenset(labels.items())))


def wait_metric(w, name, want, timeout_s=15, **labels):
    last = [None]

    def ok():
        last[0] = value(samples(scrape(w).body.decode()), name, **labels)
        return last[0] == want
    harness.wait_until(ok, timeout_s, what=f"{name}{labels} == {want} (last {last[0]})")


def seed(c, n, prefix, status="SUCCESS"):
    c.add_product("sku-m", 1000) if c.product_stock("sku-m") is None else None
    jobs = []
    for i in range(n):
        oid = f"{prefix}-{i:03d}"
        c.add_order(oid, "u1", 1000, {"sku-m": 1})
        key = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id=oid, amount=1000,
                                            status=status, card_no=CARD))
        jobs.append({"order_id": oid, "user_id": "u1", "transaction_key": key})
    c.stock_load()
    return jobs


def test_metrics_agree_with_what_the_worker_did(c):
    ok = seed(c, 6, "ok")
    failed = seed(c, 3, "fl", status="FAILED")
    w = c.start_worker()
    harness.wait_until(lambda: scrape(w, "/healthz").status == 200, 10, what="/healthz")
    # Injected before the jobs are pushed: a worker already warm at start could otherwise
    # query ok[0] before the injection lands.
    c.admin_inject(ok[0]["transaction_key"], 503, count=1)
    for j in ok + failed:
        c.push_job("reconcile", j)
    c.push_job("reconcile", b"not json")
    harness.wait_until(lambda: c.sql_value("SELECT count(*) FROM job_log") == 10, 20,
                       what="10 finished jobs")
    # A job's job_log row commits before the worker acknowledges it in Redis and counts it:
    # wait for the counting too.
    wait_metric(w, "settle_worker_inflight_jobs", 0)
    wait_metric(w, "settle_job_duration_seconds_count", 10, queue="reconcile")
    s = samples(scrape(w).body.decode())
    assert value(s, "settle_jobs_finished_total", queue="reconcile", outcome="done",
                 result="completed") == 6, s
    assert value(s, "settle_jobs_finished_total", queue="reconcile", outcome="done",
                 result="failed") == 3
    assert value(s, "settle_jobs_finished_total", queue="reconcile", outcome="dead",
                 result="invalid_job") == 1
    assert value(s, "settle_jobs_dead_lettered_total", queue="reconcile",
                 reason="invalid_job") == 1
    assert value(s, "settle_job_retries_total", queue="reconcile", kind="retry") == 1
    assert value(s, "settle_gateway_requests_total", endpoint="status", **{"class": "2xx"}) == 9
    assert value(s, "settle_gateway_requests_total", endpoint="status", **{"class": "5xx"}) == 1
    assert value(s, "settle_gateway_request_duration_seconds_count", endpoint="status") == 10
    assert value(s, "settle_job_duration_seconds_count", queue="reconcile") == 10
    assert value(s, "settle_breaker_state", endpoint="status") == 0
    assert value(s, "settle_worker_concurrency") == 32
    # Queue gauges come from Redis (refreshed every 2 s): one dead entry, nothing waiting.
    wait_metric(w, "settle_queue_dead_jobs", 1, queue="reconcile")
    wait_metric(w, "settle_queue_ready_jobs", 0, queue="reconcile")
    wait_metric(w, "settle_worker_ready", 1)
    wait_metric(w, "settle_worker_inflight_jobs", 0)

    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=scrape(w).body,
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()

    # The oldest ready job's age follows enqueued_at_ms.
    c.sql("UPDATE orders SET status = 'COMPLETED' WHERE id = 'ok-000'")
    w.stop()
    c.push_job("reconcile", {**ok[0], "enqueued_at_ms": int(time.time() * 1000) - 90000})
    w2 = c.start_worker(c.env_for_worker(queues="refund"))
    harness.wait_until(
        lambda: (value(samples(scrape(w2).body.decode()),
                       "settle_queue_oldest_ready_age_seconds", queue="reconcile") or 0) >= 89,
        10, what="oldest ready age >= 89 s")


def test_binary_exports_exactly_the_documented_names(c):
    documented = {}
    with open(os.path.join(ROOT, "ops", "metrics.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, kind = line.split()[:2]
                documented[name] = kind
    w = c.start_worker()
    harness.wait_until(lambda: scrape(w, "/healthz").status == 200, 10, what="/healthz")
    text = scrape(w).body.decode()
    exported = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    # Families without a sample yet (no job finished) have no TYPE line: exercise them.
    seed(c, 1, "nm")
    c.push_job("reconcile", {"order_id": "nm-000", "user_id": "u1"})
    c.push_job("reconcile", b"x")
    harness.wait_until(lambda: c.sql_value("SELECT count(*) FROM job_log") == 2, 15,
                       what="2 jobs")
    wait_metric(w, "settle_queue_dead_jobs", 1, queue="reconcile")
    text = scrape(w).body.decode()
    exported = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    undocumented = set(exported) - set(documented)
    assert not undocumented, f"exported but not in ops/metrics.txt: {sorted(undocumented)}"
    never_seen = {"settle_job_retries_total", "settle_breaker_transitions_total",
                  "settle_metrics_series_dropped_total"}
    missing = set(documented) - set(exported) - never_seen
    assert not missing, f"in ops/metrics.txt but not exported: {sorted(missing)}"
    for name, kind in exported.items():
        assert documented.get(name) == kind, f"{name}: exported {kind}, documented " \
                                             f"{documented.get(name)}"


def test_readyz_follows_redis(c):
    w = c.start_worker()
    harness.wait_until(lambda: scrape(w, "/readyz").status == 200, 15, what="ready")
    c.stop_redis()
    harness.wait_until(lambda: scrape(w, "/readyz").status == 503, 15, what="unready")
    body = json.loads(scrape(w, "/readyz").body)
    assert body["redis"] is False and body["ready"] is False, body
    assert scrape(w, "/healthz").status == 200  # alive all along
    c.start_redis()
    harness.wait_until(lambda: scrape(w, "/readyz").status == 200, 20, what="ready again")
    w.stop()


def test_logs_are_json_lines_without_card_numbers(c):
    jobs = seed(c, 3, "lg")
    w = c.start_worker()
    for j in jobs:
        c.push_job("reconcile", j)
    # A hostile job carrying a card number in a field and in an unknown field.
    c.push_job("reconcile", {"order_id": CARD, "user_id": "u1", "card": CARD})
    harness.wait_until(lambda: c.sql_value("SELECT count(*) FROM job_log") == 4, 15,
                       what="4 finished jobs")
    assert w.stop() == 0
    text = w.log_text()
    assert not w.bad_log_lines(), w.bad_log_lines()[:3]
    lines = w.log_json_lines()
    assert lines and all({"ts", "level", "msg"} <= set(x) for x in lines)
    for needle in (CARD, CARD.replace("-", ""), "4111 1111 1111 1111"):
        assert needle not in text, f"full card number {needle} in the worker log"


if __name__ == "__main__":
    harness.main(globals())
