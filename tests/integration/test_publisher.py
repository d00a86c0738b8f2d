"""Publisher.publish against the real broker: what each event's fate is, and when publish returns."""

import asyncio
import time

import pytest

from kaireon_pub.settings import Settings
from kaireon_pub.worker.publisher import Publisher
from kaireon_pub.worker.rows import Row


def rows_for(topic: str, keys: list[str], headers: dict[int, str] | None = None) -> list[Row]:
    """Rows shaped as the claim returns them, ids 1..n in order."""
    now = time.time()
    return [Row(i, topic, key, f'{{"i": {i}}}', (headers or {}).get(i, "{}"), "test.event", 0, 0, 1000 + i, now,
                "2026-11-28T00:00:00.000000Z")
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


@pytest.mark.timeout(60)
def test_a_row_whose_headers_are_not_an_object_fails_alone(broker, topic):
    # Row 3's headers are a JSON array (plain SQL or a restore can write that); row 5 shares its
    # key and must wait (strict order), every other row is delivered in the same batch.
    rows = rows_for(topic, ["a", "b", "poison", "c", "poison", "d"], headers={3: "[1, 2]"})
    outcome = publish(broker, rows)
    assert sorted(outcome.delivered) == [1, 2, 4, 6]
    assert list(outcome.rejected) == [3] and "JSON object" in outcome.rejected[3]
    assert outcome.released == [5]
    assert not (outcome.retry or outcome.transient_error or outcome.producer_error)


def test_header_values_that_are_not_strings_are_sent_as_json():
    from kaireon_pub.worker.publisher import record_headers

    row = rows_for("t", ["k"], headers={1: '{"s": "x", "meta": {"n": 1}, "n": 7, "ok": true, "nil": null}'})[0]
    headers = dict(record_headers(row))
    assert headers["s"] == b"x"
    assert headers["meta"] == b'{"n":1}'
    assert headers["n"] == b"7" and headers["ok"] == b"true" and headers["nil"] == b"null"
    assert headers["event-id"] == b"1" and headers["event-type"] == b"test.event"
