"""What `replay` shows: the progress bar on a terminal, the run's closing sentence on stdout, and its
one log line (event "replay", logger kaireon_pub.ops.replay) whatever the outcome."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from kaireon_pub.ops.replay.plan import Progress

log = logging.getLogger("kaireon_pub.ops.replay")


def target_text(to_topic: str | None) -> str:
    return f"to topic {to_topic}" if to_topic else "to their own topics"


def ids_text(ids: list[int], total: int) -> str:
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


def summary(run_id: int, outcome: str, p: Progress, to_topic: str | None) -> str:
    """The run's closing sentence (stdout): the counts, the first failure, how to resume."""
    span = (p.last_acked or time.monotonic()) - (p.first_sent or p.started)
    rate = f" ({p.published / span:,.1f} events/s)" if p.published > 1 and span > 0 else ""
    text = (f"replay run {run_id} {outcome}: {p.published:,} of {p.remaining:,} events published "
            f"{target_text(to_topic)} in {span:.2f} s{rate}; {p.skipped:,} skipped")
    if p.failed:
        text += f"; first failure: {p.failed}"
    if outcome != "finished":
        text += f"; resume with `kaireon-pub replay --resume {run_id}`"
    return text


def log_outcome(audit: dict[str, object], outcome: str, p: Progress, code: int) -> None:
    """The run's one log line: `audit`'s fields and the counts; a warning unless the outcome is calm."""
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
