"""Least privilege (README, "Database roles"): an owner runs `migrate`, the tier runs as a role given
`kaireon-pub grants --for runtime`, `status`/`check`/KEDA as one given `--for readonly`; and the
tier's sessions are told from others by their role as well as by their name.

Every statement of queries.sql the tier sends runs here as the runtime role (a statement added
later fails the coverage assertion until it is run here too); the read-only role runs every query
of the operator tools but the one that writes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import psycopg.errors
import pytest

from kaireon_pub.db import migrate, partitions
from kaireon_pub.db.queries import QUERIES, Q, int_array, load
from kaireon_pub.ops import status as ops_status
from kaireon_pub.ops.check import _check_horizon as check_horizon
from kaireon_pub.ops.check_report import Report
from kaireon_pub.ops.sql import OPS
from kaireon_pub.settings import Settings
from tests.roles import Roles

# The application's statements (enqueue), not the tier's; and the fragments other statements include.
NOT_THE_TIERS = {"enqueue_one", "enqueue_many"}
FRAGMENTS = {"horizon_transactions", "horizon_judged", "horizon_bypassed", "horizon_columns", "foreign_rows_restamp",
             "claim_mark_processing", "claim_cursors", "claim_processing_look", "claim_shard_scan", "retry_set",
             "landed_set"}
WRITES = {"requeue_failed"}


@pytest.fixture
def roles(pg) -> Iterator[Roles]:
    with Roles(pg).create() as made:
        yield made


def events(roles: Roles, n: int, *, keys: int = 3) -> None:
    """`n` events written as the application would (here: the owner), committed."""
    with psycopg.connect(roles.url(roles.owner), autocommit=True) as conn:
        conn.execute("INSERT INTO outbox_events (topic, partition_key, payload) "
                     "SELECT 't', 'k' || (g %% %s), '{}' FROM generate_series(1, %s) g", (keys, n))


def params(worker: uuid.UUID, **more: object) -> dict[str, object]:
    """One superset of the parameters of the tier's statements (psycopg ignores the unused ones)."""
    return {"worker_id": worker, "hostname": "h", "pid": 1, "slot": 0, "ttl": 60, "n": 256,
            "max_wait_ms": 60_000, "remembered": [], "pass_over": [], "relaxed": False, "batch": 100,
            "staleness": 300, "max_attempts": 5, "backoff_base_ms": 100, "backoff_max_ms": 1000,
            "worker_ids": [uuid.uuid4()], "source": "test", "reset_count": 0, "duration_ms": 1,
            "cap": 1000, "retention": 0, "busy_shards": "{}", "busy_keys": [], "busy_xids": "{}",
            "busy_ids": "{}", **more}


