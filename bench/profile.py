#!/usr/bin/python3
"""profile.py - the profiling runs behind docs/PERFORMANCE.md ("Where the time goes").

Each mode starts its own servers (as the suite does: durable PostgreSQL, Redis, the PG stub at
0 ms), runs one R0-shaped batch of N reconcile jobs through one worker (concurrency 100) and
attaches one tool to it for the measured window:

  perfstat  perf stat -e task-clock,context-switches,cpu-migrations on the worker
  strace    strace -c -f on the worker (syscalls per job; strace slows the worker ~3x, so
            only the counts are meaningful)
  perf      perf record --call-graph dwarf on the worker -> OUT/worker.data
  perfsys   perf record -a -g on the whole machine for 6 s -> OUT/system.data (PostgreSQL's
            share: parse/plan/execute/commit)
  states    the worker's mean time per job in each state (its stop log line)
  Every mode takes --latency MS (the stub's delay: 0 by default; 20 is the R20 shape),
  --concurrency C (100) and --status-concurrency S (= C); R20_pipelined is
  states N --latency 20 --concurrency 256 --status-concurrency 100. Every batch prints the
  CPU per job of the worker, PostgreSQL and Redis, and Redis's commands per job (INFO
  commandstats).
  timeline  no batch: the worker runs under strace -f -ttt and six jobs are pushed 0.3 s apart
            -> OUT/timeline.txt (one job's syscalls in order: every round trip is visible)

  SETTLE_BIN=build/release/settle SETTLE_TEST_TMPDIR=/tmp /usr/bin/python3 bench/profile.py \\
      perfstat [N] [--out DIR]

Read the perf files with `perf report -i FILE --children --sort sym` (add --comm postgres for
system.data).
"""

import argparse
import os
import signal
import subprocess
import sys
import time

import benchlib
import cluster
import fixtures

harness = cluster.harness


