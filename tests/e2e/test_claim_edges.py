"""The claim at the edges (issue 13): no stall without an end, rows from anywhere, no frozen peer
that pins a shard, no claim left behind by a lost reply, no exit during a database outage.

Faults are made from outside, as an operator would meet them: transactions left open (in another
database of the cluster, in the outbox's own), prepared transactions left dangling, rows with an
xid from another cluster written by plain SQL, a worker process frozen (SIGSTOP) while the server
sends it a large claim, the tier's database connections through a proxy that drops replies and
resets, the tier's own database server stopped while workers are killed. The proof is what a user
sees: events on the topic (event-id header), rows in the table, `status --json`, `check --json`,
log lines and metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime

import psycopg
import pytest
from psycopg import sql

from kaireon_pub import enqueue
from kaireon_pub.db.migrate import migrate
from tests import helpers
from tests.conftest import TEMPLATE
from tests.faults import StoppablePostgres, database_proxy
from tests.helpers import (
    Load,
    assert_per_key_order,
    commit_events,
    metric_value,
    row_summary,
    shard_shares,
    status_counts,
    tier_env,
    wait_all_published,
    wait_balanced,
    wait_for,
)
from tests.pgbouncer import PgBouncer
from tests.roles import TIER_ROLES, TierDatabase

pytestmark = pytest.mark.broker_agnostic(
    "the claim's edges are the database's (locks, lost replies, frozen peers, outages)")

# A committed event reaches the topic within this when nothing holds the claim back (poll 200 ms).
TAIL = 5.0
HORIZON_MAX_WAIT_MS = 6000  # status and check (~0.5 s, 4 s seen on a loaded machine) must answer inside it
BOUND = HORIZON_MAX_WAIT_MS / 1000
NEVER_BYPASSED_MS = 600_000


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def other_db(pg):
    """Another database of the same cluster, with an outbox of its own (another application)."""
    name = f"kaireon_other_{uuid.uuid4().hex[:8]}"
    url = pg.create_database(name, template=TEMPLATE)
    yield name, url
    pg.drop_database(name)


@pytest.fixture
def two_phase(pg):
    with psycopg.connect(pg.admin_url) as conn:
        allowed = int(conn.execute("SHOW max_prepared_transactions").fetchone()[0])
    if allowed == 0:
        pytest.skip("the test server has max_prepared_transactions = 0: prepared transactions are off "
                    "(the embedded server gets 8; set it on KAIREON_TEST_DATABASE_URL's server)")


@pytest.fixture
def prepared(two_phase, tier_db, other_db):
    """prepared(url) -> a fresh gid; every one still prepared at teardown is rolled back (before
    the databases are dropped: a prepared transaction keeps its database from being dropped)."""
    made: list[tuple[str, str]] = []

    def new(url: str) -> str:
        gid = f"kaireon-test-{uuid.uuid4().hex[:10]}"
        made.append((url, gid))
        return gid

    yield new
    for url, gid in made:
        with psycopg.connect(url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone():
                conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


@pytest.fixture
def private_pg(monkeypatch):
    """A PostgreSQL server of the test's own, with a migrated database, that the test may stop.
    When the tiers go through PgBouncer (KAIREON_TEST_VIA_PGBOUNCER), through one of its own that
    stays up while the server is down."""
    server = StoppablePostgres()
    url = server.create_database("outbox")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
    server.outbox_url = url
    bouncer = None
    if helpers.TIER_POOLER is not None:
        bouncer = PgBouncer(server.admin_url, pool_mode="transaction", pool_size=20)
        monkeypatch.setattr(helpers, "TIER_POOLER", helpers.TierPooler(bouncer.port, server.admin_url))
    yield server
    if bouncer is not None:
        bouncer.stop()
    server.close()


# ---- helpers ---------------------------------------------------------------------------------------


def wait_published(db_url: str, ids: list[int], timeout: float, what: str) -> None:
    def done() -> bool:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM outbox_events WHERE id = ANY(%s) AND status = 'published'",
                                (ids,)).fetchone()[0] == len(ids)
    try:
        wait_for(done, timeout, what, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; rows: {row_summary(db_url)}") from None


def cli_json(env: dict[str, str], *commands: tuple[str, ...], timeout: float = 30) -> list[dict]:
    """Run CLI commands (e.g. ("status", "--json")) side by side; their JSON documents, in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "kaireon_pub", *args], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in commands]
    docs = []
    for args, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        assert "Traceback" not in err, f"{' '.join(args)}: {err}"
        try:
            docs.append(json.loads(out))
        except ValueError:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode} without JSON: {out!r} {err[-2000:]}") from None
    return docs


def ops_env(db_url: str, bootstrap: str, tmp_path) -> dict[str, str]:
    return tier_env(db_url, bootstrap, tmp_path, OUTBOX_HORIZON_MAX_WAIT_MS=str(HORIZON_MAX_WAIT_MS))


def operator_env(env: dict[str, str], db: TierDatabase) -> dict[str, str]:
    """The tier's environment for `status` and `check` as the role that runs them: beside a tier on
    the runtime role, the read-only one (README, "Database roles")."""
    return env if db.ops_url == db.tier_url else {**env, "DATABASE_URL": db.ops_url}


def holders(status_doc: dict) -> list[dict]:
    assert "horizon" in status_doc, f"status --json has no horizon: {sorted(status_doc)}"
    return status_doc["horizon"]["heldBy"]


