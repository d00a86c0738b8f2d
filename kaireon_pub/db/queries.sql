-- Named queries. Each block starts with `-- name: one-line description` and runs to the next.
-- Python refers to them by name (kaireon_pub.db.queries.Q.name); parameters are psycopg %(named)s.

-- enqueue_one: write one event in the caller's transaction and wake the workers on commit
WITH ins AS (
    INSERT INTO outbox_events (topic, partition_key, payload, headers, event_type)
    VALUES (%(topic)s, %(key)s, %(payload)s::jsonb, %(headers)s::jsonb, %(event_type)s)
    RETURNING id
)
SELECT id, pg_notify('kaireon_outbox', '') IS NULL AS notified FROM ins;

-- enqueue_many: write many events in one round trip, in the order given
WITH ins AS (
    INSERT INTO outbox_events (topic, partition_key, payload, headers, event_type)
    SELECT t.topic, t.key, t.payload::jsonb, t.headers::jsonb, t.event_type
    FROM unnest(%(topics)s::text[], %(keys)s::text[], %(payloads)s::text[], %(headers)s::text[],
                %(event_types)s::text[]) WITH ORDINALITY AS t(topic, key, payload, headers, event_type, n)
    ORDER BY t.n
    RETURNING id
)
SELECT id, pg_notify('kaireon_outbox', '') IS NULL AS notified FROM ins ORDER BY id;

-- register_worker: announce (or refresh) this worker as live; the fair share counts these rows
INSERT INTO outbox_workers (worker_id, hostname, pid, slot, expires_at)
VALUES (%(worker_id)s, %(hostname)s, %(pid)s, %(slot)s,
        clock_timestamp() + make_interval(secs => %(ttl)s))
