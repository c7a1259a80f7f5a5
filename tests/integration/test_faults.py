#!/usr/bin/python3
"""test_faults.py - settle under faults: kill -9 of a worker holding jobs, SIGTERM while busy
(inside and beyond the shutdown grace), a second signal, an outage of the PG behind the
circuit breaker, a Redis restart, a PostgreSQL stop, and a job that crashes its workers too
often.

Every test drives the real binary against the harness's real servers and asserts on what a
user sees: orders, payments, products and job_log rows in PostgreSQL, the queue keys and the
DLQ in Redis, the requests the PG simulator received, worker exit codes and worker logs.
Every wait is bounded in time and in polls (harness.wait_until or explicit deadlines).

Run: SETTLE_BIN=build/settle /usr/bin/python3 tests/integration/test_faults.py [test names]
"""

import calendar
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

QUEUE = "reconcile"
USER = "user-fault"
AMOUNT = 2500
SKU = "sku-fault"
STOCK0 = 1000  # on-hand units of SKU at the start of every test
RESERVATION_TTL_MS = 600000  # far beyond any test, so the stock reaper never interferes


# --------------------------------------------------------------------------------------------
# Fixtures and observations


def seed_orders(c, n, prefix, qty=1, status="SUCCESS", product=True):
    """n PENDING orders of USER (prefix-0000...), each with a payment of `status` in the
    simulator and a stock reservation of qty units of SKU. Returns {order_id: job dict}."""
    if product:
        c.add_product(SKU, STOCK0)
        c.stock_load()
    jobs = {}
    for i in range(n):
        oid = f"{prefix}-{i:04d}"
        tx = c.admin_create_tx(user_id=USER, order_id=oid, amount=AMOUNT, status=status)
        c.add_order(oid, USER, AMOUNT, {SKU: qty})
        r = c.reserve(oid, {SKU: qty}, ttl_ms=RESERVATION_TTL_MS)
        assert r.returncode == 0 and "reserved" in r.stdout, \
            f"reserve {oid}: rc={r.returncode} out={r.stdout!r} err={r.stderr!r}"
        jobs[oid] = {"order_id": oid, "user_id": USER, "transaction_key": c.tx_key_of(tx)}
    return jobs


def push_jobs(c, jobs):
    for job in jobs.values():
        c.push_job(QUEUE, job)


def statuses(c, orders):
    rows = c.sql("SELECT id, status FROM orders WHERE id = ANY(%s)", (list(orders),))
    return dict(rows)


def status_counts(c, orders):
    out = {}
    for s in statuses(c, orders).values():
        out[s] = out.get(s, 0) + 1
    return out


def job_log_counts(c, orders):
    """{order_id: number of job_log rows} for the given orders (absent = 0 rows)."""
    rows = c.sql("SELECT order_id, count(*) FROM job_log WHERE order_id = ANY(%s) "
                 "GROUP BY order_id", (list(orders),))
    return dict(rows)


def state(c, orders=()):
    """A one-line picture of what a user can see, for assertion messages."""
    parts = [f"depths={depths(c)}"]
    if orders:
        parts.append(f"orders={status_counts(c, orders)}")
        parts.append(f"job_log rows={sum(job_log_counts(c, orders).values())}")
    with_stock = c.sql("SELECT stock FROM products WHERE sku = %s", (SKU,))
    if with_stock:
        parts.append(f"stock={with_stock[0][0]}")
    dlq = c.dlq_entries()
    if dlq:
        parts.append(f"dlq={[(e.get('reason'), e.get('error')) for e in dlq[:5]]}")
    lost = lost_jobs(c)
    if lost:
        parts.append(f"LOST (in {{settle}}:jobs but neither delayed nor in flight)="
                     f"{len(lost)} e.g. {lost[:3]}")
    return " ".join(parts)


def lost_jobs(c):
    """Ids the queue knows ({settle}:jobs holds their counters) that are neither delayed nor
    in flight: nobody will ever run them again. Every queue script moves a job between these
    keys atomically and a finished or buried job has no {settle}:jobs entry, so in one
    MULTI/EXEC snapshot this is exact."""
    p = c.redis.pipeline(transaction=True)
    p.hkeys(c.key("jobs"))
    p.zrange(c.key(f"delayed:{QUEUE}"), 0, -1)
    p.zrange(c.key(f"inflight:{QUEUE}"), 0, -1)
    known, delayed, inflight = p.execute()
    return sorted(m.decode() for m in set(known) - set(delayed) - set(inflight))


class Hopeless(AssertionError):
    """Raised by a wait predicate when waiting longer cannot help."""


