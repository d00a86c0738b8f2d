"""The claim's cost and its strict-order hold at the edges (issue 13), statement by statement.

A key held behind a retrying event must not make its shard's claim cost grow with the key's
backlog: the proof is the work `EXPLAIN (ANALYZE, BUFFERS)` reports for the scans of
outbox_events (loops and rows looked at), bounded by a multiple of the batch, not a timing. A
control measures the same on the claim's earlier shape (a NOT EXISTS probe per candidate row, a
cursor that does not move past held rows), to show the measurement can fail.
"""

from __future__ import annotations

import json
import uuid

import psycopg

from kaireon_pub.db.queries import Q

WORKER = uuid.uuid4()
BATCH = 100
BACKLOG = 100_000
PAST = 20_000  # rows claimed and published before the measured claim
# Above every xid of the test server: the horizon waits for no transaction here.
HORIZON = str(2**40)

# The claim selection before issue 13, verbatim: held rows are filtered by a NOT EXISTS probe run
# once per candidate row, and the LIMIT counts only rows that pass it.
PRE_FIX_CLAIM_LOCKED_BATCH = """
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
LIMIT %(batch)s
"""


def lease_all(conn: psycopg.Connection) -> dict[int, int]:
    conn.execute(Q.register_worker, {"worker_id": WORKER, "hostname": "t", "pid": 1, "slot": 0, "ttl": 60})
    return {s: e for s, e in conn.execute(Q.acquire_leases, {"worker_id": WORKER, "n": 256, "ttl": 60}).fetchall()}


def claim_params(leases: dict[int, int], shards: list[int], *, batch: int = BATCH) -> dict[str, object]:
    return {
        "shards": shards, "epochs": [leases[s] for s in shards],
        "cursor_xids": ["0"] * len(shards), "cursor_ids": [0] * len(shards),
        "worker_id": WORKER, "relaxed": False, "batch": batch, "token": uuid.uuid4(), "staleness": 300,
        "horizon": HORIZON,
    }


def shard_of(conn: psycopg.Connection, key: str) -> int:
    return conn.execute("SELECT (hashtextextended(%s, 0) & 255)::smallint", (key,)).fetchone()[0]


def insert(conn: psycopg.Connection, key: str, **cols: object) -> int:
    names = ", ".join(["topic", "partition_key", "payload", *cols])
    values = ", ".join(["%s"] * (3 + len(cols)))
    return conn.execute(f"INSERT INTO outbox_events ({names}) VALUES ({values}) RETURNING id",
                        ["t", key, "{}", *cols.values()]).fetchone()[0]


def explain(conn: psycopg.Connection, sql: str, params: dict[str, object]) -> dict:
    (doc,) = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", params).fetchone()
    return (json.loads(doc) if isinstance(doc, str) else doc)[0]


def scan_work(plan: dict, relation_indexes: set[str]) -> dict[str, float]:
    """What the scans of outbox_events did: their loops, the rows they looked at (returned or
    removed by a filter, over every loop), and the statement's shared buffers."""
    loops = rows = 0.0
    nodes: list[str] = []

    def walk(node: dict) -> None:
        nonlocal loops, rows
        reads_outbox = (node.get("Relation Name") == "outbox_events" and node["Node Type"] != "ModifyTable") \
            or node.get("Index Name") in relation_indexes and "Relation Name" not in node
        if reads_outbox:
            n = node.get("Actual Loops", 0)
            looked_at = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                         + node.get("Rows Removed by Index Recheck", 0))
            loops += n
            rows += n * looked_at
            nodes.append(f"{node['Node Type']} {node.get('Index Name', '')} loops={n} rows/loop={looked_at}")
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    top = plan["Plan"]
    return {"loops": loops, "rows": rows, "nodes": nodes,
            "buffers": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)}


