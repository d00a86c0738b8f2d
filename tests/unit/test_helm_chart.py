"""The Helm chart, checked by real Helm and against the settings registry and the spec.

Helm comes from `helm-sdkpy` (the Helm v4 library), which needs Python >= 3.12: a virtualenv is
made once at .venv-helm/ with such an interpreter, and scripts/helm_lint.py runs there. All
lint and render jobs go to it in one batch per session.

Every object of every rendered variant is validated against the Kubernetes OpenAPI schemas
(`kubernetes-validate`, strict); the Prometheus Operator's custom resources, which it has no
schema for, are checked field by field here, and every PromQL expression is parsed by
`promql-parser`. KEDA's ScaledObject and TriggerAuthentication are validated against the
openAPIV3Schema of KEDA's published CRDs (vendored under tests/unit/schemas/keda/), as strictly.
"""

from __future__ import annotations

import copy
import fcntl
import glob
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from kaireon_pub.settings import KAFKA_PREFIX, SETTING_NAMES, SETTINGS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kaireon-pub"
HELM_VENV = ROOT / ".venv-helm"
HELM_REQUIREMENT = "helm-sdkpy==0.1.32"
CHART_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
DEFAULTS = {s.env: s.default for s in SETTINGS}
RELEASE, NAMESPACE = "kaireon", "outbox"
MONITORING_API = "monitoring.coreos.com/v1"
KEDA_API = "keda.sh/v1alpha1"
KEDA_SCHEMAS = Path(__file__).resolve().parent / "schemas" / "keda"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the validator ships.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Metrics an alert may read before every image in use exports them (the rule is off by default).
PENDING_METRICS: set[str] = set()

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
# The spec's alert, as kept: name, duration, severity, summary and the gauge's threshold. Its
# pg_stat_activity_count{state="pending"} term is dropped (pg_stat_activity has no such state).
SPEC_BACKLOG_ALERT = {
    "alert": "OutboxBacklog",
    "for": "5m",
    "labels": {"severity": "warning"},
    "summary": "Outbox backlog growing — publisher tier may be unhealthy",
    "threshold": ("kaireon_outbox_pending_count", ">", 100.0),
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
        "extraEnv": [{"name": "OUTBOX_BATCH_SIZE", "value": "500"}, {"name": "KAFKA_LINGER_MS", "value": "20"},
                     {"name": "OUTBOX_STATEMENT_TIMEOUT_MS", "value": "60000"}],
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
MONITORING = {
    "metrics": {"serviceMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True, "horizonAge": {"enabled": True}}},
    "dashboards": {"enabled": True},
}
REAPER_OFF = {"cron": {"schedules": {"outboxReaper": {"enabled": False}}}}
EXAMPLES = CHART / "examples"
PGBOUNCER_ENV = [{"name": "OUTBOX_POOL_MODE", "value": "transaction"},
                 {"name": "OUTBOX_LISTEN_DATABASE_URL",
                  "valueFrom": {"secretKeyRef": {"name": "pg-direct", "key": "url"}}}]
KNOBS = {
    "commonLabels": {"example.com/team": "outbox", "example.com/cost-center": "42"},
    "serviceAccount": {"create": True, "annotations": {"iam.example.com/role": "outbox"}, "automount": True},
    "outboxPublisher": {"replicas": 2, "priorityClassName": "outbox-high",
                        "podLabels": {"example.com/team": "publisher"},
                        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "outbox",
                                         "effect": "NoSchedule"}],
                        "nodeSelector": {"example.com/pool": "outbox"},
                        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                               "labelSelector": {"matchLabels": {"app": "x"}}}}]}}},
    "cron": {"podAnnotations": {"example.com/owner": "outbox"}, "priorityClassName": "outbox-low",
             "nodeSelector": {"example.com/pool": "outbox"},
             "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
             "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                 {"weight": 1, "preference": {"matchExpressions": [
                     {"key": "example.com/pool", "operator": "In", "values": ["outbox"]}]}}]}}},
}
SUBCHART_VALUES = {"global": {"imageRegistry": "registry.example", "storageClass": "fast"}, "enabled": True}
RUNBOOK = "https://wiki.example/runbooks/outbox"
PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"
KEDA = {"autoscaling": {"keda": {"enabled": True,
                                 "prometheus": {"serverAddress": PROMETHEUS_URL, "oldestPendingAgeSeconds": 120},
                                 "postgresql": {"enabled": True}}}}