def database_of(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


def ts(line: dict) -> float:
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()


def started_tier(run_tier, env: dict[str, str], db_url: str, topic: str, app_url: str | None = None) -> object:
    """A tier that has published a first event (it claims, its producer is connected); the event
    written as `app_url`'s role (`db_url`'s by default)."""
    tier = run_tier(env)
    warm = commit_events(app_url or db_url, topic, 1, keys=1, phase="warm-up", key_prefix="warm-")
    try:
        wait_published(db_url, warm, 30, "the warm-up event published")
    except AssertionError:
        errors = [line for line in tier.logs() if line.get("level") in ("ERROR", "CRITICAL")][:3]
        raise AssertionError(f"the tier did not start publishing (exit {tier.proc.poll()}): {errors}") from None
    return tier


# ---- transactions that cannot write the outbox never hold it -----------------------------------------


@pytest.mark.parametrize("tier_role", TIER_ROLES[1:])
def test_a_writing_transaction_open_in_another_database_for_30s_does_not_delay_publishing(
        tier_db, other_db, broker, topic, tmp_path, run_tier, topic_reader):
    """The tier on the runtime role only (it sees the other database's session without its start;
    30 s are too long to run twice): the superuser's claim passes another database's transaction by
    tests/integration/test_claim.py::test_a_transaction_of_another_database_does_not_hold_the_horizon,
    and another database's prepared transaction end to end in the next test. The PgBouncer pass skips
    the runtime role, so there another database's open transaction is covered by that next test only."""
    db_url = tier_db.url
    other_name, other_url = other_db
    # A bound far beyond the test: were the other transaction waited for at all, nothing would flow.
    env = tier_env(tier_db.tier_url, broker.bootstrap, tmp_path, OUTBOX_HORIZON_MAX_WAIT_MS=str(NEVER_BYPASSED_MS))
    tier = started_tier(run_tier, env, db_url, topic, tier_db.app_url)
    published: list[int] = []
    with psycopg.connect(other_url, application_name="other-app") as other:
        # Another application's outbox write in another database of the cluster: it has an xid
        # older than every event below, and stays open for 30 s.
        enqueue(other, topic="other-topic", key="x", payload={"other": True})
        other_pid = other.execute("SELECT pg_backend_pid()").fetchone()[0]
        opened = time.monotonic()
        round_no = 0
        while time.monotonic() - opened < 30:
            ids = commit_events(tier_db.app_url, topic, 10, keys=5, phase=f"round-{round_no}")
            wait_published(db_url, ids, TAIL, f"events committed {time.monotonic() - opened:.0f} s into a "
                                              f"transaction of database {other_name} published within {TAIL} s")
            published += ids
            if round_no == 0:
                (doc,) = cli_json(operator_env(env, tier_db), ("status", "--json"))
                named = [h for h in holders(doc) if h.get("pid") == other_pid or h.get("database") == other_name]
                assert named == [], f"status names another database's transaction as holding the claim: {named}"
            round_no += 1
            # The fault itself: the other transaction stays open 30 s; a round every 5 s meanwhile.
            threading.Event().wait(max(0.0, min(5.0 * round_no, 30.0) - (time.monotonic() - opened)))
        other.rollback()
    assert round_no >= 6
    messages = topic_reader(topic).read_ids(published, 30)
    assert_per_key_order(messages)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


def test_a_dangling_prepared_transaction_in_another_database_does_not_delay_publishing(
        db_url, other_db, prepared, broker, topic, tmp_path, run_tier, topic_reader):
    other_name, other_url = other_db
    # A bound far beyond the test: were the prepared transaction waited for at all, nothing would flow.
    env = tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_HORIZON_MAX_WAIT_MS=str(NEVER_BYPASSED_MS))
    tier = started_tier(run_tier, env, db_url, topic)
    gid = prepared(other_url)
    with contextlib.closing(psycopg.connect(other_url)) as other:  # closed, not committed: it stays prepared
        # Prepared, holding a lock on that database's outbox_events; nobody will finish it.
        other.tpc_begin(gid)
        # Plain SQL: enqueue() notifies, and PostgreSQL cannot PREPARE a transaction that did.
        other.execute("INSERT INTO outbox_events (topic, partition_key, payload) VALUES ('other-topic', 'x', '{}')")
        other.tpc_prepare()
    opened = time.monotonic()
    published: list[int] = []
    for round_no in range(4):
        ids = commit_events(db_url, topic, 10, keys=5, phase=f"round-{round_no}")
        wait_published(db_url, ids, TAIL, f"events committed {time.monotonic() - opened:.0f} s after a prepared "
                                          f"transaction was left in database {other_name}, published within {TAIL} s")
        published += ids
        if round_no == 0:
            (doc,) = cli_json(env, ("status", "--json"))
            named = [h for h in holders(doc) if h.get("gid") == gid]
            assert named == [], f"status names another database's prepared transaction as holding the claim: {named}"
        # The fault itself: the prepared transaction stays; a round every 4 s.
        threading.Event().wait(max(0.0, 4.0 * (round_no + 1) - (time.monotonic() - opened)))
    messages = topic_reader(topic).read_ids(published, 30)
    assert_per_key_order(messages)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


# ---- a transaction of the outbox's own database holds the claim, but not for ever ---------------------


