"""monitoring/: the alert rules, their promtool tests, the scrape config and the Grafana dashboard.

- promtool (Debian's `prometheus` package; `.ci/run` installs it) checks alerts.yml and
  prometheus.yml, runs alerts.test.yml (each alert firing and not firing on synthetic series),
  and parses every dashboard query (as recording rules, Grafana's variables filled in).
- Every metric name and label in every PromQL expression (dashboard and alerts) is one the daemon
  exports: read from prometheus_client's exposition of a real `DaemonMetrics`, built as the
  service builds it and fed the engine's events so that every labelled family has samples. A
  planted wrong name and a planted wrong label must be caught, so the checker cannot pass by
  finding nothing.

PyYAML comes with accelerate and huggingface_hub (both require it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import DaemonMetrics
from engine.jobfolder import all_stage_names
from tests.harness.paths import REPO

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
# Labels Prometheus adds to every scraped series (the scrape job and the target), and the metrics it makes itself.
TARGET_LABELS = {"job", "instance"}
PROMETHEUS_OWN = {"up": set()}
# What Grafana puts in place of its variables before it sends a query (any valid value will do for parsing).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m", "$instance": ".*"}
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "inf", "nan"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian's `prometheus` package: apt-get install prometheus; .ci/run installs it)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)


# ---- what the daemon exports --------------------------------------------------------------

def _exported() -> dict[str, set[str]]:
    """Every series name the daemon's /metrics can carry -> its label names, from the exposition of
    a DaemonMetrics built as daemon.service builds it, after the engine's events gave every
    labelled family a sample. Suffixes as Prometheus stores them: a counter's `_total` (and
    `_created`), a histogram's `_bucket` (label `le`), `_count`, `_sum`."""
    metrics = DaemonMetrics("monitoring-test", stages=all_stage_names(), watch="inotify", demo=True)
    events = [
        ("stage_started", {"stage": "train"}),
        ("train_step", {"phase": "COARSE", "step": 1, "loss": 0.5}),
        ("stage_finished", {"stage": "train", "seconds": 3.0}),
        ("seed_scored", {"seed": 1, "lora": True, "drift": 0.12, "face_found": True}),
        ("seed_scored", {"seed": 1, "lora": False, "drift": None, "face_found": False}),
        ("render_scored", {"pass_name": "anchor", "mode": "three_pass", "drift": 0.2, "face_found": True}),
    ]
    for event, fields in events:
        metrics.observe(event, fields)
    metrics.job_ended("failed", 2.0, "no_face_found")  # also zeroes the stage-progress gauges of every long stage
    metrics.job_ran("local", "", "failed")
    metrics.attempts_lost.labels("local")  # as daemon.service does once its backend started
    families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    exported: dict[str, set[str]] = {}
    for family in families:
        names = {sample.name for sample in family.samples}
        names |= {"counter": {family.name + "_total"}, "gauge": {family.name}, "info": {family.name + "_info"},
                  "histogram": {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}}.get(family.type, set())
        labels = {label for sample in family.samples for label in sample.labels}
        for name in names:
            exported.setdefault(name, set()).update(labels - ({"le"} if not name.endswith("_bucket") else set()))
    return exported


# ---- reading PromQL ---------------------------------------------------------------------

