"""Where each event landed (issue 27), against a real Apache Kafka (Tansu's offsets are not true): in
both claim modes, every published row's (published_partition, published_offset) is where a consumer
reads the record carrying its event-id, for a few hundred events over several keys published in
several batches."""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers import commit_events, event_ids, wait_all_published

EVENTS = 360
KEYS = 9


@pytest.mark.parametrize("claim_mode", ["status", "lock"])
def test_every_row_records_the_partition_and_offset_its_record_is_read_at(kafka_broker, start_tier, db_url, topic,
                                                                           topic_reader, claim_mode):
    ids = commit_events(db_url, topic, EVENTS, keys=KEYS, phase="landed")
    start_tier(bootstrap=kafka_broker.bootstrap, OUTBOX_CLAIM_MODE=claim_mode, OUTBOX_BATCH_SIZE="50")
    wait_all_published(db_url, EVENTS, 90, f"{EVENTS} events published ({claim_mode} mode)")

    messages = topic_reader(topic, bootstrap=kafka_broker.bootstrap).read_ids(ids, 60)
    read_at = {event_id: (m.partition(), m.offset()) for event_id, m in zip(event_ids(messages), messages,
                                                                             strict=True)}
    assert len(messages) == EVENTS and sorted(read_at) == sorted(ids)  # each once: no duplicate to blur it
    with psycopg.connect(db_url, autocommit=True) as conn:
        recorded = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT id, published_partition, published_offset FROM outbox_events WHERE status = 'published'")}
        keys = {r[0]: r[1] for r in conn.execute("SELECT id, partition_key FROM outbox_events")}
    unrecorded = sorted(i for i, position in recorded.items() if None in position)
    assert not unrecorded, f"{len(unrecorded)} rows without a position, e.g. {unrecorded[:5]}"
    wrong = {i: (recorded[i], read_at[i]) for i in ids if recorded[i] != read_at[i]}
    assert not wrong, f"{len(wrong)} rows recorded elsewhere than read (recorded, read): {list(wrong.items())[:5]}"
    # The run spread over partitions and batches (else it would prove little): every key in one
    # partition, its offsets rising in the order of its events.
    assert len({p for p, _ in recorded.values()}) > 1
    for key in {keys[i] for i in ids}:
        of_key = sorted(i for i in ids if keys[i] == key)
        assert len({recorded[i][0] for i in of_key}) == 1
        offsets = [recorded[i][1] for i in of_key]
        assert offsets == sorted(offsets), f"key {key}: offsets not in the order of its events"
