"""The claim's semantics, statement by statement, against a real PostgreSQL."""

import uuid

import psycopg

from kaireon_pub.db.queries import Q, int_array
from kaireon_pub.worker.rows import Row

WORKER = uuid.uuid4()


def lease_all(conn) -> dict[int, int]:
    conn.execute(Q.register_worker, {"worker_id": WORKER, "hostname": "t", "pid": 1, "slot": 0, "ttl": 60})
    return {s: e for s, e in conn.execute(Q.acquire_leases, {"worker_id": WORKER, "n": 256, "ttl": 60}).fetchall()}


def horizon(conn, max_wait_ms=60_000) -> str:
    params = {"max_wait_ms": max_wait_ms, "remembered": [], "pass_over": []}
    return str(conn.execute(Q.claim_horizon, params).fetchone()[0])


def claim_params(leases, *, horizon_xid, relaxed=False, cursors=None, batch=100, worker=WORKER) -> dict:
    shards = sorted(leases)
    cursors = cursors or {}
    return {
        "shards": shards, "epochs": [leases[s] for s in shards],
        "cursor_xids": [str(cursors.get(s, (0, 0))[0]) for s in shards],
        "cursor_ids": [cursors.get(s, (0, 0))[1] for s in shards],
        "worker_id": worker, "relaxed": relaxed, "batch": batch, "token": uuid.uuid4(), "staleness": 300,
        "horizon": horizon_xid,
    }


def claim(conn, leases, *, relaxed=False, cursors=None, batch=100, worker=WORKER, held=False):
    """The ids claimed (or, held=True, the ids the claim held back for strict order)."""
    rows = conn.execute(Q.claim_batch, claim_params(leases, horizon_xid=horizon(conn), relaxed=relaxed,
                                                    cursors=cursors, batch=batch, worker=worker)).fetchall()
    return sorted(r[0] for r in rows if (r[1] is None) == held)


def insert(conn, key, **cols) -> int:
    names = ", ".join(["topic", "partition_key", "payload", *cols])
    values = ", ".join(["%s"] * (3 + len(cols)))
    return conn.execute(f"INSERT INTO outbox_events ({names}) VALUES ({values}) RETURNING id",
                        ["t", key, "{}", *cols.values()]).fetchone()[0]


def test_a_row_committing_late_with_a_lower_id_holds_back_later_transactions(db_url, db):
    leases = lease_all(db)
    slow = psycopg.connect(db_url)
    low = insert(slow, "k")  # holds an older xid, not committed
    high = insert(db, "k")   # a newer transaction, committed
    # Nothing newer than the oldest running transaction is claimable: the horizon holds `high`.
    assert claim(db, leases) == []
    slow.commit()
    slow.close()
    assert claim(db, leases) == sorted([low, high])


def test_strict_order_holds_a_key_behind_its_retrying_event(db):
    leases = lease_all(db)
    retrying = insert(db, "poison", attempts=1, next_attempt_at="infinity")
    later_same_key = insert(db, "poison")
    other_key = insert(db, "healthy")
    assert claim(db, leases) == [other_key]
    assert claim(db, leases, held=True) == [later_same_key]  # returned to move the cursor past it
    assert retrying and later_same_key
    # Relaxed ordering lets the later event of the key through.
    assert claim(db, leases, relaxed=True) == [later_same_key]


def test_the_cursor_makes_the_claim_skip_what_it_already_passed(db):
    leases = lease_all(db)
    first = insert(db, "a")
    second = insert(db, "a")
    shard, xid = db.execute("SELECT shard, xid::text::bigint FROM outbox_events WHERE id = %s", (first,)).fetchone()
    assert claim(db, leases, cursors={shard: (xid, first)}) == [second]


def test_an_expired_or_foreign_lease_claims_nothing(db):
    leases = lease_all(db)
    insert(db, "a")
    assert claim(db, leases, worker=uuid.uuid4()) == []
    db.execute("UPDATE outbox_shard_leases SET expires_at = clock_timestamp() - interval '1 second'")
    assert claim(db, leases) == []
    stale_epochs = {s: e - 1 for s, e in leases.items()}
    db.execute("UPDATE outbox_shard_leases SET expires_at = 'infinity'")
    assert claim(db, stale_epochs) == []
    assert len(claim(db, leases)) == 1


