"""benchlib.py - measurement helpers shared by the settle benchmark suite (bench/).

CPU accounting from /proc (per process and per process tree), the machine's busy/idle share,
the "quiet machine" gate that runs before every measured run (load average, idle share, CPU
of processes the suite did not start), medians that leave noisy runs out when enough quiet
ones exist, and the one-line key=value output format the peers' harness uses.

Standard library only; runs on Debian's /usr/bin/python3.
"""

import os
import statistics
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# The quiet gate (see quiet_gate): a run starts only when, over a short sample with the
# suite's own servers idle, the machine is at least this idle, processes the suite did not
# start use at most this much CPU, and the run queue is this short; otherwise it waits (in
# GATE_POLL_S steps, at most its max_wait_s) and the run is flagged noisy=1.
GATE_IDLE_MIN_PCT = 80.0  # 100 = every core idle
GATE_FOREIGN_MAX_PCT = 20.0  # 100 = one core
GATE_RUNQ_MAX = 0.7  # runnable tasks besides the sampler, averaged over the sample
GATE_SAMPLE_S = 2.0
GATE_POLL_S = 5.0
# During a run: foreign CPU above this flags it noisy (100 = one core).
RUN_FOREIGN_MAX_PCT = 20.0


def log(msg):
    """Progress goes to stderr; stdout carries only the figure lines."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def line(fields):
    """One key=value line (values without spaces), the format of the peers' harness."""
    out = []
    for k, v in fields.items():
        if v is None:
            v = "-"
        if isinstance(v, float):
            v = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
        out.append(f"{k}={str(v).replace(' ', '_')}")
    return " ".join(out)


def parse_line(text):
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


# --------------------------------------------------------------------------------------------
# /proc


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid):
    """Fields after the command name of /proc/pid/stat (index 0 = state), or None."""
    s = _read(f"/proc/{pid}/stat")
    if s is None:
        return None
    return s[s.rindex(b")") + 2:].split()


