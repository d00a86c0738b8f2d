"""Lint and render the Helm chart with real Helm (the Helm v4 library bundled by `helm-sdkpy`).

Runs under Python >= 3.12 with helm-sdkpy installed (tests/unit/test_helm_chart.py makes that
virtualenv at .venv-helm/); standard library otherwise.

    python scripts/helm_lint.py lint   helm/kaireon-pub
    python scripts/helm_lint.py render helm/kaireon-pub ['{"outboxPublisher": {"replicas": 2}}'] \
        [--api-versions monitoring.coreos.com/v1] [--release NAME] [--namespace NAME]
    python scripts/helm_lint.py batch  < jobs.json      # [{"op": "lint"|"render", "chart", "values",
                                                        #   "api_versions": [...]}]

helm-sdkpy exposes Lint but no `helm template`: rendering is a real `helm install` against a
stand-in Kubernetes API server in this process, which answers discovery, stores nothing and
accepts every object. The server advertises the built-in kinds the chart uses; a custom
resource's group/version (the Prometheus Operator's `monitoring.coreos.com/v1`, KEDA's
`keda.sh/v1alpha1`) only when asked,
as `helm template --api-versions` would, so `.Capabilities.APIVersions` answers as on a cluster
with or without those CRDs. Helm validates the values against values.schema.json, renders the
templates, builds every object against the discovered kinds and returns the release, whose
`manifest` is exactly what `helm template` prints.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import helm_sdkpy

# Kinds the stand-in server can advertise: (group/version, plural, kind, namespaced).
KINDS = [
    ("v1", "namespaces", "Namespace", False),
    ("v1", "secrets", "Secret", True),
    ("v1", "configmaps", "ConfigMap", True),
    ("v1", "services", "Service", True),
    ("v1", "serviceaccounts", "ServiceAccount", True),
    ("v1", "pods", "Pod", True),
    ("apps/v1", "deployments", "Deployment", True),
    ("batch/v1", "jobs", "Job", True),
    ("batch/v1", "cronjobs", "CronJob", True),
    ("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", True),
    ("autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True),
    ("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor", True),
    ("monitoring.coreos.com/v1", "prometheusrules", "PrometheusRule", True),
    ("keda.sh/v1alpha1", "scaledobjects", "ScaledObject", True),
    ("keda.sh/v1alpha1", "triggerauthentications", "TriggerAuthentication", True),
]
# Group/versions that exist only where their CRDs are installed.
OPTIONAL_GROUP_VERSIONS = {"monitoring.coreos.com/v1", "keda.sh/v1alpha1"}
# Helm's lint severities (pkg/chart/v2/lint/support): 1 info, 2 warning, 3 error.
SEVERITY = {0: "unknown", 1: "info", 2: "warning", 3: "error"}


class _FakeApiServer(BaseHTTPRequestHandler):
    """Just enough of the Kubernetes API for `helm install --wait=false`."""

    kinds: list[tuple[str, str, str, bool]] = KINDS  # per server: see _server_class

    def log_message(self, *args: object) -> None:  # quiet: the caller reports errors
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        groups = sorted({gv for gv, *_ in self.kinds if "/" in gv})
        if path == "/version":
            self._send(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
        elif path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        elif path == "/apis":
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                 "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                for gv in groups]})
        elif path == "/api/v1" or (path.startswith("/apis/") and path[len("/apis/"):] in groups):
            gv = "v1" if path == "/api/v1" else path[len("/apis/"):]
            self._send(200, {"kind": "APIResourceList", "groupVersion": gv, "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                for g, plural, kind, namespaced in self.kinds if g == gv]})
        elif path.endswith("/secrets"):  # Helm's release history: none
            self._send(200, {"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": []})
        else:  # no object exists yet
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404, "message": "not found"})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if "json" in self.headers.get("Content-Type", ""):
            body = json.loads(raw)
        else:  # the release record, sent as protobuf: answer with any Secret
            body = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "release"}}
        body.setdefault("metadata", {})["resourceVersion"] = "1"
        self._send(201, body)

    do_PUT = do_POST


def _kubeconfig(port: int, namespace: str) -> str:
    # Block YAML: helm-sdkpy tells a kubeconfig's content from a path by its "apiVersion:" line.
    return f"""apiVersion: v1