def test_mark_lands_only_with_the_claim_token(db):
    leases = lease_all(db)
    event = insert(db, "a")
    token = uuid.uuid4()
    shards = sorted(leases)
    db.execute(Q.claim_batch, {
        "shards": shards, "epochs": [leases[s] for s in shards], "cursor_xids": ["0"] * len(shards),
        "cursor_ids": [0] * len(shards), "worker_id": WORKER, "relaxed": False, "batch": 10,
        "token": token, "staleness": 300, "horizon": horizon(db)})
    landed = {"partitions": [0], "offsets": [0]}
    assert db.execute(Q.mark_published, {"ids": [event], **landed, "token": uuid.uuid4()}).rowcount == 0
    assert db.execute(Q.mark_published, {"ids": [event], **landed, "token": token}).rowcount == 1


def test_the_workers_array_literals_and_binary_rows_claim_and_mark_as_lists_do(db):
    # The worker passes its big lists as int_array() literals and reads the claim in binary.
    leases = lease_all(db)
    first, second = insert(db, "a"), insert(db, "a")
    shard, xid = db.execute("SELECT shard, xid::text::bigint FROM outbox_events WHERE id = %s", (first,)).fetchone()
    cursors = {shard: (xid, first)}
    shards = sorted(leases)
    token = uuid.uuid4()
    rows = db.execute(Q.claim_batch, {
        "shards": int_array(shards), "epochs": int_array(leases[s] for s in shards),
        "cursor_xids": int_array(cursors.get(s, (0, 0))[0] for s in shards),
        "cursor_ids": int_array(cursors.get(s, (0, 0))[1] for s in shards),
        "worker_id": WORKER, "relaxed": False, "batch": 10, "token": token, "staleness": 300,
        "horizon": horizon(db)}, binary=True).fetchall()
    assert [r[0] for r in rows] == [second]  # the cursor passed `first`
    row = Row(*rows[0])
    assert (row.topic, row.key, row.payload, row.headers, row.shard) == ("t", "a", b"{}", "{}", shard)
    assert row.position > (xid, first)
    assert db.execute(Q.mark_published, {"ids": int_array([first, second]), "partitions": "{0,0}",
                                         "offsets": "{0,1}", "token": token}).rowcount == 1
    assert int_array([]) == "{}" and int_array([2**62, -1]) == "{4611686018427387904,-1}"


def test_strict_order_holds_a_key_behind_its_row_in_processing(db):
    # A claim whose reply was lost, or a previous owner's batch: the row is in processing and its
    # outcome unknown, so the later rows of its key wait.
    leases = lease_all(db)
    insert(db, "k", status="processing", claimed_by=uuid.uuid4())
    later = insert(db, "k")
    other = insert(db, "other")
    assert claim(db, leases) == [other]
    assert claim(db, leases, held=True) == [later]


def test_a_transaction_of_another_database_does_not_hold_the_horizon(pg, db_url, db):
    leases = lease_all(db)
    name = f"kaireon_other_{uuid.uuid4().hex[:8]}"
    other_url = pg.create_database(name)
    try:
        with psycopg.connect(other_url) as other:
            other.execute("SELECT pg_current_xact_id()")  # a writing transaction, left open
            event = insert(db, "k")
            assert claim(db, leases) == [event]
            other.rollback()
    finally:
        pg.drop_database(name)


