"""The Grafana dashboard: valid dashboard JSON, queries only metrics the tier defines, shipped by the chart.

tests/e2e/test_dashboard_scrape.py checks the same metric names against a real scrape.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "kaireon-pub" / "dashboards" / "kaireon-pub.json"
PANEL_TYPES = {"row", "stat", "timeseries", "gauge", "bargauge", "table", "text", "heatmap"}
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queried_metrics() -> set[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    return set().union(*(re.findall(r"\bkaireon_outbox_[a-z0-9_]+", e) for e in exprs))


def defined_sample_names() -> set[str]:
    """Every sample name the tier's metrics can expose (counter _total, histogram _bucket, ...)."""
    from kaireon_pub import metrics

    names = set()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    return names


def test_dashboard_is_grafana_dashboard_json():
    d = dashboard()
    assert d["uid"] == "kaireon-pub" and len(d["uid"]) <= 40
    assert d["title"] and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None  # an id would clash on import into another Grafana
    names = {v["name"]: v for v in d["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in d["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for opening, closing in ("()", "{}", "[]"):
                assert expr.count(opening) == expr.count(closing), (panel["title"], expr)
            assert 'namespace=~"$namespace"' in expr, (panel["title"], expr)


def test_dashboard_has_the_issue_panels():
    titles = {p["title"] for p in dashboard()["panels"]}
    for wanted in ("Throughput by outcome", "Backlog", "Oldest pending age", "Age at publish (created to acknowledged)",
                   "Failures by kind", "Worker restarts", "Reaper", "Shard ownership", "Pending by shard group"):
        assert wanted in titles


def test_dashboard_queries_only_metrics_the_tier_defines():
    used = queried_metrics()
    assert len(used) >= 15
    unknown = used - defined_sample_names()
    assert not unknown, f"the dashboard queries metrics the tier does not define: {sorted(unknown)}"


def test_chart_ships_the_dashboard_as_a_sidecar_configmap(tmp_path):
    from tests.unit.test_helm_chart import CHART, _helm_python

    python = _helm_python()
    values = {"dashboards": {"enabled": True, "annotations": {"grafana_folder": "Outbox"}}}
    done = subprocess.run([python, str(ROOT / "scripts" / "helm_lint.py"), "render", str(CHART), json.dumps(values)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Outbox"}
    assert json.loads(configmap["data"]["kaireon-pub.json"]) == dashboard()


@pytest.mark.parametrize("values", [{}, {"dashboards": {"enabled": True}, "outboxPublisher": {"enabled": False}}])
def test_chart_renders_no_dashboard_unless_asked(values):
    from tests.unit.test_helm_chart import CHART, _helm_python

    done = subprocess.run([_helm_python(), str(ROOT / "scripts" / "helm_lint.py"), "render", str(CHART),
                           json.dumps(values)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ConfigMap" not in {o["kind"] for o in yaml.safe_load_all(done.stdout) if o}


def github_anchor(heading: str) -> str:
    """GitHub's heading slug: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_runbook_has_every_anchor_that_alerts_dashboard_and_docs_link_to():
    runbook = (ROOT / "docs" / "operations.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", runbook, re.MULTILINE)}
    # The PrometheusRule's runbook_url anchors (tests/unit/test_helm_chart.py pins the same set).
    rule = (ROOT / "helm" / "kaireon-pub" / "templates" / "prometheusrule.yaml").read_text()
    linked = set(re.findall(r'"%s#([a-z0-9-]+)"', rule))
    assert linked == {"outboxbacklog", "liveness-stale", "failed-events"}
    linked |= set(re.findall(r"runbook #([a-z0-9-]+)", DASHBOARD.read_text()))
    linked |= set(re.findall(r"\]\(#([a-z0-9-]+)\)", runbook))
    linked |= set(re.findall(r"operations\.md#([a-z0-9-]+)", (ROOT / "docs" / "deploying.md").read_text()))
    assert not linked - anchors, f"docs/operations.md lacks the sections {sorted(linked - anchors)}"
    # The spec's table and this tier's failure modes each have a section.
    for section in ("publisher-pod-down", "liveness-stale", "broker-down", "database-down", "failed-events",
                    "stuck-rows", "exit-2-bad-configuration", "exit-3-sustained-non-transient-errors",
                    "exit-4-workers-cannot-boot", "lagging-shard", "outboxbacklog"):
        assert section in anchors, section
