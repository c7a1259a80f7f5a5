"""test_security.py - the security checks of issue 7 section 4, as tests.

(a) Secrets and card data stay out of every output. A run with jobs that carry full card
    numbers (in free-text and unknown fields, and in a job that is not even JSON) and PG
    payments that carry them (cardNo, a decline reason, an error message) is captured whole:
    every worker's stdout+stderr and the output of `settle dlq list`, `dlq list --json`,
    `stats`, `stats --json`, `stock show` and `config`. No full card number appears in any
    form (digits only, with dashes or spaces, or its first 12 digits), nor in the rows and
    DLQ errors settle writes. The worker talks to a Redis that requires a password
    (redis-server --requirepass, started here) and to PostgreSQL as a role with a
    scram-sha-256 password; neither password appears anywhere, `settle config` shows "***",
    and the *_FILE secret variables work. Every redaction form libpq accepts for a password
    (URI userinfo, ?password=, key=value) is checked through `settle config`.
(b) Forged input cannot move money. Reconcile jobs whose PG answer names another order or
    another amount, jobs for someone else's order, a job with a transaction key the order
    never had, and refund jobs for payments that are not SUCCESS or not theirs all end in the
    DLQ (or leave the order alone) and change nothing: orders, payments, refunds, stock in
    PostgreSQL and Redis, and the simulator saw no cancel.
(c) https to the PG verifies certificates: a local TLS server with a self-signed certificate
    (which would answer SUCCESS) is refused; the job is retried and dead-lettered as
    gateway_unavailable with a certificate error, and the order stays PENDING.
(d) SQL only through parameters, Lua only through KEYS/ARGV: proved by the metacharacter rows
    of tests/integration/test_bad_input.py (HOSTILE_JOBS: DROP TABLE, OR '1'='1', LIKE
    wildcards, backslash, dollar quotes, {settle} hash tags, globs, CRLF FLUSHALL, Lua
    quotes), which also check that every table and row survives and Redis was not flushed."""

import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import psycopg2  # noqa: E402
import redis  # noqa: E402

REDIS_PW = "Xr7-redisPW-q9z"
DB_USER = "settle_sec"
DB_PW = "Yq4-dbPW-k2m"

# Luhn-valid test card numbers, in the forms someone could paste them.
CARD_A = "4556737586899855"
CARD_B = "5425233430109903"
CARD_PG = "4916-3385-0608-2832"  # what the simulator stores as cardNo


def card_forms(card):
    digits = card.replace("-", "").replace(" ", "")
    groups = [digits[i:i + 4] for i in range(0, 16, 4)]
    return [digits, "-".join(groups), " ".join(groups)]


ALL_CARDS = [CARD_A, CARD_B, CARD_PG]


def find_cards(text):
    """Every planted card number found in text: in any separator form, or its first 12 digits
    (only the last four may survive masking) once separators are removed."""
    hits = []
    squeezed = re.sub(r"[ \-]", "", text)
    for card in ALL_CARDS:
        digits = card.replace("-", "")
        for form in card_forms(card):
            if form in text:
                hits.append(form)
        if digits[:12] in squeezed:
            hits.append(digits[:12] + "....")
    return hits


# --------------------------------------------------------------------------------------------
# A password-protected Redis and a password-protected PostgreSQL role


class SecureRedis:
    """redis-server --requirepass on a free loopback port inside the cluster's directory,
    stopped by PID."""

    def __init__(self, c, password=REDIS_PW):
        self.port = harness.free_port()
        self.dir = os.path.join(c.dir, f"secure-redis-{self.port}")
        os.makedirs(self.dir)
        self.log = os.path.join(self.dir, "redis.log")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--requirepass", password,
             "--daemonize", "no", "--logfile", self.log],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, password=password,
                                  socket_timeout=10, socket_connect_timeout=2)
        harness.wait_until(self._ready, harness.START_TIMEOUT_S, 0.05,
                           "the password-protected redis-server to answer")

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError("redis-server exited: " + harness.tail(self.log, 20))
        return self.client.ping()

    def url(self, password=REDIS_PW):
        return f"redis://:{password}@127.0.0.1:{self.port}/0"

    def stop(self):
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect()
        harness._stop_popen(self.proc, "secure redis-server")


