"""demo.py - the settle demo, driven by ops/demo.sh (README command 1).

Starts throwaway servers through the integration harness (redis-server, PostgreSQL 15 and the
PG simulator with the seed 003 fault profile: a third of calls fail, a third are slow), plays
a shop for a few hundred orders, lets three workers reconcile them for a bounded time, stops
the workers with SIGTERM and prints what happened. Everything it starts is stopped by PID at
the end, also on Ctrl-C (the harness installs the handlers).

The shop, step by step: products with stock in PostgreSQL, loaded into Redis (`settle stock
load`); orders with items; a stock reservation per order (`settle stock reserve`); a card
payment for most orders through the simulator's public API (POST /api/v1/payments); one
reconcile job per order (`settle enqueue reconcile`). Orders without a payment are created
older than the payment window, so the workers expire them and release their stock.
"""

import argparse
import collections
import concurrent.futures
import json
import os
import random
import signal
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402

# The demo's worker configuration, in one place. Small enough that every outcome shows up
# within the run: the payment window is 20 s (orders without a payment are created 60 s
# old, so they expire on their first check) and a PENDING payment is checked again after
# 2 s and 4 s. The gateway timeout (4.5 s) lets the simulator's slow answers (4 s) arrive:
# with a 3 s timeout every slow answer would count as a failure too, two thirds of all calls
# would fail, the circuit breaker (60 %) would stay open most of the run and many orders
# would still be PENDING when the demo ends. The 500s (a third of calls) are still retried.
DEMO_ENV = {
    "SETTLE_LOG_LEVEL": "info",
    "SETTLE_CONCURRENCY": "16",
    "SETTLE_PAYMENT_WINDOW_MS": "20000",
    "SETTLE_GATEWAY_SLOWEST_MS": "5000",
    "SETTLE_GATEWAY_TIMEOUT_MS": "4500",
    "SETTLE_GATEWAY_CONNECT_TIMEOUT_MS": "1000",
    "SETTLE_LEASE_MS": "5000",
    "SETTLE_REAPER_INTERVAL_MS": "1000",
    "SETTLE_CHECK_SCHEDULE_MS": "2000,4000",
    "SETTLE_RETRY_BASE_MS": "500",
    "SETTLE_RETRY_CAP_MS": "5000",
    "SETTLE_RESERVATION_TTL_MS": "120000",
    "SETTLE_SHUTDOWN_GRACE_MS": "10000",
}
# The simulator: seed 003's faults, but slow answers take 4 s instead of 60 s so the demo
# ends in bounded time; a payment becomes final 0.5-2 s after it was requested.
PGSIM_ARGS = ["--slow-ms", "4000", "--process-ms", "500-2000"]
RESERVATION_TTL_MS = 120000
UNPAID_AGE_S = 60  # older than the payment window
CARD_TYPES = ("SAMSUNG", "KB", "HYUNDAI")


