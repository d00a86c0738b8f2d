-- Named blocks of the dead-letter sweep (kaireon_pub/worker/deadletter.py, OUTBOX_DEAD_LETTER_TOPIC),
-- parsed like queries.sql. Sent by the workers as the runtime role: SELECT and UPDATE on outbox_events.

-- dead_letter_columns: a failed row as the sweep reads it: worker/rows.py's Row in order, last_error, updated_at (a fragment)
e.id, e.topic, e.partition_key,
       coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8')) AS payload,
       e.headers::text AS headers, e.event_type, e.attempts, e.shard, e.xid::text::bigint AS xid,
       extract(epoch FROM e.created_at)::float8 AS created_epoch,
       to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_iso,
       e.binary_headers::text AS binary_headers, e.partition_key_bytes AS key_bytes,
       e.last_error, e.updated_at

-- dead_letter_due: failed events of the given shards with no dead-letter record yet, oldest failure first, after a cursor
-- A keyset cursor on (updated_at, id): the sweep walks on past the rows whose records were refused (they
-- stay due, and are produced again when the walk starts over): %(after_at)s NULL starts at the oldest.
-- The partial index of failed rows (outbox_events_failed_idx, on updated_at) gives them oldest
-- first; every failed row already dead-lettered before the first due one is passed over (a heap
-- visit each): 100,000 failed rows, all dead-lettered, cost 20-80 ms a sweep (measured, warm cache,
-- a loaded machine).
-- The worker starts a walk at its start, when its shards change, every few minutes and after an error;
-- dead_letter_due_recent otherwise.
SELECT {{dead_letter_columns}}
FROM outbox_events e
WHERE e.status = 'failed' AND e.dead_lettered_at IS NULL
  AND e.updated_at >= coalesce(%(after_at)s::timestamptz, '-infinity')  -- an index bound
  AND (e.updated_at, e.id) > (coalesce(%(after_at)s::timestamptz, '-infinity'), %(after_id)s::bigint)
  AND e.shard = ANY(%(shards)s::smallint[])
ORDER BY e.updated_at, e.id
LIMIT %(limit)s;

-- dead_letter_due_recent: dead_letter_due over the rows failed in the last %(lookback_s)s seconds only (its own cursor)
-- A range of the same partial index (Index Cond on updated_at: now() is stable, clock_timestamp()
-- would not bound the scan): its cost is the rows failed lately, not all those kept; 0.4 ms beside
-- 100,000 older dead-lettered failed rows (measured). The prompt sweep after a settle failed rows
-- (the lookback covers a settle's commit, minutes over).
SELECT {{dead_letter_columns}}
FROM outbox_events e
WHERE e.status = 'failed' AND e.dead_lettered_at IS NULL
  AND e.updated_at >= now() - make_interval(secs => %(lookback_s)s)  -- now(), stable: an index bound
  AND e.updated_at >= coalesce(%(after_at)s::timestamptz, '-infinity')
  AND (e.updated_at, e.id) > (coalesce(%(after_at)s::timestamptz, '-infinity'), %(after_id)s::bigint)
  AND e.shard = ANY(%(shards)s::smallint[])
ORDER BY e.updated_at, e.id
LIMIT %(limit)s;

-- mark_dead_lettered: the events whose dead-letter record the broker acknowledged
-- Fenced: only a row still failed and not yet dead-lettered (one requeued, purged, or dead-lettered by
-- another worker meanwhile is left as it is, and the caller counts it). updated_at is left alone.
UPDATE outbox_events
SET dead_lettered_at = clock_timestamp()
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'failed' AND dead_lettered_at IS NULL
RETURNING id;
