"""The Helm chart, checked by real Helm and against the settings registry and the spec.

Helm comes from `helm-sdkpy` (the Helm v4 library), which needs Python >= 3.12: a virtualenv is
made once at .venv-helm/ with such an interpreter, and scripts/helm_lint.py runs there. All
lint and render jobs go to it in one batch per session.
"""

from __future__ import annotations

import copy
import glob
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from kaireon_pub.settings import KAFKA_PREFIX, SETTING_NAMES, SETTINGS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kaireon-pub"
HELM_VENV = ROOT / ".venv-helm"
HELM_REQUIREMENT = "helm-sdkpy==0.1.32"
DEFAULTS = {s.env: s.default for s in SETTINGS}
RELEASE, NAMESPACE = "kaireon", "outbox"

# The spec's "Configuration knobs" and "Helm wiring" blocks, copied verbatim: the contract.
SPEC_OUTBOX_PUBLISHER = {
    "enabled": True,
    "replicas": 1,
    "pollIntervalMs": 2000,
    "shutdownDrainTimeoutMs": 15000,
    "livenessFile": "/tmp/outbox-publisher.alive",
    "livenessProbe": {
        "enabled": True,
        "initialDelaySeconds": 15,
        "periodSeconds": 30,
        "maxStaleSeconds": 90,
        "failureThreshold": 3,
    },
    "pdb": {"enabled": True, "minAvailable": 1},
}
SPEC_OUTBOX_REAPER = {"enabled": True, "schedule": "*/2 * * * *", "path": "/api/v1/cron/outbox-reaper"}
SPEC_BACKLOG_ALERT = {
    "alert": "OutboxBacklog",
    "expr": 'pg_stat_activity_count{state="pending"} > 0\nOR (kaireon_outbox_pending_count > 100)\n',
    "for": "5m",
    "labels": {"severity": "warning"},
    "annotations": {"summary": "Outbox backlog growing — publisher tier may be unhealthy"},
}
# Values the chart deliberately renders differently from the tier's own default, and why.
CHART_OVERRIDES = {
    # Inside a container os.cpu_count() is the node's CPU count, not the pod's share.
    "OUTBOX_WORKERS": "2",
}