def card_number(rng):
    """A 16-digit card number with a valid Luhn check digit, as xxxx-xxxx-xxxx-xxxx."""
    digits = [rng.randrange(10) for _ in range(15)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:  # these positions are doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return "-".join(s[i:i + 4] for i in range(0, 16, 4))


def say(msg):
    print(msg, flush=True)


def seed_catalogue(c, rng, n_products):
    products = {}
    for i in range(n_products):
        sku = f"book-{i:02d}"
        # The last SKU is scarce, so some reservations are refused and the demo shows it.
        stock = 6 if i == n_products - 1 else rng.randrange(120, 201)
        price = rng.randrange(5, 60) * 100
        c.add_product(sku, stock, name=f"Book {i}", price_minor=price)
        products[sku] = price
    c.stock_load()
    return products


def make_orders(c, rng, products, n_orders, unpaid_pct):
    """Creates the orders in PostgreSQL and reserves their stock. Returns the orders that
    hold a reservation: dicts with id, user, amount, paid (whether the shop will pay)."""
    orders = []
    refused = 0
    skus = sorted(products)
    for i in range(n_orders):
        oid = f"order-{i:05d}"
        user = f"user-{rng.randrange(1, 41):03d}"
        items = {sku: rng.randrange(1, 4) for sku in rng.sample(skus, rng.randrange(1, 4))}
        amount = sum(products[s] * q for s, q in items.items())
        paid = rng.randrange(100) >= unpaid_pct
        c.add_order(oid, user, amount, items, age_s=0 if paid else UNPAID_AGE_S)
        r = c.reserve(oid, items, RESERVATION_TTL_MS)
        if r.returncode != 0:
            # The shop refuses an order it cannot reserve stock for: it never reaches the
            # payment step, so there is nothing for settle to reconcile.
            refused += 1
            c.sql("UPDATE orders SET status = 'FAILED', failure_reason = 'out_of_stock' "
                  "WHERE id = %s", (oid,))
            continue
        orders.append({"id": oid, "user": user, "amount": amount, "paid": paid})
    say(f"  {len(orders)} orders reserved stock, {refused} refused (not enough stock)")
    return orders


def pay(c, rng_seed, order):
    """The shop's payment call for one order: up to 3 tries with a short pause (the simulator
    fails a third of requests). Returns the transaction key or None."""
    rng = random.Random(rng_seed)
    card = card_number(rng)
    card_type = rng.choice(CARD_TYPES)
    for _ in range(3):
        try:
            r = c.pg_pay(order["user"], order["id"], order["amount"], card_type=card_type,
                         card_no=card)
        except OSError:  # timeout or connection error: try again
            time.sleep(0.2)
            continue
        if r.status == 200:
            try:
                return c.tx_key_of(r.json)
            except (AssertionError, ValueError):
                return None
        time.sleep(0.2)
    return None


def make_payments(c, orders):
    """Pays for the orders meant to be paid, 16 at a time (slow answers take 4 s), and
    records each accepted payment in PostgreSQL as PENDING."""
    todo = [o for o in orders if o["paid"]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        keys = list(pool.map(lambda o: pay(c, zlib.crc32(o["id"].encode()), o), todo))
    accepted = 0
    for o, key in zip(todo, keys):
        o["tx"] = key
        if key:
            accepted += 1
            c.sql("INSERT INTO payments (order_id, transaction_key, user_id, amount_minor, "
                  "status) VALUES (%s, %s, %s, %s, 'PENDING')", (o["id"], key, o["user"],
                                                                 o["amount"]))
    say(f"  {accepted} payments accepted by the PG, {len(todo) - accepted} refused after "
        f"3 tries, {len(orders) - len(todo)} orders left unpaid on purpose")


def enqueue(c, env, orders):
    failed = 0
    for o in orders:
        job = {"id": f"demo-{o['id']}", "order_id": o["id"], "user_id": o["user"]}
        if o.get("tx"):
            job["transaction_key"] = o["tx"]
        r = c.run_settle(["enqueue", "reconcile", json.dumps(job)], env=env)
        if r.returncode != 0:
            failed += 1
            if failed <= 3:
                say(f"  settle enqueue failed ({r.returncode}): {r.stderr.strip()[:300]}")
    say(f"  {len(orders) - failed} reconcile jobs enqueued"
        + (f", {failed} FAILED" if failed else ""))
    # A buggy producer that bypasses `settle enqueue` (which validates): these two go
    # straight onto the list, and the workers must bury them in the DLQ, not crash or loop.
    c.push_job("reconcile", {"order_id": 42, "user_id": "user-001"})
    c.push_job("reconcile", b"\x00not json")
    say("  2 malformed jobs pushed straight onto the list (they belong in the DLQ)")


def progress(c):
    counts = dict(c.sql("SELECT status, count(*) FROM orders GROUP BY status ORDER BY status"))
    d = c.queue_depths("reconcile")
    return counts, d


def run_workers(c, env, n_workers, max_seconds):
    workers = [c.start_worker(env, f"w{i + 1}") for i in range(n_workers)]
    say(f"  started {n_workers} workers (pids {', '.join(str(w.pid) for w in workers)})")
    t0 = time.monotonic()
    last_print = 0.0
    # Bounded: at most max_seconds, polled every 0.5 s.
    for _ in range(int(max_seconds / 0.5) + 1):
        elapsed = time.monotonic() - t0
        counts, d = progress(c)
        if elapsed - last_print >= 5 or elapsed == 0:
            last_print = elapsed
            say(f"  t={elapsed:4.0f}s orders {counts}  queue ready={d['ready']} "
                f"delayed={d['delayed']} in-flight={d['inflight']} dead={d['dead']}")
        if d["ready"] + d["delayed"] + d["inflight"] == 0 and elapsed > 1:
            say(f"  queue drained after {elapsed:.0f} s")
            break
        if not any(w.alive() for w in workers):
            say("  every worker has exited")
            break
        if elapsed >= max_seconds:
            say(f"  time limit of {max_seconds} s reached")
            break
        time.sleep(0.5)
    codes = {w.name: w.stop(signal.SIGTERM, timeout=20) for w in workers}
    say(f"  workers stopped with SIGTERM: exit codes {codes}")
    for w in workers:
        bad = w.bad_log_lines()
        if bad:
            say(f"  {w.name}: {len(bad)} non-JSON log line(s), e.g. {bad[0][:200]!r}")
    return workers


def table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(out)


def active_reservations(c):
    """Units held by reservations in state "reserved", per SKU (scanning resv hashes)."""
    held = collections.Counter()
    prefix = c.key("resv:").encode()
    for key in c.redis.scan_iter(match=prefix + b"*", count=500):
        if c.redis.type(key) != b"hash":
            continue  # {settle}:resv:deadlines is a ZSET
        h = c.redis.hgetall(key)
        if h.get(b"state") != b"reserved":
            continue
        for f, v in h.items():
            if f.startswith(b"sku:"):
                held[f[4:].decode()] += int(v)
    return held


def summary(c, env):
    say("\n=== Orders by status")
    say(table(c.sql("SELECT status, count(*) FROM orders GROUP BY 1 ORDER BY 1"),
              ["status", "orders"]))
    reasons = c.sql("SELECT status, failure_reason, count(*) FROM orders "
                    "WHERE failure_reason IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2")
    if reasons:
        say("\n  failure reasons:")
        say(table(reasons, ["status", "failure_reason", "orders"]))

    say("\n=== Stock per SKU (invariant: Redis available = on hand - reserved)")
    held = active_reservations(c)
    rows = []
    bad = 0
    for sku, on_hand in c.sql("SELECT sku, stock FROM products ORDER BY sku"):
        avail = c.stock_available(sku)
        ok = avail is not None and avail == on_hand - held[sku]
        bad += not ok
        rows.append([sku, on_hand, avail, held[sku], "ok" if ok else "MISMATCH"])
    say(table(rows, ["sku", "pg on hand", "redis available", "reserved", "check"]))
    say(f"  {bad} mismatching SKU(s)")

    say("\n=== Queues (settle stats)")
    r = c.run_settle(["stats"], env=env)
    say(r.stdout.rstrip() if r.returncode == 0 else
        f"  settle stats failed ({r.returncode}): {r.stderr.strip()[:500]}")
    d = c.queue_depths("reconcile")
    say(f"  (from Redis: ready={d['ready']} delayed={d['delayed']} in-flight={d['inflight']} "
        f"dead={d['dead']})")

    say("\n=== Dead-letter queue by reason (settle dlq list --json)")
    r = c.run_settle(["dlq", "list", "--json", "--limit", "100000"], env=env)
    entries = None
    if r.returncode == 0:
        entries = parse_json_list(r.stdout)
    if entries is None:
        say(f"  settle dlq list --json failed ({r.returncode}): {r.stderr.strip()[:300]}; "
            "counting the DLQ list in Redis instead")
        entries = c.dlq_entries()
    by_reason = collections.Counter(e.get("reason", "?") for e in entries
                                    if isinstance(e, dict))
    say(table(sorted(by_reason.items()), ["reason", "entries"]) if by_reason else "  empty")

    say("\n=== job_log outcomes")
    say(table(c.sql("SELECT outcome, result, count(*) FROM job_log GROUP BY 1, 2 "
                    "ORDER BY 1, 2"), ["outcome", "result", "jobs"]))


def parse_json_list(text):
    """A JSON array, an object holding one ("entries"/"data"), or JSON lines; None if none."""
    text = text.strip()
    if not text:
        return []
    try:
        v = json.loads(text)
        if isinstance(v, list):
            return v
        if isinstance(v, dict):
            for k in ("entries", "data", "dead"):
                if isinstance(v.get(k), list):
                    return v[k]
            return [v]
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orders", type=int, default=200)
    ap.add_argument("--products", type=int, default=10)
    ap.add_argument("--unpaid-pct", type=int, default=10,
                    help="share of orders that never get a payment (they expire)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--max-seconds", type=int, default=90,
                    help="how long the workers may run at most")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    # demo.sh sets SETTLE_BIN; run by hand, the release build is the natural default.
    os.environ.setdefault("SETTLE_BIN", os.path.join(ROOT, "build", "release", "settle"))
    harness.settle_bin()  # fail early and clearly when it is missing

    t0 = time.monotonic()
    rng = random.Random(args.seed)
    with harness.Cluster(pgsim_profile="seed", pgsim_seed=args.seed, pgsim_args=PGSIM_ARGS,
                         keep_dir=args.keep, quiet=False) as c:
        env = c.env_for_worker(**DEMO_ENV)
        say(f"servers: redis {c.redis_url}  postgres {c.database_url}  pg {c.gateway_url}")
        say(f"logs in {c.dir}" + ("" if args.keep else " (removed at the end; --keep keeps)"))
        c.migrate(env)
        say(f"shop: {args.products} products, {args.orders} orders")
        products = seed_catalogue(c, rng, args.products)
        orders = make_orders(c, rng, products, args.orders, args.unpaid_pct)
        make_payments(c, orders)
        enqueue(c, env, orders)
        say("workers:")
        run_workers(c, env, args.workers, args.max_seconds)
        summary(c, env)
        say(f"\ndemo finished in {time.monotonic() - t0:.0f} s; stopping the servers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
