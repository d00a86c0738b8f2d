-- The continuous auditor's statement (kaireon_pub/worker/auditor.py, OUTBOX_AUDIT_SAMPLE_PER_MINUTE).

-- audit_sample: up to %(n)s published rows of %(shards)s with a recorded position, from a random point of the window
-- The window: rows published in the last %(window)s s but not the last %(settle)s s (acks=1: a
-- just-acknowledged record may sit above the high watermark for a moment). The point: %(at)s (0..1) of the way from
-- the window's oldest published row to its newest (both read off the index's ends); when the
-- worker's shards have no row after it, the second branch starts again at the oldest. Each branch
-- walks at most %(scan)s entries of the partial index of published rows (outbox_events_published_idx)
-- in published_at order, whatever the shards hold, so its cost is bounded: the caller sizes
-- %(scan)s to find %(n)s rows of its shards among the others' (its share of the 256 shards). The
-- inner rows carry plain columns only; the record's expressions (claim_shard_scan's, in Row order)
-- are computed for the rows kept. Rows may repeat across the two branches (the caller drops them).
-- now(), not clock_timestamp(): a stable bound is an index condition (a volatile one a filter
-- over every older row). EXPLAIN ANALYZE, 200k rows of the last 30 min and 100k older ones:
-- 0.1 ms and 18 buffers for one row of 16 shards, 0.6 ms for ten, about 2 ms for ten of one shard.
WITH span AS (
    SELECT min(published_at) AS lo, max(published_at) AS hi FROM outbox_events
    WHERE status = 'published' AND published_at >= now() - make_interval(secs => %(window)s)
      AND published_at < now() - make_interval(secs => %(settle)s)
), starts AS (
    SELECT 1 AS branch, lo + (hi - lo) * %(at)s AS t FROM span WHERE lo IS NOT NULL
    UNION ALL
    SELECT 2, lo FROM span WHERE lo IS NOT NULL
)
SELECT e.id, e.topic, e.partition_key,
       coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8')) AS payload,
       e.headers::text AS headers, e.event_type, e.attempts, e.shard, e.xid::text::bigint AS xid,
       extract(epoch FROM e.created_at)::float8 AS created_epoch,
       to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_iso,
       e.binary_headers::text AS binary_headers, e.partition_key_bytes AS key_bytes,
       e.published_partition, e.published_offset
FROM starts s
CROSS JOIN LATERAL (
    SELECT w.id, w.topic, w.partition_key, w.payload_bytes, w.payload, w.headers, w.event_type, w.attempts,
           w.shard, w.xid, w.created_at, w.binary_headers, w.partition_key_bytes,
           w.published_partition, w.published_offset
    FROM outbox_events w
    WHERE w.status = 'published' AND w.published_at >= s.t
      AND w.published_at < now() - make_interval(secs => %(settle)s)
    ORDER BY w.published_at
    LIMIT %(scan)s
) e
WHERE e.shard = ANY(%(shards)s::smallint[]) AND e.published_offset IS NOT NULL
  AND e.published_partition IS NOT NULL
ORDER BY s.branch
LIMIT %(n)s;
