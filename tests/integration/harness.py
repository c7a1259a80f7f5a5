"""harness.py - the shared integration-test harness for settle.

Starts real servers on loopback, each on a free port inside one temporary directory:
redis-server (AOF on, so a restart keeps data), a throwaway PostgreSQL 15 cluster (initdb +
pg_ctl, never the system cluster on 5432) and the PG simulator (`settle pgsim`). Then drives
the real `settle` binary ($SETTLE_BIN) against them: CLI commands, worker processes,
fixtures in PostgreSQL and Redis, and the simulator's admin API.

Process ownership: the harness stops exactly the processes it started, by PID (SIGTERM, a
bounded wait, then SIGKILL; `pg_ctl stop -m fast` for PostgreSQL), never by name. Cleanup runs
on normal exit, on exceptions and on SIGTERM/SIGINT (atexit + signal handlers). Every child
gets its own session, so a Ctrl-C in the terminal reaches only this process, which then stops
the children in order.

Runs on Debian's /usr/bin/python3 with the standard library, python3-redis and
python3-psycopg2 only. Test files use it like this:

    import harness
    def test_something(c):            # c is the Cluster, reset before each test
        c.add_product("sku-1", 10)
        ...
    if __name__ == "__main__":
        harness.main(globals())       # optional argv: names of the tests to run
"""

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

import psycopg2
import redis

NAMESPACE = "settle"
PG_BIN = "/usr/lib/postgresql/15/bin"
# PostgreSQL refuses to run as root, so as root initdb/pg_ctl run as this system user.
PG_RUN_USER = "settle-test"
# The subcommand that runs a worker process (main.c). One place to change it.
WORKER_ARGS = ("work",)
# Tables the per-test reset leaves alone (the migration record must survive it).
KEEP_TABLES = ("schema_migrations",)

# PG simulator admin API (src/pgsim/pgsim.c). Paths are kept here so a change in the
# simulator needs one edit.
PGSIM_HEALTH = "/healthz"
PGSIM_ADMIN = "/admin"

STOP_TIMEOUT_S = 10.0  # SIGTERM -> SIGKILL for servers
START_TIMEOUT_S = 30.0  # bound on every server readiness poll
LOG_TAIL_LINES = 60  # lines of each log printed on a failure


def settle_bin():
    """Path of the settle binary under test ($SETTLE_BIN, set by ctest)."""
    path = os.environ.get("SETTLE_BIN", "")
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"SETTLE_BIN is not an executable file: {path!r}")
    return path


# --------------------------------------------------------------------------------------------
# Small utilities


_ports_given = set()


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then close).

    Ports handed out by this process are never handed out twice, so two servers started by
    one test cannot collide with each other; another process may still race us, which the
    server start-up retries cover."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise RuntimeError("free_port: no fresh port after 50 tries")


def wait_until(pred, timeout_s, interval_s=0.05, what="condition"):
    """Polls pred() until it returns something truthy and returns that value. Bounded in time
    and in the number of polls; raises AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    max_polls = int(timeout_s / max(interval_s, 0.001)) + 2
    last_exc = None
    for _ in range(max_polls):
        try:
            value = pred()
            if value:
                return value
            last_exc = None
        except (OSError, redis.RedisError, psycopg2.Error) as e:
            # A server that is still starting refuses connections: keep polling.
            last_exc = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    extra = f" (last error: {last_exc})" if last_exc else ""
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{extra}")


def tail(path, lines=LOG_TAIL_LINES, start=0):
    """The last `lines` lines of a text file from byte offset start on, or a note when it
    cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(start, size - 256 * 1024))  # bounded read, logs can be large
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return "\n".join(data.splitlines()[-lines:])


def _pid_alive(pid):
    """True when pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain ')'.
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def _pid_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _stop_popen(proc, name, sig=signal.SIGTERM, timeout_s=STOP_TIMEOUT_S, group=False):
    """Stops a child we started: sig, a bounded wait, then SIGKILL to its process group (the
    child leads its own session, so the group is exactly what it started). Returns the exit
    code (negative = killed by that signal)."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"harness: {name} (pid {proc.pid}) still running {timeout_s:g} s after "
              f"signal {int(sig)}; sending SIGKILL", file=sys.stderr)
    # poll() is None here, so the group leader is alive and its group id is still ours.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=STOP_TIMEOUT_S)


class TempDir:
    """A temporary directory, removed on exit unless keep is set.

    It lives under $SETTLE_TEST_TMPDIR or /tmp rather than $TMPDIR: when running as root,
    PostgreSQL runs as an unprivileged user that must be able to reach the directory, and a
    TMPDIR under /root would not be traversable for it."""

    def __init__(self, prefix="settle-it-", keep=False):
        base = os.environ.get("SETTLE_TEST_TMPDIR") or "/tmp"
        self.path = tempfile.mkdtemp(prefix=prefix, dir=base)
        self.keep = keep

    def chown(self, user):
        pw = pwd.getpwnam(user)
        os.chown(self.path, pw.pw_uid, pw.pw_gid)

    def cleanup(self):
        if self.keep or not self.path or not os.path.isdir(self.path):
            return
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


