#!/usr/bin/python3
"""settle_bench.py - the settle benchmark suite's driver (run it through bench/run.sh).

Starts Redis, a durable PostgreSQL and the PG simulator (settle pgsim) on loopback through the
integration-test harness, measures the simulator's capacity with wrk, then measures settle's
figures side by side with the peers' harness (BullMQ, Sidekiq: W2, W3 at 20 ms and W3 at 0 ms),
round-robin, with a quiet-machine gate before every run. Prints one key=value line per figure
on stdout (progress and per-run lines go to stderr and to the raw log).

Figures: R0, R20, R20 pipelined (100 status queries in flight, up to 256 jobs held), Refunds (R20 and R0 shapes), Scaling (1, 2, 4 processes on R20), Latency
(claim-to-done at light load), Memory (VmHWM at concurrency 256), Recovery (kill -9), claim cost
against queue depth, cost against concurrency and job size, the machine's limits, the ratios to
the peers and the targets of issue 6.
"""

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time

import benchlib
import cluster
import fixtures
import pg_cost
from benchlib import line, log
from peers import Peers

harness = cluster.harness

IDEAL_LATENCY_MS = 20
R_CONC = 100
MEM_CONC = 256
# R20p: SETTLE_STATUS_CONCURRENCY=100 (the PG's load, what the ideal counts) with up to
# PIPE_HELD jobs held, so jobs waiting for PostgreSQL or Redis do not hold a status slot.
PIPE_HELD = 256
LEASE_MS_DEFAULT = 15000
REAPER_MS_DEFAULT = 1000

# Targets of issue 6.
T_R20 = 4500
T_R20_VS_BULLMQ = 1.5
T_R0_VS_BULLMQ = 2.0
T_CPU_VS_BULLMQ = 0.25
T_LAT_P99_MS = 5.0
T_RSS_MIB = 64
T_RECOVERY_P99_S = 30


