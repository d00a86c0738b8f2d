"""The Grafana dashboard: valid dashboard JSON, queries only metrics the tier defines and every one
of them, PromQL that parses, shipped by the chart with a uid of its own per release.

tests/e2e/test_dashboard_scrape.py checks the same metric names against a real scrape.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "kaireon-pub" / "dashboards" / "kaireon-pub.json"
PANEL_TYPES = {"row", "stat", "timeseries", "gauge", "bargauge", "table", "text", "heatmap"}
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
# What Grafana puts in place of its variables before a query reaches Prometheus (values as it would).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h", "${datasource}": "prom",
                     "$namespace": ".*", "$job": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queried_metrics() -> set[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    return set().union(*(re.findall(r"\bkaireon_outbox_[a-z0-9_]+", e) for e in exprs))


def targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def as_prometheus_sees_it(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def metric_families() -> dict[str, str]:
    """{family name: type} of every metric kaireon_pub.metrics defines."""
    from kaireon_pub import metrics

    return {f.name: f.type for m in vars(metrics).values() if isinstance(m, MetricWrapperBase) for f in m.describe()}


def render(values: dict, release: str = "kaireon", namespace: str = "outbox") -> list[dict]:
    from tests.unit.test_helm_chart import CHART, _helm_python

    done = subprocess.run([_helm_python(), str(ROOT / "scripts" / "helm_lint.py"), "render", str(CHART),
                           json.dumps(values), "--release", release, "--namespace", namespace],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [o for o in yaml.safe_load_all(done.stdout) if o]


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
    # The file's uid, for a manual import; the chart's ConfigMap gives each release its own.
    assert d["uid"] == "kaireon-pub" and len(d["uid"]) <= 40
    assert d["title"] and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None  # an id would clash on import into another Grafana
    names = {v["name"]: v for v in d["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    assert names["job"]["includeAll"] and names["job"]["allValue"] == ".*"
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
            assert 'job=~"$job"' in expr, (panel["title"], expr)


def test_dashboard_has_the_issue_panels():
    titles = {p["title"] for p in dashboard()["panels"]}
    for wanted in ("Throughput by outcome", "Backlog", "Oldest pending age", "Age at publish (created to acknowledged)",
                   "Failures by kind", "Worker restarts", "Reaper", "Shard ownership", "Pending by shard group",
                   "Lease renewals failed, order violations", "Purge", "Reaper and purge duration"):
        assert wanted in titles


def test_every_metric_the_tier_defines_is_on_a_panel():
    used = queried_metrics()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    missing = [name for name, kind in metric_families().items() if not {name + s for s in suffixes[kind]} & used]
    assert not missing, f"metrics on no panel of the dashboard: {sorted(missing)}"


def test_every_panel_query_parses_as_promql():
    for title, expr in targets():
        try:
            promql_parser.parse(as_prometheus_sees_it(expr))
        except ValueError as exc:
            pytest.fail(f"{title}: {expr}: {exc}")
    # The variables' queries: label_values(<selector>, label) is Grafana's; its selector is PromQL.
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
            promql_parser.parse(as_prometheus_sees_it(selector))
            assert label == variable["name"]


def test_promql_check_catches_a_broken_query():
    with pytest.raises(ValueError):
        promql_parser.parse(as_prometheus_sees_it('sum(rate(kaireon_outbox_processed_total{job=~"$job"}[$__rate_interval])'))


def test_dashboard_queries_only_metrics_the_tier_defines():
    used = queried_metrics()
    assert len(used) >= 15
    unknown = used - defined_sample_names()
    assert not unknown, f"the dashboard queries metrics the tier does not define: {sorted(unknown)}"


def shipped_dashboard(objects: list[dict]) -> tuple[dict, dict]:
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    return configmap, json.loads(configmap["data"]["kaireon-pub.json"])


def test_chart_ships_the_dashboard_as_a_sidecar_configmap():
    values = {"dashboards": {"enabled": True, "annotations": {"grafana_folder": "Outbox"}}}
    objects = render(values)
    configmap, shipped = shipped_dashboard(objects)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Outbox"}
    # The file as it is, but for the release's uid and title and the job variable preselected.
    (service,) = [o for o in objects if o["kind"] == "Service"]
    job = {v["name"]: v for v in shipped["templating"]["list"]}["job"]
    assert job["current"] == {"text": [service["metadata"]["name"]], "value": [service["metadata"]["name"]]}
    expected = dashboard()
    for variable in expected["templating"]["list"]:
        if variable["name"] == "job":
            variable["current"] = job["current"]
    expected.update(uid=shipped["uid"], title=shipped["title"])
    assert shipped == expected


def test_two_releases_ship_dashboards_with_different_uids():
    """Grafana keys dashboards by uid: one fixed uid and the second release's dashboard replaces the first's."""
    values = {"dashboards": {"enabled": True}}
    shipped = [shipped_dashboard(render(values, release, namespace))[1]
               for release, namespace in [("kaireon", "outbox"), ("payments", "outbox"), ("kaireon", "staging")]]
    uids = [d["uid"] for d in shipped]
    assert len(set(uids)) == 3 and all(re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", uid) for uid in uids), uids
    assert len({d["title"] for d in shipped}) == 3
    assert shipped_dashboard(render(values))[1]["uid"] == uids[0]  # stable across upgrades


@pytest.mark.parametrize("values", [{}, {"dashboards": {"enabled": True}, "outboxPublisher": {"enabled": False}}])
def test_chart_renders_no_dashboard_unless_asked(values):
    assert "ConfigMap" not in {o["kind"] for o in render(values)}


def github_anchor(heading: str) -> str:
    """GitHub's heading slug: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_runbook_has_every_anchor_that_alerts_dashboard_and_docs_link_to():
    runbook = (ROOT / "docs" / "operations.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", runbook, re.MULTILINE)}
    # The PrometheusRule's runbook_url anchors (tests/unit/test_helm_chart.py pins the same set).
    rule = (ROOT / "helm" / "kaireon-pub" / "templates" / "prometheusrule.yaml").read_text()
    linked = set(re.findall(r'"%s#([a-z0-9-]+)"', rule))
    assert linked == {"outboxbacklog", "publisher-pod-down", "liveness-stale", "failed-events",
                      "pending-rows-held-back-by-a-long-transaction", "database-down", "broker-down",
                      "stuck-rows", "prove-nothing-was-lost", "dead-letters"}
    linked |= set(re.findall(r"runbook #([a-z0-9-]+)", DASHBOARD.read_text()))
    linked |= set(re.findall(r"\]\(#([a-z0-9-]+)\)", runbook))
    linked |= set(re.findall(r"operations\.md#([a-z0-9-]+)", (ROOT / "docs" / "deploying.md").read_text()))
    assert not linked - anchors, f"docs/operations.md lacks the sections {sorted(linked - anchors)}"
    # The spec's table and this tier's failure modes each have a section.
    for section in ("publisher-pod-down", "liveness-stale", "broker-down", "database-down", "failed-events",
                    "stuck-rows", "exit-2-bad-configuration", "exit-3-sustained-non-transient-errors",
                    "exit-4-workers-cannot-boot", "lagging-shard", "outboxbacklog"):
        assert section in anchors, section
