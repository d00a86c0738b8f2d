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

The parts, one job each (a name is patched where it is used, in its module, not here):
selection.py (the Selection, its times, START), limiter.py (the TokenBucket), cursor.py (the resume
Cursor), plan.py (the Plan, the Progress), holder.py (the operator, the holder, a dead holder),
stop.py (the signals), stream.py (the server-side read), engine.py (Replay: the publish loop, its
delivery reports and saves), report.py (the progress bar, the closing sentence, the log line),
command.py (`run`: the command), sql.py (db/replay.sql's blocks). This module re-exports them.
"""

from __future__ import annotations

from kaireon_pub.ops.replay.command import CONFIRM_ABOVE, run
from kaireon_pub.ops.replay.cursor import Cursor
from kaireon_pub.ops.replay.engine import REPLAY_HEADER, SAVE_EVERY_S, Lost, Replay
from kaireon_pub.ops.replay.holder import HOLD_S, operator_name, stale_holder
from kaireon_pub.ops.replay.limiter import TokenBucket
from kaireon_pub.ops.replay.plan import DEFAULT_RATE, SHOW_IDS, Plan, Progress
from kaireon_pub.ops.replay.report import progress_printer
from kaireon_pub.ops.replay.selection import START, Selection, parse_time
from kaireon_pub.ops.replay.sql import R
from kaireon_pub.ops.replay.stop import EXIT_INTERRUPTED, Stop
from kaireon_pub.ops.replay.stream import FETCH_ROWS, stream

__all__ = [
    "CONFIRM_ABOVE", "DEFAULT_RATE", "EXIT_INTERRUPTED", "FETCH_ROWS", "HOLD_S", "REPLAY_HEADER", "SAVE_EVERY_S",
    "SHOW_IDS", "START", "Cursor", "Lost", "Plan", "Progress", "R", "Replay", "Selection", "Stop", "TokenBucket",
    "operator_name", "parse_time", "progress_printer", "run", "stale_holder", "stream",
]