def outbox_indexes(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'outbox_events'")}


def test_a_held_key_with_100000_later_events_leaves_the_claim_o_batch(db):
    leases = lease_all(db)
    # One retrying event of key `hot` (due in an hour), then 100,000 later `hot` events.
    retrying = db.execute(
        "INSERT INTO outbox_events (topic, partition_key, payload, attempts, next_attempt_at) "
        "VALUES ('t', 'hot', '{}', 1, clock_timestamp() + interval '1 hour') RETURNING id").fetchone()[0]
    db.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
               "SELECT 't', 'hot', '{}' FROM generate_series(1, %s)", (BACKLOG,))
    db.execute("VACUUM ANALYZE outbox_events")
    hot = shard_of(db, "hot")
    indexes = outbox_indexes(db)

    plan = explain(db, Q.claim_batch, claim_params(leases, [hot]))
    work = scan_work(plan, indexes)
    detail = f"scans of outbox_events: {work['nodes']}; buffers {work['buffers']}"
    assert work["loops"] <= 4 * BATCH, f"{work['loops']} loops for a batch of {BATCH}; {detail}"
    assert work["rows"] <= 4 * BATCH, f"{work['rows']} rows looked at for a batch of {BATCH}; {detail}"
    assert work["buffers"] <= 10 * BATCH, f"{work['buffers']} shared buffers for a batch of {BATCH}; {detail}"
    # Nothing of the held key was claimed: the retrying event still comes first.
    assert db.execute("SELECT count(*) FROM outbox_events WHERE status = 'processing'").fetchone()[0] == 0
    assert db.execute("SELECT status, attempts FROM outbox_events WHERE id = %s",
                      (retrying,)).fetchone() == ("pending", 1)

    # The claim returns the rows it held back (NULL topic), so the worker's cursor moves past them.
    rows = db.execute(Q.claim_batch, claim_params(leases, [hot])).fetchall()
    assert rows and all(r[1] is None for r in rows), rows[:3]
    assert len(rows) <= BATCH

    # The control: the claim's pre-fix shape looks at the whole backlog for the same batch.
    control = scan_work(explain(db, PRE_FIX_CLAIM_LOCKED_BATCH, claim_params(leases, [hot])), indexes)
    assert control["rows"] >= BACKLOG, control
    assert control["loops"] >= BACKLOG, control
    assert control["buffers"] >= BACKLOG // 2, control


def test_a_held_key_costs_no_more_when_the_claim_walks_every_shard(db):
    # The worker passes every owned shard; a held key in one of them must not cost the whole claim.
    leases = lease_all(db)
    db.execute("INSERT INTO outbox_events (topic, partition_key, payload, attempts, next_attempt_at) "
               "VALUES ('t', 'hot', '{}', 1, clock_timestamp() + interval '1 hour')")
    db.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
               "SELECT 't', 'hot', '{}' FROM generate_series(1, %s)", (BACKLOG,))
    db.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
               "SELECT 't', 'cold-' || g, '{}' FROM generate_series(1, 50) AS g")
    db.execute("VACUUM ANALYZE outbox_events")
    shards = sorted(leases)
    work = scan_work(explain(db, Q.claim_batch, claim_params(leases, shards)), outbox_indexes(db))
    # 256 shards, each an index probe, plus at most a batch per shard that has rows.
    bound = len(shards) + 4 * BATCH
    assert work["rows"] <= bound, f"{work['rows']} rows looked at (bound {bound}): {work['nodes']}"
    assert db.execute("SELECT count(*) FROM outbox_events WHERE status = 'processing'").fetchone()[0] > 0


def test_a_row_in_processing_holds_the_later_rows_of_its_key(db):
    # A claim whose outcome is unknown (its reply was lost) leaves a row in processing: in strict
    # order it is earlier than the key's later rows, which must wait for it.
    leases = lease_all(db)
    first = insert(db, "k")
    second = insert(db, "k")
    other = insert(db, "other")
    db.execute("UPDATE outbox_events SET status = 'processing', claim_token = %s, claimed_by = %s, "
               "claimed_until = clock_timestamp() + interval '5 minutes' WHERE id = %s",
               (uuid.uuid4(), uuid.uuid4(), first))
    rows = db.execute(Q.claim_batch, claim_params(leases, sorted(leases))).fetchall()
    claimed = sorted(r[0] for r in rows if r[1] is not None)
    held = sorted(r[0] for r in rows if r[1] is None)
    assert claimed == [other], f"claimed {claimed}: {second} overtook {first}, which is in processing"
    assert held == [second]
    assert db.execute("SELECT status FROM outbox_events WHERE id = %s", (second,)).fetchone() == ("pending",)


def processing_probe_buffers(plan: dict) -> tuple[float, list[str]]:
    """The shared buffers of the plan's scans of an index of processing rows (the hold's probe)."""
    total, seen = 0.0, []

    def walk(node: dict) -> None:
        nonlocal total
        if "processing" in node.get("Index Name", ""):
            buffers = node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)
            total += buffers
            seen.append(f"{node['Node Type']} {node['Index Name']} loops={node.get('Actual Loops')} buffers={buffers}")
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return total, seen


# The claim as it was before the look per shard: a probe by key for every row it scans.
PER_ROW_PROBE_CLAIM = Q.claim_batch.replace("OR (processing.any AND EXISTS (", "OR (EXISTS (")


