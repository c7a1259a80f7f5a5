#!/usr/bin/python3
"""test_ops_files.py - the operations files under ops/ are valid and agree with the binary.

What it checks (no Docker, no Kubernetes cluster: the build machines have neither):
- ops/metrics.txt, the one list of metric names, types and labels that settle exports, is
  well formed; every settle_* name (and label) used by the alert rules, the Grafana dashboard,
  the KEDA triggers and the runbook is in it.
- yamllint (ops/.yamllint, strict) accepts every YAML file under ops/.
- `promtool check config` / `check rules` accept ops/prometheus/; `promtool test rules` runs
  synthetic series through every alert (each must fire in at least one case, and stay quiet
  in the near misses); every alert has a severity, a summary, a description and a runbook_url
  whose anchor exists in ops/RUNBOOK.md.
- The dashboard is Grafana JSON (schemaVersion, unique panel ids, a grid that fits, targets on
  every panel, the provisioned datasource); every query parses as PromQL (promtool).
- ops/compose.yaml: the services, images, Redis AOF + noeviction, health-gated depends_on, the
  one-shot migration, the simulator's seed profile, three workers whose environment `settle
  config` accepts, Prometheus targets = the workers, Grafana provisioning paths.
- ops/k8s/: probes, resources, securityContext, terminationGracePeriodSeconds above the drain
  grace, URLs only from the Secret via *_FILE (and `settle config` reads them), Service/PDB/KEDA
  selectors and names agree, kustomization lists every manifest; the ConfigMap holds every knob
  the binary has, at the binary's default.
- ops/RUNBOOK.md names only commands and DLQ reasons that exist, and its Redis-loss rebuild
  loop works: run against a real PostgreSQL + Redis, it enqueues one job per PENDING order and
  a second run enqueues none.

Tools: yamllint, promtool (Debian package prometheus), python3-yaml, psql (ops/deps.sh).
Run: SETTLE_BIN=build/settle /usr/bin/python3 tests/integration/test_ops_files.py [tests]
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = os.path.join(ROOT, "ops")
METRICS_TXT = os.path.join(OPS, "metrics.txt")
ALERTS = os.path.join(OPS, "prometheus", "alerts.yaml")
PROM_CONFIG = os.path.join(OPS, "prometheus", "prometheus.yml")
DASHBOARD = os.path.join(OPS, "grafana", "dashboards", "settle.json")
DATASOURCES = os.path.join(OPS, "grafana", "provisioning", "datasources")
DASH_PROVIDERS = os.path.join(OPS, "grafana", "provisioning", "dashboards")
COMPOSE = os.path.join(OPS, "compose.yaml")
K8S = os.path.join(OPS, "k8s")
RUNBOOK = os.path.join(OPS, "RUNBOOK.md")
README = os.path.join(ROOT, "README.md")

K8S_FILES = ("deployment.yaml", "configmap.yaml", "secret.example.yaml", "service.yaml",
             "pdb.yaml", "keda-scaledobject.yaml", "kustomization.yaml")
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
# Closed label vocabularies (issue 5's metric list). Selectors must use these values, so a
# typo such as class="5XX" cannot silently match nothing.
LABEL_VALUES = {
    "queue": {"reconcile", "refund"},
    "outcome": {"done", "dead"},
    "kind": {"retry", "recheck", "breaker_wait"},
    "endpoint": {"status", "cancel", "list"},
    "class": {"2xx", "404", "4xx", "429", "5xx", "timeout", "transport", "bad_response"},
}
# ConfigMap keys whose value a cluster must set rather than take from the binary's default.
CONFIGMAP_OVERRIDES = {"SETTLE_METRICS_ADDR", "SETTLE_GATEWAY_URL"}
# Variables deliberately not in the ConfigMap (secrets, per pod, tests only).
CONFIGMAP_EXCLUDED = {"SETTLE_REDIS_URL", "SETTLE_DATABASE_URL", "SETTLE_WORKER_ID",
                      "SETTLE_RUN_SECONDS"}


# --------------------------------------------------------------------------------------------
# Helpers


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def need_tool(name):
    path = shutil.which(name)
    assert path, f"{name} is not installed (bash ops/deps.sh installs it)"
    return path


def run(args, timeout=60, **kw):
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False, **kw)


def metrics_list():
    """ops/metrics.txt -> {name: (type, set of labels)}."""
    out = {}
    for n, line in enumerate(read(METRICS_TXT).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        assert len(fields) == 3, f"metrics.txt:{n}: want NAME TYPE LABELS: {line!r}"
        name, mtype, labels = fields
        assert re.fullmatch(r"settle_[a-z0-9_]+", name), f"metrics.txt:{n}: bad name {name}"
        assert mtype in ("counter", "gauge", "histogram"), f"metrics.txt:{n}: bad type {mtype}"
        assert name not in out, f"metrics.txt:{n}: {name} listed twice"
        out[name] = (mtype, set() if labels == "-" else set(labels.split(",")))
    return out


def base_metric(name, metrics):
    """settle_x_bucket -> settle_x when settle_x is a histogram; otherwise name unchanged."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if metrics.get(base, ("",))[0] == "histogram":
                return base
    return name


