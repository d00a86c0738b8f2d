"""Traces of the publish: the OpenTelemetry spans of one batch and of its events (tracing.py
sets up the provider and its exporters).

What the tier emits, with the messaging semantic conventions:
- one span per published batch, `send` (kind CLIENT: its context goes on no record), with the
  batch's size and outcome counts;
- one span per event whose record was built, `send <topic>` (kind PRODUCER), a child of the batch
  span, from `produce()` to the event's delivery report (or the end of the batch for an event
  that was not confirmed), with `messaging.system=kafka`, `messaging.destination.name`,
  `messaging.message.id` (the event id), the partition and offset once delivered;
- the event span **links** to the context of the `traceparent` the application stored with the
  row (the trace the event was written in), and its own context is the record's `traceparent`.

Why a link, not a child: the publish happens seconds to hours after the application's request
ended (a backlog, an outage, a retry), one batch carries events of many traces, and one event can
be published more than once (a retry, a duplicate after a takeover). As children, those spans
would stretch the application's trace to the publish time and re-open it at every attempt; as
links, the tier's traces stay its own (sampled by its own sampler) and every publish attempt is
one click away from the application's trace, and back.

What wins on the record: when the event span is recorded (sampled), its context replaces the
row's `traceparent` (and drops the row's `tracestate`, which belongs to that trace), so a consumer
continues from the publish, and from there, through the link, reaches the application's trace.
When the span is not sampled, or tracing is off, the row's headers pass exactly as they are.

The batch is the unit of sampling (its span is a root): a batch the sampler drops costs one
sampling decision and nothing per event; a recorded event span costs the Python SDK's span (tens
of microseconds of CPU), hence a ratio sampler at high rates (README, Traces).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from kaireon_pub.worker.kafka.errors import classify, describe
from kaireon_pub.worker.rows import Row

if TYPE_CHECKING:
    from kaireon_pub.worker.kafka.outcome import BatchOutcome
    from kaireon_pub.worker.kafka.tracing import Tracing

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
OUTCOME_BY_KIND = {"permanent": "rejected", "retry": "retry"}  # every other kind: released
# W3C Trace Context's traceparent: version-trace_id-parent_id-flags (a later version may add fields).
TRACEPARENT_FORMAT = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^ \t]*)?[ \t]*")


class BatchTrace:
    """The spans of one batch: the batch span, and one span per event handed to librdkafka.

    `event()` runs on the event loop before the event's produce(), `reported()` on the delivery
    thread under the batch's lock (ending the event's span at its delivery report), `end()` on the
    event loop once the batch is closed (no report can come any more): it ends the rest."""

    __slots__ = ("_t", "span", "_parent", "_events", "_base")

    def __init__(self, tracing: Tracing, rows: list[Row], client_id: str):
        trace = tracing._trace
        self._t = tracing
        self._base = {"messaging.system": "kafka", "messaging.operation.name": "send",
                      "messaging.operation.type": "send"}
        self.span = tracing.tracer.start_span("send", kind=trace.SpanKind.CLIENT, attributes={
            **self._base, "messaging.client.id": client_id, "messaging.batch.message_count": len(rows)})
        self._parent = trace.set_span_in_context(self.span)
        self._events: dict[int, Any] = {}

    def event(self, row: Row, headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Start the event's span; the record's headers with its context as `traceparent`."""
        t = self._t
        try:
            trace = t._trace
            links = None
            written = _written_context(trace, headers)
            if written is not None:
                links = [trace.Link(written)]
            attributes = {**self._base, "messaging.destination.name": row.topic, "messaging.message.id": str(row.id)}
            if row.payload is None:
                attributes["messaging.kafka.message.tombstone"] = True
            if row.attempts:
                attributes["kaireon.outbox.attempts"] = row.attempts
            span = t.tracer.start_span(f"send {row.topic}", context=self._parent, kind=trace.SpanKind.PRODUCER,
                                       links=links, attributes=attributes)
            self._events[row.id] = span
            ctx = span.get_span_context()
            if not ctx.trace_flags.sampled:
                return headers  # not recorded: the application's context stays the record's
            ours = [(TRACEPARENT, _traceparent(ctx))]
            if ctx.trace_state:
                ours.append((TRACESTATE, ctx.trace_state.to_header().encode()))
            return _with_context(headers, ours)
        except Exception as exc:  # noqa: BLE001 - tracing never breaks a publish
            t.hook_failures.log(logging.ERROR, f"tracing failed: {type(exc).__name__}: {exc}")
            return headers

    def reported(self, event_id: int, err: Any, msg: Any) -> None:
        """The event's delivery report (delivery thread): its span ends now."""
        span = self._events.pop(event_id, None)
        if span is None:
            return
        try:
            if err is None:
                span.set_attribute("kaireon.outbox.outcome", "delivered")
                span.set_attribute("messaging.destination.partition.id", str(msg.partition()))
                span.set_attribute("messaging.kafka.offset", msg.offset())
            else:
                self._failed(span, OUTCOME_BY_KIND.get(classify(err), "released"), err.name(), describe(err))
            span.end()
        except Exception as exc:  # noqa: BLE001 - tracing never breaks a publish
            self._t.hook_failures.log(logging.ERROR, f"tracing failed: {type(exc).__name__}: {exc}")

    def end(self, out: BatchOutcome) -> None:
        """The batch's outcome: end the event spans no report ended, then the batch span."""
        try:
            for event_id, span in self._events.items():
                if event_id in out.rejected:
                    self._failed(span, "rejected", "rejected", out.rejected[event_id])
                elif event_id in out.retry:
                    self._failed(span, "retry", "retry", out.retry[event_id])
                else:
                    reason = out.producer_error or out.systemic_error or out.transient_error or "released"
                    self._failed(span, "released", "released", reason)
                span.end()
            self._events.clear()
            span = self.span
            for name, value in (("delivered", len(out.delivered)), ("rejected", len(out.rejected)),
                                ("retry", len(out.retry)), ("released", len(out.released)),
                                ("unconfirmed", out.unconfirmed)):
                span.set_attribute(f"kaireon.outbox.{name}", value)
            error = out.producer_error or out.systemic_error or out.transient_error
            if error:
                span.set_attribute("error.type", "producer" if out.producer_error else
                                   "systemic" if out.systemic_error else "transient")
                span.set_status(self._t._trace.Status(self._t._trace.StatusCode.ERROR, error))
            span.end()
        except Exception as exc:  # noqa: BLE001 - tracing never breaks a publish
            self._t.hook_failures.log(logging.ERROR, f"tracing failed: {type(exc).__name__}: {exc}")

    def _failed(self, span: Any, outcome: str, error_type: str, text: str) -> None:
        trace = self._t._trace
        span.set_attribute("kaireon.outbox.outcome", outcome)
        span.set_attribute("error.type", error_type)
        span.set_status(trace.Status(trace.StatusCode.ERROR, text))