def ensure_db_role(c):
    """A role that must log in with a scram-sha-256 password (a pg_hba.conf line ahead of
    the harness's trust lines, for this role only), with the rights a worker needs."""
    hba = os.path.join(c.dir, "pg", "pg_hba.conf")
    line = f"host all {DB_USER} 127.0.0.1/32 scram-sha-256\n"
    with open(hba) as f:
        text = f.read()
    if line not in text:
        with open(hba, "w") as f:
            f.write(line + text)
        c.sql("SELECT pg_reload_conf()")
    exists = c.sql_value("SELECT count(*) FROM pg_roles WHERE rolname = %s", (DB_USER,))
    if not exists:
        c.sql(f"SET password_encryption = 'scram-sha-256'; "
              f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{DB_PW}'")
    c.sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {DB_USER}; "
          f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {DB_USER}; "
          f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {DB_USER}")

    def login(password):
        conn = psycopg2.connect(host="127.0.0.1", port=c.pg_port, user=DB_USER,
                                password=password, dbname="settle", connect_timeout=5)
        conn.close()
        return True

    # The password is really required, and really works.
    harness.wait_until(lambda: login(DB_PW), 10, what="the new role to log in")
    try:
        login("wrong-password")
    except psycopg2.OperationalError:
        pass
    else:
        raise AssertionError("PostgreSQL accepted a wrong password: the hba line is not active")


def db_url(c, password=DB_PW):
    return f"postgresql://{DB_USER}:{password}@127.0.0.1:{c.pg_port}/settle"


def secure_env(c, sr, **overrides):
    env = c.env_for_worker(**overrides)
    env["SETTLE_REDIS_URL"] = sr.url()
    env["SETTLE_DATABASE_URL"] = db_url(c)
    return env


def push(client, queue, job):
    raw = job if isinstance(job, bytes) else json.dumps(job).encode()
    client.lpush(f"{{{harness.NAMESPACE}}}:queue:{queue}", raw)


def dlq(client):
    return [json.loads(x) for x in client.lrange(f"{{{harness.NAMESPACE}}}:dead", 0, -1)]


def cli_outputs(c, env, commands):
    """{command: stdout+stderr} of each settle command run with env."""
    out = {}
    for args in commands:
        r = c.run_settle(args, env=env)
        out[" ".join(args)] = f"(exit {r.returncode})\n{r.stdout}\n{r.stderr}"
    return out


def assert_clean(outputs, secrets=(REDIS_PW, DB_PW)):
    """No planted card number and no password in any of the named outputs."""
    problems = []
    for name, text in outputs.items():
        for hit in find_cards(text):
            problems.append(f"{name}: card number {hit!r}")
        for s in secrets:
            if s in text:
                problems.append(f"{name}: password {s!r}")
    assert not problems, "secrets found in output:\n" + "\n".join(problems[:30])


# --------------------------------------------------------------------------------------------
# (a) Secrets and card data


@harness.timeout(120)
def test_no_card_number_or_password_in_any_output(c):
    sr = SecureRedis(c)
    try:
        ensure_db_role(c)
        env = secure_env(c, sr, retry_max_attempts=2)
        c.add_product("sku-s", 50)
        orders = {"order-ok": "SUCCESS", "order-declined": "FAILED", "order-rejected": "SUCCESS",
                  "order-refund": None, "order-declined-tabs": "FAILED"}
        for o in orders:
            c.add_order(o, "u1", 5000, {"sku-s": 1},
                        status="COMPLETED" if o == "order-refund" else "PENDING")
        c.check_settle(["stock", "load"], env=env)
        for o in ("order-ok", "order-declined", "order-rejected", "order-declined-tabs"):
            c.check_settle(["stock", "reserve", o, "sku-s:1"], env=env)
        keys = {}
        keys["order-ok"] = c.tx_key_of(c.admin_create_tx(
            user_id="u1", order_id="order-ok", amount=5000, status="SUCCESS",
            card_type="SAMSUNG", card_no=CARD_PG))
        keys["order-declined"] = c.tx_key_of(c.admin_create_tx(
            user_id="u1", order_id="order-declined", amount=5000, status="FAILED",
            card_no=CARD_PG, reason=f"card {CARD_PG} declined (also {CARD_A})"))
        # The card split by control characters (tabs), which become spaces when stored.
        keys["order-declined-tabs"] = c.tx_key_of(c.admin_create_tx(
            user_id="u1", order_id="order-declined-tabs", amount=5000, status="FAILED",
            card_no=CARD_PG, reason="card " + "\t".join(card_forms(CARD_B)[2].split()) +
            " declined"))
        keys["order-rejected"] = c.tx_key_of(c.admin_create_tx(
            user_id="u1", order_id="order-rejected", amount=5000, status="SUCCESS",
            card_no=CARD_PG))
        keys["order-refund"] = c.tx_key_of(c.admin_create_tx(
            user_id="u1", order_id="order-refund", amount=5000, status="SUCCESS",
            card_no=CARD_PG))
        c.sql("INSERT INTO payments (order_id, transaction_key, user_id, amount_minor, status) "
              "VALUES ('order-refund', %s, 'u1', 5000, 'SUCCESS')", (keys["order-refund"],))
        # A PG that echoes the card in a 4xx error message, its groups split by tabs.
        c.admin_inject(keys["order-rejected"], 400, count=5, body={
            "meta": {"result": "FAIL", "errorCode": "Bad Request",
                     "message": "card " + "\t".join(card_forms(CARD_A)[2].split()) +
                                " is blocked"}, "data": None})

        # Jobs that carry card numbers: unknown fields of good jobs, a refund's free-text
        # reason, an ill-typed job and a job that is not JSON at all (the decoder's error
        # sentence must not quote it).
        push(sr.client, "reconcile", {"order_id": "order-ok", "user_id": "u1",
                                      "transaction_key": keys["order-ok"],
                                      "card_number": CARD_A,
                                      "payment": {"card": card_forms(CARD_B)[2]}})
        push(sr.client, "reconcile", {"order_id": "order-declined", "user_id": "u1",
                                      "card": card_forms(CARD_A)[1]})
        push(sr.client, "reconcile", {"order_id": "order-declined-tabs", "user_id": "u1",
                                      "transaction_key": keys["order-declined-tabs"]})
        push(sr.client, "reconcile", {"order_id": "order-rejected", "user_id": "u1",
                                      "transaction_key": keys["order-rejected"]})
        push(sr.client, "refund", {"order_id": "order-refund", "user_id": "u1",
                                   "transaction_key": keys["order-refund"], "amount": 100,
                                   "reason": f"duplicate charge on card {card_forms(CARD_B)[1]}"})
        push(sr.client, "reconcile", {"order_id": 42, "user_id": "u1", "card": CARD_A})
        push(sr.client, "reconcile", ('{"order_id": "order-x", "user_id": "u1", "card": '
                                      + CARD_B + "x}").encode())
        push(sr.client, "reconcile", ('{"card": ' + CARD_A + ', "order_id": ').encode())
        # Malformed JSON whose error points at a card number: the parser's "near '...'"
        # quote of the offending token must not carry it into the DLQ error and the log.
        push(sr.client, "reconcile", ('{"order_id": "order-x", "user_id": "u1", "cards": ['
                                      + CARD_A + " " + CARD_B + "]}").encode())
        push(sr.client, "reconcile", ('{"order_id": "order-x", "user_id": "u1", "note": "card '
                                      + CARD_B + '\x01"}').encode())

        w = c.start_worker(env)
        harness.wait_until(lambda: c.order_status("order-ok") == "COMPLETED", 30,
                           what="order-ok to complete")
        for o in ("order-declined", "order-declined-tabs"):
            harness.wait_until(lambda o=o: c.order_status(o) == "FAILED", 30,
                               what=f"{o} to fail")
        harness.wait_until(lambda: len(dlq(sr.client)) >= 6, 30,
                           what=f"6 DLQ entries: {[e.get('reason') for e in dlq(sr.client)]}")
        harness.wait_until(lambda: c.sql_value(
            "SELECT state FROM refunds WHERE order_id = 'order-refund'") == "SUCCEEDED", 30,
            what="the refund to succeed")
        reasons = sorted(e["reason"] for e in dlq(sr.client))
        assert reasons == ["gateway_rejected"] + ["invalid_job"] * 5, reasons
        assert w.alive()

        outputs = cli_outputs(c, env, [["dlq", "list"], ["dlq", "list", "--json"],
                                       ["stats"], ["stats", "--json"], ["stock", "show"],
                                       ["config"]])
        assert w.stop() == 0
        outputs["worker log"] = w.log_text()
        # The job texts themselves are kept byte for byte in the DLQ (README: nothing is
        # trimmed), so `dlq list --json` shows a producer's own card number inside "job";
        # everything settle wrote around it (error, reason, ...) must be clean.
        listed = json.loads(outputs.pop("dlq list --json").split("\n", 1)[1])
        outputs["dlq list --json without the producers' job texts"] = json.dumps(
            [{k: v for k, v in e.items() if k != "job"} for e in listed])
        # What settle stored from PG answers and errors.
        outputs["orders"] = repr(c.sql("SELECT id, status, failure_reason FROM orders"))
        outputs["payments"] = repr(c.sql("SELECT order_id, status, reason, card_type, card_last4 "
                                         "FROM payments"))
        outputs["job_log"] = repr(c.sql("SELECT job_id, result, last_error FROM job_log"))
        outputs["refunds"] = repr(c.sql("SELECT id, state, pg_status, failure_reason "
                                        "FROM refunds"))
        outputs["DLQ errors"] = repr([e.get("error") for e in dlq(sr.client)])
        assert_clean(outputs)
        assert "***" in outputs["config"], outputs["config"]
        assert c.sql_value("SELECT card_last4 FROM payments WHERE order_id = 'order-ok'") == \
            CARD_PG[-4:]
    finally:
        sr.stop()


@harness.timeout(90)
def test_secret_files_work_and_wrong_passwords_are_not_printed(c):
    sr = SecureRedis(c)
    try:
        ensure_db_role(c)
        secrets = os.path.join(c.dir, "secrets")
        os.makedirs(secrets, exist_ok=True)
        redis_file = os.path.join(secrets, "redis_url")
        db_file = os.path.join(secrets, "database_url")
        with open(redis_file, "w") as f:
            f.write(sr.url() + "\n")  # as `echo` writes it
        with open(db_file, "w") as f:
            f.write(db_url(c) + "\r\n")
        os.chmod(redis_file, 0o600)
        os.chmod(db_file, 0o600)
        env = c.env_for_worker(redis_url=None, database_url=None)
        env["SETTLE_REDIS_URL_FILE"] = redis_file
        env["SETTLE_DATABASE_URL_FILE"] = db_file

        c.add_product("sku-f", 5)
        c.add_order("order-f", "u1", 700, {"sku-f": 1})
        c.check_settle(["stock", "load"], env=env)
        c.check_settle(["stock", "reserve", "order-f", "sku-f:1"], env=env)
        key = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id="order-f", amount=700,
                                            status="SUCCESS"))
        push(sr.client, "reconcile", {"order_id": "order-f", "user_id": "u1",
                                      "transaction_key": key})
        w = c.start_worker(env)
        harness.wait_until(lambda: c.order_status("order-f") == "COMPLETED", 30,
                           what="the job to complete through the secret-file URLs")
        outputs = cli_outputs(c, env, [["config"], ["stats"]])
        assert "***" in outputs["config"] and '"SETTLE_REDIS_URL"' in outputs["config"], \
            outputs["config"]
        assert w.stop() == 0
        outputs["worker log"] = w.log_text()

        # Wrong passwords: the worker and the CLI fail, saying why, without the password.
        wrong_redis = "Wr0ng-redisPW-zz"
        wrong_db = "Wr0ng-dbPW-zz"
        bad_env = c.env_for_worker(redis_url=sr.url(wrong_redis),
                                   database_url=db_url(c, wrong_db))
        for args in (["stats"], ["dlq", "list"], ["migrate"]):
            r = c.run_settle(args, env=bad_env)
            assert r.returncode != 0, (args, r.stdout, r.stderr)
            outputs["bad password: " + " ".join(args)] = r.stdout + r.stderr
        # A worker keeps trying (Redis or PostgreSQL may come back); it says why it cannot
        # work, and still stops cleanly.
        bad = c.start_worker(bad_env, name="bad-password")
        harness.wait_until(lambda: "WRONGPASS" in bad.log_text(), 20,
                           what="the worker to log Redis refusing its password")
        bad.stop()
        outputs["bad password: worker log"] = bad.log_text()
        for name in ("bad password: stats", "bad password: migrate"):
            assert outputs[name].strip(), f"{name}: no error message"
        assert "password authentication failed" in outputs["bad password: migrate"], outputs
        assert_clean(outputs, secrets=(REDIS_PW, DB_PW, wrong_redis, wrong_db))
    finally:
        sr.stop()


