-- Named queries. Each block starts with `-- name: one-line description` and runs to the next.
-- Python refers to them by name (kaireon_pub.db.queries.Q.name); parameters are psycopg %(named)s.

-- enqueue_one: write one event in the caller's transaction and wake the workers on commit
WITH ins AS (
    INSERT INTO outbox_events (topic, partition_key, partition_key_bytes, payload_bytes, headers,
                               binary_headers, event_type)
    VALUES (%(topic)s, %(key)s, %(key_bytes)s::bytea, %(payload)s::bytea, %(headers)s::jsonb,
            %(binary_headers)s::jsonb, %(event_type)s)
    RETURNING id
)
-- The NOTIFY is left out on request: PREPARE TRANSACTION refuses a transaction that notified.
SELECT id, CASE WHEN %(notify)s THEN pg_notify('kaireon_outbox', '') IS NULL END AS notified FROM ins;

-- enqueue_many: write many events in one round trip, in the order given
WITH ins AS (
    INSERT INTO outbox_events (topic, partition_key, partition_key_bytes, payload_bytes, headers,
                               binary_headers, event_type)
    SELECT t.topic, t.key, t.key_bytes, t.payload, t.headers::jsonb, t.binary_headers::jsonb, t.event_type
    FROM unnest(%(topics)s::text[], %(keys)s::text[], %(key_bytes)s::bytea[], %(payloads)s::bytea[],
                %(headers)s::text[], %(binary_headers)s::text[], %(event_types)s::text[])
         WITH ORDINALITY AS t(topic, key, key_bytes, payload, headers, binary_headers, event_type, n)
    ORDER BY t.n
    RETURNING id
)
SELECT id, CASE WHEN %(notify)s THEN pg_notify('kaireon_outbox', '') IS NULL END AS notified FROM ins ORDER BY id;

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

-- release_leases: hand shards back at once (rebalance, drain); the other keepers hear of it on commit
WITH released AS (
    UPDATE outbox_shard_leases
    SET owner = NULL, expires_at = '-infinity'
    WHERE owner = %(worker_id)s AND shard = ANY(%(shards)s::smallint[])
    RETURNING shard
)
SELECT shard, pg_notify('kaireon_outbox_leases', '') IS NULL AS notified FROM released;

-- notify_leases: tell the other keepers the tier changed (a worker joined or left) on commit
SELECT pg_notify('kaireon_outbox_leases', '');

-- lease_census: live workers and free shards (read-only), polled by a keeper that cannot LISTEN
SELECT (SELECT count(*) FROM outbox_workers WHERE expires_at > clock_timestamp()) AS live_workers,
       (SELECT count(*) FROM outbox_shard_leases
        WHERE owner IS NULL OR expires_at <= clock_timestamp()) AS free_shards;

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

-- reset_own_claims: this worker's rows in processing go back to pending (a claim's reply was lost)
-- Called only between batches, after a claim failed with a connection error: the claim may have
-- committed with a token the worker never learnt, and nothing else of this worker is in flight.
-- Again before every claim while such a claim may still commit (sessions_alive).
WITH reset AS (
    UPDATE outbox_events
    SET status = 'pending', claim_token = NULL, claimed_by = NULL, claimed_until = NULL,
        updated_at = clock_timestamp()
    WHERE status = 'processing' AND claimed_by = %(worker_id)s
    RETURNING 1
)
SELECT count(*) AS reset_count FROM reset;

-- sessions_alive: which of these backends still run (a claim cut off from its client may still commit)
SELECT pid FROM pg_stat_activity WHERE pid = ANY(%(pids)s::int[]);

