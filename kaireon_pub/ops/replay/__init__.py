"""`kaireon-pub replay`: re-publish retained events (status 'published', kept for
OUTBOX_RETENTION_SECONDS) chosen by key, id range, time window and topic, to their own topic or
another, in per-key order, at a rate cap, resumably.

- The records: built from the rows by worker/kafka/records.py, the functions the workers use
  (key, value, the `event-id`/`event-type`/`created-at` headers, CloudEvents mode, a Debezium
  table's own-only headers), plus one header `kaireon-replay: <run id>`. A replayed record is the
  original's bytes plus that header (less a `traceparent`, which only a traced publish adds).
  Consumers that want to tell a replay from the first delivery, or deduplicate, read the headers.
- The order: rows are read in the table's (xid, id) order, the order the workers published them in
  (a key is always in one shard), and produced in that order by one idempotent producer made from
  the tier's KAFKA_* settings: a key's records stay in order in their partition, retries included.
- The rate: a token bucket of `rate` events/s holding at most a tenth of a second of tokens.
- The run: a row of outbox_replay_runs (who, the selection, the target, the rate, the counts) with
  a resume cursor, the last event acknowledged together with every event before it. The cursor
  moves only over such an unbroken run of acknowledgements, so `--resume RUN_ID` after a SIGINT,
  a SIGTERM, a kill or a failed delivery sends every selected event after it: the only duplicates
  are records that were in flight (produced, not yet acknowledged in order) at the interruption.
- Replayed to its own topic, a row's published_partition/published_offset are set to the new
  record's position (the audit and `locate` then check the repaired record); to another topic they
  are left as they are.
- The window is over published_at; its end is fixed when the run starts (the database's clock when
  --until is not given), so events published while it runs are not taken in, and a resume replays
  the same selection.
- The reading: the selection after the cursor is read once, through a server-side cursor in a
  read-only transaction of a second connection, FETCH_ROWS rows per fetch between sends (no index
  serves (xid, id) on published rows: the selection is sorted once, not once per page). That
  transaction takes no transaction id, so the workers' claim horizon never waits for it; it holds
  back vacuum of the outbox while the run lasts.
- The hold: renewed with each save (every SAVE_EVERY_S), also while the rate cap waits and while
  the last records are drained, so a slow run keeps it and a `--resume` elsewhere is refused.
- One log line per run (event "replay"), whatever its outcome: who, the selection, the counts.
  An unexpected error still ends the run's row (state failed, cursor saved) with an error line.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import orjson
import psycopg
from confluent_kafka import KafkaException

from kaireon_pub.db import migrate
from kaireon_pub.db.connect import connect
from kaireon_pub.db.queries import load
from kaireon_pub.errors import ConfigError, ExitCode, new_error_id
from kaireon_pub.ops.migrate import report_not_ready
from kaireon_pub.redact import redact
from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka.records import PoisonRow, check_topic, record_headers, record_key
from kaireon_pub.worker.rows import Row

log = logging.getLogger("kaireon_pub.ops.replay")

R = load("replay.sql")

REPLAY_HEADER = "kaireon-replay"
DEFAULT_RATE = 1000.0  # events/s when --rate is not given
CONFIRM_ABOVE = 10_000  # a larger selection asks for confirmation (or --yes)
SHOW_IDS = 20
FETCH_ROWS = 2000  # rows per fetch of the server-side cursor
SAVE_EVERY_S = 0.5  # how often the cursor, the counts and the positions are written
HOLD_S = 30  # a run's hold lasts this long without a renewal (another process may then resume it)
START = ("0", 0)  # the cursor before any event: (xid, id)
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---- the selection ---------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """`audit`'s times, so that a window found there is given here as it was: an ISO 8601 time
    (`2026-12-06T12:00:00Z`, `2026-12-06 12:00+01:00`, a date; UTC when it names no zone) or a
    duration ago (90s, 30m, 6h, 7d), made absolute now. ValueError otherwise."""
    from kaireon_pub.ops.audit import parse_when

    return parse_when(text)


@dataclass(frozen=True)
class Selection:
    """Which retained events; every filter given must hold (AND). The window is over published_at,
    from `since` (inclusive) to `until` (exclusive)."""

    keys: tuple[str, ...] = ()
    id_from: int | None = None
    id_to: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    topics: tuple[str, ...] = ()

    def validate(self) -> str | None:
        """None when usable, else what is wrong (for a usage error)."""
        if self.id_from is not None and self.id_to is not None and self.id_from > self.id_to:
            return f"--id-from {self.id_from} is after --id-to {self.id_to}"
        if self.since is not None and self.until is not None and self.since >= self.until:
            return "--since must be before --until"
        if any(not key for key in self.keys):
            return "--key needs a non-empty key"
        if any(not topic for topic in self.topics):
            return "--topic needs a non-empty topic"
        return None

    def fixed(self, now: datetime) -> Selection:
        """The selection with its window's end fixed (`now` when --until was not given)."""
        return self if self.until is not None else Selection(self.keys, self.id_from, self.id_to, self.since,
                                                             now, self.topics)

    def params(self, cursor: tuple[str, int] = START) -> dict[str, object]:
        if self.until is None:
            raise ValueError("the window's end is fixed first (Selection.fixed)")
        return {"keys": list(self.keys) or None, "id_from": self.id_from, "id_to": self.id_to,
                "since": self.since, "until": self.until, "topics": list(self.topics) or None,
                "cursor_xid": cursor[0], "cursor_id": cursor[1]}

    def describe(self) -> dict[str, object]:
        """The selection as the run's row keeps it (and `from_json` reads it back)."""
        found: dict[str, object] = {"window": "published_at"}
        if self.keys:
            found["keys"] = list(self.keys)
        if self.id_from is not None:
            found["idFrom"] = self.id_from
        if self.id_to is not None:
            found["idTo"] = self.id_to
        if self.since is not None:
            found["since"] = self.since.isoformat()
        if self.until is not None:
            found["until"] = self.until.isoformat()
        if self.topics:
            found["topics"] = list(self.topics)
        return found

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Selection:
        def when(name: str) -> datetime | None:
            return parse_time(doc[name]) if doc.get(name) else None

        return cls(keys=tuple(doc.get("keys") or ()), id_from=doc.get("idFrom"), id_to=doc.get("idTo"),
                   since=when("since"), until=when("until"), topics=tuple(doc.get("topics") or ()))