# Every way libpq accepts a password in SETTLE_DATABASE_URL (psycopg2.extensions.parse_dsn is
# libpq's own PQconninfoParse), and Redis URL forms; `settle config` must show none of them.
REDACTION_CASES = [
    ("uri userinfo", "postgresql://app:PW1-userinfo@db:5432/settle", "PW1-userinfo"),
    ("uri userinfo with encoded @", "postgresql://app:PW2%40enc@db/settle", "PW2%40enc"),
    ("uri ?password=", "postgresql://db/settle?user=app&password=PW3-query", "PW3-query"),
    ("uri ?password= twice", "postgresql://db/settle?password=PW4a&password=PW4-second",
     "PW4-second"),
    ("uri sslpassword", "postgresql://db/settle?sslpassword=PW5-sslkey", "PW5-sslkey"),
    ("conninfo", "host=db user=app password=PW6-conninfo dbname=settle", "PW6-conninfo"),
    ("conninfo quoted", "host=db password='PW7 quoted' dbname=settle", "PW7 quoted"),
    ("conninfo spaced", "host=db password = PW8-spaced", "PW8-spaced"),
    # Found by tests/fuzz/fuzz_config.c (tests/fuzz/regressions/fuzz_config/):
    ("uri ?password= after an @ in the query (Azure-style user@server)",
     "postgresql://db/settle?user=admin@server&password=PW9-after-at", "PW9-after-at"),
    ("uri with a percent-encoded key", "postgresql://db/settle?passwor%64=PW10-enc-key",
     "PW10-enc-key"),
    ("conninfo whose other value holds ://",
     "host=db password=PW11-conninfo application_name=svc://worker", "PW11-conninfo"),
]