def batch(c, n, wrap, latency_ms=0, states=False, conc=100, status_conc=None):
    """Push n jobs (held), start a worker, attach wrap(pid) if given, release, wait until
    all are acked (bounded), stop the tool and the worker. Returns the tool's output, or with
    states the worker's own account of where a job's time went (its stop log line)."""
    c.reset()
    c.set_latency(latency_ms)
    jobs, _ = fixtures.prep_reconcile(c, n, "p")
    fixtures.push(c, "reconcile", jobs)
    extra = {"log_level": "info"} if states else {}
    if status_conc:
        extra["status_concurrency"] = status_conc
    w = c.start_worker(c.bench_env(queues="reconcile", concurrency=conc, **extra),
                       name="profiled")
    tool = None
    try:
        harness.wait_until(lambda: int(c.redis.info("clients")["blocked_clients"]) >= 1, 30,
                           what="the worker to park on BLMOVE")
        if wrap:
            tool = subprocess.Popen(wrap(w.pid), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            time.sleep(1.0)
        win = benchlib.Window({"worker": [w.pid], "pg": [c.postmaster_pid()],
                               "redis": [c.redis_pid()]}, os.getpid())
        c.redis.config_resetstat()
        win.start()
        fixtures.release(c, "reconcile")
        harness.wait_until(lambda: c.redis.zcard(fixtures.key("inflight:reconcile")) +
                           c.redis.llen(fixtures.key("queue:reconcile")) == 0, 60 + n / 20, 0.005,
                           "every job to be acked")
        m = win.stop()
    finally:
        out = ""
        if tool is not None:
            tool.send_signal(signal.SIGINT)
            try:
                out = tool.communicate(timeout=120)[0].decode("utf-8", "replace")
            except subprocess.TimeoutExpired:
                tool.kill()
                out = tool.communicate(timeout=10)[0].decode("utf-8", "replace")
        w.stop(timeout=30)
    print(f"n={n} latency_ms={latency_ms} seconds={m['seconds']:.2f} "
          f"jobs_per_s={n / m['seconds']:.0f} "
          f"worker_cpu_us_per_job={m['cpu_s']['worker'] * 1e6 / n:.0f} "
          f"pg_cpu_us_per_job={m['cpu_s']['pg'] * 1e6 / n:.0f} "
          f"redis_cpu_us_per_job={m['cpu_s']['redis'] * 1e6 / n:.0f}")
    # Redis commands per job with Redis's mean time per call (INFO commandstats, reset when
    # the window opened). A script's time includes the commands it runs, which are also
    # counted on their own; under CPU contention the times include waiting for a core.
    stats = c.redis.info("commandstats")
    print("redis " + " ".join(
        f"{k[len('cmdstat_'):]}={v['calls'] / n:.3f}/{v['usec_per_call']:.1f}us"
        for k, v in sorted(stats.items(), key=lambda kv: -kv[1]["calls"])
        if v["calls"] >= n / 100))
    if states:
        out = "\n".join(ln for ln in w.log_text().splitlines()
                        if "mean ms per" in ln or "PostgreSQL load batches" in ln
                        or "PostgreSQL store batches" in ln)
    return out


def timeline(c, out_dir):
    c.reset()
    c.set_latency(0)
    jobs, _ = fixtures.prep_reconcile(c, 6, "t")
    env = c.bench_env(queues="reconcile", concurrency=100)
    path = os.path.join(out_dir, "timeline.txt")
    with open(path, "w") as log:
        p = subprocess.Popen(["strace", "-f", "-ttt", "-T", "-s", "80", "-e",
                              "trace=sendto,recvfrom,write,read,futex,poll,epoll_wait,fdatasync",
                              cluster.settle_bin(), "work"], env=env, stdout=subprocess.DEVNULL,
                             stderr=log, start_new_session=True)
        try:
            time.sleep(3)
            for j in jobs:
                c.redis.lpush(fixtures.key("queue:reconcile"), j)
                time.sleep(0.3)
        finally:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
    print(f"{path}: {c.sql_value('SELECT count(*) FROM job_log')} jobs done")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["perfstat", "strace", "perf", "perfsys", "timeline",
                                         "states"])
    ap.add_argument("n", nargs="?", type=int, default=5000)
    ap.add_argument("--out", default=".")
    ap.add_argument("--latency", type=int, default=0, help="PG stub latency in ms (every mode)")
    ap.add_argument("--concurrency", type=int, default=100, help="SETTLE_CONCURRENCY")
    ap.add_argument("--status-concurrency", type=int, default=None,
                    help="SETTLE_STATUS_CONCURRENCY (default: the concurrency)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    c = cluster.BenchCluster(pgsim_args=["--latency-ms", "0-0"])
    c.start()
    try:
        c.migrate()

        def run(wrap, **kw):
            return batch(c, a.n, wrap, latency_ms=a.latency, conc=a.concurrency,
                         status_conc=a.status_concurrency, **kw)
        if a.mode == "perfstat":
            print(run(lambda pid: ["perf", "stat", "-e",
                                   "task-clock,context-switches,cpu-migrations", "-p",
                                   str(pid)]))
        elif a.mode == "strace":
            out = run(lambda pid: ["strace", "-c", "-f", "-p", str(pid)])
            print("\n".join(ln for ln in out.splitlines() if not ln.startswith("strace:")))
        elif a.mode == "perf":
            run(lambda pid: ["perf", "record", "-p", str(pid), "-F", "999", "--call-graph",
                             "dwarf,16384", "-o", os.path.join(a.out, "worker.data")])
        elif a.mode == "states":
            print(run(None, states=True))
        elif a.mode == "perfsys":
            run(lambda pid: ["perf", "record", "-a", "-F", "999", "-g", "-o",
                             os.path.join(a.out, "system.data"), "--", "sleep", "6"])
        else:
            timeline(c, a.out)
    finally:
        c.stop()


if __name__ == "__main__":
    sys.exit(main())