def settled(c, orders):
    """all_settled, but fails at once when a job was lost or dead-lettered (waiting longer
    cannot bring either back)."""
    if lost_jobs(c):
        raise Hopeless(f"job(s) lost: {state(c, orders)}")
    if depths(c)["dead"] != 0:
        raise Hopeless(f"job(s) dead-lettered: {state(c, orders)}")
    return all_settled(c, orders)


def wait(c, pred, timeout_s, what, orders=(), interval_s=0.1, detail=None, alive=()):
    """harness.wait_until, with what a user sees at the moment of the timeout appended to
    the failure (an f-string passed as `what` would show the state from before the wait),
    plus detail() when given. Fails at once when a worker in `alive` exits."""
    def check():
        for w in alive:
            if not w.alive():
                raise Hopeless(f"worker {w.name} exited with {w.proc.returncode} while waiting "
                               f"for {what}; its last lines: {log_msgs(w)[-3:]}")
        return pred()
    try:
        return harness.wait_until(check, timeout_s, interval_s, what)
    except Hopeless:
        raise
    except AssertionError as e:
        more = f"; {detail()}" if detail is not None else ""
        raise AssertionError(f"{e}; now: {state(c, orders)}{more}") from None


def all_settled(c, orders):
    """True when every order is COMPLETED and the queue holds nothing ready/delayed/in
    flight."""
    if any(s != "COMPLETED" for s in statuses(c, orders).values()):
        return False
    d = depths(c)
    return d["ready"] == 0 and d["delayed"] == 0 and d["inflight"] == 0


def assert_exactly_once(c, orders, qty=1, deliveries=None):
    """Every order COMPLETED with its payment SUCCESS, the on-hand stock decremented exactly
    once per order, the reservation committed, exactly one job_log row (done/completed) per
    order, and nothing left in the queue or the DLQ."""
    st = statuses(c, orders)
    bad = {o: s for o, s in st.items() if s != "COMPLETED"}
    assert len(st) == len(orders) and not bad, f"orders not COMPLETED: {bad}; {state(c, orders)}"
    pays = dict(c.sql("SELECT order_id, status FROM payments WHERE order_id = ANY(%s)",
                      (list(orders),)))
    bad = {o: pays.get(o) for o in orders if pays.get(o) != "SUCCESS"}
    assert not bad, f"payments not SUCCESS: {bad}"
    stock = c.product_stock(SKU)
    assert stock == STOCK0 - qty * len(orders), \
        f"products.stock is {stock}, expected {STOCK0 - qty * len(orders)} " \
        f"({len(orders)} orders x {qty} taken exactly once)"
    counts = job_log_counts(c, orders)
    bad = {o: counts.get(o, 0) for o in orders if counts.get(o, 0) != 1}
    assert not bad, f"job_log rows per order are not exactly 1: {bad}"
    rows = c.sql("SELECT order_id, outcome, result, deliveries FROM job_log "
                 "WHERE order_id = ANY(%s)", (list(orders),))
    bad = [r for r in rows if (r[1], r[2]) != ("done", "completed")]
    assert not bad, f"job_log rows that are not done/completed: {bad[:5]}"
    if deliveries is not None:
        bad = [r for r in rows if r[3] != deliveries]
        assert not bad, f"job_log rows whose deliveries != {deliveries}: {bad[:5]}"
    resv = {o: c.resv_state(o) for o in orders}
    bad = {o: s for o, s in resv.items() if s != "committed"}
    assert not bad, f"reservations not committed: {bad}"
    d = depths(c)
    assert d == {"ready": 0, "delayed": 0, "inflight": 0, "dead": 0}, \
        f"queue not empty at the end: {d}; dlq={c.dlq_entries()[:3]}"


def log_msgs(w):
    """The "msg" of every JSON line of a worker's log."""
    return [o.get("msg", "") for o in w.log_json_lines(strict=False)]


def redis_log_lines(w):
    return [m for m in log_msgs(w) if m.startswith("redis ")]


def reconnected(w):
    """True once the worker logged a lost Redis connection and, after the first loss, as
    many "redis connected to" lines as connections it lost."""
    msgs = redis_log_lines(w)
    lost = [k for k, m in enumerate(msgs) if "lost; reconnecting" in m]
    if not lost:
        return False
    back = [m for m in msgs[lost[0]:] if m.startswith("redis connected to ")]
    return len(back) >= len(lost)


def log_has(w, fragment):
    return any(fragment in m for m in log_msgs(w))


def requests_for(c, jobs, since=None):
    """{order_id: [status, ...]} of the status GETs the simulator received for each job's
    payment (path /api/v1/payments/<key>)."""
    by_path = {f"/api/v1/payments/{j['transaction_key']}": o for o, j in jobs.items()}
    out = {o: [] for o in jobs}
    for e in c.admin_requests(since=since):
        o = by_path.get(e["path"])
        if o is not None and e["method"] == "GET":
            out[o].append(e["status"])
    return out


