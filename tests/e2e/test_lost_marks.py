"""Marks and claims whose session goes away at the wrong moment (issue 25, cases 2 and 4), and a
failing tick's back-off under enqueue notifications (case 6).

Lock mode: the worker's session is ended (`pg_terminate_backend`) after the batch was delivered
and before its marks committed; the marks roll back with the claiming transaction. Status mode:
the tier's connection to PostgreSQL (through a TCP proxy) is cut while the server still runs a
claim, which commits afterwards under a token the worker never heard back about.

The windows are made wide and certain from the database side, as a slow server would make them:
a statement trigger that waits on an advisory lock the test holds, for the marks (case 2) or the
claim (case 4) only. The proof is what a user sees: every event on the topic, no more copies than
the tier counted (`kaireon_outbox_unconfirmed_total` + `kaireon_outbox_lease_lost_total`), no row
left `processing` or `pending`, the tier running.
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import datetime

import psycopg
import pytest
from psycopg import sql

from tests import helpers
from tests.faults import database_proxy
from tests.helpers import (
    commit_events,
    event_ids,
    metric_value,
    row_summary,
    status_counts,
    tier_env,
    wait_for,
)

GATE = 4242  # the advisory lock the test holds while the worker's statement waits on it
IN_TURN = 4243  # case 4: claims wait on each other here, so the one cut off is the one that takes the rows


def install_gate(db: psycopg.Connection, op: str, statement_marker: str, *, in_turn: bool = False) -> None:
    """A BEFORE `op` statement trigger on outbox_events that waits while the test holds GATE, for
    the statements whose text contains `statement_marker` only."""
    in_turn_sql = f"PERFORM pg_advisory_xact_lock({IN_TURN});" if in_turn else ""
    db.execute(f"""
        CREATE FUNCTION test_gate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF strpos(current_query(), {sql.Literal(statement_marker).as_string(db)}) > 0 THEN
                {in_turn_sql}
                PERFORM pg_advisory_xact_lock_shared({GATE});
            END IF;
            RETURN NULL;
        END $$""")
    db.execute(f"CREATE TRIGGER test_gate BEFORE {op} ON outbox_events "
               "FOR EACH STATEMENT EXECUTE FUNCTION test_gate()")


def waiting_on_gate(db: psycopg.Connection) -> list[int]:
    """The backends waiting on an advisory lock: the tier's statements the gate holds (the test's
    own sessions never wait on one)."""
    return [r[0] for r in db.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' "
        "AND datname = current_database() AND pid <> pg_backend_pid()")]


def counted_copies(port: int) -> float:
    return sum(metric_value(port, name) or 0.0
               for name in ("kaireon_outbox_unconfirmed_total", "kaireon_outbox_lease_lost_total"))


def started(tier: helpers.Tier, db_url: str, topic: str) -> None:
    warm = commit_events(db_url, topic, 1, keys=1, phase="warm-up", key_prefix="warm-")
    try:
        wait_for(lambda: status_counts(db_url).get("published") == 1 or not status_counts(db_url), 30,
                 "the warm-up event published")
    except AssertionError:
        errors = [line for line in tier.logs() if line.get("level") in ("ERROR", "CRITICAL")][:3]
        raise AssertionError(f"the tier did not start publishing (exit {tier.proc.poll()}): {errors}") from None
    assert warm


# ---- case 2: lock mode, the session ends between delivery and commit ------------------------------------


@pytest.mark.parametrize("delete_on_publish", [False, True], ids=["mark", "delete"])
def test_lock_mode_batch_whose_marks_are_lost_is_settled_not_published_again(
        db_url, topic, start_tier, topic_reader, delete_on_publish):
    # A full rescan every 3 s: rows left pending behind the cursor would be published again within
    # the test's wait, and their copies seen on the topic.
    tier = start_tier(OUTBOX_CLAIM_MODE="lock", OUTBOX_RESCAN_INTERVAL_MS="3000",
                      OUTBOX_DELETE_ON_PUBLISH="true" if delete_on_publish else "false")
    started(tier, db_url, topic)
    port = tier.http_port()
    marker = "DELETE FROM outbox_events WHERE id = ANY" if delete_on_publish else "SET status = 'published'"
    with (psycopg.connect(db_url, autocommit=True) as db, psycopg.connect(db_url, autocommit=True) as holder):
        install_gate(db, "DELETE" if delete_on_publish else "UPDATE", marker)
        holder.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        ids = commit_events(db_url, topic, 20, keys=5, phase="lost-marks")
        reader = topic_reader(topic)
        # Delivered: every event is on the topic while the marks wait, inside the claiming transaction.
        reader.read_ids(ids, 30)
        pids = wait_for(lambda: waiting_on_gate(db), 10, "the batch's marks waiting in its transaction")
        assert db.execute("SELECT pg_terminate_backend(%s)", (pids[0],)).fetchone()[0]
        holder.execute("SELECT pg_advisory_unlock(%s)", (GATE,))

        def settled() -> bool:
            counts = status_counts(db_url)
            return counts == {} if delete_on_publish else counts == {"published": 21}
        try:
            wait_for(settled, 10, "the batch settled after its session ended")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; rows: {row_summary(db_url)}") from None
        # Long enough for a full rescan (3 s) to have published any row left pending again.
        messages = reader.read_ids(ids, 30, extra=4.0)
    copies = len([i for i in event_ids(messages) if i in set(ids)]) - len(ids)
    counted = counted_copies(port)
    assert copies <= counted, f"{copies} copies on the topic, {counted} counted"
    line = tier.wait_log(lambda e: e.get("event") == "settle retry", 5, "the batch settled again")
    assert line["events"] == 20
    assert tier.proc.poll() is None, "the tier stopped"
    assert tier.stop() == 0


DELETE_MARKER = "DELETE FROM outbox_events\n"  # delete_published only (not the lock-mode deletes, nor the purge)


# How a batch commits, where its commit's reply is dropped: the statement the gate holds (operation,
# text), the tier's settings, what the table holds once the commit landed, the gate's wait message.
COMMIT_REPLY_CASES = {
    # Lock mode: the marks run in the claiming transaction.
    "lock": ("UPDATE", "SET status = 'published'", {"OUTBOX_CLAIM_MODE": "lock"}, {"published": 21},
             "the batch's marks waiting in its transaction"),
    # Delete-on-publish (status mode): the deleted rows keep no token to find again; the delete runs
    # in a transaction of its own, whose id the worker read before the commit.
    "delete": ("DELETE", DELETE_MARKER, {"OUTBOX_DELETE_ON_PUBLISH": "true"}, {},
               "the batch's delete waiting on the server"),
}


@pytest.mark.parametrize("case", sorted(COMMIT_REPLY_CASES))
def test_a_batch_whose_commit_reply_was_lost_counts_no_lease_lost(
        case, db_url, broker, topic, tmp_path, run_tier, topic_reader):
    # The commit lands on the server and its reply is lost: the batch is settled (its transaction
    # committed, as the server says), neither published again nor counted as may be duplicated.
    operation, marker, settings, landed, waiting = COMMIT_REPLY_CASES[case]
    routed = helpers.pooled(db_url)
    proxy, proxied_url = database_proxy(routed.pop("DATABASE_URL", db_url))
    try:
        # Lease renewals (their own COMMITs) every 20 s: none falls in the moment the gate opens.
        env = tier_env(proxied_url, broker.bootstrap, tmp_path, OUTBOX_LEASE_TTL_SECONDS="60", **settings, **routed)
        tier = run_tier(env)
        started(tier, db_url, topic)
        helpers.wait_balanced(db_url, 1)  # the keeper's first rounds (and their COMMITs) are over
        port = tier.http_port()
        with (psycopg.connect(db_url, autocommit=True) as db, psycopg.connect(db_url, autocommit=True) as holder):
            install_gate(db, operation, marker)
            holder.execute("SELECT pg_advisory_lock(%s)", (GATE,))
            ids = commit_events(db_url, topic, 20, keys=5, phase=f"lost-{case}-commit-reply")
            wait_for(lambda: waiting_on_gate(db), 10, waiting)
            proxy.drop_replies_after(b"COMMIT")
            holder.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            wait_for(proxy.triggered.is_set, 10, "the batch's commit, its reply dropped")
            wait_for(lambda: status_counts(db_url) == landed, 10, "the commit landed on the server")
            proxy.set_mode("reset")
            proxy.set_mode("pass")
            line = tier.wait_log(lambda e: e.get("event") == "settle retry", 20, "the batch settled again")
            assert line["events"] == 20
        # Settled (its first try may meet a connection the reset broke): counted published, or lost.
        wait_for(lambda: (metric_value(port, "kaireon_outbox_processed_total", {"outcome": "published"}) or 0)
                 + (metric_value(port, "kaireon_outbox_lease_lost_total") or 0) >= 21, 20, "the batch counted")
        messages = topic_reader(topic).read_ids(ids, 30, extra=1.0)
        assert len([i for i in event_ids(messages) if i in set(ids)]) == len(ids)
        assert (metric_value(port, "kaireon_outbox_lease_lost_total") or 0) == 0
        assert not [e for e in tier.logs() if e.get("event") == "lease lost"]
        assert metric_value(port, "kaireon_outbox_processed_total", {"outcome": "published"}) == 21
        assert tier.proc.poll() is None, "the tier stopped"
        assert tier.stop() == 0
    finally:
        proxy.close()


# ---- case 4: the claim commits after the worker's connection broke ------------------------------------------


CLAIM_MARKER = "SET status = 'processing'"


def test_a_claim_that_commits_after_its_connection_broke_leaves_no_row_in_processing(
        db_url, broker, topic, tmp_path, run_tier, topic_reader):
    # Through PgBouncer (KAIREON_TEST_VIA_PGBOUNCER), the proxy stands between the tier and PgBouncer.
    routed = helpers.pooled(db_url)
    proxy, proxied_url = database_proxy(routed.pop("DATABASE_URL", db_url))
    try:
        # Far from the reaper and from a full rescan: only the worker itself can return those rows.
        env = tier_env(proxied_url, broker.bootstrap, tmp_path, OUTBOX_REAPER_STALENESS_SECONDS="600",
                       OUTBOX_RESCAN_INTERVAL_MS="600000", OUTBOX_LEASE_TTL_SECONDS="30", **routed)
        tier = run_tier(env)
        started(tier, db_url, topic)
        port = tier.http_port()
        worker = tier.worker_pids()[0]
        with (psycopg.connect(db_url, autocommit=True) as db, psycopg.connect(db_url, autocommit=True) as holder):
            install_gate(db, "UPDATE", CLAIM_MARKER, in_turn=True)
            # The events committed while the worker cannot send a claim: its next claim sees them all.
            os.kill(worker, signal.SIGSTOP)
            try:
                wait_for(lambda: not db.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'kaireon-pub:worker-%%' "
                    "AND state = 'active'").fetchall(), 10, "no statement of the worker running")
                ids = commit_events(db_url, topic, 20, keys=5, phase="orphaned-claim")
                holder.execute("SELECT pg_advisory_lock(%s)", (GATE,))
            finally:
                os.kill(worker, signal.SIGCONT)
            orphan = wait_for(lambda: waiting_on_gate(db), 10, "the claim waiting on the server")
            # Cut: the worker's connections are reset; the server goes on with the claim.
            proxy.set_mode("reset")
            proxy.set_mode("pass")
            # The worker reconnects, resets its orphaned claims (nothing yet) and claims again: the
            # new claim waits behind the one cut off.
            wait_for(lambda: set(waiting_on_gate(db)) - set(orphan), 20, "the worker claiming again after its reset")
            holder.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            wait_for(lambda: db.execute("SELECT count(*) FROM outbox_events WHERE status = 'processing'")
                     .fetchone()[0] or status_counts(db_url) == {"published": 21}, 10,
                     "the claim cut off committed on the server")
            try:
                wait_for(lambda: status_counts(db_url) == {"published": 21}, 15,
                         "the rows of the claim cut off published")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; rows: {row_summary(db_url)}") from None
        messages = topic_reader(topic).read_ids(ids, 30, extra=1.0)
        copies = len([i for i in event_ids(messages) if i in set(ids)]) - len(ids)
        assert copies <= counted_copies(port)
        assert tier.proc.poll() is None, "the tier stopped"
        assert tier.stop() == 0
    finally:
        proxy.close()


# ---- case 6: a status-mode mark whose reply was lost -----------------------------------------------------


def delete_ran(db_url: str) -> bool:
    """The batch's delete done on the server: its transaction open, waiting for the commit the
    worker never sends (its reply lost), or, were it a transaction of its own, committed."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        return status_counts(db_url) == {} or bool(conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'idle in transaction' AND strpos(query, %s) > 0",
            (DELETE_MARKER,)).fetchall())


