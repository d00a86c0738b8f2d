"""The claim horizon and the ordering of restored rows, end to end, with the tier as a least-privilege
role (issue 25, cases 1 and 7) and as the superuser: real roles (tests/roles.py, the grants
`kaireon-pub grants` prints, without pg_read_all_stats), transactions of another role left open in
their own sessions, rows written by plain SQL, `kaireon-pub run` as a process, a real broker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from kaireon_pub.db.migrate import migrate
from tests import helpers
from tests.roles import Roles

pytestmark = [
    pytest.mark.not_via_pgbouncer(
    "the session's PgBouncer knows one user (its userlist): these roles log in to the server directly"),
    pytest.mark.broker_agnostic("the horizon and restored rows are the database's"),
]

MAX_WAIT_MS = 2000
SLACK_S = 3.0  # the "few seconds" the issue allows past OUTBOX_HORIZON_MAX_WAIT_MS


@pytest.fixture
def roles(pg) -> Iterator[Roles]:
    """Owner (the application's role here), a runtime role without pg_read_all_stats, migrated."""
    with Roles(pg).create(migrate_schema=False) as made:
        with psycopg.connect(made.url(made.owner), autocommit=True) as conn:
            migrate(conn)
            conn.execute("CREATE TABLE report_runs (id bigserial PRIMARY KEY, note text)")
        made.grant(read_all_stats=False)
        yield made


def tier_url(roles: Roles, tier_role: str) -> str:
    return roles.url(roles.runtime if tier_role == "runtime" else None)


def open_writer(roles: Roles, name: str) -> psycopg.Connection:
    """A session of the application's role with a transaction left open: it holds an xid (a row
    written to another table), as a long report or batch job of the application would."""
    conn = psycopg.connect(roles.url(roles.owner), application_name=name)
    conn.execute("INSERT INTO report_runs (note) VALUES (%s)", (name,))
    return conn


def published_count(roles: Roles, ids: list[int]) -> int:
    with psycopg.connect(roles.url(), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM outbox_events WHERE id = ANY(%s) AND status = 'published'",
                            (ids,)).fetchone()[0]


def open_writers(roles: Roles) -> int:
    """The open transactions of the report jobs (seen by the superuser)."""
    with psycopg.connect(roles.url(), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'report-job-%%' "
                            "AND backend_xid IS NOT NULL").fetchone()[0]


def report_jobs_seen_by(url: str) -> list[object]:
    """The xact_start of the report jobs' sessions as `url`'s role sees them."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT xact_start FROM pg_stat_activity "
                                           "WHERE application_name LIKE 'report-job-%%'")]


def warm_up(roles: Roles, topic: str, reader: helpers.TopicReader) -> None:
    """The tier publishes: its workers hold their shards and their cursors are past the first rows."""
    ids = helpers.commit_events(roles.url(roles.owner), topic, 4, keys=4, phase="warm-up")
    reader.read_ids(ids, timeout=60)


@pytest.mark.parametrize("tier_role", ["runtime", "superuser"])
def test_two_long_transactions_of_another_role_hold_publishing_no_longer_than_the_max_wait(
        roles, broker, topic, start_tier, topic_reader, tier_role):
    """Case 1: two transactions of the application's role, opened a second apart and left open.
    The runtime role cannot see their start (no pg_read_all_stats): its workers time them from
    when they first saw them. Events committed after both are published within
    OUTBOX_HORIZON_MAX_WAIT_MS and a few seconds, while both stay open, and the horizon-age gauge
    says the claim waited (before: nothing was published until both ended, the gauge read 0)."""
    tier = start_tier(db_url=tier_url(roles, tier_role), OUTBOX_WORKERS="2",
                      OUTBOX_HORIZON_MAX_WAIT_MS=str(MAX_WAIT_MS))
    port = tier.http_port()
    reader = topic_reader(topic)
    warm_up(roles, topic, reader)
    ages: list[float] = []

    def age() -> float:
        ages.append(helpers.metric_value(port, "kaireon_outbox_horizon_age_seconds") or 0.0)
        return ages[-1]

    first = open_writer(roles, "report-job-1")
    try:
        threading.Event().wait(1.0)  # the scenario: the second one a second after the first
        second = open_writer(roles, "report-job-2")
        try:
            if tier_role == "runtime":  # the premise: the tier's role cannot see when they began
                assert report_jobs_seen_by(roles.url(roles.runtime)) == [None, None]
            committed_at = time.monotonic()
            ids = helpers.commit_events(roles.url(roles.owner), topic, 10, keys=5, phase="behind-two")

            def all_published() -> bool:
                age()
                return published_count(roles, ids) == len(ids)

            helpers.wait_for(all_published, MAX_WAIT_MS / 1000 + SLACK_S + 20,
                             "the events committed after both transactions published", interval=0.1)
            took = time.monotonic() - committed_at
            assert took <= MAX_WAIT_MS / 1000 + SLACK_S, f"published {took:.1f} s after their commit"
            assert open_writers(roles) == 2  # both still open
        finally:
            second.rollback()
            second.close()
    finally:
        first.rollback()
        first.close()
    reader.read_ids(ids, timeout=30)
    assert max(ages) > 0.5, ages
    helpers.assert_per_key_order(reader.messages)
    assert tier.stop() == 0


def restore_rows(roles: Roles, topic: str, keys: list[str], base_xid: int) -> list[int]:
    """Rows as a restore from a cluster with a higher transaction counter writes them (plain SQL,
    an explicit xid far above this cluster's), one per key, committed."""
    with psycopg.connect(roles.url(roles.owner)) as conn:
        ids = [conn.execute(
            "INSERT INTO outbox_events (topic, partition_key, payload, xid) VALUES (%s, %s, %s, %s::text::xid8) "
            "RETURNING id", (topic, key, json.dumps({"restored": key}), str(base_xid + i)),
        ).fetchone()[0] for i, key in enumerate(keys)]
        conn.commit()
    return ids


@pytest.mark.parametrize(("tier_role", "claim_mode"), [("runtime", "status"), ("runtime", "lock"),
                                                     ("superuser", "status")])
def test_rows_restored_while_the_tier_runs_go_before_the_newer_events_of_their_keys(
        roles, broker, topic, start_tier, topic_reader, tier_role, claim_mode):
    """Case 7: rows with an xid above the cluster's counter written while the tier runs, then a
    newer event of each of their keys committed at once: every restored row is published before
    the newer event of its key (before: the newer ones went first, the restored rows waited for
    worker 0's rescan, OUTBOX_RESCAN_INTERVAL_MS)."""
    tier = start_tier(db_url=tier_url(roles, tier_role), OUTBOX_WORKERS="2", OUTBOX_CLAIM_MODE=claim_mode)
    reader = topic_reader(topic)
    warm_up(roles, topic, reader)
    keys = [f"restored-{i}" for i in range(6)]
    restored = restore_rows(roles, topic, keys, base_xid=9_000_000_000)
    newer = helpers.commit_events(roles.url(roles.owner), topic, len(keys), keys=len(keys), phase="after",
                                  key_prefix="restored-")
    messages = reader.read_ids(restored + newer, timeout=45)
    position = {event_id: i for i, event_id in reversed(list(enumerate(helpers.event_ids(messages))))}
    overtaken = [key for key, old, new in zip(keys, restored, newer, strict=True) if position[new] < position[old]]
    assert overtaken == [], f"newer events published before the restored rows of {overtaken}"
    helpers.wait_all_published(roles.url(), 4 + 2 * len(keys), 20, "every event published")
    assert tier.stop() == 0