METRIC_RE = re.compile(r"\bsettle_[a-z0-9_]*[a-z0-9]")
SELECTOR_RE = re.compile(r"\b(settle_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def check_promql(expr, metrics, where, legend=None):
    """Every settle_* metric in expr is exported, its selectors use its labels (and known
    values), and by()/on() clauses and {{legend}} names use labels the query's metrics have.
    Returns the metrics used (base names)."""
    problems = []
    used = set()
    for m in METRIC_RE.findall(expr):
        base = base_metric(m, metrics)
        if base not in metrics:
            problems.append(f"{where}: {m} is not in ops/metrics.txt")
            continue
        used.add(base)
    known = set(TARGET_LABELS)
    for m in used:
        known |= metrics[m][1]
        if metrics[m][0] == "histogram":
            known.add("le")
    for name, body in SELECTOR_RE.findall(expr):
        base = base_metric(name, metrics)
        if base not in metrics:
            continue
        allowed = metrics[base][1] | TARGET_LABELS | ({"le"} if name != base else set())
        for label, op, value in MATCHER_RE.findall(body):
            if label not in allowed:
                problems.append(f"{where}: {name} has no label {label!r}")
            if label in LABEL_VALUES and op in ("=", "=~"):
                values = value.split("|") if op == "=~" else [value]
                bad = [v for v in values if v not in LABEL_VALUES[label]]
                if bad:
                    problems.append(f"{where}: {label} value(s) {bad} are not among "
                                    f"{sorted(LABEL_VALUES[label])}")
    for group in GROUPING_RE.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in known:
                problems.append(f"{where}: grouping label {label!r} is not a label of "
                                f"{sorted(used)}")
    for label in re.findall(r"\{\{\s*([a-zA-Z_]+)\s*\}\}", legend or ""):
        if label not in known:
            problems.append(f"{where}: legend label {label!r} is not a label of {sorted(used)}")
    assert not problems, "\n".join(problems)
    return used


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def runbook_anchors():
    return {github_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", read(RUNBOOK), re.M)}


def alert_rules():
    doc = load_yaml(ALERTS)
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def dashboard():
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def dashboard_panels(d):
    """Every panel, including those nested in collapsed rows."""
    out = []
    for p in d.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(d):
    """(panel title, expr, legend) of every query, with Grafana's interval variables replaced
    by durations so promtool can parse them."""
    out = []
    for p in dashboard_panels(d):
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for var, dur in (("$__rate_interval", "5m"), ("$__interval", "1m"),
                             ("$__range", "1h")):
                expr = expr.replace(var, dur)
            out.append((p.get("title", "?"), expr, t.get("legendFormat", "")))
    return out


def child_env(extra):
    """os.environ without inherited SETTLE_* variables, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETTLE_")}
    env.update(extra)
    return env


def settle_config(extra_env):
    """`settle config` under the given environment: the effective configuration (dict)."""
    r = run([harness.settle_bin(), "config"], env=child_env(extra_env))
    assert r.returncode == 0, f"settle config rejected {sorted(extra_env)}:\n{r.stdout}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def k8s_docs():
    """{kind: [docs]} of every manifest in ops/k8s except the kustomization."""
    out = {}
    for name in K8S_FILES:
        if name == "kustomization.yaml":
            continue
        for d in load_yaml_all(os.path.join(K8S, name)):
            out.setdefault(d["kind"], []).append(d)
    return out


def only(docs, kind):
    assert len(docs.get(kind, [])) == 1, f"want exactly one {kind} in ops/k8s"
    return docs[kind][0]


# --------------------------------------------------------------------------------------------
# The metric list and the tools


def test_metrics_list(c):
    m = metrics_list()
    for name, (mtype, _labels) in m.items():
        if mtype == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"
        else:
            assert not name.endswith("_total"), f"{mtype} {name} must not end in _total"
        if mtype == "histogram":
            # Prometheus naming: a base unit in the plural; durations in seconds, sizes in
            # what they count (jobs per batch).
            assert name.endswith(("_seconds", "_jobs")), \
                f"histogram {name}: base unit seconds (or jobs, for a batch size) expected"
    # The names issue 5 promised, with their labels.
    promised = {
        "settle_queue_ready_jobs": {"queue"}, "settle_queue_delayed_jobs": {"queue"},
        "settle_queue_inflight_jobs": {"queue"}, "settle_queue_dead_jobs": {"queue"},
        "settle_queue_oldest_ready_age_seconds": {"queue"},
        "settle_jobs_finished_total": {"queue", "outcome", "result"},
        "settle_job_retries_total": {"queue", "kind"},
        "settle_jobs_dead_lettered_total": {"queue", "reason"},
        "settle_job_duration_seconds": {"queue"},
        "settle_gateway_requests_total": {"endpoint", "class"},
        "settle_gateway_request_duration_seconds": {"endpoint"},
        "settle_breaker_state": {"endpoint"},
        "settle_breaker_transitions_total": {"endpoint", "to"},
        "settle_reservations_reaped_total": set(), "settle_stock_sync_mismatches_total": set(),
        "settle_worker_concurrency": set(), "settle_worker_inflight_jobs": set(),
        "settle_worker_ready": set(), "settle_redis_up": set(), "settle_postgres_up": set(),
        "settle_build_info": {"version"},
    }
    for name, labels in promised.items():
        assert name in m, f"{name} missing from ops/metrics.txt"
        assert m[name][1] == labels, f"{name}: labels {m[name][1]} != {labels}"


def test_yamllint(c):
    need_tool("yamllint")
    files = [os.path.join(d, f) for d, _, fs in os.walk(OPS) for f in fs
             if f.endswith((".yaml", ".yml"))]
    assert len(files) >= 12, f"expected the ops YAML files, found {files}"
    r = run(["yamllint", "--strict", "-f", "parsable", "-c", os.path.join(OPS, ".yamllint"),
             OPS])
    assert r.returncode == 0, f"yamllint:\n{r.stdout}"
    for f in files:  # and each parses as YAML (yamllint only lints)
        load_yaml_all(f)


def test_promtool_check(c):
    need_tool("promtool")
    r = run(["promtool", "check", "rules", ALERTS])
    assert r.returncode == 0, f"promtool check rules:\n{r.stdout}"
    r = run(["promtool", "check", "config", PROM_CONFIG])
    assert r.returncode == 0, f"promtool check config:\n{r.stdout}"
    cfg = load_yaml(PROM_CONFIG)
    assert "alerts.yaml" in cfg.get("rule_files", []), "prometheus.yml must load alerts.yaml"


# --------------------------------------------------------------------------------------------
# Alert rules


def test_alert_rules_shape(c):
    metrics = metrics_list()
    anchors = runbook_anchors()
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    wanted = {  # issue 5: DLQ growing, oldest job, breaker open, stock mismatch, no worker
        "SettleDeadLetterGrowing", "SettleOldestReadyJobTooOld", "SettleBreakerOpen",
        "SettleStockSyncMismatches", "SettleNoWorkerReady", "SettleRedisDown",
        "SettlePostgresDown"}
    assert wanted <= set(names), f"missing alerts: {sorted(wanted - set(names))}"
    for r in rules:
        where = f"alert {r['alert']}"
        assert r.get("labels", {}).get("severity") in ("critical", "warning", "info"), \
            f"{where}: severity label critical|warning|info"
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key, "").strip(), f"{where}: annotation {key} missing"
        url = ann["runbook_url"]
        assert url.startswith("ops/RUNBOOK.md#"), f"{where}: runbook_url {url}"
        anchor = url.split("#", 1)[1]
        assert anchor == r["alert"].lower(), f"{where}: anchor should be #{r['alert'].lower()}"
        assert anchor in anchors, f"{where}: ops/RUNBOOK.md has no heading for #{anchor}"
        check_promql(r["expr"], metrics, where)


# Synthetic series for `promtool test rules`. Alert rules are run without their annotations
# (rendered annotations would make every case restate the text); labels, expr and `for` are
# what is tested. Every alert must fire in at least one case.
ALERT_TESTS = """
evaluation_interval: 1m
tests:
  # DLQ: a new dead job fires; a DLQ that has been flat for 15 minutes, or was purged, does not.
  - interval: 1m
    input_series:
      - series: 'settle_queue_dead_jobs{queue="reconcile",instance="w1"}'
        values: '0x10 1x30'
      - series: 'settle_queue_dead_jobs{queue="reconcile",instance="w2"}'
        values: '0x10 1x30'
      - series: 'settle_queue_dead_jobs{queue="refund",instance="w1"}'
        values: '5x10 0x30'
    alert_rule_test:
      - eval_time: 12m
        alertname: SettleDeadLetterGrowing
        exp_alerts:
          - exp_labels: {severity: warning, queue: reconcile}
      - eval_time: 30m
        alertname: SettleDeadLetterGrowing
        exp_alerts: []
  # DLQ via the counter alone (the gauge has not been scraped yet).
  - interval: 1m
    input_series:
      - series: 'settle_jobs_dead_lettered_total{queue="refund",reason="invalid_job",instance="w1"}'
        values: '0x10 1x20'
    alert_rule_test:
      - eval_time: 12m
        alertname: SettleDeadLetterGrowing
        exp_alerts:
          - exp_labels: {severity: warning, queue: refund}
      - eval_time: 30m
        alertname: SettleDeadLetterGrowing
        exp_alerts: []
  # DLQ size: summed over queues, each queue's gauge taken once (max over workers).
  - interval: 1m
    input_series:
      - series: 'settle_queue_dead_jobs{queue="reconcile",instance="w1"}'
        values: '6000x10'
      - series: 'settle_queue_dead_jobs{queue="reconcile",instance="w2"}'
        values: '6000x10'
      - series: 'settle_queue_dead_jobs{queue="refund",instance="w1"}'
        values: '4000x10'
    alert_rule_test:
      - eval_time: 4m
        alertname: SettleDeadLetterQueueLarge
        exp_alerts: []
      - eval_time: 6m
        alertname: SettleDeadLetterQueueLarge
        exp_alerts:
          - exp_labels: {severity: critical}
  - interval: 1m
    input_series:
      - series: 'settle_queue_dead_jobs{queue="reconcile",instance="w1"}'
        values: '5000x10'
      - series: 'settle_queue_dead_jobs{queue="reconcile",instance="w2"}'
        values: '5000x10'
    alert_rule_test:
      - eval_time: 8m
        alertname: SettleDeadLetterQueueLarge
        exp_alerts: []
  # Oldest ready job: above 10 minutes for 2 minutes.
  - interval: 1m
    input_series:
      - series: 'settle_queue_oldest_ready_age_seconds{queue="reconcile",instance="w1"}'
        values: '0 0 700x10'
      - series: 'settle_queue_oldest_ready_age_seconds{queue="reconcile",instance="w2"}'
        values: '0 0 700x10'
      - series: 'settle_queue_oldest_ready_age_seconds{queue="refund",instance="w1"}'
        values: '30x12'
    alert_rule_test:
      - eval_time: 3m
        alertname: SettleOldestReadyJobTooOld
        exp_alerts: []
      - eval_time: 5m
        alertname: SettleOldestReadyJobTooOld
        exp_alerts:
          - exp_labels: {severity: critical, queue: reconcile}
  # Queue stalled: jobs ready, nothing finished; a draining queue does not fire.
  - interval: 1m
    input_series:
      - series: 'settle_queue_ready_jobs{queue="reconcile",instance="w1"}'
        values: '5x20'
      - series: 'settle_jobs_finished_total{queue="reconcile",outcome="done",
                  result="completed",instance="w1"}'
        values: '10x20'
      - series: 'settle_queue_ready_jobs{queue="refund",instance="w1"}'
        values: '5x20'
      - series: 'settle_jobs_finished_total{queue="refund",outcome="done",
                  result="refunded",instance="w1"}'
        values: '0+3x20'
    alert_rule_test:
      - eval_time: 3m
        alertname: SettleQueueStalled
        exp_alerts: []
      - eval_time: 15m
        alertname: SettleQueueStalled
        exp_alerts:
          - exp_labels: {severity: critical, queue: reconcile}
  # Breaker: open and half-open alternating (never closed) for 5 minutes fires; a short trip
  # does not; a series that appeared open less than 5 minutes ago does not yet.
  - interval: 1m
    input_series:
      - series: 'settle_breaker_state{endpoint="status",instance="w1"}'
        values: '0x5 1 2 1 2 1 2 1 2 1 2 1 2'
      - series: 'settle_breaker_state{endpoint="status",instance="w2"}'
        values: '0x17'
      - series: 'settle_breaker_state{endpoint="list",instance="w1"}'
        values: '0x5 1 0x11'
      - series: 'settle_breaker_state{endpoint="cancel",instance="w1"}'
        values: '_x10 1x7'
    alert_rule_test:
      - eval_time: 9m
        alertname: SettleBreakerOpen
        exp_alerts: []
      - eval_time: 12m
        alertname: SettleBreakerOpen
        exp_alerts:
          - exp_labels: {severity: critical, endpoint: status}
      - eval_time: 17m
        alertname: SettleBreakerOpen
        exp_alerts:
          - exp_labels: {severity: critical, endpoint: status}
          - exp_labels: {severity: critical, endpoint: cancel}
  - interval: 1m
    input_series:
      - series: 'settle_breaker_state{endpoint="cancel",instance="w1"}'
        values: '_x10 1x7'
    alert_rule_test:
      - eval_time: 14m
        alertname: SettleBreakerOpen
        exp_alerts: []
  # PG failure share above 20 % for 10 minutes.
  - interval: 1m
    input_series:
      - series: 'settle_gateway_requests_total{endpoint="status",class="5xx",instance="w1"}'
        values: '0+30x20'
      - series: 'settle_gateway_requests_total{endpoint="status",class="2xx",instance="w1"}'
        values: '0+60x20'
      - series: 'settle_gateway_requests_total{endpoint="cancel",class="2xx",instance="w1"}'
        values: '0+60x20'
      - series: 'settle_gateway_requests_total{endpoint="cancel",class="4xx",instance="w1"}'
        values: '0+60x20'
    alert_rule_test:
      - eval_time: 5m
        alertname: SettleGatewayErrorRate
        exp_alerts: []
      - eval_time: 15m
        alertname: SettleGatewayErrorRate
        exp_alerts:
          - exp_labels: {severity: warning, endpoint: status}
  # Stock sync: more than 10 mismatches in a day fires; 5 does not; it clears a day later.
  - interval: 1h
    input_series:
      - series: 'settle_stock_sync_mismatches_total{instance="w1"}'
        values: '0x10 12x40'
    alert_rule_test:
      - eval_time: 12h
        alertname: SettleStockSyncMismatches
        exp_alerts:
          - exp_labels: {severity: warning}
      - eval_time: 40h
        alertname: SettleStockSyncMismatches
        exp_alerts: []
  - interval: 1h
    input_series:
      - series: 'settle_stock_sync_mismatches_total{instance="w1"}'
        values: '0x10 5x20'
    alert_rule_test:
      - eval_time: 12h
        alertname: SettleStockSyncMismatches
        exp_alerts: []
  # Manual review.
  - interval: 1m
    input_series:
      - series: 'settle_jobs_finished_total{queue="reconcile",outcome="done",
                  result="manual_review",instance="w1"}'
        values: '0 0 1 1 1'
      - series: 'settle_jobs_finished_total{queue="reconcile",outcome="done",
                  result="completed",instance="w1"}'
        values: '0+5x4'
    alert_rule_test:
      - eval_time: 4m
        alertname: SettleManualReviewNeeded
        exp_alerts:
          - exp_labels: {severity: warning, queue: reconcile}
  # No worker ready: every worker unready for 2 minutes; one ready worker is enough.
  - interval: 1m
    input_series:
      - series: 'settle_worker_ready{instance="w1"}'
        values: '1 1 0x10'
      - series: 'settle_worker_ready{instance="w2"}'
        values: '0x12'
    alert_rule_test:
      - eval_time: 3m
        alertname: SettleNoWorkerReady
        exp_alerts: []
      - eval_time: 5m
        alertname: SettleNoWorkerReady
        exp_alerts:
          - exp_labels: {severity: critical}
  - interval: 1m
    input_series:
      - series: 'settle_worker_ready{instance="w1"}'
        values: '1x10'
      - series: 'settle_worker_ready{instance="w2"}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 8m
        alertname: SettleNoWorkerReady
        exp_alerts: []
  # ... and when no worker is scraped at all.
  - interval: 1m
    input_series:
      - series: 'up{instance="w1"}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 5m
        alertname: SettleNoWorkerReady
        exp_alerts:
          - exp_labels: {severity: critical}
  # Redis / PostgreSQL down as a worker sees them, for a minute.
  - interval: 1m
    input_series:
      - series: 'settle_redis_up{instance="w1"}'
        values: '1 0x5'
      - series: 'settle_redis_up{instance="w2"}'
        values: '1x6'
      - series: 'settle_postgres_up{instance="w2"}'
        values: '1 1 1 0x3'
      - series: 'settle_postgres_up{instance="w1"}'
        values: '1x6'
    alert_rule_test:
      - eval_time: 3m
        alertname: SettleRedisDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: w1}
      - eval_time: 3m
        alertname: SettlePostgresDown
        exp_alerts: []
      - eval_time: 5m
        alertname: SettlePostgresDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: w2}
  # Metrics series dropped.
  - interval: 1m
    input_series:
      - series: 'settle_metrics_series_dropped_total{instance="w1"}'
        values: '0 0 3 3'
    alert_rule_test:
      - eval_time: 3m
        alertname: SettleMetricsSeriesDropped
        exp_alerts:
          - exp_labels: {severity: warning, instance: w1}
