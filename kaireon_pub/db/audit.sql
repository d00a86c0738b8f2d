-- Statements of `kaireon-pub locate` and `kaireon-pub audit` (kaireon_pub/ops/locate.py,
-- kaireon_pub/ops/audit.py) and of the continuous auditor: reads only (the read-only role's SELECT).

-- audit_row_columns: a row as the claim reads it (claim_shard_scan's expressions, in Row's order), for audit/compare.py
-- The payload and key expressions must stay those of queries.sql's claim_shard_scan: they are the
-- value and key bytes the tier produced (tests/unit/test_audit_sql.py holds them equal).
e.id, e.topic, e.partition_key,
coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8')) AS payload,
e.headers::text AS headers, e.event_type, e.attempts, e.shard, e.xid::text::bigint AS xid,
extract(epoch FROM e.created_at)::float8 AS created_epoch,
to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_iso,
e.binary_headers::text AS binary_headers, e.partition_key_bytes AS key_bytes

-- locate_row: one event by id: the row as the tier produced it, then its state and where it landed
SELECT {{audit_row_columns}},
       e.status, e.last_error, e.created_at, e.published_at,
       CASE WHEN isfinite(e.next_attempt_at) THEN e.next_attempt_at END,  -- '-infinity': due at once
       e.dead_lettered_at,
       e.published_partition, e.published_offset
FROM outbox_events e
WHERE e.id = %(id)s;

-- audit_window: the published rows of the audit's window (a fragment of WHERE, over outbox_events e)
-- The window is on published_at (the published rows' index); NULL bounds and topic: no bound.
e.status = 'published'
AND (%(since)s::timestamptz IS NULL OR e.published_at >= %(since)s::timestamptz)
AND (%(until)s::timestamptz IS NULL OR e.published_at < %(until)s::timestamptz)
AND (%(topic)s::text IS NULL OR e.topic = %(topic)s::text)

-- audit_partitions: per (topic, partition) the range of recorded offsets of the window's rows, and their count
SELECT e.topic, e.published_partition, min(e.published_offset), max(e.published_offset), count(*)
FROM outbox_events e
WHERE {{audit_window}} AND e.published_offset IS NOT NULL
GROUP BY e.topic, e.published_partition
ORDER BY e.topic, e.published_partition;

-- audit_unverifiable: the window's published rows without a recorded position (before migration 0007; a duplicate-sequence delivery)
SELECT count(*)
FROM outbox_events e
WHERE {{audit_window}} AND e.published_offset IS NULL;

-- audit_rows: the window's rows with a position, by (topic, partition) then offset (read through a server-side cursor)
-- One scan and one sort for the whole window, streamed: the audit walks each partition's rows
-- beside its records, both in offset order. Rows claiming the same offset: in id order.
SELECT {{audit_row_columns}}, e.published_partition, e.published_offset
FROM outbox_events e
WHERE {{audit_window}} AND e.published_offset IS NOT NULL
ORDER BY e.topic, e.published_partition, e.published_offset, e.id;