def last_seq(c):
    reqs = c.admin_requests()
    return reqs[-1]["seq"] if reqs else 0


def slow_pg(c, ms):
    """Every API answer of the simulator takes ms (decided when the request arrives, so a
    later change does not shorten requests already waiting)."""
    c.admin_faults(latency_min_ms=ms, latency_max_ms=ms)


def fast_pg(c):
    c.admin_faults(latency_min_ms=0, latency_max_ms=0, fail_rate=0.0, slow_rate=0.0)


def job_meta(c, job_id):
    """{settle}:jobs[job_id] "attempts deliveries crashes checks enqueued_ms" as a dict."""
    raw = c.redis.hget(c.key("jobs"), job_id)
    if raw is None:
        return None
    a, d, k, ch, e = (int(x) for x in raw.split())
    return {"attempts": a, "deliveries": d, "crashes": k, "checks": ch, "enqueued_ms": e}


def depths(c):
    """Queue depths read in one MULTI/EXEC, so a job moving between the list and the sets
    while we look is counted exactly once (c.queue_depths() reads key by key)."""
    p = c.redis.pipeline(transaction=True)
    p.llen(c.key(f"queue:{QUEUE}"))
    p.zcard(c.key(f"delayed:{QUEUE}"))
    p.zcard(c.key(f"inflight:{QUEUE}"))
    p.llen(c.key("dead"))
    ready, delayed, inflight, dead = p.execute()
    return {"ready": ready, "delayed": delayed, "inflight": inflight, "dead": dead}


def inflight_ids(c):
    return [m.decode() for m in c.redis.zrange(c.key(f"inflight:{QUEUE}"), 0, -1)]


def wait_exit(w, timeout_s):
    """Waits up to timeout_s for the worker to exit on its own; returns (code, seconds)."""
    t0 = time.monotonic()
    code = w.wait(timeout_s)
    return code, time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# 1. kill -9 of a worker holding jobs


@harness.timeout(90)
def test_kill9_worker_holding_jobs_redelivers_exactly_once(c):
    n = 20
    jobs = seed_orders(c, n, "k9")
    # Every status GET takes 8 s; the worker waits up to 15 s for it, so the jobs sit in
    # flight under a lease that the heartbeat keeps renewing.
    slow_pg(c, 8000)
    env = dict(lease_ms=3000, gateway_timeout_ms=15000, gateway_slowest_ms=1000,
               payment_window_ms=60000)
    a = c.start_worker(c.env_for_worker(**env), name="a")
    push_jobs(c, jobs)

    def all_stuck():
        asked = sum(1 for v in requests_for(c, jobs).values() if v)
        return depths(c)["inflight"] == n and asked == n
    wait(c, all_stuck, 15, f"all {n} jobs in flight with their GETs at the PG", jobs)
    # Longer than a lease: the heartbeat must keep a live worker's jobs in flight.
    time.sleep(3.5)
    d = depths(c)
    assert d["inflight"] == n and d["delayed"] == 0, \
        f"a live worker's jobs left the in-flight set (heartbeat): {state(c, jobs)}"
    assert all(s == "PENDING" for s in statuses(c, jobs).values()), state(c, jobs)

    assert a.kill9() == -signal.SIGKILL
    t_kill = time.monotonic()
    fast_pg(c)
    b = c.start_worker(c.env_for_worker(**env), name="b")
    wait(c, lambda: settled(c, jobs), 30, "every job to finish after the kill", jobs,
         alive=[b])
    elapsed = time.monotonic() - t_kill
    assert elapsed < 30, f"jobs took {elapsed:.1f} s after the kill"
    print(f"  all {n} jobs finished {elapsed:.1f} s after kill -9")

    # Each job was delivered twice (a, then b after the reaper) and took effect once.
    assert_exactly_once(c, jobs, deliveries=2)
    reaped = 0
    for o in b.log_json_lines(strict=False):
        m = o.get("msg", "")
        if m.startswith("gave back ") and "lease expired" in m:
            reaped += int(m.split()[2])
    assert reaped == n, f"worker b's reaper gave back {reaped} job(s), expected {n}"
    asked = requests_for(c, jobs)
    bad = {o: v for o, v in asked.items() if len(v) != 2}
    assert not bad, f"expected exactly 2 status GETs per job (a's, then b's): {bad}"
    assert b.alive(), "worker b died"


# --------------------------------------------------------------------------------------------
# 2. SIGTERM while busy