def test_a_same_database_transaction_holds_the_horizon_only_up_to_the_bound(db_url, db):
    leases = lease_all(db)
    with psycopg.connect(db_url) as idle:
        idle.execute("SELECT pg_current_xact_id()")  # has an xid, never writes the outbox
        event = insert(db, "k")
        assert claim(db, leases) == []  # waited for: it might still insert an outbox row
        held_for, bypassed = db.execute(Q.claim_horizon,
                                        {"max_wait_ms": 100_000, "remembered": [], "pass_over": []}).fetchone()[1:3]
        assert held_for >= 0 and bypassed == []
        db.execute("SELECT pg_sleep(0.3)")
        row = db.execute(Q.claim_horizon, {"max_wait_ms": 200, "remembered": [], "pass_over": []}).fetchone()
        assert len(row[2]) == 1  # passed over, to be remembered
        xid = row[2][0]
        shards = sorted(leases)
        claimed = db.execute(Q.claim_batch, {
            "shards": shards, "epochs": [leases[s] for s in shards], "cursor_xids": ["0"] * len(shards),
            "cursor_ids": [0] * len(shards), "worker_id": WORKER, "relaxed": False, "batch": 10,
            "token": uuid.uuid4(), "staleness": 300, "horizon": str(row[0])}).fetchall()
        assert [r[0] for r in claimed] == [event]
        remembering = {"max_wait_ms": 200, "remembered": [xid], "pass_over": []}
        assert db.execute(Q.claim_horizon, remembering).fetchone()[4] == []
        idle.rollback()
    assert db.execute(Q.claim_horizon, remembering).fetchone()[4] == [xid]


def test_rows_from_another_cluster_are_restamped_before_the_newer_events(db):
    high = [insert(db, f"k{i % 3}", xid="9000000000") for i in range(3)]
    higher = insert(db, "k0", xid="9000000005")
    newer = insert(db, "k0")
    assert db.execute(Q.foreign_rows_count).fetchone()[0] == 4
    assert db.execute(Q.restamp_foreign_rows).fetchone()[0] == 4
    order = [r[0] for r in db.execute("SELECT id FROM outbox_events WHERE partition_key = 'k0' ORDER BY xid, id")]
    assert order == [high[0], higher, newer]
    assert db.execute(Q.foreign_rows_count).fetchone()[0] == 0


def careful_claim(conn, leases, busy=(), cursors=None) -> list[tuple]:
    """claim_careful_batch's rows: (id, topic, key, attempts) each; `busy`: (shard, key, xid, id)
    of the busy rows the worker remembers."""
    # Everything committed: the locker's own xid is not waited for here (the tier passes it over).
    committed = str(conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())").fetchone()[0])
    rows = conn.execute(Q.claim_careful_batch, {
        **claim_params(leases, horizon_xid=committed, cursors=cursors),
        "busy_shards": int_array(b[0] for b in busy), "busy_keys": [b[1] for b in busy],
        "busy_xids": int_array(b[2] for b in busy), "busy_ids": int_array(b[3] for b in busy),
    }).fetchall()
    return sorted((r[0], r[1], r[2], r[6]) for r in rows)


def test_a_row_another_session_locks_fails_the_fast_claim_and_holds_only_its_key_in_the_careful_one(db_url, db):
    leases = lease_all(db)
    locked = insert(db, "acct")
    behind = insert(db, "acct")
    locked_unkeyed = insert(db, None)
    other = insert(db, "other")
    with psycopg.connect(db_url) as locker:
        locker.execute("SELECT 1 FROM outbox_events WHERE id = ANY(%s) FOR UPDATE", ([locked, locked_unkeyed],))
        try:
            claim(db, leases)
        except psycopg.errors.LockNotAvailable:
            pass
        else:
            raise AssertionError("the fast claim stepped over a row another session locks")
        # The busy rows come back with their attempts (never NULL) and key; the later row of the
        # locked key is held (NULL topic, NULL attempts); the other key is claimed.
        assert careful_claim(db, leases) == [(locked, None, "acct", 0), (behind, None, None, None),
                                             (locked_unkeyed, None, None, 0), (other, "t", "other", 0)]
        # Across claims (the cursor past the busy row), the remembered busy row holds its key.
        later = insert(db, "acct")
        position = "SELECT shard, xid::text::bigint, id FROM outbox_events WHERE id = %s"
        shard, xid, _ = db.execute(position, (locked,)).fetchone()
        past = {shard: db.execute(position, (behind,)).fetchone()[1:]}
        assert careful_claim(db, leases, cursors=past)[-1] == (later, "t", "acct", 0), "control: no memory"
        db.execute("UPDATE outbox_events SET status = 'pending' WHERE id = %s", (later,))
        assert careful_claim(db, leases, busy=[(shard, "acct", xid, locked)], cursors=past) == [
            (locked_unkeyed, None, None, 0), (later, None, None, None)]
    # The lock gone, everything is claimed in one careful claim, the key's rows in order.
    assert careful_claim(db, leases) == [(locked, "t", "acct", 0), (behind, "t", "acct", 0),
                                         (locked_unkeyed, "t", None, 0), (later, "t", "acct", 0)]