def test_config_redacts_every_password_form(c):
    from psycopg2.extensions import parse_dsn
    problems = []
    for name, url, pw in REDACTION_CASES:
        # The case is meaningful: libpq really reads that password from that text (or its
        # percent-decoded form).
        parsed = parse_dsn(url)
        assert parsed.get("password", parsed.get("sslpassword")) in (pw, pw.replace("%40", "@")), \
            (name, parsed)
        env = c.env_for_worker(database_url=url)
        r = c.run_settle(["config"], env=env)
        if r.returncode != 0:
            problems.append(f"{name}: settle config exited {r.returncode}: {r.stderr.strip()}")
            continue
        shown = json.loads(r.stdout)["SETTLE_DATABASE_URL"]
        leaked = [p for p in {pw, pw.replace("%40", "@")} if p in r.stdout + r.stderr]
        if leaked or "***" not in shown:
            problems.append(f"{name}: {url!r} is shown as {shown!r}")
    for url, pw in (("redis://:R1-pass@127.0.0.1:6379/0", "R1-pass"),
                    ("redis://alice:R2-acl@127.0.0.1/1", "R2-acl"),
                    ("redis://:R3@has@at@127.0.0.1:6379/0", "R3@has@at")):
        r = c.run_settle(["config"], env=c.env_for_worker(redis_url=url))
        shown = json.loads(r.stdout)["SETTLE_REDIS_URL"] if r.returncode == 0 else r.stderr
        if pw in r.stdout + r.stderr:
            problems.append(f"redis {url!r} is shown as {shown!r}")
    assert not problems, "passwords shown by `settle config`:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------
