-- Named queries of the partitioned outbox (kaireon_pub.db.partitions), parsed like queries.sql.
-- `{partition}` stands for a partition's name, quoted by the caller (psycopg.sql.Identifier).

-- is_partitioned: whether outbox_events is a partitioned table (NULL when it does not exist)
SELECT (SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('outbox_events')) AS partitioned;

-- owns_outbox: whether this session's role may make and drop partitions (it is, or is a member of, the owner
-- of outbox_events); a least-privilege runtime role is not: partition maintenance is the owner's job
SELECT pg_has_role(session_user, relowner, 'USAGE') AS owns FROM pg_class WHERE oid = to_regclass('outbox_events');

-- list_partitions: every partition of outbox_events with its range, oldest first
-- A bound is NULL for MINVALUE/MAXVALUE (a converted table attached as one partition has no lower
-- one). `retiring`: it carries outbox_events_retiring (it refuses new rows, it is being dropped);
-- `detach_pending`: a DETACH CONCURRENTLY that did not finish (FINALIZE it). rows: the planner's
-- estimate (-1 before the first VACUUM/ANALYZE of the partition).
SELECT c.relname AS name,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\)'))[1]::timestamptz AS lower,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper,
       i.inhdetachpending AS detach_pending,
       EXISTS (SELECT 1 FROM pg_constraint k
               WHERE k.conrelid = c.oid AND k.conname = 'outbox_events_retiring') AS retiring,
       c.reltuples::bigint AS rows,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'outbox_events'::regclass
ORDER BY upper NULLS LAST, lower NULLS FIRST;

-- partition_state: what a partition still holds, by the partial indexes (a few index probes)
SELECT EXISTS (SELECT 1 FROM {partition} WHERE status = 'pending') AS pending,
       EXISTS (SELECT 1 FROM {partition} WHERE status = 'processing') AS processing,
       (SELECT max(published_at) FROM {partition} WHERE status = 'published') AS last_published,
       EXISTS (SELECT 1 FROM {partition} WHERE status = 'failed') AS failed,
       (SELECT max(updated_at) FROM {partition} WHERE status = 'failed') AS last_failed,
       clock_timestamp() AS now;

-- create_partition: a new partition for [lower, upper), made apart and then attached
-- CREATE TABLE … PARTITION OF would take an ACCESS EXCLUSIVE lock on outbox_events (every enqueue
-- and claim waits behind it); ATTACH PARTITION takes SHARE UPDATE EXCLUSIVE, which neither waits
-- for nor blocks them. The new table is empty: ATTACH's check of its rows and the creation of its
-- indexes (the parent's, made on attach) cost nothing.
-- The bounds are literals in attach_partition (DDL takes no bind parameters).
CREATE TABLE {partition} (LIKE outbox_events INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING CONSTRAINTS INCLUDING STORAGE)

-- attach_partition: the table made by create_partition, or a detached one that must stay, joins
-- (a detached partition keeps its range as a CHECK constraint, so ATTACH does not scan it)
ALTER TABLE outbox_events ATTACH PARTITION {partition} FOR VALUES FROM ({lower}) TO ({upper})

-- retire_partition: from now on the partition refuses every new row and every update
-- A CHECK (false) NOT VALID checks no row already there and fails every insert and update that
-- would put a row version into the partition (deletes still work). Its ACCESS EXCLUSIVE lock waits
-- for every transaction that wrote the partition (an insert not committed yet, a prepared
-- transaction, a requeue): the state read after it, in the same transaction, sees all their rows.
ALTER TABLE {partition} ADD CONSTRAINT outbox_events_retiring CHECK (false) NOT VALID

-- unretire_partition: the partition takes rows again (it still held some that must stay)
ALTER TABLE {partition} DROP CONSTRAINT IF EXISTS outbox_events_retiring

-- detach_partition: take a retired partition out of outbox_events without blocking anyone
-- CONCURRENTLY: SHARE UPDATE EXCLUSIVE on outbox_events, then a wait for the transactions that
-- may still see the partition; not allowed in a transaction block (nor with a default partition,
-- which is why there is none). Interrupted, it leaves the partition "detach pending": finalize it.
ALTER TABLE outbox_events DETACH PARTITION {partition} CONCURRENTLY

-- finalize_detach: finish a DETACH CONCURRENTLY that was interrupted
ALTER TABLE outbox_events DETACH PARTITION {partition} FINALIZE

-- drop_detached: the detached table goes (nothing else uses it: a plain DROP TABLE)
DROP TABLE {partition}

-- detached_leftovers: tables a retirement detached but did not drop (it was interrupted)
-- with the range their detach left as a CHECK constraint, to drop them or attach them back.
SELECT c.relname AS name
FROM pg_class c
JOIN pg_constraint k ON k.conrelid = c.oid AND k.conname = 'outbox_events_retiring'
WHERE c.relkind = 'r' AND NOT c.relispartition
  AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'outbox_events'::regclass)
ORDER BY c.relname;