@pytest.mark.parametrize("tier_role", TIER_ROLES)
def test_a_same_database_transaction_that_never_writes_holds_publishing_at_most_the_bound(
        tier_db, broker, topic, tmp_path, run_tier, topic_reader, tier_role):
    """As the superuser and as the runtime role, which cannot see when the application's
    transaction began: its workers time it from when they first saw it, and `status`/`check` (the
    read-only role) name it without an age."""
    db_url = tier_db.url
    env = ops_env(tier_db.tier_url, broker.bootstrap, tmp_path)
    operator = operator_env(env, tier_db)
    ages_known = tier_role == "superuser"
    tier = started_tier(run_tier, env, db_url, topic, tier_db.app_url)
    port = tier.http_port()
    with psycopg.connect(tier_db.app_url, application_name="report-job") as holder:
        # A transaction that takes an xid (it writes something else) and then does nothing.
        holder_pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        holder_xid = int(holder.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
        opened = time.monotonic()
        behind = commit_events(tier_db.app_url, topic, 10, keys=5, phase="behind")
        status_doc, check_doc = cli_json(operator, ("status", "--json"), ("check", "--json"))
        asked_after = time.monotonic() - opened
        still_pending = status_counts(db_url).get("pending", 0)
        age_gauge = metric_value(port, "kaireon_outbox_horizon_age_seconds")

        # It holds publishing at most for the bound: the events behind it reach the topic then.
        wait_published(db_url, behind, BOUND + TAIL - (time.monotonic() - opened),
                       f"events committed behind an open same-database transaction published within "
                       f"{BOUND:g} s (OUTBOX_HORIZON_MAX_WAIT_MS) + {TAIL:g} s")
        assert asked_after < BOUND, f"status and check took {asked_after:.1f} s: not inside the bound"

        # While it held (within the bound), status and check named it, and nothing behind it was published.
        assert still_pending == 10, f"published before the bound: {status_counts(db_url)}"
        named = [h for h in holders(status_doc) if h.get("pid") == holder_pid]
        assert len(named) == 1, f"status --json does not name the holder (pid {holder_pid}): {status_doc['horizon']}"
        (entry,) = named
        assert entry["database"] == database_of(db_url)
        assert entry["application"] == "report-job"
        assert entry["bypassed"] is False
        if ages_known:
            assert 0 < entry["ageSeconds"] < BOUND + 2
            assert isinstance(status_doc["horizon"]["ageSeconds"], float) and status_doc["horizon"]["ageSeconds"] > 0
        else:  # the read-only role without pg_read_all_stats cannot see when it began
            assert entry["ageSeconds"] is None, entry
        checks = {c["name"]: c for c in check_doc["checks"]}
        assert "horizon" in checks, f"check --json has no horizon check: {list(checks)}"
        assert str(holder_pid) in checks["horizon"]["detail"] and "report-job" in checks["horizon"]["detail"], \
            checks["horizon"]
        assert age_gauge is not None and age_gauge > 0, f"kaireon_outbox_horizon_age_seconds = {age_gauge} while held"

        # Passed over: logged with what it is, counted, and the claim waits for nothing any more.
        line = tier.wait_log(lambda e: e.get("event") == "horizon bypass" and e.get("holderPid") == holder_pid, 5,
                             "the horizon bypass logged")
        assert holder_xid in [int(x) for x in line.get("xids") or [line.get("xid")]], line
        assert line["database"] == database_of(db_url) and line["application"] == "report-job"
        if ages_known:
            assert line["ageSeconds"] >= BOUND - 0.5
        else:  # unknown, and said so (before: 0.0, for a transaction waited for the whole bound)
            assert line["ageSeconds"] is None, line
        assert (metric_value(port, "kaireon_outbox_horizon_bypassed_total") or 0) >= 1
        wait_for(lambda: metric_value(port, "kaireon_outbox_horizon_age_seconds") == 0, 10,
                 "kaireon_outbox_horizon_age_seconds back to 0 once the transaction is passed over")
        later = commit_events(tier_db.app_url, topic, 10, keys=5, phase="later")
        wait_published(db_url, later, TAIL, "events committed after the bypass published within the tail")
        (status_doc,) = cli_json(operator, ("status", "--json"))
        # Passed over (by its age: `status` keeps no timer of its own, so without the age it still
        # lists the transaction as waited for).
        assert [h["bypassed"] for h in holders(status_doc) if h.get("pid") == holder_pid] == [ages_known], \
            status_doc["horizon"]
        holder.rollback()
    messages = topic_reader(topic).read_ids(behind + later, 30)
    assert_per_key_order(messages)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


@pytest.mark.parametrize("tier_role", TIER_ROLES)
def test_a_same_database_transaction_that_writes_after_the_bound_has_its_row_published_when_it_commits(
        tier_db, broker, topic, tmp_path, run_tier, topic_reader):
    """As the superuser and as the runtime role (the writer's start unseen: timed by the workers)."""
    db_url = tier_db.url
    # The periodic rescan is far away: the row must be found because its transaction was remembered.
    env = {**ops_env(tier_db.tier_url, broker.bootstrap, tmp_path), "OUTBOX_RESCAN_INTERVAL_MS": "600000"}
    tier = started_tier(run_tier, env, db_url, topic, tier_db.app_url)
    with psycopg.connect(tier_db.app_url, application_name="slow-writer") as writer:
        writer.execute("SELECT pg_current_xact_id()")  # it takes its xid long before its outbox row
        opened = time.monotonic()
        during = commit_events(tier_db.app_url, topic, 10, keys=5, phase="during")
        wait_published(db_url, during, BOUND + TAIL, f"events committed behind the open writer published within "
                                                     f"{BOUND:g} s (OUTBOX_HORIZON_MAX_WAIT_MS) + {TAIL:g} s")
        # The fault itself: the writer stays open past the bound before it writes its row.
        threading.Event().wait(max(0.0, BOUND + 1 - (time.monotonic() - opened)))
        late = enqueue(writer, topic=topic, key="late-writer", payload={"late": True})
        writer.commit()
    wait_published(db_url, [late], TAIL, "the late writer's row published within the tail after it committed")
    after = commit_events(tier_db.app_url, topic, 5, keys=5, phase="after")
    wait_published(db_url, after, TAIL, "events after it published")
    messages = topic_reader(topic).read_ids([*during, late, *after], 30)
    assert_per_key_order(messages)
    assert status_counts(db_url) == {"published": 17}
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


@pytest.mark.parametrize("tier_role", TIER_ROLES)
def test_a_same_database_prepared_transaction_that_wrote_the_outbox_holds_up_to_the_bound_and_is_named(
        tier_db, prepared, broker, topic, tmp_path, run_tier, topic_reader):
    """As the superuser and as the runtime role (a prepared transaction's time is seen by every role)."""
    db_url = tier_db.url
    env = {**ops_env(tier_db.tier_url, broker.bootstrap, tmp_path), "OUTBOX_RESCAN_INTERVAL_MS": "600000"}
    tier = started_tier(run_tier, env, db_url, topic, tier_db.app_url)
    gid = prepared(db_url)
    with contextlib.closing(psycopg.connect(tier_db.app_url, application_name="xa-app")) as app:
        app.tpc_begin(gid)
        # Plain SQL: enqueue() notifies, and PostgreSQL cannot PREPARE a transaction that did.
        in_doubt = app.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
                               "VALUES (%s, 'two-phase', '{\"prepared\": true}') RETURNING id", (topic,)).fetchone()[0]
        app.tpc_prepare()
    prepared_at = time.monotonic()
    behind = commit_events(tier_db.app_url, topic, 10, keys=5, phase="behind")
    status_doc, check_doc = cli_json(operator_env(env, tier_db), ("status", "--json"), ("check", "--json"))
    asked_after = time.monotonic() - prepared_at
    still_pending = status_counts(db_url).get("pending", 0)

    wait_published(db_url, behind, BOUND + TAIL - (time.monotonic() - prepared_at),
                   f"events committed behind a prepared transaction of the outbox's database published within "
                   f"{BOUND:g} s (OUTBOX_HORIZON_MAX_WAIT_MS) + {TAIL:g} s")
    assert asked_after < BOUND, f"status and check took {asked_after:.1f} s: not inside the bound"
    # It can still commit an outbox row: within the bound it holds, and is named by its gid.
    assert still_pending == 10, f"published before the bound: {status_counts(db_url)}"
    named = [h for h in holders(status_doc) if h.get("gid") == gid]
    assert len(named) == 1, f"status --json does not name the prepared transaction {gid}: {status_doc['horizon']}"
    (entry,) = named
    assert entry["database"] == database_of(db_url)
    assert entry["bypassed"] is False and 0 < entry["ageSeconds"] < BOUND + 2
    checks = {c["name"]: c for c in check_doc["checks"]}
    assert "horizon" in checks, f"check --json has no horizon check: {list(checks)}"
    assert gid in checks["horizon"]["detail"], checks["horizon"]
    line = tier.wait_log(lambda e: e.get("event") == "horizon bypass" and e.get("holderGid") == gid, 5,
                         "the bypass of the prepared transaction logged")
    assert line["database"] == database_of(db_url)

    # Committed at last (COMMIT PREPARED): its row is found and published.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
    wait_published(db_url, [in_doubt], TAIL, "the prepared transaction's row published within the tail of its commit")
    topic_reader(topic).read_ids([*behind, in_doubt], 30)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