# (b) Forged input cannot move money


def reserved_order(c, order_id, user="u1", amount=5000, sku="sku-m"):
    if c.product_stock(sku) is None:
        c.add_product(sku, 20)
    c.add_order(order_id, user, amount, {sku: 1})
    c.stock_load()
    r = c.reserve(order_id, {sku: 1})
    assert r.returncode == 0, r.stdout + r.stderr


def money_state(c):
    """Everything money or stock could change, to compare before and after."""
    return {
        "orders": c.sql("SELECT id, status, refunded_minor, failure_reason FROM orders "
                        "ORDER BY id"),
        "payments": c.sql("SELECT order_id, status, refunded_minor FROM payments ORDER BY 1"),
        "refunds": c.sql("SELECT count(*) FROM refunds"),
        "products": c.sql("SELECT sku, stock FROM products ORDER BY sku"),
        "redis stock": sorted((k, c.redis.get(k)) for k in c.redis.scan_iter(
            match=c.key("stock:*"))),
        "reservations": sorted((k, c.redis.hget(k, "state")) for k in c.redis.scan_iter(
            match=c.key("resv:*")) if not k.endswith(b"deadlines")),
    }


def cancels(c):
    return [r for r in c.admin_requests() if r.get("method") == "POST"]


@harness.timeout(90)
def test_forged_reconcile_jobs_change_nothing(c):
    reserved_order(c, "order-a")
    reserved_order(c, "order-b")
    reserved_order(c, "order-c")
    reserved_order(c, "order-d", user="owner")
    # order-b was really paid; its key is reused on order-a's job (same user, same amount).
    key_b = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id="order-b", amount=5000,
                                          status="SUCCESS"))
    # order-c's PG payment is for 1 minor unit, not 5000.
    key_c = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id="order-c", amount=1,
                                          status="SUCCESS"))
    key_d = c.tx_key_of(c.admin_create_tx(user_id="owner", order_id="order-d", amount=5000,
                                          status="SUCCESS"))
    # An answer forged in flight: SUCCESS for order-a's own key, but naming order-b.
    key_a = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id="order-a", amount=5000,
                                          status="PENDING"))
    c.admin_inject(key_a, 200, count=5, body={
        "meta": {"result": "SUCCESS"},
        "data": {"transactionKey": key_a, "orderId": "order-b", "amount": 5000,
                 "status": "SUCCESS"}})
    before = money_state(c)
    jobs = [
        ({"order_id": "order-a", "user_id": "u1", "transaction_key": key_b}, "gateway_mismatch"),
        ({"order_id": "order-a", "user_id": "u1", "transaction_key": key_a}, "gateway_mismatch"),
        ({"order_id": "order-c", "user_id": "u1", "transaction_key": key_c}, "gateway_mismatch"),
        ({"order_id": "order-d", "user_id": "u1", "transaction_key": key_d}, "order_mismatch"),
        ({"order_id": "order-d", "user_id": "owner' OR '1'='1"}, "order_mismatch"),
    ]
    for job, _ in jobs:
        c.push_job("reconcile", job)
    w = c.start_worker(c.env_for_worker(retry_max_attempts=2))
    harness.wait_until(lambda: len(c.dlq_entries()) >= len(jobs), 30,
                       what=f"{len(jobs)} DLQ entries: {[e['reason'] for e in c.dlq_entries()]}")
    got = sorted((e["job"]["order_id"], e["job"].get("transaction_key", ""), e["reason"])
                 for e in c.dlq_entries())
    want = sorted((j["order_id"], j.get("transaction_key", ""), r) for j, r in jobs)
    assert got == want, got
    assert all(e["error"] for e in c.dlq_entries())
    assert money_state(c) == before
    assert cancels(c) == []
    assert w.alive()


