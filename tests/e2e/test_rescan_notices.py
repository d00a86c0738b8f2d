"""Rescan notices reach a busy worker (issue 25, case 6): a row put back to pending behind the
cursors (`kaireon-pub requeue`, the reaper) is published before the newer events of its key, also
while the worker is too busy to ever wait for work (the notices were read only in that wait: the
row waited for the periodic full rescan, OUTBOX_RESCAN_INTERVAL_MS, while its key's newer events
went out)."""

from __future__ import annotations

import psycopg
import pytest

from kaireon_pub import Event, enqueue_many
from tests import helpers
from tests.helpers import status_counts, wait_for

pytestmark = pytest.mark.broker_agnostic("rescan notices are the database's (NOTIFY)")

BACKLOG = 60_000  # keeps one worker claiming full batches, never idle, for well over the test's span
KEY = "agg-7"  # one of preload()'s keys


def test_a_row_requeued_behind_a_busy_workers_cursor_goes_before_a_newer_event_of_its_key(
        start_tier, db_url, topic, topic_reader):
    with psycopg.connect(db_url, autocommit=True) as conn:
        # Committed first (the lowest xid): every cursor of the tier passes it while it is failed.
        parked = conn.execute(
            "INSERT INTO outbox_events (topic, partition_key, payload, status, attempts, last_error)"
            " VALUES (%s, %s, '{}', 'failed', 3, 'parked for the test') RETURNING id", (topic, KEY)).fetchone()[0]
    helpers.preload(db_url, topic, BACKLOG)
    # No periodic full rescan within the test: only the requeue's notice can bring the cursor back.
    tier = start_tier(OUTBOX_RESCAN_INTERVAL_MS="600000", OUTBOX_BATCH_SIZE="100")
    # Its shard's cursor past the parked row: a later event of its key (same shard) is published.
    wait_for(lambda: published_of_key(db_url) > 0, 90, f"an event of {KEY} published")
    requeued = helpers.run_cli("requeue", "--id", str(parked), env=tier.env)
    assert requeued.returncode == 0, requeued.stderr
    with psycopg.connect(db_url) as conn:
        newer = enqueue_many(conn, [Event(topic, KEY, {"newer": True})])[0]
        conn.commit()
    # The worker was busy all along (else an idle wait would have read the notice anyway).
    left = status_counts(db_url).get("pending", 0)
    assert left > 10_000, f"the backlog ran out before the requeue ({left} pending): the test proves nothing"
    messages = topic_reader(topic).read_ids([parked, newer], 60)
    order = [i for i in helpers.event_ids(messages) if i in (parked, newer)]
    assert order == [parked, newer], "the requeued row went after a newer event of its key"


def published_of_key(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM outbox_events WHERE partition_key = %s AND status = 'published'",
                            (KEY,)).fetchone()[0]