def test_the_hold_probe_does_not_walk_the_rows_claimed_before(db):
    # Every claimed row leaves an entry in the indexes of processing rows, dead once it is marked,
    # until a vacuum. The hold looks for processing rows once per shard, and by key only in a shard
    # that has one. The claim's earlier shape probed by key for every row it scanned, planned on
    # 0001's updated_at index (dropped by 0005), which walked every dead entry per probe: the
    # drain's database CPU doubled. Autovacuum is off for the table: the dead entries stay, as
    # during a drain.
    assert PER_ROW_PROBE_CLAIM != Q.claim_batch
    leases = lease_all(db)
    db.execute("ALTER TABLE outbox_events SET (autovacuum_enabled = false)")
    db.execute("CREATE INDEX outbox_events_processing_idx ON outbox_events (updated_at) "
               "WHERE status = 'processing'")
    db.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
               "SELECT 't', 'k-' || (g %% 100), '{}' FROM generate_series(1, %s) AS g", (2 * PAST,))
    # The first half was claimed and published, as by a drain, ten batches at a time.
    for low in range(0, PAST, BATCH * 10):
        ids = (low, low + BATCH * 10)
        db.execute("UPDATE outbox_events SET status = 'processing', claim_token = gen_random_uuid() "
                   "WHERE id > %s AND id <= %s", ids)
        db.execute("UPDATE outbox_events SET status = 'published', claim_token = NULL "
                   "WHERE id > %s AND id <= %s", ids)
    db.execute("ANALYZE outbox_events")
    (xid,) = db.execute("SELECT xid::text FROM outbox_events WHERE id = %s", (PAST,)).fetchone()
    shards = sorted(leases)
    params = {**claim_params(leases, shards), "cursor_xids": [xid] * len(shards),
              "cursor_ids": [PAST] * len(shards)}

    def probe_buffers(sql: str) -> tuple[float, list[str]]:
        db.execute("BEGIN")
        try:
            return processing_probe_buffers(explain(db, sql, params))
        finally:
            db.execute("ROLLBACK")

    # The control first: the schema before 0005, both indexes of processing rows there while the
    # rows were claimed, and the claim's per-row probe: it walks the dead entries of every row
    # claimed before, for every row it scans.
    control, control_nodes = probe_buffers(PER_ROW_PROBE_CLAIM)
    db.execute("DROP INDEX outbox_events_processing_idx")
    buffers, nodes = probe_buffers(Q.claim_batch)
    assert nodes, "the claim did not probe processing rows"
    assert buffers <= 10 * BATCH, f"{buffers} shared buffers in the probe for a batch of {BATCH}: {nodes}"
    assert control >= 4 * buffers, f"control {control} against {buffers}: {control_nodes}"


# The mark as it was until the drain regression of issue 13 was found: it named the status as
# well as the token, which let the planner answer from the partial index of processing rows.
STATUS_NAMING_MARK = Q.mark_published.replace(
    "AND claim_token = %(token)s", "AND claim_token = %(token)s AND status = 'processing'")


def test_the_mark_does_not_walk_the_rows_published_before(db):
    # A drain leaves a dead entry in the index of processing rows for every row it marked, until
    # a vacuum. The mark must find its batch by primary key, whatever it published before: named
    # in the statement, the status let the planner walk that whole index instead (skip scan on
    # PostgreSQL 18, a full index scan before), and the mark's cost grew with the drain.
    assert STATUS_NAMING_MARK != Q.mark_published
    leases = lease_all(db)
    db.execute("ALTER TABLE outbox_events SET (autovacuum_enabled = false)")
    db.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
               "SELECT 't', 'k-' || (g %% 100), '{}' FROM generate_series(1, %s) AS g", (2 * PAST,))
    for low in range(0, PAST, BATCH * 10):
        ids = (low, low + BATCH * 10)
        db.execute("UPDATE outbox_events SET status = 'processing', claim_token = gen_random_uuid() "
                   "WHERE id > %s AND id <= %s", ids)
        db.execute("UPDATE outbox_events SET status = 'published', claim_token = NULL "
                   "WHERE id > %s AND id <= %s", ids)
    db.execute("ANALYZE outbox_events")
    (xid,) = db.execute("SELECT xid::text FROM outbox_events WHERE id = %s", (PAST,)).fetchone()
    shards = sorted(leases)
    params = {**claim_params(leases, shards), "cursor_xids": [xid] * len(shards),
              "cursor_ids": [PAST] * len(shards)}
    claimed = [r[0] for r in db.execute(Q.claim_batch, params).fetchall() if r[1] is not None]
    assert len(claimed) == BATCH
    mark = {"ids": sorted(claimed), "partitions": [0] * BATCH, "offsets": list(range(BATCH)), "token": params["token"]}
    indexes = outbox_indexes(db)

    def mark_work(sql: str) -> dict:
        db.execute("BEGIN")
        try:
            plan = explain(db, sql, mark)
        finally:
            db.execute("ROLLBACK")
        assert plan["Plan"]["Actual Rows"] == 0 and plan["Plan"]["Node Type"] == "ModifyTable"
        return scan_work(plan, indexes)

    control = mark_work(STATUS_NAMING_MARK)
    work = mark_work(Q.mark_published)
    assert not any("processing" in node for node in work["nodes"]), work["nodes"]
    assert work["buffers"] <= 30 * BATCH, f"{work['buffers']} shared buffers to mark {BATCH} rows: {work['nodes']}"
    assert any("processing" in node for node in control["nodes"]), \
        f"the control did not walk the index of processing rows: {control['nodes']}"
    assert db.execute(Q.mark_published, mark).rowcount == BATCH