@harness.timeout(60)
def test_unknown_transaction_key_does_not_expire_a_paid_order(c):
    """A job naming a transaction key the order never had must not settle the order on the
    PG's 404 for that key: here the order was really paid under another key (the payment
    callback has not been recorded yet), and the order is past the payment window."""
    c.add_product("sku-k", 10)
    c.add_order("order-k", "u1", 5000, {"sku-k": 1}, age_s=30)  # window is 5 s in tests
    c.stock_load()
    assert c.reserve("order-k", {"sku-k": 1}).returncode == 0
    c.admin_create_tx(user_id="u1", order_id="order-k", amount=5000, status="SUCCESS")
    forged = "../../admin/reset?orderId=order-k#x"
    c.push_job("reconcile", {"order_id": "order-k", "user_id": "u1", "transaction_key": forged})
    c.start_worker()
    harness.wait_until(lambda: c.job_log("order-k"), 20, what="the job to finish")
    # The key went to the PG escaped, as one path segment (not a path, query or fragment).
    asked = [r for r in c.admin_requests() if r.get("method") == "GET"]
    assert asked and asked[0]["path"] == "/api/v1/payments/" + forged and \
        not asked[0].get("query"), asked
    status = c.order_status("order-k")
    assert status != "EXPIRED" and c.resv_state("order-k") == "reserved", \
        (f"a job with a transaction key the order never had expired a paid order: order "
         f"{status} ({c.order('order-k')['failure_reason']}), reservation "
         f"{c.resv_state('order-k')}, job log "
         f"{[(r['result'], r['last_error']) for r in c.job_log('order-k')]}")