# ---- the rate and the cursor -----------------------------------------------------------------


class TokenBucket:
    """At most `rate` takes per second on average, bursts of at most `burst` (default: a tenth of a
    second's worth, at least 1). Starts with one token, so n takes last (n - 1) / rate seconds.
    `wait(seconds)` is how it waits (the replay serves the producer meanwhile)."""

    def __init__(self, rate: float, *, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], object] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate / 10)
        self.tokens = 1.0
        self.clock = clock
        self.wait = wait
        self.last = clock()

    def take(self) -> None:
        while True:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1 - 1e-9:  # a rounding error's worth short is a whole token
                self.tokens = max(0.0, self.tokens - 1)
                return
            self.wait((1 - self.tokens) / self.rate)


class Cursor:
    """The resume cursor: records are sent in (xid, id) order and acknowledged in any order; the
    cursor is the last position acknowledged together with every position sent before it."""

    def __init__(self, start: tuple[str, int] = START):
        self.position = start
        self._sent: dict[int, tuple[str, int]] = {}  # sequence number -> position, in send order
        self._acked: set[int] = set()
        self._head = 0  # the lowest sequence number not passed yet
        self._next = 0

    def sent(self, position: tuple[str, int]) -> int:
        """A record of `position` was handed over; its sequence number, for `acked`."""
        seq = self._next
        self._next += 1
        self._sent[seq] = position
        return seq

    def acked(self, seq: int) -> None:
        self._acked.add(seq)

    def advance(self) -> int:
        """Moves the cursor over the unbroken run of acknowledgements; how many it passed."""
        passed = 0
        while self._head in self._acked:
            self._acked.discard(self._head)
            self.position = self._sent.pop(self._head)
            self._head += 1
            passed += 1
        return passed

    @property
    def in_flight(self) -> int:
        """Sent and not passed by the cursor (not acknowledged, or behind one that is not)."""
        return len(self._sent)


