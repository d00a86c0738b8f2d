-- Named blocks of `kaireon-pub replay` (kaireon_pub.ops.replay), parsed like queries.sql.
-- Sent by the runtime role (like `requeue`): SELECT on outbox_events, UPDATE of its
-- published_partition/published_offset, and outbox_replay_runs (db/grants.sql).
-- A replay re-publishes retained rows (status 'published', kept OUTBOX_RETENTION_SECONDS) in the
-- table's (xid, id) order, the order the workers published them in (a key is in one shard).

-- replay_where: the selection's filter after the cursor (a fragment); a NULL parameter filters nothing
-- The window is over published_at (the published index serves it); %(until)s is always set: the
-- run fixes it at its start, so rows published while it runs are not taken in.
e.status = 'published'
  AND e.published_at < %(until)s::timestamptz
  AND (%(since)s::timestamptz IS NULL OR e.published_at >= %(since)s::timestamptz)
  AND (%(id_from)s::bigint IS NULL OR e.id >= %(id_from)s::bigint)
  AND (%(id_to)s::bigint IS NULL OR e.id <= %(id_to)s::bigint)
  AND (%(keys)s::text[] IS NULL OR e.partition_key = ANY(%(keys)s::text[]))
  AND (%(topics)s::text[] IS NULL OR e.topic = ANY(%(topics)s::text[]))
  AND (e.xid, e.id) > (%(cursor_xid)s::text::xid8, %(cursor_id)s::bigint)

-- replay_now: the database's clock, the end of a window the operator left open
SELECT clock_timestamp();

-- replay_count: how many retained events the selection holds after the cursor, and the first of their ids
-- The first ids come from a top-N sort, not from an array of the whole selection.
SELECT (SELECT count(*) FROM outbox_events e WHERE {{replay_where}})::bigint AS n,
       ARRAY(SELECT e.id FROM outbox_events e WHERE {{replay_where}} ORDER BY e.xid, e.id LIMIT %(show)s) AS ids;

-- replay_rows: the selection's rows after the cursor, in (xid, id) order, as worker.rows.Row
-- The columns are claim_shard_scan's, so that records.py builds the very record the worker built.
-- Read once through a server-side cursor in a read-only transaction of its own connection: no
-- index serves this order on published rows, so the selection is sorted once (not once a page);
-- the transaction takes no transaction id, so it never holds the workers' claim horizon back.
SELECT e.id, e.topic, e.partition_key,
       coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8')) AS payload,
       e.headers::text AS headers, e.event_type, e.attempts, e.shard, e.xid::text::bigint AS xid,
       extract(epoch FROM e.created_at)::float8 AS created_epoch,
       to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_iso,
       e.binary_headers::text AS binary_headers, e.partition_key_bytes AS key_bytes
FROM outbox_events e
WHERE {{replay_where}}
ORDER BY e.xid, e.id;

-- replay_start: a new run (its who, what and how many); its id
INSERT INTO outbox_replay_runs (operator, host, selection, to_topic, rate, selected, holder, held_until)
VALUES (%(operator)s, %(host)s, %(selection)s::jsonb, %(to_topic)s, %(rate)s, %(selected)s, %(holder)s,
        clock_timestamp() + make_interval(secs => %(hold)s))
RETURNING id, db_user;

-- replay_get: one run, as `--resume` needs it
SELECT id, db_user, operator, selection, to_topic, rate, cursor_xid::text, cursor_id, selected, published,
       skipped, state, holder, held_until > clock_timestamp() AS held, finished_at IS NOT NULL AS finished
FROM outbox_replay_runs WHERE id = %(run_id)s;

-- replay_take: a resumed run becomes this process's, unless another one holds it still
-- %(stale_holder)s: a holder known to be gone (a process of this host that no longer exists).
UPDATE outbox_replay_runs
SET holder = %(holder)s, held_until = clock_timestamp() + make_interval(secs => %(hold)s), state = 'running',
    last_error = NULL, updated_at = clock_timestamp()
WHERE id = %(run_id)s AND finished_at IS NULL
  AND (holder IS NULL OR held_until <= clock_timestamp() OR holder = %(stale_holder)s)
RETURNING id;

-- replay_advance: the cursor, the counts and the hold of a run after acknowledged records
UPDATE outbox_replay_runs
SET cursor_xid = coalesce(%(cursor_xid)s::text::xid8, cursor_xid), cursor_id = coalesce(%(cursor_id)s, cursor_id),
    published = published + %(published)s, skipped = skipped + %(skipped)s,
    held_until = clock_timestamp() + make_interval(secs => %(hold)s), updated_at = clock_timestamp()
WHERE id = %(run_id)s AND holder = %(holder)s
RETURNING id;

-- replay_end: a run stops (finished, interrupted or failed) and lets go of its hold
UPDATE outbox_replay_runs
SET state = %(state)s, last_error = %(error)s, holder = NULL, held_until = NULL, updated_at = clock_timestamp(),
    finished_at = CASE WHEN %(state)s = 'finished' THEN clock_timestamp() END
WHERE id = %(run_id)s AND holder = %(holder)s;

-- replay_positions: replayed to their own topic, the rows now point at the new records
-- (the audit and `locate` then read the repaired record); a row purged meanwhile is skipped.
UPDATE outbox_events e
SET published_partition = u.part, published_offset = u.off
FROM unnest(%(ids)s::bigint[], %(partitions)s::int[], %(offsets)s::bigint[]) AS u(id, part, off)
WHERE e.id = u.id AND e.status = 'published';