def _careful_claim_with_a_change_between_its_scan_and_its_lock(db_url, db, change: str, *, locked_form: bool):
    """The careful claim's snapshot taken and its lease row lock waited for (another session holds
    the shard's lease row FOR UPDATE) while a third session commits `change` to the scanned row:
    the claim's scan reads the row as it was, its lock step meets the row as it is now. Returns the
    event's id and the claim's rows (id, topic, key, attempts)."""
    import threading
    import time

    leases = lease_all(db)
    event = insert(db, "acct")
    shard = db.execute("SELECT shard FROM outbox_events WHERE id = %s", (event,)).fetchone()[0]
    committed = str(db.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())").fetchone()[0])
    params = {**claim_params(leases, horizon_xid=committed), "busy_shards": "{}", "busy_keys": [],
              "busy_xids": "{}", "busy_ids": "{}"}
    statement = Q.claim_careful_locked_batch if locked_form else Q.claim_careful_batch
    result: dict = {}
    with psycopg.connect(db_url) as blocker, psycopg.connect(db_url, autocommit=True) as claimer:
        blocker.execute("SELECT 1 FROM outbox_shard_leases WHERE shard = %s FOR UPDATE", (shard,))
        claimer_pid = claimer.info.backend_pid

        def run() -> None:
            try:
                with claimer.transaction():
                    rows = claimer.execute(statement, params).fetchall()
                    result["rows"] = sorted((r[0], r[1], r[2], r[6]) for r in rows)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 10
        waiting = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s"
        while not db.execute(waiting, (claimer_pid,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the careful claim never waited for the lease row"
            time.sleep(0.01)
        db.execute(change, (event,))  # committed after the claim's snapshot, before its lock step
        blocker.rollback()
        thread.join(10)
        assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    return event, result["rows"]


def test_a_row_marked_failed_between_the_careful_scan_and_its_lock_is_not_claimed(db_url, db):
    event, rows = _careful_claim_with_a_change_between_its_scan_and_its_lock(
        db_url, db, "UPDATE outbox_events SET status = 'failed' WHERE id = %s", locked_form=False)
    assert [r for r in rows if r[1] is not None] == [], "claimed as the scan read it"
    assert db.execute("SELECT status, claim_token FROM outbox_events WHERE id = %s", (event,)).fetchone() == (
        "failed", None), "brought back from failed"


def test_a_row_retried_between_the_careful_scan_and_its_lock_is_not_locked_as_scanned(db_url, db):
    # Lock mode: the careful form's rows are the claim; a row whose attempts moved on is not one of them.
    event, rows = _careful_claim_with_a_change_between_its_scan_and_its_lock(
        db_url, db, "UPDATE outbox_events SET attempts = attempts + 1 WHERE id = %s", locked_form=True)
    assert [r for r in rows if r[1] is not None] == [], "locked and published as the scan read it"
    # It comes back like a row another session locks: its key held, its shard scanned again soon.
    assert rows == [(event, None, "acct", 0)]


def test_a_row_deleted_between_the_careful_scan_and_its_lock_is_not_claimed(db_url, db):
    event, rows = _careful_claim_with_a_change_between_its_scan_and_its_lock(
        db_url, db, "DELETE FROM outbox_events WHERE id = %s", locked_form=False)
    assert [r for r in rows if r[1] is not None] == []
    assert db.execute("SELECT count(*) FROM outbox_events WHERE id = %s", (event,)).fetchone()[0] == 0