ON CONFLICT (worker_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
RETURNING (SELECT count(*) FROM outbox_workers w
           WHERE w.expires_at > clock_timestamp() AND w.worker_id <> %(worker_id)s) + 1 AS live_workers;

-- unregister_worker: leave the tier at the end of a drain
DELETE FROM outbox_workers WHERE worker_id = %(worker_id)s;

-- forget_dead_workers: drop rows of workers gone for an hour (their leases expired long ago)
DELETE FROM outbox_workers WHERE expires_at < clock_timestamp() - interval '1 hour';

-- renew_leases: extend the leases this worker still holds; an expired lease is not renewed
UPDATE outbox_shard_leases
SET expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
WHERE owner = %(worker_id)s AND expires_at > clock_timestamp()
RETURNING shard, epoch;

-- release_leases: hand shards back at once (rebalance, drain)
UPDATE outbox_shard_leases
SET owner = NULL, expires_at = '-infinity'
WHERE owner = %(worker_id)s AND shard = ANY(%(shards)s::smallint[])
RETURNING shard;

-- acquire_leases: take up to n free or expired shards, bumping their fencing epoch
WITH free AS (
    SELECT shard FROM outbox_shard_leases
    WHERE owner IS NULL OR expires_at <= clock_timestamp()
    ORDER BY shard
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox_shard_leases l
SET owner = %(worker_id)s, epoch = l.epoch + 1,
    expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
FROM free
WHERE l.shard = free.shard
RETURNING l.shard, l.epoch;

-- reset_shard_claims: rows a previous owner left in processing in shards just acquired
WITH reset AS (
    UPDATE outbox_events
    SET status = 'pending', claim_token = NULL, claimed_by = NULL, claimed_until = NULL,
        updated_at = clock_timestamp()
    WHERE status = 'processing' AND shard = ANY(%(shards)s::smallint[])
      AND claimed_by IS DISTINCT FROM %(worker_id)s
    RETURNING 1
)
SELECT count(*) AS reset_count FROM reset;

-- reset_worker_claims: rows a dead worker had claimed go back to pending at once
WITH reset AS (
    UPDATE outbox_events
    SET status = 'pending', claim_token = NULL, claimed_by = NULL, claimed_until = NULL,
        updated_at = clock_timestamp()
    WHERE status = 'processing' AND claimed_by = ANY(%(worker_ids)s::uuid[])
    RETURNING 1
), leases AS (
    UPDATE outbox_shard_leases SET owner = NULL, expires_at = '-infinity'
    WHERE owner = ANY(%(worker_ids)s::uuid[])
    RETURNING 1
), workers AS (
    DELETE FROM outbox_workers WHERE worker_id = ANY(%(worker_ids)s::uuid[])
)
SELECT (SELECT count(*) FROM reset) AS reset_count, (SELECT count(*) FROM leases) AS released;

-- claim_batch: pending -> processing in the owned shards, each from its cursor, in (xid, id) order
-- The selection is claim_locked_batch's (included below); this statement turns its row locks
-- into a durable claim with a fresh token, so the batch can be published outside a transaction.
WITH candidates AS (
{{claim_locked_batch}}
)
UPDATE outbox_events e
SET status = 'processing', claim_token = %(token)s, claimed_by = %(worker_id)s,
    claimed_until = clock_timestamp() + make_interval(secs => %(staleness)s),
    updated_at = clock_timestamp()
FROM candidates c
WHERE e.id = c.id
RETURNING c.id, c.topic, c.partition_key, c.payload, c.headers, c.event_type, c.attempts, c.shard,
          c.xid, c.created_epoch, c.created_iso;

-- claim_locked_batch: lock mode; the row locks of this open transaction are the claim (no write)
-- Only rows whose writing transaction is older than every running one are taken, so a row that
-- commits late with a lower id is never passed over. The publisher workers' own transactions
-- (sessions named kaireon-pub:worker-*) are left out of that horizon: they update and delete
-- outbox rows but never insert one, and counting them made every worker's claim and mark hold
-- back the others' claims (twice the idle-load latency with two workers in the bench). The
-- lease rows are locked FOR KEY SHARE, so a new owner (FOR UPDATE SKIP LOCKED) cannot take a
-- shard in the middle of a claim, while the owner's lease keeper can still renew it (an update of
-- a non-key column does not conflict with that lock); an expired lease claims nothing. In lock mode the transaction stays open while the batch
-- is published and ends with mark_published_locked / delete_published_locked; a crash releases
-- the locks at once.
WITH horizon AS MATERIALIZED (
    SELECT coalesce(
               (SELECT min(x) FROM pg_snapshot_xip(s.snap) AS x
                WHERE x::xid NOT IN (SELECT a.backend_xid FROM pg_stat_activity a
                                     WHERE a.backend_xid IS NOT NULL
                                       AND a.application_name LIKE 'kaireon-pub:worker-%%')),
               pg_snapshot_xmax(s.snap)) AS xmin,
           clock_timestamp() AS now
    FROM (SELECT pg_current_snapshot() AS snap) s
), cursors AS MATERIALIZED (
    SELECT c.shard, c.cxid, c.cid, c.n
    FROM unnest(%(shards)s::smallint[], %(epochs)s::bigint[], %(cursor_xids)s::text[]::xid8[],
                %(cursor_ids)s::bigint[]) WITH ORDINALITY AS c(shard, epoch, cxid, cid, n)
    JOIN outbox_shard_leases l ON l.shard = c.shard AND l.epoch = c.epoch
    WHERE l.owner = %(worker_id)s AND l.expires_at > (SELECT now FROM horizon)
    ORDER BY c.n
    FOR KEY SHARE OF l
)
SELECT e.id, e.topic, e.partition_key, e.payload::text AS payload, e.headers::text AS headers,
       e.event_type, e.attempts, e.shard, e.xid::text::bigint AS xid,
       extract(epoch FROM e.created_at)::float8 AS created_epoch,
       to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_iso
FROM cursors c
CROSS JOIN LATERAL (
    SELECT e.*
    FROM outbox_events e
    WHERE e.status = 'pending' AND e.shard = c.shard
      AND (e.xid, e.id) > (c.cxid, c.cid)
      AND e.xid < (SELECT xmin FROM horizon)
      AND e.next_attempt_at <= (SELECT now FROM horizon)
      AND (%(relaxed)s OR e.partition_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM outbox_events r
            WHERE r.status = 'pending' AND r.attempts > 0 AND r.shard = e.shard
              AND r.partition_key = e.partition_key AND (r.xid, r.id) < (e.xid, e.id)))
    ORDER BY e.xid, e.id
    LIMIT %(batch)s
    FOR UPDATE OF e SKIP LOCKED
) e
LIMIT %(batch)s;

-- mark_published_locked: lock mode; delivered rows, inside the claiming transaction
UPDATE outbox_events
SET status = 'published', published_at = clock_timestamp(), updated_at = clock_timestamp(),
    last_error = NULL
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending';

-- delete_published_locked: lock mode with delete-on-publish
DELETE FROM outbox_events WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending';