class Suite:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.own_root = os.getpid()
        self.c = None
        self.peers = None
        self.runs = {}  # figure -> list of per-run dicts
        self.out_lines = []
        self.raw = open(args.raw, "a") if args.raw else None
        self.gate_wait_s = args.gate_wait
        self.gate_budget_s = args.gate_budget
        self.stub = {}

    # --- output -------------------------------------------------------------------------------

    def emit(self, fields):
        """A figure line: stdout and the results file."""
        text = line(fields)
        print(text, flush=True)
        self.out_lines.append(text)
        if self.raw:
            self.raw.write(text + "\n")
            self.raw.flush()

    def record(self, figure, d):
        """A per-run line: stderr and the raw log."""
        d = dict(d)
        d.setdefault("figure", figure)
        self.runs.setdefault(figure, []).append(d)
        text = "run " + line(d)
        print(text, file=sys.stderr, flush=True)
        if self.raw:
            self.raw.write(text + "\n")
            self.raw.flush()

    def gate(self):
        """The quiet gate before a measured run: waits up to --gate-wait seconds for a quiet
        machine, while the session's waiting budget (--gate-budget) lasts; afterwards it only
        samples and records (the run is flagged noisy=1 if the machine is busy)."""
        wait = min(self.gate_wait_s, max(0.0, self.gate_budget_s))
        g = benchlib.quiet_gate(self.own_root, wait)
        self.gate_budget_s -= g["waited_s"]
        if not g["quiet"]:
            log(f"machine still busy after {g['waited_s']:.0f} s (load1 {g['load1']:.2f}, idle "
                f"{g['idle_pct']:.0f} %, foreign CPU {g['foreign_cpu_pct']:.0f} %): run flagged noisy"
                f"; gate budget left {max(0, self.gate_budget_s):.0f} s")
        return g

    # --- life cycle ---------------------------------------------------------------------------

    def start(self):
        log("starting Redis, PostgreSQL (fsync on) and the PG simulator")
        self.c = cluster.BenchCluster(pgsim_args=["--latency-ms", "0-0"])
        self.c.start()
        # The harness installed its own handlers (they stop only its cluster): replace them
        # so a signal also stops the peers' services.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        self.c.migrate()
        log(f"  redis :{self.c.redis_port} (pid {self.c.redis_pid()}), postgres :{self.c.pg_port} "
            f"(pid {self.c.postmaster_pid()}, fsync={self.c.pg_setting('fsync')}, "
            f"synchronous_commit={self.c.pg_setting('synchronous_commit')}), pgsim "
            f":{self.c.pgsim_port} (pid {self.c.pgsim_pid()})")
        if self.args.peers_dir:
            log("starting the peers' services (services.sh)")
            self.peers = Peers(self.args.peers_dir, os.path.join(self.args.tmp, "peers-state"),
                               harness.free_port, self.quick)
            self.peers.start()
            log(f"  peers: redis :{self.peers.env['REDIS_PORT']}, postgres "
                f":{self.peers.env['PG_PORT']}, mock gateway :{self.peers.env['GW_PORT']}")

    def on_signal(self, signum, frame):
        log(f"signal {signum}: stopping everything the suite started")
        self.stop()
        os._exit(128 + signum)

    def stop(self):
        if self.peers is not None:
            self.peers.stop()
        if self.c is not None:
            self.c.stop()

    # --- settle workers -----------------------------------------------------------------------

    def parked(self, worker):
        """True when the worker's waiter connection (named settle:<worker id>:wait:<queue> by
        the worker) is blocked in BLMOVE: the worker found its queue empty and is idle."""
        wid = worker.env.get("SETTLE_WORKER_ID") or f"{os.uname().nodename}:{worker.pid}"
        prefix = f"settle:{wid}:wait:"
        for cl in self.c.redis.client_list():
            if cl.get("name", "").startswith(prefix) and "b" in cl.get("flags", ""):
                return True
        return False

    def wait_ready(self, workers, timeout_s=30):
        """Until every worker is parked on BLMOVE, stable for 0.3 s. Bounded."""
        deadline = time.monotonic() + timeout_s
        stable = None
        for _ in range(int(timeout_s / 0.05) + 1):
            for w in workers:
                if not w.alive():
                    raise RuntimeError(f"worker {w.name} exited during start-up:\n"
                                       + harness.tail(w.log_path, 30))
            if all(self.parked(w) for w in workers):
                if stable is None:
                    stable = time.monotonic()
                elif time.monotonic() - stable >= 0.3:
                    return
            else:
                stable = None
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise RuntimeError(f"workers not parked on BLMOVE after {timeout_s} s")

    def remaining(self, queue):
        p = self.c.redis.pipeline(transaction=False)
        p.llen(fixtures.key(f"queue:{queue}"))
        p.zcard(fixtures.key(f"inflight:{queue}"))
        p.zcard(fixtures.key(f"delayed:{queue}"))
        a, b, d = p.execute()
        return a + b + d

    def redis_script_stats(self):
        st = self.c.redis.info("commandstats")
        calls = usec = 0
        for k in ("cmdstat_evalsha", "cmdstat_eval"):
            if k in st:
                calls += int(st[k]["calls"])
                usec += int(st[k]["usec"])
        return calls, usec

    def pg_xacts(self):
        """Committed + rolled back transactions of database settle. Our own connection's
        pending counts are flushed first (PostgreSQL 15 publishes them lazily)."""
        self.c.sql_value("SELECT pg_stat_force_next_flush()")
        self.c.sql_value("SELECT pg_stat_clear_snapshot()")
        return int(self.c.sql_value(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'settle'"))

    def perf_start(self, figure, label, pids):
        """With --perf DIR: perf record -g on the workers for the measured window."""
        if not self.args.perf:
            return None
        os.makedirs(self.args.perf, exist_ok=True)
        path = os.path.join(self.args.perf, f"{figure}-{label}.data")
        p = subprocess.Popen(["perf", "record", "-F", "499", "--call-graph", "dwarf,16384", "-o", path, "-p",
                              ",".join(map(str, pids))], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        time.sleep(0.5)  # perf attaches
        return p

    def perf_stop(self, p):
        if p is None:
            return
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def settle_run(self, figure, queue="reconcile", n=None, conc=R_CONC, procs=1,
                   latency_ms=IDEAL_LATENCY_MS, items=1, pad=0, label=1, env_extra=None,
                   skus=fixtures.SKUS_DEFAULT, status_conc=None):
        """One throughput measurement with the peers' protocol: prepare and push N jobs, hide
        them (RENAME), start the workers and wait until they are parked on BLMOVE, t0 =
        release, poll Redis every 5 ms until nothing is ready, in flight or delayed (a job
        leaves the in-flight set only when its ack ran, after its PostgreSQL commit) = t1."""
        c = self.c
        n = n or self.args.n
        c.reset()
        c.set_latency(latency_ms)
        tag = f"{figure[:3]}{label}"
        if queue == "reconcile":
            jobs, prep_s = fixtures.prep_reconcile(c, n, tag, items=items, pad_bytes=pad,
                                                   skus=skus)
        else:
            jobs, prep_s = fixtures.prep_refunds(c, n, tag)
        fixtures.push(c, queue, jobs)
        del jobs
        gate = self.gate()
        workers = []
        per = [conc // procs + (1 if i < conc % procs else 0) for i in range(procs)]
        t_launch = time.monotonic()
        try:
            for i in range(procs):
                extra = dict(env_extra or {})
                if status_conc:
                    extra["status_concurrency"] = status_conc
                env = c.bench_env(queues=queue, concurrency=per[i], **extra)
                workers.append(c.start_worker(env, name=f"{figure}-w{i}"))
            self.wait_ready(workers)
            startup_s = time.monotonic() - t_launch
            pids = [w.pid for w in workers]
            win = benchlib.Window({"worker": pids, "redis": [c.redis_pid()],
                                   "pg": [c.postmaster_pid()], "pgsim": [c.pgsim_pid()]},
                                  self.own_root)
            calls0, usec0 = self.redis_script_stats()
            x0 = self.pg_xacts()
            perf = self.perf_start(figure, label, pids)
            win.start()
            fixtures.release(c, queue)
            timeout_s = 60 + n / 50
            deadline = time.perf_counter() + timeout_s
            left = n
            for _ in range(int(timeout_s / 0.005) + 1):
                left = self.remaining(queue)
                if left == 0 or time.perf_counter() > deadline:
                    break
                time.sleep(0.005)
            m = win.stop()
            self.perf_stop(perf)
            calls1, usec1 = self.redis_script_stats()
            hwm = max((benchlib.vm_hwm_kib(p) or 0) for p in pids)
        finally:
            codes = [w.stop(timeout=30) for w in workers]
        # Backends publish their transaction counts when they exit (the workers just did).
        x1 = self.pg_xacts() - 1
        rows = c.sql("SELECT outcome, result, count(*) FROM job_log GROUP BY 1, 2")
        good_results = ("completed",) if queue == "reconcile" else ("refunded",)
        good = sum(r[2] for r in rows if r[0] == "done" and r[1] in good_results)
        dead = c.redis.llen(fixtures.key("dead"))
        secs = m["seconds"]
        done = n - max(left, 0)
        d = {
            "figure": figure, "queue": queue, "n": n, "concurrency": conc, "procs": procs,
            "status_concurrency": status_conc or conc,
            "pg_latency_ms": latency_ms, "items": items, "skus": skus, "pad_bytes": pad,
            "run": label,
            "seconds": f"{secs:.3f}", "jobs_per_s": f"{done / secs:.0f}",
            # The ideal counts PG calls in flight: concurrency / latency.
            "ideal_ratio": f"{done / secs / ((status_conc or conc) * 1000.0 / latency_ms):.3f}"
            if latency_ms else "-",
            "cpu_us_per_job": f"{m['cpu_s']['worker'] * 1e6 / max(done, 1):.0f}",
            "worker_cpu_pct": f"{m['worker_cpu_pct']:.0f}",
            "redis_cpu_pct": f"{m['redis_cpu_pct']:.0f}", "pg_cpu_pct": f"{m['pg_cpu_pct']:.0f}",
            "pgsim_cpu_pct": f"{m['pgsim_cpu_pct']:.0f}",
            "pg_cpu_us_per_job": f"{m['cpu_s']['pg'] * 1e6 / max(done, 1):.0f}",
            "redis_cpu_us_per_job": f"{m['cpu_s']['redis'] * 1e6 / max(done, 1):.0f}",
            "redis_script_calls_per_job": f"{(calls1 - calls0) / max(done, 1):.2f}",
            "redis_script_us_per_job": f"{(usec1 - usec0) / max(done, 1):.0f}",
            "pg_xacts_per_job": f"{(x1 - x0) / max(done, 1):.2f}",
            "sys_busy_pct": f"{m['sys_busy_pct']:.0f}", "other_cpu_pct": f"{m['other_cpu_pct']:.0f}",
            "foreign_cpu_pct": f"{m['foreign_cpu_pct']:.0f}", "steal_pct": f"{m['steal_pct']:.1f}",
            "rss_peak_mib": f"{hwm / 1024:.1f}", "startup_s": f"{startup_s:.1f}",
            "prep_s": f"{prep_s:.1f}", "completed": good, "dead": dead,
            "timed_out": int(left > 0),
        }
        d.update(benchlib.gate_fields(gate))
        bad = left > 0 or good != n or dead != 0 or any(x not in (0, None) for x in codes)
        d["bad"] = int(bad)
        d["noisy"] = int(not gate["quiet"] or m["foreign_cpu_pct"] > benchlib.RUN_FOREIGN_MAX_PCT)
        if bad:
            log(f"{figure}: run {label} is bad (left {left}, completed {good}/{n}, dead {dead}, "
                f"exit codes {codes})")
        return d

    # --- the PG stub's capacity ---------------------------------------------------------------

    def stub_capacity(self):
        """wrk against the simulator's status endpoint (the call every reconcile job makes),
        at 0 ms and at 20 ms, 100 connections, before anything else runs."""
        c = self.c
        c.reset()
        tx = c.tx_key_of(c.admin_create_tx(user_id="u-wrk", order_id="o-wrk-1", amount=100,
                                           status="SUCCESS"))
        url = f"{c.gateway_url}/api/v1/payments/{tx}"
        secs = 3 if self.quick else 5
        for ms in (0, IDEAL_LATENCY_MS):
            c.set_latency(ms)
            gate = self.gate()
            win = benchlib.Window({"pgsim": [c.pgsim_pid()]}, self.own_root)
            win.start()
            r = subprocess.run(["wrk", "-t1", "-c100", f"-d{secs}s", "--latency", "-H",
                                "X-USER-ID: u-wrk", url], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=secs + 60, check=False)
            m = win.stop()
            out = r.stdout.decode("utf-8", "replace")
            rps = lat50 = lat99 = non2xx = None
            for ln in out.splitlines():
                p = ln.split()
                if ln.startswith("Requests/sec:"):
                    rps = float(p[1])
                elif p[:1] == ["50%"]:
                    lat50 = p[1]
                elif p[:1] == ["99%"]:
                    lat99 = p[1]
                elif "Non-2xx" in ln:
                    non2xx = p[-1]
            ideal = 100 * 1000.0 / ms if ms else None
            self.stub[ms] = rps
            f = {"figure": "stub_capacity", "tool": "wrk", "connections": 100, "threads": 1,
                 "seconds": secs, "pg_latency_ms": ms, "requests_per_s": f"{rps:.0f}" if rps else "-",
                 "ideal": f"{ideal:.0f}" if ideal else "-",
                 "ideal_ratio": f"{rps / ideal:.3f}" if rps and ideal else "-",
                 "latency_p50": lat50, "latency_p99": lat99, "non_2xx": non2xx or 0,
                 "pgsim_cpu_pct": f"{m['pgsim_cpu_pct']:.0f}", "sys_busy_pct": f"{m['sys_busy_pct']:.0f}"}
            f.update(benchlib.gate_fields(gate))
            f["noisy"] = int(not gate["quiet"])
            self.emit(f)
        c.set_latency(0)

    # --- Latency ------------------------------------------------------------------------------

    def latency_pass(self, latency_ms, m, label):
        """Claim-to-done of single jobs at light load: one job at a time, pushed to an idle
        worker (parked on BLMOVE) a few ms after the previous one finished. Claim and done are
        the two Redis events of the job: the claim script's ZADD to the in-flight set and the
        ack script's ZREM from it, received as keyspace notifications, so no polling interval
        blurs them. The PG's own delay (latency_ms) is subtracted to give the overhead."""
        c = self.c
        r = c.redis
        c.reset()
        c.set_latency(latency_ms)
        jobs, _ = fixtures.prep_reconcile(c, m, f"lat{latency_ms}x{label}")
        qkey = fixtures.key("queue:reconcile")
        r.config_set("notify-keyspace-events", "Kz")
        ps = r.pubsub(ignore_subscribe_messages=True)
        ps.subscribe("__keyspace@0__:" + fixtures.key("inflight:reconcile"))
        gate = self.gate()
        w = c.start_worker(c.bench_env(queues="reconcile", concurrency=R_CONC), name="latency")
        total, wake, lost = [], [], 0
        f0 = benchlib.foreign_cpu_snapshot(self.own_root)
        t_start = time.perf_counter()
        try:
            self.wait_ready([w])
            ps.get_message(timeout=0.2)
            for j in jobs:
                t_push = time.perf_counter()
                r.lpush(qkey, j)
                t_add = t_rem = None
                deadline = t_push + 10.0
                for _ in range(1000):
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    msg = ps.get_message(timeout=left)
                    if msg is None:
                        continue
                    now = time.perf_counter()
                    if msg["data"] == b"zadd" and t_add is None:
                        t_add = now
                    elif msg["data"] == b"zrem" and t_add is not None:
                        t_rem = now
                        break
                if t_rem is None:
                    lost += 1
                else:
                    total.append((t_rem - t_add) * 1000.0)
                    wake.append((t_add - t_push) * 1000.0)
                time.sleep(random.uniform(0.002, 0.010))
        finally:
            w.stop(timeout=30)
            ps.close()
            r.config_set("notify-keyspace-events", "")
        secs = time.perf_counter() - t_start
        foreign = 100.0 * benchlib.foreign_cpu_delta_s(
            f0, benchlib.foreign_cpu_snapshot(self.own_root)) / secs
        log_ms = sorted(float(x[0]) for x in c.sql(
            "SELECT extract(epoch FROM finished_at - enqueued_at) * 1000 FROM job_log "
            "WHERE outcome = 'done'"))
        total.sort()
        wake.sort()
        pc = benchlib.percentile
        d = {"figure": f"latency{latency_ms}", "pg_latency_ms": latency_ms, "jobs": m,
             "samples": len(total), "lost": lost, "run": label,
             "claim_to_done_p50_ms": f"{pc(total, 50):.2f}", "claim_to_done_p99_ms": f"{pc(total, 99):.2f}",
             "overhead_p50_ms": f"{pc(total, 50) - latency_ms:.2f}",
             "overhead_p99_ms": f"{pc(total, 99) - latency_ms:.2f}",
             "overhead_max_ms": f"{total[-1] - latency_ms:.2f}",
             "push_to_claim_p50_ms": f"{pc(wake, 50):.2f}", "push_to_claim_p99_ms": f"{pc(wake, 99):.2f}",
             "joblog_claim_to_store_p50_ms": f"{pc(log_ms, 50):.1f}" if log_ms else "-",
             "joblog_claim_to_store_p99_ms": f"{pc(log_ms, 99):.1f}" if log_ms else "-",
             "foreign_cpu_pct": f"{foreign:.0f}"}
        d.update(benchlib.gate_fields(gate))
        d["noisy"] = int(not gate["quiet"] or foreign > benchlib.RUN_FOREIGN_MAX_PCT)
        d["bad"] = int(lost > 0 or len(total) < m)
        return d

    # --- Recovery -----------------------------------------------------------------------------

    def recovery_trial(self, label, m=10):
        """kill -9 of a worker holding m jobs; time until another (already running) worker
        finished them all. Worker A claims the jobs while the PG stalls its calls (30 s,
        A's gateway timeout is 60 s), worker B starts and parks; after a random 0-5 s (which
        spreads the kill over A's 5 s lease-heartbeat phase) A gets SIGKILL. B's reaper finds
        the expired leases (default lease 15 s, reaper every 1 s), and B claims and finishes
        the jobs with the PG answering in 20 ms."""
        c = self.c
        r = c.redis
        c.reset()
        c.set_latency(IDEAL_LATENCY_MS)
        jobs, _ = fixtures.prep_reconcile(c, m, f"rec{label}")
        c.set_latency(30000)
        a = c.start_worker(c.bench_env(queues="reconcile", concurrency=m,
                                       gateway_timeout_ms=60000), name=f"rec-a{label}")
        b = None
        try:
            self.wait_ready([a])
            fixtures.push(c, "reconcile", jobs, hold=False)
            harness.wait_until(lambda: r.zcard(fixtures.key("inflight:reconcile")) == m
                               and r.llen(fixtures.key("queue:reconcile")) == 0, 15, 0.02,
                               "worker A to hold every job")
            b = c.start_worker(c.bench_env(queues="reconcile", concurrency=R_CONC),
                               name=f"rec-b{label}")
            self.wait_ready([b])
            c.set_latency(IDEAL_LATENCY_MS)  # A's calls keep the delay they were given
            time.sleep(random.uniform(0.0, 5.0))
            t_kill = time.perf_counter()
            a.kill9()
            limit = (LEASE_MS_DEFAULT + REAPER_MS_DEFAULT) / 1000.0 + 45
            done = harness.wait_until(
                lambda: (self.remaining("reconcile") == 0
                         and c.sql_value("SELECT count(*) FROM job_log") == m) or None,
                limit, 0.02, "the killed worker's jobs to finish elsewhere")
            t_done = time.perf_counter()
            assert done
            by_b = c.sql_value("SELECT count(*) FROM job_log WHERE worker = %s",
                               (b.env.get("SETTLE_WORKER_ID") or f"{os.uname().nodename}:{b.pid}",))
            crashes = c.sql_value("SELECT max(deliveries) FROM job_log")
        finally:
            if a.alive():
                a.kill9()
            if b is not None:
                b.stop(timeout=30)
        return {"figure": "recovery", "run": label, "jobs": m, "recovery_s": f"{t_done - t_kill:.2f}",
                "finished_by_other": by_b, "max_deliveries": crashes}

    # --- claim cost against queue depth -------------------------------------------------------

    def claim_cost(self):
        """Server-side cost of the claim script (Redis INFO commandstats: usec per call) for
        1000 claims with 1 000 and with 100 000 jobs waiting, and with 100 000 not-yet-due
        delayed jobs and 100 000 leases in flight; batch 1 and the default batch 64."""
        c = self.c
        r = c.redis
        sha = r.script_load(fixtures.lua_text("queue_claim"))
        keys = [fixtures.key(s) for s in ("queue:reconcile", "delayed:reconcile",
                                           "inflight:reconcile", "jobs", "payloads", "seq")]
        payload = json.dumps({"order_id": "o-0000000", "user_id": "u-1",
                              "transaction_key": "20261121:TR:000000"})
        claims = 300 if self.quick else 1000
        cases = [(1000, 0, 1), (100000, 0, 1), (100000, 100000, 1), (1000, 0, 64),
                 (100000, 0, 64)]
        results = {}
        for depth, side, batch in cases:
            c.reset()
            for s in range(0, depth + claims * batch, 10000):
                r.lpush(keys[0], *([payload] * min(10000, depth + claims * batch - s)))
            if side:
                far = int(time.time() * 1000) + 86400 * 1000
                for s in range(0, side, 10000):
                    p = r.pipeline(transaction=False)
                    p.zadd(keys[1], {f"d-{i}": far for i in range(s, min(side, s + 10000))})
                    p.zadd(keys[2], {f"f-{i}": far for i in range(s, min(side, s + 10000))})
                    p.execute()
            r.config_resetstat()
            t0 = time.perf_counter()
            for _ in range(claims):
                r.evalsha(sha, 6, *keys, batch, 15000, 65536)
            wall = time.perf_counter() - t0
            st = r.info("commandstats").get("cmdstat_evalsha", {})
            us = float(st.get("usec_per_call", 0))
            results[(depth, side, batch)] = us
            self.emit({"figure": "claim_cost", "ready_depth": depth, "delayed_not_due": side,
                       "inflight": side, "batch": batch, "claims": claims,
                       "server_us_per_call": f"{us:.1f}", "server_us_per_job": f"{us / batch:.2f}",
                       "client_us_per_call": f"{wall * 1e6 / claims:.0f}",
                       "ready_left": r.llen(keys[0])})
        for batch in (1, 64):
            a, b = results[(1000, 0, batch)], results[(100000, 0, batch)]
            self.emit({"figure": "claim_cost_growth", "batch": batch, "depth_from": 1000,
                       "depth_to": 100000, "server_us_ratio": f"{b / a:.2f}" if a else "-",
                       "grows_with_depth": int(a > 0 and b / a > 1.5)})

    # --- the schedule -------------------------------------------------------------------------

    def schedule(self):
        """One round: every figure once, peers and settle interleaved, grouped by gateway delay
        so the peers' mock gateway restarts twice per round."""
        only = set(self.args.only.split(",")) if self.args.only else None
        peers = self.peers is not None
        items = []

        def add(kind, *a):
            name = a[0]
            if only is None or name in only or kind in only:
                items.append((kind,) + a)

        # gateway 20 ms
        if peers:
            for p in self.args.peer_list:
                add("peer", f"{p}_W2", p, "W2", 20)
        add("settle", "R20", dict(latency_ms=20))
        add("settle", "R20p", dict(latency_ms=20, conc=PIPE_HELD, status_conc=R_CONC))
        if peers:
            for p in self.args.peer_list:
                add("peer", f"{p}_W3", p, "W3", 20)
        add("settle", "Scaling2", dict(latency_ms=20, procs=2))
        add("settle", "Scaling4", dict(latency_ms=20, procs=4))
        add("settle", "Refunds20", dict(latency_ms=20, queue="refund"))
        add("settle", "Memory", dict(latency_ms=20, conc=MEM_CONC))
        add("latency", "Latency20", 20)
        # gateway 0 ms
        if peers:
            for p in self.args.peer_list:
                add("peer", f"{p}_W3_0ms", p, "W3", 0)
        add("settle", "R0", dict(latency_ms=0))
        add("settle", "Refunds0", dict(latency_ms=0, queue="refund"))
        add("latency", "Latency0", 0)
        return items

    def run_item(self, item, rnd):
        kind, name = item[0], item[1]
        log(f"round {rnd}: {name}")
        try:
            if kind == "peer":
                _, _, peer, wl, delay = item
                self.peers.set_gw_delay(delay)
                d = self.peers.run(peer, wl, self.args.peer_n, R_CONC, rnd, self.own_root,
                                   self.gate)
                if d is not None:
                    self.record(name, d)
            elif kind == "settle":
                self.record(name, self.settle_run(name, label=rnd, **item[2]))
            elif kind == "latency":
                self.record(name, self.latency_pass(item[2], self.args.latency_jobs, rnd))
        except Exception as e:  # one failed run must not lose the others
            log(f"{name} round {rnd} failed: {type(e).__name__}: {e}")

    def rounds(self):
        """RUNS rounds of the schedule; then, while some figure has fewer than 3 quiet runs,
        up to --extra-rounds more rounds of just those figures."""
        items = self.schedule()
        max_rounds = self.args.runs + self.args.extra_rounds
        todo = items
        for rnd in range(1, max_rounds + 1):
            for it in todo:
                self.run_item(it, rnd)
            if rnd < self.args.runs:
                continue
            short = {it[1] for it in items
                     if len([r for r in self.runs.get(it[1], []) if str(r.get("noisy")) == "0"
                             and str(r.get("bad", "0")) == "0"]) < min(3, self.args.runs)}
            if not short:
                break
            todo = [it for it in items if it[1] in short]
            if rnd < max_rounds:
                log(f"fewer than 3 quiet runs for {', '.join(sorted(short))}: one more round of them")

    # --- summaries ----------------------------------------------------------------------------

    def med(self, figure, key):
        runs = [r for r in self.runs.get(figure, []) if str(r.get("bad", "0")) == "0"]
        use, _ = benchlib.pick_runs(runs)
        return benchlib.median_of(use, key)

    def summary_settle(self, figure, label, fields):
        runs = [r for r in self.runs.get(figure, []) if str(r.get("bad", "0")) == "0"]
        if not runs:
            if figure in self.runs:
                self.emit({"figure": label, "runs": 0, "bad_runs": len(self.runs[figure])})
            return None
        use, noisy = benchlib.pick_runs(runs)
        first = use[0]
        out = {"figure": label}
        for k in ("queue", "n", "concurrency", "status_concurrency", "procs", "pg_latency_ms"):
            out[k] = first.get(k)
        out["runs"] = len(runs)
        out["quiet_runs"] = len([r for r in runs if str(r.get("noisy")) == "0"])
        out["used_runs"] = len(use)
        out["noisy"] = noisy
        out["bad_runs"] = len(self.runs[figure]) - len(runs)
        jps = [float(r["jobs_per_s"]) for r in use]
        out["jobs_per_s"] = f"{statistics.median(jps):.0f}"
        out["min"] = f"{min(jps):.0f}"
        out["max"] = f"{max(jps):.0f}"
        for k in fields:
            v = benchlib.median_of(use, k)
            if v is None:
                out[k] = "-"
            elif k.endswith("ratio"):
                out[k] = f"{v:.3f}"
            elif k.endswith("_pct") or abs(v) >= 10:
                out[k] = f"{v:.0f}"
            else:
                out[k] = f"{v:.2f}"
        return out

    def summaries(self):
        cpu = ["cpu_us_per_job", "worker_cpu_pct", "redis_cpu_pct", "pg_cpu_pct", "pgsim_cpu_pct",
               "sys_busy_pct", "other_cpu_pct", "foreign_cpu_pct", "pg_cpu_us_per_job",
               "redis_cpu_us_per_job", "redis_script_calls_per_job", "redis_script_us_per_job",
               "pg_xacts_per_job", "pre_load1", "pre_idle_pct"]
        res = {}
        # Peers first, as the harness prints them.
        for name in sorted(k for k in self.runs if "_W" in k):
            runs = [r for r in self.runs[name] if r.get("bad", "0") == "0"]
            if not runs:
                continue
            use, noisy = benchlib.pick_runs(runs)
            jps = [float(r["jobs_per_s"]) for r in use]
            f = {"figure": "peer", "peer": use[0]["peer"], "workload": use[0]["workload"],
                 "gw_delay_ms": use[0]["gw_delay_ms"], "n": use[0]["n"],
                 "concurrency": use[0]["concurrency"], "procs": use[0].get("procs", "1"),
                 "runs": len(runs), "quiet_runs": len([r for r in runs if r["noisy"] == "0"]),
                 "used_runs": len(use), "noisy": noisy,
                 "bad_runs": len(self.runs[name]) - len(runs),
                 "jobs_per_s": f"{statistics.median(jps):.0f}", "min": f"{min(jps):.0f}",
                 "max": f"{max(jps):.0f}"}
            if use[0]["gw_delay_ms"] != "0" and use[0]["workload"] in ("W2", "W3"):
                f["ideal_ratio"] = f"{statistics.median(jps) / 5000:.3f}"
            for k in ("cpu_us_per_job", "worker_cpu_pct", "redis_cpu_pct", "pg_cpu_pct",
                      "gw_cpu_pct", "sys_busy_pct", "other_cpu_pct", "foreign_cpu_pct",
                      "pre_load1"):
                v = benchlib.median_of(use, k)
                f[k] = "-" if v is None else f"{v:.0f}" if k != "pre_load1" else f"{v:.2f}"
            res[name] = f
            self.emit(f)

        r0 = self.summary_settle("R0", "R0", cpu)
        if r0:
            if self.stub.get(0):
                r0["stub_capacity_0ms"] = f"{self.stub[0]:.0f}"
                r0["stub_load_ratio"] = f"{float(r0['jobs_per_s']) / self.stub[0]:.2f}"
            self.emit(r0)
        r20 = self.summary_settle("R20", "R20", ["ideal_ratio"] + cpu)
        if r20:
            self.emit(r20)
        r20p = self.summary_settle("R20p", "R20_pipelined", ["ideal_ratio"] + cpu)
        if r20p:
            self.emit(r20p)
        for fig, lab in (("Refunds20", "Refunds_R20"), ("Refunds0", "Refunds_R0")):
            s = self.summary_settle(fig, lab, (["ideal_ratio"] if fig.endswith("20") else []) + cpu)
            if s:
                self.emit(s)
        # Scaling: 1 process is R20 itself (same configuration, same rounds).
        base = float(r20["jobs_per_s"]) if r20 else None
        for fig, k in (("R20", 1), ("Scaling2", 2), ("Scaling4", 4)):
            s = self.summary_settle(fig, "Scaling", ["ideal_ratio", "cpu_us_per_job", "worker_cpu_pct",
                                                     "redis_cpu_pct", "pg_cpu_pct", "pgsim_cpu_pct",
                                                     "sys_busy_pct"])
            if not s:
                continue
            s["procs"] = k
            s["vs_1proc"] = f"{float(s['jobs_per_s']) / base:.2f}" if base else "-"
            s["limit"] = self.limit_of(s)
            self.emit(s)
            res[f"scale{k}"] = s
        mem = self.summary_settle("Memory", "Memory", ["rss_peak_mib", "ideal_ratio", "cpu_us_per_job"])
        if mem:
            rss = [float(r["rss_peak_mib"]) for r in self.runs["Memory"] if r.get("bad") == 0]
            mem["rss_peak_mib_max"] = f"{max(rss):.1f}" if rss else "-"
            mem["source"] = "VmHWM"
            self.emit(mem)
        for fig in ("Latency20", "Latency0"):
            runs = [r for r in self.runs.get(fig, []) if str(r.get("bad", "0")) == "0"]
            if not runs:
                continue
            use, noisy = benchlib.pick_runs(runs)
            f = {"figure": "Latency", "pg_latency_ms": use[0]["pg_latency_ms"],
                 "jobs_per_run": use[0]["jobs"], "runs": len(runs), "used_runs": len(use),
                 "noisy": noisy, "load": "one_job_at_a_time", "method": "redis_keyspace_events"}
            for k in ("claim_to_done_p50_ms", "claim_to_done_p99_ms", "overhead_p50_ms",
                      "overhead_p99_ms", "overhead_max_ms", "push_to_claim_p50_ms",
                      "push_to_claim_p99_ms", "joblog_claim_to_store_p50_ms",
                      "joblog_claim_to_store_p99_ms"):
                v = benchlib.median_of(use, k)
                f[k] = "-" if v is None else f"{v:.2f}"
            res[fig] = f
            self.emit(f)
        self.summary_r = {"R0": r0, "R20": r20, "R20p": r20p, "Memory": mem, **res}

    @staticmethod
    def limit_of(s):
        """What bounds a settle run, from CPU shares (100 = one core; Redis is one thread)."""
        try:
            redis = float(s["redis_cpu_pct"])
            pg = float(s["pg_cpu_pct"])
            worker = float(s["worker_cpu_pct"])
            busy = float(s["sys_busy_pct"])
        except (KeyError, ValueError, TypeError):
            return "-"
        if redis >= 85:
            return "redis_cpu"
        if busy >= 90:
            top = max((("postgres", pg), ("worker", worker), ("redis", redis)), key=lambda x: x[1])
            return f"machine_cpu(top={top[0]})"
        if busy >= 75:
            return "near_machine_cpu"
        return "latency_bound"

    def compare_and_targets(self, recovery):
        s = self.summary_r

        def jps(name):
            f = s.get(name)
            return float(f["jobs_per_s"]) if f and f.get("jobs_per_s") not in (None, "-") else None

        def cpu(name):
            f = s.get(name)
            try:
                return float(f["cpu_us_per_job"])
            except (TypeError, KeyError, ValueError):
                return None

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b else "-"

        r20, r0, r20p = jps("R20"), jps("R0"), jps("R20p")
        bw2, bw30 = jps("bullmq_W2"), jps("bullmq_W3_0ms")
        sw2, sw30 = jps("sidekiq_W2"), jps("sidekiq_W3_0ms")
        bw3 = jps("bullmq_W3")
        self.emit({"figure": "compare", "same_session": 1,
                   "r20_jobs_per_s": r20, "bullmq_w2_jobs_per_s": bw2, "r20_vs_bullmq_w2": ratio(r20, bw2),
                   "r20_vs_sidekiq_w2": ratio(r20, sw2), "r20_vs_bullmq_w3": ratio(r20, bw3),
                   "r20p_jobs_per_s": r20p, "r20p_vs_bullmq_w2": ratio(r20p, bw2),
                   "r0_jobs_per_s": r0, "bullmq_w3_0ms_jobs_per_s": bw30,
                   "r0_vs_bullmq_w3_0ms": ratio(r0, bw30), "r0_vs_sidekiq_w3_0ms": ratio(r0, sw30),
                   "r0_cpu_us_per_job": cpu("R0"), "bullmq_w3_0ms_cpu_us_per_job": cpu("bullmq_W3_0ms"),
                   "cpu_per_job_vs_bullmq_w3_0ms": ratio(cpu("R0"), cpu("bullmq_W3_0ms")),
                   "r20_cpu_us_per_job": cpu("R20"), "bullmq_w2_cpu_us_per_job": cpu("bullmq_W2"),
                   "cpu_per_job_r20_vs_bullmq_w2": ratio(cpu("R20"), cpu("bullmq_W2")),
                   "note": "settle_job=PG_read_tx+PG_call+Lua_stock_commit+PG_write_tx+ack;"
                           "peer_W2=PG_call;peer_W3=PG_call+INSERT"})

        def tgt(name, value, goal, met, unit="", **extra):
            self.emit({"figure": "target", "target": name, "value": value, "goal": goal,
                       "met": "-" if met is None else int(met), "unit": unit, **extra})

        tgt("R20_one_process", r20, f">={T_R20}", None if r20 is None else r20 >= T_R20, "jobs/s")
        rr = r20 / bw2 if r20 and bw2 else None
        tgt("R20_vs_BullMQ_W2", None if rr is None else f"{rr:.2f}", f">={T_R20_VS_BULLMQ}",
            None if rr is None else rr >= T_R20_VS_BULLMQ, "x")
        # The same two targets with 100 status queries in flight and up to PIPE_HELD jobs
        # held (README "Performance": which reading of "concurrency 100" each line uses).
        tgt("R20_pipelined_one_process", r20p, f">={T_R20}",
            None if r20p is None else r20p >= T_R20, "jobs/s",
            status_concurrency=R_CONC, jobs_held_max=PIPE_HELD)
        rp = r20p / bw2 if r20p and bw2 else None
        tgt("R20_pipelined_vs_BullMQ_W2", None if rp is None else f"{rp:.2f}",
            f">={T_R20_VS_BULLMQ}", None if rp is None else rp >= T_R20_VS_BULLMQ, "x",
            status_concurrency=R_CONC, jobs_held_max=PIPE_HELD)
        r0r = r0 / bw30 if r0 and bw30 else None
        tgt("R0_vs_BullMQ_W3_0ms", None if r0r is None else f"{r0r:.2f}", f">={T_R0_VS_BULLMQ}",
            None if r0r is None else r0r >= T_R0_VS_BULLMQ, "x")
        cr = cpu("R0") / cpu("bullmq_W3_0ms") if cpu("R0") and cpu("bullmq_W3_0ms") else None
        tgt("CPU_per_job_vs_BullMQ", None if cr is None else f"{cr:.2f}", f"<={T_CPU_VS_BULLMQ}",
            None if cr is None else cr <= T_CPU_VS_BULLMQ, "x")
        s2 = s.get("scale2")
        if s2 and r20:
            # The target holds while Redis and PostgreSQL have headroom; when the machine or
            # Redis is saturated the line names the limit instead of judging the worker.
            v = float(s2["jobs_per_s"]) / r20
            lim = s2.get("limit", "-")
            headroom = lim == "latency_bound"
            tgt("Scaling_1_to_2_no_loss", f"{v:.2f}", ">=0.95", v >= 0.95 if headroom or v >= 0.95
                else None, "x", limit=lim)
        # Settle's own overhead is claim-to-done with a stub that answers at once; with the
        # 20 ms stub the stub's own jitter (its p99 is ~22.5 ms under wrk) is in the figure.
        for fig in ("Latency0", "Latency20"):
            lat = s.get(fig)
            if lat and lat.get("overhead_p99_ms") not in (None, "-"):
                v = float(lat["overhead_p99_ms"])
                tgt(f"Latency_overhead_p99_stub{lat['pg_latency_ms']}ms", f"{v:.2f}",
                    f"<={T_LAT_P99_MS}", v <= T_LAT_P99_MS, "ms")
        mem = s.get("Memory")
        if mem and mem.get("rss_peak_mib_max") not in (None, "-"):
            v = float(mem["rss_peak_mib_max"])
            tgt("RSS_at_c256", f"{v:.1f}", f"<={T_RSS_MIB}", v <= T_RSS_MIB, "MiB")
        if recovery is not None:
            tgt("Recovery_p99", recovery, f"<={T_RECOVERY_P99_S}", recovery <= T_RECOVERY_P99_S, "s")

    # --- single-run sweeps: cost against concurrency and job size ---------------------------

    def sweeps(self):
        n = max(2000, self.args.n // 2)
        for conc in (25, 50, 200):
            d = self.settle_run(f"sweep_c{conc}", n=n, conc=conc, latency_ms=20, label=1)
            d["figure"] = "sweep_concurrency"
            self.emit(d)
        for conc in (25, 200):
            d = self.settle_run(f"sweep0_c{conc}", n=n, conc=conc, latency_ms=0, label=1)
            d["figure"] = "sweep_concurrency"
            self.emit(d)
        for items in (8, 32):
            d = self.settle_run(f"sweep_i{items}", n=n, latency_ms=0, items=items, label=1)
            d["figure"] = "sweep_items"
            self.emit(d)
        for pad in (4096, 32768):
            d = self.settle_run(f"sweep_p{pad}", n=n, latency_ms=0, pad=pad, label=1)
            d["figure"] = "sweep_job_bytes"
            self.emit(d)
        # Every order on the same 4 products (a flash sale): their rows are locked by each
        # outcome transaction until its commit.
        d = self.settle_run("sweep_hot", n=n, latency_ms=0, skus=4, label=1)
        d["figure"] = "sweep_hot_skus"
        self.emit(d)
        # The product's default log level writes one JSON line per finished job.
        d = self.settle_run("sweep_log_info", n=n, latency_ms=0, label=1,
                            env_extra={"log_level": "info"})
        d["figure"] = "sweep_log_level"
        d["log_level"] = "info"
        self.emit(d)

    # --- main ---------------------------------------------------------------------------------

    def main(self):
        a = self.args
        self.emit({"figure": "session", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "host_cpus": benchlib.NCPU, "kernel": os.uname().release,
                   "mode": "quick" if self.quick else "full", "runs": a.runs, "n": a.n,
                   "peer_n": a.peer_n, "peers": ",".join(a.peer_list) if a.peers_dir else "none",
                   "load1_at_start": f"{benchlib.load1():.2f}",
                   "settle": cluster.settle_bin(),
                   "db_prepared": os.environ.get("BENCH_SETTLE_DB_PREPARED", "on"),
                   "settle_env": ",".join(f"{k[6:]}={v}" for k, v in sorted(os.environ.items())
                                          if k.startswith("BENCH_SETTLE_")) or "-"})
        self.start()
        want = set(a.only.split(",")) if a.only else None

        def wanted(x):
            return want is None or x in want

        if wanted("stub"):
            self.stub_capacity()
        if wanted("limits") and self.peers is not None and not self.quick:
            log("machine limits (the peers' limits.sh)")
            for ln in self.peers.limits(a.limits_reps):
                self.emit({"figure": "machine_limit", **benchlib.parse_line(normalize(ln))})
        self.rounds()
        recovery = None
        if wanted("recovery"):
            rec = []
            for i in range(1, a.recovery_kills + 1):
                log(f"recovery: kill {i}/{a.recovery_kills}")
                try:
                    d = self.recovery_trial(i)
                    self.record("recovery", d)
                    rec.append(float(d["recovery_s"]))
                except Exception as e:
                    log(f"recovery trial {i} failed: {type(e).__name__}: {e}")
            if rec:
                rec.sort()
                recovery = benchlib.percentile(rec, 99)
                self.emit({"figure": "Recovery", "kills": len(rec), "jobs_per_kill": 10,
                           "p50_s": f"{benchlib.percentile(rec, 50):.2f}",
                           "p99_s": f"{recovery:.2f}", "min_s": f"{rec[0]:.2f}",
                           "max_s": f"{rec[-1]:.2f}", "lease_ms": LEASE_MS_DEFAULT,
                           "reaper_interval_ms": REAPER_MS_DEFAULT,
                           "bound_s": (LEASE_MS_DEFAULT + REAPER_MS_DEFAULT) / 1000.0})
        if wanted("claim_cost"):
            log("claim cost against queue depth")
            self.claim_cost()
        if wanted("pg_cost"):
            log("PostgreSQL cost per job: current statements vs one function vs batches of 16")
            pg_cost.run(self, 4096 if self.quick else 16384)
        if wanted("sweeps") and not self.quick:
            log("sweeps: concurrency, items per order, job bytes (single runs)")
            self.sweeps()
        self.summaries()
        self.compare_and_targets(recovery)


def normalize(text):
    """A limits.sh line as plain key=value fields: "[a b]" -> "a,b", quotes and "(...)"
    comments dropped."""
    text = re.sub(r"\s\(.*?\)", "", text)
    text = re.sub(r"\[([^\]]*)\]", lambda m: ",".join(m.group(1).split()), text)
    text = re.sub(r"'([^']*)'", lambda m: m.group(1).replace(" ", ""), text)
    return text


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--extra-rounds", type=int, default=None,
                    help="rounds added when a figure has fewer than 3 quiet runs")
    ap.add_argument("--n", type=int, default=None, help="jobs per settle throughput run")
    ap.add_argument("--peer-n", type=int, default=None, help="jobs per peer run")
    ap.add_argument("--peers-dir", default="", help="run-time copy of the peers' harness")
    ap.add_argument("--peers", default="bullmq,sidekiq")
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--raw", default="")
    ap.add_argument("--only", default="", help="comma list of figures/kinds (development)")
    ap.add_argument("--gate-wait", type=float, default=None,
                    help="longest wait for a quiet machine before one run (s)")
    ap.add_argument("--gate-budget", type=float, default=None,
                    help="total waiting for quiet machines in the session (s)")
    ap.add_argument("--latency-jobs", type=int, default=None)
    ap.add_argument("--recovery-kills", type=int, default=None)
    ap.add_argument("--limits-reps", type=int, default=3)
    ap.add_argument("--perf", default="", help="DIR: perf record -g the workers of each settle run")
    a = ap.parse_args()
    q = a.quick
    a.runs = a.runs or (1 if q else 3)
    a.extra_rounds = a.extra_rounds if a.extra_rounds is not None else (0 if q else 2)
    a.n = a.n or (3000 if q else 10000)
    a.peer_n = a.peer_n or (2000 if q else 5000)
    a.gate_wait = a.gate_wait if a.gate_wait is not None else (20 if q else 120)
    a.gate_budget = a.gate_budget if a.gate_budget is not None else (120 if q else 1200)
    a.latency_jobs = a.latency_jobs or (100 if q else 200)
    a.recovery_kills = a.recovery_kills or (2 if q else 5)
    a.peer_list = [p for p in a.peers.split(",") if p]
    return a


def main():
    args = parse_args()
    suite = Suite(args)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, suite.on_signal)
    try:
        suite.main()
    finally:
        suite.stop()


if __name__ == "__main__":
    main()
