#!/usr/bin/python3
"""Stock reservation scripts (lua/stock_*.lua) against a real redis-server.

Starts its own redis-server on a free loopback port (stopped by PID in a finally block),
loads the scripts from lua/, and checks:
  - the race: 1000 reservations of 1 unit (distinct orders) from 8 threads against 100 units
    give exactly 100 "reserved" and 900 "insufficient", the stock key ends at 0 and is never
    seen below 0, and exactly 100 reservation hashes exist;
  - the state tables of reserve, commit and release: all-or-nothing reserve, idempotent
    re-reserve, commit/release of every state, retake, sticky out_of_stock, release refusing
    a SKU list that misses one of the reservation's SKUs, and stock_due.
Needs only the Python stdlib and python3-redis (Debian). Prints "N passed, N failed" last and
exits non-zero on any failure. The lead may move it onto the shared harness later.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LUA_DIR = os.path.join(ROOT, "lua")
NS = "t"

passed = 0
failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL %s %s" % (name, detail), flush=True)


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def key(suffix):
    return "{%s}:%s" % (NS, suffix)


def load_scripts(r):
    scripts = {}
    for name in ("stock_reserve", "stock_commit", "stock_release", "stock_due"):
        with open(os.path.join(LUA_DIR, name + ".lua"), "rb") as f:
            scripts[name] = r.register_script(f.read())
    return scripts


def dec(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return [dec(x) for x in v]
    return v


def reserve(s, r, order, items, deadline_ms=9999999999999, created_ms=1):
    keys = [key("resv:" + order), key("resv:deadlines")] + [key("stock:" + k) for k, _ in items]
    args = [order, deadline_ms, created_ms]
    for sku, qty in items:
        args += [sku, qty]
    return dec(s["stock_reserve"](keys=keys, args=args, client=r))


def commit(s, r, order, items):
    keys = [key("resv:" + order), key("resv:deadlines")] + [key("stock:" + k) for k, _ in items]
    args = [order]
    for sku, qty in items:
        args += [sku, qty]
    return dec(s["stock_commit"](keys=keys, args=args, client=r))


def release(s, r, order, skus):
    keys = [key("resv:" + order), key("resv:deadlines")] + [key("stock:" + k) for k in skus]
    return dec(s["stock_release"](keys=keys, args=[order] + list(skus), client=r))


def raises(fn):
    try:
        fn()
    except redis.ResponseError as e:
        return str(e)
    return None


def stock(r, sku):
    v = r.get(key("stock:" + sku))
    return None if v is None else int(v)


def state(r, order):
    v = r.hget(key("resv:" + order), "state")
    return None if v is None else v.decode()


def test_race(r, s):
    r.flushall()
    r.set(key("stock:RACE"), 100)
    results = {}
    lock = threading.Lock()
    lowest = [100]
    stop = threading.Event()

    def worker(w):
        c = redis.Redis(connection_pool=r.connection_pool)
        out = []
        for i in range(125):
            order = "race-%d-%d" % (w, i)
            out.append(reserve(s, c, order, [("RACE", 1)])[0])
        with lock:
            results[w] = out

    def watcher():
        # Samples the stock key while the workers run; bounded by the stop event and a cap.
        c = redis.Redis(connection_pool=r.connection_pool)
        for _ in range(100000):
            if stop.is_set():
                break
            v = stock(c, "RACE")
            if v is not None and v < lowest[0]:
                lowest[0] = v

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    wt = threading.Thread(target=watcher)
    wt.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    wt.join(timeout=10)
    check("race: all threads finished", all(not t.is_alive() for t in threads))
    flat = [x for out in results.values() for x in out]
    check("race: 1000 answers", len(flat) == 1000, str(len(flat)))
    check("race: 100 reserved", flat.count("reserved") == 100, str(flat.count("reserved")))
    check("race: 900 insufficient", flat.count("insufficient") == 900,
          str(flat.count("insufficient")))
    check("race: stock 0", stock(r, "RACE") == 0, str(stock(r, "RACE")))
    check("race: never negative", lowest[0] >= 0, str(lowest[0]))
    hashes = list(r.scan_iter(match=key("resv:race-*"), count=1000))
    check("race: 100 hashes", len(hashes) == 100, str(len(hashes)))
    check("race: 100 deadlines", r.zcard(key("resv:deadlines")) == 100)


def test_reserve(r, s):
    r.flushall()
    r.set(key("stock:A"), 5)
    r.set(key("stock:B"), 1)
    # All or nothing: B is short, A must stay untouched.
    got = reserve(s, r, "o1", [("A", 2), ("B", 2)])
    check("reserve: insufficient names sku", got == ["insufficient", "B", 1], str(got))
    check("reserve: nothing taken", (stock(r, "A"), stock(r, "B")) == (5, 1))
    check("reserve: no hash", not r.exists(key("resv:o1")))
    check("reserve: no deadline", r.zcard(key("resv:deadlines")) == 0)
    # Missing stock key counts as 0.
    got = reserve(s, r, "o1", [("A", 1), ("NOPE", 1)])
    check("reserve: missing key is 0", got == ["insufficient", "NOPE", 0], str(got))
    check("reserve: missing key not created", not r.exists(key("stock:NOPE")))
    got = reserve(s, r, "o1", [("A", 2), ("B", 1)], deadline_ms=1234, created_ms=77)
    check("reserve: reserved", got == ["reserved"], str(got))
    check("reserve: taken", (stock(r, "A"), stock(r, "B")) == (3, 0))
    h = {k.decode(): v.decode() for k, v in r.hgetall(key("resv:o1")).items()}
    check("reserve: hash", h == {"state": "reserved", "deadline_ms": "1234", "created_ms": "77",
                                 "sku:A": "2", "sku:B": "1"}, str(h))
    check("reserve: deadline", r.zscore(key("resv:deadlines"), "o1") == 1234)
    # Idempotent: a second call for the same order takes nothing.
    got = reserve(s, r, "o1", [("A", 2), ("B", 1)])
    check("reserve: again exists", got == ["exists", "reserved"], str(got))
    check("reserve: again nothing taken", (stock(r, "A"), stock(r, "B")) == (3, 0))
    # Bad input is an error reply and changes nothing.
    bad = [
        ("duplicate sku", lambda: reserve(s, r, "o2", [("A", 1), ("A", 1)])),
        ("qty 0", lambda: reserve(s, r, "o2", [("A", 0)])),
        ("qty float", lambda: reserve(s, r, "o2", [("A", "1.5")])),
        ("qty too big", lambda: reserve(s, r, "o2", [("A", 1000001)])),
        ("qty text", lambda: reserve(s, r, "o2", [("A", "x")])),
        ("sku brace", lambda: reserve(s, r, "o2", [("A{", 1)])),
        ("sku long", lambda: reserve(s, r, "o2", [("S" * 65, 1)])),
        ("deadline text", lambda: reserve(s, r, "o2", [("A", 1)], deadline_ms="soon")),
        ("no items", lambda: reserve(s, r, "o2", [])),
        ("order deadlines", lambda: reserve(s, r, "deadlines", [("A", 1)])),
    ]
    for name, fn in bad:
        err = raises(fn)
        check("reserve: %s is an error" % name, err is not None and "stock_reserve" in err,
              str(err))
    misaligned = raises(lambda: dec(s["stock_reserve"](
        keys=[key("resv:o2"), key("resv:deadlines"), key("stock:B"), key("stock:A")],
        args=["o2", 9, 1, "A", 1, "B", 1], client=r)))
    check("reserve: misaligned keys is an error", misaligned is not None, str(misaligned))
    check("reserve: bad input took nothing", (stock(r, "A"), stock(r, "B")) == (3, 0))
    check("reserve: bad input wrote nothing", not r.exists(key("resv:o2")))
    # 64 items is the cap; 65 is refused.
    items = [("M%d" % i, 1) for i in range(64)]
    for sku, _ in items:
        r.set(key("stock:" + sku), 1)
    check("reserve: 64 items", reserve(s, r, "o64", items) == ["reserved"])
    err = raises(lambda: reserve(s, r, "o65", items + [("M64", 1)]))
    check("reserve: 65 items refused", err is not None, str(err))


def test_commit(r, s):
    r.flushall()
    r.set(key("stock:A"), 10)
    items = [("A", 3)]
    # reserved -> committed, deadline removed
    reserve(s, r, "c1", items)
    check("commit: reserved -> committed", commit(s, r, "c1", items) == "committed")
    check("commit: state committed", state(r, "c1") == "committed")
    check("commit: deadline removed", r.zscore(key("resv:deadlines"), "c1") is None)
    check("commit: no extra units", stock(r, "A") == 7)
    # committed -> already_committed
    check("commit: again", commit(s, r, "c1", items) == "already_committed")
    check("commit: again takes nothing", stock(r, "A") == 7)
    # released -> retaken
    reserve(s, r, "c2", items)
    check("commit: release first", release(s, r, "c2", ["A"]) == "released")
    check("commit: units back", stock(r, "A") == 7)
    check("commit: released -> retaken", commit(s, r, "c2", items) == "retaken")
    check("commit: retaken took units", stock(r, "A") == 4)
    h = {k.decode(): v.decode() for k, v in r.hgetall(key("resv:c2")).items()}
    check("commit: retaken hash", h.get("state") == "committed" and h.get("retaken") == "1"
          and h.get("sku:A") == "3", str(h))
    check("commit: retaken then again", commit(s, r, "c2", items) == "already_committed")
    check("commit: retaken then again takes nothing", stock(r, "A") == 4)
    # missing -> retaken
    check("commit: missing -> retaken", commit(s, r, "c3", items) == "retaken")
    check("commit: missing retake took units", stock(r, "A") == 1)
    check("commit: missing retake state", state(r, "c3") == "committed")
    # missing, too few -> out_of_stock, sticky even after stock comes back
    check("commit: missing short -> out_of_stock", commit(s, r, "c4", items) == "out_of_stock")
    check("commit: out_of_stock took nothing", stock(r, "A") == 1)
    h = {k.decode(): v.decode() for k, v in r.hgetall(key("resv:c4")).items()}
    check("commit: out_of_stock hash has items", h == {"state": "out_of_stock", "sku:A": "3"},
          str(h))
    r.set(key("stock:A"), 100)
    check("commit: out_of_stock sticky", commit(s, r, "c4", items) == "out_of_stock")
    check("commit: sticky took nothing", stock(r, "A") == 100)
    # released, too few -> out_of_stock (all or nothing across SKUs)
    r.set(key("stock:A"), 10)
    r.set(key("stock:B"), 1)
    two = [("A", 1), ("B", 1)]
    reserve(s, r, "c5", two)
    release(s, r, "c5", ["A", "B"])
    r.set(key("stock:B"), 0)
    check("commit: released short -> out_of_stock", commit(s, r, "c5", two) == "out_of_stock")
    check("commit: released short took nothing", (stock(r, "A"), stock(r, "B")) == (10, 0))
    check("commit: released short state", state(r, "c5") == "out_of_stock")
    check("commit: released short sticky", commit(s, r, "c5", two) == "out_of_stock")
    err = raises(lambda: commit(s, r, "c6", [("A", 1), ("A", 1)]))
    check("commit: duplicate sku error", err is not None, str(err))
    err = raises(lambda: commit(s, r, "c6", []))
    check("commit: gone without items error", err is not None, str(err))
    check("commit: errors took nothing", stock(r, "A") == 10 and not r.exists(key("resv:c6")))


def test_release(r, s):
    r.flushall()
    r.set(key("stock:A"), 10)
    r.set(key("stock:B"), 10)
    two = [("A", 2), ("B", 3)]
    reserve(s, r, "r1", two)
    # A SKU list missing one of the reservation's SKUs is refused and changes nothing.
    err = raises(lambda: release(s, r, "r1", ["A"]))
    check("release: partial list refused", err is not None and "B" in err, str(err))
    check("release: refused kept units", (stock(r, "A"), stock(r, "B")) == (8, 7))
    check("release: refused kept state", state(r, "r1") == "reserved")
    check("release: refused kept deadline", r.zscore(key("resv:deadlines"), "r1") is not None)
    # Extra SKUs are harmless.
    check("release: reserved -> released", release(s, r, "r1", ["B", "A", "C"]) == "released")
    check("release: units back", (stock(r, "A"), stock(r, "B")) == (10, 10))
    check("release: state released", state(r, "r1") == "released")
    check("release: deadline removed", r.zscore(key("resv:deadlines"), "r1") is None)
    check("release: no stock key created", not r.exists(key("stock:C")))
    check("release: again", release(s, r, "r1", ["A", "B"]) == "already_released")
    check("release: again gave nothing", (stock(r, "A"), stock(r, "B")) == (10, 10))
    # committed -> not_reserved
    reserve(s, r, "r2", two)
    commit(s, r, "r2", two)
    check("release: committed -> not_reserved", release(s, r, "r2", ["A", "B"]) == "not_reserved")
    check("release: committed kept units", (stock(r, "A"), stock(r, "B")) == (8, 7))
    # out_of_stock -> already_released
    commit(s, r, "r3", [("A", 1000)])
    check("release: out_of_stock -> already_released",
          release(s, r, "r3", ["A"]) == "already_released")
    # missing -> missing, and a stale deadline entry is removed
    r.zadd(key("resv:deadlines"), {"ghost": 1})
    check("release: missing", release(s, r, "ghost", []) == "missing")
    check("release: missing removed deadline", r.zscore(key("resv:deadlines"), "ghost") is None)
    check("release: missing gave nothing", (stock(r, "A"), stock(r, "B")) == (8, 7))


def test_due(r, s):
    r.flushall()
    r.set(key("stock:A"), 10)
    now_ms = int(time.time() * 1000)
    reserve(s, r, "d1", [("A", 1)], deadline_ms=now_ms - 60000)
    reserve(s, r, "d2", [("A", 1)], deadline_ms=now_ms - 30000)
    reserve(s, r, "d3", [("A", 1)], deadline_ms=now_ms + 3600000)
    due = dec(s["stock_due"](keys=[key("resv:deadlines")], args=[10], client=r))
    check("due: past deadlines only, earliest first", due == ["d1", "d2"], str(due))
    due = dec(s["stock_due"](keys=[key("resv:deadlines")], args=[1], client=r))
    check("due: limit", due == ["d1"], str(due))
    err = raises(lambda: s["stock_due"](keys=[key("resv:deadlines")], args=[0], client=r))
    check("due: limit 0 error", err is not None, str(err))
    for o in ("d1", "d2"):
        release(s, r, o, ["A"])
    due = dec(s["stock_due"](keys=[key("resv:deadlines")], args=[10], client=r))
    check("due: empty after release", due == [], str(due))
    check("due: units back", stock(r, "A") == 9)


def main():
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="settle-stock-")
    log_path = os.path.join(workdir, "redis.log")
    log = open(log_path, "wb")
    proc = None
    try:
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", workdir],
            stdout=log, stderr=subprocess.STDOUT)
        r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
        for _ in range(100):
            try:
                if r.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start on port %d" % port)
        s = load_scripts(r)
        for t in (test_reserve, test_commit, test_release, test_due, test_race):
            try:
                t(r, s)
            except Exception as e:  # a crash in one test must not hide the others
                check(t.__name__, False, "raised %r" % (e,))
    except Exception as e:
        check("setup", False, "raised %r" % (e,))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
        if failed:
            with open(log_path, "rb") as f:
                sys.stdout.write("--- redis-server log ---\n" + f.read().decode(errors="replace"))
        shutil.rmtree(workdir, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
