"""The conversion of a plain outbox into the partitioned one, as docs/operations.md ("Converting a
plain outbox") writes it: its three blocks (marked `<!-- convert:before|cutover|after -->`) are
read from the doc and run as they are, so the doc cannot drift from what is tested.

The database is a plain one at the current schema version holding rows of every status; an
application's insert arrives while the cutover holds its lock. Afterwards: the table is
partitioned, `migrate` sees that flavour and has nothing to apply, the parent is what a database
made partitioned has, no row changed, and the claim takes the pending rows in (xid, id) order per
key, across the old table and a new partition.
"""

from __future__ import annotations

import re
import shlex
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from kaireon_pub import enqueue
from kaireon_pub.db import migrate as migrations
from kaireon_pub.db import partitions
from kaireon_pub.db.queries import Q
from kaireon_pub.ops import check
from tests.helpers import run_cli, tier_env, wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
WORKER = uuid.uuid4()


def doc_block(marker: str) -> tuple[str, str]:
    """The language and text of the fenced block right after `<!-- convert:{marker} -->`."""
    found = re.search(rf"^<!-- convert:{marker} -->\n```(\w+)\n(.*?)^```$", DOC.read_text(), re.M | re.S)
    assert found, f"docs/operations.md has no block marked <!-- convert:{marker} -->"
    return found[1], found[2]


def with_t(sql: str, t) -> str:
    assert "'T'" in sql, "the doc's blocks write the boundary as 'T'"
    return sql.replace("'T'", f"'{t.isoformat()}'")


def run_sql(conn: psycopg.Connection, sql: str, after=None) -> None:
    """The block statement by statement on an autocommit connection, as psql would run it."""
    for statement in migrations.split_statements(sql):
        conn.execute(statement)
        if after is not None:
            after(statement)


def rows(conn: psycopg.Connection) -> dict[int, dict]:
    """Every row, every column as PostgreSQL writes it (bytes as hex, times to the microsecond)."""
    return dict(conn.execute("SELECT e.id, to_jsonb(e) FROM outbox_events e ORDER BY id").fetchall())


def fill(db_url: str, db: psycopg.Connection) -> dict[str, int]:
    """Rows of every status, keyed and not, bytes and old jsonb payloads, retried and in flight."""
    ids = {}

    def put(name: str, key, payload, **kw) -> int:
        ids[name] = enqueue(db, topic="orders", key=key, payload=payload, **kw)
        return ids[name]

    # Published and failed first: the older rows of their keys, as in a real outbox.
    for i in range(4):
        put(f"published{i}", f"k{i % 2}", {"n": i})
    put("failed0", "k0", b"\x00broken")
    put("failed1", None, {"n": "keyless"})
    db.execute("""UPDATE outbox_events SET status = 'published', attempts = 1, published_at = now() - interval '1 day',
                      created_at = now() - interval '2 days' WHERE id = ANY(%s)""",
               ([ids[f"published{i}"] for i in range(4)],))
    db.execute("""UPDATE outbox_events SET status = 'failed', attempts = 5, last_error = 'message too large'
                  WHERE id = ANY(%s)""", ([ids["failed0"], ids["failed1"]],))
    # k0: a row whose transaction is older than the one before it by id ((xid, id) order is not id order).
    with psycopg.connect(db_url) as early:
        early.execute("SELECT pg_current_xact_id()")
        put("k0 by id", "k0", b"\xff\xfe not utf-8", headers={"trace": "a", "raw": b"\x00\x01"})
        ids["k0 by xid"] = enqueue(early, topic="orders", key="k0", payload={"late": True})
        early.commit()
    put("k1 a", "k1", "text payload", event_type="order.created")
    put("k1 b", "k1", None)  # a tombstone
    put("binary key a", b"\xffkey\x00", b"v1")
    put("binary key b", b"\xffkey\x00", b"v2")
    put("keyless", None, {"n": 0})
    # The old jsonb payload column, as a writer of before 0003 (or plain SQL) fills it.
    ids["k2 jsonb"] = db.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
                                 "VALUES ('orders', 'k2', '{\"old\": 1}') RETURNING id").fetchone()[0]
    # k3: retried once, due again; then a later row of the key.
    put("k3 retried", "k3", b"r")
    db.execute("""UPDATE outbox_events SET attempts = 2, next_attempt_at = now() - interval '1 minute',
                      last_error = 'broker down' WHERE id = %s""", (ids["k3 retried"],))
    put("k3 after", "k3", b"s")
    # In flight: claimed by a worker, its outcome unknown; a later row of its key is held behind it.
    put("inflight", "inflight", b"p")
    db.execute("""UPDATE outbox_events SET status = 'processing', attempts = 1, claim_token = gen_random_uuid(),
                      claimed_by = gen_random_uuid(), claimed_until = now() + interval '5 minutes'
                  WHERE id = %s""", (ids["inflight"],))
    put("inflight after", "inflight", b"q")
    return ids