@harness.timeout(60)
def test_sigterm_finishes_in_flight_jobs_within_grace(c):
    n = 10
    jobs = seed_orders(c, n, "term")
    late = seed_orders(c, 5, "late", product=False)
    slow_pg(c, 1000)
    grace_ms = 5000
    w = c.start_worker(c.env_for_worker(concurrency=10, shutdown_grace_ms=grace_ms,
                                        gateway_timeout_ms=5000), name="w")
    push_jobs(c, jobs)
    wait(c, lambda: sum(1 for v in requests_for(c, jobs).values() if v) == n, 10,
         f"all {n} status GETs at the PG", jobs, 0.02)
    assert depths(c)["inflight"] == n, state(c, jobs)

    w.proc.send_signal(signal.SIGTERM)
    # Jobs pushed after the signal must not be claimed.
    push_jobs(c, late)
    code, took = wait_exit(w, grace_ms / 1000 + 5)
    assert code == 0, \
        f"worker exit code {code!r} after SIGTERM (waited {took:.1f} s); {state(c, jobs)}"
    assert took < grace_ms / 1000 + 1, f"worker took {took:.1f} s to exit (grace {grace_ms} ms)"
    print(f"  worker exited 0 {took:.2f} s after SIGTERM")

    bad = {o: s for o, s in statuses(c, jobs).items() if s != "COMPLETED"}
    assert not bad, f"in-flight jobs not finished by the drain: {bad}; {state(c, jobs)}"
    counts = job_log_counts(c, jobs)
    assert all(counts.get(o) == 1 for o in jobs), f"job_log rows per order: {counts}"
    assert c.product_stock(SKU) == STOCK0 - n, state(c, jobs)
    d = depths(c)
    assert d == {"ready": len(late), "delayed": 0, "inflight": 0, "dead": 0}, \
        f"after the drain expected only the {len(late)} late jobs, ready: {d}"
    assert all(s == "PENDING" for s in statuses(c, late).values()), \
        f"jobs pushed after SIGTERM were worked on: {statuses(c, late)}"
    assert not any(requests_for(c, late).values()), "the PG was asked about a late job"
    msgs = log_msgs(w)
    assert any(m.startswith(f"SIGTERM: draining {n} job(s)") for m in msgs), msgs[-10:]
    assert any("handed back 0" in m for m in msgs), msgs[-5:]
    assert not w.bad_log_lines(), w.bad_log_lines()[:3]


@harness.timeout(60)
def test_sigterm_grace_shorter_than_pg_hands_jobs_back(c):
    n = 10
    jobs = seed_orders(c, n, "hand")
    pg_delay_ms = 6000
    grace_ms = 1000
    slow_pg(c, pg_delay_ms)
    # A lease far longer than the test: only the hand-back can bring the jobs back in time.
    env = dict(concurrency=10, shutdown_grace_ms=grace_ms, gateway_timeout_ms=15000,
               lease_ms=60000, gateway_slowest_ms=1000, payment_window_ms=120000)
    a = c.start_worker(c.env_for_worker(**env), name="a")
    push_jobs(c, jobs)
    wait(c, lambda: sum(1 for v in requests_for(c, jobs).values() if v) == n, 10,
         f"all {n} status GETs at the PG", jobs, 0.02)

    a.proc.send_signal(signal.SIGTERM)
    t_sig = time.monotonic()
    # When the grace ends the jobs are handed back: delayed (due now), no longer in flight.
    wait(c, lambda: depths(c)["delayed"] == n, grace_ms / 1000 + 3,
         f"the {n} unfinished jobs handed back to the delayed set", jobs, 0.05)
    handed_after = time.monotonic() - t_sig
    d = depths(c)
    assert d["inflight"] == 0 and d["ready"] == 0 and d["dead"] == 0, state(c, jobs)
    ids = [m.decode() for m in c.redis.zrange(c.key(f"delayed:{QUEUE}"), 0, -1)]
    metas = {i: job_meta(c, i) for i in ids}
    bad = {i: m for i, m in metas.items() if m is None or m["attempts"] != 0 or m["crashes"] != 0}
    assert not bad, f"a hand-back must not count an attempt or a crash: {bad}"
    assert all(s == "PENDING" for s in statuses(c, jobs).values()), state(c, jobs)

    code, _ = wait_exit(a, (grace_ms + env["gateway_timeout_ms"]) / 1000 + 3)
    exit_after = time.monotonic() - t_sig
    assert code == 0, f"worker a exit code {code!r} after SIGTERM; {state(c, jobs)}"
    print(f"  jobs handed back {handed_after:.2f} s and worker exited 0 {exit_after:.2f} s "
          f"after SIGTERM (grace {grace_ms} ms, PG delay {pg_delay_ms} ms)")
    msgs = log_msgs(a)
    assert any(f"handed {n} unfinished job(s) back" in m for m in msgs), msgs[-10:]
    assert any(f"handed back {n}" in m for m in msgs), msgs[-5:]
    # What a pool thread still waits for cannot be interrupted: the process may outlive its
    # grace by at most one PG call (SETTLE_GATEWAY_TIMEOUT_MS), never more.
    assert exit_after < (grace_ms + env["gateway_timeout_ms"]) / 1000 + 2, \
        f"worker a exited {exit_after:.2f} s after SIGTERM (grace {grace_ms} ms, " \
        f"gateway timeout {env['gateway_timeout_ms']} ms)"
    # Nothing was lost meanwhile, and a new worker completes every handed-back job.
    assert depths(c)["delayed"] == n and not lost_jobs(c), state(c, jobs)
    fast_pg(c)
    b = c.start_worker(c.env_for_worker(**env), name="b")
    wait(c, lambda: settled(c, jobs), 20, "worker b to complete the handed-back jobs", jobs,
         alive=[b])
    assert_exactly_once(c, jobs, deliveries=2)
    assert b.alive()


