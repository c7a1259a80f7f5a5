"""peers.py - drives the peers' harness (a run-time copy of ../shared/bench-peers) from the
settle benchmark, so BullMQ, Sidekiq and settle are measured in one session, round-robin.

The harness is used as its README describes: services.sh starts its Redis, PostgreSQL and mock
gateway (here on free loopback ports, with its state in the suite's temporary directory),
run_peer.sh makes one measurement and prints one key=value line, limits.sh measures the
machine. Nothing of the harness is changed; only its environment variables are set.
"""

import os
import subprocess
import time

import benchlib

STOP_TIMEOUT_S = 120


class Peers:
    def __init__(self, peers_dir, state_dir, free_port, quick=False):
        self.dir = peers_dir
        self.env = dict(os.environ)
        self.env.update({
            "BENCH_TMP": state_dir,
            "REDIS_PORT": str(free_port()),
            "PG_PORT": str(free_port()),
            "GW_PORT": str(free_port()),
            "GW_DELAY_MS": "20",
            "BENCH_MAX_LIFETIME": str(4 * 3600),
            "RUN_TIMEOUT": "300",
            "OUT_DIR": os.path.join(state_dir, "out"),
            "PY": "/usr/bin/python3",
        })
        # Loopback traffic must never meet a developer's proxy.
        for k in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            self.env.pop(k, None)
        self.gw_delay_ms = None
        self.started = False
        self.quick = quick

    def _sh(self, args, timeout, env=None, check=True):
        r = subprocess.run(args, cwd=self.dir, env=env or self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           check=False)
        out = r.stdout.decode("utf-8", "replace")
        err = r.stderr.decode("utf-8", "replace")
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {r.returncode}:\n{out[-2000:]}\n"
                               f"{err[-2000:]}")
        return r.returncode, out, err

    def start(self):
        self.started = True
        self._sh(["./services.sh", "start"], timeout=180)
        self.gw_delay_ms = 20

    def stop(self):
        if not self.started:
            return
        self.started = False
        try:
            self._sh(["./services.sh", "stop"], timeout=STOP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            benchlib.log("peers: services.sh stop timed out")

    def pids(self):
        out = {}
        for name in ("redis", "postgres", "gw"):
            try:
                with open(os.path.join(self.env["BENCH_TMP"], "pids", name + ".pid")) as f:
                    out[name] = int(f.read().strip())
            except (OSError, ValueError):
                out[name] = 0
        return out

    def set_gw_delay(self, ms):
        """Restarts the mock gateway with another fixed delay (only when it changes)."""
        if self.gw_delay_ms == ms:
            return
        self.env["GW_DELAY_MS"] = str(ms)
        self._sh(["./services.sh", "stop", "gw"], timeout=60)
        self._sh(["./services.sh", "start", "gw"], timeout=60)
        self.gw_delay_ms = ms

    def run(self, peer, workload, n, concurrency, label, own_root, gate_fn):
        """One run_peer.sh measurement, with the suite's quiet gate (gate_fn) before it.
        Returns the parsed line plus gate fields, cpu_us_per_job and noisy, or None when it
        failed."""
        gate = gate_fn()
        f0 = benchlib.foreign_cpu_snapshot(own_root)
        t0 = time.perf_counter()
        try:
            rc, out, err = self._sh(["./run_peer.sh", peer, workload, str(n), str(concurrency),
                                     str(label)], timeout=600, check=False)
        except subprocess.TimeoutExpired:
            benchlib.log(f"peers: {peer} {workload} timed out")
            return None
        secs = time.perf_counter() - t0
        foreign = 100.0 * benchlib.foreign_cpu_delta_s(f0, benchlib.foreign_cpu_snapshot(own_root)) \
            / max(secs, 1e-6)
        lines = [ln for ln in out.splitlines() if ln.startswith("peer=")]
        if rc != 0 or not lines:
            benchlib.log(f"peers: {peer} {workload} failed (rc {rc}): {err.strip()[-600:]}")
            return None
        d = benchlib.parse_line(lines[-1])
        d["gw_delay_ms"] = str(self.gw_delay_ms)
        try:
            d["cpu_us_per_job"] = f"{float(d['worker_cpu_pct']) / 100 * float(d['seconds']) / n * 1e6:.0f}"
        except (KeyError, ValueError):
            d["cpu_us_per_job"] = "-"
        bad = d.get("failed", "0") != "0" or d.get("timed_out", "0") != "0" or \
            ("gw_requests" in d and d["gw_requests"] != str(n)) or \
            ("pg_rows" in d and d["pg_rows"] != str(n))
        d["bad"] = "1" if bad else "0"
        d.update(benchlib.gate_fields(gate))
        # The whole call (enqueue, start-up, measurement, stop): foreign CPU over it.
        d["foreign_cpu_pct"] = f"{foreign:.0f}"
        d["noisy"] = "0" if gate["quiet"] and foreign <= benchlib.RUN_FOREIGN_MAX_PCT else "1"
        return d

    def limits(self, reps):
        """limits.sh (machine limits: idle noise, redis-benchmark, pgbench, wrk on the mock
        gateway); returns its limit= lines."""
        env = dict(self.env)
        env["REPS"] = str(reps)
        rc, out, err = self._sh(["./limits.sh"], timeout=1800, env=env, check=False)
        if rc != 0:
            benchlib.log(f"peers: limits.sh exited {rc}: {err.strip()[-600:]}")
        return [ln for ln in out.splitlines() if ln.startswith("limit=")]
