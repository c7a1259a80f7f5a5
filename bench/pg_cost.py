"""pg_cost.py - what PostgreSQL spends per reconcile job, and what it would spend with fewer
round trips (the evidence behind the batching recommendation in docs/PERFORMANCE.md).

pgbench replays the PostgreSQL work of one successful reconcile job, as three variants:

- current   (sql/job_current.sql): settle's statements today, two transactions, 14 round trips
            per job, every statement parsed and planned each time (-M extended, as
            PQexecParams with unnamed statements does);
- current_prepared: the same statements as named prepared statements (-M prepared): what
            plan caching alone would save, round trips unchanged;
- function  (sql/job_function.sql): the order read as one statement and the outcome as one
            call of a PL/pgSQL function (sql/proposal.sql): 2 round trips per job;
- batch16, batch64 (sql/job_batch.sql): 16 or 64 jobs per round trip and per transaction,
            each job in its own sub-block (savepoint) so one failure does not fail the others;
- batch64_optimistic (sql/job_batch_optimistic.sql): 64 jobs without savepoints (a failure
            rolls the whole batch back and the worker would apply its jobs one by one).

16 client connections (settle's default pool), synchronous_commit on. Prints PostgreSQL CPU µs
per job (postmaster tree, /proc) and jobs/s for each; every variant runs on fresh orders and
must leave exactly one job_log row per job.
"""

import os
import subprocess

import benchlib
import fixtures

HERE = os.path.dirname(os.path.abspath(__file__))
SQL = os.path.join(HERE, "sql")
CLIENTS = 16
VARIANTS = (("current", "job_current.sql", 1, 14, "extended"),
            ("current_prepared", "job_current.sql", 1, 14, "prepared"),
            ("function", "job_function.sql", 1, 2, "extended"),
            ("batch16", "job_batch.sql", 16, 2.0 / 16, "extended"),
            ("batch64", "job_batch.sql", 64, 2.0 / 64, "extended"),
            ("batch64_optimistic", "job_batch_optimistic.sql", 64, 2.0 / 64, "extended"))


def _prepare(c, orders):
    c.reset()
    fixtures._products(c, fixtures.SKUS_DEFAULT)
    c.sql("INSERT INTO orders (id, user_id, status, amount_minor) "
          "SELECT 'e' || i, 'u' || (i %% 997), 'PENDING', 100 FROM generate_series(1, %s) i",
          (orders,))
    c.sql("INSERT INTO order_items (order_id, sku, qty) "
          "SELECT 'e' || i, 'sku-' || (i %% %s), 1 FROM generate_series(1, %s) i",
          (fixtures.SKUS_DEFAULT, orders))
    c.sql("INSERT INTO payments (order_id, transaction_key, user_id, amount_minor, status) "
          "SELECT 'e' || i, 'te' || i, 'u' || (i %% 997), 100, 'PENDING' "
          "FROM generate_series(1, %s) i", (orders,))
    c.sql("DROP SEQUENCE IF EXISTS bench_job_seq")
    c.sql("CREATE SEQUENCE bench_job_seq")
    with open(os.path.join(SQL, "proposal.sql")) as f:
        c.sql(f.read())
    c.sql("ANALYZE")
    c.sql("CHECKPOINT")


def run(suite, jobs):
    """One measurement per variant; returns the emitted dicts."""
    c = suite.c
    per_client = max(1, jobs // CLIENTS)
    out = []
    for name, script, jobs_per_tx, rtt, mode in VARIANTS:
        tx_per_client = max(1, per_client // jobs_per_tx)
        total_jobs = tx_per_client * jobs_per_tx * CLIENTS
        _prepare(c, total_jobs + 2 * jobs_per_tx)
        gate = suite.gate()
        win = benchlib.Window({"pg": [c.postmaster_pid()]}, suite.own_root)
        env = dict(os.environ, PGOPTIONS="-c synchronous_commit=on")
        win.start()
        r = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(c.pg_port), "-U", "postgres",
                            "-n", "-M", mode, "-c", str(CLIENTS), "-j", "2", "-t",
                            str(tx_per_client), "-D", f"batch={jobs_per_tx}", "-f",
                            os.path.join(SQL, script), "settle"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                           timeout=900, check=False)
        m = win.stop()
        text = r.stdout.decode("utf-8", "replace")
        logged = c.sql_value("SELECT count(*) FROM job_log WHERE result = 'completed'")
        failed = r.returncode != 0 or logged != total_jobs
        if failed:
            benchlib.log(f"pg_cost {name}: pgbench exited {r.returncode}, job_log {logged}/"
                         f"{total_jobs}:\n{text[-1500:]}")
        d = {"figure": "pg_job_cost", "variant": name, "protocol": mode, "clients": CLIENTS,
             "jobs": total_jobs,
             "jobs_per_tx": jobs_per_tx, "round_trips_per_job": f"{rtt:g}",
             "seconds": f"{m['seconds']:.2f}", "jobs_per_s": f"{total_jobs / m['seconds']:.0f}",
             "pg_cpu_us_per_job": f"{m['cpu_s']['pg'] * 1e6 / total_jobs:.0f}",
             "pg_cpu_pct": f"{m['pg_cpu_pct']:.0f}", "sys_busy_pct": f"{m['sys_busy_pct']:.0f}",
             "foreign_cpu_pct": f"{m['foreign_cpu_pct']:.0f}", "bad": int(failed)}
        d.update(benchlib.gate_fields(gate))
        d["noisy"] = int(not gate["quiet"] or m["foreign_cpu_pct"] > benchlib.RUN_FOREIGN_MAX_PCT)
        out.append(d)
        suite.emit(d)
    base = next((d for d in out if d["variant"] == "current" and not d["bad"]), None)
    if base:
        for d in out:
            if d is base or d["bad"]:
                continue
            suite.emit({"figure": "pg_job_cost_gain", "variant": d["variant"],
                        "pg_cpu_per_job_vs_current":
                            f"{float(d['pg_cpu_us_per_job']) / float(base['pg_cpu_us_per_job']):.2f}",
                        "jobs_per_s_vs_current":
                            f"{float(d['jobs_per_s']) / float(base['jobs_per_s']):.2f}"})
    return out
