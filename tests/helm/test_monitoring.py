"""The chart's PrometheusRule and Grafana dashboard, as `helm template` renders them: promtool checks and
unit-tests the alerts (tests/helm/alerts_test.yaml), every query parses, and every metric a query names is
one the relay or the operator exports (read from their registries, not from a list)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from outbound_operator.metrics import OperatorMetrics
from outbound_relay.metrics import RelayMetrics
from tests.cluster.controlplane import ControlPlane
from tests.helm.chart import find, objects, template
from tests.support.promtool import promtool

pytestmark = pytest.mark.cluster  # helm is the one built for the control plane

ALERT_TESTS = Path(__file__).with_name("alerts_test.yaml")

METRIC = re.compile(r"\boutbound_(?:relay|operator)_[a-z0-9_]+\b")
# A selector of any other metric: `name{` or `name[`, where name is no PromQL function or keyword.
OTHER_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "unless", "and", "or"}


def _sample_names(registry: CollectorRegistry) -> set[str]:
    """What Prometheus stores for each metric family of `registry`, children or not."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    return {f"{family.name}{suffix}" for family in registry.collect() for suffix in suffixes[family.type]}


def exported_metrics() -> set[str]:
    return _sample_names(RelayMetrics().registry) | _sample_names(OperatorMetrics().registry)


def _rules(control_plane: ControlPlane, tmp_path: Path, **values: Any) -> dict[str, Any]:
    prometheus_rule = {"enabled": True, **values}
    docs = objects(template(control_plane, tmp_path, {"metrics": {"prometheusRule": prometheus_rule}}))
    (rule,) = find(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return {"groups": rule["spec"]["groups"]}


def _dashboard(control_plane: ControlPlane, tmp_path: Path, **values: Any) -> tuple[dict[str, Any], Any]:
    grafana = {"enabled": True, **values}
    docs = objects(template(control_plane, tmp_path, {"metrics": {"grafanaDashboard": grafana}}))
    (config_map,) = find(docs, "ConfigMap", "-dashboard")
    return config_map, json.loads(config_map["data"]["outbound-relay.json"])


def _dashboard_queries(dashboard: Any) -> list[str]:
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def _promql(query: str) -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by values they take."""
    return query.replace("$__rate_interval", "5m").replace('=~"$namespace"', '=~".*"')


def _run(*args: str, cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def test_alert_rules_pass_promtool_check_and_unit_tests(control_plane: ControlPlane, tmp_path: Path) -> None:
    rules = _rules(control_plane, tmp_path)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    checked = _run(promtool(), "check", "rules", "rules.yaml", cwd=tmp_path)
    alerts = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    assert f"SUCCESS: {len(alerts)} rules found" in checked
    tested = _run(promtool(), "test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert "SUCCESS" in tested
    # Every alert of the chart has a unit test of its own.
    unit_tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert set(alerts) == unit_tested


def test_alert_values_reach_the_rules(control_plane: ControlPlane, tmp_path: Path) -> None:
    rules = _rules(control_plane, tmp_path, deferralRatio=0.25, additionalRuleLabels={"team": "mail"})
    by_name = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert by_name["OutboundRelayDeferralRate"]["expr"].rstrip().endswith("> 0.25")
    assert "above 25%" in by_name["OutboundRelayDeferralRate"]["annotations"]["description"]
    for rule in by_name.values():
        assert rule["labels"]["team"] == "mail"
        assert rule["labels"]["severity"] in {"warning", "critical"}
    stale = by_name["OutboundRelayConfigStale"]
    assert stale["for"] == "10m"
    assert " ".join(stale["expr"].split()) == (
        "outbound_relay_config_revision_info unless on (namespace, revision) "
        'label_replace(outbound_operator_config_revision_info, "namespace", "$1", "config_namespace", "(.*)")'
    )
    assert "policy" in by_name["OutboundRelayAuthFailures"]["expr"].split("(")[1]  # grouped by policy


def test_dashboard_queries_parse(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Each query, as a recording rule, passes `promtool check rules` (PromQL syntax and functions)."""
    _, dashboard = _dashboard(control_plane, tmp_path)
    queries = [q for q in _dashboard_queries(dashboard) if not q.startswith("label_values(")]
    group = {
        "name": "dashboard",
        "rules": [{"record": f"q:{i}", "expr": _promql(q)} for i, q in enumerate(queries)],
    }
    (tmp_path / "dashboard-rules.yaml").write_text(yaml.safe_dump({"groups": [group]}))
    checked = _run(promtool(), "check", "rules", "dashboard-rules.yaml", cwd=tmp_path)
    assert f"SUCCESS: {len(queries)} rules found" in checked


def test_dashboard_has_the_panels_and_the_sidecar_label(control_plane: ControlPlane, tmp_path: Path) -> None:
    config_map, dashboard = _dashboard(control_plane, tmp_path)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "outbound-relay-system"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    text = json.dumps([p["targets"] for p in panels])
    for metric in (
        "outbound_relay_messages_total",
        "outbound_relay_auth_attempts_total",
        "outbound_relay_delivery_duration_seconds_bucket",
        "outbound_relay_upstream_connections",
        "outbound_relay_oauth2_token_expiry_seconds",
        "outbound_relay_config_revision_info",
        "outbound_operator_reconcile_total",
    ):
        assert metric in text, metric
    config_map, _ = _dashboard(
        control_plane,
        tmp_path,
        labels={"dashboards": "mail", "grafana_dashboard": None},  # null drops a default key
        namespace="monitoring",
        annotations={"f": "Mail"},
    )
    assert config_map["metadata"]["labels"]["dashboards"] == "mail"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"f": "Mail"}


def test_alerts_and_dashboard_use_only_exported_metrics(control_plane: ControlPlane, tmp_path: Path) -> None:
    exported = exported_metrics()
    assert "outbound_relay_messages_total" in exported and "outbound_operator_reconcile_total" in exported
    rules = _rules(control_plane, tmp_path)
    _, dashboard = _dashboard(control_plane, tmp_path)
    queries = [r["expr"] for g in rules["groups"] for r in g["rules"]] + _dashboard_queries(dashboard)
    used: set[str] = set()
    for query in queries:
        used |= set(METRIC.findall(query))
        stripped = re.sub(r'"[^"]*"', '""', query)  # label values and regexes are no selectors
        others = {m for m in OTHER_SELECTOR.findall(stripped) if not METRIC.fullmatch(m)}
        assert not others - PROMQL_WORDS, f"{query}: selects {others}"
    assert used, "no metric found in the queries"
    assert not used - exported, f"not exported by the relay or the operator: {used - exported}"