# ---- rows from another cluster ---------------------------------------------------------------------------


def insert_foreign(db_url: str, topic: str, n: int, *, keys: int, key_prefix: str, base_xid: int) -> list[int]:
    """Rows as a restore from a cluster with a higher transaction counter writes them: an explicit
    xid far above this cluster's, in (xid, id) order."""
    with psycopg.connect(db_url) as conn:
        ids = [conn.execute(
            "INSERT INTO outbox_events (topic, partition_key, payload, xid) VALUES (%s, %s, %s, %s::text::xid8) "
            "RETURNING id", (topic, f"{key_prefix}{i % keys}", json.dumps({"restored": i}), str(base_xid + i)),
        ).fetchone()[0] for i in range(n)]
        conn.commit()
    return ids


def above_counter(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM outbox_events "
                            "WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())").fetchone()[0]


@pytest.mark.parametrize("tier_role", TIER_ROLES)
def test_rows_with_an_xid_above_the_counter_are_published_per_key_before_newer_events(
        tier_db, broker, topic, tmp_path, run_tier, topic_reader):
    """As the superuser and as the runtime role (the rows restored by the owner, as a restore would)."""
    db_url = tier_db.url
    restored = insert_foreign(tier_db.app_url, topic, 50, keys=10, key_prefix="acct-", base_xid=9_000_000_000)
    newer = commit_events(tier_db.app_url, topic, 50, keys=10, phase="after-restore", key_prefix="acct-")
    assert above_counter(db_url) == 50
    env = tier_env(tier_db.tier_url, broker.bootstrap, tmp_path, OUTBOX_RESCAN_INTERVAL_MS="3000")
    tier = run_tier(env)
    wait_published(db_url, restored + newer, 30, "the 50 restored rows and the 50 newer events published")
    messages = topic_reader(topic).read_ids(restored + newer, 30)
    # Per key, the restored rows (committed first, lower ids) are published before the newer ones.
    assert_per_key_order(messages)
    first = {}
    for msg in messages:
        first.setdefault(int(dict(msg.headers())["event-id"]), len(first))
    for key in range(10):
        last_restored = max(first[i] for i in restored[key::10])
        first_newer = min(first[i] for i in newer[key::10])
        assert last_restored < first_newer, f"key acct-{key}: a newer event overtook the restored rows"
    line = tier.wait_log(lambda e: e.get("event") == "foreign rows restamped", 5, "the restamp logged")
    assert line["count"] == 50
    assert above_counter(db_url) == 0

    # Found again by the periodic rescan while the tier runs.
    lines_before = len(tier.logs())
    again = insert_foreign(tier_db.app_url, topic, 20, keys=4, key_prefix="late-restore-", base_xid=9_500_000_000)
    wait_published(db_url, again, 3 + TAIL + 2, "rows restored while the tier runs published after a rescan")
    line = tier.wait_log(lambda e: e.get("event") == "foreign rows restamped" and e.get("count") == 20, 5,
                         "the second restamp logged")
    assert tier.logs().index(line) >= lines_before
    assert above_counter(db_url) == 0
    topic_reader(topic).read_ids(again, 30)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