# --------------------------------------------------------------------------------------------
# 3. A second signal exits at once


def _second_signal(c, sig):
    jobs = seed_orders(c, 1, f"sig{int(sig)}")
    (oid, job), = jobs.items()
    slow_pg(c, 20000)
    env = dict(shutdown_grace_ms=30000, gateway_timeout_ms=30000, lease_ms=10000,
               gateway_slowest_ms=1000, payment_window_ms=60000)
    w = c.start_worker(c.env_for_worker(**env), name="w")
    push_jobs(c, jobs)
    wait(c, lambda: requests_for(c, jobs)[oid], 10, "the job's status GET at the PG", jobs,
         0.02)
    job_id = inflight_ids(c)
    w.proc.send_signal(sig)
    wait(c, lambda: log_has(w, "draining 1 job(s)"), 5, "the worker to log that it drains",
         jobs, 0.05)
    time.sleep(0.3)
    assert w.alive(), "the worker exited on the first signal although a job is in flight"
    w.proc.send_signal(sig)
    code, took = wait_exit(w, 3)
    assert code == 128 + int(sig), \
        f"exit code after a second {sig.name}: {code!r}, expected {128 + int(sig)}"
    assert took < 1.5, f"the second {sig.name} took {took:.2f} s to end the worker"
    assert log_has(w, "second signal: exiting now; 1 unfinished job(s)"), log_msgs(w)[-5:]
    # Nothing finished and nothing was handed back: the job is still leased (its lease, not
    # the dead worker, brings it back), its order untouched.
    assert inflight_ids(c) == job_id and len(job_id) == 1, state(c, jobs)
    assert depths(c) == {"ready": 0, "delayed": 0, "inflight": 1, "dead": 0}, state(c, jobs)
    assert c.order_status(oid) == "PENDING" and c.product_stock(SKU) == STOCK0
    assert not c.job_log(oid)


@harness.timeout(30)
def test_second_sigterm_exits_at_once(c):
    _second_signal(c, signal.SIGTERM)


@harness.timeout(30)
def test_second_sigint_exits_at_once(c):
    _second_signal(c, signal.SIGINT)


# --------------------------------------------------------------------------------------------
# 4. The circuit breaker under a PG outage


