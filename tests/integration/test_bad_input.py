"""test_bad_input.py - hostile input never crashes a worker, never moves money, and always
ends in the dead-letter queue with a reason and a sentence that says what was wrong
(issue 7 section 2; the SQL/Lua metacharacter rows are also the proof for section 4).

Two tables drive the tests:

- HOSTILE_JOBS: byte strings pushed straight onto the reconcile and refund lists (not JSON,
  truncated JSON, other JSON types, wrong field types, missing fields, bad amounts, strings
  of megabytes, 100k-level nesting, invalid UTF-8, NUL bytes raw and escaped, control
  characters, SQL and Redis/Lua metacharacters). Every row names the exact DLQ reason and a
  keyword its error sentence must contain. Good jobs for real orders are pushed between them,
  before and while the worker runs, and must complete; a job with unknown fields is good.
  Afterwards PostgreSQL still has every table and row it had, and Redis holds only settle's
  key families (plus a canary key set before the run, which proves nothing was flushed).
- HOSTILE_ANSWERS: PG answers injected through the simulator's /admin/inject (invalid JSON,
  wrong types, an oversized body, unknown statuses, 3xx, 418, an answer for another order,
  amount or transaction). Malformed answers are retried, then dead-lettered as
  gateway_bad_response; the mismatches are dead-lettered as gateway_mismatch at once and
  the order, its payment and the stock are left exactly as they were."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

MiB = 1024 * 1024
JOB_MAX_BYTES = MiB  # big enough to parse the 100k-level nesting, small enough for 2 MiB rows
CARD = "4111-1111-1111-1111"

# Redis key families settle may create under {settle}: (README "Redis keys", plus the
# scheduled tasks' alert list). Anything else after a hostile run is a finding.
KEY_FAMILIES = {"queue", "delayed", "inflight", "jobs", "payloads", "seq", "dedup", "dead",
                "workers", "stock", "resv", "alerts"}
CANARY = b"canary:not-settle"


def j(obj):
    return json.dumps(obj).encode()


def deep(n, open_, close, inner=b"1"):
    return open_ * n + inner + close * n


# (name, queue, raw job bytes, expected DLQ reason, keyword in the error sentence)
HOSTILE_JOBS = [
    # --- not a JSON object -------------------------------------------------------------------
    ("not_json", "reconcile", b"not json", "invalid_job", "not JSON"),
    ("truncated", "reconcile", b'{"order_id": "order-g1", "user_id": "u1"', "invalid_job",
     "not JSON"),
    ("empty", "reconcile", b"", "invalid_job", "not JSON"),
    ("whitespace", "reconcile", b" \t\r\n ", "invalid_job", "not JSON"),
    ("array", "reconcile", b'[{"order_id": "order-g1", "user_id": "u1"}]', "invalid_job",
     "got array"),
    ("string", "reconcile", b'"order-g1"', "invalid_job", "got string"),
    ("number", "reconcile", b"1001", "invalid_job", "got number"),
    ("null", "reconcile", b"null", "invalid_job", "got null"),
    ("true", "reconcile", b"true", "invalid_job", "got boolean"),
    ("two_objects", "reconcile",
     b'{"order_id": "order-g1", "user_id": "u1"}{"order_id": "order-g2", "user_id": "u1"}',
     "invalid_job", "not JSON"),
    ("duplicate_key", "reconcile", b'{"order_id": "order-g1", "order_id": "x", "user_id": "u1"}',
     "invalid_job", "duplicate"),
    # --- wrong types and missing fields --------------------------------------------------------
    ("order_id_number", "reconcile", j({"order_id": 12, "user_id": "u1"}), "invalid_job",
     '"order_id" must be a string, got number'),
    ("order_id_null", "reconcile", j({"order_id": None, "user_id": "u1"}), "invalid_job",
     '"order_id" must be a string, got null'),
    ("order_id_bool", "reconcile", j({"order_id": True, "user_id": "u1"}), "invalid_job",
     '"order_id" must be a string, got boolean'),
    ("order_id_object", "reconcile", j({"order_id": {"id": "order-g1"}, "user_id": "u1"}),
     "invalid_job", '"order_id" must be a string, got object'),
    ("user_id_array", "reconcile", j({"order_id": "order-g1", "user_id": ["u1"]}),
     "invalid_job", '"user_id" must be a string, got array'),
    ("tx_key_number", "reconcile", j({"order_id": "order-g1", "user_id": "u1",
                                      "transaction_key": 7}), "invalid_job",
     '"transaction_key" must be a string'),
    ("id_object", "reconcile", j({"order_id": "order-g1", "user_id": "u1", "id": {}}),
     "invalid_job", '"id" must be a string'),
    ("missing_order_id", "reconcile", j({"user_id": "u1"}), "invalid_job",
     'missing required field "order_id"'),
    ("missing_user_id", "reconcile", j({"order_id": "order-g1"}), "invalid_job",
     'missing required field "user_id"'),
    ("empty_object", "reconcile", b"{}", "invalid_job", 'missing required field "order_id"'),
    ("order_id_empty", "reconcile", j({"order_id": "", "user_id": "u1"}), "invalid_job",
     '"order_id" is empty'),
    ("order_id_129_bytes", "reconcile", j({"order_id": "o" * 129, "user_id": "u1"}),
     "invalid_job", "over the 128-byte limit"),
    ("order_id_100k", "reconcile", j({"order_id": "o" * 100000, "user_id": "u1"}),
     "invalid_job", '"order_id" is 100000 bytes'),
    # --- size and depth ------------------------------------------------------------------------
    ("megabytes_string", "reconcile", j({"order_id": "order-g1", "user_id": "u1",
                                         "note": "x" * (2 * MiB)}), "invalid_job",
     "bytes, over the"),
    ("megabytes_garbage", "reconcile", b"\xff" * (3 * MiB), "invalid_job", "bytes, over the"),
    ("nested_objects_100k", "reconcile", deep(100000, b'{"a":', b"}"), "invalid_job",
     "not JSON"),
    ("nested_arrays_100k", "reconcile", deep(100000, b"[", b"]", b""), "invalid_job",
     "not JSON"),
    ("nested_in_unknown_field", "reconcile",
     b'{"order_id": "order-g1", "user_id": "u1", "extra": ' + deep(100000, b"[", b"]", b"")
     + b"}", "invalid_job", "not JSON"),
    # --- encoding, NUL and control characters ---------------------------------------------------
    ("invalid_utf8_in_string", "reconcile", b'{"order_id": "\xff\xfe", "user_id": "u1"}',
     "invalid_job", "not JSON"),
    ("overlong_utf8", "reconcile", b'{"order_id": "\xc0\xaf", "user_id": "u1"}',
     "invalid_job", "not JSON"),
    ("lone_surrogate_escape", "reconcile", b'{"order_id": "\\ud800", "user_id": "u1"}',
     "invalid_job", "not JSON"),
    ("invalid_utf8_outside", "reconcile", b'\xfe{"order_id": "o", "user_id": "u1"}',
     "invalid_job", "not JSON"),
    ("raw_nul_in_string", "reconcile", b'{"order_id": "order-g1\x00", "user_id": "u1"}',
     "invalid_job", "not JSON"),
    ("raw_nul_after_object", "reconcile", b'{"order_id": "order-g1", "user_id": "u1"}\x00',
     "invalid_job", "not JSON"),
    ("escaped_nul", "reconcile", b'{"order_id": "order-g1\\u0000x", "user_id": "u1"}',
     "invalid_job", "not JSON"),
    ("raw_tab_in_string", "reconcile", b'{"order_id": "order\tg1", "user_id": "u1"}',
     "invalid_job", "not JSON"),
    ("escaped_newline", "reconcile", j({"order_id": "order-g1\n", "user_id": "u1"}),
     "invalid_job", "control character 0x0a"),
    ("escaped_escape", "reconcile", j({"order_id": "order-g1", "user_id": "u1\x1b[2J"}),
     "invalid_job", "control character 0x1b"),
    ("escaped_del", "reconcile", j({"order_id": "order\x7fg1", "user_id": "u1"}),
     "invalid_job", "control character 0x7f"),
    ("crlf_flushall", "reconcile", j({"order_id": "\r\nFLUSHALL\r\n", "user_id": "u1"}),
     "invalid_job", "control character 0x0d"),
    ("crlf_in_tx_key", "reconcile", j({"order_id": "order-g1", "user_id": "u1",
                                       "transaction_key": "k\r\nX-USER-ID: admin"}),
     "invalid_job", '"transaction_key" contains control character'),
    # --- well-formed jobs with SQL / Redis / Lua metacharacters: no such order -----------------
    ("sql_drop_table", "reconcile", j({"order_id": "x'; DROP TABLE orders; --", "user_id": "u1"}),
     "order_not_found", "no order"),
    ("sql_or_true", "reconcile", j({"order_id": "order-g1' OR '1'='1", "user_id": "u1"}),
     "order_not_found", "no order"),
    ("sql_like_percent", "reconcile", j({"order_id": "%", "user_id": "u1"}), "order_not_found",
     "no order"),
    ("sql_like_underscore", "reconcile", j({"order_id": "order-g_", "user_id": "u1"}),
     "order_not_found", "no order"),
    ("sql_backslash", "reconcile", j({"order_id": "\\", "user_id": "u1"}), "order_not_found",
     "no order"),
    ("sql_dollar_quote", "reconcile", j({"order_id": "$$; DELETE FROM orders; $$",
                                         "user_id": "u1"}), "order_not_found", "no order"),
    ("redis_hash_tag", "reconcile", j({"order_id": "{settle}", "user_id": "u1"}),
     "order_not_found", "no order"),
    ("redis_glob", "reconcile", j({"order_id": "*", "user_id": "u1"}), "order_not_found",
     "no order"),
    ("redis_key_path", "reconcile", j({"order_id": "order-g1}:resv:order-g2", "user_id": "u1"}),
     "order_not_found", "no order"),
    ("lua_injection", "reconcile", j({"order_id": "') redis.call('FLUSHALL') --",
                                      "user_id": "u1"}), "order_not_found", "no order"),
    ("spaces", "reconcile", j({"order_id": " order-g1 ", "user_id": "u1"}), "order_not_found",
     "no order"),
    ("unicode_lookalike", "reconcile", j({"order_id": "order\u2010g1", "user_id": "u1"}),
     "order_not_found", "no order"),
    # --- well-formed jobs for a real order that is not theirs -----------------------------------
    ("sql_in_user_id", "reconcile", j({"order_id": "order-g1", "user_id": "u1' OR '1'='1"}),
     "order_mismatch", "user_id"),
    ("wrong_user", "reconcile", j({"order_id": "order-g2", "user_id": "intruder"}),
     "order_mismatch", "user_id"),
    # --- refunds -----------------------------------------------------------------------------
    ("refund_not_json", "refund", b"{refund}", "invalid_job", "not JSON"),
    ("refund_array", "refund", b"[]", "invalid_job", "got array"),
    ("refund_missing_tx_key", "refund", j({"order_id": "order-p1", "user_id": "u1"}),
     "invalid_job", 'missing required field "transaction_key"'),
    ("refund_amount_negative", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                            "transaction_key": "k", "amount": -100}),
     "invalid_job", '"amount" must be positive'),
    ("refund_amount_zero", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                        "transaction_key": "k", "amount": 0}),
     "invalid_job", '"amount" must be positive'),
    ("refund_amount_minus_zero", "refund",
     b'{"order_id": "order-p1", "user_id": "u1", "transaction_key": "k", "amount": -0}',
     "invalid_job", '"amount" must be positive'),
    ("refund_amount_huge", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                        "transaction_key": "k", "amount": 10 ** 18}),
     "invalid_job", "amount too large"),
    ("refund_amount_int64_max", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                             "transaction_key": "k", "amount": 2 ** 63 - 1}),
     "invalid_job", "amount too large"),
    ("refund_amount_over_int64", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                              "transaction_key": "k", "amount": 2 ** 64}),
     "invalid_job", "not JSON"),
    ("refund_amount_float", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                         "transaction_key": "k", "amount": 12.5}),
     "invalid_job", "real number"),
    ("refund_amount_float_integral", "refund",
     b'{"order_id": "order-p1", "user_id": "u1", "transaction_key": "k", "amount": 100.0}',
     "invalid_job", "real number"),
    ("refund_amount_exponent", "refund",
     b'{"order_id": "order-p1", "user_id": "u1", "transaction_key": "k", "amount": 1e2}',
     "invalid_job", "real number"),
    ("refund_amount_string", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                          "transaction_key": "k", "amount": "100"}),
     "invalid_job", '"amount" must be an integer, got string'),
    ("refund_amount_bool", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                        "transaction_key": "k", "amount": True}),
     "invalid_job", '"amount" must be an integer, got boolean'),
    ("refund_restock_string", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                           "transaction_key": "k", "restock": "yes"}),
     "invalid_job", '"restock" must be a boolean'),
    ("refund_reason_long", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                        "transaction_key": "k", "reason": "r" * 257}),
     "invalid_job", '"reason" is 257 bytes'),
    ("refund_reason_number", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                          "transaction_key": "k", "reason": 5}),
     "invalid_job", '"reason" must be a string'),
    ("refund_megabytes", "refund", j({"order_id": "order-p1", "user_id": "u1",
                                      "transaction_key": "k", "reason": "r" * (2 * MiB)}),
     "invalid_job", "bytes, over the"),
    ("refund_nested_100k", "refund", deep(100000, b'{"r":', b"}"), "invalid_job",
     "not JSON"),
    ("refund_sql_order", "refund", j({"order_id": "x'; DROP TABLE refunds; --", "user_id": "u1",
                                      "transaction_key": "k"}), "order_not_found", "no order"),
    ("refund_wrong_user", "refund", j({"order_id": "order-p1", "user_id": "u1' --",
                                       "transaction_key": "k"}), "order_mismatch", "user_id"),
]

GOOD_ORDERS = [f"order-g{i}" for i in range(1, 9)]
PAID_ORDERS = ["order-p1", "order-p2", "order-p3"]


# --------------------------------------------------------------------------------------------
# Helpers


def setup_order(c, order_id, user="u1", amount=5000, items=None, stock=100):
    """Product(s), the order, its reservation and Redis stock (as test_reconcile does)."""
    items = items or {"sku-a": 1}
    for sku in items:
        if c.product_stock(sku) is None:
            c.add_product(sku, stock)
    c.add_order(order_id, user, amount, items)
    c.stock_load()
    r = c.reserve(order_id, items)
    assert r.returncode == 0, r.stdout + r.stderr


def pg_tx(c, order_id, user="u1", amount=5000, status="SUCCESS", **extra):
    return c.tx_key_of(c.admin_create_tx(user_id=user, order_id=order_id, amount=amount,
                                         status=status, **extra))


def paid_order(c, order_id, user="u1", amount=100):
    """A COMPLETED order with a SUCCESS payment in PostgreSQL and at the simulator."""
    if c.product_stock("sku-p") is None:
        c.add_product("sku-p", 100)
    key = pg_tx(c, order_id, user=user, amount=amount)
    c.add_order(order_id, user, amount, {"sku-p": 1}, status="COMPLETED", tx_key=key,
                payment_status="SUCCESS")
    return key


def dead_by_raw(c):
    """{raw job bytes: DLQ envelope} from {settle}:dead and the exact texts in dead:jobs."""
    raws = c.redis.hgetall(c.key("dead:jobs"))
    out = {}
    for e in c.dlq_entries():
        raw = raws.get(e.get("id", "").encode())
        assert raw is not None, f"DLQ entry without its job text: {e}"
        out[raw] = e
    return out


def snapshot_tables(c):
    tables = sorted(r[0] for r in c.sql(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
    counts = {t: c.sql_value(f'SELECT count(*) FROM "{t}"') for t in tables
              if t in ("orders", "order_items", "products", "payments", "refunds")}
    return tables, counts


def check_redis_keys(c, extra_ok=()):
    """Only settle's key families (and our canary) exist; the canary proves no FLUSHALL/DEL
    ran; no key carries a hostile payload."""
    assert c.redis.get(CANARY) == b"1", "the canary key is gone: something flushed Redis"
    prefix = f"{{{harness.NAMESPACE}}}:".encode()
    bad = []
    for k in c.redis.scan_iter(count=1000):
        if k == CANARY or k in extra_ok:
            continue
        if not k.startswith(prefix):
            bad.append(k)
            continue
        family = k[len(prefix):].split(b":", 1)[0].decode("utf-8", "replace")
        if family not in KEY_FAMILIES:
            bad.append(k)
            continue
        if any(x in k for x in (b"DROP", b"FLUSHALL", b"redis.call", b"*", b"%", b"'")):
            bad.append(k)
    assert not bad, f"unexpected Redis keys after the hostile run: {bad[:20]}"


# --------------------------------------------------------------------------------------------
# Tests


@harness.timeout(150)
def test_hostile_jobs_go_to_dlq_and_good_jobs_complete(c):
    names = [r[0] for r in HOSTILE_JOBS]
    assert len(set(names)) == len(names), "duplicate row names"
    raws = [r[2] for r in HOSTILE_JOBS]
    assert len(set(raws)) == len(raws), "two rows have the same bytes; DLQ entries would mix"

    for o in GOOD_ORDERS:
        setup_order(c, o)
        pg_tx(c, o)
    paid = {o: paid_order(c, o) for o in PAID_ORDERS}
    c.redis.set(CANARY, b"1")
    tables_before, counts_before = snapshot_tables(c)
    stock_before = c.product_stock("sku-a")

    good_reconcile = [{"order_id": o, "user_id": "u1"} for o in GOOD_ORDERS]
    # Unknown fields are accepted (kept in the job text), including nested ones and a number
    # that looks like a card: these jobs must complete, not go to the DLQ.
    good_reconcile[0]["unknown"] = {"nested": [1, {"x": None}], "n": 1.5,
                                    "card_like": 4556737586899855}
    good_reconcile[1]["trace_id"] = "abc"
    good_reconcile[1]["enqueued_at_ms"] = 1
    good_refunds = [{"order_id": o, "user_id": "u1", "transaction_key": k, "amount": 10,
                     "reason": "bad-input test", "unknown": [True]} for o, k in paid.items()]
    goods = [("reconcile", g) for g in good_reconcile] + [("refund", g) for g in good_refunds]

    # Bad and good jobs interleaved; half pushed before the worker starts, half while it runs.
    plan = []
    gi = 0
    for i, row in enumerate(HOSTILE_JOBS):
        plan.append((row[1], row[2]))
        if i % 7 == 3 and gi < len(goods):
            plan.append((goods[gi][0], goods[gi][1]))
            gi += 1
    plan += goods[gi:]
    half = len(plan) // 2
    for q, job in plan[:half]:
        c.push_job(q, job)
    w = c.start_worker(c.env_for_worker(job_max_bytes=JOB_MAX_BYTES, retry_max_attempts=2,
                                        concurrency=8))
    time.sleep(0.5)
    for q, job in plan[half:]:
        c.push_job(q, job)

    harness.wait_until(lambda: all(c.order_status(o) == "COMPLETED" for o in GOOD_ORDERS), 60,
                       what="every good reconcile job to complete: " + str(
                           {o: c.order_status(o) for o in GOOD_ORDERS}))
    harness.wait_until(
        lambda: c.sql_value("SELECT count(*) FROM refunds WHERE state = 'SUCCEEDED'") ==
        len(PAID_ORDERS), 60, what="every good refund to succeed: " + str(
            c.sql("SELECT order_id, state FROM refunds")))
    harness.wait_until(lambda: len(c.dlq_entries()) >= len(HOSTILE_JOBS), 60,
                       what=f"{len(HOSTILE_JOBS)} DLQ entries (have {len(c.dlq_entries())})")
    for q in ("reconcile", "refund"):
        harness.wait_until(lambda q=q: sum(v for k, v in c.queue_depths(q).items()
                                           if k != "dead") == 0, 30,
                           what=f"queue {q} to drain: {c.queue_depths(q)}")
    assert w.alive(), "the worker died on hostile input"

    dead = dead_by_raw(c)
    problems = []
    for name, q, raw, reason, keyword in HOSTILE_JOBS:
        e = dead.pop(raw, None)
        if e is None:
            problems.append(f"{name}: not in the DLQ")
            continue
        if e["queue"] != q or e["reason"] != reason or keyword not in (e.get("error") or ""):
            problems.append(f"{name}: queue={e['queue']} reason={e['reason']} "
                            f"error={e.get('error')!r}; expected {q}/{reason} with {keyword!r}")
        if len(raw) > JOB_MAX_BYTES and e.get("job") is not None:
            problems.append(f"{name}: an oversized job was parsed into the envelope")
        if e.get("job_bytes") != len(raw):
            problems.append(f"{name}: job_bytes {e.get('job_bytes')} != {len(raw)}")
    if dead:
        problems.append(f"unexpected DLQ entries (good jobs?): "
                        f"{[(e['reason'], e.get('error')) for e in dead.values()]}")
    assert not problems, "\n".join(problems)

    # One job_log row per dead job, and the good ones done.
    logs = c.job_log()
    assert len([r for r in logs if r["outcome"] == "dead"]) == len(HOSTILE_JOBS), \
        [(r["result"], r["last_error"]) for r in logs if r["outcome"] == "dead"]
    assert sorted(r["order_id"] for r in logs if r["outcome"] == "done") == \
        sorted(GOOD_ORDERS + PAID_ORDERS), logs

    # Nothing was dropped, deleted or touched by the metacharacters.
    tables_after, counts_after = snapshot_tables(c)
    assert tables_after == tables_before, (tables_before, tables_after)
    counts_before["refunds"] = len(PAID_ORDERS)  # the good refunds
    counts_before["payments"] += len(GOOD_ORDERS)  # recorded by the good reconcile jobs
    assert counts_after == counts_before, (counts_before, counts_after)
    assert c.product_stock("sku-a") == stock_before - len(GOOD_ORDERS)
    assert c.stock_available("sku-a") == stock_before - len(GOOD_ORDERS)
    for o in PAID_ORDERS:
        assert c.sql_value("SELECT refunded_minor FROM payments WHERE order_id = %s", (o,)) == 10
    check_redis_keys(c)
    assert not w.bad_log_lines(), w.bad_log_lines()[:3]


def test_raw_nul_outside_strings_is_refused(c):
    """A raw NUL byte is not JSON anywhere. jansson 2.14 silently skips one that follows a
    literal (true, false, null, a number), so the decoder must refuse NUL bytes itself
    (found by tests/fuzz/fuzz_job.c; tests/fuzz/regressions/fuzz_job/)."""
    jobs = [b'{"order_id": "order-nul1", "user_id": "u1", "x": true\x00}',
            b'{"order_id": "order-nul2", "user_id": "u1", "n": 1\x00, "y": null}',
            b'{"order_id": "order-nul3", "user_id": "u1", "z": null\x00}']
    for raw in jobs:
        c.push_job("reconcile", raw)
    c.start_worker()
    harness.wait_until(lambda: len(c.dlq_entries()) == len(jobs), 15,
                       what=f"{len(jobs)} DLQ entries")
    dead = dead_by_raw(c)
    got = {raw: (dead[raw]["reason"], dead[raw]["error"]) for raw in jobs}
    assert all(reason == "invalid_job" for reason, _ in got.values()), \
        f"jobs holding a raw NUL byte were accepted as JSON: {got}"


# (name, injected HTTP status, body or None, expected reason, keyword, retried?)
def hostile_answers(key, order_id, amount):
    ok = {"transactionKey": key, "orderId": order_id, "cardType": "SAMSUNG",
          "cardNo": "1234-5678-9814-1451", "amount": amount, "status": "SUCCESS"}

    def wrap(data, result="SUCCESS", message=None):
        return json.dumps({"meta": {"result": result, "errorCode": None, "message": message},
                           "data": data})

    return [
        ("invalid_json", 200, '{"meta": {"result": "SUCCESS"}, "data": {', "gateway_bad_response",
         "invalid JSON", True),
        ("html", 200, "<html><body>502 Bad Gateway</body></html>", "gateway_bad_response",
         "invalid JSON", True),
        ("empty_body", 200, " ", "gateway_bad_response", "invalid JSON", True),
        ("top_array", 200, "[]", "gateway_bad_response", "must be a JSON object", True),
        ("data_null", 200, wrap(None), "gateway_bad_response", "data must be an object", True),
        ("amount_string", 200, wrap({**ok, "amount": str(amount)}), "gateway_bad_response",
         '"amount" must be an integer', True),
        ("amount_real", 200, wrap({**ok, "amount": amount + 0.5}), "gateway_bad_response",
         '"amount" must be an integer', True),
        ("amount_negative", 200, wrap({**ok, "amount": -amount}), "gateway_bad_response",
         '"amount" must be at least 1', True),
        ("status_number", 200, wrap({**ok, "status": 2}), "gateway_bad_response",
         '"status" must be a string', True),
        ("status_weird", 200, wrap({**ok, "status": "WEIRD"}), "gateway_bad_response",
         'unknown status "WEIRD"', True),
        ("result_weird", 200, wrap(ok, result="MAYBE"), "gateway_bad_response",
         "unknown meta.result", True),
        ("duplicate_amount", 200, wrap(ok)[:-2] + f', "amount": {amount + 1}}}}}',
         "gateway_bad_response", "duplicate", True),
        ("huge_body", 200, wrap({**ok, "padding": "p" * 62000}), "gateway_bad_response",
         "over 60000 bytes", True),
        ("redirect_302", 302, wrap(ok), "gateway_bad_response", "HTTP 302", True),
        ("teapot_418", 418, None, "gateway_rejected", "418", False),
        ("fail_in_200", 200, wrap(None, result="FAIL", message="declined by issuer"),
         "gateway_rejected", "declined by issuer", False),
        ("other_order", 200, wrap({**ok, "orderId": "order-someone-else"}), "gateway_mismatch",
         "another order", False),
        ("other_amount", 200, wrap({**ok, "amount": 1}), "gateway_mismatch",
         "differs from the order", False),
        ("other_transaction", 200, wrap({**ok, "transactionKey": key + "-other"}),
         "gateway_mismatch", "another transaction", False),
    ]


@harness.timeout(120)
def test_hostile_pg_answers_never_complete_an_order(c):
    attempts = 2
    rows = []
    for i, (name, *_rest) in enumerate(hostile_answers("k", "o", 1)):
        order_id = f"order-h{i}"
        setup_order(c, order_id, amount=5000, items={"sku-h": 1})
        key = pg_tx(c, order_id, amount=5000)  # the real answer would be SUCCESS
        row = [r for r in hostile_answers(key, order_id, 5000) if r[0] == name][0]
        c.admin_inject(key, row[1], count=50, body=row[2])
        rows.append((order_id, key, row))
        c.push_job("reconcile", {"order_id": order_id, "user_id": "u1", "transaction_key": key})
    # A good order in between, answered normally.
    setup_order(c, "order-hgood", amount=5000, items={"sku-h": 1})
    pg_tx(c, "order-hgood", amount=5000)
    c.push_job("reconcile", {"order_id": "order-hgood", "user_id": "u1"})
    stock_before = c.product_stock("sku-h")
    avail_before = c.stock_available("sku-h")

    w = c.start_worker(c.env_for_worker(retry_max_attempts=attempts, gateway_body_max_bytes=60000,
                                        concurrency=8))
    harness.wait_until(lambda: c.order_status("order-hgood") == "COMPLETED", 30,
                       what="the good order to complete")
    harness.wait_until(lambda: len(c.dlq_entries()) >= len(rows), 60,
                       what=f"{len(rows)} DLQ entries (have {len(c.dlq_entries())}: "
                            f"{[e['reason'] for e in c.dlq_entries()]})")
    assert w.alive()

    by_order = {e["job"]["order_id"]: e for e in c.dlq_entries()}
    requests = c.admin_requests()
    problems = []
    for order_id, key, (name, status, _body, reason, keyword, retried) in rows:
        e = by_order.get(order_id)
        if e is None:
            problems.append(f"{name}: no DLQ entry")
            continue
        if e["reason"] != reason or keyword not in (e.get("error") or ""):
            problems.append(f"{name}: reason={e['reason']} error={e.get('error')!r}; "
                            f"expected {reason} with {keyword!r}")
        want = attempts if retried else 1
        asked = [r for r in requests if key in r.get("path", "")]
        if len(asked) != want:
            problems.append(f"{name}: PG asked {len(asked)} times, expected {want}")
        # Money never moved on it: the order, its payment and its stock are untouched.
        if c.order_status(order_id) != "PENDING":
            problems.append(f"{name}: order is {c.order_status(order_id)}")
        pay = c.sql("SELECT status FROM payments WHERE order_id = %s", (order_id,))
        if pay and pay[0][0] != "PENDING":
            problems.append(f"{name}: payment is {pay}")
        if c.resv_state(order_id) != "reserved":
            problems.append(f"{name}: reservation is {c.resv_state(order_id)}")
    assert not problems, "\n".join(problems)
    assert c.product_stock("sku-h") == stock_before - 1  # the good order only
    assert c.stock_available("sku-h") == avail_before  # its units were already reserved
    assert not [r for r in requests if r.get("method") == "POST"], "a cancel was sent"
    assert not w.bad_log_lines(), w.bad_log_lines()[:3]


if __name__ == "__main__":
    harness.main(globals())