-- terminate_frozen_owners: end the sessions of expired owners that still hold lease locks
-- A worker frozen in the middle of a claim (SIGSTOP, a frozen pod, a partition while the server is
-- still sending it a large result) keeps the claim's FOR KEY SHARE locks on its lease rows: the
-- backend waits in ClientWrite, where no timeout acts, and FOR UPDATE SKIP LOCKED never takes
-- those shards. Only sessions of owners whose lease on some shard has expired are ended (their
-- application_name carries the first 8 hex digits of the worker id, and which log in as the tier's
-- own role: any client can take a worker's name) and whose registration has expired too (a live
-- worker renews it), never this worker's own.
SELECT a.pid, a.application_name, pg_terminate_backend(a.pid) AS terminated
FROM pg_stat_activity a
WHERE a.datid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND a.pid <> pg_backend_pid()
  AND a.usename = session_user  -- a session named like a worker but of another role is not the tier's
  AND a.pid IN (SELECT l.pid FROM pg_locks l
                WHERE l.locktype = 'relation' AND l.relation = 'outbox_shard_leases'::regclass AND l.granted)
  AND EXISTS (SELECT 1 FROM outbox_shard_leases s
              WHERE s.owner IS NOT NULL AND s.owner <> %(worker_id)s
                AND s.expires_at < clock_timestamp()
                AND NOT EXISTS (SELECT 1 FROM outbox_workers w  -- a live worker renews its registration
                                WHERE w.worker_id = s.owner AND w.expires_at > clock_timestamp())
                AND a.application_name LIKE 'kaireon-pub:worker-%%.' || left(replace(s.owner::text, '-', ''), 8) || '%%');

-- restamp_foreign_rows: pending rows whose xid is above this cluster's transaction counter
-- A row restored from another cluster (pg_dump/pg_restore, COPY, logical replication into a
-- cluster whose counter is lower) keeps its xid; above the counter it would never pass the
-- horizon. Such rows get small xids (3, 4, …: below every real transaction id) in the order of
-- their original ones, so they sort before every event written since and keep their order among
-- themselves (rows of one original transaction keep one xid in a shard, their ids order them).
-- No visible row of this cluster can have an xid at or above the snapshot's xmax. Every shard:
-- before a worker's first claim, and by worker 0 every OUTBOX_RESCAN_INTERVAL_MS; each claim
-- re-stamps its own shards' (claim_horizon_foreign). Numbered per shard (a key's rows are in one
-- shard), so a pass over every shard and one over a claim's shards give a row the same new xid.
-- One index range per shard (the claim index), so the look costs nothing without such rows.
WITH foreign_shards AS (
    SELECT generate_series(0, 255) AS shard
), {{foreign_rows_restamp}}
SELECT count(*) AS restamped FROM restamped;