RENDER = {
    "default": {},
    "full": FULL,
    "tier-workers": {"outboxPublisher": {"workers": None}},
    "minimal": {
        "outboxPublisher": {"pdb": {"enabled": False}, "livenessProbe": {"enabled": False},
                            "readinessProbe": {"enabled": False}, "migrate": {"enabled": False}},
        **REAPER_OFF,
    },
    "off": {"outboxPublisher": {"enabled": False}},
    "replicas-3": {"outboxPublisher": {"replicas": 3}},
    "reaper-off": REAPER_OFF,
    "monitoring": MONITORING,
    "monitoring-without-crds": MONITORING,
    "monitoring-other-release": MONITORING,
    "pdb-2-of-2": {"outboxPublisher": {"replicas": 2, "pdb": {"minAvailable": 2}}},
    "pdb-50%-of-2": {"outboxPublisher": {"replicas": 2, "pdb": {"minAvailable": "50%"}}},
    "pdb-100%-of-3": {"outboxPublisher": {"replicas": 3, "pdb": {"minAvailable": "100%"}}},
    "spread-custom": {"outboxPublisher": {"topologySpreadConstraints": [
        {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
         "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "outbox-publisher"}}}]}},
    "digest": {"image": {"digest": "sha256:" + "ab" * 32}},
    "migrate-lock-timeout": {"outboxPublisher": {"migrate": {"lockTimeoutSeconds": 600}}},
    "cron-secret-without-reaper": {**REAPER_OFF, "cronSecret": {"existingSecret": "external-cron"}},
    # Autoscaling: an HPA on the adapter's external metrics, or a KEDA ScaledObject.
    "hpa": {"autoscaling": {"hpa": {"enabled": True}}},
    "hpa-age-min-1": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4,
                                      "hpa": {"enabled": True, "pendingPerReplica": None, "oldestPendingAgeSeconds": 60,
                                              "metricSelector": {"service": "outbox"}}}},
    "keda": KEDA,
    "keda-postgresql-only": {"autoscaling": {"minReplicas": 3, "maxReplicas": 8, "behavior": None,
                                             "keda": {"enabled": True, "prometheus": {"enabled": False},
                                                      "postgresql": {"enabled": True, "pendingPerReplica": 5000,
                                                                     "existingSecret": "pg-direct",
                                                                     "key": "DIRECT_URL"}}}},
    "keda-without-crds": KEDA,
    **{f"schedule:{macro}": {"cron": {"schedules": {"outboxReaper": {"schedule": macro}}}}
       for macro in ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly", "0 */6 * * 1-5")},
    # Issue 26: what the migrate init container needs, the common knobs, OpenShift, a NetworkPolicy.
    "pgbouncer": {"outboxPublisher": {"extraEnv": PGBOUNCER_ENV}},
    "partitioning": {"outboxPublisher": {
        "extraEnv": [{"name": "OUTBOX_PARTITIONING", "value": "daily"},
                     {"name": "OUTBOX_FAILED_RETENTION_SECONDS", "value": "86400"},
                     {"name": "OTEL_SERVICE_NAME", "value": "outbox"}, {"name": "KAFKA_LINGER_MS", "value": "20"}],
        "extraEnvFrom": [{"configMapRef": {"name": "outbox-settings"}}],
        "extraVolumes": [{"name": "pg-ca", "secret": {"secretName": "pg-ca"}}],
        "extraVolumeMounts": [{"name": "pg-ca", "mountPath": "/etc/pg-ca", "readOnly": True}]}},
    # The schema owner's DSN for migrate, the runtime role's behind PgBouncer for the tier.
    "migrate-owner": {"outboxPublisher": {"migrate": {"existingSecret": "pg-owner", "key": "OWNER_URL"},
                                          "extraEnv": PGBOUNCER_ENV}},
    # The settings' checks relate the reaper staleness and the worker timeout to the drain budget
    # and message.timeout.ms: migrate must get those too, or it refuses what the publisher accepts.
    "migrate-related-settings": {"outboxPublisher": {
        "shutdownDrainTimeoutMs": 5000,
        "extraEnv": [{"name": "OUTBOX_REAPER_STALENESS_SECONDS", "value": "20"},
                     {"name": "OUTBOX_WORKER_TIMEOUT_SECONDS", "value": "8"}]},
        "kafka": {"extraConfig": {"KAFKA_MESSAGE_TIMEOUT_MS": 5000}}},
    "knobs": KNOBS,
    "networkpolicy": yaml.safe_load((EXAMPLES / "networkpolicy.yaml").read_text()),
    "networkpolicy-closed": {"networkPolicy": {"enabled": True, "egress": {"dns": {"enabled": False}}}, **REAPER_OFF},
    "networkpolicy-extra": {"networkPolicy": {"enabled": True, "egress": {"extra": [
        {"to": [{"ipBlock": {"cidr": "10.30.0.10/32"}}], "ports": [{"port": 4317, "protocol": "TCP"}]}]}}},
    "openshift": yaml.safe_load((EXAMPLES / "openshift.yaml").read_text()),
    "example-pgbouncer": yaml.safe_load((EXAMPLES / "pgbouncer.yaml").read_text()),
    # What a parent chart sets when this chart is its dependency (see also the "subchart" job).
    "subchart-values": SUBCHART_VALUES,
    "monitoring-runbook": {"metrics": {"serviceMonitor": {"enabled": True},
                                       "prometheusRule": {"enabled": True, "runbookUrl": RUNBOOK}}},
    "monitoring-without-readiness": {"metrics": {"prometheusRule": {"enabled": True}},
                                     "outboxPublisher": {"readinessProbe": {"enabled": False}}},
    # The continuous auditor on (issue 27), its alert's window changed; and its alert turned off.
    "auditor": {"outboxPublisher": {"auditSamplePerMinute": 60},
                "metrics": {"prometheusRule": {"enabled": True, "auditFindings": {"window": "30m"}}}},
    "monitoring-audit-alert-off": {"metrics": {"prometheusRule": {"enabled": True,
                                                                  "auditFindings": {"enabled": False}}}},
}
# Variants rendered as on a cluster with the Prometheus Operator's CRDs (helm --api-versions).
WITH_MONITORING_API = {"full", "monitoring", "monitoring-other-release", "monitoring-runbook",
                       "monitoring-without-readiness", "auditor", "monitoring-audit-alert-off"}
# Variants rendered as on a cluster with KEDA's CRDs.
WITH_KEDA_API = {"keda", "keda-postgresql-only"}
RELEASE_OF = {"monitoring-other-release": "payments"}
# Each must be refused by values.schema.json, at install time, naming the offending value.
BAD = {
    "replicas-string": ({"outboxPublisher": {"replicas": "two"}}, "/outboxPublisher/replicas"),
    "poll-negative": ({"outboxPublisher": {"pollIntervalMs": -1}}, "/outboxPublisher/pollIntervalMs"),
    "drain-too-short": ({"outboxPublisher": {"shutdownDrainTimeoutMs": 10}},
                        "/outboxPublisher/shutdownDrainTimeoutMs"),
    "typo": ({"outboxPublisher": {"pollIntervalMS": 500}}, "pollIntervalMS"),
    "unknown-env": ({"outboxPublisher": {"extraEnv": [{"name": "OUTBOX_POLL_MS", "value": "5"}]}},
                    "/outboxPublisher/extraEnv/0/name"),
    "kafka-not-prefixed": ({"kafka": {"extraConfig": {"LINGER_MS": "5"}}}, "LINGER_MS"),
    "cron-relative-path": ({"cron": {"schedules": {"outboxReaper": {"path": "api/v1/cron/outbox-reaper"}}}},
                           "/cron/schedules/outboxReaper/path"),
    # The root filesystem is read-only: a liveness file outside /tmp crash-loops the pod.
    "liveness-outside-tmp": ({"outboxPublisher": {"livenessFile": "/var/run/outbox.alive"}},
                             "/outboxPublisher/livenessFile"),
    "liveness-escapes-tmp": ({"outboxPublisher": {"livenessFile": "/tmp/../etc/outbox.alive"}},
                             "/outboxPublisher/livenessFile"),
    "liveness-is-tmp": ({"outboxPublisher": {"livenessFile": "/tmp/"}}, "/outboxPublisher/livenessFile"),
    "env-set-by-chart": ({"outboxPublisher": {"extraEnv": [{"name": "DATABASE_URL", "value": "postgresql://x"}]}},
                         "/outboxPublisher/extraEnv/0/name"),
    "env-secret-inline": ({"outboxPublisher": {"extraEnv": [{"name": "CRON_SECRET", "value": "s3cret"}]}},
                          "/outboxPublisher/extraEnv/0/name"),
    "pdb-over-100%": ({"outboxPublisher": {"pdb": {"minAvailable": "150%"}}}, "/outboxPublisher/pdb/minAvailable"),
    "schedule-words": ({"cron": {"schedules": {"outboxReaper": {"schedule": "every two minutes"}}}},
                       "/cron/schedules/outboxReaper/schedule"),
    "schedule-every": ({"cron": {"schedules": {"outboxReaper": {"schedule": "@every 2m"}}}},
                       "/cron/schedules/outboxReaper/schedule"),
    "digest-not-sha256": ({"image": {"digest": "latest"}}, "/image/digest"),
    # Zero replicas publish nothing and export no backlog metric to scale back up on.
    "autoscaling-min-zero": ({"autoscaling": {"minReplicas": 0, "hpa": {"enabled": True}}},
                             "/autoscaling/minReplicas"),
    "keda-server-not-a-url": ({"autoscaling": {"keda": {"enabled": True,
                                                        "prometheus": {"serverAddress": "prometheus:9090"}}}},
                              "/autoscaling/keda/prometheus/serverAddress"),
    "hpa-typo": ({"autoscaling": {"hpa": {"enabled": True, "pendingPerPod": 10}}}, "pendingPerPod"),
    # A common label may not replace one of the chart's own (selectors and Helm's bookkeeping read them).
    "common-label-of-the-chart": ({"commonLabels": {"app.kubernetes.io/instance": "other"}},
                                  "app.kubernetes.io/instance"),
    # The image writes only to /tmp, an emptyDir.
    "writable-root": ({"securityContext": {"readOnlyRootFilesystem": False}},
                      "/securityContext/readOnlyRootFilesystem"),
    "enabled-not-a-boolean": ({"enabled": "yes"}, "/enabled"),
    "network-policy-typo": ({"networkPolicy": {"enabled": True, "egress": {"postgres": {"to": []}}}}, "postgres"),
    "audit-too-fast": ({"outboxPublisher": {"auditSamplePerMinute": 6001}}, "/outboxPublisher/auditSamplePerMinute"),
}
# Each must fail the render in a template (`fail`), naming the problem: what the schema cannot see.
FAIL = {
    "env-set-when-sasl": ({"kafka": {"sasl": {"enabled": True, "existingSecret": "kafka-user"}},
                           "outboxPublisher": {"extraEnv": [{"name": "KAFKA_SASL_USERNAME", "value": "me"}]}},
                          "outboxPublisher.extraEnv: KAFKA_SASL_USERNAME is already set by the chart"),
    "env-workers-twice": ({"outboxPublisher": {"extraEnv": [{"name": "OUTBOX_WORKERS", "value": "4"}]}},
                          "outboxPublisher.extraEnv: OUTBOX_WORKERS is already set by the chart"),
    "env-in-extra-config-too": ({"kafka": {"extraConfig": {"KAFKA_LINGER_MS": "5"}},
                                 "outboxPublisher": {"extraEnv": [{"name": "KAFKA_LINGER_MS", "value": "10"}]}},
                                "KAFKA_LINGER_MS is already set by kafka.extraConfig"),
    "extra-config-set-by-chart": ({"kafka": {"extraConfig": {"KAFKA_BOOTSTRAP_SERVERS": "b:9092"}}},
                                  "kafka.extraConfig.KAFKA_BOOTSTRAP_SERVERS: "
                                  "KAFKA_BOOTSTRAP_SERVERS is already set by the chart"),
    "cron-deadline-too-short": ({"cron": {"activeDeadlineSeconds": 60}}, "cron.activeDeadlineSeconds (60) must exceed"),
    # 4 attempts x 20 s fit in 85 s, but not with call-reaper's 2 + 4 + 8 s between them.
    "cron-deadline-without-backoff": ({"cron": {"activeDeadlineSeconds": 85}},
                                      "cron.activeDeadlineSeconds (85) must exceed (cron.retries + 1) x "
                                      "cron.timeoutSeconds + the back-off between attempts (94 s)"),
    "autoscalers-both": ({"autoscaling": {"hpa": {"enabled": True},
                                          "keda": {"enabled": True, "prometheus": {"serverAddress": PROMETHEUS_URL}}}},
                         "autoscaling.hpa.enabled and autoscaling.keda.enabled are both true"),
    "autoscaling-min-above-max": ({"autoscaling": {"minReplicas": 5, "maxReplicas": 3, "hpa": {"enabled": True}}},
                                  "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (3)"),
    "autoscaling-more-workers-than-shards": ({"autoscaling": {"maxReplicas": 129, "hpa": {"enabled": True}}},
                                             "autoscaling.maxReplicas (129) x outboxPublisher.workers (2) "
                                             "is above the 256 shards"),
    "hpa-without-a-metric": ({"autoscaling": {"hpa": {"enabled": True, "pendingPerReplica": None}}},
                             "pendingPerReplica and oldestPendingAgeSeconds are both null"),
    "keda-without-server-address": ({"autoscaling": {"keda": {"enabled": True}}},
                                    "autoscaling.keda.prometheus.serverAddress is required"),
    "keda-without-a-trigger": ({"autoscaling": {"keda": {"enabled": True, "prometheus": {"enabled": False}}}},
                               "neither the prometheus nor the postgresql trigger is enabled"),
    # migrate would refuse to run (Init:CrashLoopBackOff): its advisory lock needs a session.
    "pooler-without-a-session-for-migrate": (
        {"outboxPublisher": {"extraEnv": PGBOUNCER_ENV[:1]}},
        "OUTBOX_POOL_MODE is transaction and OUTBOX_LISTEN_DATABASE_URL is not set"),
    "env-audit-twice": ({"outboxPublisher": {"auditSamplePerMinute": 60, "extraEnv": [
        {"name": "OUTBOX_AUDIT_SAMPLE_PER_MINUTE", "value": "30"}]}},
        "outboxPublisher.extraEnv: OUTBOX_AUDIT_SAMPLE_PER_MINUTE is already set by the chart"),
}
# FAIL cases rendered as on a cluster with these CRDs.
FAIL_API_VERSIONS = {"keda-without-server-address": [KEDA_API], "keda-without-a-trigger": [KEDA_API]}


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
    """.venv-helm/bin/python, made on first use; a stamp names what is installed in it. Under a file
    lock: make test's two processes (pytest-xdist) would otherwise both make it, each `--clear`ing the
    other's half-made venv."""
    tag = hashlib.sha1(str(HELM_VENV).encode()).hexdigest()[:12]  # one lock per checkout
    lock_path = Path(tempfile.gettempdir()) / f"kaireon-helm-{tag}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _make_helm_python()


def _make_helm_python() -> str:
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
                                  "release": RELEASE_OF.get(name, RELEASE), "namespace": NAMESPACE,
                                  "api_versions": ([MONITORING_API] * (name in WITH_MONITORING_API)
                                                   + [KEDA_API] * (name in WITH_KEDA_API))}
    for name, (values, _) in (BAD | FAIL).items():
        jobs[f"bad:{name}"] = {"op": "render", "chart": str(CHART), "values": values,
                               "api_versions": FAIL_API_VERSIONS.get(name, [])}
    # Used as a dependency: a parent chart whose condition is kaireon-pub.enabled, with globals.
    parent = tmp_path_factory.mktemp("parent-chart")
    shutil.copytree(CHART, parent / "charts" / "kaireon-pub")
    (parent / "Chart.yaml").write_text(json.dumps({
        "apiVersion": "v2", "name": "platform", "version": "0.1.0",
        "dependencies": [{"name": "kaireon-pub", "version": CHART_VERSION, "condition": "kaireon-pub.enabled"}]}))
    for name, enabled in (("subchart", True), ("subchart-disabled", False)):
        values = {"global": SUBCHART_VALUES["global"], "kaireon-pub": {"enabled": enabled}}
        jobs[f"render:{name}"] = {"op": "render", "chart": str(parent), "values": values,
                                  "release": RELEASE, "namespace": NAMESPACE, "api_versions": []}
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


@pytest.mark.parametrize("case", sorted(FAIL))
def test_install_fails_in_the_templates_on_what_the_schema_cannot_see(helm, case):
    result = helm[f"bad:{case}"]
    assert not result["ok"], f"{FAIL[case][0]} was accepted"
    assert FAIL[case][1] in result["error"], result["error"]


@pytest.mark.parametrize("variant", [v for v in RENDER if v.startswith("schedule:")])
def test_schema_accepts_the_schedules_kubernetes_accepts(helm, variant):
    cron = rendered(helm, variant)["CronJob"]
    assert cron["spec"]["schedule"] == variant.split(":", 1)[1]


def test_schema_refuses_in_extra_env_every_name_the_chart_always_sets(helm):
    """The schema's list is exactly the names every publisher pod gets from the chart itself."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    env_name = schema["properties"]["outboxPublisher"]["properties"]["extraEnv"]["items"]["properties"]["name"]
    refused = set(env_name["not"]["enum"])
    always = set.intersection(*(set(env_of(publisher(rendered(helm, v))))
                                for v in ("default", "minimal", "tier-workers")))
    # CRON_SECRET too, where the chart does not set it: a literal value would put the secret in the pod spec.
    assert refused == always | {"CRON_SECRET"}, (refused, always)


def test_liveness_file_must_be_in_the_writable_tmp_mount(helm):
    schema = json.loads((CHART / "values.schema.json").read_text())
    pattern = schema["properties"]["outboxPublisher"]["properties"]["livenessFile"]["pattern"]
    spec = rendered(helm, "default")["Deployment"]["spec"]["template"]["spec"]
    (tmp,) = [v for v in spec["volumes"] if v["name"] == "tmp"]
    (mount,) = [m for m in publisher(rendered(helm, "default"))["volumeMounts"] if m["name"] == tmp["name"]]
    assert pattern.startswith("^" + re.escape(mount["mountPath"]) + "(/")
    for accepted in ("/tmp/outbox-publisher.alive", "/tmp/kaireon/alive", "/tmp/.alive"):
        assert re.fullmatch(pattern, accepted), accepted
    for refused in ("/tmp", "/tmp/", "/tmpx/alive", "/tmp/../etc/alive", "/tmp/./alive", "/var/alive", "tmp/alive"):
        assert not re.fullmatch(pattern, refused), refused


def test_schema_env_names_are_the_settings_registry():
    """extraEnv may name a tier setting or a KAFKA_* pass-through, nothing else."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    env_name = schema["properties"]["outboxPublisher"]["properties"]["extraEnv"]["items"]["properties"]["name"]
    pattern = env_name["pattern"]
    # The tier's settings, then the OpenTelemetry SDK's own OTEL_* variables and librdkafka's KAFKA_*.
    named = set(re.fullmatch(r"\^\((.*)\|OTEL_\[A-Z0-9_\]\+\|KAFKA_\[A-Z0-9_\]\+\)\$", pattern).group(1).split("|"))
    assert named == SETTING_NAMES, (f"update the extraEnv name pattern: missing {SETTING_NAMES - named}, "
                                    f"unknown {named - SETTING_NAMES}")


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
            # OTEL_*: the OpenTelemetry SDK's own variables.
            unknown = {n for n in env_of(container)
                       if n not in SETTING_NAMES and not n.startswith((KAFKA_PREFIX, "OTEL_"))}
            assert not unknown, f"{container['name']} sets {unknown}, which kaireon_pub.settings does not read"


# ---- the rendered publisher -----------------------------------------------------------------


def test_default_render_has_the_spec_objects(helm):
    objects = rendered(helm, "default")
    # No PodDisruptionBudget with one replica: see test_pdb_only_where_it_can_allow_a_disruption.
    assert set(objects) == {"Deployment", "Service", "CronJob"}
    assert objects["Deployment"]["metadata"]["name"].endswith("-outbox-publisher")
    assert objects["Deployment"]["spec"]["replicas"] == 1


def test_publisher_env_carries_the_spec_values(helm):
    env = env_of(publisher(rendered(helm, "default")))
    assert env["OUTBOX_POLL_INTERVAL_MS"]["value"] == "2000"
    assert env["OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS"]["value"] == "15000"
    assert env["OUTBOX_LIVENESS_FILE"]["value"] == "/tmp/outbox-publisher.alive"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-kaireon-pub-database",
                                                                "key": "DATABASE_URL"}
    # Optional: publishing needs no cron secret (without it the route answers 401).
    assert env["CRON_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-kaireon-pub-cron",
                                                               "key": "CRON_SECRET", "optional": True}
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
    objects = rendered(helm, "replicas-3")
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    for selector in (objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     objects["Service"]["spec"]["selector"]):
        assert selector.items() <= pod_labels.items()
    assert rendered(helm, "full")["PodDisruptionBudget"]["spec"]["minAvailable"] == "50%"


@pytest.mark.parametrize("variant,min_available", [
    ("default", None),          # 1 replica, minAvailable 1: a budget that allows no eviction
    ("replicas-3", 1),
    ("full", "50%"),            # 3 replicas, 2 required
    ("pdb-2-of-2", None),
    ("pdb-50%-of-2", "50%"),    # 1 required
    ("pdb-100%-of-3", None),
    ("minimal", None),          # pdb.enabled false
    ("hpa", 1),                 # autoscaled: minReplicas 2 counts, not replicas 1
    ("hpa-age-min-1", None),    # minReplicas 1: the fewest pods could not be evicted
    ("keda", 1),
    ("keda-without-crds", None),  # no ScaledObject: replicas 1 counts
])
def test_pdb_only_where_it_can_allow_a_disruption(helm, variant, min_available):
    """A PodDisruptionBudget that allows 0 disruptions stalls `kubectl drain` and autoscaler
    scale-downs; the chart keeps the spec's values and leaves such a budget out."""
    pdb = rendered(helm, variant).get("PodDisruptionBudget")
    assert (pdb and pdb["spec"]["minAvailable"]) == min_available
    assert values_yaml()["outboxPublisher"]["pdb"] == {"enabled": True, "minAvailable": 1}
    if pdb:
        replicas = fewest_replicas(rendered(helm, variant))
        required = -(-replicas * int(min_available[:-1]) // 100) if isinstance(min_available, str) else min_available
        assert replicas - required >= 1


@pytest.mark.parametrize("variant", sorted(RENDER))
def test_every_pod_spec_turns_service_links_off(helm, variant):
    """A Service named kafka would inject KAFKA_PORT=tcp://... into the KAFKA_* pass-through."""
    if variant == "off":
        return
    specs = pod_specs(rendered(helm, variant))
    assert specs
    for spec in specs:
        assert spec["enableServiceLinks"] is False


@pytest.mark.parametrize("variant", ["replicas-3", "hpa", "hpa-age-min-1"])
def test_replicas_spread_over_nodes_and_zones_without_blocking_a_schedule(helm, variant):
    """Spread wherever there can be more than one pod: autoscaled, from minReplicas 1 too."""
    assert "topologySpreadConstraints" not in rendered(helm, "default")["Deployment"]["spec"]["template"]["spec"]
    template = rendered(helm, variant)["Deployment"]["spec"]["template"]
    constraints = template["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in constraints:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]
    custom = rendered(helm, "spread-custom")["Deployment"]["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert custom == RENDER["spread-custom"]["outboxPublisher"]["topologySpreadConstraints"]


def test_pod_labels_carry_version_and_manager_outside_the_selectors(helm):
    objects = rendered(helm, "replicas-3")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for template in (objects["Deployment"]["spec"]["template"],
                     objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]):
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/version"] == chart["appVersion"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    # Not in a selector: a Deployment's selector is immutable, and a version bump must not orphan pods.
    for selector in (objects["Deployment"]["spec"]["selector"]["matchLabels"], objects["Service"]["spec"]["selector"],
                     objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert not {"app.kubernetes.io/version", "app.kubernetes.io/managed-by"} & set(selector)


def test_image_has_a_registry_and_takes_a_digest(helm):
    repository = values_yaml()["image"]["repository"]
    registry = repository.split("/", 1)[0]
    assert "/" in repository and ("." in registry or ":" in registry), repository
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    digest = RENDER["digest"]["image"]["digest"]
    for variant, image in [("default", f"{repository}:{chart['appVersion']}"), ("digest", f"{repository}@{digest}")]:
        objects = rendered(helm, variant)
        spec = objects["Deployment"]["spec"]["template"]["spec"]
        images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
        cron_spec = objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        images |= {c["image"] for c in cron_spec["containers"]}
        assert images == {image}


def test_pod_runs_non_root_on_a_read_only_root_with_tmp_in_memory(helm):
    spec = rendered(helm, "default")["Deployment"]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (init,) = spec["initContainers"]
    assert init["args"] == ["migrate"]
    assert spec["volumes"][0]["name"] == "tmp"
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
    for name, key in [("KAFKA_SSL_CA_LOCATION", "ca.crt"), ("KAFKA_SSL_CERTIFICATE_LOCATION", "tls.crt"),
                      ("KAFKA_SSL_KEY_LOCATION", "tls.key")]:
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


# ---- the knobs a platform team expects (issue 26) -----------------------------------------------


def all_objects(helm: dict, variant: str) -> list[dict]:
    return list(rendered(helm, variant).values())


def pod_templates(objects: dict[str, dict]) -> list[dict]:
    templates = []
    if "Deployment" in objects:
        templates.append(objects["Deployment"]["spec"]["template"])
    if "CronJob" in objects:
        templates.append(objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"])
    return templates


def test_common_labels_on_every_object_and_pod_never_in_a_selector(helm):
    objects = rendered(helm, "knobs")
    common = KNOBS["commonLabels"]
    assert {"Deployment", "CronJob", "Service", "PodDisruptionBudget", "ServiceAccount"} <= set(objects)
    for obj in objects.values():
        assert common.items() <= obj["metadata"]["labels"].items(), obj["kind"]
    (deployment, cron) = pod_templates(objects)
    # A pod's own label wins over a common one of the same name.
    assert deployment["metadata"]["labels"] == {**deployment["metadata"]["labels"], **common,
                                                **KNOBS["outboxPublisher"]["podLabels"]}
    assert common.items() <= cron["metadata"]["labels"].items()
    for selector in (objects["Deployment"]["spec"]["selector"]["matchLabels"], objects["Service"]["spec"]["selector"],
                     objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert not set(common) & set(selector)


def test_service_account_priority_and_scheduling_knobs(helm):
    objects = rendered(helm, "knobs")
    account = objects["ServiceAccount"]
    assert account["metadata"]["annotations"] == KNOBS["serviceAccount"]["annotations"]
    assert account["automountServiceAccountToken"] is True
    deployment, cron = (t["spec"] for t in pod_templates(objects))
    for spec in (deployment, cron):
        assert spec["serviceAccountName"] == account["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is True
    assert deployment["priorityClassName"] == "outbox-high" and cron["priorityClassName"] == "outbox-low"
    assert deployment["tolerations"] == KNOBS["outboxPublisher"]["tolerations"]
    assert deployment["nodeSelector"] == KNOBS["outboxPublisher"]["nodeSelector"]
    assert deployment["affinity"] == KNOBS["outboxPublisher"]["affinity"]
    for key in ("tolerations", "nodeSelector", "affinity"):
        assert cron[key] == KNOBS["cron"][key]
    cron_template = objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]
    assert cron_template["metadata"]["annotations"] == KNOBS["cron"]["podAnnotations"]
    # By default: no account made, none named, no token, no priority class.
    default = rendered(helm, "default")
    assert "ServiceAccount" not in default
    for spec in pod_specs(default):
        assert spec["automountServiceAccountToken"] is False
        assert not {"serviceAccountName", "priorityClassName"} & set(spec)


# Today's security contexts (before they became values): the default rendering keeps them.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                      "capabilities": {"drop": ["ALL"]}}


def test_default_security_context_is_unchanged(helm):
    deployment, cron = pod_specs(rendered(helm, "default"))
    assert deployment["securityContext"] == POD_SECURITY
    assert cron["securityContext"] == {k: v for k, v in POD_SECURITY.items() if k != "fsGroup"}
    for spec in (deployment, cron):
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["securityContext"] == CONTAINER_SECURITY


def test_openshift_values_leave_the_user_and_group_to_the_platform(helm):
    """OpenShift's restricted SCC assigns a uid from the namespace's range and refuses a fixed one;
    the example values leave every uid, gid and fsGroup out and keep everything else."""
    specs = pod_specs(rendered(helm, "openshift"))
    assert len(specs) == 2
    for spec in specs:
        assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["securityContext"] == CONTAINER_SECURITY
    text = helm["render:openshift"]["manifest"]
    assert "runAsUser" not in text and "runAsGroup" not in text and "fsGroup" not in text


def test_pdb_lets_unhealthy_pods_be_evicted(helm):
    """In a database outage every pod is unready: a budget counting them would block node drains."""
    for variant in ("replicas-3", "full", "hpa", "knobs"):
        assert rendered(helm, variant)["PodDisruptionBudget"]["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("variant", ["subchart", "subchart-values"])
def test_chart_installs_as_a_dependency_with_globals_and_enabled(helm, variant):
    """A parent chart sets `global` and its condition's `enabled` in this chart's values: the
    schema accepts both, and the objects are today's."""
    assert set(rendered(helm, variant)) == set(rendered(helm, "default"))
    assert publisher(rendered(helm, variant)) == publisher(rendered(helm, "default"))
    result = helm["render:subchart-disabled"]
    assert result["ok"], result.get("error")
    assert not [d for d in yaml.safe_load_all(result["manifest"]) if d]


# ---- the NetworkPolicy --------------------------------------------------------------------------


def test_network_policy_is_off_by_default(helm):
    assert values_yaml()["networkPolicy"]["enabled"] is False
    assert "NetworkPolicy" not in rendered(helm, "default")


def test_network_policy_selects_the_publisher_and_admits_the_reaper_and_the_sources(helm):
    objects = rendered(helm, "networkpolicy")
    spec = objects["NetworkPolicy"]["spec"]
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    reaper_labels = objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert not spec["podSelector"]["matchLabels"].items() <= reaper_labels.items()
    (ingress,) = spec["ingress"]
    (port,) = publisher(objects)["ports"]
    assert ingress["ports"] == [{"port": port["name"], "protocol": "TCP"}]
    reaper, *sources = ingress["from"]
    assert reaper["podSelector"]["matchLabels"].items() <= reaper_labels.items()
    assert sources == RENDER["networkpolicy"]["networkPolicy"]["ingress"]["from"]
    # Nothing reaches the pods when neither the reaper nor any source is there.
    assert rendered(helm, "networkpolicy-closed")["NetworkPolicy"]["spec"]["ingress"] == []


def test_network_policy_egress_is_the_database_the_brokers_and_dns(helm):
    given = RENDER["networkpolicy"]["networkPolicy"]["egress"]
    database, kafka, dns = rendered(helm, "networkpolicy")["NetworkPolicy"]["spec"]["egress"]
    assert (database["to"], database["ports"]) == (given["database"]["to"], given["database"]["ports"])
    assert (kafka["to"], kafka["ports"]) == (given["kafka"]["to"], given["kafka"]["ports"])
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"] == values_yaml()["networkPolicy"]["egress"]["dns"]["to"]
    # Without destinations: the ports to anywhere; DNS can be left out; more rules can be added.
    database, kafka = rendered(helm, "networkpolicy-closed")["NetworkPolicy"]["spec"]["egress"]
    assert "to" not in database and database["ports"] == [{"port": 5432, "protocol": "TCP"}]
    extra = rendered(helm, "networkpolicy-extra")["NetworkPolicy"]["spec"]["egress"]
    assert extra[-1] == RENDER["networkpolicy-extra"]["networkPolicy"]["egress"]["extra"][0] and len(extra) == 4


# ---- secrets and the migrate init container ------------------------------------------------


def secret_refs(objects: dict[str, dict]) -> list[tuple[str, bool]]:
    """(Secret name, optional) of every reference in the rendered pods: env, envFrom, volumes."""
    refs = []
    for spec in pod_specs(objects):
        for container in spec["containers"] + spec.get("initContainers", []):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((ref["name"], ref.get("optional", False)))
            refs += [(e["secretRef"]["name"], e["secretRef"].get("optional", False))
                     for e in container.get("envFrom", []) if "secretRef" in e]
        refs += [(v["secret"]["secretName"], v["secret"].get("optional", False))
                 for v in spec.get("volumes", []) if "secret" in v]
    return refs


def test_reaper_off_installs_without_a_cron_secret(helm):
    """With the reaper disabled the only Secret the pods need is the DSN's, which the docs
    require; no cron Secret is referenced (a required one left pods in CreateContainerConfigError)."""
    for variant in ("reaper-off", "minimal"):
        objects = rendered(helm, variant)
        created = {o["metadata"]["name"] for o in objects.values() if o["kind"] == "Secret"}
        required = {name for name, optional in secret_refs(objects) if not optional} - created
        assert required == {f"{RELEASE}-kaireon-pub-database"}, (variant, required)
        assert all("cron" not in name for name, _ in secret_refs(objects)), secret_refs(objects)
        assert "CRON_SECRET" not in env_of(publisher(objects))


def test_cron_secret_is_optional_for_the_publisher_and_required_by_the_reaper(helm):
    objects = rendered(helm, "default")
    assert env_of(publisher(objects))["CRON_SECRET"]["valueFrom"]["secretKeyRef"]["optional"] is True
    (container,) = objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["CRON_SECRET"]["valueFrom"]["secretKeyRef"].get("optional", False) is False
    # A Secret named for another caller of the route is passed on with the reaper off.
    external = env_of(publisher(rendered(helm, "cron-secret-without-reaper")))["CRON_SECRET"]
    external = external["valueFrom"]["secretKeyRef"]
    assert external == {"name": "external-cron", "key": "CRON_SECRET", "optional": True}


def init_container(objects: dict[str, dict]) -> dict:
    (init,) = objects["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    return init


@pytest.mark.parametrize("variant,expected", [
    ("default", {"DATABASE_URL", "OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS"}),
    # SASL, TLS and the other librdkafka settings left out; the tier's own settings passed on.
    ("full", {"DATABASE_URL", "OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS", "KAFKA_MESSAGE_TIMEOUT_MS", "OUTBOX_BATCH_SIZE",
              "OUTBOX_STATEMENT_TIMEOUT_MS"}),
    ("pgbouncer", {"DATABASE_URL", "OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS", "OUTBOX_POOL_MODE",
                   "OUTBOX_LISTEN_DATABASE_URL"}),
    # OTEL_* and KAFKA_LINGER_MS are not migrate's.
    ("partitioning", {"DATABASE_URL", "OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS", "OUTBOX_PARTITIONING",
                      "OUTBOX_FAILED_RETENTION_SECONDS"}),
])
def test_migrate_init_container_gets_the_tier_settings_and_no_kafka_credential(helm, variant, expected):
    objects = rendered(helm, variant)
    init = init_container(objects)
    assert set(env_of(init)) == expected
    # Every entry migrate gets is the publisher's own, word for word (DATABASE_URL too, without migrate.existingSecret).
    assert all(entry == env_of(publisher(objects))[name] for name, entry in env_of(init).items())
    assert not {e["valueFrom"]["secretKeyRef"]["name"] for e in init["env"] if "valueFrom" in e} \
        & {"kafka-user", "cron", f"{RELEASE}-kaireon-pub-cron"}
    assert not [m for m in init["volumeMounts"] if m["name"] == "kafka-tls"]  # no Kafka TLS material


def test_migrate_init_container_gets_extra_env_from_and_volume_mounts(helm):
    """A partitioning set in a ConfigMap, a CA for sslrootcert=: migrate needs them as the tier does."""
    objects = rendered(helm, "partitioning")
    init, container = init_container(objects), publisher(objects)
    extra = RENDER["partitioning"]["outboxPublisher"]
    assert init["envFrom"] == container["envFrom"] == extra["extraEnvFrom"]
    for c in (init, container):
        assert extra["extraVolumeMounts"][0] in c["volumeMounts"]
    assert extra["extraVolumes"][0] in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert "envFrom" not in init_container(rendered(helm, "default"))


# Stand-ins for what the Secrets and ConfigMaps of the variants hold.
SECRET_VALUES = {("pg-direct", "url"): "postgresql://runtime@pg.example:5432/app",
                 ("pg-owner", "OWNER_URL"): "postgresql://owner@pg.example:5432/app",
                 (f"{RELEASE}-kaireon-pub-database", "DATABASE_URL"): "postgresql://runtime@pgbouncer.example:6432/app",
                 (f"{RELEASE}-kaireon-pub-cron", "CRON_SECRET"): "c" * 32}
CONFIG_MAPS = {"outbox-settings": {"OUTBOX_BATCH_SIZE": "200"}}


def container_environ(container: dict, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The environment Kubernetes would give the container: envFrom first, env over it."""
    environ = {}
    for source in container.get("envFrom", []):
        environ.update(CONFIG_MAPS[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            environ[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            environ[entry["name"]] = secrets[(ref["name"], ref["key"])]
    return environ


@pytest.mark.parametrize("variant,pool_mode,url,partitioning", [
    ("default", "session", SECRET_VALUES[(f"{RELEASE}-kaireon-pub-database", "DATABASE_URL")], "none"),
    # Through a transaction pooler migrate takes its advisory lock on the listen (direct) URL.
    ("pgbouncer", "transaction", SECRET_VALUES[("pg-direct", "url")], "none"),
    ("example-pgbouncer", "transaction", None, "none"),
    # Its own Secret (the schema owner): a session on that DSN, whatever the tier's pool mode.
    ("migrate-owner", "session", SECRET_VALUES[("pg-owner", "OWNER_URL")], "none"),
    ("partitioning", "session", SECRET_VALUES[(f"{RELEASE}-kaireon-pub-database", "DATABASE_URL")], "daily"),
    ("migrate-related-settings", "session", SECRET_VALUES[(f"{RELEASE}-kaireon-pub-database", "DATABASE_URL")], "none"),
])
def test_migrate_reads_the_rendered_environment_as_the_tier_does(helm, monkeypatch, variant, pool_mode, url,
                                                                 partitioning):
    """The init container's rendered environment, read by the tier's own settings loader and
    connection code: the pool mode and partitioning arrive, and `migrate` connects where it must
    (psycopg stubbed: the URL it is asked for is recorded). The publisher's environment loads too."""
    import psycopg

    from kaireon_pub.db import connect as db_connect
    from kaireon_pub.settings import Settings

    objects = rendered(helm, variant)
    secrets = dict(SECRET_VALUES)
    if variant == "example-pgbouncer":
        secrets[(f"{RELEASE}-kaireon-pub-database-direct", "DATABASE_URL")] = url = "postgresql://direct@pg.example/app"
    settings = Settings.from_env(container_environ(init_container(objects), secrets), need_kafka=False)
    Settings.from_env(container_environ(publisher(objects), secrets), need_kafka=True)
    assert (settings.pool_mode, settings.partitioning) == (pool_mode, partitioning)

    asked = []

    class Asked(Exception):
        pass

    def fake_connect(cls_or_url, *args, **kwargs):
        asked.append(args[0] if isinstance(cls_or_url, type) else cls_or_url)
        raise Asked

    monkeypatch.setattr(psycopg, "connect", lambda url, *a, **k: fake_connect(url, *a, **k))
    monkeypatch.setattr(psycopg.Connection, "connect", classmethod(fake_connect))
    with pytest.raises(Asked):
        db_connect.connect(settings, "migrate")
    assert asked == [url]


def test_migrate_owner_secret_leaves_the_publisher_on_its_own(helm):
    """The schema owner's DSN goes to the init container only; the install notes name its Secret."""
    objects = rendered(helm, "migrate-owner")
    assert "pg-owner  key OWNER_URL" in helm["render:migrate-owner"]["notes"]
    ref = env_of(init_container(objects))["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "pg-owner", "key": "OWNER_URL"}
    own = env_of(publisher(objects))["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert own["name"] == f"{RELEASE}-kaireon-pub-database"
    assert "pg-owner" not in json.dumps(publisher(objects))


def test_migrate_lock_wait_is_a_value(helm):
    """OUTBOX_MIGRATE_LOCK_TIMEOUT_SECONDS is the command's option, not a tier setting: the chart
    passes it as `migrate --lock-timeout`, and only when set."""
    def init_args(variant):
        (init,) = rendered(helm, variant)["Deployment"]["spec"]["template"]["spec"]["initContainers"]
        return init["args"]

    assert init_args("default") == ["migrate"]
    assert init_args("migrate-lock-timeout") == ["migrate", "--lock-timeout", "600"]
    from kaireon_pub import cli

    assert "--lock-timeout" in {opt for param in cli.cli.commands["migrate"].params for opt in param.opts}


# ---- the reaper CronJob ---------------------------------------------------------------------


def reaper(helm: dict, variant: str = "default") -> tuple[dict, dict]:
    objects = rendered(helm, variant)
    return objects["CronJob"], objects["Service"]


def reaper_container(cron: dict) -> dict:
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def test_reaper_cronjob_calls_the_route_with_the_tiers_own_image(helm):
    cron, service = reaper(helm)
    values = values_yaml()
    assert cron["spec"]["schedule"] == "*/2 * * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = reaper_container(cron)
    assert container["image"] == publisher(rendered(helm, "default"))["image"]
    assert "command" not in container  # the image's entry point: tini, then kaireon-pub
    port = service["spec"]["ports"][0]["port"]
    assert container["args"] == [
        "call-reaper", "--url", f"http://{service['metadata']['name']}:{port}/api/v1/cron/outbox-reaper",
        "--timeout", str(values["cron"]["timeoutSeconds"]), "--retries", str(values["cron"]["retries"]),
    ]
    assert env_of(container)["CRON_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-kaireon-pub-cron"


def test_reaper_job_has_resources_a_retry_and_a_deadline(helm):
    cron, _ = reaper(helm)
    values = values_yaml()["cron"]
    job = cron["spec"]["jobTemplate"]["spec"]
    container = reaper_container(cron)
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert job["backoffLimit"] == values["backoffLimit"] >= 1
    assert job["activeDeadlineSeconds"] > (values["retries"] + 1) * values["timeoutSeconds"]
    assert cron["spec"]["successfulJobsHistoryLimit"] >= 1 and cron["spec"]["failedJobsHistoryLimit"] >= 1
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("variant", ["default", "full"])
def test_no_argv_carries_a_secret(helm, variant):
    """Argv is readable by anyone on the node (/proc/<pid>/cmdline): secrets only come through the
    environment from Secrets, never into a command line (no shell, no $(VAR) expansion)."""
    objects = rendered(helm, variant)
    for spec in pod_specs(objects):
        for container in spec["containers"] + spec.get("initContainers", []):
            secret_env = {n for n, e in env_of(container).items() if "secretKeyRef" in e.get("valueFrom", {})}
            argvs = [container.get("command", []) + container.get("args", [])]
            argvs += [probe["exec"]["command"]
                      for probe in (container.get("livenessProbe"), container.get("readinessProbe"))
                      if probe and "exec" in probe]
            for argv in argvs:
                text = " ".join(argv)
                assert not {"sh", "/bin/sh", "bash", "/bin/bash"} & set(argv), (container["name"], argv)
                assert "$(" not in text and "${" not in text, (container["name"], argv)
                assert not any(name in text for name in secret_env | {"CRON_SECRET", "SASL_PASSWORD"}), (
                    container["name"], argv)


class _Route(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        auth = self.headers.get("Authorization", "")
        secret = self.headers.get("x-cron-secret") or (auth[len("Bearer "):] if auth.startswith("Bearer ") else None)
        type(self).seen.append({"path": self.path, "secret": secret})
        body = b'{"status": "ok", "resetCount": 0}'
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _has_call_reaper() -> bool:
    from kaireon_pub import cli

    return "call-reaper" in getattr(cli.cli, "commands", {})


@pytest.mark.parametrize("status,succeeds", [(200, True), (401, False), (500, False)])
def test_reaper_job_argv_runs_against_a_stand_in_route(helm, status, succeeds):
    """The CronJob's own arguments, run through the tier's CLI against a stand-in route: exit 0
    on 200 only, the secret taken from the environment. Retries are set to 0 for the failures."""
    if not _has_call_reaper():
        pytest.skip("kaireon-pub call-reaper is not in this tree yet")
    cron, service = reaper(helm)
    args = list(reaper_container(cron)["args"])
    _Route.status, _Route.seen = status, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Route)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = args[args.index("--url") + 1]
        in_cluster = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        args[args.index("--url") + 1] = url.replace(in_cluster, f"127.0.0.1:{server.server_port}")
        if not succeeds:
            args[args.index("--retries") + 1] = "0"
        done = subprocess.run([sys.executable, "-m", "kaireon_pub", *args],
                              env={"PATH": os.environ["PATH"], "CRON_SECRET": "s3cret"},
                              capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert (done.returncode == 0) == succeeds, (done.returncode, done.stdout, done.stderr)
    assert _Route.seen and _Route.seen[0] == {"path": "/api/v1/cron/outbox-reaper", "secret": "s3cret"}
    assert "s3cret" not in done.stdout + done.stderr
    if succeeds:
        assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "ok"


# ---- monitoring -----------------------------------------------------------------------------


def test_service_monitor_scrapes_metrics_on_the_service_port(helm):
    objects = rendered(helm, "full")
    (endpoint,) = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == objects["Service"]["spec"]["ports"][0]["name"]
    assert (objects["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items()
            <= objects["Service"]["metadata"]["labels"].items())


def test_monitoring_objects_need_their_values_flags_and_the_crds(helm):
    assert {"ServiceMonitor", "PrometheusRule"} <= set(rendered(helm, "monitoring"))
    assert not {"ServiceMonitor", "PrometheusRule"} & set(rendered(helm, "monitoring-without-crds"))
    assert "ConfigMap" in rendered(helm, "monitoring-without-crds")  # the dashboard needs no CRD
    assert not {"ServiceMonitor", "PrometheusRule"} & set(rendered(helm, "default"))


def test_install_notes_say_what_was_left_out(helm):
    assert "WARNING: monitoring.coreos.com/v1" in helm["render:monitoring-without-crds"]["notes"]
    assert "WARNING" not in helm["render:monitoring"]["notes"]
    assert "No PodDisruptionBudget" in helm["render:default"]["notes"]
    assert "No PodDisruptionBudget" not in helm["render:replicas-3"]["notes"]
    notes = helm["render:reaper-off"]["notes"]
    assert f"{RELEASE}-kaireon-pub-cron" not in notes and "no cron Secret is referenced" in notes


def rules_of(helm: dict, variant: str) -> dict[str, dict]:
    (group,) = rendered(helm, variant)["PrometheusRule"]["spec"]["groups"]
    return {r["alert"]: r for r in group["rules"]}


def walk(node):
    """Every node of a promql_parser AST, depth first, with its ancestors."""
    stack = [(node, ())]
    while stack:
        current, ancestors = stack.pop()
        yield current, ancestors
        children = []
        for attr in ("lhs", "rhs", "expr", "vector_selector"):
            child = getattr(current, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                children.append(child)
        if isinstance(current, promql_parser.Call):
            children += list(current.args)
        stack += [(child, (*ancestors, current)) for child in children]


def selectors(expr) -> list[tuple[promql_parser.VectorSelector, tuple]]:
    return [(n, a) for n, a in walk(expr) if isinstance(n, promql_parser.VectorSelector)]


def test_alerts_keep_the_spec_backlog_alert_without_the_pg_stat_activity_term(helm):
    backlog = rules_of(helm, "monitoring")["OutboxBacklog"]
    assert "pg_stat_activity" not in backlog["expr"]
    assert (backlog["for"], backlog["labels"]) == (SPEC_BACKLOG_ALERT["for"], SPEC_BACKLOG_ALERT["labels"])
    assert backlog["annotations"]["summary"] == SPEC_BACKLOG_ALERT["summary"]
    expr = promql_parser.parse(backlog["expr"])
    metric, op, threshold = SPEC_BACKLOG_ALERT["threshold"]
    assert isinstance(expr, promql_parser.BinaryExpr) and str(expr.op) == op
    assert isinstance(expr.rhs, promql_parser.NumberLiteral) and expr.rhs.val == threshold
    assert [s.name for s, _ in selectors(expr.lhs)] == [metric]


@pytest.mark.parametrize("variant", ["monitoring", "monitoring-other-release", "full"])
def test_every_alert_reads_this_release_only_and_aggregates_per_release(helm, variant):
    """3 replicas export 3 copies of every gauge: each alert aggregates by (namespace, job), so
    they raise one alert; the selector keeps another release's series out."""
    objects = rendered(helm, variant)
    job = objects["Service"]["metadata"]["name"]
    for name, rule in rules_of(helm, variant).items():
        for selector, ancestors in selectors(promql_parser.parse(rule["expr"])):
            matchers = {(m.name, m.value) for m in selector.matchers.matchers if m.op == promql_parser.MatchOp.Equal}
            assert {("namespace", NAMESPACE), ("job", job)} <= matchers, (name, rule["expr"])
            aggregations = [a for a in ancestors if isinstance(a, promql_parser.AggregateExpr)]
            in_absent = any(isinstance(a, promql_parser.Call) and a.func.name == "absent" for a in ancestors)
            assert in_absent or any(sorted(a.modifier.labels) == ["job", "namespace"]
                                    and str(a.modifier.type).endswith("By")
                                    for a in aggregations), (name, rule["expr"])


def test_alerts_cover_targets_down_liveness_failed_events_and_horizon(helm):
    rules = rules_of(helm, "monitoring")
    calls = {name: {n.func.name for n, _ in walk(promql_parser.parse(r["expr"])) if isinstance(n, promql_parser.Call)}
             for name, r in rules.items()}
    metrics_of = {name: {s.name for s, _ in selectors(promql_parser.parse(r["expr"]))} for name, r in rules.items()}
    # Targets gone or all down: absent() and up.
    assert metrics_of["OutboxPublisherDown"] == {"up"} and "absent" in calls["OutboxPublisherDown"]
    assert metrics_of["OutboxPublisherTargetDown"] == {"up"}
    assert metrics_of["OutboxLivenessStale"] == {"kaireon_outbox_last_success_timestamp_seconds"}
    # The gauge, not increase() of the counter: it fires for as long as rows are parked.
    failed = promql_parser.parse(rules["OutboxFailedEvents"]["expr"])
    assert metrics_of["OutboxFailedEvents"] == {"kaireon_outbox_failed_count"} and not calls["OutboxFailedEvents"]
    assert str(failed.op) == ">" and failed.rhs.val == 0
    assert metrics_of["OutboxHorizonHeldBack"] == {"kaireon_outbox_horizon_age_seconds"}
    assert "> 60" in rules_of(helm, "full")["OutboxHorizonHeldBack"]["expr"]  # on by default, 60 s
    assert "> 120" in rules_of(helm, "full")["OutboxLivenessStale"]["expr"]  # follows livenessProbe.maxStaleSeconds


def test_prometheus_rule_alerts_link_to_the_runbook_and_read_exported_metrics(helm):
    from kaireon_pub import metrics

    rules = rules_of(helm, "monitoring")
    anchors = {name: r["annotations"]["runbook_url"].rsplit("#", 1) for name, r in rules.items()}
    assert {a for _, a in anchors.values()} == {"outboxbacklog", "publisher-pod-down", "liveness-stale",
                                                "failed-events",
                                                "pending-rows-held-back-by-a-long-transaction", "database-down",
                                                "broker-down", "stuck-rows", "prove-nothing-was-lost",
                                                "dead-letters"}
    # Each anchor is a section of the runbook (GitHub's: lower case, spaces to hyphens, no punctuation).
    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / "operations.md").read_text(), re.M)
    slugs = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    assert {a for _, a in anchors.values()} <= slugs, {a for _, a in anchors.values()} - slugs
    assert all(url.endswith("docs/operations.md") for url, _ in anchors.values())
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"]
    families = [f for m in vars(metrics).values() if isinstance(m, MetricWrapperBase) for f in m.describe()]
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families} | {"up"}
    used = {s.name for r in rules.values() for s, _ in selectors(promql_parser.parse(r["expr"]))}
    assert used - PENDING_METRICS <= exported, used - exported
    for pending in PENDING_METRICS - exported:  # once the metric exists, drop it from PENDING_METRICS
        assert pending in used


def test_every_alert_has_a_description_and_a_runbook_under_the_configured_base(helm):
    for variant, base in (("monitoring", values_yaml()["metrics"]["prometheusRule"]["runbookUrl"]),
                          ("monitoring-runbook", RUNBOOK)):
        rules = rules_of(helm, variant)
        for name, rule in rules.items():
            annotations = rule["annotations"]
            # A Prometheus template: the chart's own template delimiters are all consumed.
            assert annotations["description"] and "`" not in annotations["description"], name
            assert annotations["runbook_url"].startswith(base + "#"), (name, annotations["runbook_url"])
    assert set(rules_of(helm, "monitoring-runbook")) == set(rules_of(helm, "monitoring"))


def test_alerts_cover_reaper_failures_and_an_unreachable_database_or_broker(helm):
    rules = rules_of(helm, "monitoring")
    values = values_yaml()["metrics"]["prometheusRule"]
    metrics_of = {name: {s.name for s, _ in selectors(promql_parser.parse(r["expr"]))} for name, r in rules.items()}
    for name, metric in (("OutboxDatabaseUnreachable", "kaireon_outbox_database_up"),
                         ("OutboxBrokerUnreachable", "kaireon_outbox_broker_up")):
        expr = promql_parser.parse(rules[name]["expr"])
        # The readiness gauges: no replica (max) reached it.
        assert metrics_of[name] == {metric} and str(expr.op) == "==" and expr.rhs.val == 0
        assert isinstance(expr.lhs, promql_parser.AggregateExpr) and "max" in str(expr.lhs.op).lower()
        assert rules[name]["for"] == values["unreachableFor"] and rules[name]["labels"]["severity"] == "critical"
    reaper = rules["OutboxReaperFailing"]
    expr = promql_parser.parse(reaper["expr"])
    assert metrics_of["OutboxReaperFailing"] == {"kaireon_outbox_reaper_failures_total"}
    assert str(expr.op) == ">" and expr.rhs.val == values["reaperFailures"]["maxFailures"]
    (call,) = [n for n, _ in walk(expr) if isinstance(n, promql_parser.Call)]
    assert call.func.name == "increase" and f"[{values['reaperFailures']['window']}]" in reaper["expr"]
    assert exported_metrics() >= {"kaireon_outbox_database_up", "kaireon_outbox_broker_up",
                                  "kaireon_outbox_reaper_failures_total"}
    # The HTTP process's refresh thread and the workers write the reachability gauges, probe or
    # no probe: the alerts stay with the readiness probe off.
    assert set(rules) == set(rules_of(helm, "monitoring-without-readiness"))


def test_the_auditor_is_a_value_and_its_findings_an_alert(helm):
    """outboxPublisher.auditSamplePerMinute is OUTBOX_AUDIT_SAMPLE_PER_MINUTE (not rendered at its
    default, 0: off); OutboxAuditFindings fires on any increase of the findings within its window."""
    assert str(values_yaml()["outboxPublisher"]["auditSamplePerMinute"]) == DEFAULTS["OUTBOX_AUDIT_SAMPLE_PER_MINUTE"]
    assert "OUTBOX_AUDIT_SAMPLE_PER_MINUTE" not in env_of(publisher(rendered(helm, "default")))
    assert env_of(publisher(rendered(helm, "auditor")))["OUTBOX_AUDIT_SAMPLE_PER_MINUTE"]["value"] == "60"
    window = values_yaml()["metrics"]["prometheusRule"]["auditFindings"]["window"]
    for variant, expected_window in (("monitoring", window), ("auditor", "30m")):
        rule = rules_of(helm, variant)["OutboxAuditFindings"]
        expr = promql_parser.parse(rule["expr"])
        assert str(expr.op) == ">" and isinstance(expr.rhs, promql_parser.NumberLiteral) and expr.rhs.val == 0
        (call,) = [n for n, _ in walk(expr) if isinstance(n, promql_parser.Call)]
        assert call.func.name == "increase" and f"[{expected_window}]" in rule["expr"]
        assert [s.name for s, _ in selectors(expr)] == ["kaireon_outbox_audit_findings_total"]
        assert rule["labels"]["severity"] == "critical" and "for" not in rule
        assert rule["annotations"]["runbook_url"].endswith("#prove-nothing-was-lost")
        assert expected_window in rule["annotations"]["description"]
    assert "kaireon_outbox_audit_findings_total" in exported_metrics()
    assert set(rules_of(helm, "monitoring")) - set(rules_of(helm, "monitoring-audit-alert-off")) \
        == {"OutboxAuditFindings"}


# ---- every rendered object, validated ---------------------------------------------------------

# What the chart may set in the Prometheus Operator's resources (monitoring.coreos.com/v1 CRDs).
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def check_metadata(obj: dict) -> None:
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, set(obj)
    assert set(obj["metadata"]) <= {"name", "labels", "annotations"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    assert len(obj["metadata"]["name"]) <= 63
    assert all(isinstance(v, str) for v in obj["metadata"].get("labels", {}).values())


def check_service_monitor(obj: dict) -> None:
    check_metadata(obj)
    spec = obj["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"}
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"} and spec["selector"]["matchLabels"]
    assert isinstance(spec["endpoints"], list) and spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                                 "metricRelabelings", "tlsConfig"}
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        assert DURATION.fullmatch(endpoint.get("interval", "30s"))


def check_prometheus_rule(obj: dict) -> None:
    check_metadata(obj)
    assert set(obj["spec"]) == {"groups"}
    names = [g["name"] for g in obj["spec"]["groups"]]
    assert len(names) == len(set(names)) and all(names)
    for group in obj["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "partial_response_strategy"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert ("alert" in rule) != ("record" in rule)
            assert isinstance(rule["expr"], str)
            promql_parser.parse(rule["expr"])
            assert DURATION.fullmatch(rule.get("for", "0")), rule.get("for")
            for mapping in ("labels", "annotations"):
                assert all(LABEL_NAME.fullmatch(k) and isinstance(v, str) for k, v in rule.get(mapping, {}).items())


def strict(schema):
    """A CRD's structural schema made strict like kubernetes-validate's strict mode: an unknown
    field is an error (the API server would prune it silently) except where the schema keeps
    unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def keda_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((KEDA_SCHEMAS / f"keda.sh_{kind.lower()}s.v1alpha1.json").read_text())
    # Draft 4 is what OpenAPI v3's schema objects follow (format int32 is not checked by it).
    return jsonschema.Draft4Validator(strict(schema))


def check_keda(obj: dict) -> None:
    check_metadata(obj)
    errors = sorted(keda_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    if obj["kind"] == "ScaledObject":
        spec = obj["spec"]
        # The CRD's x-kubernetes-validations rule, which jsonschema cannot run (CEL).
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
        for trigger in spec["triggers"]:
            if trigger["type"] == "prometheus":
                promql_parser.parse(trigger["metadata"]["query"])
                float(trigger["metadata"]["threshold"])
            assert trigger.get("metricType", "AverageValue") in {"Value", "AverageValue"}


CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"): check_service_monitor,
                    ("monitoring.coreos.com/v1", "PrometheusRule"): check_prometheus_rule,
                    (KEDA_API, "ScaledObject"): check_keda,
                    (KEDA_API, "TriggerAuthentication"): check_keda}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(set(RENDER) - {"off"} | {"subchart"}))
def test_every_rendered_object_is_valid_for_kubernetes(helm, variant, version):
    """kubernetes-validate in strict mode (unknown fields are errors) for built-in kinds; the
    Prometheus Operator's kinds, which it has no schema for, by check_*."""
    objects = rendered(helm, variant)
    for obj in objects.values():
        check = CUSTOM_RESOURCES.get((obj["apiVersion"], obj["kind"]))
        if check:
            check(obj)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{variant}: {obj['kind']} {obj['metadata']['name']} is invalid for Kubernetes {version}: "
                        f"{exc.message} at {list(exc.path)}")


def test_validation_covers_the_variants_the_issue_names(helm):
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == f">={K8S_VERSIONS[0]}-0"
    # Issue 26: defaults, PgBouncer, partitioning, NetworkPolicy on, OpenShift, used as a subchart.
    issue_26 = {"default", "pgbouncer", "example-pgbouncer", "partitioning", "networkpolicy", "openshift", "subchart",
                "subchart-values"}
    assert issue_26 <= set(RENDER) | {"subchart"}
    assert "NetworkPolicy" in rendered(helm, "networkpolicy")
    kinds = {variant: set(rendered(helm, variant))
             for variant in ("default", "replicas-3", "reaper-off", "monitoring", "hpa", "keda", "keda-without-crds")}
    assert kinds["default"] == {"Deployment", "Service", "CronJob"}
    assert kinds["replicas-3"] == {"Deployment", "Service", "CronJob", "PodDisruptionBudget"}
    assert kinds["reaper-off"] == {"Deployment", "Service"}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds["monitoring"]
    assert kinds["hpa"] == kinds["replicas-3"] | {"HorizontalPodAutoscaler"}
    assert kinds["keda"] == kinds["replicas-3"] | {"ScaledObject", "TriggerAuthentication"}
    assert kinds["keda-without-crds"] == kinds["default"]


def test_validator_catches_what_it_is_for():
    """A control: the strict validator refuses an unknown field and a wrong type."""
    for bad in ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                 "spec": {"ports": [{"port": "http"}]}},
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                 "spec": {"enableServiceLinks": False}}):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_keda_validator_catches_what_it_is_for(helm):
    """A control for the vendored KEDA schemas: an unknown field, a number where KEDA takes only
    strings (trigger metadata), a missing trigger type and a TriggerAuthentication's reference
    without a key are refused; the rendered objects pass."""
    objects = rendered(helm, "keda")
    check_keda(objects["ScaledObject"])
    check_keda(objects["TriggerAuthentication"])
    broken = []
    for path, value in [(("spec", "minReplicas"), 2), (("spec", "triggers", 0, "metadata", "threshold"), 20000),
                        (("spec", "triggers", 0, "type"), None), (("spec", "scaleTargetRef", "replicas"), 1)]:
        obj = copy.deepcopy(objects["ScaledObject"])
        node = obj
        for key in path[:-1]:
            node = node[key]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        broken.append(obj)
    auth = copy.deepcopy(objects["TriggerAuthentication"])
    del auth["spec"]["secretTargetRef"][0]["key"]
    broken.append(auth)
    for obj in broken:
        assert list(keda_validator(obj["kind"]).iter_errors(obj)), obj
    source = json.loads((KEDA_SCHEMAS / "keda.sh_scaledobjects.v1alpha1.json").read_text())["$comment"]
    assert "kedacore/keda v2." in source and "config/crd/bases/keda.sh_scaledobjects.yaml" in source


# ---- autoscaling ----------------------------------------------------------------------------


def fewest_replicas(objects: dict[str, dict]) -> int:
    if "HorizontalPodAutoscaler" in objects:
        return objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    if "ScaledObject" in objects:
        return objects["ScaledObject"]["spec"]["minReplicaCount"]
    return objects["Deployment"]["spec"]["replicas"]


def exported_metrics() -> set[str]:
    from kaireon_pub import metrics

    families = [f for m in vars(metrics).values() if isinstance(m, MetricWrapperBase) for f in m.describe()]
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


@pytest.mark.parametrize("variant,owner", [("hpa", "HorizontalPodAutoscaler"),
                                           ("hpa-age-min-1", "HorizontalPodAutoscaler"),
                                           ("keda", "ScaledObject"), ("keda-postgresql-only", "ScaledObject"),
                                           ("keda-without-crds", None), ("default", None)])
def test_deployment_leaves_replicas_to_the_autoscaler(helm, variant, owner):
    """With an autoscaler the Deployment sets no replicas, so `helm upgrade` never resets what the
    autoscaler chose; without one (KEDA's CRDs missing too) outboxPublisher.replicas counts."""
    objects = rendered(helm, variant)
    deployment = objects["Deployment"]
    assert ("replicas" in deployment["spec"]) == (owner is None)
    if owner:
        target = objects[owner]["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert not {"HorizontalPodAutoscaler", "ScaledObject"} - {owner} & set(objects)


def test_autoscaling_is_off_by_default_and_one_at_a_time():
    autoscaling = values_yaml()["autoscaling"]
    assert autoscaling["hpa"]["enabled"] is False and autoscaling["keda"]["enabled"] is False
    assert 1 <= autoscaling["minReplicas"] <= autoscaling["maxReplicas"]
    assert autoscaling["maxReplicas"] * values_yaml()["outboxPublisher"]["workers"] <= 256


def test_hpa_scales_on_the_backlog_through_external_metrics(helm):
    objects = rendered(helm, "hpa")
    spec = objects["HorizontalPodAutoscaler"]["spec"]
    values = values_yaml()["autoscaling"]
    assert ((spec["minReplicas"], spec["maxReplicas"], spec["behavior"])
            == (values["minReplicas"], values["maxReplicas"], values["behavior"]))
    (metric,) = spec["metrics"]
    assert metric["type"] == "External"
    job = objects["Service"]["metadata"]["name"]
    assert metric["external"]["metric"] == {"name": "kaireon_outbox_pending_count",
                                            "selector": {"matchLabels": {"job": job}}}
    assert metric["external"]["target"] == {"type": "AverageValue",
                                            "averageValue": str(values["hpa"]["pendingPerReplica"])}
    (age,) = rendered(helm, "hpa-age-min-1")["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert age["external"]["metric"] == {"name": "kaireon_outbox_oldest_pending_age_seconds",
                                         "selector": {"matchLabels": {"service": "outbox"}}}
    assert age["external"]["target"] == {"type": "Value", "value": "60"}
    for variant in ("hpa", "hpa-age-min-1"):
        metrics = rendered(helm, variant)["HorizontalPodAutoscaler"]["spec"]["metrics"]
        names = {m["external"]["metric"]["name"] for m in metrics}
        assert names <= exported_metrics()


def adapter_rules() -> list[dict]:
    """The prometheus-adapter externalRules entries of docs/deploying.md."""
    doc = (ROOT / "docs" / "deploying.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "externalRules" in b]
    assert len(blocks) == 1, "docs/deploying.md needs one ```yaml block with the adapter's externalRules"
    return blocks[0]["rules"]["external"] if "rules" in blocks[0] else blocks[0]["externalRules"]


def test_the_documented_adapter_rule_serves_the_hpa_metrics(helm):
    """The adapter rule an operator copies: its series query and metrics query parse as PromQL
    once the adapter's template is filled in as it would for this HPA (namespace and the
    selector's labels), name the HPA's metrics, keep them per namespace and take the max, not the
    sum, of the replicas' copies of one table-wide figure."""
    objects = rendered(helm, "hpa")
    job = objects["Service"]["metadata"]["name"]
    wanted = {"kaireon_outbox_pending_count", "kaireon_outbox_oldest_pending_age_seconds"}
    served = set()
    for rule in adapter_rules():
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        series = promql_parser.parse(rule["seriesQuery"])
        assert isinstance(series, promql_parser.VectorSelector)
        for name in wanted:
            if not re.fullmatch(rule["name"]["matches"], name):
                continue
            exposed = re.sub(rule["name"]["matches"], rule["name"].get("as", "$0").replace("$0", r"\g<0>"), name)
            served.add(exposed)
            query = (rule["metricsQuery"].replace("<<.Series>>", name)
                     .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",job="{job}"')
                     .replace("<<.GroupBy>>", "namespace"))
            expr = promql_parser.parse(query)
            assert isinstance(expr, promql_parser.AggregateExpr) and "max" in str(expr.op).lower(), query
            (selector, _), = selectors(expr)
            assert selector.name == name
            matchers = {(m.name, m.value) for m in selector.matchers.matchers}
            assert {("namespace", NAMESPACE), ("job", job)} <= matchers, query
    assert served == wanted == {m["external"]["metric"]["name"] for m in
                                rendered(helm, "hpa")["HorizontalPodAutoscaler"]["spec"]["metrics"]
                                + rendered(helm, "hpa-age-min-1")["HorizontalPodAutoscaler"]["spec"]["metrics"]}
    assert wanted <= exported_metrics()


def test_keda_prometheus_triggers_read_this_release_as_one_sample(helm):
    objects = rendered(helm, "keda")
    spec = objects["ScaledObject"]["spec"]
    values = values_yaml()["autoscaling"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (values["minReplicas"], values["maxReplicas"])
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == values["behavior"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"pending", "oldest-pending-age", "pending-rows"}
    expected = {"pending": ("kaireon_outbox_pending_count", "AverageValue",
                            str(values["keda"]["prometheus"]["pendingPerReplica"])),
                "oldest-pending-age": ("kaireon_outbox_oldest_pending_age_seconds", "Value", "120")}
    job = objects["Service"]["metadata"]["name"]
    for name, (metric, metric_type, threshold) in expected.items():
        trigger = triggers[name]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == metric_type
        assert trigger["metadata"]["serverAddress"] == PROMETHEUS_URL and trigger["metadata"]["threshold"] == threshold
        expr = promql_parser.parse(trigger["metadata"]["query"])
        # KEDA refuses a query answering more than one sample: max without by().
        assert isinstance(expr, promql_parser.AggregateExpr) and "max" in str(expr.op).lower() and not expr.modifier
        (selector, _), = selectors(expr)
        assert selector.name == metric and metric in exported_metrics()
        assert {("namespace", NAMESPACE), ("job", job)} <= {(m.name, m.value) for m in selector.matchers.matchers}


@pytest.mark.parametrize("variant,secret,key,cap", [
    ("keda", f"{RELEASE}-kaireon-pub-database", "DATABASE_URL", 6 * 20000),
    ("keda-postgresql-only", "pg-direct", "DIRECT_URL", 8 * 5000),
])
def test_keda_postgresql_trigger_is_bounded_and_reads_the_dsn_from_the_secret(helm, variant, secret, key, cap):
    objects = rendered(helm, variant)
    (trigger,) = [t for t in objects["ScaledObject"]["spec"]["triggers"] if t["type"] == "postgresql"]
    auth = objects["TriggerAuthentication"]
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"] == {"secretTargetRef": [{"parameter": "connection", "name": secret, "key": key}]}
    # Never a credential in the manifests: no password, host or DSN, only the Secret's name.
    assert set(trigger["metadata"]) == {"query", "targetQueryValue"}
    for obj in (objects["ScaledObject"], auth):
        text = json.dumps(obj)
        assert "postgresql://" not in text and "password" not in text.lower()
    # Bounded by maxReplicas x pendingPerReplica (the most the autoscaler can use), on the rows
    # the claim index covers (its predicate is status = 'pending').
    query = trigger["metadata"]["query"]
    assert re.fullmatch(r"SELECT count\(\*\) FROM \(SELECT 1 FROM outbox_events "
                        r"WHERE status = 'pending' LIMIT (\d+)\) AS pending",
                        query), query
    assert int(query.rsplit("LIMIT ", 1)[1].split(")")[0]) == cap == (
        objects["ScaledObject"]["spec"]["maxReplicaCount"] * int(trigger["metadata"]["targetQueryValue"]))
    migration = (ROOT / "kaireon_pub" / "db" / "migrations").glob("0001_*.sql")
    assert "ON outbox_events (shard, xid, id) WHERE status = 'pending'" in next(migration).read_text()
    if variant == "keda-postgresql-only":
        assert "advanced" not in objects["ScaledObject"]["spec"]  # behavior: null leaves the default


def test_install_notes_name_the_autoscaler_or_why_there_is_none(helm):
    assert "2 to 6 replicas, scaled by a HorizontalPodAutoscaler" in helm["render:hpa"]["notes"]
    assert "scaled by a KEDA ScaledObject" in helm["render:keda"]["notes"]
    notes = helm["render:keda-without-crds"]["notes"]
    assert "WARNING: keda.sh/v1alpha1" in notes and "(1 replica(s))" in notes
    assert "No PodDisruptionBudget: with 1 replica(s) at the fewest" in helm["render:hpa-age-min-1"]["notes"]


def test_failed_events_the_dead_letter_topic_refuses_raise_an_alert(helm):
    rule = rules_of(helm, "monitoring")["OutboxDeadLetterStalled"]
    assert {s.name for s, _ in selectors(promql_parser.parse(rule["expr"]))} == {"kaireon_outbox_dead_letter_waiting"}
    assert rule["for"] == "15m" and rule["annotations"]["runbook_url"].endswith("#dead-letters")