def parent_schema(conn: psycopg.Connection) -> dict[str, object]:
    """outbox_events as a schema, without its partitions; and what `kaireon-pub check` says of it."""
    def q(sql: str) -> list[tuple]:
        return conn.execute(sql).fetchall()

    report = check.Report()
    check._check_schema(report, conn)
    return {
        "kind": q("SELECT relkind, pg_get_partkeydef(oid) FROM pg_class WHERE oid = 'outbox_events'::regclass"),
        "columns": q("""SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
                               a.attgenerated, pg_get_expr(d.adbin, d.adrelid)
                        FROM pg_attribute a LEFT JOIN pg_attrdef d ON (d.adrelid, d.adnum) = (a.attrelid, a.attnum)
                        WHERE a.attrelid = 'outbox_events'::regclass AND a.attnum > 0 AND NOT a.attisdropped
                        ORDER BY a.attnum"""),
        "constraints": q("""SELECT conname, contype, convalidated, pg_get_constraintdef(oid) FROM pg_constraint
                            WHERE conrelid = 'outbox_events'::regclass ORDER BY conname"""),
        "indexes": q("""SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
                        WHERE indrelid = 'outbox_events'::regclass ORDER BY 1"""),
        "sequence": q("SELECT pg_get_serial_sequence('outbox_events', 'id')"),
        "view": q("SELECT pg_get_viewdef('outbox_events_json'::regclass)"),
        "versions": q("SELECT version, name FROM kaireon_schema_migrations ORDER BY version"),
        "check": [(r.name, r.status, r.detail) for r in report.results],
    }


def index_files(conn: psycopg.Connection, table: str) -> dict[str, int]:
    return dict(conn.execute("""SELECT c.relname, c.relfilenode FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                                WHERE i.indrelid = %s::regclass""", (table,)).fetchall())


def drain(conn: psycopg.Connection) -> tuple[list[int], list[int]]:
    """Claims one row at a time (Q.claim_horizon, Q.claim_batch) and publishes it, until the claim
    comes back empty; returns the ids claimed in claim order and the ids it held back."""
    conn.execute(Q.register_worker, {"worker_id": WORKER, "hostname": "t", "pid": 1, "slot": 0, "ttl": 60})
    leases = dict(conn.execute(Q.acquire_leases, {"worker_id": WORKER, "n": 256, "ttl": 60}).fetchall())
    shards = sorted(leases)
    cursors: dict[int, tuple[int, int]] = {}
    claimed, held = [], []
    for _ in range(100):
        horizon = conn.execute(Q.claim_horizon,
                               {"max_wait_ms": 60_000, "remembered": [], "pass_over": []}).fetchone()[0]
        token = uuid.uuid4()
        with conn.cursor(row_factory=dict_row) as cur:
            batch = cur.execute(Q.claim_batch, {
                "shards": shards, "epochs": [leases[s] for s in shards],
                "cursor_xids": [str(cursors.get(s, (0, 0))[0]) for s in shards],
                "cursor_ids": [cursors.get(s, (0, 0))[1] for s in shards],
                "worker_id": WORKER, "relaxed": False, "batch": 1, "token": token, "staleness": 300,
                "horizon": str(horizon)}).fetchall()
        if not batch:
            return claimed, held
        for row in batch:
            cursors[row["shard"]] = max(cursors.get(row["shard"], (0, 0)), (row["xid"], row["id"]))
            (held if row["topic"] is None else claimed).append(row["id"])
        ids = sorted(r["id"] for r in batch if r["topic"] is not None)
        conn.execute(Q.mark_published, {"ids": ids, "partitions": [0] * len(ids), "offsets": ids, "token": token})
    raise AssertionError("the claim did not run dry in 100 rounds")


@pytest.fixture
def partitioned_db(pdb_url):
    """A database made partitioned by `migrate` (OUTBOX_PARTITIONING=hourly), to compare with."""
    with psycopg.connect(pdb_url, autocommit=True) as conn:
        yield conn