@harness.timeout(90)
def test_forged_refunds_change_nothing(c):
    c.add_product("sku-r", 10)
    keys = {}
    for order_id, pay_status, order_status in (("order-failed", "FAILED", "FAILED"),
                                               ("order-pending", "PENDING", "PENDING"),
                                               ("order-paid", "SUCCESS", "COMPLETED"),
                                               ("order-other", "SUCCESS", "COMPLETED")):
        sim_status = "SUCCESS" if pay_status == "SUCCESS" else pay_status
        keys[order_id] = c.tx_key_of(c.admin_create_tx(user_id="u1", order_id=order_id,
                                                       amount=100, status=sim_status))
        c.add_order(order_id, "u1", 100, {"sku-r": 1}, status=order_status,
                    tx_key=keys[order_id], payment_status=pay_status)
    c.stock_load()
    before = money_state(c)
    jobs = [
        ({"order_id": "order-failed", "user_id": "u1", "transaction_key": keys["order-failed"],
          "amount": 100, "restock": True}, "payment_not_refundable"),
        ({"order_id": "order-pending", "user_id": "u1",
          "transaction_key": keys["order-pending"], "restock": True}, "payment_not_refundable"),
        ({"order_id": "order-paid", "user_id": "intruder", "transaction_key": keys["order-paid"],
          "amount": 50}, "order_mismatch"),
        ({"order_id": "order-paid", "user_id": "u1", "transaction_key": keys["order-other"],
          "amount": 50, "restock": True}, "order_mismatch"),
        ({"order_id": "order-paid", "user_id": "u1", "transaction_key": keys["order-paid"],
          "amount": 101}, "exceeds_balance"),
        ({"order_id": "order-nope", "user_id": "u1", "transaction_key": keys["order-paid"],
          "amount": 1}, "order_not_found"),
    ]
    for job, _ in jobs:
        c.push_job("refund", job)
    w = c.start_worker(c.env_for_worker(retry_max_attempts=2))
    harness.wait_until(lambda: len(c.dlq_entries()) >= len(jobs), 40,
                       what=f"{len(jobs)} DLQ entries: {[e['reason'] for e in c.dlq_entries()]}")
    got = sorted((e["job"]["order_id"], e["job"]["transaction_key"], e["job"]["user_id"],
                  e["reason"]) for e in c.dlq_entries())
    want = sorted((j["order_id"], j["transaction_key"], j["user_id"], r) for j, r in jobs)
    assert got == want, got
    assert money_state(c) == before
    assert cancels(c) == [], cancels(c)
    for k in keys.values():
        eff = c.admin_effects(k)
        assert eff["cancelEffects"] == 0 and eff["cancelledAmount"] == 0, eff
    assert w.alive()


