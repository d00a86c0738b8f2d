"""Faults Tansu could not give (issue 23), against a real Apache Kafka: a three-broker cluster
(replication factor 3, min.insync.replicas=2) whose partition leaders move, topics deleted and
grown under load. (A single broker restarted with its data: test_kafka_sasl.py, over SASL_SSL.)

Every test runs a tier under a steady load (a thread enqueueing a few hundred events/s on 50 keys)
while a reader of the topic checks, once the fault is over: every committed event on the topic,
each key's events in commit order, duplicates no more than the tier counted
(kaireon_outbox_unconfirmed_total + kaireon_outbox_lease_lost_total from its /metrics), no row left
`processing`, the tier still running. Every test leaves all brokers running.
"""

from __future__ import annotations

import collections
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import TopicCollection
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from tests.helpers import (
    Load,
    Tier,
    TopicReader,
    assert_per_key_order,
    event_ids,
    metric_value,
    status_counts,
    tier_env,
    wait_for,
)

pytestmark = pytest.mark.not_via_pgbouncer("the broker is the fault here; these tests run once, directly")

PARTITIONS = 6
RATE_PER_TX, PAUSE_S = 10, 0.03  # ~250-300 events/s on 50 keys


# ---- the cluster ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(kafka_cluster) -> Any:
    """tests/conftest.py's session `kafka_cluster`: 3 nodes, RF 3, min.insync.replicas=2 (skips,
    with the reason, without Java or Maven). Every test here leaves its nodes running."""
    return kafka_cluster


@pytest.fixture(scope="module")
def admin(cluster) -> AdminClient:
    return AdminClient({"bootstrap.servers": cluster.bootstrap, "log_level": 0})


@pytest.fixture
def all_brokers_back(cluster) -> Iterator[None]:
    """Whatever the test did: every node running after it."""
    yield
    for node_id in cluster.node_ids:
        if node_id not in cluster.running():
            cluster.start_node(node_id)


def create_topic(admin: AdminClient, topic: str, partitions: int = PARTITIONS, replication: int = 3,
                 config: dict[str, str] | None = None, assignment: list[list[int]] | None = None) -> None:
    if assignment is not None:
        # confluent-kafka 2.16 wants the partition count with an assignment (its -1 is refused).
        new = NewTopic(topic, num_partitions=len(assignment), replication_factor=-1, replica_assignment=assignment,
                       config=config or {})
    else:
        new = NewTopic(topic, num_partitions=partitions, replication_factor=replication, config=config or {})
    admin.create_topics([new])[topic].result(30)
    wait_for(lambda: fully_replicated(admin, topic, partitions if assignment is None else len(assignment)),
             30, f"{topic}'s partitions led and in sync")


def fully_replicated(admin: AdminClient, topic: str, partitions: int | None = None) -> bool:
    """Every partition of the topic has a leader and all its replicas in sync."""
    try:
        meta = admin.list_topics(topic, timeout=5).topics.get(topic)
    except Exception:  # noqa: BLE001 - a broker going or coming: not yet
        return False
    if meta is None or meta.error is not None or not meta.partitions:
        return False
    if partitions is not None and len(meta.partitions) != partitions:
        return False
    return all(p.leader >= 0 and set(p.isrs) == set(p.replicas) for p in meta.partitions.values())


def leaders(admin: AdminClient, topic: str) -> dict[int, int]:
    meta = admin.list_topics(topic, timeout=10).topics[topic]
    return {p: m.leader for p, m in meta.partitions.items()}


# ---- a tier under steady load --------------------------------------------------------------------