@harness.timeout(90)
def test_breaker_opens_in_outage_and_closes_after(c):
    n = 50
    jobs = seed_orders(c, n, "brk")
    c.admin_faults(fail_rate=1.0)
    env = dict(breaker_min_calls=5, breaker_window_ms=5000, breaker_open_ms=1000,
               breaker_open_max_ms=4000, retry_max_attempts=1000, concurrency=16)
    w = c.start_worker(c.env_for_worker(**env), name="w")
    push_jobs(c, jobs)
    wait(c, lambda: log_has(w, "circuit breaker status: closed -> open"), 10,
         "the breaker to open", jobs, 0.05, alive=[w])

    # Over an interval while the PG is still down, count what reaches it: the breaker lets
    # only probes through, far fewer requests than the jobs waiting.
    seq0 = last_seq(c)
    interval_s = 4.0
    end = time.monotonic() + interval_s
    last = None
    for _ in range(int(interval_s / 0.1) + 2):
        assert w.alive(), f"worker exited with {w.proc.returncode}: {log_msgs(w)[-3:]}"
        d = depths(c)
        assert d["dead"] == 0, \
            f"a job was dead-lettered while the breaker was open: {state(c, jobs)}"
        assert d["ready"] + d["delayed"] + d["inflight"] == n, \
            f"jobs missing while waiting: {state(c, jobs)}"
        last = d
        if time.monotonic() >= end:
            break
        time.sleep(0.1)
    during = c.admin_requests(since=seq0)
    print(f"  {len(during)} PG requests in {interval_s:g} s with the breaker open, "
          f"{n} jobs waiting (last depths {last})")
    assert len(during) < n // 2, \
        f"the PG received {len(during)} requests in {interval_s:g} s while the breaker was " \
        f"open and {n} jobs waited"
    msgs = log_msgs(w)
    assert any("open -> half_open" in m for m in msgs), \
        f"no half-open probe in {interval_s:g} s: {[m for m in msgs if 'breaker' in m]}"

    # Waiting for the breaker does not spend attempts: a job's attempts in Redis never
    # exceed the failed answers the PG gave for it, while its deliveries keep growing.
    p = c.redis.pipeline(transaction=True)
    p.hgetall(c.key("jobs"))
    p.hgetall(c.key("payloads"))
    metas_raw, payloads = p.execute()
    failed = {o: sum(1 for s in v if s >= 500) for o, v in requests_for(c, jobs).items()}
    total_attempts = total_deliveries = 0
    over = {}
    for jid, raw in metas_raw.items():
        a, dl, _k, _ch, _e = (int(x) for x in raw.split())
        oid = json.loads(payloads[jid])["order_id"]
        total_attempts += a
        total_deliveries += dl
        if a > failed[oid]:
            over[oid] = (a, failed[oid])
    assert len(metas_raw) == n, f"{len(metas_raw)} jobs in {{settle}}:jobs, expected {n}"
    assert not over, f"attempts spent without a failed PG answer (attempts, 5xx): {over}"
    assert total_deliveries > total_attempts + n, \
        f"expected breaker waits (deliveries {total_deliveries}, attempts {total_attempts})"

    # The PG recovers: the breaker half-opens, its probes succeed, it closes, and every
    # order completes, none dead-lettered.
    t_fix = time.monotonic()
    c.admin_faults(fail_rate=0.0)
    wait(c, lambda: log_has(w, "half_open -> closed"), 15,
         "the breaker to close after the PG recovered", jobs, 0.05, alive=[w])
    wait(c, lambda: settled(c, jobs), 20, "every order to complete after the recovery", jobs,
         alive=[w])
    print(f"  all {n} orders completed {time.monotonic() - t_fix:.1f} s after the PG recovered")
    assert_exactly_once(c, jobs)
    trips = [m for m in log_msgs(w) if "circuit breaker status" in m]
    assert trips and trips[-1].startswith("circuit breaker status: half_open -> closed"), trips


def test_queries_waiting_for_a_slot_are_not_sent_once_the_breaker_opens(c):
    """Jobs waiting for one of SETTLE_STATUS_CONCURRENCY query slots ask the breaker when their
    turn comes, not when they started waiting: once it opens, none of them reaches the PG
    until its first probe. Two slots, every answer a 500 after 300 ms, the breaker opening
    after two failures, a 3 s open period, ten jobs waiting."""
    n = 12
    jobs = seed_orders(c, n, "stg")
    c.admin_faults(fail_rate=1.0, latency_min_ms=300, latency_max_ms=300)
    env = dict(breaker_min_calls=2, breaker_failure_pct=50, breaker_window_ms=10000,
               breaker_open_ms=3000, breaker_open_max_ms=3000, retry_max_attempts=1000,
               concurrency=n, status_concurrency=2)
    w = c.start_worker(c.env_for_worker(**env), name="w")
    seq0 = last_seq(c)
    push_jobs(c, jobs)
    wait(c, lambda: log_has(w, "circuit breaker status: closed -> open"), 10,
         "the breaker to open", jobs, 0.05, alive=[w])
    opened_ms = None
    for line in w.log_text().splitlines():
        rec = json.loads(line)
        if rec.get("msg", "").startswith("circuit breaker status: closed -> open"):
            t = time.strptime(rec["ts"][:19], "%Y-%m-%dT%H:%M:%S")
            opened_ms = int(calendar.timegm(t) * 1000 + int(rec["ts"][20:23]))
            break
    assert opened_ms is not None
    time.sleep(2.0)
    assert w.alive(), log_msgs(w)[-3:]
    gets = [r["ts_ms"] - opened_ms for r in c.admin_requests(since=seq0)
            if r["method"] == "GET"]
    # The log line is written just after the second failure was counted; a query sent at
    # that moment may carry the same millisecond or the next.
    late = [d for d in gets if d > 50]
    assert late == [], f"status queries reached the PG {late} ms after the breaker opened"
    assert 2 <= len(gets) <= 4, gets
    assert depths(c)["dead"] == 0


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_pg_closing_idle_connections_neither_spins_nor_breaks_the_next_call(c):
    """The worker keeps its PG connections between calls, their sockets still watched so a
    reused connection costs no epoll change. A PG (or a load balancer) that closes idle
    connections makes such a socket readable: the worker must stop watching it rather than
    spin on it, and its next call must reconnect. The simulator here closes connections idle
    for 1 s."""
    old_args = c.pgsim_args
    c.stop_pgsim()
    c.pgsim_args = [*old_args, "--idle-timeout-s", "1"]
    w = None
    try:
        c.start_pgsim()
        first = seed_orders(c, 4, "idle1")
        w = c.start_worker(c.env_for_worker(concurrency=4), name="w")
        push_jobs(c, first)
        wait(c, lambda: settled(c, first), 15, "the first jobs", first, alive=[w])
        time.sleep(1.5)  # the simulator has closed the idle connections by now
        cpu0 = cpu_seconds(w.pid)
        time.sleep(2.0)
        used = cpu_seconds(w.pid) - cpu0
        assert used < 0.5, \
            f"an idle worker used {used:.2f} s of CPU in 2 s: spinning on a closed connection?"
        second = seed_orders(c, 4, "idle2", product=False)
        push_jobs(c, second)
        wait(c, lambda: settled(c, second), 15,
             "jobs sent after the PG closed the idle connections", second, alive=[w])
        assert_exactly_once(c, {**first, **second})
    finally:
        if w is not None:
            w.stop()
        c.stop_pgsim()
        c.pgsim_args = old_args
        c.start_pgsim()