def test_the_documented_conversion_keeps_every_row_and_the_claim_order(db_url, db, partitioned_db, tmp_path):
    if migrations.flavour(db) != "plain":
        pytest.skip("converts a plain table: this session's template is partitioned (-p tests.partitioned)")
    assert migrations.current_version(db) == migrations.expected_version()
    ids = fill(db_url, db)
    before = rows(db)
    assert {r["status"] for r in before.values()} == {"pending", "processing", "published", "failed"}
    k0_id, k0_xid = before[ids["k0 by id"]], before[ids["k0 by xid"]]
    assert k0_id["id"] < k0_xid["id"] and int(k0_xid["xid"]) < int(k0_id["xid"])  # the case is there
    now = db.execute("SELECT clock_timestamp()").fetchone()[0]
    t = partitions.floor(now, "hourly") + timedelta(hours=2)  # the hour after next

    # 1. Before, the tier and the applications running.
    language, sql = doc_block("before")
    assert language == "sql"
    run_sql(db, with_t(sql, t))
    table_file = db.execute("SELECT relfilenode FROM pg_class WHERE oid = 'outbox_events'::regclass").fetchone()[0]
    files = index_files(db, "outbox_events")
    old_pkey = files.pop("outbox_events_pkey")

    # 2. The cutover; an application's insert arrives while it holds the lock.
    blocked: dict[str, object] = {}

    def application() -> None:
        with psycopg.connect(db_url, options="-c statement_timeout=30000") as conn:
            blocked["pid"] = conn.info.backend_pid
            blocked["id"] = enqueue(conn, topic="orders", key="k1", payload=b"during the cutover")
            conn.commit()

    def after(statement: str) -> None:
        if statement.startswith("LOCK TABLE outbox_events"):
            blocked["thread"] = threading.Thread(target=application, daemon=True)
            blocked["thread"].start()
            wait_for(lambda: db.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                        (blocked.get("pid"),)).fetchone() == (True,),
                     10, "the application's insert to wait for the cutover's lock")

    notices: list[str] = []
    db.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    language, sql = doc_block("cutover")
    assert language == "sql"
    db.execute("SET client_min_messages = debug1")  # ATTACH says whether it had to read the rows
    run_sql(db, with_t(sql, t), after)
    db.execute("RESET client_min_messages")
    blocked["thread"].join(30)
    assert not blocked["thread"].is_alive() and "id" in blocked, "the application's insert did not finish"

    assert db.execute("SELECT relkind FROM pg_class WHERE oid = 'outbox_events'::regclass").fetchone()[0] == "p"
    assert migrations.flavour(db) == "partitioned"
    # Nothing was rebuilt or read: the old table's file and index files are the partition's.
    assert db.execute("SELECT relfilenode FROM pg_class WHERE oid = 'outbox_events_legacy'::regclass"
                      ).fetchone()[0] == table_file
    legacy_files = index_files(db, "outbox_events_legacy")
    assert sorted(legacy_files.values()) == sorted(files.values()) and old_pkey not in legacy_files.values()
    assert db.execute("""SELECT count(*) FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid
                         WHERE i.inhparent IN (SELECT indexrelid FROM pg_index
                                               WHERE indrelid = 'outbox_events'::regclass)
                           AND x.indrelid = 'outbox_events_legacy'::regclass""").fetchone()[0] == len(legacy_files)
    assert any("outbox_events_legacy" in n and "is implied by existing constraints" in n for n in notices), notices

    # No row lost or changed; the insert that waited for the lock went to the new table, id from its sequence.
    after_rows = rows(db)
    during = after_rows.pop(blocked["id"])
    assert after_rows == before
    assert during["id"] == max(before) + 1 and during["status"] == "pending"
    assert db.execute("SELECT tableoid::regclass::text FROM outbox_events WHERE id = %s",
                      (during["id"],)).fetchone()[0] == "outbox_events_legacy"

    # 3. After: the doc's commands, with the tier's settings.
    language, commands = doc_block("after")
    assert language == "sh"
    outputs = {}
    for line in commands.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assignments = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=.*", w))
        program, *args = words[len(assignments):]
        assert program == "kaireon-pub", line
        done = run_cli(*args, env=tier_env(db_url, "127.0.0.1:1", tmp_path, **assignments))
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        outputs[args[0]] = done.stdout
    first_new = partitions.partition_name(t, "hourly")
    assert f"created partitions {first_new}, " in outputs["migrate"]
    assert f"schema is up to date (version {migrations.expected_version()})" in outputs["migrate"]
    assert "outbox_events_legacy" in outputs["partitions"] and first_new in outputs["partitions"]
    listed = partitions.list_partitions(db)
    assert (listed[0].name, listed[0].lower, listed[0].upper) == ("outbox_events_legacy", None, t)
    assert listed[1].name == first_new and listed[1].lower == t

    # migrate sees the partitioned flavour at the current version; the parent is a partitioned database's.
    assert migrations.migrate(db) == []
    assert migrations.require_current(db) == migrations.expected_version()
    assert parent_schema(db) == parent_schema(partitioned_db)

    # The claim: new rows before T (the old table) and after it (a new partition) join their keys.
    late = db.execute("INSERT INTO outbox_events (topic, partition_key, payload_bytes, created_at) "
                      "VALUES ('orders', 'k0', 'after T', %s) RETURNING id", (t + timedelta(minutes=30),)).fetchone()[0]
    assert db.execute("SELECT tableoid::regclass::text FROM outbox_events WHERE id = %s",
                      (late,)).fetchone()[0] == first_new
    everything = rows(db)
    pending = {i: r for i, r in everything.items() if r["status"] == "pending"}
    claimed, held = drain(db)
    assert held == [ids["inflight after"]]  # behind its key's row in processing, as before
    assert sorted(claimed + held) == sorted(pending)
    by_key: dict[str, list[int]] = {}
    for i in claimed:
        if pending[i]["partition_key"] is not None:
            by_key.setdefault(pending[i]["partition_key"], []).append(i)
    for key, order in by_key.items():
        assert order == sorted(order, key=lambda i: (int(pending[i]["xid"]), i)), key
    assert by_key["k0"] == [ids["k0 by xid"], ids["k0 by id"], late]
    assert by_key["k1"] == [ids["k1 a"], ids["k1 b"], blocked["id"]]
    assert by_key["k3"] == [ids["k3 retried"], ids["k3 after"]]