-- restamp_shards_foreign_rows: restamp_foreign_rows in %(shards)s only (a claim's, claim_horizon_foreign saw some)
WITH foreign_shards AS (
    SELECT unnest(%(shards)s::int[]) AS shard
), {{foreign_rows_restamp}}
SELECT count(*) AS restamped FROM restamped;

-- foreign_rows_restamp: the re-stamp of the rows above the counter in foreign_shards (a fragment of WITH)
counter AS MATERIALIZED (
    SELECT pg_snapshot_xmax(pg_current_snapshot()) AS xmax
), foreign_rows AS (
    SELECT e.id, dense_rank() OVER (PARTITION BY e.shard ORDER BY e.xid) AS n
    FROM foreign_shards g
    CROSS JOIN LATERAL (
        SELECT e.id, e.shard, e.xid FROM outbox_events e
        WHERE e.status = 'pending' AND e.shard = g.shard::smallint AND e.xid >= (SELECT xmax FROM counter)
        OFFSET 0  -- an index range per shard, not one join over the whole index
    ) e
), restamped AS (
    -- By id through arrays: the planner takes the rows' count for a third of the shards' pending
    -- rows, and would join them by a scan of the whole table.
    UPDATE outbox_events e SET xid = (2 + f.n)::text::xid8, updated_at = clock_timestamp()
    FROM (SELECT unnest(array_agg(id)) AS id, unnest(array_agg(n)) AS n FROM foreign_rows) f
    WHERE e.id = f.id
    RETURNING 1
)

-- foreign_rows_count: pending rows carrying an xid from another cluster (for check)
WITH counter AS MATERIALIZED (
    SELECT pg_snapshot_xmax(pg_current_snapshot()) AS xmax
)
SELECT count(*) AS n
FROM generate_series(0, 255) AS g(shard)
CROSS JOIN LATERAL (
    SELECT 1 FROM outbox_events e
    WHERE e.status = 'pending' AND e.shard = g.shard::smallint AND e.xid >= (SELECT xmax FROM counter)
) e;

-- claim_horizon: the xid below which every transaction that can still write the outbox has ended
-- A row is claimed only once every older transaction that might still commit an outbox row has
-- ended, so a row that commits late with a lower id is never passed over (the gap-safe horizon).
-- Not every running transaction can: one of another database of the cluster cannot, nor can the
-- publisher workers' own sessions (named kaireon-pub:worker-* and logged in as the tier's own
-- role, its session_user: they update and delete outbox rows but never insert one; a session of
-- another role that takes a worker's name is waited for like any other), nor a prepared
-- transaction that holds no lock on outbox_events (prepared, it can write nothing more). Any other transaction of this database may still insert an outbox row
-- however long it has been open, so it is waited for, but at most %(max_wait_ms)s: past that the
-- horizon moves on without it and it is returned in `bypassed`, for the worker to remember and to
-- rescan from its xid once it has ended (`ended` lists the remembered ones that have). A running
-- xid found neither in pg_stat_activity nor in pg_prepared_xacts (it ended a moment ago, or the
-- tier's role may not see another role's backend_xid) is waited for, and returned in `unknown`:
-- the worker times those itself and passes back the ones it has waited for long enough in
-- %(pass_over)s. Parallel workers share their leader's xid.
WITH {{horizon_transactions}}
SELECT {{horizon_columns}}
FROM snap;

-- claim_horizon_foreign: claim_horizon, and whether %(shards)s hold pending rows above the counter
-- The worker's horizon before each claim. A restored row (restamp_foreign_rows) of a claim's
-- shards is seen in the horizon's snapshot: every newer event of its key the claim may take is
-- below the horizon, so it committed before that snapshot, and so did the restored row written
-- before it. The worker then re-stamps them (restamp_shards_foreign_rows) before it claims. One
-- index probe per shard (the claim index; LIMIT keeps each a probe of its own).
WITH {{horizon_transactions}}
SELECT {{horizon_columns}},
       EXISTS (SELECT 1 FROM unnest(%(shards)s::int[]) AS g(shard)
               CROSS JOIN LATERAL (
                   SELECT 1 FROM outbox_events e
                   WHERE e.status = 'pending' AND e.shard = g.shard::smallint AND e.xid >= pg_snapshot_xmax(snap.s)
                   LIMIT 1
               ) e) AS foreign_rows
FROM snap;

-- horizon_columns: claim_horizon's columns (a fragment of SELECT, over horizon_transactions)
coalesce((SELECT min(xid) FROM holders WHERE NOT bypassed), pg_snapshot_xmax(snap.s))::text::bigint AS horizon,
       extract(epoch FROM snap.now - (SELECT min(since) FROM holders WHERE NOT bypassed))::float8 AS held_for,
       ARRAY(SELECT xid::text::bigint FROM holders WHERE bypassed) AS bypassed,
       ARRAY(SELECT xid::text::bigint FROM holders WHERE since IS NULL AND NOT bypassed) AS unknown,
       ARRAY(SELECT m.xid FROM unnest(%(remembered)s::bigint[]) AS m(xid)
             WHERE NOT EXISTS (SELECT 1 FROM running r WHERE r.x = m.xid::text::xid8)) AS ended

-- horizon_transactions: the running transactions the horizon waits for (a fragment of WITH)
{{horizon_judged}}, holders AS MATERIALIZED (
    SELECT j.*, {{horizon_bypassed}} AS bypassed
    FROM judged j, snap
    WHERE j.can_write AND NOT (j.worker_named AND j.usename IS NOT DISTINCT FROM session_user)
)

-- horizon_judged: snap, running, and judged: each running xid, its session and whether it may write the outbox
snap AS MATERIALIZED (
    SELECT pg_current_snapshot() AS s, clock_timestamp() AS now,
           (SELECT oid FROM pg_database WHERE datname = current_database()) AS db
), running AS MATERIALIZED (
    SELECT DISTINCT x FROM snap, pg_snapshot_xip(snap.s) AS x
), judged AS MATERIALIZED (
    SELECT r.x AS xid, a.pid, p.gid, coalesce(a.datname::text, p.database::text) AS database,
           a.application_name AS application, coalesce(a.xact_start, p.prepared) AS since, a.usename,
           coalesce(a.application_name LIKE 'kaireon-pub:worker-%%', false) AS worker_named,
           CASE
               WHEN a.pid IS NOT NULL THEN a.datid = (SELECT db FROM snap)
               WHEN p.gid IS NOT NULL THEN
                   p.database = current_database() AND EXISTS (
                       SELECT 1 FROM pg_locks t
                       JOIN pg_locks l ON l.virtualtransaction = t.virtualtransaction
                       WHERE t.locktype = 'transactionid' AND t.transactionid = p.transaction
                         AND t.pid IS NULL AND l.locktype = 'relation'
                         AND l.database = (SELECT db FROM snap) AND l.relation = 'outbox_events'::regclass)
               ELSE true
           END AS can_write
    FROM running r
    LEFT JOIN LATERAL (
        SELECT a.pid, a.datid, a.datname, a.usename, a.application_name, a.xact_start
        FROM pg_stat_activity a WHERE a.backend_xid = r.x::xid
        ORDER BY a.leader_pid IS NOT NULL, a.pid LIMIT 1
    ) a ON true
    LEFT JOIN pg_prepared_xacts p ON p.transaction = r.x::xid
)

-- horizon_bypassed: whether the horizon passes judged j over (an expression over judged j and snap)
((j.since IS NOT NULL AND j.since <= snap.now - make_interval(secs => %(max_wait_ms)s / 1000.0))
 OR j.xid::text::bigint = ANY(%(pass_over)s::bigint[]))

-- horizon_holders: what holds the claim horizon back (or was passed over), for status and check
-- The transactions claim_horizon waits for, but judged by whoever runs it: `status` and `check`
-- run as the read-only role (or the owner), not as the tier's, so session_user cannot tell the
-- workers' sessions from others. The tier's role is found instead from what another role cannot
-- fake, a role that is granted INSERT on outbox_workers (it can register a worker: the runtime
-- role, the owner, a superuser; never an application's role or the read-only one) and has a
-- session named after a live registered worker (kaireon-pub:worker-<slot>.<first 8 hex digits of
-- its worker_id>). A session named like a worker but of any other role is a holder as for the
-- worker. Run by a worker (its report of what it passed over), session_user is such a role and
-- the only one taken, as in claim_horizon.
WITH {{horizon_judged}}, workers AS MATERIALIZED (
    SELECT DISTINCT a.usename AS role
    FROM pg_stat_activity a
    JOIN outbox_workers w ON w.expires_at > clock_timestamp()
     AND a.application_name LIKE 'kaireon-pub:worker-%%.' || left(replace(w.worker_id::text, '-', ''), 8) || '%%'
    WHERE a.datid = (SELECT db FROM snap) AND has_table_privilege(a.usesysid, 'outbox_workers', 'INSERT')
), tier AS MATERIALIZED (
    SELECT role FROM workers
    WHERE role = session_user OR NOT EXISTS (SELECT 1 FROM workers WHERE role = session_user)
), holders AS MATERIALIZED (
    SELECT j.*, {{horizon_bypassed}} AS bypassed
    FROM judged j, snap
    WHERE j.can_write AND NOT (j.worker_named AND j.usename IN (SELECT role FROM tier))
)
SELECT h.pid, h.gid, h.database, h.application, h.bypassed,
       extract(epoch FROM snap.now - h.since)::float8 AS age_seconds
FROM holders h, snap
ORDER BY h.since NULLS FIRST
LIMIT 20;

-- claim_batch: pending -> processing in the owned shards, each from its cursor, in (xid, id) order
-- The selection is claim_locked_batch's (included below); this statement turns its row locks
-- into a durable claim with a fresh token, so the batch can be published outside a transaction.
-- Rows the selection held back (strict order) come back as they are, to move the cursor.
WITH candidates AS (
{{claim_locked_batch}}
), {{claim_mark_processing}};

-- claim_careful_batch: claim_batch stepping around rows another session locks (claim_careful_locked_batch)
WITH candidates AS (
{{claim_careful_locked_batch}}
), {{claim_mark_processing}};

-- claim_mark_processing: the tail of claim_batch and claim_careful_batch (a fragment of WITH)
claimed AS (
    UPDATE outbox_events e
    SET status = 'processing', claim_token = %(token)s, claimed_by = %(worker_id)s,
        claimed_until = clock_timestamp() + make_interval(secs => %(staleness)s),
        updated_at = clock_timestamp()
    FROM candidates c
    WHERE e.id = c.id AND c.topic IS NOT NULL
    RETURNING c.*
)
SELECT * FROM claimed
UNION ALL
SELECT * FROM candidates WHERE topic IS NULL;

-- claim_locked_batch: lock mode; the row locks of this open transaction are the claim (no write)
-- Only rows below the horizon (claim_horizon, computed just before: any transaction it waited
-- for has ended by now, so their rows are visible) are taken, per shard from its cursor in
-- (xid, id) order. The lease rows are locked FOR KEY SHARE, so a new owner (FOR UPDATE SKIP
-- LOCKED) cannot take a shard in the middle of a claim, while the owner's lease keeper can still
-- renew it (an update of a non-key column does not conflict with that lock); an expired lease
-- claims nothing. Strict order: a row is held while an earlier row of its key is waiting for a
-- retry or is in processing (claimed, its outcome unknown). The scan looks at no more than
-- %(batch)s rows, held or not, so a held key with a long backlog costs a claim no more than a
-- batch; the held rows come back with a NULL topic, to move the cursor past them (the cursor
-- goes back when the event they wait for settles). The scan locks what it returns, held rows
-- too (nobody else claims in an owned shard, and a second lookup by id to lock only the others
-- cost a tenth of the claim). In lock mode the transaction stays open while the batch is
-- published and ends with mark_published_locked / delete_published_locked; a crash releases the
-- locks at once.
-- NOWAIT: nothing of the tier locks a pending row of a shard it does not own, so a locked row is
-- another session's (an application's or an operator's open transaction). Waiting for it would
-- stall every key of the worker, skipping it would let the later events of its key overtake it:
-- the claim fails (LockNotAvailable) and the worker claims again with claim_careful_locked_batch.
WITH cursors AS MATERIALIZED (
{{claim_cursors}}
), scanned AS MATERIALIZED (
    SELECT s.*
    FROM cursors c
    CROSS JOIN LATERAL ({{claim_processing_look}}) processing
    CROSS JOIN LATERAL ({{claim_shard_scan}} FOR UPDATE OF e NOWAIT) s
    LIMIT %(batch)s
)
SELECT id, topic, partition_key, payload, headers, event_type, attempts, shard, xid, created_epoch,
       created_iso, binary_headers, key_bytes
FROM scanned WHERE NOT held
UNION ALL
SELECT id, NULL, NULL, NULL, NULL, NULL, NULL, shard, xid, NULL, NULL, NULL, NULL
FROM scanned WHERE held;

-- claim_careful_locked_batch: claim_locked_batch when another session locks a pending row
-- The same scan without locks, then the rows it found are locked by id, skipping those another
-- session holds ("busy"). A busy row comes back like a held row but with its attempts (never
-- NULL) and its key, for the worker to hold the rest of the key (the busy_* parameters: the busy
-- rows it met before, one per key) until it can lock that row; in strict order the later rows of
-- its key in this scan are held too. The worker uses this form while it knows of a busy row, and
-- rescans a busy row's shard every second. A row another session changed and committed between
-- the scan (this statement's snapshot) and its lock is not taken as the scan read it: the lock
-- re-checks the row as it is now (still pending, the attempts the scan read), and one that fails
-- the check comes back as busy, so the next scan of its shard sees it as it is (marked failed by
-- an operator, retried, deleted: not claimed, never brought back from failed).
WITH cursors AS MATERIALIZED (
{{claim_cursors}}
), scanned AS MATERIALIZED (
    SELECT s.*
    FROM cursors c
    CROSS JOIN LATERAL ({{claim_processing_look}}) processing
    CROSS JOIN LATERAL ({{claim_shard_scan}}) s
    LIMIT %(batch)s
), locked AS MATERIALIZED (
    SELECT e.id FROM outbox_events e JOIN scanned s ON s.id = e.id
    WHERE e.status = 'pending' AND e.attempts = s.attempts
    FOR UPDATE OF e SKIP LOCKED
), judged AS MATERIALIZED (
    SELECT s.*, l.id IS NULL AS busy,
           s.held OR (NOT %(relaxed)s AND s.partition_key IS NOT NULL AND (
               coalesce(bool_or(l.id IS NULL) OVER (PARTITION BY s.shard, s.partition_key ORDER BY s.xid, s.id
                                                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false)
               OR EXISTS (SELECT 1
                          FROM unnest(%(busy_shards)s::smallint[], %(busy_keys)s::text[],
                                      %(busy_xids)s::bigint[], %(busy_ids)s::bigint[]) AS b(shard, partition_key, xid, id)
                          WHERE b.shard = s.shard AND b.partition_key = s.partition_key
                            AND (b.xid, b.id) < (s.xid, s.id))
           )) AS behind
    FROM scanned s LEFT JOIN locked l ON l.id = s.id
)
SELECT id, topic, partition_key, payload, headers, event_type, attempts, shard, xid, created_epoch,
       created_iso, binary_headers, key_bytes
FROM judged WHERE NOT busy AND NOT behind
UNION ALL
SELECT id, NULL, CASE WHEN busy THEN partition_key END, NULL, NULL, NULL, CASE WHEN busy THEN attempts END,
       shard, xid, NULL, NULL, NULL, NULL
FROM judged WHERE busy OR behind;

-- claim_cursors: the owned shards with their cursors, lease rows locked (a fragment: see claim_locked_batch)
SELECT c.shard, c.cxid, c.cid, c.n
FROM unnest(%(shards)s::smallint[], %(epochs)s::bigint[], %(cursor_xids)s::text[]::xid8[],
            %(cursor_ids)s::bigint[]) WITH ORDINALITY AS c(shard, epoch, cxid, cid, n)
JOIN outbox_shard_leases l ON l.shard = c.shard AND l.epoch = c.epoch
WHERE l.owner = %(worker_id)s AND l.expires_at > clock_timestamp()
ORDER BY c.n
FOR KEY SHARE OF l;

-- claim_processing_look: whether a shard has a row in processing at all (a fragment, per shard)
-- One look per shard before one per row: a row in processing in an owned shard is rare (a claim
-- whose reply was lost, a restore), and a probe by key walks every entry the key's claimed rows
-- left in the index until a vacuum removes them.
SELECT NOT %(relaxed)s AND EXISTS (SELECT 1 FROM outbox_events r
                                   WHERE r.status = 'processing' AND r.shard = c.shard) AS any;

-- claim_shard_scan: one shard's next rows from its cursor, each with whether strict order holds it (a fragment)
SELECT e.id, e.topic, e.partition_key,
       coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8')) AS payload,
       e.headers::text AS headers, e.event_type, e.attempts, e.shard, e.xid::text::bigint AS xid,
       extract(epoch FROM e.created_at)::float8 AS created_epoch,
       to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_iso,
       e.binary_headers::text AS binary_headers, e.partition_key_bytes AS key_bytes,
       (NOT %(relaxed)s AND e.partition_key IS NOT NULL AND (
           EXISTS (SELECT 1 FROM outbox_events r
                   WHERE r.status = 'pending' AND r.attempts > 0 AND r.shard = e.shard
                     AND r.partition_key = e.partition_key AND (r.xid, r.id) < (e.xid, e.id))
           OR (processing.any AND EXISTS (
               SELECT 1 FROM outbox_events r
               WHERE r.status = 'processing' AND r.shard = e.shard
                 AND r.partition_key = e.partition_key AND (r.xid, r.id) < (e.xid, e.id)))
       )) AS held
FROM outbox_events e
WHERE e.status = 'pending' AND e.shard = c.shard
  AND (e.xid, e.id) > (c.cxid, c.cid)
  AND e.xid < %(horizon)s::text::xid8
  AND e.next_attempt_at <= clock_timestamp()
ORDER BY e.xid, e.id
LIMIT %(batch)s;

-- mark_published_locked: lock mode; delivered rows, inside the claiming transaction
-- Its row locks keep them pending: no status test, which would let the planner walk the partial
-- index of pending rows and its dead entries instead of probing the primary key (mark_published).
-- Where each landed: landed_set. With the count, the transaction's id: should the reply of its
-- commit be lost, the worker asks the server whether it committed (xact_status) instead of marking
-- the batch again.
WITH marked AS (
    UPDATE outbox_events
    SET status = 'published', published_at = clock_timestamp(), updated_at = clock_timestamp(),
        last_error = NULL, {{landed_set}}
    WHERE id = ANY(%(ids)s::bigint[])
    RETURNING 1
)
SELECT count(*) AS marked, pg_current_xact_id()::text::bigint AS xact FROM marked;

-- delete_published_locked: lock mode with delete-on-publish (no status test; the id: see above)
WITH deleted AS (
    DELETE FROM outbox_events WHERE id = ANY(%(ids)s::bigint[])
    RETURNING 1
)
SELECT count(*) AS marked, pg_current_xact_id()::text::bigint AS xact FROM deleted;

-- xact_status: whether a batch's transaction committed (lock mode, or current_xact's; its commit's reply was lost)
-- committed, aborted, in progress; NULL when the id is too old for the server to know.
SELECT pg_xact_status(%(xact)s::text::xid8) AS status;

-- mark_retry_locked: lock mode variant of mark_retry, inside the claiming transaction
UPDATE outbox_events e
SET {{retry_set}}
    updated_at = clock_timestamp()
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(permanent)s::bool[]) AS u(id, error, permanent)
WHERE e.id = u.id  -- its row locks keep them pending (mark_published_locked)
RETURNING e.id, e.status, e.shard, e.xid::text::bigint AS xid,
          extract(epoch FROM e.next_attempt_at - clock_timestamp())::float8 AS due_in;

-- mark_published_again: lock mode; a published batch whose marks rolled back with its transaction
-- Its session ended between delivery and commit (a failover, pg_terminate_backend, a reset): the
-- worker marks the rows before its next claim, instead of claiming and publishing them again.
-- Only rows still pending: one that is not was taken by another claim meanwhile (a shard handed
-- over); the worker counts it as may be duplicated. (When only the commit's reply was lost, the
-- worker asks first whether it landed: xact_status.) Where each landed: landed_set.
UPDATE outbox_events
SET status = 'published', published_at = clock_timestamp(), updated_at = clock_timestamp(),
    last_error = NULL, {{landed_set}}
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending';

-- delete_published_again: mark_published_again with delete-on-publish
DELETE FROM outbox_events WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending';

-- mark_retry_again: mark_retry_locked for a batch whose marks rolled back (mark_published_again)
-- Only rows still as the claim found them: pending, with the attempts it read (not retried twice).
UPDATE outbox_events e
SET {{retry_set}}
    updated_at = clock_timestamp()
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(permanent)s::bool[], %(attempts)s::int[])
    AS u(id, error, permanent, attempts)
WHERE e.id = u.id AND e.status = 'pending' AND e.attempts = u.attempts
RETURNING e.id, e.status, e.shard, e.xid::text::bigint AS xid,
          extract(epoch FROM e.next_attempt_at - clock_timestamp())::float8 AS due_in;

-- mark_published: delivered rows; lands only where this batch's claim token still stands
-- The token alone says the row is still in this claim, or was published by it: the claim sets it
-- with status 'processing', every other statement that moves a row out of processing clears it,
-- and this one keeps it, so a mark made again because the first one's reply was lost
-- (settle_again) lands on the rows the first one marked instead of counting them as lease lost;
-- a row reaped or handed over meanwhile carries another claim's token, or none. Naming the
-- status as well would let the planner answer from the partial index of processing rows, walking
-- all of it (every row marked since the last vacuum leaves a dead entry there) instead of one
-- primary-key probe per id: the mark's cost grew with the rows published before it.
-- Each row records where its record landed (landed_set).
UPDATE outbox_events
SET status = 'published', published_at = clock_timestamp(), updated_at = clock_timestamp(),
    claimed_by = NULL, claimed_until = NULL, last_error = NULL, {{landed_set}}
WHERE id = ANY(%(ids)s::bigint[]) AND claim_token = %(token)s;

-- landed_set: where a delivered event landed, its delivery report's partition and offset (the marks' SET)
-- %(ids)s comes sorted ascending, %(partitions)s and %(offsets)s in the same order (settle.py,
-- landed): width_bucket's binary search over the ids gives each row its index, a few comparisons
-- per row, so the mark stays the one primary-key index scan of `id = ANY` it was. A join with
-- unnest(ids, partitions, offsets) was measured first and rejected: estimating the claim token's
-- rows at one, the planner joined through a sequential scan of the table, or ran the unnest again
-- for every row (20 to 190 ms to mark 1,000 rows of 200,000, against 9). An offset NULL in the
-- array is stored NULL: librdkafka reported none (settle.py, nullable_int_array).
published_partition = (%(partitions)s::int[])[width_bucket(id, %(ids)s::bigint[])],
    published_offset = (%(offsets)s::bigint[])[width_bucket(id, %(ids)s::bigint[])]

-- delete_published: delete-on-publish variant of mark_published (the token alone: see there)
-- A deleted row keeps no token for a delete made again to find, so the worker sends it in a
-- transaction of its own and reads that transaction's id (current_xact) before the commit: should
-- the commit's reply be lost, it asks the server whether it committed (xact_status) instead of
-- counting the rows as lease lost; should the delete's own reply be lost, nothing was committed.
-- The id is read apart: returned with the count (a data-modifying WITH … RETURNING, as
-- delete_published_locked), the delete cost a fifth more per row on the server.
DELETE FROM outbox_events
WHERE id = ANY(%(ids)s::bigint[]) AND claim_token = %(token)s;

-- current_xact: the open transaction's id (delete_published's, read before its commit for xact_status)
SELECT pg_current_xact_id()::text::bigint AS xact;