# --------------------------------------------------------------------------------------------
# 5. Redis restart mid-run


@harness.timeout(90)
def test_redis_restart_mid_run(c):
    jobs = seed_orders(c, 30, "rr")
    before = dict(list(jobs.items())[:15])
    after = dict(list(jobs.items())[15:])
    slow_pg(c, 300)
    w = c.start_worker(c.env_for_worker(concurrency=4, gateway_timeout_ms=3000), name="w")
    push_jobs(c, before)
    wait(c, lambda: status_counts(c, before).get("COMPLETED", 0) >= 3, 15,
         "some jobs to complete before the restart", before, 0.05)
    # Redis is down for a second, as in a real restart (a restart faster than the worker's
    # first reconnect attempt would not test reconnecting at all).
    c.restart_redis(down_s=1.0)
    assert status_counts(c, before).get("COMPLETED", 0) < len(before), \
        f"all jobs finished before the restart: {state(c, before)}"
    assert w.alive(), "the worker died while Redis was down"
    t_up = time.monotonic()
    wait(c, lambda: reconnected(w), 10,
         "the worker to reconnect every Redis connection it lost (log 'redis connected to' "
         "after 'lost; reconnecting')", before, 0.05,
         detail=lambda: f"its Redis log lines: {redis_log_lines(w)}", alive=[w])
    print(f"  worker reconnected {time.monotonic() - t_up:.2f} s after Redis was back")
    push_jobs(c, after)
    wait(c, lambda: settled(c, jobs), 30,
         "every job pushed before and after the restart to finish", jobs, alive=[w])
    assert w.alive(), "the worker exited after the Redis restart"
    assert_exactly_once(c, jobs)
    # Still working afterwards: one more job goes through the same worker.
    extra = seed_orders(c, 1, "rr-extra", product=False)
    push_jobs(c, extra)
    wait(c, lambda: settled(c, extra), 10, "a job pushed after the restart", extra, 0.05)
    assert w.alive()


# --------------------------------------------------------------------------------------------
# 6. PostgreSQL stopped mid-run