@dataclass
class Steady:
    """A tier, a load and a reader of one topic; `finish()` checks what a user sees."""

    db_url: str
    topic: str
    tier: Tier
    load: Load
    reader: TopicReader
    port: int
    partitions: int = PARTITIONS

    def committed_so_far(self) -> int:
        return max(self.load.committed, default=0)

    def wait_flowing(self, after_id: int, timeout: float, partitions: set[int] | None = None) -> float:
        """Seconds until the reader sees an event committed after `after_id` (on one of `partitions`
        when given, else on every partition of the topic)."""
        started = time.monotonic()
        wanted = set(partitions) if partitions is not None else set(range(self.partitions))
        seen: set[int] = set()
        index = 0

        def flowing(msgs: list[Any]) -> bool:
            nonlocal index
            for msg in msgs[index:]:
                if msg.partition() in wanted and int(dict(msg.headers())["event-id"]) > after_id:
                    seen.add(msg.partition())
            index = len(msgs)
            return seen >= wanted if partitions is None else bool(seen)

        self.reader.read_until(flowing, timeout)
        return time.monotonic() - started

    def counted(self) -> float:
        return ((metric_value(self.port, "kaireon_outbox_unconfirmed_total") or 0.0)
                + (metric_value(self.port, "kaireon_outbox_lease_lost_total") or 0.0))

    def finish(self, timeout: float = 90, *, order_across_partitions: bool = True) -> dict[str, Any]:
        """Stop the load; then every committed event published and on the topic, per-key order,
        duplicates within what was counted, nothing processing, the tier running. Without
        `order_across_partitions` the order is checked per partition only (a key that moved)."""
        committed = self.load.stop()
        n = len(committed)
        wait_rows(self.db_url, {"published": n}, timeout)
        messages = read_ids(self.reader, committed, 30)
        ids = event_ids(messages)
        duplicates = len(ids) - len(set(ids))
        counted = self.counted()
        assert set(ids) == set(committed), f"events on the topic that were never committed: {set(ids) - set(committed)}"
        assert duplicates <= counted, f"{duplicates} duplicates on the topic, the tier counted {counted}"
        if order_across_partitions:
            assert_per_key_order(messages)
        else:
            for msgs in by_partition(messages).values():
                assert_per_key_order(msgs)
        assert self.tier.proc.poll() is None, "the tier exited"
        fatal = [e for e in self.tier.logs() if e.get("event") == "kafka error" and e.get("fatal")]
        recreated = [e for e in self.tier.logs() if e.get("event") == "producer recreated"]
        return {"events": n, "duplicates": duplicates, "counted": counted, "fatal": fatal, "recreated": recreated,
                "processed": metric_value(self.port, "kaireon_outbox_processed_total", {"outcome": "published"})}


