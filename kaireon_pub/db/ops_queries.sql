-- Named queries of the operator tools (status, requeue, check) and of the backlog gauges.
-- Same format as queries.sql, loaded by kaireon_pub.ops.sql. Every query here has a bounded cost
-- whatever the size of outbox_events: it walks a partial index up to a cap, probes an index once
-- per shard, or reads the planner's statistics. Status values are literals so that the planner
-- always matches the partial index of that status.

-- status_counts_capped: rows per status, each exact up to the cap (each walks its partial index)
SELECT
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events WHERE status = 'pending' LIMIT %(cap)s) s)::bigint AS pending,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events WHERE status = 'processing' LIMIT %(cap)s) s)::bigint AS processing,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events WHERE status = 'published' LIMIT %(cap)s) s)::bigint AS published,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events WHERE status = 'failed' LIMIT %(cap)s) s)::bigint AS failed;

-- status_estimates: the planner's rows per status (reltuples times the status column's frequencies)
-- reltuples is -1 until the table was first analyzed: the caller then has no estimate.
SELECT f.status, (c.reltuples * f.freq)::bigint AS n, c.reltuples >= 0 AS analyzed
FROM pg_class c
LEFT JOIN LATERAL (
    SELECT v.status, v.freq
    FROM pg_stats s,
         unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS v(status, freq)
    WHERE s.schemaname = current_schema() AND s.tablename = 'outbox_events' AND s.attname = 'status'
) f ON true
WHERE c.oid = 'outbox_events'::regclass;

-- pending_heads: per shard, the first pending row in claim order (xid, id): one index probe each
-- The head is the row of the oldest writing transaction still pending in that shard, so its age
-- is the shard's oldest pending age (up to a transaction that wrote long after it began).
SELECT s.shard, h.id, extract(epoch FROM clock_timestamp() - h.created_at)::float8 AS age_seconds
FROM generate_series(0, 255) AS s(shard)
CROSS JOIN LATERAL (
    SELECT e.id, e.created_at
    FROM outbox_events e
    WHERE e.status = 'pending' AND e.shard = s.shard::smallint
    ORDER BY e.xid, e.id
    LIMIT 1
) h;

-- pending_by_shard_group: pending rows per group of 16 shards, each exact up to a cap
SELECT g.grp AS shard_group,
       (SELECT count(*) FROM (
            SELECT 1 FROM outbox_events e
            WHERE e.status = 'pending' AND e.shard >= (g.grp * 16)::smallint
              AND e.shard < (g.grp * 16 + 16)::smallint
            LIMIT %(cap)s) x)::bigint AS n
FROM generate_series(0, 15) AS g(grp)
ORDER BY g.grp;

-- pending_in_shards: pending rows of the given shards, each exact up to a cap
SELECT s.shard,
       (SELECT count(*) FROM (
            SELECT 1 FROM outbox_events e
            WHERE e.status = 'pending' AND e.shard = s.shard
            LIMIT %(cap)s) x)::bigint AS n
FROM unnest(%(shards)s::smallint[]) AS s(shard);

-- failed_count_capped: failed rows, exact up to a cap (the failed partial index)
SELECT count(*)::bigint AS n FROM (SELECT 1 FROM outbox_events WHERE status = 'failed' LIMIT %(cap)s) f;

-- published_last_minute: rows published in the last 60 s, exact up to a cap (published_at index range)
-- now(), not clock_timestamp(): a volatile bound cannot be an index condition.
SELECT count(*)::bigint AS n FROM (
    SELECT 1 FROM outbox_events
    WHERE status = 'published' AND published_at > now() - interval '60 seconds'
    LIMIT %(cap)s
) p;

-- failed_errors: the newest failed events grouped by their error (only the newest `sample` rows)
SELECT f.error, count(*)::bigint AS n, max(f.updated_at) AS newest,
       (array_agg(DISTINCT f.topic))[1:5] AS topics, min(f.id) AS first_id, max(f.id) AS last_id
FROM (
    SELECT left(coalesce(last_error, '(no error text)'), 300) AS error, updated_at, topic, id
    FROM outbox_events
    WHERE status = 'failed'
    ORDER BY updated_at DESC
    LIMIT %(sample)s
) f
GROUP BY f.error
ORDER BY max(f.updated_at) DESC
LIMIT %(groups)s;

-- shard_ownership: live lease holders, their shard counts and the worker behind each lease
SELECT l.owner, count(*)::int AS shards, w.hostname, w.pid, w.slot,
       coalesce(w.expires_at > clock_timestamp(), false) AS registered