def proc_cpu_s(pid, children=False):
    """utime+stime of pid (all its threads) in seconds; with children also the CPU of its
    reaped children (cutime+cstime)."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def _children(pid):
    out = []
    task = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task)
    except OSError:
        return out
    for tid in tids:
        c = _read(f"{task}/{tid}/children")
        if c:
            out.extend(int(x) for x in c.split())
    return out


def tree(roots):
    """The pids of roots and all their descendants."""
    seen, todo = set(), [p for p in roots if p]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(_children(p))
    return seen


def tree_cpu_s(roots):
    """CPU seconds of a process tree, reaped children included (as the peers' harness)."""
    return sum(proc_cpu_s(p, children=True) for p in tree(roots))


def vm_hwm_kib(pid):
    """Peak resident set size (VmHWM) of pid in KiB, or None."""
    s = _read(f"/proc/{pid}/status")
    if s is None:
        return None
    for ln in s.decode("utf-8", "replace").splitlines():
        if ln.startswith("VmHWM:"):
            return int(ln.split()[1])
    return None


def sys_stat():
    """(total jiffies, idle+iowait jiffies, steal jiffies, procs_running) from /proc/stat."""
    s = _read("/proc/stat").decode()
    first = s.split("\n", 1)[0].split()[1:]
    vals = [int(x) for x in first] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, steal = vals[:8]
    running = 0
    for ln in s.splitlines():
        if ln.startswith("procs_running"):
            running = int(ln.split()[1])
    return sum(vals[:8]), idle + iowait, steal, running


def load1():
    return float(_read("/proc/loadavg").split()[0])


def _kernel_thread(pid):
    f = _stat_fields(pid)
    # ppid is field 4 (index 1); kthreadd is pid 2 and the parent of every kernel thread.
    return f is None or pid == 2 or f[1] == b"2"


def foreign_cpu_snapshot(own_root):
    """{pid: cpu seconds} of every user-space process that is not own_root or one of its
    descendants: the load other people put on the machine."""
    own = tree([own_root])
    snap = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in own or _kernel_thread(pid):
            continue
        # Live processes only: a foreign parent reaping a child would otherwise add that
        # child's whole lifetime to the window at once.
        snap[pid] = proc_cpu_s(pid)
    return snap


def foreign_cpu_delta_s(before, after):
    """CPU seconds used between two snapshots by processes alive at the second one (a process
    born in between counts from zero)."""
    return sum(max(0.0, v - before.get(p, 0.0)) for p, v in after.items())


class Window:
    """CPU use over a measured window: named process trees, the whole machine, and the
    processes the suite did not start."""

    def __init__(self, trees, own_root):
        self.trees = trees  # name -> list of root pids
        self.own_root = own_root

    def start(self):
        self.c0 = {k: tree_cpu_s(v) for k, v in self.trees.items()}
        self.f0 = foreign_cpu_snapshot(self.own_root)
        self.s0 = sys_stat()
        self.self0 = time.process_time()
        self.t0 = time.perf_counter()

    def stop(self, extra_trees=None):
        self.t1 = time.perf_counter()
        s1 = sys_stat()
        c1 = {k: tree_cpu_s(v) for k, v in self.trees.items()}
        f1 = foreign_cpu_snapshot(self.own_root)
        self_cpu = time.process_time() - self.self0
        secs = max(self.t1 - self.t0, 1e-6)
        dt = max(s1[0] - self.s0[0], 1)
        busy = 100.0 * (dt - (s1[1] - self.s0[1]) - (s1[2] - self.s0[2])) / dt
        out = {"seconds": secs}
        used = {k: c1[k] - self.c0[k] for k in c1}
        for k, v in used.items():
            out[f"{k}_cpu_pct"] = 100.0 * v / secs
        out["cpu_s"] = used
        foreign = foreign_cpu_delta_s(self.f0, f1)
        out["sys_busy_pct"] = busy
        out["foreign_cpu_pct"] = 100.0 * foreign / secs
        accounted = sum(used.values()) + self_cpu + foreign
        out["other_cpu_pct"] = busy * NCPU - 100.0 * accounted / secs
        out["probe_cpu_pct"] = 100.0 * self_cpu / secs
        out["steal_pct"] = 100.0 * (s1[2] - self.s0[2]) / dt
        return out


# --------------------------------------------------------------------------------------------
# The quiet gate


def sample_machine(own_root, seconds=GATE_SAMPLE_S):
    """Idle share, run queue and foreign CPU over `seconds` (the suite's servers idle)."""
    f0 = foreign_cpu_snapshot(own_root)
    s0 = sys_stat()
    runq = []
    t0 = time.perf_counter()
    steps = max(1, int(seconds / 0.1))
    for _ in range(steps):
        time.sleep(seconds / steps)
        runq.append(max(0, sys_stat()[3] - 1))  # minus this sampler
    s1 = sys_stat()
    f1 = foreign_cpu_snapshot(own_root)
    secs = time.perf_counter() - t0
    dt = max(s1[0] - s0[0], 1)
    idle = 100.0 * (s1[1] - s0[1]) / dt
    return {"load1": load1(), "idle_pct": idle, "runq": statistics.mean(runq),
            "foreign_cpu_pct": 100.0 * foreign_cpu_delta_s(f0, f1) / secs}


def quiet_gate(own_root, max_wait_s):
    """Waits (bounded by max_wait_s) until the machine is quiet. Returns the last sample with
    waited_s and quiet (True/False). The 1-minute load average is recorded but does not gate
    by itself: right after one of our own runs it still carries that run's load for a minute,
    so the gate uses its instantaneous counterparts (run queue, idle share, foreign CPU)."""
    t0 = time.monotonic()
    polls = int(max_wait_s / GATE_POLL_S) + 1
    s = None
    for i in range(polls + 1):
        s = sample_machine(own_root)
        quiet = (s["idle_pct"] >= GATE_IDLE_MIN_PCT and s["foreign_cpu_pct"] <= GATE_FOREIGN_MAX_PCT
                 and s["runq"] <= GATE_RUNQ_MAX)
        if quiet or time.monotonic() - t0 >= max_wait_s or i == polls:
            break
        if i == 0:
            log(f"machine busy (load1 {s['load1']:.2f}, idle {s['idle_pct']:.0f} %, foreign CPU "
                f"{s['foreign_cpu_pct']:.0f} %, run queue {s['runq']:.1f}); waiting up to "
                f"{max_wait_s:.0f} s")
        time.sleep(GATE_POLL_S)
    s["waited_s"] = time.monotonic() - t0
    s["quiet"] = quiet
    return s


def gate_fields(g):
    return {"pre_load1": f"{g['load1']:.2f}", "pre_idle_pct": f"{g['idle_pct']:.0f}",
            "pre_foreign_cpu_pct": f"{g['foreign_cpu_pct']:.0f}", "pre_runq": f"{g['runq']:.1f}",
            "waited_s": f"{g['waited_s']:.0f}"}


# --------------------------------------------------------------------------------------------
# Medians


def pick_runs(runs, enough=3):
    """The runs a median is taken over: the quiet ones when there are at least `enough` of
    them (or all runs are quiet), else all of them. Returns (runs, noisy_flag)."""
    quiet = [r for r in runs if str(r.get("noisy", "0")) == "0"]
    if len(quiet) >= min(enough, len(runs)) and quiet:
        return quiet, 0
    return runs, 1


def median_of(runs, key):
    vals = []
    for r in runs:
        v = r.get(key)
        if v in (None, "-", ""):
            continue
        try:
            vals.append(float(v))
        except (TypeError, ValueError):
            continue
    return statistics.median(vals) if vals else None


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list (p in 0..100)."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]