# ---- a row locked by another session holds only its own key -------------------------------------------


def locked_by(db_url: str, event_id: int) -> bool:
    """Whether another session holds a lock on the row (a non-waiting lock attempt fails)."""
    with psycopg.connect(db_url) as conn:
        try:
            conn.execute("SELECT 1 FROM outbox_events WHERE id = %s FOR UPDATE NOWAIT", (event_id,))
        except psycopg.errors.LockNotAvailable:
            return True
        return False


@pytest.mark.parametrize("claim_mode", ["status", "lock"])
@pytest.mark.parametrize("tier_role", TIER_ROLES)
def test_a_pending_row_locked_by_another_session_holds_only_its_key(
        tier_db, broker, topic, tmp_path, run_tier, topic_reader, claim_mode):
    # A careless application (or an operator in psql) locks a pending event: SELECT ... FOR UPDATE,
    # an UPDATE of its payload, left open. The claim must neither wait for it (every other key
    # would stall) nor step over it (the later events of its key would overtake it).
    # Batches of 2: the later events of the locked one's key span claims, so the worker must
    # remember what holds them (within one claim, the claim's own scan sees it).
    # As the superuser and as the runtime role: the locker is then the application's role, whose
    # start the tier cannot see (it is timed by the workers) and whose lock it cannot take over.
    db_url = tier_db.url
    app_url = tier_db.app_url
    env = tier_env(tier_db.tier_url, broker.bootstrap, tmp_path, OUTBOX_CLAIM_MODE=claim_mode,
                   OUTBOX_HORIZON_MAX_WAIT_MS="1000", OUTBOX_BATCH_SIZE="2")
    tier = started_tier(run_tier, env, db_url, topic, app_url)
    port = tier.http_port()
    with psycopg.connect(app_url, application_name="careless-admin") as locker:
        # The locker's xid is older than the event: the claim waits for it (up to the bound), so
        # the event is still pending when the lock is taken.
        locker_pid = locker.execute("SELECT pg_backend_pid()").fetchone()[0]
        locker.execute("SELECT pg_current_xact_id()")
        (first,) = commit_events(app_url, topic, 1, keys=1, phase="locked", key_prefix="acct-")
        locker.execute("UPDATE outbox_events SET headers = headers WHERE id = %s", (first,))
        with psycopg.connect(db_url, autocommit=True) as conn:
            assert conn.execute("SELECT status FROM outbox_events WHERE id = %s", (first,)).fetchone()[0] == "pending"
        behind = commit_events(app_url, topic, 3, keys=1, phase="behind the locked event", key_prefix="acct-")
        others = commit_events(app_url, topic, 40, keys=20, phase="other keys", key_prefix="other-")
        wait_published(db_url, others, 1 + TAIL, "the events of other keys published while one event is locked")
        # A further round of claims after those: the events behind the locked one are still held.
        probe = commit_events(app_url, topic, 1, keys=1, phase="probe", key_prefix="probe-")
        wait_published(db_url, probe, TAIL, "a later event of another key published")
        assert locked_by(db_url, first)
        with psycopg.connect(db_url, autocommit=True) as conn:
            states = dict(conn.execute("SELECT id, status FROM outbox_events WHERE id = ANY(%s)",
                                       (behind + [first],)).fetchall())
        assert set(states.values()) == {"pending"}, f"events of the locked event's key moved on: {states}"
        # What holds them is named: the session (status --json), the conflict (a metric, a log line).
        (status_doc,) = cli_json(operator_env(env, tier_db), ("status", "--json"))
        assert [h for h in holders(status_doc) if h.get("pid") == locker_pid], status_doc["horizon"]
        assert (metric_value(port, "kaireon_outbox_locked_events") or 0) >= 1
        assert (metric_value(port, "kaireon_outbox_claim_lock_conflicts_total") or 0) >= 1
        line = tier.wait_log(lambda e: e.get("event") == "event locked by another session", 5,
                             "the locked event logged")
        assert line["eventId"] == first
        locker.rollback()
    # Met again at every recheck while the lock lasted (a second or more), logged once.
    assert len([e for e in tier.logs() if e.get("event") == "event locked by another session"]) == 1
    wait_published(db_url, [first] + behind, TAIL, "the locked event and the events behind it published once "
                                                   "the lock is gone")
    messages = topic_reader(topic).read_ids([first] + behind + others + probe, 30)
    assert_per_key_order(messages)
    assert status_counts(db_url).get("processing", 0) == 0
    wait_for(lambda: metric_value(port, "kaireon_outbox_locked_events") == 0, 10,
             "kaireon_outbox_locked_events back to 0 once the lock is gone")
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