def test_the_runtime_role_runs_every_statement_the_tier_sends(roles):
    events(roles, 12)
    worker = uuid.uuid4()
    ran: set[str] = set()
    with psycopg.connect(roles.url(roles.runtime), autocommit=True,
                         application_name=f"kaireon-pub:worker-0.{worker.hex[:8]}") as conn:
        assert migrate.require_current(conn) == migrate.expected_version()

        def run(name: str, **more: object) -> list[tuple]:
            ran.add(name)
            cur = conn.execute(getattr(Q, name), params(worker, **more))
            return cur.fetchall() if cur.description else []

        run("register_worker")
        run("notify_leases")
        run("lease_census")
        leases = dict(run("acquire_leases"))
        assert len(leases) == 256
        run("renew_leases")
        run("restamp_foreign_rows")
        run("foreign_rows_count")
        run("horizon_holders")
        horizon = str(run("claim_horizon")[0][0])
        shards = sorted(leases)
        run("claim_horizon_foreign", shards=int_array(shards))
        run("restamp_shards_foreign_rows", shards=int_array(shards))
        claim = {"shards": int_array(shards), "epochs": int_array(leases[s] for s in shards),
                 "cursor_xids": ["0"] * 256, "cursor_ids": int_array([0] * 256), "horizon": horizon}

        token = uuid.uuid4()
        ids = [r[0] for r in run("claim_batch", **claim, token=token, batch=4) if r[1] is not None]
        assert ids, "the runtime role claims"
        run("mark_published", ids=int_array(ids[:1]), partitions="{0}", offsets="{0}", token=token)
        run("mark_retry", ids=int_array(ids[1:2]), errors=["x"], permanent=[True], token=token)
        run("release_claimed", ids=int_array(ids[2:]), token=token)
        token = uuid.uuid4()
        ids = [r[0] for r in run("claim_careful_batch", **claim, token=token, batch=2) if r[1] is not None]
        with conn.transaction():  # delete-on-publish: its own transaction, whose id is read before the commit
            run("delete_published", ids=int_array(ids), token=token)
            [(delete_xact,)] = run("current_xact")
        assert run("xact_status", xact=delete_xact) == [("committed",)]

        with conn.transaction():  # lock mode: the claim is the open transaction's row locks
            ids = [r[0] for r in run("claim_locked_batch", **claim, batch=3) if r[1] is not None]
            assert ids
            xact = run("mark_published_locked", ids=int_array(ids[:1]), partitions="{0}", offsets="{1}")[0][1]
            run("mark_retry_locked", ids=int_array(ids[1:2]), errors=["x"], permanent=[False])
            run("delete_published_locked", ids=int_array(ids[2:]))
        with conn.transaction():
            run("claim_careful_locked_batch", **claim, batch=3)
        # Lock mode, a batch whose marks rolled back or whose commit's reply was lost.
        assert run("xact_status", xact=xact) == [("committed",)]
        run("mark_published_again", ids=int_array(ids[:1]), partitions="{0}", offsets="{NULL}")
        run("mark_retry_again", ids=int_array(ids[1:2]), errors=["x"], permanent=[False], attempts=[0])
        run("delete_published_again", ids=int_array(ids[2:]))
        # A claim cut off from its client: is its session still there?
        assert run("sessions_alive", pids=[conn.info.backend_pid]) == [(conn.info.backend_pid,)]

        run("reset_shard_claims", shards=int_array(shards))
        run("reset_own_claims")
        run("reset_worker_claims")
        run("terminate_frozen_owners")
        run("reap_stale")
        run("record_reaper_run")
        run("notify_rescan")
        run("pending_count")
        run("pending_estimate")
        # The continuous auditor's statements (auditor.sql; worker/auditor.py, OUTBOX_AUDIT_SAMPLE_PER_MINUTE).
        sampled = [conn.execute(text, {"n": 2, "scan": 64, "shards": int_array(shards), "window": 3600, "at": 0.5,
                                         "settle": 0})
                   .fetchall() for text in vars(load("auditor.sql")).values()]
        assert sampled[0], "the auditor's sample finds the row published at (0, 0) above (before the purge)"
        fresh = {"n": 2, "scan": 64, "shards": int_array(shards), "window": 3600, "at": 0.5, "settle": 60}
        assert not conn.execute(load("auditor.sql").audit_sample, fresh).fetchall(), \
            "a row published in the last `settle` seconds is not sampled"
        run("purge_published")
        run("release_leases", shards=int_array(shards))
        run("forget_dead_workers")
        run("unregister_worker")
        # The dead-letter sweep's statements (worker/deadletter.py), on the row mark_retry failed above.
        dead_letters = load("deadletter.sql")
        sweep = {"shards": int_array(shards), "limit": 10, "lookback_s": 300, "after_at": None, "after_id": 0}
        due = conn.execute(dead_letters.dead_letter_due, sweep).fetchall()
        assert due and due == conn.execute(dead_letters.dead_letter_due_recent, sweep).fetchall()
        past = {**sweep, "after_at": due[-1][14], "after_id": due[-1][0]}  # the keyset cursor walks past them
        assert conn.execute(dead_letters.dead_letter_due, past).fetchall() == []
        assert conn.execute(dead_letters.dead_letter_due_recent, past).fetchall() == []
        assert conn.execute(dead_letters.mark_dead_lettered, {"ids": int_array([due[0][0]])}).fetchall()
        assert {"dead_letter_due", "dead_letter_due_recent", "mark_dead_lettered", "dead_letter_columns"} == set(
            vars(dead_letters)), "a statement added to deadletter.sql is run here too"
        # `requeue` runs as the tier's role too.
        assert conn.execute(OPS.requeue_failed, {"ids": None, "topic": None, "error_contains": None}).fetchall()
        assert conn.execute("SELECT dead_lettered_at FROM outbox_events WHERE id = %s", (due[0][0],)).fetchone() == (
            None,), "requeue clears dead_lettered_at: failed again, the event is dead-lettered again"

    assert ran == set(QUERIES) - NOT_THE_TIERS - FRAGMENTS


