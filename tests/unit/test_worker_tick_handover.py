"""A batch whose shards were taken while the worker paused is not handed over (tick.py
shards_lost_since_claim). The lease's cut-off alone cannot see it: the renewal that found the shards
taken moved the cut-off on, so without this check the batch went out beside the new owner's copy."""

from __future__ import annotations

import asyncio
import uuid

from kaireon_pub.worker.kafka.outcome import BatchOutcome
from kaireon_pub.worker.loop import Worker
from kaireon_pub.worker.rows import Row
from tests.unit.worker_fakes import raw, settings


class RecordingPublisher:
    def __init__(self):
        self.handed_over: list[list[int]] = []

    async def warm_up(self, rows, until) -> None:
        return None

    async def publish(self, rows, strict, deadline, cut_off):
        self.handed_over.append([r.id for r in rows])
        return BatchOutcome(delivered=[r.id for r in rows])


def publish_after(owned_at_claim: dict[int, int], owned_at_hand_over: dict[int, int]):
    w = Worker(settings(), 0, uuid.uuid4(), lambda: None, [])
    publisher = w.health.publisher = RecordingPublisher()
    w.leases.owned = dict(owned_at_claim)
    w.tick.claimed_epochs = dict(owned_at_claim)
    rows = [Row(*raw(1, 5, 100)), Row(*raw(2, 9, 101))]
    w.leases.owned = dict(owned_at_hand_over)  # the keeper's renewal, during the claim's await
    return asyncio.run(w.tick._publish(rows)), publisher.handed_over


def test_a_batch_of_shards_still_held_is_handed_over():
    out, handed = publish_after({5: 1, 9: 3}, {5: 1, 9: 3})
    assert handed == [[1, 2]] and out.delivered == [1, 2] and out.transient_error is None


def test_a_batch_with_a_lost_shard_is_released_whole_and_never_handed_over():
    out, handed = publish_after({5: 1, 9: 3}, {5: 1})
    assert handed == [] and out.released == [1, 2] and out.unconfirmed == 0
    assert "shards [9] were taken by another worker" in out.transient_error


def test_a_shard_lost_and_taken_back_under_a_new_epoch_counts_as_lost():
    # Its rows were reset by the owner in between and may have been published: the old claim is stale.
    out, handed = publish_after({5: 1, 9: 3}, {5: 2, 9: 3})
    assert handed == [] and out.released == [1, 2] and "shards [5]" in out.transient_error