FULL = {
    "outboxPublisher": {
        "replicas": 3,
        "pollIntervalMs": 600000,
        "shutdownDrainTimeoutMs": 60500,
        "livenessProbe": {"maxStaleSeconds": 120},
        "pdb": {"minAvailable": "50%"},
        "extraEnv": [{"name": "OUTBOX_BATCH_SIZE", "value": "500"}, {"name": "KAFKA_LINGER_MS", "value": "20"}],
        "podAnnotations": {"example.com/team": "outbox"},
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "database": {"existingSecret": "pg-dsn"},
    "cronSecret": {"existingSecret": "cron", "key": "secret"},
    "kafka": {
        "bootstrapServers": "b-1:9094,b-2:9094",
        "sasl": {"enabled": True, "existingSecret": "kafka-user"},
        "tls": {"enabled": True, "existingSecret": "kafka-tls", "certKey": "tls.crt", "keyKey": "tls.key"},
        "extraConfig": {"KAFKA_COMPRESSION_TYPE": "zstd", "KAFKA_MESSAGE_TIMEOUT_MS": 20000},
    },
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
}
RENDER = {
    "default": {},
    "full": FULL,
    "tier-workers": {"outboxPublisher": {"workers": None}},
    "minimal": {
        "outboxPublisher": {"pdb": {"enabled": False}, "livenessProbe": {"enabled": False},
                            "readinessProbe": {"enabled": False}, "migrate": {"enabled": False}},
        "cron": {"schedules": {"outboxReaper": {"enabled": False}}},
    },
    "off": {"outboxPublisher": {"enabled": False}},
}
# Each must be refused by values.schema.json, at install time, naming the offending value.
BAD = {
    "replicas-string": ({"outboxPublisher": {"replicas": "two"}}, "/outboxPublisher/replicas"),
    "poll-negative": ({"outboxPublisher": {"pollIntervalMs": -1}}, "/outboxPublisher/pollIntervalMs"),
    "drain-too-short": ({"outboxPublisher": {"shutdownDrainTimeoutMs": 10}}, "/outboxPublisher/shutdownDrainTimeoutMs"),
    "typo": ({"outboxPublisher": {"pollIntervalMS": 500}}, "pollIntervalMS"),
    "unknown-env": ({"outboxPublisher": {"extraEnv": [{"name": "OUTBOX_POLL_MS", "value": "5"}]}}, "/outboxPublisher/extraEnv/0/name"),
    "kafka-not-prefixed": ({"kafka": {"extraConfig": {"LINGER_MS": "5"}}}, "LINGER_MS"),
    "cron-relative-path": ({"cron": {"schedules": {"outboxReaper": {"path": "api/v1/cron/outbox-reaper"}}}}, "/cron/schedules/outboxReaper/path"),
}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def values_yaml() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


# ---- the Helm runner ------------------------------------------------------------------------


def _find_python312() -> str | None:
    """An interpreter >= 3.12: this one, one on PATH, or one of pyenv's (its shims refuse to
    run without PYENV_VERSION, so the versions directory is searched too)."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [os.environ.get("KAIREON_HELM_PYTHON"), sys.executable]
    candidates += [shutil.which(name) for name in ("python3.13", "python3.12", "python3")]
    candidates += sorted(glob.glob(os.path.join(root, "versions", "3.1[2-9]*", "bin", "python3")), reverse=True)
    for candidate in candidates:
        if not candidate:
            continue
        try:
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                                   capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


def _helm_python() -> str:
    """.venv-helm/bin/python, made on first use; a stamp names what is installed in it."""
    python = HELM_VENV / "bin" / "python"
    stamp = HELM_VENV / "kaireon-helm.stamp"
    if python.exists() and stamp.exists() and stamp.read_text() == HELM_REQUIREMENT:
        return str(python)
    base = _find_python312()
    if base is None:
        pytest.skip("helm-sdkpy needs Python >= 3.12 and none was found (PATH, pyenv, KAIREON_HELM_PYTHON)")
    for cmd in ([base, "-m", "venv", "--clear", str(HELM_VENV)],
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", HELM_REQUIREMENT]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    stamp.write_text(HELM_REQUIREMENT)
    return str(python)


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> dict[str, dict]:
    """Every Helm job of this module, run in one batch: {job name: result}."""
    python = _helm_python()
    defaults = values_yaml()
    jobs: dict[str, dict] = {"lint:default": {"op": "lint", "chart": str(CHART)}}
    # Lint renders with the chart's own values.yaml only, so variants lint a copy of the chart.
    for name, override in [("full", FULL), ("off", RENDER["off"]), ("bad", BAD["replicas-string"][0])]:
        copy_dir = tmp_path_factory.mktemp(f"chart-{name}") / "kaireon-pub"
        shutil.copytree(CHART, copy_dir)
        (copy_dir / "values.yaml").write_text(json.dumps(deep_merge(defaults, override)))  # JSON is YAML
        jobs[f"lint:{name}"] = {"op": "lint", "chart": str(copy_dir)}
    for name, values in RENDER.items():
        jobs[f"render:{name}"] = {"op": "render", "chart": str(CHART), "values": values,
                                  "release": RELEASE, "namespace": NAMESPACE}
    for name, (values, _) in BAD.items():
        jobs[f"bad:{name}"] = {"op": "render", "chart": str(CHART), "values": values}
    done = subprocess.run([python, str(ROOT / "scripts" / "helm_lint.py"), "batch"],
                          input=json.dumps(list(jobs.values())), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"scripts/helm_lint.py failed:\n{done.stderr}"
    return dict(zip(jobs, json.loads(done.stdout), strict=True))


def rendered(helm: dict, name: str) -> dict[str, dict]:
    """The objects of a rendered variant, by kind (the chart makes at most one of each)."""
    result = helm[f"render:{name}"]
    assert result["ok"], f"helm install ({name}) failed: {result['error']}"
    objects = [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {o["kind"]: o for o in objects}


def pod_specs(objects: dict[str, dict]) -> list[dict]:
    specs = []
    if "Deployment" in objects:
        specs.append(objects["Deployment"]["spec"]["template"]["spec"])
    if "CronJob" in objects:
        specs.append(objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return specs


def publisher(objects: dict[str, dict]) -> dict:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env names in {container['name']}: {names}"
    return {e["name"]: e for e in container.get("env", [])}


# ---- Helm lint and the schema ---------------------------------------------------------------


def test_chart_lints_clean_with_default_values(helm):
    result = helm["lint:default"]
    # helm-sdkpy drops lint messages' text; Helm's own error comes from the render of the same values.
    assert result["ok"], f"helm lint: {result['messages']}; install says: {helm['render:default'].get('error')}"


@pytest.mark.parametrize("variant", ["full", "off"])
def test_chart_lints_clean_with_variant_values(helm, variant):
    assert helm[f"lint:{variant}"]["ok"], helm[f"lint:{variant}"]["messages"]


def test_lint_rejects_values_that_break_the_schema(helm):
    result = helm["lint:bad"]
    assert not result["ok"]
    assert {"severity": "error", "path": "values.yaml"} in result["messages"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_install_rejects_bad_values_through_the_schema(helm, case):
    result = helm[f"bad:{case}"]
    assert not result["ok"], f"{BAD[case][0]} was accepted"
    assert "schema" in result["error"] and BAD[case][1] in result["error"], result["error"]


def test_schema_env_names_are_the_settings_registry():
    """extraEnv may name a tier setting or a KAFKA_* pass-through, nothing else."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    pattern = schema["properties"]["outboxPublisher"]["properties"]["extraEnv"]["items"]["properties"]["name"]["pattern"]
    named = set(re.fullmatch(r"\^\((.*)\|KAFKA_\[A-Z0-9_\]\+\)\$", pattern).group(1).split("|"))
    assert named == SETTING_NAMES, f"update the extraEnv name pattern: missing {SETTING_NAMES - named}, unknown {named - SETTING_NAMES}"


# ---- values.yaml: the spec's knobs, one source of truth ------------------------------------


def test_values_have_the_spec_knobs_with_the_spec_defaults():
    values = values_yaml()
    spec_keys = {k: values["outboxPublisher"][k] for k in SPEC_OUTBOX_PUBLISHER}
    assert spec_keys == SPEC_OUTBOX_PUBLISHER
    assert values["cron"]["schedules"]["outboxReaper"] == SPEC_OUTBOX_REAPER


def test_values_defaults_are_the_tier_defaults():
    values = values_yaml()
    p = values["outboxPublisher"]
    assert str(p["pollIntervalMs"]) == DEFAULTS["OUTBOX_POLL_INTERVAL_MS"]
    assert str(p["shutdownDrainTimeoutMs"]) == DEFAULTS["OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS"]
    assert p["livenessFile"] == DEFAULTS["OUTBOX_LIVENESS_FILE"]
    assert str(values["http"]["port"]) == DEFAULTS["OUTBOX_HTTP_PORT"]


def test_rendered_env_defaults_are_the_tier_defaults(helm):
    """A literal the chart sets is the tier's own default, unless listed with a reason."""
    for spec in pod_specs(rendered(helm, "default")):
        for container in spec["containers"] + spec.get("initContainers", []):
            for name, entry in env_of(container).items():
                if "value" not in entry or DEFAULTS.get(name) is None:
                    continue
                assert entry["value"] == CHART_OVERRIDES.get(name, DEFAULTS[name]), (container["name"], name)
    assert "OUTBOX_WORKERS" not in env_of(publisher(rendered(helm, "tier-workers")))


@pytest.mark.parametrize("variant", sorted(RENDER))
def test_every_env_var_the_chart_sets_is_read_by_the_tier(helm, variant):
    for spec in pod_specs(rendered(helm, variant)):
        for container in spec["containers"] + spec.get("initContainers", []):
            unknown = {n for n in env_of(container) if n not in SETTING_NAMES and not n.startswith(KAFKA_PREFIX)}
            assert not unknown, f"{container['name']} sets {unknown}, which kaireon_pub.settings does not read"


def test_every_value_is_in_the_docs_table():
    doc = (ROOT / "docs" / "deploying.md").read_text()
    free_form = {"outboxPublisher.resources"}  # a Kubernetes object, documented as a whole

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and path not in free_form:
                yield from leaves(value, path + ".")
            else:
                yield path

    missing = [p for p in leaves(values_yaml()) if f"`{p}`" not in doc]
    assert not missing, f"docs/deploying.md's values table lacks {missing}"


# ---- the rendered publisher -----------------------------------------------------------------


def test_default_render_has_the_spec_objects(helm):
    objects = rendered(helm, "default")
    assert set(objects) == {"Deployment", "Service", "PodDisruptionBudget", "CronJob"}
    assert objects["Deployment"]["metadata"]["name"].endswith("-outbox-publisher")
    assert objects["Deployment"]["spec"]["replicas"] == 1


def test_publisher_env_carries_the_spec_values(helm):
    env = env_of(publisher(rendered(helm, "default")))
    assert env["OUTBOX_POLL_INTERVAL_MS"]["value"] == "2000"
    assert env["OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS"]["value"] == "15000"
    assert env["OUTBOX_LIVENESS_FILE"]["value"] == "/tmp/outbox-publisher.alive"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-kaireon-pub-database", "key": "DATABASE_URL"}
    assert env["CRON_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-kaireon-pub-cron", "key": "CRON_SECRET"}
    assert env["KAFKA_BOOTSTRAP_SERVERS"]["value"]


def test_liveness_probe_is_the_exec_check_of_the_file_age(helm):
    probe = publisher(rendered(helm, "default"))["livenessProbe"]
    assert probe["exec"]["command"] == ["kaireon-pub", "liveness-check", "--max-stale-seconds", "90"]
    assert (probe["initialDelaySeconds"], probe["periodSeconds"], probe["failureThreshold"]) == (15, 30, 3)
    full = publisher(rendered(helm, "full"))["livenessProbe"]
    assert full["exec"]["command"][-1] == "120"


def test_readiness_probe_is_readyz_on_the_tier_port(helm):
    container = publisher(rendered(helm, "default"))
    (port,) = container["ports"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert str(port["containerPort"]) == env_of(container)["OUTBOX_HTTP_PORT"]["value"]
    assert "readinessProbe" not in publisher(rendered(helm, "minimal"))
    assert "livenessProbe" not in publisher(rendered(helm, "minimal"))


@pytest.mark.parametrize("variant,drain_ms", [("default", 15000), ("full", 60500)])
def test_termination_grace_outlasts_the_drain_budget(helm, variant, drain_ms):
    objects = rendered(helm, variant)
    grace = objects["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain_ms / 1000
    assert env_of(publisher(objects))["OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS"]["value"] == str(drain_ms)


def test_large_numbers_render_as_integers(helm):
    env = env_of(publisher(rendered(helm, "full")))
    assert env["OUTBOX_POLL_INTERVAL_MS"]["value"] == "600000"
    assert env["KAFKA_MESSAGE_TIMEOUT_MS"]["value"] == "20000"


def test_pdb_and_service_select_the_publisher_pods(helm):
    objects = rendered(helm, "default")
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    for selector in (objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], objects["Service"]["spec"]["selector"]):
        assert selector.items() <= pod_labels.items()
    assert rendered(helm, "full")["PodDisruptionBudget"]["spec"]["minAvailable"] == "50%"


def test_pod_runs_non_root_on_a_read_only_root_with_tmp_in_memory(helm):
    spec = rendered(helm, "default")["Deployment"]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (init,) = spec["initContainers"]
    assert init["args"] == ["migrate"]
    for container in spec["containers"] + spec["initContainers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    (tmp,) = [v for v in spec["volumes"] if v["name"] == "tmp"]
    assert tmp["emptyDir"]["medium"] == "Memory"
    assert "initContainers" not in rendered(helm, "minimal")["Deployment"]["spec"]["template"]["spec"]


def test_kafka_sasl_and_tls_come_from_existing_secrets(helm):
    objects = rendered(helm, "full")
    container = publisher(objects)
    env = env_of(container)
    assert env["KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
    assert env["KAFKA_SASL_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "kafka-user"
    assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "kafka-user"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kafka-tls"]
    for name, key in [("KAFKA_SSL_CA_LOCATION", "ca.crt"), ("KAFKA_SSL_CERTIFICATE_LOCATION", "tls.crt"), ("KAFKA_SSL_KEY_LOCATION", "tls.key")]:
        assert env[name]["value"] == f"{mount['mountPath']}/{key}"
    volumes = objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "kafka-tls", "secret": {"secretName": "kafka-tls"}} in volumes
    assert env["OUTBOX_BATCH_SIZE"]["value"] == "500"  # extraEnv
    # No secret value is ever inlined: every KAFKA_SASL_* comes from a Secret.
    assert all("valueFrom" in e for n, e in env.items() if n.startswith("KAFKA_SASL_") and n != "KAFKA_SASL_MECHANISM")


def test_disabled_publisher_renders_nothing(helm):
    assert helm["render:off"]["ok"], helm["render:off"].get("error")
    assert not [d for d in yaml.safe_load_all(helm["render:off"]["manifest"]) if d]
    assert "CronJob" not in rendered(helm, "minimal") and "PodDisruptionBudget" not in rendered(helm, "minimal")


# ---- the reaper CronJob ---------------------------------------------------------------------


def reaper(helm: dict) -> tuple[dict, dict]:
    objects = rendered(helm, "default")
    return objects["CronJob"], objects["Service"]


def test_reaper_cronjob_calls_the_route_on_the_service_with_the_secret(helm):
    cron, service = reaper(helm)
    assert cron["spec"]["schedule"] == "*/2 * * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script = container["args"][-1]
    port = service["spec"]["ports"][0]["port"]
    assert f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}/api/v1/cron/outbox-reaper" in script
    assert env_of(container)["CRON_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-kaireon-pub-cron"


class _Route(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        type(self).seen.append({"path": self.path, "secret": self.headers.get("x-cron-secret")})
        body = b'{"status": "ok", "resetCount": 0}'
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("status,exit_code", [(200, 0), (401, 1), (302, 1), (500, 1)])
def test_reaper_job_script_fails_on_any_non_2xx(helm, status, exit_code):
    """Runs the CronJob's own script with curl against a stand-in route."""
    if shutil.which("curl") is None or shutil.which("sh") is None:
        pytest.skip("curl and sh are needed to run the CronJob's script")
    cron, service = reaper(helm)
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    _Route.status, _Route.seen = status, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Route)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        service_url = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
        script = container["args"][-1].replace(service_url, f"http://127.0.0.1:{server.server_port}")
        done = subprocess.run([*container["command"], script], env={"PATH": os.environ["PATH"], "CRON_SECRET": "s3cret"},
                              capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == exit_code, done.stderr
    assert _Route.seen == [{"path": "/api/v1/cron/outbox-reaper", "secret": "s3cret"}]


# ---- monitoring -----------------------------------------------------------------------------


def test_service_monitor_scrapes_metrics_on_the_service_port(helm):
    objects = rendered(helm, "full")
    (endpoint,) = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == objects["Service"]["spec"]["ports"][0]["name"]
    assert objects["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= objects["Service"]["metadata"]["labels"].items()


def test_prometheus_rule_has_the_spec_backlog_alert_and_runbooks(helm):
    from kaireon_pub import metrics

    (group,) = rendered(helm, "full")["PrometheusRule"]["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    backlog = copy.deepcopy(rules["OutboxBacklog"])
    runbook = backlog["annotations"].pop("runbook_url")
    assert backlog == SPEC_BACKLOG_ALERT
    anchors = {name: r["annotations"]["runbook_url"].rsplit("#", 1) for name, r in rules.items()}
    assert {a for _, a in anchors.values()} == {"outboxbacklog", "liveness-stale", "failed-events"}
    assert all(url.endswith("docs/operations.md") for url, _ in anchors.values()), runbook
    # Each alert reads metrics the tier exports (names as Prometheus sees them).
    families = [f for m in vars(metrics).values() if isinstance(m, MetricWrapperBase) for f in m.describe()]
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    used = set().union(*(re.findall(r"kaireon_outbox_[a-z_]+", r["expr"]) for r in rules.values()))
    assert used <= exported, used - exported
    assert "> 120" in rules["OutboxLivenessStale"]["expr"]  # follows livenessProbe.maxStaleSeconds