def _written_context(trace: Any, headers: list[tuple[str, bytes]]) -> Any:
    """The SpanContext of the row's traceparent (and tracestate), or None when it has no valid one.

    W3C Trace Context's rules: version ff is invalid, version 00 has exactly four fields, neither
    id may be all zeros; header names are matched in any case."""
    parent = state = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == TRACEPARENT:
            parent = value
        elif lowered == TRACESTATE:
            state = value
    if parent is None:
        return None
    match = TRACEPARENT_FORMAT.fullmatch(parent.decode("latin-1"))
    if match is None:
        return None
    version, trace_id, span_id, flags, more = match.groups()
    if version == "ff" or (version == "00" and more):
        return None
    trace_id, span_id = int(trace_id, 16), int(span_id, 16)
    if not trace_id or not span_id:
        return None
    trace_state = trace.TraceState.from_header([state.decode("latin-1")]) if state else None
    return trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(int(flags, 16)),
                             trace_state=trace_state)


def _traceparent(ctx: Any) -> bytes:
    """A span's context as a traceparent header value."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()


def _with_context(headers: list[tuple[str, bytes]], ours: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """`headers` with the trace context headers (any case) replaced by `ours`, where the first of
    them was (else at the end)."""
    kept: list[tuple[str, bytes]] = []
    at = None
    for name, value in headers:
        if name.lower() in (TRACEPARENT, TRACESTATE):
            at = len(kept) if at is None else at
        else:
            kept.append((name, value))
    at = len(kept) if at is None else at
    return kept[:at] + ours + kept[at:]