-- retry_set: a failed delivery's status, attempts, error and back-off (mark_retry's three forms)
status = CASE WHEN e.attempts + 1 >= %(max_attempts)s OR u.permanent THEN 'failed' ELSE 'pending' END,
    attempts = e.attempts + 1,
    last_error = left(u.error, 2000),
    next_attempt_at = clock_timestamp() + make_interval(secs =>
        least(%(backoff_max_ms)s, %(backoff_base_ms)s * power(2, least(e.attempts, 30))) / 1000.0),

-- mark_retry: a failed delivery; back off exponentially, or fail for good after max attempts
UPDATE outbox_events e
SET {{retry_set}}
    claim_token = NULL, claimed_by = NULL, claimed_until = NULL, updated_at = clock_timestamp()
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(permanent)s::bool[]) AS u(id, error, permanent)
WHERE e.id = u.id AND e.claim_token = %(token)s  -- the token alone: see mark_published
RETURNING e.id, e.status, e.shard, e.xid::text::bigint AS xid,
          extract(epoch FROM e.next_attempt_at - clock_timestamp())::float8 AS due_in;

-- release_claimed: return claimed but undelivered rows to pending, attempts untouched (drain)
UPDATE outbox_events
SET status = 'pending', claim_token = NULL, claimed_by = NULL, claimed_until = NULL,
    updated_at = clock_timestamp()
WHERE id = ANY(%(ids)s::bigint[]) AND claim_token = %(token)s;  -- see mark_published

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