# --------------------------------------------------------------------------------------------
# (c) TLS certificates are verified


class _Answer(http.server.BaseHTTPRequestHandler):
    answer = b""
    seen = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.answer)))
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, *args):
        pass


@harness.timeout(90)
def test_https_gateway_with_self_signed_certificate_is_refused(c):
    openssl = shutil.which("openssl")
    assert openssl, "openssl is not installed (Debian package openssl)"
    tls = os.path.join(c.dir, "tls")
    os.makedirs(tls, exist_ok=True)
    cert, pkey = os.path.join(tls, "cert.pem"), os.path.join(tls, "key.pem")
    r = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", pkey,
                        "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, check=False)
    assert r.returncode == 0, r.stdout.decode(errors="replace")

    c.add_product("sku-t", 5)
    c.add_order("order-t", "u1", 5000, {"sku-t": 1})
    c.stock_load()
    assert c.reserve("order-t", {"sku-t": 1}).returncode == 0
    key = "20261121:TR:tls001"
    # The fake PG would say SUCCESS for exactly this order: only certificate verification
    # stands between it and a completed order.
    handler = type("Answer", (_Answer,), {"seen": [], "answer": json.dumps({
        "meta": {"result": "SUCCESS", "errorCode": None, "message": None},
        "data": {"transactionKey": key, "orderId": "order-t", "amount": 5000,
                 "status": "SUCCESS", "cardType": "SAMSUNG",
                 "cardNo": "1234-5678-9814-1451"}}).encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, pkey)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        # The server itself works (for a client that trusts the certificate).
        client_ctx = ssl.create_default_context(cafile=cert)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
                client_ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            t.sendall(b"GET /probe HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            assert b"200" in t.recv(100)
        handler.seen.clear()

        c.push_job("reconcile", {"order_id": "order-t", "user_id": "u1",
                                 "transaction_key": key})
        w = c.start_worker(c.env_for_worker(gateway_url=f"https://127.0.0.1:{port}",
                                            retry_max_attempts=2, gateway_timeout_ms=2000,
                                            gateway_connect_timeout_ms=1000))
        harness.wait_until(lambda: len(c.dlq_entries()) == 1, 30,
                           what="the job to be dead-lettered")
        e = c.dlq_entries()[0]
        assert e["reason"] == "gateway_unavailable", e
        assert e["attempts"] == 2, e
        assert re.search(r"certificate|SSL", e["error"]), e
        assert handler.seen == [], f"an HTTP request got through: {handler.seen}"
        assert c.order_status("order-t") == "PENDING"
        assert c.resv_state("order-t") == "reserved"
        assert c.product_stock("sku-t") == 5
        assert w.alive()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


if __name__ == "__main__":
    harness.main(globals())