def wait_rows(db_url: str, expected: dict[str, int], timeout: float) -> None:
    """Until the outbox's rows by status are `expected`; the rows as they then are on a timeout."""
    try:
        wait_for(lambda: status_counts(db_url) == expected, timeout, f"rows {expected}", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; rows: {status_counts(db_url)}") from None


def read_ids(reader: TopicReader, ids: list[int], timeout: float) -> list[Any]:
    """Every message read until all of `ids` are there; the missing ones named on a timeout."""
    wanted = set(ids)
    try:
        return list(reader.read_until(lambda msgs: wanted <= set(event_ids(msgs)), timeout))
    except AssertionError as exc:
        missing = sorted(wanted - set(event_ids(reader.messages)))
        raise AssertionError(f"{exc}; {len(missing)} of {len(wanted)} events missing, e.g. {missing[:10]}") from None


def explain(db_url: str, exc: AssertionError, run: Steady, messages: list[Any] = (),
            before: set[int] = frozenset()) -> str:
    """The rows and the tier's log lines of the events an order assertion names."""
    import re

    import psycopg

    ids = [int(x) for x in re.findall(r"event (\d+) after (\d+)", str(exc))[0]] if "event" in str(exc) else []
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute("SELECT id, partition_key, status, attempts, left(last_error, 200), created_at, "
                            "published_at"
                            " FROM outbox_events WHERE id = ANY(%s)", (ids,)).fetchall()
    lines = [e for e in run.tier.logs() if e.get("eventId") in ids or e.get("level") in ("WARNING", "ERROR")]
    records = [(int(dict(m.headers())["event-id"]), m.partition(), m.offset(), m.timestamp()[1]) for m in messages
               if int(dict(m.headers())["event-id"]) in ids]
    return (f"rows: {rows}; records: {records}; read on the old topic: {[i for i in ids if i in before]};"
            f" tier log: {lines[:15]}")


def keys_moved_once(messages: list[Any]) -> tuple[int, int]:
    """Per partition, each key's first deliveries in commit order; across partitions, each key
    switches partition at most once in commit order (its events never go back to a partition it
    left). Returns (keys that moved, keys)."""
    placed: dict[bytes, list[tuple[int, int]]] = collections.defaultdict(list)  # key -> (event id, partition)
    first: set[int] = set()
    for msgs in by_partition(messages).values():
        assert_per_key_order(msgs)
        for msg in msgs:
            event_id = int(dict(msg.headers())["event-id"])
            if event_id not in first:
                first.add(event_id)
                placed[msg.key()].append((event_id, msg.partition()))
    moved = 0
    for key, events in placed.items():
        partitions = [p for _, p in sorted(events)]
        switches = sum(1 for a, b in zip(partitions, partitions[1:], strict=False) if a != b)
        assert switches <= 1, f"key {key!r} went back and forth between partitions: {sorted(events)[:20]}"
        moved += switches
    return moved, len(placed)


def by_partition(messages: list[Any]) -> dict[int, list[Any]]:
    """Each partition's records in offset order."""
    parts: dict[int, list[Any]] = collections.defaultdict(list)
    for msg in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        parts[msg.partition()].append(msg)
    return parts


@contextlib.contextmanager
def steady(db_url: str, bootstrap: str, topic: str, tmp_path, run_tier, *, env: dict[str, str] | None = None,
           partitions: int = PARTITIONS, **overrides: str) -> Iterator[Steady]:
    """A tier (`env`, else tier_env with `overrides`) publishing a steady load to `topic`, and a
    reader of it on `bootstrap`; yielded once events flow on all `partitions`."""
    tier = run_tier(env if env is not None else tier_env(db_url, bootstrap, tmp_path, **overrides))
    port = tier.http_port()
    run = Steady(db_url, topic, tier, Load(db_url, topic, per_tx=RATE_PER_TX, pause=PAUSE_S, keys=50),
                 TopicReader(bootstrap, topic), port, partitions)
    try:
        run.load.__enter__()
        # Steady state: the tier publishes on every partition.
        run.wait_flowing(0, 60)
        yield run
    finally:
        with contextlib.suppress(Exception):
            run.load.stop()
        run.reader.close()


def _report(what: str, figures: dict[str, Any]) -> None:
    print(f"\n[kafka-faults] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# ---- the tests -----------------------------------------------------------------------------------

def test_kill_9_of_the_busiest_leader_loses_nothing_and_publishing_resumes(
        db_url, cluster, admin, all_brokers_back, tmp_path, run_tier):
    topic = f"kf-kill-{uuid.uuid4().hex[:8]}"
    create_topic(admin, topic)
    with steady(db_url, cluster.bootstrap, topic, tmp_path, run_tier) as run:
        led = leaders(admin, topic)
        victim, _ = collections.Counter(led.values()).most_common(1)[0]
        moved = {p for p, node in led.items() if node == victim}
        mark = run.committed_so_far()
        killed_at = time.monotonic()
        cluster.kill_node(victim)
        # Publishing resumes by itself: first on the partitions the dead broker led, then everywhere.
        moved_s = run.wait_flowing(mark, 60, partitions=moved)
        everywhere_s = time.monotonic() - killed_at
        everywhere_s += run.wait_flowing(mark, 60)
        new_leaders = leaders(admin, topic)
        assert victim not in new_leaders.values()
        cluster.start_node(victim)
        wait_for(lambda: fully_replicated(admin, topic), 60, "the killed broker back in sync")
        figures = run.finish()
    _report("kill -9 of the busiest leader", {
        "victim": victim, "itsPartitions": sorted(moved), "resumeOnItsPartitionsS": round(moved_s, 2),
        "resumeEverywhereS": round(everywhere_s, 2),
        **{k: v for k, v in figures.items() if k not in ("fatal", "recreated")},
        "fatalErrors": len(figures["fatal"]), "producerRecreated": [e.get("cause") for e in figures["recreated"]]})


def test_a_rolling_restart_of_all_three_brokers_loses_nothing(db_url, cluster, admin, all_brokers_back,
                                                               tmp_path, run_tier):
    topic = f"kf-roll-{uuid.uuid4().hex[:8]}"
    create_topic(admin, topic)
    pauses = {}
    with steady(db_url, cluster.bootstrap, topic, tmp_path, run_tier) as run:
        for node_id in cluster.node_ids:
            cluster.restart_node(node_id)
            # As an upgrade does: the next broker only once every partition is in sync again.
            wait_for(lambda: fully_replicated(admin, topic), 60, f"the topic in sync after node {node_id}'s restart")
            mark = run.committed_so_far()
            pauses[node_id] = round(run.wait_flowing(mark, 60), 2)
        figures = run.finish()
    _report("rolling restart", {"flowingAgainS": pauses, "events": figures["events"],
                                "duplicates": figures["duplicates"], "counted": figures["counted"],
                                "fatalErrors": len(figures["fatal"]),
                                "producerRecreated": [e.get("cause") for e in figures["recreated"]]})


def test_a_topic_deleted_and_recreated_under_load(db_url, cluster, admin, all_brokers_back, tmp_path, run_tier):
    """Deleting a topic deletes what it held: the events the tier had published to it are gone with
    it (their rows say published). The broker creates it again as soon as the tier's producer asks
    for its metadata (auto.create.topics.enable, Kafka's default, and librdkafka's producer asks),
    with the broker's num.partitions (4 in these clusters), unless an operator creates it first:
    keys then hash to other partitions, as when partitions are added (the next test). What the test
    holds the tier to: every event committed once the topic exists again is on it; per partition,
    each key in commit order, and each key switching partition at most once; every row published
    (the gap's events retried, OUTBOX_MAX_ATTEMPTS raised so that none fails), none processing."""
    topic = f"kf-recreate-{uuid.uuid4().hex[:8]}"
    create_topic(admin, topic)
    with steady(db_url, cluster.bootstrap, topic, tmp_path, run_tier, OUTBOX_MAX_ATTEMPTS="1000",
                OUTBOX_BACKOFF_BASE_MS="200", OUTBOX_BACKOFF_MAX_MS="1000") as run:
        read_before = set(event_ids(run.reader.messages))
        old_id = topic_id(admin, topic)
        deleted_at = time.monotonic()
        admin.delete_topics([topic])[topic].result(30)
        recreated = wait_for(lambda: _try_create(admin, topic, old_id), 60, "the topic there again")
        recreate_s = time.monotonic() - deleted_at
        mark = run.committed_so_far()
        # The load goes on past the recreation.
        wait_for(lambda: run.committed_so_far() > mark + 500, 30, "500 more events committed")
        committed = run.load.stop()
        wait_rows(db_url, {"published": len(committed)}, 90)
        after = [i for i in committed if i > mark]
        run.reader.close()
        run.reader = TopicReader(cluster.bootstrap, topic)
        messages = read_ids(run.reader, after, 60)
        on_new = set(event_ids(messages))
        gone = set(committed) - on_new - read_before
        try:
            moved, _ = keys_moved_once(messages)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {explain(db_url, exc, run, messages, read_before)}") from None
        assert run.tier.proc.poll() is None
        retried = metric_value(run.port, "kaireon_outbox_processed_total", {"outcome": "retried"})
        partitions = len(admin.list_topics(topic, timeout=10).topics[topic].partitions)
    _report("topic deleted and recreated", {
        "recreatedBy": recreated, "partitionsAfter": partitions, "thereAgainAfterS": round(recreate_s, 2),
        "events": len(committed), "onNewTopic": len(on_new), "goneWithTheOldTopicUnread": len(gone),
        "goneCommittedAfterThereAgain": len([i for i in gone if i > mark]), "retried": retried,
        "keysMovedPartition": moved})


def topic_id(admin: AdminClient, topic: str) -> str | None:
    """The topic's id (a new one when the topic is created again), None when there is none."""
    try:
        return str(admin.describe_topics(TopicCollection([topic]))[topic].result(10).topic_id)
    except Exception:  # noqa: BLE001 - UNKNOWN_TOPIC_OR_PART
        return None


def _try_create(admin: AdminClient, topic: str, old_id: str | None) -> str | None:
    """Create the topic again: 'admin'; 'auto' when the broker had already created it again (a
    producer's metadata request, auto.create.topics.enable); None while the old one is still there."""
    now = topic_id(admin, topic)
    if now is not None:
        return "auto" if now != old_id and fully_replicated(admin, topic) else None
    try:
        admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=3)])[topic].result(15)
    except Exception:  # noqa: BLE001 - TOPIC_ALREADY_EXISTS: auto-created meanwhile, or still being deleted
        return None
    wait_for(lambda: fully_replicated(admin, topic), 30, "the created topic led and in sync")
    return "admin"