def _sweep_stale_dirs(base):
    """Removes settle-it-* directories left by harness runs that were killed outright
    (SIGKILL, a ctest timeout), which had no chance to clean up. A directory is stale only
    when the harness that made it (owner.pid) and its postmaster (pg/postmaster.pid) are
    both gone, so a concurrent run is never touched."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if not name.startswith("settle-it-") or not os.path.isdir(path):
                continue
            pids = []
            try:
                for f in ("owner.pid", os.path.join("pg", "postmaster.pid")):
                    with contextlib.suppress(FileNotFoundError):
                        with open(os.path.join(path, f)) as fh:
                            pids.append(int(fh.readline().strip()))
            except (OSError, ValueError):
                continue
            if pids and not any(_pid_alive(p) for p in pids):
                shutil.rmtree(path, ignore_errors=True)


def _ensure_run_user():
    """The user PostgreSQL runs as when we are root: settle-test (created if missing, as a
    system user without a home or login shell), else nobody if useradd is unavailable."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam(PG_RUN_USER)
        return PG_RUN_USER
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    if os.path.exists(useradd):
        subprocess.run([useradd, "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", PG_RUN_USER],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                       check=False)
        # Another process may have created it at the same moment: look again either way.
        with contextlib.suppress(KeyError):
            pwd.getpwnam(PG_RUN_USER)
            return PG_RUN_USER
    return "nobody"


# --------------------------------------------------------------------------------------------
# Cleanup on exit and on signals

_live = []  # Clusters that are started; stopped in reverse order by _cleanup_all
_cleaning = False
_handlers_installed = False


def _cleanup_all():
    global _cleaning
    if _cleaning:
        return
    _cleaning = True
    try:
        for cluster in reversed(list(_live)):
            with contextlib.suppress(Exception):
                cluster.stop()
    finally:
        _cleaning = False


def _on_signal(signum, frame):
    # Stop everything we started, then exit with the conventional status. A second signal
    # during the cleanup is ignored (the cleanup is bounded anyway).
    if _cleaning:
        return
    signal.alarm(0)
    print(f"harness: got signal {signum}; stopping the processes it started", file=sys.stderr)
    _cleanup_all()
    os._exit(128 + signum)


def _become_subreaper():
    """Makes this process the child subreaper of its descendants (Linux prctl). pg_ctl
    daemonizes the postmaster; as a subreaper we, not init, become its parent, so it stays in
    our process tree, and ctest's timeout (which kills a test's tree by parent PID) also ends
    PostgreSQL if this process dies without cleaning up. Best effort."""
    with contextlib.suppress(Exception):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_child_subreaper = 36
        libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _reap(pid, timeout_s):
    """Waits up to timeout_s for pid to exit, collecting its exit status when it is our child
    (an adopted postmaster would otherwise stay a zombie). True when it is gone."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.05) + 1):
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return True
        except ChildProcessError:  # not our child: all we can do is look
            if not _pid_alive(pid):
                return True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return False


def _install_handlers():
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    _become_subreaper()
    atexit.register(_cleanup_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # only possible on the main thread
            signal.signal(sig, _on_signal)


# --------------------------------------------------------------------------------------------
# HTTP (simulator admin and public API)

# No proxies: a developer's http_proxy must never see loopback test traffic.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Response:
    """An HTTP answer: status, headers (lower-case names), body bytes, and .json."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body

    @property
    def json(self):
        return json.loads(self.body.decode("utf-8")) if self.body else None

    def __repr__(self):
        return f"Response({self.status}, {self.body[:300]!r})"


