"""`replay`'s engine: one run's rows, after its cursor, produced in order at the rate cap by one
idempotent producer; the delivery reports move the cursor; the cursor, the counts and the new
positions are saved (which renews the run's hold) every SAVE_EVERY_S, while waiting included."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import psycopg

from kaireon_pub.ops.replay.cursor import Cursor
from kaireon_pub.ops.replay.holder import HOLD_S
from kaireon_pub.ops.replay.limiter import TokenBucket
from kaireon_pub.ops.replay.plan import SHOW_IDS, Plan, Progress
from kaireon_pub.ops.replay.selection import START
from kaireon_pub.ops.replay.sql import R
from kaireon_pub.ops.replay.stop import Stop
from kaireon_pub.settings import Settings
from kaireon_pub.worker.kafka.records import PoisonRow, check_topic, record_headers, record_key
from kaireon_pub.worker.rows import Row

REPLAY_HEADER = "kaireon-replay"
SAVE_EVERY_S = 0.5  # how often the cursor, the counts and the positions are written



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