def test_with_relaxed_ordering_a_locked_row_lets_its_key_flow_on_counted(db_url, broker, topic, tmp_path, run_tier,
                                                                         topic_reader):
    env = tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_ORDERING="relaxed", OUTBOX_HORIZON_MAX_WAIT_MS="1000")
    tier = started_tier(run_tier, env, db_url, topic)
    port = tier.http_port()
    with psycopg.connect(db_url, application_name="careless-admin") as locker:
        locker.execute("SELECT pg_current_xact_id()")
        (first,) = commit_events(db_url, topic, 1, keys=1, phase="locked", key_prefix="acct-")
        locker.execute("SELECT id FROM outbox_events WHERE id = %s FOR UPDATE", (first,))
        behind = commit_events(db_url, topic, 3, keys=1, phase="behind the locked event", key_prefix="acct-")
        wait_published(db_url, behind, 1 + TAIL, "the later events of the locked event's key published (relaxed)")
        assert status_counts(db_url).get("pending") == 1
        assert (metric_value(port, "kaireon_outbox_order_violations_total") or 0) >= 1
        locker.rollback()
    wait_published(db_url, [first], TAIL, "the locked event published once the lock is gone")
    topic_reader(topic).read_ids([first] + behind, 30)
    assert status_counts(db_url).get("processing", 0) == 0
    assert tier.stop() == 0


# ---- a frozen peer does not pin its shards ----------------------------------------------------------------