-- mark_retry_locked: lock mode variant of mark_retry, inside the claiming transaction
UPDATE outbox_events e
SET status = CASE WHEN e.attempts + 1 >= %(max_attempts)s OR u.permanent THEN 'failed' ELSE 'pending' END,
    attempts = e.attempts + 1,
    last_error = left(u.error, 2000),
    next_attempt_at = clock_timestamp() + make_interval(secs =>
        least(%(backoff_max_ms)s, %(backoff_base_ms)s * power(2, least(e.attempts, 30))) / 1000.0),
    updated_at = clock_timestamp()
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(permanent)s::bool[]) AS u(id, error, permanent)
WHERE e.id = u.id AND e.status = 'pending'
RETURNING e.id, e.status, e.shard, e.xid::text::bigint AS xid,
          extract(epoch FROM e.next_attempt_at - clock_timestamp())::float8 AS due_in;

-- mark_published: delivered rows; lands only where this batch's claim token still stands
UPDATE outbox_events
SET status = 'published', published_at = clock_timestamp(), updated_at = clock_timestamp(),
    claim_token = NULL, claimed_by = NULL, claimed_until = NULL, last_error = NULL
WHERE id = ANY(%(ids)s::bigint[]) AND claim_token = %(token)s AND status = 'processing';

-- delete_published: delete-on-publish variant of mark_published
DELETE FROM outbox_events
WHERE id = ANY(%(ids)s::bigint[]) AND claim_token = %(token)s AND status = 'processing';

-- mark_retry: a failed delivery; back off exponentially, or fail for good after max attempts
UPDATE outbox_events e
SET status = CASE WHEN e.attempts + 1 >= %(max_attempts)s OR u.permanent THEN 'failed' ELSE 'pending' END,
    attempts = e.attempts + 1,
    last_error = left(u.error, 2000),
    next_attempt_at = clock_timestamp() + make_interval(secs =>
        least(%(backoff_max_ms)s, %(backoff_base_ms)s * power(2, least(e.attempts, 30))) / 1000.0),
    claim_token = NULL, claimed_by = NULL, claimed_until = NULL, updated_at = clock_timestamp()
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(permanent)s::bool[]) AS u(id, error, permanent)
WHERE e.id = u.id AND e.claim_token = %(token)s AND e.status = 'processing'
RETURNING e.id, e.status, e.shard, e.xid::text::bigint AS xid,
          extract(epoch FROM e.next_attempt_at - clock_timestamp())::float8 AS due_in;

-- release_claimed: return claimed but undelivered rows to pending, attempts untouched (drain)
UPDATE outbox_events
SET status = 'pending', claim_token = NULL, claimed_by = NULL, claimed_until = NULL,
    updated_at = clock_timestamp()
WHERE id = ANY(%(ids)s::bigint[]) AND claim_token = %(token)s AND status = 'processing';

-- reap_stale: the reaper's single bulk UPDATE; concurrent runs reset each row once
WITH reset AS (
    UPDATE outbox_events
    SET status = 'pending', claim_token = NULL, claimed_by = NULL, claimed_until = NULL,
        updated_at = clock_timestamp()
    WHERE status = 'processing'
      AND updated_at < clock_timestamp() - make_interval(secs => %(staleness)s)
    RETURNING 1
)
SELECT count(*)::int AS reset_count FROM reset;

-- record_reaper_run: one row per reaper run, for `kaireon-pub status`
INSERT INTO outbox_reaper_runs (source, reset_count, duration_ms)
VALUES (%(source)s, %(reset_count)s, %(duration_ms)s);

-- notify_rescan: rows went back to pending behind the workers' cursors
SELECT pg_notify('kaireon_outbox_rescan', '');

-- pending_count: exact up to a cap (bounded cost); above it the caller uses pending_estimate
SELECT count(*)::bigint AS n FROM (SELECT 1 FROM outbox_events WHERE status = 'pending' LIMIT %(cap)s) p;

-- pending_estimate: the planner's estimate of pending rows, for backlogs above the cap
SELECT (SELECT reltuples FROM pg_class WHERE oid = 'outbox_events'::regclass)
       * coalesce((SELECT s.most_common_freqs[array_position(s.most_common_vals::text::text[], 'pending')]
                   FROM pg_stats s
                   WHERE s.tablename = 'outbox_events' AND s.attname = 'status'
                     AND s.schemaname = current_schema()), 0) AS n;

-- purge_published: delete one bounded batch of published rows older than the retention
WITH doomed AS (
    SELECT id FROM outbox_events
    WHERE status = 'published'
      AND published_at < clock_timestamp() - make_interval(secs => %(retention)s)
    ORDER BY published_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM outbox_events e USING doomed d WHERE e.id = d.id RETURNING 1
)
SELECT count(*)::int AS purged FROM gone;
