"""Every metric the Grafana dashboard queries is exported by a running tier (a real scrape).

Labelled series exist only once something happened, so the tier is driven through what the
dashboard shows: a load (publishes), a killed worker (restart), a reaper call, a broker outage
(tick failures).
"""

from __future__ import annotations

import os
import signal
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests import helpers
from tests.unit.test_dashboard import queried_metrics


def exported(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_dashboard_metric_is_exported(db_url, restartable_broker, topic, start_tier):
    tier = start_tier(bootstrap=restartable_broker.bootstrap, OUTBOX_WORKERS="2", CRON_SECRET="dash-cron-secret",
                      KAFKA_MESSAGE_TIMEOUT_MS="2000")
    port = tier.http_port()
    with helpers.Load(db_url, topic):
        helpers.wait_for(lambda: (helpers.metric_value(port, "kaireon_outbox_processed_total",
                                                       {"outcome": "published"}) or 0) > 0, 30, "events published")
        # A worker killed: the supervisor respawns it and counts the restart.
        os.kill(tier.worker_pids()[1], signal.SIGKILL)
        helpers.wait_for(lambda: "kaireon_outbox_worker_restarts_total" in exported(port), 30, "a counted restart")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/cron/outbox-reaper", method="POST",
                                         headers={"x-cron-secret": "dash-cron-secret"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
        # The broker away: ticks fail (transient) until it returns.
        restartable_broker.stop()
        helpers.wait_for(lambda: "kaireon_outbox_tick_failures_total" in exported(port), 60, "a failed tick")
        restartable_broker.start()
    missing = queried_metrics() - exported(port)
    assert not missing, f"the dashboard queries metrics the tier does not export: {sorted(missing)}"
    tier.stop()