def http(method, url, body=None, headers=None, timeout=10.0):
    """One request; never raises for an HTTP error status (the caller checks .status)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with _opener.open(req, timeout=timeout) as r:
            return Response(r.status, dict(r.headers), r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, dict(e.headers or {}), e.read() or b"")


def _camel(fields):
    """{"user_id": 1, "orderId": 2} -> {"userId": 1, "orderId": 2} (the simulator's names)."""
    out = {}
    for k, v in fields.items():
        head, *rest = k.split("_")
        out[head + "".join(w[:1].upper() + w[1:] for w in rest)] = v
    return out


# --------------------------------------------------------------------------------------------
# Workers


class Worker:
    """A `settle` worker process in its own process group, stdout+stderr in one log file."""

    def __init__(self, cluster, env, name, args=WORKER_ARGS):
        self.cluster = cluster
        self.name = name
        self.log_path = cluster.new_log_path(name)
        self.args = list(args)
        self.env = env
        self.metrics_addr = env.get("SETTLE_METRICS_ADDR")
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([settle_bin(), *self.args], env=env,
                                         stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Sends sig, waits up to timeout, then SIGKILLs the group. Returns the exit code
        (negative = killed by that signal)."""
        try:
            return _stop_popen(self.proc, f"worker {self.name}", sig, timeout)
        finally:
            self._log.close()

    def kill9(self):
        """SIGKILL to the worker's process group (a crash, as far as Redis can tell)."""
        return self.stop(signal.SIGKILL, STOP_TIMEOUT_S)

    def wait(self, timeout):
        """Waits for the worker to exit by itself; returns the exit code or None."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def bad_log_lines(self):
        """Lines of the log that are not JSON objects (stderr shares the file, so a sanitizer
        report or a stray printf shows up here)."""
        bad = []
        for line in self.log_text().splitlines():
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    bad.append(line)
            except ValueError:
                bad.append(line)
        return bad

    def log_json_lines(self, strict=True):
        """Every log line parsed as a JSON object. With strict (the default) a line that is not
        one fails the test, naming the first few offenders."""
        out = []
        for line in self.log_text().splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                out.append(obj)
        if strict:
            bad = self.bad_log_lines()
            if bad:
                raise AssertionError(f"worker {self.name}: {len(bad)} log line(s) are not JSON, "
                                     f"e.g. {bad[:3]!r}")
        return out


SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer")


def sanitizer_reports(text):
    """Lines of text that start a sanitizer report."""
    return [ln for ln in text.splitlines() if any(m in ln for m in SANITIZER_MARKERS)]


# --------------------------------------------------------------------------------------------
# The cluster


class Cluster:
    """redis-server + PostgreSQL 15 + the PG simulator in one temporary directory.

    Use as a context manager (or start()/stop()). Attributes once started: dir, redis_port,
    pg_port, gateway_url, redis_url, database_url, redis (client, bytes replies), pg
    (psycopg2 connection, autocommit)."""

    def __init__(self, redis_on=True, postgres=True, pgsim=True, pgsim_profile="clean",
                 pgsim_seed=1, pgsim_args=(), keep_dir=False, quiet=True):
        self.want_redis = redis_on
        self.want_postgres = postgres
        self.want_pgsim = pgsim
        self.pgsim_profile = pgsim_profile
        self.pgsim_seed = pgsim_seed
        self.pgsim_args = list(pgsim_args)
        self.keep_dir = keep_dir
        self.quiet = quiet
        self.tmp = None
        self.dir = None
        self.redis_port = None
        self.pg_port = None
        self.pgsim_port = None
        self.redis = None
        self._pg = None
        self._redis_proc = None
        self._pgsim_proc = None
        self._pgsim_log = None
        self._pgsim_faults = None  # the profile at start, restored by admin_reset
        self._pg_running = False
        self.pg_user = None  # the OS user PostgreSQL runs as, None = ourselves
        self.workers = []
        self._log_seq = 0
        self.log_prefix = ""

    # --- life cycle ---

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.keep_dir = self.keep_dir or os.environ.get("SETTLE_KEEP_TMP") == "1"
        self.stop()

    def start(self):
        _install_handlers()
        _live.append(self)
        try:
            self.tmp = TempDir(keep=self.keep_dir)
            self.dir = self.tmp.path
            _sweep_stale_dirs(os.path.dirname(self.dir))
            # Marks the directory as this process's, for _sweep_stale_dirs of later runs.
            with open(os.path.join(self.dir, "owner.pid"), "w") as f:
                f.write(f"{os.getpid()}\n")
            os.makedirs(os.path.join(self.dir, "logs"))
            if os.geteuid() == 0 and self.want_postgres:
                self.pg_user = _ensure_run_user()
                self.tmp.chown(self.pg_user)
            if self.want_redis:
                self._on_free_port("redis_port", self.start_redis, self.stop_redis)
            if self.want_postgres:
                self._initdb()
                self._on_free_port("pg_port", self.start_postgres, self.stop_postgres)
                self._createdb()
            if self.want_pgsim:
                self.start_pgsim()
        except BaseException:
            self.stop()
            raise
        return self

    def _on_free_port(self, attr, start, stop, tries=3):
        """Starts a server on a fresh port, with a new port on failure: another process may
        take the port between free_port() and the server's bind."""
        for attempt in range(tries):
            setattr(self, attr, free_port())
            try:
                start()
                return
            except (RuntimeError, AssertionError):
                with contextlib.suppress(Exception):
                    stop()
                if attempt == tries - 1:
                    raise

    def stop(self):
        """Stops everything this cluster started, workers first. Safe to call twice."""
        for w in list(self.workers):
            with contextlib.suppress(Exception):
                if w.alive():
                    w.stop(timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            self.stop_pgsim()
        with contextlib.suppress(Exception):
            self.stop_redis()
        with contextlib.suppress(Exception):
            self.stop_postgres()
        if self.tmp is not None:
            if self.keep_dir or os.environ.get("SETTLE_KEEP_TMP") == "1":
                self.tmp.keep = True
                if not self.quiet:
                    print(f"harness: kept {self.dir}", file=sys.stderr)
            self.tmp.cleanup()
            self.tmp = None
        if self in _live:
            _live.remove(self)

    def log_path(self, name):
        return os.path.join(self.dir, name)

    def new_log_path(self, name):
        """A fresh log file name under dir/logs for a process called name."""
        self._log_seq += 1
        base = f"{self.log_prefix}{name}" if self.log_prefix else name
        return os.path.join(self.dir, "logs", f"{self._log_seq:03d}-{base}.log")

    # --- redis ---

    @property
    def redis_url(self):
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self):
        """Starts redis-server on self.redis_port with its data in dir (AOF everysec, no RDB
        snapshots), and waits until it answers PING."""
        cmd = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
               "--dir", self.dir, "--save", "", "--appendonly", "yes",
               "--appendfsync", "everysec", "--daemonize", "no",
               "--logfile", self.log_path("redis.log")]
        self._redis_proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL,
                                            start_new_session=True)
        if self.redis is None:
            self.redis = redis.Redis(host="127.0.0.1", port=self.redis_port,
                                     decode_responses=False, socket_timeout=10,
                                     socket_connect_timeout=2)
        else:
            # Connections from before a restart are dead: drop them so the next command
            # connects afresh instead of failing once.
            self.redis.connection_pool.disconnect()

        def ready():
            if self._redis_proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._redis_proc.returncode}:\n"
                                   + tail(self.log_path("redis.log"), 20))
            return self.redis.ping()

        wait_until(ready, START_TIMEOUT_S, 0.05, "redis-server to answer PING")

    def stop_redis(self):
        """SIGTERM (redis flushes the AOF and exits), bounded wait, then SIGKILL."""
        if self._redis_proc is None:
            return None
        if self.redis is not None:
            self.redis.connection_pool.disconnect()
        rc = _stop_popen(self._redis_proc, "redis-server")
        self._redis_proc = None
        return rc

    def restart_redis(self, down_s=0.0):
        """Stops redis-server with SIGTERM (the AOF is flushed), optionally stays down for
        down_s seconds, then starts it again on the same port and directory."""
        self.stop_redis()
        if down_s:
            time.sleep(down_s)
        self.start_redis()

    def redis_pid(self):
        return self._redis_proc.pid if self._redis_proc else None

    # --- PostgreSQL ---

    @property
    def database_url(self):
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/settle"

    def _pg_cmd(self, args):
        """args run as the PostgreSQL user (runuser when we are root)."""
        if self.pg_user:
            return ["runuser", "-u", self.pg_user, "--", *args]
        return list(args)

    def _pg_run(self, args, what, timeout=120):
        env = dict(os.environ, LC_ALL="C", LANG="C")
        r = subprocess.run(self._pg_cmd(args), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                           timeout=timeout, start_new_session=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed ({r.returncode}):\n"
                               + r.stdout.decode("utf-8", "replace")[-3000:])
        return r

    def _initdb(self):
        self._pg_run([f"{PG_BIN}/initdb", "-D", self.log_path("pg"), "-A", "trust",
                      "-U", "postgres", "--no-sync", "-E", "UTF8", "--no-locale"], "initdb")

    def start_postgres(self):
        """pg_ctl start on self.pg_port (loopback only, socket in dir), waits until ready and
        opens self.pg."""
        opts = (f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -k {self.dir} "
                "-c fsync=off -c max_connections=200")
        self._pg_run([f"{PG_BIN}/pg_ctl", "-D", self.log_path("pg"), "-o", opts,
                      "-l", self.log_path("pg.log"), "-w", "-t", str(int(START_TIMEOUT_S)),
                      "start"], "pg_ctl start")
        self._pg_running = True
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.close()
            self._pg = None
        wait_until(lambda: self._connect("postgres"), START_TIMEOUT_S, 0.1,
                   "PostgreSQL to accept connections")

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.log_path("pg"), "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def stop_postgres(self):
        """pg_ctl stop -m fast; if the postmaster is still there afterwards, SIGKILL it."""
        if not self._pg_running:
            return
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.close()
            self._pg = None
        pid = self.postmaster_pid()
        try:
            self._pg_run([f"{PG_BIN}/pg_ctl", "-D", self.log_path("pg"), "-m", "fast", "-w",
                          "-t", str(int(STOP_TIMEOUT_S * 3)), "stop"], "pg_ctl stop",
                         timeout=STOP_TIMEOUT_S * 4)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"harness: {e}", file=sys.stderr)
        # Make sure, by the PID PostgreSQL recorded, and only if it is still a postgres.
        if pid and not _reap(pid, STOP_TIMEOUT_S) and "postgres" in _pid_cmdline(pid):
            print(f"harness: postmaster {pid} still running after pg_ctl stop; SIGKILL",
                  file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid, STOP_TIMEOUT_S)
        self._pg_running = False

    def _connect(self, dbname):
        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres",
                                dbname=dbname, connect_timeout=5)
        conn.autocommit = True
        if dbname == "postgres":
            conn.close()
            return True
        return conn

    def _createdb(self):
        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres",
                                dbname="postgres", connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CREATE DATABASE settle")
        finally:
            conn.close()

    @property
    def pg(self):
        """The psycopg2 connection to database settle (autocommit), reopened when closed."""
        if self._pg is None or self._pg.closed:
            self._pg = self._connect("settle")
        return self._pg

    def sql(self, query, params=None):
        """Runs one statement; returns all rows (list of tuples), or [] when it returns none."""
        with self.pg.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def sql_value(self, query, params=None):
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    # --- PG simulator ---

    @property
    def gateway_url(self):
        return f"http://127.0.0.1:{self.pgsim_port}"

    def start_pgsim(self):
        """Starts `settle pgsim` on an ephemeral port (it writes the port to a file) and waits
        until /healthz answers 200."""
        port_file = self.log_path("pgsim.port")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(port_file)
        cmd = [settle_bin(), "pgsim", "--listen", "127.0.0.1:0", "--port-file", port_file,
               "--profile", self.pgsim_profile, "--seed", str(self.pgsim_seed),
               *self.pgsim_args]
        self._pgsim_log = open(self.log_path("pgsim.log"), "ab")
        self._pgsim_proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                            stdout=self._pgsim_log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self._child_env())

        def port_known():
            if self._pgsim_proc.poll() is not None:
                raise RuntimeError(f"settle pgsim exited with {self._pgsim_proc.returncode}:\n"
                                   + tail(self.log_path("pgsim.log"), 30))
            try:
                with open(port_file) as f:
                    text = f.read().strip()
            except FileNotFoundError:
                return None
            # Accept "PORT" or "HOST:PORT"; a half-written file just fails this poll.
            tail_part = text.rsplit(":", 1)[-1]
            return int(tail_part) if tail_part.isdigit() else None

        self.pgsim_port = wait_until(port_known, START_TIMEOUT_S, 0.05, "pgsim's port file")
        wait_until(lambda: http("GET", self.gateway_url + PGSIM_HEALTH, timeout=2).status == 200,
                   START_TIMEOUT_S, 0.05, "pgsim /healthz")
        if self._pgsim_faults is None:
            self._pgsim_faults = self._admin("GET", "/faults")

    def stop_pgsim(self):
        if self._pgsim_proc is None:
            return None
        try:
            return _stop_popen(self._pgsim_proc, "settle pgsim")
        finally:
            self._pgsim_proc = None
            if self._pgsim_log:
                self._pgsim_log.close()
                self._pgsim_log = None

    def pgsim_pid(self):
        return self._pgsim_proc.pid if self._pgsim_proc else None

    def _admin(self, method, path, body=None):
        """One admin call; fails the test unless it answers 2xx with meta.result SUCCESS.
        Returns the answer's "data"."""
        r = http(method, self.gateway_url + PGSIM_ADMIN + path, body=body)
        answer = None
        with contextlib.suppress(ValueError):
            answer = r.json
        if r.status // 100 != 2 or not isinstance(answer, dict) or \
                (answer.get("meta") or {}).get("result") != "SUCCESS":
            raise AssertionError(f"pgsim admin {method} {path} -> {r.status}: {r.body[:500]!r}")
        return answer.get("data")

    def admin_create_tx(self, **fields):
        """Creates a payment directly in the simulator's store. Fields in snake_case or the
        API's camelCase: user_id, order_id, amount, status (PENDING|SUCCESS|FAILED), reason,
        card_type, card_no, transaction_key, created_at (epoch ms), final_status,
        final_after_ms. Returns the admin view of the payment; its key is
        ["transactionKey"]."""
        return self._admin("POST", "/transactions", _camel(fields))

    def admin_inject(self, match, status, count=1, delay_ms=0, retry_after_s=None, body=None):
        """The next `count` API requests whose target (path + "?" + query) contains `match`
        are answered with HTTP `status` after delay_ms, with an optional Retry-After (seconds)
        and body (a dict is JSON-encoded; a status below 400 needs one). Injections run before
        any effect, so an injected answer never changes the simulator's payments."""
        rule = {"match": match, "status": status, "count": count, "delayMs": delay_ms}
        if retry_after_s is not None:
            rule["retryAfterS"] = retry_after_s
        if body is not None:
            rule["body"] = body if isinstance(body, str) else json.dumps(body)
        return self._admin("POST", "/inject", rule)

    def admin_faults(self, **settings):
        """Without arguments returns the fault profile; with some (fail_rate, slow_rate,
        slow_ms, latency_min_ms, latency_max_ms, or their camelCase names) changes it and
        returns the new one. The per-test reset restores the profile the cluster started
        with."""
        if not settings:
            return self._admin("GET", "/faults")
        return self._admin("POST", "/faults", _camel(settings))

    def admin_requests(self, since=None):
        """The simulator's request log, oldest first: a list of {seq, method, path, query,
        userId, idempotencyKey, status, faulted, replayed, ts_ms}; with since, only the
        entries whose seq is greater."""
        q = "" if since is None else "?" + urllib.parse.urlencode({"since": since})
        return self._admin("GET", "/requests" + q)["requests"]

    def admin_effects(self, key):
        """What happened to one payment: {transactionKey, cancelEffects, cancelledAmount,
        balanceAmount, status, idempotencyKeys, cancelReason}."""
        return self._admin("GET", "/effects?" + urllib.parse.urlencode({"transactionKey": key}))

    def admin_stats(self):
        return self._admin("GET", "/stats")

    def admin_reset(self):
        """Forgets every payment, injection, logged request and counter, and restores the
        fault profile the cluster started with (the simulator itself keeps the current one)."""
        self._admin("POST", "/reset", {})
        if self._pgsim_faults is not None:
            self._admin("POST", "/faults", self._pgsim_faults)

    @staticmethod
    def tx_key_of(answer):
        """The transaction key in a simulator answer: the admin view, or an API answer
        {"meta": ..., "data": {"transactionKey": ...}}."""
        if isinstance(answer, dict):
            for obj in (answer.get("data"), answer):
                if isinstance(obj, dict) and isinstance(obj.get("transactionKey"), str):
                    return obj["transactionKey"]
        raise AssertionError(f"no transactionKey in {answer!r}")

    def api(self, method, path, user_id=None, body=None, headers=None, timeout=10.0):
        """A request to the simulator's public API (/api/v1/...), with X-USER-ID if given."""
        hdrs = dict(headers or {})
        if user_id is not None:
            hdrs["X-USER-ID"] = user_id
        return http(method, self.gateway_url + path, body=body, headers=hdrs, timeout=timeout)

    def pg_pay(self, user_id, order_id, amount, card_type="SAMSUNG",
               card_no="1234-5678-9814-1451", callback_url=None):
        """POST /api/v1/payments as a shop would (seed 001). Returns the Response."""
        body = {"orderId": order_id, "cardType": card_type, "cardNo": card_no,
                "amount": amount,
                "callbackUrl": callback_url or "http://localhost:8080/api/v1/payments/callback"}
        return self.api("POST", "/api/v1/payments", user_id=user_id, body=body)

    # --- settle ---

    def _child_env(self):
        """os.environ without inherited SETTLE_* settings and proxies (libcurl would send
        loopback traffic through a developer's http_proxy)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SETTLE_") and k.lower() not in
               ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env["SETTLE_BIN"] = os.environ.get("SETTLE_BIN", "")
        return env

    def env_for_worker(self, **overrides):
        """The environment for a settle process: connection URLs, namespace, a fresh metrics
        port, debug logs and timeouts small enough for tests. overrides use the variable name
        (SETTLE_LEASE_MS=3000) or its short form (lease_ms=3000); None removes a variable."""
        env = self._child_env()
        env.update({
            "SETTLE_REDIS_URL": self.redis_url if self.redis_port else "",
            "SETTLE_DATABASE_URL": self.database_url if self.pg_port else "",
            "SETTLE_GATEWAY_URL": self.gateway_url if self.pgsim_port else "",
            "SETTLE_NAMESPACE": NAMESPACE,
            "SETTLE_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            "SETTLE_LOG_LEVEL": "debug",
            "SETTLE_RETRY_BASE_MS": "50",
            "SETTLE_RETRY_CAP_MS": "200",
            "SETTLE_LEASE_MS": "2000",
            "SETTLE_REAPER_INTERVAL_MS": "200",
            "SETTLE_GATEWAY_TIMEOUT_MS": "500",
            "SETTLE_GATEWAY_CONNECT_TIMEOUT_MS": "200",
            "SETTLE_GATEWAY_SLOWEST_MS": "1000",
            "SETTLE_PAYMENT_WINDOW_MS": "5000",
            "SETTLE_CHECK_SCHEDULE_MS": "200,400",
            "SETTLE_SHUTDOWN_GRACE_MS": "5000",
            # The scheduled tasks (README "Scheduled work") act on every old PENDING order,
            # and with the 5 s payment window above that is every test's orders; tests of
            # other things keep them off, test_tasks.py turns them on.
            "SETTLE_SCHEDULER": "off",
        })
        for key, value in overrides.items():
            name = key if key.startswith("SETTLE_") else "SETTLE_" + key.upper()
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        return env

    def run_settle(self, args, env=None, input=None, timeout=30):
        """Runs `settle args...` to completion. Returns a CompletedProcess with text
        stdout/stderr (undecodable bytes replaced)."""
        data = input.encode() if isinstance(input, str) else input
        r = subprocess.run([settle_bin(), *[str(a) for a in args]],
                           env=env if env is not None else self.env_for_worker(),
                           input=data, stdin=None if data is not None else subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           check=False)
        r.stdout = r.stdout.decode("utf-8", "replace")
        r.stderr = r.stderr.decode("utf-8", "replace")
        return r

    def check_settle(self, args, env=None, input=None, timeout=30):
        """run_settle that fails the test on a non-zero exit, showing the output."""
        r = self.run_settle(args, env=env, input=input, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"settle {' '.join(map(str, args))} exited {r.returncode}\n"
                                 f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}")
        return r

    def migrate(self, env=None):
        return self.check_settle(["migrate"], env=env)

    def start_worker(self, env=None, name="worker", args=WORKER_ARGS):
        """Starts `settle work` (args) with env (default env_for_worker()). When another
        running worker already uses env's SETTLE_METRICS_ADDR, this one gets a fresh port,
        so several workers can share one env; the address is in worker.metrics_addr."""
        env = dict(env if env is not None else self.env_for_worker())
        taken = {w.metrics_addr for w in self.workers if w.alive()}
        if env.get("SETTLE_METRICS_ADDR") in taken:
            env["SETTLE_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
        w = Worker(self, env, name, args)
        self.workers.append(w)
        return w

    def stop_workers(self, timeout=15.0):
        """Stops every worker still running (SIGTERM first); returns {name: exit code}."""
        codes = {}
        for w in self.workers:
            if w.alive():
                codes[w.name] = w.stop(timeout=timeout)
        return codes

    # --- fixtures in PostgreSQL ---

    def add_product(self, sku, stock, name=None, price_minor=1000):
        self.sql("INSERT INTO products (sku, name, price_minor, stock) VALUES (%s, %s, %s, %s)",
                 (sku, name if name is not None else sku, price_minor, stock))

    def add_order(self, order_id, user_id, amount, items, age_s=0, status="PENDING",
                  tx_key=None, payment_status="PENDING"):
        """An order created age_s seconds ago with items {sku: qty}; with tx_key also its
        payments row (status payment_status)."""
        with self.pg.cursor() as cur:
            cur.execute("BEGIN")
            try:
                cur.execute("INSERT INTO orders (id, user_id, status, amount_minor, created_at)"
                            " VALUES (%s, %s, %s, %s, now() - make_interval(secs => %s))",
                            (order_id, user_id, status, amount, float(age_s)))
                for sku, qty in items.items():
                    cur.execute("INSERT INTO order_items (order_id, sku, qty) VALUES (%s, %s, %s)",
                                (order_id, sku, qty))
                if tx_key is not None:
                    cur.execute("INSERT INTO payments (order_id, transaction_key, user_id,"
                                " amount_minor, status) VALUES (%s, %s, %s, %s, %s)",
                                (order_id, tx_key, user_id, amount, payment_status))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def order(self, order_id):
        """orders row as a dict, or None."""
        with self.pg.cursor() as cur:
            cur.execute("SELECT * FROM orders WHERE id = %s", (order_id,))
            row = cur.fetchone()
            return dict(zip([d[0] for d in cur.description], row)) if row else None

    def order_status(self, order_id):
        return self.sql_value("SELECT status FROM orders WHERE id = %s", (order_id,))

    def product_stock(self, sku):
        return self.sql_value("SELECT stock FROM products WHERE sku = %s", (sku,))

    def job_log(self, order_id=None):
        """job_log rows (dicts), optionally of one order, oldest first."""
        q = "SELECT * FROM job_log"
        params = None
        if order_id is not None:
            q += " WHERE order_id = %s"
            params = (order_id,)
        with self.pg.cursor() as cur:
            cur.execute(q + " ORDER BY finished_at, job_id", params)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    # --- Redis helpers ---

    @staticmethod
    def key(suffix):
        """The Redis key "{settle}:suffix"."""
        return f"{{{NAMESPACE}}}:{suffix}"

    def push_job(self, queue, job):
        """LPUSHes one job (a dict is JSON-encoded; bytes/str go as they are) onto the ready
        list of queue. Returns the list length."""
        if isinstance(job, (dict, list)):
            raw = json.dumps(job).encode()
        elif isinstance(job, str):
            raw = job.encode()
        else:
            raw = job
        return self.redis.lpush(self.key(f"queue:{queue}"), raw)

    def dlq_entries(self):
        """The DLQ envelopes, parsed (an entry that is not JSON is returned as {"raw": bytes})."""
        out = []
        for raw in self.redis.lrange(self.key("dead"), 0, -1):
            try:
                out.append(json.loads(raw))
            except ValueError:
                out.append({"raw": raw})
        return out

    def queue_depths(self, queue="reconcile"):
        return {
            "ready": self.redis.llen(self.key(f"queue:{queue}")),
            "delayed": self.redis.zcard(self.key(f"delayed:{queue}")),
            "inflight": self.redis.zcard(self.key(f"inflight:{queue}")),
            "dead": self.redis.llen(self.key("dead")),
        }

    def stock_available(self, sku):
        v = self.redis.get(self.key(f"stock:{sku}"))
        return None if v is None else int(v)

    def resv_state(self, order_id):
        v = self.redis.hget(self.key(f"resv:{order_id}"), "state")
        return None if v is None else v.decode()

    def reserve(self, order_id, items, ttl_ms=60000):
        """`settle stock reserve ORDER SKU:QTY... --ttl-ms N`; returns the CompletedProcess
        (the caller checks the exit code: refusing a reservation is not an error here)."""
        args = ["stock", "reserve", order_id, *[f"{s}:{q}" for s, q in items.items()],
                "--ttl-ms", str(ttl_ms)]
        return self.run_settle(args)

    def stock_load(self):
        """`settle stock load`: Redis available = on hand - active reservations."""
        return self.check_settle(["stock", "load"])

    # --- per-test reset ---

    def reset(self):
        """Returns the servers to a clean state between tests: workers stopped, Redis
        flushed, every table but the migration record truncated, the simulator reset."""
        self.stop_workers()
        self.workers = []
        if self.redis is not None and self._redis_proc is None:
            self.start_redis()  # a test left it stopped
        if self.want_postgres and not self._pg_running:
            self.start_postgres()
        if self.redis is not None:
            self.redis.flushall()
        if self._pg_running:
            tables = [r[0] for r in self.sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                if r[0] not in KEEP_TABLES]
            if tables:
                self.sql("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) +
                         " RESTART IDENTITY CASCADE")
        if self.want_pgsim:
            if self._pgsim_proc is None or self._pgsim_proc.poll() is not None:
                self.stop_pgsim()
                self.start_pgsim()
            self.admin_reset()

    SERVER_LOGS = ("redis.log", "pg.log", "pgsim.log")

    def mark_logs(self):
        """Remembers where the server logs end now, so that failure_report shows only what
        was written after this point (the current test's part)."""
        self._log_marks = {}
        for name in self.SERVER_LOGS:
            with contextlib.suppress(OSError):
                self._log_marks[name] = os.path.getsize(self.log_path(name))

    def failure_report(self, worker_lines=LOG_TAIL_LINES):
        """Worker logs and the server logs since mark_logs (their last lines), for a failed
        test."""
        parts = []
        for w in self.workers:
            parts.append(f"----- worker {w.name} (pid {w.pid}, {w.log_path}) -----\n"
                         + tail(w.log_path, worker_lines))
        for name in self.SERVER_LOGS:
            path = self.log_path(name)
            if os.path.exists(path):
                start = getattr(self, "_log_marks", {}).get(name, 0)
                parts.append(f"----- {name} (since the test started) -----\n"
                             + tail(path, LOG_TAIL_LINES, start))
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# The runner


class TestTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise TestTimeout("test exceeded its time limit")


def timeout(seconds):
    """Decorator: a per-test time limit other than DEFAULT_TEST_TIMEOUT_S."""
    def deco(fn):
        fn.timeout_s = seconds
        return fn
    return deco


DEFAULT_TEST_TIMEOUT_S = 120
# The whole file must end before ctest's TIMEOUT (600 s in CMakeLists.txt) kills it, so that
# the cleanup and the summary still happen: tests that would start after this budget are
# reported as failed instead, and a test's own limit is cut to what is left.
FILE_BUDGET_S = float(os.environ.get("SETTLE_IT_BUDGET_S", "540"))


def main(ns, migrate=True, **cluster_kwargs):
    """Runs the test_* functions of a module (in definition order) against one Cluster,
    resetting it before each test. argv may name tests to run. On a failure prints the
    traceback, worker logs and server log tails. The last line is "N passed, N failed";
    the exit status is 1 when anything failed."""
    tests = [(n, f) for n, f in ns.items() if n.startswith("test_") and callable(f)]
    wanted = sys.argv[1:]
    if wanted:
        unknown = [w for w in wanted if w not in dict(tests)]
        if unknown:
            print(f"unknown test(s): {', '.join(unknown)}", file=sys.stderr)
            print(f"0 passed, {len(unknown)} failed")
            sys.exit(1)
        tests = [(n, f) for n, f in tests if n in wanted]

    passed = failed = 0
    signal.signal(signal.SIGALRM, _on_alarm)
    started = time.monotonic()
    try:
        cluster = Cluster(**cluster_kwargs)
        cluster.start()
    except Exception:
        traceback.print_exc(file=sys.stdout)
        print(f"0 passed, {len(tests)} failed")
        sys.exit(1)
    try:
        if migrate:
            try:
                cluster.migrate()
            except Exception:
                traceback.print_exc(file=sys.stdout)
                print(cluster.failure_report())
                print(f"0 passed, {len(tests)} failed")
                sys.exit(1)
        for name, fn in tests:
            t0 = time.monotonic()
            ok = False
            left = FILE_BUDGET_S - (t0 - started)
            limit = min(getattr(fn, "timeout_s", DEFAULT_TEST_TIMEOUT_S), left)
            if limit < 1:
                failed += 1
                print(f"FAIL {name} (not run: the file's {FILE_BUDGET_S:g} s budget is used up)",
                      flush=True)
                continue
            try:
                cluster.log_prefix = name + "."
                cluster.reset()
                cluster.mark_logs()
                signal.alarm(max(1, int(limit)))
                try:
                    fn(cluster)
                finally:
                    signal.alarm(0)
                # Workers a test left running are stopped here; a sanitizer report in any
                # worker log fails the test even when its assertions passed.
                cluster.stop_workers()
                reports = []
                for w in cluster.workers:
                    reports += sanitizer_reports(w.log_text())
                if reports:
                    raise AssertionError("sanitizer report(s) in worker logs: "
                                         + "; ".join(reports[:5]))
                ok = True
            except Exception:
                traceback.print_exc(file=sys.stdout)
            finally:
                signal.alarm(0)
            dt = time.monotonic() - t0
            if ok:
                passed += 1
                print(f"PASS {name} ({dt:.1f} s)", flush=True)
            else:
                failed += 1
                print(f"FAIL {name} ({dt:.1f} s)", flush=True)
                with contextlib.suppress(Exception):
                    cluster.stop_workers()
                print(cluster.failure_report(), flush=True)
    finally:
        if failed:
            cluster.keep_dir = cluster.keep_dir or os.environ.get("SETTLE_KEEP_TMP") == "1"
        cluster.stop()
    print(f"({time.monotonic() - started:.1f} s)")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