@harness.timeout(120)
def test_postgres_stop_mid_run(c):
    n = 30
    jobs = seed_orders(c, n, "pgd")
    slow_pg(c, 500)
    # Two at a time, half a second each: the run takes ~7 s, so the outage hits it midway.
    # The default SETTLE_RETRY_MAX_ATTEMPTS (8) with the harness's 50-200 ms backoff lasts
    # about a second, far less than the outage: attempts must not be what keeps jobs alive.
    w = c.start_worker(c.env_for_worker(concurrency=2, gateway_timeout_ms=3000), name="w")
    push_jobs(c, jobs)
    wait(c, lambda: status_counts(c, jobs).get("COMPLETED", 0) >= 3, 15,
         "some jobs to complete before PostgreSQL stops", jobs, 0.05)
    c.stop_postgres()
    down_s = 4.0
    end = time.monotonic() + down_s
    for _ in range(int(down_s / 0.2) + 2):
        d = depths(c)
        dlq = c.dlq_entries()
        assert d["dead"] == 0, \
            f"job(s) dead-lettered while PostgreSQL was down: {d}; " \
            f"{[(e.get('reason'), e.get('attempts'), e.get('error')) for e in dlq[:3]]}"
        assert w.alive(), "the worker died while PostgreSQL was down"
        if time.monotonic() >= end:
            break
        time.sleep(0.2)
    c.start_postgres()
    done_at_restart = status_counts(c, jobs).get("COMPLETED", 0)
    assert done_at_restart < n, f"every job finished before the outage: {state(c, jobs)}"
    wait(c, lambda: settled(c, jobs), 30, "every job to complete once PostgreSQL is back",
         jobs, alive=[w])
    assert_exactly_once(c, jobs)
    # The outage spent no attempt: no job failed, they only waited.
    spent = c.sql("SELECT order_id, attempts FROM job_log WHERE order_id = ANY(%s) "
                  "AND attempts <> 0", (list(jobs),))
    assert not spent, f"jobs recorded failed attempts for a PostgreSQL outage: {spent[:5]}"
    print(f"  {n - done_at_restart} of {n} jobs finished after PostgreSQL came back")
    assert w.alive()


# --------------------------------------------------------------------------------------------
# 7. crashed_too_often


@harness.timeout(60)
def test_crashed_too_often_goes_to_dlq(c):
    jobs = seed_orders(c, 1, "crash")
    (oid, job), = jobs.items()
    # Field order, spacing, an escape and raw UTF-8 of the producer's text must survive byte
    # for byte; the unknown field "note" is kept too.
    raw = ('{ "user_id" : "%s",\n  "transaction_key":"%s", "order_id": "%s",'
           ' "note": "caf\\u00e9 \u00fc" }' % (USER, job["transaction_key"], oid)).encode()
    slow_pg(c, 30000)
    env = dict(max_deliveries=2, lease_ms=1000, gateway_timeout_ms=60000,
               gateway_slowest_ms=1000, payment_window_ms=60000, shutdown_grace_ms=1000)
    c.push_job(QUEUE, raw)

    job_id = None
    for round_ in (1, 2):
        w = c.start_worker(c.env_for_worker(**env), name=f"crash{round_}")
        wait(c, lambda: len(requests_for(c, jobs)[oid]) == round_, 10,
             f"delivery {round_}'s status GET at the PG", jobs, 0.02)
        ids = inflight_ids(c)
        assert len(ids) == 1, f"expected the job in flight: {ids}; {state(c, jobs)}"
        job_id = job_id or ids[0]
        assert ids[0] == job_id, (ids, job_id)
        meta = job_meta(c, job_id)
        assert meta["deliveries"] == round_ and meta["crashes"] == round_ - 1, meta
        assert w.kill9() == -signal.SIGKILL

    fast_pg(c)
    w3 = c.start_worker(c.env_for_worker(**env), name="crash3")
    wait(c, lambda: depths(c)["dead"] == 1, 10, "the job in the DLQ", jobs, 0.05)
    dlq = c.dlq_entries()
    assert len(dlq) == 1, dlq
    e = dlq[0]
    assert e.get("reason") == "crashed_too_often", e
    assert e.get("id") == job_id and e.get("queue") == QUEUE, e
    assert e.get("deliveries") == 3, f"deliveries (2 crashed + the burying one): {e}"
    assert e.get("attempts") == 0, f"no try failed, the workers died: {e}"
    assert e.get("job") == json.loads(raw), e
    assert "SETTLE_MAX_DELIVERIES=2" in (e.get("error") or ""), e
    kept = c.redis.hget(c.key("dead:jobs"), job_id)
    assert kept == raw, f"{{settle}}:dead:jobs[{job_id}] is {kept!r}, pushed {raw!r}"
    assert c.redis.hget(c.key("dead:count"), QUEUE) == b"1"
    d = depths(c)
    assert d == {"ready": 0, "delayed": 0, "inflight": 0, "dead": 1}, d
    assert c.redis.hget(c.key("jobs"), job_id) is None, "a buried job keeps its counters"
    # Nothing happened to the money or the stock, the third delivery never asked the PG, and
    # the dead job has its one job_log row.
    assert c.order_status(oid) == "PENDING"
    assert c.product_stock(SKU) == STOCK0
    assert c.resv_state(oid) == "reserved", c.resv_state(oid)
    assert len(requests_for(c, jobs)[oid]) == 2, requests_for(c, jobs)
    rows = c.job_log(oid)
    assert [(r["job_id"], r["outcome"], r["result"]) for r in rows] == \
        [(job_id, "dead", "crashed_too_often")], rows
    assert w3.alive()


if __name__ == "__main__":
    harness.main(globals())
