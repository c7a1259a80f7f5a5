"""cluster.py - the servers settle's figures are measured against, and settle workers.

Reuses the integration-test harness (tests/integration/harness.py: free loopback ports, one
temporary directory, every process stopped by PID) with two differences that matter for
performance:

- PostgreSQL runs durable, as the peers' W3 does: fsync on, synchronous_commit on (the test
  harness turns fsync off for speed), shared_buffers 512MB and max_connections 400 like the
  peers' cluster, autovacuum off (every run starts from TRUNCATEd tables and ANALYZEs after
  loading, so a background vacuum never lands in a measured window) and checkpoints spaced
  out (each run issues CHECKPOINT after loading its data; none happens during a run).
- Workers run with the product's defaults (lease 15 s, reaper 1 s, PG timeouts 1 s/3 s ...),
  not the test harness' shortened timeouts, and log at warn (the peers log at WARNING).

Redis keeps the harness' settings: AOF on with fsync every second, which is how settle is
meant to run (README); the peers' Redis runs without persistence, so this costs settle a
little, never the reverse.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
import harness  # noqa: E402

# The harness' pg_ctl options contain exactly this; it is replaced, and the replacement is
# checked, so a change in the harness fails loudly instead of benchmarking fsync=off.
HARNESS_PG_FSYNC = "-c fsync=off -c max_connections=200"
BENCH_PG_OPTS = ("-c fsync=on -c synchronous_commit=on -c max_connections=400 "
                 "-c shared_buffers=512MB -c autovacuum=off -c max_wal_size=16GB "
                 "-c checkpoint_timeout=1h")

# Test-harness settings that are not the product's defaults; None removes them so the
# worker uses its built-in defaults.
PRODUCT_DEFAULTS = {k: None for k in (
    "retry_base_ms", "retry_cap_ms", "lease_ms", "reaper_interval_ms", "gateway_timeout_ms",
    "gateway_connect_timeout_ms", "gateway_slowest_ms", "payment_window_ms",
    "check_schedule_ms", "shutdown_grace_ms")}


class BenchCluster(harness.Cluster):
    """harness.Cluster with a durable PostgreSQL."""

    def _pg_run(self, args, what, timeout=120):
        if what == "pg_ctl start":
            new = [a.replace(HARNESS_PG_FSYNC, BENCH_PG_OPTS) for a in args]
            if new == list(args):
                raise RuntimeError("bench: the harness' PostgreSQL options changed; "
                                   f"cannot find {HARNESS_PG_FSYNC!r} to replace")
            args = new
        return super()._pg_run(args, what, timeout)

    def bench_env(self, **overrides):
        """Environment for a benchmark worker: product defaults, warn logs, no proxies."""
        o = dict(PRODUCT_DEFAULTS)
        o["log_level"] = "warn"
        # The workers reach PostgreSQL directly, where README's advice is
        # SETTLE_DB_PREPARED=on (its default is off for PgBouncer < 1.21); the session line
        # says so, and BENCH_SETTLE_DB_PREPARED=off measures the default.
        o["db_prepared"] = "on"
        # BENCH_SETTLE_X=v sets SETTLE_X=v in every benchmark worker (tuning experiments,
        # e.g. BENCH_SETTLE_DB_BATCH=16); the figure lines name them (settle_env=...).
        o.update({k[len("BENCH_"):]: v for k, v in os.environ.items()
                  if k.startswith("BENCH_SETTLE_")})
        o.update(overrides)
        return self.env_for_worker(**o)

    def set_latency(self, ms):
        self.admin_faults(latency_min_ms=ms, latency_max_ms=ms)

    def pg_setting(self, name):
        return self.sql_value("SELECT current_setting(%s)", (name,))


def settle_bin():
    return harness.settle_bin()