kind: Config
current-context: fake
clusters: [{{name: fake, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {namespace}}}}}]
users: [{{name: fake, user: {{}}}}]
"""


def lint(chart: str) -> dict:
    """helm lint. helm-sdkpy loses the messages' text (Go errors serialise as {}), so a caller
    that sees a failure renders the chart too, for the error text."""
    result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart))
    messages = [{"severity": SEVERITY.get(m.get("Severity"), str(m.get("Severity"))), "path": m.get("Path")}
                for m in result.get("Messages") or []]
    ok = not result.get("Errors") and all(m["severity"] == "info" for m in messages)
    return {"ok": ok, "messages": messages}


def _server_class(api_versions: list[str]) -> type[_FakeApiServer]:
    unknown = set(api_versions) - OPTIONAL_GROUP_VERSIONS
    if unknown:
        raise SystemExit(f"unknown api versions {sorted(unknown)}; known: {sorted(OPTIONAL_GROUP_VERSIONS)}")
    kinds = [k for k in KINDS if k[0] not in OPTIONAL_GROUP_VERSIONS or k[0] in api_versions]
    return type("_ApiServer", (_FakeApiServer,), {"kinds": kinds})


def render(chart: str, values: dict | None, release: str = "kaireon", namespace: str = "outbox",
           api_versions: list[str] | None = None) -> dict:
    """helm install against the stand-in API server; the manifest, or Helm's error text.

    api_versions: optional group/versions (CRDs) the cluster has, e.g. ["monitoring.coreos.com/v1"].
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), _server_class(api_versions or []))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=_kubeconfig(server.server_port, namespace))
        try:
            install = helm_sdkpy.Install(config)
            rel = asyncio.run(install.run(release, chart, values=values or None, wait=False, timeout=30))
        except helm_sdkpy.HelmError as exc:
            return {"ok": False, "error": str(exc)}
        # An empty manifest (everything disabled) is left out of the release.
        return {"ok": True, "manifest": rel.get("manifest", ""), "notes": (rel.get("info") or {}).get("notes", "")}
    finally:
        server.shutdown()
        server.server_close()


def run_job(job: dict) -> dict:
    if job["op"] == "lint":
        return lint(job["chart"])
    if job["op"] == "render":
        return render(job["chart"], job.get("values"), job.get("release", "kaireon"), job.get("namespace", "outbox"),
                      job.get("api_versions"))
    raise SystemExit(f"unknown op {job['op']!r}")


def main(argv: list[str]) -> int:
    # Helm writes caches and a registry config under HOME/XDG dirs: keep them out of the user's.
    home = tempfile.mkdtemp(prefix="kaireon-helm-")
    for var in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        os.environ[var] = home
    os.environ.pop("KUBECONFIG", None)
    if len(argv) >= 2 and argv[0] == "lint":
        result = lint(argv[1])
        print(json.dumps(result, indent=2))
        return 0 if result["ok"] else 1
    if len(argv) >= 2 and argv[0] == "render":
        options: dict[str, list[str]] = {"--api-versions": [], "--release": ["kaireon"], "--namespace": ["outbox"]}
        for option, given in options.items():
            while option in argv:
                at = argv.index(option)
                given[:] = argv[at + 1].split(",") if option == "--api-versions" else [argv[at + 1]]
                del argv[at:at + 2]
        result = render(argv[1], json.loads(argv[2]) if len(argv) > 2 else None, options["--release"][0],
                        options["--namespace"][0], options["--api-versions"])
        print(result["manifest"] if result["ok"] else result["error"], file=sys.stdout if result["ok"] else sys.stderr)
        return 0 if result["ok"] else 1
    if argv == ["batch"]:
        # The jobs are independent: run them side by side, in processes rather than threads
        # because the library keeps its last error per process.
        jobs = json.load(sys.stdin)
        workers = max(1, min(len(jobs), os.cpu_count() or 1, 8))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            print(json.dumps(list(pool.map(run_job, jobs))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
