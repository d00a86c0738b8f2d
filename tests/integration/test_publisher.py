"""Publisher.publish against the real broker: what each event's fate is, and when publish returns."""

import asyncio
import time

import pytest

from kaireon_pub.settings import Settings
from kaireon_pub.worker.publisher import Publisher


def rows_for(topic: str, keys: list[str]) -> list[tuple]:
    """Rows shaped as the claim returns them, ids 1..n in order."""
    now = time.time()
    return [(i, topic, key, f'{{"i": {i}}}', "{}", "test.event", 0, 0, 1000 + i, now, "2026-11-28T00:00:00.000000Z")
            for i, key in enumerate(keys, start=1)]


def publish(broker, rows):
    settings = Settings.from_env({"DATABASE_URL": "postgresql:///unused", "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap})
    publisher = Publisher(settings, client_id="test-publisher")
    # A deadline far beyond the test's timeout: publish must return on the last report, not on it.
    deadline = time.monotonic() + 600
    return asyncio.run(publisher.publish(rows, True, deadline, lambda: float("inf")))


@pytest.mark.timeout(60)
def test_publish_returns_once_every_report_is_in(broker, topic):
    rows = rows_for(topic, [f"k{i % 3}" for i in range(30)])
    outcome = publish(broker, rows)
    assert sorted(outcome.delivered) == list(range(1, 31))
    assert len(outcome.ages) == 30
    assert not (outcome.released or outcome.rejected or outcome.retry or outcome.transient_error)