def test_a_worker_frozen_mid_claim_loses_its_shards_within_twice_the_ttl(db_url, broker, topic, tmp_path, run_tier,
                                                                         topic_reader):
    ttl = 4
    env = tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_WORKERS="2", OUTBOX_LEASE_TTL_SECONDS=str(ttl),
                   OUTBOX_BATCH_SIZE="10000", OUTBOX_WORKER_TIMEOUT_SECONDS="120")
    tier = run_tier(env)
    with psycopg.connect(db_url, autocommit=True) as db:
        def owners() -> dict[str, int]:
            return shard_shares(db)
        wait_balanced(db_url, 2)
        frozen_id, frozen_pid = db.execute(
            "SELECT worker_id::text, pid FROM outbox_workers WHERE slot = 1 AND expires_at > clock_timestamp()"
        ).fetchone()
        assert tier.worker_pids()[1] == frozen_pid
        shards = [r[0] for r in db.execute("SELECT shard FROM outbox_shard_leases WHERE owner = %s ORDER BY shard",
                                           (frozen_id,))]

        def worker1_claim(wait_event_type: str, wait_event: str | None = None):
            # Worker 1's pool sessions (not its -leases or -listen ones). Not by query text: the
            # server keeps only its first track_activity_query_size (1 kB), comments included.
            return db.execute("""
                SELECT pid, query_start FROM pg_stat_activity
                WHERE application_name ~ '^kaireon-pub:worker-1(\\.[0-9a-f]{8})?$' AND state = 'active'
                  AND wait_event_type = %(type)s AND (%(event)s::text IS NULL OR wait_event = %(event)s)""",
                              {"type": wait_event_type, "event": wait_event}).fetchone()

        def worker1_sessions() -> list:
            return db.execute("SELECT pid, application_name, state, wait_event, left(query, 100) FROM pg_stat_activity "
                              "WHERE application_name LIKE 'kaireon-pub:worker-1%%'").fetchall()

        def freeze_mid_claim() -> int | None:
            """Worker 1 stopped (SIGSTOP) while the server sends it a 10 MB claim result: the pid of
            the claim's backend, blocked in ClientWrite; None when this attempt missed."""
            # 4,000 events of 2.5 kB in worker 1's shards, written but not committed yet...
            with psycopg.connect(db_url) as loader:
                loader.execute("""
                    WITH keys AS (
                        SELECT 'big-' || g AS k FROM generate_series(1, 100000) AS g
                        WHERE (hashtextextended('big-' || g, 0) & 255) = ANY(%(shards)s::int[]) LIMIT 400
                    )
                    INSERT INTO outbox_events (topic, partition_key, payload)
                    SELECT %(topic)s, k, jsonb_build_object('n', n, 'pad', repeat(md5(k || n), 80))
                    FROM keys, generate_series(1, 10) AS n""", {"shards": shards, "topic": topic})
                # ...then a gate: the lease table locked, so the claim that the commit wakes waits on
                # the server before it reads anything (and sees the events once let through).
                gate = psycopg.connect(db_url, application_name="test-gate")
                gate.execute("LOCK TABLE outbox_shard_leases IN EXCLUSIVE MODE")
                loader.execute("SELECT pg_notify('kaireon_outbox', '')")
            committed = db.execute("SELECT clock_timestamp()").fetchone()[0]
            try:
                backend, started = wait_for(lambda: worker1_claim("Lock"), 10, "worker 1's claim waiting on the gate")
                if started <= committed:
                    misses.append(f"the gated claim started {started} before the commit {committed}")
                    return None  # a claim from before the commit: it cannot see the events
                os.kill(frozen_pid, signal.SIGSTOP)  # frozen: it will read nothing of the claim's result
            finally:
                gate.commit()
                gate.close()
            try:
                wait_for(lambda: worker1_claim("Client", "ClientWrite"), 5,
                         "the frozen worker's claim blocked sending its result (ClientWrite)")
            except AssertionError:
                misses.append(f"no ClientWrite: {worker1_sessions()}; rows {status_counts(db_url)}")
                os.kill(frozen_pid, signal.SIGCONT)
                return None
            return backend

        misses: list[str] = []

        for _attempt in range(3):
            backend = freeze_mid_claim()
            if backend is not None:
                break
            # Missed (the claim had started before the events committed): let them be published.
            wait_for(lambda: status_counts(db_url).keys() == {"published"}, 30,
                     "the events of a missed attempt published")
        else:
            raise AssertionError(f"worker 1 could not be frozen mid-claim in 3 attempts: {misses}")
        try:
            holding = db.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND granted "
                                 "AND locktype = 'relation' AND relation = 'outbox_shard_leases'::regclass",
                                 (backend,)).fetchone()[0]
            assert holding > 0, "the frozen claim holds no lock on outbox_shard_leases"
            expires_in = db.execute("SELECT extract(epoch FROM max(expires_at) - clock_timestamp())::float8 "
                                    "FROM outbox_shard_leases WHERE owner = %s", (frozen_id,)).fetchone()[0]
            expired_at = time.monotonic() + max(0.0, expires_in)

            def taken() -> bool:
                live = owners()
                return len(live) == 1 and next(iter(live.values())) == 256 and frozen_id not in live
            try:
                wait_for(taken, max(0.0, expires_in) + 2 * ttl, "every shard owned by the live worker", interval=0.2)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {2 * ttl} s after the frozen worker's leases expired, leases are "
                                     f"{owners()} (frozen worker {frozen_id[:8]})") from None
            took = time.monotonic() - expired_at
            # (Its lease keeper, frozen as well, may hold lease locks too: one line per session.)
            tier.wait_log(lambda e: e.get("event") == "frozen owner terminated"
                          and backend in (e.get("pids") or [e.get("pid")]), 5,
                          f"the termination of the frozen claim's session (pid {backend}) logged")
            total = db.execute("SELECT count(*) FROM outbox_events").fetchone()[0]
            wait_all_published(db_url, total, 60, "the events of the frozen worker's shards published")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen_pid, signal.SIGCONT)
    assert took <= 2 * ttl
    with psycopg.connect(db_url, autocommit=True) as db:
        ids = [r[0] for r in db.execute("SELECT id FROM outbox_events WHERE topic = %s", (topic,))]
    topic_reader(topic).read_ids(ids, 60)
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


# ---- a claim whose reply is lost ----------------------------------------------------------------------------


def orphan_a_claim(db: psycopg.Connection, proxy, cycle: int) -> datetime:
    """Let the worker's next claim reach the server and drop its reply, then reset every
    connection: the claim commits, the worker never learns its outcome. Returns when the
    connections were reset (database clock). A claim that found nothing to take (every row it
    saw held back) orphans nothing: then again, a few times."""
    for attempt in range(5):
        since = db.execute("SELECT clock_timestamp()").fetchone()[0]
        proxy.drop_replies_after(b"SET status = 'processing'")
        try:
            wait_for(proxy.triggered.is_set, 10, f"the worker's next claim, its reply dropped (cycle {cycle})")
            wait_for(lambda s=since: db.execute(
                "SELECT count(*) FROM outbox_events WHERE status = 'processing' AND updated_at > %s",
                (s,)).fetchone()[0], 3, "that claim committed on the server", interval=0.1)
        except AssertionError:
            if attempt == 4 or not proxy.triggered.is_set():
                raise
            continue
        finally:
            proxy.set_mode("reset")
            reset_at = db.execute("SELECT clock_timestamp()").fetchone()[0]
            proxy.set_mode("pass")
        return reset_at
    raise AssertionError("unreachable")


