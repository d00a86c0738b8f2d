"""`check`'s list of the schema's tables and indexes follows the migrations, drops included."""

from kaireon_pub.ops.check import expected_objects


def test_an_index_a_later_migration_drops_is_not_expected():
    tables, indexes = expected_objects()
    assert "outbox_events_processing_idx" not in indexes  # 0001 made it, 0005 dropped it
    # 0004 names a DROP INDEX of its own index in a comment (what to do after a failed build).
    assert "outbox_events_processing_key_idx" in indexes
    assert {"outbox_events_claim_idx", "outbox_events_retry_idx"} <= indexes
    assert {"outbox_events", "outbox_shard_leases", "outbox_workers", "outbox_reaper_runs"} <= tables
