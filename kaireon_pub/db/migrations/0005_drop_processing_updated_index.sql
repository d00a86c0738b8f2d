-- kaireon:no-transaction
-- The strict-order hold probes rows in processing by (shard, key) for every row a claim scans. With
-- two partial indexes on processing rows, the planner took this one (updated_at, the smaller) and
-- filtered on the key: each probe walked every entry of the index, the dead ones of every row
-- claimed since the last vacuum included, which doubled the claim's database CPU during a drain
-- (bench/RESULTS.md). outbox_events_processing_key_idx (0004) now serves every look at processing
-- rows: the hold by key, the shard handover by shard, and the reaper, crash recovery and status
-- by a walk of the in-flight rows, which are few.
-- CONCURRENTLY: no lock that would stop the applications' inserts on a large table.
DROP INDEX CONCURRENTLY IF EXISTS outbox_events_processing_idx;
