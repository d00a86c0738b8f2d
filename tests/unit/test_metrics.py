"""observe_many() must expose exactly what one observe() per value would have exposed."""

import os
import platform
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from kaireon_pub.metrics import observe_many

BUCKETS = (0.005, 0.01, 0.1, 1, 10)
# On a bound, between bounds, below the first, above the last finite one, zero, repeated.
VALUES = [0.005, 0.0051, 0.001, 0.1, 0.5, 1.0, 9.99, 10.0, 42.0, 0.0, 0.5, 0.5]


def exposition(feed) -> str:
    registry = CollectorRegistry()
    histogram = Histogram("age_seconds", "test", buckets=BUCKETS, registry=registry)
    feed(histogram)
    text = generate_latest(registry).decode()
    # The creation timestamp differs between any two histograms; everything else must not.
    return "\n".join(line for line in text.splitlines() if not line.startswith("age_seconds_created"))


def test_observe_many_equals_one_observe_per_value():
    def one_by_one(h):
        for v in VALUES:
            h.observe(v)

    batched = exposition(lambda h: observe_many(h, VALUES))
    assert batched == exposition(one_by_one)
    assert 'age_seconds_bucket{le="0.005"} 3.0' in batched
    assert 'age_seconds_bucket{le="+Inf"} 12.0' in batched


def test_observe_many_of_nothing_changes_nothing():
    assert exposition(lambda h: observe_many(h, [])) == exposition(lambda h: None)



@pytest.mark.parametrize("multiprocess", [False, True])
def test_build_info_is_one_series_of_value_1_naming_the_versions(multiprocess, tmp_path):
    """kaireon_outbox_build_info{version, python, librdkafka} = 1, single-process and merged the
    way the tier's /metrics merges its processes' files (two processes here: still one series)."""
    import confluent_kafka
    from prometheus_client.parser import text_string_to_metric_families

    from kaireon_pub import __version__

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
        subprocess.run([sys.executable, "-c", "import kaireon_pub.metrics"], check=True, env=env)
    code = ("import os, kaireon_pub.metrics\n"
            "from prometheus_client import REGISTRY, CollectorRegistry, generate_latest\n"
            "from kaireon_pub.http.collector import ScrapeSafeCollector\n"
            "registry = REGISTRY\n"
            "if os.environ.get('PROMETHEUS_MULTIPROC_DIR'):\n"
            "    registry = CollectorRegistry()\n"
            "    registry.register(ScrapeSafeCollector(os.environ['PROMETHEUS_MULTIPROC_DIR']))\n"
            "print(generate_latest(registry).decode())\n")
    text = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["kaireon_outbox_build_info"].samples
    assert [(s.labels, s.value) for s in samples] == [
        ({"version": __version__, "python": platform.python_version(),
          "librdkafka": confluent_kafka.libversion()[0]}, 1.0)]