"""


def test_alert_rules_fire(c):
    need_tool("promtool")
    rules = load_yaml(ALERTS)
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    tests = yaml.safe_load(ALERT_TESTS)
    fired = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]
             if t["exp_alerts"]}
    untested = {r["alert"] for r in alert_rules()} - fired
    assert not untested, f"alerts without a firing case in ALERT_TESTS: {sorted(untested)}"
    with tempfile.TemporaryDirectory(dir=c.dir) as d:
        with open(os.path.join(d, "rules.yaml"), "w") as f:
            yaml.safe_dump(rules, f, sort_keys=False)
        tests["rule_files"] = ["rules.yaml"]
        with open(os.path.join(d, "tests.yaml"), "w") as f:
            yaml.safe_dump(tests, f, sort_keys=False)
        r = run(["promtool", "test", "rules", "tests.yaml"], cwd=d, timeout=120)
    assert r.returncode == 0, f"promtool test rules:\n{r.stdout}"


# --------------------------------------------------------------------------------------------
# Grafana


def test_dashboard_json(c):
    d = dashboard()
    assert isinstance(d.get("schemaVersion"), int) and 36 <= d["schemaVersion"] <= 41, \
        f"schemaVersion {d.get('schemaVersion')}"
    assert d.get("uid") and d.get("title"), "dashboard needs a uid and a title"
    ds_vars = [v for v in d.get("templating", {}).get("list", [])
               if v.get("type") == "datasource" and v.get("name") == "DS_PROMETHEUS"]
    assert len(ds_vars) == 1 and ds_vars[0].get("query") == "prometheus", \
        "want one datasource variable DS_PROMETHEUS of type prometheus"

    # The variable's default is the provisioned datasource.
    provisioned = []
    for f in os.listdir(DATASOURCES):
        provisioned += load_yaml(os.path.join(DATASOURCES, f)).get("datasources", [])
    prom = [s for s in provisioned if s.get("type") == "prometheus"]
    assert len(prom) == 1, f"want one provisioned prometheus datasource, got {prom}"
    assert ds_vars[0].get("current", {}).get("value") == prom[0]["uid"], \
        "DS_PROMETHEUS's default must be the provisioned datasource's uid"

    ids = set()
    occupied = set()
    for p in dashboard_panels(d):
        title = p.get("title", "?")
        assert isinstance(p.get("id"), int) and p["id"] not in ids, f"panel {title}: id"
        ids.add(p["id"])
        g = p.get("gridPos", {})
        assert all(isinstance(g.get(k), int) for k in "hwxy"), f"panel {title}: gridPos"
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, f"panel {title}: width"
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {title} overlaps another"
        occupied |= cells
        if p.get("type") == "row":
            continue
        assert p.get("type") in ("timeseries", "stat", "state-timeline", "gauge", "table",
                                 "bargauge", "heatmap"), f"panel {title}: type {p.get('type')}"
        assert p.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", \
            f"panel {title}: datasource must be ${{DS_PROMETHEUS}}"
        targets = p.get("targets", [])
        assert targets, f"panel {title} has no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"panel {title}: refIds {refs}"
        for t in targets:
            assert t.get("expr", "").strip(), f"panel {title}: empty expr"
            assert t.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", \
                f"panel {title}: target datasource"

    # Provider path = where compose mounts the dashboards.
    providers = []
    for f in os.listdir(DASH_PROVIDERS):
        providers += load_yaml(os.path.join(DASH_PROVIDERS, f)).get("providers", [])
    assert len(providers) == 1, "want one dashboard provider"
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts.get("./grafana/dashboards") == providers[0]["options"]["path"], \
        "compose must mount ./grafana/dashboards on the provider's path"
    assert mounts.get("./grafana/provisioning") == "/etc/grafana/provisioning"
    assert urllib.parse.urlparse(prom[0]["url"]).hostname == "prometheus", \
        "the datasource must point at compose's prometheus service"


def test_dashboard_queries(c):
    metrics = metrics_list()
    used = set()
    exprs = dashboard_exprs(dashboard())
    for title, expr, legend in exprs:
        used |= check_promql(expr, metrics, f"panel {title!r}", legend)
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), \
                f"panel {title!r}: histogram_quantile needs _bucket and by (le, ...)"
        # Queue gauges are identical in every worker: never sum them across workers.
        for m in re.findall(r"sum(?: by \([^)]*\))? \((settle_queue_[a-z_]+)", expr):
            raise AssertionError(f"panel {title!r}: sum() over the queue gauge {m}; use max()")
    wanted = {"settle_queue_ready_jobs", "settle_queue_oldest_ready_age_seconds",
              "settle_jobs_finished_total", "settle_job_retries_total",
              "settle_gateway_request_duration_seconds", "settle_gateway_requests_total",
              "settle_breaker_state", "settle_jobs_dead_lettered_total",
              "settle_stock_sync_mismatches_total", "settle_worker_ready",
              "settle_worker_inflight_jobs"}
    assert wanted <= used, f"dashboard lacks panels for {sorted(wanted - used)}"

    # Every query parses as PromQL: promtool checks them as recording rules.
    need_tool("promtool")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, (_, e, _) in enumerate(exprs)]}]}
    with tempfile.TemporaryDirectory(dir=c.dir) as d:
        path = os.path.join(d, "dashboard_rules.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(rules, f)
        r = run(["promtool", "check", "rules", path])
    assert r.returncode == 0, f"dashboard queries do not parse:\n{r.stdout}"


# --------------------------------------------------------------------------------------------
# compose


def test_compose(c):
    text = read(COMPOSE)
    assert "Docker is not available on the build machines" in text, \
        "compose.yaml must say it is validated statically, not run"
    doc = load_yaml(COMPOSE)
    svc = doc["services"]
    for name in ("redis", "postgres", "migrate", "pgsim", "prometheus", "grafana"):
        assert name in svc, f"compose: service {name} missing"

    redis_cmd = " ".join(svc["redis"]["command"])
    assert svc["redis"]["image"].startswith("redis:7"), "Redis 7"
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd, \
        "Redis needs AOF and noeviction"
    assert svc["postgres"]["image"].startswith("postgres:15"), "PostgreSQL 15"
    for name in ("redis", "postgres", "pgsim"):
        assert svc[name].get("healthcheck", {}).get("test"), f"{name} needs a healthcheck"

    assert svc["migrate"]["command"] == ["migrate"]
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    pgsim = svc["pgsim"]["command"]
    assert pgsim[0] == "pgsim" and "0.0.0.0:8082" in pgsim and \
        pgsim[pgsim.index("--profile") + 1] == "seed", f"pgsim command {pgsim}"

    workers = {n: s for n, s in svc.items() if s.get("command") == ["work"]}
    assert len(workers) == 3, f"want three workers, got {sorted(workers)}"
    grace_s = None
    for name, w in workers.items():
        ctx = os.path.normpath(os.path.join(OPS, w["build"]["context"]))
        assert os.path.isfile(os.path.join(ctx, w["build"].get("dockerfile", "Dockerfile"))), \
            f"{name}: build context {ctx} has no Dockerfile"
        dep = w["depends_on"]
        assert dep["redis"]["condition"] == "service_healthy"
        assert dep["postgres"]["condition"] == "service_healthy"
        assert dep["migrate"]["condition"] == "service_completed_successfully"
        env = {k: str(v) for k, v in w["environment"].items()}
        assert urllib.parse.urlparse(env["SETTLE_REDIS_URL"]).hostname == "redis"
        assert urllib.parse.urlparse(env["SETTLE_DATABASE_URL"]).hostname == "postgres"
        gw = urllib.parse.urlparse(env["SETTLE_GATEWAY_URL"])
        assert (gw.hostname, gw.port) == ("pgsim", 8082), env["SETTLE_GATEWAY_URL"]
        assert env["SETTLE_METRICS_ADDR"] == "0.0.0.0:9464"
        cfg = settle_config(env)  # the binary accepts this environment
        grace_s = cfg["SETTLE_SHUTDOWN_GRACE_MS"] / 1000
        stop = w.get("stop_grace_period", "10s")
        assert stop.endswith("s") and int(stop[:-1]) > grace_s, \
            f"{name}: stop_grace_period {stop} must exceed the drain grace {grace_s} s"
        assert w.get("stop_signal", "SIGTERM") == "SIGTERM"

    # Prometheus scrapes exactly the workers and loads the alert rules.
    prom = load_yaml(PROM_CONFIG)
    targets = [t for j in prom["scrape_configs"] if j["job_name"] == "settle"
               for sc in j["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == sorted(f"{n}:9464" for n in workers), targets
    assert "./prometheus:/etc/prometheus:ro" in svc["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in svc["prometheus"]["command"]


# --------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_manifests(c):
    kust = load_yaml(os.path.join(K8S, "kustomization.yaml"))
    present = {f for f in os.listdir(K8S) if f.endswith(".yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == present, \
        f"kustomization resources {kust['resources']} != files {sorted(present)}"
    docs = k8s_docs()
    dep = only(docs, "Deployment")
    cm = only(docs, "ConfigMap")
    secret = only(docs, "Secret")
    svc = only(docs, "Service")
    pdb = only(docs, "PodDisruptionBudget")
    so = only(docs, "ScaledObject")
    ta = only(docs, "TriggerAuthentication")
    data = cm["data"]

    spec = dep["spec"]
    assert spec["replicas"] == 3
    sel = spec["selector"]["matchLabels"]
    pod = spec["template"]
    assert sel.items() <= pod["metadata"]["labels"].items(), "selector must match the pods"
    ps = pod["spec"]
    grace_ms = int(data["SETTLE_SHUTDOWN_GRACE_MS"])
    tgps = ps["terminationGracePeriodSeconds"]
    assert tgps > 20 and tgps * 1000 >= grace_ms + 10000, \
        f"terminationGracePeriodSeconds {tgps} must leave >= 10 s above the {grace_ms} ms grace"
    assert ps["securityContext"]["runAsNonRoot"] is True
    assert ps.get("enableServiceLinks") is False, "service links would inject SETTLE_* vars"

    workers = [k for k in ps["containers"] if k["args"] == ["work"]]
    assert len(workers) == 1, "one container running `settle work`"
    w = workers[0]
    volumes = {v["name"]: v for v in ps["volumes"]}
    port = {p["name"]: p["containerPort"] for p in w["ports"]}["metrics"]
    assert data["SETTLE_METRICS_ADDR"] == f"0.0.0.0:{port}", "metrics address vs port"
    for container in ps["containers"] + ps.get("initContainers", []):
        name = container["name"]
        sc = container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{name}: drop ALL caps"
        for kind in ("requests", "limits"):
            res = container.get("resources", {}).get(kind, {})
            assert "cpu" in res and "memory" in res, f"{name}: resources.{kind}"
        assert {"configMapRef": {"name": cm["metadata"]["name"]}} in container["envFrom"], \
            f"{name}: envFrom the ConfigMap"
        env = {e["name"]: e for e in container.get("env", [])}
        for var in ("SETTLE_REDIS_URL", "SETTLE_DATABASE_URL"):
            assert var not in env and var not in data, f"{var} must come from a file"
            path = env[var + "_FILE"]["value"]
            mount = [m for m in container["volumeMounts"]
                     if path.startswith(m["mountPath"].rstrip("/") + "/")]
            assert mount, f"{name}: {path} is on no volume mount"
            vol = volumes[mount[0]["name"]]
            assert vol["secret"]["secretName"] == secret["metadata"]["name"]
            key = os.path.relpath(path, mount[0]["mountPath"])
            items = {i["path"]: i["key"] for i in vol["secret"].get("items", [])}
            assert items.get(key, key) in secret["stringData"], f"{path}: no such Secret key"

    def probe_path(p):
        assert p["httpGet"]["port"] in ("metrics", port)
        return p["httpGet"]["path"]

    assert probe_path(w["startupProbe"]) == "/healthz"
    assert probe_path(w["livenessProbe"]) == "/healthz"
    assert probe_path(w["readinessProbe"]) == "/readyz"

    # Placeholder secrets only.
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"secret.example.yaml {key} must be a placeholder"

    # Service, PDB and KEDA point at these pods.
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"].get("publishNotReadyAddresses") is True, \
        "the metrics Service must publish unready pods (scrape them when Redis is down)"
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(port)
    assert ann.get("prometheus.io/path", "/metrics") == "/metrics"
    sport = svc["spec"]["ports"][0]
    assert sport["targetPort"] in ("metrics", port)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]), \
        "the PDB needs one of minAvailable / maxUnavailable"

    s = so["spec"]
    assert s["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert 1 <= s["minReplicaCount"] <= s["maxReplicaCount"], \
        "minReplicaCount >= 1: delayed jobs and the reapers need a running worker"
    assert "cooldownPeriod" in s
    ns = data["SETTLE_NAMESPACE"]
    lists = {}
    for t in s["triggers"]:
        if t["type"] == "redis":
            md = t["metadata"]
            lists[md["listName"]] = md
            assert int(md["listLength"]) > 0 and int(md["activationListLength"]) >= 0
            assert t["authenticationRef"]["name"] == ta["metadata"]["name"]
    want = {f"{{{ns}}}:queue:{q}" for q in data["SETTLE_QUEUES"].split(",")}
    assert set(lists) == want, f"redis triggers {sorted(lists)} != queues {sorted(want)}"
    prom = [t for t in s["triggers"] if t["type"] == "prometheus"]
    assert prom, "a prometheus trigger on the oldest ready job's age"
    metrics = metrics_list()
    for t in prom:
        used = check_promql(t["metadata"]["query"], metrics, "KEDA prometheus trigger")
        assert "settle_queue_oldest_ready_age_seconds" in used
        float(t["metadata"]["threshold"])
    for ref in ta["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]

    # kubectl (when installed) builds the kustomization.
    if shutil.which("kubectl"):
        r = run(["kubectl", "kustomize", K8S])
        assert r.returncode == 0, f"kubectl kustomize:\n{r.stdout}"
        kinds = {d["kind"] for d in yaml.safe_load_all(r.stdout) if d}
        assert kinds == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
                         "ScaledObject", "TriggerAuthentication"}, kinds
    else:
        print("  (kubectl not installed: kustomize build not checked)")


def test_k8s_config_matches_binary(c):
    docs = k8s_docs()
    data = only(docs, "ConfigMap")["data"]
    secret = only(docs, "Secret")
    dep = only(docs, "Deployment")
    defaults = settle_config({})
    unknown = set(data) - set(defaults)
    assert not unknown, f"ConfigMap keys the binary does not know: {sorted(unknown)}"
    missing = set(defaults) - set(data) - CONFIGMAP_EXCLUDED
    assert not missing, f"add to ops/k8s/configmap.yaml (at their defaults): {sorted(missing)}"
    assert CONFIGMAP_OVERRIDES <= set(data)

    # The pod's environment as the kubelet builds it: the ConfigMap, the Deployment's env with
    # the secret files written where the mounts would put them.
    w = [k for k in dep["spec"]["template"]["spec"]["containers"] if k["args"] == ["work"]][0]
    vol = [v for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v][0]
    mount = [m for m in w["volumeMounts"] if m["name"] == vol["name"]][0]["mountPath"]
    with tempfile.TemporaryDirectory(dir=c.dir) as d:
        env = dict(data)
        for e in w["env"]:
            if "value" in e and e["value"].startswith(mount):
                key = {i["path"]: i["key"] for i in vol["secret"]["items"]}[
                    os.path.relpath(e["value"], mount)]
                path = os.path.join(d, key)
                with open(path, "w") as f:
                    f.write(secret["stringData"][key] + "\n")
                env[e["name"]] = path
            elif "valueFrom" in e:
                env[e["name"]] = "settle-worker-abc12-xyz34"
        cfg = settle_config(env)
    for key in set(data) - CONFIGMAP_OVERRIDES:
        assert cfg[key] == defaults[key], \
            f"ConfigMap {key}={data[key]!r} is not the default ({defaults[key]!r})"
    assert cfg["SETTLE_METRICS_ADDR"] == data["SETTLE_METRICS_ADDR"]
    assert cfg["SETTLE_WORKER_ID"] == "settle-worker-abc12-xyz34"
    # The URLs came from the files (passwords redacted in the output).
    for var, key in (("SETTLE_REDIS_URL", "redis-url"), ("SETTLE_DATABASE_URL", "database-url")):
        want = urllib.parse.urlparse(secret["stringData"][key]).hostname
        assert urllib.parse.urlparse(cfg[var]).hostname == want, f"{var}: {cfg[var]}"
        assert "REPLACE_ME" not in cfg[var], f"settle config printed a password: {cfg[var]}"


# --------------------------------------------------------------------------------------------
# Runbook


def runbook_code():
    """Fenced code blocks and inline code spans of the runbook."""
    text = read(RUNBOOK)
    blocks = re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", text, re.S | re.M)
    rest = re.sub(r"^[ \t]*```[a-z]*\n.*?^[ \t]*```", "", text, flags=re.S | re.M)
    return blocks + re.findall(r"`([^`\n]+)`", rest)


def cli_commands():
    """{command: set of subcommands} from `settle help`."""
    r = run([harness.settle_bin(), "help"])
    assert r.returncode == 0, r.stdout
    cmds = {}
    for line in r.stdout.splitlines():
        if not re.match(r"^  [a-z]", line):
            continue
        syntax = re.split(r"\s{2,}", line.strip())[0]
        for alt in syntax.split(" | "):
            words = alt.split()
            subs = cmds.setdefault(words[0], set())
            if len(words) > 1 and re.fullmatch(r"[a-z]+", words[1]):
                subs.add(words[1])
    return cmds


def test_runbook_names_real_things(c):
    cmds = cli_commands()
    assert {"work", "migrate", "enqueue", "stats", "dlq", "stock", "config"} <= set(cmds), cmds
    problems = []
    seen = set()
    for code in runbook_code():
        for m in re.finditer(r"(?<![\w/{.-])settle ([a-z]+)(?: ([a-z]+))?", code):
            if code[max(0, m.start() - 3):m.start()] == "-n ":
                continue  # kubectl -n settle
            cmd, sub = m.group(1), m.group(2)
            seen.add(cmd)
            if cmd not in cmds:
                problems.append(f"`settle {cmd}` is not a command")
            elif cmds[cmd] and sub is not None and len(cmds[cmd]) > 1 and sub not in cmds[cmd]:
                problems.append(f"`settle {cmd} {sub}`: {cmd} has {sorted(cmds[cmd])}")
    assert not problems, "\n".join(problems)
    assert {"dlq", "stats", "stock", "enqueue", "migrate"} <= seen

    readme = read(README)
    section = readme.split("## The dead-letter queue", 1)[1].split("\n## ", 1)[0]
    reasons = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert len(reasons) >= 10, f"README DLQ reasons: {reasons}"
    used = set(re.findall(r"--reason ([a-z_]+)", read(RUNBOOK)))
    assert used and used <= reasons, f"unknown --reason values: {sorted(used - reasons)}"
    table = set(re.findall(r"^\| `([a-z_]+)` \|", read(RUNBOOK), re.M))
    assert reasons <= table, f"runbook reasons table lacks {sorted(reasons - table)}"

    anchors = runbook_anchors()
    for link in re.findall(r"\]\(#([^)]+)\)", read(RUNBOOK)):
        assert link in anchors, f"RUNBOOK.md links to #{link}, which no heading defines"
    for topic in ("reading-the-dashboard", "inspecting-the-dlq", "re-driving-dead-jobs-safely",
                  "draining-a-worker", "scaling", "redis-outage-or-data-loss",
                  "postgresql-outage-or-data-loss"):
        assert topic in anchors, f"RUNBOOK.md has no section #{topic}"


def runbook_block(marker):
    text = read(RUNBOOK)
    i = text.index(f"<!-- test: {marker}")
    m = re.compile(r"^([ \t]*)```[a-z]*\n(.*?)^[ \t]*```", re.S | re.M).search(text, i)
    indent = m.group(1)
    return "".join(line[len(indent):] if line.startswith(indent) else line
                   for line in m.group(2).splitlines(True))


@harness.timeout(180)
def test_runbook_rebuild_after_redis_loss(c):
    """The runbook's re-enqueue loop, against real servers: one reconcile job per PENDING
    order (with its transaction key when there is one), none for settled orders, and a
    second run adds nothing. Its SQL queries run against the migrated schema too."""
    psql = need_tool("psql")
    script = runbook_block("rebuild-reconcile")
    with harness.Cluster(redis_on=True, postgres=True, pgsim=False) as s:
        # No simulator here, but settle validates the gateway URL at start-up.
        s.migrate(env=s.env_for_worker(SETTLE_GATEWAY_URL="http://127.0.0.1:9"))
        s.add_product("sku-rb", 10)
        s.add_order("ord-rb-1", "u-1", 1000, {"sku-rb": 1}, tx_key="tx:rb:1")
        s.add_order("ord-rb-2", "u-2", 2000, {"sku-rb": 2})
        s.add_order("ord-rb-3", "u-3", 3000, {"sku-rb": 1}, status="COMPLETED",
                    tx_key="tx:rb:3", payment_status="SUCCESS")
        env = child_env({"SETTLE_REDIS_URL": s.redis_url,
                         "SETTLE_DATABASE_URL": s.database_url})
        env["PATH"] = os.path.dirname(os.path.abspath(harness.settle_bin())) + os.pathsep + \
            env.get("PATH", "")
        assert os.path.basename(harness.settle_bin()) == "settle", "the loop calls `settle`"
        for attempt in (1, 2):
            r = run(["bash", "-euo", "pipefail", "-c", script], env=env, timeout=60)
            assert r.returncode == 0, f"rebuild loop, run {attempt}:\n{r.stdout}"
        jobs = [json.loads(j) for j in s.redis.lrange(s.key("queue:reconcile"), 0, -1)]
        by_order = {j["order_id"]: j for j in jobs}
        assert len(jobs) == 2 and set(by_order) == {"ord-rb-1", "ord-rb-2"}, jobs
        assert by_order["ord-rb-1"]["transaction_key"] == "tx:rb:1"
        assert by_order["ord-rb-1"]["user_id"] == "u-1"
        assert "transaction_key" not in by_order["ord-rb-2"]

        # Every ```sql block of the runbook runs against the real schema.
        sql_blocks = re.findall(r"```sql\n(.*?)```", read(RUNBOOK), re.S)
        assert sql_blocks
        for q in sql_blocks:
            r = run([psql, s.database_url, "-X", "-v", "ON_ERROR_STOP=1", "-c", q],
                    env=child_env({}))
            assert r.returncode == 0, f"runbook SQL failed:\n{q}\n{r.stdout}"


if __name__ == "__main__":
    harness.main(globals(), migrate=False, redis_on=False, postgres=False, pgsim=False)
