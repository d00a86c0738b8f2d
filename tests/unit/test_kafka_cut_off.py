"""Publisher.publish and the lease's cut-off (worker/loop.py cut_off: the drain deadline, or shortly
before the leases may have expired): nothing is handed to librdkafka past it: not a batch whose claim
outlasted the lease (issue 25, case 6). Against the stand-in for
librdkafka of test_publish_accounting."""

from __future__ import annotations

import asyncio
import time

from kaireon_pub.worker.kafka import producer as producer_module
from kaireon_pub.worker.kafka.publisher import Publisher
from tests.unit.test_kafka_publisher import SETTINGS, rows_of
from tests.unit.test_publish_accounting import FakeProducer


def publish(monkeypatch, rows, cut_off, strict: bool = True):
    fake = FakeProducer({})
    monkeypatch.setattr(producer_module, "make_producer", lambda *args: fake)

    async def main():
        pub = Publisher(SETTINGS, client_id="test-publisher")
        try:
            return await pub.publish(rows, strict, time.monotonic() + 30, cut_off)
        finally:
            await pub.close()
    return asyncio.run(main()), fake


def test_a_batch_claimed_past_its_lease_is_not_handed_over(monkeypatch):
    """The claim took longer than the lease had left (a lock wait, a slow scan): the shards' next
    owner may publish these rows already; handing them over too would publish them twice."""
    past = time.monotonic() - 1
    out, fake = publish(monkeypatch, rows_of([("a", "k"), ("a", "j")]), lambda: past)
    assert fake.produced == []
    assert sorted(out.released) == [1, 2] and out.unconfirmed == 0 and out.delivered == []
    assert "lease" in out.transient_error