FROM outbox_shard_leases l
LEFT JOIN outbox_workers w ON w.worker_id = l.owner
WHERE l.owner IS NOT NULL AND l.expires_at > clock_timestamp()
GROUP BY l.owner, w.hostname, w.pid, w.slot, w.expires_at
ORDER BY w.hostname, w.slot, l.owner;

-- unowned_shards: shards without a live lease (256 rows at most)
SELECT count(*)::int AS n FROM outbox_shard_leases
WHERE owner IS NULL OR expires_at <= clock_timestamp();

-- live_workers: registered workers whose registration has not expired
SELECT count(*)::int AS n FROM outbox_workers WHERE expires_at > clock_timestamp();

-- recent_reaper_runs: the newest reaper runs
SELECT ran_at, source, reset_count, duration_ms FROM outbox_reaper_runs ORDER BY id DESC LIMIT %(limit)s;

-- reaper_last_hour: runs and resets of the last hour (among the newest 1000 runs)
SELECT count(*)::int AS runs, coalesce(sum(reset_count), 0)::bigint AS reset
FROM (SELECT ran_at, reset_count FROM outbox_reaper_runs ORDER BY id DESC LIMIT 1000) r
WHERE r.ran_at > clock_timestamp() - interval '1 hour';

-- requeue_preview: how many failed events a selection matches, and the first of their ids
-- A NULL filter matches everything; error text matches case-insensitively, as a plain substring.
SELECT count(*)::bigint AS n, (array_agg(id ORDER BY id))[1:%(show)s::int] AS ids
FROM outbox_events
WHERE status = 'failed'
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(topic)s::text IS NULL OR topic = %(topic)s::text)
  AND (%(error_contains)s::text IS NULL
       OR strpos(lower(coalesce(last_error, '')), lower(%(error_contains)s::text)) > 0);

-- requeue_failed: the selected failed events back to pending, attempts reset, due at once
-- The rows keep their xid, so they sit behind the workers' cursors: the caller sends notify_rescan.
-- dead_lettered_at is cleared: an event requeued that fails again is dead-lettered again.
WITH picked AS (
    SELECT id FROM outbox_events
    WHERE status = 'failed'
      AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
      AND (%(topic)s::text IS NULL OR topic = %(topic)s::text)
      AND (%(error_contains)s::text IS NULL
           OR strpos(lower(coalesce(last_error, '')), lower(%(error_contains)s::text)) > 0)
    FOR UPDATE
)
UPDATE outbox_events e
SET status = 'pending', attempts = 0, next_attempt_at = '-infinity', dead_lettered_at = NULL,
    claim_token = NULL, claimed_by = NULL, claimed_until = NULL, updated_at = clock_timestamp()
FROM picked
WHERE e.id = picked.id AND e.status = 'failed'
RETURNING e.id;

-- schema_objects: which of the given tables (those the migrations create), and which indexes of outbox_events, exist
SELECT 'table' AS kind, c.relname AS name
FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
  AND c.relname = ANY(%(tables)s::text[])
UNION ALL
SELECT 'index', indexname FROM pg_indexes
WHERE schemaname = current_schema() AND tablename = 'outbox_events';

-- pending_topics_sample: distinct topics among a bounded sample of pending rows
SELECT DISTINCT topic FROM (SELECT topic FROM outbox_events WHERE status = 'pending' LIMIT %(limit)s) p
ORDER BY topic;

-- shard_owners: the live owner of each given shard, and the worker behind it
SELECT l.shard, l.owner, w.hostname, w.pid, w.slot
FROM outbox_shard_leases l
LEFT JOIN outbox_workers w ON w.worker_id = l.owner
WHERE l.shard = ANY(%(shards)s::smallint[]) AND l.owner IS NOT NULL AND l.expires_at > clock_timestamp();

-- pending_long_keys: pending rows near the head of each shard whose key is over 1024 bytes
-- Rows written before migration 0009's CHECK (NOT VALID) may hold one; its claim fails (index row
-- size) for its worker's whole batch, every time, so it stays pending near its shard's head: the
-- first `sample` pending rows of each shard in claim order, an index walk each (256 x `sample`).
SELECT h.id, h.topic, h.shard, octet_length(h.partition_key) AS key_bytes,
       octet_length(h.partition_key_bytes) AS raw_key_bytes
FROM generate_series(0, 255) AS s(shard)
CROSS JOIN LATERAL (
    SELECT e.id, e.topic, e.shard, e.partition_key, e.partition_key_bytes
    FROM outbox_events e
    WHERE e.status = 'pending' AND e.shard = s.shard::smallint
    ORDER BY e.xid, e.id
    LIMIT %(sample)s
) h
WHERE octet_length(h.partition_key) > 1024 OR octet_length(h.partition_key_bytes) > 1024
ORDER BY h.id
LIMIT %(limit)s;
