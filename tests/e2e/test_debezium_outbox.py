"""A Debezium outbox table attached to the tier (`kaireon-pub attach --debezium-table`), end to end on
a real PostgreSQL and a real Apache Kafka node (a module-scoped `KafkaCluster(1)` of
kaireon_pub.devkafka, whatever the session's broker; skipped with devkafka's reason without Java or
Maven): the table created as Debezium's documentation shows it, `kaireon-pub run` as a process.

The golden records are the documentation's (outbox-event-router.adoc, "Example outbox message" and
"Basic outbox table"): topic `outbox.event.<aggregatetype>`, key the aggregateid "1", one header
`id=4d47e190-0402-4048-bc2c-89dd54343cdc`, value the payload's JSON text as the example prints it
(jsonb's own rendering: keys by length, then by name; ", " and ": "). The example's raw change
event says aggregatetype "Order" but its topic "outbox.event.order"; the page's own rule (the column's
value replaces ${routedByValue} as it is: "customers" goes to outbox.event.customers) is followed
here, with the row's aggregatetype "order".
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from kaireon_pub import devkafka
from tests import helpers
from tests.integration.test_debezium_attach import cli_env, table_definition

# "Basic outbox table": the columns, types and modifiers the documentation lists, nothing more.
DOCUMENTED_TABLE = """
CREATE SCHEMA inventory;
CREATE TABLE inventory.outboxevent (
    id            uuid                   NOT NULL,
    aggregatetype character varying(255) NOT NULL,
    aggregateid   character varying(255) NOT NULL,
    type          character varying(255) NOT NULL,
    payload       jsonb
);
"""
TABLE = "inventory.outboxevent"
INSERT = "INSERT INTO inventory.outboxevent (id, aggregatetype, aggregateid, type, payload) VALUES (%s, %s, %s, %s, %s)"

EVENT_ID = "4d47e190-0402-4048-bc2c-89dd54343cdc"
# The example's value, as the documentation prints it (unescaped).
DOCUMENTED_VALUE = (
    '{"id": 1, "lineItems": [{"id": 1, "item": "Debezium in Action", "status": "ENTERED", "quantity": 2, '
    '"totalPrice": 39.98}, {"id": 2, "item": "Debezium for Dummies", "status": "ENTERED", "quantity": 1, '
    '"totalPrice": 29.99}], "orderDate": "2019-01-31T12:13:01", "customerId": 123}')
# The same document as an application would write it: another key order, no spaces.
WRITTEN_PAYLOAD = (
    '{"customerId":123,"orderDate":"2019-01-31T12:13:01","lineItems":[{"totalPrice":39.98,"quantity":2,'
    '"status":"ENTERED","item":"Debezium in Action","id":1},{"totalPrice":29.99,"quantity":1,"status":"ENTERED",'
    '"item":"Debezium for Dummies","id":2}],"id":1}')
# A Confluent-framed Avro value: magic 0, schema id 42, then {id: long 1, status: "ENTERED"} as Avro
# binary (zig-zag varints), a 0xff byte for good measure: not UTF-8, not JSON.
AVRO_VALUE = b"\x00\x00\x00\x00\x2a" + b"\x02" + b"\x0eENTERED" + b"\xff\x00"


@pytest.fixture(scope="module")
def kafka() -> Iterator[devkafka.KafkaCluster]:
    reason = devkafka.unavailable()
    if reason is not None:
        pytest.skip(f"no Apache Kafka here: {reason}")
    cluster = devkafka.KafkaCluster(1)
    yield cluster
    cluster.stop()


@pytest.fixture
def documented(db) -> psycopg.Connection:
    db.execute(DOCUMENTED_TABLE)
    return db


def attach(db_url: str, table: str, *options: str) -> None:
    done = helpers.run_cli("attach", "--debezium-table", table, *options, env=cli_env(db_url))
    assert done.returncode == 0, done.stdout + done.stderr


def records_on(kafka: devkafka.KafkaCluster, topic: str) -> int:
    """How many records the topic holds (the sum of its partitions' high watermarks)."""
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"count-{uuid.uuid4().hex[:6]}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)
    finally:
        consumer.close()


def read_all(kafka: devkafka.KafkaCluster, topic_reader, db_url: str, topic: str, n: int) -> list[object]:
    """The topic's records, once every outbox row is published (their deliveries reported): all n,
    and no more (each once)."""
    messages = topic_reader(topic, bootstrap=kafka.bootstrap).read_count(n, timeout=60)
    assert records_on(kafka, topic) == n
    return messages


def test_documented_rows_arrive_once_with_the_documented_key_id_header_and_value(
        kafka, documented, db_url, start_tier, topic_reader):
    attach(db_url, TABLE)
    start_tier(bootstrap=kafka.bootstrap)
    customer_id = uuid.uuid4()
    with psycopg.connect(db_url) as app:
        app.execute(INSERT, (EVENT_ID, "order", "1", "OrderCreated", WRITTEN_PAYLOAD))
        app.commit()
        # The idiom: the row inserted and deleted in one transaction, the table never grows.
        app.execute(INSERT, (customer_id, "customers", "123", "CustomerUpdated", '{"id": 123, "name": "Jane"}'))
        app.execute("DELETE FROM inventory.outboxevent WHERE id = %s", (customer_id,))
        app.commit()
    assert documented.execute("SELECT count(*) FROM inventory.outboxevent").fetchone()[0] == 1

    helpers.wait_all_published(db_url, 2, 60, "both events published")
    [order] = read_all(kafka, topic_reader, db_url, "outbox.event.order", 1)
    assert (order.key(), order.headers(), order.value()) == (b"1", [("id", EVENT_ID.encode())],
                                                             DOCUMENTED_VALUE.encode())
    [customer] = read_all(kafka, topic_reader, db_url, "outbox.event.customers", 1)
    assert (customer.key(), customer.headers(), customer.value()) == (
        b"123", [("id", str(customer_id).encode())], b'{"id": 123, "name": "Jane"}')


def test_bytea_avro_arrives_unchanged_and_an_empty_payload_is_a_tombstone_when_asked(
        kafka, db, db_url, start_tier, topic_reader):
    kind = f"avro{uuid.uuid4().hex[:6]}"
    for table in ("avro_outbox", "plain_outbox"):
        db.execute(f"CREATE TABLE {table} (id uuid NOT NULL, aggregatetype varchar(255) NOT NULL, "
                   "aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload bytea)")
    attach(db_url, "public.avro_outbox", "--tombstone-on-empty-payload", "--field-as-header", "type:eventType")
    attach(db_url, "public.plain_outbox", "--topic-template", "plain.${routedByValue}")
    start_tier(bootstrap=kafka.bootstrap)
    ids = [uuid.uuid4() for _ in range(4)]
    with psycopg.connect(db_url) as app:
        app.execute("INSERT INTO avro_outbox VALUES (%s, %s, 'a-1', 'OrderCreated', %s)", (ids[0], kind, AVRO_VALUE))
        app.execute("INSERT INTO avro_outbox VALUES (%s, %s, 'a-1', 'OrderDeleted', ''::bytea)", (ids[1], kind))
        app.execute("INSERT INTO plain_outbox VALUES (%s, %s, 'a-1', 'OrderCreated', ''::bytea)", (ids[2], kind))
        app.execute("INSERT INTO plain_outbox VALUES (%s, %s, 'a-1', 'OrderDeleted', NULL)", (ids[3], kind))
        app.commit()

    helpers.wait_all_published(db_url, 4, 60, "four events published")
    avro, tombstone = read_all(kafka, topic_reader, db_url, f"outbox.event.{kind}", 2)
    assert (avro.key(), avro.value()) == (b"a-1", AVRO_VALUE)
    assert avro.headers() == [("id", str(ids[0]).encode()), ("eventType", b"OrderCreated")]
    assert (tombstone.key(), tombstone.value()) == (b"a-1", None)
    assert tombstone.headers() == [("id", str(ids[1]).encode()), ("eventType", b"OrderDeleted")]
    empty, null = read_all(kafka, topic_reader, db_url, f"plain.{kind}", 2)
    assert (empty.value(), null.value()) == (b"", None)  # not asked: empty stays empty; NULL is null
    assert [m.headers() for m in (empty, null)] == [[("id", str(ids[2]).encode())], [("id", str(ids[3]).encode())]]


def test_two_writers_of_one_aggregate_committing_in_reverse_xid_order_publish_in_xid_order(
        kafka, documented, db_url, start_tier, topic_reader):
    """README "Ordering": per key, the order of the writing transactions' ids. Writer A takes its
    xid first and commits last; B's event waits behind the horizon until A ends, then A's goes first
    (Debezium's router would have published B first: commit order)."""
    kind = f"order{uuid.uuid4().hex[:6]}"
    attach(db_url, TABLE)
    tier = start_tier(bootstrap=kafka.bootstrap, OUTBOX_HORIZON_MAX_WAIT_MS="60000")
    first = uuid.uuid4()
    with psycopg.connect(db_url) as warm:
        warm.execute(INSERT, (first, kind, "warm-up", "Warm", "{}"))
        warm.commit()
    reader = topic_reader(f"outbox.event.{kind}", bootstrap=kafka.bootstrap)
    reader.read_count(1, timeout=90)  # the tier holds its shards and publishes

    a_id, b_id = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(db_url, application_name="writer-a") as a, \
            psycopg.connect(db_url, application_name="writer-b") as b:
        a.execute(INSERT, (a_id, kind, "agg-7", "Written", '{"by": "a"}'))
        b.execute(INSERT, (b_id, kind, "agg-7", "Written", '{"by": "b"}'))
        a_xid, b_xid = (int(c.execute("SELECT pg_current_xact_id()::text").fetchone()[0]) for c in (a, b))
        assert a_xid < b_xid
        b.commit()
        port = tier.http_port()

        def b_status() -> str:
            return documented.execute("SELECT status FROM outbox_events WHERE headers->>'id' = %s",
                                      (str(b_id),)).fetchone()[0]

        # The claim has waited a second and a half for A (several polls after B's commit), or B went out.
        helpers.wait_for(lambda: b_status() != "pending" or (
            helpers.metric_value(port, "kaireon_outbox_horizon_age_seconds") or 0) >= 1.5,
            30, "the claim to wait for A")
        assert b_status() == "pending", "B's event went out while A, with the lower xid, was still open"
        a.commit()

    messages = reader.read_count(3, timeout=60)
    helpers.wait_all_published(db_url, 3, 60, "the three events published")
    assert [(m.key(), dict(m.headers())["id"]) for m in messages[1:]] == [
        (b"agg-7", str(a_id).encode()), (b"agg-7", str(b_id).encode())]
    assert records_on(kafka, f"outbox.event.{kind}") == 3


def test_detach_leaves_the_documented_table_as_it_was_and_stops_publishing_it(documented, db_url):
    before = table_definition(documented, TABLE)
    attach(db_url, TABLE, "--field-as-header", "type")
    assert table_definition(documented, TABLE) != before  # the trigger is there
    detached = helpers.run_cli("detach", "--debezium-table", TABLE, env=cli_env(db_url))
    assert detached.returncode == 0, detached.stdout + detached.stderr
    assert table_definition(documented, TABLE) == before
    with psycopg.connect(db_url) as app:
        app.execute(INSERT, (uuid.uuid4(), "order", "1", "OrderCreated", "{}"))
        app.commit()
    assert helpers.status_counts(db_url) == {}


def test_the_application_and_the_tier_through_pgbouncer_in_transaction_mode(
        request, kafka, documented, db_url, start_tier, topic_reader):
    """The application's transactions through PgBouncer (pool_mode=transaction, the session's), each
    writing a row and deleting it, as does the tier: every event once, in the key's order."""
    from tests import pgbouncer

    if pgbouncer.binary() is None:
        pytest.skip(pgbouncer.SKIP_REASON)
    bouncer = request.getfixturevalue("tier_pgbouncer")
    kind = f"pooled{uuid.uuid4().hex[:6]}"
    attach(db_url, TABLE)
    start_tier(bootstrap=kafka.bootstrap, **helpers.TierPooler(bouncer.port, bouncer.upstream_url).route(db_url))
    ids = [uuid.uuid4() for _ in range(20)]
    with psycopg.connect(bouncer.url_for(db_url), prepare_threshold=None) as app:
        for n, event_id in enumerate(ids):
            app.execute(INSERT, (event_id, kind, f"agg-{n % 3}", "Written", f'{{"n": {n}}}'))
            app.execute("DELETE FROM inventory.outboxevent WHERE id = %s", (event_id,))
            app.commit()
    helpers.wait_all_published(db_url, len(ids), 60, "every event published")
    messages = read_all(kafka, topic_reader, db_url, f"outbox.event.{kind}", len(ids))
    assert sorted(dict(m.headers())["id"] for m in messages) == sorted(str(i).encode() for i in ids)
    for key in (b"agg-0", b"agg-1", b"agg-2"):
        numbers = [int(m.value()[6:-1]) for m in messages if m.key() == key]
        assert numbers == sorted(numbers) and numbers, key