# ---- one run ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a run does: new (`run_id` None) or resumed."""

    selection: Selection
    to_topic: str | None = None
    rate: float | None = None  # events/s as given (0: no cap); None: DEFAULT_RATE, or a resumed run's own
    run_id: int | None = None
    operator: str | None = None

    def cap(self) -> float | None:
        """The effective cap of a new run: None for no cap."""
        rate = DEFAULT_RATE if self.rate is None else self.rate
        return rate if rate > 0 else None


@dataclass
class Progress:
    selected: int = 0  # in the selection at the run's start
    remaining: int = 0  # after the cursor, when this process started
    published: int = 0  # acknowledged by this process
    skipped: int = 0
    skipped_ids: list[int] = field(default_factory=list)  # the first SHOW_IDS, and why the first was
    skip_reason: str | None = None
    failed: str | None = None
    started: float = field(default_factory=time.monotonic)
    first_sent: float | None = None
    last_acked: float | None = None


def operator_name(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("USER"):
        return os.environ["USER"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_holder(holder: str | None) -> str | None:
    """`holder` when it is a process of this host that no longer exists (a killed run): its hold
    need not be waited out."""
    if not holder or ":" not in holder:
        return None
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    return None if _pid_alive(int(pid)) else holder


class Stop:
    """SIGINT/SIGTERM: finish what is in flight, save the cursor, stop. A second one stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[Stop]:
        for signum in EXIT_INTERRUPTED:
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


def stream(conn: psycopg.Connection, selection: Selection, cursor: tuple[str, int]) -> Iterator[tuple]:
    """The selection's rows after `cursor` in (xid, id) order, read once (`conn`: autocommit, idle,
    this stream's alone). A read-only transaction: no transaction id, so the claim horizon never
    waits for it; no statement or idle timeout (the first fetch sorts the selection, and a slow
    rate leaves it idle between fetches)."""
    conn.read_only = True
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', '0', true), "
                     "set_config('idle_in_transaction_session_timeout', '0', true)")
        with conn.cursor(name="kaireon_pub_replay") as rows:
            rows.itersize = FETCH_ROWS
            rows.execute(R.replay_rows, selection.params(cursor))
            yield from rows


class Replay:
    """Publishes one run's rows after its cursor; the database writes go through `conn`, the rows
    come from `read(cursor)` (`stream` on a connection of its own)."""

    def __init__(self, settings: Settings, conn: psycopg.Connection, plan: Plan, run_id: int,
                 cursor: tuple[str, int], holder: str, progress: Progress, stop: Stop,
                 show: Callable[[Progress], None], read: Callable[[tuple[str, int]], Iterable[tuple]],
                 producer: Any = None):
        self.settings, self.conn, self.plan, self.run_id, self.holder = settings, conn, plan, run_id, holder
        self.read = read
        self.progress, self.stop, self.show = progress, stop, show
        self.cursor = Cursor(cursor)
        if producer is None:
            from kaireon_pub.worker.kafka.producer import make_producer

            # The tier's KAFKA_* settings: enable.idempotence stays on (a key's records keep their
            # order in their partition through librdkafka's retries).
            producer = make_producer(settings, f"kaireon-pub-replay-{run_id}")
        self.producer = producer
        self.source = settings.cloudevents_source if settings.cloudevents else None
        self.header = (REPLAY_HEADER, str(run_id).encode())
        self.positions: list[tuple[int, int | None, int | None]] = []  # own-topic records acknowledged
        self.acked_unsaved = 0
        self.skipped_unsaved = 0
        self.legal_topics: set[str] = set()
        self.bucket = TokenBucket(plan.rate, wait=self._serve) if plan.rate else None  # resolved: None, no cap
        self.saved_at = time.monotonic()

    def _serve(self, seconds: float) -> None:
        """The token bucket's wait: delivery reports are served meanwhile; a signal ends it."""
        if self.stop.signal is not None:
            raise _Stopped
        self.producer.poll(min(seconds, 0.2))
        self._save_due()

    def _save_due(self) -> None:
        """Saves (and so renews the hold) when SAVE_EVERY_S has passed since the last save."""
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self._save()

    def _report(self, seq: int, row_id: int, own: bool, err: Any, msg: Any) -> None:
        """librdkafka's delivery report (inside poll/flush, this thread). Never raises: poll()
        would pass the exception on in the middle of the run."""
        try:
            if err is not None:
                if self.progress.failed is None:
                    self.progress.failed = f"event {row_id}: {err.str() if hasattr(err, 'str') else err}"
                return
            self.cursor.acked(seq)
            self.acked_unsaved += 1
            self.progress.published += 1
            self.progress.last_acked = time.monotonic()
            if own:
                # An acknowledgement may carry no position (None: a retry the broker recognised as a
                # duplicate, acks=0): the row's position is then unknown (NULL), not its old one.
                self.positions.append((row_id, _known(msg.partition()), _known(msg.offset())))
        except Exception as exc:  # noqa: BLE001 - reported as the run's failure instead
            if self.progress.failed is None:
                self.progress.failed = f"event {row_id}: delivery report not understood: {exc!r}"

    def run(self) -> None:
        """Until the selection is done, a delivery failed or a signal came; then everything in
        flight is waited for (at most message.timeout.ms and a little) and the cursor saved."""
        try:
            self._publish()
        except _Stopped:
            pass
        finally:
            deadline = time.monotonic() + self.settings.message_timeout_ms / 1000 + 5
            while len(self.producer) > 0 and time.monotonic() < deadline:
                self.producer.poll(0.1)
                self._save_due()
            self._save()

    def _publish(self) -> None:
        rows = iter(self.read(self.cursor.position))
        try:
            for values in rows:
                if self.stop.signal is not None or self.progress.failed is not None:
                    return
                row = Row(*values)
                if self.bucket is not None:
                    self.bucket.take()
                self._produce(row, (str(row.xid), row.id))
                self.producer.poll(0)
                self._save_due()
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()

    def _produce(self, row: Row, position: tuple[str, int]) -> None:
        topic = self.plan.to_topic or row.topic
        try:
            if topic not in self.legal_topics:
                check_topic(topic, self.legal_topics)
            headers = record_headers(row, self.source)
            key = record_key(row)
        except (PoisonRow, ValueError) as exc:
            # A row that cannot become a record (it could when it was published: a setting changed
            # since, or the row was edited): counted and passed over; the run's log line names it.
            if len(self.progress.skipped_ids) < SHOW_IDS:
                self.progress.skipped_ids.append(row.id)
            self.progress.skip_reason = self.progress.skip_reason or f"event {row.id}: {exc}"
            seq = self.cursor.sent(position)
            self.cursor.acked(seq)
            self.progress.skipped += 1
            self.skipped_unsaved += 1
            return
        seq = self.cursor.sent(position)
        if self.progress.first_sent is None:
            self.progress.first_sent = time.monotonic()
        report = partial(self._report, seq, row.id, topic == row.topic)
        while True:
            try:
                self.producer.produce(topic, row.payload, key, headers=[*headers, self.header], on_delivery=report)
                return
            except BufferError:  # librdkafka's queue is full: let it drain
                self.producer.poll(0.1)
                self._save_due()

    def _save(self) -> None:
        """The cursor, the counts, the positions: one transaction. Raises Lost when another process
        has taken the run over (this one's hold lapsed)."""
        self.cursor.advance()
        positions, self.positions = self.positions, []
        with self.conn.transaction():
            if positions:
                ids, parts, offsets = zip(*positions, strict=True)
                self.conn.execute(R.replay_positions, {"ids": list(ids), "partitions": list(parts),
                                                       "offsets": list(offsets)})
            xid, event_id = self.cursor.position
            done = self.conn.execute(R.replay_advance, {
                "run_id": self.run_id, "holder": self.holder, "hold": HOLD_S,
                "cursor_xid": None if (xid, event_id) == START else xid,
                "cursor_id": None if (xid, event_id) == START else event_id,
                "published": self.acked_unsaved, "skipped": self.skipped_unsaved}).fetchone()
            if done is None:
                raise Lost(f"replay run {self.run_id} was taken over by another process")
        self.acked_unsaved = self.skipped_unsaved = 0
        self.saved_at = time.monotonic()
        self.show(self.progress)


def _known(value: int | None) -> int | None:
    """A partition or offset of a delivery report; None when it has none (None or negative)."""
    return value if isinstance(value, int) and value >= 0 else None


class Lost(Exception):
    """The run's hold was taken over by another process."""


class _Stopped(Exception):
    """A signal came while the token bucket waited."""


# ---- the command -----------------------------------------------------------------------------


def _target_text(to_topic: str | None) -> str:
    return f"to topic {to_topic}" if to_topic else "to their own topics"


def _ids_text(ids: list[int], total: int) -> str:
    if not ids:
        return ""
    more = f", ... ({total - len(ids):,} more)" if total > len(ids) else ""
    return " (ids " + ", ".join(map(str, ids)) + more + ")"


def progress_printer(enabled: bool, run_id: int, total: int) -> Callable[[Progress], None]:
    """A one-line progress bar on stderr when it is a terminal; nothing otherwise."""
    if not enabled:
        return lambda _p: None

    def show(p: Progress) -> None:
        done = p.published + p.skipped
        share = done / total if total else 1.0
        bar = "#" * int(share * 30)
        elapsed = time.monotonic() - p.started
        rate = done / elapsed if elapsed > 0 else 0.0
        sys.stderr.write(f"\rreplay run {run_id} [{bar:<30}] {done:,}/{total:,} {rate:,.0f}/s")
        sys.stderr.flush()
    return show


def run(settings: Settings, plan: Plan, *, dry_run: bool, yes: bool, confirm: Callable[[str], bool],
        echo: Callable[[str], None], tty: bool = False) -> int:
    """The command; returns the exit code. One log line per run (event "replay")."""
    resumed = plan.run_id is not None
    audit: dict[str, object] = {"event": "replay", "operator": operator_name(plan.operator),
                                "host": socket.gethostname(), "dryRun": dry_run, "resumed": resumed}
    progress = Progress()
    outcome, code, run_id = "failed", ExitCode.CRASH, plan.run_id
    holder = f"{socket.gethostname()}:{os.getpid()}"
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
            target = _target_text(plan.to_topic)
            if dry_run or (count == 0 and not resumed):
                echo(f"{'would replay' if dry_run else 'replayed'} {count:,} events {target}{_ids_text(ids, count)}")
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
            echo(_summary(run_id, outcome, progress, plan.to_topic))
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
        _log(audit, outcome, progress, code)


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


def _summary(run_id: int, outcome: str, p: Progress, to_topic: str | None) -> str:
    span = (p.last_acked or time.monotonic()) - (p.first_sent or p.started)
    rate = f" ({p.published / span:,.1f} events/s)" if p.published > 1 and span > 0 else ""
    text = (f"replay run {run_id} {outcome}: {p.published:,} of {p.remaining:,} events published "
            f"{_target_text(to_topic)} in {span:.2f} s{rate}; {p.skipped:,} skipped")
    if p.failed:
        text += f"; first failure: {p.failed}"
    if outcome != "finished":
        text += f"; resume with `kaireon-pub replay --resume {run_id}`"
    return text


def _log(audit: dict[str, object], outcome: str, p: Progress, code: int) -> None:
    fields = {**audit, "outcome": outcome, "exitCode": code, "selected": p.selected or p.remaining,
              "published": p.published, "skipped": p.skipped,
              "elapsedSeconds": round(time.monotonic() - p.started, 3)}
    if p.failed:
        fields["failure"] = p.failed
    if p.skipped:
        fields.update(skippedIds=p.skipped_ids, skipReason=p.skip_reason)
    run_id = audit.get("runId")
    calm = ("finished", "dry run", "matched nothing", "nothing to resume")
    level = logging.INFO if outcome in calm else logging.WARNING
    log.log(level, f"replay{f' run {run_id}' if run_id else ''} {outcome}: {p.published} published", extra=fields)