def test_partitions_added_under_load_move_keys_and_each_key_switches_once(db_url, cluster, admin, all_brokers_back,
                                                                         tmp_path, run_tier):
    """CreatePartitions changes which partition a key hashes to: a key's earlier events stay on its
    old partition, its later ones go to the new one. A consumer reading partitions independently can
    see a moved key's new events before its old ones: the tier cannot keep order across that. What
    it does keep, and what is tested: per partition, each key in commit order; each moved key
    switches once (no event of it on the old partition after one on the new, first deliveries).
    librdkafka learns the new count at its next metadata refresh (topic.metadata.refresh.interval.ms,
    300 s by default; 1 s here through KAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS)."""
    topic = f"kf-grow-{uuid.uuid4().hex[:8]}"
    create_topic(admin, topic)
    grown = PARTITIONS + 3
    with steady(db_url, cluster.bootstrap, topic, tmp_path, run_tier,
                KAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS="1000") as run:
        admin.create_partitions([NewPartitions(topic, grown)])[topic].result(30)
        wait_for(lambda: fully_replicated(admin, topic, grown), 30, "the new partitions led and in sync")
        grown_at_id = run.committed_so_far()
        # A reader of all nine partitions (the first one was assigned six); the load goes on until
        # the tier uses a new partition.
        run.reader.close()
        run.reader = TopicReader(cluster.bootstrap, topic)
        def on_a_new_partition(msgs: list[Any]) -> bool:
            if len(run.reader._assigned) < grown:
                run.reader._assign()  # its first metadata may have come from a broker not yet told
            return any(m.partition() >= PARTITIONS for m in msgs)

        try:
            run.reader.read_until(on_a_new_partition, 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; reader assigned {sorted(run.reader._assigned)}; partitions read "
                                 f"{collections.Counter(m.partition() for m in run.reader.messages)}") from None
        figures = run.finish(order_across_partitions=False)
        messages = run.reader.messages
    moved, keys = keys_moved_once(messages)
    assert moved, "no key moved to another partition: the new partitions were not used"
    _report("partitions added", {"partitions": f"{PARTITIONS}->{grown}", "keysMoved": moved,
                                 "keys": keys, "grownAtId": grown_at_id, "events": figures["events"],
                                 "duplicates": figures["duplicates"], "counted": figures["counted"]})
