-- kaireon:no-transaction
-- The strict-order hold also waits behind an earlier row of the key that is in processing (claimed,
-- its outcome not known yet); this partial index keeps that probe to the in-flight rows.
-- CONCURRENTLY: built without blocking the applications' inserts on a large table. If it fails
-- midway it leaves an invalid index: DROP INDEX CONCURRENTLY outbox_events_processing_key_idx,
-- then migrate again.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_events_processing_key_idx
    ON outbox_events (shard, partition_key, xid, id) WHERE status = 'processing';
