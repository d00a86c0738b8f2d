-- The partitioned flavour of 0004: PostgreSQL cannot build an index on a partitioned table
-- CONCURRENTLY, and this flavour is only ever applied to a fresh database (OUTBOX_PARTITIONING on
-- a database without the outbox), where the table is empty: a plain CREATE INDEX, in the file's
-- transaction. Partitions made later get it like every other index of the table.
CREATE INDEX IF NOT EXISTS outbox_events_processing_key_idx
    ON outbox_events (shard, partition_key, xid, id) WHERE status = 'processing';