def test_the_runtime_role_cannot_drop_alter_or_fill_the_outbox(roles):
    with psycopg.connect(roles.url(roles.runtime), autocommit=True) as conn:
        for statement in ("DROP TABLE outbox_events",
                          "ALTER TABLE outbox_events ADD COLUMN x int",
                          "ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_headers_is_object",
                          "TRUNCATE outbox_events",
                          "DROP TABLE outbox_shard_leases",
                          "DELETE FROM outbox_shard_leases",
                          "INSERT INTO outbox_events (topic, payload) VALUES ('t', '{}')",
                          "DELETE FROM kaireon_schema_migrations",
                          "CREATE TABLE outbox_events_copy (n int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    with roles.admin() as admin:
        assert admin.execute("SELECT count(*) FROM outbox_shard_leases").fetchone()[0] == 256
        assert admin.execute("SELECT to_regclass('outbox_events_copy')").fetchone()[0] is None


def test_the_runtime_role_runs_every_statement_of_replay(roles):
    """`kaireon-pub replay` runs as the tier's role (db/replay.sql); the read-only role may read its runs."""
    from kaireon_pub.ops.replay import R

    events(roles, 4)
    with roles.admin() as admin:
        admin.execute("UPDATE outbox_events SET status = 'published', published_at = clock_timestamp()")
    ran: set[str] = set()
    with psycopg.connect(roles.url(roles.runtime), autocommit=True) as conn:
        def run(name: str, **given: object) -> list[tuple]:
            ran.add(name)
            cur = conn.execute(getattr(R, name), given)
            return cur.fetchall() if cur.description else []

        [(now,)] = run("replay_now")
        where = {"keys": ["k1"], "id_from": 1, "id_to": None, "since": None, "until": now, "topics": ["t"],
                 "cursor_xid": "0", "cursor_id": 0}
        assert run("replay_count", **where, show=5)[0][0] > 0
        rows = run("replay_rows", **where)
        [(run_id, db_user)] = run("replay_start", operator="op", host="h", selection='{"keys": ["k1"]}',
                                  to_topic=None, rate=500.0, selected=len(rows), holder="h:1", hold=30)
        assert db_user == roles.runtime
        assert run("replay_take", run_id=run_id, holder="h:2", hold=30, stale_holder="h:1") == [(run_id,)]
        run("replay_positions", ids=[rows[0][0]], partitions=[0], offsets=[7])
        assert run("replay_advance", run_id=run_id, holder="h:2", hold=30, cursor_xid=str(rows[0][8]),
                   cursor_id=rows[0][0], published=1, skipped=0) == [(run_id,)]
        run("replay_end", run_id=run_id, holder="h:2", state="finished", error=None)
        assert run("replay_get", run_id=run_id)[0][11] == "finished"
    assert ran == set(vars(R)) - {"replay_where"}
    with psycopg.connect(roles.url(roles.readonly), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_replay_runs").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(R.replay_end, {"run_id": 1, "holder": "h:2", "state": "failed", "error": None})


def ops_params() -> dict[str, object]:
    return {"cap": 1000, "shards": [0, 1], "sample": 100, "groups": 10, "limit": 10, "ids": None,
            "topic": None, "error_contains": None, "show": 5, "tables": ["outbox_events"]}


def test_the_readonly_role_reads_what_status_check_and_keda_read_and_writes_nothing(roles):
    events(roles, 5)
    settings = Settings.from_env({"DATABASE_URL": roles.url(roles.readonly)}, need_kafka=False)
    with psycopg.connect(roles.url(roles.readonly), autocommit=True) as conn:
        for name, text in vars(OPS).items():
            if name not in WRITES:
                conn.execute(text, ops_params()).fetchall()
        doc = ops_status.collect(conn, settings.horizon_max_wait_ms)
        assert doc["backlog"]["pending"]["count"] == 5
        assert ops_status.partition_summary(conn, settings) is None
        conn.execute(Q.horizon_holders, {"max_wait_ms": 1000, "pass_over": []}).fetchall()
        assert conn.execute("SELECT count(*) FROM (SELECT 1 FROM outbox_events WHERE status = 'pending' "
                            "LIMIT 1000) AS pending").fetchone()[0] == 5  # the KEDA trigger's query
        conn.execute("SELECT * FROM outbox_events_json").fetchall()
        for statement in ("UPDATE outbox_events SET status = 'failed'", "DELETE FROM outbox_events",
                          "INSERT INTO outbox_events (topic, payload) VALUES ('t', '{}')",
                          "UPDATE outbox_shard_leases SET owner = NULL", "DELETE FROM outbox_workers",
                          "INSERT INTO outbox_reaper_runs (source, reset_count, duration_ms) VALUES ('x', 0, 0)",
                          "SELECT * FROM outbox_events FOR UPDATE", "DROP TABLE outbox_events"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(OPS.requeue_failed, ops_params())
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(Q.reap_stale, {"staleness": 0})
    assert ops_status.run(settings, as_json=True, echo=lambda _: None) == 0


class _NoBroker:
    """A RecordReader whose broker knows no topic (the statements are the subject here)."""

    def __enter__(self) -> _NoBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def partitions(self, topic: str) -> None:
        return None


def test_locate_and_audit_read_as_the_readonly_role(roles):
    from kaireon_pub.audit.sql import AUDIT
    from kaireon_pub.ops import audit as ops_audit
    from kaireon_pub.ops import locate as ops_locate

    events(roles, 4)
    with roles.admin() as admin:
        admin.execute("UPDATE outbox_events SET status = 'published', published_at = clock_timestamp(), "
                      "published_partition = 0, published_offset = id WHERE id <= 3")
    with psycopg.connect(roles.url(roles.readonly), autocommit=True) as conn:
        params = {"id": 1, "since": None, "until": None, "topic": None}
        for name, text in vars(AUDIT).items():
            if name not in {"audit_row_columns", "audit_window"}:  # fragments, included by the others
                conn.execute(text, params).fetchall()
        tally = ops_audit.audit(conn, _NoBroker(), ops_audit.Window())  # type: ignore[arg-type]
        assert (tally.rows, tally.counts["missing"], tally.unverifiable) == (3, 3, 0)
        assert ops_locate.locate(conn, _NoBroker, 2)[0] == ops_locate.MISSING  # type: ignore[arg-type]
        assert ops_locate.locate(conn, _NoBroker, 4)[0] == ops_locate.NOT_PUBLISHED  # type: ignore[arg-type]


def test_the_grants_are_idempotent_and_leave_pg_read_all_stats_out_on_request(pg):
    with Roles(pg).create(migrate_schema=False) as roles:
        with psycopg.connect(roles.url(roles.owner), autocommit=True) as conn:
            migrate.migrate(conn)
        roles.grant(read_all_stats=False)
        roles.grant(read_all_stats=False)
        with roles.admin() as admin:
            def members() -> set[str]:
                return {r[0] for r in admin.execute(
                    "SELECT m.rolname FROM pg_auth_members a JOIN pg_roles m ON m.oid = a.member "
                    "WHERE a.roleid = 'pg_read_all_stats'::regrole")}
            assert not members() & {roles.runtime, roles.readonly}
            roles.grant()
            assert members() >= {roles.runtime, roles.readonly}


def test_partition_maintenance_is_the_owners_job_and_readonly_reads_the_partitions_it_makes(pg):
    """The runtime role cannot make or drop partitions (that needs the parent's ownership):
    `kaireon-pub partitions maintain` runs as the owner (README, "Database roles"); the partitions
    the owner makes after the grants are readable by the read-only role (default privileges)."""
    with Roles(pg, partitioning="hourly").create() as roles:
        with psycopg.connect(roles.url(roles.runtime), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                partitions.create_ahead(conn, "hourly", ahead=8)
            made = partitions.list_partitions(conn)
        with psycopg.connect(roles.url(roles.owner), autocommit=True) as conn:
            report = partitions.maintain(conn, interval="hourly", retention_seconds=3600,
                                         failed_retention_seconds=0, ahead=8)
        assert len(report.created) == 2 and not report.errors
        events(roles, 4)
        with psycopg.connect(roles.url(roles.readonly), autocommit=True) as conn:
            for name in [p.name for p in made] + report.created:
                assert partitions.state(conn, name).pending in (True, False)
        with psycopg.connect(roles.url(roles.runtime), autocommit=True) as conn:  # the claim reads the parent
            assert conn.execute(Q.pending_count, {"cap": 100}).fetchone()[0] == 4


# ---- the tier's sessions: its role as well as its name ---------------------------------------


def impostor(roles: Roles, name: str) -> psycopg.Connection:
    """A session of another role (the owner's here) that names itself like one of the tier's."""
    return psycopg.connect(roles.url(roles.owner), application_name=name)


def horizon_of(conn: psycopg.Connection) -> int:
    # A later transaction ends first: an xid at or past the snapshot's xmax is no holder at all.
    with psycopg.connect(conn.info.dsn, autocommit=True) as later:
        later.execute("SELECT pg_current_xact_id()")
    return conn.execute(Q.claim_horizon, {"max_wait_ms": 60_000, "remembered": [], "pass_over": []}).fetchone()[0]


@pytest.mark.parametrize("tier_role", ["runtime", "superuser"])
def test_a_session_that_only_names_itself_like_a_worker_still_holds_the_horizon(roles, tier_role):
    role = roles.runtime if tier_role == "runtime" else None
    worker = f"kaireon-pub:worker-0.{uuid.uuid4().hex[:8]}"
    with psycopg.connect(roles.url(role), autocommit=True, application_name=worker) as tier:
        with impostor(roles, "kaireon-pub:worker-1.0badc0de") as other:
            xid = other.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
            assert horizon_of(tier) == xid  # waited for: it may still insert an outbox row
            holders = tier.execute(Q.horizon_holders, {"max_wait_ms": 60_000, "pass_over": []}).fetchall()
            assert [h[3] for h in holders] == ["kaireon-pub:worker-1.0badc0de"]
            other.rollback()
        # A session of the tier's own role with a worker's name is not waited for (it never inserts).
        with psycopg.connect(roles.url(role), application_name="kaireon-pub:worker-1.0badc0de") as own:
            xid = own.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
            assert horizon_of(tier) > xid
            own.rollback()


def test_status_and_check_as_another_role_do_not_take_the_workers_for_holders(roles):
    """`status` and `check` run as the read-only role (or the owner): a transaction of a registered
    worker's session (the runtime role) holds nothing for them either, while a session of another
    role named like a worker still does, even one that copies a live worker's name."""
    worker = uuid.uuid4()
    name = f"kaireon-pub:worker-0.{worker.hex[:8]}"
    with psycopg.connect(roles.url(roles.runtime), autocommit=True, application_name=name) as tier:
        tier.execute(Q.register_worker, params(worker))
        with (psycopg.connect(roles.url(roles.runtime), application_name=name) as busy,
              impostor(roles, "kaireon-pub:worker-1.0badc0de") as other,
              psycopg.connect(roles.url(roles.readonly), application_name=name) as copycat):
            for conn in (busy, other, copycat):  # an xid each, open
                conn.execute("SELECT pg_current_xact_id()")
            tier.execute("SELECT pg_current_xact_id()")  # a later one ends: theirs are below the snapshot's xmax
            expected = sorted(["kaireon-pub:worker-1.0badc0de", name])  # the owner's and the read-only role's
            for role in (roles.readonly, roles.owner, roles.runtime):
                with psycopg.connect(roles.url(role), autocommit=True) as conn:
                    held = ops_status.horizon_holders(conn, 60_000)["heldBy"]
                    assert sorted(h["application"] for h in held) == expected, role
                    assert {h["pid"] for h in held} == {other.info.backend_pid, copycat.info.backend_pid}, role
                    report = Report()
                    check_horizon(report, conn, 60_000)
                    assert f"pid {busy.info.backend_pid} " not in report.results[0].detail, role
            # The worker's own horizon: unchanged (its own role's worker-named session is not waited for).
            assert horizon_of(tier) == min(int(c.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
                                           for c in (other, copycat))
            for conn in (busy, other, copycat):
                conn.rollback()


def frozen_owner(roles: Roles) -> uuid.UUID:
    """An owner whose leases and registration have expired: the terminate query's target."""
    owner = uuid.uuid4()
    with roles.admin() as admin:
        admin.execute("UPDATE outbox_shard_leases SET owner = %s, expires_at = now() - interval '1 minute' "
                      "WHERE shard < 4", (owner,))
        admin.execute("INSERT INTO outbox_workers (worker_id, hostname, pid, slot, expires_at) "
                      "VALUES (%s, 'h', 1, 0, now() - interval '1 minute')", (owner,))
    return owner


def holding_lease_locks(conn: psycopg.Connection) -> None:
    conn.execute("SELECT shard FROM outbox_shard_leases WHERE shard < 4 FOR KEY SHARE").fetchall()


@pytest.mark.parametrize("tier_role", ["runtime", "superuser"])
def test_the_tier_ends_only_its_own_roles_sessions(roles, tier_role):
    """A session of another role with a frozen worker's name and lease locks is left alone; the
    frozen worker's own session (the tier's role) is ended."""
    role = roles.runtime if tier_role == "runtime" else None
    owner = frozen_owner(roles)
    name = f"kaireon-pub:worker-0.{owner.hex[:8]}"
    peer = uuid.uuid4()
    with impostor(roles, name) as other, psycopg.connect(roles.url(role), autocommit=True) as tier:
        holding_lease_locks(other)
        assert tier.execute(Q.terminate_frozen_owners, {"worker_id": peer}).fetchall() == []
        assert other.execute("SELECT 1").fetchone() == (1,)  # still there, its transaction open
        other.rollback()
        with psycopg.connect(roles.url(role), application_name=name) as frozen:
            holding_lease_locks(frozen)
            ended = tier.execute(Q.terminate_frozen_owners, {"worker_id": peer}).fetchall()
            assert [(n, t) for _, n, t in ended] == [(name, True)]
            with pytest.raises(psycopg.OperationalError):
                frozen.execute("SELECT 1")

