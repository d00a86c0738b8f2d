-- The partitioned flavour of 0005: PostgreSQL cannot drop an index of a partitioned table
-- CONCURRENTLY; a plain DROP INDEX takes the table's lock for a moment (under the migrator's lock
-- timeout) and drops the index of every partition with it. Why the index goes: 0005.
DROP INDEX IF EXISTS outbox_events_processing_idx;