def _fill_variables(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    return expr


def _names_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names a PromQL expression uses (in selectors and in
    by/without/on/ignoring/group_* clauses). Function and aggregation names are told apart by the
    `(` after them; strings, durations and numbers are not names."""
    expr = _fill_variables(expr)
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    bare = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)  # selectors' matchers, ranges
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)", bare):
        name = match.group(1)
        if name.lower() in PROMQL_KEYWORDS or re.match(r"\s*\(", bare[match.end():]):
            continue
        names.add(name)
    return names, labels


def _problems(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """What in `expr` the daemon does not export: unknown metric names, and label names that no
    metric of the expression carries."""
    known = {**exported, **PROMETHEUS_OWN}
    names, labels = _names_and_labels(expr)
    problems = [f"metric {name} is not exported by daemon/metrics.py" for name in sorted(names - set(known))]
    if not names:
        problems.append("no metric name found")
    carried = TARGET_LABELS.union(*(known.get(name, set()) for name in names))
    problems += [f"label {label} is on none of {sorted(names)}" for label in sorted(labels - carried)]
    return problems


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _dashboard_exprs(board: dict) -> list[tuple[str, str]]:
    """(where, expr) of every query of a dashboard: the panels' targets and the variables' queries."""
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert metric, f"variable {variable['name']}: {query!r} is not label_values(metric, label)"
            found.append((f"variable {variable['name']}", f"{metric.group(1)}{{{metric.group(2)}!=\"\"}}"))
    return found


def _query_problems(queries: list[tuple[str, str]], exported: dict[str, set[str]]) -> list[str]:
    return [f"{where}: {problem}" for where, expr in queries for problem in _problems(expr, exported)]


def _alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"] for rule in group["rules"]]


# ---- the tests ------------------------------------------------------------------------------

def test_the_checker_finds_names_and_labels_and_catches_planted_wrong_ones():
    exported = _exported()
    assert "idrep_jobs_total" in exported and "idrep_jobs" not in exported
    assert exported["idrep_stage_duration_seconds_bucket"] == {"stage", "le"}
    assert exported["idrep_stage_duration_seconds_count"] == {"stage"}
    assert {"idrep_ready", "idrep_daemon_info", "idrep_verify_drift_sum", "idrep_gpu_memory_bytes"} <= set(exported)
    right = 'histogram_quantile(0.95, sum by (stage, le) (rate(idrep_stage_duration_seconds_bucket{stage="train", instance=~"$instance"}[$__rate_interval])))'
    assert _names_and_labels(right) == ({"idrep_stage_duration_seconds_bucket"}, {"stage", "le", "instance"})
    assert _problems(right, exported) == []
    assert _problems('sum by (outcome) (increase(idrep_jobs_total[1h])) / ignoring(outcome) group_left sum(idrep_queue_depth)', exported) == []
    # Planted: a counter without its _total, a typo, a histogram's base name, a label of another metric.
    assert _problems("rate(idrep_jobs[5m])", exported) == ["metric idrep_jobs is not exported by daemon/metrics.py"]
    assert _problems("idrep_queue_depht > 0", exported) == ["metric idrep_queue_depht is not exported by daemon/metrics.py"]
    assert _problems("histogram_quantile(0.5, idrep_seed_drift)", exported) == ["metric idrep_seed_drift is not exported by daemon/metrics.py"]
    assert _problems('idrep_ready{stage="train"}', exported) == ["label stage is on none of ['idrep_ready']"]
    assert _problems("sum by (le) (idrep_seed_drift_count)", exported) == ["label le is on none of ['idrep_seed_drift_count']"]


def test_every_dashboard_and_alert_query_uses_only_what_the_daemon_exports():
    exported = _exported()
    board = _dashboard()
    queries = _dashboard_exprs(board) + [(f"alert {rule['alert']}", rule["expr"]) for rule in _alert_rules()]
    assert len(queries) > 30
    assert _query_problems(queries, exported) == []
    # Planted into the real dashboard: a wrong name and a wrong label are reported, naming the panel.
    first, second = board["panels"][0], board["panels"][1]
    first["targets"][0]["expr"] = first["targets"][0]["expr"].replace("idrep_ready", "idrep_redy")
    second["targets"][0]["expr"] = second["targets"][0]["expr"].replace("{", '{stage="train", ', 1)
    assert _query_problems(_dashboard_exprs(board), exported) == [
        f"panel {first['title']!r} target A: metric idrep_redy is not exported by daemon/metrics.py",
        f"panel {second['title']!r} target A: label stage is on none of ['idrep_models_missing']"]


def test_the_dashboard_imports_into_any_grafana_with_a_prometheus_datasource_variable():
    board = _dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 39  # Grafana 11 and later
    assert board["uid"] and board["title"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert variables["instance"]["datasource"] == source
    ids, cells = set(), set()
    for panel in board["panels"]:
        title = panel.get("title")
        assert title and panel["id"] not in ids, f"panel {panel['id']}: a title and a unique id"
        ids.add(panel["id"])
        assert panel["datasource"] == source, f"panel {title!r}: datasource {panel.get('datasource')}"
        assert panel["targets"], f"panel {title!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], f"panel {title!r}: a target without a query or refId"
            assert target.get("datasource", source) == source, f"panel {title!r} target {target['refId']}"
            assert 'instance=~"$instance"' in target["expr"], f"panel {title!r} target {target['refId']}: not filtered by the daemon variable"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"panel {title!r} runs past the 24 columns"
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"panel {title!r} overlaps another"
        cells |= mine
    # What the issue asks the board to show, each by the metric that shows it.
    used = " ".join(expr for _where, expr in _dashboard_exprs(board))
    for metric in ("idrep_queue_depth", "idrep_job_in_progress", "idrep_stage_in_progress", "idrep_jobs_total",
                   "idrep_stage_duration_seconds_bucket", "idrep_seed_drift_bucket", "idrep_verify_drift_bucket", "idrep_jobs_held",
                   "idrep_models_missing", "idrep_clock_skew_seconds", "idrep_train_loss", "idrep_train_steps_total",
                   "idrep_faces_not_found_total"):
        assert metric in used, f"no panel shows {metric}"


def test_every_alert_says_what_to_do_and_waits_before_firing():
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']}: no `for:` duration"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert len(rule["annotations"]["summary"]) > 20 and len(rule["annotations"]["description"]) > 80, rule["alert"]
    expected = {"IdrepNotReady", "IdrepModelsMissing", "IdrepClaimingPaused", "IdrepJobsHeld", "IdrepCrashLoop", "IdrepClockSkew",
                "IdrepInboxUnreadable", "IdrepClaimLapses", "IdrepDaemonDown"}
    assert expected <= set(names)
    # Each alert is tested firing and not firing in alerts.test.yml.
    tests = yaml.safe_load((MONITORING / "alerts.test.yml").read_text(encoding="utf-8"))["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    for name in names:
        outcomes = {bool(check["exp_alerts"]) for check in checks if check["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: alerts.test.yml must see it firing and not firing (has {outcomes})"


def test_promtool_checks_the_rules_and_the_scrape_config():
    promtool = _promtool()
    for args in (("check", "rules", str(ALERTS)), ("check", "config", str(MONITORING / "prometheus.yml"))):
        done = _run(promtool, *args)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_promtool_runs_the_alert_unit_tests():
    done = _run(_promtool(), "test", "rules", str(MONITORING / "alerts.test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_parses_every_dashboard_query(tmp_path: Path):
    promtool = _promtool()
    rules = [{"record": f"idrep:dashboard:{number}", "expr": _fill_variables(expr)} for number, (_where, expr) in enumerate(_dashboard_exprs(_dashboard()))]
    good = tmp_path / "dashboard-queries.yml"
    good.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    done = _run(promtool, "check", "rules", str(good))
    assert done.returncode == 0, done.stdout + done.stderr
    # The same check on a query with a syntax error fails: promtool does parse them.
    bad = tmp_path / "bad-query.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "idrep:bad", "expr": "sum by (stage (idrep_stage_in_progress)"}]}]}),
                   encoding="utf-8")
    assert _run(promtool, "check", "rules", str(bad)).returncode != 0


def test_the_compose_monitoring_profile_mounts_files_that_exist():
    """compose.yaml's Prometheus and Grafana (profile "monitoring"): not started here (no registry
    is reachable to pull their images), so their wiring is checked as data: pinned images, every
    file they mount present, the scrape target a compose service on the daemon's metrics port."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    monitoring = {name: service for name, service in services.items() if "monitoring" in service.get("profiles", [])}
    assert set(monitoring) == {"prometheus", "grafana"}
    for name, service in monitoring.items():
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", service["image"]), f"{name}: image {service['image']} is not pinned by a version tag"
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text(encoding="utf-8"))
    mounted = {volume.split(":")[1] for volume in monitoring["prometheus"]["volumes"]}
    assert {f"/etc/prometheus/{rules}" for rules in prometheus["rule_files"]} <= mounted
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "idrep"]
    for target in job["static_configs"][0]["targets"]:
        host, port = target.split(":")
        assert host in services and "monitoring" not in services[host].get("profiles", []) and port == "9108", target
    source = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text(encoding="utf-8"))
    assert source["datasources"][0]["url"] == "http://prometheus:9090" and source["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/idrep.yml").read_text(encoding="utf-8"))
    dashboards = provider["providers"][0]["options"]["path"]
    assert any(volume.startswith("./monitoring/grafana-dashboard.json:" + dashboards + "/") for volume in monitoring["grafana"]["volumes"])