@pytest.mark.parametrize("delete_on_publish", [False, True], ids=["mark", "delete"])
def test_a_mark_whose_reply_was_lost_is_settled_again_without_counting_a_lost_lease(
        db_url, broker, topic, tmp_path, run_tier, topic_reader, delete_on_publish):
    routed = helpers.pooled(db_url)
    proxy, proxied_url = database_proxy(routed.pop("DATABASE_URL", db_url))
    try:
        env = tier_env(proxied_url, broker.bootstrap, tmp_path,
                       OUTBOX_DELETE_ON_PUBLISH="true" if delete_on_publish else "false", **routed)
        tier = run_tier(env)
        started(tier, db_url, topic)
        port = tier.http_port()
        # The mark reaches the server and commits; its reply never comes back. The delete, a row
        # it could not find again, reaches the server in a transaction of its own: its reply lost,
        # no commit follows.
        proxy.drop_replies_after(DELETE_MARKER.encode() if delete_on_publish else b"SET status = 'published'")
        ids = commit_events(db_url, topic, 20, keys=5, phase="lost-mark-reply")
        wait_for(proxy.triggered.is_set, 10, "the batch's mark, its reply dropped")
        if delete_on_publish:
            wait_for(lambda: delete_ran(db_url), 10, "the delete ran on the server")
        else:
            wait_for(lambda: status_counts(db_url) == {"published": 21}, 10, "the mark committed on the server")
        proxy.set_mode("reset")
        proxy.set_mode("pass")
        line = tier.wait_log(lambda e: e.get("event") == "settle retry", 20, "the batch settled again")
        assert line["events"] == 20
        more = commit_events(db_url, topic, 5, keys=5, phase="after")
        messages = topic_reader(topic).read_ids(ids + more, 30, extra=1.0)
        copies = len([i for i in event_ids(messages) if i in set(ids)]) - len(ids)
        assert copies == 0
        settled = {} if delete_on_publish else {"published": 26}
        wait_for(lambda: status_counts(db_url) == settled, 10, "every event settled")
        # Nothing was duplicated, nor can be: no lease lost, no "may be duplicated".
        assert (metric_value(port, "kaireon_outbox_lease_lost_total") or 0) == 0
        assert not [e for e in tier.logs() if e.get("event") == "lease lost"]
        assert metric_value(port, "kaireon_outbox_processed_total", {"outcome": "published"}) == 26
        assert tier.proc.poll() is None, "the tier stopped"
        assert tier.stop() == 0
    finally:
        proxy.close()


