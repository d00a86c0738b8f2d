"""`kaireon-pub replay`, the command: a new run (the selection fixed, counted, confirmed when large,
its row started) or a resumed one (its row taken over), then the engine, then the run's row ended,
its closing sentence and its one log line; returns the exit code."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from functools import partial

import orjson
import psycopg
from confluent_kafka import KafkaException

from kaireon_pub.db import migrate
from kaireon_pub.db.connect import connect
from kaireon_pub.errors import ConfigError, ExitCode, new_error_id
from kaireon_pub.ops.migrate import report_not_ready
from kaireon_pub.ops.replay.engine import Lost, Replay
from kaireon_pub.ops.replay.holder import HOLD_S, operator_name, own_holder, stale_holder
from kaireon_pub.ops.replay.plan import SHOW_IDS, Plan, Progress
from kaireon_pub.ops.replay.report import ids_text, log_outcome, progress_printer, summary, target_text
from kaireon_pub.ops.replay.selection import START, Selection
from kaireon_pub.ops.replay.sql import R
from kaireon_pub.ops.replay.stop import EXIT_INTERRUPTED, Stop
from kaireon_pub.ops.replay.stream import stream
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings

log = logging.getLogger("kaireon_pub.ops.replay")

CONFIRM_ABOVE = 10_000  # a larger selection asks for confirmation (or --yes)


def run(settings: Settings, plan: Plan, *, dry_run: bool, yes: bool, confirm: Callable[[str], bool],
        echo: Callable[[str], None], tty: bool = False) -> int:
    """The command; returns the exit code. One log line per run (event "replay")."""
    resumed = plan.run_id is not None
    audit: dict[str, object] = {"event": "replay", "operator": operator_name(plan.operator),
                                "host": socket.gethostname(), "dryRun": dry_run, "resumed": resumed}
    progress = Progress()
    outcome, code, run_id = "failed", ExitCode.CRASH, plan.run_id
    holder = own_holder()
    try:
        with connect(settings, "replay") as conn:
            migrate.require_current(conn)
            if resumed:
                found = _resume(conn, plan, holder, echo)
                if isinstance(found, int):
                    outcome, code = ("nothing to resume" if found == ExitCode.OK else "refused"), found
                    return code
                cursor, progress.selected = found
            else:
                cursor = START
                plan.rate = plan.cap()
                plan.selection = plan.selection.fixed(conn.execute(R.replay_now).fetchone()[0])
            audit.update(selection=plan.selection.describe(), toTopic=plan.to_topic, rate=plan.rate, runId=run_id)
            count, ids = conn.execute(R.replay_count, {**plan.selection.params(cursor), "show": SHOW_IDS}).fetchone()
            progress.remaining = count
            if not resumed:
                progress.selected = count
            target = target_text(plan.to_topic)
            if dry_run or (count == 0 and not resumed):
                echo(f"{'would replay' if dry_run else 'replayed'} {count:,} events {target}{ids_text(ids, count)}")
                outcome, code = ("dry run" if dry_run else "matched nothing"), ExitCode.OK
                return code
            if not resumed and count > CONFIRM_ABOVE and not yes and not confirm(
                    f"Replay {count:,} events {target}?"):
                echo("nothing replayed")
                outcome, code = "declined", ExitCode.CRASH
                return code
            if not resumed:
                run_id, db_user = conn.execute(R.replay_start, {
                    "operator": audit["operator"], "host": audit["host"],
                    "selection": orjson.dumps(plan.selection.describe()).decode(), "to_topic": plan.to_topic,
                    "rate": plan.rate, "selected": count, "holder": holder, "hold": HOLD_S}).fetchone()
                audit.update(runId=run_id, dbUser=db_user)
            stop = Stop()
            position = cursor
            try:
                with stop.installed(), connect(settings, "replay") as reading:
                    replay = Replay(settings, conn, plan, run_id, cursor, holder, progress, stop,
                                    progress_printer(tty, run_id, count), partial(stream, reading, plan.selection))
                    try:
                        replay.run()
                    finally:
                        position = replay.cursor.position
                        if tty:
                            sys.stderr.write("\n")
            except Lost:
                raise
            except Exception as exc:  # noqa: BLE001 - the run's row still ends, with the error
                if isinstance(exc, psycopg.Error) and conn.broken:
                    raise
                # Anything unexpected (a bug, a refused connection, the broker): the cursor is saved
                # (Replay.run), the run ends failed and says how to resume; no traceback.
                error_id = new_error_id()
                error = redact(str(exc), settings)
                audit.update(errorId=error_id, errorType=type(exc).__name__, error=error)
                progress.failed = progress.failed or f"{type(exc).__name__}: {error} (errorId {error_id})"
                log.debug("replay run %s: unexpected error", run_id, exc_info=True)
            if progress.failed is not None:
                outcome, code = "failed", ExitCode.CRASH
            elif stop.signal is not None:
                outcome, code = "interrupted", EXIT_INTERRUPTED[stop.signal]
            else:
                outcome, code = "finished", ExitCode.OK
            conn.execute(R.replay_end, {"run_id": run_id, "holder": holder,
                                        "state": outcome, "error": progress.failed})
            audit["cursorEventId"] = position[1] or None
            echo(summary(run_id, outcome, progress, plan.to_topic))
            return code
    except migrate.SchemaNotReady as exc:
        outcome = "schema not ready"
        code = report_not_ready(exc, "replay")
        return code
    except (psycopg.Error, Lost, KafkaException, ConfigError) as exc:
        error_id = new_error_id()
        audit.update(errorId=error_id, errorType=type(exc).__name__, error=redact(str(exc), settings))
        resume = f"; resume with `kaireon-pub replay --resume {run_id}`" if run_id else ""
        echo(f"replay failed (errorId {error_id}){resume}")
        outcome, code = "failed", ExitCode.CRASH
        return code
    finally:
        log_outcome(audit, outcome, progress, code)


def _resume(conn: psycopg.Connection, plan: Plan, holder: str,
            echo: Callable[[str], None]) -> tuple[tuple[str, int], int] | int:
    """The cursor of the run to resume, now held by this process, and the run's selected count;
    or an exit code. The plan takes the run's selection, target and (unless given) rate."""
    row = conn.execute(R.replay_get, {"run_id": plan.run_id}).fetchone()
    if row is None:
        echo(f"no replay run {plan.run_id}")
        return ExitCode.CRASH
    (_, _, _, selection, to_topic, rate, cursor_xid, cursor_id, selected, published, _, state, held_by,
     held, finished) = row
    if finished:
        echo(f"replay run {plan.run_id} is finished ({published:,} of {selected:,} events published); "
             "nothing to resume")
        return ExitCode.OK
    taken = conn.execute(R.replay_take, {"run_id": plan.run_id, "holder": holder, "hold": HOLD_S,
                                         "stale_holder": stale_holder(held_by) if held else None}).fetchone()
    if taken is None:
        echo(f"replay run {plan.run_id} is being run by {held_by} ({state}); try again once it has stopped "
             f"(its hold lapses {HOLD_S} s after its last progress)")
        return ExitCode.CRASH
    plan.selection = Selection.from_json(selection)
    plan.to_topic = to_topic
    plan.rate = rate if plan.rate is None else plan.cap()
    return ((cursor_xid, cursor_id) if cursor_xid is not None else START), selected

