"""The claim's semantics, statement by statement, against a real PostgreSQL."""

import uuid

import psycopg

from kaireon_pub.db.queries import Q

WORKER = uuid.uuid4()


def lease_all(conn) -> dict[int, int]:
    conn.execute(Q.register_worker, {"worker_id": WORKER, "hostname": "t", "pid": 1, "slot": 0, "ttl": 60})
    return {s: e for s, e in conn.execute(Q.acquire_leases, {"worker_id": WORKER, "n": 256, "ttl": 60}).fetchall()}


def claim(conn, leases, *, relaxed=False, cursors=None, batch=100, worker=WORKER):
    shards = sorted(leases)
    cursors = cursors or {}
    rows = conn.execute(Q.claim_batch, {
        "shards": shards, "epochs": [leases[s] for s in shards],
        "cursor_xids": [str(cursors.get(s, (0, 0))[0]) for s in shards],
        "cursor_ids": [cursors.get(s, (0, 0))[1] for s in shards],
        "worker_id": worker, "relaxed": relaxed, "batch": batch, "token": uuid.uuid4(), "staleness": 300,
    }).fetchall()
    return sorted(r[0] for r in rows)


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
        "token": token, "staleness": 300})
    assert db.execute(Q.mark_published, {"ids": [event], "token": uuid.uuid4()}).rowcount == 0
    assert db.execute(Q.mark_published, {"ids": [event], "token": token}).rowcount == 1