# ---- case 6: the back-off after a failed tick holds under enqueue notifications ---------------------------


def test_a_failing_tick_backs_off_for_its_interval_while_enqueues_notify(pg, start_tier):
    # A database without the schema: every tick fails, non-transient. The NOTIFY an enqueue's
    # commit sends keeps coming every 10 ms: it must not cut the back-off (0.5 s) short.
    url = pg.create_database("kaireon_no_schema_notified")
    stop = threading.Event()

    def notify() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.wait(0.01):
                conn.execute("SELECT pg_notify('kaireon_outbox', '')")
    notifier = threading.Thread(target=notify, daemon=True)
    try:
        notifier.start()
        tier = start_tier(db_url=url, OUTBOX_POLL_INTERVAL_MS="500")
        assert tier.wait_exit(120) == 3
        failures = [ts(line) for line in tier.logs() if line.get("msg") == "outbox-publisher tick failed"]
        assert len(failures) == 30
        # 29 back-offs of 0.5 s between the first failure and the 30th (a few ms of slack each).
        assert failures[-1] - failures[0] >= 29 * 0.5 * 0.95, f"30 failures in {failures[-1] - failures[0]:.2f} s"
    finally:
        stop.set()
        notifier.join(5)
        pg.drop_database("kaireon_no_schema_notified")


def ts(line: dict) -> float:
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