def test_a_lost_claim_reply_leaves_no_row_in_processing(db_url, broker, topic, tmp_path, run_tier, topic_reader):
    # Through PgBouncer (KAIREON_TEST_VIA_PGBOUNCER), the proxy stands between the tier and PgBouncer.
    routed = helpers.pooled(db_url)
    proxy, proxied_url = database_proxy(routed.pop("DATABASE_URL", db_url))
    try:
        # Far from the reaper: only the worker itself can return what it claimed.
        env = tier_env(proxied_url, broker.bootstrap, tmp_path, OUTBOX_BATCH_SIZE="20",
                       OUTBOX_REAPER_STALENESS_SECONDS="600", OUTBOX_RESCAN_INTERVAL_MS="600000", **routed)
        tier = started_tier(run_tier, env, db_url, topic)
        with (psycopg.connect(db_url, autocommit=True) as db,
              Load(db_url, topic, per_tx=10, pause=0.02, keys=20) as load):
            def published() -> int:
                return status_counts(db_url).get("published", 0)

            for cycle in range(3):
                wait_for(lambda: len(load.committed) > 0 and status_counts(db_url).get("pending", 0) > 0, 10,
                         "events waiting to be claimed")
                reset_at = orphan_a_claim(db, proxy, cycle)
                orphaned = db.execute("SELECT count(*) FROM outbox_events WHERE status = 'processing' "
                                      "AND updated_at <= %s", (reset_at,)).fetchone()[0]
                try:
                    wait_for(lambda r=reset_at: db.execute(
                        "SELECT count(*) FROM outbox_events WHERE status = 'processing' AND updated_at <= %s",
                        (r,)).fetchone()[0] == 0, 10, f"rows claimed before reset {cycle + 1} back out of processing")
                except AssertionError as exc:
                    raise AssertionError(f"{exc} ({orphaned} were; rows: {row_summary(db_url)})") from None
                # Plain resets while batches flow.
                for _ in range(3):
                    before = published()
                    wait_for(lambda b=before: published() > b, 20, "batches flowing again")
                    proxy.set_mode("reset")
                    proxy.set_mode("pass")
            committed = load.stop()
        wait_all_published(db_url, len(committed) + 1, 60, "every committed event published after the resets")
        line = tier.wait_log(lambda e: e.get("event") == "orphaned claims reset", 5, "the orphaned claims reset logged")
        assert line["count"] >= 1
        messages = topic_reader(topic).read_ids(committed, 60)
        assert_per_key_order(messages)
        assert tier.proc.poll() is None, "the tier stopped"
        assert tier.stop() == 0
    finally:
        proxy.close()


# ---- worker deaths during a database outage ---------------------------------------------------------------


def test_six_worker_deaths_during_a_40s_database_outage_leave_the_tier_running(
        private_pg, broker, topic, tmp_path, run_tier, topic_reader):
    db_url = private_pg.outbox_url
    env = tier_env(db_url, broker.bootstrap, tmp_path, OUTBOX_WORKERS="2")
    liveness = env["OUTBOX_LIVENESS_FILE"]
    tier = started_tier(run_tier, env, db_url, topic)
    before = commit_events(db_url, topic, 50, keys=10, phase="before")
    wait_published(db_url, before, 30, "the first 50 published")
    just_before = commit_events(db_url, topic, 20, keys=10, phase="just-before")

    def spawned(slot: int, pid: int) -> dict:
        return next(line for line in tier.logs()
                    if line.get("event") == "worker spawned" and line["slot"] == slot and line["workerPid"] == pid)

    def alive_and_beating(slot: int, pid: int) -> bool:
        """The worker heart-beats (the supervisor touched the liveness file after spawning it)."""
        with contextlib.suppress(FileNotFoundError):
            return os.stat(liveness).st_mtime > ts(spawned(slot, pid))
        return False

    def exited() -> str | None:
        if tier.proc.poll() is None:
            return None
        fatal = [line.get("msg") for line in tier.logs() if line.get("level") in ("ERROR", "CRITICAL")][-3:]
        return f"the tier exited with code {tier.proc.returncode}: {fatal}"

    def respawn_failures() -> str:
        crashed = [line for line in tier.logs()[lines_before:]
                   if line.get("event") in ("worker exited", "worker crashed", "boot failed")
                   and line.get("exitCode") != -9]
        last = [{k: line.get(k) for k in ("event", "msg", "slot", "exitCode")}
                | {"error": (line.get("exception") or "").strip().splitlines()[-1:]} for line in crashed[-2:]]
        return f"{len(crashed)} worker exits or crashes since the outage began, the last: {last}"

    lines_before = len(tier.logs())
    private_pg.stop_server()
    outage_started = time.monotonic()
    for kill in range(6):
        slot = kill % 2
        pid = tier.worker_pids()[slot]
        try:
            wait_for(lambda s=slot, p=pid: exited() or alive_and_beating(s, p), 35,
                     f"worker {slot} (pid {pid}) heart-beating before kill {kill + 1}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {respawn_failures()}") from None
        assert exited() is None, f"{exited()} (during the outage, after {kill} kills)"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda s=slot, p=pid: exited() or tier.worker_pids().get(s) not in (None, p), 20,
                 f"worker {slot} respawned after kill {kill + 1}")
        assert exited() is None, f"{exited()} (during the outage, after {kill + 1} kills)"
    # The fault itself: the database stays down 40 s in all.
    threading.Event().wait(max(0.0, 40 - (time.monotonic() - outage_started)))
    for slot, pid in tier.worker_pids().items():
        wait_for(lambda s=slot, p=pid: exited() or alive_and_beating(s, p), 35, f"worker {slot} heart-beating")
    assert exited() is None, f"{exited()} (at the end of the outage)"
    private_pg.start_server()

    after = commit_events(db_url, topic, 30, keys=10, phase="after")
    wait_all_published(db_url, 1 + 50 + 20 + 30, 45, "every event committed before and after the outage published")
    messages = topic_reader(topic).read_ids(before + just_before + after, 30)
    assert_per_key_order(messages)
    kills = [line for line in tier.logs() if line.get("event") == "worker exited" and line.get("exitCode") == -9]
    assert len(kills) == 6, kills
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0
